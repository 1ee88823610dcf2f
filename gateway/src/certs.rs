//! A test PKI made with rcgen, for development, demos and the conformance suite.
//!
//! Production uses the hospital's PKI instead (see certs/README.md): nothing here is needed to
//! run the gateway, and the keys it writes are never committed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A leaf certificate to issue.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    /// DNS names and IP addresses for the SAN extension.
    pub subject_alt_names: Vec<String>,
    pub usage: Usage,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// Valid from yesterday for 90 days.
    pub fn new(common_name: &str, usage: Usage) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            subject_alt_names: Vec::new(),
            usage,
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(90),
        }
    }

    /// A server certificate for this machine: localhost, 127.0.0.1 and ::1.
    pub fn localhost_server() -> Self {
        let mut spec = Self::new("localhost", Usage::Server);
        spec.subject_alt_names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        spec
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial number, for a revocation list.
    pub serial: Vec<u8>,
}

/// A certificate authority held in memory, able to issue leaves.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(&spec.common_name);
        for san in &spec.subject_alt_names {
            params.subject_alt_names.push(match san.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(san.clone().try_into()?),
            });
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match spec.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        // Positive (first bit clear), 16 random bytes, as RFC 5280 asks.
        let mut serial: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A revocation list (PEM) of this CA naming `serials`, valid for a week.
    pub fn crl(&self, serials: &[&[u8]]) -> Result<String, CertsError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "ECMO gateway test PKI");
    dn
}

/// The identity (CN) of the test admin certificate, `admin.pem`.
pub const ADMIN_IDENTITY: &str = "ops-admin";

/// The certificates `gateway certs init` writes, by role.
pub const VENDORS: &[(&str, &str)] = &[
    ("getinge", "vendor-getinge"),
    ("spectrum-medical", "vendor-spectrum"),
    ("device-integration", "vendor-integration"),
];

/// Writes a complete test PKI into `dir`: `ca.pem` (+ `ca.key`), `server.pem` for localhost
/// (used by the gateway and by the reference EHR), `gateway-client.pem` (the gateway towards
/// EHRs, CN `ecmo-gateway`), `admin.pem` (CN [`ADMIN_IDENTITY`]) and one client certificate
/// per vendor in [`VENDORS`].
/// Returns the files written.
pub fn init_dir(dir: &Path) -> Result<Vec<PathBuf>, CertsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CertsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca = TestCa::new("ECMO gateway test CA")?;
    let mut written = Vec::new();
    let mut write = |stem: &str, cert_pem: &str, key_pem: &str| -> Result<(), CertsError> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, cert_pem).map_err(io(&cert))?;
        write_private(&key, key_pem).map_err(io(&key))?;
        written.extend([cert, key]);
        Ok(())
    };
    write("ca", &ca.cert_pem, &ca.key_pem)?;
    let server = ca.issue(&LeafSpec::localhost_server())?;
    write("server", &server.cert_pem, &server.key_pem)?;
    let client = ca.issue(&LeafSpec::new("ecmo-gateway", Usage::Client))?;
    write("gateway-client", &client.cert_pem, &client.key_pem)?;
    let admin = ca.issue(&LeafSpec::new(ADMIN_IDENTITY, Usage::Client))?;
    write("admin", &admin.cert_pem, &admin.key_pem)?;
    for (identity, stem) in VENDORS {
        let vendor = ca.issue(&LeafSpec::new(identity, Usage::Client))?;
        write(stem, &vendor.cert_pem, &vendor.key_pem)?;
    }
    let smart = dir.join(SMART_KEY);
    write_private(&smart, &smart_signing_key()?).map_err(io(&smart))?;
    written.push(smart);
    Ok(written)
}

/// The gateway's SMART Backend Services signing key in a test PKI directory.
pub const SMART_KEY: &str = "gateway-smart.key";

/// A new SMART client-assertion signing key: EC P-384 (ES384), PKCS#8 PEM.
pub fn smart_signing_key() -> Result<String, CertsError> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?.serialize_pem())
}

/// Private keys are readable by their owner only.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_loadable_pki() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let files = init_dir(dir.path()).unwrap();
        assert_eq!(files.len(), 2 * (4 + VENDORS.len()) + 1);
        crate::delivery::smart::keys::SigningKey::load(&dir.path().join(SMART_KEY)).unwrap();
        let d = dir.path();
        crate::tls::server_config(
            &d.join("server.pem"),
            &d.join("server.key"),
            &[d.join("ca.pem")],
            &[],
        )
        .unwrap();
        crate::tls::client_config(
            &[d.join("ca.pem")],
            Some((&d.join("gateway-client.pem"), &d.join("gateway-client.key"))),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "keys must not be group or world readable");
        }
        let cert = crate::tls::load_certs(&d.join("vendor-getinge.pem")).unwrap();
        let peer = crate::peer::PeerIdentity::from_chain(&cert).unwrap();
        assert!(peer.matches("getinge"));
    }
}
