//! When the EHR refuses, fails, is slow, is down or distrusts the gateway: the vendor gets an
//! answer that says whether to resend, a 2xx only once the EHR holds the data, and resending is
//! harmless.

use std::time::Duration;

use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::{Fault, ReferenceEhr};
use conformance_tests::harness::{
    EhrReader, FOREIGN_GATEWAY, GETINGE, GatewayProcess, Scenario, TestPki, WriteStyle,
    gateway_config,
};
use time::OffsetDateTime;

#[tokio::test(flavor = "multi_thread")]
async fn ehr_refusal_is_passed_back_with_its_operation_outcome() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let batch = SimulatedCardiohelp::new("CH-0042", 1).next_batch(OffsetDateTime::now_utc());
    s.ehr.ehr.fail_next(Fault::status(422), 1);
    let vendor = s.pki.client(GETINGE);
    let answer = vendor
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap();
    assert_eq!(answer.status, 502);
    let outcome = answer.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let texts: Vec<&str> = outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["details"]["text"].as_str())
        .collect();
    assert!(
        texts[0].contains("refused") && texts[0].contains("422"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("fault injected"),
        "the EHR's own words are kept: {texts:?}"
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0);

    // Once the cause is gone, the same batch goes through.
    assert_eq!(
        vendor
            .post_json(&s.observations_url(), &batch)
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_failures_are_retried_and_exhaustion_says_retry_later() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let mut console = SimulatedCardiohelp::new("CH-0042", 2);
    let vendor = s.pki.client(GETINGE);
    let now = OffsetDateTime::now_utc();

    // Two 503s (one with Retry-After) then success: delivered within the one request.
    s.ehr.ehr.fail_next(Fault::status(503).retry_after(1), 1);
    s.ehr.ehr.fail_next(Fault::status(500), 1);
    vendor
        .post_json(&s.observations_url(), &console.next_batch(now))
        .await
        .unwrap()
        .expect_status(200);
    assert_eq!(s.ehr.ehr.count("Observation"), 12);

    // Three 503s use up the attempts: 503 to the vendor with Retry-After, nothing stored.
    s.ehr.ehr.fail_next(Fault::status(503).retry_after(2), 3);
    let answer = vendor
        .post_json(
            &s.observations_url(),
            &console.next_batch(now + time::Duration::seconds(1)),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["retry-after"], "2");
    assert_eq!(answer.json()["issue"][0]["code"], "transient");
    assert_eq!(s.ehr.ehr.count("Observation"), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timed_out_write_that_lands_late_is_not_duplicated_by_the_retry() {
    let s = Scenario::start(WriteStyle::SINGLE_CONDITIONAL)
        .await
        .unwrap();
    // The first write is held past the gateway's 3 s attempt timeout but still stored.
    s.ehr
        .ehr
        .fail_next(Fault::delay(Duration::from_millis(3500)), 1);
    let batch = SimulatedCardiohelp::new("CH-0042", 3).next_batch(OffsetDateTime::now_utc());
    s.pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);
    // Let the held write finish, then count by identifier.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stored = s.stored_observations().await.unwrap();
    let mut identifiers: Vec<_> = stored.iter().map(|(id, _)| id.clone()).collect();
    identifiers.sort();
    identifiers.dedup();
    assert_eq!(stored.len(), 12);
    assert_eq!(identifiers.len(), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn ehr_down_is_503_and_nothing_is_claimed() {
    let pki = TestPki::generate().unwrap();
    // An EHR that started and went away: its port now refuses connections.
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let base_url = ehr.base_url.clone();
    drop(ehr);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gateway = GatewayProcess::start(&gateway_config(
        &pki,
        &base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    ))
    .unwrap();
    let batch = SimulatedCardiohelp::new("CH-0042", 4).next_batch(OffsetDateTime::now_utc());
    let answer = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["retry-after"], "30");
    assert!(
        answer.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("unavailable")
    );
    // The EHR being down is the operator's warning, not an error of the gateway (the trace
    // of the answer reaches the log just after the answer itself).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = gateway.log_text();
        if log.contains("response failed") || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let traced: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("response failed"))
        .collect();
    assert!(
        !traced.is_empty() && traced.iter().all(|l| l.contains(" WARN ")),
        "{log}"
    );
    assert!(!log.contains(" ERROR "), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ehr_distrusting_the_gateway_certificate_is_a_configuration_error_not_retried() {
    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // The gateway presents a certificate from a CA the EHR does not trust.
    let gateway = GatewayProcess::start(&gateway_config(
        &pki,
        &ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        FOREIGN_GATEWAY,
    ))
    .unwrap();
    let batch = SimulatedCardiohelp::new("CH-0042", 5).next_batch(OffsetDateTime::now_utc());
    let answer = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap();
    assert_eq!(answer.status, 502, "{}", gateway.log_text());
    assert!(
        answer.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("as configured")
    );
    assert!(
        gateway.wait_for_log("fix the configuration"),
        "{}",
        gateway.log_text()
    );
    let log = gateway.log_text();
    assert_eq!(
        log.matches("TLS handshake refused").count(),
        0,
        "that would be our own listener"
    );
    let reader = EhrReader {
        client: pki.client("gateway-client"),
        base_url: ehr.base_url.clone(),
    };
    assert!(reader.all("Observation").await.unwrap().is_empty());
}
