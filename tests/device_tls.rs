//! Issue 14, item 1: TLS listeners for devices on the gateway's broker (`[broker.tls]`). The
//! real `outpost` binary, real sockets, real clients: Debian's `mosquitto_pub`/`mosquitto_sub`
//! with `--cafile --cert --key`, and a Rust device over tokio-rustls speaking the packets of
//! `common::mqtt`. (rumqttc's TLS features are deliberately not enabled in this project: they
//! pull rustls-webpki 0.102 and rustls-pemfile, which have open RustSec advisories.) Where it
//! is cheap, the same certificates and files go to Debian's Mosquitto first, so that each
//! expectation is checked against a real broker too.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mqtt::{subscribe_packet, Client, Connect, Packet, Publish, Version, WAIT};
use common::pki::{listener_pki, tls_listener, write_file, write_leaf, Ca, Validity};
use common::{write_config, Gateway, Mosquitto};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY: &str = "gw-tls";

/// A CONNECT's username and, when given, password.
type Login<'a> = Option<(&'a str, Option<&'a str>)>;

/// The test's certificates in `dir`: `ca.pem` (the device CA), `server.pem`/`server.key` (the
/// gateway's, for localhost and 127.0.0.1), and client certificates `alice`, `bob` and
/// `nocn` (no subject CN) of that CA, and `stranger` of another CA.
fn pki(dir: &Path) -> Ca {
    let ca = listener_pki(dir, "device ca");
    write_leaf(dir, "nocn", &ca.leaf_without_cn());
    let other = Ca::new("another ca");
    write_leaf(
        dir,
        "stranger",
        &other.leaf("alice", &[], true, Validity::Valid),
    );
    ca
}

/// A gateway with `broker` under `[broker]` and a TLS listener on 127.0.0.1:`tls_port` with
/// the server certificate of [`pki`] and `tls` (more keys of `[broker.tls]`); metrics every
/// 200 ms.
fn gateway(dir: &Path, broker: &str, tls_port: u16, tls: &str) -> Gateway {
    let config = write_config(
        dir,
        &format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[broker.tls]\n\
             listen = [\"127.0.0.1:{tls_port}\"]\ncertfile = \"server.pem\"\n\
             keyfile = \"server.key\"\n{tls}\n\n[handlers]\nmetrics_interval_ms = 200\n"
        ),
    );
    let mut gateway = Gateway::new(dir, &["--config", config.to_str().unwrap()]);
    gateway.start();
    gateway
}

/// A Mosquitto whose second listener, on the returned port, is TLS with the same server
/// certificate and CA ([`tls_listener`]: with `require_certificate`, the certificate's CN is
/// the username), and `extra` for that listener.
fn mosquitto(dir: &Path, require_certificate: bool, extra: &str) -> (Mosquitto, u16) {
    let port = common::free_port();
    let mut mosquitto = Mosquitto::with_config(
        dir,
        &format!("{}{extra}", tls_listener(port, dir, require_certificate)),
    );
    mosquitto.start();
    common::block_until("Mosquitto's TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (mosquitto, port)
}

// ---------------------------------------------------------------------------------------------
// A device over TLS

/// A device over tokio-rustls: trusts `ca.pem` of the test's directory, presents the client
/// certificate `<identity>.pem` when given, and speaks the packets of `common::mqtt`.
struct TlsDevice {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    version: Version,
}

impl TlsDevice {
    /// Handshake and CONNECT: the device and the CONNACK's code; `Err` with what happened
    /// when the handshake failed or the connection closed without a CONNACK.
    async fn connect(
        port: u16,
        dir: &Path,
        identity: Option<&str>,
        connect: &Connect,
    ) -> Result<(TlsDevice, u8), String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match identity {
            Some(name) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let stream = tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .map_err(|_| "no handshake within the wait".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
        let mut device = TlsDevice {
            stream,
            version: connect.version,
        };
        device.send(&connect.encode()).await;
        // A refused client certificate shows here on TLS 1.3: the server's alert comes after
        // the client's side of the handshake is done.
        match device.recv().await {
            Ok(Some(Packet::ConnAck { code, .. })) => Ok((device, code)),
            Ok(other) => Err(format!("expected CONNACK, got {other:?}")),
            Err(e) => Err(e),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet; `Ok(None)` when the broker closed the connection, `Err` when the
    /// connection broke (a TLS alert, say). Fails the test when nothing comes within
    /// [`WAIT`].
    async fn recv(&mut self) -> Result<Option<Packet>, String> {
        tokio::time::timeout(WAIT, self.read_packet())
            .await
            .unwrap_or_else(|_| panic!("no packet and no close within {WAIT:?}"))
    }

    async fn read_packet(&mut self) -> Result<Option<Packet>, String> {
        let mut byte1 = [0u8; 1];
        match self.stream.read(&mut byte1).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        let mut len = 0usize;
        for shift in 0..4 {
            let b = self
                .stream
                .read_u8()
                .await
                .map_err(|e| format!("read: {e}"))?;
            len |= usize::from(b & 0x7F) << (7 * shift);
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(Some(Packet::decode(self.version, byte1[0], &body)))
    }

    /// The next packet, which must come.
    async fn next(&mut self) -> Packet {
        match self.recv().await {
            Ok(Some(packet)) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }
}

/// The CONNACK code a device over TLS gets (`None`: the handshake failed or the connection
/// closed without one).
async fn connack(
    port: u16,
    dir: &Path,
    identity: Option<&str>,
    version: Version,
    login: Login<'_>,
) -> Option<u8> {
    let mut connect = Connect::new(version, &format!("tls-{}", version.tag()));
    if let Some((user, password)) = login {
        connect = connect.login(user, password);
    }
    TlsDevice::connect(port, dir, identity, &connect)
        .await
        .ok()
        .map(|(_, code)| code)
}

// ---------------------------------------------------------------------------------------------
// Mosquitto's clients

fn mosquitto_version(version: Version) -> &'static str {
    match version {
        Version::V4 => "mqttv311",
        Version::V5 => "mqttv5",
    }
}

/// `mosquitto_pub` or `mosquitto_sub` (`program`) against 127.0.0.1:`port` over TLS, trusting
/// `ca.pem`, with the client certificate `<identity>.pem` when given, and `args`; stopped
/// after 60 s at most.
fn mosquitto_client(
    program: &str,
    port: u16,
    dir: &Path,
    identity: Option<&str>,
    version: Version,
    args: &[&str],
) -> Output {
    let mut command = Command::new("timeout");
    command
        .args(["60", program, "-h", "127.0.0.1", "-p", &port.to_string()])
        .arg("--cafile")
        .arg(dir.join("ca.pem"))
        .args(["-V", mosquitto_version(version)]);
    if let Some(name) = identity {
        command
            .arg("--cert")
            .arg(dir.join(format!("{name}.pem")))
            .arg("--key")
            .arg(dir.join(format!("{name}.key")));
    }
    command
        .args(args)
        .output()
        .expect("run mosquitto clients (apt-get install mosquitto-clients)")
}

/// Whether `mosquitto_pub` with this certificate publishes (QoS 1: it waits for the PUBACK).
fn mosquitto_pub_works(port: u16, dir: &Path, identity: Option<&str>, version: Version) -> bool {
    let out = mosquitto_client(
        "mosquitto_pub",
        port,
        dir,
        identity,
        version,
        &["-q", "1", "-t", "probe", "-m", "x"],
    );
    out.status.success()
}

/// Waits until the gateway's published metrics show `key` at `expected` or more, read by a
/// plain client on the loopback listener (logging in as `login` when given).
fn wait_for_metric(gateway: &Gateway, login: Option<(&str, &str)>, key: &str, expected: u64) {
    let mut connect = Connect::new(Version::V4, "metrics-reader");
    if let Some((user, password)) = login {
        connect = connect.login(user, Some(password));
    }
    let mut reader = Client::connect(gateway.port, &connect).0;
    reader.subscribe(&format!("outpost/{GATEWAY}/metrics"), 0);
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        let snapshot = reader.expect_publish();
        let m: serde_json::Value = serde_json::from_slice(&snapshot.payload).unwrap();
        if m[key].as_u64().is_some_and(|n| n >= expected) {
            return;
        }
        assert!(Instant::now() < deadline, "{key} not at {expected}: {m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Mosquitto's clients and a Rust device publish and receive through the TLS listener, on
/// MQTT 3.1.1 and 5, with a client certificate (the CA is given: a presented certificate is
/// verified, none is required).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_and_a_rust_device_publish_and_receive_over_tls_on_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let tls_port = common::free_port();
    let gateway = gateway(dir, "", tls_port, "cafile = \"ca.pem\"\n");

    for version in Version::BOTH {
        let v = version.tag();
        let (mut device, code) = TlsDevice::connect(
            tls_port,
            dir,
            Some("bob"),
            &Connect::new(version, &format!("rust-{v}")),
        )
        .await
        .unwrap();
        assert_eq!(code, 0, "{version:?}");
        device
            .send(&subscribe_packet(
                version,
                1,
                &[(&format!("tls/{v}/from-mosquitto"), 1)],
                &[],
            ))
            .await;
        assert!(
            matches!(device.next().await, Packet::SubAck { id: 1, ref codes } if codes == &[1]),
            "{version:?}"
        );

        // mosquitto_pub -> the Rust device.
        let out = mosquitto_client(
            "mosquitto_pub",
            tls_port,
            dir,
            Some("alice"),
            version,
            &[
                "-q",
                "1",
                "-t",
                &format!("tls/{v}/from-mosquitto"),
                "-m",
                "hello over tls",
            ],
        );
        assert!(out.status.success(), "{version:?}: {out:?}");
        let Packet::Publish(got) = device.next().await else {
            panic!("{version:?}: expected PUBLISH");
        };
        assert_eq!(
            (got.topic.as_str(), got.payload.as_slice()),
            (
                format!("tls/{v}/from-mosquitto").as_str(),
                &b"hello over tls"[..]
            )
        );
        if got.qos == 1 {
            device
                .send(&common::mqtt::frame(
                    common::mqtt::PUBACK,
                    &got.id.to_be_bytes(),
                ))
                .await;
        }

        // The Rust device -> mosquitto_sub (retained, so that the subscriber gets it however
        // late it subscribes).
        let publish = Publish::new(&format!("tls/{v}/from-rust"), "hello from rust")
            .qos(1)
            .retain()
            .id(7);
        device.send(&publish.encode(version)).await;
        assert!(
            matches!(device.next().await, Packet::PubAck { id: 7, .. }),
            "{version:?}"
        );
        let out = mosquitto_client(
            "mosquitto_sub",
            tls_port,
            dir,
            Some("alice"),
            version,
            &["-t", &format!("tls/{v}/from-rust"), "-C", "1", "-W", "60"],
        );
        assert!(out.status.success(), "{version:?}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hello from rust"
        );
    }
    drop(gateway);
}

/// A plain MQTT CONNECT to the TLS port gets no CONNACK and the connection closes; a client
/// that never starts its handshake is closed once `connect_timeout_ms` has passed; both are
/// counted.
#[test]
fn plain_mqtt_to_the_tls_port_gets_no_connack_and_a_silent_client_is_closed_at_the_deadline() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let tls_port = common::free_port();
    let gateway = gateway(dir, "connect_timeout_ms = 1000", tls_port, "");

    for version in Version::BOTH {
        let mut plain = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
        plain.set_read_timeout(Some(WAIT)).unwrap();
        plain
            .write_all(&Connect::new(version, "plain").encode())
            .unwrap();
        let mut answer = Vec::new();
        // Whatever comes (a TLS alert), then the close: read_to_end returns only at EOF (or
        // a reset), and fails when nothing closes the connection within the wait.
        match plain.read_to_end(&mut answer) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{version:?}: the TLS port did not close the connection: {e}"),
        }
        assert!(
            answer.first() != Some(&0x20),
            "{version:?}: a CONNACK on the TLS port: {answer:?}"
        );
        // The same CONNECT on the plain port is answered (the bytes are a good CONNECT).
        let (_, answer) = Client::try_connect(gateway.port, &Connect::new(version, "plain"));
        assert!(
            matches!(answer, Some(Packet::ConnAck { code: 0, .. })),
            "{answer:?}"
        );
    }

    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    silent.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let mut byte = [0u8; 1];
    match silent.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("not closed without an answer: {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "closed before the deadline: {:?}",
        started.elapsed()
    );
    wait_for_metric(&gateway, None, "edge_tls_handshakes_failed", 3);
}

/// With `require_certificate`, a device without a certificate and one whose certificate comes
/// from another CA are refused, on both versions, by Mosquitto and by the gateway alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_certificate_refuses_devices_without_one_or_from_another_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let (_mosquitto, mosquitto_port) = mosquitto(dir, true, "");
    let tls_port = common::free_port();
    let gateway = gateway(
        dir,
        "",
        tls_port,
        "cafile = \"ca.pem\"\nrequire_certificate = true\n",
    );
    for version in Version::BOTH {
        for (identity, works) in [
            (Some("alice"), true),
            (None, false),
            (Some("stranger"), false),
        ] {
            assert_eq!(
                mosquitto_pub_works(mosquitto_port, dir, identity, version),
                works,
                "Mosquitto, {identity:?}, {version:?}: the expectation itself"
            );
            assert_eq!(
                mosquitto_pub_works(tls_port, dir, identity, version),
                works,
                "outpost, mosquitto_pub {identity:?}, {version:?}"
            );
            let code = connack(tls_port, dir, identity, version, None).await;
            assert_eq!(
                code,
                works.then_some(0),
                "outpost, Rust device {identity:?}, {version:?}"
            );
        }
    }
    drop(gateway);
}

/// `use_identity_as_username` next to a password file: a device with a certificate gets in
/// whatever username and password its CONNECT carries (the certificate is its login), a
/// certificate without a CN is refused with CONNACK 4 (3.1.1) / 0x86 (5), and the plain
/// listener still checks passwords. Mosquitto answers the same to the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_as_username_ignores_the_connect_login_and_a_certificate_without_cn_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let passwords = dir.join("passwords");
    let out = common::outpost_passwd(&passwords, "alice", "pw-alice");
    assert!(out.status.success(), "{out:?}");
    let (_mosquitto, mosquitto_port) = mosquitto(
        dir,
        true,
        &format!("password_file {}\n", passwords.display()),
    );
    let tls_port = common::free_port();
    let gateway = gateway(
        dir,
        "password_file = \"passwords\"",
        tls_port,
        "cafile = \"ca.pem\"\nrequire_certificate = true\nuse_identity_as_username = true\n",
    );

    let no_cn = |version| match version {
        Version::V4 => 0x04,
        Version::V5 => 0x86,
    };
    for version in Version::BOTH {
        let cases: [(&str, Option<&str>, Login, u8); 5] = [
            ("alice, her certificate alone", Some("alice"), None, 0),
            (
                "alice's certificate, a wrong password",
                Some("alice"),
                Some(("alice", Some("wrong"))),
                0,
            ),
            (
                "bob (not in the password file), another user's name and no password",
                Some("bob"),
                Some(("alice", None)),
                0,
            ),
            (
                "a certificate without CN",
                Some("nocn"),
                Some(("alice", Some("pw-alice"))),
                no_cn(version),
            ),
            (
                "a certificate without CN, no login",
                Some("nocn"),
                None,
                no_cn(version),
            ),
        ];
        for (case, identity, login, expected) in cases {
            assert_eq!(
                connack(mosquitto_port, dir, identity, version, login).await,
                Some(expected),
                "Mosquitto, {case}, {version:?}: the expectation itself"
            );
            assert_eq!(
                connack(tls_port, dir, identity, version, login).await,
                Some(expected),
                "outpost, {case}, {version:?}"
            );
        }
        // The plain listener still asks for a password.
        let refused = match version {
            Version::V4 => 0x05,
            Version::V5 => 0x87,
        };
        let plain = Client::try_connect(
            gateway.port,
            &Connect::new(version, "plain").login("alice", Some("wrong")),
        )
        .1;
        assert!(
            matches!(plain, Some(Packet::ConnAck { code, .. }) if code == refused),
            "{plain:?}"
        );
    }
    // Counted as refused logins (two certificates without CN per version, plus the plain
    // wrong password).
    wait_for_metric(
        &gateway,
        Some(("alice", "pw-alice")),
        "edge_logins_refused",
        6,
    );
}

/// A certificate revoked by a new CRL is refused once the file is replaced and `SIGHUP`
/// sent (accepted before); a CRL file replaced by garbage keeps the list in use, with a
/// warning, and devices keep connecting. Mosquitto refuses the revoked certificate with the
/// same list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_by_a_new_crl_is_refused_after_sighup_and_a_garbage_crl_keeps_the_old_one(
) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = pki(dir);
    let doomed = ca.leaf("doomed", &[], true, Validity::Valid);
    write_leaf(dir, "doomed", &doomed);
    let crl = dir.join("ca.crl");
    write_file(&crl, &ca.crl(&[]), 0o644);

    // Mosquitto: accepted with the empty list, refused with the one revoking it.
    let crl_line = format!("crlfile {}\n", crl.display());
    {
        let (_mosquitto, port) = mosquitto(dir, true, &crl_line);
        assert!(mosquitto_pub_works(port, dir, Some("doomed"), Version::V5));
    }
    write_file(&crl, &ca.crl(&[&doomed]), 0o644);
    {
        let (_mosquitto, port) = mosquitto(dir, true, &crl_line);
        assert!(!mosquitto_pub_works(port, dir, Some("doomed"), Version::V5));
        assert!(mosquitto_pub_works(port, dir, Some("alice"), Version::V5));
    }
    write_file(&crl, &ca.crl(&[]), 0o644);

    let tls_port = common::free_port();
    let gateway = gateway(
        dir,
        "",
        tls_port,
        "cafile = \"ca.pem\"\ncrlfile = \"ca.crl\"\nrequire_certificate = true\n",
    );
    let accepted = |identity: &'static str| async move {
        connack(tls_port, dir, Some(identity), Version::V5, None).await == Some(0)
    };
    assert!(accepted("doomed").await, "not revoked yet");

    write_file(&crl, &ca.crl(&[&doomed]), 0o644);
    gateway.reload();
    let deadline = Instant::now() + common::PATIENCE;
    while accepted("doomed").await {
        assert!(
            Instant::now() < deadline,
            "the revoked certificate is still accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted("alice").await, "a certificate not revoked");
    assert!(
        mosquitto_pub_works(tls_port, dir, Some("alice"), Version::V4),
        "mosquitto_pub with a certificate not revoked"
    );
    assert!(!mosquitto_pub_works(
        tls_port,
        dir,
        Some("doomed"),
        Version::V4
    ));

    // Garbage: the list in use stays.
    write_file(&crl, "garbage\n", 0o644);
    gateway.reload();
    common::eventually("the refusal of the garbage is logged", || {
        gateway
            .log()
            .contains("the device TLS files cannot be read again")
    })
    .await;
    let log = gateway.log();
    assert!(
        log.contains("broker.tls.crlfile") && log.contains("ca.crl"),
        "the warning names the key and the file: {log}"
    );
    assert!(accepted("alice").await, "devices keep connecting");
    assert!(!accepted("doomed").await, "the old list still applies");
    wait_for_metric(&gateway, None, "edge_tls_handshakes_failed", 1);
}

// ---------------------------------------------------------------------------------------------
// config check

fn config_check(dir: &Path, tls: &str) -> (bool, String) {
    let path = write_config(
        dir,
        &format!("[broker.tls]\nlisten = [\"127.0.0.1:8883\"]\n{tls}"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["config", "check", path.to_str().unwrap()])
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

/// `config check` loads the TLS files as `run` does: it names a missing certificate, key, CA
/// or CRL file and a key file others can read, and warns about a server certificate that
/// expires soon.
#[test]
fn config_check_names_bad_device_tls_files_and_warns_about_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = pki(dir);
    write_file(&dir.join("ca.crl"), &ca.crl(&[]), 0o644);
    let files = "certfile = \"server.pem\"\nkeyfile = \"server.key\"\n";
    let (ok, out) = config_check(
        dir,
        &format!("{files}cafile = \"ca.pem\"\ncrlfile = \"ca.crl\"\n"),
    );
    assert!(ok && !out.contains("warning"), "{out}");

    for (tls, key, file) in [
        (
            "certfile = \"missing.pem\"\nkeyfile = \"server.key\"\n".to_string(),
            "broker.tls.certfile",
            "missing.pem",
        ),
        (
            "certfile = \"server.pem\"\nkeyfile = \"missing.key\"\n".to_string(),
            "broker.tls.keyfile",
            "missing.key",
        ),
        (
            format!("{files}cafile = \"missing-ca.pem\"\n"),
            "broker.tls.cafile",
            "missing-ca.pem",
        ),
        (
            format!("{files}cafile = \"ca.pem\"\ncrlfile = \"missing.crl\"\n"),
            "broker.tls.crlfile",
            "missing.crl",
        ),
    ] {
        let (ok, out) = config_check(dir, &tls);
        assert!(
            !ok && out.contains(key) && out.contains(file),
            "{tls}: {out}"
        );
    }

    write_file(
        &dir.join("open.key"),
        &std::fs::read_to_string(dir.join("server.key")).unwrap(),
        0o644,
    );
    let (ok, out) = config_check(dir, "certfile = \"server.pem\"\nkeyfile = \"open.key\"\n");
    assert!(
        !ok && out.contains("broker.tls.keyfile") && out.contains("mode 644"),
        "{out}"
    );

    write_leaf(
        dir,
        "soon",
        &ca.leaf("soon", &["localhost"], false, Validity::ExpiresSoon),
    );
    let (ok, out) = config_check(dir, "certfile = \"soon.pem\"\nkeyfile = \"soon.key\"\n");
    assert!(
        ok && out.contains("warning:") && out.contains("expires on") && out.contains("CN=soon"),
        "{out}"
    );
}

/// A certificate's identity is a username like any other: its ACL section decides what it may
/// publish, and with `require_client_id_match` it is the only client id it may use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_identity_gets_its_users_rights_and_its_client_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    std::fs::write(
        dir.join("acl"),
        "user alice\ntopic readwrite alice/#\nuser bob\ntopic readwrite bob/#\n",
    )
    .unwrap();
    let tls_port = common::free_port();
    let _gateway = gateway(
        dir,
        "acl_file = \"acl\"\nrequire_client_id_match = true",
        tls_port,
        "cafile = \"ca.pem\"\nrequire_certificate = true\nuse_identity_as_username = true\n",
    );
    let v = Version::V5;
    let (mut alice, code) =
        TlsDevice::connect(tls_port, dir, Some("alice"), &Connect::new(v, "alice"))
            .await
            .unwrap();
    assert_eq!(code, 0);
    for (id, topic, expected) in [(1, "alice/x", 0x00), (2, "bob/x", 0x87)] {
        alice
            .send(&Publish::new(topic, "1").qos(1).id(id).encode(v))
            .await;
        match alice.next().await {
            Packet::PubAck { id: got, code } => {
                assert_eq!((got, code), (id, expected), "{topic}");
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // alice's certificate with bob's client id: "client identifier not valid".
    let (_, code) = TlsDevice::connect(tls_port, dir, Some("alice"), &Connect::new(v, "bob"))
        .await
        .unwrap();
    assert_eq!(code, 0x85);
}
