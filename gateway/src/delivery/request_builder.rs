//! Mapped resources to FHIR HTTP requests: idempotent writes, one by one or as a transaction.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use http_body_util::Full;
use mappings::MappedResource;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::config::{FhirFormat, WriteMode};
use crate::delivery::DeliveryError;
use crate::delivery::client::EhrRequest;
use crate::ingress::negotiate::FHIR_XML;
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
    /// Destination name, for errors.
    destination: String,
    write: WriteMode,
    format: FhirFormat,
}

impl RequestBuilder {
    /// The FHIR base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn new(destination: &str, base_url: &str, write: WriteMode, format: FhirFormat) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            destination: destination.to_owned(),
            write,
            format,
        }
    }

    /// A resource as this destination's format. JSON is sent as built; XML is written from
    /// the typed model, which cannot fail for a resource that passed the conformance check,
    /// but if it does the resource is refused for good rather than sent wrong.
    fn encode(&self, json: &[u8]) -> Result<Vec<u8>, DeliveryError> {
        match self.format {
            FhirFormat::Json => Ok(json.to_vec()),
            FhirFormat::Xml => mappings::resource_to_xml(json).map_err(|reason| {
                DeliveryError::Rejected {
                    destination: self.destination.clone(),
                    status: http::StatusCode::UNPROCESSABLE_ENTITY,
                    outcome: Some(serde_json::json!({
                        "resourceType": "OperationOutcome",
                        "issue": [{"severity": "error", "code": "exception",
                                   "details": {"text": format!("the gateway could not write the resource as FHIR XML: {reason}")}}]
                    })),
                }
            }),
        }
    }

    pub fn write_mode(&self) -> WriteMode {
        self.write
    }

    /// The search that finds a resource again by its business key,
    /// `identifier=<system>|<value>` (a Provenance: `_tag=`), escaped.
    pub fn identifier_query(resource: &MappedResource) -> String {
        let token = format!(
            "{}|{}",
            resource.identifier_system, resource.identifier_value
        );
        format!(
            "{}={}",
            mappings::business_key_parameter(resource.resource_type),
            utf8_percent_encode(&token, QUERY_VALUE)
        )
    }

    /// One request for one resource: conditional create (or conditional update for resources
    /// that change, such as a run's Procedure), or PUT to the derived id.
    pub fn single(&self, resource: &MappedResource) -> Result<EhrRequest, DeliveryError> {
        let (method, uri, json) = match self.write {
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
            WriteMode::ConditionalCreate | WriteMode::Create => (
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
        let body = match self.format {
            FhirFormat::Json => json,
            FhirFormat::Xml => self.encode(&json)?,
        };
        let mut request = fhir_request(method, &uri, body, self.format);
        if self.write == WriteMode::ConditionalCreate
            && !resource.upsert
            && let Ok(value) = HeaderValue::from_str(&Self::identifier_query(resource))
        {
            request.headers_mut().insert("if-none-exist", value);
        }
        Ok(request)
    }

    /// A transaction Bundle of all `resources`: the EHR stores all of them or none.
    pub fn transaction(&self, resources: &[MappedResource]) -> Result<EhrRequest, DeliveryError> {
        if self.format == FhirFormat::Xml {
            return self.transaction_xml(resources);
        }
        let size: usize = resources.iter().map(|r| r.json.len() + 256).sum();
        let mut body = Vec::with_capacity(size + 64);
        body.extend_from_slice(br#"{"resourceType":"Bundle","type":"transaction","entry":["#);
        for (i, resource) in resources.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let entry = self.transaction_entry(resource);
            body.extend_from_slice(br#"{"fullUrl":"#);
            push_json_string(&mut body, &entry.full_url);
            body.extend_from_slice(br#","resource":"#);
            body.extend_from_slice(&entry.resource);
            body.extend_from_slice(br#","request":{"method":""#);
            body.extend_from_slice(entry.method.as_bytes());
            body.extend_from_slice(br#"","url":"#);
            push_json_string(&mut body, &entry.url);
            if let Some(query) = &entry.if_none_exist {
                body.extend_from_slice(br#","ifNoneExist":"#);
                push_json_string(&mut body, query);
            }
            body.extend_from_slice(b"}}");
        }
        body.extend_from_slice(b"]}");
        Ok(fhir_request(Method::POST, &self.base, body, self.format))
    }

    /// How `resource` is written inside a transaction, whatever the format.
    fn transaction_entry<'a>(&self, resource: &'a MappedResource) -> TransactionEntry<'a> {
        let full_url = full_url_of(&self.base, self.write, resource);
        match self.write {
            WriteMode::ConditionalCreate if resource.upsert => TransactionEntry {
                full_url,
                resource: Cow::Borrowed(&resource.json),
                method: "PUT",
                url: format!(
                    "{}?{}",
                    resource.resource_type,
                    Self::identifier_query(resource)
                ),
                if_none_exist: None,
            },
            // `Create` destinations take no transactions (the configuration says so); as a
            // transaction entry it would be a conditional create.
            WriteMode::ConditionalCreate | WriteMode::Create => TransactionEntry {
                full_url,
                resource: Cow::Borrowed(&resource.json),
                method: "POST",
                url: resource.resource_type.to_owned(),
                if_none_exist: Some(Self::identifier_query(resource)),
            },
            WriteMode::Put => {
                let url = format!("{}/{}", resource.resource_type, resource.id);
                TransactionEntry {
                    full_url,
                    resource: Cow::Owned(with_id(&resource.json, &resource.id)),
                    method: "PUT",
                    url,
                    if_none_exist: None,
                }
            }
        }
    }

    /// The same transaction in FHIR XML: the Bundle's envelope written here, each resource
    /// written from the typed model.
    fn transaction_xml(&self, resources: &[MappedResource]) -> Result<EhrRequest, DeliveryError> {
        let size: usize = resources.iter().map(|r| r.json.len() * 2 + 256).sum();
        let mut body = Vec::with_capacity(size + 128);
        body.extend_from_slice(
            br#"<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/>"#,
        );
        for resource in resources {
            let entry = self.transaction_entry(resource);
            body.extend_from_slice(b"<entry><fullUrl value=\"");
            push_xml_attribute(&mut body, &entry.full_url);
            body.extend_from_slice(b"\"/><resource>");
            body.extend_from_slice(&self.encode(&entry.resource)?);
            body.extend_from_slice(b"</resource><request><method value=\"");
            body.extend_from_slice(entry.method.as_bytes());
            body.extend_from_slice(b"\"/><url value=\"");
            push_xml_attribute(&mut body, &entry.url);
            body.extend_from_slice(b"\"/>");
            if let Some(query) = &entry.if_none_exist {
                body.extend_from_slice(b"<ifNoneExist value=\"");
                push_xml_attribute(&mut body, query);
                body.extend_from_slice(b"\"/>");
            }
            body.extend_from_slice(b"</request></entry>");
        }
        body.extend_from_slice(b"</Bundle>");
        Ok(fhir_request(Method::POST, &self.base, body, self.format))
    }
}

/// A resource's `fullUrl` in a transaction: with client-assigned ids its URL at the EHR, else
/// a `urn:uuid:` from its derived id, which other entries may reference and the EHR replaces.
pub(crate) fn full_url_of(base: &str, write: WriteMode, resource: &MappedResource) -> String {
    match write {
        WriteMode::ConditionalCreate | WriteMode::Create => uuid_urn(&resource.id),
        WriteMode::Put => format!("{base}/{}/{}", resource.resource_type, resource.id),
    }
}

/// One transaction entry: `fullUrl`, the resource (JSON) and its `request`.
struct TransactionEntry<'a> {
    full_url: String,
    resource: Cow<'a, [u8]>,
    method: &'static str,
    url: String,
    if_none_exist: Option<String>,
}

fn push_xml_attribute(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(quick_xml::escape::escape(value).as_bytes());
}

fn fhir_request(method: Method, uri: &str, body: Vec<u8>, format: FhirFormat) -> EhrRequest {
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = method;
    // The base URL was checked at start-up and ids are hex, so the URI always parses.
    *request.uri_mut() = uri.parse().unwrap_or_default();
    let media = HeaderValue::from_static(match format {
        FhirFormat::Json => FHIR_JSON,
        FhirFormat::Xml => FHIR_XML,
    });
    let headers = request.headers_mut();
    headers.insert(header::CONTENT_TYPE, media.clone());
    headers.insert(header::ACCEPT, media);
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
        let builder = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir/",
            WriteMode::ConditionalCreate,
            FhirFormat::Json,
        );
        let request = builder.single(&resource()).unwrap();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "https://ehr.example/fhir/Observation");
        assert_eq!(
            request.headers()["if-none-exist"],
            "identifier=https://fhir.ecmo-gateway.org/sid/observation%7Cfam:SN-1:pump-blood-flow:20261121T101500.000Z"
        );
    }

    #[tokio::test]
    async fn put_goes_to_the_derived_id_with_the_id_in_the_body() {
        let builder = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir",
            WriteMode::Put,
            FhirFormat::Json,
        );
        let request = builder.single(&resource()).unwrap();
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
        let builder = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir",
            WriteMode::ConditionalCreate,
            FhirFormat::Json,
        );
        let bundle = body_json(builder.transaction(&[resource(), resource()]).unwrap()).await;
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

        let builder = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir",
            WriteMode::Put,
            FhirFormat::Json,
        );
        let bundle = body_json(builder.transaction(&[resource()]).unwrap()).await;
        assert_eq!(bundle["entry"][0]["request"]["method"], "PUT");
        assert_eq!(
            bundle["entry"][0]["resource"]["id"],
            "0123456789abcdef0123456789abcdef"
        );
    }

    #[tokio::test]
    async fn xml_destinations_get_fhir_xml_bundles() {
        let mut observation = resource();
        observation.json = br#"{"resourceType":"Observation","status":"final","code":{"text":"Flow"},"valueQuantity":{"value":4.20}}"#.to_vec();
        let builder = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir",
            WriteMode::ConditionalCreate,
            FhirFormat::Xml,
        );
        let request = builder.transaction(&[observation.clone()]).unwrap();
        assert_eq!(request.headers()[header::CONTENT_TYPE], FHIR_XML);
        assert_eq!(request.headers()[header::ACCEPT], FHIR_XML);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let xml = String::from_utf8(body.to_vec()).unwrap();
        assert!(xml.starts_with(r#"<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/><entry><fullUrl value="urn:uuid:01234567-89ab-cdef-0123-456789abcdef"/><resource><Observation xmlns="http://hl7.org/fhir">"#), "{xml}");
        assert!(xml.contains(r#"<status value="final"/>"#), "{xml}");
        assert!(xml.contains(r#"<value value="4.20"/>"#), "{xml}");
        assert!(xml.contains(r#"<request><method value="POST"/><url value="Observation"/><ifNoneExist value="identifier=https://fhir.ecmo-gateway.org/sid/observation%7Cfam:SN-1:pump-blood-flow:20261121T101500.000Z"/></request></entry></Bundle>"#), "{xml}");

        let put = RequestBuilder::new(
            "ehr",
            "https://ehr.example/fhir",
            WriteMode::Put,
            FhirFormat::Xml,
        );
        let request = put.single(&observation).unwrap();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let xml = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            xml.starts_with(r#"<Observation xmlns="http://hl7.org/fhir">"#),
            "{xml}"
        );
        assert!(
            xml.contains(r#"<id value="0123456789abcdef0123456789abcdef"/>"#),
            "{xml}"
        );

        // What cannot be written as FHIR is refused for good, with a reason.
        let mut broken = resource();
        broken.json = br#"{"resourceType":"Observation","colour":"blue"}"#.to_vec();
        match builder.single(&broken) {
            Err(DeliveryError::Rejected {
                outcome: Some(o), ..
            }) => {
                assert!(o.to_string().contains("FHIR XML"), "{o}")
            }
            other => panic!("{other:?}"),
        }
    }
}
