//! The delivery workers, one per destination, kept in step with the configuration: at a
//! reload a destination added gets a worker, one removed loses it (its pending messages stay
//! in the outbox and go out if it comes back under the same name), and one whose settings or
//! files changed gets a new worker once the old one has finished what it had in flight, so
//! per-resource order holds across the change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::DestinationSettings;
use crate::delivery::Destination;
use crate::delivery::client::{ClientError, EhrClient};
use crate::delivery::worker::{DeliveryWorker, WorkerSettings};
use crate::outbox::Outbox;

impl From<&DestinationSettings> for WorkerSettings {
    fn from(settings: &DestinationSettings) -> Self {
        Self {
            max_batch: settings.max_bundle_entries,
            linger: settings.linger,
            message_attempts: settings.message_attempts,
            backoff_base: Duration::from_millis(500),
            backoff_max: settings.retry_backoff_max,
            breaker_failures: settings.breaker_failures,
            breaker_cooldown: settings.breaker_cooldown,
            breaker_max_cooldown: settings.retry_backoff_max,
            retry_after_max: settings.retry_after_max,
            max_in_flight: settings.concurrency,
        }
    }
}

/// A destination's settings and the contents of the files they name: equal fingerprints,
/// nothing to restart.
fn fingerprint(settings: &DestinationSettings) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(format!("{settings:?}").as_bytes());
    let files = settings
        .ca
        .iter()
        .chain(&settings.client_cert)
        .chain(&settings.client_key)
        .chain(settings.smart.iter().flat_map(|s| &s.keys));
    for file in files {
        hash.update(file.as_os_str().as_encoded_bytes());
        hash.update(std::fs::read(file).unwrap_or_default());
    }
    hash.finalize().into()
}

/// A destination built from its settings, ready to hand to a worker.
pub struct Built {
    pub settings: DestinationSettings,
    pub destination: Destination,
    fingerprint: [u8; 32],
}

impl Built {
    pub fn new(settings: &DestinationSettings) -> Result<Self, ClientError> {
        Ok(Self {
            fingerprint: fingerprint(settings),
            destination: Destination::from_settings(settings)?,
            settings: settings.clone(),
        })
    }
}

struct Running {
    settings: DestinationSettings,
    client: EhrClient,
    fingerprint: [u8; 32],
    retire: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What a reconcile changed, by destination name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetChanges {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
}

impl FleetChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.replaced.is_empty() && self.removed.is_empty()
    }
}

/// The running delivery workers, in configuration order.
pub struct DeliveryFleet {
    outbox: Arc<dyn Outbox>,
    shutdown: watch::Receiver<bool>,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: Vec<(String, Running)>,
    /// Workers of removed destinations still finishing their sends: one that comes back
    /// waits for its predecessor.
    retiring: HashMap<String, JoinHandle<()>>,
}

impl DeliveryFleet {
    /// Starts a worker for each destination. Call inside the runtime.
    pub fn start(
        outbox: Arc<dyn Outbox>,
        shutdown: watch::Receiver<bool>,
        destinations: Vec<Built>,
    ) -> Self {
        let fleet = Self {
            outbox,
            shutdown,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(State::default()),
        };
        fleet.reconcile(destinations);
        fleet
    }

    /// Every destination's settings and client, in configuration order.
    pub fn clients(&self) -> crate::app::DestinationClients {
        self.lock()
            .running
            .iter()
            .map(|(_, r)| (r.settings.clone(), r.client.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, built: Built, predecessor: Option<JoinHandle<()>>) -> Running {
        let (retire, retired) = watch::channel(false);
        let client = built.destination.client().clone();
        let worker = DeliveryWorker::new(
            built.destination,
            self.outbox.clone(),
            WorkerSettings::from(&built.settings),
        );
        let shutdown = self.shutdown.clone();
        let task = self.runtime.spawn(async move {
            if let Some(predecessor) = predecessor {
                // Nothing of this destination is sent while the old worker's sends settle.
                let _ = predecessor.await;
            }
            worker.run_until(shutdown, retired).await;
        });
        Running {
            settings: built.settings,
            client,
            fingerprint: built.fingerprint,
            retire,
            task,
        }
    }

    /// Brings the workers in line with `wanted`: new destinations start, removed ones retire,
    /// changed ones are replaced after their predecessor retires; unchanged ones go on.
    pub fn reconcile(&self, wanted: Vec<Built>) -> FleetChanges {
        let mut changes = FleetChanges::default();
        let mut state = self.lock();
        state.retiring.retain(|_, task| !task.is_finished());
        let mut old: HashMap<String, Running> = state.running.drain(..).collect();
        for built in wanted {
            let name = built.settings.name.clone();
            let next = match old.remove(&name) {
                Some(current) if current.fingerprint == built.fingerprint => current,
                Some(current) => {
                    let _ = current.retire.send(true);
                    changes.replaced.push(name.clone());
                    self.spawn(built, Some(current.task))
                }
                None => {
                    changes.added.push(name.clone());
                    let predecessor = state.retiring.remove(&name);
                    self.spawn(built, predecessor)
                }
            };
            state.running.push((name, next));
        }
        for (name, gone) in old {
            let _ = gone.retire.send(true);
            state.retiring.insert(name.clone(), gone.task);
            changes.removed.push(name);
        }
        changes.removed.sort();
        changes
    }

    /// Waits for every worker to stop (after the shutdown signal; the caller bounds the wait).
    pub async fn join(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut state = self.lock();
            let retiring: Vec<_> = state.retiring.drain().map(|(_, task)| task).collect();
            state
                .running
                .drain(..)
                .map(|(_, running)| running.task)
                .chain(retiring)
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }
}
