//! What the benchmarks share: free ports, settings from the environment, medians.

#![allow(dead_code)]

#[path = "../../tests/common/net.rs"]
mod net;

#[allow(unused_imports)]
pub use net::{free_port, wait_for_port};

/// The number in the environment variable `name`, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (the upper one of an even count); sorts `values`.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

/// The `p` quantile (0.0 to 1.0), nearest rank; sorts `values`.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[((values.len() - 1) as f64 * p).round() as usize]
}
