//! The values that flow through the pipeline: an [`Event`] received from a device, and the
//! [`Output`]s derived from it that are queued for an upstream.

use serde::{Deserialize, Serialize};

/// A WGS 84 position in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude in degrees, -90..=90.
    pub lat: f64,
    /// Longitude in degrees, -180..=180.
    pub lon: f64,
}

/// One publish received from a local device, as the router and the handlers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's journal id: unique, and the same each time the event is processed.
    pub id: u64,
    /// The MQTT topic the device published on.
    pub topic: String,
    /// The device identity derived from the topic (see the route's `device_segment`).
    pub device: String,
    /// The MQTT client id of the connection that published it.
    pub client_id: String,
    /// The payload exactly as published.
    pub payload: Vec<u8>,
    /// When the gateway received it, in milliseconds since the Unix epoch.
    pub received_ms: u64,
    /// Where the event happened, when known.
    pub location: Option<Location>,
    /// Region tags of the geofences containing `location`.
    pub regions: Vec<String>,
}

/// One message produced by a route (a handler's output, or the event itself for a passthrough
/// route), before it is queued for an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The MQTT topic to publish on.
    pub topic: String,
    /// The payload to publish.
    pub payload: Vec<u8>,
}

/// Milliseconds since the Unix epoch, saturating at 0 for clocks set before 1970.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The geography an event was routed with, kept with the event wherever it waits (handler
/// queue, retries, dead letters) so that a later attempt sees the same location and region
/// tags, and its outputs are sent only where those tags allow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Geo {
    /// The event's location, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Its region tags, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Its outputs stay on the gateway (the `local-only` policy for events without location).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl Geo {
    /// The stored form: empty for no geography, JSON otherwise.
    pub fn encode(&self) -> String {
        if *self == Geo::default() {
            return String::new();
        }
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the stored form. Text that is not a valid encoding (a damaged row) yields an
    /// event that stays local: when its tags cannot be known, its data must not leave.
    pub fn decode(text: &str) -> Geo {
        if text.is_empty() {
            return Geo::default();
        }
        serde_json::from_str(text).unwrap_or(Geo {
            location: None,
            regions: Vec::new(),
            local: true,
        })
    }
}

/// Region tags as stored on an outbox row: sorted names joined by `,` (region names never
/// contain one); empty for none.
pub fn join_tags(tags: &[String]) -> String {
    tags.join(",")
}

/// The tags of an outbox row, as [`join_tags`] wrote them.
pub fn split_tags(stored: &str) -> impl Iterator<Item = &str> {
    stored.split(',').filter(|t| !t.is_empty())
}
