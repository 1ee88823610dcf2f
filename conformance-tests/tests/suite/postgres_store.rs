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
    ADMIN, GETINGE, GatewayProcess, TestPki, durable_config, mtls_ehr, wait_until_settled,
};
use gateway::outbox::throwaway_postgres::ThrowawayCluster;
use serde_json::Value;
use time::OffsetDateTime;

/// `config` with its outbox on the database `url`.
fn on_postgres(config: &str, url: &str) -> String {
    format!("{config}\n[delivery.postgres]\nurl = \"{url}\"\n")
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
    let cluster = Arc::new(
        tokio::task::spawn_blocking(ThrowawayCluster::start)
            .await
            .unwrap()
            .expect("a throwaway PostgreSQL server (bash .ci/run installs Debian's postgresql)"),
    );
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.database())
            .await
            .unwrap()
            .unwrap();
    }
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = on_postgres(
        &durable_config(&pki, &ehr.base_url, &dir.path().join("unused.sqlite")),
        &cluster.url("db0"),
    );
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
    let shared = on_postgres(
        &durable_config(&pki, &ehr.base_url, &dir.path().join("unused.sqlite")),
        &cluster.url("db0"),
    );
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
    let counts = ehr.ehr.identifier_counts("Observation");
    for identifier in accepted {
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
