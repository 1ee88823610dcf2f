//! SMART Backend Services at the reference EHR (SMART App Launch 2.x, "Backend Services"): an
//! authorization server that checks a client's assertion the way the specification says, and
//! the bearer-token check that guards the FHIR endpoint once a client is registered.
//!
//! The token endpoint takes `client_credentials` with a `private_key_jwt` client assertion and
//! refuses, with the OAuth error the specification names, an assertion whose `iss` and `sub`
//! are not the registered client id, whose `aud` is not this token endpoint, whose `exp` is
//! missing, past or more than five minutes ahead, whose `jti` was seen before, whose `alg` is
//! not RS384 or ES384, or whose signature no key of the client's registered JWKS verifies; and
//! a scope the client was not registered for.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// What SMART allows between an assertion's issue and its `exp`.
const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;

/// Clock difference tolerated on `exp` (the assertion is signed on another machine).
const CLOCK_LEEWAY_SECS: i64 = 5;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client registered for Backend Services: its id, its public keys and what it may do.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    pub client_id: String,
    pub jwks: JwkSet,
    /// Scopes it may be granted, as written at registration (`system/Observation.cu`, ...).
    pub scopes: Vec<String>,
}

/// An OAuth error answer (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
    }

    /// SMART: any failure to authenticate the client is `invalid_client`.
    fn client(description: impl Into<String>) -> Self {
        Self::new(401, "invalid_client", description)
    }

    pub fn body(&self) -> Value {
        json!({"error": self.error, "error_description": self.description})
    }
}

/// Why a FHIR request was not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessDenied {
    /// No token, an unknown one, or an expired one: 401.
    InvalidToken(&'static str),
    /// A valid token without a scope for the interaction: 403.
    InsufficientScope(String),
}

struct Grant {
    client_id: String,
    scopes: Vec<Scope>,
    expires: Instant,
}

/// The authorization server's state.
pub struct SmartAuthority {
    clients: HashMap<String, RegisteredClient>,
    /// Where this server's token endpoint is, as clients must name it in `aud`.
    pub token_url: String,
    token_lifetime: Duration,
    tokens: HashMap<String, Grant>,
    /// `jti`s seen, per client, with the `exp` they were good until (forgotten after it).
    seen: HashMap<(String, String), i64>,
    /// Token requests, and how many got a token.
    pub requests: usize,
    pub issued: usize,
}

impl SmartAuthority {
    pub fn new(token_url: String) -> Self {
        Self {
            clients: HashMap::new(),
            token_url,
            token_lifetime: Duration::from_secs(300),
            tokens: HashMap::new(),
            seen: HashMap::new(),
            requests: 0,
            issued: 0,
        }
    }

    pub fn register(&mut self, client: RegisteredClient) {
        self.clients.insert(client.client_id.clone(), client);
    }

    /// Tokens issued from now on live this long.
    pub fn set_token_lifetime(&mut self, lifetime: Duration) {
        self.token_lifetime = lifetime;
    }

    /// Every token issued so far stops working (as when an EHR revokes a client's sessions).
    pub fn revoke_tokens(&mut self) {
        self.tokens.clear();
    }

    /// `.well-known/smart-configuration` for Backend Services clients.
    pub fn configuration(&self) -> Value {
        json!({
            "token_endpoint": self.token_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": ["system/*.cruds", "system/*.read", "system/*.write"],
            "capabilities": ["client-confidential-asymmetric"],
        })
    }

    /// Handles a token request (`application/x-www-form-urlencoded` pairs): a token answer or
    /// the OAuth error.
    pub fn token_request(&mut self, form: &[(String, String)]) -> Result<Value, OAuthError> {
        self.requests += 1;
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if field("grant_type") != Some("client_credentials") {
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                "grant_type must be client_credentials",
            ));
        }
        if field("client_assertion_type") != Some(JWT_BEARER) {
            return Err(OAuthError::new(
                400,
                "invalid_request",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        let assertion = field("client_assertion")
            .filter(|a| !a.is_empty())
            .ok_or_else(|| OAuthError::new(400, "invalid_request", "client_assertion missing"))?;
        let requested: Vec<String> = field("scope")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if requested.is_empty() {
            return Err(OAuthError::new(400, "invalid_scope", "scope missing"));
        }
        let client_id = self.authenticate(assertion)?;
        let registered = &self.clients[&client_id].scopes;
        if let Some(scope) = requested.iter().find(|s| !registered.contains(s)) {
            return Err(OAuthError::new(
                400,
                "invalid_scope",
                format!("scope '{scope}' is not registered for this client"),
            ));
        }
        let scopes = requested
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| OAuthError::new(400, "invalid_scope", "not a system scope"))?;
        let token = format!("{:032x}", fastrand::u128(..));
        self.tokens.insert(
            token.clone(),
            Grant {
                client_id,
                scopes,
                expires: Instant::now() + self.token_lifetime,
            },
        );
        self.issued += 1;
        Ok(json!({
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.token_lifetime.as_secs(),
            "scope": requested.join(" "),
        }))
    }

    /// The client an assertion proves, checked as SMART's "Authenticating to the token
    /// endpoint" says.
    fn authenticate(&mut self, assertion: &str) -> Result<String, OAuthError> {
        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|e| OAuthError::client(format!("client_assertion is not a JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(OAuthError::client(format!(
                "alg {:?} is not allowed: RS384 or ES384",
                header.alg
            )));
        }
        if header.jku.is_some() {
            return Err(OAuthError::client(
                "jku is not accepted: keys are registered in advance",
            ));
        }
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
            .map_err(|e| OAuthError::client(format!("claims: {e}")))?;
        let text = |name: &str| claims[name].as_str().unwrap_or_default().to_owned();
        let (iss, sub) = (text("iss"), text("sub"));
        let Some(client) = self.clients.get(&iss) else {
            return Err(OAuthError::client(format!(
                "iss '{iss}' is not a registered client"
            )));
        };
        if sub != iss {
            return Err(OAuthError::client("sub must equal iss (the client id)"));
        }
        if text("aud") != self.token_url {
            return Err(OAuthError::client(format!(
                "aud must be the token endpoint {}",
                self.token_url
            )));
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let Some(exp) = claims["exp"].as_i64() else {
            return Err(OAuthError::client("exp missing"));
        };
        if exp + CLOCK_LEEWAY_SECS < now {
            return Err(OAuthError::client("the assertion has expired"));
        }
        if exp > now + MAX_ASSERTION_LIFETIME_SECS + CLOCK_LEEWAY_SECS {
            return Err(OAuthError::client(
                "exp is more than five minutes in the future",
            ));
        }
        let jti = text("jti");
        if jti.is_empty() {
            return Err(OAuthError::client("jti missing"));
        }
        // The signature, against the key the header names, or any key of the client's set.
        let keys: Vec<_> = match &header.kid {
            Some(kid) => client.jwks.find(kid).into_iter().collect(),
            None => client.jwks.keys.iter().collect(),
        };
        if keys.is_empty() {
            return Err(OAuthError::client(format!(
                "no registered key has kid '{}'",
                header.kid.as_deref().unwrap_or_default()
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let verified = keys.iter().any(|jwk| {
            DecodingKey::from_jwk(jwk)
                .and_then(|key| jsonwebtoken::decode::<Value>(assertion, &key, &validation))
                .is_ok()
        });
        if !verified {
            return Err(OAuthError::client(
                "the signature does not verify with the client's registered keys",
            ));
        }
        let client_id = client.client_id.clone();
        self.seen
            .retain(|_, until| *until + CLOCK_LEEWAY_SECS >= now);
        if self.seen.insert((client_id.clone(), jti), exp).is_some() {
            return Err(OAuthError::client("jti was used before"));
        }
        Ok(client_id)
    }

    /// Whether `authorization` (the header's value) lets its holder do `interaction` on
    /// `resource_type`.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        resource_type: &str,
        interaction: char,
    ) -> Result<(), AccessDenied> {
        let token = authorization
            .and_then(|h| {
                h.split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            })
            .map(|(_, token)| token.trim())
            .ok_or(AccessDenied::InvalidToken("a bearer token is required"))?;
        let grant = self
            .tokens
            .get(token)
            .ok_or(AccessDenied::InvalidToken("unknown or revoked token"))?;
        if grant.expires <= Instant::now() {
            return Err(AccessDenied::InvalidToken("the token has expired"));
        }
        if grant
            .scopes
            .iter()
            .any(|s| s.allows(resource_type, interaction))
        {
            Ok(())
        } else {
            Err(AccessDenied::InsufficientScope(format!(
                "client '{}' has no scope to {} {resource_type}",
                grant.client_id,
                match interaction {
                    'c' => "create",
                    'u' => "update",
                    'r' => "read",
                    's' => "search",
                    _ => "change",
                }
            )))
        }
    }
}

/// A system scope, v1 (`system/Observation.write`) or v2 (`system/Observation.cu`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    resource_type: String,
    /// Interactions allowed, as SMART v2 letters (c, r, u, d, s).
    interactions: String,
}

impl Scope {
    fn parse(text: &str) -> Option<Self> {
        let (resource_type, permissions) = text.strip_prefix("system/")?.split_once('.')?;
        // v2 may add a query (`?category=...`); the reference EHR keeps to the type.
        let permissions = permissions.split('?').next()?;
        let interactions = match permissions {
            "read" => "rs".to_owned(),
            "write" => "cud".to_owned(),
            "*" => "cruds".to_owned(),
            v2 if !v2.is_empty() && v2.chars().all(|c| "cruds".contains(c)) => v2.to_owned(),
            _ => return None,
        };
        Some(Self {
            resource_type: resource_type.to_owned(),
            interactions,
        })
    }

    fn allows(&self, resource_type: &str, interaction: char) -> bool {
        (self.resource_type == "*" || self.resource_type == resource_type)
            && self.interactions.contains(interaction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_v1_and_v2_say_the_same_things() {
        let v1 = Scope::parse("system/Observation.write").unwrap();
        let v2 = Scope::parse("system/Observation.cu").unwrap();
        for scope in [&v1, &v2] {
            assert!(scope.allows("Observation", 'c'));
            assert!(scope.allows("Observation", 'u'));
            assert!(!scope.allows("Observation", 'r'));
            assert!(!scope.allows("Procedure", 'c'));
        }
        assert!(Scope::parse("system/*.read").unwrap().allows("Device", 's'));
        assert!(Scope::parse("patient/Observation.read").is_none());
        assert!(Scope::parse("system/Observation.xyz").is_none());
    }
}
