//! A device's parameters as DeviceMetrics, the shape of the HL7 Point-of-Care Device IG
//! (NumericDeviceMetric) and of the German ICU module (MII): one DeviceMetric per parameter of
//! the device's family table, whose `category` says whether the device measures, sets or
//! calculates the value and whose `source` is the device. Each Observation points at its
//! DeviceMetric, so an EHR can chart a set pump speed and a measured one apart without
//! knowing our codes (profiles/research/pocd-and-mii-device-metrics.md).
//!
//! Between the device and its metrics, the PoCD containment tree: each part of the device a
//! parameter comes from (the CodeSystem's `module` property: blood pump, gas supply, pressure
//! monitoring, ...) is a module Device (PoCD VMD, `parent` the device) with one channel Device
//! (PoCD channel, `parent` the module), and the metric's `parent` is that channel. No IEEE
//! 11073 MDC object codes exist for ECMO device parts, so their `type` is our CodeSystem's
//! (the PoCD IG allows another code system where MDC has none).

use std::borrow::Cow;

use fhirbolt::model::r4::resources::{Device, DeviceMetric};
use fhirbolt::model::r4::types::{CodeableConcept, Coding, Identifier, Meta, Reference};

use crate::table::{DeviceFamily, Parameter, ParameterKind};
use crate::{MappedResource, logical_id};

/// Identifier system prefix of DeviceMetrics; the manufacturer slug follows, as for serials.
pub const DEVICE_METRIC_SYSTEM_PREFIX: &str = "https://fhir.ecmo-gateway.org/sid/device-metric/";

/// Identifier system prefix of device modules and channels; the manufacturer slug follows.
pub const DEVICE_COMPONENT_SYSTEM_PREFIX: &str =
    "https://fhir.ecmo-gateway.org/sid/device-component/";

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

/// The identifier value of a device's module (`serial:module`), or of the module's channel
/// (`serial:module/1`), under the family's [`DeviceFamily::component_system`].
pub fn channel_identifier(serial: &str, module: &str, channel: bool) -> String {
    let mut value = format!("{serial}:{module}");
    if channel {
        value.push_str("/1");
    }
    value
}

/// Everything that describes device `serial` to an EHR, parents first: its modules and their
/// channels ([`device_components`]), then its metrics ([`device_metrics`]).
pub fn device_description(
    family: &DeviceFamily,
    serial: &str,
) -> Result<Vec<MappedResource>, String> {
    let mut resources = device_components(family, serial)?;
    resources.extend(device_metrics(family, serial)?);
    Ok(resources)
}

/// The module and channel Devices of device `serial`: for each module its table's parameters
/// use (in table order), the module (parent: the device) and then its channel (parent: the
/// module).
pub fn device_components(
    family: &DeviceFamily,
    serial: &str,
) -> Result<Vec<MappedResource>, String> {
    let mut modules: Vec<&(String, String)> = Vec::new();
    for module in family.parameters().iter().filter_map(|p| p.module.as_ref()) {
        if !modules.contains(&module) {
            modules.push(module);
        }
    }
    let mut components = Vec::with_capacity(modules.len() * 2);
    for kind in modules {
        let (code, display) = kind;
        let module = channel_identifier(serial, code, false);
        components.push(component(
            family,
            &module,
            kind,
            display,
            device_reference(family, serial),
        )?);
        let module_parent = component_reference(family, &module, display);
        let channel = channel_identifier(serial, code, true);
        let channel_display = format!("{display} channel");
        components.push(component(
            family,
            &channel,
            kind,
            &channel_display,
            module_parent,
        )?);
    }
    Ok(components)
}

/// A reference by identifier to device `serial` itself (the PoCD MDS).
fn device_reference(family: &DeviceFamily, serial: &str) -> Reference {
    Reference {
        r#type: Some("Device".into()),
        identifier: Some(Box::new(Identifier {
            system: Some(family.serial_system.as_str().into()),
            value: Some(serial.into()),
            ..Default::default()
        })),
        display: Some(format!("{} {serial}", family.display).into()),
        ..Default::default()
    }
}

/// A reference by identifier to a module or channel Device.
fn component_reference(family: &DeviceFamily, value: &str, display: &str) -> Reference {
    Reference {
        r#type: Some("Device".into()),
        identifier: Some(Box::new(Identifier {
            system: Some(family.component_system.as_str().into()),
            value: Some(value.into()),
            ..Default::default()
        })),
        display: Some(display.into()),
        ..Default::default()
    }
}

/// A module or channel Device: `kind` is the module's code and display in our CodeSystem
/// (the parameter's, as its table took it at load), `text` what this Device is.
fn component(
    family: &DeviceFamily,
    value: &str,
    kind: &(String, String),
    text: &str,
    parent: Reference,
) -> Result<MappedResource, String> {
    let (module, module_display) = kind;
    let device = Device {
        meta: Some(Box::new(Meta {
            profile: vec![crate::DEVICE_COMPONENT_PROFILE.into()],
            ..Default::default()
        })),
        identifier: vec![Identifier {
            system: Some(family.component_system.as_str().into()),
            value: Some(value.into()),
            ..Default::default()
        }],
        r#type: Some(Box::new(CodeableConcept {
            coding: vec![Coding {
                system: Some(crate::ECMO_CODE_SYSTEM.into()),
                code: Some(module.as_str().into()),
                display: Some(module_display.as_str().into()),
                ..Default::default()
            }],
            text: Some(text.into()),
            ..Default::default()
        })),
        parent: Some(Box::new(parent)),
        ..Default::default()
    };
    let json = fhirbolt::json::to_vec(&device, None).map_err(|e| e.to_string())?;
    Ok(MappedResource {
        resource_type: "Device",
        id: logical_id(&family.component_system, value),
        identifier_system: Cow::Owned(family.component_system.clone()),
        identifier_value: value.to_owned(),
        json,
        upsert: false,
    })
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
        source: Some(Box::new(device_reference(family, serial))),
        category: parameter.category.code().into(),
        parent: parameter.module.as_ref().map(|(module, display)| {
            Box::new(component_reference(
                family,
                &channel_identifier(serial, module, true),
                &format!("{display} channel"),
            ))
        }),
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

    #[test]
    fn metrics_hang_under_a_channel_of_a_module_of_the_device_as_pocd_draws_it() {
        let tables = Mappings::embedded().unwrap();
        let validator = crate::ProfileValidator::embedded().unwrap();
        let json =
            |r: &MappedResource| serde_json::from_slice::<serde_json::Value>(&r.json).unwrap();
        for family in tables.families() {
            let described = device_description(family, "SN-1").unwrap();
            let by_identifier: std::collections::HashMap<&str, serde_json::Value> = described
                .iter()
                .map(|r| (r.identifier_value.as_str(), json(r)))
                .collect();
            for resource in &described {
                crate::check_resource_json(resource.resource_type, &resource.json).unwrap();
                let value = json(resource);
                assert_eq!(validator.check(&value), vec![], "{value}");
            }
            // Parents before children, so an EHR that resolves references meets each first.
            let first_metric = described
                .iter()
                .position(|r| r.resource_type == "DeviceMetric")
                .unwrap();
            assert!(
                described[..first_metric]
                    .iter()
                    .all(|r| r.resource_type == "Device")
            );
            for metric in &described[first_metric..] {
                let metric = json(metric);
                let channel_id = metric["parent"]["identifier"]["value"].as_str().unwrap();
                assert_eq!(
                    metric["parent"]["identifier"]["system"],
                    family.component_system.as_str()
                );
                let channel = &by_identifier[channel_id];
                let module_id = channel["parent"]["identifier"]["value"].as_str().unwrap();
                let module = &by_identifier[module_id];
                // The module's parent is the device itself (the MDS), by its serial.
                assert_eq!(module["parent"]["identifier"]["value"], "SN-1");
                assert_eq!(
                    module["parent"]["identifier"]["system"],
                    family.serial_system.as_str()
                );
                assert_eq!(channel["type"]["coding"][0], module["type"]["coding"][0]);
                assert!(channel.get("patient").is_none() && module.get("patient").is_none());
                // The module is the one the CodeSystem gives the metric's parameter.
                let code = metric["type"]["coding"][0]["code"].as_str().unwrap();
                let parameter = family.parameters().iter().find(|p| p.code == code).unwrap();
                assert_eq!(
                    module["type"]["coding"][0]["code"],
                    parameter.module.as_ref().unwrap().0.as_str()
                );
            }
        }
        let cardiohelp = tables.family_for_model("CARDIOHELP-i").unwrap();
        let modules: Vec<String> = device_components(cardiohelp, "CH-1")
            .unwrap()
            .iter()
            .map(|r| r.identifier_value.clone())
            .collect();
        assert_eq!(&modules[..2], ["CH-1:blood-pump", "CH-1:blood-pump/1"]);
        assert!(modules.contains(&"CH-1:circuit-pressure/1".to_owned()));
    }
}
