//! rustls configurations for the two mutual-TLS edges: vendors -> gateway, gateway -> EHR.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{0}: no usable CA certificate")]
    NoRoots(PathBuf),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

pub fn load_roots(paths: &[PathBuf]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let (added, _ignored) = roots.add_parsable_certificates(load_certs(path)?);
        if added == 0 {
            return Err(TlsError::NoRoots(path.clone()));
        }
    }
    Ok(roots)
}

/// Certificate revocation lists, PEM (`X509 CRL` blocks) or DER, one or more per file.
pub fn load_crls(
    paths: &[PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut crls = Vec::new();
    for path in paths {
        let pem_err = |reason: String| TlsError::Pem {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| pem_err(e.to_string()))?;
        let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        if pem.is_empty() {
            // Not PEM: a DER CRL starts with a SEQUENCE.
            if bytes.first() != Some(&0x30) {
                return Err(pem_err("no X509 CRL block and not a DER CRL".into()));
            }
            crls.push(CertificateRevocationListDer::from(bytes));
        } else {
            crls.extend(pem);
        }
    }
    Ok(crls)
}

/// Accepts client certificates that chain to `cas` and are on none of `crls` (an unknown
/// issuer, an expired or a revoked certificate is refused). A CA without a list among `crls`
/// is not checked for revocations (lists are configured per CA, not for all of them).
pub fn client_verifier(
    cas: &[PathBuf],
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    Ok(WebPkiClientVerifier::builder(Arc::new(load_roots(cas)?))
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .build()?)
}

/// The admin listener: as [`server_config`], but with console users configured a browser
/// without a client certificate finishes the handshake too (and must then sign in). A
/// certificate that is presented is still checked, and a bad one still fails the handshake.
pub fn admin_server_config(
    cert: &Path,
    key: &Path,
    client_cas: &[PathBuf],
    crls: &[CertificateRevocationListDer<'static>],
    console: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    if !console {
        return server_config(cert, key, client_cas, crls);
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(client_cas)?))
        .with_crls(crls.iter().cloned())
        .allow_unknown_revocation_status()
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server side: a client certificate chained to one of `client_cas` and on none of `crls` is
/// required; no certificate, an unknown issuer, an expired or a revoked certificate fails the
/// handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_cas: &[PathBuf],
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = client_verifier(client_cas, crls)?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client side: the peer's certificate must chain to `server_cas` (no system roots: an EHR is
/// on the hospital's PKI), and we present our own certificate when one is given (an EHR that
/// takes only bearer tokens gets none).
pub fn client_config(
    server_cas: &[PathBuf],
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder().with_root_certificates(load_roots(server_cas)?);
    Ok(match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}
