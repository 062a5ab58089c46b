//! Password files in Mosquitto's format (`mosquitto_passwd`), read as they are, and the hashes
//! `outpost passwd` writes.
//!
//! A line is `USERNAME:HASH`. Two hashes are read, as Mosquitto 2.0 reads them:
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 with a 64-byte result (what
//!   `mosquitto_passwd` writes by default; Mosquitto 2.0 uses 101 iterations and a 12-byte
//!   salt, later versions 1,000 iterations and a 64-byte salt: both are read);
//! - `$6$SALT$HASH`: one SHA-512 of the password followed by the salt (`-H sha512`).
//!
//! Salt and hash are standard base64 with padding. Lines starting with `#`, empty lines and
//! lines without `:` are skipped; an entry whose hash cannot be read is skipped too and listed
//! in [`PasswordFile::skipped`] with its line number (Mosquitto logs and drops such entries;
//! it does not refuse to start). When a username appears twice, the first entry counts, as
//! in Mosquitto.
//!
//! Guarantees:
//! - [`PasswordFile::verify`] compares in constant time, and costs an unknown user as much as
//!   a known one (a stand-in hash is checked), so the answer's timing does not tell which
//!   usernames exist.
//! - [`hash_password`] writes `$7$` entries with a 12-byte salt, which Debian's Mosquitto 2.0
//!   reads too (it refuses other salt lengths), and [`HASH_ITERATIONS`] iterations.
//! - A password is bytes (MQTT's password field is binary); Mosquitto stops at a NUL byte, so a
//!   password containing one is the one case where the two may disagree.
//! - Nothing here panics on any file content.

use std::collections::HashMap;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngExt as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// PBKDF2 iterations of the hashes [`hash_password`] writes: what later Mosquitto versions
/// write (Debian's 2.0.11 writes 101). Every connection pays one check, so this is a trade
/// (`cargo bench --bench auth`, BENCHMARKS "Device logins and ACLs"): 10,000 iterations take
/// 5.8 ms per check on the benchmark machine's x86 core and several times that on a
/// Raspberry Pi, so a reconnect storm of 1,000 devices would queue for seconds to tens of
/// seconds; 1,000 take 0.58 ms. The iterations slow an attack on a stolen file; device
/// passwords should be long random strings, for which they hardly matter.
pub const HASH_ITERATIONS: u32 = 1_000;

/// Salt bytes of the hashes [`hash_password`] writes: Mosquitto 2.0 reads no other length.
const SALT_BYTES: usize = 12;

/// Bytes of a PBKDF2-SHA512 or SHA-512 hash.
const HASH_BYTES: usize = 64;

/// A password hash as read from a file.
#[derive(Clone, PartialEq, Eq)]
enum Hash {
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// `$6$`: SHA-512(password ‖ salt).
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the hash itself.
        match self {
            Hash::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2({iterations} iterations)"),
            Hash::Sha512 { .. } => f.write_str("Sha512"),
        }
    }
}

impl Hash {
    /// Reads `$7$…` or `$6$…`; the reason when it cannot.
    fn parse(text: &str) -> Result<Hash, String> {
        let fields: Vec<&str> = text.split('$').collect();
        match fields.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| format!("iterations {iterations:?} is not a positive number"))?;
                let salt = decode(salt, "salt")?;
                let hash = decode(hash, "hash")?;
                if !matches!(salt.len(), 12 | 64) {
                    return Err(format!(
                        "a salt of {} bytes (12 or 64 expected)",
                        salt.len()
                    ));
                }
                if hash.len() != HASH_BYTES {
                    return Err(format!("a hash of {} bytes (64 expected)", hash.len()));
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                })
            }
            ["", "6", salt, hash] => {
                let salt = decode(salt, "salt")?;
                let hash = decode(hash, "hash")?;
                if salt.is_empty() {
                    return Err("an empty salt".into());
                }
                if hash.len() != HASH_BYTES {
                    return Err(format!("a hash of {} bytes (64 expected)", hash.len()));
                }
                Ok(Hash::Sha512 { salt, hash })
            }
            _ => Err("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash".into()),
        }
    }

    /// Whether `password` is the one this hash was made from; constant time in the hash.
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => ring::pbkdf2::verify(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password,
                hash,
            )
            .is_ok(),
            Hash::Sha512 { salt, hash } => {
                let digest = Sha512::new()
                    .chain_update(password)
                    .chain_update(salt)
                    .finalize();
                bool::from(digest.as_slice().ct_eq(hash))
            }
        }
    }
}

fn decode(text: &str, what: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(text)
        .map_err(|e| format!("the {what} is not base64: {e}"))
}

/// An entry of a password file that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its line, counted from 1.
    pub line: usize,
    /// The username, when the line had one.
    pub username: String,
    /// Why it cannot be used.
    pub reason: String,
}

/// The usable entries of a password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    entries: HashMap<String, Hash>,
    skipped: Vec<Skipped>,
    /// Checked for unknown usernames, so that they cost what a known one costs.
    stand_in: Option<Hash>,
}

impl PasswordFile {
    /// Reads the text of a password file. Never fails: what cannot be used is skipped and
    /// listed in [`PasswordFile::skipped`].
    pub fn parse(text: &str) -> PasswordFile {
        let mut file = PasswordFile::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim_end_matches(['\r', ' ', '\t']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((username, hash)) = line.split_once(':') else {
                continue;
            };
            let (username, hash) = (username.trim(), hash.trim());
            match Hash::parse(hash) {
                Ok(hash) => {
                    // The costliest kind present, so that unknown users cost as much.
                    let costlier = matches!(
                        (&file.stand_in, &hash),
                        (None, _) | (Some(Hash::Sha512 { .. }), Hash::Pbkdf2 { .. })
                    );
                    if costlier {
                        file.stand_in = Some(hash.clone());
                    }
                    file.entries.entry(username.to_string()).or_insert(hash);
                }
                Err(reason) => file.skipped.push(Skipped {
                    line: index + 1,
                    username: username.to_string(),
                    reason,
                }),
            }
        }
        file
    }

    /// Whether `username` is in the file with a hash of `password`.
    pub fn verify(&self, username: &str, password: &[u8]) -> bool {
        match self.entries.get(username) {
            Some(hash) => hash.verify(password),
            None => {
                if let Some(stand_in) = &self.stand_in {
                    // Spend the same time; the answer is no whatever this says.
                    let _ = stand_in.verify(password);
                }
                false
            }
        }
    }

    /// How many usernames the file gives a usable hash.
    pub fn users(&self) -> usize {
        self.entries.len()
    }

    /// The entries that were skipped, in file order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

/// Why a password file cannot be changed as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    /// Mosquitto's format cannot hold this username.
    #[error("a username may not be empty or contain ':' or control characters")]
    BadUsername,
    /// An empty password would let anyone who knows the username in.
    #[error("the password is empty")]
    EmptyPassword,
}

/// A `$7$` (PBKDF2-SHA512) hash of `password` with a fresh random salt, as `mosquitto_passwd`
/// writes them, with [`HASH_ITERATIONS`] iterations.
pub fn hash_password(password: &[u8]) -> String {
    hash_with(
        password,
        HASH_ITERATIONS,
        &rand::rng().random::<[u8; SALT_BYTES]>(),
    )
}

fn hash_with(password: &[u8], iterations: u32, salt: &[u8]) -> String {
    let mut hash = [0u8; HASH_BYTES];
    let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        rounds,
        salt,
        password,
        &mut hash,
    );
    format!(
        "$7${rounds}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    )
}

/// What [`set_password`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The username was not in the file; a line was added at the end.
    Added,
    /// The username's line (its first) now has the new hash.
    Changed,
}

/// The text of a password file with `username`'s password set to `password` (a new `$7$`
/// hash). Every other line, comments and skipped entries included, stays as it was.
pub fn set_password(
    text: &str,
    username: &str,
    password: &[u8],
) -> Result<(String, Change), PasswordError> {
    if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
        return Err(PasswordError::BadUsername);
    }
    if password.is_empty() {
        return Err(PasswordError::EmptyPassword);
    }
    let entry = format!("{username}:{}", hash_password(password));
    let mut out = String::with_capacity(text.len() + entry.len() + 1);
    let mut change = Change::Added;
    for line in text.lines() {
        let is_entry = !line.starts_with('#')
            && line
                .split_once(':')
                .is_some_and(|(name, _)| name.trim() == username);
        if is_entry && change == Change::Added {
            out.push_str(&entry);
            change = Change::Changed;
        } else if !is_entry {
            out.push_str(line);
        } else {
            // A later line of the same user: Mosquitto ignores it; drop it so the file says
            // one thing.
            continue;
        }
        out.push('\n');
    }
    if change == Change::Added {
        out.push_str(&entry);
        out.push('\n');
    }
    Ok((out, change))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by Debian's `mosquitto_passwd` 2.0.11 (`-b`, default hash): alice / secret.
    const ALICE_7: &str = "alice:$7$101$i4YbWZPo8u/UDxyJ$+gPpS967SBobIKxj2e22pEL6pV3Qjw2j9z/+imWZwguAdJEDixszuFuxxsSEnIL2/ZVTgI9yWLNQna7DUh6jIQ==";
    /// Written by `mosquitto_passwd -H sha512` 2.0.11: alice / secret.
    const ALICE_6: &str = "alice:$6$AHWIVKfSjVPvPmyn$0EtqeSl7zBcswGd5E4IgJx/+I8v0DI+B1ziiSanBkQQd2/ZKnCKG3xgkBGkH6Ywe4BO+w2IOTrvpWf/e29hr7A==";

    #[test]
    fn mosquitto_passwd_hashes_are_read_as_they_are() {
        for line in [ALICE_7, ALICE_6] {
            let file = PasswordFile::parse(line);
            assert_eq!(file.users(), 1, "{line}");
            assert!(file.skipped().is_empty());
            assert!(file.verify("alice", b"secret"), "{line}");
            assert!(!file.verify("alice", b"Secret"), "{line}");
            assert!(!file.verify("alice", b""), "{line}");
            assert!(!file.verify("bob", b"secret"), "{line}");
        }
    }

    #[test]
    fn comments_blank_lines_and_lines_without_a_colon_are_skipped_silently() {
        let text = format!("# users\n\n   \nnot an entry\n{ALICE_7}\r\n");
        let file = PasswordFile::parse(&text);
        assert_eq!(file.users(), 1);
        assert!(file.skipped().is_empty());
        assert!(file.verify("alice", b"secret"));
    }

    #[test]
    fn unreadable_entries_are_listed_with_their_line_and_the_rest_work() {
        let short_salt = hash_with(b"x", 5, b"short");
        let text = [
            "bob:plaintext",
            "carol:$7$0$i4YbWZPo8u/UDxyJ$AAAA",
            "dave:$7$101$not base64!$AAAA",
            &format!("erin:{short_salt}"),
            "frank:$6$c2FsdA==$AAAA",
            "gina:",
            ALICE_7,
        ]
        .join("\n");
        let file = PasswordFile::parse(&text);
        assert_eq!(file.users(), 1);
        let skipped: Vec<(usize, &str)> = file
            .skipped()
            .iter()
            .map(|s| (s.line, s.username.as_str()))
            .collect();
        assert_eq!(
            skipped,
            vec![
                (1, "bob"),
                (2, "carol"),
                (3, "dave"),
                (4, "erin"),
                (5, "frank"),
                (6, "gina")
            ]
        );
        assert!(file.skipped()[3].reason.contains("salt of 5 bytes"));
        assert!(file.verify("alice", b"secret"));
        assert!(
            !file.verify("bob", b"plaintext"),
            "plain text is never a hash"
        );
    }

    #[test]
    fn the_first_entry_of_a_username_counts() {
        let second = set_password("", "alice", b"other").unwrap().0;
        let file = PasswordFile::parse(&format!("{ALICE_7}\n{second}"));
        assert!(file.verify("alice", b"secret"));
        assert!(!file.verify("alice", b"other"));
    }

    #[test]
    fn written_hashes_are_mosquitto_2_0s_shape() {
        let hash = hash_password(b"pw");
        let fields: Vec<&str> = hash.split('$').collect();
        assert_eq!(fields[1], "7");
        assert_eq!(fields[2], HASH_ITERATIONS.to_string());
        assert_eq!(STANDARD.decode(fields[3]).unwrap().len(), 12);
        assert_eq!(STANDARD.decode(fields[4]).unwrap().len(), 64);
        assert_ne!(hash, hash_password(b"pw"), "a fresh salt each time");
    }

    #[test]
    fn set_password_adds_changes_and_keeps_every_other_line() {
        let text = format!("# ops\n{ALICE_7}\nbob:garbage\n");
        let (added, change) = set_password(&text, "carol", b"c-pw").unwrap();
        assert_eq!(change, Change::Added);
        assert!(added.starts_with(&text), "{added}");
        let file = PasswordFile::parse(&added);
        assert!(file.verify("carol", b"c-pw") && file.verify("alice", b"secret"));

        let (changed, change) = set_password(&added, "alice", b"new").unwrap();
        assert_eq!(change, Change::Changed);
        let lines: Vec<&str> = changed.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "# ops");
        assert!(lines[1].starts_with("alice:$7$"), "in place: {changed}");
        assert_eq!(lines[2], "bob:garbage");
        let file = PasswordFile::parse(&changed);
        assert!(file.verify("alice", b"new") && !file.verify("alice", b"secret"));
        assert!(file.verify("carol", b"c-pw"));
    }

    #[test]
    fn set_password_refuses_what_the_format_cannot_hold() {
        for name in ["", "a:b", "a\nb", "tab\t"] {
            assert_eq!(
                set_password("", name, b"pw"),
                Err(PasswordError::BadUsername),
                "{name:?}"
            );
        }
        assert_eq!(
            set_password("", "alice", b""),
            Err(PasswordError::EmptyPassword)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// What `hash_with` writes verifies with that password only.
        #[test]
        fn written_hashes_verify(
            password in proptest::collection::vec(any::<u8>(), 1..40),
            other in proptest::collection::vec(any::<u8>(), 1..40),
            salt in proptest::collection::vec(any::<u8>(), 12..=12),
        ) {
            let line = format!("u:{}", hash_with(&password, 3, &salt));
            let file = PasswordFile::parse(&line);
            prop_assert!(file.verify("u", &password));
            prop_assert_eq!(file.verify("u", &other), other == password);
        }

        /// No text makes the reader panic, and every line it cannot use is accounted for.
        #[test]
        fn any_text_is_read_without_panicking(text in "[a-z:$#0-9A-Za-z+/=\\n ]{0,300}") {
            let file = PasswordFile::parse(&text);
            prop_assert!(file.users() + file.skipped().len() <= text.lines().count());
            let _ = file.verify("a", b"b");
        }
    }
}
