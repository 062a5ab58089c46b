//! MQTT 5 publish properties (issue 13, item 8): passed on unchanged and in order, Message
//! Expiry Interval, subscription identifiers, No Local.

use std::time::Duration;

use crate::common::mqtt::{user, Connect, Prop, Publish, Version};
use crate::retained::options;
use crate::target::Target;

const V5: Version = Version::V5;

/// The properties a publisher sets that its subscribers must get (MQTT 5 §3.3.2.3): user
/// properties (a key repeated, out of alphabetical order), payload format indicator, content
/// type, response topic, correlation data.
fn publisher_properties() -> Vec<Prop> {
    vec![
        user("zone", "b"),
        Prop::PayloadFormat(1),
        user("alpha", "1"),
        Prop::ContentType("application/json".into()),
        Prop::ResponseTopic("reply/here".into()),
        user("zone", "a"),
        Prop::CorrelationData(vec![0, 0xFF, 7]),
        user("zone", "b"),
    ]
}

/// What of `props` a comparison looks at: the user properties in their order, then the
/// others sorted (the spec fixes the order of user properties only, §3.3.2.3.7).
fn normalized(props: &[Prop]) -> (Vec<Prop>, Vec<String>) {
    let users = props
        .iter()
        .filter(|p| matches!(p, Prop::User(..)))
        .cloned()
        .collect();
    let mut others: Vec<String> = props
        .iter()
        .filter(|p| !matches!(p, Prop::User(..)))
        .map(|p| format!("{p:?}"))
        .collect();
    others.sort();
    (users, others)
}

/// MQTT 5 §3.3.2.3.2 (Payload Format Indicator), §3.3.2.3.5 (Response Topic), §3.3.2.3.6
/// (Correlation Data), §3.3.2.3.7 (User Property: "The Server MUST maintain the order of User
/// Properties when forwarding the Application Message"), §3.3.2.3.9 (Content Type): each is
/// sent on to the subscriber unaltered, on a live delivery at QoS 0, 1 and 2 and on a
/// retained message sent to a new subscription.
fn publish_properties_reach_subscribers_unchanged(target: &Target) {
    let sent = publisher_properties();
    let mut sub = target.client(V5, "props-sub");
    sub.subscribe("props/#", 2);
    for qos in 0..=2 {
        let topic = format!("props/{qos}");
        target.publish(V5, &Publish::new(&topic, "x").qos(qos).props(sent.clone()));
        let got = sub.receive();
        assert_eq!((got.topic.as_str(), got.qos), (topic.as_str(), qos));
        assert_eq!(normalized(&got.props), normalized(&sent), "QoS {qos}");
    }
    sub.disconnect();
    target.publish(
        V5,
        &Publish::new("props/kept", "x")
            .qos(1)
            .retain()
            .props(sent.clone()),
    );
    let mut late = target.client(V5, "props-late");
    late.subscribe("props/kept", 1);
    let got = late.receive();
    assert!(got.retain);
    assert_eq!(normalized(&got.props), normalized(&sent), "retained");
    late.disconnect();
}
both!(publish_properties_reach_subscribers_unchanged);

/// MQTT 5 §3.3.2.3.3 (Message Expiry Interval): a message whose interval has passed while
/// it waited for a kept session's client is not delivered; one still valid is delivered with
/// the interval that remains ("the received value minus the time that the Application
/// Message has been waiting in the Server"), lower than the one published. The same holds
/// for retained messages sent to a new subscription.
fn message_expiry_interval(target: &Target) {
    let keep = Connect::new(V5, "expiry-sub").persistent();
    let (mut sub, _) = target.connect(&keep);
    sub.subscribe("exp/#", 1);
    sub.subscribe("exp-end", 1);
    sub.disconnect();
    for (name, secs) in [("short", 1), ("long", 600)] {
        let expiring = |topic: String| {
            Publish::new(&topic, "x")
                .qos(1)
                .props(vec![Prop::MessageExpiry(secs)])
        };
        target.publish(V5, &expiring(format!("exp/{name}")));
        target.publish(V5, &expiring(format!("exp-retained/{name}")).retain());
    }
    // Long enough for the 1 s interval to have passed, and for 600 s to have decreased,
    // whatever the broker's clock granularity (whole seconds).
    std::thread::sleep(Duration::from_millis(2500));
    let (mut sub, connack) = target.connect(&keep);
    assert!(connack.session_present);
    target.publish(V5, &Publish::new("exp-end", "end").qos(1));
    let got = sub.receive_until("exp-end");
    assert_eq!(
        got.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>(),
        ["exp/long"],
        "the expired message is not delivered"
    );
    assert_remaining(&got[0]);
    sub.disconnect();

    let mut late = target.client(V5, "expiry-late");
    late.subscribe("exp-retained/#", 1);
    late.subscribe("exp-end", 1);
    target.publish(V5, &Publish::new("exp-end", "end").qos(1));
    let got = late.receive_until("exp-end");
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), m.retain))
            .collect::<Vec<_>>(),
        [("exp-retained/long", true)],
        "the expired retained message is not sent"
    );
    assert_remaining(&got[0]);
    late.disconnect();
}
both!(message_expiry_interval);

/// Checks that `message` carries a Message Expiry Interval below the 600 s it was published
/// with (and above 0: it has not expired).
fn assert_remaining(message: &Publish) {
    let remaining = prop!(message.props, MessageExpiry).expect("the remaining interval");
    assert!(
        (1..600).contains(&remaining),
        "{}: remaining interval {remaining} s",
        message.topic
    );
}

/// The subscription identifiers each copy of a message carried, and the topics of the copies.
fn identifiers(messages: &[Publish]) -> Vec<(String, Vec<u32>)> {
    let mut got: Vec<(String, Vec<u32>)> = messages
        .iter()
        .map(|m| {
            let mut ids: Vec<u32> = m
                .props
                .iter()
                .filter_map(|p| match p {
                    Prop::SubscriptionId(id) => Some(*id),
                    _ => None,
                })
                .collect();
            ids.sort_unstable();
            (m.topic.clone(), ids)
        })
        .collect();
    got.sort();
    got
}

/// MQTT 5 §3.8.2.1.2 and §3.3.4: a message matching a subscription made with a Subscription
/// Identifier carries that identifier (also a retained message sent because of it); one
/// matching a subscription without one carries none;
/// one matching two subscriptions of the client carries both identifiers, either in one copy
/// or one in each of two copies (the spec allows both: Mosquitto 2 sends a copy per
/// subscription, outpost one copy, so that overlapping filters cannot multiply what a
/// publish costs, issue 13).
fn subscription_identifiers(target: &Target) {
    let mut sub = target.client(V5, "sid-sub");
    for (filter, id) in [
        ("sid/#", Some(7)),
        ("sid/x/+", Some(300)),
        ("sid-end", None),
    ] {
        let props: Vec<Prop> = id.map(Prop::SubscriptionId).into_iter().collect();
        assert_eq!(sub.subscribe_with(&[(filter, 1)], &props), [1], "{filter}");
    }
    target.publish(V5, &Publish::new("sid/x/y", "both").qos(1));
    target.publish(V5, &Publish::new("sid/z", "one").qos(1));
    target.publish(V5, &Publish::new("sid-end", "end").qos(1));
    let got = identifiers(&sub.receive_until("sid-end"));
    let one_copy = [
        ("sid/x/y".to_string(), vec![7, 300]),
        ("sid/z".to_string(), vec![7]),
    ];
    let two_copies = [
        ("sid/x/y".to_string(), vec![7]),
        ("sid/x/y".to_string(), vec![300]),
        ("sid/z".to_string(), vec![7]),
    ];
    assert!(
        got == one_copy || got == two_copies,
        "copies and their identifiers: {got:?}"
    );
    target.publish(V5, &Publish::new("sid-end", "again").qos(1));
    assert_eq!(
        identifiers(&[sub.receive()]),
        [("sid-end".to_string(), vec![])],
        "a subscription without an identifier"
    );
    target.publish(V5, &Publish::new("sid-kept/x", "kept").qos(1).retain());
    let props = [Prop::SubscriptionId(42)];
    assert_eq!(sub.subscribe_with(&[("sid-kept/#", 1)], &props), [1]);
    assert_eq!(
        identifiers(&[sub.receive()]),
        [("sid-kept/x".to_string(), vec![42])],
        "a retained message sent to a new subscription"
    );
    sub.disconnect();
}
both!(subscription_identifiers);

/// MQTT 5 §3.8.3.1 (No Local): "If the value is 1, Application Messages MUST NOT be
/// forwarded to a connection with a ClientID equal to the ClientID of the publishing
/// connection"; another client's subscription still gets the message. 3.1.1 has no such
/// option: a 3.1.1 client gets its own publishes.
fn no_local(target: &Target) {
    let mut other = target.client(V5, "nl-other");
    other.subscribe("nl/#", 1);
    let mut own = target.client(V5, "nl-own");
    assert_eq!(
        own.subscribe_with(&[("nl/#", options(1, true, false, 0))], &[]),
        [1]
    );
    own.publish_done(&Publish::new("nl/mine", "x").qos(1));
    target.publish(V5, &Publish::new("nl/end", "end").qos(1));
    assert_eq!(own.receive_until("nl/end"), [], "its own publish");
    assert_eq!(other.receive().topic, "nl/mine", "another client's");
    own.disconnect();
    other.disconnect();

    let mut v4 = target.client(Version::V4, "nl-v4");
    v4.subscribe("nl4/#", 1);
    v4.publish_done(&Publish::new("nl4/mine", "x").qos(1));
    assert_eq!(v4.receive().topic, "nl4/mine", "3.1.1: its own publish");
    v4.disconnect();
}
both!(no_local);
