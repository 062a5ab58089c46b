//! The broker's subscriptions: a topic trie from filters to the sessions that hold them, with
//! the matching rules of MQTT 3.1.1 §4.7 and MQTT 5 §4.7, §4.8.2 (shared subscriptions) and
//! §3.3.4 (overlapping subscriptions), bounded per session and in total.
//!
//! Guarantees:
//! - [`Subscriptions::matches`] gives each session at most one delivery per publish for its
//!   own (non-shared) subscriptions, at the highest QoS of the ones that match, with the
//!   subscription identifiers of all of them; and one delivery per matching shared
//!   subscription, to one of its members, taking turns. So the deliveries of one publish are
//!   at most the sessions plus the shared subscriptions, however many filters overlap.
//! - Wildcards in the first level never match a topic starting with `$` (§4.7.2); a No Local
//!   subscription never matches its own session's publishes.
//! - The limits are never exceeded: a subscribe beyond them is refused with the limit it hit
//!   and changes nothing. Replacing a subscription (same session and filter, §3.8.4) is not
//!   a new one.
//! - Removing subscriptions frees their trie nodes: with none left, the trie is empty.
//!
//! Pure: no I/O, no clock; the broker's session layer owns it and decides what to do with a
//! delivery (QoS downgrade against the publish, queueing, retained messages).
//!
//! In the data path: [`super::broker`] owns it.
// The size accessors are read by the tests only, until the broker exports them as gauges.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::{BTreeMap, HashMap, HashSet};

use super::checks;

/// A session, as the session layer numbers them.
pub type SessionId = u64;

/// What a subscription asked for (the options byte of SUBSCRIBE, MQTT 5 §3.8.3.1; on 3.1.1
/// only the QoS is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// The maximum QoS granted (0, 1 or 2).
    pub qos: u8,
    /// Do not deliver the session's own publishes.
    pub no_local: bool,
    /// Keep the publish's retain flag on delivery (otherwise it is cleared).
    pub retain_as_published: bool,
    /// When retained messages are sent at subscribe time (0: always, 1: only for a new
    /// subscription, 2: never); the session layer applies it.
    pub retain_handling: u8,
    /// The MQTT 5 subscription identifier the SUBSCRIBE carried.
    pub identifier: Option<u32>,
}

impl Options {
    /// The options of a subscription with this options byte and identifier. `None` for a
    /// byte the protocol forbids (QoS 3, Retain Handling 3, reserved bits set).
    pub fn from_byte(byte: u8, identifier: Option<u32>) -> Option<Options> {
        let qos = byte & 0b11;
        let retain_handling = (byte >> 4) & 0b11;
        if qos == 3 || retain_handling == 3 || byte & 0b1100_0000 != 0 {
            return None;
        }
        Some(Options {
            qos,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
            identifier,
        })
    }
}

/// How many subscriptions the broker keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most subscriptions of one session.
    pub per_session: usize,
    /// Most subscriptions of all sessions together.
    pub total: usize,
    /// Most bytes of topic filters (and share names) of all sessions together.
    pub total_bytes: usize,
}

/// Why a subscribe was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The filter breaks the topic filter rules (3.1.1 §4.7.1, MQTT 5 §4.8.2).
    #[error("invalid topic filter")]
    InvalidFilter,
    /// No Local on a shared subscription is a protocol error (MQTT 5 §3.8.3.1).
    #[error("No Local is not allowed on a shared subscription")]
    NoLocalOnShared,
    /// The session holds [`Limits::per_session`] subscriptions.
    #[error("the session holds {limit} subscriptions, its limit")]
    SessionLimit {
        /// The limit.
        limit: usize,
    },
    /// The broker holds [`Limits::total`] subscriptions or [`Limits::total_bytes`] bytes.
    #[error("the broker holds its limit of subscriptions ({limit})")]
    BrokerLimit {
        /// Which limit, in words.
        limit: &'static str,
    },
}

/// Whether a subscribe added a subscription or replaced one with the same filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscribed {
    /// A new subscription.
    New,
    /// The session had this filter: its options were replaced (these were the old ones).
    Replaced(Options),
}

/// One copy of a publish for one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Who gets it.
    pub session: SessionId,
    /// The highest QoS of the subscriptions it matched (to be lowered to the publish's).
    pub qos: u8,
    /// Whether one of them asked to keep the retain flag.
    pub retain_as_published: bool,
    /// The subscription identifiers of the subscriptions it matched, ascending.
    pub identifiers: Vec<u32>,
    /// The shared subscription (share name) this copy is for, if it is for one.
    pub share: Option<Box<str>>,
}

/// A subscription's identity within its session: its share name (if shared) and filter.
type Key = (Option<Box<str>>, Box<str>);

#[derive(Default, Debug)]
struct Node {
    /// By level text; `+` and `#` are levels like any other here.
    children: HashMap<Box<str>, Node>,
    /// Non-shared subscriptions whose filter ends at this node.
    direct: HashMap<SessionId, Options>,
    /// Shared subscriptions whose filter ends here, by share name.
    shared: BTreeMap<Box<str>, Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.direct.is_empty() && self.shared.is_empty()
    }

    fn count(&self) -> usize {
        1 + self.children.values().map(Node::count).sum::<usize>()
    }
}

#[derive(Default, Debug)]
struct Group {
    /// In the order they joined; deliveries take turns.
    members: Vec<(SessionId, Options)>,
    next: usize,
}

/// The broker's subscriptions (see the module documentation).
#[derive(Debug)]
pub struct Subscriptions {
    root: Node,
    by_session: HashMap<SessionId, HashSet<Key>>,
    total: usize,
    total_bytes: usize,
    limits: Limits,
}

/// Splits `$share/NAME/FILTER` into its share name and filter; a `$share/` filter that names no
/// share ([`checks::names_no_share`], which only 3.1.1 clients may send) is an ordinary one.
pub(super) fn split_share(filter: &str) -> (Option<&str>, &str) {
    match filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
    {
        Some((name, inner)) if !name.is_empty() => (Some(name), inner),
        _ => (None, filter),
    }
}

impl Subscriptions {
    /// No subscriptions, these limits.
    pub fn new(limits: Limits) -> Subscriptions {
        Subscriptions {
            root: Node::default(),
            by_session: HashMap::new(),
            total: 0,
            total_bytes: 0,
            limits,
        }
    }

    /// Subscriptions held, all sessions together.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether no session holds a subscription.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Subscriptions `session` holds.
    pub fn of_session(&self, session: SessionId) -> usize {
        self.by_session.get(&session).map_or(0, HashSet::len)
    }

    /// Nodes of the trie, the root included (1 when empty): what the subscriptions cost.
    pub fn nodes(&self) -> usize {
        self.root.count()
    }

    /// Adds `session`'s subscription to `filter` (`$share/NAME/...` for a shared one), or
    /// replaces the options of the one it has.
    pub fn subscribe(
        &mut self,
        session: SessionId,
        filter: &str,
        options: Options,
    ) -> Result<Subscribed, SubscribeError> {
        // The front holds MQTT 5 clients to the stricter rule.
        if !checks::valid_topic_filter_v311(filter) {
            return Err(SubscribeError::InvalidFilter);
        }
        let (share, inner) = split_share(filter);
        if share.is_some() && options.no_local {
            return Err(SubscribeError::NoLocalOnShared);
        }
        let key: Key = (share.map(Box::from), Box::from(inner));
        let held = self.by_session.get(&session);
        let is_new = !held.is_some_and(|keys| keys.contains(&key));
        if is_new {
            if held.map_or(0, HashSet::len) >= self.limits.per_session {
                return Err(SubscribeError::SessionLimit {
                    limit: self.limits.per_session,
                });
            }
            if self.total >= self.limits.total {
                return Err(SubscribeError::BrokerLimit {
                    limit: "subscriptions",
                });
            }
            if self.total_bytes + filter.len() > self.limits.total_bytes {
                return Err(SubscribeError::BrokerLimit {
                    limit: "bytes of topic filters",
                });
            }
        }
        let mut node = &mut self.root;
        for level in inner.split('/') {
            node = node.children.entry(Box::from(level)).or_default();
        }
        let replaced = match share {
            None => node.direct.insert(session, options),
            Some(name) => {
                let group = node.shared.entry(Box::from(name)).or_default();
                match group.members.iter_mut().find(|(s, _)| *s == session) {
                    Some((_, old)) => Some(std::mem::replace(old, options)),
                    None => {
                        group.members.push((session, options));
                        None
                    }
                }
            }
        };
        match replaced {
            Some(old) => Ok(Subscribed::Replaced(old)),
            None => {
                self.by_session.entry(session).or_default().insert(key);
                self.total += 1;
                self.total_bytes += filter.len();
                Ok(Subscribed::New)
            }
        }
    }

    /// Removes `session`'s subscription to `filter`; whether it had one.
    pub fn unsubscribe(&mut self, session: SessionId, filter: &str) -> bool {
        let (share, inner) = split_share(filter);
        let key: Key = (share.map(Box::from), Box::from(inner));
        let Some(keys) = self.by_session.get_mut(&session) else {
            return false;
        };
        if !keys.remove(&key) {
            return false;
        }
        if keys.is_empty() {
            self.by_session.remove(&session);
        }
        let levels: Vec<&str> = inner.split('/').collect();
        remove(&mut self.root, &levels, session, share);
        self.total -= 1;
        self.total_bytes -= filter.len();
        true
    }

    /// Removes every subscription of `session` (its session ended); how many it had.
    pub fn remove_session(&mut self, session: SessionId) -> usize {
        let Some(keys) = self.by_session.remove(&session) else {
            return 0;
        };
        for (share, inner) in &keys {
            let levels: Vec<&str> = inner.split('/').collect();
            remove(&mut self.root, &levels, session, share.as_deref());
            self.total -= 1;
            self.total_bytes -= inner.len() + share.as_ref().map_or(0, |s| s.len() + 8);
        }
        keys.len()
    }

    /// The deliveries of a publish to `topic` by `publisher` (`None`: not a client's, such
    /// as the gateway's own), as the module documentation describes. Shared subscriptions
    /// advance their turn.
    pub fn matches(&mut self, topic: &str, publisher: Option<SessionId>) -> Vec<Delivery> {
        if !checks::valid_topic_name(topic) {
            return Vec::new();
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut direct: BTreeMap<SessionId, Delivery> = BTreeMap::new();
        let mut shared = Vec::new();
        collect(
            &mut self.root,
            &levels,
            0,
            dollar,
            publisher,
            &mut direct,
            &mut shared,
        );
        let mut out: Vec<Delivery> = direct.into_values().collect();
        for d in &mut out {
            d.identifiers.sort_unstable();
            d.identifiers.dedup();
        }
        out.extend(shared);
        out
    }
}

/// Removes one subscription below `node`; whether `node` is now empty (and can go).
fn remove(node: &mut Node, levels: &[&str], session: SessionId, share: Option<&str>) -> bool {
    match levels.split_first() {
        Some((level, rest)) => {
            if let Some(child) = node.children.get_mut(*level) {
                if remove(child, rest, session, share) {
                    node.children.remove(*level);
                }
            }
        }
        None => match share {
            None => {
                node.direct.remove(&session);
            }
            Some(name) => {
                if let Some(group) = node.shared.get_mut(name) {
                    group.members.retain(|(s, _)| *s != session);
                    if group.members.is_empty() {
                        node.shared.remove(name);
                    }
                }
            }
        },
    }
    node.is_empty()
}

/// Collects the subscriptions at `node` (reached after `at` levels of the topic) and below.
fn collect(
    node: &mut Node,
    levels: &[&str],
    at: usize,
    dollar: bool,
    publisher: Option<SessionId>,
    direct: &mut BTreeMap<SessionId, Delivery>,
    shared: &mut Vec<Delivery>,
) {
    // §4.7.2: a filter starting with a wildcard does not match a `$` topic.
    let wildcards = !(at == 0 && dollar);
    if wildcards {
        if let Some(hash) = node.children.get_mut("#") {
            take(hash, publisher, direct, shared);
        }
    }
    let Some(level) = levels.get(at) else {
        take(node, publisher, direct, shared);
        return;
    };
    if let Some(child) = node.children.get_mut(*level) {
        collect(child, levels, at + 1, dollar, publisher, direct, shared);
    }
    if wildcards {
        if let Some(child) = node.children.get_mut("+") {
            collect(child, levels, at + 1, dollar, publisher, direct, shared);
        }
    }
}

/// The subscriptions that end at `node`, added to the deliveries.
fn take(
    node: &mut Node,
    publisher: Option<SessionId>,
    direct: &mut BTreeMap<SessionId, Delivery>,
    shared: &mut Vec<Delivery>,
) {
    for (&session, options) in &node.direct {
        if options.no_local && publisher == Some(session) {
            continue;
        }
        let delivery = direct.entry(session).or_insert_with(|| Delivery {
            session,
            qos: 0,
            retain_as_published: false,
            identifiers: Vec::new(),
            share: None,
        });
        delivery.qos = delivery.qos.max(options.qos);
        delivery.retain_as_published |= options.retain_as_published;
        delivery.identifiers.extend(options.identifier);
    }
    for (name, group) in &mut node.shared {
        if group.members.is_empty() {
            continue;
        }
        let (session, options) = group.members[group.next % group.members.len()];
        group.next = (group.next + 1) % group.members.len();
        shared.push(Delivery {
            session,
            qos: options.qos,
            retain_as_published: options.retain_as_published,
            identifiers: options.identifier.into_iter().collect(),
            share: Some(name.clone()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::TopicFilter;
    use proptest::prelude::*;

    const ROOMY: Limits = Limits {
        per_session: 1000,
        total: 100_000,
        total_bytes: 10 << 20,
    };

    fn qos(qos: u8) -> Options {
        Options {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            identifier: None,
        }
    }

    fn sessions_of(deliveries: &[Delivery]) -> Vec<(SessionId, u8)> {
        deliveries.iter().map(|d| (d.session, d.qos)).collect()
    }

    #[test]
    fn overlapping_filters_give_one_delivery_at_the_highest_qos_with_every_identifier() {
        let mut subs = Subscriptions::new(ROOMY);
        for (i, filter) in ["a/b", "a/+", "#", "a/#", "+/b"].iter().enumerate() {
            let options = Options {
                identifier: Some(i as u32 + 1),
                ..qos(if *filter == "a/+" { 2 } else { 0 })
            };
            assert_eq!(subs.subscribe(7, filter, options), Ok(Subscribed::New));
        }
        let deliveries = subs.matches("a/b", None);
        assert_eq!(deliveries.len(), 1, "{deliveries:?}");
        assert_eq!(deliveries[0].qos, 2);
        assert_eq!(deliveries[0].identifiers, vec![1, 2, 3, 4, 5]);
        assert_eq!(
            sessions_of(&subs.matches("a", None)),
            vec![(7, 0)],
            "# and a/#"
        );
        assert!(subs.matches("b", None).len() == 1, "only #");
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics_at_the_first_level() {
        let mut subs = Subscriptions::new(ROOMY);
        subs.subscribe(1, "#", qos(0)).unwrap();
        subs.subscribe(2, "+/uptime", qos(0)).unwrap();
        subs.subscribe(3, "$SYS/#", qos(0)).unwrap();
        subs.subscribe(4, "$SYS/+", qos(0)).unwrap();
        assert_eq!(
            sessions_of(&subs.matches("$SYS/uptime", None)),
            vec![(3, 0), (4, 0)]
        );
        assert_eq!(
            sessions_of(&subs.matches("x/uptime", None)),
            vec![(1, 0), (2, 0)]
        );
    }

    #[test]
    fn no_local_skips_only_the_publishers_own_subscription() {
        let mut subs = Subscriptions::new(ROOMY);
        let no_local = Options {
            no_local: true,
            ..qos(1)
        };
        subs.subscribe(1, "t", no_local).unwrap();
        subs.subscribe(2, "t", no_local).unwrap();
        subs.subscribe(1, "+", qos(0)).unwrap();
        // Session 1's "+" still matches its own publish; its No Local "t" does not.
        assert_eq!(
            sessions_of(&subs.matches("t", Some(1))),
            vec![(1, 0), (2, 1)]
        );
        assert_eq!(sessions_of(&subs.matches("t", None)), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn shared_subscriptions_take_turns_and_refuse_no_local() {
        let mut subs = Subscriptions::new(ROOMY);
        for session in [1, 2, 3] {
            subs.subscribe(session, "$share/g/s/+", qos(1)).unwrap();
        }
        subs.subscribe(4, "$share/h/s/x", qos(0)).unwrap();
        subs.subscribe(1, "s/x", qos(0)).unwrap();
        let mut picked = Vec::new();
        for _ in 0..6 {
            let deliveries = subs.matches("s/x", None);
            // Session 1's own subscription, one member of g, the only member of h.
            assert_eq!(deliveries.len(), 3, "{deliveries:?}");
            let g: Vec<_> = deliveries
                .iter()
                .filter(|d| d.share.as_deref() == Some("g"))
                .collect();
            assert_eq!(g.len(), 1);
            picked.push(g[0].session);
        }
        assert_eq!(picked, vec![1, 2, 3, 1, 2, 3]);
        let no_local = Options {
            no_local: true,
            ..qos(0)
        };
        assert_eq!(
            subs.subscribe(5, "$share/g/s/+", no_local),
            Err(SubscribeError::NoLocalOnShared)
        );
        assert!(subs.unsubscribe(2, "$share/g/s/+"));
        let members: HashSet<_> = (0..4)
            .flat_map(|_| subs.matches("s/y", None))
            .map(|d| d.session)
            .collect();
        assert_eq!(members, HashSet::from([1, 3]));
    }

    #[test]
    fn limits_refuse_and_change_nothing_and_a_replacement_is_not_new() {
        let mut subs = Subscriptions::new(Limits {
            per_session: 2,
            total: 3,
            total_bytes: 1000,
        });
        assert_eq!(subs.subscribe(1, "a", qos(0)), Ok(Subscribed::New));
        assert_eq!(subs.subscribe(1, "b", qos(0)), Ok(Subscribed::New));
        assert_eq!(
            subs.subscribe(1, "c", qos(0)),
            Err(SubscribeError::SessionLimit { limit: 2 })
        );
        assert_eq!(
            subs.subscribe(1, "a", qos(2)),
            Ok(Subscribed::Replaced(qos(0)))
        );
        assert_eq!(sessions_of(&subs.matches("a", None)), vec![(1, 2)]);
        assert_eq!(subs.subscribe(2, "a", qos(0)), Ok(Subscribed::New));
        assert!(matches!(
            subs.subscribe(3, "a", qos(0)),
            Err(SubscribeError::BrokerLimit { .. })
        ));
        assert!(subs.matches("c", None).is_empty());
        assert_eq!(subs.len(), 3);
        let mut bytes = Subscriptions::new(Limits {
            total_bytes: 10,
            ..ROOMY
        });
        bytes.subscribe(1, "0123456789", qos(0)).unwrap();
        assert!(matches!(
            bytes.subscribe(2, "x", qos(0)),
            Err(SubscribeError::BrokerLimit { .. })
        ));
    }

    #[test]
    fn invalid_filters_and_option_bytes_are_refused() {
        let mut subs = Subscriptions::new(ROOMY);
        for filter in ["", "a/#/b", "a+", "$share/g+/a", "$share/g/a/#/b"] {
            assert_eq!(
                subs.subscribe(1, filter, qos(0)),
                Err(SubscribeError::InvalidFilter),
                "{filter:?}"
            );
        }
        assert!(subs.is_empty());
        // `$share/` filters that name no share are ordinary ones (the front lets only 3.1.1
        // clients send them): they match only the topic they spell.
        for filter in ["$share/g", "$share//a"] {
            assert_eq!(subs.subscribe(1, filter, qos(0)), Ok(Subscribed::New));
            let deliveries = subs.matches(filter, None);
            assert_eq!(deliveries.len(), 1, "{filter}");
            assert_eq!(deliveries[0].share, None, "{filter}");
        }
        assert!(subs.unsubscribe(1, "$share//a"));
        assert!(subs.unsubscribe(1, "$share/g"));
        assert!(subs.is_empty());
        assert_eq!(Options::from_byte(3, None), None);
        assert_eq!(Options::from_byte(0b0011_0000, None), None);
        assert_eq!(Options::from_byte(0b0100_0000, None), None);
        let all = Options::from_byte(0b0010_1110, Some(9)).unwrap();
        assert_eq!(
            all,
            Options {
                qos: 2,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
                identifier: Some(9),
            }
        );
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            Just("a"),
            Just("b"),
            Just(""),
            Just("$s"),
            Just("+"),
            Just("#")
        ];
        (prop::collection::vec(level, 1..4), prop::option::of(0u8..2)).prop_map(
            |(levels, share)| {
                let filter = levels.join("/");
                match share {
                    Some(g) => format!("$share/g{g}/{filter}"),
                    None => filter,
                }
            },
        )
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("a"), Just("b"), Just(""), Just("$s")];
        prop::collection::vec(level, 1..5).prop_map(|levels| levels.join("/"))
    }

    type Sub = (SessionId, String, u8, bool, Option<u32>);

    fn sub_strategy() -> impl Strategy<Value = Sub> {
        (
            0u64..4,
            filter_strategy(),
            0u8..3,
            any::<bool>(),
            prop::option::of(1u32..5),
        )
    }

    proptest! {
        /// Matching agrees with the filter-by-filter definition (`router::TopicFilter`,
        /// tested on its own): per session, one delivery for its own subscriptions at their
        /// highest QoS with all their identifiers; one delivery per matching shared group, to
        /// a member of it.
        #[test]
        fn matching_agrees_with_filter_by_filter_matching(
            subs in prop::collection::vec(sub_strategy(), 0..24),
            topic in topic_strategy(),
            publisher in prop::option::of(0u64..4),
        ) {
            let mut trie = Subscriptions::new(ROOMY);
            // The last subscribe of a (session, filter) wins, as in the trie.
            let mut held: BTreeMap<(SessionId, String), Options> = BTreeMap::new();
            for (session, filter, q, no_local, identifier) in &subs {
                let options = Options { no_local: *no_local, identifier: *identifier, ..qos(*q) };
                match trie.subscribe(*session, filter, options) {
                    Ok(_) => { held.insert((*session, filter.clone()), options); }
                    Err(e) => {
                        let shared = filter.starts_with("$share/");
                        prop_assert!(
                            (e == SubscribeError::NoLocalOnShared && shared && *no_local)
                                || (e == SubscribeError::InvalidFilter
                                    && TopicFilter::parse(split_share(filter).1).is_err()),
                            "{filter:?} refused: {e}"
                        );
                    }
                }
            }
            prop_assert_eq!(trie.len(), held.len());
            let mut expected: BTreeMap<SessionId, (u8, Vec<u32>)> = BTreeMap::new();
            let mut groups: BTreeMap<(String, String), HashSet<SessionId>> = BTreeMap::new();
            for ((session, filter), options) in &held {
                let (share, inner) = split_share(filter);
                if !TopicFilter::parse(inner).unwrap().matches(&topic) {
                    continue;
                }
                match share {
                    Some(name) => {
                        groups.entry((name.to_string(), inner.to_string()))
                            .or_default().insert(*session);
                    }
                    None if options.no_local && publisher == Some(*session) => {}
                    None => {
                        let e = expected.entry(*session).or_insert((0, Vec::new()));
                        e.0 = e.0.max(options.qos);
                        e.1.extend(options.identifier);
                    }
                }
            }
            for e in expected.values_mut() {
                e.1.sort_unstable();
                e.1.dedup();
            }
            let deliveries = trie.matches(&topic, publisher);
            let direct: BTreeMap<SessionId, (u8, Vec<u32>)> = deliveries.iter()
                .filter(|d| d.share.is_none())
                .map(|d| (d.session, (d.qos, d.identifiers.clone())))
                .collect();
            prop_assert_eq!(
                deliveries.iter().filter(|d| d.share.is_none()).count(),
                direct.len(),
                "one direct delivery per session"
            );
            prop_assert_eq!(direct, expected);
            let shared: Vec<_> = deliveries.iter().filter(|d| d.share.is_some()).collect();
            prop_assert_eq!(shared.len(), groups.len(), "one delivery per shared subscription");
            for d in shared {
                let name = d.share.as_deref().unwrap();
                let member = groups.iter().any(|((g, _), members)| {
                    g == name && members.contains(&d.session)
                });
                prop_assert!(member, "{d:?} is not a member of its group");
            }
        }

        /// However subscriptions come and go, the limits hold, and once every session is
        /// removed the trie is empty again (its memory is given back).
        #[test]
        fn limits_hold_and_removal_frees_everything(
            ops in prop::collection::vec((sub_strategy(), any::<bool>()), 0..60),
        ) {
            let limits = Limits { per_session: 3, total: 8, total_bytes: 60 };
            let mut trie = Subscriptions::new(limits);
            for ((session, filter, q, _, _), unsubscribe) in &ops {
                if *unsubscribe {
                    trie.unsubscribe(*session, filter);
                } else {
                    let _ = trie.subscribe(*session, filter, qos(*q));
                }
                prop_assert!(trie.len() <= limits.total);
                prop_assert!(trie.total_bytes <= limits.total_bytes);
                for session in 0..4 {
                    prop_assert!(trie.of_session(session) <= limits.per_session);
                }
            }
            let sum: usize = (0..4).map(|s| trie.of_session(s)).sum();
            prop_assert_eq!(sum, trie.len());
            for session in 0..4 {
                trie.remove_session(session);
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.total_bytes, 0);
            prop_assert_eq!(trie.nodes(), 1);
        }
    }
}
