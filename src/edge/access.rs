//! Who may read and write which topic on the broker: the operator's ACL (`broker.acl_file`,
//! [`super::acl`]) and the control plane's admins (`broker.admins`), decided together.
//!
//! The gateway's own topics are the `outpost/...` namespace: its dead-letter and module
//! requests and their replies, its metrics. They are what an intruder on the site network
//! would go for (read every dead letter, purge them, forge the replies an operator trusts), so
//! they are closed as soon as the operator configures any access control:
//!
//! - No ACL and no admins (the loopback-only default): everything is allowed.
//! - An admin (a username listed in `broker.admins`) may read and write every topic under
//!   `outpost/<gateway_id>/`, whatever the ACL says; everywhere else an admin is an ordinary
//!   user.
//! - Everyone else, and admins outside their gateway's topics: the ACL decides when there is
//!   one (the gateway's topics only through rules that name `outpost` literally: see
//!   [`super::acl`]); without an ACL, every topic is allowed except the `outpost/...`
//!   namespace, which is denied.
//!
//! Guarantees: pure (no I/O, no clock), never panics; a client without a username is never an
//! admin; the gateway's own in-process links are not asked (the broker does not ask for
//! them).

use std::collections::HashSet;
use std::sync::Arc;

use super::acl::{filters_intersect, Access, Acl};
use super::checks::valid_topic_filter;

/// The first level of every topic the gateway keeps for itself.
pub const GATEWAY_NAMESPACE: &str = "outpost";

/// The access rules in force: see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    acl: Option<Arc<Acl>>,
    admins: Arc<HashSet<String>>,
    /// `outpost/<gateway_id>/`: the topics admins may use.
    admin_prefix: Arc<str>,
}

/// Whether `topic` (a topic name or filter) is in the gateway's own namespace.
fn in_gateway_namespace(topic: &str) -> bool {
    topic.split('/').next() == Some(GATEWAY_NAMESPACE)
}

impl Rules {
    /// Everything allowed to everyone (no ACL, no admins).
    pub fn open() -> Rules {
        Rules::default()
    }

    /// The rules of `acl` (if any) and of `admins`, the usernames that may use gateway
    /// `gateway_id`'s control topics.
    pub fn new(acl: Option<Arc<Acl>>, admins: &[String], gateway_id: &str) -> Rules {
        Rules {
            acl,
            admins: Arc::new(admins.iter().cloned().collect()),
            admin_prefix: Arc::from(format!("{GATEWAY_NAMESPACE}/{gateway_id}/")),
        }
    }

    /// The same admins with another ACL (a reloaded file).
    pub fn with_acl(&self, acl: Option<Arc<Acl>>) -> Rules {
        Rules {
            acl,
            ..self.clone()
        }
    }

    /// Whether anything is checked at all (an ACL or admins are configured).
    #[cfg(test)]
    pub fn enforced(&self) -> bool {
        self.acl.is_some() || !self.admins.is_empty()
    }

    fn is_admin(&self, username: Option<&str>) -> bool {
        username.is_some_and(|name| self.admins.contains(name))
    }

    /// Whether the client with `username` (if any) and `client_id` may read (receive) or
    /// write (publish) the topic name `topic`.
    pub fn allows(
        &self,
        username: Option<&str>,
        client_id: &str,
        topic: &str,
        access: Access,
    ) -> bool {
        if self.is_admin(username) && topic.starts_with(&*self.admin_prefix) {
            return true;
        }
        match &self.acl {
            Some(acl) => acl.allows(username, client_id, topic, access),
            None => self.admins.is_empty() || !in_gateway_namespace(topic),
        }
    }

    /// Whether a SUBSCRIBE to `filter` (without a `$share/GROUP/` prefix) is granted: for an
    /// admin, a filter that names the gateway's namespace and can match one of its gateway's
    /// topics; otherwise as the ACL grants it (see [`Acl::allows_subscribe`]), or, without an
    /// ACL, any filter that does not name the gateway's namespace. Each delivery is still
    /// checked with [`Rules::allows`], so a wildcard never delivers what its client may not
    /// read.
    pub fn allows_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        if self.is_admin(username)
            && in_gateway_namespace(filter)
            && valid_topic_filter(filter)
            && filters_intersect(filter, &format!("{}#", self.admin_prefix))
        {
            return true;
        }
        match &self.acl {
            Some(acl) => acl.allows_subscribe(username, client_id, filter),
            None => self.admins.is_empty() || !in_gateway_namespace(filter),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::checks::filter_matches;

    fn rules(acl: Option<&str>, admins: &[&str]) -> Rules {
        let acl = acl.map(|text| Arc::new(Acl::parse(text).expect("valid ACL")));
        let admins: Vec<String> = admins.iter().map(|s| s.to_string()).collect();
        Rules::new(acl, &admins, "gw")
    }

    const TOPICS: &[&str] = &[
        "outpost/gw/deadletters/purge",
        "outpost/gw/metrics",
        "outpost/gw/modules/list",
        "outpost/other/metrics",
        "outpost",
        "sensors/1",
        "a/b",
    ];

    #[test]
    fn without_acl_or_admins_everything_is_open() {
        let open = Rules::open();
        assert!(!open.enforced());
        for topic in TOPICS {
            for access in [Access::Read, Access::Write] {
                assert!(open.allows(None, "c", topic, access), "{topic}");
                assert!(open.allows(Some("u"), "c", topic, access), "{topic}");
            }
            assert!(open.allows_subscribe(None, "c", topic));
        }
        assert!(open.allows_subscribe(None, "c", "#"));
    }

    #[test]
    fn admins_alone_close_the_gateway_namespace_to_everyone_else() {
        let rules = rules(None, &["ops"]);
        assert!(rules.enforced());
        for access in [Access::Read, Access::Write] {
            for topic in ["outpost/gw/deadletters/purge", "outpost/gw/metrics"] {
                assert!(rules.allows(Some("ops"), "c", topic, access), "{topic}");
                assert!(!rules.allows(Some("dev"), "c", topic, access), "{topic}");
                assert!(!rules.allows(None, "c", topic, access), "{topic}");
            }
            // Another gateway's topics, and the bare namespace, are not this admin's.
            assert!(!rules.allows(Some("ops"), "c", "outpost/other/metrics", access));
            assert!(!rules.allows(Some("ops"), "c", "outpost", access));
            // Everything else stays open.
            assert!(rules.allows(Some("dev"), "c", "sensors/1", access));
            assert!(rules.allows(None, "c", "sensors/1", access));
        }
        assert!(rules.allows_subscribe(Some("ops"), "c", "outpost/gw/#"));
        assert!(rules.allows_subscribe(Some("ops"), "c", "outpost/+/metrics"));
        assert!(!rules.allows_subscribe(Some("ops"), "c", "outpost/other/#"));
        assert!(!rules.allows_subscribe(Some("dev"), "c", "outpost/gw/#"));
        assert!(!rules.allows_subscribe(None, "c", "outpost/#"));
        // A wildcard is granted, but delivers none of the gateway's topics to a non-admin.
        assert!(rules.allows_subscribe(Some("dev"), "c", "#"));
        assert!(!rules.allows(Some("dev"), "c", "outpost/gw/metrics", Access::Read));
    }

    #[test]
    fn with_an_acl_admins_are_granted_their_gateway_on_top_of_it() {
        let acl =
            "user dev\ntopic readwrite sensors/#\nuser watcher\ntopic read outpost/gw/metrics\n";
        let rules = rules(Some(acl), &["ops"]);
        assert!(rules.allows(
            Some("ops"),
            "c",
            "outpost/gw/deadletters/list",
            Access::Write
        ));
        // Outside its gateway's topics an admin has only what the ACL gives it (nothing).
        assert!(!rules.allows(Some("ops"), "c", "sensors/1", Access::Write));
        assert!(rules.allows(Some("dev"), "c", "sensors/1", Access::Write));
        assert!(!rules.allows(Some("dev"), "c", "outpost/gw/metrics", Access::Read));
        // An explicit grant of the ACL works for a non-admin.
        assert!(rules.allows(Some("watcher"), "c", "outpost/gw/metrics", Access::Read));
        assert!(!rules.allows(Some("watcher"), "c", "outpost/gw/metrics", Access::Write));
        assert!(rules.allows_subscribe(Some("watcher"), "c", "outpost/gw/metrics"));
        assert!(!rules.allows_subscribe(Some("watcher"), "c", "outpost/gw/deadletters/+"));
        // Reloading the ACL keeps the admins.
        let reloaded = rules.with_acl(None);
        assert!(reloaded.allows(Some("ops"), "c", "outpost/gw/metrics", Access::Read));
        assert!(!reloaded.allows(Some("watcher"), "c", "outpost/gw/metrics", Access::Read));
    }

    #[test]
    fn an_admin_subscription_delivers_exactly_what_the_admin_may_read() {
        let rules = rules(None, &["ops"]);
        for filter in [
            "outpost/gw/#",
            "outpost/+/metrics",
            "outpost/#",
            "outpost/other/#",
        ] {
            let granted = rules.allows_subscribe(Some("ops"), "c", filter);
            let readable = TOPICS.iter().any(|topic| {
                filter_matches(filter, topic) && rules.allows(Some("ops"), "c", topic, Access::Read)
            });
            assert_eq!(granted, readable, "{filter}");
        }
    }
}
