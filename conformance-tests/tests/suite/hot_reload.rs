//! Certificates and vendors rotate while the gateway runs: a new vendor CA is trusted and the
//! server certificate replaced when the files change, with devices posting all the while and
//! not one request failing; a file that does not load keeps the running configuration and
//! the admin API says why.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::harness::{GatewayProcess, admin_until, durable_gateway};
use gateway::certs::{LeafSpec, TestCa, Usage, write_private};
use time::OffsetDateTime;

/// Replaces `path` the way deployment tools do: a new file renamed over the old one.
fn replace_file(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// Whether a TLS handshake with the gateway succeeds when only `ca` is trusted.
async fn handshake_trusting(gateway: &GatewayProcess, ca: &Path, client: (&Path, &Path)) -> bool {
    let client = MtlsClient::new(ca, Some(client)).unwrap();
    client.get(&gateway.url("/metadata")).await.is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vendor_ca_and_the_server_certificate_rotate_under_load_without_a_failed_request() {
    let (pki, _ehr, _dir, gateway) = durable_gateway("").await;
    let p = |f: &str| pki.path(f);
    // A second CA: it issues a Getinge certificate and, later, the gateway's new one.
    let ca2 = TestCa::new("Second ECMO CA").unwrap();
    std::fs::write(p("ca2.pem"), &ca2.cert_pem).unwrap();
    std::fs::write(
        p("ca-bundle.pem"),
        format!(
            "{}{}",
            std::fs::read_to_string(p("ca.pem")).unwrap(),
            ca2.cert_pem
        ),
    )
    .unwrap();
    let getinge2 = ca2.issue(&LeafSpec::new("getinge", Usage::Client)).unwrap();
    std::fs::write(p("getinge2.pem"), &getinge2.cert_pem).unwrap();
    write_private(&p("getinge2.key"), &getinge2.key_pem).unwrap();
    let trusting_both = |stem: &str| {
        MtlsClient::new(
            &p("ca-bundle.pem"),
            Some((&p(&format!("{stem}.pem")), &p(&format!("{stem}.key")))),
        )
        .unwrap()
    };
    let admin = trusting_both("admin");
    let url = gateway.url("/v1/observations");
    // Not trusted yet: its handshake is refused.
    assert!(
        trusting_both("getinge2")
            .post_json(
                &url,
                &SimulatedCardiohelp::new("CH-R0", 1).next_batch(OffsetDateTime::now_utc())
            )
            .await
            .is_err()
    );

    // Devices post all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for device in 0..4 {
        let (stop, accepted, url) = (stop.clone(), accepted.clone(), url.clone());
        let vendor = trusting_both("vendor-getinge");
        load.push(tokio::spawn(async move {
            let mut console = SimulatedCardiohelp::new(&format!("CH-R{device}"), 50 + device);
            let mut t = OffsetDateTime::now_utc() - time::Duration::minutes(30);
            while !stop.load(Ordering::SeqCst) {
                t += time::Duration::seconds(1);
                let answer = vendor.post_json(&url, &console.next_batch(t)).await;
                match answer {
                    Ok(answer) if answer.status == 202 => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    other => return Err(format!("{other:?}")),
                }
            }
            Ok(())
        }));
    }

    // 1. The operator adds the second CA to the vendor CAs: picked up from the file change.
    let config = std::fs::read_to_string(gateway.config_path()).unwrap();
    let ca = p("ca.pem").display().to_string();
    let edited = config.replacen(
        &format!("vendor_ca = [\"{ca}\"]"),
        &format!("vendor_ca = [\"{ca}\", \"{}\"]", p("ca2.pem").display()),
        1,
    );
    assert_ne!(edited, config);
    replace_file(gateway.config_path(), &edited);
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["reloads"] == 1).await;
    trusting_both("getinge2")
        .post_json(
            &url,
            &SimulatedCardiohelp::new("CH-R9", 2).next_batch(OffsetDateTime::now_utc()),
        )
        .await
        .unwrap()
        .expect_status(202);

    // 2. The server certificate is replaced by one from the second CA: new connections get it.
    assert!(
        !handshake_trusting(
            &gateway,
            &p("ca2.pem"),
            (&p("getinge2.pem"), &p("getinge2.key"))
        )
        .await
    );
    let server2 = ca2.issue(&LeafSpec::localhost_server()).unwrap();
    // The key first: a certificate without its key would not load (and is not swapped in).
    replace_file(&p("server.key"), &server2.key_pem);
    replace_file(&p("server.pem"), &server2.cert_pem);
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| {
        s["lastError"].is_null() && s["reloads"].as_u64() >= Some(2)
    })
    .await;
    assert!(
        handshake_trusting(
            &gateway,
            &p("ca2.pem"),
            (&p("getinge2.pem"), &p("getinge2.key"))
        )
        .await
    );

    // 3. A broken file: the running configuration stays and the admin API says why.
    replace_file(&p("server.key"), "not a key");
    let status = admin_until(&gateway, &admin, "/admin/v1/reload", |s| {
        s["failures"].as_u64() >= Some(1)
    })
    .await;
    assert!(
        status["lastError"].as_str().unwrap().contains("server.key"),
        "{status}"
    );
    assert!(
        handshake_trusting(
            &gateway,
            &p("ca2.pem"),
            (&p("getinge2.pem"), &p("getinge2.key"))
        )
        .await
    );
    let metrics = String::from_utf8(
        admin
            .get(&gateway.admin_url("/metrics"))
            .await
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains(r#"ecmo_config_reloads_total{outcome="failed"}"#),
        "{metrics}"
    );
    // SIGHUP works too: the key restored, reloaded on the signal.
    std::fs::write(p("server.key"), &server2.key_pem).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status();
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| {
        s["lastError"].is_null()
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await
            .unwrap()
            .expect("no request failed during the rotations");
    }
    assert!(accepted.load(Ordering::SeqCst) >= 4, "the load ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn mapping_tables_reload_when_a_file_changes_and_a_broken_one_is_kept_out() {
    let tables = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mappings/tables");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tables.path().join(path.file_name().unwrap())).unwrap();
    }
    let pki = conformance_tests::harness::TestPki::generate().unwrap();
    let ehr = conformance_tests::harness::mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let config = conformance_tests::harness::durable_config(
        &pki,
        &ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    ) + &format!("\n[mappings]\ndir = \"{}\"\n", tables.path().display());
    let gateway = GatewayProcess::start(&config).unwrap();
    let vendor = pki.client(conformance_tests::harness::GETINGE);
    let admin = pki.client(conformance_tests::harness::ADMIN);
    let url = gateway.url("/v1/observations");
    let t0 = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    let flow = |value: f64, second: i64| {
        serde_json::json!({
            "device": {"serial": "CH-T1", "model": "CARDIOHELP-i"},
            "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-T1"},
            "readings": [{"parameter": "Flow", "value": value, "unit": "L/min",
                "time": (t0 + time::Duration::seconds(second)).format(&time::format_description::well_known::Rfc3339).unwrap()}]
        })
    };
    vendor
        .post_json(&url, &flow(7.5, 0))
        .await
        .unwrap()
        .expect_status(202);

    // The integration team narrows Flow's plausible range: 7.5 L/min is now refused.
    let family = tables.path().join("getinge-cardiohelp.toml");
    let text = std::fs::read_to_string(&family).unwrap();
    let narrowed = text.replacen("range = [-2.0, 10.0]", "range = [-2.0, 7.0]", 1);
    assert_ne!(narrowed, text);
    replace_file(&family, &narrowed);
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["reloads"] == 1).await;
    let refused = vendor.post_json(&url, &flow(7.5, 1)).await.unwrap();
    assert_eq!(refused.status, 422, "{:?}", refused.json());
    assert_eq!(refused.issue_pointers(), ["/readings/0/value"]);

    // A table that does not load keeps the running ones and says why.
    replace_file(&family, "[[parameter]]\nvendor = ");
    let status = admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["failures"] == 1).await;
    assert!(
        status["lastError"]
            .as_str()
            .unwrap()
            .contains("mapping tables"),
        "{status}"
    );
    vendor
        .post_json(&url, &flow(6.5, 2))
        .await
        .unwrap()
        .expect_status(202);
    assert_eq!(
        vendor.post_json(&url, &flow(7.5, 3)).await.unwrap().status,
        422
    );
}

/// Observation identifiers the EHR holds, each as often as it holds it.
fn observation_ids(ehr: &conformance_tests::ehr::ReferenceEhr) -> Vec<String> {
    ehr.all_resources("Observation")
        .iter()
        .map(|o| o["identifier"][0]["value"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn destinations_are_added_moved_and_removed_by_a_reload_without_loss_or_duplicates() {
    use conformance_tests::ehr::Fault;
    use std::collections::HashSet;
    use std::time::Duration;

    let pki = conformance_tests::harness::TestPki::generate().unwrap();
    let (old_ehr, new_ehr, registry) = (
        conformance_tests::harness::mtls_ehr(&pki).await,
        conformance_tests::harness::mtls_ehr(&pki).await,
        conformance_tests::harness::mtls_ehr(&pki).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let config = conformance_tests::harness::durable_config(
        &pki,
        &old_ehr.base_url,
        &dir.path().join("outbox.sqlite"),
    );
    let gateway = GatewayProcess::start(&config).unwrap();
    let vendor = pki.client(conformance_tests::harness::GETINGE);
    let admin = pki.client(conformance_tests::harness::ADMIN);
    let url = gateway.url("/v1/observations");
    let mut console = SimulatedCardiohelp::new("CH-R1", 7);
    let t0 = OffsetDateTime::now_utc() - time::Duration::minutes(30);
    let mut post = async |minute: i64| {
        let batch = console.next_batch(t0 + time::Duration::minutes(minute));
        vendor
            .post_json(&url, &batch)
            .await
            .unwrap()
            .expect_status(202);
    };
    let settled = |queues: &serde_json::Value| {
        queues["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["pending"] == 0 && d["dead"] == 0)
    };
    post(0).await;
    admin_until(&gateway, &admin, "/admin/v1/queues", settled).await;
    assert_eq!(old_ehr.ehr.count("Observation"), 12);

    // The EHR moves: its old address answers slowly while a batch is on its way there, and
    // a registry is added beside it.
    old_ehr
        .ehr
        .fail_fraction(Fault::delay(Duration::from_millis(800)), 1.0);
    post(1).await;
    let block = &config[config.find("[[destination]]").unwrap()..];
    let moved = config.replace(&old_ehr.base_url, &new_ehr.base_url)
        + "\n"
        + &block
            .replace("name = \"ehr\"", "name = \"registry\"")
            .replace(&old_ehr.base_url, &registry.base_url);
    replace_file(gateway.config_path(), &moved);
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["reloads"] == 1).await;
    let destinations = admin_until(&gateway, &admin, "/admin/v1/destinations", |d| {
        d["destinations"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        destinations["destinations"][0]["baseUrl"],
        new_ehr.base_url.as_str()
    );
    assert_eq!(destinations["destinations"][1]["name"], "registry");
    post(2).await;
    admin_until(&gateway, &admin, "/admin/v1/queues", settled).await;

    // Every reading reached the EHR once, at one address or the other; the registry has
    // what came after it was added.
    let mut at_ehr = observation_ids(&old_ehr.ehr);
    at_ehr.extend(observation_ids(&new_ehr.ehr));
    let distinct: HashSet<&String> = at_ehr.iter().collect();
    assert_eq!(at_ehr.len(), 36, "{at_ehr:?}");
    assert_eq!(distinct.len(), 36, "no reading twice");
    assert!(new_ehr.ehr.count("Observation") >= 12);
    assert_eq!(registry.ehr.count("Observation"), 12);

    // The registry is removed again: it gets nothing more.
    replace_file(
        gateway.config_path(),
        &config.replace(&old_ehr.base_url, &new_ehr.base_url),
    );
    admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["reloads"] == 2).await;
    post(3).await;
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| {
        q["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["destination"] != "ehr" || (d["pending"] == 0 && d["dead"] == 0))
    })
    .await;
    assert_eq!(
        observation_ids(&old_ehr.ehr).len() + observation_ids(&new_ehr.ehr).len(),
        48
    );
    assert_eq!(registry.ehr.count("Observation"), 12);
    let destinations = admin
        .get(&gateway.admin_url("/admin/v1/destinations"))
        .await
        .unwrap()
        .expect_status(200)
        .json();
    assert_eq!(destinations["destinations"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_direct_delivery_a_reload_that_changes_destinations_is_refused_and_says_why() {
    let pki = conformance_tests::harness::TestPki::generate().unwrap();
    let (ehr, elsewhere) = (
        conformance_tests::harness::mtls_ehr(&pki).await,
        conformance_tests::harness::mtls_ehr(&pki).await,
    );
    let config = conformance_tests::harness::gateway_config(
        &pki,
        &ehr.base_url,
        conformance_tests::harness::WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    );
    assert!(config.contains("mode = \"direct\""));
    let gateway = GatewayProcess::start(&config).unwrap();
    let admin = pki.client(conformance_tests::harness::ADMIN);
    replace_file(
        gateway.config_path(),
        &config.replace(&ehr.base_url, &elsewhere.base_url),
    );
    let status = admin_until(&gateway, &admin, "/admin/v1/reload", |s| s["failures"] == 1).await;
    assert!(
        status["lastError"]
            .as_str()
            .unwrap()
            .contains("with direct delivery, destinations change only with a restart"),
        "{status}"
    );
    let answer = admin
        .post_json(
            &gateway.admin_url("/admin/v1/reload"),
            &serde_json::json!({}),
        )
        .await
        .unwrap()
        .expect_status(422);
    assert!(
        answer.json()["lastError"]
            .as_str()
            .unwrap()
            .contains("restart")
    );

    // The running destination stays: readings still go where they went.
    let batch = SimulatedCardiohelp::new("CH-D1", 3).next_batch(OffsetDateTime::now_utc());
    pki.client(conformance_tests::harness::GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(200);
    assert_eq!(ehr.ehr.count("Observation"), 12);
    assert_eq!(elsewhere.ehr.count("Observation"), 0);
}
