//! The local broker as local consumers (an HMI, a historian) see it: outpost's own session
//! layer (issue 13), tried with real clients of both protocol versions (`mosquitto_sub` and
//! `mosquitto_pub`, rumqttc) over real sockets. Each test names the spec section it checks.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::mqtt::{Client, Connect, Packet, Publish, Version, PUBCOMP, PUBREC, PUBREL};
use common::{eventually, Device, Harness};

/// A `mosquitto_sub` whose lines go to a file; killed when dropped.
struct Sub {
    child: Child,
    out: PathBuf,
}

impl Sub {
    /// `mosquitto_sub -p PORT ARGS -t ready/NAME`, printing `-F FORMAT` lines.
    fn start(dir: &Path, port: u16, name: &str, format: &str, args: &[&str]) -> Sub {
        let out = dir.join(format!("{name}.out"));
        let file = std::fs::File::create(&out).expect("sub output");
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .args(["-t", &format!("ready/{name}"), "-F", format])
            .stdout(Stdio::from(file))
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub runs");
        Sub { child, out }
    }

    /// [`Sub::start`], then [`Sub::wait_ready`].
    async fn ready(dir: &Path, port: u16, name: &str, format: &str, args: &[&str]) -> Sub {
        let sub = Sub::start(dir, port, name, format, args);
        sub.wait_ready(port, name).await;
        sub
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The lines of messages that are not the readiness probes.
    fn messages(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| !l.contains("ready/"))
            .collect()
    }

    /// Publishes on `ready/NAME` until the subscriber printed it: its subscriptions are in
    /// place from then on.
    async fn wait_ready(&self, port: u16, name: &str) {
        let topic = format!("ready/{name}");
        eventually(&format!("{name} subscribed"), || {
            publish(port, &["-t", &topic, "-m", "ready"]);
            self.lines().iter().any(|l| l.contains(&topic))
        })
        .await;
    }

    /// Waits for the process to exit by itself (`-C` or `-W`).
    async fn wait_exit(&mut self) {
        let child = &mut self.child;
        eventually("mosquitto_sub exits", || {
            matches!(child.try_wait(), Ok(Some(_)))
        })
        .await;
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub -p PORT ARGS`, which must succeed.
fn publish(port: u16, args: &[&str]) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success(), "mosquitto_pub {args:?}: {status}");
}

/// MQTT 5 §3.8.4 / 3.1.1 §3.8.4: "the QoS of Payload Messages sent in response to a
/// Subscription MUST be the minimum of the QoS of the originally published message and the
/// Maximum QoS granted by the Server". rumqttd 0.20 delivered QoS 0 and 1 as QoS 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_qos_is_the_lower_of_publish_and_subscription() {
    let mut h = Harness::builder().start().await;
    let port = h.gateway.port;
    for version in ["5", "311"] {
        let q2_name = format!("q2v{version}");
        let q0_name = format!("q0v{version}");
        let q2 = Sub::start(
            &h.dir,
            port,
            &q2_name,
            "%q %t",
            &["-V", version, "-q", "2", "-t", "qos/#"],
        );
        let q0 = Sub::start(
            &h.dir,
            port,
            &q0_name,
            "%q %t",
            &["-V", version, "-q", "0", "-t", "qos/#"],
        );
        q2.wait_ready(port, &q2_name).await;
        q0.wait_ready(port, &q0_name).await;
        for qos in ["1", "0", "2"] {
            publish(
                port,
                &[
                    "-V",
                    version,
                    "-q",
                    qos,
                    "-t",
                    &format!("qos/{qos}"),
                    "-m",
                    "x",
                ],
            );
        }
        publish(
            port,
            &["-V", version, "-q", "2", "-t", "qos/end", "-m", "x"],
        );
        eventually("both subscribers got every publish", || {
            q2.messages().len() >= 4 && q0.messages().len() >= 4
        })
        .await;
        assert_eq!(
            q2.messages(),
            ["1 qos/1", "0 qos/0", "2 qos/2", "2 qos/end"],
            "v{version}"
        );
        assert_eq!(
            q0.messages(),
            ["0 qos/1", "0 qos/0", "0 qos/2", "0 qos/end"],
            "v{version}"
        );
    }
    assert!(h.gateway.stop(), "clean exit");
}

/// MQTT 5 §3.1.2.4, §3.1.2.11.2 and 3.1.1 §3.1.2.4: a client with a kept session (Clean Start
/// 0 and a Session Expiry Interval; 3.1.1 Clean Session 0) gets, when it comes back, the QoS
/// 1/2 messages published while it was away. rumqttd 0.20 delivered none of them on MQTT 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_session_gets_what_was_published_while_it_was_away() {
    let mut h = Harness::builder().start().await;
    let port = h.gateway.port;
    for (version, keep) in [("5", &["-x", "600"][..]), ("311", &[][..])] {
        let id = format!("historian-v{version}");
        let topic = format!("plant{version}/#");
        let mut args = vec![
            "-V", version, "-c", "-i", &id, "-q", "1", "-t", &topic, "-C", "1",
        ];
        args.extend_from_slice(keep);
        // Connect, subscribe, and leave (after the readiness message).
        let mut first = Sub::ready(&h.dir, port, &id, "%t %p", &args).await;
        first.wait_exit().await;
        for n in 1..=3 {
            publish(
                port,
                &[
                    "-V",
                    version,
                    "-q",
                    "1",
                    "-t",
                    &format!("plant{version}/line/{n}"),
                    "-m",
                    &n.to_string(),
                ],
            );
        }
        // A QoS 0 publish for a client that is away is dropped, as Mosquitto drops it.
        publish(
            port,
            &[
                "-V",
                version,
                "-q",
                "0",
                "-t",
                &format!("plant{version}/line/0"),
                "-m",
                "0",
            ],
        );
        let mut args = vec![
            "-V", version, "-c", "-i", &id, "-q", "1", "-t", &topic, "-C", "3",
        ];
        args.extend_from_slice(keep);
        let mut back = Sub::start(&h.dir, port, &format!("{id}-back"), "%t %p", &args);
        back.wait_exit().await;
        assert_eq!(
            back.messages(),
            [1, 2, 3].map(|n| format!("plant{version}/line/{n} {n}")),
            "v{version}: what was queued while the client was away"
        );
    }
    assert!(h.gateway.stop(), "clean exit");
}

/// 3.1.1 §3.3.1.3, MQTT 5 §3.3.1.3: a new subscription gets every matching retained message,
/// with RETAIN set, however many there are: they are fed into the subscriber's queue as it
/// drains (more than `broker.max_queued_messages`, 1,000 by default). rumqttd 0.20 sent 200
/// of 2,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_gets_every_retained_message() {
    const RETAINED: u64 = 2_000;
    let mut h = Harness::builder().start().await;
    let device = Device::connect(h.gateway.port, "retainer").await;
    for n in 0..RETAINED {
        device
            .handle()
            .publish(
                format!("state/{n}"),
                rumqttc::QoS::AtLeastOnce,
                true,
                format!("{n}"),
            )
            .await
            .expect("queue publish");
    }
    device.wait_acked(RETAINED).await;
    // Cleared by an empty payload: not sent.
    publish(h.gateway.port, &["-t", "state/0", "-r", "-n", "-q", "1"]);
    let count = (RETAINED - 1).to_string();
    let mut sub = Sub::start(
        &h.dir,
        h.gateway.port,
        "late",
        "%r %t %p",
        &["-q", "1", "-t", "state/#", "-C", &count],
    );
    sub.wait_exit().await;
    let lines = sub.messages();
    assert_eq!(lines.len() as u64, RETAINED - 1);
    let mut topics: Vec<&str> = lines
        .iter()
        .map(|l| {
            assert!(l.starts_with("1 "), "sent with RETAIN: {l}");
            l.split(' ').nth(1).unwrap()
        })
        .collect();
    topics.sort_unstable();
    topics.dedup();
    assert_eq!(
        topics.len() as u64,
        RETAINED - 1,
        "each retained topic once"
    );
    assert!(!topics.contains(&"state/0"), "the cleared topic");
    assert!(h.gateway.stop(), "clean exit");
}

/// MQTT 5 §3.3.4: overlapping subscriptions of one client give one copy of a publish (at the
/// highest QoS of them, with each one's subscription identifier). rumqttd 0.20 sent a copy per
/// filter (1,024 filters turned a 100 KB publish into 105 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_subscriptions_deliver_one_copy() {
    let mut h = Harness::builder().start().await;
    let port = h.gateway.port;
    let sub = Sub::ready(
        &h.dir,
        port,
        "overlap",
        "%q %t",
        &[
            "-V", "5", "-q", "1", "-t", "o/#", "-t", "o/+", "-t", "+/x", "-t", "o/x",
        ],
    )
    .await;
    publish(port, &["-V", "5", "-q", "1", "-t", "o/x", "-m", "once"]);
    publish(port, &["-V", "5", "-q", "1", "-t", "o/end", "-m", "end"]);
    eventually("the end marker", || {
        sub.messages().iter().any(|l| l.ends_with("o/end"))
    })
    .await;
    assert_eq!(sub.messages(), ["1 o/x", "1 o/end"]);
    assert!(h.gateway.stop(), "clean exit");
}

/// MQTT 5 §3.3.2.3: user properties (in order), content type, response topic and correlation
/// data reach subscribers unchanged; the Message Expiry Interval is sent on (what remains of
/// it). rumqttd 0.20 dropped them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_properties_reach_subscribers_unchanged() {
    let mut h = Harness::builder().start().await;
    let port = h.gateway.port;
    let sub = Sub::ready(
        &h.dir,
        port,
        "props",
        "%P|%C|%R|%t|%p",
        &["-V", "5", "-q", "1", "-t", "p/#"],
    )
    .await;
    publish(
        port,
        &[
            "-V",
            "5",
            "-q",
            "1",
            "-t",
            "p/a",
            "-m",
            "x",
            "-D",
            "publish",
            "user-property",
            "z",
            "1",
            "-D",
            "publish",
            "content-type",
            "text/plain",
            "-D",
            "publish",
            "user-property",
            "a",
            "2",
            "-D",
            "publish",
            "response-topic",
            "reply/here",
            "-D",
            "publish",
            "message-expiry-interval",
            "600",
        ],
    );
    eventually("the publish", || !sub.messages().is_empty()).await;
    assert_eq!(sub.messages(), ["z:1 a:2|text/plain|reply/here|p/a|x"]);
    assert!(h.gateway.stop(), "clean exit");
}

/// A v5 CONNECT with `client_id` as raw bytes.
fn connect_v5(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Reads until the peer closes (or 30 s pass); everything it sent.
fn read_to_close(stream: &mut std::net::TcpStream) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// MQTT 5 §3.1.4 and §3.14.2.1: a second connection with a client id takes the session over;
/// the first is sent DISCONNECT 0x8E (Session taken over) and closed; the second gets its
/// CONNACK. With MQTT 5 and an empty client id, the broker assigns one (§3.2.2.3.7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_closes_the_old_connection_with_0x8e() {
    let mut h = Harness::builder().start().await;
    let address = ("127.0.0.1", h.gateway.port);
    let mut first = std::net::TcpStream::connect(address).unwrap();
    first.write_all(&connect_v5("panel-1")).unwrap();
    let mut connack = [0u8; 2];
    first.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; usize::from(connack[1])];
    first.read_exact(&mut rest).unwrap();
    assert_eq!(rest[1], 0x00, "accepted");

    let mut second = std::net::TcpStream::connect(address).unwrap();
    second.write_all(&connect_v5("panel-1")).unwrap();
    let from_first = read_to_close(&mut first);
    assert_eq!(
        from_first,
        [0xE0, 0x02, 0x8E, 0x00],
        "DISCONNECT 0x8E, then closed"
    );
    let mut connack = [0u8; 4];
    second.read_exact(&mut connack).unwrap();
    assert_eq!(
        (connack[0], connack[2], connack[3]),
        (0x20, 0x00, 0x00),
        "the new connection is accepted, no session present (Clean Start 1)"
    );

    // An empty client id: the CONNACK names the one assigned.
    let mut anonymous = std::net::TcpStream::connect(address).unwrap();
    anonymous.write_all(&connect_v5("")).unwrap();
    let mut head = [0u8; 2];
    anonymous.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; usize::from(head[1])];
    anonymous.read_exact(&mut body).unwrap();
    assert_eq!(body[1], 0x00, "accepted");
    // Flags, code, property length, then the first property.
    assert_eq!(body[3], 0x12, "Assigned Client Identifier: {body:?}");
    let len = usize::from(u16::from_be_bytes([body[4], body[5]]));
    assert!(len > 0, "a non-empty assigned id");
    assert!(h.gateway.stop(), "clean exit");
}

/// Issue 13, "durable local state" (MQTT 5 §4.1 and 3.1.1 §4.1, the session state a server
/// keeps): a kept session's subscription, the QoS 1 messages acknowledged to their publisher
/// while its client was away, and retained messages survive a `kill -9` of the gateway; a
/// cleared retained message stays cleared. Before `broker.sqlite`, all of it was in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_sessions_and_retained_messages_survive_kill_9() {
    let mut h = Harness::builder().start().await;
    let port = h.gateway.port;
    let sub_args = |count: &'static str| -> Vec<&'static str> {
        vec![
            "-V", "5", "-c", "-x", "600", "-i", "hmi", "-q", "1", "-t", "cell/#", "-C", count,
        ]
    };
    let mut first = Sub::ready(&h.dir, port, "hmi", "%t %p", &sub_args("1")).await;
    first.wait_exit().await;
    for n in 1..=3 {
        publish(
            port,
            &["-q", "1", "-t", &format!("cell/{n}"), "-m", &n.to_string()],
        );
    }
    for (topic, payload) in [("status/a", "up"), ("status/b", "up"), ("status/b", "")] {
        publish(port, &["-q", "1", "-r", "-t", topic, "-m", payload]);
    }
    // Every publish above was acknowledged (mosquitto_pub waits for its PUBACK): no clean
    // shutdown follows.
    h.gateway.kill();
    h.gateway.start();
    let port = h.gateway.port;
    let mut back = Sub::start(&h.dir, port, "hmi-back", "%t %p", &sub_args("3"));
    back.wait_exit().await;
    assert_eq!(
        back.messages(),
        ["cell/1 1", "cell/2 2", "cell/3 3"],
        "what was queued for the kept session before the kill"
    );
    let mut retained = Sub::ready(
        &h.dir,
        port,
        "status",
        "%r %t %p",
        &["-t", "status/#", "-W", "3"],
    )
    .await;
    eventually("the retained message", || {
        retained.messages().iter().any(|l| l == "1 status/a up")
    })
    .await;
    retained.wait_exit().await;
    assert_eq!(
        retained.messages(),
        ["1 status/a up"],
        "status/b was cleared before the kill"
    );
    assert!(h.gateway.stop(), "clean exit");
}

/// Issue 13, "QoS 2 exactly once in both directions" and "inflight QoS 1/2 state" across a
/// `kill -9` (MQTT 5 §4.3.3, §4.4; 3.1.1 §4.3.3, §4.4): the gateway is killed while
/// - a device's QoS 2 publish was acknowledged with PUBREC and not yet released: after the
///   restart its resend (DUP) gets PUBREC and is neither journaled nor delivered again;
/// - a kept subscriber had sent PUBREC for a QoS 2 delivery and got PUBREL: after the restart
///   it gets the PUBREL again (not the PUBLISH, which it would take for a new message);
/// - a kept subscriber had a QoS 1 delivery unacknowledged: after the restart it gets it
///   again with DUP set and the same packet id.
///
/// Mosquitto keeps this state only at its autosave interval and on a clean stop, so this test
/// runs against the gateway only.
#[test]
fn inflight_state_survives_kill_9() {
    let mut h = Harness::builder().start_blocking();
    let kept = |id: &str| Connect::new(Version::V5, id).persistent();
    let (mut hmi, _) = Client::connect(h.gateway.port, &kept("hmi"));
    hmi.subscribe("cell/#", 2);
    let (mut historian, _) = Client::connect(h.gateway.port, &kept("historian"));
    historian.subscribe("line/#", 1);
    let (mut plc, _) = Client::connect(h.gateway.port, &kept("plc"));

    let two = Publish::new("cell/a", "two").qos(2).id(7);
    plc.publish(&two);
    assert!(
        matches!(plc.next(), Packet::PubRec { id: 7, code: 0 }),
        "PUBREC for the QoS 2 publish"
    );
    assert_eq!(plc.publish_done(&Publish::new("line/a", "one").qos(1)), 0);

    let delivered = hmi.expect_publish();
    assert_eq!(
        (delivered.qos, delivered.payload.as_slice()),
        (2, &b"two"[..])
    );
    hmi.send_ack(PUBREC, delivered.id);
    assert!(
        matches!(hmi.next(), Packet::PubRel { id, .. } if id == delivered.id),
        "PUBREL once the release is stored"
    );
    let unacked = historian.expect_publish();
    assert_eq!((unacked.qos, unacked.dup), (1, false));
    // A QoS 1 delivery goes out before its packet id is stored: wait until it is.
    let state = rusqlite::Connection::open(h.gateway.data.join("broker.sqlite")).unwrap();
    let stored = || -> Option<i64> {
        state
            .query_row(
                "SELECT packet_id FROM messages WHERE client_id = 'historian'",
                [],
                |row| row.get(0),
            )
            .ok()
            .flatten()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stored() != Some(i64::from(unacked.id)) {
        assert!(std::time::Instant::now() < deadline, "the packet id stored");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(state);

    h.gateway.kill();
    h.gateway.start();
    let port = h.gateway.port;

    let (mut plc, connack) = Client::connect(port, &kept("plc"));
    assert!(connack.session_present);
    plc.publish(&two.clone().dup());
    assert!(
        matches!(plc.next(), Packet::PubRec { id: 7, code: 0 }),
        "the resend is acknowledged"
    );
    plc.send_ack(PUBREL, 7);
    assert!(matches!(plc.next(), Packet::PubComp { id: 7, .. }));
    assert_eq!(
        plc.publish_done(&Publish::new("cell/end", "sentinel").qos(1)),
        0
    );

    let (mut hmi, connack) = Client::connect(port, &kept("hmi"));
    assert!(connack.session_present);
    assert!(
        matches!(hmi.next(), Packet::PubRel { id, .. } if id == delivered.id),
        "the PUBREL again, not the PUBLISH"
    );
    hmi.send_ack(PUBCOMP, delivered.id);
    assert_eq!(
        hmi.receive_until("cell/end"),
        [],
        "nothing before the sentinel"
    );

    let (mut historian, connack) = Client::connect(port, &kept("historian"));
    assert!(connack.session_present);
    let again = historian.expect_publish();
    assert_eq!(
        (again.dup, again.id, again.payload.as_slice()),
        (true, unacked.id, &b"one"[..]),
        "resent with DUP and its packet id"
    );
    historian.ack(&again);
    assert!(h.gateway.stop(), "clean exit");
}

/// A client driven by rumqttc's MQTT 5 event loop; every incoming PUBLISH and CONNACK goes to
/// its channel.
struct RumqttcV5 {
    client: rumqttc::v5::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::Incoming>,
    driver: tokio::task::JoinHandle<()>,
}

impl RumqttcV5 {
    /// Connects with Clean Start 0 and a Session Expiry Interval of 600 s.
    fn kept(port: u16, id: &str) -> RumqttcV5 {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(600));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (send, events) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::v5::Event::Incoming(incoming) = event {
                    if send.send(incoming).is_err() {
                        return;
                    }
                }
            }
        });
        RumqttcV5 {
            client,
            events,
            driver,
        }
    }

    /// The next incoming packet that `pick` takes.
    async fn next<T>(&mut self, mut pick: impl FnMut(rumqttc::v5::Incoming) -> Option<T>) -> T {
        let wait = async {
            loop {
                let incoming = self.events.recv().await.expect("the event loop runs");
                if let Some(found) = pick(incoming) {
                    return found;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the packet came")
    }

    async fn session_present(&mut self) -> bool {
        self.next(|incoming| match incoming {
            rumqttc::v5::Incoming::ConnAck(ack) => Some(ack.session_present),
            _ => None,
        })
        .await
    }

    async fn publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        self.next(|incoming| match incoming {
            rumqttc::v5::Incoming::Publish(publish) => Some(publish),
            _ => None,
        })
        .await
    }
}

impl Drop for RumqttcV5 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// rumqttc's MQTT 5 client, as a historian written in Rust would use the broker: a QoS 2
/// publish with properties reaches its QoS 1 subscription at QoS 1 (MQTT 5 §3.8.4) with the
/// properties unchanged and in order (§3.3.2.3), and what is published while it is away waits
/// in its kept session (§4.1) for its return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rumqttc_mqtt5_client_gets_the_lower_qos_its_properties_and_its_kept_session() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    let mut h = Harness::builder().start().await;
    let mut historian = RumqttcV5::kept(h.gateway.port, "historian-v5");
    assert!(!historian.session_present().await, "a new session");
    historian
        .client
        .subscribe("plant/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    historian
        .next(|incoming| matches!(incoming, rumqttc::v5::Incoming::SubAck(_)).then_some(()))
        .await;
    let mut line = RumqttcV5::kept(h.gateway.port, "line-v5");
    line.session_present().await;
    let properties = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("plant/replies".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00\x01")),
        user_properties: vec![
            ("unit".into(), "C".into()),
            ("site".into(), "3".into()),
            ("unit".into(), "F".into()),
        ],
        ..PublishProperties::default()
    };
    line.client
        .publish_with_properties(
            "plant/oven",
            QoS::ExactlyOnce,
            false,
            "21.5",
            properties.clone(),
        )
        .await
        .unwrap();
    let got = historian.publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce, "the lower of 2 and 1");
    assert_eq!(&got.payload[..], b"21.5");
    assert_eq!(got.properties, Some(properties), "unchanged and in order");

    drop(historian);
    line.client
        .publish("plant/press", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    line.next(|incoming| matches!(incoming, rumqttc::v5::Incoming::PubAck(_)).then_some(()))
        .await;
    let mut historian = RumqttcV5::kept(h.gateway.port, "historian-v5");
    assert!(historian.session_present().await, "its session was kept");
    let queued = historian.publish().await;
    assert_eq!(
        (&queued.topic[..], &queued.payload[..]),
        (&b"plant/press"[..], &b"while away"[..])
    );
    assert!(h.gateway.stop(), "clean exit");
}
