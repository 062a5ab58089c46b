//! The one place that builds the pipeline's stored records of events: retries (an event
//! queued for its handler lane is a retry row too) and dead letters, from an event and what is
//! known of its history, and when the next attempt falls due.
//!
//! Guarantees: a record carries its event whole (id, topic, device, client, payload, receipt
//! time) and its geography in stored form, so that a retry or a replay of the record sees the
//! same event, location and region tags; a dead letter names its route, the route's module
//! and the module's version (when known) and the attempts made.
//!
//! Does not: decide whether an event is retried or given up on (see `invoke`), or touch the
//! store; pure, except for [`backoff`]'s random jitter.

use std::time::Duration;

use rand::RngExt;

use crate::config::RetryConfig;
use crate::event::{Event, Geo};
use crate::handlers::runtime::HandlerFailure;
use crate::routing::Route;
use crate::store::{DeadLetterReason, NewDeadLetter, NewRetry, RetryReason, Stage};

use super::RoutePolicy;

/// One event on one route, with what is known of its history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pending {
    /// The event.
    pub(crate) event: Event,
    /// Handler attempts already made.
    pub(crate) attempts: u32,
    /// Its outputs stay on the gateway (an event without location under `local-only`).
    pub(crate) local: bool,
}

impl Pending {
    /// A new event: no attempt made, outputs may leave the gateway.
    pub(crate) fn new(event: Event) -> Pending {
        Pending {
            event,
            attempts: 0,
            local: false,
        }
    }

    /// A stored retry as the event it holds, with its geography and attempts.
    pub(crate) fn from_retry(r: NewRetry) -> Pending {
        let geo = Geo::decode(&r.geo);
        Pending {
            event: Event {
                id: r.event_id,
                topic: r.topic,
                device: r.device,
                client_id: r.client_id,
                payload: r.payload,
                received_ms: r.received_ms,
                location: geo.location,
                regions: geo.regions,
            },
            attempts: r.attempts,
            local: geo.local,
        }
    }

    /// The event's geography in its stored form.
    pub(crate) fn geo(&self) -> String {
        Geo {
            location: self.event.location,
            regions: self.event.regions.clone(),
            local: self.local,
        }
        .encode()
    }
}

/// A route as the pipeline's steps see it: the route, its policy, and the version of its
/// module that the records name (`None`: no module, or none deployed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OnRoute<'a> {
    /// The route.
    pub(crate) route: &'a Route,
    /// Its policy.
    pub(crate) policy: &'a RoutePolicy,
    /// The version of its module, for dead letters.
    pub(crate) version: Option<&'a str>,
}

impl OnRoute<'_> {
    /// The dead letter of `p` on this route.
    pub(crate) fn dead_letter(
        &self,
        p: Pending,
        reason: DeadLetterReason,
        detail: String,
    ) -> NewDeadLetter {
        let module = self.route.handler.as_deref();
        letter(&self.route.name, module, self.version, p, reason, detail)
    }

    /// `p` queued for the route's lane, due at `now_ms`: new work, not a failure.
    pub(crate) fn queued(&self, p: Pending, now_ms: u64) -> NewRetry {
        retry(
            &self.route.name,
            p,
            now_ms,
            RetryReason::Queued,
            String::new(),
        )
    }

    /// Another attempt at `p` (with `p.attempts` made) at `next_attempt_ms`, after the last
    /// one failed, or could not be made, for `reason`.
    pub(crate) fn retry(
        &self,
        p: Pending,
        next_attempt_ms: u64,
        reason: DeadLetterReason,
        detail: String,
    ) -> NewRetry {
        let reason = RetryReason::Failed(reason);
        retry(&self.route.name, p, next_attempt_ms, reason, detail)
    }
}

/// The dead letter of a waiting event whose route (`route`, by name) is no longer configured,
/// with its geography `geo` as stored (not re-encoded: JSON numbers may not read back to the
/// same last bit).
pub(crate) fn no_route(p: Pending, route: &str, geo: String) -> NewDeadLetter {
    let detail = format!("route {route:?} is no longer configured");
    NewDeadLetter {
        geo,
        ..letter(route, None, None, p, DeadLetterReason::NoRoute, detail)
    }
}

/// The dead-letter reason of a handler failure: the same string as [`HandlerFailure::reason`].
pub(crate) fn failure_reason(failure: &HandlerFailure) -> DeadLetterReason {
    match failure {
        HandlerFailure::Trap(_) => DeadLetterReason::Trap,
        HandlerFailure::Timeout => DeadLetterReason::Timeout,
        HandlerFailure::OutOfMemory => DeadLetterReason::OutOfMemory,
        HandlerFailure::Error(_) => DeadLetterReason::HandlerError,
        HandlerFailure::OutputLimit(_) => DeadLetterReason::OutputLimit,
        HandlerFailure::Host(_) => DeadLetterReason::HostError,
    }
}

/// The delay before attempt `attempts + 1`: `backoff_ms * 2^(attempts-1)`, capped, times a
/// random factor in [0.5, 1) so that many failing events do not retry in lockstep.
pub(crate) fn backoff(retry: &RetryConfig, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let base = retry
        .backoff_ms
        .saturating_mul(1u64 << exponent)
        .min(retry.backoff_max_ms);
    let jitter = rand::rng().random_range(0.5..1.0);
    Duration::from_millis(((base as f64) * jitter) as u64)
}

fn letter(
    route: &str,
    module: Option<&str>,
    version: Option<&str>,
    p: Pending,
    reason: DeadLetterReason,
    detail: String,
) -> NewDeadLetter {
    NewDeadLetter {
        stage: Stage::Event,
        geo: p.geo(),
        event_id: p.event.id,
        route: route.to_string(),
        module: module.map(str::to_string),
        module_version: version.map(str::to_string),
        link: None,
        msg_id: None,
        reason,
        detail,
        attempts: p.attempts,
        topic: p.event.topic,
        device: p.event.device,
        client_id: p.event.client_id,
        payload: p.event.payload,
        received_ms: p.event.received_ms,
    }
}

fn retry(
    route: &str,
    p: Pending,
    next_attempt_ms: u64,
    reason: RetryReason,
    detail: String,
) -> NewRetry {
    NewRetry {
        geo: p.geo(),
        event_id: p.event.id,
        route: route.to_string(),
        topic: p.event.topic,
        device: p.event.device,
        client_id: p.event.client_id,
        payload: p.event.payload,
        received_ms: p.event.received_ms,
        attempts: p.attempts,
        next_attempt_ms,
        reason,
        detail,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::Location;
    use crate::routing::{RouteSpec, RouteTable};
    use proptest::prelude::*;

    pub(crate) fn event(id: u64, topic: &str, payload: &[u8]) -> Event {
        Event {
            id,
            topic: topic.into(),
            device: "d".into(),
            client_id: "c".into(),
            payload: payload.to_vec(),
            received_ms: 1_000 + id,
            location: None,
            regions: Vec::new(),
        }
    }

    fn handler_route() -> Route {
        let spec = RouteSpec {
            name: "enrich".into(),
            filter: "t/#".into(),
            device_segment: 1,
            handler: Some("m".into()),
            upstream: "up".into(),
            topic: None,
            when: None,
        };
        RouteTable::compile(&[spec]).unwrap().routes()[0].clone()
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let retry = RetryConfig {
            max_attempts: 10,
            backoff_ms: 100,
            backoff_max_ms: 1000,
        };
        for (attempts, base) in [
            (1, 100u64),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (20, 1000),
        ] {
            for _ in 0..50 {
                let d = backoff(&retry, attempts).as_millis() as u64;
                assert!(
                    d >= base / 2 && d < base,
                    "attempt {attempts}: {d} not in [{}, {base})",
                    base / 2
                );
            }
        }
    }

    #[test]
    fn failure_reasons_are_the_runtimes_strings() {
        for failure in [
            HandlerFailure::Trap("x".into()),
            HandlerFailure::Timeout,
            HandlerFailure::OutOfMemory,
            HandlerFailure::Error("x".into()),
            HandlerFailure::OutputLimit("x".into()),
            HandlerFailure::Host("x".into()),
        ] {
            assert_eq!(failure_reason(&failure).as_str(), failure.reason());
        }
    }

    #[test]
    fn records_name_the_route_module_and_version() {
        let route = handler_route();
        let policy = RoutePolicy::default();
        let on = OnRoute {
            route: &route,
            policy: &policy,
            version: Some("v1"),
        };
        let p = Pending {
            attempts: 2,
            ..Pending::new(event(7, "t/d", b"x"))
        };
        let dead = on.dead_letter(p.clone(), DeadLetterReason::Timeout, "slow".into());
        assert_eq!(
            (dead.route.as_str(), dead.module.as_deref()),
            ("enrich", Some("m"))
        );
        assert_eq!(
            (dead.module_version.as_deref(), dead.attempts),
            (Some("v1"), 2)
        );
        assert_eq!((dead.stage, dead.event_id), (Stage::Event, 7));
        let queued = on.queued(p.clone(), 5);
        assert_eq!(queued.reason, RetryReason::Queued);
        assert_eq!((queued.next_attempt_ms, queued.detail.as_str()), (5, ""));
        let gone = no_route(p, "old", "stored".into());
        assert_eq!(gone.geo, "stored");
        assert_eq!(gone.reason, DeadLetterReason::NoRoute);
        assert_eq!((gone.module, gone.module_version), (None, None));
        assert_eq!(gone.detail, "route \"old\" is no longer configured");
    }

    proptest! {
        /// A retry read back is the event that was stored, with its geography and attempts.
        #[test]
        fn a_retry_round_trips_its_event(
            id in any::<u64>(),
            attempts in 0u32..100,
            payload in proptest::collection::vec(any::<u8>(), 0..32),
            regions in proptest::collection::btree_set("[a-z]{1,4}", 0..3),
            // Multiples of 1/256: their JSON text reads back exactly.
            at in proptest::option::of((-90 * 256..=90 * 256, -180 * 256..=180 * 256)),
            local in any::<bool>(),
        ) {
            let route = handler_route();
            let policy = RoutePolicy::default();
            let on = OnRoute { route: &route, policy: &policy, version: None };
            let mut e = event(id, "t/dev", &payload);
            e.regions = regions.into_iter().collect();
            e.location = at.map(|(lat, lon)| Location {
                lat: f64::from(lat) / 256.0,
                lon: f64::from(lon) / 256.0,
            });
            let p = Pending { event: e, attempts, local };
            let stored = on.retry(p.clone(), 9, DeadLetterReason::Trap, "d".into());
            prop_assert_eq!(stored.reason.as_str(), "trap");
            prop_assert_eq!(Pending::from_retry(stored), p);
        }
    }
}
