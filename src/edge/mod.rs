//! The device-facing side: an embedded rumqttd broker (its router handles sessions,
//! subscriptions, retained messages and fan-out to local subscribers), with outpost's own
//! connection front on the device listeners.
//!
//! [`Edge::start_durable`] is the gateway's edge: devices connect to the front
//! ([`front`]), which relays each connection to the broker's internal listener for the
//! CONNECT's protocol version (so every device listener serves 3.1.1 and 5), journals every
//! publish and holds its acknowledgement until the journal commit. [`Edge::start`] is a plain
//! broker whose publishes are tapped into a channel: the demo and the benchmark use it as a
//! stand-in upstream.
//!
//! Guarantees: a listener that cannot bind makes start-up fail with the address in the message;
//! with [`Edge::start_durable`], a QoS 1 or 2 publish is acknowledged to its device only after
//! it is durable in the journal.
//!
//! What it does not do: the broker's internal listeners are on 127.0.0.1 ephemeral ports; a
//! local process that connects there directly bypasses the journal (devices cannot: they only
//! see the front's addresses).

mod checks;
mod connect;
mod frame;
mod front;
mod outbound;
mod retained;
mod sessions;
mod subscriptions;

pub use checks::{filter_matches, RESERVED_CLIENT_ID_PREFIX};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::config::BrokerConfig;
use crate::journal::Journal;
use crate::metrics::Metrics;

/// The client id of the in-process link that taps a plain broker's publishes.
pub const TAP_CLIENT_ID: &str = "outpost-pipeline";

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
    /// The broker's internal listener did not come up.
    #[error("the embedded broker's internal listener on {0} did not come up")]
    Internal(SocketAddr),
    /// The broker's router refused the gateway's own link.
    #[error("cannot attach to the embedded broker: {0}")]
    Link(String),
}

/// The running broker and the task feeding the pipeline. Dropping it stops the listeners.
pub struct Edge {
    tasks: Vec<JoinHandle<()>>,
    links: LinkFactory,
    /// Device listeners bound but not served yet (see [`Edge::open`]).
    unopened: Vec<(front::Front, tokio::net::TcpListener)>,
    /// The broker's internal MQTT 3.1.1 and MQTT 5 listeners, when started.
    internal: [Option<SocketAddr>; 2],
}

/// Builds in-process links to the broker's router (rumqttd does not name its router channel's
/// type, so the channel is kept inside this closure).
type LinkFactory = Box<dyn Fn(&str) -> Result<(LinkTx, LinkRx), EdgeError> + Send + Sync>;

/// A [`LinkFactory`] over a router channel; a macro because the channel's type cannot be named.
macro_rules! link_factory {
    ($router_tx:expr) => {{
        let router_tx = $router_tx;
        let links: LinkFactory = Box::new(move |client_id: &str| {
            LinkBuilder::new(client_id, router_tx.clone())
                .dynamic_filters(true)
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(|e| EdgeError::Link(e.to_string()))
        });
        links
    }};
}

impl Edge {
    /// Starts the broker with outpost's front on every configured device address: publishes
    /// are journaled and acknowledged only when durable. Must be called inside a tokio runtime.
    ///
    /// The device addresses are bound (so a port in use is an error here) but not served
    /// until [`Edge::open`]: the gateway first subscribes its control plane through
    /// [`Edge::local_link`], so that no device can publish a request before it is listened
    /// to. A device that connects meanwhile waits in the listen backlog.
    pub async fn start_durable(
        config: &BrokerConfig,
        journal: Journal,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Edge, EdgeError> {
        let mut device_listeners = Vec::new();
        for addr in config.listen.iter().chain(&config.listen_v5) {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| EdgeError::Bind {
                    addr: *addr,
                    source,
                })?;
            device_listeners.push(listener);
        }
        let router_tx = Router::new(0, router_config(config)).spawn();
        let mut tasks = Vec::new();
        // Both internal listeners, whatever the device listeners are called: every device
        // listener serves 3.1.1 and 5, and the front picks the broker side by the CONNECT.
        let v4 = free_loopback_address()?;
        tasks.push(spawn_server(
            Server::new(
                server_settings(config, "internal-v4".into(), v4),
                router_tx.clone(),
                V4,
            ),
            v4,
        ));
        let v5 = free_loopback_address()?;
        tasks.push(spawn_server(
            Server::new(
                server_settings(config, "internal-v5".into(), v5),
                router_tx.clone(),
                V5,
            ),
            v5,
        ));
        wait_until_listening(v4).await?;
        wait_until_listening(v5).await?;
        let front = front::Front {
            brokers: front::Brokers { v4, v5 },
            journal,
            metrics,
            max_payload: config.max_payload_bytes,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            refusing: Arc::new(Semaphore::new(front::MAX_REFUSING)),
            connect_timeout: Duration::from_millis(u64::from(config.connect_timeout_ms)),
        };
        let unopened = device_listeners
            .into_iter()
            .map(|listener| (front.clone(), listener))
            .collect();
        let internal = [Some(v4), Some(v5)];
        Ok(Edge {
            tasks,
            links: link_factory!(router_tx),
            unopened,
            internal,
        })
    }

    /// The broker's internal listener (address, and whether it speaks MQTT 5): publishing
    /// there reaches local subscribers without passing the journal. Prefers MQTT 3.1.1.
    pub fn internal_listener(&self) -> Option<(SocketAddr, bool)> {
        match self.internal {
            [Some(v4), _] => Some((v4, false)),
            [None, Some(v5)] => Some((v5, true)),
            [None, None] => None,
        }
    }

    /// Starts serving the device listeners bound by [`Edge::start_durable`]. Idempotent.
    pub fn open(&mut self) {
        for (front, listener) in self.unopened.drain(..) {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "device listener up");
            }
            self.tasks.push(tokio::spawn(front.serve(listener)));
        }
    }

    /// Starts the broker's router, its listeners and the in-process subscriber that sends every
    /// device publish to `events`. Must be called inside a tokio runtime.
    pub fn start(
        config: &BrokerConfig,
        events: mpsc::Sender<DevicePublish>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Edge, EdgeError> {
        // Check every address first: rumqttd's listener only logs a bind failure.
        for addr in config.listen.iter().chain(&config.listen_v5) {
            std::net::TcpListener::bind(addr).map_err(|source| EdgeError::Bind {
                addr: *addr,
                source,
            })?;
        }

        let router_tx = Router::new(0, router_config(config)).spawn();
        let mut tasks = Vec::new();
        for (i, addr) in config.listen.iter().enumerate() {
            let settings = server_settings(config, format!("v4-{i}"), *addr);
            tasks.push(spawn_server(
                Server::new(settings, router_tx.clone(), V4),
                *addr,
            ));
        }
        for (i, addr) in config.listen_v5.iter().enumerate() {
            let settings = server_settings(config, format!("v5-{i}"), *addr);
            tasks.push(spawn_server(
                Server::new(settings, router_tx.clone(), V5),
                *addr,
            ));
        }

        let links = link_factory!(router_tx);
        let (mut link_tx, link_rx) = links(TAP_CLIENT_ID)?;
        link_tx
            .subscribe("#")
            .map_err(|e| EdgeError::Link(e.to_string()))?;
        tasks.push(tokio::spawn(forward_publishes(
            link_tx, link_rx, events, metrics,
        )));
        Ok(Edge {
            tasks,
            links,
            unopened: Vec::new(),
            internal: [None, None],
        })
    }

    /// An in-process MQTT connection to the broker (for the gateway's own control plane): it
    /// can subscribe and publish like a device, without a socket and without the journal.
    pub fn local_link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), EdgeError> {
        (self.links)(client_id)
    }

    /// Stops the listeners and the subscriber. Connections already open are closed when the
    /// process exits.
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Subscribes a fresh in-process link (from [`Edge::local_link`]) to `filter` and waits, at
/// most `timeout`, for the broker's acknowledgement, so that a publish made after this returns
/// is delivered to the link. The link must not have asked for anything else yet: its first
/// acknowledgement is taken as the SUBACK.
pub async fn subscribe_confirmed(
    link_tx: &mut LinkTx,
    link_rx: &mut LinkRx,
    filter: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    link_tx
        .subscribe(filter.to_string())
        .map_err(|e| e.to_string())?;
    let confirmed = tokio::time::timeout(timeout, async {
        loop {
            match link_rx.next().await {
                Ok(Some(rumqttd::Notification::DeviceAck(_))) => return Ok(()),
                Ok(Some(rumqttd::Notification::Unschedule)) => {
                    link_rx.wake().await.map_err(|e| e.to_string())?
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match confirmed {
        Ok(result) => result,
        Err(_) => Err("no SUBACK from the embedded broker".into()),
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Slots the broker's router keeps on top of the device connections the front allows: the
/// gateway's own in-process links (control, modules, the local link, the tap) and spares. The
/// front never lets the router fill up: rumqttd 0.20 blocks a runtime thread, and then panics
/// on every later connection, once it has refused one.
const ROUTER_SPARE_SLOTS: usize = 32;

fn router_config(config: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        max_connections: config.max_connections + ROUTER_SPARE_SLOTS,
        max_outgoing_packet_count: 200,
        // The in-memory log the router keeps per subscribed filter, for local subscribers;
        // this bounds its memory on a small board.
        max_segment_size: 16 * 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(config: &BrokerConfig, name: String, listen: SocketAddr) -> ServerSettings {
    ServerSettings {
        name,
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: config.connect_timeout_ms,
            max_payload_size: config.max_payload_bytes,
            max_inflight_count: config.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

fn spawn_server<P>(mut server: Server<P>, addr: SocketAddr) -> JoinHandle<()>
where
    P: rumqttd::protocol::Protocol + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = server.start(LinkType::Remote).await {
            error!(%addr, error = %e, "MQTT listener stopped");
        }
    })
}

fn free_loopback_address() -> Result<SocketAddr, EdgeError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    std::net::TcpListener::bind(any)
        .and_then(|l| l.local_addr())
        .map_err(|source| EdgeError::Bind { addr: any, source })
}

async fn wait_until_listening(addr: SocketAddr) -> Result<(), EdgeError> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Err(EdgeError::Internal(addr))
}

async fn forward_publishes(
    // Kept alive: dropping the sending half would disconnect the link.
    _link_tx: LinkTx,
    mut link_rx: LinkRx,
    events: mpsc::Sender<DevicePublish>,
    metrics: std::sync::Arc<Metrics>,
) {
    loop {
        let notification = match link_rx.next().await {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                error!(error = %e, "link to the embedded broker closed; no more device publishes");
                return;
            }
        };
        match notification {
            Notification::Forward(forward) => {
                let topic = match String::from_utf8(forward.publish.topic.to_vec()) {
                    Ok(t) => t,
                    Err(_) => {
                        Metrics::add(&metrics.unrouted, 1);
                        warn!("dropped a publish whose topic is not UTF-8");
                        continue;
                    }
                };
                let publish = DevicePublish {
                    topic,
                    payload: forward.publish.payload,
                    received_ms: crate::event::now_ms(),
                };
                if events.send(publish).await.is_err() {
                    debug!("pipeline closed; edge subscriber stops");
                    return;
                }
            }
            Notification::Unschedule => {
                // The router paused this link because its buffer was full; ask for more.
                if let Err(e) = link_rx.wake().await {
                    error!(error = %e, "cannot resume the link to the embedded broker");
                    return;
                }
            }
            other => debug!(?other, "ignored broker notification"),
        }
    }
}
