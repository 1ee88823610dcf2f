//! The reference EHR as a standalone server, to point a gateway at by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use conformance_tests::ehr::ReferenceEhr;
use conformance_tests::ehr::smart::RegisteredClient;

/// The gateway's allocator: the store's many small values free faster than under glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A FHIR R4 server with an in-memory store, over mutual TLS, optionally guarded by SMART
/// Backend Services tokens.
#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Server certificate chain and key (PEM).
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// CA that client certificates (the gateway's) must chain to.
    #[arg(long)]
    client_ca: PathBuf,
    /// Register this SMART Backend Services client: every FHIR request then needs a bearer
    /// token from `/auth/token`, and clients without a certificate are let in.
    #[arg(long, requires = "smart_jwks")]
    smart_client_id: Option<String>,
    /// The client's JWKS (as `gateway jwks` writes it).
    #[arg(long)]
    smart_jwks: Option<PathBuf>,
    /// Scopes the client may be granted.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "system/Observation.cu,system/Procedure.cu,system/Device.cu,system/DeviceMetric.cu,system/Provenance.c"
    )]
    smart_scopes: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<(), gateway::BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    gateway::install_crypto_provider();
    let args = Args::parse();
    let tls = match &args.smart_client_id {
        None => gateway::tls::server_config(&args.cert, &args.key, &[args.client_ca], &[])?,
        Some(_) => conformance_tests::ehr::tls_certificate_optional(
            &args.cert,
            &args.key,
            &args.client_ca,
        )?,
    };
    let running = ReferenceEhr::new().start(tls, args.listen).await?;
    if let (Some(client_id), Some(jwks)) = (args.smart_client_id, args.smart_jwks) {
        let jwks = serde_json::from_slice(&std::fs::read(&jwks)?)?;
        running.ehr.register_smart_client(RegisteredClient {
            client_id,
            jwks,
            scopes: args.smart_scopes,
        });
        println!(
            "SMART token endpoint at {}",
            running.ehr.smart(|s| s.token_url.clone())
        );
    }
    println!("reference EHR at {}", running.base_url);
    gateway::app::shutdown_signal().await;
    Ok(())
}
