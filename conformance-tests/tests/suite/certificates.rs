//! Who may talk to the gateway: the TLS handshake refuses missing, expired and foreign-CA
//! certificates; a trusted certificate that names no vendor, or a vendor posting for a device
//! it does not own, gets 403 with an OperationOutcome. Nothing reaches the EHR in any case.

use conformance_tests::client::MtlsClient;
use conformance_tests::harness::{
    EXPIRED, FOREIGN, GETINGE, SPECTRUM, Scenario, UNCONFIGURED, WriteStyle, now_rfc3339,
};
use serde_json::{Value, json};

fn batch(serial: &str, model: &str) -> Value {
    json!({
        "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"}, "device": {"serial": serial, "model": model},
        "readings": [{"parameter": "Flow", "value": 4.1, "unit": "L/min", "time": now_rfc3339()}]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_refuses_missing_expired_and_foreign_certificates() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let body = batch("CH-1", "CARDIOHELP-i");

    let anonymous = MtlsClient::new(&s.pki.path("ca.pem"), None).unwrap();
    for (label, client) in [
        ("no certificate", anonymous),
        ("expired certificate", s.pki.client(EXPIRED)),
        ("certificate from an unknown CA", s.pki.client(FOREIGN)),
    ] {
        let result = client.post_json(&s.observations_url(), &body).await;
        assert!(
            result.is_err(),
            "{label}: expected the handshake to fail, got {:?}",
            result.map(|a| a.status)
        );
    }
    // The gateway says why, without naming any patient.
    assert!(
        s.gateway.wait_for_log("TLS handshake refused"),
        "{}",
        s.gateway.log_text()
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0);

    // The same request with a good certificate goes through, so the refusals above were the
    // certificates' doing.
    let ok = s
        .pki
        .client(GETINGE)
        .post_json(&s.observations_url(), &body)
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_certificate_of_no_vendor_is_forbidden() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    let answer = s
        .pki
        .client(UNCONFIGURED)
        .post_json(&s.observations_url(), &batch("CH-1", "CARDIOHELP-i"))
        .await
        .unwrap();
    assert_eq!(answer.status, 403);
    let outcome = answer.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "security");
    assert!(
        outcome["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("nobody-we-know")
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn vendor_may_only_post_for_its_own_devices() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    // Spectrum owns serial M4-7001 only; Getinge owns CARDIOHELP models.
    for (client, serial, model) in [
        (SPECTRUM, "M4-9999", "M4"),
        (SPECTRUM, "CH-1", "CARDIOHELP-i"),
        (GETINGE, "M4-7001", "M4"),
    ] {
        let answer = s
            .pki
            .client(client)
            .post_json(&s.observations_url(), &batch(serial, model))
            .await
            .unwrap();
        assert_eq!(answer.status, 403, "{client} posting for {serial}");
        assert_eq!(answer.json()["issue"][0]["code"], "forbidden");
        assert_eq!(answer.issue_pointers(), ["/device/serial"]);
    }
    assert_eq!(s.ehr.ehr.count("Observation"), 0);
}

/// Trust bound per vendor: with two CAs trusted, a certificate with Getinge's name from the
/// other CA is not Getinge (403); a certificate on the CA's revocation list fails the
/// handshake; an operator revokes Getinge's own certificate through the admin API and its next
/// request is refused, on the connection it already has, without a restart; taking the
/// revocation back lets it in again. The admin API lists the configured certificates' expiry.
#[tokio::test(flavor = "multi_thread")]
async fn trust_is_bound_per_vendor_and_a_certificate_is_revoked_without_a_restart() {
    use conformance_tests::ehr::ReferenceEhr;
    use conformance_tests::harness::{ADMIN, GatewayProcess, REVOKED, TestPki, durable_config};

    let pki = TestPki::generate().unwrap();
    let ehr = ReferenceEhr::new()
        .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| pki.path(f).display().to_string();
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite"))
        .replace(
            &format!("vendor_ca = [\"{}\"]", p("ca.pem")),
            &format!(
                "vendor_ca = [\"{}\", \"{}\"]\nvendor_crl = [\"{}\"]\nrevocations = \"{}\"",
                p("ca.pem"),
                p("foreign-ca.pem"),
                p("ca.crl.pem"),
                dir.path().join("revoked.json").display()
            ),
        )
        .replace(
            "identity = \"getinge\"\n",
            &format!("identity = \"getinge\"\nca = [\"{}\"]\n", p("ca.pem")),
        );
    assert!(config.contains("vendor_crl"), "{config}");
    let gateway = GatewayProcess::start(&config).unwrap();
    let url = gateway.url("/v1/observations");
    let body = batch("CH-1", "CARDIOHELP-i");

    // Getinge's name, the other trusted CA: not Getinge.
    let foreign = pki
        .client(FOREIGN)
        .post_json(&url, &body)
        .await
        .unwrap()
        .expect_status(403)
        .json();
    let words = foreign["issue"][0]["details"]["text"].as_str().unwrap();
    assert!(words.contains("not issued by that vendor's CA"), "{words}");
    // On the CA's revocation list: no handshake.
    assert!(
        pki.client(REVOKED).post_json(&url, &body).await.is_err(),
        "a certificate on the CRL got through"
    );

    let getinge = pki.client(GETINGE);
    getinge
        .post_json(&url, &body)
        .await
        .unwrap()
        .expect_status(202);
    let pem = std::fs::read_to_string(pki.path(&format!("{GETINGE}.pem"))).unwrap();
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    };
    let sha256: String = sha256_hex(der.as_ref());
    let admin = pki.client(ADMIN);
    admin
        .post_json(
            &gateway.admin_url(&format!(
                "/admin/v1/revoked-certificates/{sha256}?reason=console%20stolen"
            )),
            &json!({}),
        )
        .await
        .unwrap()
        .expect_status(201);
    let refused = getinge
        .post_json(&url, &body)
        .await
        .unwrap()
        .expect_status(403)
        .json();
    assert!(
        refused["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{refused}"
    );
    let listed = admin
        .get(&gateway.admin_url("/admin/v1/revoked-certificates"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    assert_eq!(listed["revoked"][0]["sha256"], sha256.as_str());
    assert_eq!(listed["revoked"][0]["reason"], "console stolen");
    assert_eq!(listed["revoked"][0]["revokedBy"], "ops-admin");

    admin
        .delete(&gateway.admin_url(&format!("/admin/v1/revoked-certificates/{sha256}")))
        .await
        .unwrap()
        .expect_status(200);
    getinge
        .post_json(&url, &body)
        .await
        .unwrap()
        .expect_status(202);

    let certificates = admin
        .get(&gateway.admin_url("/admin/v1/certificates"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    let listed = certificates["certificates"].as_array().unwrap();
    assert!(
        listed.iter().any(|c| c["role"] == "server"
            && c["expiring"] == false
            && c["daysLeft"].as_i64() > Some(80)),
        "{certificates}"
    );
    assert!(listed.iter().any(|c| c["role"] == "vendor CA"));
}

fn sha256_hex(der: &[u8]) -> String {
    gateway::revocations::hex(&gateway::revocations::fingerprint(der))
}
