//! Handlers in the real gateway: example modules transform telemetry on its way upstream, and a
//! module that traps, errors, loops or exhausts memory costs only the events that cause it.

mod common;

use common::{eventually, write_config, Device, Gateway, Mosquitto, Subscriber};

fn config(upstream: &str, module: &str, path: &std::path::Path, topic: &str) -> String {
    format!(
        r#"
gateway_id = "gw-test"

[handlers]
deadline_ms = 500
memory_limit_mib = 16

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "{module}"
path = "{path}"

[[route]]
name = "{module}-route"
filter = "telemetry/#"
handler = "{module}"
topic = "{topic}"
"#,
        path = path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_example_converts_units_and_adds_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("enrich.wasm");
    std::fs::write(&wasm, outpost::examples::ENRICH).unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "#").await;
    let file = write_config(
        dir.path(),
        &config(&upstream.url(), "enrich", &wasm, "{gateway}/{output}"),
    );
    let mut gateway = Gateway::new(dir.path(), &["--config", file.to_str().unwrap()]);
    gateway.start();

    let device = Device::connect(gateway.port, "boiler").await;
    device
        .publish("telemetry/boiler/env", r#"{"temp_c":100}"#)
        .await;
    device.publish("telemetry/boiler/env", "not json").await;
    device.wait_acked(2).await;
    eventually("one enriched reading upstream", || {
        subscriber.received.len() >= 1
    })
    .await;
    eventually("one dead letter", || {
        gateway.dead_letters().values().sum::<u64>() == 1
    })
    .await;

    let (topic, payload) = subscriber.received.all()[0].clone();
    assert_eq!(topic, "gw-test/enriched/boiler");
    let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(value["device"], "boiler");
    assert_eq!(value["temp_f"].as_f64(), Some(212.0));
    assert_eq!(gateway.dead_letters().get("handler-error"), Some(&1));
    assert_eq!(subscriber.received.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_costs_only_the_failing_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "#").await;
    let faulty = outpost::examples::guest_path("faulty");
    let file = write_config(
        dir.path(),
        &config(&upstream.url(), "faulty", &faulty, "{output}"),
    );
    let mut gateway = Gateway::new(dir.path(), &["--config", file.to_str().unwrap()]);
    gateway.start();

    let device = Device::connect(gateway.port, "dev-f").await;
    let payloads = [
        "ok-1", "trap", "ok-2", "error", "ok-3", "loop", "ok-4", "grow", "ok-5",
    ];
    for p in payloads {
        device.publish("telemetry/dev-f/x", p).await;
    }
    device.wait_acked(payloads.len() as u64).await;
    eventually("four dead letters", || {
        gateway.dead_letters().values().sum::<u64>() == 4
    })
    .await;
    eventually("five good outputs upstream", || {
        subscriber.received.len() >= 5
    })
    .await;

    let letters = gateway.dead_letters();
    assert_eq!(letters.get("trap"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("handler-error"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("timeout"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("out-of-memory"), Some(&1), "{letters:?}");
    let good: Vec<Vec<u8>> = subscriber
        .received
        .all()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let expected: Vec<Vec<u8>> = ["ok-1", "ok-2", "ok-3", "ok-4", "ok-5"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    assert_eq!(good, expected);

    // Still serving after all that.
    device.publish("telemetry/dev-f/x", "ok-6").await;
    eventually("sixth good output", || subscriber.received.len() >= 6).await;
    assert!(gateway.stop(), "gateway exits 0 on SIGTERM");
}
