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
//! key-value store under `alerting/<device>`. Events without a numeric `temp_c` are skipped
//! (logged at debug level); a payload that is not a JSON object fails the whole batch.

wit_bindgen::generate!({ path: "../wit", world: "handler" });

use outpost::handler::host::{kv_get, kv_set, log, Level};
use serde_json::{json, Map, Value};

/// An alert is raised when `temp_c` goes above this while the device is not alerting.
const RAISE_ABOVE: f64 = 30.0;
/// An alert is cleared when `temp_c` goes below this while the device is alerting.
const CLEAR_BELOW: f64 = 25.0;

/// Stored value of `alerting/<device>` while the device is alerting.
const ALERTING: &[u8] = b"1";
/// Stored value of `alerting/<device>` once its alert has been cleared.
const NOT_ALERTING: &[u8] = b"0";

/// The component's implementation of the `handler` world.
struct Threshold;

impl Guest for Threshold {
    fn handle(batch: Vec<Event>) -> Result<Vec<Output>, String> {
        let mut outputs = Vec::new();
        for event in &batch {
            outputs.extend(check(event)?);
        }
        Ok(outputs)
    }
}

export!(Threshold);

/// Updates the device's alert state for one event and returns the alert to publish, if any.
fn check(event: &Event) -> Result<Option<Output>, String> {
    let object = json_object(event)?;
    let Some(temp_c) = object.get("temp_c").and_then(Value::as_f64) else {
        log(
            Level::Debug,
            &format!("event {}: no numeric temp_c, skipped", event.id),
        );
        return Ok(None);
    };
    let key = format!("alerting/{}", event.device);
    let alerting = kv_get(&key).as_deref() == Some(ALERTING);
    let (state, threshold, stored) = if !alerting && temp_c > RAISE_ABOVE {
        ("raised", RAISE_ABOVE, ALERTING)
    } else if alerting && temp_c < CLEAR_BELOW {
        ("cleared", CLEAR_BELOW, NOT_ALERTING)
    } else {
        return Ok(None);
    };
    kv_set(&key, stored);
    let alert = json!({
        "device": event.device,
        "state": state,
        "temp_c": temp_c,
        "threshold": threshold,
    });
    Ok(Some(Output {
        topic: format!("alerts/{}", event.device),
        payload: alert.to_string().into_bytes(),
    }))
}

/// Parses the event's payload as a JSON object.
fn json_object(event: &Event) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(&event.payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(format!("event {}: payload is not a JSON object", event.id)),
        Err(e) => Err(format!(
            "event {}: payload is not a JSON object: {e}",
            event.id
        )),
    }
}
