#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (Mosquitto as the real
# upstream broker), then formatting, lints, and every test. The Rust toolchain and the
# wasm32-wasip2 target come from rust-toolchain.toml through rustup.
set -euo pipefail
# Incremental artifacts are useless on a clean checkout and cost gigabytes of disk.
export CARGO_INCREMENTAL=0
cd "$(dirname "$0")/.."

# What the tests need from Debian: Mosquitto (the upstream broker of the integration tests),
# and for the board tests the cross toolchains (linkers, and objdump for the glibc check) and
# qemu-user to run the aarch64 and armv7 binaries.
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu"
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || missing="$missing gcc-arm-linux-gnueabihf"
command -v qemu-aarch64-static >/dev/null 2>&1 && command -v qemu-arm-static >/dev/null 2>&1 \
    || missing="$missing qemu-user-static"
if [ -n "$missing" ]; then
    echo "== installing:$missing"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== tests"
cargo test --locked
echo "== board binaries (aarch64, armv7; profile board) and their tests under qemu"
for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    cargo build --locked --profile board --target "$target" --bin outpost
done
cargo test --locked --test boards -- --ignored
echo "== Debian package (host architecture): build it, then install, upgrade, remove, purge"
# The package test checks the packaging (maintainer scripts, conffile, service unit), not the
# binary's speed, so it packs the debug binary the tests above built instead of spending
# another 7 minutes on a host board build (the board profile is built above for both boards;
# cargo-deb warns that dev is not a release profile). Release packages: README "Put it on a
# board" (--profile board).
cargo build --locked --bin outpost
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb --version 3.8.0
cargo deb --no-build --profile dev
if [ "$(id -u)" -eq 0 ]; then
    cargo test --locked --test package -- --ignored
else
    echo "!! package test NOT run: it installs with dpkg and needs root"
fi
