//! The last check before hand-off: every resource about to be queued is checked against base
//! R4 (the official R4 JSON Schema for primitive formats and element names, fhirbolt's strict
//! model for structure and cardinality) and against the profile it declares (rules read from
//! profiles/fhir). One failure refuses the whole request with an OperationOutcome naming the
//! rule and the path; nothing of it is queued, and the failure is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Request, StatusCode};
use mappings::ProfileValidator;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::fhir_schema::R4Schema;
use crate::outcome::{ApiError, Issue};

/// Built resources refused by the check since start (served by the admin API).
pub static VALIDATION_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Everything a built resource is checked against, compiled once at start-up.
pub struct ConformanceRules {
    pub profiles: ProfileValidator,
    pub r4: R4Schema,
    passed: Mutex<Passed>,
}

impl ConformanceRules {
    pub fn embedded() -> Result<Self, String> {
        Ok(Self {
            profiles: ProfileValidator::embedded()?,
            r4: R4Schema::embedded().map_err(|e| e.to_string())?,
            passed: Mutex::default(),
        })
    }

    /// What `json`, a built `resource_type`, breaks ([`Self::issues`]); nothing at once for
    /// bytes that passed before (see [`Passed`]).
    pub fn issues_in(&self, resource_type: &str, json: &[u8]) -> Vec<Issue> {
        let key = Passed::key(resource_type, json);
        if self.passed().contains(&key) {
            return Vec::new();
        }
        let issues = match serde_json::from_slice(json) {
            Ok(value) => self.issues(resource_type, value),
            Err(e) => vec![Issue::error(
                "structure",
                format!("{resource_type} is not JSON: {e}"),
            )],
        };
        if issues.is_empty() {
            self.passed().insert(key);
        }
        issues
    }

    fn passed(&self) -> std::sync::MutexGuard<'_, Passed> {
        self.passed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks every shape of Observation the tables build ([`mappings::Mappings::shape_samples`]),
    /// once when they are loaded. A reading becomes the Observation of its shape with only
    /// schema-checked text filled in, so readings are not re-checked one by one at run time;
    /// a table that would build a broken resource keeps the gateway from starting instead.
    /// The number of shapes checked.
    pub fn prove_tables(&self, mappings: &mappings::Mappings) -> Result<usize, String> {
        let samples = mappings
            .shape_samples()
            .map_err(|e| format!("a table refuses its own sample {e}"))?;
        let mut broken = Vec::new();
        for sample in &samples {
            let resource = &sample.resource;
            for issue in self.issues_in(resource.resource_type, &resource.json) {
                broken.push(format!(
                    "{}: {} ({})",
                    sample.shape,
                    issue.details,
                    issue.expression.unwrap_or_default()
                ));
            }
        }
        if broken.is_empty() {
            Ok(samples.len())
        } else {
            Err(format!(
                "the mapping tables build resources that break the profiles: {}",
                broken.join("; ")
            ))
        }
    }

    /// Every rule `resource` breaks: the R4 JSON Schema, our profiles, fhirbolt's strict model.
    /// Paths are FHIRPath-like (`Observation.code.coding[0]`).
    pub fn issues(&self, resource_type: &str, resource: serde_json::Value) -> Vec<Issue> {
        let mut issues = Vec::new();
        for broken in self.r4.check(resource_type, &resource) {
            issues.push(
                Issue::error(
                    "structure",
                    format!("not valid FHIR R4 (JSON Schema): {}", broken.message),
                )
                .at(fhir_path(resource_type, &broken.pointer)),
            );
        }
        for broken in self.profiles.check(&resource) {
            issues.push(
                Issue::error(
                    "invariant",
                    format!(
                        "profile rule '{}' of {}: {}",
                        broken.rule, broken.profile, broken.message
                    ),
                )
                .at(broken.path),
            );
        }
        if let Err(reason) = mappings::check_resource_value(resource_type, resource) {
            issues.push(
                Issue::error("structure", format!("not valid FHIR R4: {reason}"))
                    .at(resource_type.to_owned()),
            );
        }
        issues
    }
}

#[derive(Clone)]
pub struct CheckConformance {
    rules: Arc<ConformanceRules>,
}

pub fn layer(rules: Arc<ConformanceRules>) -> FilterLayer<CheckConformance> {
    FilterLayer::new(CheckConformance { rules })
}

/// How many passed resources [`Passed`] remembers.
const PASSED_KEPT: usize = 4096;

/// The resources that passed, by a hash of type and bytes. A run sends all its Procedures
/// again with every event, most of them unchanged (a run with 40 weaning trials has 40 child
/// Procedures), and a reload of the tables proves the shapes of the unchanged families again;
/// the check is a function of the bytes alone, so each distinct resource is checked once.
/// Bounded; the least recently used are forgotten first, so a long run's unchanged
/// Procedures stay while one-off resources pass through.
struct Passed {
    hashes: hashlink::LruCache<[u8; 32], ()>,
}

impl Default for Passed {
    fn default() -> Self {
        Self {
            hashes: hashlink::LruCache::new(PASSED_KEPT),
        }
    }
}

impl Passed {
    fn key(resource_type: &str, json: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(resource_type.as_bytes());
        hasher.update([0]);
        hasher.update(json);
        hasher.finalize().into()
    }

    /// Whether `key` passed (and is now the most recently used).
    fn contains(&mut self, key: &[u8; 32]) -> bool {
        self.hashes.get(key).is_some()
    }

    fn insert(&mut self, key: [u8; 32]) {
        self.hashes.insert(key, ());
    }
}

impl Predicate<Request<OutboundBatch>> for CheckConformance {
    type Request = Request<OutboundBatch>;

    fn check(
        &mut self,
        request: Request<OutboundBatch>,
    ) -> Result<Request<OutboundBatch>, BoxError> {
        let mut issues = Vec::new();
        for resource in request.body().resources.iter() {
            let found = self.rules.issues_in(resource.resource_type, &resource.json);
            if !found.is_empty() {
                VALIDATION_FAILURES.fetch_add(1, Ordering::Relaxed);
                issues.extend(found);
            }
        }
        if issues.is_empty() {
            return Ok(request);
        }
        // Our own mapping produced it: a table or profile change went wrong, not the vendor.
        tracing::error!(
            issues = issues.len(),
            "a built resource breaks a profile rule; nothing of the request was queued"
        );
        Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, {
            let mut all = vec![Issue::error(
                "exception",
                "the gateway built a resource that breaks its own profiles, so nothing of this request was sent; the hospital's integration team has to fix the mapping",
            )];
            all.extend(issues);
            all
        })
        .into())
    }
}

/// `/code/coding/0/system` under `Observation` -> `Observation.code.coding[0].system`, the
/// way the profile rules name elements.
fn fhir_path(resource_type: &str, pointer: &str) -> String {
    let mut path = resource_type.to_owned();
    for segment in pointer.split('/').skip(1) {
        if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
            path.push('[');
            path.push_str(segment);
            path.push(']');
        } else {
            path.push('.');
            path.push_str(segment);
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: &[u8]) -> Request<OutboundBatch> {
        Request::new(OutboundBatch {
            request_id: "r".into(),
            vendor: "v".into(),
            model: "m".into(),
            resources: vec![mappings::MappedResource {
                resource_type: "Observation",
                id: "0".into(),
                identifier_system: mappings::OBSERVATION_IDENTIFIER_SYSTEM.into(),
                identifier_value: "x".into(),
                json: json.to_vec(),
                upsert: false,
            }]
            .into(),
            origins: vec!["/readings/0".into()],
            revision: None,
            source: crate::outbox::provenance::test_source(),
            subjects: Default::default(),
            descriptions: Vec::new(),
            described: Vec::new(),
        })
    }

    #[test]
    fn refuses_what_breaks_a_profile_naming_rule_and_path() {
        let mut check = CheckConformance {
            rules: Arc::new(ConformanceRules::embedded().unwrap()),
        };
        let error = check
            .check(batch(br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"meta":{"profile":["https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-circuit-observation"]}}"#))
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR);
        let paths: Vec<_> = api
            .issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(paths.contains(&"Observation.identifier"), "{paths:?}");
        assert!(paths.contains(&"Observation.device"), "{paths:?}");
        assert!(
            api.issues
                .iter()
                .any(|i| i.details.contains("required binding"))
        );
    }

    /// A resource that passed is not checked again; one that failed is refused every time;
    /// what is remembered is bounded.
    #[test]
    fn remembers_what_passed_and_never_what_failed() {
        let mut check = CheckConformance {
            rules: Arc::new(ConformanceRules::embedded().unwrap()),
        };
        let samples = mappings::Mappings::embedded()
            .unwrap()
            .shape_samples()
            .unwrap();
        let valid = samples[0].resource.json.clone();
        let mut request = batch(&valid);
        request.body_mut().resources = vec![samples[0].resource.clone()].into();
        check.check(request).unwrap();
        let key = Passed::key(samples[0].resource.resource_type, &valid);
        assert!(check.rules.passed().contains(&key));
        let broken = br#"{"resourceType":"Observation","status":"final","code":{"text":"x"}}"#;
        for _ in 0..2 {
            assert!(check.check(batch(broken)).is_err());
        }
        assert_eq!(check.rules.passed().hashes.len(), 1);
        // Bounded, forgetting the least recently used: "0", looked up before the last insert,
        // stays; "1" goes.
        let mut passed = Passed::default();
        for n in 0..PASSED_KEPT {
            passed.insert(Passed::key("Observation", n.to_string().as_bytes()));
        }
        assert!(passed.contains(&Passed::key("Observation", b"0")));
        passed.insert(Passed::key("Observation", b"one more"));
        assert_eq!(passed.hashes.len(), PASSED_KEPT);
        assert!(passed.contains(&Passed::key("Observation", b"0")));
        assert!(!passed.contains(&Passed::key("Observation", b"1")));
    }

    #[test]
    fn every_shape_the_embedded_tables_build_is_valid() {
        let rules = ConformanceRules::embedded().unwrap();
        let shapes = rules
            .prove_tables(&mappings::Mappings::embedded().unwrap())
            .unwrap();
        assert!(shapes > 50, "{shapes}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// What fills a shape in (schema-checked serials, patient identifiers, times in any
        /// offset, the device's digits) never breaks it: the reason readings are not re-checked.
        #[test]
        fn filled_in_shapes_stay_valid(
            serial in "[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
            patient in "\\PC([^\\r\\n]{0,60}\\PC)?",
            digits in 0u32..=80_000,
            scale in 0usize..=4,
            ago in 0i64..3600,
            offset_minutes in -14i32 * 60..=14 * 60,
            boolean in proptest::bool::ANY,
        ) {
            // What the ingest schema lets through, as a vendor would send it.
            let batch = serde_json::json!({
                "patient": {"system": "urn:oid:1.2.3.4", "value": patient},
                "device": {"serial": serial, "model": "CARDIOHELP-i"},
                "readings": [{"parameter": "Bubble", "value": false, "time": "2026-11-21T10:15:00Z"}],
            });
            let schemas = crate::validation::Schemas::embedded().unwrap();
            proptest::prop_assume!(schemas.get("observation-batch").unwrap().check(&batch).is_empty());
            let rules = shared_rules();
            let m = mappings::Mappings::embedded().unwrap();
            let family = m.family_for_model("CARDIOHELP-i").unwrap();
            let now = time::OffsetDateTime::now_utc();
            let offset = time::UtcOffset::from_whole_seconds(offset_minutes * 60).unwrap();
            let at = (now - time::Duration::seconds(ago))
                .to_offset(offset)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            let flow = format!("{:.*}", scale, f64::from(digits) / 10_000.0);
            let context = mappings::DeviceContext {
                family,
                serial: &serial,
                model: "CARDIOHELP-i",
                patient: Some(mappings::PatientRef { system: "urn:oid:1.2.3.4", value: &patient }),
                window: mappings::TimeWindow {
                    received_at: now,
                    max_future_skew: time::Duration::minutes(5),
                    max_past_age: time::Duration::hours(24),
                },
            };
            for (parameter, value, unit) in [
                ("Flow", mappings::ReadingValue::Number(&flow), Some("L/min")),
                ("Bubble", mappings::ReadingValue::Boolean(boolean), None),
            ] {
                let reading = mappings::Reading {
                    parameter,
                    value,
                    unit,
                    time: &at,
                    flags: mappings::ReadingFlags::default(),
                    run: None,
                };
                let resource = m.map_reading(&context, &reading).unwrap();
                let value = serde_json::from_slice(&resource.json).unwrap();
                let issues = rules.issues("Observation", value);
                proptest::prop_assert!(issues.is_empty(), "{issues:?}");
            }
        }
    }

    fn shared_rules() -> &'static ConformanceRules {
        static RULES: std::sync::OnceLock<ConformanceRules> = std::sync::OnceLock::new();
        RULES.get_or_init(|| ConformanceRules::embedded().unwrap())
    }

    #[test]
    fn refuses_broken_primitives_that_the_typed_model_lets_through() {
        let mut check = CheckConformance {
            rules: Arc::new(ConformanceRules::embedded().unwrap()),
        };
        // A decimal written as text and a dateTime without a time zone.
        let error = check
            .check(batch(br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"effectiveDateTime":"2026-11-21T10:15:00","valueQuantity":{"value":"4.2"}}"#))
            .unwrap_err();
        let api = error.downcast_ref::<ApiError>().unwrap();
        let paths: Vec<_> = api
            .issues
            .iter()
            .filter_map(|i| i.expression.as_deref())
            .collect();
        assert!(
            paths.contains(&"Observation.effectiveDateTime"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"Observation.valueQuantity.value"),
            "{paths:?}"
        );
        assert_eq!(
            fhir_path("Procedure", "/bodySite/1/coding/0/code"),
            "Procedure.bodySite[1].coding[0].code"
        );
    }
}
