//! Route predicates: the conditions on geography and content that a route can add to its topic
//! filter (issue 5, part 3).
//!
//! A predicate is written in configuration as a [`PredicateConfig`] (under a route, as
//! `[route.when]`), compiled once at start-up by [`compile`] into a [`Predicate`], and evaluated
//! per event by [`Predicate::evaluate`] against the [`Facts`] the router knows about the event:
//! its JSON payload (if it is JSON), its location (if known), the geofences and regions that
//! contain it, and a [`Distance`] function supplied by the geo module.
//!
//! # Syntax
//!
//! Every predicate is one TOML table holding exactly one kind of condition:
//!
//! | keys | holds when |
//! | --- | --- |
//! | `all = [p, ...]` | every listed predicate holds (at least one must be listed) |
//! | `any = [p, ...]` | at least one listed predicate holds (at least one must be listed) |
//! | `not = p` | `p` does not hold |
//! | `in = "name"` or `in = ["a", "b"]` | the location is known and inside at least one of the named geofences or regions |
//! | `not_in = "name"` or `not_in = ["a", "b"]` | the location is known and inside none of them |
//! | `within_m = d, of = [lat, lon]` | the location is known and at most `d` metres from the point |
//! | `field = "/json/pointer"` with `eq`, `ne`, `gt`, `ge`, `lt`, `le`, `exists` | every comparison given holds for the payload value at that pointer |
//!
//! ```toml
//! [[route]]
//! name = "hot-in-eu"
//! filter = "telemetry/#"
//!
//! [route.when]
//! all = [
//!   { in = "eu" },                          # a region or a geofence
//!   { field = "/temp_c", gt = 30 },
//! ]
//! ```
//!
//! More examples, each a complete predicate:
//!
//! ```toml
//! when = { any = [ { in = ["de", "at", "ch"] }, { within_m = 500, of = [52.52, 13.405] } ] }
//! when = { not_in = "yard" }                     # located, and outside the yard
//! when = { not = { in = "yard" } }               # outside the yard, or location unknown
//! when = { field = "/status", eq = "alarm" }
//! when = { field = "/status", ne = "ok" }        # a string other than "ok"
//! when = { field = "/battery/low", eq = true }
//! when = { field = "/n", ge = 1, lt = 10 }       # 1 <= n < 10: all comparisons must hold
//! when = { field = "/firmware", exists = true }
//! when = { field = "/ts", ge = "2026-01-01T00:00:00Z" }   # strings compare by code point
//! when = { field = "/readings/0/v", le = -5.5 }  # array index 0
//! ```
//!
//! # Semantics
//!
//! - **Field values are typed.** A comparison (`eq`, `ne`, `gt`, `ge`, `lt`, `le`) holds only
//!   when the pointer resolves to a value of the literal's type: a JSON number for a number
//!   literal, a JSON string for a string literal, a JSON boolean for `true`/`false`. A missing
//!   field, a field of another type (including `null`), or a payload that is not JSON fails
//!   every comparison, `ne` included: `ne = "ok"` means "a string other than ok". To include
//!   missing or differently typed values, write `not = { field = "/status", eq = "ok" }`.
//!   Within one type, `eq`/`ne`, `gt`/`le` and `lt`/`ge` are exact complements.
//! - **Numbers** compare as `f64` (JSON `30` equals TOML `30.0`). Integer literals beyond
//!   ±2^53, which an `f64` cannot hold exactly, are refused when the configuration is read.
//!   Non-finite literals (`nan`, `inf`) are refused.
//! - **Strings** compare by Unicode code point (Rust's `str` order; the same as byte order of
//!   UTF-8), with no locale and no number parsing: `"10" < "9"`. This makes ordering useful for
//!   ISO 8601 timestamps and fixed-width codes. Booleans only take `eq` and `ne`.
//! - **`exists = true`** holds when the pointer resolves to any value, `null` included;
//!   **`exists = false`** is its exact complement, so it holds for a missing field and for a
//!   payload that is not JSON. `exists = false` cannot be combined with comparisons.
//! - **Pointers** are RFC 6901 JSON pointers: `""` is the whole document, otherwise they start
//!   with `/`; `~1` stands for `/` and `~0` for `~` in a key; an array is indexed by a decimal
//!   index without leading zeros (`-`, past the end, is never present).
//! - **`in` and `not_in` need a location.** An event whose location is unknown is neither in nor
//!   not in anything, so both are false for it: a route "not in eu" must not take events that might
//!   well be in the EU (invariant 8 of ARCHITECTURE.md is about keeping data in its region; an
//!   unknown location is not evidence of being outside). Write `not = { in = "eu" }` to include
//!   unknown locations deliberately. A name matches a geofence or a region of that name; with a
//!   known location, `not_in = X` is exactly `not = { in = X }`.
//! - **`within_m`** holds when the location is known and the [`Distance`] to `of` is at most
//!   `within_m` metres (inclusive). A distance function returning NaN makes it false.
//! - `all` and `any` evaluate left to right and stop at the first deciding member.
//!
//! # Validation
//!
//! [`compile`] refuses, with the offending key named ([`PredicateError::path`]): a table with
//! no condition or with two kinds of condition, empty `all`/`any`/`in`/`not_in` lists, empty
//! names, `of` without `within_m` (and the reverse), `within_m` not a finite number above 0,
//! `of` not `[lat, lon]` within -90..=90 and -180..=180, malformed pointers, a comparison
//! without `field` (and `field` without any comparison), non-finite numbers, ordering a
//! boolean, comparisons of different types on one field, `exists = false` with comparisons,
//! comparisons on one field that no value can satisfy (`gt = 10, lt = 5`), and nesting deeper
//! than [`MAX_DEPTH`]. Unknown keys are refused by the TOML parser (`deny_unknown_fields`),
//! which names the key and the line.
//!
//! What this module does not do: no I/O, no geometry (point-in-polygon and geodesic distance
//! belong to the geo module, which fills in [`Facts`]), no JSON parsing (the caller parses the
//! payload once per event, and only if some route [`needs_payload`](Predicate::needs_payload)).
//! Nothing here panics on input: any payload, location or configuration gives a value or an
//! error.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

use serde::{de, Deserialize, Serialize};
use serde_json::Value;

use crate::event::Location;

/// The deepest nesting of `all`/`any`/`not` [`compile`] accepts (the root is depth 0).
pub const MAX_DEPTH: usize = 32;

/// The largest integer magnitude an `f64` holds exactly (2^53).
const MAX_EXACT_INT: u64 = 1 << 53;

/// A predicate as written in configuration (see the [module documentation](self) for the
/// syntax). Exactly one kind of condition may be set; [`compile`] checks that and everything
/// else, so a value of this type may be anything the TOML parser accepted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredicateConfig {
    /// Holds when every listed predicate holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<PredicateConfig>>,
    /// Holds when at least one listed predicate holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<PredicateConfig>>,
    /// Holds when the inner predicate does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<PredicateConfig>>,
    /// `in`: the location is known and inside at least one of these geofences or regions.
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub inside: Option<Names>,
    /// The location is known and inside none of these geofences or regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_in: Option<Names>,
    /// The location is known and at most this many metres from `of`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within_m: Option<f64>,
    /// The point `within_m` measures from: `[lat, lon]` in degrees (WGS 84).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<Vec<f64>>,
    /// The JSON pointer (RFC 6901) of the payload value the comparisons below apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The value equals this literal (same type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Literal>,
    /// The value has the literal's type and differs from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Literal>,
    /// The value is greater than this number or string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<Literal>,
    /// The value is greater than or equal to this number or string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ge: Option<Literal>,
    /// The value is less than this number or string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<Literal>,
    /// The value is less than or equal to this number or string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<Literal>,
    /// `true`: the pointer resolves to a value (`null` included); `false`: it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

/// One geofence or region name, or a list of them: `in = "eu"` or `in = ["de", "fr"]`.
///
/// Deserializes from a string or an array of strings; serializes a single name back as a
/// string. Emptiness is checked by [`compile`], not here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Names(
    /// The names, in the order written.
    pub Vec<String>,
);

impl Serialize for Names {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Names;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a geofence or region name, or an array of names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Names, E> {
                Ok(Names(vec![v.to_owned()]))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Names, E> {
                Ok(Names(vec![v]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Names, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(Names(names))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A literal a field is compared with: a number, a string or a boolean (TOML has no null).
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// Compared as `f64` with JSON numbers. From TOML, integers beyond ±2^53 are refused.
    Number(f64),
    /// Compared by code point with JSON strings.
    String(String),
    /// Compared (only `eq`/`ne`) with JSON booleans.
    Bool(bool),
}

impl Literal {
    /// The type's name, for error messages.
    fn type_name(&self) -> &'static str {
        match self {
            Literal::Number(_) => "a number",
            Literal::String(_) => "a string",
            Literal::Bool(_) => "a boolean",
        }
    }

    /// Order of two literals of the same type; `None` across types (or for NaN).
    fn order(&self, other: &Literal) -> Option<Ordering> {
        match (self, other) {
            (Literal::Number(a), Literal::Number(b)) => a.partial_cmp(b),
            (Literal::String(a), Literal::String(b)) => Some(a.as_str().cmp(b.as_str())),
            (Literal::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    /// Order of a JSON value relative to this literal; `None` when the types differ.
    fn order_of(&self, value: &Value) -> Option<Ordering> {
        match (value, self) {
            (Value::Number(n), Literal::Number(x)) => n.as_f64()?.partial_cmp(x),
            (Value::String(s), Literal::String(x)) => Some(s.as_str().cmp(x.as_str())),
            (Value::Bool(b), Literal::Bool(x)) => Some(b.cmp(x)),
            _ => None,
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(x) => write!(f, "{x}"),
            Literal::String(s) => write!(f, "{s:?}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Serialize for Literal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // Whole numbers go back out as integers, so `gt = 30` round-trips as written.
            Literal::Number(x) if x.fract() == 0.0 && x.abs() <= MAX_EXACT_INT as f64 => {
                s.serialize_i64(*x as i64)
            }
            Literal::Number(x) => s.serialize_f64(*x),
            Literal::String(v) => s.serialize_str(v),
            Literal::Bool(b) => s.serialize_bool(*b),
        }
    }
}

impl<'de> Deserialize<'de> for Literal {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl Visitor {
            fn exact<E: de::Error>(magnitude: u64, shown: &dyn fmt::Display) -> Result<(), E> {
                if magnitude > MAX_EXACT_INT {
                    Err(E::custom(format!(
                        "the integer {shown} cannot be compared exactly: numbers compare as \
                         64-bit floats, which are exact up to 2^53 (9007199254740992)"
                    )))
                } else {
                    Ok(())
                }
            }
        }
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Literal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a string or a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Literal, E> {
                Ok(Literal::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Literal, E> {
                Self::exact(v.unsigned_abs(), &v)?;
                Ok(Literal::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Literal, E> {
                Self::exact(v, &v)?;
                Ok(Literal::Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Literal, E> {
                Ok(Literal::Number(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Literal, E> {
                Ok(Literal::String(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Literal, E> {
                Ok(Literal::String(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Why a [`PredicateConfig`] could not be compiled: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}{problem}", path, if path.is_empty() { "" } else { ": " })]
pub struct PredicateError {
    /// The offending key relative to the predicate's root, e.g. `all[1].gt` or `not.of`;
    /// empty when the problem is the root table itself.
    pub path: String,
    /// What is wrong there.
    pub problem: Problem,
}

impl PredicateError {
    /// The full configuration key of the problem when the predicate sits at `root` (for
    /// example `route "hot".when` gives `route "hot".when.all[1].gt`).
    pub fn key_under(&self, root: &str) -> String {
        if self.path.is_empty() {
            root.to_owned()
        } else {
            format!("{root}.{}", self.path)
        }
    }
}

/// What is wrong with one part of a predicate's configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// A table with no condition at all.
    #[error(
        "empty predicate: give one of all, any, not, in, not_in, within_m (with of) or field \
         (with a comparison)"
    )]
    NoCondition,
    /// A table with two or more kinds of condition.
    #[error(
        "a predicate holds one kind of condition, but this one has `{first}` and `{second}`; \
         combine conditions with all = [ ... ]"
    )]
    SeveralConditions {
        /// The first key found.
        first: &'static str,
        /// The second key found, of another kind.
        second: &'static str,
    },
    /// An empty `all` or `any` list.
    #[error("must list at least one predicate")]
    EmptyList,
    /// An empty `in` or `not_in` list.
    #[error("must name at least one geofence or region")]
    NoNames,
    /// An empty (or all-whitespace) geofence or region name.
    #[error("a geofence or region name must not be empty")]
    EmptyName,
    /// `of` without `within_m`.
    #[error("`of` needs `within_m` (the distance in metres)")]
    OfWithoutWithin,
    /// `within_m` without `of`.
    #[error("`within_m` needs `of = [lat, lon]` (the point to measure from)")]
    WithinWithoutOf,
    /// A distance that is not a finite number above 0.
    #[error("must be a finite number of metres above 0, not {0}")]
    BadDistance(f64),
    /// `of` is not `[lat, lon]` with both in range.
    #[error("must be [lat, lon] in degrees with lat in -90..=90 and lon in -180..=180: {0}")]
    BadPoint(String),
    /// A malformed JSON pointer.
    #[error("{pointer:?} is not a JSON pointer (RFC 6901): {reason}")]
    BadPointer {
        /// The pointer as written.
        pointer: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `field` without any comparison.
    #[error("`field` needs at least one of eq, ne, gt, ge, lt, le, exists")]
    NoComparison,
    /// A comparison without `field`.
    #[error("`{op}` needs `field` (the JSON pointer of the value to compare)")]
    ComparisonWithoutField {
        /// The comparison key.
        op: &'static str,
    },
    /// A NaN or infinite number.
    #[error("must be a finite number, not {0}")]
    NotFinite(f64),
    /// `gt`/`ge`/`lt`/`le` with a boolean.
    #[error("booleans are only compared with eq and ne")]
    OrderedBool,
    /// Two comparisons on one field with literals of different types.
    #[error(
        "is {this_type} but `{other}` is {other_type}; a field has one type, so they can never \
         both hold"
    )]
    MixedTypes {
        /// This literal's type.
        this_type: &'static str,
        /// The earlier comparison key.
        other: &'static str,
        /// Its literal's type.
        other_type: &'static str,
    },
    /// `exists = false` together with a comparison.
    #[error(
        "`exists = false` cannot be combined with `{op}`: a missing field fails every comparison"
    )]
    AbsentAndCompared {
        /// The comparison key.
        op: &'static str,
    },
    /// Comparisons on one field that no value satisfies.
    #[error("no value satisfies {0}")]
    NeverHolds(String),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("predicates nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

fn fail<T>(path: impl Into<String>, problem: Problem) -> Result<T, PredicateError> {
    Err(PredicateError {
        path: path.into(),
        problem,
    })
}

/// Joins a path and a key: `("", "gt")` gives `gt`, `("all[1]", "gt")` gives `all[1].gt`.
fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The distance between two WGS 84 points, in metres.
///
/// The geo module plugs in its geodesic distance; any `Fn(lat1, lon1, lat2, lon2) -> f64`
/// (degrees in, metres out) is a `Distance`. Implementations must not panic on valid
/// coordinates; a NaN result makes `within_m` false.
pub trait Distance {
    /// Metres between `from` and `to`.
    fn metres(&self, from: Location, to: Location) -> f64;

    /// Whether `to` is at most `limit` metres from `from`. Implementations may answer without
    /// computing the exact distance, but must give the same answer as `metres`.
    fn within(&self, from: Location, to: Location, limit: f64) -> bool {
        self.metres(from, to) <= limit
    }
}

impl<F: Fn(f64, f64, f64, f64) -> f64> Distance for F {
    fn metres(&self, from: Location, to: Location) -> f64 {
        self(from.lat, from.lon, to.lat, to.lon)
    }
}

/// What the router knows about one event, everything a [`Predicate`] may look at.
///
/// The names may be any string type: `String`, `&str`, or the geo module's `Arc<str>`
/// (so that a `Placement`'s vectors can be lent without copying).
pub struct Facts<'a, S: AsRef<str> = String> {
    /// The payload parsed as JSON, or `None` when it is not JSON (or was not parsed because
    /// no predicate [`needs_payload`](Predicate::needs_payload)).
    pub payload: Option<&'a Value>,
    /// The event's location, already validated (lat -90..=90, lon -180..=180), if known.
    pub location: Option<Location>,
    /// Names of the geofences containing the location (any order; empty without location).
    pub fences: &'a [S],
    /// Names of the regions containing the location (any order; empty without location).
    pub regions: &'a [S],
    /// The distance used by `within_m`.
    pub distance: &'a dyn Distance,
}

impl<S: AsRef<str>> Clone for Facts<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S: AsRef<str>> Copy for Facts<'_, S> {}

impl<S: AsRef<str>> fmt::Debug for Facts<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |list: &[S]| {
            list.iter()
                .map(|n| n.as_ref().to_owned())
                .collect::<Vec<_>>()
        };
        f.debug_struct("Facts")
            .field("payload", &self.payload)
            .field("location", &self.location)
            .field("fences", &names(self.fences))
            .field("regions", &names(self.regions))
            .finish_non_exhaustive()
    }
}

impl<S: AsRef<str>> Facts<'_, S> {
    /// Whether `name` is one of the event's geofences or regions.
    fn contains(&self, name: &str) -> bool {
        self.fences
            .iter()
            .chain(self.regions)
            .any(|n| n.as_ref() == name)
    }
}

/// A compiled JSON pointer: its reference tokens, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pointer {
    /// The pointer as written.
    text: String,
    /// `~1` and `~0` already resolved.
    tokens: Vec<String>,
}

impl Pointer {
    fn parse(text: &str) -> Result<Pointer, Problem> {
        let bad = |reason| Problem::BadPointer {
            pointer: text.to_owned(),
            reason,
        };
        let Some(rest) = text.strip_prefix('/') else {
            return if text.is_empty() {
                Ok(Pointer {
                    text: String::new(),
                    tokens: Vec::new(),
                })
            } else {
                Err(bad(
                    "it must be empty (the whole payload) or start with '/'",
                ))
            };
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => return Err(bad("'~' must be followed by 0 or 1")),
                    }
                } else {
                    token.push(c);
                }
            }
            tokens.push(token);
        }
        Ok(Pointer {
            text: text.to_owned(),
            tokens,
        })
    }

    /// The value this pointer refers to in `root`, if there is one. Iterative: any depth.
    fn resolve<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        let mut value = root;
        for token in &self.tokens {
            value = match value {
                Value::Object(map) => map.get(token.as_str())?,
                Value::Array(items) => items.get(array_index(token)?)?,
                _ => return None,
            };
        }
        Some(value)
    }
}

/// An RFC 6901 array index: decimal digits, no leading zero except `0` itself.
fn array_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Op {
    fn key(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Gt => "gt",
            Op::Ge => "ge",
            Op::Lt => "lt",
            Op::Le => "le",
        }
    }

    /// Whether `value <op> literal` holds, given `value.cmp(literal)`.
    fn accepts(self, order: Ordering) -> bool {
        match self {
            Op::Eq => order == Ordering::Equal,
            Op::Ne => order != Ordering::Equal,
            Op::Gt => order == Ordering::Greater,
            Op::Ge => order != Ordering::Less,
            Op::Lt => order == Ordering::Less,
            Op::Le => order != Ordering::Greater,
        }
    }
}

/// One test on a field's value.
#[derive(Debug, Clone, PartialEq)]
enum Test {
    /// The pointer resolves (`true`) or does not (`false`).
    Exists(bool),
    /// The value has the literal's type and compares as the operator says.
    Compare(Op, Literal),
}

impl Test {
    fn holds(&self, value: Option<&Value>) -> bool {
        match self {
            Test::Exists(want) => value.is_some() == *want,
            Test::Compare(op, literal) => value
                .and_then(|v| literal.order_of(v))
                .is_some_and(|order| op.accepts(order)),
        }
    }
}

/// The compiled tree.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    In(Vec<String>),
    NotIn(Vec<String>),
    Within { metres: f64, of: Location },
    Field { pointer: Pointer, tests: Vec<Test> },
}

impl Node {
    fn eval<S: AsRef<str>>(&self, facts: &Facts<'_, S>) -> bool {
        match self {
            Node::All(nodes) => nodes.iter().all(|n| n.eval(facts)),
            Node::Any(nodes) => nodes.iter().any(|n| n.eval(facts)),
            Node::Not(node) => !node.eval(facts),
            Node::In(names) => facts.location.is_some() && names.iter().any(|n| facts.contains(n)),
            Node::NotIn(names) => {
                facts.location.is_some() && !names.iter().any(|n| facts.contains(n))
            }
            Node::Within { metres, of } => facts
                .location
                .is_some_and(|here| facts.distance.within(here, *of, *metres)),
            Node::Field { pointer, tests } => {
                let value = facts.payload.and_then(|root| pointer.resolve(root));
                tests.iter().all(|t| t.holds(value))
            }
        }
    }

    /// See [`Predicate::excluded_names`].
    fn excluded(&self) -> BTreeSet<&str> {
        match self {
            Node::NotIn(names) => names.iter().map(String::as_str).collect(),
            Node::Not(node) => match node.as_ref() {
                Node::In(names) => names.iter().map(String::as_str).collect(),
                _ => BTreeSet::new(),
            },
            Node::All(nodes) => nodes.iter().flat_map(|n| n.excluded()).collect(),
            Node::Any(nodes) => {
                let mut sets = nodes.iter().map(|n| n.excluded());
                let first = sets.next().unwrap_or_default();
                sets.fold(first, |acc, s| acc.intersection(&s).copied().collect())
            }
            Node::In(_) | Node::Within { .. } | Node::Field { .. } => BTreeSet::new(),
        }
    }

    /// See [`Predicate::required_memberships`].
    fn required(&self) -> Option<Vec<BTreeSet<&str>>> {
        /// Beyond this many alternatives the analysis gives up (says "no requirement").
        const MAX_ALTERNATIVES: usize = 256;
        match self {
            Node::In(names) => Some(names.iter().map(|n| BTreeSet::from([n.as_str()])).collect()),
            Node::Any(nodes) => {
                let mut out = Vec::new();
                for node in nodes {
                    out.extend(node.required()?);
                }
                (out.len() <= MAX_ALTERNATIVES).then_some(out)
            }
            Node::All(nodes) => {
                let mut out: Option<Vec<BTreeSet<&str>>> = None;
                for node in nodes {
                    let Some(alternatives) = node.required() else {
                        continue;
                    };
                    out = Some(match out {
                        None => alternatives,
                        Some(so_far) => {
                            let mut product = Vec::new();
                            for a in &so_far {
                                for b in &alternatives {
                                    product.push(a.union(b).copied().collect());
                                }
                            }
                            if product.len() > MAX_ALTERNATIVES {
                                return None;
                            }
                            product
                        }
                    });
                }
                out
            }
            Node::Not(_) | Node::NotIn(_) | Node::Within { .. } | Node::Field { .. } => None,
        }
    }

    /// Visits this node and every node below it.
    fn any_node(&self, f: &dyn Fn(&Node) -> bool) -> bool {
        f(self)
            || match self {
                Node::All(nodes) | Node::Any(nodes) => nodes.iter().any(|n| n.any_node(f)),
                Node::Not(node) => node.any_node(f),
                _ => false,
            }
    }

    fn collect_names<'a>(&'a self, out: &mut BTreeSet<&'a str>) {
        match self {
            Node::All(nodes) | Node::Any(nodes) => nodes.iter().for_each(|n| n.collect_names(out)),
            Node::Not(node) => node.collect_names(out),
            Node::In(names) | Node::NotIn(names) => out.extend(names.iter().map(String::as_str)),
            Node::Within { .. } | Node::Field { .. } => {}
        }
    }
}

/// A compiled, validated route predicate. Only [`compile`] makes one.
///
/// Evaluation is a pure function of the [`Facts`]: no I/O, no allocation, no panic, and
/// bounded recursion (at most [`MAX_DEPTH`] levels).
#[derive(Debug, Clone, PartialEq)]
pub struct Predicate {
    root: Node,
}

impl Predicate {
    /// Whether the event described by `facts` satisfies the predicate (semantics in the
    /// [module documentation](self)). Never panics, whatever the payload or location.
    pub fn evaluate<S: AsRef<str>>(&self, facts: &Facts<'_, S>) -> bool {
        self.root.eval(facts)
    }

    /// Every geofence or region name the predicate refers to (in `in` and `not_in`), sorted
    /// and without duplicates, so that `config check` can verify each one exists.
    pub fn names(&self) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        self.root.collect_names(&mut out);
        out
    }

    /// What membership an event must have to satisfy the predicate, as alternatives: every
    /// such event is inside all the names of at least one of the returned sets. `None` when
    /// the predicate requires no membership (or the alternatives would be too many to list).
    /// `config check` uses it to refuse a route whose events its link could never carry.
    pub fn required_memberships(&self) -> Option<Vec<BTreeSet<&str>>> {
        self.root.required()
    }

    /// The names no event satisfying the predicate is inside (from `not_in`, and `not` of an
    /// `in`), sorted. `config check` uses it to not warn about regions a route excludes.
    pub fn excluded_names(&self) -> BTreeSet<&str> {
        self.root.excluded()
    }

    /// Whether the predicate looks at the location at all (`in`, `not_in`, `within_m`).
    /// When false, the result does not depend on `location`, `fences`, `regions` or
    /// `distance`.
    pub fn needs_location(&self) -> bool {
        self.root
            .any_node(&|n| matches!(n, Node::In(_) | Node::NotIn(_) | Node::Within { .. }))
    }

    /// Whether the predicate looks at geofence or region membership (`in`, `not_in`). When
    /// false, the result does not depend on `fences` or `regions`, so the spatial lookup can be
    /// skipped (a `within_m` needs only the location).
    pub fn needs_membership(&self) -> bool {
        self.root
            .any_node(&|n| matches!(n, Node::In(_) | Node::NotIn(_)))
    }

    /// Whether the predicate looks at the payload (`field`). When false, the result does not
    /// depend on `payload`, so the caller need not parse it.
    pub fn needs_payload(&self) -> bool {
        self.root.any_node(&|n| matches!(n, Node::Field { .. }))
    }
}

/// Compiles and validates a predicate (see the [module documentation](self) for what is
/// refused). Errors name the offending key relative to the predicate's root.
pub fn compile(config: &PredicateConfig) -> Result<Predicate, PredicateError> {
    compile_node(config, "", 0).map(|root| Predicate { root })
}

fn compile_node(c: &PredicateConfig, path: &str, depth: usize) -> Result<Node, PredicateError> {
    if depth > MAX_DEPTH {
        return fail(path, Problem::TooDeep);
    }
    let comparisons = [
        (Op::Eq, &c.eq),
        (Op::Ne, &c.ne),
        (Op::Gt, &c.gt),
        (Op::Ge, &c.ge),
        (Op::Lt, &c.lt),
        (Op::Le, &c.le),
    ];
    let field_key = if c.field.is_some() {
        Some("field")
    } else if let Some((op, _)) = comparisons.iter().find(|(_, l)| l.is_some()) {
        Some(op.key())
    } else if c.exists.is_some() {
        Some("exists")
    } else {
        None
    };
    let within_key = if c.within_m.is_some() {
        Some("within_m")
    } else if c.of.is_some() {
        Some("of")
    } else {
        None
    };
    let kinds: Vec<&'static str> = [
        c.all.as_ref().map(|_| "all"),
        c.any.as_ref().map(|_| "any"),
        c.not.as_ref().map(|_| "not"),
        c.inside.as_ref().map(|_| "in"),
        c.not_in.as_ref().map(|_| "not_in"),
        within_key,
        field_key,
    ]
    .into_iter()
    .flatten()
    .collect();
    let kind = match kinds.as_slice() {
        [] => return fail(path, Problem::NoCondition),
        [one] => *one,
        [first, second, ..] => return fail(path, Problem::SeveralConditions { first, second }),
    };

    if let Some(list) = c.all.as_ref().or(c.any.as_ref()) {
        let key = if c.all.is_some() { "all" } else { "any" };
        if list.is_empty() {
            return fail(join(path, key), Problem::EmptyList);
        }
        let nodes = list
            .iter()
            .enumerate()
            .map(|(i, p)| compile_node(p, &format!("{}[{i}]", join(path, key)), depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(if c.all.is_some() {
            Node::All(nodes)
        } else {
            Node::Any(nodes)
        });
    }
    if let Some(inner) = &c.not {
        return Ok(Node::Not(Box::new(compile_node(
            inner,
            &join(path, "not"),
            depth + 1,
        )?)));
    }
    if let Some(names) = c.inside.as_ref().or(c.not_in.as_ref()) {
        let names = compile_names(names, &join(path, kind))?;
        return Ok(if c.inside.is_some() {
            Node::In(names)
        } else {
            Node::NotIn(names)
        });
    }
    if within_key.is_some() {
        return compile_within(c, path);
    }
    compile_field(c, path, &comparisons)
}

fn compile_names(names: &Names, path: &str) -> Result<Vec<String>, PredicateError> {
    if names.0.is_empty() {
        return fail(path, Problem::NoNames);
    }
    let mut out: Vec<String> = Vec::with_capacity(names.0.len());
    for (i, name) in names.0.iter().enumerate() {
        if name.trim().is_empty() {
            let at = if names.0.len() == 1 {
                path.to_owned()
            } else {
                format!("{path}[{i}]")
            };
            return fail(at, Problem::EmptyName);
        }
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    Ok(out)
}

fn compile_within(c: &PredicateConfig, path: &str) -> Result<Node, PredicateError> {
    let (metres, of) = match (c.within_m, &c.of) {
        (Some(m), Some(of)) => (m, of),
        (None, _) => return fail(join(path, "of"), Problem::OfWithoutWithin),
        (Some(_), None) => return fail(join(path, "within_m"), Problem::WithinWithoutOf),
    };
    if !(metres.is_finite() && metres > 0.0) {
        return fail(join(path, "within_m"), Problem::BadDistance(metres));
    }
    let bad_point = |what: String| fail(join(path, "of"), Problem::BadPoint(what));
    let &[lat, lon] = of.as_slice() else {
        return bad_point(format!("expected 2 numbers, got {}", of.len()));
    };
    if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
        return bad_point(format!("lat is {lat}"));
    }
    if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
        return bad_point(format!("lon is {lon}"));
    }
    Ok(Node::Within {
        metres,
        of: Location { lat, lon },
    })
}

fn compile_field(
    c: &PredicateConfig,
    path: &str,
    comparisons: &[(Op, &Option<Literal>)],
) -> Result<Node, PredicateError> {
    let given: Vec<(Op, &Literal)> = comparisons
        .iter()
        .filter_map(|(op, l)| l.as_ref().map(|l| (*op, l)))
        .collect();
    let Some(field) = &c.field else {
        let op = given.first().map_or("exists", |(op, _)| op.key());
        return fail(join(path, op), Problem::ComparisonWithoutField { op });
    };
    let pointer = Pointer::parse(field).map_err(|problem| PredicateError {
        path: join(path, "field"),
        problem,
    })?;
    if given.is_empty() && c.exists.is_none() {
        return fail(join(path, "field"), Problem::NoComparison);
    }
    for (i, &(op, literal)) in given.iter().enumerate() {
        let at = join(path, op.key());
        match literal {
            Literal::Number(x) if !x.is_finite() => return fail(at, Problem::NotFinite(*x)),
            Literal::Bool(_) if !matches!(op, Op::Eq | Op::Ne) => {
                return fail(at, Problem::OrderedBool)
            }
            _ => {}
        }
        if let Some((other, first)) = given[..i]
            .iter()
            .find(|(_, l)| l.type_name() != literal.type_name())
        {
            return fail(
                at,
                Problem::MixedTypes {
                    this_type: literal.type_name(),
                    other: other.key(),
                    other_type: first.type_name(),
                },
            );
        }
        if c.exists == Some(false) {
            return fail(at, Problem::AbsentAndCompared { op: op.key() });
        }
    }
    if let Some(reason) = unsatisfiable(&given) {
        return fail(join(path, "field"), Problem::NeverHolds(reason));
    }
    let mut tests: Vec<Test> = c.exists.map(Test::Exists).into_iter().collect();
    tests.extend(
        given
            .into_iter()
            .map(|(op, literal)| Test::Compare(op, literal.clone())),
    );
    Ok(Node::Field { pointer, tests })
}

/// Why no value satisfies all of `given` (literals of one type, finite), if that is so.
fn unsatisfiable(given: &[(Op, &Literal)]) -> Option<String> {
    let find = |op: Op| given.iter().find(|(o, _)| *o == op).map(|(_, l)| *l);
    let describe = |a: Op, x: &Literal, b: Op, y: &Literal| {
        Some(format!("{} = {x} and {} = {y}", a.key(), b.key()))
    };
    // The tightest lower and upper bounds: (op, literal); on a tie the exclusive one wins.
    let tightest = |strict: Op, loose: Op, wanted: Ordering| match (find(strict), find(loose)) {
        (Some(s), Some(l)) => match l.order(s) {
            Some(o) if o == wanted => Some((loose, l)),
            _ => Some((strict, s)),
        },
        (Some(s), None) => Some((strict, s)),
        (None, Some(l)) => Some((loose, l)),
        (None, None) => None,
    };
    let lower = tightest(Op::Gt, Op::Ge, Ordering::Greater);
    let upper = tightest(Op::Lt, Op::Le, Ordering::Less);
    if let (Some((lo_op, lo)), Some((hi_op, hi))) = (lower, upper) {
        let empty = match lo.order(hi) {
            Some(Ordering::Greater) => true,
            Some(Ordering::Equal) => lo_op == Op::Gt || hi_op == Op::Lt,
            _ => false,
        };
        if empty {
            return describe(lo_op, lo, hi_op, hi);
        }
        if let Some(ne) = find(Op::Ne) {
            let point = lo_op == Op::Ge && hi_op == Op::Le && lo.order(hi) == Some(Ordering::Equal);
            if point && ne.order(lo) == Some(Ordering::Equal) {
                return Some(format!("ge = {lo}, le = {hi} and ne = {ne}"));
            }
        }
    }
    if let Some(eq) = find(Op::Eq) {
        for (op, literal) in given {
            let holds = eq.order(literal).is_some_and(|o| op.accepts(o));
            if !holds {
                return describe(Op::Eq, eq, *op, literal);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Great-circle distance on a sphere of the mean Earth radius; the tests' stand-in for the
    /// geo module's geodesic distance.
    fn haversine(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
        const R: f64 = 6_371_008.8;
        let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
        let dp = p2 - p1;
        let dl = (lon2 - lon1).to_radians();
        let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
        2.0 * R * a.sqrt().min(1.0).asin()
    }

    const BERLIN: Location = Location {
        lat: 52.52,
        lon: 13.405,
    };
    const POTSDAM: Location = Location {
        lat: 52.3906,
        lon: 13.0645,
    };

    fn parse(text: &str) -> Result<PredicateConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn pred(text: &str) -> Predicate {
        let config = parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
        compile(&config).unwrap_or_else(|e| panic!("{text:?} should compile: {e}"))
    }

    fn compile_err(text: &str) -> PredicateError {
        let config = parse(text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
        match compile(&config) {
            Ok(p) => panic!("{text:?} should not compile, got {p:?}"),
            Err(e) => e,
        }
    }

    /// An event's facts, owned.
    #[derive(Clone, Debug)]
    struct World {
        payload: Option<Value>,
        location: Option<Location>,
        fences: Vec<String>,
        regions: Vec<String>,
    }

    impl World {
        fn new() -> World {
            World {
                payload: None,
                location: None,
                fences: Vec::new(),
                regions: Vec::new(),
            }
        }
        fn json(mut self, v: Value) -> World {
            self.payload = Some(v);
            self
        }
        fn at(mut self, l: Location, fences: &[&str], regions: &[&str]) -> World {
            self.location = Some(l);
            self.fences = fences.iter().map(|s| s.to_string()).collect();
            self.regions = regions.iter().map(|s| s.to_string()).collect();
            self
        }
        fn facts(&self) -> Facts<'_> {
            Facts {
                payload: self.payload.as_ref(),
                location: self.location,
                fences: &self.fences,
                regions: &self.regions,
                distance: &haversine,
            }
        }
        fn eval(&self, p: &Predicate) -> bool {
            p.evaluate(&self.facts())
        }
    }

    fn on(v: Value) -> World {
        World::new().json(v)
    }

    // ---- syntax ----

    #[test]
    fn every_documented_shape_parses_and_compiles() {
        #[derive(Deserialize)]
        struct Wrap {
            when: PredicateConfig,
        }
        for inner in [
            r#"all = [ { in = "eu" }, { field = "/temp_c", gt = 30 } ]"#,
            r#"any = [ { in = ["de", "at", "ch"] }, { within_m = 500, of = [52.52, 13.405] } ]"#,
            r#"not = { in = "yard" }"#,
            r#"not_in = "yard""#,
            r#"not_in = ["yard", "depot"]"#,
            r#"within_m = 500, of = [52.52, 13.405]"#,
            r#"within_m = 0.5, of = [-90, 180]"#,
            r#"field = "/status", eq = "alarm""#,
            r#"field = "/status", ne = "ok""#,
            r#"field = "/battery/low", eq = true"#,
            r#"field = "/x", exists = true"#,
            r#"field = "/x", exists = false"#,
            r#"field = "/n", ge = 1, lt = 10"#,
            r#"field = "/n", exists = true, gt = -1.5"#,
            r#"field = "/ts", ge = "2026-01-01T00:00:00Z""#,
            r#"field = "/readings/0/v", le = -5.5"#,
            r#"field = "", eq = 3"#,
        ] {
            let text = format!("when = {{ {inner} }}");
            let wrapped: Wrap =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"));
            compile(&wrapped.when).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
    }

    #[test]
    fn route_table_form_parses() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Route {
            name: String,
            when: Option<PredicateConfig>,
        }
        #[derive(Deserialize)]
        struct File {
            route: Vec<Route>,
        }
        let text = r#"
            [[route]]
            name = "hot-in-eu"
            [route.when]
            all = [ { in = "eu" }, { field = "/temp_c", gt = 30 } ]

            [[route]]
            name = "plain"

            [[route]]
            name = "near"
            [route.when.not]
            within_m = 500
            of = [52.52, 13.405]
        "#;
        let file: File = toml::from_str(text).unwrap();
        assert_eq!(file.route.len(), 3);
        assert_eq!(file.route[0].name, "hot-in-eu");
        let hot = compile(file.route[0].when.as_ref().unwrap()).unwrap();
        assert!(file.route[1].when.is_none());
        let near = compile(file.route[2].when.as_ref().unwrap()).unwrap();

        let berlin = |temp: f64| on(json!({"temp_c": temp})).at(BERLIN, &["de"], &["eu"]);
        assert!(berlin(31.0).eval(&hot));
        assert!(!berlin(30.0).eval(&hot));
        assert!(!on(json!({"temp_c": 31})).eval(&hot), "no location");
        assert!(!berlin(0.0).eval(&near));
        assert!(on(json!({})).at(POTSDAM, &[], &[]).eval(&near));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named_by_the_parser() {
        let e = parse("field = \"/x\"\ngte = 3").unwrap_err();
        assert!(e.contains("gte"), "{e}");
        let e = parse("all = [ { in = \"eu\", inn = 1 } ]").unwrap_err();
        assert!(e.contains("inn"), "{e}");
        let e = parse("in = 3").unwrap_err();
        assert!(e.contains("geofence or region name"), "{e}");
        let e = parse("in = [\"a\", 3]").unwrap_err();
        assert!(e.contains("string"), "{e}");
        let e = parse("field = \"/x\"\neq = [1]").unwrap_err();
        assert!(e.contains("a number, a string or a boolean"), "{e}");
        let e = parse("field = \"/x\"\neq = 1979-05-27").unwrap_err();
        assert!(e.contains("a number, a string or a boolean"), "{e}");
        let e = parse("within_m = \"far\"\nof = [0, 0]").unwrap_err();
        assert!(e.contains("within_m"), "{e}");
        let e = parse("field = \"/x\"\neq = 9007199254740993").unwrap_err();
        assert!(e.contains("2^53"), "{e}");
        assert!(parse("field = \"/x\"\neq = 9007199254740992").is_ok());
        assert!(parse("field = \"/x\"\neq = -9007199254740992").is_ok());
    }

    #[test]
    fn toml_round_trip_keeps_the_config() {
        for text in [
            "all = [ { in = \"eu\" }, { field = \"/temp_c\", gt = 30 } ]",
            "in = [\"a\", \"b\"]",
            "not = { not_in = \"yard\" }",
            "within_m = 12.5\nof = [1.5, -2]",
            "field = \"/n\"\nge = 1.25\nlt = 10\nexists = true",
            "field = \"/s\"\nne = \"ok\"",
        ] {
            let config = parse(text).unwrap();
            let out = toml::to_string(&config).unwrap();
            assert_eq!(parse(&out).unwrap(), config, "{text:?} -> {out:?}");
        }
        assert_eq!(
            toml::to_string(&parse("in = [\"a\"]").unwrap()).unwrap(),
            "in = \"a\"\n"
        );
        let out = toml::to_string(&parse("field = \"/n\"\ngt = 30").unwrap()).unwrap();
        assert!(out.contains("gt = 30\n"), "{out}");
    }

    // ---- validation ----

    #[test]
    fn validation_errors_name_the_key_and_the_problem() {
        let cases: &[(&str, &str, Problem)] = &[
            ("", "", Problem::NoCondition),
            ("not = {}", "not", Problem::NoCondition),
            (
                "in = \"eu\"\nfield = \"/x\"\ngt = 1",
                "",
                Problem::SeveralConditions {
                    first: "in",
                    second: "field",
                },
            ),
            (
                "all = [ { in = \"eu\", gt = 1 } ]",
                "all[0]",
                Problem::SeveralConditions {
                    first: "in",
                    second: "gt",
                },
            ),
            (
                "all = []\nany = []",
                "",
                Problem::SeveralConditions {
                    first: "all",
                    second: "any",
                },
            ),
            ("all = []", "all", Problem::EmptyList),
            ("any = [ { all = [] } ]", "any[0].all", Problem::EmptyList),
            ("in = []", "in", Problem::NoNames),
            ("not_in = \" \"", "not_in", Problem::EmptyName),
            ("in = [\"a\", \"\"]", "in[1]", Problem::EmptyName),
            ("of = [1, 2]", "of", Problem::OfWithoutWithin),
            ("within_m = 5", "within_m", Problem::WithinWithoutOf),
            (
                "within_m = 0\nof = [0, 0]",
                "within_m",
                Problem::BadDistance(0.0),
            ),
            (
                "within_m = -1\nof = [0, 0]",
                "within_m",
                Problem::BadDistance(-1.0),
            ),
            (
                "within_m = inf\nof = [0, 0]",
                "within_m",
                Problem::BadDistance(f64::INFINITY),
            ),
            (
                "within_m = 1\nof = [0]",
                "of",
                Problem::BadPoint("expected 2 numbers, got 1".into()),
            ),
            (
                "within_m = 1\nof = [91, 0]",
                "of",
                Problem::BadPoint("lat is 91".into()),
            ),
            (
                "within_m = 1\nof = [0, -180.5]",
                "of",
                Problem::BadPoint("lon is -180.5".into()),
            ),
            (
                "within_m = 1\nof = [nan, 0]",
                "of",
                Problem::BadPoint("lat is NaN".into()),
            ),
            (
                "field = \"temp\"\ngt = 1",
                "field",
                Problem::BadPointer {
                    pointer: "temp".into(),
                    reason: "it must be empty (the whole payload) or start with '/'",
                },
            ),
            (
                "field = \"/a~2b\"\ngt = 1",
                "field",
                Problem::BadPointer {
                    pointer: "/a~2b".into(),
                    reason: "'~' must be followed by 0 or 1",
                },
            ),
            (
                "field = \"/a~\"\ngt = 1",
                "field",
                Problem::BadPointer {
                    pointer: "/a~".into(),
                    reason: "'~' must be followed by 0 or 1",
                },
            ),
            ("field = \"/x\"", "field", Problem::NoComparison),
            ("gt = 1", "gt", Problem::ComparisonWithoutField { op: "gt" }),
            (
                "exists = true",
                "exists",
                Problem::ComparisonWithoutField { op: "exists" },
            ),
            (
                "not = { field = \"/x\", gt = nan }",
                "not.gt",
                Problem::NotFinite(f64::NAN),
            ),
            (
                "field = \"/x\"\nlt = -inf",
                "lt",
                Problem::NotFinite(f64::NEG_INFINITY),
            ),
            ("field = \"/x\"\ngt = true", "gt", Problem::OrderedBool),
            (
                "field = \"/x\"\ngt = 1\nlt = \"z\"",
                "lt",
                Problem::MixedTypes {
                    this_type: "a string",
                    other: "gt",
                    other_type: "a number",
                },
            ),
            (
                "field = \"/x\"\neq = true\nne = 3",
                "ne",
                Problem::MixedTypes {
                    this_type: "a number",
                    other: "eq",
                    other_type: "a boolean",
                },
            ),
            (
                "field = \"/x\"\nexists = false\neq = 3",
                "eq",
                Problem::AbsentAndCompared { op: "eq" },
            ),
            (
                "field = \"/x\"\ngt = 10\nlt = 5",
                "field",
                Problem::NeverHolds("gt = 10 and lt = 5".into()),
            ),
            (
                "field = \"/x\"\ngt = 5\nle = 5",
                "field",
                Problem::NeverHolds("gt = 5 and le = 5".into()),
            ),
            (
                "field = \"/x\"\nge = 5\nlt = 5",
                "field",
                Problem::NeverHolds("ge = 5 and lt = 5".into()),
            ),
            (
                "field = \"/x\"\ngt = 1\nge = 7\nle = 6",
                "field",
                Problem::NeverHolds("ge = 7 and le = 6".into()),
            ),
            (
                "field = \"/x\"\nge = 5\nle = 5\nne = 5",
                "field",
                Problem::NeverHolds("ge = 5, le = 5 and ne = 5".into()),
            ),
            (
                "field = \"/x\"\neq = \"a\"\nne = \"a\"",
                "field",
                Problem::NeverHolds("eq = \"a\" and ne = \"a\"".into()),
            ),
            (
                "field = \"/x\"\neq = \"b\"\ngt = \"c\"",
                "field",
                Problem::NeverHolds("eq = \"b\" and gt = \"c\"".into()),
            ),
        ];
        for (text, path, problem) in cases {
            let e = compile_err(text);
            if let (Problem::NotFinite(a), Problem::NotFinite(b)) = (&e.problem, problem) {
                assert!(a.is_nan() && b.is_nan() || a == b, "{text:?}: {e}");
                assert_eq!(e.path, *path, "{text:?}");
                continue;
            }
            assert_eq!(
                (e.path.as_str(), &e.problem),
                (*path, problem),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn satisfiable_ranges_compile() {
        for text in [
            "field = \"/x\"\nge = 5\nle = 5",
            "field = \"/x\"\ngt = 1\nge = 1\nlt = 2",
            "field = \"/x\"\neq = 5\nge = 5\nlt = 6\nne = 4",
            "field = \"/x\"\ngt = \"a\"\nlt = \"b\"",
            "field = \"/x\"\neq = false\nne = true",
            "field = \"/x\"\nexists = true\neq = 1",
        ] {
            pred(text);
        }
    }

    #[test]
    fn error_display_and_keys() {
        let e = compile_err("all = [ { in = \"eu\" }, { field = \"/t\", gt = true } ]");
        assert_eq!(e.path, "all[1].gt");
        assert_eq!(
            e.to_string(),
            "all[1].gt: booleans are only compared with eq and ne"
        );
        assert_eq!(
            e.key_under("route \"hot\".when"),
            "route \"hot\".when.all[1].gt"
        );
        let root = compile_err("");
        assert!(root.to_string().starts_with("empty predicate"), "{root}");
        assert_eq!(root.key_under("route \"r\".when"), "route \"r\".when");
        let several = compile_err("in = \"eu\"\nwithin_m = 1\nof = [0, 0]");
        assert_eq!(
            several.to_string(),
            "a predicate holds one kind of condition, but this one has `in` and `within_m`; \
             combine conditions with all = [ ... ]"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut config = parse("in = \"eu\"").unwrap();
        for _ in 0..MAX_DEPTH {
            config = PredicateConfig {
                not: Some(Box::new(config)),
                ..Default::default()
            };
        }
        assert!(compile(&config).is_ok());
        let deeper = PredicateConfig {
            all: Some(vec![config]),
            ..Default::default()
        };
        let e = compile(&deeper).unwrap_err();
        assert_eq!(e.problem, Problem::TooDeep);
        assert!(e.path.starts_with("all[0].not.not"), "{}", e.path);
    }

    // ---- evaluation: geography ----

    #[test]
    fn in_and_not_in() {
        let eu = pred("in = \"eu\"");
        let not_eu = pred("not_in = \"eu\"");
        let yard = pred("in = \"yard\"");
        let either = pred("in = [\"fr\", \"de\"]");
        let neither = pred("not_in = [\"fr\", \"de\"]");
        let berlin = World::new().at(BERLIN, &["de", "yard"], &["eu"]);
        let chicago = World::new().at(
            Location {
                lat: 41.88,
                lon: -87.63,
            },
            &["us"],
            &["na"],
        );
        let sea = World::new().at(
            Location {
                lat: 0.0,
                lon: -30.0,
            },
            &[],
            &[],
        );
        let unknown = World::new();
        assert!(berlin.eval(&eu) && berlin.eval(&yard) && berlin.eval(&either));
        assert!(!berlin.eval(&not_eu) && !berlin.eval(&neither));
        assert!(!chicago.eval(&eu) && chicago.eval(&not_eu) && chicago.eval(&neither));
        assert!(!sea.eval(&eu) && sea.eval(&not_eu));
        // Unknown location: neither in nor not in anything; `not in` includes it.
        assert!(!unknown.eval(&eu) && !unknown.eval(&not_eu));
        assert!(unknown.eval(&pred("not = { in = \"eu\" }")));
        // Names given without a location are still not evidence of a location.
        let mut tagged = World::new();
        tagged.regions = vec!["eu".into()];
        assert!(!tagged.eval(&eu));
    }

    #[test]
    fn names_may_be_any_string_type() {
        use std::sync::Arc;
        let p = pred("all = [ { in = \"eu\" }, { not_in = \"yard\" } ]");
        let fences: Vec<Arc<str>> = vec![Arc::from("de")];
        let regions: Vec<Arc<str>> = vec![Arc::from("eu")];
        let facts = Facts {
            payload: None,
            location: Some(BERLIN),
            fences: &fences,
            regions: &regions,
            distance: &haversine,
        };
        assert!(p.evaluate(&facts));
        let borrowed: [&str; 2] = ["yard", "eu"];
        assert!(!p.evaluate(&Facts {
            fences: &borrowed[..1],
            regions: &borrowed[1..],
            payload: None,
            location: Some(BERLIN),
            distance: &haversine,
        }));
        assert!(format!("{facts:?}").contains("\"de\""));
    }

    #[test]
    fn within_distance() {
        // Berlin to Potsdam is about 27 km.
        let d = haversine(BERLIN.lat, BERLIN.lon, POTSDAM.lat, POTSDAM.lon);
        assert!((26_000.0..28_000.0).contains(&d), "{d}");
        let near_berlin = |m: u32| pred(&format!("within_m = {m}\nof = [52.52, 13.405]"));
        let potsdam = World::new().at(POTSDAM, &[], &[]);
        assert!(potsdam.eval(&near_berlin(30_000)));
        assert!(!potsdam.eval(&near_berlin(20_000)));
        assert!(World::new().at(BERLIN, &[], &[]).eval(&near_berlin(1)));
        assert!(!World::new().eval(&near_berlin(30_000)), "unknown location");
        // The boundary is inclusive; the distance function is the caller's.
        let p = near_berlin(100);
        let w = World::new().at(POTSDAM, &[], &[]);
        let exactly = |_: f64, _: f64, _: f64, _: f64| 100.0;
        let nan = |_: f64, _: f64, _: f64, _: f64| f64::NAN;
        assert!(p.evaluate(&Facts {
            distance: &exactly,
            ..w.facts()
        }));
        assert!(!p.evaluate(&Facts {
            distance: &nan,
            ..w.facts()
        }));
        // Across the antimeridian.
        let fiji = pred("within_m = 50000\nof = [-17.0, 179.9]");
        assert!(World::new()
            .at(
                Location {
                    lat: -17.0,
                    lon: -179.9
                },
                &[],
                &[]
            )
            .eval(&fiji));
    }

    // ---- evaluation: content ----

    #[test]
    fn number_comparisons() {
        let cases: &[(&str, f64, bool)] = &[
            ("eq = 30", 30.0, true),
            ("eq = 30.0", 30.0, true),
            ("eq = 30", 30.5, false),
            ("ne = 30", 30.5, true),
            ("ne = 30", 30.0, false),
            ("gt = 30", 30.0, false),
            ("gt = 30", 30.01, true),
            ("ge = 30", 30.0, true),
            ("ge = 30", 29.9, false),
            ("lt = -5.5", -6.0, true),
            ("lt = -5.5", -5.5, false),
            ("le = -5.5", -5.5, true),
            ("le = -5.5", -5.0, false),
        ];
        for (ops, value, expected) in cases {
            let p = pred(&format!("field = \"/v\"\n{ops}"));
            assert_eq!(
                on(json!({ "v": value })).eval(&p),
                *expected,
                "{ops} on {value}"
            );
        }
        // Integers in the payload compare with float literals and the reverse.
        assert!(on(json!({"v": 7})).eval(&pred("field = \"/v\"\ngt = 6.5")));
        assert!(on(json!({"v": 7.0})).eval(&pred("field = \"/v\"\neq = 7")));
        assert!(on(json!({"v": u64::MAX})).eval(&pred("field = \"/v\"\ngt = 1e18")));
        assert!(on(json!({"v": i64::MIN})).eval(&pred("field = \"/v\"\nlt = -1e18")));
        // Several comparisons on one field: all must hold.
        let range = pred("field = \"/n\"\nge = 1\nlt = 10");
        for (n, expected) in [(0, false), (1, true), (9, true), (10, false)] {
            assert_eq!(on(json!({ "n": n })).eval(&range), expected, "{n}");
        }
    }

    #[test]
    fn string_and_boolean_comparisons() {
        let alarm = pred("field = \"/status\"\neq = \"alarm\"");
        let not_ok = pred("field = \"/status\"\nne = \"ok\"");
        assert!(on(json!({"status": "alarm"})).eval(&alarm));
        assert!(!on(json!({"status": "Alarm"})).eval(&alarm));
        assert!(on(json!({"status": "alarm"})).eval(&not_ok));
        assert!(!on(json!({"status": "ok"})).eval(&not_ok));
        // Typed: a number, null, a missing field or a non-JSON payload fail `ne` too.
        assert!(!on(json!({"status": 3})).eval(&not_ok));
        assert!(!on(json!({"status": null})).eval(&not_ok));
        assert!(!on(json!({})).eval(&not_ok));
        assert!(!World::new().eval(&not_ok));
        // ...which `not eq` includes.
        let not_eq_ok = pred("not = { field = \"/status\", eq = \"ok\" }");
        assert!(on(json!({"status": 3})).eval(&not_eq_ok));
        assert!(World::new().eval(&not_eq_ok));
        // Code-point order: timestamps order, numbers in strings do not.
        let since = pred("field = \"/ts\"\nge = \"2026-01-01T00:00:00Z\"");
        assert!(on(json!({"ts": "2026-03-05T10:00:00Z"})).eval(&since));
        assert!(!on(json!({"ts": "2025-12-31T23:59:59Z"})).eval(&since));
        assert!(on(json!({"s": "10"})).eval(&pred("field = \"/s\"\nlt = \"9\"")));
        assert!(on(json!({"s": "é"})).eval(&pred("field = \"/s\"\ngt = \"z\"")));
        // A number literal never matches a string field, and the reverse.
        assert!(!on(json!({"v": "30"})).eval(&pred("field = \"/v\"\neq = 30")));
        assert!(!on(json!({"v": 30})).eval(&pred("field = \"/v\"\neq = \"30\"")));
        // Booleans.
        let low = pred("field = \"/battery/low\"\neq = true");
        assert!(on(json!({"battery": {"low": true}})).eval(&low));
        assert!(!on(json!({"battery": {"low": false}})).eval(&low));
        assert!(!on(json!({"battery": {"low": 1}})).eval(&low));
        assert!(on(json!({"b": false})).eval(&pred("field = \"/b\"\nne = true")));
    }

    #[test]
    fn existence() {
        let has = pred("field = \"/fw\"\nexists = true");
        let lacks = pred("field = \"/fw\"\nexists = false");
        for (payload, present) in [
            (Some(json!({"fw": "1.2"})), true),
            (Some(json!({"fw": null})), true),
            (Some(json!({"fw": {}})), true),
            (Some(json!({"fx": 1})), false),
            (Some(json!([1, 2])), false),
            (Some(json!("fw")), false),
            (None, false),
        ] {
            let w = World {
                payload: payload.clone(),
                ..World::new()
            };
            assert_eq!(w.eval(&has), present, "{payload:?}");
            assert_eq!(w.eval(&lacks), !present, "{payload:?}");
        }
    }

    #[test]
    fn pointers() {
        let doc = json!({
            "a/b": 1, "m~n": 2, "": 3, " ": 4,
            "arr": [10, {"x": 11}], "obj": {"0": 12, "01": 13},
            "deep": {"er": {"est": 14}}
        });
        let cases: &[(&str, f64, bool)] = &[
            ("/a~1b", 1.0, true),
            ("/m~0n", 2.0, true),
            ("/", 3.0, true),
            ("/ ", 4.0, true),
            ("/arr/0", 10.0, true),
            ("/arr/1/x", 11.0, true),
            ("/arr/01", 10.0, false),
            ("/arr/-", 10.0, false),
            ("/arr/2", 10.0, false),
            ("/arr/+1", 11.0, false),
            ("/arr/18446744073709551616", 10.0, false),
            ("/obj/0", 12.0, true),
            ("/obj/01", 13.0, true),
            ("/deep/er/est", 14.0, true),
            ("/deep/er/est/more", 14.0, false),
            ("/deep/er", 14.0, false),
            ("/a/b", 1.0, false),
        ];
        for (pointer, value, expected) in cases {
            let p = pred(&format!("field = {pointer:?}\neq = {value}"));
            assert_eq!(on(doc.clone()).eval(&p), *expected, "{pointer}");
        }
        // The empty pointer is the whole document.
        assert!(on(json!(5)).eval(&pred("field = \"\"\neq = 5")));
        assert!(on(json!("x")).eval(&pred("field = \"\"\nexists = true")));
        assert!(!World::new().eval(&pred("field = \"\"\nexists = true")));
    }

    // ---- combinators and hints ----

    #[test]
    fn combinators() {
        let hot_eu = pred("all = [ { in = \"eu\" }, { field = \"/t\", gt = 30 } ]");
        let hot_or_eu = pred("any = [ { in = \"eu\" }, { field = \"/t\", gt = 30 } ]");
        let w = |t: f64, eu: bool| {
            let regions: &[&str] = if eu { &["eu"] } else { &[] };
            on(json!({ "t": t })).at(BERLIN, &[], regions)
        };
        assert!(w(31.0, true).eval(&hot_eu));
        assert!(!w(29.0, true).eval(&hot_eu));
        assert!(!w(31.0, false).eval(&hot_eu));
        assert!(w(31.0, false).eval(&hot_or_eu));
        assert!(w(29.0, true).eval(&hot_or_eu));
        assert!(!w(29.0, false).eval(&hot_or_eu));
        let nested = pred(
            "any = [ { all = [ { in = \"eu\" }, { not = { field = \"/t\", lt = 0 } } ] }, \
             { not_in = \"eu\" } ]",
        );
        assert!(w(1.0, true).eval(&nested));
        assert!(!w(-1.0, true).eval(&nested));
        assert!(w(-1.0, false).eval(&nested));
        assert!(!World::new().eval(&nested));
    }

    #[test]
    fn names_and_hints() {
        let p = pred(
            "all = [ { in = [\"eu\", \"de\"] }, { not = { not_in = [\"yard\", \"eu\"] } }, \
             { any = [ { within_m = 5, of = [0, 0] }, { field = \"/x\", exists = true } ] } ]",
        );
        assert_eq!(
            p.names().into_iter().collect::<Vec<_>>(),
            vec!["de", "eu", "yard"]
        );
        assert!(p.needs_location() && p.needs_membership() && p.needs_payload());
        let within = pred("not = { within_m = 5, of = [0, 0] }");
        assert!(within.names().is_empty());
        assert!(within.needs_location() && !within.needs_membership() && !within.needs_payload());
        let field = pred("field = \"/x\"\neq = 1");
        assert!(!field.needs_location() && !field.needs_membership() && field.needs_payload());
        assert_eq!(pred("in = [\"a\", \"a\"]").names().len(), 1);
    }

    // ---- properties ----

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from)
    }

    fn lat() -> impl Strategy<Value = f64> {
        -90.0..=90.0f64
    }

    fn lon() -> impl Strategy<Value = f64> {
        -180.0..=180.0f64
    }

    fn pointer() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("".to_owned()),
            Just("/x".to_owned()),
            Just("/y".to_owned()),
            Just("/x/0".to_owned()),
            Just("/x/y".to_owned()),
            Just("/~1".to_owned()),
        ]
    }

    fn literal() -> impl Strategy<Value = Literal> {
        prop_oneof![
            (-3i32..=3).prop_map(|n| Literal::Number(f64::from(n))),
            (-1e3..1e3f64).prop_map(Literal::Number),
            prop_oneof![Just(""), Just("a"), Just("b"), Just("ab")]
                .prop_map(|s| Literal::String(s.into())),
            any::<bool>().prop_map(Literal::Bool),
        ]
    }

    const OPS: [&str; 6] = ["eq", "ne", "gt", "ge", "lt", "le"];

    /// `field = pointer, <op> = literal`.
    fn compare(pointer: &str, op: &str, literal: Literal) -> PredicateConfig {
        let mut c = PredicateConfig {
            field: Some(pointer.to_owned()),
            ..Default::default()
        };
        let slot = match op {
            "eq" => &mut c.eq,
            "ne" => &mut c.ne,
            "gt" => &mut c.gt,
            "ge" => &mut c.ge,
            "lt" => &mut c.lt,
            _ => &mut c.le,
        };
        *slot = Some(literal);
        c
    }

    /// A valid leaf predicate.
    fn leaf() -> impl Strategy<Value = PredicateConfig> {
        let op = 0usize..6;
        prop_oneof![
            prop::collection::vec(name(), 1..3).prop_map(|n| PredicateConfig {
                inside: Some(Names(n)),
                ..Default::default()
            }),
            prop::collection::vec(name(), 1..3).prop_map(|n| PredicateConfig {
                not_in: Some(Names(n)),
                ..Default::default()
            }),
            (1.0..2e7f64, lat(), lon()).prop_map(|(m, la, lo)| PredicateConfig {
                within_m: Some(m),
                of: Some(vec![la, lo]),
                ..Default::default()
            }),
            (pointer(), any::<bool>()).prop_map(|(f, e)| PredicateConfig {
                field: Some(f),
                exists: Some(e),
                ..Default::default()
            }),
            (pointer(), op, literal())
                .prop_filter("booleans only take eq and ne", |(_, op, l)| {
                    !matches!(l, Literal::Bool(_)) || *op < 2
                })
                .prop_map(|(f, op, l)| compare(&f, OPS[op], l)),
        ]
    }

    fn all(list: Vec<PredicateConfig>) -> PredicateConfig {
        PredicateConfig {
            all: Some(list),
            ..Default::default()
        }
    }

    fn any_of(list: Vec<PredicateConfig>) -> PredicateConfig {
        PredicateConfig {
            any: Some(list),
            ..Default::default()
        }
    }

    fn not(p: PredicateConfig) -> PredicateConfig {
        PredicateConfig {
            not: Some(Box::new(p)),
            ..Default::default()
        }
    }

    /// A valid predicate tree.
    fn tree() -> impl Strategy<Value = PredicateConfig> {
        leaf().prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(all),
                prop::collection::vec(inner.clone(), 1..4).prop_map(any_of),
                inner.prop_map(not),
            ]
        })
    }

    /// Any JSON value, with keys that the generated pointers can hit.
    fn json_value() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-4i64..4).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // NaN and infinities become null
            prop_oneof![Just(""), Just("a"), Just("b"), Just("ab"), Just("é")]
                .prop_map(Value::from),
            ".{0,6}".prop_map(Value::from),
        ];
        scalar.prop_recursive(4, 32, 4, |inner| {
            let key = prop_oneof![Just("x"), Just("y"), Just("0"), Just("/"), Just("")]
                .prop_map(String::from);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn world() -> impl Strategy<Value = World> {
        (
            prop::option::of(json_value()),
            prop::option::of((lat(), lon())),
            prop::collection::vec(name(), 0..3),
            prop::collection::vec(name(), 0..3),
        )
            .prop_map(|(payload, loc, fences, regions)| {
                let location = loc.map(|(lat, lon)| Location { lat, lon });
                World {
                    payload,
                    location,
                    fences: if location.is_some() {
                        fences
                    } else {
                        Vec::new()
                    },
                    regions: if location.is_some() {
                        regions
                    } else {
                        Vec::new()
                    },
                }
            })
    }

    /// Any leaf configuration the parser could produce, mostly invalid.
    fn wild_leaf() -> impl Strategy<Value = PredicateConfig> {
        let names = || {
            prop::option::weighted(
                0.2,
                prop::collection::vec(prop_oneof![name(), Just(String::new())], 0..3)
                    .prop_map(Names),
            )
        };
        let literal = prop_oneof![literal(), any::<f64>().prop_map(Literal::Number)];
        (
            names(),
            names(),
            prop::option::weighted(0.2, any::<f64>()),
            prop::option::weighted(0.2, prop::collection::vec(any::<f64>(), 0..4)),
            prop::option::weighted(0.3, "(/[a-z~0-9]{0,3}){0,3}|.{0,4}"),
            prop::option::weighted(0.2, any::<bool>()),
            prop::collection::vec((0usize..6, literal), 0..3),
        )
            .prop_map(|(inside, not_in, within_m, of, field, exists, ops)| {
                let mut c = PredicateConfig {
                    inside,
                    not_in,
                    within_m,
                    of,
                    exists,
                    ..Default::default()
                };
                for (op, l) in ops {
                    let one = compare("", OPS[op], l);
                    c.eq = c.eq.or(one.eq);
                    c.ne = c.ne.or(one.ne);
                    c.gt = c.gt.or(one.gt);
                    c.ge = c.ge.or(one.ge);
                    c.lt = c.lt.or(one.lt);
                    c.le = c.le.or(one.le);
                }
                c.field = field;
                c
            })
    }

    /// Any configuration the parser could produce, mostly invalid.
    fn wild() -> impl Strategy<Value = PredicateConfig> {
        wild_leaf().prop_recursive(3, 16, 3, |inner| {
            (
                wild_leaf(),
                prop::option::weighted(0.3, prop::collection::vec(inner.clone(), 0..3)),
                prop::option::weighted(0.3, prop::collection::vec(inner.clone(), 0..3)),
                prop::option::weighted(0.3, inner),
            )
                .prop_map(|(mut c, all, any, not)| {
                    c.all = all;
                    c.any = any;
                    c.not = not.map(Box::new);
                    c
                })
        })
    }

    fn compiled(c: &PredicateConfig) -> Predicate {
        compile(c).unwrap_or_else(|e| panic!("generated {c:?} should compile: {e}"))
    }

    proptest! {
        #[test]
        fn de_morgan(a in tree(), b in tree(), w in world()) {
            let lhs = compiled(&not(all(vec![a.clone(), b.clone()])));
            let rhs = compiled(&any_of(vec![not(a.clone()), not(b.clone())]));
            prop_assert_eq!(w.eval(&lhs), w.eval(&rhs));
            let lhs = compiled(&not(any_of(vec![a.clone(), b.clone()])));
            let rhs = compiled(&all(vec![not(a), not(b)]));
            prop_assert_eq!(w.eval(&lhs), w.eval(&rhs));
        }

        #[test]
        fn double_negation_and_singletons(a in tree(), w in world()) {
            let plain = w.eval(&compiled(&a));
            prop_assert_eq!(w.eval(&compiled(&not(not(a.clone())))), plain);
            prop_assert_eq!(w.eval(&compiled(&all(vec![a.clone()]))), plain);
            prop_assert_eq!(w.eval(&compiled(&any_of(vec![a.clone()]))), plain);
            prop_assert_eq!(w.eval(&compiled(&not(a))), !plain);
        }

        #[test]
        fn all_and_any_agree_with_their_members(list in prop::collection::vec(tree(), 1..5), w in world()) {
            let each: Vec<bool> = list.iter().map(|p| w.eval(&compiled(p))).collect();
            prop_assert_eq!(w.eval(&compiled(&all(list.clone()))), each.iter().all(|b| *b));
            prop_assert_eq!(w.eval(&compiled(&any_of(list))), each.iter().any(|b| *b));
        }

        #[test]
        fn comparisons_are_complements_within_a_type(
            value in prop_oneof![
                any::<f64>().prop_filter("finite", |x| x.is_finite()).prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-3i64..=3).prop_map(Value::from),
                ".{0,4}".prop_map(Value::from),
                prop_oneof![Just("a"), Just("b"), Just("")].prop_map(Value::from),
            ],
            literal in literal().prop_filter("ordered types", |l| !matches!(l, Literal::Bool(_))),
        ) {
            let same_type = matches!(
                (&value, &literal),
                (Value::Number(_), Literal::Number(_)) | (Value::String(_), Literal::String(_))
            );
            let w = on(json!({ "v": value }));
            let test = |op: &str| w.eval(&compiled(&compare("/v", op, literal.clone())));
            for (a, b) in [("gt", "le"), ("lt", "ge"), ("eq", "ne")] {
                if same_type {
                    prop_assert!(test(a) != test(b), "{} / {} on {:?} vs {:?}", a, b, value, literal);
                } else {
                    prop_assert!(!test(a) && !test(b), "{} / {} across types", a, b);
                }
            }
            // Exactly one of lt, eq, gt holds within a type.
            let trio = [test("lt"), test("eq"), test("gt")];
            prop_assert_eq!(trio.iter().filter(|b| **b).count(), usize::from(same_type));
        }

        #[test]
        fn in_and_not_in_are_complements_when_located(names in prop::collection::vec(name(), 1..3), w in world()) {
            let inside = w.eval(&compiled(&PredicateConfig { inside: Some(Names(names.clone())), ..Default::default() }));
            let outside = w.eval(&compiled(&PredicateConfig { not_in: Some(Names(names)), ..Default::default() }));
            if w.location.is_some() {
                prop_assert!(inside != outside);
            } else {
                prop_assert!(!inside && !outside);
            }
        }

        #[test]
        fn hints_are_sound(p in tree(), w in world(), other in world()) {
            let p = compiled(&p);
            let base = w.eval(&p);
            if !p.needs_payload() {
                let swapped = World { payload: other.payload.clone(), ..w.clone() };
                prop_assert_eq!(swapped.eval(&p), base);
            }
            if !p.needs_location() {
                let moved = World { payload: w.payload.clone(), ..other.clone() };
                prop_assert_eq!(moved.eval(&p), base);
            }
            if !p.needs_membership() {
                let everywhere = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
                let retagged = World { fences: Vec::new(), regions: everywhere, ..w.clone() };
                prop_assert_eq!(retagged.eval(&p), base);
            }
            for n in p.names() {
                prop_assert!(["a", "b", "c"].contains(&n));
            }
        }

        #[test]
        fn toml_round_trip(p in tree()) {
            let text = toml::to_string(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: PredicateConfig = toml::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(compiled(&back), compiled(&p));
        }

        #[test]
        fn evaluation_never_panics_on_any_pointer_or_payload(
            field in "(/[a-z0-9~/\\-é]{0,6}){0,4}|.{0,8}",
            literal in literal(),
            exists in prop::option::of(any::<bool>()),
            w in world(),
        ) {
            let mut c = PredicateConfig { field: Some(field), exists, ..Default::default() };
            c.eq = Some(literal.clone());
            c.ne = Some(literal);
            if let Ok(p) = compile(&c) {
                let _ = w.eval(&p);
            }
            c.eq = None;
            if let Ok(p) = compile(&c) {
                let _ = w.eval(&p);
            }
        }

        #[test]
        fn compile_never_panics_on_any_config(c in wild(), w in world()) {
            if let Ok(p) = compile(&c) {
                let _ = w.eval(&p);
                let _ = (p.names(), p.needs_location(), p.needs_membership(), p.needs_payload());
            }
        }
    }
}

#[cfg(test)]
mod required_tests {
    use super::*;

    fn required(toml_text: &str) -> Option<Vec<Vec<String>>> {
        let config: PredicateConfig = toml::from_str(toml_text).expect("parses");
        let predicate = compile(&config).expect("compiles");
        predicate.required_memberships().map(|alternatives| {
            alternatives
                .into_iter()
                .map(|set| set.into_iter().map(str::to_owned).collect())
                .collect()
        })
    }

    #[test]
    fn membership_requirements_follow_the_logic() {
        assert_eq!(required(r#"in = "eu""#), Some(vec![vec!["eu".into()]]));
        assert_eq!(
            required(r#"in = ["eu", "us"]"#),
            Some(vec![vec!["eu".into()], vec!["us".into()]])
        );
        assert_eq!(required(r#"not_in = "eu""#), None);
        assert_eq!(required(r#"not = { in = "eu" }"#), None);
        assert_eq!(
            required(
                r#"field = "/t"
gt = 3"#
            ),
            None
        );
        assert_eq!(
            required(
                r#"all = [{ in = "eu" }, { field = "/t", gt = 3 }, { in = ["yard", "depot"] }]"#
            ),
            Some(vec![
                vec!["eu".into(), "yard".into()],
                vec!["depot".into(), "eu".into()]
            ])
        );
        let excluded = |text: &str| -> Vec<String> {
            let config: PredicateConfig = toml::from_str(text).expect("parses");
            let predicate = compile(&config).expect("compiles");
            predicate
                .excluded_names()
                .into_iter()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(excluded(r#"not_in = ["eu", "us"]"#), vec!["eu", "us"]);
        assert_eq!(excluded(r#"not = { in = "eu" }"#), vec!["eu"]);
        assert_eq!(
            excluded(r#"all = [{ not_in = "eu" }, { field = "/t", gt = 1 }]"#),
            vec!["eu"]
        );
        assert_eq!(
            excluded(r#"any = [{ not_in = ["eu", "us"] }, { not_in = "us" }]"#),
            vec!["us"]
        );
        assert!(excluded(r#"any = [{ not_in = "eu" }, { field = "/t", gt = 1 }]"#).is_empty());
        assert!(excluded(r#"in = "eu""#).is_empty());
        // One branch of an `any` without a requirement lifts the requirement.
        assert_eq!(
            required(r#"any = [{ in = "eu" }, { field = "/t", exists = true }]"#),
            None
        );
        assert_eq!(
            required(r#"any = [{ in = "eu" }, { all = [{ in = "us" }, { in = "ca" }] }]"#),
            Some(vec![vec!["eu".into()], vec!["ca".into(), "us".into()]])
        );
    }
}
