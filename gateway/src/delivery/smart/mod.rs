//! SMART Backend Services (SMART App Launch 2.x, `client_credentials` with `private_key_jwt`):
//! the gateway signs a short-lived client assertion with its own key, trades it at the EHR's
//! token endpoint for an access token, and sends that token as `Authorization: Bearer` on
//! every request to the destination ([`layer::BearerAuthLayer`]).
//!
//! Tokens are cached and renewed before they expire (one renewal at a time, however many
//! requests wait). A refused token request is a configuration error: it is kept and answered
//! from memory for a while instead of being asked again (no retry storm), and shown in the
//! admin API.

pub mod keys;
pub mod layer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::config::SmartSettings;
use crate::delivery::client::{EhrResponse, HttpsClient, fetch};
use keys::SigningKeys;

/// How long a refusal of the token endpoint is answered from memory before it is asked again.
const REFUSAL_HOLD: Duration = Duration::from_secs(60);

/// How far ahead a client assertion expires: SMART allows at most five minutes; four leave room
/// for a clock that is a little ahead.
const ASSERTION_LIFETIME_SECS: i64 = 240;

/// Token lifetime assumed when the token endpoint does not say (`expires_in` is required by
/// SMART, but not every server sends it).
const DEFAULT_TOKEN_SECS: u64 = 300;

/// Why a destination has no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SmartError {
    #[error("SMART key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("client assertion: {0}")]
    Assertion(String),
    /// The SMART configuration is missing or says the EHR cannot do what the gateway needs.
    #[error("SMART configuration at {url}: {reason}")]
    Discovery {
        url: String,
        reason: String,
        /// Down or overloaded (retried), rather than wrong (a configuration error).
        transient: bool,
    },
    /// The token endpoint said no: the client id, the registered keys or the scopes are wrong.
    #[error(
        "the token endpoint refused the gateway (HTTP {status}, {error}{}): check client_id, the JWKS registered for it and the scopes",
        description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// Down, overloaded or too slow: the next request tries again.
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    /// A 2xx that is not a usable token answer.
    #[error("token endpoint answer: {0}")]
    BadAnswer(String),
    /// The EHR answered 401 to a token it had just issued.
    #[error(
        "the EHR refused a freshly issued bearer token (HTTP 401): check the client's registration and scopes"
    )]
    NotAuthorized,
}

impl SmartError {
    /// An operator must fix something: never retried, the destination pauses.
    pub fn is_configuration(&self) -> bool {
        !matches!(
            self,
            Self::Unavailable(_)
                | Self::Discovery {
                    transient: true,
                    ..
                }
        )
    }
}

/// A bearer token and when it stops being used.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive so that no debug output shows it.
    authorization: HeaderValue,
    issued: Instant,
    expires: Instant,
}

impl AccessToken {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    /// Still good for a request: more than `renew_before` left (or, for a token issued for
    /// less than twice that, more than half its life).
    fn fresh(&self, renew_before: Duration, now: Instant) -> bool {
        let lifetime = self.expires.saturating_duration_since(self.issued);
        let margin = renew_before.min(lifetime / 2);
        self.expires.saturating_duration_since(now) > margin
    }
}

#[derive(Default)]
struct State {
    /// Configured, or found by discovery once.
    endpoint: Option<Arc<str>>,
    token: Option<Arc<AccessToken>>,
    /// The last refusal and when it came; answered from memory for [`REFUSAL_HOLD`].
    refused: Option<(Instant, SmartError)>,
    issued: u64,
    granted_scope: Option<String>,
    last_error: Option<String>,
}

/// One destination's tokens: its keys, its token endpoint and the token in use.
pub struct TokenSource {
    destination: String,
    client_id: String,
    scope: String,
    renew_before: Duration,
    discovery_url: String,
    keys: SigningKeys,
    http: HttpsClient,
    timeout: Duration,
    state: Mutex<State>,
    /// Held while a token is asked for: the requests that need one meanwhile wait for it.
    renewing: tokio::sync::Mutex<()>,
}

impl TokenSource {
    pub fn new(
        destination: &str,
        base_url: &str,
        settings: &SmartSettings,
        http: HttpsClient,
        timeout: Duration,
    ) -> Result<Self, SmartError> {
        Ok(Self {
            destination: destination.to_owned(),
            client_id: settings.client_id.clone(),
            scope: settings.scopes.join(" "),
            renew_before: settings.renew_before,
            discovery_url: format!(
                "{}/.well-known/smart-configuration",
                base_url.trim_end_matches('/')
            ),
            keys: SigningKeys::load(&settings.keys)?,
            http,
            timeout,
            state: Mutex::new(State {
                endpoint: settings.token_url.as_deref().map(Arc::from),
                ..State::default()
            }),
            renewing: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh_token(&self) -> Option<Arc<AccessToken>> {
        let state = self.state();
        state
            .token
            .as_ref()
            .filter(|t| t.fresh(self.renew_before, Instant::now()))
            .cloned()
    }

    /// A token good for the next request: the cached one, or a new one.
    pub async fn token(&self) -> Result<Arc<AccessToken>, SmartError> {
        if let Some(token) = self.fresh_token() {
            return Ok(token);
        }
        let _renewing = self.renewing.lock().await;
        // Renewed by whoever held the lock before.
        if let Some(token) = self.fresh_token() {
            return Ok(token);
        }
        if let Some((at, refusal)) = &self.state().refused
            && at.elapsed() < REFUSAL_HOLD
        {
            return Err(refusal.clone());
        }
        let answer = tokio::time::timeout(self.timeout, self.request_token())
            .await
            .unwrap_or_else(|_| Err(SmartError::Unavailable("timed out".into())));
        let outcome = match &answer {
            Ok(_) => "issued",
            Err(error) if error.is_configuration() => "refused",
            Err(_) => "unavailable",
        };
        crate::metrics::metrics()
            .tokens
            .get_or_create(&crate::metrics::DestinationOutcome {
                destination: self.destination.clone(),
                outcome,
            })
            .inc();
        let mut state = self.state();
        match answer {
            Ok((token, granted)) => {
                let token = Arc::new(token);
                state.token = Some(token.clone());
                state.refused = None;
                state.last_error = None;
                state.issued += 1;
                if granted.is_some() {
                    state.granted_scope = granted;
                }
                tracing::debug!(destination = %self.destination, "SMART access token renewed");
                Ok(token)
            }
            Err(error) => {
                state.last_error = Some(error.to_string());
                if error.is_configuration() {
                    tracing::error!(destination = %self.destination, %error, "no SMART access token; fix the configuration");
                    state.refused = Some((Instant::now(), error.clone()));
                } else {
                    tracing::warn!(destination = %self.destination, %error, "no SMART access token yet");
                }
                Err(error)
            }
        }
    }

    /// Forgets `token` after the EHR refused it (a newer one is kept).
    pub fn invalidate(&self, token: &Arc<AccessToken>) {
        let mut state = self.state();
        if state.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, token)) {
            state.token = None;
        }
    }

    async fn endpoint(&self) -> Result<Arc<str>, SmartError> {
        if let Some(endpoint) = self.state().endpoint.clone() {
            return Ok(endpoint);
        }
        let endpoint: Arc<str> = self.discover().await?.into();
        self.state().endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// The token endpoint from the EHR's `.well-known/smart-configuration`, once it is clear
    /// the EHR takes what the gateway sends (asymmetric client authentication, our algorithm).
    async fn discover(&self) -> Result<String, SmartError> {
        let url = &self.discovery_url;
        let failed = |reason: String, transient: bool| SmartError::Discovery {
            url: url.clone(),
            reason,
            transient,
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| failed(e.to_string(), false))?;
        let response = fetch(&self.http, request)
            .await
            .map_err(|e| failed(crate::error_chain(e.as_ref()), true))?;
        if !response.status().is_success() {
            let transient = transient_status(response.status());
            return Err(failed(format!("HTTP {}", response.status()), transient));
        }
        let document: Value = serde_json::from_slice(response.body())
            .map_err(|e| failed(format!("not JSON: {e}"), false))?;
        let endpoint = document["token_endpoint"]
            .as_str()
            .filter(|e| e.starts_with("https://"))
            .ok_or_else(|| failed("no https token_endpoint".into(), false))?;
        let lists = |key: &str, wanted: &str| {
            document[key]
                .as_array()
                .is_none_or(|values| values.iter().any(|v| v.as_str() == Some(wanted)))
        };
        if !lists("token_endpoint_auth_methods_supported", "private_key_jwt") {
            return Err(failed(
                "token_endpoint_auth_methods_supported lacks private_key_jwt".into(),
                false,
            ));
        }
        let algorithm = format!("{:?}", self.keys.current().algorithm());
        if !lists(
            "token_endpoint_auth_signing_alg_values_supported",
            &algorithm,
        ) {
            return Err(failed(
                format!("token_endpoint_auth_signing_alg_values_supported lacks {algorithm}"),
                false,
            ));
        }
        Ok(endpoint.to_owned())
    }

    /// Asks for a token: `client_credentials` with a fresh client assertion (a new `jti`).
    async fn request_token(&self) -> Result<(AccessToken, Option<String>), SmartError> {
        let endpoint = self.endpoint().await?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let assertion = self.keys.current().sign(&json!({
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": &*endpoint,
            "exp": now + ASSERTION_LIFETIME_SECS,
            "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(),
        }))?;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("scope", &self.scope)
            .append_pair(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )
            .append_pair("client_assertion", &assertion)
            .finish();
        let request = Request::builder()
            .method(Method::POST)
            .uri(&*endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| SmartError::Assertion(e.to_string()))?;
        let sent = Instant::now();
        let response = fetch(&self.http, request)
            .await
            .map_err(|e| SmartError::Unavailable(crate::error_chain(e.as_ref())))?;
        token_answer(&response, sent)
    }

    /// What the admin API shows: the client, the key in use and the token's state (never the
    /// token).
    pub fn status(&self) -> Value {
        let state = self.state();
        let now = Instant::now();
        let token = match &state.token {
            Some(t) if t.expires > now => json!({
                "state": if t.fresh(self.renew_before, now) { "valid" } else { "renewing" },
                "expiresInSeconds": t.expires.duration_since(now).as_secs(),
            }),
            Some(_) => json!({"state": "expired"}),
            None => json!({"state": "none"}),
        };
        let key = self.keys.current();
        json!({
            "clientId": self.client_id,
            "tokenEndpoint": state.endpoint.as_deref(),
            "keyId": key.kid(),
            "algorithm": format!("{:?}", key.algorithm()),
            "scopes": self.scope,
            "grantedScopes": state.granted_scope,
            "token": token,
            "tokensIssued": state.issued,
            "refused": state.refused.as_ref().map(|(at, e)| json!({
                "error": e.to_string(),
                "secondsAgo": at.elapsed().as_secs(),
            })),
            "lastError": state.last_error,
        })
    }
}

fn transient_status(status: StatusCode) -> bool {
    crate::delivery::retry::is_retryable_status(status)
}

/// Reads a token endpoint's answer (RFC 6749 §5.1 and §5.2).
fn token_answer(
    response: &EhrResponse,
    sent: Instant,
) -> Result<(AccessToken, Option<String>), SmartError> {
    let status = response.status();
    let body: Option<Value> = serde_json::from_slice(response.body()).ok();
    if !status.is_success() {
        if transient_status(status) {
            return Err(SmartError::Unavailable(format!("HTTP {status}")));
        }
        let field = |key: &str| {
            body.as_ref()
                .and_then(|b| b[key].as_str())
                .map(|s| s.chars().take(300).collect::<String>())
        };
        return Err(SmartError::Refused {
            status: status.as_u16(),
            error: field("error").unwrap_or_else(|| "no OAuth error code".into()),
            description: field("error_description"),
        });
    }
    let body = body.ok_or_else(|| SmartError::BadAnswer("not JSON".into()))?;
    let token = body["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| SmartError::BadAnswer("no access_token".into()))?;
    if !body["token_type"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
    {
        return Err(SmartError::BadAnswer(
            "token_type is not 'bearer'".to_owned(),
        ));
    }
    let lifetime = body["expires_in"].as_u64().unwrap_or(DEFAULT_TOKEN_SECS);
    let mut authorization = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| SmartError::BadAnswer("access_token is not a header value".into()))?;
    authorization.set_sensitive(true);
    Ok((
        AccessToken {
            authorization,
            issued: sent,
            expires: sent + Duration::from_secs(lifetime),
        },
        body["scope"].as_str().map(str::to_owned),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn answer(status: u16, body: &str) -> EhrResponse {
        Response::builder()
            .status(status)
            .body(Bytes::from(body.to_owned()))
            .unwrap()
    }

    #[test]
    fn a_token_answer_gives_a_sensitive_bearer_header_and_its_lifetime() {
        let sent = Instant::now();
        let (token, scope) = token_answer(
            &answer(
                200,
                r#"{"access_token":"abc","token_type":"Bearer","expires_in":600,"scope":"system/Observation.cu"}"#,
            ),
            sent,
        )
        .unwrap();
        assert_eq!(token.authorization(), "Bearer abc");
        assert!(token.authorization().is_sensitive());
        assert_eq!(token.expires - sent, Duration::from_secs(600));
        assert_eq!(scope.as_deref(), Some("system/Observation.cu"));
    }

    #[test]
    fn refusals_are_configuration_errors_and_outages_are_not() {
        let refused = token_answer(
            &answer(
                401,
                r#"{"error":"invalid_client","error_description":"unknown kid"}"#,
            ),
            Instant::now(),
        )
        .err()
        .unwrap();
        assert!(refused.is_configuration());
        assert!(refused.to_string().contains("invalid_client: unknown kid"));
        let down = token_answer(&answer(503, ""), Instant::now())
            .err()
            .unwrap();
        assert!(!down.is_configuration(), "{down}");
        let bad = token_answer(&answer(200, r#"{"token_type":"bearer"}"#), Instant::now())
            .err()
            .unwrap();
        assert!(bad.to_string().contains("no access_token"));
        let mac = token_answer(
            &answer(200, r#"{"access_token":"x","token_type":"mac"}"#),
            Instant::now(),
        )
        .err()
        .unwrap();
        assert!(mac.to_string().contains("bearer"));
    }

    #[test]
    fn a_token_is_renewed_before_it_expires() {
        let issued = Instant::now();
        let token = AccessToken {
            authorization: HeaderValue::from_static("Bearer x"),
            issued,
            expires: issued + Duration::from_secs(300),
        };
        let renew = Duration::from_secs(60);
        assert!(token.fresh(renew, issued + Duration::from_secs(239)));
        assert!(!token.fresh(renew, issued + Duration::from_secs(241)));
        // A token issued for less than twice the margin is used for half its life.
        let short = AccessToken {
            expires: issued + Duration::from_secs(20),
            ..token
        };
        assert!(short.fresh(renew, issued + Duration::from_secs(9)));
        assert!(!short.fresh(renew, issued + Duration::from_secs(11)));
    }
}
