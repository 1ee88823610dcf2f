//! Client identity: the verified certificate's names (put on the request by the accept loop)
//! become the configured vendor, or the request is refused with 403.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use rustls::pki_types::{CertificateRevocationListDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::config::VendorSettings;
use crate::outcome::{ApiError, Issue};
use crate::peer::PeerIdentity;
use crate::revocations::{Fingerprint, RevokedCertificates};
use crate::tls::TlsError;

/// What one vendor may do: post for these serials, or for any device of these models.
#[derive(Debug, Clone)]
pub struct VendorPolicy {
    pub name: String,
    /// The certificate identity that names this vendor, for Provenance.
    pub identity: String,
    serials: HashSet<String>,
    /// Lower-cased, as model names differ in case between consoles and configs.
    models: HashSet<String>,
}

impl VendorPolicy {
    pub fn may_post_for(&self, serial: &str, model: &str) -> bool {
        self.serials.contains(serial) || self.models.contains(&model.to_ascii_lowercase())
    }

    /// A vendor of `models`, for unit tests of what vendors may do.
    #[cfg(test)]
    pub fn of_models(name: &str, models: &[&str]) -> Self {
        Self {
            name: name.into(),
            identity: name.into(),
            serials: HashSet::new(),
            models: models.iter().map(|m| m.to_ascii_lowercase()).collect(),
        }
    }
}

/// How a vendor's certificate is checked beyond its name.
struct VendorTrust {
    policy: Arc<VendorPolicy>,
    /// Its own CA(s), when bound to them.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The only certificates it may use, when pinned.
    pins: HashSet<Fingerprint>,
}

/// Why a trusted certificate is not a vendor (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAVendor {
    #[error(
        "the client certificate '{0}' is trusted but not configured as a vendor of this gateway"
    )]
    Unknown(String),
    #[error("the client certificate has been revoked by the gateway's operators")]
    Revoked,
    #[error("the client certificate names vendor '{0}' but is not issued by that vendor's CA")]
    WrongCa(String),
    #[error(
        "the client certificate names vendor '{0}' but is not one of the certificates pinned for it"
    )]
    NotPinned(String),
}

/// Certificates checked against their vendor's CA, by fingerprint, so the chain is verified
/// once per certificate rather than per request. At most this many are remembered.
const CHECKED_MAX: usize = 4096;

/// A certificate expiring sooner than this is warned about when first seen.
const EXPIRY_WARNING: i64 = 30 * 24 * 3600;

/// All vendors by certificate identity. Built once; shared by every connection.
#[derive(Clone)]
pub struct Vendors {
    by_identity: Arc<HashMap<String, Arc<VendorTrust>>>,
    /// Fingerprint -> whether it chains to its vendor's CA.
    checked: Arc<Mutex<HashMap<Fingerprint, bool>>>,
    revoked: Option<Arc<RevokedCertificates>>,
}

impl Vendors {
    /// Vendors as configured; each one's CA checked against `crls` too. `revoked` are refused
    /// whatever else they are.
    pub fn new(
        settings: &[VendorSettings],
        crls: &[CertificateRevocationListDer<'static>],
        revoked: Option<Arc<RevokedCertificates>>,
    ) -> Result<Self, TlsError> {
        let mut by_identity = HashMap::new();
        for v in settings {
            let policy = Arc::new(VendorPolicy {
                name: v.name.clone(),
                identity: v.identity.clone(),
                serials: v.serials.iter().cloned().collect(),
                models: v.models.iter().map(|m| m.to_ascii_lowercase()).collect(),
            });
            let verifier = if v.ca.is_empty() {
                None
            } else {
                Some(crate::tls::client_verifier(&v.ca, crls)?)
            };
            let pins = v
                .fingerprints
                .iter()
                .filter_map(|f| crate::revocations::parse_fingerprint(f))
                .collect();
            by_identity.insert(
                v.identity.clone(),
                Arc::new(VendorTrust {
                    policy,
                    verifier,
                    pins,
                }),
            );
        }
        Ok(Self {
            by_identity: Arc::new(by_identity),
            checked: Arc::default(),
            revoked,
        })
    }

    pub fn for_peer(&self, peer: &PeerIdentity) -> Result<Arc<VendorPolicy>, NotAVendor> {
        if self
            .revoked
            .as_ref()
            .is_some_and(|r| r.is_revoked(&peer.fingerprint))
        {
            return Err(NotAVendor::Revoked);
        }
        let trust = peer
            .names
            .iter()
            .find_map(|name| self.by_identity.get(name))
            .ok_or_else(|| NotAVendor::Unknown(peer.label().to_owned()))?;
        let vendor = &trust.policy.name;
        if !trust.pins.is_empty() && !trust.pins.contains(&peer.fingerprint) {
            return Err(NotAVendor::NotPinned(vendor.clone()));
        }
        if let Some(verifier) = &trust.verifier
            && !self.chains_to(verifier.as_ref(), peer, vendor)
        {
            return Err(NotAVendor::WrongCa(vendor.clone()));
        }
        Ok(trust.policy.clone())
    }

    /// The vendor configured as `name` (for listeners whose connections carry no certificate,
    /// such as plain MLLP on a closed device network).
    pub fn by_name(&self, name: &str) -> Option<Arc<VendorPolicy>> {
        self.by_identity
            .values()
            .find(|trust| trust.policy.name == name)
            .map(|trust| trust.policy.clone())
    }

    /// Whether `peer`'s chain verifies against the vendor's own CA (remembered).
    fn chains_to(
        &self,
        verifier: &dyn ClientCertVerifier,
        peer: &PeerIdentity,
        vendor: &str,
    ) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ok) = checked.get(&peer.fingerprint) {
            return *ok;
        }
        let ok = peer
            .chain
            .split_first()
            .is_some_and(|(end_entity, intermediates)| {
                verifier
                    .verify_client_cert(end_entity, intermediates, UnixTime::now())
                    .is_ok()
            });
        if checked.len() >= CHECKED_MAX {
            checked.clear();
        }
        checked.insert(peer.fingerprint, ok);
        let left = peer.not_after - UnixTime::now().as_secs() as i64;
        if ok && left < EXPIRY_WARNING {
            tracing::warn!(
                vendor,
                days_left = left / 86_400,
                "a vendor's client certificate expires soon"
            );
        }
        ok
    }
}

/// The vendor list as it is now: swapped whole when the configuration is reloaded.
pub type LiveVendors = Arc<arc_swap::ArcSwap<Vendors>>;

impl From<Vendors> for LiveVendors {
    fn from(vendors: Vendors) -> Self {
        Arc::new(arc_swap::ArcSwap::from_pointee(vendors))
    }
}

/// Inserts the request's `Arc<VendorPolicy>`; refuses certificates that name no vendor.
#[derive(Clone)]
pub struct ClientIdentity {
    vendors: LiveVendors,
}

pub fn layer(vendors: LiveVendors) -> FilterLayer<ClientIdentity> {
    FilterLayer::new(ClientIdentity { vendors })
}

impl<B> Predicate<Request<B>> for ClientIdentity {
    type Request = Request<B>;

    fn check(&mut self, mut request: Request<B>) -> Result<Request<B>, BoxError> {
        let Some(peer) = request.extensions().get::<PeerIdentity>() else {
            return Err(forbidden(NotAVendor::Unknown("(none)".into())));
        };
        match self.vendors.load().for_peer(peer) {
            Ok(vendor) => {
                request.extensions_mut().insert(vendor);
                Ok(request)
            }
            Err(refused) => {
                tracing::info!(certificate = %peer.label(), reason = %refused, "certificate refused as a vendor");
                Err(forbidden(refused))
            }
        }
    }
}

fn forbidden(refused: NotAVendor) -> BoxError {
    ApiError::one(
        StatusCode::FORBIDDEN,
        Issue::error("security", refused.to_string()),
    )
    .into()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn vendors() -> Vendors {
        Vendors::new(
            &[VendorSettings {
                name: "getinge".into(),
                identity: "getinge".into(),
                serials: vec!["CH-1".into()],
                models: vec!["CARDIOHELP-i".into()],
                ..VendorSettings::default()
            }],
            &[],
            None,
        )
        .unwrap()
    }

    #[test]
    fn known_certificate_becomes_its_vendor() {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(PeerIdentity::named(&["getinge"]));
        let request = ClientIdentity {
            vendors: vendors().into(),
        }
        .check(request)
        .unwrap();
        let vendor = request.extensions().get::<Arc<VendorPolicy>>().unwrap();
        assert_eq!(vendor.name, "getinge");
        assert!(vendor.may_post_for("CH-1", "other"));
        assert!(vendor.may_post_for("CH-9", "cardiohelp-I"));
        assert!(!vendor.may_post_for("CH-9", "M4"));
    }

    /// A real chain: `cn` issued by `ca`, as the accept loop reads it.
    fn peer_of(ca: &crate::certs::TestCa, cn: &str) -> PeerIdentity {
        let leaf = ca
            .issue(&crate::certs::LeafSpec::new(
                cn,
                crate::certs::Usage::Client,
            ))
            .unwrap();
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        PeerIdentity::from_chain(&[der]).unwrap()
    }

    /// Bound to its CA, pinned, revoked: each refusal is its own, and a good certificate
    /// passes all three checks.
    #[test]
    fn a_vendor_is_bound_to_its_ca_its_pins_and_not_revoked() {
        crate::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let own = crate::certs::TestCa::new("Getinge CA").unwrap();
        let other = crate::certs::TestCa::new("Spectrum CA").unwrap();
        let own_pem = dir.path().join("own.pem");
        std::fs::write(&own_pem, &own.cert_pem).unwrap();
        let good = peer_of(&own, "getinge");
        let second = peer_of(&own, "getinge");
        let impostor = peer_of(&other, "getinge");
        let revoked = Arc::new(RevokedCertificates::open(&dir.path().join("r.json")).unwrap());
        let settings = |fingerprints: Vec<String>| VendorSettings {
            name: "getinge".into(),
            identity: "getinge".into(),
            models: vec!["CARDIOHELP-i".into()],
            ca: vec![own_pem.clone()],
            fingerprints,
            ..VendorSettings::default()
        };
        let bound = Vendors::new(&[settings(vec![])], &[], Some(revoked.clone())).unwrap();
        assert!(bound.for_peer(&good).is_ok());
        assert!(bound.for_peer(&second).is_ok());
        assert_eq!(
            bound.for_peer(&impostor).unwrap_err(),
            NotAVendor::WrongCa("getinge".into())
        );
        // The answer is remembered per certificate, and stays the same.
        assert!(bound.for_peer(&good).is_ok());
        assert!(bound.for_peer(&impostor).is_err());

        let pinned = Vendors::new(
            &[settings(vec![crate::revocations::hex(&good.fingerprint)])],
            &[],
            None,
        )
        .unwrap();
        assert!(pinned.for_peer(&good).is_ok());
        assert_eq!(
            pinned.for_peer(&second).unwrap_err(),
            NotAVendor::NotPinned("getinge".into())
        );

        revoked.revoke(good.fingerprint, "lost", "ops").unwrap();
        assert_eq!(bound.for_peer(&good).unwrap_err(), NotAVendor::Revoked);
        assert!(bound.for_peer(&second).is_ok());
    }

    #[test]
    fn unknown_certificate_is_forbidden() {
        let mut request = Request::new(());
        request
            .extensions_mut()
            .insert(PeerIdentity::named(&["someone-else"]));
        let error = ClientIdentity {
            vendors: vendors().into(),
        }
        .check(request)
        .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::FORBIDDEN);
        assert!(api.issues[0].details.contains("someone-else"));
    }
}
