//! The conformance suite as data: scenario files (`conformance-tests/scenarios/*.json`) say what
//! to send, as which client, and what must come back and what the EHR must then hold. The same
//! files run in `cargo test` against the reference EHR and, through the `conformance-tests`
//! binary, against a deployed gateway and a real EHR sandbox.
//!
//! Scenario texts may use placeholders, replaced before parsing:
//! - `{{run}}`: a token unique to this execution of the scenario (serials, run ids, MRNs), so
//!   that runs against a long-lived EHR never collide with earlier ones;
//! - `{{now}}`, `{{now-10m}}`, `{{now+1h}}`, `{{now-6d}}`, `{{now-90s}}`: a time relative to the
//!   scenario's start, in RFC 3339 UTC with milliseconds; `{{date:now-3d}}` gives only the date and
//!   `{{compact:now-10m}}` the form used in Observation identifiers (`20261121T101500.000Z`);
//! - `{{name}}`: a variable, from the scenario's `variables` or the runner's `--var name=value`.

pub mod coverage;
pub mod report;
pub mod runner;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use time::{Duration, OffsetDateTime};

/// The scenario files shipped with the suite.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// One scenario file as written (placeholders unexpanded).
#[derive(Debug, Clone)]
pub struct ScenarioSource {
    pub file: PathBuf,
    pub name: String,
    text: String,
    variables: BTreeMap<String, String>,
}

/// One scenario, placeholders expanded, ready to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Scenario {
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    pub steps: Vec<Step>,
}

/// One request and what must follow from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    /// The client identity to present: a vendor (`getinge`, `spectrum`), one of the bad
    /// certificates (`expired`, `foreign`, `unconfigured`), or `none` for no certificate.
    #[serde(rename = "as")]
    pub identity: String,
    pub request: RequestSpec,
    pub expect: Expectation,
    /// What the EHR must hold after this step.
    #[serde(default)]
    pub ehr: Vec<EhrExpectation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestSpec {
    #[serde(default = "post")]
    pub method: String,
    /// Path and query on the gateway, e.g. `/v1/observations`.
    pub path: String,
    /// Defaults to `application/json` when a body is given.
    #[serde(default)]
    pub content_type: Option<String>,
    /// A JSON body.
    #[serde(default)]
    pub json: Option<Value>,
    /// A body sent as is (malformed input).
    #[serde(default)]
    pub text: Option<String>,
    /// A body of `text` repeated `times` times (oversized input).
    #[serde(default)]
    pub repeat: Option<Repeat>,
    /// Extra request headers, e.g. `{"Accept": "application/fhir+xml"}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `latin1`: `text` is sent in ISO-8859-1 rather than UTF-8 (wrongly encoded input).
    #[serde(default)]
    pub encoding: Option<String>,
}

impl RequestSpec {
    /// The body as sent and its content type (`application/json` by default when there is a
    /// body).
    pub fn body(&self) -> Result<(Bytes, Option<&str>), String> {
        let (body, default_type) = if let Some(json) = &self.json {
            (
                Bytes::from(serde_json::to_vec(json).unwrap_or_default()),
                true,
            )
        } else if let Some(text) = &self.text {
            match self.encoding.as_deref() {
                None | Some("utf-8") => (Bytes::from(text.clone()), true),
                Some("latin1") => (
                    // Every char below U+0100 is its own ISO-8859-1 byte.
                    text.chars()
                        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                        .collect(),
                    true,
                ),
                Some(other) => return Err(format!("unknown encoding {other}")),
            }
        } else if let Some(repeat) = &self.repeat {
            (Bytes::from(repeat.text.repeat(repeat.times)), true)
        } else {
            (Bytes::new(), false)
        };
        let content_type = self
            .content_type
            .as_deref()
            .or(default_type.then_some("application/json"));
        Ok((body, content_type))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repeat {
    pub text: String,
    pub times: usize,
}

fn post() -> String {
    "POST".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Expectation {
    /// The HTTP status. `202` (accepted for delivery) is also met by `200` (already
    /// delivered), so the same files serve gateways in outbox and in direct mode.
    #[serde(default)]
    pub status: Option<u16>,
    /// `true`: the TLS handshake must fail (no HTTP answer at all).
    #[serde(default)]
    pub handshake_refused: bool,
    /// The OperationOutcome's issues, all of them, in order.
    #[serde(default)]
    pub issues: Option<Vec<IssueSpec>>,
    /// The class of error this step provokes (see [`coverage::ERROR_CLASSES`]).
    #[serde(default)]
    pub error_class: Option<String>,
    /// JSON the answer's body must contain (see [`contains`]).
    #[serde(default)]
    pub body: Option<Value>,
    /// The answer's media type (parameters ignored).
    #[serde(default)]
    pub content_type: Option<String>,
    /// Texts the answer's body must contain, as sent (for XML answers).
    #[serde(default)]
    pub body_texts: Vec<String>,
}

/// One expected OperationOutcome issue; fields left out are not checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IssueSpec {
    #[serde(default)]
    pub severity: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    /// The JSON pointer into the request (`expression[0]`).
    #[serde(default)]
    pub expression: Option<String>,
    /// For XML bodies, `line L, column C` (`location[0]`).
    #[serde(default)]
    pub location: Option<String>,
    /// Text `details.text` must contain.
    #[serde(default)]
    pub text: Option<String>,
}

/// Resources the EHR must hold, found by business identifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EhrExpectation {
    pub resource_type: String,
    pub identifier: IdentifierSpec,
    /// How many resources carry the identifier: 1 (the default) means exactly once.
    #[serde(default = "one")]
    pub count: usize,
    /// JSON each of them must contain (see [`contains`]).
    #[serde(default)]
    pub contains: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierSpec {
    pub system: String,
    pub value: String,
}

fn one() -> usize {
    1
}

/// Why a scenario file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl ScenarioSource {
    pub fn load(file: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(file).map_err(|source| ScenarioError::Io {
            file: file.display().to_string(),
            source,
        })?;
        let invalid = |message: String| ScenarioError::Invalid {
            file: file.display().to_string(),
            message,
        };
        // Name and defaults are read before expansion; they may not use placeholders.
        let head: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let name = head["name"]
            .as_str()
            .ok_or_else(|| invalid("no \"name\"".into()))?
            .to_owned();
        let variables = match head.get("variables") {
            None => BTreeMap::new(),
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| invalid(format!("variables: {e}")))?
            }
        };
        let source = Self {
            file: file.to_owned(),
            name,
            text,
            variables,
        };
        // Parse once with stand-in values so a broken file is found at load, not mid-run.
        source.expand("check", OffsetDateTime::now_utc(), &BTreeMap::new())?;
        Ok(source)
    }

    /// Every `*.json` file of `dir`, by file name.
    pub fn load_dir(dir: &Path) -> Result<Vec<Self>, ScenarioError> {
        let io = |source| ScenarioError::Io {
            file: dir.display().to_string(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files.iter().map(|f| Self::load(f)).collect()
    }

    /// The scenario with its placeholders replaced; `overrides` win over its own variables.
    pub fn expand(
        &self,
        run: &str,
        now: OffsetDateTime,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Scenario, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            file: self.file.display().to_string(),
            message,
        };
        // Milliseconds: two executions a second apart must not make the same identifiers
        // for devices with a fixed serial.
        let now = now
            .to_offset(time::UtcOffset::UTC)
            .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
            .unwrap_or(now);
        let mut out = String::with_capacity(self.text.len());
        let mut rest = self.text.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| invalid("unclosed {{".into()))?;
            let name = after[..end].trim();
            let value = match name {
                "run" => run.to_owned(),
                _ if name.contains("now") => time_placeholder(name, now)
                    .ok_or_else(|| invalid(format!("bad time placeholder {{{{{name}}}}}")))?,
                _ => {
                    let raw = overrides
                        .get(name)
                        .or_else(|| self.variables.get(name))
                        .ok_or_else(|| invalid(format!("unknown variable {{{{{name}}}}}")))?;
                    // Inside a JSON string: escape, without the quotes.
                    let quoted = serde_json::to_string(raw).unwrap_or_default();
                    quoted[1..quoted.len() - 1].to_owned()
                }
            };
            out.push_str(&value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        serde_json::from_str(&out).map_err(|e| invalid(e.to_string()))
    }
}

/// `now`, `now-10m`, `date:now-3d`, `compact:now+90s`.
fn time_placeholder(name: &str, now: OffsetDateTime) -> Option<String> {
    let (format, expr) = match name.split_once(':') {
        Some((format, expr)) => (format, expr),
        None => ("rfc3339", name),
    };
    let offset = expr.strip_prefix("now")?;
    let at = if offset.is_empty() {
        now
    } else {
        let (sign, amount) = offset.split_at(1);
        let unit = amount.chars().last()?;
        let n: i64 = amount[..amount.len() - 1].parse().ok()?;
        let d = match unit {
            's' => Duration::seconds(n),
            'm' => Duration::minutes(n),
            'h' => Duration::hours(n),
            'd' => Duration::days(n),
            _ => return None,
        };
        match sign {
            "+" => now + d,
            "-" => now - d,
            _ => return None,
        }
    };
    match format {
        "rfc3339" => Some(format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond()
        )),
        "date" => Some(at.date().to_string()),
        "compact" => Some(format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.millisecond()
        )),
        _ => None,
    }
}

/// Whether `actual` contains `expected`: objects key by key (extra keys allowed), arrays
/// element by element in any order (every expected element matches a distinct actual one),
/// numbers by value (`4.2` = `4.20`), everything else equal.
pub fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, ev)| a.get(k).is_some_and(|av| contains(av, ev))),
        (Value::Array(a), Value::Array(e)) => {
            let mut used = vec![false; a.len()];
            e.iter().all(|ev| {
                let found = a
                    .iter()
                    .enumerate()
                    .find(|(i, av)| !used[*i] && contains(av, ev));
                match found {
                    Some((i, _)) => {
                        used[i] = true;
                        true
                    }
                    None => false,
                }
            })
        }
        (Value::Number(a), Value::Number(e)) => {
            a.as_str() == e.as_str()
                || matches!((a.as_f64(), e.as_f64()), (Some(x), Some(y)) if x == y)
        }
        _ => actual == expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_is_a_subset_match() {
        let actual = json!({"a": [{"x": 1, "y": 2}, {"x": 3}], "n": 4.20, "s": "t"});
        assert!(contains(&actual, &json!({"a": [{"x": 3}], "n": 4.2})));
        assert!(contains(&actual, &json!({"a": [{"x": 3}, {"y": 2}]})));
        assert!(!contains(&actual, &json!({"a": [{"x": 3}, {"x": 3}]})));
        assert!(!contains(&actual, &json!({"s": "u"})));
        assert!(!contains(&actual, &json!({"missing": 1})));
    }

    #[test]
    fn time_placeholders() {
        let now = OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap();
        assert_eq!(
            time_placeholder("now", now).unwrap(),
            "2026-11-18T11:06:40.000Z"
        );
        assert_eq!(
            time_placeholder("now-10m", now).unwrap(),
            "2026-11-18T10:56:40.000Z"
        );
        assert_eq!(
            time_placeholder("compact:now+1h", now).unwrap(),
            "20261118T120640.000Z"
        );
        assert_eq!(time_placeholder("date:now-3d", now).unwrap(), "2026-11-15");
        assert!(time_placeholder("now~1x", now).is_none());
    }
}
