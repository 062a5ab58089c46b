//! Access control lists in Mosquitto 2.0's `acl_file` format, parsed and checked, so that
//! operators can bring the files they already have.
//!
//! The file (as Mosquitto 2.0's `aclfile__parse` reads it):
//! - `topic [read|write|readwrite|deny] FILTER`: a rule; without an access word, `readwrite`.
//!   After an access word the filter is the rest of the line, so it may contain spaces;
//!   without one it is a single word (two words whose first is not an access word are an
//!   error, as in Mosquitto: `topic dney secret/#` must not silently lose its deny).
//! - `pattern [read|write|readwrite|deny] FILTER`: the same for every client, with `%c`
//!   replaced by its client id and `%u` by its username when checked.
//! - `user NAME`: the `topic` lines after it, up to the next `user` line, are that user's.
//! - Empty lines, and lines whose first character is `#`, are skipped; anything else is an
//!   error with its line number ([`AclError`]): the broker must not start on a file it does
//!   not understand.
//!
//! Guarantees of [`Acl::allows`] (Mosquitto 2.0's `mosquitto_acl_check_default`):
//! - Deny by default: a topic no rule grants is refused; an empty file refuses everything.
//! - The `topic` lines before the first `user` line apply to clients without a username only;
//!   a client with a username gets the lines of the sections with exactly its name, never the
//!   general ones. `pattern` lines apply to every client, wherever they are written.
//! - The client's `topic` rules decide first (any matching `deny` refuses; otherwise a
//!   matching rule with the access asked for grants), then the patterns the same way: so a
//!   user's grant wins over a pattern's deny, and a user's deny over a pattern's grant.
//! - A client whose username or client id contains `+` or `#` gets no pattern at all (its
//!   identity would turn a pattern into a wildcard); patterns with `%u` do not apply to
//!   clients without a username.
//! - A wildcard in a rule's first level never matches a topic starting with `$` (MQTT §4.7.2).
//!
//! Outpost's two additions to Mosquitto:
//! - The gateway's own topics, `outpost` and everything under `outpost/`, and `$SYS/...`, are
//!   matched only by rules whose first level is literally `outpost` (or `$SYS`): `topic
//!   readwrite #` neither grants nor denies them, and neither does a pattern that only becomes
//!   `outpost/...` by substitution (`%c/#` for the client id `outpost`).
//! - [`Acl::allows_subscribe`] checks SUBSCRIBE, which Mosquitto's `acl_file` does not: a
//!   filter is granted when a rule granting read could deliver some topic through it and no
//!   deny rule refuses all of it (each delivery is still checked with [`Acl::allows`]).
//!
//! Pure: no I/O, no clock; every function decides from its arguments and never panics.

use std::borrow::Cow;
use std::collections::HashMap;

use super::checks::{filter_matches, valid_topic_filter};

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages published to it.
    Read,
    /// Publish to it.
    Write,
}

/// A line of an ACL file that cannot be used, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct AclError {
    /// The line, counting from 1.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

/// A parsed ACL file: which client may read or write which topic. The default (like an
/// empty file) refuses everything.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// The `topic` rules before any `user` line: for clients without a username.
    anonymous: Vec<Rule>,
    /// The `topic` rules of each `user` section (sections with the same name merged).
    users: HashMap<String, Vec<Rule>>,
    /// The `pattern` rules, for every client, as written (with `%c` and `%u`).
    patterns: Vec<Rule>,
    /// How many `topic` and `pattern` lines were read.
    rules: usize,
}

/// What a rule does with the topics its filter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    Deny,
    Read,
    Write,
    ReadWrite,
}

impl Permission {
    /// The access word of an ACL line.
    fn from_word(word: &str) -> Option<Permission> {
        match word {
            "deny" => Some(Permission::Deny),
            "read" => Some(Permission::Read),
            "write" => Some(Permission::Write),
            "readwrite" => Some(Permission::ReadWrite),
            _ => None,
        }
    }

    fn grants(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Permission::Read | Permission::ReadWrite, Access::Read)
                | (Permission::Write | Permission::ReadWrite, Access::Write)
        )
    }
}

/// One `topic` or `pattern` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    permission: Permission,
    /// The filter as written in the file (a pattern's with `%c`/`%u`).
    filter: String,
}

/// A rule as it applies to one client: a `topic` rule as it is, a pattern after
/// substitution.
#[derive(Debug, Clone)]
struct Applied<'a> {
    permission: Permission,
    /// The filter as written: its first level decides whether the rule may speak for the
    /// gateway's own topics.
    written: &'a str,
    /// The filter matched against topics.
    filter: Cow<'a, str>,
}

impl Rule {
    fn as_written(&self) -> Applied<'_> {
        Applied {
            permission: self.permission,
            written: &self.filter,
            filter: Cow::Borrowed(&self.filter),
        }
    }

    /// This pattern for a client, or `None` when it does not apply to the client (`%u`
    /// without a username).
    fn substituted<'a>(&'a self, username: Option<&str>, client_id: &str) -> Option<Applied<'a>> {
        Some(Applied {
            permission: self.permission,
            written: &self.filter,
            filter: substitute(&self.filter, username, client_id)?,
        })
    }
}

impl Applied<'_> {
    /// Whether the rule matches the topic name `topic`, with outpost's rule for the
    /// gateway's own topics.
    fn matches_topic(&self, topic: &str) -> bool {
        let level = first_level(topic);
        if is_gateway_level(level) && first_level(self.written) != level {
            return false;
        }
        filter_matches(&self.filter, topic)
    }

    /// Whether the rule may speak for any topic the subscription filter `filter` matches:
    /// for a filter naming the gateway's own topics, only a rule whose first level, as
    /// written, names them too.
    fn may_speak_for(&self, filter: &str) -> bool {
        let level = first_level(filter);
        if is_gateway_level(level) {
            return first_level(self.written) == level;
        }
        // A pattern that names the gateway's topics only after substitution (`%c/#` for the
        // client id `outpost`) matches no topic at all (see `matches_topic`).
        let effective = first_level(&self.filter);
        !(is_gateway_level(effective) && first_level(self.written) != effective)
    }

    /// Whether some topic could reach the client through the subscription `filter` under
    /// this rule.
    fn meets_subscription(&self, filter: &str) -> bool {
        self.may_speak_for(filter) && filters_intersect(&self.filter, filter)
    }

    /// Whether every topic the subscription `filter` matches is matched by this rule.
    fn covers_subscription(&self, filter: &str) -> bool {
        self.may_speak_for(filter) && filter_covers(&self.filter, filter)
    }
}

impl Acl {
    /// Parses the text of an ACL file in Mosquitto's format (see the module documentation).
    ///
    /// The first line that cannot be used is the error, with its line number: an unknown
    /// keyword (an indented `#` too: a comment starts in the first column), `user` without a
    /// name, `topic`/`pattern` without a filter or with an unknown access word before it, or a
    /// filter that is not a valid MQTT topic filter (or is a `$share/` subscription). Lines
    /// may end in `\n` or `\r\n`; spaces and tabs separate words.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut section: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line_number = index + 1;
            let fail = |message: String| AclError {
                line: line_number,
                message,
            };
            // Mosquitto trims what C's isspace() calls space at the end of the line.
            let line = raw.trim_end_matches([' ', '\t', '\r', '\n', '\x0B', '\x0C']);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = split_word(line);
            match keyword {
                "topic" | "pattern" => {
                    let rule = parse_rule(keyword, rest).map_err(fail)?;
                    acl.rules += 1;
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(user) = &section {
                        acl.users.entry(user.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                "user" => {
                    let name = rest.trim_matches(is_blank);
                    if name.is_empty() {
                        return Err(fail("\"user\" needs a username".to_string()));
                    }
                    section = Some(name.to_string());
                }
                _ if keyword.starts_with('#') => {
                    return Err(fail(
                        "not a valid line: a comment must start with \"#\" in the first column"
                            .to_string(),
                    ));
                }
                _ => {
                    return Err(fail(format!(
                        "not a valid line: unknown keyword {keyword:?} \
                         (expected topic, pattern or user)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Number of rules (`topic` and `pattern` lines) read.
    pub fn rules(&self) -> usize {
        self.rules
    }

    /// Whether the client (its username, if any, and its client id) may read (receive) or
    /// write (publish) the topic name `topic`, by the rules in the module documentation:
    /// the client's own `topic` rules first, deny rules before the others; then, unless its
    /// identity contains `+` or `#`, the patterns the same way; refused when nothing matched.
    /// A topic that is not a valid topic name is refused.
    pub fn allows(
        &self,
        username: Option<&str>,
        client_id: &str,
        topic: &str,
        access: Access,
    ) -> bool {
        let matches = |rule: &Applied<'_>| rule.matches_topic(topic);
        let own = self.topic_rules_for(username).iter().map(Rule::as_written);
        if let Some(verdict) = verdict(own, matches, access) {
            return verdict;
        }
        if dangerous_identity(username, client_id) {
            return false;
        }
        verdict(self.patterns_for(username, client_id), matches, access).unwrap_or(false)
    }

    /// Whether a SUBSCRIBE to the topic filter `filter` (valid, without a `$share/GROUP/`
    /// prefix; anything else is refused) is granted: layered like [`Acl::allows`], the
    /// client's own `topic` rules first, then (unless its identity contains `+` or `#`) the
    /// patterns; at each layer a deny rule matching every topic the filter matches refuses,
    /// and a rule granting read that matches some topic the filter matches grants. A filter
    /// whose first level is `outpost` or `$SYS` is granted or refused only by rules whose
    /// first level is literally the same.
    ///
    /// Granted means the subscription could deliver something, not everything: each message
    /// is still checked with [`Acl::allows`] for [`Access::Read`].
    pub fn allows_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        if !valid_rule_filter(filter) {
            return false;
        }
        let own = self.topic_rules_for(username).iter().map(Rule::as_written);
        if let Some(verdict) = subscription_verdict(own, filter) {
            return verdict;
        }
        if dangerous_identity(username, client_id) {
            return false;
        }
        subscription_verdict(self.patterns_for(username, client_id), filter).unwrap_or(false)
    }

    /// The `topic` rules of a client: the general ones without a username, its sections'
    /// with one (none if it has no section).
    fn topic_rules_for(&self, username: Option<&str>) -> &[Rule] {
        match username {
            None => &self.anonymous,
            Some(name) => self.users.get(name).map_or(&[], Vec::as_slice),
        }
    }

    /// The patterns that apply to a client, substituted.
    fn patterns_for<'a>(
        &'a self,
        username: Option<&'a str>,
        client_id: &'a str,
    ) -> impl Iterator<Item = Applied<'a>> + Clone {
        self.patterns
            .iter()
            .filter_map(move |pattern| pattern.substituted(username, client_id))
    }
}

/// One layer of rules on a topic: `Some(false)` if a deny rule matches, else `Some(true)` if
/// a rule granting the access matches, else `None` (the layer does not decide).
fn verdict<'a>(
    rules: impl Iterator<Item = Applied<'a>> + Clone,
    matches: impl Fn(&Applied<'a>) -> bool,
    access: Access,
) -> Option<bool> {
    if rules
        .clone()
        .any(|rule| rule.permission == Permission::Deny && matches(&rule))
    {
        return Some(false);
    }
    let mut rules = rules;
    rules
        .any(|rule| rule.permission.grants(access) && matches(&rule))
        .then_some(true)
}

/// One layer of rules on a subscription filter: `Some(false)` if a deny rule covers it, else
/// `Some(true)` if a rule granting read meets it, else `None`.
fn subscription_verdict<'a>(
    rules: impl Iterator<Item = Applied<'a>> + Clone,
    filter: &str,
) -> Option<bool> {
    if rules
        .clone()
        .any(|rule| rule.permission == Permission::Deny && rule.covers_subscription(filter))
    {
        return Some(false);
    }
    let mut rules = rules;
    rules
        .any(|rule| rule.permission.grants(Access::Read) && rule.meets_subscription(filter))
        .then_some(true)
}

/// A `topic` or `pattern` line after its keyword: `[ACCESS] FILTER`.
fn parse_rule(keyword: &str, rest: &str) -> Result<Rule, String> {
    let (first, after) = split_word(rest);
    let after = after.trim_start_matches(is_blank);
    if first.is_empty() {
        return Err(format!("\"{keyword}\" needs a topic filter"));
    }
    let (permission, filter) = if after.is_empty() {
        // One word: the filter, read and written (Mosquitto reads `topic read` as the
        // topic "read"; a lone access word is taken as a missing filter here).
        if Permission::from_word(first).is_some() {
            return Err(format!("\"{keyword} {first}\" needs a topic filter"));
        }
        (Permission::ReadWrite, first)
    } else {
        // Two words or more: the first must be the access (Mosquitto refuses the file
        // otherwise; taking `topic dney x` as a grant on "dney x" would drop a deny).
        let permission = Permission::from_word(first).ok_or_else(|| {
            format!(
                "not a valid access {first:?}: expected read, write, readwrite or deny \
                 (a filter with spaces needs the access word before it)"
            )
        })?;
        (permission, after)
    };
    if !valid_rule_filter(filter) {
        return Err(format!("not a valid topic filter: {filter:?}"));
    }
    Ok(Rule {
        permission,
        filter: filter.to_string(),
    })
}

/// Whether `filter` may be a rule's filter (or a checked subscription's): a valid MQTT topic
/// filter that is not a shared subscription.
fn valid_rule_filter(filter: &str) -> bool {
    valid_topic_filter(filter) && !filter.starts_with("$share/")
}

/// The first word of `text` (after leading blanks), and the rest after the blank that ends
/// it.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start_matches(is_blank);
    text.split_once(is_blank).unwrap_or((text, ""))
}

/// Spaces and tabs separate the words of a line.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A pattern's filter for a client: `%c` replaced by its client id, `%u` by its username,
/// left to right in one pass (a `%u` inside the client id stays as it is), or `None` if the
/// pattern has `%u` and the client no username (Mosquitto skips such a pattern).
fn substitute<'a>(
    pattern: &'a str,
    username: Option<&str>,
    client_id: &str,
) -> Option<Cow<'a, str>> {
    if !pattern.contains('%') {
        return Some(Cow::Borrowed(pattern));
    }
    if username.is_none() && pattern.contains("%u") {
        return None;
    }
    let mut filter = String::with_capacity(pattern.len() + client_id.len());
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '%' {
            let replacement = match chars.peek() {
                Some('c') => Some(client_id),
                Some('u') => username,
                _ => None,
            };
            if let Some(replacement) = replacement {
                chars.next();
                filter.push_str(replacement);
                continue;
            }
        }
        filter.push(c);
    }
    Some(Cow::Owned(filter))
}

/// Whether the client's identity would turn a pattern into a wildcard: Mosquitto then
/// refuses it everything the patterns would decide.
fn dangerous_identity(username: Option<&str>, client_id: &str) -> bool {
    username.is_some_and(|name| name.contains(['+', '#'])) || client_id.contains(['+', '#'])
}

/// The first level of a topic or filter.
fn first_level(text: &str) -> &str {
    text.split_once('/').map_or(text, |(first, _)| first)
}

/// Whether a first level names the gateway's own topics (outpost's control plane, the
/// broker's `$SYS`), which only rules naming them can reach.
fn is_gateway_level(level: &str) -> bool {
    level == "outpost" || level == "$SYS"
}

/// Whether the filter's first level is a wildcard (which never matches a `$` topic).
fn starts_with_wildcard(filter: &str) -> bool {
    matches!(first_level(filter), "+" | "#")
}

/// Whether no topic matched by `dollar` can be matched by `wildcard`: `dollar` only matches
/// topics starting with `$` (its first level starts with `$`, so it is literal) and
/// `wildcard` starts with a wildcard, which never matches those (§4.7.2).
fn wildcard_meets_dollar(wildcard: &str, dollar: &str) -> bool {
    starts_with_wildcard(wildcard) && dollar.starts_with('$')
}

/// Whether some topic name matches both filters (valid, without `$share/`), level by level:
/// `+` meets any level, `#` any rest (also none: `a/#` and `a` meet in `a`), and a wildcard
/// first level never meets a `$` topic.
pub(super) fn filters_intersect(a: &str, b: &str) -> bool {
    // The walk below meets filters in sequences of levels, one of which is not a topic name:
    // the empty name (a single empty level). `+` and `/#` meet only there.
    if matches!((a, b), ("+", "/#") | ("/#", "+")) {
        return false;
    }
    if wildcard_meets_dollar(a, b) || wildcard_meets_dollar(b, a) {
        return false;
    }
    let mut a_levels = a.split('/');
    let mut b_levels = b.split('/');
    loop {
        match (a_levels.next(), b_levels.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(a_level), Some(b_level)) if a_level == b_level => {}
            _ => return false,
        }
    }
}

/// Whether every topic name matched by `specific` is matched by `general` (both valid,
/// without `$share/`), level by level: `#` in `general` covers any rest; `#` in `specific`
/// (any rest, also none after the first level) is covered only by `#` (or, as the whole
/// filter, by `+/#`); `+` in `specific` only by `+`; and a wildcard first level in `general`
/// covers nothing of a `specific` starting with `$`.
fn filter_covers(general: &str, specific: &str) -> bool {
    // The walk below compares sequences of levels, one of which is not a topic name: the
    // empty name (a single empty level). `/#` matches it, `/+/#` and `+/+/#` do not, and
    // those two cover every real topic of `/#` (two levels or more, the first empty).
    if specific == "/#" && matches!(general, "/+/#" | "+/+/#") {
        return true;
    }
    if wildcard_meets_dollar(general, specific) {
        return false;
    }
    let mut general_levels = general.split('/');
    let mut specific_levels = specific.split('/');
    let mut first = true;
    loop {
        match (general_levels.next(), specific_levels.next()) {
            (Some("#"), _) | (None, None) => return true,
            // A whole-filter `#` matches one level or more (a topic has at least one), as
            // `+/#` does; after the first level it also matches none, which `+` does not.
            (Some("+"), Some("#")) if first => return general_levels.next() == Some("#"),
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(general_level), Some(specific_level)) if general_level == specific_level => {}
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parsed(text: &str) -> Acl {
        match Acl::parse(text) {
            Ok(acl) => acl,
            Err(e) => panic!("{text:?}: {e}"),
        }
    }

    fn error(text: &str) -> AclError {
        match Acl::parse(text) {
            Ok(acl) => panic!("{text:?} parsed: {acl:?}"),
            Err(e) => e,
        }
    }

    const ANON: Option<&str> = None;

    fn reads(acl: &Acl, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        acl.allows(user, client_id, topic, Access::Read)
    }

    fn writes(acl: &Acl, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        acl.allows(user, client_id, topic, Access::Write)
    }

    // ---- Parsing ----

    #[test]
    fn parses_every_keyword() {
        let acl = parsed("topic read a\nuser bob\ntopic write b\npattern deny c/%c\n");
        assert_eq!(acl.rules(), 3);
        assert_eq!(
            acl.anonymous,
            vec![Rule {
                permission: Permission::Read,
                filter: "a".into()
            }]
        );
        assert_eq!(
            acl.users.get("bob"),
            Some(&vec![Rule {
                permission: Permission::Write,
                filter: "b".into()
            }])
        );
        assert_eq!(
            acl.patterns,
            vec![Rule {
                permission: Permission::Deny,
                filter: "c/%c".into()
            }]
        );
    }

    #[test]
    fn access_words_and_their_default() {
        let acl = parsed(
            "topic r/x\ntopic read r/read\ntopic write r/write\ntopic readwrite r/rw\n\
             topic deny r/deny\npattern p/%c\n",
        );
        let permissions: Vec<_> = acl.anonymous.iter().map(|r| r.permission).collect();
        assert_eq!(
            permissions,
            [
                Permission::ReadWrite,
                Permission::Read,
                Permission::Write,
                Permission::ReadWrite,
                Permission::Deny
            ]
        );
        assert_eq!(acl.patterns[0].permission, Permission::ReadWrite);
        assert_eq!(acl.rules(), 6);
    }

    #[test]
    fn filter_is_the_rest_of_the_line() {
        let acl = parsed("topic read   sport/tennis player1/#\npattern write  a b/%c \t\n");
        assert_eq!(acl.anonymous[0].filter, "sport/tennis player1/#");
        assert_eq!(acl.patterns[0].filter, "a b/%c");
        assert!(reads(&acl, ANON, "c", "sport/tennis player1/score"));
        assert!(writes(&acl, ANON, "c 1", "a b/c 1"));
    }

    #[test]
    fn blanks_comments_and_line_ends() {
        let acl = parsed(
            "# a comment\r\n\r\n   \n\t\n#topic read nope\r\n  topic\tread\t a/b \r\n\
             user   carol  \r\ntopic write c\n",
        );
        assert_eq!(acl.rules(), 2);
        assert_eq!(acl.anonymous[0].filter, "a/b");
        assert!(acl.users.contains_key("carol"));
        assert!(reads(&acl, ANON, "x", "a/b"));
        assert!(!reads(&acl, ANON, "x", "nope"));
        assert!(Acl::parse("").is_ok_and(|acl| acl.rules() == 0));
        assert!(Acl::parse("# only\n\n").is_ok_and(|acl| acl.rules() == 0));
    }

    #[test]
    fn user_names_may_contain_spaces() {
        let acl = parsed("user  john smith \ntopic read x\n");
        assert!(reads(&acl, Some("john smith"), "c", "x"));
        assert!(!reads(&acl, Some("john"), "c", "x"));
    }

    #[test]
    fn errors_carry_the_line_number() {
        let cases = [
            ("topic read a\nfoo bar\n", 2, "unknown keyword \"foo\""),
            ("topic read a\n\nuser\n", 3, "\"user\" needs a username"),
            ("user   \t\n", 1, "\"user\" needs a username"),
            (
                "# fine\ntopic read a/#/b\n",
                2,
                "not a valid topic filter: \"a/#/b\"",
            ),
            ("topic a+\n", 1, "not a valid topic filter"),
            ("pattern read %c/#/x\n", 1, "not a valid topic filter"),
            ("\n  # indented comment\n", 2, "not a valid line"),
            (
                "topic read $share/g/x\n",
                1,
                "not a valid topic filter: \"$share/g/x\"",
            ),
            ("topic\n", 1, "\"topic\" needs a topic filter"),
            ("pattern   \n", 1, "\"pattern\" needs a topic filter"),
            ("topic read\n", 1, "\"topic read\" needs a topic filter"),
            ("topic deny  \n", 1, "\"topic deny\" needs a topic filter"),
            ("topic dney secret/#\n", 1, "not a valid access \"dney\""),
            ("topic a b\n", 1, "not a valid access \"a\""),
            ("Topic read a\n", 1, "unknown keyword \"Topic\""),
            ("topic read a\0b\n", 1, "not a valid topic filter"),
        ];
        for (text, line, message) in cases {
            let e = error(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
        }
        let long = format!("topic read {}\n", "a".repeat(65_536));
        assert!(error(&long).message.contains("not a valid topic filter"));
        assert!(Acl::parse(&format!("topic read {}\n", "a".repeat(65_535))).is_ok());
        // `$share` alone is an ordinary filter, not a shared subscription.
        assert!(Acl::parse("topic read $share\n").is_ok());
    }

    // ---- Which rules apply ----

    #[test]
    fn general_rules_are_for_anonymous_clients_only() {
        let acl = parsed("topic read public/#\nuser bob\ntopic read bob/#\n");
        assert!(reads(&acl, ANON, "c", "public/x"));
        assert!(!reads(&acl, ANON, "c", "bob/x"));
        assert!(reads(&acl, Some("bob"), "c", "bob/x"));
        assert!(!reads(&acl, Some("bob"), "c", "public/x"));
        // A user without a section gets no topic rules at all.
        assert!(!reads(&acl, Some("eve"), "c", "public/x"));
        assert!(!reads(&acl, Some("eve"), "c", "bob/x"));
        // An empty username is a username.
        assert!(!reads(&acl, Some(""), "c", "public/x"));
    }

    #[test]
    fn user_sections_match_exactly_and_merge() {
        let acl =
            parsed("user bob\ntopic read a\nuser alice\ntopic read b\nuser bob\ntopic read c\n");
        assert!(reads(&acl, Some("bob"), "c", "a"));
        assert!(reads(&acl, Some("bob"), "c", "c"));
        assert!(!reads(&acl, Some("bob"), "c", "b"));
        assert!(reads(&acl, Some("alice"), "c", "b"));
        assert!(!reads(&acl, Some("Bob"), "c", "a"));
        assert!(!reads(&acl, Some("bo"), "c", "a"));
        assert!(!reads(&acl, Some("bob "), "c", "a"));
    }

    #[test]
    fn access_must_be_granted() {
        let acl = parsed("topic read r\ntopic write w\ntopic readwrite rw\ntopic deny d\n");
        assert!(reads(&acl, ANON, "c", "r") && !writes(&acl, ANON, "c", "r"));
        assert!(!reads(&acl, ANON, "c", "w") && writes(&acl, ANON, "c", "w"));
        assert!(reads(&acl, ANON, "c", "rw") && writes(&acl, ANON, "c", "rw"));
        assert!(!reads(&acl, ANON, "c", "d") && !writes(&acl, ANON, "c", "d"));
        assert!(!reads(&acl, ANON, "c", "other"));
    }

    #[test]
    fn deny_rules_come_first() {
        // Wherever the deny is written, it wins over a grant at the same layer.
        for text in [
            "topic readwrite a/#\ntopic deny a/secret/#\n",
            "topic deny a/secret/#\ntopic readwrite a/#\n",
        ] {
            let acl = parsed(text);
            assert!(writes(&acl, ANON, "c", "a/x"), "{text}");
            assert!(!writes(&acl, ANON, "c", "a/secret/x"), "{text}");
            assert!(!reads(&acl, ANON, "c", "a/secret"), "{text}");
        }
        let acl = parsed("pattern readwrite a/%c/#\npattern deny a/%c/secret\n");
        assert!(writes(&acl, ANON, "c1", "a/c1/x"));
        assert!(!writes(&acl, ANON, "c1", "a/c1/secret"));
    }

    #[test]
    fn patterns_substitute_the_client_id_and_username() {
        let acl = parsed("pattern readwrite dev/%u/#\npattern write clients/%c/state\n");
        assert!(writes(&acl, Some("sam"), "c1", "dev/sam/x"));
        assert!(writes(&acl, Some("sam"), "c1", "dev/sam"));
        assert!(!writes(&acl, Some("sam"), "c1", "dev/other/x"));
        assert!(writes(&acl, Some("sam"), "c1", "clients/c1/state"));
        assert!(!reads(&acl, Some("sam"), "c1", "clients/c1/state"));
        assert!(!writes(&acl, Some("sam"), "c1", "clients/c2/state"));
        // Plain text: a username or client id with `/` spans levels; inside a level works.
        assert!(writes(&acl, Some("a/b"), "x/y", "dev/a/b/1"));
        assert!(writes(&acl, Some("a/b"), "x/y", "clients/x/y/state"));
        let acl = parsed("pattern read in/%u-%c/%c\n");
        assert!(reads(&acl, Some("u"), "c", "in/u-c/c"));
        assert!(!reads(&acl, Some("u"), "c", "in/%u-%c/%c"));
    }

    #[test]
    fn username_patterns_skip_anonymous_clients() {
        let acl = parsed("pattern read u/%u/#\npattern read c/%c/#\npattern read both/%u/%c\n");
        assert!(reads(&acl, ANON, "c1", "c/c1/x"));
        assert!(!reads(&acl, ANON, "c1", "u//x"));
        assert!(!reads(&acl, ANON, "c1", "u/%u/x"));
        assert!(!reads(&acl, ANON, "c1", "both/%u/c1"));
        assert!(!reads(&acl, ANON, "c1", "both//c1"));
        assert!(
            reads(&acl, Some(""), "c1", "u//x"),
            "an empty username is a username"
        );
        assert!(reads(&acl, Some("u1"), "c1", "both/u1/c1"));
    }

    #[test]
    fn substitution_is_one_pass() {
        let acl = parsed("pattern read c/%c\npattern read u/%u\npattern read p/%%c/100%\n");
        assert!(reads(&acl, Some("bob"), "%u", "c/%u"));
        assert!(!reads(&acl, Some("bob"), "%u", "c/bob"));
        assert!(reads(&acl, Some("%c"), "id", "u/%c"));
        assert!(!reads(&acl, Some("%c"), "id", "u/id"));
        assert!(reads(&acl, ANON, "id", "p/%id/100%"));
    }

    #[test]
    fn patterns_apply_to_everybody_wherever_written() {
        let acl = parsed("user bob\ntopic read bob/x\npattern read c/%c\n");
        assert!(reads(&acl, Some("bob"), "c1", "c/c1"));
        assert!(reads(&acl, Some("alice"), "c2", "c/c2"));
        assert!(reads(&acl, ANON, "c3", "c/c3"));
        assert!(!reads(&acl, Some("alice"), "c2", "bob/x"));
    }

    #[test]
    fn dangerous_identities_get_no_patterns() {
        let acl = parsed("pattern readwrite c/%c/#\npattern readwrite u/%u/#\npattern read all\n");
        assert!(reads(&acl, Some("u"), "c", "c/c/x"));
        for (user, client_id) in [
            (Some("u"), "x+y"),
            (Some("u"), "x#"),
            (Some("ev+l"), "c"),
            (Some("#"), "c"),
            (ANON, "+"),
        ] {
            for topic in ["c/x+y/1", "c/c/1", "u/ev+l/1", "all", "c/x/1"] {
                assert!(!reads(&acl, user, client_id, topic), "{user:?} {client_id}");
                assert!(
                    !writes(&acl, user, client_id, topic),
                    "{user:?} {client_id}"
                );
            }
        }
        // As in Mosquitto, the refusal is the patterns': the client's own topic rules decide
        // before them.
        let acl = parsed("topic read open\nuser ev+l\ntopic read evil\npattern read all\n");
        assert!(reads(&acl, ANON, "x+y", "open"));
        assert!(!reads(&acl, ANON, "x+y", "all"));
        assert!(reads(&acl, Some("ev+l"), "c", "evil"));
        assert!(!reads(&acl, Some("ev+l"), "c", "all"));
        assert!(reads(&acl, Some("good"), "c", "all"));
    }

    #[test]
    fn dollar_topics_need_dollar_rules() {
        let acl = parsed("topic readwrite #\ntopic read +/x\ntopic read $aws/#\n");
        assert!(reads(&acl, ANON, "c", "a/x"));
        assert!(!reads(&acl, ANON, "c", "$custom/x"));
        assert!(!writes(&acl, ANON, "c", "$aws/x"));
        assert!(reads(&acl, ANON, "c", "$aws/x"));
        let acl = parsed("pattern write #\npattern write $c/%c\n");
        assert!(!writes(&acl, ANON, "c", "$custom/x"));
        assert!(writes(&acl, ANON, "c", "$c/c"));
    }

    #[test]
    fn gateway_topics_need_explicit_rules() {
        let acl = parsed("topic readwrite #\ntopic readwrite +/deadletters/#\n");
        for topic in [
            "outpost",
            "outpost/deadletters/request",
            "$SYS/broker/uptime",
            "$SYS",
        ] {
            assert!(!reads(&acl, ANON, "c", topic), "{topic}");
            assert!(!writes(&acl, ANON, "c", topic), "{topic}");
        }
        assert!(writes(&acl, ANON, "c", "outposts/x"), "not the gateway's");
        assert!(
            writes(&acl, ANON, "c", "a/outpost/x"),
            "not the first level"
        );

        let acl =
            parsed("topic readwrite outpost/#\ntopic read $SYS/#\ntopic deny #\ntopic deny +/x\n");
        assert!(writes(&acl, ANON, "c", "outpost/deadletters/request"));
        assert!(writes(&acl, ANON, "c", "outpost"));
        assert!(
            reads(&acl, ANON, "c", "outpost/x"),
            "`deny +/x` does not reach it"
        );
        assert!(reads(&acl, ANON, "c", "$SYS/broker/uptime"));
        assert!(!writes(&acl, ANON, "c", "$SYS/broker/uptime"));
        assert!(!reads(&acl, ANON, "c", "other"));

        let acl = parsed("topic readwrite outpost/#\ntopic deny outpost/secret/#\n");
        assert!(!reads(&acl, ANON, "c", "outpost/secret/x"));
        assert!(reads(&acl, ANON, "c", "outpost/open"));
    }

    #[test]
    fn substitution_does_not_reach_gateway_topics() {
        let acl =
            parsed("pattern readwrite %c/#\npattern readwrite %u/#\npattern read outpost/%c\n");
        assert!(writes(&acl, Some("bob"), "dev", "dev/x"));
        assert!(!writes(&acl, Some("bob"), "outpost", "outpost/x"));
        assert!(!writes(&acl, Some("outpost"), "c", "outpost/x"));
        assert!(!writes(&acl, Some("$SYS"), "c", "$SYS/x"));
        assert!(!reads(&acl, Some("bob"), "$SYS", "$SYS/x"));
        assert!(
            reads(&acl, Some("bob"), "dev", "outpost/dev"),
            "written `outpost`"
        );
    }

    #[test]
    fn user_grant_beats_pattern_deny() {
        let acl = parsed("user bob\ntopic readwrite dev/bob/#\npattern deny dev/%u/#\n");
        assert!(writes(&acl, Some("bob"), "c", "dev/bob/x"));
        assert!(!writes(&acl, Some("alice"), "c", "dev/alice/x"));
        // Read-only grant: a write is not decided by it, so the pattern's deny applies.
        let acl = parsed("user bob\ntopic read dev/bob/#\npattern deny dev/%u/#\n");
        assert!(reads(&acl, Some("bob"), "c", "dev/bob/x"));
        assert!(!writes(&acl, Some("bob"), "c", "dev/bob/x"));
    }

    #[test]
    fn user_deny_beats_pattern_grant() {
        let acl = parsed("user bob\ntopic deny dev/bob/secret\npattern readwrite dev/%u/#\n");
        assert!(!writes(&acl, Some("bob"), "c", "dev/bob/secret"));
        assert!(writes(&acl, Some("bob"), "c", "dev/bob/other"));
        assert!(writes(&acl, Some("alice"), "c", "dev/alice/secret"));
    }

    #[test]
    fn an_empty_file_denies_everything() {
        for acl in [
            parsed(""),
            parsed("# nothing\n\nuser bob\n"),
            Acl::default(),
        ] {
            assert_eq!(acl.rules(), 0);
            for user in [ANON, Some("bob")] {
                for topic in ["a", "a/b", "$SYS/x", "outpost/x"] {
                    assert!(!reads(&acl, user, "c", topic));
                    assert!(!writes(&acl, user, "c", topic));
                }
                assert!(!acl.allows_subscribe(user, "c", "#"));
                assert!(!acl.allows_subscribe(user, "c", "a"));
            }
        }
    }

    #[test]
    fn invalid_topics_are_refused() {
        let acl = parsed("topic readwrite #\n");
        assert!(writes(&acl, ANON, "c", "a/b"));
        for topic in ["", "a/+", "a/#", "#", "a\0"] {
            assert!(!writes(&acl, ANON, "c", topic), "{topic:?}");
            assert!(!reads(&acl, ANON, "c", topic), "{topic:?}");
        }
    }

    /// Mosquitto 2.0.11's answers on this file, verified against the real broker.
    #[test]
    fn mosquitto_example() {
        let acl = parsed(
            "user alice\ntopic readwrite a/#\ntopic deny a/secret/#\ntopic read b/+\n\
             pattern readwrite dev/%u/#\npattern write clients/%c/state\n",
        );
        assert_eq!(acl.rules(), 5);
        let alice = Some("alice");
        assert!(writes(&acl, alice, "c", "a/x"));
        assert!(!writes(&acl, alice, "c", "a/secret/x"));
        assert!(!reads(&acl, alice, "c", "a/secret/x"));
        assert!(reads(&acl, alice, "c", "b/c"));
        assert!(!writes(&acl, alice, "c", "b/c"));
        assert!(writes(&acl, alice, "c", "dev/alice/1"));
        assert!(writes(&acl, Some("sl/sh"), "c", "dev/sl/sh/1"));
        assert!(writes(&acl, ANON, "x/y", "clients/x/y/state"));
        for (user, client_id) in [(ANON, "x+y"), (Some("ev+l"), "c")] {
            for topic in ["clients/x+y/state", "dev/ev+l/1", "a/x", "b/c", "public/x"] {
                assert!(!writes(&acl, user, client_id, topic), "{user:?} {topic}");
                assert!(!reads(&acl, user, client_id, topic), "{user:?} {topic}");
            }
        }
        assert!(writes(&acl, ANON, "anon1", "clients/anon1/state"));
        assert!(!writes(&acl, ANON, "anon1", "public/x"));
        assert!(
            !writes(&acl, ANON, "anon1", "a/x"),
            "alice's rules are alice's"
        );
    }

    // ---- SUBSCRIBE ----

    #[test]
    fn subscribe_needs_a_read_grant_that_meets_the_filter() {
        let acl = parsed("topic read sensors/+/temp\ntopic write commands/#\n");
        let subscribes = |filter| acl.allows_subscribe(ANON, "c", filter);
        for granted in [
            "sensors/#",
            "sensors/+/temp",
            "sensors/a/temp",
            "sensors/+/+",
            "+/a/temp",
            "#",
            "+/+/#",
        ] {
            assert!(subscribes(granted), "{granted}");
        }
        for refused in [
            "other/#",
            "sensors/a/humidity",
            "sensors/a",
            "sensors/a/temp/x",
            "+",
            "commands/#",
            "$SYS/#",
            "outpost/#",
            "a/#/b",
            "$share/g/sensors/#",
            "",
        ] {
            assert!(!subscribes(refused), "{refused}");
        }
    }

    #[test]
    fn subscribe_refused_when_a_deny_covers_it() {
        let acl = parsed("topic read #\ntopic deny secret/#\n");
        let subscribes = |filter| acl.allows_subscribe(ANON, "c", filter);
        assert!(!subscribes("secret/x"));
        assert!(!subscribes("secret/#"));
        assert!(!subscribes("secret"));
        assert!(!subscribes("secret/+/y"));
        assert!(subscribes("#"), "other topics are readable");
        assert!(subscribes("+/x"));
        assert!(subscribes("public/#"));
        // A deny that covers only part of the filter does not refuse it.
        let acl = parsed("topic read a/#\ntopic deny a/+\n");
        assert!(!acl.allows_subscribe(ANON, "c", "a/x"));
        assert!(!acl.allows_subscribe(ANON, "c", "a/+"));
        assert!(acl.allows_subscribe(ANON, "c", "a/#"));
        assert!(acl.allows_subscribe(ANON, "c", "a/x/#"));
    }

    #[test]
    fn subscribe_to_dollar_and_gateway_topics() {
        let acl = parsed("topic read #\n");
        for refused in ["$SYS/#", "$SYS/broker/+", "outpost/#", "outpost", "$aws/#"] {
            assert!(!acl.allows_subscribe(ANON, "c", refused), "{refused}");
        }
        assert!(acl.allows_subscribe(ANON, "c", "#"));
        assert!(acl.allows_subscribe(ANON, "c", "outposts/#"));
        let acl = parsed("topic read outpost/status/#\ntopic read $SYS/broker/#\ntopic deny #\n");
        assert!(acl.allows_subscribe(ANON, "c", "outpost/status/x"));
        assert!(acl.allows_subscribe(ANON, "c", "outpost/#"));
        assert!(acl.allows_subscribe(ANON, "c", "outpost/+/x"));
        assert!(!acl.allows_subscribe(ANON, "c", "outpost/control/#"));
        assert!(acl.allows_subscribe(ANON, "c", "$SYS/#"));
        assert!(!acl.allows_subscribe(ANON, "c", "$SYS/other"));
        assert!(
            !acl.allows_subscribe(ANON, "c", "a/#"),
            "denied by `deny #`"
        );
        let acl = parsed("topic read outpost/#\ntopic deny outpost/secret/#\n");
        assert!(!acl.allows_subscribe(ANON, "c", "outpost/secret/#"));
        assert!(acl.allows_subscribe(ANON, "c", "outpost/#"));
        // Substitution does not name the gateway's topics.
        let acl = parsed("pattern read %c/#\n");
        assert!(acl.allows_subscribe(ANON, "dev", "dev/#"));
        assert!(!acl.allows_subscribe(ANON, "outpost", "outpost/#"));
        assert!(!acl.allows_subscribe(ANON, "outpost", "#"));
        assert!(!acl.allows_subscribe(ANON, "$SYS", "$SYS/#"));
    }

    #[test]
    fn subscribe_is_layered_like_allows() {
        let acl = parsed(
            "user bob\ntopic read dev/bob/#\ntopic deny dev/bob/secret/#\n\
             pattern deny dev/%u/#\npattern read dev/%u/secret/#\npattern read c/%c/#\n",
        );
        let bob = Some("bob");
        assert!(
            acl.allows_subscribe(bob, "c1", "dev/bob/#"),
            "user grant over pattern deny"
        );
        assert!(
            !acl.allows_subscribe(bob, "c1", "dev/bob/secret/#"),
            "user deny first"
        );
        assert!(acl.allows_subscribe(bob, "c1", "c/c1/#"));
        assert!(!acl.allows_subscribe(Some("alice"), "c1", "dev/alice/#"));
        assert!(!acl.allows_subscribe(Some("alice"), "c1", "dev/alice/secret/#"));
    }

    #[test]
    fn subscribe_with_a_dangerous_identity() {
        let acl = parsed("topic read open/#\nuser ev+l\ntopic read evil/#\npattern read c/%c/#\n");
        assert!(acl.allows_subscribe(ANON, "c1", "c/c1/#"));
        assert!(!acl.allows_subscribe(ANON, "x+y", "c/x+y/#"));
        assert!(!acl.allows_subscribe(ANON, "x+y", "c/#"));
        assert!(!acl.allows_subscribe(Some("ev+l"), "c1", "c/c1/#"));
        // The client's own topic rules still decide first, as in `allows`.
        assert!(acl.allows_subscribe(ANON, "x+y", "open/#"));
        assert!(acl.allows_subscribe(Some("ev+l"), "c", "evil/#"));
    }

    // ---- The filter helpers ----

    #[test]
    fn filters_intersect_examples() {
        for (a, b) in [
            ("a/#", "a"),
            ("#", "a/b"),
            ("+/b", "a/+"),
            ("a/+/c", "a/b/#"),
            ("$x/#", "$x/+"),
            ("+", "+"),
            ("#", "#"),
            ("a//b", "a/+/b"),
        ] {
            assert!(filters_intersect(a, b), "{a} {b}");
            assert!(filters_intersect(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("a", "b"),
            ("a/+", "a"),
            ("+", "a/b"),
            ("#", "$x"),
            ("+/#", "$x/a"),
            ("a/b/c", "a/+/d"),
            ("$x", "$y/#"),
            ("+", "/#"),
        ] {
            assert!(!filters_intersect(a, b), "{a} {b}");
            assert!(!filters_intersect(b, a), "{b} {a}");
        }
    }

    #[test]
    fn filter_covers_examples() {
        for (general, specific) in [
            ("#", "a/b"),
            ("#", "#"),
            ("a/#", "a"),
            ("a/#", "a/+/b"),
            ("+/+", "a/b"),
            ("+", "+"),
            ("$x/#", "$x"),
            ("+/#", "+/a/#"),
            ("+/#", "#"),
            ("/+/#", "/#"),
            ("+/+/#", "/#"),
        ] {
            assert!(filter_covers(general, specific), "{general} {specific}");
        }
        for (general, specific) in [
            ("a", "a/#"),
            ("a/+", "a/#"),
            ("a/+/#", "a/#"),
            ("a/b", "a/+"),
            ("#", "$x/a"),
            ("+", "$x"),
            ("a/b", "a/b/c"),
            ("a/b/c", "a/b"),
            ("+/+/#", "#"),
            ("/+/#", "+/#"),
        ] {
            assert!(!filter_covers(general, specific), "{general} {specific}");
        }
    }

    /// Every sequence of `0..=depth` levels from `levels`.
    fn sequences<'a>(levels: &[&'a str], depth: usize) -> Vec<Vec<&'a str>> {
        let mut all = vec![Vec::new()];
        let mut layer = vec![Vec::new()];
        for _ in 0..depth {
            layer = layer
                .iter()
                .flat_map(|prefix: &Vec<&'a str>| {
                    levels.iter().map(move |level| {
                        let mut longer = prefix.clone();
                        longer.push(*level);
                        longer
                    })
                })
                .collect();
            all.extend(layer.iter().cloned());
        }
        all
    }

    /// Topic names of `1..=depth` levels from `levels` (the empty name is not one).
    fn topics(levels: &[&str], depth: usize) -> Vec<String> {
        sequences(levels, depth)
            .into_iter()
            .filter(|levels| !levels.is_empty())
            .map(|levels| levels.join("/"))
            .filter(|topic| !topic.is_empty())
            .collect()
    }

    /// Valid filters of `1..=depth` levels from `levels`, `#` only last.
    fn filters(levels: &[&str], depth: usize) -> Vec<String> {
        let inner: Vec<&str> = levels.iter().copied().filter(|l| *l != "#").collect();
        let mut all = Vec::new();
        for prefix in sequences(&inner, depth - 1) {
            for level in levels {
                let mut filter = prefix.clone();
                filter.push(level);
                let filter = filter.join("/");
                if valid_rule_filter(&filter) {
                    all.push(filter);
                }
            }
        }
        all
    }

    /// Which of `universe` the filter matches.
    fn matched(filter: &str, universe: &[String]) -> Vec<bool> {
        universe.iter().map(|t| filter_matches(filter, t)).collect()
    }

    const TOPIC_LEVELS: [&str; 5] = ["a", "b", "$x", "z", ""];
    const FILTER_LEVELS: [&str; 6] = ["a", "b", "$x", "+", "#", ""];

    /// Every pair of filters of up to 3 levels against every topic of up to 4: exact,
    /// since a witness that two filters meet needs no more levels than the longer one, a
    /// counterexample to covering at most one more, and `z` is a level `+` can take that no
    /// filter names.
    #[test]
    fn filter_helpers_agree_with_brute_force_exhaustively() {
        let universe = topics(&TOPIC_LEVELS, 4);
        let filters = filters(&FILTER_LEVELS, 3);
        assert!(filters.len() > 150, "{}", filters.len());
        let matches: Vec<(String, Vec<bool>)> = filters
            .iter()
            .map(|f| (f.clone(), matched(f, &universe)))
            .collect();
        for (a, a_matches) in &matches {
            for (b, b_matches) in &matches {
                let meet = a_matches.iter().zip(b_matches).any(|(x, y)| *x && *y);
                assert_eq!(filters_intersect(a, b), meet, "intersect {a} {b}");
                let covers = a_matches.iter().zip(b_matches).all(|(g, s)| !*s || *g);
                assert_eq!(filter_covers(a, b), covers, "covers {a} {b}");
            }
        }
    }

    /// The topics of up to 5 levels, for the filters of up to 4 the properties draw (exact,
    /// as above).
    static DEEP_UNIVERSE: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| topics(&TOPIC_LEVELS, 5));

    fn filter_strategy(max_levels: usize) -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(&FILTER_LEVELS[..5]), 0..max_levels),
            prop::sample::select(&FILTER_LEVELS[..]),
        )
            .prop_map(|(inner, last)| {
                let mut levels: Vec<&str> = inner.into_iter().filter(|l| *l != "#").collect();
                levels.push(last);
                levels.join("/")
            })
            .prop_filter("a valid filter", |f| valid_rule_filter(f))
    }

    /// One line of a random ACL file, from levels that exercise every rule.
    fn rule_line() -> impl Strategy<Value = String> {
        const LEVELS: [&str; 8] = ["a", "b", "$x", "outpost", "$SYS", "+", "%c", "%u"];
        (
            prop::sample::select(&["topic", "pattern"][..]),
            prop::sample::select(&["read", "write", "readwrite", "deny"][..]),
            prop::collection::vec(prop::sample::select(&LEVELS[..]), 1..3),
            any::<bool>(),
        )
            .prop_map(|(keyword, access, mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                format!("{keyword} {access} {}", levels.join("/"))
            })
    }

    proptest! {
        #[test]
        fn filters_intersect_agrees_with_brute_force(
            a in filter_strategy(4),
            b in filter_strategy(4),
        ) {
            let meet = matched(&a, &DEEP_UNIVERSE)
                .into_iter()
                .zip(matched(&b, &DEEP_UNIVERSE))
                .any(|(x, y)| x && y);
            prop_assert_eq!(filters_intersect(&a, &b), meet);
            prop_assert_eq!(filters_intersect(&b, &a), meet);
        }

        #[test]
        fn filter_covers_agrees_with_brute_force(
            general in filter_strategy(4),
            specific in filter_strategy(4),
        ) {
            let covers = matched(&general, &DEEP_UNIVERSE)
                .into_iter()
                .zip(matched(&specific, &DEEP_UNIVERSE))
                .all(|(g, s)| !s || g);
            prop_assert_eq!(filter_covers(&general, &specific), covers);
        }

        /// A subscription through which some topic could be delivered (a topic it matches that
        /// `allows` lets the client read, and that is not a gateway topic the filter does not
        /// name) is granted.
        #[test]
        fn subscribe_granted_when_some_topic_is_readable(
            general in prop::collection::vec(rule_line(), 0..4),
            bob in prop::collection::vec(rule_line(), 0..4),
            filter in prop::sample::select(&[
                "#", "+", "a/#", "+/a", "$x/#", "outpost/#", "$SYS/+", "+/+/#", "c1/#",
                "bob/+", "outpost", "a/b", "b/+/a",
            ][..]),
            user in prop::sample::select(&[None, Some("bob"), Some("eve"), Some("b+b")][..]),
            client_id in prop::sample::select(&["c1", "outpost", "a", "x#"][..]),
        ) {
            let text = format!("{}\nuser bob\n{}\n", general.join("\n"), bob.join("\n"));
            let acl = Acl::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let levels = ["a", "b", "$x", "outpost", "$SYS", "z", "c1", "bob"];
            let readable = topics(&levels, 3).into_iter().find(|t| {
                filter_matches(filter, t)
                    && (!is_gateway_level(first_level(t)) || first_level(t) == first_level(filter))
                    && acl.allows(user, client_id, t, Access::Read)
            });
            if let Some(topic) = readable {
                prop_assert!(
                    acl.allows_subscribe(user, client_id, filter),
                    "{text}\n{topic} readable through {filter}"
                );
            }
        }

        #[test]
        fn never_panics(text in "\\PC{0,80}", topic in "\\PC{0,20}", id in "\\PC{0,6}") {
            let line = format!("pattern readwrite {text}\ntopic {text}\nuser {text}\n");
            for text in [text.as_str(), line.as_str()] {
                if let Ok(acl) = Acl::parse(text) {
                    let _ = acl.allows(Some(&id), &id, &topic, Access::Read);
                    let _ = acl.allows(None, &id, &topic, Access::Write);
                    let _ = acl.allows_subscribe(Some(&id), &id, &topic);
                }
            }
        }
    }
}
