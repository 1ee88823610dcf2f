//! Who is on the other end of a mutual-TLS connection, read once per connection.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names a verified client certificate carries: its subject CN and its DNS, URI and e-mail
/// SANs. Inserted into every request of the connection; authorization matches against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Arc<[String]>,
}

impl PeerIdentity {
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<Self> {
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
        })
    }

    pub fn matches(&self, identity: &str) -> bool {
        self.names.iter().any(|n| n == identity)
    }

    /// A short label for logs: the first name (a vendor's CN, not patient data).
    pub fn label(&self) -> &str {
        self.names.first().map(String::as_str).unwrap_or("?")
    }
}
