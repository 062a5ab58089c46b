//! Dead letters (what could not be processed or delivered, with the reason) and retries
//! (events waiting for another handler attempt). Replaying a dead letter turns it back into a
//! retry (an event) or an outbox row (an output), in one transaction.

use std::sync::atomic::Ordering;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Transaction, TransactionBehavior};
use serde::{Serialize, Serializer};

use super::{Store, StoreError};

/// Whether a dead letter is an event (it failed in a route's handler) or an output (it could
/// not be delivered: expired, evicted, rejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// A device event; replay runs it through its route again.
    Event,
    /// An output; replay queues it for its link again.
    Output,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Event => "event",
            Stage::Output => "output",
        }
    }

    fn parse(s: &str) -> Stage {
        if s == "output" {
            Stage::Output
        } else {
            Stage::Event
        }
    }
}

/// Why something became a dead letter: the contract between the stages that give up on data,
/// the database and the operators' control topics.
///
/// Its string form ([`DeadLetterReason::as_str`], also `Display` and the JSON form) is what
/// the `reason` column stores and what a control request's `"reason"` filters on; a variant's
/// string never changes. Reading never fails: a string this build does not know (written by
/// another version of outpost) is kept as [`DeadLetterReason::Other`], and written back
/// unchanged, so no row is lost or altered by a version that does not understand it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    /// The event's route was removed from the configuration while it waited (`no-route`).
    NoRoute,
    /// The event's coordinates are present but invalid (`bad-location`).
    BadLocation,
    /// The event has no location and `geography.no_location` is `dead-letter` (`no-location`).
    NoLocation,
    /// The payload is not JSON on a route that requires JSON (`malformed`).
    Malformed,
    /// The output topic cannot be rendered (`bad-output-topic`).
    BadOutputTopic,
    /// The row's region tags may not go on its link (`residency`).
    Residency,
    /// The route's module is quarantined and the route dead-letters meanwhile (`quarantined`).
    Quarantined,
    /// The route's module is not deployed and the route dead-letters meanwhile
    /// (`not-deployed`).
    NotDeployed,
    /// The handler trapped (`trap`).
    Trap,
    /// The handler ran past its deadline (`timeout`).
    Timeout,
    /// The handler needed more memory than allowed (`out-of-memory`).
    OutOfMemory,
    /// The handler returned an error (`handler-error`).
    HandlerError,
    /// The handler returned too many outputs or bytes (`output-limit`).
    OutputLimit,
    /// The gateway failed while serving the handler (`host-error`).
    HostError,
    /// An output's time to live passed before delivery (`expired`).
    Expired,
    /// The upstream refused an output for good (`rejected`).
    Rejected,
    /// An output was pushed out of a full outbox (`evicted`, policy `drop-oldest`).
    Evicted,
    /// A reason this build does not know, as stored.
    Other(String),
}

impl DeadLetterReason {
    /// Every reason this build knows (all but [`DeadLetterReason::Other`]).
    pub const KNOWN: [DeadLetterReason; 17] = [
        DeadLetterReason::NoRoute,
        DeadLetterReason::BadLocation,
        DeadLetterReason::NoLocation,
        DeadLetterReason::Malformed,
        DeadLetterReason::BadOutputTopic,
        DeadLetterReason::Residency,
        DeadLetterReason::Quarantined,
        DeadLetterReason::NotDeployed,
        DeadLetterReason::Trap,
        DeadLetterReason::Timeout,
        DeadLetterReason::OutOfMemory,
        DeadLetterReason::HandlerError,
        DeadLetterReason::OutputLimit,
        DeadLetterReason::HostError,
        DeadLetterReason::Expired,
        DeadLetterReason::Rejected,
        DeadLetterReason::Evicted,
    ];

    /// The stored and published form: the same string for a variant in every version.
    pub fn as_str(&self) -> &str {
        match self {
            DeadLetterReason::NoRoute => "no-route",
            DeadLetterReason::BadLocation => "bad-location",
            DeadLetterReason::NoLocation => "no-location",
            DeadLetterReason::Malformed => "malformed",
            DeadLetterReason::BadOutputTopic => "bad-output-topic",
            DeadLetterReason::Residency => "residency",
            DeadLetterReason::Quarantined => "quarantined",
            DeadLetterReason::NotDeployed => "not-deployed",
            DeadLetterReason::Trap => "trap",
            DeadLetterReason::Timeout => "timeout",
            DeadLetterReason::OutOfMemory => "out-of-memory",
            DeadLetterReason::HandlerError => "handler-error",
            DeadLetterReason::OutputLimit => "output-limit",
            DeadLetterReason::HostError => "host-error",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Evicted => "evicted",
            DeadLetterReason::Other(s) => s,
        }
    }

    /// The reason stored as `s`; never fails (an unknown string is kept as
    /// [`DeadLetterReason::Other`]), and `parse(s).as_str() == s` for every `s`.
    pub fn parse(s: &str) -> DeadLetterReason {
        DeadLetterReason::KNOWN
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or_else(|| DeadLetterReason::Other(s.to_string()))
    }
}

/// The string form of a stored reason type (`as_str` and `parse`) as `Display`, `From<&str>`
/// and the SQL value written.
macro_rules! string_form {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                <$t>::parse(s)
            }
        }

        impl rusqlite::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
            }
        }
    };
}

string_form!(DeadLetterReason);
string_form!(RetryReason);

impl PartialEq<str> for DeadLetterReason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for DeadLetterReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for DeadLetterReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Why a retry row waits. The retries table holds both kinds of waiting events: work queued
/// for a handler lane ([`RetryReason::Queued`]) and events whose last attempt failed; a lane
/// takes both alike, in order of due time.
///
/// Stored in the `reason` column as [`RetryReason::as_str`]: `queued`, `replay`, or the
/// failure's [`DeadLetterReason`] string, exactly as older versions wrote them, so a database
/// left by any version drains. Reading never fails (see [`DeadLetterReason::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryReason {
    /// An event queued for its handler lane: new work, not a failure (`queued`).
    Queued,
    /// A dead letter an operator replayed (`replay`).
    Replay,
    /// The last attempt failed, or could not be made, for this reason: the dead letter's
    /// reason if the attempts run out.
    Failed(DeadLetterReason),
}

impl RetryReason {
    /// The stored form.
    pub fn as_str(&self) -> &str {
        match self {
            RetryReason::Queued => "queued",
            RetryReason::Replay => "replay",
            RetryReason::Failed(reason) => reason.as_str(),
        }
    }

    /// The reason stored as `s`; never fails, and `parse(s).as_str() == s` for every `s`.
    pub fn parse(s: &str) -> RetryReason {
        match s {
            "queued" => RetryReason::Queued,
            "replay" => RetryReason::Replay,
            other => RetryReason::Failed(DeadLetterReason::parse(other)),
        }
    }
}

/// Something given up on, to keep for inspection and replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewDeadLetter {
    /// Event or output.
    pub stage: Stage,
    /// The journal id of the source event (stable; 0 when unknown).
    pub event_id: u64,
    /// The route it was on.
    pub route: String,
    /// The handler module, if any.
    pub module: Option<String>,
    /// The version of that module (the first 16 hex digits of its SHA-256), if any.
    pub module_version: Option<String>,
    /// For outputs: the link it was queued for.
    pub link: Option<String>,
    /// For outputs: its message id.
    pub msg_id: Option<String>,
    /// Why it was given up on.
    pub reason: DeadLetterReason,
    /// The human-readable detail.
    pub detail: String,
    /// How many handler attempts were made.
    pub attempts: u32,
    /// The event's (or output's) topic.
    pub topic: String,
    /// The event's device.
    pub device: String,
    /// The publishing client's id.
    pub client_id: String,
    /// The payload.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// When the event was received, in ms since the Unix epoch.
    pub received_ms: u64,
    /// The event's geography in its stored form ([`crate::event::Geo::encode`]); for an
    /// output, its region tags.
    #[serde(skip)]
    pub geo: String,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Its id.
    pub id: i64,
    /// When it became a dead letter, in ms since the Unix epoch.
    pub created_ms: u64,
    /// Everything recorded about it.
    #[serde(flatten)]
    pub letter: NewDeadLetter,
}

/// Which dead letters an operation applies to; an empty filter matches all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only this one.
    pub id: Option<i64>,
    /// Only those with this reason.
    pub reason: Option<String>,
    /// Only those from this route.
    pub route: Option<String>,
}

impl DeadLetterFilter {
    fn where_clause(&self) -> (String, Vec<Value>) {
        let mut clauses = Vec::new();
        let mut values = Vec::new();
        if let Some(id) = self.id {
            clauses.push("id = ?");
            values.push(Value::Integer(id));
        }
        if let Some(reason) = &self.reason {
            clauses.push("reason = ?");
            values.push(Value::Text(reason.clone()));
        }
        if let Some(route) = &self.route {
            clauses.push("route = ?");
            values.push(Value::Text(route.clone()));
        }
        if clauses.is_empty() {
            (String::new(), values)
        } else {
            (format!("WHERE {}", clauses.join(" AND ")), values)
        }
    }
}

/// An event to give another handler attempt on one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRetry {
    /// The journal id of the source event.
    pub event_id: u64,
    /// The route to run it through.
    pub route: String,
    /// The event's topic.
    pub topic: String,
    /// The event's device.
    pub device: String,
    /// The publishing client's id.
    pub client_id: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// When the event was received, in ms since the Unix epoch.
    pub received_ms: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this time (ms since the Unix epoch).
    pub next_attempt_ms: u64,
    /// Why it waits: queued for its lane, replayed, or the last attempt's failure.
    pub reason: RetryReason,
    /// Detail of the last failure.
    pub detail: String,
    /// The event's geography in its stored form ([`crate::event::Geo::encode`]).
    pub geo: String,
}

/// A stored retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRow {
    /// Its id.
    pub id: i64,
    /// The retry.
    pub retry: NewRetry,
}

const DEAD_LETTER_COLUMNS: &str = "id, created_ms, stage, event_id, route, module, link, msg_id,
    reason, detail, attempts, topic, device, client_id, payload, received_ms, module_version, geo";

fn read_dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        created_ms: r.get::<_, i64>(1)? as u64,
        letter: NewDeadLetter {
            stage: Stage::parse(&r.get::<_, String>(2)?),
            event_id: r.get::<_, i64>(3)? as u64,
            route: r.get(4)?,
            module: r.get(5)?,
            link: r.get(6)?,
            msg_id: r.get(7)?,
            reason: DeadLetterReason::parse(&r.get::<_, String>(8)?),
            detail: r.get(9)?,
            attempts: r.get(10)?,
            topic: r.get(11)?,
            device: r.get(12)?,
            client_id: r.get(13)?,
            payload: r.get(14)?,
            received_ms: r.get::<_, i64>(15)? as u64,
            module_version: r.get(16)?,
            geo: r.get(17)?,
        },
    })
}

impl Store {
    /// Dead letters matching `filter`, newest first, at most `limit`.
    pub fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let (clause, mut values) = filter.where_clause();
        values.push(Value::Integer(limit.min(i64::MAX as usize) as i64));
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters {clause} ORDER BY id DESC LIMIT ?"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params_from_iter(values), read_dead_letter)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Puts the matching dead letters back, in one transaction: events become retries due now
    /// (they go through their route again, keeping their event id and so their message ids),
    /// outputs are queued for their link again. Returns how many were replayed.
    pub fn replay_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let (clause, values) = filter.where_clause();
        let now = crate::event::now_ms();
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let letters: Vec<DeadLetter> = {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters {clause} ORDER BY id"
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params_from_iter(values), read_dead_letter)
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?
        };
        let mut outbox_rows = 0i64;
        let mut outbox_bytes = 0i64;
        let mut retry_rows = 0i64;
        let mut dead_bytes = 0i64;
        for dead in &letters {
            let l = &dead.letter;
            match (l.stage, &l.link, &l.msg_id) {
                (Stage::Output, Some(link), Some(msg_id)) => {
                    super::outbox::insert(
                        &tx,
                        &super::NewOutboxRow {
                            link: link.clone(),
                            msg_id: msg_id.clone(),
                            route: l.route.clone(),
                            topic: l.topic.clone(),
                            payload: l.payload.clone(),
                            received_ms: l.received_ms,
                            expires_ms: 0,
                            regions: crate::event::join_tags(
                                &crate::event::Geo::decode(&l.geo).regions,
                            ),
                        },
                    )
                    .map_err(|e| self.err(e))?;
                    outbox_rows += 1;
                    outbox_bytes += l.payload.len() as i64;
                }
                _ => {
                    retry_rows += 1;
                    insert_retry(
                        &tx,
                        &NewRetry {
                            event_id: l.event_id,
                            route: l.route.clone(),
                            topic: l.topic.clone(),
                            device: l.device.clone(),
                            client_id: l.client_id.clone(),
                            payload: l.payload.clone(),
                            received_ms: l.received_ms,
                            attempts: 0,
                            next_attempt_ms: now,
                            reason: RetryReason::Replay,
                            detail: format!("replay of dead letter {}", dead.id),
                            geo: l.geo.clone(),
                        },
                    )
                    .map_err(|e| self.err(e))?
                }
            }
            tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
                .and_then(|mut s| s.execute(params![dead.id]))
                .map_err(|e| self.err(e))?;
            dead_bytes += l.payload.len() as i64;
        }
        tx.commit().map_err(|e| self.err(e))?;
        let n = letters.len() as i64;
        self.totals.dead_rows.fetch_sub(n, Ordering::Relaxed);
        self.totals
            .dead_bytes
            .fetch_sub(dead_bytes, Ordering::Relaxed);
        self.totals
            .outbox_rows
            .fetch_add(outbox_rows, Ordering::Relaxed);
        self.totals
            .outbox_bytes
            .fetch_add(outbox_bytes, Ordering::Relaxed);
        self.totals
            .retry_rows
            .fetch_add(retry_rows, Ordering::Relaxed);
        Ok(n as u64)
    }

    /// Deletes the matching dead letters for good; returns how many.
    pub fn purge_dead_letters(&self, filter: &DeadLetterFilter) -> Result<u64, StoreError> {
        let (clause, values) = filter.where_clause();
        let mut conn = self.writer.lock().map_err(|_| StoreError::Poisoned)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let (rows, bytes): (i64, i64) = tx
            .query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM dead_letters {clause}"
                ),
                params_from_iter(values.clone()),
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        tx.execute(
            &format!("DELETE FROM dead_letters {clause}"),
            params_from_iter(values),
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        self.totals.dead_rows.fetch_sub(rows, Ordering::Relaxed);
        self.totals.dead_bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok(rows as u64)
    }

    /// Retries due at `now_ms`, oldest due first, at most `limit`.
    pub fn due_retries(&self, now_ms: u64, limit: usize) -> Result<Vec<RetryRow>, StoreError> {
        self.due_retries_of(&RouteSet::All, now_ms, limit)
    }

    /// [`Store::due_retries`] of the routes in `routes` only.
    pub fn due_retries_of(
        &self,
        routes: &RouteSet,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<RetryRow>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT id, event_id, route, topic, device, client_id, payload, received_ms,
                        attempts, next_attempt_ms, reason, detail, geo
                 FROM retries WHERE next_attempt_ms <= ?1 AND {}
                 ORDER BY next_attempt_ms, id LIMIT ?2",
                routes.clause()
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![now_ms as i64, limit as i64], |r| {
                Ok(RetryRow {
                    id: r.get(0)?,
                    retry: NewRetry {
                        event_id: r.get::<_, i64>(1)? as u64,
                        route: r.get(2)?,
                        topic: r.get(3)?,
                        device: r.get(4)?,
                        client_id: r.get(5)?,
                        payload: r.get(6)?,
                        received_ms: r.get::<_, i64>(7)? as u64,
                        attempts: r.get(8)?,
                        next_attempt_ms: r.get::<_, i64>(9)? as u64,
                        reason: RetryReason::parse(&r.get::<_, String>(10)?),
                        detail: r.get(11)?,
                        geo: r.get(12)?,
                    },
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// When the next retry is due (ms since the Unix epoch), if any is waiting.
    pub fn next_retry_due(&self) -> Result<Option<u64>, StoreError> {
        self.next_retry_due_of(&RouteSet::All)
    }

    /// [`Store::next_retry_due`] of the routes in `routes` only.
    pub fn next_retry_due_of(&self, routes: &RouteSet) -> Result<Option<u64>, StoreError> {
        let conn = self.reader.lock().map_err(|_| StoreError::Poisoned)?;
        let due: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT MIN(next_attempt_ms) FROM retries WHERE {}",
                    routes.clause()
                ),
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        Ok(due.map(|d| d.max(0) as u64))
    }

    /// Retries waiting (and events queued for a handler lane), from the running total kept
    /// in memory: no query.
    pub fn retry_count(&self) -> Result<u64, StoreError> {
        Ok(self.totals.retry_rows.load(Ordering::Relaxed).max(0) as u64)
    }
}

pub(super) fn insert(tx: &Transaction<'_>, d: &NewDeadLetter) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO dead_letters (stage, event_id, route, module, link, msg_id, reason, detail,
             attempts, topic, device, client_id, payload, received_ms, created_ms, module_version,
             geo)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?
    .execute(params![
        d.stage.as_str(),
        d.event_id as i64,
        d.route,
        d.module,
        d.link,
        d.msg_id,
        d.reason,
        d.detail,
        d.attempts,
        d.topic,
        d.device,
        d.client_id,
        d.payload,
        d.received_ms as i64,
        crate::event::now_ms() as i64,
        d.module_version,
        d.geo
    ])?;
    Ok(())
}

pub(super) fn insert_retry(tx: &Transaction<'_>, r: &NewRetry) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO retries (event_id, route, topic, device, client_id, payload, received_ms,
             attempts, next_attempt_ms, reason, detail, geo)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        r.event_id as i64,
        r.route,
        r.topic,
        r.device,
        r.client_id,
        r.payload,
        r.received_ms as i64,
        r.attempts,
        r.next_attempt_ms as i64,
        r.reason,
        r.detail,
        r.geo
    ])?;
    Ok(())
}

pub(super) fn delete_retry(tx: &Transaction<'_>, id: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM retries WHERE id = ?1")?
        .execute(params![id])?;
    Ok(())
}

/// Deletes the oldest dead letters until `rows` rows and `bytes` payload bytes are freed;
/// returns (rows, bytes) freed.
pub(super) fn evict_oldest(
    tx: &Transaction<'_>,
    rows: i64,
    bytes: i64,
) -> rusqlite::Result<(i64, i64)> {
    let mut freed_rows = 0i64;
    let mut freed_bytes = 0i64;
    let candidates: Vec<(i64, i64)> = {
        let mut stmt =
            tx.prepare_cached("SELECT id, LENGTH(payload) FROM dead_letters ORDER BY id LIMIT ?1")?;
        let found = stmt.query_map(params![rows.max(1) + 1024], |r| Ok((r.get(0)?, r.get(1)?)))?;
        found.collect::<rusqlite::Result<Vec<_>>>()?
    };
    let mut delete = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
    for (id, size) in candidates {
        if freed_rows >= rows && freed_bytes >= bytes {
            break;
        }
        delete.execute(params![id])?;
        freed_rows += 1;
        freed_bytes += size;
    }
    Ok((freed_rows, freed_bytes))
}

/// Which routes' retries a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSet {
    /// Every route.
    All,
    /// Only these.
    Only(Vec<String>),
    /// Every route but these.
    Except(Vec<String>),
}

impl RouteSet {
    /// The SQL condition (route names are quoted as SQL string literals).
    fn clause(&self) -> String {
        let list = |names: &[String]| {
            names
                .iter()
                .map(|n| format!("'{}'", n.replace('\'', "''")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            RouteSet::All => "1".to_string(),
            RouteSet::Only(names) if names.is_empty() => "0".to_string(),
            RouteSet::Only(names) => format!("route IN ({})", list(names)),
            RouteSet::Except(names) if names.is_empty() => "1".to_string(),
            RouteSet::Except(names) => format!("route NOT IN ({})", list(names)),
        }
    }
}
