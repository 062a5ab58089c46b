//! The packets the broker sends its clients, encoded for the connection's protocol version
//! (MQTT 3.1.1 §3, MQTT 5 §3): CONNACK, PUBLISH, the acknowledgements, SUBACK, UNSUBACK,
//! PINGRESP and DISCONNECT.
//!
//! Guarantees: every packet is well formed for its version (the tests read each one back with
//! rumqttc's codecs); a PUBLISH carries the publisher's MQTT 5 properties byte for byte and in
//! their order, followed by the ones the broker adds (the remaining Message Expiry Interval,
//! the subscription identifiers); nothing here panics or allocates beyond the packet.
//!
//! Pure: no I/O.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{self, put_varint, Version};

/// MQTT 5 property identifiers the broker writes (MQTT 5 §2.2.2.2).
mod property {
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDS_AVAILABLE: u8 = 0x29;
    pub const SHARED_AVAILABLE: u8 = 0x2A;
}

/// A PINGRESP.
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// The first bytes of the acknowledgements (type and required flags).
pub mod ack {
    /// PUBACK
    pub const PUBACK: u8 = 0x40;
    /// PUBREC
    pub const PUBREC: u8 = 0x50;
    /// PUBREL (flags 0b0010, §3.6.1)
    pub const PUBREL: u8 = 0x62;
    /// PUBCOMP
    pub const PUBCOMP: u8 = 0x70;
}

/// How many bytes [`put_varint`] writes for `value`.
fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_string(out: &mut BytesMut, text: &[u8]) {
    // Topics and client ids are below 64 KiB: the parsers that produced them read a u16.
    let len = text.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.put_slice(&text[..len]);
}

/// What a CONNACK says beyond its code (MQTT 5 properties; ignored on 3.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    /// The client id the broker chose for a client that sent none (§3.2.2.3.7).
    pub assigned_client_id: Option<String>,
    /// The session expiry granted, when it is not the one asked for (§3.2.2.3.2).
    pub session_expiry: Option<u32>,
    /// Most QoS 1/2 publishes the broker accepts unacknowledged (§3.2.2.3.3).
    pub receive_maximum: Option<u16>,
    /// The highest topic alias the client may use (§3.2.2.3.8).
    pub topic_alias_maximum: Option<u16>,
    /// The largest packet the broker accepts (§3.2.2.3.6).
    pub maximum_packet_size: Option<u32>,
    /// The keep-alive the client must use instead of its own (§3.2.2.3.14).
    pub server_keep_alive: Option<u16>,
}

/// A CONNACK: `code` is 3.1.1's return code or MQTT 5's reason code.
pub fn connack(
    version: Version,
    session_present: bool,
    code: u8,
    properties: &ConnAckProperties,
) -> Bytes {
    let mut body = BytesMut::with_capacity(64);
    body.put_u8(u8::from(session_present && code == 0));
    body.put_u8(code);
    if version == Version::V5 {
        let mut props = BytesMut::with_capacity(48);
        if let Some(id) = &properties.assigned_client_id {
            props.put_u8(property::ASSIGNED_CLIENT_ID);
            put_string(&mut props, id.as_bytes());
        }
        if let Some(secs) = properties.session_expiry {
            props.put_u8(property::SESSION_EXPIRY);
            props.put_u32(secs);
        }
        if let Some(max) = properties.receive_maximum {
            props.put_u8(property::RECEIVE_MAXIMUM);
            props.put_u16(max);
        }
        if let Some(max) = properties.topic_alias_maximum {
            props.put_u8(property::TOPIC_ALIAS_MAXIMUM);
            props.put_u16(max);
        }
        if let Some(max) = properties.maximum_packet_size {
            props.put_u8(property::MAXIMUM_PACKET_SIZE);
            props.put_u32(max);
        }
        if let Some(secs) = properties.server_keep_alive {
            props.put_u8(property::SERVER_KEEP_ALIVE);
            props.put_u16(secs);
        }
        if code == 0 {
            // What this broker offers, said explicitly (each defaults to "yes"; the maximum
            // QoS is left out: absent means 2).
            for id in [
                property::RETAIN_AVAILABLE,
                property::WILDCARD_AVAILABLE,
                property::SUBSCRIPTION_IDS_AVAILABLE,
                property::SHARED_AVAILABLE,
            ] {
                props.put_u8(id);
                props.put_u8(1);
            }
        }
        put_varint(&mut body, props.len());
        body.put_slice(&props);
    }
    Bytes::from(frame::encode_packet(0x20, &body))
}

/// One PUBLISH to a client.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingPublish<'a> {
    /// The topic name.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// 0, 1 or 2.
    pub qos: u8,
    /// The retain flag as delivered.
    pub retain: bool,
    /// Whether this is a retransmission.
    pub dup: bool,
    /// The packet identifier (QoS 1/2).
    pub packet_id: Option<u16>,
    /// The publisher's MQTT 5 properties, as encoded (passed on unchanged).
    pub properties: &'a [u8],
    /// The remaining Message Expiry Interval, in seconds.
    pub expiry_secs: Option<u32>,
    /// The identifiers of the subscriptions the publish matched.
    pub subscription_ids: &'a [u32],
}

impl OutgoingPublish<'_> {
    /// The MQTT 5 property section's content length.
    fn properties_len(&self) -> usize {
        self.properties.len()
            + self.expiry_secs.map_or(0, |_| 5)
            + self
                .subscription_ids
                .iter()
                .map(|&id| 1 + varint_len(id as usize))
                .sum::<usize>()
    }

    /// The packet's remaining length (everything after the fixed header).
    fn remaining_len(&self, version: Version) -> usize {
        let mut remaining = 2 + self.topic.len().min(usize::from(u16::MAX)) + self.payload.len();
        if self.packet_id.is_some() {
            remaining += 2;
        }
        if version == Version::V5 {
            let props = self.properties_len();
            remaining += varint_len(props) + props;
        }
        remaining
    }

    /// The size of the encoded packet, to compare with a client's Maximum Packet Size.
    pub fn encoded_len(&self, version: Version) -> usize {
        let remaining = self.remaining_len(version);
        1 + varint_len(remaining) + remaining
    }

    /// Appends the packet to `out`.
    pub fn encode(&self, version: Version, out: &mut BytesMut) {
        let mut byte1 = 0x30 | (self.qos.min(2) << 1);
        if self.dup && self.qos > 0 {
            byte1 |= 0x08;
        }
        if self.retain {
            byte1 |= 0x01;
        }
        let remaining = self.remaining_len(version);
        out.reserve(1 + varint_len(remaining) + remaining);
        out.put_u8(byte1);
        put_varint(out, remaining);
        put_string(out, self.topic.as_bytes());
        if let Some(id) = self.packet_id {
            out.put_u16(id);
        }
        if version == Version::V5 {
            put_varint(out, self.properties_len());
            out.put_slice(self.properties);
            if let Some(secs) = self.expiry_secs {
                out.put_u8(property::MESSAGE_EXPIRY);
                out.put_u32(secs);
            }
            for &id in self.subscription_ids {
                out.put_u8(property::SUBSCRIPTION_IDENTIFIER);
                put_varint(out, id as usize);
            }
        }
        out.put_slice(self.payload);
    }
}

/// A PUBACK, PUBREC, PUBREL or PUBCOMP (see [`ack`]) for `packet_id` with reason 0x00 (on
/// MQTT 5 the reason code and properties may be left out then, §3.4.2.1).
pub fn ack(first_byte: u8, packet_id: u16) -> [u8; 4] {
    let [hi, lo] = packet_id.to_be_bytes();
    [first_byte, 0x02, hi, lo]
}

/// A SUBACK with one return or reason code per filter, in the SUBSCRIBE's order.
pub fn suback(version: Version, packet_id: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(3 + codes.len());
    body.put_u16(packet_id);
    if version == Version::V5 {
        body.put_u8(0);
    }
    body.put_slice(codes);
    Bytes::from(frame::encode_packet(0x90, &body))
}

/// An UNSUBACK; MQTT 5 has a reason code per filter (3.1.1 has none).
pub fn unsuback(version: Version, packet_id: u16, codes: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(3 + codes.len());
    body.put_u16(packet_id);
    if version == Version::V5 {
        body.put_u8(0);
        body.put_slice(codes);
    }
    Bytes::from(frame::encode_packet(0xB0, &body))
}

/// An MQTT 5 DISCONNECT from the server with `code` (3.1.1 has no server DISCONNECT).
pub fn disconnect(code: u8) -> [u8; 4] {
    [0xE0, 0x02, code, 0x00]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rumqttc::v5::mqttbytes::v5;

    fn read_v5(bytes: &[u8]) -> v5::Packet {
        let mut buffer = BytesMut::from(bytes);
        let packet = v5::Packet::read(&mut buffer, None).expect("a valid MQTT 5 packet");
        assert!(buffer.is_empty(), "the whole packet is read");
        packet
    }

    fn read_v4(bytes: &[u8]) -> rumqttc::mqttbytes::v4::Packet {
        let mut buffer = BytesMut::from(bytes);
        let packet = rumqttc::mqttbytes::v4::Packet::read(&mut buffer, 1 << 20)
            .expect("a valid MQTT 3.1.1 packet");
        assert!(buffer.is_empty(), "the whole packet is read");
        packet
    }

    #[test]
    fn connacks_read_back_on_both_versions() {
        let props = ConnAckProperties {
            assigned_client_id: Some("auto-1".into()),
            session_expiry: Some(60),
            receive_maximum: Some(100),
            topic_alias_maximum: Some(4096),
            maximum_packet_size: Some(300_000),
            server_keep_alive: Some(30),
        };
        match read_v5(&connack(Version::V5, true, 0, &props)) {
            v5::Packet::ConnAck(v5::ConnAck {
                session_present,
                code,
                properties: Some(p),
            }) => {
                assert!(session_present);
                assert_eq!(code, v5::ConnectReturnCode::Success);
                assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-1"));
                assert_eq!(p.session_expiry_interval, Some(60));
                assert_eq!(p.receive_max, Some(100));
                assert_eq!(p.topic_alias_max, Some(4096));
                assert_eq!(p.max_packet_size, Some(300_000));
                assert_eq!(p.server_keep_alive, Some(30));
                assert_eq!(p.shared_subscription_available, Some(1));
            }
            other => panic!("not a CONNACK with properties: {other:?}"),
        }
        match read_v4(&connack(Version::V4, true, 0, &props)) {
            rumqttc::mqttbytes::v4::Packet::ConnAck(ack) => assert!(ack.session_present),
            other => panic!("not a CONNACK: {other:?}"),
        }
        // A refusal never says a session is present (§3.2.2.1.1).
        assert_eq!(
            &connack(Version::V4, true, 0x02, &props)[..],
            [0x20, 2, 0, 2]
        );
    }

    #[test]
    fn subacks_and_unsubacks_read_back() {
        match read_v5(&suback(Version::V5, 7, &[0, 1, 0x87])) {
            v5::Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, 7);
                assert_eq!(ack.return_codes.len(), 3);
            }
            other => panic!("{other:?}"),
        }
        match read_v4(&suback(Version::V4, 9, &[2, 0x80])) {
            rumqttc::mqttbytes::v4::Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, 9);
                assert_eq!(ack.return_codes.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        match read_v5(&unsuback(Version::V5, 3, &[0, 0x11])) {
            v5::Packet::UnsubAck(ack) => {
                assert_eq!(ack.pkid, 3);
                assert_eq!(ack.reasons.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(&unsuback(Version::V4, 3, &[0, 0x11])[..], [0xB0, 2, 0, 3]);
    }

    proptest! {
        /// Every PUBLISH reads back as what was encoded, with the publisher's properties
        /// first and unchanged, and its length is what `encoded_len` said.
        #[test]
        fn publishes_read_back(
            topic in "[a-z/]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..20_000),
            qos in 0u8..3,
            retain: bool,
            dup: bool,
            expiry in proptest::option::of(1u32..1_000_000),
            ids in proptest::collection::vec(1u32..268_435_455, 0..3),
            user in proptest::collection::vec(("[a-z]{0,8}", "[a-z]{0,8}"), 0..3),
            content_type in proptest::option::of("[a-z/]{1,20}"),
        ) {
            // Properties as a publisher would send them: user properties, then content type.
            let mut props = BytesMut::new();
            for (k, v) in &user {
                props.put_u8(0x26);
                put_string(&mut props, k.as_bytes());
                put_string(&mut props, v.as_bytes());
            }
            if let Some(ct) = &content_type {
                props.put_u8(0x03);
                put_string(&mut props, ct.as_bytes());
            }
            let publish = OutgoingPublish {
                topic: &topic,
                payload: &payload,
                qos,
                retain,
                dup,
                packet_id: (qos > 0).then_some(4242),
                properties: &props,
                expiry_secs: expiry,
                subscription_ids: &ids,
            };
            let mut out = BytesMut::new();
            publish.encode(Version::V5, &mut out);
            prop_assert_eq!(out.len(), publish.encoded_len(Version::V5));
            match read_v5(&out) {
                v5::Packet::Publish(p) => {
                    prop_assert_eq!(&p.topic[..], topic.as_bytes());
                    prop_assert_eq!(&p.payload[..], &payload[..]);
                    prop_assert_eq!(p.qos as u8, qos);
                    prop_assert_eq!(p.retain, retain);
                    prop_assert_eq!(p.dup, dup && qos > 0);
                    let p_props = p.properties.clone().unwrap_or_default();
                    prop_assert_eq!(p_props.message_expiry_interval, expiry);
                    prop_assert_eq!(&p_props.subscription_identifiers, &ids.iter().map(|&i| i as usize).collect::<Vec<_>>());
                    prop_assert_eq!(p_props.user_properties, user.clone());
                    prop_assert_eq!(p_props.content_type, content_type.clone());
                }
                other => prop_assert!(false, "not a PUBLISH: {:?}", other),
            }
            // The publisher's properties come first, byte for byte.
            let header = (2..=5).find(|h| 1 + varint_len(out.len() - h) == *h).unwrap();
            let mut at = header + 2 + topic.len() + if qos > 0 { 2 } else { 0 };
            at += varint_len(publish.properties_len());
            prop_assert_eq!(&out[at..at + props.len()], &props[..]);

            let mut out = BytesMut::new();
            publish.encode(Version::V4, &mut out);
            prop_assert_eq!(out.len(), publish.encoded_len(Version::V4));
            match read_v4(&out) {
                rumqttc::mqttbytes::v4::Packet::Publish(p) => {
                    prop_assert_eq!(&p.topic, &topic);
                    prop_assert_eq!(&p.payload[..], &payload[..]);
                    prop_assert_eq!(p.qos as u8, qos);
                    prop_assert_eq!(p.retain, retain);
                }
                other => prop_assert!(false, "not a PUBLISH: {:?}", other),
            }
        }
    }

    #[test]
    fn acks_read_back() {
        match read_v4(&ack(ack::PUBREL, 513)) {
            rumqttc::mqttbytes::v4::Packet::PubRel(p) => assert_eq!(p.pkid, 513),
            other => panic!("{other:?}"),
        }
        match read_v5(&ack(ack::PUBCOMP, 1)) {
            v5::Packet::PubComp(p) => assert_eq!(p.pkid, 1),
            other => panic!("{other:?}"),
        }
    }
}
