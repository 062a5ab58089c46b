//! Subscriptions (issue 13, item 11): shared subscriptions, `$` topics and wildcards, and
//! topic names and filters that are refused. `tests/broker_guards.rs` already checks, against
//! both brokers, that a PUBLISH to `a/+/b` or `a/#` and a SUBSCRIBE to `a/#/b` or `a/b+`
//! close the connection (MQTT 5: DISCONNECT 0x82 and 0x81); the cases here are the others.

use std::collections::BTreeMap;

use crate::common::mqtt::{
    subscribe_packet, unsubscribe_packet, Client, Connect, Packet, Publish, Version,
};
use crate::retained::options;
use crate::target::Target;

/// MQTT 5 §4.8.2 (Shared Subscriptions): each message matching `$share/GROUP/FILTER` goes to
/// exactly one of the group's sessions; each group gets every message, alongside ordinary
/// subscriptions. 3.1.1 has no shared subscriptions, but Mosquitto serves `$share/` filters
/// from 3.1.1 clients the same way, so the scenario runs on both versions. Both brokers take
/// turns between members, so each member gets some of the messages.
fn shared_subscriptions(target: &Target) {
    const MESSAGES: usize = 10;
    for v in Version::BOTH {
        let tag = v.tag();
        let topic = format!("{tag}/shared/x");
        let end = |member: &str| format!("{tag}/end/{member}");
        let members: BTreeMap<&str, Client> = ["g1", "g2", "h1"]
            .into_iter()
            .map(|member| {
                let mut client = target.client(v, &format!("{tag}-{member}"));
                let group = &member[..1];
                client.subscribe(&format!("$share/{group}/{tag}/shared/#"), 1);
                client.subscribe(&end(member), 1);
                (member, client)
            })
            .collect();
        for n in 0..MESSAGES {
            target.publish(v, &Publish::new(&topic, n.to_string()).qos(1));
        }
        let mut got: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (member, mut client) in members {
            target.publish(v, &Publish::new(&end(member), "end").qos(1));
            let texts = client
                .receive_until(&end(member))
                .iter()
                .map(Publish::text)
                .collect();
            got.insert(member, texts);
            client.disconnect();
        }
        let all: Vec<String> = (0..MESSAGES).map(|n| n.to_string()).collect();
        assert_eq!(got["h1"], all, "{v:?}: a group of one gets every message");
        let mut group_g = [got["g1"].clone(), got["g2"].clone()].concat();
        group_g.sort_by_key(|text| text.parse::<usize>().unwrap());
        assert_eq!(
            group_g, all,
            "{v:?}: each message to exactly one member of g: {got:?}"
        );
        assert!(
            !got["g1"].is_empty() && !got["g2"].is_empty(),
            "{v:?}: the members take turns: {got:?}"
        );
    }
}
both!(shared_subscriptions);

/// 3.1.1 §4.7.2 and MQTT 5 §4.7.2: "The Server MUST NOT match Topic Filters starting with a
/// wildcard character (# or +) with Topic Names beginning with a $ character": subscriptions
/// to `#` and `+/x` do not get a publish to `$data/x`; one to `$data/#` does. (A client may
/// publish to `$` topics other than `$SYS`: both brokers pass `$data/x` on.)
fn dollar_topics_are_not_matched_by_leading_wildcards(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let dollar = format!("$data{tag}/x");
        let sentinel = format!("{tag}/x");
        let mut wild = target.client(v, &format!("{tag}-wild"));
        assert_eq!(wild.subscribe_with(&[("#", 1), ("+/x", 1)], &[]), [1, 1]);
        let mut exact = target.client(v, &format!("{tag}-exact"));
        exact.subscribe(&format!("$data{tag}/#"), 1);
        exact.subscribe(&sentinel, 1);
        target.publish(v, &Publish::new(&dollar, "x").qos(1));
        target.publish(v, &Publish::new(&sentinel, "end").qos(1));
        assert_eq!(wild.receive_until(&sentinel), [], "{v:?}: # and +/x");
        let got: Vec<String> = exact
            .receive_until(&sentinel)
            .into_iter()
            .map(|m| m.topic)
            .collect();
        assert_eq!(got, [dollar], "{v:?}: $data/#");
        wild.disconnect();
        exact.disconnect();
    }
}
both!(dollar_topics_are_not_matched_by_leading_wildcards);

/// `$SYS/` topics are the broker's own: MQTT 5 §4.7.2 and 3.1.1 §4.7.2 say applications
/// cannot use topics starting with `$` for their own purposes and "the Server SHOULD prevent
/// Clients from using such Topic Names to exchange messages with other Clients". As
/// Mosquitto 2 does, a client's publish to `$SYS/...` is not delivered to subscribers (MQTT 5:
/// PUBACK 0x87, Not authorized; 3.1.1 has no way to say so: PUBACK), nor is one to a
/// `$share/...` topic name (MQTT 5: PUBACK 0x87).
fn clients_cannot_publish_to_sys_topics(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let sys = format!("$SYS/test{tag}/x");
        let sentinel = format!("{tag}/sys-end");
        let mut sub = target.client(v, &format!("{tag}-sys-sub"));
        sub.subscribe(&format!("$SYS/test{tag}/#"), 1);
        sub.subscribe(&sentinel, 1);
        let mut publisher = target.client(v, &format!("{tag}-sys-pub"));
        let refused = match v {
            Version::V4 => 0,
            Version::V5 => 0x87,
        };
        assert_eq!(
            publisher.publish_done(&Publish::new(&sys, "fake").qos(1)),
            refused,
            "{v:?}: PUBACK to {sys}"
        );
        if v == Version::V5 {
            let share = format!("$share/g/{tag}/x");
            assert_eq!(
                publisher.publish_done(&Publish::new(&share, "x").qos(1)),
                refused,
                "{v:?}: PUBACK to {share}"
            );
        }
        publisher.publish_done(&Publish::new(&sentinel, "end").qos(1));
        assert_eq!(sub.receive_until(&sentinel), [], "{v:?}: {sys} delivered");
        publisher.disconnect();
        sub.disconnect();
    }
}
both!(clients_cannot_publish_to_sys_topics);

/// 3.1.1 §3.8.4 and MQTT 5 §3.8.4: "If a Server receives a SUBSCRIBE packet containing a
/// Topic Filter that is identical to a Non-shared Subscription's Topic Filter for the current
/// Session, then it MUST replace that existing Subscription with a new Subscription": a
/// filter subscribed at QoS 2, then again at QoS 0, delivers one copy at QoS 0.
fn a_repeated_subscribe_replaces_the_subscription(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let filter = format!("{tag}/again/#");
        let sentinel = format!("{tag}/again/end");
        let mut client = target.client(v, &format!("{tag}-again"));
        client.subscribe(&filter, 2);
        client.subscribe(&filter, 0);
        target.publish(v, &Publish::new(&format!("{tag}/again/x"), "x").qos(2));
        target.publish(v, &Publish::new(&sentinel, "end").qos(2));
        let got: Vec<(String, u8)> = client
            .receive_until(&sentinel)
            .into_iter()
            .map(|m| (m.topic, m.qos))
            .collect();
        assert_eq!(got, [(format!("{tag}/again/x"), 0)], "{v:?}");
        client.disconnect();
    }
}
both!(a_repeated_subscribe_replaces_the_subscription);

/// 3.1.1 §3.10.4 and MQTT 5 §3.10.4: after an UNSUBSCRIBE the broker "MUST stop adding any
/// new messages for delivery to the Client" on that filter (a sentinel on another
/// subscription arrives alone); its UNSUBACK has, on MQTT 5, a reason code per filter
/// (§3.11.3: 0x00 Success, 0x11 No subscription existed), on 3.1.1 none.
fn unsubscribe_stops_deliveries(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let sentinel = format!("{tag}/unsub-end");
        let mut client = target.client(v, &format!("{tag}-unsub"));
        client.subscribe(&format!("{tag}/unsub/#"), 1);
        client.subscribe(&sentinel, 1);
        let codes = client.unsubscribe(&[&format!("{tag}/unsub/#"), &format!("{tag}/never")]);
        let expected: &[u8] = match v {
            Version::V4 => &[],
            Version::V5 => &[0x00, 0x11],
        };
        assert_eq!(codes, expected, "{v:?}: UNSUBACK");
        target.publish(v, &Publish::new(&format!("{tag}/unsub/x"), "x").qos(1));
        target.publish(v, &Publish::new(&sentinel, "end").qos(1));
        assert_eq!(client.receive_until(&sentinel), [], "{v:?}");
        client.disconnect();
    }
}
both!(unsubscribe_stops_deliveries);

/// What a broker does with one packet sent after CONNECT: the DISCONNECT reason codes it sent
/// before closing the connection (`None`: it did not close it and answered a PINGREQ).
fn outcome(target: &Target, v: Version, packet: &[u8]) -> Option<Vec<u8>> {
    let mut client = target.client(v, &format!("{}-refused", v.tag()));
    client.send_raw(packet);
    client.send_raw(&[0xC0, 0x00]);
    let mut codes = Vec::new();
    loop {
        match client.recv() {
            None => return Some(codes),
            Some(Packet::PingResp) => return None,
            Some(Packet::Disconnect { code, .. }) => codes.push(code),
            Some(_) => {}
        }
    }
}

/// A SUBSCRIBE with one filter and subscription options byte.
fn subscribe(v: Version, filter: &str, options: u8) -> Vec<u8> {
    subscribe_packet(v, 1, &[(filter, options)], &[])
}

/// 3.1.1 §4.7.1 and §4.7.3, MQTT 5 §4.7.1, §4.7.3 and §4.8.2, §3.8.3.1, §3.10.3 (the cases
/// `tests/broker_guards.rs` does not check): a topic filter with `#` not alone as the last
/// level or `+` not alone in its level, an empty filter, a shared subscription whose group has
/// a wildcard or whose filter is invalid, in a SUBSCRIBE or an UNSUBSCRIBE; subscription
/// options with QoS 3 or reserved bits set (MQTT 5: also Retain Handling 3); a PUBLISH with
/// an empty topic (and no alias), `+` or `a/b#`: each closes the connection, on MQTT 5 after a
/// DISCONNECT with the code Mosquitto 2 sends (0x81 Malformed Packet for filters and options,
/// 0x82 Protocol Error for topic names; §4.13.1 lets the server choose between them). A will
/// topic with a wildcard closes the connection without CONNACK.
fn invalid_filters_and_topic_names_close_the_connection(target: &Target) {
    for v in Version::BOTH {
        let mut cases: Vec<(String, Vec<u8>, u8)> = Vec::new();
        for filter in [
            "#/a",
            "a#",
            "",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/a/#/b",
        ] {
            cases.push((
                format!("SUBSCRIBE {filter:?}"),
                subscribe(v, filter, 1),
                0x81,
            ));
        }
        for filter in ["a/#/b", "a+"] {
            cases.push((
                format!("UNSUBSCRIBE {filter:?}"),
                unsubscribe_packet(v, 1, &[filter]),
                0x81,
            ));
        }
        let bad_options: &[u8] = match v {
            Version::V4 => &[0x03, 0x41, 0x05],
            Version::V5 => &[0x03, 0x41, 0x31],
        };
        for &byte in bad_options {
            cases.push((
                format!("options {byte:#04x}"),
                subscribe(v, "a", byte),
                0x81,
            ));
        }
        for topic in ["", "+", "a/b#"] {
            let publish = Publish::new(topic, "x").qos(1).id(1).encode(v);
            cases.push((format!("PUBLISH to {topic:?}"), publish, 0x82));
        }
        for (what, bytes, code) in cases {
            let expected = match v {
                Version::V4 => vec![],
                Version::V5 => vec![code],
            };
            assert_eq!(
                outcome(target, v, &bytes),
                Some(expected),
                "{v:?} {what}: DISCONNECT codes before the close"
            );
        }
        let will = Publish::new("a/+", "x");
        let (mut client, answer) =
            Client::try_connect(target.port, &Connect::new(v, "wild-will").will(will));
        assert_eq!(answer, None, "{v:?}: will topic a/+");
        assert_eq!(client.closed(), []);
    }
}
both!(invalid_filters_and_topic_names_close_the_connection);

/// MQTT 5 §4.8.2: "A Shared Subscription's Topic Filter MUST start with $share/ and MUST
/// contain a ShareName that is at least one character long [MQTT-4.8.2-1]. The ShareName MUST
/// NOT contain the characters "/", "+" or "#", but MUST be followed by a "/" character. This
/// "/" character MUST be followed by a Topic Filter [MQTT-4.8.2-2]": `$share/g` and
/// `$share//a` are refused like the other invalid filters (DISCONNECT 0x81); and §3.8.3.1:
/// "It is a Protocol Error to set the No Local bit to 1 on a Shared Subscription" (0x81 or
/// 0x82, §4.13.1).
fn mqtt5_shared_subscription_filters_must_be_complete(target: &Target) {
    let v = Version::V5;
    for filter in ["$share/g", "$share//a"] {
        assert_eq!(
            outcome(target, v, &subscribe(v, filter, 1)),
            Some(vec![0x81]),
            "SUBSCRIBE {filter:?}"
        );
    }
    let no_local = subscribe(v, "$share/g/a", options(1, true, false, 0));
    let codes = outcome(target, v, &no_local).expect("closed");
    assert!(
        codes == [0x81] || codes == [0x82],
        "No Local on a shared subscription: {codes:?}"
    );
}
// Mosquitto 2.0.11 grants `$share/g` and `$share//a` (SUBACK 0x01) and a shared subscription
// with No Local set (SUBACK 0x01).
outpost_only!(mqtt5_shared_subscription_filters_must_be_complete);

/// 3.1.1 §4.7.1 and §4.7.2: 3.1.1 has no shared subscriptions, so `$share/g` and `$share//a`
/// are valid topic filters there (no wildcard out of place; they match the topics of those
/// names): a 3.1.1 client's SUBSCRIBE to them is granted, as Mosquitto 2 grants it.
fn mqtt311_share_like_filters_are_valid(target: &Target) {
    let mut client = target.client(Version::V4, "share-like");
    assert_eq!(
        client.subscribe_with(&[("$share/g", 1), ("$share//a", 1)], &[]),
        [1, 1]
    );
    client.disconnect();
}
both!(mqtt311_share_like_filters_are_valid);
