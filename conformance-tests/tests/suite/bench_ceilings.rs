//! The benchmark's ceiling servers do the work their rows claim: answer over mutual TLS, parse
//! what they are sent, and write it durably before the 202.

use bytes::Bytes;
use conformance_tests::ceiling::{self, CeilingKind};
use conformance_tests::client::Answer;
use conformance_tests::harness::{GETINGE, TestPki};
use http::Method;

async fn start(kind: CeilingKind, pki: &TestPki, dir: &std::path::Path) -> String {
    let tls = pki.ehr_tls("ca.pem");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let dir = dir.to_owned();
    tokio::spawn(async move {
        let _ = ceiling::serve(kind, tls, "127.0.0.1:0".parse().unwrap(), &dir, |addr| {
            let _ = tx.send(addr);
        })
        .await;
    });
    format!("https://{}/v1/observations", rx.await.unwrap())
}

/// POSTs `body` as JSON as the Getinge vendor would.
async fn post(pki: &TestPki, url: &str, body: &'static [u8]) -> Answer {
    pki.client(GETINGE)
        .send(
            Method::POST,
            url,
            Some("application/json"),
            Bytes::from_static(body),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn the_fsync_ceiling_parses_and_writes_what_it_accepts() {
    let pki = TestPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = start(CeilingKind::Fsync, &pki, dir.path()).await;
    post(
        &pki,
        &url,
        br#"{"device": {"serial": "CH-1"}, "readings": [1.50]}"#,
    )
    .await
    .expect_status(202);
    // Parsed and serialized again (arbitrary precision keeps 1.50), written before the answer.
    let written = std::fs::read_to_string(dir.path().join("ceiling.log")).unwrap();
    assert_eq!(written, r#"{"device":{"serial":"CH-1"},"readings":[1.50]}"#);
    post(&pki, &url, b"{not json").await.expect_status(400);
}

#[tokio::test]
async fn the_bare_ceiling_answers_without_reading_into_the_body_and_refuses_strangers() {
    let pki = TestPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = start(CeilingKind::Bare, &pki, dir.path()).await;
    post(&pki, &url, b"{not json").await.expect_status(202);
    // The same mutual TLS as the gateway: no client certificate, no answer.
    let anonymous = conformance_tests::client::MtlsClient::new(&pki.path("ca.pem"), None).unwrap();
    assert!(anonymous.get(&url).await.is_err());
    assert!(!dir.path().join("ceiling.log").exists());
}
