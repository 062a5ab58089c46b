//! Nothing acknowledged is lost: the gateway is killed with SIGKILL while devices publish and
//! the upstream is down; after a restart every publish whose PUBACK a device received arrives
//! upstream. Also: a device with keep-alive 0 (keep-alive off, MQTT 3.1.1 §3.1.2.10) is served.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Gateway, Mosquitto, Subscriber};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// A device that knows exactly which of its publishes were acknowledged: rumqttc reports the
/// packet id of each publish as it goes out, in publish order, and each PUBACK names one.
struct CountingDevice {
    acked: Arc<Mutex<HashSet<u64>>>,
    publisher: tokio::task::JoinHandle<()>,
    driver: tokio::task::JoinHandle<()>,
}

impl CountingDevice {
    fn start(port: u16, name: &str, count: u64) -> CountingDevice {
        let mut options = MqttOptions::new(name, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 200);
        let acked = Arc::new(Mutex::new(HashSet::new()));
        let sink = acked.clone();
        let driver = tokio::spawn(async move {
            let mut next_seq = 1u64;
            let mut in_flight: HashMap<u16, u64> = HashMap::new();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        in_flight.insert(pkid, next_seq);
                        next_seq += 1;
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = in_flight.remove(&ack.pkid) {
                            sink.lock().unwrap().insert(seq);
                        }
                    }
                    Ok(_) => {}
                    // The gateway is gone: what was not acknowledged stays unacknowledged.
                    Err(_) => return,
                }
            }
        });
        let topic = format!("telemetry/{name}/env");
        let publisher = tokio::spawn(async move {
            for seq in 1..=count {
                let payload = format!(r#"{{"seq":{seq}}}"#);
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        CountingDevice {
            acked,
            publisher,
            driver,
        }
    }

    fn acked(&self) -> HashSet<u64> {
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for CountingDevice {
    fn drop(&mut self) {
        self.publisher.abort();
        self.driver.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "telemetry/#").await;
    upstream.stop();

    let mut gateway = Gateway::new(dir.path(), &["--upstream", &upstream.url()]);
    gateway.start();
    let devices: Vec<CountingDevice> = (0..4)
        .map(|d| CountingDevice::start(gateway.port, &format!("dev-{d}"), 7_500))
        .collect();
    let total_acked =
        |devices: &[CountingDevice]| devices.iter().map(|d| d.acked().len()).sum::<usize>();
    // At least 20,000 acknowledged publishes are at stake when the gateway is killed, with
    // more still arriving.
    eventually("20,000 publishes acknowledged", || {
        total_acked(&devices) >= 20_000
    })
    .await;
    gateway.kill();
    // Give the devices' event loops time to notice; no acknowledgement can arrive after this.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acked: Vec<HashSet<u64>> = devices.iter().map(|d| d.acked()).collect();
    drop(devices);
    let acked_total: usize = acked.iter().map(|a| a.len()).sum();
    eprintln!("acknowledged before SIGKILL: {acked_total} of 30000 published");

    gateway.start();
    upstream.start();
    eventually("every acknowledged publish upstream", || {
        let mut got: Vec<HashSet<u64>> = vec![HashSet::new(); 4];
        for (topic, payload) in subscriber.received.all() {
            let d: usize = topic
                .split('/')
                .nth(1)
                .and_then(|s| s.strip_prefix("dev-"))
                .and_then(|s| s.parse().ok())
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            got[d].insert(v["seq"].as_u64().unwrap());
        }
        acked.iter().zip(&got).all(|(a, g)| a.is_subset(g))
    })
    .await;
    eventually("outbox drained", || gateway.outbox_depth() == 0).await;
    let received = subscriber.received.len();
    let unique: HashSet<(String, Vec<u8>)> = subscriber.received.all().into_iter().collect();
    eprintln!(
        "upstream received {received} messages, {} unique, {} duplicates",
        unique.len(),
        received - unique.len()
    );
    assert!(unique.len() >= acked_total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Mosquitto::new(dir.path());
    upstream.start();
    let subscriber = Subscriber::connect(upstream.port, "test-sub", "telemetry/#").await;
    let mut gateway = Gateway::new(dir.path(), &["--upstream", &upstream.url()]);
    gateway.start();

    // A raw MQTT 3.1.1 CONNECT with keep-alive 0, then a QoS 1 publish, over a plain socket.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let mut connect = bytes::BytesMut::new();
    let mut c = rumqttc::mqttbytes::v4::Connect::new("no-keepalive");
    c.keep_alive = 0;
    c.write(&mut connect).unwrap();
    socket.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");

    let mut publish = rumqttc::mqttbytes::v4::Publish::new(
        "telemetry/no-keepalive/env",
        QoS::AtLeastOnce,
        br#"{"seq":1}"#.to_vec(),
    );
    publish.pkid = 7;
    let mut packet = bytes::BytesMut::new();
    publish.write(&mut packet).unwrap();
    socket.write_all(&packet).await.unwrap();
    let mut puback = [0u8; 4];
    socket.read_exact(&mut puback).await.unwrap();
    assert_eq!(puback, [0x40, 0x02, 0x00, 0x07], "PUBACK for packet 7");
    eventually("the publish upstream", || subscriber.received.len() == 1).await;
    assert!(gateway.is_running());
}
