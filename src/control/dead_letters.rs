//! The control plane for dead letters: MQTT topics on the gateway's own broker through which an
//! operator lists, shows, replays and purges dead letters. This is the gateway's side and the
//! topics' contract (the verbs, the request and its validation); the operator's side, which
//! the `outpost deadletters` command uses, is [`crate::client::dead_letters`].
//!
//! Requests are published to `outpost/<gateway_id>/deadletters/<verb>`:
//!
//! | verb | does | reply |
//! | --- | --- | --- |
//! | `list` | the matching dead letters, newest first, without payloads | `{"ok": true, "dead_letters": [..], "truncated": false}` |
//! | `show` | the same, with each payload: `"payload"` (UTF-8 text) or `"payload_base64"` | the same |
//! | `replay` | events go through their route again, outputs back to their link's outbox | `{"ok": true, "replayed": N}` |
//! | `purge` | deletes them for good | `{"ok": true, "purged": N}` |
//!
//! A request is a JSON object, every field optional:
//! `{"reply_to": "<topic>", "id": N, "reason": "..", "route": "..", "limit": N, "all": true}`.
//! `id`, `reason` and `route` select dead letters (all given must match); `limit` (list and
//! show only, 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`]) bounds the answer. A failure is
//! answered with `{"ok": false, "error": ".."}`. The reply goes to `reply_to`, or to
//! `outpost/<gateway_id>/deadletters/result` when there is none.
//!
//! Guarantees:
//! - Every request gets exactly one reply, a malformed one too (not JSON, not an object, an
//!   unknown field, a wrong type, an invalid value): when its `reply_to` can be read, the reply
//!   goes there, otherwise to the `result` topic. A bad request changes nothing.
//! - `replay` and `purge` never take an empty filter to mean "everything": they need `id`,
//!   `reason` or `route`, or `"all": true` (which cannot be combined with them).
//! - A replay is one transaction ([`Store::replay_dead_letters`]); right after it the pipeline
//!   and the uplinks are woken, so replayed events are processed at once rather than at the
//!   pipeline's next idle poll.
//! - Requests are handled one at a time, in the order the broker delivers them; each one's
//!   reply is published before the next is read, so a `list` sent after a `replay` reply
//!   sees the replay.
//! - A `list` or `show` reply is at most [`MAX_REPLY_BYTES`] of JSON, except that it always
//!   holds the newest match; `"truncated": true` says that matches were left out.
//! - Replies are published with QoS 0 on the local broker (at most once). A requester that gets
//!   no answer may ask again: `list` and `show` change nothing, and a repeated `replay` or
//!   `purge` finds nothing the first one already took.
//!
//! - A reply goes to the requesting client only (its subscriptions that match the reply
//!   topic), never to other subscribers of that topic, and carries `"gateway"` (who answers)
//!   and the request's `"nonce"` (which request it answers), so that the requester
//!   ([`crate::client::dead_letters::request`]) believes only the answer to its own request.
//!
//! Who may ask is the broker's business: once `broker.admins` or an ACL is configured, only
//! admins (and clients an ACL rule names these topics for) may publish requests or read
//! anything under `outpost/<gateway_id>/` (see [`crate::edge::access`]); anyone else's request
//! is refused at the broker and never reaches this plane. Without either, anyone who may
//! publish to the gateway's broker may purge its dead letters. Requests from devices pass
//! through the journal like any publish, so the pipeline sees them: counted `unrouted`, unless
//! a route's filter matches them (then they are routed like any event).

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::edge::LocalLink;
use crate::store::{DeadLetter, DeadLetterFilter, Store, StoreError};

/// The client id of the control plane's in-process link to the broker.
pub const CLIENT_ID: &str = "outpost-control";

/// Dead letters a `list` or `show` returns when the request gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;

/// The largest `limit` a request may ask for.
pub const MAX_LIMIT: usize = 1000;

/// Bound on a `list` or `show` reply's JSON (see the module guarantees).
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Attempts after the first when the database is busy (pauses of 5 ms doubling: about 1.3 s
/// in all).
const BUSY_RETRIES: usize = 8;

/// A dead-letter operation; the last level of its request topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// List dead letters without payloads.
    List,
    /// List dead letters with payloads.
    Show,
    /// Put dead letters back into processing.
    Replay,
    /// Delete dead letters.
    Purge,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 4] = [Verb::List, Verb::Show, Verb::Replay, Verb::Purge];

    /// Its name, as in the topic.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Show => "show",
            Verb::Replay => "replay",
            Verb::Purge => "purge",
        }
    }

    /// The verb named `name`, if any.
    pub fn parse(name: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == name)
    }

    /// Whether it changes the dead letters (and so needs a non-empty filter or `all`).
    fn changes(self) -> bool {
        matches!(self, Verb::Replay | Verb::Purge)
    }
}

/// The prefix of every dead-letter topic of gateway `gateway_id`, with a trailing `/`.
pub fn topic_prefix(gateway_id: &str) -> String {
    format!("outpost/{gateway_id}/deadletters/")
}

/// The topic requests for `verb` are published to.
pub fn request_topic(gateway_id: &str, verb: Verb) -> String {
    format!("{}{}", topic_prefix(gateway_id), verb.as_str())
}

/// Where replies go when a request names no `reply_to` (or could not be read).
pub fn default_reply_topic(gateway_id: &str) -> String {
    format!("{}result", topic_prefix(gateway_id))
}

/// A request, as published (JSON). Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Topic for the reply (default: `outpost/<gateway_id>/deadletters/result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Only the dead letter with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// Only dead letters with this reason (`trap`, `timeout`, `expired`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Only dead letters from this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// `list` and `show`: at most this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// `replay` and `purge`: every dead letter (required when there is no other filter).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Echoed in the reply (at most [`MAX_NONCE_BYTES`]): a requester that makes it
    /// unguessable knows the reply answers its request and was not made up by someone who
    /// never saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// The longest `nonce` a request may carry.
pub const MAX_NONCE_BYTES: usize = 128;

impl Request {
    /// The store filter this request selects.
    pub fn filter(&self) -> DeadLetterFilter {
        DeadLetterFilter {
            id: self.id,
            reason: self.reason.clone(),
            route: self.route.clone(),
        }
    }

    /// Checks the request for `verb` on gateway `gateway_id`; the message says what is wrong.
    pub fn validate(&self, verb: Verb, gateway_id: &str) -> Result<(), String> {
        if let Some(reply_to) = &self.reply_to {
            check_reply_topic(reply_to, gateway_id)?;
        }
        if self
            .nonce
            .as_ref()
            .is_some_and(|n| n.len() > MAX_NONCE_BYTES)
        {
            return Err(format!("\"nonce\" must be at most {MAX_NONCE_BYTES} bytes"));
        }
        for (name, value) in [("reason", &self.reason), ("route", &self.route)] {
            if value.as_deref() == Some("") {
                return Err(format!("\"{name}\" must not be empty"));
            }
        }
        let filtered = self.id.is_some() || self.reason.is_some() || self.route.is_some();
        if self.all && filtered {
            return Err("\"all\": true cannot be combined with id, reason or route".into());
        }
        if verb.changes() {
            if self.limit.is_some() {
                return Err(format!(
                    "\"limit\" applies to list and show, not to {}",
                    verb.as_str()
                ));
            }
            if !filtered && !self.all {
                return Err(format!(
                    "{verb} needs a filter (id, reason or route), or \"all\": true to {verb} \
                     every dead letter",
                    verb = verb.as_str()
                ));
            }
        } else if let Some(limit) = self.limit {
            if !(1..=MAX_LIMIT).contains(&limit) {
                return Err(format!(
                    "\"limit\" must be from 1 to {MAX_LIMIT}, not {limit}"
                ));
            }
        }
        Ok(())
    }
}

/// A reply topic must be a topic name (no wildcards) and not one of the request topics, so
/// that a reply can never be taken for a request.
fn check_reply_topic(topic: &str, gateway_id: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > usize::from(u16::MAX) {
        return Err("\"reply_to\" must be a topic of 1 to 65535 bytes".into());
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!(
            "\"reply_to\" {topic:?} must be a topic name, without '+', '#' or NUL"
        ));
    }
    if Verb::ALL
        .into_iter()
        .any(|v| request_topic(gateway_id, v) == topic)
    {
        return Err(format!("\"reply_to\" {topic:?} is a request topic"));
    }
    Ok(())
}

/// Why a request failed: the requester's fault, or the gateway's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The request is malformed or not allowed; nothing was changed.
    BadRequest(String),
    /// The database refused the operation.
    Store(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::BadRequest(m) | Failure::Store(m) => m,
        }
    }
}

/// The answer to one request, before it is published.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    /// Where it goes.
    topic: String,
    /// The reply body.
    body: Value,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The broker refused the subscription to the request topics.
    #[error("control plane: cannot subscribe to {filter}: {reason}")]
    Subscribe {
        /// The topic filter.
        filter: String,
        /// What went wrong.
        reason: String,
    },
}

/// The dead-letter control plane of one gateway.
pub struct Control {
    /// This gateway's id: the second level of its control topics.
    pub gateway_id: String,
    /// The database holding the dead letters.
    pub store: Arc<Store>,
    /// The pipeline's wake-up (the journal's `committed` signal): notified after a replay so
    /// that the replayed events are processed at once.
    pub pipeline: Arc<Notify>,
    /// Every uplink's wake-up: notified after a replay, which may have queued outputs again.
    pub uplinks: Vec<Arc<Notify>>,
}

impl Control {
    /// Subscribes the link to the request topics, waits until the broker confirmed the
    /// subscription (so a request published after this returns is not missed), and then serves
    /// requests on a task of its own until the link closes or the task is aborted.
    pub async fn start(self, link: LocalLink) -> Result<JoinHandle<()>, ControlError> {
        let filter = format!("{}+", topic_prefix(&self.gateway_id));
        link.subscribe(&filter)
            .map_err(|e| ControlError::Subscribe {
                filter: filter.clone(),
                reason: e.to_string(),
            })?;
        info!(topics = %filter, "dead-letter control topics ready");
        Ok(tokio::spawn(self.serve(link)))
    }

    async fn serve(self, mut link: LocalLink) {
        let prefix = topic_prefix(&self.gateway_id);
        loop {
            let message = link.next().await;
            let Some(name) = message.topic.strip_prefix(&prefix) else {
                continue;
            };
            if name == "result" {
                // Replies without a reply_to, this one's own included.
                continue;
            }
            let answer = self.answer(name, &message.payload).await;
            // To the requester only: no one else learns what it asked or what it got.
            link.reply(
                message.from.as_deref(),
                answer.topic,
                answer.body.to_string(),
            );
        }
    }

    /// Handles the request `payload` published to `.../deadletters/<name>`: runs it, logs it,
    /// and says what to reply where.
    async fn answer(&self, name: &str, payload: &[u8]) -> Answer {
        let Incoming {
            reply_to,
            request,
            nonce,
        } = read_request(&self.gateway_id, name, payload);
        let outcome = match request {
            Ok((verb, request)) => self.execute(verb, &request).await,
            Err(message) => Err(Failure::BadRequest(message)),
        };
        let body = match outcome {
            Ok(body) => {
                info!(request = name, reply_to = %reply_to, outcome = %summary(&body), "dead-letter request");
                body
            }
            Err(failure) => {
                match &failure {
                    Failure::BadRequest(m) => {
                        warn!(request = name, reply_to = %reply_to, error = %m, "bad dead-letter request refused")
                    }
                    Failure::Store(m) => {
                        error!(request = name, reply_to = %reply_to, error = %m, "dead-letter request failed")
                    }
                }
                json!({"ok": false, "error": failure.message()})
            }
        };
        let mut body = body;
        // Who answers, and to what: the requester checks both.
        if let Some(fields) = body.as_object_mut() {
            fields.insert("gateway".into(), Value::from(self.gateway_id.as_str()));
            if let Some(nonce) = nonce {
                fields.insert("nonce".into(), Value::from(nonce));
            }
        }
        Answer {
            topic: reply_to,
            body,
        }
    }

    /// Runs a valid request against the store (on a blocking thread).
    async fn execute(&self, verb: Verb, request: &Request) -> Result<Value, Failure> {
        let store = self.store.clone();
        let filter = request.filter();
        match verb {
            Verb::List | Verb::Show => {
                let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
                let letters =
                    blocking(move || retry_busy(|| store.dead_letters(&filter, limit))).await?;
                Ok(letters_reply(&letters, verb == Verb::Show))
            }
            Verb::Replay => {
                let n = blocking(move || retry_busy(|| store.replay_dead_letters(&filter))).await?;
                if n > 0 {
                    self.pipeline.notify_one();
                    for uplink in &self.uplinks {
                        uplink.notify_one();
                    }
                }
                Ok(json!({"ok": true, "replayed": n}))
            }
            Verb::Purge => {
                let n = blocking(move || retry_busy(|| store.purge_dead_letters(&filter))).await?;
                Ok(json!({"ok": true, "purged": n}))
            }
        }
    }
}

/// A request as the control plane reads it, before it touches the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Where the reply goes: the request's `reply_to` when that much of it can be read and is
    /// a valid reply topic, else [`default_reply_topic`].
    pub reply_to: String,
    /// The verb and the valid request, or why it is refused (the reply's `error`).
    pub request: Result<(Verb, Request), String>,
    /// The request's `nonce`, when that much of it can be read (echoed in every reply, a
    /// refusal's too).
    pub nonce: Option<String>,
}

/// Reads the request `payload` published to `outpost/<gateway_id>/deadletters/<name>`: the
/// verb `name`, the JSON object and its validation ([`Request::validate`]), and where to
/// reply. Touches nothing and never panics, whatever the bytes: this is everything the
/// control plane does with a request before running it.
pub fn read_request(gateway_id: &str, name: &str, payload: &[u8]) -> Incoming {
    let parsed = serde_json::from_slice::<Value>(payload);
    // Even a request that turns out to be invalid is answered where it asked to be, if that
    // much can be read.
    let reply_to = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("reply_to"))
        .and_then(Value::as_str)
        .filter(|t| check_reply_topic(t, gateway_id).is_ok())
        .map(str::to_owned)
        .unwrap_or_else(|| default_reply_topic(gateway_id));
    let nonce = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("nonce"))
        .and_then(Value::as_str)
        .filter(|n| n.len() <= MAX_NONCE_BYTES)
        .map(str::to_owned);
    let request = match (Verb::parse(name), parsed) {
        (None, _) => Err(format!(
            "unknown dead-letter request {name:?}; expected list, show, replay or purge"
        )),
        (Some(_), Err(e)) => Err(format!("the request is not JSON: {e}")),
        (Some(verb), Ok(value)) => {
            parse_request(verb, value, gateway_id).map(|request| (verb, request))
        }
    };
    Incoming {
        reply_to,
        request,
        nonce,
    }
}

/// Turns a parsed JSON value into a valid request for `verb`.
fn parse_request(verb: Verb, value: Value, gateway_id: &str) -> Result<Request, String> {
    if !value.is_object() {
        return Err("the request must be a JSON object".into());
    }
    let request: Request =
        serde_json::from_value(value).map_err(|e| format!("invalid request: {e}"))?;
    request.validate(verb, gateway_id)?;
    Ok(request)
}

/// Runs a store operation, again when SQLite reports the database busy or locked.
///
/// The journal writes on a connection of its own, and a request's own publish is journaled
/// just as the request is handled. A transaction that reads before it writes (replay, purge)
/// then gets `SQLITE_BUSY` at once, without SQLite's busy wait, when the journal committed
/// after its read began. A failed transaction changed nothing, so running it again is safe.
fn retry_busy<T>(mut operation: impl FnMut() -> Result<T, StoreError>) -> Result<T, Failure> {
    let mut pause = Duration::from_millis(5);
    for _ in 0..BUSY_RETRIES {
        match operation() {
            Err(e) if is_busy(&e) => {
                debug!(error = %e, "database busy; trying the request again");
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return other.map_err(|e| Failure::Store(e.to_string())),
        }
    }
    operation().map_err(|e| Failure::Store(e.to_string()))
}

fn is_busy(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. }
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Store(format!("database task failed: {e}")))?
}

/// The `list`/`show` reply: newest first, cut at [`MAX_REPLY_BYTES`] but never empty when
/// something matched.
fn letters_reply(letters: &[DeadLetter], with_payload: bool) -> Value {
    let mut entries = Vec::with_capacity(letters.len());
    let mut size = 0usize;
    let mut truncated = false;
    for letter in letters {
        let entry = letter_json(letter, with_payload);
        let entry_size = entry.to_string().len() + 1;
        if !entries.is_empty() && size + entry_size > MAX_REPLY_BYTES {
            truncated = true;
            break;
        }
        size += entry_size;
        entries.push(entry);
    }
    json!({"ok": true, "dead_letters": entries, "truncated": truncated})
}

/// One dead letter as JSON: every recorded field, `payload_bytes`, and with `with_payload` the
/// payload as text (`payload`) when it is UTF-8, else as base64 (`payload_base64`).
fn letter_json(letter: &DeadLetter, with_payload: bool) -> Value {
    let mut value = serde_json::to_value(letter).unwrap_or_else(|_| json!({"id": letter.id}));
    if let Value::Object(map) = &mut value {
        let payload = &letter.letter.payload;
        map.insert("payload_bytes".into(), json!(payload.len()));
        if with_payload {
            match std::str::from_utf8(payload) {
                Ok(text) => map.insert("payload".into(), json!(text)),
                Err(_) => map.insert("payload_base64".into(), json!(STANDARD.encode(payload))),
            };
        }
    }
    value
}

/// A short description of a successful reply, for the log.
fn summary(body: &Value) -> String {
    if let Some(letters) = body.get("dead_letters").and_then(Value::as_array) {
        format!("{} dead letter(s)", letters.len())
    } else if let Some(n) = body.get("replayed") {
        format!("{n} replayed")
    } else if let Some(n) = body.get("purged") {
        format!("{n} purged")
    } else {
        body.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, NewDeadLetter, Stage};

    fn letter(reason: &str, route: &str, payload: &[u8]) -> NewDeadLetter {
        NewDeadLetter {
            stage: Stage::Event,
            event_id: 7,
            route: route.into(),
            module: Some("m".into()),
            module_version: Some("0123456789abcdef".into()),
            link: None,
            msg_id: None,
            reason: reason.into(),
            detail: "detail".into(),
            attempts: 2,
            topic: "telemetry/d/x".into(),
            device: "d".into(),
            client_id: "c".into(),
            payload: payload.to_vec(),
            received_ms: 5,
            geo: String::new(),
        }
    }

    fn control(dir: &std::path::Path) -> Control {
        let store = Arc::new(Store::open(dir).unwrap());
        store
            .commit(&Batch {
                dead: vec![
                    letter("trap", "a", b"trap"),
                    letter("timeout", "a", &[0xff, 0x00]),
                    letter("trap", "b", b"x"),
                ],
                ..Batch::default()
            })
            .unwrap();
        Control {
            gateway_id: "gw".into(),
            store,
            pipeline: Arc::new(Notify::new()),
            uplinks: vec![Arc::new(Notify::new())],
        }
    }

    fn check(verb: Verb, json: &str) -> Result<Request, String> {
        parse_request(verb, serde_json::from_str(json).unwrap(), "gw")
    }

    #[test]
    fn changing_requests_need_a_filter_or_all() {
        for verb in [Verb::Replay, Verb::Purge] {
            let err = check(verb, "{}").unwrap_err();
            assert!(
                err.contains("needs a filter") && err.contains("\"all\": true"),
                "{err}"
            );
            let err = check(verb, r#"{"reply_to": "r", "all": false}"#).unwrap_err();
            assert!(err.contains("needs a filter"), "{err}");
            assert!(check(verb, r#"{"all": true}"#).is_ok());
            assert!(check(verb, r#"{"id": 3}"#).is_ok());
            assert!(check(verb, r#"{"reason": "trap", "route": "a"}"#).is_ok());
            let err = check(verb, r#"{"all": true, "reason": "trap"}"#).unwrap_err();
            assert!(err.contains("cannot be combined"), "{err}");
            let err = check(verb, r#"{"id": 1, "limit": 5}"#).unwrap_err();
            assert!(err.contains("limit"), "{err}");
        }
        assert!(check(Verb::List, "{}").is_ok());
        assert!(check(Verb::Show, r#"{"id": 1}"#).is_ok());
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        let err = check(Verb::List, r#"{"bogus": 1}"#).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = check(Verb::List, r#"{"id": "seven"}"#).unwrap_err();
        assert!(err.contains("invalid"), "{err}");
        let err = check(Verb::List, r#"[1, "trap"]"#).unwrap_err();
        assert!(err.contains("JSON object"), "{err}");
        let err = check(Verb::List, r#"{"limit": 0}"#).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        let err = check(Verb::List, r#"{"limit": 1001}"#).unwrap_err();
        assert!(err.contains("limit"), "{err}");
        let err = check(Verb::Purge, r#"{"reason": ""}"#).unwrap_err();
        assert!(err.contains("empty"), "{err}");
        let err = check(Verb::List, r#"{"reply_to": "a/+/b"}"#).unwrap_err();
        assert!(err.contains("reply_to"), "{err}");
        let err = check(
            Verb::List,
            r#"{"reply_to": "outpost/gw/deadletters/purge"}"#,
        )
        .unwrap_err();
        assert!(err.contains("request topic"), "{err}");
        assert!(check(
            Verb::List,
            r#"{"reply_to": "outpost/gw/deadletters/result"}"#
        )
        .is_ok());
    }

    #[test]
    fn requests_serialize_without_absent_fields() {
        let request = Request {
            reason: Some("trap".into()),
            ..Request::default()
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"reason":"trap"}"#
        );
        let all = Request {
            all: true,
            ..Request::default()
        };
        let back: Request = serde_json::from_str(&serde_json::to_string(&all).unwrap()).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn binary_payloads_are_standard_base64_with_padding() {
        for (payload, expected) in [
            (&[0xff][..], "/w=="),
            (&[0xff, 0x00][..], "/wA="),
            (&[0xfb, 0xff, 0xbf][..], "+/+/"),
            (&[0x80, b'f', b'o', b'o', b'b'][..], "gGZvb2I="),
        ] {
            let letter = DeadLetter {
                id: 1,
                created_ms: 0,
                letter: letter("trap", "a", payload),
            };
            let value = letter_json(&letter, true);
            assert_eq!(value["payload_base64"], expected, "{payload:?}");
            assert!(value.get("payload").is_none());
            assert_eq!(value["payload_bytes"], payload.len());
            assert!(letter_json(&letter, false).get("payload_base64").is_none());
        }
    }

    #[tokio::test]
    async fn list_show_replay_purge_against_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let control = control(dir.path());

        let list = control.answer("list", br#"{"reply_to": "me"}"#).await;
        assert_eq!(list.topic, "me");
        let letters = list.body["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 3);
        assert_eq!(letters[0]["route"], "b", "newest first");
        assert!(letters[0].get("payload").is_none(), "list has no payloads");
        assert_eq!(letters[0]["payload_bytes"], 1);
        assert_eq!(list.body["truncated"], false);

        let show = control.answer("show", br#"{"reason": "timeout"}"#).await;
        assert_eq!(show.topic, "outpost/gw/deadletters/result");
        let letters = show.body["dead_letters"].as_array().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0]["payload_base64"], "/wA=");
        let show = control
            .answer("show", br#"{"reason": "trap", "limit": 1}"#)
            .await;
        assert_eq!(show.body["dead_letters"][0]["payload"], "x");

        let refused = control.answer("purge", br#"{"reply_to": "me"}"#).await;
        assert_eq!(refused.topic, "me");
        assert_eq!(refused.body["ok"], false);
        assert_eq!(
            control.store.dead_letter_count(),
            3,
            "a refusal changes nothing"
        );

        let replay = control
            .answer("replay", br#"{"reason": "trap", "route": "a"}"#)
            .await;
        assert_eq!(
            replay.body,
            json!({"ok": true, "replayed": 1, "gateway": "gw"})
        );
        assert_eq!(control.store.retry_count().unwrap(), 1);
        // The pipeline was told: a permit is waiting.
        tokio::time::timeout(Duration::from_secs(1), control.pipeline.notified())
            .await
            .expect("pipeline woken after a replay");

        let purge = control.answer("purge", br#"{"all": true}"#).await;
        assert_eq!(
            purge.body,
            json!({"ok": true, "purged": 2, "gateway": "gw"})
        );
        assert_eq!(control.store.dead_letter_count(), 0);
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_reply() {
        let dir = tempfile::tempdir().unwrap();
        let control = control(dir.path());
        let not_json = control.answer("list", b"not json").await;
        assert_eq!(not_json.topic, "outpost/gw/deadletters/result");
        assert_eq!(not_json.body["ok"], false);
        assert!(not_json.body["error"]
            .as_str()
            .unwrap()
            .contains("not JSON"));

        let unknown = control
            .answer("list", br#"{"reply_to": "me", "colour": "red"}"#)
            .await;
        assert_eq!(
            unknown.topic, "me",
            "answered where it asked, though invalid"
        );
        assert!(unknown.body["error"].as_str().unwrap().contains("colour"));

        let verb = control.answer("explode", br#"{"reply_to": "me"}"#).await;
        assert!(verb.body["error"]
            .as_str()
            .unwrap()
            .contains("unknown dead-letter request"));
    }

    #[test]
    fn a_large_answer_is_cut_but_keeps_the_newest() {
        let big = DeadLetter {
            id: 2,
            created_ms: 0,
            letter: letter("trap", "a", &vec![b'a'; MAX_REPLY_BYTES]),
        };
        let small = DeadLetter {
            id: 1,
            created_ms: 0,
            letter: letter("trap", "a", b"b"),
        };
        let reply = letters_reply(&[big, small], true);
        assert_eq!(reply["dead_letters"].as_array().unwrap().len(), 1);
        assert_eq!(reply["dead_letters"][0]["id"], 2);
        assert_eq!(reply["truncated"], true);
    }
}
