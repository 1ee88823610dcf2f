//! References as the reference EHR checks them when it is told to need literal ones (as most
//! hospital EHRs do): a reference by identifier alone to a resource it holds is refused, a
//! literal one must point to something it holds, and in a transaction a `urn:uuid:` reference
//! to another entry's `fullUrl` is replaced by that entry's id once written.

use std::collections::HashMap;

use serde_json::Value;

/// Types a reference must reach literally: what this EHR holds.
pub const HELD_TYPES: [&str; 6] = [
    "Patient",
    "Device",
    "DeviceMetric",
    "Procedure",
    "Observation",
    "Encounter",
];

/// Every `reference` string in `resource`.
pub fn literal(resource: &Value) -> Vec<String> {
    fn walk(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(reference)) = map.get("reference") {
                    found.push(reference.clone());
                }
                map.values().for_each(|v| walk(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(resource, &mut found);
    found
}

/// The first reference by identifier alone to a type this EHR holds, as `Type system|value`.
pub fn by_identifier_only(resource: &Value) -> Option<String> {
    fn walk(value: &Value, top: bool) -> Option<String> {
        match value {
            Value::Object(map) => {
                if !top
                    && !map.contains_key("reference")
                    && let (Some(Value::String(kind)), Some(identifier)) =
                        (map.get("type"), map.get("identifier"))
                    && HELD_TYPES.contains(&kind.as_str())
                {
                    return Some(format!(
                        "{kind} {}|{}",
                        identifier["system"].as_str().unwrap_or_default(),
                        identifier["value"].as_str().unwrap_or_default()
                    ));
                }
                map.values().find_map(|v| walk(v, false))
            }
            Value::Array(items) => items.iter().find_map(|v| walk(v, false)),
            _ => None,
        }
    }
    walk(resource, true)
}

/// Replaces each `reference` found in `targets` (a `fullUrl`) by its value (`Type/id`).
pub fn rewrite(resource: &mut Value, targets: &HashMap<String, String>) {
    match resource {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get_mut("reference")
                && let Some(target) = targets.get(reference.as_str())
            {
                *reference = target.clone();
            }
            map.values_mut().for_each(|v| rewrite(v, targets));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(v, targets)),
        _ => {}
    }
}

/// `Type/id` of a literal reference (relative, or absolute under `base`), if it is one.
pub fn type_and_id<'a>(reference: &'a str, base: &str) -> Option<(&'a str, &'a str)> {
    let relative = reference
        .strip_prefix(base)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(reference);
    let mut parts = relative.split('/');
    let kind = parts.next()?;
    let id = parts.next()?;
    (kind.chars().next()?.is_ascii_uppercase() && !id.is_empty()).then_some((kind, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_rewrites_and_refuses_references() {
        let mut o = json!({
            "identifier": [{"system": "s", "value": "own"}],
            "subject": {"type": "Patient", "identifier": {"system": "urn:oid:1", "value": "MRN"}},
            "device": {"reference": "urn:uuid:1", "type": "Device"},
            "performer": [{"type": "Organization", "identifier": {"system": "o", "value": "v"}}]
        });
        assert_eq!(
            by_identifier_only(&o).as_deref(),
            Some("Patient urn:oid:1|MRN")
        );
        o["subject"]["reference"] = json!("Patient/7");
        assert_eq!(
            by_identifier_only(&o),
            None,
            "an Organization may stay logical"
        );
        rewrite(
            &mut o,
            &[("urn:uuid:1".to_owned(), "Device/3".to_owned())].into(),
        );
        assert_eq!(literal(&o), vec!["Patient/7", "Device/3"]);
        assert_eq!(
            type_and_id("https://e/fhir/Device/3", "https://e/fhir"),
            Some(("Device", "3"))
        );
        assert_eq!(type_and_id("urn:uuid:1", "https://e/fhir"), None);
    }
}
