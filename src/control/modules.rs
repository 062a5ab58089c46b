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

use crate::handlers::registry::Registry;
use crate::metrics::Metrics;
use crate::signing::{self, CommandOp};
use crate::uplink::{RemoteRequest, UpstreamReply};

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
            Request::List => registry.list().map(|modules| json!({ "modules": modules })),
            Request::Deploy(name) => registry.deploy(&name, &payload).map(applied_json),
            Request::Command(name, op) => registry.command(&name, op, &payload).map(applied_json),
            Request::Status => Ok(json!({})),
        })
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")));
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

fn applied_json(applied: crate::handlers::registry::Applied) -> Value {
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
}
