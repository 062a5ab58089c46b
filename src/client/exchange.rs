//! The operator's MQTT exchange with a gateway: the one short-lived connection that `outpost
//! deadletters` ([`crate::client::dead_letters`]) and `outpost module` ([`crate::client::modules`])
//! make to a gateway's broker, or to an upstream broker its gateways are connected to, to
//! subscribe to where the answers come, publish a request and read the answers.
//!
//! Guarantees:
//! - It is the uplink's own connection ([`crate::uplink::client`]): TCP for `mqtt://HOST[:PORT]`
//!   (1883 by default), TLS 1.2 or 1.3 (rustls with ring) for `mqtts://HOST[:PORT]` (8883 by
//!   default); MQTT 3.1.1, a clean session, a random client id `cli-<16 hex digits>`, and the
//!   endpoint's username and password when given.
//! - The TLS files are read and checked by [`crate::uplink::credentials`], as an upstream's
//!   are: the broker's certificate must chain to `--cafile` (or, without it, to the system's
//!   CA certificates) and be valid for the host in the URL (an IP address against the
//!   certificate's IP addresses); a private key file other users may access is refused.
//! - Nothing is sent when the options cannot be used: TLS files with an `mqtt://` URL, a
//!   certificate without its key or the reverse, a file that is missing, unreadable or holds
//!   no certificate or key. The error names the option and the file.
//! - Connecting (DNS, TCP, the TLS handshake, CONNECT and CONNACK) takes at most the connect
//!   timeout. Every failure is an [`OperatorError`] carrying the [`LinkFailure`] (a TLS
//!   failure in an operator's words, a refused login) and, where the fix is one of the
//!   command's options, that option.
//! - [`Session::subscribe`] returns only once the broker confirmed the subscription (SUBACK),
//!   so an answer to a request published after it returns is never missed; a refused filter is
//!   an error. Messages that arrive before the SUBACK were published before the subscription
//!   existed: they cannot answer a later request and are dropped.
//! - [`Session::publish`] sends with QoS 1 (retained only when asked) and returns the packet
//!   id that its [`Event::Acked`] carries.
//! - Each incoming message is at most `max_incoming` bytes (a larger one ends the connection
//!   with an error); QoS 1 messages are acknowledged.
//! - Nothing outlives the session: [`Session::close`] sends DISCONNECT and waits at most a
//!   second for it to go out; dropping a session closes its socket.

use std::time::Duration;

use rand::RngExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{parse_broker_url, BrokerAddress, Endpoint, MqttVersion, UpstreamConfig};
use crate::pem::CredentialError;
use crate::uplink::client::{self, Client, ConnectSettings, LinkEvent};
use crate::uplink::credentials;
use crate::uplink::{LinkFailure, TlsFailure};

/// Keep-alive asked for in CONNECT.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// How long [`Session::close`] waits for DISCONNECT to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why an exchange failed. The texts say what to change.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The URL or the combination of options cannot be used; nothing was sent.
    #[error("{0}")]
    Options(String),
    /// A TLS file (or the URL's host, as a TLS server name) cannot be used; nothing was sent.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// Connecting failed, or the connection ended.
    #[error("cannot talk to the broker at {address}: {failure}{}", hint(failure))]
    Link {
        /// The broker.
        address: BrokerAddress,
        /// What went wrong.
        failure: LinkFailure,
    },
    /// The broker refused a subscription.
    #[error("{address} refused the subscription to {filters}: log in as one of the gateway's broker.admins (--username and --password, or a client certificate whose name is one), or as a user the ACL lets read it")]
    SubscriptionRefused {
        /// The broker.
        address: BrokerAddress,
        /// The filters asked for, comma-separated.
        filters: String,
    },
}

/// What the command can do about a failure, when one of its options is the fix.
fn hint(failure: &LinkFailure) -> &'static str {
    match failure {
        LinkFailure::Tls(TlsFailure::UnknownCa) => {
            " [this command: --cafile FILE, the CA that signed the broker's certificate]"
        }
        LinkFailure::Tls(TlsFailure::WrongHost { .. }) => {
            " [this command: --broker mqtts://NAME with a name the certificate is for]"
        }
        LinkFailure::Tls(TlsFailure::ClientCertificateRefused { .. }) => {
            " [this command: --certfile FILE and --keyfile FILE, a client certificate the broker accepts]"
        }
        LinkFailure::Refused(_) => {
            " [this command: --username and --password, or --certfile and --keyfile]"
        }
        _ => "",
    }
}

/// What a session hears after it subscribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message on one of the session's subscriptions.
    Message {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The broker acknowledged the publish with this packet id ([`Session::publish`]);
    /// `refusal` says why it did not accept it, when it did not (an MQTT 5 reason code, or a
    /// message larger than the broker takes).
    Acked {
        /// The packet id.
        pkid: u16,
        /// Why it was refused, if it was.
        refusal: Option<String>,
    },
}

/// One connection of an operator's command to a broker.
pub struct Session {
    client: Client,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    connection: JoinHandle<()>,
    address: BrokerAddress,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The TLS settings and login of `endpoint`, read and checked as an upstream's are; errors
/// name the command's options.
fn credentials(
    endpoint: &Endpoint<'_>,
    address: &BrokerAddress,
) -> Result<credentials::Credentials, OperatorError> {
    let tls = endpoint.tls;
    if !address.tls && !tls.is_empty() {
        return Err(OperatorError::Options(format!(
            "--cafile, --certfile and --keyfile are for a broker reached over TLS, and {:?} is \
             plain MQTT: use mqtts://HOST[:PORT] (port 8883 by default), or leave them out",
            endpoint.url
        )));
    }
    if tls.certfile.is_some() != tls.keyfile.is_some() {
        return Err(OperatorError::Options(
            "--certfile and --keyfile go together: the client certificate and its private key"
                .into(),
        ));
    }
    let config = UpstreamConfig {
        name: "operator".into(),
        url: endpoint.url.to_string(),
        cafile: tls.cafile.map(Into::into),
        certfile: tls.certfile.map(Into::into),
        keyfile: tls.keyfile.map(Into::into),
        username: endpoint.login.map(|(user, _)| user.to_string()),
        password: endpoint.login.map(|(_, password)| password.into()),
        ..UpstreamConfig::default()
    };
    let option = |field: &str| match field {
        "url" => "--broker".to_string(),
        "cafile" | "certfile" | "keyfile" => format!("--{field}"),
        other => other.to_string(),
    };
    Ok(credentials::load_named(&config, &option)?)
}

/// Connects to the broker of `endpoint` and waits for its CONNACK (at most
/// `connect_timeout`); incoming messages may be up to `max_incoming` bytes. See the module's
/// guarantees.
pub async fn connect(
    endpoint: Endpoint<'_>,
    max_incoming: usize,
    connect_timeout: Duration,
) -> Result<Session, OperatorError> {
    let address = parse_broker_url(endpoint.url).map_err(OperatorError::Options)?;
    let credentials = credentials(&endpoint, &address)?;
    let settings = ConnectSettings {
        host: address.host.clone(),
        port: address.port,
        tls: credentials.tls,
        protocol: MqttVersion::V311,
        client_id: format!("cli-{:016x}", rand::rng().random::<u64>()),
        keep_alive: KEEP_ALIVE,
        login: credentials.login,
        max_incoming,
        connect_timeout,
        capacity: 16,
        dial: None,
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let (client, connection) = client::connect(settings, events_tx);
    let mut session = Session {
        client,
        events,
        connection: tokio::spawn(connection),
        address,
    };
    loop {
        match session.events.recv().await {
            Some(LinkEvent::Connected(_)) => return Ok(session),
            Some(LinkEvent::Failed(failure)) => return Err(session.link(failure)),
            Some(_) => {}
            None => return Err(session.gone()),
        }
    }
}

impl Session {
    /// The broker it is connected to.
    pub fn address(&self) -> &BrokerAddress {
        &self.address
    }

    /// Subscribes (QoS 1) to `filters` and returns once the broker confirmed the subscription;
    /// fails when it refused any of them or the connection ended.
    pub async fn subscribe(&mut self, filters: &[String]) -> Result<(), OperatorError> {
        let pkid = match self.client.try_subscribe(filters.to_vec()) {
            Ok(Some(pkid)) => pkid,
            Ok(None) => return Ok(()),
            Err(_) => return Err(self.ended().await),
        };
        loop {
            match self.events.recv().await {
                Some(LinkEvent::Subscribed { pkid: got, refused }) if got == pkid => {
                    if refused > 0 {
                        return Err(OperatorError::SubscriptionRefused {
                            address: self.address.clone(),
                            filters: filters.join(", "),
                        });
                    }
                    return Ok(());
                }
                Some(LinkEvent::Failed(failure)) => return Err(self.link(failure)),
                // Published before this subscription existed (see the module's guarantees).
                Some(_) => {}
                None => return Err(self.gone()),
            }
        }
    }

    /// Publishes `payload` on `topic` with QoS 1, retained when `retain` is set; returns its
    /// packet id. Fails only when the connection has ended.
    pub async fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<u16, OperatorError> {
        let queued = if retain {
            self.client.try_publish_retained(topic, payload)
        } else {
            self.client.try_publish(topic, payload, true, None)
        };
        match queued {
            Ok(pkid) => Ok(pkid),
            Err(_) => Err(self.ended().await),
        }
    }

    /// The next message or acknowledgement; fails when the connection ended (with its
    /// cause). Cancel-safe: nothing is lost when its future is dropped.
    pub async fn next(&mut self) -> Result<Event, OperatorError> {
        loop {
            match self.events.recv().await {
                Some(LinkEvent::Incoming { topic, payload }) => {
                    return Ok(Event::Message { topic, payload })
                }
                Some(LinkEvent::PubAck { pkid, refusal }) => {
                    return Ok(Event::Acked { pkid, refusal })
                }
                Some(LinkEvent::Failed(failure)) => return Err(self.link(failure)),
                Some(LinkEvent::Connected(_) | LinkEvent::Subscribed { .. }) => {}
                None => return Err(self.gone()),
            }
        }
    }

    /// Leaves politely: DISCONNECT, then the socket is closed (waits at most a second).
    pub async fn close(mut self) {
        self.client.try_disconnect();
        let _ = tokio::time::timeout(CLOSE_WAIT, &mut self.connection).await;
    }

    /// Why the connection ended, once a request could not be queued (its last event says).
    async fn ended(&mut self) -> OperatorError {
        loop {
            match self.events.recv().await {
                Some(LinkEvent::Failed(failure)) => return self.link(failure),
                Some(_) => {}
                None => return self.gone(),
            }
        }
    }

    fn link(&self, failure: LinkFailure) -> OperatorError {
        OperatorError::Link {
            address: self.address.clone(),
            failure,
        }
    }

    fn gone(&self) -> OperatorError {
        self.link(LinkFailure::Io("the connection task ended".into()))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsFiles;
    use std::path::Path;

    fn endpoint<'a>(url: &'a str, tls: TlsFiles<'a>) -> Endpoint<'a> {
        Endpoint {
            url,
            login: None,
            tls,
        }
    }

    async fn refused(endpoint: Endpoint<'_>) -> String {
        connect(endpoint, 1024, Duration::from_secs(5))
            .await
            .expect_err("refused before connecting")
            .to_string()
    }

    #[tokio::test]
    async fn tls_options_need_an_mqtts_url_and_come_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // Nothing listens there: a refusal must come before any connection.
        let plain = refused(endpoint(
            "mqtt://127.0.0.1:9",
            TlsFiles {
                cafile: Some(&ca),
                ..TlsFiles::default()
            },
        ))
        .await;
        assert!(
            plain.contains("--cafile") && plain.contains("mqtts://"),
            "{plain}"
        );
        let half = refused(endpoint(
            "mqtts://127.0.0.1:9",
            TlsFiles {
                certfile: Some(Path::new("c.pem")),
                ..TlsFiles::default()
            },
        ))
        .await;
        assert!(half.contains("go together"), "{half}");
        let missing = refused(endpoint(
            "mqtts://127.0.0.1:9",
            TlsFiles {
                cafile: Some(&ca),
                ..TlsFiles::default()
            },
        ))
        .await;
        assert!(
            missing.contains("--cafile") && missing.contains(&ca.display().to_string()),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn a_key_that_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = (
            dir.path().join("ca.pem"),
            dir.path().join("c.pem"),
            dir.path().join("c.key"),
        );
        let made = rcgen::generate_simple_self_signed(vec!["ca".to_string()]).unwrap();
        std::fs::write(&ca, made.cert.pem()).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let exposed = refused(endpoint(
            "mqtts://127.0.0.1:9",
            TlsFiles {
                cafile: Some(&ca),
                certfile: Some(&cert),
                keyfile: Some(&key),
            },
        ))
        .await;
        assert!(
            exposed.contains("--keyfile") && exposed.contains("mode 644"),
            "{exposed}"
        );
    }
}
