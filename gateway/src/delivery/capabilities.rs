//! What a destination says it can do, against what its configuration asks of it: its
//! CapabilityStatement (`GET [base]/metadata`) for the interactions, formats and resource
//! types the gateway's writes use, and for a SMART destination its scopes (do they cover every
//! write?) and a token request (does the EHR know the gateway?). Run by `gateway check-config`,
//! at start (logged) and on `GET /admin/v1/capabilities`; a gap is said plainly, so an
//! integration team learns "this EHR takes no transactions" before the first dead letter.

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use serde::Serialize;
use serde_json::Value;

use crate::config::{BundleMode, Corrections, DestinationSettings, FhirFormat, WriteMode};
use crate::delivery::client::{EhrClient, fetch};

/// The resource types the gateway writes, in the order it first writes them.
const WRITTEN_TYPES: [&str; 5] = [
    "DeviceMetric",
    "Observation",
    "Procedure",
    "Device",
    "Provenance",
];

/// What one destination's configuration needs from the EHR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    pub resource_types: Vec<&'static str>,
    pub write: WriteMode,
    pub transaction: bool,
    pub xml: bool,
    /// A correction (or a run's new state) overwrites what the EHR holds.
    pub updates: bool,
    /// References are made literal: patients are found by a search on their identifier.
    pub literal: bool,
    /// Observations are linked to the patient's in-progress Encounter, found by search.
    pub encounter: bool,
}

impl Needs {
    pub fn of(settings: &DestinationSettings) -> Self {
        let only = &settings.only.resource_types;
        let resource_types = WRITTEN_TYPES
            .into_iter()
            .filter(|t| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(t)))
            .filter(|t| *t != "Provenance" || settings.provenance)
            .collect();
        Self {
            resource_types,
            write: settings.write,
            transaction: settings.bundle == BundleMode::Transaction,
            xml: settings.format == FhirFormat::Xml,
            updates: settings.corrections == Corrections::Amend,
            literal: settings.references == crate::delivery::references::ReferenceStyle::Literal,
            encounter: settings.encounter != crate::delivery::references::EncounterLink::None,
        }
    }

    /// What the EHR's CapabilityStatement lacks of these needs, one sentence each.
    pub fn gaps(&self, statement: &Value) -> Vec<String> {
        let mut gaps = Vec::new();
        if statement["resourceType"] != "CapabilityStatement" {
            return vec!["its /metadata is not a CapabilityStatement".into()];
        }
        let rest = statement["rest"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["mode"] == "server"));
        let Some(rest) = rest else {
            return vec!["its CapabilityStatement has no server rest section".into()];
        };
        let has_code = |list: &Value, code: &str| {
            list.as_array()
                .is_some_and(|l| l.iter().any(|i| i["code"] == code))
        };
        if self.transaction && !has_code(&rest["interaction"], "transaction") {
            gaps.push(
                "no transaction Bundles (bundle = \"transaction\"): use bundle = \"single\"".into(),
            );
        }
        if self.xml {
            let formats = statement["format"].as_array();
            let takes_xml = formats.is_some_and(|f| {
                f.iter()
                    .filter_map(Value::as_str)
                    .any(|f| f == "xml" || f.contains("fhir+xml") || f == "application/xml")
            });
            if !takes_xml {
                gaps.push("no FHIR XML (format = \"xml\"): use format = \"json\"".into());
            }
        }
        let resources = rest["resource"].as_array();
        if self.encounter {
            let encounter = resources.and_then(|r| r.iter().find(|r| r["type"] == "Encounter"));
            let by = |name: &str| {
                encounter.is_some_and(|e| {
                    e["searchParam"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["name"] == name))
                })
            };
            if !(by("patient") && by("status")) {
                gaps.push(
                    "no search of Encounter by patient and status, which encounter = \"current\" uses"
                        .into(),
                );
            }
        }
        if self.literal {
            let patient = resources.and_then(|r| r.iter().find(|r| r["type"] == "Patient"));
            let searchable = patient.is_some_and(|p| {
                p["searchParam"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == "identifier"))
            });
            if !searchable {
                gaps.push(
                    "no search of Patient by identifier, which references = \"literal\" uses to find the patient"
                        .into(),
                );
            }
        }
        for resource_type in &self.resource_types {
            let Some(resource) =
                resources.and_then(|r| r.iter().find(|r| r["type"] == *resource_type))
            else {
                gaps.push(format!("no {resource_type} resources"));
                continue;
            };
            let flag = |name: &str| resource[name].as_bool() == Some(true);
            let interaction = |code: &str| has_code(&resource["interaction"], code);
            match self.write {
                WriteMode::ConditionalCreate => {
                    if !interaction("create") {
                        gaps.push(format!("{resource_type}: no create"));
                    } else if !flag("conditionalCreate") {
                        gaps.push(format!(
                            "{resource_type}: no conditional create (write = \"conditional-create\"): resends could duplicate; use write = \"put\" if it takes client-assigned ids"
                        ));
                    }
                    // Corrections and a run's new state are conditional updates.
                    let updated = *resource_type == "Procedure"
                        || (self.updates && *resource_type == "Observation");
                    if updated && !(interaction("update") && flag("conditionalUpdate")) {
                        gaps.push(format!(
                            "{resource_type}: no conditional update, which corrections and run changes use"
                        ));
                    }
                }
                WriteMode::Create => {
                    if !interaction("create") {
                        gaps.push(format!("{resource_type}: no create (write = \"create\")"));
                    }
                    let key = mappings::business_key_parameter(resource_type);
                    let searchable = interaction("search-type")
                        && resource["searchParam"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|p| p["name"] == key));
                    if !searchable {
                        gaps.push(format!(
                            "{resource_type}: no search by {key}, which write = \"create\" uses to find what an attempt whose answer was lost wrote"
                        ));
                    }
                }
                WriteMode::Put => {
                    if !interaction("update") {
                        gaps.push(format!("{resource_type}: no update (write = \"put\")"));
                    } else if resource["updateCreate"].as_bool() == Some(false) {
                        gaps.push(format!(
                            "{resource_type}: no client-assigned ids (updateCreate is false; write = \"put\" needs them): use write = \"conditional-create\""
                        ));
                    }
                }
            }
        }
        gaps
    }
}

/// Whether `scopes` (SMART v1 or v2 system scopes) let the gateway `interaction` (`c` or `u`)
/// `resource_type`.
fn scopes_allow(scopes: &[String], resource_type: &str, interaction: char) -> bool {
    scopes.iter().any(|scope| {
        let Some((kind, permissions)) = scope
            .strip_prefix("system/")
            .and_then(|s| s.split_once('.'))
        else {
            return false;
        };
        let permissions = permissions.split('?').next().unwrap_or_default();
        (kind == "*" || kind == resource_type)
            && match permissions {
                "write" => interaction != 's' && interaction != 'r',
                "read" => interaction == 's' || interaction == 'r',
                "*" => true,
                v2 => v2.chars().all(|c| "cruds".contains(c)) && v2.contains(interaction),
            }
    })
}

/// What the configured SMART scopes leave out of the writes the destination makes.
pub fn scope_gaps(settings: &DestinationSettings) -> Vec<String> {
    let Some(smart) = &settings.smart else {
        return Vec::new();
    };
    let needs = Needs::of(settings);
    let mut gaps = Vec::new();
    if needs.encounter && !scopes_allow(&smart.scopes, "Encounter", 's') {
        gaps.push(
            "the SMART scopes let the gateway not search Encounter, which encounter = \"current\" needs: add system/Encounter.s (v2) or system/Encounter.read (v1)"
                .into(),
        );
    }
    if needs.literal && !scopes_allow(&smart.scopes, "Patient", 's') {
        gaps.push(
            "the SMART scopes let the gateway not search Patient, which literal references need: add system/Patient.s (v2) or system/Patient.read (v1)"
                .into(),
        );
    }
    for resource_type in &needs.resource_types {
        let mut wanted = Vec::new();
        match needs.write {
            WriteMode::ConditionalCreate => {
                wanted.push('c');
                if *resource_type == "Procedure"
                    || (needs.updates && *resource_type == "Observation")
                {
                    wanted.push('u');
                }
            }
            WriteMode::Put => wanted.extend(['c', 'u']),
            WriteMode::Create => wanted.extend(['c', 's']),
        }
        // Literal references look up what the gateway wrote before by identifier.
        if needs.literal && *resource_type != "Provenance" {
            wanted.push('s');
        }
        let mut missing: String = String::new();
        for interaction in wanted {
            if !missing.contains(interaction)
                && !scopes_allow(&smart.scopes, resource_type, interaction)
            {
                missing.push(interaction);
            }
        }
        if !missing.is_empty() {
            gaps.push(format!(
                "the SMART scopes let the gateway not '{missing}' {resource_type}: add system/{resource_type}.{missing} (v2; c create, u update, s search) or the v1 system/{resource_type}.write and .read"
            ));
        }
    }
    gaps
}

/// One destination's check.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CapabilityReport {
    pub destination: String,
    /// Whether the CapabilityStatement could be read (and a token got, for SMART).
    pub checked: bool,
    /// Why it could not be, when it could not.
    pub unreachable: Option<String>,
    /// Configured features the EHR cannot do, one sentence each.
    pub gaps: Vec<String>,
    /// What the SMART token request said (granted scopes), when there is one.
    pub smart: Option<Value>,
}

impl CapabilityReport {
    pub fn ok(&self) -> bool {
        self.gaps.is_empty()
    }
}

/// Reads the destination's CapabilityStatement (and, for SMART, gets a token) and says what it
/// lacks of `settings`.
pub async fn check(settings: &DestinationSettings, client: &EhrClient) -> CapabilityReport {
    let mut report = CapabilityReport {
        destination: settings.name.clone(),
        checked: false,
        unreachable: None,
        gaps: scope_gaps(settings),
        smart: None,
    };
    if settings.kind == crate::config::DestinationKind::Hl7v2 {
        // An HL7 v2 receiver has no CapabilityStatement: its ACKs say what it takes.
        return report;
    }
    let url = format!("{}/metadata", settings.base_url.trim_end_matches('/'));
    let request = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .header(header::ACCEPT, "application/fhir+json")
        .body(Full::new(Bytes::new()));
    let answer = match request {
        Ok(request) => tokio::time::timeout(settings.timeout, fetch(client.http(), request)).await,
        Err(e) => {
            report.unreachable = Some(e.to_string());
            return report;
        }
    };
    let statement = match answer {
        Err(_) => Err("timed out".to_owned()),
        Ok(Err(e)) => Err(crate::error_chain(e.as_ref())),
        Ok(Ok(response)) if !response.status().is_success() => {
            Err(format!("GET {url}: HTTP {}", response.status()))
        }
        Ok(Ok(response)) => serde_json::from_slice::<Value>(response.body())
            .map_err(|e| format!("GET {url}: not JSON: {e}")),
    };
    match statement {
        Ok(statement) => {
            report.checked = true;
            report.gaps.extend(Needs::of(settings).gaps(&statement));
        }
        Err(reason) => report.unreachable = Some(format!("CapabilityStatement: {reason}")),
    }
    if let Some(tokens) = client.tokens() {
        match tokens.token().await {
            Ok(_) => {
                let status = tokens.status();
                if let (Some(granted), Some(smart)) =
                    (status["grantedScopes"].as_str(), &settings.smart)
                {
                    let granted: Vec<&str> = granted.split_whitespace().collect();
                    for scope in smart
                        .scopes
                        .iter()
                        .filter(|s| !granted.contains(&s.as_str()))
                    {
                        report
                            .gaps
                            .push(format!("the EHR did not grant the scope {scope}"));
                    }
                }
                report.smart = Some(status);
            }
            Err(error) if error.is_configuration() => {
                report.gaps.push(format!("SMART: {error}"));
            }
            Err(error) => {
                report.checked = false;
                report.unreachable = Some(format!("SMART: {error}"));
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn statement(transaction: bool, conditional_create: bool, formats: &[&str]) -> Value {
        let resources: Vec<Value> = WRITTEN_TYPES
            .iter()
            .map(|t| {
                json!({
                    "type": t,
                    "interaction": [{"code": "create"}, {"code": "update"}],
                    "conditionalCreate": conditional_create,
                    "conditionalUpdate": true,
                    "updateCreate": true,
                })
            })
            .collect();
        let interaction: Vec<Value> = if transaction {
            vec![json!({"code": "transaction"})]
        } else {
            vec![]
        };
        json!({
            "resourceType": "CapabilityStatement",
            "format": formats,
            "rest": [{"mode": "server", "interaction": interaction, "resource": resources}]
        })
    }

    fn needs() -> Needs {
        Needs {
            resource_types: WRITTEN_TYPES.to_vec(),
            write: WriteMode::ConditionalCreate,
            transaction: true,
            xml: false,
            updates: true,
            literal: false,
            encounter: false,
        }
    }

    #[test]
    fn a_server_that_does_everything_has_no_gaps() {
        assert_eq!(
            needs().gaps(&statement(true, true, &["json", "xml"])),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_missing_feature_is_named_with_the_setting_that_needs_it() {
        let gaps = Needs {
            xml: true,
            ..needs()
        }
        .gaps(&statement(false, false, &["json"]));
        assert!(gaps[0].contains("no transaction Bundles"), "{gaps:?}");
        assert!(gaps[1].contains("no FHIR XML"), "{gaps:?}");
        assert!(
            gaps[2].starts_with("DeviceMetric: no conditional create"),
            "{gaps:?}"
        );
        assert!(
            gaps[3].starts_with("Observation: no conditional create"),
            "{gaps:?}"
        );
        assert_eq!(gaps.len(), 2 + WRITTEN_TYPES.len());
        let mut partial = statement(true, true, &["json"]);
        partial["rest"][0]["resource"]
            .as_array_mut()
            .unwrap()
            .retain(|r| r["type"] != "Provenance");
        assert_eq!(needs().gaps(&partial), vec!["no Provenance resources"]);
        let put = Needs {
            write: WriteMode::Put,
            ..needs()
        };
        let literal = Needs {
            literal: true,
            ..needs()
        };
        assert!(
            literal.gaps(&statement(true, true, &["json"]))[0].contains("no search of Patient")
        );
        let mut no_ids = statement(true, true, &["json"]);
        no_ids["rest"][0]["resource"][0]["updateCreate"] = json!(false);
        assert!(put.gaps(&no_ids)[0].contains("no client-assigned ids"));
        assert_eq!(
            needs().gaps(&json!({"resourceType": "Patient"})),
            vec!["its /metadata is not a CapabilityStatement"]
        );
    }

    #[test]
    fn scopes_v1_and_v2_and_wildcards_cover_writes() {
        let scopes = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(scopes_allow(
            &scopes(&["system/Observation.cu"]),
            "Observation",
            'u'
        ));
        assert!(scopes_allow(
            &scopes(&["system/Observation.write"]),
            "Observation",
            'c'
        ));
        assert!(scopes_allow(&scopes(&["system/*.cruds"]), "Device", 'c'));
        assert!(!scopes_allow(
            &scopes(&["system/Observation.c"]),
            "Observation",
            'u'
        ));
        assert!(!scopes_allow(
            &scopes(&["system/Observation.read"]),
            "Observation",
            'c'
        ));
        assert!(!scopes_allow(
            &scopes(&["system/Device.cu"]),
            "Observation",
            'c'
        ));
    }
}
