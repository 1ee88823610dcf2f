//! FHIR XML destinations: the gateway feeds one EHR in JSON and another in XML from the same
//! input (every conformance scenario). The XML EHR reads what it receives with an independent
//! reader (quick-xml and the official R4 JSON Schema, not fhirbolt, which wrote it) and its
//! answers come back in XML. Every resource must be stored the same in both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::{ReferenceEhr, RunningEhr};
use conformance_tests::harness::{
    ADMIN, EhrReader, GETINGE, GatewayProcess, TestPki, WriteStyle, gateway_config, with_outbox,
};
use conformance_tests::suite::runner::{Runner, Target, identities_from_dir, not_passed};
use conformance_tests::suite::{ScenarioSource, default_dir};
use serde_json::Value;
use time::OffsetDateTime;

async fn ehr(pki: &TestPki) -> RunningEhr {
    ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The gateway's config with a second destination, `ehr-xml`, in FHIR XML.
fn two_destinations(pki: &TestPki, json_ehr: &str, xml_ehr: &str, style: WriteStyle) -> String {
    let base = gateway_config(pki, json_ehr, style, "gateway-client");
    let start = base.find("[[destination]]").unwrap();
    let second = base[start..]
        .replace("name = \"ehr\"", "name = \"ehr-xml\"")
        .replace(json_ehr, xml_ehr)
        + "format = \"xml\"\n";
    with_outbox(&format!("{base}\n{second}"), &pki.path("outbox.sqlite"))
}

/// A resource without what each EHR assigns itself.
fn comparable(mut resource: Value) -> Value {
    if let Some(o) = resource.as_object_mut() {
        o.remove("id");
    }
    if let Some(meta) = resource["meta"].as_object_mut() {
        meta.remove("versionId");
        meta.remove("lastUpdated");
    }
    resource
}

fn key(resource: &Value) -> String {
    format!(
        "{}|{}",
        resource["identifier"][0]["system"].as_str().unwrap_or(""),
        resource["identifier"][0]["value"].as_str().unwrap_or("")
    )
}

async fn stored(reader: &EhrReader, resource_type: &str) -> BTreeMap<String, Value> {
    reader
        .all(resource_type)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (key(&r), comparable(r)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_scenario_reaches_the_xml_ehr_exactly_as_the_json_one() {
    let pki = TestPki::generate().unwrap();
    let (json_ehr, xml_ehr) = (ehr(&pki).await, ehr(&pki).await);
    let gateway = GatewayProcess::start(&two_destinations(
        &pki,
        &json_ehr.base_url,
        &xml_ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
    ))
    .unwrap();
    let reader = |ehr: &RunningEhr| EhrReader {
        client: pki.client("gateway-client"),
        base_url: ehr.base_url.clone(),
    };
    let mut runner = Runner::new(Target {
        gateway_url: gateway.url(""),
        identities: identities_from_dir(pki.dir.path(), &pki.path("ca.pem")).unwrap(),
        ehr: Some(reader(&xml_ehr)),
        ehr_wait: Duration::from_secs(30),
        variables: BTreeMap::new(),
    })
    .unwrap();
    let sources = ScenarioSource::load_dir(&default_dir()).unwrap();
    let results = runner.run_all(&sources).await;
    let failures = not_passed(&results);
    assert!(
        failures.is_empty(),
        "the scenarios, read back from the XML EHR:\n{}\n{}",
        failures.join("\n"),
        gateway.log_text()
    );

    // Both destinations drain; then the two EHRs must hold the same resources.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut compared = 0;
    for resource_type in ["Observation", "Procedure", "Device", "DeviceMetric"] {
        loop {
            let (json, xml) = (
                stored(&reader(&json_ehr), resource_type).await,
                stored(&reader(&xml_ehr), resource_type).await,
            );
            if json == xml {
                assert!(!json.is_empty(), "{resource_type}");
                compared += json.len();
                break;
            }
            if Instant::now() > deadline {
                let differing: Vec<_> = json
                    .iter()
                    .filter(|(k, v)| xml.get(*k) != Some(*v))
                    .take(2)
                    .map(|(k, v)| format!("{k}\njson: {v}\nxml:  {:?}", xml.get(k)))
                    .collect();
                panic!(
                    "{resource_type}: {} in JSON, {} in XML; differing: {differing:#?}",
                    json.len(),
                    xml.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(compared >= 60, "{compared}");
    assert!(
        xml_ehr.ehr.xml_requests() >= 10,
        "the XML EHR was written in XML"
    );
    assert_eq!(json_ehr.ehr.xml_requests(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_xml_ehr_refusal_is_read_and_kept_and_put_mode_works_in_xml() {
    let pki = TestPki::generate().unwrap();
    let (json_ehr, xml_ehr) = (ehr(&pki).await, ehr(&pki).await);
    xml_ehr.ehr.reject_identifiers_containing(":pump-speed:");
    let gateway = GatewayProcess::start(&two_destinations(
        &pki,
        &json_ehr.base_url,
        &xml_ehr.base_url,
        WriteStyle::TRANSACTION_PUT,
    ))
    .unwrap();
    let batch = SimulatedCardiohelp::new("CH-XML-1", 5).next_batch(OffsetDateTime::now_utc());
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    let admin = pki.client(ADMIN);
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        let dead = admin
            .get(&gateway.admin_url("/admin/v1/dead-letters"))
            .await
            .unwrap()
            .expect_status(200)
            .json();
        if let Some(letter) = dead["deadLetters"].as_array().and_then(|l| l.first()) {
            break letter.clone();
        }
        assert!(Instant::now() < deadline, "no dead letter: {dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letter["destination"], "ehr-xml", "{letter}");
    assert!(
        letter["error"].as_str().unwrap().contains("422"),
        "{letter}"
    );
    // The EHR answered in XML; its OperationOutcome is kept, read into JSON.
    let words = letter["outcome"]["issue"][0]["details"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(words.contains("does not accept"), "{letter}");
    // The other eleven went through in XML (PUT to derived ids inside a transaction).
    let deadline = Instant::now() + Duration::from_secs(30);
    while xml_ehr.ehr.count("Observation") < 11 {
        assert!(Instant::now() < deadline, "{}", gateway.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(json_ehr.ehr.count("Observation"), 12);
    assert!(xml_ehr.ehr.xml_requests() >= 2);
}
