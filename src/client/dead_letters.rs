//! The operator's side of the dead-letter control topics ([`crate::control::dead_letters`]):
//! what `outpost deadletters list|show|replay|purge` sends to a gateway, which reply it
//! believes, and how it prints it.
//!
//! Guarantees:
//! - [`request`] publishes exactly one request, after the broker confirmed the subscription to
//!   its reply topic (so a prompt reply is never missed), and returns only a reply that
//!   [`answers`] it: from the gateway asked, carrying the request's unguessable nonce. Anything
//!   else on the reply topic is ignored with a warning on standard error.
//! - It returns within its timeout (connecting included), with a clear error when the options
//!   cannot be used, the broker cannot be reached or refuses, or no reply came.
//! - [`render`] and [`reply_error`] take any JSON value (a reply may come from anyone who can
//!   publish on the reply topic) and never panic.
//!
//! It does not check what the gateway did (a reply is taken at its word), retry a request that
//! got no reply, or keep a connection between commands. The request, the verbs and the topics
//! are the control plane's ([`Request`], [`Verb`], [`request_topic`]): one contract for both
//! sides.

use std::time::Duration;

use rand::RngExt;
use serde_json::Value;

use crate::client::exchange as operator;
use crate::config::{parse_broker_url, Endpoint};
use crate::control::dead_letters::{request_topic, Request, Verb};

/// The largest reply the client accepts: MQTT's own packet size limit.
const MAX_INCOMING_PACKET: usize = 268_435_455 + 5;

/// Sends one request to gateway `gateway_id` through the broker of `broker`
/// (`mqtt://HOST[:PORT]`, or `mqtts://HOST[:PORT]` with its TLS files) and returns its reply,
/// whatever its `ok`.
///
/// It connects ([`operator`]: TCP or TLS, with the endpoint's login) with a fresh
/// client id, subscribes to a reply topic of its own (`outpost/<gateway_id>/replies/<random>`),
/// waits for the SUBACK, publishes the request with QoS 1, `reply_to` set to that topic and an
/// unguessable `nonce`, and waits for the reply that [`answers`] it (anything else on the reply
/// topic is ignored, with a warning). Fails with a clear message when the options cannot be
/// used, the broker cannot be reached or refuses the login or the subscription, or no reply
/// arrives within `timeout` (connecting included).
pub async fn request(
    broker: impl Into<Endpoint<'_>>,
    gateway_id: &str,
    verb: Verb,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let broker = broker.into();
    let address = parse_broker_url(broker.url).map_err(anyhow::Error::msg)?;
    if gateway_id.is_empty()
        || !gateway_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        anyhow::bail!(
            "gateway id {gateway_id:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
        );
    }
    let token = format!("{:016x}", rand::rng().random::<u64>());
    let reply_topic = format!("outpost/{gateway_id}/replies/{token}");
    // Unguessable, and seen only by the gateway (and whoever may read its request topics):
    // a reply that does not carry it was not made for this request.
    let nonce = format!("{:032x}", rand::rng().random::<u128>());
    let mut body = request.clone();
    body.reply_to = Some(reply_topic.clone());
    body.nonce = Some(nonce.clone());
    let body = serde_json::to_vec(&body)?;

    let deadline = tokio::time::Instant::now() + timeout;
    let mut session = operator::connect(broker, MAX_INCOMING_PACKET, timeout).await?;
    let exchange = async {
        session
            .subscribe(std::slice::from_ref(&reply_topic))
            .await?;
        session
            .publish(request_topic(gateway_id, verb), body, false)
            .await?;
        loop {
            let operator::Event::Message { topic, payload } = session.next().await? else {
                continue;
            };
            if topic != reply_topic {
                continue;
            }
            match serde_json::from_slice::<Value>(&payload).ok() {
                Some(reply) if answers(&reply, gateway_id, &nonce) => {
                    return anyhow::Ok(reply);
                }
                // Someone else's message on the reply topic: not believed, and the real reply
                // is still awaited.
                _ => eprintln!(
                    "warning: ignored a message on {reply_topic} that is not gateway \
                     {gateway_id}'s reply to this request (forged, or stale)"
                ),
            }
        }
    };
    let reply = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from gateway {gateway_id} at {address} within {} s",
                timeout.as_secs_f64()
            )
        })??;
    // The reply is already in hand: leaving politely is best effort.
    session.close().await;
    Ok(reply)
}

/// Whether `reply` is gateway `gateway_id`'s answer to the request that carried `nonce`.
pub fn answers(reply: &Value, gateway_id: &str, nonce: &str) -> bool {
    reply.get("gateway").and_then(Value::as_str) == Some(gateway_id)
        && reply.get("nonce").and_then(Value::as_str) == Some(nonce)
}

/// The error a reply reports, if it is not `"ok": true`.
pub fn reply_error(reply: &Value) -> Option<String> {
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(
        reply
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("unexpected reply: {reply}")),
    )
}

/// A successful reply for people: a table for `list`, one block per dead letter for `show`,
/// one line for `replay` and `purge`.
pub fn render(verb: Verb, reply: &Value, now_ms: u64) -> String {
    match verb {
        Verb::Replay => format!(
            "replayed {}\n",
            reply.get("replayed").and_then(Value::as_u64).unwrap_or(0)
        ),
        Verb::Purge => format!(
            "purged {}\n",
            reply.get("purged").and_then(Value::as_u64).unwrap_or(0)
        ),
        Verb::List | Verb::Show => {
            let letters = reply
                .get("dead_letters")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut out = if letters.is_empty() {
                "no dead letters\n".to_string()
            } else if verb == Verb::List {
                table(letters, now_ms)
            } else {
                letters
                    .iter()
                    .map(|l| block(l, now_ms))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if reply.get("truncated").and_then(Value::as_bool) == Some(true) {
                out.push_str("(more dead letters match; narrow the filter or lower --limit)\n");
            }
            out
        }
    }
}

fn text(letter: &Value, field: &str) -> String {
    match letter.get(field) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => "-".into(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn age(letter: &Value, now_ms: u64) -> String {
    let Some(created) = letter.get("created_ms").and_then(Value::as_u64) else {
        return "-".into();
    };
    let secs = now_ms.saturating_sub(created) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn table(letters: &[Value], now_ms: u64) -> String {
    let header = ["ID", "REASON", "ROUTE", "ATTEMPTS", "TOPIC", "AGE"];
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|l| {
            [
                text(l, "id"),
                text(l, "reason"),
                text(l, "route"),
                text(l, "attempts"),
                text(l, "topic"),
                age(l, now_ms),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

fn block(letter: &Value, now_ms: u64) -> String {
    let mut out = format!("dead letter {}\n", text(letter, "id"));
    for (label, field) in [
        ("reason", "reason"),
        ("detail", "detail"),
        ("stage", "stage"),
        ("route", "route"),
        ("module", "module"),
        ("version", "module_version"),
        ("link", "link"),
        ("message id", "msg_id"),
        ("attempts", "attempts"),
        ("topic", "topic"),
        ("device", "device"),
        ("client id", "client_id"),
        ("event id", "event_id"),
    ] {
        // Continuation lines of a multi-line value (a trap's message) line up under its first.
        let value = text(letter, field).replace('\n', &format!("\n{:14}", ""));
        out.push_str(&format!("  {:<12}{value}\n", format!("{label}:")));
    }
    out.push_str(&format!("  {:<12}{}\n", "age:", age(letter, now_ms)));
    let bytes = text(letter, "payload_bytes");
    if let Some(payload) = letter.get("payload").and_then(Value::as_str) {
        out.push_str(&format!("  {:<12}{bytes} bytes, text\n", "payload:"));
        for l in payload.lines() {
            out.push_str(&format!("    {l}\n"));
        }
    } else if let Some(payload) = letter.get("payload_base64").and_then(Value::as_str) {
        out.push_str(&format!("  {:<12}{bytes} bytes, base64\n", "payload:"));
        out.push_str(&format!("    {payload}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_a_table_and_counts() {
        let reply = json!({"ok": true, "truncated": false, "dead_letters": [
            {"id": 12, "reason": "trap", "route": "r1", "attempts": 2,
             "topic": "telemetry/d/x", "created_ms": 1_000},
        ]});
        let out = render(Verb::List, &reply, 91_000);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "ID  REASON  ROUTE  ATTEMPTS  TOPIC          AGE");
        assert_eq!(lines[1], "12  trap    r1     2         telemetry/d/x  90s");
        assert_eq!(
            render(Verb::List, &json!({"ok": true, "dead_letters": []}), 0),
            "no dead letters\n"
        );
        assert_eq!(
            render(Verb::Replay, &json!({"ok": true, "replayed": 3}), 0),
            "replayed 3\n"
        );
        assert_eq!(reply_error(&reply), None);
        assert_eq!(
            reply_error(&json!({"ok": false, "error": "nope"})).as_deref(),
            Some("nope")
        );
    }
}
