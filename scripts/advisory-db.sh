#!/usr/bin/env bash
# Installs the RustSec advisory-database snapshot where cargo-deny reads it (see
# scripts/setup.sh), so that the supply-chain check runs offline on its own:
#
#   bash scripts/advisory-db.sh && cargo deny --offline check advisories
#
# scripts/test.sh does the same before its `cargo deny` step.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
snapshot="$(advisory_db_snapshot)"
[ -n "$snapshot" ] || setup_fail "no advisory database snapshot (OUTPOST_ADVISORY_DB is empty or names no snapshot): run 'cargo deny check' with network access instead"
setup_advisory_db "$snapshot"
