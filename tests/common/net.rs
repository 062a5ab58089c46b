//! Ports on 127.0.0.1, for the tests (through `common`) and the benchmarks (which include this
//! file by its path: they cannot use `common`, which needs the test's `outpost` binary).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A port that was free a moment ago, below the kernel's ephemeral range.
///
/// Not a port the kernel hands out for `bind(0)`: that range is also where every outgoing
/// connection gets its local port, so between this check and the server's bind a test's
/// client could take it ("Address already in use"). Below the range only another server can,
/// and each call in this process tries the next port, so two tests never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let highest = ephemeral_start().saturating_sub(1).max(LOWEST + 1_000);
    let span = highest - LOWEST;
    // Each test process starts somewhere else in the span, so that test binaries run one
    // after another do not reuse the ports their predecessors' servers may still hold.
    let start = (std::process::id().wrapping_mul(7_919)) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = (LOWEST + offset) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOWEST} and {highest}");
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Waits until something listens on `port`; panics after `patience`.
pub fn wait_for_port(port: u16, patience: Duration) {
    let deadline = Instant::now() + patience;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
