//! The embedded outbox: one SQLite file in WAL mode with `synchronous = FULL`, so a commit
//! returns only once the write-ahead log is fsync'd.
//!
//! All writes go through one writer thread that commits whatever has queued up while the
//! previous commit was syncing (group commit): many concurrent requests share one fsync, and
//! each caller is answered only after the commit that holds its rows. Reads use their own
//! connection (WAL lets them run beside the writer).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc};

use super::writes::{
    self, Applied, Command, Holder, MAX_GROUP, MessageRow, Prior, Settled, SettledState, StateKey,
    WRITER_QUEUE, WriteTx, Writer,
};
use super::{
    Batch, DeadLetter, DestinationStats, Disposition, Due, Enqueued, MessageStatus, NOT_BLOCKED,
    NewMessage, Outbox, OutboxError, Pending, Placements, ProvenancePlan, Purged, Retention,
    Retraction, Settle, now_ms, time_key,
};
use crate::delivery::BoxFuture;
use crate::outbox::browse;
use crate::outbox::stored_body;

/// Free pages one vacuum command gives back (8 MiB).
const VACUUM_PAGES: u64 = 2048;

/// What a destination was last given for a resource, with that message's state (a scalar
/// subquery: the same as a LEFT JOIN, which SQLite planned again on every use).
const PRIOR: &str =
    "SELECT content_hash, revision, message_id, (SELECT state FROM messages WHERE id = message_id)
             FROM resource_state
             WHERE resource_type = ?1 AND time_key = ?2 AND logical_id = ?3 AND destination = ?4";

/// Stores one message, due at once (its body goes to `message_bodies`).
const INSERT_MESSAGE: &str = "INSERT INTO messages (batch_id, destination, resource_type, logical_id, identifier_system, identifier_value, upsert, next_attempt_ms, created_ms, predecessor, disposition, body_version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?11, ?9, ?10, ?12)";

/// Stores one message's body.
const INSERT_BODY: &str = "INSERT INTO message_bodies (message_id, body) VALUES (?1, ?2)";

/// Records what a destination is now being given for a resource.
const UPSERT_STATE: &str = "INSERT INTO resource_state (resource_type, time_key, logical_id, destination, content_hash, revision, message_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (resource_type, time_key, logical_id, destination) DO UPDATE SET
             content_hash = excluded.content_hash,
             revision = COALESCE(excluded.revision, revision),
             message_id = excluded.message_id";

/// A destination's pending messages from an id on in acceptance order, each with whether it
/// is due, read only as far as needed (the index gives that order, so nothing is sorted): a
/// bound `LIMIT` would make SQLite plan the statement again on every call. Bodies are read
/// apart, only for the messages taken.
fn due_sql(destination: &str) -> String {
    format!(
        "SELECT id, next_attempt_ms <= ?1 AND {NOT_BLOCKED}, resource_type, logical_id,
                identifier_system, identifier_value, attempts, upsert, body_version
         FROM messages m INDEXED BY messages_pending
         WHERE destination = {} AND state = 'pending' AND id >= ?2
         ORDER BY id",
        sql_literal(destination)
    )
}

/// The earliest retry time of a destination's pending messages (a covering index answers it).
fn earliest_due_sql(destination: &str) -> String {
    format!(
        "SELECT MIN(next_attempt_ms) FROM messages WHERE destination = {} AND state = 'pending'",
        sql_literal(destination)
    )
}

/// The same, over the messages that no pending predecessor holds back.
fn earliest_unblocked_sql(destination: &str) -> String {
    format!(
        "SELECT MIN(next_attempt_ms) FROM messages m WHERE destination = {} AND state = 'pending' AND {NOT_BLOCKED}",
        sql_literal(destination)
    )
}

/// `text` as an SQL string literal. The delivery reads name their destination this way, not
/// as a bound parameter: SQLite ties the plan of an ORDER BY or MIN beside an equality on a
/// bound value to that value, and plans such a statement again on every use (a twentieth of
/// gateway's CPU went to that); a statement per destination keeps its plan.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Columns added after the first release, for outbox files written by it.
const ADDED_COLUMNS: [(&str, &str); 3] = [
    ("predecessor", "INTEGER"),
    ("disposition", "TEXT NOT NULL DEFAULT 'created'"),
    ("body_version", "INTEGER"),
];

fn columns(conn: &Connection, table: &str) -> Result<Vec<String>, OutboxError> {
    let mut query = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let present = query
        .query_map([table], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(present)
}

/// Brings an outbox file written by an earlier release to [`SCHEMA`], in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), OutboxError> {
    let present = columns(conn, "messages")?;
    let tx = conn.transaction()?;
    // Indexes over every message by state, replaced by the partial ones.
    tx.execute_batch("DROP INDEX IF EXISTS messages_queue; DROP INDEX IF EXISTS messages_due;")?;
    for (column, definition) in ADDED_COLUMNS {
        if !present.iter().any(|p| p == column) {
            tx.execute_batch(&format!(
                "ALTER TABLE messages ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    if present.iter().any(|p| p == "body") {
        tx.execute_batch(
            "INSERT INTO message_bodies (message_id, body) SELECT id, body FROM messages;
             ALTER TABLE messages DROP COLUMN body;",
        )?;
    }
    if !columns(&tx, "resource_state")?
        .iter()
        .any(|c| c == "time_key")
    {
        // Keyed by destination and logical id before: each row is keyed again by the time of
        // its latest message (the only rows without one are of messages purged after delivery,
        // which no release before this one did; they sort with the untimed resources).
        tx.execute_batch("ALTER TABLE resource_state RENAME TO resource_state_by_destination")?;
        tx.execute_batch(SCHEMA)?;
        {
            let mut old = tx.prepare(
                "SELECT s.resource_type, s.logical_id, s.destination, s.content_hash, s.revision,
                        s.message_id, m.identifier_value
                 FROM resource_state_by_destination s LEFT JOIN messages m ON m.id = s.message_id",
            )?;
            let mut insert = tx.prepare(UPSERT_STATE)?;
            let mut rows = old.query([])?;
            while let Some(row) = rows.next()? {
                let resource_type: String = row.get(0)?;
                let identifier_value: Option<String> = row.get(6)?;
                insert.execute(params![
                    resource_type,
                    identifier_value
                        .as_deref()
                        .map_or("", |value| time_key(&resource_type, value)),
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, Vec<u8>>(3)?,
                    row.get::<_, Option<i64>>(4)?,
                    row.get::<_, i64>(5)?,
                ])?;
            }
        }
        tx.execute_batch("DROP TABLE resource_state_by_destination")?;
    }
    tx.commit()?;
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    identifier_system TEXT NOT NULL,
    identifier_value TEXT NOT NULL,
    upsert INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    settled_ms INTEGER,
    status_line TEXT,
    location TEXT,
    last_error TEXT,
    outcome TEXT,
    -- The previous message about the same resource at the same destination: this one waits
    -- while that one is pending, so per resource the EHR gets them in acceptance order.
    predecessor INTEGER,
    -- created, updated or amended
    disposition TEXT NOT NULL DEFAULT 'created',
    -- A charting interval's message, rewritten while pending by a later reading: how often.
    -- NULL for every other message, which is never rewritten.
    body_version INTEGER
);
-- The FHIR of each message, apart from the row that settling rewrites, so that a settle
-- writes a few small rows per page rather than each body again.
CREATE TABLE IF NOT EXISTS message_bodies (
    message_id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
-- What each destination was last given for each resource: tells a resend (same content, a
-- no-op) from a correction (other content) and an older state of a run from a newer one.
-- Keyed first by time (outbox::time_key), so new readings are appended in key order.
CREATE TABLE IF NOT EXISTS resource_state (
    resource_type TEXT NOT NULL,
    time_key TEXT NOT NULL,
    logical_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    content_hash BLOB NOT NULL,
    revision INTEGER,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (resource_type, time_key, logical_id, destination)
) WITHOUT ROWID;
-- `due` walks a destination's pending messages in acceptance order (no sort of the backlog);
-- `next_due` finds the earliest retry time; dead letters are listed by destination. Partial:
-- a settled message leaves the pending indexes instead of moving to another part of them,
-- and delivered messages are in none.
CREATE INDEX IF NOT EXISTS messages_pending ON messages(destination, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS messages_pending_due ON messages(destination, next_attempt_ms)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS messages_dead ON messages(id) WHERE state = 'dead';
-- The retention schedule finds the delivered messages past keeping without a scan.
CREATE INDEX IF NOT EXISTS messages_delivered ON messages(settled_ms) WHERE state = 'delivered';
CREATE INDEX IF NOT EXISTS messages_batch ON messages(batch_id);
-- At a destination that charts a statistic of each interval: every reading's value (NULL when
-- the device marked it invalid), by interval and device time, and whether the reading was
-- taken back (a resend of the same value does not bring it back, as for a reading).
-- Retention forgets them by time.
CREATE TABLE IF NOT EXISTS chart_values (
    destination TEXT NOT NULL,
    slot_logical_id TEXT NOT NULL,
    reading_ms INTEGER NOT NULL,
    value TEXT,
    retracted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, slot_logical_id, reading_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chart_values_time ON chart_values(reading_ms);
";

pub struct SqliteOutbox {
    writer: Arc<Writer>,
    reader: Arc<Mutex<Connection>>,
    /// Dropped with the outbox, which ends the census thread.
    _census: std::sync::mpsc::SyncSender<()>,
}

/// How often the undelivered messages are counted for [`SqliteOutbox::set_pending_limit`].
const CENSUS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Undelivered messages in the outbox, all destinations: a pending index answers it, so the
/// count costs what is pending, not what is kept.
const COUNT_PENDING: &str = "SELECT COUNT(*) FROM messages WHERE state = 'pending'";

fn count_pending(conn: &Connection) -> Result<u64, OutboxError> {
    Ok(conn
        .prepare_cached(COUNT_PENDING)?
        .query_row([], |row| row.get::<_, i64>(0))? as u64)
}

/// Counts the undelivered messages every [`CENSUS_EVERY`] on its own connection, until the
/// outbox is dropped. A count rather than a tally kept by every write: a bound that may be
/// passed by a second of ingest needs nothing of the write path.
fn census_loop(
    conn: Connection,
    pending: Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::mpsc::Receiver<()>,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CENSUS_EVERY) {
        match count_pending(&conn) {
            Ok(n) => pending.store(n, std::sync::atomic::Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "outbox census failed; the next one will retry"),
        }
    }
}

/// Page cache per connection, in KiB: lookups of resources corrected or resent long after
/// (and the b-tree pages above the appended ones) stay in memory. 8 MiB rather than 16: the
/// bench measured the same throughput and 12 MiB less RSS after the batch phase (writer and
/// reader each fill theirs).
const CACHE_KIB: i64 = 8 * 1024;

/// Page cache of the connections that look nothing up (the checkpointer copies from the WAL,
/// the census walks one index once a second), in KiB: the full cache would be RSS for nothing.
const SMALL_CACHE_KIB: i64 = 1024;

/// WAL length (in frames) that wakes the checkpointer. A quarter of it measured worse: the
/// restarts at twice this length, then every 8 MiB, held the writer back so often that 5% of
/// single requests at 2,000/s were shed.
const CHECKPOINT_PAGES: std::ffi::c_int = 4096;

/// What a WAL that grew past [`CHECKPOINT_PAGES`] (a burst, a long read that held the
/// checkpoints back) is cut back to once it starts again, in bytes.
const WAL_KEPT_BYTES: i64 = 2 * CHECKPOINT_PAGES as i64 * 4096;

fn open(path: &Path) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)?;
    // Savepoint journals stay in memory: one per command of a group commit.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Lets retention give freed pages back to the file system. SQLite changes the vacuum mode of a
/// file that has tables only by rebuilding it, so a file from an earlier release is rebuilt
/// once, at start, before any other connection is open.
fn ensure_incremental_vacuum(conn: &Connection) -> Result<(), OutboxError> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    if mode != INCREMENTAL {
        tracing::info!("rebuilding the outbox file once so that retention can shrink it");
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// Copies the WAL back into the database file on its own thread and connection, so that the
/// writer (and every request waiting for its fsync) does not wait for checkpoints.
///
/// Passive checkpoints copy beside the writer; each pass copies what was committed during the
/// one before, and once one catches up, the next commit writes the WAL from its start again.
/// Under writes that never pause they never catch up, and the WAL would grow by everything
/// written (every commit then writing to new file pages): once it is twice its usual length, a
/// restart checkpoint holds the writer back for the last frames. Not after every pass: that
/// measured slower (more 503s, a higher p99).
fn checkpoint_loop(conn: Connection, wake: std::sync::mpsc::Receiver<()>, gate: &RestartGate) {
    while wake.recv().is_ok() {
        if checkpoint(&conn, Checkpoint::Passive)
            .is_some_and(|frames| frames >= 2 * CHECKPOINT_PAGES)
        {
            gate.hold();
            checkpoint(&conn, Checkpoint::Restart);
            gate.release();
        }
    }
}

#[derive(Clone, Copy)]
enum Checkpoint {
    /// Copies beside the writer what no reader still needs.
    Passive,
    /// Copies everything and starts the WAL again; holds the writer back.
    Restart,
}

impl Checkpoint {
    fn label(self) -> &'static str {
        match self {
            Checkpoint::Passive => "passive",
            Checkpoint::Restart => "restart",
        }
    }
}

/// Runs one checkpoint; the WAL's length in frames then.
fn checkpoint(conn: &Connection, mode: Checkpoint) -> Option<std::ffi::c_int> {
    let started = std::time::Instant::now();
    let sql = match mode {
        Checkpoint::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
        Checkpoint::Restart => "PRAGMA wal_checkpoint(RESTART)",
    };
    let frames = conn
        .query_row(sql, [], |row| row.get(1))
        .inspect_err(
            |e| tracing::warn!(error = %e, "outbox checkpoint failed; the next one will retry"),
        )
        .ok();
    record_disk_time(
        &crate::metrics::metrics()
            .outbox_checkpoint_seconds
            .get_or_create(&crate::metrics::CheckpointMode { mode: mode.label() }),
        mode.label(),
        started,
    );
    frames
}

/// A commit or checkpoint slower than this is logged: requests wait for the former.
const SLOW_DISK: std::time::Duration = std::time::Duration::from_secs(1);

/// Observes how long a commit or checkpoint (`what`) took; one slower than [`SLOW_DISK`] is
/// also logged, as every request waiting for a commit waited that long.
fn record_disk_time(
    histogram: &prometheus_client::metrics::histogram::Histogram,
    what: &'static str,
    started: std::time::Instant,
) {
    let took = started.elapsed();
    histogram.observe(took.as_secs_f64());
    if took > SLOW_DISK {
        tracing::warn!(
            what,
            millis = took.as_millis() as u64,
            "the outbox's disk was slow: a slow or contended disk delays every accepted request"
        );
    }
}

/// Lets a restart checkpoint take the write lock between two group commits: the writer takes
/// it again at once when commands are queued, and SQLite's locks are not fair.
#[derive(Default)]
struct RestartGate {
    held: Mutex<bool>,
    released: std::sync::Condvar,
}

impl RestartGate {
    fn hold(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    fn release(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.released.notify_all();
    }

    /// Called by the writer between commits: waits while a restart is under way (bounded, so a
    /// stuck checkpoint cannot stop the writes).
    fn pass(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !*held {
            return;
        }
        let started = std::time::Instant::now();
        let _ = self
            .released
            .wait_timeout_while(held, std::time::Duration::from_secs(1), |held| *held);
        crate::metrics::metrics()
            .outbox_writer_held_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Waits for the write lock in short sleeps (SQLite's own back-off sleeps up to 100 ms at a
/// time, which would be the latency of every request behind it), up to 5 s in all.
fn busy_briefly(retries: std::ffi::c_int) -> bool {
    if retries >= 25_000 {
        return false;
    }
    std::thread::sleep(std::time::Duration::from_micros(200));
    true
}

impl SqliteOutbox {
    /// Opens (or creates) the outbox file; pending messages from before a crash are kept.
    pub fn open(path: &Path) -> Result<Arc<Self>, OutboxError> {
        Self::open_with_queue(path, WRITER_QUEUE)
    }

    /// [`Self::open`] with room for `queue` commands waiting for the writer.
    fn open_with_queue(path: &Path, queue: usize) -> Result<Arc<Self>, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| OutboxError::Storage(format!("{}: {e}", dir.display())))?;
        }
        let mut writer_conn = open(path)?;
        writer_conn.busy_handler(Some(busy_briefly))?;
        // Takes effect for a new file (before its first table); an older one is rebuilt below.
        writer_conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        writer_conn.execute_batch(SCHEMA)?;
        migrate(&mut writer_conn)?;
        writer_conn.execute_batch(browse::SCHEMA)?;
        ensure_incremental_vacuum(&writer_conn)?;
        // The checkpointer does what SQLite's automatic checkpoint would do inside a commit.
        let mut checkpointer = open(path)?;
        checkpointer.busy_handler(Some(busy_briefly))?;
        checkpointer.pragma_update(None, "cache_size", -SMALL_CACHE_KIB)?;
        let gate = Arc::new(RestartGate::default());
        let writer_gate = gate.clone();
        let reader = open(path)?;
        let (writer, commands) = mpsc::channel(queue);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = commits.clone();
        let (wake_checkpointer, wake) = std::sync::mpsc::sync_channel(1);
        let after_vacuum = wake_checkpointer.clone();
        // Called after each commit with the WAL's length; replaces the automatic checkpoint.
        writer_conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
            if pages >= CHECKPOINT_PAGES {
                // A checkpoint already asked for covers these pages too.
                let _ = wake_checkpointer.try_send(());
            }
            Ok(())
        }))?;
        std::thread::Builder::new()
            .name("outbox-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, wake, &gate))
            .map_err(|e| OutboxError::Storage(e.to_string()))?;
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || write_loop(writer_conn, commands, &counter, &writer_gate, &after_vacuum))
            .map_err(|e| OutboxError::Storage(e.to_string()))?;
        let census = open(path)?;
        census.pragma_update(None, "cache_size", -SMALL_CACHE_KIB)?;
        let pending = Arc::new(std::sync::atomic::AtomicU64::new(count_pending(&census)?));
        let (census_stop, stop) = std::sync::mpsc::sync_channel(0);
        let counted = pending.clone();
        std::thread::Builder::new()
            .name("outbox-census".into())
            .spawn(move || census_loop(census, counted, stop))
            .map_err(|e| OutboxError::Storage(e.to_string()))?;
        Ok(Arc::new(Self {
            writer: Arc::new(Writer::new(writer, commits, pending)),
            reader: Arc::new(Mutex::new(reader)),
            _census: census_stop,
        }))
    }

    /// Refuses new requests ([`OutboxError::Full`]) while `limit` or more messages are
    /// undelivered: the outbox is a queue and gets a bound before the disk is its bound.
    pub fn set_pending_limit(&self, limit: u64) {
        self.writer.set_pending_limit(limit);
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> BoxFuture<Result<T, OutboxError>> {
        let reader = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                f(&conn)
            })
            .await
            .map_err(|e| OutboxError::Storage(e.to_string()))?
        })
    }
}

/// The writer thread: take one command, then everything already queued, commit once.
fn write_loop(
    mut conn: Connection,
    mut commands: mpsc::Receiver<Command>,
    commits: &std::sync::atomic::AtomicU64,
    gate: &RestartGate,
    wake_checkpointer: &std::sync::mpsc::SyncSender<()>,
) {
    while let Some(first) = commands.blocking_recv() {
        gate.pass();
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match commands.try_recv() {
                Ok(command) => group.push(command),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit_group(&mut conn, &group);
        record_disk_time(
            &crate::metrics::metrics().outbox_commit_seconds,
            "commit",
            started,
        );
        commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if group.iter().any(|c| matches!(c, Command::Vacuum(_))) {
            // The file shrinks when a checkpoint has copied the vacuum back, which the WAL's
            // length alone would not ask for.
            let _ = wake_checkpointer.try_send(());
        }
        // Answer only after the commit (or its failure): that is the durability promise.
        writes::answer(group, result);
    }
}

/// Commits a group, first whole ([`writes::Isolation::Optimistic`]); a group in which a
/// command fails is rolled back and applied again with a savepoint per command, so that the
/// others are still committed and the failing one answered on its own.
fn commit_group(conn: &mut Connection, group: &[Command]) -> Vec<Result<Applied, OutboxError>> {
    match try_commit_group(conn, group, writes::Isolation::Optimistic) {
        Some(results) => results,
        None => try_commit_group(conn, group, writes::Isolation::PerCommand)
            .unwrap_or_else(|| unreachable!("a group applied per command answers every command")),
    }
}

/// One attempt at a group; `None` when a command failed under the optimistic isolation (the
/// transaction is then rolled back).
fn try_commit_group(
    conn: &mut Connection,
    group: &[Command],
    isolation: writes::Isolation,
) -> Option<Vec<Result<Applied, OutboxError>>> {
    // Immediate: the write lock is taken (waiting out a restart checkpoint) before anything is
    // read, as a read transaction cannot wait to become a write one.
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return Some(writes::failed(group, &e)),
    };
    // Dropped without a commit, the transaction rolls back.
    let results = match writes::apply_group(&mut tx, group, isolation) {
        Ok(results) => results?,
        Err(e) => return Some(writes::failed(group, &e)),
    };
    if let Err(e) = tx.commit() {
        return Some(writes::failed(group, &e));
    }
    Some(results)
}

/// A statement without parameters or rows, parsed once per connection.
fn run_cached(tx: &rusqlite::Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.raw_execute().map(drop)
}

fn settled_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<Settled> {
    Ok(Settled {
        id: row.get(0)?,
        resource_type: row.get(1)?,
        identifier_value: row.get(2)?,
        logical_id: row.get(3)?,
        destination: row.get(4)?,
    })
}

impl WriteTx for rusqlite::Transaction<'_> {
    fn savepoint(&mut self) -> Result<(), OutboxError> {
        Ok(run_cached(self, "SAVEPOINT command")?)
    }

    fn release(&mut self) -> Result<(), OutboxError> {
        Ok(run_cached(self, "RELEASE command")?)
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), OutboxError> {
        Ok(run_cached(self, "ROLLBACK TO command")?)
    }

    fn record_batch(
        &mut self,
        batch_id: &str,
        facts: &super::BatchFacts,
        now: i64,
    ) -> Result<(), OutboxError> {
        Ok(browse::record(self, batch_id, facts, now)?)
    }

    fn prior(&mut self, key: StateKey<'_>) -> Result<Option<Prior>, OutboxError> {
        Ok(self
            .prepare_cached(PRIOR)?
            .query_row(
                params![
                    key.resource_type,
                    key.time_key,
                    key.logical_id,
                    key.destination
                ],
                |row| {
                    Ok(Prior {
                        content_hash: row.get(0)?,
                        revision: row.get(1)?,
                        message_id: row.get(2)?,
                        state: row.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    fn is_rewritable(&mut self, message_id: i64) -> Result<bool, OutboxError> {
        Ok(self
            .prepare_cached("SELECT body_version IS NOT NULL FROM messages WHERE id = ?1")?
            .query_row(params![message_id], |row| row.get(0))?)
    }

    fn written_as(&mut self, message_id: i64) -> Result<(bool, Disposition), OutboxError> {
        let (upsert, disposition): (bool, String) = self
            .prepare_cached("SELECT upsert, disposition FROM messages WHERE id = ?1")?
            .query_row(params![message_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok((upsert, Disposition::parse(&disposition)))
    }

    fn rewrite_body(&mut self, message_id: i64, body: &[u8]) -> Result<(), OutboxError> {
        self.prepare_cached("UPDATE message_bodies SET body = ?2 WHERE message_id = ?1")?
            .execute(params![message_id, stored_body::stored(body)])?;
        self.prepare_cached("UPDATE messages SET body_version = body_version + 1 WHERE id = ?1")?
            .execute(params![message_id])?;
        Ok(())
    }

    fn upsert_state(
        &mut self,
        key: StateKey<'_>,
        content_hash: &[u8],
        revision: Option<i64>,
        message_id: i64,
    ) -> Result<(), OutboxError> {
        self.prepare_cached(UPSERT_STATE)?.execute(params![
            key.resource_type,
            key.time_key,
            key.logical_id,
            key.destination,
            content_hash,
            revision,
            message_id
        ])?;
        Ok(())
    }

    fn point_state(
        &mut self,
        key: StateKey<'_>,
        message_id: i64,
        content_hash: Option<&[u8]>,
    ) -> Result<(), OutboxError> {
        self.prepare_cached(
            "UPDATE resource_state SET message_id = ?5, content_hash = COALESCE(?6, content_hash)
             WHERE resource_type = ?1 AND time_key = ?2 AND logical_id = ?3 AND destination = ?4",
        )?
        .execute(params![
            key.resource_type,
            key.time_key,
            key.logical_id,
            key.destination,
            message_id,
            content_hash
        ])?;
        Ok(())
    }

    fn state_body(&mut self, key: StateKey<'_>) -> Result<Option<Vec<u8>>, OutboxError> {
        let stored = self
            .prepare_cached(
                "SELECT (SELECT body FROM message_bodies WHERE message_id = s.message_id)
                 FROM resource_state s
                 WHERE resource_type = ?1 AND time_key = ?2 AND logical_id = ?3 AND destination = ?4",
            )?
            .query_row(
                params![key.resource_type, key.time_key, key.logical_id, key.destination],
                |row| row.get::<_, Option<Vec<u8>>>(0),
            )
            .optional()?
            .flatten();
        stored_body::read_optional(stored)
    }

    fn insert_message(&mut self, row: &MessageRow<'_>, now: i64) -> Result<i64, OutboxError> {
        self.prepare_cached(INSERT_MESSAGE)?.execute(params![
            row.batch_id,
            row.destination,
            row.resource_type,
            row.logical_id,
            row.identifier_system,
            row.identifier_value,
            row.upsert,
            row.due_ms(now),
            row.predecessor,
            row.disposition.as_str(),
            now,
            row.body_version(),
        ])?;
        let id = self.last_insert_rowid();
        self.prepare_cached(INSERT_BODY)?
            .execute(params![id, stored_body::stored(row.body)])?;
        Ok(id)
    }

    fn holders(
        &mut self,
        resource_type: &str,
        time_key: &str,
        logical_id: &str,
    ) -> Result<Vec<Holder>, OutboxError> {
        let holders = self
            .prepare_cached(
                "SELECT s.destination, s.message_id, m.identifier_system, m.identifier_value,
                        (SELECT body FROM message_bodies WHERE message_id = m.id), m.disposition
                 FROM resource_state s JOIN messages m ON m.id = s.message_id
                 WHERE s.resource_type = ?1 AND s.time_key = ?2 AND s.logical_id = ?3
                 ORDER BY s.destination",
            )?
            .query_map(params![resource_type, time_key, logical_id], |row| {
                Ok(Holder {
                    destination: row.get(0)?,
                    message_id: row.get(1)?,
                    identifier_system: row.get(2)?,
                    identifier_value: row.get(3)?,
                    body: row.get(4)?,
                    disposition: Disposition::parse(&row.get::<_, String>(5)?),
                })
            })?
            .collect::<Result<Vec<Holder>, _>>()?;
        holders
            .into_iter()
            .map(|h| {
                Ok(Holder {
                    body: stored_body::read(h.body)?,
                    ..h
                })
            })
            .collect()
    }

    fn restating(
        &mut self,
        message_id: i64,
    ) -> Result<(String, Vec<u8>, Disposition), OutboxError> {
        let (system, body, disposition): (String, Vec<u8>, String) = self
            .prepare_cached(
                "SELECT identifier_system, (SELECT body FROM message_bodies WHERE message_id = id), disposition
                 FROM messages WHERE id = ?1",
            )?
            .query_row(params![message_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
        Ok((
            system,
            stored_body::read(body)?,
            Disposition::parse(&disposition),
        ))
    }

    fn keep_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
        value: Option<&str>,
    ) -> Result<(), OutboxError> {
        self.prepare_cached(
            "INSERT INTO chart_values (destination, slot_logical_id, reading_ms, value)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (destination, slot_logical_id, reading_ms) DO UPDATE SET
                 retracted = CASE WHEN value IS excluded.value THEN retracted ELSE 0 END,
                 value = excluded.value",
        )?
        .execute(params![destination, slot_logical_id, reading_ms, value])?;
        Ok(())
    }

    fn chart_values(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<Vec<String>, OutboxError> {
        let values = self
            .prepare_cached(
                "SELECT value FROM chart_values
                 WHERE destination = ?1 AND slot_logical_id = ?2 AND value IS NOT NULL AND retracted = 0
                 ORDER BY reading_ms",
            )?
            .query_map(params![destination, slot_logical_id], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(values)
    }

    fn retract_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
    ) -> Result<bool, OutboxError> {
        let flagged = self
            .prepare_cached(
                "UPDATE chart_values SET retracted = 1
                 WHERE destination = ?1 AND slot_logical_id = ?2 AND reading_ms = ?3 AND retracted = 0",
            )?
            .execute(params![destination, slot_logical_id, reading_ms])?;
        Ok(flagged > 0)
    }

    fn chart_readings_left(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<u64, OutboxError> {
        let left: i64 = self
            .prepare_cached(
                "SELECT COUNT(*) FROM chart_values
                 WHERE destination = ?1 AND slot_logical_id = ?2 AND retracted = 0",
            )?
            .query_row(params![destination, slot_logical_id], |row| row.get(0))?;
        Ok(left as u64)
    }

    fn body_version(&mut self, id: i64) -> Result<Option<i64>, OutboxError> {
        Ok(self
            .prepare_cached("SELECT body_version FROM messages WHERE id = ?1")?
            .query_row(params![id], |row| row.get::<_, Option<i64>>(0))
            .optional()?
            .flatten())
    }

    fn make_due(&mut self, id: i64, at_ms: i64) -> Result<(), OutboxError> {
        self.prepare_cached(
            "UPDATE messages SET next_attempt_ms = ?2 WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![id, at_ms])?;
        Ok(())
    }

    fn settle(&mut self, id: i64, outcome: &Settle, now: i64) -> Result<(), OutboxError> {
        match outcome {
            Settle::Delivered { status, location } => self.prepare_cached(
                "UPDATE messages SET state = 'delivered', attempts = attempts + 1, settled_ms = ?2, status_line = ?3, location = ?4, last_error = NULL WHERE id = ?1 AND state = 'pending'",
            )?.execute(params![id, now, status, location])?,
            Settle::Retry { at_ms, error } => self.prepare_cached(
                "UPDATE messages SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1 AND state = 'pending'",
            )?.execute(params![id, at_ms, error])?,
            Settle::Postpone { at_ms, error } => self.prepare_cached(
                "UPDATE messages SET next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1 AND state = 'pending'",
            )?.execute(params![id, at_ms, error])?,
            Settle::Dead { error, outcome } => self.prepare_cached(
                "UPDATE messages SET state = 'dead', attempts = attempts + 1, settled_ms = ?2, last_error = ?3, outcome = ?4 WHERE id = ?1 AND state = 'pending'",
            )?.execute(params![id, now, error, outcome])?,
        };
        Ok(())
    }

    fn dead_letters(
        &mut self,
        id: Option<i64>,
        destination: Option<&str>,
    ) -> Result<Vec<Settled>, OutboxError> {
        let dead = self
            .prepare_cached(
                "SELECT id, resource_type, identifier_value, logical_id, destination
                 FROM messages INDEXED BY messages_dead WHERE state = 'dead' AND (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR destination = ?2)",
            )?
            .query_map(params![id, destination], settled_of)?
            .collect::<Result<_, _>>()?;
        Ok(dead)
    }

    fn make_pending_again(&mut self, id: i64, now: i64) -> Result<u64, OutboxError> {
        Ok(self
            .prepare_cached(
                "UPDATE messages SET state = 'pending', attempts = 0, next_attempt_ms = ?2, settled_ms = NULL
                 WHERE id = ?1",
            )?
            .execute(params![id, now])? as u64)
    }

    fn settled_before(
        &mut self,
        state: SettledState,
        before_ms: i64,
        limit: u64,
    ) -> Result<Vec<Settled>, OutboxError> {
        let sql = match state {
            SettledState::Delivered => {
                "SELECT id, resource_type, identifier_value, logical_id, destination
                 FROM messages INDEXED BY messages_delivered
                 WHERE state = 'delivered' AND settled_ms < ?1 LIMIT ?2"
            }
            SettledState::Dead => {
                "SELECT id, resource_type, identifier_value, logical_id, destination
                 FROM messages INDEXED BY messages_dead
                 WHERE state = 'dead' AND settled_ms < ?1 LIMIT ?2"
            }
        };
        let settled = self
            .prepare_cached(sql)?
            .query_map(params![before_ms, limit as i64], settled_of)?
            .collect::<Result<_, _>>()?;
        Ok(settled)
    }

    fn forget_state(&mut self, key: StateKey<'_>, message_id: i64) -> Result<(), OutboxError> {
        self.prepare_cached(
            "DELETE FROM resource_state WHERE resource_type = ?1 AND time_key = ?2 AND logical_id = ?3
                 AND destination = ?4 AND message_id = ?5",
        )?
        .execute(params![
            key.resource_type,
            key.time_key,
            key.logical_id,
            key.destination,
            message_id
        ])?;
        Ok(())
    }

    fn delete_message(&mut self, id: i64) -> Result<(), OutboxError> {
        self.prepare_cached("DELETE FROM message_bodies WHERE message_id = ?1")?
            .execute(params![id])?;
        self.prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute(params![id])?;
        Ok(())
    }

    fn forget_chart_values(&mut self, before_ms: i64, limit: u64) -> Result<(), OutboxError> {
        self.prepare_cached(
            "DELETE FROM chart_values WHERE (destination, slot_logical_id, reading_ms) IN
                 (SELECT destination, slot_logical_id, reading_ms FROM chart_values INDEXED BY chart_values_time
                  WHERE reading_ms < ?1 LIMIT ?2)",
        )?
        .execute(params![before_ms, limit as i64])?;
        Ok(())
    }

    fn forget_batches(&mut self, before_ms: i64) -> Result<(), OutboxError> {
        browse::purge(self, before_ms)?;
        Ok(())
    }

    fn vacuum(&mut self) -> Result<(u64, u64), OutboxError> {
        let free = |tx: &rusqlite::Transaction<'_>| -> rusqlite::Result<u64> {
            tx.query_row("PRAGMA freelist_count", [], |row| row.get::<_, i64>(0))
                .map(|pages| pages as u64)
        };
        let before = free(self)?;
        self.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
        let left = free(self)?;
        Ok((before - left, left))
    }
}

fn dead_letter_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let outcome: Option<String> = row.get(8)?;
    Ok(DeadLetter {
        message_id: row.get(0)?,
        batch_id: row.get(1)?,
        destination: row.get(2)?,
        resource_type: row.get(3)?,
        identifier: format!("{}|{}", row.get::<_, String>(4)?, row.get::<_, String>(5)?),
        attempts: row.get(6)?,
        error: row.get(7)?,
        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
        created_at_ms: row.get(9)?,
    })
}

const DEAD_COLUMNS: &str = "id, batch_id, destination, resource_type, identifier_system, identifier_value, attempts, last_error, outcome, created_ms";

/// Dead letters (of one destination or all), oldest first, read from their own index.
static DEAD_LETTERS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {DEAD_COLUMNS} FROM messages INDEXED BY messages_dead
         WHERE state = 'dead' AND (?1 IS NULL OR destination = ?1) ORDER BY id LIMIT ?2"
    )
});

impl Outbox for SqliteOutbox {
    fn enqueue(
        &self,
        batch: Batch,
        messages: Vec<NewMessage>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Vec<Enqueued>, OutboxError>> {
        self.writer.enqueue(batch, messages, provenance)
    }

    fn due(
        &self,
        destination: &str,
        now_ms: i64,
        limit: usize,
        in_flight: &std::collections::HashSet<i64>,
        from: i64,
    ) -> BoxFuture<Result<Due, OutboxError>> {
        let destination = destination.to_owned();
        // Those in flight past `from` (the only ones the scan can meet) are skipped here:
        // filtering them in SQL (a table-valued function over a bound list) re-planned the
        // statement on every call.
        let in_flight: std::collections::HashSet<i64> =
            in_flight.iter().copied().filter(|id| *id >= from).collect();
        let writer = self.writer.clone();
        self.read(move |conn| {
            let mut messages = Vec::new();
            let mut versions = Vec::new();
            // The first message passed over because it is not due (or waits for another).
            let mut parked = None;
            let mut examined = from - 1;
            {
                let mut due = conn.prepare_cached(&due_sql(&destination))?;
                let mut rows = due.query(params![now_ms, from])?;
                while messages.len() < limit {
                    let Some(row) = rows.next()? else { break };
                    let id = row.get(0)?;
                    examined = id;
                    if in_flight.contains(&id) {
                        continue;
                    }
                    if !row.get::<_, bool>(1)? {
                        parked.get_or_insert(id);
                        continue;
                    }
                    if let Some(version) = row.get::<_, Option<i64>>(8)? {
                        versions.push((id, version));
                    }
                    messages.push(Pending {
                        id,
                        resource_type: row.get(2)?,
                        logical_id: row.get(3)?,
                        identifier_system: row.get(4)?,
                        identifier_value: row.get(5)?,
                        body: Vec::new(),
                        attempts: row.get(6)?,
                        upsert: row.get(7)?,
                    });
                }
            }
            let mut body =
                conn.prepare_cached("SELECT body FROM message_bodies WHERE message_id = ?1")?;
            for message in &mut messages {
                message.body = stored_body::read(body.query_row([message.id], |row| row.get(0))?)?;
            }
            writer.hand_out(versions);
            Ok(Due {
                messages,
                resume_from: parked.unwrap_or(examined + 1),
            })
        })
    }

    fn rewinds(&self) -> u64 {
        self.writer.rewinds()
    }

    fn next_due(&self, destination: &str) -> BoxFuture<Result<Option<i64>, OutboxError>> {
        let destination = destination.to_owned();
        self.read(move |conn| {
            // The covering index answers the earliest time at once; only when that time has
            // come (so what is due waits behind a retrying predecessor) are the blocked ones
            // looked past, row by row.
            let earliest: Option<i64> = conn
                .prepare_cached(&earliest_due_sql(&destination))?
                .query_row([], |row| row.get(0))
                .optional()?
                .flatten();
            if earliest.is_none_or(|at| at > now_ms()) {
                return Ok(earliest);
            }
            Ok(conn
                .prepare_cached(&earliest_unblocked_sql(&destination))?
                .query_row([], |row| row.get::<_, Option<i64>>(0))
                .optional()?
                .flatten())
        })
    }

    fn settle(&self, outcomes: Vec<(i64, Settle)>) -> BoxFuture<Result<(), OutboxError>> {
        self.writer.settle(outcomes)
    }

    fn batch_status(&self, batch_id: &str) -> BoxFuture<Result<Vec<MessageStatus>, OutboxError>> {
        let batch_id = batch_id.to_owned();
        self.read(move |conn| {
            let mut query = conn.prepare_cached(
                "SELECT id, destination, resource_type, identifier_system, identifier_value, state, attempts, location, last_error, disposition
                 FROM messages WHERE batch_id = ?1 ORDER BY id",
            )?;
            let rows = query.query_map(params![batch_id], |row| {
                Ok(MessageStatus {
                    message_id: row.get(0)?,
                    destination: row.get(1)?,
                    resource_type: row.get(2)?,
                    identifier: format!("{}|{}", row.get::<_, String>(3)?, row.get::<_, String>(4)?),
                    disposition: Disposition::parse(&row.get::<_, String>(9)?),
                    state: row.get(5)?,
                    attempts: row.get(6)?,
                    location: row.get(7)?,
                    last_error: row.get(8)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn stats(&self) -> BoxFuture<Result<Vec<DestinationStats>, OutboxError>> {
        self.read(|conn| {
            let now = now_ms();
            let mut query = conn.prepare_cached(
                "SELECT destination, COUNT(*),
                        SUM(state = 'delivered'), SUM(state = 'dead'), SUM(state = 'pending'),
                        MIN(CASE WHEN state = 'pending' THEN created_ms END)
                 FROM messages GROUP BY destination ORDER BY destination",
            )?;
            let rows = query.query_map([], |row| {
                let oldest: Option<i64> = row.get(5)?;
                Ok(DestinationStats {
                    destination: row.get(0)?,
                    accepted: row.get::<_, i64>(1)? as u64,
                    delivered: row.get::<_, i64>(2)? as u64,
                    dead: row.get::<_, i64>(3)? as u64,
                    pending: row.get::<_, i64>(4)? as u64,
                    oldest_pending_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1000.0),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn queue_depths(&self) -> BoxFuture<Result<Vec<super::QueueDepth>, OutboxError>> {
        self.read(|conn| {
            let now = now_ms();
            let pending = conn
                .prepare_cached(
                    &super::PENDING_DEPTHS_SQL
                        .replace("{indexed_by}", "INDEXED BY messages_pending"),
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let dead = conn
                .prepare_cached(
                    &super::DEAD_DEPTHS_SQL.replace("{indexed_by}", "INDEXED BY messages_dead"),
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(super::queue_depths_of(pending, dead, now))
        })
    }

    fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DeadLetter>, OutboxError>> {
        let destination = destination.map(str::to_owned);
        self.read(move |conn| {
            let mut query = conn.prepare_cached(&DEAD_LETTERS)?;
            let rows = query.query_map(params![destination, limit as i64], dead_letter_of)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn dead_letter(&self, message_id: i64) -> BoxFuture<Result<Option<DeadLetter>, OutboxError>> {
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    &format!(
                        "SELECT {DEAD_COLUMNS} FROM messages WHERE state = 'dead' AND id = ?1"
                    ),
                    params![message_id],
                    dead_letter_of,
                )
                .optional()?)
        })
    }

    fn replay(
        &self,
        message_id: Option<i64>,
        destination: Option<&str>,
    ) -> BoxFuture<Result<u64, OutboxError>> {
        self.writer.replay(message_id, destination)
    }

    fn retract(
        &self,
        batch: Batch,
        resources: Vec<Retraction>,
        provenance: Option<ProvenancePlan>,
    ) -> BoxFuture<Result<Placements, OutboxError>> {
        self.writer.retract(batch, resources, provenance)
    }

    fn purge(&self, retention: Retention) -> BoxFuture<Result<Purged, OutboxError>> {
        self.writer.purge(retention)
    }

    fn search(
        &self,
        query: browse::MessageQuery,
    ) -> BoxFuture<Result<Vec<browse::MessageSummary>, OutboxError>> {
        self.read(move |conn| browse::search(conn, &query))
    }

    fn message(
        &self,
        message_id: i64,
    ) -> BoxFuture<Result<Option<browse::MessageDetail>, OutboxError>> {
        self.read(move |conn| browse::message(conn, message_id))
    }

    fn run_readings(
        &self,
        run_id: &str,
        limit: usize,
    ) -> BoxFuture<Result<Vec<browse::RunReading>, OutboxError>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| browse::run_readings(conn, &run_id, limit))
    }

    fn commits(&self) -> u64 {
        self.writer.commits()
    }

    fn notifier(&self, destination: &str) -> Arc<Notify> {
        self.writer.notifier(destination)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::outbox::behaviour::{
        dispositions, due_at, engine_tests, ids, incompressible, message, reading, retention,
        three_for_ehr,
    };

    async fn fresh() -> (Arc<dyn Outbox>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let outbox: Arc<dyn Outbox> = SqliteOutbox::open(&dir.path().join("o.sqlite")).unwrap();
        (outbox, dir)
    }

    engine_tests!(fresh());

    /// The scan cursor is SQLite's own: its one writer takes ids in commit order (the
    /// PostgreSQL outbox always scans from the oldest pending message).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn due_resumes_after_what_is_in_flight_and_from_what_it_passed_over() {
        let (outbox, _dir) = fresh().await;
        crate::outbox::behaviour::due_resumes_after_what_is_in_flight_and_from_what_it_passed_over(
            outbox,
        )
        .await;
    }

    /// SQLite plans a cached statement again on every use when its plan depends on a bound
    /// value (rusqlite clears the bindings of a statement going back to its cache, and SQLite
    /// then expires it): a LEFT JOIN on bound constants did, and re-parsing that statement per
    /// resource cost a fifth of the gateway's CPU. The statements run per resource, used as the
    /// writer uses them, keep one plan; so do delivery's reads, run per bundle, which name
    /// their destination as a literal (see [`sql_literal`]).
    #[test]
    fn the_statements_run_per_resource_are_planned_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let mut writer = open(&path).unwrap();
        writer.execute_batch(SCHEMA).unwrap();
        for round in 0..5 {
            let mut tx = writer.transaction().unwrap();
            for n in 0..3 {
                run_cached(&tx, "SAVEPOINT command").unwrap();
                writes::enqueue_one(&mut tx, "b", &reading("ehr", round * 10 + n, "{}"), 0)
                    .unwrap();
                // A correction of the one before: an amendment with a predecessor.
                let changed = reading("ehr", round * 10 + n, r#"{"changed":true}"#);
                writes::enqueue_one(&mut tx, "b", &changed, 0).unwrap();
                run_cached(&tx, "RELEASE command").unwrap();
            }
            tx.commit().unwrap();
        }
        for (name, conn, sql) in [
            ("PRIOR", &writer, PRIOR),
            ("INSERT_MESSAGE", &writer, INSERT_MESSAGE),
            ("INSERT_BODY", &writer, INSERT_BODY),
            ("UPSERT_STATE", &writer, UPSERT_STATE),
        ] {
            let statement = conn.prepare_cached(sql).unwrap();
            assert_eq!(
                statement.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{name} was planned again"
            );
        }
        // Delivery's reads, as `due` and `next_due` make them, on a second connection.
        let reader = open(&path).unwrap();
        for now in 0..5 {
            let mut due = reader.prepare_cached(&due_sql("ehr")).unwrap();
            let mut rows = due.query(params![now, 1]).unwrap();
            while rows.next().unwrap().is_some() {}
            drop(rows);
            drop(due);
            for sql in [earliest_due_sql("ehr"), earliest_unblocked_sql("ehr")] {
                reader
                    .prepare_cached(&sql)
                    .unwrap()
                    .query_row([], |row| row.get::<_, Option<i64>>(0))
                    .unwrap();
            }
        }
        for (name, sql) in [
            ("due", due_sql("ehr")),
            ("earliest due", earliest_due_sql("ehr")),
            ("earliest unblocked", earliest_unblocked_sql("ehr")),
        ] {
            let statement = reader.prepare_cached(&sql).unwrap();
            assert_eq!(
                statement.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{name} was planned again"
            );
        }
    }

    /// The queries of delivery and of the admin API read the partial indexes, not the table.
    #[test]
    fn delivery_and_dead_letter_queries_use_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("outbox.sqlite")).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (sql, index) in [
            (due_sql("ehr"), "messages_pending"),
            (
                earliest_due_sql("ehr"),
                "COVERING INDEX messages_pending_due",
            ),
            (DEAD_LETTERS.clone(), "messages_dead"),
            (COUNT_PENDING.to_owned(), "INDEX messages_pending"),
        ] {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            // Unbound parameters are NULL: the plan does not depend on them.
            let mut rows = explain.raw_query();
            let mut plan: Vec<String> = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                plan.push(row.get(3).unwrap());
            }
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{sql}: {plan:?}"
            );
        }
    }

    /// The schema of the releases before bodies got their own table and the resource state
    /// its time key.
    const SCHEMA_BEFORE_TIME_KEYS: &str = "
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, batch_id TEXT NOT NULL,
            destination TEXT NOT NULL, resource_type TEXT NOT NULL, logical_id TEXT NOT NULL,
            identifier_system TEXT NOT NULL, identifier_value TEXT NOT NULL, body BLOB NOT NULL,
            upsert INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL,
            created_ms INTEGER NOT NULL, settled_ms INTEGER, status_line TEXT, location TEXT,
            last_error TEXT, outcome TEXT, predecessor INTEGER,
            disposition TEXT NOT NULL DEFAULT 'created');
        CREATE TABLE resource_state (
            destination TEXT NOT NULL, resource_type TEXT NOT NULL, logical_id TEXT NOT NULL,
            content_hash BLOB NOT NULL, revision INTEGER, message_id INTEGER NOT NULL,
            PRIMARY KEY (destination, resource_type, logical_id)) WITHOUT ROWID;
        CREATE INDEX messages_queue ON messages(destination, state, id);
        CREATE INDEX messages_due ON messages(destination, state, next_attempt_ms);
        CREATE INDEX messages_batch ON messages(batch_id);";

    #[tokio::test]
    async fn an_outbox_of_the_earlier_schema_keeps_its_messages_and_what_each_destination_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let body = r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":1}}"#;
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA_BEFORE_TIME_KEYS).unwrap();
            old.execute(
                "INSERT INTO messages (batch_id, destination, resource_type, logical_id,
                     identifier_system, identifier_value, body, next_attempt_ms, created_ms)
                 VALUES ('b0', 'ehr', 'Observation', 'id1', 's', 'dev:CH-1:flow:20261121T101500.000Z', ?1, 0, 0)",
                params![body.as_bytes()],
            )
            .unwrap();
            old.execute(
                "INSERT INTO resource_state (destination, resource_type, logical_id, content_hash, message_id)
                 VALUES ('ehr', 'Observation', 'id1', ?1, 1)",
                params![&super::super::content_hash(body.as_bytes())[..]],
            )
            .unwrap();
        }
        let outbox = SqliteOutbox::open(&path).unwrap();
        let due = due_at(&*outbox, now_ms(), &[]).await;
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].body, body.as_bytes());
        let same = NewMessage {
            identifier_value: "dev:CH-1:flow:20261121T101500.000Z".into(),
            ..reading("ehr", 1, body)
        };
        let resent = outbox
            .enqueue("b1".into(), vec![same.clone()], None)
            .await
            .unwrap();
        assert_eq!(dispositions(&resent), ["unchanged"]);
        let changed = NewMessage {
            body: body.replace("1}", "2}").into_bytes(),
            content_hash: super::super::content_hash(body.replace("1}", "2}").as_bytes()),
            ..same
        };
        let corrected = outbox
            .enqueue("b2".into(), vec![changed], None)
            .await
            .unwrap();
        assert_eq!(dispositions(&corrected), ["amended"]);
        // The correction waits for the message it corrects.
        let due = due_at(&*outbox, now_ms(), &[]).await;
        assert_eq!(due.iter().map(|p| p.id).collect::<Vec<_>>(), [1]);
    }

    /// Under writes that never pause, the WAL stays bounded: the checkpoints catch up with the
    /// writer and the WAL starts again from its beginning, cut back to `WAL_KEPT_BYTES` (a WAL
    /// that grows by everything written makes every commit write to new file pages).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_starts_again_under_writes_that_never_pause() {
        // The disk's latency as the metrics show it (process-wide: other tests add to it).
        let observed = |series: &str| -> u64 {
            let text = crate::metrics::metrics().render();
            text.lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or(0)
        };
        let commits = "ecmo_outbox_commit_duration_seconds_count ";
        let passive = "ecmo_outbox_checkpoint_duration_seconds_count{mode=\"passive\"} ";
        let (commits_before, passive_before) = (observed(commits), observed(passive));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        let outbox = SqliteOutbox::open(&path).unwrap();
        let wal = dir.path().join("outbox.sqlite-wal");
        let body = format!(r#"{{"pad":"{}"}}"#, incompressible(5000));
        let written_bytes = 5 * CHECKPOINT_PAGES as usize * 4096;
        let (writers, batches, per_batch) = (16, 20, written_bytes / (16 * 20 * body.len()) + 1);
        let largest = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let (outbox, body, wal, largest) =
                    (outbox.clone(), body.clone(), wal.clone(), largest.clone());
                tokio::spawn(async move {
                    for b in 0..batches {
                        let messages = (0..per_batch)
                            .map(|n| reading("ehr", (w * batches + b) * per_batch + n, &body))
                            .collect();
                        outbox
                            .enqueue(format!("b{w}-{b}").into(), messages, None)
                            .await
                            .unwrap();
                        let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
                        largest.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let largest = largest.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            largest < written_bytes as u64 * 3 / 5,
            "the WAL grew to {largest} bytes for {written_bytes} written"
        );
        let pending: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM messages", [], |row| row.get(0))
            .unwrap();
        assert_eq!(pending as usize, writers * batches * per_batch);
        assert!(observed(commits) > commits_before);
        assert!(observed(passive) > passive_before);
    }

    /// At the limit of undelivered messages a new request is refused, nothing of it stored;
    /// once delivery has caught up (counted again) requests are taken again.
    #[tokio::test]
    async fn a_full_outbox_refuses_new_requests_until_delivery_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = SqliteOutbox::open(&dir.path().join("outbox.sqlite")).unwrap();
        outbox.set_pending_limit(2);
        let first = ids(outbox
            .enqueue(
                "b1".into(),
                vec![message("ehr", 0), message("ehr", 1)],
                None,
            )
            .await
            .unwrap());
        let recount = |outbox: &SqliteOutbox| {
            let n = count_pending(&outbox.reader.lock().unwrap()).unwrap();
            outbox
                .writer
                .pending
                .store(n, std::sync::atomic::Ordering::Relaxed);
        };
        recount(&outbox);
        match outbox
            .enqueue("b2".into(), vec![message("ehr", 2)], None)
            .await
        {
            Err(OutboxError::Full {
                pending: 2,
                limit: 2,
            }) => {}
            other => panic!("{other:?}"),
        }
        let delivered = Settle::Delivered {
            status: "201 Created".into(),
            location: None,
        };
        outbox.settle(vec![(first[0], delivered)]).await.unwrap();
        recount(&outbox);
        outbox
            .enqueue("b3".into(), vec![message("ehr", 2)], None)
            .await
            .unwrap();
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            (stats[0].accepted, stats[0].pending),
            (3, 2),
            "b2 stored nothing"
        );
    }

    #[tokio::test]
    async fn accepted_messages_survive_reopening_and_counts_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.sqlite");
        {
            let outbox = SqliteOutbox::open(&path).unwrap();
            let ids = three_for_ehr(&*outbox, "b1").await;
            assert_eq!(ids.len(), 3);
            outbox
                .settle(vec![
                    (
                        ids[0],
                        Settle::Delivered {
                            status: "201 Created".into(),
                            location: Some("Observation/1/_history/1".into()),
                        },
                    ),
                    (
                        ids[1],
                        Settle::Dead {
                            error: "422".into(),
                            outcome: Some("{\"resourceType\":\"OperationOutcome\"}".into()),
                        },
                    ),
                ])
                .await
                .unwrap();
        }
        let outbox = SqliteOutbox::open(&path).unwrap();
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            (
                stats[0].accepted,
                stats[0].delivered,
                stats[0].dead,
                stats[0].pending
            ),
            (3, 1, 1, 1)
        );
        let due = due_at(&*outbox, now_ms(), &[]).await;
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].identifier_value, "v2");
        let dead = outbox.dead_letters(None, 10).await.unwrap();
        assert_eq!(
            dead[0].outcome.as_ref().unwrap()["resourceType"],
            "OperationOutcome"
        );
        assert_eq!(
            outbox.replay(Some(dead[0].message_id), None).await.unwrap(),
            1
        );
        assert_eq!(due_at(&*outbox, now_ms(), &[]).await.len(), 2);
        let status = outbox.batch_status("b1").await.unwrap();
        assert_eq!(status[0].state, "delivered");
        assert_eq!(
            status[0].location.as_deref(),
            Some("Observation/1/_history/1")
        );
    }

    /// A writer held back (here by another connection's write lock, as a slow disk would) lets
    /// its queue fill to the bound; the next request is refused at once with `Busy` and
    /// nothing of it is stored, while what was queued is committed once the writer goes on.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_full_writer_queue_refuses_requests_and_keeps_what_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let outbox = SqliteOutbox::open_with_queue(&path, 4).unwrap();
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut queued = Vec::new();
        let mut refused = None;
        for n in 0..20 {
            // The writer takes the first command off the queue and waits for the lock.
            let mut enqueue = outbox.enqueue(format!("b{n}").into(), vec![message("ehr", n)], None);
            match tokio::time::timeout(std::time::Duration::from_millis(30), &mut enqueue).await {
                Ok(Err(OutboxError::Busy)) => {
                    refused = Some(n);
                    break;
                }
                Ok(other) => panic!("{n}: {:?}", other.map(|_| ())),
                Err(_) => queued.push(enqueue),
            }
        }
        let refused = refused.expect("the queue has a bound");
        assert!((4..=6).contains(&refused), "refused at {refused}");
        blocker.execute_batch("COMMIT").unwrap();
        for enqueue in queued {
            enqueue.await.unwrap();
        }
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            stats[0].accepted, refused as u64,
            "the refused one is not stored"
        );
    }

    /// A group commit is tried whole, without a savepoint per command; a command of it that
    /// fails (a correction its destination refuses) is answered alone, nothing of it stored,
    /// and the commands around it in the same group are committed.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_failing_command_fails_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let outbox = SqliteOutbox::open(&path).unwrap();
        let strict = |n, body| NewMessage {
            corrections: crate::config::Corrections::Reject,
            ..reading("strict", n, body)
        };
        outbox
            .enqueue("b0".into(), vec![strict(1, r#"{"v":1}"#)], None)
            .await
            .unwrap();
        // Held back by another connection's write lock, the writer cannot commit until all
        // four are queued (an enqueue is queued when it is called): the refused one shares a
        // group with at least one of the others, whichever way the writer groups them.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let before = outbox.commits();
        let first = tokio::spawn(outbox.enqueue("b1".into(), vec![message("ehr", 1)], None));
        let good = tokio::spawn(outbox.enqueue("b2".into(), vec![message("ehr", 2)], None));
        let refused = tokio::spawn(outbox.enqueue(
            "b3".into(),
            vec![message("ehr", 3), strict(1, r#"{"v":9}"#)],
            None,
        ));
        let after = tokio::spawn(outbox.enqueue("b4".into(), vec![message("ehr", 4)], None));
        blocker.execute_batch("COMMIT").unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(dispositions(&good.await.unwrap().unwrap()), ["created"]);
        assert_eq!(dispositions(&after.await.unwrap().unwrap()), ["created"]);
        match refused.await.unwrap() {
            Err(OutboxError::CorrectionsRefused(which)) => {
                assert_eq!(which, [(1, "strict".to_owned())])
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(
            outbox.commits() - before <= 2,
            "the first command alone or with the others, then the others in one group"
        );
        assert!(outbox.batch_status("b3").await.unwrap().is_empty());
        for batch in ["b2", "b4"] {
            assert_eq!(outbox.batch_status(batch).await.unwrap().len(), 1);
        }
    }

    /// A reading's Observation is kept compressed (a fraction of its bytes on disk) and
    /// handed to delivery, and to a correction's restatement, as it was given.
    #[tokio::test]
    async fn bodies_are_kept_compressed_and_read_back_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let outbox = SqliteOutbox::open(&path).unwrap();
        let body = r#"{"resourceType":"Observation","id":"0193a3f0-7c1e-7d42-9b1a-5f0e2c8d4a11","meta":{"profile":["https://fhir.ecmo-gateway.org/StructureDefinition/ecmo-observation"]},"identifier":[{"system":"https://fhir.ecmo-gateway.org/sid/observation","value":"getinge-cardiohelp:CH-0042:pump-blood-flow:20261121T081500.250Z"}],"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"procedure"}]}],"effectiveDateTime":"2026-11-21T08:15:00.250Z","valueQuantity":{"value":4.21,"unit":"L/min","system":"http://unitsofmeasure.org","code":"L/min"}}"#;
        outbox
            .enqueue("b1".into(), vec![reading("ehr", 1, body)], None)
            .await
            .unwrap();
        let on_disk: Vec<u8> = Connection::open(&path)
            .unwrap()
            .query_row("SELECT body FROM message_bodies", [], |row| row.get(0))
            .unwrap();
        assert!(
            on_disk.len() * 3 < body.len(),
            "{} bytes kept for {}",
            on_disk.len(),
            body.len()
        );
        let due = due_at(&*outbox, now_ms(), &[]).await;
        assert_eq!(due[0].body, body.as_bytes());
        let changed = body.replace("4.21", "4.3");
        let corrected = outbox
            .enqueue(
                "b2".into(),
                vec![NewMessage {
                    body: changed.clone().into_bytes(),
                    content_hash: super::super::content_hash(changed.as_bytes()),
                    ..reading("ehr", 1, body)
                }],
                None,
            )
            .await
            .unwrap();
        assert_eq!(dispositions(&corrected), ["amended"]);
        let message = outbox.message(due[0].id).await.unwrap().unwrap();
        assert_eq!(
            message.resource["valueQuantity"]["value"].to_string(),
            "4.21"
        );
    }

    /// Retention gives the space back: after the purge and a checkpoint the file is smaller.
    #[tokio::test]
    async fn purge_shrinks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.sqlite");
        let outbox = SqliteOutbox::open(&path).unwrap();
        let body = format!(
            r#"{{"resourceType":"Observation","status":"final","note":"{}"}}"#,
            incompressible(3000)
        );
        let mut all = Vec::new();
        for batch in 0..20 {
            let enqueued = outbox
                .enqueue(
                    format!("b{batch}").into(),
                    (0..100)
                        .map(|n| reading("ehr", batch * 100 + n, &body))
                        .collect(),
                    None,
                )
                .await
                .unwrap();
            all.extend(ids(enqueued));
        }
        outbox
            .settle(
                all.iter()
                    .map(|&id| {
                        (
                            id,
                            Settle::Delivered {
                                status: "201".into(),
                                location: None,
                            },
                        )
                    })
                    .collect(),
            )
            .await
            .unwrap();
        let file_size = || {
            // What a checkpoint leaves in the database file (the test's own connection, as
            // the checkpointer may be mid-pass).
            let conn = Connection::open(&path).unwrap();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
            std::fs::metadata(&path).unwrap().len()
        };
        let full = file_size();
        assert!(full > 4_000_000, "{full} bytes");
        let later = now_ms() + 1000;
        let purged = outbox.purge(retention(later, later)).await.unwrap();
        assert_eq!(purged.delivered, 2000);
        assert!(purged.pages_freed > 900, "{purged:?}");
        let shrunk = file_size();
        assert!(shrunk < full / 4, "{full} -> {shrunk} bytes");
    }
}
