//! Who is on the other end of a mutual-TLS connection, read once per connection.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names a verified client certificate carries: its subject CN and its DNS, URI and e-mail
/// SANs; and the certificate itself (chain as presented, fingerprint, expiry), so a vendor can
/// be bound to its own CA, a pinned certificate, and revoked. Inserted into every request of
/// the connection; authorization matches against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Arc<[String]>,
    /// SHA-256 of the end-entity certificate.
    pub fingerprint: crate::revocations::Fingerprint,
    /// The end-entity certificate first, then the intermediates the client sent.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// When the certificate expires (Unix seconds).
    pub not_after: i64,
}

impl PeerIdentity {
    /// Reads the client's chain as presented (the end-entity certificate first).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let cert = chain.first()?;
        let (_, x509) = X509Certificate::from_der(cert.as_ref()).ok()?;
        let mut names = Vec::new();
        for cn in x509.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_owned());
            }
        }
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                        names.push((*s).to_owned())
                    }
                    _ => {}
                }
            }
        }
        Some(Self {
            names: names.into(),
            fingerprint: crate::revocations::fingerprint(cert.as_ref()),
            not_after: x509.validity().not_after.timestamp(),
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
        })
    }

    /// An identity with `names` and no certificate behind it, for tests and benchmarks of
    /// what the names allow.
    pub fn named(names: &[&str]) -> Self {
        Self {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            fingerprint: crate::revocations::fingerprint(names.join(",").as_bytes()),
            chain: Arc::new([]),
            not_after: i64::MAX,
        }
    }

    pub fn matches(&self, identity: &str) -> bool {
        self.names.iter().any(|n| n == identity)
    }

    /// A short label for logs: the first name (a vendor's CN, not patient data).
    pub fn label(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("?")
    }
}
