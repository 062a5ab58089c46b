//! One connection per upstream broker, draining that link's outbox rows in order.
//!
//! Guarantees:
//! - Rows are published with QoS 1 in outbox order, with up to `inflight` awaiting PUBACK.
//! - A row is deleted from the outbox only after the upstream's PUBACK for it arrived (and, on
//!   MQTT 5, only when that PUBACK's reason code is a success: `0x00`, or `0x10` "no matching
//!   subscribers").
//! - When the connection drops, everything not yet acknowledged is sent again on the next
//!   connection, starting from the oldest row still queued: rumqttc's own memory of in-flight
//!   publishes is thrown away with the connection (a fresh client per connection, clean
//!   session), because the outbox is the source of truth. A row acknowledged by the upstream
//!   whose PUBACK was lost with the connection is therefore sent twice (at-least-once).
//! - Every publish carries the row's stable message id (`<gateway_id>-...`, the same each time
//!   the row is sent, and each time its event is processed), so that the upstream can drop
//!   duplicates:
//!   - `protocol = "5"`: as the MQTT 5 user property `outpost-msg-id`; payload unchanged.
//!   - `protocol = "3.1.1"`, `envelope = true`: the payload becomes the JSON object
//!     `{"id": <msg id>, "topic": <topic>, "payload": <the payload>}` when the payload is JSON
//!     (UTF-8 text that parses as one JSON value; embedded verbatim, byte for byte), and
//!     `{"id": .., "topic": .., "payload_base64": <standard base64 with padding>}` otherwise.
//!   - `protocol = "3.1.1"`, `envelope = false`: payload unchanged and no id (3.1.1 has no
//!     place for one).
//! - An MQTT 5 upstream that refuses a row (PUBACK reason code 0x80 or above, e.g. quota
//!   exceeded, not authorized) does not lose it: the row stays queued, nothing more is sent on
//!   that connection, the rest of the window is acknowledged (and deleted) as usual, then the
//!   connection is closed and the row is offered again after a backoff. Rows behind it in the
//!   same window may have been accepted, so a refusal can reorder deliveries within one window.
//!   A row refused `max_refusals` times in a row becomes a dead letter (`rejected`, with the
//!   upstream's reason), so that it stops holding up its link; the log names it once when first
//!   refused and once when dead-lettered.
//! - A row whose time to live has passed (`ttl_secs` of its route or link) is never sent: it
//!   becomes a dead letter (`expired`) when its turn comes.
//! - The outbox is read in batches (at least [`READ_BATCH_MIN`] rows, or the window), not
//!   once per acknowledgement.
//! - Reconnects back off exponentially with jitter, from `reconnect_min_ms` to
//!   `reconnect_max_ms`. The backoff starts again from `reconnect_min_ms` only after a
//!   connection that worked (a row accepted, or nothing in flight when it was lost). A refusal,
//!   or a connection closed while rows were in flight before any was accepted (some brokers
//!   close the connection over a publish they will not take), is a failed attempt, and the
//!   next connection sends one row until one is accepted, so the rows behind a row the
//!   upstream will not take are not sent (and duplicated) again and again.
//! - An outage or a stuck row costs one warning (then debug lines, one per attempt), not a
//!   flood.
//!
//! The two protocol versions differ only in [`UpstreamClient`] (how a row becomes a publish)
//! and in [`LinkEvent`]'s mapping of each client's events; the session logic is shared.
//!
//! This module does not decide what goes into the outbox, and never re-routes a row to another
//! link.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as ConnectReturnCodeV5, Packet as PacketV5, PubAckReason,
};
use rumqttc::{ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::config::{parse_broker_url, BrokerAddress, MqttVersion, UpstreamConfig};
use crate::metrics::Metrics;
use crate::store::{OutboxRow, Store};

/// The MQTT 5 user property that carries an output's stable message id.
pub const MSG_ID_PROPERTY: &str = "outpost-msg-id";

/// Largest packet MQTT can express (a 4-byte remaining length plus the fixed header). rumqttc's
/// 3.1.1 client refuses to send packets above 10 KiB by default, which would wedge a link on
/// its first large row; the upstream broker is the one to decide what is too large.
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// Fewest outbox rows read at once (more when the inflight window is larger).
const READ_BATCH_MIN: usize = 256;

/// Payload bytes after which an outbox read stops early (it reads at least one row), so that
/// a batch of large rows does not take much memory on a small board.
const READ_BATCH_BYTES: usize = 1024 * 1024;

/// Incoming packets from an upstream without control subscriptions are acknowledgements
/// only; this is plenty.
const MAX_INCOMING_PACKET: usize = 64 * 1024;

/// A request that arrived on an uplink's control subscriptions, for the module control plane.
pub struct RemoteRequest {
    /// The link it came from.
    pub link: String,
    /// Its topic on the upstream broker.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Publishes a reply on the same connection (QoS 0: at most once).
    pub reply: UpstreamReply,
}

/// Publishes replies on the upstream connection a [`RemoteRequest`] arrived on.
#[derive(Clone)]
pub struct UpstreamReply(UpstreamClient);

impl UpstreamReply {
    /// Queues `payload` on `topic` with QoS 0 (not retained). Fails when the connection is
    /// gone or its request queue is full; a reply is informational and may be lost.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match &self.0 {
            UpstreamClient::V311 { client, .. } => client
                .try_publish(topic, QoS::AtMostOnce, false, payload)
                .map_err(|e| e.to_string()),
            UpstreamClient::V5(client) => client
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    false,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }
}

/// What an uplink subscribes to on its upstream for the module control plane, and where the
/// requests go.
#[derive(Clone)]
pub struct UplinkControl {
    /// Topic filters subscribed to (QoS 1) after every CONNACK.
    pub filters: Vec<String>,
    /// Where requests go. Full: the request is dropped with a warning (control requests are
    /// re-sent by the operator; device data never takes this path).
    pub requests: mpsc::Sender<RemoteRequest>,
    /// Largest packet accepted from the upstream (a module deploy is one packet).
    pub max_packet: usize,
}

/// Everything one uplink needs.
pub struct Uplink {
    /// The upstream's configuration.
    pub config: UpstreamConfig,
    /// The gateway id, for the default client id.
    pub gateway_id: String,
    /// The database holding the outbox.
    pub store: Arc<Store>,
    /// Notified whenever rows were added to the outbox.
    pub wake: Arc<Notify>,
    /// Where delivered counts and the connection state go.
    pub metrics: Arc<Metrics>,
    /// Control subscriptions (module deploys through the upstream), if any.
    pub control: Option<UplinkControl>,
}

/// How a connection ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection failed or dropped.
    Lost {
        /// How far it got.
        progress: Progress,
        /// What happened, for the log.
        reason: String,
        /// Rows sent on this connection that got no PUBACK.
        unanswered: usize,
    },
    /// The upstream refused a row (MQTT 5 PUBACK with an error reason code); it stays queued.
    Refused {
        /// The oldest row refused.
        refusal: Refusal,
        /// Other rows sent on this connection that got no PUBACK.
        unanswered: usize,
    },
}

/// How far a lost connection got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// No CONNACK: the upstream is not reachable (or refused the connection).
    NotConnected,
    /// Connected, but lost while rows were in flight and before any was acknowledged. Some
    /// brokers close the connection over a publish they will not take; treating this like a
    /// failed attempt keeps such a row from causing a reconnect storm and a warning flood.
    Stalled,
    /// Connected and working: rows were acknowledged, or there was nothing in flight.
    Working,
}

/// The oldest row an upstream refused during one connection.
struct Refusal {
    /// The refused row's outbox id.
    row: i64,
    /// Its message id, for the log.
    msg_id: String,
    /// The reason code the upstream gave.
    reason: String,
}

enum DeleteRequest {
    Rows(Vec<i64>),
    Flush(oneshot::Sender<()>),
}

/// What the session loop needs to know of either client's events.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkEvent {
    /// The upstream answered CONNECT: accepted, or refused with this reason.
    ConnAck(Result<(), String>),
    /// A publish went out with this packet id (reported in the order publishes were requested).
    Published(u16),
    /// The upstream acknowledged this packet id; `refusal` is set when it did not accept the
    /// message (MQTT 5 reason code 0x80 or above).
    PubAck { pkid: u16, refusal: Option<String> },
    /// The upstream sent DISCONNECT.
    Disconnect,
    /// A publish on one of the control subscriptions.
    Incoming { topic: String, payload: Vec<u8> },
    /// Anything else (pings, subscriptions, ...).
    Other,
    /// The connection failed; the client's event loop is finished.
    Error(String),
}

impl LinkEvent {
    fn from_v311(event: Result<Event, rumqttc::ConnectionError>) -> LinkEvent {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code == ConnectReturnCode::Success {
                    LinkEvent::ConnAck(Ok(()))
                } else {
                    LinkEvent::ConnAck(Err(format!("refused: {:?}", ack.code)))
                }
            }
            // QoS 0 publishes (control replies) have packet id 0 and are never acknowledged.
            Ok(Event::Outgoing(Outgoing::Publish(0))) => LinkEvent::Other,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Published(pkid),
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Incoming {
                topic: p.topic,
                payload: p.payload.to_vec(),
            },
            Ok(Event::Incoming(Packet::PubAck(ack))) => LinkEvent::PubAck {
                pkid: ack.pkid,
                refusal: None,
            },
            Ok(Event::Incoming(Packet::Disconnect)) => LinkEvent::Disconnect,
            Ok(_) => LinkEvent::Other,
            Err(e) => LinkEvent::Error(e.to_string()),
        }
    }

    fn from_v5(event: Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>) -> LinkEvent {
        use rumqttc::v5::Event as EventV5;
        match event {
            Ok(EventV5::Incoming(PacketV5::ConnAck(ack))) => {
                if ack.code == ConnectReturnCodeV5::Success {
                    LinkEvent::ConnAck(Ok(()))
                } else {
                    LinkEvent::ConnAck(Err(format!("refused: {:?}", ack.code)))
                }
            }
            Ok(EventV5::Outgoing(Outgoing::Publish(0))) => LinkEvent::Other,
            Ok(EventV5::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Published(pkid),
            Ok(EventV5::Incoming(PacketV5::Publish(p))) => LinkEvent::Incoming {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
            },
            Ok(EventV5::Incoming(PacketV5::PubAck(ack))) => LinkEvent::PubAck {
                pkid: ack.pkid,
                refusal: match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => {
                        let detail = ack
                            .properties
                            .and_then(|p| p.reason_string)
                            .map(|s| format!(" ({s})"))
                            .unwrap_or_default();
                        Some(format!("{other:?}{detail}"))
                    }
                },
            },
            Ok(EventV5::Incoming(PacketV5::Disconnect(d))) => {
                debug!(reason = ?d.reason_code, "upstream sent DISCONNECT");
                LinkEvent::Disconnect
            }
            Ok(_) => LinkEvent::Other,
            Err(e) => LinkEvent::Error(e.to_string()),
        }
    }
}

/// Spawns the task that polls a rumqttc event loop (either version) and hands each event,
/// mapped by `$map`, to the session, until the connection fails (rumqttc would reconnect on its
/// own; the session makes a fresh client instead) or the session is gone. Packets rumqttc read
/// just before the failure (say a PUBACK, then the broker closing the connection) are still in
/// its buffer then: they are handed over before the error, so they count.
macro_rules! drive {
    ($eventloop:ident, $events:ident, $map:path) => {
        tokio::spawn(async move {
            loop {
                match $eventloop.poll().await {
                    Ok(event) => {
                        if $events.send($map(Ok(event))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        for event in $eventloop.state.events.drain(..) {
                            let _ = $events.send($map(Ok(event)));
                        }
                        let _ = $events.send($map(Err(e)));
                        return;
                    }
                }
            }
        })
    };
}

/// One connection's client, for either protocol version: turns outbox rows into publishes.
#[derive(Clone)]
enum UpstreamClient {
    /// MQTT 3.1.1; `envelope` wraps each payload in a JSON envelope carrying the message id.
    V311 {
        client: rumqttc::AsyncClient,
        envelope: bool,
    },
    /// MQTT 5; the message id goes into a user property.
    V5(rumqttc::v5::AsyncClient),
}

impl UpstreamClient {
    /// Creates a fresh client (clean session) and starts its event loop in its own task, so
    /// that the session only ever waits on channels, which are safe to select on. The task is
    /// aborted when the returned guard is dropped.
    fn connect(
        config: &UpstreamConfig,
        client_id: String,
        address: &BrokerAddress,
        max_incoming: usize,
    ) -> (
        UpstreamClient,
        mpsc::UnboundedReceiver<LinkEvent>,
        AbortOnDrop,
    ) {
        let window = config.inflight;
        let capacity = usize::from(window) + 16;
        // Validation keeps this in 5..=65535; clamp anyway, rumqttc panics outside it.
        let keep_alive = Duration::from_secs(config.keep_alive_secs.clamp(5, 65_535));
        let (events_tx, events) = mpsc::unbounded_channel();
        let (client, driver) = match config.protocol {
            MqttVersion::V311 => {
                let mut options = MqttOptions::new(client_id, &address.host, address.port);
                options
                    .set_keep_alive(keep_alive)
                    .set_clean_session(true)
                    .set_inflight(window)
                    .set_max_packet_size(max_incoming, MQTT_MAX_PACKET)
                    .set_request_channel_capacity(capacity);
                let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
                let driver = drive!(eventloop, events_tx, LinkEvent::from_v311);
                let client = UpstreamClient::V311 {
                    client,
                    envelope: config.envelope,
                };
                (client, driver)
            }
            MqttVersion::V5 => {
                let mut options =
                    rumqttc::v5::MqttOptions::new(client_id, &address.host, address.port);
                options
                    .set_keep_alive(keep_alive)
                    .set_clean_start(true)
                    .set_session_expiry_interval(None)
                    .set_outgoing_inflight_upper_limit(window)
                    .set_max_packet_size(u32::try_from(max_incoming).ok())
                    .set_request_channel_capacity(capacity);
                let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
                let driver = drive!(eventloop, events_tx, LinkEvent::from_v5);
                (UpstreamClient::V5(client), driver)
            }
        };
        (client, events, AbortOnDrop(driver))
    }

    /// Queues the row as a QoS 1 publish, carrying its message id as the protocol allows.
    /// Fails only when the event loop is gone (the request channel is sized above the window)
    /// or the topic is not a valid topic name.
    fn try_publish(&self, row: OutboxRow) -> Result<(), String> {
        match self {
            UpstreamClient::V311 { client, envelope } => {
                let payload = if *envelope {
                    envelope_payload(&row)
                } else {
                    row.payload
                };
                client
                    .try_publish(row.topic, QoS::AtLeastOnce, false, payload)
                    .map_err(|e| e.to_string())
            }
            UpstreamClient::V5(client) => {
                let properties = PublishProperties {
                    user_properties: vec![(MSG_ID_PROPERTY.to_string(), row.msg_id)],
                    ..PublishProperties::default()
                };
                client
                    .try_publish_with_properties(
                        row.topic,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        row.payload,
                        properties,
                    )
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes (QoS 1) to every filter; fails only when the event loop is gone.
    fn try_subscribe(&self, filters: &[String]) -> Result<(), String> {
        for filter in filters {
            match self {
                UpstreamClient::V311 { client, .. } => client
                    .try_subscribe(filter.as_str(), QoS::AtLeastOnce)
                    .map_err(|e| e.to_string())?,
                UpstreamClient::V5(client) => client
                    .try_subscribe(filter.as_str(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .map_err(|e| e.to_string())?,
            }
        }
        Ok(())
    }

    /// Asks for a clean DISCONNECT; best effort.
    fn try_disconnect(&self) {
        let _ = match self {
            UpstreamClient::V311 { client, .. } => client.try_disconnect().map_err(|_| ()),
            UpstreamClient::V5(client) => client.try_disconnect().map_err(|_| ()),
        };
    }
}

/// The JSON envelope for MQTT 3.1.1 upstreams: `{"id":..,"topic":..,"payload":..}` with the
/// payload embedded verbatim when it is JSON, else `"payload_base64"`.
fn envelope_payload(row: &OutboxRow) -> Vec<u8> {
    let mut out =
        String::with_capacity(row.msg_id.len() + row.topic.len() + row.payload.len() * 4 / 3 + 64);
    out.push_str("{\"id\":");
    out.push_str(&json_string(&row.msg_id));
    out.push_str(",\"topic\":");
    out.push_str(&json_string(&row.topic));
    match json_text(&row.payload) {
        Some(text) => {
            out.push_str(",\"payload\":");
            out.push_str(text);
        }
        None => {
            out.push_str(",\"payload_base64\":\"");
            out.push_str(&base64(&row.payload));
            out.push('"');
        }
    }
    out.push('}');
    out.into_bytes()
}

/// The payload as text when it is one complete JSON value (what `serde_json` parses, so the
/// envelope parses wherever the payload did).
fn json_text(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload).ok()?;
    serde_json::from_str::<serde_json::Value>(text).ok()?;
    Some(text)
}

/// `s` as a quoted, escaped JSON string.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Standard base64 (RFC 4648 section 4, with padding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        // A chunk of n bytes gives n + 1 characters, padded with '=' to 4.
        for i in 0..4 {
            if i <= chunk.len() {
                let index = (group >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Uplink {
    /// Hands a publish from a control subscription to the module control plane.
    fn forward(&self, client: &UpstreamClient, topic: String, payload: Vec<u8>) {
        let Some(control) = &self.control else {
            return;
        };
        let request = RemoteRequest {
            link: self.config.name.clone(),
            topic,
            payload,
            reply: UpstreamReply(client.clone()),
        };
        if let Err(e) = control.requests.try_send(request) {
            let topic = match &e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => {
                    r.topic.clone()
                }
            };
            warn!(link = %self.config.name, %topic, "control request dropped: the control plane is busy or stopped");
        }
    }

    /// The MQTT client id this uplink connects with.
    pub fn client_id(&self) -> String {
        self.config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-{}-{}", self.gateway_id, self.config.name))
    }

    /// Runs until `shutdown` becomes true. Never returns an error: every failure is logged,
    /// counted and retried after a backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.config.name.clone();
        let address = match parse_broker_url(&self.config.url) {
            Ok(a) => a,
            Err(e) => {
                // Config validation rejects this earlier; keep the task harmless anyway.
                warn!(link = %name, error = %e, "invalid upstream URL; link disabled");
                return;
            }
        };
        let (delete_tx, delete_rx) = mpsc::unbounded_channel();
        let deleter = tokio::spawn(delete_acknowledged(
            self.store.clone(),
            self.metrics.clone(),
            delete_rx,
        ));
        let min = Duration::from_millis(self.config.reconnect_min_ms);
        let max = Duration::from_millis(self.config.reconnect_max_ms);
        let mut backoff = min;
        // Failed attempts since the link was last up: the first is a warning, the rest (one
        // per backoff step) are debug lines, so a long outage does not flood the log.
        let mut failed_attempts: u64 = 0;
        // The last row the upstream refused and how many times in a row: a refusal is a
        // warning once per row, and a row refused `max_refusals` times is dead-lettered.
        let mut last_refused: Option<(i64, u32)> = None;
        // When the last connection ended over a row (refused, or closed before anything was
        // accepted), the next one sends the rows that went unanswered one at a time, so that a
        // row the upstream will not take does not drag the rows behind it along every time.
        let mut careful = 0usize;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let end = self
                .session(&address, &delete_tx, &mut shutdown, careful)
                .await;
            self.metrics.set_link_connected(&name, false);
            // Acknowledged rows must be gone before the next session re-reads the outbox.
            let (done_tx, done_rx) = oneshot::channel();
            if delete_tx.send(DeleteRequest::Flush(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
            careful = match end {
                SessionEnd::Refused { unanswered, .. } => unanswered + 1,
                SessionEnd::Lost {
                    progress: Progress::Stalled,
                    unanswered,
                    ..
                } => unanswered,
                _ => 0,
            };
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost {
                    progress, reason, ..
                } => {
                    if progress == Progress::Working {
                        warn!(link = %name, upstream = %address, %reason, "upstream connection lost; outputs wait in the outbox");
                        backoff = min;
                        failed_attempts = 0;
                    } else if failed_attempts == 0 {
                        if progress == Progress::Stalled {
                            warn!(link = %name, upstream = %address, %reason, "upstream closed the connection before acknowledging anything; outputs wait in the outbox, retrying with backoff");
                        } else {
                            warn!(link = %name, upstream = %address, %reason, "upstream not reachable; outputs wait in the outbox, retrying with backoff");
                        }
                    } else {
                        debug!(link = %name, upstream = %address, %reason, ?progress, attempt = failed_attempts + 1, "upstream still not reachable or not acknowledging");
                    }
                    failed_attempts += 1;
                }
                SessionEnd::Refused {
                    refusal:
                        Refusal {
                            row,
                            msg_id,
                            reason,
                        },
                    ..
                } => {
                    // A failed attempt: the backoff keeps growing while the upstream does not
                    // take the row.
                    let times = match last_refused {
                        Some((r, n)) if r == row => n + 1,
                        _ => 1,
                    };
                    if times >= self.config.max_refusals {
                        self.reject(row, &msg_id, reason).await;
                        last_refused = None;
                    } else if times == 1 {
                        warn!(link = %name, upstream = %address, %msg_id, %reason, "upstream refused an output; it stays queued and is retried with backoff");
                        last_refused = Some((row, times));
                    } else {
                        debug!(link = %name, upstream = %address, %msg_id, %reason, times, "upstream refused the output again");
                        last_refused = Some((row, times));
                    }
                    failed_attempts += 1;
                }
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            let delay = backoff.mul_f64(jitter);
            backoff = (backoff * 2).min(max);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
        drop(delete_tx);
        let _ = deleter.await;
        info!(link = %name, "uplink stopped");
    }

    /// One connection: waits for CONNACK, then keeps the inflight window full from the outbox
    /// and hands every acknowledged row to the deleter. The first `careful` rows are sent one at
    /// a time (each one only after the previous one was accepted).
    async fn session(
        &self,
        address: &BrokerAddress,
        delete_tx: &mpsc::UnboundedSender<DeleteRequest>,
        shutdown: &mut watch::Receiver<bool>,
        careful: usize,
    ) -> SessionEnd {
        let name = &self.config.name;
        let window = usize::from(self.config.inflight);
        let carried = crate::locator::LinkRegions::from_list(&self.config.regions);
        let max_incoming = self.control.as_ref().map_or(MAX_INCOMING_PACKET, |c| {
            c.max_packet.max(MAX_INCOMING_PACKET)
        });
        let (client, mut events, _driver) =
            UpstreamClient::connect(&self.config, self.client_id(), address, max_incoming);

        // Wait for CONNACK.
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(LinkEvent::ConnAck(Ok(()))) => break,
                    Some(LinkEvent::ConnAck(Err(reason)) | LinkEvent::Error(reason)) => {
                        return SessionEnd::Lost { progress: Progress::NotConnected, reason, unanswered: 0 };
                    }
                    Some(_) => continue,
                    None => return SessionEnd::Lost { progress: Progress::NotConnected, reason: "event loop ended".into(), unanswered: 0 },
                },
                _ = shutdown.changed() => return SessionEnd::Shutdown,
            }
        }
        if careful > 0 {
            // Retrying rows the last connection ended over; that was logged already.
            debug!(link = %name, protocol = ?self.config.protocol, "upstream connected");
        } else {
            info!(link = %name, protocol = ?self.config.protocol, "upstream connected");
        }
        self.metrics.set_link_connected(name, true);
        if let Some(control) = &self.control {
            if let Err(e) = client.try_subscribe(&control.filters) {
                return lost(
                    None,
                    0,
                    0,
                    format!("cannot subscribe to control topics: {e}"),
                );
            }
            debug!(link = %name, filters = ?control.filters, "subscribed to control topics");
        }

        // Outbox rows (id, message id) sent in this session but whose packet id is not known
        // yet, in send order (rumqttc reports `Outgoing::Publish(pkid)` in the order publishes
        // were requested).
        let mut unassigned: VecDeque<(i64, String)> = VecDeque::new();
        let mut by_pkid: HashMap<u16, (i64, String)> = HashMap::new();
        let mut in_flight = 0usize;
        // Rows the upstream accepted in this session.
        let mut delivered = 0usize;
        let mut outbox_drained = false;
        // Set once the upstream refused a row: nothing more is sent, and the session ends when
        // the rest of the window has been acknowledged.
        let mut refused: Option<Refusal> = None;
        // Rows read from the outbox but not sent yet, and the last id read.
        let mut buffer: VecDeque<OutboxRow> = VecDeque::new();
        let mut last_read: i64 = 0;
        let read_batch = window.max(READ_BATCH_MIN);
        loop {
            // Fill the window from the outbox, reading it in batches.
            let limit = if delivered < careful { 1 } else { window };
            let mut expired: Vec<i64> = Vec::new();
            let mut misrouted: Vec<i64> = Vec::new();
            let now = crate::event::now_ms();
            while refused.is_none() && in_flight < limit {
                let Some(row) = buffer.pop_front() else {
                    if outbox_drained {
                        break;
                    }
                    match self.read_outbox(last_read, read_batch).await {
                        Some(rows) => {
                            // A batch cut short by its byte budget is not the end of the outbox.
                            let bytes: usize = rows.iter().map(|r| r.payload.len()).sum();
                            outbox_drained = rows.len() < read_batch && bytes < READ_BATCH_BYTES;
                            if let Some(last) = rows.last() {
                                last_read = last.id;
                            }
                            buffer.extend(rows);
                            continue;
                        }
                        None => break,
                    }
                };
                if row.is_expired(now) {
                    // Never sent: it becomes a dead letter below.
                    expired.push(row.id);
                    continue;
                }
                if !carried.allows(crate::event::split_tags(&row.regions)) {
                    // Residency: the pipeline queues rows only for links that may carry
                    // them, but the configuration may have changed since (a restart with a
                    // link's regions narrowed). Never sent: a dead letter below.
                    misrouted.push(row.id);
                    continue;
                }
                let (id, msg_id) = (row.id, row.msg_id.clone());
                if row.topic.contains(['+', '#']) {
                    // The router never queues such a topic; should one be there anyway, it
                    // is handled like a refused row: not sent, and not dropped.
                    refused = Some(Refusal {
                        row: id,
                        msg_id,
                        reason: format!("not a valid topic name: {:?}", row.topic),
                    });
                    break;
                }
                if let Err(reason) = client.try_publish(row) {
                    // The request channel is sized above the window, so this means the
                    // event loop is gone; the session is over.
                    return lost(refused.take(), in_flight, delivered, reason);
                }
                unassigned.push_back((id, msg_id));
                in_flight += 1;
            }
            if !expired.is_empty() {
                self.expire(expired).await;
            }
            if !misrouted.is_empty() {
                self.refuse(misrouted).await;
            }
            if in_flight == 0 {
                if let Some(refusal) = refused.take() {
                    return SessionEnd::Refused {
                        refusal,
                        unanswered: 0,
                    };
                }
            }

            tokio::select! {
                event = events.recv() => match event {
                    Some(LinkEvent::Published(pkid)) => {
                        if let Some(row) = unassigned.pop_front() {
                            by_pkid.insert(pkid, row);
                        }
                    }
                    Some(LinkEvent::PubAck { pkid, refusal }) => {
                        if let Some((id, msg_id)) = by_pkid.remove(&pkid) {
                            in_flight -= 1;
                            match refusal {
                                // Not delivered: the row stays queued.
                                Some(reason) => {
                                    if refused.as_ref().is_none_or(|r| id < r.row) {
                                        refused = Some(Refusal { row: id, msg_id, reason });
                                    }
                                }
                                None => {
                                    delivered += 1;
                                    if delete_tx.send(DeleteRequest::Rows(vec![id])).is_err() {
                                        return SessionEnd::Shutdown;
                                    }
                                }
                            }
                            if in_flight == 0 {
                                if let Some(refusal) = refused.take() {
                                    // Start again from the refused row, after a backoff.
                                    client.try_disconnect();
                                    return SessionEnd::Refused { refusal, unanswered: 0 };
                                }
                            }
                        }
                    }
                    Some(LinkEvent::Disconnect) => {
                        return lost(refused.take(), in_flight, delivered, "upstream sent DISCONNECT".into());
                    }
                    Some(LinkEvent::Incoming { topic, payload }) => self.forward(&client, topic, payload),
                    Some(LinkEvent::ConnAck(_) | LinkEvent::Other) => {}
                    Some(LinkEvent::Error(reason)) => return lost(refused.take(), in_flight, delivered, reason),
                    None => return lost(refused.take(), in_flight, delivered, "event loop ended".into()),
                },
                _ = self.wake.notified() => outbox_drained = false,
                _ = shutdown.changed() => {
                    client.try_disconnect();
                    return SessionEnd::Shutdown;
                }
            }
        }
    }
}

impl Uplink {
    /// Up to `limit` of this link's rows after `after`; `None` (logged, after a pause) when the
    /// outbox cannot be read.
    async fn read_outbox(&self, after: i64, limit: usize) -> Option<Vec<OutboxRow>> {
        let store = self.store.clone();
        let link = self.config.name.clone();
        let read = move || store.outbox_batch(&link, after, limit, READ_BATCH_BYTES);
        match tokio::task::spawn_blocking(read).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(e)) => {
                warn!(link = %self.config.name, error = %e, "cannot read the outbox; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
            Err(e) => {
                warn!(link = %self.config.name, error = %e, "outbox reader task failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        }
    }

    /// Moves rows whose time to live passed to the dead letters (`expired`). On failure they
    /// stay queued and are looked at again on the next connection.
    async fn expire(&self, ids: Vec<i64>) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.expire_outbox(&ids)).await {
            Ok(Ok(moved)) => {
                Metrics::add(&self.metrics.expired, moved.rows);
                Metrics::add(
                    &self.metrics.dead_letters_evicted,
                    moved.evicted_dead_letters,
                );
                warn!(link = %self.config.name, rows = moved.rows,
                    "outputs expired before delivery; moved to the dead letters");
            }
            Ok(Err(e)) => {
                Metrics::add(&self.metrics.store_errors, 1);
                warn!(link = %self.config.name, error = %e, "cannot dead-letter expired outputs");
            }
            Err(e) => warn!(link = %self.config.name, error = %e, "expiry task failed"),
        }
    }

    /// Moves rows this link may not carry (their region tags) to the dead letters
    /// (`residency`).
    async fn refuse(&self, ids: Vec<i64>) {
        let store = self.store.clone();
        let detail = format!(
            "upstream {:?} may not carry the row's regions (its regions: {:?})",
            self.config.name, self.config.regions
        );
        match tokio::task::spawn_blocking(move || store.refuse_outbox(&ids, &detail)).await {
            Ok(Ok(moved)) => {
                Metrics::add(&self.metrics.residency_refusals, moved.rows);
                Metrics::add(
                    &self.metrics.dead_letters_evicted,
                    moved.evicted_dead_letters,
                );
                warn!(link = %self.config.name, rows = moved.rows,
                    "queued outputs this link may not carry (residency); moved to the dead letters");
            }
            Ok(Err(e)) => {
                Metrics::add(&self.metrics.store_errors, 1);
                warn!(link = %self.config.name, error = %e, "cannot dead-letter misrouted outputs");
            }
            Err(e) => warn!(link = %self.config.name, error = %e, "residency task failed"),
        }
    }

    /// Moves a row the upstream refused `max_refusals` times to the dead letters (`rejected`).
    async fn reject(&self, row: i64, msg_id: &str, reason: String) {
        let store = self.store.clone();
        let detail = format!("refused by the upstream: {reason}");
        match tokio::task::spawn_blocking(move || store.reject_outbox(row, &detail)).await {
            Ok(Ok(moved)) => {
                Metrics::add(&self.metrics.rejected, moved.rows);
                Metrics::add(
                    &self.metrics.dead_letters_evicted,
                    moved.evicted_dead_letters,
                );
                warn!(link = %self.config.name, %msg_id, %reason, refusals = self.config.max_refusals,
                    "upstream keeps refusing an output; moved to the dead letters (rejected)");
            }
            Ok(Err(e)) => {
                Metrics::add(&self.metrics.store_errors, 1);
                warn!(link = %self.config.name, error = %e, "cannot dead-letter a refused output");
            }
            Err(e) => warn!(link = %self.config.name, error = %e, "rejection task failed"),
        }
    }
}

/// A connection that had been established was lost. A refusal seen before is the better
/// explanation (brokers may close the connection after refusing a publish).
fn lost(
    refused: Option<Refusal>,
    in_flight: usize,
    delivered: usize,
    reason: String,
) -> SessionEnd {
    if let Some(refusal) = refused {
        return SessionEnd::Refused {
            refusal,
            unanswered: in_flight,
        };
    }
    let progress = if in_flight > 0 && delivered == 0 {
        Progress::Stalled
    } else {
        Progress::Working
    };
    SessionEnd::Lost {
        progress,
        reason,
        unanswered: in_flight,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes acknowledged rows in batches (one transaction for everything that arrived since the
/// last one), so that a fast upstream does not cost one disk sync per message.
async fn delete_acknowledged(
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    mut requests: mpsc::UnboundedReceiver<DeleteRequest>,
) {
    let mut buffer = Vec::new();
    while requests.recv_many(&mut buffer, 4096).await > 0 {
        let mut ids = Vec::new();
        let mut waiters = Vec::new();
        for request in buffer.drain(..) {
            match request {
                DeleteRequest::Rows(rows) => ids.extend(rows),
                DeleteRequest::Flush(done) => waiters.push(done),
            }
        }
        let mut attempt = 0u32;
        while !ids.is_empty() {
            let store = store.clone();
            let batch = ids.clone();
            match tokio::task::spawn_blocking(move || store.delete_outbox(&batch)).await {
                Ok(Ok(())) => {
                    Metrics::add(&metrics.delivered, ids.len() as u64);
                    break;
                }
                result => {
                    // The rows stay queued and would be sent again; keep trying to delete them.
                    attempt += 1;
                    let reason = match result {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(())) => String::new(),
                    };
                    warn!(%reason, attempt, "cannot delete delivered rows; retrying");
                    Metrics::add(&metrics.store_errors, 1);
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))))
                        .await;
                }
            }
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(payload: &[u8]) -> OutboxRow {
        OutboxRow {
            id: 7,
            msg_id: "gw-1-7-telemetry".to_string(),
            topic: "telemetry/dev \"1\"/env".to_string(),
            payload: payload.to_vec(),
            expires_ms: 0,
            regions: String::new(),
        }
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input), expected);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64(&[0x00, 0x10, 0x83]), "ABCD");
    }

    #[test]
    fn envelope_embeds_json_payload_verbatim() {
        let payload = br#"{"seq": 1, "big": 123456789012345678901234, "x": 1.50}"#;
        let bytes = envelope_payload(&row(payload));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.ends_with(&format!(
            ",\"payload\":{}}}",
            std::str::from_utf8(payload).unwrap()
        )));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["id"], "gw-1-7-telemetry");
        assert_eq!(value["topic"], "telemetry/dev \"1\"/env");
        assert_eq!(value["payload"]["seq"], 1);
        assert!(value.get("payload_base64").is_none());
    }

    #[test]
    fn envelope_falls_back_to_base64_for_anything_but_one_json_value() {
        let cases: [&[u8]; 6] = [
            b"",
            b"not json",
            b"{\"a\":1} {\"b\":2}",
            &[0xff, 0x00, 0x7b, 0x7d],
            b"\"\\ud800\"",
            b"{\"a\":",
        ];
        for payload in cases {
            let value: serde_json::Value =
                serde_json::from_slice(&envelope_payload(&row(payload))).unwrap();
            assert_eq!(value["payload_base64"], base64(payload), "{payload:?}");
            assert!(value.get("payload").is_none());
        }
    }

    #[test]
    fn json_scalars_are_payloads_too() {
        for payload in ["42", "\"text\"", "null", " [1, 2] \n"] {
            let value: serde_json::Value =
                serde_json::from_slice(&envelope_payload(&row(payload.as_bytes()))).unwrap();
            assert_eq!(
                value["payload"],
                serde_json::from_str::<serde_json::Value>(payload).unwrap()
            );
        }
    }

    #[test]
    fn mqtt5_refusals_are_not_acknowledgements() {
        use rumqttc::v5::mqttbytes::v5::PubAck;
        let ack = |reason| {
            LinkEvent::from_v5(Ok(rumqttc::v5::Event::Incoming(PacketV5::PubAck(PubAck {
                pkid: 3,
                reason,
                properties: None,
            }))))
        };
        for ok in [PubAckReason::Success, PubAckReason::NoMatchingSubscribers] {
            assert_eq!(
                ack(ok),
                LinkEvent::PubAck {
                    pkid: 3,
                    refusal: None
                }
            );
        }
        for refused in [PubAckReason::QuotaExceeded, PubAckReason::NotAuthorized] {
            assert!(matches!(
                ack(refused),
                LinkEvent::PubAck {
                    pkid: 3,
                    refusal: Some(_)
                }
            ));
        }
    }
}
