//! The fuzz targets: for each parser that faces the outside, a corpus of valid inputs, a
//! dictionary of tokens for structure-aware mutations, and a check that runs the parser the way
//! the gateway does and tests its properties.
//!
//! Shared by `tests/fuzz.rs` (proptest-style, time-bounded, under `cargo test`) and `fuzz/`
//! (libFuzzer, `cargo +nightly fuzz`), so both drive exactly the same library functions.
//!
//! A check returns `Ok(outcome)` when every property held (whether the parser accepted the
//! input or refused it), and `Err(message)` when one did not; a panic is a failure too. The
//! outcome's label (the kind of answer, without numbers or names) tells the fuzz loop when an
//! input reached somewhere new, which is its only feedback. Checks never read a file outside
//! the fixture directory their target made.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use outpost::client::dead_letters as client;
use outpost::config::Config;
use outpost::control::dead_letters::{self as control, Request, Verb};
use outpost::geo::{GeoJsonOptions, Geography, Location, Shape};
use outpost::signing::{
    self, CommandOp, KeyId, SignedCommand, SignedModule, SigningKey, VerifyingKey,
};
use serde_json::{json, Value};

/// A PINGREQ packet.
const PINGREQ: [u8; 2] = [0xC0, 0x00];

// `outpost::edge::frame` is private to the crate (only the front uses it), so the target
// compiles the very same source file into the test (its unit tests run here again).
#[allow(dead_code)]
#[path = "../../src/edge/connect.rs"]
mod connect;
#[allow(dead_code)]
#[path = "../../src/edge/frame.rs"]
mod frame;
use frame::{kind, Frame, Version};

/// What a check says about one input whose properties all held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the parser took the input as valid (all the way through, for a pipeline of
    /// parsers such as the configuration's).
    pub accepted: bool,
    /// The kind of answer, for the fuzz loop's novelty feedback.
    pub label: String,
}

impl Outcome {
    fn accepted(label: impl Into<String>) -> Self {
        Outcome {
            accepted: true,
            label: label.into(),
        }
    }

    fn refused(label: impl Into<String>) -> Self {
        Outcome {
            accepted: false,
            label: label.into(),
        }
    }
}

/// A check: `Ok` when every property held, `Err(why)` when one did not.
pub type Check = Box<dyn Fn(&[u8]) -> Result<Outcome, String> + Send + Sync>;

/// One fuzz target.
pub struct Target {
    /// Its name (`frames`, `config`, ...), as in the test and in the cargo-fuzz target.
    pub name: &'static str,
    /// Longest input tried: enough for every structure the parser knows, small enough that
    /// one input takes microseconds to milliseconds.
    pub max_len: usize,
    /// Valid inputs: every one of them must be accepted (checked before fuzzing).
    pub seeds: Vec<Vec<u8>>,
    /// Inputs just outside what is valid (an earlier format, a forbidden value): mutated like
    /// the seeds, but refused.
    pub near_misses: Vec<Vec<u8>>,
    /// Tokens that mutations insert: the syntax and the names the parser knows.
    pub dictionary: Vec<Vec<u8>>,
    /// Whether inputs are JSON documents, so that mutations of their tree are worth trying.
    pub json: bool,
    /// The check.
    pub check: Check,
    /// Files the check may read (kept alive as long as the target).
    pub fixture: Option<Arc<tempfile::TempDir>>,
}

/// Every target, in a stable order.
pub fn all() -> Vec<Target> {
    vec![
        frames(),
        config(),
        geojson(),
        envelope(),
        command(),
        keys(),
        control_request(),
        control_reply(),
        uplink_packets(),
    ]
}

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    match name {
        "frames" => Some(frames()),
        "config" => Some(config()),
        "geojson" => Some(geojson()),
        "envelope" => Some(envelope()),
        "command" => Some(command()),
        "keys" => Some(keys()),
        "control_request" => Some(control_request()),
        "control_reply" => Some(control_reply()),
        "uplink_packets" => Some(uplink_packets()),
        _ => None,
    }
}

/// A label from a value's `Debug`: see [`label_text`].
fn label(prefix: &str, value: &impl Debug) -> String {
    label_text(prefix, &format!("{value:?}"))
}

/// A label from a message: digits and quoted text (`"..."` and `` `...` ``) removed, at most
/// 40 characters, so that the same kind of error with other numbers or names is the same
/// label (the fuzz loop keeps an input for each new label: too fine a label keeps everything).
fn label_text(prefix: &str, text: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 41);
    out.push_str(prefix);
    out.push(' ');
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        if let Some(q) = quote {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, c) if c == q => quote = None,
                _ => escaped = false,
            }
            continue;
        }
        if c == '"' || c == '`' {
            quote = Some(c);
            out.push_str("\"\"");
        } else if !c.is_ascii_digit() {
            out.push(c);
        }
        if out.len() >= prefix.len() + 40 {
            break;
        }
    }
    out
}

fn words(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|w| w.as_bytes().to_vec()).collect()
}

/// Numbers at the edges of every integer and float type, and some that are out of range.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "127",
    "128",
    "255",
    "256",
    "32767",
    "65535",
    "65536",
    "2147483647",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e309",
    "-1e309",
    "0.1",
    "1.5e-320",
    "180",
    "180.0000001",
    "-90",
    "90.000001",
];

/// JSON syntax.
const JSON_TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u0000", "\\ud800", "null", "true", "false", "{}",
    "[]", "\"\"", " ", "\n", "\t",
];

fn json_dictionary(names: &[&str]) -> Vec<Vec<u8>> {
    let mut out = words(JSON_TOKENS);
    out.extend(words(NUMBERS));
    for name in names {
        out.push(format!("\"{name}\"").into_bytes());
        out.push(format!("\"{name}\":").into_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// frames: MQTT from a device (and from the broker), as the front reads it

fn encode_v4_publish(topic: &str, qos: u8, pkid: u16, retain: bool, payload: &[u8]) -> Vec<u8> {
    use rumqttc::mqttbytes::v4::Publish;
    let qos = rumqttc::mqttbytes::qos(qos).unwrap_or(rumqttc::QoS::AtMostOnce);
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.retain = retain;
    let mut buf = BytesMut::new();
    p.write(&mut buf).expect("a valid v4 publish encodes");
    buf.to_vec()
}

fn encode_v5_publish(
    topic: &str,
    qos: u8,
    pkid: u16,
    retain: bool,
    payload: &[u8],
    properties: Option<rumqttc::v5::mqttbytes::v5::PublishProperties>,
) -> Vec<u8> {
    use rumqttc::v5::mqttbytes::{v5::Publish, QoS};
    let qos = match qos {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    let mut p = Publish::new(topic, qos, payload.to_vec(), properties);
    p.pkid = pkid;
    p.retain = retain;
    let mut buf = BytesMut::new();
    p.write(&mut buf).expect("a valid v5 publish encodes");
    buf.to_vec()
}

fn connect_v4(client_id: &str, keep_alive: u16, login: bool, will: bool) -> Vec<u8> {
    use rumqttc::mqttbytes::v4::{Connect, LastWill};
    let mut c = Connect::new(client_id);
    c.keep_alive = keep_alive;
    if login {
        c.set_login("user", "secret");
    }
    if will {
        c.last_will = Some(LastWill::new(
            "status/dev",
            "gone",
            rumqttc::QoS::AtLeastOnce,
            true,
        ));
    }
    let mut buf = BytesMut::new();
    c.write(&mut buf).expect("a v4 CONNECT encodes");
    buf.to_vec()
}

fn connect_v5(client_id: &str, keep_alive: u16, will: bool) -> Vec<u8> {
    use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, LastWill, Login};
    use rumqttc::v5::mqttbytes::QoS;
    let c = Connect {
        keep_alive,
        client_id: client_id.into(),
        clean_start: true,
        properties: Some(ConnectProperties {
            session_expiry_interval: Some(60),
            receive_maximum: Some(20),
            topic_alias_max: Some(10),
            user_properties: vec![("k".into(), "v".into())],
            ..ConnectProperties::new()
        }),
    };
    let will = will.then(|| LastWill::new("status/dev", "gone", QoS::AtLeastOnce, false, None));
    let login = Some(Login::new("user", "secret"));
    let mut buf = BytesMut::new();
    c.write(&will, &login, &mut buf)
        .expect("a v5 CONNECT encodes");
    buf.to_vec()
}

/// Connections as the front reads them: a CONNECT (3.1.1, 3.1 and 5) and whole sessions
/// (CONNECT, then PUBLISH at every QoS with aliases and properties, acks, ping, subscribe,
/// disconnect); and, as near misses, packets without a CONNECT and what the broker sends back.
fn frame_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let alias = |a: u16| {
        Some(PublishProperties {
            topic_alias: Some(a),
            ..PublishProperties::default()
        })
    };
    let rich = Some(PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(30),
        response_topic: Some("reply/x".into()),
        correlation_data: Some(Bytes::from_static(b"corr")),
        user_properties: vec![("unit".into(), "C".into())],
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    });
    let puback = [0x40, 0x02, 0x00, 0x07];
    let pubrec = [0x50, 0x02, 0x00, 0x08];
    let pubrel = [0x62, 0x02, 0x00, 0x08];
    let pubcomp = [0x70, 0x02, 0x00, 0x08];
    let puback_v5 = [0x40, 0x04, 0x00, 0x07, 0x10, 0x00];
    let subscribe = [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01];
    let disconnect = [0xE0, 0x00];
    // MQTT 3.1: protocol name MQIsdp, level 3.
    let mut connect_31 = vec![0x10, 0x00, 0x00, 0x06];
    connect_31.extend_from_slice(b"MQIsdp");
    connect_31.extend_from_slice(&[0x03, 0x02, 0x00, 0x3C, 0x00, 0x03]);
    connect_31.extend_from_slice(b"old");
    connect_31[1] = (connect_31.len() - 2) as u8;

    let v4_publishes = [
        encode_v4_publish("telemetry/dev-1", 0, 0, false, b"{\"t\":21.5}"),
        encode_v4_publish(
            "telemetry/dev-1",
            1,
            7,
            false,
            b"{\"lat\":53.5,\"lon\":9.9}",
        ),
        encode_v4_publish("telemetry/dev-1", 2, 8, true, &[0, 1, 2, 0xFF]),
        encode_v4_publish("a", 1, 65535, false, b""),
    ];
    let v5_publishes = [
        encode_v5_publish("telemetry/dev-5", 1, 3, false, b"{\"t\":1}", alias(1)),
        encode_v5_publish("", 1, 4, false, b"{\"t\":2}", alias(1)),
        encode_v5_publish("telemetry/dev-5", 2, 5, true, b"x", rich),
        encode_v5_publish("telemetry/dev-5", 0, 0, false, b"", None),
    ];

    let mut seeds = vec![
        connect_v4("dev-1", 30, false, false),
        connect_v4("dev-1", 0, true, true),
        connect_v4("", 10, false, false),
        connect_31.clone(),
        connect_v5("dev-5", 30, true),
        connect_v5("dev-5", 0, false),
    ];
    let mut near_misses = vec![PINGREQ.to_vec(), puback.to_vec(), pubrec.to_vec()];
    let mut v4_session = connect_v4("dev-1", 0, false, false);
    for p in &v4_publishes {
        v4_session.extend_from_slice(p);
    }
    for p in [&pubrel[..], &subscribe, &PINGREQ, &disconnect] {
        v4_session.extend_from_slice(p);
    }
    seeds.push(v4_session);
    let mut v31_session = connect_31;
    v31_session.extend_from_slice(&v4_publishes[1]);
    seeds.push(v31_session);
    let mut v5_session = connect_v5("dev-5", 60, false);
    for p in &v5_publishes {
        v5_session.extend_from_slice(p);
    }
    for p in [&pubrel[..], &PINGREQ, &disconnect] {
        v5_session.extend_from_slice(p);
    }
    seeds.push(v5_session);
    // What the broker sends back: the front reads it for PUBACK and PUBREC.
    let mut from_broker = vec![0x20, 0x02, 0x00, 0x00];
    for p in [&puback[..], &pubrec, &pubcomp, &puback_v5, &[0xD0, 0x00]] {
        from_broker.extend_from_slice(p);
    }
    from_broker.extend_from_slice(&v4_publishes[1]);
    near_misses.push(from_broker);
    near_misses.extend(v4_publishes);
    near_misses.extend(v5_publishes);
    (seeds, near_misses)
}

/// The front's packet size limit (`max_payload + PACKET_OVERHEAD` in front.rs) for a small
/// payload limit of 4 KiB.
const FRONT_MAX: usize = 4096 + 64 * 1024;

/// The frames target: the byte stream of one connection, read as the front reads it.
pub fn frames() -> Target {
    let mut dictionary = words(&["MQTT", "MQIsdp", "telemetry/", "+", "#", "/"]);
    for b in [
        &[0x10u8][..],
        &[0x30],
        &[0x32],
        &[0x34],
        &[0x36],
        &[0x40, 0x02],
        &[0x50, 0x02],
        &[0x62, 0x02],
        &[0xC0, 0x00],
        &[0xE0, 0x00],
        &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04],
        &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05],
        &[0x80, 0x80, 0x80, 0x01],
        &[0xFF, 0xFF, 0xFF, 0x7F],
        &[0xFF, 0xFF, 0xFF, 0xFF],
        &[0x23, 0x00, 0x01],
        &[0x0B, 0x01],
        &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
    ] {
        dictionary.push(b.to_vec());
    }
    let (seeds, near_misses) = frame_seeds();
    Target {
        name: "frames",
        max_len: 8192,
        seeds,
        near_misses,
        dictionary,
        json: false,
        check: Box::new(check_frames),
        fixture: None,
    }
}

/// Drives the front's reading of `data` (device to broker, at two size limits, and broker to
/// device), and every parser on every frame.
pub fn check_frames(data: &[u8]) -> Result<Outcome, String> {
    let mut seen = BTreeSet::new();
    let (accepted, stop) = device_stream(data, 1 << 20, &mut seen)?;
    device_stream(data, 64, &mut BTreeSet::new())?;
    device_stream(data, FRONT_MAX, &mut BTreeSet::new())?;
    broker_stream(data, &mut seen)?;
    every_parser_on_every_frame(data)?;
    // Why the connection ended, and how many kinds of packet it had before (1, 2, 3-4, 5-8,
    // more): sets of kinds would be too many labels.
    let kinds = seen.len();
    let label = format!("{stop} | {}", usize::BITS - kinds.leading_zeros());
    Ok(if accepted {
        Outcome::accepted(label)
    } else {
        Outcome::refused(label)
    })
}

/// Properties of a frame `next_frame(input, max)` returned: it lies within the buffer and the
/// limit, its header is what the bytes say, no prefix of it is a frame, and bytes after it do
/// not change it.
fn check_frame(input: &[u8], frame: &Frame, max: usize) -> Result<(), String> {
    let len = frame.len();
    if len > input.len() {
        return Err(format!(
            "a frame of {len} bytes from a buffer of {}",
            input.len()
        ));
    }
    if len > max {
        return Err(format!("a frame of {len} bytes over the limit {max}"));
    }
    if !(2..=5).contains(&frame.header_len) {
        return Err(format!("header of {} bytes", frame.header_len));
    }
    if Some(&frame.byte1) != input.first() {
        return Err("byte1 is not the first byte".into());
    }
    let mut remaining = 0usize;
    for (i, b) in input[1..frame.header_len].iter().enumerate() {
        remaining |= usize::from(b & 0x7F) << (7 * i);
    }
    if remaining != frame.remaining {
        return Err(format!(
            "remaining length {} where the header says {remaining}",
            frame.remaining
        ));
    }
    let mut cuts = vec![0, 1, frame.header_len - 1, frame.header_len, len - 1];
    cuts.retain(|&c| c < len);
    for cut in cuts {
        if let Ok(Some(f)) = frame::next_frame(&input[..cut], max) {
            return Err(format!(
                "the first {cut} bytes of a {len}-byte frame are a frame of {}",
                f.len()
            ));
        }
    }
    let mut longer = input[..len].to_vec();
    longer.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
    if frame::next_frame(&longer, max) != Ok(Some(*frame)) {
        return Err("bytes after a frame change it".into());
    }
    Ok(())
}

/// The front's device side: CONNECT first (keep-alive rewrite), then PUBLISH (topic aliases)
/// and PUBREL by their packet ids, until an error closes the connection or bytes run out.
/// Returns whether the CONNECT was accepted, and why the stream ended.
fn device_stream(
    data: &[u8],
    max: usize,
    seen: &mut BTreeSet<String>,
) -> Result<(bool, String), String> {
    let mut stop = "more bytes needed".to_string();
    let mut input = data;
    let mut version: Option<Version> = None;
    let mut aliases: HashMap<u16, String> = HashMap::new();
    loop {
        let frame = match frame::next_frame(input, max) {
            Err(e) => {
                stop = label("frame", &e);
                break;
            }
            Ok(None) => break,
            Ok(Some(frame)) => frame,
        };
        check_frame(input, &frame, max)?;
        let packet = Bytes::copy_from_slice(&input[..frame.len()]);
        input = &input[frame.len()..];
        let Some(v) = version else {
            match connect::parse_connect(&frame, &packet) {
                Err(e) => {
                    stop = label("connect", &e);
                    break;
                }
                Ok(info) => {
                    // What the session layer relies on: MQTT strings without U+0000.
                    if info.client_id.contains('\0')
                        || info.username.as_deref().is_some_and(|u| u.contains('\0'))
                    {
                        return Err(format!("a CONNECT string with U+0000: {info:?}"));
                    }
                    seen.insert(format!("connect-{:?}", info.version));
                    version = Some(info.version);
                    continue;
                }
            }
        };
        match frame.kind() {
            kind::CONNECT => {
                stop = "second connect".into();
                break;
            }
            kind::PUBLISH => {
                let publish = match frame::parse_publish(&frame, packet.clone(), v) {
                    Err(e) => {
                        stop = label("publish", &e);
                        break;
                    }
                    Ok(p) => p,
                };
                check_publish(&frame, &packet, &publish, v)?;
                // The front's topic resolution (Session::resolve_topic).
                let resolved = match publish.topic_alias {
                    Some(alias) if publish.topic.is_empty() => aliases.get(&alias).cloned(),
                    Some(alias) => {
                        aliases.insert(alias, publish.topic.clone());
                        Some(publish.topic.clone())
                    }
                    None => Some(publish.topic.clone()).filter(|t| !t.is_empty()),
                };
                if resolved.is_none() {
                    stop = "unresolved topic".into();
                    break;
                }
                seen.insert(format!("publish-{:?}-q{}", v, publish.qos));
            }
            kind::PUBREL => {
                if let Ok(id) = frame::packet_id(&frame, &packet) {
                    check_packet_id(&frame, &packet, id)?;
                    seen.insert("pubrel".into());
                }
            }
            other => {
                seen.insert(format!("kind-{other}"));
            }
        }
    }
    Ok((version.is_some(), stop))
}

fn check_packet_id(frame: &Frame, packet: &[u8], id: u16) -> Result<(), String> {
    match packet.get(frame.header_len..frame.header_len + 2) {
        Some(&[hi, lo]) if u16::from_be_bytes([hi, lo]) == id => Ok(()),
        _ => Err(format!(
            "packet id {id} is not the two bytes after the header"
        )),
    }
}

/// An accepted PUBLISH: QoS and packet id agree, topic and payload fit in the packet, the
/// payload is the packet's tail, and encoding it again gives the same publish.
fn check_publish(
    frame: &Frame,
    packet: &Bytes,
    p: &frame::Publish,
    version: Version,
) -> Result<(), String> {
    if p.qos > 2 {
        return Err(format!("QoS {}", p.qos));
    }
    if (p.qos == 0) != (p.pkid == 0) {
        return Err(format!("QoS {} with packet id {}", p.qos, p.pkid));
    }
    if p.topic.len() + p.payload.len() > frame.remaining {
        return Err("topic and payload are longer than the packet".into());
    }
    if !packet.ends_with(&p.payload) {
        return Err("the payload is not the end of the packet".into());
    }
    let encoded = match version {
        Version::V4 => encode_v4_publish(&p.topic, p.qos, p.pkid, p.retain, &p.payload),
        Version::V5 => encode_v5_publish(
            &p.topic,
            p.qos,
            p.pkid,
            p.retain,
            &p.payload,
            p.topic_alias
                .map(|a| rumqttc::v5::mqttbytes::v5::PublishProperties {
                    topic_alias: Some(a),
                    ..Default::default()
                }),
        ),
    };
    let again = frame::next_frame(&encoded, usize::MAX)
        .ok()
        .flatten()
        .ok_or("an accepted publish, encoded again, is not a frame")?;
    let back = frame::parse_publish(&again, Bytes::from(encoded), version)
        .map_err(|e| format!("an accepted publish, encoded again, is refused: {e}"))?;
    // The encoder above writes no properties (rumqttc would reorder them): the pass-through
    // bytes are checked on their own below.
    let without_properties = frame::Publish {
        properties: Bytes::new(),
        message_expiry: None,
        ..p.clone()
    };
    if back != without_properties {
        return Err(format!(
            "an accepted publish does not survive encoding: {p:?} became {back:?}"
        ));
    }
    passed_on_properties_are_well_formed(&p.properties)
}

/// What a publish passes on to subscribers is a property list of only the properties that
/// are passed on (payload format, content type, response topic, correlation data, user
/// properties), each whole.
fn passed_on_properties_are_well_formed(mut props: &[u8]) -> Result<(), String> {
    fn string(props: &mut &[u8]) -> Result<(), String> {
        let &[hi, lo, ref rest @ ..] = *props else {
            return Err("a passed-on property is cut short".into());
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if rest.len() < len {
            return Err("a passed-on property is cut short".into());
        }
        *props = &rest[len..];
        Ok(())
    }
    while let [id, rest @ ..] = props {
        props = rest;
        match id {
            0x01 => {
                props = props.get(1..).ok_or("a cut payload format")?;
            }
            0x03 | 0x08 | 0x09 => string(&mut props)?,
            0x26 => {
                string(&mut props)?;
                string(&mut props)?;
            }
            other => return Err(format!("property {other:#04x} is passed on")),
        }
    }
    Ok(())
}

/// The front's broker side: frames without a size limit, packet ids of PUBACK and PUBREC.
fn broker_stream(data: &[u8], seen: &mut BTreeSet<String>) -> Result<(), String> {
    let mut input = data;
    while let Ok(Some(frame)) = frame::next_frame(input, usize::MAX) {
        check_frame(input, &frame, usize::MAX)?;
        let packet = &input[..frame.len()];
        input = &input[frame.len()..];
        if matches!(frame.kind(), kind::PUBACK | kind::PUBREC) {
            match frame::packet_id(&frame, packet) {
                Ok(id) => {
                    check_packet_id(&frame, packet, id)?;
                    seen.insert("broker-ack".into());
                }
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// Every parser on every frame, whatever its kind (none may panic).
fn every_parser_on_every_frame(data: &[u8]) -> Result<(), String> {
    let mut input = data;
    while let Ok(Some(frame)) = frame::next_frame(input, usize::MAX) {
        let packet = Bytes::copy_from_slice(&input[..frame.len()]);
        input = &input[frame.len()..];
        let _ = connect::parse_connect(&frame, &packet);
        for version in [Version::V4, Version::V5] {
            if let Ok(p) = frame::parse_publish(&frame, packet.clone(), version) {
                if p.topic.len() + p.payload.len() > frame.remaining {
                    return Err("topic and payload are longer than the packet".into());
                }
            }
        }
        if let Ok(id) = frame::packet_id(&frame, &packet) {
            check_packet_id(&frame, &packet, id)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// config: a configuration file, parsed and validated as `outpost config check` does

/// Files a fuzzed configuration may name; every other path is mapped to a file that does not
/// exist in the fixture directory, so validation never reads anything else on the machine.
const CONFIG_FIXTURES: &[&str] = &[
    "countries-110m.geojson",
    "zones.geojson",
    "bare.geojson",
    "junk.geojson",
    "ops.pub",
    "release.pub",
    "junk.pub",
    "enrich.wasm",
];

/// Names the demo's regions use, which the fixture GeoJSON has as small squares.
fn demo_fence_names() -> Vec<String> {
    let demo: Config = Config::from_toml(
        include_str!("../../demo/geography.toml"),
        Path::new("demo/geography.toml"),
    )
    .expect("demo/geography.toml parses");
    let mut names: Vec<String> = demo
        .regions
        .iter()
        .flat_map(|r| r.fences.iter().cloned())
        .collect();
    names.extend(["Germany", "France", "a", "b"].map(String::from));
    names.sort();
    names.dedup();
    names
}

fn square(name: &str, lon: f64, lat: f64, size: f64) -> Value {
    json!({
        "type": "Feature",
        "properties": {"name": name},
        "geometry": {"type": "Polygon", "coordinates": [[
            [lon, lat], [lon + size, lat], [lon + size, lat + size], [lon, lat + size], [lon, lat]
        ]]},
    })
}

struct ConfigFixture {
    dir: Arc<tempfile::TempDir>,
}

impl ConfigFixture {
    fn new() -> ConfigFixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(dir.path().join(name), bytes).expect("write a fixture");
        };
        let features: Vec<Value> = demo_fence_names()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                square(
                    name,
                    -170.0 + (i % 30) as f64 * 11.0,
                    -80.0 + (i / 30) as f64 * 11.0,
                    5.0,
                )
            })
            .collect();
        let countries = json!({"type": "FeatureCollection", "features": features}).to_string();
        write("countries-110m.geojson", countries.as_bytes());
        write(
            "zones.geojson",
            json!({"type": "FeatureCollection", "features": [
                square("north", 9.0, 53.0, 1.0), square("south", 9.0, 47.0, 1.0)
            ]})
            .to_string()
            .as_bytes(),
        );
        write(
            "bare.geojson",
            json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]})
                .to_string()
                .as_bytes(),
        );
        write(
            "junk.geojson",
            b"{\"type\": \"Point\", \"coordinates\": [0, 0]}",
        );
        write(
            "ops.pub",
            signing::public_key_text(&fixed_key(1).verifying_key()).as_bytes(),
        );
        write(
            "release.pub",
            signing::public_key_text(&fixed_key(2).verifying_key()).as_bytes(),
        );
        write("junk.pub", b"hello\n");
        write("enrich.wasm", b"\0asm\x01\0\0\0");
        ConfigFixture { dir: Arc::new(dir) }
    }

    /// `path` if it names a fixture (by its file name), else a path in the fixture directory
    /// that does not exist.
    fn confine(&self, path: &Path) -> PathBuf {
        match path.file_name().and_then(|n| n.to_str()) {
            Some(name) if CONFIG_FIXTURES.contains(&name) => self.dir.path().join(name),
            _ => self.dir.path().join("absent"),
        }
    }

    fn check(&self, data: &[u8]) -> Result<Outcome, String> {
        let text = String::from_utf8_lossy(data);
        let mut config = match Config::from_toml(&text, Path::new("fuzz.toml")) {
            Ok(config) => config,
            Err(e) => {
                // The parser's message ends with what is wrong, after the quoted line.
                let message = e.to_string();
                let what = message.rsplit(" | ").next().unwrap_or_default();
                return Ok(Outcome::refused(label_text("parse", what)));
            }
        };
        // What `outpost config default` prints and tests compare: a parsed configuration
        // serialises, and parses back to the same serialisation.
        let first = toml::to_string(&config)
            .map_err(|e| format!("a parsed configuration does not serialise: {e}"))?;
        let back = Config::from_toml(&first, Path::new("serialised.toml"))
            .map_err(|e| format!("a serialised configuration does not parse back: {e}\n{first}"))?;
        let second = toml::to_string(&back)
            .map_err(|e| format!("a reparsed configuration does not serialise: {e}"))?;
        if first != second {
            return Err(format!(
                "serialising is not stable:\n{first}\n--- became ---\n{second}"
            ));
        }
        // Validation reads the files the configuration names: only fixtures.
        for module in &mut config.modules {
            if let Some(path) = &mut module.path {
                *path = self.confine(path);
            }
        }
        for key in &mut config.deploy.trusted_keys {
            *key = self.confine(key);
        }
        for fence in &mut config.geofences {
            if let Some(file) = &mut fence.file {
                *file = self.confine(file);
            }
        }
        match outpost::plan::compile(&config) {
            Err(e) => {
                // The key, and the first words of what is wrong with it.
                let message = e.to_string();
                let (key, what) = message.split_once(": ").unwrap_or((&message, ""));
                let what: Vec<&str> = what.split_whitespace().take(4).collect();
                Ok(Outcome::refused(label_text(
                    "invalid",
                    &format!("{key}: {}", what.join(" ")),
                )))
            }
            Ok(validated) => {
                // The rest of `outpost config check`.
                let warnings = validated.geo.warnings(&validated.routes);
                let _ = validated.geo.geography.fences().len();
                Ok(Outcome::accepted(format!(
                    "valid {} route(s) {} warning(s)",
                    validated.routes.routes().len().min(3),
                    warnings.len().min(3)
                )))
            }
        }
    }
}

/// A configuration with a bit of everything: modules, keys, handler routes with limits and
/// conditions, circles, files, regions, devices, MQTT 5 and envelope upstreams.
const RICH_CONFIG: &str = r#"
gateway_id = "gw-7"
data_dir = "/var/lib/outpost"

[broker]
listen = ["127.0.0.1:1883", "[::1]:1883"]
listen_v5 = ["127.0.0.1:1884"]
max_payload_bytes = 65536

[handlers]
deadline_ms = 500
memory_limit_mib = 16
max_concurrent_per_module = 2

[deploy]
trusted_keys = ["keys/ops.pub", "/etc/outpost/release.pub"]
groups = ["trucks", "eu"]

[geography]
gateway_position = [53.54, 9.98]
gps_topic = "gps/fix"
location = { position = "/pos" }
no_location = "dead-letter"
transitions_topic = "outpost/{gateway}/geofence/{device}"

[[geofence]]
file = "zones.geojson"
only = ["north"]

[[geofence]]
file = "bare.geojson"
name = "square"

[[geofence]]
name = "yard"
center = [53.5403, 9.9847]
radius_m = 250.0

[[region]]
name = "home"
fences = ["north", "yard"]

[[device]]
id = "pump-1"
position = [48.85, 2.35]

[[upstream]]
name = "cloud"
url = "mqtt://broker.example:1883"
protocol = "5"
regions = ["home"]
ttl_secs = 3600

[[upstream]]
name = "legacy"
url = "mqtt://10.0.0.1:1883"
envelope = true
regions = ["*"]

[[module]]
name = "enrich"
path = "modules/enrich.wasm"

[[module]]
name = "alerts"

[[route]]
name = "enriched"
filter = "telemetry/+/data"
device_segment = 1
handler = "enrich"
upstream = "cloud"
topic = "out/{gateway}/{device}/{output}"
deadline_ms = 200
memory_limit_mib = 8
max_outputs = 10
max_concurrent = 1
payload = "json"
on_quarantine = "dead-letter"
when = { any = [{ in = "home" }, { within_m = 500.0, of = [52.5, 13.4] }, { not = { field = "/x", exists = true } }] }
location = { lat = "/a/lat", lon = "/a/lon" }

[route.retry]
max_attempts = 5
backoff_ms = 10
backoff_max_ms = 1000

[[route]]
name = "alerts"
filter = "alerts/#"
handler = "alerts"
upstream = "legacy"
ttl_secs = 60
when = { all = [{ field = "/temp", gt = 30 }, { field = "/unit", eq = "C" }, { not_in = ["square"] }] }
"#;

/// The config target: a configuration file, parsed, serialised again and validated as
/// `outpost config check` does (with every file it names confined to fixtures).
pub fn config() -> Target {
    let fixture = ConfigFixture::new();
    let dir = fixture.dir.clone();
    let mut dictionary = words(&[
        "\n",
        "[",
        "]",
        "[[",
        "]]",
        "=",
        "\"",
        "'",
        "\"\"\"",
        "'''",
        "{",
        "}",
        ",",
        ".",
        "#",
        " ",
        "true",
        "false",
        "nan",
        "inf",
        "-inf",
        "1979-05-27T07:32:00Z",
    ]);
    dictionary.extend(words(NUMBERS));
    dictionary.extend(words(&[
        "gateway_id",
        "data_dir",
        "[broker]",
        "listen",
        "listen_v5",
        "max_payload_bytes",
        "[handlers]",
        "deadline_ms",
        "memory_limit_mib",
        "max_batch",
        "[store]",
        "max_db_mib",
        "outbox_policy",
        "\"drop-oldest\"",
        "[deploy]",
        "trusted_keys",
        "groups",
        "fleet_prefix",
        "[[upstream]]",
        "name",
        "url",
        "\"mqtt://h:1\"",
        "protocol",
        "\"5\"",
        "\"3.1.1\"",
        "envelope",
        "regions",
        "\"*\"",
        "[[module]]",
        "path",
        "[[route]]",
        "filter",
        "handler",
        "upstream",
        "topic",
        "\"{device}\"",
        "\"{output}\"",
        "\"{1}\"",
        "device_segment",
        "[route.retry]",
        "max_attempts",
        "when",
        "in",
        "not_in",
        "within_m",
        "of",
        "field",
        "gt",
        "eq",
        "exists",
        "all",
        "any",
        "not",
        "[geography]",
        "location",
        "lat",
        "lon",
        "position",
        "no_location",
        "\"local-only\"",
        "[[geofence]]",
        "file",
        "center",
        "radius_m",
        "only",
        "name_property",
        "[[region]]",
        "fences",
        "[[device]]",
        "id",
        "\"zones.geojson\"",
        "\"ops.pub\"",
        "\"/dev/zero\"",
        "\"127.0.0.1:0\"",
        "\"/lat\"",
    ]));
    Target {
        name: "config",
        max_len: 16 * 1024,
        seeds: vec![
            outpost::config::DEFAULT_CONFIG_TOML.as_bytes().to_vec(),
            include_bytes!("../../demo/geography.toml").to_vec(),
            include_bytes!("../../packaging/debian/outpost.toml").to_vec(),
            RICH_CONFIG.as_bytes().to_vec(),
        ],
        near_misses: vec![
            b"[[geofence]]\nfile = \"/dev/zero\"\n".to_vec(),
            b"[[geofence]]\nfile = \"junk.geojson\"\n[deploy]\ntrusted_keys = [\"junk.pub\"]\n"
                .to_vec(),
        ],
        dictionary,
        json: false,
        check: Box::new(move |data| fixture.check(data)),
        fixture: Some(dir),
    }
}

// ---------------------------------------------------------------------------------------------
// geojson: a geofence file

fn feature_collection(features: Vec<Value>) -> Vec<u8> {
    json!({"type": "FeatureCollection", "features": features})
        .to_string()
        .into_bytes()
}

/// A few real countries (a MultiPolygon with islands, small and large polygons) from the
/// demo's Natural Earth file.
fn some_countries() -> Vec<u8> {
    let all: Value = serde_json::from_str(include_str!("../../demo/countries-110m.geojson"))
        .expect("the demo's countries parse");
    let wanted = ["Luxembourg", "Belgium", "Denmark", "Lesotho"];
    let features: Vec<Value> = all["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter(|f| {
            f["properties"]["name"]
                .as_str()
                .is_some_and(|n| wanted.contains(&n))
        })
        .cloned()
        .collect();
    assert_eq!(
        features.len(),
        wanted.len(),
        "countries missing from the demo file"
    );
    feature_collection(features)
}

fn geojson_seeds() -> Vec<Vec<u8>> {
    let with_hole = json!({
        "type": "Feature",
        "properties": {"name": "ring"},
        "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]],
            [[2, 2], [2, 8], [8, 8], [8, 2], [2, 2]],
        ]},
    });
    let multi = json!({
        "type": "Feature",
        "id": 276,
        "properties": {"name": 7, "other": null},
        "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[20, 20], [21, 20], [21, 21], [20, 21], [20, 20]]],
            [[[-179.5, -10], [179.5, -10], [179.5, 10], [-179.5, 10], [-179.5, -10]]],
        ]},
        "bbox": [20, 20, 21, 21],
    });
    vec![
        feature_collection(vec![
            square("a", 0.0, 0.0, 1.0),
            square("b", 0.5, 0.5, 1.0),
            with_hole.clone(),
        ]),
        with_hole.to_string().into_bytes(),
        feature_collection(vec![multi.clone(), square("a", -1.0, -1.0, 0.5)]),
        json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0.5, 1], [0, 0]]]})
            .to_string()
            .into_bytes(),
        json!({"type": "MultiPolygon", "coordinates": [[[[0, 80], [1, 80], [1, 90], [0, 80]]]]})
            .to_string()
            .into_bytes(),
        serde_json::to_vec_pretty(&multi).expect("json"),
        some_countries(),
    ]
}

/// The option sets the configuration can give: named by `name` (with a name for a bare
/// geometry), by `id`, and a selection.
fn geojson_options() -> [GeoJsonOptions; 3] {
    [
        GeoJsonOptions {
            geometry_name: Some("bare".into()),
            ..GeoJsonOptions::default()
        },
        GeoJsonOptions::named_by("id"),
        GeoJsonOptions {
            only: Some(vec!["a".into(), "7".into()]),
            geometry_name: Some("a".into()),
            ..GeoJsonOptions::default()
        },
    ]
}

/// The geojson target: a geofence file loaded as the configuration loads it, with each of its
/// option sets.
pub fn geojson() -> Target {
    Target {
        name: "geojson",
        max_len: 32 * 1024,
        seeds: geojson_seeds(),
        near_misses: vec![
            br#"{"type":"Point","coordinates":[0,0]}"#.to_vec(),
            br#"{"type":"FeatureCollection","features":[]}"#.to_vec(),
            br#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0.5]]]}"#.to_vec(),
        ],
        dictionary: json_dictionary(&[
            "type",
            "Feature",
            "FeatureCollection",
            "Polygon",
            "MultiPolygon",
            "Point",
            "LineString",
            "GeometryCollection",
            "geometries",
            "features",
            "geometry",
            "coordinates",
            "properties",
            "name",
            "id",
            "bbox",
        ]),
        json: true,
        check: Box::new(check_geojson),
        fixture: None,
    }
}

/// Loading never panics; what loads builds; fences are as many as reported, named, unique and
/// sorted; and the index finds, at probe points on and around every polygon, exactly the
/// fences whose `contains` is true (for valid polygons, which is all the index promises).
pub fn check_geojson(data: &[u8]) -> Result<Outcome, String> {
    let mut accepted = false;
    let mut labels = Vec::new();
    for options in geojson_options() {
        let mut builder = Geography::builder();
        let added = match builder.add_geojson(data, &options) {
            Err(e) => {
                labels.push(label("refused", &e));
                continue;
            }
            Ok(n) => n,
        };
        accepted = true;
        let geography = builder
            .build()
            .map_err(|e| format!("a document that loads does not build: {e}"))?;
        let fences = geography.fences();
        if fences.len() != added {
            return Err(format!(
                "add_geojson said {added} fences, the geography has {}",
                fences.len()
            ));
        }
        let names: Vec<&str> = fences.iter().map(|f| f.name()).collect();
        if names.iter().any(|n| n.is_empty()) {
            return Err("a fence without a name".into());
        }
        if names.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("fence names not sorted and unique: {names:?}"));
        }
        labels.push(format!("loaded {}", added.min(3)));
        locate_matches_contains(&geography)?;
    }
    let label = labels.join(" | ");
    Ok(if accepted {
        Outcome::accepted(label)
    } else {
        Outcome::refused(label)
    })
}

fn locate_matches_contains(geography: &Geography) -> Result<(), String> {
    use geo::{BoundingRect, Validation};
    let mut probes = vec![(0.0, 0.0), (45.0, 90.0), (-89.9, -179.9), (90.0, 180.0)];
    let mut all_valid = true;
    for fence in geography.fences() {
        let Shape::Area(area) = fence.shape() else {
            continue;
        };
        all_valid &= area.is_valid();
        if let Some(rect) = area.bounding_rect() {
            let c = rect.center();
            probes.push((c.y, c.x));
        }
        for polygon in area.iter().take(8) {
            let ring = polygon.exterior();
            for w in ring.0.windows(2).take(16) {
                probes.push((w[0].y, w[0].x));
                probes.push(((w[0].y + w[1].y) / 2.0, (w[0].x + w[1].x) / 2.0));
                probes.push((w[0].y + 1e-9, w[0].x + 1e-9));
            }
        }
    }
    if !all_valid {
        // Crossing rings: the index and `contains` may disagree by design; still, neither
        // may panic.
        for (lat, lon) in probes.iter().take(64) {
            if let Ok(at) = Location::new(*lat, *lon) {
                let _ = geography.locate(at);
            }
        }
        return Ok(());
    }
    for (lat, lon) in probes.into_iter().take(256) {
        let Ok(at) = Location::new(lat, lon) else {
            continue;
        };
        let found: Vec<String> = geography
            .locate(at)
            .fences
            .iter()
            .map(|f| f.to_string())
            .collect();
        let expected: Vec<String> = geography
            .fences()
            .iter()
            .filter(|f| f.contains(at))
            .map(|f| f.name().to_string())
            .collect();
        if found != expected {
            return Err(format!(
                "locate({lat}, {lon}) found {found:?}, Fence::contains says {expected:?}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// signing: the signed-module envelope, signed commands, key files

/// A key from a fixed seed, so that inputs found by a run reproduce in a regression test.
pub fn fixed_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// What the fuzzed inputs are signed with: any input that verifies under these keys must be
/// one of the modules or commands the corpus signed.
struct Signed {
    trusted: Vec<VerifyingKey>,
    modules: Vec<SignedModule>,
    commands: Vec<SignedCommand>,
}

fn signed() -> Signed {
    let ops = fixed_key(1);
    let release = fixed_key(2);
    let modules = vec![
        SignedModule::sign(
            &ops,
            "enrich",
            "1.0.0",
            1_700_000_000_000,
            b"\0asm\x01\0\0\0".to_vec(),
        ),
        SignedModule::sign(
            &ops,
            "celsius",
            "2.1.0-rc.1",
            1,
            b"line\nbreak\n{\"x\":1}\n".to_vec(),
        ),
        SignedModule::sign(&release, "a", "0", u64::MAX, Vec::new()),
        SignedModule::sign(&release, "Z_9.z-", "v.2_", 42, (0..=255u8).collect()),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .expect("valid names");
    let commands = vec![
        SignedCommand::sign(&ops, CommandOp::Remove, "enrich", 1_700_000_000_000),
        SignedCommand::sign(&ops, CommandOp::Rollback, "celsius", 0),
        SignedCommand::sign(&release, CommandOp::Rollback, "a", u64::MAX),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .expect("valid names");
    Signed {
        trusted: vec![ops.verifying_key(), release.verifying_key()],
        modules,
        commands,
    }
}

/// The envelope target: a deploy's payload, parsed (with and without a size limit) and
/// verified as the registry does.
pub fn envelope() -> Target {
    let signed = signed();
    let seeds: Vec<Vec<u8>> = signed.modules.iter().map(SignedModule::to_bytes).collect();
    let mut old = signing::OLD_ENVELOPE_MAGIC.to_vec();
    old.extend_from_slice(&seeds[0][signing::ENVELOPE_MAGIC.len()..]);
    let mut truncated = seeds[1].clone();
    truncated.pop();
    let mut dictionary = json_dictionary(&[
        "name",
        "version",
        "sha256",
        "issued_ms",
        "size",
        "key_id",
        "signature",
    ]);
    dictionary.push(signing::ENVELOPE_MAGIC.to_vec());
    dictionary.push(signing::OLD_ENVELOPE_MAGIC.to_vec());
    dictionary.push(b"0123456789abcdef".to_vec());
    dictionary.push(b"0123456789ABCDEF".to_vec());
    Target {
        name: "envelope",
        max_len: 12 * 1024,
        seeds,
        near_misses: vec![old, truncated],
        dictionary,
        json: false,
        check: Box::new(move |data| check_envelope(&signed, data)),
        fixture: None,
    }
}

fn check_envelope(signed: &Signed, data: &[u8]) -> Result<Outcome, String> {
    let parsed = SignedModule::from_bytes(data);
    for limit in [0, 64, signing::DEFAULT_MAX_MODULE_BYTES] {
        let limited = SignedModule::from_bytes_limited(data, limit);
        match (&parsed, &limited) {
            (Ok(m), Ok(l)) if m == l && m.wasm().len() as u64 <= limit => {}
            (Ok(m), Err(signing::EnvelopeError::TooLarge { size, max }))
                if *size == m.wasm().len() as u64 && *max == limit && *size > limit => {}
            (Err(_), Err(_)) => {}
            (a, b) => {
                return Err(format!(
                    "from_bytes and from_bytes_limited({limit}) disagree: {a:?} / {b:?}"
                ))
            }
        }
    }
    let module = match parsed {
        Err(e) => return Ok(Outcome::refused(label("refused", &e))),
        Ok(m) => m,
    };
    let bytes = module.to_bytes();
    let back = SignedModule::from_bytes(&bytes)
        .map_err(|e| format!("a parsed envelope, serialised, does not parse back: {e}"))?;
    if back != module {
        return Err("a parsed envelope does not survive serialising".into());
    }
    let _ = module.expect_identity("enrich", Some("1.0.0"));
    match module.verify_against(&signed.trusted) {
        Ok(key_id) => {
            // What verifies is what was signed.
            let original = signed.modules.iter().find(|m| {
                m.manifest() == module.manifest()
                    && m.wasm() == module.wasm()
                    && m.key_id() == key_id
            });
            if original.is_none() {
                return Err(format!(
                    "an envelope nobody signed verifies: {:?}",
                    module.manifest()
                ));
            }
            Ok(Outcome::accepted("verified"))
        }
        Err(e) => Ok(Outcome::accepted(label("parsed", &e))),
    }
}

/// The command target: a signed `remove` or `rollback`, parsed and accepted as the registry
/// does.
pub fn command() -> Target {
    let signed = signed();
    let seeds = signed.commands.iter().map(SignedCommand::to_json).collect();
    let mut dictionary = json_dictionary(&[
        "op",
        "name",
        "issued_ms",
        "key",
        "signature",
        "remove",
        "rollback",
        "deploy",
    ]);
    dictionary.push(b"0123456789abcdef".to_vec());
    Target {
        name: "command",
        max_len: signing::MAX_COMMAND_BYTES + 64,
        seeds,
        near_misses: vec![
            br#"{"op":"deploy","name":"x","issued_ms":1,"key":"","signature":""}"#.to_vec(),
        ],
        dictionary,
        json: true,
        check: Box::new(move |data| check_command(&signed, data)),
        fixture: None,
    }
}

fn check_command(signed: &Signed, data: &[u8]) -> Result<Outcome, String> {
    let command = match SignedCommand::from_json(data) {
        Err(e) => return Ok(Outcome::refused(label("refused", &e))),
        Ok(c) => c,
    };
    let back = SignedCommand::from_json(&command.to_json())
        .map_err(|e| format!("a parsed command, serialised, does not parse back: {e}"))?;
    if back != command {
        return Err("a parsed command does not survive serialising".into());
    }
    let verified = command.verify_against(&signed.trusted);
    // On its own topic, fresh and on time, accepting is verifying.
    let accepted = command.accept(
        &signed.trusted,
        command.op,
        &command.name,
        None,
        command.issued_ms,
    );
    if verified.is_ok() != accepted.is_ok() {
        return Err(format!(
            "verify_against says {verified:?}, accept on its own topic says {accepted:?}"
        ));
    }
    for op in CommandOp::ALL {
        let _ = command.accept(&signed.trusted, op, "enrich", Some(command.issued_ms), 0);
    }
    match verified {
        Ok(_) => {
            if !signed.commands.contains(&command) {
                return Err(format!("a command nobody signed verifies: {command:?}"));
            }
            Ok(Outcome::accepted("verified"))
        }
        Err(e) => Ok(Outcome::accepted(label("parsed", &e))),
    }
}

/// The keys target: the text of a key file (public or secret) and a key id.
pub fn keys() -> Target {
    let ops = fixed_key(1);
    let seeds = vec![
        signing::public_key_text(&ops.verifying_key()).into_bytes(),
        signing::secret_key_text(&fixed_key(2)).as_bytes().to_vec(),
        format!(
            "  {}\t{}  \n",
            signing::PUBLIC_KEY_TAG,
            signing::to_hex(fixed_key(3).verifying_key().as_bytes()).to_uppercase()
        )
        .into_bytes(),
        KeyId::of(&ops.verifying_key()).to_string().into_bytes(),
    ];
    let dictionary = words(&[
        signing::PUBLIC_KEY_TAG,
        signing::SECRET_KEY_TAG,
        " ",
        "\t",
        "\n",
        "\r\n",
        "0123456789abcdef",
        "ABCDEF",
        "é",
        "\u{0660}",
    ]);
    Target {
        name: "keys",
        max_len: 512,
        seeds,
        near_misses: vec![
            // Not a point on the curve; and a weak key (the identity).
            format!("{} {}", signing::PUBLIC_KEY_TAG, "ab".repeat(32)).into_bytes(),
            format!("{} 01{}", signing::PUBLIC_KEY_TAG, "00".repeat(31)).into_bytes(),
        ],
        dictionary,
        json: false,
        check: Box::new(check_keys),
        fixture: None,
    }
}

/// Key texts parse back to the same key after writing them out; so do key ids.
pub fn check_keys(data: &[u8]) -> Result<Outcome, String> {
    let text = String::from_utf8_lossy(data);
    let mut labels = Vec::new();
    let mut accepted = false;
    match signing::parse_public_key(&text) {
        Ok(key) => {
            accepted = true;
            let back = signing::parse_public_key(&signing::public_key_text(&key))
                .map_err(|e| format!("a public key, written out, does not parse back: {e}"))?;
            if back != key {
                return Err("a public key does not survive writing".into());
            }
            labels.push("public".to_string());
        }
        Err(e) => labels.push(label("public", &e)),
    }
    match signing::parse_secret_key(&text) {
        Ok(key) => {
            accepted = true;
            let back = signing::parse_secret_key(&signing::secret_key_text(&key))
                .map_err(|e| format!("a secret key, written out, does not parse back: {e}"))?;
            if back.to_bytes() != key.to_bytes() {
                return Err("a secret key does not survive writing".into());
            }
            labels.push("secret".to_string());
        }
        Err(e) => labels.push(label("secret", &e)),
    }
    match KeyId::from_str(&text) {
        Ok(id) => {
            accepted = true;
            if KeyId::from_str(&id.to_string()) != Ok(id) {
                return Err("a key id does not survive writing".into());
            }
            labels.push("key id".to_string());
        }
        Err(e) => labels.push(label("key id", &e)),
    }
    let label = labels.join(" ");
    Ok(if accepted {
        Outcome::accepted(label)
    } else {
        Outcome::refused(label)
    })
}

// ---------------------------------------------------------------------------------------------
// control: dead-letter requests (the gateway's side) and replies (the CLI's side)

const GATEWAY: &str = "gw-1";

/// The control_request target: a request payload as the control plane reads it, on the topic
/// of every verb and of an unknown one.
pub fn control_request() -> Target {
    let seeds = [
        r#"{}"#,
        r#"{"reply_to":"outpost/gw-1/replies/0123456789abcdef","limit":10}"#,
        r#"{"id":42}"#,
        r#"{"reason":"trap","route":"enrich","limit":1000}"#,
        r#"{"all":true,"reply_to":"me/replies"}"#,
        r#"{"route":"r","reason":"expired","id":-1,"reply_to":"a"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut dictionary = json_dictionary(&[
        "reply_to",
        "id",
        "reason",
        "route",
        "limit",
        "all",
        "outpost/gw-1/deadletters/",
        "list",
        "show",
        "replay",
        "purge",
        "result",
        "+",
        "#",
    ]);
    dictionary.push(b"\\u0000".to_vec());
    Target {
        name: "control_request",
        max_len: 4096,
        seeds,
        near_misses: vec![
            br#"{"reply_to":"outpost/gw-1/deadletters/list","all":true,"id":1}"#.to_vec(),
            br#"{"limit":0,"colour":"red"}"#.to_vec(),
        ],
        dictionary,
        json: true,
        check: Box::new(check_control_request),
        fixture: None,
    }
}

/// For every verb: the reply goes to the default topic or to a valid reply topic (never a
/// request topic, never a filter); an accepted request is valid for its verb, changes
/// (replay, purge) only with a filter or `all`, and survives serialising.
pub fn check_control_request(data: &[u8]) -> Result<Outcome, String> {
    let request_topics: HashSet<String> = Verb::ALL
        .iter()
        .map(|v| control::request_topic(GATEWAY, *v))
        .collect();
    let mut labels = Vec::new();
    let mut accepted = false;
    for name in ["list", "show", "replay", "purge", "bogus"] {
        let incoming = control::read_request(GATEWAY, name, data);
        let reply_to = &incoming.reply_to;
        if *reply_to != control::default_reply_topic(GATEWAY)
            && (reply_to.is_empty()
                || reply_to.contains(['+', '#', '\0'])
                || request_topics.contains(reply_to))
        {
            return Err(format!("a reply would go to {reply_to:?}"));
        }
        let (verb, request) = match incoming.request {
            Err(e) => {
                labels.push(label_text(name, &e));
                continue;
            }
            Ok(r) => r,
        };
        accepted = true;
        if verb.as_str() != name {
            return Err(format!("a request on {name:?} read as {verb:?}"));
        }
        request
            .validate(verb, GATEWAY)
            .map_err(|e| format!("an accepted request is not valid: {e}"))?;
        if request.reply_to.as_ref().is_some_and(|t| t != reply_to) {
            return Err(format!(
                "an accepted request asks for replies on {:?}, they go to {reply_to:?}",
                request.reply_to
            ));
        }
        let filtered = request.id.is_some() || request.reason.is_some() || request.route.is_some();
        if matches!(verb, Verb::Replay | Verb::Purge) && !filtered && !request.all {
            return Err(format!("{name} of everything without \"all\": true"));
        }
        if matches!(verb, Verb::List | Verb::Show)
            && request
                .limit
                .is_some_and(|l| !(1..=control::MAX_LIMIT).contains(&l))
        {
            return Err(format!("limit {:?} accepted", request.limit));
        }
        let json = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let again = control::read_request(GATEWAY, name, &json);
        if again.request != Ok((verb, request.clone())) {
            return Err(format!(
                "an accepted request does not survive serialising: {request:?} became {:?}",
                again.request
            ));
        }
        let back: Request = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
        if back != request {
            return Err("a request does not survive serde".into());
        }
        labels.push(format!("{name} ok"));
    }
    let label = labels.join(" ");
    Ok(if accepted {
        Outcome::accepted(label)
    } else {
        Outcome::refused(label)
    })
}

/// The control_reply target: what `outpost deadletters` does with a reply from the broker
/// (anyone may publish on its reply topic).
pub fn control_reply() -> Target {
    let letter = json!({
        "id": 3, "created_ms": 1_700_000_000_000u64, "stage": "event", "reason": "trap",
        "detail": "wasm trap: unreachable\n  at enrich", "route": "enrich", "module": "enrich",
        "module_version": "1.0.0", "link": "cloud", "msg_id": "gw-1-3-enrich-0", "attempts": 3,
        "topic": "telemetry/dev-1", "device": "dev-1", "client_id": "dev-1", "event_id": 3,
        "payload_bytes": 7, "payload": "{\"t\":1}\nline two",
    });
    let mut binary = letter.clone();
    binary["payload"] = Value::Null;
    binary["payload_base64"] = json!("AAEC/w==");
    binary["created_ms"] = json!(u64::MAX);
    binary["attempts"] = json!("x");
    let seeds = [
        json!({"ok": true, "dead_letters": [letter, binary], "truncated": true}),
        json!({"ok": true, "dead_letters": [], "truncated": false}),
        json!({"ok": true, "replayed": 12}),
        json!({"ok": true, "purged": 0}),
        json!({"ok": false, "error": "replay needs a filter"}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect();
    Target {
        name: "control_reply",
        max_len: 16 * 1024,
        seeds,
        near_misses: vec![b"{\"ok\": tru".to_vec()],
        dictionary: json_dictionary(&[
            "ok",
            "error",
            "dead_letters",
            "truncated",
            "replayed",
            "purged",
            "id",
            "created_ms",
            "payload",
            "payload_base64",
            "payload_bytes",
            "detail",
            "attempts",
        ]),
        json: true,
        check: Box::new(check_control_reply),
        fixture: None,
    }
}

/// Rendering any JSON reply never panics, at any clock.
pub fn check_control_reply(data: &[u8]) -> Result<Outcome, String> {
    let Ok(reply) = serde_json::from_slice::<Value>(data) else {
        return Ok(Outcome::refused("not json"));
    };
    let error = client::reply_error(&reply);
    for verb in Verb::ALL {
        for now in [0, 1_700_000_000_000, u64::MAX] {
            let _ = client::render(verb, &reply, now);
        }
    }
    // The shape of the reply: its kind, how many letters, and which known fields the first
    // letter has with what JSON type.
    let letters = reply.get("dead_letters").and_then(Value::as_array);
    let first = letters
        .and_then(|l| l.first())
        .and_then(Value::as_object)
        .map(|letter| {
            [
                "id",
                "created_ms",
                "payload",
                "payload_base64",
                "detail",
                "attempts",
            ]
            .iter()
            .map(|k| if letter.contains_key(*k) { "+" } else { "-" })
            .collect::<Vec<_>>()
            .join(",")
        })
        .unwrap_or_default();
    Ok(Outcome::accepted(format!(
        "{} {} {} [{first}]",
        if error.is_some() { "error" } else { "ok" },
        type_of(&reply),
        letters.map_or(0, Vec::len).min(3),
    )))
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "u64",
        Value::Number(n) if n.is_i64() => "i64",
        Value::Number(_) => "f64",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

// ---------------------------------------------------------------------------------------------
// uplink_packets: what an upstream broker sends the uplink (outpost::uplink::client::decode).

/// Largest packet the target's decoder accepts (small, so that inputs reach the limit).
const UPLINK_MAX_PACKET: usize = 1024;

/// An uplink input: the first byte chooses the protocol (bit 0: 0 = 3.1.1, 1 = 5) and the size
/// of the chunks the stream arrives in (bits 1..7, plus one: 1 to 128 bytes); the rest is what
/// the upstream sends.
fn uplink_input(v5: bool, chunk: u8, packets: &[Vec<u8>]) -> Vec<u8> {
    let mut input = vec![((chunk.clamp(1, 128) - 1) << 1) | u8::from(v5)];
    for p in packets {
        input.extend_from_slice(p);
    }
    input
}

fn uplink_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let publish_v4 = encode_v4_publish(
        "outpost/gw-1/control/modules",
        1,
        7,
        false,
        b"{\"op\":\"list\"}",
    );
    let publish_v4_q0 = encode_v4_publish("a/b", 0, 0, true, b"x");
    let properties = PublishProperties {
        message_expiry_interval: Some(60),
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("application/json".into()),
        ..PublishProperties::default()
    };
    let publish_v5 = encode_v5_publish("outpost/gw-1/x", 1, 9, false, b"{}", Some(properties));
    let publish_v5_q2 = encode_v5_publish("t", 2, 3, false, b"", None);
    let v4 = [
        vec![0x20, 2, 0, 0],          // CONNACK accepted
        vec![0x40, 2, 0, 1],          // PUBACK 1
        vec![0x90, 3, 0, 2, 0x01],    // SUBACK granted QoS 1
        vec![0x90, 4, 0, 3, 0x80, 0], // SUBACK, one refused
        vec![0xd0, 0],                // PINGRESP
        vec![0xe0, 0],                // DISCONNECT
    ];
    let v5 = [
        vec![0x20, 3, 0, 0, 0],                           // CONNACK, no properties
        vec![0x20, 9, 0, 0, 6, 0x21, 0, 10, 0x13, 0, 30], // Receive Maximum 10, Server Keep Alive 30
        vec![0x40, 2, 0, 1],                              // PUBACK, success
        vec![0x40, 4, 0, 2, 0x10, 0],                     // PUBACK, no matching subscribers
        vec![0x40, 4, 0, 3, 0x87, 0],                     // PUBACK, not authorised
        vec![0x90, 4, 0, 4, 0, 0x01],                     // SUBACK granted QoS 1
        vec![0xd0, 0],                                    // PINGRESP
        vec![0xe0, 0],                                    // DISCONNECT, normal
        vec![0xe0, 2, 0x8e, 0],                           // DISCONNECT, session taken over
    ];
    let mut seeds = Vec::new();
    for chunk in [1, 3, 128] {
        let mut stream = v4.to_vec();
        stream.push(publish_v4.clone());
        stream.push(publish_v4_q0.clone());
        seeds.push(uplink_input(false, chunk, &stream));
        let mut stream = v5.to_vec();
        stream.push(publish_v5.clone());
        stream.push(publish_v5_q2.clone());
        seeds.push(uplink_input(true, chunk, &stream));
    }
    seeds.push(uplink_input(false, 128, &[vec![0x20, 2, 0, 5]])); // CONNACK not authorised
    seeds.push(uplink_input(true, 128, &[vec![0x20, 3, 0, 0x86, 0]])); // bad user name or password
    let near_misses = vec![
        uplink_input(false, 128, &[vec![0x20, 3, 0, 0, 0]]), // v4 CONNACK of the wrong length
        uplink_input(false, 128, &[vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]]), // bad length
        uplink_input(
            false,
            128,
            &[encode_v4_publish("a", 0, 0, false, &[0; 2000])],
        ), // too large
        uplink_input(true, 128, &[vec![0x20, 3, 0, 0, 9]]),  // properties longer than the packet
    ];
    (seeds, near_misses)
}

/// The target: the uplink's packet decoder on arbitrary upstream bytes, both protocols.
pub fn uplink_packets() -> Target {
    let (seeds, near_misses) = uplink_seeds();
    let dictionary = vec![
        vec![0x20, 2, 0, 0],
        vec![0x20, 3, 0, 0, 0],
        vec![0x40, 2],
        vec![0x90],
        vec![0xd0, 0],
        vec![0xe0, 0],
        vec![0x30],
        vec![0x32],
        vec![0x34],
        vec![0xff, 0xff, 0xff, 0x7f],
        vec![0x80, 0x80, 0x80, 0x80, 0x01],
        vec![0x21, 0, 0],       // Receive Maximum 0
        vec![0x27, 0, 0, 0, 0], // Maximum Packet Size 0
        vec![0x1f, 0, 1, b'x'], // Reason String
        vec![0x26, 0, 1, b'k', 0, 1, b'v'],
        vec![0x23, 0, 1],       // Topic Alias
        vec![0x0b, 0x80, 0x01], // Subscription Identifier
        b"outpost/gw-1/control/modules".to_vec(),
    ];
    Target {
        name: "uplink_packets",
        max_len: 4 * 1024,
        seeds,
        near_misses,
        dictionary,
        json: false,
        check: Box::new(check_uplink_packets),
        fixture: None,
    }
}

/// What one stream decodes to: the packets, then how it stopped (`None`: wants more bytes).
type UplinkDecoding = (Vec<outpost::uplink::client::Incoming>, Option<String>);

/// Decodes `stream` arriving in chunks of `chunk` bytes, the way the uplink's reader does: each
/// chunk is appended, then packets are taken off until one is incomplete or malformed (which
/// ends the connection). Checks on the way that decoding consumes nothing when it needs more
/// bytes, consumes a whole packet (and no more than the limit allows) when it decodes one, and
/// that a decoded packet respects the limit.
fn decode_uplink_stream(
    stream: &[u8],
    protocol: outpost::config::MqttVersion,
    chunk: usize,
) -> Result<UplinkDecoding, String> {
    use outpost::uplink::client::{decode, Incoming};
    let mut buffer = BytesMut::new();
    let mut packets = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            let before = buffer.len();
            match decode(&mut buffer, protocol, UPLINK_MAX_PACKET) {
                Ok(None) => {
                    if buffer.len() != before {
                        return Err(format!(
                            "wanting more bytes, the decoder consumed {} of {before}",
                            before - buffer.len()
                        ));
                    }
                    break;
                }
                Ok(Some(packet)) => {
                    let used = before - buffer.len();
                    // A fixed header is 2 to 5 bytes; the body at most the limit.
                    if !(2..=UPLINK_MAX_PACKET + 5).contains(&used) {
                        return Err(format!("a {packet:?} used {used} bytes"));
                    }
                    if let Incoming::Publish {
                        payload,
                        qos,
                        topic,
                        ..
                    } = &packet
                    {
                        if payload.len() > UPLINK_MAX_PACKET || topic.len() > UPLINK_MAX_PACKET {
                            return Err(format!("a publish over the limit: {used} bytes"));
                        }
                        if *qos > 2 {
                            return Err(format!("a publish with QoS {qos}"));
                        }
                    }
                    packets.push(packet);
                }
                Err(reason) => {
                    if reason.is_empty() {
                        return Err("an error without a reason".into());
                    }
                    return Ok((packets, Some(reason)));
                }
            }
        }
    }
    Ok((packets, None))
}

pub fn check_uplink_packets(data: &[u8]) -> Result<Outcome, String> {
    use outpost::config::MqttVersion;
    let Some((&head, stream)) = data.split_first() else {
        return Ok(Outcome::refused("empty"));
    };
    let protocol = if head & 1 == 1 {
        MqttVersion::V5
    } else {
        MqttVersion::V311
    };
    let chunk = usize::from(head >> 1) + 1;
    let whole = decode_uplink_stream(stream, protocol, stream.len())?;
    let pieces = decode_uplink_stream(stream, protocol, chunk)?;
    // TCP cuts a stream anywhere: how it arrives must not change what it means.
    if whole != pieces {
        return Err(format!(
            "in one piece the stream decodes to {whole:?}, in pieces of {chunk} to {pieces:?}"
        ));
    }
    let (packets, error) = whole;
    let kinds: Vec<&str> = packets.iter().take(4).map(|p| p.kind()).collect();
    let version = if head & 1 == 1 { "v5" } else { "v4" };
    let label = match &error {
        None => format!("{version} {} ok", kinds.join(",")),
        Some(reason) => label_text(&format!("{version} {} error", kinds.join(",")), reason),
    };
    Ok(if error.is_none() && !packets.is_empty() {
        Outcome::accepted(label)
    } else {
        Outcome::refused(label)
    })
}
