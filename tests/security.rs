//! Issue 14: who may connect to the local broker. Real clients on both protocol versions against
//! the gateway and, with the same password file, against Debian's Mosquitto, so that the
//! expected answers are checked against a real broker too.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::HarnessBuilder;
use common::mqtt::{Client, Connect, Packet, Publish, Version};
use common::{outpost_in_test_env, write_config, Harness};

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

/// `setup` with its gateway started, the gateway's broker taking `broker` (TOML lines under
/// `[broker]`), metrics every 200 ms.
fn gateway(setup: HarnessBuilder, broker: &str) -> Harness {
    setup
        .config(&format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[handlers]\nmetrics_interval_ms = 200\n"
        ))
        .start_blocking()
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
    let setup = Harness::builder();
    let file = password_file(setup.dir());
    // The harness's upstream, which the gateway does not use, is the Mosquitto to compare
    // with: a listener of its own with the same password file.
    let mosquitto_port = common::free_port();
    let setup = setup
        .upstream_config(&format!(
            "listener {mosquitto_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            file.display()
        ))
        .upstream();
    let h = gateway(
        setup,
        &format!("password_file = {:?}", file.display().to_string()),
    );

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
                connack(h.gateway.port, version, login),
                expected,
                "outpost, {case}, {version:?}"
            );
            refusals += u64::from(!accepted);
        }
    }

    // Counted: the metrics reader logs in itself.
    let mut reader = Client::connect(
        h.gateway.port,
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
    let setup = Harness::builder();
    let file = password_file(setup.dir());
    let h = gateway(
        setup,
        &format!(
            "password_file = {:?}\nallow_anonymous = true",
            file.display().to_string()
        ),
    );
    let port = h.gateway.port;
    for version in Version::BOTH {
        assert_eq!(connack(port, version, None), Some(0), "{version:?}");
        assert_eq!(
            connack(port, version, Some(("alice", Some("wrong")))),
            Some(refused(version)),
            "a wrong password is still refused ({version:?})"
        );
        assert_eq!(
            connack(port, version, Some(("alice", Some("pw-alice")))),
            Some(0)
        );
    }
}

#[test]
fn the_password_file_is_read_again_on_sighup_and_a_broken_one_is_not_taken() {
    let setup = Harness::builder();
    let file = password_file(setup.dir());
    let h = gateway(
        setup,
        &format!("password_file = {:?}", file.display().to_string()),
    );
    let login = |password| connack(h.gateway.port, Version::V5, Some(("alice", Some(password))));
    assert_eq!(login("pw-alice"), Some(0));

    set_password(&file, "alice", "pw-new");
    h.gateway.reload();
    common::block_until("the new password works", || login("pw-new") == Some(0));
    assert_eq!(login("pw-alice"), Some(0x87), "the old one is refused");

    // A file other users can read is refused; the one in use stays.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    set_password(&file, "alice", "pw-exposed");
    h.gateway.reload();
    common::block_until("the refusal is logged", || {
        h.gateway.log().contains("cannot be read again")
    });
    assert_eq!(login("pw-new"), Some(0));
    assert_eq!(login("pw-exposed"), Some(0x87));
}

#[test]
fn a_network_listener_needs_a_password_file_or_an_explicit_allow_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let check = |broker: &str| {
        let path = write_config(dir.path(), &format!("[broker]\n{broker}\n"));
        outpost_in_test_env(&["config", "check", path.to_str().unwrap()])
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
    let data = dir.path().join("data");
    let run = outpost_in_test_env(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
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

/// An ACL written for Mosquitto (its `acl_file` format), used unchanged by both brokers.
const ACL: &str = "\
# anonymous clients
topic read public/#
topic readwrite done/#

user alice
topic readwrite a/#
topic deny a/secret/#
topic read b/+
topic read clients/#
topic read public/#
topic readwrite done/#

user bob
topic write b/#
topic readwrite done/#

user writer
topic write #
topic readwrite done/#

user ops
topic read outpost/#

pattern write clients/%c/state
pattern readwrite dev/%u/#
";

/// The password file of [`password_file`] with `writer` and `ops` added.
fn acl_users(dir: &Path) -> std::path::PathBuf {
    let file = password_file(dir);
    set_password(&file, "writer", "pw-writer");
    set_password(&file, "ops", "pw-ops");
    file
}

fn login(port: u16, version: Version, id: &str, user: Option<&str>) -> Client {
    let mut connect = Connect::new(version, id);
    if let Some(user) = user {
        connect = connect.login(user, Some(&format!("pw-{user}")));
    }
    Client::connect(port, &connect).0
}

/// What one run of the ACL matrix saw: per publish whether it was refused ("not authorized",
/// which only MQTT 5 can say), and per subscriber the topics it received, sorted.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    refused: Vec<(String, String, bool)>,
    received: Vec<(String, Vec<String>)>,
}

/// Publishes, subscriptions through `#`, retained messages, `%c`/`%u` patterns and (on 5,
/// where DISCONNECT 0x04 fires a will in order) wills, against the broker on `port`.
fn acl_matrix(port: u16, version: Version) -> Seen {
    let tag = version.tag();
    let retained = [
        ("alice", "a/r"),
        ("writer", "a/secret/r"),
        ("writer", "b/r"),
        ("writer", "public/r"),
    ];
    for (user, topic) in retained {
        let mut c = login(port, version, &format!("ret-{tag}"), Some(user));
        c.publish_done(&Publish::new(topic, "kept").qos(1).retain());
        c.disconnect();
    }
    let mut subscribers: Vec<(String, Client)> = [
        ("alice", Some("alice")),
        ("bob", Some("bob")),
        ("anon-sub", None),
    ]
    .into_iter()
    .map(|(name, user)| {
        let mut c = login(port, version, &format!("{name}-{tag}"), user);
        // Mosquitto grants every SUBSCRIBE; outpost grants `#` to each of these (some rule
        // of theirs can deliver through it).
        c.subscribe("#", 1);
        (name.to_string(), c)
    })
    .collect();
    let publishes = [
        ("alice", "a/x"),
        ("alice", "a/secret/x"),
        ("alice", "b/c"),
        ("alice", "dev/alice/1"),
        ("alice", "dev/bob/1"),
        ("bob", "b/c"),
        ("bob", "b/c/d"),
        ("bob", "a/x"),
        ("bob", "dev/bob/1"),
        ("anon-pub", "clients/anon-pub/state"),
        ("anon-pub", "clients/other/state"),
        ("anon-pub", "public/p"),
        ("writer", "a/secret/y"),
        ("writer", "public/p"),
        ("writer", "zzz"),
        ("writer", "b/c"),
        ("writer", "dev/bob/9"),
        ("writer", "clients/w9/state"),
    ];
    let mut refused = Vec::new();
    for (who, topic) in publishes {
        let user = (who != "anon-pub").then_some(who);
        // The client id is the name: `%c` patterns see it.
        let mut c = login(port, version, who, user);
        let code = c.publish_done(&Publish::new(topic, "x").qos(1));
        refused.push((who.to_string(), topic.to_string(), code == 0x87));
        c.disconnect();
    }
    if version == Version::V5 {
        for (id, topic) in [("w1", "clients/w1/state"), ("w2", "public/x")] {
            let c = Client::connect(
                port,
                &Connect::new(version, id).will(Publish::new(topic, "gone").qos(1)),
            )
            .0;
            c.disconnect_with(0x04, &[]);
        }
    }
    let mut end = login(port, version, &format!("end-{tag}"), Some("writer"));
    end.publish_done(&Publish::new("done/end", "").qos(1));
    let received = subscribers
        .iter_mut()
        .map(|(name, c)| {
            let mut topics: Vec<String> = c
                .receive_until("done/end")
                .into_iter()
                .map(|m| m.topic)
                .collect();
            topics.sort();
            (name.clone(), topics)
        })
        .collect();
    for (_, topic) in retained {
        end.publish_done(&Publish::new(topic, "").qos(1).retain());
    }
    end.disconnect();
    Seen { refused, received }
}

fn acl_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("acl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_acl_written_for_mosquitto_gives_the_same_deliveries_on_both_versions() {
    let setup = Harness::builder();
    let passwords = acl_users(setup.dir());
    let acl = acl_file(setup.dir(), ACL);
    // The harness's upstream, which the gateway does not use, is the Mosquitto to compare
    // with: a listener of its own with the same password file and ACL.
    let mosquitto_port = common::free_port();
    let setup = setup
        .upstream_config(&format!(
            "listener {mosquitto_port} 127.0.0.1\nallow_anonymous true\npassword_file {}\n\
             acl_file {}\n",
            passwords.display(),
            acl.display()
        ))
        .upstream();
    let h = gateway(
        setup,
        &format!(
            "password_file = {:?}\nallow_anonymous = true\nacl_file = {:?}",
            passwords.display().to_string(),
            acl.display().to_string()
        ),
    );

    let mut denied_publishes = 0;
    for version in Version::BOTH {
        let expected = acl_matrix(mosquitto_port, version);
        // The expectation itself, as Mosquitto delivers it.
        let alice = &expected.received[0].1;
        let mut want_alice = vec![
            "a/r",
            "a/x",
            "b/c",
            "b/c",
            "b/r",
            "clients/anon-pub/state",
            "clients/w9/state",
            "dev/alice/1",
            "public/p",
            "public/r",
        ];
        if version == Version::V5 {
            want_alice.push("clients/w1/state");
            want_alice.sort();
        }
        assert_eq!(alice, &want_alice, "Mosquitto, alice, {version:?}");
        assert_eq!(
            expected.received[1].1,
            ["dev/bob/1", "dev/bob/9"],
            "Mosquitto, bob"
        );
        assert_eq!(
            expected.received[2].1,
            ["public/p", "public/r"],
            "Mosquitto, anonymous"
        );
        let seen = acl_matrix(h.gateway.port, version);
        if version == Version::V4 {
            // 3.1.1 cannot say "not authorized": both acknowledge and drop.
            assert!(seen.refused.iter().all(|(_, _, refused)| !refused));
        } else {
            denied_publishes = seen.refused.iter().filter(|r| r.2).count();
            assert_eq!(denied_publishes, 6, "{:?}", seen.refused);
        }
        assert_eq!(seen, expected, "outpost against Mosquitto, {version:?}");
    }

    // Wills on 3.1.1 (an abrupt close fires them, so only the allowed one can be waited for;
    // the refused one is dropped at CONNECT and counted there).
    let mut alice = login(h.gateway.port, Version::V4, "alice-wills", Some("alice"));
    alice.subscribe("clients/#", 1);
    alice.subscribe("public/#", 1);
    for (id, topic) in [("w4", "public/y"), ("w3", "clients/w3/state")] {
        Client::connect(
            h.gateway.port,
            &Connect::new(Version::V4, id).will(Publish::new(topic, "gone").qos(1)),
        )
        .0
        .drop_abruptly();
    }
    let will = alice.receive();
    assert_eq!(will.topic, "clients/w3/state");
    alice.disconnect();

    // SUBSCRIBE is checked too (Mosquitto's acl_file does not): per filter, 0x80 on 3.1.1 and
    // 0x87 on 5; `#` reaches no `outpost/` topic.
    for version in Version::BOTH {
        let mut alice = login(h.gateway.port, version, "alice-subs", Some("alice"));
        let no = if version == Version::V4 { 0x80 } else { 0x87 };
        assert_eq!(
            alice.subscribe_with(
                &[("a/secret/#", 1), ("zzz", 1), ("outpost/#", 1), ("a/#", 1)],
                &[]
            ),
            [no, no, no, 1],
            "{version:?}"
        );
    }
    let mut alice = login(h.gateway.port, Version::V4, "alice-all", Some("alice"));
    alice.subscribe("#", 0);
    let mut ops = login(h.gateway.port, Version::V4, "ops", Some("ops"));
    ops.subscribe(&format!("outpost/{GATEWAY}/metrics"), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = ops.expect_publish();
        let m: serde_json::Value = serde_json::from_slice(&snapshot.payload).unwrap();
        let counted = m["acl_denied_publishes"].as_u64() == Some(2 * denied_publishes as u64)
            && m["acl_denied_subscriptions"].as_u64() == Some(6)
            && m["acl_denied_wills"].as_u64() == Some(2)
            && m["acl_denied_deliveries"].as_u64() > Some(0);
        if counted {
            break;
        }
        assert!(Instant::now() < deadline, "denials not counted: {m}");
    }
    // Metrics went out every 200 ms meanwhile; alice's `#` got none of them.
    alice.publish_done(&Publish::new("a/fence", "").qos(1));
    let got = alice.receive_until("a/fence");
    assert!(
        got.iter().all(|m| !m.topic.starts_with("outpost/")),
        "{got:?}"
    );
}

#[test]
fn kept_sessions_keep_their_owner_across_a_restart_and_the_acl_is_read_again_on_sighup() {
    let setup = Harness::builder();
    let passwords = acl_users(setup.dir());
    let acl = acl_file(setup.dir(), ACL);
    let mut h = gateway(
        setup,
        &format!(
            "password_file = {:?}\nacl_file = {:?}",
            passwords.display().to_string(),
            acl.display().to_string()
        ),
    );
    let v = Version::V5;
    let bob_kept = || {
        Connect::new(v, "bob-kept")
            .login("bob", Some("pw-bob"))
            .persistent()
    };
    let mut bob = Client::connect(h.gateway.port, &bob_kept()).0;
    bob.subscribe("dev/bob/#", 1);
    bob.disconnect();
    let publish = |port: u16, topic: &str| {
        let mut writer = login(port, v, "writer", Some("writer"));
        assert_eq!(writer.publish_done(&Publish::new(topic, "x").qos(1)), 0);
        writer.disconnect();
    };
    publish(h.gateway.port, "dev/bob/1");

    // kill -9 and start again: the session is still bob's, so what is published for it while
    // he is away is checked against his rights (`dev/%u/#`), not an anonymous client's.
    h.gateway.kill();
    h.gateway.start();
    publish(h.gateway.port, "dev/bob/2");
    let mut bob = Client::connect(h.gateway.port, &bob_kept()).0;
    publish(h.gateway.port, "dev/bob/fence");
    let got: Vec<String> = bob
        .receive_until("dev/bob/fence")
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(got, ["dev/bob/1", "dev/bob/2"]);
    bob.disconnect();
    publish(h.gateway.port, "dev/bob/3");

    // A version that does not parse is not taken: the rules in force stay.
    std::fs::write(&acl, format!("{ACL}topic dney x\n")).unwrap();
    h.gateway.reload();
    common::block_until("the refusal is logged", || {
        h.gateway
            .log()
            .contains("the ACL file cannot be read again")
    });
    let may_subscribe = |filter: &str| {
        let mut probe = login(h.gateway.port, v, "bob-probe", Some("bob"));
        let codes = probe.subscribe_with(&[(filter, 1)], &[]);
        probe.disconnect();
        codes == [1]
    };
    assert!(may_subscribe("dev/bob/x"));

    // Without the `dev/%u/#` pattern, bob reads only the fence: what was queued for him before
    // the change is checked again as it goes, and not sent.
    let narrower = ACL.replace(
        "pattern readwrite dev/%u/#\n",
        "user bob\ntopic read dev/bob/fence\n",
    );
    std::fs::write(&acl, narrower).unwrap();
    h.gateway.reload();
    common::block_until("the new rules are in force", || !may_subscribe("dev/bob/x"));
    let mut bob = Client::connect(h.gateway.port, &bob_kept()).0;
    publish(h.gateway.port, "dev/bob/fence");
    let got = bob.receive_until("dev/bob/fence");
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn config_check_names_an_acl_line_it_cannot_parse_and_run_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let acl = acl_file(dir.path(), "topic read a/#\n\ntopic dney secret/#\n");
    let config = write_config(
        dir.path(),
        &format!("[broker]\nacl_file = {:?}\n", acl.display().to_string()),
    );
    let data = dir.path().join("data");
    for args in [
        vec!["config", "check", config.to_str().unwrap()],
        vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
    ] {
        let out = outpost_in_test_env(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("acl") && stderr.contains("line 3"),
            "{args:?}: {stderr}"
        );
    }
    std::fs::remove_file(&acl).unwrap();
    let out = outpost_in_test_env(&["config", "check", config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("acl"));
}

#[test]
fn with_require_client_id_match_no_device_takes_over_another_session() {
    let setup = Harness::builder();
    let file = password_file(setup.dir());
    let h = gateway(
        setup,
        &format!(
            "password_file = {:?}\nallow_anonymous = true\nrequire_client_id_match = true",
            file.display().to_string()
        ),
    );
    for version in Version::BOTH {
        let rejected = match version {
            Version::V4 => 0x02,
            Version::V5 => 0x85,
        };
        let try_as = |id: &str, user: Option<&str>| {
            let mut connect = Connect::new(version, id);
            if let Some(user) = user {
                connect = connect.login(user, Some(&format!("pw-{user}")));
            }
            match Client::try_connect(h.gateway.port, &connect).1 {
                Some(Packet::ConnAck { code, .. }) => code,
                other => panic!("{id:?} {user:?}: expected CONNACK, got {other:?}"),
            }
        };
        // bob holds his session, subscribed.
        let mut bob = Client::connect(
            h.gateway.port,
            &Connect::new(version, "bob")
                .login("bob", Some("pw-bob"))
                .persistent(),
        )
        .0;
        bob.subscribe("t/#", 1);
        assert_eq!(try_as("bob", Some("alice")), rejected, "alice as bob");
        assert_eq!(try_as("bob", None), rejected, "anonymous as bob");
        assert_eq!(try_as("anything", None), rejected, "anonymous with an id");
        assert_eq!(try_as("alice", Some("alice")), 0);
        assert_eq!(try_as("", None), 0, "anonymous, the id assigned");
        // bob's session was never taken over: his connection is open and still delivers.
        let mut alice = Client::connect(
            h.gateway.port,
            &Connect::new(version, "alice").login("alice", Some("pw-alice")),
        )
        .0;
        alice.publish_done(&Publish::new("t/1", "for bob").qos(1));
        assert_eq!(bob.receive().topic, "t/1");
        bob.disconnect();
    }
}

#[test]
fn only_admins_use_the_control_topics_and_replies_reach_only_the_requester() {
    let setup = Harness::builder();
    let passwords = acl_users(setup.dir());
    let mut h = setup
        .upstream()
        .config_with(|url| {
            format!(
                "gateway_id = \"{GATEWAY}\"\n\n[broker]\npassword_file = {:?}\nallow_anonymous = true\n\
                 admins = [\"ops\"]\n\n[handlers]\nmetrics_interval_ms = 200\n\n\
                 [[upstream]]\nname = \"cloud\"\nurl = \"{}\"\n\n\
                 [[route]]\nname = \"json-in\"\nfilter = \"json/#\"\npayload = \"json\"\n",
                passwords.display().to_string(),
                url
            )
        })
        .start_blocking();
    let port = h.gateway.port;
    let mut device = login(port, Version::V5, "alice-dev", Some("alice"));
    for n in 0..2 {
        device.publish_done(&Publish::new(&format!("json/a/{n}"), "not json").qos(1));
    }
    common::block_until("two dead letters", || {
        h.gateway.dead_letters().values().sum::<u64>() == 2
    });
    let broker = format!("mqtt://127.0.0.1:{port}");
    let cli = |args: &[&str], login: Option<(&str, &str)>| {
        let mut all = vec!["deadletters"];
        all.extend_from_slice(args);
        all.extend(["--broker", &broker, "--gateway-id", GATEWAY]);
        if let Some((user, password)) = login {
            all.extend(["--username", user, "--password", password]);
        }
        outpost_in_test_env(&all)
    };

    // The attacks, as a logged-in device (alice) and as an anonymous one, on both versions.
    let purge = format!("outpost/{GATEWAY}/deadletters/purge");
    for version in Version::BOTH {
        for user in [Some("alice"), None] {
            let mut attacker = login(port, version, &format!("attacker-{}", version.tag()), user);
            let no = if version == Version::V4 { 0x80 } else { 0x87 };
            // Reading the control plane: requests, replies, metrics.
            for filter in [
                "outpost/#".to_string(),
                format!("outpost/{GATEWAY}/metrics"),
                format!("outpost/{GATEWAY}/deadletters/+"),
                format!("outpost/{GATEWAY}/replies/+"),
            ] {
                assert_eq!(
                    attacker.subscribe_with(&[(&filter, 1)], &[]),
                    [no],
                    "{user:?} {version:?} {filter}"
                );
            }
            // Purging: refused (5 says so; 3.1.1 cannot), and nothing is purged.
            let code = attacker
                .publish_done(&Publish::new(&purge, r#"{"all": true, "reply_to": "mine"}"#).qos(1));
            assert_eq!(code, if version == Version::V4 { 0 } else { 0x87 });
            let modules = format!("outpost/{GATEWAY}/modules/list");
            let code = attacker.publish_done(&Publish::new(&modules, "{}").qos(1));
            assert_eq!(code, if version == Version::V4 { 0 } else { 0x87 });
            // `#` is granted, but delivers none of the gateway's topics (metrics go out every
            // 200 ms meanwhile).
            attacker.subscribe("#", 1);
            std::thread::sleep(Duration::from_millis(500));
            attacker.publish_done(&Publish::new("fence/a", "").qos(1));
            let got = attacker.receive_until("fence/a");
            assert!(
                got.iter().all(|m| !m.topic.starts_with("outpost/")),
                "{got:?}"
            );
            attacker.disconnect();
        }
    }
    assert_eq!(
        h.gateway.dead_letters().values().sum::<u64>(),
        2,
        "nothing purged"
    );

    // Without credentials the command gets no answer; with an admin's it does.
    let anonymous = cli(&["list", "--timeout-secs", "2"], None);
    assert!(!anonymous.status.success());
    let stderr = String::from_utf8_lossy(&anonymous.stderr);
    assert!(stderr.contains("refused the subscription"), "{stderr}");
    let wrong = cli(&["list", "--timeout-secs", "5"], Some(("ops", "wrong")));
    assert!(!wrong.status.success());
    let listed = cli(&["list", "--json"], Some(("ops", "pw-ops")));
    assert!(listed.status.success(), "{listed:?}");
    let reply: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        reply["dead_letters"].as_array().map(Vec::len),
        Some(2),
        "{reply}"
    );
    let modules = outpost_in_test_env(&[
        "module",
        "list",
        "--broker",
        &broker,
        "--gateway",
        GATEWAY,
        "--username",
        "ops",
        "--password",
        "pw-ops",
    ]);
    assert!(modules.status.success(), "{modules:?}");
    let purged = cli(&["purge", "--all"], Some(("ops", "pw-ops")));
    assert!(purged.status.success(), "{purged:?}");
    assert_eq!(String::from_utf8_lossy(&purged.stdout).trim(), "purged 2");
    assert!(h.gateway.stop());
}

#[test]
fn the_cli_takes_only_the_reply_that_answers_its_request() {
    // A stand-in gateway on a real broker answers each request three times: a forged "no dead
    // letters" without the request's nonce, one from another gateway, then the real one.
    let h = Harness::builder().upstream().build_blocking();
    let broker = &h.upstream;
    let mut responder = Client::clean(broker.port, Version::V4, "stand-in");
    responder.subscribe("outpost/gw-x/deadletters/+", 1);
    let cli = std::thread::spawn({
        let url = broker.url();
        move || {
            outpost_in_test_env(&[
                "deadletters",
                "list",
                "--broker",
                &url,
                "--gateway-id",
                "gw-x",
                "--timeout-secs",
                "30",
            ])
        }
    });
    let request = responder.receive();
    let request: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
    let reply_to = request["reply_to"].as_str().unwrap();
    let nonce = request["nonce"].as_str().unwrap();
    assert!(nonce.len() >= 32, "an unguessable nonce: {nonce}");
    let letter = serde_json::json!({"id": 7, "reason": "trap", "route": "r", "topic": "t",
        "error": "boom", "attempts": 1, "received_ms": 0, "dead_lettered_ms": 0, "size": 1});
    for reply in [
        serde_json::json!({"ok": true, "dead_letters": [], "truncated": false, "gateway": "gw-x"}),
        serde_json::json!({"ok": true, "dead_letters": [], "truncated": false,
            "gateway": "gw-y", "nonce": nonce}),
        serde_json::json!({"ok": true, "dead_letters": [letter], "truncated": false,
            "gateway": "gw-x", "nonce": nonce}),
    ] {
        responder.publish_done(&Publish::new(reply_to, reply.to_string()).qos(1));
    }
    let out = cli.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("trap"), "the real reply is shown: {stdout}");
    assert!(!stdout.contains("no dead letters"), "{stdout}");
    assert_eq!(stderr.matches("ignored a message").count(), 2, "{stderr}");
}

#[test]
fn one_address_gets_its_connections_and_its_rate_and_no_more() {
    for version in Version::BOTH {
        // A gateway per version: closed connections leave their place in their own time.
        let h = gateway(Harness::builder(), "max_connections_per_source = 3");
        let limited = &h.gateway;
        let busy = match version {
            Version::V4 => 0x03,
            Version::V5 => 0x97,
        };
        let mut open: Vec<Client> = (0..3)
            .map(|n| Client::clean(limited.port, version, &format!("s-{}-{n}", version.tag())))
            .collect();
        assert_eq!(connack(limited.port, version, None), Some(busy));
        // One closes: its place is free again.
        open.pop().unwrap().disconnect();
        common::block_until("the closed connection's place is free", || {
            connack(limited.port, version, None) == Some(0)
        });
        drop(open);
    }

    let h = gateway(Harness::builder(), "max_connection_rate_per_source = 1");
    let limited = &h.gateway;
    for version in Version::BOTH {
        let too_fast = match version {
            Version::V4 => 0x03,
            Version::V5 => 0x9F,
        };
        // One new connection per second: of 20 in a row, some are refused (unless each took
        // a second, which no machine this runs on does).
        let codes: Vec<Option<u8>> = (0..20)
            .map(|_| connack(limited.port, version, None))
            .collect();
        assert!(codes.contains(&Some(too_fast)), "{codes:?}");
        assert!(
            codes.iter().all(|c| *c == Some(0) || *c == Some(too_fast)),
            "{codes:?}"
        );
    }
    // Logged once per address, not once per refusal.
    let log = limited.log();
    assert_eq!(
        log.matches("refusing device connections from this address")
            .count(),
        1,
        "{log}"
    );
}
