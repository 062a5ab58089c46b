//! The WebAssembly handler runtime: one wasmtime engine, handlers loaded from components that
//! implement the `outpost:handler/handler` world (`modules/wit/handler.wit`), and the host
//! interface given to them.
//!
//! A [`Runtime`] owns the engine, the linker with the host interface, and a ticker thread that
//! drives the invocation deadlines. [`Runtime::load`] compiles a component and checks it
//! against the world once, giving a [`Handler`]. [`Handler::invoke`] runs one batch in a fresh
//! instance with its own store, so nothing survives an invocation except what the handler
//! wrote to the key-value store ([`KvBackend`]).
//!
//! Invariant 4 of ARCHITECTURE.md ("a handler cannot hurt the gateway") is kept here:
//!
//! - **time**: every invocation has a deadline, enforced by epoch interruption; running past
//!   it is [`HandlerFailure::Timeout`];
//! - **memory**: the linear memories of one invocation are capped together
//!   ([`RuntimeConfig::memory_limit_bytes`]); going past the cap is
//!   [`HandlerFailure::OutOfMemory`], and the engine's address-space reservations are sized
//!   for a 512 MiB board;
//! - **outputs**: their number and total payload size are capped; going past either is
//!   [`HandlerFailure::OutputLimit`]. What the host copies out of the guest is bounded too
//!   (wasmtime's *hostcall fuel*, set per invocation from the limits), so a guest cannot make
//!   the host allocate more than a small multiple of its own memory cap, even by returning
//!   many outputs that share one buffer;
//! - **concurrency**: at most [`RuntimeConfig::max_concurrent`] invocations run at once, and
//!   at most [`RuntimeConfig::max_concurrent_per_module`] of one module; an invocation beyond
//!   either limit *waits* for a slot (in arrival order) rather than failing, and its deadline
//!   starts only when it gets one;
//! - **per route**: a route may give its handler its own [`InvokeLimits`] (deadline, a lower
//!   memory cap, output caps) through [`Handler::invoke_limited`];
//! - **host interface**: log lines are cut to 4 KiB (and at most 1 000 lines an invocation are
//!   kept); key-value keys over 1 KiB, values over 1 MiB and more than 8 MiB of writes in one
//!   invocation trap the guest ([`HandlerFailure::Trap`], naming the limit);
//! - **reach**: the only capabilities are the host interface (log, per-module key-value
//!   state, clock) and a locked-down WASI: no files, no environment, no arguments, no
//!   sockets, no stdin; stdout is discarded and the start of stderr is kept only to explain a
//!   trap.
//!
//! Key-value writes are buffered and applied only when an invocation succeeds, so a failed
//! invocation can be retried from the same state.
//!
//! **Cost.** Every invocation is metered in wasmtime *fuel* (about one unit per WebAssembly
//! instruction, plus the copying of arguments and results), reported in
//! [`Invocation::fuel`] and summed in [`Handler::total_fuel`]. Fuel is only a measure: the
//! budget is so large that it never runs out before the deadline does.
//!
//! **Start-up costs.** Loading compiles the component (or loads a precompiled artifact) and
//! pre-links it once ([`Handler::load_time`], [`Handler::compiled`]); each invocation then
//! only instantiates the pre-linked component (the *warm start*, [`Invocation::instantiate`]).
//!
//! **Precompiled artifacts.** [`Runtime::precompile`] (or [`Handler::artifact`]) turns a
//! module into native code that [`Runtime::load_precompiled`] loads without compiling again,
//! as long as the artifact was made by a runtime with the same [`Runtime::artifact_key`]
//! (wasmtime version and engine configuration).
//!
//! What this module does not do: retry, or keep dead letters; it does not store artifacts
//! (the caller does, keyed by [`Runtime::artifact_key`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::event::{Event, Output};

/// Host-side bindings for the `handler` world, generated from `modules/wit`.
mod bindings {
    wasmtime::component::bindgen!({
        path: "modules/wit",
        world: "handler",
        // Every host function may trap: a key-value backend failure must stop the guest.
        imports: { default: trappable },
    });
}

use bindings::outpost::handler::{host, types};

/// How often the ticker thread advances the engine's epoch: the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Largest table (in elements) an instance may have. Rust guests use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Log messages longer than this are cut (at a character boundary).
const MAX_LOG_MESSAGE_BYTES: usize = 4 * 1024;

/// Log lines one invocation may write; further lines are dropped (and that is logged once).
const MAX_LOG_LINES: usize = 1_000;

/// Error and trap messages kept in a [`HandlerFailure`] are cut to this length, so a
/// dead-letter reason stays small.
const MAX_REASON_BYTES: usize = 4 * 1024;

/// How much of the guest's stderr is kept to explain a trap (a Rust panic message).
const STDERR_CAPTURE_BYTES: usize = 2 * 1024;

/// Longest key-value key a handler may use.
const MAX_KV_KEY_BYTES: usize = 1024;

/// Largest key-value value a handler may write.
const MAX_KV_VALUE_BYTES: usize = 1024 * 1024;

/// Largest total (keys plus values) of the key-value writes one invocation may buffer.
const MAX_KV_PENDING_BYTES: usize = 8 * 1024 * 1024;

/// Largest address-space reservation made up front for one linear memory.
const MAX_MEMORY_RESERVATION: u64 = 64 * 1024 * 1024;

/// WebAssembly page size; reservations are whole pages.
const WASM_PAGE: u64 = 64 * 1024;

/// Fuel given to every invocation. Fuel measures cost, it does not limit anything (the epoch
/// deadline does): at a billion units a second this lasts for centuries.
const FUEL_BUDGET: u64 = u64::MAX;

/// The wasmtime version this crate is built with (`Cargo.lock`; a unit test keeps the two
/// equal). It is the readable part of [`Runtime::artifact_key`]; the hashed part covers it
/// too.
const WASMTIME_VERSION: &str = "48.0.8";

/// First bytes of a precompiled artifact made by [`Handler::artifact`].
const ARTIFACT_MAGIC: &[u8] = b"outpost-artifact";

/// Layout version of the artifact envelope (see [`Handler::artifact`]).
const ARTIFACT_FORMAT: u8 = 1;

/// Limits applied to every invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Wall-clock time one invocation (instantiation plus the `handle` call) may take. It is
    /// enforced with a granularity of 10 ms: an invocation is stopped no earlier than this and
    /// at most about 20 ms later. Default: 1 s.
    pub deadline: Duration,
    /// Bytes of linear memory all the memories of one invocation may have together. Default:
    /// 32 MiB.
    pub memory_limit_bytes: usize,
    /// Outputs one invocation may return. Default: 10 000.
    pub max_outputs: usize,
    /// Total payload bytes of the outputs of one invocation. Default: 8 MiB.
    pub max_output_bytes: usize,
    /// Invocations, of all handlers together, that may run at once. Each may hold up to
    /// [`RuntimeConfig::memory_limit_bytes`] of memory, so this also bounds the memory the
    /// handlers use together. One more invocation *waits* (blocking its thread, in arrival
    /// order) until one finishes; it does not fail, and its deadline starts only when it
    /// runs. 0 is taken as 1. Default: the number of CPUs.
    pub max_concurrent: usize,
    /// Invocations of one module (all handlers loaded under the same name, whatever their
    /// version) that may run at once; beyond it invocations wait, as for
    /// [`RuntimeConfig::max_concurrent`], so a module that loops until its deadline holds
    /// at most this many of the slots and the other modules keep theirs. 0 is taken as 1.
    /// Default: 1.
    pub max_concurrent_per_module: usize,
    /// Whether invocations are metered in fuel ([`Invocation::fuel`]). Metering makes guest
    /// code slower by a few percent to a few tens of percent (instrumented loops and calls);
    /// turning it off makes [`Invocation::fuel`] `None`. Default: on.
    pub meter_fuel: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            deadline: Duration::from_secs(1),
            memory_limit_bytes: 32 * 1024 * 1024,
            max_outputs: 10_000,
            max_output_bytes: 8 * 1024 * 1024,
            max_concurrent: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_concurrent_per_module: 1,
            meter_fuel: true,
        }
    }
}

/// The limits of one invocation, which a route may choose for its handler
/// ([`Handler::invoke_limited`]). [`Runtime::default_limits`] (or [`Handler::default_limits`])
/// gives the runtime's own, from its [`RuntimeConfig`]; a route changes the fields it sets.
///
/// The runtime accepts any values, with one clamp: the memory cap can only be *lowered*
/// (see [`InvokeLimits::memory_limit_bytes`]). [`Runtime::effective_limits`] says what an
/// invocation will actually get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvokeLimits {
    /// Wall-clock time the invocation may run once it has its concurrency slot (instantiation
    /// plus the `handle` call); running past it is [`HandlerFailure::Timeout`]. Enforced with
    /// a granularity of 10 ms: never earlier than this, at most about 20 ms later. Any value
    /// is accepted: `Duration::ZERO` stops the guest at the first or second tick, and
    /// deadlines of centuries mean none. (The gateway's configuration keeps deadlines between
    /// 1 ms and 10 minutes.)
    pub deadline: Duration,
    /// Bytes all the linear memories of the invocation may have together; needing more is
    /// [`HandlerFailure::OutOfMemory`]. Clamped to [`RuntimeConfig::memory_limit_bytes`]: the
    /// engine's address-space reservations, and the memory the concurrent invocations may use
    /// together, are sized from the runtime's cap, so a route may only lower it. A cap below
    /// what the module needs to start (its initial memory, about 1 MiB for a Rust guest)
    /// fails every invocation as out-of-memory.
    pub memory_limit_bytes: usize,
    /// Outputs the invocation may return; more is [`HandlerFailure::OutputLimit`] (checked
    /// once the outputs are copied out of the guest, before any is returned or any key-value
    /// write applied). Any value; 0 allows none.
    pub max_outputs: usize,
    /// Total payload bytes of the outputs; more is [`HandlerFailure::OutputLimit`]. Any value;
    /// 0 allows only empty payloads.
    pub max_output_bytes: usize,
}

impl InvokeLimits {
    /// These limits as [`Handler::invoke_limited`] applies them under `config`: the memory
    /// cap lowered to the runtime's, everything else unchanged.
    fn clamped(&self, config: &RuntimeConfig) -> InvokeLimits {
        InvokeLimits {
            memory_limit_bytes: self.memory_limit_bytes.min(config.memory_limit_bytes),
            ..*self
        }
    }

    /// Bytes wasmtime may copy out of the guest in one crossing (hostcall fuel): an import's
    /// arguments (a string and a list at most, each within the guest's memory) or the
    /// `handle` call's results (the outputs, whose host form is larger than the guest's).
    /// Twice the memory cap covers every import, so running out can only mean results
    /// beyond the output caps (outputs sharing one buffer, each copied anew).
    fn hostcall_fuel(&self) -> usize {
        self.memory_limit_bytes
            .saturating_mul(2)
            .saturating_add(self.max_output_bytes)
            .saturating_add(
                self.max_outputs
                    .saturating_mul(std::mem::size_of::<types::Output>()),
            )
    }
}

/// Where handlers' persistent key-value state lives (in the gateway, the `kv` table of the
/// store). Each module has its own key space: the runtime always passes the name the handler
/// was loaded under as `module`, so one handler can never read or write another's keys.
pub trait KvBackend: Send + Sync + 'static {
    /// The value stored under `key` for `module`, if any.
    fn get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Stores `value` under `key` for `module`, replacing any previous value.
    fn set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()>;
}

/// Why a [`Runtime`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime rejected the engine configuration (for example, an unsupported host).
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),
    /// The host interface or WASI could not be added to the linker.
    #[error("cannot link the handler host interface: {0}")]
    Linker(String),
    /// The thread that drives invocation deadlines could not be started.
    #[error("cannot start the deadline ticker thread: {0}")]
    Ticker(String),
}

/// Why [`Runtime::load`] refused a module. Each message names the module and says what is
/// wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("module `{name}` is not WebAssembly (it does not start with the `\\0asm` magic)")]
    NotWasm {
        /// The name the module was loaded under.
        name: String,
    },
    /// The bytes are a core WebAssembly module; handlers must be components.
    #[error(
        "module `{name}` is a core WebAssembly module, not a component: build it for \
         wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
    )]
    NotComponent {
        /// The name the module was loaded under.
        name: String,
    },
    /// The component is malformed or uses features this engine does not support.
    #[error("module `{name}` is not a valid component: {reason}")]
    Invalid {
        /// The name the module was loaded under.
        name: String,
        /// wasmtime's explanation.
        reason: String,
    },
    /// The component is valid but does not fit the `outpost:handler/handler` world: an import
    /// the gateway does not provide, or a missing or mistyped `handle` export.
    #[error(
        "module `{name}` does not implement the outpost:handler/handler@0.1.0 world: {reason}"
    )]
    WrongWorld {
        /// The name the module was loaded under.
        name: String,
        /// What does not match.
        reason: String,
    },
    /// A precompiled artifact was refused: made by another wasmtime version or engine
    /// configuration (another [`Runtime::artifact_key`]), damaged, or not an artifact. The
    /// module must be compiled again from its WebAssembly.
    #[error("precompiled artifact of module `{name}` refused: {reason}")]
    Artifact {
        /// The name the module was loaded under.
        name: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Why an invocation produced no outputs. Every variant is an ordinary, per-invocation
/// failure: the gateway and the other handlers are unaffected, and the caller may retry.
#[derive(Debug, thiserror::Error)]
pub enum HandlerFailure {
    /// The guest trapped (a Rust panic, `unreachable`, an out-of-bounds access, misuse of the
    /// host interface...). The message says which trap, followed by the start of the guest's
    /// stderr when it wrote any (where a Rust panic message goes).
    #[error("handler trapped: {0}")]
    Trap(String),
    /// The invocation ran past [`RuntimeConfig::deadline`] and was stopped.
    #[error("handler exceeded its deadline")]
    Timeout,
    /// The guest needed more memory than [`RuntimeConfig::memory_limit_bytes`].
    #[error("handler exceeded its memory limit")]
    OutOfMemory,
    /// The handler returned an error for the batch; the message is the handler's.
    #[error("handler returned an error: {0}")]
    Error(String),
    /// The handler returned more outputs, or more payload bytes, than allowed.
    #[error("handler exceeded the output limit: {0}")]
    OutputLimit(String),
    /// The gateway failed while serving the handler (the key-value backend, most likely).
    /// The handler itself may be fine.
    #[error("host failure during handler invocation: {0}")]
    Host(String),
}

impl HandlerFailure {
    /// A short, stable name for the kind of failure, for metrics labels and dead-letter
    /// reasons: `trap`, `timeout`, `out-of-memory`, `handler-error`, `output-limit` or
    /// `host-error`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandlerFailure::Trap(_) => "trap",
            HandlerFailure::Timeout => "timeout",
            HandlerFailure::OutOfMemory => "out-of-memory",
            HandlerFailure::Error(_) => "handler-error",
            HandlerFailure::OutputLimit(_) => "output-limit",
            HandlerFailure::Host(_) => "host-error",
        }
    }
}

/// The handler runtime: a wasmtime engine configured for small boards, the host interface,
/// the ticker that enforces deadlines, and the concurrency limits.
///
/// Cloning is cheap and every clone shares the same engine and limits. The ticker thread
/// stops when the last clone of the `Runtime`, and the last [`Handler`] loaded from it, are
/// dropped.
#[derive(Clone)]
pub struct Runtime {
    /// Everything the clones and the handlers share.
    shared: Arc<Shared>,
}

/// The state shared by a [`Runtime`], its clones and its [`Handler`]s.
struct Shared {
    /// The engine every handler is compiled for.
    engine: Engine,
    /// WASI plus the `outpost:handler/host` interface.
    linker: Linker<State>,
    /// The limits applied to every invocation.
    config: RuntimeConfig,
    /// Handlers' persistent state.
    kv: Arc<dyn KvBackend>,
    /// [`RuntimeConfig::max_concurrent`] slots, for all invocations.
    slots: Slots,
    /// [`RuntimeConfig::max_concurrent_per_module`] slots of each module name loaded so far.
    module_slots: Mutex<HashMap<String, Arc<Slots>>>,
    /// Invocations waiting for a slot (of their module or the overall one).
    waiting: AtomicUsize,
    /// See [`Runtime::artifact_key`].
    artifact_key: String,
    /// Advances the engine's epoch; stops when this is dropped.
    _ticker: Ticker,
}

impl Runtime {
    /// Creates the engine, links the host interface and starts the deadline ticker.
    ///
    /// The engine does not reserve wasmtime's default 4 GiB of address space (plus 2 GiB of
    /// guards) per linear memory, which fails on small boards: each memory reserves its cap
    /// (at most 64 MiB) and 64 KiB guards.
    pub fn new(config: RuntimeConfig, kv: Arc<dyn KvBackend>) -> Result<Runtime, RuntimeError> {
        let engine = Engine::new(&engine_config(&config))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| RuntimeError::Linker(format!("WASI: {e:#}")))?;
        bindings::Handler::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Linker(format!("outpost:handler/host: {e:#}")))?;
        let artifact_key = artifact_key(&engine);
        let ticker =
            Ticker::start(engine.clone()).map_err(|e| RuntimeError::Ticker(e.to_string()))?;
        Ok(Runtime {
            shared: Arc::new(Shared {
                engine,
                linker,
                slots: Slots::new(config.max_concurrent),
                module_slots: Mutex::new(HashMap::new()),
                waiting: AtomicUsize::new(0),
                artifact_key,
                config,
                kv,
                _ticker: ticker,
            }),
        })
    }

    /// Compiles `wasm` and checks it against the `handler` world: every import it needs must
    /// be provided by the gateway and it must export `handle` with the right type. Nothing of
    /// the module runs here. `name` is the module's identity: it scopes its key-value state
    /// and concurrency limit, and tags its log lines.
    ///
    /// This is CPU-heavy (Cranelift compiles the whole component); call it off the async
    /// executor.
    pub fn load(&self, name: &str, wasm: &[u8]) -> Result<Handler, LoadError> {
        let started = Instant::now();
        let name_owned = || name.to_string();
        match wasm {
            [0, b'a', b's', b'm', _, _, 0, 0, ..] => {
                return Err(LoadError::NotComponent { name: name_owned() })
            }
            [0, b'a', b's', b'm', ..] => {}
            _ => return Err(LoadError::NotWasm { name: name_owned() }),
        }
        let component =
            Component::new(&self.shared.engine, wasm).map_err(|e| LoadError::Invalid {
                name: name_owned(),
                reason: format!("{e:#}"),
            })?;
        let digest = Sha256::digest(wasm);
        let version: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.handler(name, &component, version, Loaded::Compiled(started))
    }

    /// Compiles `wasm` as [`Runtime::load`] does (with the same checks and errors) and returns
    /// the precompiled artifact ([`Handler::artifact`]) to store, for
    /// [`Runtime::load_precompiled`] to load later without compiling again.
    pub fn precompile(&self, name: &str, wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
        self.load(name, wasm)?.artifact()
    }

    /// Loads a handler from an artifact made by [`Handler::artifact`] or
    /// [`Runtime::precompile`], without compiling: the cost is a copy of the native code and
    /// the world check. The handler's [`Handler::version`] is that of the module the artifact
    /// was compiled from.
    ///
    /// Refused ([`LoadError::Artifact`]) when the artifact was made under another
    /// [`Runtime::artifact_key`] (another wasmtime version or engine configuration: compile
    /// the module again), when its checksum does not match (damaged in storage), or when it is
    /// not an artifact at all. A component of another world is [`LoadError::WrongWorld`].
    ///
    /// # Safety
    ///
    /// The artifact is native code that is mapped executable and run. It must have been made
    /// by [`Handler::artifact`] or [`Runtime::precompile`] (of this or an earlier run of
    /// outpost, with any key) and kept where only the gateway writes, such as the gateway's
    /// own database. Artifacts of other versions or configurations and accidental damage are
    /// detected and refused; bytes crafted by someone else are not: a forged artifact whose
    /// key and checksum are consistent would run with the gateway's privileges. Never pass
    /// bytes received from the network here; receive WebAssembly and [`Runtime::load`] or
    /// [`Runtime::precompile`] it.
    pub unsafe fn load_precompiled(
        &self,
        name: &str,
        artifact: &[u8],
    ) -> Result<Handler, LoadError> {
        let started = Instant::now();
        let refused = |reason: String| LoadError::Artifact {
            name: name.to_string(),
            reason,
        };
        let envelope = Envelope::parse(artifact).map_err(|e| refused(e.to_string()))?;
        if envelope.key != self.shared.artifact_key {
            return Err(refused(format!(
                "made for {}, this runtime is {}: compile the module again",
                envelope.key, self.shared.artifact_key
            )));
        }
        if Sha256::digest(envelope.code)[..] != envelope.checksum[..] {
            return Err(refused(
                "checksum mismatch: the artifact is damaged".to_string(),
            ));
        }
        // SAFETY: `Component::deserialize` requires bytes made by `Component::serialize` (or
        // `Engine::precompile_component`) of a compatible engine, not modified since. The
        // caller promises (this function's contract) that `artifact` was made by
        // `Handler::artifact`, whose envelope holds exactly the output of
        // `Component::serialize`; the key check above guarantees the same wasmtime version
        // and compilation settings (wasmtime checks them again), and the checksum that the
        // code is the one serialized, not a damaged copy.
        let component = unsafe { Component::deserialize(&self.shared.engine, envelope.code) }
            .map_err(|e| refused(format!("{e:#}")))?;
        self.handler(
            name,
            &component,
            envelope.version.to_string(),
            Loaded::Precompiled(started),
        )
    }

    /// The key under which precompiled artifacts of this runtime must be stored:
    /// `wasmtime-<version>-<16 hex digits>`, the digits hashing everything that makes native
    /// code compatible (wasmtime's exact version, target CPU and its features, compiler
    /// settings, memory layout, fuel metering) and the artifact format. Two runtimes with
    /// the same key can load each other's artifacts; after an upgrade or a configuration
    /// change the key differs and modules must be compiled again.
    pub fn artifact_key(&self) -> &str {
        &self.shared.artifact_key
    }

    /// Invocations running now (holding a slot), out of [`RuntimeConfig::max_concurrent`].
    pub fn running_invocations(&self) -> usize {
        self.shared.slots.in_use()
    }

    /// Invocations waiting for a concurrency slot now.
    pub fn waiting_invocations(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// The concurrency of the handlers: running and waiting now, the most that ran at once
    /// since the runtime was made, overall and per module name (never above
    /// [`RuntimeConfig::max_concurrent`] and [`RuntimeConfig::max_concurrent_per_module`]).
    pub fn concurrency(&self) -> crate::metrics::Concurrency {
        let per_module = self
            .shared
            .module_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, slots)| (name.clone(), slots.peak() as u64))
            .collect();
        crate::metrics::Concurrency {
            running: self.running_invocations() as u64,
            waiting: self.waiting_invocations() as u64,
            peak: self.shared.slots.peak() as u64,
            module_peaks: per_module,
        }
    }

    /// The limits of an invocation that sets none of its own: those of the
    /// [`RuntimeConfig`] this runtime was created with.
    pub fn default_limits(&self) -> InvokeLimits {
        self.shared.default_limits()
    }

    /// The limits an invocation given `limits` actually runs with: the memory cap lowered to
    /// [`RuntimeConfig::memory_limit_bytes`] if it is above it, everything else as given.
    pub fn effective_limits(&self, limits: &InvokeLimits) -> InvokeLimits {
        limits.clamped(&self.shared.config)
    }

    /// The [`Handler`] for a compiled component, after the world check.
    fn handler(
        &self,
        name: &str,
        component: &Component,
        version: String,
        loaded: Loaded,
    ) -> Result<Handler, LoadError> {
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            name: name.to_string(),
            reason: format!("{e:#}"),
        };
        let instance_pre = self
            .shared
            .linker
            .instantiate_pre(component)
            .map_err(wrong_world)?;
        let pre = bindings::HandlerPre::new(instance_pre).map_err(wrong_world)?;
        let slots = {
            let mut modules = self
                .shared
                .module_slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            Arc::clone(modules.entry(name.to_string()).or_insert_with(|| {
                Arc::new(Slots::new(self.shared.config.max_concurrent_per_module))
            }))
        };
        let (started, compiled) = match loaded {
            Loaded::Compiled(started) => (started, true),
            Loaded::Precompiled(started) => (started, false),
        };
        Ok(Handler {
            name: Arc::from(name),
            version: Arc::from(version),
            pre,
            slots,
            total_fuel: Arc::new(AtomicU64::new(0)),
            load_time: started.elapsed(),
            compiled,
            shared: Arc::clone(&self.shared),
        })
    }
}

impl Shared {
    /// See [`Runtime::default_limits`].
    fn default_limits(&self) -> InvokeLimits {
        InvokeLimits {
            deadline: self.config.deadline,
            memory_limit_bytes: self.config.memory_limit_bytes,
            max_outputs: self.config.max_outputs,
            max_output_bytes: self.config.max_output_bytes,
        }
    }
}

/// How a [`Handler`] came to be, and when its loading started.
enum Loaded {
    /// Compiled from WebAssembly ([`Runtime::load`]).
    Compiled(Instant),
    /// Loaded from a precompiled artifact ([`Runtime::load_precompiled`]).
    Precompiled(Instant),
}

/// A loaded handler: a compiled, type-checked component ready to be instantiated.
///
/// Cloning is cheap; clones (on any threads) share the compiled code, and every invocation
/// gets its own instance; how many run at once is limited by
/// [`RuntimeConfig::max_concurrent_per_module`] and [`RuntimeConfig::max_concurrent`].
#[derive(Clone)]
pub struct Handler {
    /// The module name: the key-value scope and the log tag.
    name: Arc<str>,
    /// The first 16 hex digits of the module's SHA-256.
    version: Arc<str>,
    /// The pre-linked component.
    pre: bindings::HandlerPre<State>,
    /// The concurrency slots of the module's name (shared with other versions of it).
    slots: Arc<Slots>,
    /// Fuel consumed by all invocations of this handler and its clones.
    total_fuel: Arc<AtomicU64>,
    /// How long loading took (see [`Handler::load_time`]).
    load_time: Duration,
    /// Whether it was compiled (or loaded from an artifact).
    compiled: bool,
    /// The runtime it was loaded by (kept alive, with its ticker, by this handler).
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("compiled", &self.compiled)
            .field("load_time", &self.load_time)
            .finish_non_exhaustive()
    }
}

/// What one invocation did: its result and what it cost.
#[derive(Debug)]
pub struct Invocation {
    /// The outputs, or why there are none (as [`Handler::invoke`] returns them).
    pub result: Result<Vec<Output>, HandlerFailure>,
    /// The handler's cost: the fuel the invocation consumed (instantiation, the `handle`
    /// call, and copying the batch in and the outputs out), failed invocations included.
    /// Roughly one unit per WebAssembly instruction executed; the same module given the same
    /// batch and state consumes the same fuel. `None` when [`RuntimeConfig::meter_fuel`] is
    /// off.
    pub fuel: Option<u64>,
    /// How long the invocation waited for a concurrency slot before it started.
    pub waited: Duration,
    /// How long it ran once it had its slot (instantiation, call, output checks, key-value
    /// writes); includes [`Invocation::instantiate`].
    pub ran: Duration,
    /// The warm start: how long instantiating the pre-linked component took (a fresh
    /// instance for every invocation: creating its memories and tables and running its
    /// initialisation), failed instantiations included. Zero when the invocation failed
    /// before instantiating.
    pub instantiate: Duration,
}

impl Handler {
    /// The name the handler was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module's version: the first 16 hex digits of the SHA-256 of its bytes, so the same
    /// module always has the same version and a changed one a different version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Fuel consumed so far by all invocations of this handler (and its clones), failed ones
    /// included: the handler's running cost. 0 when [`RuntimeConfig::meter_fuel`] is off.
    pub fn total_fuel(&self) -> u64 {
        self.total_fuel.load(Ordering::Relaxed)
    }

    /// How long loading this handler took: the cold start. For a handler made by
    /// [`Runtime::load`] that is compiling the component (the bulk of it), hashing it and
    /// pre-linking it; for one made by [`Runtime::load_precompiled`], checking the artifact,
    /// loading its native code and pre-linking it. [`Handler::compiled`] says which. Clones
    /// report the same time.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Whether this handler was compiled from WebAssembly ([`Runtime::load`]), as opposed to
    /// loaded from a precompiled artifact ([`Runtime::load_precompiled`]).
    pub fn compiled(&self) -> bool {
        self.compiled
    }

    /// The runtime's limits ([`Runtime::default_limits`]), for a caller that holds only the
    /// handler and wants to change some of them for [`Handler::invoke_limited`].
    pub fn default_limits(&self) -> InvokeLimits {
        self.shared.default_limits()
    }

    /// The handler's precompiled artifact, to store (keyed by [`Runtime::artifact_key`]) and
    /// load later with [`Runtime::load_precompiled`] instead of compiling again.
    ///
    /// Layout: `outpost-artifact`, a format byte, the key and the module version (each
    /// preceded by its length in one byte), the SHA-256 of the code, then the code as
    /// wasmtime serializes it.
    pub fn artifact(&self) -> Result<Vec<u8>, LoadError> {
        let code = self
            .pre
            .instance_pre()
            .component()
            .serialize()
            .map_err(|e| LoadError::Artifact {
                name: self.name.to_string(),
                reason: format!("cannot serialize: {e:#}"),
            })?;
        Ok(Envelope {
            key: &self.shared.artifact_key,
            version: &self.version,
            checksum: Sha256::digest(&code).into(),
            code: &code,
        }
        .to_bytes())
    }

    /// Runs `batch` through a fresh instance of the handler and returns its outputs.
    ///
    /// Blocking: it returns when the handler has finished, failed, or been stopped at the
    /// deadline. Call it from a blocking thread (for example `tokio::task::spawn_blocking`),
    /// never directly from async code: the WASI streams use a tokio runtime internally, and
    /// the invocation may first wait for a concurrency slot
    /// ([`RuntimeConfig::max_concurrent`], [`RuntimeConfig::max_concurrent_per_module`]);
    /// waiting never fails, and the deadline starts when the wait ends.
    ///
    /// Guarantees: the instance is discarded afterwards; on success, the outputs respect the
    /// output limits and the key-value writes the handler made are applied (in key order)
    /// before this returns; on failure, none of its key-value writes are applied (unless the
    /// backend itself fails part-way through applying them: [`HandlerFailure::Host`]).
    pub fn invoke(&self, batch: &[Event]) -> Result<Vec<Output>, HandlerFailure> {
        self.invoke_metered(batch).result
    }

    /// [`Handler::invoke`] with a deadline of its own instead of the runtime's.
    pub fn invoke_within(
        &self,
        batch: &[Event],
        deadline: Duration,
    ) -> Result<Vec<Output>, HandlerFailure> {
        self.invoke_metered_within(batch, deadline).result
    }

    /// [`Handler::invoke`], also returning the invocation's cost in fuel and its times.
    pub fn invoke_metered(&self, batch: &[Event]) -> Invocation {
        self.invoke_limited(batch, &self.shared.default_limits())
    }

    /// [`Handler::invoke_within`], also returning the invocation's cost in fuel and its
    /// times.
    pub fn invoke_metered_within(&self, batch: &[Event], deadline: Duration) -> Invocation {
        let limits = InvokeLimits {
            deadline,
            ..self.shared.default_limits()
        };
        self.invoke_limited(batch, &limits)
    }

    /// [`Handler::invoke`] under `limits` instead of the runtime's own (a route's limits),
    /// returning the invocation's cost in fuel and its times as
    /// [`Handler::invoke_metered`] does.
    ///
    /// Guarantees, besides those of [`Handler::invoke`]: the invocation is stopped at
    /// `limits.deadline` ([`HandlerFailure::Timeout`]); its memories together never exceed
    /// `limits.memory_limit_bytes` or [`RuntimeConfig::memory_limit_bytes`], whichever is
    /// lower ([`HandlerFailure::OutOfMemory`]); it succeeds only with at most
    /// `limits.max_outputs` outputs of at most `limits.max_output_bytes` payload bytes in
    /// all ([`HandlerFailure::OutputLimit`]); and it waits for the same concurrency slots as
    /// every other invocation.
    pub fn invoke_limited(&self, batch: &[Event], limits: &InvokeLimits) -> Invocation {
        let limits = limits.clamped(&self.shared.config);
        self.run(batch, &limits, limits.hostcall_fuel())
    }

    /// Runs one invocation under `limits` (already clamped), letting wasmtime copy at most
    /// `hostcall_fuel` bytes out of the guest at a time.
    fn run(&self, batch: &[Event], limits: &InvokeLimits, hostcall_fuel: usize) -> Invocation {
        let shared = &self.shared;
        let arrived = Instant::now();
        // The module's slot first, then an overall one: an invocation waiting for its module
        // holds no overall slot, and whoever holds an overall slot needs nothing more, so
        // there is no deadlock and a busy module does not idle the others' slots.
        shared.waiting.fetch_add(1, Ordering::Relaxed);
        let _module_slot = self.slots.acquire();
        let _slot = shared.slots.acquire();
        shared.waiting.fetch_sub(1, Ordering::Relaxed);
        let started = Instant::now();

        let mut store = Store::new(
            &shared.engine,
            State::new(
                Arc::clone(&self.name),
                Arc::clone(&shared.kv),
                limits.memory_limit_bytes,
            ),
        );
        store.limiter(|state| &mut state.limits);
        store.set_hostcall_fuel(hostcall_fuel);
        store.set_epoch_deadline(deadline_ticks(limits.deadline));
        store.epoch_deadline_trap();
        let metered = shared.config.meter_fuel;
        let result = match metered {
            true => store
                .set_fuel(FUEL_BUDGET)
                .map_err(|e| HandlerFailure::Host(format!("cannot set fuel: {e:#}"))),
            false => Ok(()),
        };

        let batch: Vec<types::Event> = batch.iter().map(to_wit).collect();
        let mut instantiate = Duration::ZERO;
        let called = result.map(|()| {
            let instantiating = Instant::now();
            let instance = self.pre.instantiate(&mut store);
            instantiate = instantiating.elapsed();
            instance.and_then(|handler| handler.call_handle(&mut store, &batch))
        });
        let fuel =
            metered.then(|| FUEL_BUDGET.saturating_sub(store.get_fuel().unwrap_or(FUEL_BUDGET)));
        if let Some(fuel) = fuel {
            self.total_fuel.fetch_add(fuel, Ordering::Relaxed);
        }
        let result = called.and_then(|called| self.finish(called, store, limits));
        Invocation {
            result,
            fuel,
            waited: started - arrived,
            ran: started.elapsed(),
            instantiate,
        }
    }

    /// Turns the outcome of the `handle` call into the invocation's result, applying the
    /// key-value writes if it succeeded.
    fn finish(
        &self,
        called: wasmtime::Result<Result<Vec<types::Output>, String>>,
        store: Store<State>,
        limits: &InvokeLimits,
    ) -> Result<Vec<Output>, HandlerFailure> {
        let outputs = match called {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(message)) => return Err(HandlerFailure::Error(cut(&message, MAX_REASON_BYTES))),
            Err(error) => return Err(classify(&error, store.data())),
        };
        check_output_limits(&outputs, limits)?;

        let state = store.into_data();
        for (key, value) in &state.kv_writes {
            self.shared
                .kv
                .set(&self.name, key, value)
                .map_err(|e| HandlerFailure::Host(format!("kv-set {key:?}: {e:#}")))?;
        }
        Ok(outputs
            .into_iter()
            .map(|output| Output {
                topic: output.topic,
                payload: output.payload,
            })
            .collect())
    }
}

/// A counting semaphore for blocking threads that serves waiters in arrival order, so a
/// module that keeps invoking cannot overtake one that waits.
struct Slots {
    /// How many may be held at once (at least 1).
    capacity: usize,
    /// Free slots and the ticket queue.
    state: Mutex<SlotState>,
    /// Notified when a slot is freed or the queue moves.
    changed: Condvar,
}

/// The mutable part of [`Slots`].
struct SlotState {
    /// Slots not held.
    free: usize,
    /// The ticket the next arrival takes.
    next_ticket: u64,
    /// The ticket allowed to take the next free slot; tickets below it have their slot.
    serving: u64,
    /// The most slots held at once so far.
    peak: usize,
}

impl Slots {
    /// `capacity` slots (0 is taken as 1).
    fn new(capacity: usize) -> Slots {
        let capacity = capacity.max(1);
        Slots {
            capacity,
            state: Mutex::new(SlotState {
                free: capacity,
                next_ticket: 0,
                serving: 0,
                peak: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Nothing panics while holding the lock, and every update is complete under it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for this caller's turn and a free slot, and takes it.
    fn acquire(&self) -> Slot<'_> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        while state.serving != ticket || state.free == 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.serving += 1;
        state.free -= 1;
        state.peak = state.peak.max(self.capacity - state.free);
        // The next ticket may be able to take a slot too.
        let queue = state.next_ticket > state.serving;
        drop(state);
        if queue {
            self.changed.notify_all();
        }
        Slot { slots: self }
    }

    /// Slots held now.
    fn in_use(&self) -> usize {
        self.capacity - self.lock().free
    }

    /// The most slots held at once so far.
    fn peak(&self) -> usize {
        self.lock().peak
    }
}

/// A held slot, given back when dropped (also when unwinding).
struct Slot<'a> {
    /// Where it came from.
    slots: &'a Slots,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        state.free += 1;
        let queue = state.next_ticket > state.serving;
        drop(state);
        if queue {
            self.slots.changed.notify_all();
        }
    }
}

/// A precompiled artifact, parsed (see [`Handler::artifact`] for the layout).
struct Envelope<'a> {
    /// The [`Runtime::artifact_key`] of the runtime that made it.
    key: &'a str,
    /// The module's [`Handler::version`].
    version: &'a str,
    /// SHA-256 of `code`.
    checksum: [u8; 32],
    /// What `Component::serialize` returned.
    code: &'a [u8],
}

impl<'a> Envelope<'a> {
    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ARTIFACT_MAGIC.len() + 128 + self.code.len());
        bytes.extend_from_slice(ARTIFACT_MAGIC);
        bytes.push(ARTIFACT_FORMAT);
        for field in [self.key, self.version] {
            // Both are short ASCII strings made by this module.
            let len = u8::try_from(field.len()).expect("artifact header field under 256 bytes");
            bytes.push(len);
            bytes.extend_from_slice(field.as_bytes());
        }
        bytes.extend_from_slice(&self.checksum);
        bytes.extend_from_slice(self.code);
        bytes
    }

    fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, &'static str> {
        let rest = bytes
            .strip_prefix(ARTIFACT_MAGIC)
            .ok_or("not an outpost precompiled artifact")?;
        let (&format, rest) = rest.split_first().ok_or("truncated")?;
        if format != ARTIFACT_FORMAT {
            return Err("unknown artifact format: compile the module again");
        }
        let (key, rest) = Self::field(rest)?;
        let (version, rest) = Self::field(rest)?;
        if rest.len() < 32 {
            return Err("truncated");
        }
        let (checksum, code) = rest.split_at(32);
        Ok(Envelope {
            key,
            version,
            checksum: checksum.try_into().map_err(|_| "truncated")?,
            code,
        })
    }

    /// A length-prefixed string field, and what follows it.
    fn field(bytes: &'a [u8]) -> Result<(&'a str, &'a [u8]), &'static str> {
        let (&len, rest) = bytes.split_first().ok_or("truncated")?;
        if rest.len() < usize::from(len) {
            return Err("truncated");
        }
        let (field, rest) = rest.split_at(usize::from(len));
        let field = std::str::from_utf8(field).map_err(|_| "malformed header")?;
        Ok((field, rest))
    }
}

/// [`Runtime::artifact_key`] of `engine`.
fn artifact_key(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    ARTIFACT_FORMAT.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let digest = hasher.0.finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("wasmtime-{WASMTIME_VERSION}-{hex}")
}

/// A [`Hasher`] that feeds SHA-256, so a key hashed with it is the same in every build (std's
/// `DefaultHasher` may change between Rust releases).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

/// The wasmtime configuration: epoch interruption for deadlines, and memory reservations
/// sized for a 512 MiB board.
///
/// wasmtime's 64-bit defaults reserve 4 GiB of address space per linear memory plus 2 GiB of
/// guard (to elide bounds checks), which fails where address space is limited (32-bit boards,
/// 39-bit kernels, `ulimit -v`; wasmtime issues #8607, #7637). Here each memory reserves its
/// cap up front, rounded to whole pages but at most 64 MiB, so it grows in place up to the cap
/// without being copied; a memory allowed to outgrow 64 MiB moves with 16 MiB of room to grow
/// into each time. Guards are 64 KiB (enough to share bounds checks between nearby accesses).
/// Generated code does explicit bounds checks, which costs a few percent of speed and is the
/// price of running on these boards. The reservations are address space, not RAM: resident
/// memory is what the guest actually touches, capped by the limiter.
fn engine_config(config: &RuntimeConfig) -> Config {
    let cap = u64::try_from(config.memory_limit_bytes).unwrap_or(u64::MAX);
    let reservation = cap
        .div_ceil(WASM_PAGE)
        .saturating_mul(WASM_PAGE)
        .min(MAX_MEMORY_RESERVATION);
    let mut engine = Config::new();
    engine
        .epoch_interruption(true)
        .consume_fuel(config.meter_fuel)
        .memory_reservation(reservation)
        .memory_guard_size(WASM_PAGE)
        .memory_reservation_for_growth(16 * 1024 * 1024);
    engine
}

/// Epoch ticks after which an invocation is stopped: enough that at least `deadline` passes
/// whatever the phase of the ticker when the invocation starts (hence the extra tick). Huge
/// deadlines are capped far beyond any uptime, where wasmtime's `current + ticks` cannot
/// overflow.
fn deadline_ticks(deadline: Duration) -> u64 {
    const NEVER: u64 = u64::MAX / 4;
    let ticks = deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1);
    u64::try_from(ticks).unwrap_or(NEVER).min(NEVER) + 1
}

/// Converts an event to its WIT form.
fn to_wit(event: &Event) -> types::Event {
    types::Event {
        id: event.id,
        topic: event.topic.clone(),
        device: event.device.clone(),
        payload: event.payload.clone(),
        received_ms: event.received_ms,
        location: event.location.map(|l| types::Location {
            lat: l.lat,
            lon: l.lon,
        }),
        regions: event.regions.clone(),
    }
}

/// Checks the outputs against [`InvokeLimits::max_outputs`] and
/// [`InvokeLimits::max_output_bytes`].
fn check_output_limits(
    outputs: &[types::Output],
    limits: &InvokeLimits,
) -> Result<(), HandlerFailure> {
    if outputs.len() > limits.max_outputs {
        return Err(HandlerFailure::OutputLimit(format!(
            "{} outputs, at most {} allowed",
            outputs.len(),
            limits.max_outputs
        )));
    }
    let bytes = outputs.iter().fold(0usize, |sum, output| {
        sum.saturating_add(output.payload.len())
    });
    if bytes > limits.max_output_bytes {
        return Err(HandlerFailure::OutputLimit(format!(
            "{bytes} payload bytes, at most {} allowed",
            limits.max_output_bytes
        )));
    }
    Ok(())
}

/// Turns a failed instantiation or call into the failure it stands for. The signals recorded
/// in the store take precedence over the error itself: a denied memory growth usually
/// surfaces as the guest aborting (an `unreachable` trap), and a host fault as a trap carrying
/// the host's error.
fn classify(error: &wasmtime::Error, state: &State) -> HandlerFailure {
    if let Some(fault) = &state.fault {
        return match fault {
            Fault::Backend(message) => HandlerFailure::Host(message.clone()),
            Fault::Misuse(message) => HandlerFailure::Trap(message.clone()),
        };
    }
    if state.limits.denied {
        return HandlerFailure::OutOfMemory;
    }
    let text = format!("{error:#}");
    // wasmtime's hostcall fuel ran out (its error type is private, its message is not). The
    // budget covers any import's arguments (see `InvokeLimits::hostcall_fuel`), so this was
    // the results: outputs far beyond the output caps.
    if text.contains("fuel allocated for hostcalls has been exhausted") {
        return HandlerFailure::OutputLimit(format!(
            "the outputs are too large to copy out of the handler ({})",
            cut(&text, MAX_REASON_BYTES)
        ));
    }
    let mut message = match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return HandlerFailure::Timeout,
        // Unreachable in practice (the budget lasts for centuries); running out of it would be
        // running out of time.
        Some(Trap::OutOfFuel) => return HandlerFailure::Timeout,
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    };
    let stderr = state.stderr.text();
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        message.push_str("; guest stderr: ");
        message.push_str(stderr);
    }
    HandlerFailure::Trap(cut(&message, MAX_REASON_BYTES))
}

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn cut(text: &str, max: usize) -> String {
    truncated(text, max).into_owned()
}

/// `text` cut to at most `max` bytes at a character boundary (plus a marker), borrowed when
/// it already fits.
fn truncated(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}... [{} bytes cut]",
        &text[..end],
        text.len() - end
    ))
}

/// The store data of one invocation.
struct State {
    /// The module name: the key-value scope and the log tag.
    module: Arc<str>,
    /// Persistent state, read through on a miss in `kv_writes`.
    kv: Arc<dyn KvBackend>,
    /// Key-value writes made so far, applied to `kv` only if the invocation succeeds.
    kv_writes: BTreeMap<String, Vec<u8>>,
    /// Bytes (keys plus values) in `kv_writes`.
    kv_pending_bytes: usize,
    /// Log lines written so far.
    log_lines: usize,
    /// The memory cap, and whether it was hit.
    limits: Limits,
    /// Set when a host function trapped the guest, saying why.
    fault: Option<Fault>,
    /// The start of the guest's stderr.
    stderr: CapturedStderr,
    /// The locked-down WASI context.
    wasi: WasiCtx,
    /// WASI resources (streams, pollables) of this instance.
    table: ResourceTable,
}

/// Why a host function trapped the guest.
enum Fault {
    /// The key-value backend failed: the gateway's fault ([`HandlerFailure::Host`]).
    Backend(String),
    /// The guest broke a rule of the host interface ([`HandlerFailure::Trap`]).
    Misuse(String),
}

impl State {
    /// Fresh state for one invocation of `module`.
    fn new(module: Arc<str>, kv: Arc<dyn KvBackend>, memory_limit: usize) -> State {
        let stderr = CapturedStderr::default();
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        State {
            module,
            kv,
            kv_writes: BTreeMap::new(),
            kv_pending_bytes: 0,
            log_lines: 0,
            limits: Limits {
                cap: memory_limit,
                used: 0,
                denied: false,
            },
            fault: None,
            stderr,
            wasi,
            table: ResourceTable::new(),
        }
    }

    /// Records `fault` and returns the error that traps the guest.
    fn trap(&mut self, fault: Fault) -> wasmtime::Error {
        let message = match &fault {
            Fault::Backend(message) | Fault::Misuse(message) => message.clone(),
        };
        self.fault = Some(fault);
        wasmtime::Error::msg(message)
    }

    /// Traps the guest if `key` is longer than allowed.
    fn check_key(&mut self, operation: &str, key: &str) -> wasmtime::Result<()> {
        if key.len() > MAX_KV_KEY_BYTES {
            return Err(self.trap(Fault::Misuse(format!(
                "{operation}: key of {} bytes, at most {MAX_KV_KEY_BYTES} allowed",
                key.len()
            ))));
        }
        Ok(())
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for State {}

impl host::Host for State {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        self.log_lines += 1;
        let module = &*self.module;
        if self.log_lines > MAX_LOG_LINES {
            if self.log_lines == MAX_LOG_LINES + 1 {
                tracing::warn!(
                    module,
                    "more than {MAX_LOG_LINES} log lines in one invocation; dropping the rest"
                );
            }
            return Ok(());
        }
        let message = truncated(&message, MAX_LOG_MESSAGE_BYTES);
        match level {
            host::Level::Trace => tracing::trace!(module, "{message}"),
            host::Level::Debug => tracing::debug!(module, "{message}"),
            host::Level::Info => tracing::info!(module, "{message}"),
            host::Level::Warn => tracing::warn!(module, "{message}"),
            host::Level::Error => tracing::error!(module, "{message}"),
        }
        Ok(())
    }

    fn kv_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.check_key("kv-get", &key)?;
        if let Some(value) = self.kv_writes.get(&key) {
            return Ok(Some(value.clone()));
        }
        match self.kv.get(&self.module, &key) {
            Ok(value) => Ok(value),
            Err(e) => Err(self.trap(Fault::Backend(format!("kv-get {key:?}: {e:#}")))),
        }
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        self.check_key("kv-set", &key)?;
        if value.len() > MAX_KV_VALUE_BYTES {
            return Err(self.trap(Fault::Misuse(format!(
                "kv-set {key:?}: value of {} bytes, at most {MAX_KV_VALUE_BYTES} allowed",
                value.len()
            ))));
        }
        let replaced = self
            .kv_writes
            .get(&key)
            .map_or(0, |old| key.len() + old.len());
        let pending = self.kv_pending_bytes - replaced + key.len() + value.len();
        if pending > MAX_KV_PENDING_BYTES {
            return Err(self.trap(Fault::Misuse(format!(
                "kv-set {key:?}: more than {MAX_KV_PENDING_BYTES} bytes written in one invocation"
            ))));
        }
        self.kv_pending_bytes = pending;
        self.kv_writes.insert(key, value);
        Ok(())
    }

    fn now_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(crate::event::now_ms())
    }
}

/// The memory cap of one invocation, shared by all its linear memories, and the record of
/// whether it was hit.
struct Limits {
    /// Bytes all memories may have together.
    cap: usize,
    /// Bytes granted so far (memories never shrink).
    used: usize,
    /// Whether a memory growth was refused (or failed) during this invocation.
    denied: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Creating a memory is reported as growth from 0, so `used` covers initial sizes too.
        let used = self.used.saturating_add(desired.saturating_sub(current));
        if used > self.cap {
            // Refused growth makes `memory.grow` return -1 to the guest, as WebAssembly
            // specifies; a Rust guest then aborts, which `classify` reports as out-of-memory.
            self.denied = true;
            return Ok(false);
        }
        self.used = used;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.denied = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The guest's stderr: the first [`STDERR_CAPTURE_BYTES`] are kept, the rest is discarded.
/// Writes never fail, so a chatty guest is not stopped by a full buffer.
#[derive(Clone, Default)]
struct CapturedStderr(Arc<Mutex<Vec<u8>>>);

impl CapturedStderr {
    /// Keeps as much of `bytes` as still fits.
    fn append(&self, bytes: &[u8]) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = STDERR_CAPTURE_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// What was kept, as text.
    fn text(&self) -> String {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&kept).into_owned()
    }
}

impl IsTerminal for CapturedStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedStderr {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedStderr {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedStderr {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CapturedStderr {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`], which is what lets
/// deadlines fire. Dropping the `Ticker` stops and joins the thread at once.
struct Ticker {
    /// Dropping this wakes the thread and tells it to stop.
    stop: Option<mpsc::Sender<()>>,
    /// The thread, joined on drop.
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// Starts the thread for `engine`.
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("outpost-epoch".to_string())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(EPOCH_TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread cannot panic; if it did, there is nothing left to clean up.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::examples;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An in-memory [`KvBackend`] that can be told to fail.
    #[derive(Default)]
    struct MemoryKv {
        /// Values by (module, key).
        values: Mutex<HashMap<(String, String), Vec<u8>>>,
        /// When set, every call fails.
        broken: AtomicBool,
    }

    impl MemoryKv {
        fn value(&self, module: &str, key: &str) -> Option<Vec<u8>> {
            self.values
                .lock()
                .unwrap()
                .get(&(module.to_string(), key.to_string()))
                .cloned()
        }
    }

    impl KvBackend for MemoryKv {
        fn get(&self, module: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
            anyhow::ensure!(!self.broken.load(Ordering::SeqCst), "disk on fire");
            Ok(self.value(module, key))
        }

        fn set(&self, module: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
            anyhow::ensure!(!self.broken.load(Ordering::SeqCst), "disk on fire");
            self.values
                .lock()
                .unwrap()
                .insert((module.to_string(), key.to_string()), value.to_vec());
            Ok(())
        }
    }

    fn runtime_with(config: RuntimeConfig) -> (Runtime, Arc<MemoryKv>) {
        let kv = Arc::new(MemoryKv::default());
        let runtime = Runtime::new(config, kv.clone()).expect("runtime");
        (runtime, kv)
    }

    fn runtime() -> (Runtime, Arc<MemoryKv>) {
        runtime_with(RuntimeConfig::default())
    }

    fn faulty(runtime: &Runtime) -> Handler {
        let wasm = std::fs::read(examples::guest_path("faulty")).expect("faulty.wasm was built");
        runtime.load("faulty", &wasm).expect("faulty loads")
    }

    fn event(id: u64, device: &str, payload: &str) -> Event {
        Event {
            id,
            topic: format!("sensors/{device}/telemetry"),
            device: device.to_string(),
            client_id: device.to_string(),
            payload: payload.as_bytes().to_vec(),
            received_ms: 1_700_000_000_000 + id,
            location: None,
            regions: vec![],
        }
    }

    fn json(output: &Output) -> serde_json::Value {
        serde_json::from_slice(&output.payload).expect("output is JSON")
    }

    #[test]
    fn enrich_adds_device_time_and_fahrenheit() {
        let (runtime, _) = runtime();
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        let outputs = enrich
            .invoke(&[event(1, "dev-1", r#"{"temp_c": 21.5, "hum": 40}"#)])
            .unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].topic, "enriched/dev-1");
        assert_eq!(
            json(&outputs[0]),
            serde_json::json!({
                "temp_c": 21.5, "hum": 40, "temp_f": 70.7,
                "device": "dev-1", "received_ms": 1_700_000_000_001u64,
            })
        );
    }

    #[test]
    fn enrich_converts_fahrenheit_to_rounded_celsius() {
        let (runtime, _) = runtime();
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        let outputs = enrich
            .invoke(&[event(2, "dev-2", r#"{"temp_f": 100}"#)])
            .unwrap();
        assert_eq!(json(&outputs[0])["temp_c"], serde_json::json!(37.78));
    }

    #[test]
    fn enrich_fails_the_batch_on_a_non_object_payload() {
        let (runtime, _) = runtime();
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        let batch = [event(1, "d", r#"{"temp_c": 1}"#), event(7, "d", "not json")];
        match enrich.invoke(&batch) {
            Err(HandlerFailure::Error(message)) => {
                assert!(
                    message.starts_with("event 7: payload is not a JSON object"),
                    "{message}"
                );
            }
            other => panic!("expected a handler error, got {other:?}"),
        }
        let array = enrich.invoke(&[event(8, "d", "[1, 2]")]);
        assert!(matches!(array, Err(HandlerFailure::Error(m)) if m.contains("event 8")));
    }

    /// The state of each invocation of `threshold` for a series of readings, one reading per
    /// invocation, so the alert state must live in the key-value store.
    fn alert_states(handler: &Handler, device: &str, readings: &[f64]) -> Vec<Option<String>> {
        readings
            .iter()
            .enumerate()
            .map(|(i, temp_c)| {
                let batch = [event(
                    i as u64,
                    device,
                    &format!(r#"{{"temp_c": {temp_c}}}"#),
                )];
                let outputs = handler.invoke(&batch).unwrap();
                assert!(outputs.len() <= 1);
                outputs.first().map(|output| {
                    assert_eq!(output.topic, format!("alerts/{device}"));
                    let alert = json(output);
                    assert_eq!(alert["device"], device);
                    assert_eq!(alert["temp_c"], *temp_c);
                    alert["state"].as_str().unwrap().to_string()
                })
            })
            .collect()
    }

    #[test]
    fn threshold_raises_once_and_clears_with_hysteresis() {
        let (runtime, kv) = runtime();
        let threshold = runtime.load("threshold", examples::THRESHOLD).unwrap();
        let raised = Some("raised".to_string());
        let cleared = Some("cleared".to_string());
        let states = alert_states(
            &threshold,
            "boiler",
            &[20.0, 30.0, 31.0, 35.0, 26.0, 25.0, 24.9, 24.0, 29.0, 30.5],
        );
        assert_eq!(
            states,
            [
                None,
                None,
                raised.clone(),
                None,
                None,
                None,
                cleared,
                None,
                None,
                raised
            ]
        );
        assert_eq!(
            kv.value("threshold", "alerting/boiler").as_deref(),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn threshold_alert_names_the_crossed_threshold() {
        let (runtime, _) = runtime();
        let threshold = runtime.load("threshold", examples::THRESHOLD).unwrap();
        let raised = threshold
            .invoke(&[event(1, "d", r#"{"temp_c": 40}"#)])
            .unwrap();
        assert_eq!(json(&raised[0])["threshold"], 30.0);
        let cleared = threshold
            .invoke(&[event(2, "d", r#"{"temp_c": 10}"#)])
            .unwrap();
        assert_eq!(json(&cleared[0])["threshold"], 25.0);
        assert_eq!(json(&cleared[0])["state"], "cleared");
    }

    #[test]
    fn threshold_state_is_per_device_and_per_module() {
        let (runtime, kv) = runtime();
        let first = runtime.load("first", examples::THRESHOLD).unwrap();
        let second = runtime.load("second", examples::THRESHOLD).unwrap();
        let hot = |device| event(1, device, r#"{"temp_c": 40}"#);
        assert_eq!(first.invoke(&[hot("a")]).unwrap().len(), 1);
        assert_eq!(
            first.invoke(&[hot("b")]).unwrap().len(),
            1,
            "another device"
        );
        assert_eq!(
            second.invoke(&[hot("a")]).unwrap().len(),
            1,
            "another module"
        );
        assert_eq!(
            first.invoke(&[hot("a")]).unwrap().len(),
            0,
            "already raised"
        );
        assert!(kv.value("first", "alerting/a").is_some());
        assert!(kv.value("second", "alerting/b").is_none());
    }

    #[test]
    fn threshold_skips_events_without_a_temperature() {
        let (runtime, _) = runtime();
        let threshold = runtime.load("threshold", examples::THRESHOLD).unwrap();
        let batch = [
            event(1, "d", r#"{"hum": 99}"#),
            event(2, "d", r#"{"temp_c": "hot"}"#),
        ];
        assert_eq!(threshold.invoke(&batch).unwrap(), vec![]);
        let not_json = threshold.invoke(&[event(3, "d", "31")]);
        assert!(matches!(not_json, Err(HandlerFailure::Error(m)) if m.contains("event 3")));
    }

    #[test]
    fn a_failed_invocation_leaves_the_kv_state_unchanged() {
        let (runtime, kv) = runtime();
        let threshold = runtime.load("threshold", examples::THRESHOLD).unwrap();
        let batch = [event(1, "d", r#"{"temp_c": 40}"#), event(2, "d", "garbage")];
        assert!(matches!(
            threshold.invoke(&batch),
            Err(HandlerFailure::Error(_))
        ));
        assert_eq!(kv.value("threshold", "alerting/d"), None);
        let retry = threshold.invoke(&batch[..1]).unwrap();
        assert_eq!(json(&retry[0])["state"], "raised");
    }

    #[test]
    fn a_kv_backend_failure_is_a_host_failure() {
        let (runtime, kv) = runtime();
        let threshold = runtime.load("threshold", examples::THRESHOLD).unwrap();
        kv.broken.store(true, Ordering::SeqCst);
        match threshold.invoke(&[event(1, "d", r#"{"temp_c": 40}"#)]) {
            Err(failure @ HandlerFailure::Host(_)) => {
                assert_eq!(failure.reason(), "host-error");
                assert!(failure.to_string().contains("disk on fire"), "{failure}");
            }
            other => panic!("expected a host failure, got {other:?}"),
        }
    }

    #[test]
    fn faulty_echoes_ordinary_payloads() {
        let (runtime, _) = runtime();
        let faulty = faulty(&runtime);
        let outputs = faulty.invoke(&[event(1, "d", "hello")]).unwrap();
        assert_eq!(
            outputs,
            [Output {
                topic: "sensors/d/telemetry".to_string(),
                payload: b"hello".to_vec(),
            }]
        );
    }

    #[test]
    fn a_panic_is_a_trap_that_carries_the_panic_message() {
        let (runtime, _) = runtime();
        match faulty(&runtime).invoke(&[event(1, "d", "trap")]) {
            Err(failure @ HandlerFailure::Trap(_)) => {
                assert_eq!(failure.reason(), "trap");
                assert!(failure.to_string().contains("requested trap"), "{failure}");
            }
            other => panic!("expected a trap, got {other:?}"),
        }
    }

    #[test]
    fn a_returned_error_is_a_handler_error() {
        let (runtime, _) = runtime();
        let failure = faulty(&runtime)
            .invoke(&[event(1, "d", "error")])
            .unwrap_err();
        assert!(matches!(&failure, HandlerFailure::Error(m) if m == "requested error"));
        assert_eq!(failure.reason(), "handler-error");
    }

    #[test]
    fn an_endless_loop_is_stopped_at_the_deadline() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            deadline: Duration::from_millis(200),
            ..RuntimeConfig::default()
        });
        let failure = faulty(&runtime)
            .invoke(&[event(1, "d", "loop")])
            .unwrap_err();
        assert!(matches!(failure, HandlerFailure::Timeout), "{failure:?}");
        assert_eq!(failure.reason(), "timeout");
    }

    #[test]
    fn unbounded_allocation_is_out_of_memory() {
        let (runtime, _) = runtime();
        let failure = faulty(&runtime)
            .invoke(&[event(1, "d", "grow")])
            .unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutOfMemory),
            "{failure:?}"
        );
        assert_eq!(failure.reason(), "out-of-memory");
    }

    #[test]
    fn a_handler_survives_its_failures() {
        let (runtime, _) = runtime();
        let faulty = faulty(&runtime);
        for payload in ["trap", "grow", "error"] {
            assert!(faulty.invoke(&[event(1, "d", payload)]).is_err());
            assert_eq!(faulty.invoke(&[event(2, "d", "ok")]).unwrap().len(), 1);
        }
    }

    #[test]
    fn too_many_outputs_is_an_output_limit_failure() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            max_outputs: 2,
            ..RuntimeConfig::default()
        });
        let faulty = faulty(&runtime);
        let batch: Vec<Event> = (0..3).map(|i| event(i, "d", "x")).collect();
        assert_eq!(faulty.invoke(&batch[..2]).unwrap().len(), 2);
        let failure = faulty.invoke(&batch).unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutputLimit(_)),
            "{failure:?}"
        );
        assert_eq!(failure.reason(), "output-limit");
    }

    #[test]
    fn too_many_output_bytes_is_an_output_limit_failure() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            max_output_bytes: 10,
            ..RuntimeConfig::default()
        });
        let faulty = faulty(&runtime);
        assert!(faulty.invoke(&[event(1, "d", "0123456789")]).is_ok());
        let failure = faulty.invoke(&[event(1, "d", "0123456789a")]).unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutputLimit(_)),
            "{failure:?}"
        );
    }

    #[test]
    fn garbage_is_not_wasm() {
        let (runtime, _) = runtime();
        let error = runtime.load("junk", b"hello, world").unwrap_err();
        assert!(matches!(error, LoadError::NotWasm { .. }), "{error:?}");
        assert!(
            error.to_string().contains("`junk` is not WebAssembly"),
            "{error}"
        );
        assert!(matches!(
            runtime.load("empty", b""),
            Err(LoadError::NotWasm { .. })
        ));
    }

    #[test]
    fn a_core_module_is_not_a_component() {
        let (runtime, _) = runtime();
        let error = runtime.load("core", b"\0asm\x01\0\0\0").unwrap_err();
        assert!(matches!(error, LoadError::NotComponent { .. }), "{error:?}");
        assert!(error.to_string().contains("not a component"), "{error}");
    }

    #[test]
    fn a_component_of_another_world_is_refused_naming_the_mismatch() {
        let (runtime, _) = runtime();
        let wasm = std::fs::read(crate::handlers::examples::guest_path("otherworld")).unwrap();
        let error = runtime.load("other", &wasm).unwrap_err();
        assert!(matches!(error, LoadError::WrongWorld { .. }), "{error:?}");
        assert!(
            error.to_string().contains("test:otherworld/clock"),
            "{error}"
        );
    }

    #[test]
    fn a_component_without_handle_is_the_wrong_world() {
        let (runtime, _) = runtime();
        // The smallest valid component: a header and nothing else.
        let error = runtime.load("empty", b"\0asm\x0d\0\x01\0").unwrap_err();
        assert!(matches!(error, LoadError::WrongWorld { .. }), "{error:?}");
        assert!(error.to_string().contains("handle"), "{error}");
    }

    #[test]
    fn a_truncated_component_is_invalid() {
        let (runtime, _) = runtime();
        let error = runtime.load("cut", &examples::ENRICH[..100]).unwrap_err();
        assert!(matches!(error, LoadError::Invalid { .. }), "{error:?}");
    }

    #[test]
    fn deadlines_never_fire_early() {
        assert_eq!(deadline_ticks(Duration::from_millis(200)), 21);
        assert_eq!(deadline_ticks(Duration::from_millis(1)), 2);
        assert_eq!(deadline_ticks(Duration::ZERO), 2);
        assert_eq!(deadline_ticks(Duration::MAX), u64::MAX / 4 + 1);
    }

    #[test]
    fn the_runtime_lives_as_long_as_its_last_handler() {
        let (runtime, _) = runtime();
        let shared = Arc::downgrade(&runtime.shared);
        let handler = runtime.load("enrich", examples::ENRICH).unwrap();
        drop(runtime);
        assert!(handler.invoke(&[event(1, "d", "{}")]).is_ok());
        drop(handler);
        assert!(shared.upgrade().is_none(), "nothing else holds the engine");
    }

    #[test]
    fn the_ticker_thread_stops_when_dropped() {
        let engine = Engine::new(&engine_config(&RuntimeConfig::default())).unwrap();
        let mut ticker = Ticker::start(engine).unwrap();
        let thread = ticker.thread.take().unwrap();
        assert!(!thread.is_finished());
        drop(ticker);
        let start = std::time::Instant::now();
        while !thread.is_finished() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            thread.is_finished(),
            "the ticker thread outlived its Ticker"
        );
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary() {
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(cut("ééé", 3), "é... [4 bytes cut]");
    }

    /// `n` events carrying a small JSON reading each.
    fn readings(n: u64) -> Vec<Event> {
        (0..n)
            .map(|i| event(i, "d", &format!(r#"{{"temp_c": {i}}}"#)))
            .collect()
    }

    #[test]
    fn fuel_is_reported_and_deterministic() {
        let (runtime, _) = runtime();
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        let one = enrich.invoke_metered(&readings(1));
        let again = enrich.invoke_metered(&readings(1));
        let ten = enrich.invoke_metered(&readings(10));
        assert_eq!(one.result.unwrap().len(), 1);
        assert_eq!(ten.result.unwrap().len(), 10);
        let (one, again, ten) = (one.fuel.unwrap(), again.fuel.unwrap(), ten.fuel.unwrap());
        assert!(one > 0);
        assert_eq!(one, again, "the same batch costs the same fuel");
        assert!(ten > one, "more work costs more fuel: {ten} vs {one}");
        assert_eq!(enrich.total_fuel(), one + again + ten);
        // A failed invocation is metered too.
        let failed = enrich.invoke_metered(&[event(1, "d", "not json")]);
        assert!(failed.result.is_err());
        assert!(failed.fuel.unwrap() > 0);
    }

    #[test]
    fn without_metering_there_is_no_fuel() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            meter_fuel: false,
            ..RuntimeConfig::default()
        });
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        let invocation = enrich.invoke_metered(&readings(1));
        assert!(invocation.result.is_ok());
        assert_eq!(invocation.fuel, None);
        assert_eq!(enrich.total_fuel(), 0);
    }

    #[test]
    fn invocations_report_their_warm_start() {
        let (runtime, _) = runtime();
        let enrich = runtime.load("enrich", examples::ENRICH).unwrap();
        assert!(enrich.compiled());
        assert!(enrich.load_time() > Duration::ZERO);
        let invocation = enrich.invoke_metered(&readings(1));
        assert!(invocation.result.is_ok());
        assert!(invocation.instantiate > Duration::ZERO);
        assert!(invocation.instantiate <= invocation.ran);
    }

    #[test]
    fn a_precompiled_artifact_loads_without_compiling() {
        let (runtime, _) = runtime();
        let compiled = runtime.load("enrich", examples::ENRICH).unwrap();
        let artifact = runtime.precompile("enrich", examples::ENRICH).unwrap();
        assert_eq!(artifact, compiled.artifact().unwrap());
        // SAFETY: made by `precompile` just above, never left this process.
        let loaded = unsafe { runtime.load_precompiled("enrich", &artifact) }.unwrap();
        assert!(!loaded.compiled());
        assert!(loaded.load_time() > Duration::ZERO);
        assert_eq!(loaded.version(), compiled.version());
        assert_eq!(
            loaded.invoke(&readings(3)).unwrap(),
            compiled.invoke(&readings(3)).unwrap()
        );
    }

    #[test]
    fn damaged_foreign_or_garbage_artifacts_are_refused() {
        let (runtime, _) = runtime();
        let artifact = runtime.precompile("enrich", examples::ENRICH).unwrap();
        let refused = |bytes: &[u8]| {
            // SAFETY: every input here is refused before any code is mapped (the checks run
            // first), which is what this test asserts.
            match unsafe { runtime.load_precompiled("enrich", bytes) } {
                Err(error @ LoadError::Artifact { .. }) => error.to_string(),
                other => panic!("expected LoadError::Artifact, got {other:?}"),
            }
        };

        let mut damaged = artifact.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x01;
        assert!(refused(&damaged).contains("damaged"));

        let mut cut = artifact.clone();
        cut.truncate(ARTIFACT_MAGIC.len() + 10);
        refused(&cut);

        assert!(refused(b"hello, world").contains("not an outpost precompiled artifact"));
        refused(b"");
        refused(examples::ENRICH);

        // Another engine configuration: another key.
        let (other, _) = runtime_with(RuntimeConfig {
            meter_fuel: false,
            ..RuntimeConfig::default()
        });
        assert_ne!(other.artifact_key(), runtime.artifact_key());
        let foreign = other.precompile("enrich", examples::ENRICH).unwrap();
        assert!(refused(&foreign).contains("compile the module again"));
        // The same configuration gives the same key, so artifacts survive a restart.
        let (same, _) = self::runtime();
        assert_eq!(same.artifact_key(), runtime.artifact_key());
    }

    /// Polls `check` every millisecond for up to 30 s.
    fn wait_until(what: &str, check: impl Fn() -> bool) {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for: {what}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_busy_module_makes_its_own_invocations_wait_not_the_others() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            max_concurrent: 4,
            max_concurrent_per_module: 1,
            ..RuntimeConfig::default()
        });
        let busy = faulty(&runtime);
        let other = runtime.load(
            "other",
            &std::fs::read(examples::guest_path("faulty")).unwrap(),
        );
        let other = other.unwrap();
        // Long enough that the observations below happen while it runs, however slow the
        // machine; the test takes this long.
        let looping = InvokeLimits {
            deadline: Duration::from_secs(4),
            ..runtime.default_limits()
        };
        let first = {
            let busy = busy.clone();
            std::thread::spawn(move || busy.invoke_limited(&[event(1, "d", "loop")], &looping))
        };
        wait_until("the loop runs", || {
            runtime.running_invocations() == 1 && runtime.waiting_invocations() == 0
        });
        let second = {
            let busy = busy.clone();
            std::thread::spawn(move || busy.invoke_metered(&[event(2, "d", "ok")]))
        };
        wait_until("the second invocation waits", || {
            runtime.waiting_invocations() == 1
        });
        // Another module is not held up by the busy one.
        assert_eq!(other.invoke(&[event(3, "d", "ok")]).unwrap().len(), 1);
        assert!(!first.is_finished(), "the loop ended before its deadline");
        assert_eq!(runtime.waiting_invocations(), 1);

        let first = first.join().unwrap();
        let second = second.join().unwrap();
        assert!(matches!(first.result, Err(HandlerFailure::Timeout)));
        assert_eq!(second.result.unwrap().len(), 1);
        assert!(second.waited > Duration::ZERO);
        assert_eq!(runtime.running_invocations(), 0);
        assert_eq!(runtime.waiting_invocations(), 0);
        // The busy module never ran two at once; with the other one, two ran at once.
        let c = runtime.concurrency();
        assert_eq!((c.running, c.waiting, c.peak), (0, 0, 2), "{c:?}");
        assert_eq!(c.module_peaks.get("faulty"), Some(&1), "{c:?}");
        assert_eq!(c.module_peaks.get("other"), Some(&1), "{c:?}");
    }

    #[test]
    fn a_route_may_only_lower_the_memory_cap() {
        let (runtime, _) = runtime();
        let defaults = runtime.default_limits();
        assert_eq!(defaults.memory_limit_bytes, 32 * 1024 * 1024);
        let higher = InvokeLimits {
            memory_limit_bytes: 1 << 30,
            ..defaults
        };
        assert_eq!(runtime.effective_limits(&higher), defaults);
        let lower = InvokeLimits {
            memory_limit_bytes: 8 * 1024 * 1024,
            ..defaults
        };
        assert_eq!(runtime.effective_limits(&lower), lower);

        let faulty = faulty(&runtime);
        // Holding a 12 MiB line fits the runtime's 32 MiB, not the route's 8 MiB.
        let batch = [event(1, "d", "huge-log:12")];
        assert!(faulty.invoke_limited(&batch, &defaults).result.is_ok());
        let failure = faulty.invoke_limited(&batch, &lower).result.unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutOfMemory),
            "{failure:?}"
        );
        let grow = faulty.invoke_limited(&[event(2, "d", "grow")], &lower);
        assert!(matches!(grow.result, Err(HandlerFailure::OutOfMemory)));
        // A higher cap is clamped: 40 MiB does not fit.
        let failure = faulty
            .invoke_limited(&[event(3, "d", "huge-log:40")], &higher)
            .result
            .unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutOfMemory),
            "{failure:?}"
        );
        // The handler is unharmed.
        assert!(faulty.invoke_limited(&batch, &defaults).result.is_ok());
    }

    #[test]
    fn a_route_sets_its_own_output_caps_and_deadline() {
        let (runtime, _) = runtime_with(RuntimeConfig {
            deadline: Duration::from_secs(120),
            ..RuntimeConfig::default()
        });
        let faulty = faulty(&runtime);
        let defaults = runtime.default_limits();
        let hundred = [event(1, "d", "many-outputs:100")];
        assert_eq!(faulty.invoke(&hundred).unwrap().len(), 100);
        let fifty = InvokeLimits {
            max_outputs: 50,
            ..defaults
        };
        match faulty.invoke_limited(&hundred, &fifty).result {
            Err(failure @ HandlerFailure::OutputLimit(_)) => {
                assert!(failure.to_string().contains("100 outputs, at most 50"));
            }
            other => panic!("expected an output limit, got {other:?}"),
        }

        let ten_bytes = InvokeLimits {
            max_output_bytes: 10,
            ..defaults
        };
        let fits = faulty.invoke_limited(&[event(2, "d", "0123456789")], &ten_bytes);
        assert!(fits.result.is_ok());
        let over = faulty.invoke_limited(&[event(3, "d", "0123456789a")], &ten_bytes);
        assert!(matches!(over.result, Err(HandlerFailure::OutputLimit(_))));

        // The runtime's deadline is two minutes; the route's stops the loop long before.
        let short = InvokeLimits {
            deadline: Duration::from_millis(100),
            ..defaults
        };
        let looped = faulty.invoke_limited(&[event(4, "d", "loop")], &short);
        assert!(matches!(looped.result, Err(HandlerFailure::Timeout)));
        assert!(looped.ran < Duration::from_secs(60));
    }

    #[test]
    fn ten_mib_of_output_is_an_output_limit_failure() {
        let (runtime, _) = runtime();
        let failure = faulty(&runtime)
            .invoke(&[event(1, "d", "big-output")])
            .unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutputLimit(_)),
            "{failure:?}"
        );
        assert!(
            failure
                .to_string()
                .contains("10485760 payload bytes, at most 8388608 allowed"),
            "{failure}"
        );
    }

    #[test]
    fn thousands_of_outputs_are_fine_up_to_the_cap() {
        let (runtime, _) = runtime();
        let faulty = faulty(&runtime);
        assert_eq!(
            faulty
                .invoke(&[event(1, "d", "many-outputs")])
                .unwrap()
                .len(),
            5_000
        );
        let failure = faulty
            .invoke(&[event(2, "d", "many-outputs:10001")])
            .unwrap_err();
        assert!(
            failure.to_string().contains("10001 outputs, at most 10000"),
            "{failure}"
        );
    }

    #[test]
    fn outputs_too_large_to_copy_out_are_an_output_limit_failure() {
        let (runtime, _) = runtime();
        let faulty = faulty(&runtime);
        let limits = runtime.default_limits();
        let batch = [event(1, "d", "many-outputs:100")];
        // 100 outputs take more than 1 KiB on the host.
        let failure = faulty.run(&batch, &limits, 1024).result.unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutputLimit(_)),
            "{failure:?}"
        );
        assert!(
            failure.to_string().contains("too large to copy"),
            "{failure}"
        );
        assert!(limits.hostcall_fuel() >= 2 * limits.memory_limit_bytes);
    }

    /// Log output written while `f` runs on this thread.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let result = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
        (result, text)
    }

    #[test]
    fn a_huge_log_line_is_cut_and_the_invocation_goes_on() {
        let (runtime, _) = runtime();
        let faulty = faulty(&runtime);
        let (outputs, log) = logged(|| faulty.invoke(&[event(1, "d", "huge-log:8")]));
        assert_eq!(outputs.unwrap()[0].payload, b"huge-log:8");
        assert!(log.len() < 8 * 1024, "{} bytes logged", log.len());
        assert!(
            log.contains(&format!("[{} bytes cut]", 8 * 1024 * 1024 - 4096)),
            "{log}"
        );
        // 50 MiB do not even fit in the guest's 32 MiB.
        let failure = faulty.invoke(&[event(2, "d", "huge-log")]).unwrap_err();
        assert!(
            matches!(failure, HandlerFailure::OutOfMemory),
            "{failure:?}"
        );
    }

    #[test]
    fn key_value_abuse_traps_naming_the_limit() {
        let (runtime, kv) = runtime();
        let faulty = faulty(&runtime);
        for (payload, expected) in [
            ("huge-key", "key of 10485760 bytes, at most 1024 allowed"),
            (
                "huge-value",
                "value of 10485760 bytes, at most 1048576 allowed",
            ),
            (
                "kv-flood",
                "more than 8388608 bytes written in one invocation",
            ),
        ] {
            match faulty.invoke(&[event(1, "d", payload)]) {
                Err(failure @ HandlerFailure::Trap(_)) => {
                    assert_eq!(failure.reason(), "trap");
                    assert!(
                        failure.to_string().contains(expected),
                        "{payload}: {failure}"
                    );
                }
                other => panic!("{payload}: expected a trap, got {other:?}"),
            }
            // The handler is unharmed.
            assert_eq!(faulty.invoke(&[event(2, "d", "ok")]).unwrap().len(), 1);
        }
        assert!(kv.values.lock().unwrap().is_empty(), "nothing was written");
    }

    #[test]
    fn runtime_and_handler_are_shareable() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Runtime>();
        shareable::<Handler>();
    }
}
