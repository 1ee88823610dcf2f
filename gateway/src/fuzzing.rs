//! Fuzz targets: every parser that faces the network or a config file, fed arbitrary bytes.
//!
//! Each target drives the real code path, the whole ingress stack for request bodies (routing,
//! decoding, schema check, mapping, profile check), and panics on what the gateway promises
//! never to do: a 5xx or a panic for bad input, a refusal that is not an OperationOutcome, or
//! an accepted resource that its own profile check refuses. `gateway/fuzz` runs them under
//! libFuzzer (`cargo fuzz`); the conformance suite replays the seed corpus, mutations of it and
//! every recorded crash on each test run.
//!
//! Compiled only with the `fuzzing` feature (or in tests): nothing here is part of the service.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use mappings::Mappings;
use serde_json::Value;
use tower::{Service, ServiceExt};

use crate::config::{Config, VendorSettings};
use crate::delivery::{BoxFuture, DeliveryError, Handoff, OutboundBatch, Receipt};
use crate::ingress::client_identity::Vendors;
use crate::ingress::conformance::ConformanceRules;
use crate::ingress::stack::{IngressParts, IngressSettings, build_stack};
use crate::peer::PeerIdentity;
use crate::runs::RunRegistry;
use crate::validation::Schemas;
use crate::{BoxBody, BoxError};

/// The fuzz targets, by the name `cargo fuzz run` and the corpus directories use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A readings batch in JSON, `POST /v1/observations`.
    ObservationsJson,
    /// A readings batch in XML, `POST /v1/observations`.
    ObservationsXml,
    /// FHIR-native input: the first byte picks `Observation` or `Bundle`, JSON or XML; the
    /// rest is the body.
    FhirNative,
    /// Run events for one run, in JSON or XML, separated by [`EVENT_SEPARATOR`], each posted
    /// in turn to a fresh run store.
    RunEvents,
    /// Mapping tables: `units.toml`, then device family tables, separated by
    /// [`FILE_SEPARATOR`]; what loads must pass the load-time profile proof or be refused.
    MappingTables,
    /// The gateway's TOML config.
    Config,
    /// HL7 v2 over MLLP: MLLP frames when the input begins with a frame's start byte, else
    /// one whole message; each is read, mapped and acknowledged as the MLLP listener does.
    Hl7v2,
}

/// Between run events in a [`Target::RunEvents`] input.
pub const EVENT_SEPARATOR: &[u8] = b"\n%%\n";
/// Between files in a [`Target::MappingTables`] input.
pub const FILE_SEPARATOR: &[u8] = b"\n#%%\n";
/// The run every [`Target::RunEvents`] input is posted to.
pub const FUZZ_RUN: &str = "RUN-1";
/// The vendor every request comes from: it may post for every mapped model.
pub const FUZZ_VENDOR: &str = "fuzz-vendor";

impl Target {
    pub const ALL: [Target; 7] = [
        Target::ObservationsJson,
        Target::ObservationsXml,
        Target::FhirNative,
        Target::RunEvents,
        Target::MappingTables,
        Target::Config,
        Target::Hl7v2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::ObservationsJson => "observations_json",
            Target::ObservationsXml => "observations_xml",
            Target::FhirNative => "fhir_native",
            Target::RunEvents => "run_events",
            Target::MappingTables => "mapping_tables",
            Target::Config => "config",
            Target::Hl7v2 => "hl7v2_messages",
        }
    }

    /// Runs one input; panics on a broken promise. The statuses of the requests it made, in
    /// order (none for the file parsers).
    pub fn run(self, data: &[u8]) -> Vec<http::StatusCode> {
        match self {
            Target::ObservationsJson => post_one("/v1/observations", "application/json", data),
            Target::ObservationsXml => post_one("/v1/observations", "application/xml", data),
            Target::FhirNative => fhir_native(data),
            Target::RunEvents => run_events(data),
            Target::MappingTables => {
                mapping_tables(data);
                vec![]
            }
            Target::Config => {
                config(data);
                vec![]
            }
            Target::Hl7v2 => hl7v2(data),
        }
    }
}

/// The `FhirNative` variants the first input byte picks from, as (path, content type).
pub const FHIR_NATIVE_VARIANTS: [(&str, &str); 4] = [
    ("/v1/fhir/Observation", "application/fhir+json"),
    ("/v1/fhir/Bundle", "application/fhir+json"),
    ("/v1/fhir/Observation", "application/fhir+xml"),
    ("/v1/fhir/Bundle", "application/fhir+xml"),
];

/// What every input shares, built once per process: the tables, schemas and profile rules
/// load in milliseconds, but not in the microseconds one input may take.
struct Shared {
    runtime: tokio::runtime::Runtime,
    mappings: Arc<Mappings>,
    schemas: Schemas,
    conformance: Arc<ConformanceRules>,
    vendors: Vendors,
    /// For readings: their path only reads the run store, so one serves every input.
    readings_runs: Arc<RunRegistry>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        crate::install_crypto_provider();
        let mappings = Arc::new(Mappings::embedded().expect("embedded mapping tables"));
        let conformance =
            Arc::new(ConformanceRules::embedded().expect("embedded conformance rules"));
        let models: Vec<String> = mappings.models().into_iter().map(str::to_owned).collect();
        let vendors = Vendors::new(
            &[VendorSettings {
                name: FUZZ_VENDOR.into(),
                identity: FUZZ_VENDOR.into(),
                models,
                ..VendorSettings::default()
            }],
            &[],
            None,
        )
        .expect("the fuzz vendor");
        Shared {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            readings_runs: fresh_run_store(&mappings),
            mappings,
            schemas: Schemas::embedded().expect("embedded schemas"),
            conformance,
            vendors,
        }
    })
}

/// An empty run store in memory: a run-event input starts from nothing, so a crash found
/// replays alone.
fn fresh_run_store(mappings: &Arc<Mappings>) -> Arc<RunRegistry> {
    RunRegistry::open(Path::new(":memory:"), mappings.clone()).expect("an in-memory run store")
}

/// Accepts every batch at once.
struct AcceptingHandoff;

impl Handoff for AcceptingHandoff {
    fn submit(&self, _batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        Box::pin(async {
            Ok(Receipt::Delivered {
                destinations: vec![],
            })
        })
    }
}

/// Accepts every batch at once, after checking each resource against the gateway's own
/// profiles: an input that maps to an invalid resource is a finding.
struct CheckingHandoff {
    conformance: Arc<ConformanceRules>,
}

impl Handoff for CheckingHandoff {
    fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
        for resource in batch.descriptions.iter().chain(batch.resources.iter()) {
            let issues = self
                .conformance
                .issues_in(resource.resource_type, &resource.json);
            assert!(
                issues.is_empty(),
                "an accepted input mapped to a {} its profile refuses: {issues:?}",
                resource.resource_type
            );
        }
        Box::pin(async {
            Ok(Receipt::Delivered {
                destinations: vec![],
            })
        })
    }
}

fn stack(
    runs: Arc<RunRegistry>,
    handoff: Arc<dyn Handoff>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<BoxBody>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    let shared = shared();
    let settings = IngressSettings {
        // No wall-clock limit of the stack's own: a fuzzer starved of CPU by a build beside it
        // (or paused) would get a 503 for a request that replays in milliseconds. A hang is
        // libFuzzer's `-timeout` to find.
        request_timeout: Duration::from_secs(24 * 3600),
        max_body_bytes: 1 << 20,
        max_concurrent_requests: 4,
        max_concurrent_requests_per_vendor: 4,
        max_future_skew: Duration::from_secs(300),
        // Seeds carry fixed times; every reading's age is taken, so mapping is reached.
        max_past_age: Duration::from_secs(100 * 365 * 24 * 3600),
    };
    build_stack::<Full<Bytes>>(
        settings,
        shared.vendors.clone(),
        IngressParts {
            mappings: shared.mappings.clone().into(),
            schemas: shared.schemas.clone(),
            runs,
            conformance: shared.conformance.clone(),
            clocks: Arc::default(),
        },
        handoff,
    )
}

fn post<S>(stack: &mut S, path: &str, content_type: &str, body: &[u8]) -> http::StatusCode
where
    S: Service<Request<Full<Bytes>>, Response = Response<BoxBody>, Error = BoxError>,
{
    let mut request = Request::post(path)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("a request");
    request
        .extensions_mut()
        .insert(PeerIdentity::named(&[FUZZ_VENDOR]));
    let response = shared().runtime.block_on(async {
        let response = stack
            .ready()
            .await
            .expect("the stack is ready")
            .call(request)
            .await
            .expect("the stack answers every request");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a response body")
            .to_bytes();
        (status, content_type, body)
    });
    let status = response.0;
    check_response(path, response);
    status
}

/// A 2xx, or a 4xx that is an OperationOutcome with at least one issue; never a 5xx.
fn check_response(path: &str, (status, content_type, body): (http::StatusCode, String, Bytes)) {
    let text = String::from_utf8_lossy(&body);
    assert!(
        !status.is_server_error(),
        "{path}: bad input got {status}: {text}"
    );
    if status.is_success() {
        return;
    }
    assert!(status.is_client_error(), "{path}: unexpected {status}");
    if content_type.contains("xml") {
        assert!(
            text.contains("<OperationOutcome") && text.contains("<issue>"),
            "{path}: {status} without an OperationOutcome: {text}"
        );
    } else {
        let outcome: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: {status} body is not JSON ({e}): {text}"));
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{path}: {status} without an OperationOutcome: {text}"
        );
        assert!(
            outcome["issue"].as_array().is_some_and(|i| !i.is_empty()),
            "{path}: {status} OperationOutcome without issues: {text}"
        );
    }
}

/// A request stack kept for every input of a thread.
type FuzzStack = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<BoxBody>, BoxError>;

thread_local! {
    /// The readings path keeps no state between requests that changes an answer (the device
    /// clocks only record), so one stack serves every input of this thread.
    static READINGS_STACK: std::cell::RefCell<Option<FuzzStack>> = const { std::cell::RefCell::new(None) };
    /// The run events path and its run store, emptied before each input.
    static RUN_EVENTS_STACK: std::cell::RefCell<Option<(FuzzStack, Arc<RunRegistry>)>> = const { std::cell::RefCell::new(None) };
}

fn post_one(path: &str, content_type: &str, body: &[u8]) -> Vec<http::StatusCode> {
    let mut stack = READINGS_STACK.with_borrow_mut(|cached| {
        cached
            .get_or_insert_with(|| {
                FuzzStack::new(stack(
                    shared().readings_runs.clone(),
                    Arc::new(CheckingHandoff {
                        conformance: shared().conformance.clone(),
                    }),
                ))
            })
            .clone()
    });
    vec![post(&mut stack, path, content_type, body)]
}

fn fhir_native(data: &[u8]) -> Vec<http::StatusCode> {
    let Some((&selector, body)) = data.split_first() else {
        return vec![];
    };
    let (path, content_type) = FHIR_NATIVE_VARIANTS[usize::from(selector) % 4];
    post_one(path, content_type, body)
}

/// Splits `data` at every `separator`.
fn split<'a>(data: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    // memmem, not a window-by-window compare: the fuzzer traces every comparison, and that
    // search was a tenth of each input's time.
    let mut parts = Vec::new();
    let mut start = 0;
    for at in memchr::memmem::find_iter(data, separator) {
        if at >= start {
            parts.push(&data[start..at]);
            start = at + separator.len();
        }
    }
    parts.push(&data[start..]);
    parts
}

fn run_events(data: &[u8]) -> Vec<http::StatusCode> {
    // One stack and run store per thread, emptied before each input: an input still starts
    // from no runs (a crash replays alone), without a new store and stack each time.
    let (mut stack, runs) = RUN_EVENTS_STACK.with_borrow_mut(|cached| {
        cached
            .get_or_insert_with(|| {
                let runs = fresh_run_store(&shared().mappings);
                // The path checks every resource it builds against the profiles itself (a
                // failure is a 500, so a finding): the hand-off need not check them again.
                (
                    FuzzStack::new(stack(runs.clone(), Arc::new(AcceptingHandoff))),
                    runs,
                )
            })
            .clone()
    });
    runs.forget_everything()
        .expect("an in-memory run store empties");
    let path = format!("/v1/runs/{FUZZ_RUN}/events");
    // A run has a handful of events; more only repeats the same paths slower.
    let mut statuses = Vec::new();
    for event in split(data, EVENT_SEPARATOR).into_iter().take(16) {
        let xml = event.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
        let content_type = if xml {
            "application/xml"
        } else {
            "application/json"
        };
        statuses.push(post(&mut stack, &path, content_type, event));
    }
    statuses
}

thread_local! {
    /// The MLLP listener's per-message parts; like the readings path, stateless per input.
    static HL7V2_PARTS: std::cell::RefCell<Option<crate::hl7v2::listener::MllpParts>> = const { std::cell::RefCell::new(None) };
}

/// Each message answered as the listener answers it; the ACK must be a readable ACK^R01
/// whose MSA-1 is AA, AE or AR (CA, CE or CR where MSH-15 asks for a commit ACK), and never
/// AR or CR with 207 (the gateway's own failure). The statuses say AA/CA as 200, AE/CE as 422,
/// AR/CR as 400, and no answer (MSH-15/16 asked for none) as 204.
fn hl7v2(data: &[u8]) -> Vec<http::StatusCode> {
    use crate::hl7v2::{er7, listener, mllp::MllpCodec};
    use tokio_util::codec::Decoder;
    let parts = HL7V2_PARTS.with_borrow_mut(|cached| {
        cached
            .get_or_insert_with(|| {
                let shared = shared();
                let mappings: crate::reload::LiveMappings = shared.mappings.clone().into();
                let window = mappings::TimeWindow {
                    received_at: time::OffsetDateTime::UNIX_EPOCH,
                    max_future_skew: time::Duration::minutes(5),
                    max_past_age: time::Duration::days(100 * 365),
                };
                listener::MllpParts {
                    path: crate::ingress::stack::observation_path(
                        &mappings,
                        &shared.schemas,
                        &shared.readings_runs,
                        window,
                        &Arc::default(),
                        Arc::new(CheckingHandoff {
                            conformance: shared.conformance.clone(),
                        }),
                    ),
                    mappings,
                    options: Arc::new(listener::MllpOptions {
                        max_frame_bytes: 1 << 20,
                        idle_timeout: Duration::from_secs(60),
                        read_timeout: Duration::from_secs(60),
                        handshake_timeout: Duration::from_secs(10),
                        request_timeout: Duration::from_secs(60),
                        max_connections: 1,
                        pcd01: crate::hl7v2::pcd01::Pcd01Settings {
                            patient_identifier_systems: [(
                                "HOSP".to_owned(),
                                "urn:oid:1.2.36.146.595.217.0.1".to_owned(),
                            )]
                            .into_iter()
                            .collect(),
                        },
                    }),
                }
            })
            .clone()
    });
    let vendor = shared()
        .vendors
        .for_peer(&PeerIdentity::named(&[FUZZ_VENDOR]))
        .expect("the fuzz vendor");
    let frames: Vec<Bytes> = if data.first() == Some(&0x0B) {
        let mut codec = MllpCodec::new(1 << 20);
        let mut buf = bytes::BytesMut::from(data);
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            frames.push(frame);
            if frames.len() == 16 {
                break;
            }
        }
        frames
    } else {
        vec![Bytes::copy_from_slice(data)]
    };
    let mut statuses = Vec::new();
    for frame in frames {
        let Some(ack) = shared()
            .runtime
            .block_on(listener::handle(frame, &vendor, &parts))
        else {
            // The sender asked for no acknowledgment of this outcome (MSH-15/16).
            statuses.push(http::StatusCode::NO_CONTENT);
            continue;
        };
        let (text, delimiters, _) = er7::decode(&ack).expect("the ACK is readable");
        let message = er7::Message::parse(&text, delimiters).expect("the ACK parses");
        let msa = message.first("MSA").expect("the ACK has an MSA");
        let code = msa.field(1);
        for err in message.segments().iter().filter(|s| s.id == "ERR") {
            assert!(
                !(matches!(code, "AR" | "CR")
                    && er7::component(err.field(3), 1, delimiters) == "207"),
                "bad input answered as the gateway's own failure: {text}"
            );
        }
        statuses.push(match code {
            "AA" | "CA" => http::StatusCode::OK,
            "AE" | "CE" => http::StatusCode::UNPROCESSABLE_ENTITY,
            "AR" | "CR" => http::StatusCode::BAD_REQUEST,
            other => panic!("MSA-1 '{other}' is no acknowledgment code: {text}"),
        });
    }
    statuses
}

fn mapping_tables(data: &[u8]) {
    let files: Vec<(String, String)> = split(data, FILE_SEPARATOR)
        .into_iter()
        .enumerate()
        .map(|(i, text)| {
            let name = if i == 0 {
                "units.toml".to_owned()
            } else {
                format!("family-{i}.toml")
            };
            (name, String::from_utf8_lossy(text).into_owned())
        })
        .collect();
    // Either refused with a reason, or loaded and then proved (or refused) by the profiles,
    // as at start; a panic in either is the finding.
    if let Ok(tables) = Mappings::from_files(files) {
        let _ = shared().conformance.prove_tables(&tables);
    }
}

fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/etc/ecmo-gateway/gateway.toml"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_reading_is_taken_and_garbage_refused_cleanly() {
        let statuses = Target::ObservationsJson.run(
            br#"{"patient":{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"MRN-F1"},
                 "device":{"serial":"CH-F1","model":"CARDIOHELP-i"},
                 "readings":[{"parameter":"Flow","value":4.2,"unit":"L/min","time":"2026-06-01T12:00:00Z"}]}"#,
        );
        assert_eq!(statuses, vec![http::StatusCode::OK]);
        let message = "MSH|^~\\&|DIS|ICU|GW|HOSP|20260601120000+0000||ORU^R01|M1|P|2.6\r\
            PID|||MRN-F1^^^HOSP^MR\r\
            OBX|1|NM|Flow^^99CH|1.1.1.1|4.2|L/min^^UCUM|||||F|||20260601120000+0000||||CH-F1^CARDIOHELP-i\r";
        assert_eq!(
            Target::Hl7v2.run(message.as_bytes()),
            vec![http::StatusCode::OK]
        );
        for target in Target::ALL {
            for garbage in [&b""[..], b"\xff\xfe{<", b"{}"] {
                let statuses = target.run(garbage);
                assert!(statuses.iter().all(|s| s.is_client_error()), "{statuses:?}");
            }
        }
    }

    #[test]
    fn inputs_split_at_every_separator() {
        assert_eq!(split(b"a%%b%%%%c", b"%%"), [&b"a"[..], b"b", b"", b"c"]);
        assert_eq!(split(b"%%%", b"%%"), [&b""[..], b"%"]);
        assert_eq!(split(b"", b"%%"), [&b""[..]]);
    }

    #[test]
    #[should_panic(expected = "without an OperationOutcome")]
    fn a_refusal_that_is_not_an_outcome_is_a_finding() {
        check_response(
            "/v1/observations",
            (
                http::StatusCode::BAD_REQUEST,
                "text/plain".into(),
                Bytes::from_static(b"{\"resourceType\":\"Bundle\"}"),
            ),
        );
    }

    #[test]
    #[should_panic(expected = "bad input got 500")]
    fn a_server_error_is_a_finding() {
        check_response(
            "/v1/observations",
            (
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "application/json".into(),
                Bytes::new(),
            ),
        );
    }

    #[test]
    fn split_keeps_empty_parts() {
        assert_eq!(
            split(b"a\n%%\n\n%%\nb", EVENT_SEPARATOR),
            vec![&b"a"[..], &b""[..], &b"b"[..]]
        );
    }
}
