//! `enrich`: an example outpost handler that annotates JSON telemetry.
//!
//! For every event whose payload is a JSON object it emits one output on `enriched/<device>`
//! whose payload is that object plus:
//!
//! - `"device"`: the device identity the gateway derived from the topic (it replaces any
//!   `"device"` the device sent itself: the gateway's identity is the authoritative one);
//! - `"received_ms"`: when the gateway received the event;
//! - `"temp_f"` when the object has a numeric `"temp_c"` and no `"temp_f"`, or `"temp_c"` when
//!   it has a numeric `"temp_f"` and no `"temp_c"`, rounded to two decimals.
//!
//! A payload that is not a JSON object fails the whole batch with an error naming the event,
//! so the gateway retries it and, in the end, keeps it as a dead letter with that reason.

wit_bindgen::generate!({ path: "../wit", world: "handler" });

use serde_json::{Map, Value};

/// The component's implementation of the `handler` world.
struct Enrich;

impl Guest for Enrich {
    fn handle(batch: Vec<Event>) -> Result<Vec<Output>, String> {
        batch.iter().map(enrich).collect()
    }
}

export!(Enrich);

/// Builds the enriched output for one event, or the error that fails the batch.
fn enrich(event: &Event) -> Result<Output, String> {
    let mut object = json_object(event)?;
    object.insert("device".into(), event.device.clone().into());
    object.insert("received_ms".into(), event.received_ms.into());
    let number = |object: &Map<String, Value>, key: &str| object.get(key).and_then(Value::as_f64);
    if let (Some(c), None) = (number(&object, "temp_c"), object.get("temp_f")) {
        object.insert("temp_f".into(), round2(c * 9.0 / 5.0 + 32.0).into());
    } else if let (Some(f), None) = (number(&object, "temp_f"), object.get("temp_c")) {
        object.insert("temp_c".into(), round2((f - 32.0) * 5.0 / 9.0).into());
    }
    let payload = serde_json::to_vec(&Value::Object(object))
        .map_err(|e| format!("event {}: cannot encode output: {e}", event.id))?;
    Ok(Output {
        topic: format!("enriched/{}", event.device),
        payload,
    })
}

/// Parses the event's payload as a JSON object.
fn json_object(event: &Event) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(&event.payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(format!(
            "event {}: payload is not a JSON object: found {}",
            event.id,
            kind(&other)
        )),
        Err(e) => Err(format!(
            "event {}: payload is not a JSON object: {e}",
            event.id
        )),
    }
}

/// The JSON type name of a value, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Rounds to two decimal places.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
