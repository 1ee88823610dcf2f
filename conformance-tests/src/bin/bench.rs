//! The benchmark: in one run on one machine, three ceiling servers over the gateway's own mutual
//! TLS accept loop (202 at once; + serde_json parse and serialize; + a shared group-commit
//! fsync), the gateway with its durable outbox delivering to the reference EHR, and the EHR on
//! its own, all driven with the same requests. Prints Markdown tables: throughput, latency,
//! server CPU and each gateway row as a ratio of the fsync ceiling; then delivery (lag and drain
//! rate at the EHR, the EHR-direct baseline, a far and strict EHR) and the gateway's memory.
//!
//! `cargo run --release -p conformance-tests --bin bench` (`--repeat 3` quotes medians of 3).
//! Traffic stays on 127.0.0.1 and stops by itself.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use conformance_tests::ceiling::{self, CeilingKind};
use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::{Fault, ReferenceEhr, RunningEhr};
use conformance_tests::harness::{ADMIN, GETINGE, GatewayProcess, TestPki, durable_config};
use gateway::BoxError;
use gateway::config::{FhirFormat, WriteMode};
use gateway::delivery::request_builder::RequestBuilder;
use gateway::outbox::throwaway_postgres::ThrowawayCluster;
use http::Method;
use http_body_util::BodyExt;
use mappings::{DeviceContext, Mappings, Reading, ReadingFlags, ReadingValue};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The gateway's allocator, for the ceiling servers and the reference EHR this process runs:
/// under glibc's malloc the EHR's frees and consolidations were two fifths of this process's
/// CPU, taken from the gateway it shares the cores with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    serve: Option<Serve>,
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients (consoles), each with its own mutual-TLS connections.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Readings per batch request.
    #[arg(long, default_value_t = 100)]
    batch_readings: usize,
    /// Single-reading requests per second in the open-loop phase.
    #[arg(long, default_value_t = 2000)]
    open_loop_rate: u64,
    /// Readings per second offered (in batches, open loop) in the sustained delivery phase.
    #[arg(long, default_value_t = 50_000)]
    sustained_rate: u64,
    /// The far EHR: this much latency added to every write ...
    #[arg(long, default_value_t = 100)]
    far_ehr_latency_ms: u64,
    /// ... at most this many entries per transaction (as Medplum's 8) ...
    #[arg(long, default_value_t = 8)]
    far_ehr_max_entries: usize,
    /// ... this many readings sent to it ...
    #[arg(long, default_value_t = 20_000)]
    far_ehr_readings: usize,
    /// ... and the destination's `concurrency` for it.
    #[arg(long, default_value_t = 64)]
    far_ehr_concurrency: usize,
    /// Runs of every phase; figures are the medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Only the gateway's phases, no ceilings (to profile it; the table then has no ratios).
    #[arg(long)]
    gateway_only: bool,
    /// A memory soak at the sustained rate for this long (0 skips it).
    #[arg(long, default_value_t = 0)]
    soak_seconds: u64,
    /// Skip the PostgreSQL outbox's rows (they start a throwaway server from Debian's
    /// postgresql).
    #[arg(long)]
    no_postgres: bool,
    /// Only the PostgreSQL outbox's rows (no ratios to the SQLite gateway then), with the
    /// server's own account of its statements.
    #[arg(long)]
    postgres_only: bool,
}

#[derive(Subcommand)]
enum Serve {
    /// Serve one ceiling (the benchmark starts each as its own process).
    #[command(hide = true)]
    Ceiling {
        #[arg(long, value_enum)]
        kind: CeilingKind,
        #[arg(long)]
        certs: PathBuf,
    },
}

/// One request of a phase: where it goes (a path on the server under test), its body and how
/// many readings it carries.
#[derive(Clone)]
struct Job {
    path: Arc<str>,
    body: Bytes,
    readings: usize,
}

/// What one phase measured.
#[derive(Default, Clone)]
struct Measured {
    requests: usize,
    readings: usize,
    failures: usize,
    /// Sorted.
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// Server CPU over the phase, in % of one core.
    cpu: Option<f64>,
    /// The first refusal, to say why a phase failed.
    first_failure: Option<String>,
}

impl Measured {
    fn per_second(&self, n: usize) -> f64 {
        n as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index].as_secs_f64() * 1e3
    }
}

/// A server under test: where it listens and, when it is a process of its own, its pid.
struct Target {
    base_url: String,
    pid: Option<u32>,
    clients: Vec<MtlsClient>,
}

/// CPU time of process `pid` so far, in clock ticks (USER_HZ, 100 per second on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The outbox's database file and its write-ahead log now, in MiB (the log's size shows
/// whether checkpoints let it start again from its beginning under load).
fn outbox_files_mib(outbox: &std::path::Path) -> String {
    let mib = |suffix: &str| {
        let mut name = outbox.as_os_str().to_owned();
        name.push(suffix);
        std::fs::metadata(&name).map_or(0.0, |m| m.len() as f64 / 1024.0 / 1024.0)
    };
    format!(
        "outbox {} MiB + WAL {} MiB",
        fmt(mib(""), 1),
        fmt(mib("-wal"), 1)
    )
}

/// The outbox's disk as the gateway's metrics count it (totals since its start).
#[derive(Clone, Copy, Default)]
struct DiskStats {
    commits: u64,
    commit_seconds: f64,
    /// Commits longer than [`DiskStats::SLOW`].
    commits_slow: u64,
    restarts: u64,
    held: u64,
    held_seconds: f64,
    held_slow: u64,
}

impl DiskStats {
    /// A stall this long (a bucket bound of the gateway's latency histograms) fills a vendor's
    /// share of requests at 2,000 requests/s, in seconds.
    const SLOW: f64 = 0.064;

    async fn scrape(admin: &MtlsClient, gateway: &GatewayProcess) -> Option<Self> {
        let answer = admin.get(&gateway.admin_url("/metrics")).await.ok()?;
        let text = String::from_utf8(answer.body.to_vec()).ok()?;
        // `name{labels} value` lines; a series is picked by its name and a label it has.
        let series = |name: &str, label: &str| -> Vec<(String, f64)> {
            text.lines()
                .filter_map(|line| {
                    let (series, value) = line.rsplit_once(' ')?;
                    let (series_name, labels) = series.split_once('{').unwrap_or((series, "}"));
                    (series_name == name && labels.contains(label))
                        .then(|| Some((labels.to_owned(), value.parse::<f64>().ok()?)))
                        .flatten()
                })
                .collect()
        };
        let value =
            |name: &str, label: &str| -> f64 { series(name, label).iter().map(|(_, v)| v).sum() };
        // Observations up to SLOW: the bucket whose bound is SLOW.
        let within = |name: &str| -> f64 {
            series(name, "le=\"")
                .iter()
                .filter(|(labels, _)| {
                    labels
                        .split("le=\"")
                        .nth(1)
                        .and_then(|rest| rest.split('"').next())
                        .and_then(|bound| bound.parse::<f64>().ok())
                        .is_some_and(|bound| (bound - Self::SLOW).abs() < 1e-9)
                })
                .map(|(_, v)| v)
                .sum()
        };
        let commit = "ecmo_outbox_commit_duration_seconds";
        let held = "ecmo_outbox_writer_held_seconds";
        let commits = value(&format!("{commit}_count"), "");
        let held_count = value(&format!("{held}_count"), "");
        Some(Self {
            commits: commits as u64,
            commit_seconds: value(&format!("{commit}_sum"), ""),
            commits_slow: (commits - within(&format!("{commit}_bucket"))) as u64,
            restarts: value(
                "ecmo_outbox_checkpoint_duration_seconds_count",
                "mode=\"restart\"",
            ) as u64,
            held: held_count as u64,
            held_seconds: value(&format!("{held}_sum"), ""),
            held_slow: (held_count - within(&format!("{held}_bucket"))) as u64,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            commits: self.commits - before.commits,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            commits_slow: self.commits_slow - before.commits_slow,
            restarts: self.restarts - before.restarts,
            held: self.held - before.held,
            held_seconds: self.held_seconds - before.held_seconds,
            held_slow: self.held_slow - before.held_slow,
        }
    }
}

/// Resident memory of `pid` now (`VmRSS`), in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
}

/// Counts the readings of each 2xx answer, for the delivery sampler.
type Accepted = Arc<AtomicU64>;

async fn send(target: &Target, client: &MtlsClient, job: &Job) -> Result<(), String> {
    let url = format!("{}{}", target.base_url, job.path);
    match client
        .send(
            Method::POST,
            &url,
            Some("application/json"),
            job.body.clone(),
        )
        .await
    {
        Ok(answer) if answer.status.is_success() => Ok(()),
        Ok(answer) => Err(format!(
            "HTTP {}: {}",
            answer.status.as_u16(),
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Each client sends its jobs one after another until the deadline (closed loop); `cycle`
/// starts a client's list again when it runs out (for servers that do not care about content).
async fn closed_loop(
    target: &Arc<Target>,
    jobs: &[Vec<Job>],
    seconds: u64,
    cycle: bool,
    accepted: &Accepted,
) -> Measured {
    let start = Instant::now();
    let ticks = target.pid.and_then(cpu_ticks);
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, jobs) in jobs.iter().enumerate() {
        let (target, jobs, accepted) = (target.clone(), jobs.clone(), accepted.clone());
        tasks.spawn(async move {
            let client = &target.clients[index % target.clients.len()];
            let mut m = Measured::default();
            for i in 0.. {
                let job = match (jobs.get(i), cycle) {
                    (Some(job), _) => job,
                    (None, true) if !jobs.is_empty() => &jobs[i % jobs.len()],
                    _ => break,
                };
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                record(&mut m, send(&target, client, job).await, job, &accepted);
                m.latencies.push(sent.elapsed());
            }
            m
        });
    }
    finish(tasks, start, target.pid, ticks).await
}

fn record(m: &mut Measured, outcome: Result<(), String>, job: &Job, accepted: &Accepted) {
    m.requests += 1;
    match outcome {
        Ok(()) => {
            m.readings += job.readings;
            accepted.fetch_add(job.readings as u64, Ordering::Relaxed);
        }
        Err(why) => {
            m.failures += 1;
            m.first_failure.get_or_insert(why);
        }
    }
}

/// Sends `jobs` round-robin over the clients at `rate` per second whatever the answers take
/// (open loop); latency counts from when each request was due, so a slow server is not
/// flattered by sending less.
async fn open_loop(
    target: &Arc<Target>,
    jobs: Vec<Job>,
    rate: u64,
    accepted: &Accepted,
) -> Measured {
    let start = Instant::now();
    let ticks = target.pid.and_then(cpu_ticks);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut tasks = tokio::task::JoinSet::new();
    for (n, job) in jobs.into_iter().enumerate() {
        let due = start + interval * n as u32;
        tokio::time::sleep_until(due.into()).await;
        let (target, accepted) = (target.clone(), accepted.clone());
        tasks.spawn(async move {
            let client = &target.clients[n % target.clients.len()];
            let mut m = Measured::default();
            record(&mut m, send(&target, client, &job).await, &job, &accepted);
            m.latencies.push(due.elapsed());
            m
        });
    }
    finish(tasks, start, target.pid, ticks).await
}

async fn finish(
    mut tasks: tokio::task::JoinSet<Measured>,
    start: Instant,
    pid: Option<u32>,
    ticks: Option<u64>,
) -> Measured {
    let mut all = Measured::default();
    while let Some(Ok(m)) = tasks.join_next().await {
        all.requests += m.requests;
        all.readings += m.readings;
        all.failures += m.failures;
        all.latencies.extend(m.latencies);
        all.first_failure = all.first_failure.or(m.first_failure);
    }
    all.elapsed = start.elapsed();
    all.latencies.sort_unstable();
    if let (Some(pid), Some(before)) = (pid, ticks) {
        all.cpu = cpu_ticks(pid)
            .map(|after| (after - before) as f64 / 100.0 / all.elapsed.as_secs_f64() * 100.0);
    }
    all
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.replace_nanosecond(at.millisecond() as u32 * 1_000_000)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Batches of `per_batch` readings from console `serial`, new readings in each (the console's
/// clock moves a second per cycle of 12 parameters, starting a day ago).
fn reading_batches(serial: &str, per_batch: usize, count: usize) -> Vec<Value> {
    let mut console = SimulatedCardiohelp::new(serial, serial.len() as u64);
    let mut at = OffsetDateTime::now_utc() - time::Duration::days(1);
    let mut pending: Vec<Value> = Vec::new();
    let mut batches = Vec::with_capacity(count);
    while batches.len() < count {
        while pending.len() < per_batch {
            pending.extend(console.cycle(at));
            at += time::Duration::seconds(1);
        }
        let rest = pending.split_off(per_batch);
        batches.push(console.batch(std::mem::replace(&mut pending, rest)));
    }
    batches
}

/// Per client, `count` vendor batch requests of `per_batch` readings; `phase` keeps the
/// consoles of different phases apart so that every phase writes new readings.
fn vendor_jobs(phase: &str, clients: usize, per_batch: usize, count: usize) -> Vec<Vec<Job>> {
    let path: Arc<str> = "/v1/observations".into();
    (0..clients)
        .map(|c| {
            reading_batches(&format!("{phase}-{c:03}"), per_batch, count)
                .iter()
                .map(|batch| Job {
                    path: path.clone(),
                    body: Bytes::from(serde_json::to_vec(batch).unwrap_or_default()),
                    readings: per_batch,
                })
                .collect()
        })
        .collect()
}

/// Per client, a run that starts on its console and then `count - 1` weaning trials.
fn run_event_jobs(phase: &str, clients: usize, count: usize) -> Vec<Vec<Job>> {
    let start = OffsetDateTime::now_utc() - time::Duration::days(1);
    (0..clients)
        .map(|c| {
            let path: Arc<str> = format!("/v1/runs/{phase}-RUN-{c:03}/events").into();
            let started = json!({
                "eventId": "started", "type": "started", "time": rfc3339(start),
                "patient": {"system": conformance_tests::console::SIM_MRN_SYSTEM, "value": format!("MRN-{phase}-{c}")},
                "mode": "vv", "supportType": "respiratory",
                "console": {"serial": format!("{phase}-{c:03}"), "model": "CARDIOHELP-i"}
            });
            std::iter::once(started)
                .chain((1..count).map(|n| {
                    let at = start + time::Duration::minutes(n as i64);
                    json!({
                        "eventId": format!("trial-{n}"), "type": "weaning-trial",
                        "time": rfc3339(at), "end": rfc3339(at + time::Duration::seconds(30))
                    })
                }))
                .map(|event| Job {
                    path: path.clone(),
                    body: Bytes::from(serde_json::to_vec(&event).unwrap_or_default()),
                    readings: 0,
                })
                .collect()
        })
        .collect()
}

/// The transaction Bundle the gateway itself would send for `batch`.
fn bundle_for(mappings: &Mappings, builder: &RequestBuilder, batch: &Value) -> Bytes {
    let Some(family) = mappings.family_for_model("CARDIOHELP-i") else {
        return Bytes::new();
    };
    let context = DeviceContext {
        family,
        serial: batch["device"]["serial"].as_str().unwrap_or(""),
        model: "CARDIOHELP-i",
        patient: None,
        window: mappings::TimeWindow {
            received_at: OffsetDateTime::now_utc(),
            max_future_skew: time::Duration::minutes(5),
            max_past_age: time::Duration::days(30),
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
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(request.into_body().collect())
    })
    .map(|c| c.to_bytes())
    .unwrap_or_default()
}

/// A ceiling server running as a process of its own (so that its CPU is its own); killed
/// when dropped.
struct CeilingProcess {
    child: Child,
    addr: String,
}

impl CeilingProcess {
    fn start(kind: CeilingKind, certs: &std::path::Path) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["ceiling", "--kind"])
            .arg(format!("{kind:?}").to_lowercase())
            .arg("--certs")
            .arg(certs)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .ok_or_else(|| format!("ceiling did not start: {line:?}"))?
            .to_owned();
        Ok(Self { child, addr })
    }
}

impl Drop for CeilingProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve_ceiling(kind: CeilingKind, certs: PathBuf) -> Result<(), BoxError> {
    gateway::install_crypto_provider();
    let tls = gateway::tls::server_config(
        &certs.join("server.pem"),
        &certs.join("server.key"),
        &[certs.join("ca.pem")],
        &[],
    )?;
    let dir = tempfile::tempdir()?;
    ceiling::serve(kind, tls, "127.0.0.1:0".parse()?, dir.path(), |addr| {
        println!("listening {addr}");
    })
    .await
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Batches,
    Single,
    OpenLoop,
    RunEvents,
}

impl Workload {
    const ALL: [Self; 4] = [Self::Batches, Self::Single, Self::OpenLoop, Self::RunEvents];

    fn label(self, args: &Args) -> String {
        match self {
            Self::Batches => format!("batches of {}, closed loop", args.batch_readings),
            Self::Single => "single reading, closed loop".into(),
            Self::OpenLoop => format!("single reading, open loop {}/s", args.open_loop_rate),
            Self::RunEvents => "run events, closed loop".into(),
        }
    }
}

/// The requests of one workload for a server; `phase` names new consoles and runs.
fn jobs_for(workload: Workload, args: &Args, phase: &str, budget: usize) -> Vec<Vec<Job>> {
    let per_client = budget.div_ceil(args.clients).max(1);
    match workload {
        Workload::Batches => vendor_jobs(phase, args.clients, args.batch_readings, per_client),
        Workload::Single | Workload::OpenLoop => vendor_jobs(phase, args.clients, 1, per_client),
        Workload::RunEvents => run_event_jobs(phase, args.clients, per_client),
    }
}

/// Request budgets per workload: more than the gateway can send in the phase, so it never runs
/// out; ceilings cycle through theirs.
fn budget(workload: Workload, args: &Args) -> usize {
    let s = args.seconds as usize;
    match workload {
        Workload::Batches => 2_000 * s,
        Workload::Single => 15_000 * s,
        Workload::OpenLoop => args.open_loop_rate as usize * s,
        Workload::RunEvents => 300 * s,
    }
}

async fn run_workload(
    target: &Arc<Target>,
    workload: Workload,
    jobs: Vec<Vec<Job>>,
    args: &Args,
    cycle: bool,
    accepted: &Accepted,
) -> Measured {
    match workload {
        Workload::OpenLoop => {
            let count = args.open_loop_rate as usize * args.seconds as usize;
            open_loop(
                target,
                interleave(jobs, count),
                args.open_loop_rate,
                accepted,
            )
            .await
        }
        _ => closed_loop(target, &jobs, args.seconds, cycle, accepted).await,
    }
}

/// A delivery sample: when, readings accepted so far, Observations the EHR holds so far.
type Sample = (Instant, u64, u64);

/// Samples acceptance and the EHR every 10 ms until `stop` says so.
fn sample_delivery(
    ehr: &ReferenceEhr,
    accepted: &Accepted,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let (ehr, accepted) = (ehr.clone(), accepted.clone());
    let held_before = ehr.count("Observation") as u64;
    let accepted_before = accepted.load(Ordering::Relaxed);
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            samples.push((
                Instant::now(),
                accepted.load(Ordering::Relaxed) - accepted_before,
                ehr.count("Observation") as u64 - held_before,
            ));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples
    })
}

/// What delivery did in a phase.
struct Delivery {
    accepted: u64,
    delivered: u64,
    /// Readings per second while the EHR was taking them (first to last delivered).
    drain_rate: f64,
    /// Accepted-to-delivered lag: p50, p99, max.
    lag_ms: [f64; 3],
    /// From the end of the load to the last delivery.
    after_load: Duration,
}

fn delivery_of(samples: &[Sample], load_ended: Instant) -> Delivery {
    let accepted = samples.last().map_or(0, |s| s.1);
    let delivered = samples.last().map_or(0, |s| s.2);
    let first = samples.iter().find(|s| s.2 > 0).map(|s| s.0);
    let last = samples.iter().find(|s| s.2 >= delivered).map(|s| s.0);
    let drain_rate = match (first, last) {
        (Some(first), Some(last)) if last > first => {
            delivered as f64 / (last - first).as_secs_f64()
        }
        _ => f64::NAN,
    };
    // For each level of acceptance, how long until the EHR held as many.
    let mut lags = Vec::new();
    let mut k = 0;
    for &(at, level, _) in samples.iter().filter(|s| s.1 > 0) {
        while k < samples.len() && samples[k].2 < level {
            k += 1;
        }
        let Some(reached) = samples.get(k) else { break };
        lags.push(reached.0.saturating_duration_since(at));
    }
    lags.sort_unstable();
    let pick = |p: f64| {
        lags.get(((lags.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    Delivery {
        accepted,
        delivered,
        drain_rate,
        lag_ms: [pick(0.5), pick(0.99), pick(1.0)],
        after_load: last.map_or(Duration::ZERO, |l| l.saturating_duration_since(load_ended)),
    }
}

/// Runs `load` while sampling delivery to `ehr`, then waits until the EHR holds what was
/// accepted (or `limit` passed).
async fn with_delivery(
    ehr: &ReferenceEhr,
    accepted: &Accepted,
    limit: Duration,
    load: impl std::future::Future<Output = Measured>,
) -> (Measured, Delivery) {
    let held_before = ehr.count("Observation") as u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_delivery(ehr, accepted, stop.clone());
    let measured = load.await;
    let load_ended = Instant::now();
    let deadline = load_ended + limit;
    while (ehr.count("Observation") as u64) < held_before + measured.readings as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One more sample after the last delivery.
    tokio::time::sleep(Duration::from_millis(20)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();
    (measured, delivery_of(&samples, load_ended))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Medians over repeats of one row.
struct Row {
    req_s: f64,
    readings_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    failures: usize,
    cpu: f64,
    first_failure: Option<String>,
}

impl Row {
    fn of(runs: &[Measured]) -> Self {
        let m = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f).collect());
        Self {
            req_s: m(&|r| r.per_second(r.requests - r.failures)),
            readings_s: m(&|r| r.per_second(r.readings)),
            p50: m(&|r| r.percentile_ms(0.5)),
            p99: m(&|r| r.percentile_ms(0.99)),
            p999: m(&|r| r.percentile_ms(0.999)),
            failures: runs.iter().map(|r| r.failures).sum(),
            cpu: m(&|r| r.cpu.unwrap_or(f64::NAN)),
            first_failure: runs.iter().find_map(|r| r.first_failure.clone()),
        }
    }
}

fn fmt(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.decimals$}")
    }
}

fn with_thousands(v: f64) -> String {
    if v.is_nan() {
        return "-".into();
    }
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mtls_clients(pki: &TestPki, stem: &str, n: usize) -> Vec<MtlsClient> {
    (0..n).map(|_| pki.client(stem)).collect()
}

/// The gateway as the benchmark runs it: the durable outbox (202 after fsync), delivering to
/// `ehr_url` with the destination's defaults except what `tune` changes.
fn start_gateway(
    pki: &TestPki,
    ehr_url: &str,
    outbox: &std::path::Path,
    tune: &str,
) -> Result<GatewayProcess, BoxError> {
    start_gateway_with(pki, ehr_url, outbox, tune, "")
}

/// [`start_gateway`] with `extra` (TOML) at the end of its config.
fn start_gateway_with(
    pki: &TestPki,
    ehr_url: &str,
    outbox: &std::path::Path,
    tune: &str,
    extra: &str,
) -> Result<GatewayProcess, BoxError> {
    let config = durable_config(pki, ehr_url, outbox)
    // The harness's test settings (fast retries, one attempt) would not be a fair figure.
    .replace(
        "max_attempts = 1\nlinger = \"5ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\nretry_backoff_max = \"2s\"\n",
        tune,
    ) + "\n[hl7v2]\nlisten = \"127.0.0.1:0\"\n\n[hl7v2.patient_identifier_systems]\nHOSP = \"urn:oid:1.2.36.146.595.217.0.1\"\n" + extra;
    GatewayProcess::start(&config)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if let Some(Serve::Ceiling { kind, certs }) = args.serve {
        return serve_ceiling(kind, certs).await;
    }
    let pki = TestPki::generate()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bench: {} clients, {} s per phase, {} run(s), {} cores shared by the load tool and the servers\n",
        args.clients, args.seconds, args.repeat, cores
    );
    let ehr = ReferenceEhr::new();
    ehr.skip_structure_check();
    ehr.forget_bodies();
    let ehr = start_ehr(ehr, &pki).await?;
    let outbox_dir = tempfile::tempdir()?;
    let outbox = outbox_dir.path().join("outbox.sqlite");
    let gateway = start_gateway(&pki, &ehr.base_url, &outbox, "")?;
    let kinds = [CeilingKind::Bare, CeilingKind::Parse, CeilingKind::Fsync];
    let ceilings = kinds
        .into_iter()
        .filter(|_| !args.gateway_only)
        .map(|kind| Ok((kind, CeilingProcess::start(kind, pki.as_ref())?)))
        .collect::<Result<Vec<_>, BoxError>>()?;

    let mut servers: Vec<(String, Arc<Target>, bool)> = ceilings
        .iter()
        .map(|(kind, process)| {
            (
                kind.label().to_owned(),
                Arc::new(Target {
                    base_url: format!("https://{}", process.addr),
                    pid: Some(process.child.id()),
                    clients: mtls_clients(&pki, GETINGE, args.clients),
                }),
                true,
            )
        })
        .collect();
    servers.push((
        "the gateway (outbox, 202 after fsync)".into(),
        Arc::new(Target {
            base_url: gateway.base_url.clone(),
            pid: Some(gateway.pid()),
            clients: mtls_clients(&pki, GETINGE, args.clients),
        }),
        false,
    ));

    let accepted: Accepted = Arc::default();
    if args.postgres_only {
        return postgres_phases(&args, &pki, &ehr, &accepted, &[]).await;
    }
    let mut results: BTreeMap<(usize, Workload), Vec<Measured>> = BTreeMap::new();
    let mut deliveries: Vec<Delivery> = Vec::new();
    // After each of the gateway's phases of the first run: RSS then, and the peak so far.
    let mut memory: Vec<(String, Option<f64>, Option<u64>, String)> = Vec::new();
    // What each of the gateway's phases of the first run cost the outbox's disk.
    let admin = pki.client(ADMIN);
    let mut disk: Vec<(String, DiskStats)> = Vec::new();
    for run in 0..args.repeat {
        for workload in Workload::ALL {
            // One set of requests per workload and run: the ceilings get the same bodies as the
            // gateway (which needs new readings in every run).
            let jobs = jobs_for(
                workload,
                &args,
                &format!("B{run}{}", workload as u8),
                budget(workload, &args),
            );
            for (index, (_, target, cycle)) in servers.iter().enumerate() {
                let is_gateway = !cycle;
                let load = run_workload(target, workload, jobs.clone(), &args, *cycle, &accepted);
                let disk_before = if is_gateway && run == 0 {
                    DiskStats::scrape(&admin, &gateway).await
                } else {
                    None
                };
                let measured = if is_gateway {
                    // Every phase waits for delivery, so the next one starts on an empty queue.
                    let (measured, delivery) = with_delivery(
                        &ehr.ehr,
                        &accepted,
                        Duration::from_secs(args.seconds * 12),
                        load,
                    )
                    .await;
                    if workload == Workload::Batches {
                        deliveries.push(delivery);
                    }
                    measured
                } else {
                    load.await
                };
                if let (Some(before), Some(after)) =
                    (disk_before, DiskStats::scrape(&admin, &gateway).await)
                {
                    disk.push((workload.label(&args), after.since(&before)));
                }
                if is_gateway && run == 0 {
                    memory.push((
                        workload.label(&args),
                        rss_mib(gateway.pid()),
                        gateway.peak_rss_kib(),
                        outbox_files_mib(&outbox),
                    ));
                }
                results.entry((index, workload)).or_default().push(measured);
            }
        }
    }

    println!("## Ingest (medians of {} run(s))\n", args.repeat);
    println!(
        "| server | workload | req/s | readings/s | p50 ms | p99 ms | p99.9 ms | failed | server CPU | x fsync ceiling (throughput) | x fsync ceiling (p99) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let fsync_index = 2;
    let gateway_index = servers.len() - 1;
    let mut failures = Vec::new();
    for workload in Workload::ALL {
        for (index, (name, _, _)) in servers.iter().enumerate() {
            let row = Row::of(&results[&(index, workload)]);
            let ratios = if index == gateway_index && !args.gateway_only {
                let ceiling = Row::of(&results[&(fsync_index, workload)]);
                (
                    format!("{:.3}", row.req_s / ceiling.req_s),
                    format!("{:.2}", row.p99 / ceiling.p99),
                )
            } else {
                ("".into(), "".into())
            };
            if let Some(why) = &row.first_failure {
                failures.push(format!("{name}, {}: {why}", workload.label(&args)));
            }
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {}% | {} | {} |",
                workload.label(&args),
                with_thousands(row.req_s),
                if workload == Workload::RunEvents {
                    "-".into()
                } else {
                    with_thousands(row.readings_s)
                },
                fmt(row.p50, 2),
                fmt(row.p99, 2),
                fmt(row.p999, 2),
                row.failures,
                fmt(row.cpu, 0),
                ratios.0,
                ratios.1,
            );
        }
    }
    for failure in &failures {
        println!("\nfirst failure: {failure}");
    }
    if !args.no_postgres {
        let sqlite_rows: Vec<(Workload, Row)> = [Workload::Batches, Workload::Single]
            .into_iter()
            .map(|w| (w, Row::of(&results[&(gateway_index, w)])))
            .collect();
        postgres_phases(&args, &pki, &ehr, &accepted, &sqlite_rows).await?;
    }

    // HL7 v2 in: the same readings as ORU^R01 over MLLP with mutual TLS, compared with HTTPS.
    if let Some(mllp) = gateway.mllp {
        println!(
            "\n## HL7 v2 in: ORU^R01 over MLLP, mutual TLS (medians of {} run(s))\n",
            args.repeat
        );
        println!(
            "| workload | messages/s | readings/s | p50 ms | p99 ms | p99.9 ms | failed | server CPU | x the same over HTTPS (readings/s) |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (per_message, https) in [
            (args.batch_readings, Workload::Batches),
            (1, Workload::Single),
        ] {
            let mut runs = Vec::new();
            for run in 0..args.repeat {
                let measured = with_delivery(
                    &ehr.ehr,
                    &accepted,
                    Duration::from_secs(args.seconds * 12),
                    mllp_closed_loop(
                        &args,
                        &pki,
                        mllp,
                        gateway.pid(),
                        &format!("H{run}-{per_message}"),
                        per_message,
                        &accepted,
                    ),
                )
                .await
                .0;
                runs.push(measured);
            }
            let row = Row::of(&runs);
            let over_https = Row::of(&results[&(gateway_index, https)]);
            println!(
                "| {} reading(s) per message, closed loop | {} | {} | {} | {} | {} | {} | {}% | {:.2} |",
                per_message,
                with_thousands(row.req_s),
                with_thousands(row.readings_s),
                fmt(row.p50, 2),
                fmt(row.p99, 2),
                fmt(row.p999, 2),
                row.failures,
                fmt(row.cpu, 0),
                row.readings_s / over_https.readings_s,
            );
            if let Some(why) = row.first_failure {
                println!("\nfirst failure: {why}");
            }
        }
    }

    // The EHR on its own: the Bundles the gateway would send, posted straight to it.
    let mappings = Mappings::embedded()?;
    let builder = RequestBuilder::new(
        "baseline",
        &ehr.base_url,
        WriteMode::ConditionalCreate,
        FhirFormat::Json,
    );
    let mut direct_runs = Vec::new();
    let ehr_target = Arc::new(Target {
        base_url: ehr.base_url.clone(),
        pid: None,
        clients: mtls_clients(&pki, "gateway-client", args.clients),
    });
    for run in 0..args.repeat {
        let per_client = budget(Workload::Batches, &args).div_ceil(args.clients);
        let jobs: Vec<Vec<Job>> = (0..args.clients)
            .map(|c| {
                reading_batches(&format!("D{run}-{c:03}"), args.batch_readings, per_client)
                    .iter()
                    .map(|b| Job {
                        path: "".into(),
                        body: bundle_for(&mappings, &builder, b),
                        readings: args.batch_readings,
                    })
                    .collect()
            })
            .collect();
        direct_runs
            .push(closed_loop(&ehr_target, &jobs, args.seconds, false, &Arc::default()).await);
    }
    let direct = Row::of(&direct_runs);

    let (sustained, sustained_delivery) =
        sustained_phase(&args, &pki, &ehr, &gateway, &accepted).await;
    memory.push((
        "sustained, open loop".into(),
        rss_mib(gateway.pid()),
        gateway.peak_rss_kib(),
        outbox_files_mib(&outbox),
    ));
    let far = far_ehr_phase(&args, &pki).await?;

    println!("\n## Delivery to the reference EHR\n");
    println!(
        "| phase | offered | accepted readings/s | delivered | drain readings/s | lag p50 ms | lag p99 ms | lag max ms | drained after the load |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let batch_ingest = Row::of(&results[&(gateway_index, Workload::Batches)]);
    let d = |f: &dyn Fn(&Delivery) -> f64| median(deliveries.iter().map(f).collect());
    println!(
        "| batches of {}, closed loop | as fast as accepted | {} | {} of {} | {} | {} | {} | {} | {:.2} s |",
        args.batch_readings,
        with_thousands(batch_ingest.readings_s),
        d(&|x| x.delivered as f64),
        d(&|x| x.accepted as f64),
        with_thousands(d(&|x| x.drain_rate)),
        fmt(d(&|x| x.lag_ms[0]), 0),
        fmt(d(&|x| x.lag_ms[1]), 0),
        fmt(d(&|x| x.lag_ms[2]), 0),
        d(&|x| x.after_load.as_secs_f64()),
    );
    println!(
        "| sustained, open loop | {} readings/s | {} | {} of {} | {} | {} | {} | {} | {:.2} s |",
        with_thousands(args.sustained_rate as f64),
        with_thousands(sustained.per_second(sustained.readings)),
        sustained_delivery.delivered,
        sustained_delivery.accepted,
        with_thousands(sustained_delivery.drain_rate),
        fmt(sustained_delivery.lag_ms[0], 0),
        fmt(sustained_delivery.lag_ms[1], 0),
        fmt(sustained_delivery.lag_ms[2], 0),
        sustained_delivery.after_load.as_secs_f64(),
    );
    println!(
        "| far EHR: +{} ms per write, at most {} entries per transaction, concurrency {} | {} readings | {} | {} of {} | {} | {} | {} | {} | {:.2} s |",
        args.far_ehr_latency_ms,
        args.far_ehr_max_entries,
        args.far_ehr_concurrency,
        args.far_ehr_readings,
        with_thousands(far.0.per_second(far.0.readings)),
        far.1.delivered,
        far.1.accepted,
        with_thousands(far.1.drain_rate),
        fmt(far.1.lag_ms[0], 0),
        fmt(far.1.lag_ms[1], 0),
        fmt(far.1.lag_ms[2], 0),
        far.1.after_load.as_secs_f64(),
    );
    println!(
        "\nEHR direct (the same transaction Bundles posted straight to the reference EHR, no R4 check): {} readings/s, p50 {} ms, p99 {} ms, {} failed; delivery drained at {:.2} x that.",
        with_thousands(direct.readings_s),
        fmt(direct.p50, 2),
        fmt(direct.p99, 2),
        direct.failures,
        d(&|x| x.drain_rate) / direct.readings_s,
    );
    if let Some(why) = direct.first_failure {
        println!("first EHR-direct failure: {why}");
    }
    println!(
        "\nGateway memory: peak RSS {:.1} MiB, now {} MiB.",
        gateway.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        fmt(rss_mib(gateway.pid()).unwrap_or(f64::NAN), 1),
    );
    let phases: Vec<String> = memory
        .iter()
        .map(|(phase, now, peak, files)| {
            format!(
                "{phase}: {} MiB (peak so far {} MiB), {files}",
                fmt(now.unwrap_or(f64::NAN), 1),
                fmt(peak.map_or(f64::NAN, |k| k as f64 / 1024.0), 1)
            )
        })
        .collect();
    println!("After each phase: {}.", phases.join("; "));
    if !disk.is_empty() {
        println!(
            "\n## The outbox's disk in each gateway phase (SQLite; from the gateway's /metrics)\n"
        );
        println!(
            "| phase | group commits | mean commit ms | commits over 64 ms | restart checkpoints | writer held: times, total ms, over 64 ms |"
        );
        println!("|---|---:|---:|---:|---:|---|");
        for (phase, d) in &disk {
            println!(
                "| {phase} | {} | {} | {} | {} | {}, {}, {} |",
                d.commits,
                fmt(d.commit_seconds * 1000.0 / d.commits.max(1) as f64, 2),
                d.commits_slow,
                d.restarts,
                d.held,
                fmt(d.held_seconds * 1000.0, 1),
                d.held_slow,
            );
        }
    }
    if args.soak_seconds > 0 {
        soak(&args, &pki, &gateway, &accepted).await;
    }
    Ok(())
}

/// Batches offered at `sustained_rate` readings/s for the phase, open loop; delivery measured
/// until the EHR holds them all.
async fn sustained_phase(
    args: &Args,
    pki: &TestPki,
    ehr: &RunningEhr,
    gateway: &GatewayProcess,
    accepted: &Accepted,
) -> (Measured, Delivery) {
    let batches_per_second = (args.sustained_rate / args.batch_readings as u64).max(1);
    let count = (batches_per_second * args.seconds) as usize;
    let jobs = vendor_jobs(
        "S",
        args.clients,
        args.batch_readings,
        count.div_ceil(args.clients),
    );
    let flat = interleave(jobs, count);
    let target = Arc::new(Target {
        base_url: gateway.base_url.clone(),
        pid: Some(gateway.pid()),
        clients: mtls_clients(pki, GETINGE, args.clients),
    });
    with_delivery(
        &ehr.ehr,
        accepted,
        Duration::from_secs(args.seconds * 12),
        open_loop(&target, flat, batches_per_second, accepted),
    )
    .await
}

/// The reference EHR's own runtime (worker threads named `ehr`), apart from the load tool's.
/// On one runtime an EHR handler holding the store's lock (a synchronous mutex) across a
/// rehash of its maps, millions of entries by the later phases, blocked every worker of the
/// bench for that long, the open-loop sender among them, which then sent its backlog at once.
fn ehr_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ehr")
            .enable_all()
            .build()
            .expect("the reference EHR's runtime")
    })
}

/// Starts `ehr` on [`ehr_runtime`], over the test PKI's EHR certificate.
async fn start_ehr(ehr: ReferenceEhr, pki: &TestPki) -> Result<RunningEhr, BoxError> {
    let tls = pki.ehr_tls("ca.pem");
    let addr = "127.0.0.1:0".parse()?;
    Ok(ehr_runtime().spawn(ehr.start(tls, addr)).await??)
}

/// Outbox delivery to a far, strict EHR: every write delayed, transactions limited in size.
async fn far_ehr_phase(args: &Args, pki: &TestPki) -> Result<(Measured, Delivery), BoxError> {
    let ehr = ReferenceEhr::new();
    ehr.skip_structure_check();
    ehr.forget_bodies();
    ehr.fail_fraction(
        Fault::delay(Duration::from_millis(args.far_ehr_latency_ms)),
        1.0,
    );
    ehr.limit_transaction_entries(args.far_ehr_max_entries);
    let ehr = start_ehr(ehr, pki).await?;
    let outbox_dir = tempfile::tempdir()?;
    let gateway = start_gateway(
        pki,
        &ehr.base_url,
        &outbox_dir.path().join("outbox.sqlite"),
        &format!("concurrency = {}\n", args.far_ehr_concurrency),
    )?;
    let target = Arc::new(Target {
        base_url: gateway.base_url.clone(),
        pid: Some(gateway.pid()),
        clients: mtls_clients(pki, GETINGE, args.clients),
    });
    let batches = args.far_ehr_readings.div_ceil(args.batch_readings);
    let jobs = vendor_jobs(
        "F",
        args.clients,
        args.batch_readings,
        batches.div_ceil(args.clients),
    );
    let accepted: Accepted = Arc::default();
    Ok(with_delivery(
        &ehr.ehr,
        &accepted,
        Duration::from_secs(args.seconds * 24),
        closed_loop(&target, &jobs, args.seconds * 4, false, &accepted),
    )
    .await)
}

/// The sustained load for `soak_seconds`, the gateway's resident memory after every 10 s.
async fn soak(args: &Args, pki: &TestPki, gateway: &GatewayProcess, accepted: &Accepted) {
    let target = Arc::new(Target {
        base_url: gateway.base_url.clone(),
        pid: Some(gateway.pid()),
        clients: mtls_clients(pki, GETINGE, args.clients),
    });
    let batches_per_second = (args.sustained_rate / args.batch_readings as u64).max(1);
    let mut series = Vec::new();
    let mut refused = 0;
    for chunk in 0..args.soak_seconds.div_ceil(10) {
        let count = (batches_per_second * 10) as usize;
        let jobs = vendor_jobs(
            &format!("K{chunk}"),
            args.clients,
            args.batch_readings,
            count.div_ceil(args.clients),
        );
        let measured = open_loop(
            &target,
            interleave(jobs, count),
            batches_per_second,
            accepted,
        )
        .await;
        refused += measured.failures;
        series.push(rss_mib(gateway.pid()).unwrap_or(f64::NAN));
    }
    let shown: Vec<String> = series.iter().map(|v| fmt(*v, 1)).collect();
    println!(
        "\nSoak: {} s at {} readings/s offered, {refused} requests refused; gateway RSS (MiB) every 10 s: {}",
        args.soak_seconds,
        with_thousands(args.sustained_rate as f64),
        shown.join(", ")
    );
}

/// The clients' lists taken round-robin (each console's requests keep their order), at most
/// `count`.
/// The outbox on PostgreSQL, for the same workloads as the SQLite gateway's rows: one gateway,
/// then two replicas sharing the queue (the clients split between them); each a ratio of the
/// SQLite row of the same workload. The server is a throwaway cluster on this machine (it
/// shares the cores too), with PostgreSQL's defaults (`synchronous_commit = on`).
async fn postgres_phases(
    args: &Args,
    pki: &TestPki,
    ehr: &RunningEhr,
    accepted: &Accepted,
    sqlite_rows: &[(Workload, Row)],
) -> Result<(), BoxError> {
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster = ThrowawayCluster::start_profiled()?;
        cluster.database()?;
        cluster.psql("db0", "CREATE EXTENSION pg_stat_statements")?;
        Ok::<_, gateway::outbox::throwaway_postgres::ClusterError>(cluster)
    })
    .await??;
    let outbox_dir = tempfile::tempdir()?;
    let replica = |name: &str| {
        format!(
            "\n[delivery.postgres]\nurl = \"{}\"\nreplica = \"{name}\"\n",
            cluster.url("db0")
        )
    };
    let unused = outbox_dir.path().join("unused.sqlite");
    let first = start_gateway_with(pki, &ehr.base_url, &unused, "", &replica("bench-a"))?;
    let mut rows: Vec<(String, Workload, Row)> = Vec::new();
    for replicas in [1, 2] {
        let second = (replicas == 2)
            .then(|| start_gateway_with(pki, &ehr.base_url, &unused, "", &replica("bench-b")))
            .transpose()?;
        let gateways: Vec<&GatewayProcess> =
            std::iter::once(&first).chain(second.as_ref()).collect();
        let targets: Vec<Arc<Target>> = gateways
            .iter()
            .map(|g| {
                Arc::new(Target {
                    base_url: g.base_url.clone(),
                    pid: Some(g.pid()),
                    clients: mtls_clients(pki, GETINGE, args.clients / gateways.len()),
                })
            })
            .collect();
        for workload in [Workload::Batches, Workload::Single] {
            let mut runs = Vec::new();
            for run in 0..args.repeat {
                let jobs = jobs_for(
                    workload,
                    args,
                    &format!("PG{replicas}{run}{}", workload as u8),
                    budget(workload, args),
                );
                // Each replica gets its share of the clients and their requests.
                let mut shares: Vec<Vec<Vec<Job>>> = vec![Vec::new(); targets.len()];
                for (n, client_jobs) in jobs.into_iter().enumerate() {
                    shares[n % targets.len()].push(client_jobs);
                }
                let load = async {
                    let mut loads = tokio::task::JoinSet::new();
                    for (target, jobs) in targets.iter().cloned().zip(shares) {
                        let (accepted, seconds) = (accepted.clone(), args.seconds);
                        loads.spawn(async move {
                            closed_loop(&target, &jobs, seconds, false, &accepted).await
                        });
                    }
                    let mut parts = Vec::new();
                    while let Some(Ok(measured)) = loads.join_next().await {
                        parts.push(measured);
                    }
                    combined(parts)
                };
                let (measured, _) = with_delivery(
                    &ehr.ehr,
                    accepted,
                    Duration::from_secs(args.seconds * 12),
                    load,
                )
                .await;
                runs.push(measured);
            }
            let label = match replicas {
                1 => "PostgreSQL, one gateway".to_owned(),
                n => format!("PostgreSQL, {n} replicas sharing the queue"),
            };
            rows.push((label, workload, Row::of(&runs)));
        }
    }
    println!(
        "\n## The outbox on PostgreSQL (medians of {} run(s); the server shares the cores)\n",
        args.repeat
    );
    println!(
        "| store | workload | req/s | readings/s | p50 ms | p99 ms | failed | gateways' CPU | x the SQLite gateway (readings/s) | x the SQLite gateway (p99) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (label, workload, row) in &rows {
        let sqlite = sqlite_rows
            .iter()
            .find(|(w, _)| w == workload)
            .map(|(_, row)| row);
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {}% | {} | {} |",
            workload.label(args),
            with_thousands(row.req_s),
            with_thousands(row.readings_s),
            fmt(row.p50, 2),
            fmt(row.p99, 2),
            row.failures,
            fmt(row.cpu, 0),
            sqlite.map_or(String::new(), |s| format!(
                "{:.2}",
                row.readings_s / s.readings_s
            )),
            sqlite.map_or(String::new(), |s| format!("{:.2}", row.p99 / s.p99)),
        );
        if let Some(why) = &row.first_failure {
            println!("\nfirst failure ({label}): {why}");
        }
    }
    let top = cluster.psql(
        "db0",
        "SELECT calls, round(total_exec_time) AS total_ms, round(mean_exec_time::numeric, 3) AS mean_ms,
                left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS statement
         FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 10",
    )?;
    println!(
        "\nThe server's busiest statements (pg_stat_statements, all phases):\n\n```\n{top}```"
    );
    Ok(())
}

/// The phases of several servers measured at once, as one: their requests together, over the
/// longest of their times, their CPU summed.
fn combined(parts: Vec<Measured>) -> Measured {
    let mut all = Measured::default();
    for m in parts {
        all.requests += m.requests;
        all.readings += m.readings;
        all.failures += m.failures;
        all.latencies.extend(m.latencies);
        all.elapsed = all.elapsed.max(m.elapsed);
        all.cpu = match (all.cpu, m.cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        all.first_failure = all.first_failure.or(m.first_failure);
    }
    all.latencies.sort_unstable();
    all
}

fn interleave(jobs: Vec<Vec<Job>>, count: usize) -> Vec<Job> {
    let longest = jobs.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest)
        .flat_map(|i| jobs.iter().filter_map(move |j| j.get(i).cloned()))
        .take(count)
        .collect()
}

/// One ORU^R01 per request of `per_message` readings (RPM and Flow in turn, a second apart)
/// from console `serial`, as a device integration system sends them.
fn oru_messages(serial: &str, per_message: usize, count: usize) -> Vec<String> {
    let mut at = OffsetDateTime::now_utc() - time::Duration::days(1);
    let offset = time::macros::offset!(+1);
    let dtm = |t: OffsetDateTime| gateway::hl7v2::er7::dtm(t.to_offset(offset));
    (0..count)
        .map(|n| {
            let mut message = format!(
                "MSH|^~\\&|BENCH|ICU|GW|HOSP|{}||ORU^R01^ORU_R01|{serial}-{n}|P|2.6|||NE|AL||UNICODE UTF-8\rPID|||MRN-{serial}^^^HOSP^MR\rOBX|1||ECMO^ECMO console^99ECMO|1.0.0.0|||||||X|||||||{serial}^CARDIOHELP-i\r",
                dtm(at)
            );
            for i in 0..per_message {
                let (code, value, unit) = if i % 2 == 0 {
                    ("RPM", format!("{}", 3000 + (n + i) % 500), "/min^^UCUM")
                } else {
                    ("Flow", format!("4.{}", (n + i) % 90 + 10), "L/min^^UCUM")
                };
                message.push_str(&format!(
                    "OBX|{}|NM|{code}^^99CH|1.1.1.{}|{value}|{unit}|||||F|||{}\r",
                    i + 2,
                    i % 2 + 1,
                    dtm(at)
                ));
                if i % 2 == 1 {
                    at += time::Duration::seconds(1);
                }
            }
            at += time::Duration::seconds(1);
            message
        })
        .collect()
}

/// Each client sends its messages over its own MLLP connection, one at a time, until the
/// phase ends; an ACK other than AA is a failure.
async fn mllp_closed_loop(
    args: &Args,
    pki: &TestPki,
    mllp: std::net::SocketAddr,
    pid: u32,
    phase: &str,
    per_message: usize,
    accepted: &Accepted,
) -> Measured {
    let budget = if per_message > 1 { 2_000 } else { 15_000 } * args.seconds as usize;
    let per_client = budget.div_ceil(args.clients).max(1);
    let mut senders = Vec::new();
    for _ in 0..args.clients {
        match conformance_tests::mllp::MllpSender::tls(
            mllp,
            &pki.path("ca.pem"),
            &pki.path(&format!("{GETINGE}.pem")),
            &pki.path(&format!("{GETINGE}.key")),
        )
        .await
        {
            Ok(sender) => senders.push(sender),
            Err(e) => {
                return Measured {
                    failures: 1,
                    first_failure: Some(format!("MLLP connect: {e}")),
                    ..Measured::default()
                };
            }
        }
    }
    let start = Instant::now();
    let ticks = cpu_ticks(pid);
    let deadline = start + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for (c, mut sender) in senders.into_iter().enumerate() {
        let messages = oru_messages(&format!("{phase}-{c:03}"), per_message, per_client);
        let accepted = accepted.clone();
        tasks.spawn(async move {
            let mut m = Measured::default();
            for message in messages {
                if Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                let job = Job {
                    path: "".into(),
                    body: Bytes::new(),
                    readings: per_message,
                };
                let outcome = match sender.send(&message).await {
                    Ok(ack) => match conformance_tests::mllp::Ack::parse(&ack) {
                        ack if ack.code == "AA" => Ok(()),
                        ack => Err(format!("{} {:?}", ack.code, ack.errors.first())),
                    },
                    Err(e) => Err(e.to_string()),
                };
                record(&mut m, outcome, &job, &accepted);
                m.latencies.push(sent.elapsed());
            }
            m
        });
    }
    finish(tasks, start, Some(pid), ticks).await
}
