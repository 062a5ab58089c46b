//! The main loop's step on a batch of journal rows: the router matches each row, the locator
//! answers where its event is (and learns the positions it reports), and the pure
//! [`decide`](super::decide) step turns all of it into the batch to commit.
//!
//! Guarantees: rows are matched and located in journal order, so a position a row reports is
//! known to the rows after it; invalid GPS fixes of the gateway are counted and ignored.

use std::collections::HashMap;

use tracing::warn;

use crate::event::now_ms;
use crate::geo::locator::{Observed, ResolveMemo, Source, GATEWAY_CLIENT};
use crate::metrics::Metrics;
use crate::store::{Batch, JournalRow};

use super::decide::{self, Context, Matched, Sighting};
use super::Pipeline;

impl Pipeline {
    /// The batch that routes `rows` (read from the journal in order).
    pub(super) fn process_journal(&self, rows: Vec<JournalRow>) -> Batch {
        let plan = self.locator.plan();
        let mut observed = Observed::default();
        let located: Vec<(Matched, Sighting)> = (rows.into_iter())
            .map(|row| {
                let matched = decide::match_row(&self.routes, plan, row);
                let sighting = self.locate(&matched, &mut observed);
                (matched, sighting)
            })
            .collect();
        let transitions = observed.transitions.len() as u64;
        Metrics::add(&self.metrics.geofence_transitions, transitions);
        let versions = self.versions();
        let context = Context {
            routes: &self.routes,
            policies: &self.policies,
            versions: &versions,
            site: self.site(),
            now_ms: now_ms(),
        };
        let decision = decide::decide(&context, located, observed);
        Metrics::add(&self.metrics.unrouted, decision.unrouted);
        decision.batch
    }

    /// What the locator answers for a matched row: the gateway's own GPS fix, and each
    /// matching route's location with where it is. The positions the row's device reports in
    /// its payload are recorded in the locator and in `observed`.
    fn locate(&self, matched: &Matched, observed: &mut Observed) -> Sighting {
        let (plan, row) = (self.locator.plan(), &matched.row);
        let payload = matched.json.as_ref();
        let mut sighting = Sighting::default();
        if plan.gps_topic.is_some() {
            match self.locator.gps_fix(&row.topic, payload, row.received_ms) {
                Ok(fix) => sighting.fix = fix,
                Err(e) => {
                    Metrics::add(&self.metrics.bad_locations, 1);
                    warn!(topic = %row.topic, error = %e, "GPS fix with invalid coordinates ignored");
                }
            }
        }
        if !plan.active {
            return sighting;
        }
        let mut memo = ResolveMemo::default();
        for &index in &matched.routes {
            let device = self.routes.routes()[index]
                .device_of(&row.topic)
                .unwrap_or("");
            let found = self.locator.resolve_memo(&mut memo, index, payload, device);
            let found = found.map(|found| {
                found.map(|(at, source)| {
                    let place = sighting.place(at, |out| self.locator.place(at, out));
                    if source == Source::Payload && row.client_id != GATEWAY_CLIENT {
                        let placement = sighting.placement(place);
                        (self.locator).observe(device, at, placement, row.received_ms, observed);
                    }
                    place
                })
            });
            sighting.answer(index, found);
        }
        sighting
    }

    /// The version of each module deployed now, for the dead letters of a decision.
    fn versions(&self) -> HashMap<String, String> {
        let modules = self
            .routes
            .routes()
            .iter()
            .filter_map(|r| r.handler.as_ref());
        modules
            .filter_map(|m| Some((m.clone(), self.registry.handler(m)?.version().to_string())))
            .collect()
    }
}
