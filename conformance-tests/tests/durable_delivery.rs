//! The outbox's promise, proven with real processes and sockets: once the gateway says 202, the
//! EHR gets the data exactly once, through kill -9, EHR errors, dropped connections, outages
//! and refusals; every accepted message ends delivered or dead-lettered, and the counts add up.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::{Fault, ReferenceEhr, RunningEhr};
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, SPECTRUM, TestPki, WriteStyle, gateway_config, now_rfc3339,
    with_outbox,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

async fn start_ehr(pki: &TestPki) -> RunningEhr {
    ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn durable_config(pki: &TestPki, ehr_url: &str, outbox: &Path) -> String {
    with_outbox(
        &gateway_config(
            pki,
            ehr_url,
            WriteStyle::TRANSACTION_CONDITIONAL,
            "gateway-client",
        ),
        outbox,
    )
}

/// Polls the admin API until no message is pending anywhere; returns the queue stats.
async fn wait_until_settled(
    admin: &MtlsClient,
    gateway: &GatewayProcess,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let queues = admin
            .get(&gateway.admin_url("/admin/v1/queues"))
            .await
            .unwrap()
            .expect_status(200)
            .json();
        let pending: u64 = queues["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["pending"].as_u64().unwrap())
            .sum();
        if pending == 0 {
            return queues;
        }
        assert!(
            Instant::now() < deadline,
            "still pending after {limit:?}: {queues}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

    let counts = ehr.ehr.identifier_counts("Observation");
    for identifier in &accepted {
        assert_eq!(
            counts.get(identifier),
            Some(&1),
            "{identifier} must be at the EHR exactly once"
        );
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "no reading is ever duplicated"
    );
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
        (Some(60), Some(60), Some(0)),
        "{queues}"
    );
    assert_eq!(store.count("Observation"), 60);
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
    assert_eq!(queues["destinations"][0]["delivered"], 11, "{queues}");
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
        (Some(12), Some(0))
    );
    assert_eq!(ehr.ehr.count("Observation"), 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_is_for_admins_only_and_reports_health() {
    let pki = TestPki::generate().unwrap();
    let ehr = start_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = GatewayProcess::start(&durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ))
    .unwrap();
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
    assert_eq!(registry["accepted"], 12);
    assert_eq!(registry["pending"], 12);
    assert!(registry["oldestPendingSeconds"].as_f64().is_some());
}
