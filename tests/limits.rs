//! Caps and bad input: a full outbox under each policy, a full database, malformed and
//! oversized payloads. Each is backpressure, a counted dead letter or a clear rejection; none
//! loses anything else or stops the gateway.

mod common;

use std::time::Duration;

use rumqttc::QoS;

use common::{eventually, Device, Harness};

fn seqs(received: &[(String, Vec<u8>)]) -> Vec<u64> {
    received
        .iter()
        .map(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(p).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Waits until the device's acknowledged count stops moving for a while, and returns it.
async fn settled_acks(device: &Device) -> u64 {
    let mut last = device.acked();
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = device.acked();
        if now == last {
            return now;
        }
        last = now;
    }
}

async fn publish_numbered(device: &Device, topic: &str, count: u64, pad: usize) {
    let padding = "x".repeat(pad);
    for seq in 1..=count {
        device
            .publish(topic, format!(r#"{{"seq":{seq},"pad":"{padding}"}}"#))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_under_reject_new_stops_acknowledging_then_resumes() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config("[store]\noutbox_max_rows = 50\njournal_max_rows = 100\noutbox_policy = \"reject-new\"\n")
        .upstream_arg()
        .start()
        .await;

    // rumqttc queues what it cannot send yet, so publishing never blocks this test.
    let device = Device::connect(h.gateway.port, "dev-cap").await;
    publish_numbered(&device, "telemetry/dev-cap/env", 400, 0).await;
    let stalled = settled_acks(&device).await;
    assert!(
        stalled < 400,
        "all 400 acknowledged although outbox and journal are full"
    );
    assert!(
        stalled >= 150,
        "only {stalled} acknowledged; the caps allow 150"
    );
    assert_eq!(h.gateway.outbox_depth(), 50);
    assert!(h.gateway.is_running());
    assert!(
        h.gateway.log().contains("journal full"),
        "{}",
        h.gateway.log()
    );

    h.upstream.start();
    device.wait_acked(400).await;
    eventually("all 400 upstream", || h.received.len() >= 400).await;
    let mut got = seqs(&h.received.all());
    got.dedup();
    assert_eq!(
        got,
        (1..=400).collect::<Vec<u64>>(),
        "complete and in order"
    );
    assert!(h.gateway.dead_letters().is_empty());
}

/// Stopping with the outbox full under reject-new and nothing left in the journal ends at once
/// and loses nothing: the pipeline has nothing it could move, and waiting for outbox room would
/// wait for the uplinks, which stop after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_full_outbox_under_reject_new_stops_when_told() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config("[store]\noutbox_max_rows = 20\noutbox_policy = \"reject-new\"\n")
        .upstream_arg()
        .start()
        .await;
    let device = Device::connect(h.gateway.port, "dev-full").await;
    publish_numbered(&device, "telemetry/dev-full/env", 20, 0).await;
    device.wait_acked(20).await;
    eventually("the outbox full and the journal empty", || {
        h.gateway.outbox_depth() == 20 && h.gateway.journal_depth() == 0
    })
    .await;
    drop(device);
    assert!(
        h.gateway.stop(),
        "exits 0 on SIGTERM (not killed at the stop deadline)"
    );

    h.upstream.start();
    h.gateway.start();
    eventually("all 20 delivered", || h.received.len() >= 20).await;
    assert_eq!(seqs(&h.received.all()), (1..=20).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_under_drop_oldest_evicts_to_dead_letters() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config("[store]\noutbox_max_rows = 50\noutbox_policy = \"drop-oldest\"\n")
        .upstream_arg()
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-drop").await;
    publish_numbered(&device, "telemetry/dev-drop/env", 200, 0).await;
    device.wait_acked(200).await;
    eventually("150 evicted", || {
        h.gateway.dead_letters().get("evicted").copied() == Some(150)
    })
    .await;
    assert_eq!(h.gateway.outbox_depth(), 50);

    h.upstream.start();
    eventually("the newest 50 upstream", || h.received.len() >= 50).await;
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;
    assert_eq!(seqs(&h.received.all()), (151..=200).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_database_is_backpressure_not_loss() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config("[store]\nmax_db_mib = 1\n")
        .upstream_arg()
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-full").await;
    let count = 2000;
    // The device's window fills while the disk is full, so publish from another task.
    let handle = device.handle();
    let publisher = tokio::spawn(async move {
        let padding = "x".repeat(1000);
        for seq in 1..=count {
            let payload = format!(r#"{{"seq":{seq},"pad":"{padding}"}}"#);
            handle
                .publish("telemetry/dev-full/env", QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish");
        }
    });
    let stalled = settled_acks(&device).await;
    assert!(
        stalled < count,
        "all acknowledged although the database is capped at 1 MiB"
    );
    assert!(h.gateway.is_running());
    let log = h.gateway.log();
    assert!(
        log.contains("store.max_db_mib"),
        "no clear error in the log: {log}"
    );

    h.upstream.start();
    tokio::time::timeout(common::PATIENCE, publisher)
        .await
        .expect("the device could publish everything once the upstream drained the outbox")
        .expect("publisher");
    device.wait_acked(count).await;
    eventually("all upstream", || h.received.len() >= count as usize).await;
    let mut got = seqs(&h.received.all());
    got.dedup();
    assert_eq!(
        got,
        (1..=count).collect::<Vec<u64>>(),
        "complete and in order"
    );
    // The database is intact: the gateway restarts on it.
    assert!(h.gateway.stop());
    h.gateway.start();
    assert!(h.gateway.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_payloads_are_counted_not_fatal() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .config("[broker]\nmax_payload_bytes = 1024\n[[route]]\nname = \"json\"\nfilter = \"telemetry/#\"\npayload = \"json\"\n")
        .upstream_arg()
        .start()
        .await;

    let good = Device::connect(h.gateway.port, "good").await;
    good.publish("telemetry/good/env", r#"{"seq":1}"#).await;
    good.publish("telemetry/good/env", "{not json").await;
    good.publish("telemetry/good/env", r#"{"seq":2}"#).await;
    good.wait_acked(3).await;
    eventually("one malformed dead letter", || {
        h.gateway.dead_letters().get("malformed").copied() == Some(1)
    })
    .await;

    let big = Device::connect(h.gateway.port, "big").await;
    big.publish("telemetry/big/env", vec![b'x'; 4096]).await;
    eventually("the oversized publish is rejected", || {
        h.gateway.log().contains("exceeds the limit")
    })
    .await;
    assert_eq!(big.acked(), 0);

    good.publish("telemetry/good/env", r#"{"seq":3}"#).await;
    eventually("three good readings upstream", || h.received.len() >= 3).await;
    assert_eq!(seqs(&h.received.all()), vec![1, 2, 3]);
    assert!(h.gateway.is_running());
}

/// Outputs whose route's time to live passes while the upstream is down are never sent: they
/// become dead letters (`expired`) while other routes' outputs are delivered; replaying them
/// (an operator's decision, so without the TTL) delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_outputs_become_dead_letters_and_replay_delivers_them() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config(
            "gateway_id = \"gw-ttl\"\n\
             [[route]]\nname = \"expiring\"\nfilter = \"telemetry/expiring/#\"\nttl_secs = 1\n\
             [[route]]\nname = \"lasting\"\nfilter = \"telemetry/lasting/#\"\n",
        )
        .upstream_arg()
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "dev-ttl").await;
    publish_numbered(&device, "telemetry/expiring/env", 5, 0).await;
    publish_numbered(&device, "telemetry/lasting/env", 5, 0).await;
    device.wait_acked(10).await;
    eventually("10 rows queued", || h.gateway.outbox_depth() == 10).await;
    // The acknowledgements came after the events were received: 1.5 s from here is past the
    // 1 s time to live of every expiring row, however slow this machine is.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    h.upstream.start();
    eventually("the lasting outputs delivered", || h.received.len() >= 5).await;
    eventually("5 expired dead letters", || {
        h.gateway.dead_letters().get("expired").copied() == Some(5)
    })
    .await;
    eventually("outbox empty", || h.gateway.outbox_depth() == 0).await;
    let received = h.received.all();
    assert!(
        received.iter().all(|(t, _)| t == "telemetry/lasting/env"),
        "an expired output was sent: {:?}",
        received.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&received), (1..=5).collect::<Vec<u64>>());

    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "deadletters",
            "replay",
            "--reason",
            "expired",
            "--broker",
            &format!("mqtt://127.0.0.1:{}", h.gateway.port),
            "--gateway-id",
            "gw-ttl",
            "--timeout-secs",
            "60",
        ])
        .output()
        .expect("run outpost deadletters replay");
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    eventually("the replayed outputs delivered", || h.received.len() >= 10).await;
    let expiring: Vec<(String, Vec<u8>)> = h
        .received
        .all()
        .into_iter()
        .filter(|(t, _)| t == "telemetry/expiring/env")
        .collect();
    assert_eq!(seqs(&expiring), (1..=5).collect::<Vec<u64>>());
    assert!(h.gateway.dead_letters().is_empty());
}
