//! Committing a batch: counting its dead letters, one store transaction retried until it
//! succeeds, and waking the uplinks that got rows.
//!
//! Guarantees: a batch is never skipped. A failing commit (disk full, read-only file system,
//! outbox full under `reject-new`) is retried with backoff, holding the batch, which lets the
//! journal fill and so stops the devices (backpressure). Each dead letter is counted once, by
//! reason, whatever step made it.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, warn};

use crate::metrics::Metrics;
use crate::store::{
    Batch, CommitReport, DeadLetterReason, NewDeadLetter, NewOutboxRow, StoreError,
};

use super::Pipeline;

impl Pipeline {
    /// Commits the batch, retrying until it succeeds, then wakes the uplinks that got rows.
    pub(super) async fn commit(&self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        tally(&self.metrics, &batch.dead);
        let batch = Arc::new(batch);
        let mut attempt: u32 = 0;
        loop {
            let store = self.store.clone();
            let pending = batch.clone();
            let result = tokio::task::spawn_blocking(move || store.commit(&pending))
                .await
                .unwrap_or_else(|e| Err(StoreError::Thread(e.to_string())));
            match result {
                Ok(report) => {
                    self.evicted(&report);
                    break;
                }
                Err(e @ StoreError::OutboxFull { .. }) => {
                    if attempt == 0 {
                        warn!(error = %e, "holding new outputs until the upstream drains the outbox");
                    }
                    Metrics::add(&self.metrics.outbox_full_waits, 1);
                    attempt = attempt.saturating_add(1);
                    // Deliveries free room; there is no faster signal to wait on here.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    Metrics::add(&self.metrics.store_errors, 1);
                    error!(error = %e, attempt, "cannot commit to the outbox; holding the batch and retrying");
                }
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(40)))).await;
        }
        Metrics::add(&self.metrics.queued, batch.outputs.len() as u64);
        self.wake(&batch.outputs);
    }

    /// Counts and reports what the commit evicted to stay within the caps.
    fn evicted(&self, report: &CommitReport) {
        Metrics::add(&self.metrics.evicted, report.evicted_outbox);
        Metrics::add(
            &self.metrics.dead_letters_evicted,
            report.evicted_dead_letters,
        );
        if report.evicted_outbox > 0 {
            warn!(
                rows = report.evicted_outbox,
                "outbox full: oldest rows moved to the dead letters (drop-oldest)"
            );
        }
        if report.evicted_dead_letters > 0 {
            warn!(
                rows = report.evicted_dead_letters,
                "dead letters full: oldest deleted"
            );
        }
    }

    /// Wakes each uplink that `outputs` were queued for, once.
    fn wake(&self, outputs: &[NewOutboxRow]) {
        let mut woken: Vec<&str> = Vec::new();
        for row in outputs {
            if !woken.contains(&row.link.as_str()) {
                woken.push(&row.link);
                if let Some(wake) = self.wakes.get(&row.link) {
                    wake.notify_one();
                }
            }
        }
    }
}

/// Counts the pipeline's dead letters, all of them and by reason, and logs those the
/// operator's configuration causes (an output topic that cannot be rendered).
fn tally(metrics: &Metrics, dead: &[NewDeadLetter]) {
    Metrics::add(&metrics.dead_lettered, dead.len() as u64);
    for letter in dead {
        let counter = match &letter.reason {
            DeadLetterReason::BadLocation => &metrics.bad_locations,
            DeadLetterReason::NoLocation => &metrics.no_location,
            DeadLetterReason::Malformed => &metrics.malformed,
            DeadLetterReason::Residency => &metrics.residency_refusals,
            DeadLetterReason::BadOutputTopic => {
                warn!(route = %letter.route, error = %letter.detail, "output topic cannot be rendered; dead-lettered");
                &metrics.render_failures
            }
            _ => continue,
        };
        Metrics::add(counter, 1);
    }
}
