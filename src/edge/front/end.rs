//! How a device connection ends, as types: the front's refusals (a broken rule of MQTT, or
//! one of the gateway's), the closes the broker asks for, refused logins, and lost
//! connections.
//!
//! Guarantees: each kind's text is the line the front logs (the exact texts the tests and
//! operators know, `protocol: ...` for every broken rule of MQTT); a broken rule of MQTT
//! carries its MQTT 5 DISCONNECT reason code ([`Violation::code`]), so a kind and its code
//! cannot drift apart.
//!
//! Does not: log, count or write anything (the front does, from the kind).

use std::sync::Arc;

use bytes::Bytes;

use super::super::auth;
use super::super::checks::{self, reason};
use super::super::frame::{FrameError, Version};
use super::super::sessions;

/// How a device connection ended. Its text is what the front logs.
#[derive(Debug, thiserror::Error)]
pub(super) enum End {
    /// The device broke a rule of the protocol or of the gateway: answered with `answer`
    /// (a CONNACK refusal, or on MQTT 5 a DISCONNECT with a reason code) and closed.
    #[error("refused: {reason}")]
    Refused {
        answer: Option<Bytes>,
        reason: Refusal,
    },
    /// The broker closed it (its session was taken over) or the device went quiet: `answer`
    /// is MQTT 5's DISCONNECT.
    #[error("closed: {reason}")]
    Closed {
        answer: Option<Bytes>,
        reason: Closing,
    },
    /// The login was refused: answered with the CONNACK `answer` and closed (counted apart,
    /// and logged at most once per 1,000, so that guessing fills neither the log nor memory).
    #[error("login refused: {reason}")]
    Unauthorized { answer: Bytes, reason: LoginRefusal },
    /// Anything else: I/O, the journal.
    #[error(transparent)]
    Lost(#[from] Lost),
}

impl End {
    /// A broken rule of MQTT after CONNECT: on MQTT 5 answered with a DISCONNECT carrying the
    /// violation's reason code (MQTT 5 §3.14); on 3.1.1 (which has no server DISCONNECT) just
    /// closed.
    pub(super) fn violation(version: Version, violation: Violation) -> End {
        let code = violation.code();
        let answer = (version == Version::V5).then(|| Bytes::from(vec![0xE0, 0x02, code, 0x00]));
        End::Refused {
            answer,
            reason: Refusal::Protocol(violation),
        }
    }
}

/// A CONNACK refusing a connection with this code.
pub(super) fn connack_refusal(version: Version, code: u8) -> Bytes {
    match version {
        Version::V4 => Bytes::from(vec![0x20, 0x02, 0x00, code]),
        Version::V5 => Bytes::from(vec![0x20, 0x03, 0x00, code, 0x00]),
    }
}

/// Why the front refused a connection (counted as `edge_rejected`).
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    /// The device broke a rule of MQTT.
    #[error("protocol: {0}")]
    Protocol(#[from] Violation),
    /// A device's CONNECT with one of the client ids the gateway keeps for itself.
    #[error(
        "client id {0:?} is reserved for the gateway (prefix {prefix:?})",
        prefix = checks::RESERVED_CLIENT_ID_PREFIX
    )]
    ReservedClientId(String),
    /// 3.1.1 §3.1.3.1: an empty client id needs Clean Session.
    #[error("an empty client id without Clean Session")]
    EmptyClientIdWithoutCleanSession,
    /// No room for another kept session.
    #[error("{0} (broker.max_sessions)")]
    Sessions(#[from] sessions::Refused),
}

/// A rule of MQTT a device broke, with the reason code MQTT 5 answers it with.
#[derive(Debug, thiserror::Error)]
pub(super) enum Violation {
    /// A packet that cannot be framed or parsed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A CONNECT whose fixed header has flags set.
    #[error("CONNECT with invalid flags")]
    ConnectFlags,
    /// A will topic that is not a valid topic name.
    #[error("invalid will topic {0:?}")]
    WillTopic(String),
    /// A packet type only servers send, or one MQTT 3.1.1 does not have.
    #[error("packet type {0} may not be sent by a client")]
    PacketType(u8),
    /// A second CONNECT on one connection.
    #[error("second CONNECT on one connection")]
    SecondConnect,
    /// A packet type a client may send that the front does not serve.
    #[error("packet type {0} is not served")]
    NotServed(u8),
    /// A DISCONNECT that sets a session expiry when the CONNECT's was 0.
    #[error("DISCONNECT sets a session expiry after CONNECT's 0 (MQTT 5 §3.14.2.2.2)")]
    ExpiryAfterZero,
    /// A fixed header (its first byte) with flags its packet type does not allow.
    #[error("fixed header {0:#04x} has invalid flags")]
    HeaderFlags(u8),
    /// A SUBSCRIBE or UNSUBSCRIBE with an invalid topic filter.
    #[error("invalid topic filter {0:?}")]
    TopicFilter(String),
    /// A PUBLISH to a topic name that is not valid (wildcards, for one).
    #[error("invalid topic name {0:?}")]
    TopicName(String),
    /// More QoS 1 and 2 publishes unacknowledged than the Receive Maximum the CONNACK gave.
    #[error("more than the Receive Maximum of {0} unacknowledged publishes")]
    ReceiveMaximum(u16),
    /// Topic alias 0.
    #[error("topic alias 0")]
    AliasZero,
    /// A topic alias above the Topic Alias Maximum the CONNACK gave.
    #[error("topic alias {alias} above {max}")]
    AliasAbove { alias: u16, max: u16 },
    /// A PUBLISH with an empty topic and an alias not set before.
    #[error("unknown topic alias {0}")]
    UnknownAlias(u16),
    /// Topic aliases whose topics would take more memory than the front allows a connection.
    #[error("topic aliases would hold more than {0} bytes")]
    AliasBytes(usize),
    /// A PUBLISH with an empty topic and no alias.
    #[error("PUBLISH with an empty topic and no alias")]
    EmptyTopic,
}

impl Violation {
    /// The MQTT 5 reason code the front answers this violation with (in a DISCONNECT after
    /// CONNECT), the one Mosquitto 2 sends in the same case.
    pub(super) fn code(&self) -> u8 {
        match self {
            Violation::Frame(FrameError::TooLarge { .. }) => reason::PACKET_TOO_LARGE,
            Violation::Frame(_)
            | Violation::ConnectFlags
            | Violation::WillTopic(_)
            | Violation::HeaderFlags(_)
            // Malformed, as Mosquitto 2 answers (0x8F is for well-formed filters a server
            // declines).
            | Violation::TopicFilter(_)
            // MQTT 5 §3.3.2.3.4 leaves the code open; Mosquitto 2 answers malformed.
            | Violation::AliasZero => reason::MALFORMED_PACKET,
            Violation::PacketType(_)
            | Violation::SecondConnect
            | Violation::NotServed(_)
            | Violation::ExpiryAfterZero
            // [MQTT-3.3.2-2]; 0x90 is for well-formed names a receiver declines.
            | Violation::TopicName(_)
            | Violation::UnknownAlias(_)
            | Violation::EmptyTopic => reason::PROTOCOL_ERROR,
            Violation::ReceiveMaximum(_) => reason::RECEIVE_MAXIMUM_EXCEEDED,
            Violation::AliasAbove { .. } | Violation::AliasBytes(_) => reason::TOPIC_ALIAS_INVALID,
        }
    }
}

/// Why the front closed a connection that broke no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Closing {
    /// Another connection took its session over.
    #[error("its session was taken over by a new connection")]
    TakenOver,
    /// Nothing arrived for 1.5 times its keep-alive.
    #[error("keep-alive timeout")]
    KeepAlive,
}

/// Why a login was refused (counted as `edge_logins_refused`).
#[derive(Debug, thiserror::Error)]
pub(super) enum LoginRefusal {
    /// The username and password (or their absence) were refused.
    #[error("{refusal} (client id {client_id:?})")]
    Credentials {
        refusal: auth::Refusal,
        client_id: String,
    },
    /// `use_identity_as_username`, and the client certificate names no usable identity.
    #[error("{why} (client id {client_id:?})")]
    Certificate { why: String, client_id: String },
    /// `broker.require_client_id_match`, and the client id is not the username.
    #[error(
        "client id {client_id:?} is not the username {username:?} (broker.require_client_id_match)"
    )]
    ClientIdMismatch {
        client_id: String,
        username: Option<Arc<str>>,
    },
}

/// Why a connection was lost rather than refused or closed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Lost {
    #[error("device read: {0}")]
    Read(std::io::Error),
    #[error("device write: {0}")]
    Write(std::io::Error),
    /// The device read nothing for this many seconds while the front had something to write.
    #[error("the device read nothing for {0} s")]
    WriteStalled(u64),
    #[error("device closed before CONNECT")]
    ClosedBeforeConnect,
    #[error("no CONNECT within broker.connect_timeout_ms")]
    NoConnect,
    #[error("the device closed the connection")]
    DeviceClosed,
    #[error("the broker's state stopped before a delivery was stored")]
    BrokerStateStopped,
    #[error("journal stopped before the publish was durable")]
    JournalStopped,
    /// Appending to the journal failed.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalClosed),
    /// The in-process tap (tests, the demo) stopped taking publishes.
    #[error("the tap closed")]
    TapClosed,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every broken rule of MQTT: its log text (as before the types) and its MQTT 5 code.
    #[test]
    fn violations_keep_their_texts_and_codes() {
        let cases: Vec<(Violation, &str, u8)> = vec![
            (Violation::ConnectFlags, "CONNECT with invalid flags", 0x81),
            (
                Violation::WillTopic("a/+".into()),
                "invalid will topic \"a/+\"",
                0x81,
            ),
            (
                Violation::PacketType(2),
                "packet type 2 may not be sent by a client",
                0x82,
            ),
            (
                Violation::SecondConnect,
                "second CONNECT on one connection",
                0x82,
            ),
            (
                Violation::HeaderFlags(0x31),
                "fixed header 0x31 has invalid flags",
                0x81,
            ),
            (
                Violation::TopicFilter("a/#/b".into()),
                "invalid topic filter \"a/#/b\"",
                0x81,
            ),
            (
                Violation::TopicName("a/+".into()),
                "invalid topic name \"a/+\"",
                0x82,
            ),
            (
                Violation::ReceiveMaximum(20),
                "more than the Receive Maximum of 20 unacknowledged publishes",
                0x93,
            ),
            (Violation::AliasZero, "topic alias 0", 0x81),
            (
                Violation::NotServed(15),
                "packet type 15 is not served",
                0x82,
            ),
            (
                Violation::ExpiryAfterZero,
                "DISCONNECT sets a session expiry after CONNECT's 0 (MQTT 5 §3.14.2.2.2)",
                0x82,
            ),
            (
                Violation::AliasAbove { alias: 11, max: 10 },
                "topic alias 11 above 10",
                0x94,
            ),
            (Violation::UnknownAlias(3), "unknown topic alias 3", 0x82),
            (
                Violation::AliasBytes(65536),
                "topic aliases would hold more than 65536 bytes",
                0x94,
            ),
            (
                Violation::EmptyTopic,
                "PUBLISH with an empty topic and no alias",
                0x82,
            ),
        ];
        for (violation, text, code) in cases {
            assert_eq!(violation.to_string(), text);
            assert_eq!(violation.code(), code, "{text}");
            let refusal = Refusal::Protocol(violation);
            assert_eq!(refusal.to_string(), format!("protocol: {text}"));
        }
        let too_large = FrameError::TooLarge { size: 9, limit: 8 };
        let text = too_large.to_string();
        let violation = Violation::from(too_large);
        assert_eq!(violation.code(), 0x95);
        assert_eq!(
            Refusal::from(violation).to_string(),
            format!("protocol: {text}")
        );
    }

    #[test]
    fn a_violation_is_a_v5_disconnect_and_a_bare_close_on_3_1_1() {
        match End::violation(Version::V5, Violation::TopicName("#".into())) {
            End::Refused { answer, reason } => {
                assert_eq!(answer.as_deref(), Some(&[0xE0, 0x02, 0x82, 0x00][..]));
                assert_eq!(reason.to_string(), "protocol: invalid topic name \"#\"");
            }
            other => panic!("not a refusal: {other}"),
        }
        match End::violation(Version::V4, Violation::AliasZero) {
            End::Refused { answer, .. } => assert_eq!(answer, None),
            other => panic!("not a refusal: {other}"),
        }
    }

    #[test]
    fn ends_read_as_before() {
        let end = End::Refused {
            answer: None,
            reason: Refusal::ReservedClientId("outpost-x".into()),
        };
        assert_eq!(
            end.to_string(),
            "refused: client id \"outpost-x\" is reserved for the gateway (prefix \"outpost-\")"
        );
        let end = End::Refused {
            answer: None,
            reason: Refusal::Sessions(sessions::Refused::TooManySessions(3)),
        };
        assert_eq!(
            end.to_string(),
            "refused: 3 sessions are kept already, the limit (broker.max_sessions)"
        );
        let end = End::Closed {
            answer: None,
            reason: Closing::KeepAlive,
        };
        assert_eq!(end.to_string(), "closed: keep-alive timeout");
        let end = End::Unauthorized {
            answer: Bytes::new(),
            reason: LoginRefusal::ClientIdMismatch {
                client_id: "a".into(),
                username: Some(Arc::from("b")),
            },
        };
        assert_eq!(
            end.to_string(),
            "login refused: client id \"a\" is not the username Some(\"b\") \
             (broker.require_client_id_match)"
        );
        let end = End::Unauthorized {
            answer: Bytes::new(),
            reason: LoginRefusal::Credentials {
                refusal: auth::Refusal::Anonymous,
                client_id: "c".into(),
            },
        };
        assert_eq!(
            end.to_string(),
            "login refused: no username, and broker.allow_anonymous is false (client id \"c\")"
        );
        assert_eq!(
            End::from(Lost::WriteStalled(10)).to_string(),
            "the device read nothing for 10 s"
        );
        assert_eq!(
            End::from(Lost::NoConnect).to_string(),
            "no CONNECT within broker.connect_timeout_ms"
        );
    }
}
