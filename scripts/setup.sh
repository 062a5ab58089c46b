# Set-up shared by the README's commands (scripts/demo.sh, scripts/test.sh); sourced, not run.
# Each function checks first and installs only what is missing, so a machine that has
# everything does not need the network; what cannot be installed stops the command with one
# `error:` line naming it (nothing is skipped).
#
# Why this is needed: rustup installs the components and targets that rust-toolchain.toml
# lists only together with a toolchain it installs itself. Where the pinned toolchain is
# already installed (with only its host target, say), the targets are not added, and the
# build stops in build.rs ("the Rust target wasm32-wasip2 is not installed").

# The toolchain rust-toolchain.toml pins, for messages.
outpost_toolchain() {
    sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml
}

# plural N ONE MANY: ONE if N is 1, else MANY.
plural() {
    if [ "$1" -eq 1 ]; then echo "$2"; else echo "$3"; fi
}

# setup_fail MESSAGE: the one line a failed set-up prints, then the command stops.
setup_fail() {
    echo "error: $*" >&2
    exit 1
}

# setup_toolchain: the toolchain of rust-toolchain.toml, installed by rustup if it is not
# there (rustup does that by itself unless RUSTUP_AUTO_INSTALL=0).
setup_toolchain() {
    rustc --version >/dev/null 2>&1 && return 0
    command -v rustup >/dev/null 2>&1 \
        || setup_fail "rustc does not run and rustup is not installed: install Rust with rustup, then run this command again"
    echo "== installing the Rust toolchain $(outpost_toolchain) (rust-toolchain.toml)"
    # Without arguments (rustup 1.28 or newer): the toolchain file's toolchain, with its
    # components and targets.
    rustup toolchain install \
        || setup_fail "the Rust toolchain $(outpost_toolchain) of rust-toolchain.toml is not installed and 'rustup toolchain install' failed (see above)"
    rustc --version >/dev/null 2>&1 \
        || setup_fail "rustc of the toolchain $(outpost_toolchain) does not run after 'rustup toolchain install' (see above)"
}

# rust_target_installed TARGET: whether the toolchain has the standard library for TARGET
# (the same test as build.rs).
rust_target_installed() {
    local libdir
    libdir=$(rustc --print target-libdir --target "$1" 2>/dev/null) || return 1
    [ -n "$libdir" ] && [ -d "$libdir" ]
}

# setup_rust_targets TARGET...: the toolchain and these targets of it.
setup_rust_targets() {
    setup_toolchain
    local missing=() target
    for target in "$@"; do
        rust_target_installed "$target" || missing+=("$target")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local what
    what="$(plural ${#missing[@]} "the Rust target" "the Rust targets") ${missing[*]} of toolchain $(outpost_toolchain) (rust-toolchain.toml) $(plural ${#missing[@]} is are)"
    command -v rustup >/dev/null 2>&1 \
        || setup_fail "$what not installed, and rustup, which installs targets, is not there: install $(plural ${#missing[@]} it them), then run this command again"
    echo "== installing $(plural ${#missing[@]} "the Rust target" "the Rust targets") ${missing[*]} (rustup target add)"
    rustup target add "${missing[@]}" \
        || setup_fail "$what not installed and 'rustup target add ${missing[*]}' failed (see above): install $(plural ${#missing[@]} it them), then run this command again"
    for target in "${missing[@]}"; do
        rust_target_installed "$target" \
            || setup_fail "the Rust target $target is still not installed after 'rustup target add $target'"
    done
}

# setup_rust_components COMPONENT...: the toolchain and these components of it (rustfmt,
# clippy: the ones the test command runs).
setup_rust_components() {
    setup_toolchain
    local missing=() component
    for component in "$@"; do
        rust_component_runs "$component" || missing+=("$component")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local what
    what="$(plural ${#missing[@]} "the Rust component" "the Rust components") ${missing[*]} of toolchain $(outpost_toolchain) (rust-toolchain.toml) $(plural ${#missing[@]} is are)"
    command -v rustup >/dev/null 2>&1 \
        || setup_fail "$what not installed, and rustup, which installs components, is not there: install $(plural ${#missing[@]} it them), then run this command again"
    echo "== installing $(plural ${#missing[@]} "the Rust component" "the Rust components") ${missing[*]} (rustup component add)"
    rustup component add "${missing[@]}" \
        || setup_fail "$what not installed and 'rustup component add ${missing[*]}' failed (see above): install $(plural ${#missing[@]} it them), then run this command again"
    for component in "${missing[@]}"; do
        rust_component_runs "$component" \
            || setup_fail "the Rust component $component still does not run after 'rustup component add $component'"
    done
}

# rust_component_runs COMPONENT: whether the component's tool runs.
rust_component_runs() {
    case "$1" in
        rustfmt) rustfmt --version >/dev/null 2>&1 ;;
        clippy) cargo clippy --version >/dev/null 2>&1 ;;
        *) rustup component list --installed 2>/dev/null | grep -q "^$1" ;;
    esac
}

# The cargo-deny scripts/test.sh runs (deny.toml is written for 0.20).
CARGO_DENY_VERSION=0.20.2

# setup_cargo_deny: cargo-deny 0.20, built from crates.io by `cargo install --locked` if it is
# not there. Without cargo-deny's fat LTO and single codegen unit (its release profile) the
# build takes about 2.5 minutes on 2 cores instead of 3, and the check runs as fast.
setup_cargo_deny() {
    case "$(cargo deny --version 2>/dev/null)" in
        "cargo-deny 0.20."*) return 0 ;;
    esac
    echo "== installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked; a few minutes)"
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION" \
        || setup_fail "cargo-deny $CARGO_DENY_VERSION is not installed and 'cargo install --locked cargo-deny --version $CARGO_DENY_VERSION' failed (see above)"
    case "$(cargo deny --version 2>/dev/null)" in
        "cargo-deny 0.20."*) ;;
        *) setup_fail "cargo deny does not run after installing cargo-deny $CARGO_DENY_VERSION (is ~/.cargo/bin on PATH?)" ;;
    esac
}

# Where cargo-deny 0.20 keeps the RustSec database of its default URL: deny.toml's db-path plus
# advisory-db-<hash of the URL>, a git repository (it reads the HEAD commit's time).
ADVISORY_DB=target/advisory-dbs/advisory-db-3157b0e258782691

# advisory_db_snapshot: the advisory-database snapshot to check against offline, or nothing
# (cargo-deny then fetches the database itself). OUTPOST_ADVISORY_DB names one (empty: none);
# else ../shared/advisory-db when the machine has it (it may be newer), else the copy in the
# repository (supply-chain/advisory-db), so that a clone anywhere checks offline.
advisory_db_snapshot() {
    local candidate
    if [ -n "${OUTPOST_ADVISORY_DB+set}" ]; then
        [ -n "$OUTPOST_ADVISORY_DB" ] && [ -d "$OUTPOST_ADVISORY_DB/crates" ] && echo "$OUTPOST_ADVISORY_DB"
        return 0
    fi
    for candidate in ../shared/advisory-db supply-chain/advisory-db; do
        if [ -d "$candidate/crates" ]; then
            echo "$candidate"
            return 0
        fi
    done
}

# setup_advisory_db SNAPSHOT: the snapshot installed where cargo-deny reads its database (as a
# git repository of one commit), and every crate of the lock file fetched (offline, cargo
# metadata needs other platforms' crates too). `cargo deny --offline check` works after it.
setup_advisory_db() {
    local snapshot="$1"
    echo "   offline, with the advisory database snapshot in $snapshot" \
        "($(tr '\n' ' ' < "$snapshot/README.outpost.md" 2>/dev/null | grep -o -m1 'commit [0-9a-f]\{40\} of [0-9-]*' || echo 'undated'))"
    rm -rf "$ADVISORY_DB" && mkdir -p "$(dirname "$ADVISORY_DB")" && cp -r "$snapshot" "$ADVISORY_DB" \
        && chmod -R u+w "$ADVISORY_DB" \
        || setup_fail "cannot copy the advisory database snapshot $snapshot to $ADVISORY_DB"
    git -C "$ADVISORY_DB" init -q && git -C "$ADVISORY_DB" add -A \
        && git -C "$ADVISORY_DB" -c user.name=snapshot -c user.email=snapshot@localhost commit -qm snapshot \
        || setup_fail "cannot make the advisory database in $ADVISORY_DB a git repository (is git installed?)"
    touch "$ADVISORY_DB/.outpost-snapshot"
    cargo fetch --locked || setup_fail "cargo fetch --locked failed (see above): cargo deny needs every crate of Cargo.lock"
}
