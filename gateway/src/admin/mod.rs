//! The operators' API, on its own mutual-TLS listener: only certificates named in
//! `[admin] identities` get in (a vendor's certificate gets 403, even from a trusted CA).
//!
//! | | |
//! |---|---|
//! | `GET /healthz` | the process answers |
//! | `GET /readyz` | the outbox can be read (503 otherwise) |
//! | `GET /admin/v1/validation` | resources refused by the conformance check since start |
//! | `GET /admin/v1/devices` | per device: its clock's skew against the gateway's (last, min, max, ms) |
//! | `GET /admin/v1/deliveries/{tracking-id}` | every message of an accepted batch, per destination |
//! | `GET /admin/v1/queues` | per destination: accepted, delivered, dead, pending, oldest pending age |
//! | `GET /admin/v1/dead-letters[?destination=&limit=]` | dead letters with their OperationOutcome |
//! | `GET /admin/v1/dead-letters/{message-id}` | one dead letter |
//! | `POST /admin/v1/dead-letters/{message-id}/replay` | make it pending again, fresh budget |
//! | `POST /admin/v1/dead-letters/replay[?destination=]` | replay all (of a destination) |
//! | `POST /admin/v1/observations/{identifier}/entered-in-error[?reason=]` | take a reading back at every destination |
//! | `GET /admin/v1/certificates` | every configured certificate with its expiry (`expiring` within 30 days) |
//! | `GET /admin/v1/revoked-certificates` | client certificates revoked at the gateway |
//! | `POST /admin/v1/revoked-certificates/{sha256}[?reason=]` | revoke one: refused from its next request on |
//! | `DELETE /admin/v1/revoked-certificates/{sha256}` | take a revocation back |
//! | `GET /admin/v1/smart` | per SMART destination: client, token endpoint, key, token state, last refusal (never a token) |
//! | `GET /admin/v1/reload`, `POST /admin/v1/reload` | hot reload of certificates and vendors: its status; reload now |
//! | `GET /metrics` | Prometheus metrics (OpenMetrics text; see `crate::metrics`) |
//! | `GET /admin/v1/capabilities` | each destination's CapabilityStatement (and SMART token) checked now against its configuration: what it cannot do |
//! | `GET /admin/v1/jwks` | the public keys of the gateway's SMART clients, to register at the EHR |
//!
//! The console's routes (destinations, message browser, runs) are in [`browse`], its page and
//! sign-in in [`console`]. With `[admin.console]` users, a request without an admin
//! certificate gets in with a console session (and, to change anything, its CSRF token).
//! A browser's cross-site request never changes anything, whatever it authenticates with.

mod browse;
pub mod client;
pub mod console;

use std::collections::HashSet;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tower::filter::{FilterLayer, Predicate};
use tower::{Service, ServiceBuilder};

use crate::delivery::{DeliveryError, Handoff, RetractReceipt};
use crate::ingress::device_clocks::DeviceClocks;
use crate::outbox::Outbox;
use crate::outcome::{ApiError, Issue, fhir_json_response};
use crate::peer::PeerIdentity;
use crate::revocations::{RevokedCertificates, hex, parse_fingerprint};
use crate::{BoxBody, BoxError, full_body};
use console::ConsoleLogin;

/// Lets only admin certificates, or console sessions, through.
#[derive(Clone)]
pub struct AdminOnly {
    identities: Arc<HashSet<String>>,
    console: Option<Arc<ConsoleLogin>>,
}

/// Who an admin request came from, for the Provenance of what an operator does and the
/// logs: an admin certificate's identity, or `console:<user>`.
#[derive(Debug, Clone)]
pub struct AdminIdentity(pub String);

fn forbidden(details: String) -> BoxError {
    ApiError::one(StatusCode::FORBIDDEN, Issue::error("security", details)).into()
}

impl<B> Predicate<Request<B>> for AdminOnly {
    type Request = Request<B>;

    fn check(&mut self, mut request: Request<B>) -> Result<Request<B>, BoxError> {
        let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
        // A browser says where a request comes from: a page of another site (which a signed-in
        // operator or an admin certificate in the browser would otherwise lend its rights)
        // changes nothing here.
        if changes
            && request
                .headers()
                .get("sec-fetch-site")
                .is_some_and(|site| site != "same-origin" && site != "none")
        {
            return Err(forbidden(
                "cross-site requests may not change anything".into(),
            ));
        }
        let peer = request.extensions().get::<PeerIdentity>();
        let admin = peer.and_then(|p| p.names.iter().find(|n| self.identities.contains(*n)));
        if let Some(admin) = admin.cloned() {
            request.extensions_mut().insert(AdminIdentity(admin));
            return Ok(request);
        }
        // The console's page and sign-in are open; what they show comes from the API.
        if request.uri().path() == "/console" || request.uri().path().starts_with("/console/") {
            return Ok(request);
        }
        if let Some(console) = &self.console
            && let Some(user) = console.user(request.headers())
        {
            if !console::csrf_ok(request.method(), request.headers(), &user) {
                return Err(forbidden(format!(
                    "a console request that changes something must carry the session's {} header",
                    console::CSRF_HEADER
                )));
            }
            request
                .extensions_mut()
                .insert(AdminIdentity(format!("console:{}", user.name)));
            return Ok(request);
        }
        let label = peer.map(PeerIdentity::label).unwrap_or("(none)");
        tracing::warn!(certificate = %label, "request without the admin role refused on the admin listener");
        Err(forbidden(if peer.is_some() {
            format!("certificate '{label}' does not hold the admin role")
        } else {
            "no admin certificate and no console session: sign in at /console".into()
        }))
    }
}

/// What the admin routes reach into.
#[derive(Clone)]
pub struct AdminParts {
    pub outbox: Option<Arc<dyn Outbox>>,
    /// Ingress's hand-off: what operators change goes the same way as what devices send.
    pub handoff: Arc<dyn Handoff>,
    pub clocks: Arc<DeviceClocks>,
    pub revoked: Arc<RevokedCertificates>,
    /// The configuration and every destination with its client, as reloaded: the
    /// certificate inventory, the JWKS, token state, capability checks.
    pub setup: crate::reload::LiveSetup,
    /// Hot reload of certificates and vendors, when the gateway runs from a file.
    pub reloader: Option<Arc<crate::reload::Reloader>>,
    /// The ECMO runs, for the console's run view.
    pub runs: Arc<crate::runs::RunRegistry>,
    /// The console's users and sessions, when `[admin.console]` is configured.
    pub console: Option<Arc<ConsoleLogin>>,
}

/// The admin stack: rescue (errors -> OperationOutcome), admin role, routes.
pub fn build_admin_stack<B>(
    identities: Vec<String>,
    parts: AdminParts,
) -> impl Service<Request<B>, Response = Response<BoxBody>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        .map_result(crate::ingress::rescue::rescue)
        .layer(FilterLayer::new(AdminOnly {
            identities: Arc::new(identities.into_iter().collect()),
            console: parts.console.clone(),
        }))
        .service(tower::service_fn(move |request: Request<B>| {
            let parts = parts.clone();
            let admin = request
                .extensions()
                .get::<AdminIdentity>()
                .map(|a| a.0.clone())
                .unwrap_or_default();
            async move {
                let (head, body) = request.into_parts();
                // Only a console sign-in has a body worth reading here, and a small one.
                let body = if head.method == Method::POST && head.uri.path() == "/console/session" {
                    Some(
                        http_body_util::BodyExt::collect(http_body_util::Limited::new(
                            body,
                            console::MAX_LOGIN_BYTES,
                        ))
                        .await
                        .map_err(|_| {
                            BoxError::from(ApiError::one(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                Issue::error(
                                    "too-costly",
                                    format!(
                                        "a sign-in is at most {} bytes",
                                        console::MAX_LOGIN_BYTES
                                    ),
                                ),
                            ))
                        })?
                        .to_bytes(),
                    )
                } else {
                    None
                };
                let segments: Vec<&str> = head
                    .uri
                    .path()
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .collect();
                if let Some(response) = console::route(
                    parts.console.as_ref(),
                    &head.method,
                    &head.headers,
                    &segments,
                    body,
                )
                .await?
                {
                    return Ok(response);
                }
                let setup = parts.setup.load();
                let context = Context {
                    outbox: parts.outbox,
                    handoff: parts.handoff,
                    clocks: &parts.clocks,
                    revoked: parts.revoked,
                    config: setup.config.clone(),
                    destinations: setup.destinations.clone(),
                    reloader: parts.reloader,
                    runs: parts.runs,
                    admin,
                };
                route(context, head.method.clone(), head.uri.clone()).await
            }
        }))
}

fn json_response(status: StatusCode, body: &Value) -> Response<BoxBody> {
    let mut response = Response::new(full_body(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// 400 for a query parameter, named in the OperationOutcome.
fn bad_query(parameter: &str, why: String) -> BoxError {
    ApiError::one(
        StatusCode::BAD_REQUEST,
        Issue::error("value", why).at(parameter),
    )
    .into()
}

fn not_found(what: String) -> BoxError {
    ApiError::one(StatusCode::NOT_FOUND, Issue::error("not-found", what)).into()
}

/// 409: what was asked for does not exist in this state (a run that has not ended).
fn conflict(why: String) -> BoxError {
    ApiError::one(StatusCode::CONFLICT, Issue::error("conflict", why)).into()
}

fn storage(error: crate::outbox::OutboxError) -> BoxError {
    ApiError::one(
        StatusCode::SERVICE_UNAVAILABLE,
        Issue::error("exception", error.to_string()),
    )
    .into()
}

/// The certificate routes: the inventory and the revocations (`None`: not one of them).
async fn certificates(
    context: &Context<'_>,
    method: &Method,
    uri: &http::Uri,
    segments: &[&str],
) -> Result<Option<Response<BoxBody>>, BoxError> {
    let revoked = context.revoked.clone();
    let response = match (method, segments) {
        (&Method::GET, ["admin", "v1", "certificates"]) => json_response(
            StatusCode::OK,
            &json!({
                "warnBeforeDays": crate::cert_expiry::WARN_BEFORE_DAYS,
                "certificates": crate::cert_expiry::inventory(&context.config, crate::outbox::now_ms() / 1000),
            }),
        ),
        (&Method::GET, ["admin", "v1", "revoked-certificates"]) => {
            json_response(StatusCode::OK, &json!({"revoked": revoked.list()}))
        }
        (&Method::POST | &Method::DELETE, ["admin", "v1", "revoked-certificates", sha256]) => {
            let fingerprint = parse_fingerprint(sha256).ok_or_else(|| {
                bad_query(
                    "sha256",
                    format!("'{sha256}' is not a SHA-256 fingerprint (64 hex digits, ':' allowed)"),
                )
            })?;
            let reason =
                query_param(uri, "reason").unwrap_or_else(|| "revoked by an operator".into());
            let admin = context.admin.clone();
            let revoke = *method == Method::POST;
            // A file write and fsync: on a blocking thread.
            let changed = tokio::task::spawn_blocking(move || {
                if revoke {
                    revoked.revoke(fingerprint, &reason, &admin)
                } else {
                    revoked.restore(&fingerprint)
                }
            })
            .await
            .map_err(|e| BoxError::from(e.to_string()))?
            .map_err(|e| {
                BoxError::from(ApiError::one(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Issue::error("exception", e.to_string()),
                ))
            })?;
            let sha256 = hex(&fingerprint);
            match (revoke, changed) {
                (true, _) => {
                    tracing::warn!(%sha256, admin = %context.admin, "client certificate revoked");
                    json_response(
                        if changed {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        },
                        &json!({"sha256": sha256, "revoked": true}),
                    )
                }
                (false, true) => {
                    tracing::warn!(%sha256, admin = %context.admin, "certificate revocation taken back");
                    json_response(StatusCode::OK, &json!({"sha256": sha256, "revoked": false}))
                }
                (false, false) => {
                    return Err(not_found(format!("certificate {sha256} is not revoked")));
                }
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(response))
}

/// What the admin routes work with.
struct Context<'a> {
    outbox: Option<Arc<dyn Outbox>>,
    /// Ingress's hand-off: what operators change goes the same way as what devices send.
    handoff: Arc<dyn Handoff>,
    clocks: &'a DeviceClocks,
    revoked: Arc<RevokedCertificates>,
    config: Arc<crate::config::Config>,
    destinations: crate::app::DestinationClients,
    reloader: Option<Arc<crate::reload::Reloader>>,
    runs: Arc<crate::runs::RunRegistry>,
    /// Who the request came from ([`AdminIdentity`]).
    admin: String,
}

/// `GET /metrics`: the process's metrics, with the outbox's queues and the certificates'
/// expiry read now.
async fn metrics_response(context: &Context<'_>) -> Response<BoxBody> {
    let metrics = crate::metrics::metrics();
    if let Some(outbox) = &context.outbox
        && let Ok(depths) = outbox.queue_depths().await
    {
        // A configured destination with nothing pending or dead has no row: it reads 0 (and
        // a gauge set at an earlier scrape does not stay at its old value).
        let quiet = context
            .config
            .destinations
            .iter()
            .filter(|d| !depths.iter().any(|q| q.destination == d.name))
            .map(|d| crate::outbox::QueueDepth {
                destination: d.name.clone(),
                pending: 0,
                dead: 0,
                oldest_pending_seconds: None,
            })
            .collect::<Vec<_>>();
        for destination in depths.into_iter().chain(quiet) {
            let label = crate::metrics::DestinationLabel {
                destination: destination.destination.clone(),
            };
            metrics
                .outbox_pending
                .get_or_create(&label)
                .set(destination.pending as i64);
            metrics
                .outbox_dead
                .get_or_create(&label)
                .set(destination.dead as i64);
            metrics
                .outbox_oldest_seconds
                .get_or_create(&label)
                .set(destination.oldest_pending_seconds.unwrap_or(0.0) as i64);
        }
    }
    for certificate in
        crate::cert_expiry::inventory(&context.config, crate::outbox::now_ms() / 1000)
    {
        metrics
            .certificate_days
            .get_or_create(&crate::metrics::CertificateLabel {
                role: certificate.role,
                subject: certificate.subject,
            })
            .set(certificate.days_left);
    }
    let mut response = Response::new(full_body(metrics.render()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

/// SMART Backend Services: token state per destination, and the JWKS to register.
fn smart(
    context: &Context<'_>,
    method: &Method,
    segments: &[&str],
) -> Result<Option<Response<BoxBody>>, BoxError> {
    if method != Method::GET {
        return Ok(None);
    }
    match segments {
        ["admin", "v1", "smart"] => {
            let destinations: serde_json::Map<String, Value> = context
                .destinations
                .iter()
                .filter_map(|(settings, client)| {
                    Some((settings.name.clone(), client.tokens()?.status()))
                })
                .collect();
            Ok(Some(json_response(
                StatusCode::OK,
                &json!({"destinations": destinations}),
            )))
        }
        ["admin", "v1", "jwks"] => {
            let jwks = crate::delivery::smart::keys::jwks(&context.config).map_err(|e| {
                ApiError::one(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Issue::error("exception", e.to_string()),
                )
            })?;
            let mut response = json_response(
                StatusCode::OK,
                &serde_json::to_value(jwks).unwrap_or_default(),
            );
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/jwk-set+json"),
            );
            Ok(Some(response))
        }
        _ => Ok(None),
    }
}

async fn route(
    context: Context<'_>,
    method: Method,
    uri: http::Uri,
) -> Result<Response<BoxBody>, BoxError> {
    let clocks = context.clocks;
    let path = uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments == ["healthz"] && method == Method::GET {
        return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})));
    }
    if segments == ["admin", "v1", "validation"] && method == Method::GET {
        let failures = crate::ingress::conformance::VALIDATION_FAILURES
            .load(std::sync::atomic::Ordering::Relaxed);
        return Ok(json_response(
            StatusCode::OK,
            &json!({"failures": failures}),
        ));
    }
    if segments == ["admin", "v1", "devices"] && method == Method::GET {
        return Ok(json_response(
            StatusCode::OK,
            &json!({"devices": clocks.snapshot()}),
        ));
    }
    if let Some(response) = certificates(&context, &method, &uri, &segments).await? {
        return Ok(response);
    }
    if let Some(response) = smart(&context, &method, &segments)? {
        return Ok(response);
    }
    if let Some(response) = browse::route(&context, &method, &uri, &segments).await? {
        return Ok(response);
    }
    if segments == ["admin", "v1", "reload"] {
        let Some(reloader) = context.reloader.clone() else {
            return Err(not_found("the gateway runs from no file to reload".into()));
        };
        if method == Method::POST {
            // Reading and parsing files: off the async workers.
            let reloaded = tokio::task::spawn_blocking({
                let reloader = reloader.clone();
                move || reloader.reload()
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let status = if reloaded.is_ok() {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            return Ok(json_response(
                status,
                &serde_json::to_value(reloader.status()).unwrap_or_default(),
            ));
        }
        if method == Method::GET {
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::to_value(reloader.status()).unwrap_or_default(),
            ));
        }
    }
    if segments == ["metrics"] && method == Method::GET {
        return Ok(metrics_response(&context).await);
    }
    if segments == ["admin", "v1", "capabilities"] && method == Method::GET {
        let reports = crate::app::check_all(context.destinations.clone()).await;
        return Ok(json_response(
            StatusCode::OK,
            &json!({"destinations": reports}),
        ));
    }
    let Some(outbox) = context.outbox else {
        if segments == ["readyz"] {
            return Ok(json_response(
                StatusCode::OK,
                &json!({"status": "ready", "delivery": "direct"}),
            ));
        }
        return Err(not_found(
            "delivery is direct: there is no outbox to inspect".into(),
        ));
    };
    match (&method, segments.as_slice()) {
        (&Method::GET, ["readyz"]) => Ok(match outbox.queue_depths().await {
            Ok(_) => json_response(StatusCode::OK, &json!({"status": "ready"})),
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "not ready", "reason": e.to_string()}),
            ),
        }),
        (&Method::GET, ["admin", "v1", "deliveries", tracking_id]) => {
            let messages = outbox.batch_status(tracking_id).await.map_err(storage)?;
            if messages.is_empty() {
                return Err(not_found(format!(
                    "no accepted batch with tracking id '{tracking_id}'"
                )));
            }
            let done = messages.iter().all(|m| m.state != "pending");
            Ok(json_response(
                StatusCode::OK,
                &json!({"trackingId": tracking_id, "complete": done, "messages": messages}),
            ))
        }
        (&Method::GET, ["admin", "v1", "queues"]) => {
            let stats = outbox.stats().await.map_err(storage)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "destinations": stats,
                    "outbox": {"commits": outbox.commits()},
                    "validation": {"failures": crate::ingress::conformance::VALIDATION_FAILURES.load(std::sync::atomic::Ordering::Relaxed)},
                }),
            ))
        }
        (&Method::GET, ["admin", "v1", "dead-letters"]) => {
            let destination = query_param(&uri, "destination");
            let limit = match query_param(&uri, "limit") {
                None => 100,
                Some(limit) => limit.parse().map_err(|_| {
                    bad_query("limit", format!("limit '{limit}' is not a whole number"))
                })?,
            };
            let dead = outbox
                .dead_letters(destination.as_deref(), limit)
                .await
                .map_err(storage)?;
            Ok(json_response(StatusCode::OK, &json!({"deadLetters": dead})))
        }
        (&Method::GET, ["admin", "v1", "dead-letters", id]) => {
            let id: i64 = id
                .parse()
                .map_err(|_| not_found(format!("'{id}' is not a message id")))?;
            match outbox.dead_letter(id).await.map_err(storage)? {
                Some(dead) => Ok(json_response(
                    StatusCode::OK,
                    &serde_json::to_value(dead).unwrap_or_default(),
                )),
                None => Err(not_found(format!("message {id} is not a dead letter"))),
            }
        }
        (&Method::POST, ["admin", "v1", "dead-letters", "replay"]) => {
            let destination = query_param(&uri, "destination");
            let count = outbox
                .replay(None, destination.as_deref())
                .await
                .map_err(storage)?;
            Ok(json_response(StatusCode::OK, &json!({"replayed": count})))
        }
        (
            &Method::POST,
            [
                "admin",
                "v1",
                "observations",
                identifier,
                "entered-in-error",
            ],
        ) => {
            // An operator takes a reading back, by its Observation identifier value.
            let identifier = percent_encoding::percent_decode_str(identifier).decode_utf8_lossy();
            let reason = query_param(&uri, "reason");
            let longest = crate::validation::retraction_reason_max_chars();
            if let Some(reason) = &reason
                && (reason.is_empty() || reason.chars().count() > longest)
            {
                return Err(bad_query(
                    "reason",
                    format!("reason must be 1 to {longest} characters"),
                ));
            }
            let retraction = crate::outbox::Retraction::observation(identifier.to_string());
            let source = Arc::new(mappings::ProvenanceSource {
                sender: mappings::Sender::Operator {
                    certificate: context.admin,
                },
                devices: Vec::new(),
                tables: Vec::new(),
                gateway: crate::GATEWAY_BUILD,
                received: crate::ingress::fhir_instant_now(),
                reason,
            });
            match context.handoff.retract(vec![retraction], source).await {
                Ok(RetractReceipt {
                    tracking_id,
                    placements,
                }) => {
                    let destinations: serde_json::Map<String, Value> = placements
                        .into_iter()
                        .flatten()
                        .map(|(d, e)| {
                            (d, json!({"messageId": e.message_id, "disposition": e.disposition.as_str()}))
                        })
                        .collect();
                    tracing::info!(%tracking_id, "reading retracted by an operator");
                    Ok(json_response(
                        StatusCode::ACCEPTED,
                        &json!({"trackingId": tracking_id, "destinations": destinations}),
                    ))
                }
                Err(DeliveryError::UnknownResources { .. }) => Err(not_found(format!(
                    "no destination was ever given Observation '{identifier}'"
                ))),
                Err(e) => Err(ApiError::one(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Issue::error("exception", e.to_string()),
                )
                .into()),
            }
        }
        (&Method::POST, ["admin", "v1", "dead-letters", id, "replay"]) => {
            let id: i64 = id
                .parse()
                .map_err(|_| not_found(format!("'{id}' is not a message id")))?;
            match outbox.replay(Some(id), None).await.map_err(storage)? {
                0 => Err(not_found(format!("message {id} is not a dead letter"))),
                count => Ok(json_response(StatusCode::OK, &json!({"replayed": count}))),
            }
        }
        _ => Ok(fhir_json_response(
            StatusCode::NOT_FOUND,
            &crate::outcome::operation_outcome(&[Issue::error(
                "not-found",
                format!("no admin endpoint {method} {path}"),
            )]),
        )),
    }
}
