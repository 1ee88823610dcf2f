//! Declarative ECMO device-to-FHIR tables, and the FHIR R4 resources built from them.
//!
//! This is the one crate of the workspace that links the typed FHIR model (fhirbolt): it is slow
//! to compile, so it stays behind the concrete functions exposed here and the gateway only sees
//! serialized resources ([`MappedResource`]).
//!
//! The tables are data files (`tables/*.toml`, embedded as defaults); [`Mappings::load_dir`]
//! reads a site's own copy and refuses to start on any error, naming the file, the entry and
//! the reason.

mod codesystem;
mod datetime;
mod fhir_check;
mod identity;
mod observation;
mod reading;
mod table;

pub use codesystem::CodeSystemCodes;
pub use datetime::{DeviceTime, TimeError};
pub use fhir_check::{CHECKED_TYPES, check_resource_json};
pub use identity::{logical_id, observation_identifier};
pub use reading::{
    DeviceContext, PatientRef, Reading, ReadingError, ReadingField, ReadingFlags, ReadingValue,
};
pub use table::{DeviceFamily, Mappings, Parameter, ParameterKind, TableError, UnitRule};

/// Base of every canonical URL and identifier system this project defines.
pub const CANONICAL_BASE: &str = "https://fhir.ecmo-gateway.org";
/// Our CodeSystem of circuit parameters and device states (profiles/fhir/CodeSystem-ecmo.json).
pub const ECMO_CODE_SYSTEM: &str = "https://fhir.ecmo-gateway.org/CodeSystem/ecmo";
/// Identifier system of the Observations the gateway writes (device + parameter + device time).
pub const OBSERVATION_IDENTIFIER_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/observation";
/// Identifier system prefix for device serial numbers; the device family's manufacturer slug
/// follows, since serial numbers are only unique per manufacturer.
pub const DEVICE_SERIAL_SYSTEM_PREFIX: &str = "https://fhir.ecmo-gateway.org/sid/device-serial/";
pub const UCUM: &str = "http://unitsofmeasure.org";

/// One FHIR resource ready to send: serialized once, here, so the outbox and the delivery stack
/// only move bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedResource {
    /// FHIR resource type, e.g. `Observation`.
    pub resource_type: &'static str,
    /// Logical id derived from the identifier, for destinations that take client-assigned ids.
    pub id: String,
    /// Business identifier system; with `identifier_value` it is the idempotency key.
    pub identifier_system: &'static str,
    pub identifier_value: String,
    /// The resource as FHIR JSON, without `id` (the destination assigns or receives it).
    pub json: Vec<u8>,
}
