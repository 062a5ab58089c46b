//! The journal: where a device publish becomes durable before the device is told so.
//!
//! The edge appends each publish with [`Journal::append`] and gets a [`Committed`] signal that
//! fires once the publish is in SQLite (`synchronous=FULL`); only then does the edge release the
//! PUBACK (or PUBREC) to the device. One thread does group commit: it takes everything queued
//! while the previous commit was syncing and writes it in one transaction, so the cost of a
//! disk sync is shared by every publish that arrived meanwhile and no publish waits for more
//! than one commit after its own.
//!
//! Guarantees:
//! - A signal fires only after the commit that contains its publish returned `Ok`.
//! - A commit that fails (disk full, read-only file system, I/O error) is logged, counted and
//!   retried with backoff; its publishes stay unacknowledged meanwhile, which stops the devices
//!   (backpressure) instead of losing anything.
//! - Publishes are journaled in the order `append` was called.
//!
//! The pipeline, not this module, reads the journal back (see [`crate::pipeline`]).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::store::{JournalWriter, NewJournalEntry, Store, StoreError};

/// Most publishes in one transaction.
const MAX_GROUP: usize = 8192;
/// Publishes that may wait for the journal thread before `append` waits too.
const QUEUE: usize = 65_536;
/// Bytes counted for one publish on top of its topic and payload (the entry's own fields).
const ENTRY_OVERHEAD: usize = 96;
/// The default of `broker.max_unjournaled_bytes`.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;

/// Fires when the publish it was returned for is durable. If the journal stops before that,
/// the signal is dropped unfired (the publish must not be acknowledged).
pub type Committed = oneshot::Receiver<()>;

struct Pending {
    entry: NewJournalEntry,
    done: Option<oneshot::Sender<()>>,
    /// The publish's share of the byte budget, given back once it is committed.
    _bytes: OwnedSemaphorePermit,
}

/// The edge's handle to the journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    queue: mpsc::Sender<Pending>,
    /// Bytes of publishes appended and not yet committed may not exceed this budget: the
    /// memory the journal holds is bounded in bytes, not only in entries.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

/// The journal thread; [`JournalThread::join`] waits until it has committed everything
/// appended before every [`Journal`] handle was dropped.
pub struct JournalThread(JoinHandle<()>);

/// The journal has stopped; nothing more can be appended.
#[derive(Debug, thiserror::Error)]
#[error("the journal has stopped")]
pub struct JournalClosed;

impl Journal {
    /// Starts the group-commit thread on its own write connection. `committed` is notified
    /// after every commit (the pipeline waits on it). At most `max_queued_bytes` of publishes
    /// (topic, payload and a fixed overhead each) wait for a commit at any time; `append`
    /// waits for room beyond that, which holds back the devices (backpressure).
    pub fn start(
        store: &Store,
        committed: Arc<Notify>,
        metrics: Arc<Metrics>,
        max_queued_bytes: usize,
    ) -> Result<(Journal, JournalThread), StoreError> {
        let budget_bytes = max_queued_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let mut writer = store.journal_writer()?;
        let (queue, mut rx) = mpsc::channel::<Pending>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("outpost-journal".into())
            .spawn(move || {
                let mut group: Vec<Pending> = Vec::with_capacity(MAX_GROUP);
                while let Some(first) = rx.blocking_recv() {
                    group.push(first);
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    // At the journal's cap the pipeline is far behind (or the outbox is full
                    // under reject-new): wait, holding these publishes' acknowledgements.
                    let mut waited = false;
                    while writer.is_full() {
                        if !waited {
                            Metrics::add(&metrics.journal_full_waits, 1);
                            error!("journal full: devices are not acknowledged until the pipeline catches up");
                            waited = true;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let entries: Vec<NewJournalEntry> =
                        group.iter().map(|p| p.entry.clone()).collect();
                    commit_in_pieces(&mut writer, &entries, &metrics, |range| {
                        for pending in &mut group[range] {
                            if let Some(done) = pending.done.take() {
                                let _ = done.send(());
                            }
                        }
                        committed.notify_one();
                    });
                    group.clear();
                    committed.notify_one();
                }
                info!("journal thread finished");
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok((
            Journal {
                queue,
                budget: Arc::new(Semaphore::new(budget_bytes)),
                budget_bytes,
            },
            JournalThread(thread),
        ))
    }

    /// Queues a publish for the next commit. With `want_signal`, returns the signal that fires
    /// when it is durable. Waits only when the journal thread is far behind (in entries or in
    /// bytes); a single publish larger than the whole budget waits until nothing else is
    /// queued.
    pub async fn append(
        &self,
        entry: NewJournalEntry,
        want_signal: bool,
    ) -> Result<Option<Committed>, JournalClosed> {
        let (done, signal) = if want_signal {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let size = entry.topic.len() + entry.payload.len() + ENTRY_OVERHEAD;
        let permits = u32::try_from(size.min(self.budget_bytes)).unwrap_or(u32::MAX);
        let bytes = match self.budget.clone().try_acquire_many_owned(permits) {
            Ok(permit) => permit,
            Err(_) => self
                .budget
                .clone()
                .acquire_many_owned(permits)
                .await
                .map_err(|_| JournalClosed)?,
        };
        self.queue
            .send(Pending {
                entry,
                done,
                _bytes: bytes,
            })
            .await
            .map_err(|_| JournalClosed)?;
        Ok(signal)
    }
}

/// Commits `entries` in order, calling `on_commit` with the index range of each piece that
/// became durable. A piece that does not fit in the journal's share of the database size cap,
/// or whose commit fails (disk full, I/O error), is retried in halves, so a group larger than
/// the room left still goes in as far as it fits; at a single entry it waits, with backoff,
/// until it fits and commits (the entries stay unacknowledged meanwhile: backpressure).
fn commit_in_pieces(
    writer: &mut JournalWriter,
    entries: &[NewJournalEntry],
    metrics: &Metrics,
    mut on_commit: impl FnMut(std::ops::Range<usize>),
) {
    let mut start = 0;
    let mut piece = entries.len();
    let mut failures: u32 = 0;
    let mut waiting_for_room = false;
    while start < entries.len() {
        let end = (start + piece).min(entries.len());
        let slice = &entries[start..end];
        let result = match writer.has_room_for(slice) {
            Ok(true) => writer.append(slice).map(|()| true),
            other => other,
        };
        match result {
            Ok(true) => {
                Metrics::add(&metrics.journaled, slice.len() as u64);
                on_commit(start..end);
                start = end;
                failures = 0;
                if waiting_for_room {
                    info!("room in the database again; acknowledging devices");
                    waiting_for_room = false;
                }
            }
            Ok(false) if piece > 1 => piece /= 2,
            Ok(false) => {
                if !waiting_for_room {
                    Metrics::add(&metrics.journal_full_waits, 1);
                    error!(held = entries.len() - start,
                        "database size cap (store.max_db_mib) reached: devices are not acknowledged until delivered outputs free space");
                    waiting_for_room = true;
                }
                std::thread::sleep(Duration::from_millis(50));
                piece = (entries.len() - start).min(64);
            }
            Err(e) if piece > 1 => {
                tracing::debug!(error = %e, piece, "journal commit failed; retrying in halves");
                piece /= 2;
            }
            Err(e) => {
                failures += 1;
                Metrics::add(&metrics.store_errors, 1);
                if failures == 1 || failures.is_multiple_of(20) {
                    error!(error = %e, attempt = failures, held = entries.len() - start,
                        "cannot commit to the journal; holding acknowledgements and retrying");
                }
                std::thread::sleep(Duration::from_millis(50 * u64::from(failures.min(40))));
                // Room may come back for more than one entry at a time.
                piece = (entries.len() - start).min(64);
            }
        }
    }
}

impl JournalThread {
    /// Waits for the thread to commit what it has and stop (after every handle was dropped).
    pub fn join(self) {
        let _ = self.0.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimits;

    fn entry(payload_bytes: usize) -> NewJournalEntry {
        NewJournalEntry {
            topic: "telemetry/dev/x".into(),
            payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
            qos: 1,
            retain: false,
            client_id: Arc::from("dev"),
            received_ms: 0,
        }
    }

    /// While the journal cannot commit, the publishes it holds stay within the byte budget:
    /// the append that would exceed it waits. A publish larger than the whole budget still
    /// goes in when nothing else is held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_wait_beyond_the_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            journal_max_rows: 1,
            ..StoreLimits::default()
        };
        let store = Store::open_with(dir.path(), limits).unwrap();
        let metrics = Arc::new(Metrics::default());
        let budget = 1024 * 1024;
        let (journal, _thread) =
            Journal::start(&store, Arc::new(Notify::new()), metrics.clone(), budget).unwrap();
        // A publish larger than the budget is taken (alone) and committed: the journal is
        // then full, so the thread holds whatever it takes next.
        let first = journal.append(entry(2 * budget), true).await.unwrap();
        first.unwrap().await.expect("committed");

        let size = 100 * 1024;
        let mut accepted = 0usize;
        loop {
            let append = journal.append(entry(size), false);
            match tokio::time::timeout(Duration::from_millis(500), append).await {
                Ok(result) => {
                    result.unwrap();
                    accepted += 1;
                    assert!(accepted < 100, "appends never waited");
                }
                Err(_) => break,
            }
        }
        let held = accepted * (size + "telemetry/dev/x".len() + ENTRY_OVERHEAD);
        assert!(held <= budget, "{accepted} publishes held: {held} bytes");
        assert!(
            held + 2 * (size + ENTRY_OVERHEAD) > budget,
            "waited too early: {accepted} publishes, {held} bytes"
        );
        assert!(journal.budget.available_permits() < size + ENTRY_OVERHEAD);
    }
}
