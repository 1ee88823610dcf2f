//! ECMO runs: events in, the run's Procedure (with child Procedures) and the console's Device
//! out, and the console-to-patient association that lets readings without a patient find
//! theirs.
//!
//! Events are kept in SQLite (`[runs] store`), each run's state is folded from its events in
//! time order ([`fold`]), and the consoles' periods form an index that the reading path
//! consults. A restart reloads and refolds everything, so the association survives it.
//!
//! In memory each run keeps its folded state and the hashes of its events, not the events: an
//! event timed after the run's latest is folded onto the state, an earlier one (rare) refolds
//! the run from the store. The store's fsync is waited for outside the index's lock.

pub mod event;
pub mod fold;
pub mod registry;
pub mod store;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use mappings::{AttachedDeviceView, ConsoleView, MappedResource, RunView};
use serde_json::Value;
use time::OffsetDateTime;

use crate::ingress::VendorPolicy;
use event::RunEvent;
use fold::{Conflict, Folded};
use store::{RunStore, SqliteRunStore, StoredEvent};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The event cannot be read (422), at a JSON pointer.
    #[error("{}", .0.why)]
    Invalid(#[from] event::Unreadable),
    /// The event contradicts the run or another run (409).
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The vendor does not own the run's console (403).
    #[error("{0}")]
    Forbidden(String),
    /// The run store cannot be written (503).
    #[error("run store: {0}")]
    Storage(String),
    /// The run's resources cannot be built: the gateway's mapping tables, not the event, are
    /// at fault (500).
    #[error("building the run's resources: {0}")]
    Mapping(String),
}

impl From<rusqlite::Error> for RunError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// Who a reading belongs to: the run it falls in and that run's patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAssociation {
    pub run_id: String,
    pub patient_system: String,
    pub patient_value: String,
}

/// A console's stays in runs, as of one moment.
pub struct ConsolePeriods(Vec<(OffsetDateTime, Option<OffsetDateTime>, Arc<RunAssociation>)>);

impl ConsolePeriods {
    /// The run a reading taken at `at` belongs to, if any.
    pub fn at(&self, at: OffsetDateTime) -> Option<Arc<RunAssociation>> {
        self.0
            .iter()
            .find(|(from, until, _)| *from <= at && until.is_none_or(|u| at <= u))
            .map(|(_, _, run)| run.clone())
    }
}

/// What applying an event produced.
pub struct Applied {
    /// Device(s), the run's Procedure and its child Procedures, to hand off.
    pub resources: Vec<MappedResource>,
    /// The (last) console's model, for routing.
    pub model: String,
    /// The run's consoles and the mapping tables of their families, for Provenance.
    pub devices: Vec<mappings::DeviceAgent>,
    pub tables: Vec<(String, String)>,
    pub status: &'static str,
    /// How many events of the run this state includes: it only grows, so the outbox can tell
    /// an older state from a newer one whatever order they reach it in.
    pub revision: i64,
    /// The run's patient, `system|value`.
    pub patient: (String, String),
}

struct Period {
    run: Arc<RunAssociation>,
    from: OffsetDateTime,
    until: Option<OffsetDateTime>,
}

/// One run as the registry keeps it.
struct Run {
    progress: fold::Progress,
    folded: Folded,
    /// Event id -> hash of the body as received, to tell a resend from a reuse of the id.
    received: HashMap<String, [u8; 16]>,
}

#[derive(Default)]
struct State {
    runs: HashMap<String, Run>,
    /// Console serial -> the periods it spent in runs.
    consoles: HashMap<String, Vec<Period>>,
}

impl State {
    /// Every run of `events` (all of the store's, in the order received), folded.
    fn load(&mut self, events: Vec<StoredEvent>) {
        let mut stored: HashMap<String, Vec<(RunEvent, [u8; 16])>> = HashMap::new();
        for (run_id, body) in events {
            match parse_stored(&body) {
                Some(event) => stored.entry(run_id).or_default().push(event),
                None => tracing::error!(%run_id, "stored run event cannot be read; skipped"),
            }
        }
        for (run_id, events) in stored {
            self.refold(&run_id, events);
        }
    }

    /// The runs that `foreign` (events another replica stored) are about, folded again from
    /// everything the store holds for them.
    fn catch_up(&mut self, foreign: Vec<StoredEvent>, store: &mut dyn RunStore) {
        let mut runs: Vec<String> = foreign.into_iter().map(|(run_id, _)| run_id).collect();
        runs.sort();
        runs.dedup();
        for run_id in runs {
            match stored_events(store, &run_id) {
                Ok(events) => self.refold(&run_id, events),
                Err(error) => {
                    tracing::error!(%run_id, %error, "run events of another replica cannot be read")
                }
            }
        }
    }

    fn refold(&mut self, run_id: &str, events: Vec<(RunEvent, [u8; 16])>) {
        match Run::fold(run_id, events) {
            Ok(run) => {
                self.runs.insert(run_id.to_owned(), run);
                self.index(run_id);
            }
            Err(error) => tracing::error!(%run_id, %error, "stored run does not fold"),
        }
    }

    fn index(&mut self, run_id: &str) {
        for periods in self.consoles.values_mut() {
            periods.retain(|p| p.run.run_id != run_id);
        }
        let Some(folded) = self.runs.get(run_id).map(|run| &run.folded) else {
            return;
        };
        let run = Arc::new(RunAssociation {
            run_id: run_id.to_owned(),
            patient_system: folded.patient.system.clone(),
            patient_value: folded.patient.value.clone(),
        });
        for c in folded.device_periods() {
            self.consoles
                .entry(c.serial.clone())
                .or_default()
                .push(Period {
                    run: run.clone(),
                    from: c.from,
                    until: c.until,
                });
        }
    }
}

pub struct RunRegistry {
    store: Mutex<Box<dyn RunStore>>,
    state: RwLock<State>,
    mappings: crate::reload::LiveMappings,
    /// Each run's child Procedures as last rendered (see [`RenderedSegments`]).
    segments: Mutex<RenderedRuns>,
}

/// The runs' rendered child Procedures, with how many there are in all.
#[derive(Default)]
struct RenderedRuns {
    runs: HashMap<String, RenderedSegments>,
    procedures: usize,
}

/// A run's child Procedures (mode segments, circuit changes, weaning trials) by segment key,
/// each with what it was rendered from. Every event sends them all, and all but one or two
/// are unchanged: those are taken from here rather than built again, so an event of a run
/// with hundreds of segments does not build hundreds of Procedures.
type RenderedSegments = HashMap<String, (SegmentInputs, MappedResource)>;

/// Everything [`mappings::procedure_for_segment`] reads.
#[derive(PartialEq)]
struct SegmentInputs {
    segment: mappings::SegmentView,
    entered_in_error: bool,
    patient_system: String,
    patient_value: String,
}

/// How many rendered child Procedures are kept in all (a few KiB each with what they were
/// rendered from: at 8,192 the bench's run-event phase ended 25 MiB larger, at 2,048 a few
/// MiB); past it the cache starts again and they are built anew. Twenty runs of a hundred
/// segments each fit.
const RENDERED_PROCEDURES: usize = 2048;

fn overlaps(
    a_from: OffsetDateTime,
    a_until: Option<OffsetDateTime>,
    b_from: OffsetDateTime,
    b_until: Option<OffsetDateTime>,
) -> bool {
    a_until.is_none_or(|u| b_from < u) && b_until.is_none_or(|u| a_from < u)
}

impl RunRegistry {
    /// Opens the SQLite store at `path` and refolds every run in it.
    pub fn open(
        path: &Path,
        mappings: impl Into<crate::reload::LiveMappings>,
    ) -> Result<Arc<Self>, RunError> {
        Self::with_store(Box::new(SqliteRunStore::open(path)?), mappings)
    }

    /// A registry on `store`, with every run in it refolded. Blocking.
    pub fn with_store(
        mut store: Box<dyn RunStore>,
        mappings: impl Into<crate::reload::LiveMappings>,
    ) -> Result<Arc<Self>, RunError> {
        let mut state = State::default();
        state.load(store.load()?);
        Ok(Arc::new(Self {
            store: Mutex::new(store),
            state: RwLock::new(state),
            mappings: mappings.into(),
            segments: Mutex::default(),
        }))
    }

    /// Takes in the events other replicas stored since the last look (with a shared store;
    /// a local one has none). Blocking: run off the async workers, about once a second.
    pub fn refresh(&self) -> Result<(), RunError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let foreign = store.begin()?;
        store.commit()?;
        if !foreign.is_empty() {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            state.catch_up(foreign, &mut **store);
        }
        Ok(())
    }

    /// Forgets every run, in the store and in memory: a fuzz input starts from nothing without
    /// the cost of a new store.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn forget_everything(&self) -> Result<(), RunError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.forget_everything()?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = State::default();
        *self.segments.lock().unwrap_or_else(|p| p.into_inner()) = RenderedRuns::default();
        Ok(())
    }

    /// Every run as folded now, the latest started first (the console's list of runs).
    pub fn views(&self) -> Vec<RunView> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let current = self.mappings.load();
        let mut views: Vec<RunView> = state
            .runs
            .values()
            .map(|r| view_of(&r.folded, &current))
            .collect();
        views.sort_by(|a, b| b.start.cmp(&a.start).then_with(|| a.run_id.cmp(&b.run_id)));
        views
    }

    /// One run as folded now.
    pub fn view(&self, run_id: &str) -> Option<RunView> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let current = self.mappings.load();
        state.runs.get(run_id).map(|r| view_of(&r.folded, &current))
    }

    /// The runs console `serial` has been in, copied once per batch so the reading path takes
    /// the index's lock once, not once per reading.
    pub fn console_periods(&self, serial: &str) -> ConsolePeriods {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        ConsolePeriods(
            state
                .consoles
                .get(serial)
                .into_iter()
                .flatten()
                .map(|p| (p.from, p.until, p.run.clone()))
                .collect(),
        )
    }

    /// Applies one event to run `run_id`: checks it against the run and every other run,
    /// stores it durably, and returns the resources that now describe the run. Blocking (it
    /// waits for the store's fsync): called off the async workers.
    pub fn apply(
        &self,
        run_id: &str,
        body: &Value,
        vendor: &VendorPolicy,
    ) -> Result<Applied, RunError> {
        let event = event::parse(body)?;
        if let event::EventKind::DeviceAttached { device } = &event.kind
            && self
                .mappings
                .load()
                .family_for_model(&device.model)
                .is_none()
        {
            return Err(RunError::Invalid(event::Unreadable {
                at: "/device/model",
                why: format!(
                    "device.model: no mapping table covers model '{}', so its readings could not be taken",
                    device.model
                ),
            }));
        }
        let raw = serde_json::to_string(body).map_err(|e| event::Unreadable {
            at: "/",
            why: e.to_string(),
        })?;
        let hash = crate::outbox::content_hash(raw.as_bytes());
        // One event at a time, in turn for the store (with a shared store, across replicas):
        // the checks below and the write see the same runs, those of other replicas included.
        // The index is only read meanwhile, so readings go on.
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let foreign = store.begin()?;
        if !foreign.is_empty() {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            state.catch_up(foreign, &mut **store);
        }
        let applied = self.apply_in_turn(&mut **store, run_id, &event, &raw, hash, vendor);
        if applied.is_err() {
            store.rollback();
        }
        applied
    }

    /// [`Self::apply`] once the store's turn is taken; commits the turn before the event
    /// counts in memory.
    fn apply_in_turn(
        &self,
        store: &mut dyn RunStore,
        run_id: &str,
        event: &RunEvent,
        raw: &str,
        hash: [u8; 16],
        vendor: &VendorPolicy,
    ) -> Result<Applied, RunError> {
        let reused = || {
            RunError::from(Conflict(format!(
                "event id '{}' was already used with other content",
                event.event_id
            )))
        };
        let next = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            match state.runs.get(run_id) {
                Some(run) => {
                    if let Some(previous) = run.received.get(&event.event_id) {
                        if *previous != hash {
                            return Err(reused());
                        }
                        // A resend: nothing changes; the same resources go out again.
                        self.authorize(&run.folded, vendor)?;
                        store.commit()?;
                        return self.outputs(&run.folded, run.received.len());
                    }
                    run.progress
                        .is_followed_by(event)
                        .then(|| (run.progress.clone(), run.received.len()))
                }
                None => None,
            }
        };
        let (progress, received) = match next {
            Some((progress, count)) => (progress.then(event)?, Err(count)),
            // Timed before the run's latest event (or a run the registry could not fold at
            // start): folded again from what the store holds.
            None => {
                let mut events = stored_events(store, run_id)?;
                if let Some((_, previous)) =
                    events.iter().find(|(e, _)| e.event_id == event.event_id)
                {
                    if *previous != hash {
                        return Err(reused());
                    }
                } else {
                    events.push((event.clone(), hash));
                }
                let run = Run::fold(run_id, events)?;
                (run.progress, Ok(run.received))
            }
        };
        let folded = progress.folded()?;
        self.authorize(&folded, vendor)?;
        self.check_consoles_free(run_id, &folded)?;
        store.insert(run_id, &event.event_id, raw, crate::outbox::now_ms())?;
        store.commit()?;
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let events = match received {
            Err(count) => {
                let run = state
                    .runs
                    .get_mut(run_id)
                    .ok_or_else(|| RunError::Storage("run state missing".into()))?;
                run.received.insert(event.event_id.clone(), hash);
                run.progress = progress;
                run.folded = folded.clone();
                count + 1
            }
            Ok(received) => {
                let count = received.len();
                state.runs.insert(
                    run_id.to_owned(),
                    Run {
                        progress,
                        folded: folded.clone(),
                        received,
                    },
                );
                count
            }
        };
        state.index(run_id);
        drop(state);
        self.outputs(&folded, events)
    }

    /// A device serves one run at a time: `folded`'s consoles and attached devices in no
    /// other run's periods.
    fn check_consoles_free(&self, run_id: &str, folded: &Folded) -> Result<(), RunError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        for period in folded.device_periods() {
            let busy = state
                .consoles
                .get(&period.serial)
                .into_iter()
                .flatten()
                .find(|p| {
                    p.run.run_id != run_id && overlaps(p.from, p.until, period.from, period.until)
                });
            if let Some(other) = busy {
                return Err(Conflict(format!(
                    "device '{}' is in run '{}' from {}; a device serves one run at a time",
                    period.serial,
                    other.run.run_id,
                    event::format(other.from)
                ))
                .into());
            }
        }
        Ok(())
    }

    fn authorize(&self, folded: &Folded, vendor: &VendorPolicy) -> Result<(), RunError> {
        match folded
            .consoles
            .iter()
            .find(|c| !vendor.may_post_for(&c.serial, &c.model))
        {
            Some(c) => Err(RunError::Forbidden(format!(
                "vendor '{}' may not post events for a run on console '{}' (model '{}')",
                vendor.name, c.serial, c.model
            ))),
            None => Ok(()),
        }
    }

    fn outputs(&self, folded: &Folded, events: usize) -> Result<Applied, RunError> {
        let current = self.mappings.load();
        let view = view_of(folded, &current);
        let mut resources = Vec::new();
        let mut devices = Vec::new();
        let mut tables = Vec::new();
        let mut described: Vec<&str> = Vec::new();
        let devices_used = view
            .consoles
            .iter()
            .chain(view.attached.iter().map(|a| &a.device));
        for console in devices_used {
            if described.contains(&console.serial.as_str()) {
                continue;
            }
            described.push(&console.serial);
            resources.push(mappings::circuit_device(console).map_err(RunError::Mapping)?);
            devices.push(mappings::DeviceAgent {
                serial_system: console.serial_system.clone(),
                serial: console.serial.clone(),
                model: console.model.clone(),
                firmware: None,
            });
            tables.extend(
                current
                    .family_for_model(&console.model)
                    .map(crate::ingress::table_of),
            );
        }
        resources.push(mappings::procedure_for_run(&view).map_err(RunError::Mapping)?);
        let mut rendered = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        let RenderedRuns { runs, procedures } = &mut *rendered;
        let kept_before = runs.get(&view.run_id).map_or(0, HashMap::len);
        if *procedures - kept_before + view.segments.len() > RENDERED_PROCEDURES {
            runs.clear();
            *procedures = 0;
        }
        let run_segments = runs.entry(view.run_id.clone()).or_default();
        let kept_before = run_segments.len();
        for segment in &view.segments {
            let inputs = SegmentInputs {
                segment: segment.clone(),
                entered_in_error: view.status == mappings::RunStatus::EnteredInError,
                patient_system: view.patient_system.clone(),
                patient_value: view.patient_value.clone(),
            };
            match run_segments.get(&segment.key) {
                Some((from, resource)) if *from == inputs => resources.push(resource.clone()),
                _ => {
                    let resource = mappings::procedure_for_segment(&view, segment)
                        .map_err(RunError::Mapping)?;
                    run_segments.insert(segment.key.clone(), (inputs, resource.clone()));
                    resources.push(resource);
                }
            }
        }
        // Segments the run no longer has (an event taken back) are not kept.
        if run_segments.len() > view.segments.len() {
            run_segments.retain(|key, _| view.segments.iter().any(|s| &s.key == key));
        }
        *procedures = *procedures - kept_before + run_segments.len();
        drop(rendered);
        Ok(Applied {
            resources,
            model: folded
                .consoles
                .last()
                .map(|c| c.model.clone())
                .unwrap_or_default(),
            status: view.status.code(),
            revision: events as i64,
            devices,
            tables,
            patient: (folded.patient.system.clone(), folded.patient.value.clone()),
        })
    }
}

impl Run {
    /// A run folded from its stored events (any order).
    fn fold(run_id: &str, events: Vec<(RunEvent, [u8; 16])>) -> Result<Self, Conflict> {
        let (events, hashes): (Vec<RunEvent>, Vec<[u8; 16]>) = events.into_iter().unzip();
        let progress = fold::progress(run_id, &events)?;
        let folded = progress.folded()?;
        let received = events.into_iter().map(|e| e.event_id).zip(hashes).collect();
        Ok(Self {
            progress,
            folded,
            received,
        })
    }
}

/// Takes in other replicas' run events every second until `stop` resolves, so that readings
/// on this replica find runs whose events went to another.
pub async fn refresh_every_second(
    runs: Arc<RunRegistry>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        let runs = runs.clone();
        match tokio::task::spawn_blocking(move || runs.refresh()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read other replicas' run events; the next look will retry");
            }
            Err(error) => tracing::error!(%error, "run registry refresh task failed"),
        }
    }
}

/// An event as stored, with the hash of its body.
fn parse_stored(body: &str) -> Option<(RunEvent, [u8; 16])> {
    let value = serde_json::from_str::<Value>(body).ok()?;
    Some((
        event::parse(&value).ok()?,
        crate::outbox::content_hash(body.as_bytes()),
    ))
}

/// The events the store holds for `run_id`.
fn stored_events(
    store: &mut dyn RunStore,
    run_id: &str,
) -> Result<Vec<(RunEvent, [u8; 16])>, RunError> {
    Ok(store
        .events(run_id)?
        .iter()
        .filter_map(|body| parse_stored(body))
        .collect())
}

/// The run as folded, with each console it has had (once, in order of use) described by its
/// family's table: what the Procedure, the Devices and the admin API show.
fn view_of(folded: &Folded, tables: &mappings::Mappings) -> RunView {
    let mut view = folded.view.clone();
    for period in &folded.consoles {
        if view.consoles.iter().any(|c| c.serial == period.serial) {
            continue;
        }
        view.consoles.push(device_view(period, tables));
    }
    view.attached = folded
        .attached
        .iter()
        .map(|period| AttachedDeviceView {
            device: device_view(period, tables),
            from: event::format(period.from),
            until: period.until.map(event::format),
        })
        .collect();
    view
}

/// A device as its family's table describes it.
fn device_view(period: &fold::ConsolePeriod, tables: &mappings::Mappings) -> ConsoleView {
    let family = tables.family_for_model(&period.model);
    let (device_type, device_type_display) = family.map_or_else(
        || ("ecmo-console".to_owned(), "ECMO console".to_owned()),
        |f| f.device_type.clone(),
    );
    ConsoleView {
        serial: period.serial.clone(),
        model: period.model.clone(),
        eui64: period.eui64.clone(),
        manufacturer: family.map_or_else(|| "Unknown".to_owned(), |f| f.manufacturer.clone()),
        serial_system: family.map_or_else(
            || format!("{}unknown", mappings::DEVICE_SERIAL_SYSTEM_PREFIX),
            |f| f.serial_system.clone(),
        ),
        device_type,
        device_type_display,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry(path: &Path) -> Arc<RunRegistry> {
        RunRegistry::open(path, Arc::new(mappings::Mappings::embedded().unwrap())).unwrap()
    }

    fn getinge() -> VendorPolicy {
        VendorPolicy::of_models("getinge", &["CARDIOHELP-i"])
    }

    fn started(serial: &str) -> Value {
        json!({"eventId": "s", "type": "started", "time": "2026-11-20T08:00:00Z",
               "patient": {"system": "urn:x", "value": "P"}, "mode": "vv",
               "console": {"serial": serial, "model": "CARDIOHELP-i"}})
    }

    /// Two replicas on one PostgreSQL database: each applies an event in its turn, after
    /// taking in the other's, so a console is in one run at a time and an event id is used
    /// once across them; and readings on a replica find runs whose events went to another
    /// once it has looked again (every second in the gateway).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_on_one_database_share_the_runs() {
        let config = tokio::task::spawn_blocking(|| {
            crate::outbox::throwaway_postgres::shared_cluster().database()
        })
        .await
        .unwrap()
        .unwrap();
        // The outbox makes the schema, run events included.
        let _outbox = crate::outbox::postgres::PostgresOutbox::open(
            config.clone(),
            crate::outbox::postgres::tls(None).unwrap(),
            "a",
            crate::outbox::postgres::CLAIM_LEASE,
        )
        .await
        .unwrap();
        tokio::task::spawn_blocking(move || {
            let open = || {
                let store = store::PostgresRunStore::connect(
                    config.clone(),
                    crate::outbox::postgres::tls(None).unwrap(),
                )
                .unwrap();
                RunRegistry::with_store(
                    Box::new(store),
                    Arc::new(mappings::Mappings::embedded().unwrap()),
                )
                .unwrap()
            };
            let (a, b) = (open(), open());
            a.apply("run-1", &started("CH-1"), &getinge()).unwrap();
            let mut clash = started("CH-1");
            clash["time"] = json!("2026-11-20T09:00:00Z");
            assert!(
                matches!(
                    b.apply("run-2", &clash, &getinge()),
                    Err(RunError::Conflict(_))
                ),
                "the console is in run-1, which replica a took"
            );
            let mut reused = started("CH-1");
            reused["mode"] = json!("va");
            assert!(
                matches!(
                    b.apply("run-1", &reused, &getinge()),
                    Err(RunError::Conflict(_))
                ),
                "event id 's' of run-1 was used with other content on replica a"
            );
            let reading_time = time::macros::datetime!(2026-11-20 10:00 UTC);
            assert_eq!(
                b.console_periods("CH-1").at(reading_time).unwrap().run_id,
                "run-1"
            );
            // A third replica hears of a run started on a only when it looks again.
            let c = open();
            a.apply("run-3", &started("CH-3"), &getinge()).unwrap();
            assert!(c.console_periods("CH-3").at(reading_time).is_none());
            c.refresh().unwrap();
            assert_eq!(
                c.console_periods("CH-3").at(reading_time).unwrap().run_id,
                "run-3"
            );
            assert_eq!(c.views().len(), 2);
        })
        .await
        .unwrap();
    }

    fn later_events() -> Vec<Value> {
        vec![
            json!({"eventId": "m", "type": "mode-changed", "time": "2026-11-20T10:00:00Z", "mode": "vva"}),
            json!({"eventId": "c", "type": "complication", "time": "2026-11-20T12:00:00Z", "complication": {"code": "1386000"}}),
            json!({"eventId": "e", "type": "ended", "time": "2026-11-21T08:00:00Z", "reason": "recovered", "alive": true}),
        ]
    }

    /// Events folded onto the run one at a time, an early one arriving last (refolded from
    /// the store), give the run that folding them all in time order gives, and so does a
    /// restart; a resend changes nothing and a reused id is a conflict.
    #[test]
    fn events_in_any_order_and_a_restart_give_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let runs = registry(&path);
        let vendor = getinge();
        let [mode, complication, end] = <[Value; 3]>::try_from(later_events()).unwrap();
        for (n, event) in [
            started("C1"),
            mode.clone(),
            end.clone(),
            complication.clone(),
        ]
        .iter()
        .enumerate()
        {
            let applied = runs.apply("R", event, &vendor).unwrap();
            assert_eq!(applied.revision, n as i64 + 1);
        }
        let all: Vec<RunEvent> = [started("C1"), mode, complication.clone(), end]
            .iter()
            .map(|e| event::parse(e).unwrap())
            .collect();
        let expected = fold::fold("R", &all).unwrap();
        let folded = |runs: &RunRegistry| {
            let state = runs.state.read().unwrap();
            state.runs["R"].folded.clone()
        };
        assert_eq!(folded(&runs), expected);
        assert_eq!(expected.view.segments.len(), 2);

        let resend = runs.apply("R", &complication, &getinge()).unwrap();
        assert_eq!(resend.revision, 4, "a resend is not a new event");
        let mut reused = complication;
        reused["complication"]["code"] = json!("0000");
        assert!(matches!(
            runs.apply("R", &reused, &vendor),
            Err(RunError::Conflict(_))
        ));
        drop(runs);

        let reopened = registry(&path);
        assert_eq!(folded(&reopened), expected);
        let at = time::macros::datetime!(2026-11-20 09:00 UTC);
        assert_eq!(reopened.console_periods("C1").at(at).unwrap().run_id, "R");
    }

    /// The child Procedures an event sends are those the run's segments render to now, whether
    /// taken from the rendered cache or built anew: a segment that changes (the mode segment
    /// an event ends, every segment of a run taken back, the patient corrected) is rendered
    /// again, and one the run no longer has is not sent.
    #[test]
    fn cached_segment_procedures_are_always_what_the_run_renders_to_now() {
        let dir = tempfile::tempdir().unwrap();
        let runs = registry(&dir.path().join("runs.sqlite"));
        let vendor = getinge();
        let mut events = vec![started("C1")];
        events.extend((1..=5).map(|n| {
            json!({"eventId": format!("w{n}"), "type": "weaning-trial",
                   "time": format!("2026-11-20T{:02}:30:00Z", 8 + n), "end": format!("2026-11-20T{:02}:40:00Z", 8 + n)})
        }));
        events.extend(later_events());
        events.push(
            json!({"eventId": "x", "type": "entered-in-error", "time": "2026-11-22T08:00:00Z"}),
        );
        for event in &events {
            let applied = runs
                .apply("R", event, &vendor)
                .unwrap_or_else(|e| panic!("{event}: {e}"));
            let view = {
                let state = runs.state.read().unwrap();
                view_of(&state.runs["R"].folded, &runs.mappings.load())
            };
            let expected: Vec<MappedResource> = view
                .segments
                .iter()
                .map(|segment| mappings::procedure_for_segment(&view, segment).unwrap())
                .collect();
            let sent: Vec<&MappedResource> = applied
                .resources
                .iter()
                .filter(|r| r.resource_type == "Procedure" && r.identifier_value.contains('/'))
                .collect();
            assert_eq!(sent, expected.iter().collect::<Vec<_>>(), "after {event}");
        }
        let cached = runs.segments.lock().unwrap();
        assert!(cached.runs["R"].len() >= 6, "{}", cached.runs["R"].len());
        assert_eq!(cached.procedures, cached.runs["R"].len());
    }

    /// While an event waits for the store (here another connection holds its write lock, as
    /// a slow disk would hold the fsync), readings still find their runs: the index is not
    /// locked across the write. Once the write goes through, the new run is in the index.
    #[test]
    fn readings_find_their_runs_while_an_event_waits_for_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let runs = registry(&path);
        runs.apply("R1", &started("C1"), &getinge()).unwrap();
        let blocker = rusqlite::Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let writer = {
            let runs = runs.clone();
            std::thread::spawn(move || runs.apply("R2", &started("C2"), &getinge()).map(drop))
        };
        let at = time::macros::datetime!(2026-11-20 09:00 UTC);
        let (found, read) = std::sync::mpsc::channel();
        let reader = {
            let runs = runs.clone();
            std::thread::spawn(move || {
                let _ = found.send(runs.console_periods("C1").at(at).map(|r| r.run_id.clone()));
            })
        };
        let seen = read
            .recv_timeout(std::time::Duration::from_secs(4))
            .expect("the index is locked while an event waits for the store");
        assert_eq!(seen.as_deref(), Some("R1"));
        assert!(
            runs.console_periods("C2").at(at).is_none(),
            "not yet durable"
        );
        blocker.execute_batch("COMMIT").unwrap();
        writer.join().unwrap().unwrap();
        reader.join().unwrap();
        assert_eq!(runs.console_periods("C2").at(at).unwrap().run_id, "R2");
    }

    fn monitor(id: &str, kind: &str, time: &str, model: &str) -> Value {
        json!({"eventId": id, "type": kind, "time": time, "device": {"serial": "M4-1", "model": model}})
    }

    /// A monitor's readings belong to the run it is attached to for exactly the attached
    /// period; it can move to another patient's run once detached, never be in two at once.
    #[test]
    fn an_attached_monitor_links_its_readings_for_its_period_and_serves_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let runs = registry(&dir.path().join("runs.sqlite"));
        let vendor = getinge();
        runs.apply("R1", &started("C1"), &vendor).unwrap();
        let mut other = started("C2");
        other["patient"]["value"] = json!("P2");
        runs.apply("R2", &other, &vendor).unwrap();

        let attached = runs
            .apply(
                "R1",
                &monitor("a", "device-attached", "2026-11-20T09:00:00Z", "M4"),
                &vendor,
            )
            .unwrap();
        let devices: Vec<&str> = attached.devices.iter().map(|d| d.serial.as_str()).collect();
        assert_eq!(devices, ["C1", "M4-1"]);
        assert_eq!(
            attached
                .resources
                .iter()
                .filter(|r| r.resource_type == "Device")
                .count(),
            2,
            "a Device for the console and one for the monitor"
        );
        let in_two = runs.apply(
            "R2",
            &monitor("a", "device-attached", "2026-11-20T09:30:00Z", "M4"),
            &vendor,
        );
        assert!(
            matches!(&in_two, Err(RunError::Conflict(c)) if c.0.contains("a device serves one run at a time")),
            "{:?}",
            in_two.err()
        );
        runs.apply(
            "R1",
            &monitor("d", "device-detached", "2026-11-20T10:00:00Z", "M4"),
            &vendor,
        )
        .unwrap();
        runs.apply(
            "R2",
            &monitor("a", "device-attached", "2026-11-20T10:00:00Z", "M4"),
            &vendor,
        )
        .unwrap();

        use time::macros::datetime;
        let periods = runs.console_periods("M4-1");
        let run_at = |at| periods.at(at).map(|r| r.run_id.clone());
        assert_eq!(
            run_at(datetime!(2026-11-20 08:30 UTC)),
            None,
            "before it was attached"
        );
        assert_eq!(
            run_at(datetime!(2026-11-20 09:30 UTC)).as_deref(),
            Some("R1")
        );
        assert_eq!(
            run_at(datetime!(2026-11-20 11:00 UTC)).as_deref(),
            Some("R2")
        );
        assert_eq!(
            periods
                .at(datetime!(2026-11-20 11:00 UTC))
                .unwrap()
                .patient_value,
            "P2"
        );

        let unknown = runs.apply(
            "R1",
            &monitor("u", "device-attached", "2026-11-20T12:00:00Z", "NOPE-9"),
            &vendor,
        );
        assert!(
            matches!(&unknown, Err(RunError::Invalid(event::Unreadable { at: "/device/model", why })) if why.contains("NOPE-9")),
            "{:?}",
            unknown.err()
        );
    }
}
