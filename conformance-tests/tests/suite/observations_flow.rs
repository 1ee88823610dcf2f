//! Readings posted to the real gateway process arrive at the reference EHR as the exact
//! Observations the mapping tables promise, exactly once, in every write style.

use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::harness::{GETINGE, SPECTRUM, Scenario, WriteStyle, now_rfc3339};
use serde_json::{Value, json};

const MRN_SYSTEM: &str = "urn:oid:1.2.36.146.595.217.0.1";

fn coding<'a>(observation: &'a Value, system: &str) -> Option<&'a Value> {
    observation["code"]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == system)
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_arrive_with_exact_codes_values_units_and_times() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    // An hour ago, as a console in UTC+01:00 stamps it; the identifier keys it in UTC.
    let utc = time::OffsetDateTime::now_utc()
        .replace_millisecond(250)
        .unwrap()
        - time::Duration::hours(1);
    let local = utc.to_offset(time::macros::offset!(+1));
    let time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.250+01:00",
        local.year(),
        u8::from(local.month()),
        local.day(),
        local.hour(),
        local.minute(),
        local.second()
    );
    let time = time.as_str();
    let compact = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.250Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    );
    let batch = json!({
        "device": {"serial": "CH-0042", "model": "CARDIOHELP-i"},
        "patient": {"system": MRN_SYSTEM, "value": "MRN-881"},
        "readings": [
            {"parameter": "Flow", "value": 4.25, "unit": "L/min", "time": time},
            {"parameter": "RPM", "value": 3510, "unit": "rpm", "time": time},
            {"parameter": "PVen", "value": -8.0, "unit": "kPa", "time": time},
            {"parameter": "SvO2", "value": -32000, "unit": "%", "time": time},
            {"parameter": "Hct", "value": 31.0, "unit": "%", "time": time, "flags": ["in-alarm"]},
            {"parameter": "Bubble", "value": 0, "time": time}
        ]
    });
    let answer = s
        .pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);
    let receipt = answer.json();
    assert_eq!(receipt["status"], "delivered");
    assert_eq!(receipt["resources"].as_array().unwrap().len(), 6);
    assert_eq!(
        receipt["resources"][0]["destinations"]["ehr"],
        "201 Created"
    );
    assert_eq!(receipt["resources"][0]["dispositions"]["ehr"], "created");

    // Direct delivery keeps no record of what the EHR was given: a changed value finds the
    // existing Observation and is not applied, and the device is told so, not left to guess.
    let mut changed = batch.clone();
    changed["readings"][0]["value"] = json!(4.5);
    let again = s
        .pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &changed)
        .await
        .unwrap()
        .expect_status(200)
        .json();
    assert_eq!(again["resources"][0]["dispositions"]["ehr"], "existing");

    let stored = s.stored_observations().await.unwrap();
    assert_eq!(stored.len(), 6);
    let find = |code: &str| {
        stored
            .iter()
            .find(|(id, _)| id.contains(&format!(":{code}:")))
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("no {code} at the EHR"))
    };

    let flow = find("pump-blood-flow");
    assert_eq!(flow["status"], "final");
    assert_eq!(
        flow["meta"]["profile"][0],
        "https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-circuit-observation"
    );
    assert_eq!(
        coding(&flow, "https://fhir.ecmo-gateway.org/CodeSystem/ecmo").unwrap()["code"],
        "pump-blood-flow"
    );
    assert_eq!(
        coding(&flow, "http://snomed.info/sct").unwrap()["code"],
        "251288004"
    );
    assert_eq!(flow["valueQuantity"]["value"].to_string(), "4.25");
    assert_eq!(flow["valueQuantity"]["system"], "http://unitsofmeasure.org");
    assert_eq!(flow["valueQuantity"]["code"], "L/min");
    assert_eq!(flow["effectiveDateTime"], time);
    assert_eq!(flow["subject"]["identifier"]["system"], MRN_SYSTEM);
    assert_eq!(flow["subject"]["identifier"]["value"], "MRN-881");
    assert_eq!(flow["device"]["type"], "DeviceMetric");
    assert_eq!(
        flow["device"]["identifier"]["value"],
        "CH-0042:pump-blood-flow"
    );
    assert_eq!(
        flow["identifier"][0]["value"],
        format!("getinge-cardiohelp:CH-0042:pump-blood-flow:{compact}")
    );
    assert_eq!(flow["category"][1]["coding"][0]["code"], "182744004");

    let speed = find("pump-speed");
    assert_eq!(speed["valueQuantity"]["code"], "/min");
    assert_eq!(speed["valueQuantity"]["value"].to_string(), "3510");

    // -8 kPa is -60 mmHg (7.5006 mmHg per kPa, 0 decimals in the table).
    let drainage = find("drainage-pressure");
    assert_eq!(drainage["valueQuantity"]["code"], "mm[Hg]");
    assert_eq!(drainage["valueQuantity"]["value"].to_string(), "-60");

    // The console's invalid marker is an absent value, never the number -32000.
    let svo2 = find("drainage-blood-saturation");
    assert!(svo2.get("valueQuantity").is_none());
    assert_eq!(svo2["dataAbsentReason"]["coding"][0]["code"], "error");
    assert_eq!(
        coding(&svo2, "urn:iso:std:iso:11073:10101").unwrap()["code"],
        "150332"
    );

    let hct = find("circuit-hematocrit");
    assert_eq!(hct["interpretation"][0]["coding"][0]["code"], "in-alarm");
    assert_eq!(coding(&hct, "http://loinc.org").unwrap()["code"], "20570-8");

    assert_eq!(find("bubble-detected")["valueBoolean"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_a_tenth_of_a_millisecond_apart_stay_two_observations() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let second = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let at = |fraction: &str| second.replace('Z', &format!(".{fraction}Z"));
    let batch = json!({
        "device": {"serial": "CH-0043", "model": "CARDIOHELP-i"},
        "patient": {"system": MRN_SYSTEM, "value": "MRN-882"},
        "readings": [
            {"parameter": "PVen", "value": -30, "unit": "mmHg", "time": at("2501")},
            {"parameter": "PVen", "value": -31, "unit": "mmHg", "time": at("2502")},
            {"parameter": "PVen", "value": -32, "unit": "mmHg", "time": at("250")}
        ]
    });
    s.pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);
    let mut stored: Vec<(String, String)> = s
        .stored_observations()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, o)| (id, o["valueQuantity"]["value"].to_string()))
        .collect();
    stored.sort();
    let suffixes: Vec<(&str, &str)> = stored
        .iter()
        .map(|(id, v)| (&id[id.rfind('.').unwrap()..], v.as_str()))
        .collect();
    assert_eq!(
        suffixes,
        [(".2501Z", "-30"), (".2502Z", "-31"), (".250Z", "-32")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resending_never_duplicates_in_any_write_style() {
    for style in [
        WriteStyle::TRANSACTION_CONDITIONAL,
        WriteStyle::SINGLE_CONDITIONAL,
        WriteStyle::SINGLE_PUT,
        WriteStyle::TRANSACTION_PUT,
    ] {
        let s = Scenario::start(style).await.unwrap();
        let mut console = SimulatedCardiohelp::new("CH-0042", 7).with_patient(MRN_SYSTEM, "MRN-9");
        let now = time::OffsetDateTime::now_utc();
        let batch = console.next_batch(now);
        let vendor = s.pki.client(GETINGE);
        let first = vendor
            .post_json(&s.observations_url(), &batch)
            .await
            .unwrap();
        assert_eq!(
            first.status,
            200,
            "{style:?}: {}",
            String::from_utf8_lossy(&first.body)
        );
        let after_first = s.stored_observations().await.unwrap();
        assert_eq!(after_first.len(), 12, "{style:?}");

        let again = vendor
            .post_json(&s.observations_url(), &batch)
            .await
            .unwrap();
        assert_eq!(again.status, 200, "{style:?}");
        let after_second = s.stored_observations().await.unwrap();
        assert_eq!(
            after_second.len(),
            12,
            "{style:?}: a resend must not duplicate"
        );
        let mut ids: Vec<_> = after_second.iter().map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 12, "{style:?}: identifiers are unique");

        // The next cycle adds exactly its own readings.
        let next = console.next_batch(now + time::Duration::seconds(1));
        assert_eq!(
            vendor
                .post_json(&s.observations_url(), &next)
                .await
                .unwrap()
                .status,
            200
        );
        assert_eq!(
            s.stored_observations().await.unwrap().len(),
            24,
            "{style:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn second_vendor_and_second_family_map_through_their_own_table() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let time = now_rfc3339();
    let batch = json!({
        "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": "M4-7001", "model": "M4"},
        "readings": [
            {"parameter": "SweepFlow", "value": 3500, "unit": "mL/min", "time": time},
            {"parameter": "ArterialSO2", "value": 99.1, "unit": "%", "time": time}
        ]
    });
    s.pki
        .client(SPECTRUM)
        .post_json(&s.observations_url(), &batch)
        .await
        .unwrap()
        .expect_status(200);
    let stored = s.stored_observations().await.unwrap();
    let sweep = stored
        .iter()
        .find(|(id, _)| id.contains(":sweep-gas-flow:"))
        .unwrap();
    assert_eq!(sweep.1["valueQuantity"]["value"].to_string(), "3.50");
    assert_eq!(sweep.1["valueQuantity"]["code"], "L/min");
    assert!(sweep.0.starts_with("spectrum-m4:M4-7001:"));
    assert_eq!(sweep.1["subject"]["identifier"]["value"], "MRN-T1");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_destination_receives_the_batch() {
    use conformance_tests::ehr::ReferenceEhr;
    use conformance_tests::harness::{EhrReader, GatewayProcess, TestPki, gateway_config};

    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let registry = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // A second destination, a research registry written with PUT, one request per resource.
    let config = gateway_config(
        &pki,
        &ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    ) + &format!(
        "\n[[destination]]\nname = \"registry\"\nbase_url = \"{}\"\nca = [\"{}\"]\nclient_cert = \"{}\"\nclient_key = \"{}\"\nwrite = \"put\"\nbundle = \"single\"\n",
        registry.base_url,
        pki.path("ca.pem").display(),
        pki.path("gateway-client.pem").display(),
        pki.path("gateway-client.key").display(),
    );
    let gateway = GatewayProcess::start(&config).unwrap();
    let batch = SimulatedCardiohelp::new("CH-0042", 11).next_batch(time::OffsetDateTime::now_utc());
    let answer = pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(200);
    let receipt = answer.json();
    assert_eq!(
        receipt["resources"][0]["destinations"]["ehr"],
        "201 Created"
    );
    assert_eq!(
        receipt["resources"][0]["destinations"]["registry"],
        "201 Created"
    );
    for base_url in [&ehr.base_url, &registry.base_url] {
        let reader = EhrReader {
            client: pki.client("gateway-client"),
            base_url: base_url.clone(),
        };
        let stored = reader.all("Observation").await.unwrap();
        assert_eq!(stored.len(), 12, "{base_url}");
        let first = &stored[0];
        let found = reader
            .by_identifier(
                "Observation",
                first["identifier"][0]["system"].as_str().unwrap(),
                first["identifier"][0]["value"].as_str().unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            found.len(),
            1,
            "search by identifier finds exactly the one Observation"
        );
    }
}
