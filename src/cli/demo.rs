//! `outpost demo`: the real gateway, the example handlers, simulated devices at real
//! coordinates and a stand-in upstream broker behind a link that the demo cuts and restores.
//!
//! The stand-in upstream is a second embedded broker; between the gateway and it sits a TCP
//! relay that the demo switches off (closing every connection and refusing new ones) to
//! simulate an outage. Everything the upstream receives is counted, and the summary checks that
//! every event the devices had acknowledged reached the upstream or became a dead letter.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use outpost::config::{
    BrokerConfig, Config, ModuleConfig, PayloadFormat, RouteConfig, UpstreamConfig,
};
use outpost::edge::{DevicePublish, Edge};
use outpost::gateway::Gateway;
use outpost::metrics::Metrics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const CITIES: &str = include_str!("../../demo/cities.csv");

/// One simulated device.
struct Device {
    slug: String,
    lat: f64,
    lon: f64,
}

fn devices(count: usize) -> Vec<Device> {
    CITIES
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            let name = fields.next()?;
            let lat = fields.next()?.parse().ok()?;
            let lon = fields.next()?.parse().ok()?;
            let slug = name
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            Some(Device { slug, lat, lon })
        })
        .take(count)
        .collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the stand-in upstream has received.
#[derive(Default)]
struct Upstream {
    enriched: Mutex<HashSet<(String, u64)>>,
    enriched_total: AtomicU64,
    alerts: AtomicU64,
    other: AtomicU64,
}

/// The flags of `outpost demo`, with their defaults. The doc comments of the fields are the
/// flags' help texts.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seconds of each phase (before, during and after the outage).
    #[arg(long, default_value_t = 6)]
    pub phase_secs: u64,
    /// Number of simulated devices (at most the number of cities known).
    #[arg(long, default_value_t = 12)]
    pub devices: usize,
}

/// Runs the demo and prints its summary; fails if the gateway cannot start or the stand-in
/// upstream cannot listen.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let devices = devices(options.devices.max(1));
    let phase = Duration::from_secs(options.phase_secs.max(1));
    let data = tempfile_dir()?;
    std::fs::write(
        data.join("enrich.wasm"),
        outpost::handlers::examples::ENRICH,
    )?;
    std::fs::write(
        data.join("threshold.wasm"),
        outpost::handlers::examples::THRESHOLD,
    )?;

    // The stand-in upstream: a second embedded broker whose every received publish we count.
    let upstream_port = free_port()?;
    let (upstream_tx, upstream_rx) = mpsc::channel(8192);
    let mut upstream_edge = Edge::start(
        &BrokerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], upstream_port))],
            ..BrokerConfig::default()
        },
        upstream_tx,
        Arc::new(Metrics::default()),
    )?;
    let upstream = Arc::new(Upstream::default());
    tokio::spawn(count_upstream(upstream_rx, upstream.clone()));

    // The link the demo cuts: a TCP relay between the gateway and the upstream.
    let relay_port = free_port()?;
    let (link_up, link_rx) = watch::channel(true);
    let relay = TcpListener::bind(("127.0.0.1", relay_port)).await?;
    tokio::spawn(run_relay(relay, upstream_port, link_rx));

    let gateway_port = free_port()?;
    let config = Config {
        gateway_id: "demo-gw".into(),
        data_dir: data.join("state"),
        broker: BrokerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], gateway_port))],
            ..BrokerConfig::default()
        },
        upstreams: vec![UpstreamConfig {
            name: "cloud".into(),
            url: format!("mqtt://127.0.0.1:{relay_port}"),
            reconnect_max_ms: 1000,
            ..UpstreamConfig::default()
        }],
        modules: vec![
            ModuleConfig {
                name: "enrich".into(),
                path: Some(data.join("enrich.wasm")),
            },
            ModuleConfig {
                name: "threshold".into(),
                path: Some(data.join("threshold.wasm")),
            },
        ],
        routes: vec![
            RouteConfig {
                handler: Some("enrich".into()),
                topic: Some("site/{gateway}/{output}".into()),
                payload: PayloadFormat::Json,
                ..RouteConfig::new("enrich", "telemetry/+/env")
            },
            RouteConfig {
                handler: Some("threshold".into()),
                topic: Some("site/{gateway}/{output}".into()),
                payload: PayloadFormat::Json,
                ..RouteConfig::new("alerts", "telemetry/+/env")
            },
        ],
        ..Config::default()
    };
    println!("outpost demo");
    println!("  gateway   mqtt://127.0.0.1:{gateway_port}  (devices publish telemetry/<city>/env, QoS 1)");
    println!("  upstream  mqtt://127.0.0.1:{upstream_port}  (stand-in cloud broker, reached through a link the demo cuts)");
    println!("  handlers  enrich (unit conversion + device id), threshold (alert with hysteresis, state in SQLite)");
    println!(
        "  devices   {} at real coordinates: {}",
        devices.len(),
        devices
            .iter()
            .map(|d| d.slug.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  data      {}", data.display());
    println!();

    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    let metrics = gateway.metrics.clone();
    let store = gateway.store.clone();

    let (stop_devices, stop_rx) = watch::channel(false);
    let acked = Arc::new(AtomicU64::new(0));
    let mut device_tasks = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        device_tasks.push(tokio::spawn(simulate_device(
            device,
            i,
            gateway_port,
            acked.clone(),
            stop_rx.clone(),
        )));
    }

    let started = Instant::now();
    let progress = |label: &str| {
        let m = metrics.snapshot();
        let depth = store.outbox_depth(None).unwrap_or(0);
        let link = if m.links_connected.values().all(|up| *up) {
            "up  "
        } else {
            "DOWN"
        };
        println!(
            "{:>5.1}s  {label:<9} link {link}  published {:>5}  handled {:>5}  queued {:>5}  outbox {:>5}  delivered {:>5}  dead letters {:>3}",
            started.elapsed().as_secs_f64(),
            acked.load(Ordering::Relaxed),
            m.received,
            m.queued,
            depth,
            m.delivered,
            m.dead_lettered,
        );
    };
    let tick = Duration::from_secs(1);
    for (label, up) in [("normal", true), ("OUTAGE", false), ("restored", true)] {
        if link_up.send(up).is_err() {
            bail!("the relay stopped");
        }
        let until = Instant::now() + phase;
        while Instant::now() < until {
            tokio::time::sleep(tick).await;
            progress(label);
        }
    }
    let _ = stop_devices.send(true);
    for task in device_tasks {
        task.await??;
    }
    let published = acked.load(Ordering::Relaxed);

    // Drain: wait until the gateway has handled every publish and the outbox is empty.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m = metrics.snapshot();
        let depth = store.outbox_depth(None)?;
        progress("draining");
        if m.received >= published && depth == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the outbox did not drain within 60 s ({depth} rows left)");
        }
    }
    // Let the last deliveries reach the counter.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.shutdown().await;
    upstream_edge.stop();

    let letters = store.dead_letters(&outpost::store::DeadLetterFilter::default(), 1_000_000)?;
    let dead_enrich = letters
        .iter()
        .filter(|d| d.letter.route == "enrich")
        .count() as u64;
    let unique = upstream
        .enriched
        .lock()
        .map(|s| s.len() as u64)
        .unwrap_or(0);
    let total = upstream.enriched_total.load(Ordering::Relaxed);
    println!();
    println!("summary");
    println!("  published by devices (acknowledged)   {published}");
    println!(
        "  enriched readings delivered upstream  {unique} ({} duplicate deliveries)",
        total - unique
    );
    println!(
        "  dead letters on the enrich route      {dead_enrich} (malformed payloads: not JSON)"
    );
    println!(
        "  alerts delivered upstream             {}",
        upstream.alerts.load(Ordering::Relaxed)
    );
    println!("  dead letters in all                   {}", letters.len());
    println!(
        "  outbox left                           {}",
        store.outbox_depth(None)?
    );
    if let Some(letter) = letters.first() {
        println!(
            "  a dead letter: route {} module {} reason {}: {}",
            letter.letter.route,
            letter.letter.module.as_deref().unwrap_or("-"),
            letter.letter.reason,
            letter.letter.detail
        );
    }
    if published == unique + dead_enrich {
        println!(
            "  check: published {published} = delivered {unique} + dead letters {dead_enrich}  OK"
        );
        Ok(())
    } else {
        bail!("published {published} != delivered {unique} + dead letters {dead_enrich}")
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn count_upstream(mut rx: mpsc::Receiver<DevicePublish>, upstream: Arc<Upstream>) {
    while let Some(publish) = rx.recv().await {
        if publish.topic.contains("/enriched/") {
            upstream.enriched_total.fetch_add(1, Ordering::Relaxed);
            let reading: serde_json::Value =
                serde_json::from_slice(&publish.payload).unwrap_or_default();
            let device = reading["device"].as_str().unwrap_or_default().to_string();
            let seq = reading["seq"].as_u64().unwrap_or(u64::MAX);
            if let Ok(mut seen) = upstream.enriched.lock() {
                seen.insert((device, seq));
            }
        } else if publish.topic.contains("/alerts/") {
            upstream.alerts.fetch_add(1, Ordering::Relaxed);
        } else {
            upstream.other.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Relays TCP connections to the upstream while `up` is true; when it turns false, closes
/// every relayed connection and refuses new ones.
async fn run_relay(listener: TcpListener, upstream_port: u16, up: watch::Receiver<bool>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        if !*up.borrow() {
            drop(inbound);
            continue;
        }
        let mut up = up.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                return;
            };
            let mut inbound = inbound;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = up.wait_for(|up| !*up) => {}
            }
        });
    }
}

/// Publishes a reading every 250 ms until told to stop; counts the readings the gateway
/// acknowledged. Every 40th reading of the first device is malformed on purpose.
async fn simulate_device(
    device: Device,
    index: usize,
    port: u16,
    acked: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut options = MqttOptions::new(format!("demo-{}", device.slug), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let acks = acked.clone();
    let outstanding = Arc::new(AtomicU64::new(0));
    let outstanding_loop = outstanding.clone();
    let driver = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                    outstanding_loop.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let topic = format!("telemetry/{}/env", device.slug);
    // A smooth daily-ish curve per city, crossing the alert threshold in the warmer ones.
    let base = 18.0 + (index % 5) as f64 * 3.5;
    let mut seq: u64 = 0;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    while !*stop.borrow() {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        seq += 1;
        let payload = if index == 0 && seq.is_multiple_of(40) {
            b"temperature=hot".to_vec()
        } else {
            let temp_c = base + 8.0 * ((seq as f64) / 12.0).sin();
            serde_json::to_vec(&serde_json::json!({
                "seq": seq,
                "temp_c": (temp_c * 10.0).round() / 10.0,
                "lat": device.lat,
                "lon": device.lon,
            }))?
        };
        outstanding.fetch_add(1, Ordering::Relaxed);
        client
            .publish(&topic, QoS::AtLeastOnce, false, payload)
            .await?;
    }
    // Wait for the last acknowledgements.
    let deadline = Instant::now() + Duration::from_secs(10);
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    driver.abort();
    Ok(())
}
