//! ECMO runs: events in, the run's Procedure (with child Procedures) and the console's Device
//! out, and the console-to-patient association that lets readings without a patient find
//! theirs.
//!
//! Events are kept in SQLite (`[runs] store`), each run's state is folded from its events in
//! time order ([`fold`]), and the consoles' periods form an index that the reading path
//! consults. A restart reloads and refolds everything, so the association survives it.

pub mod event;
pub mod fold;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use mappings::{ConsoleView, MappedResource, Mappings};
use rusqlite::{Connection, params};
use serde_json::Value;
use time::OffsetDateTime;

use crate::ingress::VendorPolicy;
use event::RunEvent;
use fold::{Conflict, Folded};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The event cannot be read (422).
    #[error("{0}")]
    Invalid(String),
    /// The event contradicts the run or another run (409).
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The vendor does not own the run's console (403).
    #[error("{0}")]
    Forbidden(String),
    /// The run store cannot be written (503).
    #[error("run store: {0}")]
    Storage(String),
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
}

struct Period {
    run: Arc<RunAssociation>,
    from: OffsetDateTime,
    until: Option<OffsetDateTime>,
}

#[derive(Default)]
struct State {
    /// Events per run, with the body as received (to recognise a resend).
    events: HashMap<String, Vec<(RunEvent, String)>>,
    folded: HashMap<String, Folded>,
    /// Console serial -> the periods it spent in runs.
    consoles: HashMap<String, Vec<Period>>,
}

impl State {
    fn index(&mut self, run_id: &str) {
        for periods in self.consoles.values_mut() {
            periods.retain(|p| p.run.run_id != run_id);
        }
        let Some(folded) = self.folded.get(run_id) else {
            return;
        };
        let run = Arc::new(RunAssociation {
            run_id: run_id.to_owned(),
            patient_system: folded.patient.system.clone(),
            patient_value: folded.patient.value.clone(),
        });
        for c in &folded.consoles {
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
    conn: Mutex<Connection>,
    state: RwLock<State>,
    mappings: Arc<Mappings>,
}

fn overlaps(
    a_from: OffsetDateTime,
    a_until: Option<OffsetDateTime>,
    b_from: OffsetDateTime,
    b_until: Option<OffsetDateTime>,
) -> bool {
    a_until.is_none_or(|u| b_from < u) && b_until.is_none_or(|u| a_from < u)
}

impl RunRegistry {
    /// Opens the store and refolds every run in it.
    pub fn open(path: &Path, mappings: Arc<Mappings>) -> Result<Arc<Self>, RunError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Storage(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS run_events (
                run_id TEXT NOT NULL, event_id TEXT NOT NULL, body TEXT NOT NULL, received_ms INTEGER NOT NULL,
                PRIMARY KEY (run_id, event_id))",
        )?;
        let mut state = State::default();
        {
            let mut query =
                conn.prepare("SELECT run_id, body FROM run_events ORDER BY received_ms, rowid")?;
            let rows = query.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })?;
            for row in rows {
                let (run_id, body) = row?;
                let parsed = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| event::parse(&v));
                match parsed {
                    Some(event) => state.events.entry(run_id).or_default().push((event, body)),
                    None => tracing::error!(%run_id, "stored run event cannot be read; skipped"),
                }
            }
        }
        let run_ids: Vec<String> = state.events.keys().cloned().collect();
        for run_id in run_ids {
            let events: Vec<RunEvent> = state.events[&run_id]
                .iter()
                .map(|(e, _)| e.clone())
                .collect();
            match fold::fold(&run_id, &events) {
                Ok(folded) => {
                    state.folded.insert(run_id.clone(), folded);
                    state.index(&run_id);
                }
                Err(error) => tracing::error!(%run_id, %error, "stored run does not fold"),
            }
        }
        Ok(Arc::new(Self {
            conn: Mutex::new(conn),
            state: RwLock::new(state),
            mappings,
        }))
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
    /// stores it durably, and returns the resources that now describe the run.
    pub fn apply(
        &self,
        run_id: &str,
        body: &Value,
        vendor: &VendorPolicy,
    ) -> Result<Applied, RunError> {
        let event = event::parse(body)
            .ok_or_else(|| RunError::Invalid("the event lacks what its type needs".into()))?;
        let raw = serde_json::to_string(body).map_err(|e| RunError::Invalid(e.to_string()))?;
        // One event at a time: the checks below and the write must see the same state.
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let known = state
            .events
            .get(run_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some((_, previous)) = known.iter().find(|(e, _)| e.event_id == event.event_id) {
            if *previous != raw {
                return Err(Conflict(format!(
                    "event id '{}' was already used with other content",
                    event.event_id
                ))
                .into());
            }
            // A resend: nothing changes; the same resources go out again (harmless).
            let folded = state
                .folded
                .get(run_id)
                .ok_or_else(|| RunError::Storage("run state missing".into()))?;
            self.authorize(folded, vendor)?;
            return self.outputs(folded, known.len());
        }
        let mut events: Vec<RunEvent> = known.iter().map(|(e, _)| e.clone()).collect();
        events.push(event.clone());
        let folded = fold::fold(run_id, &events)?;
        self.authorize(&folded, vendor)?;
        for period in &folded.consoles {
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
                    "console '{}' is in run '{}' from {}; a console serves one run at a time",
                    period.serial,
                    other.run.run_id,
                    event::format(other.from)
                ))
                .into());
            }
        }
        self.conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute(
                "INSERT INTO run_events (run_id, event_id, body, received_ms) VALUES (?1, ?2, ?3, ?4)",
                params![run_id, event.event_id, raw, crate::outbox::now_ms()],
            )?;
        state
            .events
            .entry(run_id.to_owned())
            .or_default()
            .push((event, raw));
        state.folded.insert(run_id.to_owned(), folded);
        state.index(run_id);
        let folded = &state.folded[run_id];
        self.outputs(folded, state.events[run_id].len())
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
        let mut view = folded.view.clone();
        let mut resources = Vec::new();
        let mut seen = Vec::new();
        let mut devices = Vec::new();
        let mut tables = Vec::new();
        for period in &folded.consoles {
            if seen.contains(&period.serial) {
                continue;
            }
            seen.push(period.serial.clone());
            let family = self.mappings.family_for_model(&period.model);
            let console = ConsoleView {
                serial: period.serial.clone(),
                model: period.model.clone(),
                manufacturer: family
                    .map_or_else(|| "Unknown".to_owned(), |f| f.manufacturer.clone()),
                serial_system: family.map_or_else(
                    || format!("{}unknown", mappings::DEVICE_SERIAL_SYSTEM_PREFIX),
                    |f| f.serial_system.clone(),
                ),
            };
            resources.push(mappings::device_for_console(&console).map_err(RunError::Storage)?);
            devices.push(mappings::DeviceAgent {
                serial_system: console.serial_system.clone(),
                serial: console.serial.clone(),
                model: console.model.clone(),
                firmware: None,
            });
            tables.extend(family.map(crate::ingress::table_of));
            view.consoles.push(console);
        }
        resources.push(mappings::procedure_for_run(&view).map_err(RunError::Storage)?);
        for segment in &view.segments {
            resources
                .push(mappings::procedure_for_segment(&view, segment).map_err(RunError::Storage)?);
        }
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
        })
    }
}
