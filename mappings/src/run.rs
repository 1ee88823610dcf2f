//! ECMO runs to FHIR R4: the run's Procedure, its child Procedures (mode segments, circuit
//! changes, weaning trials) and the console's Device.
//!
//! Choices worth knowing:
//! - `Procedure.code`: SNOMED 233573008 plus the mode's SNOMED code where one exists (VA, VV,
//!   AV, ECCO2R) and our CodeSystem's mode code always (VAV and VVA have no SNOMED code).
//! - Cannulas: one `bodySite` each, the SNOMED site as the coding, laterality (SNOMED 7771000 /
//!   24028007) and role (our `cannula-role`) in extensions on that CodeableConcept, and a text
//!   such as "left femoral vein (drainage)". R4 cannot post-coordinate laterality in a coding,
//!   and a BodyStructure per cannula would need resources the EHR has to resolve.
//! - Complications: `complication` codings with the time in an extension (R4 has no element for
//!   it; ELSO records a time for every complication since 2022).
//! - Age group, support type: extensions with our codes.
//! - References to the patient, the console and the run are by identifier (logical
//!   references), so they hold at any EHR without knowing its ids.

use std::borrow::Cow;

use fhirbolt::model::r4::resources::{
    Device, DeviceDeviceName, Procedure, ProcedureFocalDevice, ProcedurePerformed,
};
use fhirbolt::model::r4::types::{
    CodeableConcept, Extension, ExtensionValue, Identifier, Meta, Period, Reference,
};

use crate::identity::logical_id;
use crate::observation::coding_of;
use crate::{ECMO_CODE_SYSTEM, MappedResource};

/// Identifier system of runs (the vendor's or ECMO team's run id).
pub const RUN_IDENTIFIER_SYSTEM: &str = "https://fhir.ecmo-gateway.org/sid/ecmo-run";
const SNOMED: &str = "http://snomed.info/sct";
const EXT: &str = "https://fhir.ecmo-gateway.org/StructureDefinition/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Preparation,
    InProgress,
    Completed,
    Stopped,
    EnteredInError,
}

impl RunStatus {
    pub fn code(self) -> &'static str {
        match self {
            Self::Preparation => "preparation",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Stopped => "stopped",
            Self::EnteredInError => "entered-in-error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgeGroup {
    Neonatal,
    Pediatric,
    Adult,
}

impl AgeGroup {
    /// ELSO's groups from the age at the start of the run: 0-28 days, 29 days-17 years, 18+.
    pub fn at(birth: time::Date, start: time::Date) -> Option<Self> {
        if start < birth {
            return None;
        }
        let days = (start - birth).whole_days();
        let mut years = start.year() - birth.year();
        if (start.month() as u8, start.day()) < (birth.month() as u8, birth.day()) {
            years -= 1;
        }
        Some(if days <= 28 {
            Self::Neonatal
        } else if years < 18 {
            Self::Pediatric
        } else {
            Self::Adult
        })
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::Neonatal => "neonatal",
            Self::Pediatric => "pediatric",
            Self::Adult => "adult",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CannulaView {
    /// SNOMED CT body structure code and display.
    pub site_code: String,
    pub site_display: String,
    /// `left`, `right` or none.
    pub laterality: Option<String>,
    /// `drainage`, `return` or `drainage-and-return`.
    pub role: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ComplicationView {
    pub code: String,
    pub display: String,
    pub time: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleView {
    pub serial: String,
    pub model: String,
    /// The device's IEEE EUI-64, where it was given (PoCD's MDS identifier).
    pub eui64: Option<String>,
    pub manufacturer: String,
    /// Identifier system of the manufacturer's serials.
    pub serial_system: String,
    /// Our device-type code (`ecmo-console`, `blood-parameter-monitor`) and its display, from
    /// its family table.
    pub device_type: String,
    pub device_type_display: String,
}

/// A device of the circuit other than the pump console, for one period it was attached: its
/// readings in [from, until) belong to the run (R5's DeviceAssociation, kept by the gateway).
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedDeviceView {
    pub device: ConsoleView,
    pub from: String,
    pub until: Option<String>,
}

/// A part of the run written as a child Procedure.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentView {
    /// Stable within the run: `mode-1`, `circuit-change-<event id>`, ...
    pub key: String,
    /// Our `run-activity` code: `mode-segment`, `circuit-change`, `weaning-trial`.
    pub activity: &'static str,
    /// For mode segments: our mode code.
    pub mode: Option<String>,
    pub start: String,
    pub end: Option<String>,
}

/// Everything known about a run, folded from its events.
#[derive(Debug, Clone, PartialEq)]
pub struct RunView {
    pub run_id: String,
    pub status: RunStatus,
    pub patient_system: String,
    pub patient_value: String,
    pub encounter: Option<(String, String)>,
    /// Our mode code of the run as it started (the run's code), and its current one.
    pub initial_mode: String,
    pub support_type: Option<String>,
    pub age_group: Option<AgeGroup>,
    pub indications: Vec<(String, String)>,
    pub cannulas: Vec<CannulaView>,
    pub consoles: Vec<ConsoleView>,
    /// Other devices of the circuit, one entry per period attached.
    pub attached: Vec<AttachedDeviceView>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub complications: Vec<ComplicationView>,
    /// Our discontinuation-reason code, and whether the patient came off ECMO alive.
    pub outcome: Option<(String, bool)>,
    pub segments: Vec<SegmentView>,
}

fn mode_display(mode: &str) -> &'static str {
    match mode {
        "va" => "Veno-arterial ECMO",
        "vv" => "Veno-venous ECMO",
        "vav" => "Veno-arterio-venous ECMO",
        "vva" => "Veno-veno-arterial ECMO",
        "av" => "Arterio-venous (pumpless) extracorporeal support",
        "ecco2r" => "Extracorporeal CO2 removal",
        _ => "ECMO",
    }
}

/// SNOMED CT procedure codes that exist for a mode (verified in shared/reference §5.1).
fn mode_snomed(mode: &str) -> Option<(&'static str, &'static str)> {
    match mode {
        "va" => Some((
            "786451004",
            "Venoarterial extracorporeal membrane oxygenation (procedure)",
        )),
        "vv" => Some((
            "786453001",
            "Venovenous extracorporeal membrane oxygenation (procedure)",
        )),
        "av" => Some((
            "786452006",
            "Arteriovenous extracorporeal membrane oxygenation (procedure)",
        )),
        "ecco2r" => Some((
            "233574002",
            "Extracorporeal carbon dioxide removal (procedure)",
        )),
        _ => None,
    }
}

fn ours(code: &str, display: &str) -> CodeableConcept {
    CodeableConcept {
        coding: vec![coding_of(ECMO_CODE_SYSTEM, code, display)],
        text: Some(display.into()),
        ..Default::default()
    }
}

fn meta(profile: &str) -> Option<Box<Meta>> {
    Some(Box::new(Meta {
        profile: vec![profile.into()],
        ..Default::default()
    }))
}

fn extension(name: &str, value: ExtensionValue) -> Extension {
    Extension {
        url: format!("{EXT}{name}"),
        value: Some(value),
        ..Default::default()
    }
}

fn by_identifier(resource_type: &str, system: &str, value: &str) -> Reference {
    Reference {
        r#type: Some(resource_type.into()),
        identifier: Some(Box::new(Identifier {
            system: Some(system.into()),
            value: Some(value.into()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn category() -> Box<CodeableConcept> {
    Box::new(CodeableConcept {
        coding: vec![coding_of(
            SNOMED,
            "182744004",
            "Extracorporeal circulation procedure (procedure)",
        )],
        ..Default::default()
    })
}

fn mode_code(mode: &str) -> CodeableConcept {
    let mut coding = vec![coding_of(
        SNOMED,
        "233573008",
        "Extracorporeal membrane oxygenation (procedure)",
    )];
    if let Some((code, display)) = mode_snomed(mode) {
        coding.push(coding_of(SNOMED, code, display));
    }
    coding.push(coding_of(ECMO_CODE_SYSTEM, mode, mode_display(mode)));
    CodeableConcept {
        coding,
        text: Some(mode_display(mode).into()),
        ..Default::default()
    }
}

fn mapped(
    resource_type: &'static str,
    system: Cow<'static, str>,
    value: String,
    json: Vec<u8>,
) -> MappedResource {
    MappedResource {
        resource_type,
        id: logical_id(&system, &value),
        identifier_system: system,
        identifier_value: value,
        json,
        upsert: true,
    }
}

fn period(start: &Option<String>, end: &Option<String>) -> Option<ProcedurePerformed> {
    start.as_ref().map(|start| {
        ProcedurePerformed::Period(Box::new(Period {
            start: Some(start.as_str().into()),
            end: end.as_deref().map(Into::into),
            ..Default::default()
        }))
    })
}

/// The run's Procedure, complete as of the events so far.
pub fn procedure_for_run(run: &RunView) -> Result<MappedResource, String> {
    let mut extensions = Vec::new();
    if let Some(support) = &run.support_type {
        extensions.push(extension(
            "ecmo-support-type",
            ExtensionValue::CodeableConcept(Box::new(ours(support, support))),
        ));
    }
    if let Some(age) = run.age_group {
        extensions.push(extension(
            "ecmo-age-group",
            ExtensionValue::CodeableConcept(Box::new(ours(age.code(), age.code()))),
        ));
    }
    let body_site = run
        .cannulas
        .iter()
        .map(|c| {
            let mut ext = vec![extension(
                "cannula-role",
                ExtensionValue::CodeableConcept(Box::new(ours(&c.role, &c.role))),
            )];
            let side = c.laterality.as_deref().and_then(|l| match l {
                "left" => Some(("7771000", "Left")),
                "right" => Some(("24028007", "Right")),
                _ => None,
            });
            if let Some((code, display)) = side {
                ext.push(extension(
                    "laterality",
                    ExtensionValue::CodeableConcept(Box::new(CodeableConcept {
                        coding: vec![coding_of(SNOMED, code, display)],
                        ..Default::default()
                    })),
                ));
            }
            let text = match side {
                Some((_, side)) => {
                    format!("{} {} ({})", side.to_lowercase(), c.site_display, c.role)
                }
                None => format!("{} ({})", c.site_display, c.role),
            };
            CodeableConcept {
                extension: ext,
                coding: vec![coding_of(SNOMED, &c.site_code, &c.site_display)],
                text: Some(text.into()),
                ..Default::default()
            }
        })
        .collect();
    let complication = run
        .complications
        .iter()
        .map(|c| CodeableConcept {
            extension: vec![extension(
                "complication-time",
                ExtensionValue::DateTime(c.time.as_str().into()),
            )],
            coding: vec![coding_of(SNOMED, &c.code, &c.display)],
            text: Some(c.display.as_str().into()),
            ..Default::default()
        })
        .collect();
    let outcome = run.outcome.as_ref().map(|(reason, alive)| {
        let mut concept = ours(reason, reason);
        concept.text = Some(
            if *alive {
                "Came off ECMO alive"
            } else {
                "Died on ECMO"
            }
            .into(),
        );
        Box::new(concept)
    });
    let status_reason = (run.status == RunStatus::Stopped)
        .then(|| {
            run.outcome
                .as_ref()
                .map(|(reason, _)| Box::new(ours(reason, reason)))
        })
        .flatten();
    let procedure = Procedure {
        meta: meta(crate::RUN_PROFILE),
        extension: extensions,
        identifier: vec![Identifier {
            system: Some(RUN_IDENTIFIER_SYSTEM.into()),
            value: Some(run.run_id.as_str().into()),
            ..Default::default()
        }],
        status: run.status.code().into(),
        status_reason,
        category: Some(category()),
        code: Some(Box::new(mode_code(&run.initial_mode))),
        subject: Box::new(by_identifier(
            "Patient",
            &run.patient_system,
            &run.patient_value,
        )),
        encounter: run
            .encounter
            .as_ref()
            .map(|(s, v)| Box::new(by_identifier("Encounter", s, v))),
        performed: period(&run.start, &run.end),
        reason_code: run
            .indications
            .iter()
            .map(|(code, display)| CodeableConcept {
                coding: vec![coding_of(SNOMED, code, display)],
                ..Default::default()
            })
            .collect(),
        body_site,
        outcome,
        complication,
        focal_device: run
            .consoles
            .iter()
            .map(|c| ProcedureFocalDevice {
                manipulated: Box::new(by_identifier("Device", &c.serial_system, &c.serial)),
                ..Default::default()
            })
            .collect(),
        used_reference: run
            .attached
            .iter()
            .map(|a| Reference {
                extension: vec![extension(
                    "device-use-period",
                    ExtensionValue::Period(Box::new(Period {
                        start: Some(a.from.as_str().into()),
                        end: a.until.as_deref().map(Into::into),
                        ..Default::default()
                    })),
                )],
                ..by_identifier("Device", &a.device.serial_system, &a.device.serial)
            })
            .collect(),
        ..Default::default()
    };
    let json = fhirbolt::json::to_vec(&procedure, None).map_err(|e| e.to_string())?;
    Ok(mapped(
        "Procedure",
        RUN_IDENTIFIER_SYSTEM.into(),
        run.run_id.clone(),
        json,
    ))
}

/// A child Procedure of the run (mode segment, circuit change, weaning trial).
pub fn procedure_for_segment(
    run: &RunView,
    segment: &SegmentView,
) -> Result<MappedResource, String> {
    let code = match (&segment.mode, segment.activity) {
        (Some(mode), _) => mode_code(mode),
        (None, "circuit-change") => ours("circuit-change", "Circuit change"),
        (None, _) => ours("weaning-trial", "ECMO weaning trial"),
    };
    let status = if run.status == RunStatus::EnteredInError {
        "entered-in-error"
    } else if segment.end.is_some() {
        "completed"
    } else {
        "in-progress"
    };
    let identifier = format!("{}/{}", run.run_id, segment.key);
    let procedure = Procedure {
        meta: meta(crate::RUN_ACTIVITY_PROFILE),
        identifier: vec![Identifier {
            system: Some(RUN_IDENTIFIER_SYSTEM.into()),
            value: Some(identifier.as_str().into()),
            ..Default::default()
        }],
        part_of: vec![by_identifier(
            "Procedure",
            RUN_IDENTIFIER_SYSTEM,
            &run.run_id,
        )],
        status: status.into(),
        category: Some(Box::new(ours(segment.activity, segment.activity))),
        code: Some(Box::new(code)),
        subject: Box::new(by_identifier(
            "Patient",
            &run.patient_system,
            &run.patient_value,
        )),
        performed: period(&Some(segment.start.clone()), &segment.end),
        ..Default::default()
    };
    let json = fhirbolt::json::to_vec(&procedure, None).map_err(|e| e.to_string())?;
    Ok(mapped(
        "Procedure",
        RUN_IDENTIFIER_SYSTEM.into(),
        identifier,
        json,
    ))
}

/// Identifier system of IEEE EUI-64 device identifiers (the PoCD IG's MdsDevice slice).
pub const EUI64_SYSTEM: &str = "urn:oid:1.2.840.10004.1.1.1.0.0.1.0.0.1.2680";

/// A circuit device's Device (the console, an attached monitor): created once, referenced by
/// DeviceMetrics and the run's Procedure.
pub fn circuit_device(console: &ConsoleView) -> Result<MappedResource, String> {
    let display = &console.device_type_display;
    let mut coding = vec![coding_of(ECMO_CODE_SYSTEM, &console.device_type, display)];
    if console.device_type == "ecmo-console" {
        coding.push(coding_of(
            SNOMED,
            "469244005",
            "Extracorporeal membrane oxygenator (physical object)",
        ));
    }
    // The serial number first (what the gateway finds the Device by), then the EUI-64 as the
    // HL7 Point-of-Care Device IG identifies a device, where known.
    let identifier = std::iter::once((console.serial_system.as_str(), console.serial.as_str()))
        .chain(console.eui64.as_deref().map(|eui| (EUI64_SYSTEM, eui)))
        .map(|(system, value)| Identifier {
            system: Some(system.into()),
            value: Some(value.into()),
            ..Default::default()
        })
        .collect();
    let device = Device {
        meta: meta(crate::DEVICE_PROFILE),
        identifier,
        status: Some("active".into()),
        manufacturer: Some(console.manufacturer.as_str().into()),
        serial_number: Some(console.serial.as_str().into()),
        model_number: Some(console.model.as_str().into()),
        device_name: vec![DeviceDeviceName {
            name: format!("{} {}", console.manufacturer, console.model).into(),
            r#type: "manufacturer-name".into(),
            ..Default::default()
        }],
        r#type: Some(Box::new(CodeableConcept {
            coding,
            text: Some(display.as_str().into()),
            ..Default::default()
        })),
        ..Default::default()
    };
    let json = fhirbolt::json::to_vec(&device, None).map_err(|e| e.to_string())?;
    let mut resource = mapped(
        "Device",
        Cow::Owned(console.serial_system.clone()),
        console.serial.clone(),
        json,
    );
    resource.upsert = false;
    Ok(resource)
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::tests::run;
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    pub(crate) fn run() -> RunView {
        RunView {
            run_id: "R-1".into(),
            status: RunStatus::InProgress,
            patient_system: "urn:oid:1.2.3".into(),
            patient_value: "MRN-1".into(),
            encounter: None,
            initial_mode: "vv".into(),
            support_type: Some("respiratory".into()),
            age_group: Some(AgeGroup::Adult),
            indications: vec![(
                "67782005".into(),
                "Acute respiratory distress syndrome".into(),
            )],
            cannulas: vec![CannulaView {
                site_code: "83419000".into(),
                site_display: "femoral vein".into(),
                laterality: Some("left".into()),
                role: "drainage".into(),
            }],
            consoles: vec![ConsoleView {
                serial: "CH-1".into(),
                model: "CARDIOHELP-i".into(),
                eui64: Some("00-1B-C5-0A-00-00-01-2C".into()),
                manufacturer: "Getinge".into(),
                serial_system: "https://fhir.ecmo-gateway.org/sid/device-serial/getinge".into(),
                device_type: "ecmo-console".into(),
                device_type_display: "ECMO console".into(),
            }],
            attached: vec![],
            start: Some("2026-11-21T08:00:00Z".into()),
            end: None,
            complications: vec![],
            outcome: None,
            segments: vec![],
        }
    }

    #[test]
    fn run_procedure_is_valid_r4_with_codes() {
        let r = procedure_for_run(&run()).unwrap();
        crate::check_resource_json("Procedure", &r.json).unwrap();
        let p: serde_json::Value = serde_json::from_slice(&r.json).unwrap();
        assert_eq!(p["status"], "in-progress");
        assert_eq!(p["code"]["coding"][0]["code"], "233573008");
        assert_eq!(p["code"]["coding"][1]["code"], "786453001");
        assert_eq!(p["performedPeriod"]["start"], "2026-11-21T08:00:00Z");
        assert_eq!(p["bodySite"][0]["text"], "left femoral vein (drainage)");
        assert_eq!(
            p["focalDevice"][0]["manipulated"]["identifier"]["value"],
            "CH-1"
        );
        assert!(r.upsert);
    }

    #[test]
    fn every_built_resource_declares_a_defined_profile_of_its_type() {
        let run = run();
        let segment = SegmentView {
            key: "mode-1".into(),
            activity: "mode-segment",
            mode: Some("vv".into()),
            start: "2026-11-21T08:00:00Z".into(),
            end: None,
        };
        let profiles = crate::profiles();
        for r in [
            procedure_for_run(&run).unwrap(),
            procedure_for_segment(&run, &segment).unwrap(),
            circuit_device(&run.consoles[0]).unwrap(),
        ] {
            crate::check_resource_json(r.resource_type, &r.json).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.json).unwrap();
            let profile = v["meta"]["profile"][0].as_str().unwrap().to_owned();
            assert!(
                profiles.contains(&(profile.clone(), r.resource_type.to_owned())),
                "{profile}"
            );
        }
    }

    #[test]
    fn device_is_valid_r4_and_carries_its_eui64_after_its_serial() {
        let d = circuit_device(&run().consoles[0]).unwrap();
        crate::check_resource_json("Device", &d.json).unwrap();
        assert!(!d.upsert);
        let v: serde_json::Value = serde_json::from_slice(&d.json).unwrap();
        assert_eq!(
            crate::ProfileValidator::embedded().unwrap().check(&v),
            vec![]
        );
        assert_eq!(v["identifier"][0]["value"], "CH-1");
        assert_eq!(
            v["identifier"][1],
            serde_json::json!({"system": EUI64_SYSTEM, "value": "00-1B-C5-0A-00-00-01-2C"})
        );
        // Found by its serial, whatever else it carries.
        assert_eq!(d.identifier_value, "CH-1");
    }

    /// A monitor attached for a period: the run names it in `usedReference` with the period,
    /// and its Device says what it is; both pass R4 and our profiles.
    #[test]
    fn an_attached_monitor_is_used_by_the_run_for_its_period() {
        let mut run = run();
        let monitor = ConsoleView {
            serial: "M4-1".into(),
            model: "M4".into(),
            eui64: None,
            manufacturer: "Spectrum Medical".into(),
            serial_system: "https://fhir.ecmo-gateway.org/sid/device-serial/spectrum-medical"
                .into(),
            device_type: "blood-parameter-monitor".into(),
            device_type_display: "In-line blood parameter monitor".into(),
        };
        run.attached = vec![
            AttachedDeviceView {
                device: monitor.clone(),
                from: "2026-11-21T09:00:00Z".into(),
                until: Some("2026-11-21T10:00:00Z".into()),
            },
            AttachedDeviceView {
                device: monitor.clone(),
                from: "2026-11-22T09:00:00Z".into(),
                until: None,
            },
        ];
        let validator = crate::ProfileValidator::embedded().unwrap();
        let procedure = procedure_for_run(&run).unwrap();
        let device = circuit_device(&monitor).unwrap();
        for r in [&procedure, &device] {
            crate::check_resource_json(r.resource_type, &r.json).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.json).unwrap();
            assert_eq!(validator.check(&v), vec![], "{v}");
        }
        let p: serde_json::Value = serde_json::from_slice(&procedure.json).unwrap();
        let used = p["usedReference"].as_array().unwrap();
        assert_eq!(used.len(), 2, "one entry per period attached");
        assert_eq!(used[0]["identifier"]["value"], "M4-1");
        assert_eq!(
            used[0]["extension"][0]["valuePeriod"]["end"],
            "2026-11-21T10:00:00Z"
        );
        assert!(used[1]["extension"][0]["valuePeriod"].get("end").is_none());
        let d: serde_json::Value = serde_json::from_slice(&device.json).unwrap();
        assert_eq!(d["type"]["coding"][0]["code"], "blood-parameter-monitor");
        assert_eq!(
            d["type"]["coding"].as_array().unwrap().len(),
            1,
            "no SNOMED oxygenator code"
        );
    }

    #[test]
    fn age_groups_follow_elso() {
        assert_eq!(
            AgeGroup::at(date!(2026 - 11 - 01), date!(2026 - 11 - 29)),
            Some(AgeGroup::Neonatal)
        );
        assert_eq!(
            AgeGroup::at(date!(2026 - 11 - 01), date!(2026 - 11 - 30)),
            Some(AgeGroup::Pediatric)
        );
        assert_eq!(
            AgeGroup::at(date!(2008 - 11 - 22), date!(2026 - 11 - 21)),
            Some(AgeGroup::Pediatric)
        );
        assert_eq!(
            AgeGroup::at(date!(2008 - 11 - 21), date!(2026 - 11 - 21)),
            Some(AgeGroup::Adult)
        );
    }
}
