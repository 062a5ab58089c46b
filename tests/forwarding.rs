//! End to end through real sockets: an MQTT device publishes to the `outpost` binary, which
//! forwards to a real Mosquitto upstream, also across an upstream outage and a gateway restart.

mod common;

use common::{eventually, Device, Gateway, Mosquitto, Subscriber};
use rumqttc::QoS;
use std::collections::{HashMap, HashSet};

/// Dedupes by (device, seq) keeping first arrivals, and checks that every device's readings
/// arrived complete and in order.
fn assert_complete_in_order(received: &[(String, Vec<u8>)], devices: usize, per_device: u64) {
    // First arrivals per topic, in arrival order; a duplicate (at-least-once) is skipped.
    let mut seen: HashMap<String, (HashSet<u64>, Vec<u64>)> = HashMap::new();
    for (topic, payload) in received {
        let value: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        let seq = value["seq"].as_u64().expect("seq");
        let (set, list) = seen.entry(topic.clone()).or_default();
        if set.insert(seq) {
            list.push(seq);
        }
    }
    assert_eq!(seen.len(), devices, "topics seen: {:?}", seen.keys());
    for (topic, (_, seqs)) in seen {
        let expected: Vec<u64> = (1..=per_device).collect();
        assert_eq!(
            seqs, expected,
            "readings of {topic} incomplete or out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_qos1_json_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "#").await;
    let mut gateway = Gateway::new(dir.path(), &["--upstream", &upstream.url()]);
    gateway.start();

    let device = Device::connect(gateway.port, "sensor-1").await;
    let mut sent = Vec::new();
    for i in 1..=20u64 {
        let payload = format!(r#"{{"seq":{i},"temp_c":{}.5,"note":"ünïcode ✓"}}"#, 20 + i);
        device
            .publish("telemetry/sensor-1/env", payload.clone())
            .await;
        sent.push(("telemetry/sensor-1/env".to_string(), payload.into_bytes()));
    }
    // Not forwarded: outside the default route's filter.
    device.publish("other/sensor-1", "ignored").await;
    device.wait_acked(21).await;
    eventually("20 messages upstream", || subscriber.received.len() >= 20).await;
    // Give a wrongly forwarded message the chance to show up before asserting equality.
    eventually("outbox drained", || gateway.outbox_depth() == 0).await;
    assert_eq!(subscriber.received.all(), sent);
    assert!(gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// An upstream outage of 100,000 messages from 10 devices, then recovery: every message is
/// delivered, in order per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_of_100k_messages_then_all_delivered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    // The subscriber's persistent session keeps collecting across the upstream's restart.
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "telemetry/#").await;
    upstream.stop();

    let mut gateway = Gateway::new(dir.path(), &["--upstream", &upstream.url()]);
    gateway.start();
    let devices = 10;
    let per_device = 10_000u64;
    let total = devices as u64 * per_device;
    let mut clients = Vec::new();
    let mut publishers = Vec::new();
    for d in 0..devices {
        let device = Device::connect(gateway.port, &format!("dev-{d}")).await;
        let handle = device.handle();
        publishers.push(tokio::spawn(async move {
            for seq in 1..=per_device {
                handle
                    .publish(
                        format!("telemetry/dev-{d}/env"),
                        QoS::AtLeastOnce,
                        false,
                        format!(r#"{{"seq":{seq},"t":21.5}}"#),
                    )
                    .await
                    .expect("queue publish");
            }
        }));
        clients.push(device);
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    for client in &clients {
        client.wait_acked(per_device).await;
    }
    eventually("100,000 rows queued while the upstream is down", || {
        gateway.outbox_depth() == total
    })
    .await;
    assert_eq!(subscriber.received.len(), 0);

    upstream.start();
    eventually("all 100,000 delivered", || gateway.outbox_depth() == 0).await;
    eventually("subscriber got 100,000", || {
        subscriber.received.len() >= total as usize
    })
    .await;
    assert_complete_in_order(&subscriber.received.all(), devices, per_device);
    assert!(gateway.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_survive_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "telemetry/#").await;
    upstream.stop();

    let mut gateway = Gateway::new(
        dir.path(),
        &["--upstream", &upstream.url(), "--gateway-id", "gw-restart"],
    );
    gateway.start();
    let device = Device::connect(gateway.port, "dev-r").await;
    for seq in 1..=300u64 {
        device
            .publish("telemetry/dev-r/env", format!(r#"{{"seq":{seq}}}"#))
            .await;
    }
    device.wait_acked(300).await;
    eventually("300 rows queued", || gateway.outbox_depth() == 300).await;
    drop(device);
    assert!(gateway.stop(), "gateway exits 0 on SIGTERM");
    assert_eq!(
        gateway.outbox_depth(),
        300,
        "queue kept on disk across the stop"
    );

    gateway.start();
    upstream.start();
    eventually("outbox drained after restart", || {
        gateway.outbox_depth() == 0
    })
    .await;
    eventually("subscriber got 300", || subscriber.received.len() >= 300).await;
    assert_complete_in_order(&subscriber.received.all(), 1, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_listener_forwards_too() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};

    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "#").await;
    let v5_port = common::free_port();
    let file = common::write_config(
        dir.path(),
        &format!("[broker]\nlisten_v5 = [\"127.0.0.1:{v5_port}\"]\n"),
    );
    let mut gateway = Gateway::new(
        dir.path(),
        &[
            "--config",
            file.to_str().unwrap(),
            "--upstream",
            &upstream.url(),
        ],
    );
    gateway.start();

    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("v5-device", "127.0.0.1", v5_port), 16);
    client
        .publish(
            "telemetry/v5-device/env",
            QoS::AtLeastOnce,
            false,
            r#"{"seq":1}"#,
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(common::PATIENCE, async {
        loop {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = eventloop.poll().await {
                return;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK on the MQTT 5 listener");
    eventually("the v5 publish upstream", || subscriber.received.len() >= 1).await;
    assert_eq!(
        subscriber.received.all(),
        vec![(
            "telemetry/v5-device/env".to_string(),
            br#"{"seq":1}"#.to_vec()
        )]
    );
}
