//! The web console: static pages served by the admin listener, and the sign-in of operators who
//! use it from a browser without an admin certificate.
//!
//! | | |
//! |---|---|
//! | `GET /console` | the console (HTML, its script and style sheet: no CDN, no inline script) |
//! | `POST /console/session` | sign in: `{"user", "password"}`; sets the session cookie, answers the CSRF token |
//! | `GET /console/session` | who is signed in, and the CSRF token (401 if no one) |
//! | `DELETE /console/session` | sign out |
//!
//! Passwords are kept only as Argon2id hashes (`gateway hash-password`). A session is a random
//! token in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict) that expires when idle; a
//! request that changes something also carries the session's CSRF token in `X-CSRF-Token`.
//! Sessions and failed sign-ins are bounded in memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use serde_json::json;
use sha2::Digest;

use super::json_response;
use crate::outcome::{ApiError, Issue};
use crate::{BoxBody, BoxError, full_body};

const COOKIE: &str = "__Host-ecmo-console";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at once; the least recently used goes first.
const MAX_SESSIONS: usize = 64;
/// Sign-ins refused within a minute before any more are refused unchecked (429).
const MAX_FAILURES_PER_MINUTE: usize = 20;
/// A session ends this long after it began, however busy.
const MAX_SESSION_AGE: Duration = Duration::from_secs(12 * 3600);
/// The largest sign-in body read.
pub const MAX_LOGIN_BYTES: usize = 4096;

const INDEX_HTML: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// An operator signed in to the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleUser {
    pub name: String,
    pub csrf: String,
}

struct Session {
    user: ConsoleUser,
    began: Instant,
    used: Instant,
}

/// The console's users and their sessions.
pub struct ConsoleLogin {
    /// User name -> Argon2 PHC string.
    users: HashMap<String, String>,
    idle: Duration,
    /// SHA-256 of the token -> session: a leaked memory dump holds no usable cookie.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<Vec<Instant>>,
}

/// Why a sign-in was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    #[error("unknown user or wrong password")]
    Refused,
    #[error("too many failed sign-ins: wait a minute")]
    Throttled,
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system's random source");
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A hash for a user who does not exist, so an unknown name takes as long as a wrong password.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2aT0J7pF1Kb0uD3ZOSrCQBsMC9AxnY1AoL9Xv8O6FbI";

impl ConsoleLogin {
    pub fn new(settings: &crate::config::ConsoleSettings) -> Self {
        Self {
            users: settings
                .users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            idle: settings.idle_timeout,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// Checks a password (Argon2: tens of milliseconds, call off the async workers) and opens
    /// a session: its cookie token and the user.
    pub fn sign_in(&self, name: &str, password: &str) -> Result<(String, ConsoleUser), LoginError> {
        let now = Instant::now();
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|at| now.duration_since(*at) < Duration::from_secs(60));
            if failures.len() >= MAX_FAILURES_PER_MINUTE {
                return Err(LoginError::Throttled);
            }
        }
        let stored = self.users.get(name);
        let hash = stored.map_or(DECOY_HASH, String::as_str);
        let verified = PasswordHash::new(hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        });
        if !verified || stored.is_none() {
            self.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(now);
            return Err(LoginError::Refused);
        }
        let token = random_hex(32);
        let user = ConsoleUser {
            name: name.to_owned(),
            csrf: random_hex(16),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| self.is_live(s, now));
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            digest(&token),
            Session {
                user: user.clone(),
                began: now,
                used: now,
            },
        );
        Ok((token, user))
    }

    fn is_live(&self, session: &Session, now: Instant) -> bool {
        now.duration_since(session.used) < self.idle
            && now.duration_since(session.began) < MAX_SESSION_AGE
    }

    /// The user whose session cookie `headers` carry, if it is live; using it keeps it so.
    pub fn user(&self, headers: &HeaderMap) -> Option<ConsoleUser> {
        let token = session_token(headers)?;
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let key = digest(token);
        let live = sessions.get(&key).is_some_and(|s| self.is_live(s, now));
        if !live {
            sessions.remove(&key);
            return None;
        }
        let session = sessions.get_mut(&key)?;
        session.used = now;
        Some(session.user.clone())
    }

    pub fn sign_out(&self, headers: &HeaderMap) {
        if let Some(token) = session_token(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest(token));
        }
    }
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty()).then_some(value)
        })
}

/// Whether a request that changes something carries its session's CSRF token.
pub fn csrf_ok(method: &Method, headers: &HeaderMap, user: &ConsoleUser) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
        || headers
            .get(CSRF_HEADER)
            .is_some_and(|v| v.as_bytes() == user.csrf.as_bytes())
}

fn hardened(mut response: Response<BoxBody>) -> Response<BoxBody> {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response<BoxBody> {
    let mut response = Response::new(full_body(body.as_bytes().to_vec()));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    hardened(response)
}

fn unauthorized(why: &str) -> BoxError {
    ApiError::one(
        StatusCode::UNAUTHORIZED,
        Issue::error("login", why.to_owned()),
    )
    .into()
}

/// The sign-in body: `{"user": ..., "password": ...}`.
#[derive(serde::Deserialize)]
struct Credentials<'a> {
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    password: std::borrow::Cow<'a, str>,
}

/// The console's own routes (`None`: not one of them). `body` is the request's, read up to
/// [`MAX_LOGIN_BYTES`] for a sign-in only.
pub(super) async fn route(
    login: Option<&std::sync::Arc<ConsoleLogin>>,
    method: &Method,
    headers: &HeaderMap,
    segments: &[&str],
    body: Option<bytes::Bytes>,
) -> Result<Option<Response<BoxBody>>, BoxError> {
    let response = match (method, segments) {
        (&Method::GET, ["console"]) => asset("text/html; charset=utf-8", INDEX_HTML),
        (&Method::GET, ["console", "app.js"]) => asset("text/javascript; charset=utf-8", APP_JS),
        (&Method::GET, ["console", "app.css"]) => asset("text/css; charset=utf-8", APP_CSS),
        (_, ["console", "session"]) => {
            let Some(login) = login else {
                return Err(unauthorized(
                    "no console users are configured ([admin.console] users): use an admin certificate",
                ));
            };
            match *method {
                Method::GET => match login.user(headers) {
                    Some(user) => json_response(
                        StatusCode::OK,
                        &json!({"user": user.name, "csrf": user.csrf}),
                    ),
                    None => return Err(unauthorized("not signed in")),
                },
                Method::POST => {
                    let body = body.unwrap_or_default();
                    let credentials: Credentials<'_> =
                        serde_json::from_slice(&body).map_err(|e| {
                            BoxError::from(ApiError::one(
                                StatusCode::BAD_REQUEST,
                                Issue::error(
                                    "structure",
                                    format!("expected {{\"user\": ..., \"password\": ...}}: {e}"),
                                ),
                            ))
                        })?;
                    let (user, password) = (
                        credentials.user.into_owned(),
                        credentials.password.into_owned(),
                    );
                    let login = login.clone();
                    let name = user.clone();
                    let signed_in =
                        tokio::task::spawn_blocking(move || login.sign_in(&user, &password))
                            .await
                            .map_err(|e| BoxError::from(e.to_string()))?;
                    match signed_in {
                        Ok((token, user)) => {
                            tracing::info!(user = %name, "console sign-in");
                            let mut response = json_response(
                                StatusCode::OK,
                                &json!({"user": user.name, "csrf": user.csrf}),
                            );
                            response.headers_mut().insert(
                                header::SET_COOKIE,
                                HeaderValue::from_str(&format!(
                                    "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"
                                ))
                                .map_err(|e| BoxError::from(e.to_string()))?,
                            );
                            response
                        }
                        Err(LoginError::Refused) => {
                            tracing::warn!(user = %name, "console sign-in refused");
                            return Err(unauthorized("unknown user or wrong password"));
                        }
                        Err(LoginError::Throttled) => {
                            tracing::warn!("console sign-ins throttled after repeated failures");
                            let mut error = ApiError::one(
                                StatusCode::TOO_MANY_REQUESTS,
                                Issue::error("throttled", LoginError::Throttled.to_string()),
                            );
                            error.retry_after = Some(60);
                            return Err(error.into());
                        }
                    }
                }
                Method::DELETE => {
                    login.sign_out(headers);
                    let mut response = Response::new(full_body(Vec::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    response.headers_mut().insert(
                        header::SET_COOKIE,
                        HeaderValue::from_static(
                            "__Host-ecmo-console=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
                        ),
                    );
                    response
                }
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(hardened(response)))
}

/// An Argon2id hash of `password` in PHC form, for `[admin.console] users`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleSettings, ConsoleUserSettings};

    fn login(idle: Duration) -> ConsoleLogin {
        ConsoleLogin::new(&ConsoleSettings {
            users: vec![ConsoleUserSettings {
                name: "ana".into(),
                password_hash: hash_password("correct horse").unwrap(),
            }],
            idle_timeout: idle,
        })
    }

    fn cookie(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {COOKIE}={token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn a_session_opens_with_the_right_password_only() {
        let login = login(Duration::from_secs(60));
        assert_eq!(
            login.sign_in("ana", "wrong").unwrap_err(),
            LoginError::Refused
        );
        assert_eq!(
            login.sign_in("bob", "correct horse").unwrap_err(),
            LoginError::Refused
        );
        let (token, user) = login.sign_in("ana", "correct horse").unwrap();
        assert_eq!(login.user(&cookie(&token)), Some(user.clone()));
        assert_eq!(login.user(&cookie("forged")), None);
        assert!(!csrf_ok(&Method::POST, &cookie(&token), &user));
        let mut with_csrf = cookie(&token);
        with_csrf.insert(CSRF_HEADER, HeaderValue::from_str(&user.csrf).unwrap());
        assert!(csrf_ok(&Method::POST, &with_csrf, &user));
        assert!(csrf_ok(&Method::GET, &cookie(&token), &user));
        login.sign_out(&cookie(&token));
        assert_eq!(login.user(&cookie(&token)), None, "signed out");
    }

    #[test]
    fn an_idle_session_ends() {
        let login = login(Duration::from_millis(1));
        let (token, _) = login.sign_in("ana", "correct horse").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(login.user(&cookie(&token)), None);
    }

    #[test]
    fn repeated_failures_are_throttled() {
        let login = login(Duration::from_secs(60));
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(login.sign_in("ana", "x").unwrap_err(), LoginError::Refused);
        }
        assert_eq!(
            login.sign_in("ana", "correct horse").unwrap_err(),
            LoginError::Throttled
        );
    }

    #[test]
    fn the_decoy_hash_parses() {
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
    }
}
