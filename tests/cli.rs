//! The command line: configuration checks give one clear line naming the key, and `run`
//! refuses bad configuration before opening anything, without panicking.

mod common;

use std::process::{Command, Output};

use common::{outpost, stderr, Harness};

#[test]
fn default_config_is_printed_and_passes_its_own_check() {
    let out = outpost(&["config", "default"]);
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(dir.path(), &String::from_utf8_lossy(&out.stdout));
    let check = outpost(&["config", "check", path.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok"));
}

#[test]
fn bad_configurations_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "[broker]\nlisten = [\"127.0.0.1:1883\"]\nmax_payload = 5\n",
            "max_payload",
        ),
        ("gateway_id = 7\n", "gateway_id"),
        (
            "[[upstream]]\nname = \"cloud\"\nurl = \"http://x\"\n",
            "upstream \"cloud\".url",
        ),
        ("[[route]]\nname = \"r\"\nfilter = \"a/#/b\"\n", "\"r\""),
        (
            "[[route]]\nname = \"r\"\nfilter = \"a/#\"\nhandler = \"ghost\"\n",
            "route \"r\".handler",
        ),
        (
            "[[module]]\nname = \"m\"\npath = \"missing.wasm\"\n",
            "module \"m\".path",
        ),
        (
            "[[route]]\nname = \"r\"\nfilter = \"a/#\"\ntopic = \"x/{devise}\"\n",
            "devise",
        ),
        ("this is not toml", "outpost.toml"),
    ];
    for (text, key) in cases {
        let path = common::write_config(dir.path(), text);
        for args in [
            vec!["config", "check", path.to_str().unwrap()],
            vec![
                "run",
                "--config",
                path.to_str().unwrap(),
                "--data",
                dir.path().join("d").to_str().unwrap(),
            ],
        ] {
            let out = outpost(&args);
            let err = stderr(&out);
            assert!(!out.status.success(), "{args:?} accepted {text:?}");
            assert!(
                err.contains(key),
                "{args:?} on {text:?}: message does not name {key:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
            assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
        }
    }
}

#[test]
fn a_module_that_is_not_a_component_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.wasm"), b"definitely not wasm").unwrap();
    let path = common::write_config(
        dir.path(),
        "[[module]]\nname = \"junk\"\npath = \"junk.wasm\"\n[[route]]\nname = \"r\"\nfilter = \"a/#\"\nhandler = \"junk\"\n",
    );
    let port = common::free_port();
    let out = outpost(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data",
        dir.path().join("d").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("junk"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = outpost(&[
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data",
        dir.path().join("d").to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `module push|list|remove|rollback` refuse what they can refuse locally, before talking to
/// any broker (the broker given is a closed port, so reaching it would be another error).
#[test]
fn module_requests_are_refused_locally_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let keygen = outpost(&["keygen", "--out", &path("keys"), "--name", "ops"]);
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    std::fs::write(path("m.wasm"), b"\0asm\x0d\0\x01\0").unwrap();
    std::fs::write(path("junk"), b"junk").unwrap();
    let sign = outpost(&[
        "module",
        "sign",
        &path("m.wasm"),
        "--name",
        "celsius",
        "--version",
        "1.0.0",
        "--key",
        &path("keys/ops.key"),
    ]);
    assert!(sign.status.success(), "{}", stderr(&sign));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("mqtt://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let key = path("keys/ops.key");
    let signed = path("m.wasm.signed");
    let wasm = path("m.wasm");
    let junk = path("junk");
    let cases: &[(&[&str], &str)] = &[
        (
            &["push", &signed, "--name", "other", "--gateway", "g"],
            "signed as \"celsius\", not \"other\"",
        ),
        (
            &[
                "push",
                &signed,
                "--name",
                "celsius",
                "--version",
                "2",
                "--gateway",
                "g",
            ],
            "version \"1.0.0\", not \"2\"",
        ),
        (
            &["push", &wasm, "--name", "celsius", "--gateway", "g"],
            "give --key",
        ),
        (
            &[
                "push",
                &junk,
                "--name",
                "celsius",
                "--key",
                &key,
                "--gateway",
                "g",
            ],
            "neither WebAssembly",
        ),
        (
            &[
                "push",
                &wasm,
                "--name",
                "../x",
                "--key",
                &key,
                "--gateway",
                "g",
            ],
            "module name \"../x\"",
        ),
        (
            &[
                "push",
                &wasm,
                "--name",
                "m",
                "--key",
                &key,
                "--gateway",
                "g",
                "--retain",
            ],
            "--retain applies to --fleet",
        ),
        (
            &[
                "push",
                &wasm,
                "--name",
                "m",
                "--key",
                &key,
                "--gateway",
                "g",
                "--wait",
                "3",
            ],
            "--wait applies to --fleet",
        ),
        (
            &[
                "push",
                &wasm,
                "--name",
                "m",
                "--key",
                &key,
                "--gateway",
                "a/b",
            ],
            "gateway id \"a/b\"",
        ),
        (&["push", &wasm, "--name", "m", "--key", &key], "--gateway"),
        (
            &[
                "push",
                &wasm,
                "--name",
                "m",
                "--key",
                &key,
                "--gateway",
                "g",
                "--fleet",
                "f",
            ],
            "cannot be used with",
        ),
        (
            &["list", "--fleet", "f", "--fleet-prefix", "a/+"],
            "fleet prefix \"a/+\"",
        ),
        (&["remove", "celsius", "--gateway", "g"], "--key"),
        (&["rollback", "-x", "--key", &key, "--gateway", "g"], "-x"),
    ];
    for (args, expected) in cases {
        let mut all = vec!["module"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--broker", &closed]);
        let out = outpost(&all);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(
            !err.contains("cannot talk to the broker"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // With nothing wrong locally, the closed port is the error.
    let out = outpost(&["module", "list", "--gateway", "g", "--broker", &closed]);
    assert!(
        stderr(&out).contains("cannot talk to the broker"),
        "{}",
        stderr(&out)
    );
}

/// Answers every module request it sees on `broker` as gateway `gateway` would, with a status
/// whose `request_sha256` is the digest of the request's payload (a stand-in for the gateway's
/// side, to test the client against a real broker).
async fn fake_gateway(port: u16, gateway: &'static str, ok: bool) -> rumqttc::AsyncClient {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(format!("fake-{gateway}"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(format!("outpost/{gateway}/modules/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe("outpost/fleet/north/modules/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let responder = client.clone();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut subacks = 0;
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == 2 {
                        if let Some(tx) = ready.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Event::Incoming(Packet::Publish(p)) if !p.topic.ends_with("/status") => {
                    let levels: Vec<&str> = p.topic.split('/').collect();
                    let op = levels[levels.len() - 1];
                    let digest = outpost::signing::to_hex(&outpost::signing::sha256(&p.payload));
                    let mut status = serde_json::json!({
                        "gateway": gateway, "op": op, "ok": ok, "request_sha256": digest,
                    });
                    if op == "list" {
                        status["modules"] = serde_json::json!([]);
                    } else {
                        status["name"] = levels[levels.len() - 2].into();
                        status["version"] = "1.0.0".into();
                    }
                    if !ok {
                        status["reason"] = "not today".into();
                    }
                    // A status for someone else's request first: it must be ignored.
                    let mut other = status.clone();
                    other["request_sha256"] = "00".into();
                    for s in [other, status] {
                        let _ = responder.try_publish(
                            format!("outpost/{gateway}/modules/status"),
                            QoS::AtMostOnce,
                            false,
                            s.to_string(),
                        );
                    }
                }
                _ => {}
            }
        }
    });
    ready_rx.await.unwrap();
    client
}

/// A broker (the harness's upstream; no gateway runs) with [`fake_gateway`] `a` answering
/// every request with success.
async fn broker_with_gateway_a() -> (Harness, rumqttc::AsyncClient) {
    let h = Harness::builder().upstream().build().await;
    let a = fake_gateway(h.upstream.port, "a", true).await;
    (h, a)
}

/// The module `celsius` (the bytes `\0asm`) at `version`, signed by the key made from `seed`.
fn celsius(
    seed: u8,
    version: &str,
) -> (outpost::signing::SigningKey, outpost::signing::SignedModule) {
    let key = outpost::signing::SigningKey::from_bytes(&[seed; 32]);
    let module =
        outpost::signing::SignedModule::sign(&key, "celsius", version, 1, b"\0asm".to_vec())
            .unwrap();
    (key, module)
}

#[tokio::test]
async fn module_client_matches_statuses_to_its_requests() {
    use outpost::client::modules::{self as deploy_client, Request, Target};
    use outpost::signing::{CommandOp, SignedCommand};
    use std::time::Duration;
    let (h, _a) = broker_with_gateway_a().await;
    let broker = &h.upstream;
    let _b = fake_gateway(broker.port, "b", false).await;
    let (key, module) = celsius(7, "1.0.0");
    let wait = Duration::from_secs(10);

    let gateway = Target::gateway("a").unwrap();
    let deploy = Request::deploy_module(gateway.clone(), &module);
    let status = deploy_client::request(&broker.url(), &deploy, wait)
        .await
        .unwrap();
    assert!(status.ok, "{status:?}");
    assert_eq!(status.request_sha256, deploy.request_sha256());
    assert_eq!(status.name.as_deref(), Some("celsius"));

    let remove = SignedCommand::sign(&key, CommandOp::Remove, "celsius", 1).unwrap();
    let request = Request::command(Target::gateway("b").unwrap(), &remove);
    let status = deploy_client::request(&broker.url(), &request, wait)
        .await
        .unwrap();
    assert_eq!(status.failure().as_deref(), Some("not today"));
    assert_eq!(status.op, "remove");

    let list = Request::list(gateway);
    let status = deploy_client::request(&broker.url(), &list, wait)
        .await
        .unwrap();
    assert_eq!(status.modules, Some(vec![]));

    let fleet = Target::fleet(deploy_client::DEFAULT_FLEET_PREFIX, "north").unwrap();
    let request = Request::deploy_module(fleet, &module);
    let statuses = deploy_client::request_fleet(&broker.url(), &request, wait, Some(2))
        .await
        .unwrap();
    let mut gateways: Vec<&str> = statuses.iter().map(|s| s.gateway.as_str()).collect();
    gateways.sort();
    assert_eq!(gateways, ["a", "b"]);
    assert!(deploy_client::check_fleet(&statuses, Some(2), false)
        .unwrap_err()
        .contains("b: not today"));

    let nobody = Request::list(Target::gateway("nobody").unwrap());
    let err = deploy_client::request(&broker.url(), &nobody, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no status from gateway nobody"),
        "{err}"
    );
}

/// `module push --fleet --retain` publishes the deploy retained: a gateway that subscribes
/// later still gets it, byte for byte.
#[tokio::test]
async fn a_retained_fleet_deploy_stays_on_the_broker_for_later_gateways() {
    use outpost::client::modules::{self as deploy_client, Request, Target};
    let (h, _a) = broker_with_gateway_a().await;
    let broker = &h.upstream;
    let (_, module) = celsius(9, "2.0.0");
    let fleet = Target::fleet(deploy_client::DEFAULT_FLEET_PREFIX, "north").unwrap();
    let request = Request::deploy_module(fleet, &module).retained().unwrap();
    // Returns once gateway a answered (it was subscribed already).
    let statuses = deploy_client::request_fleet(&broker.url(), &request, common::PATIENCE, Some(1))
        .await
        .unwrap();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    let late =
        common::Subscriber::connect(broker.port, "late-gateway", "outpost/fleet/north/modules/#")
            .await;
    common::eventually("the retained deploy", || late.received.len() == 1).await;
    let (topic, payload) = late.received.all().remove(0);
    assert_eq!(topic, "outpost/fleet/north/modules/celsius/deploy");
    assert_eq!(payload, module.to_bytes());
}

/// Runs outpost, killing it (and failing the test) if it has not finished after 60 s: a hang
/// is what these tests look for.
fn outpost_within_a_minute(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run outpost");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!("outpost {args:?} hung: {}", stderr(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("collect output")
}

/// A configuration, geofence or module path naming a FIFO without a writer, a device or a
/// directory is refused with its path named: no hang in open(), no endless read of /dev/zero.
#[test]
fn paths_that_are_not_regular_files_are_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    common::make_fifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    let mut cases: Vec<(String, &str)> = Vec::new();
    for config in [fifo, "/dev/zero"] {
        cases.push((config.to_string(), "is not a regular file"));
    }
    for special in [fifo, "/dev/zero", dir.path().to_str().unwrap()] {
        let geofence = format!("[[geofence]]\nfile = \"{special}\"\n");
        let module = format!("[[module]]\nname = \"m\"\npath = \"{special}\"\n");
        for (text, expected) in [
            (geofence, "is not a regular file"),
            (module, "is not a file"),
        ] {
            let path = dir.path().join(format!("case{}.toml", cases.len()));
            std::fs::write(&path, text).unwrap();
            cases.push((path.to_str().unwrap().to_string(), expected));
        }
    }
    for (config, expected) in &cases {
        let out = outpost_within_a_minute(&["config", "check", config]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{config} accepted");
        assert!(err.contains(expected), "{config}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The README's first command, shortened: the demo's stand-in upstream (the same broker as the
/// gateway's, with a channel for a journal) must let the gateway's uplink in with its
/// reserved client id, and everything published must arrive. This failed, with nothing
/// delivered, when the stand-in refused reserved ids like a gateway's own listener does.
#[test]
fn the_demo_delivers_everything_it_published() {
    let out = outpost(&["demo", "--phase-secs", "2", "--devices", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    let check = stdout
        .lines()
        .find(|l| l.contains("check: published"))
        .unwrap_or_else(|| panic!("no check line:\n{stdout}"));
    assert!(check.ends_with("OK"), "{check}");
    let delivered = stdout
        .lines()
        .find(|l| l.contains("enriched readings delivered upstream"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(delivered > 0, "something was delivered:\n{stdout}");
}

/// Whether Mosquitto on `port` accepts a QoS 1 publish from `user` with `password`
/// (`mosquitto_pub` exits 0 only after its PUBACK).
fn mosquitto_accepts(port: u16, user: &str, password: &str, version: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
        .args(["-u", user, "-P", password, "-q", "1", "-t", "t", "-m", "x"])
        .output()
        .expect("mosquitto_pub runs")
        .status
        .success()
}

/// Issue 14: password files in Mosquitto's format both ways. What `outpost passwd` writes,
/// Debian's Mosquitto accepts (and refuses the old password after a change); what Debian's
/// `mosquitto_passwd` adds to the same file, outpost's reader verifies. The file is created
/// 0600 and keeps its other lines.
#[test]
fn password_files_work_both_ways_with_mosquitto() {
    use outpost::edge::passwords::PasswordFile;
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwords");
    for (user, password) in [("alice", "old-a"), ("bob", "pw-b"), ("alice", "new-a")] {
        let out = common::outpost_passwd(&file, user, password);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(
        String::from_utf8_lossy(&common::outpost_passwd(&file, "bob", "pw-b").stdout)
            .contains("changed")
    );
    let refused = common::outpost_passwd(&file, "no:colon", "pw");
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("':'"), "{}", stderr(&refused));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 2);

    // Debian's tool adds its own entry (2.0's default: $7$, 101 iterations) to our file.
    let status = Command::new("mosquitto_passwd")
        .args(["-b", file.to_str().unwrap(), "carol", "pw-c"])
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success());
    let ours = PasswordFile::parse(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(ours.users(), 3);
    assert!(ours.skipped().is_empty());
    for (user, password, ok) in [
        ("alice", "new-a", true),
        ("alice", "old-a", false),
        ("bob", "pw-b", true),
        ("carol", "pw-c", true),
        ("carol", "pw-b", false),
        ("nobody", "pw-c", false),
    ] {
        assert_eq!(
            ours.verify(user, password.as_bytes()),
            ok,
            "outpost: {user}"
        );
    }

    // And the real broker with the same file.
    let port = common::free_port();
    let mut mosquitto = common::Mosquitto::with_config(
        dir.path(),
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            file.display()
        ),
    );
    mosquitto.start();
    for version in ["mqttv311", "mqttv5"] {
        for (user, password, ok) in [
            ("alice", "new-a", true),
            ("alice", "old-a", false),
            ("bob", "pw-b", true),
            ("carol", "pw-c", true),
            ("nobody", "pw-c", false),
        ] {
            assert_eq!(
                mosquitto_accepts(port, user, password, version),
                ok,
                "mosquitto {version}: {user}"
            );
        }
    }
}
