//! `enrich`: an example outpost handler that annotates JSON telemetry.
//!
//! For every event whose payload is a JSON object it emits one output on `enriched/<device>`
//! whose payload is that object plus:
//!
//! - `"device"`: the device identity the gateway derived from the topic (it replaces any
//!   `"device"` the device sent itself: the gateway's identity is the authoritative one);
//! - `"received_ms"`: when the gateway received the event;
//! - `"temp_f"` when the object has a numeric `"temp_c"` and no `"temp_f"`, or `"temp_c"` when
//!   it has a numeric `"temp_f"` and no `"temp_c"`, rounded to two decimals;
//! - `"location"`: `{"lat": .., "lon": ..}`, where the gateway placed the event (from its
//!   payload, its device's last known position or the gateway's), when known;
//! - `"regions"`: the region tags of that location, when it has any.
//!
//! A payload that is not a JSON object fails the whole batch with an error naming the event,
//! so the gateway retries it and, in the end, keeps it as a dead letter with that reason.

use outpost_handler::{Event, Output};

outpost_handler::handler!(enrich);

fn enrich(batch: Vec<Event>) -> Result<Vec<Output>, String> {
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    batch
        .iter()
        .map(|event| {
            let mut object = event.json_object()?;
            object.insert("device".into(), event.device.clone().into());
            object.insert("received_ms".into(), event.received_ms.into());
            // Only the missing one of the two, and only from a number.
            let converted = match (object.get("temp_c"), object.get("temp_f")) {
                (Some(c), None) => c.as_f64().map(|c| ("temp_f", c * 9.0 / 5.0 + 32.0)),
                (None, Some(f)) => f.as_f64().map(|f| ("temp_c", (f - 32.0) * 5.0 / 9.0)),
                _ => None,
            };
            if let Some((key, value)) = converted {
                object.insert(key.into(), round2(value).into());
            }
            if let Some(at) = &event.location {
                let location = outpost_handler::serde_json::json!({ "lat": at.lat, "lon": at.lon });
                object.insert("location".into(), location);
            }
            if !event.regions.is_empty() {
                object.insert("regions".into(), event.regions.clone().into());
            }
            Output::json(format!("enriched/{}", event.device), &object)
        })
        .collect()
}
