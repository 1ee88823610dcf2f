//! `conformance-tests`: runs the scenario suite against a gateway (and reads the results back
//! from its EHR), writing a JUnit XML report and a Markdown summary. Exit status: 0 all
//! passed, 1 a step failed, 2 the suite could not run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use conformance_tests::client::MtlsClient;
use conformance_tests::harness::EhrReader;
use conformance_tests::suite::report::{Totals, junit_xml, markdown_summary};
use conformance_tests::suite::runner::{Runner, Target, identities_from_dir};
use conformance_tests::suite::{ScenarioSource, default_dir};

#[derive(Parser)]
#[command(
    about = "Run the ECMO gateway conformance scenarios against a gateway and its EHR",
    long_about = "Sends every scenario's requests to the gateway over mutual TLS, checks the status and OperationOutcome of each answer, then reads the resulting resources back from the EHR by identifier and checks them against the expectations, FHIR R4 and the ECMO profiles."
)]
struct Args {
    /// The gateway's vendor listener, e.g. https://gateway.example:8443
    #[arg(long)]
    gateway: String,
    /// The EHR's FHIR base URL; without it, what the EHR holds is not checked.
    #[arg(long)]
    ehr: Option<String>,
    /// A directory as `gateway certs init` writes it: ca.pem plus vendor-getinge.pem/.key,
    /// vendor-spectrum.pem/.key, vendor-integration.pem/.key (and vendor-expired, vendor-foreign, vendor-unconfigured
    /// for the certificate scenarios), gateway-client.pem/.key to read the EHR.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// CA certificate (PEM) of the gateway's server certificate [default: <pki>/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A client identity for the scenarios, NAME=CERT.pem,KEY.pem (repeatable; overrides --pki).
    #[arg(long = "identity", value_name = "NAME=CERT,KEY")]
    identities: Vec<String>,
    /// CA certificate (PEM) of the EHR's server certificate [default: <pki>/ca.pem, else the
    /// system's CA bundle].
    #[arg(long)]
    ehr_ca: Option<PathBuf>,
    /// A file holding a bearer token for reading the EHR (e.g. from a SMART Backend Services
    /// token request); a file, so the token stays out of shell history and process lists.
    #[arg(long)]
    ehr_token_file: Option<PathBuf>,
    /// Read the EHR with a token of its own, got the SMART Backend Services way: the client id
    /// the EHR registered for the suite (with read scopes).
    #[arg(long, requires = "ehr_smart_key")]
    ehr_smart_client_id: Option<String>,
    /// The suite's signing key (PKCS#8 PEM, EC P-384 or RSA) registered with that client id.
    #[arg(long)]
    ehr_smart_key: Option<PathBuf>,
    /// Scopes to ask for (SMART v1 or v2 syntax).
    #[arg(
        long,
        value_delimiter = ' ',
        default_value = "system/Observation.rs system/Procedure.rs system/Device.rs system/DeviceMetric.rs system/Provenance.rs"
    )]
    ehr_smart_scopes: Vec<String>,
    /// The token endpoint [default: read from the EHR's .well-known/smart-configuration].
    #[arg(long)]
    ehr_smart_token_url: Option<String>,
    /// Client certificate for reading the EHR [default: <pki>/gateway-client.pem].
    #[arg(long)]
    ehr_cert: Option<PathBuf>,
    /// Its key [default: <pki>/gateway-client.key].
    #[arg(long)]
    ehr_key: Option<PathBuf>,
    /// Seconds to wait for a resource to reach the EHR.
    #[arg(long, default_value_t = 30)]
    ehr_wait: u64,
    /// The scenario files [default: the suite's own].
    #[arg(long)]
    scenarios: Option<PathBuf>,
    /// Run only scenarios whose name contains this (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// A scenario variable, NAME=VALUE (repeatable), e.g. spectrumSerial=M4-7001.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Where to write the JUnit XML report.
    #[arg(long, default_value = "conformance-report.xml")]
    junit: PathBuf,
    /// Where to write the Markdown summary.
    #[arg(long, default_value = "conformance-summary.md")]
    summary: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("conformance-tests: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, gateway::BoxError> {
    gateway::install_crypto_provider();
    let from_pki = |file: &str| args.pki.as_ref().map(|d| d.join(file));
    let ca = args
        .ca
        .clone()
        .or_else(|| from_pki("ca.pem"))
        .ok_or("--ca or --pki is needed to trust the gateway")?;
    let mut identities = match &args.pki {
        Some(dir) => identities_from_dir(dir, &ca)?,
        None => identities_from_dir(std::path::Path::new("/nonexistent"), &ca)?,
    };
    for spec in &args.identities {
        let (name, files) = spec
            .split_once('=')
            .ok_or_else(|| format!("--identity {spec}: expected NAME=CERT,KEY"))?;
        let (cert, key) = files
            .split_once(',')
            .ok_or_else(|| format!("--identity {spec}: expected NAME=CERT,KEY"))?;
        identities.insert(
            name.to_owned(),
            MtlsClient::new(&ca, Some((cert.as_ref(), key.as_ref())))?,
        );
    }
    let ehr = match &args.ehr {
        None => None,
        Some(url) => {
            let system_bundle = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
            let ehr_ca = args
                .ehr_ca
                .clone()
                .or_else(|| from_pki("ca.pem"))
                .or_else(|| system_bundle.exists().then_some(system_bundle))
                .ok_or("--ehr-ca or --pki is needed to trust the EHR")?;
            let cert = args
                .ehr_cert
                .clone()
                .or_else(|| from_pki("gateway-client.pem"));
            let key = args
                .ehr_key
                .clone()
                .or_else(|| from_pki("gateway-client.key"));
            let mut client = match (&cert, &key) {
                (Some(cert), Some(key)) => MtlsClient::new(&ehr_ca, Some((cert, key)))?,
                _ => MtlsClient::new(&ehr_ca, None)?,
            };
            if let (Some(client_id), Some(signing_key)) =
                (&args.ehr_smart_client_id, &args.ehr_smart_key)
            {
                let settings = gateway::config::SmartSettings {
                    client_id: client_id.clone(),
                    token_url: args.ehr_smart_token_url.clone(),
                    scopes: args.ehr_smart_scopes.clone(),
                    keys: vec![signing_key.clone()],
                    renew_before: Duration::from_secs(60),
                };
                let identity = cert.as_deref().zip(key.as_deref());
                let http = gateway::delivery::client::https_client_with(
                    std::slice::from_ref(&ehr_ca),
                    identity,
                    1,
                )?;
                let tokens = gateway::delivery::smart::TokenSource::new(
                    "conformance suite",
                    url,
                    &settings,
                    http,
                    Duration::from_secs(30),
                )?;
                let token = tokens.token().await?;
                client = client.with_authorization(token.authorization().clone());
            }
            if let Some(file) = &args.ehr_token_file {
                let token = std::fs::read_to_string(file)
                    .map_err(|e| format!("--ehr-token-file {}: {e}", file.display()))?;
                client = client.with_bearer_token(&token)?;
            }
            Some(EhrReader {
                client,
                base_url: url.trim_end_matches('/').to_owned(),
            })
        }
    };
    let mut variables = BTreeMap::new();
    for spec in &args.vars {
        let (k, v) = spec
            .split_once('=')
            .ok_or_else(|| format!("--var {spec}: expected NAME=VALUE"))?;
        variables.insert(k.to_owned(), v.to_owned());
    }
    let dir = args.scenarios.clone().unwrap_or_else(default_dir);
    let sources: Vec<ScenarioSource> = ScenarioSource::load_dir(&dir)?
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| s.name.contains(o)))
        .collect();
    if sources.is_empty() {
        return Err(format!("no scenarios to run in {}", dir.display()).into());
    }
    let mut runner = Runner::new(Target {
        gateway_url: args.gateway.clone(),
        identities,
        ehr,
        ehr_wait: Duration::from_secs(args.ehr_wait),
        variables,
    })?;
    let results = runner.run_all(&sources).await;
    std::fs::write(&args.junit, junit_xml(&results)?)?;
    let summary = markdown_summary(
        &results,
        &args.gateway,
        args.ehr.as_deref(),
        runner.resources_checked,
    );
    std::fs::write(&args.summary, &summary)?;
    print!("{summary}");
    let totals = Totals::of(&results);
    Ok(totals.failed == 0)
}
