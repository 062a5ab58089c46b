//! The uplink with TLS against plain TCP, in one run on one machine: how fast a queued backlog
//! drains to a real Mosquitto, and how long from the gateway's start (connect, TLS handshake
//! included) to the first delivery.
//!
//! Each run: a gateway queues `OUTPOST_TLS_BENCH_MESSAGES` readings (default 50,000) with its
//! upstream unreachable and stops; it is started again on the same data directory with the
//! upstream reachable, over plain TCP or over mutual TLS (client certificate, ECDSA P-256, the
//! server's certificate checked against a CA file; rustls with ring, TLS 1.3), both to the same
//! Mosquitto (one plain and one TLS listener). A subscriber on Mosquitto's plain listener
//! times the first and the last arrival. Runs alternate between the two modes
//! (`OUTPOST_TLS_BENCH_RUNS` pairs, default 5) and the medians are reported.
//!
//! `cargo bench --bench uplink_tls` (needs Mosquitto: `apt-get install mosquitto`). Results
//! are in BENCHMARKS.md, "TLS on the uplink". Not a test: it never fails on a slow machine.

mod common;
#[path = "../tests/common/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost::config::{Config, MqttVersion, UpstreamConfig};
use outpost::gateway::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use common::{env_number, free_port, median, wait_for_port};

/// Mosquitto with a plain listener and a TLS listener requiring a client certificate.
struct Upstream {
    plain: u16,
    tls: u16,
    child: Child,
}

impl Upstream {
    fn start(dir: &Path) -> Upstream {
        let (plain, tls) = (free_port(), free_port());
        let mut conf = format!(
            "per_listener_settings true\nlistener {plain} 127.0.0.1\nallow_anonymous true\n\
             max_queued_messages 0\nmax_inflight_messages 0\n"
        );
        if Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        {
            conf.push_str("user root\n");
        }
        conf.push_str(&pki::tls_listener(tls, dir, true));
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        wait_for_port(plain, Duration::from_secs(30));
        wait_for_port(tls, Duration::from_secs(30));
        Upstream { plain, tls, child }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Arrival times of the upstream subscriber.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Instant>>>);

impl Arrivals {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

async fn subscribe(port: u16, id: &str, topic: &str) -> (Arrivals, tokio::task::JoinHandle<()>) {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client.subscribe(topic, QoS::AtMostOnce).await.unwrap();
    let arrivals = Arrivals::default();
    let sink = arrivals.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready = Some(ready_tx);
    let task = tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    sink.0.lock().unwrap().push(Instant::now())
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    ready_rx.await.unwrap();
    (arrivals, task)
}

fn config(data: &Path, listen: u16, upstream: UpstreamConfig) -> Config {
    let mut config = Config {
        gateway_id: "bench-tls".to_string(),
        data_dir: data.to_path_buf(),
        ..Config::default()
    };
    config.broker.listen = vec![format!("127.0.0.1:{listen}").parse().unwrap()];
    config.handlers.metrics_interval_ms = 0;
    config.upstreams = vec![UpstreamConfig {
        name: "cloud".to_string(),
        reconnect_min_ms: 50,
        reconnect_max_ms: 200,
        protocol: MqttVersion::V5,
        ..upstream
    }];
    config
}

/// Queues `messages` readings with the upstream unreachable.
async fn fill(data: &Path, messages: u64, topic: &str) {
    let listen = free_port();
    let dead = UpstreamConfig {
        url: format!("mqtt://127.0.0.1:{}", free_port()),
        ..UpstreamConfig::default()
    };
    let gateway = Gateway::start(config(data, listen, dead)).await.unwrap();
    let mut options = MqttOptions::new("bench-device", "127.0.0.1", listen);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(options, 512);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = acked.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let payload = format!("{{\"temp_c\":21.5,\"pad\":\"{}\"}}", "x".repeat(150));
    for _ in 0..messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    while acked.load(std::sync::atomic::Ordering::Relaxed) < messages {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = || {
        gateway
            .store
            .outbox_depth(None)
            .map(|d| d >= messages)
            .unwrap_or(false)
    };
    while !queued() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    driver.abort();
    gateway.shutdown().await;
}

/// One timed drain: (time from start to the first arrival, delivered messages per second).
async fn drain(
    data: &Path,
    messages: u64,
    upstream: UpstreamConfig,
    arrivals: &Arrivals,
) -> (Duration, f64) {
    let before = arrivals.count();
    let start = Instant::now();
    let gateway = Gateway::start(config(data, free_port(), upstream))
        .await
        .unwrap();
    let target = before + messages as usize;
    let deadline = Instant::now() + Duration::from_secs(600);
    while arrivals.count() < target {
        assert!(Instant::now() < deadline, "the drain stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (first, last) = {
        let times = arrivals.0.lock().unwrap();
        (times[before], times[target - 1])
    };
    gateway.shutdown().await;
    let rate = (messages - 1) as f64 / (last - first).as_secs_f64();
    (first - start, rate)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: then do one tiny run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let messages = if quick {
        200
    } else {
        env_number("OUTPOST_TLS_BENCH_MESSAGES", 50_000)
    };
    let runs = if quick {
        1
    } else {
        env_number("OUTPOST_TLS_BENCH_RUNS", 5)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir: PathBuf = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir).unwrap();
        let ca = pki::Ca::new("bench ca");
        pki::write_file(&pki_dir.join("ca.pem"), &ca.pem(), 0o644);
        pki::write_leaf(
            &pki_dir,
            "server",
            &ca.leaf("upstream", &["localhost"], false, pki::Validity::Valid),
        );
        pki::write_leaf(
            &pki_dir,
            "client",
            &ca.leaf("bench-gateway", &[], true, pki::Validity::Valid),
        );
        let upstream = Upstream::start(&pki_dir);
        let (arrivals, _subscriber) = subscribe(upstream.plain, "bench-sub", "telemetry/#").await;
        let plain = UpstreamConfig {
            url: format!("mqtt://127.0.0.1:{}", upstream.plain),
            ..UpstreamConfig::default()
        };
        let tls = UpstreamConfig {
            url: format!("mqtts://localhost:{}", upstream.tls),
            cafile: Some(pki_dir.join("ca.pem")),
            certfile: Some(pki_dir.join("client.pem")),
            keyfile: Some(pki_dir.join("client.key")),
            ..UpstreamConfig::default()
        };
        let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> =
            vec![("plain TCP", Vec::new(), Vec::new()), ("mutual TLS", Vec::new(), Vec::new())];
        for run in 0..runs {
            for (index, upstream) in [&plain, &tls].into_iter().enumerate() {
                let data = dir.path().join(format!("run-{run}-{index}"));
                fill(&data, messages, "telemetry/bench/env").await;
                let (first, rate) = drain(&data, messages, upstream.clone(), &arrivals).await;
                println!(
                    "run {run} {:<10}: first delivery {:7.1} ms after start, {:8.0} msg/s",
                    results[index].0,
                    first.as_secs_f64() * 1000.0,
                    rate
                );
                results[index].1.push(first.as_secs_f64() * 1000.0);
                results[index].2.push(rate);
                let _ = std::fs::remove_dir_all(&data);
            }
        }
        let plain_rate = median(&mut results[0].2.clone());
        println!("\n{messages} queued messages of 180 bytes per run, {runs} run(s) per mode, medians:");
        for (name, firsts, rates) in &mut results {
            let rate = median(rates);
            println!(
                "{name:<10}: delivered {rate:8.0} msg/s ({:5.1} % of plain), first delivery {:6.1} ms after start",
                rate / plain_rate * 100.0,
                median(firsts)
            );
        }
    });
}
