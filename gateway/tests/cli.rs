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

/// The systemd unit in `packaging/`: systemd's own hardening assessment rates it OK (at most
/// 2.0 of 10), and the command it runs before start is one the binary takes, on the
/// documented configuration.
#[test]
fn the_systemd_unit_is_hardened_and_its_commands_are_the_binarys() {
    let packaging = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    let unit_file = packaging.join("ecmo-gateway.service");
    let assessment = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit_file)
        .output()
        .expect("systemd-analyze (Debian's systemd package; .ci/run installs it)");
    let text = String::from_utf8_lossy(&assessment.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for ecmo-gateway.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");

    // ExecStartPre, with this build for the binary and the documented example for the
    // configuration (its certificates made by `certs init`).
    let unit = std::fs::read_to_string(&unit_file).unwrap();
    let command = |key: &str| -> Vec<String> {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    assert!(
        Command::new(BIN)
            .args(["certs", "init"])
            .arg(&pki)
            .status()
            .unwrap()
            .success()
    );
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.example.toml"),
    )
    .unwrap()
    .replace("\"../certs/dev/", &format!("\"{}/", pki.display()))
    .replace("\"../data/", &format!("\"{}/", dir.path().display()));
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, example).unwrap();
    let pre = command("ExecStartPre=");
    assert_eq!(pre[0], "/usr/local/bin/gateway");
    let args: Vec<String> = pre[1..]
        .iter()
        .map(|a| {
            if a == "/etc/ecmo-gateway/gateway.toml" {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let checked = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        checked.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    // ExecStart and ExecReload: the subcommand and the reload signal the gateway handles.
    assert_eq!(command("ExecStart=")[1..3], ["serve", "--config"]);
    assert_eq!(command("ExecReload=")[1], "-HUP");
}
