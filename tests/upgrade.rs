//! A data directory written by an older outpost opens and drains with this one
//! (`tests/data/upgrade/`: what it holds, which version wrote it and how, is in its `make.sh`).
//! The older gateway was killed (kill -9) with rows in every durable place: the outbox, the
//! lane queue of a module that was running, events held for a module without a file, dead
//! letters, a kept broker session with a queued message, and a retained message.

mod common;

use std::path::Path;

use common::{eventually, Harness, Subscriber};

/// Copies a directory's files (the fixture has no subdirectories).
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the data directory");
    for entry in std::fs::read_dir(from).expect("read the fixture") {
        let entry = entry.expect("fixture entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy a fixture file");
    }
}

/// The messages that arrived on `topic`, in arrival order.
fn payloads_on(received: &[(String, Vec<u8>)], topic: &str) -> Vec<String> {
    received
        .iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_written_by_the_previous_version_opens_and_drains() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/upgrade");
    let passthrough = outpost::handlers::examples::guest_path("passthrough");
    let template = std::fs::read_to_string(fixture.join("outpost.toml")).expect("template");
    let config = template
        .replace("@LATER@", &format!("path = \"{}\"", passthrough.display()))
        .replace("@SLOW@", &passthrough.display().to_string());
    let mut h = Harness::builder()
        .subscriber_as("upgrade-sub", "#")
        .config(&config)
        .upstream_arg()
        .build()
        .await;
    copy_files(&fixture.join("data"), &h.gateway.data);
    h.gateway.start();

    // Everything the old version had queued reaches the upstream: the outbox rows, the held
    // events now that their module has a file, and the lane queue of the running module.
    eventually("12 messages upstream", || h.received.len() >= 12).await;
    eventually("outbox drained", || h.gateway.outbox_depth() == 0).await;
    let received = h.received.all();
    assert_eq!(
        payloads_on(&received, "plain/d1/env"),
        ["p-1", "p-2", "p-3", "p-4", "p-5"]
    );
    assert_eq!(
        payloads_on(&received, "lane/d2/env"),
        [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
    );
    assert_eq!(
        payloads_on(&received, "slow/d4/env"),
        ["loop", "s-1", "s-2", "s-3"]
    );
    assert_eq!(received.len(), 12, "nothing else upstream: {received:?}");

    // The dead letters are still there, with their reason, route and payload.
    let dead: Vec<(String, String, String, Vec<u8>)> = h
        .gateway
        .dead_letter_rows()
        .into_iter()
        .map(|d| (d.route, d.reason, d.topic, d.payload))
        .collect();
    assert_eq!(
        dead,
        [
            (
                "strict".to_string(),
                "malformed".to_string(),
                "strict/d3/env".to_string(),
                b"not-json-1".to_vec()
            ),
            (
                "strict".to_string(),
                "malformed".to_string(),
                "strict/d3/env".to_string(),
                b"not-json-2".to_vec()
            ),
        ]
    );

    // The broker's kept session gets the message queued for it, and the retained message is
    // still retained.
    let keeper = Subscriber::connect(h.gateway.port, "keeper", "local/#").await;
    eventually("the kept session's message", || keeper.received.len() >= 1).await;
    assert_eq!(
        keeper.received.all(),
        [("local/x".to_string(), b"kept-1".to_vec())]
    );
    let late = Subscriber::connect(h.gateway.port, "late", "retained/#").await;
    eventually("the retained message", || late.received.len() >= 1).await;
    assert_eq!(
        late.received.all(),
        [("retained/x".to_string(), b"r-1".to_vec())]
    );
    assert!(h.gateway.stop(), "gateway exits 0 on SIGTERM");
}
