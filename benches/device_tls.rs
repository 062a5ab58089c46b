//! Device TLS against plain TCP on the gateway's broker, in one run on one machine: how many
//! device publishes per second the gateway acknowledges (PUBACK after the journal commit), and
//! how long a device takes to connect (TCP, the TLS handshake, CONNECT and CONNACK).
//!
//! One gateway runs in this process with a plain listener and a TLS listener (`[broker.tls]`:
//! an ECDSA P-256 server certificate, client certificates required, the CN as username; rustls
//! with ring, TLS 1.3). Runs alternate between the two (`OUTPOST_DEVICE_TLS_BENCH_RUNS` pairs,
//! default 5). In each, `OUTPOST_DEVICE_TLS_BENCH_DEVICES` devices (default 10) publish
//! `OUTPOST_DEVICE_TLS_BENCH_MESSAGES` QoS 1 publishes of 100 bytes in all (default 50,000),
//! each keeping 100 unacknowledged, to topics no route takes (journaled, acknowledged, then
//! dropped as unrouted: the device side only, no upstream); each run starts once the journal is
//! empty. Then `..._CONNECTS` devices (default 200) connect one after the other. Medians over
//! the runs are reported.
//!
//! The devices are hand-written MQTT 3.1.1 clients over tokio's TCP or tokio-rustls (rumqttc's
//! TLS features are not enabled in this project: they pull crates with RustSec advisories),
//! in the same process as the gateway, so they share its two cores.
//!
//! `cargo bench --bench device_tls`. Not a test: it never fails on a slow machine.

mod common;
#[path = "../tests/common/pki.rs"]
mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::{env_number, free_port, median, percentile};

use outpost::config::{BrokerTlsConfig, Config};
use outpost::gateway::Gateway;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WINDOW: u64 = 100;
const PAYLOAD_BYTES: usize = 100;

/// An MQTT string or binary field.
fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A packet: its first byte, the remaining length, the body.
fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// How a device reaches the gateway.
#[derive(Clone)]
enum Dial {
    Plain(SocketAddr),
    Tls(SocketAddr, Arc<rustls::ClientConfig>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Dial {
    /// Connects and logs in (3.1.1, clean session); returns the stream once CONNACK came.
    async fn connect(&self, client_id: &str) -> Box<dyn Stream> {
        let mut stream: Box<dyn Stream> = match self {
            Dial::Plain(addr) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                Box::new(tcp)
            }
            Dial::Tls(addr, config) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                Box::new(
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .unwrap(),
                )
            }
        };
        let mut body = Vec::new();
        put(&mut body, b"MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]);
        put(&mut body, client_id.as_bytes());
        stream.write_all(&packet(0x10, &body)).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "{client_id}: CONNACK");
        stream
    }
}

/// Publishes `count` QoS 1 messages, `WINDOW` unacknowledged at most, until every PUBACK came.
async fn publish(mut stream: Box<dyn Stream>, device: usize, count: u64) {
    let topic = format!("bench/device-{device}/data");
    let payload = vec![b'x'; PAYLOAD_BYTES];
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut input = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while acked < count {
        while sent < count && sent - acked < WINDOW {
            let mut body = Vec::with_capacity(topic.len() + PAYLOAD_BYTES + 4);
            put(&mut body, topic.as_bytes());
            body.extend_from_slice(&((sent % 65_535) as u16 + 1).to_be_bytes());
            body.extend_from_slice(&payload);
            out.extend_from_slice(&packet(0x32, &body));
            sent += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out).await.unwrap();
            out.clear();
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "device {device}: the gateway closed the connection");
        input.extend_from_slice(&chunk[..n]);
        // Only PUBACKs come (4 bytes each): count the whole ones.
        let whole = input.len() / 4 * 4;
        for ack in input[..whole].chunks_exact(4) {
            assert_eq!(ack[0], 0x40, "device {device}: expected PUBACK");
            acked += 1;
        }
        input.drain(..whole);
    }
}

/// One load run: acknowledged publishes per second, from the release of the connected devices
/// to the last PUBACK.
async fn load(dial: &Dial, devices: usize, messages: u64, run: &str) -> f64 {
    let mut streams = Vec::new();
    for device in 0..devices {
        streams.push(dial.connect(&format!("{run}-{device}")).await);
    }
    let share = messages / devices as u64;
    let start = Instant::now();
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(device, stream)| tokio::spawn(publish(stream, device, share)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (share * devices as u64) as f64 / start.elapsed().as_secs_f64()
}

/// Connect times in ms, one device after the other.
async fn connects(dial: &Dial, count: u64, run: &str) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..count {
        let start = Instant::now();
        let stream = dial.connect(&format!("{run}-connect-{i}")).await;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        drop(stream);
    }
    times
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_file(dir.join("device.pem")).unwrap()],
        PrivateKeyDer::from_pem_file(dir.join("device.key")).unwrap(),
    )
    .unwrap();
    Arc::new(config)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: then one tiny run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (runs, devices, messages, connect_count) = if quick {
        (1, 2, 200, 5)
    } else {
        (
            env_number("OUTPOST_DEVICE_TLS_BENCH_RUNS", 5),
            env_number("OUTPOST_DEVICE_TLS_BENCH_DEVICES", 10) as usize,
            env_number("OUTPOST_DEVICE_TLS_BENCH_MESSAGES", 50_000),
            env_number("OUTPOST_DEVICE_TLS_BENCH_CONNECTS", 200),
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir).unwrap();
        let ca = pki::Ca::new("bench device ca");
        pki::write_file(&pki_dir.join("ca.pem"), &ca.pem(), 0o644);
        let server = ca.leaf("gateway", &["localhost"], false, pki::Validity::Valid);
        pki::write_leaf(&pki_dir, "server", &server);
        let device = ca.leaf("bench-device", &[], true, pki::Validity::Valid);
        pki::write_leaf(&pki_dir, "device", &device);

        let (plain_port, tls_port) = (free_port(), free_port());
        let mut config = Config {
            gateway_id: "bench-device-tls".to_string(),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.broker.listen = vec![SocketAddr::from(([127, 0, 0, 1], plain_port))];
        config.broker.tls = Some(BrokerTlsConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], tls_port))],
            certfile: pki_dir.join("server.pem"),
            keyfile: pki_dir.join("server.key"),
            cafile: Some(pki_dir.join("ca.pem")),
            crlfile: None,
            require_certificate: true,
            use_identity_as_username: true,
        });
        config.handlers.metrics_interval_ms = 0;
        let gateway = Gateway::start(config).await.unwrap();

        let dials = [
            (
                "plain TCP",
                Dial::Plain(([127, 0, 0, 1], plain_port).into()),
            ),
            (
                "TLS 1.3",
                Dial::Tls(([127, 0, 0, 1], tls_port).into(), client_config(&pki_dir)),
            ),
        ];
        let mut rates = [Vec::new(), Vec::new()];
        let mut times = [Vec::new(), Vec::new()];
        for run in 0..runs {
            for (index, (name, dial)) in dials.iter().enumerate() {
                // Each run starts with the previous one's publishes out of the journal, so
                // that neither mode pays for the other's.
                while gateway.store.journal_depth() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                let tag = format!("r{run}m{index}");
                let rate = load(dial, devices, messages, &tag).await;
                let mut connect = connects(dial, connect_count, &tag).await;
                println!(
                    "run {run} {name:<9}: {rate:8.0} acknowledged msg/s, connect median {:6.2} ms",
                    median(&mut connect)
                );
                rates[index].push(rate);
                times[index].extend(connect);
            }
        }
        let plain_rate = median(&mut rates[0].clone());
        // Each TLS run against the plain run just before it: what the machine's other load
        // does to both cancels out.
        let mut paired: Vec<f64> = rates[1]
            .iter()
            .zip(&rates[0])
            .map(|(tls, plain)| tls / plain * 100.0)
            .collect();
        println!(
            "\n{devices} devices, {messages} QoS 1 publishes of {PAYLOAD_BYTES} bytes per run \
             ({WINDOW} in flight each), {runs} run(s) per mode, medians; connects one at a \
             time, {connect_count} per run:"
        );
        for (index, (name, _)) in dials.iter().enumerate() {
            let rate = median(&mut rates[index]);
            println!(
                "{name:<9}: {rate:8.0} acknowledged msg/s ({:5.1} % of plain), connect (TCP, \
                 handshake, CONNECT/CONNACK) median {:6.2} ms, p99 {:6.2} ms",
                rate / plain_rate * 100.0,
                median(&mut times[index]),
                percentile(&mut times[index], 0.99)
            );
        }
        println!(
            "TLS run / plain run before it: median {:5.1} %",
            median(&mut paired)
        );
        gateway.shutdown().await;
    });
}
