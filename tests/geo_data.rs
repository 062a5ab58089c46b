//! Geography against real data (issue 5): Natural Earth's 177 countries as geofences and 25
//! cities whose country was computed independently (Shapely), from `tests/data/` (see its
//! README). Every city must resolve to exactly its country, the sea points to none, and the
//! indexed lookup must agree with testing every country for random points and for points next
//! to the countries' vertices.

#[path = "common/natural_earth.rs"]
mod natural_earth;

use natural_earth::{data, EU};

use outpost::geo::{Fence, GeoError, GeoJsonOptions, Geography, Location};
use proptest::prelude::*;

fn countries_text() -> String {
    std::fs::read_to_string(data("countries-110m.geojson")).expect("countries-110m.geojson")
}

/// The countries named by `properties.name`, with region `eu`.
fn countries() -> Geography {
    let mut builder = Geography::builder();
    let added = builder
        .add_geojson(countries_text(), &GeoJsonOptions::default())
        .expect("countries load");
    assert_eq!(added, 177);
    builder.add_region("eu", EU).expect("region");
    builder.build().expect("build")
}

struct City {
    name: String,
    at: Location,
    country: Option<String>,
}

fn cities() -> Vec<City> {
    let text = std::fs::read_to_string(data("cities.csv")).expect("cities.csv");
    let cities: Vec<City> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            // No quoting in this file: name,lat,lon,country (empty at sea).
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 4, "{line}");
            let lat = fields[1].parse().expect("lat");
            let lon = fields[2].parse().expect("lon");
            City {
                name: fields[0].to_string(),
                at: Location::new(lat, lon).expect("in range"),
                country: Some(fields[3].to_string()).filter(|c| !c.is_empty()),
            }
        })
        .collect();
    assert_eq!(cities.len(), 25);
    cities
}

fn city<'a>(cities: &'a [City], name: &str) -> &'a City {
    cities.iter().find(|c| c.name == name).expect(name)
}

#[test]
fn every_city_is_in_exactly_its_country_and_the_sea_in_none() {
    let g = countries();
    let cities = cities();
    assert_eq!(cities.iter().filter(|c| c.country.is_none()).count(), 2);
    for c in &cities {
        let placement = g.locate(c.at);
        let fences: Vec<&str> = placement.fences.iter().map(|f| &**f).collect();
        let expected: Vec<&str> = c.country.as_deref().into_iter().collect();
        assert_eq!(fences, expected, "{}", c.name);
    }
}

#[test]
fn region_eu_holds_the_member_states_cities_only() {
    let g = countries();
    let cities = cities();
    let eu: Vec<&str> = g.region("eu").expect("eu").fences().collect();
    assert_eq!(eu.len(), 26);
    for name in ["Berlin", "Paris", "Madrid", "Rome", "Warsaw", "Dublin"] {
        let placement = g.locate(city(&cities, name).at);
        assert_eq!(placement.regions.len(), 1, "{name}");
        assert_eq!(&*placement.regions[0], "eu", "{name}");
    }
    for name in ["London", "Oslo", "Chicago", "Moscow", "Atlantic Ocean"] {
        assert!(
            g.locate(city(&cities, name).at).regions.is_empty(),
            "{name}"
        );
    }
}

#[test]
fn countries_can_be_named_by_id_and_selected() {
    let text = countries_text();
    // Three features (Kosovo, N. Cyprus, Somaliland) have no ISO numeric id.
    match Geography::builder().add_geojson(&text, &GeoJsonOptions::named_by("id")) {
        Err(GeoError::MissingName { feature, property }) => {
            assert!(feature.starts_with("features["), "{feature}");
            assert_eq!(property, "id");
        }
        other => panic!("expected a missing name, got {other:?}"),
    }
    // A selection skips them: Germany is 276, France 250 (the top-level `id` member).
    let mut builder = Geography::builder();
    let options = GeoJsonOptions {
        only: Some(vec!["276".to_string(), "250".to_string()]),
        ..GeoJsonOptions::named_by("id")
    };
    assert_eq!(builder.add_geojson(&text, &options), Ok(2));
    builder.add_region("de-fr", ["276", "250"]).unwrap();
    let g = builder.build().unwrap();
    let cities = cities();
    let berlin = g.locate(city(&cities, "Berlin").at);
    assert_eq!(
        berlin.fences.iter().map(|f| &**f).collect::<Vec<_>>(),
        ["276"]
    );
    assert_eq!(
        berlin.regions.iter().map(|f| &**f).collect::<Vec<_>>(),
        ["de-fr"]
    );
    assert!(g.locate(city(&cities, "Madrid").at).is_empty());
}

#[test]
fn a_region_naming_a_missing_country_is_refused() {
    let mut builder = Geography::builder();
    builder
        .add_geojson(countries_text(), &GeoJsonOptions::default())
        .unwrap();
    builder.add_region("eu", ["Germany", "Malta"]).unwrap();
    assert_eq!(
        builder.build().unwrap_err(),
        GeoError::UnknownFence {
            region: "eu".to_string(),
            fence: "Malta".to_string()
        }
    );
}

/// Every vertex of every country, for probes next to the boundaries.
fn vertices(g: &Geography) -> Vec<(f64, f64)> {
    use outpost::geo::Shape;
    let mut out = Vec::new();
    for fence in g.fences() {
        if let Shape::Area(area) = fence.shape() {
            for polygon in &area.0 {
                for c in polygon.exterior().0.iter() {
                    out.push((c.y, c.x));
                }
            }
        }
    }
    out
}

fn brute_force(g: &Geography, at: Location) -> Vec<&str> {
    g.fences()
        .iter()
        .filter(|f| f.contains(at))
        .map(Fence::name)
        .collect()
}

fn indexed(g: &Geography, at: Location) -> Vec<String> {
    g.locate(at).fences.iter().map(|f| f.to_string()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random points anywhere, and points within about a metre to a few kilometres of a
    /// country's vertex, or exactly on one: the index gives what testing every country gives.
    #[test]
    fn indexed_locate_equals_brute_force(
        anywhere in prop::collection::vec((-90.0..=90.0f64, -180.0..=180.0f64), 20),
        near in prop::collection::vec((any::<prop::sample::Index>(), -0.05..0.05f64, -0.05..0.05f64, 0..8u32), 40),
    ) {
        let g = countries_geography();
        let vertices = vertices(g);
        let mut probes: Vec<Location> = anywhere
            .iter()
            .map(|(lat, lon)| Location::new(*lat, *lon).unwrap())
            .collect();
        for (index, dlat, dlon, scale) in near {
            let (lat, lon) = vertices[index.index(vertices.len())];
            // From 5 km (scale 0) down to exactly the vertex (scale 7).
            let shrink = if scale == 7 { 0.0 } else { 10f64.powi(-(scale as i32)) };
            if let Ok(at) = Location::new(lat + dlat * shrink, lon + dlon * shrink) {
                probes.push(at);
            }
        }
        for at in probes {
            prop_assert_eq!(indexed(g, at), brute_force(g, at), "{:?}", at);
        }
    }
}

/// Loaded once for the property test's cases.
fn countries_geography() -> &'static Geography {
    static G: std::sync::OnceLock<Geography> = std::sync::OnceLock::new();
    G.get_or_init(countries)
}
