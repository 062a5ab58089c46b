//! Issue 13's floods, as an unfriendly device (or a fleet by accident) would send them: each
//! once took the gateway behind rumqttd far beyond the service unit's `MemoryMax=256M`. Here
//! each runs against the real gateway over real sockets and must leave its peak resident
//! memory (VmHWM) under 256 MiB, hit the bound the configuration names (counted), and leave
//! the broker serving everyone else.
//!
//! Before the bounds: a QoS 0 flood of 200 KB publishes reached 5.9 GB; 50,000 subscriptions
//! from one client added 300 MB; 2,000 retained messages of 100 KB added 360 MB; subscribers
//! that stop reading held whatever was published to them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{write_config, Gateway};

/// The service unit's memory limit (`MemoryMax=256M` in packaging/debian/outpost.service).
const MEMORY_MAX_MIB: f64 = 256.0;

/// How long a read may wait for a packet the broker owes (generous: a slow shared machine
/// journaling hundreds of megabytes).
const PATIENCE: Duration = Duration::from_secs(120);

const GATEWAY: &str = "gw-flood";

fn config(dir: &std::path::Path, broker: &str) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[handlers]\nmetrics_interval_ms = 200\n"
        ),
    )
}

fn start(dir: &std::path::Path, broker: &str) -> Gateway {
    let config = config(dir, broker);
    let mut gateway = Gateway::new(dir, &["--config", config.to_str().expect("utf-8 path")]);
    gateway.start();
    gateway
}

/// A raw MQTT connection (the floods need control a client library does not give: no
/// reading at all, pipelining without limit).
struct Raw {
    stream: TcpStream,
    v5: bool,
}

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Raw {
    /// Connects with a clean session and waits for the CONNACK.
    fn connect(port: u16, client_id: &str, v5: bool) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut raw = Raw { stream, v5 };
        let mut body = Vec::new();
        string(&mut body, "MQTT");
        body.extend_from_slice(&[if v5 { 5 } else { 4 }, 0x02, 0, 0]);
        if v5 {
            body.push(0);
        }
        string(&mut body, client_id);
        raw.send(&packet(0x10, &body));
        let (byte1, connack) = raw.read();
        assert_eq!(byte1, 0x20, "CONNACK for {client_id}");
        assert_eq!(connack[1], 0, "{client_id} accepted");
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the broker");
    }

    /// The next packet: its first byte and its body.
    fn read(&mut self) -> (u8, Vec<u8>) {
        let mut byte1 = [0u8; 1];
        self.stream.read_exact(&mut byte1).expect("a packet");
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).expect("remaining length");
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).expect("a packet body");
        (byte1[0], body)
    }

    fn publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        packet_id: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::with_capacity(payload.len() + topic.len() + 8);
        string(&mut body, topic);
        if qos > 0 {
            body.extend_from_slice(&packet_id.to_be_bytes());
        }
        if self.v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        packet(0x30 | (qos << 1) | u8::from(retain), &body)
    }

    /// SUBSCRIBEs to `filters` at QoS 1 in one packet; returns the SUBACK's codes.
    fn subscribe(&mut self, packet_id: u16, filters: &[String]) -> Vec<u8> {
        let mut body = packet_id.to_be_bytes().to_vec();
        if self.v5 {
            body.push(0);
        }
        for filter in filters {
            string(&mut body, filter);
            body.push(1);
        }
        self.send(&packet(0x82, &body));
        loop {
            let (byte1, body) = self.read();
            if byte1 == 0x90 {
                assert_eq!(body[..2], packet_id.to_be_bytes(), "SUBACK's packet id");
                let codes = if self.v5 {
                    let props = usize::from(body[2]);
                    &body[3 + props..]
                } else {
                    &body[2..]
                };
                return codes.to_vec();
            }
        }
    }

    /// Reads until the PUBACK for `packet_id` (other packets are skipped).
    fn wait_puback(&mut self, packet_id: u16) {
        loop {
            let (byte1, body) = self.read();
            if byte1 == 0x40 && body[..2] == packet_id.to_be_bytes() {
                return;
            }
        }
    }
}

/// The gateway's metrics, as a client subscribed to them for the whole test reads them
/// (one subscription of its own, counted in `broker_subscriptions`).
struct Metrics(Raw);

impl Metrics {
    fn subscribe(port: u16) -> Metrics {
        let mut raw = Raw::connect(port, "metrics-reader", false);
        let topic = format!("outpost/{GATEWAY}/metrics");
        assert_eq!(raw.subscribe(1, &[topic]), vec![1]);
        Metrics(raw)
    }

    /// The snapshot after ten more (two seconds of the gateway's time at one every 200 ms):
    /// its gauges, refreshed every second, count everything done before this call.
    fn settled(&mut self) -> serde_json::Value {
        let mut seen = 0;
        self.until("ten snapshots", |_| {
            seen += 1;
            seen > 10
        })
    }

    /// Reads snapshots (one every 200 ms) until `check` holds for one, and returns it.
    fn until(
        &mut self,
        what: &str,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let (byte1, body) = self.0.read();
            if byte1 & 0xF0 != 0x30 {
                continue;
            }
            let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let m: serde_json::Value =
                serde_json::from_slice(&body[2 + len..]).expect("metrics JSON");
            if check(&m) {
                return m;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: last metrics {m}"
            );
        }
    }
}

fn counter(m: &serde_json::Value, name: &str) -> u64 {
    m[name]
        .as_u64()
        .unwrap_or_else(|| panic!("metric {name} in {m}"))
}

/// One device floods QoS 0 publishes of 200 KB as fast as its socket takes them (300 MB in
/// all). The front stops reading from it while `broker.max_unjournaled_bytes` wait for the
/// journal, so memory stays flat; every publish is still journaled (none dropped: QoS 0 from
/// a device is backpressure, not loss).
#[test]
fn a_qos0_flood_of_large_payloads_stays_under_the_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(dir.path(), "");
    let mut flooder = Raw::connect(gateway.port, "flooder", false);
    let payload = vec![b'x'; 200_000];
    const FLOOD: u64 = 1500;
    let publish = flooder.publish("flood/x", 0, false, 0, &payload);
    for _ in 0..FLOOD {
        flooder.send(&publish);
    }
    // Publishes are journaled in order: once the last one's PUBACK comes, all are.
    let last = flooder.publish("flood/end", 1, false, 1, b"end");
    flooder.send(&last);
    flooder.wait_puback(1);
    let peak = gateway.peak_rss_mib();
    assert!(
        peak < MEMORY_MAX_MIB,
        "peak RSS {peak:.0} MiB under a QoS 0 flood"
    );
    // None routed (no route takes flood/#): each is counted once the pipeline has read it.
    Metrics::subscribe(gateway.port).until("every publish journaled and routed", |m| {
        counter(m, "unrouted") == FLOOD + 1
    });
}

/// One client asks for 50,000 subscriptions: it gets `broker.max_subscriptions_per_client`
/// (1,000 by default) and "quota exceeded" for the rest (0x97 on MQTT 5, 0x80 on 3.1.1); the
/// broker's count returns to what others hold once it leaves, and other clients can still
/// subscribe meanwhile.
#[test]
fn fifty_thousand_subscriptions_from_one_client_get_the_quota_and_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(dir.path(), "");
    let mut metrics = Metrics::subscribe(gateway.port);
    // The gateway's own (its control planes') and the metrics reader's.
    let base = counter(&metrics.settled(), "broker_subscriptions");
    for (v5, count, refused) in [(true, 50_000usize, 0x97u8), (false, 2_000, 0x80)] {
        let mut greedy = Raw::connect(gateway.port, &format!("greedy-{v5}"), v5);
        let mut codes = Vec::new();
        let filters: Vec<String> = (0..count).map(|i| format!("s/{i}/+/#")).collect();
        for (n, chunk) in filters.chunks(500).enumerate() {
            codes.extend(greedy.subscribe(n as u16 + 1, chunk));
        }
        assert_eq!(codes.len(), count);
        let granted = codes.iter().filter(|c| **c == 1).count();
        assert_eq!(granted, 1000, "the per-client quota (v5: {v5})");
        assert!(
            codes[1000..].iter().all(|c| *c == refused),
            "quota exceeded for the rest (v5: {v5})"
        );
        // Someone else is not starved by it.
        let mut other = Raw::connect(gateway.port, &format!("other-{v5}"), v5);
        assert_eq!(other.subscribe(1, &["o/#".to_string()]), vec![1]);
        // 1,000 of its own and one of the other client.
        metrics.until("the greedy client's subscriptions counted", |m| {
            counter(m, "broker_subscriptions") == base + 1001
        });
        drop(greedy);
        drop(other);
        metrics.until("its subscriptions freed after it left", |m| {
            counter(m, "broker_subscriptions") == base
        });
    }
    let peak = gateway.peak_rss_mib();
    assert!(peak < MEMORY_MAX_MIB, "peak RSS {peak:.0} MiB");
}

/// 2,000 retained messages of 100 KB (200 MB): the broker keeps what fits in
/// `broker.max_retained_bytes` (32 MiB), counts the rest as refused (each is still
/// delivered, just not retained), and a new subscriber then gets every one it kept.
#[test]
fn a_retained_flood_is_bounded_and_a_new_subscriber_gets_every_kept_one() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(dir.path(), "");
    let mut device = Raw::connect(gateway.port, "retainer", true);
    let payload = vec![b'r'; 100_000];
    const RETAINED: u16 = 2000;
    // A window of 50 unacknowledged publishes (under the broker's Receive Maximum of 100).
    for id in 1..=RETAINED {
        let publish = device.publish(&format!("r/{id}"), 1, true, id, &payload);
        device.send(&publish);
        if id > 50 {
            device.wait_puback(id - 50);
        }
    }
    for id in RETAINED - 49..=RETAINED {
        device.wait_puback(id);
    }
    let m = Metrics::subscribe(gateway.port).until("the retained flood counted", |m| {
        counter(m, "broker_retained_messages") + counter(m, "broker_retained_refused")
            == u64::from(RETAINED)
    });
    let kept = counter(&m, "broker_retained_messages");
    assert!(
        kept > 0 && kept < u64::from(RETAINED),
        "kept {kept}: the byte bound held"
    );
    assert!(
        counter(&m, "broker_retained_bytes") <= 32 * 1024 * 1024,
        "{m}"
    );

    // A new subscriber gets every kept one, with the retain flag, each topic once: more than
    // its queue holds at once (max_queued_messages 1000 by default with these), paced by
    // its acknowledgements.
    let mut late = Raw::connect(gateway.port, "late", false);
    assert_eq!(late.subscribe(1, &["r/#".to_string()]), vec![1]);
    let mut topics = std::collections::HashSet::new();
    while (topics.len() as u64) < kept {
        let (byte1, body) = late.read();
        if byte1 & 0xF0 != 0x30 {
            continue;
        }
        assert_eq!(byte1 & 0x01, 1, "the retain flag");
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
        assert!(topics.insert(topic.clone()), "{topic} twice");
        let packet_id = [body[2 + len], body[3 + len]];
        late.send(&packet(0x40, &packet_id));
    }
    let peak = gateway.peak_rss_mib();
    assert!(
        peak < MEMORY_MAX_MIB,
        "peak RSS {peak:.0} MiB after 2,000 retained x 100 KB"
    );
}

/// 40 local subscribers that stop reading (a hung HMI, a stalled historian), each on its own
/// topic so that nothing is shared between them, while a device publishes 60 messages of
/// 100 KB to each (240 MB). Each session's own bounds would let them hold it all (a queue
/// of 8 MiB plus 100 unacknowledged in flight each); `broker.max_queued_bytes_total` bounds
/// them together: the rest is dropped and counted, memory stays under the limit, and a
/// subscriber that reads still gets its messages.
#[test]
fn subscribers_that_stop_reading_hold_no_more_than_the_total_bound() {
    let dir = tempfile::tempdir().unwrap();
    let gateway = start(dir.path(), "");
    const STALLED: usize = 40;
    let stalled: Vec<Raw> = (0..STALLED)
        .map(|i| {
            let mut sub = Raw::connect(gateway.port, &format!("stalled-{i}"), true);
            assert_eq!(sub.subscribe(1, &[format!("fan/{i}")]), vec![1]);
            sub
        })
        .collect();
    let mut reader = Raw::connect(gateway.port, "reader", false);
    assert_eq!(reader.subscribe(1, &["ok/#".to_string()]), vec![1]);
    let mut metrics = Metrics::subscribe(gateway.port);

    let mut device = Raw::connect(gateway.port, "fanner", false);
    let payload = vec![b'f'; 100_000];
    let mut id = 0u16;
    for _round in 0..60 {
        for i in 0..STALLED {
            id += 1;
            let publish = device.publish(&format!("fan/{i}"), 1, false, id, &payload);
            device.send(&publish);
        }
        // Acknowledged in order: wait for this round's last before the next round (a window
        // of at most 40 unacknowledged).
        device.wait_puback(id);
    }
    let m = metrics.until("the total bound hit", |m| {
        counter(m, "broker_dropped_total_full") > 0
    });
    assert!(
        counter(&m, "broker_queued_bytes") <= 64 * 1024 * 1024,
        "held within broker.max_queued_bytes_total: {m}"
    );
    let peak = gateway.peak_rss_mib();
    assert!(
        peak < MEMORY_MAX_MIB,
        "peak RSS {peak:.0} MiB with {STALLED} stalled subscribers"
    );

    // The broker still serves a subscriber that reads.
    let publish = device.publish("ok/1", 1, false, 1, b"still here");
    device.send(&publish);
    loop {
        let (byte1, body) = reader.read();
        if byte1 & 0xF0 == 0x30 {
            assert!(body.ends_with(b"still here"));
            let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            reader.send(&packet(0x40, &body[2 + len..4 + len]));
            break;
        }
    }
    // Once they are gone, what they held is given back.
    drop(stalled);
    metrics.until("their messages given back", |m| {
        counter(m, "broker_queued_bytes") == 0
    });
}
