//! Load test: simulated consoles post batches through the gateway (mutual TLS in and out,
//! schema check, mapping, delivery to the reference EHR) and, in the same run, the identical
//! FHIR transaction Bundles are written straight to the EHR as the baseline.
//!
//! `cargo run --release -p conformance-tests --bin loadgen`
//! Traffic stays on 127.0.0.1 and stops by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::ReferenceEhr;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, WriteStyle, gateway_config, with_outbox,
};
use gateway::config::{FhirFormat, WriteMode};
use gateway::delivery::request_builder::RequestBuilder;
use http::Method;
use http_body_util::BodyExt;
use mappings::{DeviceContext, Mappings, Reading, ReadingFlags, ReadingValue};
use serde_json::Value;
use time::OffsetDateTime;

#[derive(Parser, Clone)]
struct Args {
    /// Batches each client sends per phase.
    #[arg(long, default_value_t = 1000)]
    batches_per_client: usize,
    /// Upper bound on a phase, in seconds (the run stops by itself).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Concurrent clients (consoles).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Console cycles per batch (12 readings each).
    #[arg(long, default_value_t = 4)]
    cycles_per_batch: usize,
    /// A last phase against an EHR like a real one far away: this much latency per write
    /// (0 skips the phase) ...
    #[arg(long, default_value_t = 100)]
    slow_ehr_latency_ms: u64,
    /// ... and a limit on transaction entries (as Medplum's 8); the gateway must find it.
    #[arg(long, default_value_t = 8)]
    slow_ehr_max_entries: usize,
    /// Batches each client sends in that phase.
    #[arg(long, default_value_t = 10)]
    slow_batches_per_client: usize,
    /// The destination's `concurrency` in that phase: what a far EHR needs to be drained fast.
    #[arg(long, default_value_t = 32)]
    slow_ehr_concurrency: usize,
}

struct Phase {
    readings: usize,
    requests: usize,
    failures: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Phase {
    fn readings_per_second(&self) -> f64 {
        self.readings as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index]
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<10} {:>9.0} readings/s  {:>6} requests  {:>3} failed  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.readings_per_second(),
            self.requests,
            self.failures,
            self.percentile(0.50).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3,
        );
    }
}

/// Batches for one client: its own serial and clock, so every reading is new to the EHR.
fn batches(client: usize, cycles_per_batch: usize, count: usize) -> Vec<Value> {
    let mut console = SimulatedCardiohelp::new(&format!("LOAD-{client:03}"), client as u64);
    let mut at = OffsetDateTime::now_utc() - time::Duration::days(1);
    (0..count)
        .map(|_| {
            let mut readings = Vec::new();
            for _ in 0..cycles_per_batch {
                readings.extend(console.cycle(at));
                at += time::Duration::seconds(1);
            }
            console.batch(readings)
        })
        .collect()
}

/// Each client's batches as vendor request bodies; `first_client` keeps serials apart between
/// phases so every phase writes new readings.
fn vendor_bodies(
    first_client: usize,
    clients: usize,
    cycles_per_batch: usize,
    per_client: usize,
) -> Vec<Vec<(Bytes, usize)>> {
    (0..clients)
        .map(|c| {
            batches(first_client + c, cycles_per_batch, per_client)
                .iter()
                .map(|b| {
                    (
                        Bytes::from(serde_json::to_vec(b).unwrap_or_default()),
                        12 * cycles_per_batch,
                    )
                })
                .collect()
        })
        .collect()
}

/// The transaction Bundle the gateway itself would send for `batch`.
fn bundle_for(mappings: &Mappings, builder: &RequestBuilder, batch: &Value) -> Bytes {
    let family = mappings
        .family_for_model("CARDIOHELP-i")
        .expect("embedded table");
    let context = DeviceContext {
        family,
        serial: batch["device"]["serial"].as_str().unwrap_or(""),
        model: "CARDIOHELP-i",
        patient: None,
        window: mappings::TimeWindow {
            received_at: OffsetDateTime::now_utc(),
            max_future_skew: time::Duration::minutes(5),
            max_past_age: time::Duration::hours(24),
        },
    };
    let resources: Vec<_> = batch["readings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let value = match &r["value"] {
                Value::Number(n) => ReadingValue::Number(n.as_str()),
                Value::Bool(b) => ReadingValue::Boolean(*b),
                _ => return None,
            };
            let reading = Reading {
                parameter: r["parameter"].as_str()?,
                value,
                unit: r["unit"].as_str(),
                time: r["time"].as_str()?,
                flags: ReadingFlags::default(),
                run: None,
            };
            mappings.map_reading(&context, &reading).ok()
        })
        .collect();
    let Ok(request) = builder.transaction(&resources) else {
        return Bytes::new();
    };
    futures_block(request.into_body().collect())
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

async fn run_phase(
    clients: Vec<MtlsClient>,
    url: Arc<str>,
    bodies: Vec<Vec<(Bytes, usize)>>,
    content_type: &'static str,
    seconds: u64,
) -> Phase {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (client, bodies) in clients.into_iter().zip(bodies) {
        let url = url.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let (mut readings, mut failures) = (0, 0);
            for (body, count) in bodies {
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                match client
                    .send(Method::POST, &url, Some(content_type), body)
                    .await
                {
                    Ok(answer) if answer.status.is_success() => readings += count,
                    _ => failures += 1,
                }
                latencies.push(sent.elapsed());
            }
            (readings, failures, latencies)
        });
    }
    let mut phase = Phase {
        readings: 0,
        requests: 0,
        failures: 0,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
    };
    while let Some(Ok((readings, failures, latencies))) = tasks.join_next().await {
        phase.readings += readings;
        phase.failures += failures;
        phase.requests += latencies.len();
        phase.latencies.extend(latencies);
    }
    phase.elapsed = start.elapsed();
    phase.latencies.sort_unstable();
    phase
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), gateway::BoxError> {
    let args = Args::parse();
    let pki = TestPki::generate()?;
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse()?)
        .await?;
    let gateway = GatewayProcess::start(
        &gateway_config(
            &pki,
            &ehr.base_url,
            WriteStyle::TRANSACTION_CONDITIONAL,
            "gateway-client",
        )
        .replace("max_body_bytes = 262144", "max_body_bytes = 4194304"),
    )?;
    let per_batch = 12 * args.cycles_per_batch;
    let per_client = args.batches_per_client;
    println!(
        "loadgen: {} clients x {} batches of {} readings per phase, {} cores",
        args.clients,
        per_client,
        per_batch,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Baseline: the same Bundles the gateway would send, written straight to the EHR.
    let mappings = Mappings::embedded()?;
    let builder = RequestBuilder::new(
        "baseline",
        &ehr.base_url,
        WriteMode::ConditionalCreate,
        FhirFormat::Json,
    );
    let direct_bodies: Vec<Vec<(Bytes, usize)>> = (0..args.clients)
        .map(|c| {
            batches(1000 + c, args.cycles_per_batch, per_client)
                .iter()
                .map(|b| (bundle_for(&mappings, &builder, b), per_batch))
                .collect()
        })
        .collect();
    let ehr_clients: Vec<_> = (0..args.clients)
        .map(|_| pki.client("gateway-client"))
        .collect();
    let baseline = run_phase(
        ehr_clients,
        ehr.base_url.clone().into(),
        direct_bodies,
        "application/fhir+json",
        args.seconds,
    )
    .await;

    let gateway_bodies = vendor_bodies(0, args.clients, args.cycles_per_batch, per_client);
    let vendors: Vec<_> = (0..args.clients).map(|_| pki.client(GETINGE)).collect();
    let through = run_phase(
        vendors,
        gateway.url("/v1/observations").into(),
        gateway_bodies,
        "application/json",
        args.seconds,
    )
    .await;

    // Outbox mode: 202 once fsync'd, delivery in the background; measured until all delivered.
    let outbox_dir = tempfile::tempdir()?;
    let durable = GatewayProcess::start(
        &with_outbox(
            &gateway_config(
                &pki,
                &ehr.base_url,
                WriteStyle::TRANSACTION_CONDITIONAL,
                "gateway-client",
            ),
            &outbox_dir.path().join("outbox.sqlite"),
        )
        .replace("max_body_bytes = 262144", "max_body_bytes = 4194304"),
    )?;
    let durable_bodies = vendor_bodies(2000, args.clients, args.cycles_per_batch, per_client);
    let vendors: Vec<_> = (0..args.clients).map(|_| pki.client(GETINGE)).collect();
    let started = Instant::now();
    let accepted = run_phase(
        vendors,
        durable.url("/v1/observations").into(),
        durable_bodies,
        "application/json",
        args.seconds,
    )
    .await;
    let (queues, drained) = drain(&pki, &durable, started, args.seconds * 4).await?;

    baseline.print("EHR direct");
    through.print("gateway");
    accepted.print("outbox 202");
    let commits = queues["outbox"]["commits"].as_u64().unwrap_or(0);
    println!(
        "outbox: {} messages delivered (the readings and a Provenance per request) end to end in {:.2} s = {:.0} readings/s; {} requests in {} commits ({:.1} requests per fsync); {}",
        queues["destinations"][0]["delivered"],
        drained.as_secs_f64(),
        accepted.readings as f64 / drained.as_secs_f64(),
        accepted.requests,
        commits,
        accepted.requests as f64 / commits.max(1) as f64,
        queues["destinations"][0],
    );
    println!(
        "ratio gateway/direct: {:.2} (throughput), p50 latency x{:.2}",
        through.readings_per_second() / baseline.readings_per_second(),
        through.percentile(0.5).as_secs_f64() / baseline.percentile(0.5).as_secs_f64().max(1e-9)
    );
    if let Some(kib) = gateway.peak_rss_kib() {
        println!("gateway peak RSS: {:.1} MiB (direct)", kib as f64 / 1024.0);
    }
    if let Some(kib) = durable.peak_rss_kib() {
        println!("gateway peak RSS: {:.1} MiB (outbox)", kib as f64 / 1024.0);
    }
    println!(
        "EHR now holds {} Observations",
        ehr.ehr.count("Observation")
    );
    drop(durable);
    if args.slow_ehr_latency_ms > 0 {
        slow_ehr_phase(&args, &pki).await?;
    }
    Ok(())
}

/// Polls the admin API until nothing is pending (or `limit_seconds` since `started` have
/// passed); the last queue stats and the time since `started`.
async fn drain(
    pki: &TestPki,
    gateway: &GatewayProcess,
    started: Instant,
    limit_seconds: u64,
) -> Result<(Value, Duration), gateway::BoxError> {
    let admin = pki.client(ADMIN);
    loop {
        let queues = admin
            .get(&gateway.admin_url("/admin/v1/queues"))
            .await?
            .json();
        if queues["destinations"][0]["pending"] == 0
            || started.elapsed() > Duration::from_secs(limit_seconds)
        {
            return Ok((queues, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outbox delivery to a far, strict EHR: every write delayed, transactions limited in size.
async fn slow_ehr_phase(args: &Args, pki: &TestPki) -> Result<(), gateway::BoxError> {
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse()?)
        .await?;
    ehr.ehr.fail_fraction(
        conformance_tests::ehr::Fault::delay(Duration::from_millis(args.slow_ehr_latency_ms)),
        1.0,
    );
    ehr.ehr.limit_transaction_entries(args.slow_ehr_max_entries);
    let outbox_dir = tempfile::tempdir()?;
    let gateway = GatewayProcess::start(
        &with_outbox(
            &gateway_config(
                pki,
                &ehr.base_url,
                WriteStyle::TRANSACTION_CONDITIONAL,
                "gateway-client",
            ),
            &outbox_dir.path().join("outbox.sqlite"),
        )
        .replace("max_body_bytes = 262144", "max_body_bytes = 4194304")
        .replace(
            "max_attempts = 1\n",
            &format!(
                "max_attempts = 1\nconcurrency = {}\n",
                args.slow_ehr_concurrency
            ),
        ),
    )?;
    let bodies = vendor_bodies(
        3000,
        args.clients,
        args.cycles_per_batch,
        args.slow_batches_per_client,
    );
    let vendors: Vec<_> = (0..args.clients).map(|_| pki.client(GETINGE)).collect();
    let started = Instant::now();
    let accepted = run_phase(
        vendors,
        gateway.url("/v1/observations").into(),
        bodies,
        "application/json",
        args.seconds,
    )
    .await;
    let (queues, drained) = drain(pki, &gateway, started, args.seconds * 4).await?;
    accepted.print("outbox 202, far EHR");
    println!(
        "far EHR ({} ms per write, at most {} entries per transaction, concurrency {}): {} of {} messages delivered in {:.2} s = {:.0} readings/s; most writes in flight at once: {}",
        args.slow_ehr_latency_ms,
        args.slow_ehr_max_entries,
        args.slow_ehr_concurrency,
        queues["destinations"][0]["delivered"],
        queues["destinations"][0]["accepted"],
        drained.as_secs_f64(),
        queues["destinations"][0]["delivered"]
            .as_f64()
            .unwrap_or(0.0)
            * (accepted.readings as f64 / (accepted.readings + accepted.requests).max(1) as f64)
            / drained.as_secs_f64(),
        ehr.ehr.max_concurrent_writes(),
    );
    let writes = ehr.ehr.writes();
    let mut per_second = vec![0usize; drained.as_secs() as usize + 1];
    for w in &writes {
        let at = w.arrived.saturating_duration_since(started).as_secs() as usize;
        if let Some(n) = per_second.get_mut(at) {
            *n += 1;
        }
    }
    println!(
        "far EHR: {} writes, {} refused as too big; writes per second: {:?}",
        writes.len(),
        writes.iter().filter(|w| w.status == 400).count(),
        per_second
    );
    Ok(())
}
