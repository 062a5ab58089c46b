//! The broker: sessions, subscriptions, retained messages and fan-out, in process. Every
//! connection (a device through the front, the gateway's own in-process links) attaches to a
//! session here, publishes into it and takes the packets due to its client from it.
//!
//! It ties the pure parts together: [`Sessions`] (who holds which session, expiry, wills,
//! takeover), [`Subscriptions`] (the topic trie), [`Retained`] and one [`Outbound`] per
//! session (queue, window, QoS states).
//!
//! Guarantees:
//! - A publish reaches every session with a matching subscription once (overlapping filters
//!   included), at the lower of the publish's and the subscription's QoS (MQTT 5 §3.8.4), with
//!   the publisher's properties unchanged, the remaining expiry, and the subscriptions'
//!   identifiers; No Local, Retain As Published and Retain Handling are applied.
//! - A session taken over has its connection told to close with 0x8E (§3.14.2.1) and gets no
//!   more packets; a kept session keeps its subscriptions and queues QoS 1/2 messages while
//!   its client is away, within its queue's bounds (drops are counted).
//! - A new subscriber gets every retained message its filter matches, fed into its queue as
//!   the queue drains, so none is lost to the queue bound (§3.3.1.3).
//! - Memory is bounded: sessions, subscriptions, retained messages and every queue have
//!   limits; a payload is shared by all its deliveries, never copied per subscriber.
//! - A connection that goes away (returned, dropped, or its task aborted or panicking)
//!   detaches from its session: nothing it did wedges the broker. Its state is behind one
//!   mutex held only for in-memory work, and a poisoned lock is recovered (the pure parts
//!   keep their invariants on every return path).
//!
//! - With a [`Persister`] (a gateway's broker), every change to a kept session (one whose
//!   expiry is not 0: its expiry, subscriptions, and QoS 1/2 messages queued or in flight)
//!   and to the retained messages is recorded in the order it happens, and the state read
//!   back at start is where it resumes: [`Connection::publish`] says what to wait for before
//!   the publish may be acknowledged.
//!
//! Does not: touch the network or the disk itself (the front journals device publishes
//! before they are acknowledged; [`super::durable`] writes what is recorded here).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::access::Rules;
use super::acl::{Access, Acl};
use super::durable::{self, Persister, Recorder};
use super::frame::Version;
use super::outbound::{self, Budget, Outbound, Pushed};
use super::packets::{self, OutgoingPublish};
use super::retained::{self, Retained, Stored};
use super::sessions::{self, ConnectionId, Effect, Ending, Expiry, SessionId, Sessions};
use super::subscriptions::{self, Options, SubscribeError, Subscriptions};
use crate::journal::Committed;
use crate::metrics::Metrics;

/// The broker's bounds (each one a `[broker]` configuration key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sessions kept beyond their connection, and the longest expiry granted.
    pub sessions: sessions::Limits,
    /// Subscriptions per session and in total.
    pub subscriptions: subscriptions::Limits,
    /// Retained messages, in count and bytes.
    pub retained: retained::Limits,
    /// Messages waiting in one session's queue behind its window.
    pub max_queued_messages: usize,
    /// Bytes waiting in one session's queue behind its window.
    pub max_queued_bytes: usize,
    /// Bytes of messages held for all sessions together, queued or in flight.
    pub max_queued_bytes_total: usize,
    /// Most unacknowledged QoS 1/2 messages to a client that did not say (3.1.1, or MQTT 5
    /// without Receive Maximum); an MQTT 5 client's own Receive Maximum is honoured up to it.
    pub max_inflight: u16,
}

/// What a connection asks for in its CONNECT.
#[derive(Clone, Debug)]
pub struct Attach {
    /// The client id; empty: the broker assigns one (Clean Start required on 3.1.1, checked
    /// by the caller).
    pub client_id: String,
    /// Clean Start (MQTT 5) or Clean Session (3.1.1).
    pub clean_start: bool,
    /// When the session ends after the connection.
    pub expiry: Expiry,
    /// The will.
    pub will: Option<sessions::Will>,
    /// The connection's protocol version (how packets are encoded for it).
    pub version: Version,
    /// The client's Receive Maximum (MQTT 5), if it sent one.
    pub receive_maximum: Option<u16>,
    /// The client's Maximum Packet Size (MQTT 5), if it sent one.
    pub max_packet_size: Option<u32>,
    /// Who connects: the ACL decides for a device by its username.
    pub owner: Owner,
}

/// Whose a session is, for the access rules ([`Broker::set_acl`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The gateway's own links: no access rule applies to them.
    Gateway,
    /// A device, with the username it logged in with (`None`: anonymous).
    Device(Option<Arc<str>>),
}

impl Owner {
    /// The owner of a session read back from disk: the gateway's own ids are the gateway's
    /// (no device may use them), any other is the device that last used it.
    fn restored(client_id: &str, username: Option<Arc<str>>) -> Owner {
        if super::checks::reserved_client_id(client_id) {
            Owner::Gateway
        } else {
            Owner::Device(username)
        }
    }

    /// The username to keep on disk.
    fn username(&self) -> Option<&Arc<str>> {
        match self {
            Owner::Gateway => None,
            Owner::Device(username) => username.as_ref(),
        }
    }
}

/// Whether `rules` let the client of `owner` and `client_id` have `access` to `topic` (the
/// gateway's own sessions are not asked).
fn permitted(rules: &Rules, owner: &Owner, client_id: &str, topic: &str, access: Access) -> bool {
    match owner {
        Owner::Gateway => true,
        Owner::Device(username) => rules.allows(username.as_deref(), client_id, topic, access),
    }
}

/// Why the broker refused a connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// Too many sessions are kept already.
    #[error(transparent)]
    Sessions(#[from] sessions::Refused),
}

/// A publish as the broker takes it in.
#[derive(Clone, Debug)]
pub struct Publish {
    /// A valid topic name (no wildcards).
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// MQTT 5 properties to pass on, as encoded (without topic alias and expiry).
    pub properties: Bytes,
    /// MQTT 5 Message Expiry Interval, in seconds.
    pub message_expiry: Option<u32>,
}

/// The reason code a connection is told to close with, from outside its own task.
#[derive(Debug, Default)]
struct Signal {
    /// Woken when packets are due or the connection must close.
    ready: Notify,
    /// 0: keep going; otherwise the MQTT 5 reason code to close with.
    close: AtomicU8,
}

/// A retained message owed to a new subscriber, fed into its queue as the queue drains.
#[derive(Debug)]
struct OwedRetained {
    topic: Arc<str>,
    qos: u8,
    subscription_ids: Arc<[u32]>,
}

#[derive(Debug)]
struct Attached {
    connection: ConnectionId,
    signal: Arc<Signal>,
    version: Version,
    max_packet_size: Option<u32>,
}

#[derive(Debug)]
struct Client {
    client_id: Arc<str>,
    /// Whose it is: its deliveries are checked against the ACL as this owner's.
    owner: Owner,
    /// Whether its session is kept on disk (it is kept beyond its connection, and the broker
    /// has a [`Persister`]).
    durable: bool,
    outbound: Outbound,
    attached: Option<Attached>,
    owed_retained: VecDeque<OwedRetained>,
    /// Packet ids of the client's QoS 2 publishes that are journaled and acknowledged with
    /// PUBREC and not yet released by its PUBREL (MQTT 5 §4.3.3: the receiver's part of
    /// the session state), oldest first, at most [`MAX_INCOMING_QOS2`].
    incoming_qos2: VecDeque<u16>,
}

impl Client {
    fn new(client_id: Arc<str>, owner: Owner, durable: bool, outbound: Outbound) -> Client {
        Client {
            client_id,
            owner,
            durable,
            outbound,
            attached: None,
            owed_retained: VecDeque::new(),
            incoming_qos2: VecDeque::new(),
        }
    }
}

#[derive(Debug)]
struct State {
    sessions: Sessions,
    subscriptions: Subscriptions,
    retained: Retained,
    clients: HashMap<SessionId, Client>,
    signals: HashMap<ConnectionId, Arc<Signal>>,
    next_connection: ConnectionId,
    /// The durable id of the next QoS 1/2 message queued for a kept session.
    next_message_id: u64,
}

/// The broker (see the module documentation). Share it behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    state: Mutex<State>,
    limits: Limits,
    metrics: Arc<Metrics>,
    store: Option<Persister>,
    /// The bytes all sessions' queues hold together.
    budget: Budget,
    /// The access rules (`broker.acl_file`, `broker.admins`). Apart from the state, so that
    /// the front's check of a publish does not wait for the state's lock (taken after the
    /// state's lock where both are held).
    rules: RwLock<Arc<Rules>>,
}

/// What [`Broker::attach`] gives a connection.
#[derive(Debug)]
pub struct Attachment {
    /// The connection's handle on its session.
    pub connection: Connection,
    /// CONNACK's Session Present.
    pub session_present: bool,
    /// The client id the broker chose, when the client sent none.
    pub assigned_client_id: Option<String>,
    /// The session expiry granted, when it is lower than the one asked for (MQTT 5 sends it
    /// in CONNACK).
    pub granted_expiry: Option<u32>,
}

/// One connection's hold on its session. Dropping it detaches the session as an abnormal end
/// (the will is published) unless [`Connection::disconnect`] said otherwise first.
#[derive(Debug)]
pub struct Connection {
    broker: Arc<Broker>,
    session: SessionId,
    id: ConnectionId,
    client_id: Arc<str>,
    signal: Arc<Signal>,
    detached: bool,
}

/// Most owed retained messages moved into a queue at once: enough to keep the window full,
/// few enough that the queue's bound is never what drops them.
const RETAINED_FEED: usize = 32;

/// Most QoS 2 publishes of one client remembered as received and not yet released: a client
/// that never sends PUBREL for older ones cannot grow its session without bound. Forgetting
/// the oldest one can only make its resend a duplicate, never lose it.
pub const MAX_INCOMING_QOS2: usize = 1024;

fn now_ms() -> u64 {
    crate::event::now_ms()
}

fn expiry_secs(expiry: Expiry) -> u32 {
    match expiry {
        Expiry::AtDisconnect => 0,
        Expiry::After(secs) => secs,
        Expiry::Never => u32::MAX,
    }
}

impl Broker {
    /// An empty broker with these bounds.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Broker> {
        Arc::new(Broker::empty(limits, metrics, None))
    }

    fn empty(limits: Limits, metrics: Arc<Metrics>, store: Option<Persister>) -> Broker {
        Broker {
            state: Mutex::new(State {
                sessions: Sessions::new(limits.sessions),
                subscriptions: Subscriptions::new(limits.subscriptions),
                retained: Retained::new(limits.retained),
                clients: HashMap::new(),
                signals: HashMap::new(),
                next_connection: 1,
                next_message_id: 1,
            }),
            rules: RwLock::new(Arc::new(Rules::open())),
            limits,
            metrics,
            store,
            budget: Budget::new(limits.max_queued_bytes_total),
        }
    }

    /// A broker that keeps its state on disk with `store`, resuming from `snapshot` (what
    /// the store read back). What today's limits do not admit is left out, removed from the
    /// disk and counted in `broker_not_restored`.
    pub fn restore(
        limits: Limits,
        metrics: Arc<Metrics>,
        store: Persister,
        snapshot: durable::Snapshot,
    ) -> Arc<Broker> {
        let now = now_ms();
        let broker = Broker::empty(limits, metrics, Some(store));
        let mut not_restored = 0u64;
        {
            let mut guard = broker.lock();
            let state = &mut *guard;
            let mut record = broker.record();
            state.next_message_id = snapshot.next_message_id.max(1);
            for kept in snapshot.sessions {
                let client_id = kept.client_id;
                let Some(session) =
                    state
                        .sessions
                        .restore(client_id.clone(), kept.expiry, kept.ends_at_ms, now)
                else {
                    not_restored += 1;
                    if let Some(r) = record.as_mut() {
                        r.session_ended(&client_id);
                    }
                    continue;
                };
                for (filter, byte, identifier) in kept.subscriptions {
                    let restored = Options::from_byte(byte, identifier).is_some_and(|options| {
                        state
                            .subscriptions
                            .subscribe(session, &filter, options)
                            .is_ok()
                    });
                    if !restored {
                        not_restored += 1;
                        if let Some(r) = record.as_mut() {
                            r.unsubscribed(&client_id, &filter);
                        }
                    }
                }
                let outbound =
                    Outbound::restore(broker.queue_limits(limits.max_inflight), kept.messages)
                        .sharing(&broker.budget);
                let owner = Owner::restored(&client_id, kept.username);
                let mut client = Client::new(client_id, owner, true, outbound);
                client.incoming_qos2 = kept.incoming_qos2.into_iter().collect();
                state.clients.insert(session, client);
            }
            for (topic, message) in snapshot.retained {
                if let Stored::Refused(_) = state.retained.publish(&topic, message) {
                    not_restored += 1;
                    if let Some(r) = record.as_mut() {
                        r.retained_cleared(&topic);
                    }
                }
            }
        }
        Metrics::add(&broker.metrics.broker_not_restored, not_restored);
        Arc::new(broker)
    }

    /// Records changes to the durable state, if the broker keeps one; call it while holding
    /// the state's lock.
    fn record(&self) -> Option<Recorder<'_>> {
        self.store.as_ref().map(Persister::record)
    }

    fn queue_limits(&self, receive_maximum: u16) -> outbound::Limits {
        outbound::Limits {
            receive_maximum,
            max_queued: self.limits.max_queued_messages,
            max_queued_bytes: self.limits.max_queued_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the pure parts half-updated in a way
        // that matters more than refusing every later client would.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Attaches a connection that sent `attach` to its session (taking it over from another
    /// connection, resuming it or starting it).
    pub fn attach(self: &Arc<Self>, attach: Attach) -> Result<Attachment, AttachError> {
        let now = now_ms();
        let mut state = self.lock();
        let id = state.next_connection;
        state.next_connection += 1;
        let assigned_client_id = attach
            .client_id
            .is_empty()
            .then(|| format!("auto-{}-{id}", std::process::id()));
        let client_id: Arc<str> = Arc::from(
            assigned_client_id
                .as_deref()
                .unwrap_or(attach.client_id.as_str()),
        );
        let asked = attach.expiry;
        let accepted = state.sessions.connect(
            id,
            sessions::Connect {
                client_id: client_id.clone(),
                clean_start: attach.clean_start,
                expiry: asked,
                will: attach.will,
            },
        )?;
        self.apply(&mut state, accepted.effects, now);
        let signal = Arc::new(Signal::default());
        state.signals.insert(id, signal.clone());
        let receive_maximum = attach
            .receive_maximum
            .unwrap_or(self.limits.max_inflight)
            .clamp(1, self.limits.max_inflight.max(1));
        let attached = Attached {
            connection: id,
            signal: signal.clone(),
            version: attach.version,
            max_packet_size: attach.max_packet_size,
        };
        let limits = self.queue_limits(receive_maximum);
        let durable = self.store.is_some() && accepted.expiry != Expiry::AtDisconnect;
        let mut record = self.record();
        match state.clients.get_mut(&accepted.session) {
            Some(client) if accepted.session_present => {
                client.outbound.connected(receive_maximum);
                client.attached = Some(attached);
                // Resumed, perhaps under another username: what it receives from now on is
                // what the new owner may read (checked again at every send).
                client.owner = attach.owner.clone();
                if client.durable && !durable {
                    // Resumed with expiry 0: it ends with this connection, so it leaves the disk.
                    if let Some(r) = record.as_mut() {
                        r.session_ended(&client_id);
                    }
                }
                client.durable = durable;
            }
            _ => {
                let outbound = Outbound::new(limits, true).sharing(&self.budget);
                let mut client =
                    Client::new(client_id.clone(), attach.owner.clone(), durable, outbound);
                client.attached = Some(attached);
                state.clients.insert(accepted.session, client);
            }
        }
        if let (true, Some(r)) = (durable, record.as_mut()) {
            r.session_saved(&client_id, accepted.expiry, None, attach.owner.username());
        }
        drop(record);
        let granted = expiry_secs(accepted.expiry);
        Ok(Attachment {
            connection: Connection {
                broker: self.clone(),
                session: accepted.session,
                id,
                client_id,
                signal,
                detached: false,
            },
            session_present: accepted.session_present,
            assigned_client_id,
            granted_expiry: (granted < expiry_secs(asked)).then_some(granted),
        })
    }

    /// Replaces the access rules: from now on every publish, subscription and delivery to
    /// a device's session is checked against `rules`. Messages already queued are checked
    /// again as they are sent.
    pub fn set_rules(&self, rules: Rules) {
        *self
            .rules
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(rules);
    }

    /// Replaces the ACL of the rules in force (a reloaded file), keeping the admins.
    pub fn set_acl(&self, acl: Option<Arc<Acl>>) {
        let mut rules = self
            .rules
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *rules = Arc::new(rules.with_acl(acl));
    }

    /// The access rules in force.
    fn rules(&self) -> Arc<Rules> {
        self.rules
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether a device with `username` and `client_id` may publish to `topic` (its will
    /// included) under the rules in force.
    pub fn may_write(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.rules()
            .allows(username, client_id, topic, Access::Write)
    }

    /// Publishes the wills that are due, ends expired sessions and drops expired retained
    /// messages; returns when it has something to do next, if ever (ms since the epoch).
    pub fn tick(&self) -> Option<u64> {
        let now = now_ms();
        let mut state = self.lock();
        let effects = state.sessions.tick(now);
        self.apply(&mut state, effects, now);
        state.retained.expire(now);
        let gauges = [
            (&self.metrics.broker_sessions, state.sessions.len()),
            (
                &self.metrics.broker_subscriptions,
                state.subscriptions.len(),
            ),
            (&self.metrics.broker_retained_messages, state.retained.len()),
            (&self.metrics.broker_retained_bytes, state.retained.bytes()),
            (&self.metrics.broker_queued_bytes, self.budget.used()),
        ];
        for (gauge, value) in gauges {
            gauge.store(value as u64, Ordering::Relaxed);
        }
        state.sessions.next_due_ms()
    }

    fn apply(&self, state: &mut State, effects: Vec<Effect>, now: u64) {
        for effect in effects {
            match effect {
                Effect::CloseTakenOver(connection) => {
                    if let Some(signal) = state.signals.remove(&connection) {
                        signal
                            .close
                            .store(super::checks::reason::SESSION_TAKEN_OVER, Ordering::Relaxed);
                        signal.ready.notify_one();
                    }
                }
                Effect::PublishWill(will) => {
                    let publish = Publish {
                        topic: will.topic,
                        payload: will.payload,
                        qos: will.qos,
                        retain: will.retain,
                        properties: will.properties,
                        message_expiry: will.message_expiry,
                    };
                    self.route(state, None, &publish, now, None);
                }
                Effect::EndSession(session) => {
                    state.subscriptions.remove_session(session);
                    if let Some(client) = state.clients.remove(&session) {
                        if let (true, Some(mut r)) = (client.durable, self.record()) {
                            r.session_ended(&client.client_id);
                        }
                    }
                }
            }
        }
    }

    /// Stores a retained publish and queues a copy for every matching session (only for
    /// `only`, when given); returns whether it changed the durable state.
    fn route(
        &self,
        state: &mut State,
        from: Option<SessionId>,
        publish: &Publish,
        now: u64,
        only: Option<SessionId>,
    ) -> bool {
        let expires_at_ms = publish
            .message_expiry
            .map(|secs| now + u64::from(secs) * 1000);
        let mut record = None;
        if publish.retain {
            let message = retained::Message {
                payload: publish.payload.clone(),
                qos: publish.qos,
                properties: publish.properties.clone(),
                expires_at_ms,
            };
            let stored = state.retained.publish(&publish.topic, message.clone());
            match stored {
                Stored::Refused(_) => Metrics::add(&self.metrics.broker_retained_refused, 1),
                Stored::New | Stored::Replaced => {
                    if let Some(r) = self.record().map(|r| record.insert(r)) {
                        r.retained_set(&publish.topic, &message);
                    }
                }
                Stored::Cleared(true) => {
                    if let Some(r) = self.record().map(|r| record.insert(r)) {
                        r.retained_cleared(&publish.topic);
                    }
                }
                Stored::Cleared(false) => {}
            }
        }
        let rules = self.rules();
        let publisher = from
            .and_then(|session| state.clients.get(&session))
            .map(|client| client.client_id.clone());
        for delivery in state.subscriptions.matches(&publish.topic, from) {
            if only.is_some_and(|session| session != delivery.session) {
                continue;
            }
            let Some(client) = state.clients.get_mut(&delivery.session) else {
                continue;
            };
            if !self.may_deliver(&rules, client, &publish.topic) {
                continue;
            }
            let qos = publish.qos.min(delivery.qos);
            let message = outbound::Message {
                topic: publish.topic.clone(),
                payload: publish.payload.clone(),
                qos,
                retain: publish.retain && delivery.retain_as_published,
                expires_at_ms,
                properties: publish.properties.clone(),
                subscription_ids: Arc::from(delivery.identifiers),
                id: next_id(client, qos, &mut state.next_message_id),
                publisher: match client.owner {
                    Owner::Gateway => publisher.clone(),
                    Owner::Device(_) => None,
                },
            };
            if self.push(client, message.clone()) && message.id != 0 {
                if record.is_none() {
                    record = self.record();
                }
                if let Some(r) = record.as_mut() {
                    r.queued(&client.client_id, &message);
                }
            }
        }
        record.is_some()
    }

    /// Moves owed retained messages into the client's queue while it is short.
    fn feed_retained(
        &self,
        client: &mut Client,
        retained: &Retained,
        rules: &Rules,
        next_message_id: &mut u64,
        now: u64,
    ) {
        let most = RETAINED_FEED.min(self.limits.max_queued_messages);
        while client.outbound.queued() < most {
            let Some(owed) = client.owed_retained.pop_front() else {
                return;
            };
            let Some(message) = retained.get(&owed.topic, now) else {
                continue;
            };
            if !self.may_deliver(rules, client, &owed.topic) {
                continue;
            }
            let bytes = owed.topic.len() + message.payload.len() + message.properties.len();
            let over_session = client.outbound.queued() > 0
                && client.outbound.queued_bytes() + bytes > self.limits.max_queued_bytes;
            let over_total =
                self.budget.used().saturating_add(bytes) > self.limits.max_queued_bytes_total;
            if over_session || over_total {
                // No room for it yet: it waits for the queue (or the others) to drain; the
                // client's next packet or acknowledgement feeds it again.
                client.owed_retained.push_front(owed);
                return;
            }
            let qos = message.qos.min(owed.qos);
            let message = outbound::Message {
                topic: owed.topic,
                payload: message.payload.clone(),
                qos,
                // Retained messages sent for a new subscription carry the flag (§3.3.1.3).
                retain: true,
                expires_at_ms: message.expires_at_ms,
                properties: message.properties.clone(),
                subscription_ids: owed.subscription_ids,
                id: next_id(client, qos, next_message_id),
                publisher: None,
            };
            if self.push(client, message.clone()) && message.id != 0 {
                if let Some(mut r) = self.record() {
                    r.queued(&client.client_id, &message);
                }
            }
        }
    }

    /// Queues `message` for the client; returns whether it was queued (or dropped, counted).
    fn push(&self, client: &mut Client, message: outbound::Message) -> bool {
        match client.outbound.push(message) {
            Pushed::Queued => {
                if let Some(attached) = &client.attached {
                    attached.signal.ready.notify_one();
                }
                true
            }
            Pushed::Dropped(outbound::DropReason::QueueFull) => {
                Metrics::add(&self.metrics.broker_dropped_queue_full, 1);
                false
            }
            Pushed::Dropped(outbound::DropReason::TotalFull) => {
                Metrics::add(&self.metrics.broker_dropped_total_full, 1);
                false
            }
            Pushed::Dropped(outbound::DropReason::Offline) => {
                Metrics::add(&self.metrics.broker_dropped_offline, 1);
                false
            }
        }
    }

    /// Whether `client` may read `topic` under `rules` (the gateway's own sessions always
    /// may); a refusal is counted.
    fn may_deliver(&self, rules: &Rules, client: &Client, topic: &str) -> bool {
        let allowed = permitted(rules, &client.owner, &client.client_id, topic, Access::Read);
        if !allowed {
            Metrics::add(&self.metrics.acl_denied_deliveries, 1);
        }
        allowed
    }

    /// Forgets on disk the kept messages of `client` that are done with.
    fn forget(&self, client: &Client, ids: Vec<u64>) {
        if ids.is_empty() || !client.durable {
            return;
        }
        if let Some(mut r) = self.record() {
            for id in ids.into_iter().filter(|id| *id != 0) {
                r.done(&client.client_id, id);
            }
        }
    }
}

/// The durable id for a message of `qos` queued for `client`: a new one if it is kept on
/// disk (QoS 1/2 for a kept session), else 0.
fn next_id(client: &Client, qos: u8, next_message_id: &mut u64) -> u64 {
    if client.durable && qos > 0 {
        let id = *next_message_id;
        *next_message_id += 1;
        id
    } else {
        0
    }
}

/// The result of one filter of a SUBSCRIBE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granted {
    /// Subscribed at this QoS.
    Qos(u8),
    /// Refused: a limit of the broker or the session.
    Quota,
    /// Refused: not a valid filter.
    InvalidFilter,
    /// Refused: the ACL grants no read through this filter.
    NotAuthorized,
}

impl Granted {
    /// The SUBACK code for it (3.1.1 has only 0x80 for a failure).
    pub fn code(self, version: Version) -> u8 {
        match (self, version) {
            (Granted::Qos(qos), _) => qos,
            (_, Version::V4) => 0x80,
            (Granted::Quota, Version::V5) => 0x97,
            (Granted::InvalidFilter, Version::V5) => 0x8F,
            (Granted::NotAuthorized, Version::V5) => 0x87,
        }
    }
}

/// An acknowledgement from the client of a packet the broker sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAck {
    /// PUBACK (QoS 1 delivered).
    Puback(u16),
    /// PUBREC (QoS 2 received; the broker answers PUBREL).
    Pubrec(u16),
    /// PUBCOMP (QoS 2 delivered).
    Pubcomp(u16),
}

impl Connection {
    /// The client id of the session (the assigned one, if the broker chose it).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Publishes from this connection's client. For a QoS 1/2 publish that changed the
    /// durable state, returns what fires once that change is on disk: the publish may be
    /// acknowledged then (and not before, if it is to survive a crash).
    pub fn publish(&self, publish: &Publish) -> Option<Committed> {
        let now = now_ms();
        let mut state = self.broker.lock();
        let changed = self
            .broker
            .route(&mut state, Some(self.session), publish, now, None);
        if changed && publish.qos > 0 {
            return self.broker.record().map(|mut r| r.committed());
        }
        None
    }

    /// Publishes from this connection's client to the client `client_id` only (to its
    /// subscriptions that match, under its read rights), not retained: a reply to one
    /// requester that no other subscriber sees. Nothing happens when that client has no
    /// session.
    pub fn publish_to(&self, client_id: &str, publish: &Publish) {
        let now = now_ms();
        let mut state = self.broker.lock();
        let Some((target, _)) = state.sessions.get(client_id) else {
            return;
        };
        let publish = Publish {
            retain: false,
            ..publish.clone()
        };
        self.broker
            .route(&mut state, Some(self.session), &publish, now, Some(target));
    }

    /// Whether the client's QoS 2 publish with this packet id was received (journaled and
    /// acknowledged, on this connection or an earlier one of the session) and not yet
    /// released: a publish sent again with it is a duplicate (MQTT 5 §4.3.3).
    pub fn incoming_qos2_open(&self, packet_id: u16) -> bool {
        let state = self.broker.lock();
        state
            .clients
            .get(&self.session)
            .is_some_and(|c| c.incoming_qos2.contains(&packet_id))
    }

    /// The client's QoS 2 publish with this packet id is journaled: it is remembered until its
    /// PUBREL. For a kept session, returns what fires once that is on disk; its PUBREC may go
    /// then (and not before, or a resend after a crash would be journaled twice).
    pub fn incoming_qos2_received(&self, packet_id: u16) -> Option<Committed> {
        let mut state = self.broker.lock();
        let client = state.clients.get_mut(&self.session)?;
        if client.incoming_qos2.contains(&packet_id) {
            return None;
        }
        if client.incoming_qos2.len() >= MAX_INCOMING_QOS2 {
            if let Some(oldest) = client.incoming_qos2.pop_front() {
                if let (true, Some(mut r)) = (client.durable, self.broker.record()) {
                    r.qos2_released(&client.client_id, oldest);
                }
            }
        }
        client.incoming_qos2.push_back(packet_id);
        if !client.durable {
            return None;
        }
        let mut record = self.broker.record()?;
        record.qos2_received(&client.client_id, packet_id);
        Some(record.committed())
    }

    /// The client released its QoS 2 publish with this packet id (PUBREL). For a kept session
    /// that remembered it, returns what fires once that is on disk; its PUBCOMP may go then
    /// (and not before: after PUBCOMP the client may use the packet id for a new publish,
    /// which a crash must not make look like a duplicate).
    pub fn incoming_qos2_released(&self, packet_id: u16) -> Option<Committed> {
        let mut state = self.broker.lock();
        let client = state.clients.get_mut(&self.session)?;
        let at = client
            .incoming_qos2
            .iter()
            .position(|id| *id == packet_id)?;
        client.incoming_qos2.remove(at);
        if !client.durable {
            return None;
        }
        let mut record = self.broker.record()?;
        record.qos2_released(&client.client_id, packet_id);
        Some(record.committed())
    }

    /// Subscribes the session to each `(filter, options byte)` with the SUBSCRIBE's
    /// subscription `identifier`; returns what each filter got, in order. Retained messages
    /// the new subscriptions match are owed to the client from now on.
    pub fn subscribe(&self, identifier: Option<u32>, filters: &[(String, u8)]) -> Vec<Granted> {
        let now = now_ms();
        let rules = self.broker.rules();
        let mut guard = self.broker.lock();
        let state = &mut *guard;
        let mut granted = Vec::with_capacity(filters.len());
        for (filter, byte) in filters {
            let Some(options) = Options::from_byte(*byte, identifier) else {
                granted.push(Granted::InvalidFilter);
                continue;
            };
            let owner = state.clients.get(&self.session).map(|c| &c.owner);
            if let Some(Owner::Device(username)) = owner {
                // A shared subscription reads what its filter would.
                let (_, inner) = subscriptions::split_share(filter);
                if !rules.allows_subscribe(username.as_deref(), &self.client_id, inner) {
                    Metrics::add(&self.broker.metrics.acl_denied_subscriptions, 1);
                    granted.push(Granted::NotAuthorized);
                    continue;
                }
            }
            let subscribed = match state.subscriptions.subscribe(self.session, filter, options) {
                Ok(subscribed) => {
                    if let Some(client) = state.clients.get(&self.session).filter(|c| c.durable) {
                        if let Some(mut r) = self.broker.record() {
                            r.subscribed(&client.client_id, filter, *byte, identifier);
                        }
                    }
                    subscribed
                }
                Err(SubscribeError::SessionLimit { .. } | SubscribeError::BrokerLimit { .. }) => {
                    Metrics::add(&self.broker.metrics.broker_subscriptions_refused, 1);
                    granted.push(Granted::Quota);
                    continue;
                }
                Err(SubscribeError::InvalidFilter | SubscribeError::NoLocalOnShared) => {
                    granted.push(Granted::InvalidFilter);
                    continue;
                }
            };
            granted.push(Granted::Qos(options.qos));
            let new = subscribed == subscriptions::Subscribed::New;
            let send_retained = !filter.starts_with("$share/")
                && match options.retain_handling {
                    0 => true,
                    1 => new,
                    _ => false,
                };
            if !send_retained {
                continue;
            }
            let ids: Arc<[u32]> = Arc::from(options.identifier.into_iter().collect::<Vec<_>>());
            let topics = state.retained.matching(filter, now);
            let Some(client) = state.clients.get_mut(&self.session) else {
                continue;
            };
            let room = self
                .broker
                .limits
                .retained
                .max_messages
                .saturating_sub(client.owed_retained.len());
            if topics.len() > room {
                Metrics::add(
                    &self.broker.metrics.broker_dropped_queue_full,
                    (topics.len() - room) as u64,
                );
            }
            client
                .owed_retained
                .extend(topics.into_iter().take(room).map(|topic| OwedRetained {
                    topic,
                    qos: options.qos,
                    subscription_ids: ids.clone(),
                }));
        }
        if let Some(attached) = state
            .clients
            .get(&self.session)
            .and_then(|c| c.attached.as_ref())
        {
            attached.signal.ready.notify_one();
        }
        granted
    }

    /// Removes the session's subscription to each filter; whether each existed, in order.
    pub fn unsubscribe(&self, filters: &[String]) -> Vec<bool> {
        let mut guard = self.broker.lock();
        let state = &mut *guard;
        let durable = state
            .clients
            .get(&self.session)
            .filter(|c| c.durable)
            .map(|c| c.client_id.clone());
        let mut record = durable.as_ref().and_then(|_| self.broker.record());
        filters
            .iter()
            .map(|filter| {
                let removed = state.subscriptions.unsubscribe(self.session, filter);
                if let (true, Some(client), Some(r)) = (removed, &durable, record.as_mut()) {
                    r.unsubscribed(client, filter);
                }
                removed
            })
            .collect()
    }

    /// The client acknowledged a packet the broker sent; an acknowledgement for a packet id
    /// nothing waits for is ignored, as a late duplicate would be. For a PUBREC of a kept
    /// session's message, returns what fires once its release is on disk: the PUBREL may go
    /// then (and not before: after PUBREL the client forgets the packet id, so a resend of
    /// the PUBLISH after a crash would reach it as a new message).
    pub fn acknowledge(&self, ack: ClientAck) -> Option<Committed> {
        let mut state = self.broker.lock();
        let client = state.clients.get_mut(&self.session)?;
        let mut stored = None;
        match ack {
            ClientAck::Puback(id) | ClientAck::Pubcomp(id) => {
                let done = match ack {
                    ClientAck::Puback(_) => client.outbound.puback(id),
                    _ => client.outbound.pubcomp(id),
                };
                if let (Ok(mid @ 1..), true) = (done, client.durable) {
                    if let Some(mut r) = self.broker.record() {
                        r.done(&client.client_id, mid);
                    }
                }
            }
            ClientAck::Pubrec(id) => {
                let released = client.outbound.pubrec(id);
                if let (Ok(mid @ 1..), true) = (released, client.durable) {
                    if let Some(mut r) = self.broker.record() {
                        r.released(&client.client_id, mid);
                        stored = Some(r.committed());
                    }
                }
            }
        }
        if let Some(attached) = &client.attached {
            // The window moved: more may go now.
            attached.signal.ready.notify_one();
        }
        stored
    }

    /// Encodes into `out` the packets due to the client now, until about `max_bytes` are
    /// there. A publish larger than the client's Maximum Packet Size is not sent to it (MQTT
    /// 5 §3.1.2.11.4): it is counted and, for QoS 1/2, completed as if acknowledged.
    ///
    /// When `out` holds the first send of a kept session's QoS 2 message, returns what fires
    /// once its packet id is on disk: `out` may be written then (and not before: a resend
    /// after a crash must carry the packet id the client saw, or the client would take it
    /// for a new message). A QoS 1 message is written at once (a crash then can only resend
    /// it under a new packet id: a duplicate, which QoS 1 allows).
    pub fn take(&self, out: &mut BytesMut, max_bytes: usize) -> Option<Committed> {
        let now = now_ms();
        let rules = self.broker.rules();
        let mut guard = self.broker.lock();
        let state = &mut *guard;
        let client = state.clients.get_mut(&self.session)?;
        let attached = client.attached.as_ref()?;
        if attached.connection != self.id {
            return None;
        }
        let (version, max_packet_size) = (attached.version, attached.max_packet_size);
        let mut must_be_stored = false;
        while out.len() < max_bytes {
            self.broker.feed_retained(
                client,
                &state.retained,
                &rules,
                &mut state.next_message_id,
                now,
            );
            let expired_before = client.outbound.dropped().expired;
            let next = client.outbound.next(now);
            let expired = client.outbound.dropped().expired - expired_before;
            if expired > 0 {
                Metrics::add(&self.broker.metrics.broker_dropped_expired, expired);
            }
            let gone = client.outbound.take_gone();
            self.broker.forget(client, gone);
            let Some(send) = next else {
                break;
            };
            match send {
                outbound::Send::Publish {
                    message,
                    packet_id,
                    dup,
                    expiry_secs,
                } => {
                    let publish = OutgoingPublish {
                        topic: &message.topic,
                        payload: &message.payload,
                        qos: message.qos,
                        retain: message.retain,
                        dup,
                        packet_id,
                        properties: &message.properties,
                        expiry_secs,
                        subscription_ids: &message.subscription_ids,
                    };
                    let too_large = max_packet_size
                        .is_some_and(|max| publish.encoded_len(version) > max as usize);
                    if too_large {
                        Metrics::add(&self.broker.metrics.broker_dropped_too_large, 1);
                        if let Some(mid) = packet_id.and_then(|id| client.outbound.complete(id)) {
                            self.broker.forget(client, vec![mid]);
                        }
                        continue;
                    }
                    // Checked again as it goes: the rules may have changed since it was
                    // queued, or the session's owner (a resumed session).
                    if !self.broker.may_deliver(&rules, client, &message.topic) {
                        if let Some(mid) = packet_id.and_then(|id| client.outbound.complete(id)) {
                            self.broker.forget(client, vec![mid]);
                        }
                        continue;
                    }
                    publish.encode(version, out);
                    if let (Some(id), false, 1.., true) =
                        (packet_id, dup, message.id, client.durable)
                    {
                        if let Some(mut r) = self.broker.record() {
                            r.sent(&client.client_id, message.id, id);
                            must_be_stored |= message.qos == 2;
                        }
                    }
                }
                outbound::Send::Pubrel { packet_id } => {
                    out.extend_from_slice(&packets::ack(packets::ack::PUBREL, packet_id));
                }
            }
        }
        if must_be_stored {
            self.broker.record().map(|mut r| r.committed())
        } else {
            None
        }
    }

    /// The messages due to an in-process client now (at most `max`): topic, payload and the
    /// publisher's client id, each completed at once as if the client had acknowledged it.
    pub fn take_messages(&self, max: usize) -> Vec<(Arc<str>, Bytes, Option<Arc<str>>)> {
        let now = now_ms();
        let rules = self.broker.rules();
        let mut guard = self.broker.lock();
        let state = &mut *guard;
        let mut taken = Vec::new();
        let Some(client) = state.clients.get_mut(&self.session) else {
            return taken;
        };
        if client
            .attached
            .as_ref()
            .is_none_or(|a| a.connection != self.id)
        {
            return taken;
        }
        while taken.len() < max {
            self.broker.feed_retained(
                client,
                &state.retained,
                &rules,
                &mut state.next_message_id,
                now,
            );
            let next = client.outbound.next(now);
            let mut gone = client.outbound.take_gone();
            match next {
                Some(outbound::Send::Publish {
                    message, packet_id, ..
                }) => {
                    gone.extend(packet_id.and_then(|id| client.outbound.complete(id)));
                    taken.push((message.topic, message.payload, message.publisher));
                }
                Some(outbound::Send::Pubrel { packet_id }) => {
                    gone.extend(client.outbound.complete(packet_id));
                }
                None => {
                    self.broker.forget(client, gone);
                    break;
                }
            }
            self.broker.forget(client, gone);
        }
        taken
    }

    /// Waits until packets may be due or the connection must close (check [`Connection::take`]
    /// and [`Connection::must_close`] after it returns).
    pub async fn ready(&self) {
        self.signal.ready.notified().await;
    }

    /// The MQTT 5 reason code the connection must close with, if it must (its session was
    /// taken over: 0x8E).
    pub fn must_close(&self) -> Option<u8> {
        match self.signal.close.load(Ordering::Relaxed) {
            0 => None,
            code => Some(code),
        }
    }

    /// The connection ended: `ending` says whether its will goes; `new_expiry` is MQTT 5's
    /// DISCONNECT Session Expiry Interval.
    pub fn disconnect(mut self, ending: Ending, new_expiry: Option<Expiry>) {
        self.detach(ending, new_expiry);
    }

    fn detach(&mut self, ending: Ending, new_expiry: Option<Expiry>) {
        if std::mem::replace(&mut self.detached, true) {
            return;
        }
        let now = now_ms();
        let mut state = self.broker.lock();
        state.signals.remove(&self.id);
        let mut was_attached = false;
        if let Some(client) = state.clients.get_mut(&self.session) {
            if client
                .attached
                .as_ref()
                .is_some_and(|a| a.connection == self.id)
            {
                client.attached = None;
                client.outbound.disconnected();
                was_attached = true;
            }
        }
        let effects =
            state
                .sessions
                .disconnected(&self.client_id, self.id, ending, new_expiry, now);
        self.broker.apply(&mut state, effects, now);
        let kept = state
            .clients
            .get(&self.session)
            .filter(|c| c.durable)
            .map(|c| c.owner.clone());
        if let (true, Some(owner), Some((expiry, ends_at))) = (
            was_attached,
            kept,
            state.sessions.expiry_of(&self.client_id),
        ) {
            if let Some(mut r) = self.broker.record() {
                // Its expiry counts from now on: a restart resumes the countdown.
                r.session_saved(&self.client_id, expiry, ends_at, owner.username());
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.detach(Ending::WithWill, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(max_queued_messages: usize) -> (Arc<Broker>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let limits = Limits {
            sessions: sessions::Limits {
                max_kept_sessions: 100,
                max_expiry_secs: None,
            },
            subscriptions: subscriptions::Limits {
                per_session: 100,
                total: 1000,
                total_bytes: 1 << 20,
            },
            retained: retained::Limits {
                max_messages: 1000,
                max_bytes: 1 << 20,
            },
            max_queued_messages,
            max_queued_bytes: 1 << 20,
            max_queued_bytes_total: 1 << 24,
            max_inflight: 10,
        };
        (Broker::new(limits, metrics.clone()), metrics)
    }

    fn attach(broker: &Arc<Broker>, id: &str, clean: bool, will: Option<&str>) -> Attachment {
        broker
            .attach(Attach {
                client_id: id.to_string(),
                clean_start: clean,
                expiry: if clean {
                    Expiry::AtDisconnect
                } else {
                    Expiry::Never
                },
                will: will.map(|topic| sessions::Will {
                    topic: Arc::from(topic),
                    payload: Bytes::from_static(b"gone"),
                    qos: 1,
                    retain: false,
                    properties: Bytes::new(),
                    delay_secs: 0,
                    message_expiry: None,
                }),
                version: Version::V5,
                receive_maximum: None,
                max_packet_size: None,
                owner: Owner::Device(None),
            })
            .expect("attached")
    }

    fn publish(topic: &str, qos: u8, retain: bool) -> Publish {
        Publish {
            topic: Arc::from(topic),
            payload: Bytes::from(topic.to_string()),
            qos,
            retain,
            properties: Bytes::new(),
            message_expiry: None,
        }
    }

    fn topics(connection: &Connection) -> Vec<String> {
        connection
            .take_messages(usize::MAX)
            .into_iter()
            .map(|(topic, _, _)| topic.to_string())
            .collect()
    }

    #[test]
    fn a_takeover_tells_the_old_connection_and_the_session_moves_on() {
        let (broker, _) = broker(100);
        let old = attach(&broker, "panel", false, None);
        assert!(!old.session_present);
        old.connection.subscribe(None, &[("t/#".into(), 1)]);
        let new = attach(&broker, "panel", false, None);
        assert!(new.session_present, "the kept session is resumed");
        assert_eq!(old.connection.must_close(), Some(0x8E));
        assert_eq!(new.connection.must_close(), None);
        let device = attach(&broker, "device", true, None);
        device.connection.publish(&publish("t/1", 1, false));
        assert!(
            topics(&old.connection).is_empty(),
            "nothing for the old one"
        );
        assert_eq!(topics(&new.connection), ["t/1"], "the subscription moved");
        // The old connection's end does not end the session it no longer holds.
        drop(old);
        device.connection.publish(&publish("t/2", 1, false));
        assert_eq!(topics(&new.connection), ["t/2"]);
    }

    #[test]
    fn a_connection_that_is_dropped_publishes_its_will_and_a_normal_end_does_not() {
        let (broker, _) = broker(100);
        let watcher = attach(&broker, "watcher", true, None);
        watcher.connection.subscribe(None, &[("will/#".into(), 1)]);
        let lost = attach(&broker, "lost", true, Some("will/lost"));
        drop(lost);
        let polite = attach(&broker, "polite", true, Some("will/polite"));
        polite.connection.disconnect(Ending::Normal, None);
        assert_eq!(topics(&watcher.connection), ["will/lost"]);
    }

    #[test]
    fn every_retained_message_reaches_a_new_subscriber_past_the_queue_bound() {
        let (broker, metrics) = broker(10);
        let device = attach(&broker, "device", true, None);
        for n in 0..100 {
            device
                .connection
                .publish(&publish(&format!("r/{n:03}"), 1, true));
        }
        let late = attach(&broker, "late", true, None);
        let granted = late.connection.subscribe(None, &[("r/#".into(), 1)]);
        assert_eq!(granted, [Granted::Qos(1)]);
        let mut got = Vec::new();
        for _ in 0..100 {
            got.extend(
                late.connection
                    .take_messages(7)
                    .into_iter()
                    .map(|(t, _, _)| t),
            );
        }
        assert_eq!(
            got.len(),
            100,
            "all of them, 7 at a time through a queue of 10"
        );
        assert_eq!(metrics.snapshot().broker_dropped_queue_full, 0);
        // Retain Handling 2: none on subscribe.
        let other = attach(&broker, "other", true, None);
        other
            .connection
            .subscribe(None, &[("r/#".into(), 0b10_0001)]);
        assert!(topics(&other.connection).is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_limits_refuse_subscriptions() {
        let (broker, metrics) = broker(3);
        let slow = attach(&broker, "slow", true, None);
        slow.connection.subscribe(None, &[("q/#".into(), 1)]);
        let device = attach(&broker, "device", true, None);
        for n in 0..20 {
            device
                .connection
                .publish(&publish(&format!("q/{n}"), 1, false));
        }
        // The window (10) plus the queue (3) are taken; the other 7 are dropped and counted.
        // Nothing was taken yet: the queue (3) holds the first ones; the other 17 are dropped
        // and counted.
        assert_eq!(topics(&slow.connection), ["q/0", "q/1", "q/2"]);
        assert_eq!(metrics.snapshot().broker_dropped_queue_full, 17);
        let filters: Vec<(String, u8)> = (0..101).map(|n| (format!("f/{n}"), 0)).collect();
        let granted = slow.connection.subscribe(None, &filters);
        // One subscription is held already: 99 more fit in the session's 100.
        assert_eq!(granted.iter().filter(|g| **g == Granted::Quota).count(), 2);
        assert_eq!(granted[100].code(Version::V5), 0x97);
        assert_eq!(granted[100].code(Version::V4), 0x80);
    }

    #[test]
    fn the_tick_publishes_the_gauges() {
        let (broker, metrics) = broker(10);
        let a = attach(&broker, "a", false, None);
        a.connection
            .subscribe(None, &[("x/#".into(), 1), ("y".into(), 0)]);
        a.connection.publish(&publish("x/kept", 0, true));
        broker.tick();
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.broker_sessions, 1);
        assert_eq!(snapshot.broker_subscriptions, 2);
        assert_eq!(snapshot.broker_retained_messages, 1);
        assert!(snapshot.broker_retained_bytes > 0);
    }
}
