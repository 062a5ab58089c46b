//! The module control plane: deploy, rollback, remove and list handler modules over MQTT, from
//! the embedded broker or through an upstream broker (one gateway, or a fleet group), and the
//! periodic metrics publication.
//!
//! Topics, for gateway `G` (base `outpost/G/modules`) and, on an upstream, for each fleet group
//! `<group>` this gateway belongs to (base `<fleet_prefix>/<group>/modules`):
//!
//! | topic | payload | does |
//! | --- | --- | --- |
//! | `<base>/<name>/deploy` | a signed-module envelope ([`crate::signing::SignedModule`]) | verifies, compiles, stores and activates it |
//! | `<base>/<name>/rollback` | a signed command ([`crate::signing::SignedCommand`]) | returns to the previous version (kept) |
//! | `<base>/<name>/remove` | a signed command | deletes the deployed versions (the configured file, if any, takes over) |
//! | `<base>/list` | anything | lists the modules |
//!
//! Every request gets one status message, JSON, on `outpost/G/modules/status` on the embedded
//! broker and, when the request came through an upstream, on that upstream too:
//! `{"gateway": G, "op": .., "name": .., "ok": true|false, "request_sha256": <hex of the
//! request payload's SHA-256>, ..}` with `"reason"` when refused, `"version"`, `"sha256"`,
//! `"key"`, `"previous"` and `"unchanged"` when applied, `"modules"` for a list.
//!
//! Guarantees:
//! - Requests are handled one at a time, in arrival order; a request never blocks the
//!   pipeline (compiling runs on a blocking thread, and the new version replaces the old one
//!   atomically: see [`crate::handlers::registry`]).
//! - A malformed request (unknown verb, bad name, bad signature, ...) changes nothing and is
//!   answered with the reason.
//! - Status messages are QoS 0 (informational): a requester that misses one may ask `list`.
//!
//! - The status of a request from the gateway's own broker goes to the requesting client only;
//!   a request that came through an upstream is answered there and on the local status topic.
//!
//! Who may send local requests is the broker's business (`broker.admins`, the ACL: see
//! [`crate::edge::access`]); deploy, rollback and remove are signed on top. On an upstream,
//! the upstream broker decides who may publish on the module topics. It does not keep a
//! request that arrived while the gateway was down (publish fleet deploys retained so that
//! gateways that connect later get them).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::handlers::registry::{Applied, ModuleEntry, Origin, Registry};
use crate::metrics::Metrics;
use crate::signing::{self, CommandOp};

/// The client id of the module control plane's in-process link to the broker.
pub const CLIENT_ID: &str = "outpost-modules";

/// Requests from the uplinks that may wait to be handled; more are dropped with a warning.
pub const REMOTE_QUEUE: usize = 16;

/// The base of gateway `gateway_id`'s module topics (no trailing `/`).
pub fn base(gateway_id: &str) -> String {
    format!("outpost/{gateway_id}/modules")
}

/// The topic status messages go to.
pub fn status_topic(gateway_id: &str) -> String {
    format!("{}/status", base(gateway_id))
}

/// The topic gateway `gateway_id` publishes its metrics on.
pub fn metrics_topic(gateway_id: &str) -> String {
    format!("outpost/{gateway_id}/metrics")
}

/// The base of fleet group `group`'s module topics.
pub fn fleet_base(fleet_prefix: &str, group: &str) -> String {
    format!("{fleet_prefix}/{group}/modules")
}

/// A module request that arrived through an upstream broker: what an uplink forwards from
/// its control subscriptions ([`ModuleControl::upstream_filters`]) without reading it.
pub struct RemoteRequest {
    /// The link it came from.
    pub link: String,
    /// Its topic on the upstream broker.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Publishes a reply on the same connection (QoS 0: at most once).
    pub reply: UpstreamReply,
}

/// Publishes replies on the upstream connection a [`RemoteRequest`] arrived on. Cheap to
/// clone.
#[derive(Clone)]
pub struct UpstreamReply(Arc<PublishFn>);

/// Queues a payload on a topic of one upstream connection, or says why it cannot.
type PublishFn = dyn Fn(&str, Vec<u8>) -> Result<(), String> + Send + Sync;

impl UpstreamReply {
    /// Replies through `publish`, which queues a payload on a topic of the connection (QoS 0,
    /// not retained) or says why it cannot.
    pub fn new(
        publish: impl Fn(&str, Vec<u8>) -> Result<(), String> + Send + Sync + 'static,
    ) -> UpstreamReply {
        UpstreamReply(Arc::new(publish))
    }

    /// Queues `payload` on `topic`. Fails when the connection is gone or its request queue is
    /// full; a reply is informational and may be lost.
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        (self.0)(topic, payload)
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Deploy the signed module in the payload as `name`.
    Deploy(String),
    /// Apply the signed command in the payload to `name`.
    Command(String, CommandOp),
    /// List the modules.
    List,
    /// A status message (this gateway's own or another's): not a request.
    Status,
}

/// Reads a request from the part of its topic after the base (`<name>/<verb>` or `list`).
pub fn parse_request(rest: &str) -> Result<Request, String> {
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        ["list"] => Ok(Request::List),
        ["status"] => Ok(Request::Status),
        [name, verb] => {
            signing::validate_name(name).map_err(|e| e.to_string())?;
            match *verb {
                "deploy" => Ok(Request::Deploy(name.to_string())),
                "rollback" => Ok(Request::Command(name.to_string(), CommandOp::Rollback)),
                "remove" => Ok(Request::Command(name.to_string(), CommandOp::Remove)),
                other => Err(format!(
                    "unknown verb {other:?}: expected deploy, rollback or remove"
                )),
            }
        }
        _ => Err(format!(
            "unknown request topic level {rest:?}: expected <name>/deploy, <name>/rollback, <name>/remove or list"
        )),
    }
}

/// The module control plane of one gateway.
pub struct ModuleControl {
    /// This gateway's id.
    pub gateway_id: String,
    /// The live handlers.
    pub registry: Arc<Registry>,
    /// The gateway's counters (published on the metrics topic).
    pub metrics: Arc<Metrics>,
    /// Bases of the topics accepted from upstreams: this gateway's and its fleet groups'.
    pub upstream_bases: Vec<String>,
    /// How often to publish the metrics; `None`: never.
    pub metrics_interval: Option<Duration>,
}

impl ModuleControl {
    /// The filters the uplinks subscribe to for this gateway (see [`crate::uplink::UplinkControl`]).
    pub fn upstream_filters(&self) -> Vec<String> {
        self.upstream_bases
            .iter()
            .map(|b| format!("{b}/#"))
            .collect()
    }

    /// Subscribes the link to this gateway's module topics, waits for the broker's
    /// confirmation (so a request published after this returns is not missed), then serves
    /// local requests and those the uplinks forward on `remote` until the link closes.
    pub async fn start(
        self,
        link: crate::edge::LocalLink,
        remote: mpsc::Receiver<RemoteRequest>,
    ) -> anyhow::Result<JoinHandle<()>> {
        let filter = format!("{}/#", base(&self.gateway_id));
        link.subscribe(&filter)
            .map_err(|reason| anyhow::anyhow!("cannot subscribe to {filter}: {reason}"))?;
        info!(topics = %filter, "module control topics ready");
        Ok(tokio::spawn(self.serve(link, remote)))
    }

    async fn serve(
        self,
        mut link: crate::edge::LocalLink,
        mut remote: mpsc::Receiver<RemoteRequest>,
    ) {
        let local_base = format!("{}/", base(&self.gateway_id));
        let status = status_topic(&self.gateway_id);
        let mut ticker = self.metrics_interval.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut remote_open = true;
        loop {
            tokio::select! {
                message = link.next() => {
                    let Some(rest) = message.topic.strip_prefix(&local_base) else { continue };
                    let Some(body) = self.answer(rest, message.payload.to_vec(), "local").await else { continue };
                    // To the requester only: no one else learns what it asked or what it got.
                    link.reply(message.from.as_deref(), status.clone(), body.to_string());
                }
                request = remote.recv(), if remote_open => {
                    let Some(request) = request else { remote_open = false; continue };
                    let Some(rest) = self
                        .upstream_bases
                        .iter()
                        .find_map(|b| request.topic.strip_prefix(b.as_str()).and_then(|r| r.strip_prefix('/')))
                        .map(str::to_string)
                    else {
                        continue;
                    };
                    let Some(body) = self.answer(&rest, request.payload, &request.link).await else { continue };
                    reply_upstream(&request.reply, &status, &body);
                    link.publish(status.clone(), body.to_string());
                }
                _ = tick(&mut ticker) => {
                    let mut snapshot = self.metrics.snapshot();
                    snapshot.handler_concurrency = self.registry.runtime().concurrency();
                    let snapshot = match serde_json::to_string(&snapshot) {
                        Ok(s) => s,
                        Err(e) => { warn!(error = %e, "cannot serialize the metrics"); continue }
                    };
                    link.publish(metrics_topic(&self.gateway_id), snapshot);
                }
            }
        }
    }

    /// Handles one request; `None` for messages that are not requests (status messages).
    async fn answer(&self, rest: &str, payload: Vec<u8>, from: &str) -> Option<Value> {
        let request_sha256: String = Sha256::digest(&payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let request = match parse_request(rest) {
            Ok(Request::Status) => return None,
            // An empty message on a deploy topic clears a retained deploy: not a request.
            Ok(Request::Deploy(_)) if payload.is_empty() => return None,
            Ok(r) => r,
            Err(reason) => {
                Metrics::add(&self.metrics.module_requests_refused, 1);
                warn!(topic_rest = %rest, %from, %reason, "module request refused");
                return Some(json!({
                    "gateway": self.gateway_id, "op": "unknown", "ok": false,
                    "request_sha256": request_sha256, "reason": reason,
                }));
            }
        };
        let registry = self.registry.clone();
        let mut body = match &request {
            Request::List => json!({"gateway": self.gateway_id, "op": "list"}),
            Request::Deploy(name) => {
                json!({"gateway": self.gateway_id, "op": "deploy", "name": name})
            }
            Request::Command(name, op) => {
                json!({"gateway": self.gateway_id, "op": op.as_str(), "name": name})
            }
            Request::Status => return None,
        };
        body["request_sha256"] = json!(request_sha256);
        let outcome = tokio::task::spawn_blocking(move || match request {
            Request::List => registry.list().map(|modules| list_json(&modules)),
            Request::Deploy(name) => registry.deploy(&name, &payload).map(applied_json),
            Request::Command(name, op) => registry.command(&name, op, &payload).map(applied_json),
            Request::Status => Ok(json!({})),
        })
        .await
        .map_err(|e| format!("internal error: {e}"))
        .and_then(|outcome| outcome.map_err(|e| e.to_string()));
        match outcome {
            Ok(details) => {
                body["ok"] = json!(true);
                if let (Value::Object(body), Value::Object(details)) = (&mut body, details) {
                    body.extend(details);
                }
            }
            Err(reason) => {
                Metrics::add(&self.metrics.module_requests_refused, 1);
                warn!(op = %body["op"], name = %body["name"], %from, %reason, "module request refused");
                body["ok"] = json!(false);
                body["reason"] = json!(reason);
            }
        }
        Some(body)
    }
}

/// The details of a `list` status: `"modules"`, one object per module (see [`module_json`]).
fn list_json(modules: &[ModuleEntry]) -> Value {
    json!({ "modules": modules.iter().map(module_json).collect::<Vec<_>>() })
}

/// One module of a `list` status: `name`, `declared`, `loaded`, `quarantined` always;
/// `quarantine_left_ms` while quarantined; `source` (`deployed` with `version`, `sha256` and
/// `key`, or `config` with `path`), `module_hash` and `fuel` when loaded; `deployed_ms` and
/// `previous_version` when the database has a deployment.
fn module_json(entry: &ModuleEntry) -> Value {
    let mut json = json!({
        "name": entry.name,
        "declared": entry.declared,
        "loaded": entry.running.is_some(),
        "quarantined": entry.quarantine_left.is_some(),
    });
    if let Some(left) = entry.quarantine_left {
        json["quarantine_left_ms"] = json!(left.as_millis() as u64);
    }
    if let Some(running) = &entry.running {
        match &running.origin {
            Origin::Deployed {
                version,
                sha256,
                signer,
            } => {
                json["source"] = json!("deployed");
                json["version"] = json!(version);
                json["sha256"] = json!(sha256);
                json["key"] = json!(signer);
            }
            Origin::File(path) => {
                json["source"] = json!("config");
                json["path"] = json!(path.display().to_string());
            }
        }
        json["module_hash"] = json!(running.module_hash);
        json["fuel"] = json!(running.fuel);
    }
    if let Some(deployment) = &entry.deployment {
        json["deployed_ms"] = json!(deployment.deployed_ms);
        if let Some(previous) = &deployment.previous_version {
            json["previous_version"] = json!(previous);
        }
    }
    json
}

/// The details of a deploy, rollback or remove status.
fn applied_json(applied: Applied) -> Value {
    let mut body = json!({
        "key": applied.key,
        "unchanged": applied.unchanged,
        "compile_ms": applied.compile.as_secs_f64() * 1000.0,
    });
    if let Some(v) = applied.version {
        body["version"] = json!(v);
    }
    if let Some(h) = applied.sha256 {
        body["sha256"] = json!(h);
    }
    if let Some(p) = applied.previous {
        body["previous"] = json!(p);
    }
    body
}

fn reply_upstream(reply: &UpstreamReply, topic: &str, body: &Value) {
    if let Err(e) = reply.publish(topic, body.to_string().into_bytes()) {
        warn!(error = %e, "cannot publish a module status upstream");
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::registry::{Deployment, Running};

    #[test]
    fn request_topics_parse() {
        assert_eq!(parse_request("list"), Ok(Request::List));
        assert_eq!(parse_request("status"), Ok(Request::Status));
        assert_eq!(
            parse_request("enrich/deploy"),
            Ok(Request::Deploy("enrich".into()))
        );
        assert_eq!(
            parse_request("enrich/rollback"),
            Ok(Request::Command("enrich".into(), CommandOp::Rollback))
        );
        assert_eq!(
            parse_request("enrich/remove"),
            Ok(Request::Command("enrich".into(), CommandOp::Remove))
        );
        assert!(parse_request("enrich/explode")
            .unwrap_err()
            .contains("unknown verb"));
        assert!(parse_request("a/b/c").is_err());
        assert!(parse_request("").is_err());
        assert!(parse_request("/deploy").is_err());
    }

    #[test]
    fn module_lists_render_as_they_always_have() {
        let deployed = ModuleEntry {
            name: "enrich".into(),
            declared: true,
            quarantine_left: Some(Duration::from_micros(1_500_900)),
            running: Some(Running {
                origin: Origin::Deployed {
                    version: "1.2.0".into(),
                    sha256: "ab12".into(),
                    signer: "k1".into(),
                },
                module_hash: "h1".into(),
                fuel: 42,
            }),
            deployment: Some(Deployment {
                deployed_ms: 1_700_000_000_000,
                previous_version: Some("1.1.0".into()),
            }),
        };
        let from_file = ModuleEntry {
            name: "threshold".into(),
            declared: true,
            quarantine_left: None,
            running: Some(Running {
                origin: Origin::File("/etc/outpost/threshold.wasm".into()),
                module_hash: "h2".into(),
                fuel: 0,
            }),
            deployment: None,
        };
        let removed = ModuleEntry {
            name: "gone".into(),
            declared: false,
            quarantine_left: None,
            running: None,
            deployment: Some(Deployment {
                deployed_ms: 5,
                previous_version: None,
            }),
        };
        assert_eq!(
            list_json(&[deployed, from_file, removed]).to_string(),
            concat!(
                r#"{"modules":["#,
                r#"{"declared":true,"deployed_ms":1700000000000,"fuel":42,"key":"k1","loaded":true,"#,
                r#""module_hash":"h1","name":"enrich","previous_version":"1.1.0","#,
                r#""quarantine_left_ms":1500,"quarantined":true,"sha256":"ab12","source":"deployed","#,
                r#""version":"1.2.0"},"#,
                r#"{"declared":true,"fuel":0,"loaded":true,"module_hash":"h2","name":"threshold","#,
                r#""path":"/etc/outpost/threshold.wasm","quarantined":false,"source":"config"},"#,
                r#"{"declared":false,"deployed_ms":5,"loaded":false,"name":"gone","quarantined":false}"#,
                r#"]}"#
            )
        );
        assert_eq!(list_json(&[]).to_string(), r#"{"modules":[]}"#);
    }

    #[test]
    fn a_status_goes_back_through_the_connection_the_request_came_on() {
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        let reply = UpstreamReply::new(move |topic, payload| {
            log.lock().unwrap().push((topic.to_string(), payload));
            Ok(())
        });
        reply_upstream(
            &reply.clone(),
            "outpost/gw/modules/status",
            &json!({"ok": true}),
        );
        assert_eq!(
            *sent.lock().unwrap(),
            vec![(
                "outpost/gw/modules/status".to_string(),
                br#"{"ok":true}"#.to_vec()
            )]
        );
        let gone = UpstreamReply::new(|_, _| Err("the connection is gone".into()));
        assert!(gone.publish("t", Vec::new()).is_err());
    }
}
