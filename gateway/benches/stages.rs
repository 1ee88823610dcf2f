//! What each stage of the request path costs, per batch of 100 readings (criterion reports
//! readings/s): body parse, ingest schema check, mapping to FHIR, conformance check, bundle
//! encoding (JSON and XML), outbox enqueue (with its fsync), and the whole in-process stack.
//!
//! `cargo bench -p gateway --bench stages` (the end-to-end figures over TLS come from
//! `cargo run --release -p conformance-tests --bin bench`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gateway::config::{Corrections, FhirFormat, VendorSettings, WriteMode};
use gateway::delivery::request_builder::RequestBuilder;
use gateway::delivery::{BoxFuture, DeliveryError, Handoff, OutboundBatch, Receipt};
use gateway::ingress::conformance::ConformanceRules;
use gateway::ingress::{IngressParts, IngressSettings, Vendors, build_stack};
use gateway::outbox::sqlite::SqliteOutbox;
use gateway::outbox::{NewMessage, Outbox, content_hash};
use gateway::peer::PeerIdentity;
use gateway::runs::RunRegistry;
use gateway::validation::Schemas;
use http::Request;
use http_body_util::{BodyExt, Full};
use mappings::{
    DeviceContext, MappedResource, Mappings, PatientRef, Reading, ReadingFlags, ReadingValue,
    TimeWindow,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt;

const READINGS: usize = 100;

/// A console's batch: 100 readings of the Cardiohelp's parameters, one second apart per cycle.
fn batch_body(serial: &str, start: OffsetDateTime) -> Vec<u8> {
    let cycle: [(&str, Value, Option<&str>); 10] = [
        ("Flow", json!(4.21), Some("L/min")),
        ("RPM", json!(3520), Some("rpm")),
        ("PVen", json!(-62), Some("mmHg")),
        ("PInt", json!(252), Some("mmHg")),
        ("PArt", json!(221), Some("mmHg")),
        ("SvO2", json!(71.5), Some("%")),
        ("Hb", json!(10.4), Some("g/dL")),
        ("TVen", json!(36.7), Some("Cel")),
        ("TArt", json!(36.9), Some("Cel")),
        ("Bubble", json!(false), None),
    ];
    let readings: Vec<Value> = (0..READINGS)
        .map(|i| {
            let (parameter, value, unit) = &cycle[i % cycle.len()];
            let at = start + time::Duration::seconds((i / cycle.len()) as i64);
            let mut reading = json!({"parameter": parameter, "value": value,
                "time": at.format(&Rfc3339).unwrap()});
            if let Some(unit) = unit {
                reading["unit"] = json!(unit);
            }
            reading
        })
        .collect();
    serde_json::to_vec(&json!({
        "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-BENCH"},
        "device": {"serial": serial, "model": "CARDIOHELP-i", "firmware": "5.1.2"},
        "readings": readings,
    }))
    .unwrap()
}

fn window() -> TimeWindow {
    TimeWindow {
        received_at: OffsetDateTime::now_utc(),
        max_future_skew: time::Duration::minutes(5),
        max_past_age: time::Duration::hours(24),
    }
}

/// The readings of a parsed batch, mapped as the gateway maps them.
fn map_all(mappings: &Mappings, body: &Value) -> Vec<MappedResource> {
    let family = mappings.family_for_model("CARDIOHELP-i").unwrap();
    let context = DeviceContext {
        family,
        serial: body["device"]["serial"].as_str().unwrap(),
        model: "CARDIOHELP-i",
        patient: Some(PatientRef {
            system: body["patient"]["system"].as_str().unwrap(),
            value: body["patient"]["value"].as_str().unwrap(),
        }),
        window: window(),
    };
    body["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value = match &r["value"] {
                Value::Number(n) => ReadingValue::Number(n.as_str()),
                Value::Bool(b) => ReadingValue::Boolean(*b),
                _ => unreachable!(),
            };
            let reading = Reading {
                parameter: r["parameter"].as_str().unwrap(),
                value,
                unit: r["unit"].as_str(),
                time: r["time"].as_str().unwrap(),
                flags: ReadingFlags::default(),
                run: None,
            };
            mappings.map_reading(&context, &reading).unwrap()
        })
        .collect()
}

/// Takes every batch and answers at once: the stack's own cost, without storage.
struct Discard;

impl Handoff for Discard {
    fn submit(&self, _batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        Box::pin(async {
            Ok(Receipt::Delivered {
                destinations: vec![],
            })
        })
    }
}

fn stages(c: &mut Criterion) {
    let start = OffsetDateTime::now_utc() - time::Duration::minutes(30);
    let body = batch_body("CH-BENCH-1", start);
    let value: Value = serde_json::from_slice(&body).unwrap();
    let mappings = Arc::new(Mappings::embedded().unwrap());
    let schemas = Schemas::embedded().unwrap();
    let rules = ConformanceRules::embedded().unwrap();
    let resources = map_all(&mappings, &value);

    let mut group = c.benchmark_group("per batch of 100 readings");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function("parse JSON body", |b| {
        b.iter(|| serde_json::from_slice::<Value>(&body).unwrap())
    });
    let schema = schemas.get("observation-batch").unwrap();
    group.bench_function("ingest schema check", |b| {
        b.iter(|| assert!(schema.check(&value).is_empty()))
    });
    group.bench_function("map to FHIR Observations", |b| {
        b.iter(|| map_all(&mappings, &value))
    });
    group.bench_function("conformance check of the built resources", |b| {
        b.iter(|| {
            for resource in &resources {
                let parsed: Value = serde_json::from_slice(&resource.json).unwrap();
                assert!(rules.issues(resource.resource_type, parsed).is_empty());
            }
        })
    });
    for (name, format) in [
        ("encode transaction Bundle, JSON", FhirFormat::Json),
        ("encode transaction Bundle, XML", FhirFormat::Xml),
    ] {
        let builder = RequestBuilder::new(
            "bench",
            "https://ehr.invalid/fhir",
            WriteMode::ConditionalCreate,
            format,
        );
        group.bench_function(name, |b| {
            b.iter(|| builder.transaction(&resources).unwrap())
        });
    }
    group.finish();

    outbox(c, &resources);
    whole_stack(c, &body, mappings, schemas);
}

/// Enqueue into a real outbox file (group commit, fsync): one request at a time, so this is
/// the latency-bound figure; concurrent requests share commits.
fn outbox(c: &mut Criterion, resources: &[MappedResource]) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = SqliteOutbox::open(&dir.path().join("outbox.sqlite")).unwrap();
    let mut round = 0u64;
    let mut group = c.benchmark_group("per batch of 100 readings, storage");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.sample_size(20);
    group.bench_function("outbox enqueue, one request per commit", |b| {
        b.iter_batched(
            || {
                round += 1;
                resources
                    .iter()
                    .map(|r| NewMessage {
                        destination: "ehr".into(),
                        resource_type: r.resource_type.into(),
                        // New resources every round, as a live feed writes them.
                        logical_id: format!("{}-{round}", r.id),
                        identifier_system: r.identifier_system.to_string(),
                        identifier_value: format!("{}-{round}", r.identifier_value),
                        content_hash: content_hash(&r.json),
                        body: r.json.clone(),
                        upsert: false,
                        revision: None,
                        corrections: Corrections::Amend,
                        chart_due_ms: None,
                        chart_reading: None,
                    })
                    .collect::<Vec<_>>()
            },
            |messages| {
                let batch_id = uuid::Uuid::new_v4().to_string();
                runtime
                    .block_on(outbox.enqueue(batch_id.into(), messages, None))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The whole ingress stack in process (no TLS, no storage): decode, authorize, schema, map,
/// conformance, hand-off, response.
fn whole_stack(c: &mut Criterion, body: &[u8], mappings: Arc<Mappings>, schemas: Schemas) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _guard = runtime.enter();
    let runs = RunRegistry::open(&dir.path().join("runs.sqlite"), mappings.clone()).unwrap();
    let stack = build_stack::<Full<Bytes>>(
        IngressSettings {
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            max_concurrent_requests: 64,
            max_concurrent_requests_per_vendor: 64,
            max_future_skew: Duration::from_secs(300),
            max_past_age: Duration::from_secs(24 * 3600),
        },
        Vendors::new(
            &[VendorSettings {
                name: "getinge".into(),
                identity: "getinge".into(),
                serials: vec![],
                models: vec!["CARDIOHELP-i".into()],
                ..VendorSettings::default()
            }],
            &[],
            None,
        )
        .unwrap(),
        IngressParts {
            mappings: mappings.into(),
            schemas,
            runs,
            conformance: Arc::new(ConformanceRules::embedded().unwrap()),
            clocks: Arc::default(),
        },
        Arc::new(Discard),
    );
    let body = Bytes::copy_from_slice(body);
    let mut group = c.benchmark_group("per batch of 100 readings, whole path");
    group.throughput(Throughput::Elements(READINGS as u64));
    group.bench_function("ingress stack in process, POST /v1/observations", |b| {
        b.iter(|| {
            let mut request = Request::post("/v1/observations")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .unwrap();
            request
                .extensions_mut()
                .insert(PeerIdentity::named(&["getinge"]));
            runtime.block_on(async {
                let response = stack.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
