//! The gateway assembled from its configuration: everything that can fail is checked in
//! [`Gateway::from_config_file`], before the listener opens.

use std::path::Path;
use std::sync::Arc;

use mappings::Mappings;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, DeliveryMode};
use crate::delivery::fleet::{Built, DeliveryFleet};
use crate::delivery::{DirectDelivery, Handoff};
use crate::hl7v2::listener::{MllpOptions, MllpParts, MllpTransport};
use crate::hl7v2::pcd01::Pcd01Settings;
use crate::ingress::client_identity::LiveVendors;
use crate::ingress::device_clocks::DeviceClocks;
use crate::ingress::stack::{Admission, build_stack_with, observation_path};
use crate::ingress::{IngressParts, IngressSettings};
use crate::outbox::Outbox;
use crate::outbox::handoff::OutboxHandoff;
use crate::outbox::postgres::PostgresOutbox;
use crate::outbox::retention::RetentionPolicy;
use crate::outbox::sqlite::SqliteOutbox;
use crate::reload::{Live, LiveError, Reloader};
use crate::revocations::RevokedCertificates;
use crate::server::{LiveTls, ServeOptions, fixed_tls, serve_mtls};
use crate::validation::Schemas;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("mapping tables: {0}")]
    Mappings(#[from] mappings::TableError),
    #[error("server TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Destination(#[from] crate::delivery::client::ClientError),
    #[error(transparent)]
    Schema(#[from] crate::validation::SchemaError),
    #[error("outbox: {0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error(transparent)]
    Runs(#[from] crate::runs::RunError),
    #[error("profiles: {0}")]
    Profiles(String),
    #[error("{0}")]
    Store(String),
    #[error("admin TLS: {0}")]
    AdminTls(crate::tls::TlsError),
    #[error("revoked certificates: {0}")]
    Revocations(#[from] crate::revocations::RevocationError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A checked, ready-to-serve gateway.
pub struct Gateway {
    config: Config,
    /// The configuration file, when there is one to reload from.
    config_file: Option<std::path::PathBuf>,
    tls: LiveTls,
    mappings: Arc<Mappings>,
    schemas: Schemas,
    destinations: Vec<Built>,
    admin_tls: Option<LiveTls>,
    conformance: Arc<crate::ingress::conformance::ConformanceRules>,
    vendors: LiveVendors,
    revoked: Arc<RevokedCertificates>,
}

impl Gateway {
    pub fn from_config_file(path: &Path) -> Result<Self, StartError> {
        let mut gateway = Self::from_config(Config::load(path)?)?;
        gateway.config_file = Some(path.to_owned());
        Ok(gateway)
    }

    pub fn from_config(config: Config) -> Result<Self, StartError> {
        let mappings = match &config.mappings.dir {
            Some(dir) => Mappings::load_dir(dir)?,
            None => Mappings::embedded()?,
        };
        let revoked = Arc::new(RevokedCertificates::open(&config.server.revocations)?);
        let live = Live::build(&config, &revoked).map_err(|e| match e {
            LiveError::Tls(e) => StartError::Tls(e),
            LiveError::AdminTls(e) => StartError::AdminTls(e),
        })?;
        let destinations = config
            .destinations
            .iter()
            .map(Built::new)
            .collect::<Result<Vec<_>, _>>()?;
        let conformance = crate::ingress::conformance::ConformanceRules::embedded()
            .map_err(StartError::Profiles)?;
        conformance
            .prove_tables(&mappings)
            .map_err(StartError::Profiles)?;
        Ok(Self {
            conformance: Arc::new(conformance),
            admin_tls: live.admin_tls.map(fixed_tls),
            schemas: Schemas::embedded()?,
            mappings: Arc::new(mappings),
            tls: fixed_tls(live.tls),
            destinations,
            config,
            config_file: None,
            vendors: live.vendors.into(),
            revoked,
        })
    }

    /// Each destination's CapabilityStatement (and SMART token) against what its configuration
    /// needs, checked at once.
    pub async fn check_destinations(&self) -> Vec<crate::delivery::capabilities::CapabilityReport> {
        check_all(self.destination_clients()).await
    }

    /// With the PostgreSQL store: whether its server answers, over what, with which schema;
    /// `None` with the SQLite file.
    pub async fn check_store(&self) -> Option<Result<String, String>> {
        let settings = self.config.delivery.postgres.as_ref()?;
        Some(crate::outbox::postgres::probe(settings).await)
    }

    fn destination_clients(&self) -> DestinationClients {
        self.destinations
            .iter()
            .map(|d| (d.settings.clone(), d.destination.client().clone()))
            .collect()
    }

    /// Listens and serves until `shutdown` completes, then drains open requests and stops the
    /// delivery workers (what they had in flight stays pending in the outbox).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), StartError> {
        let addr = self.config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait_stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };

        let clients = self.destination_clients();
        // What each EHR cannot do of what it is configured for, said once at start.
        tokio::spawn({
            let clients = clients.clone();
            async move {
                for report in check_all(clients).await {
                    log_report(&report);
                }
            }
        });
        let mut workers = tokio::task::JoinSet::new();
        type Delivery = (
            Arc<dyn Handoff>,
            Option<Arc<dyn Outbox>>,
            Option<crate::reload::DestinationReload>,
        );
        let (handoff, outbox, reload): Delivery = match self.config.delivery.mode {
            DeliveryMode::Direct => (
                Arc::new(DirectDelivery::new(
                    self.destinations
                        .into_iter()
                        .map(|d| d.destination)
                        .collect(),
                )),
                None,
                None,
            ),
            DeliveryMode::Outbox => {
                let outbox: Arc<dyn Outbox> = match &self.config.delivery.postgres {
                    None => {
                        let sqlite = SqliteOutbox::open(&self.config.delivery.outbox)?;
                        sqlite.set_pending_limit(self.config.delivery.max_pending);
                        sqlite
                    }
                    Some(settings) => {
                        let (connection, tls) = settings.connection().map_err(StartError::Store)?;
                        let replica = settings.replica_name(self.config.server.listen.port());
                        let postgres =
                            PostgresOutbox::open(connection, tls, &replica, settings.claim_lease)
                                .await?;
                        postgres.set_pending_limit(self.config.delivery.max_pending);
                        tracing::info!("outbox on PostgreSQL");
                        postgres
                    }
                };
                let routes = self
                    .config
                    .destinations
                    .iter()
                    .map(crate::outbox::handoff::Route::from)
                    .collect();
                let fleet = Arc::new(DeliveryFleet::start(
                    outbox.clone(),
                    stopped.clone(),
                    self.destinations,
                ));
                let delivery = &self.config.delivery;
                let readings = &self.config.readings;
                let retention = RetentionPolicy::new(
                    delivery.keep_delivered,
                    delivery.keep_dead,
                    readings.max_past_age + readings.max_future_skew,
                );
                workers.spawn(crate::outbox::retention::run(
                    outbox.clone(),
                    retention,
                    stopped.clone(),
                ));
                let handoff = Arc::new(OutboxHandoff::new(outbox.clone(), routes));
                (
                    handoff.clone(),
                    Some(outbox),
                    Some(crate::reload::DestinationReload { handoff, fleet }),
                )
            }
        };
        let fleet = reload.as_ref().map(|r| r.fleet.clone());
        let setup = crate::reload::LiveSetup::new(self.config.clone(), clients.clone());

        let probes = Arc::new(crate::probes::Probes::new(
            outbox.clone(),
            self.config
                .destinations
                .first()
                .map_or("", |d| d.name.as_str()),
        ));
        if let Some(settings) = &self.config.probes {
            let probe_listener =
                TcpListener::bind(settings.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: settings.listen,
                        source,
                    })?;
            let probe_addr = probe_listener.local_addr().unwrap_or(settings.listen);
            tokio::spawn(crate::probes::serve(
                probe_listener,
                probes.clone(),
                wait_stop(stopped.clone()),
            ));
            tracing::info!(probes = %probe_addr, "probes listening (plain HTTP: /livez, /readyz)");
        }
        // One set of tables for every layer and the run store, swapped whole on a reload.
        let live_mappings: crate::reload::LiveMappings = self.mappings.clone().into();
        let reloader = self.config_file.as_deref().map(|file| {
            Arc::new(Reloader::new(
                file,
                &self.config,
                crate::reload::Swappable {
                    tls: self.tls.clone(),
                    admin_tls: self.admin_tls.clone(),
                    vendors: self.vendors.clone(),
                    mappings: live_mappings.clone(),
                    revoked: self.revoked.clone(),
                    setup: setup.clone(),
                    destinations: reload,
                },
            ))
        });
        if let Some(reloader) = &reloader {
            tokio::spawn(reloader.clone().run(wait_stop(stopped.clone())));
        }
        let clocks = Arc::new(DeviceClocks::default());
        tokio::spawn(crate::cert_expiry::warn_daily(self.config.clone()));
        let runs = match &self.config.delivery.postgres {
            None => crate::runs::RunRegistry::open(&self.config.runs.store, live_mappings.clone())?,
            // The replicas' shared run registry, in the outbox's database.
            Some(settings) => {
                let (connection, tls) = settings.connection().map_err(StartError::Store)?;
                let mappings = live_mappings.clone();
                let runs = tokio::task::spawn_blocking(move || {
                    let store = crate::runs::store::PostgresRunStore::connect(connection, tls)?;
                    crate::runs::RunRegistry::with_store(Box::new(store), mappings)
                })
                .await
                .map_err(|e| StartError::Store(format!("run registry: {e}")))??;
                tokio::spawn(crate::runs::refresh_every_second(
                    runs.clone(),
                    wait_stop(stopped.clone()),
                ));
                runs
            }
        };
        if let (Some(admin), Some(tls)) = (&self.config.admin, self.admin_tls.clone()) {
            let admin_listener =
                TcpListener::bind(admin.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: admin.listen,
                        source,
                    })?;
            let admin_addr = admin_listener.local_addr().unwrap_or(admin.listen);
            let stack = crate::admin::build_admin_stack(
                admin.identities.clone(),
                crate::admin::AdminParts {
                    outbox: outbox.clone(),
                    handoff: handoff.clone(),
                    clocks: clocks.clone(),
                    revoked: self.revoked.clone(),
                    setup: setup.clone(),
                    reloader: reloader.clone(),
                    runs: runs.clone(),
                    console: admin
                        .console
                        .as_ref()
                        .map(|c| Arc::new(crate::admin::console::ConsoleLogin::new(c))),
                },
            );
            tokio::spawn(serve_mtls(
                admin_listener,
                tls,
                stack,
                ServeOptions {
                    // A browser signing in to the console brings no certificate.
                    anonymous_clients: admin.console.is_some(),
                    ..ServeOptions::default()
                },
                wait_stop(stopped.clone()),
            ));
            tracing::info!(admin = %admin_addr, "admin API listening (mutual TLS, admin role)");
        }

        let server = &self.config.server;
        let settings = IngressSettings {
            request_timeout: server.request_timeout,
            max_body_bytes: server.max_body_bytes,
            max_concurrent_requests: server.max_concurrent_requests,
            max_concurrent_requests_per_vendor: server.vendor_share(),
            max_future_skew: self.config.readings.max_future_skew,
            max_past_age: self.config.readings.max_past_age,
        };
        // One request limit and one share per vendor for both ways in.
        let admission = Admission::new(&settings);
        if let Some(hl7) = &self.config.hl7v2 {
            let mllp_listener =
                TcpListener::bind(hl7.listen)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: hl7.listen,
                        source,
                    })?;
            let mllp_addr = mllp_listener.local_addr().unwrap_or(hl7.listen);
            let transport = match &hl7.plain_vendor {
                Some(name) if !hl7.tls => MllpTransport::Plain {
                    vendors: self.vendors.clone(),
                    name: name.clone(),
                },
                _ => MllpTransport::Tls {
                    tls: self.tls.clone(),
                    vendors: self.vendors.clone(),
                },
            };
            let parts = MllpParts {
                path: admission.admit(observation_path(
                    &live_mappings,
                    &self.schemas,
                    &runs,
                    settings.time_window(),
                    &clocks,
                    handoff.clone(),
                )),
                mappings: live_mappings.clone(),
                options: Arc::new(MllpOptions {
                    max_frame_bytes: hl7.max_frame_bytes,
                    idle_timeout: hl7.idle_timeout,
                    read_timeout: hl7.read_timeout,
                    handshake_timeout: server.handshake_timeout,
                    request_timeout: server.request_timeout,
                    max_connections: hl7.max_connections,
                    pcd01: Pcd01Settings {
                        patient_identifier_systems: hl7.patient_identifier_systems.clone(),
                    },
                }),
            };
            tokio::spawn(crate::hl7v2::listener::serve(
                mllp_listener,
                transport,
                parts,
                wait_stop(stopped.clone()),
            ));
            tracing::info!(mllp = %mllp_addr, tls = hl7.tls, "HL7 v2 listening (MLLP, IHE PCD-01 ORU^R01)");
        }
        let stack = build_stack_with(
            settings,
            self.vendors,
            IngressParts {
                mappings: live_mappings.clone(),
                schemas: self.schemas.clone(),
                runs,
                conformance: self.conformance.clone(),
                clocks: clocks.clone(),
            },
            handoff,
            admission,
        );
        let options = ServeOptions {
            handshake_timeout: server.handshake_timeout,
            header_read_timeout: server.header_read_timeout,
            max_connections: server.max_connections,
            drain_timeout: server.shutdown_timeout,
            ..ServeOptions::default()
        };
        let shutdown_timeout = server.shutdown_timeout;
        tracing::info!(
            listen = %local,
            vendors = self.config.vendors.len(),
            destinations = self.config.destinations.len(),
            families = self.mappings.families().len(),
            delivery = ?self.config.delivery.mode,
            "gateway listening (mutual TLS)"
        );
        probes.serving();
        // Not ready from the moment shutdown begins, so an orchestrator sends no more while
        // the requests in flight finish.
        let shutdown = {
            let probes = probes.clone();
            async move {
                shutdown.await;
                probes.stopping();
                tracing::info!("shutting down: finishing the requests in flight");
            }
        };
        serve_mtls(listener, self.tls, stack, options, shutdown).await;
        let _ = stop.send(true);
        // What the workers hold stays pending in the outbox and is sent after a restart.
        let _ = tokio::time::timeout(shutdown_timeout, async {
            if let Some(fleet) = &fleet {
                fleet.join().await;
            }
            while workers.join_next().await.is_some() {}
        })
        .await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Every destination's settings with its client, for checks around the delivery workers.
pub type DestinationClients = Arc<
    [(
        crate::config::DestinationSettings,
        crate::delivery::client::EhrClient,
    )],
>;

/// The capability checks of every destination, side by side.
pub async fn check_all(
    clients: DestinationClients,
) -> Vec<crate::delivery::capabilities::CapabilityReport> {
    let checks: Vec<_> = clients
        .iter()
        .cloned()
        .map(|(settings, client)| {
            tokio::spawn(
                async move { crate::delivery::capabilities::check(&settings, &client).await },
            )
        })
        .collect();
    let mut reports = Vec::with_capacity(checks.len());
    for check in checks {
        if let Ok(report) = check.await {
            reports.push(report);
        }
    }
    reports
}

fn log_report(report: &crate::delivery::capabilities::CapabilityReport) {
    let destination = &report.destination;
    for gap in &report.gaps {
        tracing::warn!(%destination, %gap, "destination cannot do what it is configured for");
    }
    match &report.unreachable {
        Some(reason) => {
            tracing::warn!(%destination, %reason, "destination's capabilities not checked")
        }
        None if report.ok() => {
            tracing::info!(%destination, "destination's capabilities cover its configuration")
        }
        None => {}
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
