//! Who may talk to the gateway: the TLS handshake refuses missing, expired and foreign-CA
//! certificates; a trusted certificate that names no vendor, or a vendor posting for a device
//! it does not own, gets 403 with an OperationOutcome. Nothing reaches the EHR in any case.

use conformance_tests::client::MtlsClient;
use conformance_tests::harness::{
    EXPIRED, FOREIGN, GETINGE, SPECTRUM, Scenario, UNCONFIGURED, WriteStyle, now_rfc3339,
};
use serde_json::{Value, json};

fn batch(serial: &str, model: &str) -> Value {
    json!({
        "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": serial, "model": model},
        "readings": [{"parameter": "Flow", "value": 4.1, "unit": "L/min", "time": now_rfc3339()}]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_refuses_missing_expired_and_foreign_certificates() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let body = batch("CH-1", "CARDIOHELP-i");

    let anonymous = MtlsClient::new(&s.pki.path("ca.pem"), None).unwrap();
    for (label, client) in [
        ("no certificate", anonymous),
        ("expired certificate", s.pki.client(EXPIRED)),
        ("certificate from an unknown CA", s.pki.client(FOREIGN)),
    ] {
        let result = client.post_json(&s.observations_url(), &body).await;
        assert!(
            result.is_err(),
            "{label}: expected the handshake to fail, got {:?}",
            result.map(|a| a.status)
        );
    }
    // The gateway says why, without naming any patient.
    assert!(
        s.gateway.wait_for_log("TLS handshake refused"),
        "{}",
        s.gateway.log_text()
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0);

    // The same request with a good certificate goes through, so the refusals above were the
    // certificates' doing.
    let ok = s
        .pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &body)
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_certificate_of_no_vendor_is_forbidden() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let answer = s
        .pki
        .client(UNCONFIGURED)
        .post_json(&s.observations_url(), &batch("CH-1", "CARDIOHELP-i"))
        .await
        .unwrap();
    assert_eq!(answer.status, 403);
    let outcome = answer.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "security");
    assert!(
        outcome["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("nobody-we-know")
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn vendor_may_only_post_for_its_own_devices() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    // Spectrum owns serial M4-7001 only; Getinge owns CARDIOHELP models.
    for (client, serial, model) in [
        (SPECTRUM, "M4-9999", "M4"),
        (SPECTRUM, "CH-1", "CARDIOHELP-i"),
        (GETINGE, "M4-7001", "M4"),
    ] {
        let answer = s
            .pki
            .client(client)
            .post_json(&s.observations_url(), &batch(serial, model))
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "{client} posting for {serial}");
        assert_eq!(answer.json()["issue"][0]["code"], "forbidden");
        assert_eq!(answer.issue_pointers(), ["/device/serial"]);
    }
    assert_eq!(s.ehr.ehr.count("Observation"), 0);
}
