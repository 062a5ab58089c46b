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
//!
//! This is the one place where every packet of every device passes: per-packet decisions
//! (authorization, per-client limits) belong in [`Session::relay_device_packets`].
//!
//! Guarantees: a malformed or oversized packet closes that connection (logged and counted)
//! and affects nothing else; no input panics.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot::error::RecvError;
use tracing::{debug, warn};

use super::frame::{self, kind, Frame, FrameError, Version};
use crate::journal::{Committed, Journal};
use crate::metrics::Metrics;
use crate::store::NewJournalEntry;

/// The keep-alive the front asks the broker for on behalf of a device that turned keep-alive
/// off; the front pings the broker every half of it.
const STAND_IN_KEEP_ALIVE: u16 = 60;

/// Bytes of MQTT framing allowed on top of the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// Everything every connection of one listener shares.
#[derive(Clone)]
pub struct Front {
    /// The broker's internal listener for this protocol.
    pub broker: SocketAddr,
    /// Where publishes become durable.
    pub journal: Journal,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Largest accepted publish payload.
    pub max_payload: usize,
}

impl Front {
    /// Accepts device connections until the task running this is aborted, which also closes
    /// every connection it accepted.
    pub async fn serve(self, listener: TcpListener) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((socket, peer)) => {
                    let front = self.clone();
                    connections.spawn(async move {
                        if let Err(reason) = front.connection(socket).await {
                            debug!(%peer, %reason, "device connection closed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a device connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self, device: TcpStream) -> Result<(), String> {
        let broker = TcpStream::connect(self.broker)
            .await
            .map_err(|e| format!("internal broker unreachable: {e}"))?;
        let _ = device.set_nodelay(true);
        let _ = broker.set_nodelay(true);
        let (device_rx, device_tx) = device.into_split();
        let (broker_rx, broker_tx) = broker.into_split();
        let shared = Arc::new(Shared::default());
        let session = Session {
            front: self.clone(),
            shared: shared.clone(),
            version: None,
            client_id: Arc::from(""),
            aliases: HashMap::new(),
            qos2_open: HashSet::new(),
            keep_alive_off: false,
        };
        let result = tokio::select! {
            r = session.relay_device_packets(device_rx, broker_tx) => r,
            r = relay_broker_packets(shared, broker_rx, device_tx) => r,
        };
        if let Err(reason) = &result {
            if reason.starts_with("protocol") {
                Metrics::add(&self.metrics.edge_rejected, 1);
                warn!(%reason, "device connection closed");
            }
        }
        result
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
    qos2_open: HashSet<u16>,
    keep_alive_off: bool,
}

impl Session {
    /// Reads the device's packets, journals publishes, relays everything to the broker.
    async fn relay_device_packets(
        mut self,
        mut device: OwnedReadHalf,
        mut broker: OwnedWriteHalf,
    ) -> Result<(), String> {
        let max = self.front.max_payload + PACKET_OVERHEAD;
        let mut input = BytesMut::with_capacity(16 * 1024);
        let mut output = BytesMut::with_capacity(16 * 1024);
        let ping_every = Duration::from_secs(u64::from(STAND_IN_KEEP_ALIVE / 2));
        let mut pinger = tokio::time::interval(ping_every);
        pinger.tick().await;
        loop {
            tokio::select! {
                read = device.read_buf(&mut input) => {
                    let n = read.map_err(|e| format!("device read: {e}"))?;
                    if n == 0 {
                        return Ok(());
                    }
                }
                _ = pinger.tick(), if self.keep_alive_off => {
                    self.shared.injected_pings.fetch_add(1, Ordering::Relaxed);
                    broker.write_all(&frame::PINGREQ).await.map_err(|e| format!("broker write: {e}"))?;
                    continue;
                }
            }
            while let Some(frame) =
                frame::next_frame(&input, max).map_err(|e| format!("protocol: {e}"))?
            {
                let packet = input.split_to(frame.len()).freeze();
                let packet = self
                    .inspect(&frame, packet)
                    .await
                    .map_err(|e| format!("protocol: {e}"))?;
                output.extend_from_slice(&packet);
            }
            if !output.is_empty() {
                broker
                    .write_all(&output)
                    .await
                    .map_err(|e| format!("broker write: {e}"))?;
                output.clear();
            }
        }
    }

    /// The per-packet decision point: returns the packet to relay (possibly rewritten).
    async fn inspect(&mut self, frame: &Frame, packet: Bytes) -> Result<Bytes, FrameError> {
        let Some(version) = self.version else {
            let info = frame::parse_connect(frame, &packet)?;
            self.version = Some(info.version);
            self.client_id = Arc::from(info.client_id.as_str());
            if info.keep_alive == 0 {
                self.keep_alive_off = true;
                let mut rewritten = BytesMut::from(&packet[..]);
                let at = info.keep_alive_offset;
                rewritten[at..at + 2].copy_from_slice(&STAND_IN_KEEP_ALIVE.to_be_bytes());
                return Ok(rewritten.freeze());
            }
            return Ok(packet);
        };
        match frame.kind() {
            kind::CONNECT => Err(FrameError::Malformed {
                what: "CONNECT",
                detail: "second CONNECT on one connection".into(),
            }),
            kind::PUBLISH => {
                let publish = frame::parse_publish(frame, packet.clone(), version)?;
                let topic = self.resolve_topic(&publish)?;
                if publish.payload.len() > self.front.max_payload {
                    return Err(FrameError::TooLarge {
                        size: publish.payload.len(),
                        limit: self.front.max_payload,
                    });
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
                        .map_err(|e| FrameError::Malformed {
                            what: "PUBLISH",
                            detail: e.to_string(),
                        })?;
                    if let Some(signal) = signal {
                        if let Ok(mut gates) = self.shared.gates.lock() {
                            gates.insert(publish.pkid, signal);
                        }
                    }
                }
                Ok(packet)
            }
            kind::PUBREL => {
                if let Ok(pkid) = frame::packet_id(frame, &packet) {
                    self.qos2_open.remove(&pkid);
                }
                Ok(packet)
            }
            _ => Ok(packet),
        }
    }

    fn resolve_topic(&mut self, publish: &frame::Publish) -> Result<String, FrameError> {
        match publish.topic_alias {
            Some(alias) if publish.topic.is_empty() => self
                .aliases
                .get(&alias)
                .cloned()
                .ok_or_else(|| FrameError::Malformed {
                    what: "PUBLISH",
                    detail: format!("unknown topic alias {alias}"),
                }),
            Some(alias) => {
                self.aliases.insert(alias, publish.topic.clone());
                Ok(publish.topic.clone())
            }
            None if publish.topic.is_empty() => Err(FrameError::Malformed {
                what: "PUBLISH",
                detail: "empty topic".into(),
            }),
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
    mut broker: OwnedReadHalf,
    mut device: OwnedWriteHalf,
) -> Result<(), String> {
    let mut input = BytesMut::with_capacity(16 * 1024);
    let mut output = BytesMut::with_capacity(16 * 1024);
    // Packets waiting for the head gate, in the order the broker sent them.
    let mut held: VecDeque<Held> = VecDeque::new();
    let mut held_bytes = 0usize;
    loop {
        let reading = held_bytes < HELD_BYTES;
        tokio::select! {
            read = broker.read_buf(&mut input), if reading => {
                let n = read.map_err(|e| format!("broker read: {e}"))?;
                if n == 0 {
                    return Ok(());
                }
            }
            opened = wait_for_head(&mut held) => {
                opened.map_err(|_| "journal stopped before the publish was durable".to_string())?;
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
        while let Some(frame) =
            frame::next_frame(&input, usize::MAX).map_err(|e| format!("broker sent {e}"))?
        {
            let packet = input.split_to(frame.len());
            let mut gate = None;
            match frame.kind() {
                kind::PUBACK | kind::PUBREC => {
                    let pkid = frame::packet_id(&frame, &packet).map_err(|e| e.to_string())?;
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
                .map_err(|e| format!("device write: {e}"))?;
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
