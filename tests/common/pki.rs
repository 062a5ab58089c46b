//! Certificates for the TLS tests, made with rcgen: certificate authorities, server and
//! client certificates valid, expired or not yet valid; files written as a rotation tool
//! would; Mosquitto TLS listener configuration.

#![allow(dead_code)]

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};

/// A serial number not given before in this process (a CRL names certificates by serial).
fn next_serial() -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let bytes = n.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(7);
    bytes[first..].to_vec()
}

/// A certificate authority made for one test.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Validity::Valid.apply(&mut params);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server (`client == false`) or client certificate for `names` (DNS names or IP
    /// addresses), with the subject CN `cn`.
    pub fn leaf(&self, cn: &str, names: &[&str], client: bool, validity: Validity) -> Leaf {
        self.leaf_with_subject(&[(DnType::CommonName, cn)], names, client, validity)
    }

    /// A client certificate whose subject has no CN (only an organisation).
    pub fn leaf_without_cn(&self) -> Leaf {
        self.leaf_with_subject(
            &[(DnType::OrganizationName, "no common name")],
            &[],
            true,
            Validity::Valid,
        )
    }

    fn leaf_with_subject(
        &self,
        subject: &[(DnType, &str)],
        names: &[&str],
        client: bool,
        validity: Validity,
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from(serial.clone()));
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity.apply(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            serial,
        }
    }

    /// A certificate revocation list (PEM) revoking `revoked`, current for a week.
    pub fn crl(&self, revoked: &[&Leaf]) -> String {
        let day = Duration::from_secs(86_400);
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
        CertificateRevocationListParams {
            this_update: now - day,
            next_update: now + 7 * day,
            crl_number: SerialNumber::from(next_serial()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|leaf| RevokedCertParams {
                    serial_number: SerialNumber::from(leaf.serial.clone()),
                    revocation_time: now - day,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// How long since the Unix epoch (rcgen's dates are the epoch plus this).
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
}

/// When a certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    Valid,
    Expired,
    NotYetValid,
    /// Valid for 10 more days (close enough to its end for a warning).
    ExpiresSoon,
}

impl Validity {
    /// Sets `params`' notBefore and notAfter.
    pub fn apply(self, params: &mut CertificateParams) {
        let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch();
        let day = Duration::from_secs(86_400);
        let (not_before, not_after) = match self {
            Validity::Valid => (now - day, now + 365 * day),
            Validity::Expired => (now - 30 * day, now - day),
            Validity::NotYetValid => (now + day, now + 30 * day),
            Validity::ExpiresSoon => (now - day, now + 10 * day),
        };
        params.not_before = not_before;
        params.not_after = not_after;
    }
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    /// Its serial number (big-endian), for revocation lists.
    pub serial: Vec<u8>,
}

/// Writes `text` to `path` with `mode`, replacing the file atomically (as a rotation tool
/// would: a reader sees the old file or the new one, never half of one).
pub fn write_file(path: &Path, text: &str, mode: u32) {
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file.sync_all().unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// Writes a leaf's certificate and key as `<name>.pem` and `<name>.key` (mode 0600).
pub fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) {
    write_file(&dir.join(format!("{name}.pem")), &leaf.cert, 0o644);
    write_file(&dir.join(format!("{name}.key")), &leaf.key, 0o600);
}

/// For the tests of the gateway's TLS listener: a CA `ca_name` as `ca.pem` in `dir`, the
/// gateway's server certificate for localhost and 127.0.0.1 as `server.pem`/`server.key`, and
/// client certificates `alice` and `bob` (their CNs) of that CA. Returns the CA.
pub fn listener_pki(dir: &Path, ca_name: &str) -> Ca {
    let ca = Ca::new(ca_name);
    write_file(&dir.join("ca.pem"), &ca.pem(), 0o644);
    let server = ca.leaf(
        "gateway",
        &["localhost", "127.0.0.1"],
        false,
        Validity::Valid,
    );
    write_leaf(dir, "server", &server);
    for name in ["alice", "bob"] {
        write_leaf(dir, name, &ca.leaf(name, &[], true, Validity::Valid));
    }
    ca
}

// ---------------------------------------------------------------------------------------------
// Peers

/// Mosquitto configuration of a TLS listener on `port` with the server certificate
/// `server.pem`/`server.key` of `dir`, trusting `ca.pem` for client certificates; with
/// `require_certificate`, clients must present one (its CN is their user name), else they
/// need a user of `passwords`.
pub fn tls_listener(port: u16, dir: &Path, require_certificate: bool) -> String {
    let d = dir.display();
    let mut conf = format!(
        "listener {port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n"
    );
    if require_certificate {
        conf.push_str(
            "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n",
        );
    } else {
        conf.push_str(&format!(
            "allow_anonymous false\npassword_file {d}/passwords\n"
        ));
    }
    conf
}
