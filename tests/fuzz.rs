//! Fuzzing the parsers that face the outside (issue 12, item 7), under the normal `cargo test`
//! on the stable toolchain.
//!
//! One test per target of `tests/fuzz/targets.rs`: the MQTT frames of a device connection, the
//! configuration file, GeoJSON geofences, the signed-module envelope, signed commands, key
//! files, dead-letter control requests and their replies, and the packets an upstream broker
//! sends the uplink (both protocols, cut into chunks as TCP cuts them). Each test feeds its parser inputs
//! until a time budget is spent: about 2 s by default, `OUTPOST_FUZZ_SECS` seconds when set
//! (`OUTPOST_FUZZ_SECS=20 cargo test --release --test fuzz`). Inputs are random bytes, random
//! sequences of the target's tokens, and above all mutations (bit flips, interesting bytes and
//! numbers, insertions, deletions, duplications, splices, tokens) of a corpus of valid inputs,
//! which grows with every input that produced a kind of answer not seen before.
//!
//! A case fails when the check panics, when a property of the check does not hold, when it
//! allocates more than [`ALLOC_LIMIT`] (a parser must not let its input choose how much memory
//! it takes), or when it runs for more than the case limit (`OUTPOST_FUZZ_CASE_SECS`, default
//! 30 s: a hang, not a slow machine; one case takes microseconds to milliseconds). A failure
//! prints the input in hex, the input shrunk to a minimal one that still fails the same way,
//! and a Rust byte string of it, ready for a regression test; a crash that kills the process
//! (stack overflow, abort) prints the input being tried before it dies.
//!
//! Every run prints, per target, how many inputs were tried. `OUTPOST_FUZZ_SEED` repeats the
//! sequence of a run (the seed is printed), up to timing: the budget decides where it stops.
//! The same targets run under libFuzzer with `scripts/fuzz-nightly.sh` (see `fuzz/`).

#[path = "fuzz/targets.rs"]
mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use targets::{Outcome, Target};

/// Most memory one case may have allocated at once (or ask for in one allocation), for inputs
/// of at most 32 KiB.
const ALLOC_LIMIT: usize = 64 << 20;

/// The fuzzing threads' stack: what a tokio worker has, where the gateway parses frames,
/// deploys and control requests.
const STACK: usize = 2 << 20;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: per thread, while a case runs.

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// The input being tried on this thread, for the fatal-signal handler.
    static CURRENT: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    static CURRENT_TARGET: Cell<&'static str> = const { Cell::new("") };
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn note_alloc(size: usize) {
    if TRACKING.with(Cell::get) {
        let live = LIVE.with(|l| {
            let v = l.get() + size as isize;
            l.set(v);
            v
        });
        PEAK.with(|p| p.set(p.get().max(live)));
        LARGEST.with(|l| l.set(l.get().max(size)));
    }
}

fn note_free(size: usize) {
    if TRACKING.with(Cell::get) {
        LIVE.with(|l| l.set(l.get() - size as isize));
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the accounting only
// touches constant-initialised thread-locals without destructors, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Fatal signals: print the input that was being tried, then die as before.

static FATAL_PRINTED: AtomicBool = AtomicBool::new(false);
static OLD_ACTIONS: OnceLock<Vec<(libc::c_int, libc::sigaction)>> = OnceLock::new();
const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGABRT,
    libc::SIGILL,
    libc::SIGFPE,
];

fn raw_write(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writes from a valid buffer to stderr; async-signal-safe.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

extern "C" fn on_fatal_signal(signal: libc::c_int) {
    if !FATAL_PRINTED.swap(true, Ordering::SeqCst) {
        let (ptr, len) = CURRENT.with(Cell::get);
        let target = CURRENT_TARGET.with(Cell::get);
        if !ptr.is_null() {
            raw_write(b"\nfuzz: fatal signal while target ");
            raw_write(target.as_bytes());
            raw_write(b" was trying this input (hex):\n");
            // SAFETY: CURRENT points at the input of the case running on this thread, which
            // lives until the case returns (and it has not: it is dying).
            let input = unsafe { std::slice::from_raw_parts(ptr, len) };
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut line = [0u8; 129];
            for chunk in input.chunks(64) {
                let mut n = 0;
                for b in chunk {
                    line[n] = DIGITS[usize::from(b >> 4)];
                    line[n + 1] = DIGITS[usize::from(b & 15)];
                    n += 2;
                }
                line[n] = b'\n';
                raw_write(&line[..=n]);
            }
        }
    }
    // Put back what was there (Rust's stack-overflow report, or the default) and return: the
    // fault happens again, or abort() raises again, and the process dies as it would have.
    if let Some(old) = OLD_ACTIONS.get() {
        for (s, action) in old {
            if *s == signal {
                // SAFETY: restores an action sigaction returned.
                unsafe { libc::sigaction(signal, action, std::ptr::null_mut()) };
            }
        }
    }
}

fn install_fatal_handler() {
    OLD_ACTIONS.get_or_init(|| {
        let mut old = Vec::new();
        for signal in FATAL {
            // SAFETY: plain sigaction calls with zeroed, then filled, structures.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, &action, &mut previous) == 0 {
                    old.push((signal, previous));
                }
            }
        }
        old
    });
}

fn install_panic_hook() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(Cell::get) {
                LAST_PANIC.with(|m| *m.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// One case.

/// How a case failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Panic,
    Property,
    Memory,
    Hang,
}

#[derive(Debug)]
enum CaseResult {
    Pass { outcome: Outcome, peak: usize },
    Fail { kind: Kind, message: String },
}

fn run_case(target: &Target, input: &[u8]) -> CaseResult {
    CURRENT.with(|c| c.set((input.as_ptr(), input.len())));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|l| l.set(0));
    IN_CASE.with(|c| c.set(true));
    TRACKING.with(|t| t.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.check)(input)));
    TRACKING.with(|t| t.set(false));
    IN_CASE.with(|c| c.set(false));
    CURRENT.with(|c| c.set((std::ptr::null(), 0)));
    let peak = PEAK.with(Cell::get).max(0) as usize;
    let largest = LARGEST.with(Cell::get);
    match result {
        Err(payload) => {
            let message = LAST_PANIC
                .with(|m| m.borrow_mut().take())
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            CaseResult::Fail {
                kind: Kind::Panic,
                message,
            }
        }
        Ok(Err(message)) => CaseResult::Fail {
            kind: Kind::Property,
            message,
        },
        Ok(Ok(_)) if peak > ALLOC_LIMIT || largest > ALLOC_LIMIT => CaseResult::Fail {
            kind: Kind::Memory,
            message: format!(
                "allocated {peak} bytes at once (largest single allocation {largest}); the limit is {ALLOC_LIMIT}"
            ),
        },
        Ok(Ok(outcome)) => CaseResult::Pass { outcome, peak },
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs: a small, fast, seeded generator (xorshift64*) and the mutations.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// A length that is mostly small: 1, 2, 4, ... up to `max`.
    fn small_len(&mut self, max: usize) -> usize {
        let bound = 1usize << self.below(8);
        1 + self.below(bound.min(max.max(1)))
    }
}

const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xFE, 0xFF, b'"', b'\\', b'\n', b'\r', b' ', b'{', b'}',
    b'[', b']', b',', b':', b'=', b'0', b'9', b'-', b'.', b'e', b'#', b'+', b'/',
];

fn random_bytes(rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let len = if rng.chance(4) {
        rng.below(max_len + 1)
    } else {
        rng.below(65)
    };
    (0..len).map(|_| rng.byte()).collect()
}

fn token_soup(rng: &mut Rng, dictionary: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(48) {
        if dictionary.is_empty() || rng.chance(5) {
            out.push(INTERESTING[rng.below(INTERESTING.len())]);
        } else {
            out.extend_from_slice(&dictionary[rng.below(dictionary.len())]);
        }
    }
    out.truncate(max_len);
    out
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>], dictionary: &[Vec<u8>]) {
    let len = data.len();
    let at = rng.below(len + 1);
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 if len > 0 => {
            let i = rng.below(len);
            let delta = 1 + rng.below(35) as u8;
            data[i] = if rng.chance(2) {
                data[i].wrapping_add(delta)
            } else {
                data[i].wrapping_sub(delta)
            };
        }
        3 => {
            let n = rng.small_len(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            data.splice(at..at, bytes);
        }
        4 if len > 0 => {
            let start = rng.below(len);
            let n = rng.small_len(len - start);
            data.drain(start..start + n);
        }
        5 if len > 0 => {
            let start = rng.below(len);
            let n = rng.small_len(len - start);
            let chunk = data[start..start + n].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, chunk);
        }
        6 if !pool.is_empty() => {
            let other = &pool[rng.below(pool.len())];
            if !other.is_empty() {
                let start = rng.below(other.len());
                let n = rng.small_len(other.len() - start);
                data.splice(at..at, other[start..start + n].iter().copied());
            }
        }
        7 if !pool.is_empty() => {
            // Crossover: a head of this one and a tail of another.
            let other = &pool[rng.below(pool.len())];
            let from = rng.below(other.len() + 1);
            data.truncate(at);
            data.extend_from_slice(&other[from..]);
        }
        8 | 9 if !dictionary.is_empty() => {
            let token = &dictionary[rng.below(dictionary.len())];
            if rng.chance(2) {
                data.splice(at..at, token.iter().copied());
            } else {
                let end = (at + token.len()).min(len);
                data.splice(at..end, token.iter().copied());
            }
        }
        10 => data.truncate(at),
        11 if len > 0 => {
            // Replace the run of digits nearest to a random place with an edge number.
            let i = rng.below(len);
            if let Some(start) = (i..len).find(|&j| data[j].is_ascii_digit()) {
                let end = (start..len)
                    .find(|&j| !data[j].is_ascii_digit())
                    .unwrap_or(len);
                let n = NUMBERS_FOR_MUTATION[rng.below(NUMBERS_FOR_MUTATION.len())];
                data.splice(start..end, n.bytes());
            }
        }
        _ if len > 1 => {
            let (i, j) = (rng.below(len), rng.below(len));
            data.swap(i, j);
        }
        _ => data.push(rng.byte()),
    }
}

const NUMBERS_FOR_MUTATION: &[&str] = &[
    "0",
    "1",
    "-1",
    "255",
    "256",
    "65535",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "181",
    "91",
];

/// A random node of a JSON tree, changed: numbers to edge numbers or other types, array
/// elements removed, duplicated or swapped, object members removed, renamed or copied.
fn mutate_json(rng: &mut Rng, value: &mut serde_json::Value, words: &[String], depth: usize) {
    use serde_json::Value;
    let descend = depth < 12 && rng.below(3) != 0;
    match value {
        Value::Array(items) if !items.is_empty() && descend => {
            let i = rng.below(items.len());
            mutate_json(rng, &mut items[i], words, depth + 1);
        }
        Value::Object(map) if !map.is_empty() && descend => {
            let i = rng.below(map.len());
            if let Some((_, v)) = map.iter_mut().nth(i) {
                mutate_json(rng, v, words, depth + 1);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            match rng.below(4) {
                0 => {
                    items.remove(i);
                }
                1 => {
                    let copy = items[i].clone();
                    items.insert(rng.below(items.len() + 1), copy);
                }
                2 => {
                    let j = rng.below(items.len());
                    items.swap(i, j);
                }
                _ => *value = Value::Array(vec![value.clone()]),
            }
        }
        Value::Object(map) if !map.is_empty() => {
            let i = rng.below(map.len());
            let Some(key) = map.keys().nth(i).cloned() else {
                return;
            };
            match rng.below(3) {
                0 => {
                    map.remove(&key);
                }
                _ if !words.is_empty() => {
                    let word = words[rng.below(words.len())].clone();
                    let v = if rng.chance(2) {
                        map.remove(&key)
                    } else {
                        map.get(&key).cloned()
                    };
                    if let Some(v) = v {
                        map.insert(word, v);
                    }
                }
                _ => {}
            }
        }
        _ => {
            *value = match rng.below(8) {
                0 => Value::Null,
                1 => Value::Bool(rng.chance(2)),
                2 if !words.is_empty() => Value::String(words[rng.below(words.len())].clone()),
                3 => Value::String(String::new()),
                4 => Value::Array(Vec::new()),
                5 => serde_json::json!(rng.next() as i64),
                6 => serde_json::json!(f64::from_bits(rng.next()))
                    .as_f64()
                    .map_or(Value::Null, |f| serde_json::json!(f)),
                _ => {
                    let n = NUMBERS_FOR_MUTATION[rng.below(NUMBERS_FOR_MUTATION.len())];
                    serde_json::from_str(n).unwrap_or(Value::Null)
                }
            };
        }
    }
}

fn generate(rng: &mut Rng, target: &Target, pool: &[Vec<u8>], words: &[String]) -> Vec<u8> {
    let max_len = target.max_len;
    match rng.below(20) {
        0 => random_bytes(rng, max_len),
        1 | 2 => token_soup(rng, &target.dictionary, max_len),
        3..=8 if target.json => {
            let base = &pool[rng.below(pool.len())];
            match serde_json::from_slice::<serde_json::Value>(base) {
                Ok(mut tree) => {
                    for _ in 0..1usize << rng.below(3) {
                        mutate_json(rng, &mut tree, words, 0);
                    }
                    let mut data = serde_json::to_vec(&tree).unwrap_or_default();
                    data.truncate(max_len);
                    data
                }
                Err(_) => base.clone(),
            }
        }
        _ => {
            let mut data = pool[rng.below(pool.len())].clone();
            for _ in 0..1usize << rng.below(4) {
                mutate_once(rng, &mut data, pool, &target.dictionary);
            }
            data.truncate(max_len);
            data
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shrinking: drop chunks, halving their size, while the case still fails the same way.

fn shrink(target: &Target, input: &[u8], kind: Kind, shared: &Shared) -> Vec<u8> {
    let started = Instant::now();
    let mut best = input.to_vec();
    let mut chunk = (best.len() / 2).max(1);
    let mut tries = 0;
    let still_fails = |candidate: &[u8]| {
        shared.set_current(candidate);
        let result = run_case(target, candidate);
        shared.progress.fetch_add(1, Ordering::Relaxed);
        matches!(result, CaseResult::Fail { kind: k, .. } if k == kind)
    };
    while tries < 20_000 && started.elapsed() < Duration::from_secs(20) {
        let mut shrunk = false;
        let mut i = 0;
        while i < best.len() && tries < 20_000 {
            let end = (i + chunk).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            tries += 1;
            if still_fails(&candidate) {
                best = candidate;
                shrunk = true;
            } else {
                i += chunk;
            }
        }
        if !shrunk {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------
// The loop.

/// What a run did.
#[derive(Debug)]
struct Stats {
    inputs: u64,
    accepted: u64,
    labels: usize,
    pool: usize,
    peak: usize,
    seconds: f64,
}

/// How a run failed.
#[derive(Debug)]
struct Report {
    kind: Kind,
    message: String,
    input: Vec<u8>,
    shrunk: Vec<u8>,
}

/// What the worker and the watchdog share.
struct Shared {
    progress: AtomicU64,
    current: Mutex<Vec<u8>>,
    /// Set when the watchdog gave up on the worker: should its case ever return, it stops.
    stop: AtomicBool,
}

impl Shared {
    fn set_current(&self, input: &[u8]) {
        if let Ok(mut current) = self.current.lock() {
            current.clear();
            current.extend_from_slice(input);
        }
    }
}

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

fn hex(bytes: &[u8]) -> String {
    outpost::signing::to_hex(bytes)
}

/// Runs `target` until `budget` is spent or a case fails; a case that runs longer than
/// `case_limit` is a hang.
fn run(target: Target, seed: u64, budget: Duration, case_limit: Duration) -> Result<Stats, Report> {
    install_panic_hook();
    install_fatal_handler();
    let shared = Arc::new(Shared {
        progress: AtomicU64::new(0),
        current: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let name = target.name;
    let worker_shared = shared.clone();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{name}"))
        .stack_size(STACK)
        .spawn(move || fuzz_loop(target, seed, budget, &worker_shared))
        .expect("spawn the fuzzing thread");
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let progress = shared.progress.load(Ordering::Relaxed);
        if progress != last.0 {
            last = (progress, Instant::now());
        } else if last.1.elapsed() > case_limit {
            let input = shared.current.lock().map(|c| c.clone()).unwrap_or_default();
            // The worker is stuck in the case; it is left behind (the process ends after the
            // tests), and stops if the case ever returns.
            shared.stop.store(true, Ordering::Relaxed);
            return Err(Report {
                kind: Kind::Hang,
                message: format!("one input ran for more than {case_limit:?}"),
                shrunk: input.clone(),
                input,
            });
        }
    }
    match worker.join() {
        Ok(result) => result,
        Err(_) => Err(Report {
            kind: Kind::Panic,
            message: "the fuzzing thread itself panicked".into(),
            input: Vec::new(),
            shrunk: Vec::new(),
        }),
    }
}

fn fuzz_loop(
    target: Target,
    seed: u64,
    budget: Duration,
    shared: &Shared,
) -> Result<Stats, Report> {
    CURRENT_TARGET.with(|t| t.set(target.name));
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut stats = Stats {
        inputs: 0,
        accepted: 0,
        labels: 0,
        pool: 0,
        peak: 0,
        seconds: 0.0,
    };
    let mut labels = HashSet::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let fail = |input: &[u8], kind: Kind, message: String| {
        let shrunk = shrink(&target, input, kind, shared);
        Report {
            kind,
            message,
            input: input.to_vec(),
            shrunk,
        }
    };
    // The corpus first: each seed must pass and be accepted (else the corpus is not what the
    // structure-aware half of the inputs is made from).
    for seed_input in &target.seeds {
        shared.set_current(seed_input);
        match run_case(&target, seed_input) {
            CaseResult::Pass { outcome, peak } => {
                if !outcome.accepted {
                    return Err(Report {
                        kind: Kind::Property,
                        message: format!("a corpus input is refused: {}", outcome.label),
                        input: seed_input.to_vec(),
                        shrunk: seed_input.to_vec(),
                    });
                }
                stats.peak = stats.peak.max(peak);
                labels.insert(outcome.label);
            }
            CaseResult::Fail { kind, message } => return Err(fail(seed_input, kind, message)),
        }
        shared.progress.fetch_add(1, Ordering::Relaxed);
        stats.inputs += 1;
        stats.accepted += 1;
        pool.push(seed_input.to_vec());
    }
    for near_miss in &target.near_misses {
        shared.set_current(near_miss);
        match run_case(&target, near_miss) {
            CaseResult::Pass { outcome, .. } => {
                labels.insert(outcome.label);
            }
            CaseResult::Fail { kind, message } => return Err(fail(near_miss, kind, message)),
        }
        shared.progress.fetch_add(1, Ordering::Relaxed);
        stats.inputs += 1;
        pool.push(near_miss.to_vec());
    }
    let seeds = pool.len();
    // The dictionary's names, for JSON mutations.
    let words: Vec<String> = target
        .dictionary
        .iter()
        .filter_map(|w| std::str::from_utf8(w).ok())
        .filter_map(|w| w.strip_prefix('"')?.strip_suffix('"'))
        .map(str::to_string)
        .collect();
    const POOL_MAX: usize = 512;
    while started.elapsed() < budget && !shared.stop.load(Ordering::Relaxed) {
        let input = generate(&mut rng, &target, &pool, &words);
        shared.set_current(&input);
        let result = run_case(&target, &input);
        shared.progress.fetch_add(1, Ordering::Relaxed);
        stats.inputs += 1;
        match result {
            CaseResult::Fail { kind, message } => return Err(fail(&input, kind, message)),
            CaseResult::Pass { outcome, peak } => {
                stats.peak = stats.peak.max(peak);
                stats.accepted += u64::from(outcome.accepted);
                if labels.insert(outcome.label) {
                    // Somewhere new: keep it to mutate further.
                    if pool.len() < POOL_MAX {
                        pool.push(input);
                    } else {
                        let i = seeds + rng.below(POOL_MAX - seeds);
                        pool[i] = input;
                    }
                }
            }
        }
    }
    stats.labels = labels.len();
    stats.pool = pool.len();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

fn seed() -> u64 {
    std::env::var("OUTPOST_FUZZ_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
        })
}

/// A one-line message on the real stderr, also when the test harness captures output.
fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// The test of one target: fuzz it for the budget; on a failure, print everything needed to
/// turn the input into a regression test, and fail.
fn fuzz(name: &str) {
    let target = targets::by_name(name).expect("a known target");
    let seed = seed()
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let budget = env_secs("OUTPOST_FUZZ_SECS", 2.0);
    let case_limit = env_secs("OUTPOST_FUZZ_CASE_SECS", 30.0);
    match run(target, seed, budget, case_limit) {
        Ok(s) => say(&format!(
            "fuzz {name}: {} inputs in {:.1} s ({:.0}/s), {} accepted, {} kinds of answer, pool {}, peak {} KiB per input (seed {seed:#x})",
            s.inputs,
            s.seconds,
            s.inputs as f64 / s.seconds.max(1e-9),
            s.accepted,
            s.labels,
            s.pool,
            s.peak / 1024,
        )),
        Err(r) => {
            let text = format!(
                "fuzz {name} FAILED ({:?}, seed {seed:#x}): {}\n  input ({} bytes): {}\n  shrunk ({} bytes): {}\n  as Rust: b\"{}\"",
                r.kind,
                r.message,
                r.input.len(),
                hex(&r.input),
                r.shrunk.len(),
                hex(&r.shrunk),
                r.shrunk.escape_ascii(),
            );
            say(&text);
            panic!("{text}");
        }
    }
}

#[test]
fn fuzz_frames() {
    fuzz("frames");
}

#[test]
fn fuzz_config() {
    fuzz("config");
}

#[test]
fn fuzz_geojson() {
    fuzz("geojson");
}

#[test]
fn fuzz_envelope() {
    fuzz("envelope");
}

#[test]
fn fuzz_command() {
    fuzz("command");
}

#[test]
fn fuzz_keys() {
    fuzz("keys");
}

#[test]
fn fuzz_control_request() {
    fuzz("control_request");
}

#[test]
fn fuzz_control_reply() {
    fuzz("control_reply");
}

#[test]
fn fuzz_uplink_packets() {
    fuzz("uplink_packets");
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
    let source = include_str!("fuzz.rs");
    for name in names {
        assert!(
            source.contains(&format!("fn fuzz_{name}()")),
            "no test for the fuzz target {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzzer itself can fail: planted bugs are found, shrunk and reported by kind.

fn planted(check: targets::Check) -> Target {
    Target {
        name: "planted",
        max_len: 256,
        seeds: vec![b"hello, world".to_vec(), b"{\"a\": [1, 2]}".to_vec()],
        near_misses: Vec::new(),
        dictionary: vec![b"A".to_vec(), b"B".to_vec(), b"Z".to_vec(), b"P".to_vec()],
        json: false,
        check,
        fixture: None,
    }
}

fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

fn pass() -> Result<Outcome, String> {
    Ok(Outcome {
        accepted: true,
        label: String::new(),
    })
}

/// Runs a planted bug until it is found (at most a minute).
fn find(check: targets::Check, case_limit: Duration) -> Report {
    match run(planted(check), 7, Duration::from_secs(60), case_limit) {
        Ok(stats) => panic!("the planted bug was not found in {} inputs", stats.inputs),
        Err(report) => report,
    }
}

#[test]
fn the_fuzzer_finds_and_shrinks_a_panic() {
    let report = find(
        Box::new(|data| {
            assert!(!contains(data, b"BB"), "planted");
            pass()
        }),
        Duration::from_secs(30),
    );
    assert_eq!(report.kind, Kind::Panic, "{report:?}");
    assert!(report.message.contains("planted"), "{report:?}");
    assert_eq!(report.shrunk, b"BB");
}

#[test]
fn the_fuzzer_finds_a_broken_property() {
    let report = find(
        Box::new(|data| {
            if data.first() == Some(&b'P') {
                Err("starts with P".into())
            } else {
                pass()
            }
        }),
        Duration::from_secs(30),
    );
    assert_eq!(report.kind, Kind::Property, "{report:?}");
    assert_eq!(report.shrunk, b"P");
}

#[test]
fn the_fuzzer_finds_an_unbounded_allocation() {
    let report = find(
        Box::new(|data| {
            if contains(data, b"AA") {
                let big = vec![0u8; ALLOC_LIMIT + 1];
                std::hint::black_box(&big);
            }
            pass()
        }),
        Duration::from_secs(30),
    );
    assert_eq!(report.kind, Kind::Memory, "{report:?}");
    assert_eq!(report.shrunk, b"AA");
}

#[test]
fn the_fuzzer_finds_a_hang() {
    static RELEASE: AtomicBool = AtomicBool::new(false);
    let report = find(
        Box::new(|data| {
            if contains(data, b"ZZ") {
                while !RELEASE.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            pass()
        }),
        Duration::from_secs(2),
    );
    RELEASE.store(true, Ordering::Relaxed);
    assert_eq!(report.kind, Kind::Hang, "{report:?}");
    assert!(contains(&report.input, b"ZZ"), "{report:?}");
}

// ---------------------------------------------------------------------------------------------
// For libFuzzer (scripts/fuzz-nightly.sh): the same corpus and dictionary.

/// A dictionary entry in libFuzzer's format: `"..."` with `\\`, `\"` and `\xNN` escapes.
fn dictionary_entry(token: &[u8]) -> String {
    let mut out = String::from("\"");
    for &b in token {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7E => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
    out.push('"');
    out
}

/// Writes, under `$OUTPOST_FUZZ_CORPUS`, each target's corpus (`<target>/seed-N`), its
/// dictionary (`<target>.dict`) and its longest input (`<target>.max_len`).
#[test]
#[ignore = "run by scripts/fuzz-nightly.sh"]
fn write_libfuzzer_corpus() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("OUTPOST_FUZZ_CORPUS").expect("OUTPOST_FUZZ_CORPUS names a directory"),
    );
    for target in targets::all() {
        let corpus = dir.join(target.name);
        std::fs::create_dir_all(&corpus).unwrap();
        for (i, input) in target.seeds.iter().chain(&target.near_misses).enumerate() {
            std::fs::write(corpus.join(format!("seed-{i}")), input).unwrap();
        }
        let dict: Vec<String> = target
            .dictionary
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| dictionary_entry(t))
            .collect();
        std::fs::write(
            dir.join(format!("{}.dict", target.name)),
            dict.join("\n") + "\n",
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{}.max_len", target.name)),
            target.max_len.to_string(),
        )
        .unwrap();
    }
}
