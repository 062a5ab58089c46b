//! Handler runtime benchmarks (issue 4): what running an event through a WebAssembly handler
//! costs, next to the same logic in native Rust.
//!
//! - `per_event/*`: the `passthrough` guest (every event back as an output, unchanged) with
//!   batches of 1, 10 and 100 events, reported per event (criterion's element throughput),
//!   against `native`, which clones topic and payload into an output `Vec` in Rust. Each
//!   invocation is a fresh instance, as in the gateway, so small batches carry the
//!   instantiation cost. `passthrough-no-fuel` is the same with fuel metering off.
//! - `instantiate/*`: an invocation with an empty batch: a fresh instance and one `handle`
//!   call that does nothing, the fixed cost of every invocation.
//! - `compile/*`: cold [`Runtime::load`] (Cranelift compiles the component, then the world
//!   check) of each example module and of the test guests.
//! - `load_precompiled/*`: [`Runtime::load_precompiled`] of the same modules' artifacts: what
//!   a restart costs once artifacts are stored.
//!
//! Run: `cargo bench --bench handlers` (about two minutes). Figures are in `BENCHMARKS.md`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use outpost::event::{Event, Output};
use outpost::handlers::examples;
use outpost::handlers::runtime::{Handler, KvBackend, Runtime, RuntimeConfig};

/// Handler state in memory: the benchmarks measure the runtime, not SQLite.
#[derive(Default)]
struct MemoryKv(Mutex<HashMap<(String, String), Vec<u8>>>);

impl KvBackend for MemoryKv {
    fn get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let map = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        Ok(map.get(&(module.to_string(), key.to_string())).cloned())
    }

    fn set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let mut map = self.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        map.insert((module.to_string(), key.to_string()), value.to_vec());
        Ok(())
    }
}

/// A runtime with the gateway's default limits (fuel metering on unless `meter_fuel` is off).
fn runtime(meter_fuel: bool) -> Runtime {
    let config = RuntimeConfig {
        meter_fuel,
        ..RuntimeConfig::default()
    };
    Runtime::new(config, Arc::new(MemoryKv::default())).expect("runtime")
}

/// The WebAssembly of the guest `name`, as built by `build.rs`.
fn wasm(name: &str) -> Vec<u8> {
    std::fs::read(examples::guest_path(name)).expect("guest built by build.rs")
}

/// A typical telemetry event: a JSON payload of about 60 bytes.
fn event(id: u64) -> Event {
    let device = format!("dev-{}", id % 16);
    Event {
        id,
        topic: format!("telemetry/{device}/env"),
        payload: format!(r#"{{"temp_c":{}.5,"hum":40,"seq":{id}}}"#, 20 + id % 10).into_bytes(),
        device: device.clone(),
        client_id: device,
        received_ms: 1_700_000_000_000 + id,
        location: None,
        regions: vec![],
    }
}

/// What `passthrough` does, in Rust.
fn native_passthrough(batch: &[Event]) -> Vec<Output> {
    batch
        .iter()
        .map(|event| Output {
            topic: event.topic.clone(),
            payload: event.payload.clone(),
        })
        .collect()
}

fn per_event(c: &mut Criterion) {
    let metered = runtime(true);
    let unmetered = runtime(false);
    let passthrough = metered.load("passthrough", &wasm("passthrough")).unwrap();
    let passthrough_no_fuel = unmetered.load("passthrough", &wasm("passthrough")).unwrap();
    let mut group = c.benchmark_group("per_event");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for size in [1u64, 10, 100] {
        let batch: Vec<Event> = (0..size).map(event).collect();
        assert_eq!(
            passthrough.invoke(&batch).unwrap(),
            native_passthrough(&batch)
        );
        group.throughput(Throughput::Elements(size));
        group.bench_function(format!("passthrough/{size}"), |b| {
            b.iter(|| passthrough.invoke(black_box(&batch)).unwrap())
        });
        group.bench_function(format!("native/{size}"), |b| {
            b.iter(|| native_passthrough(black_box(&batch)))
        });
        if size == 100 {
            group.bench_function(format!("passthrough-no-fuel/{size}"), |b| {
                b.iter(|| passthrough_no_fuel.invoke(black_box(&batch)).unwrap())
            });
        }
    }
    group.finish();
}

fn instantiate(c: &mut Criterion) {
    let runtime = runtime(true);
    let mut group = c.benchmark_group("instantiate");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for name in ["passthrough", "enrich"] {
        let handler: Handler = runtime.load(name, &wasm(name)).unwrap();
        assert_eq!(handler.invoke(&[]).unwrap(), vec![]);
        group.bench_function(name, |b| b.iter(|| handler.invoke(black_box(&[])).unwrap()));
    }
    group.finish();
}

/// The modules whose load times are measured.
const MODULES: [&str; 4] = ["enrich", "threshold", "faulty", "passthrough"];

fn compile(c: &mut Criterion) {
    let runtime = runtime(true);
    let mut group = c.benchmark_group("compile");
    // Tens of milliseconds each: ten flat samples of one or two loads are enough.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3));
    for name in MODULES {
        let wasm = wasm(name);
        group.throughput(Throughput::Bytes(wasm.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| runtime.load(name, black_box(&wasm)).unwrap())
        });
    }
    group.finish();
}

fn load_precompiled(c: &mut Criterion) {
    let runtime = runtime(true);
    let mut group = c.benchmark_group("load_precompiled");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    for name in MODULES {
        let artifact = runtime.precompile(name, &wasm(name)).unwrap();
        group.throughput(Throughput::Bytes(artifact.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                // SAFETY: the artifact was made just above by `Runtime::precompile` of this
                // runtime, from the guests built by build.rs, and never left memory.
                unsafe { runtime.load_precompiled(name, black_box(&artifact)) }.unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, per_event, instantiate, compile, load_precompiled);
criterion_main!(benches);
