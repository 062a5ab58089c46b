//! CONNECT packets, read in full and checked as MQTT 3.1.1 §3.1 and MQTT 5 §3.1 require:
//! the connect flags, the will, the username and (binary) password, and on MQTT 5 every
//! property of the CONNECT and of its will.
//!
//! Guarantees: [`parse_connect`] never panics and refuses, with a reason, every CONNECT that
//! Mosquitto 2 closes without a CONNACK (a reserved flag set, will QoS or retain without a
//! will, will QoS 3, on 3.1.1 a password without a username, an unknown or repeated property,
//! a Receive Maximum or Maximum Packet Size of 0, a string that is not UTF-8 or holds U+0000,
//! bytes after the payload); an MQTT 5 CONNECT asking for enhanced authentication gets
//! [`FrameError::AuthenticationMethod`] (CONNACK 0x8C, as Mosquitto answers).
//! A password is binary data (3.1.1 §3.1.3.5) and is kept as bytes.

use bytes::Bytes;

use super::frame::{kind, malformed, Frame, FrameError, Reader, Version};

const WHAT: &str = "CONNECT";

/// What a CONNECT packet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Protocol level.
    pub version: Version,
    /// Keep-alive in seconds; 0 turns keep-alive off.
    pub keep_alive: u16,
    /// The client identifier (may be empty).
    pub client_id: String,
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3), served as 3.1.1 (3.1.1 Appendix B: its
    /// other changes are relaxations a 3.1 client does not use).
    pub protocol_3_1: bool,
    /// Clean Session (3.1.1) or Clean Start (5).
    pub clean_start: bool,
    /// The username, if the CONNECT has one.
    pub username: Option<String>,
    /// The password, if the CONNECT has one (binary).
    pub password: Option<Bytes>,
    /// The will, if the CONNECT has one.
    pub will: Option<WillInfo>,
    /// MQTT 5 properties of the CONNECT (all `None` on 3.1.1).
    pub properties: ConnectProperties,
}

/// The MQTT 5 CONNECT properties the broker acts on (MQTT 5 §3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    /// Session Expiry Interval, in seconds.
    pub session_expiry: Option<u32>,
    /// The client's Receive Maximum (at least 1).
    pub receive_maximum: Option<u16>,
    /// The largest packet the client accepts (at least 1).
    pub max_packet_size: Option<u32>,
    /// The client's Topic Alias Maximum.
    pub topic_alias_max: Option<u16>,
    /// Request Response Information (0 or 1).
    pub request_response_info: Option<u8>,
    /// Request Problem Information (0 or 1).
    pub request_problem_info: Option<u8>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// A CONNECT's will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillInfo {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS (0, 1 or 2).
    pub qos: u8,
    /// Its retain flag.
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, in seconds.
    pub delay_secs: Option<u32>,
    /// MQTT 5 Message Expiry Interval of the will, in seconds.
    pub message_expiry: Option<u32>,
    /// MQTT 5: the will's properties to publish it with, as encoded and in their order
    /// (all but the delay and the expiry; empty on 3.1.1).
    pub properties: Bytes,
}

/// Property identifiers (MQTT 5 §2.2.2.2).
mod property {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const WILL_DELAY: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// A UTF-8 string as MQTT defines it (§1.5.4): well-formed, without U+0000.
fn utf8(r: &mut Reader<'_>, field: &str) -> Result<String, FrameError> {
    let len = usize::from(r.u16(WHAT)?);
    let text = std::str::from_utf8(r.take(len, WHAT)?)
        .map_err(|_| malformed(WHAT, format!("{field} is not UTF-8")))?;
    if text.contains('\0') {
        return Err(malformed(WHAT, format!("{field} contains U+0000")));
    }
    Ok(text.to_string())
}

fn binary(r: &mut Reader<'_>) -> Result<Bytes, FrameError> {
    let len = usize::from(r.u16(WHAT)?);
    Ok(Bytes::copy_from_slice(r.take(len, WHAT)?))
}

fn u32(r: &mut Reader<'_>) -> Result<u32, FrameError> {
    let b = r.take(4, WHAT)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a property list, calling `each` with every property's identifier after checking
/// that it is allowed here and, unless it is a user property, not repeated.
fn properties<'a>(
    r: &mut Reader<'a>,
    allowed: &[u8],
    mut each: impl FnMut(u8, &mut Reader<'a>) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let len = r.varint(WHAT)?;
    let end = r.at + len;
    if end > r.bytes.len() {
        return Err(malformed(WHAT, "properties end after the packet"));
    }
    let mut seen = [false; 256];
    while r.at < end {
        let id = r.u8(WHAT)?;
        if !allowed.contains(&id) {
            return Err(malformed(
                WHAT,
                format!("property {id:#04x} is not allowed here"),
            ));
        }
        if id != property::USER_PROPERTY && std::mem::replace(&mut seen[usize::from(id)], true) {
            return Err(malformed(WHAT, format!("property {id:#04x} appears twice")));
        }
        each(id, r)?;
    }
    if r.at != end {
        return Err(malformed(WHAT, "a property runs past the property list"));
    }
    Ok(())
}

/// Reads and checks a CONNECT packet (see the module documentation).
pub fn parse_connect(frame: &Frame, packet: &[u8]) -> Result<ConnectInfo, FrameError> {
    if frame.kind() != kind::CONNECT {
        return Err(malformed(WHAT, "the first packet must be CONNECT"));
    }
    let end = frame.len().min(packet.len());
    let mut r = Reader {
        bytes: packet.get(..end).unwrap_or_default(),
        at: frame.header_len,
    };
    let name_len = usize::from(r.u16(WHAT)?);
    let name = r.take(name_len, WHAT)?;
    let level = r.u8(WHAT)?;
    let (version, protocol_3_1) = match (name, level) {
        (b"MQTT", 4) => (Version::V4, false),
        (b"MQIsdp", 3) => (Version::V4, true),
        (b"MQTT", 5) => (Version::V5, false),
        (b"MQTT", level) => return Err(FrameError::UnsupportedLevel { level }),
        _ => {
            return Err(malformed(
                WHAT,
                format!(
                    "unsupported protocol {:?} level {level}",
                    String::from_utf8_lossy(name)
                ),
            ))
        }
    };
    let flags = r.u8(WHAT)?;
    if flags & 0b0000_0001 != 0 {
        return Err(malformed(WHAT, "the reserved connect flag is set"));
    }
    let has_will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(malformed(WHAT, "will QoS or retain set without a will"));
    }
    if will_qos == 3 {
        return Err(malformed(WHAT, "will QoS 3"));
    }
    if version == Version::V4 && has_password && !has_username {
        return Err(malformed(WHAT, "a password without a username"));
    }
    let keep_alive = r.u16(WHAT)?;
    let mut props = ConnectProperties::default();
    if version == Version::V5 {
        let mut auth_method = None;
        properties(
            &mut r,
            &[
                property::SESSION_EXPIRY,
                property::RECEIVE_MAXIMUM,
                property::MAXIMUM_PACKET_SIZE,
                property::TOPIC_ALIAS_MAXIMUM,
                property::REQUEST_RESPONSE_INFO,
                property::REQUEST_PROBLEM_INFO,
                property::USER_PROPERTY,
                property::AUTHENTICATION_METHOD,
                property::AUTHENTICATION_DATA,
            ],
            |id, r| {
                match id {
                    property::SESSION_EXPIRY => props.session_expiry = Some(u32(r)?),
                    property::RECEIVE_MAXIMUM => match r.u16(WHAT)? {
                        0 => return Err(malformed(WHAT, "Receive Maximum 0")),
                        n => props.receive_maximum = Some(n),
                    },
                    property::MAXIMUM_PACKET_SIZE => match u32(r)? {
                        0 => return Err(malformed(WHAT, "Maximum Packet Size 0")),
                        n => props.max_packet_size = Some(n),
                    },
                    property::TOPIC_ALIAS_MAXIMUM => props.topic_alias_max = Some(r.u16(WHAT)?),
                    property::REQUEST_RESPONSE_INFO | property::REQUEST_PROBLEM_INFO => {
                        let value = r.u8(WHAT)?;
                        if value > 1 {
                            return Err(malformed(WHAT, format!("property {id:#04x} is {value}")));
                        }
                        if id == property::REQUEST_RESPONSE_INFO {
                            props.request_response_info = Some(value);
                        } else {
                            props.request_problem_info = Some(value);
                        }
                    }
                    property::USER_PROPERTY => {
                        let key = utf8(r, "a user property")?;
                        let value = utf8(r, "a user property")?;
                        props.user_properties.push((key, value));
                    }
                    property::AUTHENTICATION_METHOD => {
                        auth_method = Some(utf8(r, "the authentication method")?);
                    }
                    _ => {
                        binary(r)?;
                    }
                }
                Ok(())
            },
        )?;
        if let Some(method) = auth_method {
            return Err(FrameError::AuthenticationMethod { method });
        }
    }
    let client_id = utf8(&mut r, "the client id")?;
    let will = if has_will {
        let mut delay_secs = None;
        let mut message_expiry = None;
        let mut will_properties = Vec::new();
        if version == Version::V5 {
            let bytes = r.bytes;
            properties(
                &mut r,
                &[
                    property::WILL_DELAY,
                    property::PAYLOAD_FORMAT,
                    property::MESSAGE_EXPIRY,
                    property::CONTENT_TYPE,
                    property::RESPONSE_TOPIC,
                    property::CORRELATION_DATA,
                    property::USER_PROPERTY,
                ],
                |id, r| {
                    let from = r.at - 1;
                    match id {
                        property::WILL_DELAY => {
                            delay_secs = Some(u32(r)?);
                            return Ok(());
                        }
                        property::MESSAGE_EXPIRY => {
                            message_expiry = Some(u32(r)?);
                            return Ok(());
                        }
                        property::PAYLOAD_FORMAT => {
                            if r.u8(WHAT)? > 1 {
                                return Err(malformed(WHAT, "will payload format above 1"));
                            }
                        }
                        property::CONTENT_TYPE | property::RESPONSE_TOPIC => {
                            utf8(r, "a will property")?;
                        }
                        property::USER_PROPERTY => {
                            utf8(r, "a user property")?;
                            utf8(r, "a user property")?;
                        }
                        _ => {
                            binary(r)?;
                        }
                    }
                    will_properties.extend_from_slice(bytes.get(from..r.at).unwrap_or_default());
                    Ok(())
                },
            )?;
        }
        let topic = utf8(&mut r, "the will topic")?;
        let payload = binary(&mut r)?;
        Some(WillInfo {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_secs,
            message_expiry,
            properties: Bytes::from(will_properties),
        })
    } else {
        None
    };
    let username = if has_username {
        Some(utf8(&mut r, "the username")?)
    } else {
        None
    };
    let password = if has_password {
        Some(binary(&mut r)?)
    } else {
        None
    };
    if r.at != r.bytes.len() {
        return Err(malformed(WHAT, "bytes after the payload"));
    }
    Ok(ConnectInfo {
        version,
        keep_alive,
        client_id,
        protocol_3_1,
        clean_start: flags & 0b0000_0010 != 0,
        username,
        password,
        will,
        properties: props,
    })
}

#[cfg(test)]
mod tests {
    use super::super::frame::{encode_packet, next_frame};
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    /// A CONNECT with this protocol name and level, clean session, `keep_alive` and
    /// `client_id` (and on level 5 empty properties).
    fn connect_packet(name: &[u8], level: u8, keep_alive: u16, client_id: &str) -> Vec<u8> {
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, 0x02]);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if level == 5 {
            body.push(0);
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        encode_packet(0x10, &body)
    }

    #[test]
    fn protocol_levels_are_told_apart() {
        let read = |name: &[u8], level| {
            let packet = connect_packet(name, level, 30, "dev");
            let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
            parse_connect(&frame, &packet)
        };
        let v4 = read(b"MQTT", 4).unwrap();
        assert_eq!((v4.version, v4.protocol_3_1), (Version::V4, false));
        let v5 = read(b"MQTT", 5).unwrap();
        assert_eq!((v5.version, v5.protocol_3_1), (Version::V5, false));
        let v3 = read(b"MQIsdp", 3).unwrap();
        assert_eq!((v3.version, v3.protocol_3_1), (Version::V4, true));
        for level in [0, 1, 2, 3, 6, 255] {
            assert_eq!(
                read(b"MQTT", level),
                Err(FrameError::UnsupportedLevel { level })
            );
        }
        assert!(matches!(
            read(b"MQIsdp", 4),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(
            read(b"XXXX", 4),
            Err(FrameError::Malformed { .. })
        ));
    }

    /// A CONNECT with a will, a username and a password, as a client library writes it.
    fn full_connect(level: u8, keep_alive: u16, client_id: &str, password: &[u8]) -> Vec<u8> {
        let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(name);
        // Username, password, will retain, will QoS 1, will, clean session.
        body.extend_from_slice(&[level, 0b1110_1110]);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if level == 5 {
            // Session expiry 60.
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
        }
        let string = |body: &mut Vec<u8>, s: &[u8]| {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s);
        };
        string(&mut body, client_id.as_bytes());
        if level == 5 {
            // Will delay 7.
            body.extend_from_slice(&[5, 0x18, 0, 0, 0, 7]);
        }
        string(&mut body, b"wills/x");
        string(&mut body, b"gone");
        string(&mut body, b"user");
        string(&mut body, password);
        encode_packet(0x10, &body)
    }

    proptest! {
        /// The broker's CONNECT reads back as the client's, at 3.1.1 for a 3.1 client, with
        /// the stand-in keep-alive and without username and password, also when the shorter
        /// packet shrinks the remaining-length field.
        #[test]
        fn the_brokers_connect_is_the_clients_without_login(
            level in prop_oneof![Just(3u8), Just(4u8), Just(5u8)],
            keep_alive in any::<u16>(),
            client_id in "[a-z0-9]{0,200}",
            password in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let packet = full_connect(level, keep_alive, &client_id, &password);
            let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
            let info = parse_connect(&frame, &packet).unwrap();
            prop_assert_eq!(info.password.as_deref(), Some(&password[..]));
            prop_assert_eq!(info.username.as_deref(), Some("user"));
            prop_assert_eq!(info.version, if level == 5 { Version::V5 } else { Version::V4 });
            prop_assert_eq!(info.protocol_3_1, level == 3);
            prop_assert_eq!(info.keep_alive, keep_alive);
            prop_assert_eq!(&info.client_id, &client_id);
            prop_assert!(info.clean_start);
            let will = info.will.unwrap();
            prop_assert_eq!((will.qos, will.retain, &will.topic[..]), (1, true, "wills/x"));
            prop_assert_eq!(will.delay_secs, (level == 5).then_some(7));
        }
    }

    proptest! {
        /// Corrupted CONNECTs never panic the parser or the rewrite, and whatever parses
        /// rewrites into a CONNECT that parses again.
        #[test]
        fn corrupted_connects_never_panic(
            level in prop_oneof![Just(3u8), Just(4u8), Just(5u8)],
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        ) {
            let mut packet = full_connect(level, 30, "dev", b"secret");
            for (at, value) in flips {
                let at = 2 + at % (packet.len() - 2);
                packet[at] = value;
            }
            if let Ok(Some(frame)) = next_frame(&packet, 1 << 20) {
                if let Ok(info) = parse_connect(&frame, &packet) {
                    prop_assert!(!info.client_id.contains('\0'));
                }
            }
        }
    }

    #[test]
    fn connect_fields_v4_and_v5() {
        let mut c = rumqttc::mqttbytes::v4::Connect::new("dev-1");
        c.keep_alive = 0;
        let mut buf = BytesMut::new();
        c.write(&mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        let info = parse_connect(&frame, &buf).unwrap();
        assert_eq!(
            (info.version, info.keep_alive, info.client_id.as_str()),
            (Version::V4, 0, "dev-1")
        );

        let mut buf = BytesMut::new();
        let c5 = rumqttc::v5::mqttbytes::v5::Connect {
            keep_alive: 30,
            client_id: "dev-5".into(),
            clean_start: true,
            properties: Some(rumqttc::v5::mqttbytes::v5::ConnectProperties {
                session_expiry_interval: Some(10),
                ..Default::default()
            }),
        };
        c5.write(&None, &None, &mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        let info = parse_connect(&frame, &buf).unwrap();
        assert_eq!(
            (info.version, info.keep_alive, info.client_id.as_str()),
            (Version::V5, 30, "dev-5")
        );
    }

    #[test]
    fn first_packet_must_be_connect() {
        let mut packet = BytesMut::new();
        rumqttc::mqttbytes::v4::Publish::new("a", rumqttc::QoS::AtMostOnce, Vec::new())
            .write(&mut packet)
            .unwrap();
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        assert!(parse_connect(&frame, &packet).is_err());
    }
}
