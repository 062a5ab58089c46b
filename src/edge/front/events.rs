//! The front's refusals as internal events (Vector's model): each event logs its line and
//! bumps its counters in one [`InternalEvent::emit`], so neither goes without the other.
//!
//! Guarantees: the log lines (texts, levels, fields, and the `outpost::edge::front` target)
//! and the counters are the ones the front wrote by hand before; a warning a device can
//! provoke at will is rate-limited (the first, then once per 1,000, with a count the caller
//! keeps), so that a misbehaving device fills neither the log nor memory.
//!
//! Does not: decide or answer anything (the front refuses; the events only tell).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};

use super::super::sources;
use super::super::tls::HandshakeError;
use super::end::{LoginRefusal, Refusal};
use super::LOG_TARGET;
use crate::metrics::Metrics;

/// Something that happened in the front: logged and counted together.
pub(super) trait InternalEvent {
    /// Logs the event's line (if its rate limit lets it) and bumps its counters.
    fn emit(self, metrics: &Metrics);
}

/// Rate-limits one warning: true for the 1st, 1,001st, 2,001st... call.
fn every_thousandth(counter: &AtomicU64) -> bool {
    counter.fetch_add(1, Ordering::Relaxed).is_multiple_of(1000)
}

/// A connection refused by its source address's limits
/// (`broker.max_connections_per_source`, `broker.max_connection_rate_per_source`).
pub(super) struct SourceRefused {
    pub source: IpAddr,
    pub why: sources::Refused,
    /// The first refusal of this address since it was last admitted: only that one is logged.
    pub first: bool,
}

impl InternalEvent for SourceRefused {
    fn emit(self, metrics: &Metrics) {
        let (counter, key) = match self.why {
            sources::Refused::TooMany => (
                &metrics.edge_refused_per_source,
                "broker.max_connections_per_source",
            ),
            sources::Refused::TooFast => (
                &metrics.edge_refused_connection_rate,
                "broker.max_connection_rate_per_source",
            ),
        };
        Metrics::add(counter, 1);
        if self.first {
            warn!(target: LOG_TARGET, source = %self.source, limit = key,
                "refusing device connections from this address (logged once per address)");
        }
    }
}

/// A connection refused because `broker.max_connections` are served already.
pub(super) struct ConnectionLimitReached<'a> {
    pub peer: SocketAddr,
    /// How many the listener refused so far (for the rate limit).
    pub seen: &'a AtomicU64,
}

impl InternalEvent for ConnectionLimitReached<'_> {
    fn emit(self, metrics: &Metrics) {
        Metrics::add(&metrics.edge_connections_refused, 1);
        if every_thousandth(self.seen) {
            warn!(target: LOG_TARGET, peer = %self.peer, limit = "broker.max_connections",
                "connection limit reached: refusing device connections");
        }
    }
}

/// A TLS handshake that failed (not TLS, a refused client certificate, too slow).
pub(super) struct HandshakeFailed<'a> {
    pub peer: SocketAddr,
    pub error: &'a HandshakeError,
    /// How many handshakes failed on the listener so far (for the rate limit).
    pub seen: &'a AtomicU64,
}

impl InternalEvent for HandshakeFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        Metrics::add(&metrics.edge_tls_handshakes_failed, 1);
        let (peer, error) = (self.peer, self.error);
        if every_thousandth(self.seen) {
            warn!(target: LOG_TARGET, %peer, %error,
                "device TLS handshake failed (logged once per 1,000)");
        } else {
            debug!(target: LOG_TARGET, %peer, %error, "device TLS handshake failed");
        }
    }
}

/// A connection the front refused for breaking a rule (of MQTT or of the gateway).
pub(super) struct ConnectionRefused<'a> {
    pub reason: &'a Refusal,
    /// How many connections the front refused so far (for the rate limit).
    pub seen: &'a AtomicU64,
}

impl InternalEvent for ConnectionRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        Metrics::add(&metrics.edge_rejected, 1);
        if let Refusal::Sessions(_) = self.reason {
            Metrics::add(&metrics.broker_sessions_refused, 1);
        }
        let reason = self.reason;
        // A device that keeps breaking the rules must not fill the log.
        if every_thousandth(self.seen) {
            warn!(target: LOG_TARGET, %reason,
                "device connection refused (logged once per 1,000)");
        } else {
            debug!(target: LOG_TARGET, %reason, "device connection refused");
        }
    }
}

/// A login the front refused.
pub(super) struct LoginRefused<'a> {
    pub reason: &'a LoginRefusal,
    /// How many logins the front refused so far (for the rate limit).
    pub seen: &'a AtomicU64,
}

impl InternalEvent for LoginRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        Metrics::add(&metrics.edge_logins_refused, 1);
        let reason = self.reason;
        if every_thousandth(self.seen) {
            warn!(target: LOG_TARGET, %reason, "device login refused (logged once per 1,000)");
        }
    }
}

/// Why a device's publish was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PublishRefusal {
    /// A topic the gateway keeps for itself.
    ReservedTopic,
    /// The ACL (`broker.acl_file`) does not let the client write the topic.
    NotGranted,
}

impl PublishRefusal {
    /// How the log line says it.
    fn why(self) -> &'static str {
        match self {
            PublishRefusal::ReservedTopic => "to a reserved topic",
            PublishRefusal::NotGranted => "not granted by broker.acl_file",
        }
    }
}

/// A publish the front refused (neither journaled nor delivered).
pub(super) struct PublishRefused<'a> {
    pub why: PublishRefusal,
    pub topic: &'a str,
    pub username: &'a Option<Arc<str>>,
    /// How many publishes the front refused so far (for the rate limit).
    pub seen: &'a AtomicU64,
}

impl InternalEvent for PublishRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        if self.why == PublishRefusal::NotGranted {
            Metrics::add(&metrics.acl_denied_publishes, 1);
        }
        Metrics::add(&metrics.edge_publishes_refused, 1);
        if every_thousandth(self.seen) {
            let (topic, username, why) = (self.topic, self.username, self.why.why());
            warn!(target: LOG_TARGET, %topic, username = ?username,
                "publish refused, {why} (logged once per 1,000)");
        }
    }
}

/// A will dropped at CONNECT: the ACL does not let the client write its topic.
pub(super) struct WillDenied<'a> {
    pub client_id: &'a str,
    pub topic: &'a str,
}

impl InternalEvent for WillDenied<'_> {
    fn emit(self, metrics: &Metrics) {
        Metrics::add(&metrics.acl_denied_wills, 1);
        debug!(target: LOG_TARGET, client_id = %self.client_id, topic = %self.topic,
            "will dropped: the ACL does not let the client write its topic");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_warning_and_then_one_per_thousand() {
        let seen = AtomicU64::new(0);
        let logged: Vec<u64> = (0..2500)
            .filter(|_| every_thousandth(&seen))
            .map(|_| seen.load(Ordering::Relaxed))
            .collect();
        assert_eq!(logged, vec![1, 1001, 2001]);
    }

    #[test]
    fn each_event_bumps_its_counters() {
        let metrics = Metrics::default();
        let seen = AtomicU64::new(0);
        let peer: SocketAddr = "192.0.2.1:1883".parse().expect("an address");
        SourceRefused {
            source: peer.ip(),
            why: sources::Refused::TooMany,
            first: true,
        }
        .emit(&metrics);
        SourceRefused {
            source: peer.ip(),
            why: sources::Refused::TooFast,
            first: false,
        }
        .emit(&metrics);
        ConnectionLimitReached { peer, seen: &seen }.emit(&metrics);
        let sessions =
            Refusal::Sessions(super::super::super::sessions::Refused::TooManySessions(1));
        ConnectionRefused {
            reason: &sessions,
            seen: &seen,
        }
        .emit(&metrics);
        ConnectionRefused {
            reason: &Refusal::EmptyClientIdWithoutCleanSession,
            seen: &seen,
        }
        .emit(&metrics);
        for why in [PublishRefusal::ReservedTopic, PublishRefusal::NotGranted] {
            PublishRefused {
                why,
                topic: "t",
                username: &None,
                seen: &seen,
            }
            .emit(&metrics);
        }
        WillDenied {
            client_id: "c",
            topic: "t",
        }
        .emit(&metrics);
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(read(&metrics.edge_refused_per_source), 1);
        assert_eq!(read(&metrics.edge_refused_connection_rate), 1);
        assert_eq!(read(&metrics.edge_connections_refused), 1);
        assert_eq!(read(&metrics.edge_rejected), 2);
        assert_eq!(read(&metrics.broker_sessions_refused), 1);
        assert_eq!(read(&metrics.edge_publishes_refused), 2);
        assert_eq!(read(&metrics.acl_denied_publishes), 1);
        assert_eq!(read(&metrics.acl_denied_wills), 1);
        assert_eq!(read(&seen), 5);
    }
}
