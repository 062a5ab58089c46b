//! Quality of service (issue 13, item 4): the QoS a subscriber gets, packet ids, resending
//! after a reconnect, and exactly-once delivery of QoS 2 in both directions.

use crate::common::mqtt::{Client, Connect, Packet, Publish, Version, PUBCOMP, PUBREC, PUBREL};
use crate::target::Target;

/// 3.1.1 §3.8.4 and MQTT 5 §3.8.4: "The QoS of Application Messages sent in response to a
/// Subscription MUST be the minimum of the QoS of the originally published message and the
/// Maximum QoS granted by the Server"; 3.1.1 §2.3.1 / MQTT 5 §2.2.1: a QoS 1 or 2 PUBLISH
/// carries a non-zero packet identifier, a QoS 0 one none. Three subscribers (QoS 0, 1 and
/// 2) each get publishes of QoS 0, 1 and 2.
fn delivered_qos_is_the_minimum_of_publish_and_subscription(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let filter = format!("{tag}/qos/#");
        let mut subscribers: Vec<(u8, Client)> = (0..=2)
            .map(|max| {
                let mut sub = target.client(v, &format!("{tag}-sub-q{max}"));
                sub.subscribe(&filter, max);
                (max, sub)
            })
            .collect();
        for qos in 0..=2 {
            let topic = format!("{tag}/qos/{qos}");
            target.publish(v, &Publish::new(&topic, "x").qos(qos));
        }
        for (max, sub) in &mut subscribers {
            let mut got: Vec<(String, u8, bool)> = (0..3)
                .map(|_| {
                    let m = sub.receive();
                    assert_eq!(m.id != 0, m.qos > 0, "{v:?}: packet id of {m:?}");
                    assert!(!m.dup && !m.retain, "{v:?}: {m:?}");
                    (m.topic, m.qos, m.dup)
                })
                .collect();
            got.sort();
            let expected: Vec<(String, u8, bool)> = (0..=2u8)
                .map(|qos| (format!("{tag}/qos/{qos}"), qos.min(*max), false))
                .collect();
            assert_eq!(got, expected, "{v:?}: subscriber with maximum QoS {max}");
        }
    }
}
both!(delivered_qos_is_the_minimum_of_publish_and_subscription);

/// 3.1.1 §4.4 and MQTT 5 §4.4: "When a Client reconnects with Clean Start set to 0 and a
/// session is present, both the Client and Server MUST resend any unacknowledged PUBLISH
/// packets (where QoS > 0) and PUBREL packets using their original Packet Identifiers";
/// §3.3.1.1: a resent PUBLISH has DUP = 1. A subscriber that does not acknowledge a QoS 1
/// and a QoS 2 message gets each again, with DUP and the same packet id, after it reconnects;
/// once it sent PUBREC, it gets PUBREL after a reconnect, not the PUBLISH again; once
/// everything is acknowledged, nothing more comes (a sentinel arrives next).
fn unacknowledged_deliveries_are_resent_after_a_reconnect(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let session = Connect::new(v, &format!("{tag}-slow")).persistent();
        let (mut sub, _) = target.connect(&session);
        sub.subscribe(&format!("{tag}/re/#"), 2);
        let reconnect = |sub: Client| {
            sub.drop_abruptly();
            let (sub, connack) = target.connect(&session);
            assert!(connack.session_present, "{v:?}: the session is kept");
            sub
        };
        for qos in [1, 2] {
            let topic = format!("{tag}/re/{qos}");
            target.publish(v, &Publish::new(&topic, "m").qos(qos));
            let first = sub.expect_publish();
            assert_eq!((first.topic.as_str(), first.qos), (topic.as_str(), qos));
            assert!(!first.dup, "{v:?}: first delivery {first:?}");
            sub = reconnect(sub);
            let again = sub.expect_publish();
            assert_eq!(
                again,
                first.clone().dup(),
                "{v:?}: the same PUBLISH, with DUP, same packet id"
            );
            if qos == 1 {
                sub.ack(&again);
                continue;
            }
            sub.send_ack(PUBREC, again.id);
            assert_eq!(
                sub.next(),
                Packet::PubRel {
                    id: again.id,
                    code: 0
                }
            );
            // PUBREC received by the broker: after a reconnect it resends PUBREL only.
            sub = reconnect(sub);
            assert_eq!(
                sub.next(),
                Packet::PubRel {
                    id: again.id,
                    code: 0
                },
                "{v:?}: PUBREL resent, not the PUBLISH"
            );
            sub.send_ack(PUBCOMP, again.id);
        }
        let end = format!("{tag}/re/end");
        target.publish(v, &Publish::new(&end, "end").qos(1));
        assert_eq!(sub.receive_until(&end), [], "{v:?}: nothing resent twice");
        sub.disconnect();
    }
}
both!(unacknowledged_deliveries_are_resent_after_a_reconnect);

/// 3.1.1 §4.3.3 and MQTT 5 §4.3.3 (QoS 2, exactly once) with §4.4 (resending after a
/// reconnect): a client publishes QoS 2, gets PUBREC, loses its connection before PUBREL,
/// reconnects to its session and resends the PUBLISH with DUP and the same packet id: the
/// broker answers PUBREC again, then PUBCOMP to the PUBREL, and a subscriber gets the message
/// exactly once (a sentinel published afterwards arrives next, not a second copy).
fn a_qos2_publish_resent_after_a_reconnect_is_delivered_once(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let mut sub = target.client(v, &format!("{tag}-once-sub"));
        sub.subscribe(&format!("{tag}/once/#"), 2);
        let session = Connect::new(v, &format!("{tag}-once-pub")).persistent();
        let (mut publisher, _) = target.connect(&session);
        let message = Publish::new(&format!("{tag}/once/x"), "exactly once")
            .qos(2)
            .id(7);
        publisher.publish(&message);
        assert_eq!(publisher.next(), Packet::PubRec { id: 7, code: 0 });
        publisher.drop_abruptly();

        let (mut publisher, connack) = target.connect(&session);
        assert!(connack.session_present, "{v:?}: the session is kept");
        publisher.publish(&message.clone().dup());
        assert_eq!(
            publisher.next(),
            Packet::PubRec { id: 7, code: 0 },
            "{v:?}: the resent PUBLISH is acknowledged again"
        );
        publisher.send_ack(PUBREL, 7);
        assert_eq!(publisher.next(), Packet::PubComp { id: 7, code: 0 });
        let end = format!("{tag}/once/end");
        publisher.publish_done(&Publish::new(&end, "end").qos(1));
        publisher.disconnect();

        let got: Vec<(String, String)> = sub
            .receive_until(&end)
            .into_iter()
            .map(|m| (m.topic.clone(), m.text()))
            .collect();
        assert_eq!(
            got,
            [(format!("{tag}/once/x"), "exactly once".to_string())],
            "{v:?}: delivered exactly once"
        );
    }
}
both!(a_qos2_publish_resent_after_a_reconnect_is_delivered_once);
