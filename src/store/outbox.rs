//! The outbox: outputs waiting for their upstream link, in commit order per link.

use rusqlite::{params, Transaction, TransactionBehavior};

use super::dead_letters::{self, DeadLetterReason, NewDeadLetter, Stage};
use super::{Delta, Store, StoreError};

/// An output to queue for an upstream link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutboxRow {
    /// The upstream link's name.
    pub link: String,
    /// Stable message id (`<gateway>-<journal id>-<route>-<n>`), the same each time the event
    /// is processed, so that the upstream can drop duplicates.
    pub msg_id: String,
    /// The route that produced it.
    pub route: String,
    /// The MQTT topic to publish on.
    pub topic: String,
    /// The payload to publish.
    pub payload: Vec<u8>,
    /// When the source event was received, in ms since the Unix epoch.
    pub received_ms: u64,
    /// After this time (ms since the Unix epoch) the row is not sent but dead-lettered as
    /// `expired`; 0: never.
    pub expires_ms: u64,
    /// The region tags of its event ([`crate::event::join_tags`]): the row may only be sent
    /// on a link allowed to carry all of them.
    pub regions: String,
}

/// An outbox row its upstream acknowledged, to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The row id.
    pub id: i64,
    /// The length of its payload as stored (as read back in [`OutboxRow::payload`]).
    pub bytes: u64,
}

/// A queued output as read back from the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The row id; strictly increasing, never reused.
    pub id: i64,
    /// The stable message id given when the row was queued.
    pub msg_id: String,
    /// The MQTT topic to publish on.
    pub topic: String,
    /// The payload to publish.
    pub payload: Vec<u8>,
    /// Expiry time in ms since the Unix epoch; 0: never.
    pub expires_ms: u64,
    /// Region tags ([`crate::event::join_tags`]).
    pub regions: String,
}

/// Switches a connection to `synchronous=NORMAL` (commits atomic but synced later) for as long
/// as it lives, and back to `FULL` when dropped, whatever happened in between.
pub(super) struct UnsyncedCommits<'c>(pub(super) &'c mut rusqlite::Connection);

impl<'c> UnsyncedCommits<'c> {
    pub(super) fn new(conn: &'c mut rusqlite::Connection) -> rusqlite::Result<Self> {
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(UnsyncedCommits(conn))
    }
}

impl Drop for UnsyncedCommits<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.pragma_update(None, "synchronous", "FULL") {
            // Should never happen; the next writes would not be synced, so say so loudly.
            tracing::error!(error = %e, "cannot restore synchronous=FULL on the store connection");
        }
    }
}

/// What moving outbox rows to the dead letters did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    /// Rows moved (rows already gone are not counted).
    pub rows: u64,
    /// Older dead letters deleted to stay within the dead-letter cap.
    pub evicted_dead_letters: u64,
}

impl OutboxRow {
    /// What deleting this row once delivered takes.
    pub fn delivered(&self) -> Delivered {
        Delivered {
            id: self.id,
            bytes: self.payload.len() as u64,
        }
    }

    /// Whether the row's time to live has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }
}

impl Store {
    /// Up to `limit` rows queued for `link` with an id greater than `after`, oldest first.
    pub fn outbox_after(
        &self,
        link: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.outbox_batch(link, after, limit, usize::MAX)
    }

    /// Like [`Store::outbox_after`], but stops once the payloads read reach `max_bytes` (at
    /// least one row is returned when there is one), so a batch of large rows stays small in
    /// memory.
    pub fn outbox_batch(
        &self,
        link: &str,
        after: i64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.read_bounded(
            "SELECT id, msg_id, topic, payload, expires_ms, regions FROM outbox
             WHERE link = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![link, after, limit as i64],
            max_bytes,
            |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    msg_id: r.get(1)?,
                    topic: r.get(2)?,
                    payload: r.get(3)?,
                    expires_ms: r.get::<_, i64>(4)? as u64,
                    regions: r.get(5)?,
                })
            },
            |row| row.payload.len(),
        )
    }

    /// Removes delivered rows. Rows that are already gone (expired or evicted meanwhile) are
    /// ignored; a row given twice is removed once.
    ///
    /// The delete is atomic but not synced to disk on its own: it becomes durable with the
    /// next synced commit (or WAL checkpoint). A power cut before that brings the rows back,
    /// and they are sent again: a duplicate, which the upstream can drop by message id, never
    /// a loss. This spares one disk sync per batch of acknowledgements.
    pub fn delete_outbox(&self, rows: &[Delivered]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sorted = rows.to_vec();
        sorted.sort_unstable_by_key(|r| r.id);
        sorted.dedup_by_key(|r| r.id);
        let mut guard = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let conn = UnsyncedCommits::new(&mut guard).map_err(|e| self.err(e))?;
        let mut tx = conn
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let (mut deleted_rows, mut deleted_bytes) = (0i64, 0i64);
        // One statement per run of consecutive ids: an upstream acknowledges in the order of
        // the publishes, so the rows of one link's batch are usually one run. The sizes come
        // with the ids (the uplink read the rows), so the delete need not read them back.
        for run in sorted.chunk_by(|a, b| b.id == a.id + 1) {
            let (first, last) = (run[0].id, run[run.len() - 1].id);
            let run_bytes: i64 = run.iter().map(|r| r.bytes as i64).sum();
            let mut savepoint = tx.savepoint().map_err(|e| self.err(e))?;
            let deleted = savepoint
                .prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")
                .and_then(|mut delete| delete.execute(params![first, last]))
                .map_err(|e| self.err(e))?;
            if deleted == run.len() {
                savepoint.commit().map_err(|e| self.err(e))?;
                deleted_rows += deleted as i64;
                deleted_bytes += run_bytes;
                continue;
            }
            // Some of the run was gone already (the totals counted its removal): row by row,
            // to count only what this delete removes.
            savepoint.rollback().map_err(|e| self.err(e))?;
            drop(savepoint);
            let mut delete = tx
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .map_err(|e| self.err(e))?;
            for row in run {
                if delete.execute(params![row.id]).map_err(|e| self.err(e))? == 1 {
                    deleted_rows += 1;
                    deleted_bytes += row.bytes as i64;
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))?;
        Delta {
            outbox_rows: -deleted_rows,
            outbox_bytes: -deleted_bytes,
            ..Delta::default()
        }
        .apply(&self.totals);
        Ok(())
    }

    /// Moves rows whose time to live has passed to the dead letters (reason `expired`), in one
    /// transaction that also keeps the dead letters within their cap.
    pub fn expire_outbox(&self, ids: &[i64]) -> Result<Moved, StoreError> {
        self.outbox_to_dead_letters(
            ids,
            DeadLetterReason::Expired,
            "time to live passed before delivery",
        )
    }

    /// Moves a row the upstream refused for good to the dead letters (reason `rejected`, with
    /// the upstream's `detail`), keeping the dead letters within their cap.
    pub fn reject_outbox(&self, id: i64, detail: &str) -> Result<Moved, StoreError> {
        self.outbox_to_dead_letters(&[id], DeadLetterReason::Rejected, detail)
    }

    /// Moves rows whose region tags their link may not carry to the dead letters (reason
    /// `residency`), keeping the dead letters within their cap.
    pub fn refuse_outbox(&self, ids: &[i64], detail: &str) -> Result<Moved, StoreError> {
        self.outbox_to_dead_letters(ids, DeadLetterReason::Residency, detail)
    }

    fn outbox_to_dead_letters(
        &self,
        ids: &[i64],
        reason: DeadLetterReason,
        detail: &str,
    ) -> Result<Moved, StoreError> {
        if ids.is_empty() {
            return Ok(Moved::default());
        }
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let mut delta = Delta::default();
        for id in ids {
            if let Some(letter) = take(&tx, *id, &reason, detail).map_err(|e| self.err(e))? {
                dead_letters::insert(&tx, &letter).map_err(|e| self.err(e))?;
                delta.outbox_rows -= 1;
                delta.outbox_bytes -= letter.payload.len() as i64;
                delta.add_dead(&letter);
            }
        }
        let (evicted, freed) = self
            .enforce_dead_letter_cap(&tx, &delta)
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        let moved = Moved {
            rows: (-delta.outbox_rows) as u64,
            evicted_dead_letters: evicted as u64,
        };
        delta.dead_rows -= evicted;
        delta.dead_bytes -= freed;
        delta.apply(&self.totals);
        Ok(moved)
    }

    /// How many rows are queued, for one link or for all.
    pub fn outbox_depth(&self, link: Option<&str>) -> Result<u64, StoreError> {
        let Some(link) = link else {
            return Ok(self.outbox_rows());
        };
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM outbox WHERE link = ?1",
                params![link],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }
}

/// Queues one row inside a transaction.
pub(super) fn insert(tx: &Transaction<'_>, o: &NewOutboxRow) -> rusqlite::Result<()> {
    insert_all(tx, std::slice::from_ref(o))
}

/// Queues rows inside a transaction, in order, many per statement (a pipeline batch holds
/// hundreds).
pub(super) fn insert_all(tx: &Transaction<'_>, rows: &[NewOutboxRow]) -> rusqlite::Result<()> {
    let now = crate::event::now_ms() as i64;
    super::insert_rows(
        tx,
        "outbox (link, msg_id, route, topic, payload, received_ms, created_ms, expires_ms, regions)",
        9,
        rows,
        |statement, at, o| {
            statement.raw_bind_parameter(at, &o.link)?;
            statement.raw_bind_parameter(at + 1, &o.msg_id)?;
            statement.raw_bind_parameter(at + 2, &o.route)?;
            statement.raw_bind_parameter(at + 3, &o.topic)?;
            statement.raw_bind_parameter(at + 4, &o.payload)?;
            statement.raw_bind_parameter(at + 5, o.received_ms as i64)?;
            statement.raw_bind_parameter(at + 6, now)?;
            statement.raw_bind_parameter(at + 7, o.expires_ms as i64)?;
            statement.raw_bind_parameter(at + 8, &o.regions)
        },
    )
}

/// The detail of outputs evicted from a full outbox.
const EVICTED_DETAIL: &str = "outbox full (policy drop-oldest)";

/// Deletes one outbox row and returns it as a dead letter with `reason`.
fn take(
    tx: &Transaction<'_>,
    id: i64,
    reason: &DeadLetterReason,
    detail: &str,
) -> rusqlite::Result<Option<NewDeadLetter>> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM outbox WHERE id = ?1
         RETURNING link, msg_id, route, topic, payload, received_ms, regions",
    )?;
    let mut rows = stmt.query(params![id])?;
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let row = NewOutboxRow {
        link: r.get(0)?,
        msg_id: r.get(1)?,
        route: r.get(2)?,
        topic: r.get(3)?,
        payload: r.get(4)?,
        received_ms: r.get::<_, i64>(5)? as u64,
        expires_ms: 0,
        regions: r.get(6)?,
    };
    Ok(Some(output_letter(row, reason.clone(), detail)))
}

/// The dead letter for an output evicted before it was ever queued.
pub(super) fn evicted_letter(o: &NewOutboxRow) -> NewDeadLetter {
    output_letter(o.clone(), DeadLetterReason::Evicted, EVICTED_DETAIL)
}

/// An output given up on, as a dead letter that a replay queues for the same link again.
fn output_letter(o: NewOutboxRow, reason: DeadLetterReason, detail: &str) -> NewDeadLetter {
    NewDeadLetter {
        stage: Stage::Output,
        event_id: 0,
        geo: tags_geo(&o.regions),
        route: o.route,
        module: None,
        module_version: None,
        link: Some(o.link),
        msg_id: Some(o.msg_id),
        reason,
        detail: detail.to_string(),
        attempts: 0,
        topic: o.topic,
        device: String::new(),
        client_id: String::new(),
        payload: o.payload,
        received_ms: o.received_ms,
    }
}

/// An output's region tags in the stored form of a dead letter's geography, so that a replay
/// queues it with the same tags.
fn tags_geo(tags: &str) -> String {
    crate::event::Geo {
        regions: crate::event::split_tags(tags).map(str::to_owned).collect(),
        ..crate::event::Geo::default()
    }
    .encode()
}

/// Moves the oldest rows (all links) out until at least `rows` rows and `bytes` payload bytes
/// are freed; returns (rows freed, bytes freed, the dead letters to insert).
pub(super) fn evict_oldest(
    tx: &Transaction<'_>,
    rows: i64,
    bytes: i64,
) -> rusqlite::Result<(i64, i64, Vec<NewDeadLetter>)> {
    let mut freed_rows = 0i64;
    let mut freed_bytes = 0i64;
    let mut letters = Vec::new();
    let oldest: Vec<i64> = {
        let mut stmt = tx.prepare_cached("SELECT id FROM outbox ORDER BY id LIMIT ?1")?;
        // Enough candidates for the row target, plus some for the byte target.
        let ids = stmt.query_map(params![rows.max(1) + 1024], |r| r.get(0))?;
        ids.collect::<rusqlite::Result<Vec<_>>>()?
    };
    for id in oldest {
        if freed_rows >= rows && freed_bytes >= bytes {
            break;
        }
        if let Some(letter) = take(tx, id, &DeadLetterReason::Evicted, EVICTED_DETAIL)? {
            freed_rows += 1;
            freed_bytes += letter.payload.len() as i64;
            letters.push(letter);
        }
    }
    Ok((freed_rows, freed_bytes, letters))
}
