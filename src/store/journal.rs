//! The journal table: device publishes, durable before they are acknowledged, until the
//! pipeline moves them on.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::{open_connection_capped, Store, StoreError, Totals, JOURNAL_SHARE_OF_CAP};

/// A device publish to journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJournalEntry {
    /// The topic it was published on.
    pub topic: String,
    /// The payload, as published.
    pub payload: bytes::Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// The publishing client's id.
    pub client_id: Arc<str>,
    /// When the gateway received it, in ms since the Unix epoch.
    pub received_ms: u64,
}

/// A journaled device publish not yet routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    /// Its id: strictly increasing, never reused; stable across restarts.
    pub id: i64,
    /// The topic it was published on.
    pub topic: String,
    /// The payload, as published.
    pub payload: Vec<u8>,
    /// The publishing client's id.
    pub client_id: String,
    /// When the gateway received it, in ms since the Unix epoch.
    pub received_ms: u64,
}

/// The journal's own write connection, owned by the journal's group-commit thread.
pub struct JournalWriter {
    path: PathBuf,
    conn: Connection,
    /// The store's write lock, held around each transaction (see `Store::writer`).
    gate: Arc<Mutex<Connection>>,
    totals: Arc<Totals>,
    max_rows: i64,
    /// Most bytes of the database in use (all tables) after a journal commit; 0: no cap.
    max_used_bytes: u64,
}

/// Bytes a journal entry takes beyond its payload and topic (row header, ids, client id,
/// b-tree overhead), for the room estimate.
const ENTRY_OVERHEAD: u64 = 96;

impl JournalWriter {
    /// Durably appends entries in one transaction: when this returns `Ok`, all of them survive
    /// a crash or a power cut; on `Err`, none of them was written.
    pub fn append(&mut self, entries: &[NewJournalEntry]) -> Result<(), StoreError> {
        let path = &self.path;
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // Held until the commit below: the other writers queue here, not in SQLite's sleeps.
        let _gate = self.gate.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        insert_all(&tx, entries).map_err(err)?;
        tx.commit().map_err(err)?;
        self.totals
            .journal_rows
            .fetch_add(entries.len() as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the journal is at its cap (the pipeline is that far behind): the caller should
    /// wait before appending more.
    pub fn is_full(&self) -> bool {
        self.totals.journal_rows.load(Ordering::Relaxed) >= self.max_rows
    }

    /// Whether `entries` fit in the journal's share of the database size cap, counting pages in
    /// use by every table (free pages left by delivered rows are room, unlike the file size).
    /// The rest of the cap is kept for the pipeline and the uplink, whose transactions free
    /// space but need some to run.
    pub fn has_room_for(&self, entries: &[NewJournalEntry]) -> Result<bool, StoreError> {
        if self.max_used_bytes == 0 {
            return Ok(true);
        }
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let pragma = |name: &str| -> Result<u64, StoreError> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                .map(|v| v.max(0) as u64)
                .map_err(err)
        };
        let used =
            pragma("page_count")?.saturating_sub(pragma("freelist_count")?) * pragma("page_size")?;
        let incoming: u64 = entries
            .iter()
            .map(|e| (e.payload.len() + e.topic.len()) as u64 + ENTRY_OVERHEAD)
            .sum();
        Ok(used + incoming <= self.max_used_bytes)
    }
}

impl Store {
    /// A separate write connection for the journal's group-commit thread.
    pub fn journal_writer(&self) -> Result<JournalWriter, StoreError> {
        Ok(JournalWriter {
            path: self.path.clone(),
            conn: open_connection_capped(
                &self.path,
                (self.limits.max_db_bytes as f64 * JOURNAL_SHARE_OF_CAP) as u64,
            )?,
            gate: self.writer.clone(),
            totals: self.totals.clone(),
            max_rows: self.limits.journal_max_rows,
            max_used_bytes: (self.limits.max_db_bytes as f64 * JOURNAL_SHARE_OF_CAP) as u64,
        })
    }

    /// Up to `limit` journaled publishes with an id greater than `after`, oldest first.
    pub fn journal_after(&self, after: i64, limit: usize) -> Result<Vec<JournalRow>, StoreError> {
        self.journal_batch(after, limit, usize::MAX)
    }

    /// Like [`Store::journal_after`], but stops once the payloads read reach `max_bytes` (at
    /// least one row is returned when there is one).
    pub fn journal_batch(
        &self,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<JournalRow>, StoreError> {
        self.read_bounded(
            "SELECT id, topic, payload, client_id, received_ms FROM journal WHERE id > ?1
             ORDER BY id LIMIT ?2",
            params![after, limit as i64],
            max_bytes,
            |r| {
                Ok(JournalRow {
                    id: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    client_id: r.get(3)?,
                    received_ms: r.get::<_, i64>(4)? as u64,
                })
            },
            |row| row.payload.len(),
        )
    }
}

/// Deletes the journal rows `ids` (in any order), one statement per run of consecutive ids: a
/// batch the pipeline read in id order is usually one run.
pub(super) fn delete(tx: &Transaction<'_>, ids: &[i64]) -> rusqlite::Result<()> {
    let mut delete = tx.prepare_cached("DELETE FROM journal WHERE id BETWEEN ?1 AND ?2")?;
    for (first, last) in super::id_runs(ids) {
        delete.execute(params![first, last])?;
    }
    Ok(())
}

/// Journals entries inside a transaction, in order, many per statement: the group commit's
/// (hundreds), or a pipeline batch's (events the gateway makes itself, such as geofence
/// transitions).
pub(super) fn insert_all(
    tx: &Transaction<'_>,
    entries: &[NewJournalEntry],
) -> rusqlite::Result<()> {
    super::insert_rows(
        tx,
        "journal (topic, payload, qos, retain, client_id, received_ms)",
        6,
        entries,
        |statement, at, e| {
            statement.raw_bind_parameter(at, &e.topic)?;
            statement.raw_bind_parameter(at + 1, &e.payload[..])?;
            statement.raw_bind_parameter(at + 2, e.qos)?;
            statement.raw_bind_parameter(at + 3, e.retain)?;
            statement.raw_bind_parameter(at + 4, &*e.client_id)?;
            statement.raw_bind_parameter(at + 5, e.received_ms as i64)
        },
    )
}
