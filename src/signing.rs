//! Module signing: what exactly is signed, how keys are kept on disk, and the signed-module
//! envelope that deploys carry.
//!
//! Invariant 7 of ARCHITECTURE.md ("only signed code runs") rests on this module. A module is
//! identified by a [`Manifest`]: its name, its version, the SHA-256 of its bytes and the time it
//! was signed (which lets a gateway refuse a replayed older deploy: see [`Manifest::issued_ms`]).
//! An Ed25519 signature is made over [`Manifest::signed_bytes`], a canonical byte string with a
//! domain-separation prefix and length-prefixed fields, so a signature for one (name, version,
//! digest, time) can never be read as a signature for another, nor for anything that is not an
//! outpost module manifest.
//!
//! A [`SignedModule`] is the unit that is published for a deploy: a one-line JSON header (name,
//! version, digest, issue time, size, key id, signature) followed by the raw module bytes (see
//! [`SignedModule::to_bytes`] for the exact layout). [`SignedModule::from_bytes`] never panics,
//! whatever it is given, and [`SignedModule::verify_against`] accepts a module only if its bytes
//! hash to the signed digest and the signature verifies (strictly) under a trusted key.
//!
//! A [`SignedCommand`] is the signed form of the control commands that change what a gateway runs
//! without carrying a module: `remove` and `rollback`. Its signature covers the operation, the
//! module name and the time it was issued ([`SignedCommand::signed_bytes`], under its own
//! domain prefix [`COMMAND_DOMAIN`], so a module signature never verifies as a command and a
//! command signature never verifies as a module). It travels as a small JSON object
//! ([`SignedCommand::to_json`]); [`SignedCommand::from_json`] never panics and
//! [`SignedCommand::accept`] applies every check a gateway makes (signature, topic, replay,
//! clock).
//!
//! Key files are one line of text: `outpost-ed25519-public <64 hex digits>` for a public key,
//! `outpost-ed25519-secret <64 hex digits>` (the 32-byte seed) for a secret key, which is
//! written with mode 0600 and refused when other users can read it.
//!
//! This module does no networking and touches no files other than the key files it is asked to
//! read or write.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::Signer;
pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Domain-separation prefix of every signed manifest: a signature made for anything else (a
/// different protocol, a different version of this format) never verifies as a module manifest.
pub const DOMAIN: &[u8] = b"outpost-module-v2\0";

/// Longest module name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest module version, in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// First word of a public key file.
pub const PUBLIC_KEY_TAG: &str = "outpost-ed25519-public";

/// First word of a secret key file.
pub const SECRET_KEY_TAG: &str = "outpost-ed25519-secret";

/// First bytes of every signed-module envelope (the first line of the file).
pub const ENVELOPE_MAGIC: &[u8] = b"outpost-signed-module-v2\n";

/// First bytes of the envelope of earlier versions, which carried no issue time: recognised
/// only to say that such a module must be signed again ([`EnvelopeError::OldFormat`]).
pub const OLD_ENVELOPE_MAGIC: &[u8] = b"outpost-signed-module-v1\n";

/// Longest envelope header (the JSON line after the magic, without its newline), in bytes.
pub const MAX_HEADER_BYTES: usize = 4096;

/// The default cap on a module's size (16 MiB), as used by `[deploy] max_module_bytes`.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 16 * 1024 * 1024;

/// Domain-separation prefix of every signed control command (see
/// [`SignedCommand::signed_bytes`]). It differs from [`DOMAIN`], so a module manifest's signature
/// never verifies as a command and a command's never verifies as a module manifest.
pub const COMMAND_DOMAIN: &[u8] = b"outpost-command-v1\0";

/// Longest signed command accepted by [`SignedCommand::from_json`], in bytes (a valid one is
/// under 400).
pub const MAX_COMMAND_BYTES: usize = 4096;

/// How far ahead of the gateway's clock a deploy's or command's `issued_ms` may be (10
/// minutes); see [`check_issued`].
pub const MAX_COMMAND_FUTURE_MS: u64 = 10 * 60 * 1000;

/// A module name, version or key name that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The value is empty.
    #[error("{what} is empty")]
    Empty {
        /// What was being checked: `module name`, `module version` or `key name`.
        what: &'static str,
    },
    /// The value is longer than allowed.
    #[error("{what} {value:?} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// What was being checked.
        what: &'static str,
        /// The value (its first characters only, when long).
        value: String,
        /// Its length in bytes.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The value uses a character outside `[A-Za-z0-9._-]` or does not start with a letter or
    /// digit.
    #[error(
        "{what} {value:?} must start with a letter or digit and use only letters, digits, '.', '_' and '-'"
    )]
    Charset {
        /// What was being checked.
        what: &'static str,
        /// The value (its first characters only, when long).
        value: String,
    },
}

/// Text that is not a valid encoding of a key, digest, key id or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// A hex value has the wrong number of digits.
    #[error("{what} must be {expected} hex digits, found {found} characters")]
    HexLength {
        /// What was being decoded, e.g. `signature`.
        what: &'static str,
        /// Hex digits expected.
        expected: usize,
        /// Characters found.
        found: usize,
    },
    /// A hex value has a character that is not a hex digit.
    #[error("{what} is not hexadecimal: character {position} is {found:?}")]
    NotHex {
        /// What was being decoded.
        what: &'static str,
        /// 0-based position of the first bad character.
        position: usize,
        /// The bad character.
        found: char,
    },
    /// A key file is not one line `<tag> <hex>`.
    #[error("expected one line \"{expected_tag} <64 hex digits>\", {found}")]
    KeyLayout {
        /// The tag that was expected.
        expected_tag: &'static str,
        /// What was found instead, in words.
        found: String,
    },
    /// The 32 bytes are not a point on the curve.
    #[error("not a valid Ed25519 public key (the bytes are not a curve point)")]
    InvalidPublicKey,
    /// The key is of small order: signatures under it prove nothing.
    #[error("a weak (small-order) Ed25519 public key, which is refused")]
    WeakPublicKey,
}

/// A key file could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// Key generation never overwrites a file.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The file's content is not a key of the expected kind.
    #[error("{}: {problem}", path.display())]
    Encoding {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        problem: EncodingError,
    },
    /// A secret key file that other users may read or write is refused.
    #[error(
        "{} is accessible by other users (mode {mode:03o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key name is not acceptable.
    #[error(transparent)]
    Name(#[from] ManifestError),
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

/// Bytes that are not a well-formed signed-module envelope. Says what is wrong; never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Nothing at all.
    #[error("empty input: not a signed outpost module")]
    Empty,
    /// The input does not start with [`ENVELOPE_MAGIC`].
    #[error("not a signed outpost module (it does not start with \"outpost-signed-module-v2\"); sign it with `outpost module sign`")]
    BadMagic,
    /// The input is an envelope of the earlier format (`outpost-signed-module-v1`), whose
    /// signature has no issue time and so could be replayed to go back to an old version.
    #[error("signed with the earlier format outpost-signed-module-v1, which carries no issue time and is no longer accepted; sign the module again with `outpost module sign` or `outpost module push --key`")]
    OldFormat,
    /// No newline ends the header within [`MAX_HEADER_BYTES`] (or before the input ends).
    #[error("signed module header is truncated or longer than {max} bytes")]
    HeaderUnterminated {
        /// [`MAX_HEADER_BYTES`].
        max: usize,
    },
    /// The header is not JSON of the expected shape (a missing, extra or mistyped field).
    #[error("signed module header is not valid: {0}")]
    Header(String),
    /// A hex field of the header is malformed.
    #[error("signed module header: {0}")]
    Encoding(EncodingError),
    /// The header's name or version is not acceptable.
    #[error("signed module header: {0}")]
    Manifest(ManifestError),
    /// Fewer module bytes follow the header than it announces.
    #[error("module is truncated: the header announces {expected} bytes, {found} are present")]
    Truncated {
        /// Bytes announced by the header.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// More bytes follow the header than it announces.
    #[error("{found} bytes follow the header, which announces {expected}: trailing data")]
    TrailingBytes {
        /// Bytes announced by the header.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The module is larger than allowed.
    #[error("module is {size} bytes; the limit is {max} (deploy.max_module_bytes)")]
    TooLarge {
        /// Bytes announced by the header.
        size: u64,
        /// The limit.
        max: u64,
    },
}

impl From<EncodingError> for EnvelopeError {
    fn from(e: EncodingError) -> Self {
        EnvelopeError::Encoding(e)
    }
}

impl From<ManifestError> for EnvelopeError {
    fn from(e: ManifestError) -> Self {
        EnvelopeError::Manifest(e)
    }
}

/// Bytes that are not a well-formed signed command. Says what is wrong; never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Longer than [`MAX_COMMAND_BYTES`].
    #[error("signed command is {size} bytes; at most {max} are allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// [`MAX_COMMAND_BYTES`].
        max: usize,
    },
    /// Not JSON of the expected shape (a missing, extra, repeated or mistyped field).
    #[error("signed command is not valid: {0}")]
    Json(String),
    /// The operation is not one of [`CommandOp::ALL`].
    #[error("unknown command operation {0:?}; expected \"remove\" or \"rollback\"")]
    UnknownOp(String),
    /// A hex field (key id, signature) is malformed.
    #[error("signed command: {0}")]
    Encoding(EncodingError),
    /// The module name is not acceptable.
    #[error("signed command: {0}")]
    Manifest(ManifestError),
}

impl From<EncodingError> for CommandError {
    fn from(e: EncodingError) -> Self {
        CommandError::Encoding(e)
    }
}

impl From<ManifestError> for CommandError {
    fn from(e: ManifestError) -> Self {
        CommandError::Manifest(e)
    }
}

/// Why a signed module was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signing key is not in the trust list.
    #[error("signed by key {key_id}, which is not trusted ({})", describe_trusted(.trusted))]
    UnknownKey {
        /// The key id the signature claims.
        key_id: KeyId,
        /// The ids of the trusted keys.
        trusted: Vec<KeyId>,
    },
    /// The signature does not verify under the trusted key it names: it was made for another
    /// name, version or content, or it was corrupted or swapped.
    #[error(
        "signature by key {key_id} is not valid for module {name:?} version {version:?} sha256 {sha256} issued_ms {issued_ms}: it was made for another name, version, content or time, or was altered"
    )]
    BadSignature {
        /// The trusted key the signature was checked against.
        key_id: KeyId,
        /// The name in the manifest.
        name: String,
        /// The version in the manifest.
        version: String,
        /// The digest in the manifest, hex.
        sha256: String,
        /// The issue time in the manifest.
        issued_ms: u64,
    },
    /// The module bytes do not hash to the signed digest.
    #[error(
        "module bytes were modified: their sha256 is {actual}, the signed header says {expected}"
    )]
    DigestMismatch {
        /// The digest in the header, hex.
        expected: String,
        /// The digest of the bytes, hex.
        actual: String,
    },
    /// The module is signed under another name than the one it is deployed as.
    #[error("module is signed as {signed:?}, not {expected:?}")]
    NameMismatch {
        /// The name expected by the caller (e.g. the deploy topic).
        expected: String,
        /// The signed name.
        signed: String,
    },
    /// The module is signed with another version than the one expected.
    #[error("module is signed as version {signed:?}, not {expected:?}")]
    VersionMismatch {
        /// The version expected by the caller.
        expected: String,
        /// The signed version.
        signed: String,
    },
    /// A command's signature does not verify under the trusted key it names: it was made for
    /// another operation, module or time, or it was corrupted or swapped.
    #[error(
        "signature by key {key_id} is not valid for command {op} of module {name:?} issued_ms {issued_ms}: it was made for another command, or was altered"
    )]
    BadCommandSignature {
        /// The trusted key the signature was checked against.
        key_id: KeyId,
        /// The operation in the command.
        op: CommandOp,
        /// The module name in the command.
        name: String,
        /// The time in the command.
        issued_ms: u64,
    },
    /// A command is signed for another operation or module than the topic it arrived on.
    #[error("command is signed as {signed_op} of {signed_name:?}, not {expected_op} of {expected_name:?}")]
    CommandMismatch {
        /// The operation expected by the caller (the topic's verb).
        expected_op: CommandOp,
        /// The module expected by the caller (the topic's name).
        expected_name: String,
        /// The signed operation.
        signed_op: CommandOp,
        /// The signed module name.
        signed_name: String,
    },
    /// A deploy or command is not newer than the last one accepted for its module: a replay,
    /// or requests that arrived out of order.
    #[error(
        "replayed or stale: issued at {issued_ms} ms, not after the last deploy or command accepted for module {name:?} ({last_ms} ms); sign it again"
    )]
    Replayed {
        /// The module name.
        name: String,
        /// The command's time.
        issued_ms: u64,
        /// The time of the last accepted command for that module.
        last_ms: u64,
    },
    /// A deploy or command is issued too far in the future (a wrong clock, or one made to be
    /// replayed later).
    #[error(
        "issued at {issued_ms} ms, {ahead_ms} ms ahead of this gateway's clock; at most {max_ms} ms is allowed (check the clocks)"
    )]
    FromTheFuture {
        /// The command's time.
        issued_ms: u64,
        /// How far it is ahead of the gateway's clock.
        ahead_ms: u64,
        /// [`MAX_COMMAND_FUTURE_MS`].
        max_ms: u64,
    },
}

fn describe_trusted(trusted: &[KeyId]) -> String {
    if trusted.is_empty() {
        "the trust list is empty".to_string()
    } else {
        let ids: Vec<String> = trusted.iter().map(KeyId::to_string).collect();
        format!("trusted: {}", ids.join(", "))
    }
}

/// A short, stable name for a public key, for logs and headers: the first 8 bytes (16 hex
/// digits) of the SHA-256 of its 32 bytes. It identifies; it does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl FromStr for KeyId {
    type Err = EncodingError;

    /// Parses 16 hex digits (either case).
    fn from_str(s: &str) -> Result<KeyId, EncodingError> {
        decode_hex::<8>("key_id", s).map(KeyId)
    }
}

/// What a signature covers: a valid module name and version, the SHA-256 of the module's
/// bytes, and when it was signed. A `Manifest` always holds a valid name and version (see
/// [`validate_name`] and [`validate_version`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    name: String,
    version: String,
    sha256: [u8; 32],
    issued_ms: u64,
}

impl Manifest {
    /// A manifest for `name` and `version` with the given digest, signed at `issued_ms`
    /// (milliseconds since the Unix epoch), or why the name or version is not acceptable.
    pub fn new(
        name: &str,
        version: &str,
        sha256: [u8; 32],
        issued_ms: u64,
    ) -> Result<Manifest, ManifestError> {
        validate_name(name)?;
        validate_version(version)?;
        Ok(Manifest {
            name: name.to_string(),
            version: version.to_string(),
            sha256,
            issued_ms,
        })
    }

    /// A manifest for `module`'s bytes (their SHA-256 is computed here), signed at
    /// `issued_ms`.
    pub fn for_module(
        name: &str,
        version: &str,
        module: &[u8],
        issued_ms: u64,
    ) -> Result<Manifest, ManifestError> {
        Manifest::new(name, version, sha256(module), issued_ms)
    }

    /// When the module was signed, in milliseconds since the Unix epoch. A gateway accepts a
    /// deploy of a new version only if it was issued after every deploy and command it has
    /// accepted for the same name, so a captured deploy of an older version cannot be replayed
    /// to go back to it.
    pub fn issued_ms(&self) -> u64 {
        self.issued_ms
    }

    /// The module name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The SHA-256 of the module's bytes.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// The SHA-256 of the module's bytes, 64 lower-case hex digits.
    pub fn sha256_hex(&self) -> String {
        to_hex(&self.sha256)
    }

    /// The exact bytes that are signed:
    ///
    /// ```text
    /// "outpost-module-v2\0" || u32-be(len name) || name || u32-be(len version) || version || sha256 (32 bytes) || u64-be(issued_ms)
    /// ```
    ///
    /// Distinct manifests always give distinct byte strings (every variable-length field is
    /// length-prefixed), and none of them is a valid message of another protocol that uses a
    /// different prefix.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(DOMAIN.len() + 8 + self.name.len() + self.version.len() + 40);
        out.extend_from_slice(DOMAIN);
        for field in [&self.name, &self.version] {
            // Bounded by MAX_NAME_LEN / MAX_VERSION_LEN, so the length fits in a u32.
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out
    }
}

/// Checks a module name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, starting with a
/// letter or digit (so a name is safe in MQTT topics, file names and command lines).
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    validate_identifier("module name", name, MAX_NAME_LEN)
}

/// Checks a module version: 1 to [`MAX_VERSION_LEN`] bytes of `[A-Za-z0-9._-]`, starting with a
/// letter or digit.
pub fn validate_version(version: &str) -> Result<(), ManifestError> {
    validate_identifier("module version", version, MAX_VERSION_LEN)
}

fn validate_identifier(what: &'static str, value: &str, max: usize) -> Result<(), ManifestError> {
    let shown = || {
        let mut s: String = value.chars().take(40).collect();
        if s.len() < value.len() {
            s.push_str("...");
        }
        s
    };
    if value.is_empty() {
        return Err(ManifestError::Empty { what });
    }
    if value.len() > max {
        return Err(ManifestError::TooLong {
            what,
            value: shown(),
            len: value.len(),
            max,
        });
    }
    let first_ok = value.starts_with(|c: char| c.is_ascii_alphanumeric());
    let all_ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !all_ok {
        return Err(ManifestError::Charset {
            what,
            value: shown(),
        });
    }
    Ok(())
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Signs `manifest` (its [`Manifest::signed_bytes`]) with `key`.
pub fn sign(key: &SigningKey, manifest: &Manifest) -> Signature {
    key.sign(&manifest.signed_bytes())
}

/// Accepts `signature` over `manifest` only if `key_id` names one of the `trusted` keys and the
/// signature verifies under that key with Ed25519's strict rules (no malleable signatures, no
/// weak keys). Returns the id of the key that signed.
pub fn verify(
    trusted: &[VerifyingKey],
    manifest: &Manifest,
    key_id: KeyId,
    signature: &Signature,
) -> Result<KeyId, VerifyError> {
    let key = trusted
        .iter()
        .find(|k| KeyId::of(k) == key_id)
        .ok_or_else(|| VerifyError::UnknownKey {
            key_id,
            trusted: trusted.iter().map(KeyId::of).collect(),
        })?;
    key.verify_strict(&manifest.signed_bytes(), signature)
        .map_err(|_| VerifyError::BadSignature {
            key_id,
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256_hex(),
            issued_ms: manifest.issued_ms,
        })?;
    Ok(key_id)
}

/// A new signing key from the operating system's random number generator.
pub fn generate_key() -> Result<SigningKey, KeyFileError> {
    use rand::TryRng;
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rngs::SysRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|e| KeyFileError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key file's content: `outpost-ed25519-public <64 hex digits>` and a newline.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC_KEY_TAG} {}\n", to_hex(key.as_bytes()))
}

/// The secret key file's content: `outpost-ed25519-secret <64 hex digits of the seed>` and a
/// newline; wiped from memory when dropped.
pub fn secret_key_text(key: &SigningKey) -> Zeroizing<String> {
    let mut hex = Zeroizing::new(to_hex(key.as_bytes()));
    let text = Zeroizing::new(format!("{SECRET_KEY_TAG} {}\n", hex.as_str()));
    hex.zeroize();
    text
}

/// Parses a public key file's content (surrounding whitespace is ignored). Refuses secret keys,
/// invalid curve points and weak keys, each with its own error.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, EncodingError> {
    let hex = key_line(text, PUBLIC_KEY_TAG, SECRET_KEY_TAG, "public key")?;
    let bytes = decode_hex::<32>("public key", hex)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| EncodingError::InvalidPublicKey)?;
    if key.is_weak() {
        return Err(EncodingError::WeakPublicKey);
    }
    Ok(key)
}

/// Parses a secret key file's content (surrounding whitespace is ignored). Refuses public keys
/// with their own error.
pub fn parse_secret_key(text: &str) -> Result<SigningKey, EncodingError> {
    let hex = key_line(text, SECRET_KEY_TAG, PUBLIC_KEY_TAG, "secret key")?;
    let seed = Zeroizing::new(decode_hex::<32>("secret key", hex)?);
    Ok(SigningKey::from_bytes(&seed))
}

fn key_line<'a>(
    text: &'a str,
    tag: &'static str,
    other_tag: &'static str,
    what: &str,
) -> Result<&'a str, EncodingError> {
    let layout = |found: String| EncodingError::KeyLayout {
        expected_tag: tag,
        found,
    };
    let line = text.trim();
    if line.is_empty() {
        return Err(layout("found an empty file".into()));
    }
    if line.contains('\n') {
        return Err(layout("found more than one line".into()));
    }
    let (found_tag, value) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    if found_tag == other_tag {
        let other = if what == "public key" {
            "a secret key (give the .pub file)"
        } else {
            "a public key (give the .key file)"
        };
        return Err(layout(format!("found {other}")));
    }
    if found_tag != tag {
        let shown: String = found_tag.chars().take(40).collect();
        return Err(layout(format!("found {shown:?} where the tag should be")));
    }
    Ok(value.trim())
}

/// Reads and parses a public key file; errors name the file.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
    let text = read_small(path, PUBLIC_KEY_TAG)?;
    parse_public_key(&text).map_err(|source| KeyFileError::Encoding {
        path: path.to_path_buf(),
        problem: source,
    })
}

/// Reads and parses a secret key file; refuses one that users other than its owner may access
/// (like ssh does). Errors name the file.
pub fn read_secret_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    let text = Zeroizing::new(read_small(path, SECRET_KEY_TAG)?);
    let key = parse_secret_key(&text).map_err(|source| KeyFileError::Encoding {
        path: path.to_path_buf(),
        problem: source,
    })?;
    let mode = std::fs::metadata(path)
        .map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            error: source,
        })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(key)
}

/// Reads a key file (expected to start with `tag`) of at most 4 KiB as UTF-8 text.
///
/// Opening never waits: a FIFO that nobody writes to (a configuration naming one as a trusted
/// key) is read as empty instead of hanging `config check` and the start-up forever. The file
/// is opened non-blocking, then read blocking, so a pipe with a writer (`--key <(...)`) still
/// gives what its writer writes.
fn read_small(path: &Path, tag: &'static str) -> Result<String, KeyFileError> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let read_err = |source| KeyFileError::Read {
        path: path.to_path_buf(),
        error: source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory is involved.
    let cleared = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) >= 0
    };
    if !cleared {
        return Err(read_err(std::io::Error::last_os_error()));
    }
    let mut bytes = Vec::new();
    file.take(4097).read_to_end(&mut bytes).map_err(read_err)?;
    let too_long = bytes.len() > 4096;
    let text = String::from_utf8(bytes).map_err(|e| {
        let mut bytes = e.into_bytes();
        bytes.zeroize();
        KeyFileError::Encoding {
            path: path.to_path_buf(),
            problem: EncodingError::KeyLayout {
                expected_tag: tag,
                found: "found binary data, not text".into(),
            },
        }
    })?;
    if too_long {
        let mut text = text;
        text.zeroize();
        return Err(KeyFileError::Encoding {
            path: path.to_path_buf(),
            problem: EncodingError::KeyLayout {
                expected_tag: tag,
                found: "found a file larger than 4 KiB".into(),
            },
        });
    }
    Ok(text)
}

/// The files written by [`write_key_pair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairFiles {
    /// `DIR/NAME.key`, the secret key (mode 0600).
    pub secret: PathBuf,
    /// `DIR/NAME.pub`, the public key (mode 0644).
    pub public: PathBuf,
    /// The key's id.
    pub key_id: KeyId,
}

/// Writes `key` as `DIR/NAME.key` (secret, mode 0600) and `DIR/NAME.pub` (public), creating
/// `dir` if needed. Never overwrites: if either file exists nothing is written. `name` must be a
/// valid identifier (see [`validate_name`]). Both files are synced to disk before returning.
pub fn write_key_pair(
    dir: &Path,
    name: &str,
    key: &SigningKey,
) -> Result<KeyPairFiles, KeyFileError> {
    validate_identifier("key name", name, MAX_NAME_LEN)?;
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for path in [&secret, &public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyFileError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| KeyFileError::Write {
        path: dir.to_path_buf(),
        error: source,
    })?;
    write_new(&secret, secret_key_text(key).as_bytes(), 0o600)?;
    let verifying = key.verifying_key();
    if let Err(e) = write_new(&public, public_key_text(&verifying).as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&secret);
        return Err(e);
    }
    Ok(KeyPairFiles {
        secret,
        public,
        key_id: KeyId::of(&verifying),
    })
}

/// Creates `path` (failing if it exists) with `mode`, writes `content` and syncs it.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), KeyFileError> {
    let write_err = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            KeyFileError::Write {
                path: path.to_path_buf(),
                error: source,
            }
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    let written = file.write_all(content).and_then(|()| file.sync_all());
    if let Err(source) = written {
        let _ = std::fs::remove_file(path);
        return Err(write_err(source));
    }
    Ok(())
}

/// The order rule shared by deploys and commands of module `name`: `issued_ms` must be strictly
/// greater than `last_accepted_ms` (the issue time of the last deploy or command accepted for
/// the module, if any), and at most [`MAX_COMMAND_FUTURE_MS`] ahead of `now_ms` (accepted, a
/// request from the future would make every later one look stale until then).
pub fn check_issued(
    name: &str,
    issued_ms: u64,
    last_accepted_ms: Option<u64>,
    now_ms: u64,
) -> Result<(), VerifyError> {
    if let Some(last_ms) = last_accepted_ms {
        if issued_ms <= last_ms {
            return Err(VerifyError::Replayed {
                name: name.to_string(),
                issued_ms,
                last_ms,
            });
        }
    }
    let ahead_ms = issued_ms.saturating_sub(now_ms);
    if ahead_ms > MAX_COMMAND_FUTURE_MS {
        return Err(VerifyError::FromTheFuture {
            issued_ms,
            ahead_ms,
            max_ms: MAX_COMMAND_FUTURE_MS,
        });
    }
    Ok(())
}

/// A module with its manifest and signature: what a deploy carries.
///
/// Constructed by [`SignedModule::sign`] or parsed by [`SignedModule::from_bytes`]; parsing
/// checks the structure only. Nothing about a parsed module is trustworthy until
/// [`SignedModule::verify_against`] returned `Ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedModule {
    manifest: Manifest,
    key_id: KeyId,
    signature: Signature,
    wasm: Vec<u8>,
}

/// The envelope's JSON header line.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: String,
    version: String,
    sha256: String,
    issued_ms: u64,
    size: u64,
    key_id: String,
    signature: String,
}

impl SignedModule {
    /// Signs `wasm` as module `name` version `version`, issued at `issued_ms` (milliseconds
    /// since the Unix epoch; normally now), with `key`.
    pub fn sign(
        key: &SigningKey,
        name: &str,
        version: &str,
        issued_ms: u64,
        wasm: Vec<u8>,
    ) -> Result<SignedModule, ManifestError> {
        let manifest = Manifest::for_module(name, version, &wasm, issued_ms)?;
        let signature = sign(key, &manifest);
        Ok(SignedModule {
            manifest,
            key_id: KeyId::of(&key.verifying_key()),
            signature,
            wasm,
        })
    }

    /// The manifest the header claims (verified only by [`SignedModule::verify_against`]).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The id of the key the header says signed it.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The module bytes.
    pub fn wasm(&self) -> &[u8] {
        &self.wasm
    }

    /// The module bytes, taken out.
    pub fn into_wasm(self) -> Vec<u8> {
        self.wasm
    }

    /// The envelope:
    ///
    /// ```text
    /// outpost-signed-module-v2\n
    /// {"name":"enrich","version":"1.0.0","sha256":"<64 hex>","issued_ms":<ms>,"size":<bytes>,"key_id":"<16 hex>","signature":"<128 hex>"}\n
    /// <exactly `size` raw module bytes>
    /// ```
    ///
    /// The header is compact JSON on one line (JSON strings escape newlines, so the first
    /// newline after the magic ends it) of at most [`MAX_HEADER_BYTES`] bytes. Hex is lower
    /// case. `head -n 2 FILE` shows the header.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = Header {
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            sha256: self.manifest.sha256_hex(),
            issued_ms: self.manifest.issued_ms,
            size: self.wasm.len() as u64,
            key_id: self.key_id.to_string(),
            signature: to_hex(&self.signature.to_bytes()),
        };
        let json =
            serde_json::to_vec(&header).expect("a struct of strings and a number serializes");
        let mut out = Vec::with_capacity(ENVELOPE_MAGIC.len() + json.len() + 1 + self.wasm.len());
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.extend_from_slice(&json);
        out.push(b'\n');
        out.extend_from_slice(&self.wasm);
        out
    }

    /// Parses an envelope (see [`SignedModule::to_bytes`]) without a size limit. Checks its
    /// structure only: magic, header (shape, hex fields, name and version), and that exactly
    /// `size` module bytes follow. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedModule, EnvelopeError> {
        SignedModule::from_bytes_limited(bytes, u64::MAX)
    }

    /// As [`SignedModule::from_bytes`], and refuses a module larger than `max_module_bytes`
    /// before copying it.
    pub fn from_bytes_limited(
        bytes: &[u8],
        max_module_bytes: u64,
    ) -> Result<SignedModule, EnvelopeError> {
        if bytes.is_empty() {
            return Err(EnvelopeError::Empty);
        }
        if bytes.starts_with(OLD_ENVELOPE_MAGIC) {
            return Err(EnvelopeError::OldFormat);
        }
        let rest = bytes
            .strip_prefix(ENVELOPE_MAGIC)
            .ok_or(EnvelopeError::BadMagic)?;
        let window = &rest[..rest.len().min(MAX_HEADER_BYTES + 1)];
        let end =
            window
                .iter()
                .position(|&b| b == b'\n')
                .ok_or(EnvelopeError::HeaderUnterminated {
                    max: MAX_HEADER_BYTES,
                })?;
        let header: Header = serde_json::from_slice(&rest[..end])
            .map_err(|e| EnvelopeError::Header(e.to_string()))?;
        let module = &rest[end + 1..];
        let manifest = Manifest::new(
            &header.name,
            &header.version,
            decode_hex::<32>("sha256", &header.sha256)?,
            header.issued_ms,
        )?;
        let key_id: KeyId = header.key_id.parse()?;
        let signature = Signature::from_bytes(&decode_hex::<64>("signature", &header.signature)?);
        if header.size > max_module_bytes {
            return Err(EnvelopeError::TooLarge {
                size: header.size,
                max: max_module_bytes,
            });
        }
        let found = module.len() as u64;
        if found < header.size {
            return Err(EnvelopeError::Truncated {
                expected: header.size,
                found,
            });
        }
        if found > header.size {
            return Err(EnvelopeError::TrailingBytes {
                expected: header.size,
                found,
            });
        }
        Ok(SignedModule {
            manifest,
            key_id,
            signature,
            wasm: module.to_vec(),
        })
    }

    /// Accepts the module only if its bytes hash to the signed digest and the signature
    /// verifies under the trusted key its header names (see [`verify`]). Returns that key's id.
    pub fn verify_against(&self, trusted: &[VerifyingKey]) -> Result<KeyId, VerifyError> {
        let actual = sha256(&self.wasm);
        if actual != self.manifest.sha256 {
            return Err(VerifyError::DigestMismatch {
                expected: self.manifest.sha256_hex(),
                actual: to_hex(&actual),
            });
        }
        verify(trusted, &self.manifest, self.key_id, &self.signature)
    }

    /// Checks that the module is signed under `name` and, when given, as `version` (a deploy
    /// on `modules/<name>/deploy` must carry a module signed for `<name>`). Only meaningful
    /// together with [`SignedModule::verify_against`].
    pub fn expect_identity(&self, name: &str, version: Option<&str>) -> Result<(), VerifyError> {
        if self.manifest.name != name {
            return Err(VerifyError::NameMismatch {
                expected: name.to_string(),
                signed: self.manifest.name.clone(),
            });
        }
        if let Some(version) = version {
            if self.manifest.version != version {
                return Err(VerifyError::VersionMismatch {
                    expected: version.to_string(),
                    signed: self.manifest.version.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A signed control command's operation: the last level of its topic
/// (`outpost/<gateway>/modules/<name>/<op>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandOp {
    /// Stop running the deployed module and forget it.
    Remove,
    /// Go back to the module's previous version.
    Rollback,
}

impl CommandOp {
    /// Every operation.
    pub const ALL: [CommandOp; 2] = [CommandOp::Remove, CommandOp::Rollback];

    /// Its name, as in topics and in the command's JSON: `remove` or `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandOp::Remove => "remove",
            CommandOp::Rollback => "rollback",
        }
    }
}

impl fmt::Display for CommandOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandOp {
    type Err = CommandError;

    /// Parses `remove` or `rollback` (exactly; no other spelling).
    fn from_str(s: &str) -> Result<CommandOp, CommandError> {
        CommandOp::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| CommandError::UnknownOp(s.chars().take(40).collect()))
    }
}

/// A signed `remove` or `rollback` of one module, as published on
/// `outpost/<gateway>/modules/<name>/<op>`.
///
/// Constructed by [`SignedCommand::sign`] or parsed by [`SignedCommand::from_json`]; parsing
/// checks the structure only (shape, operation, name, hex). Nothing about a parsed command is
/// trustworthy until [`SignedCommand::verify_against`] (or [`SignedCommand::accept`]) returned
/// `Ok`. `name` is always a valid module name when it comes from `sign` or `from_json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommand {
    /// What to do.
    pub op: CommandOp,
    /// The module it applies to.
    pub name: String,
    /// When it was issued, in milliseconds since the Unix epoch (the replay protection: a
    /// gateway accepts only commands newer than the last it accepted for the module).
    pub issued_ms: u64,
    key_id: KeyId,
    signature: Signature,
}

/// A signed command's JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandJson {
    op: String,
    name: String,
    issued_ms: u64,
    key: String,
    signature: String,
}

impl SignedCommand {
    /// Signs `op` of module `name` issued at `issued_ms` with `key`; fails only when `name` is
    /// not a valid module name.
    pub fn sign(
        key: &SigningKey,
        op: CommandOp,
        name: &str,
        issued_ms: u64,
    ) -> Result<SignedCommand, ManifestError> {
        validate_name(name)?;
        let bytes = command_signed_bytes(op, name, issued_ms);
        Ok(SignedCommand {
            op,
            name: name.to_string(),
            issued_ms,
            key_id: KeyId::of(&key.verifying_key()),
            signature: key.sign(&bytes),
        })
    }

    /// The id of the key the command says signed it.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The exact bytes that are signed:
    ///
    /// ```text
    /// "outpost-command-v1\0" || u32-be(len op) || op || u32-be(len name) || name || u64-be(issued_ms)
    /// ```
    ///
    /// Distinct commands always give distinct byte strings, and none of them is a module
    /// manifest's (whose prefix is [`DOMAIN`]).
    pub fn signed_bytes(&self) -> Vec<u8> {
        command_signed_bytes(self.op, &self.name, self.issued_ms)
    }

    /// The command as published: compact JSON, one object with exactly the fields
    /// `{"op":"remove","name":"celsius","issued_ms":1700000000000,"key":"<16 hex>","signature":"<128 hex>"}`
    /// (hex in lower case), at most a few hundred bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let json = CommandJson {
            op: self.op.as_str().to_string(),
            name: self.name.clone(),
            issued_ms: self.issued_ms,
            key: self.key_id.to_string(),
            signature: to_hex(&self.signature.to_bytes()),
        };
        serde_json::to_vec(&json).expect("a struct of strings and a number serializes")
    }

    /// Parses a command (see [`SignedCommand::to_json`]). Refuses input over
    /// [`MAX_COMMAND_BYTES`] before parsing, anything that is not exactly that object (missing,
    /// unknown, repeated or mistyped fields), an unknown operation, an invalid module name and
    /// malformed hex. Checks the structure only. Never panics.
    pub fn from_json(bytes: &[u8]) -> Result<SignedCommand, CommandError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::TooLarge {
                size: bytes.len(),
                max: MAX_COMMAND_BYTES,
            });
        }
        let json: CommandJson =
            serde_json::from_slice(bytes).map_err(|e| CommandError::Json(e.to_string()))?;
        let op: CommandOp = json.op.parse()?;
        validate_name(&json.name)?;
        let key_id: KeyId = json.key.parse()?;
        let signature = Signature::from_bytes(&decode_hex::<64>("signature", &json.signature)?);
        Ok(SignedCommand {
            op,
            name: json.name,
            issued_ms: json.issued_ms,
            key_id,
            signature,
        })
    }

    /// Accepts the command only if the key it names is one of the `trusted` keys and the
    /// signature verifies under it with Ed25519's strict rules over
    /// [`SignedCommand::signed_bytes`]. Returns that key's id. Says nothing about the topic,
    /// replays or the clock: see [`SignedCommand::accept`].
    pub fn verify_against(&self, trusted: &[VerifyingKey]) -> Result<KeyId, VerifyError> {
        let key = trusted
            .iter()
            .find(|k| KeyId::of(k) == self.key_id)
            .ok_or_else(|| VerifyError::UnknownKey {
                key_id: self.key_id,
                trusted: trusted.iter().map(KeyId::of).collect(),
            })?;
        key.verify_strict(&self.signed_bytes(), &self.signature)
            .map_err(|_| VerifyError::BadCommandSignature {
                key_id: self.key_id,
                op: self.op,
                name: self.name.clone(),
                issued_ms: self.issued_ms,
            })?;
        Ok(self.key_id)
    }

    /// Checks that the command is for `op` of module `name` (the topic it arrived on). Only
    /// meaningful together with [`SignedCommand::verify_against`].
    pub fn expect(&self, op: CommandOp, name: &str) -> Result<(), VerifyError> {
        if self.op != op || self.name != name {
            return Err(VerifyError::CommandMismatch {
                expected_op: op,
                expected_name: name.to_string(),
                signed_op: self.op,
                signed_name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Checks the replay protection: `issued_ms` must be strictly greater than
    /// `last_accepted_ms` (the `issued_ms` of the last command accepted for this module, if
    /// any) and at most [`MAX_COMMAND_FUTURE_MS`] ahead of `now_ms`.
    pub fn check_fresh(
        &self,
        last_accepted_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), VerifyError> {
        check_issued(&self.name, self.issued_ms, last_accepted_ms, now_ms)
    }

    /// Every check a gateway makes before it acts on a command that arrived on the topic of
    /// `op` for module `name`, in this order: signature under a trusted key
    /// ([`SignedCommand::verify_against`]), topic ([`SignedCommand::expect`]), freshness
    /// ([`SignedCommand::check_fresh`]). Returns the id of the key that signed. The caller
    /// must record `issued_ms` as the module's last accepted command once it acted on it.
    pub fn accept(
        &self,
        trusted: &[VerifyingKey],
        op: CommandOp,
        name: &str,
        last_accepted_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<KeyId, VerifyError> {
        let key_id = self.verify_against(trusted)?;
        self.expect(op, name)?;
        self.check_fresh(last_accepted_ms, now_ms)?;
        Ok(key_id)
    }
}

fn command_signed_bytes(op: CommandOp, name: &str, issued_ms: u64) -> Vec<u8> {
    let op = op.as_str();
    let mut out = Vec::with_capacity(COMMAND_DOMAIN.len() + 8 + op.len() + name.len() + 8);
    out.extend_from_slice(COMMAND_DOMAIN);
    for field in [op, name] {
        // A valid name is at most MAX_NAME_LEN bytes, and `from_json` bounds the whole input,
        // so the length fits in a u32.
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(&issued_ms.to_be_bytes());
    out
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Decodes exactly `N` bytes from `2 * N` hex digits of either case.
fn decode_hex<const N: usize>(what: &'static str, text: &str) -> Result<[u8; N], EncodingError> {
    let count = text.chars().count();
    if count != 2 * N || text.len() != 2 * N {
        return Err(EncodingError::HexLength {
            what,
            expected: 2 * N,
            found: count,
        });
    }
    let mut out = [0u8; N];
    for (position, c) in text.chars().enumerate() {
        let digit = c.to_digit(16).ok_or(EncodingError::NotHex {
            what,
            position,
            found: c,
        })? as u8;
        out[position / 2] |= if position % 2 == 0 { digit << 4 } else { digit };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// The issue time of the test modules.
    const ISSUED: u64 = 1_795_000_000_000;

    fn signed() -> SignedModule {
        SignedModule::sign(
            &key(1),
            "enrich",
            "1.0.0",
            ISSUED,
            b"\0asm module bytes".to_vec(),
        )
        .unwrap()
    }

    #[test]
    fn valid_signature_is_accepted() {
        let m = signed();
        let back = SignedModule::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        let trusted = [key(2).verifying_key(), key(1).verifying_key()];
        assert_eq!(back.verify_against(&trusted), Ok(KeyId::of(&trusted[1])));
        back.expect_identity("enrich", Some("1.0.0")).unwrap();
    }

    #[test]
    fn unknown_key_is_rejected() {
        let m = signed();
        let err = m.verify_against(&[key(2).verifying_key()]).unwrap_err();
        assert!(
            matches!(err, VerifyError::UnknownKey { key_id, .. } if key_id == KeyId::of(&key(1).verifying_key()))
        );
        assert!(err.to_string().contains("not trusted"), "{err}");
        let err = m.verify_against(&[]).unwrap_err();
        assert!(err.to_string().contains("trust list is empty"), "{err}");
    }

    /// Re-signs nothing: takes a valid signature and presents it for another manifest.
    fn with_manifest(m: &SignedModule, name: &str, version: &str, issued_ms: u64) -> SignedModule {
        SignedModule {
            manifest: Manifest::for_module(name, version, &m.wasm, issued_ms).unwrap(),
            ..m.clone()
        }
    }

    #[test]
    fn signed_for_another_name_is_rejected() {
        let m = with_manifest(&signed(), "threshold", "1.0.0", ISSUED);
        let back = SignedModule::from_bytes(&m.to_bytes()).unwrap();
        let err = back.verify_against(&[key(1).verifying_key()]).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("\"threshold\""), "{err}");
    }

    #[test]
    fn signed_for_another_version_is_rejected() {
        let m = with_manifest(&signed(), "enrich", "1.0.1", ISSUED);
        let err = m.verify_against(&[key(1).verifying_key()]).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
    }

    /// The issue time is signed: a deploy cannot be made to look newer (to pass a gateway's
    /// replay check) or older by editing its header.
    #[test]
    fn signed_at_another_time_is_rejected() {
        for issued_ms in [ISSUED + 1, ISSUED - 1, 0, u64::MAX] {
            let m = with_manifest(&signed(), "enrich", "1.0.0", issued_ms);
            let back = SignedModule::from_bytes(&m.to_bytes()).unwrap();
            assert_eq!(back.manifest().issued_ms(), issued_ms);
            let err = back.verify_against(&[key(1).verifying_key()]).unwrap_err();
            assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
            assert!(
                err.to_string().contains(&format!("issued_ms {issued_ms}")),
                "{err}"
            );
        }
    }

    /// A module signed in the earlier format (no issue time) is refused with a reason that
    /// says to sign it again, not as garbage.
    #[test]
    fn the_earlier_format_is_refused_with_its_own_reason() {
        let mut old = OLD_ENVELOPE_MAGIC.to_vec();
        old.extend_from_slice(b"{\"name\":\"enrich\"}\n\0asm");
        let err = SignedModule::from_bytes(&old).unwrap_err();
        assert_eq!(err, EnvelopeError::OldFormat);
        assert!(err.to_string().contains("sign the module again"), "{err}");
    }

    #[test]
    fn expected_identity_is_checked() {
        let m = signed();
        assert!(matches!(
            m.expect_identity("threshold", None),
            Err(VerifyError::NameMismatch { .. })
        ));
        assert!(matches!(
            m.expect_identity("enrich", Some("2")),
            Err(VerifyError::VersionMismatch { .. })
        ));
        m.expect_identity("enrich", None).unwrap();
    }

    #[test]
    fn modified_bytes_are_rejected() {
        let m = signed();
        let mut bytes = m.to_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let back = SignedModule::from_bytes(&bytes).unwrap();
        let err = back.verify_against(&[key(1).verifying_key()]).unwrap_err();
        assert!(matches!(err, VerifyError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains("modified"), "{err}");
    }

    #[test]
    fn modified_bytes_with_updated_digest_are_rejected() {
        let m = signed();
        let mut wasm = m.wasm.clone();
        wasm[0] ^= 1;
        let forged = SignedModule {
            manifest: Manifest::for_module("enrich", "1.0.0", &wasm, ISSUED).unwrap(),
            wasm,
            ..m
        };
        let err = forged
            .verify_against(&[key(1).verifying_key()])
            .unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn truncated_envelopes_are_clear_errors() {
        let bytes = signed().to_bytes();
        let err = SignedModule::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::Truncated {
                expected: 17,
                found: 14
            }
        );
        assert!(err.to_string().contains("truncated"), "{err}");
        let header_end = ENVELOPE_MAGIC.len() + 10;
        assert!(matches!(
            SignedModule::from_bytes(&bytes[..header_end]),
            Err(EnvelopeError::HeaderUnterminated { .. })
        ));
        assert_eq!(
            SignedModule::from_bytes(&bytes[..5]),
            Err(EnvelopeError::BadMagic)
        );
        assert_eq!(SignedModule::from_bytes(&[]), Err(EnvelopeError::Empty));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            SignedModule::from_bytes(&longer),
            Err(EnvelopeError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn swapped_signature_is_rejected() {
        let a = signed();
        let b = SignedModule::sign(&key(1), "enrich", "1.0.0", ISSUED, b"other bytes".to_vec())
            .unwrap();
        let swapped = SignedModule {
            signature: b.signature,
            ..a.clone()
        };
        let err = swapped
            .verify_against(&[key(1).verifying_key()])
            .unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
        // The signature of another key, with that key's id, is an unknown key.
        let c = SignedModule::sign(&key(3), "enrich", "1.0.0", ISSUED, a.wasm.clone()).unwrap();
        let other_key = SignedModule {
            signature: c.signature,
            key_id: c.key_id,
            ..a.clone()
        };
        assert!(matches!(
            other_key.verify_against(&[key(1).verifying_key()]),
            Err(VerifyError::UnknownKey { .. })
        ));
        // ... and the other key's signature under the trusted key's id does not verify.
        let forged_id = SignedModule {
            signature: c.signature,
            ..a
        };
        assert!(matches!(
            forged_id.verify_against(&[key(1).verifying_key(), key(3).verifying_key()]),
            Err(VerifyError::BadSignature { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_clear_errors() {
        let good = String::from_utf8_lossy(&signed().to_bytes()).into_owned();
        let header = good.lines().nth(1).unwrap().to_string();
        let h: serde_json::Value = serde_json::from_str(&header).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut h = h.clone();
            h[field] = value;
            let mut out = ENVELOPE_MAGIC.to_vec();
            out.extend_from_slice(h.to_string().as_bytes());
            out.push(b'\n');
            out.extend_from_slice(b"\0asm module bytes");
            SignedModule::from_bytes(&out).unwrap_err().to_string()
        };
        let cases = [
            ("sha256", "zz".into(), "sha256 must be 64 hex digits"),
            ("sha256", "g".repeat(64).into(), "sha256 is not hexadecimal"),
            ("signature", "00".into(), "signature must be 128 hex digits"),
            ("key_id", "0123".into(), "key_id must be 16 hex digits"),
            ("name", "".into(), "module name is empty"),
            ("name", "../x".into(), "module name \"../x\" must start"),
            ("version", "1 0".into(), "module version \"1 0\""),
            ("name", 5.into(), "invalid type"),
            ("size", (-1).into(), "invalid value"),
            ("issued_ms", (-1).into(), "invalid value"),
            ("issued_ms", "now".into(), "invalid type"),
            ("extra", 1.into(), "unknown field"),
        ];
        for (field, value, expected) in cases {
            let err = with(field, value);
            assert!(err.contains(expected), "{field}: {err}");
        }
        let mut not_json = ENVELOPE_MAGIC.to_vec();
        not_json.extend_from_slice(b"not json\n\0asm");
        let err = SignedModule::from_bytes(&not_json).unwrap_err();
        assert!(matches!(err, EnvelopeError::Header(_)), "{err}");
        let mut huge = ENVELOPE_MAGIC.to_vec();
        huge.extend(std::iter::repeat_n(b' ', MAX_HEADER_BYTES + 10));
        huge.push(b'\n');
        assert!(matches!(
            SignedModule::from_bytes(&huge),
            Err(EnvelopeError::HeaderUnterminated { .. })
        ));
    }

    #[test]
    fn size_limit_is_checked_before_copying() {
        let bytes = signed().to_bytes();
        assert_eq!(
            SignedModule::from_bytes_limited(&bytes, 16),
            Err(EnvelopeError::TooLarge { size: 17, max: 16 })
        );
        SignedModule::from_bytes_limited(&bytes, 17).unwrap();
    }

    #[test]
    fn signed_bytes_are_unambiguous() {
        let d = [7u8; 32];
        let a = Manifest::new("a", "bc", d, 0x0102_0304_0506_0708).unwrap();
        let b = Manifest::new("ab", "c", d, 0x0102_0304_0506_0708).unwrap();
        assert_ne!(a.signed_bytes(), b.signed_bytes());
        assert!(a.signed_bytes().starts_with(DOMAIN));
        let mut expected = DOMAIN.to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 2, b'b', b'c']);
        expected.extend_from_slice(&d);
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a.signed_bytes(), expected);
        let later = Manifest::new("a", "bc", d, 0x0102_0304_0506_0709).unwrap();
        assert_ne!(a.signed_bytes(), later.signed_bytes());
        // A signature for one does not verify for the other.
        let sig = sign(&key(1), &a);
        let id = KeyId::of(&key(1).verifying_key());
        verify(&[key(1).verifying_key()], &a, id, &sig).unwrap();
        assert!(verify(&[key(1).verifying_key()], &b, id, &sig).is_err());
    }

    #[test]
    fn names_and_versions_are_validated() {
        for ok in ["enrich", "a", "A-b_c.1", "1.0.0-rc.1", &"x".repeat(64)] {
            validate_name(ok).unwrap();
            validate_version(ok).unwrap();
        }
        assert_eq!(
            validate_name(""),
            Err(ManifestError::Empty {
                what: "module name"
            })
        );
        assert!(matches!(
            validate_version(&"x".repeat(65)),
            Err(ManifestError::TooLong {
                len: 65,
                max: 64,
                ..
            })
        ));
        for bad in [".hidden", "-flag", "a/b", "a b", "é", "a+b", "a\0", "_x"] {
            assert!(
                matches!(validate_name(bad), Err(ManifestError::Charset { .. })),
                "{bad:?} accepted"
            );
        }
        let long = validate_name(&"é".repeat(100)).unwrap_err().to_string();
        assert!(long.len() < 200, "{long}");
    }

    #[test]
    fn key_texts_round_trip_and_errors_are_specific() {
        let k = key(9);
        let public = public_key_text(&k.verifying_key());
        assert!(public.starts_with("outpost-ed25519-public "));
        assert_eq!(parse_public_key(&public), Ok(k.verifying_key()));
        let secret = secret_key_text(&k);
        assert_eq!(parse_secret_key(&secret).unwrap().to_bytes(), k.to_bytes());
        let err = |r: Result<VerifyingKey, EncodingError>| r.unwrap_err().to_string();
        assert!(err(parse_public_key(&secret)).contains("a secret key"));
        assert!(parse_secret_key(&public)
            .unwrap_err()
            .to_string()
            .contains("a public key"));
        assert!(err(parse_public_key("")).contains("empty"));
        assert!(err(parse_public_key("ssh-ed25519 AAAA")).contains("\"ssh-ed25519\""));
        assert!(err(parse_public_key("outpost-ed25519-public")).contains("64 hex digits"));
        assert!(err(parse_public_key(&format!("{public}{public}"))).contains("more than one line"));
        let bad_hex = format!("{PUBLIC_KEY_TAG} {}", "x".repeat(64));
        assert!(err(parse_public_key(&bad_hex)).contains("not hexadecimal"));
        // The identity point is a valid encoding of a weak key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = format!("{PUBLIC_KEY_TAG} {}", to_hex(&identity));
        assert_eq!(parse_public_key(&weak), Err(EncodingError::WeakPublicKey));
        // Upper-case hex is accepted.
        let upper = format!(
            "{PUBLIC_KEY_TAG} {}",
            to_hex(k.verifying_key().as_bytes()).to_uppercase()
        );
        assert_eq!(parse_public_key(&upper), Ok(k.verifying_key()));
    }

    #[test]
    fn an_invalid_curve_point_is_refused() {
        // Find a 32-byte string that does not decompress to a curve point.
        let bad = (0u8..=255)
            .map(|i| {
                let mut b = [0x55u8; 32];
                b[0] = i;
                b
            })
            .find(|b| VerifyingKey::from_bytes(b).is_err())
            .expect("some encodings are not points");
        let text = format!("{PUBLIC_KEY_TAG} {}", to_hex(&bad));
        assert_eq!(
            parse_public_key(&text),
            Err(EncodingError::InvalidPublicKey)
        );
    }

    #[test]
    fn key_files_are_written_once_with_safe_modes() {
        let dir = tempfile::tempdir().unwrap();
        let k = generate_key().unwrap();
        let files = write_key_pair(&dir.path().join("keys"), "ops", &k).unwrap();
        assert_eq!(files.key_id, KeyId::of(&k.verifying_key()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.secret), 0o600);
        assert_eq!(read_public_key(&files.public).unwrap(), k.verifying_key());
        assert_eq!(
            read_secret_key(&files.secret).unwrap().to_bytes(),
            k.to_bytes()
        );
        let again = write_key_pair(&dir.path().join("keys"), "ops", &generate_key().unwrap());
        assert!(matches!(again, Err(KeyFileError::Exists { .. })));
        assert_eq!(read_public_key(&files.public).unwrap(), k.verifying_key());
        // Only the .pub is left over: still refused, and the .key is not written.
        std::fs::remove_file(&files.secret).unwrap();
        let again = write_key_pair(&dir.path().join("keys"), "ops", &k);
        assert!(matches!(again, Err(KeyFileError::Exists { path }) if path == files.public));
        assert!(!files.secret.exists());
        assert!(matches!(
            write_key_pair(dir.path(), "../evil", &k),
            Err(KeyFileError::Name(_))
        ));
    }

    #[test]
    fn readable_secret_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_key_pair(dir.path(), "k", &key(4)).unwrap();
        std::fs::set_permissions(&files.secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_key(&files.secret).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let missing = read_public_key(&dir.path().join("nope.pub"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.pub"), "{missing}");
    }

    /// A FIFO named as a key file (e.g. `deploy.trusted_keys = ["/some/fifo"]`) made
    /// `config check` and the start-up wait forever in `open`, for a writer that never comes.
    /// The bound is for a hang, not for speed: the read returns at once.
    #[test]
    fn a_fifo_without_a_writer_is_an_empty_key_file_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ops.pub");
        crate::files::make_fifo(&fifo);
        let (done, result) = std::sync::mpsc::channel();
        let reader = fifo.clone();
        std::thread::spawn(move || {
            let _ = done.send((
                read_public_key(&reader).err(),
                read_secret_key(&reader).err(),
            ));
        });
        let (public, secret) = result
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a key from a FIFO without a writer hangs");
        for error in [public, secret] {
            let message = error.expect("an empty FIFO is not a key").to_string();
            assert!(message.contains("empty"), "{message}");
        }
    }

    /// A pipe that does have a writer (`outpost module sign --key <(...)`) is still read.
    #[test]
    fn a_fifo_with_a_writer_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ops.pub");
        crate::files::make_fifo(&fifo);
        let key = key(3).verifying_key();
        let writer_path = fifo.clone();
        let writer = std::thread::spawn(move || {
            // Opening for writing waits for a reader; should that reader have given up
            // (closed) before the key was written, write again for the next one.
            while std::fs::write(&writer_path, public_key_text(&key)).is_err() {}
        });
        // The writer may not have opened its end yet: the reader then sees an empty pipe, so
        // try until it gets the key (the writer's open waits for a reader, so it comes).
        let read = loop {
            match read_public_key(&fifo) {
                Ok(read) => break read,
                Err(e) if e.to_string().contains("empty") => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        writer.join().unwrap();
        assert_eq!(read, key);
    }

    #[test]
    fn key_ids_are_16_hex_digits_and_parse_back() {
        let id = KeyId::of(&key(1).verifying_key());
        let text = id.to_string();
        assert_eq!(text.len(), 16);
        assert_eq!(text.parse::<KeyId>(), Ok(id));
        assert!("xyz".parse::<KeyId>().is_err());
        assert_ne!(id, KeyId::of(&key(2).verifying_key()));
    }

    #[test]
    fn hex_decoding_never_panics_on_multibyte_text() {
        assert!(decode_hex::<2>("x", "éé").is_err());
        assert!(decode_hex::<2>("x", "ééé").is_err());
        assert_eq!(decode_hex::<2>("x", "0aFf"), Ok([0x0a, 0xff]));
    }

    fn command(op: CommandOp, name: &str, issued_ms: u64) -> SignedCommand {
        SignedCommand::sign(&key(1), op, name, issued_ms).unwrap()
    }

    #[test]
    fn commands_round_trip_and_verify() {
        let c = command(CommandOp::Rollback, "enrich", 1_700_000_000_123);
        let json = c.to_json();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["op"], "rollback");
        assert_eq!(value["name"], "enrich");
        assert_eq!(value["issued_ms"], 1_700_000_000_123u64);
        assert_eq!(value["key"], KeyId::of(&key(1).verifying_key()).to_string());
        assert_eq!(value["signature"].as_str().unwrap().len(), 128);
        assert_eq!(value.as_object().unwrap().len(), 5);
        let back = SignedCommand::from_json(&json).unwrap();
        assert_eq!(back, c);
        let trusted = [key(2).verifying_key(), key(1).verifying_key()];
        assert_eq!(back.verify_against(&trusted), Ok(KeyId::of(&trusted[1])));
        assert_eq!(
            back.accept(
                &trusted,
                CommandOp::Rollback,
                "enrich",
                None,
                1_700_000_000_000
            ),
            Ok(KeyId::of(&trusted[1]))
        );
        assert_eq!("remove".parse::<CommandOp>(), Ok(CommandOp::Remove));
        assert_eq!(CommandOp::Rollback.to_string(), "rollback");
        assert!("Remove".parse::<CommandOp>().is_err());
    }

    #[test]
    fn commands_signed_bytes_are_canonical() {
        let c = command(CommandOp::Remove, "ab", 258);
        let mut expected = COMMAND_DOMAIN.to_vec();
        expected.extend_from_slice(&[0, 0, 0, 6]);
        expected.extend_from_slice(b"remove");
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(c.signed_bytes(), expected);
        assert_ne!(COMMAND_DOMAIN, DOMAIN);
        assert!(!c.signed_bytes().starts_with(DOMAIN));
    }

    #[test]
    fn an_altered_command_does_not_verify() {
        let trusted = [key(1).verifying_key()];
        let c = command(CommandOp::Remove, "enrich", 1000);
        for altered in [
            SignedCommand {
                op: CommandOp::Rollback,
                ..c.clone()
            },
            SignedCommand {
                name: "threshold".into(),
                ..c.clone()
            },
            SignedCommand {
                issued_ms: 1001,
                ..c.clone()
            },
        ] {
            let err = altered.verify_against(&trusted).unwrap_err();
            assert!(
                matches!(err, VerifyError::BadCommandSignature { .. }),
                "{err}"
            );
            // ... also after a trip through JSON.
            let back = SignedCommand::from_json(&altered.to_json()).unwrap();
            assert!(back.verify_against(&trusted).is_err());
        }
        let err = c.verify_against(&[key(2).verifying_key()]).unwrap_err();
        assert!(matches!(err, VerifyError::UnknownKey { .. }), "{err}");
        // Another key's signature presented under the trusted key's id.
        let other = SignedCommand::sign(&key(3), CommandOp::Remove, "enrich", 1000).unwrap();
        let forged = SignedCommand {
            signature: other.signature,
            ..c.clone()
        };
        assert!(matches!(
            forged.verify_against(&trusted),
            Err(VerifyError::BadCommandSignature { .. })
        ));
    }

    #[test]
    fn module_and_command_signatures_never_cross() {
        let trusted = [key(1).verifying_key()];
        let id = KeyId::of(&trusted[0]);
        // A manifest signature presented as a command.
        let module = signed();
        let as_command = SignedCommand {
            signature: *module.signature(),
            ..command(CommandOp::Remove, "enrich", 0)
        };
        assert!(as_command.verify_against(&trusted).is_err());
        // A command signature presented as a manifest, for every manifest built from its
        // fields.
        let c = command(CommandOp::Remove, "enrich", 0);
        for (name, version) in [("enrich", "remove"), ("remove", "enrich"), ("enrich", "0")] {
            let m = Manifest::new(name, version, [0; 32], 0).unwrap();
            assert!(verify(&trusted, &m, id, c.signature()).is_err());
        }
        // The two byte strings never even share their prefix.
        assert_ne!(
            c.signed_bytes()[..DOMAIN.len()],
            module.manifest().signed_bytes()[..DOMAIN.len()]
        );
    }

    #[test]
    fn commands_are_checked_against_topic_and_replays() {
        let trusted = [key(1).verifying_key()];
        let now = 1_000_000_000;
        let c = command(CommandOp::Remove, "enrich", now);
        let accept = |op, name, last| c.accept(&trusted, op, name, last, now);
        assert!(accept(CommandOp::Remove, "enrich", Some(now - 1)).is_ok());
        let err = accept(CommandOp::Rollback, "enrich", None).unwrap_err();
        assert!(matches!(err, VerifyError::CommandMismatch { .. }), "{err}");
        assert!(err.to_string().contains("remove of \"enrich\""), "{err}");
        let err = accept(CommandOp::Remove, "threshold", None).unwrap_err();
        assert!(matches!(err, VerifyError::CommandMismatch { .. }), "{err}");
        for last in [now, now + 1] {
            let err = accept(CommandOp::Remove, "enrich", Some(last)).unwrap_err();
            assert!(matches!(err, VerifyError::Replayed { .. }), "{err}");
            assert!(err.to_string().contains("replay"), "{err}");
        }
        let future = command(CommandOp::Remove, "enrich", now + MAX_COMMAND_FUTURE_MS);
        assert!(future.check_fresh(None, now).is_ok());
        let too_far = command(CommandOp::Remove, "enrich", now + MAX_COMMAND_FUTURE_MS + 1);
        let err = too_far.check_fresh(None, now).unwrap_err();
        assert!(matches!(err, VerifyError::FromTheFuture { .. }), "{err}");
        // An old command is fine as long as it is newer than the last accepted one.
        assert!(command(CommandOp::Remove, "enrich", 5)
            .check_fresh(Some(4), now)
            .is_ok());
        // The signature is checked first: a forged command says so, not "replayed".
        let forged = SignedCommand {
            issued_ms: now + 1,
            ..c.clone()
        };
        assert!(matches!(
            forged.accept(&trusted, CommandOp::Remove, "enrich", Some(now + 5), now),
            Err(VerifyError::BadCommandSignature { .. })
        ));
    }

    #[test]
    fn malformed_commands_are_clear_errors() {
        assert!(matches!(
            SignedCommand::sign(&key(1), CommandOp::Remove, "../x", 0),
            Err(ManifestError::Charset { .. })
        ));
        let good: serde_json::Value =
            serde_json::from_slice(&command(CommandOp::Remove, "enrich", 7).to_json()).unwrap();
        let with = |field: &str, value: serde_json::Value| {
            let mut v = good.clone();
            v[field] = value;
            SignedCommand::from_json(v.to_string().as_bytes())
                .unwrap_err()
                .to_string()
        };
        let cases = [
            ("op", "purge".into(), "unknown command operation \"purge\""),
            ("op", 1.into(), "invalid type"),
            ("name", "".into(), "module name is empty"),
            ("name", "a/b".into(), "module name \"a/b\" must start"),
            ("issued_ms", (-1).into(), "invalid value"),
            ("issued_ms", "5".into(), "invalid type"),
            ("key", "0123".into(), "key_id must be 16 hex digits"),
            ("signature", "00".into(), "signature must be 128 hex digits"),
            ("signature", "x".repeat(128).into(), "not hexadecimal"),
            ("extra", true.into(), "unknown field"),
        ];
        for (field, value, expected) in cases {
            let err = with(field, value);
            assert!(err.contains(expected), "{field}: {err}");
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("issued_ms");
        let err = SignedCommand::from_json(missing.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let text = good.to_string();
        let twice = format!("{},\"op\":\"remove\"}}", &text[..text.len() - 1]);
        let err = SignedCommand::from_json(twice.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("duplicate field"), "{err}");
        assert!(matches!(
            SignedCommand::from_json(b""),
            Err(CommandError::Json(_))
        ));
        assert!(matches!(
            SignedCommand::from_json(b"[1]"),
            Err(CommandError::Json(_))
        ));
        let huge = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert_eq!(
            SignedCommand::from_json(&huge),
            Err(CommandError::TooLarge {
                size: MAX_COMMAND_BYTES + 1,
                max: MAX_COMMAND_BYTES
            })
        );
        // A signed module is not a command.
        assert!(SignedCommand::from_json(&signed().to_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn random_commands_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(c) = SignedCommand::from_json(&bytes) {
                let _ = c.accept(&[key(1).verifying_key()], CommandOp::Remove, "x", Some(1), 0);
            }
        }

        #[test]
        fn random_command_like_json_never_panics(
            op in "[a-z]{0,10}",
            name in "[ -~]{0,80}",
            issued in any::<u64>(),
            key_hex in "[0-9a-fA-Fx]{0,20}",
            sig_hex in "[0-9a-f]{0,130}",
        ) {
            let text = serde_json::json!({
                "op": op, "name": name, "issued_ms": issued, "key": key_hex, "signature": sig_hex,
            })
            .to_string();
            if let Ok(c) = SignedCommand::from_json(text.as_bytes()) {
                prop_assert!(c.verify_against(&[key(1).verifying_key()]).is_err());
            }
        }

        /// A command survives JSON unchanged, and verifies only as itself.
        #[test]
        fn signed_commands_round_trip(
            rollback in any::<bool>(),
            name in "[a-z0-9][a-z0-9._-]{0,63}",
            issued in any::<u64>(),
        ) {
            let op = if rollback { CommandOp::Rollback } else { CommandOp::Remove };
            let c = command(op, &name, issued);
            let back = SignedCommand::from_json(&c.to_json()).unwrap();
            prop_assert_eq!(&back, &c);
            prop_assert!(back.verify_against(&[key(1).verifying_key()]).is_ok());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = SignedModule::from_bytes(&bytes);
            let mut with_magic = ENVELOPE_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = SignedModule::from_bytes(&with_magic);
        }

        #[test]
        fn random_headers_never_panic(
            header in "[ -~]{0,300}",
            module in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = ENVELOPE_MAGIC.to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.push(b'\n');
            bytes.extend_from_slice(&module);
            if let Ok(m) = SignedModule::from_bytes(&bytes) {
                let _ = m.verify_against(&[key(1).verifying_key()]);
            }
        }

        /// Any single corruption of a valid envelope is refused, or changes nothing that
        /// matters (e.g. the case of a hex digit): what verifies is what was signed.
        #[test]
        fn corrupted_envelopes_never_verify_as_something_else(
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let original = signed();
            let mut bytes = original.to_bytes();
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            } else {
                let i = position.index(bytes.len());
                bytes[i] ^= flip;
            }
            if let Ok(m) = SignedModule::from_bytes(&bytes) {
                if m.verify_against(&[key(1).verifying_key()]).is_ok() {
                    prop_assert_eq!(m.manifest(), original.manifest());
                    prop_assert_eq!(m.wasm(), original.wasm());
                }
            }
        }
    }
}
