//! The broker's sessions by client id: which connection holds each, Clean Session / Clean
//! Start, Session Present, session expiry, takeover and wills (MQTT 3.1.1 §3.1.2.4, §3.1.2.5,
//! §3.1.4; MQTT 5 §3.1.2.4, §3.1.2.5, §3.1.2.11.2, §3.1.3.2.2, §3.14.2.1, §4.1).
//!
//! Guarantees:
//! - At most one connection holds a client id's session: a second CONNECT with the id takes
//!   the session over and the old connection is to be closed (MQTT 5: DISCONNECT 0x8E).
//! - Session Present is set exactly when a kept session is resumed (Clean Start 0 and a
//!   session that had not ended); Clean Start 1 ends the old session first.
//! - A session ends when its expiry says: at disconnect for interval 0 (3.1.1's Clean Session
//!   1), that many seconds after the disconnect for a value, never for "never" (3.1.1's Clean
//!   Session 0, as Mosquitto keeps them by default); the broker's own maximum caps the value.
//!   A reconnect before the end keeps it.
//! - A will is published at most once per connection, never after a normal DISCONNECT (MQTT 5:
//!   reason 0x00), always after any other end of the connection (including a takeover and
//!   MQTT 5's 0x04 "disconnect with will message"), after its Will Delay Interval or when the
//!   session ends, whichever is first; a reconnect to the session before then cancels it.
//! - Offline sessions are bounded: a new session that would be kept beyond
//!   [`Limits::max_kept_sessions`] is refused (and the caller counts it).
//!
//! Pure: no I/O; time is a parameter. The caller applies the [`Effect`]s (closing the old
//! connection, publishing wills, dropping an ended session's subscriptions and queue).
//!
//! In the data path: [`super::broker`] owns it and applies the effects.
// The size accessors are read by the tests only, until the broker exports them as gauges.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// A session, numbered by this registry (never reused).
pub type SessionId = super::subscriptions::SessionId;

/// A network connection, numbered by the caller.
pub type ConnectionId = u64;

/// When a session ends after its connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// With the connection (interval 0; 3.1.1's Clean Session 1).
    AtDisconnect,
    /// This many seconds after the connection ends.
    After(u32),
    /// Never (interval 0xFFFFFFFF; 3.1.1's Clean Session 0).
    Never,
}

impl Expiry {
    /// The expiry a CONNECT asks for: MQTT 5's Session Expiry Interval (absent: 0), or on
    /// 3.1.1 the Clean Session flag.
    pub fn from_connect(v5_interval: Option<Option<u32>>, clean_session: bool) -> Expiry {
        match v5_interval {
            Some(None) | Some(Some(0)) => Expiry::AtDisconnect,
            Some(Some(u32::MAX)) => Expiry::Never,
            Some(Some(secs)) => Expiry::After(secs),
            None if clean_session => Expiry::AtDisconnect,
            None => Expiry::Never,
        }
    }

    fn kept(self) -> bool {
        self != Expiry::AtDisconnect
    }
}

/// A will message (what to publish, and when).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Its topic.
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: u8,
    /// Its retain flag.
    pub retain: bool,
    /// MQTT 5 properties to publish it with, as encoded.
    pub properties: Bytes,
    /// MQTT 5 Will Delay Interval, in seconds (0 on 3.1.1).
    pub delay_secs: u32,
    /// MQTT 5 Message Expiry Interval of the will, in seconds.
    pub message_expiry: Option<u32>,
}

/// A CONNECT, as far as sessions are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The client id (assigned by the caller when the client sent none).
    pub client_id: Arc<str>,
    /// Clean Start (MQTT 5) or Clean Session (3.1.1).
    pub clean_start: bool,
    /// When the session ends.
    pub expiry: Expiry,
    /// The will, if the CONNECT has one.
    pub will: Option<Will>,
}

/// Bounds of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most sessions kept beyond their connection (connected or not).
    pub max_kept_sessions: usize,
    /// The longest session expiry the broker grants, in seconds (`Never` included).
    pub max_expiry_secs: Option<u32>,
}

/// A CONNECT the registry took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The session the connection now holds.
    pub session: SessionId,
    /// CONNACK's Session Present.
    pub session_present: bool,
    /// The expiry granted (the broker's maximum may lower what was asked; MQTT 5 sends it
    /// back in CONNACK when it differs).
    pub expiry: Expiry,
    /// What the caller must do now, in order.
    pub effects: Vec<Effect>,
}

/// Why a CONNECT was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// [`Limits::max_kept_sessions`] are kept already.
    #[error("{0} sessions are kept already, the limit")]
    TooManySessions(usize),
}

/// Something the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Close this connection: its session was taken over (MQTT 5: DISCONNECT 0x8E first).
    CloseTakenOver(ConnectionId),
    /// Publish this will.
    PublishWill(Will),
    /// The session ended: drop its subscriptions and messages.
    EndSession(SessionId),
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A DISCONNECT with reason 0x00 (or 3.1.1's DISCONNECT): no will.
    Normal,
    /// Anything else: a network error, a keep-alive timeout, a protocol error, a takeover,
    /// or MQTT 5's DISCONNECT 0x04 "disconnect with will message".
    WithWill,
}

#[derive(Debug)]
struct Session {
    id: SessionId,
    /// The connection holding it, with that connection's will.
    connection: Option<(ConnectionId, Option<Will>)>,
    expiry: Expiry,
    /// When it ends, if it is offline and expires.
    ends_at_ms: Option<u64>,
    /// A will waiting for its delay, and when it is due.
    pending_will: Option<(Will, u64)>,
}

/// The sessions (see the module documentation).
#[derive(Debug)]
pub struct Sessions {
    by_client: HashMap<Arc<str>, Session>,
    kept: usize,
    next_id: SessionId,
    limits: Limits,
}

impl Sessions {
    /// No sessions, these limits.
    pub fn new(limits: Limits) -> Sessions {
        Sessions {
            by_client: HashMap::new(),
            kept: 0,
            next_id: 1,
            limits,
        }
    }

    /// Sessions known (connected or kept).
    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Sessions kept beyond their connection (connected or not).
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// The session of `client_id` and the connection holding it, if any.
    pub fn get(&self, client_id: &str) -> Option<(SessionId, Option<ConnectionId>)> {
        self.by_client
            .get(client_id)
            .map(|s| (s.id, s.connection.as_ref().map(|(c, _)| *c)))
    }

    /// `connection` sent `connect`.
    pub fn connect(
        &mut self,
        connection: ConnectionId,
        connect: Connect,
    ) -> Result<Accepted, Refused> {
        let expiry = self.cap(connect.expiry);
        let mut effects = Vec::new();
        let existing = self.by_client.get(&connect.client_id);
        let resumes = existing.is_some() && !connect.clean_start;
        let kept_after = self.kept - usize::from(existing.is_some_and(|s| s.expiry.kept()))
            + usize::from(expiry.kept());
        if expiry.kept() && kept_after > self.limits.max_kept_sessions {
            return Err(Refused::TooManySessions(self.limits.max_kept_sessions));
        }
        if let Some(mut old) = self.by_client.remove(&connect.client_id) {
            if let Some((old_connection, will)) = old.connection.take() {
                effects.push(Effect::CloseTakenOver(old_connection));
                // The old connection ended without a normal DISCONNECT: its will goes,
                // unless its delay outlasts the takeover of a session that continues.
                if let Some(will) = will {
                    if !resumes || will.delay_secs == 0 {
                        effects.push(Effect::PublishWill(will));
                    }
                }
            }
            if resumes {
                // A reconnect before the delay cancels a pending will (§3.1.3.2.2).
                old.pending_will = None;
            } else {
                if let Some((will, _)) = old.pending_will.take() {
                    effects.push(Effect::PublishWill(will));
                }
                effects.push(Effect::EndSession(old.id));
            }
            if old.expiry.kept() {
                self.kept -= 1;
            }
            if resumes {
                old.connection = Some((connection, connect.will));
                old.expiry = expiry;
                old.ends_at_ms = None;
                let id = old.id;
                self.insert(connect.client_id, old);
                return Ok(Accepted {
                    session: id,
                    session_present: true,
                    expiry,
                    effects,
                });
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.insert(
            connect.client_id,
            Session {
                id,
                connection: Some((connection, connect.will)),
                expiry,
                ends_at_ms: None,
                pending_will: None,
            },
        );
        Ok(Accepted {
            session: id,
            session_present: false,
            expiry,
            effects,
        })
    }

    /// `connection`, holding `client_id`'s session, ended; `new_expiry` is MQTT 5's
    /// DISCONNECT Session Expiry Interval, if it sent one. Nothing happens if another
    /// connection holds the session by now (it was taken over).
    pub fn disconnected(
        &mut self,
        client_id: &str,
        connection: ConnectionId,
        ending: Ending,
        new_expiry: Option<Expiry>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let new_expiry = new_expiry.map(|e| self.cap(e));
        let Some(session) = self.by_client.get_mut(client_id) else {
            return effects;
        };
        if session.connection.as_ref().map(|(c, _)| *c) != Some(connection) {
            return effects;
        }
        let (_, will) = session.connection.take().unwrap_or((connection, None));
        if let Some(expiry) = new_expiry {
            if session.expiry.kept() != expiry.kept() {
                if expiry.kept() {
                    self.kept += 1;
                } else {
                    self.kept -= 1;
                }
            }
            session.expiry = expiry;
        }
        session.ends_at_ms = match session.expiry {
            Expiry::AtDisconnect => Some(now_ms),
            Expiry::After(secs) => Some(now_ms + u64::from(secs) * 1000),
            Expiry::Never => None,
        };
        if let (Ending::WithWill, Some(will)) = (ending, will) {
            let due = now_ms + u64::from(will.delay_secs) * 1000;
            session.pending_will = Some((will, due));
        }
        effects.extend(self.tick(now_ms));
        effects
    }

    /// Publishes the wills that are due and ends the sessions that have expired, as of
    /// `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut ended = Vec::new();
        for (client_id, session) in &mut self.by_client {
            let ends = session.ends_at_ms.is_some_and(|at| at <= now_ms);
            let will_due = session
                .pending_will
                .as_ref()
                .is_some_and(|(_, due)| *due <= now_ms);
            if will_due || ends {
                if let Some((will, _)) = session.pending_will.take() {
                    effects.push(Effect::PublishWill(will));
                }
            }
            if ends {
                effects.push(Effect::EndSession(session.id));
                ended.push(client_id.clone());
            }
        }
        for client_id in ended {
            if let Some(session) = self.by_client.remove(&client_id) {
                if session.expiry.kept() {
                    self.kept -= 1;
                }
            }
        }
        effects
    }

    /// A kept session read back from disk after a restart, with no connection: it ends at
    /// `ends_at_ms` (or, with `None`, after its expiry counted from `now_ms`: its client was
    /// connected when the gateway stopped), capped by today's limits. Returns `None` if the
    /// client id already has a session or the kept sessions are at their limit.
    pub fn restore(
        &mut self,
        client_id: Arc<str>,
        expiry: Expiry,
        ends_at_ms: Option<u64>,
        now_ms: u64,
    ) -> Option<SessionId> {
        let expiry = self.cap(expiry);
        if self.by_client.contains_key(&client_id)
            || !expiry.kept()
            || self.kept >= self.limits.max_kept_sessions
        {
            return None;
        }
        let ends_at_ms = match expiry {
            Expiry::Never => None,
            Expiry::After(secs) => Some(ends_at_ms.unwrap_or(now_ms + u64::from(secs) * 1000)),
            Expiry::AtDisconnect => Some(now_ms),
        };
        let id = self.next_id;
        self.next_id += 1;
        self.insert(
            client_id,
            Session {
                id,
                connection: None,
                expiry,
                ends_at_ms,
                pending_will: None,
            },
        );
        Some(id)
    }

    /// The expiry of `client_id`'s session and when it ends (`None`: connected, or never).
    pub fn expiry_of(&self, client_id: &str) -> Option<(Expiry, Option<u64>)> {
        self.by_client
            .get(client_id)
            .map(|s| (s.expiry, s.ends_at_ms))
    }

    /// The earliest time [`Sessions::tick`] has something to do, if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.by_client
            .values()
            .flat_map(|s| [s.ends_at_ms, s.pending_will.as_ref().map(|(_, due)| *due)])
            .flatten()
            .min()
    }

    fn insert(&mut self, client_id: Arc<str>, session: Session) {
        if session.expiry.kept() {
            self.kept += 1;
        }
        self.by_client.insert(client_id, session);
    }

    fn cap(&self, expiry: Expiry) -> Expiry {
        match (expiry, self.limits.max_expiry_secs) {
            (Expiry::Never, Some(max)) => Expiry::After(max),
            (Expiry::After(secs), Some(max)) if secs > max => Expiry::After(max),
            (e, _) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const LIMITS: Limits = Limits {
        max_kept_sessions: 3,
        max_expiry_secs: None,
    };

    fn will(tag: u64, delay_secs: u32) -> Will {
        Will {
            topic: Arc::from("wills"),
            payload: Bytes::from(tag.to_be_bytes().to_vec()),
            qos: 1,
            retain: false,
            properties: Bytes::new(),
            delay_secs,
            message_expiry: None,
        }
    }

    fn connect(id: &str, clean_start: bool, expiry: Expiry, will: Option<Will>) -> Connect {
        Connect {
            client_id: Arc::from(id),
            clean_start,
            expiry,
            will,
        }
    }

    fn wills(effects: &[Effect]) -> Vec<u64> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::PublishWill(w) => {
                    Some(u64::from_be_bytes(w.payload[..].try_into().unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn session_present_only_when_a_kept_session_is_resumed() {
        let mut sessions = Sessions::new(LIMITS);
        let first = sessions
            .connect(1, connect("d", false, Expiry::Never, None))
            .unwrap();
        assert!(!first.session_present);
        assert_eq!(
            sessions.disconnected("d", 1, Ending::Normal, None, 0),
            vec![]
        );
        let again = sessions
            .connect(2, connect("d", false, Expiry::Never, None))
            .unwrap();
        assert!(again.session_present);
        assert_eq!(again.session, first.session);
        sessions.disconnected("d", 2, Ending::Normal, None, 0);
        let clean = sessions
            .connect(3, connect("d", true, Expiry::AtDisconnect, None))
            .unwrap();
        assert!(!clean.session_present);
        assert_eq!(clean.effects, vec![Effect::EndSession(first.session)]);
        assert_ne!(clean.session, first.session);
        assert_eq!(
            sessions.disconnected("d", 3, Ending::Normal, None, 0),
            vec![Effect::EndSession(clean.session)]
        );
        assert!(sessions.is_empty());
        assert_eq!(sessions.kept(), 0);
    }

    #[test]
    fn a_takeover_closes_the_old_connection_and_sends_its_will() {
        let mut sessions = Sessions::new(LIMITS);
        sessions
            .connect(1, connect("d", false, Expiry::Never, Some(will(1, 0))))
            .unwrap();
        let taken = sessions
            .connect(2, connect("d", false, Expiry::Never, None))
            .unwrap();
        assert!(taken.session_present);
        assert_eq!(
            taken.effects,
            vec![Effect::CloseTakenOver(1), Effect::PublishWill(will(1, 0))]
        );
        // The old connection's end, reported later, changes nothing.
        assert_eq!(
            sessions.disconnected("d", 1, Ending::WithWill, None, 0),
            vec![]
        );
        assert_eq!(sessions.get("d").unwrap().1, Some(2));
        // A delayed will of a session that continues under the new connection is not sent
        // (the new connection came before the delay passed); with Clean Start it is, at once.
        sessions
            .connect(3, connect("e", false, Expiry::Never, Some(will(3, 60))))
            .unwrap();
        let resumed = sessions
            .connect(4, connect("e", false, Expiry::Never, None))
            .unwrap();
        assert_eq!(resumed.effects, vec![Effect::CloseTakenOver(3)]);
        sessions
            .connect(5, connect("f", false, Expiry::Never, Some(will(5, 60))))
            .unwrap();
        let fresh = sessions
            .connect(6, connect("f", true, Expiry::Never, None))
            .unwrap();
        assert_eq!(wills(&fresh.effects), vec![5]);
        assert_eq!(sessions.len(), 3);
    }

    #[test]
    fn expiry_and_will_delay() {
        let mut sessions = Sessions::new(LIMITS);
        let a = sessions
            .connect(1, connect("d", false, Expiry::After(10), Some(will(1, 5))))
            .unwrap();
        assert!(sessions
            .disconnected("d", 1, Ending::WithWill, None, 1_000)
            .is_empty());
        assert_eq!(sessions.next_due_ms(), Some(6_000));
        assert!(sessions.tick(5_999).is_empty());
        assert_eq!(wills(&sessions.tick(6_000)), vec![1]);
        assert!(sessions.tick(10_999).is_empty());
        assert_eq!(sessions.tick(11_000), vec![Effect::EndSession(a.session)]);
        // A reconnect within the delay cancels the will; a normal DISCONNECT sends none.
        sessions
            .connect(2, connect("e", false, Expiry::After(60), Some(will(2, 30))))
            .unwrap();
        sessions.disconnected("e", 2, Ending::WithWill, None, 0);
        sessions
            .connect(3, connect("e", false, Expiry::After(60), Some(will(3, 0))))
            .unwrap();
        assert!(sessions.tick(100_000).is_empty());
        assert!(sessions
            .disconnected("e", 3, Ending::Normal, None, 100_000)
            .is_empty());
        // The session ending first sends the will at once (its delay notwithstanding).
        sessions
            .connect(
                4,
                connect("f", true, Expiry::AtDisconnect, Some(will(4, 3600))),
            )
            .unwrap();
        let effects = sessions.disconnected("f", 4, Ending::WithWill, None, 0);
        assert_eq!(wills(&effects), vec![4]);
    }

    #[test]
    fn kept_sessions_are_bounded_and_the_broker_caps_expiry() {
        let mut sessions = Sessions::new(LIMITS);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            sessions
                .connect(i as u64, connect(id, false, Expiry::Never, None))
                .unwrap();
        }
        assert_eq!(
            sessions.connect(9, connect("x", false, Expiry::After(5), None)),
            Err(Refused::TooManySessions(3))
        );
        // Clean sessions are not kept, so they are not bounded here.
        assert!(sessions
            .connect(9, connect("x", true, Expiry::AtDisconnect, None))
            .is_ok());
        // Resuming a kept session does not count twice.
        assert!(sessions
            .connect(10, connect("a", false, Expiry::Never, None))
            .is_ok());
        let mut capped = Sessions::new(Limits {
            max_expiry_secs: Some(60),
            ..LIMITS
        });
        let accepted = capped
            .connect(1, connect("d", false, Expiry::Never, None))
            .unwrap();
        assert_eq!(accepted.expiry, Expiry::After(60));
        assert_eq!(
            Expiry::from_connect(Some(None), false),
            Expiry::AtDisconnect
        );
        assert_eq!(
            Expiry::from_connect(Some(Some(u32::MAX)), true),
            Expiry::Never
        );
        assert_eq!(Expiry::from_connect(None, false), Expiry::Never);
        assert_eq!(Expiry::from_connect(None, true), Expiry::AtDisconnect);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Connect {
            client: u8,
            clean: bool,
            expiry: u8,
            will_delay: Option<u32>,
        },
        Disconnect {
            client: u8,
            normal: bool,
        },
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, any::<bool>(), 0u8..3, prop::option::of(0u32..4)).prop_map(
                |(client, clean, expiry, will_delay)| Op::Connect {
                    client,
                    clean,
                    expiry,
                    will_delay
                }
            ),
            (0u8..3, any::<bool>()).prop_map(|(client, normal)| Op::Disconnect { client, normal }),
            (0u64..5000).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever clients do: each connection's will is published at most once and never
        /// after a normal DISCONNECT; Session Present is set exactly when a kept session is
        /// resumed; the kept count is right and within the bound; and in the end only
        /// sessions that never expire are left.
        #[test]
        fn wills_and_sessions_follow_the_rules(ops in prop::collection::vec(op(), 0..80)) {
            let mut sessions = Sessions::new(LIMITS);
            let mut now = 0u64;
            let mut next_connection = 1u64;
            // client -> (connection, expiry) of the connection that holds it, if any.
            let mut holder: HashMap<u8, (u64, Expiry)> = HashMap::new();
            let mut published: HashSet<u64> = HashSet::new();
            let mut normal_end: HashSet<u64> = HashSet::new();
            let mut alive: HashMap<u8, SessionId> = HashMap::new(); // sessions not ended
            let apply = |effects: &[Effect], published: &mut HashSet<u64>, normal_end: &HashSet<u64>| -> Result<(), TestCaseError> {
                for tag in wills(effects) {
                    prop_assert!(published.insert(tag), "will {} published twice", tag);
                    prop_assert!(!normal_end.contains(&tag), "will {} after a normal DISCONNECT", tag);
                }
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Connect { client, clean, expiry, will_delay } => {
                        let expiry = [Expiry::AtDisconnect, Expiry::After(2), Expiry::Never][usize::from(expiry)];
                        let connection = next_connection;
                        next_connection += 1;
                        let id = format!("c{client}");
                        let will = will_delay.map(|d| will(connection, d));
                        match sessions.connect(connection, connect(&id, clean, expiry, will)) {
                            Ok(accepted) => {
                                let before = alive.get(&client).copied();
                                prop_assert_eq!(accepted.session_present, before.is_some() && !clean);
                                if accepted.session_present {
                                    prop_assert_eq!(Some(accepted.session), before, "the same session");
                                }
                                apply(&accepted.effects, &mut published, &normal_end)?;
                                if let Some((old, _)) = holder.insert(client, (connection, expiry)) {
                                    prop_assert!(accepted.effects.contains(&Effect::CloseTakenOver(old)));
                                }
                                alive.insert(client, accepted.session);
                            }
                            Err(Refused::TooManySessions(_)) => {
                                prop_assert!(expiry != Expiry::AtDisconnect);
                                prop_assert!(sessions.kept() >= LIMITS.max_kept_sessions);
                            }
                        }
                    }
                    Op::Disconnect { client, normal } => {
                        if let Some((connection, _)) = holder.remove(&client) {
                            if normal {
                                normal_end.insert(connection);
                            }
                            let ending = if normal { Ending::Normal } else { Ending::WithWill };
                            let effects = sessions.disconnected(&format!("c{client}"), connection, ending, None, now);
                            apply(&effects, &mut published, &normal_end)?;
                            for e in &effects {
                                if let Effect::EndSession(_) = e { alive.remove(&client); }
                            }
                        }
                    }
                    Op::Tick(ms) => {
                        now += ms;
                        let effects = sessions.tick(now);
                        apply(&effects, &mut published, &normal_end)?;
                    }
                }
                // Ended sessions, by anyone's account.
                alive.retain(|client, _| sessions.get(&format!("c{client}")).is_some());
                let kept = sessions.by_client.values().filter(|s| s.expiry.kept()).count();
                prop_assert_eq!(sessions.kept(), kept);
                prop_assert!(kept <= LIMITS.max_kept_sessions);
                for (client, (connection, _)) in &holder {
                    prop_assert_eq!(sessions.get(&format!("c{client}")).and_then(|s| s.1), Some(*connection));
                }
            }
            for (client, (connection, _)) in holder.clone() {
                let effects = sessions.disconnected(&format!("c{client}"), connection, Ending::WithWill, None, now);
                apply(&effects, &mut published, &normal_end)?;
            }
            let effects = sessions.tick(u64::MAX / 2);
            apply(&effects, &mut published, &normal_end)?;
            prop_assert!(sessions.by_client.values().all(|s| s.expiry == Expiry::Never));
            prop_assert!(sessions.by_client.values().all(|s| s.pending_will.is_none()));
        }
    }
}
