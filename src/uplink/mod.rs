//! One connection per upstream broker, draining that link's outbox rows in order.
//!
//! Guarantees:
//! - Rows are published with QoS 1 in outbox order, with up to `inflight` rows and
//!   `inflight_bytes` bytes awaiting PUBACK (fewer rows when an MQTT 5 upstream's Receive
//!   Maximum says so; one row however large when nothing else is in flight). A large window is
//!   refilled in batches of an eighth of it ([`window`]).
//! - A row is deleted from the outbox only after the upstream's PUBACK for it arrived (and, on
//!   MQTT 5, only when that PUBACK's reason code is a success: `0x00`, or `0x10` "no matching
//!   subscribers").
//! - When the connection drops, everything not yet acknowledged is sent again on the next
//!   connection, starting from the oldest row still queued: every connection is a fresh,
//!   clean session, because the outbox is the source of truth. A row acknowledged by the
//!   upstream whose PUBACK was lost with the connection is therefore sent twice
//!   (at-least-once).
//! - Every publish carries the row's stable message id (`<gateway_id>-...`, the same each time
//!   the row is sent, and each time its event is processed), so that the upstream can drop
//!   duplicates:
//!   - `protocol = "5"`: as the MQTT 5 user property `outpost-msg-id`; payload unchanged.
//!   - `protocol = "3.1.1"`, `envelope = true`: in a JSON envelope ([`envelope`]).
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
//! - A connection that fails is one log line naming the link and the cause ([`LinkFailure`]:
//!   an unknown CA, an expired certificate, bad credentials, ...), counted per cause in the
//!   metrics with the link's last error; an outage costs one warning for its whole length, a
//!   TLS or credential failure one warning each time its cause changes. The rows wait.
//! - When the link's credential files change ([`reload`]: `SIGHUP`, or a change seen on disk),
//!   the connection stops sending, waits (at most one keep-alive) for the PUBACKs of what is in
//!   flight, disconnects cleanly and connects again with the new files at once, so a rotation
//!   neither loses nor duplicates rows (beyond the PUBACKs still missing after that wait). A
//!   failing link tries the new files at once instead of finishing its backoff.
//!
//! The connection itself (TCP or TLS, the MQTT packets of 3.1.1 and 5, keep-alive) is
//! [`client`]'s; what it proves itself with is [`credentials`]'.
//!
//! This module does not decide what goes into the outbox, and never re-routes a row to another
//! link.

pub mod client;
pub mod credentials;
pub(crate) mod envelope;
pub(crate) mod reload;
pub(crate) mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use client::{Client, ConnectSettings, Connection, LinkEvent};
pub use client::{ConnectRefusal, LinkFailure, TlsFailure};
use credentials::Credentials;
use window::Window;

use crate::config::{parse_broker_url, BrokerAddress, MqttVersion, UpstreamConfig};
use crate::control::modules::{RemoteRequest, UpstreamReply};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{Delivered, OutboxRow, Store};

/// The MQTT 5 user property that carries an output's stable message id.
pub const MSG_ID_PROPERTY: &str = "outpost-msg-id";

/// Fewest outbox rows read at once (more when the inflight window is larger).
const READ_BATCH_MIN: usize = 256;

/// Payload bytes after which an outbox read stops early (it reads at least one row), so that
/// a batch of large rows does not take much memory on a small board.
const READ_BATCH_BYTES: usize = 1024 * 1024;

/// Incoming packets from an upstream without control subscriptions are acknowledgements
/// only; this is plenty.
const MAX_INCOMING_PACKET: usize = 64 * 1024;

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
    /// The link's current credentials (TLS, user name and password); a new value means the
    /// files were rotated ([`reload::watch`]).
    pub credentials: watch::Receiver<Arc<Credentials>>,
    /// An in-process connection instead of the URL's address (the local link to the
    /// gateway's own broker).
    pub dial: Option<client::Dialer>,
}

/// How a connection ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection failed or dropped.
    Lost {
        /// How far it got.
        progress: Progress,
        /// What happened.
        failure: LinkFailure,
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
    /// The credentials changed: the connection was drained and closed; connect again now.
    Rotated {
        /// Rows still unanswered when the drain gave up (they are sent again).
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
    /// An outbox row the upstream acknowledged.
    Row(Delivered),
    /// Delete everything requested so far, then answer.
    Flush(oneshot::Sender<()>),
}

/// Rows the deleting task gathers before it deletes (unless a flush is asked for)...
const DELETE_BATCH: usize = 1024;
/// ...waiting at most this long for them: one transaction then deletes hundreds of rows
/// rather than a few (each transaction rewrites the pages it touches), and a delivered row
/// waits for its delete a few milliseconds longer (a crash then can only send it again).
const DELETE_LINGER: Duration = Duration::from_millis(10);

/// Queues `row` as a QoS 1 publish on `client`, carrying its message id as the protocol
/// allows; returns its packet id. Fails only when the connection is gone.
fn publish_row(
    client: &Client,
    protocol: MqttVersion,
    use_envelope: bool,
    row: OutboxRow,
) -> Result<u16, String> {
    match protocol {
        MqttVersion::V311 => {
            let payload = if use_envelope {
                envelope::envelope_payload(&row)
            } else {
                row.payload
            };
            client.try_publish(row.topic, payload, true, None)
        }
        MqttVersion::V5 => client.try_publish(row.topic, row.payload, true, Some(row.msg_id)),
    }
}

impl Uplink {
    /// Hands a publish from a control subscription to the module control plane.
    fn forward(&self, client: &Client, topic: String, payload: Vec<u8>) {
        let Some(control) = &self.control else {
            return;
        };
        let client = client.clone();
        let reply = UpstreamReply::new(move |topic, payload| {
            client
                .try_publish(topic.to_string(), payload, false, None)
                .map(|_| ())
        });
        let request = RemoteRequest {
            link: self.config.name.clone(),
            topic,
            payload,
            reply,
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

    /// Runs until `shutdown`. Never returns an error: every failure is logged, counted and
    /// retried after a backoff.
    pub async fn run(self, mut shutdown: Shutdown) {
        let name = self.config.name.clone();
        let address = match parse_broker_url(&self.config.url) {
            Ok(a) => a,
            Err(e) => {
                // Config validation rejects this earlier; keep the task harmless anyway.
                warn!(link = %name, error = %e, "invalid upstream URL; link disabled");
                return;
            }
        };
        let mut credentials = self.credentials.clone();
        credentials.mark_unchanged();
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
        // The cause last logged as a warning: a TLS or credential failure is a warning again
        // when its cause changes (say, from an unknown CA to a refused client certificate).
        let mut last_warned: Option<String> = None;
        // The last row the upstream refused and how many times in a row: a refusal is a
        // warning once per row, and a row refused `max_refusals` times is dead-lettered.
        let mut last_refused: Option<(i64, u32)> = None;
        // When the last connection ended over a row (refused, or closed before anything was
        // accepted), the next one sends the rows that went unanswered one at a time, so that a
        // row the upstream will not take does not drag the rows behind it along every time.
        let mut careful = 0usize;
        loop {
            if shutdown.is_shutdown() {
                break;
            }
            let end = self
                .session(
                    &address,
                    &delete_tx,
                    &mut shutdown,
                    &mut credentials,
                    careful,
                )
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
                SessionEnd::Rotated { unanswered } => {
                    info!(link = %name, upstream = %address, unanswered, "reconnecting with the new credential files");
                    backoff = min;
                    failed_attempts = 0;
                    last_warned = None;
                    continue;
                }
                SessionEnd::Lost {
                    progress, failure, ..
                } => {
                    let reason = failure.to_string();
                    self.metrics
                        .record_link_failure(&name, failure.cause(), &reason);
                    let first = failed_attempts == 0
                        || (failure.is_configuration()
                            && last_warned.as_deref() != Some(reason.as_str()));
                    if progress == Progress::Working {
                        warn!(link = %name, upstream = %address, %reason, "upstream connection lost; outputs wait in the outbox");
                        backoff = min;
                        failed_attempts = 0;
                        last_warned = None;
                    } else if first {
                        if progress == Progress::Stalled {
                            warn!(link = %name, upstream = %address, %reason, "upstream closed the connection before acknowledging anything; outputs wait in the outbox, retrying with backoff");
                        } else {
                            warn!(link = %name, upstream = %address, cause = failure.cause(), %reason, "cannot connect to the upstream; outputs wait in the outbox, retrying with backoff");
                        }
                        last_warned = Some(reason);
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
                _ = shutdown.recv() => {}
                // New files: try them now rather than at the end of the backoff.
                changed = credentials.changed(), if credentials.has_changed().is_ok() => {
                    if changed.is_ok() {
                        backoff = min;
                    }
                }
            }
        }
        drop(delete_tx);
        let _ = deleter.await;
        info!(link = %name, "uplink stopped");
    }

    /// The connection settings for the current credentials.
    fn settings(
        &self,
        address: &BrokerAddress,
        credentials: &Credentials,
        max_incoming: usize,
    ) -> ConnectSettings {
        let window = usize::from(self.config.inflight);
        ConnectSettings {
            host: address.host.clone(),
            port: address.port,
            tls: credentials.tls.clone(),
            protocol: self.config.protocol,
            client_id: self.client_id(),
            // Validation keeps this in 5..=65535.
            keep_alive: Duration::from_secs(self.config.keep_alive_secs.clamp(5, 65_535)),
            login: credentials.login.clone(),
            max_incoming,
            connect_timeout: Duration::from_secs(self.config.connect_timeout_secs.max(1)),
            capacity: window + 16,
            dial: self.dial.clone(),
        }
    }

    /// One connection: waits for CONNACK, then keeps the inflight window filled from the
    /// outbox and hands every acknowledged row to the deleter. The first `careful` rows are sent one at
    /// a time (each one only after the previous one was accepted).
    async fn session(
        &self,
        address: &BrokerAddress,
        delete_tx: &mpsc::UnboundedSender<DeleteRequest>,
        shutdown: &mut Shutdown,
        credentials: &mut watch::Receiver<Arc<Credentials>>,
        careful: usize,
    ) -> SessionEnd {
        let name = &self.config.name;
        let carried = crate::geo::residency::LinkRegions::from_list(&self.config.regions);
        let max_incoming = self.control.as_ref().map_or(MAX_INCOMING_PACKET, |c| {
            c.max_packet.max(MAX_INCOMING_PACKET)
        });
        let current = credentials.borrow_and_update().clone();
        let settings = self.settings(address, &current, max_incoming);
        let keep_alive = settings.keep_alive;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (client, mut connection) = client::connect(settings, events_tx);
        // Whether the connection's future has completed (its last event is then queued).
        let mut ended = false;

        // Wait for CONNACK.
        let limits = loop {
            tokio::select! {
                _ = &mut connection, if !ended => ended = true,
                event = events.recv() => match event {
                    Some(LinkEvent::Connected(limits)) => break limits,
                    Some(LinkEvent::Failed(failure)) => {
                        return SessionEnd::Lost { progress: Progress::NotConnected, failure, unanswered: 0 };
                    }
                    Some(_) => continue,
                    None => return SessionEnd::Lost { progress: Progress::NotConnected, failure: LinkFailure::Io("the connection task ended".into()), unanswered: 0 },
                },
                _ = shutdown.recv() => return SessionEnd::Shutdown,
                // Files rotated while connecting: start over with them.
                changed = credentials.changed(), if credentials.has_changed().is_ok() => {
                    if changed.is_ok() {
                        return SessionEnd::Rotated { unanswered: 0 };
                    }
                }
            }
        };
        let max_rows = usize::from(self.config.inflight).min(usize::from(limits.receive_maximum));
        let mut window = Window::new(max_rows, self.config.inflight_bytes);
        if careful > 0 {
            // Retrying rows the last connection ended over; that was logged already.
            debug!(link = %name, protocol = ?self.config.protocol, "upstream connected");
        } else {
            info!(link = %name, protocol = ?self.config.protocol, tls = current.tls.is_some(), "upstream connected");
        }
        self.metrics.set_link_connected(name, true);
        if let Some(control) = &self.control {
            if let Err(e) = client.try_subscribe(control.filters.clone()) {
                return lost(
                    None,
                    0,
                    0,
                    LinkFailure::Io(format!("cannot subscribe to control topics: {e}")),
                );
            }
            debug!(link = %name, filters = ?control.filters, "subscribed to control topics");
        }

        // Outbox rows sent in this session and not acknowledged, by packet id.
        let mut by_pkid: HashMap<u16, InFlight> = HashMap::new();
        // Rows the upstream accepted in this session.
        let mut delivered = 0usize;
        let mut outbox_drained = false;
        // Set once the upstream refused a row: nothing more is sent, and the session ends when
        // the rest of the window has been acknowledged.
        let mut refused: Option<Refusal> = None;
        // Set once the credentials changed: nothing more is sent, and the session ends when the
        // window is empty, or at this deadline.
        let mut rotating: Option<tokio::time::Instant> = None;
        // Rows read from the outbox but not sent yet, and the last id read.
        let mut buffer: VecDeque<OutboxRow> = VecDeque::new();
        let mut last_read: i64 = 0;
        let read_batch = max_rows.max(READ_BATCH_MIN);
        loop {
            // Fill the window from the outbox, reading it in batches. While the first
            // `careful` rows are not accepted, one at a time.
            let one_at_a_time = delivered < careful;
            let mut expired: Vec<i64> = Vec::new();
            let mut misrouted: Vec<i64> = Vec::new();
            let now = crate::event::now_ms();
            let mut filling = refused.is_none() && rotating.is_none() && window.wants_refill();
            while filling && !(one_at_a_time && window.rows() > 0) {
                let Some(row) = buffer.pop_front() else {
                    if outbox_drained {
                        break;
                    }
                    match alongside(
                        &mut connection,
                        &mut ended,
                        self.read_outbox(last_read, read_batch),
                    )
                    .await
                    {
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
                let size = row.payload.len().saturating_add(row.topic.len());
                if !window.admits(size) {
                    // Full in bytes: it goes first next time.
                    buffer.push_front(row);
                    filling = false;
                    continue;
                }
                let (id, msg_id, sent) = (row.id, row.msg_id.clone(), row.delivered());
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
                match publish_row(&client, self.config.protocol, self.config.envelope, row) {
                    Ok(pkid) => {
                        by_pkid.insert(
                            pkid,
                            InFlight {
                                row: sent,
                                msg_id,
                                size,
                            },
                        );
                    }
                    Err(reason) => {
                        // The request channel is sized above the window, so this means the
                        // connection is gone; the session is over.
                        return lost(
                            refused.take(),
                            window.rows(),
                            delivered,
                            LinkFailure::Io(reason),
                        );
                    }
                }
                window.sent(size);
            }
            if !expired.is_empty() {
                alongside(&mut connection, &mut ended, self.expire(expired)).await;
            }
            if !misrouted.is_empty() {
                alongside(&mut connection, &mut ended, self.refuse(misrouted)).await;
            }
            if window.rows() == 0 {
                if let Some(refusal) = refused.take() {
                    return SessionEnd::Refused {
                        refusal,
                        unanswered: 0,
                    };
                }
                if rotating.is_some() {
                    disconnect(&client, &mut connection, ended).await;
                    return SessionEnd::Rotated { unanswered: 0 };
                }
            }

            let drain_deadline = rotating.unwrap_or_else(tokio::time::Instant::now);
            // The connection's events, handled in a run: one wake-up takes every event that
            // is ready (acknowledgements come in bursts), so the window is refilled with many
            // rows at once and they go out in one write.
            let mut next: Option<Option<LinkEvent>> = None;
            tokio::select! {
                _ = &mut connection, if !ended => ended = true,
                event = events.recv() => next = Some(event),
                _ = self.wake.notified(), if rotating.is_none() => outbox_drained = false,
                changed = credentials.changed(), if rotating.is_none() && credentials.has_changed().is_ok() => {
                    if changed.is_ok() {
                        // Stop sending; reconnect once the window is acknowledged.
                        debug!(link = %name, in_flight = window.rows(), "credentials changed; draining the window before reconnecting");
                        rotating = Some(tokio::time::Instant::now() + keep_alive);
                    }
                }
                _ = tokio::time::sleep_until(drain_deadline), if rotating.is_some() => {
                    disconnect(&client, &mut connection, ended).await;
                    return SessionEnd::Rotated { unanswered: window.rows() };
                }
                _ = shutdown.recv() => {
                    disconnect(&client, &mut connection, ended).await;
                    return SessionEnd::Shutdown;
                }
            }
            while let Some(event) = next.take() {
                match event {
                    Some(LinkEvent::PubAck { pkid, refusal }) => {
                        if let Some(InFlight {
                            row: sent,
                            msg_id,
                            size,
                        }) = by_pkid.remove(&pkid)
                        {
                            let id = sent.id;
                            window.answered(size);
                            match refusal {
                                // Not delivered: the row stays queued.
                                Some(reason) => {
                                    if refused.as_ref().is_none_or(|r| id < r.row) {
                                        refused = Some(Refusal {
                                            row: id,
                                            msg_id,
                                            reason,
                                        });
                                    }
                                }
                                None => {
                                    delivered += 1;
                                    if delete_tx.send(DeleteRequest::Row(sent)).is_err() {
                                        return SessionEnd::Shutdown;
                                    }
                                }
                            }
                            if window.rows() == 0 {
                                if let Some(refusal) = refused.take() {
                                    // Start again from the refused row, after a backoff.
                                    disconnect(&client, &mut connection, ended).await;
                                    return SessionEnd::Refused {
                                        refusal,
                                        unanswered: 0,
                                    };
                                }
                            }
                        }
                    }
                    Some(LinkEvent::Incoming { topic, payload }) => {
                        self.forward(&client, topic, payload)
                    }
                    Some(LinkEvent::Subscribed { refused: 0, .. }) => {}
                    Some(LinkEvent::Subscribed { refused: n, .. }) => {
                        // Module deploys through this upstream will not arrive; data still flows.
                        warn!(link = %name, refused = n, "the upstream refused control subscriptions (module requests through it will not arrive)");
                    }
                    Some(LinkEvent::Connected(_)) => {}
                    Some(LinkEvent::Failed(failure)) => {
                        return lost(refused.take(), window.rows(), delivered, failure)
                    }
                    None => {
                        return lost(
                            refused.take(),
                            window.rows(),
                            delivered,
                            LinkFailure::Io("the connection task ended".into()),
                        )
                    }
                }
                if let Ok(more) = events.try_recv() {
                    next = Some(Some(more));
                }
            }
        }
    }
}

/// A row sent on this connection and not answered yet.
struct InFlight {
    /// The row, to delete once acknowledged.
    row: Delivered,
    /// Its message id, for the log should the upstream refuse it.
    msg_id: String,
    /// What it counts for in the window's bytes.
    size: usize,
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

/// Awaits `work` while the connection keeps moving (it is polled in this task only).
async fn alongside<T>(
    connection: &mut Connection,
    ended: &mut bool,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = &mut *connection, if !*ended => *ended = true,
        }
    }
}

/// Asks for a clean DISCONNECT and gives the connection a moment to send it.
async fn disconnect(client: &Client, connection: &mut Connection, ended: bool) {
    client.try_disconnect();
    if !ended {
        let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
    }
}

/// A connection that had been established was lost. A refusal seen before is the better
/// explanation (brokers may close the connection after refusing a publish).
fn lost(
    refused: Option<Refusal>,
    in_flight: usize,
    delivered: usize,
    failure: LinkFailure,
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
        failure,
        unanswered: in_flight,
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
        let deadline = tokio::time::Instant::now() + DELETE_LINGER;
        while buffer.len() < DELETE_BATCH
            && !buffer.iter().any(|r| matches!(r, DeleteRequest::Flush(_)))
        {
            match tokio::time::timeout_at(deadline, requests.recv_many(&mut buffer, 4096)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let mut ids = Vec::new();
        let mut waiters = Vec::new();
        for request in buffer.drain(..) {
            match request {
                DeleteRequest::Row(row) => ids.push(row),
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
