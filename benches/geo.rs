//! Geography benchmarks (issue 5): what finding an event's geofences and regions costs.
//!
//! - `countries/*`: [`Geography::locate`] with Natural Earth's 177 countries
//!   (`tests/data/countries-110m.geojson`) and region `eu`: the 25 cities of
//!   `tests/data/cities.csv`, 1,024 random points on land and 1,024 at sea (uniform in
//!   longitude and latitude, sorted into the two by the geography itself), and the same land
//!   points through [`Geography::locate_into`] with a reused [`Placement`].
//! - `circles/*`: 10,000 circles of radius 100 m to 50 km, centres uniform over Europe
//!   (35..70 N, 10 W..40 E), so that a point there is in about one circle on average: 1,024
//!   random points in that box, and 1,024 points inside a circle.
//! - `payload/*`: [`location_from_json`] on a parsed payload (`/lat`, `/lon`; and nested
//!   pointers), [`location_from_json_array`], and the whole geographic part of routing an event:
//!   parse the JSON payload, read its location and locate it among the countries.
//!
//! - `routing/*`: the whole routing decision the pipeline makes per event, through the same
//!   calls ([`Locator::resolve`], [`Locator::place`], [`Route::accepts`]) on a configuration
//!   validated like the gateway's: parse the JSON payload, find its location, locate it, and
//!   evaluate four routes' `when` predicates (`in = "eu"`, `in = "us"`, `not_in` both with a
//!   field comparison, `within_m` of a point). With the 177 countries (regions `eu` and `us`),
//!   and with 10,000 circles (region `north` of half of them).
//!
//! Every figure is per point (criterion's element throughput). Run: `cargo bench --bench geo`
//! (under a minute once built). Figures are in `BENCHMARKS.md`.

#[path = "../tests/common/natural_earth.rs"]
mod natural_earth;

use natural_earth::{data, EU};

use std::hint::black_box;
use std::time::Duration;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use outpost::config::Config;
use outpost::geo::locator::Locator;
use outpost::geo::{
    location_from_json, location_from_json_array, GeoJsonOptions, Geography, Location, Placement,
};
use outpost::routing::predicate::Facts;
use outpost::routing::RouteTable;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const POINTS: usize = 1024;

fn countries() -> Geography {
    let text = std::fs::read(data("countries-110m.geojson")).expect("countries-110m.geojson");
    let mut builder = Geography::builder();
    builder
        .add_geojson(&text, &GeoJsonOptions::default())
        .expect("countries load");
    builder.add_region("eu", EU).expect("region");
    builder.build().expect("build")
}

fn cities() -> Vec<Location> {
    let text = std::fs::read_to_string(data("cities.csv")).expect("cities.csv");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let lat = fields.get(1)?.parse().ok()?;
            let lon = fields.get(2)?.parse().ok()?;
            Location::new(lat, lon).ok()
        })
        .collect()
}

fn random_location(rng: &mut StdRng, lat: (f64, f64), lon: (f64, f64)) -> Location {
    Location::new(
        rng.random_range(lat.0..lat.1),
        rng.random_range(lon.0..lon.1),
    )
    .expect("range")
}

/// Shorter than criterion's defaults: each figure is nanoseconds, and the whole run should
/// stay well under two minutes on a shared two-core machine.
fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// Locates every point once per iteration.
fn bench_points(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    geography: &Geography,
    points: &[Location],
) {
    group.throughput(Throughput::Elements(points.len() as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            for &at in points {
                black_box(geography.locate(black_box(at)));
            }
        })
    });
}

fn countries_bench(c: &mut Criterion) {
    let geography = countries();
    let mut rng = StdRng::seed_from_u64(5);
    let (mut land, mut sea) = (Vec::new(), Vec::new());
    while land.len() < POINTS || sea.len() < POINTS {
        let at = random_location(&mut rng, (-90.0, 90.0), (-180.0, 180.0));
        let bucket = if geography.locate(at).is_empty() {
            &mut sea
        } else {
            &mut land
        };
        if bucket.len() < POINTS {
            bucket.push(at);
        }
    }
    let mut group = c.benchmark_group("countries");
    configure(&mut group);
    bench_points(&mut group, "cities", &geography, &cities());
    bench_points(&mut group, "random_land", &geography, &land);
    bench_points(&mut group, "random_sea", &geography, &sea);
    group.throughput(Throughput::Elements(land.len() as u64));
    group.bench_function("random_land_locate_into", |b| {
        let mut placement = Placement::default();
        b.iter(|| {
            for &at in &land {
                geography.locate_into(black_box(at), &mut placement);
                black_box(&placement);
            }
        })
    });
    group.finish();
}

fn circles_bench(c: &mut Criterion) {
    const EUROPE: ((f64, f64), (f64, f64)) = ((35.0, 70.0), (-10.0, 40.0));
    let mut rng = StdRng::seed_from_u64(10_000);
    let mut builder = Geography::builder();
    let mut centres = Vec::new();
    for i in 0..10_000 {
        let centre = random_location(&mut rng, EUROPE.0, EUROPE.1);
        let radius = rng.random_range(100.0..50_000.0);
        builder
            .add_circle(format!("circle-{i}"), centre, radius)
            .expect("circle");
        centres.push(centre);
    }
    let geography = builder.build().expect("build");
    let anywhere: Vec<Location> = (0..POINTS)
        .map(|_| random_location(&mut rng, EUROPE.0, EUROPE.1))
        .collect();
    let inside: Vec<Location> = centres.iter().take(POINTS).copied().collect();
    let hits: usize = anywhere
        .iter()
        .map(|&at| geography.locate(at).fences.len())
        .sum();
    println!(
        "circles: {:.2} circles per random point on average",
        hits as f64 / anywhere.len() as f64
    );
    let mut group = c.benchmark_group("circles");
    configure(&mut group);
    bench_points(&mut group, "10k_random_points", &geography, &anywhere);
    bench_points(&mut group, "10k_at_centres", &geography, &inside);
    group.finish();
}

fn payload_bench(c: &mut Criterion) {
    let geography = countries();
    let flat = br#"{"device":"truck-17","lat":52.52,"lon":13.405,"temp":21.5,"ts":1764201600000}"#;
    let nested =
        br#"{"device":"truck-17","position":{"latitude":48.857,"longitude":2.352},"temp":21.5}"#;
    let array = br#"{"device":"truck-17","coordinates":[-3.704,40.417],"temp":21.5}"#;
    let flat_value: serde_json::Value = serde_json::from_slice(flat).expect("json");
    let nested_value: serde_json::Value = serde_json::from_slice(nested).expect("json");
    let array_value: serde_json::Value = serde_json::from_slice(array).expect("json");

    let mut group = c.benchmark_group("payload");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("from_json_flat", |b| {
        b.iter(|| location_from_json(black_box(&flat_value), "/lat", "/lon"))
    });
    group.bench_function("from_json_nested", |b| {
        b.iter(|| {
            location_from_json(
                black_box(&nested_value),
                "/position/latitude",
                "/position/longitude",
            )
        })
    });
    group.bench_function("from_json_array", |b| {
        b.iter(|| location_from_json_array(black_box(&array_value), "/coordinates"))
    });
    group.bench_function("parse_read_locate_countries", |b| {
        b.iter(|| {
            let value: serde_json::Value = serde_json::from_slice(black_box(flat)).expect("json");
            let at = location_from_json(&value, "/lat", "/lon")
                .expect("valid")
                .expect("present");
            geography.locate(at)
        })
    });
    group.finish();
}

/// The routing decision for one event, as the pipeline makes it: how many routes it takes.
fn route_event(locator: &Locator, routes: &RouteTable, topic: &str, payload: &[u8]) -> usize {
    let json: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let mut placement = Placement::default();
    let mut placed = None;
    let mut memo = outpost::geo::locator::ResolveMemo::default();
    let mut taken = 0;
    for (index, route) in routes.routes().iter().enumerate() {
        if !route.filter.matches(topic) {
            continue;
        }
        let device = route.device_of(topic).unwrap_or("");
        let location = match locator.resolve_memo(&mut memo, index, json.as_ref(), device) {
            Ok(Some((at, _))) => {
                if placed != Some(at) {
                    locator.place(at, &mut placement);
                    placed = Some(at);
                }
                Some(at)
            }
            Ok(None) => None,
            Err(_) => continue,
        };
        let facts = Facts {
            payload: json.as_ref(),
            location: location.map(Into::into),
            fences: &placement.fences[..],
            regions: &placement.regions[..],
            distance: &outpost::geo::locator::GEODESIC,
        };
        if route.accepts(&facts) {
            taken += 1;
        }
    }
    taken
}

const ROUTES: &str = r#"
[[route]]
name = "eu"
filter = "telemetry/#"
when = { in = "eu" }
[[route]]
name = "us"
filter = "telemetry/#"
when = { in = "us" }
[[route]]
name = "elsewhere-hot"
filter = "telemetry/#"
when = { all = [{ not_in = ["eu", "us"] }, { field = "/temp", gt = 30 }] }
[[route]]
name = "near-depot"
filter = "telemetry/#"
when = { within_m = 5000.0, of = [52.52, 13.405] }
[[upstream]]
name = "cloud"
url = "mqtt://127.0.0.1:1883"
regions = ["*"]
"#;

fn locator_for(toml: &str) -> (Locator, RouteTable) {
    let config = Config::from_toml(toml, std::path::Path::new("bench.toml")).expect("config");
    let validated = outpost::plan::compile(&config).expect("valid");
    let locator = Locator::new(Arc::new(validated.geo), "bench", Vec::new());
    (locator, validated.routes)
}

fn payloads(points: &[Location]) -> Vec<Vec<u8>> {
    points
        .iter()
        .map(|p| {
            format!(
                r#"{{"lat":{},"lon":{},"temp":{}}}"#,
                p.lat(),
                p.lon(),
                20.0 + p.lat().abs() % 20.0
            )
            .into_bytes()
        })
        .collect()
}

fn routing_bench(c: &mut Criterion) {
    let data = data("countries-110m.geojson");
    let eu: Vec<String> = EU.iter().map(|c| format!("{c:?}")).collect();
    let countries_toml = format!(
        "{ROUTES}\n[[geofence]]\nfile = {:?}\n[[region]]\nname = \"eu\"\nfences = [{}]\n[[region]]\nname = \"us\"\nfences = [\"United States of America\"]\n",
        data.display().to_string(),
        eu.join(", ")
    );
    let (countries, country_routes) = locator_for(&countries_toml);
    let mut rng = StdRng::seed_from_u64(177);
    let world: Vec<Location> = (0..POINTS)
        .map(|_| random_location(&mut rng, (-60.0, 75.0), (-180.0, 180.0)))
        .collect();
    let world = payloads(&world);

    let mut circles_toml = ROUTES
        .replace(r#"in = "eu""#, r#"in = "north""#)
        .replace(r#"in = "us""#, r#"in = "circle-7""#)
        .replace(r#"not_in = ["eu", "us"]"#, r#"not_in = ["north"]"#);
    let mut north = Vec::new();
    for i in 0..10_000 {
        let lat = rng.random_range(35.0..70.0);
        let lon = rng.random_range(-10.0..40.0);
        let radius = rng.random_range(100.0..50_000.0);
        circles_toml.push_str(&format!(
            "[[geofence]]\nname = \"circle-{i}\"\ncenter = [{lat}, {lon}]\nradius_m = {radius}\n"
        ));
        if lat > 52.5 {
            north.push(format!("\"circle-{i}\""));
        }
    }
    circles_toml.push_str(&format!(
        "[[region]]\nname = \"north\"\nfences = [{}]\n",
        north.join(", ")
    ));
    let (circles, circle_routes) = locator_for(&circles_toml);
    let europe: Vec<Location> = (0..POINTS)
        .map(|_| random_location(&mut rng, (35.0, 70.0), (-10.0, 40.0)))
        .collect();
    let europe = payloads(&europe);

    let mut group = c.benchmark_group("routing");
    configure(&mut group);
    group.throughput(Throughput::Elements(world.len() as u64));
    group.bench_function("countries_4_routes", |b| {
        b.iter(|| {
            world
                .iter()
                .map(|p| route_event(&countries, &country_routes, "telemetry/d1/env", p))
                .sum::<usize>()
        })
    });
    group.throughput(Throughput::Elements(europe.len() as u64));
    group.bench_function("10k_circles_4_routes", |b| {
        b.iter(|| {
            europe
                .iter()
                .map(|p| route_event(&circles, &circle_routes, "telemetry/d1/env", p))
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    countries_bench,
    circles_bench,
    payload_bench,
    routing_bench
);
criterion_main!(benches);
