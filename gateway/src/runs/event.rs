//! Run events as the API receives them, read explicitly from validated JSON.

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, PartialEq)]
pub struct Identifier {
    pub system: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cannula {
    pub id: String,
    pub site_code: String,
    pub site_display: String,
    pub laterality: Option<String>,
    pub role: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Console {
    pub serial: String,
    pub model: String,
    /// The device's IEEE EUI-64, where the event gave it.
    pub eui64: Option<String>,
}

/// What a run event says, by type.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// `preparation` (cannulation in progress) or `started` (blood flow started).
    Setup {
        flow_started: bool,
        patient: Identifier,
        encounter: Option<Identifier>,
        birth_date: Option<time::Date>,
        mode: String,
        support_type: Option<String>,
        indications: Vec<(String, String)>,
        cannulas: Vec<Cannula>,
        console: Console,
    },
    ModeChanged {
        mode: String,
    },
    ConsoleChanged {
        console: Console,
    },
    /// Another device of the circuit (a blood parameter monitor, a gas blender, ...) joins
    /// the run: its readings belong to the run from now until it is detached or the run ends.
    DeviceAttached {
        device: Console,
    },
    DeviceDetached {
        device: Console,
    },
    CircuitChanged,
    CannulaAdded {
        cannula: Cannula,
    },
    CannulaRemoved {
        cannula_id: String,
    },
    Complication {
        code: String,
        display: String,
    },
    WeaningTrial {
        end: Option<String>,
    },
    Ended {
        reason: String,
        alive: bool,
    },
    EnteredInError,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunEvent {
    pub event_id: String,
    /// As sent (for FHIR dateTimes) and as an instant (for ordering).
    pub time: String,
    pub at: OffsetDateTime,
    pub kind: EventKind,
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn identifier(v: &Value) -> Option<Identifier> {
    Some(Identifier {
        system: text(&v["system"])?,
        value: text(&v["value"])?,
    })
}

fn snomed(v: &Value) -> Option<(String, String)> {
    let code = text(&v["code"])?;
    let display = text(&v["display"]).unwrap_or_else(|| code.clone());
    Some((code, display))
}

fn cannula(v: &Value) -> Option<Cannula> {
    let (site_code, site_display) = snomed(&v["site"])?;
    Some(Cannula {
        id: text(&v["id"])?,
        site_code,
        site_display,
        laterality: text(&v["laterality"]),
        role: text(&v["role"])?,
    })
}

fn console(v: &Value) -> Option<Console> {
    Some(Console {
        serial: text(&v["serial"])?,
        model: text(&v["model"])?,
        eui64: text(&v["eui64"]),
    })
}

/// Why an event body cannot be read, and where (a JSON pointer): answered 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {why}")]
pub struct Unreadable {
    pub at: &'static str,
    pub why: String,
}

/// A time of the event, held to the same rule as a reading's: it goes into FHIR as sent.
fn device_time(
    body: &Value,
    field: &'static str,
) -> Result<Option<(String, OffsetDateTime)>, Unreadable> {
    let Some(sent) = text(&body[field.trim_start_matches('/')]) else {
        return Ok(None);
    };
    match mappings::DeviceTime::parse(&sent) {
        Ok(t) => Ok(Some((sent.clone(), t.instant))),
        Err(e) => Err(Unreadable {
            at: field,
            why: format!("{} {e}", field.trim_start_matches('/')),
        }),
    }
}

/// A validated event body -> [`RunEvent`]. The schema makes a missing member unreachable; a
/// time that FHIR would not take is refused naming its field.
pub fn parse(body: &Value) -> Result<RunEvent, Unreadable> {
    let lacking = || Unreadable {
        at: "/",
        why: "the event lacks what its type needs".into(),
    };
    let (time, at) = device_time(body, "/time")?.ok_or_else(lacking)?;
    let end = device_time(body, "/end")?.map(|(sent, _)| sent);
    let kind = parse_kind(body, end).ok_or_else(lacking)?;
    let event_id = text(&body["eventId"]).ok_or_else(lacking)?;
    Ok(RunEvent {
        event_id,
        time,
        at,
        kind,
    })
}

fn parse_kind(body: &Value, end: Option<String>) -> Option<EventKind> {
    let kind = match body["type"].as_str()? {
        t @ ("preparation" | "started") => EventKind::Setup {
            flow_started: t == "started",
            patient: identifier(&body["patient"])?,
            encounter: identifier(&body["encounter"]),
            birth_date: body["birthDate"].as_str().and_then(|d| {
                time::Date::parse(d, time::macros::format_description!("[year]-[month]-[day]")).ok()
            }),
            mode: text(&body["mode"])?,
            support_type: text(&body["supportType"]),
            indications: body["indications"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(snomed)
                .collect(),
            cannulas: body["cannulas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(cannula)
                .collect(),
            console: console(&body["console"])?,
        },
        "mode-changed" => EventKind::ModeChanged {
            mode: text(&body["mode"])?,
        },
        "console-changed" => EventKind::ConsoleChanged {
            console: console(&body["console"])?,
        },
        "device-attached" => EventKind::DeviceAttached {
            device: console(&body["device"])?,
        },
        "device-detached" => EventKind::DeviceDetached {
            device: console(&body["device"])?,
        },
        "circuit-changed" => EventKind::CircuitChanged,
        "cannula-added" => EventKind::CannulaAdded {
            cannula: cannula(&body["cannula"])?,
        },
        "cannula-removed" => EventKind::CannulaRemoved {
            cannula_id: text(&body["cannulaId"])?,
        },
        "complication" => {
            let (code, display) = snomed(&body["complication"])?;
            EventKind::Complication { code, display }
        }
        "weaning-trial" => EventKind::WeaningTrial { end },
        "ended" => EventKind::Ended {
            reason: text(&body["reason"])?,
            alive: body["alive"].as_bool()?,
        },
        "entered-in-error" => EventKind::EnteredInError,
        _ => return None,
    };
    Some(kind)
}

/// `time` formatted back for FHIR when only the instant is at hand.
pub fn format(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Found by the run_events fuzz target: a weaning trial's `end` that JSON Schema's
    /// date-time takes but FHIR does not (a lower-case `z`) went into the child Procedure and
    /// made the gateway refuse its own resource with a 500. Every time of an event is held
    /// to the readings' rule and refused naming its field.
    #[test]
    fn every_time_of_an_event_is_a_fhir_date_time_or_refused_naming_its_field() {
        let trial = |end: &str| {
            parse(&json!({"eventId": "w", "type": "weaning-trial",
                          "time": "2026-05-31T10:00:00.000Z", "end": end}))
        };
        assert!(trial("2026-05-31T12:00:00+02:00").is_ok());
        for bad in [
            "2026-05-31T12:00:00.000z",
            "2026-05-31t12:00:00Z",
            "2026-05-31T12:00:00+15:00",
        ] {
            let refused = trial(bad).expect_err(bad);
            assert_eq!(refused.at, "/end", "{bad}");
            assert!(
                refused.why.starts_with("end is not a date-time"),
                "{}",
                refused.why
            );
        }
        let late = parse(
            &json!({"eventId": "c", "type": "circuit-changed", "time": "2026-05-31T10:00:00z"}),
        );
        assert_eq!(late.map_err(|e| e.at), Err("/time"));
    }
}
