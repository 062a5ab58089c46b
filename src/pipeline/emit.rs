//! From a route's output to an outbox row: residency, the output topic, the message id and
//! the time to live.
//!
//! Guarantees:
//! - An output inherits its event's region tags and is queued only for a link that may carry
//!   all of them (the uplink checks again before sending); otherwise it is a `residency` dead
//!   letter. An event kept local (`local-only`) goes to the gateway's own broker.
//! - The message id `<gateway>-<event id>-<route>-<n>` is the same each time the event is
//!   processed, so that the upstream can drop duplicates.
//! - A topic that cannot be rendered is a `bad-output-topic` dead letter, never a panic.
//!
//! Does not: log, count or touch the store: pure.

use crate::event::{join_tags, Event, Output};
use crate::geo::locator::{GeoPlan, LOCAL_LINK};
use crate::routing::TemplateContext;
use crate::store::{Batch, DeadLetterReason, NewOutboxRow};

use super::records::{OnRoute, Pending};

/// What every output row of this gateway shares: its id and the links' residency.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Site<'a> {
    /// This gateway's id, for `{gateway}` in templates and message ids.
    pub(crate) gateway_id: &'a str,
    /// The geography: the regions each link may carry.
    pub(crate) plan: &'a GeoPlan,
}

/// Why an output cannot be queued: the reason and detail of its dead letter, and the output's
/// payload.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) reason: DeadLetterReason,
    pub(crate) detail: String,
    pub(crate) payload: Vec<u8>,
}

impl Refused {
    /// The event to dead-letter: `source` with the output's payload.
    pub(crate) fn letter(self, source: &Pending) -> (Pending, DeadLetterReason, String) {
        let event = Event {
            payload: self.payload,
            ..source.event.clone()
        };
        let letter = Pending {
            event,
            attempts: 0,
            local: source.local,
        };
        (letter, self.reason, self.detail)
    }
}

/// The outbox row of `source`'s `output` on `on`'s route (`None`: the event itself, for a
/// passthrough route). `n` numbers the outputs derived from one event (or one batch).
pub(crate) fn outbox_row(
    site: Site<'_>,
    on: OnRoute<'_>,
    source: &Pending,
    output: Option<Output>,
    n: usize,
) -> Result<NewOutboxRow, Refused> {
    let event = &source.event;
    let (output_topic, payload) = match output {
        Some(o) => (Some(o.topic), o.payload),
        None => (None, event.payload.clone()),
    };
    let refused = |reason, detail, payload| Refused {
        reason,
        detail,
        payload,
    };
    let route = on.route;
    let link = match source.local {
        true => LOCAL_LINK.to_string(),
        false => route.upstream.clone(),
    };
    let regions = event.regions.iter().map(String::as_str);
    if !source.local && !site.plan.link(&link).allows(regions) {
        let detail = format!(
            "upstream {link:?} may not carry data of region {}",
            event.regions.join(" + ")
        );
        return Err(refused(DeadLetterReason::Residency, detail, payload));
    }
    let context = TemplateContext {
        topic: &event.topic,
        device: &event.device,
        gateway: site.gateway_id,
        output: output_topic.as_deref(),
    };
    let topic = match route.topic.render(&context) {
        Ok(topic) => topic,
        Err(e) => {
            return Err(refused(
                DeadLetterReason::BadOutputTopic,
                e.to_string(),
                payload,
            ))
        }
    };
    Ok(NewOutboxRow {
        link,
        msg_id: format!("{}-{}-{}-{n}", site.gateway_id, event.id, route.name),
        route: route.name.clone(),
        topic,
        payload,
        received_ms: event.received_ms,
        expires_ms: on
            .policy
            .ttl
            .map(|ttl| event.received_ms + ttl.as_millis() as u64)
            .unwrap_or(0),
        regions: join_tags(&event.regions),
    })
}

/// [`outbox_row`], added to `batch`, or its refusal as a dead letter of the route.
pub(crate) fn emit(
    site: Site<'_>,
    on: OnRoute<'_>,
    source: &Pending,
    output: Option<Output>,
    n: usize,
    batch: &mut Batch,
) {
    match outbox_row(site, on, source, output, n) {
        Ok(row) => batch.outputs.push(row),
        Err(refused) => {
            let (letter, reason, detail) = refused.letter(source);
            batch.dead.push(on.dead_letter(letter, reason, detail));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::residency::LinkRegions;
    use crate::pipeline::records::tests::event;
    use crate::pipeline::RoutePolicy;
    use crate::routing::{Route, RouteSpec, RouteTable};
    use std::time::Duration;

    fn route(topic: &str, handler: Option<&str>) -> Route {
        let spec = RouteSpec {
            name: "r".into(),
            filter: "t/#".into(),
            device_segment: 1,
            handler: handler.map(Into::into),
            upstream: "eu-cloud".into(),
            topic: Some(topic.into()),
            when: None,
        };
        RouteTable::compile(&[spec]).unwrap().routes()[0].clone()
    }

    fn eu_only() -> GeoPlan {
        let mut plan = GeoPlan::default();
        let eu = LinkRegions::from_list(&["eu".into()]);
        plan.links.insert("eu-cloud".into(), eu);
        plan
    }

    /// Runs `check` with the site of gateway `gw` (link `eu-cloud` carries `eu` only) and a
    /// handler route with this output topic, policy and module version.
    fn with_route(
        topic: &str,
        policy: RoutePolicy,
        version: Option<&str>,
        check: impl FnOnce(Site<'_>, OnRoute<'_>),
    ) {
        let plan = eu_only();
        let site = Site {
            gateway_id: "gw",
            plan: &plan,
        };
        let route = route(topic, Some("m"));
        let on = OnRoute {
            route: &route,
            policy: &policy,
            version,
        };
        check(site, on)
    }

    #[test]
    fn a_row_has_a_stable_id_its_ttl_and_its_events_tags() {
        let policy = RoutePolicy {
            ttl: Some(Duration::from_secs(2)),
            ..RoutePolicy::default()
        };
        with_route("up/{gateway}/{device}/{output}", policy, None, a_row);
    }

    fn a_row(site: Site<'_>, on: OnRoute<'_>) {
        let mut source = Pending::new(event(5, "t/d", b"in"));
        source.event.regions = vec!["eu".into()];
        let output = Output {
            topic: "hot".into(),
            payload: b"out".to_vec(),
        };
        let row = outbox_row(site, on, &source, Some(output), 3).unwrap();
        assert_eq!(row.msg_id, "gw-5-r-3");
        assert_eq!(row.topic, "up/gw/d/hot");
        assert_eq!(
            (row.payload.as_slice(), row.link.as_str()),
            (&b"out"[..], "eu-cloud")
        );
        assert_eq!(
            (row.expires_ms, row.regions.as_str()),
            (1_005 + 2_000, "eu")
        );
    }

    #[test]
    fn residency_and_bad_topics_are_refused_with_the_outputs_payload() {
        with_route("{output}", RoutePolicy::default(), Some("v"), refusals);
    }

    fn refusals(site: Site<'_>, on: OnRoute<'_>) {
        let mut source = Pending::new(event(5, "t/d", b"in"));
        source.event.regions = vec!["eu".into(), "us".into()];
        let output = || Output {
            topic: "a/+".into(),
            payload: b"out".to_vec(),
        };
        let no = outbox_row(site, on, &source, Some(output()), 0).unwrap_err();
        assert_eq!(no.reason, DeadLetterReason::Residency);
        assert_eq!(
            no.detail,
            "upstream \"eu-cloud\" may not carry data of region eu + us"
        );
        assert_eq!(no.payload, b"out");
        // Kept local: residency does not apply, the link is the gateway's own broker.
        source.local = true;
        let no = outbox_row(site, on, &source, Some(output()), 0).unwrap_err();
        assert_eq!(no.reason, DeadLetterReason::BadOutputTopic);
        let (letter, _, _) = no.letter(&source);
        assert!(letter.local);
        assert_eq!(
            (letter.event.payload.as_slice(), letter.attempts),
            (&b"out"[..], 0)
        );
        let mut batch = Batch::default();
        emit(site, on, &source, Some(output()), 0, &mut batch);
        assert_eq!(batch.dead[0].module_version.as_deref(), Some("v"));
        source.event.regions.clear();
        let fine = Output {
            topic: "a/b".into(),
            payload: Vec::new(),
        };
        let row = outbox_row(site, on, &source, Some(fine), 0).unwrap();
        assert_eq!(row.link, LOCAL_LINK);
    }
}
