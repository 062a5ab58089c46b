//! The routing decision for a batch of journal rows, as a pure step: from the rows, the route
//! table and what the locator answered, to the batch to commit (outputs of passthrough
//! routes, events queued for handler lanes, dead letters, device positions and geofence
//! transitions).
//!
//! An event's way reads in one direction: the router matches the row's topic
//! ([`match_row`]); the locator answers where the event is for each matching route (a
//! [`Sighting`], made by the pipeline, which owns the locator's state); then [`decide`] applies
//! the routes' predicates, the no-location policy, the payload check and the output rules.
//!
//! Guarantees:
//! - Every row is accounted for: its journal row is done in this batch, and it is routed (one
//!   record per accepting route: an outbox row, a queued event or a dead letter) or counted
//!   as unrouted.
//! - Per route, records keep the order of the rows; routes come in configuration order.
//! - Coordinates that cannot be read make a `bad-location` dead letter for that route; an
//!   event without location under `no_location = "dead-letter"` a `no-location` one; a
//!   payload that is not JSON on a JSON route a `malformed` one.
//!
//! Does not: run handlers, read or write the store, log or count, or read the clock (the
//! time is [`Context::now_ms`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::config::PayloadFormat;
use crate::event::Event;
use crate::geo::locator::{GeoPlan, LocateError, NoLocation, Observed, GATEWAY_CLIENT, GEODESIC};
use crate::geo::{Location, Placement};
use crate::routing::predicate::Facts;
use crate::routing::{Route, RouteTable};
use crate::store::{
    Batch, DeadLetterReason, DevicePosition, JournalRow, NewDeadLetter, NewJournalEntry,
};

use super::emit::{self, Site};
use super::records::{OnRoute, Pending};
use super::RoutePolicy;

/// What the decision depends on besides the rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    /// The routes, in configuration order.
    pub(crate) routes: &'a RouteTable,
    /// Each route's policy, by route index.
    pub(crate) policies: &'a [RoutePolicy],
    /// The deployed version of each module, for dead letters.
    pub(crate) versions: &'a HashMap<String, String>,
    /// The gateway's id and geography.
    pub(crate) site: Site<'a>,
    /// The time of the decision (queued events are due then, transitions happen then).
    pub(crate) now_ms: u64,
}

impl<'a> Context<'a> {
    /// The route at `index` with its policy and module version.
    pub(crate) fn on(&self, index: usize) -> OnRoute<'a> {
        let route = &self.routes.routes()[index];
        let version = route.handler.as_ref().and_then(|m| self.versions.get(m));
        OnRoute {
            route,
            policy: &self.policies[index],
            version: version.map(String::as_str),
        }
    }
}

/// The router's part of one journal row.
#[derive(Debug)]
pub(crate) struct Matched {
    /// The row.
    pub(crate) row: JournalRow,
    /// The indexes of the routes whose filter matches its topic, in order.
    pub(crate) routes: Vec<usize>,
    /// The payload as JSON, parsed once, when the geography or a matching route's predicate
    /// needs it (`None` too when it is not JSON).
    pub(crate) json: Option<Value>,
}

/// The routes whose filter matches `row`'s topic, and its payload parsed if anyone needs it.
pub(crate) fn match_row(routes: &RouteTable, plan: &GeoPlan, row: JournalRow) -> Matched {
    let matching: Vec<usize> = (routes.routes().iter().enumerate())
        .filter(|(_, route)| route.filter.matches(&row.topic))
        .map(|(index, _)| index)
        .collect();
    let needs_json = plan.gps_topic.is_some()
        || (matching.iter()).any(|&i| needs_payload(plan, &routes.routes()[i]));
    let json = match needs_json {
        true => serde_json::from_slice(&row.payload).ok(),
        false => None,
    };
    Matched {
        row,
        routes: matching,
        json,
    }
}

/// Whether the route's decision reads the payload: for a location, or for its predicate.
fn needs_payload(plan: &GeoPlan, route: &Route) -> bool {
    plan.active || route.when.as_ref().is_some_and(|w| w.needs_payload())
}

/// What the locator answered for one matched row.
#[derive(Debug, Default)]
pub(crate) struct Sighting {
    /// The gateway's own position, when the row is a valid GPS fix of it.
    pub(crate) fix: Option<DevicePosition>,
    /// The distinct locations found, with the fences and regions containing each.
    places: Vec<(Location, Placement)>,
    /// Per route index asked: the index in `places`, none, or why it cannot be read.
    answers: Vec<(usize, Result<Option<usize>, LocateError>)>,
}

impl Sighting {
    /// Where `at` is, placed with `place` unless an earlier route of the row found it.
    pub(crate) fn place(&mut self, at: Location, place: impl FnOnce(&mut Placement)) -> usize {
        if let Some(i) = self.places.iter().position(|(known, _)| *known == at) {
            return i;
        }
        let mut placement = Placement::default();
        place(&mut placement);
        self.places.push((at, placement));
        self.places.len() - 1
    }

    /// The placement of `place` (an index [`Sighting::place`] returned).
    pub(crate) fn placement(&self, place: usize) -> &Placement {
        &self.places[place].1
    }

    /// Records the answer for the route at `index`: a place, none, or an error.
    pub(crate) fn answer(&mut self, index: usize, found: Result<Option<usize>, LocateError>) {
        self.answers.push((index, found));
    }

    /// The location for the route at `index` and where it is (none when not asked).
    fn of(&self, index: usize) -> Result<Option<(Location, &Placement)>, &LocateError> {
        match self.answers.iter().find(|(i, _)| *i == index) {
            Some((_, Ok(Some(place)))) => Ok(Some((self.places[*place].0, self.placement(*place)))),
            Some((_, Err(e))) => Err(e),
            Some((_, Ok(None))) | None => Ok(None),
        }
    }
}

/// What a batch of journal rows becomes.
#[derive(Debug, Default)]
pub(crate) struct Decision {
    /// Everything to commit.
    pub(crate) batch: Batch,
    /// Rows no route took.
    pub(crate) unrouted: u64,
}

/// Decides a batch of rows, in journal order, given what the locator answered for each and
/// what their position reports changed (`observed`).
pub(crate) fn decide(
    ctx: &Context<'_>,
    rows: Vec<(Matched, Sighting)>,
    observed: Observed,
) -> Decision {
    let mut decision = Decision::default();
    let batch = &mut decision.batch;
    let mut per_route: Vec<Vec<Pending>> = ctx.routes.routes().iter().map(|_| Vec::new()).collect();
    for (matched, sighting) in rows {
        batch.journal_done.push(matched.row.id);
        batch.devices.extend(sighting.fix.clone());
        if !route_row(ctx, &matched, &sighting, &mut per_route, &mut batch.dead) {
            decision.unrouted += 1;
        }
    }
    batch
        .devices
        .append(&mut last_positions(observed.positions));
    for (topic, payload) in observed.transitions {
        batch.events.push(NewJournalEntry {
            topic,
            payload: payload.into(),
            qos: 1,
            retain: false,
            client_id: Arc::from(GATEWAY_CLIENT),
            received_ms: ctx.now_ms,
        });
    }
    for (index, pending) in per_route.into_iter().enumerate() {
        if pending.is_empty() {
            continue;
        }
        let on = ctx.on(index);
        let accepted = screen(on, pending, &mut batch.dead);
        if on.route.handler.is_some() {
            let queued = accepted.into_iter().map(|p| on.queued(p, ctx.now_ms));
            batch.retries.extend(queued);
        } else {
            for p in &accepted {
                emit::emit(ctx.site, on, p, None, 0, batch);
            }
        }
    }
    decision
}

/// Routes one row: adds the event to each accepting route's list (or a dead letter for it).
/// Whether any route took it.
fn route_row(
    ctx: &Context<'_>,
    matched: &Matched,
    sighting: &Sighting,
    per_route: &mut [Vec<Pending>],
    dead: &mut Vec<NewDeadLetter>,
) -> bool {
    let mut taken = false;
    for &index in &matched.routes {
        match take(ctx, matched, sighting, index) {
            Take::Declined => continue,
            Take::Event(p) => per_route[index].push(p),
            Take::Dead(p, reason, detail) => {
                dead.push(ctx.on(index).dead_letter(p, reason, detail))
            }
        }
        taken = true;
    }
    taken
}

/// What one matching route does with a row's event.
enum Take {
    /// Its `when` does not hold: not this route's.
    Declined,
    /// The route's event, with its geography.
    Event(Pending),
    /// The route's, but given up on at once.
    Dead(Pending, DeadLetterReason, String),
}

/// What the route at `index` (whose filter matches) does with the row's event.
fn take(ctx: &Context<'_>, matched: &Matched, sighting: &Sighting, index: usize) -> Take {
    let (plan, row) = (ctx.site.plan, &matched.row);
    let route = &ctx.routes.routes()[index];
    let event = || {
        Pending::new(Event {
            id: row.id as u64,
            topic: row.topic.clone(),
            device: route.device_of(&row.topic).unwrap_or("").to_string(),
            client_id: row.client_id.clone(),
            payload: row.payload.clone(),
            received_ms: row.received_ms,
            location: None,
            regions: Vec::new(),
        })
    };
    let located = match sighting.of(index) {
        Ok(located) => located,
        Err(e) => return Take::Dead(event(), DeadLetterReason::BadLocation, e.to_string()),
    };
    let empty: &[Arc<str>] = &[];
    let (fences, regions) = match located {
        Some((_, placement)) => (&placement.fences[..], &placement.regions[..]),
        None => (empty, empty),
    };
    let facts = Facts {
        payload: (needs_payload(plan, route))
            .then_some(matched.json.as_ref())
            .flatten(),
        location: located.map(|(at, _)| at.into()),
        fences,
        regions,
        distance: &GEODESIC,
    };
    if !route.accepts(&facts) {
        return Take::Declined;
    }
    let mut p = event();
    match located {
        Some((at, placement)) => {
            p.event.location = Some(at.into());
            p.event.regions = placement.regions.iter().map(|r| r.to_string()).collect();
        }
        None if plan.residency => match &plan.no_location {
            NoLocation::LocalOnly => p.local = true,
            NoLocation::Region(region) => p.event.regions = vec![region.clone()],
            NoLocation::DeadLetter => {
                return Take::Dead(p, DeadLetterReason::NoLocation, NO_LOCATION.into())
            }
        },
        None => {}
    }
    Take::Event(p)
}

/// The detail of `no-location` dead letters.
const NO_LOCATION: &str = "the event has no location (payload, device or gateway) and geography.no_location is \"dead-letter\"";

/// Keeps the events whose payload the route's policy accepts, in order; the others become
/// `malformed` dead letters.
pub(crate) fn screen(
    on: OnRoute<'_>,
    pending: Vec<Pending>,
    dead: &mut Vec<NewDeadLetter>,
) -> Vec<Pending> {
    if on.policy.payload != PayloadFormat::Json {
        return pending;
    }
    let mut accepted = Vec::with_capacity(pending.len());
    for p in pending {
        if serde_json::from_slice::<serde::de::IgnoredAny>(&p.event.payload).is_err() {
            let reason = DeadLetterReason::Malformed;
            dead.push(on.dead_letter(p, reason, "payload is not JSON".into()));
            continue;
        }
        accepted.push(p);
    }
    accepted
}

/// One registry row per device: its last position, in the order of those last positions.
fn last_positions(positions: Vec<DevicePosition>) -> Vec<DevicePosition> {
    let mut seen = HashSet::new();
    let mut last: Vec<DevicePosition> = (positions.into_iter().rev())
        .filter(|p| seen.insert(p.device.clone()))
        .collect();
    last.reverse();
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::GeoError;
    use crate::routing::RouteSpec;
    use crate::store::RetryReason;
    use proptest::prelude::*;

    const NOW: u64 = 1_000_000;

    fn spec(name: &str, filter: &str, handler: Option<&str>) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            filter: filter.into(),
            device_segment: 1,
            handler: handler.map(Into::into),
            upstream: "up".into(),
            topic: None,
            when: None,
        }
    }

    fn row(id: i64, topic: &str, payload: &[u8]) -> JournalRow {
        JournalRow {
            id,
            topic: topic.into(),
            payload: payload.to_vec(),
            client_id: "c".into(),
            received_ms: 10,
        }
    }

    /// Everything a decision needs, owned.
    struct World {
        routes: RouteTable,
        policies: Vec<RoutePolicy>,
        versions: HashMap<String, String>,
        plan: GeoPlan,
    }

    impl World {
        fn new(specs: &[RouteSpec]) -> World {
            let routes = RouteTable::compile(specs).unwrap();
            World {
                policies: vec![RoutePolicy::default(); specs.len()],
                routes,
                versions: HashMap::from([("m".to_string(), "v1".to_string())]),
                plan: GeoPlan::default(),
            }
        }

        fn context(&self) -> Context<'_> {
            Context {
                routes: &self.routes,
                policies: &self.policies,
                versions: &self.versions,
                site: Site {
                    gateway_id: "gw",
                    plan: &self.plan,
                },
                now_ms: NOW,
            }
        }

        /// Decides `rows`, each with the sighting `locate` makes for it.
        fn decide_with(
            &self,
            rows: Vec<JournalRow>,
            locate: impl Fn(&Matched) -> Sighting,
        ) -> Decision {
            let located = (rows.into_iter())
                .map(|row| {
                    let matched = match_row(&self.routes, &self.plan, row);
                    let sighting = locate(&matched);
                    (matched, sighting)
                })
                .collect();
            decide(&self.context(), located, Observed::default())
        }

        fn decide(&self, rows: Vec<JournalRow>) -> Decision {
            self.decide_with(rows, |_| Sighting::default())
        }
    }

    #[test]
    fn an_event_fans_out_to_outputs_and_lanes_in_route_order() {
        let world = World::new(&[
            spec("copy", "t/#", None),
            spec("enrich", "t/+/x", Some("m")),
        ]);
        let d = world.decide(vec![
            row(1, "t/a/x", b"1"),
            row(2, "other", b"2"),
            row(3, "t/b", b"3"),
        ]);
        assert_eq!(d.batch.journal_done, [1, 2, 3]);
        assert_eq!(d.unrouted, 1);
        let ids: Vec<&str> = d.batch.outputs.iter().map(|o| o.msg_id.as_str()).collect();
        assert_eq!(ids, ["gw-1-copy-0", "gw-3-copy-0"]);
        assert_eq!(d.batch.retries.len(), 1);
        let queued = &d.batch.retries[0];
        assert_eq!((queued.event_id, queued.route.as_str()), (1, "enrich"));
        assert_eq!(
            (queued.reason.clone(), queued.next_attempt_ms),
            (RetryReason::Queued, NOW)
        );
        assert_eq!((queued.device.as_str(), queued.attempts), ("a", 0));
        assert!(d.batch.dead.is_empty() && d.batch.events.is_empty());
    }

    #[test]
    fn payloads_that_are_not_json_are_dead_letters_on_json_routes() {
        let mut world = World::new(&[spec("copy", "t/#", None), spec("enrich", "t/#", Some("m"))]);
        for policy in &mut world.policies {
            policy.payload = PayloadFormat::Json;
        }
        let d = world.decide(vec![row(1, "t/a", b"{\"v\":1}"), row(2, "t/a", b"nope")]);
        assert_eq!(d.batch.outputs.len(), 1);
        assert_eq!(d.batch.retries.len(), 1);
        let dead: Vec<(&str, u64, Option<&str>)> = (d.batch.dead.iter())
            .map(|l| (l.route.as_str(), l.event_id, l.module_version.as_deref()))
            .collect();
        assert_eq!(dead, [("copy", 2, None), ("enrich", 2, Some("v1"))]);
        assert!(d
            .batch
            .dead
            .iter()
            .all(|l| l.reason == DeadLetterReason::Malformed));
    }

    #[test]
    fn located_events_carry_their_place_and_bad_coordinates_are_dead_letters() {
        let mut world = World::new(&[spec("a", "t/#", None), spec("b", "t/#", Some("m"))]);
        world.plan.active = true;
        let at = Location::new(52.5, 13.4).unwrap();
        let d = world.decide_with(vec![row(1, "t/a", b"{}")], |_| {
            let mut s = Sighting::default();
            let place = s.place(at, |out| {
                out.fences = vec![Arc::from("yard")];
                out.regions = vec![Arc::from("eu")];
            });
            s.answer(0, Ok(Some(place)));
            s.answer(1, Err(LocateError(GeoError::Latitude(91.0))));
            s
        });
        assert_eq!(d.batch.outputs.len(), 1);
        assert_eq!(d.batch.outputs[0].regions, "eu");
        let letter = &d.batch.dead[0];
        assert_eq!(
            (letter.route.as_str(), letter.reason.as_str()),
            ("b", "bad-location")
        );
        assert_eq!(letter.detail, GeoError::Latitude(91.0).to_string());
        assert_eq!(d.unrouted, 0, "a dead letter is routed");
    }

    #[test]
    fn events_without_location_follow_the_no_location_policy() {
        let mut world = World::new(&[spec("a", "t/#", None)]);
        world.plan.active = true;
        world.plan.residency = true;
        let decide = |world: &World| world.decide(vec![row(1, "t/a", b"{}")]);
        world.plan.no_location = NoLocation::LocalOnly;
        assert_eq!(
            decide(&world).batch.outputs[0].link,
            crate::geo::locator::LOCAL_LINK
        );
        world.plan.no_location = NoLocation::Region("eu".into());
        assert_eq!(decide(&world).batch.outputs[0].regions, "eu");
        world.plan.no_location = NoLocation::DeadLetter;
        let d = decide(&world);
        assert!(d.batch.outputs.is_empty());
        assert_eq!(d.batch.dead[0].reason, DeadLetterReason::NoLocation);
        assert_eq!(d.batch.dead[0].detail, NO_LOCATION);
    }

    #[test]
    fn fixes_positions_and_transitions_are_kept_in_order() {
        let world = World::new(&[spec("a", "t/#", None)]);
        let position = |device: &str, lat: f64| DevicePosition {
            device: device.into(),
            lat,
            lon: 0.0,
            fences: Vec::new(),
            updated_ms: 1,
        };
        let observed = Observed {
            positions: vec![
                position("d1", 1.0),
                position("d2", 2.0),
                position("d1", 3.0),
            ],
            transitions: vec![("fences/d1".into(), b"{}".to_vec())],
        };
        let fix = position("$gateway", 9.0);
        let located = vec![(
            match_row(&world.routes, &world.plan, row(1, "gps", b"{}")),
            Sighting {
                fix: Some(fix.clone()),
                ..Sighting::default()
            },
        )];
        let d = decide(&world.context(), located, observed);
        let devices: Vec<(&str, f64)> = (d.batch.devices.iter())
            .map(|p| (p.device.as_str(), p.lat))
            .collect();
        assert_eq!(devices, [("$gateway", 9.0), ("d2", 2.0), ("d1", 3.0)]);
        let event = &d.batch.events[0];
        assert_eq!(
            (event.topic.as_str(), event.received_ms),
            ("fences/d1", NOW)
        );
        assert_eq!(&*event.client_id, GATEWAY_CLIENT);
        assert_eq!(d.unrouted, 1);
    }

    /// A route: its filter (index in [`FILTERS`]), whether it has a handler, whether it
    /// requires JSON.
    type RouteShape = (usize, bool, bool);
    /// A row: its topic (index in [`TOPICS`]), whether its payload is JSON.
    type RowShape = (usize, bool);

    /// A route table of up to four routes over a few topics, and rows on those topics.
    fn world_and_rows() -> impl Strategy<Value = (Vec<RouteShape>, Vec<RowShape>)> {
        let routes = proptest::collection::vec((0usize..4, any::<bool>(), any::<bool>()), 0..5);
        let rows = proptest::collection::vec((0usize..4, any::<bool>()), 0..40);
        (routes, rows)
    }

    const FILTERS: [&str; 4] = ["a/#", "a/+", "a/x", "#"];
    const TOPICS: [&str; 4] = ["a/x", "a/y", "a/x/z", "b"];

    proptest! {
        /// Every row is done; each matching route makes exactly one record of it (an output,
        /// a queued event or a malformed dead letter), per route in journal order; a row
        /// no route matches is counted unrouted.
        #[test]
        fn every_row_is_accounted_for_once_per_matching_route((routes, rows) in world_and_rows()) {
            let specs: Vec<RouteSpec> = (routes.iter().enumerate())
                .map(|(i, &(filter, handler, _))| {
                    spec(&format!("r{i}"), FILTERS[filter], handler.then_some("m"))
                })
                .collect();
            let mut world = World::new(&specs);
            for (policy, &(_, _, json)) in world.policies.iter_mut().zip(&routes) {
                policy.payload = if json { PayloadFormat::Json } else { PayloadFormat::Any };
            }
            let journal: Vec<JournalRow> = (rows.iter().enumerate())
                .map(|(i, &(topic, is_json))| {
                    let payload: &[u8] = if is_json { b"{}" } else { b"{" };
                    row(i as i64 + 1, TOPICS[topic], payload)
                })
                .collect();
            let d = world.decide(journal.clone());
            let ids: Vec<i64> = journal.iter().map(|r| r.id).collect();
            prop_assert_eq!(&d.batch.journal_done, &ids);
            // (route, event id) of every record, by kind.
            let mut records: Vec<(String, u64)> = Vec::new();
            for o in &d.batch.outputs {
                let id: u64 = o.msg_id.split('-').nth(1).unwrap().parse().unwrap();
                prop_assert_eq!(&o.msg_id, &format!("gw-{id}-{}-0", o.route));
                records.push((o.route.clone(), id));
            }
            for r in &d.batch.retries {
                prop_assert_eq!(&r.reason, &RetryReason::Queued);
                records.push((r.route.clone(), r.event_id));
            }
            for l in &d.batch.dead {
                prop_assert_eq!(&l.reason, &DeadLetterReason::Malformed);
                prop_assert_eq!(&l.payload, b"{");
                records.push((l.route.clone(), l.event_id));
            }
            let mut unrouted = 0;
            for (i, r) in journal.iter().enumerate() {
                let matching: Vec<String> = (world.routes.routes().iter())
                    .filter(|route| route.filter.matches(&r.topic))
                    .map(|route| route.name.clone())
                    .collect();
                unrouted += u64::from(matching.is_empty());
                let mut got: Vec<String> = (records.iter())
                    .filter(|(_, id)| *id == i as u64 + 1)
                    .map(|(route, _)| route.clone())
                    .collect();
                got.sort();
                prop_assert_eq!(got, matching);
            }
            prop_assert_eq!(d.unrouted, unrouted);
            // Per route and kind, journal order.
            for kind in [0, 1] {
                let of_kind: Vec<(String, u64)> = match kind {
                    0 => (d.batch.retries.iter()).map(|r| (r.route.clone(), r.event_id)).collect(),
                    _ => (d.batch.dead.iter()).map(|l| (l.route.clone(), l.event_id)).collect(),
                };
                for w in of_kind.windows(2) {
                    if w[0].0 == w[1].0 {
                        prop_assert!(w[0].1 < w[1].1);
                    }
                }
            }
        }
    }
}
