//! What the people who run the gateway rely on: logs a shipper can read (JSON lines, ids as
//! fields) that never carry a patient's identifier or a reading's value; probes an
//! orchestrator calls without a certificate; a stop that finishes what is in flight.

use std::time::{Duration, Instant};

use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::Fault;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, WriteStyle, admin_until, durable_config,
    durable_gateway, gateway_config, mtls_ehr,
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
    let ehr = mtls_ehr(&pki).await;
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
    let untimed = conformance_tests::harness::without_timestamps(&log);
    for secret in [PATIENT, VALUE, RUN] {
        assert!(!untimed.contains(secret), "'{secret}' in the log:\n{log}");
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

/// A log shipper that stops reading (a full pipe on the gateway's stderr) must not stop the
/// gateway: every request is still answered, and no line is lost once it reads again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_log_reader_holds_no_request_and_loses_no_line() {
    const REQUESTS: usize = 1500;
    const LINE: &str = "batch accepted into the outbox";
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"));
    let (resume, held) = std::sync::mpsc::channel();
    let gateway = GatewayProcess::start_with_log_held(&config, held).unwrap();
    let vendor = pki.client(GETINGE);
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(30);
    // About 250 bytes of log per request: several times the 64 KiB a pipe holds.
    let clients: Vec<_> = (0..8).map(|client| {
        let vendor = vendor.clone();
        let url = gateway.url("/v1/observations");
        tokio::spawn(async move {
            for n in (client..REQUESTS).step_by(8) {
                let t = (start + time::Duration::milliseconds(n as i64))
                    .format(&Rfc3339)
                    .unwrap();
                let batch = json!({
                    "device": {"serial": "CH-LOG", "model": "CARDIOHELP-i"},
                    "patient": {"system": MRN, "value": "MRN-LOG"},
                    "readings": [{"parameter": "Flow", "value": 4.1, "unit": "L/min", "time": t}]
                });
                vendor
                    .post_json(&url, &batch)
                    .await
                    .unwrap()
                    .expect_status(202);
            }
        })
    }).collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for client in clients {
            client.await.unwrap();
        }
    })
    .await
    .expect("requests held while nobody read the gateway's log");
    drop(resume);
    assert_eq!(gateway.wait_for_log_lines(LINE, REQUESTS), REQUESTS);
}

/// `GET path` over plain HTTP/1.1: (status, body).
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_need_no_certificate_and_shutdown_finishes_the_requests_in_flight() {
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    // Direct delivery: the vendor's request waits for the EHR, so it is in flight for as long
    // as the EHR takes.
    let config = gateway_config(
        &pki,
        &ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    )
    .replace("[server]\n", "[server]\nshutdown_timeout = \"8s\"\n")
        + "\n[probes]\nlisten = \"127.0.0.1:0\"\n";
    let mut gateway = GatewayProcess::start(&config).unwrap();
    let probes = gateway.probes.expect("probe listener");
    assert_eq!(
        plain_get(probes, "/livez").await,
        (200, r#"{"status":"alive"}"#.to_owned())
    );
    // Ready once it has marked itself serving, a moment after its listener is up: polled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut ready = plain_get(probes, "/readyz").await;
    while ready.0 != 200 && std::time::Instant::now() < deadline {
        assert_eq!(
            ready,
            (
                503,
                r#"{"status":"not ready","reason":"starting"}"#.to_owned()
            )
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ready = plain_get(probes, "/readyz").await;
    }
    assert_eq!(ready, (200, r#"{"status":"ready"}"#.to_owned()));
    assert_eq!(
        plain_get(probes, "/admin/v1/queues").await.0,
        404,
        "nothing else there"
    );

    // A request in flight when the orchestrator stops the gateway.
    ehr.ehr
        .fail_next(Fault::delay(Duration::from_millis(1500)), 1);
    let batch = SimulatedCardiohelp::new("CH-S1", 41).next_batch(OffsetDateTime::now_utc());
    let vendor = pki.client(GETINGE);
    let url = gateway.url("/v1/observations");
    let in_flight = tokio::spawn(async move { vendor.post_json(&url, &batch).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while ehr.ehr.max_concurrent_writes() == 0 {
        assert!(Instant::now() < deadline, "the write never reached the EHR");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.sigterm();
    // Not ready from then on; alive until it exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = plain_get(probes, "/readyz").await;
        if status == 503 {
            assert_eq!(body, r#"{"status":"not ready","reason":"shutting down"}"#);
            break;
        }
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No new connections; the one in flight gets its answer, and the EHR the data.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(gateway.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = in_flight.await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.json());
    assert_eq!(ehr.ehr.count("Observation"), 12);
    let status = tokio::task::spawn_blocking(move || {
        let status = gateway.wait_exit(Duration::from_secs(15));
        (status, gateway.log_text())
    })
    .await
    .unwrap();
    assert!(
        status.0.is_some_and(|s| s.success()),
        "{:?}\n{}",
        status.0,
        status.1
    );
    assert!(status.1.contains("gateway stopped"), "{}", status.1);
}

/// One sample's value in OpenMetrics text, by its name and labels as written.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_happened_and_name_no_patient() {
    let (pki, ehr, _dir, gateway) = durable_gateway("").await;
    let vendor = pki.client(GETINGE);
    let t = (OffsetDateTime::now_utc() - time::Duration::minutes(5))
        .format(&Rfc3339)
        .unwrap();
    let batch = |value: f64, unit: &str| {
        json!({
            "device": {"serial": "CH-M1", "model": "CARDIOHELP-i"},
            "patient": {"system": MRN, "value": PATIENT},
            "readings": [{"parameter": "Flow", "value": value, "unit": unit, "time": t}]
        })
    };
    // The EHR refuses the first write once: a retry, then delivered.
    ehr.ehr.fail_next(Fault::status(503), 1);
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch(4.1, "L/min"))
        .await
        .unwrap()
        .expect_status(202);
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch(4.1, "furlongs"))
        .await
        .unwrap()
        .expect_status(422);
    let admin = pki.client(ADMIN);
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| {
        q["destinations"][0]["pending"] == 0
    })
    .await;
    let answer = admin
        .get(&gateway.admin_url("/metrics"))
        .await
        .unwrap()
        .expect_status(200);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} not in:\n{text}"));
    assert_eq!(
        value(r#"ecmo_ingest_requests_total{route="/v1/observations",status="202"}"#),
        1.0
    );
    assert_eq!(
        value(r#"ecmo_ingest_requests_total{route="/v1/observations",status="422"}"#),
        1.0
    );
    assert_eq!(
        value(r#"ecmo_ingest_resources_total{vendor="getinge",resource_type="Observation"}"#),
        1.0
    );
    // The Observation, the console's description and the Provenance.
    let messages = 2.0 + conformance_tests::harness::description_of("CARDIOHELP-i") as f64;
    assert_eq!(
        value(r#"ecmo_deliveries_total{destination="ehr",outcome="retry"}"#),
        messages,
        "each message, once"
    );
    assert_eq!(
        value(r#"ecmo_deliveries_total{destination="ehr",outcome="delivered"}"#),
        messages
    );
    assert_eq!(
        value(r#"ecmo_delivery_requests_total{destination="ehr",status="5xx"}"#),
        1.0
    );
    assert!(value(r#"ecmo_delivery_requests_total{destination="ehr",status="2xx"}"#) >= 1.0);
    assert_eq!(value(r#"ecmo_outbox_pending{destination="ehr"}"#), 0.0);
    assert_eq!(value(r#"ecmo_outbox_dead{destination="ehr"}"#), 0.0);
    assert_eq!(value("ecmo_handoff_duration_seconds_count"), 1.0);
    assert!(
        value(
            r#"ecmo_certificate_expiry_days{role="server",subject="CN=localhost, O=ECMO gateway test PKI"}"#
        ) > 30.0
    );
    for secret in [PATIENT, "CH-M1", "4.1"] {
        assert!(!text.contains(secret), "'{secret}' in the metrics");
    }
    // Operators' only: a vendor's certificate gets 403.
    assert_eq!(
        vendor
            .get(&gateway.admin_url("/metrics"))
            .await
            .unwrap()
            .status,
        403
    );
}
