//! Nothing invalid ever leaves: a mapping change that makes the gateway build a resource
//! breaking its own profile is caught before anything is queued, the request is answered with
//! the rule and the path, the EHR receives nothing, and the failure is counted.

use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, Scenario, WriteStyle, gateway_config, now_rfc3339,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_that_breaks_a_profile_never_reaches_the_ehr() {
    let s = Scenario::start(WriteStyle::TRANSACTION_CONDITIONAL)
        .await
        .unwrap();
    // A site's table maps Flow to a code of our CodeSystem that is not a circuit parameter: the
    // table loads (the code exists), but the Observation breaks the profile's required binding.
    let tables = tempfile::tempdir().unwrap();
    std::fs::write(
        tables.path().join("units.toml"),
        include_str!("../../../mappings/tables/units.toml"),
    )
    .unwrap();
    std::fs::write(
        tables.path().join("broken.toml"),
        "[family]\nid = \"getinge-cardiohelp\"\nmanufacturer = \"Getinge\"\ndisplay = \"Getinge CARDIOHELP\"\nmodels = [\"CARDIOHELP-i\"]\n\n[[parameter]]\nvendor = \"Flow\"\ncode = \"in-alarm\"\nunit = \"L/min\"\ndecimals = 2\nrange = [0.0, 10.0]\n",
    )
    .unwrap();
    let config = gateway_config(
        &s.pki,
        &s.ehr.base_url,
        WriteStyle::TRANSACTION_CONDITIONAL,
        "gateway-client",
    ) + &format!("\n[mappings]\ndir = \"{}\"\n", tables.path().display());
    let gateway = GatewayProcess::start(&config).unwrap();
    let batch = json!({
        "device": {"serial": "CH-1", "model": "CARDIOHELP-i"},
        "patient": {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-P"},
        "readings": [{"parameter": "Flow", "value": 4.2, "unit": "L/min", "time": now_rfc3339()}]
    });
    let answer = s
        .pki
        .client(GETINGE)
        .post_json(&gateway.url("/v1/observations"), &batch)
        .await
        .unwrap()
        .expect_status(500);
    let outcome = answer.json();
    let issue = outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["code"] == "invariant")
        .expect("a rule issue");
    assert_eq!(issue["expression"][0], "Observation.code");
    assert!(
        issue["details"]["text"]
            .as_str()
            .unwrap()
            .contains("required binding"),
        "{issue}"
    );
    assert_eq!(s.ehr.ehr.count("Observation"), 0, "nothing invalid leaves");
    let counted = s
        .pki
        .client(ADMIN)
        .get(&gateway.admin_url("/admin/v1/validation"))
        .await
        .unwrap()
        .expect_status(200);
    assert_eq!(counted.json()["failures"], 1);
    assert!(
        gateway.wait_for_log("breaks a profile rule"),
        "{}",
        gateway.log_text()
    );
}
