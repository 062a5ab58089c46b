#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ (the targets of tests/fuzz.rs, under coverage-guided
# fuzzing with AddressSanitizer) for SECS seconds each (default 60), when the nightly toolchain
# and cargo-fuzz are installed; otherwise says in one line that it did not run, and succeeds.
#
#   scripts/fuzz-nightly.sh [SECS] [TARGET...]
#
# Needs: `cargo +nightly` with the wasm32-wasip2 target (outpost's build script builds the
# handler guests; `rustup target add wasm32-wasip2 --toolchain nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). The corpus grows in fuzz/corpus/<target>/ (seeded from the
# corpus of tests/fuzz.rs); a crash is saved in fuzz/artifacts/<target>/ and ends the run with
# a failure: `cargo +nightly fuzz run <target> <file>` repeats it, and the input belongs in a
# regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(frames config geojson envelope command keys control_request control_reply uplink_packets)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz-nightly: NOT run: no nightly toolchain (cargo +nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-nightly: NOT run: cargo-fuzz is not installed (cargo install cargo-fuzz)"
    exit 0
fi
if ! rustup +nightly target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "fuzz-nightly: NOT run: nightly lacks wasm32-wasip2 (rustup target add wasm32-wasip2 --toolchain nightly)"
    exit 0
fi

corpus="fuzz/corpus"
mkdir -p "$corpus"
# The seeds, dictionaries and input limits of tests/fuzz.rs, written by that test binary.
OUTPOST_FUZZ_CORPUS="$PWD/$corpus" cargo test --quiet --test fuzz -- --ignored --exact \
    write_libfuzzer_corpus >/dev/null

echo "== building the fuzz targets (nightly, AddressSanitizer)"
cargo +nightly fuzz build --fuzz-dir fuzz

failed=()
for target in "${targets[@]}"; do
    max_len="$(cat "$corpus/$target.max_len")"
    echo "== fuzz $target for ${secs}s"
    # -malloc_limit_mb matches tests/fuzz.rs's ALLOC_LIMIT; -timeout is its case limit.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus/$target" -- \
        -max_total_time="$secs" -max_len="$max_len" -dict="$corpus/$target.dict" \
        -timeout=30 -rss_limit_mb=2048 -malloc_limit_mb=64 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-nightly: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz-nightly: ${#targets[@]} target(s), ${secs}s each: nothing found"
