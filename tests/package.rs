//! The Debian package on the host architecture: install, upgrade with an edited configuration,
//! remove and purge, with the real `dpkg`, as root, on this machine.
//!
//! It needs the package (`scripts/test.sh` packs the debug build: `cargo deb --no-build
//! --profile dev`; a release is `cargo build --profile board && cargo deb --no-build --profile
//! board`, which writes `target/debian/outpost_<version>_<arch>.deb`) and root, and it changes
//! the machine (it installs and purges `outpost`), so it is `#[ignore]`d in a plain `cargo
//! test`. Run it on a disposable machine with `cargo test --test package -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    out
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest `outpost_*_<host architecture>.deb` in `target/debian` (cross-built packages
/// land there too).
fn package() -> PathBuf {
    let arch = ok("dpkg", &["--print-architecture"]).trim().to_string();
    let suffix = format!("_{arch}.deb");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: build the package with cargo deb", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("outpost_") && n.ends_with(&suffix))
        })
        .collect();
    debs.sort();
    debs.pop()
        .expect("no outpost_*.deb in target/debian: run cargo deb")
}

/// The same package with its version raised to `version` (an upgrade to install).
fn with_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    ok(
        "dpkg-deb",
        &["-R", deb.to_str().unwrap(), tree.to_str().unwrap()],
    );
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let text: String = text
        .lines()
        .map(|l| match l.starts_with("Version:") {
            true => format!("Version: {version}\n"),
            false => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&control, text).unwrap();
    let out = dir.join("upgrade.deb");
    ok(
        "dpkg-deb",
        &["-b", tree.to_str().unwrap(), out.to_str().unwrap()],
    );
    out
}

const CONFIG: &str = "/etc/outpost/outpost.toml";
const UNIT: &str = "/usr/lib/systemd/system/outpost.service";

#[test]
#[ignore = "installs and purges the package on this machine, as root: run it on a disposable one"]
fn install_upgrade_remove_purge() {
    assert_eq!(ok("id", &["-u"]).trim(), "0", "must run as root");
    let deb = package();
    let dir = tempfile::tempdir().unwrap();
    let _ = run("dpkg", &["--purge", "outpost"]);

    // Install.
    ok("dpkg", &["-i", deb.to_str().unwrap()]);
    let version = ok("/usr/bin/outpost", &["--version"]);
    assert!(version.starts_with("outpost "), "{version}");
    assert!(ok("getent", &["passwd", "outpost"]).contains("/var/lib/outpost"));
    let mode = ok("stat", &["-c", "%a %U %G", CONFIG]);
    assert_eq!(mode.trim(), "640 root outpost");
    ok("/usr/bin/outpost", &["config", "check", CONFIG]);
    let verify = run("systemd-analyze", &["verify", UNIT]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Upgrade with an edited configuration: the edit is kept.
    let mut config = std::fs::read_to_string(CONFIG).unwrap();
    config = config.replace("gateway_id = \"outpost\"", "gateway_id = \"edited-42\"");
    assert!(config.contains("edited-42"));
    std::fs::write(CONFIG, &config).unwrap();
    let upgrade = with_version(&deb, "99.0.0-1", dir.path());
    ok(
        "dpkg",
        &["-i", "--force-confold", upgrade.to_str().unwrap()],
    );
    let status = ok("dpkg-query", &["-W", "-f=${Version}", "outpost"]);
    assert_eq!(status, "99.0.0-1");
    assert!(std::fs::read_to_string(CONFIG)
        .unwrap()
        .contains("edited-42"));

    // Remove: the program goes, the configuration stays.
    ok("dpkg", &["-r", "outpost"]);
    assert!(!Path::new("/usr/bin/outpost").exists());
    assert!(Path::new(CONFIG).exists());

    // Purge: the configuration and the state go too.
    std::fs::create_dir_all("/var/lib/outpost").unwrap();
    ok("dpkg", &["-P", "outpost"]);
    assert!(!Path::new(CONFIG).exists());
    assert!(!Path::new("/var/lib/outpost").exists());
}
