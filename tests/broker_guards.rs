//! The local broker cannot be knocked over (issue 13, first part): the reproductions that
//! disabled rumqttd behind the front, as tests over real sockets.
//!
//! - the connection limit: one more connection is refused with the protocol's code, and the
//!   refused client's reconnects (and connect-and-vanish cycles) leave the broker accepting;
//! - every packet type a client must not send, and invalid fixed-header flags, close only
//!   that connection, on 3.1.1 and 5, and leak no slot;
//! - a publish topic with wildcards and an invalid topic filter close the connection;
//! - the gateway's own client ids are refused to devices, and the control plane keeps
//!   answering;
//! - a connection that never finishes its CONNECT is closed and gives its slot back;
//! - MQTT 3.1 clients are served and other protocol levels refused, as Mosquitto does.
//!
//! The packet-level checks run against Debian's Mosquitto too (one port, both versions), so
//! the expected behaviour is checked against a real broker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mqtt::frame as packet;
use common::{eventually, Device, Gateway, Harness, Mosquitto};

const PATIENCE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    V4,
    V5,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn connect_packet(v: V, id: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(if v == V::V5 { 5 } else { 4 });
    body.push(0x02); // clean session
    body.extend_from_slice(&30u16.to_be_bytes());
    if v == V::V5 {
        body.push(0); // no properties
    }
    string(&mut body, id);
    packet(0x10, &body)
}

fn publish_qos1(v: V, topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    if v == V::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

fn subscribe(v: V, filter: &str) -> Vec<u8> {
    let mut body = 1u16.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0);
    }
    string(&mut body, filter);
    body.push(1);
    packet(0x82, &body)
}

/// A raw MQTT connection.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    fn open(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        Raw { stream }
    }

    fn send(&mut self, bytes: &[u8]) {
        // A write may fail once the peer has closed; reading tells what happened.
        let _ = self.stream.write_all(bytes);
    }

    /// The next packet (first byte and body), or `None` once the connection is closed.
    fn read_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut byte1 = [0u8; 1];
        match self.stream.read(&mut byte1) {
            Ok(1) => {}
            Ok(_) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("no packet and no close within {PATIENCE:?}: {e}"),
        }
        let mut len = 0usize;
        for shift in 0..4 {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).ok()?;
            len |= ((b[0] & 0x7F) as usize) << (7 * shift);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).ok()?;
        Some((byte1[0], body))
    }

    /// Connects with `id`; returns the CONNACK's return or reason code (`None`: closed
    /// without a CONNACK).
    fn connect(port: u16, v: V, id: &str) -> (Raw, Option<u8>) {
        let mut raw = Raw::open(port);
        raw.send(&connect_packet(v, id));
        let code = match raw.read_packet() {
            Some((0x20, body)) => body.get(1).copied(),
            Some((other, _)) => panic!("expected CONNACK, got first byte {other:#x}"),
            None => None,
        };
        (raw, code)
    }

    /// Reads until the connection closes; returns the reason code of a DISCONNECT received
    /// on the way. Panics if the connection stays open.
    fn closed(mut self) -> Option<u8> {
        let mut reason = None;
        while let Some((byte1, body)) = self.read_packet() {
            if byte1 == 0xE0 {
                reason = Some(body.first().copied().unwrap_or(0));
            }
        }
        reason
    }

    /// Publishes QoS 1 and returns whether the PUBACK came.
    fn publish_acked(&mut self, v: V, topic: &str, pkid: u16) -> bool {
        self.send(&publish_qos1(v, topic, pkid, b"{\"ok\":1}"));
        loop {
            match self.read_packet() {
                Some((0x40, body)) => return body.get(..2) == Some(&pkid.to_be_bytes()[..]),
                Some(_) => continue,
                None => return false,
            }
        }
    }
}

/// A packet a client must not send after CONNECT.
struct Forbidden {
    what: &'static str,
    bytes: Vec<u8>,
    /// The MQTT 5 DISCONNECT reason code outpost answers with (Mosquitto 2's, where it
    /// sends one).
    reason: u8,
    /// Mosquitto 2 keeps the connection open (it ignores the packet); outpost closes it,
    /// as the spec's "server to client" direction requires and as rumqttd needs (its v5
    /// codec reaches `unreachable!()` on them).
    mosquitto_ignores: bool,
}

fn forbidden_packets(v: V) -> Vec<Forbidden> {
    let case = |what, bytes, reason| Forbidden {
        what,
        bytes,
        reason,
        mosquitto_ignores: false,
    };
    let ignored = |what, bytes| Forbidden {
        what,
        bytes,
        reason: PROTOCOL_ERROR,
        mosquitto_ignores: true,
    };
    let v5 = v == V::V5;
    let mut sub = subscribe(v, "a/b");
    sub[0] = 0x80;
    vec![
        case("reserved type 0", vec![0x00, 0x00], PROTOCOL_ERROR),
        case(
            "CONNACK",
            if v5 {
                vec![0x20, 0x03, 0x00, 0x00, 0x00]
            } else {
                vec![0x20, 0x02, 0x00, 0x00]
            },
            PROTOCOL_ERROR,
        ),
        ignored(
            "SUBACK",
            if v5 {
                vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x00]
            } else {
                vec![0x90, 0x03, 0x00, 0x01, 0x00]
            },
        ),
        ignored(
            "UNSUBACK",
            if v5 {
                vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x00]
            } else {
                vec![0xB0, 0x02, 0x00, 0x01]
            },
        ),
        ignored("PINGRESP", vec![0xD0, 0x00]),
        case("AUTH / reserved type 15", vec![0xF0, 0x00], PROTOCOL_ERROR),
        case(
            "PUBREL without its 0010 flags",
            vec![0x60, 0x02, 0x00, 0x01],
            MALFORMED_PACKET,
        ),
        case(
            "a second CONNECT",
            connect_packet(v, "again"),
            PROTOCOL_ERROR,
        ),
        case("SUBSCRIBE without its 0010 flags", sub, MALFORMED_PACKET),
        case(
            "publish to a/+/b",
            publish_qos1(v, "a/+/b", 1, b"x"),
            PROTOCOL_ERROR,
        ),
        case(
            "publish to a/#",
            publish_qos1(v, "a/#", 1, b"x"),
            PROTOCOL_ERROR,
        ),
        case(
            "subscribe to a/#/b",
            subscribe(v, "a/#/b"),
            MALFORMED_PACKET,
        ),
        case("subscribe to a/b+", subscribe(v, "a/b+"), MALFORMED_PACKET),
    ]
}

const PROTOCOL_ERROR: u8 = 0x82;
const MALFORMED_PACKET: u8 = 0x81;

/// What a broker did with one forbidden packet.
struct Outcome {
    what: String,
    version: V,
    expected: u8,
    /// The reason code of the DISCONNECT the broker sent before closing, if any.
    disconnect: Option<u8>,
}

/// Every forbidden packet (but those Mosquitto ignores, when `skip_ignored`) closes its
/// connection, on each listener and version given; a conforming client is served after
/// each.
fn forbidden_packets_close_only_their_connection(
    listeners: &[(V, u16)],
    skip_ignored: bool,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for &(v, port) in listeners {
        for case in forbidden_packets(v) {
            if skip_ignored && case.mosquitto_ignores {
                continue;
            }
            let what = case.what;
            let (mut raw, code) = Raw::connect(port, v, "hostile-1");
            assert_eq!(code, Some(0), "{v:?} {what}: CONNACK");
            raw.send(&case.bytes);
            outcomes.push(Outcome {
                what: format!("{v:?} {what}"),
                version: v,
                expected: case.reason,
                disconnect: raw.closed(),
            });
            let (mut good, code) = Raw::connect(port, v, "good-1");
            assert_eq!(
                code,
                Some(0),
                "{v:?} after {what}: a conforming client connects"
            );
            assert!(
                good.publish_acked(v, "telemetry/good-1/t", 7),
                "{v:?} after {what}: a conforming client's publish is acknowledged"
            );
        }
    }
    outcomes
}

fn gateway_config(v5_port: u16, max_connections: usize) -> String {
    format!(
        "gateway_id = \"gw-guard\"\n[broker]\nlisten_v5 = [\"127.0.0.1:{v5_port}\"]\n\
         max_connections = {max_connections}\n"
    )
}

#[test]
fn mosquitto_closes_the_same_forbidden_packets() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::new(dir.path());
    broker.start();
    let port = broker.port;
    let outcomes =
        forbidden_packets_close_only_their_connection(&[(V::V4, port), (V::V5, port)], true);
    // Mosquitto does not always send a DISCONNECT before it closes; where it does, its
    // reason code is the one outpost answers with.
    let mut disconnects = 0;
    for outcome in &outcomes {
        if let Some(code) = outcome.disconnect {
            assert_eq!(outcome.version, V::V5, "{}", outcome.what);
            assert_eq!(
                code, outcome.expected,
                "{}: Mosquitto's reason code",
                outcome.what
            );
            disconnects += 1;
        }
    }
    assert!(disconnects >= 4, "Mosquitto sent {disconnects} DISCONNECTs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_packets_close_only_their_connection_and_leak_no_slot() {
    let v5_port = common::free_port();
    // Few slots: a leaked slot per hostile connection would show within the first rounds.
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .config(&gateway_config(v5_port, 3))
        .upstream_arg()
        .start()
        .await;
    let port = h.gateway.port;

    let outcomes = tokio::task::spawn_blocking(move || {
        forbidden_packets_close_only_their_connection(&[(V::V4, port), (V::V5, v5_port)], false)
    })
    .await
    .unwrap();
    for outcome in &outcomes {
        let expected = match outcome.version {
            V::V5 => Some(outcome.expected),
            // 3.1.1 has no DISCONNECT from the server: the connection just closes.
            V::V4 => None,
        };
        assert_eq!(outcome.disconnect, expected, "{}: DISCONNECT", outcome.what);
    }

    // Three connections at once still fit: no slot leaked by 50 hostile connections.
    let clients = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|i| Raw::connect(port, V::V4, &format!("after-{i}")))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (_, code) in &clients {
        assert_eq!(*code, Some(0));
    }
    drop(clients);

    // Nothing of the refused publishes reached the upstream; the good ones did.
    let device = Device::connect(port, "dev-final").await;
    device
        .publish("telemetry/dev-final/t", "{\"last\":1}")
        .await;
    device.wait_acked(1).await;
    eventually("the last publish upstream", || {
        h.received
            .all()
            .iter()
            .any(|(t, _)| t == "telemetry/dev-final/t")
    })
    .await;
    let topics: Vec<String> = h.received.all().into_iter().map(|(t, _)| t).collect();
    assert!(
        topics.iter().all(|t| !t.contains('+') && !t.contains('#')),
        "{topics:?}"
    );
    assert!(topics.iter().any(|t| t == "telemetry/good-1/t"));
    assert!(h.gateway.stop(), "clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_refuses_with_a_code_and_never_wedges_the_broker() {
    let v5_port = common::free_port();
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .config(&gateway_config(v5_port, 2))
        .upstream_arg()
        .start()
        .await;
    let port = h.gateway.port;

    tokio::task::spawn_blocking(move || {
        let (a, code) = Raw::connect(port, V::V4, "dev-a");
        assert_eq!(code, Some(0));
        // The limit counts the listeners together.
        let (b, code) = Raw::connect(v5_port, V::V5, "dev-b");
        assert_eq!(code, Some(0));
        // One more is refused, on either version, with the protocol's code; and so are its
        // reconnects (which made rumqttd panic and refuse everyone until a restart).
        for attempt in 0..5 {
            let (_, code) = Raw::connect(port, V::V4, "dev-c");
            assert_eq!(
                code,
                Some(0x03),
                "3.1.1 attempt {attempt}: server unavailable"
            );
            let (_, code) = Raw::connect(v5_port, V::V5, "dev-c");
            assert_eq!(code, Some(0x97), "5 attempt {attempt}: quota exceeded");
        }
        drop(a);
        // Once a slot is free the reconnecting client gets in.
        let deadline = Instant::now() + PATIENCE;
        let c = loop {
            let (c, code) = Raw::connect(port, V::V4, "dev-c");
            if code == Some(0) {
                break c;
            }
            assert!(Instant::now() < deadline, "dev-c never got the free slot");
            std::thread::sleep(Duration::from_millis(100));
        };
        drop((b, c));
        // Connect-and-vanish with one client id (the device goes away before its CONNACK),
        // then the same id connects for real.
        for _ in 0..20 {
            let mut raw = Raw::open(port);
            raw.send(&connect_packet(V::V4, "flaky"));
            drop(raw);
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (mut raw, code) = Raw::connect(port, V::V4, "flaky");
            if code == Some(0) {
                assert!(raw.publish_acked(V::V4, "telemetry/flaky/t", 3));
                break;
            }
            assert_eq!(code, Some(0x03), "only the limit may refuse it");
            assert!(Instant::now() < deadline, "flaky never got a slot back");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();

    let device = Device::connect(port, "dev-final").await;
    device
        .publish("telemetry/dev-final/t", "{\"last\":1}")
        .await;
    device.wait_acked(1).await;
    eventually("both publishes upstream", || {
        let topics: Vec<String> = h.received.all().into_iter().map(|(t, _)| t).collect();
        topics.iter().any(|t| t == "telemetry/flaky/t")
            && topics.iter().any(|t| t == "telemetry/dev-final/t")
    })
    .await;
    let refused = gateway_log_count(&h.gateway, "connection limit reached");
    assert!(refused >= 1, "the refusals are logged");
    assert!(h.gateway.stop(), "clean exit");
}

fn gateway_log_count(gateway: &Gateway, needle: &str) -> usize {
    gateway.log().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_client_ids_are_refused_and_control_keeps_answering() {
    let v5_port = common::free_port();
    let mut h = Harness::builder()
        .upstream()
        .config(&gateway_config(v5_port, 16))
        .upstream_arg()
        .start()
        .await;
    let port = h.gateway.port;

    tokio::task::spawn_blocking(move || {
        for id in [
            "outpost-control",
            "outpost-modules",
            "outpost-pipeline",
            "outpost-x",
        ] {
            let (raw, code) = Raw::connect(port, V::V4, id);
            assert_eq!(code, Some(0x02), "{id} on 3.1.1: identifier rejected");
            assert_eq!(raw.closed(), None);
            let (raw, code) = Raw::connect(v5_port, V::V5, id);
            assert_eq!(code, Some(0x85), "{id} on 5: client identifier not valid");
            assert_eq!(raw.closed(), None);
        }
    })
    .await
    .unwrap();

    // The control plane's sessions were not taken over: it still answers.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args([
                "deadletters",
                "list",
                "--json",
                "--broker",
                &format!("mqtt://127.0.0.1:{port}"),
                "--gateway-id",
                "gw-guard",
                "--timeout-secs",
                "60",
            ])
            .output()
            .expect("run outpost deadletters")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON reply");
    assert!(reply.is_object(), "{reply}");
    assert!(h.gateway.stop(), "clean exit");
}

/// A connection that never finishes its CONNECT (half a packet, then silence) is closed
/// after `broker.connect_timeout_ms`, and its slot goes back: with one slot, a conforming
/// client is refused while the silent one holds it and gets in once it has been closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_connect_is_closed_and_gives_its_slot_back() {
    let mut h = Harness::builder()
        .upstream()
        .config("[broker]\nmax_connections = 1\nconnect_timeout_ms = 2000\n")
        .upstream_arg()
        .start()
        .await;
    let port = h.gateway.port;
    tokio::task::spawn_blocking(move || {
        let connect = connect_packet(V::V5, "silent");
        // While it holds the one slot (it got it when it was accepted), others are refused.
        // The slot may still be held for a moment by a connection that just ended (the
        // harness's readiness probe, or a try below that lost that race), and then the silent
        // one is the refused one: try again until the silent connection holds the slot.
        let deadline = Instant::now() + PATIENCE;
        let silent = loop {
            let mut silent = Raw::open(port);
            silent.send(&connect[..connect.len() / 2]);
            let (_, code) = Raw::connect(port, V::V4, "dev-a");
            if code == Some(0x03) {
                break silent;
            }
            assert_eq!(code, Some(0), "refused only by the limit");
            assert!(
                Instant::now() < deadline,
                "the silent connection never holds the slot"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(silent.closed(), None, "closed without an answer");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (mut raw, code) = Raw::connect(port, V::V4, "dev-a");
            if code == Some(0) {
                assert!(raw.publish_acked(V::V4, "telemetry/dev-a/t", 1));
                break;
            }
            assert_eq!(code, Some(0x03), "only the limit may refuse it");
            assert!(Instant::now() < deadline, "the slot never came back");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(h.gateway.stop(), "clean exit");
}

/// How a broker answers CONNECTs of other protocol levels: the CONNACK code for MQTT at
/// levels it does not speak, and whether an MQTT 3.1 client (`mosquitto_pub -V mqttv31`,
/// which exits non-zero without its PUBACK) gets its QoS 1 publish acknowledged.
fn protocol_levels(port: u16) -> (Vec<(u8, Option<u8>)>, bool) {
    let mut codes = Vec::new();
    for level in [3u8, 6] {
        let mut body = Vec::new();
        string(&mut body, "MQTT");
        body.extend_from_slice(&[level, 0x02, 0, 30]);
        string(&mut body, "levels");
        let mut raw = Raw::open(port);
        raw.send(&packet(0x10, &body));
        let code = match raw.read_packet() {
            Some((0x20, body)) => body.get(1).copied(),
            _ => None,
        };
        codes.push((level, code));
    }
    let status = Command::new("mosquitto_pub")
        .args(["-V", "mqttv31", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-i",
            "legacy-31",
            "-q",
            "1",
            "-t",
            "telemetry/legacy-31/t",
            "-m",
            "{}",
        ])
        .status()
        .expect("mosquitto_pub runs");
    (codes, status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_levels_are_answered_as_mosquitto_answers_them() {
    let mut h = Harness::builder()
        .subscriber("telemetry/#")
        .upstream_arg()
        .start()
        .await;
    let (upstream_port, gateway_port) = (h.upstream.port, h.gateway.port);
    let (mosquitto, outpost) = tokio::task::spawn_blocking(move || {
        (
            protocol_levels(upstream_port),
            protocol_levels(gateway_port),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        mosquitto,
        (vec![(3, Some(0x01)), (6, Some(0x01))], true),
        "Mosquitto's answers"
    );
    assert_eq!(outpost, mosquitto, "outpost answers as Mosquitto does");
    // One copy published on Mosquitto directly, one forwarded by the h.gateway.
    eventually("the MQTT 3.1 publish upstream", || {
        h.received
            .all()
            .iter()
            .filter(|(t, _)| t == "telemetry/legacy-31/t")
            .count()
            >= 2
    })
    .await;
    assert!(h.gateway.stop(), "clean exit");
}

/// A CONNECT of `level` with these connect flags, MQTT 5 properties, client id and bytes
/// after the client id.
fn raw_connect(level: u8, flags: u8, properties: &[u8], client_id: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.extend_from_slice(&[level, flags, 0, 30]);
    if level == 5 {
        body.push(properties.len() as u8);
        body.extend_from_slice(properties);
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    body.extend_from_slice(tail);
    packet(0x10, &body)
}

fn lp(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// CONNECTs that break the rules of 3.1.1 §3.1 / MQTT 5 §3.1, or that a broker answers in a
/// particular way, with the CONNACK code Mosquitto 2 answers (`None`: it closes without one).
fn connect_cases() -> Vec<(&'static str, Vec<u8>, Option<u8>)> {
    let will = [lp(b"w"), lp(b"x")].concat();
    vec![
        (
            "3.1.1 reserved flag",
            raw_connect(4, 0x03, b"", b"c1", b""),
            None,
        ),
        (
            "5 reserved flag",
            raw_connect(5, 0x03, b"", b"c2", b""),
            None,
        ),
        (
            "3.1.1 will QoS without will",
            raw_connect(4, 0x0A, b"", b"c3", b""),
            None,
        ),
        (
            "5 will QoS without will",
            raw_connect(5, 0x0A, b"", b"c4", b""),
            None,
        ),
        (
            "3.1.1 will retain without will",
            raw_connect(4, 0x22, b"", b"c5", b""),
            None,
        ),
        (
            "3.1.1 will QoS 3",
            raw_connect(4, 0x1E, b"", b"c6", &will),
            None,
        ),
        (
            "5 will QoS 3",
            raw_connect(5, 0x1E, b"", b"c7", &[&[0u8][..], &will].concat()),
            None,
        ),
        (
            "3.1.1 password without username",
            raw_connect(4, 0x42, b"", b"c8", &lp(b"pw")),
            None,
        ),
        (
            "5 repeated property",
            raw_connect(5, 0x02, &[0x11, 0, 0, 0, 5, 0x11, 0, 0, 0, 5], b"c9", b""),
            None,
        ),
        (
            "5 Receive Maximum 0",
            raw_connect(5, 0x02, &[0x21, 0, 0], b"c10", b""),
            None,
        ),
        (
            "5 Maximum Packet Size 0",
            raw_connect(5, 0x02, &[0x27, 0, 0, 0, 0], b"c11", b""),
            None,
        ),
        (
            "5 unknown property",
            raw_connect(5, 0x02, &[0x7F, 0], b"c12", b""),
            None,
        ),
        (
            "3.1.1 NUL in the client id",
            raw_connect(4, 0x02, b"", b"a\0b", b""),
            None,
        ),
        (
            "5 NUL in the client id",
            raw_connect(5, 0x02, b"", b"a\0b", b""),
            None,
        ),
        (
            "3.1.1 client id not UTF-8",
            raw_connect(4, 0x02, b"", b"a\xffb", b""),
            None,
        ),
        (
            "5 client id not UTF-8",
            raw_connect(5, 0x02, b"", b"a\xffb", b""),
            None,
        ),
        (
            "3.1.1 bytes after the payload",
            raw_connect(4, 0x02, b"", b"c13", b"zz"),
            None,
        ),
        (
            "5 bytes after the payload",
            raw_connect(5, 0x02, b"", b"c14", b"zz"),
            None,
        ),
        (
            "5 authentication method",
            raw_connect(
                5,
                0x02,
                &[&[0x15u8][..], &lp(b"SCRAM-SHA-1")].concat(),
                b"c15",
                b"",
            ),
            Some(0x8C),
        ),
        (
            "3.1.1 binary password",
            raw_connect(4, 0xC2, b"", b"c16", &[lp(b"u"), lp(b"\xff\xfe")].concat()),
            Some(0),
        ),
        (
            "5 password without username",
            raw_connect(5, 0x42, b"", b"c17", &lp(b"pw")),
            Some(0),
        ),
        (
            "3.1.1 empty client id, persistent session",
            raw_connect(4, 0x00, b"", b"", b""),
            Some(0x02),
        ),
        (
            "3.1.1 conforming",
            raw_connect(4, 0x02, b"", b"c18", b""),
            Some(0),
        ),
        (
            "5 conforming",
            raw_connect(5, 0x02, b"", b"c19", b""),
            Some(0),
        ),
    ]
}

/// The CONNACK code a broker answers each case with (`None`: closed without one).
fn connect_answers(port: u16) -> Vec<(&'static str, Option<u8>)> {
    connect_cases()
        .into_iter()
        .map(|(what, bytes, _)| {
            let mut raw = Raw::open(port);
            raw.send(&bytes);
            let code = match raw.read_packet() {
                Some((0x20, body)) => body.get(1).copied(),
                Some((other, _)) => panic!("{what}: first byte {other:#x}"),
                None => None,
            };
            (what, code)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_that_break_the_rules_are_answered_as_mosquitto_answers_them() {
    let mut h = Harness::builder().upstream().upstream_arg().start().await;
    let (upstream_port, gateway_port) = (h.upstream.port, h.gateway.port);
    let (mosquitto, outpost) = tokio::task::spawn_blocking(move || {
        (
            connect_answers(upstream_port),
            connect_answers(gateway_port),
        )
    })
    .await
    .unwrap();
    let expected: Vec<(&str, Option<u8>)> = connect_cases()
        .into_iter()
        .map(|(what, _, code)| (what, code))
        .collect();
    assert_eq!(
        mosquitto, expected,
        "Mosquitto's answers (the test's reference)"
    );
    assert_eq!(outpost, expected, "outpost answers as Mosquitto does");
    // The gateway still takes a conforming client afterwards.
    let device = Device::connect(gateway_port, "after-the-bad-connects").await;
    device.publish("telemetry/after/t", "{}").await;
    device.wait_acked(1).await;
    assert!(h.gateway.stop(), "clean exit");
}
