//! The handler lanes: one task per module that takes its routes' due rows from the retries
//! table (events queued for the lane, and events waiting for another attempt), runs the
//! handler on them in batches per topic, and commits the results in its own transactions.
//! The main loop uses the same step for the due rows of routes without a lane.
//!
//! Guarantees:
//! - A lane takes its rows in due order; a topic's events run in that order, in batches of
//!   at most `max_batch` that share their geography, so their outputs keep the order of their
//!   events per topic.
//! - A route's topics run concurrently, at most its `max_concurrent` (bounded by the module's
//!   `max_concurrent_per_module`) at once; their results are merged in topic order.
//! - A task that fails loses no event: its events come back as retries.
//!
//! Does not: read the journal (the main loop queues the lanes' work).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, error};

use crate::event::now_ms;
use crate::handlers::runtime::HandlerFailure;
use crate::shutdown::Shutdown;
use crate::store::{Batch, RetryRow, RouteSet};

use super::decide::screen;
use super::emit;
use super::records::{self, Pending};
use super::{Pipeline, IDLE_POLL};

/// Most due rows a lane takes at once.
const DUE_BATCH: usize = 256;

impl Pipeline {
    /// One module's lane: invokes its handler on its routes' due queue and retry rows, and
    /// commits the results, until `finish`.
    pub(super) async fn lane(
        self: Arc<Self>,
        module: String,
        routes: Vec<String>,
        kick: Arc<Notify>,
        mut finish: Shutdown,
    ) {
        let set = RouteSet::Only(routes);
        loop {
            if finish.is_shutdown() {
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
                _ = finish.recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Processes and commits one batch of `set`'s due retry rows. `Some(true)` when there were
    /// any, `Some(false)` when none, `None` when they could not be read (logged, after a pause).
    pub(super) async fn process_due(self: &Arc<Self>, set: &RouteSet) -> Option<bool> {
        let store = self.store.clone();
        let query = set.clone();
        let due =
            tokio::task::spawn_blocking(move || store.due_retries_of(&query, now_ms(), DUE_BATCH))
                .await
                .map_err(|e| e.to_string())
                .and_then(|due| due.map_err(|e| e.to_string()));
        match due {
            Ok(due) if !due.is_empty() => {
                let batch = self.process_retries(due).await;
                self.commit(batch).await;
                Some(true)
            }
            Ok(_) => Some(false),
            Err(e) => {
                self.read_failed(&e).await;
                None
            }
        }
    }

    /// How long to sleep when idle: until `set`'s next retry falls due, at most [`IDLE_POLL`].
    pub(super) async fn idle_wait(&self, set: &RouteSet) -> Duration {
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

    /// Runs due rows through their routes, in route order; rows of a route no longer
    /// configured become dead letters.
    async fn process_retries(self: &Arc<Self>, due: Vec<RetryRow>) -> Batch {
        let mut batch = Batch::default();
        let mut per_route: HashMap<usize, Vec<Pending>> = HashMap::new();
        for row in due {
            batch.retries_done.push(row.id);
            let index = (self.routes.routes().iter()).position(|r| r.name == row.retry.route);
            match index {
                Some(index) => {
                    (per_route.entry(index).or_default()).push(Pending::from_retry(row.retry))
                }
                // The route was removed from the configuration since: keep the event.
                None => {
                    let (route, geo) = (row.retry.route.clone(), row.retry.geo.clone());
                    let p = Pending::from_retry(row.retry);
                    batch.dead.push(records::no_route(p, &route, geo));
                }
            }
        }
        let mut indexes: Vec<usize> = per_route.keys().copied().collect();
        indexes.sort_unstable();
        for index in indexes {
            if let Some(pending) = per_route.remove(&index) {
                self.run_route(index, pending, &mut batch).await;
            }
        }
        batch
    }

    /// Runs one route on its due events (in order): payload check, then passthrough, or the
    /// handler.
    async fn run_route(self: &Arc<Self>, index: usize, pending: Vec<Pending>, batch: &mut Batch) {
        let version = self.version_of(index);
        let on = self.on(index, version.as_deref());
        let accepted = screen(on, pending, &mut batch.dead);
        if on.route.handler.is_none() {
            for p in &accepted {
                emit::emit(self.site(), on, p, None, 0, batch);
            }
            return;
        }
        let chains = chains(accepted, self.max_batch);
        // The route's own cap, within the module's (which the runtime enforces across routes).
        let concurrent = (on.policy.max_concurrent)
            .unwrap_or(self.max_concurrent_per_module)
            .min(self.max_concurrent_per_module);
        if chains.len() == 1 || concurrent <= 1 {
            for group in chains.into_iter().flatten() {
                self.run_handler(on.route, on.policy, group, batch).await;
            }
            return;
        }
        self.run_chains(index, chains, concurrent, batch).await;
    }

    /// Runs a route's chains (topics) concurrently, at most `concurrent` at once, and merges
    /// their results in chain order. A lane runs its routes one after another, so this is the
    /// route's bound.
    async fn run_chains(
        self: &Arc<Self>,
        index: usize,
        chains: Vec<Vec<Vec<Pending>>>,
        concurrent: usize,
        batch: &mut Batch,
    ) {
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrent));
        let mut tasks = Vec::with_capacity(chains.len());
        for chain in chains {
            let kept: Vec<Pending> = chain.iter().flatten().cloned().collect();
            let (this, permits) = (self.clone(), permits.clone());
            let task = tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let mut part = Batch::default();
                let (route, policy) = (&this.routes.routes()[index], &this.policies[index]);
                for group in chain {
                    this.run_handler(route, policy, group, &mut part).await;
                }
                part
            });
            tasks.push((task, kept));
        }
        for (task, kept) in tasks {
            match task.await {
                Ok(part) => batch.append(part),
                Err(e) => {
                    let version = self.version_of(index);
                    let on = self.on(index, version.as_deref());
                    // Never lose the chain's events: they come back as retries.
                    error!(route = %on.route.name, error = %e, "handler task failed; its events will be retried");
                    let failure = HandlerFailure::Host(format!("handler task failed: {e}"));
                    for p in kept {
                        self.fail(on, &p, &failure, batch);
                    }
                }
            }
        }
    }
}

/// A handler route's events as chains, one per topic in order of first appearance, each a
/// list of batches of at most `max_batch` events in order that share their geography (a
/// batch's outputs inherit one set of region tags).
pub(crate) fn chains(accepted: Vec<Pending>, max_batch: usize) -> Vec<Vec<Vec<Pending>>> {
    let mut chains: Vec<Vec<Vec<Pending>>> = Vec::new();
    let mut by_topic: HashMap<String, usize> = HashMap::new();
    for p in accepted {
        let c = *by_topic.entry(p.event.topic.clone()).or_insert_with(|| {
            chains.push(Vec::new());
            chains.len() - 1
        });
        let chain = &mut chains[c];
        match chain.last_mut() {
            Some(group)
                if group.len() < max_batch
                    && group[0].local == p.local
                    && group[0].event.regions == p.event.regions =>
            {
                group.push(p)
            }
            _ => chain.push(vec![p]),
        }
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::records::tests::event;
    use proptest::prelude::*;

    fn pending(id: u64, topic: usize, region: bool) -> Pending {
        let mut p = Pending::new(event(id, &format!("t/{topic}"), b"{}"));
        if region {
            p.event.regions = vec!["eu".into()];
        }
        p
    }

    #[test]
    fn chains_split_by_topic_size_and_geography() {
        let events = vec![
            pending(1, 0, false),
            pending(2, 1, false),
            pending(3, 0, false),
            pending(4, 0, true),
            pending(5, 0, true),
            pending(6, 0, true),
        ];
        let ids = |chains: Vec<Vec<Vec<Pending>>>| -> Vec<Vec<Vec<u64>>> {
            (chains.into_iter())
                .map(|c| {
                    (c.into_iter())
                        .map(|g| g.iter().map(|p| p.event.id).collect())
                        .collect()
                })
                .collect()
        };
        assert_eq!(
            ids(chains(events, 2)),
            vec![vec![vec![1, 3], vec![4, 5], vec![6]], vec![vec![2]]]
        );
    }

    proptest! {
        /// Chains keep every event once, each topic's events in order in one chain, and no
        /// batch over `max_batch` or mixing geographies.
        #[test]
        fn chains_keep_every_event_in_order_per_topic(
            spec in proptest::collection::vec((0usize..4, any::<bool>()), 0..60),
            max_batch in 1usize..6,
        ) {
            let events: Vec<Pending> = (spec.iter().enumerate())
                .map(|(i, &(topic, region))| pending(i as u64, topic, region))
                .collect();
            let made = chains(events.clone(), max_batch);
            let mut seen = Vec::new();
            for chain in &made {
                let topic = &chain[0][0].event.topic;
                let ids: Vec<u64> = chain.iter().flatten().map(|p| p.event.id).collect();
                let want: Vec<u64> = (events.iter())
                    .filter(|p| &p.event.topic == topic)
                    .map(|p| p.event.id)
                    .collect();
                prop_assert_eq!(&ids, &want);
                for group in chain {
                    prop_assert!(!group.is_empty() && group.len() <= max_batch);
                    prop_assert!(group.iter().all(|p| p.event.regions == group[0].event.regions));
                }
                seen.extend(ids);
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..events.len() as u64).collect::<Vec<_>>());
        }
    }
}
