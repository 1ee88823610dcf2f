//! `gateway`: serve, make a test PKI, check a configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ECMO device data in over mutual TLS, FHIR R4 out to hospital EHRs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The TOML configuration (see gateway/gateway.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration, its certificates and mapping tables, then exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Test certificates (never for production: use the hospital's PKI).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a test CA, a localhost server certificate, the gateway's client certificate and
    /// vendor client certificates into DIR.
    Init { dir: PathBuf },
}

/// sysexits' EX_CONFIG: the configuration is wrong, restarting will not help.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    gateway::install_crypto_provider();

    match cli.command {
        Command::Certs {
            command: CertsCommand::Init { dir },
        } => match gateway::certs::init_dir(&dir) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { config } => match gateway::app::Gateway::from_config_file(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Serve { config } => {
            let gateway = match gateway::app::Gateway::from_config_file(&config) {
                Ok(gateway) => gateway,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("error: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(gateway.serve(gateway::app::shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
