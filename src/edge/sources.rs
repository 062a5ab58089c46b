//! Per-source limits on device connections (`broker.max_connections_per_source`,
//! `broker.max_connection_rate_per_source`): one address on the site network cannot take
//! every connection slot, or make the gateway accept connections as fast as it can open them.
//!
//! Guarantees:
//! - A source (an IP address) has at most `max_open` connections admitted and not yet
//!   released at once, and is admitted at most `rate` new connections per second over time,
//!   with bursts of up to `rate` (a token bucket that refills continuously); 0 turns either
//!   limit off.
//! - Each refusal says which limit refused it, and whether it is the first refusal of that
//!   source since it was last remembered (so that it is logged once per source, not once per
//!   connection).
//! - Memory is bounded: at most [`MAX_SOURCES`] sources are remembered; a source with no open
//!   connection and a full bucket carries nothing worth keeping and is forgotten first, then
//!   any source without an open connection. A source with open connections is never forgotten
//!   (there are at most as many as the broker's connection limit allows).
//!
//! Pure: no I/O; time is a parameter (ms, monotonic); never panics.

use std::collections::HashMap;
use std::net::IpAddr;

/// Most sources remembered at once (about 100 bytes each).
pub const MAX_SOURCES: usize = 65_536;

/// The limits; 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Connections open at once from one address.
    pub max_open: usize,
    /// New connections per second from one address (and the burst allowed).
    pub rate: u32,
}

impl Limits {
    /// Whether any limit is on.
    pub fn any(&self) -> bool {
        self.max_open > 0 || self.rate > 0
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The source has `max_open` connections open already.
    TooMany,
    /// The source connects faster than `rate` per second.
    TooFast,
}

#[derive(Debug, Clone)]
struct Source {
    open: usize,
    /// Tokens in the bucket, in thousandths of a connection.
    tokens_milli: u64,
    /// When the bucket was last filled up to now.
    at_ms: u64,
    /// Whether a refusal of this source was already reported.
    reported: bool,
}

/// What every source has open and may still open.
#[derive(Debug, Clone)]
pub struct Sources {
    limits: Limits,
    sources: HashMap<IpAddr, Source>,
}

impl Sources {
    /// No source known yet; these limits.
    pub fn new(limits: Limits) -> Sources {
        Sources {
            limits,
            sources: HashMap::new(),
        }
    }

    /// The number of sources remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no source is remembered.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    fn capacity_milli(&self) -> u64 {
        u64::from(self.limits.rate) * 1000
    }

    /// A new connection from `ip` at `now_ms`: `Ok` when it is admitted (then call
    /// [`Sources::release`] when it closes), or why not, with whether this is the first
    /// refusal of `ip` to report.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> Result<(), (Refused, bool)> {
        if !self.limits.any() {
            return Ok(());
        }
        if !self.sources.contains_key(&ip) && self.sources.len() >= MAX_SOURCES {
            self.forget_some(now_ms);
        }
        let capacity = self.capacity_milli();
        let (rate, max_open) = (u64::from(self.limits.rate), self.limits.max_open);
        let source = self.sources.entry(ip).or_insert(Source {
            open: 0,
            tokens_milli: capacity,
            at_ms: now_ms,
            reported: false,
        });
        let elapsed = now_ms.saturating_sub(source.at_ms);
        source.tokens_milli = source
            .tokens_milli
            .saturating_add(elapsed.saturating_mul(rate))
            .min(capacity);
        source.at_ms = source.at_ms.max(now_ms);
        let refused = if max_open > 0 && source.open >= max_open {
            Some(Refused::TooMany)
        } else if rate > 0 && source.tokens_milli < 1000 {
            Some(Refused::TooFast)
        } else {
            None
        };
        match refused {
            Some(why) => {
                let first = !std::mem::replace(&mut source.reported, true);
                Err((why, first))
            }
            None => {
                if rate > 0 {
                    source.tokens_milli -= 1000;
                }
                source.open += 1;
                Ok(())
            }
        }
    }

    /// A connection admitted from `ip` closed.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(source) = self.sources.get_mut(&ip) {
            source.open = source.open.saturating_sub(1);
        }
    }

    /// The connections open from `ip`, as admitted.
    #[cfg(test)]
    pub fn open(&self, ip: IpAddr) -> usize {
        self.sources.get(&ip).map_or(0, |s| s.open)
    }

    /// Makes room: forgets the sources with nothing open and a full bucket, and if that frees
    /// nothing, every source with nothing open.
    fn forget_some(&mut self, now_ms: u64) {
        let capacity = self.capacity_milli();
        let rate = u64::from(self.limits.rate);
        let before = self.sources.len();
        self.sources.retain(|_, s| {
            let refilled = s
                .tokens_milli
                .saturating_add(now_ms.saturating_sub(s.at_ms).saturating_mul(rate));
            s.open > 0 || refilled < capacity
        });
        if self.sources.len() == before {
            self.sources.retain(|_, s| s.open > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn no_limits_admit_everything_and_remember_nothing() {
        let mut sources = Sources::new(Limits::default());
        for n in 0..1000 {
            assert_eq!(sources.admit(ip(1), n), Ok(()));
        }
        assert!(sources.is_empty());
    }

    #[test]
    fn open_connections_are_bounded_per_source() {
        let mut sources = Sources::new(Limits {
            max_open: 2,
            rate: 0,
        });
        assert_eq!(sources.admit(ip(1), 0), Ok(()));
        assert_eq!(sources.admit(ip(1), 0), Ok(()));
        assert_eq!(sources.admit(ip(1), 0), Err((Refused::TooMany, true)));
        assert_eq!(sources.admit(ip(1), 0), Err((Refused::TooMany, false)));
        // Another source is not affected.
        assert_eq!(sources.admit(ip(2), 0), Ok(()));
        sources.release(ip(1));
        assert_eq!(sources.admit(ip(1), 0), Ok(()));
        assert_eq!(sources.open(ip(1)), 2);
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills_over_time() {
        let mut sources = Sources::new(Limits {
            max_open: 0,
            rate: 5,
        });
        for _ in 0..5 {
            assert_eq!(sources.admit(ip(1), 1_000), Ok(()));
        }
        assert_eq!(sources.admit(ip(1), 1_000), Err((Refused::TooFast, true)));
        // 200 ms later one token is back (5 per second), not two.
        assert_eq!(sources.admit(ip(1), 1_200), Ok(()));
        assert_eq!(sources.admit(ip(1), 1_200), Err((Refused::TooFast, false)));
        // Time going backwards (it cannot, but) takes nothing.
        assert!(sources.admit(ip(1), 0).is_err());
        // A long pause refills the bucket to its capacity only.
        for _ in 0..5 {
            assert_eq!(sources.admit(ip(1), 100_000), Ok(()));
        }
        assert!(sources.admit(ip(1), 100_000).is_err());
    }

    #[test]
    fn sources_are_forgotten_when_full_but_never_with_open_connections() {
        let mut sources = Sources::new(Limits {
            max_open: 1,
            rate: 1,
        });
        for n in 0..MAX_SOURCES as u32 {
            assert_eq!(sources.admit(ip(n), 0), Ok(()));
        }
        // Every remembered source has a connection open: none is forgotten, and a new source
        // is still served (the map grows by it: open connections are bounded elsewhere).
        assert_eq!(sources.admit(ip(u32::MAX), 0), Ok(()));
        assert_eq!(sources.len(), MAX_SOURCES + 1);
        for n in 0..MAX_SOURCES as u32 {
            sources.release(ip(n));
        }
        // Later, with their buckets full again, they make room for a new one.
        assert_eq!(sources.admit(ip(u32::MAX - 1), 10_000), Ok(()));
        assert!(sources.len() <= 3, "{}", sources.len());
        assert_eq!(sources.open(ip(u32::MAX)), 1);
    }

    proptest! {
        #[test]
        fn never_more_open_than_allowed_nor_faster_than_the_rate(
            steps in proptest::collection::vec((0u32..4, 0u64..400, any::<bool>()), 1..300),
            max_open in 0usize..4,
            rate in 0u32..6,
        ) {
            let limits = Limits { max_open, rate };
            let mut sources = Sources::new(limits);
            let mut now = 0u64;
            let mut open: HashMap<u32, usize> = HashMap::new();
            let mut admitted: HashMap<u32, Vec<u64>> = HashMap::new();
            for (source, advance, close) in steps {
                now += advance;
                if close && open.get(&source).copied().unwrap_or(0) > 0 {
                    sources.release(ip(source));
                    *open.entry(source).or_default() -= 1;
                    continue;
                }
                if sources.admit(ip(source), now).is_ok() {
                    *open.entry(source).or_default() += 1;
                    admitted.entry(source).or_default().push(now);
                }
                if max_open > 0 {
                    prop_assert!(open[&source] <= max_open);
                }
            }
            if rate > 0 {
                // In any window of w ms, at most rate (the burst) + rate * w / 1000 admitted.
                for times in admitted.values() {
                    for (i, start) in times.iter().enumerate() {
                        for (j, end) in times.iter().enumerate().skip(i) {
                            let count = (j - i + 1) as u64;
                            let allowed = u64::from(rate) + u64::from(rate) * (end - start) / 1000;
                            prop_assert!(count <= allowed, "{count} in {} ms", end - start);
                        }
                    }
                }
            } else if max_open == 0 {
                prop_assert!(sources.is_empty());
            }
        }
    }
}
