//! Declarative ECMO device-to-FHIR tables, and the FHIR R4 resources built from them.
//!
//! This is the one crate of the workspace that links the typed FHIR model (fhirbolt): it is slow
//! to compile, so it stays behind the concrete functions exposed here and the gateway only sees
//! serialized resources ([`MappedResource`]).
//!
//! The tables are data files (`tables/*.toml`, embedded as defaults); [`Mappings::load_dir`]
//! reads a site's own copy and refuses to start on any error, naming the file, the entry and
//! the reason.

mod charting;
mod codesystem;
mod conformance;
mod datetime;
mod device_metric;
mod fhir_check;
mod identity;
mod observation;
mod observation_json;
#[cfg(test)]
mod pocd;
mod provenance;
mod reading;
mod run;
mod shapes;
mod table;
mod validate;
mod xml;

pub use charting::{
    ChartSlot, ChartStatistic, ChartValue, OBSERVATION_STATISTICS, chart_slot, chart_value,
    summarized, valid_chart_interval, with_observation_identifier,
};
pub use codesystem::CodeSystemCodes;
pub use conformance::{
    CONFORMANCE_RESOURCES, DEVICE_COMPONENT_PROFILE, DEVICE_METRIC_PROFILE, DEVICE_PROFILE,
    OBSERVATION_PROFILE, RUN_ACTIVITY_PROFILE, RUN_PROFILE, profiles,
};
pub use datetime::{DeviceTime, TimeError, TimeWindow};
pub use device_metric::{
    DEVICE_COMPONENT_SYSTEM_PREFIX, DEVICE_METRIC_SYSTEM_PREFIX, MetricCategory,
    channel_identifier, device_components, device_description, device_metrics, metric_identifier,
    parse_metric_identifier, serial_of_metric,
};
pub use fhir_check::{CHECKED_TYPES, check_resource_json, check_resource_value};
pub use identity::{logical_id, observation_identifier, waveform_identifier};
pub use observation::{CheckedQuantity, CheckedWaveform};
pub use provenance::{
    DeviceAgent, GATEWAY_IDENTIFIER_SYSTEM, OPERATOR_IDENTIFIER_SYSTEM, PROVENANCE_TAG_SYSTEM,
    ProvenanceActivity, ProvenanceSource, ProvenanceTarget, Sender, TRACKING_ID_SYSTEM,
    VENDOR_IDENTIFIER_SYSTEM, business_key_parameter, provenance,
};
pub use reading::{
    DeviceContext, PatientRef, Reading, ReadingError, ReadingField, ReadingFlags, ReadingValue,
    RunLink,
};
pub use run::{
    AgeGroup, AttachedDeviceView, CannulaView, ComplicationView, ConsoleView, EUI64_SYSTEM,
    RUN_IDENTIFIER_SYSTEM, RunStatus, RunView, SegmentView, circuit_device, procedure_for_run,
    procedure_for_segment,
};
pub use shapes::ShapeSample;
pub use table::{DeviceFamily, Mappings, Parameter, ParameterKind, TableError, UnitRule};
pub use validate::{ProfileIssue, ProfileValidator};
pub use xml::{XML_TYPES, resource_from_xml, resource_to_xml, resource_value_to_xml};

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
    pub identifier_system: std::borrow::Cow<'static, str>,
    pub identifier_value: String,
    /// The resource as FHIR JSON, without `id` (the destination assigns or receives it).
    pub json: Vec<u8>,
    /// Written as a conditional update (the resource changes over time, e.g. a run's
    /// Procedure) rather than a conditional create (created once, never changed).
    pub upsert: bool,
}

impl MappedResource {
    /// A waveform (an Observation with SampledData): only destinations that take waveforms
    /// get it. Read from the JSON, so a FHIR-native waveform counts too (a member name in
    /// the JSON cannot be forged by text inside a string, where its quotes are escaped).
    pub fn is_waveform(&self) -> bool {
        self.resource_type == "Observation"
            && memchr::memmem::find(&self.json, b"\"valueSampledData\":").is_some()
    }
}

/// The resource types this crate builds, as `'static` names.
pub fn resource_type_name(name: &str) -> Option<&'static str> {
    CHECKED_TYPES.iter().copied().find(|t| *t == name)
}
