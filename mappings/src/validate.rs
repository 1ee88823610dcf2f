//! Checking emitted resources against our profiles, with the rules read from the
//! StructureDefinitions in profiles/fhir (not hard-coded): cardinality (`min`/`max`, also of
//! extension slices), fixed and pattern values, allowed types of choice elements, required
//! bindings to our ValueSets (also of our extensions' values), and invariants.
//!
//! No Rust FHIRPath engine is mature enough to rely on, so invariants are limited to
//! disjunctions of `x.exists()`; a profile with any other expression fails to load, so no rule
//! is ever skipped silently. Base R4 structure is checked separately
//! ([`crate::check_resource_json`]).

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::CONFORMANCE_RESOURCES;

/// One broken rule: which profile, which rule, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileIssue {
    pub profile: String,
    pub rule: String,
    /// Element path, e.g. `Observation.identifier.system`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ProfileIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}): {}",
            self.path, self.rule, self.profile, self.message
        )
    }
}

#[derive(Debug, Clone)]
enum Rule {
    Card {
        min: usize,
        max: Option<usize>,
    },
    Fixed(Value),
    Pattern(Vec<(String, String)>),
    Types(Vec<String>),
    Binding(String),
    Slice {
        url: String,
        min: usize,
        max: Option<usize>,
    },
}

#[derive(Debug, Clone)]
struct ElementRule {
    /// Path segments after the resource type.
    path: Vec<String>,
    rule: Rule,
}

#[derive(Debug, Clone)]
struct Profile {
    url: String,
    resource_type: String,
    rules: Vec<ElementRule>,
    /// (key, alternatives): at least one of the element names must exist.
    invariants: Vec<(String, Vec<String>)>,
}

/// All our profiles and ValueSets, compiled once.
#[derive(Debug, Clone)]
pub struct ProfileValidator {
    profiles: HashMap<String, Profile>,
    /// ValueSet url -> system -> codes.
    value_sets: HashMap<String, HashMap<String, HashSet<String>>>,
    /// Extension url -> ValueSet its value is bound to.
    extension_bindings: HashMap<String, String>,
}

fn cardinality(element: &Value) -> (Option<usize>, Option<Option<usize>>) {
    let min = element["min"].as_u64().map(|m| m as usize);
    let max = element["max"]
        .as_str()
        .map(|m| if m == "*" { None } else { m.parse().ok() });
    (min, max)
}

impl ProfileValidator {
    pub fn embedded() -> Result<Self, String> {
        let resources: Vec<Value> = CONFORMANCE_RESOURCES
            .iter()
            .map(|(file, text)| serde_json::from_str(text).map_err(|e| format!("{file}: {e}")))
            .collect::<Result<_, _>>()?;
        let mut value_sets = HashMap::new();
        for vs in resources.iter().filter(|r| r["resourceType"] == "ValueSet") {
            let mut codes: HashMap<String, HashSet<String>> = HashMap::new();
            for include in vs["compose"]["include"].as_array().into_iter().flatten() {
                let system = include["system"].as_str().unwrap_or_default();
                for concept in include["concept"].as_array().into_iter().flatten() {
                    codes
                        .entry(system.to_owned())
                        .or_default()
                        .insert(concept["code"].as_str().unwrap_or_default().to_owned());
                }
            }
            value_sets.insert(vs["url"].as_str().unwrap_or_default().to_owned(), codes);
        }
        let mut profiles = HashMap::new();
        let mut extension_bindings = HashMap::new();
        for sd in resources
            .iter()
            .filter(|r| r["resourceType"] == "StructureDefinition")
        {
            let url = sd["url"].as_str().unwrap_or_default().to_owned();
            let resource_type = sd["type"].as_str().unwrap_or_default().to_owned();
            let mut rules = Vec::new();
            let mut invariants = Vec::new();
            for element in sd["differential"]["element"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let id = element["id"].as_str().unwrap_or_default();
                let path: Vec<String> = element["path"]
                    .as_str()
                    .unwrap_or_default()
                    .split('.')
                    .skip(1)
                    .map(str::to_owned)
                    .collect();
                if resource_type == "Extension" {
                    if id == "Extension.value[x]"
                        && let Some(vs) = element["binding"]["valueSet"].as_str()
                    {
                        extension_bindings.insert(url.clone(), vs.to_owned());
                    }
                    continue;
                }
                for constraint in element["constraint"].as_array().into_iter().flatten() {
                    let key = constraint["key"].as_str().unwrap_or_default();
                    let expression = constraint["expression"].as_str().unwrap_or_default();
                    let alternatives: Option<Vec<String>> = expression
                        .split(" or ")
                        .map(|part| part.trim().strip_suffix(".exists()").map(str::to_owned))
                        .collect();
                    match alternatives {
                        Some(names) if !names.is_empty() => {
                            invariants.push((key.to_owned(), names))
                        }
                        _ => {
                            return Err(format!(
                                "{url}: invariant {key}: only 'x.exists() or y.exists()' expressions are supported"
                            ));
                        }
                    }
                }
                let (min, max) = cardinality(element);
                if let Some(slice) = element["sliceName"].as_str() {
                    let ext = element["type"][0]["profile"][0]
                        .as_str()
                        .ok_or_else(|| format!("{url}: slice {slice} names no extension"))?;
                    rules.push(ElementRule {
                        path,
                        rule: Rule::Slice {
                            url: ext.to_owned(),
                            min: min.unwrap_or(0),
                            max: max.flatten(),
                        },
                    });
                    continue;
                }
                if path.is_empty() {
                    continue;
                }
                if min.is_some() || max.is_some() {
                    rules.push(ElementRule {
                        path: path.clone(),
                        rule: Rule::Card {
                            min: min.unwrap_or(0),
                            max: max.flatten(),
                        },
                    });
                }
                for (key, value) in element.as_object().into_iter().flatten() {
                    if key.starts_with("fixed") {
                        rules.push(ElementRule {
                            path: path.clone(),
                            rule: Rule::Fixed(value.clone()),
                        });
                    } else if key == "patternCodeableConcept" {
                        let codings = value["coding"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|c| {
                                (
                                    c["system"].as_str().unwrap_or_default().to_owned(),
                                    c["code"].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect();
                        rules.push(ElementRule {
                            path: path.clone(),
                            rule: Rule::Pattern(codings),
                        });
                    }
                }
                if path.last().is_some_and(|p| p.ends_with("[x]"))
                    && let Some(types) = element["type"].as_array()
                {
                    let types = types
                        .iter()
                        .filter_map(|t| t["code"].as_str().map(str::to_owned))
                        .collect();
                    rules.push(ElementRule {
                        path: path.clone(),
                        rule: Rule::Types(types),
                    });
                }
                if element["binding"]["strength"] == "required"
                    && let Some(vs) = element["binding"]["valueSet"].as_str()
                {
                    if !value_sets.contains_key(vs) {
                        return Err(format!(
                            "{url}: {id} is bound to {vs}, which profiles/fhir does not define"
                        ));
                    }
                    rules.push(ElementRule {
                        path: path.clone(),
                        rule: Rule::Binding(vs.to_owned()),
                    });
                }
            }
            profiles.insert(
                url.clone(),
                Profile {
                    url,
                    resource_type,
                    rules,
                    invariants,
                },
            );
        }
        Ok(Self {
            profiles,
            value_sets,
            extension_bindings,
        })
    }

    /// Every rule `resource` breaks of the profiles in its `meta.profile` (a resource that
    /// declares none of ours breaks that rule too).
    pub fn check(&self, resource: &Value) -> Vec<ProfileIssue> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let declared: Vec<&str> = resource["meta"]["profile"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let profiles: Vec<&Profile> = declared
            .iter()
            .filter_map(|p| self.profiles.get(*p))
            .collect();
        let mut issues = Vec::new();
        if profiles.is_empty() {
            issues.push(ProfileIssue {
                profile: "-".into(),
                rule: "meta.profile".into(),
                path: format!("{resource_type}.meta.profile"),
                message: "declares none of the gateway's profiles".into(),
            });
        }
        for profile in profiles {
            let issue = |rule: &str, path: &[String], message: String| ProfileIssue {
                profile: profile.url.clone(),
                rule: rule.to_owned(),
                path: std::iter::once(resource_type.to_owned())
                    .chain(path.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("."),
                message,
            };
            if profile.resource_type != resource_type {
                issues.push(issue(
                    "type",
                    &[],
                    format!(
                        "profile is for {}, resource is {resource_type}",
                        profile.resource_type
                    ),
                ));
                continue;
            }
            for rule in &profile.rules {
                let (parent, last) = rule.path.split_at(rule.path.len().saturating_sub(1));
                let Some(last) = last.first() else { continue };
                for owner in nodes(resource, parent) {
                    let found = children(owner, last);
                    match &rule.rule {
                        Rule::Card { min, max } => {
                            if found.len() < *min || max.is_some_and(|m| found.len() > m) {
                                let max = max.map_or("*".to_owned(), |m| m.to_string());
                                issues.push(issue(
                                    "cardinality",
                                    &rule.path,
                                    format!("{} found, {min}..{max} allowed", found.len()),
                                ));
                            }
                        }
                        Rule::Fixed(value) => {
                            for (_, v) in &found {
                                if *v != value {
                                    issues.push(issue(
                                        "fixed value",
                                        &rule.path,
                                        format!("must be {value}, is {v}"),
                                    ));
                                }
                            }
                        }
                        Rule::Pattern(codings) => {
                            for (_, concept) in &found {
                                if !codings.iter().all(|(s, c)| has_coding(concept, s, c)) {
                                    issues.push(issue(
                                        "pattern",
                                        &rule.path,
                                        format!("must carry the coding(s) {codings:?}"),
                                    ));
                                }
                            }
                        }
                        Rule::Types(types) => {
                            for (key, _) in &found {
                                let stem = last.trim_end_matches("[x]");
                                let suffix = key.strip_prefix(stem).unwrap_or_default();
                                if !types.iter().any(|t| t.eq_ignore_ascii_case(suffix)) {
                                    issues.push(issue(
                                        "type",
                                        &rule.path,
                                        format!("{key} is not one of the allowed types {types:?}"),
                                    ));
                                }
                            }
                        }
                        Rule::Binding(vs) => {
                            for (_, concept) in &found {
                                if !self.in_value_set(concept, vs) {
                                    issues.push(issue(
                                        "required binding",
                                        &rule.path,
                                        format!("no coding from {vs}"),
                                    ));
                                }
                            }
                        }
                        Rule::Slice { url, min, max } => {
                            let count = found
                                .iter()
                                .filter(|(_, e)| e["url"] == url.as_str())
                                .count();
                            if count < *min || max.is_some_and(|m| count > m) {
                                issues.push(issue(
                                    "extension slice",
                                    &rule.path,
                                    format!(
                                        "{count} extension(s) {url}, {min}..{} allowed",
                                        max.map_or("*".to_owned(), |m| m.to_string())
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
            for (key, alternatives) in &profile.invariants {
                if !alternatives
                    .iter()
                    .any(|name| !children(resource, name).is_empty())
                {
                    issues.push(issue(
                        &format!("invariant {key}"),
                        &[],
                        format!("one of {alternatives:?} must exist"),
                    ));
                }
            }
        }
        self.check_extensions(resource, &mut vec![resource_type], &mut issues);
        issues
    }

    /// Our extensions' values must come from the ValueSet their definition binds. `at` is the
    /// path so far, joined only when there is something to report.
    fn check_extensions<'a>(
        &self,
        value: &'a Value,
        at: &mut Vec<&'a str>,
        issues: &mut Vec<ProfileIssue>,
    ) {
        match value {
            Value::Object(map) => {
                if let (Some(url), Some(concept)) = (
                    map.get("url").and_then(Value::as_str),
                    map.get("valueCodeableConcept"),
                ) && let Some(vs) = self.extension_bindings.get(url)
                    && !self.in_value_set(concept, vs)
                {
                    issues.push(ProfileIssue {
                        profile: url.to_owned(),
                        rule: "required binding".into(),
                        path: at.join("."),
                        message: format!("no coding from {vs}"),
                    });
                }
                for (key, item) in map {
                    if item.is_object() || item.is_array() {
                        at.push(key);
                        self.check_extensions(item, at, issues);
                        at.pop();
                    }
                }
            }
            Value::Array(items) => items
                .iter()
                .for_each(|i| self.check_extensions(i, at, issues)),
            _ => {}
        }
    }

    fn in_value_set(&self, concept: &Value, vs: &str) -> bool {
        let Some(codes) = self.value_sets.get(vs) else {
            return false;
        };
        // A `code` element: its system is the one the ValueSet draws from.
        if let Some(code) = concept.as_str() {
            return codes.values().any(|in_system| in_system.contains(code));
        }
        concept["coding"].as_array().into_iter().flatten().any(|c| {
            c["system"]
                .as_str()
                .and_then(|system| codes.get(system))
                .is_some_and(|in_system| {
                    c["code"]
                        .as_str()
                        .is_some_and(|code| in_system.contains(code))
                })
        })
    }
}

fn has_coding(concept: &Value, system: &str, code: &str) -> bool {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["system"] == system && c["code"] == code)
}

/// The values at `path` below `value`, arrays flattened.
fn nodes<'a>(value: &'a Value, path: &[String]) -> Vec<&'a Value> {
    let mut current = vec![value];
    for segment in path {
        current = current
            .into_iter()
            .flat_map(|v| children(v, segment).into_iter().map(|(_, c)| c))
            .collect();
    }
    current
}

/// The children of `value` named `name` (a `[x]` name matches every typed variant, and so does
/// a choice element named without `[x]`, as our invariants do), arrays flattened, with the key
/// they were found under.
fn children<'a>(value: &'a Value, name: &str) -> Vec<(&'a str, &'a Value)> {
    let Some(map) = value.as_object() else {
        return vec![];
    };
    let mut found = Vec::new();
    let mut push = |key: &'a str, v: &'a Value| match v {
        Value::Array(items) => found.extend(items.iter().map(|i| (key, i))),
        other => found.push((key, other)),
    };
    let stem = name.strip_suffix("[x]");
    match map.get_key_value(name) {
        Some((key, v)) if stem.is_none() => push(key, v),
        _ => {
            let stem = stem.unwrap_or(name);
            for (key, v) in map {
                if key
                    .strip_prefix(stem)
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                {
                    push(key, v);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{DeviceContext, PatientRef, Reading, ReadingFlags, ReadingValue};
    use crate::table::Mappings;
    use serde_json::json;

    fn observation() -> Value {
        let m = Mappings::embedded().unwrap();
        let context = DeviceContext {
            family: m.family_for_model("CARDIOHELP-i").unwrap(),
            serial: "CH-1",
            model: "CARDIOHELP-i",
            patient: Some(PatientRef {
                system: "urn:oid:1.2.3",
                value: "MRN",
            }),
            window: crate::TimeWindow {
                received_at: time::macros::datetime!(2026-11-21 10:20 UTC),
                max_future_skew: time::Duration::minutes(5),
                max_past_age: time::Duration::hours(24),
            },
        };
        let reading = Reading {
            parameter: "Flow",
            value: ReadingValue::Number("4.2"),
            unit: Some("L/min"),
            time: "2026-11-21T10:15:00Z",
            flags: ReadingFlags::default(),
            run: None,
        };
        serde_json::from_slice(&m.map_reading(&context, &reading).unwrap().json).unwrap()
    }

    fn rules_broken(v: &Value) -> Vec<String> {
        ProfileValidator::embedded()
            .unwrap()
            .check(v)
            .into_iter()
            .map(|i| format!("{} {}", i.rule, i.path))
            .collect()
    }

    #[test]
    fn built_resources_follow_their_profiles() {
        assert!(
            rules_broken(&observation()).is_empty(),
            "{:?}",
            rules_broken(&observation())
        );
    }

    #[test]
    fn each_kind_of_rule_is_enforced() {
        let mut o = observation();
        o["identifier"][0].as_object_mut().unwrap().remove("system");
        assert_eq!(
            rules_broken(&o),
            ["cardinality Observation.identifier.system"]
        );

        let mut o = observation();
        o["status"] = json!("preliminary");
        assert_eq!(rules_broken(&o), ["required binding Observation.status"]);
        o["status"] = json!("amended");
        assert!(rules_broken(&o).is_empty());

        let mut o = observation();
        o["code"]["coding"] = json!([{"system": "http://loinc.org", "code": "8867-4"}]);
        assert_eq!(rules_broken(&o), ["required binding Observation.code"]);

        let mut o = observation();
        let effective = o
            .as_object_mut()
            .unwrap()
            .remove("effectiveDateTime")
            .unwrap();
        o["effectiveInstant"] = effective.clone();
        assert_eq!(rules_broken(&o), ["type Observation.effective[x]"]);
        // A charting interval's statistic: the interval, and the statistic as the method.
        o.as_object_mut().unwrap().remove("effectiveInstant");
        o["effectivePeriod"] = json!({"start": effective});
        o["method"] =
            json!({"coding": [{"system": crate::OBSERVATION_STATISTICS, "code": "average"}]});
        assert!(rules_broken(&o).is_empty());
        o["method"]["coding"][0]["code"] = json!("median");
        assert_eq!(rules_broken(&o), ["required binding Observation.method"]);

        let mut o = observation();
        o.as_object_mut().unwrap().remove("valueQuantity");
        assert_eq!(rules_broken(&o), ["invariant ecmo-obs-1 Observation"]);

        let mut o = observation();
        o["meta"]["profile"] = json!(["http://example.org/other"]);
        assert_eq!(rules_broken(&o), ["meta.profile Observation.meta.profile"]);
    }

    #[test]
    fn extension_slices_and_bindings_are_enforced() {
        let run = crate::run::tests_support::run();
        let p = crate::procedure_for_run(&run).unwrap();
        let mut v: Value = serde_json::from_slice(&p.json).unwrap();
        assert!(rules_broken(&v).is_empty(), "{:?}", rules_broken(&v));
        v["bodySite"][0]["extension"]
            .as_array_mut()
            .unwrap()
            .retain(|e| !e["url"].as_str().unwrap().ends_with("cannula-role"));
        assert_eq!(
            rules_broken(&v),
            ["extension slice Procedure.bodySite.extension"]
        );
        let mut v: Value = serde_json::from_slice(&p.json).unwrap();
        v["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] = json!("nonsense");
        assert_eq!(rules_broken(&v), ["required binding Procedure.extension"]);
        let mut v: Value = serde_json::from_slice(&p.json).unwrap();
        v["partOf"] = json!([{"reference": "Procedure/1"}]);
        assert_eq!(rules_broken(&v), ["cardinality Procedure.partOf"]);
    }
}
