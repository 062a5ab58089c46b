//! First-boot provisioning (`packaging/rpi/outpost-provision`) on a directory tree standing
//! for a board's root file system: a provision file on the boot partition becomes a checked
//! `/etc/outpost/outpost.toml` with the keys copied; a bad one changes nothing and says why;
//! the pi-gen stage's scripts are valid shell.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/rpi/outpost-provision")
}

/// A board tree with the packaged configuration installed, and `files` on the boot
/// partition's `outpost/` directory.
fn board(files: &[(&str, &str)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/outpost");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/outpost.toml"),
        etc.join("outpost.toml"),
    )
    .unwrap();
    let boot = root.path().join("boot/firmware/outpost");
    std::fs::create_dir_all(&boot).unwrap();
    for (name, text) in files {
        let path = boot.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

fn provision(root: &Path) -> Output {
    Command::new("sh")
        .arg(script())
        .env("ROOT", root)
        .env("OUTPOST", env!("CARGO_BIN_EXE_outpost"))
        .output()
        .expect("run outpost-provision")
}

/// Runs the script on `root`, which must succeed.
fn provisioned(root: &Path) {
    let out = provision(root);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that the board's `/etc/outpost/outpost.toml` has each of `lines`.
fn assert_config_has(root: &Path, lines: &[&str]) {
    let config = read(root, "etc/outpost/outpost.toml");
    for line in lines {
        assert!(config.contains(line), "{line} not in:\n{config}");
    }
}

/// Asserts that the board's `/etc/outpost/outpost.toml` passes `outpost config check`.
fn assert_config_checks(root: &Path) {
    let check = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["config", "check"])
        .arg(root.join("etc/outpost/outpost.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_default()
}

/// A public key as `outpost keygen` writes it.
fn public_key(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["keygen", "--name", "ops", "--out"])
        .arg(dir)
        .output()
        .expect("keygen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("ops.pub")).expect("ops.pub")
}

#[test]
fn a_provision_file_becomes_a_checked_configuration() {
    let keys = tempfile::tempdir().unwrap();
    let key = public_key(keys.path());
    let (passwords, _) = outpost::edge::passwords::set_password("", "sensor-1", b"pw-1").unwrap();
    let root = board(&[
        ("passwords", &passwords),
        (
            "provision.env",
            // Written on Windows: CRLF line endings and a comment.
            "# truck 17\r\nGATEWAY_ID=truck-17\r\nUPSTREAM_URL=mqtt://broker.example:8883\r\nLISTEN=0.0.0.0:1883\r\nGROUPS=trucks,eu\r\n",
        ),
        ("keys/ops.pub", &key),
        ("tls/ca.pem", "-----BEGIN CERTIFICATE-----\n"),
    ]);
    provisioned(root.path());
    assert_config_has(
        root.path(),
        &[
            "gateway_id = \"truck-17\"",
            "url = \"mqtt://broker.example:8883\"",
            "listen = [\"0.0.0.0:1883\"]",
            "password_file = \"passwords\"",
            "groups = [\"trucks\", \"eu\"]",
            "trusted_keys = [\"keys/ops.pub\"]",
        ],
    );
    assert_eq!(read(root.path(), "etc/outpost/keys/ops.pub"), key);
    assert!(root.path().join("etc/outpost/tls/ca.pem").exists());
    // The device logins: copied, readable by their owner only.
    assert_eq!(read(root.path(), "etc/outpost/passwords"), passwords);
    let mode = std::fs::metadata(root.path().join("etc/outpost/passwords"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Applied once: the provision file is renamed.
    assert!(!root
        .path()
        .join("boot/firmware/outpost/provision.env")
        .exists());
    assert!(root
        .path()
        .join("boot/firmware/outpost/provision.env.done")
        .exists());
    // The result passes the gateway's own check, keys included.
    assert_config_checks(root.path());
    // Nothing left to do on the next boot.
    let again = provision(root.path());
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
}

/// A board provisioned for a TLS upstream: the CA, the client certificate and key and the
/// password land in /etc/outpost/tls, the secrets readable by their owner only, and the
/// configuration names them, checked by the gateway itself (which refuses exposed secrets).
#[test]
fn tls_files_on_the_boot_partition_configure_the_uplink() {
    let ca = common::pki::Ca::new("provisioning ca");
    let client = ca.leaf("truck-17", &[], true, common::pki::Validity::Valid);
    let root = board(&[
        (
            "provision.env",
            "GATEWAY_ID=truck-17\nUPSTREAM_URL=mqtts://iot.example.com:443\nUSERNAME=truck-17\nALPN=x-amzn-mqtt-ca\n",
        ),
        ("tls/ca.pem", &ca.pem()),
        ("tls/client.pem", &client.cert),
        ("tls/client.key", &client.key),
        ("tls/password", "s3cret\n"),
    ]);
    provisioned(root.path());
    assert_config_has(
        root.path(),
        &[
            "url = \"mqtts://iot.example.com:443\"",
            "cafile = \"tls/ca.pem\"",
            "certfile = \"tls/client.pem\"",
            "keyfile = \"tls/client.key\"",
            "username = \"truck-17\"",
            "password_file = \"tls/password\"",
            "alpn = [\"x-amzn-mqtt-ca\"]",
        ],
    );
    let mode = |name: &str| {
        std::fs::metadata(root.path().join("etc/outpost/tls").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("client.key"), 0o600);
    assert_eq!(mode("password"), 0o600);
    assert_eq!(mode("client.pem"), 0o644);
    assert_eq!(mode("ca.pem"), 0o644);
    assert_config_checks(root.path());

    // A client certificate without its key is refused, and so is a password without a user.
    for (env, files, reason) in [
        (
            "GATEWAY_ID=t\nUPSTREAM_URL=mqtts://b\n",
            vec![("tls/client.pem", client.cert.as_str())],
            "go together",
        ),
        (
            "GATEWAY_ID=t\nUPSTREAM_URL=mqtts://b\n",
            vec![("tls/password", "pw\n")],
            "needs USERNAME",
        ),
    ] {
        let mut all = vec![("provision.env", env)];
        all.extend(files);
        let root = board(&all);
        let out = provision(root.path());
        assert!(!out.status.success(), "{env:?} was accepted");
        let failed = read(root.path(), "boot/firmware/outpost/provision.env.failed");
        assert!(failed.contains(reason), "{failed}");
    }
}

#[test]
fn a_bad_provision_file_changes_nothing_and_says_why() {
    for (env, reason) in [
        (
            "GATEWAY_ID=truck 17\nUPSTREAM_URL=mqtt://b:1883\n",
            "GATEWAY_ID",
        ),
        ("GATEWAY_ID=t17\nUPSTREAM_URL=http://b\n", "UPSTREAM_URL"),
        (
            "GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b:1883\nPASSWORD=x\n",
            "unknown line",
        ),
        ("GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b:99999\n", "invalid"),
        (
            "GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b\"; rm -rf /\n",
            "quotes",
        ),
        // Off loopback, anyone could connect: not without logins or an explicit yes.
        (
            "GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b:1883\nLISTEN=0.0.0.0:1883\n",
            "allow_anonymous",
        ),
        (
            "GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b:1883\nALLOW_ANONYMOUS=yes\n",
            "ALLOW_ANONYMOUS",
        ),
    ] {
        let root = board(&[("provision.env", env)]);
        let before = read(root.path(), "etc/outpost/outpost.toml");
        let out = provision(root.path());
        assert!(!out.status.success(), "{env:?} was accepted");
        assert_eq!(
            read(root.path(), "etc/outpost/outpost.toml"),
            before,
            "{env:?}"
        );
        let failed = read(root.path(), "boot/firmware/outpost/provision.env.failed");
        assert!(failed.contains(reason), "{env:?}: {failed}");
        assert!(root
            .path()
            .join("boot/firmware/outpost/provision.env")
            .exists());
    }
}

/// `ALLOW_ANONYMOUS=true` opens a network listener to devices without logins, explicitly.
#[test]
fn allow_anonymous_is_written_when_asked_for() {
    let root = board(&[(
        "provision.env",
        "GATEWAY_ID=t17\nUPSTREAM_URL=mqtt://b:1883\nLISTEN=0.0.0.0:1883\nALLOW_ANONYMOUS=true\n",
    )]);
    provisioned(root.path());
    let config = read(root.path(), "etc/outpost/outpost.toml");
    assert!(
        config.contains("listen = [\"0.0.0.0:1883\"]\nallow_anonymous = true\n"),
        "{config}"
    );
}

#[test]
fn the_image_scripts_are_valid_shell() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    for (shell, file) in [
        ("sh", "rpi/outpost-provision"),
        ("sh", "rpi/prepare-stage.sh"),
        ("bash", "rpi/stage-outpost/prerun.sh"),
        ("bash", "rpi/stage-outpost/00-outpost/00-run.sh"),
        ("sh", "debian/postinst"),
        ("sh", "debian/postrm"),
    ] {
        let out = Command::new(shell)
            .arg("-n")
            .arg(base.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
