//! MQTT topic names and how topic filters match them (MQTT 3.1.1 §4.7, MQTT 5 §4.7): the one
//! definition that the broker's subscriptions, its ACL and the gateway's routes share, so a
//! route and a local subscription with the same filter see the same publishes.
//!
//! Pure: each function decides from its arguments alone and never panics. The rules for what
//! a client may send (filters with `$share/`, flags, reserved ids) are the edge's
//! (`crate::edge::checks`); the tests of these functions are there too, next to those rules.

/// Whether `topic` may be published to: not empty, no wildcard characters, no NUL, at most
/// 65,535 bytes (3.1.1 §4.7.3, [MQTT-3.3.2-2]).
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

/// Whether the topic name `topic` matches the topic filter `filter` (3.1.1 §4.7.1, MQTT 5
/// §4.7.1): `+` is one level, `#` the rest of them (also none: `a/#` matches `a`), other
/// levels match themselves, and a wildcard in the first level never matches a topic starting
/// with `$` (§4.7.2). A topic that is not a valid topic name matches nothing; `filter` is
/// taken to be valid (see `crate::edge::checks::valid_topic_filter`), without a `$share/`
/// prefix.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if !valid_topic_name(topic) {
        return false;
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            _ => return false,
        }
    }
}
