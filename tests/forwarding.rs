//! End to end through real sockets: an MQTT device publishes to the `outpost` binary, which
//! forwards to a real Mosquitto upstream, also across an upstream outage and a gateway restart.

mod common;

use common::{eventually, Device, Harness, Subscriber};
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
    let mut h = Harness::builder()
        .subscriber("#")
        .upstream_arg()
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "sensor-1").await;
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
    eventually("20 messages upstream", || h.received.len() >= 20).await;
    // Give a wrongly forwarded message the chance to show up before asserting equality.
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;
    assert_eq!(h.received.all(), sent);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// An upstream outage of 100,000 messages from 10 devices, then recovery: every message is
/// delivered, in order per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_of_100k_messages_then_all_delivered_in_order() {
    // The subscriber's persistent session keeps collecting across the upstream's restart.
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .upstream_arg()
        .start()
        .await;
    let devices = 10;
    let per_device = 10_000u64;
    let total = devices as u64 * per_device;
    let mut clients = Vec::new();
    let mut publishers = Vec::new();
    for d in 0..devices {
        let device = Device::connect(h.gateway.port, &format!("dev-{d}")).await;
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
        h.gateway.outbox_depth() == total
    })
    .await;
    assert_eq!(h.received.len(), 0);

    h.upstream.start();
    eventually("all 100,000 delivered", || h.gateway.outbox_depth() == 0).await;
    eventually("subscriber got 100,000", || {
        h.received.len() >= total as usize
    })
    .await;
    assert_complete_in_order(&h.received.all(), devices, per_device);
    assert!(h.gateway.is_running());
}

/// The uplink's byte budget (`inflight_bytes`) holds rows back until earlier ones are
/// acknowledged, and a row larger than the whole budget still goes, alone: a backlog of mixed
/// sizes arrives complete and in order. (How many rows are in flight at once is the window's
/// unit and property tests'; here the session must neither stall on a row that does not fit
/// nor reorder it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_byte_window_delivers_rows_of_any_size_in_order() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .config_with(|url| {
            format!(
                "[[upstream]]\nname = \"cloud\"\nurl = \"{url}\"\ninflight = 1000\ninflight_bytes = 1024\n"
            )
        })
        .start()
        .await;
    let device = Device::connect(h.gateway.port, "dev-w").await;
    let total = 200u64;
    for seq in 1..=total {
        // Mostly 400 bytes (two fit the budget, three do not); every 50th is 5,000 bytes,
        // more than the whole budget.
        let pad = if seq % 50 == 0 { 5_000 } else { 400 };
        let payload = format!(r#"{{"seq":{seq},"pad":"{}"}}"#, "x".repeat(pad));
        device.publish("telemetry/dev-w/env", payload).await;
    }
    device.wait_acked(total).await;
    eventually("200 rows queued", || h.gateway.outbox_depth() == total).await;

    h.upstream.start();
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;
    eventually("subscriber got 200", || h.received.len() >= total as usize).await;
    assert_complete_in_order(&h.received.all(), 1, total);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_survive_a_gateway_restart() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .upstream_arg()
        .args(&["--gateway-id", "gw-restart"])
        .start()
        .await;
    let device = Device::connect(h.gateway.port, "dev-r").await;
    for seq in 1..=300u64 {
        device
            .publish("telemetry/dev-r/env", format!(r#"{{"seq":{seq}}}"#))
            .await;
    }
    device.wait_acked(300).await;
    eventually("300 rows queued", || h.gateway.outbox_depth() == 300).await;
    drop(device);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
    assert_eq!(
        h.gateway.outbox_depth(),
        300,
        "queue kept on disk across the stop"
    );

    h.gateway.start();
    h.upstream.start();
    eventually("outbox drained after restart", || {
        h.gateway.outbox_depth() == 0
    })
    .await;
    eventually("subscriber got 300", || h.received.len() >= 300).await;
    assert_complete_in_order(&h.received.all(), 1, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_v5_still_works_for_both_versions() {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};

    let v5_port = common::free_port();
    let h = Harness::builder()
        .subscriber("#")
        .config(&format!(
            "[broker]\nlisten_v5 = [\"127.0.0.1:{v5_port}\"]\n"
        ))
        .upstream_arg()
        .start()
        .await;

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
    eventually("the v5 publish upstream", || h.received.len() >= 1).await;
    // `listen_v5` is served like `listen`: a 3.1.1 device may use it too.
    let device = Device::connect(v5_port, "v4-device").await;
    device
        .publish("telemetry/v4-device/env", r#"{"seq":1}"#)
        .await;
    device.wait_acked(1).await;
    eventually("the 3.1.1 publish upstream", || h.received.len() >= 2).await;
    assert_eq!(
        h.received.all(),
        vec![
            (
                "telemetry/v5-device/env".to_string(),
                br#"{"seq":1}"#.to_vec()
            ),
            (
                "telemetry/v4-device/env".to_string(),
                br#"{"seq":1}"#.to_vec()
            )
        ]
    );
}

/// One device listener serves both protocol versions, as every other broker does on 1883:
/// the CONNECT's protocol level decides. A 3.1.1 device (rumqttc) and an MQTT 5 device
/// (`mosquitto_pub -V 5`, which exits non-zero without its PUBACK) publish on the same port;
/// a 3.1.1 and an MQTT 5 subscriber on that port and the upstream each get both publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listener_serves_3_1_1_and_5() {
    let h = Harness::builder()
        .subscriber("#")
        .upstream_arg()
        .start()
        .await;

    let local_v4 = Subscriber::connect(h.gateway.port, "local-v4", "telemetry/#").await;
    let options = rumqttc::v5::MqttOptions::new("local-v5", "127.0.0.1", h.gateway.port);
    let received_v5 = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received_v5.clone();
    let (_client5, driver) = common::subscribe_v5_with(options, "telemetry/#", move |p| {
        let topic = String::from_utf8_lossy(&p.topic).to_string();
        sink.lock().unwrap().push((topic, p.payload.to_vec()));
    })
    .await;

    let device = Device::connect(h.gateway.port, "dev-v4").await;
    device.publish("telemetry/dev-v4/env", r#"{"v":4}"#).await;
    device.wait_acked(1).await;
    let port = h.gateway.port.to_string();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("mosquitto_pub")
            .args(["-V", "5", "-h", "127.0.0.1", "-p", &port, "-i", "dev-v5"])
            .args(["-q", "1", "-t", "telemetry/dev-v5/env", "-m", r#"{"v":5}"#])
            .status()
            .expect("mosquitto_pub runs")
    })
    .await
    .unwrap();
    assert!(status.success(), "mosquitto_pub -V 5 failed: {status}");

    let mut expected = vec![
        ("telemetry/dev-v4/env".to_string(), br#"{"v":4}"#.to_vec()),
        ("telemetry/dev-v5/env".to_string(), br#"{"v":5}"#.to_vec()),
    ];
    expected.sort();
    let sorted = |mut v: Vec<(String, Vec<u8>)>| {
        v.sort();
        v
    };
    eventually("both publishes upstream", || h.received.len() >= 2).await;
    eventually("both publishes at the local 3.1.1 subscriber", || {
        local_v4.received.len() >= 2
    })
    .await;
    eventually("both publishes at the local MQTT 5 subscriber", || {
        received_v5.lock().unwrap().len() >= 2
    })
    .await;
    assert_eq!(sorted(h.received.all()), expected);
    assert_eq!(sorted(local_v4.received.all()), expected);
    assert_eq!(sorted(received_v5.lock().unwrap().clone()), expected);
    driver.abort();
}
