//! One finished run as the ELSO Registry asks for it: support type, mode and its changes,
//! cannulation sites, time on ECMO, complications with their times, outcome, and the devices
//! of the circuit. As JSON (nested, one document) and as CSV (one row per fact, so that a
//! registry coordinator can read it in a spreadsheet and copy it into the ELSO form).

use mappings::{RunStatus, RunView};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Why a run has no registry record yet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotReportable {
    #[error("run '{0}' has not ended: the registry takes a run once it is over")]
    NotEnded(String),
    #[error("run '{0}' was entered in error: there is nothing to report")]
    EnteredInError(String),
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistryRecord {
    pub run_id: String,
    /// `system|value`.
    pub patient: String,
    pub age_group: Option<&'static str>,
    pub support_type: Option<String>,
    pub initial_mode: String,
    /// Every mode the run was in, in order, with its period (mode conversions are the changes).
    pub modes: Vec<ModePeriod>,
    pub cannulas: Vec<CannulaSite>,
    pub start: String,
    pub end: String,
    /// Time on ECMO, from the start of blood flow to the removal of the last cannula.
    pub duration_hours: f64,
    pub complications: Vec<Complication>,
    pub circuit_changes: Vec<String>,
    pub outcome: Outcome,
    pub devices: Vec<Device>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ModePeriod {
    pub mode: String,
    pub start: String,
    pub end: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct CannulaSite {
    /// SNOMED CT body structure.
    pub code: String,
    pub site: String,
    pub laterality: Option<String>,
    pub role: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Complication {
    /// SNOMED CT.
    pub code: String,
    pub display: String,
    pub time: String,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Our discontinuation-reason code.
    pub reason: String,
    pub alive_off_ecmo: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Device {
    /// `console` or the attached device's type.
    pub role: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    /// The IEEE EUI-64, where the run events gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eui64: Option<String>,
    pub from: Option<String>,
    pub until: Option<String>,
}

/// The record of a finished run.
pub fn record(view: &RunView) -> Result<RegistryRecord, NotReportable> {
    match view.status {
        RunStatus::EnteredInError => {
            return Err(NotReportable::EnteredInError(view.run_id.clone()));
        }
        RunStatus::Completed | RunStatus::Stopped => {}
        RunStatus::Preparation | RunStatus::InProgress => {
            return Err(NotReportable::NotEnded(view.run_id.clone()));
        }
    }
    let (Some(start), Some(end), Some((reason, alive))) = (&view.start, &view.end, &view.outcome)
    else {
        return Err(NotReportable::NotEnded(view.run_id.clone()));
    };
    let instant = |t: &str| OffsetDateTime::parse(t, &Rfc3339).ok();
    let duration_hours = match (instant(start), instant(end)) {
        (Some(a), Some(b)) => ((b - a).as_seconds_f64() / 360.0).round() / 10.0,
        _ => 0.0,
    };
    let mut devices: Vec<Device> = view
        .consoles
        .iter()
        .map(|c| Device {
            role: "console".into(),
            manufacturer: c.manufacturer.clone(),
            model: c.model.clone(),
            serial: c.serial.clone(),
            eui64: c.eui64.clone(),
            from: None,
            until: None,
        })
        .collect();
    devices.extend(view.attached.iter().map(|a| Device {
        role: a.device.device_type.clone(),
        manufacturer: a.device.manufacturer.clone(),
        model: a.device.model.clone(),
        serial: a.device.serial.clone(),
        eui64: a.device.eui64.clone(),
        from: Some(a.from.clone()),
        until: a.until.clone(),
    }));
    Ok(RegistryRecord {
        run_id: view.run_id.clone(),
        patient: format!("{}|{}", view.patient_system, view.patient_value),
        age_group: view.age_group.map(|a| a.code()),
        support_type: view.support_type.clone(),
        initial_mode: view.initial_mode.clone(),
        modes: view
            .segments
            .iter()
            .filter_map(|s| {
                s.mode.as_ref().map(|mode| ModePeriod {
                    mode: mode.clone(),
                    start: s.start.clone(),
                    end: s.end.clone(),
                })
            })
            .collect(),
        cannulas: view
            .cannulas
            .iter()
            .map(|c| CannulaSite {
                code: c.site_code.clone(),
                site: c.site_display.clone(),
                laterality: c.laterality.clone(),
                role: c.role.clone(),
            })
            .collect(),
        start: start.clone(),
        end: end.clone(),
        duration_hours,
        complications: view
            .complications
            .iter()
            .map(|c| Complication {
                code: c.code.clone(),
                display: c.display.clone(),
                time: c.time.clone(),
            })
            .collect(),
        circuit_changes: view
            .segments
            .iter()
            .filter(|s| s.activity == "circuit-change")
            .map(|s| s.start.clone())
            .collect(),
        outcome: Outcome {
            reason: reason.clone(),
            alive_off_ecmo: *alive,
        },
        devices,
    })
}

/// The record as CSV: a header, then one row per fact (`item, value, code, start, end`).
pub fn to_csv(record: &RegistryRecord) -> Result<Vec<u8>, csv::Error> {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record(["item", "value", "code", "start", "end"])?;
    let mut row = |item: &str, value: &str, code: &str, start: &str, end: &str| {
        out.write_record([item, value, code, start, end])
    };
    let or_empty = |v: &Option<String>| v.clone().unwrap_or_default();
    row("run", &record.run_id, "", &record.start, &record.end)?;
    row("patient", &record.patient, "", "", "")?;
    row("age group", record.age_group.unwrap_or(""), "", "", "")?;
    row("support type", &or_empty(&record.support_type), "", "", "")?;
    row(
        "duration hours",
        &record.duration_hours.to_string(),
        "",
        "",
        "",
    )?;
    for mode in &record.modes {
        row("mode", &mode.mode, "", &mode.start, &or_empty(&mode.end))?;
    }
    for cannula in &record.cannulas {
        let site = match &cannula.laterality {
            Some(side) => format!("{side} {} ({})", cannula.site, cannula.role),
            None => format!("{} ({})", cannula.site, cannula.role),
        };
        row("cannula", &site, &cannula.code, "", "")?;
    }
    for complication in &record.complications {
        row(
            "complication",
            &complication.display,
            &complication.code,
            &complication.time,
            "",
        )?;
    }
    for change in &record.circuit_changes {
        row("circuit change", "", "", change, "")?;
    }
    for device in &record.devices {
        row(
            &format!("device ({})", device.role),
            &format!(
                "{} {} {}{}",
                device.manufacturer,
                device.model,
                device.serial,
                device
                    .eui64
                    .as_ref()
                    .map_or(String::new(), |eui| format!(" (EUI-64 {eui})"))
            ),
            "",
            &or_empty(&device.from),
            &or_empty(&device.until),
        )?;
    }
    row(
        "outcome",
        &record.outcome.reason,
        if record.outcome.alive_off_ecmo {
            "alive"
        } else {
            "died"
        },
        "",
        &record.end,
    )?;
    out.into_inner().map_err(|e| e.into_error().into())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::ingress::VendorPolicy;
    use crate::runs::RunRegistry;

    fn runs() -> Arc<RunRegistry> {
        RunRegistry::open(
            Path::new(":memory:"),
            Arc::new(mappings::Mappings::embedded().unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn a_finished_run_reports_what_the_registry_asks_and_an_open_one_does_not() {
        let runs = runs();
        let vendor = VendorPolicy::of_models("getinge", &["CARDIOHELP-i"]);
        let events = [
            json!({"eventId": "s", "type": "started", "time": "2026-11-20T08:00:00Z",
                   "patient": {"system": "urn:x", "value": "P"}, "mode": "vv", "supportType": "respiratory",
                   "birthDate": "1980-01-01",
                   "cannulas": [{"id": "c1", "site": {"code": "83419000", "display": "femoral vein"}, "laterality": "left", "role": "drainage"}],
                   "console": {"serial": "C1", "model": "CARDIOHELP-i", "eui64": "00-1B-C5-0A-00-00-00-C1"}}),
            json!({"eventId": "a", "type": "device-attached", "time": "2026-11-20T09:00:00Z", "device": {"serial": "M4-1", "model": "M4"}}),
            json!({"eventId": "m", "type": "mode-changed", "time": "2026-11-21T08:00:00Z", "mode": "vva"}),
            json!({"eventId": "k", "type": "circuit-changed", "time": "2026-11-21T10:00:00Z"}),
            json!({"eventId": "c", "type": "complication", "time": "2026-11-21T12:00:00Z",
                   "complication": {"code": "1386000", "display": "Intracranial hemorrhage"}}),
        ];
        for event in &events {
            runs.apply("R", event, &vendor).unwrap();
        }
        assert_eq!(
            record(&runs.view("R").unwrap()),
            Err(NotReportable::NotEnded("R".into()))
        );
        runs.apply(
            "R",
            &json!({"eventId": "e", "type": "ended", "time": "2026-11-22T20:30:00Z",
                                 "reason": "recovered", "alive": true}),
            &vendor,
        )
        .unwrap();
        let r = record(&runs.view("R").unwrap()).unwrap();
        assert_eq!(r.duration_hours, 60.5);
        assert_eq!(r.age_group, Some("adult"));
        assert_eq!(r.support_type.as_deref(), Some("respiratory"));
        let modes: Vec<(&str, Option<&str>)> = r
            .modes
            .iter()
            .map(|m| (m.mode.as_str(), m.end.as_deref()))
            .collect();
        assert_eq!(
            modes,
            [
                ("vv", Some("2026-11-21T08:00:00Z")),
                ("vva", Some("2026-11-22T20:30:00Z"))
            ]
        );
        assert_eq!(r.circuit_changes, ["2026-11-21T10:00:00Z"]);
        assert_eq!(r.complications[0].time, "2026-11-21T12:00:00Z");
        assert_eq!(r.devices.len(), 2);
        assert_eq!(
            r.devices[0].eui64.as_deref(),
            Some("00-1B-C5-0A-00-00-00-C1")
        );
        assert_eq!(r.devices[1].eui64, None);
        assert_eq!(r.devices[1].role, "blood-parameter-monitor");
        assert_eq!(r.devices[1].until.as_deref(), Some("2026-11-22T20:30:00Z"));

        let csv = String::from_utf8(to_csv(&r).unwrap()).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "item,value,code,start,end");
        assert!(
            lines.contains(&"mode,vva,,2026-11-21T08:00:00Z,2026-11-22T20:30:00Z"),
            "{csv}"
        );
        assert!(
            lines.contains(&"cannula,left femoral vein (drainage),83419000,,"),
            "{csv}"
        );
        assert!(
            lines.contains(&"outcome,recovered,alive,,2026-11-22T20:30:00Z"),
            "{csv}"
        );
        assert!(lines.contains(&"duration hours,60.5,,,"), "{csv}");
        assert!(
            lines.iter().any(|l| l.starts_with(
                "device (console),Getinge CARDIOHELP-i C1 (EUI-64 00-1B-C5-0A-00-00-00-C1)"
            )),
            "{csv}"
        );

        let mut other = events[0].clone();
        other["console"]["serial"] = json!("C2");
        runs.apply("X", &other, &vendor).unwrap();
        runs.apply(
            "X",
            &json!({"eventId": "x", "type": "entered-in-error", "time": "2026-11-20T09:00:00Z"}),
            &vendor,
        )
        .unwrap();
        assert!(matches!(
            runs.view("X").map(|v| record(&v)),
            Some(Err(NotReportable::EnteredInError(_)))
        ));
    }
}
