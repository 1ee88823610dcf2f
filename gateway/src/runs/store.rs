//! Where run events are kept: a local SQLite file (`[runs] store`), or, with the PostgreSQL
//! outbox, the same PostgreSQL database, shared by every replica.
//!
//! An event is applied in a turn ([`RunStore::begin`] .. [`RunStore::commit`]): on PostgreSQL
//! the turn holds an advisory lock, so replicas apply events one at a time, and it starts by
//! handing the registry what other replicas stored since it last looked, so its checks (one
//! console in one run at a time, event ids used once) see every replica's events.

use rusqlite::{Connection, params};

use super::RunError;

/// The lock that makes replicas apply run events one at a time.
const RUN_EVENTS_LOCK: i64 = 0x6563_6d6f_0002;

/// A stored event: its run and its body as received.
pub type StoredEvent = (String, String);

pub trait RunStore: Send {
    /// Every stored event, in the order received.
    fn load(&mut self) -> Result<Vec<StoredEvent>, RunError>;
    /// Starts a turn; the events stored by others since this store last looked, oldest first.
    fn begin(&mut self) -> Result<Vec<StoredEvent>, RunError>;
    /// The bodies stored for `run_id`.
    fn events(&mut self, run_id: &str) -> Result<Vec<String>, RunError>;
    /// Stores an event (a second one with the same id is ignored), durably once committed.
    fn insert(
        &mut self,
        run_id: &str,
        event_id: &str,
        body: &str,
        received_ms: i64,
    ) -> Result<(), RunError>;
    /// Ends the turn, keeping what it stored.
    fn commit(&mut self) -> Result<(), RunError>;
    /// Ends the turn, storing nothing.
    fn rollback(&mut self);
    /// Forgets every event.
    fn forget_everything(&mut self) -> Result<(), RunError>;
}

/// The local SQLite file: one gateway process writes it, so nobody else stores events.
pub struct SqliteRunStore {
    conn: Connection,
}

impl SqliteRunStore {
    pub fn open(path: &std::path::Path) -> Result<Self, RunError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| RunError::Storage(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS run_events (
                run_id TEXT NOT NULL, event_id TEXT NOT NULL, body TEXT NOT NULL, received_ms INTEGER NOT NULL,
                PRIMARY KEY (run_id, event_id))",
        )?;
        Ok(Self { conn })
    }
}

impl RunStore for SqliteRunStore {
    fn load(&mut self) -> Result<Vec<StoredEvent>, RunError> {
        let mut query = self
            .conn
            .prepare("SELECT run_id, body FROM run_events ORDER BY received_ms, rowid")?;
        let rows = query.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn begin(&mut self) -> Result<Vec<StoredEvent>, RunError> {
        Ok(Vec::new())
    }

    fn events(&mut self, run_id: &str) -> Result<Vec<String>, RunError> {
        let mut query = self
            .conn
            .prepare_cached("SELECT body FROM run_events WHERE run_id = ?1")?;
        let bodies = query.query_map([run_id], |row| row.get::<_, String>(0))?;
        Ok(bodies.collect::<Result<_, _>>()?)
    }

    fn insert(
        &mut self,
        run_id: &str,
        event_id: &str,
        body: &str,
        received_ms: i64,
    ) -> Result<(), RunError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO run_events (run_id, event_id, body, received_ms) VALUES (?1, ?2, ?3, ?4)",
            params![run_id, event_id, body, received_ms],
        )?;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), RunError> {
        Ok(())
    }

    fn rollback(&mut self) {}

    fn forget_everything(&mut self) -> Result<(), RunError> {
        self.conn.execute("DELETE FROM run_events", [])?;
        Ok(())
    }
}

impl From<postgres::Error> for RunError {
    fn from(e: postgres::Error) -> Self {
        Self::Storage(format!("postgres: {e}"))
    }
}

/// The PostgreSQL database the outbox is on, shared by the replicas (its table is made by the
/// outbox's migrations).
pub struct PostgresRunStore {
    config: postgres::Config,
    tls: crate::outbox::postgres::PostgresTls,
    client: Option<postgres::Client>,
    /// The newest event this store has seen (its `seq`).
    seen: i64,
}

impl PostgresRunStore {
    /// Connects. Blocking: called off the async workers.
    pub fn connect(
        mut config: tokio_postgres::Config,
        tls: crate::outbox::postgres::PostgresTls,
    ) -> Result<Self, RunError> {
        crate::outbox::postgres::with_custom_plans(&mut config);
        let config: postgres::Config = config.into();
        let client = config.connect(tls.clone())?;
        Ok(Self {
            config,
            tls,
            client: Some(client),
            seen: 0,
        })
    }

    /// The connection, made again if the server went away since.
    fn client(&mut self) -> Result<&mut postgres::Client, RunError> {
        if self.client.as_ref().is_none_or(postgres::Client::is_closed) {
            self.client = Some(self.config.connect(self.tls.clone())?);
        }
        self.client
            .as_mut()
            .ok_or_else(|| RunError::Storage("postgres: not connected".into()))
    }

    /// Events after the newest seen, oldest first; remembers the newest.
    fn since_seen(&mut self) -> Result<Vec<StoredEvent>, RunError> {
        let seen = self.seen;
        let rows = self.client()?.query(
            "SELECT seq, run_id, body FROM run_events WHERE seq > $1 ORDER BY seq",
            &[&seen],
        )?;
        if let Some(last) = rows.last() {
            self.seen = last.get(0);
        }
        Ok(rows.iter().map(|row| (row.get(1), row.get(2))).collect())
    }
}

impl RunStore for PostgresRunStore {
    fn load(&mut self) -> Result<Vec<StoredEvent>, RunError> {
        self.since_seen()
    }

    fn begin(&mut self) -> Result<Vec<StoredEvent>, RunError> {
        self.client()?.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({RUN_EVENTS_LOCK})"
        ))?;
        self.since_seen()
    }

    fn events(&mut self, run_id: &str) -> Result<Vec<String>, RunError> {
        let rows = self.client()?.query(
            "SELECT body FROM run_events WHERE run_id = $1 ORDER BY seq",
            &[&run_id],
        )?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn insert(
        &mut self,
        run_id: &str,
        event_id: &str,
        body: &str,
        received_ms: i64,
    ) -> Result<(), RunError> {
        let inserted = self.client()?.query_opt(
            "INSERT INTO run_events (run_id, event_id, body, received_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (run_id, event_id) DO NOTHING RETURNING seq",
            &[&run_id, &event_id, &body, &received_ms],
        )?;
        // Under the turn's lock nobody else stores events, so this one is the newest.
        if let Some(row) = inserted {
            self.seen = row.get(0);
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), RunError> {
        self.client()?.batch_execute("COMMIT")?;
        Ok(())
    }

    fn rollback(&mut self) {
        if let Ok(client) = self.client() {
            let _ = client.batch_execute("ROLLBACK");
        }
    }

    fn forget_everything(&mut self) -> Result<(), RunError> {
        self.client()?.batch_execute("DELETE FROM run_events")?;
        Ok(())
    }
}
