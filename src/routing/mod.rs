//! The route table: which routes an event belongs to, and where each route's results go.
//!
//! Configuration describes routes as [`RouteSpec`]s; [`RouteTable::compile`] turns them into
//! [`Route`]s once, at start-up, so that every configuration mistake (a malformed topic filter,
//! an unknown placeholder in an output topic, `{output}` on a route without a handler, a
//! duplicate or empty route name) is reported before the gateway accepts a single event, with
//! the route and the field named in the message.
//!
//! What the router guarantees:
//!
//! - Topic filters follow MQTT 3.1.1 / MQTT 5 §4.7 exactly: `+` matches one level, `#` matches
//!   the remaining levels (including none, so `a/#` matches `a`), empty levels are ordinary
//!   levels, and a wildcard in the first level never matches a topic starting with `$`.
//! - [`RouteTable::matching`] yields every matching route in configuration order; an event can
//!   fan out to several routes.
//! - A rendered output topic ([`TopicTemplate::render`]) is always a valid MQTT publish topic:
//!   non-empty, no wildcard or NUL characters, at most 65535 bytes. Anything else is an error.
//! - Nothing here panics on input: topics, payload-derived strings and configuration text of
//!   any shape produce a value or an error.
//!
//! What it does not do: no I/O, no async, no logging; it does not run handlers, queue outputs
//! or know whether an upstream exists (the config module checks link names). Besides its topic
//! filter, a route may carry a `when` [`Predicate`] on geography and content:
//! [`RouteTable::routes_for`] is the whole routing decision, a pure function of the event's
//! topic and its [`Facts`] (payload, location, geofences, regions).

pub mod predicate;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::routing::predicate::{Facts, Predicate, PredicateConfig, PredicateError};

/// The largest topic name or topic filter MQTT can carry, in bytes.
const MAX_TOPIC_BYTES: usize = 65535;

/// An error in a route's configuration: a topic filter, a topic template or the route table.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    /// A topic filter must have at least one character.
    #[error("empty topic filter")]
    EmptyFilter,
    /// A topic filter longer than MQTT allows.
    #[error("topic filter is {len} bytes, over the MQTT limit of 65535")]
    FilterTooLong {
        /// The filter's length in bytes.
        len: usize,
    },
    /// A topic filter containing U+0000.
    #[error("topic filter contains a NUL character")]
    FilterNul,
    /// `#` somewhere other than alone in the last level.
    #[error("'#' must be alone in the last level of a topic filter (found in level {level})")]
    MisplacedMultiLevel {
        /// The 0-based level that contains the misplaced `#`.
        level: usize,
    },
    /// `+` sharing its level with other characters.
    #[error("'+' must be alone in its level of a topic filter (found in level {level})")]
    MisplacedSingleLevel {
        /// The 0-based level that contains the misplaced `+`.
        level: usize,
    },
    /// A topic template must have at least one character.
    #[error("empty topic template")]
    EmptyTemplate,
    /// A `{` that opens a placeholder which is never closed.
    #[error("unclosed '{{' at byte {at} of the topic template")]
    UnclosedBrace {
        /// Byte offset of the `{`.
        at: usize,
    },
    /// A lone `}` outside a placeholder.
    #[error(
        "unmatched '}}' at byte {at} of the topic template (write '}}}}' for a literal brace)"
    )]
    UnmatchedBrace {
        /// Byte offset of the `}`.
        at: usize,
    },
    /// A placeholder that is none of `{topic}`, `{device}`, `{gateway}`, `{output}`, `{0}`..`{99}`.
    #[error("unknown placeholder {{{name}}}")]
    UnknownPlaceholder {
        /// The text between the braces.
        name: String,
    },
    /// Literal template text that can never be part of a publish topic.
    #[error("topic template contains {ch:?} at byte {at}, which a publish topic cannot contain")]
    ForbiddenChar {
        /// The offending character (`+`, `#` or NUL).
        ch: char,
        /// Its byte offset in the template.
        at: usize,
    },
    /// `{output}` in the topic template of a route that has no handler to produce it.
    #[error("{{output}} is only available on a route with a handler")]
    OutputWithoutHandler,
    /// A field that must not be empty (handler, upstream).
    #[error("must not be empty")]
    EmptyField,
    /// A route name used twice.
    #[error("duplicate route name (first used by route #{first})")]
    DuplicateName {
        /// 1-based position, in configuration order, of the route that used the name first.
        first: usize,
    },
    /// A route's `when` condition is not valid.
    #[error("{0}")]
    Predicate(PredicateError),
    /// A route with an empty (or all-whitespace) name.
    #[error("route #{index}: name: must not be empty")]
    EmptyName {
        /// 1-based position of the route in configuration order.
        index: usize,
    },
    /// An error in one field of one route.
    #[error("route {route:?}: {field}: {source}")]
    InRoute {
        /// The route's name.
        route: String,
        /// The configuration field at fault (`name`, `filter`, `topic`, `handler`, `upstream`).
        field: &'static str,
        /// What is wrong with it.
        source: Box<RouteError>,
    },
}

impl RouteError {
    fn in_route(route: &str, field: &'static str, source: RouteError) -> RouteError {
        RouteError::InRoute {
            route: route.to_owned(),
            field,
            source: Box::new(source),
        }
    }
}

/// Why an output topic could not be rendered for one event.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    /// The template refers to a level `{N}` the event's topic does not have.
    #[error("topic {topic:?} has no level {index} (it has {levels} levels)")]
    MissingLevel {
        /// The level the template asked for (0-based).
        index: u8,
        /// The event's topic.
        topic: String,
        /// How many levels the topic has.
        levels: usize,
    },
    /// The template uses `{output}` but no handler output topic was given.
    #[error("the template uses {{output}} but no handler output topic was given")]
    MissingOutput,
    /// The rendered topic is empty.
    #[error("the rendered topic is empty")]
    Empty,
    /// The rendered topic contains a character a publish topic cannot contain.
    #[error("the rendered topic {topic:?} contains {ch:?}, which a publish topic cannot contain")]
    ForbiddenChar {
        /// The offending character (`+`, `#` or NUL).
        ch: char,
        /// The rendered topic.
        topic: String,
    },
    /// The rendered topic is longer than MQTT allows.
    #[error("the rendered topic is {len} bytes, over the MQTT limit of 65535")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

/// Checks that `topic` is a valid MQTT publish topic name.
fn check_topic_name(topic: &str) -> Result<(), RenderError> {
    if topic.is_empty() {
        return Err(RenderError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(RenderError::TooLong { len: topic.len() });
    }
    if let Some(ch) = topic.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(RenderError::ForbiddenChar {
            ch,
            topic: topic.to_owned(),
        });
    }
    Ok(())
}

/// An MQTT topic filter (MQTT 3.1.1 §4.7, MQTT 5 §4.7).
///
/// Levels are separated by `/`; `+` matches exactly one level, `#` matches all remaining levels
/// (including none: `a/#` matches `a`) and may only appear alone in the last level. Empty levels
/// are legal and match only empty levels (or wildcards). A wildcard in the first level never
/// matches a topic whose first level starts with `$` (`#` does not match `$SYS/uptime`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicFilter {
    /// The filter exactly as written; validated by [`TopicFilter::parse`].
    text: String,
}

impl TopicFilter {
    /// Parses and validates a topic filter.
    ///
    /// Rejects an empty filter, a filter over 65535 bytes, a NUL character, `#` anywhere but
    /// alone in the last level, and `+` sharing its level with anything else.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        if s.is_empty() {
            return Err(RouteError::EmptyFilter);
        }
        if s.len() > MAX_TOPIC_BYTES {
            return Err(RouteError::FilterTooLong { len: s.len() });
        }
        if s.contains('\0') {
            return Err(RouteError::FilterNul);
        }
        let levels = s.split('/').count();
        for (level, text) in s.split('/').enumerate() {
            if text.contains('#') && (text != "#" || level + 1 != levels) {
                return Err(RouteError::MisplacedMultiLevel { level });
            }
            if text.contains('+') && text != "+" {
                return Err(RouteError::MisplacedSingleLevel { level });
            }
        }
        Ok(TopicFilter { text: s.to_owned() })
    }

    /// Whether the publish topic `topic` matches this filter.
    ///
    /// A `topic` that is not a valid publish topic name (empty, over 65535 bytes, containing
    /// `+`, `#` or NUL) matches nothing.
    pub fn matches(&self, topic: &str) -> bool {
        // The broker's rule, so that a route and a local subscription with the same filter
        // always see the same publishes.
        crate::topic::filter_matches(&self.text, topic)
    }

    /// The filter exactly as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the filter contains a `+` or `#` wildcard.
    pub fn has_wildcards(&self) -> bool {
        self.text
            .split('/')
            .any(|level| level == "+" || level == "#")
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for TopicFilter {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicFilter::parse(s)
    }
}

/// One piece of a parsed [`TopicTemplate`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// Literal text, with `{{`/`}}` escapes already resolved.
    Literal(String),
    /// `{topic}`: the event's whole topic.
    Topic,
    /// `{device}`: the device id.
    Device,
    /// `{gateway}`: the gateway id.
    Gateway,
    /// `{output}`: the topic a handler returned.
    Output,
    /// `{N}`: the N-th (0-based) level of the event's topic.
    Level(u8),
}

impl Part {
    /// The placeholder named `name` (the text between the braces), if it is one.
    fn placeholder(name: &str) -> Option<Part> {
        match name {
            "topic" => Some(Part::Topic),
            "device" => Some(Part::Device),
            "gateway" => Some(Part::Gateway),
            "output" => Some(Part::Output),
            _ => {
                let canonical = matches!(name.len(), 1 | 2)
                    && name.bytes().all(|b| b.is_ascii_digit())
                    && !(name.len() == 2 && name.starts_with('0'));
                if canonical {
                    name.parse().ok().map(Part::Level)
                } else {
                    None
                }
            }
        }
    }
}

/// An output-topic template such as `site/{device}/alerts`.
///
/// Placeholders: `{topic}` (the event's whole topic), `{device}` (the device id), `{gateway}`
/// (the gateway id), `{output}` (the topic a handler returned; only on routes with a handler),
/// and `{0}`..`{99}` (that 0-based level of the event's topic). `{{` and `}}` are literal
/// braces. Literal text cannot contain `+`, `#` or NUL, since the result must be a publish
/// topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    /// The template exactly as written.
    text: String,
    /// The parsed pieces, adjacent literals merged.
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses a template, naming the problem on error: empty template, unclosed `{`, lone `}`,
    /// unknown placeholder, or a literal `+`, `#` or NUL.
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        if s.is_empty() {
            return Err(RouteError::EmptyTemplate);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((at, ch)) = chars.next() {
            match ch {
                '{' => {
                    if chars.next_if(|&(_, c)| c == '{').is_some() {
                        literal.push('{');
                        continue;
                    }
                    let end = loop {
                        match chars.next() {
                            Some((end, '}')) => break end,
                            Some(_) => {}
                            None => return Err(RouteError::UnclosedBrace { at }),
                        }
                    };
                    let name = &s[at + 1..end];
                    let part =
                        Part::placeholder(name).ok_or_else(|| RouteError::UnknownPlaceholder {
                            name: name.to_owned(),
                        })?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                }
                '}' => {
                    if chars.next_if(|&(_, c)| c == '}').is_some() {
                        literal.push('}');
                    } else {
                        return Err(RouteError::UnmatchedBrace { at });
                    }
                }
                '+' | '#' | '\0' => return Err(RouteError::ForbiddenChar { ch, at }),
                _ => literal.push(ch),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(TopicTemplate {
            text: s.to_owned(),
            parts,
        })
    }

    /// Whether the template uses `{output}` (and so needs a handler).
    pub fn uses_output(&self) -> bool {
        self.parts.contains(&Part::Output)
    }

    /// The template exactly as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Renders the template for one event.
    ///
    /// Errors if a referenced level `{N}` does not exist in `ctx.topic`, if `{output}` is used
    /// and `ctx.output` is `None`, or if the result is not a valid publish topic (empty,
    /// containing `+`, `#` or NUL, or over 65535 bytes).
    pub fn render(&self, ctx: &TemplateContext<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Topic => out.push_str(ctx.topic),
                Part::Device => out.push_str(ctx.device),
                Part::Gateway => out.push_str(ctx.gateway),
                Part::Output => out.push_str(ctx.output.ok_or(RenderError::MissingOutput)?),
                Part::Level(index) => {
                    let level = ctx
                        .topic
                        .split('/')
                        .nth(usize::from(*index))
                        .ok_or_else(|| RenderError::MissingLevel {
                            index: *index,
                            topic: ctx.topic.to_owned(),
                            levels: ctx.topic.split('/').count(),
                        })?;
                    out.push_str(level);
                }
            }
            if out.len() > MAX_TOPIC_BYTES {
                return Err(RenderError::TooLong { len: out.len() });
            }
        }
        check_topic_name(&out)?;
        Ok(out)
    }
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for TopicTemplate {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicTemplate::parse(s)
    }
}

/// The values a [`TopicTemplate`] is rendered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateContext<'a> {
    /// The event's topic (`{topic}`, and the source of `{0}`..`{99}`).
    pub topic: &'a str,
    /// The device id (`{device}`).
    pub device: &'a str,
    /// The gateway id (`{gateway}`).
    pub gateway: &'a str,
    /// The topic a handler returned (`{output}`); `None` on a route without a handler.
    pub output: Option<&'a str>,
}

/// What configuration says about one route (the config module builds these from TOML).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Unique, non-empty name; used in metrics, dead letters and error messages.
    pub name: String,
    /// The MQTT topic filter selecting the events of this route.
    pub filter: String,
    /// The 0-based topic level holding the device id.
    pub device_segment: usize,
    /// The Wasm handler to run on each event, or `None` to pass events through unchanged.
    pub handler: Option<String>,
    /// The upstream link the route's outputs are queued for.
    pub upstream: String,
    /// The output-topic template; `None` for the default (`{topic}`, or `{output}` with a
    /// handler).
    pub topic: Option<String>,
    /// The route's condition on geography and content, if any.
    pub when: Option<PredicateConfig>,
}

/// A compiled route.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique, non-empty name.
    pub name: String,
    /// Which events belong to the route.
    pub filter: TopicFilter,
    /// The 0-based topic level holding the device id.
    pub device_segment: usize,
    /// The Wasm handler to run, or `None` for a passthrough route.
    pub handler: Option<String>,
    /// The upstream link the outputs are queued for.
    pub upstream: String,
    /// The output topic; uses `{output}` only if `handler` is set.
    pub topic: TopicTemplate,
    /// Only events satisfying it take the route.
    pub when: Option<Predicate>,
}

impl Route {
    /// The device id: the topic level at `device_segment`, or `None` when the topic is too
    /// short or that level is empty.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .split('/')
            .nth(self.device_segment)
            .filter(|level| !level.is_empty())
    }

    /// Whether an event with these facts satisfies the route's `when` (true without one).
    pub fn accepts<S: AsRef<str>>(&self, facts: &Facts<'_, S>) -> bool {
        self.when.as_ref().is_none_or(|when| when.evaluate(facts))
    }
}

/// The compiled route table, in configuration order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles specs in order.
    ///
    /// The default topic template is `{topic}` without a handler and `{output}` with one.
    /// Errors name the route and the offending field, e.g.
    /// `route "alerts": topic: unknown placeholder {devise}`: empty or duplicate name, bad
    /// filter, empty handler or upstream, bad template, `{output}` used without a handler.
    pub fn compile(specs: &[RouteSpec]) -> Result<RouteTable, RouteError> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut routes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name.as_str();
            if name.trim().is_empty() {
                return Err(RouteError::EmptyName { index: i + 1 });
            }
            if let Some(&first) = seen.get(name) {
                return Err(RouteError::in_route(
                    name,
                    "name",
                    RouteError::DuplicateName { first },
                ));
            }
            seen.insert(name, i + 1);
            let filter = TopicFilter::parse(&spec.filter)
                .map_err(|e| RouteError::in_route(name, "filter", e))?;
            if spec.handler.as_deref().is_some_and(|h| h.trim().is_empty()) {
                return Err(RouteError::in_route(
                    name,
                    "handler",
                    RouteError::EmptyField,
                ));
            }
            if spec.upstream.trim().is_empty() {
                return Err(RouteError::in_route(
                    name,
                    "upstream",
                    RouteError::EmptyField,
                ));
            }
            let default = if spec.handler.is_some() {
                "{output}"
            } else {
                "{topic}"
            };
            let template = TopicTemplate::parse(spec.topic.as_deref().unwrap_or(default))
                .map_err(|e| RouteError::in_route(name, "topic", e))?;
            if template.uses_output() && spec.handler.is_none() {
                return Err(RouteError::in_route(
                    name,
                    "topic",
                    RouteError::OutputWithoutHandler,
                ));
            }
            let when = match &spec.when {
                Some(config) => {
                    Some(crate::routing::predicate::compile(config).map_err(|e| {
                        RouteError::in_route(name, "when", RouteError::Predicate(e))
                    })?)
                }
                None => None,
            };
            routes.push(Route {
                when,
                name: spec.name.clone(),
                filter,
                device_segment: spec.device_segment,
                handler: spec.handler.clone(),
                upstream: spec.upstream.clone(),
                topic: template,
            });
        }
        Ok(RouteTable { routes })
    }

    /// Every route whose filter matches `topic`, in configuration order (an event can fan out
    /// to several routes).
    pub fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        self.routes
            .iter()
            .filter(move |route| route.filter.matches(topic))
    }

    /// The routes an event takes: those whose filter matches `topic` and whose `when` holds
    /// for `facts`, in configuration order.
    pub fn routes_for<'a, S: AsRef<str>>(
        &'a self,
        topic: &'a str,
        facts: &'a Facts<'a, S>,
    ) -> impl Iterator<Item = &'a Route> + 'a {
        self.matching(topic)
            .filter(move |route| route.accepts(facts))
    }

    /// All routes, in configuration order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn template(s: &str) -> TopicTemplate {
        TopicTemplate::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn ctx<'a>(topic: &'a str, output: Option<&'a str>) -> TemplateContext<'a> {
        TemplateContext {
            topic,
            device: "dev7",
            gateway: "gw1",
            output,
        }
    }

    fn spec(name: &str, filter: &str) -> RouteSpec {
        RouteSpec {
            name: name.to_owned(),
            filter: filter.to_owned(),
            device_segment: 1,
            handler: None,
            upstream: "cloud".to_owned(),
            topic: None,
            when: None,
        }
    }

    // ---- topic filters: matching ----

    #[test]
    fn filter_matching_table() {
        let cases: &[(&str, &str, bool)] = &[
            // MQTT §4.7.1.2: multi-level wildcard.
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/tennis/player1/#", "sport/tennis/player2", false),
            ("sport/tennis/player1/#", "sport/tennis", false),
            ("sport/#", "sport", true),
            ("sport/#", "sport/", true),
            ("sport/#", "sports", false),
            ("#", "sport/tennis", true),
            ("#", "/", true),
            ("#", "a", true),
            // MQTT §4.7.1.3: single-level wildcard.
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player2", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+", "sport", true),
            ("+", "/finance", false),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+/tennis/#", "sport/tennis/player1", true),
            ("+/tennis/#", "sport/tennis", true),
            ("+/tennis/#", "sport/golf", false),
            // Leading slash: "/finance" has an empty first level.
            ("/finance", "/finance", true),
            ("/finance", "finance", false),
            ("finance", "/finance", false),
            // Empty levels are ordinary levels.
            ("a//b", "a//b", true),
            ("a//b", "a/b", false),
            ("a/+/b", "a//b", true),
            ("a/", "a/", true),
            ("a/", "a", false),
            ("+/+", "/", true),
            ("+", "/", false),
            ("a/+", "a/", true),
            ("/", "/", true),
            // $-topics: wildcards in the first level never match them.
            ("#", "$SYS/broker/uptime", false),
            ("#", "$SYS", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("+", "$SYS", false),
            ("+/#", "$SYS/x", false),
            ("$SYS/#", "$SYS/monitor/Clients", true),
            ("$SYS/#", "$SYS", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("$SYS/+/Clients", "$SYS/monitor/Clients", true),
            ("a/#", "a/$b", true),
            ("+/$b", "a/$b", true),
            // Exact filters.
            ("a/b/c", "a/b/c", true),
            ("a/b/c", "a/b", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "A/b/c", false),
            // Invalid publish topics match nothing.
            ("#", "", false),
            ("#", "a/+", false),
            ("#", "a/#", false),
            ("+", "+", false),
            ("#", "a\0b", false),
        ];
        for &(f, topic, expected) in cases {
            assert_eq!(
                filter(f).matches(topic),
                expected,
                "filter {f:?} vs topic {topic:?}"
            );
        }
    }

    #[test]
    fn topic_of_maximum_length_matches_but_longer_does_not() {
        let max = "a".repeat(MAX_TOPIC_BYTES);
        let over = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert!(filter("#").matches(&max));
        assert!(filter("+").matches(&max));
        assert!(!filter("#").matches(&over));
    }

    #[test]
    fn filter_display_and_as_str_keep_the_original_text() {
        for s in ["sport/+/#", "/finance", "a//b", "$SYS/#", "#"] {
            let f = filter(s);
            assert_eq!(f.as_str(), s);
            assert_eq!(f.to_string(), s);
            assert_eq!(s.parse::<TopicFilter>(), Ok(f));
        }
    }

    #[test]
    fn has_wildcards() {
        assert!(filter("a/+").has_wildcards());
        assert!(filter("#").has_wildcards());
        assert!(!filter("a/b").has_wildcards());
        assert!(!filter("$SYS").has_wildcards());
    }

    // ---- topic filters: validation ----

    #[test]
    fn valid_filters_parse() {
        for s in [
            "#", "+", "/", "//", "+/+", "+/#", "a/+/b/#", "/finance", "$SYS/#", "a b/c d", "ü/ñ",
        ] {
            assert!(TopicFilter::parse(s).is_ok(), "{s:?} should be valid");
        }
        let max = "a".repeat(MAX_TOPIC_BYTES);
        assert!(TopicFilter::parse(&max).is_ok());
    }

    #[test]
    fn invalid_filters_are_rejected() {
        let cases: &[(&str, RouteError)] = &[
            ("", RouteError::EmptyFilter),
            ("a\0b", RouteError::FilterNul),
            ("#/a", RouteError::MisplacedMultiLevel { level: 0 }),
            (
                "sport/tennis#",
                RouteError::MisplacedMultiLevel { level: 1 },
            ),
            (
                "sport/tennis/#/ranking",
                RouteError::MisplacedMultiLevel { level: 2 },
            ),
            ("a/#b", RouteError::MisplacedMultiLevel { level: 1 }),
            ("##", RouteError::MisplacedMultiLevel { level: 0 }),
            ("a/#/", RouteError::MisplacedMultiLevel { level: 1 }),
            ("sport+", RouteError::MisplacedSingleLevel { level: 0 }),
            ("a/b+/c", RouteError::MisplacedSingleLevel { level: 1 }),
            ("a/++", RouteError::MisplacedSingleLevel { level: 1 }),
            ("+a", RouteError::MisplacedSingleLevel { level: 0 }),
        ];
        for (s, expected) in cases {
            assert_eq!(
                TopicFilter::parse(s).as_ref(),
                Err(expected),
                "filter {s:?}"
            );
        }
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(
            TopicFilter::parse(&long),
            Err(RouteError::FilterTooLong {
                len: MAX_TOPIC_BYTES + 1
            })
        );
    }

    #[test]
    fn filter_error_messages() {
        let msg = |s: &str| TopicFilter::parse(s).unwrap_err().to_string();
        assert_eq!(msg(""), "empty topic filter");
        assert_eq!(msg("a\0"), "topic filter contains a NUL character");
        assert_eq!(
            msg("a/#/b"),
            "'#' must be alone in the last level of a topic filter (found in level 1)"
        );
        assert_eq!(
            msg("a+"),
            "'+' must be alone in its level of a topic filter (found in level 0)"
        );
        assert_eq!(
            msg(&"a".repeat(70000)),
            "topic filter is 70000 bytes, over the MQTT limit of 65535"
        );
    }

    // ---- topic templates ----

    #[test]
    fn template_rendering() {
        let topic = "sensors/dev7/temp";
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("{topic}", None, "sensors/dev7/temp"),
            ("site/{device}/alerts", None, "site/dev7/alerts"),
            ("gw/{gateway}/{topic}", None, "gw/gw1/sensors/dev7/temp"),
            ("{output}", Some("out/x"), "out/x"),
            ("{gateway}/{output}", Some("out/x"), "gw1/out/x"),
            ("{0}", None, "sensors"),
            ("{2}/{1}/{0}", None, "temp/dev7/sensors"),
            ("x{1}y", None, "xdev7y"),
            ("{device}{device}", None, "dev7dev7"),
            ("plain/literal", None, "plain/literal"),
            ("$ok/{1}", None, "$ok/dev7"),
        ];
        for &(t, output, expected) in cases {
            assert_eq!(
                template(t).render(&ctx(topic, output)).as_deref(),
                Ok(expected),
                "template {t:?}"
            );
        }
    }

    #[test]
    fn template_levels_with_empty_levels() {
        let t = template("{0}|{1}|{2}");
        assert_eq!(t.render(&ctx("/a/", None)).as_deref(), Ok("|a|"));
        assert_eq!(
            template("x/{0}").render(&ctx("/finance", None)).as_deref(),
            Ok("x/")
        );
        assert_eq!(
            template("{99}").render(&ctx(&"a/".repeat(99), None)),
            Err(RenderError::Empty)
        );
        let topic100 = (0..100)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("/");
        assert_eq!(
            template("{99}").render(&ctx(&topic100, None)).as_deref(),
            Ok("99")
        );
    }

    #[test]
    fn template_escapes() {
        let c = ctx("a/b", None);
        assert_eq!(template("{{").render(&c).as_deref(), Ok("{"));
        assert_eq!(template("}}").render(&c).as_deref(), Ok("}"));
        assert_eq!(template("{{topic}}").render(&c).as_deref(), Ok("{topic}"));
        assert_eq!(template("{{{topic}}}").render(&c).as_deref(), Ok("{a/b}"));
        assert_eq!(template("x{{}}y").render(&c).as_deref(), Ok("x{}y"));
        assert!(!template("{{output}}").uses_output());
    }

    #[test]
    fn template_render_errors() {
        assert_eq!(
            template("{3}").render(&ctx("a/b/c", None)),
            Err(RenderError::MissingLevel {
                index: 3,
                topic: "a/b/c".to_owned(),
                levels: 3
            })
        );
        assert_eq!(
            template("{output}").render(&ctx("a", None)),
            Err(RenderError::MissingOutput)
        );
        assert_eq!(
            template("{output}").render(&ctx("a", Some(""))),
            Err(RenderError::Empty)
        );
        assert_eq!(
            template("{output}").render(&ctx("a", Some("x/+"))),
            Err(RenderError::ForbiddenChar {
                ch: '+',
                topic: "x/+".to_owned()
            })
        );
        assert_eq!(
            template("x/{output}").render(&ctx("a", Some("#"))),
            Err(RenderError::ForbiddenChar {
                ch: '#',
                topic: "x/#".to_owned()
            })
        );
        assert_eq!(
            template("{output}").render(&ctx("a", Some("a\0"))),
            Err(RenderError::ForbiddenChar {
                ch: '\0',
                topic: "a\0".to_owned()
            })
        );
        let device = "d".repeat(MAX_TOPIC_BYTES);
        let c = TemplateContext {
            topic: "a",
            device: &device,
            gateway: "g",
            output: None,
        };
        assert_eq!(
            template("{device}").render(&c).map(|s| s.len()),
            Ok(MAX_TOPIC_BYTES)
        );
        assert_eq!(
            template("x{device}").render(&c),
            Err(RenderError::TooLong {
                len: MAX_TOPIC_BYTES + 1
            })
        );
        let empty_device = TemplateContext { device: "", ..c };
        assert_eq!(
            template("{device}").render(&empty_device),
            Err(RenderError::Empty)
        );
    }

    #[test]
    fn render_error_messages() {
        assert_eq!(
            template("{5}")
                .render(&ctx("a/b", None))
                .unwrap_err()
                .to_string(),
            "topic \"a/b\" has no level 5 (it has 2 levels)"
        );
        assert_eq!(
            RenderError::MissingOutput.to_string(),
            "the template uses {output} but no handler output topic was given"
        );
        assert_eq!(
            template("{output}")
                .render(&ctx("a", Some("x/#")))
                .unwrap_err()
                .to_string(),
            "the rendered topic \"x/#\" contains '#', which a publish topic cannot contain"
        );
    }

    #[test]
    fn template_parse_errors() {
        let cases: &[(&str, RouteError)] = &[
            ("", RouteError::EmptyTemplate),
            ("{topic", RouteError::UnclosedBrace { at: 0 }),
            ("a/{", RouteError::UnclosedBrace { at: 2 }),
            ("a/{{{", RouteError::UnclosedBrace { at: 4 }),
            ("a}", RouteError::UnmatchedBrace { at: 1 }),
            ("{topic}}", RouteError::UnmatchedBrace { at: 7 }),
            (
                "site/{devise}/alerts",
                RouteError::UnknownPlaceholder {
                    name: "devise".to_owned(),
                },
            ),
            (
                "{}",
                RouteError::UnknownPlaceholder {
                    name: String::new(),
                },
            ),
            (
                "{100}",
                RouteError::UnknownPlaceholder {
                    name: "100".to_owned(),
                },
            ),
            (
                "{01}",
                RouteError::UnknownPlaceholder {
                    name: "01".to_owned(),
                },
            ),
            (
                "{+1}",
                RouteError::UnknownPlaceholder {
                    name: "+1".to_owned(),
                },
            ),
            (
                "{-1}",
                RouteError::UnknownPlaceholder {
                    name: "-1".to_owned(),
                },
            ),
            (
                "{ topic}",
                RouteError::UnknownPlaceholder {
                    name: " topic".to_owned(),
                },
            ),
            (
                "{Topic}",
                RouteError::UnknownPlaceholder {
                    name: "Topic".to_owned(),
                },
            ),
            (
                "{a{b}",
                RouteError::UnknownPlaceholder {
                    name: "a{b".to_owned(),
                },
            ),
            ("a/+", RouteError::ForbiddenChar { ch: '+', at: 2 }),
            ("a/#", RouteError::ForbiddenChar { ch: '#', at: 2 }),
            ("a\0", RouteError::ForbiddenChar { ch: '\0', at: 1 }),
        ];
        for (s, expected) in cases {
            assert_eq!(
                TopicTemplate::parse(s).as_ref(),
                Err(expected),
                "template {s:?}"
            );
        }
    }

    #[test]
    fn template_parse_error_messages() {
        let msg = |s: &str| TopicTemplate::parse(s).unwrap_err().to_string();
        assert_eq!(msg(""), "empty topic template");
        assert_eq!(
            msg("a/{device"),
            "unclosed '{' at byte 2 of the topic template"
        );
        assert_eq!(
            msg("a}"),
            "unmatched '}' at byte 1 of the topic template (write '}}' for a literal brace)"
        );
        assert_eq!(msg("{devise}"), "unknown placeholder {devise}");
        assert_eq!(
            msg("a/+"),
            "topic template contains '+' at byte 2, which a publish topic cannot contain"
        );
    }

    #[test]
    fn template_accessors() {
        let t = template("site/{device}/{{x}}");
        assert_eq!(t.as_str(), "site/{device}/{{x}}");
        assert_eq!(t.to_string(), "site/{device}/{{x}}");
        assert_eq!(
            "site/{device}/{{x}}".parse::<TopicTemplate>(),
            Ok(t.clone())
        );
        assert!(!t.uses_output());
        assert!(template("a/{output}").uses_output());
        for n in 0..=99 {
            assert!(TopicTemplate::parse(&format!("{{{n}}}")).is_ok(), "{{{n}}}");
        }
    }

    // ---- routes ----

    #[test]
    fn device_of_edge_cases() {
        let table = RouteTable::compile(&[
            RouteSpec {
                device_segment: 0,
                ..spec("first", "#")
            },
            RouteSpec {
                device_segment: 2,
                ..spec("third", "#")
            },
        ])
        .unwrap();
        let (first, third) = (&table.routes()[0], &table.routes()[1]);
        assert_eq!(first.device_of("dev/x"), Some("dev"));
        assert_eq!(first.device_of("dev"), Some("dev"));
        assert_eq!(first.device_of("/x"), None, "empty level is no device");
        assert_eq!(first.device_of(""), None);
        assert_eq!(third.device_of("a/b/dev"), Some("dev"));
        assert_eq!(third.device_of("a/b/dev/more"), Some("dev"));
        assert_eq!(third.device_of("a/b"), None, "topic too short");
        assert_eq!(third.device_of("a/b/"), None, "trailing empty level");
        assert_eq!(third.device_of("a/b//c"), None);
        assert_eq!(third.device_of("//ü"), Some("ü"));
        let far = Route {
            device_segment: usize::MAX,
            ..first.clone()
        };
        assert_eq!(far.device_of("a/b/c"), None);
    }

    #[test]
    fn compile_defaults_and_fields() {
        let table = RouteTable::compile(&[
            spec("pass", "sensors/+/temp"),
            RouteSpec {
                handler: Some("threshold".to_owned()),
                ..spec("handled", "sensors/#")
            },
            RouteSpec {
                topic: Some("site/{device}/alerts".to_owned()),
                upstream: "backup".to_owned(),
                device_segment: 3,
                ..spec("templated", "a/b")
            },
        ])
        .unwrap();
        let routes = table.routes();
        assert_eq!(routes.len(), 3);
        assert_eq!(routes[0].name, "pass");
        assert_eq!(routes[0].topic, template("{topic}"));
        assert_eq!(routes[0].filter, filter("sensors/+/temp"));
        assert_eq!(routes[0].handler, None);
        assert_eq!(routes[1].topic, template("{output}"));
        assert_eq!(routes[1].handler.as_deref(), Some("threshold"));
        assert_eq!(routes[2].topic, template("site/{device}/alerts"));
        assert_eq!(routes[2].upstream, "backup");
        assert_eq!(routes[2].device_segment, 3);
        assert_eq!(RouteTable::compile(&[]).unwrap().routes().len(), 0);
        assert_eq!(RouteTable::default(), RouteTable::compile(&[]).unwrap());
    }

    #[test]
    fn compile_errors_name_route_and_field() {
        let err = |specs: &[RouteSpec]| RouteTable::compile(specs).unwrap_err().to_string();
        assert_eq!(
            err(&[RouteSpec {
                topic: Some("site/{devise}/alerts".to_owned()),
                ..spec("alerts", "#")
            }]),
            "route \"alerts\": topic: unknown placeholder {devise}"
        );
        assert_eq!(
            err(&[spec("bad", "a/#/b")]),
            "route \"bad\": filter: '#' must be alone in the last level of a topic filter (found in level 1)"
        );
        assert_eq!(
            err(&[spec("nofilter", "")]),
            "route \"nofilter\": filter: empty topic filter"
        );
        assert_eq!(
            err(&[RouteSpec {
                topic: Some("x/{output}".to_owned()),
                ..spec("pass", "#")
            }]),
            "route \"pass\": topic: {output} is only available on a route with a handler"
        );
        assert_eq!(
            err(&[spec("a", "x"), spec("b", "y"), spec("a", "z")]),
            "route \"a\": name: duplicate route name (first used by route #1)"
        );
        assert_eq!(
            err(&[spec("a", "x"), spec("", "y")]),
            "route #2: name: must not be empty"
        );
        assert_eq!(err(&[spec("  ", "y")]), "route #1: name: must not be empty");
        assert_eq!(
            err(&[RouteSpec {
                handler: Some(String::new()),
                ..spec("h", "#")
            }]),
            "route \"h\": handler: must not be empty"
        );
        assert_eq!(
            err(&[RouteSpec {
                upstream: String::new(),
                ..spec("u", "#")
            }]),
            "route \"u\": upstream: must not be empty"
        );
        assert_eq!(
            err(&[RouteSpec {
                topic: Some(String::new()),
                ..spec("t", "#")
            }]),
            "route \"t\": topic: empty topic template"
        );
        assert_eq!(
            err(&[RouteSpec {
                topic: Some("{topic".to_owned()),
                ..spec("t", "#")
            }]),
            "route \"t\": topic: unclosed '{' at byte 0 of the topic template"
        );
    }

    #[test]
    fn compile_error_values() {
        assert_eq!(
            RouteTable::compile(&[RouteSpec {
                topic: Some("{output}".to_owned()),
                ..spec("p", "#")
            }]),
            Err(RouteError::InRoute {
                route: "p".to_owned(),
                field: "topic",
                source: Box::new(RouteError::OutputWithoutHandler),
            })
        );
        assert_eq!(
            RouteTable::compile(&[spec("", "#")]),
            Err(RouteError::EmptyName { index: 1 })
        );
        // The first error in configuration order wins.
        assert_eq!(
            RouteTable::compile(&[spec("a", "+x"), spec("", "#")]),
            Err(RouteError::InRoute {
                route: "a".to_owned(),
                field: "filter",
                source: Box::new(RouteError::MisplacedSingleLevel { level: 0 }),
            })
        );
    }

    #[test]
    fn compile_allows_output_with_handler_and_names_differing_in_case() {
        let table = RouteTable::compile(&[
            RouteSpec {
                handler: Some("enrich".to_owned()),
                topic: Some("{gateway}/{output}".to_owned()),
                ..spec("Alerts", "#")
            },
            spec("alerts", "#"),
        ])
        .unwrap();
        assert_eq!(table.routes().len(), 2);
    }

    #[test]
    fn fan_out_in_configuration_order() {
        let table = RouteTable::compile(&[
            spec("all", "#"),
            spec("temp", "sensors/+/temp"),
            spec("other", "lights/#"),
            spec("dev7", "sensors/dev7/#"),
            spec("exact", "sensors/dev7/temp"),
            spec("sys", "$SYS/#"),
        ])
        .unwrap();
        let names = |topic: &str| {
            table
                .matching(topic)
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("sensors/dev7/temp"), ["all", "temp", "dev7", "exact"]);
        assert_eq!(names("sensors/dev8/temp"), ["all", "temp"]);
        assert_eq!(names("sensors/dev7"), ["all", "dev7"]);
        assert_eq!(names("lights"), ["all", "other"]);
        assert_eq!(names("$SYS/uptime"), ["sys"]);
        assert!(names("").is_empty());
        assert!(names("sensors/+/temp").is_empty());
    }

    #[test]
    fn route_renders_with_its_device() {
        let table = RouteTable::compile(&[RouteSpec {
            topic: Some("site/{device}/alerts/{2}".to_owned()),
            ..spec("alerts", "sensors/+/+")
        }])
        .unwrap();
        let topic = "sensors/dev9/humidity";
        let route = table.matching(topic).next().unwrap();
        let device = route.device_of(topic).unwrap();
        let rendered = route.topic.render(&TemplateContext {
            topic,
            device,
            gateway: "gw",
            output: None,
        });
        assert_eq!(rendered.as_deref(), Ok("site/dev9/alerts/humidity"));
    }

    // ---- properties ----

    /// One topic level: no '/', '+', '#' or NUL; may be empty; may start with '$'.
    fn level() -> impl Strategy<Value = String> {
        "[a-z0-9$ _é-]{0,4}"
    }

    /// A valid publish topic as its levels.
    fn topic_levels() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(level(), 1..8).prop_filter("topic must not be empty", |l| {
            l.len() > 1 || !l[0].is_empty()
        })
    }

    proptest! {
        #[test]
        fn prop_wildcarded_filter_matches_its_topic(
            levels in topic_levels(),
            plus in prop::collection::vec(any::<bool>(), 8),
            truncate in prop::option::of(0usize..9),
        ) {
            let topic = levels.join("/");
            let dollar = topic.starts_with('$');
            let mut parts: Vec<String> = levels
                .iter()
                .enumerate()
                .map(|(i, l)| if plus[i] && !(dollar && i == 0) { "+".to_owned() } else { l.clone() })
                .collect();
            if let Some(k) = truncate {
                let k = k.min(parts.len());
                let k = if dollar { k.max(1) } else { k };
                parts.truncate(k);
                parts.push("#".to_owned());
            }
            let f = TopicFilter::parse(&parts.join("/")).unwrap();
            prop_assert!(f.matches(&topic), "{} should match {:?}", f, topic);
        }

        #[test]
        fn prop_wildcard_first_level_never_matches_dollar_topic(
            rest in prop::collection::vec(level(), 0..5),
            first in "\\$[a-zA-Z]{0,4}",
            hash in any::<bool>(),
        ) {
            let mut topic_levels = vec![first];
            topic_levels.extend(rest.iter().cloned());
            let topic = topic_levels.join("/");
            let mut parts = vec![if hash { "#".to_owned() } else { "+".to_owned() }];
            if !hash {
                parts.extend(rest.iter().cloned());
            }
            let f = TopicFilter::parse(&parts.join("/")).unwrap();
            prop_assert!(!f.matches(&topic));
        }

        #[test]
        fn prop_exact_filter_matches_iff_equal(f in "[ab$/]{1,6}", t in "[ab$/]{1,6}") {
            let filter = TopicFilter::parse(&f).unwrap();
            prop_assert!(!filter.has_wildcards());
            prop_assert_eq!(filter.matches(&t), f == t);
            prop_assert!(filter.matches(&f));
        }

        #[test]
        fn prop_exact_filter_vs_arbitrary_topic(levels in topic_levels(), t in "\\PC{0,12}") {
            let f = levels.join("/");
            let filter = TopicFilter::parse(&f).unwrap();
            prop_assert_eq!(filter.matches(&t), f == t);
            prop_assert!(filter.matches(&f));
        }

        #[test]
        fn prop_literal_template_renders_to_itself(
            text in "[^{}+#\u{0}]{1,40}",
            topic in "\\PC{0,12}",
            device in "\\PC{0,6}",
            output in prop::option::of("\\PC{0,6}"),
        ) {
            let t = TopicTemplate::parse(&text).unwrap();
            prop_assert!(!t.uses_output());
            let rendered = t.render(&TemplateContext {
                topic: &topic,
                device: &device,
                gateway: "gw",
                output: output.as_deref(),
            });
            prop_assert_eq!(rendered, Ok(text.clone()));
            prop_assert_eq!(t.to_string(), text);
        }

        #[test]
        fn prop_matching_never_panics(f in "\\PC{0,16}", t in "\\PC{0,16}", g in "[a+#/$\u{0}]{0,8}", u in "[a+#/$\u{0}]{0,8}") {
            for (filter, topic) in [(&f, &t), (&g, &u), (&g, &t), (&f, &u)] {
                if let Ok(parsed) = TopicFilter::parse(filter) {
                    let _ = parsed.matches(topic);
                    prop_assert_eq!(parsed.as_str(), filter.as_str());
                }
            }
            if let Ok(table) = RouteTable::compile(&[spec("p", &g)]) {
                let _ = table.matching(&u).count();
            }
        }

        #[test]
        fn prop_template_parse_and_render_never_panic(
            s in "[a{}0-9/+#]{0,12}|\\PC{0,16}",
            topic in "\\PC{0,12}",
            output in prop::option::of("\\PC{0,6}"),
        ) {
            if let Ok(t) = TopicTemplate::parse(&s) {
                prop_assert_eq!(t.to_string(), s.clone());
                prop_assert_eq!(TopicTemplate::parse(&t.to_string()), Ok(t.clone()));
                let result = t.render(&TemplateContext {
                    topic: &topic,
                    device: "d",
                    gateway: "g",
                    output: output.as_deref(),
                });
                if let Ok(rendered) = result {
                    prop_assert!(check_topic_name(&rendered).is_ok());
                }
            }
        }
    }

    // ---- routing with predicates ----

    fn geo_table() -> RouteTable {
        let when = |text: &str| Some(toml::from_str::<PredicateConfig>(text).expect("predicate"));
        let mut inside = spec("inside", "t/#");
        inside.when = when(r#"in = "x""#);
        let mut outside = spec("outside", "t/#");
        outside.when = when(r#"not_in = "x""#);
        let mut hot = spec("hot", "t/#");
        hot.when = when(
            r#"field = "/temp"
gt = 30"#,
        );
        let always = spec("always", "t/#");
        let other = spec("other", "u/#");
        RouteTable::compile(&[inside, outside, hot, always, other]).expect("compiles")
    }

    #[test]
    fn a_bad_predicate_names_the_route_and_key() {
        let mut s = spec("r", "t/#");
        s.when =
            Some(toml::from_str(r#"all = [{ field = "/t", gt = "x", lt = 3 }]"#).expect("toml"));
        let err = RouteTable::compile(&[s]).unwrap_err().to_string();
        assert!(err.starts_with("route \"r\": when: all[0]"), "{err}");
    }

    proptest! {
        /// With a location, exactly one of `in` / `not_in` holds; without one, neither; the
        /// content route follows the payload; every route needs its topic to match.
        #[test]
        fn routes_for_is_a_pure_function_of_topic_and_facts(
            located in any::<bool>(),
            in_x in any::<bool>(),
            temp in proptest::option::of(-50i64..100),
            topic in prop_oneof![Just("t/d/env"), Just("u/d/env"), Just("v/d")],
        ) {
            let table = geo_table();
            let payload = temp.map(|t| serde_json::json!({ "temp": t }));
            let fences: Vec<String> = if located && in_x { vec!["x".into()] } else { vec![] };
            let no_distance = |_: f64, _: f64, _: f64, _: f64| f64::NAN;
            let facts = Facts {
                payload: payload.as_ref(),
                location: located.then_some(crate::event::Location { lat: 1.0, lon: 2.0 }),
                fences: &fences,
                regions: &[] as &[String],
                distance: &no_distance,
            };
            let taken: Vec<&str> = table.routes_for(topic, &facts).map(|r| r.name.as_str()).collect();
            let mut expected = Vec::new();
            if topic.starts_with("t/") {
                if located && in_x { expected.push("inside"); }
                if located && !in_x { expected.push("outside"); }
                if temp.is_some_and(|t| t > 30) { expected.push("hot"); }
                expected.push("always");
            } else if topic.starts_with("u/") {
                expected.push("other");
            }
            prop_assert_eq!(taken, expected);
        }
    }
}
