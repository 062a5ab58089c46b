//! Device-login and ACL benchmarks (issue 14): what one password check and one ACL decision
//! cost.
//!
//! - `password/*`: [`PasswordFile::verify`] of a right password for `$7$` (PBKDF2-SHA512)
//!   hashes of 101 iterations (what Debian's `mosquitto_passwd` 2.0.11 writes), 1,000 (what
//!   `outpost passwd` writes) and 10,000, and for a `$6$` (one SHA-512) hash; and an unknown
//!   user (which costs a stand-in check, so that timing does not reveal usernames).
//! - `acl/*`: [`Acl::allows`] for a publish with a 1,000-line ACL file (500 users with two
//!   rules each; the client's section found by name), with only patterns (`%u` and `%c`
//!   substituted per check), and [`Acl::allows_subscribe`] for a wildcard filter.
//!
//! Every figure is per check. Run: `cargo bench --bench auth`. Figures are in `BENCHMARKS.md`.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion};
use outpost::edge::acl::{Access, Acl};
use outpost::edge::passwords::PasswordFile;

/// A `$7$` line for `user` with `iterations`, as `mosquitto_passwd` writes them.
fn pbkdf2_line(user: &str, password: &[u8], iterations: u32) -> String {
    let salt = [7u8; 12];
    let mut hash = [0u8; 64];
    let rounds = NonZeroU32::new(iterations).expect("iterations above 0");
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        rounds,
        &salt,
        password,
        &mut hash,
    );
    format!(
        "{user}:$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    )
}

fn passwords(c: &mut Criterion) {
    let mut group = c.benchmark_group("password");
    group.measurement_time(Duration::from_secs(5));
    for iterations in [101, 1_000, 10_000] {
        let file = PasswordFile::parse(&pbkdf2_line("dev", b"a long random password", iterations));
        group.bench_function(format!("pbkdf2_{iterations}"), |b| {
            b.iter(|| assert!(file.verify(black_box("dev"), black_box(b"a long random password"))))
        });
    }
    // Written by `mosquitto_passwd -H sha512` 2.0.11: alice / secret.
    let sha512 = PasswordFile::parse(
        "alice:$6$AHWIVKfSjVPvPmyn$0EtqeSl7zBcswGd5E4IgJx/+I8v0DI+B1ziiSanBkQQd2/ZKnCKG3xgkBGkH6Ywe4BO+w2IOTrvpWf/e29hr7A==",
    );
    group.bench_function("sha512", |b| {
        b.iter(|| assert!(sha512.verify(black_box("alice"), black_box(b"secret"))))
    });
    let file = PasswordFile::parse(&pbkdf2_line("dev", b"pw", 1_000));
    group.bench_function("unknown_user_1000", |b| {
        b.iter(|| assert!(!file.verify(black_box("nobody"), black_box(b"pw"))))
    });
    group.finish();
}

fn acls(c: &mut Criterion) {
    let mut group = c.benchmark_group("acl");
    // 1,000 lines of rules: 500 users, each with a read rule and a write rule of its own.
    let mut text = String::new();
    for n in 0..500 {
        text.push_str(&format!(
            "user device-{n}\ntopic read config/device-{n}/#\ntopic write telemetry/device-{n}/+\n"
        ));
    }
    let users = Acl::parse(&text).expect("the ACL parses");
    assert_eq!(users.rules(), 1_000);
    group.bench_function("publish_1000_rules", |b| {
        b.iter(|| {
            assert!(users.allows(
                black_box(Some("device-250")),
                black_box("device-250"),
                black_box("telemetry/device-250/env"),
                Access::Write,
            ))
        })
    });
    group.bench_function("publish_denied_1000_rules", |b| {
        b.iter(|| {
            assert!(!users.allows(
                black_box(Some("device-250")),
                black_box("device-250"),
                black_box("telemetry/device-251/env"),
                Access::Write,
            ))
        })
    });
    let patterns = Acl::parse(
        "pattern write telemetry/%u/+\npattern read config/%c/#\npattern deny telemetry/%u/secret\n",
    )
    .expect("the ACL parses");
    group.bench_function("publish_patterns", |b| {
        b.iter(|| {
            assert!(patterns.allows(
                black_box(Some("device-250")),
                black_box("device-250"),
                black_box("telemetry/device-250/env"),
                Access::Write,
            ))
        })
    });
    group.bench_function("subscribe_wildcard_1000_rules", |b| {
        b.iter(|| {
            assert!(users.allows_subscribe(
                black_box(Some("device-250")),
                black_box("device-250"),
                black_box("config/#"),
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, passwords, acls);
criterion_main!(benches);
