//! The processing stage: device publishes in, durable outbox rows (or dead letters) out.
//!
//! For each batch of publishes taken from the edge, the pipeline finds the matching routes,
//! runs each route's handler (if any) on the route's events, renders the output topics, and
//! commits all outputs and dead letters of the batch in one SQLite transaction before it
//! wakes the uplinks.
//!
//! Guarantees:
//! - Nothing leaves this stage uncounted: every publish is routed or counted as `unrouted`;
//!   every event a handler fails on, and every output whose topic cannot be rendered, becomes a
//!   dead letter with its reason.
//! - A handler failure affects only the events that cause it: a failed batch is retried one
//!   event at a time, and only the events that still fail are dead-lettered.
//! - Order: a passthrough route queues events in arrival order; a handler route batches events
//!   by topic, so its outputs keep the order of their events per topic (MQTT's own ordering
//!   guarantee).
//! - A failing commit (disk full, read-only file system) is retried with backoff, holding the
//!   batch in memory and applying backpressure to the edge; it is never skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, warn};

use crate::edge::DevicePublish;
use crate::event::{Event, Output};
use crate::metrics::Metrics;
use crate::router::{Route, RouteTable, TemplateContext};
use crate::runtime::{Handler, HandlerFailure};
use crate::store::{NewDeadLetter, NewOutboxRow, Store};

/// The processing stage and everything it needs.
pub struct Pipeline {
    /// The compiled routes.
    pub routes: Arc<RouteTable>,
    /// Loaded handlers by module name.
    pub handlers: HashMap<String, Handler>,
    /// The database.
    pub store: Arc<Store>,
    /// One wake-up per upstream link, notified after rows for it were committed.
    pub wakes: HashMap<String, Arc<Notify>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// This gateway's id, for `{gateway}` in templates.
    pub gateway_id: String,
    /// Most events per handler invocation.
    pub max_batch: usize,
}

/// What one batch produced, ready to commit.
#[derive(Default)]
struct Results {
    outputs: Vec<NewOutboxRow>,
    dead: Vec<NewDeadLetter>,
}

impl Pipeline {
    /// Processes publishes until the channel closes and everything received is committed.
    pub async fn run(self, mut publishes: mpsc::Receiver<DevicePublish>) {
        let mut next_id: u64 = 1;
        let mut buffer = Vec::with_capacity(self.max_batch * 4);
        while publishes
            .recv_many(&mut buffer, (self.max_batch * 4).max(256))
            .await
            > 0
        {
            Metrics::add(&self.metrics.received, buffer.len() as u64);
            let mut results = Results::default();
            self.process(&mut buffer, &mut next_id, &mut results).await;
            self.commit(results).await;
        }
        debug!("pipeline finished: the edge closed");
    }

    async fn process(
        &self,
        publishes: &mut Vec<DevicePublish>,
        next_id: &mut u64,
        results: &mut Results,
    ) {
        // Events per route, and for handler routes per topic, in arrival order.
        let mut groups: Vec<(usize, Vec<Event>)> = Vec::new();
        let mut group_index: HashMap<(usize, String), usize> = HashMap::new();
        for publish in publishes.drain(..) {
            let id = *next_id;
            *next_id += 1;
            let mut matched = false;
            for (route_index, route) in self.routes.routes().iter().enumerate() {
                if !route.filter.matches(&publish.topic) {
                    continue;
                }
                matched = true;
                let event = Event {
                    id,
                    topic: publish.topic.clone(),
                    device: route.device_of(&publish.topic).unwrap_or("").to_string(),
                    payload: publish.payload.to_vec(),
                    received_ms: publish.received_ms,
                    location: None,
                    regions: Vec::new(),
                };
                if route.handler.is_none() {
                    self.queue(route, &event, None, results);
                    continue;
                }
                let key = (route_index, publish.topic.clone());
                match group_index.get(&key) {
                    Some(&g) if groups[g].1.len() < self.max_batch => groups[g].1.push(event),
                    _ => {
                        group_index.insert(key, groups.len());
                        groups.push((route_index, vec![event]));
                    }
                }
            }
            if !matched {
                Metrics::add(&self.metrics.unrouted, 1);
            }
        }
        for (route_index, events) in groups {
            let route = &self.routes.routes()[route_index];
            self.run_handler(route, events, results).await;
        }
    }

    /// Runs the route's handler on events that share a topic; on failure, retries them one by
    /// one so that only the failing ones become dead letters.
    async fn run_handler(&self, route: &Route, events: Vec<Event>, results: &mut Results) {
        let Some(module) = route.handler.as_deref() else {
            return;
        };
        let Some(handler) = self.handlers.get(module) else {
            // Config validation makes this unreachable; record it rather than lose the events.
            for event in &events {
                results.dead.push(dead_letter(
                    route,
                    event,
                    "no-handler",
                    format!("module {module:?} is not loaded"),
                ));
            }
            Metrics::add(&self.metrics.dead_lettered, events.len() as u64);
            return;
        };
        let first = events.first().cloned();
        match invoke(handler, events.clone(), &self.metrics).await {
            Ok(outputs) => {
                if let Some(first) = first {
                    for output in outputs {
                        self.queue(route, &first, Some(output), results);
                    }
                }
            }
            Err(failure) if events.len() == 1 => {
                self.fail(route, &events[0], &failure, results);
            }
            Err(failure) => {
                debug!(route = %route.name, %failure, size = events.len(), "batch failed; retrying its events one by one");
                for event in events {
                    match invoke(handler, vec![event.clone()], &self.metrics).await {
                        Ok(outputs) => {
                            for output in outputs {
                                self.queue(route, &event, Some(output), results);
                            }
                        }
                        Err(failure) => self.fail(route, &event, &failure, results),
                    }
                }
            }
        }
    }

    fn fail(&self, route: &Route, event: &Event, failure: &HandlerFailure, results: &mut Results) {
        warn!(route = %route.name, topic = %event.topic, reason = failure.reason(), %failure, "handler failed; event dead-lettered");
        Metrics::add(&self.metrics.dead_lettered, 1);
        results.dead.push(dead_letter(
            route,
            event,
            failure.reason(),
            failure.to_string(),
        ));
    }

    /// Renders the output topic and adds the row, or a dead letter when the topic is invalid.
    /// `output` is the handler's output; `None` forwards the event itself.
    fn queue(&self, route: &Route, event: &Event, output: Option<Output>, results: &mut Results) {
        let (output_topic, payload) = match output {
            Some(o) => (Some(o.topic), o.payload),
            None => (None, event.payload.clone()),
        };
        let context = TemplateContext {
            topic: &event.topic,
            device: &event.device,
            gateway: &self.gateway_id,
            output: output_topic.as_deref(),
        };
        match route.topic.render(&context) {
            Ok(topic) => results.outputs.push(NewOutboxRow {
                link: route.upstream.clone(),
                msg_id: format!("{}-{}-{}", self.gateway_id, event.id, route.name),
                route: route.name.clone(),
                topic,
                payload,
                received_ms: event.received_ms,
            }),
            Err(e) => {
                warn!(route = %route.name, error = %e, "output topic cannot be rendered; dead-lettered");
                Metrics::add(&self.metrics.render_failures, 1);
                Metrics::add(&self.metrics.dead_lettered, 1);
                let mut letter = dead_letter(route, event, "bad-output-topic", e.to_string());
                letter.payload = payload;
                results.dead.push(letter);
            }
        }
    }

    /// Commits the batch, retrying until it succeeds, then wakes the uplinks that got rows.
    async fn commit(&self, results: Results) {
        if results.outputs.is_empty() && results.dead.is_empty() {
            return;
        }
        let results = Arc::new(results);
        let mut attempt: u32 = 0;
        loop {
            let store = self.store.clone();
            let batch = results.clone();
            match tokio::task::spawn_blocking(move || store.commit(&batch.outputs, &batch.dead))
                .await
            {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    attempt += 1;
                    Metrics::add(&self.metrics.store_errors, 1);
                    error!(error = %e, attempt, "cannot commit to the outbox; holding the batch and retrying");
                }
                Err(e) => {
                    attempt += 1;
                    Metrics::add(&self.metrics.store_errors, 1);
                    error!(error = %e, attempt, "outbox commit task failed; retrying");
                }
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(100)))).await;
        }
        Metrics::add(&self.metrics.queued, results.outputs.len() as u64);
        let mut woken: Vec<&str> = Vec::new();
        for row in &results.outputs {
            if !woken.contains(&row.link.as_str()) {
                woken.push(&row.link);
                if let Some(wake) = self.wakes.get(&row.link) {
                    wake.notify_one();
                }
            }
        }
    }
}

async fn invoke(
    handler: &Handler,
    events: Vec<Event>,
    metrics: &Metrics,
) -> Result<Vec<Output>, HandlerFailure> {
    Metrics::add(&metrics.handler_invocations, 1);
    let handler = handler.clone();
    let result = tokio::task::spawn_blocking(move || handler.invoke(&events))
        .await
        .unwrap_or_else(|e| Err(HandlerFailure::Host(format!("handler task failed: {e}"))));
    if result.is_err() {
        Metrics::add(&metrics.handler_failures, 1);
    }
    result
}

fn dead_letter(route: &Route, event: &Event, reason: &str, detail: String) -> NewDeadLetter {
    NewDeadLetter {
        route: route.name.clone(),
        module: route.handler.clone(),
        reason: reason.to_string(),
        detail,
        attempts: 1,
        topic: event.topic.clone(),
        device: event.device.clone(),
        payload: event.payload.clone(),
        received_ms: event.received_ms,
    }
}
