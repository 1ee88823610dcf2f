//! Our FHIR conformance resources (profiles/fhir): the CodeSystem, ValueSets, extension
//! definitions and the profiles every emitted resource declares in `meta.profile`. Embedded so
//! the gateway can serve and check them; `profiles/tools/build_conformance.py` writes them.

/// Every file of profiles/fhir, with its text. A test keeps this list equal to the directory.
pub const CONFORMANCE_RESOURCES: &[(&str, &str)] = &[
    (
        "CodeSystem-ecmo.json",
        include_str!("../../profiles/fhir/CodeSystem-ecmo.json"),
    ),
    (
        "StructureDefinition-cannula-role.json",
        include_str!("../../profiles/fhir/StructureDefinition-cannula-role.json"),
    ),
    (
        "StructureDefinition-complication-time.json",
        include_str!("../../profiles/fhir/StructureDefinition-complication-time.json"),
    ),
    (
        "StructureDefinition-device-use-period.json",
        include_str!("../../profiles/fhir/StructureDefinition-device-use-period.json"),
    ),
    (
        "StructureDefinition-ecmo-age-group.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-age-group.json"),
    ),
    (
        "StructureDefinition-ecmo-circuit-observation.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-circuit-observation.json"),
    ),
    (
        "StructureDefinition-ecmo-console-device.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-console-device.json"),
    ),
    (
        "StructureDefinition-ecmo-device-component.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-device-component.json"),
    ),
    (
        "StructureDefinition-ecmo-device-metric.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-device-metric.json"),
    ),
    (
        "StructureDefinition-ecmo-run-activity-procedure.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-run-activity-procedure.json"),
    ),
    (
        "StructureDefinition-ecmo-run-procedure.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-run-procedure.json"),
    ),
    (
        "StructureDefinition-ecmo-support-type.json",
        include_str!("../../profiles/fhir/StructureDefinition-ecmo-support-type.json"),
    ),
    (
        "StructureDefinition-laterality.json",
        include_str!("../../profiles/fhir/StructureDefinition-laterality.json"),
    ),
    (
        "ValueSet-ecmo-age-groups.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-age-groups.json"),
    ),
    (
        "ValueSet-ecmo-cannula-roles.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-cannula-roles.json"),
    ),
    (
        "ValueSet-ecmo-circuit-parameters.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-circuit-parameters.json"),
    ),
    (
        "ValueSet-ecmo-device-modules.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-device-modules.json"),
    ),
    (
        "ValueSet-ecmo-device-types.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-device-types.json"),
    ),
    (
        "ValueSet-ecmo-discontinuation-reasons.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-discontinuation-reasons.json"),
    ),
    (
        "ValueSet-ecmo-interval-statistics.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-interval-statistics.json"),
    ),
    (
        "ValueSet-ecmo-measurement-status.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-measurement-status.json"),
    ),
    (
        "ValueSet-ecmo-modes.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-modes.json"),
    ),
    (
        "ValueSet-ecmo-observation-status.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-observation-status.json"),
    ),
    (
        "ValueSet-ecmo-run-activities.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-run-activities.json"),
    ),
    (
        "ValueSet-ecmo-support-types.json",
        include_str!("../../profiles/fhir/ValueSet-ecmo-support-types.json"),
    ),
];

/// Canonical URLs of the profiles the builders declare.
pub const OBSERVATION_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-circuit-observation";
pub const RUN_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-run-procedure";
pub const RUN_ACTIVITY_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-run-activity-procedure";
pub const DEVICE_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-console-device";
pub const DEVICE_COMPONENT_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-device-component";
pub const DEVICE_METRIC_PROFILE: &str =
    "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-device-metric";

/// (url, resource type it constrains) of every StructureDefinition in profiles/fhir.
pub fn profiles() -> Vec<(String, String)> {
    CONFORMANCE_RESOURCES
        .iter()
        .filter_map(|(_, text)| serde_json::from_str::<serde_json::Value>(text).ok())
        .filter(|r| r["resourceType"] == "StructureDefinition")
        .filter_map(|r| {
            Some((
                r["url"].as_str()?.to_owned(),
                r["type"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_list_is_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/fhir");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = CONFORMANCE_RESOURCES.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            on_disk, embedded,
            "add new profiles/fhir files to CONFORMANCE_RESOURCES"
        );
    }

    #[test]
    fn every_conformance_resource_is_valid_r4() {
        for (file, text) in CONFORMANCE_RESOURCES {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            let resource_type = value["resourceType"].as_str().unwrap();
            crate::check_resource_json(resource_type, text.as_bytes())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(
                value["url"]
                    .as_str()
                    .unwrap()
                    .starts_with(crate::CANONICAL_BASE),
                "{file}: canonical URL under our base"
            );
        }
    }

    #[test]
    fn every_referenced_value_set_and_extension_is_defined() {
        let urls: Vec<String> = CONFORMANCE_RESOURCES
            .iter()
            .map(|(_, t)| {
                serde_json::from_str::<serde_json::Value>(t).unwrap()["url"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        fn references(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, item) in map {
                        match (key.as_str(), item) {
                            ("valueSet", serde_json::Value::String(url)) => out.push(url.clone()),
                            ("profile" | "targetProfile", serde_json::Value::Array(urls)) => out
                                .extend(urls.iter().filter_map(|u| u.as_str().map(str::to_owned))),
                            _ => references(item, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|i| references(i, out)),
                _ => {}
            }
        }
        let mut checked = 0;
        for (file, text) in CONFORMANCE_RESOURCES {
            let mut found = Vec::new();
            references(&serde_json::from_str(text).unwrap(), &mut found);
            for url in found
                .iter()
                .filter(|u| u.starts_with(crate::CANONICAL_BASE))
            {
                assert!(
                    urls.contains(url),
                    "{file} references {url}, which profiles/fhir does not define"
                );
                checked += 1;
            }
        }
        assert!(checked > 10, "the walk found the references ({checked})");
        for name in [
            "ecmo-support-type",
            "ecmo-age-group",
            "cannula-role",
            "laterality",
            "complication-time",
        ] {
            let url = format!("{}/StructureDefinition/{name}", crate::CANONICAL_BASE);
            assert!(
                urls.contains(&url),
                "extension {name} used by the builders is defined"
            );
        }
    }
}
