//! Whole ECMO runs end to end: run events become one Procedure per run that moves through its
//! states (with child Procedures for mode segments, circuit changes and weaning trials) and a
//! Device per console; readings of the run's console are charted to the run's patient and
//! linked to the run, without the console naming anyone.

use conformance_tests::client::Answer;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::harness::{
    GETINGE, GatewayProcess, INTEGRATION, SPECTRUM, Scenario, WriteStyle, gateway_config,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";
const RUNS: &str = "https://fhir.ecmo-gateway.org/sid/ecmo-run";

fn at(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

async fn event(s: &Scenario, run: &str, body: Value) -> Answer {
    s.pki
        .client(GETINGE)
        .post_json(&s.gateway.url(&format!("/v1/runs/{run}/events")), &body)
        .await
        .unwrap()
}

async fn run_procedure(s: &Scenario, run: &str) -> Value {
    let found = s
        .reader
        .by_identifier("Procedure", RUNS, run)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "one Procedure per run at the EHR");
    found[0].clone()
}

async fn child(s: &Scenario, run: &str, key: &str) -> Value {
    let found = s
        .reader
        .by_identifier("Procedure", RUNS, &format!("{run}/{key}"))
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "child {key}");
    assert_eq!(found[0]["partOf"][0]["identifier"]["value"], run);
    found[0].clone()
}

fn codes(concept: &Value) -> Vec<String> {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["code"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn extension<'a>(resource: &'a Value, name: &str) -> &'a Value {
    resource["extension"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|x| x["url"].as_str().is_some_and(|u| u.ends_with(name)))
        })
        .unwrap_or(&Value::Null)
}

/// Posts one cycle of readings (no patient named) at `t`; returns the answer.
async fn readings(s: &Scenario, serial: &str, t: OffsetDateTime) -> Answer {
    let batch = SimulatedCardiohelp::new(serial, 3)
        .without_patient()
        .next_batch(t);
    s.pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
}

/// Whether Observation `o` is of device `serial`: it points at one of the device's metrics
/// (`serial:code`).
fn of_device(o: &Value, serial: &str) -> bool {
    o["device"]["identifier"]["value"]
        .as_str()
        .and_then(|metric| metric.rsplit_once(':'))
        .is_some_and(|(of, _)| of == serial)
}

/// Every stored Observation of `serial` points at the run's patient and Procedure.
async fn assert_linked(s: &Scenario, serial: &str, run: &str, patient: &str) -> usize {
    let all = s.reader.all("Observation").await.unwrap();
    let mine: Vec<&Value> = all.iter().filter(|o| of_device(o, serial)).collect();
    for o in &mine {
        assert_eq!(o["subject"]["identifier"]["value"], patient, "{o}");
        assert_eq!(o["partOf"][0]["identifier"]["system"], RUNS);
        assert_eq!(o["partOf"][0]["identifier"]["value"], run);
    }
    mine.len()
}

#[tokio::test(flavor = "multi_thread")]
async fn neonatal_va_run_for_cdh_with_a_circuit_change() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(6);
    let run = "NEO-2026-001";
    let started = json!({
        "eventId": "e1", "type": "started", "time": at(t0),
        "patient": {"system": MRN, "value": "MRN-NEO-7"},
        "birthDate": (t0 - time::Duration::days(3)).date().to_string(),
        "mode": "va", "supportType": "respiratory",
        "indications": [{"code": "17190001", "display": "Congenital diaphragmatic hernia"}],
        "cannulas": [
            {"id": "c1", "site": {"code": "12123001", "display": "internal jugular vein"}, "laterality": "right", "role": "drainage"},
            {"id": "c2", "site": {"code": "69105007", "display": "carotid artery"}, "laterality": "right", "role": "return"}
        ],
        "console": {"serial": "CH-N1", "model": "CARDIOHELP-i"}
    });
    event(&s, run, started.clone()).await.expect_status(200);

    let p = run_procedure(&s, run).await;
    assert_eq!(p["status"], "in-progress");
    assert_eq!(codes(&p["code"])[..2], ["233573008", "786451004"]);
    assert_eq!(codes(&p["category"]), ["182744004"]);
    assert_eq!(p["performedPeriod"]["start"], at(t0));
    assert!(p["performedPeriod"].get("end").is_none());
    assert_eq!(p["subject"]["identifier"]["value"], "MRN-NEO-7");
    assert_eq!(codes(&p["reasonCode"][0]), ["17190001"]);
    assert_eq!(p["bodySite"].as_array().unwrap().len(), 2);
    assert_eq!(
        p["bodySite"][0]["text"],
        "right internal jugular vein (drainage)"
    );
    assert_eq!(
        codes(&extension(&p["bodySite"][0], "laterality")["valueCodeableConcept"]),
        ["24028007"]
    );
    assert_eq!(
        codes(&extension(&p, "ecmo-age-group")["valueCodeableConcept"]),
        ["neonatal"]
    );
    assert_eq!(
        p["focalDevice"][0]["manipulated"]["identifier"]["value"],
        "CH-N1"
    );
    let device = s
        .reader
        .by_identifier(
            "Device",
            "https://fhir.ecmo-gateway.org/sid/device-serial/getinge",
            "CH-N1",
        )
        .await
        .unwrap();
    assert_eq!(device.len(), 1);
    assert_eq!(device[0]["serialNumber"], "CH-N1");
    assert_eq!(device[0]["manufacturer"], "Getinge");
    assert_eq!(child(&s, run, "mode-1").await["status"], "in-progress");

    // Readings during the run, naming no patient, are the run's patient's.
    readings(&s, "CH-N1", t0 + time::Duration::minutes(10))
        .await
        .expect_status(200);

    // Resending the started event changes nothing.
    event(&s, run, started).await.expect_status(200);
    assert_eq!(
        s.reader
            .by_identifier(
                "Device",
                "https://fhir.ecmo-gateway.org/sid/device-serial/getinge",
                "CH-N1"
            )
            .await
            .unwrap()
            .len(),
        1
    );

    event(&s, run, json!({"eventId": "e2", "type": "circuit-changed", "time": at(t0 + time::Duration::days(2))})).await.expect_status(200);
    let circuit = child(&s, run, "circuit-change-e2").await;
    assert_eq!(circuit["status"], "completed");
    assert_eq!(codes(&circuit["code"]), ["circuit-change"]);

    let end = t0 + time::Duration::days(5);
    event(&s, run, json!({"eventId": "e3", "type": "ended", "time": at(end), "reason": "recovered", "alive": true})).await.expect_status(200);
    let p = run_procedure(&s, run).await;
    assert_eq!(p["status"], "completed");
    assert_eq!(p["performedPeriod"]["end"], at(end));
    assert_eq!(codes(&p["outcome"]), ["recovered"]);
    let mode = child(&s, run, "mode-1").await;
    assert_eq!(mode["status"], "completed");
    assert_eq!(mode["performedPeriod"]["end"], at(end));

    // Late readings timed inside the run are still accepted and linked; after it, they need a patient.
    readings(&s, "CH-N1", t0 + time::Duration::days(4))
        .await
        .expect_status(200);
    let after = readings(&s, "CH-N1", end + time::Duration::hours(1))
        .await
        .expect_status(422);
    assert!(
        after.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("no ECMO run")
    );
    assert_eq!(assert_linked(&s, "CH-N1", run, "MRN-NEO-7").await, 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn adult_vv_run_for_ards_converted_to_vva() {
    let s = Scenario::start(WriteStyle::SINGLE_CONDITIONAL)
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(4);
    let run = "ADULT-2026-017";
    event(&s, run, json!({
        "eventId": "s", "type": "started", "time": at(t0),
        "patient": {"system": MRN, "value": "MRN-ADULT-3"}, "birthDate": "1971-03-09",
        "encounter": {"system": "urn:oid:1.2.3.4", "value": "ENC-55"},
        "mode": "vv", "supportType": "respiratory",
        "indications": [{"code": "67782005", "display": "Acute respiratory distress syndrome"}],
        "cannulas": [
            {"id": "d", "site": {"code": "83419000", "display": "femoral vein"}, "laterality": "left", "role": "drainage"},
            {"id": "r", "site": {"code": "12123001", "display": "internal jugular vein"}, "laterality": "right", "role": "return"}
        ],
        "console": {"serial": "CH-A2", "model": "CARDIOHELP-i"}
    })).await.expect_status(200);
    readings(&s, "CH-A2", t0 + time::Duration::hours(2))
        .await
        .expect_status(200);

    let t1 = t0 + time::Duration::days(1);
    event(
        &s,
        run,
        json!({"eventId": "m", "type": "mode-changed", "time": at(t1), "mode": "vva"}),
    )
    .await
    .expect_status(200);
    event(&s, run, json!({"eventId": "a", "type": "cannula-added", "time": at(t1),
        "cannula": {"id": "a", "site": {"code": "7657000", "display": "femoral artery"}, "laterality": "right", "role": "return"}})).await.expect_status(200);
    let vv = child(&s, run, "mode-1").await;
    assert_eq!(codes(&vv["code"])[1], "786453001");
    assert_eq!(
        (vv["status"].as_str(), vv["performedPeriod"]["end"].as_str()),
        (Some("completed"), Some(at(t1).as_str()))
    );
    let vva = child(&s, run, "mode-2").await;
    assert_eq!(vva["status"], "in-progress");
    assert_eq!(
        codes(&vva["code"]),
        ["233573008", "vva"],
        "no SNOMED code exists for VVA: ours"
    );

    let t2 = t0 + time::Duration::days(2);
    event(
        &s,
        run,
        json!({"eventId": "c", "type": "complication", "time": at(t2),
        "complication": {"code": "1386000", "display": "Intracranial hemorrhage"}}),
    )
    .await
    .expect_status(200);
    readings(&s, "CH-A2", t2).await.expect_status(200);
    let p = run_procedure(&s, run).await;
    assert_eq!(p["bodySite"].as_array().unwrap().len(), 3);
    assert_eq!(codes(&p["complication"][0]), ["1386000"]);
    assert_eq!(
        extension(&p["complication"][0], "complication-time")["valueDateTime"],
        at(t2)
    );
    assert_eq!(
        codes(&extension(&p, "ecmo-age-group")["valueCodeableConcept"]),
        ["adult"]
    );
    assert_eq!(p["encounter"]["identifier"]["value"], "ENC-55");

    event(&s, run, json!({"eventId": "w", "type": "weaning-trial", "time": at(t2 + time::Duration::hours(20)), "end": at(t2 + time::Duration::hours(22))})).await.expect_status(200);
    assert_eq!(
        child(&s, run, "weaning-trial-w").await["status"],
        "completed"
    );
    event(&s, run, json!({"eventId": "x", "type": "ended", "time": at(t0 + time::Duration::days(3)), "reason": "recovered", "alive": true})).await.expect_status(200);
    assert_eq!(run_procedure(&s, run).await["status"], "completed");
    assert_eq!(assert_linked(&s, "CH-A2", run, "MRN-ADULT-3").await, 24);
}

#[tokio::test(flavor = "multi_thread")]
async fn ecpr_run_ending_in_death_on_ecmo() {
    let s = Scenario::start(WriteStyle::TRANSACTION_PUT).await.unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(2);
    let run = "ECPR-2026-004";
    event(&s, run, json!({
        "eventId": "1", "type": "started", "time": at(t0),
        "patient": {"system": MRN, "value": "MRN-ECPR-9"}, "birthDate": "1958-07-01",
        "mode": "va", "supportType": "ecpr",
        "indications": [{"code": "410429000", "display": "Cardiac arrest"}],
        "cannulas": [{"id": "v", "site": {"code": "83419000", "display": "femoral vein"}, "laterality": "right", "role": "drainage"},
                     {"id": "a", "site": {"code": "7657000", "display": "femoral artery"}, "laterality": "right", "role": "return"}],
        "console": {"serial": "CH-E3", "model": "CARDIOHELP-i"}
    })).await.expect_status(200);
    for minutes in [5, 30, 90] {
        readings(&s, "CH-E3", t0 + time::Duration::minutes(minutes))
            .await
            .expect_status(200);
    }
    let end = t0 + time::Duration::hours(30);
    event(
        &s,
        run,
        json!({"eventId": "2", "type": "ended", "time": at(end), "reason": "died", "alive": false}),
    )
    .await
    .expect_status(200);
    let p = run_procedure(&s, run).await;
    assert_eq!(p["status"], "stopped");
    assert_eq!(codes(&p["statusReason"]), ["died"]);
    assert_eq!(p["outcome"]["text"], "Died on ECMO");
    assert_eq!(
        codes(&extension(&p, "ecmo-support-type")["valueCodeableConcept"]),
        ["ecpr"]
    );
    assert_eq!(codes(&p["reasonCode"][0]), ["410429000"]);
    assert_eq!(assert_linked(&s, "CH-E3", run, "MRN-ECPR-9").await, 36);
}

#[tokio::test(flavor = "multi_thread")]
async fn impossible_events_get_409_and_legal_order_does_not_matter() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(3);
    let start = |id: &str, run_patient: &str, serial: &str, t: OffsetDateTime| {
        json!({
            "eventId": id, "type": "started", "time": at(t), "patient": {"system": MRN, "value": run_patient},
            "mode": "vv", "console": {"serial": serial, "model": "CARDIOHELP-i"}
        })
    };
    let conflict = |a: Answer| {
        let a = a.expect_status(409);
        assert_eq!(a.json()["issue"][0]["code"], "conflict");
        a.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // Nothing happens to a run that has not started.
    conflict(
        event(
            &s,
            "R1",
            json!({"eventId": "m", "type": "mode-changed", "time": at(t0), "mode": "va"}),
        )
        .await,
    );
    event(&s, "R1", start("s", "MRN-1", "CH-X1", t0))
        .await
        .expect_status(200);
    // A second run on the same console while the first is on it.
    let text = conflict(
        event(
            &s,
            "R2",
            start("s", "MRN-2", "CH-X1", t0 + time::Duration::hours(1)),
        )
        .await,
    );
    assert!(text.contains("one run at a time"), "{text}");
    // An end before the start; a mode change after the end.
    conflict(event(&s, "R1", json!({"eventId": "e0", "type": "ended", "time": at(t0 - time::Duration::hours(1)), "reason": "recovered", "alive": true})).await);
    event(&s, "R1", json!({"eventId": "e", "type": "ended", "time": at(t0 + time::Duration::days(1)), "reason": "recovered", "alive": true})).await.expect_status(200);
    conflict(event(&s, "R1", json!({"eventId": "m2", "type": "mode-changed", "time": at(t0 + time::Duration::days(2)), "mode": "va"})).await);
    // An event id reused with other content.
    conflict(event(&s, "R1", json!({"eventId": "e", "type": "ended", "time": at(t0 + time::Duration::days(1)), "reason": "other", "alive": true})).await);
    // After R1 ended its console is free again.
    event(
        &s,
        "R2",
        start(
            "s",
            "MRN-2",
            "CH-X1",
            t0 + time::Duration::days(1) + time::Duration::hours(1),
        ),
    )
    .await
    .expect_status(200);

    // A batch that names another patient than the run of its console.
    let mut batch = SimulatedCardiohelp::new("CH-X1", 1)
        .with_patient(MRN, "MRN-SOMEONE-ELSE")
        .next_batch(t0 + time::Duration::days(2));
    let answer = s
        .pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(409);
    assert!(
        !String::from_utf8_lossy(&answer.body).contains("MRN-2"),
        "the run's patient is not disclosed"
    );
    batch["patient"]["value"] = json!("MRN-2");
    s.pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);

    // A vendor that does not own the console cannot post its run's events.
    let foreign = s
        .pki
        .client(SPECTRUM)
        .post_json(
            &s.gateway.url("/v1/runs/R3/events"),
            &start("s", "MRN-3", "CH-X9", t0),
        )
        .await
        .unwrap();
    assert_eq!(foreign.status, 403);

    // The same legal events in two orders give the same run.
    let events = |run: &str| {
        let serial = format!("CH-{run}");
        vec![
            start("s", "MRN-O", &serial, t0),
            json!({"eventId": "c", "type": "complication", "time": at(t0 + time::Duration::hours(5)), "complication": {"code": "14669001"}}),
            json!({"eventId": "m", "type": "mode-changed", "time": at(t0 + time::Duration::hours(2)), "mode": "vva"}),
            json!({"eventId": "w", "type": "weaning-trial", "time": at(t0 + time::Duration::hours(9))}),
        ]
    };
    for e in events("O1") {
        event(&s, "O1", e).await.expect_status(200);
    }
    let mut reversed = events("O2");
    let first = reversed.remove(0);
    event(&s, "O2", first).await.expect_status(200);
    for e in reversed.into_iter().rev() {
        event(&s, "O2", e).await.expect_status(200);
    }
    let strip = |mut p: Value| {
        for key in ["id", "meta", "identifier", "focalDevice"] {
            p.as_object_mut().unwrap().remove(key);
        }
        p
    };
    assert_eq!(
        strip(run_procedure(&s, "O1").await),
        strip(run_procedure(&s, "O2").await)
    );
    assert_eq!(
        child(&s, "O2", "mode-1").await["performedPeriod"]["end"],
        at(t0 + time::Duration::hours(2))
    );

    // Entered in error: the run is retracted and its console no longer claims readings.
    event(&s, "O1", json!({"eventId": "x", "type": "entered-in-error", "time": at(t0 + time::Duration::hours(10))})).await.expect_status(200);
    assert_eq!(run_procedure(&s, "O1").await["status"], "entered-in-error");
    readings(&s, "CH-O1", t0 + time::Duration::hours(3))
        .await
        .expect_status(422);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_association_survives_a_restart() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::hours(5);
    event(&s, "RR", json!({
        "eventId": "s", "type": "started", "time": at(t0), "patient": {"system": MRN, "value": "MRN-RR"},
        "mode": "vv", "console": {"serial": "CH-RR", "model": "CARDIOHELP-i"}
    })).await.expect_status(200);
    // SIGKILL, then a new gateway process on the same run store.
    let Scenario {
        pki,
        ehr,
        gateway,
        reader,
    } = s;
    gateway.kill9();
    let config = gateway_config(
        &pki,
        &ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    );
    let restarted = GatewayProcess::start(&config).unwrap();
    let s = Scenario {
        pki,
        ehr,
        gateway: restarted,
        reader,
    };
    let batch = SimulatedCardiohelp::new("CH-RR", 2)
        .without_patient()
        .next_batch(t0 + time::Duration::hours(1));
    s.pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);
    assert_eq!(assert_linked(&s, "CH-RR", "RR", "MRN-RR").await, 12);
}

/// Posts one reading of each of two parameters from Spectrum M4 `serial` at `t`, naming no
/// patient, as the monitor's own vendor.
async fn monitor_readings(s: &Scenario, serial: &str, t: OffsetDateTime) -> Answer {
    let batch = json!({
        "device": {"serial": serial, "model": "M4"},
        "readings": [
            {"parameter": "BloodFlow", "value": 4.12, "unit": "L/min", "time": at(t)},
            {"parameter": "SweepFlow", "value": 3.5, "unit": "L/min", "time": at(t)}
        ]
    });
    s.pki
        .client(SPECTRUM)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
}

/// A whole circuit: a Cardiohelp console, swapped for another after a pump failure, a Spectrum
/// M4 monitor attached on day 1 and detached on day 2, a Terumo CDI 500 and a Quantum gas
/// blender; beside it a Hemochron ACT, a heparin infusion and an anti-Xa level. Each device's readings belong
/// to the run (and its patient) for exactly the period it was on the circuit; the monitor
/// cannot be in two runs at once; the run's Procedure names the consoles as focal devices and
/// the monitor, with its period, as used; the monitor's Device says what it is.
#[tokio::test(flavor = "multi_thread")]
async fn a_circuit_with_a_monitor_attached_and_a_console_swapped() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc() - time::Duration::days(5);
    let hours = time::Duration::hours;
    let run = "CIRC-1";
    event(
        &s,
        run,
        json!({
            "eventId": "s", "type": "started", "time": at(t0),
            "patient": {"system": MRN, "value": "MRN-CIRC"}, "mode": "vv",
            "console": {"serial": "CH-A", "model": "CARDIOHELP-i", "eui64": "00-1B-C5-0A-00-00-0C-4A"}
        }),
    )
    .await
    .expect_status(200);

    // Before the monitor is attached, its readings name no patient and belong to no run.
    let refused = monitor_readings(&s, "M4-7001", t0 + hours(1))
        .await
        .expect_status(422);
    assert!(
        refused.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("no ECMO run"),
        "{}",
        refused.json()
    );

    // Attached in XML, as some integrations send events.
    let attach = format!(
        r#"<runEvent eventId="m4-on" type="device-attached" time="{}"><device serial="M4-7001" model="M4"/></runEvent>"#,
        at(t0 + hours(2))
    );
    s.pki
        .client(GETINGE)
        .send(
            http::Method::POST,
            &s.gateway.url(&format!("/v1/runs/{run}/events")),
            Some("application/xml"),
            attach.into(),
        )
        .await
        .unwrap()
        .expect_status(200);
    monitor_readings(&s, "M4-7001", t0 + hours(3))
        .await
        .expect_status(200);

    // A Terumo CDI 500 joins too, relayed by the hospital's device integration system; a
    // Hemochron ACT names the patient itself (a shared analyser belongs to no circuit).
    event(
        &s,
        run,
        json!({"eventId": "cdi-on", "type": "device-attached", "time": at(t0 + hours(3)),
        "device": {"serial": "CDI-1", "model": "CDI 500"}}),
    )
    .await
    .expect_status(200);
    let integration = s.pki.client(INTEGRATION);
    let cdi = json!({"device": {"serial": "CDI-1", "model": "CDI 500"}, "readings": [
        {"parameter": "pH", "value": 7.38, "unit": "pH", "time": at(t0 + hours(4))},
        {"parameter": "SO2", "value": 72, "unit": "%", "time": at(t0 + hours(4))}
    ]});
    integration
        .post_json(&s.observations_url(), &cdi)
        .await
        .unwrap()
        .expect_status(200);
    let act = json!({"device": {"serial": "HEM-1", "model": "Hemochron Signature Elite"},
        "patient": {"system": MRN, "value": "MRN-CIRC"},
        "readings": [{"parameter": "ACT", "value": 204, "unit": "s", "time": at(t0 + hours(4))}]});
    integration
        .post_json(&s.observations_url(), &act)
        .await
        .unwrap()
        .expect_status(200);
    // The gas blender that sets the sweep joins the circuit; the heparin infusion and the
    // anti-Xa level that steers it name the patient, like the ACT.
    event(
        &s,
        run,
        json!({"eventId": "qvm-on", "type": "device-attached", "time": at(t0 + hours(3)),
        "device": {"serial": "QVM-1", "model": "QVM2"}}),
    )
    .await
    .expect_status(200);
    let blender = json!({"device": {"serial": "QVM-1", "model": "QVM2"}, "readings": [
        {"parameter": "SweepFlow", "value": 4.5, "unit": "L/min", "time": at(t0 + hours(4))},
        {"parameter": "FdO2", "value": 80, "unit": "%", "time": at(t0 + hours(4))}
    ]});
    let heparin = json!({"device": {"serial": "ALR-1", "model": "Alaris PC Unit"},
        "patient": {"system": MRN, "value": "MRN-CIRC"},
        "readings": [{"parameter": "HeparinDoseRate", "value": 1200, "unit": "IU/h", "time": at(t0 + hours(4))}]});
    let anti_xa = json!({"device": {"serial": "BCS-1", "model": "BCS XP"},
        "patient": {"system": MRN, "value": "MRN-CIRC"},
        "readings": [{"parameter": "AntiXa-UFH", "value": 0.35, "unit": "IU/mL", "time": at(t0 + hours(5))}]});
    for body in [&blender, &heparin, &anti_xa] {
        integration
            .post_json(&s.observations_url(), body)
            .await
            .unwrap()
            .expect_status(200);
    }

    // Another patient's run cannot take the monitor while it is on this circuit.
    event(
        &s,
        "CIRC-2",
        json!({
            "eventId": "s", "type": "started", "time": at(t0),
            "patient": {"system": MRN, "value": "MRN-OTHER"}, "mode": "va",
            "console": {"serial": "CH-Z", "model": "CARDIOHELP-i"}
        }),
    )
    .await
    .expect_status(200);
    let busy = event(
        &s,
        "CIRC-2",
        json!({"eventId": "m4", "type": "device-attached", "time": at(t0 + hours(4)),
        "device": {"serial": "M4-7001", "model": "M4"}}),
    )
    .await
    .expect_status(409);
    assert!(
        busy.json()["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("one run at a time"),
        "{}",
        busy.json()
    );
    // A device that is not attached cannot be detached; a model without a table is refused.
    event(
        &s,
        run,
        json!({"eventId": "x1", "type": "device-detached", "time": at(t0 + hours(5)),
        "device": {"serial": "M4-00", "model": "M4"}}),
    )
    .await
    .expect_status(409);
    let unmapped = event(
        &s,
        run,
        json!({"eventId": "x2", "type": "device-attached", "time": at(t0 + hours(5)),
        "device": {"serial": "CDI-1", "model": "CDI-500"}}),
    )
    .await
    .expect_status(422);
    assert!(
        String::from_utf8_lossy(&unmapped.body).contains("device.model"),
        "names the field"
    );

    // The pump fails on day 1: the run moves to console CH-B.
    let swap = t0 + time::Duration::days(1);
    event(
        &s,
        run,
        json!({"eventId": "swap", "type": "console-changed", "time": at(swap),
        "console": {"serial": "CH-B", "model": "CARDIOHELP-i"}}),
    )
    .await
    .expect_status(200);
    readings(&s, "CH-A", swap - hours(1))
        .await
        .expect_status(200);
    readings(&s, "CH-B", swap + hours(1))
        .await
        .expect_status(200);
    readings(&s, "CH-A", swap + hours(1))
        .await
        .expect_status(422);

    // The monitor comes off on day 2; readings after that belong to no run, late ones timed
    // while it was on still do.
    let off = t0 + time::Duration::days(2);
    event(
        &s,
        run,
        json!({"eventId": "m4-off", "type": "device-detached", "time": at(off),
        "device": {"serial": "M4-7001", "model": "M4"}}),
    )
    .await
    .expect_status(200);
    monitor_readings(&s, "M4-7001", off + hours(1))
        .await
        .expect_status(422);
    monitor_readings(&s, "M4-7001", off - hours(1))
        .await
        .expect_status(200);
    // Now free, the monitor may join the other patient's run.
    event(
        &s,
        "CIRC-2",
        json!({"eventId": "m4", "type": "device-attached", "time": at(off + hours(2)),
        "device": {"serial": "M4-7001", "model": "M4"}}),
    )
    .await
    .expect_status(200);
    monitor_readings(&s, "M4-7001", off + hours(3))
        .await
        .expect_status(200);

    let end = t0 + time::Duration::days(3);
    event(&s, run, json!({"eventId": "e", "type": "ended", "time": at(end), "reason": "recovered", "alive": true}))
        .await
        .expect_status(200);

    // What the EHR holds.
    let p = run_procedure(&s, run).await;
    let focal: Vec<&str> = p["focalDevice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["manipulated"]["identifier"]["value"].as_str().unwrap())
        .collect();
    assert_eq!(focal, ["CH-A", "CH-B"]);
    let used = p["usedReference"]
        .as_array()
        .expect("the monitors are used");
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(used[0]["identifier"]["value"], "M4-7001");
    let period = &extension(&used[0], "device-use-period")["valuePeriod"];
    assert_eq!(period["start"], at(t0 + hours(2)));
    assert_eq!(period["end"], at(off));
    let monitor = s
        .reader
        .by_identifier(
            "Device",
            "https://fhir.ecmo-gateway.org/sid/device-serial/spectrum-medical",
            "M4-7001",
        )
        .await
        .unwrap();
    assert_eq!(monitor.len(), 1, "one Device for the monitor");
    assert_eq!(monitor[0]["manufacturer"], "Spectrum Medical");
    assert_eq!(
        monitor[0]["identifier"].as_array().unwrap().len(),
        1,
        "no EUI-64 given"
    );
    // The first console came with its EUI-64: its Device carries it after the serial, as the
    // PoCD IG identifies a device, and the EHR finds it by either.
    let console = s
        .reader
        .by_identifier("Device", mappings::EUI64_SYSTEM, "00-1B-C5-0A-00-00-0C-4A")
        .await
        .unwrap();
    assert_eq!(console.len(), 1, "one Device for the first console");
    assert_eq!(console[0]["identifier"][0]["value"], "CH-A");
    assert_eq!(codes(&monitor[0]["type"]), ["blood-parameter-monitor"]);
    assert_eq!(used[1]["identifier"]["value"], "CDI-1");
    assert_eq!(
        extension(&used[1], "device-use-period")["valuePeriod"]["end"],
        at(end),
        "the end of the run ends the attachment"
    );
    assert_eq!(assert_linked(&s, "CDI-1", run, "MRN-CIRC").await, 2);
    // The blender: used with its period, a gas-blender Device whose metrics are settings, its
    // readings the run's.
    assert_eq!(used[2]["identifier"]["value"], "QVM-1");
    assert_eq!(assert_linked(&s, "QVM-1", run, "MRN-CIRC").await, 2);
    let blender = s
        .reader
        .by_identifier(
            "Device",
            "https://fhir.ecmo-gateway.org/sid/device-serial/spectrum-medical",
            "QVM-1",
        )
        .await
        .unwrap();
    assert_eq!(codes(&blender[0]["type"]), ["gas-blender"]);
    for code in ["sweep-gas-flow", "sweep-gas-fdo2"] {
        let metric = s
            .reader
            .by_identifier(
                "DeviceMetric",
                "https://fhir.ecmo-gateway.org/sid/device-metric/spectrum-medical",
                &format!("QVM-1:{code}"),
            )
            .await
            .unwrap();
        assert_eq!(metric.len(), 1, "{code}");
        assert_eq!(metric[0]["category"], "setting", "{code}");
    }
    // The heparin rate (a setting of the pump) and the anti-Xa level, the patient's.
    for (serial, value) in [("ALR-1", 1200.0), ("BCS-1", 0.35)] {
        let stored: Vec<Value> = s
            .reader
            .all("Observation")
            .await
            .unwrap()
            .into_iter()
            .filter(|o| of_device(o, serial))
            .collect();
        assert_eq!(stored.len(), 1, "{serial}");
        assert_eq!(stored[0]["valueQuantity"]["value"].as_f64(), Some(value));
        assert_eq!(stored[0]["subject"]["identifier"]["value"], "MRN-CIRC");
    }
    let act: Vec<Value> = s
        .reader
        .all("Observation")
        .await
        .unwrap()
        .into_iter()
        .filter(|o| of_device(o, "HEM-1"))
        .collect();
    assert_eq!(act.len(), 1, "the ACT is stored");
    assert_eq!(act[0]["valueQuantity"]["value"], 204);
    assert_eq!(act[0]["code"]["coding"][1]["code"], "3184-9");
    assert_eq!(act[0]["subject"]["identifier"]["value"], "MRN-CIRC");

    // Every monitor reading taken while it was on this circuit is this patient's and run's;
    // the one after it moved is the other patient's.
    let all = s.reader.all("Observation").await.unwrap();
    let of_monitor: Vec<&Value> = all.iter().filter(|o| of_device(o, "M4-7001")).collect();
    assert_eq!(
        of_monitor.len(),
        6,
        "three accepted batches of two readings"
    );
    let by_run = |run: &str| {
        of_monitor
            .iter()
            .filter(|o| o["partOf"][0]["identifier"]["value"] == run)
            .map(|o| {
                o["subject"]["identifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(by_run(run), ["MRN-CIRC"; 4]);
    assert_eq!(by_run("CIRC-2"), ["MRN-OTHER"; 2]);
    assert_eq!(assert_linked(&s, "CH-A", run, "MRN-CIRC").await, 12);
    assert_eq!(assert_linked(&s, "CH-B", run, "MRN-CIRC").await, 12);

    // The ELSO registry record of the finished run, from the command line; the run still on
    // ECMO has none yet.
    let registry = |run: &str, csv: bool| {
        let p = |f: &str| s.pki.path(f);
        let mut command =
            std::process::Command::new(conformance_tests::harness::gateway_binary().unwrap());
        command
            .args(["runs", "--admin-url", &s.gateway.admin_url(""), "--ca"])
            .arg(p("ca.pem"))
            .arg("--cert")
            .arg(p("admin.pem"))
            .arg("--key")
            .arg(p("admin.key"))
            .args(["registry", run]);
        if csv {
            command.arg("--csv");
        }
        command.output().unwrap()
    };
    let json_out = registry(run, false);
    assert!(json_out.status.success(), "{json_out:?}");
    let record: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(record["durationHours"], 72.0);
    assert_eq!(record["outcome"]["reason"], "recovered");
    assert_eq!(record["modes"][0]["mode"], "vv");
    let devices: Vec<(&str, &str)> = record["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["role"].as_str().unwrap(), d["serial"].as_str().unwrap()))
        .collect();
    assert_eq!(
        devices,
        [
            ("console", "CH-A"),
            ("console", "CH-B"),
            ("blood-parameter-monitor", "M4-7001"),
            ("blood-parameter-monitor", "CDI-1"),
            ("gas-blender", "QVM-1")
        ]
    );
    let csv_out = registry(run, true);
    assert!(csv_out.status.success(), "{csv_out:?}");
    let csv = String::from_utf8(csv_out.stdout).unwrap();
    assert!(csv.starts_with("item,value,code,start,end\n"), "{csv}");
    assert!(
        csv.contains(&format!(
            "device (blood-parameter-monitor),Spectrum Medical M4 M4-7001,,{},{}",
            at(t0 + hours(2)),
            at(off)
        )),
        "{csv}"
    );
    let open = registry("CIRC-2", false);
    assert!(!open.status.success());
    assert!(
        String::from_utf8_lossy(&open.stdout).contains("has not ended"),
        "{open:?}"
    );
}
