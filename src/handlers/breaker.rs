//! The circuit breaker for handler modules: a module whose invocations keep failing is
//! quarantined for a cool-down, so a broken deploy does not burn CPU (and retries) on every
//! event; after the cool-down one invocation is let through as a probe, and its outcome closes
//! the breaker again or starts another cool-down.
//!
//! Pure logic: time is passed in, nothing here sleeps or does I/O, so every transition is
//! tested without clocks.
//!
//! Guarantees:
//! - A module is quarantined only after `threshold` consecutive failed invocations; one success
//!   resets the count.
//! - While quarantined, [`Breaker::admit`] refuses every invocation of that module until the
//!   cool-down has passed; then it admits exactly one probe at a time until an outcome is
//!   recorded.
//! - A failed probe quarantines the module again for another cool-down; a successful one
//!   closes the breaker.
//! - Modules are independent: one module's failures never affect another's admission.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether an invocation of a module may run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Run it.
    Run,
    /// Run it as the one probe after a cool-down; record its outcome.
    Probe,
    /// Do not run it: the module is quarantined for this much longer.
    Quarantined(Duration),
}

/// What happened to the breaker when an outcome was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed state.
    None,
    /// The module was just quarantined (after `failures` consecutive failures).
    Opened {
        /// Consecutive failed invocations that tripped it.
        failures: u32,
    },
    /// A probe succeeded: the module is out of quarantine.
    Closed,
}

#[derive(Debug, Default)]
struct ModuleState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Per-module circuit breakers. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    modules: Mutex<HashMap<String, ModuleState>>,
}

impl Breaker {
    /// Breakers that open after `threshold` consecutive failures (at least 1) and stay open for
    /// `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            modules: Mutex::new(HashMap::new()),
        }
    }

    /// How long a quarantine lasts.
    pub fn cooldown(&self) -> Duration {
        self.cooldown
    }

    /// Whether `module` may be invoked at `now`.
    pub fn admit(&self, module: &str, now: Instant) -> Admission {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = modules.get_mut(module) else {
            return Admission::Run;
        };
        match state.open_until {
            None => Admission::Run,
            Some(until) if now < until => Admission::Quarantined(until - now),
            Some(_) if state.probing => Admission::Quarantined(Duration::ZERO),
            Some(_) => {
                state.probing = true;
                Admission::Probe
            }
        }
    }

    /// Records the outcome of an admitted invocation of `module` at `now`.
    pub fn record(&self, module: &str, success: bool, now: Instant) -> Transition {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let state = modules.entry(module.to_string()).or_default();
        if success {
            let was_open = state.open_until.is_some();
            *state = ModuleState::default();
            return if was_open {
                Transition::Closed
            } else {
                Transition::None
            };
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.open_until.is_some() {
            // A failed probe (or a late outcome of an invocation admitted before the breaker
            // opened): another full cool-down.
            state.open_until = Some(now + self.cooldown);
            state.probing = false;
            return Transition::None;
        }
        if state.consecutive_failures >= self.threshold {
            state.open_until = Some(now + self.cooldown);
            state.probing = false;
            return Transition::Opened {
                failures: state.consecutive_failures,
            };
        }
        Transition::None
    }

    /// Forgets `module`'s failures and ends its quarantine: a new version starts afresh.
    pub fn reset(&self, module: &str) {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules.remove(module);
    }

    /// The modules quarantined at `now`, with the time each has left (zero: waiting for its
    /// probe), sorted by name.
    pub fn quarantined(&self, now: Instant) -> Vec<(String, Duration)> {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let mut open: Vec<(String, Duration)> = modules
            .iter()
            .filter_map(|(name, state)| {
                state
                    .open_until
                    .map(|until| (name.clone(), until.saturating_duration_since(now)))
            })
            .collect();
        open.sort();
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const COOL: Duration = Duration::from_secs(30);

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let b = Breaker::new(3, COOL);
        let t = Instant::now();
        assert_eq!(b.record("m", false, t), Transition::None);
        assert_eq!(b.record("m", false, t), Transition::None);
        assert_eq!(b.record("m", true, t), Transition::None, "a success resets");
        assert_eq!(b.record("m", false, t), Transition::None);
        assert_eq!(b.record("m", false, t), Transition::None);
        assert_eq!(b.admit("m", t), Admission::Run);
        assert_eq!(b.record("m", false, t), Transition::Opened { failures: 3 });
        assert_eq!(b.admit("m", t), Admission::Quarantined(COOL));
        assert_eq!(b.quarantined(t), vec![("m".to_string(), COOL)]);
    }

    #[test]
    fn one_probe_after_the_cooldown_then_closed_or_reopened() {
        let b = Breaker::new(1, COOL);
        let t0 = Instant::now();
        assert_eq!(b.record("m", false, t0), Transition::Opened { failures: 1 });
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            b.admit("m", later),
            Admission::Quarantined(Duration::from_secs(20))
        );
        let after = t0 + COOL;
        assert_eq!(b.admit("m", after), Admission::Probe);
        assert_eq!(
            b.admit("m", after),
            Admission::Quarantined(Duration::ZERO),
            "one probe at a time"
        );
        // The probe fails: another full cool-down from then.
        assert_eq!(b.record("m", false, after), Transition::None);
        assert_eq!(b.admit("m", after), Admission::Quarantined(COOL));
        let again = after + COOL;
        assert_eq!(b.admit("m", again), Admission::Probe);
        assert_eq!(b.record("m", true, again), Transition::Closed);
        assert_eq!(b.admit("m", again), Admission::Run);
        assert!(b.quarantined(again).is_empty());
    }

    #[test]
    fn modules_are_independent() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record("bad", false, t);
        assert!(matches!(b.admit("bad", t), Admission::Quarantined(_)));
        assert_eq!(b.admit("good", t), Admission::Run);
    }

    proptest! {
        /// Whatever the sequence of outcomes, a module is refused only after `threshold`
        /// failures in a row, and never while fewer than that have failed since the last
        /// success.
        #[test]
        fn prop_quarantine_needs_threshold_failures_in_a_row(
            outcomes in proptest::collection::vec(any::<bool>(), 0..64),
            threshold in 1u32..6,
        ) {
            let b = Breaker::new(threshold, COOL);
            let t = Instant::now();
            let mut run = 0u32;
            let mut opened = false;
            for ok in outcomes {
                if opened {
                    break;
                }
                b.record("m", ok, t);
                run = if ok { 0 } else { run + 1 };
                opened = run >= threshold;
                let refused = matches!(b.admit("m", t), Admission::Quarantined(_));
                prop_assert_eq!(refused, opened);
            }
        }
    }
}
