//! The handler components built from `modules/` by `build.rs`, embedded in the binary so a
//! fresh gateway can run the examples without deploying anything.

use std::path::PathBuf;

/// The `enrich` example handler (a `wasm32-wasip2` component): adds `device`, `received_ms`
/// and a converted temperature to JSON-object payloads, publishing on `enriched/<device>`.
pub const ENRICH: &[u8] = include_bytes!(concat!(env!("OUTPOST_GUEST_DIR"), "/enrich.wasm"));

/// The `threshold` example handler (a `wasm32-wasip2` component): raises and clears
/// temperature alerts with hysteresis, publishing on `alerts/<device>`, with its per-device
/// state in the key-value store.
pub const THRESHOLD: &[u8] = include_bytes!(concat!(env!("OUTPOST_GUEST_DIR"), "/threshold.wasm"));

/// The path, fixed at build time, of the built guest component `name` (`enrich`,
/// `threshold`, `faulty` or `passthrough`). Only the examples are embedded; tests read other guests, such as
/// the misbehaving `faulty` fixture, from here. The file exists as long as the build
/// directory does.
pub fn guest_path(name: &str) -> PathBuf {
    PathBuf::from(env!("OUTPOST_GUEST_DIR")).join(format!("{name}.wasm"))
}
