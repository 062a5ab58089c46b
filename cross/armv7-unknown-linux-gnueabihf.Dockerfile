# The image `cross` builds outpost for armv7-unknown-linux-gnueabihf in (Cross.toml points
# here): cross 0.2.5's own image for the target, pinned, and what outpost's C code needs.
#
# The base is Ubuntu 16.04, glibc 2.23: older than the boards' 2.36 (Raspberry Pi OS
# Bookworm), so the binaries run there. The tag is written here rather than taken from the
# CROSS_BASE_IMAGE build argument cross passes, which is the default image of whichever cross
# version runs; and Cross.toml sets no `image` for this target, which would make cross 0.2.5
# tag this build with that name, shadowing the upstream image.
FROM ghcr.io/cross-rs/armv7-unknown-linux-gnueabihf:0.2.5

# outpost compiles C for the target: SQLite (rusqlite's `bundled`) and ring 0.17, the TLS
# crypto provider (C files and pregenerated assembly; on Linux it needs only the target's C
# compiler, no clang, perl or nasm). The base image has the GCC cross toolchain
# (g++-arm-linux-gnueabihf, libc6-dev-armhf-cross) and sets
# CC_armv7_unknown_linux_gnueabihf, but not AR_armv7_unknown_linux_gnueabihf, which the cc
# crate otherwise guesses. The toolchain is installed only if a base image lacks it (Ubuntu
# 16.04's archive may not answer any more); either way the build stops here if it does not
# run.
RUN if ! command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install --assume-yes --no-install-recommends \
            gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && arm-linux-gnueabihf-gcc --version \
    && arm-linux-gnueabihf-ar --version
ENV CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc \
    AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
