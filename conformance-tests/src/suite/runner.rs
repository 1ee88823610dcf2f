//! Runs scenarios against a gateway (and, when given, reads the results back from its EHR).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use http::Method;
use mappings::ProfileValidator;
use serde_json::Value;
use time::OffsetDateTime;

use super::{EhrExpectation, Expectation, IssueSpec, Scenario, ScenarioSource, Step, contains};
use crate::client::{Answer, MtlsClient};
use crate::harness::EhrReader;

/// What the scenarios run against.
pub struct Target {
    /// The gateway's vendor listener, e.g. `https://gateway.example:8443`.
    pub gateway_url: String,
    /// Clients by identity name (`getinge`, `spectrum`, `expired`, `none`, ...). Steps whose
    /// identity is missing are skipped, not failed.
    pub identities: HashMap<String, MtlsClient>,
    /// The EHR the gateway delivers to; without it, EHR expectations are not checked.
    pub ehr: Option<EhrReader>,
    /// How long to wait for a resource to reach the EHR (delivery is asynchronous).
    pub ehr_wait: Duration,
    /// `--var` values, overriding the scenarios' own.
    pub variables: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Passed,
    Failed(String),
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct StepResult {
    pub name: String,
    pub verdict: Verdict,
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub file: String,
    pub description: String,
    pub steps: Vec<StepResult>,
    pub seconds: f64,
}

impl ScenarioResult {
    pub fn count(&self, pred: impl Fn(&Verdict) -> bool) -> usize {
        self.steps.iter().filter(|s| pred(&s.verdict)).count()
    }
}

/// Every step that did not pass, as `scenario / step: verdict`, for test failure messages.
pub fn not_passed(results: &[ScenarioResult]) -> Vec<String> {
    results
        .iter()
        .flat_map(|r| r.steps.iter().map(move |s| (r, s)))
        .filter(|(_, s)| s.verdict != Verdict::Passed)
        .map(|(r, s)| format!("{} / {}: {:?}", r.name, s.name, s.verdict))
        .collect()
}

/// Runs scenarios one after the other; every resource read back from the EHR is also checked
/// against base R4 and our profiles.
pub struct Runner {
    target: Target,
    validator: ProfileValidator,
    r4: gateway::fhir_schema::R4Schema,
    /// Resources checked at the EHR, for the summary.
    pub resources_checked: usize,
}

impl Runner {
    pub fn new(target: Target) -> Result<Self, String> {
        Ok(Self {
            target,
            validator: ProfileValidator::embedded()?,
            r4: gateway::fhir_schema::R4Schema::embedded().map_err(|e| e.to_string())?,
            resources_checked: 0,
        })
    }

    pub fn checks_ehr(&self) -> bool {
        self.target.ehr.is_some()
    }

    pub async fn run_all(&mut self, sources: &[ScenarioSource]) -> Vec<ScenarioResult> {
        let base = unique_prefix();
        let mut results = Vec::with_capacity(sources.len());
        for (i, source) in sources.iter().enumerate() {
            let token = format!("{base}{i:02}");
            results.push(self.run(source, &token).await);
        }
        results
    }

    /// One scenario; after a failed step the rest are skipped (they build on it).
    pub async fn run(&mut self, source: &ScenarioSource, token: &str) -> ScenarioResult {
        let started = Instant::now();
        let scenario: Scenario =
            match source.expand(token, OffsetDateTime::now_utc(), &self.target.variables) {
                Ok(s) => s,
                Err(e) => {
                    return ScenarioResult {
                        name: source.name.clone(),
                        file: source.file.display().to_string(),
                        description: String::new(),
                        steps: vec![StepResult {
                            name: "load".into(),
                            verdict: Verdict::Failed(e.to_string()),
                            seconds: 0.0,
                        }],
                        seconds: 0.0,
                    };
                }
            };
        let mut steps = Vec::with_capacity(scenario.steps.len());
        let mut failed = false;
        for step in &scenario.steps {
            let t = Instant::now();
            let verdict = if failed {
                Verdict::Skipped("an earlier step of this scenario failed".into())
            } else {
                self.step(step).await
            };
            failed |= matches!(verdict, Verdict::Failed(_));
            steps.push(StepResult {
                name: step.name.clone(),
                verdict,
                seconds: t.elapsed().as_secs_f64(),
            });
        }
        ScenarioResult {
            name: scenario.name,
            file: source.file.display().to_string(),
            description: scenario.description,
            steps,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    async fn step(&mut self, step: &Step) -> Verdict {
        let Some(client) = self.target.identities.get(&step.identity) else {
            return Verdict::Skipped(format!(
                "no client certificate given for identity '{}'",
                step.identity
            ));
        };
        let request = &step.request;
        let Ok(method) = Method::from_bytes(request.method.as_bytes()) else {
            return Verdict::Failed(format!("bad method {}", request.method));
        };
        let (body, content_type) = match request.body() {
            Ok(body) => body,
            Err(reason) => return Verdict::Failed(reason),
        };
        let url = format!(
            "{}{}",
            self.target.gateway_url.trim_end_matches('/'),
            request.path
        );
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sent = tokio::time::timeout(
            Duration::from_secs(60),
            client.send_with_headers(method, &url, content_type, &headers, body),
        )
        .await
        .unwrap_or_else(|_| Err("no answer within 60 s".into()));
        let http = match (sent, step.expect.handshake_refused) {
            (Err(_), true) => Ok(()),
            (Err(e), false) => Err(format!("request failed: {}", gateway::error_chain(&*e))),
            (Ok(answer), true) => Err(format!(
                "expected the TLS handshake to be refused, got HTTP {}",
                answer.status
            )),
            (Ok(answer), false) => check_answer(&answer, &step.expect),
        };
        if let Err(why) = http {
            return Verdict::Failed(why);
        }
        for expected in &step.ehr {
            if let Err(why) = self.check_ehr(expected).await {
                return Verdict::Failed(why);
            }
        }
        Verdict::Passed
    }

    /// Polls the EHR until `expected` holds or the wait is over; a resource that is there but
    /// breaks R4 or our profiles fails at once.
    async fn check_ehr(&mut self, expected: &EhrExpectation) -> Result<(), String> {
        let Some(ehr) = &self.target.ehr else {
            return Ok(());
        };
        let deadline = Instant::now() + self.target.ehr_wait;
        let what = format!(
            "{} {}|{}",
            expected.resource_type, expected.identifier.system, expected.identifier.value
        );
        loop {
            let found = ehr
                .by_identifier(
                    &expected.resource_type,
                    &expected.identifier.system,
                    &expected.identifier.value,
                )
                .await
                .map_err(|e| format!("{what}: EHR search failed: {e}"))?;
            for resource in &found {
                self.resources_checked += 1;
                self.valid(&expected.resource_type, resource)
                    .map_err(|why| format!("{what} at the EHR is not valid: {why}"))?;
            }
            let outcome = if found.len() != expected.count {
                Err(format!(
                    "{what}: expected {} at the EHR, found {}",
                    expected.count,
                    found.len()
                ))
            } else if let Some(part) = &expected.contains {
                match found.iter().find(|r| !contains(r, part)) {
                    None => Ok(()),
                    Some(r) => Err(format!(
                        "{what}: does not contain {}\nstored: {}",
                        part,
                        clip(&r.to_string(), 4000)
                    )),
                }
            } else {
                Ok(())
            };
            // Absence is checked once: waiting could only make it pass by chance.
            if outcome.is_ok() || expected.count == 0 || Instant::now() >= deadline {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Base R4 (the official JSON Schema and fhirbolt's strict model) and our profiles.
    fn valid(&self, resource_type: &str, resource: &Value) -> Result<(), String> {
        if let Some(v) = self.r4.check(resource_type, resource).first() {
            return Err(format!("R4 JSON Schema at {}: {}", v.pointer, v.message));
        }
        mappings::check_resource_value(resource_type, resource.clone())?;
        let issues = self.validator.check(resource);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "))
        }
    }
}

fn check_answer(answer: &Answer, expect: &Expectation) -> Result<(), String> {
    let body = || clip(&String::from_utf8_lossy(&answer.body), 2000);
    if let Some(status) = expect.status {
        let got = answer.status.as_u16();
        if got != status && !(status == 202 && got == 200) {
            return Err(format!("expected HTTP {status}, got {got}: {}", body()));
        }
    }
    if let Some(want) = &expect.content_type {
        let got = answer
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if got.split(';').next().unwrap_or_default().trim() != want {
            return Err(format!("expected Content-Type {want}, got '{got}'"));
        }
    }
    let text = String::from_utf8_lossy(&answer.body);
    if let Some(missing) = expect
        .body_texts
        .iter()
        .find(|t| !text.contains(t.as_str()))
    {
        return Err(format!("answer does not contain '{missing}': {}", body()));
    }
    let json = answer.json();
    if let Some(issues) = &expect.issues {
        if json["resourceType"] != "OperationOutcome" {
            return Err(format!("expected an OperationOutcome, got {}", body()));
        }
        let got = json["issue"].as_array().cloned().unwrap_or_default();
        if got.len() != issues.len() {
            return Err(format!(
                "expected {} issue(s), got {}: {}",
                issues.len(),
                got.len(),
                body()
            ));
        }
        for (i, (want, issue)) in issues.iter().zip(&got).enumerate() {
            if let Err(why) = issue_matches(want, issue) {
                return Err(format!("issue {i}: {why}: {}", body()));
            }
        }
    }
    if let Some(part) = &expect.body
        && !contains(&json, part)
    {
        return Err(format!("answer does not contain {part}: {}", body()));
    }
    Ok(())
}

fn issue_matches(want: &IssueSpec, issue: &Value) -> Result<(), String> {
    let field = |name: &str, want: &Option<String>, got: &Value| match want {
        Some(w) if got.as_str() != Some(w.as_str()) => {
            Err(format!("{name} should be '{w}', is {got}"))
        }
        _ => Ok(()),
    };
    field("severity", &want.severity, &issue["severity"])?;
    field("code", &want.code, &issue["code"])?;
    field("expression", &want.expression, &issue["expression"][0])?;
    field("location", &want.location, &issue["location"][0])?;
    if let Some(text) = &want.text {
        let details = issue["details"]["text"].as_str().unwrap_or_default();
        if !details.contains(text.as_str()) {
            return Err(format!("details should mention '{text}', say '{details}'"));
        }
    }
    Ok(())
}

fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A short lowercase token from the clock, so that every execution writes new identifiers.
fn unique_prefix() -> String {
    let mut n = OffsetDateTime::now_utc().unix_timestamp_nanos() as u128 / 1_000_000;
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Identity names of the scenarios and the certificate files (`<stem>.pem`/`.key`) that
/// `gateway certs init` and the test PKI write for them.
pub const PKI_IDENTITIES: &[(&str, &str)] = &[
    ("getinge", "vendor-getinge"),
    ("spectrum", "vendor-spectrum"),
    ("integration", "vendor-integration"),
    ("unconfigured", "vendor-unconfigured"),
    ("expired", "vendor-expired"),
    ("foreign", "vendor-foreign"),
];

/// Clients for every identity whose files exist in `dir`, plus `none` (no certificate); all
/// trust `ca` for the gateway's server certificate.
pub fn identities_from_dir(
    dir: &std::path::Path,
    ca: &std::path::Path,
) -> Result<HashMap<String, MtlsClient>, gateway::BoxError> {
    let mut identities = HashMap::new();
    identities.insert("none".to_owned(), MtlsClient::new(ca, None)?);
    for (name, stem) in PKI_IDENTITIES {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        if cert.exists() && key.exists() {
            identities.insert(
                (*name).to_owned(),
                MtlsClient::new(ca, Some((&cert, &key)))?,
            );
        }
    }
    Ok(identities)
}
