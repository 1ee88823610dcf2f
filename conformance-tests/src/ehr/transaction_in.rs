//! A transaction Bundle as the reference EHR reads it: the envelope typed and borrowed, each
//! entry's resource left as written and parsed whole only when the EHR keeps or checks it.
//! The benchmark's EHR keeps no bodies and checks nothing; it reads of a resource only what
//! conditional writes, counting and the fault plan need ([`ResourceHead`]), so that on a
//! machine it shares with the gateway it takes as little of the CPU as it can.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Deserialize)]
pub struct TransactionIn<'a> {
    #[serde(rename = "resourceType", default, borrow)]
    pub resource_type: Option<Cow<'a, str>>,
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub entry: Vec<EntryIn<'a>>,
}

#[derive(Deserialize)]
pub struct EntryIn<'a> {
    #[serde(rename = "fullUrl", default, borrow)]
    pub full_url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub request: RequestIn<'a>,
    #[serde(default, borrow)]
    pub resource: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
pub struct RequestIn<'a> {
    #[serde(default, borrow)]
    pub method: Cow<'a, str>,
    #[serde(default, borrow)]
    pub url: Cow<'a, str>,
    #[serde(rename = "ifNoneExist", default, borrow)]
    pub if_none_exist: Option<Cow<'a, str>>,
}

/// What an EHR that keeps no bodies reads of a resource: its type, id, identifiers and tags.
#[derive(Deserialize)]
struct ResourceHead<'a> {
    #[serde(rename = "resourceType", default, borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    identifier: Vec<Token<'a>>,
    #[serde(default, borrow)]
    meta: Option<Meta<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(default, borrow)]
    tag: Vec<Token<'a>>,
}

/// An Identifier (system, value) or a tag Coding (system, code).
#[derive(Deserialize)]
struct Token<'a> {
    #[serde(default, borrow)]
    system: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    value: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

/// The entry's resource as JSON: whole, or (`head_only`) only what [`ResourceHead`] reads, in
/// the same shape, so the store indexes and counts it as it would the whole one. A resource
/// whose head does not read as expected is parsed whole.
pub fn resource_value(raw: Option<&RawValue>, head_only: bool) -> Value {
    let Some(raw) = raw else {
        return Value::Null;
    };
    if head_only && let Ok(head) = serde_json::from_str::<ResourceHead<'_>>(raw.get()) {
        return head.into_value();
    }
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

impl ResourceHead<'_> {
    fn into_value(self) -> Value {
        fn put(map: &mut Map<String, Value>, key: &str, v: Option<Cow<'_, str>>) {
            if let Some(v) = v {
                map.insert(key.to_owned(), Value::String(v.into_owned()));
            }
        }
        let mut resource = Map::new();
        put(&mut resource, "resourceType", self.resource_type);
        put(&mut resource, "id", self.id);
        let tokens = |tokens: Vec<Token<'_>>| -> Value {
            tokens
                .into_iter()
                .map(|t| {
                    let mut token = Map::new();
                    put(&mut token, "system", t.system);
                    put(&mut token, "value", t.value);
                    put(&mut token, "code", t.code);
                    Value::Object(token)
                })
                .collect()
        };
        if !self.identifier.is_empty() {
            resource.insert("identifier".into(), tokens(self.identifier));
        }
        if let Some(meta) = self.meta.filter(|m| !m.tag.is_empty()) {
            let mut m = Map::new();
            m.insert("tag".into(), tokens(meta.tag));
            resource.insert("meta".into(), Value::Object(m));
        }
        Value::Object(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ehr::store::search_tokens;

    #[test]
    fn the_head_indexes_as_the_whole_resource_does() {
        let raw = r#"{"resourceType":"Observation","id":"o1","meta":{"tag":[{"system":"t","code":"c"}]},
            "identifier":[{"system":"s","value":"v"},{"value":"w"}],"status":"final",
            "valueQuantity":{"value":1.50,"unit":"L/min"}}"#;
        let raw: &RawValue = serde_json::from_str(raw).unwrap();
        let whole = resource_value(Some(raw), false);
        let head = resource_value(Some(raw), true);
        assert_eq!(whole["valueQuantity"]["unit"], "L/min");
        assert_eq!(
            head.get("valueQuantity"),
            None,
            "the head leaves the rest out"
        );
        assert_eq!(head["resourceType"], "Observation");
        assert_eq!(head["id"], "o1");
        assert_eq!(search_tokens(&head), search_tokens(&whole));
        assert_eq!(search_tokens(&head), ["s|v", "|w", "_tag:t|c"]);
    }

    /// The benchmark's EHR (no bodies, no checks) answers a transaction as the full one does:
    /// conditional creates find what the first one wrote, a conditional update updates it.
    #[tokio::test]
    async fn an_ehr_without_bodies_writes_and_answers_as_the_full_one() {
        use http_body_util::BodyExt;
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:d", "request": {"method": "PUT", "url": "Device?identifier=s%7Cd"},
             "resource": {"resourceType": "Device", "identifier": [{"system": "s", "value": "d"}]}},
            {"fullUrl": "urn:uuid:o", "request": {"method": "POST", "url": "Observation",
                "ifNoneExist": "identifier=s%7Co"},
             "resource": {"resourceType": "Observation", "status": "final",
                "identifier": [{"system": "s", "value": "o"}],
                "device": {"reference": "urn:uuid:d"}, "valueQuantity": {"value": 3.10}}}
        ]})
        .to_string();
        let mut answers = Vec::new();
        for lean in [false, true] {
            let ehr = crate::ehr::ReferenceEhr::new();
            ehr.skip_structure_check();
            if lean {
                ehr.forget_bodies();
            }
            let mut statuses = Vec::new();
            for _ in 0..2 {
                let answer = ehr.transaction(bundle.as_bytes());
                assert_eq!(answer.status(), 200);
                let body = answer.into_body().collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&body).unwrap();
                statuses.push(
                    body["entry"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
                        .collect::<Vec<_>>(),
                );
            }
            assert_eq!((ehr.count("Observation"), ehr.count("Device")), (1, 1));
            answers.push(statuses);
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(
            answers[1],
            [["201 Created", "201 Created"], ["200 OK", "200 OK"]]
        );
    }

    #[test]
    fn a_head_of_another_shape_is_read_whole() {
        let raw: &RawValue =
            serde_json::from_str(r#"{"resourceType":"Device","identifier":{"value":"x"}}"#)
                .unwrap();
        assert_eq!(resource_value(Some(raw), true)["identifier"]["value"], "x");
        assert_eq!(resource_value(None, true), Value::Null);
    }
}
