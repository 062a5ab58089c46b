//! The connection front: outpost's listener for devices. It reads every packet a device
//! sends, checks it, journals its publishes, and serves the device's session on the
//! in-process [`Broker`].
//!
//! For every device connection:
//! - on a TLS listener ([`super::tls`]), the TLS handshake comes first, within the connect
//!   timeout; one that fails (not TLS, a refused client certificate, too slow) closes the
//!   connection and is counted (`edge_tls_handshakes_failed`).
//! - the CONNECT is read in full and checked ([`super::connect`]) within the connect timeout;
//!   the connection then attaches to its session on the broker (CONNACK with Session Present,
//!   and on MQTT 5 an assigned client id, the granted expiry, the broker's Receive Maximum,
//!   Topic Alias Maximum and Maximum Packet Size).
//! - each PUBLISH is appended to the [`Journal`] and handed to the broker (local subscribers
//!   get it at once); its PUBACK (QoS 1) or PUBREC (QoS 2) is sent only after the journal
//!   commit that contains it, in the order the publishes came. A device therefore never holds
//!   an acknowledgement for a publish that a crash or power cut could lose. A QoS 2 publish
//!   sent again before its PUBREL is neither journaled nor delivered twice.
//! - the packets the broker has for the session (deliveries, PUBRELs, retained messages) are
//!   written as the device reads them; SUBSCRIBE, UNSUBSCRIBE, PINGREQ and DISCONNECT are
//!   answered here; a connection whose session another connection took over is closed (MQTT
//!   5: DISCONNECT 0x8E); one that sends nothing for 1.5 times its keep-alive is closed.
//! - the front's own rules ([`super::checks`]) come first: a packet type a client may not send,
//!   invalid fixed-header flags, a publish topic with wildcards, an invalid topic filter or a
//!   topic alias out of range closes the connection (on MQTT 5 after a DISCONNECT with the
//!   reason code); a CONNECT with one of the gateway's reserved client ids is refused with a
//!   CONNACK (0x02 on 3.1.1, 0x85 on 5); a connection over `broker.max_connections` is refused
//!   with a CONNACK (0x03 on 3.1.1, 0x97 on 5). Mosquitto 2 closes the connection in the same
//!   cases.
//!
//! This is the one place where every packet of every device passes: per-packet decisions
//! (authorization, per-client limits) belong in [`Session::handle`].
//!
//! Guarantees: a malformed, oversized or forbidden packet closes that connection (logged and
//! counted) and affects nothing else; no input panics; one that sends no CONNECT within the
//! connect timeout is closed; at most `broker.max_connections` device connections are served
//! at once; a connection that ends, however, detaches from its session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot::error::RecvError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::auth::{Authenticator, Identity};
use super::broker::{self, Attach, Broker, ClientAck, Connection, Owner};
use super::checks::{self, reason, return_code};
use super::connect::{self, ConnectInfo};
use super::frame::{self, kind, Frame, FrameError, Version};
use super::packets::{self, ConnAckProperties};
use super::sessions::{self, Ending, Expiry};
use super::sources;
use super::tls::{CertificateLogin, DeviceTls};
use super::DevicePublish;
use crate::journal::{Committed, Journal};
use crate::metrics::Metrics;
use crate::store::NewJournalEntry;
use end::{connack_refusal, Closing, End, LoginRefusal, Lost, Refusal, Violation};
use events::{InternalEvent, PublishRefusal};

mod end;
mod events;

/// The target of the front's log lines (its events log under it too, as they always did).
const LOG_TARGET: &str = module_path!();

/// Bytes of MQTT framing allowed on top of the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// The Topic Alias Maximum the embedded broker announces to MQTT 5 clients.
const TOPIC_ALIAS_MAX: u16 = 4096;

/// Most bytes of topics one connection may keep behind topic aliases (a hostile client could
/// otherwise park 4,096 topics of 64 KiB each).
const MAX_ALIAS_BYTES: usize = 1024 * 1024;

/// Connections over the limit that are answered at the same time; beyond that a refused
/// connection is closed without an answer.
pub const MAX_REFUSING: usize = 64;

/// Bytes of packets for the device gathered into one write.
const WRITE_BATCH: usize = 64 * 1024;

/// A connection's buffers start this small: most devices send a packet now and then, and a
/// thousand idle connections should cost little memory.
const INITIAL_BUFFER: usize = 1024;

/// Room made in the input buffer before a read once a read filled all the room it had (the
/// device sends a lot), so that it is read in large pieces.
const READ_CHUNK: usize = 16 * 1024;

/// How long one write to a device may stall before the connection is given up (a device
/// that stops reading must not hold its session's connection for ever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where device publishes go, besides the broker's subscribers.
#[derive(Clone)]
pub enum Sink {
    /// The gateway's journal: acknowledged once durable.
    Journal(Journal),
    /// A channel (the demo's and the benchmark's stand-in upstream): acknowledged once taken.
    Tap(mpsc::Sender<DevicePublish>),
}

/// Who is on the other side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A device on a listener: every check applies, publishes go to the [`Sink`].
    Device,
    /// The gateway itself (the local link, in process): may use reserved client ids; its
    /// publishes are outputs already durable in the outbox, so they only reach subscribers.
    Gateway,
}

/// Everything every connection of the device listeners shares.
#[derive(Clone)]
pub struct Front {
    /// The sessions, subscriptions and retained messages.
    pub broker: Arc<Broker>,
    /// Where device publishes become durable (`None` for a front that serves only the
    /// gateway's own connections).
    pub sink: Option<Sink>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Largest accepted publish payload.
    pub max_payload: usize,
    /// The Receive Maximum announced to MQTT 5 clients and enforced on them
    /// (`broker.max_inflight`).
    pub max_inflight: u16,
    /// One permit per device connection allowed (`broker.max_connections`), shared by every
    /// listener of the gateway.
    pub slots: Arc<Semaphore>,
    /// Permits for answering connections over the limit ([`MAX_REFUSING`]).
    pub refusing: Arc<Semaphore>,
    /// How long a connection may take to send its CONNECT (`broker.connect_timeout_ms`).
    pub connect_timeout: Duration,
    /// The longest keep-alive an MQTT 5 client may use (`broker.max_keepalive_secs`; 0: any).
    pub max_keepalive: u16,
    /// Publishes refused so far (their warning is rate-limited).
    pub refused_publishes: Arc<AtomicU64>,
    /// Whether devices are refused the gateway's reserved client ids (a gateway's own
    /// broker); a stand-in upstream lets gateways connect with theirs.
    pub reserve_client_ids: bool,
    /// Who may connect (the gateway's own connections are not asked).
    pub auth: Authenticator,
    /// Logins refused so far (their log line is rate-limited).
    pub refused_logins: Arc<AtomicU64>,
    /// Connections refused for breaking a rule so far (their log line is rate-limited).
    pub refused_connections: Arc<AtomicU64>,
    /// Connections and new connections per second from one address
    /// (`broker.max_connections_per_source`, `broker.max_connection_rate_per_source`).
    pub sources: Arc<SourceLimits>,
    /// Whether a device's client id must be its username (`broker.require_client_id_match`):
    /// no device can then take over another's session.
    pub require_client_id_match: bool,
}

/// What one listener counts to rate-limit its warnings.
#[derive(Debug, Default)]
struct ServeCounters {
    /// Connections refused at `broker.max_connections`.
    refusals: AtomicU64,
    /// TLS handshakes that failed.
    failed_handshakes: AtomicU64,
}

/// The per-source limits of every device listener together ([`sources`]).
#[derive(Debug)]
pub struct SourceLimits {
    sources: std::sync::Mutex<sources::Sources>,
    on: bool,
    started: std::time::Instant,
}

/// A connection admitted by [`SourceLimits`]: its source's count goes down when it is
/// dropped.
struct Admitted {
    limits: Arc<SourceLimits>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits.lock().release(self.ip);
    }
}

impl SourceLimits {
    /// These limits (both 0: none).
    pub fn new(limits: sources::Limits) -> Arc<SourceLimits> {
        Arc::new(SourceLimits {
            on: limits.any(),
            sources: std::sync::Mutex::new(sources::Sources::new(limits)),
            started: std::time::Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, sources::Sources> {
        // The sources' bookkeeping keeps its invariants on every return path.
        self.sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a connection from `ip`, or says why not (and whether that is the first refusal
    /// of `ip` to report).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Admitted>, (sources::Refused, bool)> {
        if !self.on {
            return Ok(None);
        }
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.lock().admit(ip, now_ms)?;
        Ok(Some(Admitted {
            limits: self.clone(),
            ip,
        }))
    }
}

impl Front {
    /// Accepts device connections until the task running this is aborted, which also closes
    /// every connection it accepted. Each connection is admitted by its source's limits, then
    /// takes its slot; on a TLS listener (`tls`) its TLS handshake follows (a failed one is
    /// counted and closes it), and it is served over TLS.
    pub async fn serve(self, listener: TcpListener, tls: Option<DeviceTls>) {
        let mut connections = tokio::task::JoinSet::new();
        let counters = Arc::new(ServeCounters::default());
        loop {
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((socket, peer)) => {
                    self.accepted(socket, peer, &tls, &counters, &mut connections);
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a device connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One accepted connection: admitted by its source's limits and given a slot, or refused
    /// (counted, logged, and answered with the protocol's code).
    fn accepted(
        &self,
        socket: TcpStream,
        peer: SocketAddr,
        tls: &Option<DeviceTls>,
        counters: &Arc<ServeCounters>,
        connections: &mut tokio::task::JoinSet<()>,
    ) {
        let source = match self.sources.admit(peer.ip()) {
            Ok(source) => source,
            Err((why, first)) => {
                let code = match why {
                    sources::Refused::TooMany => reason::QUOTA_EXCEEDED,
                    sources::Refused::TooFast => reason::CONNECTION_RATE_EXCEEDED,
                };
                let source = peer.ip();
                events::SourceRefused { source, why, first }.emit(&self.metrics);
                self.refuse(socket, peer, tls, counters, code, connections);
                return;
            }
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let seen = &counters.refusals;
            events::ConnectionLimitReached { peer, seen }.emit(&self.metrics);
            self.refuse(
                socket,
                peer,
                tls,
                counters,
                reason::QUOTA_EXCEEDED,
                connections,
            );
            return;
        };
        let (front, tls, counters) = (self.clone(), tls.clone(), counters.clone());
        connections.spawn(async move {
            let _source = source;
            let _ = socket.set_nodelay(true);
            let served = match tls {
                None => {
                    front
                        .connection(socket, Some(slot), Origin::Device, None)
                        .await
                }
                Some(tls) => {
                    let Some((stream, login)) = front
                        .handshake(&tls, socket, peer, &counters.failed_handshakes)
                        .await
                    else {
                        return;
                    };
                    front
                        .connection(stream, Some(slot), Origin::Device, login)
                        .await
                }
            };
            if let Err(end) = served {
                debug!(%peer, %end, "device connection closed");
            }
        });
    }

    /// Answers a refused connection (after its TLS handshake, on a TLS listener) with CONNACK
    /// "server unavailable" (3.1.1) or `v5_code` (5), while fewer than [`MAX_REFUSING`] are
    /// being answered; beyond that it is just closed.
    fn refuse(
        &self,
        socket: TcpStream,
        peer: SocketAddr,
        tls: &Option<DeviceTls>,
        counters: &Arc<ServeCounters>,
        v5_code: u8,
        connections: &mut tokio::task::JoinSet<()>,
    ) {
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let (front, tls, counters) = (self.clone(), tls.clone(), counters.clone());
        connections.spawn(async move {
            match tls {
                None => front.refuse_busy(socket, v5_code).await,
                Some(tls) => {
                    if let Some((stream, _)) = front
                        .handshake(&tls, socket, peer, &counters.failed_handshakes)
                        .await
                    {
                        front.refuse_busy(stream, v5_code).await;
                    }
                }
            }
            drop(permit);
        });
    }

    /// A TLS listener's handshake (within its deadline); a failure is counted and logged, the
    /// first and then once per 1,000 (`failed` counts them).
    async fn handshake(
        &self,
        tls: &DeviceTls,
        socket: TcpStream,
        peer: std::net::SocketAddr,
        failed: &AtomicU64,
    ) -> Option<(
        tokio_rustls::server::TlsStream<TcpStream>,
        Option<CertificateLogin>,
    )> {
        match tls.handshake(socket).await {
            Ok(done) => Some(done),
            Err(error) => {
                let (error, seen) = (&error, failed);
                events::HandshakeFailed { peer, error, seen }.emit(&self.metrics);
                None
            }
        }
    }

    /// Answers a connection over a limit: reads its CONNECT (within the connect timeout) and
    /// refuses it with "server unavailable" (3.1.1) or `v5_code` (5).
    async fn refuse_busy<S: AsyncRead + AsyncWrite + Unpin>(self, mut device: S, v5_code: u8) {
        let mut input = BytesMut::with_capacity(1024);
        let answered = tokio::time::timeout(self.connect_timeout, async {
            loop {
                match frame::next_frame(&input, self.max_payload + PACKET_OVERHEAD) {
                    Ok(Some(frame)) => {
                        let version = connect::parse_connect(&frame, &input).ok()?.version;
                        let code = match version {
                            Version::V4 => return_code::SERVER_UNAVAILABLE,
                            Version::V5 => v5_code,
                        };
                        return Some(connack_refusal(version, code));
                    }
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match device.read_buf(&mut input).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if let Ok(Some(answer)) = answered {
            let _ = device.write_all(&answer).await;
        }
    }

    /// Serves the gateway's own connection to its broker (the local link), in process.
    pub fn serve_gateway(&self, stream: tokio::io::DuplexStream) {
        let front = self.clone();
        tokio::spawn(async move {
            if let Err(end) = front.connection(stream, None, Origin::Gateway, None).await {
                debug!(%end, "gateway's own broker connection closed");
            }
        });
    }

    /// Serves one connection; `certificate` is who its client certificate says it is, on a
    /// TLS listener with `use_identity_as_username`.
    async fn connection<S>(
        self,
        stream: S,
        slot: Option<OwnedSemaphorePermit>,
        origin: Origin,
        certificate: Option<CertificateLogin>,
    ) -> Result<(), End>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut session = Session {
            front: self.clone(),
            origin,
            version: Version::V4,
            aliases: HashMap::new(),
            alias_bytes: 0,
            qos2_open: HashSet::new(),
            acks: VecDeque::new(),
            expiry_zero: true,
            connected: false,
            keep_alive: 0,
            username: None,
            certificate,
        };
        let mut input = BytesMut::with_capacity(INITIAL_BUFFER);
        let connect = tokio::time::timeout(self.connect_timeout, async {
            let info = session.read_connect(&mut reader, &mut input).await?;
            session.log_in(&info).await?;
            Ok(info)
        })
        .await
        .unwrap_or_else(|_| Err(End::Lost(Lost::NoConnect)));
        let attached = connect.and_then(|info| session.attach(&info));
        let (connection, connack) = match attached {
            Ok(attached) => attached,
            Err(end) => {
                self.answer(&end, &mut writer).await;
                return Err(end);
            }
        };
        let result = match write_within(&mut writer, &connack).await {
            Ok(()) => {
                session
                    .run(&connection, &mut reader, &mut writer, input)
                    .await
            }
            Err(end) => Err(end),
        };
        match result {
            Ok((ending, expiry)) => {
                connection.disconnect(ending, expiry);
                drop(slot);
                Ok(())
            }
            Err(end) => {
                drop(connection);
                self.answer(&end, &mut writer).await;
                drop(slot);
                Err(end)
            }
        }
    }

    /// Counts and logs a refused connection and sends the device its answer, if it has one.
    async fn answer<W: AsyncWrite + Unpin>(&self, end: &End, device: &mut W) {
        let answer = match end {
            End::Refused { answer, reason } => {
                let seen = &self.refused_connections;
                events::ConnectionRefused { reason, seen }.emit(&self.metrics);
                answer.as_ref()
            }
            End::Unauthorized { answer, reason } => {
                let seen = &self.refused_logins;
                events::LoginRefused { reason, seen }.emit(&self.metrics);
                Some(answer)
            }
            End::Closed { answer, .. } => answer.as_ref(),
            End::Lost(_) => return,
        };
        if let Some(answer) = answer {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, device.write_all(answer)).await;
        }
    }
}

/// Writes to the device, giving up after [`WRITE_TIMEOUT`].
async fn write_within<W: AsyncWrite + Unpin>(device: &mut W, bytes: &[u8]) -> Result<(), End> {
    match tokio::time::timeout(WRITE_TIMEOUT, device.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Lost(Lost::Write(e))),
        Err(_) => Err(End::Lost(Lost::WriteStalled(WRITE_TIMEOUT.as_secs()))),
    }
}

/// An acknowledgement to the device, in the order of the publishes, waiting for what must be
/// durable before it may go: the journal commit of its publish, then the broker's state on
/// disk (the publish changed a retained message or a kept session's queue; or, for a kept
/// session's QoS 2 flow, the packet id's state).
struct Held {
    /// Commits still to wait for, in order.
    gates: VecDeque<Committed>,
    /// A QoS 2 publish's packet id to remember in the session once the gates are open
    /// (remembering it makes a resend a duplicate, so it must follow the journal commit).
    remember_qos2: Option<u16>,
    /// The packet: an acknowledgement of four bytes, or five with an MQTT 5 reason code.
    packet: [u8; 5],
    /// Its length.
    len: u8,
}

impl Held {
    /// An acknowledgement that waits for nothing.
    fn open(packet: &[u8]) -> Held {
        Held::after(packet, [])
    }

    /// An acknowledgement that waits for these commits, in order.
    fn after(packet: &[u8], gates: impl IntoIterator<Item = Option<Committed>>) -> Held {
        let mut bytes = [0; 5];
        let len = packet.len().min(bytes.len());
        bytes[..len].copy_from_slice(&packet[..len]);
        Held {
            gates: gates.into_iter().flatten().collect(),
            remember_qos2: None,
            packet: bytes,
            len: len as u8,
        }
    }

    fn packet(&self) -> &[u8] {
        &self.packet[..usize::from(self.len)]
    }
}

/// One device connection's protocol state.
struct Session {
    front: Front,
    origin: Origin,
    version: Version,
    aliases: HashMap<u16, String>,
    alias_bytes: usize,
    /// QoS 2 publishes received and not yet released (PUBREL), by packet id.
    qos2_open: HashSet<u16>,
    /// Acknowledgements not yet sent, in order.
    acks: VecDeque<Held>,
    /// Whether the CONNECT's session expiry was 0 (a DISCONNECT may not raise it then).
    expiry_zero: bool,
    /// Whether the CONNECT was taken (refusals before it are CONNACKs).
    connected: bool,
    /// The CONNECT's keep-alive, in seconds (0: off).
    keep_alive: u16,
    /// The username the device logged in with (the ACL decides by it).
    username: Option<Arc<str>>,
    /// Who the client certificate says the device is, on a TLS listener with
    /// `use_identity_as_username`: then it decides the login, not the CONNECT.
    certificate: Option<CertificateLogin>,
}

impl Session {
    /// Reads the device's first packet, which must be an acceptable CONNECT, into `input`;
    /// bytes after it stay in `input`.
    async fn read_connect<R: AsyncRead + Unpin>(
        &mut self,
        device: &mut R,
        input: &mut BytesMut,
    ) -> Result<ConnectInfo, End> {
        let max = self.front.max_payload + PACKET_OVERHEAD;
        loop {
            match frame::next_frame(input, max) {
                Ok(Some(frame)) => {
                    let packet = input.split_to(frame.len()).freeze();
                    return self.connect(&frame, &packet);
                }
                Ok(None) => {}
                Err(e) => return Err(self.refuse_frame(e)),
            }
            let n = device
                .read_buf(input)
                .await
                .map_err(|e| End::Lost(Lost::Read(e)))?;
            if n == 0 {
                return Err(End::Lost(Lost::ClosedBeforeConnect));
            }
        }
    }

    /// The first packet: must be a CONNECT with a client id the gateway does not keep for
    /// itself.
    fn connect(&mut self, frame: &Frame, packet: &[u8]) -> Result<ConnectInfo, End> {
        let info = connect::parse_connect(frame, packet).map_err(|e| self.refuse_frame(e))?;
        if !checks::flags_valid(frame.byte1) {
            return Err(End::Refused {
                answer: None,
                reason: Violation::ConnectFlags.into(),
            });
        }
        if self.origin == Origin::Device
            && self.front.reserve_client_ids
            && checks::reserved_client_id(&info.client_id)
        {
            let code = match info.version {
                Version::V4 => return_code::IDENTIFIER_REJECTED,
                Version::V5 => reason::CLIENT_ID_NOT_VALID,
            };
            return Err(End::Refused {
                answer: Some(connack_refusal(info.version, code)),
                reason: Refusal::ReservedClientId(info.client_id.clone()),
            });
        }
        if info.version == Version::V4 && info.client_id.is_empty() && !info.clean_start {
            // 3.1.1 §3.1.3.1: an empty client id needs Clean Session (Mosquitto answers so).
            return Err(End::Refused {
                answer: Some(connack_refusal(
                    Version::V4,
                    return_code::IDENTIFIER_REJECTED,
                )),
                reason: Refusal::EmptyClientIdWithoutCleanSession,
            });
        }
        if let Some(will) = &info.will {
            if !checks::valid_topic_name(&will.topic) {
                return Err(End::Refused {
                    answer: None,
                    reason: Violation::WillTopic(will.topic.clone()).into(),
                });
            }
        }
        self.version = info.version;
        self.keep_alive = info.keep_alive;
        Ok(info)
    }

    /// Lets a device's CONNECT in or refuses it (the gateway's own connections are not
    /// asked): CONNACK "not authorized" (3.1.1: 0x05; 5: 0x87), as Mosquitto 2 answers a
    /// wrong password, an unknown user and an anonymous client alike.
    async fn log_in(&mut self, info: &ConnectInfo) -> Result<(), End> {
        if self.origin != Origin::Device {
            return Ok(());
        }
        let identity = match self.certificate_login(info) {
            Some(decided) => decided?,
            None => self
                .front
                .auth
                .check(info.username.as_deref(), info.password.as_ref())
                .await
                .map_err(|refusal| {
                    let code = match info.version {
                        Version::V4 => return_code::NOT_AUTHORIZED,
                        Version::V5 => reason::NOT_AUTHORIZED,
                    };
                    End::Unauthorized {
                        answer: connack_refusal(info.version, code),
                        reason: LoginRefusal::Credentials {
                            refusal,
                            client_id: info.client_id.clone(),
                        },
                    }
                })?,
        };
        if let Identity::User(username) = identity {
            self.username = Some(Arc::from(username));
        }
        if self.front.require_client_id_match {
            self.client_id_matches(info)?;
        }
        Ok(())
    }

    /// `broker.require_client_id_match`: a device's client id must be its username, so that
    /// no one can take over another's session. A client without a username may only let the
    /// broker choose its id (empty), or it could take any user's. Refused with "identifier
    /// rejected" (3.1.1: 0x02; 5: 0x85), counted and logged as refused logins are.
    fn client_id_matches(&self, info: &ConnectInfo) -> Result<(), End> {
        let matches = match &self.username {
            Some(username) => **username == *info.client_id,
            None => info.client_id.is_empty(),
        };
        if matches {
            return Ok(());
        }
        let code = match info.version {
            Version::V4 => return_code::IDENTIFIER_REJECTED,
            Version::V5 => reason::CLIENT_ID_NOT_VALID,
        };
        Err(End::Unauthorized {
            answer: connack_refusal(info.version, code),
            reason: LoginRefusal::ClientIdMismatch {
                client_id: info.client_id.clone(),
                username: self.username.clone(),
            },
        })
    }

    /// The login on a TLS listener with `use_identity_as_username`, as Mosquitto decides it:
    /// the certificate's CN is the username, and the CONNECT's username and password are not
    /// looked at; a certificate without a usable CN is refused with "bad username or
    /// password" (3.1.1: 0x04; 5: 0x86). `None` elsewhere: the CONNECT decides.
    fn certificate_login(&self, info: &ConnectInfo) -> Option<Result<Identity, End>> {
        Some(match self.certificate.as_ref()? {
            CertificateLogin::Identity(name) => Ok(Identity::User(name.clone())),
            CertificateLogin::NoIdentity(why) => {
                let code = match info.version {
                    Version::V4 => return_code::BAD_USERNAME_OR_PASSWORD,
                    Version::V5 => reason::BAD_USERNAME_OR_PASSWORD,
                };
                Err(End::Unauthorized {
                    answer: connack_refusal(info.version, code),
                    reason: LoginRefusal::Certificate {
                        why: why.clone(),
                        client_id: info.client_id.clone(),
                    },
                })
            }
        })
    }

    /// Attaches the connection to its session; returns it with the CONNACK to send.
    fn attach(&mut self, info: &ConnectInfo) -> Result<(Connection, Bytes), End> {
        let version = info.version;
        let v5_expiry = (version == Version::V5).then_some(info.properties.session_expiry);
        let expiry = Expiry::from_connect(v5_expiry, info.clean_start);
        self.expiry_zero = expiry == Expiry::AtDisconnect;
        let will = info
            .will
            .as_ref()
            .filter(|w| self.may_leave_will(&info.client_id, &w.topic));
        let will = will.map(|w| sessions::Will {
            topic: Arc::from(w.topic.as_str()),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: w.properties.clone(),
            delay_secs: w.delay_secs.unwrap_or(0),
            message_expiry: w.message_expiry,
        });
        let attached = self.front.broker.attach(Attach {
            client_id: info.client_id.clone(),
            clean_start: info.clean_start,
            expiry,
            will,
            version,
            receive_maximum: info.properties.receive_maximum,
            max_packet_size: info.properties.max_packet_size,
            owner: match self.origin {
                Origin::Gateway => Owner::Gateway,
                Origin::Device => Owner::Device(self.username.clone()),
            },
        });
        let attachment = match attached {
            Ok(attachment) => attachment,
            Err(broker::AttachError::Sessions(refused)) => {
                // Counted as `broker_sessions_refused` with the refusal (`events`).
                let code = match version {
                    Version::V4 => return_code::SERVER_UNAVAILABLE,
                    Version::V5 => reason::QUOTA_EXCEEDED,
                };
                return Err(End::Refused {
                    answer: Some(connack_refusal(version, code)),
                    reason: Refusal::Sessions(refused),
                });
            }
        };
        self.connected = true;
        let properties = ConnAckProperties {
            assigned_client_id: attachment.assigned_client_id.clone(),
            session_expiry: attachment.granted_expiry,
            receive_maximum: Some(self.front.max_inflight),
            topic_alias_maximum: Some(TOPIC_ALIAS_MAX),
            maximum_packet_size: u32::try_from(self.front.max_payload + PACKET_OVERHEAD).ok(),
            server_keep_alive: self.server_keep_alive(),
        };
        let connack = packets::connack(version, attachment.session_present, 0, &properties);
        debug!(client_id = %attachment.connection.client_id(), session_present = attachment.session_present, "client connected");
        Ok((attachment.connection, connack))
    }

    /// Whether the device may leave a will on `topic`: one the ACL does not let it write is
    /// dropped, and the CONNECT accepted, as Mosquitto 2 does (checked at CONNECT, by the
    /// rules then in force).
    fn may_leave_will(&self, client_id: &str, topic: &str) -> bool {
        if self.origin != Origin::Device
            || self
                .front
                .broker
                .may_write(self.username.as_deref(), client_id, topic)
        {
            return true;
        }
        events::WillDenied { client_id, topic }.emit(&self.front.metrics);
        false
    }

    /// MQTT 5's Server Keep Alive (§3.2.2.3.14): when the client asked for no keep-alive or
    /// for a longer one than `broker.max_keepalive_secs`, that one, which the connection is
    /// then held to. As Mosquitto 2 does; a 3.1.1 client keeps its own (it cannot be told).
    fn server_keep_alive(&mut self) -> Option<u16> {
        let max = self.front.max_keepalive;
        let told = self.version == Version::V5
            && max > 0
            && (self.keep_alive == 0 || self.keep_alive > max);
        if told {
            self.keep_alive = max;
        }
        told.then_some(max)
    }

    /// Serves the connection after CONNACK until it ends: `Ok` with how the client ended it
    /// (DISCONNECT), `Err` otherwise.
    async fn run<R, W>(
        &mut self,
        connection: &Connection,
        reader: &mut R,
        writer: &mut W,
        mut input: BytesMut,
    ) -> Result<(Ending, Option<Expiry>), End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.front.max_payload + PACKET_OVERHEAD;
        let mut out = BytesMut::with_capacity(INITIAL_BUFFER);
        // Whether the last read filled all the room the input buffer had.
        let mut busy = false;
        let keep_alive = self.keep_alive_limit();
        let mut deadline = keep_alive.map(|limit| Instant::now() + limit);
        loop {
            // Whole packets first: the CONNECT may have arrived together with more.
            loop {
                let frame = match frame::next_frame(&input, max) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return Err(self.refuse_frame(e)),
                };
                let packet = input.split_to(frame.len()).freeze();
                if let Some(ended) = self.handle(connection, &frame, packet, &mut out).await? {
                    let _ = write_within(writer, &out).await;
                    return Ok(ended);
                }
            }
            self.release_open_acks(connection, &mut out);
            if let Some(code) = connection.must_close() {
                let _ = write_within(writer, &out).await;
                let answer = (self.version == Version::V5)
                    .then(|| Bytes::copy_from_slice(&packets::disconnect(code)));
                return Err(End::Closed {
                    answer,
                    reason: Closing::TakenOver,
                });
            }
            if out.len() < WRITE_BATCH {
                if let Some(stored) = connection.take(&mut out, WRITE_BATCH) {
                    // A kept session's QoS 2 message goes out only once its packet id is on
                    // disk (see `Connection::take`): a short wait for one group commit.
                    stored
                        .await
                        .map_err(|_| End::Lost(Lost::BrokerStateStopped))?;
                }
            }
            let more = out.len() >= WRITE_BATCH;
            if !out.is_empty() {
                write_within(writer, &out).await?;
                out.clear();
            }
            if busy && input.capacity() - input.len() < READ_CHUNK / 4 {
                input.reserve(READ_CHUNK);
            }
            let room = input.capacity() - input.len();
            tokio::select! {
                read = reader.read_buf(&mut input) => {
                    let n = read.map_err(|e| End::Lost(Lost::Read(e)))?;
                    busy = n >= room.max(1);
                    if n == 0 {
                        return Err(End::Lost(Lost::DeviceClosed));
                    }
                    deadline = keep_alive.map(|limit| Instant::now() + limit);
                }
                _ = connection.ready() => {}
                opened = wait_for_head(&mut self.acks) => {
                    opened.map_err(|_| End::Lost(Lost::JournalStopped))?;
                }
                _ = sleep_until(deadline) => {
                    let answer = (self.version == Version::V5)
                        .then(|| Bytes::copy_from_slice(&packets::disconnect(reason::KEEP_ALIVE_TIMEOUT)));
                    return Err(End::Closed { answer, reason: Closing::KeepAlive });
                }
                _ = std::future::ready(()), if more => {}
            }
        }
    }

    /// 1.5 times the CONNECT's keep-alive (3.1.1 §3.1.2.10), or none for keep-alive 0.
    fn keep_alive_limit(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// Moves the acknowledgements whose publishes are durable, in order, to `out`.
    fn release_open_acks(&mut self, connection: &Connection, out: &mut BytesMut) {
        while let Some(head) = self.acks.front_mut() {
            while let Some(gate) = head.gates.front_mut() {
                match gate.try_recv() {
                    Ok(()) => {
                        head.gates.pop_front();
                    }
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return,
                    // The journal stopped: the wait in `run` reports it.
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => return,
                }
            }
            if let Some(packet_id) = head.remember_qos2.take() {
                if let Some(stored) = connection.incoming_qos2_received(packet_id) {
                    head.gates.push_back(stored);
                    continue;
                }
            }
            if let Some(held) = self.acks.pop_front() {
                out.extend_from_slice(held.packet());
            }
        }
    }

    /// The refusal of a packet that cannot be framed or parsed.
    fn refuse_frame(&self, error: FrameError) -> End {
        if self.connected {
            return End::violation(self.version, error.into());
        }
        let answer = match error {
            // Only MQTT 5 has authentication methods.
            FrameError::AuthenticationMethod { .. } => Some(connack_refusal(
                Version::V5,
                reason::BAD_AUTHENTICATION_METHOD,
            )),
            // In 3.1.1's format, which every level understands (Mosquitto answers so).
            FrameError::UnsupportedLevel { .. } => Some(connack_refusal(
                Version::V4,
                return_code::UNACCEPTABLE_PROTOCOL_VERSION,
            )),
            _ => None,
        };
        End::Refused {
            answer,
            reason: Violation::Frame(error).into(),
        }
    }

    /// The per-packet decision point after CONNECT: checks the packet and acts on it,
    /// appending answers to `out`. Only packet types a client may send, with the flags their
    /// type requires, get past the checks. `Some` when the client disconnected.
    async fn handle(
        &mut self,
        connection: &Connection,
        frame: &Frame,
        packet: Bytes,
        out: &mut BytesMut,
    ) -> Result<Option<(Ending, Option<Expiry>)>, End> {
        let version = self.version;
        if !checks::client_may_send(frame.kind(), version) {
            return Err(End::violation(version, Violation::PacketType(frame.kind())));
        }
        if !checks::flags_valid(frame.byte1) {
            return Err(End::violation(version, Violation::HeaderFlags(frame.byte1)));
        }
        let packet_id =
            |this: &Self| frame::packet_id(frame, &packet).map_err(|e| this.refuse_frame(e));
        match frame.kind() {
            kind::CONNECT => return Err(End::violation(version, Violation::SecondConnect)),
            kind::PUBLISH => self.publish(connection, frame, packet.clone()).await?,
            kind::PUBREL => {
                let id = packet_id(self)?;
                self.qos2_open.remove(&id);
                let forgotten = connection.incoming_qos2_released(id);
                self.acks.push_back(Held::after(
                    &packets::ack(packets::ack::PUBCOMP, id),
                    [forgotten],
                ));
            }
            kind::PUBACK => {
                connection.acknowledge(ClientAck::Puback(packet_id(self)?));
            }
            kind::PUBREC => {
                let id = packet_id(self)?;
                let released = connection.acknowledge(ClientAck::Pubrec(id));
                // In order with the acknowledgements: it waits behind them, and for its own
                // release to be stored (a kept session's message).
                self.acks.push_back(Held::after(
                    &packets::ack(packets::ack::PUBREL, id),
                    [released],
                ));
            }
            kind::PUBCOMP => {
                connection.acknowledge(ClientAck::Pubcomp(packet_id(self)?));
            }
            kind::SUBSCRIBE => {
                let subscribe = frame::parse_subscribe(frame, &packet, version)
                    .map_err(|e| self.refuse_frame(e))?;
                if let Some(bad) = subscribe
                    .subscriptions
                    .iter()
                    .find(|s| !valid_filter(version, &s.filter))
                {
                    // Malformed, as Mosquitto 2 answers (see `Violation::code`).
                    return Err(End::violation(
                        version,
                        Violation::TopicFilter(bad.filter.clone()),
                    ));
                }
                let filters: Vec<(String, u8)> = subscribe
                    .subscriptions
                    .into_iter()
                    .map(|s| (s.filter, s.options))
                    .collect();
                let granted = connection.subscribe(subscribe.identifier, &filters);
                let codes: Vec<u8> = granted.iter().map(|g| g.code(version)).collect();
                out.extend_from_slice(&packets::suback(version, subscribe.packet_id, &codes));
            }
            kind::UNSUBSCRIBE => {
                let (id, filters) = frame::parse_unsubscribe(frame, &packet, version)
                    .map_err(|e| self.refuse_frame(e))?;
                if let Some(bad) = filters.iter().find(|f| !valid_filter(version, f)) {
                    return Err(End::violation(version, Violation::TopicFilter(bad.clone())));
                }
                let codes: Vec<u8> = connection
                    .unsubscribe(&filters)
                    .into_iter()
                    // 0x11: No subscription existed (MQTT 5 §3.11.3).
                    .map(|existed| if existed { 0x00 } else { 0x11 })
                    .collect();
                out.extend_from_slice(&packets::unsuback(version, id, &codes));
            }
            kind::PINGREQ => out.extend_from_slice(&packets::PINGRESP),
            kind::DISCONNECT => {
                let (code, expiry) = frame::parse_disconnect(frame, &packet, version)
                    .map_err(|e| self.refuse_frame(e))?;
                if self.expiry_zero && expiry.is_some_and(|e| e > 0) {
                    return Err(End::violation(version, Violation::ExpiryAfterZero));
                }
                // 0x04: Disconnect with Will Message.
                let ending = if code == 0x04 {
                    Ending::WithWill
                } else {
                    Ending::Normal
                };
                let expiry = expiry.map(|secs| Expiry::from_connect(Some(Some(secs)), false));
                return Ok(Some((ending, expiry)));
            }
            other => return Err(End::violation(version, Violation::NotServed(other))),
        }
        Ok(None)
    }

    /// QoS 1/2 publishes from the client not yet acknowledged (QoS 2: not yet released).
    fn inflight(&self) -> usize {
        self.qos2_open.len()
            + self
                .acks
                .iter()
                .filter(|held| held.packet[0] == packets::ack::PUBACK)
                .count()
    }

    /// Checks a PUBLISH, journals it and hands it to the broker; its acknowledgement waits for
    /// the journal commit.
    async fn publish(
        &mut self,
        connection: &Connection,
        frame: &Frame,
        packet: Bytes,
    ) -> Result<(), End> {
        let version = self.version;
        let publish =
            frame::parse_publish(frame, packet, version).map_err(|e| self.refuse_frame(e))?;
        if !publish.topic.is_empty() && !checks::valid_topic_name(&publish.topic) {
            // A protocol error, as Mosquitto 2 answers (see `Violation::code`).
            return Err(End::violation(
                version,
                Violation::TopicName(publish.topic.clone()),
            ));
        }
        let topic = self.resolve_topic(&publish, version)?;
        if publish.payload.len() > self.front.max_payload {
            return Err(self.refuse_frame(FrameError::TooLarge {
                size: publish.payload.len(),
                limit: self.front.max_payload,
            }));
        }
        let (qos, id) = (publish.qos, publish.pkid);
        if qos == 2 && (self.qos2_open.contains(&id) || connection.incoming_qos2_open(id)) {
            // Sent again before PUBREL (DUP), on this connection or after a reconnect:
            // already journaled and delivered (§4.3.3). Its PUBREC goes after the first
            // one (if that still waits, this waits behind it).
            self.qos2_open.insert(id);
            self.acks
                .push_back(Held::open(&packets::ack(packets::ack::PUBREC, id)));
            return Ok(());
        }
        if version == Version::V5
            && qos > 0
            && self.inflight() >= usize::from(self.front.max_inflight)
        {
            return Err(End::violation(
                version,
                Violation::ReceiveMaximum(self.front.max_inflight),
            ));
        }
        if self.origin == Origin::Device && checks::reserved_publish_topic(&topic) {
            self.refuse_publish(qos, id, &topic, PublishRefusal::ReservedTopic);
            return Ok(());
        }
        if self.origin == Origin::Device
            && !self.front.broker.may_write(
                self.username.as_deref(),
                connection.client_id(),
                &topic,
            )
        {
            self.refuse_publish(qos, id, &topic, PublishRefusal::NotGranted);
            return Ok(());
        }
        let topic: Arc<str> = Arc::from(topic);
        let gate = match (self.origin, &self.front.sink) {
            (Origin::Gateway, _) | (Origin::Device, None) => None,
            (Origin::Device, Some(Sink::Journal(journal))) => {
                let entry = NewJournalEntry {
                    topic: topic.to_string(),
                    payload: publish.payload.clone(),
                    qos,
                    retain: publish.retain,
                    client_id: Arc::from(connection.client_id()),
                    received_ms: crate::event::now_ms(),
                };
                journal
                    .append(entry, qos > 0)
                    .await
                    .map_err(|e| End::Lost(Lost::Journal(e)))?
            }
            (Origin::Device, Some(Sink::Tap(events))) => {
                let event = DevicePublish {
                    topic: topic.to_string(),
                    payload: publish.payload.clone(),
                    received_ms: crate::event::now_ms(),
                };
                events
                    .send(event)
                    .await
                    .map_err(|_| End::Lost(Lost::TapClosed))?;
                None
            }
        };
        let stored = connection.publish(&broker::Publish {
            topic,
            payload: publish.payload,
            qos,
            retain: publish.retain,
            properties: publish.properties,
            message_expiry: publish.message_expiry,
        });
        match qos {
            1 => self.acks.push_back(Held::after(
                &packets::ack(packets::ack::PUBACK, id),
                [gate, stored],
            )),
            2 => {
                self.qos2_open.insert(id);
                let mut held = Held::after(&packets::ack(packets::ack::PUBREC, id), [gate, stored]);
                held.remember_qos2 = Some(id);
                self.acks.push_back(held);
            }
            _ => {}
        }
        Ok(())
    }

    /// A publish the client may not make: neither journaled nor delivered, counted, and
    /// acknowledged as Mosquitto 2 acknowledges it (MQTT 5: PUBACK or PUBREC with 0x87 "not
    /// authorized", which ends a QoS 2 flow; 3.1.1 has no way to say it, so the flow looks
    /// successful to the client).
    fn refuse_publish(&mut self, qos: u8, id: u16, topic: &str, why: PublishRefusal) {
        events::PublishRefused {
            why,
            topic,
            username: &self.username,
            seen: &self.front.refused_publishes,
        }
        .emit(&self.front.metrics);
        let kind = match qos {
            1 => packets::ack::PUBACK,
            2 => packets::ack::PUBREC,
            _ => return,
        };
        let ack = packets::ack(kind, id);
        match self.version {
            Version::V4 => self.acks.push_back(Held::open(&ack)),
            Version::V5 => {
                let [byte1, _, hi, lo] = ack;
                let with_reason = [byte1, 0x03, hi, lo, reason::NOT_AUTHORIZED];
                self.acks.push_back(Held::open(&with_reason));
            }
        }
    }

    fn resolve_topic(&mut self, publish: &frame::Publish, version: Version) -> Result<String, End> {
        let refuse = |violation| End::violation(version, violation);
        match publish.topic_alias {
            // Malformed, as Mosquitto 2 answers it (see `Violation::code`).
            Some(0) => Err(refuse(Violation::AliasZero)),
            Some(alias) if alias > TOPIC_ALIAS_MAX => Err(refuse(Violation::AliasAbove {
                alias,
                max: TOPIC_ALIAS_MAX,
            })),
            Some(alias) if publish.topic.is_empty() => self
                .aliases
                .get(&alias)
                .cloned()
                .ok_or_else(|| refuse(Violation::UnknownAlias(alias))),
            Some(alias) => {
                let added = publish.topic.len();
                let removed = self.aliases.get(&alias).map_or(0, String::len);
                if self.alias_bytes + added - removed > MAX_ALIAS_BYTES {
                    return Err(refuse(Violation::AliasBytes(MAX_ALIAS_BYTES)));
                }
                self.alias_bytes = self.alias_bytes + added - removed;
                self.aliases.insert(alias, publish.topic.clone());
                Ok(publish.topic.clone())
            }
            None if publish.topic.is_empty() => Err(refuse(Violation::EmptyTopic)),
            None => Ok(publish.topic.clone()),
        }
    }
}

/// Whether a client of `version` may subscribe to (or unsubscribe from) `filter`.
fn valid_filter(version: Version, filter: &str) -> bool {
    match version {
        Version::V4 => checks::valid_topic_filter_v311(filter),
        Version::V5 => checks::valid_topic_filter(filter),
    }
}

/// Waits until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits until the first held acknowledgement's gate opens (and marks it open); pending for
/// ever when nothing waits.
async fn wait_for_head(held: &mut VecDeque<Held>) -> Result<(), RecvError> {
    let Some(head) = held.front_mut() else {
        return std::future::pending().await;
    };
    match head.gates.front_mut() {
        Some(gate) => {
            let result = gate.await;
            head.gates.pop_front();
            result
        }
        None => std::future::pending().await,
    }
}
