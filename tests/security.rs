//! Issue 14: who may connect to the local broker. Real clients on both protocol versions against
//! the gateway and, with the same password file, against Debian's Mosquitto, so that the
//! expected answers are checked against a real broker too.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mqtt::{Client, Connect, Packet, Version};
use common::{write_config, Gateway, Mosquitto};

const GATEWAY: &str = "gw-sec";

/// A password file with `alice` (made by Debian's `mosquitto_passwd`, its own default hash)
/// and `bob` (made by `outpost passwd`), mode 0600.
fn password_file(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("passwords");
    let status = Command::new("mosquitto_passwd")
        .args(["-c", "-b", file.to_str().unwrap(), "alice", "pw-alice"])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success());
    set_password(&file, "bob", "pw-bob");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    file
}

/// `outpost passwd FILE USER`, which must succeed.
fn set_password(file: &Path, user: &str, password: &str) {
    let out = common::outpost_passwd(file, user, password);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway whose broker takes `broker` (TOML lines under `[broker]`), metrics every 200 ms.
fn gateway(dir: &Path, broker: &str) -> Gateway {
    let config = write_config(
        dir,
        &format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[handlers]\nmetrics_interval_ms = 200\n"
        ),
    );
    let mut gateway = Gateway::new(dir, &["--config", config.to_str().unwrap()]);
    gateway.start();
    gateway
}

/// A username and, when given, a password.
type Login = (&'static str, Option<&'static str>);

/// The CONNACK code a CONNECT gets (`None`: closed without one).
fn connack(port: u16, version: Version, login: Option<(&str, Option<&str>)>) -> Option<u8> {
    let mut connect = Connect::new(version, &format!("sec-{}", version.tag()));
    if let Some((user, password)) = login {
        connect = connect.login(user, password);
    }
    match Client::try_connect(port, &connect).1 {
        Some(Packet::ConnAck { code, .. }) => Some(code),
        Some(other) => panic!("expected CONNACK, got {other:?}"),
        None => None,
    }
}

/// Every login case on both versions, with what Mosquitto 2 answers: 0 to a good login, "not
/// authorized" (3.1.1: 5; 5: 0x87) to the rest.
fn login_cases() -> Vec<(&'static str, Option<Login>, bool)> {
    vec![
        (
            "alice, her password",
            Some(("alice", Some("pw-alice"))),
            true,
        ),
        ("bob, his password", Some(("bob", Some("pw-bob"))), true),
        (
            "alice, a wrong password",
            Some(("alice", Some("pw-bob"))),
            false,
        ),
        ("alice, no password", Some(("alice", None)), false),
        (
            "an unknown user",
            Some(("mallory", Some("pw-alice"))),
            false,
        ),
        ("anonymous", None, false),
    ]
}

fn refused(version: Version) -> u8 {
    match version {
        Version::V4 => 0x05,
        Version::V5 => 0x87,
    }
}

#[test]
fn logins_are_checked_as_mosquitto_checks_them_on_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let gateway = gateway(
        dir.path(),
        &format!("password_file = {:?}", file.display().to_string()),
    );
    let mosquitto_port = common::free_port();
    let mut mosquitto = Mosquitto::with_config(
        dir.path(),
        &format!(
            "listener {mosquitto_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            file.display()
        ),
    );
    mosquitto.start();

    let mut refusals = 0;
    for version in Version::BOTH {
        for (case, login, accepted) in login_cases() {
            let expected = Some(if accepted { 0 } else { refused(version) });
            assert_eq!(
                connack(mosquitto_port, version, login),
                expected,
                "Mosquitto, {case}, {version:?}: the expectation itself"
            );
            assert_eq!(
                connack(gateway.port, version, login),
                expected,
                "outpost, {case}, {version:?}"
            );
            refusals += u64::from(!accepted);
        }
    }

    // Counted: the metrics reader logs in itself.
    let mut reader = Client::connect(
        gateway.port,
        &Connect::new(Version::V4, "metrics-reader").login("bob", Some("pw-bob")),
    )
    .0;
    reader.subscribe(&format!("outpost/{GATEWAY}/metrics"), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = reader.expect_publish();
        let m: serde_json::Value = serde_json::from_slice(&snapshot.payload).unwrap();
        if m["edge_logins_refused"].as_u64() == Some(refusals) {
            break;
        }
        assert!(Instant::now() < deadline, "refusals not counted: {m}");
    }
}

#[test]
fn anonymous_clients_next_to_a_password_file_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let gateway = gateway(
        dir.path(),
        &format!(
            "password_file = {:?}\nallow_anonymous = true",
            file.display().to_string()
        ),
    );
    for version in Version::BOTH {
        assert_eq!(connack(gateway.port, version, None), Some(0), "{version:?}");
        assert_eq!(
            connack(gateway.port, version, Some(("alice", Some("wrong")))),
            Some(refused(version)),
            "a wrong password is still refused ({version:?})"
        );
        assert_eq!(
            connack(gateway.port, version, Some(("alice", Some("pw-alice")))),
            Some(0)
        );
    }
}

#[test]
fn the_password_file_is_read_again_on_sighup_and_a_broken_one_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let file = password_file(dir.path());
    let gateway = gateway(
        dir.path(),
        &format!("password_file = {:?}", file.display().to_string()),
    );
    let login = |password| connack(gateway.port, Version::V5, Some(("alice", Some(password))));
    assert_eq!(login("pw-alice"), Some(0));

    set_password(&file, "alice", "pw-new");
    gateway.reload();
    common::block_until("the new password works", || login("pw-new") == Some(0));
    assert_eq!(login("pw-alice"), Some(0x87), "the old one is refused");

    // A file other users can read is refused; the one in use stays.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    set_password(&file, "alice", "pw-exposed");
    gateway.reload();
    common::block_until("the refusal is logged", || {
        gateway.log().contains("cannot be read again")
    });
    assert_eq!(login("pw-new"), Some(0));
    assert_eq!(login("pw-exposed"), Some(0x87));
}

#[test]
fn a_network_listener_needs_a_password_file_or_an_explicit_allow_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let check = |broker: &str| {
        let path = write_config(dir.path(), &format!("[broker]\n{broker}\n"));
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["config", "check", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = check("listen = [\"0.0.0.0:1883\"]");
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("broker.allow_anonymous") && message.contains("0.0.0.0:1883"),
        "{message}"
    );
    // `run` refuses it before binding anything.
    let path = write_config(dir.path(), "[broker]\nlisten = [\"0.0.0.0:1883\"]\n");
    let run = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["run", "--config", path.to_str().unwrap()])
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("allow_anonymous"));

    assert!(check("listen = [\"0.0.0.0:1883\"]\nallow_anonymous = true")
        .status
        .success());
    let file = password_file(dir.path());
    assert!(check(&format!(
        "listen = [\"0.0.0.0:1883\"]\npassword_file = {:?}",
        file.display().to_string()
    ))
    .status
    .success());
    // Loopback needs nothing; "false" with no file would lock everyone out.
    assert!(check("listen = [\"127.0.0.1:1883\"]").status.success());
    let locked = check("allow_anonymous = false");
    assert!(!locked.status.success());
    assert!(String::from_utf8_lossy(&locked.stderr).contains("no device could connect"));
    // A file other users can read is named.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let exposed = check(&format!("password_file = {:?}", file.display().to_string()));
    assert!(!exposed.status.success());
    assert!(
        String::from_utf8_lossy(&exposed.stderr).contains("other users can read it"),
        "{}",
        String::from_utf8_lossy(&exposed.stderr)
    );
}
