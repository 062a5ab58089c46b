//! The processing stage: journaled device publishes in, durable outbox rows (or retries, or
//! dead letters) out.
//!
//! The pipeline reads the journal in id order, in batches; for each batch it finds the
//! matching routes, renders the output topics of passthrough routes, queues the events of
//! handler routes for their module's lane, and in one SQLite transaction inserts all outputs,
//! queued events and dead letters and deletes the batch's journal rows. Then it wakes the
//! uplinks and the lanes. Each module has a lane (a task) that reads its routes' queued and
//! due retry rows (both live in the retries table), runs the handler on them in batches per
//! topic, and commits outputs, retries and dead letters in its own transactions, so a slow or
//! stuck module delays only its own routes.
//!
//! Guarantees:
//! - One durable home at a time: a crash at any point leaves each event either still in the
//!   journal (or the retries), processed again on start (at-least-once), or fully moved.
//! - Nothing leaves this stage uncounted: every publish is routed or counted as `unrouted`;
//!   every event a handler fails on is retried with exponential backoff and jitter up to the
//!   route's `max_attempts`, then becomes a dead letter with its reason; malformed payloads on a
//!   JSON route and outputs whose topic cannot be rendered become dead letters at once.
//! - A handler failure affects only the events that cause it: a failed batch is retried one
//!   event at a time, and only the events that still fail are retried later.
//! - Order: a passthrough route queues events in journal order; a handler route's lane takes
//!   its queue in order and batches events by topic, so its outputs keep the order of their
//!   events per topic (MQTT's own ordering guarantee). Retried events arrive later than their
//!   successors (that is what a retry is). Outputs of different routes are not ordered
//!   relative to each other.
//! - A failing commit (disk full, read-only file system, outbox full under `reject-new`) is
//!   retried with backoff, holding the batch, which lets the journal fill and so stops the
//!   devices (backpressure); it is never skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngExt;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::config::{PayloadFormat, RetryConfig};
use crate::event::{join_tags, now_ms, Event, Geo, Output};
use crate::geo::locator::{Locator, NoLocation, Observed, Source, GATEWAY_CLIENT, LOCAL_LINK};
use crate::geo::Placement;
use crate::handlers::breaker::{Admission, Breaker, QuarantinePolicy, Transition};
use crate::handlers::registry::Registry;
use crate::handlers::runtime::{Handler, HandlerFailure};
use crate::metrics::Metrics;
use crate::routing::predicate::Facts;
use crate::routing::{Route, RouteTable, TemplateContext};
use crate::store::{
    Batch, JournalRow, NewDeadLetter, NewJournalEntry, NewOutboxRow, NewRetry, OutboxPolicy,
    RetryRow, RouteSet, Stage, Store, StoreError,
};

/// Longest sleep when idle: retries scheduled by another process (or a clock change) are
/// noticed within this.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// What a route does besides routing: retries, deadline, time to live, payload check.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy {
    /// Handler retries.
    pub retry: RetryConfig,
    /// Handler deadline (None: the runtime's).
    pub deadline: Option<Duration>,
    /// Outputs' time to live (None: forever).
    pub ttl: Option<Duration>,
    /// Required payload format.
    pub payload: PayloadFormat,
    /// What happens to events while the route's module is quarantined.
    pub on_quarantine: QuarantinePolicy,
    /// This route's memory cap per instance, in bytes (`None`: the runtime's).
    pub memory_limit_bytes: Option<usize>,
    /// Most outputs per invocation (`None`: the runtime's).
    pub max_outputs: Option<usize>,
    /// Most output payload bytes per invocation (`None`: the runtime's).
    pub max_output_bytes: Option<usize>,
    /// Most of the route's invocations at once (`None`: the module's
    /// `max_concurrent_per_module`, which also bounds it).
    pub max_concurrent: Option<usize>,
}

impl Default for RoutePolicy {
    fn default() -> Self {
        RoutePolicy {
            retry: RetryConfig::default(),
            deadline: None,
            ttl: None,
            payload: PayloadFormat::Any,
            on_quarantine: QuarantinePolicy::Wait,
            memory_limit_bytes: None,
            max_outputs: None,
            max_output_bytes: None,
            max_concurrent: None,
        }
    }
}

/// The processing stage and everything it needs.
pub struct Pipeline {
    /// The compiled routes.
    pub routes: Arc<RouteTable>,
    /// Per route name: retries, deadline, TTL, payload format.
    pub policies: HashMap<String, RoutePolicy>,
    /// The handler each module name runs now (deploys swap them while the pipeline runs).
    pub registry: Arc<Registry>,
    /// The database.
    pub store: Arc<Store>,
    /// One wake-up per upstream link, notified after rows for it were committed.
    pub wakes: HashMap<String, Arc<Notify>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// This gateway's id, for `{gateway}` in templates and message ids.
    pub gateway_id: String,
    /// Most events per handler invocation.
    pub max_batch: usize,
    /// Topics of one module's lane that may run their batches at once.
    pub max_concurrent_per_module: usize,
    /// Quarantines modules that keep failing.
    pub breaker: Arc<Breaker>,
    /// Locations, region tags, the device registry and enter/exit transitions.
    pub locator: Arc<Locator>,
}

/// How often events of a declared but undeployed module look again for their handler.
const NOT_DEPLOYED_RECHECK: Duration = Duration::from_secs(2);

/// One event on one route, with what is known of its history.
#[derive(Clone)]
struct Pending {
    event: Event,
    /// Handler attempts already made.
    attempts: u32,
    /// Its outputs stay on the gateway (an event without location under `local-only`).
    local: bool,
}

impl Pending {
    /// The event's geography in its stored form.
    fn geo(&self) -> String {
        Geo {
            location: self.event.location,
            regions: self.event.regions.clone(),
            local: self.local,
        }
        .encode()
    }
}

impl Pipeline {
    /// Processes the journal and due retries: first what a previous run left, then each new
    /// commit (`committed` is notified after every journal commit). Once `finish` is true, it
    /// processes what is left in the journal and returns (retries not yet due, and events
    /// queued for a handler lane, stay stored for the next start).
    ///
    /// Handler routes run in lanes, one task per module: the main loop moves a handler route's
    /// events from the journal to that module's durable queue (the retries table, due now) in
    /// its journal transaction, and the module's lane invokes the handler and commits the
    /// outputs. A module that runs to its deadline therefore delays only its own lane;
    /// passthrough routes and the other modules go on at their own pace.
    pub async fn run(self, committed: Arc<Notify>, finish: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut modules: HashMap<String, Vec<String>> = HashMap::new();
        for route in this.routes.routes() {
            if let Some(module) = &route.handler {
                modules
                    .entry(module.clone())
                    .or_default()
                    .push(route.name.clone());
            }
        }
        let mut kicks: HashMap<String, Arc<Notify>> = HashMap::new();
        let mut lane_routes = Vec::new();
        let mut lanes = Vec::new();
        for (module, routes) in modules {
            let kick = Arc::new(Notify::new());
            for route in &routes {
                kicks.insert(route.clone(), kick.clone());
            }
            lane_routes.extend(routes.iter().cloned());
            lanes.push(tokio::spawn(this.clone().lane(
                module,
                routes,
                kick,
                finish.clone(),
            )));
        }
        this.main_loop(committed, finish, kicks, lane_routes).await;
        for lane in lanes {
            let _ = lane.await;
        }
    }

    /// One module's lane: invokes its handler on its routes' due queue and retry rows, and
    /// commits the results, until `finish`.
    async fn lane(
        self: Arc<Self>,
        module: String,
        routes: Vec<String>,
        kick: Arc<Notify>,
        mut finish: watch::Receiver<bool>,
    ) {
        let set = RouteSet::Only(routes);
        loop {
            if *finish.borrow() {
                debug!(%module, "handler lane finished");
                return;
            }
            match self.process_due(&set).await {
                Some(false) => {}
                // Processed a batch, or the read failed (logged, after a pause): look again.
                Some(true) | None => continue,
            }
            let wait = self.idle_wait(&set).await;
            tokio::select! {
                _ = kick.notified() => {}
                _ = finish.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Processes and commits one batch of `set`'s due retry rows. `Some(true)` when there were
    /// any, `Some(false)` when none, `None` when they could not be read (logged, after a pause).
    async fn process_due(self: &Arc<Self>, set: &RouteSet) -> Option<bool> {
        let store = self.store.clone();
        let query = set.clone();
        let due =
            tokio::task::spawn_blocking(move || store.due_retries_of(&query, now_ms(), 256)).await;
        match due {
            Ok(Ok(due)) if !due.is_empty() => {
                let batch = self.process_retries(due).await;
                self.commit(batch).await;
                Some(true)
            }
            Ok(Ok(_)) => Some(false),
            Ok(Err(e)) => {
                self.read_failed(&e.to_string()).await;
                None
            }
            Err(e) => {
                self.read_failed(&e.to_string()).await;
                None
            }
        }
    }

    /// How long to sleep when idle: until `set`'s next retry falls due, at most [`IDLE_POLL`].
    async fn idle_wait(&self, set: &RouteSet) -> Duration {
        let store = self.store.clone();
        let query = set.clone();
        let next_due = tokio::task::spawn_blocking(move || store.next_retry_due_of(&query))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let wait = match next_due {
            Some(due) => Duration::from_millis(due.saturating_sub(now_ms()).max(1)),
            None => IDLE_POLL,
        };
        wait.min(IDLE_POLL)
    }

    /// The journal, and the retries of routes that have no lane (a route removed from the
    /// configuration, a replayed passthrough event).
    async fn main_loop(
        self: &Arc<Self>,
        committed: Arc<Notify>,
        mut finish: watch::Receiver<bool>,
        kicks: HashMap<String, Arc<Notify>>,
        lane_routes: Vec<String>,
    ) {
        let limit = (self.max_batch * 4).max(2048);
        let mut last: i64 = 0;
        let others = RouteSet::Except(lane_routes);
        let kick_all = || {
            for kick in kicks.values() {
                kick.notify_one();
            }
        };
        loop {
            // A read failure is logged (after a pause) and the journal is read all the same.
            if self.process_due(&others).await == Some(true) {
                continue;
            }

            // Under reject-new, take no more events than the outbox has room for, so that what
            // fits is queued and only the rest waits in the journal.
            let mut take = limit;
            if self.store.limits().outbox_policy == OutboxPolicy::RejectNew {
                // Events queued for the lanes will need outbox room too.
                let queued = match kicks.is_empty() {
                    true => 0,
                    false => self.store.retry_count().unwrap_or(0),
                };
                let room = self.store.outbox_room().saturating_sub(queued) as usize;
                if room == 0 {
                    Metrics::add(&self.metrics.outbox_full_waits, 1);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = finish.changed() => {}
                    }
                    if *finish.borrow() && self.store.journal_depth() > 0 {
                        warn!(left = self.store.journal_depth(), "stopping with the outbox full; the journal keeps the rest for the next start");
                        return;
                    }
                    continue;
                }
                take = take.min(room);
            }
            let store = self.store.clone();
            let budget = self.batch_bytes();
            let rows =
                tokio::task::spawn_blocking(move || store.journal_batch(last, take, budget)).await;
            let rows = match rows {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    self.read_failed(&e.to_string()).await;
                    continue;
                }
                Err(e) => {
                    self.read_failed(&e.to_string()).await;
                    continue;
                }
            };
            let Some(newest) = rows.last().map(|r| r.id) else {
                if *finish.borrow() {
                    debug!("pipeline finished: journal drained");
                    return;
                }
                let wait = self.idle_wait(&others).await;
                tokio::select! {
                    // Journal commits and dead-letter replays (which may have queued events
                    // for a lane) end up here.
                    _ = committed.notified() => kick_all(),
                    _ = finish.changed() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            };
            last = newest;
            Metrics::add(&self.metrics.received, rows.len() as u64);
            let batch = self.process_journal(rows).await;
            let queued: Vec<&Arc<Notify>> = batch
                .retries
                .iter()
                .filter_map(|r| kicks.get(&r.route))
                .collect();
            let queued: Vec<Arc<Notify>> = queued.into_iter().cloned().collect();
            self.commit(batch).await;
            for kick in queued {
                kick.notify_one();
            }
        }
    }

    /// Most payload bytes read from the journal for one batch: a twentieth of the database cap
    /// (so that a batch's transaction fits in the headroom the journal leaves), and a few MiB
    /// without a cap (memory on a small board).
    fn batch_bytes(&self) -> usize {
        match self.store.limits().max_db_bytes {
            0 => 8 * 1024 * 1024,
            cap => (cap / 20).max(1) as usize,
        }
    }

    async fn read_failed(&self, error: &str) {
        Metrics::add(&self.metrics.store_errors, 1);
        error!(%error, "cannot read the journal or retries; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    fn policy(&self, route: &Route) -> RoutePolicy {
        self.policies.get(&route.name).cloned().unwrap_or_default()
    }

    async fn process_journal(self: &Arc<Self>, rows: Vec<JournalRow>) -> Batch {
        let mut batch = Batch::default();
        let mut per_route: Vec<Vec<Pending>> =
            self.routes.routes().iter().map(|_| Vec::new()).collect();
        let plan = self.locator.plan();
        let mut observed = Observed::default();
        let mut placement = Placement::default();
        for row in rows {
            batch.journal_done.push(row.id);
            let mut matched = false;
            // Parsed at most once per event, and only when geography or a predicate needs it.
            let mut json: Option<Option<serde_json::Value>> = None;
            let mut placed: Option<crate::geo::Location> = None;
            let mut memo = crate::geo::locator::ResolveMemo::default();
            if plan.gps_topic.is_some() {
                let payload = json
                    .get_or_insert_with(|| serde_json::from_slice(&row.payload).ok())
                    .as_ref();
                match self.locator.gps_fix(&row.topic, payload, row.received_ms) {
                    Ok(Some(fix)) => batch.devices.push(fix),
                    Ok(None) => {}
                    Err(e) => {
                        Metrics::add(&self.metrics.bad_locations, 1);
                        warn!(topic = %row.topic, error = %e, "GPS fix with invalid coordinates ignored");
                    }
                }
            }
            for (index, route) in self.routes.routes().iter().enumerate() {
                if !route.filter.matches(&row.topic) {
                    continue;
                }
                let device = route.device_of(&row.topic).unwrap_or("");
                let mut event = Event {
                    id: row.id as u64,
                    topic: row.topic.clone(),
                    device: device.to_string(),
                    client_id: row.client_id.clone(),
                    payload: row.payload.clone(),
                    received_ms: row.received_ms,
                    location: None,
                    regions: Vec::new(),
                };
                let needs_payload =
                    plan.active || route.when.as_ref().is_some_and(|w| w.needs_payload());
                let payload = match needs_payload {
                    true => json
                        .get_or_insert_with(|| serde_json::from_slice(&row.payload).ok())
                        .as_ref(),
                    false => None,
                };
                let mut location = None;
                if plan.active {
                    match self.locator.resolve_memo(&mut memo, index, payload, device) {
                        Ok(found) => {
                            if let Some((at, source)) = found {
                                if placed != Some(at) {
                                    self.locator.place(at, &mut placement);
                                    placed = Some(at);
                                }
                                if source == Source::Payload && row.client_id != GATEWAY_CLIENT {
                                    self.locator.observe(
                                        device,
                                        at,
                                        &placement,
                                        row.received_ms,
                                        &mut observed,
                                    );
                                }
                                location = Some(at);
                            }
                        }
                        Err(e) => {
                            matched = true;
                            Metrics::add(&self.metrics.bad_locations, 1);
                            let p = Pending {
                                event,
                                attempts: 0,
                                local: false,
                            };
                            self.dead_letter(route, &p, "bad-location", e.to_string(), &mut batch);
                            continue;
                        }
                    }
                }
                let empty: &[Arc<str>] = &[];
                let (fences, regions) = match location {
                    Some(_) => (&placement.fences[..], &placement.regions[..]),
                    None => (empty, empty),
                };
                let facts = Facts {
                    payload,
                    location: location.map(Into::into),
                    fences,
                    regions,
                    distance: &crate::geo::locator::GEODESIC,
                };
                if !route.accepts(&facts) {
                    continue;
                }
                matched = true;
                let mut local = false;
                match location {
                    Some(at) => {
                        event.location = Some(at.into());
                        event.regions = regions.iter().map(|r| r.to_string()).collect();
                    }
                    None if plan.residency => match &plan.no_location {
                        NoLocation::LocalOnly => local = true,
                        NoLocation::Region(region) => event.regions = vec![region.clone()],
                        NoLocation::DeadLetter => {
                            Metrics::add(&self.metrics.no_location, 1);
                            let p = Pending {
                                event,
                                attempts: 0,
                                local: false,
                            };
                            self.dead_letter(
                                route,
                                &p,
                                "no-location",
                                "the event has no location (payload, device or gateway) and geography.no_location is \"dead-letter\"".into(),
                                &mut batch,
                            );
                            continue;
                        }
                    },
                    None => {}
                }
                per_route[index].push(Pending {
                    event,
                    attempts: 0,
                    local,
                });
            }
            if !matched {
                Metrics::add(&self.metrics.unrouted, 1);
            }
        }
        // One registry row per device and batch: its last position.
        let mut seen = std::collections::HashSet::new();
        let mut positions: Vec<_> = observed
            .positions
            .into_iter()
            .rev()
            .filter(|p| seen.insert(p.device.clone()))
            .collect();
        positions.reverse();
        batch.devices.append(&mut positions);
        for (topic, payload) in observed.transitions {
            Metrics::add(&self.metrics.geofence_transitions, 1);
            batch.events.push(NewJournalEntry {
                topic,
                payload: payload.into(),
                qos: 1,
                retain: false,
                client_id: Arc::from(GATEWAY_CLIENT),
                received_ms: now_ms(),
            });
        }
        for (index, pending) in per_route.into_iter().enumerate() {
            if !pending.is_empty() {
                self.run_route(&self.routes.routes()[index], pending, &mut batch, true)
                    .await;
            }
        }
        batch
    }

    async fn process_retries(self: &Arc<Self>, due: Vec<RetryRow>) -> Batch {
        let mut batch = Batch::default();
        let mut per_route: HashMap<usize, Vec<Pending>> = HashMap::new();
        for row in due {
            batch.retries_done.push(row.id);
            let r = row.retry;
            let Some(index) = self
                .routes
                .routes()
                .iter()
                .position(|route| route.name == r.route)
            else {
                // The route was removed from the configuration since: keep the event.
                Metrics::add(&self.metrics.dead_lettered, 1);
                batch.dead.push(NewDeadLetter {
                    stage: Stage::Event,
                    event_id: r.event_id,
                    route: r.route.clone(),
                    module: None,
                    module_version: None,
                    link: None,
                    msg_id: None,
                    reason: "no-route".into(),
                    detail: format!("route {:?} is no longer configured", r.route),
                    attempts: r.attempts,
                    topic: r.topic,
                    device: r.device,
                    client_id: r.client_id,
                    payload: r.payload,
                    received_ms: r.received_ms,
                    geo: r.geo,
                });
                continue;
            };
            let geo = Geo::decode(&r.geo);
            let event = Event {
                id: r.event_id,
                topic: r.topic,
                device: r.device,
                client_id: r.client_id,
                payload: r.payload,
                received_ms: r.received_ms,
                location: geo.location,
                regions: geo.regions,
            };
            per_route.entry(index).or_default().push(Pending {
                event,
                attempts: r.attempts,
                local: geo.local,
            });
        }
        let mut indexes: Vec<usize> = per_route.keys().copied().collect();
        indexes.sort_unstable();
        for index in indexes {
            if let Some(pending) = per_route.remove(&index) {
                self.run_route(&self.routes.routes()[index], pending, &mut batch, false)
                    .await;
            }
        }
        batch
    }

    /// Runs one route on its events (in order): payload check, then passthrough, or the
    /// handler (when `to_lane`, the events are queued for the module's lane instead).
    async fn run_route(
        self: &Arc<Self>,
        route: &Route,
        pending: Vec<Pending>,
        batch: &mut Batch,
        to_lane: bool,
    ) {
        let policy = self.policy(route);
        let mut accepted = Vec::with_capacity(pending.len());
        for p in pending {
            if policy.payload == PayloadFormat::Json
                && serde_json::from_slice::<serde::de::IgnoredAny>(&p.event.payload).is_err()
            {
                Metrics::add(&self.metrics.malformed, 1);
                self.dead_letter(route, &p, "malformed", "payload is not JSON".into(), batch);
                continue;
            }
            accepted.push(p);
        }
        if route.handler.is_none() {
            for p in &accepted {
                self.queue(route, &policy, p, None, 0, batch);
            }
            return;
        }
        if to_lane {
            let now = now_ms();
            for p in accepted {
                let geo = p.geo();
                batch.retries.push(NewRetry {
                    geo,
                    event_id: p.event.id,
                    route: route.name.clone(),
                    topic: p.event.topic,
                    device: p.event.device,
                    client_id: p.event.client_id,
                    payload: p.event.payload,
                    received_ms: p.event.received_ms,
                    attempts: p.attempts,
                    next_attempt_ms: now,
                    reason: crate::store::RetryReason::Queued,
                    detail: String::new(),
                });
            }
            return;
        }
        // Handler routes: batches of events that share a topic (at most max_batch each), in
        // order of first appearance; a topic's batches form a chain that runs in order.
        let mut chains: Vec<Vec<Vec<Pending>>> = Vec::new();
        let mut by_topic: HashMap<String, usize> = HashMap::new();
        for p in accepted {
            let chain = match by_topic.get(&p.event.topic) {
                Some(&c) => &mut chains[c],
                None => {
                    by_topic.insert(p.event.topic.clone(), chains.len());
                    chains.push(Vec::new());
                    let last = chains.len() - 1;
                    &mut chains[last]
                }
            };
            match chain.last_mut() {
                // A group shares its geography too: its outputs inherit one set of tags.
                Some(group)
                    if group.len() < self.max_batch
                        && group[0].local == p.local
                        && group[0].event.regions == p.event.regions =>
                {
                    group.push(p)
                }
                _ => chain.push(vec![p]),
            }
        }
        // The route's own cap, within the module's (which the runtime enforces across routes).
        let concurrent = policy
            .max_concurrent
            .unwrap_or(self.max_concurrent_per_module)
            .min(self.max_concurrent_per_module);
        if chains.len() == 1 || concurrent <= 1 {
            for group in chains.into_iter().flatten() {
                self.run_handler(route, &policy, group, batch).await;
            }
            return;
        }
        // Chains (topics) run concurrently, at most `concurrent` at once; their results are
        // merged in chain order. A lane runs its routes one after another, so this is the
        // route's bound.
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrent));
        let mut tasks = Vec::with_capacity(chains.len());
        for chain in chains {
            let kept: Vec<Pending> = chain.iter().flatten().cloned().collect();
            let (this, route, policy, permits) =
                (self.clone(), route.clone(), policy.clone(), permits.clone());
            let task = tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut part = Batch::default();
                for group in chain {
                    this.run_handler(&route, &policy, group, &mut part).await;
                }
                part
            });
            tasks.push((task, kept));
        }
        for (task, kept) in tasks {
            match task.await {
                Ok(part) => batch.append(part),
                Err(e) => {
                    // Never lose the chain's events: they come back as retries.
                    error!(route = %route.name, error = %e, "handler task failed; its events will be retried");
                    for p in kept {
                        self.fail(
                            route,
                            &policy,
                            &p,
                            &HandlerFailure::Host(format!("handler task failed: {e}")),
                            batch,
                        );
                    }
                }
            }
        }
    }

    /// Runs the route's handler on events that share a topic; on failure, retries them one by
    /// one so that only the failing ones are retried later.
    async fn run_handler(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        group: Vec<Pending>,
        batch: &mut Batch,
    ) {
        let Some(module) = route.handler.as_deref() else {
            return;
        };
        // The handler is looked up per group: a deploy takes effect at the next group, and
        // this group finishes on the version it started with.
        let Some(handler) = self.registry.handler(module) else {
            // Declared but not deployed (or removed): the events wait for a deploy.
            self.hold(
                route,
                policy,
                group,
                module,
                NOT_DEPLOYED_RECHECK,
                "not-deployed",
                format!("module {module:?} is not deployed"),
                batch,
            );
            return;
        };
        let handler = &handler;
        let admission = self.breaker.admit(module, Instant::now());
        if let Admission::Quarantined(left) = admission {
            self.hold_quarantined(route, policy, group, module, left, batch);
            return;
        }
        let events: Vec<Event> = group.iter().map(|p| p.event.clone()).collect();
        // A failed batch of several is retried event by event right away, and those outcomes
        // are what the breaker counts: one poisoned event must not count twice. A probe's
        // outcome always counts (the breaker waits for it).
        let count_failure = group.len() == 1 || admission == Admission::Probe;
        match self
            .invoke_guarded(module, handler, events, policy, count_failure)
            .await
        {
            Ok(outputs) => {
                if let Some(first) = group.first() {
                    for (n, output) in outputs.into_iter().enumerate() {
                        self.queue(route, policy, first, Some(output), n, batch);
                    }
                }
            }
            Err(failure) if group.len() == 1 => {
                for p in &group {
                    self.fail(route, policy, p, &failure, batch);
                }
            }
            Err(failure) => {
                debug!(route = %route.name, %failure, size = group.len(), "batch failed; retrying its events one by one");
                let mut rest = group.into_iter();
                while let Some(p) = rest.next() {
                    if let Admission::Quarantined(left) = self.breaker.admit(module, Instant::now())
                    {
                        // The failures so far tripped the breaker: the rest wait it out.
                        let held: Vec<Pending> = std::iter::once(p).chain(rest).collect();
                        self.hold_quarantined(route, policy, held, module, left, batch);
                        return;
                    }
                    match self
                        .invoke_guarded(module, handler, vec![p.event.clone()], policy, true)
                        .await
                    {
                        Ok(outputs) => {
                            for (n, output) in outputs.into_iter().enumerate() {
                                self.queue(route, policy, &p, Some(output), n, batch);
                            }
                        }
                        Err(failure) => self.fail(route, policy, &p, &failure, batch),
                    }
                }
            }
        }
    }

    /// Invokes the handler and tells the circuit breaker how it went: a success always, a
    /// failure when `count_failure`. Failures of the host (not the module's fault) never count
    /// against the module.
    async fn invoke_guarded(
        &self,
        module: &str,
        handler: &Handler,
        events: Vec<Event>,
        policy: &RoutePolicy,
        count_failure: bool,
    ) -> Result<Vec<Output>, HandlerFailure> {
        let result = invoke(module, handler, events, policy, &self.metrics).await;
        let blamed = matches!(&result, Err(f) if !matches!(f, HandlerFailure::Host(_)));
        if blamed && !count_failure {
            return result;
        }
        match self.breaker.record(module, !blamed, Instant::now()) {
            Transition::Opened { failures } => {
                Metrics::add(&self.metrics.quarantines, 1);
                warn!(%module, failures, cooldown = ?self.breaker_cooldown(), "module quarantined after consecutive failures; its events wait (or are dead-lettered, per route)");
            }
            Transition::Closed => info!(%module, "module out of quarantine"),
            Transition::None => {}
        }
        self.metrics
            .set_quarantined(self.breaker.quarantined(Instant::now()));
        result
    }

    fn breaker_cooldown(&self) -> Duration {
        self.breaker.cooldown()
    }

    /// Events of a quarantined module: see [`Pipeline::hold`].
    fn hold_quarantined(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        group: Vec<Pending>,
        module: &str,
        left: Duration,
        batch: &mut Batch,
    ) {
        Metrics::add(&self.metrics.quarantined_events, group.len() as u64);
        let detail = format!("module {module:?} is quarantined after consecutive failures");
        self.hold(
            route,
            policy,
            group,
            module,
            left,
            "quarantined",
            detail,
            batch,
        );
    }

    /// Events whose module cannot run now (quarantined, not deployed): per the route's
    /// `on_quarantine` policy, retries due after `left` (their attempts unspent) or dead
    /// letters with `reason`.
    #[allow(clippy::too_many_arguments)]
    fn hold(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        group: Vec<Pending>,
        _module: &str,
        left: Duration,
        reason: &str,
        detail: String,
        batch: &mut Batch,
    ) {
        for p in group {
            match policy.on_quarantine {
                QuarantinePolicy::Wait => batch.retries.push(NewRetry {
                    event_id: p.event.id,
                    route: route.name.clone(),
                    topic: p.event.topic.clone(),
                    device: p.event.device.clone(),
                    client_id: p.event.client_id.clone(),
                    payload: p.event.payload.clone(),
                    received_ms: p.event.received_ms,
                    attempts: p.attempts,
                    // At least a moment later, so a probe's own retry does not spin.
                    next_attempt_ms: now_ms() + (left.as_millis() as u64).max(100),
                    reason: reason.into(),
                    detail: detail.clone(),
                    geo: p.geo(),
                }),
                QuarantinePolicy::DeadLetter => {
                    self.dead_letter(route, &p, reason, detail.clone(), batch)
                }
            }
        }
    }

    /// Schedules another attempt with backoff, or gives up when the route's attempts are spent.
    fn fail(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        p: &Pending,
        failure: &HandlerFailure,
        batch: &mut Batch,
    ) {
        let attempts = p.attempts + 1;
        if attempts < policy.retry.max_attempts {
            let delay = backoff(&policy.retry, attempts);
            debug!(route = %route.name, topic = %p.event.topic, reason = failure.reason(), attempts, ?delay, "handler failed; will retry");
            Metrics::add(&self.metrics.retries_scheduled, 1);
            batch.retries.push(NewRetry {
                event_id: p.event.id,
                route: route.name.clone(),
                topic: p.event.topic.clone(),
                device: p.event.device.clone(),
                client_id: p.event.client_id.clone(),
                payload: p.event.payload.clone(),
                received_ms: p.event.received_ms,
                attempts,
                next_attempt_ms: now_ms() + delay.as_millis() as u64,
                reason: failure.reason().into(),
                detail: failure.to_string(),
                geo: p.geo(),
            });
            return;
        }
        warn!(route = %route.name, topic = %p.event.topic, reason = failure.reason(), attempts, %failure, "handler failed; event dead-lettered");
        let done = Pending {
            event: p.event.clone(),
            attempts,
            local: p.local,
        };
        self.dead_letter(route, &done, failure.reason(), failure.to_string(), batch);
    }

    fn dead_letter(
        &self,
        route: &Route,
        p: &Pending,
        reason: &str,
        detail: String,
        batch: &mut Batch,
    ) {
        Metrics::add(&self.metrics.dead_lettered, 1);
        batch.dead.push(NewDeadLetter {
            stage: Stage::Event,
            event_id: p.event.id,
            route: route.name.clone(),
            module: route.handler.clone(),
            module_version: route
                .handler
                .as_ref()
                .and_then(|m| self.registry.handler(m))
                .map(|h| h.version().to_string()),
            link: None,
            msg_id: None,
            reason: reason.into(),
            detail,
            attempts: p.attempts,
            topic: p.event.topic.clone(),
            device: p.event.device.clone(),
            client_id: p.event.client_id.clone(),
            payload: p.event.payload.clone(),
            received_ms: p.event.received_ms,
            geo: p.geo(),
        });
    }

    /// Renders the output topic and adds the row, or a dead letter when the topic is invalid.
    /// `output` is the handler's output; `None` forwards the event itself. `n` numbers the
    /// outputs derived from one event (or one batch), for the message id.
    fn queue(
        &self,
        route: &Route,
        policy: &RoutePolicy,
        source: &Pending,
        output: Option<Output>,
        n: usize,
        batch: &mut Batch,
    ) {
        let event = &source.event;
        let (output_topic, payload) = match output {
            Some(o) => (Some(o.topic), o.payload),
            None => (None, event.payload.clone()),
        };
        let as_letter = |payload: Vec<u8>| Pending {
            event: Event {
                payload,
                ..event.clone()
            },
            attempts: 0,
            local: source.local,
        };
        // Residency: outputs inherit their event's region tags, and are queued only for a
        // link that may carry all of them (the uplink checks again before sending).
        let link = match source.local {
            true => LOCAL_LINK.to_string(),
            false => route.upstream.clone(),
        };
        if !source.local
            && !self
                .locator
                .plan()
                .link(&link)
                .allows(event.regions.iter().map(String::as_str))
        {
            Metrics::add(&self.metrics.residency_refusals, 1);
            let detail = format!(
                "upstream {link:?} may not carry data of region {}",
                event.regions.join(" + ")
            );
            self.dead_letter(route, &as_letter(payload), "residency", detail, batch);
            return;
        }
        let context = TemplateContext {
            topic: &event.topic,
            device: &event.device,
            gateway: &self.gateway_id,
            output: output_topic.as_deref(),
        };
        match route.topic.render(&context) {
            Ok(topic) => batch.outputs.push(NewOutboxRow {
                link,
                msg_id: format!("{}-{}-{}-{n}", self.gateway_id, event.id, route.name),
                route: route.name.clone(),
                topic,
                payload,
                received_ms: event.received_ms,
                expires_ms: policy
                    .ttl
                    .map(|ttl| event.received_ms + ttl.as_millis() as u64)
                    .unwrap_or(0),
                regions: join_tags(&event.regions),
            }),
            Err(e) => {
                warn!(route = %route.name, error = %e, "output topic cannot be rendered; dead-lettered");
                Metrics::add(&self.metrics.render_failures, 1);
                self.dead_letter(
                    route,
                    &as_letter(payload),
                    "bad-output-topic",
                    e.to_string(),
                    batch,
                );
            }
        }
    }

    /// Commits the batch, retrying until it succeeds, then wakes the uplinks that got rows.
    async fn commit(&self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let batch = Arc::new(batch);
        let mut attempt: u32 = 0;
        loop {
            let store = self.store.clone();
            let pending = batch.clone();
            let result = tokio::task::spawn_blocking(move || store.commit(&pending))
                .await
                .unwrap_or_else(|e| Err(StoreError::Thread(e.to_string())));
            match result {
                Ok(report) => {
                    Metrics::add(&self.metrics.evicted, report.evicted_outbox);
                    Metrics::add(
                        &self.metrics.dead_letters_evicted,
                        report.evicted_dead_letters,
                    );
                    if report.evicted_outbox > 0 {
                        warn!(
                            rows = report.evicted_outbox,
                            "outbox full: oldest rows moved to the dead letters (drop-oldest)"
                        );
                    }
                    if report.evicted_dead_letters > 0 {
                        warn!(
                            rows = report.evicted_dead_letters,
                            "dead letters full: oldest deleted"
                        );
                    }
                    break;
                }
                Err(e @ StoreError::OutboxFull { .. }) => {
                    if attempt == 0 {
                        warn!(error = %e, "holding new outputs until the upstream drains the outbox");
                    }
                    Metrics::add(&self.metrics.outbox_full_waits, 1);
                    attempt = attempt.saturating_add(1);
                    // Deliveries free room; there is no faster signal to wait on here.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    Metrics::add(&self.metrics.store_errors, 1);
                    error!(error = %e, attempt, "cannot commit to the outbox; holding the batch and retrying");
                }
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt.min(40)))).await;
        }
        Metrics::add(&self.metrics.queued, batch.outputs.len() as u64);
        let mut woken: Vec<&str> = Vec::new();
        for row in &batch.outputs {
            if !woken.contains(&row.link.as_str()) {
                woken.push(&row.link);
                if let Some(wake) = self.wakes.get(&row.link) {
                    wake.notify_one();
                }
            }
        }
    }
}

/// The delay before attempt `attempts + 1`: `backoff_ms * 2^(attempts-1)`, capped, times a
/// random factor in [0.5, 1) so that many failing events do not retry in lockstep.
fn backoff(retry: &RetryConfig, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(30);
    let base = retry
        .backoff_ms
        .saturating_mul(1u64 << exponent)
        .min(retry.backoff_max_ms);
    let jitter = rand::rng().random_range(0.5..1.0);
    Duration::from_millis(((base as f64) * jitter) as u64)
}

async fn invoke(
    module: &str,
    handler: &Handler,
    events: Vec<Event>,
    policy: &RoutePolicy,
    metrics: &Metrics,
) -> Result<Vec<Output>, HandlerFailure> {
    Metrics::add(&metrics.handler_invocations, 1);
    let handler = handler.clone();
    let mut limits = handler.default_limits();
    if let Some(deadline) = policy.deadline {
        limits.deadline = deadline;
    }
    if let Some(bytes) = policy.memory_limit_bytes {
        limits.memory_limit_bytes = bytes;
    }
    if let Some(n) = policy.max_outputs {
        limits.max_outputs = n;
    }
    if let Some(bytes) = policy.max_output_bytes {
        limits.max_output_bytes = bytes;
    }
    let invocation =
        tokio::task::spawn_blocking(move || handler.invoke_limited(&events, &limits)).await;
    let result = match invocation {
        Ok(invocation) => {
            if let Some(fuel) = invocation.fuel {
                metrics.add_module_fuel(module, fuel);
            }
            metrics.add_module_run_us(module, invocation.ran.as_micros() as u64);
            Metrics::add(
                &metrics.handler_wait_us,
                invocation.waited.as_micros() as u64,
            );
            Metrics::add(
                &metrics.handler_instantiate_us,
                invocation.instantiate.as_micros() as u64,
            );
            invocation.result
        }
        Err(e) => Err(HandlerFailure::Host(format!("handler task failed: {e}"))),
    };
    if result.is_err() {
        Metrics::add(&metrics.handler_failures, 1);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let retry = RetryConfig {
            max_attempts: 10,
            backoff_ms: 100,
            backoff_max_ms: 1000,
        };
        for (attempts, base) in [
            (1, 100u64),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (20, 1000),
        ] {
            for _ in 0..50 {
                let d = backoff(&retry, attempts).as_millis() as u64;
                assert!(
                    d >= base / 2 && d < base,
                    "attempt {attempts}: {d} not in [{}, {base})",
                    base / 2
                );
            }
        }
    }
}
