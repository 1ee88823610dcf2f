//! What the people who run the gateway rely on: logs a shipper can read (JSON lines, ids as
//! fields) that never carry a patient's identifier or a reading's value.

use conformance_tests::ehr::ReferenceEhr;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, admin_until, durable_config,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";
/// What must never reach the log: a patient identifier, a value, a run id.
const PATIENT: &str = "MRN-PRIVATE-4711";
const VALUE: &str = "4.3217";
const RUN: &str = "RUN-PRIVATE-77";

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_ids_as_fields_and_never_a_patient_identifier_or_value() {
    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"));
    let gateway =
        GatewayProcess::start_with_env(&config, &[("GATEWAY_LOG_FORMAT", "json")]).unwrap();
    let vendor = pki.client(GETINGE);
    let t = (OffsetDateTime::now_utc() - time::Duration::minutes(5))
        .format(&Rfc3339)
        .unwrap();
    let reading = |unit: &str| {
        json!({
            "device": {"serial": "CH-P1", "model": "CARDIOHELP-i"},
            "patient": {"system": MRN, "value": PATIENT},
            "readings": [{"parameter": "Flow", "value": VALUE.parse::<f64>().unwrap(), "unit": unit, "time": t}]
        })
    };
    let accepted = vendor
        .post_json(&gateway.url("/v1/observations"), &reading("L/min"))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let tracking_id = accepted["trackingId"].as_str().unwrap().to_owned();
    // A refusal that repeats the patient and the value back to the vendor, not to the log.
    vendor
        .post_json(&gateway.url("/v1/observations"), &reading("furlongs"))
        .await
        .unwrap()
        .expect_status(422);
    // A run naming the patient.
    let started = json!({
        "eventId": "s", "type": "started", "time": t,
        "patient": {"system": MRN, "value": PATIENT},
        "mode": "vv", "console": {"serial": "CH-P2", "model": "CARDIOHELP-i"}
    });
    let answer = vendor
        .post_json(&gateway.url(&format!("/v1/runs/{RUN}/events")), &started)
        .await
        .unwrap();
    assert!(answer.status.is_success(), "{:?}", answer.json());
    admin_until(&gateway, &pki.client(ADMIN), "/admin/v1/queues", |q| {
        q["destinations"][0]["pending"] == 0
    })
    .await;
    assert!(ehr.ehr.count("Observation") >= 1);
    assert!(gateway.wait_for_log("run event applied"));

    let log = gateway.log_text();
    let events: Vec<Value> = log
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert!(events.len() >= 4, "{log}");
    for event in &events {
        assert!(
            event["timestamp"].is_string() && event["level"].is_string(),
            "{event}"
        );
        assert!(event["message"].is_string(), "{event}");
    }
    for secret in [PATIENT, VALUE, RUN] {
        assert!(!log.contains(secret), "'{secret}' in the log:\n{log}");
    }
    // The accepted batch: its ids as fields, in the span of its request.
    let batch = events
        .iter()
        .find(|e| e["message"] == "batch accepted into the outbox")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(batch["tracking_id"], tracking_id.as_str(), "{batch}");
    assert!(batch["first_message_id"].is_u64(), "{batch}");
    assert_eq!(batch["vendor"], "getinge");
    assert_eq!(batch["span"]["request_id"], batch["request_id"], "{batch}");
    assert_eq!(batch["span"]["route"], "/v1/observations", "{batch}");
}
