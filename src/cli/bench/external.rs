//! `outpost bench load | fanout | retained | idle`: load generators for a broker that runs as a
//! process of its own (`outpost run`, or Mosquitto to compare with), over real sockets.
//!
//! Unlike the in-process `outpost bench`, nothing here starts a broker: the caller starts the
//! broker under test (the *target*) and, for `load`, the upstream broker it forwards to, and
//! names their addresses (`scripts/bench-vs-mosquitto.sh` does all of it). Every client is a
//! rumqttc connection on 127.0.0.1 or wherever the addresses point.
//!
//! - **load**: a subscriber on the upstream broker (`--count-at`) subscribes with QoS 1 to
//!   `--count-filter` and waits for its SUBACK; then `--devices` devices publish `--messages`
//!   QoS 1 publishes in all to the target, as fast as their inflight windows allow. Reported:
//!   PUBACKs per second over the publishing time (release to last PUBACK), delivered per second
//!   (release to the last arrival upstream), and completeness (every sequence number arrived,
//!   duplicates and reorderings counted).
//! - **fanout**: `--subscribers` QoS 1 subscribers on the target, one device publishing
//!   `--messages` QoS 1 publishes to their topic; deliveries per second in all (release to the
//!   last arrival at any subscriber) and completeness per subscriber.
//! - **retained**: `--count` retained QoS 1 publishes to distinct topics; then a new client
//!   subscribes to all of them with one wildcard filter, timed from its SUBSCRIBE to the last
//!   retained message it received.
//! - **idle**: `--devices` clients connect (in waves) and stay connected with keep-alive for
//!   `--hold-secs`; reports whether every one stayed connected, and the memory of the watched
//!   processes before, once all are connected and at the end.
//!
//! Every payload is JSON with the run's nonce (arrivals of another run are counted apart and
//! ignored), a sequence number, the device and the send time, padded to `--payload-bytes`.
//! With `--watch LABEL=PID` (repeatable) the report also gives each watched process's CPU time,
//! disk writes (`/proc/PID/io`, which needs the right to read it) and memory (VmRSS, VmHWM)
//! over the measurement; the load generator itself is always watched as `generator`, since it
//! shares the machine with the brokers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{drive, proc_field, stat_cpu_secs, Counters, Crowd, Latency, POLL, USER_HZ};

/// How long connecting (every device, every subscriber) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Devices of `idle` connect in waves of this many, each wave connected before the next.
const CONNECT_WAVE: usize = 100;
/// Most messages a run may expect (the counting subscribers keep a flag per message).
const MAX_MESSAGES: u64 = 100_000_000;
/// Incoming and outgoing packet size limit of every client (payloads are small; a retained
/// message of another test on the broker could be larger).
const MAX_PACKET: usize = 1024 * 1024;

/// What to measure against a broker that runs as a process of its own.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Devices publish QoS 1 to the target broker, which forwards to an upstream broker (a
    /// gateway's route or a bridge); a QoS 1 subscriber on the upstream counts the arrivals.
    Load(LoadArgs),
    /// One device publishes QoS 1 to a topic that several QoS 1 subscribers on the target broker
    /// subscribe to (local fan-out).
    Fanout(FanoutArgs),
    /// Publish retained messages to distinct topics, then time one new subscriber to all of
    /// them (a wildcard filter) until it has received every one.
    Retained(RetainedArgs),
    /// Connect many idle devices and hold them (keep-alive only), watching the broker's memory.
    Idle(IdleArgs),
}

/// Options every mode takes.
#[derive(Debug, Args)]
pub struct Common {
    /// The broker under test: its MQTT listener (3.1.1), e.g. 127.0.0.1:1883.
    #[arg(long, value_name = "IP:PORT")]
    pub target: SocketAddr,
    /// A process to watch over the measurement (CPU time, disk writes, VmRSS and VmHWM), as
    /// LABEL=PID, e.g. edge=1234; may be repeated. The generator itself is always watched.
    #[arg(long = "watch", value_name = "LABEL=PID", value_parser = parse_watch)]
    pub watch: Vec<Watched>,
    /// Give up waiting after this many seconds in all (the report says what was reached).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout_secs: u64,
    /// How long nothing may arrive (and no PUBACK come) before the run ends incomplete.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub quiet_secs: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// `outpost bench load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    pub common: Common,
    /// The upstream broker on which a subscriber counts what the target forwarded.
    #[arg(long, value_name = "IP:PORT")]
    pub count_at: SocketAddr,
    /// The filter the counting subscriber subscribes to (QoS 1) on the upstream broker.
    #[arg(long, value_name = "FILTER", default_value = "telemetry/#")]
    pub count_filter: String,
    /// Devices (one MQTT connection each); device D publishes to PREFIX/bench-D/data.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Publishes in all, spread evenly over the devices.
    #[arg(long, default_value_t = 300_000)]
    pub messages: u64,
    /// Payload size in bytes (JSON with the stamp, padded).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Unacknowledged QoS 1 publishes each device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// First topic level of the devices' publishes.
    #[arg(long, value_name = "PREFIX", default_value = "telemetry")]
    pub topic_prefix: String,
}

/// `outpost bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// QoS 1 subscribers on the target broker, each to the device's topic.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Publishes of the one device; each subscriber should receive every one.
    #[arg(long, default_value_t = 30_000)]
    pub messages: u64,
    /// Payload size in bytes (JSON with the stamp, padded).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Unacknowledged QoS 1 publishes the device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// The topic published and subscribed to (outside the gateway's routes, so that only the
    /// local broker serves it).
    #[arg(long, default_value = "fanout/bench/data")]
    pub topic: String,
}

/// `outpost bench retained`.
#[derive(Debug, Args)]
pub struct RetainedArgs {
    #[command(flatten)]
    pub common: Common,
    /// Retained messages, each to its own topic PREFIX/N.
    #[arg(long, default_value_t = 5_000)]
    pub count: u64,
    /// Payload size in bytes (JSON with the stamp, padded).
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    /// Unacknowledged QoS 1 publishes the publishing device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
    /// Topic prefix of the retained messages; the subscriber subscribes to PREFIX/#.
    #[arg(long, value_name = "PREFIX", default_value = "retained/bench")]
    pub topic_prefix: String,
}

/// `outpost bench idle`.
#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Devices to connect (one MQTT connection each, clean session, nothing published).
    #[arg(long, default_value_t = 1_000)]
    pub devices: usize,
    /// Keep-alive of each device, in seconds (rumqttc sends PINGREQ when idle that long).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub keep_alive_secs: u64,
    /// How long to hold the devices connected once all are, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub hold_secs: u64,
    /// Devices that connect at once, each wave connected before the next; the number of
    /// devices connects them all at once (a reconnect storm).
    #[arg(long, value_name = "N", default_value_t = CONNECT_WAVE)]
    pub wave: usize,
    /// Every device logs in as this user (with --password), so that each CONNECT costs the
    /// broker a password check.
    #[arg(long, requires = "password")]
    pub username: Option<String>,
    /// The password of --username.
    #[arg(long, requires = "username")]
    pub password: Option<String>,
}

/// A process to watch: a label for the report, and its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watched {
    /// How the report names it.
    pub label: String,
    /// Its process id.
    pub pid: u32,
}

/// Parses `LABEL=PID` (a `--watch` value).
fn parse_watch(text: &str) -> Result<Watched, String> {
    let (label, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected LABEL=PID"))?;
    if label.is_empty() {
        return Err(format!("{text:?}: the label is empty"));
    }
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: {pid:?} is not a process id"))?;
    Ok(Watched {
        label: label.to_string(),
        pid,
    })
}

/// Runs one mode and prints (and optionally writes) its report.
pub async fn run(mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Load(args) => {
            check_common(&args.common)?;
            let report = load(&args).await?;
            finish(&args.common, &report, print_load)
        }
        Mode::Fanout(args) => {
            check_common(&args.common)?;
            let report = fanout(&args).await?;
            finish(&args.common, &report, print_fanout)
        }
        Mode::Retained(args) => {
            check_common(&args.common)?;
            let report = retained(&args).await?;
            finish(&args.common, &report, print_retained)
        }
        Mode::Idle(args) => {
            check_common(&args.common)?;
            let report = idle(&args).await?;
            finish(&args.common, &report, print_idle)
        }
    }
}

/// Refuses common options that cannot give a run, and watched processes that do not exist.
fn check_common(common: &Common) -> anyhow::Result<()> {
    if common.timeout_secs == 0 || common.quiet_secs == 0 {
        bail!("--timeout-secs and --quiet-secs must be at least 1");
    }
    for w in &common.watch {
        if !std::path::Path::new(&format!("/proc/{}/stat", w.pid)).exists() {
            bail!("--watch {}={}: no such process", w.label, w.pid);
        }
    }
    Ok(())
}

/// Prints the report and writes it as JSON when asked.
fn finish<R: Serialize>(common: &Common, report: &R, print: fn(&R)) -> anyhow::Result<()> {
    print(report);
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reports.

/// How a measurement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Ended {
    /// Everything expected was acknowledged and arrived.
    Complete,
    /// Nothing moved for `--quiet-secs`: what is missing is taken as lost.
    Quiet,
    /// `--timeout-secs` passed.
    Timeout,
}

/// How a publishing mode's devices fared: the part every publishing mode's report shares
/// (flattened into it, so the JSON keys stay in place).
#[derive(Debug, Serialize)]
struct Acks {
    ended: Ended,
    /// PUBACKs the devices received.
    acked: u64,
    /// From the release of the load to the last PUBACK, when every publish was acknowledged.
    publish_secs: Option<f64>,
    /// Publishes asked for / `publish_secs`: acknowledged QoS 1 publishes per second.
    acked_per_sec: Option<f64>,
}

impl Acks {
    /// `acked` of `total` publishes released at `start`, the last acknowledged at `acked_at`
    /// if all were; the measurement ended as `ended`.
    fn new(
        ended: Ended,
        acked: u64,
        total: u64,
        start: Instant,
        acked_at: Option<Instant>,
    ) -> Acks {
        let publish_secs = acked_at.map(|at| at.duration_since(start).as_secs_f64());
        Acks {
            ended,
            acked,
            publish_secs,
            acked_per_sec: rate(total, publish_secs),
        }
    }

    /// Prints how the measurement ended, and the acknowledged rate as `label` (of `total`).
    fn print(&self, label: &str, total: u64) {
        println!("results ({:?})", self.ended);
        println!(
            "  {label:<25}{:>9} msg/s  ({} of {} PUBACKs in {} s)",
            opt(self.acked_per_sec, 0),
            self.acked,
            total,
            opt(self.publish_secs, 2)
        );
    }
}

/// What the watched processes and the machine did over a measurement (flattened into the
/// reports, so the JSON keys stay in place).
#[derive(Debug, Serialize)]
struct Resources {
    watch: Vec<WatchReport>,
    machine: MachineLoad,
}

impl Resources {
    fn print(&self) {
        print_watch(&self.watch);
        print_machine(&self.machine);
    }
}

/// The start of a measurement: when, and the watched processes and the machine then.
struct Window {
    started_unix: u64,
    before: Vec<Sample>,
    machine_before: Option<f64>,
    start: Instant,
}

impl Window {
    /// Samples the watched processes and the machine, and starts the clock.
    fn open(common: &Common) -> Window {
        Window {
            started_unix: unix_now(),
            before: sample(&common.watch),
            machine_before: machine_busy_secs(),
            start: Instant::now(),
        }
    }

    /// What the processes and the machine did from the start to the end `waited` saw, with
    /// `messages` messages to share the costs.
    fn resources(&self, waited: &Waited, messages: u64) -> Resources {
        let secs = waited.end_at.duration_since(self.start).as_secs_f64();
        let watch = watch_report(&self.before, &waited.end, secs, messages);
        Resources {
            machine: machine_load(self.machine_before, waited.machine_end, secs, &watch),
            watch,
        }
    }
}

/// `load`'s report.
#[derive(Debug, Serialize)]
struct LoadReport {
    mode: &'static str,
    target: String,
    count_at: String,
    count_filter: String,
    devices: usize,
    messages: u64,
    payload_bytes: usize,
    inflight_per_device: u16,
    started_unix: u64,
    #[serde(flatten)]
    acks: Acks,
    /// From the release of the load to the last arrival upstream.
    delivered_secs: Option<f64>,
    /// Distinct messages arrived / `delivered_secs`.
    delivered_per_sec: Option<f64>,
    /// Every message arrived upstream at least once.
    complete: bool,
    arrivals: Arrivals,
    /// Publish (device) to PUBACK, every publish.
    ack_latency_us: Latency,
    /// Publish (device) to arrival upstream, first arrival of each message.
    delivery_latency_us: Latency,
    device_connection_errors: u64,
    counter_connection_errors: u64,
    /// The watched processes from the release of the load to the end of the measurement.
    #[serde(flatten)]
    resources: Resources,
}

/// `fanout`'s report.
#[derive(Debug, Serialize)]
struct FanoutReport {
    mode: &'static str,
    target: String,
    topic: String,
    subscribers: usize,
    messages: u64,
    payload_bytes: usize,
    inflight: u16,
    started_unix: u64,
    #[serde(flatten)]
    acks: Acks,
    /// Deliveries expected in all: `messages * subscribers`.
    expected_deliveries: u64,
    /// Distinct messages received, summed over the subscribers.
    delivered: u64,
    /// From the release to the last arrival at any subscriber.
    delivered_secs: Option<f64>,
    /// `delivered / delivered_secs`: deliveries per second, all subscribers together.
    delivered_per_sec: Option<f64>,
    /// Every subscriber received every message.
    complete: bool,
    /// Per subscriber.
    per_subscriber: Vec<Arrivals>,
    /// Publish to arrival, every subscriber's first arrival of each message.
    delivery_latency_us: Latency,
    device_connection_errors: u64,
    subscriber_connection_errors: u64,
    #[serde(flatten)]
    resources: Resources,
}

/// `retained`'s report.
#[derive(Debug, Serialize)]
struct RetainedReport {
    mode: &'static str,
    target: String,
    count: u64,
    filter: String,
    payload_bytes: usize,
    started_unix: u64,
    /// How the subscriber's measurement ended; the retained publishes acknowledged, and how
    /// long they took (release to the last PUBACK).
    #[serde(flatten)]
    acks: Acks,
    /// From the new subscriber's SUBSCRIBE (written to its socket) to its SUBACK.
    suback_ms: Option<f64>,
    /// From the SUBSCRIBE to the first and to the last retained message received.
    first_ms: Option<f64>,
    last_ms: Option<f64>,
    /// Distinct retained messages received / (`last_ms` in seconds).
    received_per_sec: Option<f64>,
    /// Every retained message was received.
    complete: bool,
    arrivals: Arrivals,
    subscriber_connection_errors: u64,
    #[serde(flatten)]
    resources: Resources,
}

/// `idle`'s report.
#[derive(Debug, Serialize)]
struct IdleReport {
    mode: &'static str,
    target: String,
    devices: usize,
    keep_alive_secs: u64,
    hold_secs: u64,
    started_unix: u64,
    /// From the first connection attempt until every device had its CONNACK.
    connect_secs: f64,
    /// CONNACKs received (a reconnect counts again) and connection errors: a run where every
    /// device stayed connected has `connacks == devices` and no errors.
    connacks: u64,
    connection_errors: u64,
    stayed_connected: bool,
    /// Each watched process before the first device connected, once all were connected (and
    /// 1 s more), and at the end of the hold.
    before: Vec<Sample>,
    connected: Vec<Sample>,
    after_hold: Vec<Sample>,
    /// (VmRSS at the end of the hold - VmRSS before) / devices, per watched process, in bytes.
    rss_bytes_per_device: Vec<(String, Option<f64>)>,
}

/// What a counting subscriber received.
#[derive(Debug, Default, Clone, Serialize)]
struct Arrivals {
    /// Every publish received.
    arrivals: u64,
    /// Distinct sequence numbers of this run received.
    unique: u64,
    /// Sequence numbers expected (0 .. expected).
    expected: u64,
    /// Arrivals of a sequence number already received.
    duplicates: u64,
    /// Arrivals whose sequence number was lower than one already received from the same
    /// device (first arrivals only).
    reordered: u64,
    /// Arrivals of this run with the retain flag set.
    retained_flag: u64,
    /// Arrivals stamped by another run, or with a sequence number out of range.
    foreign: u64,
    /// Arrivals whose payload is not a stamp.
    unparsed: u64,
}

/// One watched process over a measurement.
#[derive(Debug, Serialize)]
struct WatchReport {
    label: String,
    pid: u32,
    /// CPU time (user + system) over the measurement, and as a share of its wall time (1.0 =
    /// one core busy).
    cpu_secs: Option<f64>,
    cores_busy: Option<f64>,
    /// CPU time per message of the measurement, in microseconds.
    cpu_us_per_msg: Option<f64>,
    /// `/proc/PID/io` write_bytes over the measurement, per message.
    write_bytes_per_msg: Option<f64>,
    /// At the start and the end of the measurement.
    rss_kib_start: Option<u64>,
    rss_kib_end: Option<u64>,
    /// The process's peak resident set at the end.
    hwm_kib_end: Option<u64>,
}

/// The whole machine over a measurement.
#[derive(Debug, Serialize)]
struct MachineLoad {
    /// CPU time of every process and the kernel (`/proc/stat`), as cores busy.
    cores_busy: Option<f64>,
    /// `cores_busy` minus the watched processes' (generator included): other processes, and
    /// kernel work not charged to the watched ones (such as loopback traffic handled in
    /// ksoftirqd). Near 0 on a quiet machine; a large value means the run shared the cores.
    others_cores_busy: Option<f64>,
}

/// CPU seconds the machine has been busy (every CPU, all but idle and iowait), from
/// `/proc/stat`.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user].
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / USER_HZ)
}

/// The machine's load between two [`machine_busy_secs`] readings `secs` apart, and what the
/// watched processes did not account for.
fn machine_load(
    start: Option<f64>,
    end: Option<f64>,
    secs: f64,
    watch: &[WatchReport],
) -> MachineLoad {
    let cores_busy = start
        .zip(end)
        .filter(|_| secs > 0.0)
        .map(|(a, b)| (b - a).max(0.0) / secs);
    let watched: Option<f64> = watch.iter().map(|w| w.cores_busy).sum();
    MachineLoad {
        cores_busy,
        others_cores_busy: cores_busy.zip(watched).map(|(all, w)| (all - w).max(0.0)),
    }
}

/// A watched process at one moment.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    label: String,
    pid: u32,
    cpu_secs: Option<f64>,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
    write_bytes: Option<u64>,
}

/// Every watched process (and the generator, as `generator`) now.
fn sample(watched: &[Watched]) -> Vec<Sample> {
    let me = Watched {
        label: "generator".into(),
        pid: std::process::id(),
    };
    watched
        .iter()
        .chain(std::iter::once(&me))
        .map(|w| {
            let status = format!("/proc/{}/status", w.pid);
            Sample {
                label: w.label.clone(),
                pid: w.pid,
                cpu_secs: stat_cpu_secs(&format!("/proc/{}/stat", w.pid)),
                rss_kib: proc_field(&status, "VmRSS:"),
                hwm_kib: proc_field(&status, "VmHWM:"),
                write_bytes: proc_field(&format!("/proc/{}/io", w.pid), "write_bytes:"),
            }
        })
        .collect()
}

/// What each process did between two samples of a measurement of `messages` over `secs`.
fn watch_report(start: &[Sample], end: &[Sample], secs: f64, messages: u64) -> Vec<WatchReport> {
    start
        .iter()
        .zip(end)
        .map(|(a, b)| {
            let cpu = a.cpu_secs.zip(b.cpu_secs).map(|(a, b)| (b - a).max(0.0));
            let per_msg = |v: f64| (messages > 0).then(|| v / messages as f64);
            WatchReport {
                label: a.label.clone(),
                pid: a.pid,
                cpu_secs: cpu,
                cores_busy: cpu.filter(|_| secs > 0.0).map(|c| c / secs),
                cpu_us_per_msg: cpu.and_then(|c| per_msg(c * 1e6)),
                write_bytes_per_msg: a
                    .write_bytes
                    .zip(b.write_bytes)
                    .and_then(|(a, b)| per_msg(b.saturating_sub(a) as f64)),
                rss_kib_start: a.rss_kib,
                rss_kib_end: b.rss_kib,
                hwm_kib_end: b.hwm_kib,
            }
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A number that tells this run's payloads from another's.
fn nonce() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Kept below 2^53 so that any JSON reader takes it exactly.
    (nanos ^ (u64::from(std::process::id()) << 32)) & ((1 << 53) - 1)
}

// ---------------------------------------------------------------------------------------------
// Payloads and counting.

/// The stamp every payload carries.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    run: u64,
    seq: u64,
    device: u64,
    sent_us: u64,
}

/// A JSON payload with `stamp`, padded to `size` bytes (longer when `size` is too small).
fn stamped(stamp: &Stamp, size: usize) -> Vec<u8> {
    super::padded(
        &format!(
            r#"{{"run":{},"seq":{},"device":{},"sent_us":{},"pad":""#,
            stamp.run, stamp.seq, stamp.device, stamp.sent_us
        ),
        size,
    )
}

/// A counting subscriber's record of what arrived.
#[derive(Debug)]
struct Tally {
    run: u64,
    arrivals: Arrivals,
    seen: Vec<bool>,
    /// Per device, the highest sequence number received so far.
    highest: Vec<Option<u64>>,
    /// Publish-to-arrival latency of each first arrival, in microseconds.
    latencies_us: Vec<u64>,
    /// First and last arrival of this run (of a new sequence number), microseconds since the
    /// run's clock.
    first_us: Option<u64>,
    last_us: Option<u64>,
}

impl Tally {
    /// A tally of run `run` expecting sequence numbers `0 .. expected`.
    fn new(run: u64, expected: u64) -> Tally {
        Tally {
            run,
            arrivals: Arrivals {
                expected,
                ..Arrivals::default()
            },
            seen: vec![false; usize::try_from(expected).unwrap_or(0)],
            highest: Vec::new(),
            latencies_us: Vec::new(),
            first_us: None,
            last_us: None,
        }
    }

    /// Counts one arrival at `now_us`; returns whether it was a new message of this run.
    fn record(&mut self, payload: &[u8], retain: bool, now_us: u64) -> bool {
        let a = &mut self.arrivals;
        a.arrivals += 1;
        let Ok(stamp) = serde_json::from_slice::<Stamp>(payload) else {
            a.unparsed += 1;
            return false;
        };
        let index = usize::try_from(stamp.seq)
            .ok()
            .filter(|&i| i < self.seen.len());
        let (Some(index), true) = (index, stamp.run == self.run) else {
            a.foreign += 1;
            return false;
        };
        if retain {
            a.retained_flag += 1;
        }
        if self.seen[index] {
            a.duplicates += 1;
            return false;
        }
        self.seen[index] = true;
        a.unique += 1;
        if let Ok(device) = usize::try_from(stamp.device) {
            if device < 1 << 20 {
                if device >= self.highest.len() {
                    self.highest.resize(device + 1, None);
                }
                match self.highest[device] {
                    Some(high) if stamp.seq < high => a.reordered += 1,
                    _ => self.highest[device] = Some(stamp.seq),
                }
            }
        }
        self.latencies_us.push(now_us.saturating_sub(stamp.sent_us));
        self.first_us.get_or_insert(now_us);
        self.last_us = Some(now_us);
        true
    }

    fn complete(&self) -> bool {
        self.arrivals.unique == self.arrivals.expected
    }
}

/// A QoS 1 subscriber counting the arrivals of one run, on its own task.
struct Counter {
    /// Distinct messages of this run received so far.
    unique: Arc<AtomicU64>,
    /// When its SUBSCRIBE was written and its SUBACK read, in microseconds since the clock
    /// (0: not yet).
    subscribe_us: Arc<AtomicU64>,
    suback_us: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Tally>,
}

impl Counter {
    /// Connects a subscriber `id` to `broker`, subscribes to `filter` with QoS 1 and returns at
    /// once; see [`Counter::subscribed`].
    fn start(
        broker: SocketAddr,
        id: String,
        filter: &str,
        tally: Tally,
        clock: Instant,
    ) -> anyhow::Result<Counter> {
        let mut mqtt = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        mqtt.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_request_channel_capacity(16);
        let (client, eventloop) = AsyncClient::new(mqtt, 16);
        client
            .try_subscribe(filter, QoS::AtLeastOnce)
            .context("cannot queue the SUBSCRIBE")?;
        let (stop, stop_rx) = watch::channel(false);
        let shared = CounterShared {
            unique: Arc::new(AtomicU64::new(0)),
            subscribe_us: Arc::new(AtomicU64::new(0)),
            suback_us: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
        };
        let counter = Counter {
            unique: shared.unique.clone(),
            subscribe_us: shared.subscribe_us.clone(),
            suback_us: shared.suback_us.clone(),
            errors: shared.errors.clone(),
            stop,
            task: tokio::spawn(count(
                eventloop,
                client,
                filter.to_string(),
                tally,
                clock,
                shared,
                stop_rx,
            )),
        };
        Ok(counter)
    }

    /// Waits for the SUBACK; fails if the broker refused the subscription or it took longer
    /// than [`CONNECT_TIMEOUT`].
    async fn subscribed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match self.suback_us.load(Ordering::Relaxed) {
                0 => {}
                u64::MAX => bail!("the broker refused the subscription"),
                _ => return Ok(()),
            }
            if self.task.is_finished() {
                bail!("the subscriber stopped before its SUBACK");
            }
            if Instant::now() > deadline {
                bail!(
                    "no SUBACK within {} s ({} connection errors)",
                    CONNECT_TIMEOUT.as_secs(),
                    self.errors.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    /// Stops counting and returns the tally.
    async fn stop(self) -> anyhow::Result<(Tally, u64)> {
        let _ = self.stop.send(true);
        let tally = self
            .task
            .await
            .context("the counting subscriber panicked")?;
        Ok((tally, self.errors.load(Ordering::Relaxed)))
    }
}

/// The counters a [`Counter`]'s task updates.
struct CounterShared {
    unique: Arc<AtomicU64>,
    subscribe_us: Arc<AtomicU64>,
    suback_us: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

/// A counting subscriber's event loop: tallies every publish until told to stop; subscribes
/// again after a reconnect (a clean session forgets the subscription).
async fn count(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    filter: String,
    mut tally: Tally,
    clock: Instant,
    shared: CounterShared,
    mut stop: watch::Receiver<bool>,
) -> Tally {
    let mut connacks = 0u64;
    loop {
        let event = tokio::select! {
            _ = stop.changed() => return tally,
            event = eventloop.poll() => event,
        };
        let now_us = || clock.elapsed().as_micros() as u64;
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if tally.record(&publish.payload, publish.retain, now_us()) {
                    shared.unique.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(_))) => {
                shared
                    .subscribe_us
                    .store(now_us().max(1), Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                let at = if refused { u64::MAX } else { now_us().max(1) };
                shared.suback_us.store(at, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connacks += 1;
                if connacks > 1 {
                    let _ = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                }
            }
            Ok(_) => {}
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Devices.

/// Publishing devices: each publishes its share of the sequence numbers once released.
struct Devices {
    crowd: Crowd,
    go: watch::Sender<bool>,
}

/// What one device publishes.
struct Share {
    device: usize,
    /// Its sequence numbers: `first .. first + count`.
    first: u64,
    count: u64,
    /// Where it publishes: everything to `topic`, or with `per_message_topic` sequence number
    /// N to `topic/N` (one topic per message).
    topic: String,
    per_message_topic: bool,
    /// Publish with the retain flag.
    retain: bool,
}

/// `messages` split over `devices` as evenly as possible: (first sequence number, count) each.
fn shares(messages: u64, devices: usize) -> Vec<(u64, u64)> {
    let n = devices.max(1) as u64;
    let (base, extra) = (messages / n, messages % n);
    let mut first = 0;
    (0..n)
        .map(|d| {
            let count = base + u64::from(d < extra);
            let share = (first, count);
            first += count;
            share
        })
        .collect()
}

impl Devices {
    /// Connects one device per share to `broker` and waits for every CONNACK; nothing is
    /// published until [`Devices::release`].
    async fn connect(
        broker: SocketAddr,
        id_prefix: &str,
        shares: Vec<Share>,
        inflight: u16,
        payload_bytes: usize,
        run: u64,
        clock: Instant,
    ) -> anyhow::Result<Devices> {
        let (go, _) = watch::channel(false);
        let mut devices = Devices {
            crowd: Crowd::new(true),
            go,
        };
        let wanted = shares.len();
        for share in shares {
            let mut mqtt = MqttOptions::new(
                format!("{id_prefix}-{}", share.device),
                broker.ip().to_string(),
                broker.port(),
            );
            mqtt.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_inflight(inflight)
                .set_max_packet_size(MAX_PACKET, MAX_PACKET)
                .set_request_channel_capacity(8);
            let go = devices.go.subscribe();
            devices.crowd.add(mqtt, |client| {
                publish_share(client, share, payload_bytes, run, clock, go)
            });
        }
        if let Err(got) = devices.crowd.wait_connected(CONNECT_TIMEOUT).await {
            devices.stop().await;
            bail!("only {got} of {wanted} devices connected to {broker}");
        }
        Ok(devices)
    }

    /// Lets every device publish its share.
    fn release(&self) {
        self.go.send_replace(true);
    }

    fn acked(&self) -> u64 {
        self.crowd.acked()
    }

    /// Disconnects every device.
    async fn stop(self) {
        self.crowd.disconnect().await;
    }
}

/// One device's publishing: waits for the release, then publishes its share as fast as its
/// inflight window allows (rumqttc stops taking requests while the window is full).
async fn publish_share(
    client: AsyncClient,
    share: Share,
    payload_bytes: usize,
    run: u64,
    clock: Instant,
    mut go: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    while !*go.borrow_and_update() {
        if go.changed().await.is_err() {
            return Ok(());
        }
    }
    for seq in share.first..share.first + share.count {
        let stamp = Stamp {
            run,
            seq,
            device: share.device as u64,
            sent_us: clock.elapsed().as_micros() as u64,
        };
        let topic = match share.per_message_topic {
            true => format!("{}/{seq}", share.topic),
            false => share.topic.clone(),
        };
        client
            .publish(
                topic,
                QoS::AtLeastOnce,
                share.retain,
                stamped(&stamp, payload_bytes),
            )
            .await
            .with_context(|| format!("device {} cannot publish", share.device))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Waiting.

/// What [`wait`] saw.
struct Waited {
    ended: Ended,
    /// When the PUBACK counter reached its target, if it did.
    acked_at: Option<Instant>,
    /// The watched processes and the machine's busy time at the end.
    end: Vec<Sample>,
    machine_end: Option<f64>,
    end_at: Instant,
}

/// Polls `acked` and `arrived` until both reach their targets, nothing moved for
/// `--quiet-secs`, or `--timeout-secs` passed since `start`. Prints progress every second.
async fn wait(
    common: &Common,
    start: Instant,
    targets: (u64, u64),
    acked: &dyn Fn() -> u64,
    arrived: &dyn Fn() -> u64,
) -> Waited {
    let quiet = Duration::from_secs(common.quiet_secs);
    let timeout = Duration::from_secs(common.timeout_secs);
    let mut last = (u64::MAX, u64::MAX);
    let mut last_move = Instant::now();
    let mut acked_at = None;
    let mut next_print = Instant::now() + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let values = (acked(), arrived());
        if values != last {
            last = values;
            last_move = now;
        }
        if acked_at.is_none() && values.0 >= targets.0 {
            acked_at = Some(now);
        }
        let ended = if values.0 >= targets.0 && values.1 >= targets.1 {
            Some(Ended::Complete)
        } else if now.duration_since(last_move) > quiet {
            Some(Ended::Quiet)
        } else if now.duration_since(start) > timeout {
            Some(Ended::Timeout)
        } else {
            None
        };
        if let Some(ended) = ended {
            return Waited {
                ended,
                acked_at,
                end: sample(&common.watch),
                machine_end: machine_busy_secs(),
                end_at: now,
            };
        }
        if now >= next_print {
            next_print = now + Duration::from_secs(1);
            eprintln!(
                "  {:>6.1}s  acked {:>9}/{}  arrived {:>9}/{}",
                now.duration_since(start).as_secs_f64(),
                values.0,
                targets.0,
                values.1,
                targets.1
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Seconds from `from` to `to` (both microseconds since the clock), if `to` is known.
fn secs_between(from_us: u64, to_us: Option<u64>) -> Option<f64> {
    to_us.map(|to| to.saturating_sub(from_us) as f64 / 1e6)
}

/// `count / secs` when `secs` is known and positive.
fn rate(count: u64, secs: Option<f64>) -> Option<f64> {
    secs.filter(|&s| s > 0.0).map(|s| count as f64 / s)
}

// ---------------------------------------------------------------------------------------------
// The modes.

async fn load(args: &LoadArgs) -> anyhow::Result<LoadReport> {
    if args.devices == 0 || args.messages == 0 || args.inflight == 0 {
        bail!("--devices, --messages and --inflight must be at least 1");
    }
    if args.messages > MAX_MESSAGES {
        bail!("--messages must be at most {MAX_MESSAGES}");
    }
    let common = &args.common;
    let run = nonce();
    let clock = Instant::now();
    println!(
        "outpost bench load: {} devices x {} QoS 1 publishes ({} B, {} in flight each) to {}, counted at {} ({})",
        args.devices,
        args.messages / args.devices as u64,
        args.payload_bytes,
        args.inflight,
        common.target,
        args.count_at,
        args.count_filter
    );
    let counter = Counter::start(
        args.count_at,
        format!("bench-count-{}", run % 1_000_000),
        &args.count_filter,
        Tally::new(run, args.messages),
        clock,
    )?;
    counter
        .subscribed()
        .await
        .with_context(|| format!("the counting subscriber on {}", args.count_at))?;
    let shares = shares(args.messages, args.devices)
        .into_iter()
        .enumerate()
        .map(|(device, (first, count))| Share {
            device,
            first,
            count,
            topic: format!("{}/bench-{device}/data", args.topic_prefix),
            per_message_topic: false,
            retain: false,
        })
        .collect();
    let devices = Devices::connect(
        common.target,
        "bench",
        shares,
        args.inflight,
        args.payload_bytes,
        run,
        clock,
    )
    .await?;

    let window = Window::open(common);
    let start = window.start;
    let start_us = start.duration_since(clock).as_micros() as u64;
    devices.release();
    let waited = wait(
        common,
        start,
        (args.messages, args.messages),
        &|| devices.acked(),
        &|| counter.unique(),
    )
    .await;
    let acked = devices.acked();
    let device_errors = devices.crowd.errors();
    let ack_latencies = devices.crowd.ack_latencies();
    devices.stop().await;
    let (tally, counter_errors) = counter.stop().await?;

    let delivered_secs = secs_between(start_us, tally.last_us);
    let mut latencies = tally.latencies_us.clone();
    latencies.sort_unstable();
    Ok(LoadReport {
        mode: "load",
        target: common.target.to_string(),
        count_at: args.count_at.to_string(),
        count_filter: args.count_filter.clone(),
        devices: args.devices,
        messages: args.messages,
        payload_bytes: args.payload_bytes,
        inflight_per_device: args.inflight,
        started_unix: window.started_unix,
        acks: Acks::new(waited.ended, acked, args.messages, start, waited.acked_at),
        delivered_secs,
        delivered_per_sec: rate(tally.arrivals.unique, delivered_secs),
        complete: tally.complete(),
        arrivals: tally.arrivals.clone(),
        ack_latency_us: Latency::of_sorted(&ack_latencies),
        delivery_latency_us: Latency::of_sorted(&latencies),
        device_connection_errors: device_errors,
        counter_connection_errors: counter_errors,
        resources: window.resources(&waited, args.messages),
    })
}

async fn fanout(args: &FanoutArgs) -> anyhow::Result<FanoutReport> {
    if args.subscribers == 0 || args.messages == 0 || args.inflight == 0 {
        bail!("--subscribers, --messages and --inflight must be at least 1");
    }
    if args.subscribers > 1000 {
        bail!("--subscribers must be at most 1000");
    }
    if args.messages > MAX_MESSAGES {
        bail!("--messages must be at most {MAX_MESSAGES}");
    }
    let common = &args.common;
    let run = nonce();
    let clock = Instant::now();
    println!(
        "outpost bench fanout: 1 device x {} QoS 1 publishes ({} B, {} in flight) to {} on {}, {} QoS 1 subscribers",
        args.messages, args.payload_bytes, args.inflight, args.topic, common.target, args.subscribers
    );
    let mut counters = Vec::new();
    for i in 0..args.subscribers {
        counters.push(Counter::start(
            common.target,
            format!("bench-sub-{i}"),
            &args.topic,
            Tally::new(run, args.messages),
            clock,
        )?);
    }
    for (i, counter) in counters.iter().enumerate() {
        counter
            .subscribed()
            .await
            .with_context(|| format!("subscriber {i} on {}", common.target))?;
    }
    let share = Share {
        device: 0,
        first: 0,
        count: args.messages,
        topic: args.topic.clone(),
        per_message_topic: false,
        retain: false,
    };
    let devices = Devices::connect(
        common.target,
        "bench-pub",
        vec![share],
        args.inflight,
        args.payload_bytes,
        run,
        clock,
    )
    .await?;
    let expected = args.messages * args.subscribers as u64;

    let window = Window::open(common);
    let start = window.start;
    let start_us = start.duration_since(clock).as_micros() as u64;
    devices.release();
    let waited = wait(
        common,
        start,
        (args.messages, expected),
        &|| devices.acked(),
        &|| counters.iter().map(Counter::unique).sum(),
    )
    .await;
    let acked = devices.acked();
    let device_errors = devices.crowd.errors();
    devices.stop().await;
    let mut per_subscriber = Vec::new();
    let mut latencies = Vec::new();
    let mut last_us = None;
    let mut subscriber_errors = 0;
    let mut complete = true;
    for counter in counters {
        let (tally, errors) = counter.stop().await?;
        subscriber_errors += errors;
        complete &= tally.complete();
        last_us = last_us.max(tally.last_us);
        latencies.extend_from_slice(&tally.latencies_us);
        per_subscriber.push(tally.arrivals);
    }
    latencies.sort_unstable();
    let delivered: u64 = per_subscriber.iter().map(|a| a.unique).sum();
    let delivered_secs = secs_between(start_us, last_us);
    Ok(FanoutReport {
        mode: "fanout",
        target: common.target.to_string(),
        topic: args.topic.clone(),
        subscribers: args.subscribers,
        messages: args.messages,
        payload_bytes: args.payload_bytes,
        inflight: args.inflight,
        started_unix: window.started_unix,
        acks: Acks::new(waited.ended, acked, args.messages, start, waited.acked_at),
        expected_deliveries: expected,
        delivered,
        delivered_secs,
        delivered_per_sec: rate(delivered, delivered_secs),
        complete,
        per_subscriber,
        delivery_latency_us: Latency::of_sorted(&latencies),
        device_connection_errors: device_errors,
        subscriber_connection_errors: subscriber_errors,
        resources: window.resources(&waited, expected),
    })
}

async fn retained(args: &RetainedArgs) -> anyhow::Result<RetainedReport> {
    if args.count == 0 || args.inflight == 0 {
        bail!("--count and --inflight must be at least 1");
    }
    if args.count > MAX_MESSAGES {
        bail!("--count must be at most {MAX_MESSAGES}");
    }
    let common = &args.common;
    let run = nonce();
    let clock = Instant::now();
    let filter = format!("{}/#", args.topic_prefix);
    println!(
        "outpost bench retained: {} retained QoS 1 messages ({} B) to {}/N on {}, then one subscriber to {}",
        args.count, args.payload_bytes, args.topic_prefix, common.target, filter
    );
    let share = Share {
        device: 0,
        first: 0,
        count: args.count,
        topic: args.topic_prefix.clone(),
        per_message_topic: true,
        retain: true,
    };
    let devices = Devices::connect(
        common.target,
        "bench-retain",
        vec![share],
        args.inflight,
        args.payload_bytes,
        run,
        clock,
    )
    .await?;
    let window = Window::open(common);
    let start = window.start;
    devices.release();
    let published = wait(common, start, (args.count, 0), &|| devices.acked(), &|| 0).await;
    let acked = devices.acked();
    devices.stop().await;
    if published.ended != Ended::Complete {
        bail!(
            "only {acked} of {} retained publishes were acknowledged ({:?})",
            args.count,
            published.ended
        );
    }

    let counter = Counter::start(
        common.target,
        format!("bench-late-{}", run % 1_000_000),
        &filter,
        Tally::new(run, args.count),
        clock,
    )?;
    let subscribe_start = Instant::now();
    let waited = wait(common, subscribe_start, (0, args.count), &|| 0, &|| {
        counter.unique()
    })
    .await;
    let subscribe_us = counter.subscribe_us.load(Ordering::Relaxed);
    let suback_us = counter.suback_us.load(Ordering::Relaxed);
    let (tally, errors) = counter.stop().await?;
    let known = |us: u64| (us != 0 && us != u64::MAX).then_some(us);
    let ms = |to: Option<u64>| {
        known(subscribe_us).and_then(|from| secs_between(from, to).map(|s| s * 1e3))
    };
    let last_ms = ms(tally.last_us);
    Ok(RetainedReport {
        mode: "retained",
        target: common.target.to_string(),
        count: args.count,
        filter,
        payload_bytes: args.payload_bytes,
        started_unix: window.started_unix,
        acks: Acks::new(waited.ended, acked, args.count, start, published.acked_at),
        suback_ms: ms(known(suback_us)),
        first_ms: ms(tally.first_us),
        last_ms,
        received_per_sec: rate(tally.arrivals.unique, last_ms.map(|m| m / 1e3)),
        complete: tally.complete(),
        arrivals: tally.arrivals.clone(),
        subscriber_connection_errors: errors,
        resources: window.resources(&waited, args.count),
    })
}

async fn idle(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let common = &args.common;
    if args.keep_alive_secs < 5 {
        bail!("--keep-alive-secs must be at least 5 (rumqttc's minimum)");
    }
    if args.wave == 0 {
        bail!("--wave must be at least 1");
    }
    println!(
        "outpost bench idle: {} devices connected to {} in waves of {}{} (keep-alive {} s), held {} s",
        args.devices,
        common.target,
        args.wave,
        if args.username.is_some() { ", with a password" } else { "" },
        args.keep_alive_secs,
        args.hold_secs
    );
    let started_unix = unix_now();
    let before = sample(&common.watch);
    let connected = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut drivers = Vec::new();
    let start = Instant::now();
    let result: anyhow::Result<()> = async {
        for wave in (0..args.devices).collect::<Vec<_>>().chunks(args.wave) {
            for &device in wave {
                let mut mqtt = MqttOptions::new(
                    format!("bench-idle-{device}"),
                    common.target.ip().to_string(),
                    common.target.port(),
                );
                mqtt.set_keep_alive(Duration::from_secs(args.keep_alive_secs))
                    .set_clean_session(true);
                if let (Some(user), Some(password)) = (&args.username, &args.password) {
                    mqtt.set_credentials(user, password);
                }
                let (client, eventloop) = AsyncClient::new(mqtt, 4);
                drivers.push(tokio::spawn(drive(
                    eventloop,
                    Counters {
                        acked: Arc::new(AtomicU64::new(0)),
                        errors: errors.clone(),
                        connected: connected.clone(),
                        recording: Arc::new(AtomicBool::new(false)),
                        ack_latencies: Arc::new(Mutex::new(Vec::new())),
                    },
                )));
                clients.push(client);
            }
            let deadline = Instant::now() + CONNECT_TIMEOUT;
            while connected.load(Ordering::Relaxed) < clients.len() as u64 {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {} devices connected ({} connection errors)",
                        connected.load(Ordering::Relaxed),
                        clients.len(),
                        errors.load(Ordering::Relaxed)
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }
    .await;
    let connect_secs = start.elapsed().as_secs_f64();
    let outcome = match result {
        Ok(()) => {
            eprintln!(
                "  {} devices connected in {connect_secs:.2} s; holding",
                args.devices
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            let at_connected = sample(&common.watch);
            tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
            Ok((at_connected, sample(&common.watch)))
        }
        Err(e) => Err(e),
    };
    let connacks = connected.load(Ordering::Relaxed);
    let connection_errors = errors.load(Ordering::Relaxed);
    for client in &clients {
        let _ = client.try_disconnect();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for driver in drivers {
        driver.abort();
    }
    let (at_connected, after_hold) = outcome?;
    let rss_bytes_per_device = before
        .iter()
        .zip(&after_hold)
        .map(|(a, b)| {
            let per = a
                .rss_kib
                .zip(b.rss_kib)
                .filter(|_| args.devices > 0)
                .map(|(a, b)| (b as f64 - a as f64) * 1024.0 / args.devices as f64);
            (a.label.clone(), per)
        })
        .collect();
    Ok(IdleReport {
        mode: "idle",
        target: common.target.to_string(),
        devices: args.devices,
        keep_alive_secs: args.keep_alive_secs,
        hold_secs: args.hold_secs,
        started_unix,
        connect_secs,
        connacks,
        connection_errors,
        stayed_connected: connacks == args.devices as u64 && connection_errors == 0,
        before,
        connected: at_connected,
        after_hold,
        rss_bytes_per_device,
    })
}

// ---------------------------------------------------------------------------------------------
// Printing.

fn opt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    }
}

fn print_arrivals(indent: &str, a: &Arrivals) {
    println!(
        "{indent}{} of {} arrived ({} arrivals: {} duplicates, {} reordered, {} foreign, {} unparsed)",
        a.unique, a.expected, a.arrivals, a.duplicates, a.reordered, a.foreign, a.unparsed
    );
}

fn print_machine(m: &MachineLoad) {
    println!(
        "  machine    {} cores busy, of which {} not the watched processes",
        opt(m.cores_busy, 2),
        opt(m.others_cores_busy, 2)
    );
}

fn print_watch(watch: &[WatchReport]) {
    for w in watch {
        println!(
            "  {:<10} pid {:>7}: CPU {} s ({} cores, {} µs/msg), writes {} B/msg, VmRSS {} -> {} KiB, VmHWM {} KiB",
            w.label,
            w.pid,
            opt(w.cpu_secs, 2),
            opt(w.cores_busy, 2),
            opt(w.cpu_us_per_msg, 1),
            opt(w.write_bytes_per_msg, 0),
            w.rss_kib_start.map_or("-".into(), |v| v.to_string()),
            w.rss_kib_end.map_or("-".into(), |v| v.to_string()),
            w.hwm_kib_end.map_or("-".into(), |v| v.to_string()),
        );
    }
}

fn print_latency(name: &str, l: &Latency) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "  {name:<24} p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples)",
        ms(l.p50),
        ms(l.p99),
        ms(l.max),
        l.samples
    );
}

/// The publishers' and the subscribers' connection errors (label, count), if there were any.
fn print_connection_errors(publishers: (&str, u64), subscribers: (&str, u64)) {
    if publishers.1 + subscribers.1 > 0 {
        println!(
            "  connection errors        {} {}, {} {}",
            publishers.0, publishers.1, subscribers.0, subscribers.1
        );
    }
}

/// The line that says whether everything arrived, without its end.
fn complete_line(complete: bool) -> String {
    format!(
        "  complete                 {:>9}",
        if complete { "yes" } else { "NO" }
    )
}

fn print_load(r: &LoadReport) {
    r.acks.print("acknowledged QoS 1", r.messages);
    println!(
        "  delivered upstream       {:>9} msg/s  (last arrival after {} s)",
        opt(r.delivered_per_sec, 0),
        opt(r.delivered_secs, 2)
    );
    print!("{}  ", complete_line(r.complete));
    print_arrivals("", &r.arrivals);
    print_latency("publish->PUBACK", &r.ack_latency_us);
    print_latency("publish->upstream", &r.delivery_latency_us);
    print_connection_errors(
        ("devices", r.device_connection_errors),
        ("counting subscriber", r.counter_connection_errors),
    );
    r.resources.print();
}

fn print_fanout(r: &FanoutReport) {
    r.acks.print("acknowledged QoS 1", r.messages);
    println!(
        "  delivered, all subscribers {:>7} msg/s  ({} of {} in {} s)",
        opt(r.delivered_per_sec, 0),
        r.delivered,
        r.expected_deliveries,
        opt(r.delivered_secs, 2)
    );
    println!("{}", complete_line(r.complete));
    for (i, a) in r.per_subscriber.iter().enumerate() {
        print_arrivals(&format!("    subscriber {i:>2}: "), a);
    }
    print_latency("publish->subscriber", &r.delivery_latency_us);
    print_connection_errors(
        ("device", r.device_connection_errors),
        ("subscribers", r.subscriber_connection_errors),
    );
    r.resources.print();
}

fn print_retained(r: &RetainedReport) {
    r.acks.print("retained publishes", r.count);
    println!(
        "  new subscriber           SUBACK {} ms, first {} ms, last {} ms after its SUBSCRIBE ({} msg/s)",
        opt(r.suback_ms, 1),
        opt(r.first_ms, 1),
        opt(r.last_ms, 1),
        opt(r.received_per_sec, 0)
    );
    print!("{}  ", complete_line(r.complete));
    print_arrivals("", &r.arrivals);
    println!("  retain flag set on       {:>9}", r.arrivals.retained_flag);
    r.resources.print();
}

fn print_idle(r: &IdleReport) {
    println!(
        "results: {} devices connected in {:.2} s; {} CONNACKs, {} connection errors: {}",
        r.devices,
        r.connect_secs,
        r.connacks,
        r.connection_errors,
        if r.stayed_connected {
            "every device stayed connected"
        } else {
            "NOT every device stayed connected"
        }
    );
    for ((a, b), c) in r.before.iter().zip(&r.connected).zip(&r.after_hold) {
        let kib = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "  {:<10} pid {:>7}: VmRSS {} KiB before, {} KiB connected, {} KiB after {} s; VmHWM {} KiB",
            a.label,
            a.pid,
            kib(a.rss_kib),
            kib(b.rss_kib),
            kib(c.rss_kib),
            r.hold_secs,
            kib(c.hwm_kib)
        );
    }
    for (label, per) in &r.rss_bytes_per_device {
        println!("  {label:<10} {} B of VmRSS per device", opt(*per, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_values_parse_or_say_why_not() {
        assert_eq!(
            parse_watch("edge=1234"),
            Ok(Watched {
                label: "edge".into(),
                pid: 1234
            })
        );
        assert!(parse_watch("edge").is_err());
        assert!(parse_watch("=12").is_err());
        assert!(parse_watch("edge=x").is_err());
        assert!(parse_watch("edge=-1").is_err());
    }

    /// The top-level keys of `report`'s JSON, in the order written.
    fn keys<R: Serialize>(report: &R) -> Vec<String> {
        let text = serde_json::to_string_pretty(report).expect("serializable");
        // Top-level keys are the lines indented by exactly two spaces.
        text.lines()
            .filter_map(|l| l.strip_prefix("  \""))
            .filter_map(|l| l.split_once('"').map(|(k, _)| k.to_string()))
            .collect()
    }

    fn acks() -> Acks {
        let now = Instant::now();
        Acks::new(Ended::Complete, 3, 3, now, Some(now))
    }

    fn resources() -> Resources {
        Resources {
            watch: Vec::new(),
            machine: machine_load(None, None, 0.0, &[]),
        }
    }

    #[test]
    fn reports_keep_their_json_keys_in_order() {
        let load = LoadReport {
            mode: "load",
            target: String::new(),
            count_at: String::new(),
            count_filter: String::new(),
            devices: 1,
            messages: 3,
            payload_bytes: 1,
            inflight_per_device: 1,
            started_unix: 0,
            acks: acks(),
            delivered_secs: None,
            delivered_per_sec: None,
            complete: true,
            arrivals: Arrivals::default(),
            ack_latency_us: Latency::of_sorted(&[]),
            delivery_latency_us: Latency::of_sorted(&[]),
            device_connection_errors: 0,
            counter_connection_errors: 0,
            resources: resources(),
        };
        assert_eq!(
            keys(&load),
            [
                "mode",
                "target",
                "count_at",
                "count_filter",
                "devices",
                "messages",
                "payload_bytes",
                "inflight_per_device",
                "started_unix",
                "ended",
                "acked",
                "publish_secs",
                "acked_per_sec",
                "delivered_secs",
                "delivered_per_sec",
                "complete",
                "arrivals",
                "ack_latency_us",
                "delivery_latency_us",
                "device_connection_errors",
                "counter_connection_errors",
                "watch",
                "machine"
            ]
        );
        let fanout = FanoutReport {
            mode: "fanout",
            target: String::new(),
            topic: String::new(),
            subscribers: 1,
            messages: 3,
            payload_bytes: 1,
            inflight: 1,
            started_unix: 0,
            acks: acks(),
            expected_deliveries: 3,
            delivered: 3,
            delivered_secs: None,
            delivered_per_sec: None,
            complete: true,
            per_subscriber: Vec::new(),
            delivery_latency_us: Latency::of_sorted(&[]),
            device_connection_errors: 0,
            subscriber_connection_errors: 0,
            resources: resources(),
        };
        assert_eq!(
            keys(&fanout),
            [
                "mode",
                "target",
                "topic",
                "subscribers",
                "messages",
                "payload_bytes",
                "inflight",
                "started_unix",
                "ended",
                "acked",
                "publish_secs",
                "acked_per_sec",
                "expected_deliveries",
                "delivered",
                "delivered_secs",
                "delivered_per_sec",
                "complete",
                "per_subscriber",
                "delivery_latency_us",
                "device_connection_errors",
                "subscriber_connection_errors",
                "watch",
                "machine"
            ]
        );
        let retained = RetainedReport {
            mode: "retained",
            target: String::new(),
            count: 3,
            filter: String::new(),
            payload_bytes: 1,
            started_unix: 0,
            acks: acks(),
            suback_ms: None,
            first_ms: None,
            last_ms: None,
            received_per_sec: None,
            complete: true,
            arrivals: Arrivals::default(),
            subscriber_connection_errors: 0,
            resources: resources(),
        };
        assert_eq!(
            keys(&retained),
            [
                "mode",
                "target",
                "count",
                "filter",
                "payload_bytes",
                "started_unix",
                "ended",
                "acked",
                "publish_secs",
                "acked_per_sec",
                "suback_ms",
                "first_ms",
                "last_ms",
                "received_per_sec",
                "complete",
                "arrivals",
                "subscriber_connection_errors",
                "watch",
                "machine"
            ]
        );
        assert!(serde_json::to_string(&retained)
            .expect("serializable")
            .contains(r#""ended":"complete","acked":3,"publish_secs":0.0,"acked_per_sec":null"#));
    }

    #[test]
    fn shares_cover_every_sequence_number_once() {
        let s = shares(10, 3);
        assert_eq!(s, vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(shares(2, 4), vec![(0, 1), (1, 1), (2, 0), (2, 0)]);
        let total: u64 = shares(300_000, 10).iter().map(|s| s.1).sum();
        assert_eq!(total, 300_000);
    }

    #[test]
    fn stamped_payloads_are_padded_json() {
        let stamp = Stamp {
            run: (1 << 53) - 1,
            seq: 7,
            device: 2,
            sent_us: 99,
        };
        let p = stamped(&stamp, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(serde_json::from_slice::<Stamp>(&p).ok(), Some(stamp));
        let small = stamped(
            &Stamp {
                run: 1,
                seq: u64::MAX,
                device: 0,
                sent_us: 0,
            },
            8,
        );
        assert!(serde_json::from_slice::<Stamp>(&small).is_ok());
    }

    #[test]
    fn tally_counts_duplicates_reorderings_and_other_runs() {
        let mut t = Tally::new(5, 4);
        let msg = |run, seq, device| {
            stamped(
                &Stamp {
                    run,
                    seq,
                    device,
                    sent_us: 10,
                },
                64,
            )
        };
        assert!(t.record(&msg(5, 1, 0), false, 100));
        assert!(t.record(&msg(5, 0, 0), false, 110), "reordered but new");
        assert!(!t.record(&msg(5, 1, 0), false, 120), "duplicate");
        assert!(!t.record(&msg(6, 2, 0), false, 130), "another run");
        assert!(!t.record(&msg(5, 4, 0), false, 130), "out of range");
        assert!(!t.record(b"not json", false, 140));
        assert!(t.record(&msg(5, 2, 1), true, 150));
        assert!(!t.complete());
        assert!(t.record(&msg(5, 3, 1), true, 160));
        assert!(t.complete());
        let a = &t.arrivals;
        assert_eq!(
            (a.arrivals, a.unique, a.duplicates, a.reordered),
            (8, 4, 1, 1)
        );
        assert_eq!((a.foreign, a.unparsed, a.retained_flag), (2, 1, 2));
        assert_eq!((t.first_us, t.last_us), (Some(100), Some(160)));
        assert_eq!(t.latencies_us, vec![90, 100, 140, 150]);
    }

    #[test]
    fn watch_reports_per_message_and_per_second() {
        let at = |cpu, rss, written| Sample {
            label: "edge".into(),
            pid: 1,
            cpu_secs: Some(cpu),
            rss_kib: Some(rss),
            hwm_kib: Some(rss),
            write_bytes: written,
        };
        let r = watch_report(
            &[at(1.0, 10, Some(0))],
            &[at(3.0, 20, Some(1000))],
            4.0,
            100,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].cores_busy, Some(0.5));
        assert_eq!(r[0].cpu_us_per_msg, Some(20_000.0));
        assert_eq!(r[0].write_bytes_per_msg, Some(10.0));
        assert_eq!((r[0].rss_kib_start, r[0].rss_kib_end), (Some(10), Some(20)));
        let unreadable = watch_report(&[at(1.0, 10, None)], &[at(1.0, 10, None)], 0.0, 0);
        assert_eq!(unreadable[0].write_bytes_per_msg, None);
        assert_eq!(unreadable[0].cores_busy, None);
    }

    #[test]
    fn the_machine_load_leaves_out_the_watched_processes() {
        let watched = |busy| WatchReport {
            label: "edge".into(),
            pid: 1,
            cpu_secs: None,
            cores_busy: busy,
            cpu_us_per_msg: None,
            write_bytes_per_msg: None,
            rss_kib_start: None,
            rss_kib_end: None,
            hwm_kib_end: None,
        };
        let m = machine_load(Some(10.0), Some(13.0), 2.0, &[watched(Some(1.0))]);
        assert_eq!(m.cores_busy, Some(1.5));
        assert_eq!(m.others_cores_busy, Some(0.5));
        let m = machine_load(Some(10.0), Some(13.0), 2.0, &[watched(None)]);
        assert_eq!(
            m.others_cores_busy, None,
            "a process that could not be read"
        );
        assert!(machine_busy_secs().is_some_and(|s| s > 0.0));
    }

    #[test]
    fn rates_need_a_positive_time() {
        assert_eq!(rate(10, Some(2.0)), Some(5.0));
        assert_eq!(rate(10, Some(0.0)), None);
        assert_eq!(rate(10, None), None);
        assert_eq!(secs_between(1_000_000, Some(3_000_000)), Some(2.0));
        assert_eq!(secs_between(5, None), None);
    }
}
