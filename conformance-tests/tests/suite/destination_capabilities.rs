//! Before the first dead letter: `gateway check-config`, the start-up log and the admin API
//! read each destination's CapabilityStatement (and SMART token) and say which configured
//! features the EHR cannot do. And an EHR that can do little (plain creates, one at a time)
//! still gets every reading exactly once.

use std::process::Command;

use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::Fault;
use conformance_tests::ehr::smart::RegisteredClient;
use conformance_tests::ehr::{RunningEhr, Without};
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, admin_until, durable_config, gateway_binary, mtls_ehr,
};
use gateway::delivery::smart::keys::SigningKeys;
use jsonwebtoken::jwk::JwkSet;
use time::OffsetDateTime;

async fn ehr(pki: &TestPki) -> RunningEhr {
    mtls_ehr(pki).await
}

/// `gateway check-config` on `config`: exit code and standard output.
fn check_config(config: &str) -> (i32, String) {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let output = Command::new(gateway_binary().unwrap())
        .args(["check-config", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_and_the_admin_api_name_what_an_ehr_cannot_do() {
    let pki = TestPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox.sqlite");

    // An EHR that does everything the configuration asks.
    let able = ehr(&pki).await;
    let (code, out) = check_config(&durable_config(&pki, &able.base_url, &outbox));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("destination 'ehr': ok"), "{out}");

    // One without transactions or XML, configured for both.
    let limited = ehr(&pki).await;
    limited.ehr.without(Without {
        transactions: true,
        xml: true,
        ..Without::default()
    });
    let config = durable_config(&pki, &limited.base_url, &outbox).replace(
        "bundle = \"transaction\"",
        "bundle = \"transaction\"\nformat = \"xml\"",
    );
    let (code, out) = check_config(&config);
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains(
            "destination 'ehr': cannot: no transaction Bundles (bundle = \"transaction\")"
        ),
        "{out}"
    );
    assert!(
        out.contains("cannot: no FHIR XML (format = \"xml\")"),
        "{out}"
    );

    // The running gateway says so at start and on the admin API.
    let gateway = GatewayProcess::start(&config).unwrap();
    assert!(gateway.wait_for_log("destination cannot do what it is configured for"));
    let report = pki
        .client(ADMIN)
        .get(&gateway.admin_url("/admin/v1/capabilities"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let ehr_report = &report["destinations"][0];
    assert_eq!(ehr_report["destination"], "ehr");
    assert_eq!(ehr_report["checked"], true);
    assert_eq!(ehr_report["gaps"].as_array().unwrap().len(), 2, "{report}");

    // A destination nobody answers for is reported, not failed.
    drop(able);
    let (code, out) = check_config(&durable_config(&pki, "https://127.0.0.1:9/fhir", &outbox));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("destination 'ehr': not checked"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_tells_smart_scopes_that_leave_writes_out_and_a_refused_registration() {
    let pki = TestPki::generate().unwrap();
    let ehr = ehr(&pki).await;
    let key = pki.path(gateway::certs::SMART_KEY);
    let jwks = JwkSet {
        keys: SigningKeys::load(std::slice::from_ref(&key))
            .unwrap()
            .public_keys()
            .cloned()
            .collect(),
    };
    let registered = |scopes: &[&str]| RegisteredClient {
        client_id: "ecmo-gateway".into(),
        jwks: jwks.clone(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let smart = |scopes: &str| {
        format!(
            "{}\n[destination.smart]\nclient_id = \"ecmo-gateway\"\nscopes = [{scopes}]\nkeys = [\"{}\"]\n",
            durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite")),
            key.display()
        )
    };
    let all = r#""system/Observation.cu", "system/Procedure.cu", "system/Device.cu", "system/DeviceMetric.cu", "system/Provenance.c""#;
    ehr.ehr.register_smart_client(registered(&[
        "system/Observation.cu",
        "system/Procedure.cu",
        "system/Device.cu",
        "system/DeviceMetric.cu",
        "system/Provenance.c",
    ]));
    let (code, out) = check_config(&smart(all));
    assert_eq!(code, 0, "{out}");

    // Provenance is written (provenance defaults to on) but no scope allows it.
    let (code, out) = check_config(&smart(
        r#""system/Observation.cu", "system/Procedure.cu", "system/Device.cu", "system/DeviceMetric.cu""#,
    ));
    assert_eq!(code, 78, "{out}");
    assert!(
        out.contains("the SMART scopes let the gateway not 'c' Provenance"),
        "{out}"
    );

    // The EHR registered fewer scopes than the gateway asks for: the token request is refused.
    ehr.ehr
        .smart(|s| s.register(registered(&["system/Observation.cu"])));
    let (code, out) = check_config(&smart(all));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("SMART: the token endpoint refused"), "{out}");
    assert!(out.contains("invalid_scope"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ehr_that_takes_plain_creates_gets_each_reading_once_through_lost_answers() {
    let pki = TestPki::generate().unwrap();
    let ehr = ehr(&pki).await;
    ehr.ehr.without(Without {
        transactions: true,
        conditional_writes: true,
        ..Without::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let usual = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"));
    let (code, out) = check_config(&usual);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("Observation: no conditional create"), "{out}");
    let config = usual
        .replace("write = \"conditional-create\"", "write = \"create\"")
        .replace("bundle = \"transaction\"", "bundle = \"single\"")
        .replace(
            "max_attempts = 1\n",
            "max_attempts = 1\ncorrections = \"reject\"\n",
        );
    let (code, out) = check_config(&config);
    assert_eq!(code, 0, "{out}");

    // The first three creates are stored but their answers lost: the gateway cannot know.
    ehr.ehr.fail_next(Fault::lose_answer(), 3);
    let gateway = GatewayProcess::start(&config).unwrap();
    let mut console = SimulatedCardiohelp::new("CH-C1", 31);
    let t = OffsetDateTime::now_utc() - time::Duration::minutes(20);
    let batch = console.next_batch(t);
    let vendor = pki.client(GETINGE);
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    let admin = pki.client(ADMIN);
    let queues = admin_until(&gateway, &admin, "/admin/v1/queues", |q| {
        q["destinations"][0]["pending"] == 0
    })
    .await;
    assert_eq!(queues["destinations"][0]["dead"], 0, "{queues}");
    let counts = ehr.ehr.identifier_counts("Observation");
    assert_eq!(counts.len(), 12);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(ehr.ehr.count("Provenance"), 1);
    // Resending changes nothing; another value for a reading is refused to the device, as
    // this EHR is never overwritten.
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    let mut corrected = batch.clone();
    corrected["readings"][0]["value"] = serde_json::json!(1.5);
    vendor
        .post_json(&gateway.url("/v1/observations"), &corrected)
        .await
        .unwrap()
        .expect_status(409);
    assert_eq!(ehr.ehr.count("Observation"), 12);
}
