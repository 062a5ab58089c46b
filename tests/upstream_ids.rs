//! Every output reaches the upstream with its stable message id, so that the upstream can drop
//! duplicates: as the MQTT 5 user property `outpost-msg-id`, or, for MQTT 3.1.1 upstreams with
//! `envelope = true`, inside a JSON envelope. Real processes: a device publishes to the
//! `outpost` binary, which forwards to a real Mosquitto.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Device, Harness, Message};

/// Not JSON, not UTF-8.
const BINARY: &[u8] = &[0x00, 0xff, 0xfe, 0x80, b'h', b'i', 0x01];
/// `BINARY` in standard base64 (from coreutils' `base64`).
const BINARY_BASE64: &str = "AP/+gGhpAQ==";
/// UTF-8 text that is not JSON.
const TEXT: &[u8] = b"not json {";
/// `TEXT` in standard base64 (from coreutils' `base64`).
const TEXT_BASE64: &str = "bm90IGpzb24gew==";

/// The configuration of a gateway whose only upstream is at `url`, with `extra` added to its
/// `[[upstream]]` table.
fn upstream_config(gateway_id: &str, url: &str, extra: &str) -> String {
    format!(
        "gateway_id = \"{gateway_id}\"\n\n[[upstream]]\nname = \"cloud\"\nurl = \"{url}\"\n{extra}\n"
    )
}

/// A message received by the MQTT 5 subscriber.
#[derive(Debug, Clone)]
struct V5Message {
    topic: String,
    payload: Vec<u8>,
    user_properties: Vec<(String, String)>,
}

/// An MQTT 5 subscriber on the upstream broker (rumqttc's v5 client), keeping each publish's
/// user properties.
struct V5Subscriber {
    received: Arc<Mutex<Vec<V5Message>>>,
    _client: rumqttc::v5::AsyncClient,
    driver: tokio::task::JoinHandle<()>,
}

impl V5Subscriber {
    async fn connect(port: u16, id: &str, filter: &str) -> V5Subscriber {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (client, driver) = common::subscribe_v5_with(options, filter, move |p| {
            sink.lock().unwrap().push(V5Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                user_properties: p
                    .properties
                    .map(|props| props.user_properties)
                    .unwrap_or_default(),
            });
        })
        .await;
        V5Subscriber {
            received,
            _client: client,
            driver,
        }
    }

    fn all(&self) -> Vec<V5Message> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for V5Subscriber {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An MQTT 3.1.1 subscriber that accepts packets of up to 1 MiB (common::Subscriber keeps
/// rumqttc's 10 KiB default).
struct LargeSubscriber {
    received: Arc<Mutex<Vec<Message>>>,
    _client: rumqttc::AsyncClient,
    driver: tokio::task::JoinHandle<()>,
}

impl LargeSubscriber {
    async fn connect(port: u16, id: &str, filter: &str) -> LargeSubscriber {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let (client, driver) = common::subscribe_with(options, filter, move |p| {
            sink.lock()
                .unwrap()
                .push((p.topic.clone(), p.payload.to_vec()));
        })
        .await;
        LargeSubscriber {
            received,
            _client: client,
            driver,
        }
    }

    fn all(&self) -> Vec<Message> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for LargeSubscriber {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Standard base64 decoding (with padding), written here so the test does not trust the
/// gateway's encoder.
fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not a base64 character: {c:?}"),
        }
    }
    assert_eq!(text.len() % 4, 0, "base64 length: {text:?}");
    let mut out = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let mut group = 0u32;
        for (i, &c) in data.iter().enumerate() {
            group |= value(c) << (18 - 6 * i);
        }
        let bytes = group.to_be_bytes();
        out.extend_from_slice(&bytes[1..data.len()]);
    }
    out
}

/// Checks the message ids: one per message, all distinct, all `<gateway_id>-...`.
fn assert_ids(ids: &[String], gateway_id: &str, expected: usize) {
    assert_eq!(ids.len(), expected, "ids: {ids:?}");
    let prefix = format!("{gateway_id}-");
    for id in ids {
        assert!(
            id.starts_with(&prefix) && id.len() > prefix.len(),
            "message id {id:?} is not of the form {prefix}..."
        );
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "message ids repeat: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_upstream_gets_the_message_id_as_a_user_property() {
    let mut h = Harness::builder()
        .upstream()
        .config_with(|url| upstream_config("gw-five", url, "protocol = \"5\""))
        .build()
        .await;
    let subscriber = V5Subscriber::connect(h.upstream.port, "v5-sub", "#").await;
    h.gateway.start();

    let device = Device::connect(h.gateway.port, "sensor-5").await;
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 1..=10u64 {
        let payload = format!(r#"{{"seq":{i},"temp_c":{}.5}}"#, 20 + i);
        device
            .publish("telemetry/sensor-5/env", payload.clone())
            .await;
        sent.push(("telemetry/sensor-5/env".to_string(), payload.into_bytes()));
    }
    device.publish("telemetry/sensor-5/raw", BINARY).await;
    sent.push(("telemetry/sensor-5/raw".to_string(), BINARY.to_vec()));
    // Not forwarded: outside the default route's filter.
    device.publish("other/sensor-5", "ignored").await;
    device.wait_acked(12).await;
    eventually("11 messages upstream", || subscriber.all().len() >= 11).await;
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;

    let received = subscriber.all();
    let got: Vec<(String, Vec<u8>)> = received
        .iter()
        .map(|m| (m.topic.clone(), m.payload.clone()))
        .collect();
    assert_eq!(got, sent, "topics and payloads unchanged, in order");
    let mut ids = Vec::new();
    for message in &received {
        let values: Vec<&String> = message
            .user_properties
            .iter()
            .filter(|(key, _)| key == "outpost-msg-id")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(
            values.len(),
            1,
            "exactly one outpost-msg-id on {}: {:?}",
            message.topic,
            message.user_properties
        );
        ids.push(values[0].clone());
    }
    assert_ids(&ids, "gw-five", 11);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_envelope_carries_id_topic_and_payload() {
    let mut h = Harness::builder()
        .subscriber_as("env-sub", "#")
        .config_with(|url| upstream_config("gw-env", url, "envelope = true"))
        .start()
        .await;

    let device = Device::connect(h.gateway.port, "sensor-e").await;
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 1..=3u64 {
        let payload = format!(r#"{{"seq":{i},"note":"ünïcode ✓","nested":{{"a":[1,2.5,null]}}}}"#);
        sent.push(("telemetry/sensor-e/env".to_string(), payload.into_bytes()));
    }
    sent.push(("telemetry/sensor-e/count".to_string(), b"42".to_vec()));
    sent.push(("telemetry/sensor-e/text".to_string(), TEXT.to_vec()));
    sent.push(("telemetry/sensor-e/raw".to_string(), BINARY.to_vec()));
    for (topic, payload) in &sent {
        device.publish(topic, payload.clone()).await;
    }
    device.publish("other/sensor-e", "ignored").await;
    device.wait_acked(sent.len() as u64 + 1).await;
    eventually("6 envelopes upstream", || h.received.len() >= 6).await;
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;

    let received = h.received.all();
    assert_eq!(received.len(), sent.len(), "received: {received:?}");
    let mut ids = Vec::new();
    for ((topic, payload), (got_topic, envelope)) in sent.iter().zip(&received) {
        assert_eq!(got_topic, topic, "published on the original topic");
        let envelope: serde_json::Value = serde_json::from_slice(envelope).unwrap_or_else(|e| {
            panic!(
                "not a JSON envelope ({e}): {:?}",
                String::from_utf8_lossy(envelope)
            )
        });
        let fields = envelope.as_object().expect("envelope is an object");
        assert_eq!(envelope["topic"], topic.as_str());
        ids.push(envelope["id"].as_str().expect("id is a string").to_string());
        match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(original) => {
                assert_eq!(
                    envelope["payload"], original,
                    "JSON payload embedded as JSON"
                );
                assert!(!fields.contains_key("payload_base64"), "{envelope}");
                assert_eq!(fields.len(), 3, "{envelope}");
            }
            Err(_) => {
                let encoded = envelope["payload_base64"]
                    .as_str()
                    .unwrap_or_else(|| panic!("payload_base64 missing: {envelope}"));
                assert_eq!(
                    base64_decode(encoded),
                    *payload,
                    "base64 decodes to the original"
                );
                let expected = if payload == BINARY {
                    BINARY_BASE64
                } else {
                    TEXT_BASE64
                };
                assert_eq!(encoded, expected, "standard base64 with padding");
                assert!(!fields.contains_key("payload"), "{envelope}");
                assert_eq!(fields.len(), 3, "{envelope}");
            }
        }
    }
    assert_ids(&ids, "gw-env", sent.len());
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// A payload whose envelope is larger than rumqttc's default 10 KiB packet limit still goes out
/// (the upstream decides what is too large, not the client's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_envelope_of_a_large_binary_payload_is_delivered() {
    let mut h = Harness::builder()
        .upstream()
        .config_with(|url| upstream_config("gw-large", url, "envelope = true"))
        .build()
        .await;
    let subscriber = LargeSubscriber::connect(h.upstream.port, "large-sub", "#").await;
    h.gateway.start();

    // 9,000 bytes fit the device's 10 KiB packets; their base64 (12,000 characters) does not.
    let payload: Vec<u8> = (0..9000u32).map(|i| (i * 7 % 256) as u8).collect();
    let device = Device::connect(h.gateway.port, "sensor-l").await;
    device
        .publish("telemetry/sensor-l/blob", payload.clone())
        .await;
    device
        .publish("telemetry/sensor-l/env", r#"{"seq":2}"#)
        .await;
    device.wait_acked(2).await;
    eventually("both messages upstream", || subscriber.all().len() >= 2).await;
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;

    let received = subscriber.all();
    assert_eq!(received.len(), 2);
    let blob: serde_json::Value = serde_json::from_slice(&received[0].1).expect("JSON envelope");
    assert_eq!(blob["topic"], "telemetry/sensor-l/blob");
    let encoded = blob["payload_base64"].as_str().expect("payload_base64");
    assert_eq!(base64_decode(encoded), payload);
    let small: serde_json::Value = serde_json::from_slice(&received[1].1).expect("JSON envelope");
    assert_eq!(
        small["payload"]["seq"], 2,
        "and the link keeps going in order"
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// An MQTT 5 upstream that refuses a row (here: Mosquitto's ACL denies its topic, PUBACK reason
/// "not authorized"; Mosquitto 2.0.11 also closes the connection then) does not make it vanish:
/// the row stays first in the outbox and is offered again after a backoff, with one warning,
/// not one per attempt; after `max_refusals` refusals it becomes a dead letter (`rejected`) and
/// the rows behind it are delivered; nothing around it is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_refused_row_is_retried_then_dead_lettered() {
    let mut h = Harness::builder()
        .config_with(|url| upstream_config("gw-refused", url, "protocol = \"5\"\nmax_refusals = 3"))
        .build()
        .await;
    // common::Mosquitto keeps its configuration in `<dir>/mosquitto-<port>/mosquitto.conf`;
    // add an ACL that lets anyone use `telemetry/+/env` and nothing else, and a log file
    // (written through, unlike its stdout) to count connections in.
    let conf_dir = h.upstream.dir.clone();
    let acl = conf_dir.join("acl");
    let events = conf_dir.join("events.log");
    std::fs::write(&acl, "topic readwrite telemetry/+/env\n").unwrap();
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(conf_dir.join("mosquitto.conf"))
        .expect("mosquitto.conf written by Mosquitto::new");
    let extra = format!(
        "acl_file {}\nlog_dest file {}\n",
        acl.display(),
        events.display()
    );
    std::io::Write::write_all(&mut conf, extra.as_bytes()).unwrap();
    drop(conf);
    h.upstream.start();
    let subscriber = V5Subscriber::connect(h.upstream.port, "v5-sub", "telemetry/+/env").await;
    h.gateway.start();

    let sent: [(&str, &[u8]); 3] = [
        ("telemetry/sensor-r/env", br#"{"seq":1}"#),
        ("telemetry/sensor-r/secret", br#"{"seq":2}"#),
        ("telemetry/sensor-r/env", br#"{"seq":3}"#),
    ];
    let device = Device::connect(h.gateway.port, "sensor-r").await;
    for (topic, payload) in sent {
        device.publish(topic, payload).await;
    }
    device.wait_acked(3).await;
    eventually("the row before the refused one upstream", || {
        subscriber.all().iter().any(|m| m.payload == sent[0].1)
    })
    .await;
    let connections = || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .matches("as outpost-gw-refused-cloud")
            .count()
    };
    // Mosquitto may reset the connection before its refusing PUBACK is read while later rows
    // are unread; the next connection offers the refused row alone and sees the refusal.
    eventually("the refusal logged", || {
        h.gateway.log().contains("upstream refused an output")
    })
    .await;

    eventually("the refused row dead-lettered as rejected", || {
        h.gateway.dead_letters().get("rejected").copied() == Some(1)
    })
    .await;
    eventually("the row behind the refused one upstream", || {
        subscriber.all().iter().any(|m| m.payload == sent[2].1)
    })
    .await;
    assert!(
        connections() >= 3,
        "offered on {} connections, max_refusals is 3",
        connections()
    );
    let conn = rusqlite::Connection::open_with_flags(
        h.gateway.data.join("outpost.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let (topic, payload, detail): (String, Vec<u8>, String) = conn
        .query_row(
            "SELECT topic, payload, detail FROM dead_letters WHERE reason = 'rejected'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((topic.as_str(), payload.as_slice()), sent[1]);
    assert!(detail.contains("NotAuthorized"), "{detail}");
    // The last row's delete follows its PUBACK (deletes are batched), which may come after
    // the subscriber already has it.
    eventually("nothing else waits in the outbox", || {
        conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .unwrap()
            == 0
    })
    .await;
    assert!(
        !subscriber
            .all()
            .iter()
            .any(|m| m.topic.ends_with("/secret")),
        "the refused row never reached a subscriber"
    );
    let log = h.gateway.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("outpost::uplink"))
        .count();
    assert!(
        warnings <= 3,
        "{warnings} warnings for {} connections: one when refused, one when dead-lettered, at most one outage",
        connections()
    );
    assert!(h.gateway.is_running());
}
