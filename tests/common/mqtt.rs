//! A small synchronous MQTT client over a raw `TcpStream`, for MQTT 3.1.1 and 5, written so
//! that a test sees every bit a broker sends (DUP, QoS, RETAIN, packet ids, properties in
//! order, reason codes) and can misbehave: not acknowledge, resend, close without DISCONNECT.
//!
//! Packets are hand-encoded from the specification (3.1.1 §2-§3, MQTT 5 §2-§3): what the
//! tests send is spelled out, and what the broker sends is decoded strictly (a packet this
//! client cannot read fails the test).
//!
//! Every read waits at most [`WAIT`]; a packet that must come and does not fails the test
//! with the client's id in the message.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

/// How long a read waits for a packet that must come (generous: the machine may be slow).
pub const WAIT: Duration = Duration::from_secs(10);

/// PUBACK (QoS 1 delivered).
pub const PUBACK: u8 = 0x40;
/// PUBREC (QoS 2 received).
pub const PUBREC: u8 = 0x50;
/// PUBREL (QoS 2 released; flags 0b0010).
pub const PUBREL: u8 = 0x62;
/// PUBCOMP (QoS 2 complete).
pub const PUBCOMP: u8 = 0x70;

/// The protocol version a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

impl Version {
    /// Both versions, for scenarios that check a feature both have.
    pub const BOTH: [Version; 2] = [Version::V4, Version::V5];

    /// A short tag for client ids and topics, so both versions can share one broker.
    pub fn tag(self) -> &'static str {
        match self {
            Version::V4 => "v4",
            Version::V5 => "v5",
        }
    }
}

/// An MQTT 5 property (MQTT 5 §2.2.2.2), with its identifier's value type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prop {
    PayloadFormat(u8),
    MessageExpiry(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Vec<u8>),
    SubscriptionId(u32),
    SessionExpiry(u32),
    AssignedClientId(String),
    ServerKeepAlive(u16),
    AuthMethod(String),
    AuthData(Vec<u8>),
    RequestProblemInfo(u8),
    WillDelay(u32),
    RequestResponseInfo(u8),
    ResponseInfo(String),
    ServerReference(String),
    ReasonString(String),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(u8),
    RetainAvailable(u8),
    User(String, String),
    MaximumPacketSize(u32),
    WildcardAvailable(u8),
    SubscriptionIdsAvailable(u8),
    SharedAvailable(u8),
}

/// The value of the first property of a kind in a list: `prop!(props, ServerKeepAlive)` is
/// an `Option<u16>`.
#[allow(unused_macros)]
macro_rules! prop {
    ($props:expr, $variant:ident) => {
        $props.iter().find_map(|p| match p {
            $crate::common::mqtt::Prop::$variant(v) => Some(v.clone()),
            _ => None,
        })
    };
}

/// A user property (a convenience for tests).
pub fn user(key: &str, value: &str) -> Prop {
    Prop::User(key.to_string(), value.to_string())
}

fn put_u16(out: &mut Vec<u8>, n: u16) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u16(out, u16::try_from(bytes.len()).expect("field below 64 KiB"));
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

impl Prop {
    fn encode(&self, out: &mut Vec<u8>) {
        use Prop::*;
        let byte = |out: &mut Vec<u8>, id: u8, v: u8| out.extend_from_slice(&[id, v]);
        let two = |out: &mut Vec<u8>, id: u8, v: u16| {
            out.push(id);
            put_u16(out, v);
        };
        let four = |out: &mut Vec<u8>, id: u8, v: u32| {
            out.push(id);
            put_u32(out, v);
        };
        let bin = |out: &mut Vec<u8>, id: u8, v: &[u8]| {
            out.push(id);
            put_bytes(out, v);
        };
        match self {
            PayloadFormat(v) => byte(out, 0x01, *v),
            MessageExpiry(v) => four(out, 0x02, *v),
            ContentType(v) => bin(out, 0x03, v.as_bytes()),
            ResponseTopic(v) => bin(out, 0x08, v.as_bytes()),
            CorrelationData(v) => bin(out, 0x09, v),
            SubscriptionId(v) => {
                out.push(0x0B);
                put_varint(out, *v as usize);
            }
            SessionExpiry(v) => four(out, 0x11, *v),
            AssignedClientId(v) => bin(out, 0x12, v.as_bytes()),
            ServerKeepAlive(v) => two(out, 0x13, *v),
            AuthMethod(v) => bin(out, 0x15, v.as_bytes()),
            AuthData(v) => bin(out, 0x16, v),
            RequestProblemInfo(v) => byte(out, 0x17, *v),
            WillDelay(v) => four(out, 0x18, *v),
            RequestResponseInfo(v) => byte(out, 0x19, *v),
            ResponseInfo(v) => bin(out, 0x1A, v.as_bytes()),
            ServerReference(v) => bin(out, 0x1C, v.as_bytes()),
            ReasonString(v) => bin(out, 0x1F, v.as_bytes()),
            ReceiveMaximum(v) => two(out, 0x21, *v),
            TopicAliasMaximum(v) => two(out, 0x22, *v),
            TopicAlias(v) => two(out, 0x23, *v),
            MaximumQos(v) => byte(out, 0x24, *v),
            RetainAvailable(v) => byte(out, 0x25, *v),
            User(k, v) => {
                bin(out, 0x26, k.as_bytes());
                put_bytes(out, v.as_bytes());
            }
            MaximumPacketSize(v) => four(out, 0x27, *v),
            WildcardAvailable(v) => byte(out, 0x28, *v),
            SubscriptionIdsAvailable(v) => byte(out, 0x29, *v),
            SharedAvailable(v) => byte(out, 0x2A, *v),
        }
    }
}

/// A property section: its length (a variable byte integer), then the properties.
fn put_props(out: &mut Vec<u8>, props: &[Prop]) {
    let mut body = Vec::new();
    for prop in props {
        prop.encode(&mut body);
    }
    put_varint(out, body.len());
    out.extend_from_slice(&body);
}

/// A whole packet: first byte, remaining length, body (any bytes: tests build packets a
/// broker must refuse with it too).
pub fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A reader over one packet's body that fails the test on a short or malformed packet.
struct Body<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(
            self.bytes.len() >= n,
            "{}: packet too short ({} bytes left, {n} needed)",
            self.what,
            self.bytes.len()
        );
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    fn varint(&mut self) -> usize {
        let mut n = 0usize;
        for shift in 0..4 {
            let b = self.u8();
            n |= usize::from(b & 0x7F) << (7 * shift);
            if b & 0x80 == 0 {
                return n;
            }
        }
        panic!("{}: variable byte integer longer than 4 bytes", self.what)
    }
    fn bin(&mut self) -> Vec<u8> {
        let n = usize::from(self.u16());
        self.take(n).to_vec()
    }
    fn string(&mut self) -> String {
        String::from_utf8(self.bin()).unwrap_or_else(|e| panic!("{}: not UTF-8: {e}", self.what))
    }
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes).to_vec()
    }

    fn props(&mut self) -> Vec<Prop> {
        use Prop::*;
        let len = self.varint();
        let mut section = Body {
            bytes: self.take(len),
            what: self.what,
        };
        let mut props = Vec::new();
        while !section.is_empty() {
            let prop = match section.varint() {
                0x01 => PayloadFormat(section.u8()),
                0x02 => MessageExpiry(section.u32()),
                0x03 => ContentType(section.string()),
                0x08 => ResponseTopic(section.string()),
                0x09 => CorrelationData(section.bin()),
                0x0B => SubscriptionId(section.varint() as u32),
                0x11 => SessionExpiry(section.u32()),
                0x12 => AssignedClientId(section.string()),
                0x13 => ServerKeepAlive(section.u16()),
                0x15 => AuthMethod(section.string()),
                0x16 => AuthData(section.bin()),
                0x17 => RequestProblemInfo(section.u8()),
                0x18 => WillDelay(section.u32()),
                0x19 => RequestResponseInfo(section.u8()),
                0x1A => ResponseInfo(section.string()),
                0x1C => ServerReference(section.string()),
                0x1F => ReasonString(section.string()),
                0x21 => ReceiveMaximum(section.u16()),
                0x22 => TopicAliasMaximum(section.u16()),
                0x23 => TopicAlias(section.u16()),
                0x24 => MaximumQos(section.u8()),
                0x25 => RetainAvailable(section.u8()),
                0x26 => User(section.string(), section.string()),
                0x27 => MaximumPacketSize(section.u32()),
                0x28 => WildcardAvailable(section.u8()),
                0x29 => SubscriptionIdsAvailable(section.u8()),
                0x2A => SharedAvailable(section.u8()),
                other => panic!("{}: unknown property {other:#04x}", self.what),
            };
            props.push(prop);
        }
        props
    }
}

/// An application message: a PUBLISH as sent or as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// The packet identifier (0 for QoS 0; when sending, 0 means "the client's next one").
    pub id: u16,
    /// MQTT 5 properties, in order (ignored on 3.1.1).
    pub props: Vec<Prop>,
}

impl Publish {
    /// A QoS 0 message without properties.
    pub fn new(topic: &str, payload: impl Into<Vec<u8>>) -> Publish {
        Publish {
            topic: topic.to_string(),
            payload: payload.into(),
            qos: 0,
            retain: false,
            dup: false,
            id: 0,
            props: Vec::new(),
        }
    }

    pub fn qos(mut self, qos: u8) -> Publish {
        self.qos = qos;
        self
    }

    pub fn retain(mut self) -> Publish {
        self.retain = true;
        self
    }

    pub fn dup(mut self) -> Publish {
        self.dup = true;
        self
    }

    pub fn id(mut self, id: u16) -> Publish {
        self.id = id;
        self
    }

    pub fn props(mut self, props: Vec<Prop>) -> Publish {
        self.props = props;
        self
    }

    /// The payload as text (tests use text payloads).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The PUBLISH packet, as this client would send it.
    pub fn encode(&self, version: Version) -> Vec<u8> {
        let mut body = Vec::new();
        put_bytes(&mut body, self.topic.as_bytes());
        if self.qos > 0 {
            put_u16(&mut body, self.id);
        }
        if version == Version::V5 {
            put_props(&mut body, &self.props);
        }
        body.extend_from_slice(&self.payload);
        let byte1 = 0x30 | (u8::from(self.dup) << 3) | (self.qos << 1) | u8::from(self.retain);
        frame(byte1, &body)
    }
}

/// A packet from the broker, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        session_present: bool,
        code: u8,
        props: Vec<Prop>,
    },
    Publish(Publish),
    PubAck {
        id: u16,
        code: u8,
    },
    PubRec {
        id: u16,
        code: u8,
    },
    PubRel {
        id: u16,
        code: u8,
    },
    PubComp {
        id: u16,
        code: u8,
    },
    SubAck {
        id: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        id: u16,
        codes: Vec<u8>,
    },
    PingResp,
    Disconnect {
        code: u8,
        props: Vec<Prop>,
    },
}

impl Packet {
    /// Decodes a packet from the broker: its first byte and its body (after the length).
    pub fn decode(version: Version, byte1: u8, bytes: &[u8]) -> Packet {
        let v5 = version == Version::V5;
        let mut body = Body {
            bytes,
            what: "packet from the broker",
        };
        // An acknowledgement's id and MQTT 5 reason code (absent: 0, MQTT 5 §3.4.2.1).
        let ack = |body: &mut Body| {
            let id = body.u16();
            let code = if body.is_empty() { 0 } else { body.u8() };
            if !body.is_empty() {
                body.props();
            }
            (id, code)
        };
        let packet = match byte1 {
            0x20 => {
                let flags = body.u8();
                assert!(flags <= 1, "CONNACK flags {flags:#04x}");
                let code = body.u8();
                let props = if v5 && !body.is_empty() {
                    body.props()
                } else {
                    Vec::new()
                };
                Packet::ConnAck {
                    session_present: flags == 1,
                    code,
                    props,
                }
            }
            0x30..=0x3F => {
                let qos = (byte1 >> 1) & 3;
                assert!(qos < 3, "PUBLISH with QoS 3");
                let topic = body.string();
                let id = if qos > 0 { body.u16() } else { 0 };
                let props = if v5 { body.props() } else { Vec::new() };
                Packet::Publish(Publish {
                    topic,
                    payload: body.rest(),
                    qos,
                    retain: byte1 & 1 == 1,
                    dup: byte1 & 8 == 8,
                    id,
                    props,
                })
            }
            PUBACK => {
                let (id, code) = ack(&mut body);
                Packet::PubAck { id, code }
            }
            PUBREC => {
                let (id, code) = ack(&mut body);
                Packet::PubRec { id, code }
            }
            PUBREL => {
                let (id, code) = ack(&mut body);
                Packet::PubRel { id, code }
            }
            PUBCOMP => {
                let (id, code) = ack(&mut body);
                Packet::PubComp { id, code }
            }
            0x90 => {
                let id = body.u16();
                if v5 {
                    body.props();
                }
                Packet::SubAck {
                    id,
                    codes: body.rest(),
                }
            }
            0xB0 => {
                let id = body.u16();
                if v5 {
                    body.props();
                }
                Packet::UnsubAck {
                    id,
                    codes: body.rest(),
                }
            }
            0xD0 => Packet::PingResp,
            0xE0 => {
                let code = if body.is_empty() { 0 } else { body.u8() };
                let props = if body.is_empty() {
                    Vec::new()
                } else {
                    body.props()
                };
                Packet::Disconnect { code, props }
            }
            other => panic!("a broker does not send first byte {other:#04x}"),
        };
        assert!(
            body.is_empty(),
            "{packet:?}: {} bytes after the packet",
            body.bytes.len()
        );
        packet
    }
}

/// What a CONNECT says.
#[derive(Clone, Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Clean Session (3.1.1) / Clean Start (5).
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties.
    pub props: Vec<Prop>,
    /// The will: its topic, payload, QoS, retain flag and (MQTT 5) will properties.
    pub will: Option<Publish>,
    /// The username and the password, when given.
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Connect {
    /// Clean Session / Clean Start 1, keep-alive 60 s, no properties, no will.
    pub fn new(version: Version, client_id: &str) -> Connect {
        Connect {
            version,
            client_id: client_id.to_string(),
            clean: true,
            keep_alive: 60,
            props: Vec::new(),
            will: None,
            username: None,
            password: None,
        }
    }

    /// Gives a username, and a password when `password` is `Some`.
    pub fn login(mut self, username: &str, password: Option<&str>) -> Connect {
        self.username = Some(username.to_string());
        self.password = password.map(|p| p.as_bytes().to_vec());
        self
    }

    /// Clean Session / Clean Start 0: resume the session if there is one.
    pub fn resume(mut self) -> Connect {
        self.clean = false;
        self
    }

    /// A persistent session: Clean Session 0 on 3.1.1; Clean Start 0 and a Session Expiry
    /// Interval of an hour on 5.
    pub fn persistent(self) -> Connect {
        let v5 = self.version == Version::V5;
        let connect = self.resume();
        if v5 {
            connect.prop(Prop::SessionExpiry(3600))
        } else {
            connect
        }
    }

    pub fn keep_alive(mut self, secs: u16) -> Connect {
        self.keep_alive = secs;
        self
    }

    pub fn prop(mut self, prop: Prop) -> Connect {
        self.props.push(prop);
        self
    }

    pub fn will(mut self, will: Publish) -> Connect {
        self.will = Some(will);
        self
    }

    /// The CONNECT packet.
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.version == Version::V5;
        let mut body = Vec::new();
        put_bytes(&mut body, b"MQTT");
        body.push(if v5 { 5 } else { 4 });
        let mut flags = u8::from(self.clean) << 1;
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3) | (u8::from(will.retain) << 5);
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        body.push(flags);
        put_u16(&mut body, self.keep_alive);
        if v5 {
            put_props(&mut body, &self.props);
        }
        put_bytes(&mut body, self.client_id.as_bytes());
        if let Some(will) = &self.will {
            if v5 {
                put_props(&mut body, &will.props);
            }
            put_bytes(&mut body, will.topic.as_bytes());
            put_bytes(&mut body, &will.payload);
        }
        if let Some(username) = &self.username {
            put_bytes(&mut body, username.as_bytes());
        }
        if let Some(password) = &self.password {
            put_bytes(&mut body, password);
        }
        frame(0x10, &body)
    }
}

/// A SUBSCRIBE: packet id, (MQTT 5) properties, then each filter with its subscription
/// options byte (3.1.1 §3.8, MQTT 5 §3.8), as given, valid or not.
pub fn subscribe_packet(
    version: Version,
    id: u16,
    filters: &[(&str, u8)],
    props: &[Prop],
) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == Version::V5 {
        put_props(&mut body, props);
    }
    for (filter, options) in filters {
        put_bytes(&mut body, filter.as_bytes());
        body.push(*options);
    }
    frame(0x82, &body)
}

/// An UNSUBSCRIBE: packet id, (MQTT 5) no properties, the filters (3.1.1 §3.10, MQTT 5
/// §3.10), as given, valid or not.
pub fn unsubscribe_packet(version: Version, id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == Version::V5 {
        put_props(&mut body, &[]);
    }
    for filter in filters {
        put_bytes(&mut body, filter.as_bytes());
    }
    frame(0xA2, &body)
}

/// The CONNACK of an accepted connection.
#[derive(Clone, Debug)]
pub struct ConnAck {
    pub session_present: bool,
    pub props: Vec<Prop>,
}

/// One raw connection to a broker.
pub struct Client {
    stream: TcpStream,
    pub version: Version,
    /// The client id, for failure messages.
    pub name: String,
    /// Packets read while waiting for another one, handed out first by [`Client::recv`].
    pending: VecDeque<Packet>,
    next_id: u16,
}

impl Client {
    /// Opens a connection and sends `connect`; returns the client and the broker's first
    /// answer (`None`: closed without one).
    pub fn try_connect(port: u16, connect: &Connect) -> (Client, Option<Packet>) {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the broker");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        stream.set_nodelay(true).expect("nodelay");
        let mut client = Client {
            stream,
            version: connect.version,
            name: connect.client_id.clone(),
            pending: VecDeque::new(),
            next_id: 0,
        };
        client.send_raw(&connect.encode());
        let answer = client.recv();
        (client, answer)
    }

    /// Connects; the broker must accept (CONNACK 0).
    pub fn connect(port: u16, connect: &Connect) -> (Client, ConnAck) {
        match Client::try_connect(port, connect) {
            (
                client,
                Some(Packet::ConnAck {
                    session_present,
                    code: 0,
                    props,
                }),
            ) => (
                client,
                ConnAck {
                    session_present,
                    props,
                },
            ),
            (_, other) => panic!("{}: expected CONNACK 0, got {other:?}", connect.client_id),
        }
    }

    /// Connects with a clean session and no properties.
    pub fn clean(port: u16, version: Version, client_id: &str) -> Client {
        Client::connect(port, &Connect::new(version, client_id)).0
    }

    /// Writes bytes as they are (a write to a closed connection is ignored: reading tells
    /// what happened).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next packet identifier (1, 2, ...).
    pub fn next_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// Sends a PUBLISH as given, with the client's next packet id when it has QoS > 0 and
    /// none; returns the packet id used.
    pub fn publish(&mut self, message: &Publish) -> u16 {
        let mut message = message.clone();
        if message.qos > 0 && message.id == 0 {
            message.id = self.next_id();
        }
        self.send_raw(&message.encode(self.version));
        message.id
    }

    /// Publishes and completes the QoS flow (PUBACK; PUBREC, PUBREL, PUBCOMP); returns the
    /// reason code of the PUBACK or PUBREC (0 on 3.1.1). Other packets read meanwhile wait in
    /// the client for [`Client::recv`].
    pub fn publish_done(&mut self, message: &Publish) -> u8 {
        let id = self.publish(message);
        match message.qos {
            0 => 0,
            1 => self.wait_for(|p| match p {
                Packet::PubAck { id: got, code } if *got == id => Some(*code),
                _ => None,
            }),
            _ => {
                let code = self.wait_for(|p| match p {
                    Packet::PubRec { id: got, code } if *got == id => Some(*code),
                    _ => None,
                });
                self.send_ack(PUBREL, id);
                self.wait_for(|p| match p {
                    Packet::PubComp { id: got, .. } if *got == id => Some(()),
                    _ => None,
                });
                code
            }
        }
    }

    /// Waits for the PUBACK of the publish sent with packet id `id` (other packets read
    /// meanwhile wait for [`Client::recv`]); returns its reason code (0 on 3.1.1).
    pub fn wait_puback(&mut self, id: u16) -> u8 {
        self.wait_for(|p| match p {
            Packet::PubAck { id: got, code } if *got == id => Some(*code),
            _ => None,
        })
    }

    /// Sends an acknowledgement ([`PUBACK`], [`PUBREC`], [`PUBREL`] or [`PUBCOMP`]).
    pub fn send_ack(&mut self, byte1: u8, id: u16) {
        self.send_raw(&frame(byte1, &id.to_be_bytes()));
    }

    /// Acknowledges a delivered message in full: PUBACK for QoS 1; PUBREC, the broker's
    /// PUBREL, PUBCOMP for QoS 2.
    pub fn ack(&mut self, message: &Publish) {
        match message.qos {
            0 => {}
            1 => self.send_ack(PUBACK, message.id),
            _ => {
                self.send_ack(PUBREC, message.id);
                let id = message.id;
                self.wait_for(|p| match p {
                    Packet::PubRel { id: got, .. } if *got == id => Some(()),
                    _ => None,
                });
                self.send_ack(PUBCOMP, id);
            }
        }
    }

    /// Subscribes with (filter, subscription options byte) pairs and MQTT 5 properties;
    /// returns the SUBACK's codes.
    pub fn subscribe_with(&mut self, filters: &[(&str, u8)], props: &[Prop]) -> Vec<u8> {
        let id = self.next_id();
        self.send_raw(&subscribe_packet(self.version, id, filters, props));
        self.wait_for(|p| match p {
            Packet::SubAck { id: got, codes } if *got == id => Some(codes.clone()),
            _ => None,
        })
    }

    /// Subscribes to one filter with this maximum QoS; it must be granted.
    pub fn subscribe(&mut self, filter: &str, qos: u8) {
        let codes = self.subscribe_with(&[(filter, qos)], &[]);
        assert_eq!(codes, [qos], "{}: SUBACK for {filter}", self.name);
    }

    /// Unsubscribes; returns the UNSUBACK's codes (none on 3.1.1).
    pub fn unsubscribe(&mut self, filters: &[&str]) -> Vec<u8> {
        let id = self.next_id();
        self.send_raw(&unsubscribe_packet(self.version, id, filters));
        self.wait_for(|p| match p {
            Packet::UnsubAck { id: got, codes } if *got == id => Some(codes.clone()),
            _ => None,
        })
    }

    /// Sends PINGREQ and reads up to its PINGRESP; returns the packets that came before it
    /// (they are not kept for [`Client::recv`]). Whatever the broker had written before it
    /// answered the ping is among them.
    pub fn ping(&mut self) -> Vec<Packet> {
        let mut before: Vec<Packet> = self.pending.drain(..).collect();
        self.send_raw(&[0xC0, 0x00]);
        loop {
            match self.recv() {
                Some(Packet::PingResp) => return before,
                Some(other) => before.push(other),
                None => panic!("{}: closed while waiting for PINGRESP", self.name),
            }
        }
    }

    /// Sends DISCONNECT with this reason code and properties (3.1.1: a plain DISCONNECT) and
    /// waits until the broker closes the connection.
    pub fn disconnect_with(mut self, code: u8, props: &[Prop]) {
        let mut body = Vec::new();
        if self.version == Version::V5 && (code != 0 || !props.is_empty()) {
            body.push(code);
            put_props(&mut body, props);
        }
        self.send_raw(&frame(0xE0, &body));
        self.closed();
    }

    /// A normal DISCONNECT; waits until the broker closes the connection.
    pub fn disconnect(self) {
        self.disconnect_with(0, &[]);
    }

    /// Closes the connection without DISCONNECT (as a device losing power or network does).
    pub fn drop_abruptly(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The next packet: one read earlier, else from the connection; `None` once the broker
    /// closed the connection. Fails the test if nothing comes within [`WAIT`].
    pub fn recv(&mut self) -> Option<Packet> {
        match self.pending.pop_front() {
            Some(packet) => Some(packet),
            None => self.read_packet(),
        }
    }

    /// The next packet from the connection.
    fn read_packet(&mut self) -> Option<Packet> {
        let mut byte1 = [0u8; 1];
        loop {
            match self.stream.read(&mut byte1) {
                Ok(0) => return None,
                Ok(_) => break,
                // Not the peer: a signal woke this thread. A child of the test process that
                // exits while another thread spawns one (signals blocked there) has its SIGCHLD
                // handed to some other thread, and a read with a timeout then fails with EINTR
                // although SIGCHLD is ignored. `read_exact` below retries the same way.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) =>
                {
                    return None
                }
                Err(e) => panic!("{}: no packet and no close within {WAIT:?}: {e}", self.name),
            }
        }
        let mut len = 0usize;
        for shift in 0..4 {
            let mut b = [0u8; 1];
            self.read_exact(&mut b)?;
            len |= usize::from(b[0] & 0x7F) << (7 * shift);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body)?;
        Some(Packet::decode(self.version, byte1[0], &body))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Option<()> {
        match self.stream.read_exact(buf) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => None,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("{}: packet cut short: {e}", self.name),
        }
    }

    /// The next packet, which must come.
    pub fn next(&mut self) -> Packet {
        match self.recv() {
            Some(packet) => packet,
            None => panic!("{}: the broker closed the connection", self.name),
        }
    }

    /// The next packet, which must be a PUBLISH (not acknowledged).
    pub fn expect_publish(&mut self) -> Publish {
        match self.next() {
            Packet::Publish(p) => p,
            other => panic!("{}: expected PUBLISH, got {other:?}", self.name),
        }
    }

    /// The next message, acknowledged in full.
    pub fn receive(&mut self) -> Publish {
        let message = self.expect_publish();
        self.ack(&message);
        message
    }

    /// Receives (and acknowledges) messages until one on `sentinel` arrives; returns those
    /// before it. A message that must not arrive is checked with a sentinel published after
    /// it on the same path: once the sentinel is here, the other would have been too.
    pub fn receive_until(&mut self, sentinel: &str) -> Vec<Publish> {
        let mut before = Vec::new();
        loop {
            let message = self.receive();
            if message.topic == sentinel {
                return before;
            }
            before.push(message);
        }
    }

    /// Lets reads wait up to `wait` from now on (for what takes longer than [`WAIT`] by
    /// design, such as a keep-alive timeout).
    pub fn set_wait(&mut self, wait: Duration) {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("read timeout");
    }

    /// Reads until the broker closes the connection; returns what it sent before.
    pub fn closed(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(packet) = self.recv() {
            packets.push(packet);
        }
        packets
    }

    /// Reads packets until `pick` accepts one; the others wait for [`Client::recv`].
    fn wait_for<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        if let Some(at) = self.pending.iter().position(|p| pick(p).is_some()) {
            let packet = self.pending.remove(at).expect("just found");
            return pick(&packet).expect("just picked");
        }
        loop {
            let Some(packet) = self.read_packet() else {
                panic!(
                    "{}: closed while waiting (after {:?})",
                    self.name, self.pending
                )
            };
            if let Some(found) = pick(&packet) {
                return found;
            }
            self.pending.push_back(packet);
        }
    }
}
