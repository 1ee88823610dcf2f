//! SMART Backend Services, end to end over sockets: the reference EHR's token endpoint checks a
//! client assertion as the specification says and refuses every way one can be wrong; the
//! gateway, registered with the JWKS that `gateway jwks` prints, gets a token, keeps it, sends
//! it with every write, renews it when the EHR stops taking it, and treats a refused token
//! request as a configuration error: the destination pauses, the admin API says why, the EHR
//! sees no storm of token requests, and nothing accepted is lost.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use conformance_tests::client::{Answer, MtlsClient};
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::smart::RegisteredClient;
use conformance_tests::ehr::{ReferenceEhr, RunningEhr};
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, SMART_WRITE_SCOPES, TestPki, admin_until, durable_config,
    gateway_binary, mtls_ehr, with_smart,
};
use gateway::delivery::smart::keys::{SigningKey, SigningKeys};
use http::Method;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};
use time::OffsetDateTime;

const CLIENT_ID: &str = "ecmo-gateway";
const SCOPES: &[&str] = &SMART_WRITE_SCOPES;

fn client(client_id: &str, jwks: JwkSet, scopes: &[&str]) -> RegisteredClient {
    RegisteredClient {
        client_id: client_id.to_owned(),
        jwks,
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn jwks_of(keys: &[&Path]) -> JwkSet {
    let keys =
        SigningKeys::load(&keys.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>()).unwrap();
    JwkSet {
        keys: keys.public_keys().cloned().collect(),
    }
}

/// An EHR that takes bearer tokens alone: clients without a certificate are let in.
async fn token_only_ehr(pki: &TestPki) -> RunningEhr {
    ReferenceEhr::new()
        .start(
            pki.ehr_tls_certificate_optional("ca.pem"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap()
}

/// A client without a certificate (it trusts the test CA for the EHR's).
fn anonymous(pki: &TestPki) -> MtlsClient {
    MtlsClient::new(&pki.path("ca.pem"), None).unwrap()
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims of a good assertion for `token_url`.
fn claims(token_url: &str) -> Value {
    json!({
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": token_url,
        "exp": now() + 240,
        "jti": format!("{:x}", fastrand::u128(..)),
    })
}

fn form(pairs: &[(&str, &str)]) -> Bytes {
    let mut form = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            form.push('&');
        }
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        form.push_str(&format!("{}={}", encode(key), encode(value)));
    }
    Bytes::from(form)
}

async fn ask_token(http: &MtlsClient, token_url: &str, assertion: &str, scope: &str) -> Answer {
    http.send(
        Method::POST,
        token_url,
        Some("application/x-www-form-urlencoded"),
        form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ]),
    )
    .await
    .unwrap()
}

#[track_caller]
fn assert_oauth_error(answer: &Answer, status: u16, error: &str, says: &str) {
    let body = answer.json();
    assert_eq!(answer.status.as_u16(), status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    let description = body["error_description"].as_str().unwrap_or_default();
    assert!(description.contains(says), "'{says}' not in {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ehr_token_endpoint_checks_each_claim_and_the_fhir_endpoint_each_token() {
    let pki = TestPki::generate().unwrap();
    let ehr = token_only_ehr(&pki).await;
    let registered = pki.smart_key("smart-registered");
    let unregistered = pki.smart_key("smart-unregistered");
    ehr.ehr
        .register_smart_client(client(CLIENT_ID, jwks_of(&[&registered]), SCOPES));
    let http = anonymous(&pki);

    // Discovery says where the token endpoint is and how to authenticate to it.
    let configuration = http
        .get(&format!("{}/.well-known/smart-configuration", ehr.base_url))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let token_url = configuration["token_endpoint"].as_str().unwrap().to_owned();
    assert_eq!(
        configuration["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );

    let key = SigningKey::load(&registered).unwrap();
    let other = SigningKey::load(&unregistered).unwrap();
    let sign = |claims: &Value| key.sign(claims).unwrap();
    let scope = "system/Observation.cu";

    // Each way an assertion can be wrong, refused with the error SMART names.
    let mut wrong_sub = claims(&token_url);
    wrong_sub["sub"] = json!("somebody-else");
    let mut unknown_iss = claims(&token_url);
    unknown_iss["iss"] = json!("somebody-else");
    unknown_iss["sub"] = json!("somebody-else");
    let mut wrong_aud = claims(&token_url);
    wrong_aud["aud"] = json!(format!("{}/other", token_url));
    let mut far_exp = claims(&token_url);
    far_exp["exp"] = json!(now() + 600);
    let mut past_exp = claims(&token_url);
    past_exp["exp"] = json!(now() - 60);
    let mut no_exp = claims(&token_url);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_jti = claims(&token_url);
    no_jti.as_object_mut().unwrap().remove("jti");
    let cases: Vec<(String, &str)> = vec![
        (sign(&wrong_sub), "sub must equal iss"),
        (sign(&unknown_iss), "not a registered client"),
        (sign(&wrong_aud), "aud must be the token endpoint"),
        (sign(&far_exp), "more than five minutes"),
        (sign(&past_exp), "expired"),
        (sign(&no_exp), "exp missing"),
        (sign(&no_jti), "jti missing"),
        (
            other.sign(&claims(&token_url)).unwrap(),
            "no registered key has kid",
        ),
        (
            // The registered key's kid on a signature by another key.
            {
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
                header.kid = Some(key.kid().to_owned());
                let pem = std::fs::read(&unregistered).unwrap();
                jsonwebtoken::encode(
                    &header,
                    &claims(&token_url),
                    &jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
                )
                .unwrap()
            },
            "signature does not verify",
        ),
        (
            {
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384);
                header.kid = Some(key.kid().to_owned());
                jsonwebtoken::encode(
                    &header,
                    &claims(&token_url),
                    &jsonwebtoken::EncodingKey::from_secret(b"a shared secret").unwrap(),
                )
                .unwrap()
            },
            "is not allowed",
        ),
        ("not.a.jwt".to_owned(), "not a JWT"),
    ];
    for (assertion, says) in &cases {
        let answer = ask_token(&http, &token_url, assertion, scope).await;
        assert_oauth_error(&answer, 401, "invalid_client", says);
    }

    // The request around the assertion.
    let good = sign(&claims(&token_url));
    let answer = http
        .send(
            Method::POST,
            &token_url,
            Some("application/x-www-form-urlencoded"),
            form(&[("grant_type", "password"), ("client_assertion", &good)]),
        )
        .await
        .unwrap();
    assert_oauth_error(&answer, 400, "unsupported_grant_type", "client_credentials");
    let answer = http
        .send(
            Method::POST,
            &token_url,
            Some("application/x-www-form-urlencoded"),
            form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("client_assertion_type", "urn:example:basic"),
                ("client_assertion", &good),
            ]),
        )
        .await
        .unwrap();
    assert_oauth_error(&answer, 400, "invalid_request", "client_assertion_type");
    let answer = ask_token(&http, &token_url, &good, "system/Patient.cruds").await;
    assert_oauth_error(&answer, 400, "invalid_scope", "system/Patient.cruds");
    assert_eq!(
        ehr.ehr.smart(|s| s.issued),
        0,
        "no token for anything above"
    );

    // A good assertion gets a token once; the same jti again is a replay.
    let good = sign(&claims(&token_url));
    let answer = ask_token(&http, &token_url, &good, scope)
        .await
        .expect_status(200);
    assert_eq!(answer.headers["cache-control"], "no-store");
    let token = answer.json();
    assert_eq!(token["token_type"], "bearer");
    assert_eq!(token["scope"], scope);
    assert!(token["expires_in"].as_u64().unwrap() > 0);
    let replay = ask_token(&http, &token_url, &good, scope).await;
    assert_oauth_error(&replay, 401, "invalid_client", "jti was used before");
    // v1 scope syntax is taken as well.
    ehr.ehr.smart(|s| {
        s.register(client(
            CLIENT_ID,
            jwks_of(&[&registered]),
            &["system/Observation.write", "system/Observation.read"],
        ))
    });
    let v1 = ask_token(
        &http,
        &token_url,
        &sign(&claims(&token_url)),
        "system/Observation.write system/Observation.read",
    )
    .await
    .expect_status(200)
    .json();

    // The FHIR endpoint: no token 401, a token without the scope 403, with it through.
    let search = format!("{}/Observation?identifier=urn:x|y", ehr.base_url);
    let answer = http.get(&search).await.unwrap();
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    let write_only = anonymous(&pki)
        .with_bearer_token(token["access_token"].as_str().unwrap())
        .unwrap();
    let answer = write_only.get(&search).await.unwrap();
    assert_eq!(
        answer.status,
        403,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        answer.headers["www-authenticate"],
        "Bearer error=\"insufficient_scope\""
    );
    let reader = anonymous(&pki)
        .with_bearer_token(v1["access_token"].as_str().unwrap())
        .unwrap();
    reader.get(&search).await.unwrap().expect_status(200);
    let forged = anonymous(&pki)
        .with_bearer_token("0123456789abcdef")
        .unwrap();
    assert_eq!(forged.get(&search).await.unwrap().status, 401);
    // The capability statement stays open, as SMART discovery needs.
    http.get(&format!("{}/metadata", ehr.base_url))
        .await
        .unwrap()
        .expect_status(200);
}

fn smart_config(
    pki: &TestPki,
    ehr: &RunningEhr,
    outbox: &Path,
    keys: &[&Path],
    certificate: bool,
    token_url: Option<&str>,
) -> String {
    with_smart(
        &durable_config(pki, &ehr.base_url, outbox),
        CLIENT_ID,
        keys,
        certificate,
        token_url,
    )
}

/// What `gateway jwks --config` prints: the JWKS an EHR registers.
fn jwks_from_cli(config: &str) -> JwkSet {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let output = std::process::Command::new(gateway_binary().unwrap())
        .args(["jwks", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn pending(queues: &Value) -> u64 {
    queues["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["pending"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_writes_with_a_token_it_keeps_and_renews_without_a_client_certificate() {
    let pki = TestPki::generate().unwrap();
    let ehr = token_only_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    // Two keys: the first signs, both are published (a rotation in progress).
    let current = pki.smart_key("smart-current");
    let next = pki.smart_key("smart-next");
    let config = smart_config(
        &pki,
        &ehr,
        &dir.path().join("outbox.sqlite"),
        &[&current, &next],
        false,
        None,
    );
    let jwks = jwks_from_cli(&config);
    assert_eq!(jwks.keys.len(), 2, "both keys of the rotation published");
    assert!(jwks.keys.iter().all(|k| k.common.key_id.is_some()));
    ehr.ehr
        .register_smart_client(client(CLIENT_ID, jwks.clone(), SCOPES));
    let gateway = GatewayProcess::start(&config).unwrap();
    let admin = pki.client(ADMIN);
    let served: JwkSet = serde_json::from_slice(
        &admin
            .get(&gateway.admin_url("/admin/v1/jwks"))
            .await
            .unwrap()
            .expect_status(200)
            .body,
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&served).unwrap(),
        serde_json::to_value(&jwks).unwrap(),
        "the admin listener publishes the same JWKS"
    );

    let vendor = pki.client(GETINGE);
    let mut console = SimulatedCardiohelp::new("CH-0042", 11);
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    for cycle in 0..3 {
        vendor
            .post_json(
                &gateway.url("/v1/observations"),
                &console.next_batch(start + time::Duration::seconds(cycle)),
            )
            .await
            .unwrap()
            .expect_status(202);
    }
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| pending(q) == 0).await;
    assert_eq!(ehr.ehr.count("Observation"), 36);
    assert_eq!(ehr.ehr.smart(|s| s.issued), 1, "one token for every write");

    let smart = admin
        .get(&gateway.admin_url("/admin/v1/smart"))
        .await
        .unwrap()
        .expect_status(200);
    let status = &smart.json()["destinations"]["ehr"];
    assert_eq!(status["token"]["state"], "valid", "{status}");
    assert_eq!(status["tokensIssued"], 1);
    assert_eq!(
        status["tokenEndpoint"],
        ehr.ehr.smart(|s| s.token_url.clone()),
        "found by discovery"
    );
    assert_eq!(status["keyId"], jwks.keys[0].common.key_id.clone().unwrap());
    assert!(status["refused"].is_null());

    // The EHR stops taking the token: the gateway renews it once and the write goes through.
    ehr.ehr.smart(|s| s.revoke_tokens());
    vendor
        .post_json(
            &gateway.url("/v1/observations"),
            &console.next_batch(start + time::Duration::seconds(3)),
        )
        .await
        .unwrap()
        .expect_status(202);
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| pending(q) == 0).await;
    assert_eq!(ehr.ehr.count("Observation"), 48);
    assert_eq!(ehr.ehr.smart(|s| s.issued), 2);
    let queues = admin
        .get(&gateway.admin_url("/admin/v1/queues"))
        .await
        .unwrap()
        .json();
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_pauses_the_destination_says_why_and_loses_nothing() {
    let pki = TestPki::generate().unwrap();
    // Mutual TLS and a bearer token together: the EHR requires both.
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let ours = pki.smart_key("smart-ours");
    let theirs = pki.smart_key("smart-theirs");
    // Registered with a key the gateway does not hold.
    ehr.ehr
        .register_smart_client(client(CLIENT_ID, jwks_of(&[&theirs]), SCOPES));
    let token_url = ehr.ehr.smart(|s| s.token_url.clone());
    let outbox = dir.path().join("outbox.sqlite");
    let config = smart_config(&pki, &ehr, &outbox, &[&ours], true, Some(&token_url));
    let gateway = GatewayProcess::start(&config).unwrap();
    let admin = pki.client(ADMIN);
    let batch = SimulatedCardiohelp::new("CH-0042", 12)
        .next_batch(OffsetDateTime::now_utc() - time::Duration::minutes(5));
    let tracking = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202)
        .tracking_id();

    let smart = admin_until(&gateway, &admin, "/admin/v1/smart", |s| {
        !s["destinations"]["ehr"]["refused"].is_null()
    })
    .await;
    let refused = smart["destinations"]["ehr"]["refused"]["error"]
        .as_str()
        .unwrap();
    assert!(
        refused.contains("invalid_client") && refused.contains("check client_id"),
        "{refused}"
    );
    // The message waits, with the reason, instead of being retried or dead-lettered.
    let status = admin_until(
        &gateway,
        &admin,
        &format!("/admin/v1/deliveries/{tracking}"),
        |d| {
            d["messages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["lastError"].as_str().is_some_and(|e| e.contains("SMART")))
        },
    )
    .await;
    assert_eq!(status["complete"], false, "{status}");
    assert!(gateway.wait_for_log("fix the configuration"));
    // A second look later: still one token request, no storm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ehr.ehr.smart(|s| s.requests),
        1,
        "one token request, not a storm"
    );
    assert_eq!(ehr.ehr.count("Observation"), 0);
    assert!(
        !gateway.log_text().contains("access_token"),
        "no token material in the log"
    );

    // The integration team registers the gateway's key and restarts it: everything arrives.
    gateway.kill9();
    ehr.ehr.smart(|s| {
        s.register(client(CLIENT_ID, jwks_from_cli(&config), SCOPES));
    });
    let gateway = GatewayProcess::start(&config).unwrap();
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| pending(q) == 0).await;
    assert_eq!(ehr.ehr.count("Observation"), 12);
    assert_eq!(ehr.ehr.smart(|s| s.issued), 1);
}
