//! One connection per upstream broker, draining that link's outbox rows in order.
//!
//! Guarantees:
//! - Rows are published with QoS 1 in outbox order, with up to `inflight` awaiting PUBACK.
//! - A row is deleted from the outbox only after the upstream's PUBACK for it arrived.
//! - When the connection drops, everything not yet acknowledged is sent again on the next
//!   connection, starting from the oldest row still queued: rumqttc's own memory of in-flight
//!   publishes is thrown away with the connection, because the outbox is the source of truth.
//!   A row acknowledged by the upstream whose PUBACK was lost with the connection is therefore
//!   sent twice (at-least-once).
//! - Reconnects back off exponentially with jitter, from `reconnect_min_ms` to
//!   `reconnect_max_ms`.
//!
//! This module does not decide what goes into the outbox, and never re-routes a row to another
//! link.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::config::{parse_broker_url, UpstreamConfig};
use crate::metrics::Metrics;
use crate::store::{OutboxRow, Store};

/// Everything one uplink needs.
pub struct Uplink {
    /// The upstream's configuration.
    pub config: UpstreamConfig,
    /// The gateway id, for the default client id.
    pub gateway_id: String,
    /// The database holding the outbox.
    pub store: Arc<Store>,
    /// Notified whenever rows were added to the outbox.
    pub wake: Arc<Notify>,
    /// Where delivered counts and the connection state go.
    pub metrics: Arc<Metrics>,
}

/// How a connection ended.
enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// The connection failed or dropped; `was_up` says whether it had been established.
    Lost { was_up: bool, reason: String },
}

enum DeleteRequest {
    Rows(Vec<i64>),
    Flush(oneshot::Sender<()>),
}

impl Uplink {
    /// The MQTT client id this uplink connects with.
    pub fn client_id(&self) -> String {
        self.config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("outpost-{}-{}", self.gateway_id, self.config.name))
    }

    /// Runs until `shutdown` becomes true. Never returns an error: every failure is logged,
    /// counted and retried after a backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.config.name.clone();
        let address = match parse_broker_url(&self.config.url) {
            Ok(a) => a,
            Err(e) => {
                // Config validation rejects this earlier; keep the task harmless anyway.
                warn!(link = %name, error = %e, "invalid upstream URL; link disabled");
                return;
            }
        };
        let (delete_tx, delete_rx) = mpsc::unbounded_channel();
        let deleter = tokio::spawn(delete_acknowledged(
            self.store.clone(),
            self.metrics.clone(),
            delete_rx,
        ));
        let min = Duration::from_millis(self.config.reconnect_min_ms);
        let max = Duration::from_millis(self.config.reconnect_max_ms);
        let mut backoff = min;
        // Failed attempts since the link was last up: the first is a warning, the rest (one
        // per backoff step) are debug lines, so a long outage does not flood the log.
        let mut failed_attempts: u64 = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let mut options = MqttOptions::new(self.client_id(), &address.host, address.port);
            options
                .set_keep_alive(Duration::from_secs(self.config.keep_alive_secs))
                .set_clean_session(true)
                .set_inflight(self.config.inflight)
                .set_request_channel_capacity(self.config.inflight as usize + 16);
            let end = self.session(options, &delete_tx, &mut shutdown).await;
            self.metrics.set_link_connected(&name, false);
            // Acknowledged rows must be gone before the next session re-reads the outbox.
            let (done_tx, done_rx) = oneshot::channel();
            if delete_tx.send(DeleteRequest::Flush(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
            match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Lost { was_up, reason } => {
                    if was_up {
                        warn!(link = %name, upstream = %address, %reason, "upstream connection lost; outputs wait in the outbox");
                        backoff = min;
                        failed_attempts = 0;
                    } else if failed_attempts == 0 {
                        warn!(link = %name, upstream = %address, %reason, "upstream not reachable; outputs wait in the outbox, retrying with backoff");
                    } else {
                        debug!(link = %name, upstream = %address, %reason, attempt = failed_attempts + 1, "upstream still not reachable");
                    }
                    failed_attempts += 1;
                    let jitter = rand::rng().random_range(0.5..1.0);
                    let delay = backoff.mul_f64(jitter);
                    backoff = (backoff * 2).min(max);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
        drop(delete_tx);
        let _ = deleter.await;
        info!(link = %name, "uplink stopped");
    }

    async fn session(
        &self,
        options: MqttOptions,
        delete_tx: &mpsc::UnboundedSender<DeleteRequest>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let name = &self.config.name;
        let window = self.config.inflight as usize;
        let (client, mut eventloop) = AsyncClient::new(options, window + 16);
        // The event loop runs in its own task so that this one only ever waits on channels,
        // which are safe to select on.
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if events_tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        let _abort_driver = AbortOnDrop(driver);

        // Wait for CONNACK.
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                        if ack.code == ConnectReturnCode::Success {
                            break;
                        }
                        return SessionEnd::Lost { was_up: false, reason: format!("refused: {:?}", ack.code) };
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return SessionEnd::Lost { was_up: false, reason: e.to_string() },
                    None => return SessionEnd::Lost { was_up: false, reason: "event loop ended".into() },
                },
                _ = shutdown.changed() => return SessionEnd::Shutdown,
            }
        }
        info!(link = %name, "upstream connected");
        self.metrics.set_link_connected(name, true);

        // Outbox rows sent in this session but whose packet id is not known yet, in send order
        // (rumqttc reports `Outgoing::Publish(pkid)` in the order publishes were requested).
        let mut unassigned: VecDeque<i64> = VecDeque::new();
        let mut by_pkid: HashMap<u16, i64> = HashMap::new();
        let mut last_sent: i64 = 0;
        let mut in_flight = 0usize;
        let mut outbox_drained = false;
        loop {
            // Fill the window from the outbox.
            while in_flight < window && !outbox_drained {
                let store = self.store.clone();
                let link = name.clone();
                let want = window - in_flight;
                let rows =
                    tokio::task::spawn_blocking(move || store.outbox_after(&link, last_sent, want))
                        .await;
                let rows: Vec<OutboxRow> = match rows {
                    Ok(Ok(rows)) => rows,
                    Ok(Err(e)) => {
                        warn!(link = %name, error = %e, "cannot read the outbox; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    Err(e) => {
                        warn!(link = %name, error = %e, "outbox reader task failed");
                        break;
                    }
                };
                if rows.len() < want {
                    outbox_drained = true;
                }
                for row in rows {
                    if let Err(e) =
                        client.try_publish(row.topic, QoS::AtLeastOnce, false, row.payload)
                    {
                        // The request channel is sized above the window, so this means the
                        // event loop is gone; the session is over.
                        return SessionEnd::Lost {
                            was_up: true,
                            reason: e.to_string(),
                        };
                    }
                    unassigned.push_back(row.id);
                    last_sent = row.id;
                    in_flight += 1;
                }
            }

            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(id) = unassigned.pop_front() {
                            by_pkid.insert(pkid, id);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(id) = by_pkid.remove(&ack.pkid) {
                            in_flight -= 1;
                            if delete_tx.send(DeleteRequest::Rows(vec![id])).is_err() {
                                return SessionEnd::Shutdown;
                            }
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::Disconnect))) => {
                        return SessionEnd::Lost { was_up: true, reason: "upstream sent DISCONNECT".into() };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return SessionEnd::Lost { was_up: true, reason: e.to_string() },
                    None => return SessionEnd::Lost { was_up: true, reason: "event loop ended".into() },
                },
                _ = self.wake.notified() => outbox_drained = false,
                _ = shutdown.changed() => {
                    let _ = client.try_disconnect();
                    return SessionEnd::Shutdown;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes acknowledged rows in batches (one transaction for everything that arrived since the
/// last one), so that a fast upstream does not cost one disk sync per message.
async fn delete_acknowledged(
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    mut requests: mpsc::UnboundedReceiver<DeleteRequest>,
) {
    let mut buffer = Vec::new();
    while requests.recv_many(&mut buffer, 4096).await > 0 {
        let mut ids = Vec::new();
        let mut waiters = Vec::new();
        for request in buffer.drain(..) {
            match request {
                DeleteRequest::Rows(rows) => ids.extend(rows),
                DeleteRequest::Flush(done) => waiters.push(done),
            }
        }
        let mut attempt = 0u32;
        while !ids.is_empty() {
            let store = store.clone();
            let batch = ids.clone();
            match tokio::task::spawn_blocking(move || store.delete_outbox(&batch)).await {
                Ok(Ok(())) => {
                    Metrics::add(&metrics.delivered, ids.len() as u64);
                    break;
                }
                result => {
                    // The rows stay queued and would be sent again; keep trying to delete them.
                    attempt += 1;
                    let reason = match result {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(())) => String::new(),
                    };
                    warn!(%reason, attempt, "cannot delete delivered rows; retrying");
                    Metrics::add(&metrics.store_errors, 1);
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))))
                        .await;
                }
            }
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}
