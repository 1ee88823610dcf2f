//! An Observation's JSON written straight from borrowed parts, in the element order of the
//! FHIR R4 JSON format: what fhirbolt's model would serialize, byte for byte (tests prove it
//! for every shape a table can build), without building the model's ~50 allocations first.
//! The parts that only depend on the table (the code, the categories) are rendered once when
//! the table is loaded.

use std::sync::LazyLock;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::{ECMO_CODE_SYSTEM, OBSERVATION_IDENTIFIER_SYSTEM, OBSERVATION_PROFILE, UCUM};

pub(crate) const OBSERVATION_CATEGORY: &str =
    "http://terminology.hl7.org/CodeSystem/observation-category";
pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const DATA_ABSENT_REASON: &str =
    "http://terminology.hl7.org/CodeSystem/data-absent-reason";
pub(crate) const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// JSON rendered once (a parameter's `code`), written as it is into every resource.
#[derive(Debug, Clone)]
pub struct PreRendered(Box<RawValue>);

impl PreRendered {
    pub(crate) fn of(value: &impl Serialize) -> Self {
        Self(serde_json::value::to_raw_value(value).expect("borrowed JSON parts serialize"))
    }
}

impl PartialEq for PreRendered {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Serialize for PreRendered {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

#[derive(Serialize)]
pub(crate) struct Coding<'a> {
    pub system: &'a str,
    pub code: &'a str,
    pub display: &'a str,
}

#[derive(Serialize)]
pub(crate) struct CodeableConcept<'a> {
    pub coding: Vec<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
}

/// A CodeableConcept of one coding and no text, without an allocation.
#[derive(Serialize)]
struct Concept<'a> {
    coding: [Coding<'a>; 1],
}

/// A parameter's `code`: the gateway's own coding first, then the standard ones.
pub(crate) fn parameter_code(
    code: &str,
    display: &str,
    codings: &[(String, String, String)],
) -> PreRendered {
    let mut coding = Vec::with_capacity(1 + codings.len());
    coding.push(Coding {
        system: ECMO_CODE_SYSTEM,
        code,
        display,
    });
    for (system, code, display) in codings {
        coding.push(Coding {
            system,
            code,
            display,
        });
    }
    PreRendered::of(&CodeableConcept {
        coding,
        text: Some(display),
    })
}

#[derive(Serialize)]
struct Meta<'a> {
    profile: [&'static str; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    security: Option<[Coding<'a>; 1]>,
}

/// An identifier (system and value): how every reference the gateway writes names its target.
#[derive(Serialize)]
pub(crate) struct Identifier<'a> {
    pub system: &'a str,
    pub value: &'a str,
}

#[derive(Serialize)]
struct Reference<'a> {
    r#type: &'static str,
    identifier: Identifier<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'a str>,
}

#[derive(Serialize)]
struct Quantity<'a> {
    value: serde_json::Number,
    unit: &'a str,
    system: &'static str,
    code: &'a str,
}

/// A waveform as FHIR R4 SampledData: one dimension, origin 0 in the value's unit.
#[derive(Serialize)]
struct SampledData<'a> {
    origin: Quantity<'a>,
    period: serde_json::Number,
    dimensions: u8,
    data: &'a str,
}

/// The Observation's value, as the table mapped it.
pub(crate) enum ValueJson<'a> {
    Quantity {
        decimal: &'a str,
        ucum: &'a str,
        display: &'a str,
    },
    Boolean(bool),
    /// The device said the value is invalid.
    Absent,
    /// A waveform: period (ms) and SampledData `data`.
    Samples {
        period: &'a str,
        data: &'a str,
        ucum: &'a str,
        display: &'a str,
    },
}

/// What varies between the Observations of one parameter.
pub(crate) struct ObservationParts<'a> {
    pub identifier_value: &'a str,
    pub test_data: bool,
    pub run_id: Option<&'a str>,
    pub patient: Option<(&'a str, &'a str)>,
    pub code: &'a PreRendered,
    pub effective: &'a str,
    pub value: ValueJson<'a>,
    /// (code, display) of each interpretation flag, in the profile's order.
    pub interpretation: &'a [(&'a str, &'a str)],
    /// The DeviceMetric of the device's parameter: its identifier system and value.
    pub metric_system: &'a str,
    pub metric: &'a str,
    pub device_display: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Observation<'a> {
    resource_type: &'static str,
    meta: Meta<'a>,
    identifier: [Identifier<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    part_of: Option<[Reference<'a>; 1]>,
    status: &'static str,
    category: &'static PreRendered,
    code: &'a PreRendered,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Reference<'a>>,
    effective_date_time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_quantity: Option<Quantity<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_sampled_data: Option<SampledData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_boolean: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_absent_reason: Option<&'static PreRendered>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interpretation: Vec<Concept<'a>>,
    device: Reference<'a>,
}

/// Every Observation's two categories: ECMO readings are procedure observations.
static CATEGORIES: LazyLock<PreRendered> = LazyLock::new(|| {
    PreRendered::of(&[
        Concept {
            coding: [Coding {
                system: OBSERVATION_CATEGORY,
                code: "procedure",
                display: "Procedure",
            }],
        },
        Concept {
            coding: [Coding {
                system: SNOMED,
                code: "182744004",
                display: "Extracorporeal circulation procedure (procedure)",
            }],
        },
    ])
});

/// Why a value the device marked invalid is absent.
static DEVICE_ERROR: LazyLock<PreRendered> = LazyLock::new(|| {
    PreRendered::of(&CodeableConcept {
        coding: vec![Coding {
            system: DATA_ABSENT_REASON,
            code: "error",
            display: "Error",
        }],
        text: Some("The device reported the value as invalid"),
    })
});

/// The Observation as FHIR JSON. Fails only on a decimal that is not a JSON number, which
/// the ingest path never hands over.
pub(crate) fn render(parts: &ObservationParts<'_>) -> Result<Vec<u8>, String> {
    let mut value_sampled_data = None;
    let (value_quantity, value_boolean, data_absent_reason) = match parts.value {
        ValueJson::Quantity {
            decimal,
            ucum,
            display,
        } => (
            Some(Quantity {
                value: decimal
                    .parse()
                    .map_err(|_| format!("'{decimal}' is not a decimal"))?,
                unit: display,
                system: UCUM,
                code: ucum,
            }),
            None,
            None,
        ),
        ValueJson::Boolean(b) => (None, Some(b), None),
        ValueJson::Absent => (None, None, Some(&*DEVICE_ERROR)),
        ValueJson::Samples {
            period,
            data,
            ucum,
            display,
        } => {
            value_sampled_data = Some(SampledData {
                origin: Quantity {
                    value: serde_json::Number::from(0),
                    unit: display,
                    system: UCUM,
                    code: ucum,
                },
                period: period
                    .parse()
                    .map_err(|_| format!("'{period}' is not a decimal"))?,
                dimensions: 1,
                data,
            });
            (None, None, None)
        }
    };
    let observation = Observation {
        resource_type: "Observation",
        meta: Meta {
            profile: [OBSERVATION_PROFILE],
            security: parts.test_data.then_some([Coding {
                system: ACT_REASON,
                code: "HTEST",
                display: "test health data",
            }]),
        },
        identifier: [Identifier {
            system: OBSERVATION_IDENTIFIER_SYSTEM,
            value: parts.identifier_value,
        }],
        part_of: parts.run_id.map(|run_id| {
            [Reference {
                r#type: "Procedure",
                identifier: Identifier {
                    system: crate::RUN_IDENTIFIER_SYSTEM,
                    value: run_id,
                },
                display: None,
            }]
        }),
        status: "final",
        category: &CATEGORIES,
        code: parts.code,
        subject: parts.patient.map(|(system, value)| Reference {
            r#type: "Patient",
            identifier: Identifier { system, value },
            display: None,
        }),
        effective_date_time: parts.effective,
        value_quantity,
        value_sampled_data,
        value_boolean,
        data_absent_reason,
        interpretation: parts
            .interpretation
            .iter()
            .map(|&(code, display)| Concept {
                coding: [Coding {
                    system: ECMO_CODE_SYSTEM,
                    code,
                    display,
                }],
            })
            .collect(),
        device: Reference {
            r#type: "DeviceMetric",
            identifier: Identifier {
                system: parts.metric_system,
                value: parts.metric,
            },
            display: Some(parts.device_display),
        },
    };
    let mut json = Vec::with_capacity(1536);
    serde_json::to_writer(&mut json, &observation).map_err(|e| e.to_string())?;
    Ok(json)
}
