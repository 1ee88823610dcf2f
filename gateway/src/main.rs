//! `gateway`: serve, make a test PKI, check a configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc, whose frees, consolidations and arena locks were about a
/// tenth of the gateway's CPU in the profile of a batch load. With the workspace's `override`
/// feature, C code's malloc (SQLite, zstd, aws-lc) is mimalloc's too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ECMO device data in over mutual TLS, FHIR R4 out to hospital EHRs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text, or as JSON (one event per line, its fields and its request's
    /// span as keys), for a log shipper.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "GATEWAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The TOML configuration (see gateway/gateway.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration, its certificates and mapping tables, and what each destination
    /// says it can do (its CapabilityStatement, a SMART token), then exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not contact the destinations.
        #[arg(long)]
        offline: bool,
    },
    /// Deliveries and dead letters, through the admin API (mutual TLS, admin certificate).
    Deliveries {
        #[command(flatten)]
        admin: AdminConnection,
        #[command(subcommand)]
        command: DeliveriesCommand,
    },
    /// ECMO runs, through the admin API (mutual TLS, admin certificate).
    Runs {
        #[command(flatten)]
        admin: AdminConnection,
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Print the JWKS of the gateway's SMART signing keys (every key of every SMART
    /// destination), to register the gateway as a Backend Services client at an EHR.
    Jwks {
        #[arg(long, short)]
        config: PathBuf,
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hash a web console password for `[admin.console] users` (Argon2id, PHC form). The
    /// password is read from standard input (one line), never from the command line, which
    /// other users of the machine can see.
    HashPassword,
    /// Test certificates (never for production: use the hospital's PKI).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

/// Where the admin API listens and the certificates to reach it with.
#[derive(clap::Args)]
struct AdminConnection {
    /// The admin listener, e.g. https://127.0.0.1:9444
    #[arg(long)]
    admin_url: String,
    /// CA of the admin listener's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Admin client certificate and key.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

impl AdminConnection {
    /// Sends one request; prints the answer, and succeeds on a 2xx.
    fn call(&self, method: http::Method, path: &str) -> ExitCode {
        let runtime = match runtime() {
            Ok(runtime) => runtime,
            Err(code) => return code,
        };
        match runtime.block_on(gateway::admin::client::call(
            &self.admin_url,
            method,
            path,
            &self.ca,
            &self.cert,
            &self.key,
        )) {
            Ok((status, body)) => {
                println!("{}", body.trim_end());
                if (200..300).contains(&status) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Subcommand)]
enum RunsCommand {
    /// A finished run as the ELSO Registry asks for it (JSON, or CSV with --csv).
    Registry {
        run_id: String,
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a test CA, a localhost server certificate, the gateway's client certificate and
    /// vendor client certificates into DIR.
    Init { dir: PathBuf },
}

#[derive(Subcommand)]
enum DeliveriesCommand {
    /// Where every message of an accepted batch stands.
    Status { tracking_id: String },
    /// Queue depth and age, delivered and dead counts, per destination.
    Queues,
    /// Dead letters with the EHR's OperationOutcome.
    DeadLetters {
        #[arg(long)]
        destination: Option<String>,
    },
    /// One dead letter.
    Show { message_id: i64 },
    /// Send one dead letter again, with a fresh retry budget.
    Replay { message_id: i64 },
    /// Send all dead letters (of a destination) again.
    ReplayAll {
        #[arg(long)]
        destination: Option<String>,
    },
}

/// sysexits' EX_CONFIG: the configuration is wrong, restarting will not help.
const EX_CONFIG: u8 = 78;

/// The async runtime, or the exit code of a process that cannot start one.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|error| {
        eprintln!("error: cannot start the runtime: {error}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    gateway::allocator::return_freed_memory_promptly();
    let cli = Cli::parse();
    // Log lines go through a bounded queue (128,000 lines) to a thread that writes them to
    // stderr: a request's log line costs the worker a copy, not a write(2) that a slow reader
    // of the pipe can hold, and lines logged together leave in one write. Not lossy: when the
    // queue is full, loggers wait, as they would on stderr itself. The guard writes out what
    // is queued when `main` returns.
    let (log_writer, _log_flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(128_000)
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(log_writer);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    gateway::install_crypto_provider();

    match cli.command {
        Command::HashPassword => {
            let mut line = String::new();
            if let Err(error) = std::io::stdin().read_line(&mut line) {
                eprintln!("error: cannot read the password: {error}");
                return ExitCode::FAILURE;
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.chars().count() < 12 {
                eprintln!("error: a console password has at least 12 characters");
                return ExitCode::from(EX_CONFIG);
            }
            match gateway::admin::console::hash_password(password) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Deliveries { admin, command } => {
            use http::Method;
            let (method, path) = match command {
                DeliveriesCommand::Status { tracking_id } => {
                    (Method::GET, format!("/admin/v1/deliveries/{tracking_id}"))
                }
                DeliveriesCommand::Queues => (Method::GET, "/admin/v1/queues".to_owned()),
                DeliveriesCommand::DeadLetters { destination } => (
                    Method::GET,
                    format!(
                        "/admin/v1/dead-letters{}",
                        destination
                            .map(|d| format!("?destination={d}"))
                            .unwrap_or_default()
                    ),
                ),
                DeliveriesCommand::Show { message_id } => {
                    (Method::GET, format!("/admin/v1/dead-letters/{message_id}"))
                }
                DeliveriesCommand::Replay { message_id } => (
                    Method::POST,
                    format!("/admin/v1/dead-letters/{message_id}/replay"),
                ),
                DeliveriesCommand::ReplayAll { destination } => (
                    Method::POST,
                    format!(
                        "/admin/v1/dead-letters/replay{}",
                        destination
                            .map(|d| format!("?destination={d}"))
                            .unwrap_or_default()
                    ),
                ),
            };
            admin.call(method, &path)
        }
        Command::Runs { admin, command } => match command {
            RunsCommand::Registry { run_id, csv } => {
                // A path segment: everything but RFC 3986's unreserved characters escaped.
                const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
                    .remove(b'-')
                    .remove(b'.')
                    .remove(b'_')
                    .remove(b'~');
                let run: String = percent_encoding::utf8_percent_encode(&run_id, SEGMENT).collect();
                let format = if csv { "?format=csv" } else { "" };
                admin.call(
                    http::Method::GET,
                    &format!("/admin/v1/runs/{run}/registry{format}"),
                )
            }
        },
        Command::Jwks { config, out } => {
            let jwks = gateway::config::Config::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|c| gateway::delivery::smart::keys::jwks(&c).map_err(|e| e.to_string()))
                .and_then(|jwks| serde_json::to_string_pretty(&jwks).map_err(|e| e.to_string()));
            let written = jwks.and_then(|text| match &out {
                Some(path) => std::fs::write(path, text + "\n")
                    .map_err(|e| format!("{}: {e}", path.display())),
                None => {
                    println!("{text}");
                    Ok(())
                }
            });
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
        Command::CheckConfig { config, offline } => {
            // Built as `serve` builds it, in a runtime: some layers (a rate limit's buffer)
            // start a task when they are made.
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            let _context = runtime.enter();
            let gateway = match gateway::app::Gateway::from_config_file(&config) {
                Ok(gateway) => gateway,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            if offline {
                println!("{}: ok (destinations not contacted)", config.display());
                return ExitCode::SUCCESS;
            }
            let mut gaps = 0;
            for report in runtime.block_on(gateway.check_destinations()) {
                let name = &report.destination;
                for gap in &report.gaps {
                    println!("destination '{name}': cannot: {gap}");
                }
                gaps += report.gaps.len();
                match &report.unreachable {
                    Some(reason) => println!("destination '{name}': not checked: {reason}"),
                    None if report.ok() => println!("destination '{name}': ok"),
                    None => {}
                }
            }
            if let Some(result) = runtime.block_on(gateway.check_store()) {
                match result {
                    Ok(report) => println!("postgres: {report}"),
                    Err(reason) => println!("postgres: not checked: {reason}"),
                }
                // The SQLite files' settings still parse, but nothing reads them then.
                println!(
                    "postgres: holds the outbox, delivery records and run registry; [delivery] outbox and [runs] store are not used"
                );
            }
            if gaps > 0 {
                eprintln!("error: {gaps} configured feature(s) the destinations cannot do (above)");
                return ExitCode::from(EX_CONFIG);
            }
            println!("{}: ok", config.display());
            ExitCode::SUCCESS
        }
        Command::Serve { config } => {
            let runtime = match runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
            };
            // Inside the runtime: some layers (a rate limit's buffer) start a task when made.
            let gateway = match runtime
                .block_on(async { gateway::app::Gateway::from_config_file(&config) })
            {
                Ok(gateway) => gateway,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(EX_CONFIG);
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
