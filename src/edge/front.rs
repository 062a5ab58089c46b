//! The connection front: outpost's listener for devices, standing between each device and the
//! embedded broker (rumqttd), so that a publish is acknowledged only once it is durable.
//!
//! For every device connection the front opens a connection to the broker's internal listener
//! and relays packets both ways unchanged, except:
//! - each PUBLISH from the device is appended to the [`Journal`]; the broker's PUBACK (QoS 1)
//!   or PUBREC (QoS 2) for it is held back until the journal commit that contains the publish
//!   has returned, then passed on. A device therefore never holds an acknowledgement for a
//!   publish that a crash or power cut could lose.
//! - a CONNECT with keep-alive 0 (MQTT 3.1.1 §3.1.2.10: keep-alive off), which rumqttd 0.20
//!   refuses, is passed on with a keep-alive the front then keeps alive itself: it sends the
//!   broker a PINGREQ every half interval and swallows the matching PINGRESPs.
//! - MQTT 5 topic aliases are resolved for the journal (the broker still sees the alias).
//! - the front's own rules ([`super::checks`]) come first: a packet type a client may not send,
//!   invalid fixed-header flags, a publish topic with wildcards, an invalid topic filter or a
//!   topic alias out of range closes the connection (on MQTT 5 after a DISCONNECT with the
//!   reason code); a CONNECT with one of the gateway's reserved client ids is refused with a
//!   CONNACK (0x02 on 3.1.1, 0x85 on 5); a connection over `broker.max_connections` is refused
//!   with a CONNACK (0x03 on 3.1.1, 0x97 on 5). Mosquitto 2 closes the connection in the same
//!   cases.
//!
//! This is the one place where every packet of every device passes: per-packet decisions
//! (authorization, per-client limits) belong in [`Session::inspect`].
//!
//! Guarantees: a malformed, oversized or forbidden packet closes that connection (logged and
//! counted) and affects nothing else; no input panics; a connection goes to the broker side
//! of its CONNECT's protocol version, and one that sends no CONNECT within the connect
//! timeout is closed; the broker behind the front never holds more device connections than
//! `broker.max_connections`, and never sees a connection close before its CONNACK is sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::checks::{self, reason, return_code};
use super::connect;
use super::frame::{self, kind, Frame, FrameError, Version};
use crate::journal::{Committed, Journal};
use crate::metrics::Metrics;
use crate::store::NewJournalEntry;

/// The keep-alive the front asks the broker for on behalf of a device that turned keep-alive
/// off; the front pings the broker every half of it.
const STAND_IN_KEEP_ALIVE: u16 = 60;

/// Bytes of MQTT framing allowed on top of the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// The Topic Alias Maximum the embedded broker announces to MQTT 5 clients.
const TOPIC_ALIAS_MAX: u16 = 4096;

/// Most bytes of topics one connection may keep behind topic aliases (a hostile client could
/// otherwise park 4,096 topics of 64 KiB each).
const MAX_ALIAS_BYTES: usize = 1024 * 1024;

/// Connections over the limit that are answered at the same time; beyond that a refused
/// connection is closed without an answer.
pub const MAX_REFUSING: usize = 64;

/// How long the front waits, after a device's connection ended, for the broker to close its
/// side (the connection's slot is held until then, so the broker never counts more
/// connections than the front allows).
const BROKER_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The broker's internal listeners, one per protocol version.
#[derive(Clone, Copy, Debug)]
pub struct Brokers {
    /// Where MQTT 3.1 and 3.1.1 connections are relayed.
    pub v4: SocketAddr,
    /// Where MQTT 5 connections are relayed.
    pub v5: SocketAddr,
}

/// Everything every connection of the device listeners shares.
#[derive(Clone)]
pub struct Front {
    /// The broker's internal listeners: a connection goes to the one of its CONNECT's
    /// protocol level, so every device listener serves both versions.
    pub brokers: Brokers,
    /// Where publishes become durable.
    pub journal: Journal,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Largest accepted publish payload.
    pub max_payload: usize,
    /// One permit per device connection allowed (`broker.max_connections`), shared by every
    /// listener of the gateway.
    pub slots: Arc<Semaphore>,
    /// Permits for answering connections over the limit ([`MAX_REFUSING`]).
    pub refusing: Arc<Semaphore>,
    /// How long a connection may take to send its CONNECT (`broker.connect_timeout_ms`).
    pub connect_timeout: Duration,
}

/// How a device connection ended.
#[derive(Debug)]
enum End {
    /// The device broke a rule of the protocol or of the gateway: answered with `answer`
    /// (a CONNACK refusal, or on MQTT 5 a DISCONNECT with a reason code) and closed.
    Refused {
        answer: Option<Bytes>,
        reason: String,
    },
    /// Anything else: I/O, the broker, the journal.
    Closed(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Refused { reason, .. } => write!(f, "refused: {reason}"),
            End::Closed(reason) => f.write_str(reason),
        }
    }
}

/// A CONNACK refusing a connection with this code.
fn connack_refusal(version: Version, code: u8) -> Bytes {
    match version {
        Version::V4 => Bytes::from(vec![0x20, 0x02, 0x00, code]),
        Version::V5 => Bytes::from(vec![0x20, 0x03, 0x00, code, 0x00]),
    }
}

/// A refusal of a packet after CONNECT: on MQTT 5 a DISCONNECT with `code` (MQTT 5 §3.14),
/// on 3.1.1 (which has no server DISCONNECT) just the close.
fn close_with(version: Version, code: u8, reason: String) -> End {
    let answer = (version == Version::V5).then(|| Bytes::from(vec![0xE0, 0x02, code, 0x00]));
    End::Refused { answer, reason }
}

/// Rate-limits one warning: true for the 1st, 1,001st, 2,001st... call.
fn every_thousandth(counter: &AtomicU64) -> bool {
    counter.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000)
}

impl Front {
    /// Accepts device connections until the task running this is aborted, which also closes
    /// every connection it accepted.
    pub async fn serve(self, listener: TcpListener) {
        let mut connections = tokio::task::JoinSet::new();
        let refusals = AtomicU64::new(0);
        loop {
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((socket, peer)) => {
                    let front = self.clone();
                    match self.slots.clone().try_acquire_owned() {
                        Ok(slot) => {
                            connections.spawn(async move {
                                if let Err(end) = front.connection(socket, slot).await {
                                    debug!(%peer, %end, "device connection closed");
                                }
                            });
                        }
                        Err(_) => {
                            Metrics::add(&self.metrics.edge_connections_refused, 1);
                            if every_thousandth(&refusals) {
                                warn!(%peer, limit = "broker.max_connections",
                                    "connection limit reached: refusing device connections");
                            }
                            if let Ok(permit) = self.refusing.clone().try_acquire_owned() {
                                connections.spawn(async move {
                                    front.refuse_busy(socket).await;
                                    drop(permit);
                                });
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a device connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Answers a connection over the limit: reads its CONNECT (within the connect timeout)
    /// and refuses it with "server unavailable" (3.1.1) or "quota exceeded" (5).
    async fn refuse_busy(self, mut device: TcpStream) {
        let mut input = BytesMut::with_capacity(1024);
        let answered = tokio::time::timeout(self.connect_timeout, async {
            loop {
                match frame::next_frame(&input, self.max_payload + PACKET_OVERHEAD) {
                    Ok(Some(frame)) => {
                        let version = connect::parse_connect(&frame, &input).ok()?.version;
                        let code = match version {
                            Version::V4 => return_code::SERVER_UNAVAILABLE,
                            Version::V5 => reason::QUOTA_EXCEEDED,
                        };
                        return Some(connack_refusal(version, code));
                    }
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match device.read_buf(&mut input).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if let Ok(Some(answer)) = answered {
            let _ = device.write_all(&answer).await;
        }
    }

    async fn connection(
        self,
        mut device: TcpStream,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), End> {
        let _ = device.set_nodelay(true);
        let mut session = Session {
            front: self.clone(),
            shared: Arc::new(Shared::default()),
            version: None,
            client_id: Arc::from(""),
            aliases: HashMap::new(),
            alias_bytes: 0,
            qos2_open: HashSet::new(),
            keep_alive_off: false,
        };
        let mut input = BytesMut::with_capacity(16 * 1024);
        let connect = tokio::time::timeout(
            self.connect_timeout,
            session.read_connect(&mut device, &mut input),
        )
        .await
        .unwrap_or_else(|_| {
            Err(End::Closed(
                "no CONNECT within broker.connect_timeout_ms".into(),
            ))
        });
        let (connect, version) = match connect {
            Ok(connect) => connect,
            Err(end) => {
                self.answer_refusal(&end, &mut device).await;
                return Err(end);
            }
        };
        let address = match version {
            Version::V4 => self.brokers.v4,
            Version::V5 => self.brokers.v5,
        };
        let mut broker = TcpStream::connect(address)
            .await
            .map_err(|e| End::Closed(format!("internal broker unreachable: {e}")))?;
        let _ = broker.set_nodelay(true);
        broker
            .write_all(&connect)
            .await
            .map_err(|e| End::Closed(format!("broker write: {e}")))?;
        let (device_rx, mut device_tx) = device.into_split();
        let (mut broker_rx, broker_tx) = broker.into_split();
        let shared = session.shared.clone();
        let result = tokio::select! {
            r = session.relay_device_packets(device_rx, broker_tx, input) => r,
            r = relay_broker_packets(shared, &mut broker_rx, &mut device_tx) => r,
        };
        if let Err(end) = &result {
            self.answer_refusal(end, &mut device_tx).await;
        }
        drop(device_tx);
        // The write half to the broker is closed (dropped with the relay); wait until the
        // broker has let go of the connection too before giving the slot back. rumqttd
        // panics, and wedges every later connection, when its router is full or when a
        // connection goes away while it is still sending the CONNACK: neither can happen
        // while the front holds fewer slots than the router and never closes first.
        let mut scratch = [0u8; 4096];
        let _ = tokio::time::timeout(BROKER_CLOSE_WAIT, async {
            while let Ok(n) = broker_rx.read(&mut scratch).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        drop(slot);
        result
    }

    /// Counts and logs a refused connection and sends the device its answer, if it has one.
    async fn answer_refusal<W: AsyncWriteExt + Unpin>(&self, end: &End, device: &mut W) {
        if let End::Refused { answer, reason } = end {
            Metrics::add(&self.metrics.edge_rejected, 1);
            warn!(%reason, "device connection refused");
            if let Some(answer) = answer {
                let _ = device.write_all(answer).await;
            }
        }
    }
}

/// State both directions of one connection see.
#[derive(Default)]
struct Shared {
    /// Commit signals of publishes whose acknowledgement is pending, by packet id.
    gates: Mutex<HashMap<u16, Committed>>,
    /// PINGRESPs to swallow (answers to the front's own PINGREQs).
    injected_pings: AtomicU32,
}

/// The device-to-broker direction of one connection.
struct Session {
    front: Front,
    shared: Arc<Shared>,
    version: Option<Version>,
    client_id: Arc<str>,
    aliases: HashMap<u16, String>,
    alias_bytes: usize,
    qos2_open: HashSet<u16>,
    keep_alive_off: bool,
}

impl Session {
    /// Reads the device's first packet, which must be an acceptable CONNECT, into `input`
    /// and returns it (as it is to be relayed) with its protocol version. Bytes after it stay
    /// in `input`.
    async fn read_connect(
        &mut self,
        device: &mut TcpStream,
        input: &mut BytesMut,
    ) -> Result<(Bytes, Version), End> {
        let max = self.front.max_payload + PACKET_OVERHEAD;
        loop {
            match frame::next_frame(input, max) {
                Ok(Some(frame)) => {
                    let packet = input.split_to(frame.len()).freeze();
                    let connect = self.connect(&frame, packet)?;
                    let version = self.version.unwrap_or(Version::V4);
                    return Ok((connect, version));
                }
                Ok(None) => {}
                Err(e) => return Err(self.refuse_frame(e)),
            }
            let n = device
                .read_buf(input)
                .await
                .map_err(|e| End::Closed(format!("device read: {e}")))?;
            if n == 0 {
                return Err(End::Closed("device closed before CONNECT".into()));
            }
        }
    }

    /// Reads the device's packets after its CONNECT (starting with what `input` already
    /// holds), journals publishes, relays everything to the broker.
    async fn relay_device_packets(
        mut self,
        mut device: OwnedReadHalf,
        mut broker: OwnedWriteHalf,
        mut input: BytesMut,
    ) -> Result<(), End> {
        let max = self.front.max_payload + PACKET_OVERHEAD;
        let mut output = BytesMut::with_capacity(16 * 1024);
        let ping_every = Duration::from_secs(u64::from(STAND_IN_KEEP_ALIVE / 2));
        let mut pinger = tokio::time::interval(ping_every);
        pinger.tick().await;
        loop {
            // Whole packets first: the CONNECT may have arrived together with more.
            loop {
                let frame = match frame::next_frame(&input, max) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return Err(self.refuse_frame(e)),
                };
                let packet = input.split_to(frame.len()).freeze();
                let packet = self.inspect(&frame, packet).await?;
                output.extend_from_slice(&packet);
            }
            if !output.is_empty() {
                broker
                    .write_all(&output)
                    .await
                    .map_err(|e| End::Closed(format!("broker write: {e}")))?;
                output.clear();
            }
            tokio::select! {
                read = device.read_buf(&mut input) => {
                    let n = read.map_err(|e| End::Closed(format!("device read: {e}")))?;
                    if n == 0 {
                        return Ok(());
                    }
                }
                _ = pinger.tick(), if self.keep_alive_off => {
                    self.shared.injected_pings.fetch_add(1, Ordering::Relaxed);
                    broker.write_all(&frame::PINGREQ).await
                        .map_err(|e| End::Closed(format!("broker write: {e}")))?;
                }
            }
        }
    }

    /// The refusal of a packet that cannot be framed or parsed.
    fn refuse_frame(&self, error: FrameError) -> End {
        let code = match error {
            FrameError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            _ => reason::MALFORMED_PACKET,
        };
        match (self.version, &error) {
            (Some(version), _) => close_with(version, code, format!("protocol: {error}")),
            (None, FrameError::AuthenticationMethod { .. }) => End::Refused {
                // Only MQTT 5 has authentication methods.
                answer: Some(connack_refusal(
                    Version::V5,
                    reason::BAD_AUTHENTICATION_METHOD,
                )),
                reason: format!("protocol: {error}"),
            },
            (None, FrameError::UnsupportedLevel { .. }) => End::Refused {
                // In 3.1.1's format, which every level understands (Mosquitto answers so).
                answer: Some(connack_refusal(
                    Version::V4,
                    return_code::UNACCEPTABLE_PROTOCOL_VERSION,
                )),
                reason: format!("protocol: {error}"),
            },
            (None, _) => End::Refused {
                answer: None,
                reason: format!("protocol: {error}"),
            },
        }
    }

    /// The per-packet decision point: returns the packet to relay (possibly rewritten), or
    /// how to refuse it. Only packet types a client may send, with the flags their type
    /// requires, reach the broker.
    async fn inspect(&mut self, frame: &Frame, packet: Bytes) -> Result<Bytes, End> {
        let Some(version) = self.version else {
            return self.connect(frame, packet);
        };
        let protocol_error =
            |what: String| close_with(version, reason::PROTOCOL_ERROR, format!("protocol: {what}"));
        if !checks::client_may_send(frame.kind(), version) {
            return Err(protocol_error(format!(
                "packet type {} may not be sent by a client",
                frame.kind()
            )));
        }
        if !checks::flags_valid(frame.byte1) {
            return Err(close_with(
                version,
                reason::MALFORMED_PACKET,
                format!(
                    "protocol: fixed header {:#04x} has invalid flags",
                    frame.byte1
                ),
            ));
        }
        match frame.kind() {
            kind::CONNECT => Err(protocol_error("second CONNECT on one connection".into())),
            kind::PUBLISH => self.publish(frame, packet, version).await,
            kind::PUBREL => {
                if let Ok(pkid) = frame::packet_id(frame, &packet) {
                    self.qos2_open.remove(&pkid);
                }
                Ok(packet)
            }
            kind::SUBSCRIBE => {
                let subscriptions = frame::parse_subscribe(frame, &packet, version)
                    .map_err(|e| self.refuse_frame(e))?;
                if let Some(bad) = subscriptions
                    .iter()
                    .find(|s| !checks::valid_topic_filter(&s.filter))
                {
                    // Malformed, as Mosquitto 2 answers (0x8F is for well-formed filters
                    // a server declines).
                    return Err(close_with(
                        version,
                        reason::MALFORMED_PACKET,
                        format!("protocol: invalid topic filter {:?}", bad.filter),
                    ));
                }
                Ok(packet)
            }
            kind::UNSUBSCRIBE => {
                let filters = frame::parse_unsubscribe(frame, &packet, version)
                    .map_err(|e| self.refuse_frame(e))?;
                if let Some(bad) = filters.iter().find(|f| !checks::valid_topic_filter(f)) {
                    return Err(close_with(
                        version,
                        reason::MALFORMED_PACKET,
                        format!("protocol: invalid topic filter {bad:?}"),
                    ));
                }
                Ok(packet)
            }
            _ => Ok(packet),
        }
    }

    /// The first packet: must be a CONNECT with a client id the gateway does not keep for
    /// itself.
    fn connect(&mut self, frame: &Frame, packet: Bytes) -> Result<Bytes, End> {
        let info = connect::parse_connect(frame, &packet).map_err(|e| self.refuse_frame(e))?;
        if !checks::flags_valid(frame.byte1) {
            return Err(End::Refused {
                answer: None,
                reason: "protocol: CONNECT with invalid flags".into(),
            });
        }
        if checks::reserved_client_id(&info.client_id) {
            let code = match info.version {
                Version::V4 => return_code::IDENTIFIER_REJECTED,
                Version::V5 => reason::CLIENT_ID_NOT_VALID,
            };
            return Err(End::Refused {
                answer: Some(connack_refusal(info.version, code)),
                reason: format!(
                    "client id {:?} is reserved for the gateway (prefix {:?})",
                    info.client_id,
                    checks::RESERVED_CLIENT_ID_PREFIX
                ),
            });
        }
        self.version = Some(info.version);
        self.client_id = Arc::from(info.client_id.as_str());
        self.keep_alive_off = info.keep_alive == 0;
        let keep_alive = if self.keep_alive_off {
            STAND_IN_KEEP_ALIVE
        } else {
            info.keep_alive
        };
        Ok(connect::connect_for_broker(
            frame, &packet, &info, keep_alive,
        ))
    }

    /// Checks and journals a PUBLISH; its acknowledgement is held until the journal commit.
    async fn publish(
        &mut self,
        frame: &Frame,
        packet: Bytes,
        version: Version,
    ) -> Result<Bytes, End> {
        let publish = frame::parse_publish(frame, packet.clone(), version)
            .map_err(|e| self.refuse_frame(e))?;
        if !publish.topic.is_empty() && !checks::valid_topic_name(&publish.topic) {
            // A protocol error, as Mosquitto 2 answers ([MQTT-3.3.2-2]; 0x90 is for
            // well-formed names a receiver declines).
            return Err(close_with(
                version,
                reason::PROTOCOL_ERROR,
                format!("protocol: invalid topic name {:?}", publish.topic),
            ));
        }
        let topic = self.resolve_topic(&publish, version)?;
        if publish.payload.len() > self.front.max_payload {
            return Err(self.refuse_frame(FrameError::TooLarge {
                size: publish.payload.len(),
                limit: self.front.max_payload,
            }));
        }
        let duplicate = publish.qos == 2 && !self.qos2_open.insert(publish.pkid);
        if !duplicate {
            let entry = NewJournalEntry {
                topic,
                payload: publish.payload,
                qos: publish.qos,
                retain: publish.retain,
                client_id: self.client_id.clone(),
                received_ms: crate::event::now_ms(),
            };
            let signal = self
                .front
                .journal
                .append(entry, publish.qos > 0)
                .await
                .map_err(|e| End::Closed(e.to_string()))?;
            if let Some(signal) = signal {
                if let Ok(mut gates) = self.shared.gates.lock() {
                    gates.insert(publish.pkid, signal);
                }
            }
        }
        Ok(packet)
    }

    fn resolve_topic(&mut self, publish: &frame::Publish, version: Version) -> Result<String, End> {
        let alias_error = |what: String| close_with(version, reason::TOPIC_ALIAS_INVALID, what);
        match publish.topic_alias {
            Some(alias) if alias == 0 || alias > TOPIC_ALIAS_MAX => Err(alias_error(format!(
                "protocol: topic alias {alias} outside 1..={TOPIC_ALIAS_MAX}"
            ))),
            Some(alias) if publish.topic.is_empty() => {
                self.aliases.get(&alias).cloned().ok_or_else(|| {
                    close_with(
                        version,
                        reason::PROTOCOL_ERROR,
                        format!("protocol: unknown topic alias {alias}"),
                    )
                })
            }
            Some(alias) => {
                let added = publish.topic.len();
                let removed = self.aliases.get(&alias).map_or(0, String::len);
                if self.alias_bytes + added - removed > MAX_ALIAS_BYTES {
                    return Err(alias_error(format!(
                        "protocol: topic aliases would hold more than {MAX_ALIAS_BYTES} bytes"
                    )));
                }
                self.alias_bytes = self.alias_bytes + added - removed;
                self.aliases.insert(alias, publish.topic.clone());
                Ok(publish.topic.clone())
            }
            None if publish.topic.is_empty() => Err(close_with(
                version,
                reason::PROTOCOL_ERROR,
                "protocol: PUBLISH with an empty topic and no alias".into(),
            )),
            None => Ok(publish.topic.clone()),
        }
    }
}

/// Most bytes of broker packets queued behind a held acknowledgement before the front stops
/// reading from the broker (rumqttd then buffers, and eventually slows, what it sends).
const HELD_BYTES: usize = 4 * 1024 * 1024;

/// Relays the broker's packets to the device, holding each PUBACK/PUBREC (and everything the
/// broker sent after it) until its publish is journaled, and dropping the answers to the
/// front's own pings. A PINGRESP is never held: a device whose acknowledgements wait for a
/// slow or full disk stays connected instead of timing out its keep-alive.
async fn relay_broker_packets(
    shared: Arc<Shared>,
    broker: &mut OwnedReadHalf,
    device: &mut OwnedWriteHalf,
) -> Result<(), End> {
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut output = BytesMut::with_capacity(16 * 1024);
    // Packets waiting for the head gate, in the order the broker sent them.
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut held_bytes = 0usize;
    loop {
        let reading = held_bytes < HELD_BYTES;
        tokio::select! {
            read = broker.read_buf(&mut input), if reading => {
                let n = read.map_err(|e| End::Closed(format!("broker read: {e}")))?;
                if n == 0 {
                    return Ok(());
                }
            }
            opened = wait_for_head(&mut held) => {
                opened.map_err(|_| End::Closed("journal stopped before the publish was durable".into()))?;
                while let Some(next) = held.front_mut() {
                    if next.gate.is_some() {
                        break;
                    }
                    if let Some(item) = held.pop_front() {
                        held_bytes -= item.packet.len();
                        output.extend_from_slice(&item.packet);
                    }
                }
            }
        }
        while let Some(frame) = frame::next_frame(&input, usize::MAX)
            .map_err(|e| End::Closed(format!("broker sent {e}")))?
        {
            let packet = input.split_to(frame.len());
            let mut gate = None;
            match frame.kind() {
                kind::PUBACK | kind::PUBREC => {
                    let pkid = frame::packet_id(&frame, &packet)
                        .map_err(|e| End::Closed(format!("broker sent {e}")))?;
                    gate = shared.gates.lock().ok().and_then(|mut g| g.remove(&pkid));
                }
                kind::PINGRESP => {
                    let swallow = shared
                        .injected_pings
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok();
                    if !swallow {
                        output.extend_from_slice(&packet);
                    }
                    continue;
                }
                _ => {}
            }
            if gate.is_some() || !held.is_empty() {
                held_bytes += packet.len();
                held.push_back(Held {
                    gate,
                    packet: packet.freeze(),
                });
            } else {
                output.extend_from_slice(&packet);
            }
        }
        if !output.is_empty() {
            device
                .write_all(&output)
                .await
                .map_err(|e| End::Closed(format!("device write: {e}")))?;
            output.clear();
        }
    }
}

/// A broker packet held behind an acknowledgement that is not yet durable.
struct Held {
    /// The commit this packet waits for (only acknowledgements have one); `None` once opened.
    gate: Option<Committed>,
    packet: Bytes,
}

/// Waits until the first held packet's gate opens (and marks it open); pending forever when
/// nothing is held.
async fn wait_for_head(held: &mut VecDeque<Held>) -> Result<(), RecvError> {
    match held.front_mut() {
        Some(Held {
            gate: Some(gate), ..
        }) => {
            let result = gate.await;
            if let Some(head) = held.front_mut() {
                head.gate = None;
            }
            result
        }
        Some(_) => Ok(()),
        None => std::future::pending().await,
    }
}
