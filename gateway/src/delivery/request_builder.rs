//! Mapped resources to FHIR HTTP requests: idempotent writes, one by one or as a transaction.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use mappings::MappedResource;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::config::WriteMode;
use crate::delivery::client::EhrRequest;
use crate::outcome::FHIR_JSON;

/// Characters escaped in a search parameter value (`identifier=system|value`).
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>')
    .add(b'|')
    .add(b',')
    .add(b'$');

#[derive(Debug, Clone)]
pub struct RequestBuilder {
    /// FHIR base URL without a trailing slash.
    base: String,
    write: WriteMode,
}

impl RequestBuilder {
    pub fn new(base_url: &str, write: WriteMode) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            write,
        }
    }

    pub fn write_mode(&self) -> WriteMode {
        self.write
    }

    /// The search that finds a resource again: `identifier=<system>|<value>`, escaped.
    pub fn identifier_query(resource: &MappedResource) -> String {
        let token = format!(
            "{}|{}",
            resource.identifier_system, resource.identifier_value
        );
        format!("identifier={}", utf8_percent_encode(&token, QUERY_VALUE))
    }

    /// One request for one resource: conditional create (or conditional update for resources
    /// that change, such as a run's Procedure), or PUT to the derived id.
    pub fn single(&self, resource: &MappedResource) -> EhrRequest {
        let (method, uri, body) = match self.write {
            WriteMode::ConditionalCreate if resource.upsert => (
                Method::PUT,
                format!(
                    "{}/{}?{}",
                    self.base,
                    resource.resource_type,
                    Self::identifier_query(resource)
                ),
                resource.json.clone(),
            ),
            WriteMode::ConditionalCreate => (
                Method::POST,
                format!("{}/{}", self.base, resource.resource_type),
                resource.json.clone(),
            ),
            WriteMode::Put => (
                Method::PUT,
                format!("{}/{}/{}", self.base, resource.resource_type, resource.id),
                with_id(&resource.json, &resource.id),
            ),
        };
        let mut request = fhir_request(method, &uri, body);
        if self.write == WriteMode::ConditionalCreate
            && !resource.upsert
            && let Ok(value) = HeaderValue::from_str(&Self::identifier_query(resource))
        {
            request.headers_mut().insert("if-none-exist", value);
        }
        request
    }

    /// A transaction Bundle of all `resources`: the EHR stores all of them or none.
    pub fn transaction(&self, resources: &[MappedResource]) -> EhrRequest {
        let size: usize = resources.iter().map(|r| r.json.len() + 256).sum();
        let mut body = Vec::with_capacity(size + 64);
        body.extend_from_slice(br#"{"resourceType":"Bundle","type":"transaction","entry":["#);
        for (i, resource) in resources.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(br#"{"fullUrl":"#);
            match self.write {
                WriteMode::ConditionalCreate if resource.upsert => {
                    push_json_string(&mut body, &uuid_urn(&resource.id));
                    body.extend_from_slice(br#","resource":"#);
                    body.extend_from_slice(&resource.json);
                    body.extend_from_slice(br#","request":{"method":"PUT","url":"#);
                    let url = format!(
                        "{}?{}",
                        resource.resource_type,
                        Self::identifier_query(resource)
                    );
                    push_json_string(&mut body, &url);
                }
                WriteMode::ConditionalCreate => {
                    push_json_string(&mut body, &uuid_urn(&resource.id));
                    body.extend_from_slice(br#","resource":"#);
                    body.extend_from_slice(&resource.json);
                    body.extend_from_slice(br#","request":{"method":"POST","url":"#);
                    push_json_string(&mut body, resource.resource_type);
                    body.extend_from_slice(br#","ifNoneExist":"#);
                    push_json_string(&mut body, &Self::identifier_query(resource));
                }
                WriteMode::Put => {
                    let path = format!("{}/{}", resource.resource_type, resource.id);
                    push_json_string(&mut body, &format!("{}/{}", self.base, path));
                    body.extend_from_slice(br#","resource":"#);
                    body.extend_from_slice(&with_id(&resource.json, &resource.id));
                    body.extend_from_slice(br#","request":{"method":"PUT","url":"#);
                    push_json_string(&mut body, &path);
                }
            }
            body.extend_from_slice(b"}}");
        }
        body.extend_from_slice(b"]}");
        fhir_request(Method::POST, &self.base, body)
    }
}

fn fhir_request(method: Method, uri: &str, body: Vec<u8>) -> EhrRequest {
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = method;
    // The base URL was checked at start-up and ids are hex, so the URI always parses.
    *request.uri_mut() = uri.parse().unwrap_or_default();
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
    request
}

/// The resource JSON with `"id"` added as its first member after `resourceType`'s object
/// opening; ids are hex, so nothing needs escaping.
fn with_id(json: &[u8], id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + id.len() + 8);
    out.extend_from_slice(br#"{"id":""#);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(json.strip_prefix(b"{").unwrap_or(json));
    out
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `urn:uuid:` from a 32-hex-digit id, so fullUrls are stable across resends.
fn uuid_urn(id: &str) -> String {
    if id.len() == 32 {
        format!(
            "urn:uuid:{}-{}-{}-{}-{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..]
        )
    } else {
        format!("urn:uuid:{}", uuid::Uuid::new_v4())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::Value;

    fn resource() -> MappedResource {
        MappedResource {
            resource_type: "Observation",
            id: "0123456789abcdef0123456789abcdef".into(),
            identifier_system: "https://fhir.ecmo-gateway.org/sid/observation".into(),
            identifier_value: "fam:SN-1:pump-blood-flow:20261121T101500.000Z".into(),
            json: br#"{"resourceType":"Observation","status":"final"}"#.to_vec(),
            upsert: false,
        }
    }

    async fn body_json(request: EhrRequest) -> Value {
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn conditional_create_carries_if_none_exist() {
        let builder =
            RequestBuilder::new("https://ehr.example/fhir/", WriteMode::ConditionalCreate);
        let request = builder.single(&resource());
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "https://ehr.example/fhir/Observation");
        assert_eq!(
            request.headers()["if-none-exist"],
            "identifier=https://fhir.ecmo-gateway.org/sid/observation%7Cfam:SN-1:pump-blood-flow:20261121T101500.000Z"
        );
    }

    #[tokio::test]
    async fn put_goes_to_the_derived_id_with_the_id_in_the_body() {
        let builder = RequestBuilder::new("https://ehr.example/fhir", WriteMode::Put);
        let request = builder.single(&resource());
        assert_eq!(request.method(), Method::PUT);
        assert_eq!(
            request.uri(),
            "https://ehr.example/fhir/Observation/0123456789abcdef0123456789abcdef"
        );
        let body = body_json(request).await;
        assert_eq!(body["id"], "0123456789abcdef0123456789abcdef");
        assert_eq!(body["resourceType"], "Observation");
    }

    #[tokio::test]
    async fn transaction_bundle_is_valid_json_with_requests() {
        let builder = RequestBuilder::new("https://ehr.example/fhir", WriteMode::ConditionalCreate);
        let bundle = body_json(builder.transaction(&[resource(), resource()])).await;
        assert_eq!(bundle["type"], "transaction");
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 2);
        let entry = &bundle["entry"][0];
        assert_eq!(
            entry["fullUrl"],
            "urn:uuid:01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(entry["request"]["method"], "POST");
        assert_eq!(entry["request"]["url"], "Observation");
        assert!(
            entry["request"]["ifNoneExist"]
                .as_str()
                .unwrap()
                .starts_with("identifier=")
        );

        let builder = RequestBuilder::new("https://ehr.example/fhir", WriteMode::Put);
        let bundle = body_json(builder.transaction(&[resource()])).await;
        assert_eq!(bundle["entry"][0]["request"]["method"], "PUT");
        assert_eq!(
            bundle["entry"][0]["resource"]["id"],
            "0123456789abcdef0123456789abcdef"
        );
    }
}
