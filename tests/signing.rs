//! Module signing through the real `outpost` binary: `keygen`, `module sign` and
//! `module verify` accept what was signed by a trusted key and refuse, with one line saying why,
//! an untrusted key, a tampered module, another name or version, and a configuration's missing
//! trusted key; `keygen` never overwrites.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{outpost, stderr, stdout};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// Asserts that `out` failed with one error line containing `expected`, and no panic.
fn assert_refused(out: &Output, expected: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "accepted: {}", stdout(out));
    assert!(err.contains(expected), "{expected:?} not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert_eq!(
        err.lines().filter(|l| !l.starts_with("warning:")).count(),
        1,
        "{err}"
    );
}

/// `outpost module verify MODULE --trust TRUST EXTRA...`.
fn verify(module: &Path, trust: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["module", "verify", s(module), "--trust", s(trust)];
    args.extend_from_slice(extra);
    outpost(&args)
}

/// Runs `keygen` into `dir` and returns (secret, public, key id).
fn keygen(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let out = outpost(&["keygen", "--out", s(dir), "--name", name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let key_id = text
        .lines()
        .find_map(|l| l.strip_prefix("key id"))
        .expect("key id printed")
        .trim()
        .to_string();
    assert_eq!(key_id.len(), 16, "{text}");
    assert!(key_id.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pub")),
        key_id,
    )
}

/// A stand-in module: any bytes do (signing does not parse Wasm); starts like Wasm so no warning.
fn module(dir: &Path) -> PathBuf {
    let path = dir.join("handler.wasm");
    let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
    bytes.extend((0..5000u32).map(|i| (i * 7 % 251) as u8));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn sign(file: &Path, key: &Path, name: &str, version: &str, out: Option<&Path>) -> Output {
    let mut args = vec![
        "module",
        "sign",
        s(file),
        "--name",
        name,
        "--version",
        version,
        "--key",
        s(key),
    ];
    if let Some(out) = out {
        args.extend(["--out", s(out)]);
    }
    outpost(&args)
}

#[test]
fn keygen_sign_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public, key_id) = keygen(&dir.path().join("keys"), "ops");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key mode");
    assert!(std::fs::read_to_string(&public)
        .unwrap()
        .starts_with("outpost-ed25519-public "));

    let file = module(dir.path());
    let out = sign(&file, &secret, "enrich", "1.2.0", None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let printed = stdout(&out);
    let digest = {
        use sha2::Digest;
        let bytes = std::fs::read(&file).unwrap();
        sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    for expected in ["enrich", "1.2.0", digest.as_str(), key_id.as_str()] {
        assert!(printed.contains(expected), "{expected} not in {printed}");
    }
    let signed = dir.path().join("handler.wasm.signed");
    assert!(signed.is_file(), "default output FILE.signed");

    let out = verify(&signed, &public, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("verified"), "{printed}");
    assert!(
        printed.contains(&key_id) && printed.contains(&digest),
        "{printed}"
    );
    // The signing time, which a gateway orders deploys by, is shown for people and in ms.
    let issued = printed
        .lines()
        .find(|l| l.starts_with("issued"))
        .unwrap_or_else(|| panic!("no issued line in {printed}"));
    let ms: u64 = issued
        .rsplit('(')
        .next()
        .and_then(|t| t.strip_suffix(" ms)"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time in ms in {issued:?}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        ms <= now && now - ms < 10 * 60 * 1000,
        "{issued:?} is not about now"
    );
    assert!(issued.contains('T') && issued.contains("Z ("), "{issued:?}");

    // The expected name and version, given, must match.
    let out = verify(
        &signed,
        &public,
        &["--name", "enrich", "--version", "1.2.0"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = verify(&signed, &public, &["--name", "threshold"]);
    assert_refused(&out, "signed as \"enrich\", not \"threshold\"");
    let out = verify(&signed, &public, &["--version", "1.3.0"]);
    assert_refused(&out, "version \"1.2.0\", not \"1.3.0\"");

    // --out, and the same module signed twice verifies the same way.
    let other = dir.path().join("out/enrich-1.2.0.signed");
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let out = sign(&file, &secret, "enrich", "1.2.0", Some(&other));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = verify(&other, &public, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn verify_refuses_an_untrusted_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (secret, _public, signer_id) = keygen(&keys, "mallory");
    let (_, trusted, trusted_id) = keygen(&keys, "ops");
    let file = module(dir.path());
    assert!(sign(&file, &secret, "enrich", "1", None).status.success());
    let signed = dir.path().join("handler.wasm.signed");
    let out = verify(&signed, &trusted, &[]);
    assert_refused(&out, "not trusted");
    let err = stderr(&out);
    assert!(
        err.contains(&signer_id) && err.contains(&trusted_id),
        "{err}"
    );
}

#[test]
fn verify_refuses_a_tampered_module() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public, _) = keygen(dir.path(), "ops");
    let file = module(dir.path());
    assert!(sign(&file, &secret, "enrich", "1", None).status.success());
    let signed = dir.path().join("handler.wasm.signed");
    let original = std::fs::read(&signed).unwrap();

    // One bit of the module flipped.
    let mut bytes = original.clone();
    let i = bytes.len() - 100;
    bytes[i] ^= 0x01;
    let tampered = dir.path().join("tampered.signed");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = verify(&tampered, &public, &[]);
    assert_refused(&out, "module bytes were modified");

    // Truncated.
    std::fs::write(&tampered, &original[..original.len() - 10]).unwrap();
    let out = verify(&tampered, &public, &[]);
    assert_refused(&out, "truncated");

    // Renamed in the header: the signature does not cover "threshold".
    let text = original.clone();
    let at = text
        .windows(8)
        .position(|w| w == b"\"enrich\"")
        .expect("name in header");
    let mut renamed = text[..at].to_vec();
    renamed.extend_from_slice(b"\"enrich2\"");
    renamed.extend_from_slice(&text[at + 8..]);
    std::fs::write(&tampered, &renamed).unwrap();
    let out = verify(&tampered, &public, &[]);
    assert_refused(&out, "is not valid for module \"enrich2\"");

    // Not a signed module at all.
    let out = verify(&file, &public, &[]);
    assert_refused(&out, "not a signed outpost module");
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public, _) = keygen(dir.path(), "ops");
    let before = (
        std::fs::read(&secret).unwrap(),
        std::fs::read(&public).unwrap(),
    );
    let out = outpost(&["keygen", "--out", s(dir.path()), "--name", "ops"]);
    assert_refused(&out, "already exists");
    assert_eq!(
        before,
        (
            std::fs::read(&secret).unwrap(),
            std::fs::read(&public).unwrap()
        )
    );
    // A leftover public key alone is enough to refuse; no secret key is written.
    std::fs::remove_file(&secret).unwrap();
    let out = outpost(&["keygen", "--out", s(dir.path()), "--name", "ops"]);
    assert_refused(&out, "ops.pub already exists");
    assert!(!secret.exists());
    let out = outpost(&["keygen", "--out", s(dir.path()), "--name", "../ops"]);
    assert_refused(&out, "key name \"../ops\"");
}

#[test]
fn sign_refuses_bad_input_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public, _) = keygen(dir.path(), "ops");
    let file = module(dir.path());
    assert_refused(
        &sign(&file, &public, "enrich", "1", None),
        "found a public key",
    );
    assert_refused(
        &sign(&file, &secret, "en rich", "1", None),
        "module name \"en rich\"",
    );
    assert_refused(
        &sign(&file, &secret, "enrich", "", None),
        "module version is empty",
    );
    assert_refused(
        &sign(
            &dir.path().join("missing.wasm"),
            &secret,
            "enrich",
            "1",
            None,
        ),
        "missing.wasm",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(&sign(&file, &secret, "enrich", "1", None), "chmod 600");
    assert!(!dir.path().join("handler.wasm.signed").exists());
}

#[test]
fn verify_uses_the_configured_trust_list() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, _, key_id) = keygen(&dir.path().join("keys"), "ops");
    let file = module(dir.path());
    assert!(sign(&file, &secret, "enrich", "1", None).status.success());
    let signed = dir.path().join("handler.wasm.signed");
    let config = dir.path().join("outpost.toml");

    std::fs::write(&config, "[deploy]\ntrusted_keys = [\"keys/ops.pub\"]\n").unwrap();
    let check = outpost(&["config", "check", s(&config)]);
    assert!(check.status.success(), "{}", stderr(&check));
    let out = outpost(&["module", "verify", s(&signed), "--config", s(&config)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&key_id));

    std::fs::write(
        &config,
        "[deploy]\ntrusted_keys = [\"keys/ops.pub\"]\nmax_module_bytes = 1000\n",
    )
    .unwrap();
    let out = outpost(&["module", "verify", s(&signed), "--config", s(&config)]);
    assert_refused(&out, "the limit is 1000");

    std::fs::write(&config, "[deploy]\ntrusted_keys = [\"keys/gone.pub\"]\n").unwrap();
    for args in [
        vec!["config", "check", s(&config)],
        vec!["module", "verify", s(&signed), "--config", s(&config)],
    ] {
        let out = outpost(&args);
        assert_refused(&out, "deploy.trusted_keys[0]: cannot read");
        assert!(stderr(&out).contains("gone.pub"), "{}", stderr(&out));
    }
    std::fs::write(&config, "[deploy]\ntrusted_keys = [\"keys/ops.key\"]\n").unwrap();
    let out = outpost(&["config", "check", s(&config)]);
    assert_refused(&out, "deploy.trusted_keys[0]");
}
