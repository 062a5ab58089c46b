//! Issue 14, item 4: `outpost deadletters` and `outpost module` over TLS. The real `outpost`
//! binary as the gateway (a `[broker.tls]` listener with the test CA's server certificate for
//! 127.0.0.1 and localhost) and as the operator's command, real sockets on 127.0.0.1: the
//! broker's certificate checked against `--cafile` (and refused without it), an admin logging
//! in with a password over TLS or with a client certificate whose CN is the admin's name, and
//! the options refused before anything is sent when they cannot be used.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::pki::listener_pki;
use common::{write_config, Device, Gateway};

const GATEWAY: &str = "gw-cli-tls";

/// Seconds the commands may wait for an answer: long enough for any machine, and a failure
/// that should be immediate is told apart by its message, not by its speed.
const TIMEOUT_SECS: &str = "90";

/// `ca.pem`, the gateway's `server.pem`/`server.key` (for localhost and 127.0.0.1), and the
/// client certificates `alice` and `bob` of that CA, in `dir`.
fn pki(dir: &Path) {
    listener_pki(dir, "operator test ca");
}

/// A gateway with `broker` under `[broker]`, a TLS listener on the returned port with the
/// server certificate of [`pki`] and `tls` (more keys of `[broker.tls]`), and a route that
/// dead-letters payloads on `json/#` that are not JSON. Its upstream is a closed port: dead
/// letters never reach the outbox.
fn gateway(dir: &Path, broker: &str, tls: &str) -> (Gateway, u16) {
    let tls_port = common::free_port();
    let upstream = common::free_port();
    let config = write_config(
        dir,
        &format!(
            "gateway_id = \"{GATEWAY}\"\n\n[broker]\n{broker}\n\n[broker.tls]\n\
             listen = [\"127.0.0.1:{tls_port}\"]\ncertfile = \"server.pem\"\n\
             keyfile = \"server.key\"\n{tls}\n\n\
             [[upstream]]\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{upstream}\"\n\n\
             [[route]]\nname = \"json-in\"\nfilter = \"json/#\"\npayload = \"json\"\n"
        ),
    );
    let mut gateway = Gateway::new(dir, &["--config", config.to_str().unwrap()]);
    gateway.start();
    common::block_until("the gateway's TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    (gateway, tls_port)
}

fn outpost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .expect("run outpost")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `path` in `dir`, as an argument.
fn file(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadletters_list_and_purge_over_tls_with_cafile_and_an_admins_password() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let passwords = dir.join("passwords");
    for (user, password) in [("ops", "pw-ops"), ("alice", "pw-alice")] {
        let made = common::outpost_passwd(&passwords, user, password);
        assert!(made.status.success(), "{}", text(&made.stderr));
    }
    let (gateway, tls_port) = gateway(
        dir,
        "password_file = \"passwords\"\nallow_anonymous = true\nadmins = [\"ops\"]",
        "",
    );
    let device = Device::connect(gateway.port, "dev-1").await;
    device.publish("json/dev-1/a", "not json").await;
    device.publish("json/dev-1/b", "not json either").await;
    device.wait_acked(2).await;
    common::eventually("two dead letters", || {
        gateway.dead_letters().values().sum::<u64>() == 2
    })
    .await;

    let ca = file(dir, "ca.pem");
    let cli = |url: &str, verb: &str, extra: &[&str], cafile: bool| {
        let mut args: Vec<String> = vec!["deadletters".into(), verb.into()];
        args.extend(extra.iter().map(|a| a.to_string()));
        for arg in [
            "--broker",
            url,
            "--gateway-id",
            GATEWAY,
            "--username",
            "ops",
            "--password",
            "pw-ops",
            "--timeout-secs",
            TIMEOUT_SECS,
        ] {
            args.push(arg.into());
        }
        if cafile {
            args.extend(["--cafile".to_string(), ca.clone()]);
        }
        tokio::task::spawn_blocking(move || {
            outpost(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
    };

    // The broker's certificate verified against --cafile, for its IP address...
    let by_ip = format!("mqtts://127.0.0.1:{tls_port}");
    let listed = cli(&by_ip, "list", &["--json"], true).await.unwrap();
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let letters = reply["dead_letters"].as_array().expect("dead letters");
    assert_eq!(letters.len(), 2, "{reply}");
    assert!(
        letters.iter().all(|l| l["reason"] == "malformed"),
        "{reply}"
    );

    // ...and without it, against the system's CAs, which did not sign it: a certificate error
    // at once (the --timeout-secs of 90 would say "no answer" instead), and nothing changes.
    let refused = cli(&by_ip, "purge", &["--all"], false).await.unwrap();
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("not signed by a trusted CA") && stderr.contains("--cafile"),
        "{stderr}"
    );
    assert_eq!(gateway.dead_letters().values().sum::<u64>(), 2);

    // By name, with --cafile: purged.
    let by_name = format!("mqtts://localhost:{tls_port}");
    let purged = cli(&by_name, "purge", &["--all"], true).await.unwrap();
    assert!(purged.status.success(), "{}", text(&purged.stderr));
    assert_eq!(text(&purged.stdout).trim(), "purged 2");
    assert!(gateway.dead_letters().is_empty());
}

#[test]
fn module_list_over_tls_with_the_client_certificate_of_an_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let (_gateway, tls_port) = gateway(
        dir,
        "admins = [\"alice\"]",
        "cafile = \"ca.pem\"\nrequire_certificate = true\nuse_identity_as_username = true",
    );
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = file(dir, "ca.pem");
    let list = |identity: Option<&str>| {
        let mut args = vec![
            "module".to_string(),
            "list".into(),
            "--broker".into(),
            url.clone(),
            "--gateway".into(),
            GATEWAY.into(),
            "--cafile".into(),
            ca.clone(),
            "--timeout".into(),
            TIMEOUT_SECS.into(),
        ];
        if let Some(name) = identity {
            args.extend([
                "--certfile".into(),
                file(dir, &format!("{name}.pem")),
                "--keyfile".into(),
                file(dir, &format!("{name}.key")),
            ]);
        }
        outpost(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // alice's certificate: she is an admin, and her CN is her name.
    let listed = list(Some("alice"));
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert_eq!(
        text(&listed.stdout).trim(),
        format!("gateway {GATEWAY}: no modules")
    );

    // bob's, of the same CA: connected as bob, who is no admin.
    let bob = list(Some("bob"));
    assert!(!bob.status.success());
    let stderr = text(&bob.stderr);
    assert!(stderr.contains("refused the subscription"), "{stderr}");

    // No certificate: the listener requires one.
    let nobody = list(None);
    assert!(!nobody.status.success());
    let stderr = text(&nobody.stderr);
    assert!(
        stderr.contains("client certificate") && stderr.contains("--certfile"),
        "{stderr}"
    );
}

#[test]
fn tls_options_that_cannot_be_used_are_refused_before_connecting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pki(dir);
    let ca = file(dir, "ca.pem");
    // Nothing listens there: an error about connecting would mean something was tried.
    let closed = common::free_port();
    let plain = format!("mqtt://127.0.0.1:{closed}");
    let tls = format!("mqtts://127.0.0.1:{closed}");
    let missing = file(dir, "missing.pem");
    let (alice_pem, alice_key) = (file(dir, "alice.pem"), file(dir, "alice.key"));
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        // TLS files with a plain URL.
        (
            vec!["deadletters", "list", "--broker", &plain, "--cafile", &ca],
            &["--cafile", "mqtts://"],
        ),
        (
            vec![
                "module",
                "list",
                "--gateway",
                "g",
                "--broker",
                &plain,
                "--cafile",
                &ca,
            ],
            &["--cafile", "mqtts://"],
        ),
        // A certificate without its key, and the reverse: clap refuses.
        (
            vec![
                "deadletters",
                "list",
                "--broker",
                &tls,
                "--certfile",
                &alice_pem,
            ],
            &["--keyfile"],
        ),
        (
            vec![
                "module",
                "list",
                "--gateway",
                "g",
                "--broker",
                &tls,
                "--keyfile",
                &alice_key,
            ],
            &["--certfile"],
        ),
        // A missing file, named.
        (
            vec![
                "deadletters",
                "list",
                "--broker",
                &tls,
                "--cafile",
                &missing,
            ],
            &["--cafile", "missing.pem"],
        ),
    ];
    for (args, expected) in cases {
        let out = outpost(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for part in expected {
            assert!(stderr.contains(part), "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("cannot talk to"), "{args:?}: {stderr}");
    }
}
