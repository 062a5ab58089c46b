//! Where an event happened, and what follows from it: the location sources (payload, device
//! registry, gateway position), region tags and residency, and enter/exit transitions.
//!
//! [`GeoPlan`] is the validated geography of a configuration (built once, when the
//! configuration is planned ([`crate::plan`]), by [`GeoPlan::from_config`], which is the only
//! part that reads files). [`Locator`] adds the
//! state that changes while the gateway runs: each device's last known position and the
//! geofences it is in (loaded from and saved to the store by the pipeline), and the latest GPS
//! fix of the gateway itself.
//!
//! Guarantees:
//! - An event's location is, in order: its payload's coordinates (the route's pointers, or
//!   `geography.location`), its device's last known position (reported in an earlier payload,
//!   or configured), the gateway's position (the latest GPS fix, or configured); else none.
//! - Coordinates that are present but invalid (out of range, not numbers) are an error for
//!   that event ([`LocateError`]), never a panic and never silently another location.
//! - A device's geofence set changes only with a position from its own payload; each change
//!   yields its exits, then its enters, each in name order ([`transitions`]).
//! - Residency is applied by [`super::residency::LinkRegions::allows`]: a row may go on a link
//!   only if the link may carry every one of its region tags.

use std::collections::{BTreeSet, HashMap};

use super::residency::LinkRegions;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::config::{Config, ConfigError, LocationPointers};
use crate::geo::{self, GeoError, GeoJsonOptions, Geography, Location, Placement};
use crate::routing::predicate::Distance;
use crate::routing::{RouteTable, TopicFilter};
use crate::store::DevicePosition;

/// The name of the link that publishes on the gateway's own broker (outputs of `local-only`
/// events). Configured upstream names cannot start with `$`.
pub const LOCAL_LINK: &str = "$local";

/// The client id of events the gateway journals itself (geofence transitions). It never
/// updates the device registry.
pub const GATEWAY_CLIENT: &str = "$outpost";

/// The registry key under which the gateway's latest GPS fix is kept.
const GATEWAY_DEVICE: &str = "$gateway";

/// Where a payload keeps its coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pointers {
    /// Latitude and longitude at two JSON pointers.
    LatLon {
        /// Pointer to the latitude.
        lat: String,
        /// Pointer to the longitude.
        lon: String,
    },
    /// A GeoJSON `[lon, lat]` position at one pointer.
    Position(String),
}

impl Pointers {
    /// Validates configured pointers: `lat` and `lon` together, or `position` alone, each a
    /// JSON pointer.
    pub fn from_config(c: &LocationPointers) -> Result<Pointers, String> {
        let check = |p: &str| geo::check_pointer(p).map_err(|e| e.to_string());
        match (&c.lat, &c.lon, &c.position) {
            (Some(lat), Some(lon), None) => {
                check(lat)?;
                check(lon)?;
                Ok(Pointers::LatLon {
                    lat: lat.clone(),
                    lon: lon.clone(),
                })
            }
            (None, None, Some(position)) => {
                check(position)?;
                Ok(Pointers::Position(position.clone()))
            }
            _ => Err("give `lat` and `lon` together, or `position` alone".to_string()),
        }
    }

    /// The location in `payload`: `Ok(None)` when the fields are absent or null.
    pub fn read(&self, payload: &Value) -> Result<Option<Location>, GeoError> {
        match self {
            Pointers::LatLon { lat, lon } => geo::location_from_json(payload, lat, lon),
            Pointers::Position(p) => geo::location_from_json_array(payload, p),
        }
    }
}

/// What happens to events without any location when regions are configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoLocation {
    /// Their outputs are published on the gateway's own broker, never upstream.
    LocalOnly,
    /// They become dead letters (`no-location`).
    DeadLetter,
    /// They get this region's tag.
    Region(String),
}

/// An event's location could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct LocateError(pub GeoError);

/// Where a location came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The event's own payload.
    Payload,
    /// The device's last known or configured position.
    Device,
    /// The gateway's position.
    Gateway,
}

/// The last location resolved for an event (see [`Locator::resolve_memo`]).
#[derive(Debug, Default)]
pub struct ResolveMemo {
    last: Option<(Pointers, String, Resolved)>,
}

/// What [`Locator::resolve`] answers.
pub type Resolved = Result<Option<(Location, Source)>, LocateError>;

/// The validated geography of a configuration.
#[derive(Debug)]
pub struct GeoPlan {
    /// Geofences and regions.
    pub geography: Geography,
    /// Whether anything geographic is configured (otherwise payloads are never parsed for a
    /// location and events carry no geography).
    pub active: bool,
    /// Whether regions are configured: residency and the no-location policy apply.
    pub residency: bool,
    /// Pointers per route (configuration order).
    pub route_pointers: Vec<Pointers>,
    /// What happens to events without location.
    pub no_location: NoLocation,
    /// The configured gateway position.
    pub gateway_position: Option<Location>,
    /// Where GPS fixes of the gateway arrive.
    pub gps_topic: Option<TopicFilter>,
    /// The pointers of GPS fixes.
    pub gps_pointers: Pointers,
    /// Topic template of transitions (`{gateway}`, `{device}`).
    pub transitions_topic: Option<String>,
    /// Configured device positions.
    pub static_devices: HashMap<String, Location>,
    /// The regions each link may carry.
    pub links: HashMap<String, LinkRegions>,
}

impl Default for GeoPlan {
    fn default() -> Self {
        GeoPlan {
            geography: Geography::empty(),
            active: false,
            residency: false,
            route_pointers: Vec::new(),
            no_location: NoLocation::LocalOnly,
            gateway_position: None,
            gps_topic: None,
            gps_pointers: Pointers::LatLon {
                lat: "/lat".into(),
                lon: "/lon".into(),
            },
            transitions_topic: None,
            static_devices: HashMap::new(),
            links: HashMap::new(),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn position(key: &str, p: [f64; 2]) -> Result<Location, ConfigError> {
    Location::new(p[0], p[1]).map_err(|e| invalid(key, format!("[lat, lon]: {e}")))
}

/// Region names: a tag stored comma-separated, shown in topics and logs.
fn valid_region_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl GeoPlan {
    /// Reads the geofence files and validates every geographic setting of `config` against
    /// the compiled `routes`: names the routes and regions use exist, links' regions exist,
    /// and no route requires a region its link may not carry. Errors name the key.
    pub fn from_config(config: &Config, routes: &RouteTable) -> Result<GeoPlan, ConfigError> {
        let g = &config.geography;
        let geography = geography_of(config)?;
        let residency = !config.regions.is_empty();
        let default_pointers =
            Pointers::from_config(&g.location).map_err(|m| invalid("geography.location", m))?;
        let mut route_pointers = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            route_pointers.push(match &r.location {
                Some(p) => Pointers::from_config(p)
                    .map_err(|m| invalid(format!("route {:?}.location", r.name), m))?,
                None => default_pointers.clone(),
            });
        }
        let no_location = match g.no_location.as_str() {
            "local-only" => NoLocation::LocalOnly,
            "dead-letter" => NoLocation::DeadLetter,
            name if geography.region(name).is_some() => NoLocation::Region(name.to_string()),
            other => {
                return Err(invalid(
                    "geography.no_location",
                    format!(
                        "{other:?} is not \"local-only\", \"dead-letter\" or a [[region]] name"
                    ),
                ))
            }
        };
        let gateway_position = g
            .gateway_position
            .map(|p| position("geography.gateway_position", p))
            .transpose()?;
        let gps_topic = g
            .gps_topic
            .as_deref()
            .map(|t| {
                TopicFilter::parse(t).map_err(|e| invalid("geography.gps_topic", e.to_string()))
            })
            .transpose()?;
        if let Some(t) = &g.transitions_topic {
            check_transitions_topic(t).map_err(|m| invalid("geography.transitions_topic", m))?;
        }
        let static_devices = static_devices(config)?;
        let links = links_of(config, &geography)?;
        check_route_geography(routes, &geography, &links, residency)?;
        let active = !config.geofences.is_empty()
            || residency
            || !config.devices.is_empty()
            || gateway_position.is_some()
            || gps_topic.is_some()
            || g.transitions_topic.is_some()
            || routes.routes().iter().any(|r| r.when.is_some())
            || config.routes.iter().any(|r| r.location.is_some());
        Ok(GeoPlan {
            geography,
            active,
            residency,
            route_pointers,
            no_location,
            gateway_position,
            gps_topic,
            gps_pointers: default_pointers,
            transitions_topic: g.transitions_topic.clone(),
            static_devices,
            links,
        })
    }

    /// What `config check` should point out without refusing: routes whose events in some
    /// region would become `residency` dead letters because their link may not carry it.
    pub fn warnings(&self, routes: &RouteTable) -> Vec<String> {
        let mut out = Vec::new();
        if !self.residency {
            return out;
        }
        for route in routes.routes() {
            if route
                .when
                .as_ref()
                .and_then(|w| w.required_memberships())
                .is_some()
            {
                continue;
            }
            let link = self.link(&route.upstream);
            let excluded = route
                .when
                .as_ref()
                .map(|w| w.excluded_names())
                .unwrap_or_default();
            let refused: Vec<&str> = self
                .geography
                .regions()
                .iter()
                .map(|r| r.name())
                .filter(|r| !excluded.contains(r) && !link.allows(std::iter::once(*r)))
                .collect();
            if !refused.is_empty() {
                out.push(format!(
                    "route {:?}: its events in region {} will become dead letters (reason \"residency\"): upstream {:?} may not carry them; add a `when` or the region to the upstream's `regions`",
                    route.name,
                    refused.join(", "),
                    route.upstream
                ));
            }
        }
        out
    }

    /// The regions a link may carry (any, for a link the plan does not know).
    pub fn link(&self, name: &str) -> LinkRegions {
        self.links.get(name).cloned().unwrap_or(LinkRegions::Any)
    }
}

/// The geofences (read from their files, or circles) and the regions made of them.
fn geography_of(config: &Config) -> Result<Geography, ConfigError> {
    let mut builder = Geography::builder();
    for (i, fence) in config.geofences.iter().enumerate() {
        let key = format!("geofence[{i}]");
        match (&fence.file, fence.center, fence.radius_m) {
            (Some(file), None, None) => {
                let bytes = read_file(file).map_err(|m| invalid(format!("{key}.file"), m))?;
                let mut options = GeoJsonOptions::default();
                if let Some(p) = &fence.name_property {
                    options.name_property = p.clone();
                }
                options.only = fence.only.clone();
                options.geometry_name = fence.name.clone();
                builder.add_geojson(&bytes, &options).map_err(|e| {
                    invalid(format!("{key}.file"), format!("{}: {e}", file.display()))
                })?;
            }
            (None, Some(center), Some(radius)) => {
                let Some(name) = &fence.name else {
                    return Err(invalid(format!("{key}.name"), "a circle needs a name"));
                };
                if fence.name_property.is_some() || fence.only.is_some() {
                    return Err(invalid(
                        key,
                        "name_property and only apply to a file, not to a circle",
                    ));
                }
                let centre = position(&format!("{key}.center"), center)?;
                builder
                    .add_circle(name.clone(), centre, radius)
                    .map_err(|e| invalid(key, e.to_string()))?;
            }
            _ => {
                return Err(invalid(
                    key,
                    "give `file` (GeoJSON), or `name`, `center` = [lat, lon] and `radius_m`",
                ))
            }
        }
    }
    for (i, region) in config.regions.iter().enumerate() {
        let key = format!("region[{i}]");
        if !valid_region_name(&region.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!(
                    "{:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                    region.name
                ),
            ));
        }
        builder
            .add_region(region.name.clone(), region.fences.iter().cloned())
            .map_err(|e| invalid(key, e.to_string()))?;
    }
    builder
        .build()
        .map_err(|e| invalid("geofence", e.to_string()))
}

/// The configured device positions, by device id.
fn static_devices(config: &Config) -> Result<HashMap<String, Location>, ConfigError> {
    let mut static_devices = HashMap::new();
    for (i, d) in config.devices.iter().enumerate() {
        if d.id.is_empty() {
            return Err(invalid(format!("device[{i}].id"), "must not be empty"));
        }
        let at = position(&format!("device[{i}].position"), d.position)?;
        if static_devices.insert(d.id.clone(), at).is_some() {
            return Err(invalid(
                format!("device[{i}].id"),
                format!("{:?} is configured twice", d.id),
            ));
        }
    }
    Ok(static_devices)
}

/// The regions each upstream may carry (every region exists), and the local link's: any.
fn links_of(
    config: &Config,
    geography: &Geography,
) -> Result<HashMap<String, LinkRegions>, ConfigError> {
    let mut links = HashMap::new();
    for u in &config.upstreams {
        for r in &u.regions {
            if r != "*" && geography.region(r).is_none() {
                return Err(invalid(
                    format!("upstream {:?}.regions", u.name),
                    format!("no [[region]] named {r:?}"),
                ));
            }
        }
        links.insert(u.name.clone(), LinkRegions::from_list(&u.regions));
    }
    links.insert(LOCAL_LINK.to_string(), LinkRegions::Any);
    Ok(links)
}

/// Every name a route's `when` uses is a geofence or a region, and, with `residency`, no
/// route requires a region its link may not carry.
fn check_route_geography(
    routes: &RouteTable,
    geography: &Geography,
    links: &HashMap<String, LinkRegions>,
    residency: bool,
) -> Result<(), ConfigError> {
    for route in routes.routes() {
        let Some(when) = &route.when else { continue };
        for name in when.names() {
            if geography.fence(name).is_none() && geography.region(name).is_none() {
                return Err(invalid(
                    format!("route {:?}.when", route.name),
                    format!("no geofence or region named {name:?}"),
                ));
            }
        }
        if !residency {
            continue;
        }
        let Some(alternatives) = when.required_memberships() else {
            continue;
        };
        let link = links
            .get(&route.upstream)
            .cloned()
            .unwrap_or(LinkRegions::Any);
        let carried = alternatives.iter().any(|names| {
            let tags = implied_regions(geography, names);
            link.allows(tags.iter().map(String::as_str))
        });
        if !carried {
            let needed: Vec<String> = alternatives
                .iter()
                .map(|names| {
                    implied_regions(geography, names)
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(" + ")
                })
                .collect();
            return Err(invalid(
                format!("route {:?}.upstream", route.name),
                format!(
                    "the route only takes events in region {}, which upstream {:?} may not carry (see its `regions`)",
                    needed.join(" or "),
                    route.upstream
                ),
            ));
        }
    }
    Ok(())
}

/// The region tags an event inside all of `names` (fences or regions) certainly has.
fn implied_regions(geography: &Geography, names: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut tags = BTreeSet::new();
    for name in names {
        if geography.region(name).is_some() {
            tags.insert(name.to_string());
        }
        for region in geography.regions() {
            if region.fences().any(|f| f == *name) {
                tags.insert(region.name().to_string());
            }
        }
    }
    tags
}

/// Largest GeoJSON file a geofence may name (64 MiB: Natural Earth's 10 m countries, the most
/// detailed common source, are about 24 MB).
pub const MAX_GEOFENCE_FILE_BYTES: u64 = 64 * 1024 * 1024;

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    crate::files::read_regular(path, MAX_GEOFENCE_FILE_BYTES)
        .map(|file| file.bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Transition topics may use `{gateway}` and `{device}` only, and no wildcard.
fn check_transitions_topic(template: &str) -> Result<(), String> {
    let rest = template.replace("{gateway}", "").replace("{device}", "");
    if rest.contains(['{', '}']) {
        return Err("only the placeholders {gateway} and {device} are available".into());
    }
    if template.is_empty() || template.contains(['+', '#', '\0']) {
        return Err("must be a non-empty topic without wildcards".into());
    }
    Ok(())
}

/// One geofence change of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// `enter` or `exit`.
    pub kind: &'static str,
    /// The geofence.
    pub fence: String,
}

/// The transitions from the fence set `before` to `after` (both sorted): exits first, then
/// enters, each in name order.
pub fn transitions<A: AsRef<str>, B: AsRef<str>>(before: &[A], after: &[B]) -> Vec<Transition> {
    let old: BTreeSet<&str> = before.iter().map(AsRef::as_ref).collect();
    let new: BTreeSet<&str> = after.iter().map(AsRef::as_ref).collect();
    let exits = old.difference(&new).map(|f| Transition {
        kind: "exit",
        fence: f.to_string(),
    });
    let enters = new.difference(&old).map(|f| Transition {
        kind: "enter",
        fence: f.to_string(),
    });
    exits.chain(enters).collect()
}

/// What a position report changed: the registry row to store and the transition events.
#[derive(Debug, Default)]
pub struct Observed {
    /// Registry rows to store.
    pub positions: Vec<DevicePosition>,
    /// Transition events to journal: (topic, JSON payload).
    pub transitions: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone)]
struct Known {
    at: Location,
    fences: Vec<String>,
}

/// The geography plus the positions learned while running.
pub struct Locator {
    plan: Arc<GeoPlan>,
    gateway_id: String,
    devices: Mutex<HashMap<String, Known>>,
    gateway_fix: Mutex<Option<Location>>,
}

impl Locator {
    /// A locator with the registry as stored (`positions`, e.g. from
    /// [`crate::store::Store::device_positions`]).
    pub fn new(plan: Arc<GeoPlan>, gateway_id: &str, positions: Vec<DevicePosition>) -> Locator {
        let mut devices = HashMap::new();
        let mut gateway_fix = None;
        for p in positions {
            let Ok(at) = Location::new(p.lat, p.lon) else {
                continue;
            };
            if p.device == GATEWAY_DEVICE {
                gateway_fix = Some(at);
            } else {
                devices.insert(
                    p.device,
                    Known {
                        at,
                        fences: p.fences,
                    },
                );
            }
        }
        Locator {
            plan,
            gateway_id: gateway_id.to_string(),
            devices: Mutex::new(devices),
            gateway_fix: Mutex::new(gateway_fix),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &GeoPlan {
        &self.plan
    }

    /// The location of an event of `device` on the route at `route_index`, and its source.
    pub fn resolve(
        &self,
        route_index: usize,
        payload: Option<&Value>,
        device: &str,
    ) -> Result<Option<(Location, Source)>, LocateError> {
        if let (Some(payload), Some(pointers)) =
            (payload, self.plan.route_pointers.get(route_index))
        {
            if let Some(at) = pointers.read(payload).map_err(LocateError)? {
                return Ok(Some((at, Source::Payload)));
            }
        }
        if !device.is_empty() {
            if let Some(known) = self
                .devices
                .lock()
                .ok()
                .and_then(|d| d.get(device).cloned())
            {
                return Ok(Some((known.at, Source::Device)));
            }
            if let Some(at) = self.plan.static_devices.get(device) {
                return Ok(Some((*at, Source::Device)));
            }
        }
        let fix = self.gateway_fix.lock().ok().and_then(|f| *f);
        Ok(fix
            .or(self.plan.gateway_position)
            .map(|at| (at, Source::Gateway)))
    }

    /// [`Locator::resolve`], reusing `memo`'s answer when the previous route of the same event
    /// had the same pointers and device (the usual case: routes share the default pointers).
    /// Start each event with a fresh [`ResolveMemo`].
    pub fn resolve_memo(
        &self,
        memo: &mut ResolveMemo,
        route_index: usize,
        payload: Option<&Value>,
        device: &str,
    ) -> Resolved {
        let pointers = self.plan.route_pointers.get(route_index);
        if let Some((p, d, answer)) = &memo.last {
            if pointers == Some(p) && d == device {
                return answer.clone();
            }
        }
        let answer = self.resolve(route_index, payload, device);
        if let Some(p) = pointers {
            memo.last = Some((p.clone(), device.to_string(), answer.clone()));
        }
        answer
    }

    /// Where `at` is.
    pub fn place(&self, at: Location, out: &mut Placement) {
        self.plan.geography.locate_into(at, out);
    }

    /// A GPS fix of the gateway on `topic` (if it is the GPS topic): returns the registry row
    /// to store when the payload held a valid position. Invalid fixes are an error.
    pub fn gps_fix(
        &self,
        topic: &str,
        payload: Option<&Value>,
        received_ms: u64,
    ) -> Result<Option<DevicePosition>, LocateError> {
        let Some(filter) = &self.plan.gps_topic else {
            return Ok(None);
        };
        if !filter.matches(topic) {
            return Ok(None);
        }
        let Some(payload) = payload else {
            return Ok(None);
        };
        let Some(at) = self.plan.gps_pointers.read(payload).map_err(LocateError)? else {
            return Ok(None);
        };
        if let Ok(mut fix) = self.gateway_fix.lock() {
            *fix = Some(at);
        }
        Ok(Some(DevicePosition {
            device: GATEWAY_DEVICE.to_string(),
            lat: at.lat(),
            lon: at.lon(),
            fences: Vec::new(),
            updated_ms: received_ms,
        }))
    }

    /// Records `device`'s own reported position, placed in `placement`'s fences: the registry
    /// row to store and, when its fence set changed and transitions are configured, the
    /// transition events.
    pub fn observe(
        &self,
        device: &str,
        at: Location,
        placement: &Placement,
        received_ms: u64,
        out: &mut Observed,
    ) {
        if device.is_empty() {
            return;
        }
        let fences: Vec<String> = placement.fences.iter().map(|f| f.to_string()).collect();
        let Ok(mut devices) = self.devices.lock() else {
            return;
        };
        let before = devices.get(device).map(|k| k.fences.clone());
        let unchanged = devices
            .get(device)
            .is_some_and(|k| k.at == at && k.fences == fences);
        if unchanged {
            return;
        }
        devices.insert(
            device.to_string(),
            Known {
                at,
                fences: fences.clone(),
            },
        );
        drop(devices);
        if let Some(template) = &self.plan.transitions_topic {
            let before = before.unwrap_or_default();
            let topic = template
                .replace("{gateway}", &self.gateway_id)
                .replace("{device}", device);
            for t in transitions(&before, &fences) {
                let payload = serde_json::json!({
                    "device": device,
                    "fence": t.fence,
                    "transition": t.kind,
                    "lat": at.lat(),
                    "lon": at.lon(),
                    "at_ms": received_ms,
                });
                out.transitions
                    .push((topic.clone(), payload.to_string().into_bytes()));
            }
        }
        out.positions.push(DevicePosition {
            device: device.to_string(),
            lat: at.lat(),
            lon: at.lon(),
            fences,
            updated_ms: received_ms,
        });
    }
}

/// The distance of route predicates (`within_m`): geodesic, on the WGS 84 ellipsoid.
pub struct GeodesicDistance;

/// The one [`GeodesicDistance`].
pub const GEODESIC: GeodesicDistance = GeodesicDistance;

impl Distance for GeodesicDistance {
    fn metres(&self, from: crate::event::Location, to: crate::event::Location) -> f64 {
        match (Location::try_from(from), Location::try_from(to)) {
            (Ok(a), Ok(b)) => Geography::distance_m(a, b),
            _ => f64::NAN,
        }
    }

    fn within(&self, from: crate::event::Location, to: crate::event::Location, limit: f64) -> bool {
        match (Location::try_from(from), Location::try_from(to)) {
            (Ok(a), Ok(b)) => Geography::within_m(a, b, limit),
            _ => false,
        }
    }
}

/// The names in `tags` that are not unique, for tests.
#[cfg(test)]
fn duplicates(tags: &[String]) -> std::collections::HashSet<&str> {
    let mut seen = std::collections::HashSet::new();
    tags.iter()
        .map(String::as_str)
        .filter(|t| !seen.insert(*t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn transitions_exit_first_then_enter_in_name_order() {
        let t = transitions(&["a", "c", "yard"], &["b", "c", "depot"]);
        let got: Vec<(&str, &str)> = t.iter().map(|t| (t.kind, t.fence.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("exit", "a"),
                ("exit", "yard"),
                ("enter", "b"),
                ("enter", "depot")
            ]
        );
        assert!(transitions(&["x"], &["x"]).is_empty());
        let first: Vec<&str> = transitions::<&str, &str>(&[], &["yard"])
            .iter()
            .map(|t| t.kind)
            .collect();
        assert_eq!(first, vec!["enter"]);
    }

    proptest! {
        /// Applying the transitions to the old set gives the new set, and no fence appears
        /// twice.
        #[test]
        fn transitions_turn_the_old_set_into_the_new(
            before in proptest::collection::btree_set("[a-e]", 0..5),
            after in proptest::collection::btree_set("[a-e]", 0..5),
        ) {
            let before: Vec<String> = before.into_iter().collect();
            let after: Vec<String> = after.into_iter().collect();
            let mut set: BTreeSet<String> = before.iter().cloned().collect();
            let changes = transitions(&before, &after);
            let fences: Vec<String> = changes.iter().map(|t| t.fence.clone()).collect();
            prop_assert!(duplicates(&fences).is_empty());
            for t in &changes {
                match t.kind {
                    "exit" => prop_assert!(set.remove(&t.fence)),
                    _ => prop_assert!(set.insert(t.fence.clone())),
                }
            }
            prop_assert_eq!(set.into_iter().collect::<Vec<_>>(), after);
        }
    }

    proptest! {
        /// The fast `within` of route predicates agrees with the exact geodesic distance.
        #[test]
        fn within_agrees_with_the_distance(
            lat in -89.0f64..89.0, lon in -180.0f64..180.0,
            dlat in -0.5f64..0.5, dlon in -0.5f64..0.5,
            limit in 1.0f64..60_000.0,
        ) {
            let a = crate::event::Location { lat, lon };
            let b = crate::event::Location { lat: (lat + dlat).clamp(-90.0, 90.0), lon: (lon + dlon).clamp(-180.0, 180.0) };
            let exact = GEODESIC.metres(a, b) <= limit;
            prop_assert_eq!(GEODESIC.within(a, b, limit), exact);
        }
    }

    #[test]
    fn pointers_need_lat_and_lon_or_position() {
        let p = |lat: Option<&str>, lon: Option<&str>, position: Option<&str>| {
            Pointers::from_config(&LocationPointers {
                lat: lat.map(Into::into),
                lon: lon.map(Into::into),
                position: position.map(Into::into),
            })
        };
        assert!(p(Some("/lat"), Some("/lon"), None).is_ok());
        assert!(p(None, None, Some("/pos")).is_ok());
        assert!(p(Some("/lat"), None, None).is_err());
        assert!(p(Some("/lat"), Some("/lon"), Some("/pos")).is_err());
        assert!(p(Some("lat"), Some("/lon"), None).is_err());
    }

    const SQUARES: &str = r#"{"type":"FeatureCollection","features":[
        {"type":"Feature","properties":{"name":"west"},"geometry":{"type":"Polygon","coordinates":[[[0,0],[10,0],[10,10],[0,10],[0,0]]]}},
        {"type":"Feature","properties":{"name":"east"},"geometry":{"type":"Polygon","coordinates":[[[20,0],[30,0],[30,10],[20,10],[20,0]]]}}
    ]}"#;

    /// Validates `toml` (with `{FILE}` replaced by a GeoJSON file holding `geojson`).
    fn validate(geojson: &str, toml: &str) -> Result<Config, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fences.geojson");
        std::fs::write(&file, geojson).expect("write");
        let text = toml.replace("{FILE}", &file.display().to_string());
        let config = Config::from_toml(&text, Path::new("test.toml")).map_err(|e| e.to_string())?;
        crate::plan::compile(&config)
            .map(|_| config.clone())
            .map_err(|e| e.to_string())
    }

    const TWO_LINKS: &str = r#"
        [[upstream]]
        name = "west-cloud"
        url = "mqtt://127.0.0.1:1"
        regions = ["w"]
        [[upstream]]
        name = "any-cloud"
        url = "mqtt://127.0.0.1:2"
        regions = ["*"]
        [[geofence]]
        file = "{FILE}"
        [[region]]
        name = "w"
        fences = ["west"]
        [[region]]
        name = "e"
        fences = ["east"]
    "#;

    fn with_route(route: &str) -> String {
        format!("{TWO_LINKS}\n[[route]]\nname = \"r\"\nfilter = \"t/#\"\n{route}\n")
    }

    #[test]
    fn a_valid_geography_is_accepted() {
        validate(
            SQUARES,
            &with_route("upstream = \"west-cloud\"\nwhen = { in = \"w\" }"),
        )
        .expect("valid");
        // A fence implies its regions: `in = "west"` means region w.
        validate(
            SQUARES,
            &with_route("upstream = \"west-cloud\"\nwhen = { in = \"west\" }"),
        )
        .expect("valid");
        validate(
            SQUARES,
            &with_route("upstream = \"any-cloud\"\nwhen = { in = \"e\" }"),
        )
        .expect("valid");
    }

    #[test]
    fn a_route_its_link_may_never_carry_is_refused() {
        for when in [
            "in = \"e\"",
            "in = \"east\"",
            "all = [{ in = \"e\" }, { field = \"/t\", gt = 1 }]",
        ] {
            let err = validate(
                SQUARES,
                &with_route(&format!("upstream = \"west-cloud\"\nwhen = {{ {when} }}")),
            )
            .unwrap_err();
            assert!(
                err.contains("route \"r\".upstream") && err.contains("region e"),
                "{when}: {err}"
            );
        }
        // One carriable alternative is enough.
        validate(
            SQUARES,
            &with_route("upstream = \"west-cloud\"\nwhen = { in = [\"e\", \"w\"] }"),
        )
        .expect("valid");
    }

    #[test]
    fn unknown_names_are_refused() {
        let err = validate(
            SQUARES,
            &with_route("upstream = \"any-cloud\"\nwhen = { in = \"north\" }"),
        )
        .unwrap_err();
        assert!(
            err.contains("route \"r\".when") && err.contains("north"),
            "{err}"
        );
        let base = with_route("upstream = \"any-cloud\"");
        let err = validate(
            SQUARES,
            &format!("{base}\n[[region]]\nname = \"n\"\nfences = [\"north\"]\n"),
        )
        .unwrap_err();
        assert!(err.contains("north"), "{err}");
        let bad_link = base.replace("regions = [\"w\"]", "regions = [\"south\"]");
        let err = validate(SQUARES, &bad_link).unwrap_err();
        assert!(
            err.contains("upstream \"west-cloud\".regions") && err.contains("south"),
            "{err}"
        );
        let err = validate(
            SQUARES,
            &format!("{base}\n[geography]\nno_location = \"mars\"\n"),
        )
        .unwrap_err();
        assert!(err.contains("geography.no_location"), "{err}");
    }

    #[test]
    fn bad_geojson_is_refused_at_load_naming_the_file() {
        let cases = [
            ("", "empty"),
            ("not json", "json"),
            (
                r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"x"},"geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1]]]}}]}"#,
                "x",
            ),
            (
                r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"l"},"geometry":{"type":"LineString","coordinates":[[0,0],[1,1]]}}]}"#,
                "l",
            ),
        ];
        for (geojson, hint) in cases {
            let err = validate(geojson, "[[geofence]]\nfile = \"{FILE}\"\n").unwrap_err();
            assert!(
                err.contains("geofence[0].file") && err.contains("fences.geojson"),
                "{err}"
            );
            assert!(err.to_lowercase().contains(hint), "{hint:?} not in {err}");
        }
        let err =
            validate(SQUARES, "[[geofence]]\nfile = \"/nonexistent/x.geojson\"\n").unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn bad_positions_and_circles_are_refused() {
        for (toml, key) in [
            (
                "[geography]\ngateway_position = [91.0, 0.0]\n",
                "geography.gateway_position",
            ),
            (
                "[[device]]\nid = \"d\"\nposition = [0.0, 181.0]\n",
                "device[0].position",
            ),
            (
                "[[geofence]]\nname = \"c\"\ncenter = [0.0, 0.0]\nradius_m = -1.0\n",
                "geofence[0]",
            ),
            (
                "[[geofence]]\ncenter = [0.0, 0.0]\nradius_m = 10.0\n",
                "geofence[0].name",
            ),
            ("[[geofence]]\nname = \"c\"\n", "geofence[0]"),
            (
                "[geography]\ntransitions_topic = \"a/{fence}\"\n",
                "geography.transitions_topic",
            ),
            (
                "[geography]\nlocation = { lat = \"/lat\" }\n",
                "geography.location",
            ),
        ] {
            let err = validate(SQUARES, toml).unwrap_err();
            assert!(err.contains(key), "{key} not in {err}");
        }
    }

    #[test]
    fn config_check_warns_about_regions_a_route_would_dead_letter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fences.geojson");
        std::fs::write(&file, SQUARES).expect("write");
        let warnings = |route: &str| {
            let text = with_route(route).replace("{FILE}", &file.display().to_string());
            let config = Config::from_toml(&text, Path::new("t.toml")).expect("parses");
            let validated = crate::plan::compile(&config).expect("valid");
            validated.geo.warnings(&validated.routes)
        };
        let w = warnings("upstream = \"west-cloud\"");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("route \"r\"") && w[0].contains("region e"),
            "{w:?}"
        );
        assert!(warnings("upstream = \"west-cloud\"\nwhen = { not_in = \"e\" }").is_empty());
        assert!(warnings("upstream = \"west-cloud\"\nwhen = { in = \"w\" }").is_empty());
        assert!(warnings("upstream = \"any-cloud\"").is_empty());
    }

    /// The README's worked example stays valid, and `config check` has nothing to say about it.
    #[test]
    fn the_worked_example_is_valid_without_warnings() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/geography.toml");
        let config = Config::load(&path).expect("loads");
        let validated = crate::plan::compile(&config).expect("valid");
        assert_eq!(validated.geo.geography.fences().len(), 178);
        assert!(validated.geo.residency);
        assert!(validated.geo.warnings(&validated.routes).is_empty());
    }

    /// A locator for `toml` (with `{FILE}` the two squares), and its route table.
    fn make_locator(toml: &str, registry: Vec<DevicePosition>) -> (Locator, RouteTable) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fences.geojson");
        std::fs::write(&file, SQUARES).expect("write");
        let text = toml.replace("{FILE}", &file.display().to_string());
        let config = Config::from_toml(&text, Path::new("t.toml")).expect("parses");
        let validated = crate::plan::compile(&config).expect("valid");
        let locator = Locator::new(Arc::new(validated.geo), "gw", registry);
        (locator, validated.routes)
    }

    fn at(lat: f64, lon: f64) -> Location {
        Location::new(lat, lon).expect("valid")
    }

    const SOURCES: &str = r#"
        [geography]
        gateway_position = [5.0, 25.0]
        gps_topic = "gps"
        transitions_topic = "fences/{gateway}/{device}"
        [[geofence]]
        file = "{FILE}"
        [[device]]
        id = "fixed"
        position = [5.0, 5.0]
        [[route]]
        name = "flat"
        filter = "t/#"
        [[route]]
        name = "geojson"
        filter = "g/#"
        location = { position = "/pos" }
    "#;

    #[test]
    fn locations_come_from_payload_then_device_then_gateway() {
        let remembered = DevicePosition {
            device: "mover".into(),
            lat: 1.0,
            lon: 1.0,
            fences: vec!["west".into()],
            updated_ms: 1,
        };
        let (locator, _) = make_locator(SOURCES, vec![remembered]);
        let payload = serde_json::json!({ "lat": 2.0, "lon": 3.0, "pos": [21.0, 4.0] });
        let empty = serde_json::json!({ "temp": 1 });
        let resolve =
            |route, payload: &Value, device| locator.resolve(route, Some(payload), device);
        assert_eq!(
            resolve(0, &payload, "mover"),
            Ok(Some((at(2.0, 3.0), Source::Payload)))
        );
        // The route's own pointers: a GeoJSON [lon, lat] array.
        assert_eq!(
            resolve(1, &payload, "mover"),
            Ok(Some((at(4.0, 21.0), Source::Payload)))
        );
        assert_eq!(
            resolve(0, &empty, "mover"),
            Ok(Some((at(1.0, 1.0), Source::Device)))
        );
        assert_eq!(
            resolve(0, &empty, "fixed"),
            Ok(Some((at(5.0, 5.0), Source::Device)))
        );
        assert_eq!(
            resolve(0, &empty, "stranger"),
            Ok(Some((at(5.0, 25.0), Source::Gateway)))
        );
        // A GPS fix replaces the configured gateway position.
        let fix = locator
            .gps_fix(
                "gps",
                Some(&serde_json::json!({ "lat": 6.0, "lon": 26.0 })),
                9,
            )
            .expect("valid fix")
            .expect("a fix");
        assert_eq!(
            (fix.device.as_str(), fix.lat, fix.lon),
            ("$gateway", 6.0, 26.0)
        );
        assert_eq!(
            resolve(0, &empty, "stranger"),
            Ok(Some((at(6.0, 26.0), Source::Gateway)))
        );
        assert!(locator
            .gps_fix("other", Some(&payload), 9)
            .expect("ok")
            .is_none());
        assert!(locator
            .gps_fix(
                "gps",
                Some(&serde_json::json!({ "lat": "north", "lon": 1 })),
                9
            )
            .is_err());
        // Invalid coordinates are an error, never another source.
        for bad in [
            serde_json::json!({ "lat": 91.0, "lon": 0.0 }),
            serde_json::json!({ "lat": "abc", "lon": 0.0 }),
            serde_json::json!({ "lat": 0.0, "lon": -180.5 }),
        ] {
            assert!(resolve(0, &bad, "mover").is_err(), "{bad}");
        }
    }

    #[test]
    fn observing_positions_yields_transitions_once() {
        let (locator, _) = make_locator(SOURCES, Vec::new());
        let mut placement = Placement::default();
        let mut step = |lat: f64, lon: f64| {
            let mut out = Observed::default();
            locator.place(at(lat, lon), &mut placement);
            locator.observe("truck", at(lat, lon), &placement, 7, &mut out);
            out
        };
        let kinds = |out: &Observed| -> Vec<String> {
            out.transitions
                .iter()
                .map(|(topic, payload)| {
                    assert_eq!(topic, "fences/gw/truck");
                    let v: Value = serde_json::from_slice(payload).expect("json");
                    format!(
                        "{} {}",
                        v["transition"].as_str().unwrap_or("?"),
                        v["fence"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        };
        assert_eq!(kinds(&step(5.0, 5.0)), vec!["enter west"]);
        let same = step(5.0, 5.0);
        assert!(same.transitions.is_empty() && same.positions.is_empty());
        // Moved within the fence: the registry row changes, no transition.
        let moved = step(6.0, 6.0);
        assert!(moved.transitions.is_empty());
        assert_eq!(moved.positions.len(), 1);
        assert_eq!(kinds(&step(5.0, 25.0)), vec!["exit west", "enter east"]);
        assert_eq!(kinds(&step(-5.0, 15.0)), vec!["exit east"]);
        // A restart with the stored registry remembers the set: no transition again.
        let stored = step(5.0, 25.0).positions;
        assert_eq!(stored[0].fences, vec!["east".to_string()]);
        let (restarted, _) = make_locator(SOURCES, stored);
        let mut out = Observed::default();
        restarted.place(at(5.0, 25.0), &mut placement);
        restarted.observe("truck", at(5.0, 25.0), &placement, 8, &mut out);
        assert!(out.transitions.is_empty());
    }

    #[test]
    fn transitions_topic_placeholders() {
        assert!(check_transitions_topic("outpost/{gateway}/geofence/{device}").is_ok());
        assert!(check_transitions_topic("x/{devise}").is_err());
        assert!(check_transitions_topic("x/#").is_err());
        assert!(check_transitions_topic("").is_err());
    }
}
