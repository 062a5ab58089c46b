#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (Mosquitto as the real
# upstream broker), then formatting, lints, and every test. The Rust toolchain and the
# wasm32-wasip2 target come from rust-toolchain.toml through rustup.
set -euo pipefail
# Incremental artifacts are useless on a clean checkout and cost gigabytes of disk.
export CARGO_INCREMENTAL=0
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (the tests' upstream broker)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto >/dev/null
fi

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== tests"
cargo test --locked
