//! The whole flow on one machine, no outside server: a test PKI, the reference EHR, the real
//! gateway binary, and a simulated CARDIOHELP-i posting readings over mutual TLS.
//!
//! `cargo run -p conformance-tests --bin ecmo-demo` (add `-- --help` for options).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::ReferenceEhr;
use conformance_tests::harness::{EhrReader, GatewayProcess, durable_config};
use serde_json::json;
use time::OffsetDateTime;

#[derive(Parser)]
#[command(about = "Runs test PKI + reference EHR + gateway + a simulated ECMO console, end to end")]
struct Args {
    /// Console cycles to send (one batch of 12 readings each).
    #[arg(long, default_value_t = 10)]
    cycles: u32,
    /// Time between cycles, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Keep the EHR and the gateway running after the console stops, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Where the test PKI and the gateway configuration are written.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../certs/dev"))]
    dir: PathBuf,
}

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";

#[tokio::main]
async fn main() -> Result<(), gateway::BoxError> {
    let args = Args::parse();
    gateway::install_crypto_provider();
    let dir = std::fs::canonicalize(std::fs::create_dir_all(&args.dir).map(|_| &args.dir)?)?;
    let p = |f: &str| dir.join(f);

    println!("== 1. Test PKI");
    if !p("ca.pem").exists() {
        gateway::certs::init_dir(&dir)?;
        println!("   made a test CA and certificates in {}", dir.display());
    } else {
        println!("   using the test PKI in {}", dir.display());
    }

    println!("== 2. Reference EHR (FHIR R4, mutual TLS, in-memory)");
    let tls = gateway::tls::server_config(&p("server.pem"), &p("server.key"), &[p("ca.pem")], &[])?;
    let ehr = ReferenceEhr::new();
    let running_ehr = match ehr
        .clone()
        .start(tls.clone(), "127.0.0.1:9443".parse()?)
        .await
    {
        Ok(running) => running,
        Err(_) => ehr.clone().start(tls, "127.0.0.1:0".parse()?).await?,
    };
    println!("   listening at {}", running_ehr.base_url);

    println!("== 3. Gateway (the real binary, its own process)");
    // The product default: a durable outbox (answer 202 once on disk, deliver in the background).
    let outbox = dir.join("outbox.sqlite");
    let _ = std::fs::remove_file(&outbox);
    let config = format!(
        "# Written by ecmo-demo; every key is explained in gateway/gateway.example.toml.\n{}\n[hl7v2]\nlisten = \"127.0.0.1:0\"\n",
        durable_config(&dir, &running_ehr.base_url, &outbox)
    );
    std::fs::write(p("gateway.toml"), &config)?;
    let gateway = GatewayProcess::start(&config)?;
    let url = gateway.url("/v1/observations");
    println!(
        "   listening at {} (config: {})",
        gateway.base_url,
        p("gateway.toml").display()
    );

    println!("== 4. An adult VV ECMO run starts on console CH-0042 (patient MRN-DEMO-1, ARDS)");
    let _ = std::fs::remove_file(dir.join("runs.sqlite"));
    let run_id = format!("DEMO-{}", OffsetDateTime::now_utc().unix_timestamp());
    let run_url = gateway.url(&format!("/v1/runs/{run_id}/events"));
    let rfc = |t: OffsetDateTime| {
        t.replace_nanosecond(t.millisecond() as u32 * 1_000_000)
            .unwrap_or(t)
            .format(&time::format_description::well_known::Rfc3339)
    };
    let run_start = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let vendor = MtlsClient::new(
        &p("ca.pem"),
        Some((&p("vendor-getinge.pem"), &p("vendor-getinge.key"))),
    )?;
    let started = vendor
        .post_json(
            &run_url,
            &json!({
                "eventId": "started", "type": "started", "time": rfc(run_start)?,
                "patient": {"system": MRN, "value": "MRN-DEMO-1"}, "birthDate": "1979-05-14",
                "mode": "vv", "supportType": "respiratory",
                "indications": [{"code": "67782005", "display": "Acute respiratory distress syndrome"}],
                "cannulas": [
                    {"id": "drainage", "site": {"code": "83419000", "display": "femoral vein"}, "laterality": "right", "role": "drainage"},
                    {"id": "return", "site": {"code": "12123001", "display": "internal jugular vein"}, "laterality": "right", "role": "return"}
                ],
                "console": {"serial": "CH-0042", "model": "CARDIOHELP-i"}
            }),
        )
        .await?;
    println!(
        "   run {run_id} started -> HTTP {}",
        started.status.as_u16()
    );
    println!(
        "== 5. The simulated CARDIOHELP-i posts {} cycles naming no patient: the run says whose they are",
        args.cycles
    );
    let mut console = SimulatedCardiohelp::new("CH-0042", 42).without_patient();
    let mut first_batch = None;
    let mut last_tracking: Option<String> = None;
    for cycle in 1..=args.cycles {
        let batch = console.next_batch(OffsetDateTime::now_utc());
        let answer = vendor.post_json(&url, &batch).await?;
        let receipt = answer.json();
        println!(
            "   cycle {cycle:>2}: 12 readings -> HTTP {} {}, tracking id {}",
            answer.status.as_u16(),
            receipt["status"].as_str().unwrap_or("?"),
            receipt["trackingId"].as_str().unwrap_or("-")
        );
        last_tracking = receipt["trackingId"].as_str().map(str::to_owned);
        first_batch.get_or_insert(batch);
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }

    let admin = MtlsClient::new(&p("ca.pem"), Some((&p("admin.pem"), &p("admin.key"))))?;
    println!("== 5b. Delivery, as the admin API (mutual TLS, admin certificate) shows it");
    for _ in 0..100 {
        let queues = admin
            .get(&gateway.admin_url("/admin/v1/queues"))
            .await?
            .json();
        if queues["destinations"][0]["pending"] == 0 {
            println!("   {}", queues["destinations"][0]);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(tracking) = &last_tracking {
        let status = admin
            .get(&gateway.admin_url(&format!("/admin/v1/deliveries/{tracking}")))
            .await?
            .json();
        println!(
            "   last batch complete: {}, first message: {}",
            status["complete"], status["messages"][0]
        );
    }

    let reader = EhrReader {
        client: MtlsClient::new(
            &p("ca.pem"),
            Some((&p("gateway-client.pem"), &p("gateway-client.key"))),
        )?,
        base_url: running_ehr.base_url.clone(),
    };
    let held = reader.all("Observation").await?.len();
    println!("== 6. Resending cycle 1 (a retry after a lost answer)");
    if let Some(batch) = &first_batch {
        let answer = vendor.post_json(&url, batch).await?;
        let delivered = |q: &serde_json::Value| q["destinations"][0]["pending"] == 0;
        for _ in 0..100 {
            if delivered(
                &admin
                    .get(&gateway.admin_url("/admin/v1/queues"))
                    .await?
                    .json(),
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = reader.all("Observation").await?.len();
        println!(
            "   HTTP {}, delivered again (a conditional create that found its match); the EHR holds {after} Observations, as before ({held}): no duplicates",
            answer.status.as_u16()
        );
    }

    println!("== 7. What a vendor sees when a payload is wrong");
    let bad = json!({
        "device": {"serial": "CH-0042", "model": "CARDIOHELP-i"},
        "readings": [
            {"parameter": "PVen", "value": -60, "unit": "bar", "time": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?},
            {"parameter": "Flow", "value": 42.0, "unit": "L/min", "time": "yesterday"}
        ]
    });
    let answer = vendor.post_json(&url, &bad).await?;
    println!(
        "   HTTP {}:\n{}",
        answer.status.as_u16(),
        indent(&serde_json::to_string_pretty(&answer.json())?)
    );

    if let Some(mllp) = gateway.mllp {
        println!(
            "== 7b. The hospital's device integration system sends a Terumo CDI 500's readings as HL7 v2 (IHE PCD-01 ORU^R01, MLLP over mutual TLS, {mllp})"
        );
        let now = OffsetDateTime::now_utc();
        let dtm = gateway::hl7v2::er7::dtm(now);
        let message = format!(
            "MSH|^~\\&|DIS|ICU|ECMO_GW|HOSP|{dtm}||ORU^R01^ORU_R01|DEMO-CDI-1|P|2.6|||NE|AL||UNICODE UTF-8\r\
             PID|||MRN-DEMO-1^^^&1.2.36.146.595.217.0.1&ISO^MR\r\
             OBR|1|||182777000^monitoring of patient^SCT|||{dtm}\r\
             OBX|1||CDI^Blood parameter monitor^99ECMO|1.0.0.0|||||||X|||||||CDI-7001^CDI 500\r\
             OBX|2|NM|SO2^Venous oxygen saturation^99CDI|1.1.1.1|71.8|%^^UCUM|||||F|||{dtm}\r\
             OBX|3|NM|HCT^Hematocrit^99CDI|1.1.1.2|29|%^^UCUM|||||F|||{dtm}\r"
        );
        let mut sender = conformance_tests::mllp::MllpSender::tls(
            mllp,
            &p("ca.pem"),
            &p("vendor-integration.pem"),
            &p("vendor-integration.key"),
        )
        .await?;
        let ack = sender.send(&message).await?;
        println!("   ACK: {}", ack.trim_end().replace('\r', "\n        "));
    }

    println!("== 8. The run ends: the last cannula is removed, the patient came off alive");
    let ended = vendor
        .post_json(
            &run_url,
            &json!({"eventId": "ended", "type": "ended", "time": rfc(OffsetDateTime::now_utc())?, "reason": "recovered", "alive": true}),
        )
        .await?;
    println!("   HTTP {}", ended.status.as_u16());
    for _ in 0..100 {
        if admin
            .get(&gateway.admin_url("/admin/v1/queues"))
            .await?
            .json()["destinations"][0]["pending"]
            == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let procedures = reader.all("Procedure").await?;
    if let Some(run) = procedures.iter().find(|p| p.get("partOf").is_none()) {
        println!(
            "   the EHR's Procedure: status {}, performed {} to {}, {} child Procedure(s)",
            run["status"],
            run["performedPeriod"]["start"],
            run["performedPeriod"]["end"],
            procedures.len() - 1
        );
    }

    println!("== 9. One Observation as the EHR stored it (subject and partOf from the run)");
    if let Some(observation) = reader.all("Observation").await?.into_iter().next() {
        println!("{}", indent(&serde_json::to_string_pretty(&observation)?));
    }

    println!("== Where to look");
    let curl = format!(
        "curl --cacert {ca} --cert {cert} --key {key}",
        ca = p("ca.pem").display(),
        cert = p("gateway-client.pem").display(),
        key = p("gateway-client.key").display()
    );
    println!(
        "   EHR Observations:   {curl} '{}/Observation'",
        running_ehr.base_url
    );
    println!(
        "   Ingest schema:      curl --cacert {} --cert {} --key {} {}",
        p("ca.pem").display(),
        p("vendor-getinge.pem").display(),
        p("vendor-getinge.key").display(),
        gateway.url("/v1/schemas/observation-batch")
    );
    println!("   Gateway config:     {}", p("gateway.toml").display());
    println!(
        "   Delivery queues:    cargo run -q -p gateway -- deliveries --admin-url {} --ca {} --cert {} --key {} queues",
        gateway.admin_url(""),
        p("ca.pem").display(),
        p("admin.pem").display(),
        p("admin.key").display()
    );
    println!(
        "   Conformance suite:  cargo run -q -p conformance-tests -- --gateway {} --ehr {} --pki {}   (with --keep-running; certificate scenarios without their certificates are skipped)",
        gateway.url(""),
        running_ehr.base_url,
        p("").display()
    );
    println!("   Gateway log (last lines):");
    for line in gateway
        .log_text()
        .lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("     {line}");
    }
    if args.keep_running {
        println!("== Running until Ctrl-C");
        gateway::app::shutdown_signal().await;
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("     {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
