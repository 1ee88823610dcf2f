//! What the end-to-end suite needs around the systems under test: a test PKI with good and bad
//! certificates, the gateway binary started as its own process on 127.0.0.1, and queries of
//! what the EHR stored.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::BoxError;
use gateway::certs::{LeafSpec, TestCa, Usage, write_private};
use serde_json::Value;
use time::OffsetDateTime;

use crate::client::MtlsClient;

/// Certificates for every role and every way a certificate can be wrong.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

/// Client certificates of [`TestPki`], by what they should make the gateway do.
pub const GETINGE: &str = "vendor-getinge";
pub const SPECTRUM: &str = "vendor-spectrum";
/// A hospital's device integration system: the models of every family without an interface of
/// its own (CentriMag, LifeSPARC, Terumo CDI, Quantum Ventilation Module, Hemochron, BCS XP,
/// Alaris).
pub const INTEGRATION: &str = "vendor-integration";
/// Chained to the trusted CA, but no vendor in the config has its identity.
pub const UNCONFIGURED: &str = "vendor-unconfigured";
/// Chained to the trusted CA, expired yesterday.
pub const EXPIRED: &str = "vendor-expired";
/// Issued by a CA the gateway does not trust, with a configured vendor's name.
pub const FOREIGN: &str = "vendor-foreign";
/// A Getinge certificate from the test CA that the CA's revocation list (`ca.crl.pem`) names.
pub const REVOKED: &str = "vendor-revoked";
/// The operators' admin certificate.
pub const ADMIN: &str = "admin";
/// A gateway client certificate from the foreign CA (an EHR will refuse it).
pub const FOREIGN_GATEWAY: &str = "gateway-foreign";

impl TestPki {
    pub fn generate() -> Result<Self, BoxError> {
        gateway::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("ECMO conformance CA")?;
        let foreign = TestCa::new("Somebody else's CA")?;
        let write = |stem: &str, cert: &str, key: &str| -> Result<(), BoxError> {
            std::fs::write(dir.path().join(format!("{stem}.pem")), cert)?;
            write_private(&dir.path().join(format!("{stem}.key")), key)?;
            Ok(())
        };
        write("ca", &ca.cert_pem, &ca.key_pem)?;
        write("foreign-ca", &foreign.cert_pem, &foreign.key_pem)?;
        let server = ca.issue(&LeafSpec::localhost_server())?;
        write("server", &server.cert_pem, &server.key_pem)?;
        for (stem, cn, issuer) in [
            ("gateway-client", "ecmo-gateway", &ca),
            (ADMIN, gateway::certs::ADMIN_IDENTITY, &ca),
            (GETINGE, "getinge", &ca),
            (SPECTRUM, "spectrum-medical", &ca),
            (INTEGRATION, "device-integration", &ca),
            (UNCONFIGURED, "nobody-we-know", &ca),
            (FOREIGN, "getinge", &foreign),
            (FOREIGN_GATEWAY, "ecmo-gateway", &foreign),
        ] {
            let cert = issuer.issue(&LeafSpec::new(cn, Usage::Client))?;
            write(stem, &cert.cert_pem, &cert.key_pem)?;
        }
        let mut expired = LeafSpec::new("getinge", Usage::Client);
        expired.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
        expired.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        let expired = ca.issue(&expired)?;
        write(EXPIRED, &expired.cert_pem, &expired.key_pem)?;
        // A Getinge certificate its CA has revoked, on `ca.crl.pem`.
        let revoked = ca.issue(&LeafSpec::new("getinge", Usage::Client))?;
        write(REVOKED, &revoked.cert_pem, &revoked.key_pem)?;
        std::fs::write(dir.path().join("ca.crl.pem"), ca.crl(&[&revoked.serial])?)?;
        write_private(
            &dir.path().join(gateway::certs::SMART_KEY),
            &gateway::certs::smart_signing_key()?,
        )?;
        Ok(Self { dir })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A client presenting `stem`.pem/.key and trusting the test CA.
    pub fn client(&self, stem: &str) -> MtlsClient {
        MtlsClient::new(
            &self.path("ca.pem"),
            Some((
                &self.path(&format!("{stem}.pem")),
                &self.path(&format!("{stem}.key")),
            )),
        )
        .expect("test certificates load")
    }

    /// The reference EHR's server TLS: it trusts `client_ca` for client certificates.
    pub fn ehr_tls(&self, client_ca: &str) -> Arc<rustls::ServerConfig> {
        gateway::tls::server_config(
            &self.path("server.pem"),
            &self.path("server.key"),
            &[self.path(client_ca)],
            &[],
        )
        .expect("test certificates load")
    }

    /// The reference EHR's server TLS for bearer-token clients (see
    /// [`crate::ehr::tls_certificate_optional`]).
    pub fn ehr_tls_certificate_optional(&self, client_ca: &str) -> Arc<rustls::ServerConfig> {
        crate::ehr::tls_certificate_optional(
            &self.path("server.pem"),
            &self.path("server.key"),
            &self.path(client_ca),
        )
        .expect("test certificates load")
    }

    /// Writes a SMART signing key (PKCS#8 PEM, EC P-384) as `stem`.key and returns its path.
    pub fn smart_key(&self, stem: &str) -> PathBuf {
        let path = self.path(&format!("{stem}.key"));
        write_private(&path, &gateway::certs::smart_signing_key().expect("key"))
            .expect("key written");
        path
    }
}

/// How the gateway under test writes to its destination.
#[derive(Debug, Clone, Copy)]
pub struct WriteStyle {
    pub write: &'static str,
    pub bundle: &'static str,
}

impl WriteStyle {
    pub const TRANSACTION_CONDITIONAL: Self = Self {
        write: "conditional-create",
        bundle: "transaction",
    };
    pub const SINGLE_PUT: Self = Self {
        write: "put",
        bundle: "single",
    };
    pub const SINGLE_CONDITIONAL: Self = Self {
        write: "conditional-create",
        bundle: "single",
    };
    pub const TRANSACTION_PUT: Self = Self {
        write: "put",
        bundle: "transaction",
    };
}

impl AsRef<Path> for TestPki {
    fn as_ref(&self) -> &Path {
        self.dir.path()
    }
}

/// A gateway configuration for the PKI in `certs` (as `TestPki` or `gateway certs init`
/// write it): vendors `getinge` (CARDIOHELP models), `spectrum` (serial M4-7001) and
/// `integration` (the models of the families without an interface of their own), one
/// destination at `ehr_url`.
pub fn gateway_config(
    certs: impl AsRef<Path>,
    ehr_url: &str,
    style: WriteStyle,
    client_stem: &str,
) -> String {
    let p = |f: &str| certs.as_ref().join(f).display().to_string();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
cert = "{server}"
key = "{server_key}"
vendor_ca = ["{ca}"]
request_timeout = "20s"
max_body_bytes = 262144

# The tests play whole ECMO runs, days long, in minutes: their readings are a backfill.
[readings]
max_past_age = "30d"

[delivery]
mode = "direct"

[runs]
store = "{runs}"

[admin]
listen = "127.0.0.1:0"
cert = "{server}"
key = "{server_key}"
client_ca = ["{ca}"]
identities = ["ops-admin"]

[[vendor]]
name = "getinge"
identity = "getinge"
models = ["CARDIOHELP", "CARDIOHELP-i"]

[[vendor]]
name = "spectrum"
identity = "spectrum-medical"
serials = ["M4-7001"]

[[vendor]]
name = "integration"
identity = "device-integration"
models = ["CentriMag", "LifeSPARC", "LS-1000", "CDI 500", "CDI 550", "Quantum Ventilation Module", "QVM2", "Hemochron Signature Elite", "BCS XP", "Alaris PC Unit", "Alaris 8015"]

[[destination]]
name = "ehr"
base_url = "{ehr_url}"
ca = ["{ca}"]
client_cert = "{client}"
client_key = "{client_key}"
write = "{write}"
bundle = "{bundle}"
timeout = "3s"
max_attempts = 3
"#,
        server = p("server.pem"),
        server_key = p("server.key"),
        runs = p("runs.sqlite"),
        ca = p("ca.pem"),
        client = p(&format!("{client_stem}.pem")),
        client_key = p(&format!("{client_stem}.key")),
        write = style.write,
        bundle = style.bundle,
    )
}

/// `config` switched to the durable outbox in `outbox` (a file path), with fast retries so
/// that tests do not wait long.
pub fn with_outbox(config: &str, outbox: &Path) -> String {
    config
        .replace("mode = \"direct\"", &format!("mode = \"outbox\"\noutbox = \"{}\"", outbox.display()))
        .replace("max_attempts = 3\n", "max_attempts = 1\nlinger = \"5ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\nretry_backoff_max = \"2s\"\n")
}

/// The gateway of [`gateway_config`] writing transactions with conditional creates through the
/// durable outbox in `outbox`, as most tests and tools run it.
pub fn durable_config(certs: impl AsRef<Path>, ehr_url: &str, outbox: &Path) -> String {
    with_outbox(
        &gateway_config(
            certs,
            ehr_url,
            WriteStyle::TRANSACTION_CONDITIONAL,
            "gateway-client",
        ),
        outbox,
    )
}

/// Polls `path` on the gateway's admin API (as `admin`) until `ready` holds for its JSON;
/// fails the test after 30 s, showing the last answer and the gateway's log.
pub async fn admin_until(
    gateway: &GatewayProcess,
    admin: &MtlsClient,
    path: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = admin
            .get(&gateway.admin_url(path))
            .await
            .expect("admin API answers")
            .expect_status(200)
            .json();
        if ready(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {body}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the admin API until no message is pending anywhere; returns the queue stats.
pub async fn wait_until_settled(
    admin: &crate::client::MtlsClient,
    gateway: &GatewayProcess,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let queues = admin
            .get(&gateway.admin_url("/admin/v1/queues"))
            .await
            .unwrap()
            .expect_status(200)
            .json();
        let pending: u64 = queues["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["pending"].as_u64().unwrap())
            .sum();
        if pending == 0 {
            return queues;
        }
        assert!(
            Instant::now() < deadline,
            "still pending after {limit:?}: {queues}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every identifier in `accepted` is held by the EHR as exactly one Observation, and no
/// Observation's identifier is held twice: once the gateway said 2xx, exactly once.
pub fn assert_each_held_once<'a>(
    ehr: &crate::ehr::ReferenceEhr,
    accepted: impl IntoIterator<Item = &'a String>,
) {
    let counts = ehr.identifier_counts("Observation");
    for identifier in accepted {
        assert_eq!(
            counts.get(identifier),
            Some(&1),
            "{identifier} must be at the EHR exactly once"
        );
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "no reading is ever duplicated"
    );
}

/// A reference EHR over mutual TLS that trusts the test CA's client certificates.
pub async fn mtls_ehr(pki: &TestPki) -> crate::ehr::RunningEhr {
    crate::ehr::ReferenceEhr::new()
        .start(
            pki.ehr_tls("ca.pem"),
            "127.0.0.1:0".parse().expect("address"),
        )
        .await
        .expect("the reference EHR starts")
}

/// A test PKI, a reference EHR and the gateway on an outbox in a temporary directory, with
/// `settings` (TOML lines) added to its destination.
pub async fn durable_gateway(
    settings: &str,
) -> (
    TestPki,
    crate::ehr::RunningEhr,
    tempfile::TempDir,
    GatewayProcess,
) {
    let pki = TestPki::generate().expect("test PKI");
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = durable_config(&pki, &ehr.base_url, &dir.path().join("outbox.sqlite")).replace(
        "max_attempts = 1\n",
        &format!("max_attempts = 1\n{settings}"),
    );
    assert!(config.contains(settings));
    let gateway = GatewayProcess::start(&config).expect("the gateway starts");
    (pki, ehr, dir, gateway)
}

/// The scopes the gateway asks a SMART EHR for: every type it writes.
pub const SMART_WRITE_SCOPES: [&str; 5] = [
    "system/Observation.cu",
    "system/Procedure.cu",
    "system/Device.cu",
    "system/DeviceMetric.cu",
    "system/Provenance.c",
];

/// `config` with its destination authenticated by SMART Backend Services as `client_id` with
/// `keys` (the first signs): `certificate` keeps the client certificate as well (both
/// together), `token_url` names the endpoint (else it is discovered).
pub fn with_smart(
    config: &str,
    client_id: &str,
    keys: &[&Path],
    certificate: bool,
    token_url: Option<&str>,
) -> String {
    let mut config: String = config
        .lines()
        .filter(|l| {
            certificate || !(l.starts_with("client_cert =") || l.starts_with("client_key ="))
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let quoted = |items: &mut dyn Iterator<Item = String>| {
        items
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    config.push_str(&format!(
        "\n[destination.smart]\nclient_id = \"{client_id}\"\nscopes = [{}]\nkeys = [{}]\n{}",
        quoted(&mut SMART_WRITE_SCOPES.iter().map(|s| (*s).to_owned())),
        quoted(&mut keys.iter().map(|k| k.display().to_string())),
        token_url
            .map(|u| format!("token_url = \"{u}\"\n"))
            .unwrap_or_default(),
    ));
    config
}

/// The `gateway` binary: `GATEWAY_BIN` if set, else the workspace's own, built (or found up to
/// date) by cargo once per test process, so a stale binary in a reused target directory is
/// never what gets tested.
pub fn gateway_binary() -> Result<PathBuf, BoxError> {
    if let Some(bin) = std::env::var_os("GATEWAY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut dir = exe.parent().ok_or("no parent")?.to_owned();
            if dir.ends_with("deps") {
                dir.pop();
            }
            let bin = dir.join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "gateway", "--bin", "gateway"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            if let Some(target) = dir.parent() {
                build.env("CARGO_TARGET_DIR", target);
            }
            let status = build
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !status.success() || !bin.exists() {
                return Err(format!(
                    "could not build the gateway binary at {}",
                    bin.display()
                ));
            }
            Ok(bin)
        })
        .clone()
        .map_err(Into::into)
}

/// The gateway running as its own process; killed when dropped.
pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener, when the config has one.
    pub admin: Option<SocketAddr>,
    /// The probes' plain HTTP listener, when the config has one.
    pub probes: Option<SocketAddr>,
    /// The HL7 v2 MLLP listener, when the config has one.
    pub mllp: Option<SocketAddr>,
    pub base_url: String,
    /// Everything the gateway logged, for assertions and for debugging a failed test.
    pub log: Arc<Mutex<Vec<String>>>,
    _config: tempfile::NamedTempFile,
}

impl GatewayProcess {
    pub fn start(config: &str) -> Result<Self, BoxError> {
        Self::start_with_env(config, &[])
    }

    /// [`Self::start`] with extra environment variables (`GATEWAY_LOG_FORMAT=json`, ...).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Self, BoxError> {
        Self::spawn(config, env, None)
    }

    /// [`Self::start`], but once the gateway listens its log (stderr) is no longer read until
    /// `resume` receives or is dropped: the pipe fills, as behind a stalled log shipper.
    pub fn start_with_log_held(
        config: &str,
        resume: std::sync::mpsc::Receiver<()>,
    ) -> Result<Self, BoxError> {
        Self::spawn(config, &[], Some(resume))
    }

    fn spawn(
        config: &str,
        env: &[(&str, &str)],
        hold_log: Option<std::sync::mpsc::Receiver<()>>,
    ) -> Result<Self, BoxError> {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile()?;
        std::io::Write::write_all(&mut file, config.as_bytes())?;
        let mut child = Command::new(gateway_binary()?)
            .args(["serve", "--config"])
            .arg(file.path())
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (admin_tx, admin_rx) = std::sync::mpsc::channel();
        let (probes_tx, probes_rx) = std::sync::mpsc::channel();
        let (mllp_tx, mllp_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let listening = listen_address(&line);
                if let Some(addr) = listening {
                    let _ = tx.send(addr);
                }
                if let Some(addr) = admin_address(&line) {
                    let _ = admin_tx.send(addr);
                }
                if let Some(addr) = logged_address(&line, "probes listening", "probes") {
                    let _ = probes_tx.send(addr);
                }
                if let Some(addr) = logged_address(&line, "HL7 v2 listening", "mllp") {
                    let _ = mllp_tx.send(addr);
                }
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                if let (Some(_), Some(resume)) = (listening, &hold_log) {
                    let _ = resume.recv();
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = rx.recv_timeout(Duration::from_millis(50)) {
                // The admin, probe and MLLP listeners log before the main one.
                let admin = admin_rx.try_recv().ok();
                let probes = probes_rx.try_recv().ok();
                let mllp = mllp_rx.try_recv().ok();
                return Ok(Self {
                    child,
                    addr,
                    admin,
                    probes,
                    mllp,
                    base_url: format!("https://{addr}"),
                    log,
                    _config: file,
                });
            }
            if let Some(status) = child.try_wait()? {
                let log = log.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                return Err(
                    format!("gateway exited with {status} before listening:\n{log}").into(),
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("gateway did not start listening within 30 s".into());
            }
        }
    }

    /// The configuration file the gateway runs from (an operator may edit it).
    pub fn config_path(&self) -> &Path {
        self._config.path()
    }

    /// SIGTERM, as an orchestrator stops a process: the gateway drains and exits.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no drain, no goodbye, as in a power cut.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `https://127.0.0.1:<admin port>` + `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "https://{}{path}",
            self.admin.expect("the config has an [admin] section")
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the gateway process so far, in KiB (Linux `VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// The log without its timestamps, for checks that no value of a reading is logged: a
    /// time such as `10:42:04.351Z` would otherwise contain a value such as `4.35`.
    pub fn log_text_untimed(&self) -> String {
        without_timestamps(&self.log_text())
    }

    /// Waits up to 30 s for `count` log lines containing `needle`; answers how many it saw.
    pub fn wait_for_log_lines(&self, needle: &str, count: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|line| line.contains(needle))
                .count();
            if seen >= count || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 5 s for a log line containing `needle`: the log is read by another thread,
    /// so a line written just before an answer may not have been read yet.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `... admin=127.0.0.1:41235 ...` in the admin start-up log line.
fn admin_address(line: &str) -> Option<SocketAddr> {
    logged_address(line, "admin API listening", "admin")
}

/// `... listen=127.0.0.1:41234 ...` in the start-up log line.
fn listen_address(line: &str) -> Option<SocketAddr> {
    logged_address(line, "gateway listening", "listen")
}

/// The address in field `field` of the log line saying `message`, as text (`field=addr`) or
/// as a JSON line (`"field":"addr"`).
fn logged_address(line: &str, message: &str, field: &str) -> Option<SocketAddr> {
    if !line.contains(message) {
        return None;
    }
    if line.starts_with('{') {
        let event: Value = serde_json::from_str(line).ok()?;
        return event[field].as_str()?.parse().ok();
    }
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(field)?.strip_prefix('='))
        .and_then(|addr| addr.parse().ok())
}

/// Reads what an EHR holds, over its FHIR API (works against any FHIR server).
pub struct EhrReader {
    pub client: MtlsClient,
    pub base_url: String,
}

impl EhrReader {
    /// Every resource of a type.
    pub async fn all(&self, resource_type: &str) -> Result<Vec<Value>, BoxError> {
        let answer = self
            .client
            .get(&format!("{}/{resource_type}?_count=100000", self.base_url))
            .await?;
        if !answer.status.is_success() {
            return Err(format!("search {resource_type}: HTTP {}", answer.status).into());
        }
        Ok(entries(&answer.json()))
    }

    /// Resources of a type with a business identifier `system|value`.
    pub async fn by_identifier(
        &self,
        resource_type: &str,
        system: &str,
        value: &str,
    ) -> Result<Vec<Value>, BoxError> {
        let token = format!("{system}|{value}");
        let encoded =
            percent_encoding::utf8_percent_encode(&token, percent_encoding::NON_ALPHANUMERIC);
        let answer = self
            .client
            .get(&format!(
                "{}/{resource_type}?identifier={encoded}",
                self.base_url
            ))
            .await?;
        if !answer.status.is_success() {
            return Err(format!(
                "search {resource_type} by identifier: HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )
            .into());
        }
        Ok(entries(&answer.json()))
    }

    /// Every version of a resource, newest first (`GET [type]/[id]/_history`).
    pub async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<Value>, BoxError> {
        let answer = self
            .client
            .get(&format!("{}/{resource_type}/{id}/_history", self.base_url))
            .await?;
        if !answer.status.is_success() {
            return Err(format!(
                "history of {resource_type}/{id}: HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            )
            .into());
        }
        Ok(entries(&answer.json()))
    }
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"].clone())
        .collect()
}

/// Where the PKI keeps a file, for configs written by hand in tests.
pub fn display(path: &Path) -> String {
    path.display().to_string()
}

/// A whole set-up: test PKI, a reference EHR on 127.0.0.1 and the gateway binary pointed at it.
pub struct Scenario {
    pub pki: TestPki,
    pub ehr: crate::ehr::RunningEhr,
    pub gateway: GatewayProcess,
    pub reader: EhrReader,
}

impl Scenario {
    pub async fn start(style: WriteStyle) -> Result<Self, BoxError> {
        let pki = TestPki::generate()?;
        let ehr = crate::ehr::ReferenceEhr::new()
            .start(pki.ehr_tls("ca.pem"), "127.0.0.1:0".parse()?)
            .await?;
        let gateway = GatewayProcess::start(&gateway_config(
            &pki,
            &ehr.base_url,
            style,
            "gateway-client",
        ))?;
        let reader = EhrReader {
            client: pki.client("gateway-client"),
            base_url: ehr.base_url.clone(),
        };
        Ok(Self {
            pki,
            ehr,
            gateway,
            reader,
        })
    }

    pub fn observations_url(&self) -> String {
        self.gateway.url("/v1/observations")
    }

    /// What the EHR holds, as `(identifier value, Observation)`.
    pub async fn stored_observations(&self) -> Result<Vec<(String, Value)>, BoxError> {
        Ok(self
            .reader
            .all("Observation")
            .await?
            .into_iter()
            .map(|o| {
                (
                    o["identifier"][0]["value"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    o,
                )
            })
            .collect())
    }
}

/// How many resources describe one device of `model` (its modules and their channels, and a
/// DeviceMetric per parameter code of its family's table): what the device's first readings
/// batch adds to the outbox, ahead of its Observations.
pub fn description_of(model: &str) -> u64 {
    let tables = mappings::Mappings::embedded().expect("the embedded tables");
    let family = tables.family_for_model(model).expect("a mapped model");
    mappings::device_description(family, "any")
        .expect("description")
        .len() as u64
}

/// Now, in RFC 3339 with milliseconds, as a console would stamp it.
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `text` with every RFC 3339 date-time (`2026-12-07T10:42:04.351234Z`, or with an offset) cut.
pub fn without_timestamps(text: &str) -> String {
    fn timestamp_len(b: &[u8]) -> Option<usize> {
        const SHAPE: &[u8] = b"dddd-dd-ddTdd:dd:dd";
        if b.len() < SHAPE.len()
            || !SHAPE.iter().zip(b).all(|(s, c)| {
                if *s == b'd' {
                    c.is_ascii_digit()
                } else {
                    s == c
                }
            })
        {
            return None;
        }
        let mut end = SHAPE.len();
        if b.get(end) == Some(&b'.') {
            end += 1;
            while b.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
        }
        match b.get(end) {
            Some(b'Z') => Some(end + 1),
            Some(b'+' | b'-') if b.len() >= end + 6 => Some(end + 6),
            _ => Some(end),
        }
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut kept = 0;
    let mut i = 0;
    while i < bytes.len() {
        match timestamp_len(&bytes[i..]) {
            Some(len) => {
                out.push_str(&text[kept..i]);
                i += len;
                kept = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&text[kept..]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_cut_and_nothing_else() {
        assert_eq!(
            super::without_timestamps(
                "2026-12-07T10:42:04.351234Z  INFO flow 4.35 at 2026-12-07T10:42:04+01:00."
            ),
            "  INFO flow 4.35 at ."
        );
        assert!(!super::without_timestamps("2026-12-07T10:42:04.351Z x").contains("4.35"));
    }
}
