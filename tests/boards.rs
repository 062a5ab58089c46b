//! The cross-built binaries for the boards (aarch64 and armv7, built with Debian's cross
//! toolchains through `.cargo/config.toml`) do their real job under qemu-user: the gateway
//! starts, accepts a device's publishes, runs the `enrich` example handler on them (Cranelift
//! on aarch64, the Pulley interpreter on armv7), queues the outputs and delivers them to a
//! Mosquitto on the host over mutual TLS (rustls with ring, cross-compiled: a client
//! certificate, the server's checked against a CA file). Each binary also links only glibc
//! symbols that Raspberry Pi OS Bookworm (glibc 2.36) has.
//!
//! These tests need the binaries (`cargo build --profile board --target <triple>`), qemu-user-static
//! and the cross binutils, so they are `#[ignore]`d in a plain `cargo test`;
//! `scripts/test.sh` installs and builds what they need and runs them with `--ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A board target: its triple, its qemu-user emulator, the sysroot of Debian's cross libc,
/// and the prefix of its binutils.
struct Board {
    triple: &'static str,
    qemu: &'static str,
    sysroot: &'static str,
    tools: &'static str,
}

const AARCH64: Board = Board {
    triple: "aarch64-unknown-linux-gnu",
    qemu: "qemu-aarch64-static",
    sysroot: "/usr/aarch64-linux-gnu",
    tools: "aarch64-linux-gnu",
};

const ARMV7: Board = Board {
    triple: "armv7-unknown-linux-gnueabihf",
    qemu: "qemu-arm-static",
    sysroot: "/usr/arm-linux-gnueabihf",
    tools: "arm-linux-gnueabihf",
};

/// The newest glibc symbol version Raspberry Pi OS Bookworm provides.
const BOOKWORM_GLIBC: (u32, u32) = (2, 36);

impl Board {
    /// The cross-built release binary.
    fn binary(&self) -> PathBuf {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let binary = target_dir.join(self.triple).join("board/outpost");
        assert!(
            binary.is_file(),
            "{} is missing: build it with `cargo build --profile board --target {}` (scripts/test.sh does)",
            binary.display(),
            self.triple
        );
        binary
    }

    /// The command that runs the binary under emulation.
    fn program(&self) -> Vec<String> {
        vec![
            self.qemu.to_string(),
            "-L".to_string(),
            self.sysroot.to_string(),
            self.binary().display().to_string(),
        ]
    }
}

/// The newest `GLIBC_x.y` version the binary's dynamic symbols require.
fn newest_glibc(board: &Board) -> (u32, u32) {
    let objdump = format!("{}-objdump", board.tools);
    let out = Command::new(&objdump)
        .arg("-T")
        .arg(board.binary())
        .output()
        .unwrap_or_else(|e| panic!("{objdump}: {e} (install binutils-{})", board.tools));
    assert!(out.status.success(), "{objdump} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let versions: Vec<(u32, u32)> = text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect();
    assert!(!versions.is_empty(), "no glibc symbols found:\n{text}");
    versions.into_iter().max().unwrap_or((0, 0))
}

fn smoke(board: &Board) {
    let glibc = newest_glibc(board);
    assert!(
        glibc <= BOOKWORM_GLIBC,
        "{} needs GLIBC_{}.{}, newer than Bookworm's 2.36",
        board.triple,
        glibc.0,
        glibc.1
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let setup = Harness::builder();
        let dir = setup.dir().to_path_buf();
        let wasm = dir.join("enrich.wasm");
        std::fs::write(&wasm, outpost::handlers::examples::ENRICH).unwrap();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let ca = pki::Ca::new("board test ca");
        pki::write_file(&pki.join("ca.pem"), &ca.pem(), 0o644);
        let server = ca.leaf("upstream", &["localhost"], false, pki::Validity::Valid);
        pki::write_leaf(&pki, "server", &server);
        let client = ca.leaf("board", &[], true, pki::Validity::Valid);
        pki::write_leaf(&pki, "client", &client);
        let tls_port = free_port();
        let config = format!(
            r#"gateway_id = "board"

[[upstream]]
name = "cloud"
url = "mqtts://localhost:{tls_port}"
cafile = "{pki}/ca.pem"
certfile = "{pki}/client.pem"
keyfile = "{pki}/client.key"

[[module]]
name = "enrich"
path = "{wasm}"

[[route]]
name = "readings"
filter = "telemetry/#"
handler = "enrich"
"#,
            pki = pki.display(),
            wasm = wasm.display(),
        );
        let mut h = setup
            .upstream_config(&pki::tls_listener(tls_port, &pki, true))
            .subscriber_as("board-sub", "#")
            .config(&config)
            .program(&board.program())
            .start()
            .await;

        const READINGS: u64 = 20;
        let device = Device::connect(h.gateway.port, "sensor").await;
        for n in 0..READINGS {
            device
                .publish(
                    "telemetry/sensor/env",
                    format!(r#"{{"n":{n},"temp_c":{n}}}"#),
                )
                .await;
        }
        device.wait_acked(READINGS).await;
        eventually("every enriched reading upstream", || {
            h.received.len() as u64 >= READINGS
        })
        .await;
        let mut seen: Vec<u64> = h
            .received
            .all()
            .iter()
            .map(|(topic, payload)| {
                assert_eq!(topic, "enriched/sensor");
                let value: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
                let n = value["n"].as_u64().expect("n");
                // The handler really ran: it added the device and the converted temperature.
                assert_eq!(value["device"], "sensor", "{value}");
                assert_eq!(value["temp_f"].as_f64(), Some(n as f64 * 9.0 / 5.0 + 32.0));
                n
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, (0..READINGS).collect::<Vec<_>>());
        assert!(
            h.gateway.log().contains("tls=true"),
            "delivered over TLS:\n{}",
            h.gateway.log()
        );
        assert!(
            h.gateway.stop(),
            "the emulated gateway exits 0 on SIGTERM:\n{}",
            h.gateway.log()
        );
    });
}

#[test]
#[ignore = "needs the aarch64 binary and qemu-user: scripts/test.sh runs it"]
fn aarch64_binary_runs_a_handler_under_qemu() {
    smoke(&AARCH64);
}

#[test]
#[ignore = "needs the armv7 binary and qemu-user: scripts/test.sh runs it"]
fn armv7_binary_runs_a_handler_under_qemu() {
    smoke(&ARMV7);
}
