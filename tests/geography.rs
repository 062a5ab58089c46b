//! Geography-aware routing end to end (issue 5), through the real `outpost` binary, real
//! Mosquitto upstreams and real MQTT devices, with Natural Earth's countries
//! (`tests/data/countries-110m.geojson`) and circles as geofences. What it proves:
//!
//! - **Data residency.** Events are tagged with the regions that contain them; an output goes
//!   only over a link whose `regions` allow all of its tags. With an EU and a US upstream, Berlin's
//!   events reach only the EU broker and Chicago's only the US one, also while the EU broker is
//!   down (Berlin's wait in the outbox, none leaks to the US link) and after it is back
//!   (`residency_two_upstreams`). A route whose link may not carry an event's region makes it a
//!   `residency` dead letter, and under `no_location = "dead-letter"` an event without any
//!   location is a `no-location` dead letter (`residency_refuses_a_wrong_link`). By default an
//!   event without any location is published only on the gateway's own broker, never upstream,
//!   even on a link that takes every region (`no_location_local_only`).
//! - **Enter/exit transitions.** A device's track through two circular geofences yields exactly
//!   the expected enter/exit events, as routable device events, in order, without a duplicate
//!   after a gateway restart; a position that is not a position is a `bad-location` dead letter
//!   and moves nothing (`enter_exit_track_across_restart`).
//! - **Where an event without coordinates is.** The device's last reported position (kept across
//!   a restart), else its configured static position, else the gateway's position
//!   (`device_registry_and_gateway_position`).
//! - **Bad geography is refused** by `outpost config check` and by `outpost run`, naming the
//!   file, region or route at fault: broken GeoJSON files, a region naming an unknown geofence,
//!   a predicate naming an unknown geofence or region, and a route whose condition needs a region
//!   its upstream may not carry (`bad_geography_config_is_refused`).
//!
//! "Never arrives there" is always asserted only after everything else has provably arrived and
//! the gateway's journal and outbox are empty, never after a fixed delay.

mod common;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    eventually, free_port, write_config, Device, Gateway, Harness, Received, Subscriber, PATIENCE,
};
use serde_json::Value;

/// (lat, lon) of a few places; each city is inside its country in the 1:110m data
/// (`tests/data/cities.csv`).
const BERLIN: (f64, f64) = (52.52, 13.405);
const MUNICH: (f64, f64) = (48.137, 11.575);
const PARIS: (f64, f64) = (48.857, 2.352);
const CHICAGO: (f64, f64) = (41.878, -87.63);

/// Some EU member states, as named in Natural Earth (all of them are in `tests/geo_data.rs`).
const EU: [&str; 8] = [
    "Austria",
    "Belgium",
    "France",
    "Germany",
    "Italy",
    "Netherlands",
    "Poland",
    "Spain",
];
const USA: &str = "United States of America";

/// The countries file, as an absolute path.
fn countries_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/countries-110m.geojson")
        .canonicalize()
        .expect("tests/data/countries-110m.geojson")
}

/// A TOML array of strings.
fn toml_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The EU countries and the USA as geofences, and the regions `eu` and `us`.
fn countries_and_regions() -> String {
    let mut fences: Vec<&str> = EU.to_vec();
    fences.push(USA);
    format!(
        r#"
[[geofence]]
file = "{file}"
name_property = "name"
only = {fences}

[[region]]
name = "eu"
fences = {eu}

[[region]]
name = "us"
fences = ["{USA}"]
"#,
        file = countries_file().display(),
        fences = toml_list(&fences),
        eu = toml_list(&EU),
    )
}

/// An upstream section; `regions` is left out when `None` (the default: untagged data only).
fn upstream(name: &str, url: &str, regions: Option<&[&str]>) -> String {
    let regions = regions
        .map(|r| format!("regions = {}\n", toml_list(r)))
        .unwrap_or_default();
    format!(
        "\n[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\nreconnect_max_ms = 1000\n{regions}"
    )
}

fn located(seq: u64, (lat, lon): (f64, f64)) -> String {
    format!(r#"{{"seq":{seq},"lat":{lat},"lon":{lon}}}"#)
}

fn unlocated(seq: u64) -> String {
    format!(r#"{{"seq":{seq},"temp_c":21.5}}"#)
}

fn json(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(payload).into_owned()
        )
    })
}

/// (device, seq) of every message a subscriber received, in arrival order; the device is topic
/// level `level`.
fn arrivals(received: &Received, level: usize) -> Vec<(String, u64)> {
    received
        .all()
        .into_iter()
        .map(|(topic, payload)| {
            let device = topic
                .split('/')
                .nth(level)
                .unwrap_or_else(|| panic!("no level {level} in {topic}"))
                .to_string();
            let seq = json(&payload)["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("no seq in {topic}"));
            (device, seq)
        })
        .collect()
}

/// The distinct sequence numbers a subscriber received from `device` (duplicates of
/// at-least-once delivery count once).
fn seqs(received: &Received, level: usize, device: &str) -> BTreeSet<u64> {
    arrivals(received, level)
        .into_iter()
        .filter(|(d, _)| d == device)
        .map(|(_, s)| s)
        .collect()
}

fn range(from: u64, to: u64) -> BTreeSet<u64> {
    (from..=to).collect()
}

/// Waits until the pipeline has taken everything from the journal and every queued output has
/// been delivered.
async fn settled(gateway: &Gateway) {
    eventually("journal empty", || gateway.journal_depth() == 0).await;
    eventually("outbox empty", || gateway.outbox_depth() == 0).await;
}

/// Publishes each payload on `topic` and waits until the gateway acknowledged all of them
/// (`acked_before`: acknowledgements this device had already received).
async fn publish_all(device: &Device, topic: &str, payloads: Vec<String>, acked_before: u64) {
    let n = payloads.len() as u64;
    for payload in payloads {
        device.publish(topic, payload).await;
    }
    device.wait_acked(acked_before + n).await;
}

/// [`publish_all`] of `seqs`, each located at `at`, on `telemetry/<name>/env`.
async fn publish_located(
    device: &Device,
    name: &str,
    seqs: RangeInclusive<u64>,
    at: (f64, f64),
    acked_before: u64,
) {
    let payloads = seqs.map(|s| located(s, at)).collect();
    publish_all(
        device,
        &format!("telemetry/{name}/env"),
        payloads,
        acked_before,
    )
    .await;
}

/// Two upstreams, one per region: each city's events go to its own region's broker only,
/// before, during and after an outage of the EU broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_two_upstreams() {
    const N: u64 = 50;
    // The EU broker is the harness's upstream, the US one its second.
    let setup = Harness::builder().second_upstream();
    let us_url = setup.second_upstream_url();
    // Persistent sessions: the EU subscriber keeps collecting across its broker's restart.
    let mut h = setup
        .subscriber_as("eu-sub", "#")
        .second_subscriber_as("us-sub", "#")
        .config_with(|eu_url| {
            format!(
                r#"gateway_id = "gw1"
{geography}
{eu_link}
{us_link}
[[route]]
name = "eu"
filter = "telemetry/#"
when = {{ in = "eu" }}
upstream = "eu-cloud"

[[route]]
name = "us"
filter = "telemetry/#"
when = {{ in = "us" }}
upstream = "us-cloud"
"#,
                geography = countries_and_regions(),
                eu_link = upstream("eu-cloud", eu_url, Some(&["eu"])),
                us_link = upstream("us-cloud", &us_url, Some(&["us"])),
            )
        })
        .start()
        .await;
    let (eu_sub, us_sub) = (
        h.received_by("eu-sub").clone(),
        h.received_by("us-sub").clone(),
    );
    let berlin = Device::connect(h.gateway.port, "berlin").await;
    let chicago = Device::connect(h.gateway.port, "chicago").await;

    // Both links up.
    publish_located(&berlin, "berlin", 1..=N, BERLIN, 0).await;
    publish_located(&chicago, "chicago", 1..=N, CHICAGO, 0).await;
    eventually("Berlin 1..N on eu", || {
        seqs(&eu_sub, 1, "berlin") == range(1, N)
    })
    .await;
    eventually("Chicago 1..N on us", || {
        seqs(&us_sub, 1, "chicago") == range(1, N)
    })
    .await;
    settled(&h.gateway).await;
    assert!(seqs(&us_sub, 1, "berlin").is_empty(), "Berlin data on us");
    assert!(seqs(&eu_sub, 1, "chicago").is_empty(), "Chicago data on eu");

    // The EU broker goes away: Chicago's events still flow, Berlin's wait for their own link.
    h.upstream.stop();
    publish_located(&berlin, "berlin", N + 1..=2 * N, BERLIN, N).await;
    publish_located(&chicago, "chicago", N + 1..=2 * N, CHICAGO, N).await;
    eventually("Chicago 1..2N on us", || {
        seqs(&us_sub, 1, "chicago") == range(1, 2 * N)
    })
    .await;
    eventually("journal empty", || h.gateway.journal_depth() == 0).await;
    eventually("Berlin's N waiting for eu-cloud", || {
        h.gateway.outbox_depth_of("eu-cloud") >= N
    })
    .await;
    eventually("nothing waiting for us-cloud", || {
        h.gateway.outbox_depth_of("us-cloud") == 0
    })
    .await;
    assert_eq!(h.gateway.outbox_depth_of("eu-cloud"), N);
    assert!(
        seqs(&us_sub, 1, "berlin").is_empty(),
        "Berlin data went to us while eu was down"
    );

    // The EU broker is back: Berlin's waiting events arrive there.
    h.upstream.start();
    eventually("Berlin 1..2N on eu", || {
        seqs(&eu_sub, 1, "berlin") == range(1, 2 * N)
    })
    .await;
    settled(&h.gateway).await;
    assert!(seqs(&us_sub, 1, "berlin").is_empty(), "Berlin data on us");
    assert!(seqs(&eu_sub, 1, "chicago").is_empty(), "Chicago data on eu");
    let devices_on = |sub: &Received| -> BTreeSet<String> {
        arrivals(sub, 1).into_iter().map(|(d, _)| d).collect()
    };
    assert_eq!(devices_on(&eu_sub), BTreeSet::from(["berlin".to_string()]));
    assert_eq!(devices_on(&us_sub), BTreeSet::from(["chicago".to_string()]));
    assert!(
        h.gateway.dead_letters().is_empty(),
        "{:?}",
        h.gateway.dead_letters()
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// A route without a condition to the US link: EU data is refused (`residency` dead letters)
/// rather than sent; US data goes; an event with no location at all is a `no-location` dead
/// letter under `no_location = "dead-letter"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn residency_refuses_a_wrong_link() {
    const N: u64 = 20;
    let mut h = Harness::builder()
        .subscriber_as("us-sub", "#")
        .config_with(|us_url| {
            format!(
                r#"gateway_id = "gw1"

[geography]
no_location = "dead-letter"
{geography}
{us_link}
[[route]]
name = "everything"
filter = "telemetry/#"
upstream = "us-cloud"
"#,
                geography = countries_and_regions(),
                us_link = upstream("us-cloud", us_url, Some(&["us"])),
            )
        })
        .start()
        .await;

    // One device at a time, each acknowledged before the next starts: journal order is this order.
    let ghost = Device::connect(h.gateway.port, "ghost").await;
    publish_all(&ghost, "telemetry/ghost/env", vec![unlocated(1)], 0).await;
    let berlin = Device::connect(h.gateway.port, "berlin").await;
    publish_located(&berlin, "berlin", 1..=N, BERLIN, 0).await;
    let chicago = Device::connect(h.gateway.port, "chicago").await;
    publish_located(&chicago, "chicago", 1..=N, CHICAGO, 0).await;

    eventually("Chicago 1..N upstream", || {
        seqs(&h.received, 1, "chicago") == range(1, N)
    })
    .await;
    eventually("N residency dead letters", || {
        h.gateway.dead_letters().get("residency") == Some(&N)
    })
    .await;
    eventually("1 no-location dead letter", || {
        h.gateway.dead_letters().get("no-location") == Some(&1)
    })
    .await;
    settled(&h.gateway).await;

    let devices: BTreeSet<String> = arrivals(&h.received, 1)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        devices,
        BTreeSet::from(["chicago".to_string()]),
        "only Chicago's data may reach the us link"
    );
    let letters = h.gateway.dead_letter_rows();
    assert_eq!(letters.len() as u64, N + 1, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.route, "everything", "{letter:?}");
        match letter.reason.as_str() {
            "residency" => assert_eq!(letter.topic, "telemetry/berlin/env", "{letter:?}"),
            "no-location" => {
                assert_eq!(letter.topic, "telemetry/ghost/env", "{letter:?}");
                assert_eq!(letter.payload, unlocated(1).into_bytes());
            }
            other => panic!("unexpected reason {other}: {letter:?}"),
        }
    }
    let refused: BTreeSet<u64> = letters
        .iter()
        .filter(|l| l.reason == "residency")
        .map(|l| json(&l.payload)["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        refused,
        range(1, N),
        "every Berlin event is a residency dead letter"
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// With the default `no_location = "local-only"`, an event that has no location is published on
/// the gateway's own broker and never upstream, even over a link that may carry every region,
/// while a located event of the same route goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_location_local_only() {
    let mut h = Harness::builder()
        .subscriber_as("cloud-sub", "#")
        .config_with(|url| {
            format!(
                r#"gateway_id = "gw1"
{geography}
{link}
[[route]]
name = "out"
filter = "telemetry/#"
topic = "out/{{device}}"
"#,
                geography = countries_and_regions(),
                link = upstream("cloud", url, Some(&["*"])),
            )
        })
        .start()
        .await;
    // On the gateway's own broker, on the route's output topics (not the device topics, which
    // local subscribers get anyway).
    let local_sub = Subscriber::connect(h.gateway.port, "local-sub", "out/#").await;

    let ghost = Device::connect(h.gateway.port, "ghost").await;
    publish_all(&ghost, "telemetry/ghost/env", vec![unlocated(1)], 0).await;
    let berlin = Device::connect(h.gateway.port, "berlin").await;
    publish_all(&berlin, "telemetry/berlin/env", vec![located(1, BERLIN)], 0).await;

    eventually("the located event upstream", || {
        h.received
            .all()
            .contains(&("out/berlin".to_string(), located(1, BERLIN).into_bytes()))
    })
    .await;
    eventually("the unlocated event on the gateway's broker", || {
        local_sub
            .received
            .all()
            .contains(&("out/ghost".to_string(), unlocated(1).into_bytes()))
    })
    .await;
    settled(&h.gateway).await;
    // The unlocated event came first: on the link it would have been delivered before the
    // located one, which has arrived.
    let upstream_topics: BTreeSet<String> = h.received.all().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        upstream_topics,
        BTreeSet::from(["out/berlin".to_string()]),
        "an event without a location went upstream"
    );
    assert!(
        h.gateway.dead_letters().is_empty(),
        "{:?}",
        h.gateway.dead_letters()
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// One point of a device's track, and its sequence number.
struct Fix {
    seq: u64,
    at: (f64, f64),
}

/// An enter/exit event as received upstream.
#[derive(Debug, PartialEq)]
struct Transition {
    transition: String,
    fence: String,
    at: (f64, f64),
}

fn transitions(received: &Received) -> Vec<Transition> {
    // A byte-identical message is a redelivery (at least once), not a second transition: a
    // transition emitted again would differ in `at_ms`, or in position.
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for (topic, payload) in received.all() {
        if seen.contains(&payload) {
            continue;
        }
        seen.push(payload.clone());
        assert_eq!(topic, "outpost/gw1/geofence/truck1");
        let v = json(&payload);
        assert_eq!(v["device"], "truck1", "{v}");
        assert!(v["at_ms"].is_u64() || v["at_ms"].is_i64(), "at_ms in {v}");
        out.push(Transition {
            transition: v["transition"].as_str().expect("transition").to_string(),
            fence: v["fence"].as_str().expect("fence").to_string(),
            at: (
                v["lat"].as_f64().expect("lat"),
                v["lon"].as_f64().expect("lon"),
            ),
        });
    }
    out
}

/// A truck drives between two circular geofences; the gateway restarts while it is in one.
/// Exactly the expected transitions are routed upstream, in order; the remembered set of fences
/// survives the restart, and a bad position changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enter_exit_track_across_restart() {
    // The yard at (52.0, 13.0) and the depot 2 km north, 300 m each.
    let mut h = Harness::builder()
        .subscriber_as("telemetry-sub", "telemetry/#")
        .subscriber_as("transitions-sub", "outpost/gw1/geofence/#")
        .config_with(|url| {
            format!(
                r#"gateway_id = "gw1"

[geography]
transitions_topic = "outpost/{{gateway}}/geofence/{{device}}"

[[geofence]]
name = "yard"
center = [52.0, 13.0]
radius_m = 300.0

[[geofence]]
name = "depot"
center = [52.018, 13.0]
radius_m = 300.0
{link}
[[route]]
name = "telemetry"
filter = "telemetry/#"
upstream = "cloud"

[[route]]
name = "transitions"
filter = "outpost/gw1/geofence/#"
device_segment = 3
upstream = "cloud"
"#,
                link = upstream("cloud", url, None),
            )
        })
        .start()
        .await;
    let telemetry_sub = h.received_by("telemetry-sub").clone();
    let transitions_sub = h.received_by("transitions-sub").clone();

    let outside_1 = (52.009, 13.0); // 1 km from both
    let yard_1 = (52.0005, 13.0); // 56 m from the yard's centre
    let yard_2 = (51.9995, 13.001); // 88 m
    let outside_2 = (52.009, 13.0005);
    let depot_1 = (52.018, 13.0005); // 34 m from the depot's centre
    let depot_2 = (52.0182, 13.0); // 22 m
    let outside_3 = (52.009, 13.001);
    let yard_3 = (52.0001, 13.0001);
    const TOPIC: &str = "telemetry/truck1/env";

    let device = Device::connect(h.gateway.port, "truck1").await;
    let before_restart = [
        Fix {
            seq: 1,
            at: outside_1,
        },
        Fix { seq: 2, at: yard_1 },
        // seq 3: not a position (below)
        Fix { seq: 4, at: yard_2 },
        Fix {
            seq: 5,
            at: outside_2,
        },
        Fix {
            seq: 6,
            at: depot_1,
        },
    ];
    let mut acked = 0;
    for fix in &before_restart {
        device.publish(TOPIC, located(fix.seq, fix.at)).await;
        acked += 1;
        device.wait_acked(acked).await;
        if fix.seq == 2 {
            // Inside the yard, a latitude of 200: a dead letter, neither an exit nor an enter.
            device
                .publish(TOPIC, r#"{"seq":3,"lat":200,"lon":13.0}"#)
                .await;
            acked += 1;
            device.wait_acked(acked).await;
        }
    }
    eventually("the track so far upstream", || {
        seqs(&telemetry_sub, 1, "truck1") == BTreeSet::from([1, 2, 4, 5, 6])
    })
    .await;
    eventually("3 transitions so far", || {
        transitions(&transitions_sub).len() >= 3
    })
    .await;
    eventually("the bad position dead-lettered", || {
        h.gateway.dead_letters().get("bad-location") == Some(&1)
    })
    .await;
    settled(&h.gateway).await;
    drop(device);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");

    h.gateway.start();
    let device = Device::connect(h.gateway.port, "truck1").await;
    let after_restart = [
        Fix {
            seq: 7,
            at: depot_2,
        },
        Fix {
            seq: 8,
            at: outside_3,
        },
        Fix { seq: 9, at: yard_3 },
    ];
    for (n, fix) in after_restart.iter().enumerate() {
        device.publish(TOPIC, located(fix.seq, fix.at)).await;
        device.wait_acked(n as u64 + 1).await;
    }
    eventually("the whole track upstream", || {
        seqs(&telemetry_sub, 1, "truck1") == BTreeSet::from([1, 2, 4, 5, 6, 7, 8, 9])
    })
    .await;
    eventually("5 transitions", || transitions(&transitions_sub).len() >= 5).await;
    settled(&h.gateway).await;

    let t = |transition: &str, fence: &str, at: (f64, f64)| Transition {
        transition: transition.to_string(),
        fence: fence.to_string(),
        at,
    };
    assert_eq!(
        transitions(&transitions_sub),
        vec![
            t("enter", "yard", yard_1),
            t("exit", "yard", outside_2),
            t("enter", "depot", depot_1),
            t("exit", "depot", outside_3),
            t("enter", "yard", yard_3),
        ]
    );
    let letters = h.gateway.dead_letter_rows();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "bad-location");
    assert_eq!(letters[0].route, "telemetry");
    assert_eq!(json(&letters[0].payload)["seq"], 3);
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// Events without coordinates are placed at the device's last reported position (remembered
/// across a restart), else at its configured position, else at the gateway's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_registry_and_gateway_position() {
    // Two links (to one broker, as two clients) and a route per region, each with its own
    // output prefix: where an event went tells where the gateway placed it.
    let mut h = Harness::builder()
        .subscriber_as("eu-sub", "eu/#")
        .subscriber_as("us-sub", "us/#")
        .config_with(|url| {
            format!(
                r#"gateway_id = "gw1"

[geography]
gateway_position = [{chicago_lat}, {chicago_lon}]
{geography}
[[device]]
id = "pump-1"
position = [{paris_lat}, {paris_lon}]
{eu_link}
{us_link}
[[route]]
name = "eu"
filter = "telemetry/#"
when = {{ in = "eu" }}
topic = "eu/{{topic}}"
upstream = "eu-cloud"

[[route]]
name = "us"
filter = "telemetry/#"
when = {{ in = "us" }}
topic = "us/{{topic}}"
upstream = "us-cloud"
"#,
                chicago_lat = CHICAGO.0,
                chicago_lon = CHICAGO.1,
                paris_lat = PARIS.0,
                paris_lon = PARIS.1,
                geography = countries_and_regions(),
                eu_link = upstream("eu-cloud", url, Some(&["eu"])),
                us_link = upstream("us-cloud", url, Some(&["us"])),
            )
        })
        .start()
        .await;
    let eu_sub = h.received_by("eu-sub").clone();
    let us_sub = h.received_by("us-sub").clone();

    // The mover reports a position now and then; every event without one is where it last was.
    let mover = Device::connect(h.gateway.port, "mover").await;
    let track = [
        located(1, BERLIN),
        unlocated(2),
        located(3, CHICAGO),
        unlocated(4),
        located(5, MUNICH),
        unlocated(6),
    ];
    for (n, payload) in track.into_iter().enumerate() {
        mover.publish("telemetry/mover/env", payload).await;
        mover.wait_acked(n as u64 + 1).await;
    }
    let pump = Device::connect(h.gateway.port, "pump-1").await;
    publish_all(&pump, "telemetry/pump-1/env", vec![unlocated(1)], 0).await;
    let stranger = Device::connect(h.gateway.port, "stranger").await;
    publish_all(&stranger, "telemetry/stranger/env", vec![unlocated(1)], 0).await;

    eventually("mover 1, 2, 5, 6 on eu", || {
        seqs(&eu_sub, 2, "mover") == BTreeSet::from([1, 2, 5, 6])
    })
    .await;
    eventually("mover 3, 4 on us", || {
        seqs(&us_sub, 2, "mover") == BTreeSet::from([3, 4])
    })
    .await;
    eventually("pump-1 on eu", || {
        seqs(&eu_sub, 2, "pump-1") == BTreeSet::from([1])
    })
    .await;
    eventually("stranger on us", || {
        seqs(&us_sub, 2, "stranger") == BTreeSet::from([1])
    })
    .await;
    settled(&h.gateway).await;

    // The registry is durable: after a restart the mover is still in Munich (without it, its
    // events would be placed at the gateway, in Chicago).
    drop((mover, pump, stranger));
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
    h.gateway.start();
    for (id, seq) in [("mover", 7), ("pump-1", 2), ("stranger", 2)] {
        let device = Device::connect(h.gateway.port, id).await;
        publish_all(
            &device,
            &format!("telemetry/{id}/env"),
            vec![unlocated(seq)],
            0,
        )
        .await;
    }
    eventually("mover 7 on eu", || seqs(&eu_sub, 2, "mover").contains(&7)).await;
    eventually("pump-1 2 on eu", || seqs(&eu_sub, 2, "pump-1").contains(&2)).await;
    eventually("stranger 2 on us", || {
        seqs(&us_sub, 2, "stranger").contains(&2)
    })
    .await;
    settled(&h.gateway).await;

    let set =
        |sub: &Received| -> BTreeSet<(String, u64)> { arrivals(sub, 2).into_iter().collect() };
    let expected = |items: &[(&str, u64)]| -> BTreeSet<(String, u64)> {
        items.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    };
    assert_eq!(
        set(&eu_sub),
        expected(&[
            ("mover", 1),
            ("mover", 2),
            ("mover", 5),
            ("mover", 6),
            ("mover", 7),
            ("pump-1", 1),
            ("pump-1", 2),
        ])
    );
    assert_eq!(
        set(&us_sub),
        expected(&[("mover", 3), ("mover", 4), ("stranger", 1), ("stranger", 2)])
    );
    for (topic, _) in eu_sub.all() {
        assert!(topic.starts_with("eu/telemetry/"), "{topic}");
    }
    assert!(
        h.gateway.dead_letters().is_empty(),
        "{:?}",
        h.gateway.dead_letters()
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}

/// What a run of the binary printed (stdout and stderr together) and whether it succeeded.
struct Run {
    success: bool,
    output: String,
}

/// Runs `outpost <args>`; a run still going after `PATIENCE` is killed and fails the test (a
/// bad configuration must stop `run` before it serves anything).
fn outpost(args: &[String], log: &Path) -> Run {
    let file = std::fs::File::create(log).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().expect("log fd")))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("run outpost");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "outpost {args:?} still running after {PATIENCE:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        success: status.success(),
        output: std::fs::read_to_string(log).unwrap_or_default(),
    }
}

/// A configuration with geography, valid as given; each bad case changes one thing.
struct GeoConfig {
    /// A second geofence file, all of whose features are fences.
    extra_file: PathBuf,
    eu_fences: Vec<&'static str>,
    when: &'static str,
    route_upstream: &'static str,
}

impl GeoConfig {
    fn valid(extra_file: &Path) -> GeoConfig {
        GeoConfig {
            extra_file: extra_file.to_path_buf(),
            eu_fences: vec!["Germany", "France"],
            when: r#"{ in = "eu" }"#,
            route_upstream: "eu-cloud",
        }
    }

    fn text(&self) -> String {
        format!(
            r#"gateway_id = "gw1"

[geography]
gateway_position = [52.52, 13.405]

[[geofence]]
file = "{file}"
only = ["Germany", "France", "{USA}"]

[[geofence]]
file = "{extra}"

[[geofence]]
name = "yard"
center = [52.0, 13.0]
radius_m = 500.0

[[region]]
name = "eu"
fences = {eu}

[[region]]
name = "us"
fences = ["{USA}"]
{eu_link}{us_link}{plain_link}
[[route]]
name = "eu-telemetry"
filter = "telemetry/#"
when = {when}
upstream = "{route_upstream}"
"#,
            file = countries_file().display(),
            extra = self.extra_file.display(),
            eu = toml_list(&self.eu_fences),
            eu_link = upstream("eu-cloud", "mqtt://127.0.0.1:1", Some(&["eu"])),
            us_link = upstream("us-cloud", "mqtt://127.0.0.1:1", Some(&["us"])),
            plain_link = upstream("plain-cloud", "mqtt://127.0.0.1:1", None),
            when = self.when,
            route_upstream = self.route_upstream,
        )
    }
}

/// Broken geography is refused by `config check` and by `run`, naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_geography_config_is_refused() {
    tokio::task::spawn_blocking(bad_geography_config_is_refused_blocking)
        .await
        .expect("the checks");
}

fn bad_geography_config_is_refused_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let geojson = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write GeoJSON");
        path
    };
    let unclosed = geojson(
        "unclosed.geojson",
        r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"x"},"geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1]]]}}]}"#,
    );
    let line = geojson(
        "line.geojson",
        r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"x"},"geometry":{"type":"LineString","coordinates":[[0,0],[1,0],[1,1]]}}]}"#,
    );
    // A closed square "ok": the valid configuration's second file.
    let good = geojson(
        "good.geojson",
        r#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"ok"},"geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]]]}}]}"#,
    );
    let empty = geojson("empty.geojson", "");
    let not_json = geojson("notjson.geojson", "not json");

    // The control: the same configuration without the fault passes.
    let valid_dir = dir.path().join("valid");
    std::fs::create_dir_all(&valid_dir).unwrap();
    let path = write_config(&valid_dir, &GeoConfig::valid(&good).text());
    let check = outpost(
        &["config".into(), "check".into(), path.display().to_string()],
        &valid_dir.join("check.log"),
    );
    assert!(
        check.success,
        "the valid configuration is refused:\n{}",
        check.output
    );

    let with_file = |file: &PathBuf| GeoConfig {
        extra_file: file.clone(),
        ..GeoConfig::valid(&good)
    };
    // (what is wrong, configuration, what the message must name)
    let cases: Vec<(&str, GeoConfig, Vec<&str>)> = vec![
        (
            "unclosed ring",
            with_file(&unclosed),
            vec!["unclosed.geojson", "closed"],
        ),
        (
            "LineString feature",
            with_file(&line),
            vec!["line.geojson", "LineString"],
        ),
        (
            "empty file",
            with_file(&empty),
            vec!["empty.geojson", "is empty"],
        ),
        (
            "not JSON",
            with_file(&not_json),
            vec!["notjson.geojson", "JSON"],
        ),
        (
            "region naming an unknown fence",
            GeoConfig {
                eu_fences: vec!["Germany", "Atlantis"],
                ..GeoConfig::valid(&good)
            },
            vec!["eu", "Atlantis"],
        ),
        (
            "predicate naming an unknown fence or region",
            GeoConfig {
                when: r#"{ in = "Narnia" }"#,
                ..GeoConfig::valid(&good)
            },
            vec!["eu-telemetry", "Narnia"],
        ),
        (
            "nested predicate naming an unknown fence or region",
            GeoConfig {
                when: r#"{ all = [ { field = "/t", gt = 1 }, { not_in = "Narnia" } ] }"#,
                ..GeoConfig::valid(&good)
            },
            vec!["eu-telemetry", "Narnia"],
        ),
        (
            "route in eu to a link for us",
            GeoConfig {
                route_upstream: "us-cloud",
                ..GeoConfig::valid(&good)
            },
            vec!["eu-telemetry"],
        ),
        (
            "route in a fence of eu to a link for us",
            GeoConfig {
                when: r#"{ in = "Germany" }"#,
                route_upstream: "us-cloud",
                ..GeoConfig::valid(&good)
            },
            vec!["eu-telemetry"],
        ),
        (
            "route in eu to a link for untagged data only",
            GeoConfig {
                route_upstream: "plain-cloud",
                ..GeoConfig::valid(&good)
            },
            vec!["eu-telemetry"],
        ),
    ];
    for (n, (what, config, needles)) in cases.into_iter().enumerate() {
        let case_dir = dir.path().join(format!("case-{n}"));
        std::fs::create_dir_all(&case_dir).unwrap();
        let path = write_config(&case_dir, &config.text());
        let port = free_port();
        for (label, args) in [
            (
                "check",
                vec![
                    "config".to_string(),
                    "check".into(),
                    path.display().to_string(),
                ],
            ),
            (
                "run",
                vec![
                    "run".to_string(),
                    "--config".into(),
                    path.display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--data".into(),
                    case_dir.join("data").display().to_string(),
                ],
            ),
        ] {
            let run = outpost(&args, &case_dir.join(format!("{label}.log")));
            assert!(
                !run.success,
                "{what}: `{label}` accepted it:\n{}",
                run.output
            );
            assert!(!run.output.contains("panicked"), "{what}: {}", run.output);
            for needle in &needles {
                assert!(
                    run.output.contains(needle),
                    "{what}: `{label}` does not name {needle:?}:\n{}",
                    run.output
                );
            }
        }
    }
}

/// A handler sees the event's location and region tags (through its module's durable queue):
/// the `enrich` example copies them into its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_location_and_regions() {
    let setup = Harness::builder();
    let wasm = setup.dir().join("enrich.wasm");
    std::fs::write(&wasm, outpost::handlers::examples::ENRICH).unwrap();
    let mut h = setup
        .subscriber_as("cloud-sub", "#")
        .config_with(|url| {
            format!(
                r#"gateway_id = "gw1"
{geography}
{link}
[[module]]
name = "enrich"
path = "{wasm}"

[[route]]
name = "enrich"
filter = "telemetry/#"
handler = "enrich"
"#,
                geography = countries_and_regions(),
                link = upstream("cloud", url, Some(&["*"])),
                wasm = wasm.display(),
            )
        })
        .start()
        .await;

    let berlin = Device::connect(h.gateway.port, "berlin").await;
    publish_all(&berlin, "telemetry/berlin/env", vec![located(1, BERLIN)], 0).await;
    let chicago = Device::connect(h.gateway.port, "chicago").await;
    publish_all(
        &chicago,
        "telemetry/chicago/env",
        vec![located(1, CHICAGO)],
        0,
    )
    .await;
    // No coordinates: the device's last known position (Berlin) is the event's.
    publish_all(&berlin, "telemetry/berlin/env", vec![unlocated(2)], 1).await;

    eventually("three enriched outputs", || h.received.len() >= 3).await;
    let outputs: Vec<Value> = h
        .received
        .all()
        .iter()
        .map(|(_, payload)| json(payload))
        .collect();
    let find = |device: &str, seq: u64| {
        outputs
            .iter()
            .find(|o| o["device"] == device && o["seq"] == seq)
            .unwrap_or_else(|| panic!("no output for {device} {seq}: {outputs:?}"))
            .clone()
    };
    for (device, seq, at, region) in [
        ("berlin", 1, BERLIN, "eu"),
        ("chicago", 1, CHICAGO, "us"),
        ("berlin", 2, BERLIN, "eu"),
    ] {
        let output = find(device, seq);
        assert_eq!(output["regions"], serde_json::json!([region]), "{output}");
        assert_eq!(
            output["location"],
            serde_json::json!({ "lat": at.0, "lon": at.1 }),
            "{output}"
        );
    }
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}
