//! The JSON envelope that carries an output's message id to MQTT 3.1.1 upstreams, which have
//! no user properties: `{"id": <msg id>, "topic": <topic>, "payload": <the payload>}` when the
//! payload is one JSON value (embedded verbatim, byte for byte), else
//! `{"id": .., "topic": .., "payload_base64": <standard base64 with padding>}`.
//!
//! Pure: no I/O. The envelope always parses as JSON wherever the payload did.

use crate::store::OutboxRow;

/// The JSON envelope for MQTT 3.1.1 upstreams: `{"id":..,"topic":..,"payload":..}` with the
/// payload embedded verbatim when it is JSON, else `"payload_base64"`.
pub(crate) fn envelope_payload(row: &OutboxRow) -> Vec<u8> {
    let mut out =
        String::with_capacity(row.msg_id.len() + row.topic.len() + row.payload.len() * 4 / 3 + 64);
    out.push_str("{\"id\":");
    out.push_str(&json_string(&row.msg_id));
    out.push_str(",\"topic\":");
    out.push_str(&json_string(&row.topic));
    match json_text(&row.payload) {
        Some(text) => {
            out.push_str(",\"payload\":");
            out.push_str(text);
        }
        None => {
            out.push_str(",\"payload_base64\":\"");
            out.push_str(&base64(&row.payload));
            out.push('"');
        }
    }
    out.push('}');
    out.into_bytes()
}

/// The payload as text when it is one complete JSON value (what `serde_json` parses, so the
/// envelope parses wherever the payload did).
fn json_text(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload).ok()?;
    serde_json::from_str::<serde_json::Value>(text).ok()?;
    Some(text)
}

/// `s` as a quoted, escaped JSON string.
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Standard base64 (RFC 4648 section 4, with padding).
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(payload: &[u8]) -> OutboxRow {
        OutboxRow {
            id: 7,
            msg_id: "gw-1-7-telemetry".to_string(),
            topic: "telemetry/dev \"1\"/env".to_string(),
            payload: payload.to_vec(),
            expires_ms: 0,
            regions: String::new(),
        }
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors: [(&[u8], &str); 7] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input), expected);
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64(&[0x00, 0x10, 0x83]), "ABCD");
    }

    #[test]
    fn envelope_embeds_json_payload_verbatim() {
        let payload = br#"{"seq": 1, "big": 123456789012345678901234, "x": 1.50}"#;
        let bytes = envelope_payload(&row(payload));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.ends_with(&format!(
            ",\"payload\":{}}}",
            std::str::from_utf8(payload).unwrap()
        )));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["id"], "gw-1-7-telemetry");
        assert_eq!(value["topic"], "telemetry/dev \"1\"/env");
        assert_eq!(value["payload"]["seq"], 1);
        assert!(value.get("payload_base64").is_none());
    }

    #[test]
    fn envelope_falls_back_to_base64_for_anything_but_one_json_value() {
        let cases: [&[u8]; 6] = [
            b"",
            b"not json",
            b"{\"a\":1} {\"b\":2}",
            &[0xff, 0x00, 0x7b, 0x7d],
            b"\"\\ud800\"",
            b"{\"a\":",
        ];
        for payload in cases {
            let value: serde_json::Value =
                serde_json::from_slice(&envelope_payload(&row(payload))).unwrap();
            assert_eq!(value["payload_base64"], base64(payload), "{payload:?}");
            assert!(value.get("payload").is_none());
        }
    }

    #[test]
    fn json_scalars_are_payloads_too() {
        for payload in ["42", "\"text\"", "null", " [1, 2] \n"] {
            let value: serde_json::Value =
                serde_json::from_slice(&envelope_payload(&row(payload.as_bytes()))).unwrap();
            assert_eq!(
                value["payload"],
                serde_json::from_str::<serde_json::Value>(payload).unwrap()
            );
        }
    }
}
