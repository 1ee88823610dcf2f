//! A device's parameters as DeviceMetrics, the shape of the HL7 Point-of-Care Device IG
//! (NumericDeviceMetric) and of the German ICU module (MII): one DeviceMetric per parameter of
//! the device's family table, whose `category` says whether the device measures, sets or
//! calculates the value and whose `source` is the device. Each Observation points at its
//! DeviceMetric, so an EHR can chart a set pump speed and a measured one apart without
//! knowing our codes (profiles/research/pocd-and-mii-device-metrics.md).
//!
//! Not (yet) the PoCD containment tree: there is no VMD or Channel Device between the console
//! and its metrics (`parent` is left out), since no MDC object codes exist for ECMO modules.

use std::borrow::Cow;

use fhirbolt::model::r4::resources::DeviceMetric;
use fhirbolt::model::r4::types::{CodeableConcept, Coding, Identifier, Meta, Reference};

use crate::table::{DeviceFamily, Parameter, ParameterKind};
use crate::{MappedResource, logical_id};

/// Identifier system prefix of DeviceMetrics; the manufacturer slug follows, as for serials.
pub const DEVICE_METRIC_SYSTEM_PREFIX: &str = "https://fhir.ecmo-gateway.org/sid/device-metric/";

/// FHIR's DeviceMetric.category (`http://hl7.org/fhir/metric-category`), less `unspecified`:
/// every parameter of a table is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricCategory {
    Measurement,
    Setting,
    Calculation,
}

impl MetricCategory {
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "measurement" => Some(Self::Measurement),
            "setting" => Some(Self::Setting),
            "calculation" => Some(Self::Calculation),
            _ => None,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::Measurement => "measurement",
            Self::Setting => "setting",
            Self::Calculation => "calculation",
        }
    }
}

/// The business identifier value of one device's metric for one parameter: `serial:code`
/// (serials may not contain `:`, the ingest schema forbids it), under the family's
/// [`DeviceFamily::metric_system`].
pub fn metric_identifier(serial: &str, code: &str) -> String {
    let mut value = String::with_capacity(serial.len() + 1 + code.len());
    value.push_str(serial);
    value.push(':');
    value.push_str(code);
    value
}

/// The serial number and code of a [`metric_identifier`] value, if it is one.
pub fn parse_metric_identifier(value: &str) -> Option<(&str, &str)> {
    value.rsplit_once(':')
}

/// The serial number in a [`metric_identifier`] value.
pub fn serial_of_metric(value: &str) -> &str {
    parse_metric_identifier(value).map_or(value, |(serial, _)| serial)
}

/// The DeviceMetrics of device `serial` of `family`: one per code its table maps, in table
/// order. Created once, like the Device; should a table change one (a coding added), the
/// outbox sends the new content as an update.
pub fn device_metrics(family: &DeviceFamily, serial: &str) -> Result<Vec<MappedResource>, String> {
    let mut metrics: Vec<MappedResource> = Vec::with_capacity(family.parameters().len());
    let mut seen: Vec<&str> = Vec::with_capacity(family.parameters().len());
    for parameter in family.parameters() {
        if seen.contains(&parameter.code.as_str()) {
            continue;
        }
        seen.push(&parameter.code);
        metrics.push(device_metric(family, serial, parameter)?);
    }
    Ok(metrics)
}

fn device_metric(
    family: &DeviceFamily,
    serial: &str,
    parameter: &Parameter,
) -> Result<MappedResource, String> {
    let value = metric_identifier(serial, &parameter.code);
    let coding = std::iter::once((
        crate::ECMO_CODE_SYSTEM,
        parameter.code.as_str(),
        parameter.display.as_str(),
    ))
    .chain(
        parameter
            .codings
            .iter()
            .map(|(s, c, d)| (s.as_str(), c.as_str(), d.as_str())),
    )
    .map(|(system, code, display)| Coding {
        system: Some(system.into()),
        code: Some(code.into()),
        display: Some(display.into()),
        ..Default::default()
    })
    .collect();
    let unit = match &parameter.kind {
        ParameterKind::Quantity { ucum, display, .. } => Some(Box::new(CodeableConcept {
            coding: vec![Coding {
                system: Some(crate::UCUM.into()),
                code: Some(ucum.as_str().into()),
                display: Some(display.as_str().into()),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ParameterKind::Boolean => None,
    };
    let metric = DeviceMetric {
        meta: Some(Box::new(Meta {
            profile: vec![crate::DEVICE_METRIC_PROFILE.into()],
            ..Default::default()
        })),
        identifier: vec![Identifier {
            system: Some(family.metric_system.as_str().into()),
            value: Some(value.as_str().into()),
            ..Default::default()
        }],
        r#type: Box::new(CodeableConcept {
            coding,
            text: Some(parameter.display.as_str().into()),
            ..Default::default()
        }),
        unit,
        source: Some(Box::new(Reference {
            r#type: Some("Device".into()),
            identifier: Some(Box::new(Identifier {
                system: Some(family.serial_system.as_str().into()),
                value: Some(serial.into()),
                ..Default::default()
            })),
            display: Some(format!("{} {serial}", family.display).into()),
            ..Default::default()
        })),
        category: parameter.category.code().into(),
        ..Default::default()
    };
    let json = fhirbolt::json::to_vec(&metric, None).map_err(|e| e.to_string())?;
    Ok(MappedResource {
        resource_type: "DeviceMetric",
        id: logical_id(&family.metric_system, &value),
        identifier_system: Cow::Owned(family.metric_system.clone()),
        identifier_value: value,
        json,
        upsert: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mappings;

    #[test]
    fn each_parameter_of_a_device_is_a_device_metric_of_its_category() {
        let tables = Mappings::embedded().unwrap();
        let cardiohelp = tables.family_for_model("CARDIOHELP-i").unwrap();
        let metrics = device_metrics(cardiohelp, "CH-0042").unwrap();
        let codes: Vec<&str> = cardiohelp
            .parameters()
            .iter()
            .map(|p| p.code.as_str())
            .collect();
        assert_eq!(metrics.len(), codes.len(), "one per code the table maps");
        let validator = crate::ProfileValidator::embedded().unwrap();
        for metric in &metrics {
            crate::check_resource_json("DeviceMetric", &metric.json).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&metric.json).unwrap();
            assert_eq!(validator.check(&value), vec![], "{value}");
        }
        let speed_setting = metrics
            .iter()
            .find(|m| m.identifier_value == "CH-0042:pump-speed-setting")
            .unwrap();
        let value: serde_json::Value = serde_json::from_slice(&speed_setting.json).unwrap();
        assert_eq!(value["category"], "setting");
        assert_eq!(value["type"]["coding"][0]["code"], "pump-speed-setting");
        assert_eq!(value["unit"]["coding"][0]["code"], "/min");
        assert_eq!(value["source"]["type"], "Device");
        assert_eq!(value["source"]["identifier"]["value"], "CH-0042");
        assert_eq!(
            speed_setting.identifier_system,
            "https://fhir.ecmo-gateway.org/sid/device-metric/getinge"
        );
        assert!(!speed_setting.upsert, "created once");
        let flow: serde_json::Value = serde_json::from_slice(
            &metrics
                .iter()
                .find(|m| m.identifier_value == "CH-0042:pump-blood-flow")
                .unwrap()
                .json,
        )
        .unwrap();
        assert_eq!(flow["category"], "measurement");
        assert_eq!(flow["type"]["coding"][1]["code"], "251288004");
        let bubble: serde_json::Value = serde_json::from_slice(
            &metrics
                .iter()
                .find(|m| m.identifier_value == "CH-0042:bubble-detected")
                .unwrap()
                .json,
        )
        .unwrap();
        assert!(bubble.get("unit").is_none(), "a yes/no value has no unit");
        assert_eq!(serial_of_metric("CH-0042:pump-speed-setting"), "CH-0042");
    }
}
