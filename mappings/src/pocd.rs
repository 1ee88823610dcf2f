//! The gateway's resources checked against the HL7 Point-of-Care Device IG's profiles
//! (`http://hl7.org/fhir/uv/pocd`), whose differentials `profiles/tools/extract_pocd.py` brings
//! in from the IG's source (profiles/pocd; its package is not reachable from here).
//!
//! Checked, read from the differentials: cardinalities (also of slices: choice-type slices such
//! as `value[x]:valueQuantity`, extension slices by their extension's url, and slices of a
//! repeating element told apart by a fixed `system`, such as `identifier:EUI-64`), fixed
//! values, the allowed types of choice elements, and invariants of the form
//! `a.exists() or b.exists()`. Not checked, by what they are: extensible, preferred and example
//! bindings (not rules), and the profiles a reference's target must claim (the target is
//! another resource; the tests follow each reference to its target and check that instead).
//! Anything else in a differential fails the check, so no rule is skipped in silence.

use serde_json::Value;

/// The PoCD profiles, as profiles/pocd holds them.
const POCD_PROFILES: &[(&str, &str)] = &[
    (
        "MdsDevice",
        include_str!("../../profiles/pocd/StructureDefinition-MdsDevice.json"),
    ),
    (
        "VmdDevice",
        include_str!("../../profiles/pocd/StructureDefinition-VmdDevice.json"),
    ),
    (
        "ChannelDevice",
        include_str!("../../profiles/pocd/StructureDefinition-ChannelDevice.json"),
    ),
    (
        "NumericDeviceMetric",
        include_str!("../../profiles/pocd/StructureDefinition-NumericDeviceMetric.json"),
    ),
    (
        "NumericObservation",
        include_str!("../../profiles/pocd/StructureDefinition-NumericObservation.json"),
    ),
    (
        "SampleArrayObservation",
        include_str!("../../profiles/pocd/StructureDefinition-SampleArrayObservation.json"),
    ),
];

/// One step of an element id: an element name and, if sliced, the slice.
struct Step<'a> {
    name: &'a str,
    slice: Option<&'a str>,
}

fn steps(id: &str) -> Vec<Step<'_>> {
    // Slice names may hold dots only in theory; PoCD's do not.
    id.split('.')
        .skip(1)
        .map(|part| match part.split_once(':') {
            Some((name, slice)) => Step {
                name,
                slice: Some(slice),
            },
            None => Step {
                name: part,
                slice: None,
            },
        })
        .collect()
}

/// The values `name` names in `node`: a choice element (`value[x]`) matches every
/// `value<Type>`; arrays are flattened.
fn children<'a>(node: &'a Value, name: &str) -> Vec<(&'a str, &'a Value)> {
    let Some(object) = node.as_object() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (key, value) in object {
        let matches = match name.strip_suffix("[x]") {
            Some(stem) => key
                .strip_prefix(stem)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())),
            None => key == name,
        };
        if matches {
            match value {
                Value::Array(items) => found.extend(items.iter().map(|v| (key.as_str(), v))),
                other => found.push((key.as_str(), other)),
            }
        }
    }
    found
}

/// A PoCD profile's rules, with what a slice selects.
pub struct PocdProfile {
    resource_type: String,
    elements: Vec<Value>,
}

impl PocdProfile {
    pub fn named(name: &str) -> Self {
        let (_, text) = POCD_PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no PoCD profile {name}"));
        let sd: Value = serde_json::from_str(text).expect("profiles/pocd is JSON");
        Self {
            resource_type: sd["type"].as_str().unwrap_or_default().to_owned(),
            elements: sd["differential"]["element"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// The fixed `system` that selects the members of the slice whose element id is `sliced`.
    fn slice_system(&self, sliced: &str) -> Option<&str> {
        let system_id = format!("{sliced}.system");
        self.elements
            .iter()
            .find(|e| e["id"] == system_id.as_str())
            .and_then(|e| e["fixedUri"].as_str().or(e["fixedString"].as_str()))
    }

    /// The nodes element `id` addresses in `resource`.
    fn nodes<'a>(&self, resource: &'a Value, id: &str) -> Result<Vec<&'a Value>, String> {
        let mut nodes = vec![resource];
        let mut sliced = self.resource_type.clone();
        for step in steps(id) {
            sliced.push('.');
            sliced.push_str(step.name);
            let mut next = Vec::new();
            for node in &nodes {
                let found = children(node, step.name);
                match step.slice {
                    None => next.extend(found.into_iter().map(|(_, v)| v)),
                    // A choice-type slice: the element of that type.
                    Some(slice) if step.name.ends_with("[x]") => next.extend(
                        found
                            .into_iter()
                            .filter(|(key, _)| *key == slice)
                            .map(|(_, v)| v),
                    ),
                    Some(slice) if step.name == "extension" => {
                        let url = self.extension_url(&format!("{sliced}:{slice}"), slice);
                        next.extend(
                            found
                                .into_iter()
                                .map(|(_, v)| v)
                                .filter(|v| v["url"] == url.as_str()),
                        );
                    }
                    Some(slice) => {
                        let system =
                            self.slice_system(&format!("{sliced}:{slice}"))
                                .ok_or_else(|| {
                                    format!("{id}: slice {slice} has no fixed system to select by")
                                })?;
                        next.extend(
                            found
                                .into_iter()
                                .map(|(_, v)| v)
                                .filter(|v| v["system"] == system),
                        );
                    }
                }
            }
            if let Some(slice) = step.slice {
                sliced.push(':');
                sliced.push_str(slice);
            }
            nodes = next;
        }
        Ok(nodes)
    }

    /// An extension slice's url: its type's profile, or (inside a complex extension) its name.
    fn extension_url(&self, sliced_id: &str, slice: &str) -> String {
        self.elements
            .iter()
            .find(|e| e["id"] == sliced_id)
            .and_then(|e| e["type"][0]["profile"][0].as_str())
            .unwrap_or(slice)
            .to_owned()
    }

    /// Every rule of the profile `resource` breaks.
    pub fn check(&self, resource: &Value) -> Vec<String> {
        let mut broken = Vec::new();
        if resource["resourceType"] != self.resource_type.as_str() {
            return vec![format!("not a {}", self.resource_type)];
        }
        for element in &self.elements {
            let id = element["id"].as_str().unwrap_or_default();
            let (parent_id, own) = match id.rfind('.') {
                Some(at) => (&id[..at], Some(&id[at + 1..])),
                None => (id, None),
            };
            let mut problem = |what: String| broken.push(format!("{id}: {what}"));
            for (key, rule) in element.as_object().into_iter().flatten() {
                match key.as_str() {
                    "id" | "path" | "sliceName" | "min" | "max" | "type" => {}
                    "binding" if rule["strength"] != "required" => {}
                    "constraint" => {
                        for constraint in rule.as_array().into_iter().flatten() {
                            let expression = constraint["expression"].as_str().unwrap_or_default();
                            let alternatives: Option<Vec<&str>> = expression
                                .split(" or ")
                                .map(|p| p.trim().strip_suffix(".exists()"))
                                .collect();
                            let Some(alternatives) = alternatives.filter(|_| own.is_none()) else {
                                problem(format!("invariant '{expression}' cannot be checked"));
                                continue;
                            };
                            let holds = alternatives.iter().any(|name| {
                                !children(resource, name).is_empty()
                                    || !children(resource, &format!("{name}[x]")).is_empty()
                            });
                            if !holds {
                                problem(format!("invariant {expression} does not hold"));
                            }
                        }
                    }
                    fixed if fixed.starts_with("fixed") => match self.nodes(resource, id) {
                        Ok(found) => {
                            for v in found {
                                if v != rule {
                                    problem(format!("must be {rule}, is {v}"));
                                }
                            }
                        }
                        Err(e) => problem(e),
                    },
                    other => {
                        // A required binding of an element the resource does not have binds
                        // nothing; anything else is a rule this check does not know.
                        let absent = self.nodes(resource, id).is_ok_and(|n| n.is_empty());
                        if !(other == "binding" && absent) {
                            problem(format!("'{other}' cannot be checked"));
                        }
                    }
                }
            }
            let Some(own) = own else { continue };
            let min = element["min"].as_u64().unwrap_or(0) as usize;
            let max = match element["max"].as_str() {
                None | Some("*") => None,
                Some(m) => m.parse::<usize>().ok(),
            };
            let parents = match self.nodes(resource, parent_id) {
                Ok(parents) => parents,
                Err(e) => {
                    broken.push(e);
                    continue;
                }
            };
            for parent in parents {
                // The element (or slice) within this parent, as if the parent were the root.
                let count = match self.nodes(parent, &format!("{}.{own}", self.resource_type)) {
                    Ok(found) => found.len(),
                    Err(e) => {
                        broken.push(e);
                        continue;
                    }
                };
                if count < min || max.is_some_and(|m| count > m) {
                    broken.push(format!(
                        "{id}: {count} found, {min}..{} allowed",
                        max.map_or("*".to_owned(), |m| m.to_string())
                    ));
                }
            }
            // The types a choice element may take.
            if own.ends_with("[x]")
                && let Some(types) = element["type"].as_array()
            {
                let stem = own.trim_end_matches("[x]");
                let allowed: Vec<String> = types
                    .iter()
                    .filter_map(|t| t["code"].as_str())
                    .map(|code| {
                        let mut name = stem.to_owned();
                        let mut chars = code.chars();
                        if let Some(first) = chars.next() {
                            name.extend(first.to_uppercase());
                            name.push_str(chars.as_str());
                        }
                        name
                    })
                    .collect();
                if let Ok(parents) = self.nodes(resource, parent_id) {
                    for parent in parents {
                        for (key, _) in children(parent, own) {
                            if !allowed.iter().any(|a| a == key) {
                                broken.push(format!("{id}: {key} is not one of {allowed:?}"));
                            }
                        }
                    }
                }
            }
        }
        broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mappings;
    use std::collections::HashMap;

    fn json(resource: &crate::MappedResource) -> Value {
        serde_json::from_slice(&resource.json).unwrap()
    }

    #[test]
    fn the_checker_finds_what_breaks_a_pocd_profile() {
        let vmd = PocdProfile::named("VmdDevice");
        let good = serde_json::json!({"resourceType": "Device",
            "type": {"text": "pump"}, "parent": {"display": "console"}});
        assert_eq!(vmd.check(&good), Vec::<String>::new());
        let mut orphan = good.clone();
        orphan.as_object_mut().unwrap().remove("parent");
        orphan["patient"] = serde_json::json!({"display": "someone"});
        let broken = vmd.check(&orphan);
        assert!(
            broken
                .iter()
                .any(|b| b.starts_with("Device.parent: 0 found, 1..")),
            "{broken:?}"
        );
        assert!(
            broken
                .iter()
                .any(|b| b.starts_with("Device.patient: 1 found, 0..0")),
            "{broken:?}"
        );
        // A slice selected by its fixed system, and a fixed value within it.
        let mds = PocdProfile::named("MdsDevice");
        let two_eui64 = serde_json::json!({"resourceType": "Device", "type": {"text": "x"},
            "identifier": [
                {"system": "urn:oid:1.2.840.10004.1.1.1.0.0.1.0.0.1.2680", "value": "01-02"},
                {"system": "urn:oid:1.2.840.10004.1.1.1.0.0.1.0.0.1.2680", "value": "03-04"},
                {"system": "https://serials", "value": "SN"}]});
        let broken = mds.check(&two_eui64);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(
            broken[0].starts_with("Device.identifier:EUI-64: 2 found, 0..1"),
            "{broken:?}"
        );
        // Invariants and choice-type slices.
        let numeric = PocdProfile::named("NumericObservation");
        let no_value = serde_json::json!({"resourceType": "Observation", "code": {"text": "x"},
            "subject": {"display": "p"}, "effectiveDateTime": "2026-01-01T00:00:00Z",
            "device": {"display": "m"}, "valueQuantity": {"unit": "%"}});
        let broken = numeric.check(&no_value);
        assert!(
            broken
                .iter()
                .any(|b| b.contains("valueQuantity.value: 0 found, 1..")),
            "{broken:?}"
        );
        let mut boolean = no_value.clone();
        boolean.as_object_mut().unwrap().remove("valueQuantity");
        boolean["valueBoolean"] = serde_json::json!(true);
        let broken = numeric.check(&boolean);
        assert!(
            broken
                .iter()
                .any(|b| b.contains("valueBoolean is not one of")),
            "{broken:?}"
        );
    }

    /// Every resource the gateway writes for a device's data, against the PoCD profile of its
    /// kind: the device (MDS), its modules (VMD) and channels, its metrics, its readings and
    /// waveforms; each reference followed to a resource of the profile it must claim.
    #[test]
    fn the_gateways_device_resources_meet_the_pocd_profiles() {
        let tables = Mappings::embedded().unwrap();
        let profile = |name| PocdProfile::named(name);
        let mut checked: HashMap<&str, usize> = HashMap::new();
        let mut check = |name: &'static str, resource: &Value| {
            let broken = profile(name).check(resource);
            assert!(broken.is_empty(), "{name}: {broken:?}\n{resource}");
            *checked.entry(name).or_default() += 1;
        };
        for family in tables.families() {
            let console = crate::circuit_device(&crate::ConsoleView {
                serial: "SN-1".into(),
                model: family.models[0].clone(),
                eui64: Some("01-23-45-67-89-AB-CD-EF".into()),
                manufacturer: family.manufacturer.clone(),
                serial_system: family.serial_system.clone(),
                device_type: family.device_type.0.clone(),
                device_type_display: family.device_type.1.clone(),
            })
            .unwrap();
            check("MdsDevice", &json(&console));
            let described: HashMap<String, Value> = crate::device_description(family, "SN-1")
                .unwrap()
                .iter()
                .map(|r| (r.identifier_value.clone(), json(r)))
                .collect();
            for metric in described
                .values()
                .filter(|r| r["resourceType"] == "DeviceMetric")
            {
                check("NumericDeviceMetric", metric);
                // source: the MDS; parent: a channel whose parent is a VMD whose parent is it.
                assert_eq!(metric["source"]["identifier"]["value"], "SN-1");
                let channel = &described[metric["parent"]["identifier"]["value"].as_str().unwrap()];
                check("ChannelDevice", channel);
                let module = &described[channel["parent"]["identifier"]["value"].as_str().unwrap()];
                check("VmdDevice", module);
                assert_eq!(module["parent"]["identifier"]["value"], "SN-1");
            }
        }
        for sample in tables.shape_samples().unwrap() {
            if sample.resource.resource_type != "Observation" {
                continue;
            }
            let observation = json(&sample.resource);
            // Without its patient a reading would break the profile (subject 1..1): the
            // gateway never writes one (a reading needs a patient or a run that gives one).
            let mut orphan = observation.clone();
            orphan.as_object_mut().unwrap().remove("subject");
            assert!(!profile("NumericObservation").check(&orphan).is_empty());
            if observation.get("valueSampledData").is_some() {
                check("SampleArrayObservation", &observation);
            } else if observation.get("valueBoolean").is_none() {
                check("NumericObservation", &observation);
            }
        }
        for name in [
            "MdsDevice",
            "VmdDevice",
            "ChannelDevice",
            "NumericDeviceMetric",
            "NumericObservation",
            "SampleArrayObservation",
        ] {
            assert!(
                checked.get(name).is_some_and(|&n| n > 0),
                "nothing checked against {name}"
            );
        }
    }
}
