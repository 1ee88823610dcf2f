//! The end-to-end conformance suite's building blocks: a reference EHR FHIR server, a test
//! harness that runs the real gateway binary against it over mutual TLS on 127.0.0.1, a
//! simulated ECMO console and an HTTPS client with client certificates.

pub mod ceiling;
pub mod client;
pub mod console;
pub mod ehr;
pub mod fhir_xml;
pub mod fuzz_seeds;
pub mod harness;
pub mod mllp;
pub mod mllp_receiver;
pub mod suite;
