//! The gateway's configuration file (TOML), checked completely before anything starts.
//!
//! Relative paths are resolved against the directory of the configuration file, so a config
//! and its certificates can move together. `gateway.example.toml` documents every key.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {0}", path = .1.display())]
    Invalid(String, PathBuf),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSettings,
    #[serde(default)]
    pub mappings: MappingSettings,
    #[serde(default)]
    pub readings: ReadingSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub runs: RunSettings,
    pub admin: Option<AdminSettings>,
    /// HL7 v2 (IHE PCD-01 ORU^R01) over MLLP, next to the HTTPS API.
    pub hl7v2: Option<Hl7v2Settings>,
    /// Liveness and readiness on a plain HTTP port (see `probes`); none when absent.
    pub probes: Option<ProbeSettings>,
    #[serde(rename = "vendor", default)]
    pub vendors: Vec<VendorSettings>,
    #[serde(rename = "destination", default)]
    pub destinations: Vec<DestinationSettings>,
}

/// The vendor-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// PEM certificate chain and key the gateway presents to vendors.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA certificates; a vendor's client certificate must chain to one of them (and to
    /// its own vendor's `ca`, where one is set).
    pub vendor_ca: Vec<PathBuf>,
    /// Certificate revocation lists (PEM or DER) of the vendor CAs: a revoked certificate
    /// fails the handshake.
    #[serde(default)]
    pub vendor_crl: Vec<PathBuf>,
    /// Where certificates revoked through the admin API are kept (they are refused at once,
    /// on every connection); relative to the config file.
    #[serde(default = "defaults::revocations")]
    pub revocations: PathBuf,
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Requests one vendor may have in progress at once, so that one busy vendor cannot take
    /// every slot of `max_concurrent_requests`; half of it when absent.
    #[serde(default)]
    pub max_concurrent_requests_per_vendor: Option<usize>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// On SIGTERM or Ctrl-C: how long requests in flight may take to finish (and delivery
    /// workers to put down what they hold) before the process exits.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl ServerSettings {
    /// Requests one vendor may have in progress: as configured, else half of the request limit.
    pub fn vendor_share(&self) -> usize {
        self.max_concurrent_requests_per_vendor
            .unwrap_or((self.max_concurrent_requests / 2).max(1))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// A directory of mapping tables; the tables built into the binary when absent.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingSettings {
    /// How far ahead of the gateway's clock a device timestamp may be before the reading is
    /// refused (a console with a wrong clock would otherwise chart data in the future).
    #[serde(default = "defaults::max_future_skew", with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// How far behind the gateway's clock a device timestamp may be before the reading is
    /// refused: older data is a stale buffer or a wrong clock, and would be charted as if
    /// current. Raise it for a planned backfill.
    #[serde(default = "defaults::max_past_age", with = "humantime_serde")]
    pub max_past_age: Duration,
}

impl Default for ReadingSettings {
    fn default() -> Self {
        Self {
            max_future_skew: defaults::max_future_skew(),
            max_past_age: defaults::max_past_age(),
        }
    }
}

/// Where ECMO run events are kept (they decide whose readings are whose).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    /// The run store (SQLite); relative to the config file.
    #[serde(default = "defaults::run_store")]
    pub store: PathBuf,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            store: defaults::run_store(),
        }
    }
}

/// How accepted batches reach the destinations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    #[serde(default)]
    pub mode: DeliveryMode,
    /// The outbox file (SQLite); relative to the config file.
    #[serde(default = "defaults::outbox")]
    pub outbox: PathBuf,
    /// How long delivered messages stay in the outbox for status look-ups; a delivered
    /// reading stays at least as long as a correction of it can be accepted
    /// (`max_past_age` + `max_future_skew`). Pending messages are kept until delivered.
    #[serde(default = "defaults::keep_delivered", with = "humantime_serde")]
    pub keep_delivered: Duration,
    /// How long dead letters stay for an operator to replay them; then they are deleted (each
    /// deletion is logged as a warning with the count).
    #[serde(default = "defaults::keep_dead", with = "humantime_serde")]
    pub keep_dead: Duration,
    /// Undelivered messages the outbox holds at most, all destinations together; past it new
    /// requests get 503 with Retry-After until delivery catches up (counted every second, so
    /// it may be passed by a second of ingest). The queue's bound, before the disk's.
    #[serde(default = "defaults::max_pending")]
    pub max_pending: u64,
    /// The outbox on a PostgreSQL server instead of the SQLite file (README, "Choosing the
    /// store").
    #[serde(default)]
    pub postgres: Option<PostgresSettings>,
}

/// Where the PostgreSQL outbox is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgresql://user@host:port/database` (or `host=... user=... dbname=...`), without a
    /// password.
    pub url: String,
    /// A file whose first line is the password; relative to the config file.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The CA certificate(s) (PEM) that signed the server's: the connection is then TLS and
    /// the server's certificate is checked against the url's host; relative to the config
    /// file. Without it the connection is plain TCP.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This gateway's name among the replicas sharing the store: unique to it and the same
    /// after a restart (default: the host name and the vendor port, `host:8443`; with port 0,
    /// the process id instead).
    #[serde(default)]
    pub replica: Option<String>,
    /// How long a replica's claim on the messages it is sending lasts (extended every third
    /// of it while the replica lives): how long the others wait before they take over the
    /// messages of one that died.
    #[serde(default = "defaults::claim_lease", with = "humantime_serde")]
    pub claim_lease: Duration,
}

impl PostgresSettings {
    /// [`Self::replica`], or the host name and `port`.
    pub fn replica_name(&self, port: u16) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gateway".into());
            match port {
                // A port picked at start names nothing stable: the process then.
                0 => format!("{host}:pid-{}", std::process::id()),
                port => format!("{host}:{port}"),
            }
        })
    }

    /// The connection settings, with the password read from its file, and the TLS to
    /// connect with (required with a `ca`, not used without).
    pub fn connection(
        &self,
    ) -> Result<(tokio_postgres::Config, crate::outbox::postgres::PostgresTls), String> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| format!("[delivery.postgres] url: {e}"))?;
        let tls = crate::outbox::postgres::tls(self.ca.as_deref())
            .map_err(|e| format!("[delivery.postgres] ca: {e}"))?;
        config.ssl_mode(match self.ca {
            Some(_) => tokio_postgres::config::SslMode::Require,
            None => tokio_postgres::config::SslMode::Disable,
        });
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("[delivery.postgres] password_file {}: {e}", path.display())
            })?;
            config.password(text.lines().next().unwrap_or_default());
        }
        Ok((config, tls))
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            mode: DeliveryMode::default(),
            outbox: defaults::outbox(),
            keep_delivered: defaults::keep_delivered(),
            keep_dead: defaults::keep_dead(),
            max_pending: defaults::max_pending(),
            postgres: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Answer 202 once the batch is durably in the outbox; workers deliver in the background.
    #[default]
    Outbox,
    /// Deliver while the vendor waits; answer 200 once every destination holds the batch.
    Direct,
}

/// The MLLP listener for HL7 v2 ORU^R01 (IHE PCD-01).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7v2Settings {
    pub listen: SocketAddr,
    /// Mutual TLS with the HTTPS listener's certificate, vendor CAs and identities (default).
    /// Off only for a closed device network, where `plain_vendor` is every connection's vendor.
    #[serde(default = "defaults::yes")]
    pub tls: bool,
    #[serde(default)]
    pub plain_vendor: Option<String>,
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// How long a connection may stay silent between messages.
    #[serde(default = "defaults::mllp_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long one message may take to arrive once its first byte has.
    #[serde(default = "defaults::mllp_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(default = "defaults::mllp_max_connections")]
    pub max_connections: usize,
    /// Assigning authority namespace ids (PID-3.4.1) -> the patient identifier system URI.
    #[serde(default)]
    pub patient_identifier_systems: HashMap<String, String>,
}

/// The orchestrator's probes: plain HTTP, no certificate, status words only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSettings {
    pub listen: SocketAddr,
}

/// The operators' listener (admin API), mutual TLS with admin certificates only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates admin client certificates must chain to.
    pub client_ca: Vec<PathBuf>,
    /// Revocation lists (PEM or DER) of the admin CAs.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// Certificate names (CN or SAN) that hold the admin role; any other certificate, a
    /// vendor's included, gets 403.
    pub identities: Vec<String>,
    /// Operators who may sign in to the web console with a password instead of an admin
    /// certificate. With it, the admin listener also takes connections without a client
    /// certificate; everything but the console's page and sign-in then needs a session.
    #[serde(default)]
    pub console: Option<ConsoleSettings>,
}

/// `[admin.console]`: the web console's sign-in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    pub users: Vec<ConsoleUserSettings>,
    /// A session ends after this long without a request.
    #[serde(default = "defaults::console_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUserSettings {
    pub name: String,
    /// Argon2 hash in PHC form, from `gateway hash-password` (never the password itself).
    pub password_hash: String,
}

/// A device vendor: who its certificate says it is, and which devices it may post for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorSettings {
    pub name: String,
    /// Matched against the client certificate's subject CN and its DNS, URI and e-mail SANs.
    pub identity: String,
    /// Device serial numbers this vendor may post for.
    #[serde(default)]
    pub serials: Vec<String>,
    /// Device models this vendor may post for, whatever the serial.
    #[serde(default)]
    pub models: Vec<String>,
    /// The CA(s), among `server.vendor_ca`, this vendor's certificates must chain to: a
    /// certificate with the right name from another vendor's CA is refused. Empty: any.
    #[serde(default)]
    pub ca: Vec<PathBuf>,
    /// SHA-256 fingerprints (hex, `:` separators allowed) of the only certificates this
    /// vendor may use. Empty: any certificate with its identity (and from its CA).
    #[serde(default)]
    pub fingerprints: Vec<String>,
}

/// An EHR FHIR endpoint the gateway writes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSettings {
    pub name: String,
    /// What the destination speaks: FHIR R4 over HTTPS (the default) or HL7 v2 ORU^R01 over
    /// MLLP with TLS.
    #[serde(default)]
    pub kind: DestinationKind,
    /// FHIR base URL, `https://`; for `kind = "hl7v2"` the receiver, `mllps://host:port`.
    pub base_url: String,
    /// PEM CA certificates the EHR's server certificate must chain to.
    pub ca: Vec<PathBuf>,
    /// The gateway's client certificate chain and key for this EHR (mutual TLS); both or
    /// neither. Without them the EHR must take a SMART bearer token (`[destination.smart]`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// SMART Backend Services: a bearer token from the EHR's authorization server on every
    /// request (with or without the client certificate).
    pub smart: Option<SmartSettings>,
    #[serde(default)]
    pub write: WriteMode,
    #[serde(default)]
    pub bundle: BundleMode,
    /// The FHIR format of request bodies (and of the answers asked for).
    #[serde(default)]
    pub format: FhirFormat,
    /// Largest transaction Bundle sent; bigger batches are split.
    #[serde(default = "defaults::max_bundle_entries")]
    pub max_bundle_entries: usize,
    /// Time allowed for one HTTP attempt.
    #[serde(default = "defaults::destination_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per request, the first included, on 408, 429, 5xx and connection failures.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Requests in flight to this destination at once; in outbox mode also the most
    /// bundles in flight.
    #[serde(default = "defaults::destination_concurrency")]
    pub concurrency: usize,
    /// Outbox mode: how long a partial batch waits for more before it is sent.
    #[serde(default = "defaults::linger", with = "humantime_serde")]
    pub linger: Duration,
    /// Outbox mode: attempts per message before it is dead-lettered.
    #[serde(default = "defaults::message_attempts")]
    pub message_attempts: u32,
    /// Outbox mode: longest wait between two attempts of a message.
    #[serde(default = "defaults::retry_backoff_max", with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Longest `Retry-After` of this EHR that is honoured; a longer one counts as this long,
    /// so a misconfigured or hostile EHR cannot stop delivery for days.
    #[serde(default = "defaults::retry_after_max", with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// Failed sends in a row that open the circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// First pause of an open breaker; doubles per failed probe up to `retry_backoff_max`.
    #[serde(default = "defaults::breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Requests per second at most to this destination; unlimited when absent.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Which resources this destination takes; everything when absent.
    #[serde(default)]
    pub only: crate::delivery::routing::RouteFilter,
    /// What a corrected reading (same device, parameter and time, another value) does here.
    #[serde(default)]
    pub corrections: Corrections,
    /// Outbox mode: a Provenance per accepted request and kind of write (device, vendor,
    /// mapping table, gateway build, reason). Off for EHRs that refuse Provenance writes.
    #[serde(default = "defaults::provenance")]
    pub provenance: bool,
    /// How references to the patient, the console's Device, the run's Procedure and (in
    /// Provenance) the written resources are made: by identifier, or literal for EHRs that
    /// need `Patient/123` (see `delivery::references`).
    #[serde(default)]
    pub references: crate::delivery::references::ReferenceStyle,
    /// Literal references: what happens to a resource whose patient the EHR does not know.
    #[serde(default)]
    pub unknown_patient: crate::delivery::references::UnknownPatient,
    /// Literal references: link Observations to the patient's current Encounter.
    #[serde(default)]
    pub encounter: crate::delivery::references::EncounterLink,
    /// Literal references: how long an id the EHR gave (or a search found) is used.
    #[serde(default = "defaults::reference_cache_ttl", with = "humantime_serde")]
    pub reference_cache_ttl: Duration,
    /// `kind = "hl7v2"`: the MSH sender and receiver names.
    #[serde(default)]
    pub hl7v2: OruSettings,
    /// Outbox mode: chart one reading per parameter per interval (a flowsheet's q15m) instead
    /// of every reading; when absent every reading is sent.
    pub charting: Option<ChartingSettings>,
    /// Takes waveforms (readings with `samples`, written as Observations with SampledData).
    /// Off by default: most EHRs chart numbers, not curves.
    #[serde(default)]
    pub waveforms: bool,
}

/// `[destination.charting]`: of each device's parameter, one Observation per interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartingSettings {
    /// The interval, whole minutes that divide a day (`"1m"`, `"15m"`, `"1h"`), aligned to UTC.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Which reading of an interval is charted.
    #[serde(default)]
    pub summary: ChartSummary,
    /// How long after an interval ends its value is sent: readings of the interval that
    /// arrive by then are charted without an update at the EHR; later ones update it.
    #[serde(default = "defaults::chart_settle", with = "humantime_serde")]
    pub settle: Duration,
}

/// Which reading of an interval a charting destination gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChartSummary {
    /// The latest by device time, as a nurse charts the value shown at the end of the interval.
    #[default]
    Last,
    /// The mean of the interval's values (a parameter whose value is not a quantity is
    /// charted as its latest reading).
    Mean,
    /// The lowest of the interval's values.
    Min,
    /// The highest of the interval's values.
    Max,
}

impl ChartSummary {
    /// The statistic charted instead of the latest reading, if any.
    pub fn statistic(self) -> Option<mappings::ChartStatistic> {
        match self {
            Self::Last => None,
            Self::Mean => Some(mappings::ChartStatistic::Mean),
            Self::Min => Some(mappings::ChartStatistic::Minimum),
            Self::Max => Some(mappings::ChartStatistic::Maximum),
        }
    }
}

/// The protocol of a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestinationKind {
    #[default]
    Fhir,
    /// ORU^R01 (IHE PCD-01 layout) over MLLP with mutual TLS; Observations only.
    Hl7v2,
}

/// MSH-3 to MSH-6 of the ORU^R01 messages a `kind = "hl7v2"` destination gets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OruSettings {
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
}

impl Default for OruSettings {
    fn default() -> Self {
        Self {
            sending_application: "ECMO_GATEWAY".into(),
            sending_facility: String::new(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
        }
    }
}

/// SMART Backend Services (SMART App Launch 2.x): `client_credentials` with a client assertion
/// JWT signed by the gateway's own key (`private_key_jwt`), whose public half the EHR holds as
/// a registered JWKS (`gateway jwks`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartSettings {
    /// The client id the EHR registered for the gateway.
    pub client_id: String,
    /// The token endpoint; when absent it is read from the EHR's
    /// `{base_url}/.well-known/smart-configuration`.
    pub token_url: Option<String>,
    /// Scopes asked for, in SMART v1 (`system/Observation.write`) or v2
    /// (`system/Observation.cu`) syntax, as registered for the client.
    pub scopes: Vec<String>,
    /// PKCS#8 PEM private keys, EC P-384 (ES384) or RSA (RS384). The first signs; all are
    /// published in the JWKS, so a new key can be registered before it takes over (rotation).
    pub keys: Vec<PathBuf>,
    /// A token is renewed when it has less than this left, so no request goes out with one that
    /// expires on the way.
    #[serde(default = "defaults::renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
}

/// What the gateway does when a device sends a reading again with a different value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corrections {
    /// The EHR's Observation is updated with `status = amended`; its earlier version stays in
    /// the EHR's history.
    #[default]
    Amend,
    /// The destination must never be overwritten: the device gets 409, nothing is accepted.
    Reject,
}

/// How a resource is written so that sending it twice is harmless.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// `POST` with `If-None-Exist: identifier=...`: works on every FHIR server.
    #[default]
    ConditionalCreate,
    /// `PUT [type]/[id]` with an id derived from the identifier: for servers that allow
    /// client-assigned ids; no search needed, so no conditional-create race.
    Put,
    /// `POST [type]` alone, for EHRs that take neither conditional create nor client-assigned
    /// ids (vital signs one create at a time): the gateway searches by identifier before each
    /// create, so a resend after a lost answer or a crash finds what is there instead of
    /// writing it twice. Nothing is ever overwritten: corrections are refused to the device
    /// (`corrections = "reject"`), and a later version of a run's Procedure or a retraction
    /// is dead-lettered for an operator. One request per resource (`bundle = "single"`).
    Create,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BundleMode {
    /// One transaction Bundle per batch: all or nothing at the EHR.
    #[default]
    Transaction,
    /// One request per resource.
    Single,
}

/// FHIR's two wire formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FhirFormat {
    /// `application/fhir+json`.
    #[default]
    Json,
    /// `application/fhir+xml`, for EHR interfaces that take only XML.
    Xml,
}

mod defaults {
    use std::time::Duration;
    pub fn yes() -> bool {
        true
    }
    pub fn max_frame_bytes() -> usize {
        1024 * 1024
    }
    pub fn mllp_idle_timeout() -> Duration {
        Duration::from_secs(10 * 60)
    }
    pub fn mllp_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn mllp_max_connections() -> usize {
        256
    }
    pub fn console_idle_timeout() -> Duration {
        Duration::from_secs(30 * 60)
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_body_bytes() -> usize {
        1024 * 1024
    }
    /// About 1.3 GiB of outbox at about 0.65 KiB per message (bodies compressed).
    pub fn max_pending() -> u64 {
        2_000_000
    }
    pub fn max_concurrent_requests() -> usize {
        256
    }
    pub fn max_connections() -> usize {
        1024
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_future_skew() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_past_age() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn provenance() -> bool {
        true
    }
    pub fn max_bundle_entries() -> usize {
        500
    }
    pub fn destination_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn destination_concurrency() -> usize {
        8
    }
    pub fn claim_lease() -> std::time::Duration {
        crate::outbox::postgres::CLAIM_LEASE
    }

    pub fn outbox() -> std::path::PathBuf {
        "outbox.sqlite".into()
    }
    pub fn run_store() -> std::path::PathBuf {
        "runs.sqlite".into()
    }
    pub fn keep_delivered() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn revocations() -> std::path::PathBuf {
        "revoked-certificates.json".into()
    }
    pub fn keep_dead() -> Duration {
        Duration::from_secs(30 * 24 * 3600)
    }
    pub fn linger() -> Duration {
        Duration::from_millis(20)
    }
    pub fn message_attempts() -> u32 {
        20
    }
    pub fn retry_backoff_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn retry_after_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown() -> Duration {
        Duration::from_secs(2)
    }
    pub fn chart_settle() -> Duration {
        Duration::from_secs(30)
    }
    pub fn reference_cache_ttl() -> Duration {
        Duration::from_secs(600)
    }
    pub fn renew_before() -> Duration {
        Duration::from_secs(60)
    }
}

impl SmartSettings {
    fn check(&self) -> Result<(), String> {
        if self.client_id.trim().is_empty() {
            return Err("client_id must not be empty".into());
        }
        if self.keys.is_empty() {
            return Err("keys must name at least one private key file".into());
        }
        if let Some(url) = &self.token_url {
            let uri: http::Uri = url.parse().map_err(|e| format!("token_url: {e}"))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() {
                return Err("token_url must be an https:// URL".into());
            }
        }
        if self.scopes.is_empty() {
            return Err(
                "scopes must name what the gateway writes, e.g. \"system/Observation.cu\"".into(),
            );
        }
        if let Some(bad) = self.scopes.iter().find(|s| {
            !s.starts_with("system/") || s.contains(char::is_whitespace) || !s.contains('.')
        }) {
            return Err(format!(
                "scope '{bad}' is not a system scope (system/<Type>.<permissions>, e.g. system/Observation.cu or system/Observation.write)"
            ));
        }
        Ok(())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// A config read from `path`: relative paths in it are taken from `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .check()
            .map_err(|reason| ConfigError::Invalid(reason, path.to_owned()))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.server.cert);
        fix(&mut self.server.key);
        self.server.vendor_ca.iter_mut().for_each(fix);
        self.server.vendor_crl.iter_mut().for_each(fix);
        fix(&mut self.server.revocations);
        for v in &mut self.vendors {
            v.ca.iter_mut().for_each(fix);
        }
        if let Some(dir) = &mut self.mappings.dir {
            fix(dir);
        }
        fix(&mut self.delivery.outbox);
        if let Some(postgres) = &mut self.delivery.postgres {
            postgres.password_file.iter_mut().for_each(fix);
            postgres.ca.iter_mut().for_each(fix);
        }
        fix(&mut self.runs.store);
        if let Some(admin) = &mut self.admin {
            fix(&mut admin.cert);
            fix(&mut admin.key);
            admin.client_ca.iter_mut().for_each(fix);
            admin.crl.iter_mut().for_each(fix);
        }
        for d in &mut self.destinations {
            d.ca.iter_mut().for_each(fix);
            d.client_cert.iter_mut().for_each(fix);
            d.client_key.iter_mut().for_each(fix);
            if let Some(smart) = &mut d.smart {
                smart.keys.iter_mut().for_each(fix);
            }
        }
    }

    /// Everything a typo could break, found before the gateway listens.
    fn check(&self) -> Result<(), String> {
        if self.server.vendor_ca.is_empty() {
            return Err("server.vendor_ca must name at least one CA file".into());
        }
        if self.server.max_body_bytes == 0 || self.server.max_concurrent_requests == 0 {
            return Err(
                "server.max_body_bytes and server.max_concurrent_requests must be > 0".into(),
            );
        }
        if self.server.max_concurrent_requests_per_vendor == Some(0) {
            return Err("server.max_concurrent_requests_per_vendor must be > 0".into());
        }
        if self.vendors.is_empty() {
            return Err("no [[vendor]]: nobody could post".into());
        }
        let mut names = HashSet::new();
        let mut identities = HashMap::new();
        for v in &self.vendors {
            if !names.insert(v.name.as_str()) {
                return Err(format!("vendor '{}' is defined twice", v.name));
            }
            if let Some(other) = identities.insert(v.identity.as_str(), v.name.as_str()) {
                return Err(format!(
                    "vendors '{other}' and '{}' share the certificate identity '{}'",
                    v.name, v.identity
                ));
            }
            if let Some(bad) = v
                .fingerprints
                .iter()
                .find(|f| crate::revocations::parse_fingerprint(f).is_none())
            {
                return Err(format!(
                    "vendor '{}': fingerprint '{bad}' is not a SHA-256 fingerprint (64 hex digits)",
                    v.name
                ));
            }
            if let Some(ca) = v.ca.iter().find(|ca| !self.server.vendor_ca.contains(ca)) {
                return Err(format!(
                    "vendor '{}': ca '{}' is not in server.vendor_ca, so the handshake would refuse its certificates",
                    v.name,
                    ca.display()
                ));
            }
            if v.serials.is_empty() && v.models.is_empty() {
                return Err(format!(
                    "vendor '{}' lists no serials and no models: it could post for no device",
                    v.name
                ));
            }
        }
        if let Some(admin) = &self.admin {
            if admin.identities.is_empty() || admin.client_ca.is_empty() {
                return Err("admin: identities and client_ca must not be empty".into());
            }
            if let Some(v) = self
                .vendors
                .iter()
                .find(|v| admin.identities.contains(&v.identity))
            {
                return Err(format!(
                    "admin: identity '{}' is also vendor '{}'; roles must not share a certificate",
                    v.identity, v.name
                ));
            }
            if let Some(console) = &admin.console {
                if console.users.is_empty() {
                    return Err("admin.console: users must not be empty".into());
                }
                let mut seen = HashSet::new();
                for user in &console.users {
                    if user.name.is_empty() || !seen.insert(user.name.as_str()) {
                        return Err(format!(
                            "admin.console: user name '{}' is empty or given twice",
                            user.name
                        ));
                    }
                    let parsed = argon2::PasswordHash::new(&user.password_hash);
                    if !parsed.is_ok_and(|h| h.algorithm.as_str().starts_with("argon2")) {
                        return Err(format!(
                            "admin.console: the password_hash of user '{}' is not an Argon2 hash in PHC form ($argon2id$...): make one with `gateway hash-password`",
                            user.name
                        ));
                    }
                }
            }
        }
        if let Some(hl7) = &self.hl7v2 {
            match (&hl7.plain_vendor, hl7.tls) {
                (Some(_), true) => {
                    return Err("hl7v2: plain_vendor is for tls = false only; with TLS the certificate names the vendor".into());
                }
                (None, false) => {
                    return Err("hl7v2: tls = false needs plain_vendor, the vendor every plain connection posts as".into());
                }
                (Some(name), false) if !self.vendors.iter().any(|v| &v.name == name) => {
                    return Err(format!(
                        "hl7v2: plain_vendor '{name}' is not a configured [[vendor]]"
                    ));
                }
                _ => {}
            }
            if hl7.max_frame_bytes == 0 || hl7.max_connections == 0 {
                return Err("hl7v2: max_frame_bytes and max_connections must be > 0".into());
            }
            if let Some((namespace, system)) = hl7
                .patient_identifier_systems
                .iter()
                .find(|(_, system)| !system.contains(':'))
            {
                return Err(format!(
                    "hl7v2.patient_identifier_systems: '{namespace}' = '{system}' is not an absolute URI (urn:oid:... or https://...)"
                ));
            }
        }
        if self.destinations.is_empty() {
            return Err("no [[destination]]: readings would have nowhere to go".into());
        }
        if let Some(postgres) = &self.delivery.postgres {
            let url: tokio_postgres::Config = postgres
                .url
                .parse()
                .map_err(|e| format!("[delivery.postgres] url: {e}"))?;
            if url.get_ssl_mode() == tokio_postgres::config::SslMode::Require
                && postgres.ca.is_none()
            {
                return Err(
                    "[delivery.postgres] url asks for sslmode=require: name the CA that signed the server's certificate in ca".into(),
                );
            }
            if url.get_password().is_some() {
                return Err(
                    "[delivery.postgres] url: holds a password; put it in password_file instead (the config file is not a place for secrets)".into(),
                );
            }
            if self.delivery.mode != DeliveryMode::Outbox {
                return Err("[delivery.postgres] needs [delivery] mode = \"outbox\"".into());
            }
            if postgres.claim_lease < Duration::from_secs(1) {
                return Err("[delivery.postgres] claim_lease must be at least 1s".into());
            }
        }
        if self.delivery.max_pending == 0 {
            return Err(
                "[delivery] max_pending must be at least 1: 0 would refuse every request".into(),
            );
        }
        let mut names = HashSet::new();
        for d in &self.destinations {
            // The name keys the outbox, labels metrics and is a path segment of the admin API.
            if d.name.trim().is_empty() || d.name.chars().any(char::is_control) {
                return Err(format!(
                    "destination name {:?}: must not be empty or hold control characters",
                    d.name
                ));
            }
            if !names.insert(d.name.as_str()) {
                return Err(format!("destination '{}' is defined twice", d.name));
            }
            if d.kind == DestinationKind::Hl7v2 {
                self.check_oru_destination(d)?;
            }
            let uri: http::Uri = d
                .base_url
                .parse()
                .map_err(|e| format!("destination '{}': base_url: {e}", d.name))?;
            if d.kind == DestinationKind::Fhir
                && (uri.scheme_str() != Some("https") || uri.host().is_none())
            {
                return Err(format!(
                    "destination '{}': base_url must be an https:// URL",
                    d.name
                ));
            }
            if d.ca.is_empty() {
                return Err(format!(
                    "destination '{}': ca must name at least one CA file",
                    d.name
                ));
            }
            match (&d.client_cert, &d.client_key, &d.smart) {
                (Some(_), None, _) | (None, Some(_), _) => {
                    return Err(format!(
                        "destination '{}': client_cert and client_key go together",
                        d.name
                    ));
                }
                (None, None, None) => {
                    return Err(format!(
                        "destination '{}': neither a client certificate (client_cert, client_key) nor SMART credentials ([destination.smart]): the EHR could not tell the gateway from anybody",
                        d.name
                    ));
                }
                _ => {}
            }
            if let Some(smart) = &d.smart {
                smart
                    .check()
                    .map_err(|why| format!("destination '{}': smart: {why}", d.name))?;
            }
            if d.encounter != crate::delivery::references::EncounterLink::None
                && d.references != crate::delivery::references::ReferenceStyle::Literal
            {
                return Err(format!(
                    "destination '{}': encounter = \"current\" finds the Encounter of the patient's literal reference: it needs references = \"literal\"",
                    d.name
                ));
            }
            let takes = |t: &str| {
                d.only.resource_types.is_empty()
                    || d.only
                        .resource_types
                        .iter()
                        .any(|o| o.eq_ignore_ascii_case(t))
            };
            if d.references == crate::delivery::references::ReferenceStyle::Literal
                && takes("Observation")
                && !takes("DeviceMetric")
            {
                return Err(format!(
                    "destination '{}': each Observation points at its device's DeviceMetric, which with references = \"literal\" must be at the EHR: add \"DeviceMetric\" to [destination.only] resource_types",
                    d.name
                ));
            }
            if d.references == crate::delivery::references::ReferenceStyle::Literal
                && takes("DeviceMetric")
                && !takes("Device")
            {
                return Err(format!(
                    "destination '{}': each DeviceMetric hangs under its module's channel Device, which with references = \"literal\" must be at the EHR: add \"Device\" to [destination.only] resource_types",
                    d.name
                ));
            }
            if d.waveforms && self.delivery.mode != DeliveryMode::Outbox {
                return Err(format!(
                    "destination '{}': waveforms = true needs [delivery] mode = \"outbox\"",
                    d.name
                ));
            }
            if let Some(charting) = &d.charting {
                let fail = |why: &str| {
                    Err(format!(
                        "destination '{}': [destination.charting] {why}",
                        d.name
                    ))
                };
                if !mappings::valid_chart_interval(charting.interval) {
                    return fail(
                        "interval must be whole minutes that divide a day, as \"15m\" or \"1h\"",
                    );
                }
                if self.delivery.mode != DeliveryMode::Outbox {
                    return fail(
                        "needs [delivery] mode = \"outbox\" (an interval is sent when it ends)",
                    );
                }
                // An HL7 v2 receiver gets an update as a correction (OBX-11 C).
                if d.kind == DestinationKind::Fhir && d.write == WriteMode::Create {
                    return fail(
                        "updates an interval's Observation when a later reading comes: its write must not be \"create\"",
                    );
                }
            }
            if d.write == WriteMode::Create
                && (d.bundle != BundleMode::Single || d.corrections != Corrections::Reject)
            {
                return Err(format!(
                    "destination '{}': write = \"create\" writes one resource at a time and never overwrites: it needs bundle = \"single\" and corrections = \"reject\"",
                    d.name
                ));
            }
            if d.max_attempts == 0
                || d.concurrency == 0
                || d.max_bundle_entries == 0
                || d.message_attempts == 0
            {
                return Err(format!(
                    "destination '{}': max_attempts, concurrency, max_bundle_entries and message_attempts must be > 0",
                    d.name
                ));
            }
        }
        Ok(())
    }

    /// What an HL7 v2 destination cannot do: it takes Observations only, through the outbox,
    /// with the gateway's client certificate.
    fn check_oru_destination(&self, d: &DestinationSettings) -> Result<(), String> {
        let fail = |why: &str| {
            Err(format!(
                "destination '{}' (kind = \"hl7v2\"): {why}",
                d.name
            ))
        };
        if crate::delivery::oru::mllps_address(&d.base_url).is_none() {
            return fail("base_url must be mllps://host:port");
        }
        if self.delivery.mode != DeliveryMode::Outbox {
            return fail("needs [delivery] mode = \"outbox\"");
        }
        if d.smart.is_some() || d.client_cert.is_none() {
            return fail(
                "MLLP has no bearer tokens: give client_cert and client_key, no [destination.smart]",
            );
        }
        if d.references != crate::delivery::references::ReferenceStyle::Identifier {
            return fail(
                "PID-3 carries the patient's identifier: references must stay \"identifier\"",
            );
        }
        if d.only.resource_types.iter().any(|t| t != "Observation") {
            return fail("ORU^R01 carries Observations only (only.resource_types)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8443"
cert = "server.pem"
key = "server.key"
vendor_ca = ["ca.pem"]

[[vendor]]
name = "getinge"
identity = "getinge"
models = ["CARDIOHELP-i"]

[[destination]]
name = "ehr"
base_url = "https://127.0.0.1:9443/fhir"
ca = ["ca.pem"]
client_cert = "client.pem"
client_key = "client.key"
"#;

    const SMART: &str = r#"
[destination.smart]
client_id = "ecmo-gateway"
token_url = "https://ehr/token"
scopes = ["system/Observation.cu"]
keys = ["smart.pem"]
"#;

    #[test]
    fn smart_without_a_client_certificate_is_a_destination() {
        let text = format!("{MINIMAL}{SMART}")
            .replace("client_key = \"client.key\"\n", "")
            .replace("client_cert = \"client.pem\"\n", "");
        let c = load(&text).unwrap();
        let smart = c.destinations[0].smart.as_ref().unwrap();
        assert!(smart.keys[0].is_absolute(), "key paths resolved");
        assert_eq!(smart.renew_before, Duration::from_secs(60));
        assert!(c.destinations[0].client_cert.is_none());
    }

    #[test]
    fn an_hl7v2_destination_may_chart_intervals_and_take_waveforms() {
        let text = format!(
            "{MINIMAL}[destination.charting]\ninterval = \"15m\"\nsummary = \"mean\"\n"
        )
        .replace(
            "[[destination]]",
            "[delivery]\nmode = \"outbox\"\n\n[[destination]]\nkind = \"hl7v2\"\nwaveforms = true",
        )
        .replace("https://127.0.0.1:9443/fhir", "mllps://127.0.0.1:2575");
        let c = load(&text).unwrap();
        assert_eq!(c.destinations[0].kind, DestinationKind::Hl7v2);
        assert!(c.destinations[0].waveforms);
        assert!(c.destinations[0].charting.is_some());
    }

    #[test]
    fn the_postgres_store_takes_its_password_from_a_file_never_the_url() {
        let with = |postgres: &str| {
            MINIMAL.replace(
                "[[destination]]",
                &format!("[delivery.postgres]\n{postgres}\n\n[[destination]]"),
            )
        };
        let c = load(&with(
            "url = \"postgresql://gateway@db.internal:5433/ecmo\"\npassword_file = \"pg-password\"",
        ))
        .unwrap();
        let postgres = c.delivery.postgres.as_ref().unwrap();
        assert!(postgres.password_file.as_ref().unwrap().is_absolute());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pg-password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let settings = PostgresSettings {
            password_file: Some(file),
            ..postgres.clone()
        };
        let (connection, _) = settings.connection().unwrap();
        assert_eq!(connection.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            connection.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable,
            "plain TCP without a ca"
        );
        assert_eq!(connection.get_ports(), [5433]);
        for (postgres, reason) in [
            (
                "url = \"postgresql://gateway:s3cret@db.internal/ecmo\"",
                "holds a password",
            ),
            (
                "url = \"postgresql://db.internal:notaport/ecmo\"",
                "[delivery.postgres] url",
            ),
            (
                "url = \"postgresql://gateway@db.internal/ecmo?sslmode=require\"",
                "name the CA",
            ),
        ] {
            let error = load(&with(postgres)).unwrap_err().to_string();
            assert!(error.contains(reason), "{postgres}: {error}");
        }
        let direct = with("url = \"postgresql://gateway@db.internal/ecmo\"").replace(
            "[delivery.postgres]",
            "[delivery]\nmode = \"direct\"\n\n[delivery.postgres]",
        );
        assert!(
            load(&direct)
                .unwrap_err()
                .to_string()
                .contains("needs [delivery] mode = \"outbox\"")
        );
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = load(MINIMAL).unwrap();
        assert!(c.server.cert.is_absolute());
        assert_eq!(c.server.request_timeout, Duration::from_secs(30));
        assert_eq!(c.destinations[0].write, WriteMode::ConditionalCreate);
        assert_eq!(c.destinations[0].bundle, BundleMode::Transaction);
        assert_eq!(c.readings.max_future_skew, Duration::from_secs(300));
        assert_eq!(c.readings.max_past_age, Duration::from_secs(24 * 3600));
        assert_eq!(c.destinations[0].corrections, Corrections::Amend);
    }

    #[test]
    fn the_documented_example_is_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.example.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.vendors.len(), 3);
        assert!(c.server.cert.ends_with("certs/dev/server.pem"));
    }

    #[test]
    fn refuses_what_would_break_at_run_time() {
        let cases = [
            (MINIMAL.replace("https://127", "http://127"), "https://"),
            (
                MINIMAL.replace("[[destination]]", "[delivery]\nmax_pending = 0\n\n[[destination]]"),
                "max_pending must be at least 1",
            ),
            (
                MINIMAL.replace("name = \"ehr\"", "name = \"e\\u0000hr\""),
                "must not be empty or hold control characters",
            ),
            (
                MINIMAL.replace("models = [\"CARDIOHELP-i\"]", ""),
                "could post for no device",
            ),
            (
                MINIMAL.replace("write", "x") + "colour = 1\n",
                "unknown field",
            ),
            (
                MINIMAL
                    .replace("request_timeout", "x")
                    .replace("[server]", "[server]\nrequest_timeout = \"soon\""),
                "request_timeout",
            ),
            (
                MINIMAL.replace("client_key = \"client.key\"\n", ""),
                "client_cert and client_key go together",
            ),
            (
                MINIMAL
                    .replace("client_key = \"client.key\"\n", "")
                    .replace("client_cert = \"client.pem\"\n", ""),
                "neither a client certificate",
            ),
            (
                format!("{MINIMAL}{SMART}")
                    .replace("scopes = [\"system/Observation.cu\"]", "scopes = []"),
                "smart: scopes must name",
            ),
            (
                format!("{MINIMAL}{SMART}")
                    .replace("system/Observation.cu", "patient/Observation.rs"),
                "is not a system scope",
            ),
            (
                format!("{MINIMAL}{SMART}").replace("keys = [\"smart.pem\"]", "keys = []"),
                "keys must name",
            ),
            (
                format!("{MINIMAL}{SMART}").replace("https://ehr/token", "http://ehr/token"),
                "token_url must be an https:// URL",
            ),
            (
                MINIMAL.replace("[[destination]]", "[delivery]\nmode = \"outbox\"\n\n[[destination]]\nkind = \"hl7v2\""),
                "base_url must be mllps://host:port",
            ),
            (
                MINIMAL
                    .replace(
                        "[[destination]]",
                        "[delivery]\nmode = \"direct\"\n\n[[destination]]\nkind = \"hl7v2\"",
                    )
                    .replace("https://127.0.0.1:9443/fhir", "mllps://127.0.0.1:2575"),
                "needs [delivery] mode = \"outbox\"",
            ),
            (
                MINIMAL
                    .replace("[[destination]]", "[delivery]\nmode = \"outbox\"\n\n[[destination]]\nkind = \"hl7v2\"\nreferences = \"literal\"")
                    .replace("https://127.0.0.1:9443/fhir", "mllps://127.0.0.1:2575"),
                "references must stay",
            ),
            (
                format!("{MINIMAL}[destination.only]\nresource_types = [\"Procedure\"]\n")
                    .replace("[[destination]]", "[delivery]\nmode = \"outbox\"\n\n[[destination]]\nkind = \"hl7v2\"")
                    .replace("https://127.0.0.1:9443/fhir", "mllps://127.0.0.1:2575"),
                "Observations only",
            ),
            (
                MINIMAL.replace("[hl7v2]", "").replace("[[vendor]]", "[hl7v2]\nlisten = \"127.0.0.1:2575\"\ntls = false\n\n[[vendor]]"),
                "tls = false needs plain_vendor",
            ),
            (
                format!("{MINIMAL}[destination.only]\nresource_types = [\"Observation\"]\n")
                    .replace("[[destination]]", "[[destination]]\nreferences = \"literal\""),
                "add \"DeviceMetric\" to [destination.only]",
            ),
            (
                format!("{MINIMAL}[destination.only]\nresource_types = [\"Observation\", \"DeviceMetric\"]\n")
                    .replace("[[destination]]", "[[destination]]\nreferences = \"literal\""),
                "add \"Device\" to [destination.only]",
            ),
            (
                MINIMAL.replace("[[vendor]]", "[hl7v2]\nlisten = \"127.0.0.1:2575\"\nplain_vendor = \"getinge\"\n\n[[vendor]]"),
                "plain_vendor is for tls = false only",
            ),
            (
                MINIMAL.replace("[[vendor]]", "[hl7v2]\nlisten = \"127.0.0.1:2575\"\ntls = false\nplain_vendor = \"nobody\"\n\n[[vendor]]"),
                "is not a configured [[vendor]]",
            ),
            (
                format!("{MINIMAL}[destination.charting]\ninterval = \"7m\"\n")
                    .replace("[[destination]]", "[delivery]\nmode = \"outbox\"\n\n[[destination]]"),
                "interval must be whole minutes that divide a day",
            ),
            (
                format!("{MINIMAL}[destination.charting]\ninterval = \"15m\"\n")
                    .replace("[[destination]]", "[delivery]\nmode = \"direct\"\n\n[[destination]]"),
                "needs [delivery] mode = \"outbox\" (an interval",
            ),
            (
                MINIMAL.replace("[[destination]]", "[delivery]\nmode = \"direct\"\n\n[[destination]]\nwaveforms = true"),
                "waveforms = true needs [delivery] mode = \"outbox\"",
            ),
            (
                format!("{MINIMAL}[destination.charting]\ninterval = \"15m\"\nsummary = \"median\"\n")
                    .replace("[[destination]]", "[delivery]\nmode = \"outbox\"\n\n[[destination]]"),
                "unknown variant `median`",
            ),
        ];
        for (text, expected) in cases {
            let e = load(&text)
                .map(|_| "(the config loaded without an error)".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(e.contains(expected), "expected '{expected}' in: {e}");
        }
    }
}
