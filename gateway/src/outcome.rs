//! FHIR OperationOutcome: the one shape every error answer of the gateway takes.

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::{BoxBody, full_body};

pub const FHIR_JSON: &str = "application/fhir+json";

/// One problem, in the words a vendor's developer needs: where (`expression`, a JSON pointer
/// into what they sent) and why (`details`).
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: Severity,
    /// FHIR issue-type code (http://hl7.org/fhir/issue-type), e.g. `invalid`, `value`.
    pub code: &'static str,
    pub details: String,
    /// Where in an XML body: `line L, column C` (FHIR's `issue.location`).
    pub location: Option<String>,
    pub expression: Option<String>,
    /// Further places the issue is about (two readings that contradict each other).
    pub also_at: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Information => "information",
        }
    }
}

impl Issue {
    pub fn error(code: &'static str, details: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            details: details.into(),
            location: None,
            expression: None,
            also_at: Vec::new(),
        }
    }

    pub fn at(mut self, pointer: impl Into<String>) -> Self {
        self.expression = Some(pointer.into());
        self
    }

    /// A further pointer, after the one given by [`Issue::at`].
    pub fn also_at(mut self, pointer: impl Into<String>) -> Self {
        self.also_at.push(pointer.into());
        self
    }

    pub fn located(mut self, line: usize, column: usize) -> Self {
        self.location = Some(format!("line {line}, column {column}"));
        self
    }

    fn to_json(&self) -> Value {
        let mut issue = json!({
            "severity": self.severity.as_str(),
            "code": self.code,
            "details": { "text": self.details },
        });
        if let Some(location) = &self.location {
            issue["location"] = json!([location]);
        }
        if let Some(expression) = &self.expression {
            let mut all = vec![json!(expression)];
            all.extend(self.also_at.iter().map(|p| json!(p)));
            issue["expression"] = Value::Array(all);
        }
        issue
    }
}

/// A refusal: an HTTP status and the issues that explain it. Layers return it as their error;
/// [`crate::ingress::rescue`] turns it into the response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {} issue(s)", issues.len())]
pub struct ApiError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
    /// Seconds for a `Retry-After` header (load shedding, destination unavailable).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, issues: Vec<Issue>) -> Self {
        Self {
            status,
            issues,
            retry_after: None,
        }
    }

    pub fn one(status: StatusCode, issue: Issue) -> Self {
        Self::new(status, vec![issue])
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn into_response(self) -> Response<BoxBody> {
        let mut response = fhir_json_response(self.status, &operation_outcome(&self.issues));
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
    })
}

pub fn fhir_json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<BoxBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(full_body(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_carries_pointer_and_text() {
        let issues = [Issue::error("value", "too high").at("/readings/0/value")];
        let v = operation_outcome(&issues);
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "value");
        assert_eq!(v["issue"][0]["expression"][0], "/readings/0/value");
        assert_eq!(v["issue"][0]["details"]["text"], "too high");
    }
}
