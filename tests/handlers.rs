//! Handlers in the real gateway: example modules transform telemetry on its way upstream, and a
//! module that traps, errors, loops or exhausts memory costs only the events that cause it.

mod common;

use common::{eventually, Device, Harness, Subscriber};

fn config(upstream: &str, module: &str, path: &std::path::Path, topic: &str) -> String {
    format!(
        r#"
gateway_id = "gw-test"

[handlers]
# Room for a slow, shared machine: only "loop" may reach it.
deadline_ms = 2000
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
    let setup = Harness::builder();
    let wasm = setup.dir().join("enrich.wasm");
    std::fs::write(&wasm, outpost::handlers::examples::ENRICH).unwrap();
    let h = setup
        .subscriber("#")
        .config_with(|url| config(url, "enrich", &wasm, "{gateway}/{output}"))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "boiler").await;
    device
        .publish("telemetry/boiler/env", r#"{"temp_c":100}"#)
        .await;
    device.publish("telemetry/boiler/env", "not json").await;
    device.wait_acked(2).await;
    eventually("one enriched reading upstream", || h.received.len() >= 1).await;
    eventually("one dead letter", || {
        h.gateway.dead_letters().values().sum::<u64>() == 1
    })
    .await;

    let (topic, payload) = h.received.all()[0].clone();
    assert_eq!(topic, "gw-test/enriched/boiler");
    let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(value["device"], "boiler");
    assert_eq!(value["temp_f"].as_f64(), Some(212.0));
    assert_eq!(h.gateway.dead_letters().get("handler-error"), Some(&1));
    assert_eq!(h.received.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_costs_only_the_failing_events() {
    let faulty = outpost::handlers::examples::guest_path("faulty");
    let mut h = Harness::builder()
        .subscriber("#")
        .config_with(|url| config(url, "faulty", &faulty, "{output}"))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-f").await;
    let payloads = [
        "ok-1", "trap", "ok-2", "error", "ok-3", "loop", "ok-4", "grow", "ok-5",
    ];
    for p in payloads {
        device.publish("telemetry/dev-f/x", p).await;
    }
    device.wait_acked(payloads.len() as u64).await;
    eventually("four dead letters", || {
        h.gateway.dead_letters().values().sum::<u64>() == 4
    })
    .await;
    eventually("five good outputs upstream", || h.received.len() >= 5).await;

    let letters = h.gateway.dead_letters();
    assert_eq!(letters.get("trap"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("handler-error"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("timeout"), Some(&1), "{letters:?}");
    assert_eq!(letters.get("out-of-memory"), Some(&1), "{letters:?}");
    let good: Vec<Vec<u8>> = h.received.all().into_iter().map(|(_, p)| p).collect();
    let expected: Vec<Vec<u8>> = ["ok-1", "ok-2", "ok-3", "ok-4", "ok-5"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    assert_eq!(good, expected);

    // Still serving after all that.
    device.publish("telemetry/dev-f/x", "ok-6").await;
    eventually("sixth good output", || h.received.len() >= 6).await;
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// Configuration for the circuit-breaker tests: module `faulty` on `telemetry/guarded/#`, one
/// attempt per event (failures are dead letters at once), a passthrough route on
/// `telemetry/plain/#`.
fn breaker_config(upstream: &str, cooldown_ms: u64, on_quarantine: &str) -> String {
    format!(
        r#"
gateway_id = "gw-breaker"

[handlers]
deadline_ms = 500
breaker_failures = 2
breaker_cooldown_ms = {cooldown_ms}

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "faulty"
path = "{path}"

[[route]]
name = "guarded"
filter = "telemetry/guarded/#"
handler = "faulty"
on_quarantine = "{on_quarantine}"
[route.retry]
max_attempts = 1

[[route]]
name = "plain"
filter = "telemetry/plain/#"
"#,
        path = outpost::handlers::examples::guest_path("faulty").display()
    )
}

/// A module that keeps failing is quarantined: with `on_quarantine = "dead-letter"` its next
/// events become dead letters `quarantined` without running it, while other routes flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_keeps_failing_is_quarantined() {
    // A cool-down far longer than the test: the quarantine cannot end during it.
    let mut h = Harness::builder()
        .subscriber("#")
        .config_with(|url| breaker_config(url, 600_000, "dead-letter"))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-b").await;
    device.publish("telemetry/guarded/x", "trap").await;
    device.publish("telemetry/guarded/x", "error").await;
    device.wait_acked(2).await;
    eventually("two failures dead-lettered", || {
        let l = h.gateway.dead_letters();
        l.get("trap") == Some(&1) && l.get("handler-error") == Some(&1)
    })
    .await;
    eventually("the quarantine logged", || {
        h.gateway.log().contains("module quarantined")
    })
    .await;
    device.publish("telemetry/guarded/x", "ok-1").await;
    device.publish("telemetry/plain/x", "plain-1").await;
    device.wait_acked(4).await;
    eventually("the guarded event dead-lettered as quarantined", || {
        h.gateway.dead_letters().get("quarantined") == Some(&1)
    })
    .await;
    eventually("the plain route still delivers", || {
        h.received
            .all()
            .iter()
            .any(|(_, p)| p.as_slice() == b"plain-1")
    })
    .await;
    assert!(
        !h.received
            .all()
            .iter()
            .any(|(_, p)| p.as_slice() == b"ok-1"),
        "a quarantined module's event was processed"
    );
    assert!(h.gateway.is_running());
}

/// With `on_quarantine = "wait"`, events that arrive during the quarantine wait durably; after
/// the cool-down one of them probes the module, which works again, and they are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_events_wait_and_flow_after_the_cooldown() {
    let h = Harness::builder()
        .subscriber("#")
        .config_with(|url| breaker_config(url, 1_000, "wait"))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-w").await;
    // Published in one go, so they are processed in this order: the two failures trip the
    // breaker before the good events are looked at.
    for p in ["trap", "error", "ok-1", "ok-2"] {
        device.publish("telemetry/guarded/x", p).await;
    }
    device.wait_acked(4).await;
    eventually("both good events delivered", || {
        let got = h.received.all();
        ["ok-1", "ok-2"]
            .iter()
            .all(|ok| got.iter().any(|(_, p)| p.as_slice() == ok.as_bytes()))
    })
    .await;
    let log = h.gateway.log();
    assert!(log.contains("module quarantined"), "{log}");
    // Only a successful probe closes the breaker: so the good events did wait for it.
    assert!(log.contains("module out of quarantine"), "{log}");
    let letters = h.gateway.dead_letters();
    assert_eq!(letters.get("quarantined"), None, "{letters:?}");
    assert_eq!(letters.values().sum::<u64>(), 2, "{letters:?}");
}

/// With several invocations of a module allowed at once, batches of different topics run
/// concurrently: every event still arrives exactly once, in order per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_keep_every_event_and_the_order_per_topic() {
    let h = Harness::builder()
        .subscriber("#")
        .config_with(|upstream| {
            format!(
                r#"
gateway_id = "gw-conc"

[handlers]
max_batch = 8
max_concurrent = 4
max_concurrent_per_module = 4

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "echo"
path = "{faulty}"

[[route]]
name = "echo"
filter = "telemetry/#"
handler = "echo"
"#,
                faulty = outpost::handlers::examples::guest_path("faulty").display(),
            )
        })
        .start()
        .await;
    const DEVICES: usize = 10;
    const EACH: usize = 60;
    let mut devices = Vec::new();
    for d in 0..DEVICES {
        devices.push(Device::connect(h.gateway.port, &format!("dev-{d}")).await);
    }
    for n in 0..EACH {
        for (d, device) in devices.iter().enumerate() {
            device
                .publish(&format!("telemetry/dev-{d}"), format!("{n}"))
                .await;
        }
    }
    for device in &devices {
        device.wait_acked(EACH as u64).await;
    }
    eventually("every event upstream", || {
        h.received.len() >= DEVICES * EACH
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let all = h.received.all();
    assert_eq!(all.len(), DEVICES * EACH, "duplicates");
    let mut per_topic: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (topic, payload) in all {
        let n: usize = String::from_utf8(payload).unwrap().parse().unwrap();
        per_topic.entry(topic).or_default().push(n);
    }
    assert_eq!(per_topic.len(), DEVICES);
    for (topic, seen) in per_topic {
        assert_eq!(seen, (0..EACH).collect::<Vec<_>>(), "{topic}");
    }
}

/// Concurrency limits per route and per module, seen in the published metrics: a route capped
/// at one invocation runs one at a time although its module may run four, while a route
/// without a cap of its own runs several of its topics at once (up to the module's four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_caps_its_own_concurrency_and_the_metrics_show_it() {
    let faulty = outpost::handlers::examples::guest_path("faulty");
    // Two names for the same module, so that each route's concurrency has its own figure;
    // every event loops until the deadline, so invocations overlap whenever they may.
    let mut h = Harness::builder()
        .upstream()
        .config_with(|upstream| {
            format!(
                r#"
gateway_id = "gw-caps"

[handlers]
deadline_ms = 300
max_concurrent = 8
max_concurrent_per_module = 4
breaker_failures = 1000
metrics_interval_ms = 200

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "narrow"
path = "{faulty}"

[[module]]
name = "wide"
path = "{faulty}"

[[route]]
name = "narrow"
filter = "narrow/#"
handler = "narrow"
max_concurrent = 1
on_quarantine = "dead-letter"
[route.retry]
max_attempts = 1

[[route]]
name = "wide"
filter = "wide/#"
handler = "wide"
on_quarantine = "dead-letter"
[route.retry]
max_attempts = 1
"#,
                faulty = faulty.display(),
            )
        })
        .start()
        .await;
    let metrics =
        Subscriber::connect(h.gateway.port, "metrics-sub", "outpost/gw-caps/metrics").await;
    const TOPICS: usize = 8;
    let device = Device::connect(h.gateway.port, "looper").await;
    for route in ["narrow", "wide"] {
        for t in 0..TOPICS {
            device.publish(&format!("{route}/t{t}"), "loop").await;
        }
    }
    device.wait_acked(2 * TOPICS as u64).await;
    eventually("every looping event dead-lettered", || {
        h.gateway.dead_letters().get("timeout") == Some(&(2 * TOPICS as u64))
    })
    .await;
    // The newest snapshot published after the last invocation ended.
    let peaks = || -> Option<serde_json::Value> {
        let all = metrics.received.all();
        let (_, payload) = all.last()?;
        let snapshot: serde_json::Value = serde_json::from_slice(payload).ok()?;
        let c = snapshot["handler_concurrency"].clone();
        (c["running"] == 0 && c["module_peaks"]["wide"].as_u64().is_some()).then_some(c)
    };
    eventually("metrics with the concurrency peaks", || peaks().is_some()).await;
    let c = peaks().unwrap();
    assert_eq!(c["module_peaks"]["narrow"], 1, "{c}");
    let wide = c["module_peaks"]["wide"].as_u64().unwrap();
    assert!((2..=4).contains(&wide), "{c}");
    assert!(c["peak"].as_u64().unwrap() <= 8, "{c}");
    // Each module's cost in time counts every loop to its deadline in full (its fuel would
    // not: wasmtime drops the count of an invocation stopped by the deadline).
    let all = metrics.received.all();
    let snapshot: serde_json::Value = serde_json::from_slice(&all.last().unwrap().1).unwrap();
    for module in ["narrow", "wide"] {
        let ran = snapshot["module_run_us"][module].as_u64().unwrap_or(0);
        // A deadline may fire up to one epoch tick early: allow 50 ms of the 300.
        assert!(
            ran >= TOPICS as u64 * 250_000,
            "{module} ran {ran} µs for {TOPICS} loops of 300 ms"
        );
    }
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}
