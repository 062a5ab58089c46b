//! Geography: locations, geofences, regions and the spatial index that says which of them
//! contain a point (issue 5; invariant 8 of `ARCHITECTURE.md`, "data stays in its
//! jurisdiction").
//!
//! Pure: nothing here reads files, clocks or sockets. The caller hands over GeoJSON text and
//! parsed payloads; this module validates them, builds an immutable [`Geography`] and answers
//! [`Geography::locate`] for one event at a time.
//!
//! - A [`Location`] is a WGS 84 position that is always valid (finite, latitude in -90..=90,
//!   longitude in -180..=180): the only way to make one is [`Location::new`] (or a function
//!   that calls it), so code that holds one never checks again.
//! - [`location_from_json`] and [`location_from_json_array`] read a location out of a JSON
//!   payload by JSON pointers (RFC 6901). A field that is absent is "no location" (`Ok(None)`);
//!   a field that is present but unusable is a per-event error ([`GeoError`]), never a panic.
//! - A [`Fence`] is a named area: a polygon or multipolygon with holes (from GeoJSON) or a
//!   circle (centre and radius in metres, measured along the WGS 84 ellipsoid). A region is a
//!   named group of fences (region `eu` = the member states' polygons).
//! - [`GeographyBuilder`] validates everything at load time with errors that name the feature
//!   (empty file, not JSON, wrong geometry types, rings not closed or too short, coordinates out
//!   of range, duplicate or missing names, regions naming unknown fences). Loading never panics
//!   on any input (property-tested).
//! - [`Geography::locate`] finds the fences and regions containing a point: an R*-tree
//!   (`rstar`) of the bounding boxes of every polygon and circle gives the candidates whose box
//!   contains the point, then each candidate is tested exactly (an interval tree of the
//!   polygon's edges from `geo`, or the geodesic distance to a circle's centre). The cost grows
//!   with the fences near the point, not with the number of fences loaded.
//!
//! Boundaries: a point exactly on a polygon's boundary is *not* inside it (`geo`'s `Contains`),
//! so a point on the border between two countries belongs to neither rather than to both (a row
//! tagged with both would need a link allowed for both). A circle includes its rim (distance
//! <= radius). Coordinates are planar longitude/latitude for polygons, as GeoJSON (RFC 7946)
//! defines them: a polygon that crosses the antimeridian must be split there, as RFC 7946
//! section 3.1.9 asks (Natural Earth's data already is).

pub mod locator;
pub(crate) mod residency;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use geo::indexed::IntervalTreeMultiPolygon;
use geo::orient::{Direction, Orient};
use geo::{
    BoundingRect, Contains, Coord, Distance, Geodesic, HaversineMeasure, LineString, MultiPolygon,
    Point, Polygon,
};
use geojson::{GeometryValue, Position};
use rstar::primitives::{GeomWithData, Rectangle};
use rstar::RTree;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a location, a payload's position or a geography could not be made.
///
/// The location variants ([`GeoError::Latitude`], [`GeoError::Longitude`],
/// [`GeoError::NotANumber`], [`GeoError::NotAPosition`], [`GeoError::Pointer`]) are per-event
/// errors: the router counts them and carries on. The others come from loading geofences and
/// name the feature, fence or region at fault; they are configuration errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeoError {
    /// A latitude that is NaN, infinite or outside -90..=90.
    #[error("latitude {0} is not a number in [-90, 90]")]
    Latitude(f64),
    /// A longitude that is NaN, infinite or outside -180..=180.
    #[error("longitude {0} is not a number in [-180, 180]")]
    Longitude(f64),
    /// A JSON pointer that is neither empty nor starts with `/`, or has a `~` not followed by
    /// `0` or `1` (RFC 6901).
    #[error("invalid JSON pointer `{0}`: it must be empty or start with `/`, and `~` must be followed by 0 or 1 (RFC 6901)")]
    Pointer(String),
    /// A coordinate field that is present but not a JSON number.
    #[error("`{pointer}` is {found}, not a number")]
    NotANumber {
        /// The JSON pointer of the field.
        pointer: String,
        /// What the field is instead ("a string", "a boolean", ...).
        found: &'static str,
    },
    /// A position field that is present but not a `[longitude, latitude]` array of numbers.
    #[error("`{pointer}` is {found}, not a [longitude, latitude] array of numbers")]
    NotAPosition {
        /// The JSON pointer of the field.
        pointer: String,
        /// What the field is instead.
        found: String,
    },
    /// GeoJSON text that is empty or only white space.
    #[error("the GeoJSON is empty")]
    Empty,
    /// GeoJSON text that is not JSON (or not UTF-8).
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON that is not a FeatureCollection, a Feature or a geometry.
    #[error("not GeoJSON: {0}")]
    NotGeoJson(String),
    /// A FeatureCollection without features.
    #[error("the FeatureCollection has no features")]
    NoFeatures,
    /// A feature or geometry that GeoJSON does not allow (the reason says what).
    #[error("{feature}: {reason}")]
    Invalid {
        /// Which feature: `features[3] "France"`, `the feature "France"`, `the geometry`.
        feature: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A geometry other than Polygon or MultiPolygon (Point, LineString, GeometryCollection, ...).
    #[error("{feature}: a {found} is not a geofence (only Polygon and MultiPolygon are)")]
    GeometryType {
        /// Which feature.
        feature: String,
        /// The geometry type found.
        found: String,
    },
    /// A linear ring whose last position is not its first.
    #[error("{feature}: ring {ring} of polygon {polygon} is not closed (first position {first:?}, last {last:?})")]
    RingNotClosed {
        /// Which feature.
        feature: String,
        /// The polygon's index in its MultiPolygon (0 for a Polygon).
        polygon: usize,
        /// The ring's index in its polygon (0 is the exterior).
        ring: usize,
        /// The first position, `[longitude, latitude]`.
        first: [f64; 2],
        /// The last position, `[longitude, latitude]`.
        last: [f64; 2],
    },
    /// A linear ring with fewer than 4 positions (RFC 7946 section 3.1.6).
    #[error("{feature}: ring {ring} of polygon {polygon} has {positions} positions, a ring needs at least 4")]
    RingTooShort {
        /// Which feature.
        feature: String,
        /// The polygon's index in its MultiPolygon (0 for a Polygon).
        polygon: usize,
        /// The ring's index in its polygon (0 is the exterior).
        ring: usize,
        /// How many positions it has.
        positions: usize,
    },
    /// A position outside longitude -180..=180 or latitude -90..=90.
    #[error("{feature}: position [{lon}, {lat}] is out of range (longitude -180..180, latitude -90..90)")]
    CoordinateOutOfRange {
        /// Which feature.
        feature: String,
        /// The longitude found.
        lon: f64,
        /// The latitude found.
        lat: f64,
    },
    /// A feature without the property that names it (see [`GeoJsonOptions::name_property`]).
    #[error("{feature}: no `{property}` to name it by")]
    MissingName {
        /// Which feature.
        feature: String,
        /// The naming property.
        property: String,
    },
    /// A geofence name used twice (in one file, across files, or by a circle).
    #[error("duplicate geofence name `{0}`")]
    DuplicateFence(String),
    /// An empty geofence or region name.
    #[error("empty {0} name")]
    EmptyName(&'static str),
    /// Names selected with [`GeoJsonOptions::only`] that no feature has.
    #[error("selected geofences not in the GeoJSON: {}", .0.join(", "))]
    NotFound(Vec<String>),
    /// A bare geometry loaded without [`GeoJsonOptions::geometry_name`].
    #[error("a bare {0} geometry has no name: give one (geometry_name)")]
    UnnamedGeometry(String),
    /// A circle radius that is not a finite number above 0.
    #[error("geofence `{name}`: radius {radius_m} m is not a number above 0")]
    Radius {
        /// The circle's name.
        name: String,
        /// The radius given.
        radius_m: f64,
    },
    /// A region name used twice.
    #[error("duplicate region name `{0}`")]
    DuplicateRegion(String),
    /// A region with the name of a geofence: route predicates name either, so the two share
    /// one namespace.
    #[error("region `{0}` has the same name as a geofence")]
    RegionNamedLikeFence(String),
    /// A region without geofences.
    #[error("region `{0}` has no geofences")]
    EmptyRegion(String),
    /// A region naming a geofence that was not added.
    #[error("region `{region}` names geofence `{fence}`, which does not exist")]
    UnknownFence {
        /// The region.
        region: String,
        /// The name it gives that is not a geofence.
        fence: String,
    },
}

/// A WGS 84 position in degrees, always valid: finite, latitude in -90..=90 and longitude in
/// -180..=180. The fields are private so that no invalid one can exist; deserializing one
/// checks the same ranges.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLocation")]
pub struct Location {
    lat: f64,
    lon: f64,
}

/// The unchecked form a [`Location`] is deserialized from.
#[derive(Deserialize)]
struct RawLocation {
    lat: f64,
    lon: f64,
}

impl TryFrom<RawLocation> for Location {
    type Error = GeoError;

    fn try_from(raw: RawLocation) -> Result<Self, GeoError> {
        Location::new(raw.lat, raw.lon)
    }
}

impl Location {
    /// The location at `lat`, `lon` (degrees), or an error naming the value when either is NaN,
    /// infinite or out of range (latitude -90..=90, longitude -180..=180, bounds included).
    pub fn new(lat: f64, lon: f64) -> Result<Location, GeoError> {
        // `contains` is false for NaN, and infinities are outside the ranges.
        if !(-90.0..=90.0).contains(&lat) {
            return Err(GeoError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lon) {
            return Err(GeoError::Longitude(lon));
        }
        Ok(Location { lat, lon })
    }

    /// Latitude in degrees, -90..=90.
    pub fn lat(&self) -> f64 {
        self.lat
    }

    /// Longitude in degrees, -180..=180.
    pub fn lon(&self) -> f64 {
        self.lon
    }

    /// The same position as a `geo` point (x = longitude, y = latitude).
    fn point(self) -> Point<f64> {
        Point::new(self.lon, self.lat)
    }
}

impl From<Location> for crate::event::Location {
    fn from(at: Location) -> Self {
        crate::event::Location {
            lat: at.lat,
            lon: at.lon,
        }
    }
}

impl TryFrom<crate::event::Location> for Location {
    type Error = GeoError;

    /// Checks the ranges that `event::Location`'s public fields do not enforce.
    fn try_from(at: crate::event::Location) -> Result<Self, GeoError> {
        Location::new(at.lat, at.lon)
    }
}

/// Checks that `pointer` is a JSON pointer (RFC 6901): empty, or `/` followed by reference
/// tokens in which every `~` is followed by `0` or `1`. For configuration: a pointer that is
/// not one would silently find nothing in every payload.
pub fn check_pointer(pointer: &str) -> Result<(), GeoError> {
    let bad = || GeoError::Pointer(pointer.to_string());
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(bad());
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(bad());
        }
    }
    Ok(())
}

/// The location whose latitude is at `lat_pointer` and longitude at `lon_pointer` (JSON
/// pointers, RFC 6901, e.g. `/lat` or `/position/latitude`) in `payload`.
///
/// - `Ok(None)` when either field is absent or `null` (a device without a fix).
/// - `Err` when a field is present but not a number (a string, a boolean, an object, ...),
///   when a number is out of range, or when a pointer does not start with `/`.
///
/// Never panics. (`serde_json` allocates a little while it follows a pointer: about 0.2 µs per
/// call, see `BENCHMARKS.md`.)
pub fn location_from_json(
    payload: &Value,
    lat_pointer: &str,
    lon_pointer: &str,
) -> Result<Option<Location>, GeoError> {
    let (Some(lat), Some(lon)) = (field(payload, lat_pointer)?, field(payload, lon_pointer)?)
    else {
        return Ok(None);
    };
    let lat = number(lat, lat_pointer)?;
    let lon = number(lon, lon_pointer)?;
    Location::new(lat, lon).map(Some)
}

/// The location in a GeoJSON-style position at `pointer` in `payload`: an array
/// `[longitude, latitude]` or `[longitude, latitude, altitude]` (the altitude is ignored).
///
/// - `Ok(None)` when the field is absent or `null`.
/// - `Err` when it is anything else than an array of 2 or 3 numbers, when a number is out of
///   range, or when the pointer does not start with `/`.
///
/// Never panics.
pub fn location_from_json_array(
    payload: &Value,
    pointer: &str,
) -> Result<Option<Location>, GeoError> {
    let Some(value) = field(payload, pointer)? else {
        return Ok(None);
    };
    let not_a_position = |found: String| GeoError::NotAPosition {
        pointer: pointer.to_string(),
        found,
    };
    let Value::Array(items) = value else {
        return Err(not_a_position(kind(value).to_string()));
    };
    if !(2..=3).contains(&items.len()) {
        return Err(not_a_position(format!(
            "an array of {} elements",
            items.len()
        )));
    }
    let mut coordinates = [0.0; 2];
    for (i, (item, slot)) in items.iter().zip(coordinates.iter_mut()).enumerate() {
        *slot = item.as_f64().ok_or_else(|| {
            not_a_position(format!("an array whose element {i} is {}", kind(item)))
        })?;
    }
    if let Some(altitude) = items.get(2) {
        if !altitude.is_number() {
            return Err(not_a_position(format!(
                "an array whose element 2 is {}",
                kind(altitude)
            )));
        }
    }
    let [lon, lat] = coordinates;
    Location::new(lat, lon).map(Some)
}

/// The value at `pointer`, `None` for absent or `null`.
fn field<'a>(payload: &'a Value, pointer: &str) -> Result<Option<&'a Value>, GeoError> {
    // serde_json's `pointer` answers `None` for a pointer without the leading `/`, which would
    // make a misconfigured pointer look like "no location" on every event.
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(GeoError::Pointer(pointer.to_string()));
    }
    Ok(payload.pointer(pointer).filter(|v| !v.is_null()))
}

/// The number at `pointer`, or the per-event error saying what is there instead.
fn number(value: &Value, pointer: &str) -> Result<f64, GeoError> {
    value.as_f64().ok_or_else(|| GeoError::NotANumber {
        pointer: pointer.to_string(),
        found: kind(value),
    })
}

/// What a JSON value is, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The area of a [`Fence`].
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Polygons with their holes, in longitude/latitude (x = longitude, y = latitude). Each
    /// exterior ring is counter-clockwise and each hole clockwise, whatever the GeoJSON had.
    Area(MultiPolygon<f64>),
    /// Every point whose geodesic distance (WGS 84) from `centre` is at most `radius_m`.
    Circle {
        /// The centre.
        centre: Location,
        /// The radius in metres, finite and above 0.
        radius_m: f64,
    },
}

/// A named geofence.
#[derive(Debug, Clone, PartialEq)]
pub struct Fence {
    name: Arc<str>,
    shape: Shape,
}

impl Fence {
    /// The fence's name, unique in its [`Geography`] and never empty.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fence's area.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Whether the fence contains `at`, by testing this one fence exactly, without the index:
    /// a polygon's interior (boundary excluded), a circle's disc (rim included).
    /// [`Geography::locate`] gives the same answer for every fence at once, faster.
    pub fn contains(&self, at: Location) -> bool {
        match &self.shape {
            Shape::Area(area) => area.contains(&at.point()),
            Shape::Circle { centre, radius_m } => {
                Geodesic.distance(centre.point(), at.point()) <= *radius_m
            }
        }
    }
}

/// A named group of fences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    name: Arc<str>,
    fences: Vec<Arc<str>>,
}

impl Region {
    /// The region's name, unique in its [`Geography`], never empty and never a fence's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names of its fences, sorted, without duplicates, never empty; every one is a fence
    /// of the same [`Geography`].
    pub fn fences(&self) -> impl Iterator<Item = &str> {
        self.fences.iter().map(|f| &**f)
    }
}

/// Where a point is: the fences and the regions that contain it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Names of the fences containing the point, sorted, without duplicates.
    pub fences: Vec<Arc<str>>,
    /// Names of the regions with at least one of those fences, sorted, without duplicates.
    pub regions: Vec<Arc<str>>,
}

impl Placement {
    /// Whether the point is in no fence (and so in no region).
    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }
}

/// How [`GeographyBuilder::add_geojson`] reads a GeoJSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeoJsonOptions {
    /// The feature property that names each fence (default `name`). Its value must be a
    /// non-empty string or a number. For `id`, a feature without `properties.id` is named by
    /// its top-level `id` member (RFC 7946 section 3.2); for any other property there is no
    /// such fallback.
    pub name_property: String,
    /// Only the features with these names become fences (all when `None`). A name that no
    /// feature has is an error; features that have no name at all are skipped rather than
    /// refused when a selection is given, since none of them can be selected.
    pub only: Option<Vec<String>>,
    /// The fence name for a document that is a bare Polygon or MultiPolygon geometry (which has
    /// no properties to be named by).
    pub geometry_name: Option<String>,
}

impl Default for GeoJsonOptions {
    fn default() -> Self {
        GeoJsonOptions {
            name_property: "name".to_string(),
            only: None,
            geometry_name: None,
        }
    }
}

impl GeoJsonOptions {
    /// Options naming features by `property`, everything else as by default.
    pub fn named_by(property: impl Into<String>) -> Self {
        GeoJsonOptions {
            name_property: property.into(),
            ..GeoJsonOptions::default()
        }
    }
}

/// Collects fences and regions, validating each as it comes, then builds a [`Geography`].
///
/// A method that returns an error leaves the builder as it was before the call.
#[derive(Debug, Default)]
pub struct GeographyBuilder {
    fences: Vec<Fence>,
    fence_names: HashSet<Arc<str>>,
    regions: Vec<(String, Vec<String>)>,
    region_names: HashSet<String>,
}

impl GeographyBuilder {
    /// Adds the Polygon and MultiPolygon features of a GeoJSON document (a FeatureCollection, a
    /// Feature, or a bare Polygon or MultiPolygon geometry named by
    /// [`GeoJsonOptions::geometry_name`]) as fences, and returns how many were added.
    ///
    /// Refuses, naming the feature: an empty document, text that is not JSON, JSON that is not
    /// GeoJSON, an empty FeatureCollection, other geometry types (Point, LineString,
    /// GeometryCollection, ...) and features without geometry, rings that are not closed or
    /// have fewer than 4 positions, positions out of range, features without a name, names
    /// already taken, and selected names that are not in the document. Nothing is added when
    /// anything is refused. Never panics, whatever the bytes.
    pub fn add_geojson(
        &mut self,
        geojson: impl AsRef<[u8]>,
        options: &GeoJsonOptions,
    ) -> Result<usize, GeoError> {
        let fences = read_geojson(geojson.as_ref(), options)?;
        let mut seen = HashSet::new();
        for fence in &fences {
            if self.fence_names.contains(&fence.name) || !seen.insert(fence.name.clone()) {
                return Err(GeoError::DuplicateFence(fence.name.to_string()));
            }
        }
        let added = fences.len();
        self.fence_names.extend(seen);
        self.fences.extend(fences);
        Ok(added)
    }

    /// Adds a circle fence: every point within `radius_m` metres of `centre` along the WGS 84
    /// ellipsoid. Refuses an empty or taken name and a radius that is not a finite number
    /// above 0.
    pub fn add_circle(
        &mut self,
        name: impl Into<String>,
        centre: Location,
        radius_m: f64,
    ) -> Result<(), GeoError> {
        let name: String = name.into();
        if name.is_empty() {
            return Err(GeoError::EmptyName("geofence"));
        }
        if !(radius_m.is_finite() && radius_m > 0.0) {
            return Err(GeoError::Radius { name, radius_m });
        }
        let name: Arc<str> = name.into();
        if self.fence_names.contains(&name) {
            return Err(GeoError::DuplicateFence(name.to_string()));
        }
        self.fence_names.insert(name.clone());
        self.fences.push(Fence {
            name,
            shape: Shape::Circle { centre, radius_m },
        });
        Ok(())
    }

    /// Adds a region grouping the named fences. Refuses an empty or taken region name; whether
    /// the fences exist (fences may be added after their region) and whether the region's name
    /// is also a fence's is checked by [`GeographyBuilder::build`].
    pub fn add_region<I, S>(&mut self, name: impl Into<String>, fences: I) -> Result<(), GeoError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let name: String = name.into();
        if name.is_empty() {
            return Err(GeoError::EmptyName("region"));
        }
        if self.region_names.contains(&name) {
            return Err(GeoError::DuplicateRegion(name));
        }
        self.region_names.insert(name.clone());
        self.regions
            .push((name, fences.into_iter().map(Into::into).collect()));
        Ok(())
    }

    /// Builds the index. Refuses a region without fences, a region naming a fence that was not
    /// added, and a region with a fence's name.
    pub fn build(self) -> Result<Geography, GeoError> {
        let mut fences = self.fences;
        // Sorted by name so that `fence` and `region` can search by name.
        fences.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name: HashMap<&str, u32> = fences
            .iter()
            .enumerate()
            .map(|(i, f)| (&*f.name, i as u32))
            .collect();

        let mut regions = self.regions;
        regions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut fence_regions: Vec<Vec<Arc<str>>> = vec![Vec::new(); fences.len()];
        let mut built = Vec::with_capacity(regions.len());
        for (name, members) in regions {
            if by_name.contains_key(name.as_str()) {
                return Err(GeoError::RegionNamedLikeFence(name));
            }
            if members.is_empty() {
                return Err(GeoError::EmptyRegion(name));
            }
            let mut indices = Vec::with_capacity(members.len());
            for fence in members {
                match by_name.get(fence.as_str()) {
                    Some(&i) => indices.push(i),
                    None => {
                        return Err(GeoError::UnknownFence {
                            region: name,
                            fence,
                        })
                    }
                }
            }
            indices.sort_unstable();
            indices.dedup();
            let name: Arc<str> = name.into();
            for &i in &indices {
                fence_regions[i as usize].push(name.clone());
            }
            built.push(Region {
                name,
                fences: indices
                    .iter()
                    .map(|&i| fences[i as usize].name.clone())
                    .collect(),
            });
        }

        let mut targets = Vec::new();
        let mut boxes = Vec::new();
        for (i, fence) in fences.iter().enumerate() {
            let fence_index = i as u32;
            match &fence.shape {
                Shape::Area(area) => {
                    // One entry per polygon, not per fence: a country with far-flung islands
                    // has a huge bounding box, its parts have small ones.
                    for polygon in &area.0 {
                        let Some(rect) = polygon.bounding_rect() else {
                            continue;
                        };
                        boxes.push(GeomWithData::new(
                            Rectangle::from_corners(
                                [rect.min().x, rect.min().y],
                                [rect.max().x, rect.max().y],
                            ),
                            targets.len() as u32,
                        ));
                        targets.push(Target::Part {
                            fence: fence_index,
                            edges: IntervalTreeMultiPolygon::new(&MultiPolygon(vec![
                                polygon.clone()
                            ])),
                        });
                    }
                }
                Shape::Circle { centre, radius_m } => {
                    for [lower, upper] in circle_boxes(*centre, *radius_m) {
                        boxes.push(GeomWithData::new(
                            Rectangle::from_corners(lower, upper),
                            targets.len() as u32,
                        ));
                    }
                    targets.push(Target::Circle {
                        fence: fence_index,
                        centre: centre.point(),
                        radius_m: *radius_m,
                    });
                }
            }
        }

        Ok(Geography {
            fences,
            regions: built,
            fence_regions,
            targets,
            index: RTree::bulk_load(boxes),
        })
    }
}

/// What the index points at: one polygon of a fence, or a circle.
enum Target {
    Part {
        fence: u32,
        /// The polygon's edges in an interval tree: point-in-polygon in about O(log n) instead
        /// of a walk along every edge (a country has up to hundreds of vertices at 1:110m, thousands at 1:10m).
        edges: IntervalTreeMultiPolygon<f64>,
    },
    Circle {
        fence: u32,
        centre: Point<f64>,
        radius_m: f64,
    },
}

/// Fences and regions with their spatial index; immutable, cheap to share (`Send + Sync`).
pub struct Geography {
    /// Sorted by name; the index of a fence here is its id everywhere below.
    fences: Vec<Fence>,
    /// Sorted by name.
    regions: Vec<Region>,
    /// The regions of each fence, sorted.
    fence_regions: Vec<Vec<Arc<str>>>,
    targets: Vec<Target>,
    /// Bounding boxes (longitude, latitude) of every polygon and circle, pointing into
    /// `targets` (a circle across the antimeridian has two boxes).
    index: RTree<GeomWithData<Rectangle<[f64; 2]>, u32>>,
}

impl fmt::Debug for Geography {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Geography")
            .field("fences", &self.fences.len())
            .field("regions", &self.regions.len())
            .field("indexed_boxes", &self.index.size())
            .finish()
    }
}

impl Geography {
    /// A builder with no fences and no regions.
    pub fn builder() -> GeographyBuilder {
        GeographyBuilder::default()
    }

    /// A geography with no fences and no regions: every point is in none.
    pub fn empty() -> Geography {
        Geography {
            fences: Vec::new(),
            regions: Vec::new(),
            fence_regions: Vec::new(),
            targets: Vec::new(),
            index: RTree::new(),
        }
    }

    /// Every fence, sorted by name.
    pub fn fences(&self) -> &[Fence] {
        &self.fences
    }

    /// The fence named `name`, if there is one.
    pub fn fence(&self, name: &str) -> Option<&Fence> {
        self.fences
            .binary_search_by(|f| (*f.name).cmp(name))
            .ok()
            .and_then(|i| self.fences.get(i))
    }

    /// Every region, sorted by name.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region named `name`, if there is one.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions
            .binary_search_by(|r| (*r.name).cmp(name))
            .ok()
            .and_then(|i| self.regions.get(i))
    }

    /// The fences and regions containing `at`: exactly those whose [`Fence::contains`] is true
    /// (for polygons whose rings do not cross themselves or each other, which GeoJSON requires;
    /// the index counts winding numbers where `Fence::contains` tests rings one by one), sorted
    /// and without duplicates. Allocates nothing when `at` is in no fence.
    pub fn locate(&self, at: Location) -> Placement {
        let mut placement = Placement::default();
        self.locate_into(at, &mut placement);
        placement
    }

    /// [`Geography::locate`] into `out` (cleared first), reusing its vectors so that a caller
    /// who keeps one `Placement` allocates only when a point is in more places than before.
    pub fn locate_into(&self, at: Location, out: &mut Placement) {
        out.fences.clear();
        out.regions.clear();
        let coord = Coord {
            x: at.lon,
            y: at.lat,
        };
        for entry in self.index.locate_all_at_point(&[at.lon, at.lat]) {
            let (fence, inside) = match self.targets.get(entry.data as usize) {
                Some(Target::Part { fence, edges }) => (*fence, edges.contains(&coord)),
                Some(Target::Circle {
                    fence,
                    centre,
                    radius_m,
                }) => (*fence, within(*centre, Point(coord), *radius_m)),
                None => continue,
            };
            if !inside {
                continue;
            }
            if let (Some(f), Some(regions)) = (
                self.fences.get(fence as usize),
                self.fence_regions.get(fence as usize),
            ) {
                out.fences.push(f.name.clone());
                out.regions.extend(regions.iter().cloned());
            }
        }
        // Usually zero or one hit: nothing to sort. Several parts of one fence, or several
        // fences of one region, give duplicates.
        if out.fences.len() > 1 {
            out.fences.sort_unstable();
            out.fences.dedup();
        }
        if out.regions.len() > 1 {
            out.regions.sort_unstable();
            out.regions.dedup();
        }
    }

    /// The geodesic distance in metres between `a` and `b` on the WGS 84 ellipsoid (Karney's
    /// algorithm, accurate to nanometres, also for nearly antipodal points).
    pub fn distance_m(a: Location, b: Location) -> f64 {
        Geodesic.distance(a.point(), b.point())
    }

    /// Whether `b` is within `radius_m` metres of `a`: the same answer as comparing
    /// [`Geography::distance_m`], computed exactly only when two spheres' bounds leave it open
    /// (as for circles), so usually about ten times cheaper.
    pub fn within_m(a: Location, b: Location, radius_m: f64) -> bool {
        within(a.point(), b.point(), radius_m)
    }
}

/// The radius of a sphere whose distances are never longer than the WGS 84 ellipsoid's between
/// the same latitudes and longitudes: below both radii of curvature everywhere (the smallest is
/// the meridional one at the equator, 6,335,439 m), so every path is at least as long on the
/// ellipsoid. A circle's bounding box computed on it therefore contains the circle on the
/// ellipsoid, and a point farther than the radius on it is outside the circle.
const SMALL_SPHERE_RADIUS_M: f64 = 6_335_000.0;

/// The radius of a sphere whose distances are never shorter than the ellipsoid's: above both
/// radii of curvature everywhere (the largest is at the poles, a^2 / b = 6,399,594 m). A point
/// within the radius on it is inside the circle.
const LARGE_SPHERE_RADIUS_M: f64 = 6_400_000.0;

/// The sphere of radius 1, whose haversine distance is the central angle in radians.
const UNIT_SPHERE: HaversineMeasure = HaversineMeasure::new(1.0);

/// Whether `at` is within `radius_m` of `centre` along the WGS 84 ellipsoid: the same answer as
/// comparing [`Geodesic`] distance, which costs about a microsecond (Karney's iterative
/// solution), so it is computed only for the points whose spherical distances leave the answer
/// open (within about 1% of the rim). The two spheres' distances bracket the ellipsoid's.
fn within(centre: Point<f64>, at: Point<f64>, radius_m: f64) -> bool {
    let angle = UNIT_SPHERE.distance(centre, at);
    // A NaN angle (rounding near antipodes) fails both tests and falls through.
    if angle * SMALL_SPHERE_RADIUS_M > radius_m {
        return false;
    }
    if angle * LARGE_SPHERE_RADIUS_M <= radius_m {
        return true;
    }
    Geodesic.distance(centre, at) <= radius_m
}

/// Bounding boxes (`[[lon, lat] lower, [lon, lat] upper]`) that together contain the geodesic
/// circle of `radius_m` around `centre`: one box, two when it crosses the antimeridian.
fn circle_boxes(centre: Location, radius_m: f64) -> Vec<[[f64; 2]; 2]> {
    // The spherical cap of the same radius on the small sphere contains the circle; its exact
    // latitude and longitude extents bound it. A relative and an absolute margin cover
    // rounding.
    let angle = radius_m / SMALL_SPHERE_RADIUS_M * (1.0 + 1e-9);
    let delta = angle.to_degrees() + 1e-9;
    let south = centre.lat - delta;
    let north = centre.lat + delta;
    if north >= 90.0 || south <= -90.0 {
        // The cap reaches a pole: every longitude.
        return vec![[[-180.0, south.max(-90.0)], [180.0, north.min(90.0)]]];
    }
    // Widest longitude of a cap of angular radius `angle` centred at latitude `lat`:
    // asin(sin(angle) / cos(lat)), defined since the cap does not reach the pole.
    let ratio = angle.sin() / centre.lat.to_radians().cos();
    let half_width = if ratio >= 1.0 {
        180.0
    } else {
        ratio.asin().to_degrees() * (1.0 + 1e-9) + 1e-9
    };
    if half_width >= 180.0 {
        return vec![[[-180.0, south], [180.0, north]]];
    }
    let west = centre.lon - half_width;
    let east = centre.lon + half_width;
    if west < -180.0 {
        vec![
            [[-180.0, south], [east, north]],
            [[west + 360.0, south], [180.0, north]],
        ]
    } else if east > 180.0 {
        vec![
            [[west, south], [180.0, north]],
            [[-180.0, south], [east - 360.0, north]],
        ]
    } else {
        vec![[[west, south], [east, north]]]
    }
}

/// Reads and validates a GeoJSON document into fences (names not yet checked for clashes with
/// fences already added).
fn read_geojson(bytes: &[u8], options: &GeoJsonOptions) -> Result<Vec<Fence>, GeoError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(GeoError::Empty);
    }
    // Parse to a JSON tree first, then each feature on its own: an error in one feature can
    // then name it, which a single typed parse of the whole document could not.
    let document: Value =
        serde_json::from_slice(bytes).map_err(|e| GeoError::NotJson(e.to_string()))?;
    let Some(kind) = document.get("type").and_then(Value::as_str) else {
        return Err(GeoError::NotGeoJson(format!(
            "expected an object with a `type` (FeatureCollection, Feature, Polygon or MultiPolygon), found {}",
            self::kind(&document)
        )));
    };
    let mut fences = Vec::new();
    match kind {
        "FeatureCollection" => {
            let Some(features) = document.get("features").and_then(Value::as_array) else {
                return Err(GeoError::NotGeoJson(
                    "a FeatureCollection needs a `features` array".to_string(),
                ));
            };
            if features.is_empty() {
                return Err(GeoError::NoFeatures);
            }
            for (i, feature) in features.iter().enumerate() {
                if let Some(fence) = read_feature(Some(i), feature, options)? {
                    fences.push(fence);
                }
            }
        }
        "Feature" => {
            if let Some(fence) = read_feature(None, &document, options)? {
                fences.push(fence);
            }
        }
        _ => {
            let label = "the geometry";
            let geometry =
                geojson::Geometry::deserialize(&document).map_err(|e| GeoError::Invalid {
                    feature: label.to_string(),
                    reason: e.to_string(),
                })?;
            let area = to_multipolygon(&geometry.value, label)?;
            let Some(name) = options.geometry_name.as_deref() else {
                return Err(GeoError::UnnamedGeometry(kind.to_string()));
            };
            if name.is_empty() {
                return Err(GeoError::EmptyName("geofence"));
            }
            if options
                .only
                .as_ref()
                .is_none_or(|only| only.iter().any(|n| n == name))
            {
                fences.push(Fence {
                    name: name.into(),
                    shape: Shape::Area(area),
                });
            }
        }
    }
    if let Some(only) = &options.only {
        let found: HashSet<&str> = fences.iter().map(|f| &*f.name).collect();
        let missing: Vec<String> = only
            .iter()
            .filter(|n| !found.contains(n.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(GeoError::NotFound(missing));
        }
    }
    Ok(fences)
}

/// How errors name a feature: `features[3] "France"`, `features[3]`, `the feature "France"`.
fn label(index: Option<usize>, name: Option<&str>) -> String {
    match (index, name) {
        (Some(i), Some(n)) => format!("features[{i}] {n:?}"),
        (Some(i), None) => format!("features[{i}]"),
        (None, Some(n)) => format!("the feature {n:?}"),
        (None, None) => "the feature".to_string(),
    }
}

/// One feature as a fence, `None` when it is not selected.
fn read_feature(
    index: Option<usize>,
    feature: &Value,
    options: &GeoJsonOptions,
) -> Result<Option<Fence>, GeoError> {
    let type_name = feature.get("type").and_then(Value::as_str);
    if type_name != Some("Feature") {
        return Err(GeoError::Invalid {
            feature: label(index, None),
            reason: format!(
                "expected a Feature, found {}",
                type_name.map_or_else(|| kind(feature).to_string(), |t| format!("a {t}"))
            ),
        });
    }
    let name =
        feature_name(feature, &options.name_property).map_err(|reason| GeoError::Invalid {
            feature: label(index, None),
            reason,
        })?;
    let name = match (name, &options.only) {
        (Some(name), None) => name,
        (Some(name), Some(only)) if only.contains(&name) => name,
        (_, Some(_)) => return Ok(None),
        (None, None) => {
            return Err(GeoError::MissingName {
                feature: label(index, None),
                property: options.name_property.clone(),
            })
        }
    };
    let label = label(index, Some(&name));
    let geometry = match feature.get("geometry") {
        None | Some(Value::Null) => {
            return Err(GeoError::Invalid {
                feature: label,
                reason: "no geometry".to_string(),
            })
        }
        Some(geometry) => {
            geojson::Geometry::deserialize(geometry).map_err(|e| GeoError::Invalid {
                feature: label.clone(),
                reason: e.to_string(),
            })?
        }
    };
    let area = to_multipolygon(&geometry.value, &label)?;
    Ok(Some(Fence {
        name: name.into(),
        shape: Shape::Area(area),
    }))
}

/// The feature's name: `properties[property]`, then (for `id`) the feature's own `id` member.
/// `Ok(None)` when there is none; `Err` (a reason) when it is neither a string nor a number.
fn feature_name(feature: &Value, property: &str) -> Result<Option<String>, String> {
    let from_properties = feature
        .get("properties")
        .and_then(|p| p.get(property))
        .filter(|v| !v.is_null());
    let value = match from_properties {
        Some(v) => Some((v, "property")),
        None if property == "id" => feature
            .get("id")
            .filter(|v| !v.is_null())
            .map(|v| (v, "member")),
        None => None,
    };
    match value {
        None => Ok(None),
        Some((Value::String(s), _)) if s.is_empty() => Ok(None),
        Some((Value::String(s), _)) => Ok(Some(s.clone())),
        // As written in the JSON: `276`, not `276.0`.
        Some((Value::Number(n), _)) => Ok(Some(n.to_string())),
        Some((other, what)) => Err(format!(
            "its `{property}` {what} is {}, not a string or a number",
            kind(other)
        )),
    }
}

/// A Polygon or MultiPolygon as a validated, oriented `geo` MultiPolygon.
fn to_multipolygon(value: &GeometryValue, feature: &str) -> Result<MultiPolygon<f64>, GeoError> {
    let polygons = match value {
        GeometryValue::Polygon { coordinates } => vec![to_polygon(coordinates, 0, feature)?],
        GeometryValue::MultiPolygon { coordinates } => {
            if coordinates.is_empty() {
                return Err(GeoError::Invalid {
                    feature: feature.to_string(),
                    reason: "a MultiPolygon without polygons".to_string(),
                });
            }
            coordinates
                .iter()
                .enumerate()
                .map(|(i, rings)| to_polygon(rings, i, feature))
                .collect::<Result<Vec<_>, _>>()?
        }
        other => {
            return Err(GeoError::GeometryType {
                feature: feature.to_string(),
                found: other.type_name().to_string(),
            })
        }
    };
    // The interval tree counts winding numbers: holes must wind the other way than their
    // exterior, which RFC 7946 asks for but tells readers not to rely on.
    Ok(MultiPolygon(polygons).orient(Direction::Default))
}

/// One polygon's rings, validated (closed, at least 4 positions, in range).
fn to_polygon(
    rings: &[Vec<Position>],
    polygon: usize,
    feature: &str,
) -> Result<Polygon<f64>, GeoError> {
    if rings.is_empty() {
        return Err(GeoError::Invalid {
            feature: feature.to_string(),
            reason: format!("polygon {polygon} has no rings"),
        });
    }
    let mut lines = Vec::with_capacity(rings.len());
    for (ring, positions) in rings.iter().enumerate() {
        if positions.len() < 4 {
            return Err(GeoError::RingTooShort {
                feature: feature.to_string(),
                polygon,
                ring,
                positions: positions.len(),
            });
        }
        let mut coords = Vec::with_capacity(positions.len());
        for position in positions {
            let &[lon, lat, ..] = position.as_slice() else {
                return Err(GeoError::Invalid {
                    feature: feature.to_string(),
                    reason: format!(
                        "a position of ring {ring} of polygon {polygon} has fewer than 2 numbers"
                    ),
                });
            };
            if !((-180.0..=180.0).contains(&lon) && (-90.0..=90.0).contains(&lat)) {
                return Err(GeoError::CoordinateOutOfRange {
                    feature: feature.to_string(),
                    lon,
                    lat,
                });
            }
            coords.push(Coord { x: lon, y: lat });
        }
        if let (Some(first), Some(last)) = (coords.first(), coords.last()) {
            if first != last {
                return Err(GeoError::RingNotClosed {
                    feature: feature.to_string(),
                    polygon,
                    ring,
                    first: [first.x, first.y],
                    last: [last.x, last.y],
                });
            }
        }
        lines.push(LineString(coords));
    }
    let mut lines = lines.into_iter();
    let exterior = lines.next().unwrap_or_else(|| LineString(Vec::new()));
    Ok(Polygon::new(exterior, lines.collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use geo::Destination;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(lat: f64, lon: f64) -> Location {
        Location::new(lat, lon).unwrap()
    }

    fn names(v: &[Arc<str>]) -> Vec<&str> {
        v.iter().map(|s| &**s).collect()
    }

    /// A square 0..10 x 0..10 (lon, lat) with a hole 4..6 x 4..6, exterior written clockwise
    /// (the wrong way for RFC 7946) to check orientation does not matter.
    const HOLED: &str = r#"{"type":"Feature","properties":{"name":"holed"},"geometry":{"type":"Polygon","coordinates":[
        [[0,0],[0,10],[10,10],[10,0],[0,0]],
        [[4,4],[6,4],[6,6],[4,6],[4,4]]]}}"#;

    fn collection(features: &[Value]) -> String {
        json!({"type": "FeatureCollection", "features": features}).to_string()
    }

    fn square(name: Value, x0: f64, y0: f64, size: f64) -> Value {
        json!({"type": "Feature", "properties": {"name": name}, "geometry": {"type": "Polygon",
            "coordinates": [[[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]]}})
    }

    fn load(text: &str) -> Result<Geography, GeoError> {
        let mut builder = Geography::builder();
        builder.add_geojson(text, &GeoJsonOptions::default())?;
        builder.build()
    }

    fn load_err(text: &str) -> GeoError {
        load(text).unwrap_err()
    }

    #[test]
    fn location_accepts_the_bounds_and_refuses_the_rest() {
        for (lat, lon) in [(90.0, 180.0), (-90.0, -180.0), (0.0, 0.0), (-0.0, 179.999)] {
            let l = Location::new(lat, lon).unwrap();
            assert_eq!((l.lat(), l.lon()), (lat, lon));
        }
        assert_eq!(Location::new(90.5, 0.0), Err(GeoError::Latitude(90.5)));
        assert_eq!(
            Location::new(0.0, -180.25),
            Err(GeoError::Longitude(-180.25))
        );
        assert!(matches!(Location::new(f64::NAN, 0.0), Err(GeoError::Latitude(v)) if v.is_nan()));
        assert!(matches!(Location::new(0.0, f64::NAN), Err(GeoError::Longitude(v)) if v.is_nan()));
        assert_eq!(
            Location::new(f64::INFINITY, 0.0),
            Err(GeoError::Latitude(f64::INFINITY))
        );
        assert_eq!(
            Location::new(0.0, f64::NEG_INFINITY),
            Err(GeoError::Longitude(f64::NEG_INFINITY))
        );
        assert_eq!(
            Location::new(91.0, 0.0).unwrap_err().to_string(),
            "latitude 91 is not a number in [-90, 90]"
        );
        assert_eq!(
            Location::new(0.0, 200.5).unwrap_err().to_string(),
            "longitude 200.5 is not a number in [-180, 180]"
        );
    }

    #[test]
    fn location_deserializes_only_in_range_and_converts_to_the_event_type() {
        let l: Location = serde_json::from_value(json!({"lat": 52.5, "lon": 13.4})).unwrap();
        assert_eq!(l, at(52.5, 13.4));
        assert!(serde_json::from_value::<Location>(json!({"lat": 95, "lon": 0})).is_err());
        let e: crate::event::Location = l.into();
        assert_eq!((e.lat, e.lon), (52.5, 13.4));
        assert_eq!(Location::try_from(e), Ok(l));
        let bad = crate::event::Location {
            lat: 0.0,
            lon: 999.0,
        };
        assert_eq!(Location::try_from(bad), Err(GeoError::Longitude(999.0)));
    }

    #[test]
    fn json_pointers_find_numbers_and_report_everything_else() {
        let p = json!({"lat": 52.5, "lon": 13, "position": {"latitude": -33.9, "longitude": 151.2},
            "s": "52.5", "b": true, "o": {}, "n": null, "far": 91.0, "a/b": 1.5, "t~": 2.5});
        assert_eq!(
            location_from_json(&p, "/lat", "/lon"),
            Ok(Some(at(52.5, 13.0)))
        );
        assert_eq!(
            location_from_json(&p, "/position/latitude", "/position/longitude"),
            Ok(Some(at(-33.9, 151.2)))
        );
        assert_eq!(
            location_from_json(&p, "/a~1b", "/t~0"),
            Ok(Some(at(1.5, 2.5)))
        );
        // Absent or null: no location, whatever the other field is.
        assert_eq!(location_from_json(&p, "/missing", "/lon"), Ok(None));
        assert_eq!(location_from_json(&p, "/lat", "/missing"), Ok(None));
        assert_eq!(location_from_json(&p, "/n", "/lon"), Ok(None));
        assert_eq!(location_from_json(&p, "/s", "/missing"), Ok(None));
        assert_eq!(location_from_json(&json!(3), "/lat", "/lon"), Ok(None));
        // Present but not a number.
        for (pointer, found) in [("/s", "a string"), ("/b", "a boolean"), ("/o", "an object")] {
            let err = location_from_json(&p, pointer, "/lon").unwrap_err();
            assert_eq!(
                err,
                GeoError::NotANumber {
                    pointer: pointer.to_string(),
                    found
                }
            );
            assert_eq!(
                err.to_string(),
                format!("`{pointer}` is {found}, not a number")
            );
        }
        assert_eq!(
            location_from_json(&p, "/lat", "/position"),
            Err(GeoError::NotANumber {
                pointer: "/position".to_string(),
                found: "an object"
            })
        );
        assert_eq!(
            location_from_json(&p, "/far", "/lon"),
            Err(GeoError::Latitude(91.0))
        );
        assert_eq!(
            location_from_json(&p, "lat", "/lon"),
            Err(GeoError::Pointer("lat".to_string()))
        );
    }

    #[test]
    fn json_arrays_are_lon_lat_with_an_optional_altitude() {
        let p = json!({"pos": [13.4, 52.5], "alt": [13.4, 52.5, 34.0], "one": [1.0],
            "four": [1, 2, 3, 4], "str": ["13.4", 52.5], "altstr": [1, 2, "x"], "s": "x",
            "far": [200, 0], "n": null, "deep": {"c": [-58.4, -34.6]}});
        assert_eq!(
            location_from_json_array(&p, "/pos"),
            Ok(Some(at(52.5, 13.4)))
        );
        assert_eq!(
            location_from_json_array(&p, "/alt"),
            Ok(Some(at(52.5, 13.4)))
        );
        assert_eq!(
            location_from_json_array(&p, "/deep/c"),
            Ok(Some(at(-34.6, -58.4)))
        );
        assert_eq!(location_from_json_array(&p, "/missing"), Ok(None));
        assert_eq!(location_from_json_array(&p, "/n"), Ok(None));
        assert_eq!(
            location_from_json_array(&p, "/far"),
            Err(GeoError::Longitude(200.0))
        );
        for (pointer, found) in [
            ("/one", "an array of 1 elements"),
            ("/four", "an array of 4 elements"),
            ("/str", "an array whose element 0 is a string"),
            ("/altstr", "an array whose element 2 is a string"),
            ("/s", "a string"),
        ] {
            assert_eq!(
                location_from_json_array(&p, pointer),
                Err(GeoError::NotAPosition {
                    pointer: pointer.to_string(),
                    found: found.to_string()
                }),
                "{pointer}"
            );
        }
        assert_eq!(
            location_from_json_array(&p, "pos"),
            Err(GeoError::Pointer("pos".to_string()))
        );
    }

    #[test]
    fn pointers_are_checked_as_rfc_6901() {
        for ok in ["", "/", "/lat", "/a/b/0", "/a~0b", "/a~1b"] {
            assert_eq!(check_pointer(ok), Ok(()), "{ok}");
        }
        for bad in ["lat", "a/b", "/a~", "/a~2", "/~x"] {
            assert_eq!(
                check_pointer(bad),
                Err(GeoError::Pointer(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn holes_are_outside_and_orientation_does_not_matter() {
        let g = load(HOLED).unwrap();
        assert_eq!(names(&g.locate(at(2.0, 2.0)).fences), ["holed"]);
        assert_eq!(names(&g.locate(at(8.0, 5.0)).fences), ["holed"]);
        assert!(g.locate(at(5.0, 5.0)).is_empty(), "inside the hole");
        assert!(g.locate(at(11.0, 5.0)).is_empty());
        // On the boundary: not inside (geo's Contains), and the brute force agrees.
        assert!(g.locate(at(0.0, 5.0)).is_empty());
        assert!(g.locate(at(4.0, 5.0)).is_empty());
        for lat in [0.0, 2.0, 4.0, 5.0, 8.0, 10.0] {
            for lon in [0.0, 2.0, 4.0, 5.0, 8.0, 10.0] {
                let here = at(lat, lon);
                assert_eq!(
                    !g.locate(here).is_empty(),
                    g.fences()[0].contains(here),
                    "{lat} {lon}"
                );
            }
        }
    }

    #[test]
    fn multipolygons_bare_geometries_and_features() {
        let multi = json!({"type": "MultiPolygon", "coordinates": [
            [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]],
            [[[100, 50], [101, 50], [101, 51], [100, 51], [100, 50]]]]});
        let mut b = Geography::builder();
        let options = GeoJsonOptions {
            geometry_name: Some("two".to_string()),
            ..GeoJsonOptions::default()
        };
        assert_eq!(b.add_geojson(multi.to_string(), &options), Ok(1));
        assert_eq!(
            b.add_geojson(HOLED.as_bytes(), &GeoJsonOptions::default()),
            Ok(1)
        );
        let g = b.build().unwrap();
        assert_eq!(names(&g.locate(at(50.5, 100.5)).fences), ["two"]);
        assert!(g.locate(at(25.0, 50.0)).is_empty());
        // The first square of `two` lies inside `holed`.
        assert_eq!(names(&g.locate(at(0.5, 0.7)).fences), ["holed", "two"]);
        assert_eq!(names(&g.locate(at(2.0, 2.0)).fences), ["holed"]);
        assert_eq!(g.fence("two").map(Fence::name), Some("two"));
        assert!(g.fence("three").is_none());
        assert!(
            matches!(g.fence("two").map(Fence::shape), Some(Shape::Area(mp)) if mp.0.len() == 2)
        );
        // A bare geometry needs a name.
        assert_eq!(
            load_err(&multi.to_string()),
            GeoError::UnnamedGeometry("MultiPolygon".to_string())
        );
    }

    #[test]
    fn features_are_named_by_a_property_or_their_id() {
        let text = collection(&[
            json!({"type": "Feature", "id": 276, "properties": {"name": "Germany"},
                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}}),
            json!({"type": "Feature", "id": "ignored", "properties": {"name": "France", "id": "FR"},
                "geometry": {"type": "Polygon", "coordinates": [[[2, 0], [3, 0], [3, 1], [2, 0]]]}}),
            json!({"type": "Feature", "properties": {"name": "Nowhere"},
                "geometry": {"type": "Polygon", "coordinates": [[[4, 0], [5, 0], [5, 1], [4, 0]]]}}),
        ]);
        let mut b = Geography::builder();
        assert_eq!(b.add_geojson(&text, &GeoJsonOptions::default()), Ok(3));
        let g = b.build().unwrap();
        let all: Vec<&str> = g.fences().iter().map(Fence::name).collect();
        assert_eq!(all, ["France", "Germany", "Nowhere"]);

        // By id: properties.id first, then the feature's id; the third has neither.
        let err = Geography::builder()
            .add_geojson(&text, &GeoJsonOptions::named_by("id"))
            .unwrap_err();
        assert_eq!(
            err,
            GeoError::MissingName {
                feature: "features[2]".to_string(),
                property: "id".to_string()
            }
        );
        assert_eq!(err.to_string(), "features[2]: no `id` to name it by");
        // ... unless a selection is given, which skips unnamed features.
        let mut b = Geography::builder();
        let options = GeoJsonOptions {
            only: Some(vec!["276".to_string(), "FR".to_string()]),
            ..GeoJsonOptions::named_by("id")
        };
        assert_eq!(b.add_geojson(&text, &options), Ok(2));
        let g = b.build().unwrap();
        let all: Vec<&str> = g.fences().iter().map(Fence::name).collect();
        assert_eq!(all, ["276", "FR"]);

        // Selecting names that are not there.
        let options = GeoJsonOptions {
            only: Some(vec!["Germany".to_string(), "Atlantis".to_string()]),
            ..GeoJsonOptions::default()
        };
        assert_eq!(
            Geography::builder().add_geojson(&text, &options),
            Err(GeoError::NotFound(vec!["Atlantis".to_string()]))
        );
        let options = GeoJsonOptions {
            only: Some(vec!["Germany".to_string()]),
            ..GeoJsonOptions::default()
        };
        let mut b = Geography::builder();
        assert_eq!(b.add_geojson(&text, &options), Ok(1));
    }

    #[test]
    fn bad_geojson_is_refused_naming_the_feature() {
        let ring = json!([[0, 0], [1, 0], [1, 1], [0, 0]]);
        let feature = |name: &str, geometry: Value| {
            collection(&[
                json!({"type": "Feature", "properties": {"name": name}, "geometry": geometry}),
            ])
        };
        assert_eq!(load_err(""), GeoError::Empty);
        assert_eq!(load_err(" \n\t"), GeoError::Empty);
        assert!(matches!(load_err("{\"type\":"), GeoError::NotJson(_)));
        assert!(matches!(load_err("not json"), GeoError::NotJson(_)));
        assert!(matches!(
            Geography::builder().add_geojson([0xff, 0xfe, b'{'], &GeoJsonOptions::default()),
            Err(GeoError::NotJson(_))
        ));
        assert!(matches!(load_err("[]"), GeoError::NotGeoJson(_)));
        assert!(matches!(load_err("42"), GeoError::NotGeoJson(_)));
        assert!(matches!(load_err("{\"type\": 3}"), GeoError::NotGeoJson(_)));
        assert!(matches!(
            load_err("{\"type\": \"FeatureCollection\"}"),
            GeoError::NotGeoJson(_)
        ));
        assert_eq!(load_err(&collection(&[])), GeoError::NoFeatures);
        assert_eq!(
            load_err(&feature(
                "Dot",
                json!({"type": "Point", "coordinates": [1, 2]})
            )),
            GeoError::GeometryType {
                feature: "features[0] \"Dot\"".to_string(),
                found: "Point".to_string()
            }
        );
        assert_eq!(
            load_err(&feature("Line", json!({"type": "LineString", "coordinates": [[1, 2], [3, 4]]})))
                .to_string(),
            "features[0] \"Line\": a LineString is not a geofence (only Polygon and MultiPolygon are)"
        );
        assert!(matches!(
            load_err(&feature("Bag", json!({"type": "GeometryCollection", "geometries": []}))),
            GeoError::GeometryType { found, .. } if found == "GeometryCollection"
        ));
        assert!(matches!(
            load_err(&feature("Round", json!({"type": "Circle", "coordinates": [1, 2]}))),
            GeoError::Invalid { feature, .. } if feature == "features[0] \"Round\""
        ));
        assert_eq!(
            load_err(&feature(
                "Open",
                json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]})
            )),
            GeoError::RingNotClosed {
                feature: "features[0] \"Open\"".to_string(),
                polygon: 0,
                ring: 0,
                first: [0.0, 0.0],
                last: [0.0, 1.0]
            }
        );
        let open_hole = json!({"type": "MultiPolygon", "coordinates": [[ring], [ring, [[0.1, 0.1], [0.2, 0.1], [0.2, 0.2], [0.1, 0.1], [0.3, 0.3]]]]});
        assert_eq!(
            load_err(&feature("Holey", open_hole)).to_string(),
            "features[0] \"Holey\": ring 1 of polygon 1 is not closed (first position [0.1, 0.1], last [0.3, 0.3])"
        );
        assert_eq!(
            load_err(&feature(
                "Short",
                json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]})
            )),
            GeoError::RingTooShort {
                feature: "features[0] \"Short\"".to_string(),
                polygon: 0,
                ring: 0,
                positions: 3
            }
        );
        assert!(matches!(
            load_err(&feature("NoRings", json!({"type": "Polygon", "coordinates": []}))),
            GeoError::Invalid { reason, .. } if reason == "polygon 0 has no rings"
        ));
        assert!(matches!(
            load_err(&feature(
                "NoPolygons",
                json!({"type": "MultiPolygon", "coordinates": []})
            )),
            GeoError::Invalid { .. }
        ));
        assert_eq!(
            load_err(&feature(
                "Far",
                json!({"type": "Polygon", "coordinates": [[[0, 0], [181, 0], [1, 1], [0, 0]]]})
            )),
            GeoError::CoordinateOutOfRange {
                feature: "features[0] \"Far\"".to_string(),
                lon: 181.0,
                lat: 0.0
            }
        );
        assert!(matches!(
            load_err(&feature("Up", json!({"type": "Polygon", "coordinates": [[[0, 0], [1, 95], [1, 1], [0, 0]]]}))),
            GeoError::CoordinateOutOfRange { lat, .. } if lat == 95.0
        ));
        assert!(matches!(
            load_err(&feature("Flat", json!({"type": "Polygon", "coordinates": [[[0], [1, 0], [1, 1], [0, 0]]]}))),
            GeoError::Invalid { feature, .. } if feature == "features[0] \"Flat\""
        ));
        assert_eq!(
            load_err(&feature("Nothing", Value::Null)),
            GeoError::Invalid {
                feature: "features[0] \"Nothing\"".to_string(),
                reason: "no geometry".to_string()
            }
        );
        assert_eq!(
            load_err(&collection(&[
                square(json!("A"), 0.0, 0.0, 1.0),
                square(json!(""), 0.0, 0.0, 1.0)
            ])),
            GeoError::MissingName {
                feature: "features[1]".to_string(),
                property: "name".to_string()
            }
        );
        assert!(matches!(
            load_err(&collection(&[square(json!(true), 0.0, 0.0, 1.0)])),
            GeoError::Invalid { reason, .. } if reason == "its `name` property is a boolean, not a string or a number"
        ));
        assert!(matches!(
            load_err(&collection(&[json!({"type": "Point", "coordinates": [0, 0]})])),
            GeoError::Invalid { feature, reason } if feature == "features[0]" && reason == "expected a Feature, found a Point"
        ));
        assert_eq!(
            load_err(&collection(&[
                square(json!("A"), 0.0, 0.0, 1.0),
                square(json!("A"), 5.0, 0.0, 1.0)
            ])),
            GeoError::DuplicateFence("A".to_string())
        );
        // Numbers name features as written.
        let g = load(&collection(&[square(json!(7), 0.0, 0.0, 1.0)])).unwrap();
        assert_eq!(g.fences()[0].name(), "7");
    }

    #[test]
    fn a_refused_document_adds_nothing_and_names_stay_unique_across_sources() {
        let mut b = Geography::builder();
        b.add_geojson(
            collection(&[square(json!("A"), 0.0, 0.0, 1.0)]),
            &GeoJsonOptions::default(),
        )
        .unwrap();
        let clash = collection(&[
            square(json!("B"), 0.0, 0.0, 1.0),
            square(json!("A"), 0.0, 0.0, 1.0),
        ]);
        assert_eq!(
            b.add_geojson(clash, &GeoJsonOptions::default()),
            Err(GeoError::DuplicateFence("A".to_string()))
        );
        assert_eq!(
            b.add_circle("A", at(0.0, 0.0), 10.0),
            Err(GeoError::DuplicateFence("A".to_string()))
        );
        // B was not added by the refused document.
        b.add_circle("B", at(0.0, 0.0), 10.0).unwrap();
        assert_eq!(
            b.add_circle("", at(0.0, 0.0), 10.0),
            Err(GeoError::EmptyName("geofence"))
        );
        for radius in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                b.add_circle("C", at(0.0, 0.0), radius),
                Err(GeoError::Radius { .. })
            ));
        }
        let g = b.build().unwrap();
        assert_eq!(g.fences().len(), 2);
    }

    #[test]
    fn regions_group_fences_and_are_checked_at_build() {
        let mut b = Geography::builder();
        b.add_geojson(
            collection(&[
                square(json!("a"), 0.0, 0.0, 2.0),
                square(json!("b"), 1.0, 1.0, 2.0),
            ]),
            &GeoJsonOptions::default(),
        )
        .unwrap();
        b.add_circle("c", at(1.5, 1.5), 1000.0).unwrap();
        b.add_region("ab", ["b", "a", "a"]).unwrap();
        b.add_region("only-c", ["c"]).unwrap();
        b.add_region("bc", vec!["c".to_string(), "b".to_string()])
            .unwrap();
        assert_eq!(
            b.add_region("ab", ["a"]),
            Err(GeoError::DuplicateRegion("ab".to_string()))
        );
        assert_eq!(b.add_region("", ["a"]), Err(GeoError::EmptyName("region")));
        let g = b.build().unwrap();
        let p = g.locate(at(1.5, 1.5));
        assert_eq!(names(&p.fences), ["a", "b", "c"]);
        assert_eq!(names(&p.regions), ["ab", "bc", "only-c"]);
        let p = g.locate(at(0.5, 0.5));
        assert_eq!(names(&p.fences), ["a"]);
        assert_eq!(names(&p.regions), ["ab"]);
        let p = g.locate(at(2.5, 2.5));
        assert_eq!(names(&p.fences), ["b"]);
        assert_eq!(names(&p.regions), ["ab", "bc"]);
        assert!(g.locate(at(10.0, 10.0)).is_empty());
        let ab: Vec<&str> = g.region("ab").unwrap().fences().collect();
        assert_eq!(ab, ["a", "b"]);
        assert_eq!(g.regions().len(), 3);
        assert!(g.region("zz").is_none());

        let with = |f: &dyn Fn(&mut GeographyBuilder)| {
            let mut b = Geography::builder();
            b.add_circle("x", at(0.0, 0.0), 5.0).unwrap();
            f(&mut b);
            b.build().unwrap_err()
        };
        assert_eq!(
            with(&|b| b.add_region("r", ["x", "y"]).unwrap()),
            GeoError::UnknownFence {
                region: "r".to_string(),
                fence: "y".to_string()
            }
        );
        assert_eq!(
            with(&|b| b.add_region("r", Vec::<String>::new()).unwrap()),
            GeoError::EmptyRegion("r".to_string())
        );
        assert_eq!(
            with(&|b| b.add_region("x", ["x"]).unwrap()),
            GeoError::RegionNamedLikeFence("x".to_string())
        );
        // Fences may come after the region that names them.
        let mut b = Geography::builder();
        b.add_region("r", ["later"]).unwrap();
        b.add_circle("later", at(0.0, 0.0), 5.0).unwrap();
        assert_eq!(
            names(&b.build().unwrap().locate(at(0.0, 0.0)).regions),
            ["r"]
        );
    }

    /// The point `distance_m` from `centre` along `bearing` (degrees), on the ellipsoid.
    fn towards(centre: Location, bearing: f64, distance_m: f64) -> Location {
        let p = Geodesic.destination(centre.point(), bearing, distance_m);
        at(p.y(), p.x())
    }

    #[test]
    fn circles_are_geodesic_discs() {
        let centres = [
            at(52.52, 13.405),
            at(0.0, 0.0),
            at(-33.87, 151.21),
            at(0.0, 179.9995),   // crosses the antimeridian
            at(89.995, 40.0),    // contains the north pole
            at(-89.9999, -10.0), // contains the south pole
            at(70.0, -180.0),
        ];
        for centre in centres {
            let mut b = Geography::builder();
            b.add_circle("km", centre, 1000.0).unwrap();
            let g = b.build().unwrap();
            assert_eq!(names(&g.locate(centre).fences), ["km"]);
            for bearing in [0.0, 37.0, 90.0, 180.0, 225.0, 300.0] {
                let inside = towards(centre, bearing, 999.0);
                let outside = towards(centre, bearing, 1001.0);
                assert_eq!(
                    names(&g.locate(inside).fences),
                    ["km"],
                    "{centre:?} {bearing}"
                );
                assert!(g.locate(outside).is_empty(), "{centre:?} {bearing}");
                assert!((Geography::distance_m(centre, inside) - 999.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn distances_are_geodesic() {
        // geo's documented example: New York to London, 5,585,234 m on WGS 84.
        let d = Geography::distance_m(at(40.7128, -74.006), at(51.5074, -0.1278));
        assert_eq!(d.round(), 5_585_234.0);
        assert_eq!(Geography::distance_m(at(10.0, 20.0), at(10.0, 20.0)), 0.0);
        // Across the antimeridian, the short way round.
        let d = Geography::distance_m(at(0.0, 179.99), at(0.0, -179.99));
        assert!((d - 2226.4).abs() < 1.0, "{d}");
    }

    #[test]
    fn geography_is_shareable_between_threads() {
        fn check<T: Send + Sync>() {}
        check::<Geography>();
        check::<Placement>();
    }

    #[test]
    fn locate_into_reuses_and_clears() {
        let g = load(HOLED).unwrap();
        let mut p = Placement::default();
        g.locate_into(at(2.0, 2.0), &mut p);
        assert_eq!(names(&p.fences), ["holed"]);
        g.locate_into(at(5.0, 5.0), &mut p);
        assert!(p.is_empty() && p.regions.is_empty());
    }

    /// JSON trees shaped like GeoJSON, with wrong types and numbers in odd places.
    fn geojsonish() -> impl Strategy<Value = Value> {
        let number = prop_oneof![
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            (-200i32..200).prop_map(|i| json!(i)),
            Just(json!(0)),
        ];
        let leaf = prop_oneof![
            number,
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "[a-zA-Z]{0,12}".prop_map(Value::String),
            prop::sample::select(vec![
                "Polygon",
                "MultiPolygon",
                "Point",
                "Feature",
                "FeatureCollection",
                "LineString",
                "GeometryCollection",
                "name",
                "id"
            ])
            .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(6, 120, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "type",
                        "coordinates",
                        "features",
                        "geometry",
                        "properties",
                        "name",
                        "id",
                        "geometries",
                        "bbox"
                    ])
                    .prop_map(str::to_string),
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn loading_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut b = Geography::builder();
            let _ = b.add_geojson(&bytes, &GeoJsonOptions::default());
            let _ = b.build();
        }

        #[test]
        fn loading_arbitrary_strings_never_panics(text in ".{0,256}") {
            let _ = Geography::builder().add_geojson(&text, &GeoJsonOptions::named_by("id"));
        }

        #[test]
        fn loading_geojson_shaped_values_never_panics(value in geojsonish(), by_id in any::<bool>()) {
            let options = GeoJsonOptions {
                geometry_name: Some("g".to_string()),
                ..if by_id { GeoJsonOptions::named_by("id") } else { GeoJsonOptions::default() }
            };
            let mut b = Geography::builder();
            if b.add_geojson(value.to_string(), &options).is_ok() {
                let g = b.build().unwrap();
                let _ = g.locate(at(0.0, 0.0));
            }
        }

        #[test]
        fn payloads_never_panic(value in geojsonish(), pointer in "(/[a-z0-9~]{0,4}){0,3}") {
            let _ = location_from_json(&value, &pointer, "/lon");
            let _ = location_from_json_array(&value, &pointer);
        }

        /// The spherical shortcut never changes the answer of the geodesic distance, from a
        /// metre to half the globe, at the poles and across the antimeridian.
        #[test]
        fn within_equals_geodesic(
            lat in -90.0..=90.0f64,
            lon in -180.0..=180.0f64,
            bearing in 0.0..360.0f64,
            radius in prop_oneof![1.0..1000.0f64, 1000.0..20_000_000.0f64],
            factor in prop_oneof![0.9..1.1f64, 0.999..1.001f64, 0.0..3.0f64],
        ) {
            let centre = at(lat, lon);
            let here = towards(centre, bearing, (radius * factor).min(20_000_000.0));
            let exact = Geodesic.distance(centre.point(), here.point()) <= radius;
            prop_assert_eq!(within(centre.point(), here.point(), radius), exact);
        }

        /// Random circles and squares (some with holes, some overlapping): the index finds
        /// exactly what testing every fence finds.
        #[test]
        fn indexed_locate_equals_brute_force(
            circles in prop::collection::vec((-89.0..89.0f64, -180.0..180.0f64, 100.0..500_000.0f64), 0..40),
            squares in prop::collection::vec((-80.0..70.0f64, -180.0..170.0f64, 0.1..10.0f64), 0..20),
            points in prop::collection::vec((-90.0..=90.0f64, -180.0..=180.0f64), 50),
        ) {
            let mut b = Geography::builder();
            for (i, (lat, lon, r)) in circles.iter().enumerate() {
                b.add_circle(format!("c{i}"), at(*lat, *lon), *r).unwrap();
            }
            let features: Vec<Value> = squares.iter().enumerate().map(|(i, (lat, lon, size))| {
                let mut f = square(json!(format!("s{i}")), *lon, *lat, *size);
                if i % 2 == 0 {
                    let (x, y, s) = (lon + size / 4.0, lat + size / 4.0, size / 2.0);
                    f["geometry"]["coordinates"].as_array_mut().unwrap().push(
                        json!([[x, y], [x, y + s], [x + s, y + s], [x + s, y], [x, y]]));
                }
                f
            }).collect();
            if !features.is_empty() {
                b.add_geojson(collection(&features), &GeoJsonOptions::default()).unwrap();
            }
            let g = b.build().unwrap();
            // Points near circle rims and square corners as well as anywhere.
            let mut probes: Vec<Location> = points.iter().map(|(lat, lon)| at(*lat, *lon)).collect();
            for (k, (lat, lon, r)) in circles.iter().enumerate() {
                let c = at(*lat, *lon);
                for factor in [0.98, 0.995, 0.999_99, 1.000_01, 1.005, 1.02] {
                    probes.push(towards(c, k as f64 * 47.0 + factor, r * factor));
                }
            }
            // Corners, edges and the hole's corner, exactly and a hair away.
            for (lat, lon, size) in &squares {
                for (fy, fx, ey, ex) in [
                    (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1e-9, 1e-9), (0.0, 0.0, -1e-9, 1e-9),
                    (0.5, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 1e-12), (0.5, 0.0, 0.0, -1e-12),
                    (0.25, 0.25, 0.0, 0.0), (0.5, 0.25, 0.0, 1e-12), (1.0, 0.5, -1e-12, 0.0),
                ] {
                    if let Ok(l) = Location::new(lat + size * fy + ey, lon + size * fx + ex) {
                        probes.push(l);
                    }
                }
            }
            for here in probes {
                let expected: Vec<&str> = g.fences().iter().filter(|f| f.contains(here)).map(Fence::name).collect();
                let p = g.locate(here);
                prop_assert_eq!(names(&p.fences), expected, "{:?}", here);
            }
        }
    }
}
