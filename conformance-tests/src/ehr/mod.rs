//! A reference EHR FHIR R4 server: mutual TLS, an in-memory store, create, conditional create
//! (`If-None-Exist`), update by id, conditional update, read, version history (`_history`),
//! search by identifier, and transaction Bundles (all or nothing; two entries about the same
//! resource are refused, as real servers do). Incoming Observations, Procedures and Devices are checked against the typed R4
//! model and refused with 422 when they do not conform, as a real server would.
//!
//! A small fault plan lets tests make it refuse or fail the next writes.

pub mod references;
pub mod smart;
pub mod store;
mod transaction_in;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use gateway::outcome::{Issue, fhir_json_response, operation_outcome};
use gateway::server::{ServeOptions, serve_mtls};
use gateway::{BoxBody, BoxError};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use store::{Store, WriteOutcome};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// What happens to one of the next writes instead of plain processing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fault {
    /// Wait this long first (the write is still processed afterwards unless `status` is set).
    pub delay: Option<std::time::Duration>,
    /// Answer with this status and store nothing.
    pub status: Option<u16>,
    pub retry_after: Option<u32>,
    /// Close the connection without answering.
    pub drop_connection: bool,
    /// Process the write, then close the connection without answering: the client cannot
    /// know that it was stored (a lost response, the case idempotent writes are for).
    pub lose_answer: bool,
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn delay(delay: std::time::Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    pub fn drop_connection() -> Self {
        Self {
            drop_connection: true,
            ..Self::default()
        }
    }

    pub fn lose_answer() -> Self {
        Self {
            lose_answer: true,
            ..Self::default()
        }
    }
}

/// Features a reference EHR can be told to lack: it then refuses them and leaves them out of
/// its CapabilityStatement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Without {
    /// Transaction Bundles: 405.
    pub transactions: bool,
    /// FHIR XML: 415.
    pub xml: bool,
    /// Conditional create and conditional update (`If-None-Exist`, `PUT Type?identifier=`):
    /// 400, as servers that take plain creates only answer.
    pub conditional_writes: bool,
}

/// One write as the EHR saw it: when it arrived and what it answered.
#[derive(Debug, Clone, Copy)]
pub struct WriteRecord {
    pub arrived: std::time::Instant,
    pub status: u16,
    pub retry_after: Option<u32>,
}

/// The connection was dropped on purpose (fault plan).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the fault plan")]
pub struct Dropped;

#[derive(Clone, Default)]
pub struct ReferenceEhr {
    store: Arc<Mutex<Store>>,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Identifier fragments whose resources are refused with 422 (a business rule).
    rejections: Arc<Mutex<Vec<String>>>,
    writes: Arc<Mutex<Vec<WriteRecord>>>,
    /// When no queued fault is left: this fault for this fraction of writes (seeded, so a run
    /// can be repeated).
    fraction: Arc<Mutex<Option<(Fault, f64, fastrand::Rng)>>>,
    /// Requests whose body was FHIR XML.
    xml_requests: Arc<std::sync::atomic::AtomicUsize>,
    /// When set, reads (GET) need `Authorization: Bearer <token>`, as sandboxes often do.
    read_token: Arc<Mutex<Option<String>>>,
    /// Transactions with more entries are refused with 400, as Medplum (8), HealthLake (160)
    /// and others refuse theirs.
    max_transaction_entries: Arc<std::sync::atomic::AtomicUsize>,
    /// Set by the benchmark only: resources are stored without the R4 structure check, so
    /// that the EHR is not what limits a delivery figure. The suite always checks.
    skip_structure_check: Arc<std::sync::atomic::AtomicBool>,
    /// SMART Backend Services: once a client is registered, every FHIR request but
    /// `metadata` and the SMART configuration needs a bearer token from `/auth/token`.
    smart: Arc<Mutex<Option<smart::SmartAuthority>>>,
    /// `https://<address>` once listening (the token endpoint's `aud` is built from it).
    origin: Arc<Mutex<Option<String>>>,
    /// References must be literal and resolve (as in most hospital EHRs); by identifier
    /// alone they are refused.
    literal_references: Arc<std::sync::atomic::AtomicBool>,
    /// Observations about a patient must name an Encounter.
    require_encounter: Arc<std::sync::atomic::AtomicBool>,
    /// Features this EHR does without (and says so in its CapabilityStatement), as some
    /// real ones do.
    without: Arc<Mutex<Without>>,
    /// Writes being handled now, and the most seen at once.
    concurrent_writes: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
}

/// Counts a write as in progress while it lives.
struct WriteInProgress(
    Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
);

impl WriteInProgress {
    fn start(
        counters: &Arc<(
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        )>,
    ) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let now = counters.0.fetch_add(1, SeqCst) + 1;
        counters.1.fetch_max(now, SeqCst);
        Self(counters.clone())
    }
}

impl Drop for WriteInProgress {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A reference EHR listening on a socket; stops when dropped.
pub struct RunningEhr {
    pub ehr: ReferenceEhr,
    pub addr: SocketAddr,
    /// `https://127.0.0.1:<port>/fhir`
    pub base_url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for RunningEhr {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReferenceEhr {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, transactions of more than `entries` entries are refused with 400.
    pub fn limit_transaction_entries(&self, entries: usize) {
        self.max_transaction_entries
            .store(entries, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on, stores resources without checking them against R4 (for the benchmark).
    pub fn skip_structure_check(&self) {
        self.skip_structure_check
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on, keeps what conditional create and counting need, not the resources (for
    /// the benchmark, whose EHR takes millions).
    pub fn forget_bodies(&self) {
        lock(&self.store).forget_bodies = true;
    }

    /// The most writes the EHR was handling at one time.
    pub fn max_concurrent_writes(&self) -> usize {
        self.concurrent_writes
            .1
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on, references to what this EHR holds must be literal and resolve.
    pub fn require_literal_references(&self) {
        self.literal_references
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on, an Observation about a patient must name its Encounter (as EHRs that
    /// file device data under the current visit require).
    pub fn require_encounter(&self) {
        self.require_encounter
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Opens (`in-progress`) or records an Encounter of the patient with id `patient`, as the
    /// hospital's ADT feed would; returns its id.
    pub fn add_encounter(&self, patient: &str, status: &str) -> String {
        let encounter = json!({
            "resourceType": "Encounter",
            "status": status,
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": format!("Patient/{patient}")}
        });
        match lock(&self.store).create("Encounter", encounter, None) {
            WriteOutcome::Created { id, .. }
            | WriteOutcome::Updated { id, .. }
            | WriteOutcome::Exists { id, .. } => id,
        }
    }

    /// Registers a patient (as the hospital's ADT feed would) and returns its id.
    pub fn add_patient(&self, system: &str, value: &str) -> String {
        let patient = json!({
            "resourceType": "Patient",
            "identifier": [{"system": system, "value": value}],
            "active": true
        });
        match lock(&self.store).create("Patient", patient, None) {
            WriteOutcome::Created { id, .. }
            | WriteOutcome::Updated { id, .. }
            | WriteOutcome::Exists { id, .. } => id,
        }
    }

    /// With literal references required: why `resource` may not be written, if it may not.
    /// `pending` are the `Type/id`s a transaction writes before it.
    fn unresolved(&self, resource: &Value, pending: &[String]) -> Option<Refusal> {
        if !self
            .literal_references
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        if self
            .require_encounter
            .load(std::sync::atomic::Ordering::SeqCst)
            && resource["resourceType"] == "Observation"
            && resource.get("subject").is_some()
            && resource.get("encounter").is_none()
        {
            return Some(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "required",
                "Observation.encounter: this EHR files device data under the patient's Encounter"
                    .into(),
            ));
        }
        if let Some(logical) = references::by_identifier_only(resource) {
            return Some(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!(
                    "a reference to {logical} by identifier alone: this EHR needs literal references (Reference.reference)"
                ),
            ));
        }
        let store = lock(&self.store);
        let origin = lock(&self.origin).clone().unwrap_or_default();
        let base = format!("{origin}/fhir");
        for reference in references::literal(resource) {
            let Some((kind, id)) = references::type_and_id(&reference, &base) else {
                return Some(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!("reference '{reference}' resolves to nothing here"),
                ));
            };
            if store.read(kind, id).is_none()
                && !pending.iter().any(|p| p == &format!("{kind}/{id}"))
            {
                return Some(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "not-found",
                    format!("reference '{reference}': no {kind} with id {id}"),
                ));
            }
        }
        None
    }

    /// From now on, does without these features.
    pub fn without(&self, without: Without) {
        *lock(&self.without) = without;
    }

    /// Registers a SMART Backend Services client; from now on every FHIR request needs a
    /// bearer token issued to a registered client, with a scope for what it does.
    pub fn register_smart_client(&self, client: smart::RegisteredClient) {
        let origin = lock(&self.origin).clone().unwrap_or_default();
        lock(&self.smart)
            .get_or_insert_with(|| smart::SmartAuthority::new(token_url(&origin)))
            .register(client);
    }

    /// The SMART authorization server's state (panics if no client was registered).
    pub fn smart<T>(&self, f: impl FnOnce(&mut smart::SmartAuthority) -> T) -> T {
        f(lock(&self.smart)
            .as_mut()
            .expect("register_smart_client first"))
    }

    /// From now on, reads need this bearer token (401 without it).
    pub fn require_bearer_for_reads(&self, token: &str) {
        *lock(&self.read_token) = Some(token.to_owned());
    }

    /// How many requests came with an XML body.
    pub fn xml_requests(&self) -> usize {
        self.xml_requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next `count` writes get `fault` instead of being stored.
    pub fn fail_next(&self, fault: Fault, count: usize) {
        let mut faults = lock(&self.faults);
        faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Every stored resource of a type, as it is now.
    pub fn all_resources(&self, resource_type: &str) -> Vec<Value> {
        lock(&self.store)
            .all(resource_type)
            .into_iter()
            .map(|s| s.resource.clone())
            .collect()
    }

    pub fn count(&self, resource_type: &str) -> usize {
        lock(&self.store).count(resource_type)
    }

    /// After the queued faults, `fault` for about `fraction` of the writes (0 turns it off).
    pub fn fail_fraction(&self, fault: Fault, fraction: f64) {
        *lock(&self.fraction) =
            (fraction > 0.0).then(|| (fault, fraction, fastrand::Rng::with_seed(7)));
    }

    /// Refuse, with 422, every resource whose identifier value contains `fragment`.
    pub fn reject_identifiers_containing(&self, fragment: &str) {
        lock(&self.rejections).push(fragment.to_owned());
    }

    pub fn clear_rejections(&self) {
        lock(&self.rejections).clear();
    }

    /// Every write so far, in arrival order.
    pub fn writes(&self) -> Vec<WriteRecord> {
        lock(&self.writes).clone()
    }

    /// How many stored resources of a type carry each identifier value (a duplicate shows as 2).
    pub fn identifier_counts(
        &self,
        resource_type: &str,
    ) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for stored in lock(&self.store).all(resource_type) {
            for token in store::identifier_tokens(&stored.resource) {
                *counts
                    .entry(
                        token
                            .split_once('|')
                            .map_or(token.clone(), |(_, v)| v.to_owned()),
                    )
                    .or_insert(0) += 1;
            }
        }
        counts
    }

    /// A valid R4 resource that no business rule refuses.
    fn accept(&self, resource_type: &str, body: &[u8]) -> Result<Value, Refusal> {
        let resource: Value = serde_json::from_slice(body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "structure",
                format!("not JSON: {e}"),
            )
        })?;
        self.accept_value(resource_type, resource)
    }

    /// [`Self::accept`] for a resource already parsed (a transaction entry).
    fn accept_value(&self, resource_type: &str, resource: Value) -> Result<Value, Refusal> {
        if resource["resourceType"] != resource_type || resource_type.is_empty() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("resourceType must be '{resource_type}'"),
            ));
        }
        if self
            .skip_structure_check
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.allowed(resource);
        }
        mappings::check_resource_value(resource_type, resource.clone()).map_err(|reason| {
            Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "structure",
                format!("not a valid R4 {resource_type}: {reason}"),
            )
        })?;
        self.allowed(resource)
    }

    /// `resource` unless the fault plan's business rules refuse it.
    fn allowed(&self, resource: Value) -> Result<Value, Refusal> {
        if let Some(identifier) = self.rejected(&resource) {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                format!("the EHR does not accept {identifier} (rule of the fault plan)"),
            ));
        }
        Ok(resource)
    }

    fn rejected(&self, resource: &Value) -> Option<String> {
        let rejections = lock(&self.rejections);
        store::identifier_tokens(resource)
            .into_iter()
            .find(|token| {
                rejections
                    .iter()
                    .any(|fragment| token.contains(fragment.as_str()))
            })
    }

    /// Serves on `addr` (port 0 for any) until the returned handle is dropped.
    pub async fn start(
        self,
        tls: Arc<rustls::ServerConfig>,
        addr: SocketAddr,
    ) -> std::io::Result<RunningEhr> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let origin = format!("https://{addr}");
        if let Some(smart) = lock(&self.smart).as_mut() {
            smart.token_url = token_url(&origin);
        }
        *lock(&self.origin) = Some(origin);
        let (stop, stopped) = oneshot::channel::<()>();
        let ehr = self.clone();
        let service = tower::service_fn(move |request: Request<Incoming>| {
            let ehr = ehr.clone();
            async move { ehr.serve_request(request).await }
        });
        tokio::spawn(serve_mtls(
            listener,
            gateway::server::fixed_tls(tls),
            service,
            ServeOptions {
                // Whether a client certificate is required is the TLS config's choice: an EHR
                // that takes bearer tokens alone serves clients without one.
                anonymous_clients: true,
                ..ServeOptions::default()
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(RunningEhr {
            ehr: self,
            addr,
            base_url: format!("https://{addr}/fhir"),
            stop: Some(stop),
        })
    }

    /// Handles a request, logging writes and applying the fault plan; `Err` drops the
    /// connection.
    async fn serve_request(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<BoxBody>, BoxError> {
        let arrived = std::time::Instant::now();
        if request.uri().path() == TOKEN_PATH {
            return Ok(self.token_endpoint(request).await);
        }
        let is_write = matches!(*request.method(), Method::POST | Method::PUT);
        let _counted = is_write.then(|| WriteInProgress::start(&self.concurrent_writes));
        let fault = if is_write {
            lock(&self.faults).pop_front().or_else(|| {
                let mut fraction = lock(&self.fraction);
                let (fault, share, rng) = fraction.as_mut()?;
                (rng.f64() < *share).then_some(*fault)
            })
        } else {
            None
        };
        if let Some(fault) = fault {
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay).await;
            }
            if fault.drop_connection {
                return Err(Dropped.into());
            }
            if let Some(status) = fault.status {
                // Read the request first, as a server does that answers after reading it: one
                // that answers a large body early makes the client's connection fail mid-send,
                // and the client resends what it thinks never arrived.
                let _ = request.into_body().collect().await;
                lock(&self.writes).push(WriteRecord {
                    arrived,
                    status,
                    retry_after: fault.retry_after,
                });
                return Ok(fault_response(status, fault.retry_after));
            }
        }
        let lose_answer = fault.is_some_and(|f| f.lose_answer);
        let response = self.handle(request).await;
        if lose_answer {
            return Err(Dropped.into());
        }
        if is_write {
            lock(&self.writes).push(WriteRecord {
                arrived,
                status: response.status().as_u16(),
                retry_after: None,
            });
        }
        Ok(response)
    }

    pub async fn handle<B>(&self, request: Request<B>) -> Response<BoxBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = request.into_parts();
        if parts.method == Method::GET
            && let Some(token) = lock(&self.read_token).clone()
        {
            let sent = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if sent != Some(format!("Bearer {token}").as_str()) {
                return outcome(
                    StatusCode::UNAUTHORIZED,
                    "login",
                    "reads need a bearer token",
                );
            }
        }
        let path = parts.uri.path().trim_end_matches('/').to_owned();
        let Some(rest) = path.strip_prefix("/fhir") else {
            return outcome(StatusCode::NOT_FOUND, "not-found", "the FHIR base is /fhir");
        };
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return outcome(StatusCode::BAD_REQUEST, "structure", &format!("body: {e}")),
        };
        let query = parts.uri.query().unwrap_or("");
        let media = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        let xml_in = media(header::CONTENT_TYPE).contains("xml");
        let without = *lock(&self.without);
        if without.xml && (xml_in || media(header::ACCEPT).contains("xml")) {
            return outcome(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "this server takes FHIR JSON only",
            );
        }
        let xml_out = media(header::ACCEPT).contains("xml") || query.contains("_format=xml");
        if xml_in {
            self.xml_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let body = if xml_in && !body.is_empty() {
            match xml_body_as_json(&segments, &body) {
                Ok(json) => json,
                Err(refusal) => return refusal.response(),
            }
        } else {
            body
        };
        if let Some(denied) = self.bearer_check(&parts, &segments, &body) {
            return denied;
        }
        let response = self.dispatch(&parts, &segments, query, &body);
        if xml_out {
            as_xml(response).await
        } else {
            response
        }
    }

    /// The token endpoint: a form POST, answered with a token or an OAuth error.
    async fn token_endpoint<B>(&self, request: Request<B>) -> Response<BoxBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let oauth = |status: u16, body: &Value| {
            let mut response = fhir_json_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                body,
            );
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            response
        };
        let form_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if request.method() != Method::POST || !form_type {
            return oauth(
                400,
                &json!({"error": "invalid_request", "error_description": "POST a form (application/x-www-form-urlencoded)"}),
            );
        }
        let body = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return oauth(
                    400,
                    &json!({"error": "invalid_request", "error_description": e.to_string()}),
                );
            }
        };
        let form = form_pairs(&String::from_utf8_lossy(&body).replace('+', " "));
        let mut smart = lock(&self.smart);
        let Some(authority) = smart.as_mut() else {
            return oauth(
                400,
                &json!({"error": "invalid_client", "error_description": "no client is registered"}),
            );
        };
        match authority.token_request(&form) {
            Ok(token) => oauth(200, &token),
            Err(refusal) => oauth(refusal.status, &refusal.body()),
        }
    }

    /// With SMART on, the answer to a request whose token does not allow it.
    fn bearer_check(
        &self,
        parts: &http::request::Parts,
        segments: &[&str],
        body: &Bytes,
    ) -> Option<Response<BoxBody>> {
        if matches!(
            segments,
            ["metadata"] | [".well-known", "smart-configuration"]
        ) {
            return None;
        }
        let smart = lock(&self.smart);
        let authority = smart.as_ref()?;
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let interactions: Vec<(String, char)> = match (&parts.method, segments) {
            (&Method::POST, []) => serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|bundle| bundle["entry"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|entry| {
                    let request = &entry["request"];
                    let url = request["url"].as_str().unwrap_or_default();
                    let resource_type = url.split(['/', '?']).next().unwrap_or_default();
                    let interaction = match request["method"].as_str() {
                        Some("POST") => 'c',
                        Some("PUT") => 'u',
                        Some("GET") => 'r',
                        _ => 'd',
                    };
                    (resource_type.to_owned(), interaction)
                })
                .collect(),
            (method, [resource_type, rest @ ..]) => {
                let interaction = match (method, rest) {
                    (&Method::POST, _) => 'c',
                    (&Method::PUT, _) => 'u',
                    (_, []) => 's',
                    _ => 'r',
                };
                vec![((*resource_type).to_owned(), interaction)]
            }
            _ => vec![(String::new(), 'r')],
        };
        // A transaction with no entries still needs a valid token.
        let checks = if interactions.is_empty() {
            vec![(String::new(), 'c')]
        } else {
            interactions
        };
        for (resource_type, interaction) in checks {
            let denied = match authority.authorize(authorization, &resource_type, interaction) {
                Ok(()) => continue,
                Err(denied) => denied,
            };
            let (status, error, text) = match denied {
                smart::AccessDenied::InvalidToken(why) => {
                    (StatusCode::UNAUTHORIZED, "invalid_token", why.to_owned())
                }
                smart::AccessDenied::InsufficientScope(why) => {
                    (StatusCode::FORBIDDEN, "insufficient_scope", why)
                }
            };
            let mut response = outcome(status, "security", &text);
            if let Ok(value) = http::HeaderValue::try_from(format!("Bearer error=\"{error}\"")) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
            return Some(response);
        }
        None
    }

    fn dispatch(
        &self,
        parts: &http::request::Parts,
        segments: &[&str],
        query: &str,
        body: &Bytes,
    ) -> Response<BoxBody> {
        match (&parts.method, segments) {
            (&Method::GET, ["metadata"]) => {
                let smart = lock(&self.smart).as_ref().map(|s| s.token_url.clone());
                fhir_json_response(
                    StatusCode::OK,
                    &capability_statement(*lock(&self.without), smart.as_deref()),
                )
            }
            (&Method::GET, [".well-known", "smart-configuration"]) => {
                match lock(&self.smart).as_ref() {
                    Some(authority) => {
                        let mut response =
                            fhir_json_response(StatusCode::OK, &authority.configuration());
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        response
                    }
                    None => outcome(
                        StatusCode::NOT_FOUND,
                        "not-found",
                        "this EHR does not offer SMART Backend Services",
                    ),
                }
            }
            (&Method::POST, []) if lock(&self.without).transactions => outcome(
                StatusCode::METHOD_NOT_ALLOWED,
                "not-supported",
                "this server takes no transaction Bundles",
            ),
            (&Method::POST, []) => self.transaction(body),
            (&Method::POST, [resource_type]) => {
                let if_none_exist = parts
                    .headers
                    .get("if-none-exist")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                if if_none_exist.is_some() && lock(&self.without).conditional_writes {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "not-supported",
                        "conditional create (If-None-Exist) is not supported",
                    );
                }
                self.create(resource_type, body, if_none_exist.as_deref())
            }
            (&Method::PUT, [resource_type, id]) => self.update(resource_type, id, body),
            (&Method::PUT, [_]) if lock(&self.without).conditional_writes => outcome(
                StatusCode::BAD_REQUEST,
                "not-supported",
                "conditional update is not supported",
            ),
            (&Method::PUT, [resource_type]) => self.conditional_update(resource_type, query, body),
            (&Method::GET, [resource_type, id]) => self.read(resource_type, id),
            (&Method::GET, [resource_type, id, "_history"]) => self.history(resource_type, id),
            (&Method::GET, [resource_type, id, "_history", version]) => {
                self.vread(resource_type, id, version)
            }
            (&Method::GET, [resource_type]) => self.search(resource_type, query),
            _ => outcome(
                StatusCode::NOT_FOUND,
                "not-supported",
                "no such interaction",
            ),
        }
    }

    fn create(
        &self,
        resource_type: &str,
        body: &[u8],
        if_none_exist: Option<&str>,
    ) -> Response<BoxBody> {
        let resource = match self.accept(resource_type, body) {
            Ok(resource) => resource,
            Err(refusal) => return refusal.response(),
        };
        let token = match if_none_exist.map(identifier_condition).transpose() {
            Ok(token) => token,
            Err(refusal) => return refusal.response(),
        };
        if let Some(refusal) = self.unresolved(&resource, &[]) {
            return refusal.response();
        }
        let written = lock(&self.store).create(resource_type, resource, token.as_deref());
        write_response(resource_type, &written)
    }

    fn update(&self, resource_type: &str, id: &str, body: &[u8]) -> Response<BoxBody> {
        let resource = match self.accept(resource_type, body) {
            Ok(resource) => resource,
            Err(refusal) => return refusal.response(),
        };
        if resource["id"].as_str() != Some(id) {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the resource id must match the URL",
            );
        }
        if let Some(refusal) = self.unresolved(&resource, &[]) {
            return refusal.response();
        }
        let written = lock(&self.store).update(resource_type, id, resource);
        write_response(resource_type, &written)
    }

    fn conditional_update(
        &self,
        resource_type: &str,
        query: &str,
        body: &[u8],
    ) -> Response<BoxBody> {
        let resource = match self.accept(resource_type, body) {
            Ok(resource) => resource,
            Err(refusal) => return refusal.response(),
        };
        let token = match identifier_condition(query) {
            Ok(token) => token,
            Err(refusal) => return refusal.response(),
        };
        if let Some(refusal) = self.unresolved(&resource, &[]) {
            return refusal.response();
        }
        let written = lock(&self.store).conditional_update(resource_type, &token, resource);
        write_response(resource_type, &written)
    }

    fn read(&self, resource_type: &str, id: &str) -> Response<BoxBody> {
        match lock(&self.store).read(resource_type, id) {
            Some(stored) => fhir_json_response(StatusCode::OK, &stored.resource),
            None => outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("{resource_type}/{id} is unknown"),
            ),
        }
    }

    /// A `history` Bundle of every version, newest first.
    fn history(&self, resource_type: &str, id: &str) -> Response<BoxBody> {
        let store = lock(&self.store);
        let versions = store.history(resource_type, id);
        if versions.is_empty() {
            return outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("{resource_type}/{id} is unknown"),
            );
        }
        let entries: Vec<Value> = versions
            .iter()
            .rev()
            .map(|r| json!({"fullUrl": format!("{resource_type}/{id}"), "resource": r}))
            .collect();
        fhir_json_response(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries}),
        )
    }

    fn vread(&self, resource_type: &str, id: &str, version: &str) -> Response<BoxBody> {
        let store = lock(&self.store);
        match store
            .history(resource_type, id)
            .iter()
            .find(|r| r["meta"]["versionId"] == version)
        {
            Some(resource) => fhir_json_response(StatusCode::OK, resource),
            None => outcome(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("{resource_type}/{id}/_history/{version} is unknown"),
            ),
        }
    }

    /// `identifier=system|value`, `_tag=system|code` and `_count`; no parameters lists
    /// everything of the type.
    fn search(&self, resource_type: &str, query: &str) -> Response<BoxBody> {
        let mut identifier = None;
        let mut count = usize::MAX;
        // `patient` (a literal reference) and `status`, for Encounters.
        let mut patient: Option<String> = None;
        let mut status: Option<String> = None;
        for (key, value) in form_pairs(query) {
            match key.as_str() {
                "identifier" | "_tag" => identifier = search_key(&key, value),
                "_count" => count = value.parse().unwrap_or(usize::MAX),
                "patient" if resource_type == "Encounter" => patient = Some(value),
                "status" if resource_type == "Encounter" => status = Some(value),
                _ => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "not-supported",
                        &format!("search parameter '{key}' is not supported"),
                    );
                }
            }
        }
        let store = lock(&self.store);
        let matches: Vec<&Value> = match &identifier {
            Some(token) => store
                .find_by_identifier(resource_type, token)
                .and_then(|id| store.read(resource_type, id))
                .map(|s| &s.resource)
                .into_iter()
                .collect(),
            None => store
                .all(resource_type)
                .into_iter()
                .map(|s| &s.resource)
                .collect(),
        };
        let matches: Vec<&Value> = matches
            .into_iter()
            .filter(|r| {
                patient
                    .as_ref()
                    .is_none_or(|p| r["subject"]["reference"].as_str() == Some(p.as_str()))
                    && status
                        .as_ref()
                        .is_none_or(|s| r["status"].as_str() == Some(s.as_str()))
            })
            .collect();
        let total = matches.len();
        let entries: Vec<Value> = matches
            .into_iter()
            .take(count)
            .map(|r| json!({"fullUrl": format!("{resource_type}/{}", r["id"].as_str().unwrap_or("")), "resource": r, "search": {"mode": "match"}}))
            .collect();
        fhir_json_response(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entries}),
        )
    }

    /// A transaction is all or nothing: every entry is checked first, then all are applied
    /// under one lock.
    fn transaction(&self, body: &[u8]) -> Response<BoxBody> {
        let bundle: transaction_in::TransactionIn<'_> = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "structure",
                    &format!("not a JSON transaction Bundle: {e}"),
                );
            }
        };
        if bundle.resource_type.as_deref() != Some("Bundle")
            || bundle.kind.as_deref() != Some("transaction")
        {
            return outcome(
                StatusCode::BAD_REQUEST,
                "invalid",
                "POST to the base takes a transaction Bundle",
            );
        }
        let limit = self
            .max_transaction_entries
            .load(std::sync::atomic::Ordering::SeqCst);
        let entries = bundle.entry.len();
        if limit > 0 && entries > limit {
            return outcome(
                StatusCode::BAD_REQUEST,
                "too-costly",
                &format!("a transaction may hold at most {limit} entries; this one has {entries}"),
            );
        }
        // An EHR that keeps no bodies and checks neither structure nor references reads of
        // each resource only its head: there is nothing else it would look at.
        let head_only = lock(&self.store).forget_bodies
            && self
                .skip_structure_check
                .load(std::sync::atomic::Ordering::Relaxed)
            && !self
                .literal_references
                .load(std::sync::atomic::Ordering::SeqCst);
        enum Op {
            Create(String, Value, Option<String>),
            Update(String, String, Value),
            ConditionalUpdate(String, String, Value),
        }
        impl Op {
            fn resource(&mut self) -> &mut Value {
                match self {
                    Op::Create(_, r, _) | Op::Update(_, _, r) | Op::ConditionalUpdate(_, _, r) => r,
                }
            }
        }
        let mut ops = Vec::with_capacity(entries);
        let mut full_urls: Vec<Option<String>> = Vec::with_capacity(entries);
        // What each entry is about (its conditional identity or id): a transaction that names
        // one resource twice is refused, as HAPI and other servers do.
        let mut identities: std::collections::HashMap<String, usize> =
            std::collections::HashMap::with_capacity(entries);
        for (index, entry) in bundle.entry.into_iter().enumerate() {
            full_urls.push(entry.full_url.map(std::borrow::Cow::into_owned));
            let method = entry.request.method.as_ref();
            let url = entry.request.url.as_ref();
            let if_none_exist = entry.request.if_none_exist.as_deref();
            let resource = transaction_in::resource_value(entry.resource, head_only);
            let resource_type = resource["resourceType"].as_str().unwrap_or("").to_owned();
            let resource = match self.accept_value(&resource_type, resource) {
                Ok(r) => r,
                Err(mut refusal) => {
                    refusal.details = format!("entry {index}: {}", refusal.details);
                    return refusal.response();
                }
            };
            // A conditional URL's query holds an identifier system full of '/': split it off first.
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            let identity = match (method, if_none_exist) {
                ("POST", Some(condition)) => Some(format!("{resource_type}?{condition}")),
                ("POST", None) => None,
                _ => Some(url.to_owned()),
            };
            if let Some(identity) = identity
                && let Some(earlier) = identities.insert(identity.clone(), index)
            {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    "duplicate",
                    &format!(
                        "entries {earlier} and {index} are both about {identity}: a transaction names each resource once"
                    ),
                );
            }
            match (method, path.split('/').collect::<Vec<_>>().as_slice()) {
                ("POST", [t]) if *t == resource_type => {
                    let token = match if_none_exist.map(identifier_condition).transpose() {
                        Ok(token) => token,
                        Err(refusal) => return refusal.response(),
                    };
                    ops.push(Op::Create(resource_type, resource, token));
                }
                ("PUT", [t, id]) if *t == resource_type && resource["id"].as_str() == Some(id) => {
                    ops.push(Op::Update(resource_type, (*id).to_owned(), resource));
                }
                ("PUT", [t]) if *t == resource_type && !query.is_empty() => {
                    let token = match identifier_condition(query) {
                        Ok(token) => token,
                        Err(refusal) => return refusal.response(),
                    };
                    ops.push(Op::ConditionalUpdate(resource_type, token, resource));
                }
                _ => {
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "not-supported",
                        &format!("entry {index}: request {method} {url} is not supported here"),
                    );
                }
            }
        }
        // Entries that reference others by `fullUrl` are written after them, in an order
        // found before anything is written (all or nothing).
        let urn = |reference: &str| reference.starts_with("urn:");
        let mut order: Vec<usize> = Vec::with_capacity(ops.len());
        // Without bodies there are no references to rewrite, so no order to find.
        if !head_only && full_urls.iter().flatten().any(|u| urn(u)) {
            let referenced: Vec<Vec<String>> = ops
                .iter_mut()
                .map(|op| references::literal(op.resource()))
                .collect();
            let mut placed = vec![false; ops.len()];
            while order.len() < ops.len() {
                let before = order.len();
                for (i, references) in referenced.iter().enumerate() {
                    if placed[i] {
                        continue;
                    }
                    let waits = references.iter().any(|r| {
                        urn(r)
                            && !order
                                .iter()
                                .any(|&j| full_urls[j].as_deref() == Some(r.as_str()))
                    });
                    if !waits {
                        order.push(i);
                        placed[i] = true;
                    }
                }
                if order.len() == before {
                    let stuck = placed.iter().position(|p| !p).unwrap_or(0);
                    return outcome(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("entry {stuck}: a urn:uuid reference to no entry of this Bundle"),
                    );
                }
            }
        } else {
            order.extend(0..ops.len());
        }
        // With literal references required: each must reach something held or written here.
        if self
            .literal_references
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // urn:uuid targets are written here: stand-ins that pass the check.
            let stand_ins: HashMap<String, String> = full_urls
                .iter()
                .flatten()
                .filter(|u| urn(u))
                .map(|u| (u.clone(), format!("Bundle/{u}")))
                .collect();
            let mut pending: Vec<String> = ops
                .iter_mut()
                .filter_map(|op| match op {
                    Op::Update(t, id, _) => Some(format!("{t}/{id}")),
                    _ => None,
                })
                .collect();
            pending.extend(stand_ins.values().cloned());
            for (index, op) in ops.iter_mut().enumerate() {
                let mut probe = op.resource().clone();
                references::rewrite(&mut probe, &stand_ins);
                if let Some(mut refusal) = self.unresolved(&probe, &pending) {
                    refusal.details = format!("entry {index}: {}", refusal.details);
                    return refusal.response();
                }
            }
        }
        let mut store = lock(&self.store);
        let mut written_at: HashMap<String, String> = HashMap::new();
        let mut ops: Vec<Option<Op>> = ops.into_iter().map(Some).collect();
        let mut responses: Vec<Value> = vec![Value::Null; ops.len()];
        for i in order {
            let Some(mut op) = ops[i].take() else {
                continue;
            };
            if !written_at.is_empty() {
                references::rewrite(op.resource(), &written_at);
            }
            let (resource_type, written) = match op {
                Op::Create(t, r, token) => {
                    let w = store.create(&t, r, token.as_deref());
                    (t, w)
                }
                Op::Update(t, id, r) => {
                    let w = store.update(&t, &id, r);
                    (t, w)
                }
                Op::ConditionalUpdate(t, token, r) => {
                    let w = store.conditional_update(&t, &token, r);
                    (t, w)
                }
            };
            let location = written.location(&resource_type);
            if let Some(full_url) = full_urls[i].as_ref().filter(|_| !head_only) {
                let current = location.split("/_history").next().unwrap_or_default();
                written_at.insert(full_url.clone(), current.to_owned());
            }
            responses[i] =
                json!({"response": {"status": written.status().1, "location": location}});
        }
        fhir_json_response(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses}),
        )
    }
}

/// An XML request body as the JSON the handlers take, read by the independent FHIR XML reader
/// (quick-xml and the R4 JSON Schema); single resources are also read strictly by fhirbolt.
fn xml_body_as_json(segments: &[&str], body: &[u8]) -> Result<Bytes, Refusal> {
    let json = crate::fhir_xml::resource_to_json(body).map_err(|reason| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "structure",
            format!("not FHIR XML: {reason}"),
        )
    })?;
    if let Some(resource_type) = segments.first()
        && mappings::XML_TYPES.contains(resource_type)
    {
        mappings::resource_from_xml(resource_type, body).map_err(|reason| {
            Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "structure",
                format!("not a valid R4 {resource_type} in XML: {reason}"),
            )
        })?;
    }
    Ok(Bytes::from(serde_json::to_vec(&json).unwrap_or_default()))
}

/// A FHIR JSON answer rewritten as FHIR XML for a client that asked for XML.
async fn as_xml(response: Response<BoxBody>) -> Response<BoxBody> {
    let is_fhir_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/fhir+json"));
    if !is_fhir_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(collected) = body.collect().await else {
        return outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "answer lost",
        );
    };
    let json: Value = serde_json::from_slice(&collected.to_bytes()).unwrap_or_default();
    let xml = crate::fhir_xml::json_to_xml(&json);
    parts.headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/fhir+xml"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, gateway::full_body(Bytes::from(xml)))
}

/// Why a write is refused, before it becomes a response.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    details: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, details: String) -> Self {
        Self {
            status,
            code,
            details,
        }
    }

    fn response(self) -> Response<BoxBody> {
        outcome(self.status, self.code, &self.details)
    }
}

/// `identifier=system|value` (percent-encoded) -> `system|value`; `_tag=system|code` ->
/// `_tag:system|code`, the store's index keys.
fn identifier_condition(condition: &str) -> Result<String, Refusal> {
    form_pairs(condition)
        .into_iter()
        .find_map(|(k, v)| search_key(&k, v))
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                "only identifier= and _tag= conditions are supported".into(),
            )
        })
}

/// The store's index key for a token search parameter it supports.
fn search_key(parameter: &str, value: String) -> Option<String> {
    match parameter {
        "identifier" => Some(value),
        "_tag" => Some(format!("_tag:{value}")),
        _ => None,
    }
}

/// Server TLS for an EHR that takes bearer tokens: a client certificate chained to
/// `client_ca` is checked when one comes, and a client without one is let in (its requests
/// then need a SMART token).
pub fn tls_certificate_optional(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, BoxError> {
    let roots = gateway::tls::load_roots(&[client_ca.to_owned()])?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            gateway::tls::load_certs(cert)?,
            gateway::tls::load_key(key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where the token endpoint listens (outside the FHIR base, as authorization servers do).
const TOKEN_PATH: &str = "/auth/token";

fn token_url(origin: &str) -> String {
    format!("{origin}{TOKEN_PATH}")
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

fn write_response(resource_type: &str, written: &WriteOutcome) -> Response<BoxBody> {
    let (status, _) = written.status();
    let mut response = fhir_json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        &operation_outcome(&[Issue {
            severity: gateway::outcome::Severity::Information,
            code: "informational",
            details: format!("{:?}", written),
            location: None,
            expression: None,
            also_at: Vec::new(),
        }]),
    );
    if let Ok(location) = written.location(resource_type).parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn fault_response(status: u16, retry_after: Option<u32>) -> Response<BoxBody> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let code = if status.is_server_error() {
        "transient"
    } else {
        "invalid"
    };
    let mut response = outcome(
        status,
        code,
        "fault injected by the reference EHR's fault plan",
    );
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

fn outcome(status: StatusCode, code: &'static str, details: &str) -> Response<BoxBody> {
    fhir_json_response(status, &operation_outcome(&[Issue::error(code, details)]))
}

/// What this EHR does: the interactions the gateway's writes use, its formats, and with SMART
/// on, the OAuth endpoints (the SMART extension of `rest.security`).
fn capability_statement(without: Without, token_url: Option<&str>) -> Value {
    let mut resources: Vec<Value> = ["Observation", "Procedure", "Device", "DeviceMetric", "Patient", "Provenance"]
        .iter()
        .map(|t| {
            json!({
                "type": t,
                "interaction": [{"code": "create"}, {"code": "update"}, {"code": "read"}, {"code": "vread"}, {"code": "history-instance"}, {"code": "search-type"}],
                "versioning": "versioned",
                "conditionalCreate": !without.conditional_writes,
                "conditionalUpdate": !without.conditional_writes,
                "updateCreate": true,
                "searchParam": [{"name": "identifier", "type": "token"}, {"name": "_tag", "type": "token"}]
            })
        })
        .collect();
    resources.push(json!({
        "type": "Encounter",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": "identifier", "type": "token"}, {"name": "patient", "type": "reference"}, {"name": "status", "type": "token"}]
    }));
    let mut formats = vec!["application/fhir+json"];
    if !without.xml {
        formats.push("application/fhir+xml");
    }
    let interactions: Vec<Value> = if without.transactions {
        Vec::new()
    } else {
        vec![json!({"code": "transaction"})]
    };
    let mut rest = json!({
        "mode": "server",
        "interaction": interactions,
        "resource": resources
    });
    if let Some(token_url) = token_url {
        rest["security"] = json!({
            "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": token_url}]
            }]
        });
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "ECMO gateway reference EHR"},
        "fhirVersion": "4.0.1",
        "format": formats,
        "rest": [rest]
    })
}
