//! The command line: configuration checks give one clear line naming the key, and `run`
//! refuses bad configuration before opening anything, without panicking.

mod common;

use std::process::{Command, Output};

fn outpost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outpost")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
