//! rustls configurations for the two mutual-TLS edges: vendors -> gateway, gateway -> EHR.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
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

/// Server side: a client certificate chained to one of `client_cas` is required; no
/// certificate, an unknown issuer or an expired certificate fails the handshake.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_cas: &[PathBuf],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(client_cas)?)).build()?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client side: the peer's certificate must chain to `server_cas` (no system roots: an EHR is
/// on the hospital's PKI), and we present our own certificate.
pub fn client_config(
    server_cas: &[PathBuf],
    cert: &Path,
    key: &Path,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder()
        .with_root_certificates(load_roots(server_cas)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)?)
}
