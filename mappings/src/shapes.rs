//! Every shape of Observation (and DeviceMetric) a table can build, as samples: each parameter with each accepted
//! unit, booleans both ways, a value the device marked invalid, every flag, with and without a
//! run. The gateway checks each sample against base R4 and the profiles once, when it loads
//! the tables, instead of re-checking every resource it builds at run time; the tests prove
//! the rendered JSON identical to fhirbolt's model for the same samples.
//!
//! What varies inside one shape is text the ingest schema has already checked (serials,
//! patient identifiers, times, JSON number digits), which the R4 primitive rules accept.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::reading::{DeviceContext, PatientRef, Reading, ReadingFlags, ReadingValue, RunLink};
use crate::table::{DeviceFamily, Mappings, Parameter, ParameterKind};
use crate::{MappedResource, ReadingError, TimeWindow};

/// One built sample and what it stands for.
#[derive(Debug, Clone)]
pub struct ShapeSample {
    /// `<family>/<parameter> <variant>`, for the error that names a broken shape.
    pub shape: String,
    pub resource: MappedResource,
}

/// The inputs of one sample, owned.
pub(crate) struct SampleInput {
    pub shape: String,
    pub value: SampleValue,
    pub unit: Option<String>,
    pub flags: ReadingFlags,
    pub in_run: bool,
}

pub(crate) enum SampleValue {
    Number(String),
    Boolean(bool),
    /// A waveform every 8 ms: valid samples, and one the device marked invalid.
    Waveform(Vec<serde_json::Value>),
}

const EVERY_FLAG: ReadingFlags = ReadingFlags::QUESTIONABLE
    .union(ReadingFlags::CALIBRATING)
    .union(ReadingFlags::IN_ALARM)
    .union(ReadingFlags::ALARMS_INHIBITED)
    .union(ReadingFlags::TEST_DATA);

/// The sample inputs of one parameter.
pub(crate) fn inputs(family: &DeviceFamily, parameter: &Parameter) -> Vec<SampleInput> {
    let name = format!("{}/{}", family.id, parameter.vendor);
    let mut samples = Vec::new();
    let mut push = |variant: &str, value, unit: Option<&str>, flags, in_run| {
        samples.push(SampleInput {
            shape: format!("{name} {variant}"),
            value,
            unit: unit.map(str::to_owned),
            flags,
            in_run,
        })
    };
    match &parameter.kind {
        ParameterKind::Quantity {
            decimals,
            low,
            high,
            accepts,
            ..
        } => {
            let mut units: Vec<_> = accepts.iter().collect();
            units.sort_by(|a, b| a.0.cmp(b.0));
            let middle = (low + high) / 2.0;
            for (unit, rule) in units {
                let raw = (middle - rule.offset) / rule.factor;
                let text = format!("{:.*}", usize::from(*decimals), raw);
                let value = || SampleValue::Number(text.clone());
                push(
                    &format!("in {unit}"),
                    value(),
                    Some(unit),
                    ReadingFlags::default(),
                    false,
                );
                push(
                    &format!("in {unit}, every flag, in a run"),
                    value(),
                    Some(unit),
                    EVERY_FLAG,
                    true,
                );
                push(
                    &format!("in {unit}, marked invalid"),
                    value(),
                    Some(unit),
                    ReadingFlags::INVALID,
                    true,
                );
                let number = |text: &str| {
                    serde_json::Value::Number(text.parse().expect("a formatted f64 is a number"))
                };
                push(
                    &format!("waveform in {unit}, every flag, in a run"),
                    SampleValue::Waveform(vec![
                        number(&text),
                        serde_json::Value::Null,
                        number(&text),
                    ]),
                    Some(unit),
                    EVERY_FLAG,
                    true,
                );
                push(
                    &format!("waveform in {unit}, marked invalid"),
                    SampleValue::Waveform(vec![number(&text)]),
                    Some(unit),
                    ReadingFlags::INVALID,
                    false,
                );
                for marker in &family.invalid_markers {
                    push(
                        &format!("in {unit}, invalid marker {marker}"),
                        SampleValue::Number(marker.to_string()),
                        Some(unit),
                        ReadingFlags::default(),
                        false,
                    );
                }
            }
        }
        ParameterKind::Boolean => {
            for b in [false, true] {
                push(
                    &format!("{b}"),
                    SampleValue::Boolean(b),
                    None,
                    ReadingFlags::default(),
                    false,
                );
                push(
                    &format!("{b}, every flag, in a run"),
                    SampleValue::Boolean(b),
                    None,
                    EVERY_FLAG,
                    true,
                );
            }
            push(
                "as 1",
                SampleValue::Number("1".into()),
                None,
                ReadingFlags::default(),
                false,
            );
            push(
                "marked invalid",
                SampleValue::Boolean(true),
                None,
                ReadingFlags::INVALID,
                true,
            );
        }
    }
    samples
}

/// A sample's reading and the device context it is mapped in.
pub(crate) fn with_reading<T>(
    family: &DeviceFamily,
    parameter: &Parameter,
    input: &SampleInput,
    f: impl FnOnce(&DeviceContext<'_>, &Reading<'_>) -> T,
) -> T {
    let now = OffsetDateTime::now_utc();
    let time = (now - time::Duration::minutes(1))
        .format(&Rfc3339)
        .unwrap_or_default();
    let patient = PatientRef {
        system: "urn:oid:1.2.36.146.595.217.0.1",
        value: "MRN-SHAPE-1",
    };
    let model = family.models.first().map(String::as_str).unwrap_or("model");
    let context = DeviceContext {
        family,
        serial: "SHAPE-0001",
        model,
        patient: (!input.in_run).then_some(patient),
        window: TimeWindow {
            received_at: now,
            max_future_skew: time::Duration::minutes(5),
            max_past_age: time::Duration::hours(24),
        },
    };
    let reading = Reading {
        parameter: &parameter.vendor,
        value: match &input.value {
            SampleValue::Number(text) => ReadingValue::Number(text),
            SampleValue::Boolean(b) => ReadingValue::Boolean(*b),
            SampleValue::Waveform(data) => ReadingValue::Samples { period: "8", data },
        },
        unit: input.unit.as_deref(),
        time: &time,
        flags: input.flags,
        run: input.in_run.then_some(RunLink {
            run_id: "RUN-SHAPE-1",
            patient,
        }),
    };
    f(&context, &reading)
}

impl Mappings {
    /// Every shape of Observation these tables build, built. An error names a sample the
    /// table itself refuses (and why), which a table check at load should have caught.
    pub fn shape_samples(&self) -> Result<Vec<ShapeSample>, String> {
        let mut samples = Vec::new();
        for family in self.families() {
            for parameter in family.parameters() {
                for input in inputs(family, parameter) {
                    let resource = with_reading(family, parameter, &input, |context, reading| {
                        self.map_reading(context, reading)
                    })
                    .map_err(|e: ReadingError| format!("{}: {e}", input.shape))?;
                    samples.push(ShapeSample {
                        shape: input.shape,
                        resource,
                    });
                }
            }
            // The modules, channels and DeviceMetrics its Observations point at: only the
            // serial varies.
            for resource in crate::device_description(family, "SHAPE-0001")? {
                samples.push(ShapeSample {
                    shape: format!(
                        "{}/{} {}",
                        family.id, resource.identifier_value, resource.resource_type
                    ),
                    resource,
                });
            }
        }
        Ok(samples)
    }
}
