//! The front's rules for what a client may send, as pure functions: packet types and fixed
//! header flags (MQTT 3.1.1 §2.2, MQTT 5 §2.1.3), topic names and topic filters (3.1.1 §4.7,
//! MQTT 5 §4.7 and §4.8.2 for shared subscriptions), and the client ids the gateway keeps for
//! itself.
//!
//! Guarantees: each function decides from its arguments alone and never panics; a packet the
//! front acts on has passed [`client_may_send`] and [`flags_valid`], so the parsers after them
//! only ever see packet types a client is allowed to send.

use super::frame::{kind, Version};
pub use crate::topic::{filter_matches, valid_topic_name};

/// Client ids starting with this are the gateway's own (its control plane's in-process
/// sessions: `outpost-control`, `outpost-modules`, `outpost-pipeline`); a device that asks for
/// one is refused, so it cannot take those sessions over.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "outpost-";

/// MQTT 5 reason codes the front answers with (MQTT 5 §2.4).
pub mod reason {
    /// CONNACK: the client id is not allowed.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// CONNACK: the client certificate gives no username (`use_identity_as_username`
    /// without a usable CN); Mosquitto 2's answer too.
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    /// CONNACK: the client asked for an authentication method the server does not offer.
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// CONNACK: the server is at its connection limit (or the client's address at its own).
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// CONNACK: the client's address opens connections faster than it may.
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    /// DISCONNECT: the packet could not be parsed, or breaks its type's syntax (invalid
    /// fixed-header flags, a topic filter such as `a/#/b`); Mosquitto 2's answer too.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// DISCONNECT: a packet the protocol does not allow here (a packet type only servers
    /// send, a second CONNECT, wildcards in a publish topic); Mosquitto 2's answer too.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// DISCONNECT: a topic alias above the server's maximum, or holding too much (an alias
    /// of 0 is malformed, as Mosquitto 2 answers it).
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// PUBACK / PUBREC: the client may not publish to this topic.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// DISCONNECT: a packet larger than the server accepts.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Session taken over: another connection with the same client id (§3.14.2.1).
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Keep alive timeout: nothing came within 1.5 times the keep-alive (§3.1.2.10).
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Receive Maximum exceeded: more unacknowledged QoS 2 publishes than the server's
    /// Receive Maximum (§3.3.4).
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
}

/// MQTT 3.1.1 CONNACK return codes (3.1.1 §3.2.2.3).
pub mod return_code {
    /// The server does not speak the protocol level the client asked for.
    pub const UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
    /// The client id is not allowed.
    pub const IDENTIFIER_REJECTED: u8 = 0x02;
    /// The server cannot take the connection now.
    pub const SERVER_UNAVAILABLE: u8 = 0x03;
    /// The username or password is malformed (Mosquitto's answer to a client certificate
    /// without a usable CN under `use_identity_as_username`).
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x04;
    /// The client is not allowed to connect (Mosquitto's answer to a failed login).
    pub const NOT_AUTHORIZED: u8 = 0x05;
}

/// Whether a client may send a packet of this type once connected. CONNACK, SUBACK,
/// UNSUBACK and PINGRESP go only from server to client, types 0 and (on 3.1.1) 15 are
/// reserved, and AUTH (MQTT 5) is only for a client that asked for enhanced authentication in
/// its CONNECT, which this broker does not offer.
pub fn client_may_send(packet_type: u8, _version: Version) -> bool {
    matches!(
        packet_type,
        kind::CONNECT
            | kind::PUBLISH
            | kind::PUBACK
            | kind::PUBREC
            | kind::PUBREL
            | kind::PUBCOMP
            | kind::SUBSCRIBE
            | kind::UNSUBSCRIBE
            | kind::PINGREQ
            | kind::DISCONNECT
    )
}

/// Whether the flags of a fixed header are the ones its type requires (3.1.1 Table 2.2,
/// MQTT 5 Table 2-2): PUBREL, SUBSCRIBE and UNSUBSCRIBE carry `0010`, PUBLISH any flags but QoS
/// 3, every other type `0000`. A receiver must close the connection on anything else.
pub fn flags_valid(byte1: u8) -> bool {
    let flags = byte1 & 0x0F;
    match byte1 >> 4 {
        kind::PUBLISH => (flags >> 1) & 0b11 != 0b11,
        kind::PUBREL | kind::SUBSCRIBE | kind::UNSUBSCRIBE => flags == 0b0010,
        _ => flags == 0,
    }
}

/// Whether `filter` may be subscribed to on MQTT 5: not empty, no NUL, `#` only as the whole
/// last level, `+` only as a whole level (§4.7.1); a shared subscription
/// `$share/GROUP/FILTER` needs a non-empty group without wildcards and a valid filter after it
/// (§4.8.2).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > usize::from(u16::MAX) || filter.contains('\0') {
        return false;
    }
    if let Some(rest) = filter.strip_prefix("$share/") {
        let Some((group, inner)) = rest.split_once('/') else {
            return false;
        };
        return !group.is_empty() && !group.contains(['+', '#']) && valid_plain_filter(inner);
    }
    valid_plain_filter(filter)
}

/// Whether a 3.1.1 client may subscribe to `filter`: as on MQTT 5 ([`valid_topic_filter`]),
/// and also a `$share/` filter that names no share (no filter after the group, or an empty
/// group: `$share/g`, `$share//a`), which 3.1.1, having no shared subscriptions in its
/// specification, reads as an ordinary filter (Mosquitto 2 grants them; a group with a
/// wildcard or an invalid filter after it is refused there too).
pub fn valid_topic_filter_v311(filter: &str) -> bool {
    valid_topic_filter(filter) || (names_no_share(filter) && valid_plain_filter(filter))
}

/// Whether `filter` starts with `$share/` without naming a share: no `/` after the group, or an
/// empty group. Such a filter is an ordinary one (see [`valid_topic_filter_v311`]).
pub fn names_no_share(filter: &str) -> bool {
    filter.strip_prefix("$share/").is_some_and(|rest| {
        rest.split_once('/')
            .is_none_or(|(group, _)| group.is_empty())
    })
}

/// Whether `filter` is valid as a filter without any `$share/` reading: `#` only as the whole
/// last level, `+` only as a whole level.
pub fn valid_plain_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether a client is refused publishing to `topic`, as Mosquitto 2 refuses it: topics
/// starting with `$SYS` (the broker's own) or `$share` (not a topic, a subscription prefix).
/// The publish is acknowledged (on MQTT 5 with 0x87 "not authorized") and dropped.
pub fn reserved_publish_topic(topic: &str) -> bool {
    topic.starts_with("$SYS") || topic.starts_with("$share")
}

/// Whether a device may not use this client id (it is one of the gateway's own).
pub fn reserved_client_id(client_id: &str) -> bool {
    client_id.starts_with(RESERVED_CLIENT_ID_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_client_packet_types_pass() {
        for version in [Version::V4, Version::V5] {
            let allowed: Vec<u8> = (0..16).filter(|&t| client_may_send(t, version)).collect();
            assert_eq!(
                allowed,
                vec![1, 3, 4, 5, 6, 7, 8, 10, 12, 14],
                "{version:?}"
            );
        }
    }

    #[test]
    fn fixed_header_flags() {
        assert!(flags_valid(0x30) && flags_valid(0x3B) && flags_valid(0x35));
        assert!(!flags_valid(0x36) && !flags_valid(0x37), "QoS 3");
        for byte1 in [0x62, 0x82, 0xA2] {
            assert!(flags_valid(byte1), "{byte1:#x}");
            assert!(!flags_valid(byte1 & 0xF0), "{byte1:#x} without 0010");
            assert!(!flags_valid(byte1 | 0x01), "{byte1:#x} with a stray bit");
        }
        for kind in [1u8, 4, 5, 7, 12, 14] {
            assert!(flags_valid(kind << 4));
            for flags in 1..16 {
                assert!(
                    !flags_valid((kind << 4) | flags),
                    "type {kind} flags {flags}"
                );
            }
        }
    }

    #[test]
    fn topic_names() {
        for ok in [
            "a",
            "a/b",
            "/",
            "a//b",
            "$SYS/x",
            "sport/tennis player1",
            "ü",
        ] {
            assert!(valid_topic_name(ok), "{ok}");
        }
        for bad in ["", "a/+/b", "a/#", "+", "#", "a+", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+",
            "/+",
            "a/+/b",
            "a//b",
            "+/tennis/#",
            "$SYS/#",
            "$share/g/a/#",
            "$share/g/#",
            "$share",
        ] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "a/#/b",
            "#/a",
            "a#",
            "a/b#",
            "a+",
            "a/+b/c",
            "++",
            "a\0",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/",
            "$share/g/a/#/b",
        ] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        // 3.1.1 reads a `$share/` filter that names no share as an ordinary filter; the
        // others are as on 5.
        for ok in ["$share/g", "$share//a", "$share/g/a/#", "a/+"] {
            assert!(valid_topic_filter_v311(ok), "{ok}");
        }
        for bad in [
            "$share/g+/a",
            "$share/g#/a",
            "$share/g/a/#/b",
            "$share//a/#/b",
            "a/#/b",
        ] {
            assert!(!valid_topic_filter_v311(bad), "{bad:?}");
        }
    }

    #[test]
    fn reserved_publish_topics_are_mosquittos() {
        for reserved in [
            "$SYS/broker/uptime",
            "$SYS",
            "$SYSX/a",
            "$share/g/t",
            "$share",
        ] {
            assert!(reserved_publish_topic(reserved), "{reserved}");
        }
        for open in ["$aws/things/x", "SYS/a", "a/$SYS", "$sys/a", "telemetry/1"] {
            assert!(!reserved_publish_topic(open), "{open}");
        }
    }

    #[test]
    fn reserved_ids() {
        assert!(reserved_client_id("outpost-control"));
        assert!(reserved_client_id("outpost-modules"));
        assert!(!reserved_client_id("sensor-1"));
        assert!(!reserved_client_id(""));
        assert!(!reserved_client_id("outpost"));
    }

    proptest! {
        /// A topic name is a filter that matches only itself: every valid name is a valid
        /// filter, and a filter without wildcards is a valid name.
        #[test]
        fn names_are_filters(topic in "[a-z/+#$]{0,12}") {
            if valid_topic_name(&topic) && !topic.starts_with("$share/") {
                prop_assert!(valid_topic_filter(&topic));
            }
            if valid_topic_filter(&topic) && !topic.contains(['+', '#']) {
                prop_assert!(valid_topic_name(&topic));
            }
        }

        #[test]
        fn checks_never_panic(s in "\\PC{0,40}", byte1 in any::<u8>()) {
            let _ = (valid_topic_name(&s), valid_topic_filter(&s), flags_valid(byte1));
        }
    }
}
