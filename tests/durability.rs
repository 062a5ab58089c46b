//! Nothing acknowledged is lost: the gateway is killed with SIGKILL while devices publish and
//! the upstream is down; after a restart every publish whose PUBACK a device received arrives
//! upstream. The same through a handler route, whose events take the longer way through the
//! module's lane queue and the `enrich` handler. Also: a device with keep-alive 0 (keep-alive
//! off, MQTT 3.1.1 §3.1.2.10) is served.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, Gateway, Harness, Received, PATIENCE};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// A device that knows exactly which of its publishes were acknowledged: rumqttc reports the
/// packet id of each publish as it goes out, in publish order, and each PUBACK names one.
struct CountingDevice {
    acked: Arc<Mutex<HashSet<u64>>>,
    publisher: tokio::task::JoinHandle<()>,
    driver: tokio::task::JoinHandle<()>,
}

impl CountingDevice {
    /// Publishes `{"seq":N}` for N in 1..=count on `telemetry/<name>/env`.
    fn start(port: u16, name: &str, count: u64) -> CountingDevice {
        CountingDevice::start_with(port, name, count, |seq| format!(r#"{{"seq":{seq}}}"#))
    }

    /// Publishes `payload(N)` for N in 1..=count on `telemetry/<name>/env`.
    fn start_with(port: u16, name: &str, count: u64, payload: fn(u64) -> String) -> CountingDevice {
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
                let payload = payload(seq);
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

    /// Whether its connection is gone (the driver returns on the first connection error), so
    /// that no acknowledgement can still be on its way to it.
    fn disconnected(&self) -> bool {
        self.driver.is_finished()
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
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .stop_upstream()
        .upstream_arg()
        .start()
        .await;
    let devices: Vec<CountingDevice> = (0..4)
        .map(|d| CountingDevice::start(h.gateway.port, &format!("dev-{d}"), 7_500))
        .collect();
    let total_acked =
        |devices: &[CountingDevice]| devices.iter().map(|d| d.acked().len()).sum::<usize>();
    // At least 20,000 acknowledged publishes are at stake when the gateway is killed, with
    // more still arriving.
    eventually("20,000 publishes acknowledged", || {
        total_acked(&devices) >= 20_000
    })
    .await;
    h.gateway.kill();
    // Give the devices' event loops time to notice; no acknowledgement can arrive after this.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acked: Vec<HashSet<u64>> = devices.iter().map(|d| d.acked()).collect();
    drop(devices);
    let acked_total: usize = acked.iter().map(|a| a.len()).sum();
    eprintln!("acknowledged before SIGKILL: {acked_total} of 30000 published");

    h.gateway.start();
    h.upstream.start();
    eventually("every acknowledged publish upstream", || {
        let mut got: Vec<HashSet<u64>> = vec![HashSet::new(); 4];
        for (topic, payload) in h.received.all() {
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
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;
    let received = h.received.len();
    let unique: HashSet<(String, Vec<u8>)> = h.received.all().into_iter().collect();
    eprintln!(
        "upstream received {received} messages, {} unique, {} duplicates",
        unique.len(),
        received - unique.len()
    );
    assert!(unique.len() >= acked_total);
}

/// The gateway id of the handler-route kill test: the prefix of every message id it sends.
const ENRICH_GATEWAY: &str = "gw-kill";

/// A handler route: every `telemetry/#` publish goes through the `enrich` example (the real
/// component, from its build path) to `enriched/<device>`, in the 3.1.1 JSON envelope so that
/// each output arrives with its message id.
fn enrich_route_config(upstream: &str) -> String {
    format!(
        r#"
gateway_id = "{ENRICH_GATEWAY}"

[handlers]
# Generous, so that no batch fails on a loaded machine: this test is about kills, not deadlines.
deadline_ms = 10000

[[upstream]]
name = "cloud"
url = "{upstream}"
envelope = true

[[module]]
name = "enrich"
path = "{path}"

[[route]]
name = "enriched"
filter = "telemetry/#"
handler = "enrich"
payload = "json"
"#,
        path = outpost::handlers::examples::guest_path("enrich").display()
    )
}

/// What the devices of the handler-route kill test publish: the sequence number and a
/// temperature for `enrich` to convert.
fn reading(seq: u64) -> String {
    format!(r#"{{"seq":{seq},"temp_c":{}}}"#, celsius(seq))
}

fn celsius(seq: u64) -> i64 {
    (seq % 120) as i64 - 20
}

/// `enrich`'s conversion: degrees Fahrenheit rounded to two decimals.
fn fahrenheit(celsius: i64) -> f64 {
    ((celsius as f64 * 9.0 / 5.0 + 32.0) * 100.0).round() / 100.0
}

/// A device's reading: the device and the sequence number.
type Reading = (String, u64);

/// One copy of an output as the upstream received it: its message id and its payload.
type Arrival = (String, Vec<u8>);

/// Everything the upstream received from the handler route, indexed by reading: each
/// (device, seq) with the message id and payload of every copy of it that arrived.
#[derive(Default)]
struct EnrichedUpstream {
    indexed: usize,
    copies: HashMap<Reading, Vec<Arrival>>,
}

impl EnrichedUpstream {
    /// Indexes the messages that arrived since the last call, checking that each is the
    /// handler's output for one reading: on `enriched/<device>`, with the device added and the
    /// temperature converted.
    fn catch_up(&mut self, received: &Received) {
        let all = received.all();
        for (topic, payload) in &all[self.indexed..] {
            let envelope: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|e| {
                panic!(
                    "not a JSON envelope ({e}): {}",
                    String::from_utf8_lossy(payload)
                )
            });
            let id = envelope["id"]
                .as_str()
                .unwrap_or_else(|| panic!("no message id: {envelope}"))
                .to_string();
            assert!(
                id.starts_with(&format!("{ENRICH_GATEWAY}-")) && id.contains("-enriched-"),
                "message id {id:?} is not <gateway>-<event>-<route>-<n>"
            );
            assert_eq!(envelope["topic"], topic.as_str(), "{envelope}");
            let device = topic
                .strip_prefix("enriched/")
                .unwrap_or_else(|| panic!("not a handler output: {topic}"));
            let output = &envelope["payload"];
            assert_eq!(output["device"], device, "enrich adds the device: {output}");
            let seq = output["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("no seq: {output}"));
            let temp_c = output["temp_c"]
                .as_i64()
                .unwrap_or_else(|| panic!("no temp_c: {output}"));
            assert_eq!(temp_c, celsius(seq), "{output}");
            assert_eq!(
                output["temp_f"].as_f64(),
                Some(fahrenheit(temp_c)),
                "enrich converts the temperature: {output}"
            );
            assert!(output["received_ms"].is_u64(), "{output}");
            self.copies
                .entry((device.to_string(), seq))
                .or_default()
                .push((id, payload.clone()));
        }
        self.indexed = all.len();
    }

    fn has(&self, device: &str, seq: u64) -> bool {
        self.copies.contains_key(&(device.to_string(), seq))
    }
}

/// Where the gateway's unfinished work stood, read from its database: device publishes not yet
/// routed, events queued for the handler lane, outputs not yet acknowledged upstream.
#[derive(Debug, Clone, Copy)]
struct Backlog {
    journal: u64,
    lane_queue: u64,
    outbox: u64,
}

impl Backlog {
    fn of(gateway: &Gateway) -> Backlog {
        let lane_queue = rusqlite::Connection::open_with_flags(
            gateway.data.join("outpost.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|conn| {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.query_row(
                "SELECT COUNT(*) FROM retries WHERE reason = 'queued'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map(|n| n as u64)
        .unwrap_or(0);
        Backlog {
            journal: gateway.journal_depth(),
            lane_queue,
            outbox: gateway.outbox_depth(),
        }
    }
}

/// SIGKILLs the gateway at a moment when `ready` (checked first, while it runs) holds and the
/// backlog it leaves is `wanted`: it is frozen (SIGSTOP) to look at its database, and thawed to
/// go on when the backlog is not yet the one wanted, so the kill leaves exactly the backlog it
/// was chosen for. Returns what each device saw acknowledged, once every device's connection is
/// gone (so no acknowledgement is still on its way), and the backlog as the kill left it.
async fn kill_when(
    gateway: &mut Gateway,
    devices: Vec<(String, CountingDevice)>,
    what: &str,
    ready: impl Fn(&[(String, CountingDevice)]) -> bool,
    wanted: impl Fn(&Backlog) -> bool,
) -> (Vec<(String, HashSet<u64>)>, Backlog) {
    eventually(what, || {
        if !ready(&devices) {
            return false;
        }
        gateway.freeze();
        if wanted(&Backlog::of(gateway)) {
            return true;
        }
        gateway.thaw();
        false
    })
    .await;
    gateway.kill();
    eventually("every device disconnected", || {
        devices.iter().all(|(_, d)| d.disconnected())
    })
    .await;
    let acked = devices
        .iter()
        .map(|(name, d)| (name.clone(), d.acked()))
        .collect();
    (acked, Backlog::of(gateway))
}

/// Nothing acknowledged is lost through a handler route either. Devices publish numbered
/// readings on a route that runs the real `enrich` component: the pipeline moves each event
/// from the journal to the module's durable lane queue, and the lane runs the handler and
/// commits its outputs to the outbox. The gateway is SIGKILLed twice while devices publish:
/// once with the upstream up (outputs mid-delivery), once with it down (outputs piling up).
/// Each kill is made while the gateway is frozen in a state where its database holds readings
/// in the journal (not yet routed) and in the lane queue (not yet handled), and outputs in the
/// outbox (handled, not yet known to be delivered). After the last restart, every reading a
/// device saw acknowledged must arrive upstream as `enrich`'s output for it. Duplicates are
/// allowed (at-least-once: a row the upstream acknowledged just before a kill is sent again),
/// but every output's message id is the same each time it is sent, so every copy of a reading
/// must carry the same message id and payload (the upstream can drop them); they are counted
/// and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_a_handler_route_loses_nothing_acknowledged() {
    const DEVICES: usize = 4;
    // Each device could publish this many; the kills come after KILL_AFTER_ACKS in all, so
    // devices are still publishing (and the gateway still working) when they come.
    const READINGS: u64 = 15_000;
    const KILL_AFTER_ACKS: usize = 10_000;
    let mut h = Harness::builder()
        .subscriber("enriched/#")
        .config_with(enrich_route_config)
        .build()
        .await;
    let start_devices = |port: u16, phase: &str| -> Vec<(String, CountingDevice)> {
        (0..DEVICES)
            .map(|d| {
                let name = format!("{phase}-{d}");
                let device = CountingDevice::start_with(port, &name, READINGS, reading);
                (name, device)
            })
            .collect()
    };
    let total_acked = |devices: &[(String, CountingDevice)]| -> usize {
        devices.iter().map(|(_, d)| d.acked().len()).sum()
    };
    let mut delivered = EnrichedUpstream::default();
    let mut acked: Vec<(String, HashSet<u64>)> = Vec::new();

    // Upstream up: killed while devices publish, with readings in the journal and in the lane
    // queue and outputs in the outbox, and outputs already flowing h.upstream.
    h.gateway.start();
    let devices = start_devices(h.gateway.port, "up");
    let (seen, left) = kill_when(
        &mut h.gateway,
        devices,
        "a backlog in the journal, the lane queue and the outbox (upstream up)",
        |devices| total_acked(devices) >= KILL_AFTER_ACKS && h.received.len() >= 1,
        |b| b.journal > 0 && b.lane_queue > 0 && b.outbox > 0,
    )
    .await;
    eprintln!(
        "upstream up: {} of {} readings acknowledged before SIGKILL, which left {left:?}; {} delivered so far",
        seen.iter().map(|(_, a)| a.len()).sum::<usize>(),
        DEVICES as u64 * READINGS,
        h.received.len()
    );
    acked.extend(seen);

    // Upstream down: the restarted gateway takes over the first kill's leftovers and new
    // readings, and its outputs pile up in the outbox until it is killed again.
    h.upstream.stop();
    h.gateway.start();
    let devices = start_devices(h.gateway.port, "down");
    let (seen, left) = kill_when(
        &mut h.gateway,
        devices,
        "a backlog in the journal, the lane queue and the outbox (upstream down)",
        |devices| total_acked(devices) >= KILL_AFTER_ACKS,
        |b| b.journal > 0 && b.lane_queue > 0 && b.outbox >= 500,
    )
    .await;
    eprintln!(
        "upstream down: {} of {} readings acknowledged before SIGKILL, which left {left:?}",
        seen.iter().map(|(_, a)| a.len()).sum::<usize>(),
        DEVICES as u64 * READINGS
    );
    acked.extend(seen);

    h.upstream.start();
    h.gateway.start();
    let acked_total: usize = acked.iter().map(|(_, a)| a.len()).sum();
    let missing = |delivered: &EnrichedUpstream| -> Vec<Reading> {
        let mut missing: Vec<Reading> = acked
            .iter()
            .flat_map(|(device, seqs)| seqs.iter().map(move |&seq| (device.clone(), seq)))
            .filter(|(device, seq)| !delivered.has(device, *seq))
            .collect();
        missing.sort();
        missing
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        delivered.catch_up(&h.received);
        let missing = missing(&delivered);
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {acked_total} acknowledged readings never arrived upstream, e.g. {:?}; \
             gateway backlog {:?}, dead letters {:?}",
            missing.len(),
            &missing[..missing.len().min(10)],
            Backlog::of(&h.gateway),
            h.gateway.dead_letters()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("outbox and lane queue drained", || {
        let backlog = Backlog::of(&h.gateway);
        backlog.outbox == 0 && backlog.lane_queue == 0 && backlog.journal == 0
    })
    .await;
    delivered.catch_up(&h.received);

    assert_eq!(h.gateway.dead_letters(), HashMap::new(), "no event failed");
    let mut resent = 0;
    for ((device, seq), copies) in &delivered.copies {
        assert!(
            acked.iter().any(|(name, _)| name == device) && (1..=READINGS).contains(seq),
            "{device} #{seq} was never published"
        );
        let (id, payload) = &copies[0];
        for (other_id, other_payload) in &copies[1..] {
            assert_eq!(
                other_id, id,
                "{device} #{seq} arrived twice under different message ids"
            );
            assert_eq!(
                String::from_utf8_lossy(other_payload),
                String::from_utf8_lossy(payload),
                "{device} #{seq} arrived twice with different payloads"
            );
        }
        resent += copies.len() - 1;
    }
    let ids: HashSet<&String> = delivered
        .copies
        .values()
        .map(|copies| &copies[0].0)
        .collect();
    assert_eq!(
        ids.len(),
        delivered.copies.len(),
        "two readings share a message id"
    );
    eprintln!(
        "upstream received {} messages: {} distinct readings ({acked_total} acknowledged), {resent} duplicates (same id, sent again)",
        h.received.len(),
        delivered.copies.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .upstream_arg()
        .start()
        .await;

    // A raw MQTT 3.1.1 CONNECT with keep-alive 0, then a QoS 1 publish, over a plain socket.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", h.gateway.port))
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
    eventually("the publish upstream", || h.received.len() == 1).await;
    assert!(h.gateway.is_running());
}
