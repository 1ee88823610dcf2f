//! The vendor-facing request path: a tower stack assembled in [`stack`], one module per
//! concern, in the order a request meets them:
//!
//! 1. [`negotiate`]: `_format` / `Accept` -> FHIR JSON or FHIR XML answers (406 for neither);
//!    [`rescue`]: every error becomes an OperationOutcome with the right status
//! 2. request id and tracing (tower-http), body size limit, timeout, load shedding and a
//!    global concurrency limit (tower)
//! 3. [`client_identity`]: the certificate's names -> the configured vendor
//! 4. [`router`]: `POST /v1/observations`, `GET /v1/schemas/<name>`
//! 5. readings: [`decode`] (JSON, or XML through [`xml_ingest`]) -> [`locate`] (line and
//!    column for XML) -> [`authorize`] -> [`validate`] -> [`map`] -> [`duplicates`] ->
//!    [`conformance`] -> [`handoff`]; FHIR-native Observations: [`fhir_native`] ->
//!    [`duplicates`] -> [`handoff`]; run events: [`decode`] -> [`locate`] -> [`validate`] ->
//!    [`run_events`] -> [`conformance`] -> [`handoff`]; retractions: [`decode`] -> [`locate`] ->
//!    [`authorize`] -> [`validate`] -> [`retract`]

pub mod authorize;
pub mod client_identity;
pub mod conformance;
pub mod decode;
pub mod describe;
pub mod device_clocks;
pub mod duplicates;
pub mod fhir_native;
pub mod handoff;
pub mod locate;
pub mod map;
pub mod metadata;
pub mod negotiate;
pub mod record;
pub mod rescue;
pub mod retract;
pub mod router;
pub mod run_events;
pub mod schemas;
pub mod stack;
pub mod validate;
pub mod vendor_share;
pub mod xml_ingest;

pub use client_identity::{VendorPolicy, Vendors};
pub use stack::{IngressParts, IngressSettings, build_stack};

/// The `x-request-id` of a request (set by the stack), for logs and receipts.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// The Provenance facts of a request from `vendor`: who sent it (the vendor and its
/// certificate), the devices and mapping tables (family id, version) it used, and when it
/// arrived.
pub fn provenance_source(
    vendor: Option<&VendorPolicy>,
    devices: Vec<mappings::DeviceAgent>,
    tables: impl IntoIterator<Item = (String, String)>,
    reason: Option<String>,
) -> std::sync::Arc<mappings::ProvenanceSource> {
    let mut tables: Vec<(String, String)> = tables.into_iter().collect();
    tables.sort();
    tables.dedup();
    std::sync::Arc::new(mappings::ProvenanceSource {
        sender: mappings::Sender::Vendor {
            name: vendor.map(|v| v.name.clone()).unwrap_or_default(),
            certificate: vendor.map(|v| v.identity.clone()).unwrap_or_default(),
        },
        devices,
        tables,
        gateway: crate::GATEWAY_BUILD,
        received: fhir_instant_now(),
        reason,
    })
}

/// Now as a FHIR instant in UTC with milliseconds.
pub fn fhir_instant_now() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

/// A device family's mapping table as Provenance names it: (family id, version).
pub fn table_of(family: &mappings::DeviceFamily) -> (String, String) {
    (family.id.clone(), family.version.clone())
}
