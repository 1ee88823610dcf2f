//! The `gateway` command line, run as a process.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

/// `gateway check-config` accepts `config`.
fn assert_config_ok(config: &std::path::Path) {
    let ok = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn certs_init_then_check_config_with_a_broken_file_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["certs", "init"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "gateway-client.key",
        "vendor-getinge.pem",
    ] {
        assert!(dir.path().join(file).exists(), "{file}");
    }

    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        r#"
[server]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server.key"
vendor_ca = ["ca.pem"]

[[vendor]]
name = "getinge"
identity = "getinge"
models = ["CARDIOHELP-i"]

[[destination]]
name = "ehr"
base_url = "https://127.0.0.1:9443/fhir"
ca = ["ca.pem"]
client_cert = "gateway-client.pem"
client_key = "gateway-client.key"
"#,
    )
    .unwrap();
    assert_config_ok(&config);
    // A destination's rate limit (a layer that starts a task when made) is checked too.
    let limited = dir.path().join("limited.toml");
    std::fs::write(
        &limited,
        std::fs::read_to_string(&config).unwrap() + "rate_limit = 50\n",
    )
    .unwrap();
    assert_config_ok(&limited);

    // A mapping directory with a broken table stops start-up, naming file, entry and reason.
    let tables = dir.path().join("tables");
    std::fs::create_dir(&tables).unwrap();
    std::fs::write(
        tables.join("units.toml"),
        "[[unit]]\nucum = \"L/min\"\ndisplay = \"L/min\"\naccept = [{ unit = \"L/min\" }]\n",
    )
    .unwrap();
    std::fs::write(
        tables.join("broken.toml"),
        "[family]\nid = \"x\"\nmanufacturer = \"X\"\ndisplay = \"X\"\nmodels = [\"X1\"]\n\n[[parameter]]\nvendor = \"Flow\"\ncode = \"pump-blood-flow\"\nunit = \"L/min\"\ndecimals = 2\nrange = [5.0, 1.0]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&config).unwrap() + "\n[mappings]\ndir = \"tables\"\n";
    std::fs::write(&config, text).unwrap();
    let bad = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("broken.toml")
            && stderr.contains("parameter 'Flow'")
            && stderr.contains("low < high"),
        "{stderr}"
    );
}
