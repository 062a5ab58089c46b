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
