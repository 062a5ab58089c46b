//! The broker's retained messages: the last retained publish per topic (MQTT 3.1.1 §3.3.1.3,
//! MQTT 5 §3.3.1.3), bounded in count and bytes.
//!
//! Guarantees:
//! - One message per topic: a retained publish replaces the topic's message, one with an
//!   empty payload removes it (and is not stored).
//! - The bounds are never exceeded: a new topic beyond the count, or a message beyond the
//!   bytes, is refused (the caller counts it) and the store is unchanged; replacing a topic's
//!   message is judged by the bytes after the replacement.
//! - [`Retained::matching`] lists every stored topic a filter matches, whatever their number
//!   (the session layer sends them as its client's window allows, so none is dropped for a
//!   full queue), in topic order, without expired messages; a wildcard in the first level
//!   does not match a `$` topic (§4.7.2).
//!
//! Pure: no I/O; time is a parameter. Durability (SQLite) is the session layer's.
//!
//! In the data path: [`super::broker`] owns it.
// The size accessors are read by the tests only, until the broker exports them as gauges.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::checks;

/// A retained message, as it is delivered to a new subscriber (with the retain flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The payload (never empty).
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: u8,
    /// The MQTT 5 properties to pass on unchanged (user properties, content type...), as
    /// encoded; empty on 3.1.1.
    pub properties: Bytes,
    /// When it expires (MQTT 5 Message Expiry Interval), in ms since the epoch.
    pub expires_at_ms: Option<u64>,
}

impl Message {
    fn bytes(&self, topic: &str) -> usize {
        topic.len() + self.payload.len() + self.properties.len()
    }
}

/// How many retained messages the broker keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most topics with a retained message.
    pub max_messages: usize,
    /// Most bytes of retained messages (topics, payloads and properties).
    pub max_bytes: usize,
}

/// What a retained publish did to the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The topic had no message; now it has this one.
    New,
    /// The topic's message was replaced.
    Replaced,
    /// The empty payload removed the topic's message (`false`: it had none).
    Cleared(bool),
    /// Refused at a bound; nothing changed.
    Refused(Bound),
}

/// Which bound refused a retained message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// [`Limits::max_messages`].
    Messages,
    /// [`Limits::max_bytes`].
    Bytes,
}

/// The retained messages (see the module documentation).
#[derive(Debug)]
pub struct Retained {
    by_topic: BTreeMap<Arc<str>, Message>,
    bytes: usize,
    limits: Limits,
}

impl Retained {
    /// None stored, these limits.
    pub fn new(limits: Limits) -> Retained {
        Retained {
            by_topic: BTreeMap::new(),
            bytes: 0,
            limits,
        }
    }

    /// Topics with a retained message.
    pub fn len(&self) -> usize {
        self.by_topic.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.by_topic.is_empty()
    }

    /// Bytes held, as the byte bound counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Applies a retained publish to `topic` (a valid topic name).
    pub fn publish(&mut self, topic: &str, message: Message) -> Stored {
        if message.payload.is_empty() {
            return match self.by_topic.remove(topic) {
                Some(old) => {
                    self.bytes -= old.bytes(topic);
                    Stored::Cleared(true)
                }
                None => Stored::Cleared(false),
            };
        }
        let old = self.by_topic.get(topic).map_or(0, |m| m.bytes(topic));
        if old == 0 && self.by_topic.len() >= self.limits.max_messages {
            return Stored::Refused(Bound::Messages);
        }
        if self.bytes - old + message.bytes(topic) > self.limits.max_bytes {
            return Stored::Refused(Bound::Bytes);
        }
        self.bytes = self.bytes - old + message.bytes(topic);
        match self.by_topic.insert(Arc::from(topic), message) {
            Some(_) => Stored::Replaced,
            None => Stored::New,
        }
    }

    /// The message retained on `topic`, unless it has expired.
    pub fn get(&self, topic: &str, now_ms: u64) -> Option<&Message> {
        self.by_topic
            .get(topic)
            .filter(|m| m.expires_at_ms.is_none_or(|at| at > now_ms))
    }

    /// The topics whose retained message `filter` (a valid, non-shared topic filter)
    /// matches and that have not expired, in topic order.
    pub fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<str>> {
        // Only topics starting with the filter's literal levels can match: scan from there.
        let literal: String = filter
            .split('/')
            .take_while(|level| *level != "+" && *level != "#")
            .flat_map(|level| [level, "/"])
            .collect();
        let start: Arc<str> = Arc::from(literal.trim_end_matches('/'));
        let prefix = start.clone();
        self.by_topic
            .range(start..)
            .take_while(|(topic, _)| topic.starts_with(&*prefix))
            .filter(|(topic, message)| {
                message.expires_at_ms.is_none_or(|at| at > now_ms)
                    && checks::filter_matches(filter, topic)
            })
            .map(|(topic, _)| topic.clone())
            .collect()
    }

    /// Removes the messages that have expired; how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.by_topic.len();
        let mut freed = 0;
        self.by_topic.retain(|topic, message| {
            let keep = message.expires_at_ms.is_none_or(|at| at > now_ms);
            if !keep {
                freed += message.bytes(topic);
            }
            keep
        });
        self.bytes -= freed;
        before - self.by_topic.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(payload: &str, expires_at_ms: Option<u64>) -> Message {
        Message {
            payload: Bytes::from(payload.to_string()),
            qos: 1,
            properties: Bytes::new(),
            expires_at_ms,
        }
    }

    const ROOMY: Limits = Limits {
        max_messages: 1000,
        max_bytes: 1 << 20,
    };

    #[test]
    fn one_message_per_topic_and_an_empty_payload_clears_it() {
        let mut store = Retained::new(ROOMY);
        assert_eq!(store.publish("a/b", message("1", None)), Stored::New);
        assert_eq!(store.publish("a/b", message("22", None)), Stored::Replaced);
        assert_eq!(store.get("a/b", 0).unwrap().payload, "22");
        assert_eq!(store.bytes(), 3 + 2);
        assert_eq!(
            store.publish("a/b", message("", None)),
            Stored::Cleared(true)
        );
        assert_eq!(
            store.publish("a/b", message("", None)),
            Stored::Cleared(false)
        );
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn bounds_refuse_new_topics_but_allow_replacements_that_fit() {
        let mut store = Retained::new(Limits {
            max_messages: 2,
            max_bytes: 20,
        });
        store.publish("a", message("12345", None));
        store.publish("b", message("12345", None));
        assert_eq!(
            store.publish("c", message("1", None)),
            Stored::Refused(Bound::Messages)
        );
        assert_eq!(
            store.publish("a", message("123456789", None)),
            Stored::Replaced
        );
        assert_eq!(
            store.publish("b", message("1234567890", None)),
            Stored::Refused(Bound::Bytes)
        );
        assert_eq!(store.get("b", 0).unwrap().payload, "12345", "unchanged");
        assert_eq!(store.bytes(), 10 + 6);
    }

    #[test]
    fn all_matching_topics_are_listed_and_expired_ones_are_not() {
        let mut store = Retained::new(Limits {
            max_messages: 10_000,
            ..ROOMY
        });
        for i in 0..2000 {
            store.publish(&format!("site/{i:04}/temp"), message("x", None));
        }
        store.publish("site/0000/hum", message("x", Some(5_000)));
        store.publish("$SYS/uptime", message("x", None));
        store.publish("sitex/1/temp", message("x", None));
        assert_eq!(
            store.matching("site/+/temp", 0).len(),
            2000,
            "none left out"
        );
        assert_eq!(store.matching("site/0000/#", 0).len(), 2);
        assert_eq!(store.matching("site/0000/#", 5_000).len(), 1, "expired");
        assert_eq!(store.matching("#", 0).len(), 2002, "no $ topic for #");
        assert_eq!(store.matching("$SYS/#", 0), vec![Arc::from("$SYS/uptime")]);
        assert_eq!(store.expire(5_000), 1);
        assert_eq!(store.len(), 2002);
    }

    fn topic() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("a"), Just("b"), Just(""), Just("$s"), Just("ab")];
        prop::collection::vec(level, 1..4).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            Just("a"),
            Just("b"),
            Just(""),
            Just("$s"),
            Just("+"),
            Just("#")
        ];
        prop::collection::vec(level, 1..4)
            .prop_map(|l| l.join("/"))
            .prop_filter("valid filter", |f| checks::valid_topic_filter(f))
    }

    proptest! {
        /// `matching` lists exactly the stored, unexpired topics the filter matches
        /// (`router::TopicFilter`'s rule, tested on its own), and the byte count stays the
        /// sum of what is stored, within the bound.
        #[test]
        fn matching_is_filter_by_filter_matching(
            publishes in prop::collection::vec((topic(), 0usize..6, prop::option::of(0u64..10)), 0..40),
            filter in filter(),
            now in 0u64..10,
        ) {
            let limits = Limits { max_messages: 12, max_bytes: 60 };
            let mut store = Retained::new(limits);
            for (t, len, expiry) in &publishes {
                store.publish(t, message(&"x".repeat(*len), *expiry));
                prop_assert!(store.len() <= limits.max_messages);
                prop_assert!(store.bytes() <= limits.max_bytes);
            }
            let sum: usize = store.by_topic.iter().map(|(t, m)| m.bytes(t)).sum();
            prop_assert_eq!(sum, store.bytes());
            let route = crate::routing::TopicFilter::parse(&filter).unwrap();
            let expected: Vec<Arc<str>> = store.by_topic.iter()
                .filter(|(t, m)| route.matches(t) && m.expires_at_ms.is_none_or(|at| at > now))
                .map(|(t, _)| t.clone())
                .collect();
            prop_assert_eq!(store.matching(&filter, now), expected);
        }
    }
}
