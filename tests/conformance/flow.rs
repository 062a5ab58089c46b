//! Flow control (issue 13, item 9): topic aliases from the client, the client's Maximum
//! Packet Size, Receive Maximum both ways, Server Keep Alive, keep-alive 0.

use std::collections::VecDeque;
use std::time::Duration;

use crate::common::mqtt::{Client, Connect, Packet, Prop, Publish, Version};
use crate::target::{Setup, Target};

const V5: Version = Version::V5;

/// The reason codes of the DISCONNECTs `client` gets before the broker closes it (which it
/// must, within the client's read timeout).
fn disconnect_codes(client: &mut Client) -> Vec<u8> {
    client
        .closed()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Disconnect { code, .. } => Some(code),
            _ => None,
        })
        .collect()
}

/// MQTT 5 §3.3.2.3.4 (Topic Alias) and §3.2.2.3.8 (Topic Alias Maximum): the broker
/// announces how many aliases a client may use; a PUBLISH with a topic and an alias sets the
/// alias, one with an empty topic and the alias uses it, a later topic replaces it; the
/// subscriber gets the full topic, not the publisher's alias (aliases belong to one
/// connection). An alias above the maximum is answered with DISCONNECT 0x94 (Topic Alias
/// invalid) and the connection closed; nothing of it reaches the subscriber.
fn topic_aliases_from_the_client(target: &Target) {
    let mut sub = target.client(V5, "alias-sub");
    sub.subscribe("alias/#", 1);
    let (mut publisher, connack) = target.connect(&Connect::new(V5, "alias-pub"));
    let max = prop!(connack.props, TopicAliasMaximum).expect("a Topic Alias Maximum");
    assert!(max > 0, "{connack:?}");
    for (topic, payload, expected) in [
        ("alias/a", "set", "alias/a"),
        ("", "used", "alias/a"),
        ("alias/b", "replaced", "alias/b"),
        ("", "used again", "alias/b"),
    ] {
        assert_eq!(publisher.publish_done(&with_alias(topic, payload, 1)), 0);
        let got = sub.receive();
        assert_eq!(
            (got.topic.as_str(), got.text().as_str()),
            (expected, payload)
        );
        assert_eq!(prop!(got.props, TopicAlias), None, "{got:?}");
    }
    publisher.disconnect();
    let mut client = target.client(V5, "alias-over");
    client.publish(&with_alias("alias/c", "refused", max + 1));
    assert_eq!(disconnect_codes(&mut client), [0x94], "alias {}", max + 1);
    target.publish(V5, &Publish::new("alias/end", "end").qos(1));
    assert_eq!(sub.receive_until("alias/end"), [], "nothing of the refused");
    sub.disconnect();
}
both!(topic_aliases_from_the_client);

/// A QoS 1 PUBLISH with this Topic Alias.
fn with_alias(topic: &str, payload: &str, alias: u16) -> Publish {
    Publish::new(topic, payload)
        .qos(1)
        .props(vec![Prop::TopicAlias(alias)])
}

/// MQTT 5 §3.3.2.3.4: "A Topic Alias of 0 is not permitted" [MQTT-3.3.2-8]. 0x94 (Topic
/// Alias invalid) is defined for an alias above the maximum (§3.14.2.1); for this one §4.13.1
/// leaves 0x81 or 0x82, and Mosquitto 2 answers DISCONNECT 0x81 (Malformed Packet) and
/// closes the connection.
fn topic_alias_zero_is_malformed(target: &Target) {
    let mut client = target.client(V5, "alias-zero");
    client.publish(&with_alias("alias/c", "refused", 0));
    assert_eq!(disconnect_codes(&mut client), [0x81]);
}
both!(topic_alias_zero_is_malformed);

/// MQTT 5 §3.1.2.11.4 (Maximum Packet Size) and §4.13: "The Server MUST NOT send packets
/// exceeding Maximum Packet Size to the Client"; "Where a Packet is too large to send, the
/// Server MUST discard it without sending it and then behave as if it had completed sending
/// that Application Message". A QoS 1 publish larger than the subscriber's maximum is not
/// sent to it; the smaller ones after it are (the big one holds nothing up).
fn the_clients_maximum_packet_size(target: &Target) {
    let connect = Connect::new(V5, "small-sub").prop(Prop::MaximumPacketSize(128));
    let (mut sub, _) = target.connect(&connect);
    sub.subscribe("mps/#", 1);
    for (topic, size) in [("mps/big", 300), ("mps/small", 10), ("mps/big2", 200)] {
        target.publish(V5, &Publish::new(topic, vec![b'x'; size]).qos(1));
    }
    target.publish(V5, &Publish::new("mps/end", "end").qos(1));
    let got: Vec<String> = sub
        .receive_until("mps/end")
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, ["mps/small"]);
    sub.disconnect();
}
both!(the_clients_maximum_packet_size);

/// MQTT 5 §3.3.4 with §3.1.2.11.3 (Receive Maximum of the client): "The Server MUST NOT send
/// more than Receive Maximum QoS 1 and QoS 2 PUBLISH packets for which it has not received
/// PUBACK, PUBCOMP, or PUBREC with a Reason Code of 128 or greater". A subscriber with
/// Receive Maximum 2 holds its acknowledgements: the broker sends two of five queued QoS 1
/// messages, then nothing until one is acknowledged (checked after two PINGREQ round trips:
/// a broker that ignored the window would have written the third message by then, since
/// every message was acknowledged to its publisher before), then one more for each PUBACK,
/// in order.
fn the_clients_receive_maximum(target: &Target) {
    const WINDOW: usize = 2;
    let connect = Connect::new(V5, "window-sub").prop(Prop::ReceiveMaximum(WINDOW as u16));
    let (mut sub, _) = target.connect(&connect);
    sub.subscribe("window/#", 1);
    let payloads: Vec<String> = (1..=5).map(|n| n.to_string()).collect();
    for payload in &payloads {
        target.publish(V5, &Publish::new("window/x", payload.as_str()).qos(1));
    }
    let mut unacked = VecDeque::new();
    let mut got = Vec::new();
    while got.len() < payloads.len() {
        while unacked.len() < WINDOW && got.len() < payloads.len() {
            let message = sub.expect_publish();
            got.push(message.text());
            unacked.push_back(message);
        }
        for _ in 0..2 {
            assert_eq!(
                sub.ping(),
                [],
                "a publish beyond the window (after {got:?})"
            );
        }
        let oldest = unacked.pop_front().expect("a full window");
        sub.ack(&oldest);
    }
    assert_eq!(got, payloads, "every message, in order");
    sub.disconnect();
}
// Mosquitto 2.0.11 sends a client with Receive Maximum 2 the first two messages, but after
// the PUBACK of the first it sends the third and the fourth at once: three unacknowledged.
outpost_only!(the_clients_receive_maximum);

/// MQTT 5 §3.3.4 with §3.2.2.3.3 (Receive Maximum of the server): "If it receives more than
/// Receive Maximum QoS 1 and QoS 2 PUBLISH packets where it has not sent a PUBACK or PUBCOMP
/// in response, the Server uses a DISCONNECT packet with Reason Code 0x93 (Receive Maximum
/// exceeded)". QoS 2 publishes stay unacknowledged until PUBREL, and this client never sends
/// one: the publish after the first Receive Maximum of them is answered with DISCONNECT 0x93
/// and the connection is closed (whatever PUBRECs came before are for the ones within it).
fn more_than_the_servers_receive_maximum(target: &Target) {
    let (mut client, connack) = target.connect(&Connect::new(V5, "eager"));
    let max = prop!(connack.props, ReceiveMaximum).expect("a Receive Maximum");
    assert!((1..=1000).contains(&max), "Receive Maximum {max}");
    let publishes: Vec<u8> = (1..=max + 1)
        .flat_map(|id| Publish::new("eager/x", "x").qos(2).id(id).encode(V5))
        .collect();
    client.send_raw(&publishes);
    let mut packets = client.closed();
    assert!(
        matches!(packets.pop(), Some(Packet::Disconnect { code: 0x93, .. })),
        "the last packet before the close, after {packets:?}"
    );
    for packet in packets {
        assert!(
            matches!(packet, Packet::PubRec { id, code: 0 } if id <= max),
            "{packet:?}"
        );
    }
}
// Mosquitto 2.0.11 (Receive Maximum 20) answers the 21st unreleased QoS 2 PUBLISH with PUBREC
// 0x97 (Quota exceeded), does not count it, and keeps the connection open (the 22nd gets
// PUBREC 0x00): no DISCONNECT 0x93.
outpost_only!(more_than_the_servers_receive_maximum);

/// A longest keep-alive of 10 s for MQTT 5 clients (`broker.max_keepalive_secs`;
/// Mosquitto's `max_keepalive`, which must be at least 10).
const MAX_KEEPALIVE_10: Setup = Setup {
    outpost: "[broker]\nmax_keepalive_secs = 10\n",
    mosquitto: "max_keepalive 10\n",
};

/// MQTT 5 §3.1.2.10 and §3.2.2.3.14 (Server Keep Alive): "If the Server sends a Server Keep
/// Alive on the CONNACK packet, the Client MUST use this value instead of the Keep Alive value
/// the Client sent". With a longest keep-alive of 10 s (the spec leaves the policy to the
/// server; this is Mosquitto 2's `max_keepalive`), an MQTT 5 client asking for none (0) or
/// for more (60 s) is told 10 s, and the broker holds it to that: silent, it is closed (after
/// 1.5 times the keep-alive, §3.1.2.10; on MQTT 5 a DISCONNECT, if any, says 0x8D, Keep Alive
/// timeout); one asking for 5 s keeps its own (no property). A 3.1.1 client cannot be told:
/// its 60 s stand. It connects first and stays silent as long as the others, so it would have
/// been closed before them if it were held to 10 s; it is still served once they are closed.
fn server_keep_alive(target: &Target) {
    let (mut v4, _) = target.connect(&Connect::new(Version::V4, "ka-v4").keep_alive(60));
    let mut told_clients = Vec::new();
    for (asked, told) in [(0, Some(10)), (60, Some(10)), (5, None)] {
        let connect = Connect::new(V5, &format!("ka-{asked}")).keep_alive(asked);
        let (client, connack) = target.connect(&connect);
        assert_eq!(
            prop!(connack.props, ServerKeepAlive),
            told,
            "keep-alive {asked}"
        );
        match told {
            Some(_) => told_clients.push((asked, client)),
            None => client.disconnect(),
        }
    }
    for (asked, mut client) in told_clients {
        client.set_wait(Duration::from_secs(40));
        let codes = disconnect_codes(&mut client);
        assert!(
            codes.iter().all(|&code| code == 0x8D),
            "keep-alive {asked}: closed with {codes:?}"
        );
    }
    assert_eq!(v4.ping(), [], "3.1.1 keeps its own keep-alive");
    v4.disconnect();
}
both!(server_keep_alive, MAX_KEEPALIVE_10);

/// 3.1.1 §3.1.2.10 and MQTT 5 §3.1.2.10: "A Keep Alive value of 0 has the effect of turning
/// off the Keep Alive mechanism": with the brokers' default settings, a 3.1.1 client with
/// keep-alive 0 stays connected through 4.5 s of silence, while one with keep-alive 1 is
/// closed (after 1.5 s: the check can fail). An MQTT 5 client asking for 0 is served too
/// (told the default longest keep-alive, 65,535 s, if anything).
fn keep_alive_zero(target: &Target) {
    let (mut short, _) = target.connect(&Connect::new(Version::V4, "ka-short").keep_alive(1));
    assert_eq!(short.closed(), [], "keep-alive 1, silent: closed");
    let (mut off, _) = target.connect(&Connect::new(Version::V4, "ka-off").keep_alive(0));
    let (mut off5, connack) = target.connect(&Connect::new(V5, "ka-off5").keep_alive(0));
    let told = prop!(connack.props, ServerKeepAlive);
    assert!(told.is_none() || told == Some(u16::MAX), "told {told:?}");
    // Three times the 1.5 s that closed the other one.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(off.ping(), [], "3.1.1 keep-alive 0");
    assert_eq!(off5.ping(), [], "MQTT 5 keep-alive 0");
    off.disconnect();
    off5.disconnect();
}
both!(keep_alive_zero);
