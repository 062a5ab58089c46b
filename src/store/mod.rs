//! Every SQLite table of the gateway: the journal (device publishes not yet routed), the
//! retries (events waiting for another handler attempt), the outbox (outputs waiting for their
//! upstream), the dead letters, and the handlers' key-value state.
//!
//! Guarantees:
//! - Every write that backs a promise (journal append, [`Store::commit`]) is one transaction
//!   with `synchronous=FULL` in WAL mode: once it returns `Ok`, it survives a crash or a power
//!   cut; on `Err`, none of it happened.
//! - One durable home at a time: [`Store::commit`] inserts a batch's outputs, dead letters and
//!   retries and deletes the journal and retry rows they came from in the same transaction.
//! - Ids of journal, outbox and dead-letter rows increase strictly and are never reused
//!   (`AUTOINCREMENT`), so reading by id gives commit order.
//! - Caps are enforced inside the transaction that would exceed them: the outbox's by its
//!   policy ([`OutboxPolicy`]), the dead letters' by evicting the oldest (counted in
//!   [`CommitReport`]). The database's own size cap ([`StoreLimits::max_db_bytes`]) turns into
//!   a "database or disk is full" error, which callers treat like a full disk: retry, hold.
//!
//! All calls block on SQLite; async callers run them on a blocking thread. This module knows
//! nothing about MQTT or handlers.

mod dead_letters;
mod devices;
mod journal;
mod kv;
mod modules;
mod outbox;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

pub use dead_letters::{
    DeadLetter, DeadLetterFilter, DeadLetterReason, NewDeadLetter, NewRetry, RetryReason, RetryRow,
    RouteSet, Stage,
};
pub use devices::DevicePosition;
pub use journal::{JournalRow, JournalWriter, NewJournalEntry};
pub use modules::{CommandRefused, Deployed, ModuleSummary, StoredModule};
pub use outbox::{Delivered, Moved, NewOutboxRow, OutboxRow};

/// The database file inside the data directory.
pub const DB_FILE: &str = "outpost.db";

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused the operation (disk full, read-only file system, corruption, ...).
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The database was written by a newer outpost.
    #[error("database {path} has schema version {found}; this outpost knows up to {known}")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// The outbox is at its cap and the policy is `reject-new`: nothing was written.
    #[error(
        "outbox full ({rows} rows, {bytes} bytes queued); policy reject-new holds new data back"
    )]
    OutboxFull {
        /// Rows queued.
        rows: i64,
        /// Payload bytes queued.
        bytes: i64,
    },
    /// A database thread could not be started.
    #[error("cannot start a database thread: {0}")]
    Thread(String),
    /// A lock was poisoned by a panic in another thread.
    #[error("database lock poisoned")]
    Poisoned,
}

impl StoreError {
    /// Whether this is SQLite's "database or disk is full" (a real full disk, or the
    /// configured size cap).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
            if e.code == rusqlite::ErrorCode::DiskFull)
    }
}

/// What to do when the outbox is at its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutboxPolicy {
    /// Refuse new outputs: the pipeline waits, the journal fills, and then devices stop being
    /// acknowledged (backpressure: they keep their data).
    #[default]
    RejectNew,
    /// Make room by moving the oldest queued rows to the dead letters (reason `evicted`).
    DropOldest,
}

/// Caps on what the database holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLimits {
    /// Whole database file, in bytes (0: only the disk limits it).
    pub max_db_bytes: u64,
    /// Rows in the journal before new publishes wait (are not acknowledged).
    pub journal_max_rows: i64,
    /// Rows in the outbox.
    pub outbox_max_rows: i64,
    /// Payload bytes in the outbox.
    pub outbox_max_bytes: i64,
    /// What happens at the outbox cap.
    pub outbox_policy: OutboxPolicy,
    /// Dead letters kept; beyond it the oldest are evicted.
    pub dead_letters_max_rows: i64,
    /// Payload bytes of dead letters kept.
    pub dead_letters_max_bytes: i64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_db_bytes: 0,
            journal_max_rows: 100_000,
            outbox_max_rows: 1_000_000,
            outbox_max_bytes: 256 * 1024 * 1024,
            outbox_policy: OutboxPolicy::RejectNew,
            dead_letters_max_rows: 100_000,
            dead_letters_max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Running totals, kept in memory so that caps cost no table scan. Loaded once at open.
#[derive(Debug, Default)]
pub(crate) struct Totals {
    journal_rows: AtomicI64,
    outbox_rows: AtomicI64,
    outbox_bytes: AtomicI64,
    dead_rows: AtomicI64,
    dead_bytes: AtomicI64,
    retry_rows: AtomicI64,
}

/// Everything one pipeline step changes, committed together by [`Store::commit`].
#[derive(Debug, Default)]
pub struct Batch {
    /// Outputs to queue.
    pub outputs: Vec<NewOutboxRow>,
    /// Events (or outputs) given up on.
    pub dead: Vec<NewDeadLetter>,
    /// Events to try again later.
    pub retries: Vec<NewRetry>,
    /// Journal rows fully handled by this batch.
    pub journal_done: Vec<i64>,
    /// Retry rows fully handled (or rescheduled as new retries) by this batch.
    pub retries_done: Vec<i64>,
    /// Device positions learned (registry updates), in order; the last one per device wins.
    pub devices: Vec<DevicePosition>,
    /// New events to journal (geofence transitions), processed like device publishes.
    pub events: Vec<NewJournalEntry>,
}

impl Batch {
    /// Whether committing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
            && self.dead.is_empty()
            && self.retries.is_empty()
            && self.journal_done.is_empty()
            && self.retries_done.is_empty()
            && self.devices.is_empty()
            && self.events.is_empty()
    }

    /// Adds everything `other` holds, after what this batch holds.
    pub fn append(&mut self, mut other: Batch) {
        self.outputs.append(&mut other.outputs);
        self.dead.append(&mut other.dead);
        self.retries.append(&mut other.retries);
        self.journal_done.append(&mut other.journal_done);
        self.retries_done.append(&mut other.retries_done);
        self.devices.append(&mut other.devices);
        self.events.append(&mut other.events);
    }
}

/// What a commit had to do to stay within the caps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitReport {
    /// Outbox rows moved to the dead letters (policy `drop-oldest`).
    pub evicted_outbox: u64,
    /// Dead letters deleted to stay within the dead-letter cap.
    pub evicted_dead_letters: u64,
}

/// The gateway's database. Cheap to share behind an `Arc`.
pub struct Store {
    path: PathBuf,
    limits: StoreLimits,
    totals: Arc<Totals>,
    /// The write connection. The journal's writer takes this lock too, around each of its
    /// transactions (on its own connection): SQLite lets one writer at a time into the
    /// database, and a writer that finds it busy sleeps in SQLite's busy handler for 1 ms,
    /// then 2, 5, 10 ms..., while a writer waiting on this lock wakes the moment it is free.
    writer: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
}

/// Each entry upgrades the schema by one version; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE journal (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        topic       TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        qos         INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        client_id   TEXT    NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        link        TEXT    NOT NULL,
        msg_id      TEXT    NOT NULL,
        route       TEXT    NOT NULL,
        topic       TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        received_ms INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL
    );
    CREATE INDEX outbox_by_link ON outbox(link, id);
    CREATE TABLE retries (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id        INTEGER NOT NULL,
        route           TEXT    NOT NULL,
        topic           TEXT    NOT NULL,
        device          TEXT    NOT NULL,
        client_id       TEXT    NOT NULL,
        payload         BLOB    NOT NULL,
        received_ms     INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        reason          TEXT    NOT NULL,
        detail          TEXT    NOT NULL
    );
    CREATE INDEX retries_by_due ON retries(next_attempt_ms);
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        stage       TEXT    NOT NULL,
        event_id    INTEGER NOT NULL,
        route       TEXT    NOT NULL,
        module      TEXT,
        link        TEXT,
        msg_id      TEXT,
        reason      TEXT    NOT NULL,
        detail      TEXT    NOT NULL,
        attempts    INTEGER NOT NULL,
        topic       TEXT    NOT NULL,
        device      TEXT    NOT NULL,
        client_id   TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        received_ms INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE TABLE kv (
        module TEXT NOT NULL,
        key    TEXT NOT NULL,
        value  BLOB NOT NULL,
        PRIMARY KEY (module, key)
    ) WITHOUT ROWID;
"#,
    // 2: which version of a handler module a dead letter failed in.
    "ALTER TABLE dead_letters ADD COLUMN module_version TEXT",
    // 3: deployed handler modules (active and previous version) and signed-command replay
    // protection.
    r#"
    CREATE TABLE modules (
        name         TEXT    NOT NULL,
        slot         TEXT    NOT NULL,
        version      TEXT    NOT NULL,
        sha256       TEXT    NOT NULL,
        signer       TEXT    NOT NULL,
        deployed_ms  INTEGER NOT NULL,
        wasm         BLOB    NOT NULL,
        artifact_key TEXT,
        artifact     BLOB,
        PRIMARY KEY (name, slot)
    );
    CREATE TABLE module_commands (
        name      TEXT    PRIMARY KEY,
        issued_ms INTEGER NOT NULL
    );
"#,
    // 4: geography: region tags on outbox rows, the geography of waiting events, and the
    // device registry (last known position and the geofences it is in).
    r#"
    ALTER TABLE outbox ADD COLUMN regions TEXT NOT NULL DEFAULT '';
    ALTER TABLE retries ADD COLUMN geo TEXT NOT NULL DEFAULT '';
    ALTER TABLE dead_letters ADD COLUMN geo TEXT NOT NULL DEFAULT '';
    CREATE TABLE devices (
        device     TEXT    PRIMARY KEY,
        lat        REAL    NOT NULL,
        lon        REAL    NOT NULL,
        fences     TEXT    NOT NULL,
        updated_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
"#,
];

impl Store {
    /// Opens (creating if needed) the database in `data_dir` with default limits.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, StoreLimits::default())
    }

    /// Opens (creating if needed) the database in `data_dir`, brings its schema up to date and
    /// loads the running totals.
    pub fn open_with(data_dir: &Path, limits: StoreLimits) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let writer = open_connection(&path, &limits)?;
        migrate(&writer, &path)?;
        let reader = open_connection(&path, &limits)?;
        let totals = Arc::new(load_totals(&writer).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?);
        Ok(Store {
            path,
            limits,
            totals,
            writer: Arc::new(Mutex::new(writer)),
            reader: Mutex::new(reader),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The caps this store enforces.
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Commits one pipeline step: queues outputs, records dead letters and retries, and removes
    /// the journal and retry rows they came from, all in one transaction, enforcing the caps.
    /// With policy `reject-new` and a full outbox it returns [`StoreError::OutboxFull`] and
    /// writes nothing.
    ///
    /// The transaction is atomic but not synced to disk on its own (`synchronous=NORMAL`): it
    /// becomes durable with the next synced commit (the journal's next group commit, which
    /// syncs the write-ahead log up to its own end) or checkpoint. A power cut before that
    /// rolls the whole step back, so the journal and retry rows it removed are there again and
    /// are processed again (outputs with the same message ids: duplicates at worst, never a
    /// loss); nothing it commits backs an acknowledgement. This spares one disk sync per batch.
    pub fn commit(&self, batch: &Batch) -> Result<CommitReport, StoreError> {
        let mut report = CommitReport::default();
        if batch.is_empty() {
            return Ok(report);
        }
        let new_rows = batch.outputs.len() as i64;
        let new_bytes: i64 = batch.outputs.iter().map(|o| o.payload.len() as i64).sum();
        let rows = self.totals.outbox_rows.load(Ordering::Relaxed);
        let bytes = self.totals.outbox_bytes.load(Ordering::Relaxed);
        let over_rows = rows + new_rows - self.limits.outbox_max_rows;
        let over_bytes = bytes + new_bytes - self.limits.outbox_max_bytes;
        let must_free = new_rows > 0 && (over_rows > 0 || over_bytes > 0);
        if must_free && self.limits.outbox_policy == OutboxPolicy::RejectNew {
            return Err(StoreError::OutboxFull { rows, bytes });
        }

        let mut guard = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let conn = outbox::UnsyncedCommits::new(&mut guard).map_err(|e| self.err(e))?;
        let tx = conn
            .0
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let mut delta = Delta::default();
        // Deletes first: the pages they free are reused by the inserts below, which matters
        // when the database is at its size cap.
        journal::delete(&tx, &batch.journal_done).map_err(|e| self.err(e))?;
        delta.journal_rows -= batch.journal_done.len() as i64;
        for id in &batch.retries_done {
            dead_letters::delete_retry(&tx, *id).map_err(|e| self.err(e))?;
        }
        delta.retry_rows -= batch.retries_done.len() as i64;
        // Under drop-oldest, a batch larger than the whole cap keeps only its newest outputs;
        // its older ones are evicted at once, like any older row.
        let mut skip = 0usize;
        if must_free {
            let (mut rows_left, mut bytes_left) =
                (self.limits.outbox_max_rows, self.limits.outbox_max_bytes);
            for output in batch.outputs.iter().rev() {
                rows_left -= 1;
                bytes_left -= output.payload.len() as i64;
                if rows_left < 0 || bytes_left < 0 {
                    break;
                }
                skip += 1;
            }
            skip = batch.outputs.len() - skip;
            for output in &batch.outputs[..skip] {
                let letter = outbox::evicted_letter(output);
                delta.add_dead(&letter);
                dead_letters::insert(&tx, &letter).map_err(|e| self.err(e))?;
            }
            let kept = &batch.outputs[skip..];
            let kept_rows = kept.len() as i64;
            let kept_bytes: i64 = kept.iter().map(|o| o.payload.len() as i64).sum();
            let over_rows = rows + kept_rows - self.limits.outbox_max_rows;
            let over_bytes = bytes + kept_bytes - self.limits.outbox_max_bytes;
            let (n, freed_bytes, letters) =
                outbox::evict_oldest(&tx, over_rows.max(0), over_bytes.max(0))
                    .map_err(|e| self.err(e))?;
            report.evicted_outbox = (n as usize + skip) as u64;
            delta.outbox_rows -= n;
            delta.outbox_bytes -= freed_bytes;
            for letter in letters {
                delta.add_dead(&letter);
                dead_letters::insert(&tx, &letter).map_err(|e| self.err(e))?;
            }
        }
        let kept = &batch.outputs[skip..];
        outbox::insert_all(&tx, kept).map_err(|e| self.err(e))?;
        delta.outbox_rows += kept.len() as i64;
        delta.outbox_bytes += kept.iter().map(|o| o.payload.len() as i64).sum::<i64>();
        for letter in &batch.dead {
            dead_letters::insert(&tx, letter).map_err(|e| self.err(e))?;
            delta.add_dead(letter);
        }
        for retry in &batch.retries {
            dead_letters::insert_retry(&tx, retry).map_err(|e| self.err(e))?;
        }
        delta.retry_rows += batch.retries.len() as i64;
        for position in &batch.devices {
            devices::upsert(&tx, position).map_err(|e| self.err(e))?;
        }
        journal::insert_all(&tx, &batch.events).map_err(|e| self.err(e))?;
        delta.journal_rows += batch.events.len() as i64;
        let (evicted, freed) = self
            .enforce_dead_letter_cap(&tx, &delta)
            .map_err(|e| self.err(e))?;
        report.evicted_dead_letters = evicted as u64;
        delta.dead_rows -= evicted;
        delta.dead_bytes -= freed;
        tx.commit().map_err(|e| self.err(e))?;
        delta.apply(&self.totals);
        Ok(report)
    }

    pub(super) fn enforce_dead_letter_cap(
        &self,
        tx: &Transaction<'_>,
        delta: &Delta,
    ) -> rusqlite::Result<(i64, i64)> {
        let rows = self.totals.dead_rows.load(Ordering::Relaxed) + delta.dead_rows;
        let bytes = self.totals.dead_bytes.load(Ordering::Relaxed) + delta.dead_bytes;
        let over_rows = rows - self.limits.dead_letters_max_rows;
        let over_bytes = bytes - self.limits.dead_letters_max_bytes;
        if over_rows <= 0 && over_bytes <= 0 {
            return Ok((0, 0));
        }
        dead_letters::evict_oldest(tx, over_rows.max(0), over_bytes.max(0))
    }

    /// Reads the rows `sql` selects with `params` on the read connection, in order, and stops
    /// once the payload bytes read (`payload_len` of each row) reach `max_bytes`; at least one
    /// row is returned when there is one, so a batch of large rows stays small in memory
    /// without ever stalling.
    pub(super) fn read_bounded<T>(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
        max_bytes: usize,
        read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        payload_len: impl Fn(&T) -> usize,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt.query_map(params, read).map_err(|e| self.err(e))?;
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let row = row.map_err(|e| self.err(e))?;
            bytes += payload_len(&row);
            batch.push(row);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(batch)
    }

    /// How many more outbox rows fit before the cap (never negative).
    pub fn outbox_room(&self) -> u64 {
        (self.limits.outbox_max_rows - self.totals.outbox_rows.load(Ordering::Relaxed)).max(0)
            as u64
    }

    /// Publishes journaled and not yet routed.
    pub fn journal_depth(&self) -> u64 {
        self.totals.journal_rows.load(Ordering::Relaxed).max(0) as u64
    }

    /// Rows queued in the outbox, all links together.
    pub fn outbox_rows(&self) -> u64 {
        self.totals.outbox_rows.load(Ordering::Relaxed).max(0) as u64
    }

    /// Dead letters kept.
    pub fn dead_letter_count(&self) -> u64 {
        self.totals.dead_rows.load(Ordering::Relaxed).max(0) as u64
    }
}

/// Changes to the running totals made by one transaction, applied once it committed.
#[derive(Debug, Default)]
pub(super) struct Delta {
    pub(super) journal_rows: i64,
    pub(super) outbox_rows: i64,
    pub(super) outbox_bytes: i64,
    pub(super) dead_rows: i64,
    pub(super) dead_bytes: i64,
    pub(super) retry_rows: i64,
}

impl Delta {
    pub(super) fn add_dead(&mut self, letter: &NewDeadLetter) {
        self.dead_rows += 1;
        self.dead_bytes += letter.payload.len() as i64;
    }

    pub(super) fn apply(&self, totals: &Totals) {
        totals
            .journal_rows
            .fetch_add(self.journal_rows, Ordering::Relaxed);
        totals
            .outbox_rows
            .fetch_add(self.outbox_rows, Ordering::Relaxed);
        totals
            .outbox_bytes
            .fetch_add(self.outbox_bytes, Ordering::Relaxed);
        totals
            .dead_rows
            .fetch_add(self.dead_rows, Ordering::Relaxed);
        totals
            .dead_bytes
            .fetch_add(self.dead_bytes, Ordering::Relaxed);
        totals
            .retry_rows
            .fetch_add(self.retry_rows, Ordering::Relaxed);
    }
}

fn load_totals(conn: &Connection) -> rusqlite::Result<Totals> {
    let pair = |sql: &str| -> rusqlite::Result<(i64, i64)> {
        conn.query_row(sql, [], |r| Ok((r.get(0)?, r.get(1)?)))
    };
    let (journal_rows, _) = pair("SELECT COUNT(*), 0 FROM journal")?;
    let (outbox_rows, outbox_bytes) =
        pair("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox")?;
    let (dead_rows, dead_bytes) =
        pair("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM dead_letters")?;
    let (retry_rows, _) = pair("SELECT COUNT(*), 0 FROM retries")?;
    Ok(Totals {
        journal_rows: AtomicI64::new(journal_rows),
        outbox_rows: AtomicI64::new(outbox_rows),
        outbox_bytes: AtomicI64::new(outbox_bytes),
        dead_rows: AtomicI64::new(dead_rows),
        dead_bytes: AtomicI64::new(dead_bytes),
        retry_rows: AtomicI64::new(retry_rows),
    })
}

/// The share of the size cap the journal may fill: the rest is headroom in which the pipeline
/// can still move events from the journal to the outbox, and the uplink delete delivered rows,
/// so that a full database drains instead of locking up.
const JOURNAL_SHARE_OF_CAP: f64 = 0.8;

fn open_connection(path: &Path, limits: &StoreLimits) -> Result<Connection, StoreError> {
    open_connection_capped(path, limits.max_db_bytes)
}

fn open_connection_capped(path: &Path, max_db_bytes: u64) -> Result<Connection, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(sql)?;
    // Writers (journal, pipeline, uplink deletes) take turns on SQLite's write lock.
    conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
    // WAL lets readers work while a writer commits; FULL makes every commit durable before it
    // returns, which is what acknowledging a publish and queuing an output promise.
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .map_err(sql)?;
    if max_db_bytes > 0 {
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(sql)?;
        let pages = (max_db_bytes as i64 / page_size.max(512)).max(16);
        conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
            .map_err(sql)?;
    }
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    upgrade_schema(conn, MIGRATIONS).map_err(|e| match e {
        SchemaError::Sqlite(source) => StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        },
        SchemaError::TooNew { found, known } => StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        },
    })
}

/// Rows one multi-row INSERT statement carries: a statement's set-up, and for tables with
/// AUTOINCREMENT the read and write of its sequence, are paid once per statement rather than
/// once per row.
const ROWS_PER_INSERT: usize = 32;

/// Inserts `rows` with `INSERT INTO {into} VALUES (...), (...), ...`, [`ROWS_PER_INSERT`]
/// rows per statement, in order; `bind` binds one row's `width` values starting at the given
/// parameter index (1-based).
pub(super) fn insert_rows<T>(
    tx: &Transaction<'_>,
    into: &str,
    width: usize,
    rows: &[T],
    bind: impl Fn(&mut rusqlite::Statement<'_>, usize, &T) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let tuple = format!("({})", vec!["?"; width].join(", "));
    let sql = |n: usize| {
        format!(
            "INSERT INTO {into} VALUES {}",
            vec![tuple.as_str(); n].join(", ")
        )
    };
    let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
    if rows.len() >= ROWS_PER_INSERT {
        let mut statement = tx.prepare_cached(&sql(ROWS_PER_INSERT))?;
        for chunk in &mut chunks {
            for (n, row) in chunk.iter().enumerate() {
                bind(&mut statement, 1 + n * width, row)?;
            }
            statement.raw_execute()?;
        }
    }
    if !chunks.remainder().is_empty() {
        let mut statement = tx.prepare_cached(&sql(1))?;
        for row in chunks.remainder() {
            bind(&mut statement, 1, row)?;
            statement.raw_execute()?;
        }
    }
    Ok(())
}

/// `ids` as runs of consecutive integers `(first, last)`, in ascending order, each id once: a
/// `BETWEEN first AND last` then deletes exactly them, in one statement per run instead of one
/// per row.
pub(crate) fn id_runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if id == *last + 1 => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// Why a database's schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// SQLite refused a step.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer outpost, whose schema this one does not know.
    #[error("schema version {found} is newer than this outpost's ({known})")]
    TooNew {
        /// The file's version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// Brings `conn`'s schema up to date: `migrations[i]` upgrades version `i` to `i + 1`, and
/// `PRAGMA user_version` records how many ran, each step in its own transaction (a crash
/// leaves a version that is whole). A file newer than `migrations` is refused, unchanged.
pub fn upgrade_schema(conn: &Connection, migrations: &[&str]) -> Result<(), SchemaError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = migrations.len() as i64;
    if version > known {
        return Err(SchemaError::TooNew {
            found: version,
            known,
        });
    }
    for (i, step) in migrations.iter().enumerate().skip(version as usize) {
        conn.execute_batch(&format!(
            "BEGIN; {step}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
