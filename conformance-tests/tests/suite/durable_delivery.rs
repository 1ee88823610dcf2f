//! The outbox's promise, proven with real processes and sockets: once the gateway says 202, the
//! EHR gets the data exactly once, through kill -9, EHR errors, dropped connections, outages
//! and refusals; every accepted message ends delivered or dead-lettered, and the counts add up.
//! And what the EHR then holds is what the device last said: corrections amend (or are refused
//! where a destination takes none), resends change nothing, repeats in one request are merged,
//! and per resource the EHR gets the versions in acceptance order even when an attempt fails.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::smart::RegisteredClient;
use conformance_tests::ehr::{Fault, ReferenceEhr, RunningEhr};
use conformance_tests::harness::{
    ADMIN, EhrReader, GETINGE, GatewayProcess, SPECTRUM, TestPki, WriteStyle,
    assert_each_held_once, description_of, durable_config, durable_gateway, gateway_config,
    mtls_ehr, now_rfc3339, wait_until_settled, with_outbox,
};
use gateway::delivery::smart::keys::SigningKeys;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};
use time::OffsetDateTime;

async fn start_ehr(pki: &TestPki) -> RunningEhr {
    mtls_ehr(pki).await
}

fn identifiers(batch: &Value, family: &str) -> Vec<String> {
    // The gateway's identifier: family:serial:code:UTC; read back from the receipt instead of
    // recomputing it, so the test does not re-implement the mapping.
    let _ = family;
    batch["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["identifier"]["value"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_readings_reach_the_ehr_exactly_once_across_kill_9() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"));
    let mut accepted: HashSet<String> = HashSet::new();
    let mut clock = OffsetDateTime::now_utc() - time::Duration::hours(6);

    // Kill the gateway at several points: right after start, mid-stream, while the EHR is slow
    // (deliveries in flight), and while the EHR is failing (messages waiting for a retry).
    for (round, (stream_for, ehr_trouble)) in [
        (Duration::from_millis(300), None),
        (
            Duration::from_millis(700),
            Some(Fault::delay(Duration::from_millis(400))),
        ),
        (Duration::from_millis(500), Some(Fault::status(503))),
        (Duration::from_millis(50), None),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(fault) = ehr_trouble {
            ehr.ehr.fail_next(fault, 4);
        }
        // In the third round a third of all writes also fail, at random.
        ehr.ehr
            .fail_fraction(Fault::status(503), if round == 2 { 0.33 } else { 0.0 });
        let gateway = GatewayProcess::start(&config).unwrap();
        let url = gateway.url("/v1/observations");
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..2 {
            let vendor = pki.client(GETINGE);
            let url = url.clone();
            let mut console = SimulatedCardiohelp::new(
                &format!("CH-{round}{client}"),
                (round * 10 + client) as u64,
            );
            let start = clock;
            tasks.spawn(async move {
                let mut ok = Vec::new();
                for n in 0..1000 {
                    let batch = console.next_batch(start + time::Duration::seconds(n));
                    match vendor.post_json(&url, &batch).await {
                        Ok(answer) if answer.status == 202 => ok.push(answer.json()),
                        Ok(answer) => panic!(
                            "unexpected {}: {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body)
                        ),
                        Err(_) => break, // the gateway died under us: not accepted
                    }
                }
                ok
            });
        }
        tokio::time::sleep(stream_for).await;
        gateway.kill9();
        while let Some(done) = tasks.join_next().await {
            for receipt in done.unwrap() {
                accepted.extend(identifiers(&receipt, "getinge-cardiohelp"));
            }
        }
        clock += time::Duration::seconds(1000);
    }
    assert!(
        accepted.len() > 100,
        "the test must have accepted something: {}",
        accepted.len()
    );

    // A last start delivers whatever was still pending.
    let gateway = GatewayProcess::start(&config).unwrap();
    let admin = pki.client(ADMIN);
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(60)).await;
    let ehr_stats = &queues["destinations"][0];
    assert_eq!(ehr_stats["dead"], 0, "{queues}");
    assert_eq!(ehr_stats["accepted"], ehr_stats["delivered"], "{queues}");

    assert_each_held_once(&ehr.ehr, &accepted);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_dropped_connections_and_an_outage_are_ridden_out() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let ehr_addr = ehr.addr;
    let store = ehr.ehr.clone();
    let dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::start(&durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ))
    .unwrap();

    store.fail_next(Fault::status(503).retry_after(1), 2);
    store.fail_next(Fault::drop_connection(), 2);
    store.fail_next(Fault::status(500), 1);
    let vendor = pki.client(GETINGE);
    let mut console = SimulatedCardiohelp::new("CH-0042", 9);
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    for n in 0..3 {
        vendor
            .post_json(
                &gateway.url("/v1/observations"),
                &console.next_batch(start + time::Duration::seconds(n)),
            )
            .await
            .unwrap()
            .expect_status(202);
    }

    // Then the EHR goes away for a while; batches are still accepted.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(ehr);
    for n in 3..5 {
        vendor
            .post_json(
                &gateway.url("/v1/observations"),
                &console.next_batch(start + time::Duration::seconds(n)),
            )
            .await
            .unwrap()
            .expect_status(202);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _back = store
        .clone()
        .start(pki.ehr_tls("ca.pem"), ehr_addr)
        .await
        .unwrap();

    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(60)).await;
    let stats = &queues["destinations"][0];
    assert_eq!(
        (
            stats["accepted"].as_u64(),
            stats["delivered"].as_u64(),
            stats["dead"].as_u64()
        ),
        // 60 readings, the console's description and one Provenance per request.
        (
            Some(65 + description_of("CARDIOHELP-i")),
            Some(65 + description_of("CARDIOHELP-i")),
            Some(0)
        ),
        "{queues}"
    );
    assert_eq!(store.count("Observation"), 60);
    assert_eq!(store.count("Provenance"), 5);
    assert!(
        store
            .identifier_counts("Observation")
            .values()
            .all(|&n| n == 1)
    );

    // Retry-After was honoured: no write came sooner than the EHR asked.
    let writes = store.writes();
    for pair in writes.windows(2) {
        if let Some(seconds) = pair[0].retry_after {
            let gap = pair[1].arrived - pair[0].arrived;
            assert!(
                gap >= Duration::from_millis(seconds as u64 * 1000 - 50),
                "retried after {gap:?}, asked for {seconds} s"
            );
        }
    }
}

/// One write at a time (`bundle = "single"`): a 503 with `Retry-After` stops the rest of the
/// batch, which waits the pause out with the message that met it instead of being sent after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_write_destination_waits_out_retry_after_with_the_whole_batch() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let store = ehr.ehr.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = with_outbox(
        &gateway_config(
            &pki,
            &ehr.base_url,
            WriteStyle::SINGLE_CONDITIONAL,
            "gateway-client",
        ),
        &dir.path().join("outbox.sqlite"),
    );
    store.fail_next(Fault::status(503).retry_after(1), 1);
    let gateway = GatewayProcess::start(&config).unwrap();
    let mut console = SimulatedCardiohelp::new("CH-0043", 11);
    pki.client(GETINGE)
        .post_json(
            &gateway.url("/v1/observations"),
            &console.next_batch(OffsetDateTime::now_utc() - time::Duration::minutes(5)),
        )
        .await
        .unwrap()
        .expect_status(202);

    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(60)).await;
    let stats = &queues["destinations"][0];
    assert_eq!(stats["dead"], 0, "{queues}");
    assert_eq!(stats["accepted"], stats["delivered"], "{queues}");
    assert_eq!(store.count("Observation"), 12);
    let writes = store.writes();
    assert_eq!(
        writes[0].retry_after,
        Some(1),
        "the first write met the fault"
    );
    let gap = writes[1].arrived - writes[0].arrived;
    assert!(
        gap >= Duration::from_millis(950),
        "the next write came {gap:?} after a 503 asking for 1 s ({} writes)",
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_resource_is_dead_lettered_the_rest_flow_and_replay_delivers_it() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    ehr.ehr.reject_identifiers_containing(":pump-speed:");
    let dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::start(&durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ))
    .unwrap();
    let batch = SimulatedCardiohelp::new("CH-0042", 5).next_batch(OffsetDateTime::now_utc());
    let receipt = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let tracking_id = receipt["trackingId"].as_str().unwrap().to_owned();
    assert_eq!(receipt["status"], "accepted");

    let admin = pki.client(ADMIN);
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    // 11 readings, the console's description and the request's Provenance.
    assert_eq!(
        queues["destinations"][0]["delivered"],
        12 + description_of("CARDIOHELP-i"),
        "{queues}"
    );
    assert_eq!(queues["destinations"][0]["dead"], 1, "{queues}");
    assert_eq!(
        ehr.ehr.count("Observation"),
        11,
        "the other readings were not held back"
    );

    let status = admin
        .get(&gateway.admin_url(&format!("/admin/v1/deliveries/{tracking_id}")))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    assert_eq!(status["complete"], true);
    let states: Vec<&str> = status["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.iter().filter(|s| **s == "dead").count(), 1);
    assert!(status["messages"].as_array().unwrap().iter().any(|m| {
        m["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("Observation/"))
    }));

    let dead = admin
        .get(&gateway.admin_url("/admin/v1/dead-letters"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let letter = &dead["deadLetters"][0];
    assert!(
        letter["identifier"]
            .as_str()
            .unwrap()
            .contains(":pump-speed:")
    );
    assert!(letter["error"].as_str().unwrap().contains("422"));
    let words = letter["outcome"]["issue"][0]["details"]["text"]
        .as_str()
        .unwrap();
    assert!(
        words.contains("does not accept"),
        "the EHR's OperationOutcome is kept: {words}"
    );

    // The operator fixes the cause and replays it from the command line.
    ehr.ehr.clear_rejections();
    let bin = conformance_tests::harness::gateway_binary().unwrap();
    let p = |f: &str| pki.path(f);
    let replay = std::process::Command::new(bin)
        .args(["deliveries", "--admin-url", &gateway.admin_url(""), "--ca"])
        .arg(p("ca.pem"))
        .arg("--cert")
        .arg(p("admin.pem"))
        .arg("--key")
        .arg(p("admin.key"))
        .args(["replay", &letter["messageId"].to_string()])
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    assert_eq!(
        (
            queues["destinations"][0]["delivered"].as_u64(),
            queues["destinations"][0]["dead"].as_u64()
        ),
        (Some(13 + description_of("CARDIOHELP-i")), Some(0))
    );
    assert_eq!(ehr.ehr.count("Observation"), 12);
    assert_eq!(ehr.ehr.count("Provenance"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_is_for_admins_only_and_reports_health() {
    let (pki, _ehr, _dir, gateway) = durable_gateway("").await;
    let vendor_on_admin = pki
        .client(GETINGE)
        .get(&gateway.admin_url("/admin/v1/queues"))
        .await
        .unwrap();
    assert_eq!(vendor_on_admin.status, 403);
    assert_eq!(vendor_on_admin.json()["issue"][0]["code"], "security");
    let admin = pki.client(ADMIN);
    assert_eq!(
        admin
            .get(&gateway.admin_url("/healthz"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        admin
            .get(&gateway.admin_url("/readyz"))
            .await
            .unwrap()
            .json()["status"],
        "ready"
    );
    let unknown = admin
        .get(&gateway.admin_url("/admin/v1/deliveries/no-such-id"))
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    // The admin certificate is not a vendor: it cannot post readings.
    let answer = admin
        .post_json(&gateway.url("/v1/observations"), &json!({"patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-1", "model": "CARDIOHELP-i"}, "readings": [{"parameter": "Flow", "value": 4, "unit": "L/min", "time": now_rfc3339()}]}))
        .await
        .unwrap();
    assert_eq!(answer.status, 403);

    // A console whose clock runs 90 s behind, and one 10 min ahead (refused, still measured).
    let behind = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(90));
    let ahead = rfc3339(OffsetDateTime::now_utc() + time::Duration::minutes(10));
    post(&pki, &gateway, &flows("CH-SK1", &[(4.0, &behind)]))
        .await
        .expect_status(202);
    post(&pki, &gateway, &flows("CH-SK2", &[(4.0, &ahead)]))
        .await
        .expect_status(422);
    let devices = admin
        .get(&gateway.admin_url("/admin/v1/devices"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let skew = |device: &str| {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == device)
            .unwrap_or_else(|| panic!("{device} in {devices}"))["lastSkewMs"]
            .as_i64()
            .unwrap()
    };
    let behind = skew("getinge-cardiohelp:CH-SK1");
    assert!((90_000..100_000).contains(&behind), "{devices}");
    let ahead = skew("getinge-cardiohelp:CH-SK2");
    assert!((-600_000..-590_000).contains(&ahead), "{devices}");
    let vendor_view = pki
        .client(GETINGE)
        .get(&gateway.admin_url("/admin/v1/devices"))
        .await;
    assert!(
        vendor_view.map_or(true, |answer| answer.status == 403),
        "vendors do not see other devices"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_destination_does_not_hold_up_the_others_and_routing_applies() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    // The registry is down from the start (nothing listens on its port) and takes only Getinge data.
    let registry_url = {
        let gone = start_ehr(&pki).await;
        gone.base_url.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        + &format!(
            "\n[[destination]]\nname = \"registry\"\nbase_url = \"{registry_url}\"\nca = [\"{ca}\"]\nclient_cert = \"{cert}\"\nclient_key = \"{key}\"\ntimeout = \"1s\"\nmax_attempts = 1\nbreaker_cooldown = \"300ms\"\n\n[destination.only]\nvendors = [\"getinge\"]\n",
            ca = pki.path("ca.pem").display(),
            cert = pki.path("gateway-client.pem").display(),
            key = pki.path("gateway-client.key").display(),
        );
    let gateway = GatewayProcess::start(&config).unwrap();
    let getinge = SimulatedCardiohelp::new("CH-0042", 1).next_batch(OffsetDateTime::now_utc());
    let receipt = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &getinge)
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert!(
        receipt["resources"][0]["messages"]["registry"].is_number(),
        "routed to the registry too"
    );
    let spectrum = json!({"patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "M4-7001", "model": "M4"}, "readings": [{"parameter": "Hb", "value": 10.1, "unit": "g/dL", "time": now_rfc3339()}]});
    let receipt = pki
        .client(SPECTRUM)
        .post_json(&gateway.url("/v1/observations"), &spectrum)
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert!(
        receipt["resources"][0]["messages"]["registry"].is_null(),
        "the registry takes only Getinge data"
    );

    // The EHR gets everything promptly while the registry's queue waits.
    let deadline = Instant::now() + Duration::from_secs(20);
    while ehr.ehr.count("Observation") < 13 {
        assert!(
            Instant::now() < deadline,
            "the EHR was held up: {}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queues = pki
        .client(ADMIN)
        .get(&gateway.admin_url("/admin/v1/queues"))
        .await
        .unwrap()
        .json();
    let registry = queues["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "registry")
        .unwrap()
        .clone();
    // 12 readings, the console's description and the Provenance.
    let expected = 13 + description_of("CARDIOHELP-i");
    assert_eq!(registry["accepted"], expected);
    assert_eq!(registry["pending"], expected);
    assert!(registry["oldestPendingSeconds"].as_f64().is_some());
}

// === Data integrity: what the EHR holds is what the device last said, once, in order ===

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn reader(pki: &TestPki, ehr: &RunningEhr) -> EhrReader {
    EhrReader {
        client: pki.client("gateway-client"),
        base_url: ehr.base_url.clone(),
    }
}

/// A batch of Flow readings `(value, time)` from console `serial`.
fn flows(serial: &str, readings: &[(f64, &str)]) -> Value {
    json!({
        "device": {"serial": serial, "model": "CARDIOHELP-i"},
        "patient": {"system": MRN, "value": format!("MRN-{serial}")},
        "readings": readings.iter().map(|(value, time)| json!(
            {"parameter": "Flow", "value": value, "unit": "L/min", "time": time}
        )).collect::<Vec<_>>()
    })
}

async fn post(
    pki: &TestPki,
    gateway: &GatewayProcess,
    batch: &Value,
) -> conformance_tests::client::Answer {
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), batch)
        .await
        .unwrap()
}

/// The one Observation the EHR holds for `identifier`, and its versions, newest first.
async fn stored_with_history(reader: &EhrReader, identifier: &str) -> (Value, Vec<Value>) {
    let found = reader
        .by_identifier("Observation", OBSERVATIONS, identifier)
        .await
        .unwrap();
    assert_eq!(
        found.len(),
        1,
        "exactly one Observation for {identifier}: {found:?}"
    );
    let id = found[0]["id"].as_str().unwrap();
    let history = reader.history("Observation", id).await.unwrap();
    (found[0].clone(), history)
}

const OBSERVATIONS: &str = "https://fhir.ecmo-gateway.org/sid/observation";

fn flow_value(observation: &Value) -> f64 {
    observation["valueQuantity"]["value"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrected_reading_amends_the_ehr_and_a_resend_changes_nothing() {
    let (pki, ehr, dir, gateway) = durable_gateway("").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let time = now_rfc3339();

    let first = post(&pki, &gateway, &flows("CH-C1", &[(4.2, &time)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(first["resources"][0]["dispositions"]["ehr"], "created");
    let identifier = first["resources"][0]["identifier"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;

    // The same reading again: accepted, nothing new reaches the EHR.
    let resend = post(&pki, &gateway, &flows("CH-C1", &[(4.2, &time)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(resend["resources"][0]["dispositions"]["ehr"], "unchanged");
    assert_eq!(
        resend["resources"][0]["messages"]["ehr"],
        first["resources"][0]["messages"]["ehr"]
    );

    // A late calibration: same device, parameter and time, another value.
    let correction = post(&pki, &gateway, &flows("CH-C1", &[(4.5, &time)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(correction["resources"][0]["dispositions"]["ehr"], "amended");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;

    let (stored, history) = stored_with_history(&reader, &identifier).await;
    assert_eq!(flow_value(&stored), 4.5);
    assert_eq!(stored["status"], "amended");
    assert_eq!(stored["meta"]["versionId"], "2");
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["status"], "final");
    assert_eq!(
        flow_value(&history[1]),
        4.2,
        "the earlier version stays in the history"
    );

    // The delivery record says what happened.
    let tracking_id = correction["trackingId"].as_str().unwrap();
    let status = admin
        .get(&gateway.admin_url(&format!("/admin/v1/deliveries/{tracking_id}")))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    assert_eq!(status["messages"][0]["disposition"], "amended");
    assert_eq!(status["messages"][0]["state"], "delivered");
    assert!(
        status["messages"][0]["location"]
            .as_str()
            .unwrap()
            .ends_with("/_history/2")
    );

    // The corrected value sent again is a no-op too, even across a restart.
    drop(gateway);
    let gateway = GatewayProcess::start(&durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ))
    .unwrap();
    let again = post(&pki, &gateway, &flows("CH-C1", &[(4.5, &time)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(again["resources"][0]["dispositions"]["ehr"], "unchanged");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (_, history) = stored_with_history(&reader, &identifier).await;
    assert_eq!(history.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_that_takes_no_corrections_gets_none_and_the_device_hears_409() {
    let (pki, ehr, _dir, gateway) = durable_gateway("corrections = \"reject\"\n").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let (t1, t2) = (
        now_rfc3339(),
        rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(1)),
    );

    let first = post(&pki, &gateway, &flows("CH-R1", &[(4.2, &t1)]))
        .await
        .expect_status(202)
        .json();
    let identifier = first["resources"][0]["identifier"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;

    // A new reading next to a correction: the whole request is refused, naming the correction.
    let refused = post(&pki, &gateway, &flows("CH-R1", &[(3.9, &t2), (4.5, &t1)])).await;
    let outcome = refused.expect_status(409).json();
    let issues = outcome["issue"].as_array().unwrap();
    assert_eq!(issues.len(), 1, "{outcome}");
    assert_eq!(issues[0]["code"], "conflict");
    assert_eq!(issues[0]["expression"][0], "/readings/1");
    assert!(
        issues[0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("does not take corrections")
    );

    // The identical resend is still fine, and the EHR never saw the correction.
    let resend = post(&pki, &gateway, &flows("CH-R1", &[(4.2, &t1)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(resend["resources"][0]["dispositions"]["ehr"], "unchanged");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &identifier).await;
    assert_eq!((flow_value(&stored), history.len()), (4.2, 1));
    assert_eq!(stored["status"], "final");
    assert_eq!(
        ehr.ehr.count("Observation"),
        1,
        "nothing of the refused request was sent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repeats_in_one_request_are_merged_and_contradictions_refused_naming_both() {
    let (pki, ehr, _dir, gateway) = durable_gateway("").await;
    let admin = pki.client(ADMIN);
    let times: Vec<String> = (0..5)
        .map(|n| rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(n)))
        .collect();
    // 1,000 readings, 5 distinct: a console replaying its buffer.
    let readings: Vec<(f64, &str)> = (0..1000).map(|n| (4.0, times[n % 5].as_str())).collect();
    let receipt = post(&pki, &gateway, &flows("CH-D1", &readings))
        .await
        .expect_status(202)
        .json();
    assert_eq!(receipt["resources"].as_array().unwrap().len(), 5);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    assert_eq!(ehr.ehr.count("Observation"), 5);
    let writes = ehr.ehr.writes();
    assert!(
        writes.iter().all(|w| w.status < 300),
        "the EHR refused nothing: {:?}",
        writes.iter().map(|w| w.status).collect::<Vec<_>>()
    );
    assert_eq!(
        writes.len(),
        1,
        "one transaction, not a fallback to single writes"
    );

    // Two values for one reading in one request: 422 naming both, nothing accepted.
    let answer = post(
        &pki,
        &gateway,
        &flows(
            "CH-D2",
            &[(4.0, &times[0]), (3.0, &times[1]), (4.1, &times[0])],
        ),
    )
    .await;
    let outcome = answer.expect_status(422).json();
    assert_eq!(outcome["issue"][0]["code"], "duplicate");
    assert_eq!(
        outcome["issue"][0]["expression"],
        json!(["/readings/0", "/readings/2"])
    );
    assert_eq!(ehr.ehr.count("Observation"), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_resource_order_holds_when_an_attempt_fails() {
    let (pki, ehr, _dir, gateway) = durable_gateway("").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let time = now_rfc3339();

    // The original fails once at the EHR and waits for its retry; the correction, accepted
    // meanwhile, must not overtake it.
    ehr.ehr.fail_next(Fault::status(503), 1);
    let first = post(&pki, &gateway, &flows("CH-O1", &[(4.2, &time)]))
        .await
        .expect_status(202)
        .json();
    let identifier = first["resources"][0]["identifier"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ehr.ehr.writes().is_empty() {
        assert!(Instant::now() < deadline, "the first attempt never came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    post(&pki, &gateway, &flows("CH-O1", &[(4.5, &time)]))
        .await
        .expect_status(202);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &identifier).await;
    assert_eq!(
        flow_value(&stored),
        4.5,
        "the last value said is the one held"
    );
    let values: Vec<f64> = history.iter().rev().map(flow_value).collect();
    assert_eq!(values, [4.2, 4.5], "versions in acceptance order");

    // A run: the first state fails once; the newer one must land after it, never before.
    let run = "ORDER-1";
    let started = rfc3339(OffsetDateTime::now_utc() - time::Duration::hours(2));
    let events = |body: Value| {
        let client = pki.client(GETINGE);
        let url = gateway.url(&format!("/v1/runs/{run}/events"));
        async move { client.post_json(&url, &body).await.unwrap() }
    };
    let writes_before = ehr.ehr.writes().len();
    ehr.ehr.fail_next(Fault::status(503), 1);
    events(json!({
        "eventId": "s", "type": "started", "time": started,
        "patient": {"system": MRN, "value": "MRN-ORDER"}, "mode": "vv",
        "console": {"serial": "CH-O2", "model": "CARDIOHELP-i"}
    }))
    .await
    .expect_status(202);
    while ehr.ehr.writes().len() == writes_before {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "no attempt"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    events(json!({
        "eventId": "c", "type": "complication", "time": now_rfc3339(),
        "complication": {"code": "1386000", "display": "Intracranial hemorrhage"}
    }))
    .await
    .expect_status(202);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let procedures = reader
        .by_identifier(
            "Procedure",
            "https://fhir.ecmo-gateway.org/sid/ecmo-run",
            run,
        )
        .await
        .unwrap();
    assert_eq!(procedures.len(), 1);
    assert_eq!(
        procedures[0]["complication"][0]["coding"][0]["code"], "1386000",
        "the newest state is the one held: {}",
        procedures[0]
    );
    let history = reader
        .history("Procedure", procedures[0]["id"].as_str().unwrap())
        .await
        .unwrap();
    let with_complication: Vec<bool> = history
        .iter()
        .rev()
        .map(|v| v["complication"].is_array())
        .collect();
    assert_eq!(
        with_complication,
        [false, true],
        "never back to an older state"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_or_an_operator_takes_a_reading_back_as_entered_in_error() {
    let (pki, ehr, _dir, gateway) = durable_gateway("").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let (t1, t2) = (
        now_rfc3339(),
        rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(1)),
    );
    let first = post(&pki, &gateway, &flows("CH-E1", &[(4.2, &t1), (4.3, &t2)]))
        .await
        .expect_status(202)
        .json();
    let identifier = |i: usize| {
        first["resources"][i]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let url = gateway.url("/v1/observations/entered-in-error");
    let retraction = |time: &str| {
        json!({"device": {"serial": "CH-E1", "model": "CARDIOHELP-i"},
               "readings": [{"parameter": "Flow", "time": time}]})
    };

    // The device takes the first back.
    let answer = pki
        .client(GETINGE)
        .post_json(&url, &retraction(&t1))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(answer["resources"][0]["dispositions"]["ehr"], "retracted");
    assert_eq!(answer["resources"][0]["identifier"]["value"], identifier(0));
    // Again: harmless.
    let again = pki
        .client(GETINGE)
        .post_json(&url, &retraction(&t1))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(again["resources"][0]["dispositions"]["ehr"], "unchanged");
    // A reading never sent: 404 naming it; a device of another vendor: 403.
    let never = rfc3339(OffsetDateTime::now_utc() - time::Duration::hours(1));
    let outcome = pki
        .client(GETINGE)
        .post_json(&url, &retraction(&never))
        .await
        .unwrap()
        .expect_status(404)
        .json();
    assert_eq!(outcome["issue"][0]["expression"][0], "/readings/0");
    let foreign = pki
        .client(SPECTRUM)
        .post_json(&url, &retraction(&t1))
        .await
        .unwrap();
    assert_eq!(foreign.status, 403);

    // An operator takes the second back through the admin API; a reason longer than the
    // retraction schema allows is refused, naming it, and takes nothing back.
    let path = format!("/admin/v1/observations/{}/entered-in-error", identifier(1));
    let too_long = admin
        .post_json(
            &gateway.admin_url(&format!("{path}?reason={}", "x".repeat(501))),
            &json!({}),
        )
        .await
        .unwrap()
        .expect_status(400)
        .json();
    assert_eq!(
        too_long["issue"][0]["expression"][0], "reason",
        "{too_long}"
    );
    let bad_limit = admin
        .get(&gateway.admin_url("/admin/v1/dead-letters?limit=many"))
        .await
        .unwrap()
        .expect_status(400)
        .json();
    assert_eq!(
        bad_limit["issue"][0]["expression"][0], "limit",
        "{bad_limit}"
    );
    let by_operator = admin
        .post_json(&gateway.admin_url(&path), &json!({}))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(
        by_operator["destinations"]["ehr"]["disposition"],
        "retracted"
    );
    let unknown = admin
        .post_json(
            &gateway.admin_url("/admin/v1/observations/no-such-reading/entered-in-error"),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);

    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    for i in 0..2 {
        let (stored, history) = stored_with_history(&reader, &identifier(i)).await;
        assert_eq!(stored["status"], "entered-in-error", "{stored}");
        assert_eq!(history.len(), 2, "the value stays in the history");
        assert_eq!(history[1]["status"], "final");
    }
    // A resend of the retracted value does not bring it back.
    let resend = post(&pki, &gateway, &flows("CH-E1", &[(4.2, &t1)]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(resend["resources"][0]["dispositions"]["ehr"], "unchanged");
}

/// The Provenances the EHR holds whose key (`meta.tag`) starts with `tracking_id`.
async fn provenances_of(reader: &EhrReader, tracking_id: &str) -> Vec<Value> {
    reader
        .all("Provenance")
        .await
        .unwrap()
        .into_iter()
        .filter(|p| {
            p["meta"]["tag"][0]["code"]
                .as_str()
                .is_some_and(|code| code.starts_with(&format!("{tracking_id}.")))
        })
        .collect()
}

fn target_values(provenance: &Value) -> Vec<String> {
    provenance["target"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["identifier"]["value"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_write_is_traced_to_its_device_sender_table_and_build_exactly_once() {
    let (pki, ehr, _dir, gateway) = durable_gateway("").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let (t1, t2) = (
        now_rfc3339(),
        rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(1)),
    );
    let mut batch = flows("CH-P1", &[(4.2, &t1), (4.3, &t2)]);
    batch["device"]["firmware"] = json!("5.1.2");

    // The first answer is lost after the EHR stored the transaction: the retry must not write
    // a second Provenance (nor a second Observation).
    ehr.ehr.fail_next(Fault::lose_answer(), 1);
    let first = post(&pki, &gateway, &batch).await.expect_status(202).json();
    let tracking_id = first["trackingId"].as_str().unwrap().to_owned();
    let identifier = |i: usize| {
        first["resources"][i]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let created = provenances_of(&reader, &tracking_id).await;
    assert_eq!(created.len(), 1, "{created:?}");
    let p = &created[0];
    assert_eq!(p["activity"]["coding"][0]["code"], "CREATE");
    // It traces the readings, and the console's description written with them.
    let (mut targets, metrics): (Vec<String>, Vec<String>) = target_values(p)
        .into_iter()
        .partition(|t| t.starts_with("getinge-cardiohelp:"));
    targets.sort();
    let mut expected = vec![identifier(0), identifier(1)];
    expected.sort();
    assert_eq!(targets, expected);
    assert_eq!(metrics.len() as u64, description_of("CARDIOHELP-i"));
    assert!(
        metrics.iter().all(|m| m.starts_with("CH-P1:")),
        "{metrics:?}"
    );
    assert!(p["recorded"].as_str().unwrap().ends_with('Z'));
    assert_eq!(p["agent"][0]["type"]["coding"][0]["code"], "author");
    assert_eq!(p["agent"][0]["who"]["identifier"]["value"], "CH-P1");
    assert_eq!(
        p["agent"][0]["who"]["display"],
        "CARDIOHELP-i CH-P1, firmware 5.1.2"
    );
    assert_eq!(p["agent"][1]["type"]["coding"][0]["code"], "transmitter");
    assert_eq!(p["agent"][1]["who"]["identifier"]["value"], "getinge");
    assert!(
        p["agent"][1]["who"]["display"]
            .as_str()
            .unwrap()
            .contains("client certificate getinge")
    );
    assert_eq!(p["agent"][2]["type"]["coding"][0]["code"], "assembler");
    assert!(
        p["agent"][2]["who"]["identifier"]["value"]
            .as_str()
            .unwrap()
            .starts_with("ecmo-gateway/")
    );
    let policy = p["policy"][0].as_str().unwrap();
    assert!(
        policy.starts_with("https://fhir.ecmo-gateway.org/mappings/getinge-cardiohelp/sha256:"),
        "{policy}"
    );
    assert_eq!(p["entity"][0]["what"]["identifier"]["value"], tracking_id);
    assert_eq!(ehr.ehr.count("Observation"), 2);

    // A resend changes nothing, so it is traced by nothing new.
    let resend = post(&pki, &gateway, &batch).await.expect_status(202).json();
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let resend_id = resend["trackingId"].as_str().unwrap();
    assert!(provenances_of(&reader, resend_id).await.is_empty());

    // A correction is traced with its reason.
    let mut corrected = flows("CH-P1", &[(4.6, &t1)]);
    corrected["device"]["firmware"] = json!("5.1.2");
    let correction = post(&pki, &gateway, &corrected)
        .await
        .expect_status(202)
        .json();
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let amended = provenances_of(&reader, correction["trackingId"].as_str().unwrap()).await;
    assert_eq!(amended.len(), 1);
    assert_eq!(amended[0]["activity"]["coding"][0]["code"], "UPDATE");
    assert_eq!(target_values(&amended[0]), [identifier(0)]);
    assert!(
        amended[0]["reason"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("corrected by the device")
    );

    // A device's retraction carries the reason it gave; an operator's names the operator.
    let retraction = json!({"device": {"serial": "CH-P1", "model": "CARDIOHELP-i"},
        "reason": "sensor was disconnected", "readings": [{"parameter": "Flow", "time": &t1}]});
    let by_device = pki
        .client(GETINGE)
        .post_json(
            &gateway.url("/v1/observations/entered-in-error"),
            &retraction,
        )
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let path = format!(
        "/admin/v1/observations/{}/entered-in-error?reason=wrong%20patient",
        identifier(1)
    );
    let by_operator = admin
        .post_json(&gateway.admin_url(&path), &json!({}))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let device_retraction =
        provenances_of(&reader, by_device["trackingId"].as_str().unwrap()).await;
    assert_eq!(device_retraction.len(), 1);
    assert_eq!(
        device_retraction[0]["activity"]["coding"][0]["code"],
        "NULLIFY"
    );
    assert_eq!(
        device_retraction[0]["reason"][0]["text"],
        "entered in error: taken back by the device: sensor was disconnected"
    );
    assert_eq!(target_values(&device_retraction[0]), [identifier(0)]);
    let operator_retraction =
        provenances_of(&reader, by_operator["trackingId"].as_str().unwrap()).await;
    assert_eq!(operator_retraction.len(), 1);
    let p = &operator_retraction[0];
    assert_eq!(p["agent"][0]["type"]["coding"][0]["code"], "enterer");
    assert_eq!(p["agent"][0]["who"]["identifier"]["value"], "ops-admin");
    assert_eq!(
        p["reason"][0]["text"],
        "entered in error: taken back by an operator of the gateway: wrong patient"
    );
    assert_eq!(target_values(p), [identifier(1)]);

    // Every Provenance the EHR holds is one of these four.
    assert_eq!(ehr.ehr.count("Provenance"), 4);
}

/// A destination with a rate limit starts (its limiter is made inside the runtime) and
/// delivers.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_destination_starts_and_delivers() {
    let (pki, ehr, _dir, gateway) = durable_gateway("rate_limit = 50\n").await;
    post(&pki, &gateway, &flows("CH-RL", &[(4.2, &now_rfc3339())]))
        .await
        .expect_status(202);
    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(20)).await;
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
    assert_eq!(ehr.ehr.count("Observation"), 1);
}

/// An EHR's `Retry-After` is honoured up to the destination's `retry_after_max`: one asking
/// for 136 years (u32::MAX seconds) neither pauses the destination nor postpones the message
/// for that long.
#[tokio::test(flavor = "multi_thread")]
async fn an_ehr_asking_to_wait_for_years_is_waited_for_at_most_retry_after_max() {
    let (pki, ehr, _dir, gateway) = durable_gateway("retry_after_max = \"1s\"\n").await;
    ehr.ehr
        .fail_next(Fault::status(503).retry_after(u32::MAX), 1);
    post(&pki, &gateway, &flows("CH-RA", &[(4.2, &now_rfc3339())]))
        .await
        .expect_status(202);
    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(20)).await;
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
    assert_eq!(queues["destinations"][0]["pending"], 0, "{queues}");
    assert_eq!(ehr.ehr.count("Observation"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_destination_without_provenance_gets_none() {
    let (pki, ehr, _dir, gateway) = durable_gateway("provenance = false\n").await;
    post(&pki, &gateway, &flows("CH-P2", &[(4.2, &now_rfc3339())]))
        .await
        .expect_status(202);
    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(30)).await;
    // The reading and its console's description.
    assert_eq!(
        queues["destinations"][0]["delivered"],
        1 + description_of("CARDIOHELP-i"),
        "{queues}"
    );
    assert_eq!(ehr.ehr.count("Observation"), 1);
    assert_eq!(ehr.ehr.count("Provenance"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn several_bundles_in_flight_keep_per_resource_order() {
    // Small bundles and a slow EHR: only several bundles in flight make this quick.
    let (pki, ehr, _dir, gateway) =
        durable_gateway("max_bundle_entries = 4\nconcurrency = 4\n").await;
    ehr.ehr
        .fail_fraction(Fault::delay(Duration::from_millis(150)), 1.0);
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);

    // 40 readings, each then corrected twice, all accepted before much is delivered.
    let base = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let times: Vec<String> = (0..40)
        .map(|n| rfc3339(base + time::Duration::seconds(n)))
        .collect();
    let mut identifiers = Vec::new();
    for value in [4.1, 4.2, 4.3] {
        for chunk in times.chunks(10) {
            let readings: Vec<(f64, &str)> = chunk.iter().map(|t| (value, t.as_str())).collect();
            let receipt = post(&pki, &gateway, &flows("CH-W1", &readings))
                .await
                .expect_status(202)
                .json();
            if value == 4.1 {
                identifiers.extend(
                    receipt["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["identifier"]["value"].as_str().unwrap().to_owned()),
                );
            }
        }
    }
    wait_until_settled(&admin, &gateway, Duration::from_secs(120)).await;
    assert!(
        ehr.ehr.max_concurrent_writes() > 1,
        "bundles were sent one at a time"
    );
    assert!(
        ehr.ehr.max_concurrent_writes() <= 4,
        "the window is bounded"
    );
    for identifier in &identifiers {
        let (stored, history) = stored_with_history(&reader, identifier).await;
        assert_eq!(flow_value(&stored), 4.3, "the last value wins: {history:?}");
        let values: Vec<f64> = history.iter().rev().map(flow_value).collect();
        assert_eq!(values, [4.1, 4.2, 4.3], "versions in acceptance order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ehr_that_refuses_big_transactions_gets_halves_then_bundles_it_takes() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    ehr.ehr.limit_transaction_entries(8);
    ehr.ehr.reject_identifiers_containing(":CH-S1:pump-speed:");
    let dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::start(&durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ))
    .unwrap();
    let admin = pki.client(ADMIN);

    // 50 readings and one the EHR refuses for its content, in one bundle of 52 (Provenance).
    let base = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let mut batch = flows(
        "CH-S1",
        &(0..50)
            .map(|n| (4.0, rfc3339(base + time::Duration::seconds(n))))
            .collect::<Vec<_>>()
            .iter()
            .map(|(v, t)| (*v, t.as_str()))
            .collect::<Vec<_>>(),
    );
    batch["readings"].as_array_mut().unwrap().push(json!(
        {"parameter": "RPM", "value": 3500, "unit": "rpm", "time": rfc3339(base)}
    ));
    post(&pki, &gateway, &batch).await.expect_status(202);
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(60)).await;
    assert_eq!(
        queues["destinations"][0]["delivered"],
        51 + description_of("CARDIOHELP-i"),
        "{queues}"
    );
    assert_eq!(queues["destinations"][0]["dead"], 1, "{queues}");
    assert_eq!(ehr.ehr.count("Observation"), 50);
    let refused_so_far = ehr.ehr.writes().iter().filter(|w| w.status == 400).count();
    assert!(refused_so_far > 0);

    // From now on bundles fit: nothing more is refused for its size.
    let later: Vec<String> = (50..110)
        .map(|n| rfc3339(base + time::Duration::seconds(n)))
        .collect();
    let readings: Vec<(f64, &str)> = later.iter().map(|t| (4.0, t.as_str())).collect();
    post(&pki, &gateway, &flows("CH-S1", &readings))
        .await
        .expect_status(202);
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(60)).await;
    assert_eq!(
        queues["destinations"][0]["delivered"],
        51 + 61 + description_of("CARDIOHELP-i"),
        "{queues}"
    );
    assert_eq!(ehr.ehr.count("Observation"), 110);
    let writes = ehr.ehr.writes();
    assert_eq!(
        writes.iter().filter(|w| w.status == 400).count(),
        refused_so_far,
        "no bundle refused once the size was learned"
    );
    assert!(
        writes.len() < 60,
        "bundles, not a trickle of single creates: {} writes",
        writes.len()
    );
}

/// Retention runs on its own: once dead letters and delivered messages are past keeping, the
/// admin API knows them no more; a dead letter's reading sent again is then a new message that
/// reaches the EHR (not taken for one it already holds).
#[tokio::test(flavor = "multi_thread")]
async fn delivered_messages_and_dead_letters_are_deleted_after_their_keeping_time() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    ehr.ehr.reject_identifiers_containing(":pump-speed:");
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        .replace(
            "max_past_age = \"30d\"",
            "max_past_age = \"10s\"\nmax_future_skew = \"1s\"",
        )
        .replace(
            "mode = \"outbox\"",
            "mode = \"outbox\"\nkeep_delivered = \"1s\"\nkeep_dead = \"1s\"",
        );
    assert!(config.contains("keep_dead = \"1s\""));
    let gateway = GatewayProcess::start(&config).unwrap();
    let admin = pki.client(ADMIN);
    let batch = SimulatedCardiohelp::new("CH-0042", 5).next_batch(OffsetDateTime::now_utc());
    let receipt = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let tracking_id = receipt["trackingId"].as_str().unwrap().to_owned();
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    assert_eq!(queues["destinations"][0]["dead"], 1, "{queues}");
    assert_eq!(ehr.ehr.count("Observation"), 11);

    // The dead letter goes after keep_dead (a pass a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = admin
            .get(&gateway.admin_url("/admin/v1/dead-letters"))
            .await
            .unwrap()
            .expect_status(200)
            .json();
        if dead["deadLetters"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "still kept: {dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gateway
            .log_text()
            .contains("dead letters past keep_dead deleted"),
        "the deletion of undelivered data is logged"
    );

    // The refused reading, sent again once the EHR takes it (within max_past_age): delivered.
    ehr.ehr.clear_rejections();
    let mut again = batch.clone();
    again["readings"] = Value::Array(
        batch["readings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["parameter"] == "RPM")
            .cloned()
            .collect(),
    );
    assert_eq!(again["readings"].as_array().unwrap().len(), 1, "{batch}");
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &again)
        .await
        .unwrap()
        .expect_status(202);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    assert_eq!(ehr.ehr.count("Observation"), 12);

    // Delivered messages stay for the correction window (10 s + 1 s), then go.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let status = admin
            .get(&gateway.admin_url(&format!("/admin/v1/deliveries/{tracking_id}")))
            .await
            .unwrap();
        if status.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still kept: {}",
            String::from_utf8_lossy(&status.body)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queues = admin
        .get(&gateway.admin_url("/admin/v1/queues"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    // At most the resend (its reading and Provenance) is left, settled seconds later.
    assert!(
        queues["destinations"][0]["accepted"].as_u64().unwrap() <= 2,
        "{queues}"
    );
    assert_eq!(ehr.ehr.count("Observation"), 12, "nothing sent twice");
}

/// The documented example, every setting in it (the commented-out ones too) set as written
/// there, starts and delivers: to the main EHR everything, to the registry (PUT, only Getinge
/// CARDIOHELP-i Observations) the readings and their Provenance, to the hospital EHR through a
/// SMART token. Only addresses and file places are changed.
#[tokio::test(flavor = "multi_thread")]
async fn the_documented_example_with_every_setting_starts_and_delivers() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let registry = start_ehr(&pki).await;
    // The SMART destination: bearer tokens alone, the gateway registered with its key.
    let hospital = ReferenceEhr::new()
        .start(
            pki.ehr_tls_certificate_optional("ca.pem"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
    let smart_key = SigningKeys::load(&[pki.path(gateway::certs::SMART_KEY)]).unwrap();
    hospital.ehr.register_smart_client(RegisteredClient {
        client_id: "ecmo-gateway".into(),
        jwks: JwkSet {
            keys: smart_key.public_keys().cloned().collect(),
        },
        scopes: [
            "system/Observation.cus",
            "system/Procedure.cus",
            "system/Device.cus",
            "system/DeviceMetric.cus",
            "system/Provenance.c",
            "system/Patient.s",
            "system/Encounter.s",
        ]
        .map(String::from)
        .to_vec(),
    });
    let token_url = hospital.ehr.smart(|s| s.token_url.clone());
    // It takes literal references only, and knows the patient the console's batches name.
    hospital.ehr.require_literal_references();
    let patient = hospital.ehr.add_patient(
        conformance_tests::console::SIM_MRN_SYSTEM,
        "MRN-SIM-CH-0042",
    );
    let encounter = hospital.ehr.add_encounter(&patient, "in-progress");
    hospital.ehr.require_encounter();
    let dir = tempfile::tempdir().unwrap();
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let example = std::fs::read_to_string(workspace.join("gateway/gateway.example.toml")).unwrap();
    let place = |p: &std::path::Path| p.display().to_string();
    // Its outbox on PostgreSQL (the SQLite file is the default every other test runs on),
    // over TLS only, with the test PKI's server certificate.
    let (server_cert, server_key) = (
        std::fs::read_to_string(pki.path("server.pem")).unwrap(),
        std::fs::read_to_string(pki.path("server.key")).unwrap(),
    );
    let postgres = tokio::task::spawn_blocking(move || {
        let cluster = gateway::outbox::throwaway_postgres::ThrowawayCluster::start_with_tls(
            &server_cert,
            &server_key,
        )?;
        cluster.database()?;
        Ok::<_, gateway::outbox::throwaway_postgres::ClusterError>(cluster)
    })
    .await
    .unwrap()
    .expect("a throwaway PostgreSQL server (bash .ci/run installs Debian's postgresql)");
    let password_file = dir.path().join("postgres-password");
    // The throwaway server trusts loopback connections: the password is read, not needed.
    std::fs::write(&password_file, "unused\n").unwrap();
    let config = example
        .replace("\"../certs/dev/", &format!("\"{}/", place(pki.as_ref())))
        .replace(
            "\"../data/outbox.sqlite\"",
            &format!("\"{}\"", place(&dir.path().join("outbox.sqlite"))),
        )
        .replace(
            "\"../data/revoked-certificates.json\"",
            &format!("\"{}\"", place(&dir.path().join("revoked.json"))),
        )
        .replace(
            "\"../data/runs.sqlite\"",
            &format!("\"{}\"", place(&dir.path().join("runs.sqlite"))),
        )
        .replace(
            "# dir = \"mappings/tables\"",
            &format!("dir = \"{}\"", place(&workspace.join("mappings/tables"))),
        )
        .replace("# rate_limit = 50", "rate_limit = 50")
        .replace(
            "# max_concurrent_requests_per_vendor = 128",
            "max_concurrent_requests_per_vendor = 128",
        )
        .replace("0.0.0.0:8443", "127.0.0.1:0")
        .replace("0.0.0.0:2575", "127.0.0.1:0")
        // The device-network mode: HL7 v2's TLS is the tested default elsewhere.
        .replace("tls = true", "tls = false")
        .replace(
            "# plain_vendor = \"integration\"",
            "plain_vendor = \"integration\"",
        )
        .replace("127.0.0.1:9444", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("https://127.0.0.1:9443/fhir", &ehr.base_url)
        .replace("https://127.0.0.1:9543/fhir", &registry.base_url)
        .replace(
            "# token_url = \"https://127.0.0.1:9643/auth/token\"",
            &format!("token_url = \"{token_url}\""),
        )
        .replace("https://127.0.0.1:9643/fhir", &hospital.base_url)
        .replace("# [admin.console]", "[admin.console]")
        .replace(
            "# users = [{ name = \"ana\", password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$...\" }]",
            &format!(
                "users = [{{ name = \"ana\", password_hash = \"{}\" }}]",
                gateway::admin::console::hash_password("an operator's long password").unwrap()
            ),
        )
        .replace("# idle_timeout = \"30m\"", "idle_timeout = \"30m\"")
        .replace("# [delivery.postgres]", "[delivery.postgres]")
        .replace(
            "# url = \"postgresql://gateway@db.internal:5432/ecmo\"",
            &format!("url = \"{}\"", postgres.url("db0")),
        )
        .replace(
            "# password_file = \"/etc/ecmo-gateway/postgres-password\"",
            &format!("password_file = \"{}\"", place(&password_file)),
        )
        .replace(
            "# ca = \"/etc/ecmo-gateway/postgres-ca.pem\"",
            &format!("ca = \"{}\"", place(&pki.path("ca.pem"))),
        )
        .replace("# replica = \"gateway-1\"", "replica = \"gateway-1\"")
        .replace("# claim_lease = \"30s\"", "claim_lease = \"30s\"");
    let commented_settings: Vec<&str> = config
        .lines()
        .filter(|line| {
            line.strip_prefix("# ").is_some_and(|rest| {
                rest.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
            })
        })
        .collect();
    assert_eq!(
        commented_settings,
        Vec::<&str>::new(),
        "every setting is set"
    );
    assert!(!config.contains("../"), "every place is the test's");

    // check-config reaches the store over TLS, before the schema is made.
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), &config).unwrap();
    let checked = std::process::Command::new(conformance_tests::harness::gateway_binary().unwrap())
        .args(["check-config", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(
        said.contains("postgres: reachable over TLS, PostgreSQL ")
            && said.contains("outbox schema not made yet")
            && said.contains("[delivery] outbox and [runs] store are not used"),
        "{said}{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let gateway = GatewayProcess::start(&config).unwrap();
    // From 20 minutes ago: the registry charts per quarter hour, so its interval is over.
    let batch = SimulatedCardiohelp::new("CH-0042", 5)
        .next_batch(OffsetDateTime::now_utc() - time::Duration::minutes(20));
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    let admin = pki.client(ADMIN);
    let queues = wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    for destination in queues["destinations"].as_array().unwrap() {
        assert_eq!(destination["dead"], 0, "{queues}");
    }
    assert_eq!(ehr.ehr.count("Observation"), 12);
    assert_eq!(ehr.ehr.count("Provenance"), 1);
    // One per parameter and quarter hour: the batch's twelve parameters at one time.
    assert_eq!(registry.ehr.count("Observation"), 12);
    assert!(registry.ehr.all_resources("Observation").iter().all(|o| {
        o["identifier"][0]["value"]
            .as_str()
            .unwrap()
            .ends_with("Z/PT15M")
    }));
    // Its own Provenance of what it was given (provenance defaults to on), no Device.
    assert_eq!(registry.ehr.count("Provenance"), 1);
    assert_eq!(registry.ehr.count("Device"), 0, "only Observations");
    assert_eq!(hospital.ehr.count("Observation"), 12);
    assert!(
        hospital
            .ehr
            .all_resources("Observation")
            .iter()
            .all(
                |o| o["subject"]["reference"] == format!("Patient/{patient}")
                    && o["encounter"]["reference"] == format!("Encounter/{encounter}")
            )
    );
    assert_eq!(hospital.ehr.count("Provenance"), 1);
    // One token for check-config's look at the hospital's capabilities, one for delivery.
    assert_eq!(hospital.ehr.smart(|s| s.issued), 2);
    // The console's operator signs in with a password, no certificate.
    let anonymous = MtlsClient::new(&pki.path("ca.pem"), None).unwrap();
    let session = anonymous
        .post_json(
            &gateway.admin_url("/console/session"),
            &json!({"user": "ana", "password": "an operator's long password"}),
        )
        .await
        .unwrap()
        .expect_status(200);
    assert!(session.headers.contains_key("set-cookie"));
}

/// The outbox is a bounded queue: with the EHR refusing everything, requests are taken until
/// `max_pending` undelivered messages are counted, then refused with 503 and Retry-After
/// (nothing of them stored); once the EHR is back every accepted reading arrives exactly once
/// and requests are taken again.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_refuses_requests_until_delivery_catches_up() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        .replace("mode = \"outbox\"", "mode = \"outbox\"\nmax_pending = 4");
    assert!(config.contains("max_pending = 4"));
    ehr.ehr.fail_fraction(Fault::status(503), 1.0);
    let gateway = GatewayProcess::start(&config).unwrap();
    let minute = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut accepted = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        let at = minute - Duration::from_secs(accepted + 1);
        let time = at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let answer = post(&pki, &gateway, &flows("CH-FULL", &[(4.2, &time)])).await;
        match answer.status.as_u16() {
            202 => accepted += 1,
            503 => break answer,
            other => panic!("{other}: {}", String::from_utf8_lossy(&answer.body)),
        }
        assert!(
            Instant::now() < deadline,
            "never refused after {accepted} accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Each accepted reading is an Observation and a Provenance: at least 2 requests fill 4.
    assert!(accepted >= 2, "{accepted}");
    assert!(refusal.headers.contains_key("retry-after"));
    let text = refusal.json().to_string();
    assert!(
        text.contains("undelivered messages") && text.contains("limit is 4"),
        "{text}"
    );
    ehr.ehr.fail_fraction(Fault::status(503), 0.0);
    let queues = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(30)).await;
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
    assert_eq!(ehr.ehr.count("Observation") as u64, accepted);
    // Counted again within a second of catching up: taken again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = post(&pki, &gateway, &flows("CH-FULL", &[(4.3, &now_rfc3339())])).await;
        if answer.status.as_u16() == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused: {}",
            answer.json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The identifier of the one-minute interval a reading's identifier falls in, as the gateway
/// writes it (`mappings::chart_slot`).
/// The start of the minute `minutes` ago: an interval that is over, so due at once.
fn whole_minute_ago(minutes: i64) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - time::Duration::minutes(minutes)
        - time::Duration::seconds(now.second().into())
        - time::Duration::nanoseconds(now.nanosecond().into())
}

fn minute_of(reading_identifier: &str, start: OffsetDateTime) -> String {
    let (series, _) = reading_identifier.rsplit_once(':').unwrap();
    format!(
        "{series}:{:04}{:02}{:02}T{:02}{:02}00Z/PT1M",
        start.year(),
        u8::from(start.month()),
        start.day(),
        start.hour(),
        start.minute()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charting_destination_gets_the_latest_reading_of_each_interval_once() {
    let (pki, ehr, _dir, gateway) =
        durable_gateway("charting = { interval = \"1m\", settle = \"1s\" }\n").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    // Two whole minutes a few minutes ago: their intervals are over, so due at once.
    let minute = whole_minute_ago(5);
    let at =
        |m: i64, s: i64| rfc3339(minute + time::Duration::minutes(m) + time::Duration::seconds(s));
    let first = post(
        &pki,
        &gateway,
        &flows(
            "CH-Q1",
            &[
                (4.0, &at(0, 10)),
                (4.1, &at(0, 50)),
                (4.05, &at(0, 30)),
                (4.4, &at(1, 5)),
            ],
        ),
    )
    .await
    .expect_status(202)
    .json();
    let dispositions: Vec<&str> = (0..4)
        .map(|i| {
            first["resources"][i]["dispositions"]["ehr"]
                .as_str()
                .unwrap()
        })
        .collect();
    // Written in one commit: the second rewrites the first's message, the third is older.
    assert_eq!(
        dispositions,
        ["created", "updated", "superseded", "created"]
    );
    let reading = |i: usize| {
        first["resources"][i]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let minute0 = minute_of(&reading(0), minute);
    let minute1 = minute_of(&reading(3), minute + time::Duration::minutes(1));
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;

    // One Observation per minute, written once, the minute's latest reading at its own time.
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert_eq!(flow_value(&stored), 4.1);
    assert_eq!(stored["effectiveDateTime"], at(0, 50));
    assert_eq!(stored["status"], "final");
    assert_eq!(history.len(), 1, "{history:?}");
    let (stored, _) = stored_with_history(&reader, &minute1).await;
    assert_eq!(flow_value(&stored), 4.4);
    // The readings themselves are not at this destination.
    for i in 0..4 {
        let found = reader
            .by_identifier("Observation", OBSERVATIONS, &reading(i))
            .await
            .unwrap();
        assert!(found.is_empty(), "{found:?}");
    }

    // A later reading of a minute already sent updates it; an earlier one changes nothing.
    let late = post(
        &pki,
        &gateway,
        &flows("CH-Q1", &[(4.2, &at(0, 55)), (3.0, &at(0, 1))]),
    )
    .await
    .expect_status(202)
    .json();
    assert_eq!(late["resources"][0]["dispositions"]["ehr"], "updated");
    assert_eq!(late["resources"][1]["dispositions"]["ehr"], "superseded");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert_eq!(flow_value(&stored), 4.2);
    assert_eq!(stored["effectiveDateTime"], at(0, 55));
    assert_eq!(history.len(), 2);

    // Taking back a reading the minute does not chart changes nothing there; taking back the
    // one it charts marks the minute entered-in-error.
    let url = gateway.url("/v1/observations/entered-in-error");
    let retraction = |time: String| {
        json!({"device": {"serial": "CH-Q1", "model": "CARDIOHELP-i"},
               "readings": [{"parameter": "Flow", "time": time}]})
    };
    let uncharted = pki
        .client(GETINGE)
        .post_json(&url, &retraction(at(0, 10)))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(
        uncharted["resources"][0]["dispositions"]["ehr"],
        "unchanged"
    );
    let charted = pki
        .client(GETINGE)
        .post_json(&url, &retraction(at(0, 55)))
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(charted["resources"][0]["dispositions"]["ehr"], "retracted");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert_eq!(stored["status"], "entered-in-error");
    assert_eq!(flow_value(&stored), 4.2);
    assert_eq!(history.len(), 3);
    let (stored, _) = stored_with_history(&reader, &minute1).await;
    assert_eq!(stored["status"], "final");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_charting_destination_gets_the_mean_of_each_interval_through_late_readings_and_retractions()
 {
    let (pki, ehr, _dir, gateway) =
        durable_gateway("charting = { interval = \"1m\", summary = \"mean\", settle = \"1s\" }\n")
            .await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let minute = whole_minute_ago(5);
    let at =
        |m: i64, s: i64| rfc3339(minute + time::Duration::minutes(m) + time::Duration::seconds(s));
    let first = post(
        &pki,
        &gateway,
        &flows(
            "CH-M1",
            &[(4.0, &at(0, 10)), (4.4, &at(0, 50)), (4.2, &at(1, 5))],
        ),
    )
    .await
    .expect_status(202)
    .json();
    let dispositions = |answer: &Value, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                answer["resources"][i]["dispositions"]["ehr"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    // In one commit: the second reading of the first minute rewrites its queued message.
    assert_eq!(dispositions(&first, 3), ["created", "updated", "created"]);
    let reading = |i: usize| {
        first["resources"][i]["identifier"]["value"]
            .as_str()
            .unwrap()
    };
    let minute0 = minute_of(reading(0), minute);
    let minute1 = minute_of(reading(2), minute + time::Duration::minutes(1));
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;

    // One Observation per minute, written once: the mean over the whole minute.
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert!((flow_value(&stored) - 4.2).abs() < 1e-9, "{stored}");
    assert_eq!(stored["method"]["coding"][0]["code"], "average");
    assert_eq!(
        stored["method"]["coding"][0]["system"],
        "http://terminology.hl7.org/CodeSystem/observation-statistics"
    );
    assert_eq!(stored["effectivePeriod"]["start"], at(0, 0));
    assert_eq!(stored["effectivePeriod"]["end"], at(1, 0));
    assert!(stored.get("effectiveDateTime").is_none());
    assert_eq!(history.len(), 1, "{history:?}");
    let (stored, _) = stored_with_history(&reader, &minute1).await;
    assert!((flow_value(&stored) - 4.2).abs() < 1e-9);

    // A reading that comes after the minute was sent updates its mean at the EHR.
    let late = post(&pki, &gateway, &flows("CH-M1", &[(5.0, &at(0, 30))]))
        .await
        .expect_status(202)
        .json();
    assert_eq!(dispositions(&late, 1), ["updated"]);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert!((flow_value(&stored) - 13.4 / 3.0).abs() < 0.006, "{stored}");
    assert_eq!(history.len(), 2);

    // Taking a reading back works the mean out again without it.
    let retracted = pki
        .client(GETINGE)
        .post_json(
            &gateway.url("/v1/observations/entered-in-error"),
            &json!({"device": {"serial": "CH-M1", "model": "CARDIOHELP-i"},
                    "readings": [{"parameter": "Flow", "time": at(0, 30)}]}),
        )
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(dispositions(&retracted, 1), ["updated"]);
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &minute0).await;
    assert!((flow_value(&stored) - 4.2).abs() < 1e-9, "{stored}");
    // Changed after the EHR had it as final: amended.
    assert_eq!(stored["status"], "amended");
    assert_eq!(history.len(), 3);
    let (_, history) = stored_with_history(&reader, &minute1).await;
    assert_eq!(history.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waveform_reaches_a_destination_that_takes_waveforms_as_sampled_data_and_no_other() {
    let (pki, ehr, _dir, gateway) = durable_gateway("waveforms = true\n").await;
    let admin = pki.client(ADMIN);
    let reader = reader(&pki, &ehr);
    let console = pki.client(GETINGE);
    let url = gateway.url("/v1/observations");
    let start = rfc3339(OffsetDateTime::now_utc() - time::Duration::minutes(2));
    let batch = json!({
        "device": {"serial": "CH-W1", "model": "CARDIOHELP-i"},
        "patient": {"system": MRN, "value": "MRN-CH-W1"},
        "readings": [
            {"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": start},
            {"parameter": "Flow", "unit": "mL/min", "time": start,
             "samples": {"period": 8, "data": [4200, null, 4300, -32000]}}
        ]
    });
    let accepted = console
        .post_json(&url, &batch)
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let identifier = |answer: &Value, i: usize| {
        answer["resources"][i]["identifier"]["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let waveform = identifier(&accepted, 1);
    assert!(waveform.ends_with("Z/PT0.032S"), "{waveform}");
    assert_eq!(accepted["resources"][1]["dispositions"]["ehr"], "created");
    // The same waveform in XML is the same resource: nothing new.
    let xml = format!(
        r#"<observationBatch xmlns="https://fhir.ecmo-gateway.org/ns/ingest">
             <device serial="CH-W1" model="CARDIOHELP-i"/>
             <patient system="{MRN}" value="MRN-CH-W1"/>
             <reading parameter="Flow" unit="mL/min" time="{start}">
               <samples period="8"><sample value="4200"/><sample/><sample value="4300"/><sample value="-32000"/></samples>
             </reading>
           </observationBatch>"#
    );
    let again = console
        .send(
            http::Method::POST,
            &url,
            Some("application/xml"),
            bytes::Bytes::from(xml),
        )
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(identifier(&again, 0), waveform);
    assert_eq!(again["resources"][0]["dispositions"]["ehr"], "unchanged");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &waveform).await;
    assert_eq!(history.len(), 1);
    let sampled = &stored["valueSampledData"];
    assert_eq!(sampled["data"], "4.20 E 4.30 E");
    assert_eq!(sampled["period"].as_f64(), Some(8.0));
    assert_eq!(sampled["dimensions"].as_u64(), Some(1));
    assert_eq!(sampled["origin"]["code"], "L/min");
    assert_eq!(stored["effectiveDateTime"], start.as_str());
    // The single reading of the same time is its own Observation.
    let (single, _) = stored_with_history(&reader, &identifier(&accepted, 0)).await;
    assert!((flow_value(&single) - 4.2).abs() < 1e-9);
    // A device that speaks FHIR sends SampledData: converted sample by sample as a reading's
    // waveform is (here mL/min scaled by its factor), and identified the same way.
    let native_start = rfc3339(OffsetDateTime::now_utc() - time::Duration::minutes(3));
    let native = console
        .send(
            http::Method::POST,
            &gateway.url("/v1/fhir/Observation"),
            Some("application/fhir+json"),
            bytes::Bytes::from(
                json!({
                    "resourceType": "Observation", "status": "final",
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "procedure"}]},
                                 {"coding": [{"system": "http://snomed.info/sct", "code": "182744004"}]}],
                    "code": {"coding": [{"system": "https://fhir.ecmo-gateway.org/CodeSystem/ecmo", "code": "pump-blood-flow"}]},
                    "subject": {"identifier": {"system": MRN, "value": "MRN-CH-W1"}},
                    "effectiveDateTime": native_start,
                    "valueSampledData": {"origin": {"value": 0, "code": "mL/min"}, "period": 4,
                                         "factor": 10, "dimensions": 1, "data": "420 E 431"},
                    "device": {"identifier": {"system": "https://fhir.ecmo-gateway.org/sid/device-serial/getinge", "value": "CH-W1"}}
                })
                .to_string(),
            ),
        )
        .await
        .unwrap()
        .expect_status(202)
        .json();
    let native_waveform = identifier(&native, 0);
    assert!(native_waveform.ends_with("Z/PT0.012S"), "{native_waveform}");
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored_native, _) = stored_with_history(&reader, &native_waveform).await;
    assert_eq!(stored_native["valueSampledData"]["data"], "4.20 E 4.31");
    assert_eq!(stored_native["valueSampledData"]["origin"]["code"], "L/min");
    assert!(stored_native["valueSampledData"].get("factor").is_none());

    // Taken back by its start, period and number of samples; the single reading stays.
    let retracted = console
        .post_json(
            &gateway.url("/v1/observations/entered-in-error"),
            &json!({"device": {"serial": "CH-W1", "model": "CARDIOHELP-i"},
                    "readings": [{"parameter": "Flow", "time": start,
                                  "samples": {"period": 8, "count": 4}}]}),
        )
        .await
        .unwrap()
        .expect_status(202)
        .json();
    assert_eq!(
        retracted["resources"][0]["identifier"]["value"],
        waveform.as_str()
    );
    assert_eq!(
        retracted["resources"][0]["dispositions"]["ehr"],
        "retracted"
    );
    wait_until_settled(&admin, &gateway, Duration::from_secs(30)).await;
    let (stored, history) = stored_with_history(&reader, &waveform).await;
    assert_eq!(stored["status"], "entered-in-error");
    assert_eq!(history.len(), 2);
    let (single, _) = stored_with_history(&reader, &identifier(&accepted, 0)).await;
    assert_eq!(single["status"], "final");

    // A gateway whose destinations take no waveforms refuses one, naming it, and keeps
    // nothing of the request.
    let (pki, other_ehr, _dir, gateway) = durable_gateway("").await;
    let refused = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(422)
        .json();
    assert_eq!(refused["resourceType"], "OperationOutcome");
    assert_eq!(refused["issue"][0]["code"], "not-supported");
    assert_eq!(refused["issue"][0]["expression"][0], "/readings/1/samples");
    let stats = wait_until_settled(&pki.client(ADMIN), &gateway, Duration::from_secs(30)).await;
    assert_eq!(
        stats["destinations"],
        json!([]),
        "nothing accepted: {stats}"
    );
    let found = self::reader(&pki, &other_ehr)
        .by_identifier("Observation", OBSERVATIONS, &identifier(&accepted, 0))
        .await
        .unwrap();
    assert!(found.is_empty(), "{found:?}");
}
