//! The broker's state on disk: kept sessions (their expiry, their subscriptions and the QoS
//! 1/2 messages queued or in flight for them) and retained messages, in SQLite next to the
//! journal (`broker.sqlite` in the data directory), so that they survive a restart, a
//! `kill -9` and a power cut (MQTT 3.1.1 §4.1, MQTT 5 §4.1: the session state a server keeps).
//!
//! Guarantees:
//! - The broker records every change while it holds its own lock, so changes reach the disk in
//!   the order they happened; one writer thread commits them in batches, one transaction each
//!   (WAL, `synchronous=FULL`): after a crash the file holds the state as of a batch.
//! - [`Persister::committed`] fires once everything recorded until then is on disk: the front
//!   holds a device's PUBACK/PUBREC behind it when the publish changed durable state (a
//!   retained message, a message queued for a kept session), as it holds it behind the
//!   journal. So an acknowledged publish is in every kept session it matched after a crash.
//! - Changes that cancel out before they are written (a message queued and acknowledged within
//!   one batch, a retained topic set twice) are written once or not at all: what waits to be
//!   written refers to what the broker holds in memory (payloads are shared), so it is bounded
//!   by the broker's own bounds.
//! - A batch that cannot be written (a full disk) is retried every second, the same batch in
//!   the same order; nothing recorded is dropped, and the acknowledgements waiting for it wait.
//!   Each failure is counted (`broker_store_errors`) and logged.
//!
//! Does not: keep QoS 0 messages (as Mosquitto, which does not queue them for clients that
//! are away); keep the wills of connections that were open when the gateway stopped, or the
//! retained messages still owed to a new subscription (it gets them when it subscribes
//! again); decide anything: the broker says what changed.
//!
//! In the data path: beside [`super::broker`], which records into it and reads it back at
//! start ([`Persister::open`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::outbound::{Message, Restored};
use super::retained;
use super::sessions::Expiry;
use crate::metrics::Metrics;
use crate::store::SchemaError;

/// The file, in the data directory.
pub const FILE_NAME: &str = "broker.sqlite";

/// How long a failed batch waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Why the durable state could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// SQLite refused.
    #[error("broker state {path}: {source}")]
    Sqlite {
        /// The file.
        path: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The file was written by a newer outpost.
    #[error("broker state {path}: schema version {found} is newer than this outpost's ({known})")]
    NewerSchema {
        /// The file.
        path: String,
        /// Its version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
}

/// A kept session as it was on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptSession {
    /// Its client id.
    pub client_id: Arc<str>,
    /// Its expiry (never [`Expiry::AtDisconnect`]).
    pub expiry: Expiry,
    /// When it ends (`None`: its client was connected when the gateway stopped, or never).
    pub ends_at_ms: Option<u64>,
    /// Its subscriptions: filter, SUBSCRIBE options byte, subscription identifier.
    pub subscriptions: Vec<(String, u8, Option<u32>)>,
    /// Its QoS 1/2 messages, in the order they were queued.
    pub messages: Vec<Restored>,
    /// The username its client last connected with (its read rights are that user's while
    /// it is away).
    pub username: Option<Arc<str>>,
    /// Packet ids of its client's QoS 2 publishes received and not yet released, oldest
    /// first.
    pub incoming_qos2: Vec<u16>,
}

/// What [`Persister::open`] read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The kept sessions.
    pub sessions: Vec<KeptSession>,
    /// The retained messages that have not expired.
    pub retained: Vec<(Arc<str>, retained::Message)>,
    /// The first durable message id not used yet.
    pub next_message_id: u64,
}

/// A kept session as saved: its expiry, when it ends, and its client's username.
type SessionRow = (Expiry, Option<u64>, Option<Arc<str>>);

/// A subscription as kept on disk: its SUBSCRIBE options byte and subscription identifier.
type SubscriptionRow = (u8, Option<u32>);

/// A change to one queued message, coalesced with the ones before it in the same batch.
#[derive(Debug)]
enum MessageOp {
    /// Queued (and perhaps sent, and released) since the last batch.
    Insert {
        client: Arc<str>,
        message: Message,
        packet_id: Option<u16>,
        released: bool,
    },
    /// Already on disk: sent under this packet id, or released.
    Update {
        packet_id: Option<u16>,
        released: bool,
    },
    /// Already on disk, and done with.
    Delete,
}

/// The changes recorded since the writer last took them.
#[derive(Debug, Default)]
struct Batch {
    /// Sessions that ended: every row of theirs goes, before anything else of the batch.
    ended: HashSet<Arc<str>>,
    /// Kept sessions saved: expiry, end, username of the client.
    sessions: HashMap<Arc<str>, SessionRow>,
    /// By client and filter: its options byte and identifier, or `None` once removed.
    subscriptions: HashMap<(Arc<str>, String), Option<SubscriptionRow>>,
    /// By durable id, which is the order they were queued in.
    messages: BTreeMap<u64, (Arc<str>, MessageOp)>,
    retained: HashMap<Arc<str>, Option<retained::Message>>,
    /// QoS 2 publishes of a client: received (true) or released (false), with the order of
    /// their last record (the order the broker forgets them in is the order received).
    incoming_qos2: HashMap<(Arc<str>, u16), (u64, bool)>,
    /// Records so far, to order `incoming_qos2`.
    records: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.ended.is_empty()
            && self.sessions.is_empty()
            && self.subscriptions.is_empty()
            && self.messages.is_empty()
            && self.retained.is_empty()
            && self.incoming_qos2.is_empty()
    }
}

/// What the broker and the writer share.
#[derive(Debug, Default)]
struct Pending {
    batch: Batch,
    /// Changes recorded so far (each record counts one).
    recorded: u64,
    /// Changes the writer has taken.
    taken: u64,
    /// Changes on disk.
    written: u64,
    /// Receivers waiting for `written` to reach their mark.
    waiters: Vec<(u64, oneshot::Sender<()>)>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The writer of the broker's durable state (see the module documentation). Dropping it
/// writes what is recorded (trying a few times if the disk refuses) and stops the writer.
#[derive(Debug)]
pub struct Persister {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// The changes being recorded, while the broker holds its lock (see [`Persister::record`]).
pub struct Recorder<'a> {
    pending: MutexGuard<'a, Pending>,
    wake: &'a Condvar,
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> DurableError + '_ {
    move |source| DurableError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

/// Each entry upgrades the schema by one version; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sessions (
        client_id TEXT PRIMARY KEY,
        expiry_secs INTEGER NOT NULL,
        ends_at_ms INTEGER
     );
     CREATE TABLE subscriptions (
        client_id TEXT NOT NULL,
        filter TEXT NOT NULL,
        options INTEGER NOT NULL,
        identifier INTEGER,
        PRIMARY KEY (client_id, filter)
     ) WITHOUT ROWID;
     CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        client_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        expires_at_ms INTEGER,
        properties BLOB NOT NULL,
        subscription_ids BLOB NOT NULL,
        packet_id INTEGER,
        released INTEGER NOT NULL
     );
     CREATE INDEX messages_by_client ON messages (client_id, id);
     CREATE TABLE retained (
        topic TEXT PRIMARY KEY,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        properties BLOB NOT NULL,
        expires_at_ms INTEGER
     );
     CREATE TABLE incoming_qos2 (
        client_id TEXT NOT NULL,
        packet_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (client_id, packet_id)
     ) WITHOUT ROWID;",
    // Issue 14: a kept session is checked against its owner's read rights while it is away.
    "ALTER TABLE sessions ADD COLUMN username TEXT",
];

fn expiry_to_column(expiry: Expiry) -> i64 {
    match expiry {
        Expiry::AtDisconnect => 0,
        Expiry::After(secs) => i64::from(secs),
        Expiry::Never => i64::from(u32::MAX),
    }
}

fn expiry_from_column(secs: i64) -> Option<Expiry> {
    match u32::try_from(secs).ok()? {
        0 => None,
        u32::MAX => Some(Expiry::Never),
        secs => Some(Expiry::After(secs)),
    }
}

fn ids_to_blob(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

fn ids_from_blob(blob: &[u8]) -> Arc<[u32]> {
    blob.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ms_column(ms: Option<u64>) -> Option<i64> {
    ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX))
}

fn ms_from_column(ms: Option<i64>) -> Option<u64> {
    ms.map(|ms| u64::try_from(ms).unwrap_or(0))
}

fn open_connection(path: &Path) -> Result<Connection, DurableError> {
    let conn = Connection::open(path).map_err(sqlite(path))?;
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .map_err(sqlite(path))?;
    crate::store::upgrade_schema(&conn, MIGRATIONS).map_err(|e| match e {
        SchemaError::Sqlite(source) => sqlite(path)(source),
        SchemaError::TooNew { found, known } => DurableError::NewerSchema {
            path: path.display().to_string(),
            found,
            known,
        },
    })?;
    Ok(conn)
}

/// Reads the kept state back; rows that cannot be what the broker wrote (a QoS above 2, an
/// expiry of 0, a message of no session) are left out and removed.
fn load(conn: &Connection, now_ms: u64) -> rusqlite::Result<Snapshot> {
    conn.execute_batch(
        "DELETE FROM messages WHERE client_id NOT IN (SELECT client_id FROM sessions);
         DELETE FROM subscriptions WHERE client_id NOT IN (SELECT client_id FROM sessions);
         DELETE FROM incoming_qos2 WHERE client_id NOT IN (SELECT client_id FROM sessions);
         DELETE FROM incoming_qos2 WHERE packet_id NOT BETWEEN 1 AND 65535;
         DELETE FROM messages WHERE qos NOT IN (1, 2);
         DELETE FROM retained WHERE qos NOT IN (0, 1, 2);",
    )?;
    conn.execute(
        "DELETE FROM retained WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1",
        params![ms_column(Some(now_ms))],
    )?;
    let mut sessions: Vec<KeptSession> = Vec::new();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    {
        let mut rows =
            conn.prepare("SELECT client_id, expiry_secs, ends_at_ms, username FROM sessions")?;
        let rows = rows.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (client_id, expiry, ends_at, username) = row?;
            let Some(expiry) = expiry_from_column(expiry) else {
                continue;
            };
            let client_id: Arc<str> = Arc::from(client_id);
            index.insert(client_id.clone(), sessions.len());
            sessions.push(KeptSession {
                client_id,
                expiry,
                ends_at_ms: ms_from_column(ends_at),
                subscriptions: Vec::new(),
                messages: Vec::new(),
                incoming_qos2: Vec::new(),
                username: username.map(Arc::from),
            });
        }
    }
    {
        let mut rows =
            conn.prepare("SELECT client_id, filter, options, identifier FROM subscriptions")?;
        let rows = rows.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        for row in rows {
            let (client_id, filter, options, identifier) = row?;
            let (Some(&at), Ok(options)) = (index.get(client_id.as_str()), u8::try_from(options))
            else {
                continue;
            };
            let identifier = identifier.and_then(|id| u32::try_from(id).ok());
            sessions[at]
                .subscriptions
                .push((filter, options, identifier));
        }
    }
    {
        let mut rows =
            conn.prepare("SELECT client_id, packet_id FROM incoming_qos2 ORDER BY client_id, seq")?;
        let rows = rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (client_id, packet_id) = row?;
            if let (Some(&at), Ok(packet_id)) =
                (index.get(client_id.as_str()), u16::try_from(packet_id))
            {
                sessions[at].incoming_qos2.push(packet_id);
            }
        }
    }
    let mut next_message_id = 1;
    {
        let mut rows = conn.prepare(
            "SELECT id, client_id, topic, payload, qos, retain, expires_at_ms, properties,
                    subscription_ids, packet_id, released
             FROM messages ORDER BY id",
        )?;
        let rows = rows.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Vec<u8>>(7)?,
                r.get::<_, Vec<u8>>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, bool>(10)?,
            ))
        })?;
        for row in rows {
            let (id, client_id, topic, payload, qos, retain, expires, properties, ids, pid, rel) =
                row?;
            let id = u64::try_from(id).unwrap_or(0);
            next_message_id = next_message_id.max(id + 1);
            let Some(&at) = index.get(client_id.as_str()) else {
                continue;
            };
            let message = Message {
                topic: Arc::from(topic),
                payload: Bytes::from(payload),
                qos: u8::try_from(qos).unwrap_or(1),
                retain,
                expires_at_ms: ms_from_column(expires),
                properties: Bytes::from(properties),
                subscription_ids: ids_from_blob(&ids),
                id,
                publisher: None,
            };
            sessions[at].messages.push(Restored {
                message,
                packet_id: pid.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0),
                released: rel,
            });
        }
    }
    let mut retained = Vec::new();
    {
        let mut rows =
            conn.prepare("SELECT topic, payload, qos, properties, expires_at_ms FROM retained")?;
        let rows = rows.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, Option<i64>>(4)?,
            ))
        })?;
        for row in rows {
            let (topic, payload, qos, properties, expires) = row?;
            retained.push((
                Arc::from(topic),
                retained::Message {
                    payload: Bytes::from(payload),
                    qos: u8::try_from(qos).unwrap_or(0),
                    properties: Bytes::from(properties),
                    expires_at_ms: ms_from_column(expires),
                },
            ));
        }
    }
    Ok(Snapshot {
        sessions,
        retained,
        next_message_id,
    })
}

/// Writes one batch in one transaction.
fn write(conn: &mut Connection, batch: &Batch) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for client in &batch.ended {
        let client: &str = client;
        tx.execute("DELETE FROM sessions WHERE client_id = ?1", [client])?;
        tx.execute("DELETE FROM subscriptions WHERE client_id = ?1", [client])?;
        tx.execute("DELETE FROM messages WHERE client_id = ?1", [client])?;
        tx.execute("DELETE FROM incoming_qos2 WHERE client_id = ?1", [client])?;
    }
    {
        let mut save = tx.prepare_cached(
            "INSERT OR REPLACE INTO sessions (client_id, expiry_secs, ends_at_ms, username)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (client, (expiry, ends_at, username)) in &batch.sessions {
            let client: &str = client;
            save.execute(params![
                client,
                expiry_to_column(*expiry),
                ms_column(*ends_at),
                username.as_deref()
            ])?;
        }
    }
    {
        let mut save = tx.prepare_cached(
            "INSERT OR REPLACE INTO subscriptions (client_id, filter, options, identifier)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut remove =
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1 AND filter = ?2")?;
        for ((client, filter), op) in &batch.subscriptions {
            let client: &str = client;
            match op {
                Some((options, identifier)) => {
                    save.execute(params![client, filter, options, identifier])?
                }
                None => remove.execute(params![client, filter])?,
            };
        }
    }
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR REPLACE INTO messages (id, client_id, topic, payload, qos, retain,
                expires_at_ms, properties, subscription_ids, packet_id, released)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        let mut update = tx.prepare_cached(
            "UPDATE messages SET packet_id = COALESCE(?2, packet_id), released = MAX(released, ?3)
             WHERE id = ?1",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
        for (id, (_, op)) in &batch.messages {
            let id = i64::try_from(*id).unwrap_or(i64::MAX);
            match op {
                MessageOp::Insert {
                    client,
                    message,
                    packet_id,
                    released,
                } => {
                    let client: &str = client;
                    let topic: &str = &message.topic;
                    insert.execute(params![
                        id,
                        client,
                        topic,
                        &message.payload[..],
                        message.qos,
                        message.retain,
                        ms_column(message.expires_at_ms),
                        &message.properties[..],
                        ids_to_blob(&message.subscription_ids),
                        packet_id,
                        released
                    ])?
                }
                MessageOp::Update {
                    packet_id,
                    released,
                } => update.execute(params![id, packet_id, released])?,
                MessageOp::Delete => delete.execute([id])?,
            };
        }
    }
    {
        // `seq` keeps them oldest first: the order the broker forgets them in.
        let mut received = tx.prepare_cached(
            "INSERT OR IGNORE INTO incoming_qos2 (client_id, packet_id, seq)
             VALUES (?1, ?2,
                (SELECT COALESCE(MAX(seq), 0) + 1 FROM incoming_qos2 WHERE client_id = ?1))",
        )?;
        let mut released =
            tx.prepare_cached("DELETE FROM incoming_qos2 WHERE client_id = ?1 AND packet_id = ?2")?;
        let mut changes: Vec<_> = batch.incoming_qos2.iter().collect();
        changes.sort_unstable_by_key(|(_, (order, _))| *order);
        for ((client, packet_id), (_, open)) in changes {
            let client: &str = client;
            if *open {
                received.execute(params![client, packet_id])?;
            } else {
                released.execute(params![client, packet_id])?;
            }
        }
    }
    {
        let mut save = tx.prepare_cached(
            "INSERT OR REPLACE INTO retained (topic, payload, qos, properties, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut clear = tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?;
        for (topic, op) in &batch.retained {
            let topic: &str = topic;
            match op {
                Some(m) => save.execute(params![
                    topic,
                    &m.payload[..],
                    m.qos,
                    &m.properties[..],
                    ms_column(m.expires_at_ms)
                ])?,
                None => clear.execute([topic])?,
            };
        }
    }
    tx.commit()
}

impl Persister {
    /// Opens (or creates) the state in `data_dir`, reads it back as of `now_ms`, and starts
    /// the writer.
    pub fn open(
        data_dir: &Path,
        now_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Result<(Persister, Snapshot), DurableError> {
        let path = data_dir.join(FILE_NAME);
        let mut conn = open_connection(&path)?;
        let snapshot = load(&conn, now_ms).map_err(sqlite(&path))?;
        let shared = Arc::new(Shared::default());
        let writing = shared.clone();
        let writer = std::thread::Builder::new()
            .name("broker-store".into())
            .spawn(move || run_writer(&mut conn, &writing, &metrics))
            .map_err(|e| DurableError::Sqlite {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok((
            Persister {
                shared,
                writer: Some(writer),
            },
            snapshot,
        ))
    }

    /// Starts recording changes; call it while holding the broker's lock, so that the order
    /// of the records is the order of the changes.
    pub fn record(&self) -> Recorder<'_> {
        Recorder {
            pending: self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            wake: &self.shared.wake,
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Recorder<'_> {
    fn count(&mut self) {
        self.pending.recorded += 1;
    }

    /// Whether anything was recorded that is not on disk yet.
    pub fn unwritten(&self) -> bool {
        self.pending.recorded != self.pending.written
    }

    /// A receiver that fires once everything recorded until now is on disk (at once if it
    /// is), and closes if the writer stops first.
    pub fn committed(&mut self) -> oneshot::Receiver<()> {
        let (send, receive) = oneshot::channel();
        if self.unwritten() {
            let mark = self.pending.recorded;
            self.pending.waiters.push((mark, send));
        } else {
            let _ = send.send(());
        }
        receive
    }

    /// A kept session started, was resumed (perhaps by another user) or changed its expiry.
    pub fn session_saved(
        &mut self,
        client: &Arc<str>,
        expiry: Expiry,
        ends_at_ms: Option<u64>,
        username: Option<&Arc<str>>,
    ) {
        self.count();
        self.pending
            .batch
            .sessions
            .insert(client.clone(), (expiry, ends_at_ms, username.cloned()));
    }

    /// A kept session ended: it goes from the disk with its subscriptions and messages.
    pub fn session_ended(&mut self, client: &Arc<str>) {
        self.count();
        let batch = &mut self.pending.batch;
        batch.sessions.remove(client);
        batch.subscriptions.retain(|(c, _), _| c != client);
        batch.messages.retain(|_, (c, _)| c != client);
        batch.incoming_qos2.retain(|(c, _), _| c != client);
        batch.ended.insert(client.clone());
    }

    /// A kept session's client had a QoS 2 publish journaled under `packet_id`.
    pub fn qos2_received(&mut self, client: &Arc<str>, packet_id: u16) {
        self.qos2(client, packet_id, true);
    }

    /// A kept session's client released (or the broker forgot) its QoS 2 publish
    /// `packet_id`.
    pub fn qos2_released(&mut self, client: &Arc<str>, packet_id: u16) {
        self.qos2(client, packet_id, false);
    }

    fn qos2(&mut self, client: &Arc<str>, packet_id: u16, open: bool) {
        self.count();
        let batch = &mut self.pending.batch;
        batch.records += 1;
        let order = batch.records;
        batch
            .incoming_qos2
            .insert((client.clone(), packet_id), (order, open));
    }

    /// A kept session subscribed (or changed a subscription's options).
    pub fn subscribed(&mut self, client: &Arc<str>, filter: &str, options: u8, id: Option<u32>) {
        self.count();
        self.pending
            .batch
            .subscriptions
            .insert((client.clone(), filter.to_owned()), Some((options, id)));
    }

    /// A kept session unsubscribed.
    pub fn unsubscribed(&mut self, client: &Arc<str>, filter: &str) {
        self.count();
        self.pending
            .batch
            .subscriptions
            .insert((client.clone(), filter.to_owned()), None);
    }

    /// A QoS 1/2 message was queued for a kept session (its id is not 0).
    pub fn queued(&mut self, client: &Arc<str>, message: &Message) {
        self.count();
        self.pending.batch.messages.insert(
            message.id,
            (
                client.clone(),
                MessageOp::Insert {
                    client: client.clone(),
                    message: message.clone(),
                    packet_id: None,
                    released: false,
                },
            ),
        );
    }

    /// A kept message was sent under `packet_id`.
    pub fn sent(&mut self, client: &Arc<str>, id: u64, packet_id: u16) {
        self.update(client, id, Some(packet_id), false);
    }

    /// A kept QoS 2 message's PUBREC came.
    pub fn released(&mut self, client: &Arc<str>, id: u64) {
        self.update(client, id, None, true);
    }

    fn update(&mut self, client: &Arc<str>, id: u64, new_packet_id: Option<u16>, release: bool) {
        self.count();
        let messages = &mut self.pending.batch.messages;
        match messages.get_mut(&id) {
            Some((
                _,
                MessageOp::Insert {
                    packet_id,
                    released,
                    ..
                }
                | MessageOp::Update {
                    packet_id,
                    released,
                },
            )) => {
                *packet_id = new_packet_id.or(*packet_id);
                *released |= release;
            }
            Some((_, MessageOp::Delete)) => {}
            None => {
                messages.insert(
                    id,
                    (
                        client.clone(),
                        MessageOp::Update {
                            packet_id: new_packet_id,
                            released: release,
                        },
                    ),
                );
            }
        }
    }

    /// A kept message is done with (delivered, expired, or not deliverable).
    pub fn done(&mut self, client: &Arc<str>, id: u64) {
        self.count();
        let messages = &mut self.pending.batch.messages;
        match messages.remove(&id) {
            // Never written: nothing to remove from the disk.
            Some((_, MessageOp::Insert { .. })) => {}
            _ => {
                messages.insert(id, (client.clone(), MessageOp::Delete));
            }
        }
    }

    /// A retained message was stored for `topic`.
    pub fn retained_set(&mut self, topic: &Arc<str>, message: &retained::Message) {
        self.count();
        self.pending
            .batch
            .retained
            .insert(topic.clone(), Some(message.clone()));
    }

    /// `topic`'s retained message was cleared.
    pub fn retained_cleared(&mut self, topic: &Arc<str>) {
        self.count();
        self.pending.batch.retained.insert(topic.clone(), None);
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        if self.pending.recorded != self.pending.taken {
            // The writer takes the batch as soon as the guard is released.
            self.wake.notify_one();
        }
    }
}

fn run_writer(conn: &mut Connection, shared: &Shared, metrics: &Metrics) {
    let mut failures_logged = false;
    loop {
        let (batch, mark) = {
            let mut pending = shared
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            loop {
                if pending.recorded != pending.taken {
                    break;
                }
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                pending = shared
                    .wake
                    .wait_timeout(pending, Duration::from_millis(50))
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            pending.taken = pending.recorded;
            (std::mem::take(&mut pending.batch), pending.recorded)
        };
        let mut tries_after_stop = 0;
        while !batch.is_empty() {
            match write(conn, &batch) {
                Ok(()) => {
                    if failures_logged {
                        warn!("the broker's state is written again");
                        failures_logged = false;
                    }
                    break;
                }
                Err(e) => {
                    Metrics::add(&metrics.broker_store_errors, 1);
                    if !failures_logged {
                        error!(error = %e, "cannot write the broker's state (retrying every second; acknowledgements that wait for it wait)");
                        failures_logged = true;
                    }
                    if shared.stop.load(Ordering::Acquire) {
                        tries_after_stop += 1;
                        if tries_after_stop > 3 {
                            error!("stopping with changes to the broker's state not written");
                            return;
                        }
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.written = mark;
        let waiters = std::mem::take(&mut pending.waiters);
        let (due, waiting): (Vec<_>, Vec<_>) = waiters.into_iter().partition(|(m, _)| *m <= mark);
        pending.waiters = waiting;
        drop(pending);
        for (_, send) in due {
            let _ = send.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64, qos: u8) -> Message {
        Message {
            topic: Arc::from("t/1"),
            payload: Bytes::from(format!("m{id}")),
            qos,
            retain: false,
            expires_at_ms: None,
            properties: Bytes::from_static(&[0x03, 0x00, 0x01, b'j']),
            subscription_ids: Arc::from([7u32, 9]),
            id,
            publisher: None,
        }
    }

    fn open(dir: &Path) -> (Persister, Snapshot) {
        Persister::open(dir, 1_000, Arc::new(Metrics::default())).expect("open")
    }

    #[test]
    fn what_is_recorded_and_committed_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let client: Arc<str> = Arc::from("dev-1");
        let other: Arc<str> = Arc::from("dev-2");
        {
            let (persister, snapshot) = open(dir.path());
            assert_eq!(
                snapshot,
                Snapshot {
                    next_message_id: 1,
                    ..Snapshot::default()
                }
            );
            let mut record = persister.record();
            record.session_saved(&client, Expiry::After(60), None, Some(&Arc::from("alice")));
            record.subscribed(&client, "t/#", 0x01, Some(7));
            record.subscribed(&client, "u/+", 0x02, None);
            record.unsubscribed(&client, "u/+");
            record.queued(&client, &message(1, 1));
            record.queued(&client, &message(2, 2));
            record.queued(&client, &message(3, 1));
            record.sent(&client, 2, 5);
            record.released(&client, 2);
            record.done(&client, 3);
            record.qos2_received(&client, 9);
            record.qos2_received(&client, 7);
            record.qos2_received(&client, 8);
            record.qos2_released(&client, 8);
            record.session_saved(&other, Expiry::Never, None, None);
            record.queued(&other, &message(4, 1));
            record.qos2_received(&other, 3);
            record.session_ended(&other);
            let topic: Arc<str> = Arc::from("r/1");
            record.retained_set(
                &topic,
                &retained::Message {
                    payload: Bytes::from_static(b"on"),
                    qos: 1,
                    properties: Bytes::new(),
                    expires_at_ms: None,
                },
            );
            let committed = record.committed();
            drop(record);
            committed.blocking_recv().expect("written");
        }
        let (_persister, snapshot) = open(dir.path());
        assert_eq!(snapshot.sessions.len(), 1, "{snapshot:?}");
        let kept = &snapshot.sessions[0];
        assert_eq!(&*kept.client_id, "dev-1");
        assert_eq!(kept.expiry, Expiry::After(60));
        assert_eq!(kept.username.as_deref(), Some("alice"));
        assert_eq!(kept.subscriptions, vec![("t/#".to_owned(), 0x01, Some(7))]);
        let ids: Vec<_> = kept
            .messages
            .iter()
            .map(|m| (m.message.id, m.packet_id, m.released))
            .collect();
        assert_eq!(ids, vec![(1, None, false), (2, Some(5), true)]);
        assert_eq!(kept.messages[0].message, message(1, 1));
        assert_eq!(kept.incoming_qos2, vec![9, 7], "open ones, oldest first");
        assert_eq!(snapshot.retained.len(), 1);
        assert_eq!(&snapshot.retained[0].1.payload[..], b"on");
        assert!(
            snapshot.next_message_id >= 3,
            "{}",
            snapshot.next_message_id
        );
    }

    #[test]
    fn later_batches_update_and_remove_what_earlier_ones_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let client: Arc<str> = Arc::from("dev-1");
        let topic: Arc<str> = Arc::from("r/1");
        let commit = |persister: &Persister, f: &dyn Fn(&mut Recorder<'_>)| {
            let mut record = persister.record();
            f(&mut record);
            let committed = record.committed();
            drop(record);
            committed.blocking_recv().expect("written");
        };
        {
            let (persister, _) = open(dir.path());
            commit(&persister, &|r| {
                r.session_saved(&client, Expiry::Never, None, None);
                r.qos2_received(&client, 9);
                r.qos2_received(&client, 4);
                r.queued(&client, &message(1, 2));
                r.queued(&client, &message(2, 1));
                r.retained_set(
                    &topic,
                    &retained::Message {
                        payload: Bytes::from_static(b"on"),
                        qos: 0,
                        properties: Bytes::new(),
                        expires_at_ms: None,
                    },
                );
            });
            commit(&persister, &|r| {
                r.qos2_released(&client, 9);
                r.sent(&client, 1, 1);
                r.released(&client, 1);
                r.done(&client, 2);
                r.retained_cleared(&topic);
                r.session_saved(&client, Expiry::After(5), Some(99_000), None);
            });
        }
        let (persister, snapshot) = open(dir.path());
        let kept = &snapshot.sessions[0];
        assert_eq!(kept.ends_at_ms, Some(99_000));
        let ids: Vec<_> = kept
            .messages
            .iter()
            .map(|m| (m.message.id, m.packet_id, m.released))
            .collect();
        assert_eq!(ids, vec![(1, Some(1), true)]);
        assert_eq!(
            kept.incoming_qos2,
            vec![4],
            "9 was released by a later batch"
        );
        assert!(snapshot.retained.is_empty());
        // An ended session and then the same client id again: only the new one stays.
        commit(&persister, &|r| {
            r.session_ended(&client);
            r.session_saved(&client, Expiry::Never, None, None);
            r.subscribed(&client, "new/#", 0, None);
        });
        drop(persister);
        let (_persister, snapshot) = open(dir.path());
        let kept = &snapshot.sessions[0];
        assert!(kept.messages.is_empty(), "{kept:?}");
        assert!(kept.incoming_qos2.is_empty(), "{kept:?}");
        assert_eq!(kept.subscriptions, vec![("new/#".to_owned(), 0, None)]);
    }

    #[test]
    fn a_file_of_a_newer_schema_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch("PRAGMA user_version = 99;").unwrap();
        drop(conn);
        let error = Persister::open(dir.path(), 0, Arc::new(Metrics::default())).unwrap_err();
        assert!(error.to_string().contains("broker.sqlite"), "{error}");
        assert!(error.to_string().contains("99"), "{error}");
    }

    #[test]
    fn a_file_of_the_first_schema_opens_with_its_sessions_unowned() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(&format!("{}; PRAGMA user_version = 1;", MIGRATIONS[0]))
            .unwrap();
        conn.execute(
            "INSERT INTO sessions (client_id, expiry_secs, ends_at_ms) VALUES ('old', 60, NULL)",
            [],
        )
        .unwrap();
        drop(conn);
        let (_persister, snapshot) = open(dir.path());
        assert_eq!(snapshot.sessions.len(), 1, "{snapshot:?}");
        assert_eq!(&*snapshot.sessions[0].client_id, "old");
        assert_eq!(snapshot.sessions[0].username, None);
    }
}
