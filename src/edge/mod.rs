//! The device-facing side: outpost's own MQTT broker (sessions, subscriptions, retained
//! messages, fan-out; [`broker`]) behind its connection front ([`front`]) on every device
//! listener.
//!
//! [`Edge::start_durable`] is the gateway's edge: devices connect to the front, which checks
//! every packet, journals every publish and holds its acknowledgement until the journal
//! commit, and serves the device's session on the broker; every listener serves 3.1.1 and 5,
//! in the clear or over TLS ([`tls`]).
//! The gateway's own parts reach the broker in process: the control planes through
//! [`LocalLink`]s, the local uplink through [`Edge::local_dialer`]. [`Edge::start`] is the
//! same broker whose device publishes go to a channel instead of a journal: the demo and the
//! benchmark use it as a stand-in upstream.
//!
//! Guarantees: a listener that cannot bind makes start-up fail with the address in the
//! message; with [`Edge::start_durable`], a QoS 1 or 2 publish is acknowledged to its device
//! only after it is durable in the journal (and, when it changed a retained message or a kept
//! session's queue, in the broker's state, `broker.sqlite` in the data directory, which
//! [`Edge::start_durable`] reads back: kept sessions and retained messages survive a
//! restart); nothing reaches the broker except through the
//! front's checks or the gateway's own in-process links (there is no internal listener).

pub(crate) mod access;
pub mod acl;
pub mod auth;
mod broker;
mod checks;
mod connect;
mod durable;
mod frame;
mod front;
mod outbound;
mod packets;
pub mod passwords;
mod retained;
mod sessions;
mod sources;
mod subscriptions;
pub mod tls;

pub use checks::{filter_matches, RESERVED_CLIENT_ID_PREFIX};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::journal::Journal;
use crate::metrics::Metrics;

/// One publish from a local device, as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePublish {
    /// The topic it was published on.
    pub topic: String,
    /// The payload, as published.
    pub payload: Bytes,
    /// When the gateway received it, in ms since the Unix epoch.
    pub received_ms: u64,
}

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// A listener address is in use or not available on this machine.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The broker refused the gateway's own link.
    #[error("cannot attach to the embedded broker: {0}")]
    Link(String),
    /// The broker's durable state cannot be opened or read.
    #[error(transparent)]
    State(#[from] durable::DurableError),
}

/// The running broker. Dropping it stops the listeners.
pub struct Edge {
    tasks: Vec<JoinHandle<()>>,
    broker: Arc<broker::Broker>,
    /// The devices' front, until [`Edge::stop`] (it holds a journal handle, which the
    /// journal's thread waits on to end).
    devices: Option<front::Front>,
    /// The front of the gateway's own connections (no sink).
    gateway: front::Front,
    /// Device listeners bound but not served yet (see [`Edge::open`]).
    unopened: Vec<tokio::net::TcpListener>,
    /// Device TLS listeners bound but not served yet, with their TLS.
    unopened_tls: Vec<(tokio::net::TcpListener, tls::DeviceTls)>,
}

/// The broker's bounds from the configuration.
fn broker_limits(config: &BrokerConfig) -> broker::Limits {
    broker::Limits {
        sessions: sessions::Limits {
            max_kept_sessions: config.max_sessions,
            max_expiry_secs: (config.max_session_expiry_secs > 0)
                .then_some(config.max_session_expiry_secs),
        },
        subscriptions: subscriptions::Limits {
            per_session: config.max_subscriptions_per_client,
            total: config.max_subscriptions,
            total_bytes: config.max_subscription_bytes,
        },
        retained: retained::Limits {
            max_messages: config.max_retained_messages,
            max_bytes: config.max_retained_bytes,
        },
        max_queued_messages: config.max_queued_messages,
        max_queued_bytes: config.max_queued_bytes,
        max_queued_bytes_total: config.max_queued_bytes_total,
        max_inflight: max_inflight(config),
    }
}

fn max_inflight(config: &BrokerConfig) -> u16 {
    u16::try_from(config.max_inflight.max(1)).unwrap_or(u16::MAX)
}

/// Binds a device listener; the error names the address.
async fn bind(addr: &SocketAddr) -> Result<tokio::net::TcpListener, EdgeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind {
            addr: *addr,
            source,
        })
}

/// How often the broker looks for due wills and expired sessions and retained messages.
const TICK: Duration = Duration::from_secs(1);

impl Edge {
    /// Starts the broker with outpost's front on every configured device address: publishes
    /// are journaled and acknowledged only when durable. Must be called inside a tokio runtime.
    ///
    /// The device addresses are bound (so a port in use is an error here) but not served
    /// until [`Edge::open`]: the gateway first subscribes its control plane through
    /// [`Edge::local_link`], so that no device can publish a request before it is listened
    /// to. A device that connects meanwhile waits in the listen backlog. With `tls`, its
    /// listeners are bound too, and served like the others after a TLS handshake.
    pub async fn start_durable(
        config: &BrokerConfig,
        data_dir: &std::path::Path,
        journal: Journal,
        metrics: Arc<Metrics>,
        auth: auth::Authenticator,
        tls: Option<tls::DeviceTls>,
    ) -> Result<Edge, EdgeError> {
        let (store, snapshot) =
            durable::Persister::open(data_dir, crate::event::now_ms(), metrics.clone())?;
        if !snapshot.sessions.is_empty() || !snapshot.retained.is_empty() {
            info!(
                sessions = snapshot.sessions.len(),
                retained = snapshot.retained.len(),
                "broker state read back"
            );
        }
        let broker =
            broker::Broker::restore(broker_limits(config), metrics.clone(), store, snapshot);
        let mut listeners = Vec::new();
        for addr in config.listen.iter().chain(&config.listen_v5) {
            listeners.push(bind(addr).await?);
        }
        let mut tls_listeners = Vec::new();
        for tls in tls.iter() {
            for addr in tls.listen() {
                tls_listeners.push((bind(addr).await?, tls.clone()));
            }
        }
        let mut edge = Edge::with_sink(
            config,
            broker,
            front::Sink::Journal(journal),
            metrics,
            listeners,
            auth,
        );
        edge.unopened_tls = tls_listeners;
        Ok(edge)
    }

    /// Starts the broker on every configured device address, serving at once, with every
    /// device publish sent to `events` (acknowledged once taken). Must be called inside a
    /// tokio runtime.
    pub fn start(
        config: &BrokerConfig,
        events: mpsc::Sender<DevicePublish>,
        metrics: Arc<Metrics>,
    ) -> Result<Edge, EdgeError> {
        let mut listeners = Vec::new();
        for addr in config.listen.iter().chain(&config.listen_v5) {
            let bind = |addr: &SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
                let listener = std::net::TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            };
            let listener = bind(addr).map_err(|source| EdgeError::Bind {
                addr: *addr,
                source,
            })?;
            listeners.push(listener);
        }
        let broker = broker::Broker::new(broker_limits(config), metrics.clone());
        let mut edge = Edge::with_sink(
            config,
            broker,
            front::Sink::Tap(events),
            metrics,
            listeners,
            auth::Authenticator::open(),
        );
        edge.open();
        Ok(edge)
    }

    fn with_sink(
        config: &BrokerConfig,
        broker: Arc<broker::Broker>,
        sink: front::Sink,
        metrics: Arc<Metrics>,
        unopened: Vec<tokio::net::TcpListener>,
        auth: auth::Authenticator,
    ) -> Edge {
        let front = front::Front {
            broker: broker.clone(),
            // A stand-in upstream (a channel sink) serves gateways, whose ids are reserved.
            reserve_client_ids: matches!(sink, front::Sink::Journal(_)),
            sink: Some(sink),
            metrics,
            max_payload: config.max_payload_bytes,
            max_inflight: max_inflight(config),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            refusing: Arc::new(Semaphore::new(front::MAX_REFUSING)),
            connect_timeout: Duration::from_millis(u64::from(config.connect_timeout_ms)),
            max_keepalive: config.max_keepalive_secs,
            refused_publishes: Arc::default(),
            refused_logins: Arc::default(),
            refused_connections: Arc::default(),
            sources: front::SourceLimits::new(sources::Limits {
                max_open: config.max_connections_per_source,
                rate: config.max_connection_rate_per_source,
            }),
            require_client_id_match: config.require_client_id_match,
            auth,
        };
        let ticking = broker.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                ticking.tick();
            }
        });
        let gateway = front::Front {
            sink: None,
            ..front.clone()
        };
        Edge {
            tasks: vec![ticker],
            broker,
            devices: Some(front),
            gateway,
            unopened,
            unopened_tls: Vec::new(),
        }
    }

    /// Starts serving the device listeners bound by [`Edge::start_durable`]. Idempotent.
    pub fn open(&mut self) {
        let Some(front) = &self.devices else {
            return;
        };
        for listener in self.unopened.drain(..) {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "device listener up");
            }
            self.tasks
                .push(tokio::spawn(front.clone().serve(listener, None)));
        }
        for (listener, tls) in self.unopened_tls.drain(..) {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "device TLS listener up");
            }
            self.tasks
                .push(tokio::spawn(front.clone().serve(listener, Some(tls))));
        }
    }

    /// Enforces the access rules on every device's publishes, subscriptions, deliveries and
    /// wills from now on ([`access::Rules`]): `admins` may use gateway `gateway_id`'s control
    /// topics, and `acl` (when there is one: its file and the rules read from it by
    /// [`auth::load_acl_file`]) decides the rest; its file is read again when `reloads`
    /// changes (a `SIGHUP`) or the file changes on disk, and a new version that does not parse
    /// leaves the rules in force, with a warning. Call it before [`Edge::open`], so that no
    /// device is served without the rules.
    pub fn enforce_access(
        &mut self,
        gateway_id: &str,
        admins: &[String],
        acl: Option<(std::path::PathBuf, acl::Acl)>,
        reloads: tokio::sync::watch::Receiver<u64>,
        shutdown: crate::shutdown::Shutdown,
    ) {
        let Some((path, acl)) = acl else {
            self.broker
                .set_rules(access::Rules::new(None, admins, gateway_id));
            return;
        };
        info!(file = %path.display(), rules = acl.rules(), admins = admins.len(), "access rules in force");
        self.broker
            .set_rules(access::Rules::new(Some(Arc::new(acl)), admins, gateway_id));
        let broker = self.broker.clone();
        let shown = path.clone();
        self.tasks.push(crate::files::keep_reading(
            "ACL file",
            vec![path.clone()],
            reloads,
            shutdown,
            move || auth::load_acl_file(&path),
            move |acl| {
                info!(file = %shown.display(), rules = acl.rules(), "ACL file read again");
                broker.set_acl(Some(Arc::new(acl)));
                true
            },
        ));
    }

    /// An in-process client of the broker (for the gateway's own control plane): it can
    /// subscribe and publish like a device, without a socket and without the journal. Its
    /// client id should start with [`RESERVED_CLIENT_ID_PREFIX`], so that no device can take
    /// its session over.
    pub fn local_link(&self, client_id: &str) -> Result<LocalLink, EdgeError> {
        let attachment = self
            .broker
            .attach(broker::Attach {
                client_id: client_id.to_string(),
                clean_start: true,
                expiry: sessions::Expiry::AtDisconnect,
                will: None,
                version: frame::Version::V5,
                receive_maximum: None,
                max_packet_size: None,
                owner: broker::Owner::Gateway,
            })
            .map_err(|e| EdgeError::Link(e.to_string()))?;
        Ok(LocalLink {
            connection: attachment.connection,
            pending: std::collections::VecDeque::new(),
        })
    }

    /// Opens in-process MQTT connections to the broker, served like a device's but trusted
    /// (a reserved client id is allowed; publishes reach subscribers without the journal):
    /// the local uplink delivers `local-only` outputs through it.
    pub fn local_dialer(&self) -> LocalDialer {
        let front = self.gateway.clone();
        Arc::new(move || {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            front.serve_gateway(theirs);
            ours
        })
    }

    /// Stops the listeners and closes the device connections (the front's journal handle
    /// goes with them). The gateway's own links keep working until they are dropped.
    pub fn stop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.devices = None;
        self.unopened.clear();
        self.unopened_tls.clear();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A message a [`LocalLink`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// Its topic.
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
    /// The client id of its publisher (`None` for a will), to answer it with
    /// [`LocalLink::reply`].
    pub from: Option<Arc<str>>,
}

/// The gateway's own in-process client of the broker (see [`Edge::local_link`]).
#[derive(Debug)]
pub struct LocalLink {
    connection: broker::Connection,
    pending: std::collections::VecDeque<(Arc<str>, Bytes, Option<Arc<str>>)>,
}

impl LocalLink {
    /// Subscribes to `filter` (QoS 1, so nothing is dropped as QoS 0 would be); a publish
    /// made after this returns is delivered to the link.
    pub fn subscribe(&self, filter: &str) -> Result<(), EdgeError> {
        match self.connection.subscribe(None, &[(filter.to_string(), 1)])[..] {
            [broker::Granted::Qos(_)] => Ok(()),
            _ => Err(EdgeError::Link(format!(
                "the broker refused the subscription to {filter:?}"
            ))),
        }
    }

    /// Publishes at QoS 0, not retained, to the broker's subscribers.
    pub fn publish(&self, topic: impl Into<String>, payload: impl Into<Bytes>) {
        if let Some(publish) = Self::message(topic.into(), payload.into()) {
            self.connection.publish(&publish);
        }
    }

    /// Answers a request: publishes at QoS 0, not retained, to the requester `to` only (when
    /// it is subscribed to `topic` and may read it), or, when the request has no publisher
    /// (`None`), to every subscriber as [`LocalLink::publish`] does.
    pub fn reply(&self, to: Option<&str>, topic: impl Into<String>, payload: impl Into<Bytes>) {
        let Some(publish) = Self::message(topic.into(), payload.into()) else {
            return;
        };
        match to {
            Some(client_id) => self.connection.publish_to(client_id, &publish),
            None => {
                self.connection.publish(&publish);
            }
        }
    }

    fn message(topic: String, payload: Bytes) -> Option<broker::Publish> {
        if !checks::valid_topic_name(&topic) {
            warn!(%topic, "the gateway tried to publish on an invalid topic; dropped");
            return None;
        }
        Some(broker::Publish {
            topic: Arc::from(topic),
            payload,
            qos: 0,
            retain: false,
            properties: Bytes::new(),
            message_expiry: None,
        })
    }

    /// The next message for the link, waiting for one.
    pub async fn next(&mut self) -> LocalMessage {
        loop {
            if let Some((topic, payload, from)) = self.pending.pop_front() {
                return LocalMessage {
                    topic,
                    payload,
                    from,
                };
            }
            self.pending.extend(self.connection.take_messages(64));
            if self.pending.is_empty() {
                self.connection.ready().await;
            }
        }
    }
}

/// Opens an in-process byte stream to the broker, served as the gateway's own connection
/// (the same type as the uplink client's dialer, so the local link can use it as is).
pub type LocalDialer = Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;
