//! HL7 v2 in (IHE PCD-01 ORU^R01 over MLLP): messages shaped like a device integration
//! system's, sent to the real gateway over mutual TLS (and plain TCP where configured), each
//! answered by an ACK; what the ACK promises is checked at the reference EHR.

use std::collections::{HashMap, HashSet};

use conformance_tests::harness::{
    GETINGE, GatewayProcess, SPECTRUM, TestPki, UNCONFIGURED, admin_until, durable_config, mtls_ehr,
};
use conformance_tests::mllp::{Ack, MllpSender};
use conformance_tests::mllp_receiver::{ReceiverFault, ReferenceReceiver, RunningReceiver};
use serde_json::Value;
use time::OffsetDateTime;

const MRN_SYSTEM: &str = "urn:oid:1.2.36.146.595.217.0.1";

/// `[hl7v2]` for the test gateway: `transport` lines, and the hospital's MRN namespace.
fn hl7v2_section(transport: &str) -> String {
    format!(
        "\n[hl7v2]\nlisten = \"127.0.0.1:0\"\n{transport}\nread_timeout = \"2s\"\n\n[hl7v2.patient_identifier_systems]\nHOSP = \"{MRN_SYSTEM}\"\n"
    )
}

/// An HL7 DTM in UTC+01:00, to the second.
fn dtm(at: OffsetDateTime) -> String {
    gateway::hl7v2::er7::dtm(at.to_offset(time::macros::offset!(+1)))
}

/// The gateway's identifier time of `at` (UTC, compact).
fn compact(at: OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.000Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// MSH of a PCD-01 message from a device integration system, with control id `id`.
fn msh(id: &str, now: OffsetDateTime) -> String {
    format!(
        "MSH|^~\\&|CAPSULE^0012340000000001^EUI-64|ICU-3|ECMO-GW|HOSP|{}||ORU^R01^ORU_R01|{id}|P|2.6|||NE|AL||UNICODE UTF-8|||IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO\r",
        dtm(now)
    )
}

async fn settled(gateway: &GatewayProcess, pki: &TestPki) {
    admin_until(gateway, &pki.client("admin"), "/admin/v1/queues", |q| {
        q["destinations"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["pending"] == 0))
    })
    .await;
}

fn observations_by_identifier(ehr: &conformance_tests::ehr::RunningEhr) -> HashMap<String, Value> {
    ehr.ehr
        .all_resources("Observation")
        .into_iter()
        .map(|o| (o["identifier"][0]["value"].as_str().unwrap().to_owned(), o))
        .collect()
}

/// A test PKI, the reference EHR and the gateway on an outbox with `[hl7v2]` (`transport`).
async fn start(
    transport: &str,
) -> (
    TestPki,
    conformance_tests::ehr::RunningEhr,
    tempfile::TempDir,
    GatewayProcess,
) {
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        + &hl7v2_section(transport);
    let gateway = GatewayProcess::start(&config).unwrap();
    (pki, ehr, dir, gateway)
}

/// An MLLP connection over mutual TLS with the PKI's certificate `stem`.
async fn tls_sender(
    gateway: &GatewayProcess,
    pki: &TestPki,
    stem: &str,
) -> Result<MllpSender, gateway::BoxError> {
    let mllp = gateway.mllp.expect("the MLLP listener's address is logged");
    MllpSender::tls(
        mllp,
        &pki.path("ca.pem"),
        &pki.path(&format!("{stem}.pem")),
        &pki.path(&format!("{stem}.key")),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn pcd01_messages_over_mutual_tls_reach_the_ehr_once_and_refusals_name_the_field() {
    let (pki, ehr, _dir, gateway) = start("").await;
    let connect = |stem| tls_sender(&gateway, &pki, stem);
    let mut sender = connect(GETINGE).await.unwrap();

    // A Cardiohelp through a device integration system: the MDS and VMD describe the device
    // (OBX-18: serial and model), metrics by private code and by MDC code, units in MDC and
    // UCUM, one metric the device could not obtain.
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let taken = now - time::Duration::minutes(1);
    let t = dtm(taken);
    let first = format!(
        "{}PID|||MRN-HL7-1^^^HOSP^MR~V-9^^^HOSP^VN||M\\XC3BC\\ller^J\\XC3B6\\rg\r\
         PV1||I|ICU^3^1\r\
         OBR|1|A-1^CAPSULE|A-1^CAPSULE|182777000^monitoring of patient^SCT|||{t}\r\
         OBX|1||ECMO^ECMO console^99ECMO|1.0.0.0|||||||X|||||||CH-HL7-1^CARDIOHELP-i^^L\r\
         OBX|2||PUMP^Blood pump^99ECMO|1.1.0.0|||||||X\r\
         OBX|3|NM|Flow^Blood flow^99CH|1.1.1.1|4.35|265216^MDC_DIM_X_L_PER_MIN^MDC|||||F|||{t}\r\
         OBX|4|NM|150332^MDC_SAT_O2_VEN^MDC|1.1.1.2|71.5|262688^MDC_DIM_PERCENT^MDC|||||F|||{t}\r\
         OBX|5|NM|PVen^Drainage pressure^99CH|1.1.1.3|-62|266016^MDC_DIM_MMHG^MDC|||||R|||{t}\r\
         OBX|6|NM|Hct^^99CH|1.1.1.4||%^^UCUM|||||X|||{t}\r\
         OBX|7|CWE|Bubble^Bubble detected^99CH|1.1.1.6|N^No^HL70136||||||F|||{t}\r",
        msh("A-1", now)
    );
    let ack = Ack::parse(&sender.send(&first).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}\n{}", gateway.log_text());
    assert_eq!(ack.control_id, "A-1");
    assert_eq!(ack.locations(), ["OBX^6^5^1"]);
    assert_eq!(ack.errors[0].2, "W");

    settled(&gateway, &pki).await;
    let stored = observations_by_identifier(&ehr);
    assert_eq!(stored.len(), 4, "{:?}", stored.keys());
    let at = compact(taken);
    let bubble = &stored[&format!("getinge-cardiohelp:CH-HL7-1:bubble-detected:{at}")];
    assert_eq!(bubble["valueBoolean"], false);
    let flow = &stored[&format!("getinge-cardiohelp:CH-HL7-1:pump-blood-flow:{at}")];
    assert_eq!(flow["valueQuantity"]["value"].to_string(), "4.35");
    assert_eq!(flow["valueQuantity"]["code"], "L/min");
    assert_eq!(flow["subject"]["identifier"]["system"], MRN_SYSTEM);
    assert_eq!(flow["subject"]["identifier"]["value"], "MRN-HL7-1");
    assert_eq!(
        flow["device"]["identifier"]["value"],
        "CH-HL7-1:pump-blood-flow"
    );
    assert_eq!(flow["status"], "final");
    let svo2 = &stored[&format!("getinge-cardiohelp:CH-HL7-1:drainage-blood-saturation:{at}")];
    assert_eq!(svo2["valueQuantity"]["value"].to_string(), "71.5");
    let pven = &stored[&format!("getinge-cardiohelp:CH-HL7-1:drainage-pressure:{at}")];
    assert_eq!(pven["valueQuantity"]["value"].to_string(), "-62");
    assert_eq!(pven["valueQuantity"]["code"], "mm[Hg]");

    // The same message again (a sender that missed the ACK): AA, nothing twice. A new reading
    // after it is delivered behind anything the resend could have queued.
    let ack = Ack::parse(&sender.send(&first).await.unwrap());
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AA", "A-1"));
    let later = now - time::Duration::seconds(30);
    let next = format!(
        "{}PID|||MRN-HL7-1^^^HOSP^MR\r\
         OBX|1|NM|RPM^Pump speed^99CH|1.1.1.5|3480|/min^^UCUM|||||F|||{}||||CH-HL7-1^CARDIOHELP-i\r",
        msh("A-2", now),
        dtm(later)
    );
    let ack = Ack::parse(&sender.send(&next).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}");
    settled(&gateway, &pki).await;
    let counts = ehr.ehr.identifier_counts("Observation");
    assert_eq!(counts.len(), 5, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let speed = &observations_by_identifier(&ehr)
        [&format!("getinge-cardiohelp:CH-HL7-1:pump-speed:{}", compact(later))];
    assert_eq!(speed["valueQuantity"]["value"].to_string(), "3480");

    // Content the mapping refuses: AE, each problem at the field it came from, nothing kept.
    let bad = format!(
        "{}PID|||MRN-HL7-1^^^HOSP^MR\r\
         OBX|1|NM|Flow^^99CH|1.1.1.1|4.1|gal/min^^UCUM|||||F|||{t}||||CH-HL7-1^CARDIOHELP-i\r\
         OBX|2|NM|Flw^^99CH|1.1.1.2|4.1|L/min^^UCUM|||||F|||{t}\r\
         OBX|3|NM|Flow^^99CH|1.1.1.3|40|L/min^^UCUM|||||F|||{t}\r",
        msh("B-1", now)
    );
    let ack = Ack::parse(&sender.send(&bad).await.unwrap());
    assert_eq!(ack.code, "AE", "{ack:?}");
    assert_eq!(ack.control_id, "B-1");
    assert_eq!(ack.locations(), ["OBX^1^6^1", "OBX^2^3^1", "OBX^3^5^1"]);
    let codes: Vec<&str> = ack.errors.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(codes, ["103", "103", "102"]);
    assert!(ack.errors[0].3.contains("gal/min"), "{ack:?}");
    // v2's own syntax: a comma decimal, and a time without a zone.
    let syntax = format!(
        "{}OBX|1|NM|Flow^^99CH|1.1.1.1|4,1|L/min^^UCUM|||||F|||{t}||||CH-HL7-1^CARDIOHELP-i\r\
         OBX|2|NM|Flow^^99CH|1.1.1.2|4.1|L/min^^UCUM|||||F|||{}\r",
        msh("B-2", now),
        &t[..14]
    );
    let ack = Ack::parse(&sender.send(&syntax).await.unwrap());
    assert_eq!(ack.code, "AE");
    assert_eq!(ack.locations(), ["OBX^1^5^1", "OBX^2^14^1"]);

    // Not a message the gateway takes: AR naming MSH-9.
    let adt = msh("C-1", now).replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01") + "PID|||1^^^HOSP\r";
    let ack = Ack::parse(&sender.send(&adt).await.unwrap());
    assert_eq!((ack.code.as_str(), ack.control_id.as_str()), ("AR", "C-1"));
    assert_eq!(ack.locations(), ["MSH^1^9^1^1"]);
    assert_eq!(ack.errors[0].1, "200");
    // Wrong encoding characters: AR naming MSH-2 (no control id can be read).
    let ack = Ack::parse(&sender.send("MSH|^^\\&|X\rOBX|1").await.unwrap());
    assert_eq!(ack.code, "AR");
    assert_eq!(ack.locations(), ["MSH^1^2^1"]);
    // The connection still works after refusals.
    let after = format!(
        "{}PID|||MRN-HL7-1^^^HOSP^MR\r\
         OBX|1|NM|RPM^^99CH|1.1.1.5|3490|rpm^^L|||||F|||{}||||CH-HL7-1^CARDIOHELP-i\r",
        msh("A-3", now),
        dtm(now - time::Duration::seconds(20))
    );
    let ack = Ack::parse(&sender.send(&after).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}");

    // Another vendor's certificate may not post for this device: AE naming OBX-18.1.
    let mut spectrum = connect(SPECTRUM).await.unwrap();
    let ack = Ack::parse(&spectrum.send(&next.replace("A-2", "S-1")).await.unwrap());
    assert_eq!(ack.code, "AE", "{ack:?}");
    assert_eq!(ack.locations(), ["OBX^1^18^1^1"]);
    assert_eq!(ack.errors[0].1, "204");

    // A certificate that is no vendor gets no ACK: the connection is closed.
    let mut stranger = connect(UNCONFIGURED).await.unwrap();
    assert!(stranger.send(&next).await.is_err());

    // Bytes outside a frame: AR, then the connection is closed (it cannot be re-synchronised).
    let mut garbage = connect(GETINGE).await.unwrap();
    garbage.write_raw(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let ack = Ack::parse(&garbage.ack().await.unwrap());
    assert_eq!(ack.code, "AR");
    assert!(garbage.closed().await);
    // A frame that never ends is closed after the read timeout, nothing recorded.
    let mut truncated = connect(GETINGE).await.unwrap();
    truncated
        .write_raw(format!("\x0b{}", msh("T-1", now)).as_bytes())
        .await
        .unwrap();
    assert!(truncated.closed().await);

    settled(&gateway, &pki).await;
    let counts = ehr.ehr.identifier_counts("Observation");
    assert_eq!(counts.len(), 6, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let log = gateway.log_text_untimed();
    for private in ["MRN-HL7-1", "4.35", "M\\XC3BC\\ller", "Müller"] {
        assert!(!log.contains(private), "the log names '{private}'");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_mllp_on_a_device_network_posts_as_its_configured_vendor() {
    let (pki, ehr, _dir, gateway) = start("tls = false\nplain_vendor = \"integration\"").await;
    let mut sender = MllpSender::plain(gateway.mllp.unwrap()).await.unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let taken = now - time::Duration::minutes(2);
    // A Hemochron ACT by LOINC code (LN), Latin-1 with a name that needs it.
    let act = format!(
        "{}PID|||MRN-ACT-1^^^&1.2.36.146.595.217.0.1&ISO^MR||Gr\u{fc}n^Ana\r\
         OBX|1|NM|3184-9^ACT^LN|1.1.1.1|182|s^^UCUM|||||F|||{}||||HEM-77^Hemochron Signature Elite\r",
        msh("H-1", now).replace("UNICODE UTF-8", "8859/1"),
        dtm(taken)
    );
    let latin1: Vec<u8> = act.chars().map(|c| c as u8).collect();
    let ack = Ack::parse(&sender.send_bytes(&latin1).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}\n{}", gateway.log_text());
    settled(&gateway, &pki).await;
    let stored = observations_by_identifier(&ehr);
    assert_eq!(stored.len(), 1, "{:?}", stored.keys());
    let (id, act) = stored.iter().next().unwrap();
    assert!(id.starts_with("werfen-hemochron:HEM-77:"), "{id}");
    assert!(id.ends_with(&compact(taken)), "{id}");
    assert_eq!(act["valueQuantity"]["value"].to_string(), "182");
    assert_eq!(act["subject"]["identifier"]["value"], "MRN-ACT-1");

    // The plain vendor's policy still holds: a Cardiohelp is not the integration vendor's.
    let cardiohelp = format!(
        "{}OBX|1|NM|Flow^^99CH|1.1.1.1|4.1|L/min^^UCUM|||||F|||{}||||CH-9^CARDIOHELP-i\r",
        msh("H-2", now),
        dtm(taken)
    );
    let ack = Ack::parse(&sender.send(&cardiohelp).await.unwrap());
    assert_eq!(ack.code, "AE");
    assert_eq!(ack.errors[0].1, "204");
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_messages_get_the_acks_their_shapes_call_for() {
    let (pki, ehr, _dir, gateway) = start("").await;
    let mut sender = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let taken =
        OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::minutes(1);
    let expected: HashMap<&str, (&str, Vec<&str>)> = [
        ("dis-cardiohelp", ("AA", vec![])),
        (
            "nist-shape-pulse-oximeter",
            ("AE", vec!["PID^1^3^1^4", "OBX^1^14^1"]),
        ),
        (
            // MSH-15 AL, MSH-16 NE: a commit ACK (CE) rather than an application ACK.
            "pocd-shape-enumeration-and-waveform",
            (
                "CE",
                vec![
                    "OBX^1^18^1^2",
                    "OBX^2^18^1^1",
                    "PID^1^3^1^4",
                    "OBX^4^6^1^1",
                    "OBX^5^5^1^1",
                    "OBX^6^2^1",
                ],
            ),
        ),
    ]
    .into_iter()
    .collect();
    let samples = conformance_tests::mllp::sample_messages(&dtm(taken)).unwrap();
    assert_eq!(samples.len(), expected.len());
    for (name, message) in samples {
        let (code, locations) = &expected[name.as_str()];
        let latin1 = message.contains("|8859/1|");
        let bytes: Vec<u8> = if latin1 {
            message.chars().map(|c| c as u8).collect()
        } else {
            message.into_bytes()
        };
        let ack = Ack::parse(&sender.send_bytes(&bytes).await.unwrap());
        assert_eq!(&ack.code, code, "{name}: {ack:?}");
        assert_eq!(&ack.locations(), locations, "{name}: {ack:?}");
    }
    settled(&gateway, &pki).await;
    let stored = observations_by_identifier(&ehr);
    assert_eq!(stored.len(), 7, "{:?}", stored.keys());
    let setting = &stored[&format!(
        "getinge-cardiohelp:CH-2001:pump-speed-setting:{}",
        compact(taken)
    )];
    assert_eq!(setting["valueQuantity"]["value"].to_string(), "3500");
    assert_eq!(setting["subject"]["identifier"]["value"], "MRN-4711");
}

/// `batch` posted by the Cardiohelp's vendor, which the gateway must accept (202).
async fn accepted(
    pki: &TestPki,
    gateway: &GatewayProcess,
    batch: Value,
) -> conformance_tests::client::Answer {
    pki.client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(202)
}

/// The gateway with a FHIR EHR and an HL7 v2 receiver as destinations; `v2_settings` are
/// more keys of the receiver's `[[destination]]`.
async fn start_with_receiver(
    v2_settings: &str,
) -> (
    TestPki,
    conformance_tests::ehr::RunningEhr,
    RunningReceiver,
    tempfile::TempDir,
    GatewayProcess,
) {
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let receiver = ReferenceReceiver::start(pki.ehr_tls("ca.pem"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        + &format!(
            r#"
[[destination]]
name = "v2-ehr"
kind = "hl7v2"
base_url = "{url}"
ca = ["{ca}"]
client_cert = "{cert}"
client_key = "{key}"
timeout = "2s"
linger = "5ms"
breaker_failures = 100
retry_backoff_max = "500ms"
{v2_settings}
[destination.hl7v2]
receiving_application = "EHR_V2_IN"
receiving_facility = "HOSP"
"#,
            url = receiver.url(),
            ca = pki.path("ca.pem").display(),
            cert = pki.path("gateway-client.pem").display(),
            key = pki.path("gateway-client.key").display(),
        );
    let gateway = GatewayProcess::start(&(config + &hl7v2_section(""))).unwrap();
    (pki, ehr, receiver, dir, gateway)
}

#[tokio::test(flavor = "multi_thread")]
async fn oru_out_reaches_a_v2_receiver_once_through_refusals_lost_acks_and_corrections() {
    let (pki, ehr, receiver, _dir, gateway) = start_with_receiver("").await;
    let v2 = &receiver.receiver;
    // The receiver is busy once, loses one ACK after keeping the message, and drops one
    // connection: every reading still arrives, once.
    v2.fail_next(ReceiverFault::Reject, 1);
    v2.fail_next(ReceiverFault::LoseAck, 1);
    v2.fail_next(ReceiverFault::Drop, 1);
    let taken =
        OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::minutes(1);
    let rfc3339 = |at: OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let batch = |readings: Value| {
        serde_json::json!({
            "device": {"serial": "CH-V2-1", "model": "CARDIOHELP-i"},
            "patient": {"system": MRN_SYSTEM, "value": "MRN-V2-1"},
            "readings": readings
        })
    };
    let post = |body: Value| accepted(&pki, &gateway, body);
    post(batch(serde_json::json!([
        {"parameter": "Flow", "value": 4.35, "unit": "L/min", "time": rfc3339(taken)},
        {"parameter": "RPM", "value": 3480, "unit": "rpm", "time": rfc3339(taken)},
        {"parameter": "SvO2", "value": -32000, "unit": "%", "time": rfc3339(taken)}
    ])))
    .await;
    settled(&gateway, &pki).await;
    let results = v2.results();
    assert_eq!(results.len(), 3, "{results:?}\n{}", gateway.log_text());
    assert!(v2.duplicates() >= 1, "the lost ACK's message came again");
    let ids: HashSet<&str> = results.iter().map(|r| r.control_id.as_str()).collect();
    assert_eq!(ids.len(), 3);
    for r in &results {
        assert_eq!(
            r.patient,
            format!("MRN-V2-1^^^&{}&ISO^MR", &MRN_SYSTEM[8..])
        );
        assert_eq!(r.device, "CH-V2-1");
        // The reading's own time, in the zone it was sent in (UTC).
        assert_eq!(
            r.time,
            format!("{}+0000", &compact(taken)[..15].replace('T', ""))
        );
    }
    let flow = results
        .iter()
        .find(|r| r.code.contains("pump-blood-flow"))
        .unwrap();
    assert_eq!(
        (
            flow.value.as_str(),
            flow.unit.as_str(),
            flow.status.as_str()
        ),
        ("4.35", "L/min^L/min^UCUM", "F")
    );
    // SvO2 by its MDC code first; the console's invalid marker is no value, status X.
    let svo2 = results
        .iter()
        .find(|r| r.code.starts_with("150332^MDC_SAT_O2_VEN^MDC^"))
        .unwrap();
    assert_eq!((svo2.value.as_str(), svo2.status.as_str()), ("", "X"));
    // The FHIR destination got the same readings, and its Provenance; the receiver none.
    assert_eq!(ehr.ehr.count("Observation"), 3);

    // A corrected value is a new message, OBX-11 C, never dropped as a duplicate.
    post(batch(serde_json::json!([
        {"parameter": "Flow", "value": 4.5, "unit": "L/min", "time": rfc3339(taken)}
    ])))
    .await;
    settled(&gateway, &pki).await;
    let results = v2.results();
    assert_eq!(results.len(), 4, "{results:?}");
    let correction = results.last().unwrap();
    assert!(correction.code.contains("pump-blood-flow"));
    assert_eq!(
        (correction.value.as_str(), correction.status.as_str()),
        ("4.5", "C")
    );

    // Content the receiver refuses (AE) is dead-lettered there, not retried forever; the FHIR
    // destination still gets it.
    v2.fail_next(ReceiverFault::Error, 1);
    post(batch(serde_json::json!([
        {"parameter": "PVen", "value": -60, "unit": "mmHg", "time": rfc3339(taken)}
    ])))
    .await;
    let queues = admin_until(&gateway, &pki.client("admin"), "/admin/v1/queues", |q| {
        q["destinations"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["pending"] == 0))
    })
    .await;
    let v2_stats = queues["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["destination"] == "v2-ehr")
        .unwrap();
    assert_eq!(v2_stats["dead"], 1, "{queues}");
    assert_eq!(v2.results().len(), 4);
    assert_eq!(ehr.ehr.count("Observation"), 4);

    // The receiver closes its connection after an ACK (as interfaces that drop idle
    // connections do): the next message goes on a new connection in the same attempt.
    v2.fail_next(ReceiverFault::CloseAfterAck, 1);
    let mut tracking = Vec::new();
    for (parameter, value, unit) in [("Hct", 30, "%"), ("Hb", 10, "g/dL")] {
        let receipt = post(batch(serde_json::json!([
            {"parameter": parameter, "value": value, "unit": unit, "time": rfc3339(taken)}
        ])))
        .await;
        tracking.push(receipt.tracking_id());
        settled(&gateway, &pki).await;
    }
    assert_eq!(v2.results().len(), 6);
    let second = pki
        .client("admin")
        .get(&gateway.admin_url(&format!("/admin/v1/deliveries/{}", tracking[1])))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let to_v2 = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "v2-ehr")
        .unwrap()
        .clone();
    assert_eq!(to_v2["state"], "delivered", "{second}");
    assert_eq!(
        to_v2["attempts"], 1,
        "no retry for a connection closed while idle: {second}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v2_receiver_gets_charted_means_with_their_interval_corrections_and_waveforms() {
    let (pki, ehr, receiver, _dir, gateway) = start_with_receiver(
        "waveforms = true\ncharting = { interval = \"1m\", summary = \"mean\", settle = \"1s\" }\n",
    )
    .await;
    let v2 = &receiver.receiver;
    // A whole minute a few minutes ago: its interval is over, so due at once.
    let now = OffsetDateTime::now_utc();
    let minute = now.replace_nanosecond(0).unwrap()
        - time::Duration::minutes(5)
        - time::Duration::seconds(now.second().into());
    let at = |s: i64| {
        (minute + time::Duration::seconds(s))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let post = |readings: Value| {
        accepted(
            &pki,
            &gateway,
            serde_json::json!({
                "device": {"serial": "CH-V2-C", "model": "CARDIOHELP-i"},
                "patient": {"system": MRN_SYSTEM, "value": "MRN-V2-C"},
                "readings": readings
            }),
        )
    };
    post(serde_json::json!([
        {"parameter": "Flow", "value": 4.0, "unit": "L/min", "time": at(10)},
        {"parameter": "Flow", "value": 4.4, "unit": "L/min", "time": at(50)}
    ]))
    .await;
    settled(&gateway, &pki).await;
    // One message for the minute: the mean of its readings over the whole minute, final.
    let results = v2.results();
    assert_eq!(results.len(), 1, "{results:?}");
    let mean = &results[0];
    assert!(mean.code.contains("pump-blood-flow"), "{mean:?}");
    assert_eq!(
        (
            mean.value.as_str(),
            mean.unit.as_str(),
            mean.status.as_str()
        ),
        ("4.2", "L/min^L/min^UCUM", "F")
    );
    assert_eq!(
        mean.method,
        "AMEAS^auto-measurement^MDC~average^Average^99STAT"
    );
    let hl7_minute = |m: i64| {
        gateway::hl7v2::er7::dtm(
            (minute + time::Duration::minutes(m)).to_offset(time::UtcOffset::UTC),
        )
    };
    assert_eq!(
        (mean.observed_from.as_str(), mean.observed_until.as_str()),
        (hl7_minute(0).as_str(), hl7_minute(1).as_str())
    );
    assert_eq!(mean.time, hl7_minute(0));
    // The FHIR destination charts every reading as it is.
    assert_eq!(ehr.ehr.count("Observation"), 2);

    // A reading that comes after the minute was sent changes its mean: a correction (C).
    post(serde_json::json!([
        {"parameter": "Flow", "value": 5.0, "unit": "L/min", "time": at(30)}
    ]))
    .await;
    settled(&gateway, &pki).await;
    let results = v2.results();
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(
        (results[1].value.as_str(), results[1].status.as_str()),
        ("4.47", "C")
    );
    assert_eq!(results[1].observed_from, hl7_minute(0));

    // A waveform passes the charting by, as an NA value with its sample period.
    post(serde_json::json!([
        {"parameter": "PVen", "unit": "mmHg", "time": at(20),
         "samples": {"period": 8, "data": [-32, -31, null, -30]}}
    ]))
    .await;
    settled(&gateway, &pki).await;
    let results = v2.results();
    assert_eq!(results.len(), 3, "{results:?}");
    let waveform = &results[2];
    assert_eq!(waveform.value_type, "NA");
    assert_eq!(waveform.value, "-32^-31^^-30");
    assert_eq!(waveform.unit, "mm[Hg]^mm[Hg]^UCUM");
    assert_eq!(
        waveform.sample_period,
        Some(("8".to_owned(), gateway::delivery::oru::milliseconds_unit()))
    );
    assert_eq!(waveform.status, "F");
    // The FHIR destination takes no waveforms: it has not got this one.
    assert_eq!(ehr.ehr.count("Observation"), 3);

    // A waveform in over HL7 v2 (an NA value and its sample period after it, as the IHE PCD
    // Waveform Content Module writes it) goes out the same way.
    let mut sender = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let sent_at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let message = format!(
        "{}PID|||MRN-V2-C^^^HOSP^MR\r\
         OBX|1|NA|PVen^Drainage pressure^99CH|1.1.1.1|-40^^-41|266016^MDC_DIM_MMHG^MDC|||||F|||{}||||CH-V2-C^CARDIOHELP-i\r\
         OBX|2|NM|67980^MDC_ATTR_TIME_PD_SAMP^MDC|1.1.1.1.1|4|264338^MDC_DIM_MILLI_SEC^MDC|||||F\r",
        msh("W-1", sent_at),
        dtm(sent_at - time::Duration::minutes(2))
    );
    let ack = Ack::parse(&sender.send(&message).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}\n{}", gateway.log_text());
    settled(&gateway, &pki).await;
    let results = v2.results();
    assert_eq!(results.len(), 4, "{results:?}");
    let from_v2 = &results[3];
    assert_eq!(
        (from_v2.value_type.as_str(), from_v2.value.as_str()),
        ("NA", "-40^^-41")
    );
    assert_eq!(
        from_v2
            .sample_period
            .as_ref()
            .map(|(value, _)| value.as_str()),
        Some("4")
    );
    assert_eq!(from_v2.patient, results[0].patient);
    assert_eq!(ehr.ehr.count("Observation"), 3);
    assert_eq!(v2.duplicates(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn mllp_counts_against_the_same_vendor_share_as_https() {
    // Direct delivery, so a request stays in progress while the EHR takes its time.
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let config = conformance_tests::harness::gateway_config(
        &pki,
        &ehr.base_url,
        conformance_tests::harness::WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    )
    .replace(
        "max_body_bytes = 262144",
        "max_body_bytes = 262144\nmax_concurrent_requests_per_vendor = 1",
    ) + &hl7v2_section("");
    let gateway = GatewayProcess::start(&config).unwrap();
    ehr.ehr.fail_next(
        conformance_tests::ehr::Fault::delay(std::time::Duration::from_secs(3)),
        1,
    );
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let message = |id: &str, rpm: u32| {
        format!(
            "{}PID|||MRN-Q-1^^^HOSP^MR\rOBX|1|NM|RPM^^99CH|1.1.1.1|{rpm}|rpm^^L|||||F|||{}||||CH-Q-1^CARDIOHELP-i\r",
            msh(id, now),
            dtm(now - time::Duration::seconds(i64::from(rpm % 50)))
        )
    };
    let mut slow = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let first = message("Q-1", 3001);
    let held = tokio::spawn(async move { Ack::parse(&slow.send(&first).await.unwrap()) });
    // Polled, not slept: the first message is at the EHR (and so holds Getinge's one place).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ehr.ehr.max_concurrent_writes() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            gateway.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // A second message of the same vendor on another connection: refused for now (AR, resend).
    let mut eager = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let ack = Ack::parse(&eager.send(&message("Q-2", 3002)).await.unwrap());
    assert_eq!(ack.code, "AR", "{ack:?}");
    assert_eq!(ack.errors[0].1, "207");
    assert!(ack.errors[0].3.contains("share"), "{ack:?}");
    // Over HTTPS too: the same share.
    let answer = pki
        .client(GETINGE)
        .post_json(
            &gateway.url("/v1/observations"),
            &serde_json::json!({
                "device": {"serial": "CH-Q-2", "model": "CARDIOHELP-i"},
                "patient": {"system": MRN_SYSTEM, "value": "MRN-Q-1"},
                "readings": [{"parameter": "RPM", "value": 3003, "unit": "rpm",
                              "time": now.format(&time::format_description::well_known::Rfc3339).unwrap()}]
            }),
        )
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 503);
    // The first completes; afterwards the second goes through.
    assert_eq!(held.await.unwrap().code, "AA");
    let ack = Ack::parse(&eager.send(&message("Q-2", 3002)).await.unwrap());
    assert_eq!(ack.code, "AA", "{ack:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_revoked_mid_connection_is_refused_at_its_next_message() {
    let (pki, _ehr, _dir, gateway) = start("").await;
    let mut sender = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let message = |id: &str, seconds: i64| {
        format!(
            "{}PID|||MRN-R-1^^^HOSP^MR\rOBX|1|NM|RPM^^99CH|1.1.1.1|3100|rpm^^L|||||F|||{}||||CH-R-1^CARDIOHELP-i\r",
            msh(id, now),
            dtm(now - time::Duration::seconds(seconds))
        )
    };
    assert_eq!(
        Ack::parse(&sender.send(&message("R-1", 10)).await.unwrap()).code,
        "AA"
    );
    // The operators revoke the certificate this connection was opened with.
    let pem = std::fs::read_to_string(pki.path(&format!("{GETINGE}.pem"))).unwrap();
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    };
    let sha256 = gateway::revocations::hex(&gateway::revocations::fingerprint(der.as_ref()));
    pki.client("admin")
        .post_json(
            &gateway.admin_url(&format!("/admin/v1/revoked-certificates/{sha256}")),
            &serde_json::json!({}),
        )
        .await
        .unwrap()
        .expect_status(201);
    // The same open connection: the next message is refused, naming it, and the connection
    // is closed.
    let ack = Ack::parse(&sender.send(&message("R-2", 5)).await.unwrap());
    assert_eq!(
        (ack.code.as_str(), ack.control_id.as_str()),
        ("AR", "R-2"),
        "{ack:?}"
    );
    assert!(ack.errors[0].3.contains("revoked"), "{ack:?}");
    assert!(sender.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sender_asking_for_commit_acks_on_errors_only_gets_none_for_a_success() {
    let (pki, ehr, _dir, gateway) = start("").await;
    let mut sender = tls_sender(&gateway, &pki, GETINGE).await.unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    // MSH-15 ER (a commit ACK for errors only), MSH-16 NE (no application ACK).
    let message = |id: &str, unit: &str| {
        format!(
            "{}PID|||MRN-E-1^^^HOSP^MR\rOBX|1|NM|RPM^^99CH|1.1.1.1|3200|{unit}|||||F|||{}||||CH-E-1^CARDIOHELP-i\r",
            msh(id, now).replace("|NE|AL|", "|ER|NE|"),
            dtm(now - time::Duration::seconds(7))
        )
    };
    sender
        .write_raw(
            &[
                &b"\x0b"[..],
                message("E-1", "rpm^^L").as_bytes(),
                b"\x1c\x0d",
            ]
            .concat(),
        )
        .await
        .unwrap();
    // The next answer on the connection is the one for the bad second message: the first,
    // a success, got none.
    let ack = Ack::parse(&sender.send(&message("E-2", "furlongs^^L")).await.unwrap());
    assert_eq!(
        (ack.code.as_str(), ack.control_id.as_str()),
        ("CE", "E-2"),
        "{ack:?}"
    );
    settled(&gateway, &pki).await;
    assert_eq!(ehr.ehr.count("Observation"), 1);
}
