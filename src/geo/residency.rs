//! Data residency: which region-tagged rows a link may carry (invariant 8 of
//! ARCHITECTURE.md, "data stays in its jurisdiction").
//!
//! A row carries the region tags its event was given by the locator; an upstream link carries
//! the regions its configuration lists (`regions = ["eu"]`, or `"*"` for any). Pure: no I/O.
//!
//! Guarantees: a row goes on a link only if the link may carry every one of its tags; a row
//! without tags may go on any link; a link that lists no regions carries only untagged rows.

use std::collections::BTreeSet;

/// The regions a link may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkRegions {
    /// Any data (`"*"`).
    Any,
    /// Only data whose tags are all in this set (data without tags always).
    Only(BTreeSet<String>),
}

impl LinkRegions {
    /// From an upstream's `regions` list.
    pub fn from_list(list: &[String]) -> LinkRegions {
        if list.iter().any(|r| r == "*") {
            LinkRegions::Any
        } else {
            LinkRegions::Only(list.iter().cloned().collect())
        }
    }

    /// Whether a row with these tags may go on the link.
    pub fn allows<'t>(&self, mut tags: impl Iterator<Item = &'t str>) -> bool {
        match self {
            LinkRegions::Any => true,
            LinkRegions::Only(allowed) => tags.all(|t| allowed.contains(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_allow_only_their_regions() {
        let eu = LinkRegions::from_list(&["eu".into()]);
        assert!(eu.allows(["eu"].into_iter()));
        assert!(eu.allows(std::iter::empty()));
        assert!(!eu.allows(["eu", "us"].into_iter()));
        assert!(!eu.allows(["us"].into_iter()));
        let none = LinkRegions::from_list(&[]);
        assert!(none.allows(std::iter::empty()));
        assert!(!none.allows(["eu"].into_iter()));
        let any = LinkRegions::from_list(&["*".into()]);
        assert!(any.allows(["eu", "us"].into_iter()));
    }
}
