//! The ECMO FHIR gateway: device readings in over mutual TLS, FHIR R4 out to hospital EHRs.
//!
//! The modules follow the data flow: [`ingress`] (the tower stack in front of vendors) checks,
//! maps and hands each batch to [`delivery`] (the tower client stack towards the EHRs).
//! [`hl7v2`] is the second way in: IHE PCD-01 messages over MLLP, read into the same batches.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod cert_expiry;
pub mod certs;
pub mod config;
pub mod delivery;
pub mod fhir_schema;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hl7v2;
pub mod ingress;
pub mod metrics;
pub mod outbox;
pub mod outcome;
pub mod peer;
pub mod probes;
pub mod reload;
pub mod revocations;
pub mod runs;
pub mod server;
pub mod tls;
pub mod validation;

/// The error type that travels through tower stacks; typed errors are recovered by downcasting
/// at the edge (see [`ingress::rescue`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the gateway produces.
pub type BoxBody = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// A response body from bytes already in memory.
pub fn full_body(bytes: impl Into<bytes::Bytes>) -> BoxBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// This build, as every Provenance names it.
pub const GATEWAY_BUILD: &str = concat!("ecmo-gateway/", env!("CARGO_PKG_VERSION"));

/// An error and its causes, `outer: inner: innermost`, for logs and refusal reasons.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Installs the process-wide rustls crypto provider (aws-lc-rs). Call once at start; later
/// calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
