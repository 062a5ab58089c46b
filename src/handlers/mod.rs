//! Handlers: the operator's sandboxed WebAssembly functions and everything that decides which
//! one runs and whether it may.
//!
//! - [`runtime`]: the wasmtime engine, the handler world, and the limits of one invocation
//!   (deadline, memory, outputs, concurrency).
//! - [`registry`]: which handler each module name runs now (configured file or signed deploy),
//!   and the operations that change it.
//! - [`breaker`]: the circuit breaker that quarantines a module whose invocations keep failing.
//! - [`kv`]: the handlers' key-value state, kept in the [`crate::store::Store`].
//! - [`examples`]: the example components embedded in the binary.
//!
//! The pipeline calls into this stage; nothing here reads the journal or writes the outbox.

pub mod breaker;
pub mod examples;
pub(crate) mod kv;
pub(crate) mod registry;
pub mod runtime;
