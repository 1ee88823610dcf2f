//! Hot reload of what changes while the gateway runs: the server certificate and key, the
//! vendor CAs and their revocation lists, the vendor list, the admin listener's certificate
//! and CAs, the mapping tables of `[mappings] dir` (proven against the profiles first), and
//! the destinations (with the outbox: added, removed or replaced, see
//! [`DeliveryFleet`](crate::delivery::fleet::DeliveryFleet)). On SIGHUP, on
//! `POST /admin/v1/reload`, or when one of those files (or the configuration file) changes,
//! the configuration is read again and everything above is built anew; only when all of it
//! builds is it swapped in, whole. Connections already open
//! keep the TLS session they began with, requests in flight finish as they started, new ones
//! use the new configuration. A file that does not load keeps the old configuration running
//! and says exactly why (log, `GET /admin/v1/reload`, `ecmo_config_reloads_total`).
//!
//! Listen addresses and limits take effect at a restart, and so do destinations with direct
//! delivery (a vendor waits on them).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::ingress::client_identity::{LiveVendors, Vendors};
use crate::revocations::RevokedCertificates;
use crate::server::LiveTls;

/// The mapping tables as they are now: swapped whole when a table directory is reloaded;
/// a request maps with the tables it found when it began.
#[derive(Clone)]
pub struct LiveMappings(Arc<arc_swap::ArcSwap<mappings::Mappings>>);

impl LiveMappings {
    pub fn load(&self) -> Arc<mappings::Mappings> {
        self.0.load_full()
    }

    fn store(&self, tables: mappings::Mappings) {
        self.0.store(Arc::new(tables));
    }
}

impl From<Arc<mappings::Mappings>> for LiveMappings {
    fn from(tables: Arc<mappings::Mappings>) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::new(tables)))
    }
}

/// The tables of `dir`, checked as at start: every table shape proven against the profiles.
fn tables_from(dir: &Path) -> Result<mappings::Mappings, String> {
    let tables = mappings::Mappings::load_dir(dir).map_err(|e| format!("mapping tables: {e}"))?;
    crate::ingress::conformance::ConformanceRules::embedded()
        .and_then(|rules| rules.prove_tables(&tables))
        .map_err(|e| format!("mapping tables: {e}"))?;
    Ok(tables)
}

/// The configuration and the destinations' clients as they are now, for the admin API.
#[derive(Clone)]
pub struct LiveSetup(Arc<arc_swap::ArcSwap<Setup>>);

pub struct Setup {
    pub config: Arc<Config>,
    pub destinations: crate::app::DestinationClients,
}

impl LiveSetup {
    pub fn new(config: Config, destinations: crate::app::DestinationClients) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(Setup {
            config: Arc::new(config),
            destinations,
        })))
    }

    pub fn load(&self) -> Arc<Setup> {
        self.0.load_full()
    }

    fn store(&self, setup: Setup) {
        self.0.store(Arc::new(setup));
    }
}

/// Where reloaded destinations go: the hand-off's routes and the delivery workers (outbox
/// delivery only).
pub struct DestinationReload {
    pub handoff: Arc<crate::outbox::handoff::OutboxHandoff>,
    pub fleet: Arc<crate::delivery::fleet::DeliveryFleet>,
}

/// What a reload builds: everything it swaps.
pub struct Live {
    pub tls: Arc<rustls::ServerConfig>,
    pub vendors: Vendors,
    pub admin_tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("server TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("admin TLS: {0}")]
    AdminTls(crate::tls::TlsError),
}

impl Live {
    /// The listeners' TLS and the vendor list as `config` describes them.
    pub fn build(config: &Config, revoked: &Arc<RevokedCertificates>) -> Result<Self, LiveError> {
        let vendor_crls = crate::tls::load_crls(&config.server.vendor_crl)?;
        let tls = crate::tls::server_config(
            &config.server.cert,
            &config.server.key,
            &config.server.vendor_ca,
            &vendor_crls,
        )?;
        let vendors = Vendors::new(&config.vendors, &vendor_crls, Some(revoked.clone()))?;
        let admin_tls = match &config.admin {
            Some(admin) => Some(
                crate::tls::load_crls(&admin.crl)
                    .and_then(|crls| {
                        crate::tls::admin_server_config(
                            &admin.cert,
                            &admin.key,
                            &admin.client_ca,
                            &crls,
                            admin.console.is_some(),
                        )
                    })
                    .map_err(LiveError::AdminTls)?,
            ),
            None => None,
        };
        Ok(Self {
            tls,
            vendors,
            admin_tls,
        })
    }

    /// Every file `config` reads for what a reload builds, and the configuration itself.
    fn files(config: &Config, config_file: &Path) -> Vec<PathBuf> {
        let mut files = vec![
            config_file.to_owned(),
            config.server.cert.clone(),
            config.server.key.clone(),
        ];
        files.extend(config.server.vendor_ca.iter().cloned());
        files.extend(config.server.vendor_crl.iter().cloned());
        for vendor in &config.vendors {
            files.extend(vendor.ca.iter().cloned());
        }
        if let Some(dir) = &config.mappings.dir {
            // The directory: a table added, changed or removed.
            files.push(dir.clone());
        }
        for destination in &config.destinations {
            files.extend(destination.ca.iter().cloned());
            files.extend(destination.client_cert.iter().cloned());
            files.extend(destination.client_key.iter().cloned());
            files.extend(
                destination
                    .smart
                    .iter()
                    .flat_map(|s| s.keys.iter().cloned()),
            );
        }
        if let Some(admin) = &config.admin {
            files.extend([admin.cert.clone(), admin.key.clone()]);
            files.extend(admin.client_ca.iter().cloned());
            files.extend(admin.crl.iter().cloned());
        }
        files.sort();
        files.dedup();
        files
    }
}

/// What the last reloads did, for the admin API.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatus {
    pub reloads: u64,
    pub failures: u64,
    /// RFC 3339 time of the last attempt.
    pub last_attempt: Option<String>,
    /// Why the last attempt failed (the old configuration still runs), if it did.
    pub last_error: Option<String>,
    /// The files whose change triggers a reload.
    pub watching: Vec<PathBuf>,
}

/// Everything a reload swaps, shared with the parts that use it.
pub struct Swappable {
    pub tls: LiveTls,
    pub admin_tls: Option<LiveTls>,
    pub vendors: LiveVendors,
    pub mappings: LiveMappings,
    pub revoked: Arc<RevokedCertificates>,
    pub setup: LiveSetup,
    /// With outbox delivery: where reloaded destinations go.
    pub destinations: Option<DestinationReload>,
}

/// Swaps in a new configuration when asked to.
pub struct Reloader {
    config_file: PathBuf,
    live: Swappable,
    status: Mutex<ReloadStatus>,
}

impl Reloader {
    pub fn new(config_file: &Path, config: &Config, live: Swappable) -> Self {
        let config_file = std::fs::canonicalize(config_file).unwrap_or(config_file.to_owned());
        Self {
            status: Mutex::new(ReloadStatus {
                watching: Live::files(config, &config_file),
                ..ReloadStatus::default()
            }),
            config_file,
            live,
        }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the configuration again and swaps in what it describes, or keeps what runs and
    /// says why not.
    pub fn reload(&self) -> Result<(), String> {
        let result = Config::load(&self.config_file)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let live = Live::build(&config, &self.live.revoked).map_err(|e| e.to_string())?;
                if live.admin_tls.is_some() != self.live.admin_tls.is_some() {
                    return Err("the [admin] section comes or goes only with a restart".into());
                }
                let tables = match &config.mappings.dir {
                    Some(dir) => Some(tables_from(dir)?),
                    None => None,
                };
                let built = match &self.live.destinations {
                    Some(_) => config
                        .destinations
                        .iter()
                        .map(crate::delivery::fleet::Built::new)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())?,
                    None => {
                        let running = &self.live.setup.load().config.destinations;
                        if format!("{running:?}") != format!("{:?}", config.destinations) {
                            return Err(
                                "with direct delivery, destinations change only with a restart"
                                    .into(),
                            );
                        }
                        Vec::new()
                    }
                };
                Ok((config, live, tables, built))
            });
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_attempt = Some(crate::ingress::fhir_instant_now());
        let metrics = crate::metrics::metrics();
        match result {
            Ok((config, live, tables, built)) => {
                self.live.tls.store(live.tls);
                self.live.vendors.store(Arc::new(live.vendors));
                if let Some(tables) = tables {
                    self.live.mappings.store(tables);
                }
                if let (Some(swap), Some(admin_tls)) = (&self.live.admin_tls, live.admin_tls) {
                    swap.store(admin_tls);
                }
                let mut clients = self.live.setup.load().destinations.clone();
                if let Some(reload) = &self.live.destinations {
                    reload.handoff.set_routes(
                        config
                            .destinations
                            .iter()
                            .map(crate::outbox::handoff::Route::from)
                            .collect(),
                    );
                    let changes = reload.fleet.reconcile(built);
                    if !changes.is_empty() {
                        tracing::info!(
                            added = ?changes.added,
                            replaced = ?changes.replaced,
                            removed = ?changes.removed,
                            "destinations reloaded"
                        );
                    }
                    clients = reload.fleet.clients();
                }
                status.reloads += 1;
                status.last_error = None;
                status.watching = Live::files(&config, &self.config_file);
                metrics
                    .reloads
                    .get_or_create(&crate::metrics::Outcome { outcome: "ok" })
                    .inc();
                tracing::info!(
                    vendors = config.vendors.len(),
                    destinations = config.destinations.len(),
                    "configuration reloaded: certificates, CAs, revocation lists, vendors, mapping tables and destinations"
                );
                self.live.setup.store(Setup {
                    config: Arc::new(config),
                    destinations: clients,
                });
                Ok(())
            }
            Err(error) => {
                status.failures += 1;
                status.last_error = Some(error.clone());
                metrics
                    .reloads
                    .get_or_create(&crate::metrics::Outcome { outcome: "failed" })
                    .inc();
                tracing::error!(%error, "configuration not reloaded; the running one stays");
                Err(error)
            }
        }
    }

    /// Reloads on SIGHUP and when a watched file changes, until `stop` completes.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = self.watch(changed);
        if let Err(error) = &watcher {
            tracing::warn!(%error, "files are not watched; reload with SIGHUP");
        }
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(()) = async { hangups.as_mut()?.recv().await } => {}
                Some(()) = changes.recv() => {
                    // Editors and `mv` write in steps: let them finish, then reload once.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    while changes.try_recv().is_ok() {}
                }
            }
            let reloader = self.clone();
            // Reading and parsing files: off the async workers.
            let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
        }
        drop(watcher);
    }

    /// Watches the directories of the watched files (a file replaced by a rename is seen).
    fn watch(
        &self,
        changed: tokio::sync::mpsc::Sender<()>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        use notify::{EventKind, RecursiveMode, Watcher};
        let watched = self.status().watching;
        let files = watched.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                let relevant = matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                ) && event.paths.iter().any(|p| {
                    files.contains(p)
                        || p.parent().is_some_and(|dir| files.iter().any(|f| f == dir))
                });
                if relevant {
                    let _ = changed.try_send(());
                }
            })?;
        let mut directories: Vec<&Path> = watched
            .iter()
            .map(|f| {
                if f.is_dir() {
                    f.as_path()
                } else {
                    f.parent().unwrap_or(f)
                }
            })
            .collect();
        directories.sort();
        directories.dedup();
        for directory in directories {
            watcher.watch(directory, RecursiveMode::NonRecursive)?;
        }
        Ok(watcher)
    }
}
