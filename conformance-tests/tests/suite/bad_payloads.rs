//! Every kind of bad payload gets its documented status and an OperationOutcome that names
//! the field and the reason, and nothing reaches the EHR.

use bytes::Bytes;
use conformance_tests::client::Answer;
use conformance_tests::harness::{GETINGE, Scenario, WriteStyle, now_rfc3339};
use http::Method;
use serde_json::{Value, json};

fn reading(parameter: &str, value: Value, unit: &str) -> Value {
    json!({"parameter": parameter, "value": value, "unit": unit, "time": now_rfc3339()})
}

fn batch(readings: Vec<Value>) -> Value {
    json!({"patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-0042", "model": "CARDIOHELP-i"}, "readings": readings})
}

fn assert_outcome(answer: &Answer, status: u16, pointers: &[&str]) {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.headers["content-type"], "application/fhir+json");
    let outcome = answer.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    for issue in outcome["issue"].as_array().unwrap() {
        assert_eq!(issue["severity"], "error");
        assert!(!issue["details"]["text"].as_str().unwrap().is_empty());
    }
    assert_eq!(answer.issue_pointers(), pointers);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_payload_gets_its_status_and_nothing_is_stored() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let vendor = s.pki.client(GETINGE);
    let url = s.observations_url();
    let raw = |content_type: Option<&'static str>, body: &'static str| {
        let vendor = vendor.clone();
        let url = url.clone();
        async move {
            vendor
                .send(
                    Method::POST,
                    &url,
                    content_type,
                    Bytes::from_static(body.as_bytes()),
                )
                .await
                .unwrap()
        }
    };

    // Not JSON at all: 400, with where the parser stopped.
    let answer = raw(
        Some("application/json"),
        "{\"device\": {\"serial\": \"CH-1\",, }",
    )
    .await;
    assert_outcome(&answer, 400, &["/"]);
    assert!(
        answer.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("line 1")
    );

    // Not JSON by media type: 415.
    assert_outcome(&raw(Some("text/csv"), "Flow,4.2").await, 415, &[]);

    // Valid JSON, broken schema: every problem at once, 422.
    let answer = vendor
        .post_json(&url, &json!({"patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH 42", "model": "CARDIOHELP-i"}, "readings": [], "extra": 1}))
        .await
        .unwrap();
    assert_outcome(&answer, 422, &["/", "/device/serial", "/readings"]);

    // Reading-level schema problems and mapping problems come back together.
    let answer = vendor
        .post_json(
            &url,
            &batch(vec![
                reading("Flow", json!(4.2), "L/min"),
                reading("Flow", json!("4.2"), "L/min"),
                reading("Flw", json!(4.2), "L/min"),
                reading("Flow", json!(42.0), "L/min"),
                reading("PVen", json!(-60), "bar"),
                json!({"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": "21/11/2026 10:00"}),
                json!({"parameter": "Flow", "value": 4.2, "time": now_rfc3339()}),
            ]),
        )
        .await
        .unwrap();
    assert_outcome(
        &answer,
        422,
        &[
            "/readings/1/value",
            "/readings/2/parameter",
            "/readings/3/value",
            "/readings/4/unit",
            "/readings/5/time",
            "/readings/6/unit",
        ],
    );
    let texts: Vec<String> = answer.json()["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["details"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        texts[1].contains("'Flw'") && texts[1].contains("Flow"),
        "{texts:?}"
    );
    assert!(texts[2].contains("plausible range"), "{texts:?}");
    assert!(
        texts[3].contains("'bar'") && texts[3].contains("kPa"),
        "{texts:?}"
    );

    // A reading from a console whose clock runs an hour ahead.
    let future = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let answer = vendor
        .post_json(
            &url,
            &batch(vec![
                json!({"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": future}),
            ]),
        )
        .await
        .unwrap();
    assert_outcome(&answer, 422, &["/readings/0/time"]);

    // Times FHIR has no room for (year 0000, offsets beyond 14:00, minute 60) and readings
    // older than `max_past_age` (30 days in the tests): 422 at the time, never a 500.
    let stale = (time::OffsetDateTime::now_utc() - time::Duration::days(40))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for time in [
        "0000-06-01T10:00:00Z",
        "2026-11-21T10:15:00+15:00",
        "2026-11-21T10:15:00-14:01",
        "2026-11-21T10:15:00+01:60",
        stale.as_str(),
    ] {
        let answer = vendor
            .post_json(
                &url,
                &batch(vec![
                    json!({"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": time}),
                ]),
            )
            .await
            .unwrap();
        assert_outcome(&answer, 422, &["/readings/0/time"]);
    }

    // A model without a mapping table (owned by no vendor either: 403 comes first).
    let answer = vendor
        .post_json(&url, &json!({"patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-0042", "model": "CARDIOHELP-X"}, "readings": [reading("Flow", json!(4), "L/min")]}))
        .await
        .unwrap();
    assert_eq!(answer.status, 403);

    // Too large: 413, before the body is read.
    let big = "x".repeat(300 * 1024);
    let answer = vendor
        .send(
            Method::POST,
            &url,
            Some("application/json"),
            Bytes::from(big),
        )
        .await
        .unwrap();
    assert_outcome(&answer, 413, &[]);

    // Wrong method and unknown path.
    let answer = vendor.get(&url).await.unwrap();
    assert_outcome(&answer, 405, &[]);
    let answer = vendor.get(&s.gateway.url("/v1/readings")).await.unwrap();
    assert_outcome(&answer, 404, &[]);

    assert_eq!(
        s.ehr.ehr.count("Observation"),
        0,
        "a refused batch leaves no trace at the EHR"
    );
    // Refusals are logged without the values or identifiers that were sent. The 403 above is
    // logged; once that line is in, every earlier refusal's lines are too.
    assert!(
        s.gateway.wait_for_log("device not owned"),
        "{}",
        s.gateway.log_text()
    );
    let log = s.gateway.log_text_untimed();
    assert!(!log.contains("CH-0042") && !log.contains("42.0"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_lists_the_emitted_profiles() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let answer = s
        .pki
        .client(GETINGE)
        .get(&s.gateway.url("/metadata"))
        .await
        .unwrap()
        .expect_status(200);
    let capability = answer.json();
    assert_eq!(capability["resourceType"], "CapabilityStatement");
    assert_eq!(capability["fhirVersion"], "4.0.1");
    let observation = &capability["rest"][0]["resource"][0];
    assert_eq!(observation["type"], "Observation");
    assert_eq!(
        observation["supportedProfile"][0],
        "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-circuit-observation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_is_served_as_checked() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let vendor = s.pki.client(GETINGE);
    let answer = vendor
        .get(&s.gateway.url("/v1/schemas/observation-batch"))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "application/schema+json");
    let on_disk: Value = serde_json::from_str(include_str!(
        "../../../profiles/schemas/observation-batch.schema.json"
    ))
    .unwrap();
    assert_eq!(answer.json(), on_disk);
    let answer = vendor
        .get(&s.gateway.url("/v1/schemas/nothing"))
        .await
        .unwrap();
    assert_eq!(answer.status, 404);
}
