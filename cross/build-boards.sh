#!/usr/bin/env bash
# Builds outpost for both boards without a container engine, as CI does (scripts/test.sh
# calls this): `--profile board` for aarch64 (64-bit boards) and armv7 (32-bit Raspberry Pi
# OS), linked, and their C code (SQLite, and ring, the TLS crypto provider) compiled, by
# Debian's gcc cross toolchains, which .cargo/config.toml names. Debian 12's
# toolchains link against glibc 2.36, the boards' (Raspberry Pi OS Bookworm).
#
#     sudo apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
#     cross/build-boards.sh            # then target/<target>/board/outpost
#
# Extra arguments go to the `cargo build`. With Docker or Podman, `cross` builds the same
# with the images of Cross.toml instead (cross/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

boards=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
for gcc in aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu arm-linux-gnueabihf-gcc:gcc-arm-linux-gnueabihf; do
    command -v "${gcc%%:*}" >/dev/null 2>&1 \
        || setup_fail "${gcc%%:*} is not installed: the board builds need Debian's cross toolchain (apt-get install ${gcc#*:})"
done
setup_rust_targets wasm32-wasip2 "${boards[@]}"

# One cargo for both targets: each build ends in a long single-threaded fat-LTO link, and one
# build's link overlaps the other's compiling (13 min 13 s here against 16 min 24 s one
# after the other, BENCHMARKS "TLS on the uplink").
echo "== cargo build --profile board --target ${boards[*]}"
cargo build --locked --profile board "${boards[@]/#/--target=}" --bin outpost "$@"
ls -l target/aarch64-unknown-linux-gnu/board/outpost target/armv7-unknown-linux-gnueabihf/board/outpost
