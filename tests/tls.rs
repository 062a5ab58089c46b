//! The uplink over TLS against real peers: Debian's Mosquitto with TLS listeners (one requiring
//! a client certificate, one with a password file), certificates made here with rcgen, and,
//! for ALPN, which Mosquitto 2.0 does not do, a TLS front in this process (rustls, like AWS IoT
//! Core's port 443: it accepts only the ALPN protocols it knows) relaying to Mosquitto.
//!
//! Each failure (unknown CA, refused client certificate, refused password, expired or
//! not-yet-valid or wrongly named server certificate, no common ALPN protocol) must leave the
//! rows queued, say its cause in the log and the metrics, and, once fixed (new files on disk,
//! SIGHUP, or the upstream fixed), deliver everything complete and in order without a restart
//! of the gateway.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::pki::{tls_listener, write_file, write_leaf, Ca, Leaf, Validity};
use common::{eventually, Device, Gateway, Mosquitto, Subscriber};
use rcgen::{CertificateParams, DnType, KeyPair};

/// Writes a Mosquitto password file with one user.
fn write_mosquitto_passwords(dir: &Path, user: &str, password: &str) {
    let path = dir.join("passwords");
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&path)
        .args([user, password])
        .status()
        .expect("run mosquitto_passwd (apt-get install mosquitto)");
    assert!(status.success());
}

fn wait_for_port(port: u16) {
    common::net::wait_for_port(port, common::PATIENCE);
}

/// Mosquitto in `dir` with `listeners` added to its configuration, started, once each of
/// `tls_ports` listens too; and a subscriber `sub` on `telemetry/#` on its plain port.
async fn upstream_with(dir: &Path, listeners: &str, tls_ports: &[u16]) -> (Mosquitto, Subscriber) {
    let mut mosquitto = Mosquitto::with_config(dir, listeners);
    mosquitto.start();
    for &port in tls_ports {
        wait_for_port(port);
    }
    let subscriber = Subscriber::connect(mosquitto.port, "sub", "telemetry/#").await;
    (mosquitto, subscriber)
}

/// Mosquitto in `dir` with a TLS listener on a free port (the files of `dir`, see
/// [`tls_listener`]), started, and a subscriber `sub` on `telemetry/#` on its plain port; and
/// the TLS port.
async fn tls_upstream(dir: &Path, require_certificate: bool) -> (Mosquitto, u16, Subscriber) {
    let port = common::free_port();
    let listener = tls_listener(port, dir, require_certificate);
    let (mosquitto, subscriber) = upstream_with(dir, &listener, &[port]).await;
    (mosquitto, port, subscriber)
}

/// The CA `upstream ca` in `dir/ca.pem`, and the server's certificate from it for `hosts`,
/// valid as `validity` says, in `dir/server.pem` and `dir/server.key` (see [`tls_listener`]).
fn upstream_pki(dir: &Path, hosts: &[&str], validity: Validity) -> Ca {
    let ca = Ca::new("upstream ca");
    write_file(&dir.join("ca.pem"), &ca.pem(), 0o644);
    write_leaf(dir, "server", &ca.leaf("upstream", hosts, false, validity));
    ca
}

/// An upstream that requires a client certificate: [`upstream_pki`] in `dir` for `hosts`,
/// valid as `validity` says, the gateway's client certificate (`gw`, from the same CA) in
/// `dir/client.pem` and `dir/client.key`, and [`tls_upstream`] on them.
async fn mtls_upstream(
    dir: &Path,
    hosts: &[&str],
    validity: Validity,
) -> (Ca, Mosquitto, u16, Subscriber) {
    let ca = upstream_pki(dir, hosts, validity);
    write_leaf(dir, "client", &ca.leaf("gw", &[], true, Validity::Valid));
    let (mosquitto, port, subscriber) = tls_upstream(dir, true).await;
    (ca, mosquitto, port, subscriber)
}

/// The gateway's upstream table for `mqtts://<host>:<port>` with the CA of `ca.pem` and the
/// client certificate of `client.pem` and `client.key`, then `extra`.
fn mtls_table(host: &str, port: u16, extra: &str) -> String {
    format!(
        "url = \"mqtts://{host}:{port}\"\ncafile = \"ca.pem\"\ncertfile = \"client.pem\"\nkeyfile = \"client.key\"\n{extra}"
    )
}

/// The upstream's operator replaces its server certificate: Mosquitto is stopped, the new one
/// written, and Mosquitto started again.
fn renew_server_certificate(mosquitto: &mut Mosquitto, dir: &Path, leaf: &Leaf) {
    mosquitto.stop();
    write_leaf(dir, "server", leaf);
    mosquitto.start();
}

/// The gateway's configuration: one upstream `cloud` with `upstream` as the rest of its table,
/// metrics every 200 ms, quick reconnects.
fn gateway(dir: &Path, id: &str, upstream: &str) -> Gateway {
    let config = common::write_config(
        dir,
        &format!(
            "gateway_id = \"{id}\"\n\n[handlers]\nmetrics_interval_ms = 200\n\n\
             [[upstream]]\nname = \"cloud\"\nreconnect_min_ms = 100\nreconnect_max_ms = 400\n{upstream}\n"
        ),
    );
    let config = config.display().to_string();
    Gateway::new(dir, &["--config", &config])
}

/// [`gateway`] `gw` in `dir`, started, and a reader of its metrics.
async fn tls_gateway(dir: &Path, upstream: &str) -> (Gateway, Metrics) {
    let mut gw = gateway(dir, "gw", upstream);
    gw.start();
    let metrics = Metrics::connect(&gw).await;
    (gw, metrics)
}

/// The gateway's published metrics, newest last.
struct Metrics(Subscriber);

impl Metrics {
    async fn connect(gateway: &Gateway) -> Metrics {
        Metrics(Subscriber::connect(gateway.port, "metrics-reader", "outpost/+/metrics").await)
    }

    fn link(&self) -> serde_json::Value {
        self.0
            .received
            .all()
            .last()
            .and_then(|(_, payload)| serde_json::from_slice::<serde_json::Value>(payload).ok())
            .map(|m| m["links"]["cloud"].clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until the link's last error has this cause label.
    async fn wait_for_cause(&self, cause: &str) -> serde_json::Value {
        eventually(&format!("the metrics show the cause {cause}"), || {
            self.link()["last_error_cause"] == cause
        })
        .await;
        self.link()
    }
}

/// Publishes `count` readings `{"seq": n}` on `telemetry/<device>/env` and waits for their
/// PUBACKs (the journal has them).
async fn publish(gateway: &Gateway, device: &str, from: u64, count: u64) -> Device {
    let client = Device::connect(gateway.port, device).await;
    for seq in from..from + count {
        client
            .publish(
                &format!("telemetry/{device}/env"),
                format!("{{\"seq\":{seq}}}"),
            )
            .await;
    }
    client.wait_acked(count).await;
    client
}

/// The sequence numbers received for `device`, in arrival order.
fn seqs(received: &common::Received, device: &str) -> Vec<u64> {
    let topic = format!("telemetry/{device}/env");
    received
        .all()
        .into_iter()
        .filter(|(t, _)| *t == topic)
        .map(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(&p).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Every sequence number of `range` arrived, and in order (a repeat of one already received
/// is a duplicate, which at-least-once allows; it does not count as disorder).
fn assert_complete_in_order(got: &[u64], range: std::ops::Range<u64>) {
    let mut seen = HashSet::new();
    let firsts: Vec<u64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
    let expected: Vec<u64> = range.collect();
    assert_eq!(firsts, expected, "complete and in order");
}

/// Waits until `n` readings of device `d1` are upstream, and checks that `0..n` arrived
/// complete and in order.
async fn delivered_in_order(received: &common::Received, n: u64) {
    eventually(&format!("{n} messages upstream"), || {
        received.len() >= n as usize
    })
    .await;
    assert_complete_in_order(&seqs(received, "d1"), 0..n);
}

/// Waits until the outbox holds `n` rows: what was acknowledged waits for the upstream.
async fn wait_queued(gateway: &Gateway, n: u64) {
    eventually(&format!("{n} rows queued in the outbox"), || {
        gateway.outbox_depth() == n
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Delivery

/// mTLS and TLS with a password, each on MQTT 3.1.1 and 5, by host name (SNI and DNS name
/// check) and by IP address (the certificate's IP SAN): everything delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_passwords_deliver_on_both_protocols() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let ca = Ca::new("test ca");
    write_file(&pki.join("ca.pem"), &ca.pem(), 0o644);
    write_leaf(
        &pki,
        "server",
        &ca.leaf(
            "upstream",
            &["localhost", "127.0.0.1"],
            false,
            Validity::Valid,
        ),
    );
    write_mosquitto_passwords(&pki, "gateway", "s3cret pass");
    let (mtls_port, password_port) = (common::free_port(), common::free_port());
    let listeners = format!(
        "{}{}",
        tls_listener(mtls_port, &pki, true),
        tls_listener(password_port, &pki, false)
    );
    let (mut mosquitto, subscriber) =
        upstream_with(tmp.path(), &listeners, &[mtls_port, password_port]).await;

    let cases = [
        ("mtls-v311", "localhost", mtls_port, "3.1.1"),
        ("mtls-v5", "127.0.0.1", mtls_port, "5"),
        ("password-v311", "127.0.0.1", password_port, "3.1.1"),
        ("password-v5", "localhost", password_port, "5"),
    ];
    let mut gateways = Vec::new();
    for (id, host, port, protocol) in cases {
        let dir = tmp.path().join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(pki.join("ca.pem"), dir.join("ca.pem")).unwrap();
        let credentials = if id.starts_with("mtls") {
            write_leaf(&dir, "client", &ca.leaf(id, &[], true, Validity::Valid));
            "certfile = \"client.pem\"\nkeyfile = \"client.key\"\n".to_string()
        } else {
            write_file(&dir.join("password"), "s3cret pass\n", 0o600);
            "username = \"gateway\"\npassword_file = \"password\"\n".to_string()
        };
        let mut gw = gateway(
            &dir,
            id,
            &format!(
                "url = \"mqtts://{host}:{port}\"\ncafile = \"ca.pem\"\nprotocol = \"{protocol}\"\n{credentials}"
            ),
        );
        gw.start();
        gateways.push((id, gw));
    }
    let mut devices = Vec::new();
    for (id, gw) in &gateways {
        devices.push(publish(gw, id, 0, 100).await);
    }
    eventually("400 messages upstream", || subscriber.received.len() >= 400).await;
    for (id, gw) in &gateways {
        assert_complete_in_order(&seqs(&subscriber.received, id), 0..100);
        assert!(
            gw.log().contains("tls=true"),
            "{id} connected with TLS:\n{}",
            gw.log()
        );
    }
    // The client certificate's CN is the user name Mosquitto saw (its log reaches the file
    // when it exits).
    mosquitto.stop();
    let log = mosquitto.log();
    assert!(log.contains("u'mtls-v311'"), "{log}");
    assert!(log.contains("u'mtls-v5'"), "{log}");
    assert!(log.contains("u'gateway'"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Failures: the rows wait, the cause is said, and once fixed everything arrives

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ca_waits_then_delivers_when_the_cafile_is_fixed_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let other = Ca::new("some other ca");
    let dir = tmp.path();
    let (ca, _mosquitto, port, subscriber) =
        mtls_upstream(dir, &["localhost"], Validity::Valid).await;

    // The gateway trusts the wrong CA.
    write_file(&dir.join("gateway-ca.pem"), &other.pem(), 0o644);
    let (mut gw, metrics) = tls_gateway(
        dir,
        &format!(
            "url = \"mqtts://localhost:{port}\"\ncafile = \"gateway-ca.pem\"\ncertfile = \"client.pem\"\nkeyfile = \"client.key\"\n"
        ),
    )
    .await;
    let _device = publish(&gw, "d1", 0, 50).await;
    let link = metrics.wait_for_cause("tls-unknown-ca").await;
    assert!(
        link["last_error"]
            .as_str()
            .unwrap()
            .contains("not signed by a trusted CA"),
        "{link}"
    );
    assert_eq!(link["connected"], false);
    wait_queued(&gw, 50).await;
    let log = gw.log();
    assert!(
        log.contains("link=cloud") && log.contains("not signed by a trusted CA"),
        "{log}"
    );
    assert_eq!(subscriber.received.len(), 0);

    // The operator puts the right CA in place; the gateway sees it on disk.
    write_file(&dir.join("gateway-ca.pem"), &ca.pem(), 0o644);
    delivered_in_order(&subscriber.received, 50).await;
    assert!(
        gw.log().contains("credential files reloaded"),
        "{}",
        gw.log()
    );
    assert!(gw.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_certificate_waits_then_delivers_after_sighup_with_a_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rogue = Ca::new("a ca the upstream does not trust");
    let dir = tmp.path();
    let ca = upstream_pki(dir, &["127.0.0.1"], Validity::Valid);
    let (_mosquitto, port, subscriber) = tls_upstream(dir, true).await;

    write_leaf(dir, "client", &rogue.leaf("gw", &[], true, Validity::Valid));
    let (gw, metrics) =
        tls_gateway(dir, &mtls_table("127.0.0.1", port, "protocol = \"5\"\n")).await;
    let _device = publish(&gw, "d1", 0, 40).await;
    let link = metrics
        .wait_for_cause("tls-client-certificate-refused")
        .await;
    assert!(
        link["last_error"]
            .as_str()
            .unwrap()
            .contains("refused this gateway's client certificate"),
        "{link}"
    );
    wait_queued(&gw, 40).await;
    assert_eq!(subscriber.received.len(), 0);

    // A certificate from the right CA, put in place and announced with SIGHUP (the files
    // are rewritten in the order a careless tool would: the key first, then the certificate,
    // with a SIGHUP between: the mismatched pair is refused and the old one kept).
    let good = ca.leaf("gw", &[], true, Validity::Valid);
    write_file(&dir.join("client.key"), &good.key, 0o600);
    gw.reload();
    eventually("the mismatched pair is refused", || {
        metrics.link()["credential_reload_failures"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        metrics.link()["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("does not match the certificate"),
        "{}",
        metrics.link()
    );
    assert!(gw.log().contains("keeps the ones it has"), "{}", gw.log());
    write_file(&dir.join("client.pem"), &good.cert, 0o644);
    gw.reload();
    delivered_in_order(&subscriber.received, 40).await;
    eventually("the reload is counted", || {
        metrics.link()["credential_reloads"].as_u64() >= Some(1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_password_waits_then_delivers_when_the_password_file_is_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    upstream_pki(dir, &["localhost"], Validity::Valid);
    write_mosquitto_passwords(dir, "gateway", "right");
    let (_mosquitto, port, subscriber) = tls_upstream(dir, false).await;

    write_file(&dir.join("password"), "wrong\n", 0o600);
    let (gw, metrics) = tls_gateway(
        dir,
        &format!(
            "url = \"mqtts://localhost:{port}\"\ncafile = \"ca.pem\"\nusername = \"gateway\"\npassword_file = \"password\"\n"
        ),
    )
    .await;
    let _device = publish(&gw, "d1", 0, 30).await;
    // Mosquitto 2.0 answers a wrong password with "not authorised" (0x05), not with "bad
    // user name or password" (0x04); both name the credentials to check.
    let link = metrics.wait_for_cause("not-authorized").await;
    assert!(
        link["last_error"]
            .as_str()
            .unwrap()
            .contains("check the credentials"),
        "{link}"
    );
    wait_queued(&gw, 30).await;

    write_file(&dir.join("password"), "right\n", 0o600);
    delivered_in_order(&subscriber.received, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_not_yet_valid_server_certificates_wait_then_deliver_once_renewed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ca, mut mosquitto, port, subscriber) =
        mtls_upstream(dir, &["localhost"], Validity::Expired).await;

    let (gw, metrics) =
        tls_gateway(dir, &mtls_table("localhost", port, "protocol = \"5\"\n")).await;
    let _device = publish(&gw, "d1", 0, 20).await;
    let link = metrics.wait_for_cause("tls-expired").await;
    assert!(
        link["last_error"].as_str().unwrap().contains("expired on"),
        "{link}"
    );

    // The upstream's operator renews it, too early.
    renew_server_certificate(
        &mut mosquitto,
        dir,
        &ca.leaf("upstream", &["localhost"], false, Validity::NotYetValid),
    );
    let link = metrics.wait_for_cause("tls-not-yet-valid").await;
    assert!(
        link["last_error"]
            .as_str()
            .unwrap()
            .contains("not valid yet"),
        "{link}"
    );
    wait_queued(&gw, 20).await;
    let failures = &link["failures"];
    assert!(failures["tls-expired"].as_u64() >= Some(1), "{link}");

    // And then properly: the gateway, never restarted, delivers.
    renew_server_certificate(
        &mut mosquitto,
        dir,
        &ca.leaf("upstream", &["localhost"], false, Validity::Valid),
    );
    delivered_in_order(&subscriber.received, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_name_waits_then_delivers_once_the_certificate_names_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ca, mut mosquitto, port, subscriber) =
        mtls_upstream(dir, &["broker.example.com"], Validity::Valid).await;

    // By IP address: the certificate has no IP SAN for it.
    let (gw, metrics) = tls_gateway(dir, &mtls_table("127.0.0.1", port, "")).await;
    let _device = publish(&gw, "d1", 0, 20).await;
    let link = metrics.wait_for_cause("tls-wrong-host").await;
    let said = link["last_error"].as_str().unwrap().to_string();
    assert!(
        said.contains("127.0.0.1") && said.contains("broker.example.com"),
        "{said}"
    );
    wait_queued(&gw, 20).await;

    renew_server_certificate(
        &mut mosquitto,
        dir,
        &ca.leaf(
            "upstream",
            &["broker.example.com", "127.0.0.1"],
            false,
            Validity::Valid,
        ),
    );
    delivered_in_order(&subscriber.received, 20).await;
}

/// A TLS front for Mosquitto's plain listener that, like AWS IoT Core on port 443, accepts
/// only the ALPN protocols it is told (and then relays the connection to `upstream`). It
/// records the protocol each connection negotiated.
struct AlpnFront {
    port: u16,
    accepted: Arc<Mutex<Vec<Vec<u8>>>>,
    negotiated: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl AlpnFront {
    async fn start(leaf: &Leaf, upstream: u16, accepted: &[&str]) -> AlpnFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(Mutex::new(
            accepted
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect::<Vec<_>>(),
        ));
        let negotiated = Arc::new(Mutex::new(Vec::new()));
        let (protocols, seen) = (accepted.clone(), negotiated.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())
                .unwrap();
                config.alpn_protocols = protocols.lock().unwrap().clone();
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let protocol = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default();
                    seen.lock().unwrap().push(protocol);
                    let address: SocketAddr = ([127, 0, 0, 1], upstream).into();
                    let Ok(mut plain) = tokio::net::TcpStream::connect(address).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        AlpnFront {
            port,
            accepted,
            negotiated,
            task,
        }
    }
}

impl Drop for AlpnFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_offered_and_no_common_protocol_waits_then_delivers_once_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("upstream ca");
    let dir = tmp.path();
    write_file(&dir.join("ca.pem"), &ca.pem(), 0o644);
    let (mosquitto, subscriber) = upstream_with(dir, "", &[]).await;
    let server = ca.leaf("iot", &["localhost"], false, Validity::Valid);
    // AWS IoT Core's protocol for certificates on port 443; the gateway offers "mqtt".
    let front = AlpnFront::start(&server, mosquitto.port, &["x-amzn-mqtt-ca"]).await;

    let (gw, metrics) = tls_gateway(
        dir,
        &format!(
            "url = \"mqtts://localhost:{}\"\ncafile = \"ca.pem\"\nalpn = [\"mqtt\"]\n",
            front.port
        ),
    )
    .await;
    let _device = publish(&gw, "d1", 0, 25).await;
    let link = metrics.wait_for_cause("tls-no-common-alpn").await;
    assert!(
        link["last_error"].as_str().unwrap().contains("mqtt"),
        "{link}"
    );
    wait_queued(&gw, 25).await;
    assert_eq!(subscriber.received.len(), 0);

    // The upstream starts accepting "mqtt" too.
    front.accepted.lock().unwrap().push(b"mqtt".to_vec());
    delivered_in_order(&subscriber.received, 25).await;
    assert_eq!(
        front.negotiated.lock().unwrap().last().map(String::as_str),
        Some("mqtt")
    );
    drop(gw);

    // A gateway configured as for AWS IoT Core negotiates x-amzn-mqtt-ca.
    let dir2 = dir.join("aws");
    std::fs::create_dir_all(&dir2).unwrap();
    std::fs::copy(dir.join("ca.pem"), dir2.join("ca.pem")).unwrap();
    let mut gw2 = gateway(
        &dir2,
        "gw2",
        &format!(
            "url = \"mqtts://localhost:{}\"\ncafile = \"ca.pem\"\nalpn = [\"x-amzn-mqtt-ca\"]\nprotocol = \"5\"\n",
            front.port
        ),
    );
    gw2.start();
    let _device2 = publish(&gw2, "d2", 0, 10).await;
    eventually("10 more messages upstream", || {
        seqs(&subscriber.received, "d2").len() >= 10
    })
    .await;
    assert!(front
        .negotiated
        .lock()
        .unwrap()
        .iter()
        .any(|p| p == "x-amzn-mqtt-ca"));
}

// ---------------------------------------------------------------------------------------------
// Rotation

/// Certificates rotated while readings flow: files that do not load are refused (the link
/// keeps its connection and its old files), a good pair is taken without a restart, and once
/// the upstream trusts only the new certificate's CA, delivery goes on: nothing lost, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old client ca");
    let new_ca = Ca::new("new client ca");
    let server_ca = Ca::new("server ca");
    let dir = tmp.path();
    // Mosquitto trusts both client CAs during the rotation.
    write_file(
        &dir.join("ca.pem"),
        &format!("{}{}", old_ca.pem(), new_ca.pem()),
        0o644,
    );
    write_file(&dir.join("server-ca.pem"), &server_ca.pem(), 0o644);
    write_leaf(
        dir,
        "server",
        &server_ca.leaf("upstream", &["localhost"], false, Validity::Valid),
    );
    write_leaf(
        dir,
        "client",
        &old_ca.leaf("gw", &[], true, Validity::Valid),
    );
    let (mut mosquitto, port, subscriber) = tls_upstream(dir, true).await;

    let (gw, metrics) = tls_gateway(
        dir,
        &format!(
            "url = \"mqtts://localhost:{port}\"\ncafile = \"server-ca.pem\"\ncertfile = \"client.pem\"\nkeyfile = \"client.key\"\nprotocol = \"5\"\ninflight = 20\n"
        ),
    )
    .await;

    // Readings flow until the rotation is over (at most MAX of them, paced so that the
    // rotation happens while they flow).
    const MAX: u64 = 40_000;
    let device = Device::connect(gw.port, "d1").await;
    let publisher = device.handle();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop_flag, count) = (stop.clone(), published.clone());
    let load = tokio::spawn(async move {
        for seq in 0..MAX {
            if stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            publisher
                .publish(
                    "telemetry/d1/env",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("{{\"seq\":{seq}}}"),
                )
                .await
                .unwrap();
            count.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
            if seq % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let sent = || published.load(std::sync::atomic::Ordering::Relaxed);
    eventually("deliveries under way", || {
        subscriber.received.len() >= 500 && metrics.link()["connected"] == true
    })
    .await;
    let connects_before = metrics.link()["connects"].as_u64().unwrap();

    // A certificate file that does not parse: refused, the old files stay in use.
    write_file(
        &dir.join("client.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
        0o644,
    );
    gw.reload();
    eventually("the garbage is refused", || {
        metrics.link()["credential_reload_failures"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        metrics.link()["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("client.pem"),
        "{}",
        metrics.link()
    );
    assert_eq!(
        metrics.link()["connects"].as_u64(),
        Some(connects_before),
        "a refused reload does not even reconnect"
    );
    // The new pair, key first (the pair in between does not match and is refused too).
    let new = new_ca.leaf("gw", &[], true, Validity::Valid);
    write_file(&dir.join("client.key"), &new.key, 0o600);
    write_file(&dir.join("client.pem"), &new.cert, 0o644);
    gw.reload();
    let sent_at_rotation = sent();
    eventually("the new pair is taken", || {
        metrics.link()["credential_reloads"].as_u64() >= Some(1)
    })
    .await;
    eventually("reconnected with it", || {
        metrics.link()["connects"].as_u64() > Some(connects_before)
            && metrics.link()["connected"] == true
    })
    .await;

    // The rotation drained the window before reconnecting: nothing was sent twice (the
    // PUBACK of every row in flight arrived before the old connection closed).
    let before_restart = subscriber.received.len();
    eventually("deliveries go on with the new certificate", || {
        subscriber.received.len() >= before_restart + 300
    })
    .await;
    let so_far = seqs(&subscriber.received, "d1");
    let unique = so_far.iter().collect::<HashSet<_>>().len();
    assert_eq!(unique, so_far.len(), "no duplicate from the rotation");

    // The upstream now trusts only the new CA: the old certificate would be refused.
    mosquitto.stop();
    write_file(&dir.join("ca.pem"), &new_ca.pem(), 0o644);
    mosquitto.start();
    let received_after_restart = subscriber.received.len();
    eventually("deliveries go on after the upstream's restart", || {
        subscriber.received.len() >= received_after_restart + 500
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let total = sent();
    assert!(
        sent_at_rotation < total && total < MAX,
        "readings flowed through the rotation: {sent_at_rotation} of {total} sent at the reload"
    );
    device.wait_acked(total).await;
    eventually("every reading upstream", || {
        seqs(&subscriber.received, "d1")
            .into_iter()
            .collect::<HashSet<_>>()
            .len()
            >= total as usize
    })
    .await;
    let got = seqs(&subscriber.received, "d1");
    assert_complete_in_order(&got, 0..total);
    println!(
        "{total} readings, {} deliveries ({} duplicates, from the upstream's restart)",
        got.len(),
        got.len() as u64 - total
    );
    eventually("an empty outbox", || gw.outbox_depth() == 0).await;
    assert_eq!(
        metrics.link()["failures"]["tls-client-certificate-refused"],
        serde_json::Value::Null,
        "the old certificate was never used after the rotation: {}",
        metrics.link()
    );
}

// ---------------------------------------------------------------------------------------------
// config check

fn outpost(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `config check` on an upstream table; returns success and what it printed.
fn check(dir: &Path, upstream: &str) -> (bool, String) {
    let path: PathBuf = common::write_config(
        dir,
        &format!("[[upstream]]\nname = \"cloud\"\n{upstream}\n"),
    );
    outpost(&["config", "check", path.to_str().unwrap()])
}

fn openssl(args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl (apt-get install openssl)");
    assert!(status.success(), "openssl {args:?}");
}

#[test]
fn config_check_names_what_is_wrong_with_tls_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("ca");
    write_file(&dir.join("ca.pem"), &ca.pem(), 0o644);
    let good = ca.leaf("gw", &[], true, Validity::Valid);
    write_leaf(dir, "client", &good);
    let tls = |extra: &str| {
        format!("url = \"mqtts://broker.example:8883\"\ncafile = \"ca.pem\"\n{extra}")
    };

    let (ok, out) = check(
        dir,
        &tls("certfile = \"client.pem\"\nkeyfile = \"client.key\"\n"),
    );
    assert!(ok, "{out}");

    let (ok, out) = check(
        dir,
        &tls("certfile = \"missing.pem\"\nkeyfile = \"client.key\"\n"),
    );
    assert!(!ok);
    assert!(
        out.contains("upstream \"cloud\".certfile") && out.contains("missing.pem"),
        "{out}"
    );

    let (ok, out) = check(dir, "url = \"mqtts://b:8883\"\ncafile = \".\"\n");
    assert!(!ok);
    assert!(
        out.contains("cafile") && out.contains("not a regular file"),
        "{out}"
    );

    write_file(&dir.join("junk.pem"), "not a certificate\n", 0o644);
    let (ok, out) = check(dir, "url = \"mqtts://b:8883\"\ncafile = \"junk.pem\"\n");
    assert!(!ok);
    assert!(out.contains("holds no usable certificate"), "{out}");

    let other = ca.leaf("other", &[], true, Validity::Valid);
    write_file(&dir.join("other.key"), &other.key, 0o600);
    let (ok, out) = check(
        dir,
        &tls("certfile = \"client.pem\"\nkeyfile = \"other.key\"\n"),
    );
    assert!(!ok);
    assert!(out.contains("does not match the certificate"), "{out}");

    write_file(&dir.join("open.key"), &good.key, 0o644);
    let (ok, out) = check(
        dir,
        &tls("certfile = \"client.pem\"\nkeyfile = \"open.key\"\n"),
    );
    assert!(!ok);
    assert!(
        out.contains("accessible by other users") && out.contains("chmod 600"),
        "{out}"
    );

    write_file(&dir.join("open-password"), "pw\n", 0o640);
    let (ok, out) = check(
        dir,
        &tls("username = \"u\"\npassword_file = \"open-password\"\n"),
    );
    assert!(!ok);
    assert!(
        out.contains("password_file") && out.contains("accessible"),
        "{out}"
    );

    let (ok, out) = check(dir, "url = \"wss://b:443\"\n");
    assert!(!ok);
    assert!(out.contains("unknown URL scheme \"wss\""), "{out}");

    let (ok, out) = check(dir, "url = \"mqtt://b:1883\"\ncafile = \"ca.pem\"\n");
    assert!(!ok);
    assert!(out.contains("only for TLS upstreams"), "{out}");

    // A certificate that expires in 10 days: accepted, with a warning.
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "soon");
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = epoch
        + SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
    params.not_before = now - Duration::from_secs(86_400);
    params.not_after = now + Duration::from_secs(10 * 86_400);
    let key = KeyPair::generate().unwrap();
    let soon = params.signed_by(&key, &ca.issuer).unwrap();
    write_file(&dir.join("soon.pem"), &soon.pem(), 0o644);
    write_file(&dir.join("soon.key"), &key.serialize_pem(), 0o600);
    let (ok, out) = check(
        dir,
        &tls("certfile = \"soon.pem\"\nkeyfile = \"soon.key\"\n"),
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("warning:") && out.contains("expires on") && out.contains("CN=soon"),
        "{out}"
    );

    // SEC1 ("EC PRIVATE KEY") and RSA ("RSA PRIVATE KEY") keys work as well as PKCS#8.
    openssl(&[
        "ec",
        "-in",
        dir.join("client.key").to_str().unwrap(),
        "-out",
        dir.join("sec1.key").to_str().unwrap(),
    ]);
    std::fs::set_permissions(
        dir.join("sec1.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(std::fs::read_to_string(dir.join("sec1.key"))
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    let (ok, out) = check(
        dir,
        &tls("certfile = \"client.pem\"\nkeyfile = \"sec1.key\"\n"),
    );
    assert!(ok, "{out}");
    let rsa = dir.join("rsa.key");
    openssl(&[
        "genrsa",
        "-traditional",
        "-out",
        rsa.to_str().unwrap(),
        "2048",
    ]);
    std::fs::set_permissions(&rsa, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(std::fs::read_to_string(&rsa)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        rsa.to_str().unwrap(),
        "-subj",
        "/CN=rsa",
        "-days",
        "365",
        "-out",
        dir.join("rsa.pem").to_str().unwrap(),
    ]);
    let (ok, out) = check(dir, &tls("certfile = \"rsa.pem\"\nkeyfile = \"rsa.key\"\n"));
    assert!(ok, "{out}");

    // An X.509 v1 certificate (what `openssl x509 -req` makes without -extfile) is named as such.
    let csr = dir.join("v1.csr");
    openssl(&[
        "req",
        "-new",
        "-key",
        rsa.to_str().unwrap(),
        "-subj",
        "/CN=v1",
        "-out",
        csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-signkey",
        rsa.to_str().unwrap(),
        "-days",
        "30",
        "-out",
        dir.join("v1.pem").to_str().unwrap(),
    ]);
    let (ok, out) = check(dir, &tls("certfile = \"v1.pem\"\nkeyfile = \"rsa.key\"\n"));
    assert!(!ok);
    assert!(out.contains("X.509 v1 certificate"), "{out}");

    // `run` refuses what `config check` refuses, before starting anything.
    let path = common::write_config(
        dir,
        &format!(
            "[[upstream]]\nname = \"cloud\"\n{}",
            tls("certfile = \"client.pem\"\nkeyfile = \"open.key\"\n")
        ),
    );
    let data = dir.join("data");
    let (ok, out) = outpost(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", common::free_port()),
    ]);
    assert!(!ok);
    assert!(out.contains("accessible by other users"), "{out}");
}

/// A key file the gateway's user cannot read is named, with the operating system's reason.
/// As root (which reads anything) the check runs as `nobody`; otherwise the file gets mode 000.
#[test]
fn config_check_names_an_unreadable_key() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = Ca::new("ca");
    write_file(&dir.join("ca.pem"), &ca.pem(), 0o644);
    write_leaf(dir, "client", &ca.leaf("gw", &[], true, Validity::Valid));
    let config = common::write_config(
        dir,
        "[[upstream]]\nname = \"cloud\"\nurl = \"mqtts://b:8883\"\ncafile = \"ca.pem\"\n\
         certfile = \"client.pem\"\nkeyfile = \"client.key\"\n",
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut command = if root {
        // A copy in the temporary directory: the checkout may be where `nobody` cannot go.
        let binary = dir.join("outpost");
        std::fs::copy(env!("CARGO_BIN_EXE_outpost"), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&binary);
        c
    } else {
        std::fs::set_permissions(
            dir.join("client.key"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
    };
    let out = command
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run the check (setpriv is in util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("upstream \"cloud\".keyfile: cannot read")
            && text.contains("client.key")
            && text.contains("Permission denied"),
        "{text}"
    );
}
