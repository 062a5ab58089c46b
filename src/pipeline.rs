//! The processing stage: journaled device publishes in, durable outbox rows (or dead letters)
//! out.
//!
//! The pipeline reads the journal in id order, in batches; for each batch it finds the
//! matching routes, runs each route's handler (if any) on the route's events, renders the
//! output topics, and in one SQLite transaction inserts all outputs and dead letters and deletes
//! the batch's journal rows. Then it wakes the uplinks. A crash at any point leaves each event
//! either still in the journal (processed again on start: at-least-once) or fully moved.
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

use tokio::sync::{watch, Notify};
use tracing::{debug, error, warn};

use crate::event::{Event, Output};
use crate::metrics::Metrics;
use crate::router::{Route, RouteTable, TemplateContext};
use crate::runtime::{Handler, HandlerFailure};
use crate::store::{JournalRow, NewDeadLetter, NewOutboxRow, Store};

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
    journal_done: Vec<i64>,
}

impl Pipeline {
    /// Processes the journal: first what a previous run left, then each new commit (`committed`
    /// is notified after every journal commit). Once `finish` is true, it processes what is
    /// left and returns.
    pub async fn run(self, committed: Arc<Notify>, mut finish: watch::Receiver<bool>) {
        let limit = (self.max_batch * 4).max(512);
        let mut last: i64 = 0;
        loop {
            let store = self.store.clone();
            let rows = tokio::task::spawn_blocking(move || store.journal_after(last, limit)).await;
            let rows = match rows {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    Metrics::add(&self.metrics.store_errors, 1);
                    error!(error = %e, "cannot read the journal; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "journal reader task failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Some(newest) = rows.last().map(|r| r.id) else {
                if *finish.borrow() {
                    debug!("pipeline finished: journal drained");
                    return;
                }
                tokio::select! {
                    _ = committed.notified() => {}
                    _ = finish.changed() => {}
                }
                continue;
            };
            last = newest;
            Metrics::add(&self.metrics.received, rows.len() as u64);
            let mut results = Results::default();
            self.process(rows, &mut results).await;
            self.commit(results).await;
        }
    }

    async fn process(&self, rows: Vec<JournalRow>, results: &mut Results) {
        // Events per route, and for handler routes per topic, in journal order.
        let mut groups: Vec<(usize, Vec<Event>)> = Vec::new();
        let mut group_index: HashMap<(usize, String), usize> = HashMap::new();
        for row in rows {
            results.journal_done.push(row.id);
            let mut matched = false;
            for (route_index, route) in self.routes.routes().iter().enumerate() {
                if !route.filter.matches(&row.topic) {
                    continue;
                }
                matched = true;
                let event = Event {
                    id: row.id as u64,
                    topic: row.topic.clone(),
                    device: route.device_of(&row.topic).unwrap_or("").to_string(),
                    payload: row.payload.clone(),
                    received_ms: row.received_ms,
                    location: None,
                    regions: Vec::new(),
                };
                if route.handler.is_none() {
                    self.queue(route, &event, None, 0, results);
                    continue;
                }
                let key = (route_index, row.topic.clone());
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
                    for (n, output) in outputs.into_iter().enumerate() {
                        self.queue(route, &first, Some(output), n, results);
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
                            for (n, output) in outputs.into_iter().enumerate() {
                                self.queue(route, &event, Some(output), n, results);
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
    /// `output` is the handler's output; `None` forwards the event itself. `n` numbers the
    /// outputs derived from one event (or one batch), for the message id.
    fn queue(
        &self,
        route: &Route,
        event: &Event,
        output: Option<Output>,
        n: usize,
        results: &mut Results,
    ) {
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
                msg_id: format!("{}-{}-{}-{n}", self.gateway_id, event.id, route.name),
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
        if results.outputs.is_empty() && results.dead.is_empty() && results.journal_done.is_empty()
        {
            return;
        }
        let results = Arc::new(results);
        let mut attempt: u32 = 0;
        loop {
            let store = self.store.clone();
            let batch = results.clone();
            match tokio::task::spawn_blocking(move || {
                store.commit(&batch.outputs, &batch.dead, &batch.journal_done)
            })
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
