//! The request path, assembled in one place. Read it top to bottom: that is the order a request
//! meets each layer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

use crate::delivery::Handoff;
use crate::ingress::describe::DeviceDescriptions;
use crate::ingress::device_clocks::DeviceClocks;
use crate::ingress::handoff::HandoffService;
use crate::ingress::retract::RetractService;
use crate::ingress::router::Router;
use crate::ingress::xml_ingest::IngestDocument;
use crate::ingress::{
    authorize, client_identity, conformance, decode, duplicates, fhir_native, locate, map,
    negotiate, rescue, retract, run_events, validate, vendor_share,
};
use crate::runs::RunRegistry;
use crate::validation::Schemas;
use crate::{BoxBody, BoxError};

/// The knobs of the request path (from `[server]` and `[readings]` in the config).
#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub max_concurrent_requests_per_vendor: usize,
    pub max_future_skew: Duration,
    pub max_past_age: Duration,
}

impl IngressSettings {
    /// The device times taken, around the moment of each request (`received_at` is set then).
    pub fn time_window(&self) -> mappings::TimeWindow {
        let limit = |d: Duration| time::Duration::try_from(d).unwrap_or(time::Duration::MAX);
        mappings::TimeWindow {
            received_at: time::OffsetDateTime::UNIX_EPOCH,
            max_future_skew: limit(self.max_future_skew),
            max_past_age: limit(self.max_past_age),
        }
    }
}

/// What the request path reads and records, built once at start and shared by every request.
#[derive(Clone)]
pub struct IngressParts {
    pub mappings: crate::reload::LiveMappings,
    pub schemas: Schemas,
    pub runs: Arc<RunRegistry>,
    pub conformance: Arc<conformance::ConformanceRules>,
    pub clocks: Arc<DeviceClocks>,
}

/// The request limit and the vendors' shares of it: one for the whole gateway, so that the
/// HTTPS and MLLP listeners count against the same limits.
#[derive(Clone)]
pub struct Admission {
    requests: Arc<tokio::sync::Semaphore>,
    vendor_shares: vendor_share::VendorShares,
}

impl Admission {
    pub fn new(settings: &IngressSettings) -> Self {
        Self {
            requests: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_requests,
            )),
            vendor_shares: vendor_share::VendorShares::new(
                settings.max_concurrent_requests_per_vendor,
            ),
        }
    }

    /// `path` behind the request limit (a request over it is shed at once: 503) and the
    /// vendor's share of it (503 too). Requests carry their `Arc<VendorPolicy>`.
    pub fn admit(&self, path: ObservationPath) -> ObservationPath {
        BoxCloneSyncService::new(
            ServiceBuilder::new()
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                    self.requests.clone(),
                ))
                .layer(self.vendor_shares.layer())
                .service(path),
        )
    }
}

/// Builds the stack once; the accept loop clones it per connection, and every clone shares
/// the concurrency limit.
pub fn build_stack<B>(
    settings: IngressSettings,
    vendors: impl Into<client_identity::LiveVendors>,
    parts: IngressParts,
    handoff: Arc<dyn Handoff>,
) -> impl Service<Request<B>, Response = Response<BoxBody>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + std::error::Error + Send + Sync + 'static,
{
    let admission = Admission::new(&settings);
    build_stack_with(settings, vendors, parts, handoff, admission)
}

/// [`build_stack`] counting against `admission`, shared with other listeners.
pub fn build_stack_with<B>(
    settings: IngressSettings,
    vendors: impl Into<client_identity::LiveVendors>,
    parts: IngressParts,
    handoff: Arc<dyn Handoff>,
    admission: Admission,
) -> impl Service<Request<B>, Response = Response<BoxBody>, Error = BoxError, Future = impl Send>
+ Clone
+ Send
+ 'static
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + std::error::Error + Send + Sync + 'static,
{
    let IngressParts {
        mappings,
        schemas,
        runs,
        conformance: conformance_rules,
        clocks,
    } = parts;
    // POST /v1/observations, after routing.
    let observations = ServiceBuilder::new()
        .layer(decode::layer(IngestDocument::ObservationBatch))
        .service(observation_path(
            &mappings,
            &schemas,
            &runs,
            settings.time_window(),
            &clocks,
            handoff.clone(),
        ));

    // POST /v1/fhir/Observation and /v1/fhir/Bundle, after routing.
    let fhir_descriptions = Arc::new(DeviceDescriptions::default());
    let fhir_observations = ServiceBuilder::new()
        .layer(fhir_native::layer(
            mappings.clone(),
            runs.clone(),
            conformance_rules.clone(),
            settings.time_window(),
            clocks,
            fhir_descriptions.clone(),
        ))
        .layer(duplicates::layer())
        .layer(fhir_descriptions.layer())
        .service(HandoffService::new(handoff.clone()));

    // POST /v1/observations/entered-in-error, after routing.
    let retractions = ServiceBuilder::new()
        .layer(decode::layer(IngestDocument::ObservationBatch))
        .layer(locate::layer())
        .layer(authorize::layer())
        .layer(validate::layer(schemas.clone(), "reading-retraction"))
        .layer(retract::layer(mappings.clone()))
        .service(RetractService::new(handoff.clone()));

    // POST /v1/runs/{run-id}/events, after routing.
    let run_events = ServiceBuilder::new()
        .layer(decode::layer(IngestDocument::RunEvent))
        .layer(locate::layer())
        .layer(validate::layer(schemas.clone(), "run-event"))
        .layer(run_events::layer(runs))
        .layer(conformance::layer(conformance_rules))
        .service(HandoffService::new(handoff));

    ServiceBuilder::new()
        .map_response(box_body)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(super::record::RecordLayer)
        // A 5xx answered on purpose (shed at the request limit, an EHR or the outbox
        // unavailable) is a warning: the vendor is told to resend. The unexpected ones are
        // logged as errors where they are rescued.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        // Outside the rescue, so that refusals are negotiated too.
        .layer(negotiate::layer())
        // Inside tracing, so that a refusal is traced as the 4xx it is, not as a failure.
        .map_result(rescue::rescue)
        .map_response(|response: Response<_>| rescue::outcome_for_bare_413(box_body(response)))
        .layer(RequestBodyLimitLayer::new(settings.max_body_bytes))
        .timeout(settings.request_timeout)
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            admission.requests.clone(),
        ))
        .layer(client_identity::layer(vendors.into()))
        // Inside the global limit: a vendor over its share gives its global slot back at once.
        .layer(admission.vendor_shares.layer())
        .service(Router::new(
            BoxCloneSyncService::new(observations),
            BoxCloneSyncService::new(run_events),
            BoxCloneSyncService::new(fhir_observations),
            BoxCloneSyncService::new(retractions),
            schemas,
        ))
}

/// A batch of readings from its decoded JSON to its durable hand-off: what `POST
/// /v1/observations` does after decoding, and what an HL7 v2 message does once it is read as
/// the same JSON. Requests carry the vendor (`Arc<VendorPolicy>`) in their extensions.
pub type ObservationPath = BoxCloneSyncService<Request<Value>, Response<BoxBody>, BoxError>;

/// Builds the [`ObservationPath`].
pub fn observation_path(
    mappings: &crate::reload::LiveMappings,
    schemas: &Schemas,
    runs: &Arc<RunRegistry>,
    window: mappings::TimeWindow,
    clocks: &Arc<DeviceClocks>,
    handoff: Arc<dyn Handoff>,
) -> ObservationPath {
    let descriptions = Arc::new(DeviceDescriptions::default());
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(locate::layer())
            .layer(authorize::layer())
            .layer(validate::layer(schemas.clone(), "observation-batch"))
            .layer(map::layer(
                mappings.clone(),
                runs.clone(),
                window,
                clocks.clone(),
                descriptions.clone(),
            ))
            .layer(duplicates::layer())
            .layer(descriptions.layer())
            // No per-resource conformance check: every shape the tables build was checked
            // when they were loaded (`ConformanceRules::prove_tables`).
            .service(HandoffService::new(handoff)),
    )
}

/// The span every event of a request is logged in: its id (the `X-Request-Id` answered to
/// the vendor), method and route. The route, not the path: a path names a run.
fn request_span<B>(request: &http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let route = super::record::route_of(request.uri().path());
    tracing::info_span!("request", %request_id, method = %request.method(), route)
}

fn box_body<D>(response: Response<D>) -> Response<BoxBody>
where
    D: Body<Data = Bytes> + Send + Sync + 'static,
    D::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::Full;
    use serde_json::json;
    use tower::ServiceExt;

    use super::*;
    use crate::config::VendorSettings;
    use crate::delivery::{BoxFuture, DeliveryError, OutboundBatch, Receipt};
    use crate::peer::PeerIdentity;

    /// Records what it is handed, after an optional delay.
    #[derive(Default)]
    struct Recorder {
        delay: Duration,
        received: Mutex<Vec<usize>>,
        resources: Mutex<Vec<mappings::MappedResource>>,
    }

    impl Handoff for Arc<Recorder> {
        fn submit(&self, batch: OutboundBatch) -> BoxFuture<Result<Receipt, DeliveryError>> {
            let recorder = self.clone();
            Box::pin(async move {
                tokio::time::sleep(recorder.delay).await;
                recorder
                    .received
                    .lock()
                    .unwrap()
                    .push(batch.resources.len());
                recorder
                    .resources
                    .lock()
                    .unwrap()
                    .extend(batch.resources.iter().cloned());
                Ok(Receipt::Delivered {
                    destinations: vec![],
                })
            })
        }
    }

    fn stack(
        recorder: Arc<Recorder>,
        max_concurrent_requests: usize,
        request_timeout: Duration,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<BoxBody>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        let settings = IngressSettings {
            request_timeout,
            max_body_bytes: 4096,
            max_concurrent_requests,
            max_concurrent_requests_per_vendor: max_concurrent_requests,
            max_future_skew: Duration::from_secs(300),
            max_past_age: Duration::from_secs(24 * 3600),
        };
        let vendors = crate::ingress::client_identity::Vendors::new(
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
        .unwrap();
        let mappings = Arc::new(mappings::Mappings::embedded().unwrap());
        // The registry's file outlives the test process' interest in it: a temp dir per stack.
        let dir = tempfile::tempdir().unwrap().keep();
        let runs = RunRegistry::open(&dir.join("runs.sqlite"), mappings.clone()).unwrap();
        build_stack(
            settings,
            vendors,
            IngressParts {
                mappings: mappings.into(),
                schemas: Schemas::embedded().unwrap(),
                runs,
                conformance: Arc::new(conformance::ConformanceRules::embedded().unwrap()),
                clocks: Arc::default(),
            },
            Arc::new(recorder),
        )
    }

    fn post(body: Vec<u8>, peer: Option<&str>) -> Request<Full<Bytes>> {
        let mut request = Request::post("/v1/observations")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        if let Some(name) = peer {
            request
                .extensions_mut()
                .insert(PeerIdentity::named(&[name]));
        }
        request
    }

    fn batch() -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        serde_json::to_vec(&json!({
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
            "readings": [{"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": now}]
        }))
        .unwrap()
    }

    async fn outcome(response: Response<BoxBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn delivers_and_tags_the_request_id() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-request-id"));
        assert_eq!(*recorder.received.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_request_without_a_vendor_is_refused_before_decoding() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(b"not even json".to_vec(), None))
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        assert!(
            response.headers().contains_key("x-request-id"),
            "refusals carry the id too"
        );
        assert!(recorder.received.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_load_beyond_the_concurrency_limit() {
        let recorder = Arc::new(Recorder {
            delay: Duration::from_secs(1),
            ..Recorder::default()
        });
        let svc = stack(recorder.clone(), 1, Duration::from_secs(5));
        let first = tokio::spawn(svc.clone().oneshot(post(batch(), Some("getinge"))));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let shed = svc
            .clone()
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        assert_eq!(outcome(shed).await["issue"][0]["code"], "throttled");
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_requests_time_out_with_an_outcome() {
        let recorder = Arc::new(Recorder {
            delay: Duration::from_secs(60),
            ..Recorder::default()
        });
        let response = stack(recorder.clone(), 8, Duration::from_secs(1))
            .oneshot(post(batch(), Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(outcome(response).await["issue"][0]["code"], "timeout");
    }

    #[tokio::test]
    async fn oversized_bodies_get_413_as_an_outcome() {
        let recorder = Arc::new(Recorder::default());
        let response = stack(recorder.clone(), 8, Duration::from_secs(5))
            .oneshot(post(vec![b' '; 5000], Some("getinge")))
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        assert_eq!(
            response.headers()["content-type"],
            crate::outcome::FHIR_JSON
        );
        assert_eq!(outcome(response).await["issue"][0]["code"], "too-long");
    }

    /// Batches shaped like the ingest schema, with values from everywhere: valid and invalid
    /// serials, models, units, parameters; numbers as raw JSON text (huge, tiny, exponents,
    /// negative zero, many digits); times from year 0000 to 9999 with any offset, many fraction
    /// digits, and times around now; unicode strings.
    mod generated {
        use proptest::prelude::*;

        fn json_string(s: &str) -> String {
            serde_json::to_string(s).unwrap()
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9._-]{0,70}",
                any::<String>(),
                "\\PC{0,8}",
                Just(String::new()),
                Just(" x ".into()),
            ]
        }

        fn number() -> impl Strategy<Value = String> {
            prop_oneof![
                (-100_000i64..100_000).prop_map(|n| n.to_string()),
                (-1000.0f64..1000.0).prop_map(|v| format!("{v}")),
                (any::<f64>().prop_filter("finite", |v| v.is_finite()))
                    .prop_map(|v| format!("{v:e}")),
                "-?[0-9]{1,40}(\\.[0-9]{1,40})?([eE][+-]?[0-9]{1,4})?",
                Just("-0".into()),
                Just("-32000".into()),
                Just("1e400".into()),
                Just("4.20".into()),
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => number(),
                1 => any::<bool>().prop_map(|b| b.to_string()),
                1 => text().prop_map(|s| json_string(&s)),
                1 => Just("null".into()),
            ]
        }

        fn time() -> impl Strategy<Value = String> {
            let near_now = (
                -200_000i64..2_000,
                -16i8..=16,
                prop_oneof![Just(0u8), Just(30), Just(45)],
                0u32..1_000_000_000,
                0usize..10,
            )
                .prop_map(|(seconds, hours, minutes, nanos, digits)| {
                    let offset = time::UtcOffset::from_hms(
                        hours,
                        if hours < 0 {
                            -(minutes as i8)
                        } else {
                            minutes as i8
                        },
                        0,
                    )
                    .unwrap_or(time::UtcOffset::UTC);
                    let t = (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
                        .replace_nanosecond(nanos)
                        .unwrap()
                        .to_offset(offset);
                    let fraction = if digits == 0 {
                        String::new()
                    } else {
                        format!(".{}", &format!("{:09}", t.nanosecond())[..digits.min(9)])
                    };
                    let zone = if hours == 0 && minutes == 0 {
                        "Z".to_owned()
                    } else {
                        let (h, m, _) = offset.as_hms();
                        format!(
                            "{}{:02}:{:02}",
                            if h < 0 || m < 0 { '-' } else { '+' },
                            h.unsigned_abs(),
                            m.unsigned_abs()
                        )
                    };
                    format!(
                        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}{zone}",
                        t.year(),
                        u8::from(t.month()),
                        t.day(),
                        t.hour(),
                        t.minute(),
                        t.second()
                    )
                });
            let anything = (
                prop_oneof![0u32..10_000, Just(0), Just(2026)],
                0u32..14,
                0u32..33,
                0u32..26,
                0u32..62,
                0u32..62,
                "(\\.[0-9]{0,12})?",
                prop_oneof![
                    Just("Z".to_owned()),
                    "[+-][01][0-9]:[0-6][0-9]",
                    Just(String::new()),
                    Just("z".into())
                ],
            )
                .prop_map(|(y, mo, d, h, mi, s, f, z)| {
                    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{f}{z}")
                });
            prop_oneof![3 => near_now, 2 => anything, 1 => text()]
        }

        fn reading() -> impl Strategy<Value = String> {
            let parameter = prop_oneof![
                prop::sample::select(vec![
                    "Flow",
                    "RPM",
                    "PVen",
                    "PInt",
                    "PArt",
                    "DeltaP",
                    "SvO2",
                    "Hct",
                    "Hb",
                    "Bubble",
                    "RequestedFlow",
                    "Temp"
                ])
                .prop_map(String::from),
                text(),
            ];
            let unit = prop::option::of(prop_oneof![
                prop::sample::select(vec![
                    "L/min", "mL/min", "rpm", "/min", "mmHg", "kPa", "%", "g/dL", "°C", "Cel"
                ])
                .prop_map(String::from),
                text(),
            ]);
            let flags = prop::option::of(prop::collection::vec(
                prop_oneof![
                    prop::sample::select(vec![
                        "invalid",
                        "questionable",
                        "calibrating",
                        "in-alarm",
                        "alarms-inhibited",
                        "test-data"
                    ])
                    .prop_map(String::from),
                    text(),
                ],
                0..3,
            ));
            (parameter, value(), unit, time(), flags).prop_map(
                |(parameter, value, unit, time, flags)| {
                    let mut fields = vec![
                        format!("\"parameter\":{}", json_string(&parameter)),
                        format!("\"value\":{value}"),
                        format!("\"time\":{}", json_string(&time)),
                    ];
                    if let Some(unit) = unit {
                        fields.push(format!("\"unit\":{}", json_string(&unit)));
                    }
                    if let Some(flags) = flags {
                        let list: Vec<String> = flags.iter().map(|f| json_string(f)).collect();
                        fields.push(format!("\"flags\":[{}]", list.join(",")));
                    }
                    format!("{{{}}}", fields.join(","))
                },
            )
        }

        /// A reading the Cardiohelp table takes: known parameter, its unit, a value in range,
        /// a time within the last day, written with any offset and precision.
        fn plausible_reading() -> impl Strategy<Value = String> {
            let measured = prop_oneof![
                (0.0f64..8.0).prop_map(|v| ("Flow", format!("{v:.3}"), Some("L/min"))),
                (0u32..5000).prop_map(|v| ("RPM", v.to_string(), Some("rpm"))),
                (-100i32..0).prop_map(|v| ("PVen", v.to_string(), Some("mmHg"))),
                any::<bool>().prop_map(|b| ("Bubble", b.to_string(), None)),
            ];
            // Offsets beyond FHIR's ±14:00 included: a device may well write them.
            let when = (-80_000i64..0, -16i8..=16, 0u32..1_000_000_000, 0usize..10);
            (measured, when).prop_map(|((parameter, value, unit), (seconds, hours, nanos, digits))| {
                let offset = time::UtcOffset::from_hms(hours, 0, 0).unwrap();
                let t = (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
                    .replace_nanosecond(nanos)
                    .unwrap()
                    .to_offset(offset);
                let fraction = if digits == 0 { String::new() } else { format!(".{}", &format!("{:09}", t.nanosecond())[..digits.min(9)]) };
                let time = format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}{}{:02}:00",
                    t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(),
                    if hours < 0 { '-' } else { '+' }, hours.unsigned_abs()
                );
                let unit = unit.map(|u| format!(",\"unit\":\"{u}\"")).unwrap_or_default();
                format!("{{\"parameter\":\"{parameter}\",\"value\":{value},\"time\":\"{time}\"{unit}}}")
            })
        }

        pub fn batch() -> impl Strategy<Value = Vec<u8>> {
            let serial = prop_oneof![6 => "CH-[0-9]{1,4}", 1 => text()];
            let model = prop_oneof![6 => Just("CARDIOHELP-i".to_owned()), 1 => text()];
            let readings = prop_oneof![
                prop::collection::vec(reading(), 0..6),
                prop::collection::vec(plausible_reading(), 1..8),
                prop::collection::vec(prop_oneof![4 => plausible_reading(), 1 => reading()], 1..8),
            ];
            let patient = prop_oneof![
                4 => ("MRN-[0-9]{1,6}").prop_map(|v| Some(("urn:oid:1.2.36.146.595.217.0.1".to_owned(), v))),
                1 => Just(None),
                1 => (text(), text()).prop_map(Some),
            ];
            (serial, model, patient, readings).prop_map(|(serial, model, patient, readings)| {
                let mut fields = vec![format!(
                    "\"device\":{{\"serial\":{},\"model\":{}}}",
                    json_string(&serial),
                    json_string(&model)
                )];
                if let Some((system, value)) = patient {
                    fields.push(format!(
                        "\"patient\":{{\"system\":{},\"value\":{}}}",
                        json_string(&system),
                        json_string(&value)
                    ));
                }
                fields.push(format!("\"readings\":[{}]", readings.join(",")));
                format!("{{{}}}", fields.join(",")).into_bytes()
            })
        }
    }

    /// Whatever a device sends, the answer is 2xx or a 4xx OperationOutcome, never a 5xx, and
    /// everything accepted is valid R4 (official JSON Schema and fhirbolt's strict model).
    #[test]
    fn any_batch_gets_2xx_or_a_4xx_outcome_and_what_is_accepted_is_valid() {
        use proptest::test_runner::{Config, TestCaseError, TestRunner};
        use proptest::{prop_assert, prop_assert_eq};
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let recorder = Arc::new(Recorder::default());
        let svc = runtime.block_on(async { stack(recorder.clone(), 64, Duration::from_secs(5)) });
        let r4 = crate::fhir_schema::R4Schema::embedded().unwrap();
        let mut runner = TestRunner::new(Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        });
        let accepted = std::sync::atomic::AtomicUsize::new(0);
        runner
            .run(&generated::batch(), |body| {
                let text = String::from_utf8_lossy(&body).into_owned();
                let response = runtime
                    .block_on(svc.clone().oneshot(post(body, Some("getinge"))))
                    .unwrap();
                let status = response.status();
                let answer = runtime.block_on(outcome(response));
                if status.is_server_error() || !(status.is_success() || status.is_client_error()) {
                    return Err(TestCaseError::fail(format!(
                        "{status} for {text}: {answer}"
                    )));
                }
                if status.is_client_error() {
                    prop_assert_eq!(&answer["resourceType"], "OperationOutcome", "{}", text);
                    prop_assert!(answer["issue"].as_array().is_some_and(|i| !i.is_empty()));
                    return Ok(());
                }
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for resource in recorder.resources.lock().unwrap().drain(..) {
                    mappings::check_resource_json(resource.resource_type, &resource.json)
                        .map_err(|e| TestCaseError::fail(format!("{e} for {text}")))?;
                    let value: serde_json::Value = serde_json::from_slice(&resource.json).unwrap();
                    let violations = r4.check(resource.resource_type, &value);
                    prop_assert!(violations.is_empty(), "{:?} for {}", violations, text);
                }
                Ok(())
            })
            .unwrap();
        // The generator must reach acceptance too, or the test proves little.
        let accepted = accepted.into_inner();
        assert!(accepted > 50, "only {accepted} of 512 batches accepted");
    }
}
