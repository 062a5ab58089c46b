//! Ports on 127.0.0.1, for the tests (through `common`) and the benchmarks (which include this
//! file by its path: they cannot use `common`, which needs the test's `outpost` binary).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Waits until something listens on `port`; panics after `patience`.
pub fn wait_for_port(port: u16, patience: Duration) {
    let deadline = Instant::now() + patience;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
