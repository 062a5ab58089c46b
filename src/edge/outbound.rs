//! One session's messages on their way to its client: the queue, the in-flight window and the
//! QoS 1 and 2 acknowledgement states (MQTT 3.1.1 §4.3, §4.4, §4.6; MQTT 5 §4.3, §4.4, §4.9).
//!
//! Guarantees:
//! - At most `receive_maximum` QoS 1/2 messages are unacknowledged at once (§4.9); QoS 0
//!   messages do not count against it.
//! - Messages leave in the order they were queued (§4.6 ordered topics), each QoS 1/2 one with
//!   a packet identifier no other unacknowledged message of the session holds.
//! - The queue is bounded in messages and bytes, as Mosquitto's `max_queued_messages` and
//!   `max_queued_bytes` bound it: a message that would exceed a bound is dropped and counted,
//!   and so is a QoS 0 message for a client that is not connected (Mosquitto's default).
//! - A message whose expiry has passed is not sent (MQTT 5 §3.3.2.3.3): it is dropped and
//!   counted when its turn comes.
//! - After a reconnect, every unacknowledged message is sent again first, in its original
//!   order, with DUP set and its packet identifier, and a PUBREL for every QoS 2 message whose
//!   PUBREC came (§4.4); nothing is given out twice before that.
//! - Every message taken in is accounted for: sent and acknowledged (QoS 1/2), sent (QoS 0),
//!   in flight, queued, or counted as dropped.
//!
//! Pure: no I/O; time is a parameter. The session layer sends what this hands out and feeds
//! back the client's acknowledgements.
//!
//! In the data path: [`super::broker`] keeps one per session.
// The size accessors are read by the tests only, until the broker exports them as gauges.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// A message for one session, at the QoS it is delivered with (already the lower of the
/// publish's and the subscription's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// The retain flag as delivered.
    pub retain: bool,
    /// When it expires (MQTT 5 Message Expiry Interval), in ms since the epoch.
    pub expires_at_ms: Option<u64>,
    /// The publisher's MQTT 5 properties to pass on, as encoded and in their order (without
    /// the topic alias and the message expiry, which are the connection's and the queue's).
    pub properties: Bytes,
    /// The identifiers of the subscriptions it matched (MQTT 5 §3.3.2.3.8).
    pub subscription_ids: Arc<[u32]>,
    /// Its number in the broker's durable state (0: not kept on disk); handed back when the
    /// message is done with, so that the caller can forget it there too.
    pub id: u64,
    /// The publisher's client id, for the gateway's own links (a control request is answered
    /// to its requester only); `None` for devices' sessions, and for messages kept on disk.
    pub publisher: Option<Arc<str>>,
}

impl Message {
    /// What the message costs in the queue's byte bound.
    pub fn bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + self.properties.len()
    }
}

/// The bounds of one session's queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most QoS 1/2 messages unacknowledged at once: the client's Receive Maximum (MQTT 5;
    /// the broker's own setting on 3.1.1). At least 1 (0 is a protocol error in CONNECT).
    pub receive_maximum: u16,
    /// Most messages waiting behind the in-flight window.
    pub max_queued: usize,
    /// Most bytes of messages waiting behind the in-flight window.
    pub max_queued_bytes: usize,
}

/// The bytes of messages held for all the sessions of a broker together, queued or in
/// flight: each session's queue has its own bounds, and this one bounds their sum, so that
/// many sessions cannot together hold more than the board can spare. A message for a session
/// counts in full even when its payload is shared with other sessions' copies (the bound errs
/// on the safe side). Clones share the count.
#[derive(Clone, Debug)]
pub struct Budget {
    used: Arc<AtomicUsize>,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes, none of them used.
    pub fn new(limit: usize) -> Budget {
        Budget {
            used: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit under the limit.
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Takes `bytes` whatever the limit (messages read back from disk).
    fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives `bytes` back.
    fn give_back(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

/// What happened to a message given to [`Outbound::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued (it leaves through [`Outbound::next`]).
    Queued,
    /// Dropped, and counted.
    Dropped(DropReason),
}

/// Why [`Outbound::push`] dropped a message (one that expires in the queue is counted in
/// [`Dropped::expired`] when its turn comes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The queue was at one of its bounds.
    QueueFull,
    /// All sessions' messages together were at the broker's [`Budget`].
    TotalFull,
    /// QoS 0 for a client that is not connected.
    Offline,
}

/// A packet to send to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// A PUBLISH; `packet_id` is `None` for QoS 0.
    Publish {
        /// The message.
        message: Message,
        /// Its packet identifier (QoS 1/2).
        packet_id: Option<u16>,
        /// Whether this is a retransmission.
        dup: bool,
        /// The MQTT 5 Message Expiry Interval to send on: what remains, in seconds.
        expiry_secs: Option<u32>,
    },
    /// A PUBREL for a QoS 2 message whose PUBREC came (sent again after a reconnect).
    Pubrel {
        /// Its packet identifier.
        packet_id: u16,
    },
}

/// An acknowledgement the client should not have sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// No message is waiting for this acknowledgement under this packet identifier.
    #[error("no message awaits this acknowledgement for packet id {0}")]
    Unknown(u16),
}

/// Where an unacknowledged message is in its flow.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Flight {
    /// Sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Message),
    /// QoS 2: PUBREC came, PUBREL sent, waiting for PUBCOMP (the message's durable id).
    Released(u64),
}

/// Counters of what was dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// At a queue bound.
    pub queue_full: u64,
    /// At the broker's [`Budget`].
    pub total_full: u64,
    /// QoS 0 while offline.
    pub offline: u64,
    /// Expired.
    pub expired: u64,
}

/// One session's outgoing messages (see the module documentation).
#[derive(Debug)]
pub struct Outbound {
    limits: Limits,
    connected: bool,
    queue: VecDeque<Message>,
    queued_bytes: usize,
    /// Unacknowledged messages by packet id, with the order they were first sent in.
    inflight: BTreeMap<u16, (u64, Flight)>,
    /// Packet ids of the retransmissions due after a reconnect, in order (handed out before
    /// anything new).
    resend: VecDeque<u16>,
    sent_order: u64,
    last_packet_id: u16,
    dropped: Dropped,
    /// Durable ids of messages that left without being sent (expired), until taken.
    gone: Vec<u64>,
    /// The broker's count of held bytes this queue takes from and gives back to.
    budget: Budget,
    /// Bytes of the messages this queue holds (queued, and in flight until acknowledged or
    /// released), all taken from `budget`.
    held_bytes: usize,
}

/// A message of a session restored from disk, with where it was in its flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The message.
    pub message: Message,
    /// Its packet identifier, if it was sent.
    pub packet_id: Option<u16>,
    /// Whether its PUBREC came (QoS 2).
    pub released: bool,
}

impl Outbound {
    /// An empty queue for a session that is `connected` or not.
    pub fn new(limits: Limits, connected: bool) -> Outbound {
        Outbound {
            limits,
            connected,
            queue: VecDeque::new(),
            queued_bytes: 0,
            inflight: BTreeMap::new(),
            resend: VecDeque::new(),
            sent_order: 0,
            last_packet_id: 0,
            dropped: Dropped::default(),
            gone: Vec::new(),
            budget: Budget::new(usize::MAX),
            held_bytes: 0,
        }
    }

    /// The same queue, counting what it holds in `budget` from now on (shared with the
    /// broker's other sessions) instead of in a budget of its own.
    pub fn sharing(mut self, budget: &Budget) -> Outbound {
        self.budget.give_back(self.held_bytes);
        budget.take(self.held_bytes);
        self.budget = budget.clone();
        self
    }

    /// Bytes of the messages this queue holds, queued or in flight.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    fn release(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
        self.budget.give_back(bytes);
    }

    /// A session's queue as it was kept on disk, for a client that is not connected:
    /// `messages` in the order they were queued; the sent ones go again first when it
    /// connects, in that order (with their packet ids), then the others.
    pub fn restore(limits: Limits, messages: Vec<Restored>) -> Outbound {
        let mut out = Outbound::new(limits, false);
        for restored in messages {
            match restored.packet_id {
                Some(packet_id) if !out.inflight.contains_key(&packet_id) => {
                    out.sent_order += 1;
                    let flight = if restored.released {
                        Flight::Released(restored.message.id)
                    } else {
                        out.held_bytes += restored.message.bytes();
                        Flight::Published(restored.message)
                    };
                    out.inflight.insert(packet_id, (out.sent_order, flight));
                    out.last_packet_id = out.last_packet_id.max(packet_id);
                }
                _ => {
                    out.queued_bytes += restored.message.bytes();
                    out.held_bytes += restored.message.bytes();
                    out.queue.push_back(restored.message);
                }
            }
        }
        out.budget.take(out.held_bytes);
        out
    }

    /// The durable ids of the messages that left the queue unsent since the last call.
    pub fn take_gone(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.gone)
    }

    /// Messages waiting behind the in-flight window.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Bytes of the messages waiting behind the in-flight window.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// QoS 1/2 messages sent and not yet acknowledged (fully, for QoS 2).
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// What was dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Takes a message in for the client.
    pub fn push(&mut self, message: Message) -> Pushed {
        if message.qos == 0 && !self.connected {
            self.dropped.offline += 1;
            return Pushed::Dropped(DropReason::Offline);
        }
        if self.queue.len() >= self.limits.max_queued
            || self.queued_bytes + message.bytes() > self.limits.max_queued_bytes
        {
            self.dropped.queue_full += 1;
            return Pushed::Dropped(DropReason::QueueFull);
        }
        if !self.budget.try_take(message.bytes()) {
            self.dropped.total_full += 1;
            return Pushed::Dropped(DropReason::TotalFull);
        }
        self.held_bytes += message.bytes();
        self.queued_bytes += message.bytes();
        self.queue.push_back(message);
        Pushed::Queued
    }

    /// The next packet to send, if the client is connected and one may go now.
    pub fn next(&mut self, now_ms: u64) -> Option<Send> {
        if !self.connected {
            return None;
        }
        while let Some(packet_id) = self.resend.pop_front() {
            match self.inflight.get(&packet_id) {
                Some((_, Flight::Published(message))) => {
                    return Some(Send::Publish {
                        message: message.clone(),
                        packet_id: Some(packet_id),
                        dup: true,
                        // Its delivery has begun, so it completes even if it expired since
                        // (§3.3.2.3.3); at least 1 s, as 0 would be read as "expired".
                        expiry_secs: message
                            .expires_at_ms
                            .map(|at| remaining_secs(at, now_ms).max(1)),
                    });
                }
                Some((_, Flight::Released(_))) => return Some(Send::Pubrel { packet_id }),
                None => continue,
            }
        }
        loop {
            let head = self.queue.front()?;
            let packet_id = if head.qos > 0 {
                if self.inflight.len() >= usize::from(self.limits.receive_maximum) {
                    return None;
                }
                Some(self.free_packet_id()?)
            } else {
                None
            };
            let message = self.queue.pop_front()?;
            self.queued_bytes -= message.bytes();
            let expiry_secs = match message.expires_at_ms {
                Some(at) if at <= now_ms => {
                    self.dropped.expired += 1;
                    self.release(message.bytes());
                    if message.id != 0 {
                        self.gone.push(message.id);
                    }
                    continue;
                }
                Some(at) => Some(remaining_secs(at, now_ms)),
                None => None,
            };
            match packet_id {
                Some(id) => {
                    self.sent_order += 1;
                    self.inflight
                        .insert(id, (self.sent_order, Flight::Published(message.clone())));
                }
                // QoS 0 is done with once it is handed out.
                None => self.release(message.bytes()),
            }
            return Some(Send::Publish {
                message,
                packet_id,
                dup: false,
                expiry_secs,
            });
        }
    }

    /// The client's PUBACK (QoS 1): the message is delivered; returns its durable id.
    pub fn puback(&mut self, packet_id: u16) -> Result<u64, AckError> {
        match self.inflight.get(&packet_id) {
            Some((_, Flight::Published(m))) if m.qos == 1 => {
                let (id, bytes) = (m.id, m.bytes());
                self.inflight.remove(&packet_id);
                self.release(bytes);
                Ok(id)
            }
            _ => Err(AckError::Unknown(packet_id)),
        }
    }

    /// The client's PUBREC (QoS 2): the PUBREL to answer with is the caller's to send.
    /// Returns the message's durable id.
    pub fn pubrec(&mut self, packet_id: u16) -> Result<u64, AckError> {
        match self.inflight.get_mut(&packet_id) {
            Some((_, flight @ Flight::Published(_))) if is_qos2(flight) => {
                let (id, bytes) = match flight {
                    Flight::Published(m) => (m.id, m.bytes()),
                    Flight::Released(id) => (*id, 0),
                };
                *flight = Flight::Released(id);
                // Only its packet id is needed from now on.
                self.release(bytes);
                Ok(id)
            }
            // A PUBREC again after a reconnect: the PUBREL is sent again.
            Some((_, Flight::Released(id))) => Ok(*id),
            _ => Err(AckError::Unknown(packet_id)),
        }
    }

    /// The client's PUBCOMP (QoS 2): the message is delivered; returns its durable id.
    pub fn pubcomp(&mut self, packet_id: u16) -> Result<u64, AckError> {
        match self.inflight.get(&packet_id) {
            Some((_, Flight::Released(id))) => {
                let id = *id;
                self.inflight.remove(&packet_id);
                Ok(id)
            }
            _ => Err(AckError::Unknown(packet_id)),
        }
    }

    /// Completes the message sent under `packet_id` whatever its flow (it could not be
    /// sent, or an in-process client takes it as delivered); returns its durable id.
    pub fn complete(&mut self, packet_id: u16) -> Option<u64> {
        let (_, flight) = self.inflight.remove(&packet_id)?;
        Some(match flight {
            Flight::Published(m) => {
                self.release(m.bytes());
                m.id
            }
            Flight::Released(id) => id,
        })
    }

    /// The client went away: nothing is handed out until [`Outbound::connected`].
    pub fn disconnected(&mut self) {
        self.connected = false;
        self.resend.clear();
    }

    /// The client is back (its session was kept): the unacknowledged messages go again
    /// first (§4.4), then the queue, with the client's new Receive Maximum.
    pub fn connected(&mut self, receive_maximum: u16) {
        self.connected = true;
        self.limits.receive_maximum = receive_maximum;
        let mut flights: Vec<(u64, u16)> = self
            .inflight
            .iter()
            .map(|(id, (order, _))| (*order, *id))
            .collect();
        flights.sort_unstable();
        self.resend = flights.into_iter().map(|(_, id)| id).collect();
    }

    /// A packet identifier no unacknowledged message holds, after the last one given out.
    fn free_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.last_packet_id = self.last_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.last_packet_id) {
                return Some(self.last_packet_id);
            }
        }
        None
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.budget.give_back(self.held_bytes);
    }
}

/// Seconds until `at_ms`, rounded up so that a message never expires early at the client.
fn remaining_secs(at_ms: u64, now_ms: u64) -> u32 {
    u32::try_from(at_ms.saturating_sub(now_ms).div_ceil(1000)).unwrap_or(u32::MAX)
}

fn is_qos2(flight: &Flight) -> bool {
    matches!(flight, Flight::Published(m) if m.qos == 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(seq: u64, qos: u8, size: usize, expires_at_ms: Option<u64>) -> Message {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.resize(size.max(8), 0);
        Message {
            topic: Arc::from("t"),
            payload: Bytes::from(payload),
            qos,
            retain: false,
            expires_at_ms,
            properties: Bytes::new(),
            subscription_ids: Arc::from([]),
            id: seq,
            publisher: None,
        }
    }

    fn seq_of(message: &Message) -> u64 {
        u64::from_be_bytes(message.payload[..8].try_into().unwrap())
    }

    const LIMITS: Limits = Limits {
        receive_maximum: 2,
        max_queued: 3,
        max_queued_bytes: 100,
    };

    #[test]
    fn the_window_holds_qos1_back_but_not_qos0_behind_it() {
        let mut out = Outbound::new(LIMITS, true);
        for (seq, qos) in [(1, 1), (2, 1), (3, 1)] {
            assert_eq!(out.push(message(seq, qos, 8, None)), Pushed::Queued);
        }
        let first = out.next(0).unwrap();
        let second = out.next(0).unwrap();
        assert!(out.next(0).is_none(), "the window of 2 is full");
        let Send::Publish {
            packet_id: Some(id),
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        assert!(matches!(second, Send::Publish { packet_id: Some(i), .. } if i != id));
        assert_eq!(out.puback(id).map(|_| ()), Ok(()));
        assert_eq!(
            out.puback(id),
            Err(AckError::Unknown(id)),
            "acknowledged once"
        );
        assert!(
            matches!(out.next(0), Some(Send::Publish { message, .. }) if seq_of(&message) == 3)
        );
        // QoS 0 is not held by the window (it has no acknowledgement).
        out.push(message(4, 0, 8, None));
        assert!(matches!(
            out.next(0),
            Some(Send::Publish {
                packet_id: None,
                ..
            })
        ));
    }

    #[test]
    fn bounds_drop_and_count_as_mosquitto_does() {
        let mut out = Outbound::new(LIMITS, false);
        assert_eq!(
            out.push(message(1, 0, 8, None)),
            Pushed::Dropped(DropReason::Offline)
        );
        assert_eq!(out.push(message(2, 1, 8, None)), Pushed::Queued);
        assert_eq!(
            out.push(message(3, 2, 92, None)),
            Pushed::Dropped(DropReason::QueueFull)
        );
        assert_eq!(out.push(message(4, 2, 8, None)), Pushed::Queued);
        assert_eq!(out.push(message(5, 1, 8, None)), Pushed::Queued);
        assert_eq!(
            out.push(message(6, 1, 8, None)),
            Pushed::Dropped(DropReason::QueueFull)
        );
        assert_eq!(out.next(0), None, "nothing goes to a client that is away");
        assert_eq!(
            out.dropped(),
            Dropped {
                queue_full: 2,
                total_full: 0,
                offline: 1,
                expired: 0
            }
        );
        assert_eq!((out.queued(), out.queued_bytes()), (3, 3 * 9));
    }

    #[test]
    fn expired_messages_are_dropped_and_the_rest_carry_what_remains() {
        let mut out = Outbound::new(LIMITS, true);
        out.push(message(1, 1, 8, Some(1_000)));
        out.push(message(2, 1, 8, Some(10_500)));
        match out.next(2_000) {
            Some(Send::Publish {
                message,
                expiry_secs,
                ..
            }) => {
                assert_eq!(seq_of(&message), 2);
                assert_eq!(expiry_secs, Some(9), "8.5 s left, rounded up");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out.dropped().expired, 1);
    }

    #[test]
    fn qos2_goes_through_pubrec_and_pubcomp_and_a_reconnect_sends_pubrel_again() {
        let mut out = Outbound::new(LIMITS, true);
        out.push(message(1, 2, 8, None));
        out.push(message(2, 2, 8, None));
        let ids: Vec<u16> = (0..2)
            .map(|_| match out.next(0) {
                Some(Send::Publish {
                    packet_id: Some(id),
                    ..
                }) => id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            out.pubcomp(ids[0]),
            Err(AckError::Unknown(ids[0])),
            "PUBREC first"
        );
        assert_eq!(
            out.puback(ids[0]),
            Err(AckError::Unknown(ids[0])),
            "not QoS 1"
        );
        assert_eq!(out.pubrec(ids[0]).map(|_| ()), Ok(()));
        out.disconnected();
        out.connected(10);
        assert_eq!(out.next(0), Some(Send::Pubrel { packet_id: ids[0] }));
        match out.next(0) {
            Some(Send::Publish {
                packet_id,
                dup,
                message,
                ..
            }) => {
                assert_eq!((packet_id, dup, seq_of(&message)), (Some(ids[1]), true, 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out.pubcomp(ids[0]).map(|_| ()), Ok(()));
        assert_eq!(out.inflight(), 1);
    }

    #[test]
    fn sessions_share_one_budget_and_give_it_back() {
        let budget = Budget::new(100);
        let mut a = Outbound::new(LIMITS, true).sharing(&budget);
        let mut b = Outbound::new(LIMITS, true).sharing(&budget);
        // 41 bytes each (topic "t" + 40 bytes of payload): two fit, the third does not.
        assert_eq!(a.push(message(1, 1, 40, None)), Pushed::Queued);
        assert_eq!(b.push(message(2, 0, 40, None)), Pushed::Queued);
        assert_eq!(
            a.push(message(3, 1, 40, None)),
            Pushed::Dropped(DropReason::TotalFull)
        );
        assert_eq!(a.dropped().total_full, 1);
        assert_eq!(budget.used(), 82);
        // QoS 0 is given back once handed out; QoS 1 only once acknowledged.
        assert!(matches!(
            b.next(0),
            Some(Send::Publish {
                packet_id: None,
                ..
            })
        ));
        assert_eq!(budget.used(), 41);
        let Some(Send::Publish {
            packet_id: Some(id),
            ..
        }) = a.next(0)
        else {
            panic!("a QoS 1 publish")
        };
        assert_eq!(budget.used(), 41, "in flight still holds it");
        assert!(a.puback(id).is_ok());
        assert_eq!(budget.used(), 0);
        // A session that ends gives back what it held.
        assert_eq!(a.push(message(4, 2, 40, None)), Pushed::Queued);
        assert_eq!(b.push(message(5, 1, 40, None)), Pushed::Queued);
        drop(a);
        assert_eq!(budget.used(), 41);
        // Messages read back from disk are taken in even beyond the budget.
        let restored = (10..14)
            .map(|seq| Restored {
                message: message(seq, 1, 40, None),
                packet_id: None,
                released: false,
            })
            .collect();
        let c = Outbound::restore(LIMITS, restored).sharing(&budget);
        assert_eq!(c.queued(), 4);
        assert_eq!(budget.used(), 41 + 4 * 41);
        assert_eq!(
            b.push(message(6, 1, 1, None)),
            Pushed::Dropped(DropReason::TotalFull)
        );
        drop(c);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Push {
            qos: u8,
            size: usize,
            ttl: Option<u64>,
        },
        Next,
        Ack(usize),
        Tick(u64),
        Reconnect(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..3, 8usize..40, prop::option::of(1u64..3000))
                .prop_map(|(qos, size, ttl)| Op::Push { qos, size, ttl }),
            3 => Just(Op::Next),
            2 => any::<usize>().prop_map(Op::Ack),
            1 => (1u64..2000).prop_map(Op::Tick),
            1 => (1u16..4).prop_map(Op::Reconnect),
        ]
    }

    proptest! {
        /// Against any sequence of pushes, sends, acknowledgements, time and reconnects: the
        /// window and the bounds hold, fresh publishes leave in push order with packet ids
        /// no unacknowledged message holds, a reconnect resends exactly the unacknowledged
        /// ones in their order, and every message is accounted for.
        #[test]
        fn every_message_is_accounted_for_and_the_bounds_hold(
            ops in prop::collection::vec(op(), 0..120),
            budget_limit in 100usize..2000,
        ) {
            // Small enough that the budget shared with other sessions is hit too.
            let budget = Budget::new(budget_limit);
            let mut out = Outbound::new(LIMITS, true).sharing(&budget);
            let mut sizes: BTreeMap<u64, usize> = BTreeMap::new();
            let mut receive_maximum = LIMITS.receive_maximum;
            let mut now = 0u64;
            let mut seq = 0u64;
            let mut pushed = 0u64;
            let mut finished = 0u64; // QoS 0 sent, QoS 1 acknowledged, QoS 2 completed
            let mut last_fresh = 0u64;
            // Unacknowledged, by packet id: (first-send order, seq, qos, released).
            let mut flights: BTreeMap<u16, (u64, u64, u8, bool)> = BTreeMap::new();
            let mut sends = 0u64;
            let mut expect_resend: Vec<u16> = Vec::new();
            for op in ops {
                match op {
                    Op::Push { qos, size, ttl } => {
                        seq += 1;
                        pushed += 1;
                        let m = message(seq, qos, size, ttl.map(|t| now + t));
                        sizes.insert(seq, m.bytes());
                        out.push(m);
                    }
                    Op::Next => {
                        let before = out.inflight();
                        match out.next(now) {
                            None => {
                                prop_assert!(expect_resend.is_empty(), "resends pending");
                            }
                            Some(Send::Pubrel { packet_id }) => {
                                prop_assert_eq!(Some(packet_id), expect_resend.first().copied());
                                expect_resend.remove(0);
                                prop_assert!(flights[&packet_id].3, "PUBREL only after PUBREC");
                            }
                            Some(Send::Publish { message, packet_id, dup: true, .. }) => {
                                let id = packet_id.expect("a resend has a packet id");
                                prop_assert_eq!(Some(id), expect_resend.first().copied());
                                expect_resend.remove(0);
                                prop_assert_eq!(flights[&id].1, seq_of(&message));
                            }
                            Some(Send::Publish { message, packet_id, dup: false, .. }) => {
                                prop_assert!(expect_resend.is_empty(), "new before resends");
                                let s = seq_of(&message);
                                prop_assert!(s > last_fresh, "out of order: {} after {}", s, last_fresh);
                                last_fresh = s;
                                if let Some(at) = message.expires_at_ms {
                                    prop_assert!(at > now, "an expired message was sent");
                                }
                                match packet_id {
                                    None => {
                                        prop_assert_eq!(message.qos, 0);
                                        finished += 1;
                                    }
                                    Some(id) => {
                                        prop_assert!(message.qos > 0);
                                        prop_assert!(!flights.contains_key(&id), "id {} reused", id);
                                        prop_assert!(before < usize::from(receive_maximum));
                                        sends += 1;
                                        flights.insert(id, (sends, s, message.qos, false));
                                    }
                                }
                            }
                        }
                    }
                    Op::Ack(pick) => {
                        if flights.is_empty() {
                            prop_assert_eq!(out.puback(7), Err(AckError::Unknown(7)));
                            continue;
                        }
                        let id = *flights.keys().nth(pick % flights.len()).unwrap();
                        let (_, _, qos, released) = flights[&id];
                        match (qos, released) {
                            (1, _) => {
                                prop_assert_eq!(out.puback(id).map(|_| ()), Ok(()));
                                flights.remove(&id);
                                finished += 1;
                            }
                            (_, false) => {
                                prop_assert_eq!(out.pubrec(id).map(|_| ()), Ok(()));
                                flights.get_mut(&id).unwrap().3 = true;
                            }
                            (_, true) => {
                                prop_assert_eq!(out.pubcomp(id).map(|_| ()), Ok(()));
                                flights.remove(&id);
                                finished += 1;
                            }
                        }
                        expect_resend.retain(|r| flights.contains_key(r));
                    }
                    Op::Tick(ms) => now += ms,
                    Op::Reconnect(rm) => {
                        out.disconnected();
                        receive_maximum = rm;
                        out.connected(rm);
                        let mut order: Vec<(u64, u16)> =
                            flights.iter().map(|(id, f)| (f.0, *id)).collect();
                        order.sort_unstable();
                        expect_resend = order.into_iter().map(|(_, id)| id).collect();
                    }
                }
                prop_assert!(out.queued() <= LIMITS.max_queued);
                prop_assert!(out.queued_bytes() <= LIMITS.max_queued_bytes);
                prop_assert_eq!(out.inflight(), flights.len());
                let d = out.dropped();
                prop_assert_eq!(
                    pushed,
                    finished + flights.len() as u64 + out.queued() as u64
                        + d.queue_full + d.total_full + d.offline + d.expired,
                    "a message is unaccounted for"
                );
                // Held: the queue, and what is in flight until acknowledged or released.
                let in_flight: usize = flights
                    .values()
                    .filter(|f| !f.3)
                    .map(|f| sizes[&f.1])
                    .sum();
                prop_assert_eq!(out.held_bytes(), out.queued_bytes() + in_flight);
                prop_assert_eq!(budget.used(), out.held_bytes());
                prop_assert!(budget.used() <= budget_limit);
            }
            drop(out);
            prop_assert_eq!(budget.used(), 0, "a dropped queue gives its bytes back");
        }
    }
}
