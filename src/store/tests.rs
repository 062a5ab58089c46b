use super::*;

fn row(link: &str, n: u8) -> NewOutboxRow {
    NewOutboxRow {
        link: link.into(),
        msg_id: format!("gw-{n}"),
        route: "r".into(),
        topic: format!("t/{n}"),
        payload: vec![n],
        received_ms: 1,
        expires_ms: 0,
        regions: String::new(),
    }
}

fn outputs(rows: Vec<NewOutboxRow>) -> Batch {
    Batch {
        outputs: rows,
        ..Batch::default()
    }
}

fn letter(reason: &str, route: &str) -> NewDeadLetter {
    NewDeadLetter {
        stage: Stage::Event,
        event_id: 42,
        route: route.into(),
        module: Some("m".into()),
        module_version: Some("0123456789abcdef".into()),
        link: None,
        msg_id: None,
        reason: reason.into(),
        detail: "detail".into(),
        attempts: 3,
        topic: "t".into(),
        device: "d".into(),
        client_id: "c".into(),
        payload: b"x".to_vec(),
        received_ms: 5,
        geo: String::new(),
    }
}

fn entry(n: u8) -> NewJournalEntry {
    NewJournalEntry {
        topic: format!("t/{n}"),
        payload: bytes::Bytes::from(vec![n]),
        qos: 1,
        retain: false,
        client_id: "c".into(),
        received_ms: 7,
    }
}

#[test]
fn outbox_is_per_link_in_order_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(&outputs(vec![row("a", 1), row("b", 2), row("a", 3)]))
            .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let a = store.outbox_after("a", 0, 10).unwrap();
    assert_eq!(
        a.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert!(a[0].id < a[1].id);
    assert_eq!(store.outbox_after("a", a[0].id, 10).unwrap().len(), 1);
    assert_eq!(
        store.outbox_depth(None).unwrap(),
        3,
        "totals reloaded at open"
    );
    store.delete_outbox(&[a[0].delivered()]).unwrap();
    assert_eq!(store.outbox_depth(Some("a")).unwrap(), 1);
    assert_eq!(store.outbox_depth(Some("b")).unwrap(), 1);
    assert_eq!(store.outbox_rows(), 2);
}

#[test]
fn deletes_by_runs_remove_exactly_the_ids_given() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Two links interleaved: a's ids are not consecutive where b's rows stand between them.
    let links = ["a", "a", "b", "a", "a", "a", "b", "a"];
    let rows: Vec<NewOutboxRow> = links
        .iter()
        .enumerate()
        .map(|(n, link)| row(link, n as u8))
        .collect();
    store.commit(&outputs(rows)).unwrap();
    let a = store.outbox_after("a", 0, 10).unwrap();
    let b = store.outbox_after("b", 0, 10).unwrap();
    // Every a row but the fourth (payload 4), given out of order and once twice.
    let gone: Vec<Delivered> = a
        .iter()
        .filter(|r| r.payload[0] != 4)
        .map(|r| r.delivered())
        .rev()
        .chain(std::iter::once(a[0].delivered()))
        .collect();
    store.delete_outbox(&gone).unwrap();
    let left: Vec<u8> = store
        .outbox_after("a", 0, 10)
        .unwrap()
        .iter()
        .map(|r| r.payload[0])
        .collect();
    assert_eq!(left, vec![4]);
    assert_eq!(
        store.outbox_after("b", 0, 10).unwrap(),
        b,
        "b's rows untouched"
    );
    assert_eq!(store.outbox_rows(), 3, "the totals follow");
}

#[test]
fn deleting_a_run_of_which_some_rows_are_gone_counts_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rows: Vec<NewOutboxRow> = (1..=5u8)
        .map(|n| NewOutboxRow {
            payload: vec![n; usize::from(n) * 10],
            ..row("a", n)
        })
        .collect();
    store.commit(&outputs(rows)).unwrap();
    let a = store.outbox_after("a", 0, 10).unwrap();
    let bytes = |store: &Store| store.totals.outbox_bytes.load(Ordering::Relaxed);
    assert_eq!(bytes(&store), 150);
    // The third row expires while the first four are in flight; its removal is counted there.
    store.expire_outbox(&[a[2].id]).unwrap();
    assert_eq!((store.outbox_rows(), bytes(&store)), (4, 120));
    let acknowledged: Vec<Delivered> = a[..4].iter().map(|r| r.delivered()).collect();
    store.delete_outbox(&acknowledged).unwrap();
    assert_eq!((store.outbox_rows(), bytes(&store)), (1, 50));
    let left = store.outbox_after("a", 0, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].payload[0], 5);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        (store.outbox_rows(), bytes(&store)),
        (1, 50),
        "the totals agree with the database"
    );
}

proptest::proptest! {
    /// The runs cover exactly the ids given, each once, in ascending order, and no two runs
    /// touch (they would be one).
    #[test]
    fn id_runs_cover_exactly_the_ids(ids in proptest::collection::vec(0i64..200, 0..80)) {
        let runs = super::id_runs(&ids);
        let covered: Vec<i64> = runs.iter().flat_map(|(a, b)| *a..=*b).collect();
        let mut expected = ids.clone();
        expected.sort_unstable();
        expected.dedup();
        proptest::prop_assert_eq!(covered, expected);
        for pair in runs.windows(2) {
            proptest::prop_assert!(pair[0].1 + 1 < pair[1].0);
        }
    }
}

#[test]
fn ids_are_never_reused_after_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.commit(&outputs(vec![row("a", 1)])).unwrap();
    let first = store.outbox_after("a", 0, 1).unwrap()[0].id;
    store
        .delete_outbox(&[Delivered {
            id: first,
            bytes: 1,
        }])
        .unwrap();
    store.commit(&outputs(vec![row("a", 2)])).unwrap();
    let second = store.outbox_after("a", 0, 1).unwrap()[0].id;
    assert!(second > first);
}

/// Batches larger than one multi-row statement (and not a multiple of it) go in whole, in
/// order, every field in its place.
#[test]
fn large_batches_keep_every_row_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut writer = store.journal_writer().unwrap();
    let entries: Vec<NewJournalEntry> = (0..75u8)
        .map(|n| NewJournalEntry {
            qos: n % 2,
            retain: n % 3 == 0,
            client_id: format!("c{n}").into(),
            received_ms: u64::from(n) * 1000,
            ..entry(n)
        })
        .collect();
    writer.append(&entries).unwrap();
    let journaled = store.journal_after(0, 100).unwrap();
    assert_eq!(journaled.len(), 75);
    for (n, row) in journaled.iter().enumerate() {
        let e = &entries[n];
        assert_eq!(
            (
                &row.topic,
                &row.payload[..],
                row.client_id.as_str(),
                row.received_ms
            ),
            (&e.topic, &e.payload[..], &*e.client_id, e.received_ms),
            "journal row {n}"
        );
    }
    assert!(journaled.windows(2).all(|w| w[0].id < w[1].id));

    let rows: Vec<NewOutboxRow> = (0..70u8)
        .map(|n| NewOutboxRow {
            expires_ms: u64::from(n) + 5_000_000_000_000,
            regions: format!("r{n}"),
            ..row(if n % 5 == 0 { "b" } else { "a" }, n)
        })
        .collect();
    store.commit(&outputs(rows.clone())).unwrap();
    assert_eq!(store.outbox_rows(), 70);
    let a = store.outbox_after("a", 0, 100).unwrap();
    let b = store.outbox_after("b", 0, 100).unwrap();
    assert_eq!((a.len(), b.len()), (56, 14));
    let read: Vec<&OutboxRow> = {
        let mut all: Vec<&OutboxRow> = a.iter().chain(b.iter()).collect();
        all.sort_by_key(|r| r.id);
        all
    };
    for (n, (got, sent)) in read.iter().zip(&rows).enumerate() {
        assert_eq!(
            (
                &got.msg_id,
                &got.topic,
                &got.payload,
                got.expires_ms,
                &got.regions
            ),
            (
                &sent.msg_id,
                &sent.topic,
                &sent.payload,
                sent.expires_ms,
                &sent.regions
            ),
            "outbox row {n}"
        );
    }
}

#[test]
fn journal_rows_leave_with_their_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut writer = store.journal_writer().unwrap();
    writer.append(&[entry(1), entry(2)]).unwrap();
    assert_eq!(store.journal_depth(), 2);
    let rows = store.journal_after(0, 10).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].topic.as_str(), rows[0].client_id.as_str()),
        ("t/1", "c")
    );
    store
        .commit(&Batch {
            outputs: vec![row("a", 1)],
            journal_done: vec![rows[0].id],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.journal_depth(), 1);
    assert_eq!(store.outbox_rows(), 1);
    assert_eq!(
        store.journal_after(rows[0].id, 10).unwrap()[0].id,
        rows[1].id
    );
}

#[test]
fn journal_cap_is_reported_full() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        journal_max_rows: 2,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    let mut writer = store.journal_writer().unwrap();
    writer.append(&[entry(1)]).unwrap();
    assert!(!writer.is_full());
    writer.append(&[entry(2)]).unwrap();
    assert!(writer.is_full());
}

#[test]
fn reject_new_refuses_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        outbox_max_rows: 2,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    let mut writer = store.journal_writer().unwrap();
    writer.append(&[entry(1)]).unwrap();
    let journal_id = store.journal_after(0, 1).unwrap()[0].id;
    store
        .commit(&outputs(vec![row("a", 1), row("a", 2)]))
        .unwrap();
    let err = store
        .commit(&Batch {
            outputs: vec![row("a", 3)],
            journal_done: vec![journal_id],
            ..Batch::default()
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::OutboxFull { rows: 2, .. }),
        "{err}"
    );
    assert_eq!(store.outbox_rows(), 2);
    assert_eq!(store.journal_depth(), 1, "the journal row stays");
}

#[test]
fn drop_oldest_moves_the_oldest_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        outbox_max_rows: 2,
        outbox_policy: OutboxPolicy::DropOldest,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    store
        .commit(&outputs(vec![row("a", 1), row("a", 2)]))
        .unwrap();
    let report = store.commit(&outputs(vec![row("b", 3)])).unwrap();
    assert_eq!(report.evicted_outbox, 1);
    let left: Vec<u8> = ["a", "b"]
        .iter()
        .flat_map(|l| store.outbox_after(l, 0, 10).unwrap())
        .map(|r| r.payload[0])
        .collect();
    assert_eq!(left, vec![2, 3]);
    let dead = store
        .dead_letters(&DeadLetterFilter::default(), 10)
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].letter.reason, "evicted");
    assert_eq!(dead[0].letter.stage, Stage::Output);
    assert_eq!(dead[0].letter.msg_id.as_deref(), Some("gw-1"));

    // Replaying the evicted output queues it again for its link, with its message id.
    assert_eq!(
        store
            .replay_dead_letters(&DeadLetterFilter::default())
            .unwrap(),
        1
    );
    let again = store.outbox_after("a", 0, 10).unwrap();
    assert_eq!(again.last().map(|r| r.msg_id.as_str()), Some("gw-1"));
    assert_eq!(store.dead_letter_count(), 0);
}

#[test]
fn dead_letter_cap_evicts_the_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        dead_letters_max_rows: 3,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    let mut evicted = 0;
    for i in 0..5 {
        let report = store
            .commit(&Batch {
                dead: vec![letter(&format!("r{i}"), "route")],
                ..Batch::default()
            })
            .unwrap();
        evicted += report.evicted_dead_letters;
    }
    assert_eq!(evicted, 2);
    let kept: Vec<String> = store
        .dead_letters(&DeadLetterFilter::default(), 10)
        .unwrap()
        .into_iter()
        .map(|d| d.letter.reason.to_string())
        .collect();
    assert_eq!(kept, vec!["r4", "r3", "r2"]);
    assert_eq!(store.dead_letter_count(), 3);
}

#[test]
fn replay_by_filter_turns_events_into_due_retries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .commit(&Batch {
            dead: vec![
                letter("trap", "a"),
                letter("timeout", "a"),
                letter("trap", "b"),
            ],
            ..Batch::default()
        })
        .unwrap();
    let by_reason = DeadLetterFilter {
        reason: Some("trap".into()),
        ..DeadLetterFilter::default()
    };
    assert_eq!(store.dead_letters(&by_reason, 10).unwrap().len(), 2);
    let only_a = DeadLetterFilter {
        route: Some("a".into()),
        ..by_reason.clone()
    };
    assert_eq!(store.replay_dead_letters(&only_a).unwrap(), 1);
    let due = store.due_retries(crate::event::now_ms() + 1, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            due[0].retry.route.as_str(),
            due[0].retry.event_id,
            due[0].retry.attempts
        ),
        ("a", 42, 0)
    );
    assert_eq!(store.dead_letter_count(), 2);
    assert!(store.next_retry_due().unwrap().is_some());

    // A retry handled by a commit disappears with it.
    store
        .commit(&Batch {
            retries_done: vec![due[0].id],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.retry_count().unwrap(), 0);

    assert_eq!(store.purge_dead_letters(&by_reason).unwrap(), 1);
    assert_eq!(
        store
            .purge_dead_letters(&DeadLetterFilter::default())
            .unwrap(),
        1
    );
    assert_eq!(store.dead_letter_count(), 0);
}

#[test]
fn expired_rows_become_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut r = row("a", 1);
    r.expires_ms = 10;
    store.commit(&outputs(vec![r])).unwrap();
    let rows = store.outbox_after("a", 0, 10).unwrap();
    assert!(rows[0].is_expired(11));
    assert!(!rows[0].is_expired(9));
    assert_eq!(store.expire_outbox(&[rows[0].id]).unwrap().rows, 1);
    assert_eq!(store.outbox_rows(), 0);
    let dead = store.dead_letters(&DeadLetterFilter::default(), 1).unwrap();
    assert_eq!(dead[0].letter.reason, "expired");
}

#[test]
fn a_full_database_is_a_clear_error_and_keeps_what_it_had() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        max_db_bytes: 256 * 1024,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    let mut writer = store.journal_writer().unwrap();
    let big = |n: u8| NewJournalEntry {
        payload: bytes::Bytes::from(vec![n; 16 * 1024]),
        ..entry(n)
    };
    let mut written = 0;
    let err = loop {
        match writer.append(&[big(written as u8)]) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1000, "the size cap never applied");
    };
    assert!(err.is_full(), "{err}");
    assert_eq!(store.journal_depth(), written);
    assert_eq!(
        store.journal_after(0, 10_000).unwrap().len() as u64,
        written
    );
}

#[test]
fn kv_round_trip_per_module() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.kv_get("m", "k").unwrap(), None);
    store.kv_set("m", "k", b"1").unwrap();
    store.kv_set("m", "k", b"2").unwrap();
    assert_eq!(store.kv_get("m", "k").unwrap(), Some(b"2".to_vec()));
    assert_eq!(store.kv_get("other", "k").unwrap(), None);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = Store::open(dir.path()).err().expect("must refuse");
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
}

#[test]
fn rejected_and_expired_rows_respect_the_dead_letter_cap() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        dead_letters_max_rows: 1,
        ..StoreLimits::default()
    };
    let store = Store::open_with(dir.path(), limits).unwrap();
    store
        .commit(&outputs(vec![row("a", 1), row("a", 2)]))
        .unwrap();
    let rows = store.outbox_after("a", 0, 10).unwrap();
    let first = store.reject_outbox(rows[0].id, "NotAuthorized").unwrap();
    assert_eq!((first.rows, first.evicted_dead_letters), (1, 0));
    let second = store.expire_outbox(&[rows[1].id]).unwrap();
    assert_eq!((second.rows, second.evicted_dead_letters), (1, 1));
    // A row already gone is not moved twice.
    assert_eq!(store.reject_outbox(rows[0].id, "again").unwrap().rows, 0);
    assert_eq!(store.outbox_rows(), 0);
    assert_eq!(store.dead_letter_count(), 1);
    let dead = store
        .dead_letters(&DeadLetterFilter::default(), 10)
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].letter.reason, "expired", "the newest is kept");
}

#[test]
fn a_first_version_database_is_upgraded_and_keeps_its_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(&format!(
            "BEGIN; {}; PRAGMA user_version = 1; COMMIT;",
            MIGRATIONS[0]
        ))
        .unwrap();
        conn.execute(
            "INSERT INTO dead_letters (stage, event_id, route, module, link, msg_id, reason,
                 detail, attempts, topic, device, client_id, payload, received_ms, created_ms)
             VALUES ('event', 7, 'r', 'm', NULL, NULL, 'trap', 'd', 2, 't', 'dev', 'c', x'01',
                 1, 2)",
            [],
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let dead = store
        .dead_letters(&DeadLetterFilter::default(), 10)
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].letter.reason, "trap");
    assert_eq!(dead[0].letter.module_version, None);
    let mut fresh = letter("timeout", "r");
    fresh.module_version = Some("00ff00ff00ff00ff".into());
    store
        .commit(&Batch {
            dead: vec![fresh],
            ..Batch::default()
        })
        .unwrap();
    let dead = store
        .dead_letters(&DeadLetterFilter::default(), 10)
        .unwrap();
    assert_eq!(
        dead[0].letter.module_version.as_deref(),
        Some("00ff00ff00ff00ff")
    );
}

fn module(name: &str, version: &str) -> StoredModule {
    StoredModule {
        name: name.into(),
        version: version.into(),
        sha256: format!("sha-of-{version}"),
        signer: "k".into(),
        deployed_ms: 7,
        wasm: version.as_bytes().to_vec(),
        artifact: Some(("key".into(), b"native".to_vec())),
    }
}

#[test]
fn deploys_keep_the_previous_version_and_rollback_swaps_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.deploy_module(&module("m", "1"), 1).unwrap(),
        Deployed::Activated { previous: None }
    );
    assert_eq!(
        store.deploy_module(&module("m", "1"), 1).unwrap(),
        Deployed::Unchanged
    );
    assert_eq!(
        store.deploy_module(&module("m", "2"), 2).unwrap(),
        Deployed::Activated {
            previous: Some("1".into())
        }
    );
    // Only one previous version is kept.
    store.deploy_module(&module("m", "3"), 3).unwrap();
    let summary = &store.module_summaries().unwrap()[0];
    assert_eq!(
        (
            summary.version.as_str(),
            summary.previous_version.as_deref()
        ),
        ("3", Some("2"))
    );
    assert_eq!(store.rollback_module("m", 10).unwrap(), "2");
    let active = store.active_modules().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].version, "2");
    assert_eq!(active[0].artifact, Some(("key".into(), b"native".to_vec())));
    // Rolling back again returns to where the first rollback started.
    assert_eq!(store.rollback_module("m", 11).unwrap(), "3");
    assert_eq!(store.active_modules().unwrap()[0].version, "3");
}

#[test]
fn commands_are_refused_when_stale_or_pointless_and_change_nothing_then() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        store.rollback_module("m", 1),
        Err(CommandRefused::Nothing(_))
    ));
    store.deploy_module(&module("m", "1"), 1).unwrap();
    assert!(matches!(
        store.rollback_module("m", 2),
        Err(CommandRefused::Nothing(_))
    ));
    store.deploy_module(&module("m", "2"), 3).unwrap();
    assert_eq!(store.rollback_module("m", 5).unwrap(), "1");
    // A replay (same issue time) or an older command is refused.
    assert!(matches!(
        store.rollback_module("m", 5),
        Err(CommandRefused::Stale { newest_ms: 5, .. })
    ));
    assert!(matches!(
        store.remove_module("m", 4),
        Err(CommandRefused::Stale { .. })
    ));
    assert_eq!(store.active_modules().unwrap()[0].version, "1");
    assert_eq!(store.remove_module("m", 6).unwrap(), "1");
    assert!(store.active_modules().unwrap().is_empty());
    assert!(store.module_in_slot("m", "previous").unwrap().is_none());
    assert!(matches!(
        store.remove_module("m", 7),
        Err(CommandRefused::Nothing(_))
    ));
}

/// Deploys and commands of one name share one order: a deploy issued at or before the newest
/// accepted request is refused and changes nothing (a replayed deploy of an old version cannot
/// bring it back), a redelivery of the active bytes is `Unchanged` whatever its time, and
/// another name has an order of its own.
#[test]
fn deploys_are_refused_when_stale_and_change_nothing_then() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.deploy_module(&module("m", "1"), 10).unwrap();
    store.deploy_module(&module("m", "2"), 20).unwrap();
    assert_eq!(store.newest_issued_ms("m").unwrap(), Some(20));
    // The deploy of version 1, replayed.
    assert!(matches!(
        store.deploy_module(&module("m", "1"), 10),
        Err(CommandRefused::Stale {
            issued_ms: 10,
            newest_ms: 20,
            ..
        })
    ));
    // The same time as the newest is a replay too.
    assert!(matches!(
        store.deploy_module(&module("m", "3"), 20),
        Err(CommandRefused::Stale { .. })
    ));
    let summary = &store.module_summaries().unwrap()[0];
    assert_eq!(
        (
            summary.version.as_str(),
            summary.previous_version.as_deref()
        ),
        ("2", Some("1"))
    );
    // The active version again, even with an old time: nothing to do, nothing refused.
    assert_eq!(
        store.deploy_module(&module("m", "2"), 5).unwrap(),
        Deployed::Unchanged
    );
    // A rollback moves the order on: the deploy of version 2 (time 20) cannot undo it.
    assert_eq!(store.rollback_module("m", 30).unwrap(), "1");
    assert!(matches!(
        store.deploy_module(&module("m", "2"), 20),
        Err(CommandRefused::Stale { newest_ms: 30, .. })
    ));
    assert_eq!(store.active_modules().unwrap()[0].version, "1");
    // A newer deploy is accepted; a refused one recorded nothing.
    store.deploy_module(&module("m", "4"), 31).unwrap();
    assert_eq!(store.newest_issued_ms("m").unwrap(), Some(31));
    // Names are independent.
    assert_eq!(store.newest_issued_ms("other").unwrap(), None);
    store.deploy_module(&module("other", "1"), 1).unwrap();
    // The order survives a restart.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        store.deploy_module(&module("m", "3"), 31),
        Err(CommandRefused::Stale { .. })
    ));
}

#[test]
fn an_artifact_is_stored_for_the_version_with_that_hash_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut m = module("m", "1");
    m.artifact = None;
    store.deploy_module(&m, 1).unwrap();
    store
        .set_module_artifact("m", "sha-of-other", "key", b"x")
        .unwrap();
    assert_eq!(store.active_modules().unwrap()[0].artifact, None);
    store
        .set_module_artifact("m", "sha-of-1", "key", b"code")
        .unwrap();
    assert_eq!(
        store.active_modules().unwrap()[0].artifact,
        Some(("key".into(), b"code".to_vec()))
    );
}

#[test]
fn the_retry_total_follows_commits_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let retry = |n: u64| NewRetry {
        event_id: n,
        route: "r".into(),
        topic: "t".into(),
        device: "d".into(),
        client_id: "c".into(),
        payload: vec![1],
        received_ms: 1,
        attempts: 0,
        next_attempt_ms: 0,
        reason: "queued".into(),
        detail: String::new(),
        geo: String::new(),
    };
    store
        .commit(&Batch {
            retries: vec![retry(1), retry(2), retry(3)],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.retry_count().unwrap(), 3);
    let due = store.due_retries(10, 2).unwrap();
    store
        .commit(&Batch {
            retries_done: due.iter().map(|r| r.id).collect(),
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.retry_count().unwrap(), 1);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.retry_count().unwrap(), 1);
}

#[test]
fn dead_letter_reasons_keep_the_strings_the_database_and_clients_use() {
    // The contract: these strings are stored and filtered on by the control topics.
    let strings: Vec<&str> = DeadLetterReason::KNOWN.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        strings,
        [
            "no-route",
            "bad-location",
            "no-location",
            "malformed",
            "bad-output-topic",
            "residency",
            "quarantined",
            "not-deployed",
            "trap",
            "timeout",
            "out-of-memory",
            "handler-error",
            "output-limit",
            "host-error",
            "expired",
            "rejected",
            "evicted",
        ]
    );
    for reason in DeadLetterReason::KNOWN {
        assert_eq!(DeadLetterReason::parse(reason.as_str()), reason);
        assert_eq!(reason.to_string(), reason.as_str());
        assert_eq!(
            serde_json::to_string(&reason).unwrap(),
            format!("\"{}\"", reason.as_str())
        );
    }
    let other = DeadLetterReason::parse("from-a-newer-version");
    assert_eq!(
        other,
        DeadLetterReason::Other("from-a-newer-version".into())
    );
    assert_eq!(other.as_str(), "from-a-newer-version");
    assert_eq!(RetryReason::parse("queued"), RetryReason::Queued);
    assert_eq!(RetryReason::parse("replay"), RetryReason::Replay);
    assert_eq!(
        RetryReason::parse("timeout"),
        RetryReason::Failed(DeadLetterReason::Timeout)
    );
    for s in ["queued", "replay", "trap", "", "something-new"] {
        assert_eq!(RetryReason::parse(s).as_str(), s);
    }
}

#[test]
fn rows_with_reasons_this_build_does_not_know_are_read_filtered_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    {
        // Rows as another version of outpost might have written them.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute(
            "INSERT INTO dead_letters (stage, event_id, route, module, link, msg_id, reason,
                 detail, attempts, topic, device, client_id, payload, received_ms, created_ms)
             VALUES ('event', 7, 'r', 'm', NULL, NULL, 'from-the-future', 'd', 2, 't', 'dev',
                 'c', x'01', 1, 2)",
            [],
        )
        .unwrap();
        for reason in ["queued", "brand-new"] {
            conn.execute(
                "INSERT INTO retries (event_id, route, topic, device, client_id, payload,
                     received_ms, attempts, next_attempt_ms, reason, detail)
                 VALUES (1, 'r', 't', 'd', 'c', x'01', 1, 0, 0, ?1, '')",
                [reason],
            )
            .unwrap();
        }
    }
    let filter = DeadLetterFilter {
        reason: Some("from-the-future".into()),
        ..DeadLetterFilter::default()
    };
    let dead = store.dead_letters(&filter, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].letter.reason, "from-the-future");
    // Written back (here: by the cap's bookkeeping and a replay) as it was read.
    let due = store.due_retries(10, 10).unwrap();
    let reasons: Vec<RetryReason> = due.iter().map(|r| r.retry.reason.clone()).collect();
    assert_eq!(
        reasons,
        [
            RetryReason::Queued,
            RetryReason::Failed(DeadLetterReason::Other("brand-new".into()))
        ]
    );
    let mut again = dead[0].letter.clone();
    again.event_id = 8;
    store
        .commit(&Batch {
            dead: vec![again],
            ..Batch::default()
        })
        .unwrap();
    assert_eq!(store.dead_letters(&filter, 10).unwrap().len(), 2);
    assert_eq!(store.replay_dead_letters(&filter).unwrap(), 2);
}

#[test]
fn batch_reads_stop_at_the_byte_budget_but_never_before_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let big = |link: &str, n: u8| NewOutboxRow {
        payload: vec![n; 100],
        ..row(link, n)
    };
    store
        .commit(&outputs((1..=4).map(|n| big("up", n)).collect()))
        .unwrap();
    let mut writer = store.journal_writer().unwrap();
    let entries: Vec<NewJournalEntry> = (1..=4)
        .map(|n| NewJournalEntry {
            payload: bytes::Bytes::from(vec![n; 100]),
            ..entry(n)
        })
        .collect();
    writer.append(&entries).unwrap();
    for (budget, rows) in [(1, 1), (100, 1), (101, 2), (250, 3), (usize::MAX, 4)] {
        assert_eq!(store.outbox_batch("up", 0, 10, budget).unwrap().len(), rows);
        assert_eq!(store.journal_batch(0, 10, budget).unwrap().len(), rows);
    }
    assert_eq!(store.outbox_batch("up", 0, 2, usize::MAX).unwrap().len(), 2);
    assert_eq!(store.journal_batch(0, 3, usize::MAX).unwrap().len(), 3);
    assert!(store
        .outbox_batch("elsewhere", 0, 10, 1)
        .unwrap()
        .is_empty());
}
