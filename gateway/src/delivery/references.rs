//! Literal references for EHRs that want them (`references = "literal"`): most hospital EHRs
//! take `subject: {reference: "Patient/123"}` and refuse, or silently drop, a reference by
//! identifier alone, which is what the gateway builds (it cannot know the EHR's ids).
//!
//! Per destination and per request, each reference by identifier to a resource the EHR holds
//! (Patient, Device, DeviceMetric, Procedure, Observation, Encounter) gets its `reference`, the identifier
//! kept beside it:
//! - a resource in the same transaction: its entry's `fullUrl` (`urn:uuid:`), which the EHR
//!   replaces with the id it creates or finds;
//! - with client-assigned ids (`write = "put"`), a resource the gateway writes: `Type/<id>`,
//!   known without asking;
//! - otherwise the id the EHR gave it: learned from the EHR's answers to the gateway's own
//!   writes, or found by a search on the identifier; both cached for `reference_cache_ttl`.
//!
//! A reference that finds nothing (a patient not yet registered at the EHR, a console whose
//! Device has not arrived yet) or more than one match is not guessed: the resource is held and
//! tried again later, or for an unknown patient dead-lettered if the destination says so
//! (`unknown_patient`). What refers to a held resource in the same request waits with it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use mappings::MappedResource;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde_json::Value;

use crate::config::WriteMode;
use crate::delivery::DeliveryError;
use crate::delivery::client::EhrClient;

/// The resource types whose references are made literal: those an EHR holds. Others (the
/// vendor's Organization in a Provenance) stay logical, as R4 allows.
const RESOLVED_TYPES: [&str; 6] = [
    "Patient",
    "Device",
    "DeviceMetric",
    "Procedure",
    "Observation",
    "Encounter",
];

/// Types the gateway writes itself: a miss means "not delivered yet", never a policy matter.
const OWN_TYPES: [&str; 4] = ["Device", "DeviceMetric", "Procedure", "Observation"];

/// Cached ids at most; beyond it the expired ones go, then all.
const MAX_CACHED: usize = 100_000;

/// Characters escaped in a search value (`|` and the system's `/`, `:` stay readable).
const SEARCH_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'|')
    .remove(b'/')
    .remove(b':');

/// How a destination references what its resources point to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceStyle {
    /// `{type, identifier}`: the EHR matches by identifier (what FHIR servers that resolve
    /// logical references, and registries, take).                                   (default)
    #[default]
    Identifier,
    /// `{reference: "Patient/123", type, identifier}`: what most EHRs need.
    Literal,
}

/// What happens to a resource whose patient the EHR does not know (or knows twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownPatient {
    /// Tried again with backoff (the patient may be registered later); dead-lettered once its
    /// attempts are used up.                                                         (default)
    #[default]
    Hold,
    /// Dead-lettered at once, for an operator to look at and replay.
    DeadLetter,
}

/// Whether Observations are linked to the patient's Encounter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncounterLink {
    /// No `encounter` is added.                                                    (default)
    #[default]
    None,
    /// The patient's one `in-progress` Encounter at the EHR (found by search, cached), for
    /// EHRs that file device data under the current visit; without one the reading is held
    /// (or dead-lettered, as `unknown_patient` says).
    Current,
}

/// Why one resource cannot be written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: String,
    /// Try again later, rather than dead-letter.
    pub hold: bool,
}

/// One destination's references: its cache of EHR ids, and how it treats a miss.
pub struct LiteralReferences {
    base: String,
    write: WriteMode,
    ttl: Duration,
    unknown_patient: UnknownPatient,
    encounter: EncounterLink,
    cache: Mutex<HashMap<(String, String), (String, Instant)>>,
}

/// A reference by identifier found in a resource: its type and `system|value`.
type Key = (String, String);

impl LiteralReferences {
    pub fn new(
        base: &str,
        write: WriteMode,
        ttl: Duration,
        unknown_patient: UnknownPatient,
    ) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            write,
            ttl,
            unknown_patient,
            encounter: EncounterLink::None,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Observations also get the patient's current Encounter.
    pub fn with_encounter(mut self, encounter: EncounterLink) -> Self {
        self.encounter = encounter;
        self
    }

    /// With `encounter = "current"`: links an Observation that names a patient (literally by
    /// now) and no encounter to the patient's in-progress Encounter; why not, if it cannot.
    async fn link_encounter(
        &self,
        client: &EhrClient,
        destination: &str,
        resource: &MappedResource,
        value: &mut Value,
    ) -> Result<Option<Unresolved>, DeliveryError> {
        if self.encounter != EncounterLink::Current
            || resource.resource_type != "Observation"
            || value.get("encounter").is_some()
        {
            return Ok(None);
        }
        let Some(patient) = value["subject"]["reference"]
            .as_str()
            .filter(|r| r.starts_with("Patient/"))
            .map(str::to_owned)
        else {
            return Ok(None);
        };
        let key: Key = ("Encounter?patient".into(), patient.clone());
        let id = match self.cached(&key) {
            Some(id) => id,
            None => {
                let ids = find_with(
                    client,
                    &self.base,
                    destination,
                    "Encounter",
                    &[("patient", &patient), ("status", "in-progress")],
                )
                .await?;
                match ids.as_slice() {
                    [id] => {
                        self.remember(key, id.clone());
                        id.clone()
                    }
                    _ => {
                        return Ok(Some(Unresolved {
                            reason: format!(
                                "the destination has {} in-progress Encounters of {patient} (encounter = \"current\" needs one)",
                                ids.len()
                            ),
                            hold: self.unknown_patient == UnknownPatient::Hold,
                        }));
                    }
                }
            }
        };
        if let Value::Object(map) = value {
            // After `subject`, where FHIR's element order puts it.
            let rest = std::mem::take(map);
            for (name, item) in rest {
                let subject = name == "subject";
                map.insert(name, item);
                if subject {
                    map.insert(
                        "encounter".into(),
                        serde_json::json!({"reference": format!("Encounter/{id}")}),
                    );
                }
            }
        }
        Ok(None)
    }

    fn cached(&self, key: &Key) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(id, _)| id.clone())
    }

    fn remember(&self, key: Key, id: String) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (_, at)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (id, Instant::now()));
    }

    /// Learns the EHR's id of a resource the gateway wrote, from its answer's location
    /// (`Observation/123/_history/1`).
    pub fn learn(&self, resource: &MappedResource, location: Option<&str>) {
        let Some(location) = location else { return };
        let path = location
            .strip_prefix(&self.base)
            .unwrap_or(location)
            .trim_start_matches('/');
        let mut parts = path.split('/');
        if let (Some(kind), Some(id)) = (parts.next(), parts.next())
            && kind == resource.resource_type
            && !id.is_empty()
        {
            self.remember(key_of(resource), id.to_owned());
        }
    }

    /// `resources` (one request's worth) with literal references; `together`: they go in one
    /// transaction, so they may point to each other by `fullUrl`. Each comes back rewritten,
    /// or with why it must wait; a failed search fails them all.
    pub async fn rewrite(
        &self,
        client: &EhrClient,
        destination: &str,
        resources: &[MappedResource],
        together: bool,
    ) -> Result<Vec<Result<MappedResource, Unresolved>>, DeliveryError> {
        let in_request: HashMap<Key, usize> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| (key_of(r), i))
            .collect();
        let mut parsed: Vec<Value> = Vec::with_capacity(resources.len());
        for resource in resources {
            parsed.push(serde_json::from_slice(&resource.json).map_err(|e| {
                DeliveryError::Unsupported(format!("stored resource is not JSON: {e}"))
            })?);
        }
        // Every reference by identifier, per resource, and the displays they carry.
        let mut displays: HashMap<Key, String> = HashMap::new();
        let wanted: Vec<Vec<Key>> = parsed
            .iter()
            .map(|resource| {
                references_of(resource)
                    .into_iter()
                    .map(|(key, display)| {
                        if let Some(display) = display {
                            displays.entry(key.clone()).or_insert(display);
                        }
                        key
                    })
                    .collect()
            })
            .collect();
        // What must be looked up: neither in this transaction nor known in advance nor cached.
        let mut found: HashMap<Key, Result<String, Unresolved>> = HashMap::new();
        for key in wanted.iter().flatten() {
            if found.contains_key(key) || (together && in_request.contains_key(key)) {
                continue;
            }
            if let Some(id) = self.known_id(key) {
                found.insert(key.clone(), Ok(id));
            } else if let Some(id) = self.cached(key) {
                found.insert(key.clone(), Ok(id));
            } else if !together && in_request.contains_key(key) {
                // Sent before its referrers in this same batch, one at a time: learned then.
                continue;
            } else {
                let mut result = self.search(client, destination, key).await?;
                if key.0 == "Device" && result.as_ref().is_err_and(|u| u.matches == 0) {
                    // A console the EHR has not met (its readings came before any run event
                    // that writes its Device): written now, minimal, by conditional create.
                    result = Ok(self
                        .create_device(client, destination, key, displays.get(key))
                        .await?);
                }
                let result = result.map_err(|u| u.unresolved);
                if let Ok(id) = &result {
                    self.remember(key.clone(), id.clone());
                }
                found.insert(key.clone(), result);
            }
        }
        let mut outcome: Vec<Result<MappedResource, Unresolved>> =
            Vec::with_capacity(resources.len());
        for ((resource, mut value), keys) in resources.iter().zip(parsed).zip(&wanted) {
            let mut failure = None;
            let mut targets: HashMap<&Key, String> = HashMap::new();
            for key in keys {
                let target = if let Some(id) = self.known_id(key) {
                    Ok(format!("{}/{id}", key.0))
                } else if together && let Some(&i) = in_request.get(key) {
                    Ok(crate::delivery::request_builder::full_url_of(
                        &self.base,
                        self.write,
                        &resources[i],
                    ))
                } else if let Some(found) = found.get(key) {
                    found.clone().map(|id| format!("{}/{id}", key.0))
                } else if let Some(id) = self.cached(key) {
                    Ok(format!("{}/{id}", key.0))
                } else {
                    Err(self.miss(key, 0))
                };
                match target {
                    Ok(reference) => {
                        targets.insert(key, reference);
                    }
                    Err(unresolved) => {
                        failure = Some(unresolved);
                        break;
                    }
                }
            }
            let failure = match failure {
                Some(unresolved) => Some(unresolved),
                None => {
                    set_references(&mut value, &targets);
                    self.link_encounter(client, destination, resource, &mut value)
                        .await?
                }
            };
            outcome.push(match failure {
                Some(unresolved) => Err(unresolved),
                None => {
                    let mut rewritten = resource.clone();
                    rewritten.json = serde_json::to_vec(&value)
                        .map_err(|e| DeliveryError::Unsupported(format!("resource JSON: {e}")))?;
                    Ok(rewritten)
                }
            });
        }
        // In a transaction, what points to a resource that waits waits too.
        if together {
            loop {
                let waiting: Vec<Key> = outcome
                    .iter()
                    .zip(resources)
                    .filter(|(o, _)| o.is_err())
                    .map(|(_, r)| key_of(r))
                    .collect();
                let mut changed = false;
                for (i, keys) in wanted.iter().enumerate() {
                    if outcome[i].is_ok()
                        && let Some(key) = keys.iter().find(|k| waiting.contains(k))
                    {
                        outcome[i] = Err(Unresolved {
                            reason: format!("waits for {} {} of the same batch", key.0, key.1),
                            hold: true,
                        });
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
        }
        Ok(outcome)
    }

    /// The id of a resource the gateway writes with a client-assigned id: known in advance.
    fn known_id(&self, key: &Key) -> Option<String> {
        (self.write == WriteMode::Put && OWN_TYPES.contains(&key.0.as_str())).then(|| {
            let (system, value) = key.1.split_once('|').unwrap_or(("", &key.1));
            mappings::logical_id(system, value)
        })
    }

    /// Why `key` cannot be referenced, when `matches` resources carry its identifier.
    fn miss(&self, key: &Key, matches: usize) -> Unresolved {
        let (kind, token) = (&key.0, &key.1);
        let what = if matches == 0 {
            format!("the destination has no {kind} with identifier {token}")
        } else {
            format!(
                "the destination has {matches} {kind}s with identifier {token}: which one is meant cannot be told"
            )
        };
        if OWN_TYPES.contains(&kind.as_str()) {
            Unresolved {
                reason: format!("{what} yet (written by the gateway; tried again)"),
                hold: true,
            }
        } else {
            Unresolved {
                reason: what,
                hold: !(kind == "Patient" && self.unknown_patient == UnknownPatient::DeadLetter),
            }
        }
    }

    /// `POST [base]/Device` with `If-None-Exist` on its identifier: the id of the console's
    /// Device, written from what the reference says of it (identifier, display).
    async fn create_device(
        &self,
        client: &EhrClient,
        destination: &str,
        key: &Key,
        display: Option<&String>,
    ) -> Result<String, DeliveryError> {
        let (system, value) = key.1.split_once('|').unwrap_or(("", &key.1));
        let device = serde_json::json!({
            "resourceType": "Device",
            "identifier": [{"system": system, "value": value}],
            "status": "active",
            "deviceName": [{"name": display.map_or(value, String::as_str), "type": "user-friendly-name"}],
        });
        let condition = format!("identifier={}", utf8_percent_encode(&key.1, SEARCH_VALUE));
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/Device", self.base))
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .header(header::ACCEPT, "application/fhir+json")
            .header("if-none-exist", condition)
            .body(Full::new(Bytes::from(device.to_string())))
            .map_err(|e| DeliveryError::Unsupported(e.to_string()))?;
        let entry =
            crate::delivery::response::classify::single(destination, client.send(request).await)?;
        entry
            .location
            .as_deref()
            .and_then(|l| {
                let path = l
                    .strip_prefix(&self.base)
                    .unwrap_or(l)
                    .trim_start_matches('/');
                path.strip_prefix("Device/")?
                    .split('/')
                    .next()
                    .map(str::to_owned)
            })
            .filter(|id| !id.is_empty())
            .ok_or_else(|| DeliveryError::Unavailable {
                destination: destination.to_owned(),
                reason: "the EHR's answer to a Device create has no Location".into(),
                retry_after: None,
            })
    }

    /// `GET [base]/[type]?identifier=system|value`: the one match's id, or why there is none.
    async fn search(
        &self,
        client: &EhrClient,
        destination: &str,
        key: &Key,
    ) -> Result<Result<String, Miss>, DeliveryError> {
        let ids = find(
            client,
            &self.base,
            destination,
            &key.0,
            "identifier",
            &key.1,
        )
        .await?;
        Ok(match ids.as_slice() {
            [id] => Ok(id.clone()),
            _ => Err(Miss {
                matches: ids.len(),
                unresolved: self.miss(key, ids.len()),
            }),
        })
    }
}

/// The ids of the `resource_type` resources whose `parameter` (`identifier`, or `_tag` for a
/// Provenance) is `token` at the destination (at most two: enough to tell one from many).
pub async fn find(
    client: &EhrClient,
    base: &str,
    destination: &str,
    resource_type: &str,
    parameter: &str,
    token: &str,
) -> Result<Vec<String>, DeliveryError> {
    find_with(
        client,
        base,
        destination,
        resource_type,
        &[(parameter, token)],
    )
    .await
}

/// The ids of the `resource_type` resources that match every `(parameter, value)` (at most
/// two: enough to tell one from many).
async fn find_with(
    client: &EhrClient,
    base: &str,
    destination: &str,
    resource_type: &str,
    criteria: &[(&str, &str)],
) -> Result<Vec<String>, DeliveryError> {
    let query: Vec<String> = criteria
        .iter()
        .map(|(parameter, value)| {
            format!("{parameter}={}", utf8_percent_encode(value, SEARCH_VALUE))
        })
        .collect();
    let parameter = criteria.first().map_or("", |(p, _)| *p);
    let url = format!("{base}/{resource_type}?{}&_count=2", query.join("&"));
    let request = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .header(header::ACCEPT, "application/fhir+json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| DeliveryError::Unsupported(e.to_string()))?;
    let unavailable = |reason: String| DeliveryError::Unavailable {
        destination: destination.to_owned(),
        reason,
        retry_after: None,
    };
    let response = client.send(request).await.map_err(|e| {
        unavailable(format!(
            "search {resource_type}: {}",
            crate::error_chain(e.as_ref())
        ))
    })?;
    let status = response.status();
    if !status.is_success() {
        let reason = format!("search of {resource_type} by {parameter}: HTTP {status}");
        return Err(if crate::delivery::retry::is_retryable_status(status) {
            unavailable(reason)
        } else {
            DeliveryError::Misconfigured {
                destination: destination.to_owned(),
                reason: format!("{reason} (the gateway needs it to find what it wrote before)"),
            }
        });
    }
    let bundle: Value = serde_json::from_slice(response.body())
        .map_err(|e| unavailable(format!("search answer is not JSON: {e}")))?;
    Ok(matches(&bundle, resource_type))
}

/// A search that found no one match: how many, and what that means for the resource.
struct Miss {
    matches: usize,
    unresolved: Unresolved,
}

/// The key a resource is referenced by: its type and `system|value`.
fn key_of(resource: &MappedResource) -> Key {
    (
        resource.resource_type.to_owned(),
        format!(
            "{}|{}",
            resource.identifier_system, resource.identifier_value
        ),
    )
}

/// The ids of the `resource_type` matches of a searchset (includes and outcomes left out).
fn matches(bundle: &Value, resource_type: &str) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"].as_str().is_none_or(|m| m == "match"))
        .filter(|e| e["resource"]["resourceType"] == resource_type)
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
        .collect()
}

/// Whether `value` is a Reference by identifier to a type that is made literal.
fn logical_reference(value: &serde_json::Map<String, Value>) -> Option<Key> {
    if value.contains_key("reference") {
        return None;
    }
    let kind = value.get("type")?.as_str()?;
    if !RESOLVED_TYPES.contains(&kind) {
        return None;
    }
    let identifier = value.get("identifier")?;
    let system = identifier["system"].as_str()?;
    let token_value = identifier["value"].as_str()?;
    Some((kind.to_owned(), format!("{system}|{token_value}")))
}

/// Every reference by identifier in `resource`, in document order, each once, with its
/// display.
fn references_of(resource: &Value) -> Vec<(Key, Option<String>)> {
    fn walk(value: &Value, keys: &mut Vec<(Key, Option<String>)>, top: bool) {
        match value {
            Value::Object(map) => {
                // The resource's own `identifier` is not a reference.
                if !top && let Some(key) = logical_reference(map) {
                    if !keys.iter().any(|(k, _)| *k == key) {
                        let display = map.get("display").and_then(Value::as_str);
                        keys.push((key, display.map(str::to_owned)));
                    }
                    return;
                }
                map.values().for_each(|v| walk(v, keys, false));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, keys, false)),
            _ => {}
        }
    }
    let mut keys = Vec::new();
    walk(resource, &mut keys, true);
    keys
}

/// Sets `reference` on each reference by identifier whose target is in `targets`.
fn set_references(resource: &mut Value, targets: &HashMap<&Key, String>) {
    fn walk(value: &mut Value, targets: &HashMap<&Key, String>, top: bool) {
        match value {
            Value::Object(map) => {
                if !top && let Some(key) = logical_reference(map) {
                    if let Some(reference) = targets.get(&key) {
                        // `reference` first, as FHIR's own examples order it.
                        let rest = std::mem::take(map);
                        map.insert("reference".into(), Value::String(reference.clone()));
                        map.extend(rest);
                    }
                    return;
                }
                map.values_mut().for_each(|v| walk(v, targets, false));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, targets, false)),
            _ => {}
        }
    }
    walk(resource, targets, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "identifier": [{"system": "https://x/sid/observation", "value": "o-1"}],
            "partOf": [{"type": "Procedure", "identifier": {"system": "https://x/sid/ecmo-run", "value": "run-1"}}],
            "subject": {"type": "Patient", "identifier": {"system": "urn:oid:1.2", "value": "MRN-1"}},
            "valueQuantity": {"value": 4.20, "unit": "L/min"},
            "device": {"type": "Device", "identifier": {"system": "https://x/sid/serial", "value": "CH-1"}, "display": "CARDIOHELP-i"}
        })
    }

    #[test]
    fn references_by_identifier_are_found_and_set_with_the_identifier_kept() {
        let mut resource = observation();
        // As stored: parsed from bytes, so the decimal keeps its digits.
        resource["valueQuantity"]["value"] = serde_json::from_str("4.20").unwrap();
        let keys: Vec<Key> = references_of(&resource)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            vec![
                ("Procedure".into(), "https://x/sid/ecmo-run|run-1".into()),
                ("Patient".into(), "urn:oid:1.2|MRN-1".into()),
                ("Device".into(), "https://x/sid/serial|CH-1".into()),
            ]
        );
        let mut rewritten = resource.clone();
        let targets: HashMap<&Key, String> = [
            (&keys[1], "Patient/p7".to_owned()),
            (&keys[2], "urn:uuid:1234".to_owned()),
        ]
        .into_iter()
        .collect();
        set_references(&mut rewritten, &targets);
        assert_eq!(rewritten["subject"]["reference"], "Patient/p7");
        assert_eq!(rewritten["subject"]["identifier"]["value"], "MRN-1");
        assert_eq!(rewritten["device"]["reference"], "urn:uuid:1234");
        assert_eq!(rewritten["device"]["display"], "CARDIOHELP-i");
        assert!(
            rewritten["partOf"][0].get("reference").is_none(),
            "not in targets"
        );
        // Numbers keep their digits.
        assert!(serde_json::to_string(&rewritten).unwrap().contains("4.20"));
    }

    #[test]
    fn a_searchset_gives_its_matches_only() {
        let bundle = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": {"resourceType": "Patient", "id": "a"}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
            {"resource": {"resourceType": "Patient", "id": "b"}, "search": {"mode": "include"}}
        ]});
        assert_eq!(matches(&bundle, "Patient"), vec!["a"]);
        assert!(matches(&json!({"resourceType": "Bundle"}), "Patient").is_empty());
    }

    #[test]
    fn a_miss_holds_or_dead_letters_as_the_destination_says() {
        let hold = LiteralReferences::new(
            "https://ehr/fhir",
            WriteMode::ConditionalCreate,
            Duration::from_secs(60),
            UnknownPatient::Hold,
        );
        let dead = LiteralReferences::new(
            "https://ehr/fhir",
            WriteMode::ConditionalCreate,
            Duration::from_secs(60),
            UnknownPatient::DeadLetter,
        );
        let patient: Key = ("Patient".into(), "urn:oid:1.2|MRN-1".into());
        let device: Key = ("Device".into(), "s|CH-1".into());
        assert!(hold.miss(&patient, 0).hold);
        let unknown = dead.miss(&patient, 0);
        assert!(!unknown.hold);
        assert!(
            unknown
                .reason
                .contains("no Patient with identifier urn:oid:1.2|MRN-1")
        );
        assert!(dead.miss(&patient, 2).reason.contains("2 Patients"));
        // The gateway's own resources are waited for, whatever the patient policy.
        assert!(dead.miss(&device, 0).hold);
    }

    #[test]
    fn ids_are_learned_from_locations_and_known_for_client_assigned_ids() {
        let refs = LiteralReferences::new(
            "https://ehr/fhir",
            WriteMode::ConditionalCreate,
            Duration::from_secs(60),
            UnknownPatient::Hold,
        );
        let device = MappedResource {
            resource_type: "Device",
            id: "x".into(),
            identifier_system: "s".into(),
            identifier_value: "CH-1".into(),
            json: Vec::new(),
            upsert: false,
        };
        refs.learn(&device, Some("https://ehr/fhir/Device/42/_history/1"));
        assert_eq!(refs.cached(&key_of(&device)).as_deref(), Some("42"));
        refs.learn(&device, Some("Observation/1"));
        assert_eq!(
            refs.cached(&key_of(&device)).as_deref(),
            Some("42"),
            "another type ignored"
        );
        let put = LiteralReferences::new(
            "https://ehr/fhir",
            WriteMode::Put,
            Duration::from_secs(60),
            UnknownPatient::Hold,
        );
        assert_eq!(
            put.known_id(&key_of(&device)),
            Some(mappings::logical_id("s", "CH-1"))
        );
        assert_eq!(put.known_id(&("Patient".into(), "a|b".into())), None);
    }
}
