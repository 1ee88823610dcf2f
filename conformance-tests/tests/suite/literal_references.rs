//! An EHR that takes only literal references (`subject: {reference: "Patient/123"}`), as most
//! hospital EHRs do: with `references = "literal"` the gateway finds the patient by identifier,
//! writes or finds the console's Device, links readings to the run's Procedure, the patient's
//! current Encounter and Provenance to what it traces, each by the id the EHR gave; an unknown patient is held or dead-lettered
//! as the destination says, and once the patient is registered the data arrives.

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::ehr::RunningEhr;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, admin_until, durable_config, mtls_ehr,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";

async fn strict_ehr(pki: &TestPki) -> RunningEhr {
    let ehr = mtls_ehr(pki).await;
    ehr.ehr.require_literal_references();
    ehr
}

/// The gateway with literal references to `ehr`, `extra` settings added to its destination;
/// `single`: one request per resource instead of transactions.
fn literal_gateway(
    pki: &TestPki,
    ehr: &RunningEhr,
    dir: &std::path::Path,
    extra: &str,
    single: bool,
) -> GatewayProcess {
    let mut config = durable_config(pki, &ehr.base_url, &dir.join("outbox.sqlite")).replace(
        "max_attempts = 1\n",
        &format!("max_attempts = 1\nreferences = \"literal\"\n{extra}"),
    );
    if single {
        config = config.replace("bundle = \"transaction\"", "bundle = \"single\"");
    }
    GatewayProcess::start(&config).unwrap()
}

/// Polls the admin API's queues until `done` holds for the one destination.
async fn queues_until(
    admin: &MtlsClient,
    gateway: &GatewayProcess,
    done: impl Fn(&Value) -> bool,
) -> Value {
    admin_until(gateway, admin, "/admin/v1/queues", |q| {
        done(&q["destinations"][0])
    })
    .await
}

fn at(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

/// The stored resource a literal reference points to.
fn target<'a>(ehr: &'a [(String, Value)], reference: &Value) -> &'a Value {
    let reference = reference.as_str().expect("a literal reference");
    let (kind, id) = reference.split_once('/').unwrap();
    &ehr.iter()
        .find(|(t, r)| t == kind && r["id"] == id)
        .unwrap_or_else(|| panic!("{reference} is not at the EHR"))
        .1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_and_its_readings_reach_an_ehr_that_takes_only_literal_references() {
    let pki = TestPki::generate().unwrap();
    let ehr = strict_ehr(&pki).await;
    let patient_id = ehr.ehr.add_patient(MRN, "MRN-L1");
    // The patient's stay: an earlier visit, and the one under which device data is filed.
    ehr.ehr.add_encounter(&patient_id, "finished");
    let encounter_id = ehr.ehr.add_encounter(&patient_id, "in-progress");
    ehr.ehr.require_encounter();
    let dir = tempfile::tempdir().unwrap();
    let gateway = literal_gateway(&pki, &ehr, dir.path(), "encounter = \"current\"\n", false);
    let vendor = pki.client(GETINGE);
    let t0 = OffsetDateTime::now_utc() - time::Duration::hours(2);

    // A run starts on console CH-L1 for the registered patient.
    let started = json!({
        "eventId": "s", "type": "started", "time": at(t0),
        "patient": {"system": MRN, "value": "MRN-L1"},
        "birthDate": "1970-01-01", "mode": "vv", "supportType": "respiratory",
        "console": {"serial": "CH-L1", "model": "CARDIOHELP-i"}
    });
    let answer = vendor
        .post_json(&gateway.url("/v1/runs/RUN-L1/events"), &started)
        .await
        .unwrap();
    assert!(answer.status.is_success(), "{:?}", answer.json());
    // Its console's readings name nobody: the run says whose they are.
    let batch = SimulatedCardiohelp::new("CH-L1", 21)
        .without_patient()
        .next_batch(t0 + time::Duration::minutes(5));
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    // A console outside any run, with the patient named in the batch: its Device is written
    // by the gateway before its readings.
    let batch = SimulatedCardiohelp::new("CH-L2", 22)
        .with_patient(MRN, "MRN-L1")
        .next_batch(t0 + time::Duration::minutes(6));
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    let admin = pki.client(ADMIN);
    let queues = queues_until(&admin, &gateway, |d| d["pending"] == 0).await;
    if queues["destinations"][0]["dead"] != 0 {
        let dead = admin
            .get(&gateway.admin_url("/admin/v1/dead-letters"))
            .await
            .unwrap()
            .json();
        panic!("{queues}\n{dead}");
    }

    let stored: Vec<(String, Value)> = [
        "Observation",
        "Procedure",
        "Device",
        "DeviceMetric",
        "Provenance",
        "Patient",
    ]
    .into_iter()
    .flat_map(|t| {
        ehr.ehr
            .all_resources(t)
            .into_iter()
            .map(move |r| (t.to_owned(), r))
    })
    .collect();
    let observations: Vec<&Value> = stored
        .iter()
        .filter(|(t, _)| t == "Observation")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(observations.len(), 24);
    let run = stored
        .iter()
        .find(|(t, r)| t == "Procedure" && r["identifier"][0]["value"] == "RUN-L1")
        .map(|(_, r)| r)
        .expect("the run's Procedure");
    assert_eq!(run["subject"]["reference"], format!("Patient/{patient_id}"));
    let console = target(&stored, &run["focalDevice"][0]["manipulated"]["reference"]);
    assert_eq!(console["identifier"][0]["value"], "CH-L1");
    for o in &observations {
        // Every reference literal, the identifier kept beside it.
        assert_eq!(
            o["subject"]["reference"],
            format!("Patient/{patient_id}"),
            "{o}"
        );
        assert_eq!(o["subject"]["identifier"]["value"], "MRN-L1");
        assert_eq!(
            o["encounter"]["reference"],
            format!("Encounter/{encounter_id}")
        );
        // The Observation points at its parameter's DeviceMetric (PoCD), which points at
        // the console.
        let metric = target(&stored, &o["device"]["reference"]);
        assert_eq!(
            metric["identifier"][0]["value"],
            o["device"]["identifier"]["value"]
        );
        assert_eq!(
            metric["type"]["coding"][0], o["code"]["coding"][0],
            "{metric}"
        );
        let console = target(&stored, &metric["source"]["reference"]);
        let serial = console["identifier"][0]["value"].as_str().unwrap();
        // The PoCD containment tree, literal all the way: metric -> channel -> module ->
        // the console itself.
        let channel = target(&stored, &metric["parent"]["reference"]);
        let module = target(&stored, &channel["parent"]["reference"]);
        assert_eq!(
            target(&stored, &module["parent"]["reference"])["id"],
            console["id"],
            "{metric}"
        );
        assert_eq!(
            channel["identifier"][0]["value"],
            format!("{}/1", module["identifier"][0]["value"].as_str().unwrap())
        );
        assert_eq!(
            o["device"]["identifier"]["value"],
            format!(
                "{serial}:{}",
                o["code"]["coding"][0]["code"].as_str().unwrap()
            )
        );
        let code = o["code"]["coding"][0]["code"].as_str().unwrap();
        let category = match code {
            "pump-speed-setting" | "pump-blood-flow-setting" => "setting",
            "oxygenator-pressure-drop" => "calculation",
            _ => "measurement",
        };
        assert_eq!(metric["category"], category, "{metric}");
        if serial == "CH-L1" {
            assert_eq!(
                target(&stored, &o["partOf"][0]["reference"])["id"],
                run["id"]
            );
        } else {
            assert!(o.get("partOf").is_none());
        }
    }
    // One Device per console (the run's, and the one written for CH-L2's readings), one for
    // the gateway, which the Provenance names as its assembler, and each console's modules
    // and channels.
    let tables = mappings::Mappings::embedded().unwrap();
    let cardiohelp = tables.family_for_model("CARDIOHELP-i").unwrap();
    let components = mappings::device_components(cardiohelp, "x").unwrap().len();
    let devices: Vec<String> = ehr
        .ehr
        .all_resources("Device")
        .iter()
        .map(|d| d["identifier"][0]["value"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(devices.len(), 3 + 2 * components, "{devices:?}");
    for serial in ["CH-L1", "CH-L2"] {
        assert!(devices.iter().any(|d| d == serial), "{devices:?}");
    }
    // Each console's parameters, described once each.
    let per_console = mappings::device_metrics(cardiohelp, "x").unwrap().len();
    assert_eq!(ehr.ehr.count("DeviceMetric"), 2 * per_console);
    // Provenance points to what it traces.
    for (_, provenance) in stored.iter().filter(|(t, _)| t == "Provenance") {
        for t in provenance["target"].as_array().unwrap() {
            target(&stored, &t["reference"]);
        }
    }
    // The same readings again change nothing.
    vendor
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    assert_eq!(ehr.ehr.count("Observation"), 24);
    assert_eq!(ehr.ehr.count("DeviceMetric"), 2 * per_console);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_patient_is_held_or_dead_lettered_and_arrives_once_registered() {
    let pki = TestPki::generate().unwrap();
    let admin = pki.client(ADMIN);
    let t = OffsetDateTime::now_utc() - time::Duration::minutes(30);

    // Held: delivered on its own once the hospital registers the patient.
    let ehr = strict_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = literal_gateway(&pki, &ehr, dir.path(), "", false);
    let batch = SimulatedCardiohelp::new("CH-H1", 23)
        .with_patient(MRN, "MRN-LATER")
        .next_batch(t);
    let tracking = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202)
        .tracking_id();
    admin_until(
        &gateway,
        &admin,
        &format!("/admin/v1/deliveries/{tracking}"),
        |status| {
            status["messages"].as_array().unwrap().iter().any(|m| {
                m["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("no Patient with identifier"))
            })
        },
    )
    .await;
    assert_eq!(ehr.ehr.count("Observation"), 0);
    assert!(
        !gateway.log_text().contains("MRN-LATER"),
        "the patient's identifier stays out of the log"
    );
    let patient = ehr.ehr.add_patient(MRN, "MRN-LATER");
    queues_until(&admin, &gateway, |d| d["pending"] == 0 && d["dead"] == 0).await;
    assert_eq!(ehr.ehr.count("Observation"), 12);
    assert!(
        ehr.ehr
            .all_resources("Observation")
            .iter()
            .all(|o| o["subject"]["reference"] == format!("Patient/{patient}"))
    );

    // Dead-lettered where the destination says so, one request at a time; replayed once the
    // patient exists.
    let ehr = strict_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = literal_gateway(
        &pki,
        &ehr,
        dir.path(),
        "unknown_patient = \"dead-letter\"\n",
        true,
    );
    let batch = SimulatedCardiohelp::new("CH-D1", 24)
        .with_patient(MRN, "MRN-NOBODY")
        .next_batch(t);
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202);
    queues_until(&admin, &gateway, |d| d["dead"] == 12).await;
    let dead = admin
        .get(&gateway.admin_url("/admin/v1/dead-letters"))
        .await
        .unwrap()
        .json();
    assert!(
        dead["deadLetters"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no Patient with identifier urn:oid:1.2.36.146.595.217.0.1|MRN-NOBODY"),
        "{dead}"
    );
    assert_eq!(ehr.ehr.count("Observation"), 0);
    ehr.ehr.add_patient(MRN, "MRN-NOBODY");
    admin
        .send(
            http::Method::POST,
            &gateway.admin_url("/admin/v1/dead-letters/replay"),
            None,
            bytes::Bytes::new(),
        )
        .await
        .unwrap()
        .expect_status(200);
    queues_until(&admin, &gateway, |d| d["pending"] == 0 && d["dead"] == 0).await;
    assert_eq!(ehr.ehr.count("Observation"), 12);
}

/// Direct delivery (the device waits for the EHR): an unknown patient is told to the device
/// as it stands, 422 where the destination dead-letters, 503 with Retry-After where it holds.
#[tokio::test(flavor = "multi_thread")]
async fn direct_delivery_tells_the_device_about_an_unknown_patient() {
    let pki = TestPki::generate().unwrap();
    let ehr = strict_ehr(&pki).await;
    for (policy, status) in [("dead-letter", 422), ("hold", 503)] {
        let config = conformance_tests::harness::gateway_config(
            &pki,
            &ehr.base_url,
            conformance_tests::harness::WriteStyle::TRANSACTION_CONDITIONAL,
            "gateway-client",
        )
        .replace(
            "max_attempts = 3\n",
            &format!(
                "max_attempts = 3\nreferences = \"literal\"\nunknown_patient = \"{policy}\"\n"
            ),
        );
        assert!(config.contains("references = \"literal\""));
        let gateway = GatewayProcess::start(&config).unwrap();
        let batch = SimulatedCardiohelp::new("CH-X1", 61)
            .with_patient(MRN, "MRN-UNREGISTERED")
            .next_batch(OffsetDateTime::now_utc() - time::Duration::minutes(1));
        let answer = pki
            .client(GETINGE)
            .post_json(&gateway.url("/v1/observations"), &batch)
            .await
            .unwrap();
        assert_eq!(answer.status, status, "{policy}: {:?}", answer.json());
        let outcome = answer.json();
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        let text = outcome["issue"][0]["details"]["text"].as_str().unwrap();
        assert!(
            text.contains(
                "no Patient with identifier urn:oid:1.2.36.146.595.217.0.1|MRN-UNREGISTERED"
            ),
            "{text}"
        );
        if status == 503 {
            assert!(answer.headers.contains_key("retry-after"));
        }
        assert!(!gateway.log_text().contains("MRN-UNREGISTERED"));
    }
    assert_eq!(ehr.ehr.count("Observation"), 0);
}
