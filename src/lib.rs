//! outpost: an edge gateway.
//!
//! Local devices publish telemetry to the embedded MQTT broker; each publish is journaled
//! before it is acknowledged, routed by topic, content and location, handed to the operator's
//! sandboxed WebAssembly handlers where a route says so, and committed to a SQLite outbox that
//! the uplinks drain to the upstream brokers, deleting a row only once the upstream has
//! acknowledged it.
//!
//! # Layout
//!
//! The modules follow the data path, in the order an event visits them:
//!
//! 1. [`edge`]: the embedded MQTT broker. `front` accepts device connections (TLS, logins,
//!    limits) and parses packets (`frame`); `broker` keeps sessions, subscriptions, retained
//!    messages and local deliveries.
//! 2. `journal`: every device publish is written here (durably) before its PUBACK.
//! 3. `pipeline`: reads the journal, decides per route what to do with each event, runs
//!    handlers, and commits the results to the outbox, retries and dead letters in one
//!    transaction.
//!    - [`routing`]: the route table (topic filters, output templates) and the `when`
//!      predicates; the pure routing decision.
//!    - [`geo`]: geometry and GeoJSON, the locator (where an event happened, geofence
//!      transitions) and residency (which link may carry which region's data).
//!    - [`handlers`]: the WebAssembly runtime, the module registry, the circuit breaker and
//!      the handlers' key-value state.
//! 4. [`store`]: the SQLite database behind the journal, the outbox, retries, dead letters,
//!    devices, modules and the handlers' state.
//! 5. [`uplink`]: one session per upstream broker, draining its outbox in order.
//!
//! Beside the path:
//!
//! - [`control`]: the control topics on the gateway's broker (dead letters, modules, metrics).
//! - [`client`]: the operator's side of those topics (`outpost deadletters`, `outpost module`).
//! - [`config`]: the typed configuration, its defaults and the checks of its own fields.
//! - [`plan`]: turns a configuration into what the gateway runs (route table, geography,
//!   policies, runtime settings, links, files read), or the first error in it.
//! - [`gateway`]: starts the stages of a [`plan`] in path order, stops them in reverse, and
//!   owns their lifecycle; `shutdown` is the signal that tells a stage's tasks to stop.
//! - [`metrics`], [`event`], [`signing`], [`topic`], [`files`], [`notify`]: shared vocabulary
//!   and support.
//! - `pem`: support for credential files (certificates, keys, passwords), read and checked
//!   alike for the edge's listeners, the uplinks and the operator's commands.
//!
//! The binary's operator tools (`outpost bench`, `outpost demo`) live in `src/cli/`, outside
//! the library.

// The data path, in the order an event visits it (see `# Layout`).
pub mod edge;
pub(crate) mod journal;
pub(crate) mod pipeline;

// The pipeline's tools.
pub mod geo;
pub mod handlers;
pub mod routing;

// Where results wait, and where they go.
pub mod store;
pub mod uplink;

// Beside the path.
pub mod client;
pub mod config;
pub mod control;
pub mod gateway;
pub mod plan;
pub(crate) mod shutdown;

// Shared vocabulary and support.
pub mod event;
pub mod files;
pub mod metrics;
pub mod notify;
pub(crate) mod pem;
pub mod signing;
pub mod topic;
