//! Invoking a route's handler on a group of events: the module's circuit breaker, the route's
//! limits, and what becomes of the events when the handler fails or cannot run.
//!
//! Guarantees:
//! - A failed group of several events is retried event by event at once, so that only the
//!   events that still fail are retried later; the breaker counts those single outcomes (one
//!   poisoned event never counts twice), and a probe's outcome always.
//! - Failures of the host (not the module's fault) never count against the module.
//! - A failed event is retried with backoff until the route's `max_attempts` are spent, then
//!   becomes a dead letter with the failure's reason; events of a module that cannot run
//!   (quarantined, not deployed) wait or become dead letters per the route's `on_quarantine`,
//!   their attempts unspent.
//!
//! Does not: choose which events run together (see `lanes`) or commit anything.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::QuarantinePolicy;
use crate::event::{now_ms, Event, Output};
use crate::handlers::breaker::{Admission, Transition};
use crate::handlers::runtime::{Handler, HandlerFailure, InvokeLimits};
use crate::metrics::Metrics;
use crate::routing::Route;
use crate::store::{Batch, DeadLetterReason};

use super::emit;
use super::records::{self, OnRoute, Pending};
use super::{Pipeline, RoutePolicy};

/// How often events of a declared but undeployed module look again for their handler.
const NOT_DEPLOYED_RECHECK: Duration = Duration::from_secs(2);

impl RoutePolicy {
    /// The limits of an invocation on this route: the runtime's `defaults`, with each limit
    /// the route sets in its place.
    pub fn limits(&self, defaults: InvokeLimits) -> InvokeLimits {
        InvokeLimits {
            deadline: self.deadline.unwrap_or(defaults.deadline),
            memory_limit_bytes: (self.memory_limit_bytes).unwrap_or(defaults.memory_limit_bytes),
            max_outputs: self.max_outputs.unwrap_or(defaults.max_outputs),
            max_output_bytes: self.max_output_bytes.unwrap_or(defaults.max_output_bytes),
        }
    }
}

/// Why a module's events are held instead of run.
struct Held {
    reason: DeadLetterReason,
    detail: String,
    /// When to try again.
    left: Duration,
}

impl Pipeline {
    /// Runs the route's handler on events that share a topic; on failure, retries them one by
    /// one so that only the failing ones are retried later.
    pub(super) async fn run_handler(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        group: Vec<Pending>,
        batch: &mut Batch,
    ) {
        let Some(module) = route.handler.as_deref() else {
            return;
        };
        // The handler is looked up per group: a deploy takes effect at the next group, and
        // this group finishes on the version it started with.
        let Some(handler) = self.registry.handler(module) else {
            // Declared but not deployed (or removed): the events wait for a deploy.
            let on = OnRoute {
                route,
                policy,
                version: None,
            };
            let held = Held {
                reason: DeadLetterReason::NotDeployed,
                detail: format!("module {module:?} is not deployed"),
                left: NOT_DEPLOYED_RECHECK,
            };
            self.hold(on, group, held, batch);
            return;
        };
        let on = OnRoute {
            route,
            policy,
            version: Some(handler.version()),
        };
        let admission = self.breaker.admit(module, Instant::now());
        if let Admission::Quarantined(left) = admission {
            self.hold_quarantined(on, group, left, batch);
            return;
        }
        let events: Vec<Event> = group.iter().map(|p| p.event.clone()).collect();
        // A failed batch of several is retried event by event right away, and those outcomes
        // are what the breaker counts: one poisoned event must not count twice. A probe's
        // outcome always counts (the breaker waits for it).
        let count_failure = group.len() == 1 || admission == Admission::Probe;
        match self
            .invoke_guarded(module, &handler, events, policy, count_failure)
            .await
        {
            Ok(outputs) => {
                if let Some(first) = group.first() {
                    for (n, output) in outputs.into_iter().enumerate() {
                        emit::emit(self.site(), on, first, Some(output), n, batch);
                    }
                }
            }
            Err(failure) if group.len() == 1 => {
                for p in &group {
                    self.fail(on, p, &failure, batch);
                }
            }
            Err(failure) => {
                debug!(route = %route.name, %failure, size = group.len(), "batch failed; retrying its events one by one");
                self.run_one_by_one(on, module, &handler, group, batch)
                    .await;
            }
        }
    }

    /// Runs the handler on each event of a failed group alone, until the breaker trips.
    async fn run_one_by_one(
        &self,
        on: OnRoute<'_>,
        module: &str,
        handler: &Handler,
        group: Vec<Pending>,
        batch: &mut Batch,
    ) {
        let mut rest = group.into_iter();
        while let Some(p) = rest.next() {
            if let Admission::Quarantined(left) = self.breaker.admit(module, Instant::now()) {
                // The failures so far tripped the breaker: the rest wait it out.
                let held: Vec<Pending> = std::iter::once(p).chain(rest).collect();
                self.hold_quarantined(on, held, left, batch);
                return;
            }
            let event = vec![p.event.clone()];
            match self
                .invoke_guarded(module, handler, event, on.policy, true)
                .await
            {
                Ok(outputs) => {
                    for (n, output) in outputs.into_iter().enumerate() {
                        emit::emit(self.site(), on, &p, Some(output), n, batch);
                    }
                }
                Err(failure) => self.fail(on, &p, &failure, batch),
            }
        }
    }

    /// Invokes the handler and tells the circuit breaker how it went: a success always, a
    /// failure when `count_failure`. Failures of the host (not the module's fault) never count
    /// against the module.
    async fn invoke_guarded(
        &self,
        module: &str,
        handler: &Handler,
        events: Vec<Event>,
        policy: &RoutePolicy,
        count_failure: bool,
    ) -> Result<Vec<Output>, HandlerFailure> {
        let result = invoke(module, handler, events, policy, &self.metrics).await;
        let blamed = matches!(&result, Err(f) if !matches!(f, HandlerFailure::Host(_)));
        if blamed && !count_failure {
            return result;
        }
        match self.breaker.record(module, !blamed, Instant::now()) {
            Transition::Opened { failures } => {
                Metrics::add(&self.metrics.quarantines, 1);
                warn!(%module, failures, cooldown = ?self.breaker.cooldown(), "module quarantined after consecutive failures; its events wait (or are dead-lettered, per route)");
            }
            Transition::Closed => info!(%module, "module out of quarantine"),
            Transition::None => {}
        }
        self.metrics
            .set_quarantined(self.breaker.quarantined(Instant::now()));
        result
    }

    /// Events of a quarantined module: see [`Pipeline::hold`].
    fn hold_quarantined(
        &self,
        on: OnRoute<'_>,
        group: Vec<Pending>,
        left: Duration,
        batch: &mut Batch,
    ) {
        Metrics::add(&self.metrics.quarantined_events, group.len() as u64);
        let module = on.route.handler.as_deref().unwrap_or_default();
        let held = Held {
            reason: DeadLetterReason::Quarantined,
            detail: format!("module {module:?} is quarantined after consecutive failures"),
            left,
        };
        self.hold(on, group, held, batch);
    }

    /// Events whose module cannot run now (quarantined, not deployed): per the route's
    /// `on_quarantine` policy, retries due after `held.left` (their attempts unspent) or dead
    /// letters with `held.reason`.
    fn hold(&self, on: OnRoute<'_>, group: Vec<Pending>, held: Held, batch: &mut Batch) {
        // At least a moment later, so a probe's own retry does not spin.
        let due = now_ms() + (held.left.as_millis() as u64).max(100);
        for p in group {
            let (reason, detail) = (held.reason.clone(), held.detail.clone());
            match on.policy.on_quarantine {
                QuarantinePolicy::Wait => batch.retries.push(on.retry(p, due, reason, detail)),
                QuarantinePolicy::DeadLetter => batch.dead.push(on.dead_letter(p, reason, detail)),
            }
        }
    }

    /// Schedules another attempt with backoff, or gives up when the route's attempts are spent.
    pub(super) fn fail(
        &self,
        on: OnRoute<'_>,
        p: &Pending,
        failure: &HandlerFailure,
        batch: &mut Batch,
    ) {
        let (route, retry) = (&on.route.name, &on.policy.retry);
        let attempts = p.attempts + 1;
        let done = Pending {
            attempts,
            ..p.clone()
        };
        let reason = records::failure_reason(failure);
        if attempts < retry.max_attempts {
            let delay = records::backoff(retry, attempts);
            debug!(%route, topic = %p.event.topic, reason = failure.reason(), attempts, ?delay, "handler failed; will retry");
            Metrics::add(&self.metrics.retries_scheduled, 1);
            let due = now_ms() + delay.as_millis() as u64;
            batch
                .retries
                .push(on.retry(done, due, reason, failure.to_string()));
            return;
        }
        warn!(%route, topic = %p.event.topic, reason = failure.reason(), attempts, %failure, "handler failed; event dead-lettered");
        batch
            .dead
            .push(on.dead_letter(done, reason, failure.to_string()));
    }
}

/// Runs the handler on `events` on a blocking thread with the route's limits, and counts the
/// invocation, its cost and its failure.
async fn invoke(
    module: &str,
    handler: &Handler,
    events: Vec<Event>,
    policy: &RoutePolicy,
    metrics: &Metrics,
) -> Result<Vec<Output>, HandlerFailure> {
    Metrics::add(&metrics.handler_invocations, 1);
    let handler = handler.clone();
    let limits = policy.limits(handler.default_limits());
    let invocation =
        tokio::task::spawn_blocking(move || handler.invoke_limited(&events, &limits)).await;
    let result = match invocation {
        Ok(invocation) => {
            if let Some(fuel) = invocation.fuel {
                metrics.add_module_fuel(module, fuel);
            }
            metrics.add_module_run_us(module, invocation.ran.as_micros() as u64);
            Metrics::add(
                &metrics.handler_wait_us,
                invocation.waited.as_micros() as u64,
            );
            Metrics::add(
                &metrics.handler_instantiate_us,
                invocation.instantiate.as_micros() as u64,
            );
            invocation.result
        }
        Err(e) => Err(HandlerFailure::Host(format!("handler task failed: {e}"))),
    };
    if result.is_err() {
        Metrics::add(&metrics.handler_failures, 1);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_policy_replaces_only_the_limits_it_sets() {
        let defaults = InvokeLimits {
            deadline: Duration::from_secs(1),
            memory_limit_bytes: 1 << 20,
            max_outputs: 10,
            max_output_bytes: 1000,
        };
        assert_eq!(RoutePolicy::default().limits(defaults), defaults);
        let policy = RoutePolicy {
            deadline: Some(Duration::from_millis(5)),
            max_outputs: Some(0),
            ..RoutePolicy::default()
        };
        let limits = policy.limits(defaults);
        assert_eq!(limits.deadline, Duration::from_millis(5));
        assert_eq!(limits.max_outputs, 0);
        assert_eq!(limits.memory_limit_bytes, defaults.memory_limit_bytes);
        assert_eq!(limits.max_output_bytes, defaults.max_output_bytes);
        let all = RoutePolicy {
            memory_limit_bytes: Some(7),
            max_output_bytes: Some(8),
            ..policy
        };
        let limits = all.limits(defaults);
        assert_eq!((limits.memory_limit_bytes, limits.max_output_bytes), (7, 8));
    }
}
