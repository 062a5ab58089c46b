//! What an uplink proves itself with: the TLS settings of an `mqtts://` upstream (the CA
//! certificates its certificate must chain to, this gateway's client certificate and key, the
//! ALPN protocols) and the MQTT user name and password, read from their files and checked.
//!
//! Guarantees:
//! - [`load`] either returns a complete, consistent set or an error that names the
//!   configuration key, the file and what is wrong with it (missing, unreadable, not PEM, no
//!   certificate or key in it, a key that does not match its certificate, a secret other users
//!   can read). It never panics and reads at most [`MAX_FILE_BYTES`] of a file, and only
//!   regular files (a FIFO or a device named by mistake is refused, not read forever).
//! - A private key file or password file that users other than its owner may access (any of
//!   the mode bits 077) is refused, as `outpost keygen` refuses such a signing key.
//! - [`Credentials::digest`] changes exactly when the content of a file changes, so a reload
//!   can tell a rotation from a `touch`.
//! - [`Credentials::warnings`] names every certificate (client or CA) that has expired or
//!   expires within [`EXPIRY_WARNING_DAYS`] days.
//!
//! This module keeps nothing alive and opens no sockets; [`super::reload`] re-reads the files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::client::{Login, TlsConnect};
use crate::config::{parse_broker_url, UpstreamConfig};

/// Largest credential file read (a CA bundle with every root of a distribution is ~220 KB).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A certificate that expires within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// Where Debian (and Raspberry Pi OS) keep the system's CA certificates, one PEM bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why an upstream's credentials, or the device listeners' TLS files ([`crate::edge::tls`]),
/// cannot be used. Every message names the key and the file.
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

/// A loaded, checked set of an upstream's credentials.
pub struct Credentials {
    /// TLS settings, for `mqtts://` upstreams.
    pub tls: Option<TlsConnect>,
    /// User name and password, if configured.
    pub login: Option<Login>,
    /// The client certificate, if there is one.
    pub client_certificate: Option<CertificateFacts>,
    /// The certificates of `cafile`, if set.
    pub ca_certificates: Vec<CertificateFacts>,
    /// SHA-256 over the content of every file read.
    pub digest: [u8; 32],
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("username", &self.login.as_ref().map(|l| &l.username))
            .field("client_certificate", &self.client_certificate)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// No TLS and no login: what a plain `mqtt://` link without a user name needs.
    pub fn none() -> Credentials {
        Credentials {
            tls: None,
            login: None,
            client_certificate: None,
            ca_certificates: Vec::new(),
            digest: [0; 32],
        }
    }

    /// Warnings for certificates that expired or expire within [`EXPIRY_WARNING_DAYS`] days
    /// of `now`, one line each.
    pub fn warnings(&self, now: SystemTime) -> Vec<String> {
        expiry_warnings(
            self.client_certificate.iter().chain(&self.ca_certificates),
            now,
        )
    }
}

/// Warnings for the certificates of `certificates` that expired or expire within
/// [`EXPIRY_WARNING_DAYS`] days of `now`, one line each (the device listeners' TLS files use
/// it too).
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

/// The files an upstream's credentials come from, for change detection.
pub fn files(config: &UpstreamConfig) -> Vec<PathBuf> {
    [
        &config.cafile,
        &config.certfile,
        &config.keyfile,
        &config.password_file,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// Reads and checks an upstream's credentials. Paths are used as they are (the configuration
/// loader made them relative to the configuration file).
pub fn load(config: &UpstreamConfig) -> Result<Credentials, CredentialError> {
    load_named(config, &|field| {
        format!("upstream {:?}.{field}", config.name)
    })
}

/// [`load`], with the errors naming each setting as `key` spells it (the field's name in
/// [`UpstreamConfig`]: `url`, `cafile`, `certfile`, `keyfile`, `password_file`), so that a
/// command line can name its own options. The checks are [`load`]'s, every one.
pub(crate) fn load_named(
    config: &UpstreamConfig,
    key: &dyn Fn(&str) -> String,
) -> Result<Credentials, CredentialError> {
    let mut digest = Sha256::new();

    let login = match &config.username {
        None => None,
        Some(username) => {
            let password = match (&config.password, &config.password_file) {
                (Some(p), _) => Zeroizing::new(p.expose().to_string()),
                (None, Some(path)) => {
                    let field = key("password_file");
                    let bytes = read_secret(&field, path)?;
                    digest.update(path.as_os_str().as_encoded_bytes());
                    digest.update(&*bytes);
                    password_text(&field, path, &bytes)?
                }
                (None, None) => Zeroizing::new(String::new()),
            };
            Some(Login {
                username: username.clone(),
                password,
            })
        }
    };

    let address = parse_broker_url(&config.url).map_err(|detail| CredentialError::Tls {
        key: key("url"),
        detail,
    })?;
    if !address.tls {
        return Ok(Credentials {
            tls: None,
            login,
            client_certificate: None,
            ca_certificates: Vec::new(),
            digest: digest.finalize().into(),
        });
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let mut ca_certificates = Vec::new();
    match &config.cafile {
        Some(path) => {
            let field = key("cafile");
            let bytes = read_public(&field, path)?;
            digest.update(path.as_os_str().as_encoded_bytes());
            digest.update(&bytes);
            let certs = certificates(&field, path, &bytes)?;
            for cert in certs {
                ca_certificates.push(facts(&field, path, &cert));
                roots
                    .add(cert)
                    .map_err(|e| CredentialError::NoCertificate {
                        key: field.clone(),
                        path: path.clone(),
                        detail: format!("not a CA certificate rustls can use: {e}"),
                    })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(CredentialError::NoRoots {
                    key: key("cafile"),
                    detail: format!(
                        "no system CA certificates found{why}: install the ca-certificates package (it provides {SYSTEM_CA_BUNDLE}) or set cafile"
                    ),
                });
            }
        }
    }

    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| CredentialError::Tls {
            key: key("url"),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut client_certificate = None;
    let mut tls_config = match (&config.certfile, &config.keyfile) {
        (Some(cert_path), Some(key_path)) => {
            let cert_field = key("certfile");
            let key_field = key("keyfile");
            let cert_bytes = read_public(&cert_field, cert_path)?;
            let key_bytes = read_secret(&key_field, key_path)?;
            digest.update(cert_path.as_os_str().as_encoded_bytes());
            digest.update(&cert_bytes);
            digest.update(key_path.as_os_str().as_encoded_bytes());
            digest.update(&*key_bytes);
            let chain = certificates(&cert_field, cert_path, &cert_bytes)?;
            client_certificate = chain.first().map(|c| facts(&cert_field, cert_path, c));
            let private =
                PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| CredentialError::NoKey {
                    key: key_field.clone(),
                    path: key_path.clone(),
                    detail: pem_problem(&e),
                })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => CredentialError::KeyMismatch {
                        key: key_field.clone(),
                        key_path: key_path.clone(),
                        cert_path: cert_path.clone(),
                    },
                    rustls::Error::InvalidCertificate(problem) => CredentialError::Unusable {
                        key: cert_field.clone(),
                        path: cert_path.clone(),
                        detail: certificate_problem(&problem),
                    },
                    other => CredentialError::NoKey {
                        key: key_field.clone(),
                        path: key_path.clone(),
                        detail: other.to_string(),
                    },
                })?
        }
        // Validation refuses one without the other; treat it as no client certificate.
        _ => builder.with_no_client_auth(),
    };
    tls_config.alpn_protocols = config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    digest.update(format!("{:?}", config.alpn).as_bytes());

    let server_name =
        ServerName::try_from(address.host.clone()).map_err(|e| CredentialError::Tls {
            key: key("url"),
            detail: format!(
                "{:?} is neither a DNS name nor an IP address: {e}",
                address.host
            ),
        })?;
    Ok(Credentials {
        tls: Some(TlsConnect {
            config: Arc::new(tls_config),
            server_name,
        }),
        login,
        client_certificate,
        ca_certificates,
        digest: digest.finalize().into(),
    })
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

/// The password in a password file: its first line, without the line break.
fn password_text(
    key: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<Zeroizing<String>, CredentialError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CredentialError::BadPassword {
        key: key.to_string(),
        path: path.to_path_buf(),
        problem: "is not UTF-8 text",
    })?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(CredentialError::BadPassword {
            key: key.to_string(),
            path: path.to_path_buf(),
            problem: "is empty (the password is its first line)",
        });
    }
    Ok(Zeroizing::new(line.to_string()))
}

/// Every PEM certificate in `bytes`, in order; at least one.
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

/// Why rustls will not use a client certificate, in words.
pub(crate) fn certificate_problem(problem: &rustls::CertificateError) -> String {
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
pub(crate) fn facts(key: &str, path: &Path, cert: &CertificateDer<'_>) -> CertificateFacts {
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
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
        path
    }

    fn upstream(url: &str) -> UpstreamConfig {
        UpstreamConfig {
            url: url.to_string(),
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn a_fifo_or_a_directory_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        crate::files::make_fifo(&fifo);
        for path in [fifo, dir.path().to_path_buf()] {
            let mut config = upstream("mqtts://h");
            config.cafile = Some(path.clone());
            let error = load(&config).unwrap_err();
            assert!(
                matches!(error, CredentialError::NotAFile { .. }),
                "{path:?}: {error}"
            );
            assert!(error.to_string().starts_with("upstream \"cloud\".cafile"));
        }
    }

    #[test]
    fn passwords_are_the_first_line_of_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = upstream("mqtt://h");
        config.username = Some("gw".into());
        for (text, expected) in [("pw\n", "pw"), ("pw\r\nrest\n", "pw"), ("p w", "p w")] {
            config.password_file = Some(write(dir.path(), "pw", text, 0o600));
            let login = load(&config).unwrap().login.unwrap();
            assert_eq!(
                (login.username.as_str(), login.password.as_str()),
                ("gw", expected)
            );
        }
        config.password_file = Some(write(dir.path(), "pw", "\nsecond line\n", 0o600));
        assert!(matches!(
            load(&config),
            Err(CredentialError::BadPassword { .. })
        ));
        config.password_file = Some(write(dir.path(), "pw", "pw\n", 0o604));
        let exposed = load(&config).unwrap_err();
        assert!(
            matches!(exposed, CredentialError::Exposed { mode: 0o604, .. }),
            "{exposed}"
        );
        config.password_file = None;
        config.password = Some("inline".into());
        assert_eq!(
            load(&config).unwrap().login.unwrap().password.as_str(),
            "inline"
        );
    }

    #[test]
    fn the_digest_follows_the_content_not_the_file_times() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = upstream("mqtt://h");
        config.username = Some("gw".into());
        config.password_file = Some(write(dir.path(), "pw", "one\n", 0o600));
        let first = load(&config).unwrap().digest;
        config.password_file = Some(write(dir.path(), "pw", "one\n", 0o600));
        assert_eq!(load(&config).unwrap().digest, first);
        config.password_file = Some(write(dir.path(), "pw", "two\n", 0o600));
        assert_ne!(load(&config).unwrap().digest, first);
    }

    #[test]
    fn certificates_near_or_past_their_end_are_warned_about() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let facts = |subject: &str, not_after| CertificateFacts {
            origin: "upstream \"cloud\".certfile (c.pem)".into(),
            subject: subject.into(),
            not_after,
        };
        let mut credentials = Credentials::none();
        credentials.client_certificate = Some(facts("CN=soon", now + 10 * day));
        credentials.ca_certificates = vec![
            facts("CN=later", now + 31 * day),
            facts("CN=gone", now - day),
        ];
        let warnings = credentials.warnings(now);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("CN=soon") && warnings[0].contains("(in 10 day(s))"),
            "{warnings:?}"
        );
        assert!(warnings[1].contains("CN=gone expired on"), "{warnings:?}");
    }

    #[test]
    fn tls_settings_need_an_mqtts_url_and_system_roots_are_found() {
        // Plain: no TLS even with system roots around.
        assert!(load(&upstream("mqtt://h")).unwrap().tls.is_none());
        // mqtts:// without cafile uses the system's CA certificates (Debian's ca-certificates
        // package, which the test command installs).
        let tls = load(&upstream("mqtts://broker.example"))
            .unwrap()
            .tls
            .unwrap();
        assert!(matches!(tls.server_name, ServerName::DnsName(_)));
        let by_ip = load(&upstream("mqtts://10.1.2.3")).unwrap().tls.unwrap();
        assert!(matches!(by_ip.server_name, ServerName::IpAddress(_)));
    }
}
