//! Retained messages (issue 13, item 7): one per topic, cleared by an empty payload, sent to
//! new subscriptions with RETAIN set, per Retain Handling, with Retain As Published.

use crate::common::mqtt::{Client, Publish, Version};
use crate::target::Target;

/// Subscription options byte (MQTT 5 §3.8.3.1): maximum QoS, No Local, Retain As Published,
/// Retain Handling.
pub fn options(qos: u8, no_local: bool, retain_as_published: bool, retain_handling: u8) -> u8 {
    qos | (u8::from(no_local) << 2) | (u8::from(retain_as_published) << 3) | (retain_handling << 4)
}

/// Publishes a QoS 1 sentinel on `topic` (which `client` must be subscribed to) and returns
/// (topic, payload, retain flag) of every message `client` got before it, sorted.
fn received_before(
    target: &Target,
    client: &mut Client,
    topic: &str,
) -> Vec<(String, String, bool)> {
    target.publish(client.version, &Publish::new(topic, "sentinel").qos(1));
    let mut got: Vec<(String, String, bool)> = client
        .receive_until(topic)
        .into_iter()
        .map(|m| (m.topic.clone(), m.text(), m.retain))
        .collect();
    got.sort();
    got
}

fn retained(target: &Target, v: Version, topic: &str, payload: &str) {
    target.publish(v, &Publish::new(topic, payload).qos(1).retain());
}

/// 3.1.1 §3.3.1.3 and MQTT 5 §3.3.1.3: the broker keeps one retained message per topic (the
/// last one), a retained message with an empty payload removes the topic's retained message
/// (and is not kept), and a new subscription gets the retained messages that match it with
/// RETAIN set; a message sent because it matches an established subscription has RETAIN 0
/// (3.1.1; MQTT 5 with Retain As Published 0).
fn one_retained_message_per_topic_cleared_by_an_empty_payload(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        let topic = |t: &str| format!("{tag}/ret/{t}");
        retained(target, v, &topic("a"), "first");
        retained(target, v, &topic("a"), "last");
        retained(target, v, &topic("b"), "b");
        retained(target, v, &topic("c"), "c");
        retained(target, v, &topic("c"), "");
        let mut sub = target.client(v, &format!("{tag}-late"));
        sub.subscribe(&topic("#"), 1);
        assert_eq!(
            received_before(target, &mut sub, &topic("end")),
            [
                (topic("a"), "last".into(), true),
                (topic("b"), "b".into(), true)
            ],
            "{v:?}: the retained messages a new subscription gets"
        );
        retained(target, v, &topic("d"), "live");
        assert_eq!(
            received_before(target, &mut sub, &topic("end")),
            [(topic("d"), "live".into(), false)],
            "{v:?}: a retained publish to an established subscription"
        );
        sub.disconnect();
    }
}
both!(one_retained_message_per_topic_cleared_by_an_empty_payload);

/// 3.1.1 §3.3.1.3 and §3.8.4, MQTT 5 §3.3.1.3 and §3.8.4: a retained message keeps the QoS
/// it was published with, and a new subscription gets it at the lower of that and the
/// subscription's maximum QoS.
fn retained_messages_are_sent_at_the_lower_qos(target: &Target) {
    for v in Version::BOTH {
        let tag = v.tag();
        for qos in 0..=2 {
            let topic = format!("{tag}/retqos/{qos}");
            target.publish(v, &Publish::new(&topic, "x").qos(qos).retain());
        }
        for max in 0..=2 {
            let mut sub = target.client(v, &format!("{tag}-retqos-{max}"));
            sub.subscribe(&format!("{tag}/retqos/#"), max);
            let mut got: Vec<(String, u8)> = (0..3)
                .map(|_| {
                    let m = sub.receive();
                    assert!(m.retain, "{v:?}: {m:?}");
                    (m.topic, m.qos)
                })
                .collect();
            got.sort();
            let expected: Vec<(String, u8)> = (0..=2u8)
                .map(|qos| (format!("{tag}/retqos/{qos}"), qos.min(max)))
                .collect();
            assert_eq!(got, expected, "{v:?}: subscription with maximum QoS {max}");
            sub.disconnect();
        }
    }
}
both!(retained_messages_are_sent_at_the_lower_qos);

/// MQTT 5 §3.8.3.1 (Retain Handling) and §3.3.1.3: 0 sends the retained messages at every
/// subscribe, also when the subscription already exists; 1 only when the subscription is
/// new; 2 never.
fn retain_handling(target: &Target) {
    let v = Version::V5;
    retained(target, v, "rh/x", "kept");
    let expected_retained = vec![("rh/x".to_string(), "kept".to_string(), true)];
    for (handling, first, again) in [
        (0, expected_retained.clone(), expected_retained.clone()),
        (1, expected_retained.clone(), vec![]),
        (2, vec![], vec![]),
    ] {
        let mut sub = target.client(v, &format!("rh-{handling}"));
        let sentinel = format!("rh-end/{handling}");
        sub.subscribe(&sentinel, 1);
        for (when, expected) in [("new", first), ("existing", again)] {
            let codes = sub.subscribe_with(&[("rh/#", options(1, false, false, handling))], &[]);
            assert_eq!(codes, [1]);
            assert_eq!(
                received_before(target, &mut sub, &sentinel),
                expected,
                "Retain Handling {handling}, {when} subscription"
            );
        }
        sub.disconnect();
    }
}
both!(retain_handling);

/// MQTT 5 §3.8.3.1 (Retain As Published) and §3.3.1.3: on a subscription with Retain As
/// Published 1, a message published with RETAIN set keeps it when it is forwarded to the
/// established subscription; with 0 it is forwarded with RETAIN 0. A message sent because
/// of a new subscription has RETAIN set either way. (The live subscriptions use Retain
/// Handling 2, so that the retained message of a previous round is not sent to them.)
fn retain_as_published(target: &Target) {
    let v = Version::V5;
    for rap in [true, false] {
        let mut sub = target.client(v, &format!("rap-{rap}"));
        let codes = sub.subscribe_with(&[("rap/#", options(1, false, rap, 2))], &[]);
        assert_eq!(codes, [1]);
        retained(target, v, "rap/x", &format!("live {rap}"));
        assert_eq!(
            received_before(target, &mut sub, "rap/end"),
            [("rap/x".into(), format!("live {rap}"), rap)],
            "Retain As Published {rap}: live delivery"
        );
        sub.disconnect();
    }
    let mut late = target.client(v, "rap-late");
    let codes = late.subscribe_with(&[("rap/#", options(1, false, false, 0))], &[]);
    assert_eq!(codes, [1]);
    assert_eq!(
        received_before(target, &mut late, "rap/end"),
        [("rap/x".into(), "live false".into(), true)],
        "a new subscription without Retain As Published"
    );
    late.disconnect();
}
both!(retain_as_published);
