//! Dead letters through the control plane of the real gateway: a handler's failures become dead
//! letters, `outpost deadletters` (a real MQTT client of the gateway's control topics) lists,
//! shows, replays and purges them, an empty filter never means "everything", and malformed
//! requests are answered with an error without disturbing the gateway.

mod common;

use std::process::Command;

use common::mqtt::{Client, Publish, Version};
use common::{eventually, write_config, Device, Harness, Received};
use serde_json::Value;

const GATEWAY_ID: &str = "gw-dl";

/// What one run of `outpost deadletters ...` printed and whether it succeeded.
struct CliRun {
    success: bool,
    stdout: String,
    stderr: String,
}

impl CliRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The JSON reply of a run that must have succeeded.
    fn ok_json(&self) -> Value {
        assert!(
            self.success,
            "command failed:\n{}\n{}",
            self.stdout, self.stderr
        );
        let reply = self.json();
        assert_eq!(reply["ok"], true, "{reply}");
        reply
    }
}

/// Runs `outpost deadletters <args>` against the gateway listening on `port`.
async fn cli(port: u16, args: &[&str]) -> CliRun {
    let mut all: Vec<String> = vec!["deadletters".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    all.extend([
        "--broker".into(),
        format!("mqtt://127.0.0.1:{port}"),
        "--gateway-id".into(),
        GATEWAY_ID.into(),
        "--timeout-secs".into(),
        "60".into(),
    ]);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(&all)
            .output()
            .expect("run outpost deadletters")
    })
    .await
    .unwrap();
    CliRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn letters(reply: &Value) -> Vec<Value> {
    reply["dead_letters"]
        .as_array()
        .unwrap_or_else(|| panic!("no dead_letters in {reply}"))
        .clone()
}

/// `sensors` runs the `faulty` module on `telemetry/#` (`handler = None`: passthrough), and
/// `json-in` forwards `json/#` but only JSON payloads.
fn config(upstream: &str, handler: bool, max_attempts: u32) -> String {
    let faulty = outpost::handlers::examples::guest_path("faulty");
    let (module, handler) = if handler {
        (
            format!(
                "[[module]]\nname = \"faulty\"\npath = \"{}\"\n",
                faulty.display()
            ),
            "handler = \"faulty\"\ntopic = \"{output}\"\n",
        )
    } else {
        (String::new(), "")
    };
    format!(
        r#"
gateway_id = "{GATEWAY_ID}"

[handlers]
deadline_ms = 2000

[[upstream]]
name = "cloud"
url = "{upstream}"

{module}
[[route]]
name = "sensors"
filter = "telemetry/#"
{handler}
[route.retry]
max_attempts = {max_attempts}
backoff_ms = 100

[[route]]
name = "json-in"
filter = "json/#"
payload = "json"
"#
    )
}

fn payloads(received: &Received) -> Vec<Vec<u8>> {
    received.all().into_iter().map(|(_, p)| p).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapped_event_is_replayed_once_the_route_is_fixed() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .config_with(|url| config(url, true, 2))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-a").await;
    device.publish("telemetry/dev-a/x", "trap").await;
    device.publish("telemetry/dev-a/x", "ok").await;
    device.wait_acked(2).await;
    eventually("the good event upstream", || {
        payloads(&h.received).contains(&b"ok".to_vec())
    })
    .await;
    eventually("the trapped event dead-lettered", || {
        h.gateway.dead_letters().get("trap") == Some(&1)
    })
    .await;

    let reply = cli(h.gateway.port, &["list", "--json"]).await.ok_json();
    let listed = letters(&reply);
    assert_eq!(listed.len(), 1, "{reply}");
    assert_eq!(listed[0]["reason"], "trap");
    assert_eq!(listed[0]["attempts"], 2, "both attempts were made");
    assert_eq!(listed[0]["module"], "faulty");
    let version = listed[0]["module_version"].as_str().unwrap_or_default();
    assert!(
        version.len() == 16 && version.chars().all(|c| c.is_ascii_hexdigit()),
        "module version {version:?}"
    );
    assert_eq!(listed[0]["route"], "sensors");
    assert_eq!(listed[0]["topic"], "telemetry/dev-a/x");
    assert_eq!(listed[0]["payload_bytes"], 4);
    assert!(
        !payloads(&h.received).contains(&b"trap".to_vec()),
        "the trapped event must not have gone upstream"
    );

    // "Fix the module": the same route, now without a handler.
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
    write_config(&h.dir, &config(&h.upstream.url(), false, 2));
    h.gateway.start();
    assert_eq!(
        h.gateway.dead_letters().get("trap"),
        Some(&1),
        "dead letters survive a restart"
    );

    let reply = cli(h.gateway.port, &["replay", "--reason", "trap", "--json"])
        .await
        .ok_json();
    assert_eq!(reply["replayed"], 1, "{reply}");
    eventually("the replayed event upstream", || {
        payloads(&h.received).contains(&b"trap".to_vec())
    })
    .await;
    assert!(h.gateway.dead_letters().is_empty());
    let reply = cli(h.gateway.port, &["list", "--json"]).await.ok_json();
    assert!(letters(&reply).is_empty(), "{reply}");
    let (topic, _) = h
        .received
        .all()
        .into_iter()
        .find(|(_, p)| p == b"trap")
        .unwrap();
    assert_eq!(topic, "telemetry/dev-a/x");
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_show_and_purge_and_an_empty_filter_is_refused() {
    let mut h = Harness::builder()
        .upstream()
        .config_with(|url| config(url, true, 1))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-b").await;
    device.publish("telemetry/dev-b/x", "trap").await;
    device.publish("telemetry/dev-b/y", "error").await;
    device.publish("json/dev-b/z", vec![0xff, 0x00]).await;
    device.wait_acked(3).await;
    eventually("three dead letters", || {
        h.gateway.dead_letters().values().sum::<u64>() == 3
    })
    .await;

    let port = h.gateway.port;
    let all = letters(&cli(port, &["list", "--json"]).await.ok_json());
    assert_eq!(all.len(), 3);
    let ids: Vec<i64> = all.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let id_of = |reason: &str| {
        all.iter()
            .find(|l| l["reason"] == reason)
            .unwrap_or_else(|| panic!("no {reason} in {all:?}"))["id"]
            .as_i64()
            .unwrap()
            .to_string()
    };
    let (trap, malformed) = (id_of("trap"), id_of("malformed"));
    assert!(all.iter().all(|l| l.get("payload").is_none()));

    let table = cli(port, &["list"]).await;
    assert!(table.success, "{}", table.stderr);
    let header = table.stdout.lines().next().unwrap_or_default();
    for column in ["ID", "REASON", "ROUTE", "ATTEMPTS", "TOPIC", "AGE"] {
        assert!(header.contains(column), "{}", table.stdout);
    }
    assert_eq!(table.stdout.lines().count(), 4, "{}", table.stdout);
    assert!(table.stdout.contains("handler-error"), "{}", table.stdout);

    let only = letters(
        &cli(port, &["list", "--reason", "trap", "--json"])
            .await
            .ok_json(),
    );
    assert_eq!(only.len(), 1);
    let only = letters(
        &cli(port, &["list", "--route", "json-in", "--json"])
            .await
            .ok_json(),
    );
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["reason"], "malformed");

    let shown = letters(&cli(port, &["show", &trap, "--json"]).await.ok_json());
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["payload"], "trap");
    let shown = letters(&cli(port, &["show", &malformed, "--json"]).await.ok_json());
    assert_eq!(shown[0]["payload_base64"], "/wA=", "not UTF-8: base64");
    let text = cli(port, &["show", &trap]).await;
    assert!(
        text.success && text.stdout.contains("trap"),
        "{}",
        text.stdout
    );
    assert!(!cli(port, &["show", "999999"]).await.success);

    // An empty filter is refused, not taken for "all".
    let refused = cli(port, &["replay", "--json"]).await;
    assert!(!refused.success, "an empty replay must fail");
    let reply = refused.json();
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("needs a filter"),
        "{reply}"
    );
    let refused = cli(port, &["purge"]).await;
    assert!(!refused.success, "an empty purge must fail");
    assert!(
        refused.stderr.contains("needs a filter"),
        "{}",
        refused.stderr
    );
    assert_eq!(h.gateway.dead_letters().values().sum::<u64>(), 3);

    let reply = cli(port, &["purge", "--id", &trap, "--json"])
        .await
        .ok_json();
    assert_eq!(reply["purged"], 1);
    assert_eq!(h.gateway.dead_letters().get("trap"), None);
    assert_eq!(h.gateway.dead_letters().values().sum::<u64>(), 2);

    let purged = cli(port, &["purge", "--route", "json-in"]).await;
    assert!(purged.success, "{}", purged.stderr);
    assert_eq!(purged.stdout.trim(), "purged 1");

    let reply = cli(port, &["purge", "--all", "--json"]).await.ok_json();
    assert_eq!(reply["purged"], 1);
    assert!(h.gateway.dead_letters().is_empty());
    let empty = cli(port, &["list"]).await;
    assert_eq!(empty.stdout.trim(), "no dead letters");
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_an_error_and_the_gateway_keeps_serving() {
    let mut h = Harness::builder()
        .upstream()
        .args(&["--gateway-id", GATEWAY_ID])
        .upstream_arg()
        .start()
        .await;

    // The requester reads its own answers: replies go to the requester only.
    let results = format!("outpost/{GATEWAY_ID}/deadletters/result");
    let request_topic = format!("outpost/{GATEWAY_ID}/deadletters/list");
    let mut requester = Client::clean(h.gateway.port, Version::V5, "requester");
    requester.subscribe(&results, 1);
    let mut ask = |payload: &str| -> Value {
        requester.publish_done(&Publish::new(&request_topic, payload).qos(1));
        let reply = requester.receive();
        assert_eq!(reply.topic, results);
        serde_json::from_slice(&reply.payload).unwrap()
    };
    let reply = ask("not json");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("not JSON"),
        "{reply}"
    );
    let reply = ask(r#"{"colour": "red", "nonce": "n-1"}"#);
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("colour"),
        "{reply}"
    );
    // A refusal still says who answers, and to which request.
    assert_eq!(reply["gateway"], GATEWAY_ID, "{reply}");
    assert_eq!(reply["nonce"], "n-1", "{reply}");

    // Another client subscribed to the same topic sees none of it.
    let mut watcher = Client::clean(h.gateway.port, Version::V5, "watcher");
    watcher.subscribe(&results, 1);
    let reply = ask(r#"{"limit": 5}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    watcher.subscribe("fence/#", 1);
    watcher.publish_done(&Publish::new("fence/w", "").qos(1));
    let seen = watcher.receive_until("fence/w");
    assert!(seen.is_empty(), "{seen:?}");

    assert!(h.gateway.is_running());
    let reply = cli(h.gateway.port, &["list", "--json"]).await.ok_json();
    assert!(letters(&reply).is_empty(), "{reply}");

    // A gateway id nobody answers to: a clear timeout, not a hang.
    let output = tokio::task::spawn_blocking({
        let port = h.gateway.port;
        move || {
            Command::new(env!("CARGO_BIN_EXE_outpost"))
                .args(["deadletters", "list", "--gateway-id", "nobody"])
                .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
                .args(["--timeout-secs", "1"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no answer from gateway nobody at mqtt://127.0.0.1:"),
        "{stderr}"
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}
