//! `threshold`: an example outpost handler that raises and clears temperature alerts.
//!
//! Each device is either alerting or not. An event whose `temp_c` goes above
//! [`RAISE_ABOVE`] while the device is not alerting raises an alert; one whose `temp_c` goes
//! below [`CLEAR_BELOW`] while it is alerting clears it. The gap between the two thresholds
//! (hysteresis) keeps a reading that hovers around one threshold from flapping. Every change
//! is published on `alerts/<device>` as
//! `{"device": .., "state": "raised" | "cleared", "temp_c": .., "threshold": ..}`; nothing is
//! published otherwise.
//!
//! Instances are fresh for every batch, so whether a device is alerting lives in the gateway's
//! key-value store under `alerting/<device>` (`1` or `0`). Events without a numeric `temp_c`
//! are skipped (logged at debug level); a payload that is not a JSON object fails the whole
//! batch.

use outpost_handler::serde_json::{json, Value};
use outpost_handler::{kv, log, Event, Output};

/// An alert is raised when `temp_c` goes above this while the device is not alerting.
const RAISE_ABOVE: f64 = 30.0;
/// An alert is cleared when `temp_c` goes below this while the device is alerting.
const CLEAR_BELOW: f64 = 25.0;

outpost_handler::handler!(threshold);

fn threshold(batch: Vec<Event>) -> Result<Vec<Output>, String> {
    let mut alerts = Vec::new();
    for event in &batch {
        let Some(temp_c) = event.json_object()?.get("temp_c").and_then(Value::as_f64) else {
            log::debug(format_args!(
                "event {}: no numeric temp_c, skipped",
                event.id
            ));
            continue;
        };
        let key = format!("alerting/{}", event.device);
        let alerting = kv::get(&key).is_some_and(|stored| stored == b"1");
        let (state, threshold, stored) = match alerting {
            false if temp_c > RAISE_ABOVE => ("raised", RAISE_ABOVE, "1"),
            true if temp_c < CLEAR_BELOW => ("cleared", CLEAR_BELOW, "0"),
            _ => continue,
        };
        kv::set(&key, stored);
        let alert = json!({
            "device": event.device,
            "state": state,
            "temp_c": temp_c,
            "threshold": threshold,
        });
        alerts.push(Output::json(format!("alerts/{}", event.device), &alert)?);
    }
    Ok(alerts)
}
