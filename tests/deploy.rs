//! Deploying handler modules over MQTT to the real gateway: only signed components of the
//! handler world are accepted, each refusal says why, a version swap under load loses and
//! duplicates nothing, a replayed deploy of an older version is refused, rollback and remove
//! are signed commands that cannot be replayed,
//! deploys survive a restart without compiling again, and a fleet deploy through an upstream
//! Mosquitto reaches two gateways.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Device, Harness, Received, Subscriber};
use outpost::signing::{self, CommandOp, SignedCommand, SignedModule, SigningKey};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A key pair; the public half written where a gateway configuration can name it.
fn keypair(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let key = signing::generate_key().unwrap();
    let path = dir.join(format!("{name}.pub"));
    std::fs::write(&path, signing::public_key_text(&key.verifying_key())).unwrap();
    (key, path)
}

/// A module signed now (see [`issue_time`]).
fn signed(key: &SigningKey, name: &str, version: &str, wasm: &[u8]) -> Vec<u8> {
    SignedModule::sign(key, name, version, issue_time(), wasm.to_vec())
        .unwrap()
        .to_bytes()
}

fn command(key: &SigningKey, op: CommandOp, name: &str, issued_ms: u64) -> Vec<u8> {
    SignedCommand::sign(key, op, name, issued_ms)
        .unwrap()
        .to_json()
}

/// An issue time for a deploy or command: the clock, but strictly later than every time this
/// returned before, so that requests signed within one millisecond still have an order (a
/// gateway refuses a request not issued after the last one it accepted for the module).
fn issue_time() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let previous = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last + 1))
        })
        .unwrap();
    now.max(previous + 1)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn guest(name: &str) -> Vec<u8> {
    std::fs::read(outpost::handlers::examples::guest_path(name)).unwrap()
}

/// An operator's MQTT client: publishes requests (any size) and collects the JSON messages on
/// the status topics it subscribed to.
struct Operator {
    client: AsyncClient,
    messages: Arc<Mutex<Vec<(String, Value)>>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn connect(port: u16, id: &str, filter: &str) -> Operator {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let (client, driver) = common::subscribe_with(options, filter, move |p| {
            if let Ok(value) = serde_json::from_slice::<Value>(&p.payload) {
                sink.lock().unwrap().push((p.topic.clone(), value));
            }
        })
        .await;
        Operator {
            client,
            messages,
            driver,
        }
    }

    async fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .unwrap();
    }

    /// The status messages answering a request with this payload.
    fn answers(&self, payload: &[u8]) -> Vec<Value> {
        let sha = hex_sha256(payload);
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["request_sha256"] == sha.as_str())
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Publishes a request on the gateway's local module topics and returns its status.
    async fn request(&self, gateway: &str, rest: &str, payload: &[u8]) -> Value {
        self.publish(&format!("outpost/{gateway}/modules/{rest}"), payload, false)
            .await;
        eventually(&format!("a status for {rest}"), || {
            !self.answers(payload).is_empty()
        })
        .await;
        self.answers(payload).remove(0)
    }

    /// Publishes a request again that was published before, and returns the status answering
    /// this second copy.
    async fn replay(&self, gateway: &str, rest: &str, payload: &[u8]) -> Value {
        let before = self.answers(payload).len();
        self.publish(&format!("outpost/{gateway}/modules/{rest}"), payload, false)
            .await;
        eventually(&format!("a status for the replayed {rest}"), || {
            self.answers(payload).len() > before
        })
        .await;
        self.answers(payload).remove(before)
    }

    /// The newest metrics snapshot published by `gateway`, if any.
    fn metrics(&self, gateway: &str) -> Option<Value> {
        let topic = format!("outpost/{gateway}/metrics");
        self.messages
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(t, _)| *t == topic)
            .map(|(_, v)| v.clone())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn config(gateway: &str, upstream: &str, trusted: &Path, extra: &str) -> String {
    format!(
        r#"
gateway_id = "{gateway}"

[broker]
max_payload_bytes = 1048576

[handlers]
deadline_ms = 1000
metrics_interval_ms = 200

[deploy]
trusted_keys = ["{trusted}"]
max_module_bytes = 400000
{extra}

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "proc"

[[route]]
name = "sensors"
filter = "sensors/#"
handler = "proc"
topic = "{{gateway}}/{{output}}"
"#,
        trusted = trusted.display()
    )
}

fn reason(status: &Value) -> String {
    assert_eq!(status["ok"], false, "expected a refusal: {status}");
    status["reason"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signed_components_of_the_handler_world_are_deployed() {
    let setup = Harness::builder();
    let (key, trusted) = keypair(setup.dir(), "operator");
    let (stranger, _) = keypair(setup.dir(), "stranger");
    let mut h = setup
        .subscriber_as("cloud-sub", "gw-a/#")
        .config_with(|url| config("gw-a", url, &trusted, ""))
        .start()
        .await;
    let operator = Operator::connect(h.gateway.port, "operator", "outpost/gw-a/#").await;

    // Events for a module that is declared but not deployed yet wait for it.
    let device = Device::connect(h.gateway.port, "boiler").await;
    for n in 0..5 {
        device
            .publish("sensors/boiler", format!(r#"{{"seq":{n},"temp_c":20}}"#))
            .await;
    }
    device.wait_acked(5).await;

    let enrich = guest("enrich");
    let mut tampered = signed(&key, "proc", "1.0.0", &enrich);
    let header_end = tampered.iter().skip(25).position(|&b| b == b'\n').unwrap() + 25;
    let header = String::from_utf8(tampered[..header_end].to_vec()).unwrap();
    assert!(header.contains(r#""version":"1.0.0""#), "{header}");
    let forged = header.replace(r#""version":"1.0.0""#, r#""version":"9.0.0""#);
    tampered.splice(..header_end, forged.into_bytes());
    let full = signed(&key, "proc", "1.0.0", &enrich);
    let mut oversized = b"\0asm\x0d\0\x01\0".to_vec();
    oversized.resize(500_000, 0);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unsigned", enrich.clone(), "not a signed module"),
        (
            "signed by an unknown key",
            signed(&stranger, "proc", "1.0.0", &enrich),
            "signature refused",
        ),
        (
            "signed for another name",
            signed(&key, "other", "1.0.0", &enrich),
            "signed as \"other\"",
        ),
        ("signed for another version", tampered, "signature refused"),
        (
            "truncated",
            full[..full.len() - 1000].to_vec(),
            "not a signed module",
        ),
        (
            "not WebAssembly",
            signed(&key, "proc", "1", b"#!/bin/sh\nrm -rf /\n"),
            "not WebAssembly",
        ),
        (
            "a core module",
            signed(&key, "proc", "1", b"\0asm\x01\0\0\0"),
            "not a component",
        ),
        (
            "a component of another world",
            signed(&key, "proc", "1", &guest("otherworld")),
            "does not implement the outpost:handler/handler@0.1.0 world: component imports instance `test:otherworld/clock",
        ),
        (
            "an empty component",
            signed(&key, "proc", "1", b"\0asm\x0d\0\x01\0"),
            "handle",
        ),
        (
            "larger than max_module_bytes",
            signed(&key, "proc", "1", &oversized),
            "not a signed module",
        ),
    ];
    for (what, payload, expected) in &cases {
        let status = operator.request("gw-a", "proc/deploy", payload).await;
        let reason = reason(&status);
        assert!(
            reason.contains(expected),
            "{what}: reason {reason:?} should contain {expected:?}"
        );
        assert_eq!(status["op"], "deploy", "{status}");
        assert_eq!(status["name"], "proc", "{status}");
    }
    let status = operator.request("gw-a", "proc/explode", b"{}").await;
    assert!(reason(&status).contains("unknown verb"), "{status}");

    // None of that activated anything: the events still wait, none was lost or dead-lettered.
    assert_eq!(h.received.len(), 0);
    assert!(
        h.gateway.dead_letters().is_empty(),
        "{:?}",
        h.gateway.dead_letters()
    );
    let list = operator.request("gw-a", "list", b"{\"n\":1}").await;
    assert_eq!(list["ok"], true, "{list}");
    assert_eq!(list["modules"][0]["name"], "proc", "{list}");
    assert_eq!(list["modules"][0]["loaded"], false, "{list}");

    // The real thing is accepted, and the waiting events flow through it.
    let status = operator.request("gw-a", "proc/deploy", &full).await;
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["version"], "1.0.0");
    assert_eq!(status["sha256"], hex_sha256(&enrich).as_str());
    assert_eq!(
        status["key"],
        signing::KeyId::of(&key.verifying_key()).to_string()
    );
    eventually("the waiting events, enriched, upstream", || {
        h.received.len() >= 5
    })
    .await;
    for (topic, payload) in h.received.all() {
        assert_eq!(topic, "gw-a/enriched/boiler");
        let value: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(value["temp_f"].as_f64(), Some(68.0), "{value}");
    }
    // Deploying the same bytes again (a redelivery) changes nothing, and is not refused.
    let again = operator.replay("gw-a", "proc/deploy", &full).await;
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["unchanged"], true, "{again}");
    let list = operator.request("gw-a", "list", b"[]").await;
    let proc = &list["modules"][0];
    assert_eq!(proc["source"], "deployed", "{list}");
    assert_eq!(proc["version"], "1.0.0", "{list}");
    assert_eq!(proc["quarantined"], false, "{list}");
    assert!(h.gateway.dead_letters().is_empty());
    assert!(h.gateway.is_running());
    assert!(!h.gateway.log().contains("panicked"));
}

/// Sequence numbers of the upstream arrivals, and which version made each (enrich adds
/// `temp_f`; faulty echoes the payload).
fn arrivals(received: &Received) -> Vec<(u64, bool)> {
    received
        .all()
        .iter()
        .map(|(_, payload)| {
            let value: Value = serde_json::from_slice(payload).unwrap();
            (
                value["seq"].as_u64().unwrap(),
                value.get("temp_f").is_some(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_swap_under_load_loses_and_duplicates_nothing() {
    let setup = Harness::builder();
    let (key, trusted) = keypair(setup.dir(), "operator");
    let h = setup
        .subscriber_as("cloud-sub", "gw-b/#")
        .config_with(|url| config("gw-b", url, &trusted, ""))
        .start()
        .await;
    let operator = Operator::connect(h.gateway.port, "operator", "outpost/gw-b/#").await;

    // Version 1 echoes (faulty's ordinary behaviour), version 2 enriches.
    let v1 = signed(&key, "proc", "1", &guest("faulty"));
    let v2 = signed(&key, "proc", "2", &guest("enrich"));
    assert_eq!(
        operator.request("gw-b", "proc/deploy", &v1).await["ok"],
        true
    );

    // The device publishes until told to stop: through the deploy and for a while after it.
    let device = Device::connect(h.gateway.port, "boiler").await;
    let publisher = device.handle();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut n = 0u64;
        while !*stop_rx.borrow_and_update() {
            publisher
                .publish(
                    "sensors/boiler",
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"seq":{n},"temp_c":20}}"#),
                )
                .await
                .unwrap();
            n += 1;
            if n.is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        n
    });
    eventually("some events through version 1", || h.received.len() >= 300).await;
    let status = operator.request("gw-b", "proc/deploy", &v2).await;
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["previous"], "1", "{status}");
    let at_swap = device.acked();
    eventually("events after the swap", || device.acked() >= at_swap + 500).await;
    stop_tx.send(true).unwrap();
    let total = load.await.unwrap();
    device.wait_acked(total).await;
    eventually("every event upstream", || h.received.len() as u64 >= total).await;
    // Let stragglers (duplicates) show up if there were any.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let seen = arrivals(&h.received);
    assert_eq!(seen.len() as u64, total, "duplicates upstream");
    let mut count: HashMap<u64, u32> = HashMap::new();
    for (seq, _) in &seen {
        *count.entry(*seq).or_default() += 1;
    }
    assert_eq!(
        count.len() as u64,
        total,
        "some sequence numbers are missing"
    );
    // One device, one topic: the outputs keep its order, and the swap happens once.
    let first_v2 = seen.iter().position(|(_, v2)| *v2).expect("version 2 ran");
    assert!(first_v2 >= 300, "version 1 ran first");
    assert!(
        seen[first_v2..].iter().all(|(_, v2)| *v2),
        "no event went back to version 1 after the swap"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "order per topic kept"
    );

    // Rollback is a signed command; replaying it is refused.
    // A replay of the deploy of version 1 (captured from the broker, say) is refused, and
    // changes nothing.
    let replayed = operator.replay("gw-b", "proc/deploy", &v1).await;
    assert!(
        reason(&replayed).contains("replayed or stale"),
        "{replayed}"
    );
    let list = operator.request("gw-b", "list", b"{\"n\":1}").await;
    assert_eq!(list["modules"][0]["version"], "2", "{list}");

    let rollback = command(&key, CommandOp::Rollback, "proc", issue_time());
    let status = operator.request("gw-b", "proc/rollback", &rollback).await;
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["version"], "1", "{status}");
    // The same command again (a replay), and the rollback signed for remove.
    let replayed = {
        // Same bytes would be matched to the first status; change only the JSON layout.
        let value: Value = serde_json::from_slice(&rollback).unwrap();
        serde_json::to_vec_pretty(&value).unwrap()
    };
    let status = operator.request("gw-b", "proc/rollback", &replayed).await;
    assert!(reason(&status).contains("stale"), "{status}");
    let status = operator
        .request(
            "gw-b",
            "proc/remove",
            &command(&key, CommandOp::Rollback, "proc", issue_time()),
        )
        .await;
    assert!(reason(&status).contains("signature refused"), "{status}");

    device
        .publish(
            "sensors/boiler",
            format!(r#"{{"seq":{total},"temp_c":20}}"#),
        )
        .await;
    eventually("the event after the rollback", || {
        h.received.len() as u64 > total
    })
    .await;
    assert_eq!(arrivals(&h.received).last(), Some(&(total, false)));

    // Remove: the events wait again (counted nowhere as lost), and list shows it.
    let status = operator
        .request(
            "gw-b",
            "proc/remove",
            &command(&key, CommandOp::Remove, "proc", issue_time()),
        )
        .await;
    assert_eq!(status["ok"], true, "{status}");
    device
        .publish(
            "sensors/boiler",
            format!(r#"{{"seq":{},"temp_c":20}}"#, total + 1),
        )
        .await;
    device.wait_acked(total + 2).await;
    let list = operator.request("gw-b", "list", b"{\"n\":2}").await;
    assert_eq!(list["modules"][0]["loaded"], false, "{list}");
    assert!(h.gateway.dead_letters().is_empty());
    // The deploy of version 2 was signed before the remove: replayed, it is refused; signed
    // again, it is accepted.
    let replayed = operator.replay("gw-b", "proc/deploy", &v2).await;
    assert!(
        reason(&replayed).contains("replayed or stale"),
        "{replayed}"
    );
    let v2_again = signed(&key, "proc", "2", &guest("enrich"));
    let status = operator.request("gw-b", "proc/deploy", &v2_again).await;
    assert_eq!(status["ok"], true, "{status}");
    eventually("the waiting event after the redeploy", || {
        h.received.len() as u64 > total + 1
    })
    .await;
    assert_eq!(arrivals(&h.received).last(), Some(&(total + 1, true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_survive_a_restart_without_compiling_again() {
    let setup = Harness::builder();
    let (key, trusted) = keypair(setup.dir(), "operator");
    let mut h = setup
        .subscriber_as("cloud-sub", "gw-c/#")
        .config_with(|url| config("gw-c", url, &trusted, ""))
        .start()
        .await;
    {
        let operator = Operator::connect(h.gateway.port, "operator", "outpost/gw-c/#").await;
        let deploy = signed(&key, "proc", "7", &guest("enrich"));
        assert_eq!(
            operator.request("gw-c", "proc/deploy", &deploy).await["ok"],
            true
        );
        eventually("metrics counting the compile", || {
            operator
                .metrics("gw-c")
                .is_some_and(|m| m["module_compiles"] == 1 && m["module_deploys"] == 1)
        })
        .await;
    }
    assert!(h.gateway.stop(), "clean stop");
    h.gateway.start();
    let operator = Operator::connect(h.gateway.port, "operator-2", "outpost/gw-c/#").await;
    eventually("metrics after the restart", || {
        operator.metrics("gw-c").is_some()
    })
    .await;
    let metrics = operator.metrics("gw-c").unwrap();
    assert_eq!(metrics["module_compiles"], 0, "{metrics}");
    assert_eq!(metrics["module_artifact_loads"], 1, "{metrics}");
    let list = operator.request("gw-c", "list", b"{\"n\":3}").await;
    assert_eq!(list["modules"][0]["version"], "7", "{list}");

    let device = Device::connect(h.gateway.port, "boiler").await;
    device.publish("sensors/boiler", r#"{"temp_c":100}"#).await;
    eventually("an enriched event upstream", || h.received.len() == 1).await;
    let value: Value = serde_json::from_slice(&h.received.all()[0].1).unwrap();
    assert_eq!(value["temp_f"].as_f64(), Some(212.0));
    eventually("fuel counted as the module's cost", || {
        operator
            .metrics("gw-c")
            .is_some_and(|m| m["module_fuel"]["proc"].as_u64().unwrap_or(0) > 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_deploy_through_the_upstream_reaches_two_gateways() {
    let setup = Harness::builder();
    let (key, trusted) = keypair(setup.dir(), "operator");
    let trucks =
        |name: &str, upstream: &str| config(name, upstream, &trusted, "groups = [\"trucks\"]");
    // truck-1 is the harness's gateway, truck-2 another one on the same upstream.
    let mut h = setup
        .subscriber_as("cloud-sub", "+/enriched/#")
        .config_with(|url| trucks("truck-1", url))
        .build()
        .await;
    let cloud = Operator::connect(
        h.upstream.port,
        "cloud-operator",
        "outpost/+/modules/status",
    )
    .await;
    let mut truck_2 = h.another_gateway("truck-2", &trucks("truck-2", &h.upstream.url()));
    h.gateway.start();
    truck_2.start();
    let gateways = [&h.gateway, &truck_2];
    // Deploys published before a gateway subscribed are missed unless retained: publish it
    // retained, as `outpost module push --fleet --retain` does.
    let deploy = signed(&key, "proc", "fleet-1", &guest("enrich"));
    cloud
        .publish("outpost/fleet/trucks/modules/proc/deploy", &deploy, true)
        .await;
    eventually("both gateways report the deploy upstream", || {
        let answers = cloud.answers(&deploy);
        ["truck-1", "truck-2"].iter().all(|g| {
            answers
                .iter()
                .any(|a| a["gateway"] == *g && a["ok"] == true)
        })
    })
    .await;
    for answer in cloud.answers(&deploy) {
        assert_eq!(answer["version"], "fleet-1", "{answer}");
    }
    for (i, gateway) in gateways.iter().enumerate() {
        let device = Device::connect(gateway.port, &format!("sensor-{i}")).await;
        device.publish("sensors/x", r#"{"temp_c":0}"#).await;
        device.wait_acked(1).await;
    }
    eventually("an enriched event from each gateway", || {
        h.received.len() == 2
    })
    .await;
    let mut topics: Vec<String> = h
        .received
        .all()
        .into_iter()
        .map(|(topic, _)| topic)
        .collect();
    topics.sort();
    assert_eq!(topics, ["truck-1/enriched/x", "truck-2/enriched/x"]);

    // A fleet deploy that does not verify is refused by both, with the reason, upstream.
    let (stranger, _) = keypair(&h.dir, "stranger");
    let bad = signed(&stranger, "proc", "evil", &guest("faulty"));
    cloud
        .publish("outpost/fleet/trucks/modules/proc/deploy", &bad, false)
        .await;
    eventually("both gateways refuse the unknown key", || {
        cloud.answers(&bad).len() >= 2
    })
    .await;
    for answer in cloud.answers(&bad) {
        assert!(reason(&answer).contains("signature refused"), "{answer}");
    }
}

fn outpost(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the CLI off the async executor; returns whether it succeeded and what it printed.
async fn cli(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(&args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pushes_lists_rolls_back_and_removes_on_a_real_gateway() {
    let setup = Harness::builder();
    let keys = setup.dir().join("keys");
    let made = outpost(&["keygen", "--out", keys.to_str().unwrap(), "--name", "ops"]);
    assert!(made.status.success(), "{made:?}");
    let h = setup
        .upstream()
        .config_with(|url| config("gw-d", url, &keys.join("ops.pub"), ""))
        .start()
        .await;
    let broker = format!("mqtt://127.0.0.1:{}", h.gateway.port);
    let key = keys.join("ops.key").display().to_string();
    let target = ["--broker", broker.as_str(), "--gateway", "gw-d"];
    let faulty = outpost::handlers::examples::guest_path("faulty")
        .display()
        .to_string();
    let enrich = outpost::handlers::examples::guest_path("enrich")
        .display()
        .to_string();

    let push = |file: &str, version: &str| {
        let mut args = vec![
            "module",
            "push",
            file,
            "--name",
            "proc",
            "--version",
            version,
        ];
        args.extend(["--key", key.as_str()]);
        args.extend(target);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let (ok, text) = cli(&push(&faulty, "1")
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .await;
    assert!(ok, "{text}");
    let (ok, text) = cli(&push(&enrich, "2")
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .await;
    assert!(ok, "{text}");

    let mut list = vec!["module", "list", "--json"];
    list.extend(target);
    let (ok, text) = cli(&list).await;
    assert!(ok, "{text}");
    assert!(text.contains("\"2\""), "version 2 listed: {text}");

    let mut rollback = vec!["module", "rollback", "proc", "--key", key.as_str()];
    rollback.extend(target);
    let (ok, text) = cli(&rollback).await;
    assert!(ok, "{text}");

    // A remove signed by a key the gateway does not trust is refused with the reason.
    let other = h.dir.join("other");
    assert!(
        outpost(&["keygen", "--out", other.to_str().unwrap(), "--name", "x"])
            .status
            .success()
    );
    let other_key = other.join("x.key").display().to_string();
    let mut remove = vec!["module", "remove", "proc", "--key", other_key.as_str()];
    remove.extend(target);
    let (ok, text) = cli(&remove).await;
    assert!(!ok, "{text}");
    assert!(text.contains("signature refused"), "{text}");

    // Version 1 (faulty, which echoes) is active again after the rollback.
    let subscriber = Subscriber::connect(h.upstream.port, "cloud-sub", "gw-d/#").await;
    let device = Device::connect(h.gateway.port, "boiler").await;
    device
        .publish("sensors/boiler", r#"{"seq":1,"temp_c":1}"#)
        .await;
    eventually("an event through version 1", || {
        subscriber.received.len() == 1
    })
    .await;
    assert_eq!(subscriber.received.all()[0].0, "gw-d/sensors/boiler");

    let mut remove = vec!["module", "remove", "proc", "--key", key.as_str()];
    remove.extend(target);
    let (ok, text) = cli(&remove).await;
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_shows_in_the_module_list_and_the_metrics() {
    let setup = Harness::builder();
    let (_, trusted) = keypair(setup.dir(), "operator");
    let h = setup
        .upstream()
        .config_with(|upstream| {
            format!(
                r#"
gateway_id = "gw-q"

[handlers]
breaker_failures = 2
breaker_cooldown_ms = 600000
metrics_interval_ms = 200

[deploy]
trusted_keys = ["{trusted}"]

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "faulty"
path = "{faulty}"

[[route]]
name = "sensors"
filter = "sensors/#"
handler = "faulty"
[route.retry]
max_attempts = 1
"#,
                trusted = trusted.display(),
                faulty = outpost::handlers::examples::guest_path("faulty").display(),
            )
        })
        .start()
        .await;
    let operator = Operator::connect(h.gateway.port, "operator", "outpost/gw-q/#").await;
    let list = operator.request("gw-q", "list", b"{\"n\":1}").await;
    assert_eq!(list["modules"][0]["quarantined"], false, "{list}");
    assert_eq!(list["modules"][0]["source"], "config", "{list}");

    let device = Device::connect(h.gateway.port, "d").await;
    device.publish("sensors/a", "trap").await;
    device.publish("sensors/b", "trap").await;
    device.wait_acked(2).await;
    eventually("the quarantine in the metrics", || {
        operator
            .metrics("gw-q")
            .is_some_and(|m| m["quarantined_modules"].get("faulty").is_some())
    })
    .await;
    let list = operator.request("gw-q", "list", b"{\"n\":2}").await;
    let faulty = &list["modules"][0];
    assert_eq!(faulty["quarantined"], true, "{list}");
    assert!(faulty["quarantine_left_ms"].as_u64().unwrap() > 0, "{list}");
    let metrics = operator.metrics("gw-q").unwrap();
    assert_eq!(metrics["quarantines"], 1, "{metrics}");
}
