//! What an uplink proves itself with: the TLS settings of an `mqtts://` upstream (the CA
//! certificates its certificate must chain to, this gateway's client certificate and key, the
//! ALPN protocols) and the MQTT user name and password, read from their files and checked.
//!
//! Guarantees:
//! - [`load`] either returns a complete, consistent set or an error that names the
//!   configuration key, the file and what is wrong with it (missing, unreadable, not PEM, no
//!   certificate or key in it, a key that does not match its certificate, a secret other users
//!   can read). It never panics and reads at most [`MAX_FILE_BYTES`] of a file, and only
//!   regular files (a FIFO or a device named by mistake is refused, not read forever): the
//!   files are read by [`crate::pem`], as the device listeners' are.
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
use std::time::SystemTime;

use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::client::{Login, TlsConnect};
use crate::config::{parse_broker_url, UpstreamConfig};
use crate::pem::{self, CertificateFacts, CredentialError, KeyPairFiles};
#[cfg(doc)]
use crate::pem::{EXPIRY_WARNING_DAYS, MAX_FILE_BYTES};

/// Where Debian (and Raspberry Pi OS) keep the system's CA certificates, one PEM bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

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
        pem::expiry_warnings(
            self.client_certificate.iter().chain(&self.ca_certificates),
            now,
        )
    }
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
    let login = login(config, key, &mut digest)?;

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
    let (roots, ca_certificates) = roots(config, key, &mut digest)?;
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
            let (cert_key, key_key) = (key("certfile"), key("keyfile"));
            let files = KeyPairFiles {
                cert_key: &cert_key,
                cert_path,
                key_key: &key_key,
                key_path,
            };
            let pair = files.read()?;
            digest.update(cert_path.as_os_str().as_encoded_bytes());
            digest.update(&pair.cert_bytes);
            digest.update(key_path.as_os_str().as_encoded_bytes());
            digest.update(&*pair.key_bytes);
            client_certificate = Some(pair.certificate);
            builder
                .with_client_auth_cert(pair.chain, pair.key)
                .map_err(|e| files.refusal(e))?
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

/// The login of `config`, if it has a user name: the password inline, from its file (added to
/// `digest`), or empty.
fn login(
    config: &UpstreamConfig,
    key: &dyn Fn(&str) -> String,
    digest: &mut Sha256,
) -> Result<Option<Login>, CredentialError> {
    let Some(username) = &config.username else {
        return Ok(None);
    };
    let password = match (&config.password, &config.password_file) {
        (Some(p), _) => Zeroizing::new(p.expose().to_string()),
        (None, Some(path)) => {
            let field = key("password_file");
            let bytes = pem::read_secret(&field, path)?;
            digest.update(path.as_os_str().as_encoded_bytes());
            digest.update(&*bytes);
            password_text(&field, path, &bytes)?
        }
        (None, None) => Zeroizing::new(String::new()),
    };
    Ok(Some(Login {
        username: username.clone(),
        password,
    }))
}

/// The CA certificates an upstream's certificate must chain to: `cafile`'s (added to
/// `digest`, with their facts), or else the system's.
fn roots(
    config: &UpstreamConfig,
    key: &dyn Fn(&str) -> String,
    digest: &mut Sha256,
) -> Result<(rustls::RootCertStore, Vec<CertificateFacts>), CredentialError> {
    if let Some(path) = &config.cafile {
        let ca = pem::read_ca(&key("cafile"), path)?;
        digest.update(path.as_os_str().as_encoded_bytes());
        digest.update(&ca.bytes);
        return Ok((ca.roots, ca.certificates));
    }
    let mut roots = rustls::RootCertStore::empty();
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
    Ok((roots, Vec::new()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pem::tests::write;
    use std::time::Duration;

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
