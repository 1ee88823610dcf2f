//! The outbox on PostgreSQL (`[delivery.postgres]`), proven as the SQLite one is: a real
//! gateway process on a throwaway PostgreSQL server (Debian's `postgresql`, installed by
//! `bash .ci/run` when missing), killed with SIGKILL mid-stream, and the database itself
//! crashing and coming back mid-stream; and two replicas sharing the queue, one killed
//! mid-stream. What the EHR holds is then counted by identifier.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::RunningEhr;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, assert_each_held_once, durable_config, mtls_ehr,
    wait_until_settled,
};
use gateway::outbox::throwaway_postgres::ThrowawayCluster;
use serde_json::Value;
use time::OffsetDateTime;

/// A throwaway PostgreSQL server with one database, a test PKI, a reference EHR, and the
/// gateway's config with its outbox on that database (keys of `[delivery.postgres]` may be
/// appended to it).
struct OnPostgres {
    cluster: Arc<ThrowawayCluster>,
    pki: TestPki,
    ehr: RunningEhr,
    dir: tempfile::TempDir,
    config: String,
}

impl OnPostgres {
    async fn start() -> Self {
        let cluster = tokio::task::spawn_blocking(|| {
            let cluster = ThrowawayCluster::start()?;
            cluster.database()?;
            Ok::<_, gateway::outbox::throwaway_postgres::ClusterError>(cluster)
        })
        .await
        .unwrap()
        .expect("a throwaway PostgreSQL server (bash .ci/run installs Debian's postgresql)");
        let pki = TestPki::generate().unwrap();
        let ehr = mtls_ehr(&pki).await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "{}\n[delivery.postgres]\nurl = \"{}\"\n",
            durable_config(&pki, &ehr.base_url, &dir.path().join("unused.sqlite")),
            cluster.url("db0")
        );
        Self {
            cluster: Arc::new(cluster),
            pki,
            ehr,
            dir,
            config,
        }
    }
}

/// What the vendors' consoles got: identifiers accepted (202), and how many requests were
/// refused with 503 (to be sent again).
#[derive(Default)]
struct Streamed {
    accepted: HashSet<String>,
    unavailable: u64,
}

/// The two consoles' connections.
fn vendors(pki: &TestPki) -> Vec<MtlsClient> {
    vec![pki.client(GETINGE), pki.client(GETINGE)]
}

/// Two consoles posting batches, one per simulated second from `start`, until `stop` is set or
/// the gateway goes away; a 503 is sent again after a pause, as a device does; anything else
/// but 202 fails the test.
async fn stream(
    vendors: Vec<MtlsClient>,
    url: String,
    round: usize,
    start: OffsetDateTime,
    stop: Arc<AtomicBool>,
    unavailable_seen: Arc<AtomicU64>,
) -> Streamed {
    let mut tasks = tokio::task::JoinSet::new();
    for (client, vendor) in vendors.into_iter().enumerate() {
        let url = url.clone();
        let stop = stop.clone();
        let unavailable_seen = unavailable_seen.clone();
        let mut console = SimulatedCardiohelp::new(
            &format!("CH-P{round}{client}"),
            (round * 10 + client) as u64,
        );
        tasks.spawn(async move {
            let mut streamed = Streamed::default();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 5000 {
                let batch = console.next_batch(start + time::Duration::seconds(n));
                loop {
                    match vendor.post_json(&url, &batch).await {
                        Ok(answer) if answer.status == 202 => {
                            let receipt: Value = answer.json();
                            streamed.accepted.extend(
                                receipt["resources"]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|r| r["identifier"]["value"].as_str().unwrap().to_owned()),
                            );
                            break;
                        }
                        Ok(answer) if answer.status == 503 => {
                            let outcome: Value = answer.json();
                            assert_eq!(outcome["resourceType"], "OperationOutcome");
                            streamed.unavailable += 1;
                            unavailable_seen.fetch_add(1, Ordering::Relaxed);
                            if stop.load(Ordering::Relaxed) {
                                return streamed;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Ok(answer) => panic!(
                            "unexpected {}: {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body)
                        ),
                        // The gateway died under us: not accepted.
                        Err(_) => return streamed,
                    }
                }
                n += 1;
            }
            streamed
        });
    }
    let mut all = Streamed::default();
    while let Some(done) = tasks.join_next().await {
        let done = done.unwrap();
        all.accepted.extend(done.accepted);
        all.unavailable += done.unavailable;
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn on_postgres_accepted_readings_reach_the_ehr_exactly_once_across_kill_9_and_a_database_crash()
 {
    let OnPostgres {
        cluster,
        pki,
        ehr,
        dir,
        config,
    } = OnPostgres::start().await;
    let mut accepted: HashSet<String> = HashSet::new();
    let clock = OffsetDateTime::now_utc() - time::Duration::hours(6);

    // Round 0: killed with SIGKILL mid-stream.
    {
        let gateway = GatewayProcess::start(&config).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streaming = tokio::spawn(stream(
            vendors(&pki),
            gateway.url("/v1/observations"),
            0,
            clock,
            stop.clone(),
            Arc::default(),
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
        gateway.kill9();
        stop.store(true, Ordering::Relaxed);
        accepted.extend(streaming.await.unwrap().accepted);
    }
    assert!(
        !dir.path().join("unused.sqlite").exists(),
        "the outbox is on PostgreSQL"
    );

    // Round 1: the database crashes mid-stream and comes back; meanwhile requests get 503.
    let gateway = GatewayProcess::start(&config).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let unavailable_seen = Arc::new(AtomicU64::new(0));
    let streaming = tokio::spawn(stream(
        vendors(&pki),
        gateway.url("/v1/observations"),
        1,
        clock + time::Duration::seconds(10_000),
        stop.clone(),
        unavailable_seen.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.crash())
            .await
            .unwrap()
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while unavailable_seen.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no 503 while the database is down\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.restart())
            .await
            .unwrap()
            .unwrap();
    }
    // Accepting again once the database is back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    let streamed = streaming.await.unwrap();
    assert!(streamed.unavailable > 0);
    let before_outage = accepted.len();
    accepted.extend(streamed.accepted);
    assert!(
        accepted.len() > before_outage,
        "readings were accepted in the second round"
    );

    // Everything accepted is delivered, exactly once.
    assert_every_one_delivered_once(&pki, &gateway, &ehr, &accepted).await;
    assert!(accepted.len() > 100, "{}", accepted.len());
}

/// Two replicas on one PostgreSQL queue, each taking vendor load and delivering; one killed
/// with SIGKILL mid-stream. The other takes over what the dead one was sending once its claims
/// run out (`claim_lease`), and the EHR ends with every accepted reading exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_queue_and_a_killed_one_loses_and_duplicates_nothing() {
    // Every part bound: the server and the directory live as long as the test.
    let OnPostgres {
        cluster: _cluster,
        pki,
        ehr,
        dir: _dir,
        config: shared,
    } = OnPostgres::start().await;
    // Slow EHR answers keep bundles in flight (claimed) when a replica dies.
    ehr.ehr.fail_fraction(
        conformance_tests::ehr::Fault::delay(Duration::from_millis(50)),
        0.5,
    );
    let replica = |name: &str| format!("{shared}replica = \"{name}\"\nclaim_lease = \"2s\"\n");
    let a = GatewayProcess::start(&replica("replica-a")).unwrap();
    let b = GatewayProcess::start(&replica("replica-b")).unwrap();
    let clock = OffsetDateTime::now_utc() - time::Duration::hours(6);

    let stop_a = Arc::new(AtomicBool::new(false));
    let stop_b = Arc::new(AtomicBool::new(false));
    let to_a = tokio::spawn(stream(
        vendors(&pki),
        a.url("/v1/observations"),
        0,
        clock,
        stop_a.clone(),
        Arc::default(),
    ));
    let to_b = tokio::spawn(stream(
        vendors(&pki),
        b.url("/v1/observations"),
        1,
        clock,
        stop_b.clone(),
        Arc::default(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    stop_a.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_b.store(true, Ordering::Relaxed);
    let (to_a, to_b) = (to_a.await.unwrap(), to_b.await.unwrap());
    assert!(to_a.accepted.len() > 50, "{}", to_a.accepted.len());
    assert!(to_b.accepted.len() > 50, "{}", to_b.accepted.len());
    ehr.ehr
        .fail_fraction(conformance_tests::ehr::Fault::status(503), 0.0);

    let accepted: HashSet<String> = to_a.accepted.union(&to_b.accepted).cloned().collect();
    assert_every_one_delivered_once(&pki, &b, &ehr, &accepted).await;
}

/// Waits until nothing is pending, none dead and everything delivered (as `gateway` sees the
/// shared queue); then every identifier in `accepted` is at the EHR once, and no other twice.
async fn assert_every_one_delivered_once(
    pki: &TestPki,
    gateway: &GatewayProcess,
    ehr: &RunningEhr,
    accepted: &HashSet<String>,
) {
    let queues = wait_until_settled(&pki.client(ADMIN), gateway, Duration::from_secs(90)).await;
    let ehr_stats = &queues["destinations"][0];
    assert_eq!(ehr_stats["dead"], 0, "{queues}");
    assert_eq!(ehr_stats["accepted"], ehr_stats["delivered"], "{queues}");
    assert_each_held_once(&ehr.ehr, accepted);
}

/// One run whose events and readings go to two replicas on one PostgreSQL database: started
/// and ended on one, its mode changed on the other, its console's readings (naming no
/// patient) taken by the other once it has seen the run. The EHR gets one Procedure that went
/// through all of it, and every reading charted to the run's patient and linked to the run.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_events_reach_two_replicas_is_one_run() {
    const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";
    const RUNS: &str = "https://fhir.ecmo-gateway.org/sid/ecmo-run";
    let OnPostgres {
        cluster: _cluster,
        pki,
        ehr,
        dir,
        config: shared,
    } = OnPostgres::start().await;
    // Each replica's own (unused) local run store: the runs are in PostgreSQL.
    let replica = |name: &str| {
        shared.replace(
            &format!("{}", pki.path("runs.sqlite").display()),
            &format!(
                "{}",
                dir.path().join(format!("{name}-runs.sqlite")).display()
            ),
        ) + &format!("replica = \"{name}\"\n")
    };
    let a = GatewayProcess::start(&replica("replica-a")).unwrap();
    let b = GatewayProcess::start(&replica("replica-b")).unwrap();
    let vendor = pki.client(GETINGE);
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(2);
    let at = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let event = |gateway: &GatewayProcess, body: Value| {
        let url = gateway.url("/v1/runs/R-REPL/events");
        let vendor = &vendor;
        async move {
            let answer = vendor.post_json(&url, &body).await.unwrap();
            assert!(
                answer.status.is_success(),
                "{}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    };
    event(
        &a,
        serde_json::json!({
            "eventId": "s", "type": "started", "time": at(t0),
            "patient": {"system": MRN, "value": "MRN-REPL-1"}, "mode": "vv",
            "console": {"serial": "CH-R1", "model": "CARDIOHELP-i"}
        }),
    )
    .await;
    // Replica b takes the console's readings (no patient named) once it has seen the run.
    let batch = SimulatedCardiohelp::new("CH-R1", 7)
        .without_patient()
        .next_batch(t0 + time::Duration::hours(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = vendor
            .post_json(&b.url("/v1/observations"), &batch)
            .await
            .unwrap();
        if answer.status == 202 {
            break;
        }
        assert_eq!(
            answer.status,
            422,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert!(Instant::now() < deadline, "replica b never saw the run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    event(&b, serde_json::json!({
        "eventId": "m", "type": "mode-changed", "time": at(t0 + time::Duration::hours(5)), "mode": "vva"
    }))
    .await;
    // Replica a applies the end after b's mode change, which its turn takes in first.
    event(
        &a,
        serde_json::json!({
            "eventId": "e", "type": "ended", "time": at(t0 + time::Duration::days(1)),
            "reason": "recovered", "alive": true
        }),
    )
    .await;

    let queues = wait_until_settled(&pki.client(ADMIN), &b, Duration::from_secs(60)).await;
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
    let procedures: Vec<Value> = ehr
        .ehr
        .all_resources("Procedure")
        .into_iter()
        .filter(|p| p["identifier"][0]["system"] == RUNS)
        .collect();
    let run = procedures
        .iter()
        .find(|p| p["identifier"][0]["value"] == "R-REPL")
        .expect("the run's Procedure");
    assert_eq!(run["status"], "completed", "{run}");
    let segments: Vec<&Value> = procedures
        .iter()
        .filter(|p| p["partOf"][0]["identifier"]["value"] == "R-REPL")
        .collect();
    assert!(
        segments.len() >= 2,
        "both modes' segments, the one changed on replica b included: {segments:?}"
    );
    let observations = ehr.ehr.all_resources("Observation");
    assert!(!observations.is_empty());
    for o in &observations {
        assert_eq!(o["subject"]["identifier"]["value"], "MRN-REPL-1", "{o}");
        assert_eq!(o["partOf"][0]["identifier"]["value"], "R-REPL", "{o}");
    }
}
