//! The data-driven conformance suite (`scenarios/*.json`) in `cargo test`: it must cover every
//! mapping entry, run event and error class, pass against the real gateway binary and the
//! reference EHR, and leave only resources that are valid R4 and follow our profiles. The
//! `conformance-tests` binary is run too, as an integration team would run it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use conformance_tests::ehr::smart::RegisteredClient;
use conformance_tests::ehr::{ReferenceEhr, RunningEhr};
use conformance_tests::harness::{
    EhrReader, GatewayProcess, SMART_WRITE_SCOPES, TestPki, durable_config, with_smart,
};
use conformance_tests::suite::coverage::{ERROR_CLASSES, gaps};
use conformance_tests::suite::report::{Totals, junit_xml, markdown_summary};
use conformance_tests::suite::runner::{Runner, Target, identities_from_dir, not_passed};
use conformance_tests::suite::{ScenarioSource, default_dir};
use gateway::delivery::smart::keys::SigningKeys;
use jsonwebtoken::jwk::JwkSet;
use mappings::{Mappings, ProfileValidator};

fn sources() -> Vec<ScenarioSource> {
    ScenarioSource::load_dir(&default_dir()).expect("scenario files load")
}

#[test]
fn every_mapping_entry_run_event_and_error_class_has_a_scenario() {
    let scenarios: Vec<_> = sources()
        .iter()
        .map(|s| {
            s.expand(
                "coverage",
                time::OffsetDateTime::now_utc(),
                &BTreeMap::new(),
            )
            .unwrap()
        })
        .collect();
    let mappings = Mappings::embedded().unwrap();
    let gaps = gaps(&scenarios, &mappings);
    assert!(gaps.is_empty(), "scenarios miss: {gaps:#?}");
    // The rule has teeth: without the parameter scenarios, every entry is a gap.
    let without: Vec<_> = scenarios
        .iter()
        .filter(|s| !s.name.ends_with("-parameters"))
        .cloned()
        .collect();
    let partial = conformance_tests::suite::coverage::gaps(&without, &mappings);
    assert!(partial.parameters.len() >= 20, "{partial:#?}");
    assert!(ERROR_CLASSES.len() >= 20);
}

/// PKI, reference EHR and the gateway binary in outbox mode (the default), as deployed.
async fn systems() -> (TestPki, RunningEhr, GatewayProcess) {
    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let config = durable_config(&pki, &ehr.base_url, &pki.path("outbox.sqlite"));
    let gateway = GatewayProcess::start(&config).unwrap();
    (pki, ehr, gateway)
}

fn reader(pki: &TestPki, ehr: &RunningEhr) -> EhrReader {
    EhrReader {
        client: pki.client("gateway-client"),
        base_url: ehr.base_url.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scenarios_pass_against_the_reference_ehr() {
    let (pki, ehr, gateway) = systems().await;
    let mut runner = Runner::new(Target {
        gateway_url: gateway.url(""),
        identities: identities_from_dir(pki.dir.path(), &pki.path("ca.pem")).unwrap(),
        ehr: Some(reader(&pki, &ehr)),
        ehr_wait: Duration::from_secs(30),
        variables: BTreeMap::new(),
    })
    .unwrap();
    let results = runner.run_all(&sources()).await;
    let totals = Totals::of(&results);
    let failures = not_passed(&results);
    assert!(
        failures.is_empty(),
        "{}\n{}\ngateway log:\n{}",
        failures.join("\n\n"),
        markdown_summary(&results, "gateway", Some("ehr"), runner.resources_checked),
        gateway.log_text()
    );
    assert!(totals.passed >= 50, "{totals:?}");
    assert!(runner.resources_checked >= 50);
    let xml = String::from_utf8(junit_xml(&results).unwrap()).unwrap();
    assert!(xml.contains("failures=\"0\""));

    // Nothing invalid reached the EHR: every stored resource, not only the expected ones.
    let validator = ProfileValidator::embedded().unwrap();
    let r4 = gateway::fhir_schema::R4Schema::embedded().unwrap();
    let reader = reader(&pki, &ehr);
    let mut checked = 0;
    for resource_type in ["Observation", "Procedure", "Device", "DeviceMetric"] {
        for resource in reader.all(resource_type).await.unwrap() {
            let violations = r4.check(resource_type, &resource);
            assert!(violations.is_empty(), "{violations:?}\n{resource}");
            mappings::check_resource_value(resource_type, resource.clone())
                .unwrap_or_else(|e| panic!("{resource_type} not valid R4: {e}\n{resource}"));
            let issues = validator.check(&resource);
            assert!(issues.is_empty(), "{issues:?}\n{resource}");
            checked += 1;
        }
    }
    assert!(checked >= 50, "{checked}");
}

/// Runs the `conformance-tests` binary off the async runtime: (exit code, stderr, JUnit XML,
/// Markdown summary).
async fn run_binary(args: &[&str], dir: &Path) -> (i32, String, String, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || run_binary_blocking(&args, &dir))
        .await
        .unwrap()
}

fn run_binary_blocking(args: &[String], dir: &Path) -> (i32, String, String, String) {
    let junit = dir.join("report.xml");
    let summary = dir.join("summary.md");
    let output = Command::new(env!("CARGO_BIN_EXE_conformance-tests"))
        .args(args)
        .arg("--junit")
        .arg(&junit)
        .arg("--summary")
        .arg(&summary)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        std::fs::read_to_string(&junit).unwrap_or_default(),
        std::fs::read_to_string(&summary).unwrap_or_default(),
    )
}

/// The JUnit report, read back with an XML parser: (testcases, failures).
fn junit_counts(xml: &str) -> (usize, usize) {
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut cases, mut failures) = (0, 0);
    loop {
        match reader.read_event().expect("well-formed JUnit XML") {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                match e.name().as_ref() {
                    "testcase" => cases += 1,
                    "failure" => failures += 1,
                    _ => {}
                }
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
    }
    (cases, failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runner_binary_reports_passes_and_failures() {
    let (pki, ehr, gateway) = systems().await;
    let out = tempfile::tempdir().unwrap();
    let gateway_url = gateway.url("");
    let pki_dir = pki.dir.path().display().to_string();
    let common = [
        "--gateway",
        gateway_url.as_str(),
        "--ehr",
        ehr.base_url.as_str(),
        "--pki",
        pki_dir.as_str(),
    ];

    let mut args = common.to_vec();
    args.extend(["--only", "spectrum-m4", "--only", "certificates"]);
    let (code, stderr, xml, summary) = run_binary(&args, out.path()).await;
    assert_eq!(code, 0, "{stderr}\n{summary}");
    assert_eq!(junit_counts(&xml), (6, 0), "{xml}");
    assert!(
        summary.contains("PASSED") && summary.contains("| spectrum-m4-parameters | 1 | 0 | 0 |"),
        "{summary}"
    );

    // A scenario whose expectation is wrong fails the run, and the report says where.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("wrong.json"),
        r#"{"name": "wrong-expectation", "description": "expects a refusal of a good batch",
            "steps": [{"name": "good batch", "as": "getinge",
              "request": {"path": "/v1/observations", "json": {"device": {"serial": "CH-W{{run}}", "model": "CARDIOHELP-i"},
                "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-W"},
                "readings": [{"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": "{{now-1m}}"}]}},
              "expect": {"status": 422}},
              {"name": "never reached", "as": "getinge", "request": {"method": "GET", "path": "/v1/nothing"}, "expect": {"status": 404}}]}"#,
    )
    .unwrap();
    let scenarios = broken.path().display().to_string();
    let mut args = common.to_vec();
    args.extend(["--scenarios", scenarios.as_str()]);
    let (code, stderr, xml, summary) = run_binary(&args, out.path()).await;
    assert_eq!(code, 1, "{stderr}\n{summary}");
    assert_eq!(junit_counts(&xml), (2, 1), "{xml}");
    assert!(xml.contains("expected HTTP 422, got 20"), "{xml}");
    assert!(xml.contains("<skipped"), "{xml}");
    assert!(
        summary.contains("FAILED") && summary.contains("good batch"),
        "{summary}"
    );

    // An EHR sandbox whose reads need a bearer token: without it nothing can be checked;
    // with it (from a file) the same run passes.
    ehr.ehr.require_bearer_for_reads("sandbox-token-1");
    let mut args = common.to_vec();
    args.extend(["--only", "spectrum-m4", "--ehr-wait", "2"]);
    let (code, _, xml, _) = run_binary(&args, out.path()).await;
    assert_eq!(code, 1, "{xml}");
    assert!(xml.contains("HTTP 401"), "{xml}");
    let token_file = out.path().join("token");
    std::fs::write(&token_file, "sandbox-token-1\n").unwrap();
    let token_path = token_file.display().to_string();
    let mut args = common.to_vec();
    args.extend([
        "--only",
        "spectrum-m4",
        "--ehr-token-file",
        token_path.as_str(),
    ]);
    let (code, stderr, xml, summary) = run_binary(&args, out.path()).await;
    assert_eq!(code, 0, "{stderr}\n{summary}\n{xml}");

    // No way to run at all: exit 2.
    let (code, stderr, _, _) = run_binary(&["--gateway", "https://127.0.0.1:9"], out.path()).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--ca or --pki"), "{stderr}");
}

/// The suite against an EHR that takes SMART Backend Services tokens alone: the gateway writes
/// with its token, the runner reads with one of its own (its own client id and key, read
/// scopes), and the report is the same as over mutual TLS.
#[tokio::test(flavor = "multi_thread")]
async fn the_runner_checks_an_ehr_behind_smart_backend_services() {
    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(
            pki.ehr_tls_certificate_optional("ca.pem"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
    let jwks_of = |key: &Path| JwkSet {
        keys: SigningKeys::load(&[key.to_owned()])
            .unwrap()
            .public_keys()
            .cloned()
            .collect(),
    };
    let gateway_key = pki.path(gateway::certs::SMART_KEY);
    ehr.ehr.register_smart_client(RegisteredClient {
        client_id: "ecmo-gateway".into(),
        jwks: jwks_of(&gateway_key),
        scopes: SMART_WRITE_SCOPES.map(String::from).to_vec(),
    });
    let suite_key = pki.smart_key("suite-reader");
    ehr.ehr.register_smart_client(RegisteredClient {
        client_id: "conformance-suite".into(),
        jwks: jwks_of(&suite_key),
        scopes: [
            "Observation",
            "Procedure",
            "Device",
            "DeviceMetric",
            "Provenance",
        ]
        .map(|t| format!("system/{t}.rs"))
        .to_vec(),
    });
    let config = with_smart(
        &durable_config(&pki, &ehr.base_url, &pki.path("outbox.sqlite")),
        "ecmo-gateway",
        &[&gateway_key],
        false,
        None,
    );
    let gateway = GatewayProcess::start(&config).unwrap();
    let out = tempfile::tempdir().unwrap();
    let gateway_url = gateway.url("");
    let pki_dir = pki.dir.path().display().to_string();
    let suite_key = suite_key.display().to_string();
    let args = [
        "--gateway",
        gateway_url.as_str(),
        "--ehr",
        ehr.base_url.as_str(),
        "--pki",
        pki_dir.as_str(),
        "--ehr-smart-client-id",
        "conformance-suite",
        "--ehr-smart-key",
        suite_key.as_str(),
        "--only",
        "spectrum-m4",
        "--only",
        "cardiohelp",
    ];
    let (code, stderr, xml, summary) = run_binary(&args, out.path()).await;
    assert_eq!(code, 0, "{stderr}\n{summary}\n{xml}");
    let (cases, failures) = junit_counts(&xml);
    assert!(cases >= 5 && failures == 0, "{xml}");
    assert!(summary.contains("PASSED"), "{summary}");
    // Two clients, each with its own token: the gateway's for writes, the suite's for reads.
    assert_eq!(ehr.ehr.smart(|s| s.issued), 2);
    assert!(ehr.ehr.count("Observation") >= 10);
}
