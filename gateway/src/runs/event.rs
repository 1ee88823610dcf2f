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
    })
}

/// A validated event body -> [`RunEvent`]; `None` if it lacks what its type needs (the schema
/// makes that unreachable; the caller still answers 422).
pub fn parse(body: &Value) -> Option<RunEvent> {
    let time = text(&body["time"])?;
    let at = mappings::DeviceTime::parse(&time).ok()?.instant;
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
        "weaning-trial" => EventKind::WeaningTrial {
            end: text(&body["end"]),
        },
        "ended" => EventKind::Ended {
            reason: text(&body["reason"])?,
            alive: body["alive"].as_bool()?,
        },
        "entered-in-error" => EventKind::EnteredInError,
        _ => return None,
    };
    Some(RunEvent {
        event_id: text(&body["eventId"])?,
        time,
        at,
        kind,
    })
}

/// `time` formatted back for FHIR when only the instant is at hand.
pub fn format(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}
