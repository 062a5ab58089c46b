//! libFuzzer target `uplink_packets` (see tests/fuzz/targets.rs).
#![no_main]

static TARGET: std::sync::OnceLock<outpost_fuzz::targets::Target> = std::sync::OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| outpost_fuzz::run(&TARGET, "uplink_packets", data));
