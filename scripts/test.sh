#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need (Mosquitto as the real
# upstream broker, the cross toolchains, qemu, the Rust targets and components of
# rust-toolchain.toml, cargo-deny), then formatting, the supply-chain check, lints, and every
# test. Whatever cannot be installed stops it with an `error:` line; nothing is skipped
# (except the package test when not root, which it says).
set -euo pipefail
# Incremental artifacts are useless on a clean checkout and cost gigabytes of disk.
export CARGO_INCREMENTAL=0
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

# What the tests need from Debian: Mosquitto (the upstream broker of the integration tests, and
# the reference the local broker's conformance tests are run against too) and its clients,
# openssl (certificates made the way operators make them, tests/tls.rs), the system's CA
# certificates (mqtts:// without cafile), and for the board tests the cross toolchains
# (linkers, and objdump for the glibc check) and qemu-user to run the aarch64 and armv7
# binaries.
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
# mosquitto_pub and mosquitto_sub: real MQTT 3.1.1 and 5 clients of the local broker's tests.
command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 \
    || missing="$missing mosquitto-clients"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing="$missing ca-certificates"
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

# rustup adds the toolchain file's components and targets only to a toolchain it installs
# itself (scripts/setup.sh).
setup_rust_components rustfmt clippy
setup_rust_targets wasm32-wasip2 aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf

echo "== rustfmt"
cargo fmt --all -- --check

echo "== supply chain: cargo deny (advisories, licences, duplicate versions, sources; deny.toml)"
setup_cargo_deny
# The RustSec advisory database: offline from a snapshot (scripts/setup.sh says which: the
# machines that build outpost here cannot reach GitHub), or the one cargo-deny fetches when
# OUTPOST_ADVISORY_DB is set empty.
snapshot="$(advisory_db_snapshot)"
deny_flags=(--workspace --locked)
if [ -n "$snapshot" ]; then
    setup_advisory_db "$snapshot"
    deny_flags+=(--offline)
else
    echo "   with the advisory database cargo-deny fetches (OUTPOST_ADVISORY_DB is empty or names no snapshot)"
    # A snapshot copied here earlier is no clone cargo-deny can update.
    if [ -e "$ADVISORY_DB/.outpost-snapshot" ]; then rm -rf "$ADVISORY_DB"; fi
fi
cargo deny "${deny_flags[@]}" check \
    || setup_fail "cargo deny check failed (see above): an open advisory, a licence deny.toml does not allow, a duplicate version it does not skip or a source other than crates.io; or the advisory database could not be read or fetched"

echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== tests"
cargo test --locked
echo "== fuzzing: every target of tests/fuzz.rs for 10 s more (the run above gave each 2 s)"
OUTPOST_FUZZ_SECS=10 cargo test --locked --test fuzz
echo "== board binaries (aarch64, armv7; profile board) and their tests under qemu"
bash cross/build-boards.sh
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
