//! The checks of `tests/fuzz.rs`, for libFuzzer: each binary under `fuzz_targets/` runs one
//! target's check on every input libFuzzer makes, and turns a failed property into a panic
//! (which libFuzzer reports as a crash, with the input saved under `fuzz/artifacts/`).

#[path = "../../tests/fuzz/targets.rs"]
pub mod targets;

use std::sync::OnceLock;

/// Runs the check of the target `name` (set up once) on `data`; panics when a property fails.
pub fn run(cell: &'static OnceLock<targets::Target>, name: &str, data: &[u8]) {
    let target = cell.get_or_init(|| targets::by_name(name).expect("a known fuzz target"));
    if let Err(message) = (target.check)(data) {
        panic!("fuzz target {name}: property failed: {message}");
    }
}
