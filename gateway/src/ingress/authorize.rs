//! Authorization: a vendor posts only for the devices the configuration gives it (by serial or
//! by model). Runs before schema validation so that a foreign device learns nothing else.

use std::sync::Arc;

use http::{Request, StatusCode};
use serde_json::Value;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::ingress::client_identity::VendorPolicy;
use crate::outcome::{ApiError, Issue};

#[derive(Clone, Copy, Default)]
pub struct AuthorizeDevice;

pub fn layer() -> FilterLayer<AuthorizeDevice> {
    FilterLayer::new(AuthorizeDevice)
}

impl Predicate<Request<Value>> for AuthorizeDevice {
    type Request = Request<Value>;

    fn check(&mut self, request: Request<Value>) -> Result<Request<Value>, BoxError> {
        let Some(vendor) = request.extensions().get::<Arc<VendorPolicy>>() else {
            return Err(forbidden("the request carries no vendor identity".into()));
        };
        let device = &request.body()["device"];
        // Without a serial and a model as strings the schema check refuses the batch anyway.
        let (Some(serial), Some(model)) = (device["serial"].as_str(), device["model"].as_str())
        else {
            return Ok(request);
        };
        if vendor.may_post_for(serial, model) {
            Ok(request)
        } else {
            tracing::info!(vendor = %vendor.name, "device not owned by the posting vendor");
            Err(forbidden(format!(
                "vendor '{}' may not post for device '{serial}' (model '{model}'): the gateway's configuration does not give it this device",
                vendor.name
            )))
        }
    }
}

fn forbidden(details: String) -> BoxError {
    ApiError::one(
        StatusCode::FORBIDDEN,
        Issue::error("forbidden", details).at("/device/serial"),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VendorSettings;
    use crate::ingress::client_identity::Vendors;
    use crate::peer::PeerIdentity;
    use serde_json::json;

    fn request(serial: &str, model: &str) -> Request<Value> {
        let vendors = Vendors::new(
            &[VendorSettings {
                name: "getinge".into(),
                identity: "getinge".into(),
                serials: vec!["CH-1".into()],
                models: vec![],
                ..VendorSettings::default()
            }],
            &[],
            None,
        )
        .unwrap();
        let peer = PeerIdentity::named(&["getinge"]);
        let mut request = Request::new(json!({"device": {"serial": serial, "model": model}}));
        request
            .extensions_mut()
            .insert(vendors.for_peer(&peer).unwrap());
        request
    }

    #[test]
    fn owned_device_passes_foreign_device_is_403() {
        assert!(AuthorizeDevice.check(request("CH-1", "CARDIOHELP")).is_ok());
        let error = AuthorizeDevice
            .check(request("CH-2", "CARDIOHELP"))
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::FORBIDDEN);
        assert_eq!(api.issues[0].expression.as_deref(), Some("/device/serial"));
    }
}
