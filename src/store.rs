//! Every SQLite table of the gateway: the outbox (outputs waiting for their upstream), the
//! dead letters (events a handler failed on), and the handlers' key-value state.
//!
//! Guarantees:
//! - [`Store::commit`] inserts a batch of outbox rows and dead letters in one transaction,
//!   with `synchronous=FULL` in WAL mode: once it returns `Ok`, the rows survive a crash or a
//!   power cut.
//! - Outbox ids increase strictly and are never reused (`AUTOINCREMENT`), so `(gateway id,
//!   outbox id)` is a stable message id, and reading a link's rows by id gives them in the order
//!   they were committed.
//! - A row leaves the outbox only through [`Store::delete_outbox`], which the uplink calls when
//!   the upstream acknowledged it.
//!
//! All calls block on SQLite; async callers run them on a blocking thread. This module knows
//! nothing about MQTT or handlers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::runtime::KvBackend;

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
    /// A database thread could not be started.
    #[error("cannot start a database thread: {0}")]
    Thread(String),
    /// A lock was poisoned by a panic in another thread.
    #[error("database lock poisoned")]
    Poisoned,
}

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
}

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
    pub client_id: std::sync::Arc<str>,
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
}

impl JournalWriter {
    /// Durably appends entries in one transaction: when this returns `Ok`, all of them survive
    /// a crash or a power cut; on `Err`, none of them was written.
    pub fn append(&mut self, entries: &[NewJournalEntry]) -> Result<(), StoreError> {
        let path = &self.path;
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO journal (topic, payload, qos, retain, client_id, received_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            for e in entries {
                insert
                    .execute(params![
                        e.topic,
                        &e.payload[..],
                        e.qos,
                        e.retain,
                        &*e.client_id,
                        e.received_ms as i64
                    ])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}

/// An event a route could not process, to keep for inspection and replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    /// The route it was on.
    pub route: String,
    /// The handler module, if any.
    pub module: Option<String>,
    /// A short machine-readable reason (`trap`, `timeout`, `handler-error`, ...).
    pub reason: String,
    /// The human-readable detail (trap message, handler error text).
    pub detail: String,
    /// How many times it was tried.
    pub attempts: u32,
    /// The event's topic.
    pub topic: String,
    /// The event's device.
    pub device: String,
    /// The event's payload, as published.
    pub payload: Vec<u8>,
    /// When the event was received, in ms since the Unix epoch.
    pub received_ms: u64,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id.
    pub id: i64,
    /// Everything recorded about it.
    pub letter: NewDeadLetter,
}

/// The gateway's database. Cheap to share behind an `Arc`.
pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

/// Each entry upgrades the schema by one version; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        link        TEXT    NOT NULL,
        msg_id      TEXT    NOT NULL,
        route       TEXT    NOT NULL,
        topic       TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        received_ms INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE INDEX outbox_by_link ON outbox(link, id);
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        route       TEXT    NOT NULL,
        module      TEXT,
        reason      TEXT    NOT NULL,
        detail      TEXT    NOT NULL,
        attempts    INTEGER NOT NULL,
        topic       TEXT    NOT NULL,
        device      TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        received_ms INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE TABLE journal (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        topic       TEXT    NOT NULL,
        payload     BLOB    NOT NULL,
        qos         INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        client_id   TEXT    NOT NULL,
        received_ms INTEGER NOT NULL
    );
    CREATE TABLE kv (
        module TEXT NOT NULL,
        key    TEXT NOT NULL,
        value  BLOB NOT NULL,
        PRIMARY KEY (module, key)
    ) WITHOUT ROWID;
"#];

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and brings its schema up to date.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE);
        let writer = open_connection(&path)?;
        migrate(&writer, &path)?;
        let reader = open_connection(&path)?;
        Ok(Store {
            path,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    /// A separate write connection for the journal's group-commit thread.
    pub fn journal_writer(&self) -> Result<JournalWriter, StoreError> {
        Ok(JournalWriter {
            path: self.path.clone(),
            conn: open_connection(&self.path)?,
        })
    }

    /// Up to `limit` journaled publishes with an id greater than `after`, oldest first.
    pub fn journal_after(&self, after: i64, limit: usize) -> Result<Vec<JournalRow>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, topic, payload, client_id, received_ms FROM journal WHERE id > ?1
                 ORDER BY id LIMIT ?2",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok(JournalRow {
                    id: r.get(0)?,
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    client_id: r.get(3)?,
                    received_ms: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// How many publishes are journaled and not yet routed.
    pub fn journal_depth(&self) -> Result<u64, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Durably queues outputs and dead letters and removes the journal rows they came from,
    /// all in one transaction: all of it happens or none of it (an event has one durable home
    /// at a time).
    pub fn commit(
        &self,
        outputs: &[NewOutboxRow],
        dead: &[NewDeadLetter],
        journal_done: &[i64],
    ) -> Result<(), StoreError> {
        if outputs.is_empty() && dead.is_empty() && journal_done.is_empty() {
            return Ok(());
        }
        let now = crate::event::now_ms() as i64;
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO outbox (link, msg_id, route, topic, payload, received_ms, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| self.err(e))?;
            for o in outputs {
                insert
                    .execute(params![
                        o.link,
                        o.msg_id,
                        o.route,
                        o.topic,
                        o.payload,
                        o.received_ms as i64,
                        now
                    ])
                    .map_err(|e| self.err(e))?;
            }
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (route, module, reason, detail, attempts, topic,
                         device, payload, received_ms, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(|e| self.err(e))?;
            for d in dead {
                insert
                    .execute(params![
                        d.route,
                        d.module,
                        d.reason,
                        d.detail,
                        d.attempts,
                        d.topic,
                        d.device,
                        d.payload,
                        d.received_ms as i64,
                        now
                    ])
                    .map_err(|e| self.err(e))?;
            }
            let mut delete = tx
                .prepare_cached("DELETE FROM journal WHERE id = ?1")
                .map_err(|e| self.err(e))?;
            for id in journal_done {
                delete.execute(params![id]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Up to `limit` rows queued for `link` with an id greater than `after`, oldest first.
    pub fn outbox_after(
        &self,
        link: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, msg_id, topic, payload FROM outbox WHERE link = ?1 AND id > ?2
                 ORDER BY id LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![link, after, limit as i64], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    msg_id: r.get(1)?,
                    topic: r.get(2)?,
                    payload: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Removes delivered rows. Ids that are already gone are ignored.
    pub fn delete_outbox(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .map_err(|e| self.err(e))?;
            for id in ids {
                delete.execute(params![id]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// How many rows are queued, for one link or for all.
    pub fn outbox_depth(&self, link: Option<&str>) -> Result<u64, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let n: i64 = match link {
            Some(link) => conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE link = ?1",
                params![link],
                |r| r.get(0),
            ),
            None => conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0)),
        }
        .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// How many dead letters are kept.
    pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// The newest `limit` dead letters, newest first.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, route, module, reason, detail, attempts, topic, device, payload,
                        received_ms
                 FROM dead_letters ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    letter: NewDeadLetter {
                        route: r.get(1)?,
                        module: r.get(2)?,
                        reason: r.get(3)?,
                        detail: r.get(4)?,
                        attempts: r.get(5)?,
                        topic: r.get(6)?,
                        device: r.get(7)?,
                        payload: r.get(8)?,
                        received_ms: r.get::<_, i64>(9)? as u64,
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

impl KvBackend for Store {
    fn get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let value = conn
            .query_row(
                "SELECT value FROM kv WHERE module = ?1 AND key = ?2",
                params![module, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(value)
    }

    fn set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        conn.execute(
            "INSERT INTO kv (module, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (module, key) DO UPDATE SET value = excluded.value",
            params![module, key, value],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
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
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        conn.execute_batch(&format!(
            "BEGIN; {step}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(link: &str, n: u8) -> NewOutboxRow {
        NewOutboxRow {
            link: link.into(),
            msg_id: format!("gw-{n}"),
            route: "r".into(),
            topic: format!("t/{n}"),
            payload: vec![n],
            received_ms: 1,
        }
    }

    #[test]
    fn outbox_is_per_link_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .commit(&[row("a", 1), row("b", 2), row("a", 3)], &[], &[])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let a = store.outbox_after("a", 0, 10).unwrap();
        assert_eq!(
            a.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(a[0].id < a[1].id);
        assert_eq!(store.outbox_after("a", a[0].id, 10).unwrap().len(), 1);
        assert_eq!(store.outbox_depth(None).unwrap(), 3);
        store.delete_outbox(&[a[0].id]).unwrap();
        assert_eq!(store.outbox_depth(Some("a")).unwrap(), 1);
        assert_eq!(store.outbox_depth(Some("b")).unwrap(), 1);
    }

    #[test]
    fn ids_are_never_reused_after_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.commit(&[row("a", 1)], &[], &[]).unwrap();
        let first = store.outbox_after("a", 0, 1).unwrap()[0].id;
        store.delete_outbox(&[first]).unwrap();
        store.commit(&[row("a", 2)], &[], &[]).unwrap();
        let second = store.outbox_after("a", 0, 1).unwrap()[0].id;
        assert!(second > first);
    }

    #[test]
    fn dead_letters_and_kv_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let letter = NewDeadLetter {
            route: "r".into(),
            module: Some("m".into()),
            reason: "trap".into(),
            detail: "unreachable".into(),
            attempts: 1,
            topic: "t".into(),
            device: "d".into(),
            payload: b"x".to_vec(),
            received_ms: 5,
        };
        store
            .commit(&[], std::slice::from_ref(&letter), &[])
            .unwrap();
        let kept = store.dead_letters(10).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].letter, letter);
        assert_eq!(store.dead_letter_count().unwrap(), 1);

        assert_eq!(store.get("m", "k").unwrap(), None);
        store.set("m", "k", b"1").unwrap();
        store.set("m", "k", b"2").unwrap();
        assert_eq!(store.get("m", "k").unwrap(), Some(b"2".to_vec()));
        assert_eq!(store.get("other", "k").unwrap(), None);
    }

    #[test]
    fn journal_rows_leave_with_their_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut writer = store.journal_writer().unwrap();
        let entry = |n: u8| NewJournalEntry {
            topic: format!("t/{n}"),
            payload: bytes::Bytes::from(vec![n]),
            qos: 1,
            retain: false,
            client_id: "c".into(),
            received_ms: 7,
        };
        writer.append(&[entry(1), entry(2)]).unwrap();
        let rows = store.journal_after(0, 10).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].topic.as_str(), rows[0].client_id.as_str()),
            ("t/1", "c")
        );
        store.commit(&[row("a", 1)], &[], &[rows[0].id]).unwrap();
        assert_eq!(store.journal_depth().unwrap(), 1);
        assert_eq!(store.outbox_depth(None).unwrap(), 1);
        assert_eq!(
            store.journal_after(rows[0].id, 10).unwrap()[0].id,
            rows[1].id
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(conn);
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    }
}
