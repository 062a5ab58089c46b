//! The gateway's counters: every event received, routed, processed, failed, queued and
//! delivered is counted here, so that no drop goes unexplained.
//!
//! Counters only ever increase (except the per-link connection flags); a [`Snapshot`] is a
//! consistent-enough copy for logs, status and the demo. This module does no I/O.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Process-wide counters. Share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Publishes received from local devices.
    pub received: AtomicU64,
    /// Publishes committed to the journal (acknowledgeable).
    pub journaled: AtomicU64,
    /// Device connections closed for a malformed, oversized or forbidden packet, or refused
    /// for a reserved client id.
    pub edge_rejected: AtomicU64,
    /// Device connections refused at the connection limit (`broker.max_connections`).
    pub edge_connections_refused: AtomicU64,
    /// Device logins refused: a wrong username or password, or no username where anonymous
    /// clients are not allowed (`broker.password_file`, `broker.allow_anonymous`).
    pub edge_logins_refused: AtomicU64,
    /// TLS handshakes on the device listeners that failed: not TLS (plain MQTT to a TLS
    /// port), a client certificate refused (unknown CA, revoked, expired, missing where
    /// required), or no handshake within `broker.connect_timeout_ms`.
    pub edge_tls_handshakes_failed: AtomicU64,
    /// Device connections refused because their address had `broker.max_connections_per_source` open.
    pub edge_refused_per_source: AtomicU64,
    /// Device connections refused because their address opened them faster than `broker.max_connection_rate_per_source`.
    pub edge_refused_connection_rate: AtomicU64,
    /// Messages for local subscribers dropped at a session's queue bound (`broker.max_queued_messages`, `broker.max_queued_bytes`), retained messages owed beyond `broker.max_retained_messages` included.
    pub broker_dropped_queue_full: AtomicU64,
    /// Device publishes refused (neither journaled nor delivered): to a reserved topic (`$SYS`, `$share`).
    pub edge_publishes_refused: AtomicU64,
    /// Messages for local subscribers dropped because all sessions together held `broker.max_queued_bytes_total`.
    pub broker_dropped_total_full: AtomicU64,
    /// QoS 0 messages dropped for a kept session whose client was away (as Mosquitto drops them).
    pub broker_dropped_offline: AtomicU64,
    /// Messages for local subscribers whose Message Expiry Interval passed before they could be sent.
    pub broker_dropped_expired: AtomicU64,
    /// Messages not sent to a local subscriber because they exceed its Maximum Packet Size.
    pub broker_dropped_too_large: AtomicU64,
    /// Subscriptions refused at `broker.max_subscriptions_per_client` or `broker.max_subscriptions`.
    pub broker_subscriptions_refused: AtomicU64,
    /// Retained publishes not stored at `broker.max_retained_messages` or `broker.max_retained_bytes` (still delivered).
    pub broker_retained_refused: AtomicU64,
    /// Connections refused because `broker.max_sessions` sessions are kept.
    pub broker_sessions_refused: AtomicU64,
    /// Writes of the broker's durable state (`broker.sqlite`) that failed and are retried.
    pub broker_store_errors: AtomicU64,
    /// Kept sessions, subscriptions and retained messages read back at start that today's limits no longer admit.
    pub broker_not_restored: AtomicU64,
    /// Device publishes the ACL (`broker.acl_file`) refused: neither journaled nor delivered.
    pub acl_denied_publishes: AtomicU64,
    /// Subscription filters the ACL refused (SUBACK 0x80 on 3.1.1, 0x87 on 5).
    pub acl_denied_subscriptions: AtomicU64,
    /// Messages not delivered to a subscriber because the ACL does not let its client read the topic.
    pub acl_denied_deliveries: AtomicU64,
    /// Wills dropped at CONNECT because the ACL does not let the client write their topic.
    pub acl_denied_wills: AtomicU64,
    /// Publishes that matched no route (they still reach local subscribers).
    pub unrouted: AtomicU64,
    /// Events whose payload had invalid coordinates (dead-lettered `bad-location`).
    pub bad_locations: AtomicU64,
    /// Events without any location dead-lettered under `no_location = "dead-letter"`.
    pub no_location: AtomicU64,
    /// Outputs refused because their link may not carry their region tags (`residency`).
    pub residency_refusals: AtomicU64,
    /// Enter/exit events journaled for devices that changed geofences.
    pub geofence_transitions: AtomicU64,
    /// Handler invocations (one per batch, plus one per event when a batch is retried singly).
    pub handler_invocations: AtomicU64,
    /// Handler invocations that failed (trap, timeout, error, limit).
    pub handler_failures: AtomicU64,
    /// Outputs committed to the outbox.
    pub queued: AtomicU64,
    /// Outbox rows acknowledged by an upstream and deleted.
    pub delivered: AtomicU64,
    /// Events recorded as dead letters.
    pub dead_lettered: AtomicU64,
    /// Outputs dropped because their topic template could not be rendered (also dead-lettered).
    pub render_failures: AtomicU64,
    /// Store commits that failed (the events are retried; see the log).
    pub store_errors: AtomicU64,
    /// Events dead-lettered because their payload did not match the route's format.
    pub malformed: AtomicU64,
    /// Handler failures that were scheduled for another attempt.
    pub retries_scheduled: AtomicU64,
    /// Outbox rows moved to the dead letters by the `drop-oldest` policy.
    pub evicted: AtomicU64,
    /// Outbox rows whose time to live passed before delivery (dead-lettered).
    pub expired: AtomicU64,
    /// Outbox rows an upstream refused `max_refusals` times (dead-lettered as `rejected`).
    pub rejected: AtomicU64,
    /// Times a module was quarantined by its circuit breaker.
    pub quarantines: AtomicU64,
    /// Events held (waiting, or dead-lettered) because their module was quarantined.
    pub quarantined_events: AtomicU64,
    /// Fuel consumed by handler invocations (about one unit per WebAssembly instruction): the handlers' cost.
    pub handler_fuel: AtomicU64,
    /// Microseconds handler invocations ran (instantiation, call, output checks), summed.
    pub handler_run_us: AtomicU64,
    /// Microseconds handler invocations waited for a concurrency slot, summed.
    pub handler_wait_us: AtomicU64,
    /// Microseconds spent instantiating handlers (warm starts from pre-instantiated components), summed.
    pub handler_instantiate_us: AtomicU64,
    /// Modules compiled from WebAssembly (cold starts): at start without a usable artifact, and at deploys.
    pub module_compiles: AtomicU64,
    /// Microseconds spent compiling modules, summed.
    pub module_compile_us: AtomicU64,
    /// Deployed modules loaded from their precompiled artifact instead of compiling.
    pub module_artifact_loads: AtomicU64,
    /// Microseconds spent loading precompiled artifacts, summed.
    pub module_artifact_load_us: AtomicU64,
    /// Deploys that activated a new module version.
    pub module_deploys: AtomicU64,
    /// Rollbacks applied.
    pub module_rollbacks: AtomicU64,
    /// Removes applied.
    pub module_removals: AtomicU64,
    /// Deploy, rollback and remove requests refused (bad signature, wrong world, ...).
    pub module_requests_refused: AtomicU64,
    /// Dead letters deleted to stay within the dead-letter cap.
    pub dead_letters_evicted: AtomicU64,
    /// Times a batch waited because the outbox was full (`reject-new`).
    pub outbox_full_waits: AtomicU64,
    /// Times the journal waited because it was at its cap (devices not acknowledged meanwhile).
    pub journal_full_waits: AtomicU64,
    /// Gauge: sessions the local broker knows (connected or kept), as of its last tick (every second).
    pub broker_sessions: AtomicU64,
    /// Gauge: subscriptions held by the local broker, as of its last tick.
    pub broker_subscriptions: AtomicU64,
    /// Gauge: retained messages the local broker keeps, as of its last tick.
    pub broker_retained_messages: AtomicU64,
    /// Gauge: bytes of those retained messages, as of its last tick.
    pub broker_retained_bytes: AtomicU64,
    /// Gauge: bytes of messages all sessions hold for their clients (queued or in flight), as of the broker's last tick.
    pub broker_queued_bytes: AtomicU64,
    links: Mutex<BTreeMap<String, LinkState>>,
    quarantined: Mutex<BTreeMap<String, u64>>,
    module_fuel: Mutex<BTreeMap<String, u64>>,
    module_run_us: Mutex<BTreeMap<String, u64>>,
}

#[derive(Debug, Default)]
struct LinkState {
    connected: AtomicBool,
    connects: AtomicU64,
    details: Mutex<LinkSnapshot>,
}

/// One upstream link's state and history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LinkSnapshot {
    /// Whether it is connected now.
    pub connected: bool,
    /// Connections that reached CONNACK.
    pub connects: u64,
    /// Why the last connection failed or ended, in words (empty: never failed).
    pub last_error: String,
    /// Its cause label (`tls-unknown-ca`, `bad-credentials`, `unreachable`, ...).
    pub last_error_cause: String,
    /// When it happened, in milliseconds since the Unix epoch (0: never).
    pub last_error_ms: u64,
    /// Failed or lost connections per cause label.
    pub failures: BTreeMap<String, u64>,
    /// Credential files reloaded and put to use (rotations).
    pub credential_reloads: u64,
    /// Credential reloads refused (the files did not load; the link kept the old ones).
    pub credential_reload_failures: u64,
    /// Why the last refused reload was refused (empty: none was).
    pub last_reload_error: String,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// See [`Metrics::received`].
    pub received: u64,
    /// See [`Metrics::journaled`].
    pub journaled: u64,
    /// See [`Metrics::edge_rejected`].
    pub edge_rejected: u64,
    /// See [`Metrics::edge_connections_refused`].
    pub edge_connections_refused: u64,
    /// See [`Metrics::edge_logins_refused`].
    pub edge_logins_refused: u64,
    /// See [`Metrics::edge_tls_handshakes_failed`].
    pub edge_tls_handshakes_failed: u64,
    /// See [`Metrics::edge_refused_per_source`].
    pub edge_refused_per_source: u64,
    /// See [`Metrics::edge_refused_connection_rate`].
    pub edge_refused_connection_rate: u64,
    /// See [`Metrics::broker_dropped_queue_full`].
    pub broker_dropped_queue_full: u64,
    /// See [`Metrics::edge_publishes_refused`].
    pub edge_publishes_refused: u64,
    /// See [`Metrics::broker_dropped_total_full`].
    pub broker_dropped_total_full: u64,
    /// See [`Metrics::broker_dropped_offline`].
    pub broker_dropped_offline: u64,
    /// See [`Metrics::broker_dropped_expired`].
    pub broker_dropped_expired: u64,
    /// See [`Metrics::broker_dropped_too_large`].
    pub broker_dropped_too_large: u64,
    /// See [`Metrics::broker_subscriptions_refused`].
    pub broker_subscriptions_refused: u64,
    /// See [`Metrics::broker_retained_refused`].
    pub broker_retained_refused: u64,
    /// See [`Metrics::broker_sessions_refused`].
    pub broker_sessions_refused: u64,
    /// See [`Metrics::broker_store_errors`].
    pub broker_store_errors: u64,
    /// See [`Metrics::broker_not_restored`].
    pub broker_not_restored: u64,
    /// See [`Metrics::acl_denied_publishes`].
    pub acl_denied_publishes: u64,
    /// See [`Metrics::acl_denied_subscriptions`].
    pub acl_denied_subscriptions: u64,
    /// See [`Metrics::acl_denied_deliveries`].
    pub acl_denied_deliveries: u64,
    /// See [`Metrics::acl_denied_wills`].
    pub acl_denied_wills: u64,
    /// See [`Metrics::unrouted`].
    pub unrouted: u64,
    /// See [`Metrics::bad_locations`].
    pub bad_locations: u64,
    /// See [`Metrics::no_location`].
    pub no_location: u64,
    /// See [`Metrics::residency_refusals`].
    pub residency_refusals: u64,
    /// See [`Metrics::geofence_transitions`].
    pub geofence_transitions: u64,
    /// See [`Metrics::handler_invocations`].
    pub handler_invocations: u64,
    /// See [`Metrics::handler_failures`].
    pub handler_failures: u64,
    /// See [`Metrics::queued`].
    pub queued: u64,
    /// See [`Metrics::delivered`].
    pub delivered: u64,
    /// See [`Metrics::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`Metrics::render_failures`].
    pub render_failures: u64,
    /// See [`Metrics::store_errors`].
    pub store_errors: u64,
    /// See [`Metrics::malformed`].
    pub malformed: u64,
    /// See [`Metrics::retries_scheduled`].
    pub retries_scheduled: u64,
    /// See [`Metrics::evicted`].
    pub evicted: u64,
    /// See [`Metrics::expired`].
    pub expired: u64,
    /// See [`Metrics::rejected`].
    pub rejected: u64,
    /// See [`Metrics::quarantines`].
    pub quarantines: u64,
    /// See [`Metrics::quarantined_events`].
    pub quarantined_events: u64,
    /// Modules in quarantine now, with the milliseconds left (0: waiting for its probe).
    pub quarantined_modules: BTreeMap<String, u64>,
    /// See [`Metrics::handler_fuel`].
    pub handler_fuel: u64,
    /// See [`Metrics::handler_run_us`].
    pub handler_run_us: u64,
    /// See [`Metrics::handler_wait_us`].
    pub handler_wait_us: u64,
    /// See [`Metrics::handler_instantiate_us`].
    pub handler_instantiate_us: u64,
    /// See [`Metrics::module_compiles`].
    pub module_compiles: u64,
    /// See [`Metrics::module_compile_us`].
    pub module_compile_us: u64,
    /// See [`Metrics::module_artifact_loads`].
    pub module_artifact_loads: u64,
    /// See [`Metrics::module_artifact_load_us`].
    pub module_artifact_load_us: u64,
    /// See [`Metrics::module_deploys`].
    pub module_deploys: u64,
    /// See [`Metrics::module_rollbacks`].
    pub module_rollbacks: u64,
    /// See [`Metrics::module_removals`].
    pub module_removals: u64,
    /// See [`Metrics::module_requests_refused`].
    pub module_requests_refused: u64,
    /// See [`Metrics::dead_letters_evicted`].
    pub dead_letters_evicted: u64,
    /// See [`Metrics::outbox_full_waits`].
    pub outbox_full_waits: u64,
    /// See [`Metrics::journal_full_waits`].
    pub journal_full_waits: u64,
    /// See [`Metrics::broker_sessions`].
    pub broker_sessions: u64,
    /// See [`Metrics::broker_subscriptions`].
    pub broker_subscriptions: u64,
    /// See [`Metrics::broker_retained_messages`].
    pub broker_retained_messages: u64,
    /// See [`Metrics::broker_retained_bytes`].
    pub broker_retained_bytes: u64,
    /// See [`Metrics::broker_queued_bytes`].
    pub broker_queued_bytes: u64,
    /// Per upstream link: whether it is connected now.
    pub links_connected: BTreeMap<String, bool>,
    /// Per upstream link: its state, last error and failures per cause.
    pub links: BTreeMap<String, LinkSnapshot>,
    /// Fuel consumed per module name (every version): each module's cost in instructions.
    /// An invocation stopped by its deadline counts only part of its work (wasmtime does not
    /// write the fuel count back before the deadline trap), so a module that loops shows here
    /// far less than it cost: see [`Snapshot::module_run_us`].
    pub module_fuel: BTreeMap<String, u64>,
    /// Microseconds each module's invocations ran, per module name (every version): each
    /// module's cost in time, which counts invocations stopped by their deadline in full.
    pub module_run_us: BTreeMap<String, u64>,
    /// Handler invocations running and waiting now, and the most that ran at once, overall
    /// and per module. The counters do not hold it: whoever publishes a snapshot fills it in
    /// from the runtime ([`crate::handlers::runtime::Runtime::concurrency`]); all zero otherwise.
    pub handler_concurrency: Concurrency,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records whether an upstream link is connected.
    pub fn set_link_connected(&self, link: &str, connected: bool) {
        if let Ok(mut links) = self.links.lock() {
            let state = links.entry(link.to_string()).or_default();
            if connected && !state.connected.swap(true, Ordering::Relaxed) {
                state.connects.fetch_add(1, Ordering::Relaxed);
            } else if !connected {
                state.connected.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Records that a connection of `link` failed or ended, with its cause label and the
    /// operator's explanation.
    pub fn record_link_failure(&self, link: &str, cause: &str, message: &str) {
        self.with_link(link, |details| {
            details.last_error = message.to_string();
            details.last_error_cause = cause.to_string();
            details.last_error_ms = crate::event::now_ms();
            *details.failures.entry(cause.to_string()).or_insert(0) += 1;
        });
    }

    /// Records a credential reload of `link`: put to use (`None`) or refused (`Some(why)`).
    pub fn record_credential_reload(&self, link: &str, refused: Option<&str>) {
        self.with_link(link, |details| match refused {
            None => details.credential_reloads += 1,
            Some(why) => {
                details.credential_reload_failures += 1;
                details.last_reload_error = why.to_string();
            }
        });
    }

    fn with_link(&self, link: &str, change: impl FnOnce(&mut LinkSnapshot)) {
        if let Ok(mut links) = self.links.lock() {
            let state = links.entry(link.to_string()).or_default();
            if let Ok(mut details) = state.details.lock() {
                change(&mut details);
            }
        }
    }

    /// Records which modules are quarantined now, with the time each has left.
    pub fn set_quarantined(&self, modules: Vec<(String, std::time::Duration)>) {
        if let Ok(mut q) = self.quarantined.lock() {
            *q = modules
                .into_iter()
                .map(|(name, left)| (name, left.as_millis() as u64))
                .collect();
        }
    }

    /// Adds `fuel` to module `module`'s cost (and to [`Metrics::handler_fuel`]).
    pub fn add_module_fuel(&self, module: &str, fuel: u64) {
        Metrics::add(&self.handler_fuel, fuel);
        add_to(&self.module_fuel, module, fuel);
    }

    /// Adds `micros` of running to module `module`'s time (and to [`Metrics::handler_run_us`]).
    pub fn add_module_run_us(&self, module: &str, micros: u64) {
        Metrics::add(&self.handler_run_us, micros);
        add_to(&self.module_run_us, module, micros);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let links: BTreeMap<String, LinkSnapshot> = self
            .links
            .lock()
            .map(|links| {
                links
                    .iter()
                    .map(|(k, v)| {
                        let mut link = v.details.lock().map(|d| d.clone()).unwrap_or_default();
                        link.connected = v.connected.load(Ordering::Relaxed);
                        link.connects = v.connects.load(Ordering::Relaxed);
                        (k.clone(), link)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let links_connected = links
            .iter()
            .map(|(k, v)| (k.clone(), v.connected))
            .collect();
        Snapshot {
            received: get(&self.received),
            journaled: get(&self.journaled),
            edge_rejected: get(&self.edge_rejected),
            edge_connections_refused: get(&self.edge_connections_refused),
            edge_logins_refused: get(&self.edge_logins_refused),
            edge_tls_handshakes_failed: get(&self.edge_tls_handshakes_failed),
            edge_refused_per_source: get(&self.edge_refused_per_source),
            edge_refused_connection_rate: get(&self.edge_refused_connection_rate),
            broker_dropped_queue_full: get(&self.broker_dropped_queue_full),
            edge_publishes_refused: get(&self.edge_publishes_refused),
            broker_dropped_total_full: get(&self.broker_dropped_total_full),
            broker_dropped_offline: get(&self.broker_dropped_offline),
            broker_dropped_expired: get(&self.broker_dropped_expired),
            broker_dropped_too_large: get(&self.broker_dropped_too_large),
            broker_subscriptions_refused: get(&self.broker_subscriptions_refused),
            broker_retained_refused: get(&self.broker_retained_refused),
            broker_sessions_refused: get(&self.broker_sessions_refused),
            broker_store_errors: get(&self.broker_store_errors),
            broker_not_restored: get(&self.broker_not_restored),
            acl_denied_publishes: get(&self.acl_denied_publishes),
            acl_denied_subscriptions: get(&self.acl_denied_subscriptions),
            acl_denied_deliveries: get(&self.acl_denied_deliveries),
            acl_denied_wills: get(&self.acl_denied_wills),
            unrouted: get(&self.unrouted),
            bad_locations: get(&self.bad_locations),
            no_location: get(&self.no_location),
            residency_refusals: get(&self.residency_refusals),
            geofence_transitions: get(&self.geofence_transitions),
            handler_invocations: get(&self.handler_invocations),
            handler_failures: get(&self.handler_failures),
            queued: get(&self.queued),
            delivered: get(&self.delivered),
            dead_lettered: get(&self.dead_lettered),
            render_failures: get(&self.render_failures),
            store_errors: get(&self.store_errors),
            malformed: get(&self.malformed),
            retries_scheduled: get(&self.retries_scheduled),
            evicted: get(&self.evicted),
            expired: get(&self.expired),
            rejected: get(&self.rejected),
            quarantines: get(&self.quarantines),
            quarantined_events: get(&self.quarantined_events),
            quarantined_modules: self
                .quarantined
                .lock()
                .map(|q| q.clone())
                .unwrap_or_default(),
            handler_fuel: get(&self.handler_fuel),
            handler_run_us: get(&self.handler_run_us),
            handler_wait_us: get(&self.handler_wait_us),
            handler_instantiate_us: get(&self.handler_instantiate_us),
            module_compiles: get(&self.module_compiles),
            module_compile_us: get(&self.module_compile_us),
            module_artifact_loads: get(&self.module_artifact_loads),
            module_artifact_load_us: get(&self.module_artifact_load_us),
            module_deploys: get(&self.module_deploys),
            module_rollbacks: get(&self.module_rollbacks),
            module_removals: get(&self.module_removals),
            module_requests_refused: get(&self.module_requests_refused),
            dead_letters_evicted: get(&self.dead_letters_evicted),
            outbox_full_waits: get(&self.outbox_full_waits),
            journal_full_waits: get(&self.journal_full_waits),
            broker_sessions: get(&self.broker_sessions),
            broker_subscriptions: get(&self.broker_subscriptions),
            broker_retained_messages: get(&self.broker_retained_messages),
            broker_retained_bytes: get(&self.broker_retained_bytes),
            broker_queued_bytes: get(&self.broker_queued_bytes),
            links_connected,
            links,
            module_fuel: self
                .module_fuel
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            module_run_us: self
                .module_run_us
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            handler_concurrency: Default::default(),
        }
    }
}

/// Adds `n` to `key`'s entry of a per-module map (saturating); a poisoned map is left alone.
fn add_to(map: &Mutex<BTreeMap<String, u64>>, key: &str, n: u64) {
    if let Ok(mut map) = map.lock() {
        match map.get_mut(key) {
            Some(total) => *total = total.saturating_add(n),
            None => {
                map.insert(key.to_string(), n);
            }
        }
    }
}

/// How many handler invocations run at once: filled in by the runtime
/// ([`crate::handlers::runtime::Runtime::concurrency`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Concurrency {
    /// Invocations running now.
    pub running: u64,
    /// Invocations waiting for a slot now.
    pub waiting: u64,
    /// The most invocations that ran at once.
    pub peak: u64,
    /// The most invocations of each module that ran at once.
    pub module_peaks: std::collections::BTreeMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_links_show_in_snapshot() {
        let m = Metrics::default();
        Metrics::add(&m.received, 3);
        Metrics::add(&m.delivered, 2);
        m.set_link_connected("cloud", true);
        m.set_link_connected("eu", false);
        let s = m.snapshot();
        assert_eq!(s.received, 3);
        assert_eq!(s.delivered, 2);
        assert_eq!(s.links_connected.get("cloud"), Some(&true));
        assert_eq!(s.links_connected.get("eu"), Some(&false));
        assert_eq!(s.links["cloud"].connects, 1);
    }

    #[test]
    fn link_failures_are_counted_per_cause_with_the_last_error() {
        let m = Metrics::default();
        m.record_link_failure("cloud", "tls-unknown-ca", "TLS: not trusted");
        m.record_link_failure("cloud", "tls-unknown-ca", "TLS: not trusted");
        m.record_link_failure("cloud", "bad-credentials", "bad password");
        m.record_credential_reload("cloud", Some("no key"));
        m.record_credential_reload("cloud", None);
        let link = &m.snapshot().links["cloud"];
        assert_eq!(link.failures["tls-unknown-ca"], 2);
        assert_eq!(link.failures["bad-credentials"], 1);
        assert_eq!(link.last_error_cause, "bad-credentials");
        assert_eq!(link.last_error, "bad password");
        assert!(link.last_error_ms > 0);
        assert_eq!(
            (link.credential_reloads, link.credential_reload_failures),
            (1, 1)
        );
        assert_eq!(link.last_reload_error, "no key");
        assert!(!link.connected);
    }
}
