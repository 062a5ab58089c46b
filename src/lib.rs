//! outpost: an edge gateway.
//!
//! Local devices publish telemetry to the embedded MQTT broker ([`edge`]). Each publish becomes
//! an [`event::Event`]; the [`router`] decides by topic which routes it belongs to; a route may
//! run a sandboxed WebAssembly handler on it ([`runtime`]); the results are committed to a
//! SQLite outbox ([`store`]) before anything is sent, and the [`uplink`] drains the outbox to
//! the upstream broker in order, deleting a row only when the upstream acknowledged it.
//! [`pipeline`] is the stage that turns events into outbox rows; [`gateway`] wires the stages
//! together and owns their lifecycle. [`control`] answers the dead-letter control topics (list,
//! show, replay, purge) on the embedded broker. [`signing`] defines what a handler module's
//! Ed25519 signature covers, the key files and the signed-module envelope that deploys carry.

pub mod breaker;
pub mod config;
pub mod control;
pub mod deploy;
pub mod deploy_client;
pub mod edge;
pub mod event;
pub mod examples;
pub mod files;
pub mod gateway;
pub mod geo;
pub mod journal;
pub mod locator;
pub mod metrics;
pub mod modules;
pub mod notify;
pub mod operator;
pub mod pipeline;
pub mod predicate;
pub mod router;
pub mod runtime;
pub mod signing;
pub mod store;
pub mod uplink;
