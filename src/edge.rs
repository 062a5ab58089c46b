//! The device-facing side: an embedded rumqttd broker (its router handles sessions,
//! subscriptions, retained messages and fan-out to local subscribers) with MQTT 3.1.1 and 5
//! listeners, and an in-process link through which the gateway receives every device publish.
//!
//! Guarantees: every publish the broker accepts on a topic not starting with `$` is handed to
//! the pipeline channel as one [`DevicePublish`], in the order the broker's router saw it; a
//! listener that cannot bind makes [`Edge::start`] fail with the address in the message.
//!
//! What it does not do (yet): rumqttd acknowledges a QoS1 publish when it receives it, before
//! outpost has committed anything to disk. Until outpost runs its own connection front (which
//! holds the PUBACK until a journal commit), a publish that was acknowledged but not yet
//! committed to the outbox is lost if the process dies; see the README's delivery guarantee.

use std::net::SocketAddr;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::config::BrokerConfig;

/// The client id of the gateway's own in-process link to the broker.
pub const PIPELINE_CLIENT_ID: &str = "outpost-pipeline";

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
    /// The broker's router refused the gateway's own link.
    #[error("cannot attach to the embedded broker: {0}")]
    Link(String),
}

/// The running broker and the task feeding the pipeline. Dropping it stops the listeners.
pub struct Edge {
    tasks: Vec<JoinHandle<()>>,
}

impl Edge {
    /// Starts the broker's router, its listeners and the in-process subscriber that sends every
    /// device publish to `events`. Must be called inside a tokio runtime.
    pub fn start(
        config: &BrokerConfig,
        events: mpsc::Sender<DevicePublish>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<Edge, EdgeError> {
        // Check every address first: rumqttd's listener only logs a bind failure.
        for addr in config.listen.iter().chain(&config.listen_v5) {
            std::net::TcpListener::bind(addr).map_err(|source| EdgeError::Bind {
                addr: *addr,
                source,
            })?;
        }

        let router_config = RouterConfig {
            max_connections: config.max_connections + 1,
            max_outgoing_packet_count: 200,
            // The in-memory log the router keeps per subscribed filter. The pipeline drains it
            // continuously; this bounds memory on a small board.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = Router::new(0, router_config).spawn();

        let connections = ConnectionSettings {
            connection_timeout_ms: config.connect_timeout_ms,
            max_payload_size: config.max_payload_bytes,
            max_inflight_count: config.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let mut tasks = Vec::new();
        let settings = |name: String, listen: SocketAddr| ServerSettings {
            name,
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: connections.clone(),
        };
        for (i, addr) in config.listen.iter().enumerate() {
            let mut server = Server::new(settings(format!("v4-{i}"), *addr), router_tx.clone(), V4);
            let addr = *addr;
            tasks.push(tokio::spawn(async move {
                info!(%addr, "MQTT 3.1.1 listener up");
                if let Err(e) = server.start(LinkType::Remote).await {
                    error!(%addr, error = %e, "MQTT 3.1.1 listener stopped");
                }
            }));
        }
        for (i, addr) in config.listen_v5.iter().enumerate() {
            let mut server = Server::new(settings(format!("v5-{i}"), *addr), router_tx.clone(), V5);
            let addr = *addr;
            tasks.push(tokio::spawn(async move {
                info!(%addr, "MQTT 5 listener up");
                if let Err(e) = server.start(LinkType::Remote).await {
                    error!(%addr, error = %e, "MQTT 5 listener stopped");
                }
            }));
        }

        let (mut link_tx, link_rx, _ack) = LinkBuilder::new(PIPELINE_CLIENT_ID, router_tx)
            .dynamic_filters(true)
            .build()
            .map_err(|e| EdgeError::Link(e.to_string()))?;
        link_tx
            .subscribe("#")
            .map_err(|e| EdgeError::Link(e.to_string()))?;
        tasks.push(tokio::spawn(forward_publishes(
            link_tx, link_rx, events, metrics,
        )));
        Ok(Edge { tasks })
    }

    /// Stops the listeners and the subscriber. Connections already open are closed when the
    /// process exits.
    pub fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn forward_publishes(
    // Kept alive: dropping the sending half would disconnect the link.
    _link_tx: LinkTx,
    mut link_rx: LinkRx,
    events: mpsc::Sender<DevicePublish>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
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
                        crate::metrics::Metrics::add(&metrics.unrouted, 1);
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
