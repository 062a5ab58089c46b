//! Hostile modules in the real gateway: a handler that loops, exhausts memory, traps, fails,
//! returns 10 MiB or 20 000 outputs, or abuses the host interface (a 50 MiB log line, a 10 MiB
//! key-value key or value, more key-value writes than allowed) costs exactly its own events,
//! each a dead letter with the reason that names the limit, while telemetry on another route
//! keeps flowing, complete and without duplicates, and the module keeps serving its ordinary
//! events.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Device, Gateway, Harness};

/// Everything below must be done within this (the test's own bound, two minutes, generous for a slow shared machine).
const BOUND: Duration = Duration::from_secs(120);

/// Telemetry messages published around the hostile ones.
const TELEMETRY: usize = 300;

/// Each hostile payload (see `modules/faulty`), the dead-letter reason it must end with, and
/// a piece of the dead letter's detail that shows which limit stopped it.
const HOSTILE: [(&str, &str, &str); 10] = [
    ("loop", "timeout", "deadline"),
    ("grow", "out-of-memory", "memory limit"),
    ("trap", "trap", "requested trap"),
    ("error", "handler-error", "requested error"),
    // 10 MiB of payload against the 8 MiB output cap.
    (
        "big-output",
        "output-limit",
        "10485760 payload bytes, at most 8388608 allowed",
    ),
    // 20 000 outputs against the cap of 10 000.
    (
        "many-outputs:20000",
        "output-limit",
        "20000 outputs, at most 10000 allowed",
    ),
    // A 50 MiB line cannot even be built in the guest's 32 MiB.
    ("huge-log", "out-of-memory", "memory limit"),
    (
        "huge-key",
        "trap",
        "key of 10485760 bytes, at most 1024 allowed",
    ),
    (
        "huge-value",
        "trap",
        "value of 10485760 bytes, at most 1048576 allowed",
    ),
    (
        "kv-flood",
        "trap",
        "more than 8388608 bytes written in one invocation",
    ),
];

/// Ordinary payloads on the hostile route, echoed by the module: `huge-log:8` logs an 8 MiB
/// line, which the gateway cuts to 4 KiB, and goes on.
const ECHOED: [&str; 3] = ["echo-1", "huge-log:8", "echo-2"];

fn config(upstream: &str) -> String {
    format!(
        r#"
gateway_id = "gw-hostile"

[handlers]
# Long enough that a slow, shared machine builds and copies the 10 MiB output within it (so it
# fails at the output cap, as it must, and not at the deadline); "loop" costs this long.
deadline_ms = 3000
# Far more failures than this test makes: no quarantine hides the per-event reasons.
breaker_failures = 1000

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "faulty"
path = "{path}"

[[route]]
name = "hostile"
filter = "hostile/#"
handler = "faulty"
on_quarantine = "dead-letter"
[route.retry]
max_attempts = 1

[[route]]
name = "telemetry"
filter = "telemetry/#"
"#,
        path = outpost::handlers::examples::guest_path("faulty").display()
    )
}

/// Polls `check` until it holds; panics naming `what` once `deadline` has passed.
async fn until(deadline: Instant, what: &str, mut check: impl FnMut() -> bool) {
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (payload, reason, detail) of every dead letter, read from the gateway's database.
fn dead_letters(gateway: &Gateway) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open_with_flags(
        gateway.data.join("outpost.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the gateway's database");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT payload, reason, detail FROM dead_letters ORDER BY id")
        .unwrap();
    stmt.query_map([], |row| {
        let payload: Vec<u8> = row.get(0)?;
        Ok((
            String::from_utf8_lossy(&payload).into_owned(),
            row.get(1)?,
            row.get(2)?,
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_cost_only_their_own_events() {
    let deadline = Instant::now() + BOUND;
    let mut h = Harness::builder()
        .subscriber("#")
        .config_with(config)
        .start()
        .await;

    let sensor = Device::connect(h.gateway.port, "sensor").await;
    let attacker = Device::connect(h.gateway.port, "attacker").await;
    // Telemetry before, between and after the hostile events, and echoes among them.
    let per_gap = TELEMETRY / (HOSTILE.len() + 1);
    let mut seq = 0;
    for (i, (payload, _, _)) in HOSTILE.iter().enumerate() {
        for n in seq..seq + per_gap {
            sensor
                .publish("telemetry/sensor/env", format!("seq-{n}"))
                .await;
        }
        seq += per_gap;
        attacker.publish("hostile/attacker/x", *payload).await;
        if let Some(echo) = ECHOED.get(i) {
            attacker.publish("hostile/attacker/x", *echo).await;
        }
    }
    for n in seq..TELEMETRY {
        sensor
            .publish("telemetry/sensor/env", format!("seq-{n}"))
            .await;
    }
    until(deadline, "every publish acknowledged", || {
        sensor.acked() == TELEMETRY as u64
            && attacker.acked() == (HOSTILE.len() + ECHOED.len()) as u64
    })
    .await;

    // Every hostile event ends as a dead letter; everything else is delivered.
    until(deadline, "a dead letter for every hostile event", || {
        h.gateway.dead_letters().values().sum::<u64>() >= HOSTILE.len() as u64
    })
    .await;
    let delivered = |payload: &str| {
        h.received
            .all()
            .iter()
            .filter(|(_, p)| p.as_slice() == payload.as_bytes())
            .count()
    };
    until(deadline, "all telemetry and echoes upstream", || {
        let got = h.received.all();
        let telemetry = got
            .iter()
            .filter(|(topic, _)| topic == "telemetry/sensor/env")
            .count();
        telemetry >= TELEMETRY && ECHOED.iter().all(|echo| delivered(echo) > 0)
    })
    .await;

    // The module still serves ordinary events after all that.
    attacker.publish("hostile/attacker/x", "echo-after").await;
    until(deadline, "an echo after the failures", || {
        delivered("echo-after") > 0
    })
    .await;
    until(deadline, "the outbox drained", || {
        h.gateway.outbox_depth() == 0
    })
    .await;

    // Each hostile event failed for its own reason, and nothing else failed.
    let letters = dead_letters(&h.gateway);
    assert_eq!(letters.len(), HOSTILE.len(), "{letters:#?}");
    for (payload, reason, detail) in HOSTILE {
        let found: Vec<_> = letters.iter().filter(|(p, _, _)| p == payload).collect();
        assert_eq!(found.len(), 1, "{payload}: {letters:#?}");
        let (_, got_reason, got_detail) = found[0];
        assert_eq!(got_reason, reason, "{payload}: {got_detail}");
        assert!(got_detail.contains(detail), "{payload}: {got_detail}");
    }

    // Telemetry: every sequence number exactly once, on its own topic, unchanged.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (topic, payload) in h.received.all() {
        if topic == "telemetry/sensor/env" {
            *seen
                .entry(String::from_utf8_lossy(&payload).into_owned())
                .or_default() += 1;
        }
    }
    for n in 0..TELEMETRY {
        assert_eq!(seen.get(&format!("seq-{n}")), Some(&1), "seq-{n}");
    }
    assert_eq!(seen.len(), TELEMETRY, "unexpected telemetry payloads");
    // The hostile route delivered exactly its echoes, nothing of the hostile events.
    let mut hostile: Vec<Vec<u8>> = h
        .received
        .all()
        .into_iter()
        .filter(|(topic, _)| topic.starts_with("hostile/"))
        .map(|(_, payload)| payload)
        .collect();
    let mut expected: Vec<Vec<u8>> = ECHOED.iter().map(|e| e.as_bytes().to_vec()).collect();
    expected.push(b"echo-after".to_vec());
    hostile.sort();
    expected.sort();
    assert_eq!(hostile, expected);

    assert!(h.gateway.is_running(), "the gateway died");
    let log = h.gateway.log();
    // The guest's own panic ("requested trap") is quoted in its dead letter's log line; any
    // other panic is the gateway's.
    let panics: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("panicked") && !line.contains("guest stderr"))
        .collect();
    assert!(panics.is_empty(), "{panics:#?}");
    // The 8 MiB log line was cut.
    assert!(log.len() < 4 * 1024 * 1024, "{} bytes of log", log.len());
    assert!(Instant::now() < deadline, "the test took too long");
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// A route's own limits, tighter than the gateway's: its events fail at that route's caps
/// while another route on the same module keeps the gateway-wide ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_tighten_the_limits_of_its_invocations() {
    let h = Harness::builder()
        .subscriber_as("cloud-sub", "#")
        .config_with(|upstream| {
            format!(
                r#"
gateway_id = "gw-limits"

[handlers]
deadline_ms = 5000

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "faulty"
path = "{path}"

[[route]]
name = "strict"
filter = "strict/#"
handler = "faulty"
max_outputs = 2
memory_limit_mib = 2
deadline_ms = 1000
on_quarantine = "dead-letter"
[route.retry]
max_attempts = 1

[[route]]
name = "relaxed"
filter = "relaxed/#"
handler = "faulty"
[route.retry]
max_attempts = 1
"#,
                path = outpost::handlers::examples::guest_path("faulty").display()
            )
        })
        .start()
        .await;
    let device = Device::connect(h.gateway.port, "d").await;
    // Three outputs: over the strict route's cap of 2, within the gateway's 10 000.
    device.publish("strict/d", "many-outputs:3").await;
    device.publish("relaxed/d", "many-outputs:3").await;
    // A loop: stopped at the strict route's 1 s (the gateway's deadline is 5 s).
    device.publish("strict/d", "loop").await;
    device.publish("strict/d", "grow").await;
    device.wait_acked(4).await;
    let deadline = Instant::now() + BOUND;
    until(deadline, "three dead letters", || {
        h.gateway.dead_letters().values().sum::<u64>() >= 3
    })
    .await;
    until(deadline, "the relaxed route's three outputs", || {
        h.received.len() >= 3
    })
    .await;
    let letters = dead_letters(&h.gateway);
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert_eq!(letters[0].1, "output-limit", "{letters:#?}");
    assert!(letters[0].2.contains("at most 2 allowed"), "{letters:#?}");
    assert_eq!(letters[1].1, "timeout", "{letters:#?}");
    assert_eq!(letters[2].1, "out-of-memory", "{letters:#?}");
    assert_eq!(h.received.len(), 3);
}

/// A module stuck in a loop until its (long) deadline holds only its own lane: passthrough
/// telemetry and another module's route flow meanwhile, and the stuck event still ends as a
/// `timeout` dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_module_does_not_hold_up_other_routes() {
    let mut h = Harness::builder()
        .subscriber_as("cloud-sub", "#")
        .config_with(|upstream| {
            format!(
                r#"
gateway_id = "gw-lanes"

[handlers]
deadline_ms = 1000
max_concurrent = 4

[[upstream]]
name = "cloud"
url = "{upstream}"

[[module]]
name = "faulty"
path = "{faulty}"

[[module]]
name = "enrich"
path = "{enrich}"

[[route]]
name = "stuck"
filter = "stuck/#"
handler = "faulty"
deadline_ms = 15000
[route.retry]
max_attempts = 1

[[route]]
name = "enriched"
filter = "env/#"
handler = "enrich"

[[route]]
name = "telemetry"
filter = "telemetry/#"
"#,
                faulty = outpost::handlers::examples::guest_path("faulty").display(),
                enrich = outpost::handlers::examples::guest_path("enrich").display(),
            )
        })
        .start()
        .await;
    let device = Device::connect(h.gateway.port, "d").await;
    device.publish("stuck/d", "loop").await;
    device.wait_acked(1).await;
    for n in 0..200 {
        device.publish("telemetry/d", format!("seq-{n}")).await;
    }
    device.publish("env/d", r#"{"temp_c":0}"#).await;
    device.wait_acked(202).await;
    let deadline = Instant::now() + BOUND;
    until(
        deadline,
        "telemetry and the other module's output upstream",
        || h.received.len() >= 201,
    )
    .await;
    // All of that went through while the loop still held its lane: its 15 s deadline has not
    // passed, so its dead letter is not there yet.
    assert!(
        h.gateway.dead_letters().is_empty(),
        "the loop ended before the other routes were served: {:?}",
        h.gateway.dead_letters()
    );
    let topics: Vec<String> = h.received.all().into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics.iter().filter(|t| *t == "telemetry/d").count(), 200);
    assert!(topics.iter().any(|t| t == "enriched/d"), "{topics:?}");
    until(deadline, "the loop's timeout dead letter", || {
        h.gateway.dead_letters().get("timeout") == Some(&1)
    })
    .await;
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}
