//! The signal that tells a stage's tasks to stop: a [`Trigger`] held by whoever stops the
//! stage (the gateway), and a [`Shutdown`] in each of the stage's tasks (mini-redis's
//! `Shutdown` is the model).
//!
//! Guarantees:
//! - Once [`Trigger::fire`] was called, [`Shutdown::is_shutdown`] is true and
//!   [`Shutdown::recv`] returns at once, in every `Shutdown` of that trigger, including those
//!   subscribed later: a task cannot miss the signal by looking at the wrong moment.
//! - A dropped trigger counts as fired: when the gateway is gone (dropped without a shutdown,
//!   or a start that failed half-way), its tasks stop instead of running on unowned.
//! - [`Shutdown::recv`] is cancel safe: it can be a branch of `tokio::select!` in a loop.
//!
//! This module does not decide the order in which stages stop, nor wait for their tasks: the
//! gateway does both ([`crate::gateway`]).

use tokio::sync::watch;

/// The stopping side of one stage's signal. Dropping it stops the stage's tasks too.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

impl Trigger {
    /// A trigger that has not fired.
    pub fn new() -> Trigger {
        Trigger {
            tx: watch::channel(false).0,
        }
    }

    /// A signal for one more task; already shut down if the trigger has fired.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    /// Tells every task holding one of this trigger's [`Shutdown`]s to stop. Firing again
    /// changes nothing.
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Default for Trigger {
    fn default() -> Self {
        Trigger::new()
    }
}

/// The listening side of one stage's signal, one per task (clone it for another).
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether the task should stop: its trigger has fired or is gone.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow() || self.rx.is_closed()
    }

    /// Returns once the task should stop (at once if it already should). Cancel safe.
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which is a shutdown too.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `recv` returns within a short while.
    async fn returns(shutdown: &mut Shutdown) -> bool {
        tokio::time::timeout(Duration::from_millis(50), shutdown.recv())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn waits_until_fired_then_returns_every_time() {
        let trigger = Trigger::new();
        let mut shutdown = trigger.subscribe();
        let mut clone = shutdown.clone();
        assert!(!shutdown.is_shutdown());
        assert!(!returns(&mut shutdown).await);
        trigger.fire();
        for signal in [&mut shutdown, &mut clone] {
            assert!(signal.is_shutdown());
            assert!(returns(signal).await);
            // Not a one-shot: a loop that looks again still sees it.
            assert!(returns(signal).await);
        }
        trigger.fire();
        assert!(shutdown.is_shutdown());
    }

    #[tokio::test]
    async fn a_late_subscriber_sees_an_earlier_fire() {
        let trigger = Trigger::new();
        trigger.fire();
        let mut late = trigger.subscribe();
        assert!(late.is_shutdown());
        assert!(returns(&mut late).await);
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_a_shutdown() {
        let trigger = Trigger::new();
        let mut shutdown = trigger.subscribe();
        drop(trigger);
        assert!(shutdown.is_shutdown());
        assert!(returns(&mut shutdown).await);
    }

    #[tokio::test]
    async fn a_task_blocked_in_recv_wakes_when_fired() {
        let trigger = Trigger::new();
        let mut shutdown = trigger.subscribe();
        let task = tokio::spawn(async move { shutdown.recv().await });
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken")
            .expect("not panicked");
    }
}
