//! The web console in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver`, which `.ci/run` installs when missing) driven over WebDriver, against the
//! gateway's admin listener after a real flow (a run, readings, a destination that refuses some
//! of them). The test signs in, reads what each page shows, replays the dead letters from the
//! page and checks at the reference EHR that they arrived. Screenshots are kept as artifacts in
//! `<target>/test-artifacts/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conformance_tests::client::MtlsClient;
use conformance_tests::console::SimulatedCardiohelp;
use conformance_tests::harness::{
    ADMIN, GETINGE, GatewayProcess, TestPki, admin_until, durable_config, mtls_ehr,
};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const MRN: &str = "urn:oid:1.2.36.146.595.217.0.1";
const USER: &str = "ana";
const PASSWORD: &str = "a console password of some length";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromedriver on a free port, stopped with the test.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the console test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); `bash .ci/run` installs them, or: apt-get install chromium chromium-driver"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        Self {
            child,
            port,
            _profile: tempfile::tempdir().expect("a browser profile directory"),
        }
    }

    /// A browser session, once chromedriver answers (polled, up to 30 s).
    async fn session(&self) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--no-first-run", "--window-size=1400,1000",
                    format!("--user-data-dir={}", self._profile.path().display()),
                ],
            },
        });
        let capabilities = capabilities.as_object().cloned().expect("an object");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(capabilities.clone());
            match builder
                .connect(&format!("http://127.0.0.1:{}", self.port))
                .await
            {
                Ok(client) => return client,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "no browser session from chromedriver: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Where test artifacts go: `<target>/test-artifacts`, beside the test binary's directory.
fn artifacts() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // <target>/<profile>/deps/suite-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("the artifacts directory");
    dir
}

async fn screenshot(browser: &Client, name: &str) -> PathBuf {
    let png = browser.screenshot().await.expect("a screenshot");
    let path = artifacts().join(name);
    std::fs::write(&path, png).expect("the screenshot is written");
    eprintln!("screenshot: {}", path.display());
    path
}

/// The text of the first element matching `css`, or "" (as the page shows it now).
async fn text_of(browser: &Client, css: &str) -> String {
    browser
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            vec![json!(css)],
        )
        .await
        .expect("the page runs a script")
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Polls the page until the element at `css` shows `wanted`; fails with what it shows.
async fn until_shows(browser: &Client, css: &str, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = text_of(browser, css).await;
        if text.contains(wanted) {
            return text;
        }
        if Instant::now() > deadline {
            screenshot(browser, "console-failure.png").await;
            panic!("{css} never showed '{wanted}'; it shows: {text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(browser: &Client, css: &str) -> usize {
    browser
        .find_all(Locator::Css(css))
        .await
        .map(|found| found.len())
        .unwrap_or(0)
}

async fn until_present(browser: &Client, css: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(browser, css).await == 0 {
        if Instant::now() > deadline {
            screenshot(browser, "console-failure.png").await;
            panic!("{css} never appeared");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn type_into(browser: &Client, css: &str, text: &str) {
    let field = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    field.clear().await.expect("the field clears");
    field.send_keys(text).await.expect("the field takes keys");
}

fn at(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("RFC 3339")
}

/// The gateway with an outbox and console user `ana`.
fn console_gateway(pki: &TestPki, ehr_url: &str, dir: &std::path::Path) -> GatewayProcess {
    let hash = gateway::admin::console::hash_password(PASSWORD).expect("a password hash");
    let config = durable_config(pki, ehr_url, &dir.join("outbox.sqlite")).replace(
        "identities = [\"ops-admin\"]\n",
        &format!(
            "identities = [\"ops-admin\"]\n\n[admin.console]\nusers = [{{ name = \"{USER}\", password_hash = \"{hash}\" }}]\n"
        ),
    );
    assert!(config.contains("[admin.console]"));
    GatewayProcess::start(&config).expect("the gateway starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_a_real_flow_and_replays_dead_letters_in_a_browser() {
    let pki = TestPki::generate().unwrap();
    let ehr = mtls_ehr(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = console_gateway(&pki, &ehr.base_url, dir.path());
    let vendor = pki.client(GETINGE);
    let admin = pki.client(ADMIN);
    let t0 = OffsetDateTime::now_utc() - time::Duration::hours(1);

    // A VV run on console CH-W1, and two batches of its readings.
    let started = json!({
        "eventId": "s", "type": "started", "time": at(t0),
        "patient": {"system": MRN, "value": "MRN-W1"},
        "birthDate": "1970-01-01", "mode": "vv", "supportType": "respiratory",
        "console": {"serial": "CH-W1", "model": "CARDIOHELP-i"}
    });
    let answer = vendor
        .post_json(&gateway.url("/v1/runs/RUN-W1/events"), &started)
        .await
        .unwrap();
    assert!(answer.status.is_success(), "{:?}", answer.json());
    let mut console = SimulatedCardiohelp::new("CH-W1", 31).without_patient();
    for minute in [5, 6] {
        vendor
            .post_json(
                &gateway.url("/v1/observations"),
                &console.next_batch(t0 + time::Duration::minutes(minute)),
            )
            .await
            .unwrap()
            .expect_status(202);
    }
    // The EHR refuses everything about console CH-W2: dead letters.
    ehr.ehr.reject_identifiers_containing("CH-W2");
    vendor
        .post_json(
            &gateway.url("/v1/observations"),
            &SimulatedCardiohelp::new("CH-W2", 32)
                .with_patient(MRN, "MRN-W2")
                .next_batch(t0 + time::Duration::minutes(7)),
        )
        .await
        .unwrap()
        .expect_status(202);
    let queues = admin_until(&gateway, &admin, "/admin/v1/queues", |q| {
        q["destinations"][0]["pending"] == 0 && q["destinations"][0]["dead"] != 0
    })
    .await;
    let dead = queues["destinations"][0]["dead"].as_u64().unwrap();

    // Without a certificate or a session, nothing but the console's page and sign-in.
    let anonymous = MtlsClient::new(&pki.path("ca.pem"), None).unwrap();
    anonymous
        .get(&gateway.admin_url("/admin/v1/queues"))
        .await
        .unwrap()
        .expect_status(403);
    anonymous
        .post_json(
            &gateway.admin_url("/console/session"),
            &json!({"user": USER, "password": "not the password"}),
        )
        .await
        .unwrap()
        .expect_status(401);
    let page = anonymous
        .get(&gateway.admin_url("/console"))
        .await
        .unwrap()
        .expect_status(200);
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );

    let driver = Driver::start();
    let browser = driver.session().await;
    browser
        .goto(&gateway.admin_url("/console"))
        .await
        .expect("the console loads");

    // A wrong password is told, and lets nobody in.
    until_present(&browser, "#login:not([hidden])").await;
    type_into(&browser, "#login-user", USER).await;
    type_into(&browser, "#login-password", "wrong password").await;
    click(&browser, "#login-submit").await;
    until_shows(&browser, "#notice", "unknown user or wrong password").await;
    type_into(&browser, "#login-password", PASSWORD).await;
    click(&browser, "#login-submit").await;
    until_shows(&browser, "#user", USER).await;

    // Overview: the destination, its dead letters, and throughput once two polls are in.
    let destinations = until_shows(&browser, "#destinations tbody", "ehr").await;
    assert!(destinations.contains("dead-letters"), "{destinations}");
    assert!(destinations.contains(&dead.to_string()), "{destinations}");
    until_present(&browser, "#throughput polyline[data-series='delivered']").await;
    let overview = screenshot(&browser, "console-overview.png").await;

    // Message browser: the readings of CH-W1, one with its FHIR and the EHR's answer.
    click(&browser, "nav a[data-view='messages']").await;
    type_into(&browser, "#search input[name='device']", "CH-W1").await;
    type_into(&browser, "#search input[name='parameter']", "pump-speed").await;
    click(&browser, "#search-submit").await;
    let listed = until_shows(&browser, "#message-list tbody", "RUN-W1").await;
    assert!(
        listed.contains("MRN-W1") && listed.contains("delivered"),
        "{listed}"
    );
    assert_eq!(
        count(&browser, "#message-list tbody tr").await,
        2,
        "one pump speed per batch: {listed}"
    );
    click(&browser, "#message-list tbody tr").await;
    let fhir = until_shows(
        &browser,
        "#detail-resource",
        "\"resourceType\": \"Observation\"",
    )
    .await;
    assert!(fhir.contains("pump-speed"), "{fhir}");
    let answer = text_of(&browser, "#detail-answer").await;
    assert!(answer.contains("201") || answer.contains("200"), "{answer}");
    screenshot(&browser, "console-message.png").await;

    // Dead letters: the EHR's reason shown; replayed from the page once the EHR takes them.
    click(&browser, "nav a[data-view='dead-letters']").await;
    let letters = until_shows(&browser, "#dead-list tbody", "CH-W2").await;
    assert!(letters.contains("does not accept"), "{letters}");
    assert_eq!(count(&browser, "#dead-list tbody tr").await as u64, dead);
    screenshot(&browser, "console-dead-letters.png").await;
    ehr.ehr.clear_rejections();
    // One from its own button, then the rest at once.
    click(&browser, "#dead-list tbody tr button").await;
    until_shows(&browser, "#notice", "Replayed 1 message(s).").await;
    click(&browser, "#replay-all").await;
    until_shows(
        &browser,
        "#notice",
        &format!("Replayed {} message(s).", dead - 1),
    )
    .await;
    admin_until(&gateway, &admin, "/admin/v1/queues", |q| {
        q["destinations"][0]["pending"] == 0 && q["destinations"][0]["dead"] == 0
    })
    .await;
    let delivered: Vec<Value> = ehr
        .ehr
        .all_resources("Observation")
        .into_iter()
        .filter(|o| o.to_string().contains("CH-W2"))
        .collect();
    assert!(
        !delivered.is_empty(),
        "the replayed readings reached the EHR"
    );

    // The run: its mode, events and chart.
    click(&browser, "nav a[data-view='runs']").await;
    until_shows(&browser, "#run-list tbody", "RUN-W1").await;
    click(&browser, "#run-list tbody tr").await;
    let facts = until_shows(&browser, "#run-facts", "in-progress").await;
    assert!(facts.contains("vv") && facts.contains("CH-W1"), "{facts}");
    until_shows(&browser, "#run-events", "mode-segment vv").await;
    until_present(
        &browser,
        "#run-charts polyline[data-series='pump-blood-flow']",
    )
    .await;
    until_present(&browser, "#run-charts polyline[data-series='pump-speed']").await;
    let run = screenshot(&browser, "console-run.png").await;

    // Signing out ends the session: the page's own requests are refused again.
    click(&browser, "#sign-out").await;
    until_present(&browser, "#login:not([hidden])").await;
    let status = browser
        .execute(
            "return fetch('/admin/v1/queues').then(r => r.status);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    browser.close().await.unwrap();
    for shot in [overview, run] {
        assert!(
            std::fs::metadata(&shot).unwrap().len() > 10_000,
            "{}",
            shot.display()
        );
    }
}
