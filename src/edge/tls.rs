//! TLS on the device listeners (`[broker.tls]`): the server's certificate and key, the CA
//! certificates client certificates must chain to, their revocation lists, and what a
//! handshake tells about the device (its certificate's identity), as Mosquitto's listener
//! options of the same names do.
//!
//! Guarantees:
//! - [`load`] either returns a complete server configuration or an error that names the
//!   configuration key and the file (missing, unreadable, not PEM, no certificate, key or CRL
//!   in it, a key that does not match its certificate, a key file other users can read). It
//!   reads only regular files, at most [`MAX_FILE_BYTES`] each, and never panics.
//! - TLS 1.2 and 1.3 only, with rustls' ring provider. With `cafile`, a client certificate
//!   must chain to one of its CAs (`require_certificate`: and one must be presented); with
//!   `crlfile`, a client certificate a list revokes is refused, and so is every client
//!   certificate of a CA whose list is missing or past its nextUpdate (Mosquitto, through
//!   OpenSSL, refuses them alike). Only the client's own certificate is checked against the
//!   lists, as Mosquitto checks it.
//! - [`DeviceTls::handshake`] finishes within its deadline (`broker.connect_timeout_ms`) or
//!   fails; the CONNECT then has its own deadline of the same length. With
//!   `use_identity_as_username` it yields the certificate's first subject CN (a UTF8String,
//!   PrintableString or IA5String without NUL, not empty) or why there is none.
//! - [`watch_tls_files`] reads the files again on `SIGHUP` and when one changes on disk; a
//!   set that does not load keeps the one in use, with one warning. Every handshake uses the
//!   newest set; connections already open keep the one they started with. A new set brings a
//!   new session cache, so no session from before a reload (before a CRL was replaced, say)
//!   is resumed after it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use crate::config::BrokerTlsConfig;
use crate::pem::{self, CertificateFacts, CredentialError, KeyPairFiles};

pub use crate::pem::MAX_FILE_BYTES;

/// A certificate revocation list's facts, for warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlFacts {
    /// Which file it came from.
    pub origin: String,
    /// Its issuer, RFC 4514 style.
    pub issuer: String,
    /// When its issuer promised the next one (`None`: no date given).
    pub next_update: Option<SystemTime>,
}

/// A loaded, checked set of the device listeners' TLS files.
pub struct ServerFiles {
    /// What every new TLS connection is served with.
    pub config: Arc<rustls::ServerConfig>,
    /// The server's own certificate (the first of `certfile`).
    pub server_certificate: CertificateFacts,
    /// The certificates of `cafile`.
    pub ca_certificates: Vec<CertificateFacts>,
    /// The lists of `crlfile`.
    pub crls: Vec<CrlFacts>,
}

impl ServerFiles {
    /// Warnings, one line each: certificates (server or CA) that expired or expire within
    /// [`pem::EXPIRY_WARNING_DAYS`] days of `now`, and revocation lists past their
    /// nextUpdate (every client certificate of their CA is refused until they are renewed).
    pub fn warnings(&self, now: SystemTime) -> Vec<String> {
        let mut warnings = pem::expiry_warnings(
            std::iter::once(&self.server_certificate).chain(&self.ca_certificates),
            now,
        );
        for crl in &self.crls {
            if let Some(next) = crl.next_update.filter(|next| *next <= now) {
                warnings.push(format!(
                    "{}: the revocation list of {} was due to be renewed on {}: every client \
                     certificate of that CA is refused until a current list is in place",
                    crl.origin,
                    crl.issuer,
                    humantime::format_rfc3339_seconds(next)
                ));
            }
        }
        warnings
    }
}

/// The files a `[broker.tls]` reads, for change detection.
pub fn files(config: &BrokerTlsConfig) -> Vec<PathBuf> {
    [&config.certfile, &config.keyfile]
        .into_iter()
        .chain([&config.cafile, &config.crlfile].into_iter().flatten())
        .cloned()
        .collect()
}

/// Reads and checks the device listeners' TLS files and builds their server configuration.
/// Paths are used as they are (the configuration loader made them relative to the
/// configuration file).
pub fn load(config: &BrokerTlsConfig) -> Result<ServerFiles, CredentialError> {
    let key = |field: &str| format!("broker.tls.{field}");
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    // Read once, for the verifier and for the warnings alike.
    let (crl_ders, crls) = match &config.crlfile {
        Some(path) => revocation_lists(&key("crlfile"), path)?,
        None => (Vec::new(), Vec::new()),
    };
    let mut ca_certificates = Vec::new();
    let verifier = match &config.cafile {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(path) => {
            let field = key("cafile");
            let ca = pem::read_ca(&field, path)?;
            ca_certificates = ca.certificates;
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots), provider.clone());
            if !crl_ders.is_empty() {
                builder = builder
                    .with_crls(crl_ders)
                    // Mosquitto sets OpenSSL's X509_V_FLAG_CRL_CHECK: the client's own
                    // certificate only, not its intermediates.
                    .only_check_end_entity_revocation()
                    // rustls ignores nextUpdate by default; OpenSSL refuses a stale list.
                    .enforce_revocation_expiration();
            }
            if !config.require_certificate {
                builder = builder.allow_unauthenticated();
            }
            builder.build().map_err(|e| match e {
                rustls::server::VerifierBuilderError::InvalidCrl(problem) => {
                    CredentialError::NoCrl {
                        key: key("crlfile"),
                        path: config.crlfile.clone().unwrap_or_default(),
                        detail: format!("{problem:?}"),
                    }
                }
                other => CredentialError::NoRoots {
                    key: field.clone(),
                    detail: format!("{}: {other}", path.display()),
                },
            })?
        }
    };

    let (cert_key, key_key) = (key("certfile"), key("keyfile"));
    let files = KeyPairFiles {
        cert_key: &cert_key,
        cert_path: &config.certfile,
        key_key: &key_key,
        key_path: &config.keyfile,
    };
    let pair = files.read()?;
    let server_certificate = pair.certificate;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CredentialError::Tls {
            key: cert_key.clone(),
            detail: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pair.chain, pair.key)
        .map_err(|e| files.refusal(e))?;
    Ok(ServerFiles {
        config: Arc::new(server),
        server_certificate,
        ca_certificates,
        crls,
    })
}

/// Every PEM revocation list in a file (at least one), with its facts.
fn revocation_lists(
    key: &str,
    path: &std::path::Path,
) -> Result<(Vec<CertificateRevocationListDer<'static>>, Vec<CrlFacts>), CredentialError> {
    use x509_cert::der::Decode;
    let problem = |detail: String| CredentialError::NoCrl {
        key: key.to_string(),
        path: path.to_path_buf(),
        detail,
    };
    let bytes = pem::read_public(key, path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(pem::pem_problem(&e)))?;
    if crls.is_empty() {
        return Err(problem("no revocation list in it".to_string()));
    }
    let mut facts = Vec::new();
    for crl in &crls {
        let parsed = x509_cert::crl::CertificateList::from_der(crl.as_ref())
            .map_err(|e| problem(format!("not an X.509 revocation list: {e}")))?;
        facts.push(CrlFacts {
            origin: format!("{key} ({})", path.display()),
            issuer: parsed.tbs_cert_list.issuer.to_string(),
            next_update: parsed
                .tbs_cert_list
                .next_update
                .map(|t| std::time::UNIX_EPOCH + t.to_unix_duration()),
        });
    }
    Ok((crls, facts))
}

/// Who a device's certificate says it is, on a listener with `use_identity_as_username`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateLogin {
    /// The certificate's first subject CN: the device's username, without a password check.
    Identity(String),
    /// The certificate gives no usable username (why, in words): the CONNECT is refused with
    /// "bad username or password" (3.1.1: 4; 5: 0x86), as Mosquitto refuses it.
    NoIdentity(String),
}

/// The first subject CN of a DER certificate, as Mosquitto takes it for
/// `use_identity_as_username` (`X509_NAME_get_index_by_NID(.., NID_commonName, -1)`): a
/// UTF8String, PrintableString or IA5String; one that holds a NUL (which would cut the name
/// short in C) or is empty is refused, and so is any other string type.
pub fn common_name(der: &[u8]) -> Result<String, String> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
    use x509_cert::der::oid::db::rfc4519::CN;
    use x509_cert::der::{Decode, Tag, Tagged};
    let cert = x509_cert::Certificate::from_der(der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let value = cert
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == CN)
        .map(|attribute| &attribute.value)
        .ok_or_else(|| "the client certificate's subject has no CN".to_string())?;
    let text = match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::PrintableString => PrintableStringRef::try_from(value).ok().map(|s| s.as_str()),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok().map(|s| s.as_str()),
        _ => None,
    }
    .ok_or_else(|| {
        format!(
            "the client certificate's CN is a {}, not a UTF8String, PrintableString or IA5String",
            value.tag()
        )
    })?;
    if text.contains('\0') {
        return Err("the client certificate's CN contains a NUL character".to_string());
    }
    if text.is_empty() {
        return Err("the client certificate's CN is empty".to_string());
    }
    Ok(text.to_string())
}

/// Why a device's TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The handshake did not finish within the deadline (a client that sends nothing, or
    /// too slowly).
    #[error("no TLS handshake within {} ms (broker.connect_timeout_ms)", .0.as_millis())]
    Timeout(Duration),
    /// The client is not TLS, or its certificate was refused (unknown CA, revoked, expired,
    /// none where one is required), or the connection broke.
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
}

/// The TLS of the device listeners: where they listen, the newest server configuration, and
/// how a handshake goes. Cheap to clone.
#[derive(Clone)]
pub struct DeviceTls {
    listen: Vec<std::net::SocketAddr>,
    files: watch::Receiver<Arc<ServerFiles>>,
    use_identity_as_username: bool,
    deadline: Duration,
}

impl DeviceTls {
    /// TLS for the listeners of `config`, served with what `files` holds at each handshake;
    /// a handshake that takes longer than `deadline` fails.
    pub fn new(
        config: &BrokerTlsConfig,
        files: watch::Receiver<Arc<ServerFiles>>,
        deadline: Duration,
    ) -> DeviceTls {
        DeviceTls {
            listen: config.listen.clone(),
            files,
            use_identity_as_username: config.use_identity_as_username,
            deadline,
        }
    }

    /// The addresses of the TLS listeners.
    pub fn listen(&self) -> &[std::net::SocketAddr] {
        &self.listen
    }

    /// Runs the server side of the TLS handshake on `socket` within the deadline. Returns
    /// the stream and, with `use_identity_as_username`, who the certificate says the device
    /// is.
    pub async fn handshake(
        &self,
        socket: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Option<CertificateLogin>), HandshakeError> {
        let config = self.files.borrow().config.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = tokio::time::timeout(self.deadline, acceptor.accept(socket))
            .await
            .map_err(|_| HandshakeError::Timeout(self.deadline))?
            .map_err(HandshakeError::Tls)?;
        let login = self.use_identity_as_username.then(|| {
            // require_certificate goes with use_identity_as_username (validation), so the
            // verifier has checked the certificate; "none" cannot happen and is refused.
            let first = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first());
            match first.map(|cert| common_name(cert.as_ref())) {
                Some(Ok(name)) => CertificateLogin::Identity(name),
                Some(Err(why)) => CertificateLogin::NoIdentity(why),
                None => CertificateLogin::NoIdentity("no client certificate".to_string()),
            }
        });
        Ok((stream, login))
    }
}

/// Logs what a freshly loaded set holds, and its warnings.
fn report(files: &ServerFiles) {
    info!(
        certificate = %files.server_certificate.subject,
        expires = %humantime::format_rfc3339_seconds(files.server_certificate.not_after),
        client_cas = files.ca_certificates.len(),
        revocation_lists = files.crls.len(),
        "device TLS files loaded"
    );
    for warning in files.warnings(SystemTime::now()) {
        warn!("{warning}");
    }
}

/// Serves `initial` (read by [`load`] from `config`'s files) and reads the files again when
/// `reloads` changes (a `SIGHUP`) or one of them changes on disk; the task ends when
/// `shutdown` fires or the gateway is gone. The receiver always holds the set to serve.
pub fn watch_tls_files(
    config: BrokerTlsConfig,
    initial: ServerFiles,
    reloads: watch::Receiver<u64>,
    shutdown: crate::shutdown::Shutdown,
) -> (
    watch::Receiver<Arc<ServerFiles>>,
    tokio::task::JoinHandle<()>,
) {
    report(&initial);
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = crate::files::keep_reading(
        "device TLS files",
        files(&config),
        reloads,
        shutdown,
        move || load(&config),
        move |files| {
            report(&files);
            tx.send(Arc::new(files)).is_ok()
        },
    );
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pem::tests::write;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SerialNumber,
    };
    use rustls::pki_types::PrivateKeyDer;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        /// A leaf with this subject, serial and names; (certificate PEM, key PEM).
        fn leaf(
            &self,
            subject: &[(DnType, DnValue)],
            serial: u8,
            client: bool,
        ) -> (String, String) {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            for (kind, value) in subject {
                params.distinguished_name.push(kind.clone(), value.clone());
            }
            params.serial_number = Some(SerialNumber::from(vec![serial]));
            params.extended_key_usages = vec![if client {
                ExtendedKeyUsagePurpose::ClientAuth
            } else {
                ExtendedKeyUsagePurpose::ServerAuth
            }];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.0).unwrap();
            (cert.pem(), key.serialize_pem())
        }

        fn client(&self, cn: &str, serial: u8) -> (String, String) {
            self.leaf(
                &[(DnType::CommonName, DnValue::Utf8String(cn.into()))],
                serial,
                true,
            )
        }

        /// A revocation list revoking these serials, due `next_update_days` from now.
        fn crl(&self, serials: &[u8], next_update_days: i64) -> String {
            let now = rcgen::date_time_ymd(1970, 1, 1)
                + SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap();
            let day = Duration::from_secs(86_400);
            let (this_update, next_update) = if next_update_days > 0 {
                (now - day, now + day * next_update_days as u32)
            } else {
                (
                    now - day * 10,
                    now - day * next_update_days.unsigned_abs() as u32,
                )
            };
            CertificateRevocationListParams {
                this_update,
                next_update,
                crl_number: SerialNumber::from(vec![1]),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|s| RevokedCertParams {
                        serial_number: SerialNumber::from(vec![*s]),
                        revocation_time: this_update,
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&self.0)
            .unwrap()
            .pem()
            .unwrap()
        }
    }

    /// A server certificate of `ca` and its key in `dir`; a configuration with them.
    fn server_config(dir: &Path, ca: &Ca) -> BrokerTlsConfig {
        let (cert, key) = ca.leaf(
            &[(DnType::CommonName, DnValue::Utf8String("gateway".into()))],
            100,
            false,
        );
        BrokerTlsConfig {
            listen: vec![],
            certfile: write(dir, "server.pem", &cert, 0o644),
            keyfile: write(dir, "server.key", &key, 0o600),
            cafile: Some(write(dir, "ca.pem", &ca.0.pem(), 0o644)),
            crlfile: None,
            require_certificate: true,
            use_identity_as_username: true,
        }
    }

    /// A client of `ca`'s server, with this certificate and key (PEM), if any.
    fn client_config(ca: &Ca, identity: Option<&(String, String)>) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.0.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![
                        rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
                    ],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        }
    }

    /// One handshake between `tls` and a client with `client`; the server's result, and
    /// whether the client got through (it writes and reads a byte).
    async fn handshake(
        tls: &DeviceTls,
        client: rustls::ClientConfig,
    ) -> Result<Option<CertificateLogin>, HandshakeError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            if let Ok(mut stream) = connector.connect(name, tcp).await {
                // TLS 1.3 clients learn of a refused certificate only when they read.
                let _ = stream.write_all(b"x").await;
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
            }
        });
        let (socket, _) = listener.accept().await.unwrap();
        let result = match tls.handshake(socket).await {
            Ok((mut stream, login)) => {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                stream.write_all(b"y").await.unwrap();
                Ok(login)
            }
            Err(e) => Err(e),
        };
        client.await.unwrap();
        result
    }

    fn device_tls(config: &BrokerTlsConfig) -> DeviceTls {
        let files = load(config).unwrap();
        DeviceTls::new(
            config,
            watch::channel(Arc::new(files)).1,
            Duration::from_secs(10),
        )
    }

    #[tokio::test]
    async fn a_client_certificate_of_the_ca_gives_its_cn_as_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let config = server_config(dir.path(), &ca);
        let tls = device_tls(&config);
        let alice = ca.client("alice", 1);
        assert_eq!(
            handshake(&tls, client_config(&ca, Some(&alice)))
                .await
                .unwrap(),
            Some(CertificateLogin::Identity("alice".into()))
        );
        // Refused: no certificate, and one of another CA.
        assert!(handshake(&tls, client_config(&ca, None)).await.is_err());
        let other = Ca::new("other ca");
        let stranger = other.client("alice", 1);
        assert!(matches!(
            handshake(&tls, client_config(&ca, Some(&stranger))).await,
            Err(HandshakeError::Tls(_))
        ));
    }

    #[tokio::test]
    async fn tls_1_2_clients_are_served_too() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let tls = device_tls(&server_config(dir.path(), &ca));
        let (cert, key) = ca.client("old-firmware", 3);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.0.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            handshake(&tls, client).await.unwrap(),
            Some(CertificateLogin::Identity("old-firmware".into()))
        );
    }

    #[tokio::test]
    async fn without_require_certificate_a_client_without_one_gets_in_and_a_bad_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let config = BrokerTlsConfig {
            require_certificate: false,
            use_identity_as_username: false,
            ..server_config(dir.path(), &ca)
        };
        let tls = device_tls(&config);
        assert_eq!(
            handshake(&tls, client_config(&ca, None)).await.unwrap(),
            None
        );
        let good = ca.client("bob", 2);
        assert_eq!(
            handshake(&tls, client_config(&ca, Some(&good)))
                .await
                .unwrap(),
            None
        );
        let stranger = Ca::new("other").client("bob", 2);
        assert!(handshake(&tls, client_config(&ca, Some(&stranger)))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_refused_and_a_stale_list_refuses_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let mut config = server_config(dir.path(), &ca);
        config.crlfile = Some(write(dir.path(), "ca.crl", &ca.crl(&[7], 30), 0o644));
        let tls = device_tls(&config);
        let (kept, revoked) = (ca.client("kept", 6), ca.client("revoked", 7));
        assert!(handshake(&tls, client_config(&ca, Some(&kept)))
            .await
            .is_ok());
        assert!(handshake(&tls, client_config(&ca, Some(&revoked)))
            .await
            .is_err());

        write(dir.path(), "ca.crl", &ca.crl(&[], -1), 0o644);
        let stale = load(&config).unwrap();
        let warnings = stale.warnings(SystemTime::now());
        assert!(
            warnings.len() == 1 && warnings[0].contains("was due to be renewed"),
            "{warnings:?}"
        );
        let tls = DeviceTls::new(
            &config,
            watch::channel(Arc::new(stale)).1,
            Duration::from_secs(10),
        );
        assert!(handshake(&tls, client_config(&ca, Some(&kept)))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_handshake_that_never_starts_ends_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let config = server_config(dir.path(), &ca);
        let files = load(&config).unwrap();
        let tls = DeviceTls::new(
            &config,
            watch::channel(Arc::new(files)).1,
            Duration::from_millis(200),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _silent = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let started = tokio::time::Instant::now();
        let result = tls.handshake(socket).await;
        assert!(
            matches!(result, Err(HandshakeError::Timeout(_))),
            "{:?}",
            result.err()
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn the_identity_is_the_first_cn_as_text_without_nul() {
        let ca = Ca::new("ca");
        let der = |subject: &[(DnType, DnValue)]| {
            let (pem, _) = ca.leaf(subject, 1, true);
            rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        let cn = |v: DnValue| (DnType::CommonName, v);
        let org = (DnType::OrganizationName, DnValue::Utf8String("Org".into()));
        assert_eq!(
            common_name(&der(&[
                org.clone(),
                cn(DnValue::Utf8String("alice".into()))
            ])),
            Ok("alice".into())
        );
        assert_eq!(
            common_name(&der(&[cn(DnValue::PrintableString(
                "printable".try_into().unwrap()
            ))])),
            Ok("printable".into())
        );
        assert_eq!(
            common_name(&der(&[cn(DnValue::Ia5String("ia5".try_into().unwrap()))])),
            Ok("ia5".into())
        );
        // rcgen keeps one value per attribute type, so "the first CN" is the only one here;
        // x509-cert's walk goes in DER order either way.
        assert!(common_name(&der(std::slice::from_ref(&org)))
            .unwrap_err()
            .contains("no CN"));
        assert!(common_name(&der(&[cn(DnValue::Utf8String("a\0b".into()))]))
            .unwrap_err()
            .contains("NUL"));
        assert!(
            common_name(&der(&[cn(DnValue::BmpString("bmp".try_into().unwrap()))]))
                .unwrap_err()
                .contains("not a UTF8String")
        );
        assert!(common_name(b"not a certificate").is_err());
    }

    #[test]
    fn every_bad_file_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca");
        let good = server_config(dir.path(), &ca);
        assert!(load(&good).is_ok());
        let error = |config: &BrokerTlsConfig| load(config).err().unwrap().to_string();

        let mut config = good.clone();
        config.certfile = dir.path().join("missing.pem");
        let e = error(&config);
        assert!(
            e.starts_with("broker.tls.certfile") && e.contains("missing.pem"),
            "{e}"
        );

        write(
            dir.path(),
            "server.key",
            &std::fs::read_to_string(&good.keyfile).unwrap(),
            0o640,
        );
        let e = error(&good);
        assert!(
            e.starts_with("broker.tls.keyfile") && e.contains("mode 640"),
            "{e}"
        );
        let (_, other_key) = ca.client("x", 9);
        write(dir.path(), "server.key", &other_key, 0o600);
        let e = error(&good);
        assert!(
            e.starts_with("broker.tls.keyfile") && e.contains("does not match"),
            "{e}"
        );
        write(dir.path(), "server.key", "garbage", 0o600);
        assert!(error(&good).starts_with("broker.tls.keyfile"));

        let mut config = server_config(dir.path(), &ca);
        config.cafile = Some(write(dir.path(), "bad-ca.pem", "garbage", 0o644));
        let e = error(&config);
        assert!(
            e.starts_with("broker.tls.cafile") && e.contains("bad-ca.pem"),
            "{e}"
        );

        let mut config = server_config(dir.path(), &ca);
        config.crlfile = Some(write(dir.path(), "bad.crl", "garbage", 0o644));
        let e = error(&config);
        assert!(
            e.starts_with("broker.tls.crlfile") && e.contains("bad.crl"),
            "{e}"
        );
        config.crlfile = Some(write(
            dir.path(),
            "bad.crl",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
            0o644,
        ));
        let e = error(&config);
        assert!(e.starts_with("broker.tls.crlfile"), "{e}");
        config.crlfile = Some(dir.path().join("missing.crl"));
        let e = error(&config);
        assert!(
            e.starts_with("broker.tls.crlfile") && e.contains("missing.crl"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_reload_serves_the_new_files_to_the_next_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("device ca");
        let mut config = server_config(dir.path(), &ca);
        config.crlfile = Some(write(dir.path(), "ca.crl", &ca.crl(&[], 30), 0o644));
        let (reload_tx, reload_rx) = watch::channel(0u64);
        let stop = crate::shutdown::Trigger::new();
        let stop_rx = stop.subscribe();
        let (mut files, task) =
            watch_tls_files(config.clone(), load(&config).unwrap(), reload_rx, stop_rx);
        let tls = DeviceTls::new(&config, files.clone(), Duration::from_secs(10));
        let device = ca.client("d", 5);
        assert!(handshake(&tls, client_config(&ca, Some(&device)))
            .await
            .is_ok());

        // A list revoking the device (that garbage keeps the old list is tests/device_tls.rs'
        // to show: only the log tells).
        write(dir.path(), "ca.crl", &ca.crl(&[5], 30), 0o644);
        reload_tx.send_modify(|n| *n += 1);
        tokio::time::timeout(Duration::from_secs(30), files.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(files.borrow_and_update().crls.len(), 1);
        assert!(handshake(&tls, client_config(&ca, Some(&device)))
            .await
            .is_err());
        task.abort();
    }
}
