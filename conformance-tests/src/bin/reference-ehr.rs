//! The reference EHR as a standalone server, to point a gateway at by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use conformance_tests::ehr::ReferenceEhr;

/// A FHIR R4 server with an in-memory store, over mutual TLS.
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
    let tls = gateway::tls::server_config(&args.cert, &args.key, &[args.client_ca], &[])?;
    let running = ReferenceEhr::new().start(tls, args.listen).await?;
    println!("reference EHR at {}", running.base_url);
    gateway::app::shutdown_signal().await;
    Ok(())
}
