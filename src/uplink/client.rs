//! One MQTT connection to an upstream broker, on rumqttc's packet codecs: the transport (TCP,
//! or TLS with rustls), CONNECT and CONNACK, QoS 1 publishes with their packet ids, the control
//! subscriptions, and keep-alive, for MQTT 3.1.1 and 5.
//!
//! Guarantees:
//! - A connection ends with exactly one [`LinkEvent::Failed`], whose [`LinkFailure`] names the
//!   cause in words an operator can act on ([`LinkFailure::cause`] is its metric label). This
//!   module never retries: the session decides when to connect again.
//! - Connecting (name resolution, TCP, the TLS handshake, CONNECT and CONNACK) takes at most the
//!   connect timeout. Once connected, a peer that stops answering is found by keep-alive (a
//!   PINGREQ still unanswered one keep-alive period later), and a write that makes no progress
//!   for one keep-alive period ends the connection; a slow link that still moves does not.
//! - Incoming packets are bounded by `max_incoming` bytes, so what an upstream can make this
//!   connection buffer is bounded; a larger, malformed or unexpected packet ends the connection.
//! - A QoS 1 publish gets its packet id when it is queued ([`Client::try_publish`] returns
//!   it), so the session knows it before any event about it; a packet id is reused only after
//!   its PUBACK.
//! - A publish larger than the upstream's Maximum Packet Size (MQTT 5) is not sent: it gets a
//!   refusal as if the upstream had refused it, so the session keeps the row and, after its
//!   refusals, dead-letters it.
//!
//! The connection keeps nothing across connections: what is in flight is the session's
//! business (the outbox is the source of truth), so every connection starts clean.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::config::MqttVersion;

/// Largest packet MQTT can express (a 4-byte remaining length plus the fixed header). Outgoing
/// packets may be this large unless the upstream says less (MQTT 5 Maximum Packet Size): the
/// upstream broker is the one to decide what is too large.
pub(crate) const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// Bytes gathered before they are written, so that many small publishes share one write (and,
/// with TLS, few records).
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Bytes handed to one write call: a stalled write is noticed per chunk, so a slow link that
/// still moves is not mistaken for a dead one.
const WRITE_CHUNK_BYTES: usize = 16 * 1024;

/// How to reach the upstream and who to say we are.
pub(crate) struct ConnectSettings {
    /// Host name or IP address of the upstream.
    pub host: String,
    /// Its TCP port.
    pub port: u16,
    /// TLS settings, for `mqtts://` upstreams.
    pub tls: Option<TlsConnect>,
    /// MQTT version.
    pub protocol: MqttVersion,
    /// MQTT client id.
    pub client_id: String,
    /// Keep-alive asked for in CONNECT (an MQTT 5 upstream may impose its own).
    pub keep_alive: Duration,
    /// User name and password for CONNECT, if the upstream wants them.
    pub login: Option<Login>,
    /// Largest packet accepted from the upstream.
    pub max_incoming: usize,
    /// Longest time from the start of connecting to CONNACK.
    pub connect_timeout: Duration,
    /// Capacity of the request channel (the session never has more requests outstanding).
    pub capacity: usize,
    /// An in-process connection to use instead of host and port (the gateway's own broker).
    pub dial: Option<Dialer>,
}

/// Opens an in-process byte stream to a broker (the local link uses it to reach the
/// gateway's own broker without a socket).
pub type Dialer = Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

/// The TLS side of a connection: rustls' configuration (roots, client certificate, ALPN) and
/// the name the upstream's certificate must be valid for (a DNS name, sent as SNI, or an IP
/// address, checked against the certificate's IP SANs).
#[derive(Clone)]
pub struct TlsConnect {
    /// The client configuration, built by [`super::credentials`].
    pub config: Arc<rustls::ClientConfig>,
    /// The upstream's name as the URL gives it.
    pub server_name: ServerName<'static>,
}

/// MQTT user name and password.
#[derive(Clone)]
pub struct Login {
    /// The user name.
    pub username: String,
    /// The password (empty: none is sent).
    pub password: Zeroizing<String>,
}

/// What an upstream said about itself in CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most unacknowledged QoS 1 publishes it accepts at once (MQTT 5 Receive Maximum;
    /// 65,535 when it says nothing, and always on 3.1.1).
    pub receive_maximum: u16,
    /// Largest packet it accepts (MQTT 5 Maximum Packet Size).
    pub max_packet_size: Option<u32>,
    /// Keep-alive it imposes (MQTT 5 Server Keep Alive), in seconds.
    pub keep_alive_secs: Option<u16>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            receive_maximum: u16::MAX,
            max_packet_size: None,
            keep_alive_secs: None,
        }
    }
}

/// What the session hears from a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// CONNACK accepted the connection.
    Connected(ServerLimits),
    /// The upstream acknowledged this packet id; `refusal` is set when it did not accept the
    /// message (MQTT 5 reason code 0x80 or above, or a packet too large for it).
    PubAck { pkid: u16, refusal: Option<String> },
    /// A publish on one of the control subscriptions.
    Incoming { topic: String, payload: Vec<u8> },
    /// The upstream answered the SUBSCRIBE with packet id `pkid` ([`Client::try_subscribe`]
    /// returned it); `refused` counts the filters it refused.
    Subscribed { pkid: u16, refused: usize },
    /// The connection is over; nothing follows.
    Failed(LinkFailure),
}

/// Why a connection failed or ended. The texts say what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFailure {
    /// The upstream's host name did not resolve.
    #[error("cannot resolve {host:?}: {detail} (check the URL and this gateway's DNS)")]
    Resolve {
        /// The host name.
        host: String,
        /// What the resolver said.
        detail: String,
    },
    /// No address of the upstream accepted a TCP connection.
    #[error("cannot connect to {address}: {detail}")]
    Unreachable {
        /// The address (or host:port) tried last.
        address: String,
        /// What the operating system said.
        detail: String,
    },
    /// A stage of connecting did not finish within the connect timeout.
    #[error("no answer within {secs} s while {stage}")]
    Timeout {
        /// What was being waited for.
        stage: &'static str,
        /// The connect timeout, in seconds.
        secs: u64,
    },
    /// The TLS handshake failed, or the upstream ended the TLS session.
    #[error("TLS: {0}")]
    Tls(TlsFailure),
    /// The upstream answered CONNECT with a refusal.
    #[error("the upstream refused the connection: {0}")]
    Refused(ConnectRefusal),
    /// The upstream sent something MQTT does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The upstream sent DISCONNECT.
    #[error("the upstream sent DISCONNECT{}", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Disconnected {
        /// The MQTT 5 reason code and reason string, if any.
        reason: Option<String>,
    },
    /// The upstream closed the connection.
    #[error("the upstream closed the connection{}", if *before_connack { " before answering CONNECT" } else { "" })]
    Closed {
        /// Whether it happened before CONNACK (a broker that drops a client it will not take).
        before_connack: bool,
    },
    /// No PINGRESP came within a keep-alive period.
    #[error("no answer to PINGREQ within the keep-alive of {secs} s")]
    PingTimeout {
        /// The keep-alive, in seconds.
        secs: u64,
    },
    /// A write made no progress for a keep-alive period.
    #[error("the upstream has taken no data for {secs} s")]
    WriteStalled {
        /// The keep-alive, in seconds.
        secs: u64,
    },
    /// Reading or writing failed.
    #[error("connection lost: {0}")]
    Io(String),
    /// The session closed the connection (shutdown, rotation, or a refusal it reacted to).
    #[error("closed by the gateway")]
    Closing,
}

impl LinkFailure {
    /// A short, stable label for metrics and tests (`tls-unknown-ca`, `bad-credentials`, ...).
    pub fn cause(&self) -> &'static str {
        match self {
            LinkFailure::Resolve { .. } => "dns",
            LinkFailure::Unreachable { .. } => "unreachable",
            LinkFailure::Timeout { .. } => "timeout",
            LinkFailure::Tls(t) => t.cause(),
            LinkFailure::Refused(r) => r.cause(),
            LinkFailure::Protocol(_) => "protocol",
            LinkFailure::Disconnected { .. } => "disconnected",
            LinkFailure::Closed { .. } => "closed",
            LinkFailure::PingTimeout { .. } => "ping-timeout",
            LinkFailure::WriteStalled { .. } => "write-stalled",
            LinkFailure::Io(_) => "io",
            LinkFailure::Closing => "closing",
        }
    }

    /// Whether the failure is about this gateway's own settings or the upstream's identity
    /// (TLS, credentials): these do not go away by themselves and deserve a warning each time
    /// they change, where a plain outage is one warning for its whole length.
    pub fn is_configuration(&self) -> bool {
        matches!(self, LinkFailure::Tls(_) | LinkFailure::Refused(_))
    }
}

/// Why a TLS handshake failed, in the terms an operator fixes it in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The upstream's certificate is not signed by a CA this gateway trusts.
    #[error("the upstream's certificate is not signed by a trusted CA (set `cafile` to the CA that signed it; without `cafile` the system's CA certificates are used)")]
    UnknownCa,
    /// The upstream's certificate has expired.
    #[error("the upstream's certificate expired{} (renew it on the upstream, or check this gateway's clock)", at(" on ", not_after))]
    Expired {
        /// Its notAfter, when rustls gave it.
        not_after: Option<String>,
    },
    /// The upstream's certificate is not valid yet.
    #[error(
        "the upstream's certificate is not valid yet{} (check this gateway's clock)",
        at(" until ", not_before)
    )]
    NotYetValid {
        /// Its notBefore, when rustls gave it.
        not_before: Option<String>,
    },
    /// The upstream's certificate is for another name.
    #[error("the upstream's certificate is not valid for {expected:?}{} (use the name the certificate is for in the URL)", if presented.is_empty() { String::new() } else { format!("; it is for {}", presented.join(", ")) })]
    WrongHost {
        /// The name (or IP address) in the URL.
        expected: String,
        /// The names the certificate is valid for, when rustls gave them.
        presented: Vec<String>,
    },
    /// The upstream refused this gateway's client certificate (or wanted one).
    #[error("the upstream refused this gateway's client certificate ({alert}): {hint}")]
    ClientCertificateRefused {
        /// The TLS alert it sent.
        alert: String,
        /// What to check.
        hint: &'static str,
    },
    /// The upstream accepts none of the ALPN protocols offered.
    #[error("the upstream accepts none of the ALPN protocols offered ({}); check `alpn`", if offered.is_empty() { "none".to_string() } else { offered.join(", ") })]
    NoCommonAlpn {
        /// The protocols this gateway offered.
        offered: Vec<String>,
    },
    /// Anything else (no common TLS version or cipher suite, a bad signature, ...).
    #[error("{0}")]
    Other(String),
}

fn at(prefix: &str, when: &Option<String>) -> String {
    when.as_ref()
        .map(|w| format!("{prefix}{w}"))
        .unwrap_or_default()
}

impl TlsFailure {
    /// A short, stable label for metrics and tests.
    pub fn cause(&self) -> &'static str {
        match self {
            TlsFailure::UnknownCa => "tls-unknown-ca",
            TlsFailure::Expired { .. } => "tls-expired",
            TlsFailure::NotYetValid { .. } => "tls-not-yet-valid",
            TlsFailure::WrongHost { .. } => "tls-wrong-host",
            TlsFailure::ClientCertificateRefused { .. } => "tls-client-certificate-refused",
            TlsFailure::NoCommonAlpn { .. } => "tls-no-common-alpn",
            TlsFailure::Other(_) => "tls-other",
        }
    }

    /// The failure a rustls error stands for; `alpn` is what this gateway offered.
    pub fn from_rustls(error: &rustls::Error, alpn: &[Vec<u8>]) -> TlsFailure {
        use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
        match error {
            Error::InvalidCertificate(cert) => match cert {
                Cert::UnknownIssuer => TlsFailure::UnknownCa,
                Cert::Expired => TlsFailure::Expired { not_after: None },
                Cert::ExpiredContext { not_after, .. } => TlsFailure::Expired {
                    not_after: Some(rfc3339(not_after.as_secs())),
                },
                Cert::NotValidYet => TlsFailure::NotYetValid { not_before: None },
                Cert::NotValidYetContext { not_before, .. } => TlsFailure::NotYetValid {
                    not_before: Some(rfc3339(not_before.as_secs())),
                },
                Cert::NotValidForName => TlsFailure::WrongHost {
                    expected: String::new(),
                    presented: Vec::new(),
                },
                Cert::NotValidForNameContext {
                    expected,
                    presented,
                } => TlsFailure::WrongHost {
                    expected: server_name_text(expected),
                    presented: presented.clone(),
                },
                other => TlsFailure::Other(format!(
                    "the upstream's certificate is not acceptable: {other:?}"
                )),
            },
            Error::AlertReceived(alert) => {
                let hint = match alert {
                    Alert::NoApplicationProtocol => {
                        return TlsFailure::NoCommonAlpn {
                            offered: alpn
                                .iter()
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                                .collect(),
                        }
                    }
                    Alert::CertificateRequired => {
                        "it requires one: set `certfile` and `keyfile`"
                    }
                    Alert::UnknownCA => {
                        "it does not trust the CA that signed it (register the certificate or its CA with the upstream)"
                    }
                    Alert::CertificateExpired => "it says the certificate expired: renew it",
                    Alert::CertificateRevoked => "it says the certificate was revoked",
                    Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateUnknown
                    | Alert::AccessDenied => {
                        "check that the certificate is registered and active on the upstream"
                    }
                    other => {
                        return TlsFailure::Other(format!(
                            "the upstream ended the TLS handshake with the alert {other:?}"
                        ))
                    }
                };
                TlsFailure::ClientCertificateRefused {
                    alert: format!("{alert:?}"),
                    hint,
                }
            }
            Error::NoApplicationProtocol => TlsFailure::NoCommonAlpn {
                offered: alpn
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect(),
            },
            Error::PeerIncompatible(why) => TlsFailure::Other(format!(
                "the upstream and this gateway have no TLS version or cipher suite in common ({why:?})"
            )),
            other => TlsFailure::Other(other.to_string()),
        }
    }
}

/// Why an upstream refused CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// Wrong user name or password (3.1.1: 0x04; 5: 0x86).
    #[error("bad user name or password (check `username` and `password` or `password_file`)")]
    BadCredentials,
    /// Not authorised (3.1.1: 0x05; 5: 0x87), or banned (5: 0x8A).
    #[error("not authorised (check the credentials, the client certificate and what the upstream allows this client id)")]
    NotAuthorized,
    /// Any other reason code.
    #[error("{0}")]
    Other(String),
}

impl ConnectRefusal {
    /// A short, stable label for metrics and tests.
    pub fn cause(&self) -> &'static str {
        match self {
            ConnectRefusal::BadCredentials => "bad-credentials",
            ConnectRefusal::NotAuthorized => "not-authorized",
            ConnectRefusal::Other(_) => "connect-refused",
        }
    }
}

fn rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix_secs))
        .to_string()
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// A request from the session to its connection.
enum Request {
    /// Publish with QoS 1 under packet id `pkid`, or with QoS 0 when it is 0; `msg_id` goes
    /// into the MQTT 5 user property; `retain` sets the RETAIN flag.
    Publish {
        topic: String,
        payload: Vec<u8>,
        pkid: u16,
        msg_id: Option<String>,
        retain: bool,
    },
    /// Subscribe (QoS 1) to these filters, under this packet id.
    Subscribe(u16, Vec<String>),
    /// Send DISCONNECT and close.
    Disconnect,
}

/// The session's handle to a connection. Requests are queued without waiting: the channel is
/// sized above what the session ever has outstanding.
#[derive(Clone)]
pub(crate) struct Client {
    requests: mpsc::Sender<Request>,
    /// The connection's packet ids in use: given here, given back by the reader when their
    /// acknowledgement arrives (no message to the writer, no event back for each publish).
    ids: Arc<Mutex<PacketIds>>,
}

impl Client {
    /// Queues a publish; returns its packet id (QoS 1) or 0 (QoS 0). Fails only when the
    /// connection is gone, its queue is full, or every packet id is in flight.
    pub fn try_publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
        msg_id: Option<String>,
    ) -> Result<u16, String> {
        self.queue_publish(topic, payload, qos1, msg_id, false)
    }

    /// Queues a QoS 1 publish with the RETAIN flag set; returns its packet id. Fails as
    /// [`Client::try_publish`] does.
    pub fn try_publish_retained(&self, topic: String, payload: Vec<u8>) -> Result<u16, String> {
        self.queue_publish(topic, payload, true, None, true)
    }

    fn queue_publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
        msg_id: Option<String>,
        retain: bool,
    ) -> Result<u16, String> {
        let pkid = if qos1 { self.next_id()? } else { 0 };
        self.send(Request::Publish {
            topic,
            payload,
            pkid,
            msg_id,
            retain,
        })
        .inspect_err(|_| self.release(pkid))?;
        Ok(pkid)
    }

    /// Queues a subscription (QoS 1) to every filter; returns the SUBSCRIBE's packet id, which
    /// its [`LinkEvent::Subscribed`] carries (`None`: no filters, nothing sent).
    pub fn try_subscribe(&self, filters: Vec<String>) -> Result<Option<u16>, String> {
        if filters.is_empty() {
            return Ok(None);
        }
        let pkid = self.next_id()?;
        self.send(Request::Subscribe(pkid, filters))
            .inspect_err(|_| self.release(pkid))?;
        Ok(Some(pkid))
    }

    fn next_id(&self) -> Result<u16, String> {
        lock(&self.ids)
            .next()
            .ok_or_else(|| "every packet id is in flight".to_string())
    }

    fn release(&self, pkid: u16) {
        if pkid != 0 {
            lock(&self.ids).release(pkid);
        }
    }

    /// Asks for a clean DISCONNECT; best effort.
    pub fn try_disconnect(&self) {
        let _ = self.send(Request::Disconnect);
    }

    fn send(&self, request: Request) -> Result<(), String> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "the connection's request queue is full".into(),
            mpsc::error::TrySendError::Closed(_) => "the connection is closed".into(),
        })
    }
}

/// A connection to the upstream, driven by whoever polls it: the session polls it in the
/// same task as its own work, so an acknowledgement and the publishes that refill the window
/// pass between them without waking another task on another thread. It completes when the
/// connection has ended (after sending [`LinkEvent::Failed`]); dropping it closes the socket.
pub(crate) struct Connection(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// Prepares a connection; it connects when first polled, and every event of the connection
/// arrives on `events`, the last one being [`LinkEvent::Failed`].
pub(crate) fn connect(
    settings: ConnectSettings,
    events: mpsc::UnboundedSender<LinkEvent>,
) -> (Client, Connection) {
    let (requests_tx, requests) = mpsc::channel(settings.capacity.max(1));
    let ids = Arc::new(Mutex::new(PacketIds::default()));
    let released = ids.clone();
    let connection = Connection(Box::pin(async move {
        let failure = match run(&settings, requests, &events, &released).await {
            Ok(()) => LinkFailure::Closing,
            Err(failure) => failure,
        };
        let _ = events.send(LinkEvent::Failed(failure));
    }));
    (
        Client {
            requests: requests_tx,
            ids,
        },
        connection,
    )
}

/// A byte stream to the upstream: TCP or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Between the reader and the writer of one connection.
enum Internal {
    /// Acknowledge an incoming QoS 1 publish.
    Ack(u16),
    /// PINGRESP arrived.
    Pong,
}

async fn run(
    settings: &ConnectSettings,
    mut requests: mpsc::Receiver<Request>,
    events: &mpsc::UnboundedSender<LinkEvent>,
    ids: &Mutex<PacketIds>,
) -> Result<(), LinkFailure> {
    let tls = settings.tls.is_some();
    let alpn = settings
        .tls
        .as_ref()
        .map(|t| t.config.alpn_protocols.clone())
        .unwrap_or_default();
    let (stream, limits, leftover) = establish(settings, &alpn).await?;
    let _ = events.send(LinkEvent::Connected(limits));
    let keep_alive = match limits.keep_alive_secs {
        Some(secs) if secs > 0 => Duration::from_secs(u64::from(secs)),
        _ => settings.keep_alive,
    };
    let (reader, writer) = tokio::io::split(stream);
    let (internal_tx, internal_rx) = mpsc::unbounded_channel();
    let reading = read_loop(
        reader,
        leftover,
        settings.protocol,
        settings.max_incoming,
        events,
        &internal_tx,
        ids,
        &alpn,
        tls,
    );
    let writing = write_loop(
        writer,
        settings,
        limits,
        keep_alive,
        &mut requests,
        internal_rx,
        events,
        ids,
        &alpn,
    );
    tokio::select! {
        result = reading => result,
        result = writing => result,
    }
}

/// Connects, says CONNECT and waits for CONNACK, within the connect timeout. Returns the
/// stream, the upstream's limits, and whatever arrived after CONNACK.
async fn establish(
    settings: &ConnectSettings,
    alpn: &[Vec<u8>],
) -> Result<(Box<dyn Stream>, ServerLimits, BytesMut), LinkFailure> {
    let deadline = Instant::now() + settings.connect_timeout;
    let secs = settings.connect_timeout.as_secs().max(1);
    let timed = |stage: &'static str| move |_| LinkFailure::Timeout { stage, secs };

    let mut stream: Box<dyn Stream> = match (&settings.dial, &settings.tls) {
        (Some(dial), _) => Box::new(dial()),
        (None, None) => Box::new(
            tokio::time::timeout_at(deadline, connect_tcp(&settings.host, settings.port))
                .await
                .map_err(timed("connecting over TCP"))??,
        ),
        (None, Some(tls)) => {
            let tcp = tokio::time::timeout_at(deadline, connect_tcp(&settings.host, settings.port))
                .await
                .map_err(timed("connecting over TCP"))??;
            let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
            let handshake = connector.connect(tls.server_name.clone(), tcp);
            let stream = tokio::time::timeout_at(deadline, handshake)
                .await
                .map_err(timed("in the TLS handshake"))?
                .map_err(|e| io_failure(e, alpn, true, true))?;
            Box::new(stream)
        }
    };
    let tls = settings.tls.is_some();

    let mut out = BytesMut::new();
    encode_connect(settings, &mut out)?;
    tokio::time::timeout_at(deadline, async {
        stream.write_all(&out).await?;
        stream.flush().await
    })
    .await
    .map_err(timed("sending CONNECT"))?
    .map_err(|e| io_failure(e, alpn, tls, true))?;

    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        match decode(&mut buffer, settings.protocol, settings.max_incoming)
            .map_err(LinkFailure::Protocol)?
        {
            Some(Incoming::ConnAck { refusal, limits }) => {
                if let Some(refusal) = refusal {
                    return Err(LinkFailure::Refused(refusal));
                }
                return Ok((stream, limits, buffer));
            }
            Some(other) => {
                return Err(LinkFailure::Protocol(format!(
                    "expected CONNACK, got {}",
                    other.kind()
                )))
            }
            None => {}
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buffer))
            .await
            .map_err(timed("waiting for CONNACK"))?
            .map_err(|e| io_failure(e, alpn, tls, true))?;
        if read == 0 {
            return Err(LinkFailure::Closed {
                before_connack: true,
            });
        }
    }
}

async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, LinkFailure> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| LinkFailure::Resolve {
            host: host.to_string(),
            detail: e.to_string(),
        })?
        .collect();
    let mut last = LinkFailure::Resolve {
        host: host.to_string(),
        detail: "no addresses".to_string(),
    };
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => {
                // Small publishes and acknowledgements should not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => {
                last = LinkFailure::Unreachable {
                    address: address.to_string(),
                    detail: e.to_string(),
                }
            }
        }
    }
    Err(last)
}

/// The failure an I/O error stands for: a TLS error inside it (a handshake failure, or an
/// alert the upstream sent after the handshake, which is how TLS 1.3 servers refuse a client
/// certificate) becomes a [`TlsFailure`].
fn io_failure(error: io::Error, alpn: &[Vec<u8>], tls: bool, before_connack: bool) -> LinkFailure {
    if let Some(inner) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return LinkFailure::Tls(TlsFailure::from_rustls(inner, alpn));
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof if tls || before_connack => {
            LinkFailure::Closed { before_connack }
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe if before_connack => {
            LinkFailure::Closed { before_connack }
        }
        _ => LinkFailure::Io(error.to_string()),
    }
}

fn encode_connect(settings: &ConnectSettings, out: &mut BytesMut) -> Result<(), LinkFailure> {
    let keep_alive = u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX);
    let result = match settings.protocol {
        MqttVersion::V311 => v4::Packet::Connect(v4::Connect {
            protocol: rumqttc::mqttbytes::Protocol::V4,
            keep_alive,
            client_id: settings.client_id.clone(),
            clean_session: true,
            last_will: None,
            login: settings
                .login
                .as_ref()
                .map(|l| v4::Login::new(l.username.clone(), l.password.as_str())),
        })
        .write(out, MQTT_MAX_PACKET)
        .map_err(|e| e.to_string()),
        MqttVersion::V5 => {
            let properties = v5::ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: None,
                max_packet_size: u32::try_from(settings.max_incoming).ok(),
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: Vec::new(),
                authentication_method: None,
                authentication_data: None,
            };
            v5::Packet::Connect(
                v5::Connect {
                    keep_alive,
                    client_id: settings.client_id.clone(),
                    clean_start: true,
                    properties: Some(properties),
                },
                None,
                settings
                    .login
                    .as_ref()
                    .map(|l| v5::Login::new(l.username.clone(), l.password.as_str())),
            )
            .write(out, None)
            .map_err(|e| e.to_string())
        }
    };
    result
        .map(|_| ())
        .map_err(|e| LinkFailure::Protocol(format!("cannot encode CONNECT: {e}")))
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut buffer: BytesMut,
    protocol: MqttVersion,
    max_incoming: usize,
    events: &mpsc::UnboundedSender<LinkEvent>,
    internal: &mpsc::UnboundedSender<Internal>,
    ids: &Mutex<PacketIds>,
    alpn: &[Vec<u8>],
    tls: bool,
) -> Result<(), LinkFailure> {
    loop {
        while let Some(packet) =
            decode(&mut buffer, protocol, max_incoming).map_err(LinkFailure::Protocol)?
        {
            match packet {
                Incoming::PubAck { pkid, refusal } => {
                    lock(ids).release(pkid);
                    let _ = events.send(LinkEvent::PubAck { pkid, refusal });
                }
                Incoming::Publish {
                    topic,
                    payload,
                    qos,
                    pkid,
                } => {
                    match qos {
                        0 => {}
                        1 => {
                            let _ = internal.send(Internal::Ack(pkid));
                        }
                        // Control subscriptions are QoS 1: a broker may not send QoS 2 on them.
                        _ => {
                            return Err(LinkFailure::Protocol(
                                "a QoS 2 publish on a QoS 1 subscription".into(),
                            ))
                        }
                    }
                    let _ = events.send(LinkEvent::Incoming {
                        topic,
                        payload: payload.to_vec(),
                    });
                }
                Incoming::PingResp => {
                    let _ = internal.send(Internal::Pong);
                }
                Incoming::SubAck { pkid, refused } => {
                    lock(ids).release(pkid);
                    let _ = events.send(LinkEvent::Subscribed { pkid, refused });
                }
                Incoming::Disconnect { reason } => {
                    return Err(LinkFailure::Disconnected { reason });
                }
                other => {
                    return Err(LinkFailure::Protocol(format!(
                        "unexpected {} from the upstream",
                        other.kind()
                    )))
                }
            }
        }
        let read = reader
            .read_buf(&mut buffer)
            .await
            .map_err(|e| io_failure(e, alpn, tls, false))?;
        if read == 0 {
            return Err(LinkFailure::Closed {
                before_connack: false,
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    settings: &ConnectSettings,
    limits: ServerLimits,
    keep_alive: Duration,
    requests: &mut mpsc::Receiver<Request>,
    mut internal: mpsc::UnboundedReceiver<Internal>,
    events: &mpsc::UnboundedSender<LinkEvent>,
    ids: &Mutex<PacketIds>,
    alpn: &[Vec<u8>],
) -> Result<(), LinkFailure> {
    let tls = settings.tls.is_some();
    let secs = keep_alive.as_secs().max(1);
    let mut ping_outstanding = false;
    let mut pings = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            Some(message) = internal.recv() => {
                handle_internal(message, settings.protocol, &mut ping_outstanding, &mut out)?;
            }
            request = requests.recv() => match request {
                Some(request) => {
                    closing = handle_request(request, settings, limits, ids, &mut out, events)?;
                }
                None => closing = true,
            },
            _ = pings.tick() => {
                if ping_outstanding {
                    return Err(LinkFailure::PingTimeout { secs });
                }
                ping_outstanding = true;
                encode_ping(settings.protocol, &mut out)?;
            }
        }
        // Gather whatever else is ready into the same write.
        while !closing && out.len() < WRITE_BATCH_BYTES {
            if let Ok(message) = internal.try_recv() {
                handle_internal(message, settings.protocol, &mut ping_outstanding, &mut out)?;
            } else if let Ok(request) = requests.try_recv() {
                closing = handle_request(request, settings, limits, ids, &mut out, events)?;
            } else {
                break;
            }
        }
        if closing {
            encode_disconnect(settings.protocol, &mut out);
        }
        if !out.is_empty() {
            write_out(&mut writer, &out, keep_alive, alpn, tls).await?;
            out.clear();
        }
        if closing {
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
            return Ok(());
        }
    }
}

fn handle_internal(
    message: Internal,
    protocol: MqttVersion,
    ping_outstanding: &mut bool,
    out: &mut BytesMut,
) -> Result<(), LinkFailure> {
    match message {
        Internal::Ack(pkid) => encode_puback(protocol, pkid, out),
        Internal::Pong => {
            *ping_outstanding = false;
            Ok(())
        }
    }
}

/// Encodes one request; returns whether the connection is to close.
fn handle_request(
    request: Request,
    settings: &ConnectSettings,
    limits: ServerLimits,
    ids: &Mutex<PacketIds>,
    out: &mut BytesMut,
    events: &mpsc::UnboundedSender<LinkEvent>,
) -> Result<bool, LinkFailure> {
    match request {
        Request::Publish {
            topic,
            payload,
            pkid,
            msg_id,
            retain,
        } => {
            let encoded = encode_publish(
                settings.protocol,
                out,
                Outgoing {
                    pkid,
                    topic,
                    payload,
                    msg_id,
                    retain,
                },
                limits.max_packet_size,
            );
            if let (1.., Err(refusal)) = (pkid, encoded) {
                // Never sent: answer for the upstream, which would have refused it.
                lock(ids).release(pkid);
                let _ = events.send(LinkEvent::PubAck {
                    pkid,
                    refusal: Some(refusal),
                });
            }
            Ok(false)
        }
        Request::Subscribe(pkid, filters) => {
            // Its SUBACK gives the id back.
            encode_subscribe(settings.protocol, pkid, filters, out)?;
            Ok(false)
        }
        Request::Disconnect => Ok(true),
    }
}

/// Writes `bytes` in chunks, each within `stall` (a link that moves slowly is fine; one that
/// does not move at all is dead), then flushes.
async fn write_out<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    stall: Duration,
    alpn: &[Vec<u8>],
    tls: bool,
) -> Result<(), LinkFailure> {
    let secs = stall.as_secs().max(1);
    for chunk in bytes.chunks(WRITE_CHUNK_BYTES) {
        tokio::time::timeout(stall, writer.write_all(chunk))
            .await
            .map_err(|_| LinkFailure::WriteStalled { secs })?
            .map_err(|e| io_failure(e, alpn, tls, false))?;
    }
    tokio::time::timeout(stall, writer.flush())
        .await
        .map_err(|_| LinkFailure::WriteStalled { secs })?
        .map_err(|e| io_failure(e, alpn, tls, false))
}

/// The packet ids, however a holder of the lock ended (their state is whole after each call).
fn lock(ids: &Mutex<PacketIds>) -> std::sync::MutexGuard<'_, PacketIds> {
    ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Packet ids in use (QoS 1 publishes awaiting PUBACK), so that none is reused too early.
#[derive(Default)]
pub(crate) struct PacketIds {
    last: u16,
    in_use: HashSet<u16>,
}

impl PacketIds {
    /// The next free id after the last one given (1 to 65,535), or `None` when all are in use.
    fn next(&mut self) -> Option<u16> {
        if self.in_use.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last = if self.last == u16::MAX {
                1
            } else {
                self.last + 1
            };
            if self.in_use.insert(self.last) {
                return Some(self.last);
            }
        }
    }

    fn release(&mut self, pkid: u16) {
        self.in_use.remove(&pkid);
    }
}

/// A publish to encode: QoS 1 under `pkid`, QoS 0 when it is 0.
struct Outgoing {
    pkid: u16,
    topic: String,
    payload: Vec<u8>,
    msg_id: Option<String>,
    retain: bool,
}

/// Encodes a publish; `Err` (nothing written) when the upstream would not take it: too large
/// for its Maximum Packet Size, or not encodable.
fn encode_publish(
    protocol: MqttVersion,
    out: &mut BytesMut,
    publish: Outgoing,
    max_packet: Option<u32>,
) -> Result<(), String> {
    let Outgoing {
        pkid,
        topic,
        payload,
        msg_id,
        retain,
    } = publish;
    let qos = if pkid == 0 { 0 } else { 1 };
    let written = match protocol {
        MqttVersion::V311 => {
            let mut publish = v4::Publish::new(topic, qos_v4(qos), payload);
            publish.pkid = pkid;
            publish.retain = retain;
            v4::Packet::Publish(publish)
                .write(out, MQTT_MAX_PACKET)
                .map_err(|e| e.to_string())
        }
        MqttVersion::V5 => {
            let properties = msg_id.map(|id| v5::PublishProperties {
                user_properties: vec![(super::MSG_ID_PROPERTY.to_string(), id)],
                ..v5::PublishProperties::default()
            });
            let mut publish =
                v5::Publish::new(topic, qos_v5(qos), Bytes::from(payload), properties);
            publish.pkid = pkid;
            publish.retain = retain;
            let packet = v5::Packet::Publish(publish);
            let limit = max_packet.unwrap_or(MQTT_MAX_PACKET as u32);
            if packet.size() > limit as usize {
                return Err(format!(
                    "{} bytes, more than the upstream's maximum packet size of {limit}",
                    packet.size()
                ));
            }
            packet.write(out, None).map_err(|e| e.to_string())
        }
    };
    written.map(|_| ())
}

fn qos_v4(qos: u8) -> rumqttc::mqttbytes::QoS {
    if qos == 0 {
        rumqttc::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::mqttbytes::QoS::AtLeastOnce
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    if qos == 0 {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce
    } else {
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce
    }
}

fn encode_subscribe(
    protocol: MqttVersion,
    pkid: u16,
    filters: Vec<String>,
    out: &mut BytesMut,
) -> Result<(), LinkFailure> {
    let result = match protocol {
        MqttVersion::V311 => {
            let mut subscribe = v4::Subscribe::new_many(
                filters
                    .into_iter()
                    .map(|f| v4::SubscribeFilter::new(f, qos_v4(1))),
            );
            subscribe.pkid = pkid;
            v4::Packet::Subscribe(subscribe)
                .write(out, MQTT_MAX_PACKET)
                .map_err(|e| e.to_string())
        }
        MqttVersion::V5 => {
            let mut subscribe = v5::Subscribe::new_many(
                filters.into_iter().map(|f| v5::Filter::new(f, qos_v5(1))),
                None,
            );
            subscribe.pkid = pkid;
            v5::Packet::Subscribe(subscribe)
                .write(out, None)
                .map_err(|e| e.to_string())
        }
    };
    result
        .map(|_| ())
        .map_err(|e| LinkFailure::Protocol(format!("cannot encode SUBSCRIBE: {e}")))
}

fn encode_puback(protocol: MqttVersion, pkid: u16, out: &mut BytesMut) -> Result<(), LinkFailure> {
    let result = match protocol {
        MqttVersion::V311 => v4::Packet::PubAck(v4::PubAck::new(pkid))
            .write(out, MQTT_MAX_PACKET)
            .map_err(|e| e.to_string()),
        MqttVersion::V5 => v5::Packet::PubAck(v5::PubAck::new(pkid, None))
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    result
        .map(|_| ())
        .map_err(|e| LinkFailure::Protocol(format!("cannot encode PUBACK: {e}")))
}

fn encode_ping(protocol: MqttVersion, out: &mut BytesMut) -> Result<(), LinkFailure> {
    let result = match protocol {
        MqttVersion::V311 => v4::Packet::PingReq
            .write(out, MQTT_MAX_PACKET)
            .map_err(|e| e.to_string()),
        MqttVersion::V5 => v5::Packet::PingReq(v5::PingReq)
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    result
        .map(|_| ())
        .map_err(|e| LinkFailure::Protocol(format!("cannot encode PINGREQ: {e}")))
}

fn encode_disconnect(_protocol: MqttVersion, out: &mut BytesMut) {
    // DISCONNECT with remaining length 0: valid in 3.1.1 and, as "normal disconnection", in 5.
    out.extend_from_slice(&[0xe0, 0x00]);
}

/// A packet from the upstream, as far as the uplink cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// CONNACK: accepted (`refusal` empty) with the upstream's limits, or refused.
    ConnAck {
        /// Why it refused, if it did.
        refusal: Option<ConnectRefusal>,
        /// What it said about itself.
        limits: ServerLimits,
    },
    /// PUBACK for a packet id; `refusal` when MQTT 5's reason code is 0x80 or above.
    PubAck {
        /// The packet id.
        pkid: u16,
        /// The reason code (and reason string) of a refusal.
        refusal: Option<String>,
    },
    /// A publish on a control subscription.
    Publish {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
        /// Its QoS (0, 1 or 2).
        qos: u8,
        /// Its packet id (0 for QoS 0).
        pkid: u16,
    },
    /// SUBACK; `refused` counts the filters it refused.
    SubAck {
        /// The SUBSCRIBE's packet id.
        pkid: u16,
        /// How many filters were refused.
        refused: usize,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT, with the MQTT 5 reason if any.
    Disconnect {
        /// Reason code and string.
        reason: Option<String>,
    },
    /// A packet the upstream has no business sending to this client (named).
    Unexpected(&'static str),
}

impl Incoming {
    /// The packet type's name as the MQTT specification spells it (`CONNACK`, `PUBACK`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Incoming::ConnAck { .. } => "CONNACK",
            Incoming::PubAck { .. } => "PUBACK",
            Incoming::Publish { .. } => "PUBLISH",
            Incoming::SubAck { .. } => "SUBACK",
            Incoming::PingResp => "PINGRESP",
            Incoming::Disconnect { .. } => "DISCONNECT",
            Incoming::Unexpected(kind) => kind,
        }
    }
}

/// Takes the next complete packet off the front of `buffer`: `Ok(None)` when more bytes are
/// needed, `Err` (with the reason) for a malformed or oversized packet. Never panics, whatever
/// the bytes; rumqttc's decoders are called behind a guard, since an upstream's bytes are as
/// hostile as anyone's.
pub fn decode(
    buffer: &mut BytesMut,
    protocol: MqttVersion,
    max_incoming: usize,
) -> Result<Option<Incoming>, String> {
    if buffer.is_empty() {
        return Ok(None);
    }
    // MQTT 5 allows DISCONNECT with remaining length 0 (normal disconnection), which rumqttc's
    // v5 decoder refuses.
    if protocol == MqttVersion::V5 && buffer.len() >= 2 && buffer[0] == 0xe0 && buffer[1] == 0 {
        let _ = buffer.split_to(2);
        return Ok(Some(Incoming::Disconnect { reason: None }));
    }
    let before = buffer.clone();
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match protocol {
        MqttVersion::V311 => decode_v4(buffer, max_incoming),
        MqttVersion::V5 => decode_v5(buffer, max_incoming),
    }));
    match decoded {
        // rumqttc says "insufficient bytes" both for an incomplete packet (nothing taken) and
        // for a complete one whose contents run past its length (the packet already taken off
        // the buffer): the second is malformed, and reading on would desynchronise the stream.
        Ok(Ok(None)) if buffer.len() != before.len() => Err(decode_error(
            "its contents are longer than its remaining length".to_string(),
        )),
        Ok(result) => result,
        Err(_) => {
            *buffer = before;
            Err("a packet the decoder cannot read".to_string())
        }
    }
}

fn decode_v4(buffer: &mut BytesMut, max: usize) -> Result<Option<Incoming>, String> {
    use rumqttc::mqttbytes::Error;
    let packet = match v4::Packet::read(buffer, max) {
        Ok(packet) => packet,
        Err(Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(decode_error(e.to_string())),
    };
    Ok(Some(match packet {
        v4::Packet::ConnAck(ack) => Incoming::ConnAck {
            refusal: match ack.code {
                v4::ConnectReturnCode::Success => None,
                v4::ConnectReturnCode::BadUserNamePassword => Some(ConnectRefusal::BadCredentials),
                v4::ConnectReturnCode::NotAuthorized => Some(ConnectRefusal::NotAuthorized),
                other => Some(ConnectRefusal::Other(format!("{other:?}"))),
            },
            limits: ServerLimits::default(),
        },
        v4::Packet::PubAck(ack) => Incoming::PubAck {
            pkid: ack.pkid,
            refusal: None,
        },
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v4::Packet::SubAck(ack) => Incoming::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .filter(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                .count(),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect { reason: None },
        v4::Packet::Connect(_) => Incoming::Unexpected("CONNECT"),
        v4::Packet::PubRec(_) => Incoming::Unexpected("PUBREC"),
        v4::Packet::PubRel(_) => Incoming::Unexpected("PUBREL"),
        v4::Packet::PubComp(_) => Incoming::Unexpected("PUBCOMP"),
        v4::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v4::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v4::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v4::Packet::PingReq => Incoming::Unexpected("PINGREQ"),
    }))
}

fn decode_v5(buffer: &mut BytesMut, max: usize) -> Result<Option<Incoming>, String> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code, PubAckReason};
    use rumqttc::v5::mqttbytes::Error;
    let packet = match v5::Packet::read(buffer, u32::try_from(max).ok()) {
        Ok(packet) => packet,
        Err(Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(decode_error(e.to_string())),
    };
    Ok(Some(match packet {
        v5::Packet::ConnAck(ack) => {
            let refusal = match ack.code {
                Code::Success => None,
                Code::BadUserNamePassword => Some(ConnectRefusal::BadCredentials),
                Code::NotAuthorized | Code::Banned => Some(ConnectRefusal::NotAuthorized),
                other => {
                    let detail = ack
                        .properties
                        .as_ref()
                        .and_then(|p| p.reason_string.clone())
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default();
                    Some(ConnectRefusal::Other(format!("{other:?}{detail}")))
                }
            };
            let limits = match &ack.properties {
                Some(p) => ServerLimits {
                    // 0 is a protocol error; treat it as "nothing said" rather than stall.
                    receive_maximum: p.receive_max.filter(|&m| m > 0).unwrap_or(u16::MAX),
                    max_packet_size: p.max_packet_size.filter(|&m| m > 0),
                    keep_alive_secs: p.server_keep_alive,
                },
                None => ServerLimits::default(),
            };
            Incoming::ConnAck { refusal, limits }
        }
        v5::Packet::PubAck(ack) => Incoming::PubAck {
            pkid: ack.pkid,
            refusal: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => {
                    let detail = ack
                        .properties
                        .and_then(|p| p.reason_string)
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default();
                    Some(format!("{other:?}{detail}"))
                }
            },
        },
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: p.qos as u8,
            pkid: p.pkid,
        },
        v5::Packet::SubAck(ack) => Incoming::SubAck {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .count(),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            reason: Some(format!(
                "{:?}{}",
                d.reason_code,
                d.properties
                    .and_then(|p| p.reason_string)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            )),
        },
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
        v5::Packet::Connect(..) => Incoming::Unexpected("CONNECT"),
        v5::Packet::PubRec(_) => Incoming::Unexpected("PUBREC"),
        v5::Packet::PubRel(_) => Incoming::Unexpected("PUBREL"),
        v5::Packet::PubComp(_) => Incoming::Unexpected("PUBCOMP"),
        v5::Packet::Subscribe(_) => Incoming::Unexpected("SUBSCRIBE"),
        v5::Packet::Unsubscribe(_) => Incoming::Unexpected("UNSUBSCRIBE"),
        v5::Packet::UnsubAck(_) => Incoming::Unexpected("UNSUBACK"),
        v5::Packet::PingReq(_) => Incoming::Unexpected("PINGREQ"),
    }))
}

fn decode_error(detail: String) -> String {
    format!("malformed packet from the upstream: {detail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_v4(packet: v4::Packet) -> BytesMut {
        let mut out = BytesMut::new();
        packet.write(&mut out, MQTT_MAX_PACKET).unwrap();
        out
    }

    fn encoded_v5(packet: v5::Packet) -> BytesMut {
        let mut out = BytesMut::new();
        packet.write(&mut out, None).unwrap();
        out
    }

    #[test]
    fn connack_refusals_name_their_cause() {
        let cases = [
            (v4::ConnectReturnCode::Success, None),
            (
                v4::ConnectReturnCode::BadUserNamePassword,
                Some("bad-credentials"),
            ),
            (v4::ConnectReturnCode::NotAuthorized, Some("not-authorized")),
            (
                v4::ConnectReturnCode::ServiceUnavailable,
                Some("connect-refused"),
            ),
        ];
        for (code, cause) in cases {
            let mut bytes = encoded_v4(v4::Packet::ConnAck(v4::ConnAck::new(code, false)));
            match decode(&mut bytes, MqttVersion::V311, 1024) {
                Ok(Some(Incoming::ConnAck { refusal, .. })) => {
                    assert_eq!(refusal.as_ref().map(|r| r.cause()), cause)
                }
                other => panic!("{other:?}"),
            }
            assert!(bytes.is_empty());
        }
        let mut ack = v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::BadUserNamePassword,
            properties: None,
        };
        let mut bytes = encoded_v5(v5::Packet::ConnAck(ack.clone()));
        assert!(matches!(
            decode(&mut bytes, MqttVersion::V5, 1024),
            Ok(Some(Incoming::ConnAck {
                refusal: Some(ConnectRefusal::BadCredentials),
                ..
            }))
        ));
        ack.code = v5::ConnectReturnCode::NotAuthorized;
        let mut bytes = encoded_v5(v5::Packet::ConnAck(ack));
        assert!(matches!(
            decode(&mut bytes, MqttVersion::V5, 1024),
            Ok(Some(Incoming::ConnAck {
                refusal: Some(ConnectRefusal::NotAuthorized),
                ..
            }))
        ));
    }

    #[test]
    fn mqtt5_connack_limits_are_read() {
        let properties = v5::ConnAckProperties {
            session_expiry_interval: None,
            receive_max: Some(20),
            max_qos: None,
            retain_available: None,
            max_packet_size: Some(4096),
            assigned_client_identifier: None,
            topic_alias_max: None,
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive: Some(7),
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        };
        let mut bytes = encoded_v5(v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: Some(properties),
        }));
        assert_eq!(
            decode(&mut bytes, MqttVersion::V5, 1024),
            Ok(Some(Incoming::ConnAck {
                refusal: None,
                limits: ServerLimits {
                    receive_maximum: 20,
                    max_packet_size: Some(4096),
                    keep_alive_secs: Some(7),
                }
            }))
        );
    }

    #[test]
    fn partial_packets_wait_and_oversized_ones_fail() {
        let full = encoded_v4(v4::Packet::PubAck(v4::PubAck::new(9)));
        let mut part = BytesMut::from(&full[..full.len() - 1]);
        assert_eq!(decode(&mut part, MqttVersion::V311, 1024), Ok(None));
        part.extend_from_slice(&full[full.len() - 1..]);
        assert_eq!(
            decode(&mut part, MqttVersion::V311, 1024),
            Ok(Some(Incoming::PubAck {
                pkid: 9,
                refusal: None
            }))
        );
        let mut big = encoded_v4(v4::Packet::Publish(v4::Publish::new(
            "t",
            rumqttc::mqttbytes::QoS::AtMostOnce,
            vec![0u8; 2000],
        )));
        assert!(decode(&mut big, MqttVersion::V311, 1024).is_err());
    }

    /// Found by tests/fuzz.rs (uplink_packets): a complete packet whose properties run past its
    /// remaining length is malformed, not "wait for more bytes" (which had silently skipped
    /// it and read on from the next byte).
    #[test]
    fn a_packet_whose_contents_overrun_its_length_is_malformed() {
        // CONNACK, remaining length 3, properties length 0xf6 (a varint that never ends).
        let mut bytes = BytesMut::from(&[0x20u8, 0x03, 0x00, 0x00, 0xf6, 0x40, 0x02, 0, 1][..]);
        let error = decode(&mut bytes, MqttVersion::V5, 1024).unwrap_err();
        assert!(
            error.contains("longer than its remaining length"),
            "{error}"
        );
    }

    #[test]
    fn mqtt5_bare_disconnect_is_a_disconnect() {
        let mut bytes = BytesMut::from(&[0xe0u8, 0x00][..]);
        assert_eq!(
            decode(&mut bytes, MqttVersion::V5, 1024),
            Ok(Some(Incoming::Disconnect { reason: None }))
        );
        assert!(bytes.is_empty());
    }

    #[test]
    fn mqtt5_puback_refusals_are_not_acknowledgements() {
        for (reason, refused) in [
            (v5::PubAckReason::Success, false),
            (v5::PubAckReason::NoMatchingSubscribers, false),
            (v5::PubAckReason::QuotaExceeded, true),
            (v5::PubAckReason::NotAuthorized, true),
        ] {
            let mut ack = v5::PubAck::new(3, None);
            ack.reason = reason;
            let mut bytes = encoded_v5(v5::Packet::PubAck(ack));
            match decode(&mut bytes, MqttVersion::V5, 1024) {
                Ok(Some(Incoming::PubAck { pkid: 3, refusal })) => {
                    assert_eq!(refusal.is_some(), refused)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap() {
        let mut ids = PacketIds::default();
        assert_eq!(ids.next(), Some(1));
        assert_eq!(ids.next(), Some(2));
        ids.release(1);
        ids.last = u16::MAX - 1;
        assert_eq!(ids.next(), Some(u16::MAX));
        // 1 was released, 2 is still in flight.
        assert_eq!(ids.next(), Some(1));
        assert_eq!(ids.next(), Some(3));
        let mut full = PacketIds::default();
        for _ in 0..u16::MAX {
            assert!(full.next().is_some());
        }
        assert_eq!(full.next(), None);
        full.release(77);
        assert_eq!(full.next(), Some(77));
    }

    #[test]
    fn oversized_publishes_are_refused_before_sending() {
        let mut out = BytesMut::new();
        let outgoing = |size: usize, retain: bool| Outgoing {
            pkid: 5,
            topic: "t".into(),
            payload: vec![0; size],
            msg_id: Some("id".into()),
            retain,
        };
        let refused = encode_publish(MqttVersion::V5, &mut out, outgoing(100, false), Some(64));
        assert!(refused.unwrap_err().contains("maximum packet size of 64"));
        assert!(out.is_empty());
        encode_publish(MqttVersion::V5, &mut out, outgoing(10, false), Some(64)).unwrap();
        assert!(matches!(
            decode_v5(&mut out, 1024),
            Ok(Some(Incoming::Publish {
                pkid: 5,
                qos: 1,
                ..
            }))
        ));
    }

    #[test]
    fn the_retain_flag_is_encoded_on_both_versions() {
        for protocol in [MqttVersion::V311, MqttVersion::V5] {
            for retain in [false, true] {
                let mut out = BytesMut::new();
                let publish = Outgoing {
                    pkid: 3,
                    topic: "t".into(),
                    payload: b"p".to_vec(),
                    msg_id: None,
                    retain,
                };
                encode_publish(protocol, &mut out, publish, None).unwrap();
                // The fixed header's lowest bit is RETAIN.
                assert_eq!(out[0] & 0x01 == 0x01, retain, "{protocol:?}");
            }
        }
    }

    #[test]
    fn tls_errors_become_operator_causes() {
        use rustls::{AlertDescription, CertificateError, Error};
        let alpn = vec![b"x-amzn-mqtt-ca".to_vec()];
        let cases: Vec<(Error, &str)> = vec![
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "tls-unknown-ca",
            ),
            (
                Error::InvalidCertificate(CertificateError::Expired),
                "tls-expired",
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidYet),
                "tls-not-yet-valid",
            ),
            (
                Error::InvalidCertificate(CertificateError::NotValidForName),
                "tls-wrong-host",
            ),
            (
                Error::AlertReceived(AlertDescription::CertificateRequired),
                "tls-client-certificate-refused",
            ),
            (
                Error::AlertReceived(AlertDescription::UnknownCA),
                "tls-client-certificate-refused",
            ),
            (
                Error::AlertReceived(AlertDescription::NoApplicationProtocol),
                "tls-no-common-alpn",
            ),
            (
                Error::AlertReceived(AlertDescription::DecodeError),
                "tls-other",
            ),
        ];
        for (error, cause) in cases {
            let failure = TlsFailure::from_rustls(&error, &alpn);
            assert_eq!(failure.cause(), cause, "{error:?}");
            // The same error inside an io::Error, as tokio-rustls hands it over.
            let wrapped = io::Error::new(io::ErrorKind::InvalidData, error);
            assert_eq!(io_failure(wrapped, &alpn, true, false).cause(), cause);
        }
        let alpn_failure = TlsFailure::from_rustls(
            &Error::AlertReceived(AlertDescription::NoApplicationProtocol),
            &alpn,
        );
        assert!(alpn_failure.to_string().contains("x-amzn-mqtt-ca"));
    }
}
