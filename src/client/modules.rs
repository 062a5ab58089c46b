//! The operator's side of deploying handler modules over MQTT: builds the requests (signed
//! module, signed `remove`/`rollback`, `list`), publishes them, and collects the gateways'
//! statuses. `outpost module push|list|remove|rollback` are thin wrappers around it.
//!
//! Topics, for gateway `G` (the base is `outpost/G/modules`), on its own broker or on an
//! upstream broker it is connected to; for a fleet group `GROUP` (base
//! `<fleet_prefix>/GROUP/modules`, [`DEFAULT_FLEET_PREFIX`] by default) on an upstream broker:
//!
//! | request | topic | payload |
//! | --- | --- | --- |
//! | deploy | `<base>/<name>/deploy` | the signed-module envelope ([`SignedModule::to_bytes`]), exactly as signed |
//! | remove, rollback | `<base>/<name>/remove`, `<base>/<name>/rollback` | a signed command ([`SignedCommand::to_json`]) |
//! | list | `<base>/list` | `{"nonce":"<16 hex>"}` (anything goes; the nonce makes each request's digest unique) |
//!
//! Each gateway answers each request with one JSON status on `outpost/G/modules/status`
//! ([`Status`]), which carries `request_sha256`, the SHA-256 of the request's payload: that is
//! how a status is matched to its request (see [`Request::request_sha256`]).
//!
//! Guarantees:
//! - The status subscription is confirmed (SUBACK) before the request is published, so a
//!   prompt answer is never missed.
//! - The request is published once, with QoS 1; the exchange fails unless the broker
//!   acknowledged it (PUBACK) or a status for it arrived.
//! - Only statuses whose `request_sha256` matches are returned; from a fleet, at most one per
//!   gateway (the first).
//! - Nothing is retained on the broker unless the request says so ([`Request::retained`],
//!   deploys only).
//!
//! It connects through [`crate::client::exchange`]: TCP for `mqtt://`, TLS for `mqtts://` (the broker's
//! certificate checked against the [`Endpoint`]'s CA file or the system's, a client
//! certificate when given), logging in with the endpoint's username and password when given.
//! What it does not do: authenticate the statuses beyond their digest (anyone who may publish
//! on the status topics may forge one: on a gateway's own broker, only its admins may, once
//! `broker.admins` or an ACL is set).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::exchange as operator;
use crate::config::{parse_broker_url, Endpoint};
use crate::control::modules as control;
use crate::signing::{self, CommandOp, SignedCommand, SignedModule};

/// The default first levels of fleet topics: `outpost/fleet/<group>/modules/...`.
pub const DEFAULT_FLEET_PREFIX: &str = "outpost/fleet";

/// The filter that matches every gateway's status topic.
pub const FLEET_STATUS_FILTER: &str = "outpost/+/modules/status";

/// The largest status the client accepts, in bytes (a `list` of many modules fits easily).
const MAX_STATUS_BYTES: usize = 4 * 1024 * 1024;

/// A module operation; what a status's `op` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Install a signed module (or a new version of it).
    Deploy,
    /// Stop running a deployed module and forget it.
    Remove,
    /// Go back to a module's previous version.
    Rollback,
    /// Say which modules run.
    List,
}

impl Op {
    /// Its name, as in topics and statuses.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Deploy => "deploy",
            Op::Remove => "remove",
            Op::Rollback => "rollback",
            Op::List => "list",
        }
    }
}

impl From<CommandOp> for Op {
    fn from(op: CommandOp) -> Op {
        match op {
            CommandOp::Remove => Op::Remove,
            CommandOp::Rollback => Op::Rollback,
        }
    }
}

/// Which gateways a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One gateway, by its `gateway_id`: topics `outpost/<id>/modules/...`.
    Gateway(String),
    /// Every gateway of a fleet group: topics `<prefix>/<group>/modules/...` (on an upstream
    /// broker the gateways subscribe to).
    Fleet {
        /// The first levels, e.g. [`DEFAULT_FLEET_PREFIX`].
        prefix: String,
        /// The group.
        group: String,
    },
}

impl Target {
    /// One gateway; refuses an id that is empty or uses anything but letters, digits, `-`,
    /// `_` and `.` (so it is one topic level without wildcards).
    pub fn gateway(id: &str) -> anyhow::Result<Target> {
        check_level("gateway id", id)?;
        Ok(Target::Gateway(id.to_string()))
    }

    /// A fleet group under `prefix`; refuses a group as [`Target::gateway`] refuses an id, and
    /// a prefix that is empty, starts or ends with `/`, has an empty level, or holds `+`, `#`
    /// or NUL.
    pub fn fleet(prefix: &str, group: &str) -> anyhow::Result<Target> {
        check_level("fleet group", group)?;
        if prefix.is_empty()
            || prefix.split('/').any(str::is_empty)
            || prefix.contains(['+', '#', '\0'])
        {
            anyhow::bail!(
                "fleet prefix {prefix:?} must be one or more non-empty topic levels without '+', '#' or a leading or trailing '/'"
            );
        }
        Ok(Target::Fleet {
            prefix: prefix.to_string(),
            group: group.to_string(),
        })
    }

    /// The base of its request topics: `outpost/<id>/modules` or `<prefix>/<group>/modules`.
    pub fn base(&self) -> String {
        match self {
            Target::Gateway(id) => control::base(id),
            Target::Fleet { prefix, group } => control::fleet_base(prefix, group),
        }
    }

    /// The filter for its statuses: the gateway's status topic, or [`FLEET_STATUS_FILTER`].
    pub fn status_filter(&self) -> String {
        match self {
            Target::Gateway(id) => control::status_topic(id),
            Target::Fleet { .. } => FLEET_STATUS_FILTER.to_string(),
        }
    }

    /// Says who it is, for messages: `gateway dev` or `fleet group north`.
    pub fn describe(&self) -> String {
        match self {
            Target::Gateway(id) => format!("gateway {id}"),
            Target::Fleet { group, .. } => format!("fleet group {group}"),
        }
    }
}

fn check_level(what: &str, value: &str) -> anyhow::Result<()> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        anyhow::bail!(
            "{what} {value:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
        );
    }
    Ok(())
}

/// One request, ready to publish: its target, topic and exact payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    target: Target,
    op: Op,
    name: Option<String>,
    payload: Vec<u8>,
    retain: bool,
}

impl Request {
    /// A deploy of `envelope`, the bytes of a signed module, published exactly as given. Fails
    /// when they are not a well-formed envelope (the signature is the gateway's to check); the
    /// module's name is the one it is signed for.
    pub fn deploy(target: Target, envelope: Vec<u8>) -> Result<Request, signing::EnvelopeError> {
        let name = SignedModule::from_bytes(&envelope)?
            .manifest()
            .name()
            .to_string();
        Ok(Request {
            target,
            op: Op::Deploy,
            name: Some(name),
            payload: envelope,
            retain: false,
        })
    }

    /// A deploy of `module` ([`SignedModule::to_bytes`]).
    pub fn deploy_module(target: Target, module: &SignedModule) -> Request {
        Request {
            target,
            op: Op::Deploy,
            name: Some(module.manifest().name().to_string()),
            payload: module.to_bytes(),
            retain: false,
        }
    }

    /// A signed `remove` or `rollback`, for the module and operation it is signed for.
    pub fn command(target: Target, command: &SignedCommand) -> Request {
        Request {
            target,
            op: command.op.into(),
            name: Some(command.name.clone()),
            payload: command.to_json(),
            retain: false,
        }
    }

    /// A `list`, with a random nonce so that its digest is its own.
    pub fn list(target: Target) -> Request {
        let nonce = format!("{:016x}", rand::rng().random::<u64>());
        Request {
            target,
            op: Op::List,
            name: None,
            payload: serde_json::json!({ "nonce": nonce })
                .to_string()
                .into_bytes(),
            retain: false,
        }
    }

    /// The same deploy, published retained, so that gateways that subscribe later (a fleet
    /// gateway that was offline) get it too. Only deploys may be retained.
    pub fn retained(mut self) -> anyhow::Result<Request> {
        if self.op != Op::Deploy {
            anyhow::bail!("only a deploy may be retained, not a {}", self.op.as_str());
        }
        self.retain = true;
        Ok(self)
    }

    /// Whether it is published retained.
    pub fn is_retained(&self) -> bool {
        self.retain
    }

    /// Who it is for.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// What it asks.
    pub fn op(&self) -> Op {
        self.op
    }

    /// The module it is about (none for `list`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The topic it is published on: `<base>/<name>/<op>`, or `<base>/list`.
    pub fn topic(&self) -> String {
        match &self.name {
            Some(name) => format!("{}/{name}/{}", self.target.base(), self.op.as_str()),
            None => format!("{}/{}", self.target.base(), self.op.as_str()),
        }
    }

    /// The exact bytes published.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The SHA-256 of the payload, lower-case hex: the `request_sha256` of its statuses.
    pub fn request_sha256(&self) -> String {
        signing::to_hex(&signing::sha256(&self.payload))
    }
}

/// A gateway's answer to one request, as published on `outpost/<gateway>/modules/status`.
/// Fields this version does not know are kept in `extra` (and printed with `--json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The gateway that answered.
    pub gateway: String,
    /// `deploy`, `remove`, `rollback` or `list`.
    pub op: String,
    /// The module (absent for `list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the request was carried out.
    pub ok: bool,
    /// The SHA-256 of the request's payload.
    pub request_sha256: String,
    /// Why not (when `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Deploy and rollback: the version now running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Deploy and rollback: the SHA-256 of the module now running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Deploy and rollback: the id of the key that signed the module now running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// List: the modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<ModuleInfo>>,
    /// Any other field.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One module of a `list` status. Only the name is required: a module from a `[[module]]` file
/// has no signed version or digest, and one that is declared but not loaded has no source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Its name.
    pub name: String,
    /// Its signed version (deployed modules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The SHA-256 of its bytes (deployed modules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `deployed` (over MQTT) or `config` (a `[[module]]` file), when it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The version a rollback would return to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    /// Whether its circuit breaker has it quarantined.
    #[serde(default)]
    pub quarantined: bool,
    /// Any other field.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Status {
    /// Parses a status; `None` when it is not JSON or lacks a required field.
    pub fn parse(payload: &[u8]) -> Option<Status> {
        serde_json::from_slice(payload).ok()
    }

    /// Why the gateway refused, when it did (`ok` false); a refusal without a reason says so.
    pub fn failure(&self) -> Option<String> {
        if self.ok {
            None
        } else {
            Some(
                self.reason
                    .clone()
                    .unwrap_or_else(|| "refused without a reason".to_string()),
            )
        }
    }
}

/// Publishes `request` to one gateway through the broker of `broker` (`mqtt://HOST[:PORT]` or
/// `mqtts://HOST[:PORT]`: the gateway's own broker, or an upstream it is connected to) and
/// returns that gateway's status for it, whatever its `ok`. Fails with a clear message when
/// the target is a fleet, when the options cannot be used, when the broker cannot be reached
/// or refuses, or when no status arrives within `timeout` (connecting included).
pub async fn request(
    broker: impl Into<Endpoint<'_>>,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Status> {
    let Target::Gateway(gateway_id) = request.target() else {
        anyhow::bail!("a fleet has no single answer: use request_fleet");
    };
    let statuses = exchange(broker.into(), request, timeout, Some(1), false).await?;
    match statuses.into_iter().next() {
        Some(status) => Ok(status),
        None => anyhow::bail!(
            "no status from gateway {gateway_id} within {} s: is it running and connected to this broker, and does it accept deploys ([deploy] trusted_keys)? its log says more",
            timeout.as_secs_f64()
        ),
    }
}

/// Publishes `request` (usually for a fleet) through the broker of `broker` and collects
/// the statuses with its digest from every gateway (`outpost/+/modules/status`, one per
/// gateway, the first) for `wait`, or until `expect` gateways answered. Returns what arrived,
/// possibly nothing; fails only when the broker cannot be reached, refuses, or did not
/// acknowledge the request.
pub async fn request_fleet(
    broker: impl Into<Endpoint<'_>>,
    request: &Request,
    wait: Duration,
    expect: Option<usize>,
) -> anyhow::Result<Vec<Status>> {
    exchange(broker.into(), request, wait, expect, true).await
}

/// The exchange behind [`request`] and [`request_fleet`] ([`crate::client::exchange`]): subscribe,
/// publish once the subscription is confirmed, collect matching statuses until `limit`
/// gateways answered or `wait` (connecting included) passed. With `need_ack`, a request the
/// broker never acknowledged is an error; a request it refused (MQTT 5, or too large for it)
/// is one always.
async fn exchange(
    broker: Endpoint<'_>,
    request: &Request,
    wait: Duration,
    limit: Option<usize>,
    need_ack: bool,
) -> anyhow::Result<Vec<Status>> {
    let address = parse_broker_url(broker.url).map_err(anyhow::Error::msg)?;
    let filter = request.target().status_filter();
    let expected_gateway = match request.target() {
        Target::Gateway(id) => Some(id.clone()),
        Target::Fleet { .. } => None,
    };
    let digest = request.request_sha256();
    let deadline = tokio::time::Instant::now() + wait;
    let mut session = operator::connect(broker, MAX_STATUS_BYTES, wait).await?;

    let mut statuses: Vec<Status> = Vec::new();
    let mut answered: HashSet<String> = HashSet::new();
    let mut acked = false;
    let enough = |n: usize| limit.is_some_and(|limit| n >= limit);
    let collect = async {
        session.subscribe(std::slice::from_ref(&filter)).await?;
        let sent = session
            .publish(
                request.topic(),
                request.payload().to_vec(),
                request.is_retained(),
            )
            .await?;
        loop {
            let (topic, payload) = match session.next().await? {
                operator::Event::Acked { pkid, refusal } if pkid == sent => {
                    if let Some(reason) = refusal {
                        anyhow::bail!(
                            "the broker at {address} refused the request on {}: {reason}",
                            request.topic()
                        );
                    }
                    acked = true;
                    continue;
                }
                operator::Event::Acked { .. } => continue,
                operator::Event::Message { topic, payload } => (topic, payload),
            };
            let Ok(value) = serde_json::from_slice::<Value>(&payload) else {
                continue;
            };
            if value.get("request_sha256").and_then(Value::as_str) != Some(&digest) {
                continue;
            }
            let from = topic
                .strip_prefix("outpost/")
                .and_then(|rest| rest.strip_suffix("/modules/status"))
                .unwrap_or_default();
            let status: Status = serde_json::from_value(value).map_err(|e| {
                anyhow::anyhow!(
                    "gateway {from} answered with a status this client cannot read ({e}): {}",
                    String::from_utf8_lossy(&payload[..payload.len().min(500)])
                )
            })?;
            if from != status.gateway
                || expected_gateway
                    .as_ref()
                    .is_some_and(|g| *g != status.gateway)
            {
                continue;
            }
            if answered.insert(status.gateway.clone()) {
                statuses.push(status);
                if enough(statuses.len()) {
                    return Ok(());
                }
            }
        }
    };
    // When the wait is over, what arrived is the answer.
    if let Ok(result) = tokio::time::timeout_at(deadline, collect).await {
        result?;
    }
    // A status proves that the request arrived; without one, insist on the PUBACK.
    if !acked && need_ack && statuses.is_empty() {
        anyhow::bail!(
            "the broker at {address} did not acknowledge the request on {} within {} s",
            request.topic(),
            wait.as_secs_f64()
        );
    }
    // Leave politely; best effort.
    session.close().await;
    Ok(statuses)
}

/// Whether a fleet request succeeded: no gateway refused, at least `expect` answered (when
/// given), and, without `expect`, at least one answered unless the request was retained (then
/// gateways may apply it later). The error says what went wrong, naming the gateways that
/// refused.
pub fn check_fleet(
    statuses: &[Status],
    expect: Option<usize>,
    retained: bool,
) -> Result<(), String> {
    let refused: Vec<String> = statuses
        .iter()
        .filter_map(|s| s.failure().map(|reason| format!("{}: {reason}", s.gateway)))
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "{} of {} gateway(s) refused: {}",
            refused.len(),
            statuses.len(),
            refused.join("; ")
        ));
    }
    match expect {
        Some(n) if statuses.len() < n => Err(format!(
            "only {} of the {n} expected gateway(s) answered",
            statuses.len()
        )),
        None if statuses.is_empty() && !retained => Err(
            "no gateway answered: are the group's gateways connected to this broker, with this fleet prefix?"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

/// One status for people: a line saying what the gateway did (or why it refused), or, for a
/// successful `list`, a table of its modules.
pub fn render(status: &Status) -> String {
    let gateway = &status.gateway;
    let name = status.name.as_deref().unwrap_or("-");
    let short = |hex: &Option<String>| {
        hex.as_deref()
            .map(|h| h.chars().take(12).collect::<String>())
            .unwrap_or_else(|| "-".into())
    };
    let version = status.version.as_deref().unwrap_or("-");
    if let Some(reason) = status.failure() {
        let what = match status.name.as_deref() {
            Some(name) => format!("{} of {name}", status.op),
            None => status.op.clone(),
        };
        return format!("gateway {gateway}: {what} refused: {reason}\n");
    }
    let previous = status.extra.get("previous").and_then(Value::as_str);
    let was = previous.map(|p| format!("; was {p}")).unwrap_or_default();
    let unchanged = status.extra.get("unchanged") == Some(&Value::Bool(true));
    match status.op.as_str() {
        "deploy" if unchanged => format!(
            "gateway {gateway}: {name} version {version} was already running (sha256 {})\n",
            short(&status.sha256)
        ),
        "deploy" => format!(
            "gateway {gateway}: deployed {name} version {version} (sha256 {}, key {}){was}\n",
            short(&status.sha256),
            status.key.as_deref().unwrap_or("-")
        ),
        "rollback" => format!(
            "gateway {gateway}: rolled back {name} to version {version} (sha256 {}){was}\n",
            short(&status.sha256)
        ),
        "remove" => {
            let mut line = format!("gateway {gateway}: removed {name}");
            if let Some(previous) = previous {
                let _ = write!(line, " version {previous}");
            }
            if let Some(now) = &status.version {
                let _ = write!(line, "; now running {now}");
            }
            line.push('\n');
            line
        }
        "list" => list_table(status),
        other => format!("gateway {gateway}: {other} of {name}: ok\n"),
    }
}

/// Several statuses (a fleet's) for people: each one as [`render`] gives it, ordered by
/// gateway, and a closing count.
pub fn render_all(statuses: &[Status]) -> String {
    let mut sorted: Vec<&Status> = statuses.iter().collect();
    sorted.sort_by(|a, b| a.gateway.cmp(&b.gateway));
    let mut out: String = sorted.iter().map(|s| render(s)).collect();
    let refused = statuses.iter().filter(|s| !s.ok).count();
    let _ = writeln!(
        out,
        "{} gateway(s) answered: {} ok, {refused} refused",
        statuses.len(),
        statuses.len() - refused
    );
    out
}

fn list_table(status: &Status) -> String {
    let modules = status.modules.as_deref().unwrap_or_default();
    if modules.is_empty() {
        return format!("gateway {}: no modules\n", status.gateway);
    }
    let header = ["NAME", "VERSION", "SOURCE", "PREVIOUS", "STATE", "SHA256"];
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 6]> = modules
        .iter()
        .map(|m| {
            let state = if m.quarantined {
                "quarantined"
            } else if m.extra.get("loaded") == Some(&Value::Bool(false)) {
                "not loaded"
            } else {
                "ok"
            };
            [
                m.name.clone(),
                or_dash(&m.version),
                or_dash(&m.source),
                or_dash(&m.previous_version),
                state.into(),
                m.sha256
                    .as_deref()
                    .map_or_else(|| "-".into(), |h| h.chars().take(12).collect()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!("gateway {}:\n", status.gateway);
    let mut line = |cells: [&str; 6]| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SigningKey;
    use serde_json::json;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    fn module() -> SignedModule {
        SignedModule::sign(&key(), "celsius", "1.0.0", 1, b"\0asm bytes".to_vec()).unwrap()
    }

    fn status(value: Value) -> Status {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn topics_follow_the_protocol() {
        let gw = Target::gateway("dev").unwrap();
        let fleet = Target::fleet(DEFAULT_FLEET_PREFIX, "north").unwrap();
        let deploy = Request::deploy_module(gw.clone(), &module());
        assert_eq!(deploy.topic(), "outpost/dev/modules/celsius/deploy");
        assert_eq!(deploy.payload(), module().to_bytes().as_slice());
        let fleet_deploy = Request::deploy_module(fleet.clone(), &module());
        assert_eq!(
            fleet_deploy.topic(),
            "outpost/fleet/north/modules/celsius/deploy"
        );
        let c = SignedCommand::sign(&key(), CommandOp::Rollback, "celsius", 5).unwrap();
        let rollback = Request::command(gw.clone(), &c);
        assert_eq!(rollback.topic(), "outpost/dev/modules/celsius/rollback");
        assert_eq!(rollback.op(), Op::Rollback);
        assert_eq!(rollback.payload(), c.to_json().as_slice());
        let list = Request::list(gw.clone());
        assert_eq!(list.topic(), "outpost/dev/modules/list");
        assert_ne!(
            list.request_sha256(),
            Request::list(gw.clone()).request_sha256(),
            "each list has its own digest"
        );
        assert_eq!(gw.status_filter(), "outpost/dev/modules/status");
        assert_eq!(fleet.status_filter(), FLEET_STATUS_FILTER);
        assert_eq!(
            deploy.request_sha256(),
            signing::to_hex(&signing::sha256(&module().to_bytes()))
        );
    }

    #[test]
    fn deploys_are_published_as_given_and_only_they_retain() {
        let gw = Target::gateway("dev").unwrap();
        // Upper-case hex is a valid envelope that re-serializing would change.
        let text = String::from_utf8_lossy(&module().to_bytes()).into_owned();
        let sig = text.split("\"signature\":\"").nth(1).unwrap()[..128].to_string();
        let upper = text.replace(&sig, &sig.to_uppercase()).into_bytes();
        let request = Request::deploy(gw.clone(), upper.clone()).unwrap();
        assert_eq!(request.payload(), upper.as_slice());
        assert_eq!(request.name(), Some("celsius"));
        assert!(Request::deploy(gw.clone(), b"\0asm raw".to_vec()).is_err());
        assert!(request.clone().retained().unwrap().is_retained());
        assert!(!request.is_retained());
        assert!(Request::list(gw).retained().is_err());
    }

    #[test]
    fn targets_are_validated() {
        for bad in ["", "a/b", "+", "#", "a b"] {
            assert!(Target::gateway(bad).is_err(), "{bad:?}");
            assert!(Target::fleet("p", bad).is_err(), "{bad:?}");
        }
        for bad in ["", "/a", "a/", "a//b", "a/+", "#"] {
            assert!(Target::fleet(bad, "g").is_err(), "{bad:?}");
        }
        assert_eq!(
            Target::fleet("x/y", "g").unwrap().base(),
            "x/y/g/modules".to_string()
        );
    }

    #[test]
    fn statuses_parse_leniently_and_render() {
        let ok = status(json!({
            "gateway": "dev", "op": "deploy", "name": "celsius", "ok": true,
            "request_sha256": "ab", "version": "1.0.0", "sha256": "0123456789abcdef",
            "key": "k1", "elapsed_ms": 12,
        }));
        assert_eq!(ok.extra["elapsed_ms"], 12);
        assert_eq!(
            render(&ok),
            "gateway dev: deployed celsius version 1.0.0 (sha256 0123456789ab, key k1)\n"
        );
        let refused = status(json!({
            "gateway": "dev", "op": "remove", "name": "celsius", "ok": false,
            "request_sha256": "ab", "reason": "no such module",
        }));
        assert_eq!(refused.failure().as_deref(), Some("no such module"));
        assert_eq!(
            render(&refused),
            "gateway dev: remove of celsius refused: no such module\n"
        );
        let list = status(json!({
            "gateway": "dev", "op": "list", "ok": true, "request_sha256": "ab",
            "modules": [
                {"name": "celsius", "version": "1.0.1", "sha256": "aaaaaaaaaaaaaaaa",
                 "source": "deployed", "previous_version": "1.0.0", "quarantined": false,
                 "loaded": true},
                {"name": "enrich", "source": "config", "quarantined": true, "path": "e.wasm"},
                {"name": "gone", "declared": true, "loaded": false, "quarantined": false},
            ],
        }));
        let table = render(&list);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "gateway dev:");
        assert_eq!(
            lines[1],
            "NAME     VERSION  SOURCE    PREVIOUS  STATE        SHA256"
        );
        assert_eq!(
            lines[2],
            "celsius  1.0.1    deployed  1.0.0     ok           aaaaaaaaaaaa"
        );
        assert_eq!(
            lines[3],
            "enrich   -        config    -         quarantined  -"
        );
        assert_eq!(
            lines[4],
            "gone     -        -         -         not loaded   -"
        );
        let line = |extra: Value| {
            let mut v = json!({"gateway": "g", "op": "deploy", "name": "m", "ok": true,
                "request_sha256": "ab", "version": "2", "sha256": "cd", "key": "k"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            render(&status(v))
        };
        assert_eq!(
            line(json!({"previous": "1"})),
            "gateway g: deployed m version 2 (sha256 cd, key k); was 1\n"
        );
        assert_eq!(
            line(json!({"unchanged": true})),
            "gateway g: m version 2 was already running (sha256 cd)\n"
        );
        assert_eq!(
            line(json!({"op": "rollback", "previous": "3"})),
            "gateway g: rolled back m to version 2 (sha256 cd); was 3\n"
        );
        assert_eq!(
            line(json!({"op": "remove", "previous": "2", "version": null})),
            "gateway g: removed m version 2\n"
        );
        assert_eq!(
            line(json!({"op": "remove", "previous": "2", "version": "file"})),
            "gateway g: removed m version 2; now running file\n"
        );
        assert!(Status::parse(b"{\"gateway\": \"dev\"}").is_none());
        assert!(Status::parse(b"not json").is_none());
        // Round trip for --json.
        let back: Status = serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn fleet_outcomes() {
        let answer = |gw: &str, ok: bool| {
            status(json!({"gateway": gw, "op": "deploy", "name": "m", "ok": ok,
                "request_sha256": "ab", "reason": "bad"}))
        };
        let two = [answer("a", true), answer("b", true)];
        assert!(check_fleet(&two, None, false).is_ok());
        assert!(check_fleet(&two, Some(2), false).is_ok());
        let err = check_fleet(&two, Some(3), true).unwrap_err();
        assert!(err.contains("only 2 of the 3"), "{err}");
        assert!(check_fleet(&[], None, false).is_err());
        assert!(check_fleet(&[], None, true).is_ok());
        let mixed = [answer("a", true), answer("b", false)];
        let err = check_fleet(&mixed, None, false).unwrap_err();
        assert!(err.contains("b: bad"), "{err}");
        let out = render_all(&mixed);
        assert!(
            out.ends_with("2 gateway(s) answered: 1 ok, 1 refused\n"),
            "{out}"
        );
    }
}
