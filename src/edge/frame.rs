//! The packets clients send, read: framing of the byte stream into packets, PUBLISH (validated
//! by rumqttc's codecs, for MQTT 3.1.1 and 5, with its MQTT 5 properties split by our own
//! walker so they pass on unchanged), SUBSCRIBE, UNSUBSCRIBE, DISCONNECT and packet ids
//! (CONNECT is [`super::connect`]'s).
//!
//! Guarantees: never panics on any input; a malformed or oversized packet is an error that
//! names the problem.

use bytes::Bytes;

/// MQTT control packet types (the high nibble of the first byte).
pub mod kind {
    /// CONNECT
    pub const CONNECT: u8 = 1;
    /// PUBLISH
    pub const PUBLISH: u8 = 3;
    /// PUBACK
    pub const PUBACK: u8 = 4;
    /// PUBREC
    pub const PUBREC: u8 = 5;
    /// PUBREL
    pub const PUBREL: u8 = 6;
    /// PUBCOMP
    pub const PUBCOMP: u8 = 7;
    /// SUBSCRIBE
    pub const SUBSCRIBE: u8 = 8;
    /// UNSUBSCRIBE
    pub const UNSUBSCRIBE: u8 = 10;
    /// PINGREQ
    pub const PINGREQ: u8 = 12;
    /// DISCONNECT
    pub const DISCONNECT: u8 = 14;
}

/// What is wrong with a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The remaining-length field is longer than four bytes.
    #[error("malformed remaining length")]
    BadLength,
    /// The packet is larger than allowed.
    #[error("packet of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The packet's content is malformed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which packet.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A CONNECT of the MQTT protocol at a level this broker does not speak (3.1.1 §3.1.2.2:
    /// answered with CONNACK return code 0x01).
    #[error("unsupported MQTT protocol level {level}")]
    UnsupportedLevel {
        /// The level the client asked for.
        level: u8,
    },
    /// An MQTT 5 CONNECT asking for enhanced authentication, which this broker does not
    /// offer (MQTT 5 §4.12: answered with CONNACK 0x8C).
    #[error("authentication method {method:?} is not supported")]
    AuthenticationMethod {
        /// The method the client asked for.
        method: String,
    },
}

pub(super) fn malformed(what: &'static str, detail: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        what,
        detail: detail.into(),
    }
}

/// A packet with this first byte (type and flags) and body: the fixed header's remaining
/// length is the body's (at most 268,435,455 bytes, which every caller's bodies are far below).
pub fn encode_packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(byte1);
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Appends a variable byte integer (§1.5.5; MQTT 5 §1.5.5); `value` below 2^28.
pub fn put_varint(out: &mut impl bytes::BufMut, mut value: usize) {
    loop {
        let digit = (value % 128) as u8;
        value /= 128;
        out.put_u8(if value > 0 { digit | 0x80 } else { digit });
        if value == 0 {
            return;
        }
    }
}

/// The fixed header of one complete packet at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The first byte (type and flags).
    pub byte1: u8,
    /// Bytes taken by the fixed header (1 + length of the remaining-length field).
    pub header_len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Frame {
    /// The packet type (see [`kind`]).
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The whole packet's length.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Finds the packet at the start of `buffer`: `Ok(None)` when more bytes are needed.
pub fn next_frame(buffer: &[u8], max_size: usize) -> Result<Option<Frame>, FrameError> {
    let Some(&byte1) = buffer.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut header_len = 1;
    loop {
        let Some(&byte) = buffer.get(header_len) else {
            return Ok(None);
        };
        header_len += 1;
        remaining += ((byte & 0x7F) as usize) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if header_len > 4 {
            return Err(FrameError::BadLength);
        }
    }
    let frame = Frame {
        byte1,
        header_len,
        remaining,
    };
    if frame.len() > max_size {
        return Err(FrameError::TooLarge {
            size: frame.len(),
            limit: max_size,
        });
    }
    Ok((buffer.len() >= frame.len()).then_some(frame))
}

/// The packet identifier of a PUBACK, PUBREC, PUBREL or PUBCOMP.
pub fn packet_id(frame: &Frame, packet: &[u8]) -> Result<u16, FrameError> {
    match packet.get(frame.header_len..frame.header_len + 2) {
        Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
        _ => Err(malformed("acknowledgement", "no packet identifier")),
    }
}

/// The MQTT protocol level of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (level 4) or 3.1 (level 3).
    V4,
    /// MQTT 5 (level 5).
    V5,
}

/// Reads a packet's fields in order; every read checks the bounds.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or_else(|| malformed(what, "packet ends early"))?;
        self.at += n;
        Ok(slice)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn varint(&mut self, what: &'static str) -> Result<usize, FrameError> {
        let mut value = 0usize;
        for i in 0..4 {
            let byte = self.u8(what)?;
            value += ((byte & 0x7F) as usize) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(what, "variable byte integer longer than 4 bytes"))
    }
}

/// One topic filter of a SUBSCRIBE with its subscription options byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filter, as sent (not yet checked for wildcard placement).
    pub filter: String,
    /// The options byte: QoS in bits 0-1; on MQTT 5 also No Local (bit 2), Retain As
    /// Published (bit 3) and Retain Handling (bits 4-5).
    pub options: u8,
}

fn utf8_string(r: &mut Reader<'_>, what: &'static str) -> Result<String, FrameError> {
    let len = r.u16(what)? as usize;
    let bytes = r.take(len, what)?;
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| malformed(what, "a string is not UTF-8"))
}

/// A SUBSCRIBE's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Its packet identifier (echoed in the SUBACK).
    pub packet_id: u16,
    /// MQTT 5 Subscription Identifier (§3.8.2.1.2), 1 to 268,435,455.
    pub identifier: Option<u32>,
    /// The filters in the packet's order.
    pub subscriptions: Vec<Subscription>,
}

/// Reads the packet identifier and, on MQTT 5, the properties of a SUBSCRIBE or UNSUBSCRIBE
/// (only a Subscription Identifier, on SUBSCRIBE, and user properties are allowed); returns
/// the identifier and the Subscription Identifier.
fn read_header(
    r: &mut Reader<'_>,
    version: Version,
    what: &'static str,
) -> Result<(u16, Option<u32>), FrameError> {
    let packet_id = r.u16(what)?;
    if packet_id == 0 {
        return Err(malformed(what, "packet identifier 0"));
    }
    let mut identifier = None;
    if version == Version::V5 {
        let len = r.varint(what)?;
        let end = r.at + len;
        if end > r.bytes.len() {
            return Err(malformed(what, "properties end after the packet"));
        }
        while r.at < end {
            match r.u8(what)? {
                0x0B if what == "SUBSCRIBE" && identifier.is_none() => {
                    let id = r.varint(what)?;
                    if id == 0 {
                        return Err(malformed(what, "subscription identifier 0"));
                    }
                    identifier = Some(id as u32);
                }
                0x26 => {
                    utf8_string(r, what)?;
                    utf8_string(r, what)?;
                }
                other => {
                    return Err(malformed(
                        what,
                        format!("property {other:#04x} is not allowed here"),
                    ))
                }
            }
        }
        if r.at != end {
            return Err(malformed(what, "a property runs past the property list"));
        }
    }
    Ok((packet_id, identifier))
}

/// Reads a SUBSCRIBE. Fails on a packet without any filter ([MQTT-3.8.3-3]), reserved option
/// bits set, QoS 3 or Retain Handling 3 ([MQTT-3-8.3-4], MQTT 5 §3.8.3.1), No Local on a
/// shared subscription ([MQTT-3.8.3-4] of MQTT 5), or properties other than one Subscription
/// Identifier and user properties.
pub fn parse_subscribe(
    frame: &Frame,
    packet: &[u8],
    version: Version,
) -> Result<Subscribe, FrameError> {
    const WHAT: &str = "SUBSCRIBE";
    let end = frame.len().min(packet.len());
    let mut r = Reader {
        bytes: &packet[..end],
        at: frame.header_len,
    };
    let (packet_id, identifier) = read_header(&mut r, version, WHAT)?;
    let mut subscriptions = Vec::new();
    while r.at < end {
        let filter = utf8_string(&mut r, WHAT)?;
        let options = r.u8(WHAT)?;
        let reserved = match version {
            Version::V4 => options & 0xFC != 0,
            Version::V5 => options & 0xC0 != 0 || (options >> 4) & 0b11 == 0b11,
        };
        if reserved || options & 0b11 == 0b11 {
            return Err(malformed(
                WHAT,
                format!("subscription options {options:#04x}"),
            ));
        }
        if version == Version::V5 && options & 0b100 != 0 && filter.starts_with("$share/") {
            return Err(malformed(WHAT, "No Local on a shared subscription"));
        }
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(malformed(WHAT, "no topic filter"));
    }
    Ok(Subscribe {
        packet_id,
        identifier,
        subscriptions,
    })
}

/// Reads an UNSUBSCRIBE: its packet identifier and filters. Fails on a packet without any
/// filter ([MQTT-3.10.3-2]).
pub fn parse_unsubscribe(
    frame: &Frame,
    packet: &[u8],
    version: Version,
) -> Result<(u16, Vec<String>), FrameError> {
    const WHAT: &str = "UNSUBSCRIBE";
    let end = frame.len().min(packet.len());
    let mut r = Reader {
        bytes: &packet[..end],
        at: frame.header_len,
    };
    let (packet_id, _) = read_header(&mut r, version, WHAT)?;
    let mut filters = Vec::new();
    while r.at < end {
        filters.push(utf8_string(&mut r, WHAT)?);
    }
    if filters.is_empty() {
        return Err(malformed(WHAT, "no topic filter"));
    }
    Ok((packet_id, filters))
}

/// A decoded PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The topic; empty for an MQTT 5 publish that uses only a topic alias.
    pub topic: String,
    /// MQTT 5 topic alias, if any.
    pub topic_alias: Option<u16>,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Packet identifier (0 for QoS 0).
    pub pkid: u16,
    /// Retain flag.
    pub retain: bool,
    /// The payload.
    pub payload: Bytes,
    /// MQTT 5: the properties to pass on to subscribers, as encoded and in their order
    /// (all of them except the topic alias and the Message Expiry Interval).
    pub properties: Bytes,
    /// MQTT 5 Message Expiry Interval, in seconds.
    pub message_expiry: Option<u32>,
}

/// Decodes a PUBLISH with rumqttc's codec for the connection's protocol level.
pub fn parse_publish(
    frame: &Frame,
    packet: Bytes,
    version: Version,
) -> Result<Publish, FrameError> {
    const WHAT: &str = "PUBLISH";
    let len_len = frame.header_len - 1;
    match version {
        Version::V4 => {
            let header =
                rumqttc::mqttbytes::FixedHeader::new(frame.byte1, len_len, frame.remaining);
            let p = rumqttc::mqttbytes::v4::Publish::read(header, packet)
                .map_err(|e| malformed(WHAT, format!("{e:?}")))?;
            Ok(Publish {
                topic: p.topic,
                topic_alias: None,
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                payload: p.payload,
                properties: Bytes::new(),
                message_expiry: None,
            })
        }
        Version::V5 => {
            let header =
                rumqttc::v5::mqttbytes::v5::FixedHeader::new(frame.byte1, len_len, frame.remaining);
            let p = rumqttc::v5::mqttbytes::v5::Publish::read(header, packet.clone())
                .map_err(|e| malformed(WHAT, format!("{e:?}")))?;
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| malformed(WHAT, "topic is not UTF-8"))?;
            let (properties, message_expiry) = publish_properties(frame, &packet, p.qos as u8)?;
            Ok(Publish {
                topic,
                topic_alias: p.properties.as_ref().and_then(|props| props.topic_alias),
                qos: p.qos as u8,
                pkid: p.pkid,
                retain: p.retain,
                payload: p.payload,
                properties,
                message_expiry,
            })
        }
    }
}

/// A client's DISCONNECT: its reason code (0x00 on 3.1.1 or when left out) and MQTT 5's
/// Session Expiry Interval, if it sets one (§3.14.2).
pub fn parse_disconnect(
    frame: &Frame,
    packet: &[u8],
    version: Version,
) -> Result<(u8, Option<u32>), FrameError> {
    const WHAT: &str = "DISCONNECT";
    let end = frame.len().min(packet.len());
    let mut r = Reader {
        bytes: &packet[..end],
        at: frame.header_len,
    };
    if version == Version::V4 {
        return match frame.remaining {
            0 => Ok((0, None)),
            _ => Err(malformed(WHAT, "a 3.1.1 DISCONNECT has no content")),
        };
    }
    if r.at == end {
        return Ok((0, None));
    }
    let code = r.u8(WHAT)?;
    let mut expiry = None;
    if r.at < end {
        let len = r.varint(WHAT)?;
        let props_end = r.at + len;
        if props_end != end {
            return Err(malformed(WHAT, "properties do not end with the packet"));
        }
        while r.at < props_end {
            match r.u8(WHAT)? {
                0x11 if expiry.is_none() => {
                    let b = r.take(4, WHAT)?;
                    expiry = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                }
                0x1F => {
                    utf8_string(&mut r, WHAT)?;
                }
                0x26 => {
                    utf8_string(&mut r, WHAT)?;
                    utf8_string(&mut r, WHAT)?;
                }
                other => {
                    return Err(malformed(
                        WHAT,
                        format!("property {other:#04x} is not allowed here"),
                    ))
                }
            }
        }
    }
    Ok((code, expiry))
}

/// Splits an MQTT 5 PUBLISH's properties (§3.3.2.3) into those passed on to subscribers,
/// unchanged and in order, and the Message Expiry Interval; the topic alias is left out. A
/// Subscription Identifier from a client is malformed ([MQTT-3.3.4-6]).
fn publish_properties(
    frame: &Frame,
    packet: &Bytes,
    qos: u8,
) -> Result<(Bytes, Option<u32>), FrameError> {
    const WHAT: &str = "PUBLISH";
    let end = frame.len().min(packet.len());
    let mut r = Reader {
        bytes: &packet[..end],
        at: frame.header_len,
    };
    let topic_len = usize::from(r.u16(WHAT)?);
    r.take(topic_len, WHAT)?;
    if qos > 0 {
        r.u16(WHAT)?;
    }
    let len = r.varint(WHAT)?;
    let start = r.at;
    let props_end = start + len;
    if props_end > end {
        return Err(malformed(WHAT, "properties end after the packet"));
    }
    let mut expiry = None;
    let mut kept: Vec<(usize, usize)> = Vec::new();
    while r.at < props_end {
        let at = r.at;
        let skip = |r: &mut Reader<'_>| -> Result<(), FrameError> {
            let n = usize::from(r.u16(WHAT)?);
            r.take(n, WHAT).map(|_| ())
        };
        match r.u8(WHAT)? {
            0x01 => {
                r.u8(WHAT)?;
            }
            0x02 => {
                let b = r.take(4, WHAT)?;
                expiry = Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                continue;
            }
            0x23 => {
                r.u16(WHAT)?;
                continue;
            }
            0x03 | 0x08 | 0x09 => skip(&mut r)?,
            0x26 => {
                skip(&mut r)?;
                skip(&mut r)?;
            }
            0x0B => return Err(malformed(WHAT, "a client sent a subscription identifier")),
            other => {
                return Err(malformed(
                    WHAT,
                    format!("property {other:#04x} is not allowed here"),
                ))
            }
        }
        match kept.last_mut() {
            Some((_, last_end)) if *last_end == at => *last_end = r.at,
            _ => kept.push((at, r.at)),
        }
    }
    if r.at != props_end {
        return Err(malformed(WHAT, "a property runs past the property list"));
    }
    let properties = match kept.as_slice() {
        [] => Bytes::new(),
        [(from, to)] => packet.slice(*from..*to),
        ranges => {
            let mut joined = Vec::with_capacity(len);
            for (from, to) in ranges {
                joined.extend_from_slice(&packet[*from..*to]);
            }
            Bytes::from(joined)
        }
    };
    Ok((properties, expiry))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn encode_v4_publish(topic: &str, qos: rumqttc::QoS, pkid: u16, payload: &[u8]) -> BytesMut {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        let mut buf = BytesMut::new();
        p.write(&mut buf).expect("encode");
        buf
    }

    #[test]
    fn frames_need_the_whole_packet() {
        let packet = encode_v4_publish("a/b", rumqttc::QoS::AtLeastOnce, 7, b"hello");
        for cut in 0..packet.len() {
            assert_eq!(
                next_frame(&packet[..cut], 1 << 20),
                Ok(None),
                "cut at {cut}"
            );
        }
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        assert_eq!(frame.len(), packet.len());
        assert_eq!(frame.kind(), kind::PUBLISH);
    }

    #[test]
    fn oversized_and_malformed_lengths_are_errors() {
        let packet = encode_v4_publish("a", rumqttc::QoS::AtMostOnce, 0, &[0; 100]);
        assert!(matches!(
            next_frame(&packet, 50),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            next_frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], 1 << 30),
            Err(FrameError::BadLength)
        );
    }

    #[test]
    fn v4_publish_round_trips() {
        let packet =
            encode_v4_publish("telemetry/x", rumqttc::QoS::AtLeastOnce, 42, b"{\"t\":1}").freeze();
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        let p = parse_publish(&frame, packet.clone(), Version::V4).unwrap();
        assert_eq!(
            (p.topic.as_str(), p.qos, p.pkid, &p.payload[..]),
            ("telemetry/x", 1, 42, &b"{\"t\":1}"[..])
        );
    }

    #[test]
    fn v5_publish_with_alias_round_trips() {
        use rumqttc::v5::mqttbytes::v5::{Publish as P5, PublishProperties};
        let mut p = P5::new("", rumqttc::v5::mqttbytes::QoS::ExactlyOnce, "x", None);
        p.pkid = 9;
        p.properties = Some(PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        });
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        let packet = buf.freeze();
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        let parsed = parse_publish(&frame, packet.clone(), Version::V5).unwrap();
        assert_eq!(parsed.topic, "");
        assert_eq!(parsed.topic_alias, Some(3));
        assert_eq!((parsed.qos, parsed.pkid), (2, 9));
        assert!(parsed.properties.is_empty(), "the alias is not passed on");
    }

    #[test]
    fn disconnects_read_their_reason_and_expiry() {
        let read = |bytes: &[u8], v| {
            let frame = next_frame(bytes, 1 << 20).unwrap().unwrap();
            parse_disconnect(&frame, bytes, v)
        };
        assert_eq!(read(&[0xE0, 0], Version::V4), Ok((0, None)));
        assert!(read(&[0xE0, 1, 4], Version::V4).is_err());
        assert_eq!(read(&[0xE0, 0], Version::V5), Ok((0, None)));
        assert_eq!(read(&[0xE0, 1, 4], Version::V5), Ok((4, None)));
        assert_eq!(
            read(&[0xE0, 7, 0, 5, 0x11, 0, 0, 1, 0], Version::V5),
            Ok((0, Some(256)))
        );
        assert!(read(&[0xE0, 4, 0, 2, 0x1C, 0], Version::V5).is_err());
    }

    /// The properties a subscriber gets are the publisher's, in its order, without the topic
    /// alias and the expiry (hand-encoded: rumqttc writes properties in an order of its own).
    #[test]
    fn v5_publish_properties_pass_through_in_order() {
        let mut props = Vec::new();
        props.extend_from_slice(&[0x26, 0, 1, b'b', 0, 1, b'2']); // user b=2
        props.extend_from_slice(&[0x23, 0, 4]); // alias 4
        props.extend_from_slice(&[0x03, 0, 4, b't', b'e', b'x', b't']); // content type
        props.extend_from_slice(&[0x02, 0, 0, 0, 60]); // expiry 60 s
        props.extend_from_slice(&[0x26, 0, 1, b'a', 0, 1, b'1']); // user a=1
        props.extend_from_slice(&[0x01, 1]); // payload format: UTF-8
        let mut body = vec![0, 3, b'a', b'/', b'b', 0, 7];
        body.push(props.len() as u8);
        body.extend_from_slice(&props);
        body.extend_from_slice(b"hi");
        let packet = Bytes::from(encode_packet(0x32, &body));
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        let parsed = parse_publish(&frame, packet.clone(), Version::V5).unwrap();
        assert_eq!(parsed.topic_alias, Some(4));
        assert_eq!(parsed.message_expiry, Some(60));
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0x26, 0, 1, b'b', 0, 1, b'2']);
        expected.extend_from_slice(&[0x03, 0, 4, b't', b'e', b'x', b't']);
        expected.extend_from_slice(&[0x26, 0, 1, b'a', 0, 1, b'1']);
        expected.extend_from_slice(&[0x01, 1]);
        assert_eq!(&parsed.properties[..], &expected[..]);
        assert_eq!(&parsed.payload[..], b"hi");

        // A client may not send a subscription identifier.
        let mut body = vec![0, 1, b'a', 2, 0x0B, 1];
        body.extend_from_slice(b"x");
        let packet = Bytes::from(encode_packet(0x30, &body));
        let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
        assert!(parse_publish(&frame, packet.clone(), Version::V5).is_err());
    }

    #[test]
    fn subscribe_and_unsubscribe_filters_v4_and_v5() {
        use rumqttc::mqttbytes::v4;
        let mut buf = BytesMut::new();
        let mut sub = v4::Subscribe::new_many([
            v4::SubscribeFilter::new("a/+".into(), rumqttc::QoS::AtLeastOnce),
            v4::SubscribeFilter::new("a/#/b".into(), rumqttc::QoS::ExactlyOnce),
        ]);
        sub.pkid = 5;
        sub.write(&mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        let subs = parse_subscribe(&frame, &buf, Version::V4).unwrap();
        assert_eq!((subs.packet_id, subs.identifier), (5, None));
        assert_eq!(
            subs.subscriptions,
            vec![
                Subscription {
                    filter: "a/+".into(),
                    options: 1
                },
                Subscription {
                    filter: "a/#/b".into(),
                    options: 2
                },
            ]
        );
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] = 0x04; // No Local is not an option of 3.1.1
        assert!(parse_subscribe(&frame, &bad, Version::V4).is_err());
        bad[last] = 0x03;
        assert!(parse_subscribe(&frame, &bad, Version::V4).is_err(), "QoS 3");
        // SUBSCRIBE with a packet id and no filter.
        let empty = [0x82, 0x02, 0x00, 0x01];
        let frame = next_frame(&empty, 1 << 20).unwrap().unwrap();
        assert!(parse_subscribe(&frame, &empty, Version::V4).is_err());

        use rumqttc::v5::mqttbytes::v5 as m5;
        let mut buf = BytesMut::new();
        let mut filter = m5::Filter::new("$share/g/x", rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
        filter.retain_forward_rule = m5::RetainForwardRule::Never;
        filter.preserve_retain = true;
        let mut sub = m5::Subscribe::new(
            filter,
            Some(m5::SubscribeProperties {
                id: Some(7),
                user_properties: vec![("k".into(), "v".into())],
            }),
        );
        sub.pkid = 300;
        sub.write(&mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        let subs = parse_subscribe(&frame, &buf, Version::V5).unwrap();
        assert_eq!((subs.packet_id, subs.identifier), (300, Some(7)));
        assert_eq!(
            subs.subscriptions,
            vec![Subscription {
                filter: "$share/g/x".into(),
                options: 0b10_1001
            }]
        );
        let mut no_local = buf.clone();
        let last = no_local.len() - 1;
        no_local[last] |= 0b100;
        assert!(
            parse_subscribe(&frame, &no_local, Version::V5).is_err(),
            "No Local on $share"
        );

        let mut buf = BytesMut::new();
        let mut unsub = m5::Unsubscribe::new("a/b", None);
        unsub.pkid = 9;
        unsub.write(&mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            parse_unsubscribe(&frame, &buf, Version::V5).unwrap(),
            (9, vec!["a/b".to_string()])
        );
        let mut buf = BytesMut::new();
        let mut unsub = v4::Unsubscribe::new("x/#");
        unsub.pkid = 10;
        unsub.write(&mut buf).unwrap();
        let frame = next_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(
            parse_unsubscribe(&frame, &buf, Version::V4).unwrap(),
            (10, vec!["x/#".to_string()])
        );
        // Packet identifier 0 is malformed ([MQTT-2.3.1-1]).
        let zero = [0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'x'];
        let frame = next_frame(&zero, 1 << 20).unwrap().unwrap();
        assert!(parse_unsubscribe(&frame, &zero, Version::V4).is_err());
    }

    proptest! {
        #[test]
        fn framing_and_parsing_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some(frame)) = next_frame(&bytes, 1 << 20) {
                let packet = Bytes::copy_from_slice(&bytes[..frame.len()]);
                let _ = super::super::connect::parse_connect(&frame, &packet);
                let _ = parse_publish(&frame, packet.clone(), Version::V4);
                let _ = parse_publish(&frame, packet.clone(), Version::V5);
                let _ = packet_id(&frame, &packet);
                let _ = parse_subscribe(&frame, &packet, Version::V4);
                let _ = parse_subscribe(&frame, &packet, Version::V5);
                let _ = parse_unsubscribe(&frame, &packet, Version::V4);
                let _ = parse_unsubscribe(&frame, &packet, Version::V5);
            }
        }

        #[test]
        fn any_v4_publish_parses_back(topic in "[a-z/]{1,20}", pkid in 1u16.., payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let packet = encode_v4_publish(&topic, rumqttc::QoS::AtLeastOnce, pkid, &payload).freeze();
            let frame = next_frame(&packet, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(frame.len(), packet.len());
            let p = parse_publish(&frame, packet.clone(), Version::V4).unwrap();
            prop_assert_eq!(p.topic, topic);
            prop_assert_eq!(p.pkid, pkid);
            prop_assert_eq!(&p.payload[..], &payload[..]);
        }
    }
}
