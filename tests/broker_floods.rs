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

use std::time::Duration;

use common::mqtt::{Client, Publish, Version};
use common::Harness;

/// The service unit's memory limit (`MemoryMax=256M` in packaging/debian/outpost.service).
const MEMORY_MAX_MIB: f64 = 256.0;

/// How long a read may wait for a packet the broker owes (generous: a slow shared machine
/// journaling hundreds of megabytes).
const PATIENCE: Duration = Duration::from_secs(120);

const GATEWAY: &str = "gw-flood";

/// The gateway alone (no upstream), its `[broker]` table `broker`, metrics every 200 ms.
fn start(broker: &str) -> Harness {
    Harness::builder()
        .config(&format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[handlers]\nmetrics_interval_ms = 200\n"
        ))
        .start_blocking()
}

/// A clean-session client that waits as long as a flood may take.
fn client(port: u16, version: Version, client_id: &str) -> Client {
    let mut client = Client::clean(port, version, client_id);
    client.set_wait(PATIENCE);
    client
}

/// A publish as bytes, ready to be sent again and again.
fn publish(version: Version, topic: &str, qos: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    Publish::new(topic, payload).qos(qos).id(id).encode(version)
}

/// The gateway's metrics, as a client subscribed to them for the whole test reads them
/// (one subscription of its own, counted in `broker_subscriptions`).
struct Metrics(Client);

impl Metrics {
    fn subscribe(port: u16) -> Metrics {
        let mut reader = client(port, Version::V4, "metrics-reader");
        reader.subscribe(&format!("outpost/{GATEWAY}/metrics"), 0);
        Metrics(reader)
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
            let snapshot = self.0.expect_publish();
            let m: serde_json::Value =
                serde_json::from_slice(&snapshot.payload).expect("metrics JSON");
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
    let h = start("");
    let gateway = &h.gateway;
    let mut flooder = client(gateway.port, Version::V4, "flooder");
    const FLOOD: u64 = 1500;
    let flood = publish(Version::V4, "flood/x", 0, 0, &[b'x'; 200_000]);
    for _ in 0..FLOOD {
        flooder.send_raw(&flood);
    }
    // Publishes are journaled in order: once the last one's PUBACK comes, all are.
    flooder.send_raw(&publish(Version::V4, "flood/end", 1, 1, b"end"));
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
    let h = start("");
    let gateway = &h.gateway;
    let mut metrics = Metrics::subscribe(gateway.port);
    // The gateway's own (its control planes') and the metrics reader's.
    let base = counter(&metrics.settled(), "broker_subscriptions");
    for (version, count, refused) in [
        (Version::V5, 50_000usize, 0x97u8),
        (Version::V4, 2_000, 0x80),
    ] {
        let mut greedy = client(gateway.port, version, &format!("greedy-{}", version.tag()));
        let mut codes = Vec::new();
        let filters: Vec<String> = (0..count).map(|i| format!("s/{i}/+/#")).collect();
        for chunk in filters.chunks(500) {
            let chunk: Vec<(&str, u8)> = chunk.iter().map(|f| (f.as_str(), 1)).collect();
            codes.extend(greedy.subscribe_with(&chunk, &[]));
        }
        assert_eq!(codes.len(), count);
        let granted = codes.iter().filter(|c| **c == 1).count();
        assert_eq!(granted, 1000, "the per-client quota ({version:?})");
        assert!(
            codes[1000..].iter().all(|c| *c == refused),
            "quota exceeded for the rest ({version:?})"
        );
        // Someone else is not starved by it.
        let mut other = client(gateway.port, version, &format!("other-{}", version.tag()));
        other.subscribe("o/#", 1);
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
    let h = start("");
    let gateway = &h.gateway;
    let mut device = client(gateway.port, Version::V5, "retainer");
    let payload = vec![b'r'; 100_000];
    const RETAINED: u16 = 2000;
    // A window of 50 unacknowledged publishes (under the broker's Receive Maximum of 100).
    for id in 1..=RETAINED {
        let retained = Publish::new(&format!("r/{id}"), payload.clone())
            .qos(1)
            .id(id)
            .retain();
        device.send_raw(&retained.encode(Version::V5));
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
    let mut late = client(gateway.port, Version::V4, "late");
    late.subscribe("r/#", 1);
    let mut topics = std::collections::HashSet::new();
    while (topics.len() as u64) < kept {
        let message = late.receive();
        assert!(message.retain, "the retain flag on {}", message.topic);
        assert!(
            topics.insert(message.topic.clone()),
            "{} twice",
            message.topic
        );
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
    let h = start("");
    let gateway = &h.gateway;
    const STALLED: usize = 40;
    let stalled: Vec<Client> = (0..STALLED)
        .map(|i| {
            let mut sub = client(gateway.port, Version::V5, &format!("stalled-{i}"));
            sub.subscribe(&format!("fan/{i}"), 1);
            sub
        })
        .collect();
    let mut reader = client(gateway.port, Version::V4, "reader");
    reader.subscribe("ok/#", 1);
    let mut metrics = Metrics::subscribe(gateway.port);

    let mut device = client(gateway.port, Version::V4, "fanner");
    let payload = vec![b'f'; 100_000];
    let mut id = 0u16;
    for _round in 0..60 {
        for i in 0..STALLED {
            id += 1;
            device.send_raw(&publish(Version::V4, &format!("fan/{i}"), 1, id, &payload));
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
    device.send_raw(&publish(Version::V4, "ok/1", 1, 1, b"still here"));
    assert_eq!(reader.receive().payload, b"still here");
    // Once they are gone, what they held is given back.
    drop(stalled);
    metrics.until("their messages given back", |m| {
        counter(m, "broker_queued_bytes") == 0
    });
}
