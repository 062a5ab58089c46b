#!/usr/bin/env bash
# The demo, as the README runs it: makes sure the pinned toolchain has the wasm32-wasip2
# target the example handlers are built for (rustup does not add it to a toolchain that is
# already installed; see scripts/setup.sh), then `cargo run --release -- demo` with this
# script's arguments (e.g. --phase-secs 5 --devices 4).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

setup_rust_targets wasm32-wasip2
exec cargo run --release -- demo "$@"
