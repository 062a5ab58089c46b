//! `outpost bench`: a reproducible end-to-end benchmark of the gateway, in one process.
//!
//! What runs: the real gateway ([`Gateway::start`]) with the default passthrough route
//! (`telemetry/#` forwarded unchanged) and its SQLite journal and outbox (`synchronous=FULL`),
//! real sockets on 127.0.0.1 (free ports), a stand-in upstream broker (a second embedded
//! broker, like the demo's) whose every arrival is counted and timed, and a load generator of
//! many simulated devices (rumqttc clients) publishing QoS 1 as fast as their inflight window
//! allows (or at `--rate`).
//!
//! Three phases:
//! - **throughput**: `--messages` publishes spread over `--devices` devices, upstream reachable.
//!   Reports PUBACKs per second over the publishing phase (the gateway acknowledges a publish
//!   only once its journal commit is durable), the rates at which the gateway journaled them,
//!   moved them to its outbox and delivered them upstream, the latency from the device's
//!   publish to the upstream's arrival (the send time travels in the payload), and the bytes
//!   written to disk per message.
//! - **backlog**: upstream unreachable (a closed port), publish until the outbox holds each of
//!   the `--backlog` sizes, and at each measure the rates over a window of `--window` messages,
//!   to show whether the cost per message stays flat as the outbox grows. The outbox caps are
//!   raised above the largest depth asked for, so that they do not hold data back.
//! - **drain**: upstream unreachable, queue a backlog of `--drain` messages, then make the
//!   upstream reachable (the stand-in starts listening on the port that was closed) while the
//!   devices keep publishing live traffic (as fast as their windows allow, or at `--rate`).
//!   Reports how long the backlog takes to deliver and at what rate, the live PUBACKs per
//!   second and publish-to-PUBACK latency meanwhile (against the throughput phase's, which had
//!   nothing to drain), how long until the outbox is empty once live publishing stops at the
//!   backlog's end, and whether every backlog and live message arrived upstream.
//!
//! **A hostile neighbour** (`--hostile`, throughput phase only): a second route, `hostile/#`,
//! runs the given handler component (by default the `faulty` test fixture, which loops
//! forever on the payload `loop`, exhausts its memory on `grow`, traps on `trap`), and one more
//! device publishes `--hostile-payload` to it while the other devices load the first route. The
//! route gives up after one attempt (`max_attempts = 1`) and dead-letters its events while its
//! module is quarantined (`on_quarantine = "dead-letter"`), so nothing piles up; the device
//! publishes at most `--hostile-rate` events a second (default 10) and keeps at most
//! `--hostile-pending` of them unfinished in the gateway (default 10: enough that a module that
//! loops until its deadline always has an event waiting, even when events wait behind a full
//! journal), so the module is kept busy all the time without an ever-growing queue. The handler settings are the gateway's defaults
//! (deadline, memory cap, one invocation of a module at a time, the circuit breaker);
//! `--no-breaker` makes the breaker never trip, for the worst case: a module running to its
//! deadline on every event, continuously. Reported: the first route's figures as usual, how
//! many hostile events were published and how each ended (dead letters by reason), the
//! handler invocations, failures and quarantines, how long the hostile guest ran, and the first
//! route's acknowledged rate before and after the module's first quarantine.
//!
//! Everything is in one process on purpose: `/proc/self/io` then counts the gateway's disk
//! writes, but `/proc/self/status`'s peak RSS and the CPU time include the load generator and
//! the stand-in upstream.
//!
//! For a broker that runs as a process of its own (`outpost run`, or Mosquitto to compare
//! with), `outpost bench load | fanout | retained | idle` is only the load generator, over
//! real sockets: see [`external`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use outpost::config::QuarantinePolicy;
use outpost::config::{
    BrokerConfig, Config, HandlerConfig, ModuleConfig, RouteConfig, UpstreamConfig,
};
use outpost::edge::{DevicePublish, Edge};
use outpost::gateway::Gateway;
use outpost::metrics::Metrics;
use outpost::store::{DeadLetterFilter, Store};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub mod external;

/// How long no counter may move before the benchmark gives up.
const STALL: Duration = Duration::from_secs(30);
/// How often the waiting loops look at the counters (tokio's timer resolution is 1 ms).
const POLL: Duration = Duration::from_millis(1);
/// Most publishes the backlog phase releases before waiting for them to reach the outbox, so
/// that each measurement starts with the journal empty and the outbox at the depth asked for.
const FILL_CHUNK: u64 = 50_000;
/// The Linux clock tick used by `/proc/self/stat` (USER_HZ, 100 on every common platform).
const USER_HZ: f64 = 100.0;
/// The hostile neighbour's route, and the name of its module.
const HOSTILE_ROUTE: &str = "hostile";
/// What the hostile route takes.
const HOSTILE_FILTER: &str = "hostile/#";
/// The first level of the hostile route's topics, which the stand-in upstream counts apart.
const HOSTILE_PREFIX: &str = "hostile/";
/// Where the hostile device publishes (under [`HOSTILE_FILTER`], outside `telemetry/#`).
const HOSTILE_TOPIC: &str = "hostile/bench-hostile/data";

/// What to run: the flags of `outpost bench` without a mode, with their defaults. The doc
/// comments of the fields are the flags' help texts.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Options {
    /// Number of simulated devices (one MQTT connection each).
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Total publishes of the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Payload size in bytes (JSON with a sequence number and the send time, padded).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Unacknowledged QoS 1 publishes each device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// At most this many publishes per second in all (0: as fast as the windows allow);
    /// use a sustainable rate to measure latency without queueing.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Outbox depths at which the backlog phase measures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub backlog: Vec<u64>,
    /// Publishes per backlog measurement.
    #[arg(long, default_value_t = 50_000)]
    pub window: u64,
    /// Skip the throughput phase.
    #[arg(long)]
    pub skip_throughput: bool,
    /// Skip the backlog phase.
    #[arg(long)]
    pub skip_backlog: bool,
    /// Messages queued with the upstream unreachable before the drain phase makes it
    /// reachable and measures live traffic while they drain (0: skip the phase).
    #[arg(long, default_value_t = 100_000)]
    pub drain: u64,
    /// Skip the drain phase.
    #[arg(long)]
    pub skip_drain: bool,
    /// Run this WebAssembly handler on the route (one that returns each event unchanged,
    /// such as the `passthrough` guest) to measure a handler route instead of forwarding.
    #[arg(long, value_name = "WASM")]
    pub handler: Option<PathBuf>,
    /// In the throughput phase, add a second route (`hostile/#`) running this WebAssembly
    /// handler (default: the `faulty` test guest built with this binary) and one more device
    /// publishing --hostile-payload to it, to measure what a misbehaving module costs the
    /// other route.
    // `Some(None)` is the flag without a file: see [`Options::hostile_module`].
    #[arg(long, value_name = "WASM", num_args = 0..=1)]
    pub hostile: Option<Option<PathBuf>>,
    /// What the hostile device publishes (for `faulty`: loop, grow, trap, error, ...).
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "loop",
        requires = "hostile"
    )]
    pub hostile_payload: String,
    /// Most hostile publishes per second (0: no limit but --hostile-pending).
    #[arg(long, value_name = "N", default_value_t = 10, requires = "hostile")]
    pub hostile_rate: u64,
    /// Most hostile events unfinished in the gateway at once, that is published but not
    /// yet dead-lettered or delivered (0: no limit but --hostile-rate). The default keeps a
    /// looping module busy all the time even when its events wait behind a full journal.
    #[arg(long, value_name = "N", default_value_t = 10, requires = "hostile")]
    pub hostile_pending: u64,
    /// Turn the handlers' circuit breaker off (handlers.breaker_failures = 4294967295), so
    /// that a failing module runs on every event: the worst case.
    #[arg(long)]
    pub no_breaker: bool,
    /// Directory for the gateway's databases (default: a fresh one under the temp dir).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Options {
    /// The hostile neighbour's handler component, if `--hostile` was given: its file, or
    /// without one the `faulty` test guest built with this binary.
    fn hostile_module(&self) -> Option<PathBuf> {
        let default = || outpost::handlers::examples::guest_path("faulty");
        self.hostile
            .clone()
            .map(|path| path.unwrap_or_else(default))
    }
}

/// The whole report, as printed and as written with `--json`.
#[derive(Debug, Serialize)]
struct Report {
    /// When the run started, in seconds since the Unix epoch.
    started_unix: u64,
    machine: Machine,
    settings: Settings,
    throughput: Option<Throughput>,
    backlog: Vec<BacklogPoint>,
    drain: Option<Drain>,
    /// VmHWM at the end of the run: the whole process, load generator and stand-in upstream
    /// included.
    peak_rss_kib: u64,
    notes: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    mem_total_kib: u64,
    data_dir: String,
}

#[derive(Debug, Serialize)]
struct Settings {
    devices: usize,
    messages: u64,
    payload_bytes: usize,
    inflight_per_device: u16,
    /// Publishes per second in all, 0 = as fast as possible.
    rate: u64,
    backlog_depths: Vec<u64>,
    backlog_window: u64,
    /// Backlog of the drain phase, 0 = not run.
    drain_backlog: u64,
    /// The handler component the route runs, if any (else the route forwards unchanged).
    handler: Option<String>,
    /// The hostile neighbour of the throughput phase, if any.
    hostile: Option<HostileSettings>,
    /// The gateway's handler limits in every phase (its defaults, except the breaker with
    /// `--no-breaker`).
    handler_deadline_ms: u64,
    handler_memory_limit_mib: usize,
    handler_max_concurrent_per_module: usize,
    /// Consecutive failures that quarantine a module (`u32::MAX`: never, `--no-breaker`).
    breaker_failures: u32,
    breaker_cooldown_ms: u64,
}

/// The hostile neighbour, as asked for.
#[derive(Debug, Serialize)]
struct HostileSettings {
    /// Its handler component.
    module: String,
    /// What its device publishes.
    payload: String,
    /// Most publishes per second (0: no limit).
    rate: u64,
    /// Most events unfinished in the gateway at once (0: no limit).
    pending: u64,
}

/// Results of the throughput phase.
#[derive(Debug, Serialize)]
struct Throughput {
    messages: u64,
    /// From the release of the load to the last PUBACK received by a device.
    publish_secs: f64,
    /// PUBACKs received by devices / `publish_secs`.
    acked_per_sec: f64,
    /// From the release of the load until the gateway had journaled every message
    /// (`metrics.journaled`).
    journaled_secs: f64,
    journaled_per_sec: f64,
    /// From the release of the load until the gateway had moved every message to its outbox
    /// (`metrics.queued`).
    outbox_secs: f64,
    outbox_per_sec: f64,
    /// From the release of the load until the stand-in upstream had received every message.
    delivered_secs: f64,
    delivered_per_sec: f64,
    /// Publish (device) to arrival (stand-in upstream), first arrival of each message.
    latency_us: Latency,
    /// Publish (the device's client writes it) to its PUBACK, every publish.
    ack_latency_us: Latency,
    upstream_arrivals: u64,
    upstream_unique: u64,
    upstream_unparsed: u64,
    /// Bytes the process caused to be written to storage (`/proc/self/io` `write_bytes`),
    /// from the release of the load until the outbox was empty again (so including the deletes
    /// after delivery, the WAL and its checkpoints), per message.
    disk_bytes_per_msg: f64,
    /// The same, only until the last PUBACK (the journal's writes, and whatever the pipeline
    /// and uplink wrote meanwhile).
    disk_bytes_per_msg_until_acked: f64,
    /// The most publishes acknowledged to devices but not yet journaled at one poll: what a
    /// crash at that moment would have lost. 0 when PUBACK waits for the journal commit.
    peak_acked_not_journaled: u64,
    /// Process CPU time (user + system) during the publishing phase, in seconds, and as a
    /// share of the wall time (1.0 = one core busy).
    cpu_secs: f64,
    cpu_cores_busy: f64,
    /// Times a device's connection failed (each may lose in-flight publishes).
    device_connection_errors: u64,
    /// The hostile neighbour's side, with `--hostile`.
    hostile: Option<HostileReport>,
}

/// What the hostile neighbour did during the throughput phase, and what became of it. The
/// handler counters are the gateway's, all modules together (with `--handler` they include the
/// first route's handler).
#[derive(Debug, Serialize)]
struct HostileReport {
    /// From the release of the load until the hostile device stopped (when every message of
    /// the first route had arrived upstream).
    active_secs: f64,
    /// Hostile publishes sent, and acknowledged by the gateway (journaled).
    published: u64,
    acked: u64,
    /// Dead letters of the hostile route, by reason (`timeout`, `out-of-memory`, `trap`,
    /// `quarantined`, ...), counted after the gateway stopped.
    dead_letters: BTreeMap<String, u64>,
    /// Outputs of the hostile route that arrived upstream (a payload the module answers).
    outputs_delivered: u64,
    /// Events still queued for the module's lane when the gateway stopped (kept for the next
    /// start).
    left_queued: u64,
    handler_invocations: u64,
    handler_failures: u64,
    /// Times the module was quarantined, and events dead-lettered because it was.
    quarantines: u64,
    quarantined_events: u64,
    /// From the release of the load to the module's first quarantine, if any.
    first_quarantine_secs: Option<f64>,
    /// The first route's PUBACKs per second from the release of the load to the first
    /// quarantine (while the hostile module could run), and from then to the last PUBACK;
    /// `None` when the module was not quarantined while the devices published.
    acked_per_sec_before_quarantine: Option<f64>,
    acked_per_sec_after_quarantine: Option<f64>,
    /// Time handler invocations ran (all modules), those that ended within `active_secs`, and
    /// as a share of `active_secs` (an invocation still running at the end is left out).
    handler_run_secs: f64,
    handler_busy_share: f64,
    /// Fuel the hostile module consumed (about one unit per WebAssembly instruction).
    fuel: u64,
    /// How long the gateway took to shut down: it waits for the module's lane to finish the
    /// events it has taken (each may run to its deadline, twice when a batch of several failed
    /// and is retried event by event).
    shutdown_secs: f64,
    device_connection_errors: u64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct Latency {
    samples: usize,
    p50: u64,
    p90: u64,
    p99: u64,
    max: u64,
}

/// One measurement of the backlog phase.
#[derive(Debug, Serialize)]
struct BacklogPoint {
    /// The depth asked for.
    target_depth: u64,
    /// `outbox_depth` when the window started.
    outbox_depth: u64,
    window: u64,
    /// PUBACKs over the window / time from its release to its last PUBACK.
    acked_per_sec: f64,
    /// Outbox rows added over the window / time from its release until all were in the outbox.
    outbox_per_sec: f64,
    /// See [`Throughput::peak_acked_not_journaled`].
    peak_acked_not_journaled: u64,
    disk_bytes_per_msg: f64,
    cpu_cores_busy: f64,
}

/// Results of the drain phase. Times are from the moment the upstream became reachable
/// (the stand-in starts listening), unless said otherwise.
#[derive(Debug, Serialize)]
struct Drain {
    /// Messages queued with the upstream unreachable.
    backlog: u64,
    /// `outbox_depth` just before the upstream became reachable.
    outbox_depth_before: u64,
    /// Until the first message arrived upstream: the uplink's reconnect backoff (at most
    /// `reconnect_max_ms` = 1 s here, with jitter) and its connection.
    first_delivery_secs: f64,
    /// From the first arrival to the arrival of the last backlog message (the uplink sends in
    /// outbox order, so the backlog goes before every live message).
    backlog_drain_secs: f64,
    /// `backlog` / `backlog_drain_secs`.
    backlog_delivered_per_sec: f64,
    /// Until every backlog message had arrived (`first_delivery_secs + backlog_drain_secs`).
    backlog_delivered_secs: f64,
    /// Outbox rows when the last backlog message had arrived: live rows queued behind it.
    outbox_depth_at_backlog_end: u64,
    /// Until the outbox was empty. Live publishing stops when the backlog has arrived (with a
    /// saturating live load the outbox would not empty otherwise).
    outbox_empty_secs: f64,
    /// PUBACKs to live publishes while the backlog drained (from the first arrival upstream to
    /// the last backlog arrival) and their rate.
    live_acked_during_drain: u64,
    live_acked_per_sec: f64,
    /// The throughput phase's `acked_per_sec` (same run, nothing to drain), if it ran.
    baseline_acked_per_sec: Option<f64>,
    /// `live_acked_per_sec / baseline_acked_per_sec`.
    live_vs_baseline: Option<f64>,
    /// Live publish (the device's client writes it) to its PUBACK, publishes acknowledged
    /// while the backlog drained.
    live_ack_latency_us: Latency,
    /// Live publish to its arrival upstream, every live message (queued behind the backlog).
    live_upstream_latency_us: Latency,
    /// Live publishes sent in all (from the upstream becoming reachable to the backlog's end).
    live_messages: u64,
    /// Distinct backlog / live sequence numbers that arrived upstream.
    backlog_arrived: u64,
    live_arrived: u64,
    upstream_arrivals: u64,
    upstream_unparsed: u64,
    /// Every backlog and every live message arrived upstream.
    complete: bool,
    /// See [`Throughput::peak_acked_not_journaled`], over the whole drain.
    peak_acked_not_journaled: u64,
    /// Times the gateway waited at the outbox or journal cap during the drain (0: the caps,
    /// raised for the phase, did not hold live traffic back).
    waits_at_caps: u64,
    /// Process CPU while the backlog drained, as a share of the wall time.
    cpu_cores_busy: f64,
    device_connection_errors: u64,
}

/// The honest small print, repeated in the JSON.
const NOTES: &[&str] = &[
    "acked = PUBACKs received by the simulated devices; the gateway sends each only after the publish's journal commit (SQLite WAL, synchronous=FULL), so acked_per_sec is the durable rate; outbox = moved from the journal to the outbox by the pipeline",
    "disk bytes = /proc/self/io write_bytes of this process (page-granular, includes the WAL, its checkpoints and the deletes after delivery; not the file system's own journal)",
    "peak RSS and CPU are the whole process: gateway, load generator and stand-in upstream share it and the same cores",
    "acked, not journaled = the most publishes PUBACKed to devices but not yet journaled at one poll (1 ms): what a crash at that moment would have lost; must be 0",
];

/// Runs the benchmark and prints (and optionally writes) the report.
pub async fn run(options: Options) -> anyhow::Result<()> {
    check_options(&options)?;
    let root = match &options.data {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("outpost-bench-{}", std::process::id())),
    };
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let machine = Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model: cpu_model(),
        mem_total_kib: proc_field("/proc/meminfo", "MemTotal:").unwrap_or(0),
        data_dir: root.display().to_string(),
    };
    let handlers = handler_config(&options);
    let mut backlog_depths = options.backlog.clone();
    backlog_depths.sort_unstable();
    backlog_depths.dedup();
    let settings = Settings {
        devices: options.devices,
        messages: options.messages,
        payload_bytes: options.payload_bytes,
        inflight_per_device: options.inflight,
        rate: options.rate,
        backlog_depths: backlog_depths.clone(),
        backlog_window: options.window,
        drain_backlog: if options.skip_drain { 0 } else { options.drain },
        handler: options.handler.as_ref().map(|p| p.display().to_string()),
        hostile: options.hostile_module().map(|p| HostileSettings {
            module: p.display().to_string(),
            payload: options.hostile_payload.clone(),
            rate: options.hostile_rate,
            pending: options.hostile_pending,
        }),
        handler_deadline_ms: handlers.deadline_ms,
        handler_memory_limit_mib: handlers.memory_limit_mib,
        handler_max_concurrent_per_module: handlers.max_concurrent_per_module,
        breaker_failures: handlers.breaker_failures,
        breaker_cooldown_ms: handlers.breaker_cooldown_ms,
    };
    println!("outpost bench");
    println!(
        "  machine   {} CPU(s), {}, {} MiB RAM; data in {}",
        machine.cpus,
        machine.cpu_model,
        machine.mem_total_kib / 1024,
        machine.data_dir
    );
    println!(
        "  load      {} devices, QoS 1, {} in flight each, {}-byte payloads, {}",
        options.devices,
        options.inflight,
        options.payload_bytes,
        match options.rate {
            0 => "as fast as possible".to_string(),
            rate => format!("at most {rate} msg/s in all"),
        }
    );
    println!(
        "  route     telemetry/# -> {}",
        match &options.handler {
            Some(path) => format!("handler {} (lanes, batches of up to 64)", path.display()),
            None => "forwarded unchanged".to_string(),
        }
    );
    if let Some(path) = options.hostile_module() {
        println!(
            "  neighbour {HOSTILE_FILTER} -> handler {} (throughput phase): one device publishing {:?}, {}, {}; the route dead-letters after 1 attempt and while quarantined",
            path.display(),
            options.hostile_payload,
            match options.hostile_rate {
                0 => "no rate limit".to_string(),
                rate => format!("at most {rate}/s"),
            },
            match options.hostile_pending {
                0 => "no limit on unfinished events".to_string(),
                n => format!("at most {n} unfinished in the gateway"),
            },
        );
    }
    println!(
        "  handlers  deadline {} ms, memory {} MiB, {} invocation(s) of a module at a time; breaker {}",
        handlers.deadline_ms,
        handlers.memory_limit_mib,
        handlers.max_concurrent_per_module,
        match handlers.breaker_failures {
            u32::MAX => "off (--no-breaker)".to_string(),
            n => format!(
                "quarantines after {n} failures in a row for {} s",
                handlers.breaker_cooldown_ms / 1000
            ),
        }
    );

    let throughput = if options.skip_throughput {
        None
    } else {
        let dir = fresh_dir(&root.join("throughput"))?;
        let result = throughput_phase(&options, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        Some(result.context("throughput phase")?)
    };
    let mut backlog = Vec::new();
    if !options.skip_backlog && !backlog_depths.is_empty() {
        let dir = fresh_dir(&root.join("backlog"))?;
        let result = backlog_phase(&options, &backlog_depths, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        backlog = result.context("backlog phase")?;
    }
    let mut drain = None;
    if settings.drain_backlog > 0 {
        let dir = fresh_dir(&root.join("drain"))?;
        let baseline = throughput.as_ref().map(|t| t.acked_per_sec);
        let result = drain_phase(&options, settings.drain_backlog, baseline, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        drain = Some(result.context("drain phase")?);
    }
    if options.data.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }

    let report = Report {
        started_unix,
        machine,
        settings,
        throughput,
        backlog,
        drain,
        peak_rss_kib: proc_field("/proc/self/status", "VmHWM:").unwrap_or(0),
        notes: NOTES
            .iter()
            .copied()
            .chain(std::iter::once(if options.rate == 0 {
                "latency is measured at saturation (every device keeps its inflight window full), so it is mostly queueing in the gateway's outbox; use --rate for latency at a sustainable load"
            } else {
                "latency is measured at the --rate given; it includes queueing only if that rate is above what the gateway sustains"
            }))
            .collect(),
    };
    print_report(&report);
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

/// Refuses options that cannot give a meaningful run, and handler files that are missing or
/// not WebAssembly, before anything starts.
fn check_options(options: &Options) -> anyhow::Result<()> {
    if options.devices == 0 || options.messages == 0 || options.window == 0 {
        bail!("--devices, --messages and --window must be at least 1");
    }
    if options.inflight == 0 {
        bail!("--inflight must be at least 1");
    }
    if let Some(path) = &options.handler {
        check_wasm("--handler", path)?;
    }
    if let Some(path) = options.hostile_module() {
        check_wasm("--hostile", &path)?;
        if options.skip_throughput {
            bail!("--hostile runs in the throughput phase: do not skip it");
        }
        if options.hostile_rate == 0 && options.hostile_pending == 0 {
            bail!(
                "--hostile-rate 0 with --hostile-pending 0 would publish hostile events without \
                 any limit; give one of them"
            );
        }
    }
    Ok(())
}

/// Checks that `path` (given with `flag`) is a readable WebAssembly file, by its magic number.
fn check_wasm(flag: &str, path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    if &magic != b"\0asm" {
        bail!(
            "{flag} {}: not a WebAssembly file (a component built for wasm32-wasip2 is expected)",
            path.display()
        );
    }
    Ok(())
}

/// The gateway's handler settings in every phase: its defaults, with the breaker off under
/// `--no-breaker`.
fn handler_config(options: &Options) -> HandlerConfig {
    let mut handlers = HandlerConfig::default();
    if options.no_breaker {
        handlers.breaker_failures = u32::MAX;
    }
    handlers
}

/// Phase 1: upstream reachable, `messages` publishes as fast as the devices' windows allow.
async fn throughput_phase(options: &Options, data_dir: &Path) -> anyhow::Result<Throughput> {
    println!();
    println!(
        "throughput: {} messages through the journal to a stand-in upstream",
        options.messages
    );
    let clock = Instant::now();
    let upstream_port = free_port()?;
    let (upstream_tx, upstream_rx) = mpsc::channel(8192);
    let mut upstream_edge = Edge::start(
        &broker_on(upstream_port, 16),
        upstream_tx,
        Arc::new(Metrics::default()),
    )
    .context("starting the stand-in upstream")?;
    let arrivals = Arc::new(Arrivals::default());
    let counter = tokio::spawn(count_arrivals(upstream_rx, arrivals.clone(), clock));

    let gateway_port = free_port()?;
    let gateway = Gateway::start(gateway_config(
        data_dir,
        gateway_port,
        format!("mqtt://127.0.0.1:{upstream_port}"),
        options,
        true,
    ))
    .await
    .context("starting the gateway")?;
    let fleet = Fleet::connect(gateway_port, options, clock).await?;
    let metrics = gateway.metrics.clone();
    let hostile = match &options.hostile {
        Some(_) => {
            // A hostile event is finished once it is a dead letter or its outputs arrived.
            let (metrics, arrivals) = (metrics.clone(), arrivals.clone());
            let finished: Finished = Arc::new(move || {
                metrics.dead_lettered.load(Ordering::Relaxed)
                    + arrivals.hostile.load(Ordering::Relaxed)
            });
            Some(HostileDevice::connect(gateway_port, options, finished).await?)
        }
        None => None,
    };
    // Hostile publishes are journaled too: count only the first route's.
    let hostile_acked = || hostile.as_ref().map_or(0, HostileDevice::acked);
    let journaled = || {
        metrics
            .journaled
            .load(Ordering::Relaxed)
            .saturating_sub(hostile_acked())
    };

    let total = options.messages;
    let io_start = write_bytes();
    let cpu_start = cpu_secs();
    let run_us_start = metrics.handler_run_us.load(Ordering::Relaxed);
    let start = Instant::now();
    fleet.record_ack_latency(true);
    fleet.release(total);
    let quarantine_watch = hostile.as_ref().map(|h| {
        h.go();
        tokio::spawn(first_quarantine(metrics.clone(), fleet.crowd.acked.clone()))
    });
    let waited = wait_all(
        start,
        vec![
            ("acked", total, Box::new(|| fleet.acked())),
            ("journaled", total, Box::new(journaled)),
            ("outbox", total, Box::new(|| metrics.snapshot().queued)),
            (
                "delivered",
                total,
                Box::new(|| arrivals.unique.load(Ordering::Relaxed)),
            ),
        ],
    )
    .await?;
    let reached = &waited.reached;
    let (acked_at, journaled_at, outbox_at, delivered_at) =
        (&reached[0], &reached[1], &reached[2], &reached[3]);
    let cpu_publish = cpu_start.map(|c0| acked_at.cpu - c0);
    // The neighbour stops when the first route's measurement is complete.
    let hostile_stopped = Instant::now();
    let run_us_at_stop = metrics.handler_run_us.load(Ordering::Relaxed);
    let quarantined = match quarantine_watch {
        Some(watch) if watch.is_finished() => watch.await.ok(),
        Some(watch) => {
            watch.abort();
            None
        }
        None => None,
    };
    let hostile_device = match hostile {
        Some(device) => Some(device.stop().await),
        None => None,
    };

    // The outbox empties once the uplink's batched deletes have run.
    let deadline = Instant::now() + STALL;
    while depth(&gateway).await? > 0 {
        if Instant::now() > deadline {
            bail!("the outbox did not empty after delivery");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let io_end = write_bytes();
    let device_connection_errors = fleet.crowd.errors();
    let ack_latency_us = Latency::of_sorted(&fleet.ack_latencies());

    fleet.stop().await;
    let store = gateway.store.clone();
    let shutdown_started = Instant::now();
    gateway.shutdown().await;
    let shutdown_secs = shutdown_started.elapsed().as_secs_f64();
    upstream_edge.stop();
    counter.abort();

    let secs = |at: &Reached| at.at.duration_since(start).as_secs_f64();
    let publish_secs = secs(acked_at);
    let hostile = match hostile_device {
        Some(device) => {
            let snapshot = metrics.snapshot();
            let (dead_letters, left_queued) = tokio::task::spawn_blocking(move || {
                anyhow::Ok((
                    dead_letters_by_reason(&store, HOSTILE_ROUTE)?,
                    store.retry_count()?,
                ))
            })
            .await??;
            let active_secs = hostile_stopped.duration_since(start).as_secs_f64();
            let handler_run_secs = run_us_at_stop.saturating_sub(run_us_start) as f64 / 1e6;
            let split = quarantined
                .filter(|q| q.at < acked_at.at)
                .map(|q| split_at_quarantine(&q, start, acked_at.at, total));
            Some(HostileReport {
                active_secs,
                published: device.sent,
                acked: device.acked,
                dead_letters,
                outputs_delivered: arrivals.hostile.load(Ordering::Relaxed),
                left_queued,
                handler_invocations: snapshot.handler_invocations,
                handler_failures: snapshot.handler_failures,
                quarantines: snapshot.quarantines,
                quarantined_events: snapshot.quarantined_events,
                first_quarantine_secs: quarantined
                    .as_ref()
                    .map(|q| q.at.duration_since(start).as_secs_f64()),
                acked_per_sec_before_quarantine: split.map(|s| s.0),
                acked_per_sec_after_quarantine: split.map(|s| s.1),
                handler_run_secs,
                handler_busy_share: handler_run_secs / active_secs,
                fuel: snapshot
                    .module_fuel
                    .get(HOSTILE_ROUTE)
                    .copied()
                    .unwrap_or(0),
                shutdown_secs,
                device_connection_errors: device.errors,
            })
        }
        None => None,
    };

    let tally = arrivals
        .tally
        .lock()
        .map_err(|_| anyhow::anyhow!("the arrival counter panicked"))?;
    let mut latencies = tally.latencies_us.clone();
    latencies.sort_unstable();
    let latency_us = Latency::of_sorted(&latencies);
    let per_msg = |end: Option<u64>| match (io_start, end) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / total as f64,
        _ => f64::NAN,
    };
    Ok(Throughput {
        messages: total,
        publish_secs,
        acked_per_sec: total as f64 / publish_secs,
        journaled_secs: secs(journaled_at),
        journaled_per_sec: total as f64 / secs(journaled_at),
        outbox_secs: secs(outbox_at),
        outbox_per_sec: total as f64 / secs(outbox_at),
        delivered_secs: secs(delivered_at),
        delivered_per_sec: total as f64 / secs(delivered_at),
        latency_us,
        ack_latency_us,
        upstream_arrivals: tally.arrivals,
        upstream_unique: arrivals.unique.load(Ordering::Relaxed),
        upstream_unparsed: tally.unparsed,
        disk_bytes_per_msg: per_msg(io_end),
        disk_bytes_per_msg_until_acked: per_msg(acked_at.write_bytes),
        peak_acked_not_journaled: waited.peak_lead,
        cpu_secs: cpu_publish.unwrap_or(f64::NAN),
        cpu_cores_busy: cpu_publish.map_or(f64::NAN, |c| c / publish_secs),
        device_connection_errors,
        hostile,
    })
}

/// The moment a module was first quarantined, and the PUBACKs devices had received by then.
#[derive(Debug, Clone, Copy)]
struct Quarantined {
    at: Instant,
    acked: u64,
}

/// Waits (polling) for the gateway's first quarantine.
async fn first_quarantine(metrics: Arc<Metrics>, acked: Arc<AtomicU64>) -> Quarantined {
    while metrics.quarantines.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(POLL).await;
    }
    Quarantined {
        at: Instant::now(),
        acked: acked.load(Ordering::Relaxed),
    }
}

/// The PUBACK rates (of `total` publishes released at `start`, the last acknowledged at
/// `end`) before and after the first quarantine `q`.
fn split_at_quarantine(q: &Quarantined, start: Instant, end: Instant, total: u64) -> (f64, f64) {
    let before = q.at.duration_since(start).as_secs_f64();
    let after = end.duration_since(q.at).as_secs_f64();
    (
        q.acked as f64 / before,
        total.saturating_sub(q.acked) as f64 / after,
    )
}

/// The dead letters of `route`, counted by reason.
fn dead_letters_by_reason(store: &Store, route: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let filter = DeadLetterFilter {
        route: Some(route.to_string()),
        ..DeadLetterFilter::default()
    };
    let mut by_reason = BTreeMap::new();
    for letter in store.dead_letters(&filter, usize::MAX)? {
        *by_reason
            .entry(letter.letter.reason.to_string())
            .or_insert(0) += 1;
    }
    Ok(by_reason)
}

/// Starts a gateway as [`gateway_config`] makes it, forwarding to `upstream_port` (listened on
/// or not), with outbox caps of at least `rows` rows (and their bytes), and connects the
/// devices to it. Returns the clock the devices stamp their publishes with.
async fn start_with_room(
    options: &Options,
    data_dir: &Path,
    upstream_port: u16,
    rows: u64,
) -> anyhow::Result<(Gateway, Fleet, Instant)> {
    let gateway_port = free_port()?;
    let mut config = gateway_config(
        data_dir,
        gateway_port,
        format!("mqtt://127.0.0.1:{upstream_port}"),
        options,
        false,
    );
    let mib = rows.saturating_mul(options.payload_bytes as u64 + 64) / (1024 * 1024) + 1;
    let store = &mut config.store;
    store.outbox_max_rows = store
        .outbox_max_rows
        .max(i64::try_from(rows).unwrap_or(i64::MAX));
    store.outbox_max_mib = store
        .outbox_max_mib
        .max(i64::try_from(mib).unwrap_or(i64::MAX));
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    let clock = Instant::now();
    let fleet = Fleet::connect(gateway_port, options, clock).await?;
    Ok((gateway, fleet, clock))
}

/// Phase 2: upstream unreachable; fill the outbox to each depth and measure a window there.
async fn backlog_phase(
    options: &Options,
    depths: &[u64],
    data_dir: &Path,
) -> anyhow::Result<Vec<BacklogPoint>> {
    println!();
    println!(
        "backlog: upstream unreachable; rates over {} messages at outbox depths {:?}",
        options.window, depths
    );
    // A port nothing listens on: the uplink's connection attempts are refused.
    let closed_port = free_port()?;
    // Room in the outbox for every publish of this phase (the default caps would hold new
    // data back at a million rows or 256 MiB, which is a different measurement).
    let most = depths.last().copied().unwrap_or(0) + options.window * depths.len() as u64;
    let (gateway, fleet, _) =
        start_with_room(options, data_dir, closed_port, most + most / 10).await?;
    let metrics = gateway.metrics.clone();

    let mut points = Vec::new();
    let mut released = 0u64;
    for &target in depths {
        released = fill(&fleet, &metrics, released, target).await?;
        let outbox_depth = depth(&gateway).await?;

        // Measure one window at this depth.
        let end = released + options.window;
        let io_start = write_bytes();
        let cpu_start = cpu_secs();
        let start = Instant::now();
        fleet.release(end);
        released = end;
        let waited = wait_all(
            start,
            vec![
                ("acked", end, Box::new(|| fleet.acked())),
                ("journaled", end, Box::new(|| metrics.snapshot().journaled)),
                ("outbox", end, Box::new(|| metrics.snapshot().queued)),
            ],
        )
        .await?;
        let (acked_at, outbox_at) = (&waited.reached[0], &waited.reached[2]);
        let window = options.window as f64;
        let outbox_secs = outbox_at.at.duration_since(start).as_secs_f64();
        let point = BacklogPoint {
            target_depth: target,
            outbox_depth,
            window: options.window,
            acked_per_sec: window / acked_at.at.duration_since(start).as_secs_f64(),
            outbox_per_sec: window / outbox_secs,
            peak_acked_not_journaled: waited.peak_lead,
            disk_bytes_per_msg: match (io_start, outbox_at.write_bytes) {
                (Some(a), Some(b)) => b.saturating_sub(a) as f64 / window,
                _ => f64::NAN,
            },
            cpu_cores_busy: match cpu_start {
                Some(c0) => (outbox_at.cpu - c0) / outbox_secs,
                None => f64::NAN,
            },
        };
        eprintln!(
            "  depth {:>9}: acked {:>8.0}/s  outbox {:>8.0}/s  {:>6.0} B/msg",
            point.outbox_depth, point.acked_per_sec, point.outbox_per_sec, point.disk_bytes_per_msg
        );
        points.push(point);
    }
    fleet.stop().await;
    gateway.shutdown().await;
    Ok(points)
}

/// Publishes from `released` up to `target` publishes in all, in chunks of [`FILL_CHUNK`]
/// each acknowledged, journaled and in the outbox before the next is released, so that what
/// follows starts from a settled gateway. Returns `target` (the new `released`).
async fn fill(fleet: &Fleet, metrics: &Metrics, released: u64, target: u64) -> anyhow::Result<u64> {
    let mut released = released;
    while released < target {
        let start = Instant::now();
        let limit = target.min(released + FILL_CHUNK);
        fleet.release(limit);
        released = limit;
        wait_all(
            start,
            vec![
                ("acked", limit, Box::new(|| fleet.acked())),
                (
                    "journaled",
                    limit,
                    Box::new(|| metrics.snapshot().journaled),
                ),
                ("outbox", limit, Box::new(|| metrics.snapshot().queued)),
            ],
        )
        .await?;
    }
    Ok(released)
}

/// Phase 3: upstream unreachable, queue `backlog` messages; then make the upstream reachable
/// and keep the devices publishing live traffic while the backlog drains.
async fn drain_phase(
    options: &Options,
    backlog: u64,
    baseline_acked_per_sec: Option<f64>,
    data_dir: &Path,
) -> anyhow::Result<Drain> {
    println!();
    println!(
        "drain: {backlog} messages queued with the upstream unreachable, then delivered while \
         the devices keep publishing ({})",
        match options.rate {
            0 => "as fast as their windows allow".to_string(),
            rate => format!("at most {rate} msg/s in all"),
        }
    );
    // The upstream's port: closed while the backlog is queued, then the stand-in upstream
    // starts listening on it.
    let upstream_port = free_port()?;
    // Room for the backlog and for the live rows that queue behind it (at a saturating live
    // load the outbox grows while the backlog drains): caps are not what this measures.
    // Reaching them anyway is reported (`waits_at_caps`).
    let rows = backlog.saturating_add(10_000_000);
    let (gateway, fleet, clock) = start_with_room(options, data_dir, upstream_port, rows).await?;
    let metrics = gateway.metrics.clone();

    // The backlog, as fast as the windows allow even with --rate (the rate is for the live
    // traffic).
    fleet.unpaced_below(backlog);
    fill(&fleet, &metrics, 0, backlog).await?;
    let outbox_depth_before = depth(&gateway).await?;
    eprintln!("  {outbox_depth_before} rows in the outbox; upstream reachable now");
    let waits_before = waits_at_caps(&metrics);

    // Upstream reachable, live traffic released.
    let arrivals = Arc::new(Arrivals::live_from(backlog));
    let (upstream_tx, upstream_rx) = mpsc::channel(8192);
    let mut upstream_edge = Edge::start(
        &broker_on(upstream_port, 16),
        upstream_tx,
        Arc::new(Metrics::default()),
    )
    .context("starting the stand-in upstream (its port was free a moment ago)")?;
    let counter = tokio::spawn(count_arrivals(upstream_rx, arrivals.clone(), clock));
    let reachable = Instant::now();
    fleet.release(u64::MAX);

    let backlog_arrived = || arrivals.unique_below.load(Ordering::Relaxed);
    // Live PUBACKs reach no target here (0): only the backlog's arrivals count as progress.
    let first = wait_all(
        reachable,
        vec![
            ("acked", 0, Box::new(|| fleet.acked())),
            ("journaled", 0, Box::new(|| metrics.snapshot().journaled)),
            ("delivered", 1, Box::new(backlog_arrived)),
        ],
    )
    .await?;
    // The drain window: from the first arrival to the last backlog arrival.
    fleet.record_ack_latency(true);
    let first_delivery = Instant::now();
    let acked_at_first = fleet.acked();
    let cpu_start = cpu_secs();
    let drained = wait_all(
        first_delivery,
        vec![
            ("acked", 0, Box::new(|| fleet.acked())),
            ("journaled", 0, Box::new(|| metrics.snapshot().journaled)),
            ("backlog delivered", backlog, Box::new(backlog_arrived)),
        ],
    )
    .await?;
    fleet.record_ack_latency(false);
    let backlog_end = &drained.reached[2];
    let live_acked_during_drain = backlog_end.counters[0].saturating_sub(acked_at_first);
    // Live publishing stops here: every ticket already taken is still published.
    let issued = fleet.stop_issuing();
    let live_ack_latencies = fleet.ack_latencies();
    let outbox_depth_at_backlog_end = depth(&gateway).await?;
    eprintln!(
        "  backlog delivered; {} live messages sent, {outbox_depth_at_backlog_end} rows left",
        issued.saturating_sub(backlog)
    );

    let rest = wait_all(
        reachable,
        vec![
            ("acked", issued, Box::new(|| fleet.acked())),
            (
                "journaled",
                issued,
                Box::new(|| metrics.snapshot().journaled),
            ),
            ("outbox", issued, Box::new(|| metrics.snapshot().queued)),
            (
                "delivered",
                issued,
                Box::new(|| arrivals.unique.load(Ordering::Relaxed)),
            ),
        ],
    )
    .await?;
    let deadline = Instant::now() + STALL;
    while depth(&gateway).await? > 0 {
        if Instant::now() > deadline {
            bail!("the outbox did not empty after delivery");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outbox_empty = Instant::now();
    let cap_waits = waits_at_caps(&metrics).saturating_sub(waits_before);
    let device_connection_errors = fleet.crowd.errors();

    fleet.stop().await;
    gateway.shutdown().await;
    upstream_edge.stop();
    counter.abort();

    let tally = arrivals
        .tally
        .lock()
        .map_err(|_| anyhow::anyhow!("the arrival counter panicked"))?;
    let mut upstream_latencies = tally.latencies_us.clone();
    upstream_latencies.sort_unstable();
    let since = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64();
    let first_delivery_at = first.reached[2].at;
    let backlog_drain_secs = since(first_delivery_at, backlog_end.at);
    let drain_window = since(first_delivery, backlog_end.at);
    let live_messages = issued.saturating_sub(backlog);
    let backlog_arrived = arrivals.unique_below.load(Ordering::Relaxed);
    let live_arrived = arrivals
        .unique
        .load(Ordering::Relaxed)
        .saturating_sub(backlog_arrived);
    let live_acked_per_sec = live_acked_during_drain as f64 / drain_window;
    Ok(Drain {
        backlog,
        outbox_depth_before,
        first_delivery_secs: since(reachable, first_delivery_at),
        backlog_drain_secs,
        backlog_delivered_per_sec: backlog as f64 / backlog_drain_secs,
        backlog_delivered_secs: since(reachable, backlog_end.at),
        outbox_depth_at_backlog_end,
        outbox_empty_secs: since(reachable, outbox_empty),
        live_acked_during_drain,
        live_acked_per_sec,
        baseline_acked_per_sec,
        live_vs_baseline: baseline_acked_per_sec.map(|b| live_acked_per_sec / b),
        live_ack_latency_us: Latency::of_sorted(&live_ack_latencies),
        live_upstream_latency_us: Latency::of_sorted(&upstream_latencies),
        live_messages,
        backlog_arrived,
        live_arrived,
        upstream_arrivals: tally.arrivals,
        upstream_unparsed: tally.unparsed,
        complete: backlog_arrived == backlog && live_arrived == live_messages,
        peak_acked_not_journaled: first.peak_lead.max(drained.peak_lead).max(rest.peak_lead),
        waits_at_caps: cap_waits,
        cpu_cores_busy: match cpu_start {
            Some(c0) => (backlog_end.cpu - c0) / drain_window,
            None => f64::NAN,
        },
        device_connection_errors,
    })
}

/// Times the gateway waited at the outbox or the journal cap so far.
fn waits_at_caps(metrics: &Metrics) -> u64 {
    let s = metrics.snapshot();
    s.outbox_full_waits + s.journal_full_waits
}

/// The gateway as the benchmark runs it: defaults (passthrough `telemetry/#`, one upstream),
/// devices on `port`, data in `data_dir`, the handler settings of [`handler_config`]; with
/// `options.handler`, the route runs that component (which must return each event's payload
/// unchanged, like `modules/passthrough`). With `hostile` and `--hostile`, a second
/// route [`HOSTILE_FILTER`] runs that component, gives up on an event after one attempt, and
/// dead-letters its events while the module is quarantined.
fn gateway_config(
    data_dir: &Path,
    port: u16,
    upstream_url: String,
    options: &Options,
    hostile: bool,
) -> Config {
    let mut config = Config {
        gateway_id: "bench-gw".into(),
        data_dir: data_dir.to_path_buf(),
        broker: broker_on(port, options.devices + usize::from(hostile)),
        handlers: handler_config(options),
        upstreams: vec![UpstreamConfig {
            name: "cloud".into(),
            url: upstream_url,
            reconnect_max_ms: 1000,
            ..UpstreamConfig::default()
        }],
        ..Config::default()
    };
    if let Some(path) = &options.handler {
        config.modules.push(ModuleConfig {
            name: "bench".into(),
            path: Some(path.clone()),
        });
        for route in &mut config.routes {
            route.handler = Some("bench".into());
            route.topic = Some("{output}".into());
        }
    }
    if let Some(path) = options.hostile_module().filter(|_| hostile) {
        config.modules.push(ModuleConfig {
            name: HOSTILE_ROUTE.into(),
            path: Some(path),
        });
        let mut route = RouteConfig::new(HOSTILE_ROUTE, HOSTILE_FILTER);
        route.handler = Some(HOSTILE_ROUTE.into());
        route.topic = Some("{output}".into());
        route.retry.max_attempts = 1;
        route.on_quarantine = QuarantinePolicy::DeadLetter;
        config.routes.push(route);
    }
    config
}

/// A broker configuration listening on 127.0.0.1:`port` with room for `connections` clients.
fn broker_on(port: u16, connections: usize) -> BrokerConfig {
    let defaults = BrokerConfig::default();
    BrokerConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], port))],
        max_connections: defaults.max_connections.max(connections + 16),
        ..defaults
    }
}

/// The counters when one of [`wait_all`]'s targets was reached.
struct Reached {
    at: Instant,
    write_bytes: Option<u64>,
    cpu: f64,
    /// Every target's counter at that poll, in the order of the targets.
    counters: Vec<u64>,
}

/// What [`wait_all`] saw.
struct Waited {
    /// Per target, when it was reached.
    reached: Vec<Reached>,
    /// The most the first counter (PUBACKs) was ahead of the second (journal commits) at any
    /// poll: publishes acknowledged to a device but not yet durable.
    peak_lead: u64,
}

/// A named counter and the value it must reach.
type Target<'a> = (&'static str, u64, Box<dyn Fn() -> u64 + 'a>);

/// Polls the counters until each has reached its target; returns, per target, the moment it
/// did with the disk and CPU counters and every counter then. Prints progress every second;
/// fails when no counter that is still short of its target moved for [`STALL`], saying how far
/// each got (so a counter with target 0 is watched, not waited for).
///
/// By convention the first target counts PUBACKs and the second journal commits (see
/// [`Waited::peak_lead`]).
async fn wait_all(start: Instant, targets: Vec<Target<'_>>) -> anyhow::Result<Waited> {
    let mut reached: Vec<Option<Reached>> = targets.iter().map(|_| None).collect();
    let mut last_values: Vec<u64> = vec![0; targets.len()];
    let mut peak_lead = 0u64;
    let mut last_move = Instant::now();
    let mut next_print = Instant::now() + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let mut moved = false;
        for (i, (_, _, value)) in targets.iter().enumerate() {
            let v = value();
            if v != last_values[i] {
                last_values[i] = v;
                moved |= reached[i].is_none();
            }
        }
        for (i, (_, target, _)) in targets.iter().enumerate() {
            if reached[i].is_none() && last_values[i] >= *target {
                reached[i] = Some(Reached {
                    at: now,
                    write_bytes: write_bytes(),
                    cpu: cpu_secs().unwrap_or(f64::NAN),
                    counters: last_values.clone(),
                });
            }
        }
        if let [acked, journaled, ..] = last_values[..] {
            peak_lead = peak_lead.max(acked.saturating_sub(journaled));
        }
        if reached.iter().all(Option::is_some) {
            return Ok(Waited {
                reached: reached.into_iter().flatten().collect(),
                peak_lead,
            });
        }
        if moved {
            last_move = now;
        } else if now.duration_since(last_move) > STALL {
            let state: Vec<String> = targets
                .iter()
                .zip(&last_values)
                .map(|((name, target, _), v)| format!("{name} {v}/{target}"))
                .collect();
            let mut message = format!(
                "no progress for {} s: {}",
                STALL.as_secs(),
                state.join(", ")
            );
            if let [acked, journaled, ..] = last_values[..] {
                if acked > journaled {
                    message.push_str(&format!(
                        "; {} publishes were acknowledged to devices but never journaled: the \
                         gateway lost them",
                        acked - journaled
                    ));
                }
            }
            bail!(message);
        }
        if now >= next_print {
            next_print = now + Duration::from_secs(1);
            let state: Vec<String> = targets
                .iter()
                .zip(&last_values)
                .map(|((name, _, _), v)| format!("{name} {v:>8}"))
                .collect();
            eprintln!(
                "  {:>6.1}s  {}",
                now.duration_since(start).as_secs_f64(),
                state.join("  ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The outbox depth, read off the async threads.
async fn depth(gateway: &Gateway) -> anyhow::Result<u64> {
    let store = gateway.store.clone();
    Ok(tokio::task::spawn_blocking(move || store.outbox_depth(None)).await??)
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// How many publishes the devices may send in total, or that they must stop.
#[derive(Debug, Clone, Copy, Default)]
struct Gate {
    limit: u64,
    stop: bool,
    /// Publishes with a lower sequence number ignore `--rate`.
    unpaced_below: u64,
}

/// The simulated devices. Each publish takes the next global sequence number (a ticket) and
/// waits until the gate's limit is above it, so exactly `limit` publishes are sent in all.
struct Fleet {
    crowd: Crowd,
    next: Arc<AtomicU64>,
    gate: watch::Sender<Gate>,
}

impl Fleet {
    /// Connects `options.devices` devices to the gateway on `port` and waits for every CONNACK.
    /// Nothing is published until [`Fleet::release`].
    async fn connect(port: u16, options: &Options, clock: Instant) -> anyhow::Result<Fleet> {
        let (gate, _) = watch::channel(Gate::default());
        let mut fleet = Fleet {
            crowd: Crowd::new(false),
            next: Arc::new(AtomicU64::new(0)),
            gate,
        };
        // Each device's share of the rate, as the time between two of its publishes.
        let period = (options.rate > 0)
            .then(|| Duration::from_secs_f64(options.devices as f64 / options.rate as f64));
        for device in 0..options.devices {
            let mut mqtt = MqttOptions::new(format!("bench-{device}"), "127.0.0.1", port);
            mqtt.set_keep_alive(Duration::from_secs(30))
                .set_inflight(options.inflight)
                // A short request queue: the send time is stamped just before the window has
                // room, not long before.
                .set_request_channel_capacity(8);
            // Devices start their pacing at staggered offsets, not all on the same tick.
            let pacing = period.map(|p| (p, p.mul_f64(device as f64 / options.devices as f64)));
            let (next, gate) = (fleet.next.clone(), fleet.gate.subscribe());
            fleet.crowd.add(mqtt, |client| {
                publish_loop(
                    client,
                    device,
                    options.payload_bytes,
                    pacing,
                    clock,
                    next,
                    gate,
                )
            });
        }
        if let Err(connected) = fleet.crowd.wait_connected(STALL).await {
            bail!("only {connected} of {} devices connected", options.devices);
        }
        Ok(fleet)
    }

    /// Lets the devices publish until `limit` publishes were sent in all.
    fn release(&self, limit: u64) {
        self.gate.send_modify(|g| g.limit = limit);
    }

    /// Publishes with a sequence number below `seq` ignore `--rate` (a backlog is queued as
    /// fast as the windows allow).
    fn unpaced_below(&self, seq: u64) {
        self.gate.send_modify(|g| g.unpaced_below = seq);
    }

    /// Stops handing out publishes: those whose ticket was already taken are still sent.
    /// Returns how many publishes are sent in all.
    fn stop_issuing(&self) -> u64 {
        // Every ticket below `issued` was taken, so each is published; every later one waits
        // at the gate.
        let issued = self.next.load(Ordering::SeqCst);
        self.release(issued);
        issued
    }

    /// PUBACKs received so far.
    fn acked(&self) -> u64 {
        self.crowd.acked()
    }

    /// Starts or stops recording the publish-to-PUBACK latency of each PUBACK received.
    fn record_ack_latency(&self, on: bool) {
        self.crowd.recording.store(on, Ordering::Relaxed);
    }

    /// The publish-to-PUBACK latencies recorded so far, ascending, in microseconds.
    fn ack_latencies(&self) -> Vec<u64> {
        self.crowd.ack_latencies()
    }

    /// Stops publishing and disconnects every device.
    async fn stop(mut self) {
        self.gate.send_modify(|g| g.stop = true);
        for publisher in std::mem::take(&mut self.crowd.publishers) {
            if tokio::time::timeout(Duration::from_secs(5), publisher)
                .await
                .is_err()
            {
                eprintln!("  a device did not stop publishing within 5 s");
            }
        }
        self.crowd.disconnect().await;
    }
}

/// Simulated devices, whatever they publish: each device's client, the task that drives its
/// event loop and the task that publishes for it, and what the event loops count. Shared by
/// the in-process benchmark and the load generator of [`external`].
struct Crowd {
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    /// Whether the devices record each PUBACK's latency now.
    recording: Arc<AtomicBool>,
    /// Per device, publish-to-PUBACK latencies in microseconds (one lock per device, so the
    /// devices do not contend).
    ack_latencies: Vec<Arc<Mutex<Vec<u64>>>>,
    clients: Vec<AsyncClient>,
    publishers: Vec<JoinHandle<anyhow::Result<()>>>,
    drivers: Vec<JoinHandle<()>>,
}

impl Crowd {
    /// No devices yet; PUBACK latencies are recorded from the start if `recording`.
    fn new(recording: bool) -> Crowd {
        Crowd {
            acked: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            connected: Arc::new(AtomicU64::new(0)),
            recording: Arc::new(AtomicBool::new(recording)),
            ack_latencies: Vec::new(),
            clients: Vec::new(),
            publishers: Vec::new(),
            drivers: Vec::new(),
        }
    }

    /// Adds a device that connects with `mqtt`: starts driving its event loop, and runs the
    /// publishing task that `publisher` makes of its client.
    fn add<P>(&mut self, mqtt: MqttOptions, publisher: impl FnOnce(AsyncClient) -> P)
    where
        P: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (client, eventloop) = AsyncClient::new(mqtt, 8);
        let latencies = Arc::new(Mutex::new(Vec::new()));
        self.drivers.push(tokio::spawn(drive(
            eventloop,
            Counters {
                acked: self.acked.clone(),
                errors: self.errors.clone(),
                connected: self.connected.clone(),
                recording: self.recording.clone(),
                ack_latencies: latencies.clone(),
            },
        )));
        self.ack_latencies.push(latencies);
        self.publishers
            .push(tokio::spawn(publisher(client.clone())));
        self.clients.push(client);
    }

    /// Waits until every device has had a CONNACK; after `within`, gives up with how many had.
    async fn wait_connected(&self, within: Duration) -> Result<(), u64> {
        let deadline = Instant::now() + within;
        let wanted = self.clients.len() as u64;
        loop {
            let connected = self.connected.load(Ordering::Relaxed);
            if connected >= wanted {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(connected);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// PUBACKs received so far.
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Connection errors so far (each failed poll of an event loop).
    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The publish-to-PUBACK latencies recorded so far, ascending, in microseconds.
    fn ack_latencies(&self) -> Vec<u64> {
        let mut all = Vec::new();
        for device in &self.ack_latencies {
            if let Ok(samples) = device.lock() {
                all.extend_from_slice(&samples);
            }
        }
        all.sort_unstable();
        all
    }

    /// Ends the publishing tasks still running, disconnects every device and, once the
    /// DISCONNECTs had time to go out, ends the event loops.
    async fn disconnect(self) {
        for publisher in &self.publishers {
            publisher.abort();
        }
        for client in &self.clients {
            let _ = client.try_disconnect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for driver in self.drivers {
            driver.abort();
        }
    }
}

/// Counts the hostile events that are finished (dead-lettered, or answered with outputs that
/// arrived upstream).
type Finished = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What the hostile device is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostileGate {
    Wait,
    Go,
    Stop,
}

/// The one device publishing to the hostile route.
struct HostileDevice {
    crowd: Crowd,
    sent: Arc<AtomicU64>,
    gate: watch::Sender<HostileGate>,
}

/// What the hostile device sent, once stopped.
struct HostileCounts {
    sent: u64,
    acked: u64,
    errors: u64,
}

impl HostileDevice {
    /// Connects the hostile device to the gateway on `port` and waits for its CONNACK. It
    /// publishes nothing until [`HostileDevice::go`].
    async fn connect(
        port: u16,
        options: &Options,
        finished: Finished,
    ) -> anyhow::Result<HostileDevice> {
        let mut mqtt = MqttOptions::new("bench-hostile", "127.0.0.1", port);
        mqtt.set_keep_alive(Duration::from_secs(30))
            .set_inflight(16)
            .set_request_channel_capacity(8);
        let (gate, gate_rx) = watch::channel(HostileGate::Wait);
        let sent = Arc::new(AtomicU64::new(0));
        let mut crowd = Crowd::new(false);
        crowd.add(mqtt, |client| {
            hostile_loop(
                client,
                options.hostile_payload.as_bytes().to_vec(),
                (options.hostile_rate > 0)
                    .then(|| Duration::from_secs_f64(1.0 / options.hostile_rate as f64)),
                options.hostile_pending,
                sent.clone(),
                finished,
                gate_rx,
            )
        });
        if crowd.wait_connected(STALL).await.is_err() {
            crowd.disconnect().await;
            bail!("the hostile device did not connect");
        }
        Ok(HostileDevice { crowd, sent, gate })
    }

    /// Starts publishing.
    fn go(&self) {
        self.gate.send_replace(HostileGate::Go);
    }

    /// Hostile publishes acknowledged by the gateway so far.
    fn acked(&self) -> u64 {
        self.crowd.acked()
    }

    /// Stops publishing, disconnects, and says what was sent.
    async fn stop(mut self) -> HostileCounts {
        self.gate.send_replace(HostileGate::Stop);
        for publisher in std::mem::take(&mut self.crowd.publishers) {
            match tokio::time::timeout(Duration::from_secs(5), publisher).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("  the hostile device failed: {e:#}"),
                Ok(Err(e)) => eprintln!("  the hostile device failed: {e}"),
                Err(_) => eprintln!("  the hostile device did not stop publishing within 5 s"),
            }
        }
        // Its last publish may still wait for its PUBACK.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.acked() < self.sent.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Counted before the disconnect, which ends the connection with an error.
        let counts = HostileCounts {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked(),
            errors: self.crowd.errors(),
        };
        self.crowd.disconnect().await;
        counts
    }
}

/// Whether the hostile device may publish another event: fewer than `pending` of the `sent`
/// are unfinished (0: no limit).
fn may_publish(sent: u64, finished: u64, pending: u64) -> bool {
    pending == 0 || sent.saturating_sub(finished) < pending
}

/// The hostile device's publishing: once the gate says go, `payload` to [`HOSTILE_TOPIC`] at
/// most once per `period`, and only while [`may_publish`], until the gate says stop.
async fn hostile_loop(
    client: AsyncClient,
    payload: Vec<u8>,
    period: Option<Duration>,
    pending: u64,
    sent: Arc<AtomicU64>,
    finished: Finished,
    mut gate: watch::Receiver<HostileGate>,
) -> anyhow::Result<()> {
    loop {
        match *gate.borrow_and_update() {
            HostileGate::Go => break,
            HostileGate::Stop => return Ok(()),
            HostileGate::Wait => {}
        }
        if gate.changed().await.is_err() {
            return Ok(());
        }
    }
    let stopped = |gate: &watch::Receiver<HostileGate>| *gate.borrow() == HostileGate::Stop;
    let mut ticker = period.map(|period| {
        let mut ticker = tokio::time::interval(period);
        // After a wait for a pending event to finish, publish at once, then keep the period.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    loop {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        while !may_publish(sent.load(Ordering::Relaxed), finished(), pending) {
            if stopped(&gate) {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        if stopped(&gate) {
            return Ok(());
        }
        client
            .publish(HOSTILE_TOPIC, QoS::AtLeastOnce, false, payload.clone())
            .await
            .context("the hostile device cannot publish")?;
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a device's event loop counts and records.
struct Counters {
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    recording: Arc<AtomicBool>,
    ack_latencies: Arc<Mutex<Vec<u64>>>,
}

/// Runs one device's MQTT event loop: counts CONNACKs, PUBACKs and connection errors
/// (rumqttc reconnects on the next poll), and while `recording` is set, records each PUBACK's
/// latency from the moment the client wrote the publish (its `Outgoing::Publish` event).
async fn drive(mut eventloop: rumqttc::EventLoop, counters: Counters) {
    // Send time per packet id (rumqttc's ids run from 1 to the inflight window). Kept even
    // when not recording, so that a PUBACK never meets a stale send time.
    let mut sent: Vec<Option<Instant>> = Vec::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let i = usize::from(pkid);
                if i >= sent.len() {
                    sent.resize(i + 1, None);
                }
                sent[i] = Some(Instant::now());
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                counters.acked.fetch_add(1, Ordering::Relaxed);
                let sent_at = sent.get_mut(usize::from(ack.pkid)).and_then(Option::take);
                if let Some(sent_at) = sent_at {
                    if counters.recording.load(Ordering::Relaxed) {
                        if let Ok(mut samples) = counters.ack_latencies.lock() {
                            samples.push(sent_at.elapsed().as_micros() as u64);
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                counters.connected.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Publishes one device's share: takes tickets (global sequence numbers) and publishes each
/// once the gate allows it, until the gate says stop. With `pacing` (period, first offset), at
/// most one publish per period, never catching up in bursts.
async fn publish_loop(
    client: AsyncClient,
    device: usize,
    payload_bytes: usize,
    pacing: Option<(Duration, Duration)>,
    clock: Instant,
    next: Arc<AtomicU64>,
    mut gate: watch::Receiver<Gate>,
) -> anyhow::Result<()> {
    let topic = format!("telemetry/bench-{device}/data");
    let mut ticker = pacing.map(|(period, offset)| {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        let paced = loop {
            let g = *gate.borrow_and_update();
            if g.stop {
                return Ok(());
            }
            if seq < g.limit {
                break seq >= g.unpaced_below;
            }
            if gate.changed().await.is_err() {
                return Ok(());
            }
        };
        if let Some(ticker) = ticker.as_mut().filter(|_| paced) {
            ticker.tick().await;
        }
        let sent_us = clock.elapsed().as_micros() as u64;
        client
            .publish(
                topic.as_str(),
                QoS::AtLeastOnce,
                false,
                payload(seq, sent_us, device, payload_bytes),
            )
            .await
            .with_context(|| format!("device {device} cannot publish"))?;
    }
}

/// A JSON payload carrying the sequence number and the send time, padded to `size` bytes
/// (longer when `size` is too small for the fields).
fn payload(seq: u64, sent_us: u64, device: usize, size: usize) -> Vec<u8> {
    padded(
        &format!(r#"{{"seq":{seq},"sent_us":{sent_us},"device":{device},"pad":""#),
        size,
    )
}

/// `head` (a JSON object up to the opening quote of its last string field) closed with a run
/// of `x` and `"}`, `size` bytes in all (longer when `head` alone is longer).
fn padded(head: &str, size: usize) -> Vec<u8> {
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(head.len() + pad + tail.len());
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// The stand-in upstream's arrival counter.

/// The fields of a payload the counter reads.
#[derive(Deserialize)]
struct Stamp {
    seq: u64,
    sent_us: u64,
}

/// Arrivals at the stand-in upstream.
#[derive(Default)]
struct Arrivals {
    /// Distinct sequence numbers received (polled while waiting, hence outside the lock).
    unique: AtomicU64,
    /// Sequence numbers below this are a backlog: counted apart, their latency not recorded.
    live_from: u64,
    /// Distinct sequence numbers below `live_from` received.
    unique_below: AtomicU64,
    /// Arrivals from the hostile route (its topics), not counted anywhere else.
    hostile: AtomicU64,
    tally: Mutex<Tally>,
}

impl Arrivals {
    /// Arrivals of which sequence numbers below `seq` are a backlog.
    fn live_from(seq: u64) -> Arrivals {
        Arrivals {
            live_from: seq,
            ..Arrivals::default()
        }
    }
}

#[derive(Default)]
struct Tally {
    arrivals: u64,
    unparsed: u64,
    seen: Vec<bool>,
    latencies_us: Vec<u64>,
}

/// Counts what the stand-in upstream receives; records each message's latency once.
async fn count_arrivals(
    mut rx: mpsc::Receiver<DevicePublish>,
    arrivals: Arc<Arrivals>,
    clock: Instant,
) {
    let mut batch = Vec::with_capacity(1024);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let now_us = clock.elapsed().as_micros() as u64;
        let Ok(mut tally) = arrivals.tally.lock() else {
            return;
        };
        for publish in batch.drain(..) {
            if publish.topic.starts_with(HOSTILE_PREFIX) {
                arrivals.hostile.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tally.arrivals += 1;
            let Ok(stamp) = serde_json::from_slice::<Stamp>(&publish.payload) else {
                tally.unparsed += 1;
                continue;
            };
            let Ok(index) = usize::try_from(stamp.seq) else {
                tally.unparsed += 1;
                continue;
            };
            if index >= tally.seen.len() {
                tally.seen.resize(index + 1, false);
            }
            if !tally.seen[index] {
                tally.seen[index] = true;
                if stamp.seq < arrivals.live_from {
                    arrivals.unique_below.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally
                        .latencies_us
                        .push(now_us.saturating_sub(stamp.sent_us));
                }
                arrivals.unique.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Latency {
    /// Percentiles of an ascending slice of microseconds (all zero when it is empty).
    fn of_sorted(sorted: &[u64]) -> Latency {
        let at = |p| percentile(sorted, p).unwrap_or(0);
        Latency {
            samples: sorted.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: sorted.last().copied().unwrap_or(0),
        }
    }
}

/// The `p`-th percentile (0 < p <= 100) of an ascending slice, by the nearest-rank method:
/// the smallest value such that at least p % of the values are less than or equal to it.
/// `None` for an empty slice.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// Reading the process's own counters.

/// Bytes this process caused to be written to storage so far (`/proc/self/io` `write_bytes`).
fn write_bytes() -> Option<u64> {
    proc_field("/proc/self/io", "write_bytes:")
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`).
fn cpu_secs() -> Option<f64> {
    stat_cpu_secs("/proc/self/stat")
}

/// User + system CPU seconds so far of the process whose `/proc/<pid>/stat` is `path`.
fn stat_cpu_secs(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces); utime and
    // stime are fields 14 and 15 of the whole line, so 12th and 13th after the name.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The first number on the line starting with `key` in a `/proc` file (`key: 1234 kB`).
fn proc_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Creates `dir` empty (removing what a previous run left there).
fn fresh_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}

// ---------------------------------------------------------------------------------------------
// Printing.

fn print_report(report: &Report) {
    println!();
    println!("results");
    if let Some(t) = &report.throughput {
        println!(
            "  acknowledged QoS 1       {:>9.0} msg/s  ({} PUBACKs in {:.2} s)",
            t.acked_per_sec, t.messages, t.publish_secs
        );
        println!(
            "  journaled                {:>9.0} msg/s  (all journaled after {:.2} s)",
            t.journaled_per_sec, t.journaled_secs
        );
        println!(
            "  moved to the outbox      {:>9.0} msg/s  (all in the outbox after {:.2} s)",
            t.outbox_per_sec, t.outbox_secs
        );
        println!(
            "  delivered upstream       {:>9.0} msg/s  (all delivered after {:.2} s; {} arrivals, {} unique, {} unparsed)",
            t.delivered_per_sec, t.delivered_secs, t.upstream_arrivals, t.upstream_unique, t.upstream_unparsed
        );
        println!(
            "  latency publish->upstream  p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples)",
            t.latency_us.p50 as f64 / 1000.0,
            t.latency_us.p90 as f64 / 1000.0,
            t.latency_us.p99 as f64 / 1000.0,
            t.latency_us.max as f64 / 1000.0,
            t.latency_us.samples
        );
        println!(
            "  latency publish->PUBACK    p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            t.ack_latency_us.p50 as f64 / 1000.0,
            t.ack_latency_us.p90 as f64 / 1000.0,
            t.ack_latency_us.p99 as f64 / 1000.0,
            t.ack_latency_us.max as f64 / 1000.0,
        );
        println!(
            "  disk written             {:>9.0} B/msg  (until the last PUBACK: {:.0} B/msg; WAL + checkpoints + deletes)",
            t.disk_bytes_per_msg, t.disk_bytes_per_msg_until_acked
        );
        println!(
            "  acked, not journaled     {:>9} at most  (PUBACKed before the journal commit; must be 0)",
            t.peak_acked_not_journaled
        );
        println!(
            "  CPU while publishing     {:>9.2} cores busy of {} ({:.1} s CPU)",
            t.cpu_cores_busy, report.machine.cpus, t.cpu_secs
        );
        if t.device_connection_errors > 0 {
            println!("  device connection errors {}", t.device_connection_errors);
        }
        if let Some(h) = &t.hostile {
            print_hostile(h, t.acked_per_sec);
        }
    }
    if !report.backlog.is_empty() {
        println!("  backlog (upstream unreachable)");
        println!("    outbox depth   acked msg/s   to outbox msg/s   disk B/msg   cores busy   acked, not journaled");
        for p in &report.backlog {
            println!(
                "    {:>12}   {:>11.0}   {:>15.0}   {:>10.0}   {:>10.2}   {:>20}",
                p.outbox_depth,
                p.acked_per_sec,
                p.outbox_per_sec,
                p.disk_bytes_per_msg,
                p.cpu_cores_busy,
                p.peak_acked_not_journaled
            );
        }
    }
    if let Some(d) = &report.drain {
        print_drain(d);
    }
    println!(
        "  peak RSS                 {:>9} KiB  (whole process: gateway + load generator + stand-in upstream)",
        report.peak_rss_kib
    );
    println!("  notes");
    for note in &report.notes {
        println!("    - {note}");
    }
}

fn print_hostile(h: &HostileReport, acked_per_sec: f64) {
    println!(
        "  hostile neighbour ({HOSTILE_FILTER}, while the devices published and until delivery, {:.2} s)",
        h.active_secs
    );
    let ended: Vec<String> = h
        .dead_letters
        .iter()
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    println!(
        "    published                {:>9}  ({} acknowledged)",
        h.published, h.acked
    );
    println!(
        "    dead letters             {:>9}  ({}); outputs delivered {}; left queued {}",
        h.dead_letters.values().sum::<u64>(),
        match ended.is_empty() {
            true => "none".to_string(),
            false => ended.join(", "),
        },
        h.outputs_delivered,
        h.left_queued
    );
    println!(
        "    handler invocations      {:>9}  ({} failed; {} quarantine(s){}; {} events dead-lettered as quarantined)",
        h.handler_invocations,
        h.handler_failures,
        h.quarantines,
        match h.first_quarantine_secs {
            Some(at) => format!(", the first after {at:.2} s"),
            None => String::new(),
        },
        h.quarantined_events
    );
    println!(
        "    guest running            {:>9.2} s  ({:.0}% of the time; {} fuel)",
        h.handler_run_secs,
        h.handler_busy_share * 100.0,
        h.fuel
    );
    match (
        h.acked_per_sec_before_quarantine,
        h.acked_per_sec_after_quarantine,
    ) {
        (Some(before), Some(after)) => println!(
            "    acked, first route       {before:>9.0} msg/s before the first quarantine, {after:.0} msg/s after ({acked_per_sec:.0} overall)"
        ),
        _ => println!(
            "    acked, first route       {acked_per_sec:>9.0} msg/s  (no quarantine while the devices published)"
        ),
    }
    println!(
        "    gateway shutdown         {:>9.2} s  (waits for the lane to finish the events it took)",
        h.shutdown_secs
    );
    if h.device_connection_errors > 0 {
        println!(
            "    device connection errors {}",
            h.device_connection_errors
        );
    }
}

fn print_drain(d: &Drain) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "  drain of {} queued messages with live traffic (times from the upstream becoming reachable)",
        d.backlog
    );
    println!(
        "    first delivery           {:>9.2} s  (the uplink's reconnect backoff, at most 1 s)",
        d.first_delivery_secs
    );
    println!(
        "    backlog delivered        {:>9.0} msg/s  (in {:.2} s from the first delivery; all delivered after {:.2} s)",
        d.backlog_delivered_per_sec, d.backlog_drain_secs, d.backlog_delivered_secs
    );
    println!(
        "    outbox empty after       {:>9.2} s  (live publishing stopped at the backlog's end, {} live rows queued then)",
        d.outbox_empty_secs, d.outbox_depth_at_backlog_end
    );
    match (d.baseline_acked_per_sec, d.live_vs_baseline) {
        (Some(baseline), Some(ratio)) => println!(
            "    live acked while draining {:>8.0} msg/s  ({} PUBACKs; {:.0}% of the {:.0} msg/s with nothing to drain)",
            d.live_acked_per_sec,
            d.live_acked_during_drain,
            ratio * 100.0,
            baseline
        ),
        _ => println!(
            "    live acked while draining {:>8.0} msg/s  ({} PUBACKs; run the throughput phase for the figure with nothing to drain)",
            d.live_acked_per_sec, d.live_acked_during_drain
        ),
    }
    let a = &d.live_ack_latency_us;
    println!(
        "    live publish->PUBACK       p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples, while draining)",
        ms(a.p50),
        ms(a.p99),
        ms(a.max),
        a.samples
    );
    let u = &d.live_upstream_latency_us;
    println!(
        "    live publish->upstream     p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (queued behind the backlog)",
        ms(u.p50),
        ms(u.p99),
        ms(u.max)
    );
    println!(
        "    complete                 {}: backlog {} of {}, live {} of {} arrived ({} arrivals, {} unparsed)",
        if d.complete { "yes" } else { "NO" },
        d.backlog_arrived,
        d.backlog,
        d.live_arrived,
        d.live_messages,
        d.upstream_arrivals,
        d.upstream_unparsed
    );
    println!(
        "    acked, not journaled     {:>9} at most;  waits at caps {};  {:.2} cores busy while draining",
        d.peak_acked_not_journaled, d.waits_at_caps, d.cpu_cores_busy
    );
    if d.device_connection_errors > 0 {
        println!(
            "    device connection errors {}",
            d.device_connection_errors
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.5), Some(1));
        // Ten values: p50 is the 5th, p90 the 9th, p99 rounds up to the 10th.
        let ten = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&ten, 50.0), Some(50));
        assert_eq!(percentile(&ten, 90.0), Some(90));
        assert_eq!(percentile(&ten, 99.0), Some(100));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_summary_of_an_empty_run_is_zero() {
        let l = Latency::of_sorted(&[]);
        assert_eq!(
            l,
            Latency {
                samples: 0,
                p50: 0,
                p90: 0,
                p99: 0,
                max: 0
            }
        );
    }

    #[test]
    fn payload_is_padded_json_with_the_stamp() {
        let p = payload(42, 1234, 3, 100);
        assert_eq!(p.len(), 100);
        let stamp: Stamp = serde_json::from_slice(&p).expect("valid JSON");
        assert_eq!((stamp.seq, stamp.sent_us), (42, 1234));
        // Too small a size still gives the whole stamp.
        let small = payload(u64::MAX, u64::MAX, 0, 10);
        assert!(serde_json::from_slice::<Stamp>(&small).is_ok());
    }

    #[tokio::test]
    async fn arrivals_count_the_backlog_apart_and_time_only_live_messages() {
        let arrivals = Arc::new(Arrivals::live_from(3));
        let (tx, rx) = mpsc::channel(16);
        let clock = Instant::now();
        let counter = tokio::spawn(count_arrivals(rx, arrivals.clone(), clock));
        let send = |body: Vec<u8>| DevicePublish {
            topic: "telemetry/x".into(),
            payload: body.into(),
            received_ms: 0,
        };
        // Backlog 0..3 (2 twice), live 3 and 4 (4 twice), and one that is not a stamp.
        for seq in [0, 1, 2, 2, 3, 4, 4] {
            tx.send(send(payload(seq, 0, 0, 64)))
                .await
                .expect("counter runs");
        }
        tx.send(send(b"not json".to_vec()))
            .await
            .expect("counter runs");
        // An output of the hostile route, even one that looks like a stamp, is counted apart.
        let mut hostile = send(payload(5, 0, 0, 64));
        hostile.topic = HOSTILE_TOPIC.into();
        tx.send(hostile).await.expect("counter runs");
        drop(tx);
        counter.await.expect("counter ends with its channel");
        assert_eq!(arrivals.hostile.load(Ordering::Relaxed), 1);
        assert_eq!(arrivals.unique.load(Ordering::Relaxed), 5);
        assert_eq!(arrivals.unique_below.load(Ordering::Relaxed), 3);
        let tally = arrivals.tally.lock().expect("not poisoned");
        assert_eq!((tally.arrivals, tally.unparsed), (8, 1));
        assert_eq!(tally.latencies_us.len(), 2, "only live messages are timed");
    }

    #[tokio::test]
    async fn wait_all_records_every_counter_when_a_target_is_reached() {
        let waited = wait_all(
            Instant::now(),
            vec![
                ("acked", 0, Box::new(|| 5)),
                ("journaled", 0, Box::new(|| 4)),
                ("delivered", 2, Box::new(|| 7)),
            ],
        )
        .await
        .expect("every target is reached at once");
        assert_eq!(waited.reached[2].counters, vec![5, 4, 7]);
        assert_eq!(waited.peak_lead, 1);
    }

    /// `outpost bench`'s flags alone, as the binary parses them.
    #[derive(clap::Parser)]
    struct BenchCommand {
        #[command(flatten)]
        options: Options,
    }

    fn parse(args: &[&str]) -> Options {
        let argv = std::iter::once("bench").chain(args.iter().copied());
        <BenchCommand as clap::Parser>::try_parse_from(argv)
            .expect("valid flags")
            .options
    }

    /// The options `outpost bench` parses by default, with a hostile neighbour at `hostile`.
    fn options_with(hostile: Option<PathBuf>) -> Options {
        Options {
            hostile: hostile.map(Some),
            ..parse(&[])
        }
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let defaults = Options {
            devices: 50,
            messages: 200_000,
            payload_bytes: 100,
            inflight: 100,
            rate: 0,
            backlog: vec![10_000, 100_000],
            window: 50_000,
            skip_throughput: false,
            skip_backlog: false,
            drain: 100_000,
            skip_drain: false,
            handler: None,
            hostile: None,
            hostile_payload: "loop".into(),
            hostile_rate: 10,
            hostile_pending: 10,
            no_breaker: false,
            data: None,
            json: None,
        };
        assert_eq!(parse(&[]), defaults);
        assert_eq!(parse(&[]).hostile_module(), None);
    }

    #[test]
    fn hostile_without_a_file_is_the_faulty_guest() {
        let faulty = outpost::handlers::examples::guest_path("faulty");
        assert_eq!(parse(&["--hostile"]).hostile_module(), Some(faulty));
        let given = parse(&["--hostile", "x.wasm", "--hostile-rate", "3"]);
        assert_eq!(given.hostile_module(), Some(PathBuf::from("x.wasm")));
        assert_eq!(given.hostile_rate, 3);
        let backlog = parse(&["--backlog", "5,7"]).backlog;
        assert_eq!(backlog, vec![5, 7]);
        // The hostile neighbour's settings need the neighbour.
        let argv = ["bench", "--hostile-rate", "3"];
        assert!(<BenchCommand as clap::Parser>::try_parse_from(argv).is_err());
    }

    #[test]
    fn hostile_needs_a_readable_webassembly_file() {
        let faulty = outpost::handlers::examples::guest_path("faulty");
        check_options(&options_with(Some(faulty.clone()))).expect("the built faulty guest");

        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.wasm");
        let error = check_options(&options_with(Some(missing.clone())))
            .expect_err("a missing file")
            .to_string();
        assert!(
            error.contains("--hostile") && error.contains(&missing.display().to_string()),
            "{error}"
        );
        let text = dir.path().join("text.wasm");
        std::fs::write(&text, "not a module").expect("write");
        let error = format!(
            "{:#}",
            check_options(&options_with(Some(text))).expect_err("not WebAssembly")
        );
        assert!(error.contains("not a WebAssembly file"), "{error}");
        let short = dir.path().join("short.wasm");
        std::fs::write(&short, b"\0a").expect("write");
        let error = format!(
            "{:#}",
            check_options(&options_with(Some(short))).expect_err("too short")
        );
        assert!(error.contains("cannot read it"), "{error}");
        let error = format!(
            "{:#}",
            check_options(&options_with(Some(dir.path().to_path_buf()))).expect_err("a directory")
        );
        assert!(error.contains("--hostile"), "{error}");

        let mut handler = options_with(None);
        handler.handler = Some(dir.path().join("missing.wasm"));
        let error = check_options(&handler).expect_err("--handler is checked too");
        assert!(error.to_string().contains("--handler"), "{error}");
    }

    #[test]
    fn hostile_options_that_cannot_run_are_refused() {
        let faulty = outpost::handlers::examples::guest_path("faulty");
        let mut unlimited = options_with(Some(faulty.clone()));
        unlimited.hostile_rate = 0;
        unlimited.hostile_pending = 0;
        assert!(check_options(&unlimited).is_err());
        unlimited.hostile_pending = 1;
        check_options(&unlimited).expect("the pending limit alone bounds it");

        let mut skipped = options_with(Some(faulty));
        skipped.skip_throughput = true;
        let error = check_options(&skipped).expect_err("hostile runs in the throughput phase");
        assert!(error.to_string().contains("throughput"), "{error}");
    }

    #[test]
    fn gateway_config_adds_the_hostile_route_only_where_asked() {
        let faulty = outpost::handlers::examples::guest_path("faulty");
        let options = options_with(Some(faulty.clone()));
        let dir = Path::new("/nonexistent");
        let config = gateway_config(dir, 1883, "mqtt://127.0.0.1:1".into(), &options, true);
        outpost::plan::compile(&config).expect("a valid configuration");
        assert_eq!(config.routes.len(), 2);
        let route = &config.routes[1];
        assert_eq!(route.filter, HOSTILE_FILTER);
        assert_eq!(route.handler.as_deref(), Some(HOSTILE_ROUTE));
        assert_eq!(route.retry.max_attempts, 1);
        assert_eq!(route.on_quarantine, QuarantinePolicy::DeadLetter);
        assert!(config
            .modules
            .iter()
            .any(|m| m.name == HOSTILE_ROUTE && m.path.as_deref() == Some(faulty.as_path())));
        // The first route is untouched, and the handler settings are the gateway's defaults.
        assert_eq!(config.routes[0].handler, None);
        assert_eq!(config.handlers, HandlerConfig::default());
        assert!(config.broker.max_connections > options.devices + 1);

        let other_phase = gateway_config(dir, 1883, "mqtt://127.0.0.1:1".into(), &options, false);
        assert_eq!(other_phase.routes.len(), 1);
        assert!(other_phase.modules.is_empty());

        let mut no_breaker = options_with(None);
        no_breaker.no_breaker = true;
        let config = gateway_config(dir, 1883, "mqtt://127.0.0.1:1".into(), &no_breaker, true);
        assert_eq!(config.routes.len(), 1, "no --hostile, no second route");
        assert_eq!(config.handlers.breaker_failures, u32::MAX);
        assert_eq!(
            config.handlers.deadline_ms,
            HandlerConfig::default().deadline_ms
        );
    }

    #[test]
    fn hostile_device_keeps_at_most_pending_events_unfinished() {
        assert!(may_publish(0, 0, 1));
        assert!(!may_publish(1, 0, 1));
        assert!(may_publish(1, 1, 1));
        assert!(may_publish(3, 1, 3));
        assert!(!may_publish(4, 1, 3));
        // More finished than sent (an event answered with several outputs): no underflow.
        assert!(may_publish(1, 5, 1));
        // 0: no limit.
        assert!(may_publish(1_000, 0, 0));
    }

    #[test]
    fn rates_split_at_the_first_quarantine() {
        let start = Instant::now();
        let q = Quarantined {
            at: start + Duration::from_secs(2),
            acked: 20_000,
        };
        let (before, after) =
            split_at_quarantine(&q, start, start + Duration::from_secs(10), 100_000);
        assert!((before - 10_000.0).abs() < 1e-6, "{before}");
        assert!((after - 10_000.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn dead_letters_are_counted_by_reason_for_one_route() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let letter = |route: &str, reason: &str, id: u64| outpost::store::NewDeadLetter {
            stage: outpost::store::Stage::Event,
            event_id: id,
            route: route.into(),
            module: Some(HOSTILE_ROUTE.into()),
            module_version: None,
            link: None,
            msg_id: None,
            reason: reason.into(),
            detail: String::new(),
            attempts: 1,
            topic: HOSTILE_TOPIC.into(),
            device: "bench-hostile".into(),
            client_id: "bench-hostile".into(),
            payload: b"loop".to_vec(),
            received_ms: 0,
            geo: String::new(),
        };
        let batch = outpost::store::Batch {
            dead: vec![
                letter(HOSTILE_ROUTE, "timeout", 1),
                letter(HOSTILE_ROUTE, "timeout", 2),
                letter(HOSTILE_ROUTE, "quarantined", 3),
                letter("telemetry", "expired", 4),
            ],
            ..Default::default()
        };
        store.commit(&batch).expect("commit");
        let counted = dead_letters_by_reason(&store, HOSTILE_ROUTE).expect("read");
        assert_eq!(
            counted,
            BTreeMap::from([("quarantined".to_string(), 1), ("timeout".to_string(), 2)])
        );
    }
}
