//! Nothing invalid ever leaves: a mapping change that makes the gateway build an Observation
//! breaking its own profile keeps the gateway from starting (every shape a table builds is
//! checked at load), naming the table entry, the rule and the path.

use conformance_tests::harness::{
    GatewayProcess, Scenario, WriteStyle, gateway_binary, gateway_config,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_that_breaks_a_profile_keeps_the_gateway_from_starting() {
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
    // Every shape a table builds is checked when it is loaded, so such a table never serves.
    let refused = GatewayProcess::start(&config)
        .err()
        .expect("the gateway refuses to start")
        .to_string();
    for named in [
        "getinge-cardiohelp/Flow",
        "required binding",
        "Observation.code",
    ] {
        assert!(refused.contains(named), "{named}: {refused}");
    }
    // And the integration team finds out before a restart: check-config says the same.
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, config.as_bytes()).unwrap();
    let checked = std::process::Command::new(gateway_binary().unwrap())
        .args(["check-config", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(checked.status.code(), Some(78), "EX_CONFIG");
    let said = String::from_utf8_lossy(&checked.stderr);
    assert!(said.contains("getinge-cardiohelp/Flow"), "{said}");
    assert_eq!(s.ehr.ehr.count("Observation"), 0, "nothing invalid leaves");
}
