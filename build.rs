//! Builds the WebAssembly handler guests under `modules/` and hands their paths to the crate.
//!
//! The guests (`enrich`, `threshold`, `faulty`, `passthrough`, `otherworld`) are workspace
//! members built for `wasm32-wasip2`, which makes components directly; the examples use the
//! guest SDK in `modules/sdk`, which cargo builds with them. This script runs a nested
//! `cargo build --release --target wasm32-wasip2` for them in a target directory of their own
//! (`target/guests`): sharing the outer build's directory would wait forever on the lock the
//! outer cargo holds while it runs this script. The results are copied into `OUT_DIR`, whose
//! path is given to the crate as `OUTPOST_GUEST_DIR` (see `src/handlers/examples.rs`).

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// The guest crates, which are also the names of their `.wasm` files.
const GUESTS: [&str; 5] = ["enrich", "threshold", "faulty", "passthrough", "otherworld"];

/// The target the guests are built for.
const TARGET: &str = "wasm32-wasip2";

/// Variables the outer cargo (or the person running it) sets that would change or break the
/// nested build: flags and wrappers meant for the host build (coverage, sanitizers, `cargo
/// clippy`'s driver), and target and directory overrides.
const LEAKED_ENV: [&str; 14] = [
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_BUILD_DIR",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "__CARGO_FIX_PLZ",
];

fn main() {
    let root = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| fail("CARGO_MANIFEST_DIR is not set")),
    );
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is not set")));
    for watched in ["modules/wit", "modules/sdk", "Cargo.lock", "Cargo.toml"]
        .into_iter()
        .map(String::from)
        .chain(GUESTS.iter().map(|guest| format!("modules/{guest}")))
    {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    check_target_installed();
    let target_dir = root.join("target").join("guests");
    build_guests(&root, &target_dir);

    let built = target_dir.join(TARGET).join("release");
    for guest in GUESTS {
        let from = built.join(format!("{guest}.wasm"));
        let to = out_dir.join(format!("{guest}.wasm"));
        if let Err(e) = std::fs::copy(&from, &to) {
            fail(&format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ));
        }
    }
    println!("cargo:rustc-env=OUTPOST_GUEST_DIR={}", out_dir.display());
}

/// Fails early, with the fix, when the standard library for the guest target is missing.
fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output();
    let installed = match libdir {
        Ok(out) if out.status.success() => {
            Path::new(String::from_utf8_lossy(&out.stdout).trim()).is_dir()
        }
        // Let the build itself report whatever is wrong.
        _ => true,
    };
    if !installed {
        fail(&format!(
            "the Rust target {TARGET} is not installed; the handler guests under modules/ need \
             it: run `rustup target add {TARGET}`"
        ));
    }
}

/// Runs the nested cargo build of every guest, failing this script if it fails.
fn build_guests(root: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .args(["--target", TARGET])
        .args(GUESTS.iter().flat_map(|guest| ["-p", guest]))
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(root);
    for var in LEAKED_ENV {
        command.env_remove(var);
    }
    let output = command.output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run cargo to build the handler guests: {e}"
        ))
    });
    if !output.status.success() {
        eprint!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        fail(&format!(
            "building the handler guests ({}) for {TARGET} failed ({}); see the cargo output \
             above. If the target is missing, run `rustup target add {TARGET}`",
            GUESTS.join(", "),
            output.status
        ));
    }
}

/// Stops the build with a message cargo shows to the person building.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1)
}
