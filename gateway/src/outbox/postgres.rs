//! The outbox on a PostgreSQL server, for deployments that outgrow one gateway process or
//! keep their data on a managed database (README, "Choosing the store").
//!
//! The same tables and the same decisions as the embedded SQLite outbox ([`super::writes`]):
//! one writer thread per gateway applies whatever has queued up while the previous commit was
//! being made durable, in one transaction (group commit, `synchronous_commit` as the server
//! has it, `on` by default), and answers each caller only after that commit. Reads (delivery,
//! status, the browser) go through a small pool of asynchronous connections.
//!
//! While the server cannot be reached, writes fail at once with a storage error (a vendor
//! gets 503 with Retry-After and sends again; a resend of what was committed is recognised as
//! unchanged), and the writer connects again at most once a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use postgres::types::ToSql;
use tokio::sync::{Notify, mpsc};

use super::browse::{self, Dialect, MessageDetail, MessageQuery, MessageSummary, RunReading};
use super::stored_body;
use super::writes::{
    self, Applied, Command, Holder, MAX_GROUP, MessageRow, Prior, Settled, SettledState, StateKey,
    WRITER_QUEUE, WriteTx, Writer,
};
use super::{
    Batch, BatchFacts, DeadLetter, DestinationStats, Disposition, Due, Enqueued, MessageStatus,
    NOT_BLOCKED, NewMessage, Outbox, OutboxError, Pending, Placements, ProvenancePlan, Purged,
    Retention, Retraction, Settle, now_ms,
};
use crate::delivery::BoxFuture;

/// The migrations in `gateway/migrations/postgres`, in order: (version, name, SQL).
const MIGRATIONS: [(i32, &str, &str); 3] = [
    (
        1,
        "0001_outbox",
        include_str!("../../migrations/postgres/0001_outbox.sql"),
    ),
    (
        2,
        "0002_delivery_claims",
        include_str!("../../migrations/postgres/0002_delivery_claims.sql"),
    ),
    (
        3,
        "0003_run_events",
        include_str!("../../migrations/postgres/0003_run_events.sql"),
    ),
];

/// Held while migrations run, so that replicas starting together apply each once.
const MIGRATION_LOCK: i64 = 0x6563_6d6f_0001;

/// Connections for reads (delivery workers, status look-ups, the browser).
const READ_CONNECTIONS: usize = 4;

/// How long connecting may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed connection, writes fail at once for this long before the writer tries again.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// How often the undelivered messages are counted (see [`PostgresOutbox::set_pending_limit`]).
const CENSUS_EVERY: Duration = Duration::from_secs(1);

/// How long a replica's claim on the messages it is sending lasts; it is extended every
/// third of it while the replica lives, so another replica takes over the messages of
/// one that died within this time.
pub const CLAIM_LEASE: Duration = Duration::from_secs(30);

/// How the gateway connects to PostgreSQL: TLS (rustls) with the configured CA, or, without
/// one, plain TCP (the connection's `ssl_mode` is `disable` then, so this is not used).
pub type PostgresTls = tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS to connect with: trusting the certificates in `ca` (PEM), or nothing.
pub fn tls(ca: Option<&std::path::Path>) -> Result<PostgresTls, String> {
    use rustls_pki_types::pem::PemObject;
    crate::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate", ca.display()));
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Plans every statement for the values it runs with. The outbox's tables grow from nothing
/// to millions of rows in minutes and empty again with retention: a generic plan made once
/// per connection while a table was small scans the whole table later (measured: a claim of
/// due messages at 53 ms a call, a seq scan, instead of an index lookup).
pub fn with_custom_plans(config: &mut tokio_postgres::Config) {
    let options = match config.get_options() {
        Some(existing) => format!("{existing} -c plan_cache_mode=force_custom_plan"),
        None => "-c plan_cache_mode=force_custom_plan".to_owned(),
    };
    config.options(options);
}

/// One connection to the configured server, as `gateway check-config` makes it: over what it
/// connected, the server's version and the outbox schema it holds.
pub async fn probe(settings: &crate::config::PostgresSettings) -> Result<String, String> {
    let (mut config, tls) = settings.connection()?;
    config.connect_timeout(CONNECT_TIMEOUT);
    let over = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Require => "TLS",
        _ => "plain TCP",
    };
    let (client, connection) = config.connect(tls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    let schema: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .ok()
        .and_then(|row| row.get(0));
    Ok(format!(
        "reachable over {over}, PostgreSQL {version}, outbox schema {}",
        schema.map_or_else(
            || "not made yet (made at start)".to_owned(),
            |v| format!("{v} of {}", MIGRATIONS.len())
        )
    ))
}

impl From<postgres::Error> for OutboxError {
    fn from(e: postgres::Error) -> Self {
        Self::Storage(format!("postgres: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for OutboxError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Storage(format!("postgres: {e}"))
    }
}

pub struct PostgresOutbox {
    writer: Arc<Writer>,
    pool: deadpool_postgres::Pool,
    /// This process among the replicas sharing the store: what its claims are made as.
    replica: Arc<str>,
    /// How long its claims last unless extended ([`CLAIM_LEASE`]).
    claim_lease: Duration,
}

impl PostgresOutbox {
    /// Connects to the server `config` names, brings its schema up to date and starts the
    /// writer. Pending messages from before a crash (of this or another replica) are kept.
    ///
    /// `replica` names this process among those sharing the store: unique to it, and the same
    /// again after a restart, so that a restarted replica takes back at once the messages it
    /// was sending when it stopped (another replica waits for their claims to run out).
    /// Its claims on the messages it sends last `claim_lease`, extended every third of it
    /// while it lives ([`CLAIM_LEASE`] by default): how long another replica waits before it
    /// takes over the messages of one that died.
    pub async fn open(
        mut config: tokio_postgres::Config,
        tls: PostgresTls,
        replica: &str,
        claim_lease: Duration,
    ) -> Result<Arc<Self>, OutboxError> {
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("ecmo-gateway");
        with_custom_plans(&mut config);
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(READ_CONNECTIONS)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| OutboxError::Storage(format!("postgres: {e}")))?;
        {
            let mut client = pool.get().await?;
            migrate(&mut client).await?;
        }
        let pending = Arc::new(AtomicU64::new(count_pending(&pool).await?));
        let (queue, commands) = mpsc::channel(WRITER_QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let connect = Connector::new(config, tls);
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || write_loop(connect, commands, &counter))
            .map_err(|e| OutboxError::Storage(e.to_string()))?;
        let replica: Arc<str> = replica.into();
        tracing::info!(replica = %replica, "outbox on PostgreSQL");
        let outbox = Arc::new(Self {
            writer: Arc::new(Writer::new(queue, commits, pending)),
            pool,
            replica,
            claim_lease,
        });
        tokio::spawn(census_loop(Arc::downgrade(&outbox)));
        tokio::spawn(renew_claims_loop(Arc::downgrade(&outbox)));
        Ok(outbox)
    }

    /// Refuses new requests ([`OutboxError::Full`]) while `limit` or more messages are
    /// undelivered.
    pub fn set_pending_limit(&self, limit: u64) {
        self.writer.set_pending_limit(limit);
    }
}

/// Applies the migrations not yet applied, in one transaction, under an advisory lock.
async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), OutboxError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tracing::info!(migration = name, "outbox schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

const COUNT_PENDING: &str = "SELECT COUNT(*) FROM messages WHERE state = 'pending'";

async fn count_pending(pool: &deadpool_postgres::Pool) -> Result<u64, OutboxError> {
    let client = pool.get().await?;
    let statement = client.prepare_cached(COUNT_PENDING).await?;
    Ok(client.query_one(&statement, &[]).await?.get::<_, i64>(0) as u64)
}

/// Counts the undelivered messages every [`CENSUS_EVERY`] until the outbox is dropped.
async fn census_loop(outbox: Weak<PostgresOutbox>) {
    loop {
        tokio::time::sleep(CENSUS_EVERY).await;
        let Some(outbox) = outbox.upgrade() else {
            return;
        };
        match count_pending(&outbox.pool).await {
            Ok(n) => outbox.writer.pending.store(n, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "outbox census failed; the next one will retry"),
        }
    }
}

/// Extends this replica's claims every third of their lease until the outbox is dropped.
async fn renew_claims_loop(outbox: Weak<PostgresOutbox>) {
    loop {
        let Some(every) = outbox.upgrade().map(|o| o.claim_lease / 3) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(outbox) = outbox.upgrade() else {
            return;
        };
        let renewed = async {
            let client = outbox.pool.get().await?;
            let statement = client
                .prepare_cached(
                    "UPDATE messages SET claimed_until_ms = $2
                     WHERE claimed_by = $1 AND state = 'pending'",
                )
                .await?;
            let until = now_ms() + outbox.claim_lease.as_millis() as i64;
            client
                .execute(&statement, &[&&*outbox.replica, &until])
                .await?;
            Ok::<_, OutboxError>(())
        };
        if let Err(e) = renewed.await {
            tracing::warn!(error = %e, "could not extend the outbox's delivery claims; the next attempt will retry");
        }
    }
}

/// The writer's connection, made again after the server went away, at most once per
/// [`RECONNECT_EVERY`].
struct Connector {
    config: postgres::Config,
    tls: PostgresTls,
    client: Option<postgres::Client>,
    /// Prepared on `client`, by SQL text.
    statements: HashMap<&'static str, postgres::Statement>,
    next_attempt: Instant,
}

impl Connector {
    fn new(config: tokio_postgres::Config, tls: PostgresTls) -> Self {
        Self {
            config: config.into(),
            tls,
            client: None,
            statements: HashMap::new(),
            next_attempt: Instant::now(),
        }
    }

    /// The connection and its prepared statements, connected again if it was lost; `Err`
    /// while the server is unreachable.
    #[allow(clippy::type_complexity)]
    fn connected(
        &mut self,
    ) -> Result<
        (
            &mut postgres::Client,
            &mut HashMap<&'static str, postgres::Statement>,
        ),
        OutboxError,
    > {
        if self
            .client
            .as_ref()
            .is_some_and(postgres::Client::is_closed)
        {
            tracing::warn!("outbox lost its PostgreSQL connection; connecting again");
            self.client = None;
        }
        if self.client.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(OutboxError::Storage(
                    "postgres: the server cannot be reached".into(),
                ));
            }
            self.statements.clear();
            match self.config.connect(self.tls.clone()) {
                Ok(client) => self.client = Some(client),
                Err(e) => {
                    self.next_attempt = Instant::now() + RECONNECT_EVERY;
                    return Err(e.into());
                }
            }
        }
        match self.client.as_mut() {
            Some(client) => Ok((client, &mut self.statements)),
            None => Err(OutboxError::Storage("postgres: not connected".into())),
        }
    }
}

/// The writer thread: take one command, then everything already queued, commit once.
fn write_loop(
    mut connector: Connector,
    mut commands: mpsc::Receiver<Command>,
    commits: &AtomicU64,
) {
    while let Some(first) = commands.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match commands.try_recv() {
                Ok(command) => group.push(command),
                Err(_) => break,
            }
        }
        let results = commit_group(&mut connector, &group);
        commits.fetch_add(1, Ordering::Relaxed);
        // Answer only after the commit (or its failure): that is the durability promise.
        writes::answer(group, results);
    }
}

fn commit_group(connector: &mut Connector, group: &[Command]) -> Vec<Result<Applied, OutboxError>> {
    let (client, statements) = match connector.connected() {
        Ok(connected) => connected,
        Err(e) => return writes::failed(group, &e),
    };
    let tx = match client.transaction() {
        Ok(tx) => tx,
        Err(e) => return writes::failed(group, &OutboxError::from(e)),
    };
    let mut tx = PgTx {
        tx,
        statements,
        priors: HashMap::new(),
        unsent_states: HashMap::new(),
        unsent_messages: Vec::new(),
        ids: std::collections::VecDeque::new(),
    };
    // Savepoints are statements of the server's (pipelined with the command's), not page
    // copies of this process: every command in its own.
    let results = match writes::apply_group(&mut tx, group, writes::Isolation::PerCommand) {
        Ok(Some(results)) => results,
        Ok(None) => unreachable!("a group applied per command answers every command"),
        Err(e) => return writes::failed(group, &e),
    };
    if let Err(e) = tx.tx.commit() {
        // The outcome of a commit whose connection broke is unknown: the caller hears of a
        // failure and sends again, and a resend of what was stored is unchanged.
        return writes::failed(group, &OutboxError::from(e));
    }
    results
}

/// A transaction of the writer's, with its connection's prepared statements.
///
/// Within one command it saves round trips to the server: the locks and states of an enqueue's
/// resources are taken and read in two statements ([`WriteTx::will_enqueue`]), its messages
/// get ids taken from the sequence beforehand, and the messages and states it writes are sent
/// in two statements when the command ends, or before any other statement (which may read
/// them).
struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    statements: &'a mut HashMap<&'static str, postgres::Statement>,
    /// What each destination was last given, as this command read or wrote it.
    priors: HashMap<OwnedKey, Option<Prior>>,
    /// States this command wrote, not yet sent: content hash, revision, message id.
    unsent_states: HashMap<OwnedKey, (Vec<u8>, Option<i64>, i64)>,
    /// Messages this command stored, not yet sent.
    unsent_messages: Vec<HeldMessage>,
    /// Message ids taken from the sequence for this command, not yet used.
    ids: std::collections::VecDeque<i64>,
}

/// A message held back until its command sends them all in one statement.
struct HeldMessage {
    id: i64,
    batch_id: String,
    destination: String,
    resource_type: String,
    logical_id: String,
    identifier_system: String,
    identifier_value: String,
    upsert: bool,
    next_attempt_ms: i64,
    created_ms: i64,
    predecessor: Option<i64>,
    disposition: &'static str,
    body_version: Option<i64>,
    body: Vec<u8>,
}

/// A [`StateKey`] that owns its parts.
type OwnedKey = (String, String, String, String);

fn owned(key: StateKey<'_>) -> OwnedKey {
    (
        key.resource_type.to_owned(),
        key.time_key.to_owned(),
        key.logical_id.to_owned(),
        key.destination.to_owned(),
    )
}

/// The advisory lock of a resource at a destination: replicas storing messages about it at
/// once take turns, so the later one sees the earlier one's message as its predecessor.
fn lock_of(key: StateKey<'_>) -> i64 {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [key.resource_type, key.logical_id, key.destination] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn prior_of(row: &postgres::Row, at: usize) -> Prior {
    Prior {
        content_hash: row.get(at),
        revision: row.get(at + 1),
        message_id: row.get(at + 2),
        state: row.get(at + 3),
    }
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl PgTx<'_> {
    /// Sends what this command wrote and held back (a statement for its messages and their
    /// bodies, one for its states), so that what follows reads them.
    fn send_held(&mut self) -> Result<(), OutboxError> {
        self.send_messages()?;
        self.send_states()
    }

    fn send_messages(&mut self) -> Result<(), OutboxError> {
        if self.unsent_messages.is_empty() {
            return Ok(());
        }
        let held = std::mem::take(&mut self.unsent_messages);
        let n = held.len();
        let mut ids = Vec::with_capacity(n);
        let mut texts: [Vec<String>; 6] = Default::default();
        let mut upserts = Vec::with_capacity(n);
        let mut due = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut predecessors = Vec::with_capacity(n);
        let mut dispositions = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let mut bodies = Vec::with_capacity(n);
        for m in held {
            ids.push(m.id);
            for (column, text) in texts.iter_mut().zip([
                m.batch_id,
                m.destination,
                m.resource_type,
                m.logical_id,
                m.identifier_system,
                m.identifier_value,
            ]) {
                column.push(text);
            }
            upserts.push(m.upsert);
            due.push(m.next_attempt_ms);
            created.push(m.created_ms);
            predecessors.push(m.predecessor);
            dispositions.push(m.disposition);
            versions.push(m.body_version);
            bodies.push(m.body);
        }
        let statement = self.statement(
            "WITH m AS (
                 INSERT INTO messages (id, batch_id, destination, resource_type, logical_id, identifier_system, identifier_value, upsert, next_attempt_ms, created_ms, predecessor, disposition, body_version)
                 OVERRIDING SYSTEM VALUE
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bool[], $9::bigint[], $10::bigint[], $11::bigint[], $12::text[], $13::bigint[])
             )
             INSERT INTO message_bodies (message_id, body) SELECT * FROM unnest($1::bigint[], $14::bytea[])",
        )?;
        self.tx.execute(
            &statement,
            &[
                &ids,
                &texts[0],
                &texts[1],
                &texts[2],
                &texts[3],
                &texts[4],
                &texts[5],
                &upserts,
                &due,
                &created,
                &predecessors,
                &dispositions,
                &versions,
                &bodies,
            ],
        )?;
        Ok(())
    }

    /// Takes `n` message ids from the sequence ahead of their messages.
    fn take_ids(&mut self, n: usize) -> Result<(), OutboxError> {
        let statement = self.statement(
            "SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, $1)",
        )?;
        let rows = self.tx.query(&statement, &[&(n as i32)])?;
        self.ids.extend(rows.iter().map(|row| row.get::<_, i64>(0)));
        Ok(())
    }

    fn send_states(&mut self) -> Result<(), OutboxError> {
        if self.unsent_states.is_empty() {
            return Ok(());
        }
        let states = std::mem::take(&mut self.unsent_states);
        let mut keys: [Vec<String>; 4] = Default::default();
        let mut hashes = Vec::with_capacity(states.len());
        let mut revisions = Vec::with_capacity(states.len());
        let mut message_ids = Vec::with_capacity(states.len());
        for (key, (hash, revision, message_id)) in states {
            let (resource_type, time_key, logical_id, destination) = key;
            for (column, part) in
                keys.iter_mut()
                    .zip([resource_type, time_key, logical_id, destination])
            {
                column.push(part);
            }
            hashes.push(hash);
            revisions.push(revision);
            message_ids.push(message_id);
        }
        let statement = self.statement(
            "INSERT INTO resource_state (resource_type, time_key, logical_id, destination, content_hash, revision, message_id)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bigint[], $7::bigint[])
             ON CONFLICT (resource_type, time_key, logical_id, destination) DO UPDATE SET
                 content_hash = excluded.content_hash,
                 revision = COALESCE(excluded.revision, resource_state.revision),
                 message_id = excluded.message_id",
        )?;
        self.tx.execute(
            &statement,
            &[
                &keys[0],
                &keys[1],
                &keys[2],
                &keys[3],
                &hashes,
                &revisions,
                &message_ids,
            ],
        )?;
        Ok(())
    }

    /// Forgets what this command read and holds back: a new command, or one undone.
    fn forget_command(&mut self) {
        self.priors.clear();
        self.unsent_states.clear();
        self.unsent_messages.clear();
        self.ids.clear();
    }

    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, OutboxError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.tx.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs `sql` after sending what the command holds back (which it may read).
    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64, OutboxError> {
        self.send_held()?;
        let statement = self.statement(sql)?;
        Ok(self.tx.execute(&statement, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Option<postgres::Row>, OutboxError> {
        self.send_held()?;
        let statement = self.statement(sql)?;
        Ok(self.tx.query_opt(&statement, params)?)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
    ) -> Result<Vec<postgres::Row>, OutboxError> {
        self.send_held()?;
        let statement = self.statement(sql)?;
        Ok(self.tx.query(&statement, params)?)
    }
}

fn settled_of(row: &postgres::Row) -> Settled {
    Settled {
        id: row.get(0),
        resource_type: row.get(1),
        identifier_value: row.get(2),
        logical_id: row.get(3),
        destination: row.get(4),
    }
}

impl WriteTx for PgTx<'_> {
    fn savepoint(&mut self) -> Result<(), OutboxError> {
        self.forget_command();
        Ok(self.tx.batch_execute("SAVEPOINT command")?)
    }

    fn release(&mut self) -> Result<(), OutboxError> {
        Ok(self.tx.batch_execute("RELEASE SAVEPOINT command")?)
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), OutboxError> {
        self.forget_command();
        Ok(self.tx.batch_execute("ROLLBACK TO SAVEPOINT command")?)
    }

    fn finish_command(&mut self) -> Result<(), OutboxError> {
        self.send_held()
    }

    fn will_enqueue(&mut self, keys: &[StateKey<'_>]) -> Result<(), OutboxError> {
        self.send_held()?;
        // In one order (sorted), so that two replicas' commands never wait for each other.
        let mut locks: Vec<i64> = keys.iter().map(|k| lock_of(*k)).collect();
        locks.sort_unstable();
        locks.dedup();
        self.query(
            "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k",
            &[&locks],
        )?;
        // Read after the locks, by a statement of its own: its snapshot then holds what the
        // replica that held a lock committed.
        let mut columns: (Vec<&str>, Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
        for key in keys {
            columns.0.push(key.resource_type);
            columns.1.push(key.time_key);
            columns.2.push(key.logical_id);
            columns.3.push(key.destination);
            self.priors.insert(owned(*key), None);
        }
        // One primary-key lookup per resource (a join over the array would let the planner
        // scan the whole table for a single reading).
        let rows = self.query(
            "SELECT k.resource_type, k.time_key, k.logical_id, k.destination,
                    s.content_hash, s.revision, s.message_id, s.state
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                  AS k(resource_type, time_key, logical_id, destination)
             CROSS JOIN LATERAL (
                 SELECT s.content_hash, s.revision, s.message_id, m.state
                 FROM resource_state s LEFT JOIN messages m ON m.id = s.message_id
                 WHERE s.resource_type = k.resource_type AND s.time_key = k.time_key
                   AND s.logical_id = k.logical_id AND s.destination = k.destination
             ) s",
            &[&columns.0, &columns.1, &columns.2, &columns.3],
        )?;
        for row in rows {
            self.priors.insert(
                (row.get(0), row.get(1), row.get(2), row.get(3)),
                Some(prior_of(&row, 4)),
            );
        }
        // The ids of its messages (and of a few Provenances), in one statement.
        self.take_ids(keys.len() + 4)
    }

    fn record_batch(
        &mut self,
        batch_id: &str,
        facts: &BatchFacts,
        now: i64,
    ) -> Result<(), OutboxError> {
        let (devices, patients, runs) = browse::framed_facts(facts);
        self.execute(
            "INSERT INTO batches (batch_id, received_ms, sender, devices, patients, runs)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
            &[&batch_id, &now, &facts.sender, &devices, &patients, &runs],
        )?;
        Ok(())
    }

    fn prior(&mut self, key: StateKey<'_>) -> Result<Option<Prior>, OutboxError> {
        let owned = owned(key);
        if let Some(prior) = self.priors.get(&owned) {
            return Ok(prior.clone());
        }
        self.send_held()?;
        // Locked first, by a statement of its own (see `will_enqueue`).
        self.query("SELECT pg_advisory_xact_lock($1)", &[&lock_of(key)])?;
        let row = self.query_opt(
            "SELECT s.content_hash, s.revision, s.message_id, m.state
             FROM resource_state s LEFT JOIN messages m ON m.id = s.message_id
             WHERE s.resource_type = $1 AND s.time_key = $2 AND s.logical_id = $3
               AND s.destination = $4",
            &[
                &key.resource_type,
                &key.time_key,
                &key.logical_id,
                &key.destination,
            ],
        )?;
        let prior = row.map(|row| prior_of(&row, 0));
        self.priors.insert(owned, prior.clone());
        Ok(prior)
    }

    fn is_rewritable(&mut self, message_id: i64) -> Result<bool, OutboxError> {
        let row = self.query_opt(
            "SELECT body_version IS NOT NULL FROM messages WHERE id = $1",
            &[&message_id],
        )?;
        Ok(row.is_some_and(|row| row.get(0)))
    }

    fn written_as(&mut self, message_id: i64) -> Result<(bool, Disposition), OutboxError> {
        let row = self
            .query_opt(
                "SELECT upsert, disposition FROM messages WHERE id = $1",
                &[&message_id],
            )?
            .ok_or_else(|| OutboxError::Storage(format!("message {message_id} is gone")))?;
        Ok((row.get(0), Disposition::parse(row.get(1))))
    }

    fn rewrite_body(&mut self, message_id: i64, body: &[u8]) -> Result<(), OutboxError> {
        self.execute(
            "UPDATE message_bodies SET body = $2 WHERE message_id = $1",
            &[&message_id, &stored_body::stored(body)],
        )?;
        self.execute(
            "UPDATE messages SET body_version = body_version + 1 WHERE id = $1",
            &[&message_id],
        )?;
        Ok(())
    }

    fn upsert_state(
        &mut self,
        key: StateKey<'_>,
        content_hash: &[u8],
        revision: Option<i64>,
        message_id: i64,
    ) -> Result<(), OutboxError> {
        let owned = owned(key);
        // As the statement would leave it: a revision of `None` keeps the one recorded.
        let revision = revision.or_else(|| {
            self.unsent_states
                .get(&owned)
                .and_then(|(_, revision, _)| *revision)
        });
        let known_revision = self
            .priors
            .get(&owned)
            .and_then(|p| p.as_ref().and_then(|p| p.revision));
        self.priors.insert(
            owned.clone(),
            Some(Prior {
                content_hash: content_hash.to_vec(),
                revision: revision.or(known_revision),
                message_id,
                state: Some("pending".into()),
            }),
        );
        self.unsent_states
            .insert(owned, (content_hash.to_vec(), revision, message_id));
        Ok(())
    }

    fn point_state(
        &mut self,
        key: StateKey<'_>,
        message_id: i64,
        content_hash: Option<&[u8]>,
    ) -> Result<(), OutboxError> {
        self.send_held()?;
        self.priors.remove(&owned(key));
        self.execute(
            "UPDATE resource_state SET message_id = $5, content_hash = COALESCE($6, content_hash)
             WHERE resource_type = $1 AND time_key = $2 AND logical_id = $3 AND destination = $4",
            &[
                &key.resource_type,
                &key.time_key,
                &key.logical_id,
                &key.destination,
                &message_id,
                &content_hash,
            ],
        )?;
        Ok(())
    }

    fn state_body(&mut self, key: StateKey<'_>) -> Result<Option<Vec<u8>>, OutboxError> {
        self.send_held()?;
        let row = self.query_opt(
            "SELECT b.body FROM resource_state s JOIN message_bodies b ON b.message_id = s.message_id
             WHERE s.resource_type = $1 AND s.time_key = $2 AND s.logical_id = $3
               AND s.destination = $4",
            &[
                &key.resource_type,
                &key.time_key,
                &key.logical_id,
                &key.destination,
            ],
        )?;
        stored_body::read_optional(row.map(|row| row.get(0)))
    }

    fn insert_message(&mut self, row: &MessageRow<'_>, now: i64) -> Result<i64, OutboxError> {
        if self.ids.is_empty() {
            self.take_ids(8)?;
        }
        let id = self
            .ids
            .pop_front()
            .ok_or_else(|| OutboxError::Storage("postgres: no message id taken".into()))?;
        self.unsent_messages.push(HeldMessage {
            id,
            batch_id: row.batch_id.to_owned(),
            destination: row.destination.to_owned(),
            resource_type: row.resource_type.to_owned(),
            logical_id: row.logical_id.to_owned(),
            identifier_system: row.identifier_system.to_owned(),
            identifier_value: row.identifier_value.to_owned(),
            upsert: row.upsert,
            next_attempt_ms: row.due_ms(now),
            created_ms: now,
            predecessor: row.predecessor,
            disposition: row.disposition.as_str(),
            body_version: row.body_version(),
            body: stored_body::stored(row.body),
        });
        Ok(id)
    }

    fn holders(
        &mut self,
        resource_type: &str,
        time_key: &str,
        logical_id: &str,
    ) -> Result<Vec<Holder>, OutboxError> {
        self.send_held()?;
        let rows = self.query(
            "SELECT s.destination, s.message_id, m.identifier_system, m.identifier_value,
                    b.body, m.disposition
             FROM resource_state s JOIN messages m ON m.id = s.message_id
             JOIN message_bodies b ON b.message_id = m.id
             WHERE s.resource_type = $1 AND s.time_key = $2 AND s.logical_id = $3
             ORDER BY s.destination",
            &[&resource_type, &time_key, &logical_id],
        )?;
        rows.iter()
            .map(|row| {
                Ok(Holder {
                    destination: row.get(0),
                    message_id: row.get(1),
                    identifier_system: row.get(2),
                    identifier_value: row.get(3),
                    body: stored_body::read(row.get(4))?,
                    disposition: Disposition::parse(row.get(5)),
                })
            })
            .collect()
    }

    fn restating(
        &mut self,
        message_id: i64,
    ) -> Result<(String, Vec<u8>, Disposition), OutboxError> {
        let row = self
            .query_opt(
                "SELECT m.identifier_system, b.body, m.disposition
                 FROM messages m JOIN message_bodies b ON b.message_id = m.id WHERE m.id = $1",
                &[&message_id],
            )?
            .ok_or_else(|| OutboxError::Storage(format!("message {message_id} is gone")))?;
        Ok((
            row.get(0),
            stored_body::read(row.get(1))?,
            Disposition::parse(row.get(2)),
        ))
    }

    fn keep_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
        value: Option<&str>,
    ) -> Result<(), OutboxError> {
        self.execute(
            "INSERT INTO chart_values (destination, slot_logical_id, reading_ms, value)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (destination, slot_logical_id, reading_ms) DO UPDATE SET
                 retracted = CASE WHEN chart_values.value IS NOT DISTINCT FROM excluded.value
                                  THEN chart_values.retracted ELSE false END,
                 value = excluded.value",
            &[&destination, &slot_logical_id, &reading_ms, &value],
        )?;
        Ok(())
    }

    fn chart_values(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<Vec<String>, OutboxError> {
        let rows = self.query(
            "SELECT value FROM chart_values
             WHERE destination = $1 AND slot_logical_id = $2 AND value IS NOT NULL AND NOT retracted
             ORDER BY reading_ms",
            &[&destination, &slot_logical_id],
        )?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    fn retract_chart_value(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
        reading_ms: i64,
    ) -> Result<bool, OutboxError> {
        let flagged = self.execute(
            "UPDATE chart_values SET retracted = true
             WHERE destination = $1 AND slot_logical_id = $2 AND reading_ms = $3 AND NOT retracted",
            &[&destination, &slot_logical_id, &reading_ms],
        )?;
        Ok(flagged > 0)
    }

    fn chart_readings_left(
        &mut self,
        destination: &str,
        slot_logical_id: &str,
    ) -> Result<u64, OutboxError> {
        let left: i64 = self
            .query_opt(
                "SELECT COUNT(*) FROM chart_values
                 WHERE destination = $1 AND slot_logical_id = $2 AND NOT retracted",
                &[&destination, &slot_logical_id],
            )?
            .map_or(0, |row| row.get(0));
        Ok(left as u64)
    }

    fn body_version(&mut self, id: i64) -> Result<Option<i64>, OutboxError> {
        Ok(self
            .query_opt("SELECT body_version FROM messages WHERE id = $1", &[&id])?
            .and_then(|row| row.get(0)))
    }

    fn make_due(&mut self, id: i64, at_ms: i64) -> Result<(), OutboxError> {
        self.execute(
            "UPDATE messages SET next_attempt_ms = $2, claimed_by = NULL, claimed_until_ms = NULL
             WHERE id = $1 AND state = 'pending'",
            &[&id, &at_ms],
        )?;
        Ok(())
    }

    fn settle(&mut self, id: i64, outcome: &Settle, now: i64) -> Result<(), OutboxError> {
        match outcome {
            Settle::Delivered { status, location } => self.execute(
                "UPDATE messages SET state = 'delivered', attempts = attempts + 1, settled_ms = $2, status_line = $3, location = $4, last_error = NULL, claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, &now, status, location],
            )?,
            Settle::Retry { at_ms, error } => self.execute(
                "UPDATE messages SET attempts = attempts + 1, next_attempt_ms = $2, last_error = $3, claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, at_ms, error],
            )?,
            Settle::Postpone { at_ms, error } => self.execute(
                "UPDATE messages SET next_attempt_ms = $2, last_error = $3, claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, at_ms, error],
            )?,
            Settle::Dead { error, outcome } => self.execute(
                "UPDATE messages SET state = 'dead', attempts = attempts + 1, settled_ms = $2, last_error = $3, outcome = $4, claimed_by = NULL, claimed_until_ms = NULL WHERE id = $1 AND state = 'pending'",
                &[&id, &now, error, outcome],
            )?,
        };
        Ok(())
    }

    fn dead_letters(
        &mut self,
        id: Option<i64>,
        destination: Option<&str>,
    ) -> Result<Vec<Settled>, OutboxError> {
        let rows = self.query(
            "SELECT id, resource_type, identifier_value, logical_id, destination
             FROM messages WHERE state = 'dead' AND ($1::BIGINT IS NULL OR id = $1)
               AND ($2::TEXT IS NULL OR destination = $2)
             ORDER BY id",
            &[&id, &destination],
        )?;
        Ok(rows.iter().map(settled_of).collect())
    }

    fn make_pending_again(&mut self, id: i64, now: i64) -> Result<u64, OutboxError> {
        self.execute(
            "UPDATE messages SET state = 'pending', attempts = 0, next_attempt_ms = $2, settled_ms = NULL,
                 claimed_by = NULL, claimed_until_ms = NULL
             WHERE id = $1",
            &[&id, &now],
        )
    }

    fn settled_before(
        &mut self,
        state: SettledState,
        before_ms: i64,
        limit: u64,
    ) -> Result<Vec<Settled>, OutboxError> {
        let state = match state {
            SettledState::Delivered => "delivered",
            SettledState::Dead => "dead",
        };
        let rows = self.query(
            "SELECT id, resource_type, identifier_value, logical_id, destination
             FROM messages WHERE state = $1 AND settled_ms < $2 LIMIT $3",
            &[&state, &before_ms, &(limit as i64)],
        )?;
        Ok(rows.iter().map(settled_of).collect())
    }

    fn forget_state(&mut self, key: StateKey<'_>, message_id: i64) -> Result<(), OutboxError> {
        self.send_held()?;
        self.priors.remove(&owned(key));
        self.execute(
            "DELETE FROM resource_state WHERE resource_type = $1 AND time_key = $2
                 AND logical_id = $3 AND destination = $4 AND message_id = $5",
            &[
                &key.resource_type,
                &key.time_key,
                &key.logical_id,
                &key.destination,
                &message_id,
            ],
        )?;
        Ok(())
    }

    fn delete_message(&mut self, id: i64) -> Result<(), OutboxError> {
        self.execute("DELETE FROM message_bodies WHERE message_id = $1", &[&id])?;
        self.execute("DELETE FROM messages WHERE id = $1", &[&id])?;
        Ok(())
    }

    fn forget_chart_values(&mut self, before_ms: i64, limit: u64) -> Result<(), OutboxError> {
        self.execute(
            "DELETE FROM chart_values WHERE (destination, slot_logical_id, reading_ms) IN
                 (SELECT destination, slot_logical_id, reading_ms FROM chart_values
                  WHERE reading_ms < $1 LIMIT $2)",
            &[&before_ms, &(limit as i64)],
        )?;
        Ok(())
    }

    fn forget_batches(&mut self, before_ms: i64) -> Result<(), OutboxError> {
        self.execute(
            "DELETE FROM batches WHERE batch_id IN (
                SELECT batch_id FROM batches
                WHERE received_ms < $1
                  AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.batch_id = batches.batch_id)
                LIMIT 2000)",
            &[&before_ms],
        )?;
        Ok(())
    }

    /// PostgreSQL's autovacuum makes deleted rows' space reusable on its own.
    fn vacuum(&mut self) -> Result<(u64, u64), OutboxError> {
        Ok((0, 0))
    }
}

/// Rows a `due` read fetches at a time beyond what it needs (those in flight or not due are
/// passed over).
const DUE_HEADROOM: usize = 64;

fn dead_letter_of(row: &tokio_postgres::Row) -> DeadLetter {
    let outcome: Option<String> = row.get(8);
    DeadLetter {
        message_id: row.get(0),
        batch_id: row.get(1),
        destination: row.get(2),
        resource_type: row.get(3),
        identifier: format!("{}|{}", row.get::<_, &str>(4), row.get::<_, &str>(5)),
        attempts: row.get::<_, i32>(6) as u32,
        error: row.get(7),
        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
        created_at_ms: row.get(9),
    }
}

const DEAD_COLUMNS: &str = "id, batch_id, destination, resource_type, identifier_system, identifier_value, attempts, last_error, outcome, created_ms";

impl Outbox for PostgresOutbox {
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
        _from: i64,
    ) -> BoxFuture<Result<Due, OutboxError>> {
        // Always from the destination's oldest pending message: with several replicas, ids are
        // taken before their commits, so a message may be committed below where a scan already
        // passed (the SQLite outbox has one writer, whose ids are in commit order).
        let from = 0;
        let destination = destination.to_owned();
        let in_flight = in_flight.clone();
        let page = (limit + in_flight.len() + DUE_HEADROOM) as i64;
        let pool = self.pool.clone();
        let writer = self.writer.clone();
        let replica = self.replica.clone();
        let lease = self.claim_lease.as_millis() as i64;
        Box::pin(async move {
            let client = pool.get().await?;
            // Due, and not claimed by another replica that still holds it.
            let statement = client
                .prepare_cached(&format!(
                    "SELECT id, next_attempt_ms <= $1 AND {NOT_BLOCKED}
                                AND (claimed_by IS NULL OR claimed_by = $5 OR claimed_until_ms <= $1),
                            resource_type, logical_id, identifier_system, identifier_value,
                            attempts, upsert, body_version
                     FROM messages m
                     WHERE destination = $2 AND state = 'pending' AND id >= $3
                     ORDER BY id LIMIT $4"
                ))
                .await?;
            let mut messages = Vec::new();
            let mut versions = Vec::new();
            let mut examined = from - 1;
            'pages: loop {
                let rows = client
                    .query(
                        &statement,
                        &[&now_ms, &destination, &(examined + 1), &page, &&*replica],
                    )
                    .await?;
                let full = rows.len() as i64 == page;
                for row in rows {
                    if messages.len() == limit {
                        break 'pages;
                    }
                    let id: i64 = row.get(0);
                    examined = id;
                    if in_flight.contains(&id) {
                        continue;
                    }
                    if !row.get::<_, bool>(1) {
                        continue;
                    }
                    if let Some(version) = row.get::<_, Option<i64>>(8) {
                        versions.push((id, version));
                    }
                    messages.push(Pending {
                        id,
                        resource_type: row.get(2),
                        logical_id: row.get(3),
                        identifier_system: row.get(4),
                        identifier_value: row.get(5),
                        body: Vec::new(),
                        attempts: row.get::<_, i32>(6) as u32,
                        upsert: row.get(7),
                    });
                }
                if !full || messages.len() == limit {
                    break;
                }
            }
            if !messages.is_empty() {
                // Claimed for this replica; what another one claimed meanwhile is left to it.
                let claim = client
                    .prepare_cached(
                        "UPDATE messages SET claimed_by = $1, claimed_until_ms = $2
                         WHERE id = ANY($3) AND state = 'pending'
                           AND (claimed_by IS NULL OR claimed_by = $1 OR claimed_until_ms <= $4)
                         RETURNING id",
                    )
                    .await?;
                let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
                let until = now_ms + lease;
                let claimed: std::collections::HashSet<i64> = client
                    .query(&claim, &[&&*replica, &until, &ids, &now_ms])
                    .await?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                messages.retain(|m| claimed.contains(&m.id));
                versions.retain(|(id, _)| claimed.contains(id));
            }
            if !messages.is_empty() {
                let ids: Vec<i64> = messages.iter().map(|m| m.id).collect();
                let bodies = client
                    .prepare_cached(
                        "SELECT message_id, body FROM message_bodies WHERE message_id = ANY($1)",
                    )
                    .await?;
                let mut found: HashMap<i64, Vec<u8>> = client
                    .query(&bodies, &[&ids])
                    .await?
                    .into_iter()
                    .map(|row| (row.get(0), row.get(1)))
                    .collect();
                for message in &mut messages {
                    message.body =
                        stored_body::read(found.remove(&message.id).ok_or_else(|| {
                            OutboxError::Storage(format!("message {} has no body", message.id))
                        })?)?;
                }
            }
            writer.hand_out(versions);
            Ok(Due {
                messages,
                resume_from: from,
            })
        })
    }

    fn rewinds(&self) -> u64 {
        self.writer.rewinds()
    }

    fn next_due(&self, destination: &str) -> BoxFuture<Result<Option<i64>, OutboxError>> {
        let destination = destination.to_owned();
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let earliest = client
                .prepare_cached(
                    "SELECT MIN(next_attempt_ms) FROM messages WHERE destination = $1 AND state = 'pending'",
                )
                .await?;
            let earliest: Option<i64> = client.query_one(&earliest, &[&destination]).await?.get(0);
            if earliest.is_none_or(|at| at > now_ms()) {
                return Ok(earliest);
            }
            let unblocked = client
                .prepare_cached(&format!(
                    "SELECT MIN(next_attempt_ms) FROM messages m
                     WHERE destination = $1 AND state = 'pending' AND {NOT_BLOCKED}"
                ))
                .await?;
            Ok(client.query_one(&unblocked, &[&destination]).await?.get(0))
        })
    }

    fn settle(&self, outcomes: Vec<(i64, Settle)>) -> BoxFuture<Result<(), OutboxError>> {
        self.writer.settle(outcomes)
    }

    fn batch_status(&self, batch_id: &str) -> BoxFuture<Result<Vec<MessageStatus>, OutboxError>> {
        let batch_id = batch_id.to_owned();
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(
                    "SELECT id, destination, resource_type, identifier_system, identifier_value, state, attempts, location, last_error, disposition
                     FROM messages WHERE batch_id = $1 ORDER BY id",
                )
                .await?;
            Ok(client
                .query(&statement, &[&batch_id])
                .await?
                .iter()
                .map(|row| MessageStatus {
                    message_id: row.get(0),
                    destination: row.get(1),
                    resource_type: row.get(2),
                    identifier: format!("{}|{}", row.get::<_, &str>(3), row.get::<_, &str>(4)),
                    disposition: Disposition::parse(row.get(9)),
                    state: row.get(5),
                    attempts: row.get::<_, i32>(6) as u32,
                    location: row.get(7),
                    last_error: row.get(8),
                })
                .collect())
        })
    }

    fn stats(&self) -> BoxFuture<Result<Vec<DestinationStats>, OutboxError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let now = now_ms();
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(
                    "SELECT destination, COUNT(*),
                            COUNT(*) FILTER (WHERE state = 'delivered'),
                            COUNT(*) FILTER (WHERE state = 'dead'),
                            COUNT(*) FILTER (WHERE state = 'pending'),
                            MIN(created_ms) FILTER (WHERE state = 'pending')
                     FROM messages GROUP BY destination ORDER BY destination",
                )
                .await?;
            Ok(client
                .query(&statement, &[])
                .await?
                .iter()
                .map(|row| {
                    let oldest: Option<i64> = row.get(5);
                    DestinationStats {
                        destination: row.get(0),
                        accepted: row.get::<_, i64>(1) as u64,
                        delivered: row.get::<_, i64>(2) as u64,
                        dead: row.get::<_, i64>(3) as u64,
                        pending: row.get::<_, i64>(4) as u64,
                        oldest_pending_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1000.0),
                    }
                })
                .collect())
        })
    }

    fn queue_depths(&self) -> BoxFuture<Result<Vec<super::QueueDepth>, OutboxError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let now = now_ms();
            let client = pool.get().await?;
            let pending = client
                .prepare_cached(&super::PENDING_DEPTHS_SQL.replace("{indexed_by}", ""))
                .await?;
            let pending = client
                .query(&pending, &[])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect();
            let dead = client
                .prepare_cached(&super::DEAD_DEPTHS_SQL.replace("{indexed_by}", ""))
                .await?;
            let dead = client
                .query(&dead, &[])
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            Ok(super::queue_depths_of(pending, dead, now))
        })
    }

    fn dead_letters(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> BoxFuture<Result<Vec<DeadLetter>, OutboxError>> {
        let destination = destination.map(str::to_owned);
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {DEAD_COLUMNS} FROM messages
                     WHERE state = 'dead' AND ($1::TEXT IS NULL OR destination = $1)
                     ORDER BY id LIMIT $2"
                ))
                .await?;
            Ok(client
                .query(&statement, &[&destination, &(limit as i64)])
                .await?
                .iter()
                .map(dead_letter_of)
                .collect())
        })
    }

    fn dead_letter(&self, message_id: i64) -> BoxFuture<Result<Option<DeadLetter>, OutboxError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {DEAD_COLUMNS} FROM messages WHERE state = 'dead' AND id = $1"
                ))
                .await?;
            Ok(client
                .query_opt(&statement, &[&message_id])
                .await?
                .as_ref()
                .map(dead_letter_of))
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

    fn search(&self, query: MessageQuery) -> BoxFuture<Result<Vec<MessageSummary>, OutboxError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let (sql, values) = browse::search_sql(&query, Dialect::Postgres);
            let params: Vec<&(dyn ToSql + Sync)> = values
                .iter()
                .map(|v| match v {
                    browse::Param::Text(t) => t as &(dyn ToSql + Sync),
                    browse::Param::Integer(i) => i as &(dyn ToSql + Sync),
                })
                .collect();
            let client = pool.get().await?;
            let statement = client.prepare_cached(&sql).await?;
            Ok(client
                .query(&statement, &params)
                .await?
                .iter()
                .map(summary_of)
                .collect())
        })
    }

    fn message(&self, message_id: i64) -> BoxFuture<Result<Option<MessageDetail>, OutboxError>> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(&browse::message_sql(Dialect::Postgres))
                .await?;
            Ok(client
                .query_opt(&statement, &[&message_id])
                .await?
                .map(|row| browse::detail(summary_of(&row), row.get(18), row.get(19))))
        })
    }

    fn run_readings(
        &self,
        run_id: &str,
        limit: usize,
    ) -> BoxFuture<Result<Vec<RunReading>, OutboxError>> {
        let needle = browse::run_needle(run_id);
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let statement = client
                .prepare_cached(&browse::run_readings_sql(Dialect::Postgres))
                .await?;
            let rows = client
                .query(&statement, &[&needle, &browse::run_readings_rows(limit)])
                .await?;
            Ok(browse::latest_readings(
                rows.iter().map(|row| {
                    (
                        row.get::<_, String>(0),
                        row.get::<_, String>(1),
                        row.get::<_, Vec<u8>>(2),
                    )
                }),
                limit,
            ))
        })
    }

    fn commits(&self) -> u64 {
        self.writer.commits()
    }

    fn notifier(&self, destination: &str) -> Arc<Notify> {
        self.writer.notifier(destination)
    }
}

fn summary_of(row: &tokio_postgres::Row) -> MessageSummary {
    MessageSummary {
        message_id: row.get(0),
        tracking_id: row.get(1),
        destination: row.get(2),
        resource_type: row.get(3),
        identifier: format!("{}|{}", row.get::<_, &str>(4), row.get::<_, &str>(5)),
        disposition: Disposition::parse(row.get(6)),
        state: row.get(7),
        attempts: row.get::<_, i32>(8) as u32,
        accepted_at_ms: row.get(9),
        settled_at_ms: row.get(10),
        status_line: row.get(11),
        location: row.get(12),
        last_error: row.get(13),
        sender: row.get(14),
        devices: browse::unframed(row.get(15)),
        patients: browse::unframed(row.get(16)),
        runs: browse::unframed(row.get(17)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::outbox::behaviour::{delivered, due_at, engine_tests, message, reading};
    use crate::outbox::throwaway_postgres::{ThrowawayCluster, shared_cluster};

    /// A new database on the tests' server.
    async fn database() -> tokio_postgres::Config {
        tokio::task::spawn_blocking(|| shared_cluster().database())
            .await
            .unwrap()
            .unwrap()
    }

    async fn fresh() -> (Arc<dyn Outbox>, ()) {
        let outbox: Arc<dyn Outbox> =
            PostgresOutbox::open(database().await, tls(None).unwrap(), "test", CLAIM_LEASE)
                .await
                .unwrap();
        (outbox, ())
    }

    engine_tests!(fresh());

    /// What was accepted is pending for the next process (or replica) that opens the store;
    /// opening it again does not apply the migrations again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepted_messages_are_there_for_the_next_process() {
        let config = database().await;
        {
            let outbox =
                PostgresOutbox::open(config.clone(), tls(None).unwrap(), "test", CLAIM_LEASE)
                    .await
                    .unwrap();
            outbox
                .enqueue(
                    "b1".into(),
                    vec![message("ehr", 1), message("ehr", 2)],
                    None,
                )
                .await
                .unwrap();
            let first = due_at(&*outbox, now_ms(), &[]).await;
            outbox
                .settle(vec![(first[0].id, delivered())])
                .await
                .unwrap();
        }
        let outbox = PostgresOutbox::open(config.clone(), tls(None).unwrap(), "test", CLAIM_LEASE)
            .await
            .unwrap();
        let pending = due_at(&*outbox, now_ms(), &[]).await;
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].identifier_value, "v2");
        let stats = outbox.stats().await.unwrap();
        assert_eq!(
            (stats[0].accepted, stats[0].delivered, stats[0].pending),
            (2, 1, 1)
        );
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let applied: i64 = client
            .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(applied, MIGRATIONS.len() as i64);
    }

    /// Replicas starting together each find the schema made once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_starting_together_migrate_once() {
        let config = database().await;
        let (a, b) = tokio::join!(
            PostgresOutbox::open(config.clone(), tls(None).unwrap(), "a", CLAIM_LEASE),
            PostgresOutbox::open(config.clone(), tls(None).unwrap(), "b", CLAIM_LEASE),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        a.enqueue("b1".into(), vec![message("ehr", 1)], None)
            .await
            .unwrap();
        assert_eq!(b.stats().await.unwrap()[0].pending, 1);
    }

    /// Two replicas on one store never take the same message; one that dies leaves its
    /// messages to the other once its claims run out, and claims of a living replica are
    /// extended while it holds them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_the_queue_and_take_over_a_dead_ones_messages() {
        let config = database().await;
        let lease = Duration::from_millis(600);
        let a = PostgresOutbox::open(config.clone(), tls(None).unwrap(), "a", lease)
            .await
            .unwrap();
        let b = PostgresOutbox::open(config.clone(), tls(None).unwrap(), "b", lease)
            .await
            .unwrap();
        a.enqueue(
            "b1".into(),
            (0..4).map(|n| message("ehr", n)).collect(),
            None,
        )
        .await
        .unwrap();
        let now = now_ms();
        let in_flight = std::collections::HashSet::new();
        let taken_by_a = a.due("ehr", now, 2, &in_flight, 0).await.unwrap().messages;
        let taken_by_b = b.due("ehr", now, 10, &in_flight, 0).await.unwrap().messages;
        let ids = |taken: &[Pending]| taken.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(taken_by_a.len(), 2);
        assert_eq!(taken_by_b.len(), 2);
        assert!(
            ids(&taken_by_a)
                .iter()
                .all(|id| !ids(&taken_by_b).contains(id)),
            "{:?} and {:?}",
            ids(&taken_by_a),
            ids(&taken_by_b)
        );
        // A lives on past its lease (its claims are extended); b settles its own.
        b.settle(
            ids(&taken_by_b)
                .into_iter()
                .map(|id| (id, delivered()))
                .collect(),
        )
        .await
        .unwrap();
        tokio::time::sleep(lease * 2).await;
        assert!(
            due_at(&*b, now_ms(), &[]).await.is_empty(),
            "a living replica keeps what it holds"
        );
        // A dies: once its claims run out, b takes its messages and delivers them.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(10);
        let taken_over = loop {
            let due = due_at(&*b, now_ms(), &[]).await;
            if !due.is_empty() {
                break due;
            }
            assert!(
                Instant::now() < deadline,
                "a dead replica's claims never ran out"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(ids(&taken_over), ids(&taken_by_a));
        b.settle(
            ids(&taken_over)
                .into_iter()
                .map(|id| (id, delivered()))
                .collect(),
        )
        .await
        .unwrap();
        let stats = b.stats().await.unwrap();
        assert_eq!((stats[0].delivered, stats[0].pending), (4, 0));
    }

    /// A correction that reaches another replica while the reading it corrects is still being
    /// sent by the first waits for it: per resource the EHR gets them in acceptance order,
    /// whichever replica took each; and two replicas storing the same reading at once store it
    /// once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_resource_order_holds_across_replicas() {
        let config = database().await;
        let a = PostgresOutbox::open(config.clone(), tls(None).unwrap(), "a", CLAIM_LEASE)
            .await
            .unwrap();
        let b = PostgresOutbox::open(config.clone(), tls(None).unwrap(), "b", CLAIM_LEASE)
            .await
            .unwrap();
        let original =
            r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":1}}"#;
        let corrected =
            r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":2}}"#;
        let first = a
            .enqueue("b1".into(), vec![reading("ehr", 7, original)], None)
            .await
            .unwrap();
        let sending = due_at(&*a, now_ms(), &[]).await;
        assert_eq!(sending.len(), 1);
        let second = b
            .enqueue("b2".into(), vec![reading("ehr", 7, corrected)], None)
            .await
            .unwrap();
        assert_eq!(second[0].disposition, Disposition::Amended);
        assert!(
            due_at(&*b, now_ms(), &[]).await.is_empty(),
            "the correction waits while replica a sends the original"
        );
        a.settle(vec![(first[0].message_id, delivered())])
            .await
            .unwrap();
        let next = due_at(&*b, now_ms(), &[]).await;
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].id, second[0].message_id);
        assert!(String::from_utf8_lossy(&next[0].body).contains("amended"));
        // The same new reading to both at once: one message, the other a resend.
        let (x, y) = tokio::join!(
            a.enqueue("b3".into(), vec![reading("ehr", 8, original)], None),
            b.enqueue("b4".into(), vec![reading("ehr", 8, original)], None),
        );
        let mut dispositions = [x.unwrap()[0].disposition, y.unwrap()[0].disposition];
        dispositions.sort_by_key(|d| d.as_str());
        assert_eq!(dispositions, [Disposition::Created, Disposition::Unchanged]);
    }

    /// With a `ca`, the connection is TLS and the server's certificate is checked: a server
    /// that takes TLS only is reached; one whose certificate another CA signed is not; and
    /// plain TCP is refused by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_ca_the_connection_is_tls_and_the_server_is_checked() {
        use crate::certs::{LeafSpec, TestCa};
        let ca = TestCa::new("PostgreSQL test CA").unwrap();
        let server = ca.issue(&LeafSpec::localhost_server()).unwrap();
        let cluster = tokio::task::spawn_blocking(move || {
            let cluster = ThrowawayCluster::start_with_tls(&server.cert_pem, &server.key_pem)?;
            cluster.database()?;
            Ok::<_, crate::outbox::throwaway_postgres::ClusterError>(cluster)
        })
        .await
        .unwrap()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let other_ca_file = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca_file, TestCa::new("another CA").unwrap().cert_pem).unwrap();
        let settings = |ca: Option<&std::path::Path>| crate::config::PostgresSettings {
            url: cluster.url("db0"),
            password_file: None,
            ca: ca.map(std::path::Path::to_path_buf),
            replica: None,
            claim_lease: CLAIM_LEASE,
        };
        let open = |ca: Option<&std::path::Path>| {
            let (config, tls) = settings(ca).connection().unwrap();
            PostgresOutbox::open(config, tls, "tls", CLAIM_LEASE)
        };
        let outbox = open(Some(&ca_file)).await.unwrap();
        outbox
            .enqueue("b1".into(), vec![message("ehr", 1)], None)
            .await
            .unwrap();
        assert_eq!(outbox.stats().await.unwrap()[0].pending, 1);
        for (ca, why) in [
            (
                Some(other_ca_file.as_path()),
                "a server certificate no configured CA signed",
            ),
            (None, "plain TCP to a server that takes TLS only"),
        ] {
            let refused = open(ca).await;
            assert!(
                matches!(refused, Err(OutboxError::Storage(_))),
                "{why}: {:?}",
                refused.map(|_| ())
            );
        }
    }

    /// While the server is down a write fails at once with a storage error (the vendor gets
    /// 503 and sends again) and nothing accepted before is lost; once it is back the writer
    /// connects again by itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_restart_refuses_writes_meanwhile_and_loses_nothing() {
        let cluster = tokio::task::spawn_blocking(|| ThrowawayCluster::start().unwrap())
            .await
            .unwrap();
        let cluster = Arc::new(cluster);
        let config = {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.database())
                .await
                .unwrap()
                .unwrap()
        };
        let outbox = PostgresOutbox::open(config, tls(None).unwrap(), "test", CLAIM_LEASE)
            .await
            .unwrap();
        outbox
            .enqueue("b1".into(), vec![message("ehr", 1)], None)
            .await
            .unwrap();
        {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.crash())
                .await
                .unwrap()
                .unwrap();
        }
        let refused = outbox
            .enqueue("b2".into(), vec![message("ehr", 2)], None)
            .await;
        assert!(
            matches!(refused, Err(OutboxError::Storage(_))),
            "{refused:?}"
        );
        {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.restart())
                .await
                .unwrap()
                .unwrap();
        }
        // The writer waits out its reconnect interval, then connects again.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match outbox
                .enqueue("b2".into(), vec![message("ehr", 2)], None)
                .await
            {
                Ok(_) => break,
                Err(OutboxError::Storage(e)) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "not yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let pending: Vec<String> = due_at(&*outbox, now_ms(), &[])
            .await
            .into_iter()
            .map(|p| p.identifier_value)
            .collect();
        assert_eq!(pending, ["v1", "v2"]);
    }
}
