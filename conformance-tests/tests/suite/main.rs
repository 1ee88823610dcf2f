//! The conformance suite's integration tests, one module per area, in one test binary: every
//! binary links the whole FHIR model, so one binary builds and links once.
//!
//! Run one area with `cargo test -p conformance-tests --test suite <module>::`.

mod bad_payloads;
mod bench_ceilings;
mod certificates;
mod destination_capabilities;
mod durable_delivery;
mod ecmo_runs;
mod ehr_failures;
mod fuzz_smoke;
mod hl7v2;
mod hot_reload;
mod literal_references;
mod observations_flow;
mod operations;
mod postgres_store;
mod profile_conformance;
mod scenarios;
mod smart_backend_services;
mod web_console;
mod xml_destinations;
