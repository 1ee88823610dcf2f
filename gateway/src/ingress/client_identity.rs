//! Client identity: the verified certificate's names (put on the request by the accept loop)
//! become the configured vendor, or the request is refused with 403.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::{Request, StatusCode};
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::config::VendorSettings;
use crate::outcome::{ApiError, Issue};
use crate::peer::PeerIdentity;

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

/// All vendors by certificate identity. Built once; shared by every connection.
#[derive(Debug, Clone)]
pub struct Vendors {
    by_identity: Arc<HashMap<String, Arc<VendorPolicy>>>,
}

impl Vendors {
    pub fn new(settings: &[VendorSettings]) -> Self {
        let by_identity = settings
            .iter()
            .map(|v| {
                let policy = VendorPolicy {
                    name: v.name.clone(),
                    identity: v.identity.clone(),
                    serials: v.serials.iter().cloned().collect(),
                    models: v.models.iter().map(|m| m.to_ascii_lowercase()).collect(),
                };
                (v.identity.clone(), Arc::new(policy))
            })
            .collect();
        Self {
            by_identity: Arc::new(by_identity),
        }
    }

    pub fn for_peer(&self, peer: &PeerIdentity) -> Option<Arc<VendorPolicy>> {
        peer.names
            .iter()
            .find_map(|name| self.by_identity.get(name))
            .cloned()
    }
}

/// Inserts the request's `Arc<VendorPolicy>`; refuses certificates that name no vendor.
#[derive(Clone)]
pub struct ClientIdentity {
    vendors: Vendors,
}

pub fn layer(vendors: Vendors) -> FilterLayer<ClientIdentity> {
    FilterLayer::new(ClientIdentity { vendors })
}

impl<B> Predicate<Request<B>> for ClientIdentity {
    type Request = Request<B>;

    fn check(&mut self, mut request: Request<B>) -> Result<Request<B>, BoxError> {
        let peer = request.extensions().get::<PeerIdentity>();
        let vendor = peer.and_then(|peer| self.vendors.for_peer(peer));
        match vendor {
            Some(vendor) => {
                request.extensions_mut().insert(vendor);
                Ok(request)
            }
            None => {
                let label = peer.map(PeerIdentity::label).unwrap_or("(none)");
                tracing::info!(certificate = %label, "certificate names no configured vendor");
                Err(ApiError::one(
                    StatusCode::FORBIDDEN,
                    Issue::error(
                        "security",
                        format!(
                            "the client certificate '{label}' is trusted but not configured as a vendor of this gateway"
                        ),
                    ),
                )
                .into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendors() -> Vendors {
        Vendors::new(&[VendorSettings {
            name: "getinge".into(),
            identity: "getinge".into(),
            serials: vec!["CH-1".into()],
            models: vec!["CARDIOHELP-i".into()],
        }])
    }

    #[test]
    fn known_certificate_becomes_its_vendor() {
        let mut request = Request::new(());
        request.extensions_mut().insert(PeerIdentity {
            names: vec!["getinge".to_owned()].into(),
        });
        let request = ClientIdentity { vendors: vendors() }
            .check(request)
            .unwrap();
        let vendor = request.extensions().get::<Arc<VendorPolicy>>().unwrap();
        assert_eq!(vendor.name, "getinge");
        assert!(vendor.may_post_for("CH-1", "other"));
        assert!(vendor.may_post_for("CH-9", "cardiohelp-I"));
        assert!(!vendor.may_post_for("CH-9", "M4"));
    }

    #[test]
    fn unknown_certificate_is_forbidden() {
        let mut request = Request::new(());
        request.extensions_mut().insert(PeerIdentity {
            names: vec!["someone-else".to_owned()].into(),
        });
        let error = ClientIdentity { vendors: vendors() }
            .check(request)
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::FORBIDDEN);
        assert!(api.issues[0].details.contains("someone-else"));
    }
}
