//! Readings to FHIR R4 Observations through the device family's table. The JSON is written
//! from borrowed parts ([`crate::observation_json`]); fhirbolt's typed model builds the same
//! resource in tests, which prove the two identical byte for byte.

use crate::datetime::DeviceTime;
use crate::identity::{logical_id, observation_identifier};
use crate::observation_json::{self, ObservationParts, ValueJson};
use crate::reading::{DeviceContext, Reading, ReadingError, ReadingFlags, ReadingValue};
use crate::table::{DeviceFamily, Mappings, Parameter, ParameterKind};
use crate::{MappedResource, OBSERVATION_IDENTIFIER_SYSTEM};

/// The interpretation flags, in the order the Observation lists them.
const INTERPRETATION_FLAGS: [(ReadingFlags, &str); 4] = [
    (ReadingFlags::QUESTIONABLE, "questionable"),
    (ReadingFlags::CALIBRATING, "calibrating"),
    (ReadingFlags::IN_ALARM, "in-alarm"),
    (ReadingFlags::ALARMS_INHIBITED, "alarms-inhibited"),
];

/// What the Observation's value turns out to be once the table has been applied.
enum MappedValue<'a> {
    /// FHIR decimal text in the UCUM unit.
    Quantity {
        decimal: String,
        ucum: &'a str,
        display: &'a str,
    },
    Boolean(bool),
    /// The device said the value is invalid (a flag, or the family's invalid marker).
    Absent,
    /// A waveform in the UCUM unit: the period (ms) as the device wrote it, and the samples
    /// as SampledData's `data` (decimals and `E` for invalid ones, space-separated).
    Samples {
        period: String,
        data: String,
        ucum: &'a str,
        display: &'a str,
    },
}

impl Mappings {
    /// Checks one reading against its device family's table and builds its Observation.
    pub fn map_reading(
        &self,
        device: &DeviceContext<'_>,
        reading: &Reading<'_>,
    ) -> Result<MappedResource, ReadingError> {
        let family = device.family;
        let parameter =
            family
                .parameter(reading.parameter)
                .ok_or_else(|| ReadingError::UnknownParameter {
                    parameter: reading.parameter.to_owned(),
                    family: family.display.clone(),
                    known: family.parameter_names().join(", "),
                })?;
        let time = DeviceTime::parse(reading.time)?;
        device.window.check(&time)?;
        // A waveform's last sample must not lie ahead of the clock either.
        if let ReadingValue::Samples { period, data } = reading.value {
            let span_ms =
                period.parse::<f64>().unwrap_or(0.0) * data.len().saturating_sub(1) as f64;
            device.window.check(&DeviceTime {
                text: time.text,
                instant: time.instant + time::Duration::seconds_f64(span_ms / 1000.0),
            })?;
        }
        let value = map_value(parameter, reading, &family.invalid_markers)?;

        let identifier_value = match reading.value {
            // A waveform's identifier is its start and duration (ISO 8601), so that it never
            // meets a single reading of the same time, nor a waveform of another length.
            ReadingValue::Samples { period, data } => crate::waveform_identifier(
                &family.id,
                device.serial,
                &parameter.code,
                &time.compact_utc(),
                period,
                data.len(),
            ),
            _ => observation_identifier(
                &family.id,
                device.serial,
                &parameter.code,
                &time.compact_utc(),
            ),
        };
        let json = self
            .render_observation(device, parameter, reading, &time, &value, &identifier_value)
            .map_err(ReadingError::Build)?;
        Ok(MappedResource {
            resource_type: "Observation",
            id: logical_id(OBSERVATION_IDENTIFIER_SYSTEM, &identifier_value),
            identifier_system: OBSERVATION_IDENTIFIER_SYSTEM.into(),
            identifier_value,
            json,
            upsert: false,
        })
    }

    fn render_observation(
        &self,
        device: &DeviceContext<'_>,
        parameter: &Parameter,
        reading: &Reading<'_>,
        time: &DeviceTime<'_>,
        value: &MappedValue<'_>,
        identifier_value: &str,
    ) -> Result<Vec<u8>, String> {
        let family = device.family;
        let mut flags = [("", ""); INTERPRETATION_FLAGS.len()];
        let mut flagged = 0;
        for (flag, code) in INTERPRETATION_FLAGS {
            if reading.flags.contains(flag) {
                flags[flagged] = (code, self.codes().display(code).unwrap_or(code));
                flagged += 1;
            }
        }
        let device_display = format!("{} {}", family.manufacturer, device.model);
        observation_json::render(&ObservationParts {
            identifier_value,
            test_data: reading.flags.contains(ReadingFlags::TEST_DATA),
            run_id: reading.run.map(|run| run.run_id),
            patient: reading
                .run
                .map(|run| run.patient)
                .or(device.patient)
                .map(|p| (p.system, p.value)),
            code: &parameter.code_json,
            effective: time.text,
            value: match value {
                MappedValue::Quantity {
                    decimal,
                    ucum,
                    display,
                } => ValueJson::Quantity {
                    decimal,
                    ucum,
                    display,
                },
                MappedValue::Boolean(b) => ValueJson::Boolean(*b),
                MappedValue::Absent => ValueJson::Absent,
                MappedValue::Samples {
                    period,
                    data,
                    ucum,
                    display,
                } => ValueJson::Samples {
                    period,
                    data,
                    ucum,
                    display,
                },
            },
            interpretation: &flags[..flagged],
            metric_system: &family.metric_system,
            metric: &crate::metric_identifier(device.serial, &parameter.code),
            device_display: &device_display,
        })
    }
}

/// fhirbolt's typed model of the same Observation: the reference the rendered JSON is proven
/// against.
#[cfg(test)]
mod model {
    use fhirbolt::model::r4::resources::{Observation, ObservationEffective, ObservationValue};
    use fhirbolt::model::r4::types::{
        CodeableConcept, Identifier, Meta, Quantity, Reference, SampledData,
    };

    use super::{INTERPRETATION_FLAGS, MappedValue, coding_of};
    use crate::datetime::DeviceTime;
    use crate::observation_json::{ACT_REASON, DATA_ABSENT_REASON, OBSERVATION_CATEGORY, SNOMED};
    use crate::reading::{DeviceContext, Reading, ReadingFlags};
    use crate::table::{Mappings, Parameter};
    use crate::{ECMO_CODE_SYSTEM, OBSERVATION_IDENTIFIER_SYSTEM, UCUM};

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observation(
        mappings: &Mappings,
        device: &DeviceContext<'_>,
        parameter: &Parameter,
        reading: &Reading<'_>,
        time: &DeviceTime<'_>,
        value: MappedValue<'_>,
        identifier_value: &str,
    ) -> Observation {
        let family = device.family;
        let flags = reading.flags;
        let mut coding = Vec::with_capacity(1 + parameter.codings.len());
        coding.push(coding_of(
            ECMO_CODE_SYSTEM,
            &parameter.code,
            &parameter.display,
        ));
        for (system, code, display) in &parameter.codings {
            coding.push(coding_of(system, code, display));
        }

        let mut interpretation = Vec::new();
        for (flag, code) in INTERPRETATION_FLAGS {
            if flags.contains(flag) {
                let display = mappings.codes().display(code).unwrap_or(code);
                interpretation.push(CodeableConcept {
                    coding: vec![coding_of(ECMO_CODE_SYSTEM, code, display)],
                    ..Default::default()
                });
            }
        }

        let meta = Some(Box::new(Meta {
            profile: vec![crate::OBSERVATION_PROFILE.into()],
            security: if flags.contains(ReadingFlags::TEST_DATA) {
                vec![coding_of(ACT_REASON, "HTEST", "test health data")]
            } else {
                vec![]
            },
            ..Default::default()
        }));

        let (value, data_absent_reason) = match value {
            MappedValue::Quantity {
                decimal,
                ucum,
                display,
            } => (
                Some(ObservationValue::Quantity(Box::new(Quantity {
                    value: Some(decimal.into()),
                    unit: Some(display.into()),
                    system: Some(UCUM.into()),
                    code: Some(ucum.into()),
                    ..Default::default()
                }))),
                None,
            ),
            MappedValue::Boolean(b) => (Some(ObservationValue::Boolean(b.into())), None),
            MappedValue::Samples {
                period,
                data,
                ucum,
                display,
            } => (
                Some(ObservationValue::SampledData(Box::new(SampledData {
                    origin: Box::new(Quantity {
                        value: Some("0".to_owned().into()),
                        unit: Some(display.into()),
                        system: Some(UCUM.into()),
                        code: Some(ucum.into()),
                        ..Default::default()
                    }),
                    period: period.into(),
                    dimensions: 1_u32.into(),
                    data: Some(data.into()),
                    ..Default::default()
                }))),
                None,
            ),
            MappedValue::Absent => (
                None,
                Some(Box::new(CodeableConcept {
                    coding: vec![coding_of(DATA_ABSENT_REASON, "error", "Error")],
                    text: Some("The device reported the value as invalid".into()),
                    ..Default::default()
                })),
            ),
        };

        Observation {
            meta,
            identifier: vec![Identifier {
                system: Some(OBSERVATION_IDENTIFIER_SYSTEM.into()),
                value: Some(identifier_value.into()),
                ..Default::default()
            }],
            status: "final".into(),
            category: vec![
                CodeableConcept {
                    coding: vec![coding_of(OBSERVATION_CATEGORY, "procedure", "Procedure")],
                    ..Default::default()
                },
                CodeableConcept {
                    coding: vec![coding_of(
                        SNOMED,
                        "182744004",
                        "Extracorporeal circulation procedure (procedure)",
                    )],
                    ..Default::default()
                },
            ],
            code: Box::new(CodeableConcept {
                coding,
                text: Some(parameter.display.as_str().into()),
                ..Default::default()
            }),
            part_of: reading
                .run
                .map(|run| {
                    vec![Reference {
                        r#type: Some("Procedure".into()),
                        identifier: Some(Box::new(Identifier {
                            system: Some(crate::RUN_IDENTIFIER_SYSTEM.into()),
                            value: Some(run.run_id.into()),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            subject: reading
                .run
                .map(|run| run.patient)
                .or(device.patient)
                .map(|p| {
                    Box::new(Reference {
                        r#type: Some("Patient".into()),
                        identifier: Some(Box::new(Identifier {
                            system: Some(p.system.into()),
                            value: Some(p.value.into()),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                }),
            effective: Some(ObservationEffective::DateTime(time.text.into())),
            value,
            data_absent_reason,
            interpretation,
            device: Some(Box::new(Reference {
                r#type: Some("DeviceMetric".into()),
                identifier: Some(Box::new(Identifier {
                    system: Some(family.metric_system.as_str().into()),
                    value: Some(crate::metric_identifier(device.serial, &parameter.code).into()),
                    ..Default::default()
                })),
                display: Some(format!("{} {}", family.manufacturer, device.model).into()),
                ..Default::default()
            })),
            ..Default::default()
        }
    }
}

/// A quantity as the gateway writes it: FHIR decimal text in the table's UCUM unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedQuantity<'a> {
    pub decimal: String,
    pub ucum: &'a str,
    pub display: &'a str,
}

impl DeviceFamily {
    /// A value with its unit (a UCUM code or a device spelling) for `parameter`, through the
    /// same table rules as a reading: accepted unit, conversion, plausible range, precision.
    /// `None` when the value is the family's invalid marker. For FHIR-native Observations, so
    /// that what the EHR gets does not depend on the input format.
    pub fn check_quantity<'p>(
        &self,
        parameter: &'p Parameter,
        value: &str,
        unit: &str,
    ) -> Result<Option<CheckedQuantity<'p>>, ReadingError> {
        match self.map_value_alone(parameter, ReadingValue::Number(value), unit)? {
            MappedValue::Quantity {
                decimal,
                ucum,
                display,
            } => Ok(Some(CheckedQuantity {
                decimal,
                ucum,
                display,
            })),
            MappedValue::Absent => Ok(None),
            MappedValue::Boolean(_) | MappedValue::Samples { .. } => {
                Err(ReadingError::NotANumber {
                    parameter: parameter.vendor.clone(),
                })
            }
        }
    }

    /// `value` in `unit` through `parameter`'s table rules, as a reading without flags.
    fn map_value_alone<'p>(
        &self,
        parameter: &'p Parameter,
        value: ReadingValue<'_>,
        unit: &str,
    ) -> Result<MappedValue<'p>, ReadingError> {
        let reading = Reading {
            parameter: &parameter.vendor,
            value,
            unit: Some(unit),
            time: "",
            flags: ReadingFlags::default(),
            run: None,
        };
        map_value(parameter, &reading, &self.invalid_markers)
    }
}

/// A waveform as the gateway writes it: SampledData `data` in the table's UCUM unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedWaveform<'a> {
    pub data: String,
    pub ucum: &'a str,
    pub display: &'a str,
}

impl DeviceFamily {
    /// Samples with their unit for `parameter`, through the same table rules as a reading's
    /// waveform: accepted unit, conversion, plausible range (an error names the sample),
    /// precision; `null` (or the invalid marker) is `E`. For FHIR-native SampledData.
    pub fn check_waveform<'p>(
        &self,
        parameter: &'p Parameter,
        period: &str,
        data: &[serde_json::Value],
        unit: &str,
    ) -> Result<CheckedWaveform<'p>, ReadingError> {
        match self.map_value_alone(parameter, ReadingValue::Samples { period, data }, unit)? {
            MappedValue::Samples {
                data,
                ucum,
                display,
                ..
            } => Ok(CheckedWaveform {
                data,
                ucum,
                display,
            }),
            _ => Err(ReadingError::NotANumber {
                parameter: parameter.vendor.clone(),
            }),
        }
    }
}

pub(crate) fn coding_of(
    system: &str,
    code: &str,
    display: &str,
) -> fhirbolt::model::r4::types::Coding {
    use fhirbolt::model::r4::types::Coding;
    Coding {
        system: Some(system.into()),
        code: Some(code.into()),
        display: Some(display.into()),
        ..Default::default()
    }
}

fn map_value<'p>(
    parameter: &'p Parameter,
    reading: &Reading<'_>,
    invalid_markers: &[f64],
) -> Result<MappedValue<'p>, ReadingError> {
    let is_marker = |text: &str| {
        text.parse::<f64>()
            .is_ok_and(|v| invalid_markers.contains(&v))
    };
    match &parameter.kind {
        ParameterKind::Boolean => match reading.value {
            ReadingValue::Samples { .. } => Err(ReadingError::NotAWaveform {
                parameter: parameter.vendor.clone(),
            }),
            _ if reading.flags.contains(ReadingFlags::INVALID) => Ok(MappedValue::Absent),
            ReadingValue::Boolean(b) => Ok(MappedValue::Boolean(b)),
            ReadingValue::Number(text) if is_marker(text) => Ok(MappedValue::Absent),
            ReadingValue::Number(text) => match text.parse::<f64>() {
                Ok(0.0) => Ok(MappedValue::Boolean(false)),
                Ok(1.0) => Ok(MappedValue::Boolean(true)),
                _ => Err(ReadingError::NotABoolean {
                    parameter: parameter.vendor.clone(),
                    value: text.to_owned(),
                }),
            },
        },
        ParameterKind::Quantity {
            ucum,
            display,
            decimals,
            low,
            high,
            accepts,
        } => {
            let accepted = || {
                let mut units: Vec<&str> = accepts.keys().map(String::as_str).collect();
                units.sort_unstable();
                units.join(", ")
            };
            let unit = reading.unit.ok_or_else(|| ReadingError::MissingUnit {
                parameter: parameter.vendor.clone(),
                accepted: accepted(),
            })?;
            let rule = accepts
                .get(unit)
                .ok_or_else(|| ReadingError::UnitNotAccepted {
                    unit: unit.to_owned(),
                    parameter: parameter.vendor.clone(),
                    accepted: accepted(),
                })?;
            let not_a_number = || ReadingError::NotANumber {
                parameter: parameter.vendor.clone(),
            };
            // The value in the table's unit, checked against its plausible range.
            let convert = |text: &str| -> Result<String, f64> {
                let raw: f64 = text.parse().map_err(|_| f64::NAN)?;
                let converted = raw * rule.factor + rule.offset;
                if !(converted >= *low && converted <= *high) {
                    return Err(converted);
                }
                // Unconverted values keep the device's own digits (FHIR decimals carry
                // precision); converted ones are rounded to the precision the table gives.
                Ok(if rule.is_identity() {
                    text.to_owned()
                } else {
                    let mut s = format!("{:.*}", usize::from(*decimals), converted);
                    if s.starts_with('-') && s[1..].bytes().all(|b| b == b'0' || b == b'.') {
                        s.remove(0);
                    }
                    s
                })
            };
            match reading.value {
                ReadingValue::Boolean(_) => Err(not_a_number()),
                _ if reading.flags.contains(ReadingFlags::INVALID) => Ok(MappedValue::Absent),
                ReadingValue::Number(text) if is_marker(text) => Ok(MappedValue::Absent),
                ReadingValue::Number(text) => match convert(text) {
                    Ok(decimal) => Ok(MappedValue::Quantity {
                        decimal,
                        ucum,
                        display,
                    }),
                    Err(converted) if converted.is_nan() => Err(not_a_number()),
                    Err(_) => Err(ReadingError::OutOfRange {
                        parameter: parameter.vendor.clone(),
                        value: text.to_owned(),
                        unit: unit.to_owned(),
                        low: *low,
                        high: *high,
                        ucum: ucum.clone(),
                    }),
                },
                ReadingValue::Samples { period, data } => {
                    let mut samples = String::with_capacity(data.len() * 6);
                    for (index, sample) in data.iter().enumerate() {
                        if index > 0 {
                            samples.push(' ');
                        }
                        let text = match sample {
                            serde_json::Value::Number(number) => number.as_str(),
                            serde_json::Value::Null => {
                                samples.push('E');
                                continue;
                            }
                            _ => return Err(not_a_number()),
                        };
                        if is_marker(text) {
                            samples.push('E');
                            continue;
                        }
                        match convert(text) {
                            // SampledData's data is plain decimals: no exponent.
                            Ok(decimal) if decimal.contains(['e', 'E']) => samples.push_str(
                                &decimal
                                    .parse::<f64>()
                                    .map_err(|_| not_a_number())?
                                    .to_string(),
                            ),
                            Ok(decimal) => samples.push_str(&decimal),
                            Err(converted) if converted.is_nan() => return Err(not_a_number()),
                            Err(_) => {
                                return Err(ReadingError::SampleOutOfRange {
                                    parameter: parameter.vendor.clone(),
                                    index,
                                    value: text.to_owned(),
                                    unit: unit.to_owned(),
                                    low: *low,
                                    high: *high,
                                    ucum: ucum.clone(),
                                });
                            }
                        }
                    }
                    Ok(MappedValue::Samples {
                        period: period.to_owned(),
                        data: samples,
                        ucum,
                        display,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ECMO_CODE_SYSTEM, UCUM};

    /// For every shape the tables build, the rendered JSON is fhirbolt's, byte for byte (so
    /// content hashes of what the outbox already holds stay the same), and fhirbolt's strict
    /// parser takes it back.
    #[test]
    fn the_rendered_json_is_fhirbolts_for_every_shape() {
        let m = Mappings::embedded().unwrap();
        let mut shapes = 0;
        for family in m.families() {
            for parameter in family.parameters() {
                for input in crate::shapes::inputs(family, parameter) {
                    crate::shapes::with_reading(family, parameter, &input, |context, reading| {
                        let rendered = m.map_reading(context, reading).unwrap();
                        let time = DeviceTime::parse(reading.time).unwrap();
                        let value = map_value(parameter, reading, &family.invalid_markers).unwrap();
                        let model = model::observation(
                            &m,
                            context,
                            parameter,
                            reading,
                            &time,
                            value,
                            &rendered.identifier_value,
                        );
                        let expected = fhirbolt::json::to_vec(&model, None).unwrap();
                        assert_eq!(
                            String::from_utf8_lossy(&rendered.json),
                            String::from_utf8_lossy(&expected),
                            "{}",
                            input.shape
                        );
                        crate::check_resource_json("Observation", &rendered.json).unwrap();
                    });
                    shapes += 1;
                }
            }
        }
        assert!(shapes > 50, "{shapes} shapes");
    }
    use crate::reading::PatientRef;
    use time::macros::datetime;

    fn context<'a>(m: &'a Mappings, model: &'a str) -> DeviceContext<'a> {
        DeviceContext {
            family: m.family_for_model(model).unwrap(),
            serial: "CH-0042",
            model,
            patient: Some(PatientRef {
                system: "urn:oid:1.2.3",
                value: "MRN-1",
            }),
            window: crate::TimeWindow {
                received_at: datetime!(2026-11-21 10:20 UTC),
                max_future_skew: time::Duration::minutes(5),
                max_past_age: time::Duration::hours(24),
            },
        }
    }

    fn reading<'a>(parameter: &'a str, value: &'a str, unit: &'a str) -> Reading<'a> {
        Reading {
            parameter,
            value: ReadingValue::Number(value),
            unit: Some(unit),
            time: "2026-11-21T10:15:00Z",
            flags: ReadingFlags::default(),
            run: None,
        }
    }

    fn json(r: &MappedResource) -> serde_json::Value {
        serde_json::from_slice(&r.json).unwrap()
    }

    #[test]
    fn flow_becomes_a_coded_ucum_observation() {
        let m = Mappings::embedded().unwrap();
        let r = m
            .map_reading(
                &context(&m, "CARDIOHELP-i"),
                &reading("Flow", "4.20", "L/min"),
            )
            .unwrap();
        let o = json(&r);
        assert_eq!(o["resourceType"], "Observation");
        assert_eq!(o["status"], "final");
        assert_eq!(o["code"]["coding"][0]["system"], ECMO_CODE_SYSTEM);
        assert_eq!(o["code"]["coding"][0]["code"], "pump-blood-flow");
        assert_eq!(o["code"]["coding"][1]["code"], "251288004");
        assert_eq!(o["valueQuantity"]["value"].to_string(), "4.20");
        assert_eq!(o["valueQuantity"]["code"], "L/min");
        assert_eq!(o["valueQuantity"]["system"], UCUM);
        assert_eq!(o["effectiveDateTime"], "2026-11-21T10:15:00Z");
        assert_eq!(o["subject"]["identifier"]["value"], "MRN-1");
        // The Observation points at the device's metric for the parameter (PoCD), whose
        // category says it is measured.
        assert_eq!(o["device"]["type"], "DeviceMetric");
        assert_eq!(
            o["device"]["identifier"]["system"],
            "https://fhir.ecmo-gateway.org/sid/device-metric/getinge"
        );
        assert_eq!(
            o["device"]["identifier"]["value"],
            "CH-0042:pump-blood-flow"
        );
        assert_eq!(
            r.identifier_value,
            "getinge-cardiohelp:CH-0042:pump-blood-flow:20261121T101500.000Z"
        );
        assert_eq!(o["identifier"][0]["value"], r.identifier_value.as_str());
    }

    #[test]
    fn a_waveform_becomes_one_observation_with_sampled_data() {
        let m = Mappings::embedded().unwrap();
        let device = context(&m, "CARDIOHELP-i");
        let data: Vec<serde_json::Value> =
            serde_json::from_str("[4200, 4250.5, null, -32000, 4300]").unwrap();
        let mut wave = reading("Flow", "", "mL/min");
        wave.value = ReadingValue::Samples {
            period: "8",
            data: &data,
        };
        let r = m.map_reading(&device, &wave).unwrap();
        let o = json(&r);
        // Its identifier is its start and duration: never a single reading's.
        assert_eq!(
            r.identifier_value,
            "getinge-cardiohelp:CH-0042:pump-blood-flow:20261121T101500.000Z/PT0.04S"
        );
        let sampled = &o["valueSampledData"];
        assert_eq!(sampled["origin"]["value"].to_string(), "0");
        assert_eq!(sampled["origin"]["code"], "L/min");
        assert_eq!(sampled["period"].to_string(), "8");
        assert_eq!(sampled["dimensions"].to_string(), "1");
        // Converted and rounded as single readings are; invalid samples (null, the
        // console's marker) are E.
        assert_eq!(sampled["data"], "4.20 4.25 E E 4.30");
        assert!(o.get("valueQuantity").is_none());
        assert_eq!(o["effectiveDateTime"], "2026-11-21T10:15:00Z");
        crate::check_resource_json("Observation", &r.json).unwrap();
        // An EHR that takes XML gets the same waveform.
        let xml = crate::resource_to_xml(&r.json).unwrap();
        let back = crate::resource_from_xml("Observation", &xml).unwrap();
        assert_eq!(back["valueSampledData"]["data"], "4.20 4.25 E E 4.30");
        assert_eq!(back["valueSampledData"]["dimensions"].to_string(), "1");
        assert_eq!(
            crate::ProfileValidator::embedded().unwrap().check(&o),
            vec![]
        );

        // The device's own digits where nothing is converted; exponents written out.
        let data: Vec<serde_json::Value> = serde_json::from_str("[4.125, 4e0]").unwrap();
        let mut same_unit = reading("Flow", "", "L/min");
        same_unit.value = ReadingValue::Samples {
            period: "1.5",
            data: &data,
        };
        let o = json(&m.map_reading(&device, &same_unit).unwrap());
        assert_eq!(o["valueSampledData"]["data"], "4.125 4");
        assert_eq!(o["valueSampledData"]["period"].to_string(), "1.5");

        // A waveform whose last sample is ahead of the clock is refused (10,000 samples of
        // a second from 10:15:00 end hours after the gateway's 10:20).
        let long: Vec<serde_json::Value> = vec![serde_json::json!(4200); 10_000];
        let mut ahead = reading("Flow", "", "mL/min");
        ahead.value = ReadingValue::Samples {
            period: "1000",
            data: &long,
        };
        let error = m.map_reading(&device, &ahead).unwrap_err();
        assert!(
            matches!(
                error,
                ReadingError::Time(crate::datetime::TimeError::InFuture { .. })
            ),
            "{error:?}"
        );

        // A sample out of range is refused by its index; a boolean has no waveform.
        let data: Vec<serde_json::Value> = serde_json::from_str("[4200, 99000]").unwrap();
        wave.value = ReadingValue::Samples {
            period: "8",
            data: &data,
        };
        let error = m.map_reading(&device, &wave).unwrap_err();
        assert!(
            matches!(error, ReadingError::SampleOutOfRange { index: 1, .. }),
            "{error:?}"
        );
        assert_eq!(error.field().name(), "samples");
        let mut bubble = reading("Bubble", "", "");
        bubble.unit = None;
        bubble.value = ReadingValue::Samples {
            period: "8",
            data: &data,
        };
        let error = m.map_reading(&device, &bubble).unwrap_err();
        assert!(
            matches!(error, ReadingError::NotAWaveform { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn declares_a_profile_that_profiles_defines() {
        let m = Mappings::embedded().unwrap();
        let r = m
            .map_reading(
                &context(&m, "CARDIOHELP-i"),
                &reading("Flow", "4.2", "L/min"),
            )
            .unwrap();
        let profile = json(&r)["meta"]["profile"][0].as_str().unwrap().to_owned();
        assert!(crate::profiles().contains(&(profile, "Observation".to_owned())));
    }

    #[test]
    fn converts_units_and_rounds_to_table_precision() {
        let m = Mappings::embedded().unwrap();
        let ctx = context(&m, "CARDIOHELP");
        let flow = json(
            &m.map_reading(&ctx, &reading("Flow", "4250", "mL/min"))
                .unwrap(),
        );
        assert_eq!(flow["valueQuantity"]["value"].to_string(), "4.25");
        let p = json(&m.map_reading(&ctx, &reading("PArt", "30", "kPa")).unwrap());
        assert_eq!(p["valueQuantity"]["value"].to_string(), "225");
        assert_eq!(p["valueQuantity"]["code"], "mm[Hg]");
        let t = json(
            &m.map_reading(&ctx, &reading("TVen", "98.6", "degF"))
                .unwrap(),
        );
        assert_eq!(t["valueQuantity"]["value"].to_string(), "37.0");
    }

    #[test]
    fn invalid_marker_becomes_data_absent_reason() {
        let m = Mappings::embedded().unwrap();
        let o = json(
            &m.map_reading(&context(&m, "CARDIOHELP"), &reading("SvO2", "-32000", "%"))
                .unwrap(),
        );
        assert!(o.get("valueQuantity").is_none());
        assert_eq!(o["dataAbsentReason"]["coding"][0]["code"], "error");
    }

    #[test]
    fn flags_become_interpretation_and_security() {
        let m = Mappings::embedded().unwrap();
        let mut r = reading("PVen", "-80", "mmHg");
        r.flags.insert(ReadingFlags::IN_ALARM);
        r.flags.insert(ReadingFlags::TEST_DATA);
        let o = json(&m.map_reading(&context(&m, "CARDIOHELP"), &r).unwrap());
        assert_eq!(o["interpretation"][0]["coding"][0]["code"], "in-alarm");
        assert_eq!(o["meta"]["security"][0]["code"], "HTEST");
        assert_eq!(o["valueQuantity"]["value"].to_string(), "-80");
    }

    #[test]
    fn booleans_take_0_and_1() {
        let m = Mappings::embedded().unwrap();
        let mut r = reading("Bubble", "1", "");
        r.unit = None;
        let o = json(&m.map_reading(&context(&m, "CARDIOHELP"), &r).unwrap());
        assert_eq!(o["valueBoolean"], true);
        r.value = ReadingValue::Number("2");
        assert!(matches!(
            m.map_reading(&context(&m, "CARDIOHELP"), &r),
            Err(ReadingError::NotABoolean { .. })
        ));
    }

    #[test]
    fn refuses_what_the_table_refuses() {
        let m = Mappings::embedded().unwrap();
        let ctx = context(&m, "CARDIOHELP");
        let err = |r: Reading<'_>| m.map_reading(&ctx, &r).unwrap_err();
        assert!(matches!(
            err(reading("Flw", "4", "L/min")),
            ReadingError::UnknownParameter { .. }
        ));
        assert!(matches!(
            err(reading("Flow", "4", "gal/h")),
            ReadingError::UnitNotAccepted { .. }
        ));
        assert!(matches!(
            err(reading("Flow", "12", "L/min")),
            ReadingError::OutOfRange { .. }
        ));
        assert!(matches!(
            err(reading("Flow", "12000", "mL/min")),
            ReadingError::OutOfRange { .. }
        ));
        let mut late = reading("Flow", "4", "L/min");
        late.time = "2026-11-21T12:00:00Z";
        assert!(matches!(
            err(late),
            ReadingError::Time(crate::TimeError::InFuture { .. })
        ));
        let mut stale = reading("Flow", "4", "L/min");
        stale.time = "2026-11-19T12:00:00Z";
        assert!(matches!(
            err(stale),
            ReadingError::Time(crate::TimeError::TooOld { .. })
        ));
        let mut bad_time = reading("Flow", "4", "L/min");
        bad_time.time = "yesterday";
        assert_eq!(err(bad_time).field(), crate::ReadingField::Time);
    }

    #[test]
    fn quantities_of_fhir_native_observations_follow_the_table() {
        let m = Mappings::embedded().unwrap();
        let family = m.family_for_model("CARDIOHELP").unwrap();
        let flow = family.parameter("Flow").unwrap();
        let checked = family
            .check_quantity(flow, "4200", "mL/min")
            .unwrap()
            .unwrap();
        assert_eq!((checked.decimal.as_str(), checked.ucum), ("4.20", "L/min"));
        assert_eq!(
            family
                .check_quantity(flow, "4.25", "L/min")
                .unwrap()
                .unwrap()
                .decimal,
            "4.25"
        );
        assert!(matches!(
            family.check_quantity(flow, "40", "L/min"),
            Err(ReadingError::OutOfRange { .. })
        ));
        assert!(matches!(
            family.check_quantity(flow, "4", "gal"),
            Err(ReadingError::UnitNotAccepted { .. })
        ));
        assert_eq!(
            family.check_quantity(flow, "-32000", "L/min").unwrap(),
            None
        );
    }

    #[test]
    fn same_instant_in_another_offset_is_the_same_reading() {
        let m = Mappings::embedded().unwrap();
        let ctx = context(&m, "CARDIOHELP");
        let a = m.map_reading(&ctx, &reading("Flow", "4", "L/min")).unwrap();
        let mut r = reading("Flow", "4", "L/min");
        r.time = "2026-11-21T11:15:00+01:00";
        let b = m.map_reading(&ctx, &r).unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.identifier_value, b.identifier_value);
    }
}
