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
//!
//! Does not: parse MQTT, talk to an upstream, or decide residency on its own (the locator's
//! plan says which regions a link may carry).
//!
//! # Layout
//!
//! In the order an event meets them: [`Pipeline`] and its main loop (here); `intake` (a batch
//! of journal rows: router, then locator, then the pure `decide` step); `decide` (the routing
//! decision: per-route work, dead letters, geofence transitions); `emit` (template, message
//! id, time to live, residency -> outbox row); `records` (the one builder of retry and
//! dead-letter records); `lanes` (the per-module lanes over the retries table); `invoke` (a
//! handler with its breaker and limits); `commit` (the store transaction, retried, and the
//! uplinks' wake-ups).

mod commit;
mod decide;
mod emit;
mod intake;
mod invoke;
mod lanes;
mod records;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, error, warn};

use crate::config::QuarantinePolicy;
use crate::config::{PayloadFormat, RetryConfig};
use crate::geo::locator::Locator;
use crate::handlers::breaker::Breaker;
use crate::handlers::registry::Registry;
use crate::metrics::Metrics;
use crate::routing::RouteTable;
use crate::shutdown::Shutdown;
use crate::store::{Batch, JournalRow, OutboxPolicy, RetryReason, RouteSet, Store};

use emit::Site;
use records::OnRoute;

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

/// Everything the processing stage is built from.
pub struct PipelineParts {
    /// The compiled routes.
    pub routes: Arc<RouteTable>,
    /// Per route name: retries, deadline, TTL, payload format (a route without one gets the
    /// default policy).
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

/// The processing stage: journaled device publishes in, durable outbox rows (or retries, or
/// dead letters) out. See the module documentation for what it guarantees.
pub struct Pipeline {
    routes: Arc<RouteTable>,
    /// Each route's policy, by route index.
    policies: Vec<RoutePolicy>,
    registry: Arc<Registry>,
    store: Arc<Store>,
    wakes: HashMap<String, Arc<Notify>>,
    metrics: Arc<Metrics>,
    gateway_id: String,
    max_batch: usize,
    max_concurrent_per_module: usize,
    breaker: Arc<Breaker>,
    locator: Arc<Locator>,
}

/// How many journal rows the main loop may take next.
enum Room {
    /// Up to this many.
    Take(usize),
    /// None now: the outbox is full (look again).
    Full,
    /// None, and the pipeline is finishing: stop.
    Stop,
}

impl Pipeline {
    /// The stage built from its parts; each route gets its policy (or the default one).
    pub fn new(parts: PipelineParts) -> Pipeline {
        let policies = (parts.routes.routes().iter())
            .map(|r| parts.policies.get(&r.name).cloned().unwrap_or_default())
            .collect();
        Pipeline {
            routes: parts.routes,
            policies,
            registry: parts.registry,
            store: parts.store,
            wakes: parts.wakes,
            metrics: parts.metrics,
            gateway_id: parts.gateway_id,
            max_batch: parts.max_batch,
            max_concurrent_per_module: parts.max_concurrent_per_module,
            breaker: parts.breaker,
            locator: parts.locator,
        }
    }

    /// Processes the journal and due retries: first what a previous run left, then each new
    /// commit (`committed` is notified after every journal commit). Once `finish` fires, it
    /// processes what is left in the journal and returns (retries not yet due, and events
    /// queued for a handler lane, stay stored for the next start).
    ///
    /// Handler routes run in lanes, one task per module: the main loop moves a handler route's
    /// events from the journal to that module's durable queue (the retries table, due now) in
    /// its journal transaction, and the module's lane invokes the handler and commits the
    /// outputs. A module that runs to its deadline therefore delays only its own lane;
    /// passthrough routes and the other modules go on at their own pace.
    pub async fn run(self, committed: Arc<Notify>, finish: Shutdown) {
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
            let lane = this.clone().lane(module, routes, kick, finish.clone());
            lanes.push(tokio::spawn(lane));
        }
        this.main_loop(committed, finish, kicks, lane_routes).await;
        for lane in lanes {
            let _ = lane.await;
        }
    }

    /// The journal, and the retries of routes that have no lane (a route removed from the
    /// configuration, a replayed passthrough event).
    async fn main_loop(
        self: &Arc<Self>,
        committed: Arc<Notify>,
        mut finish: Shutdown,
        kicks: HashMap<String, Arc<Notify>>,
        lane_routes: Vec<String>,
    ) {
        let mut last: i64 = 0;
        let others = RouteSet::Except(lane_routes);
        loop {
            // A read failure is logged (after a pause) and the journal is read all the same.
            if self.process_due(&others).await == Some(true) {
                continue;
            }
            let take = match self.journal_room(!kicks.is_empty(), &mut finish).await {
                Room::Take(take) => take,
                Room::Full => continue,
                Room::Stop => return,
            };
            let Some(rows) = self.read_journal(last, take).await else {
                continue;
            };
            let Some(newest) = rows.last().map(|r| r.id) else {
                if finish.is_shutdown() {
                    debug!("pipeline finished: journal drained");
                    return;
                }
                let wait = self.idle_wait(&others).await;
                tokio::select! {
                    // Journal commits and dead-letter replays (which may have queued events
                    // for a lane) end up here.
                    _ = committed.notified() => kicks.values().for_each(|kick| kick.notify_one()),
                    _ = finish.recv() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            };
            last = newest;
            Metrics::add(&self.metrics.received, rows.len() as u64);
            let batch = self.process_journal(rows);
            let kick: Vec<Arc<Notify>> = lanes_to_kick(&batch, &kicks);
            self.commit(batch).await;
            kick.iter().for_each(|kick| kick.notify_one());
        }
    }

    /// How many journal rows the next batch may take. Under reject-new, no more than the
    /// outbox has room for, so that what fits is queued and only the rest waits in the
    /// journal; with no room, it waits a moment (and says to stop if `finish` came meanwhile).
    async fn journal_room(&self, has_lanes: bool, finish: &mut Shutdown) -> Room {
        let limit = (self.max_batch * 4).max(2048);
        if self.store.limits().outbox_policy != OutboxPolicy::RejectNew {
            return Room::Take(limit);
        }
        // Events queued for the lanes will need outbox room too.
        let queued = match has_lanes {
            true => self.store.retry_count().unwrap_or(0),
            false => 0,
        };
        let room = self.store.outbox_room().saturating_sub(queued) as usize;
        if room > 0 {
            return Room::Take(limit.min(room));
        }
        Metrics::add(&self.metrics.outbox_full_waits, 1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = finish.recv() => {}
        }
        // Finishing with the outbox full: nothing more can move now, so stop (an empty journal
        // too: waiting for room would wait for the uplinks, which stop after the pipeline).
        if finish.is_shutdown() {
            let left = self.store.journal_depth();
            if left > 0 {
                warn!(
                    left,
                    "stopping with the outbox full; the journal keeps the rest for the next start"
                );
            }
            return Room::Stop;
        }
        Room::Full
    }

    /// Up to `take` journal rows after `last`, within the batch's byte budget; `None` when
    /// they could not be read (logged, after a pause).
    async fn read_journal(&self, last: i64, take: usize) -> Option<Vec<JournalRow>> {
        let store = self.store.clone();
        let budget = self.batch_bytes();
        let rows = tokio::task::spawn_blocking(move || store.journal_batch(last, take, budget))
            .await
            .map_err(|e| e.to_string())
            .and_then(|rows| rows.map_err(|e| e.to_string()));
        match rows {
            Ok(rows) => Some(rows),
            Err(e) => {
                self.read_failed(&e).await;
                None
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

    /// What every output row of this gateway shares.
    fn site(&self) -> Site<'_> {
        Site {
            gateway_id: &self.gateway_id,
            plan: self.locator.plan(),
        }
    }

    /// The route at `index` with its policy, naming `version` in its records.
    fn on<'a>(&'a self, index: usize, version: Option<&'a str>) -> OnRoute<'a> {
        OnRoute {
            route: &self.routes.routes()[index],
            policy: &self.policies[index],
            version,
        }
    }

    /// The version of the route's module deployed now, if any.
    fn version_of(&self, index: usize) -> Option<String> {
        let module = self.routes.routes()[index].handler.as_deref()?;
        Some(self.registry.handler(module)?.version().to_string())
    }
}

/// The lanes that have new work queued in `batch`.
fn lanes_to_kick(batch: &Batch, kicks: &HashMap<String, Arc<Notify>>) -> Vec<Arc<Notify>> {
    (batch.retries.iter())
        .filter(|r| r.reason == RetryReason::Queued)
        .filter_map(|r| kicks.get(&r.route).cloned())
        .collect()
}
