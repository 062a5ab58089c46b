//! Wills (issue 13, item 10): on 3.1.1 and 5, none after a normal DISCONNECT, sent after a
//! connection is lost and on MQTT 5's "Disconnect with Will Message", after the Will Delay
//! Interval unless the client comes back.

use std::time::{Duration, Instant};

use crate::common::mqtt::{user, Client, Connect, Prop, Publish, Version};
use crate::target::Target;

/// A watcher subscribed to `{tag}/will/#` and the sentinel `{tag}/will-end`.
fn watcher(target: &Target, v: Version, name: &str) -> Client {
    let mut watcher = target.client(v, &format!("{}-{name}-watcher", v.tag()));
    watcher.subscribe(&format!("{}/will/#", v.tag()), 1);
    watcher.subscribe(&format!("{}/will-end", v.tag()), 1);
    watcher
}

/// Publishes the sentinel and returns the messages `watcher` got before it.
fn wills_before_sentinel(target: &Target, v: Version, watcher: &mut Client) -> Vec<Publish> {
    let end = format!("{}/will-end", v.tag());
    target.publish(v, &Publish::new(&end, "end").qos(1));
    watcher.receive_until(&end)
}

/// A QoS 1 will on `{tag}/will/{name}` with MQTT 5 will properties (ignored on 3.1.1).
fn will(v: Version, name: &str) -> Publish {
    Publish::new(
        &format!("{}/will/{name}", v.tag()),
        format!("{name} is gone"),
    )
    .qos(1)
    .props(vec![
        user("site", "north"),
        Prop::ContentType("text/plain".into()),
    ])
}

/// 3.1.1 §3.1.2.5 and MQTT 5 §3.1.2.5: when a connection with a will closes without a
/// DISCONNECT, the broker publishes the will: its topic, payload and QoS, on MQTT 5 with its
/// will properties (§3.1.3.2); a will with Will Retain 1 is retained (§3.1.2.7), so a later
/// subscriber gets it with RETAIN set.
fn a_lost_connection_publishes_its_will(target: &Target) {
    for v in Version::BOTH {
        let mut watcher = watcher(target, v, "lost");
        let will = will(v, "lost").retain();
        let (client, _) =
            target.connect(&Connect::new(v, &format!("{}-lost", v.tag())).will(will.clone()));
        client.drop_abruptly();
        let got = watcher.receive();
        assert_eq!(
            (got.topic.as_str(), got.text(), got.qos, got.retain),
            (will.topic.as_str(), will.text(), 1, false),
            "{v:?}: the will, to an established subscription"
        );
        let expected_props = if v == Version::V5 {
            will.props.clone()
        } else {
            vec![]
        };
        assert_eq!(got.props, expected_props, "{v:?}: the will's properties");
        let mut late = target.client(v, &format!("{}-lost-late", v.tag()));
        late.subscribe(&will.topic, 1);
        let kept = late.receive();
        assert_eq!(
            (kept.topic, kept.retain),
            (will.topic.clone(), true),
            "{v:?}: retained"
        );
        target.publish(v, &Publish::new(&will.topic, "").qos(1).retain());
        late.disconnect();
        watcher.disconnect();
    }
}
both!(a_lost_connection_publishes_its_will);

/// 3.1.1 §3.14.4 and MQTT 5 §3.1.2.5 / §3.14.4: "On receipt of DISCONNECT with a Reason
/// Code of 0x00 (Success) the Server MUST discard any Will Message associated with the current
/// Connection without publishing it": after a normal DISCONNECT (the broker then closes the
/// connection), a sentinel reaches the watcher and the will does not.
fn a_normal_disconnect_discards_the_will(target: &Target) {
    for v in Version::BOTH {
        let mut watcher = watcher(target, v, "normal");
        let connect = Connect::new(v, &format!("{}-normal", v.tag())).will(will(v, "normal"));
        let (client, _) = target.connect(&connect);
        client.disconnect();
        assert_eq!(wills_before_sentinel(target, v, &mut watcher), [], "{v:?}");
        watcher.disconnect();
    }
}
both!(a_normal_disconnect_discards_the_will);

/// MQTT 5 §3.14.2.1: DISCONNECT with reason code 0x04 (Disconnect with Will Message): "The
/// Client wishes to disconnect but requires that the Server also publishes its Will
/// Message".
fn disconnect_with_will_message(target: &Target) {
    let v = Version::V5;
    let mut watcher = watcher(target, v, "0x04");
    let will = will(v, "by-request");
    let (client, _) = target.connect(&Connect::new(v, "by-request").will(will.clone()));
    client.disconnect_with(0x04, &[]);
    let got = watcher.receive();
    assert_eq!((got.topic, got.payload), (will.topic, will.payload));
    watcher.disconnect();
}
both!(disconnect_with_will_message);

/// MQTT 5 §3.1.3.2.2 (Will Delay Interval): "The Server delays publishing the Client's Will
/// Message until the Will Delay Interval has passed or the Session ends, whichever happens
/// first. If a new Network Connection to this Session is made before the Will Delay Interval
/// has passed, the Server MUST NOT send the Will Message". A client with a 2 s will delay
/// (and a session that outlives it) that loses its connection and reconnects at once: no
/// will, even well after the 2 s (a sentinel published 4 s later arrives alone). One that
/// does not come back: its will arrives, and not before a second has passed.
fn will_delay_interval(target: &Target) {
    let v = Version::V5;
    let mut watcher = watcher(target, v, "delay");
    let delayed = |name: &str| {
        let will = will(v, name).props(vec![Prop::WillDelay(2)]);
        Connect::new(v, name)
            .resume()
            .prop(Prop::SessionExpiry(60))
            .will(will)
    };
    let back = delayed("comes-back");
    let (client, _) = target.connect(&back);
    client.drop_abruptly();
    let (client, connack) = target.connect(&back);
    assert!(connack.session_present);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        wills_before_sentinel(target, v, &mut watcher),
        [],
        "the client came back within the delay"
    );
    client.disconnect();

    let (client, _) = target.connect(&delayed("stays-away"));
    client.drop_abruptly();
    let lost = Instant::now();
    let got = watcher.receive();
    assert_eq!(got.topic, "v5/will/stays-away");
    assert!(
        lost.elapsed() >= Duration::from_secs(1),
        "the will came {:?} after the connection was lost, before its 2 s delay",
        lost.elapsed()
    );
    watcher.disconnect();
}
both!(will_delay_interval);
