//! Credential files: certificates, private keys, CA bundles and other secrets that the device
//! listeners ([`crate::edge::tls`]), the uplinks ([`crate::uplink::credentials`]) and the
//! operator's commands ([`crate::client::exchange`]) read, and what they say about their
//! certificates.
//!
//! Guarantees:
//! - Every reader reads only regular files, at most [`MAX_FILE_BYTES`] of one (a FIFO or a
//!   device named by mistake is refused, not read forever), and never panics.
//! - A secret (a private key, a password file) that users other than its owner may access (any
//!   of the mode bits 077) is refused, as `outpost keygen` refuses such a signing key.
//! - Every error is a [`CredentialError`] that names the configuration key (or the command's
//!   option) and the file, and says what is wrong (missing, unreadable, not PEM, no
//!   certificate or key in it, a key that does not match its certificate, a secret other
//!   users can read). The texts are the same whichever stage reads the file.
//! - [`expiry_warnings`] names every certificate that has expired or expires within
//!   [`EXPIRY_WARNING_DAYS`] days.
//!
//! It does not build TLS configurations, keep anything alive, open sockets or watch files:
//! the stages that use the files do (see [`crate::files::keep_reading`] for re-reading them).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

/// Largest credential file read (a CA bundle with every root of a distribution is ~220 KB).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A certificate that expires within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// Why a credential file cannot be used: an upstream's ([`crate::uplink::credentials`]), the
/// device listeners' ([`crate::edge::tls`]) or an operator command's. Every message names the
/// configuration key (or option) and the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The file cannot be opened or read (missing, a directory, permissions).
    #[error("{key}: cannot read {}: {detail}", path.display())]
    Unreadable {
        /// The configuration key, e.g. `upstream "cloud".certfile`.
        key: String,
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        detail: String,
    },
    /// Not a regular file, or larger than [`MAX_FILE_BYTES`].
    #[error("{key}: {} {problem}", path.display())]
    NotAFile {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What it is instead.
        problem: String,
    },
    /// The file holds no PEM certificate, or one that does not parse.
    #[error("{key}: {} holds no usable certificate: {detail} (expected PEM, \"-----BEGIN CERTIFICATE-----\")", path.display())]
    NoCertificate {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A certificate that parses but that TLS will not use.
    #[error("{key}: {}: {detail}", path.display())]
    Unusable {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file holds no PEM private key, or one rustls cannot use.
    #[error("{key}: {} holds no usable private key: {detail} (expected PEM: PKCS#8 \"PRIVATE KEY\", SEC1 \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\")", path.display())]
    NoKey {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The file holds no PEM certificate revocation list, or one that does not parse.
    #[error("{key}: {} holds no usable certificate revocation list: {detail} (expected PEM, \"-----BEGIN X509 CRL-----\")", path.display())]
    NoCrl {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The private key is not the key of the certificate.
    #[error("{key}: the private key in {} does not match the certificate in {} (rotate both files together)", key_path.display(), cert_path.display())]
    KeyMismatch {
        /// The configuration key (the key file's).
        key: String,
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        cert_path: PathBuf,
    },
    /// A secret that users other than its owner can access.
    #[error("{key}: {} is accessible by other users (mode {mode:03o}); run `chmod 600 {}` and make the gateway's user its owner", path.display(), path.display())]
    Exposed {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The password file is empty or not UTF-8 text.
    #[error("{key}: {} {problem}", path.display())]
    BadPassword {
        /// The configuration key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// No CA certificate to verify the upstream against.
    #[error("{key}: {detail}")]
    NoRoots {
        /// The configuration key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Anything else rustls refused while building the configuration.
    #[error("{key}: {detail}")]
    Tls {
        /// The configuration key.
        key: String,
        /// What rustls said.
        detail: String,
    },
}

/// Facts about one certificate, for logs and warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Which configuration key and file it came from.
    pub origin: String,
    /// Its subject, RFC 4514 style (`CN=gw-42,O=Example`).
    pub subject: String,
    /// Its notAfter.
    pub not_after: SystemTime,
}

/// Warnings for the certificates of `certificates` that expired or expire within
/// [`EXPIRY_WARNING_DAYS`] days of `now`, one line each, in their order.
pub fn expiry_warnings<'a>(
    certificates: impl IntoIterator<Item = &'a CertificateFacts>,
    now: SystemTime,
) -> Vec<String> {
    let soon = now + Duration::from_secs(EXPIRY_WARNING_DAYS * 86_400);
    certificates
        .into_iter()
        .filter(|c| c.not_after <= soon)
        .map(|c| {
            let when = humantime::format_rfc3339_seconds(c.not_after);
            if c.not_after <= now {
                format!(
                    "{}: the certificate {} expired on {when}",
                    c.origin, c.subject
                )
            } else {
                let days = c
                    .not_after
                    .duration_since(now)
                    .map_or(0, |d| d.as_secs() / 86_400);
                format!(
                    "{}: the certificate {} expires on {when} (in {days} day(s)); rotate it",
                    c.origin, c.subject
                )
            }
        })
        .collect()
}

/// Opens a regular file and reads it whole (at most [`MAX_FILE_BYTES`]).
fn read_file(key: &str, path: &Path) -> Result<(Vec<u8>, u32), CredentialError> {
    use crate::files::FileError;
    match crate::files::read_regular(path, MAX_FILE_BYTES) {
        Ok(file) => Ok((file.bytes, file.mode)),
        Err(FileError::Io(e)) => Err(CredentialError::Unreadable {
            key: key.to_string(),
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
        Err(problem) => Err(CredentialError::NotAFile {
            key: key.to_string(),
            path: path.to_path_buf(),
            problem: problem.to_string(),
        }),
    }
}

/// Reads a public file (a certificate, a CA bundle, a CRL) for configuration key `key`.
pub(crate) fn read_public(key: &str, path: &Path) -> Result<Vec<u8>, CredentialError> {
    read_file(key, path).map(|(bytes, _)| bytes)
}

/// Reads a secret (private key, password): refused when users other than its owner may access it.
pub(crate) fn read_secret(key: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
    let (bytes, mode) = read_file(key, path)?;
    let bytes = Zeroizing::new(bytes);
    if mode & 0o077 != 0 {
        return Err(CredentialError::Exposed {
            key: key.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(bytes)
}

/// Every PEM certificate in `bytes`, in order; at least one, each a parsable X.509
/// certificate.
pub(crate) fn certificates(
    key: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let problem = |detail: String| CredentialError::NoCertificate {
        key: key.to_string(),
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(problem("no certificate in it".to_string()));
    }
    for cert in &certs {
        parse_certificate(cert).map_err(|e| problem(format!("not an X.509 certificate: {e}")))?;
    }
    Ok(certs)
}

/// A CA file, read and checked: the certificates a peer's must chain to.
pub(crate) struct CaFile {
    /// Its certificates, for rustls.
    pub roots: rustls::RootCertStore,
    /// Their facts, in file order.
    pub certificates: Vec<CertificateFacts>,
    /// The file's content (for change detection).
    pub bytes: Vec<u8>,
}

/// Reads the CA file `path` of configuration key `key`: at least one certificate, and every
/// one usable as a trust anchor.
pub(crate) fn read_ca(key: &str, path: &Path) -> Result<CaFile, CredentialError> {
    let bytes = read_public(key, path)?;
    let mut roots = rustls::RootCertStore::empty();
    let mut facts_of = Vec::new();
    for cert in certificates(key, path, &bytes)? {
        facts_of.push(facts(key, path, &cert));
        roots
            .add(cert)
            .map_err(|e| CredentialError::NoCertificate {
                key: key.to_string(),
                path: path.to_path_buf(),
                detail: format!("not a CA certificate rustls can use: {e}"),
            })?;
    }
    Ok(CaFile {
        roots,
        certificates: facts_of,
        bytes,
    })
}

/// Where a certificate and its private key come from: two files and the configuration keys
/// (or options) that name them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyPairFiles<'a> {
    /// The certificate file's key, e.g. `broker.tls.certfile`.
    pub cert_key: &'a str,
    /// The certificate file (the certificate first, then its chain).
    pub cert_path: &'a Path,
    /// The key file's key, e.g. `broker.tls.keyfile`.
    pub key_key: &'a str,
    /// The private key file.
    pub key_path: &'a Path,
}

/// A certificate chain and its private key, read and parsed (not yet checked against each
/// other: rustls does that when it is given them, see [`KeyPairFiles::refusal`]).
pub(crate) struct KeyPair {
    /// The chain, the certificate first; never empty.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The facts of the certificate (the chain's first).
    pub certificate: CertificateFacts,
    /// The certificate file's content (for change detection).
    pub cert_bytes: Vec<u8>,
    /// The key file's content (for change detection).
    pub key_bytes: Zeroizing<Vec<u8>>,
}

impl KeyPairFiles<'_> {
    /// Reads both files (the key file as a secret) and parses them.
    pub fn read(&self) -> Result<KeyPair, CredentialError> {
        let cert_bytes = read_public(self.cert_key, self.cert_path)?;
        let key_bytes = read_secret(self.key_key, self.key_path)?;
        let chain = certificates(self.cert_key, self.cert_path, &cert_bytes)?;
        let certificate = match chain.first() {
            Some(first) => facts(self.cert_key, self.cert_path, first),
            // `certificates` returns at least one; refuse rather than panic.
            None => {
                return Err(CredentialError::NoCertificate {
                    key: self.cert_key.to_string(),
                    path: self.cert_path.to_path_buf(),
                    detail: "no certificate in it".to_string(),
                })
            }
        };
        let key =
            PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| CredentialError::NoKey {
                key: self.key_key.to_string(),
                path: self.key_path.to_path_buf(),
                detail: pem_problem(&e),
            })?;
        Ok(KeyPair {
            chain,
            key,
            certificate,
            cert_bytes,
            key_bytes,
        })
    }

    /// Why rustls refused this pair (`with_client_auth_cert`, `with_single_cert`), naming the
    /// file at fault: a key that is not the certificate's, a certificate TLS will not use, or
    /// a key it cannot use.
    pub fn refusal(&self, error: rustls::Error) -> CredentialError {
        match error {
            rustls::Error::InconsistentKeys(_) => CredentialError::KeyMismatch {
                key: self.key_key.to_string(),
                key_path: self.key_path.to_path_buf(),
                cert_path: self.cert_path.to_path_buf(),
            },
            rustls::Error::InvalidCertificate(problem) => CredentialError::Unusable {
                key: self.cert_key.to_string(),
                path: self.cert_path.to_path_buf(),
                detail: certificate_problem(&problem),
            },
            other => CredentialError::NoKey {
                key: self.key_key.to_string(),
                path: self.key_path.to_path_buf(),
                detail: other.to_string(),
            },
        }
    }
}

/// Why rustls will not use a certificate, in words.
fn certificate_problem(problem: &rustls::CertificateError) -> String {
    let text = format!("{problem:?}");
    if text.contains("UnsupportedCertVersion") {
        // `openssl x509 -req` without `-extfile` makes these.
        "it is an X.509 v1 certificate, which TLS no longer accepts: issue it as v3 (with \
         `openssl x509 -req`, give an -extfile, e.g. with extendedKeyUsage=clientAuth)"
            .to_string()
    } else {
        format!("rustls cannot use it: {text}")
    }
}

/// What is wrong with a PEM file, in words.
pub(crate) fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::NoItemsFound => "no PEM section of the expected kind in it".to_string(),
        other => format!("{other:?}"),
    }
}

fn parse_certificate(cert: &CertificateDer<'_>) -> Result<x509_cert::Certificate, String> {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())
}

/// The facts of a certificate that [`certificates`] returned, for logs and warnings.
fn facts(key: &str, path: &Path, cert: &CertificateDer<'_>) -> CertificateFacts {
    // `certificates` parsed it already; a failure here cannot happen, and would only cost the
    // expiry warning.
    let parsed = parse_certificate(cert).ok();
    CertificateFacts {
        origin: format!("{key} ({})", path.display()),
        subject: parsed
            .as_ref()
            .map(|c| c.tbs_certificate.subject.to_string())
            .unwrap_or_default(),
        not_after: parsed
            .map(|c| {
                std::time::UNIX_EPOCH + c.tbs_certificate.validity.not_after.to_unix_duration()
            })
            .unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes `text` to a new file `name` in `dir` with permission bits `mode`; its path.
    pub(crate) fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A self-signed certificate and its key, PEM.
    fn certificate(name: &str) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    proptest! {
        #[test]
        fn a_warning_comes_exactly_within_the_warning_days(offset in -100i64 * 86_400..100 * 86_400) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let not_after = if offset >= 0 {
                now + Duration::from_secs(offset.unsigned_abs())
            } else {
                now - Duration::from_secs(offset.unsigned_abs())
            };
            let facts = CertificateFacts {
                origin: "k (f.pem)".into(),
                subject: "CN=x".into(),
                not_after,
            };
            let warnings = expiry_warnings([&facts], now);
            let window = (EXPIRY_WARNING_DAYS * 86_400) as i64;
            prop_assert_eq!(warnings.len(), usize::from(offset <= window));
            if let Some(warning) = warnings.first() {
                prop_assert!(warning.starts_with("k (f.pem): the certificate CN=x "), "{}", warning);
                prop_assert_eq!(warning.contains("expired on"), offset <= 0, "{}", warning);
            }
        }

        #[test]
        fn a_secret_is_refused_exactly_when_others_may_access_it(mode in 0o400u32..0o1000) {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "secret", "s", mode);
            match read_secret("k", &path) {
                Ok(bytes) => {
                    prop_assert_eq!(mode & 0o077, 0);
                    prop_assert_eq!(bytes.as_slice(), b"s");
                }
                Err(CredentialError::Exposed { mode: seen, .. }) => {
                    prop_assert_eq!(seen, mode);
                    prop_assert_ne!(mode & 0o077, 0);
                }
                Err(other) => prop_assert!(false, "{}", other),
            }
            // Public files are read whatever their mode.
            prop_assert!(read_public("k", &path).is_ok());
        }
    }

    #[test]
    fn certificates_need_at_least_one_parsable_pem_certificate() {
        let (cert, key) = certificate("a");
        let (other, _) = certificate("b");
        let path = Path::new("c.pem");
        let both = format!("{cert}{other}");
        assert_eq!(certificates("k", path, both.as_bytes()).unwrap().len(), 2);
        for (text, expected) in [
            ("garbage", "no certificate in it"),
            (key.as_str(), "no certificate in it"),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "not an X.509 certificate",
            ),
        ] {
            let error = certificates("k", path, text.as_bytes()).unwrap_err();
            assert!(
                matches!(error, CredentialError::NoCertificate { .. }),
                "{error}"
            );
            let text = error.to_string();
            assert!(
                text.starts_with("k: c.pem holds no usable certificate: ")
                    && text.contains(expected),
                "{text}"
            );
        }
    }

    #[test]
    fn a_ca_file_gives_its_roots_and_their_facts() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = certificate("ca");
        let path = write(dir.path(), "ca.pem", &cert, 0o644);
        let ca = read_ca("x.cafile", &path).unwrap();
        assert_eq!(ca.roots.len(), 1);
        assert_eq!(ca.certificates.len(), 1);
        assert!(ca.certificates[0].origin.starts_with("x.cafile ("));
        assert!(ca.certificates[0].not_after > SystemTime::now());
        assert_eq!(ca.bytes, cert.as_bytes());
        let missing = read_ca("x.cafile", &dir.path().join("none.pem"))
            .err()
            .unwrap();
        assert!(
            matches!(missing, CredentialError::Unreadable { .. }),
            "{missing}"
        );
    }

    #[test]
    fn a_key_pair_is_read_and_a_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate("gw");
        let (_, other_key) = certificate("other");
        let cert_path = write(dir.path(), "c.pem", &cert, 0o644);
        let key_path = write(dir.path(), "c.key", &key, 0o600);
        let files = KeyPairFiles {
            cert_key: "x.certfile",
            cert_path: &cert_path,
            key_key: "x.keyfile",
            key_path: &key_path,
        };
        let pair = files.read().unwrap();
        assert_eq!(pair.chain.len(), 1);
        assert_eq!(pair.certificate.subject, "CN=rcgen self signed cert");
        assert_eq!(pair.key_bytes.as_slice(), key.as_bytes());

        write(dir.path(), "c.key", &other_key, 0o600);
        let pair = files.read().unwrap();
        let refused = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pair.chain, pair.key)
        .map(|_| ())
        .map_err(|e| files.refusal(e))
        .unwrap_err();
        let text = refused.to_string();
        assert!(
            text.starts_with("x.keyfile: the private key in ")
                && text.contains("c.key")
                && text.contains("c.pem"),
            "{text}"
        );

        write(dir.path(), "c.key", "garbage", 0o600);
        let error = files.read().err().unwrap();
        assert!(matches!(error, CredentialError::NoKey { .. }), "{error}");
        write(dir.path(), "c.key", &key, 0o644);
        let error = files.read().err().unwrap();
        assert!(matches!(error, CredentialError::Exposed { .. }), "{error}");
    }
}
