//! The message browser: accepted messages found by what operators know (tracking id, device,
//! vendor, patient, parameter, run, time), one message with its FHIR and the EHR's answer, and
//! a run's latest readings for the live run view.
//!
//! What a request was about is kept once per request (the `batches` table, see
//! [`BatchFacts`]), not per message, so accepting a batch of readings costs one more row.
//! Lists are stored framed by newlines (`\nA\nB\n`) so that one value is found exactly.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::{BatchFacts, Disposition, OutboxError, stored_body};

/// What to look for; every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageQuery {
    pub tracking_id: Option<String>,
    /// A device serial number.
    pub device: Option<String>,
    /// A vendor's configured name.
    pub vendor: Option<String>,
    /// A patient identifier value, or `system|value`.
    pub patient: Option<String>,
    /// One of our parameter codes (`blood-flow`): readings of it.
    pub parameter: Option<String>,
    pub run: Option<String>,
    pub destination: Option<String>,
    /// `pending`, `delivered` or `dead`.
    pub state: Option<String>,
    /// Accepted at or after (unix ms).
    pub since_ms: Option<i64>,
    /// Accepted before (unix ms).
    pub until_ms: Option<i64>,
    pub limit: usize,
}

/// One message as the browser lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageSummary {
    pub message_id: i64,
    pub tracking_id: String,
    pub destination: String,
    pub resource_type: String,
    pub identifier: String,
    pub disposition: Disposition,
    pub state: String,
    pub attempts: u32,
    pub accepted_at_ms: i64,
    pub settled_at_ms: Option<i64>,
    /// The EHR's answer: status line and location of what it holds.
    pub status_line: Option<String>,
    pub location: Option<String>,
    pub last_error: Option<String>,
    pub sender: Option<String>,
    pub devices: Vec<String>,
    pub patients: Vec<String>,
    pub runs: Vec<String>,
}

/// One message with its FHIR as the outbox keeps it for sending (literal references, where a
/// destination needs them, are filled in on the way) and the EHR's OperationOutcome if any.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageDetail {
    #[serde(flatten)]
    pub summary: MessageSummary,
    pub resource: Value,
    pub outcome: Option<Value>,
}

/// A reading of a run, for its chart.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReading {
    /// Our parameter code.
    pub code: String,
    pub display: Option<String>,
    pub value: f64,
    pub unit: Option<String>,
    /// The device's time of the reading (FHIR dateTime).
    pub time: String,
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    received_ms INTEGER NOT NULL,
    sender TEXT NOT NULL,
    devices TEXT NOT NULL,
    patients TEXT NOT NULL,
    runs TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_received ON batches(received_ms);
";

fn framed(values: &[String]) -> String {
    if values.is_empty() {
        return String::new();
    }
    let mut text = String::from("\n");
    for value in values {
        text.push_str(value);
        text.push('\n');
    }
    text
}

pub(super) fn unframed(text: Option<String>) -> Vec<String> {
    text.unwrap_or_default()
        .split('\n')
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Records what request `batch_id` was about, in the transaction that stores its messages.
pub(super) fn record(
    tx: &rusqlite::Transaction<'_>,
    batch_id: &str,
    facts: &BatchFacts,
    now_ms: i64,
) -> rusqlite::Result<()> {
    let (devices, patients, runs) = framed_facts(facts);
    tx.prepare_cached(
        "INSERT OR IGNORE INTO batches (batch_id, received_ms, sender, devices, patients, runs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        batch_id,
        now_ms,
        facts.sender,
        devices,
        patients,
        runs
    ])
    .map(drop)
}

/// A request's devices, patients and runs as stored.
pub(super) fn framed_facts(facts: &BatchFacts) -> (String, String, String) {
    (
        framed(&facts.devices),
        framed(&facts.patients),
        framed(&facts.runs),
    )
}

/// Forgets requests older than `before_ms` none of whose messages are kept any more.
pub(super) fn purge(tx: &rusqlite::Transaction<'_>, before_ms: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "DELETE FROM batches WHERE batch_id IN (
            SELECT batch_id FROM batches INDEXED BY batches_received
            WHERE received_ms < ?1
              AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.batch_id = batches.batch_id)
            LIMIT 2000)",
    )?
    .execute(params![before_ms])
}

const SUMMARY_COLUMNS: &str = "m.id, m.batch_id, m.destination, m.resource_type,
    m.identifier_system, m.identifier_value, m.disposition, m.state, m.attempts, m.created_ms,
    m.settled_ms, m.status_line, m.location, m.last_error, b.sender, b.devices, b.patients, b.runs";

fn summary_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<MessageSummary> {
    Ok(MessageSummary {
        message_id: row.get(0)?,
        tracking_id: row.get(1)?,
        destination: row.get(2)?,
        resource_type: row.get(3)?,
        identifier: format!("{}|{}", row.get::<_, String>(4)?, row.get::<_, String>(5)?),
        disposition: Disposition::parse(&row.get::<_, String>(6)?),
        state: row.get(7)?,
        attempts: row.get(8)?,
        accepted_at_ms: row.get(9)?,
        settled_at_ms: row.get(10)?,
        status_line: row.get(11)?,
        location: row.get(12)?,
        last_error: row.get(13)?,
        sender: row.get(14)?,
        devices: unframed(row.get(15)?),
        patients: unframed(row.get(16)?),
        runs: unframed(row.get(17)?),
    })
}

/// The SQL engine a statement is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The placeholder of the `n`th parameter (from 1).
    fn placeholder(self, n: usize) -> String {
        match self {
            Self::Sqlite => format!("?{n}"),
            Self::Postgres => format!("${n}"),
        }
    }

    /// `haystack` holds the `n`th parameter.
    fn contains(self, haystack: &str, n: usize) -> String {
        match self {
            Self::Sqlite => format!("instr({haystack}, ?{n}) > 0"),
            Self::Postgres => format!("strpos({haystack}, ${n}) > 0"),
        }
    }
}

/// A bound value of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Param {
    Text(String),
    Integer(i64),
}

/// The SQL and its parameters for `query`: only the conditions asked for, so that a tracking
/// id is looked up by its index and the rest walks messages from the newest until `limit`.
pub(super) fn search_sql(query: &MessageQuery, dialect: Dialect) -> (String, Vec<Param>) {
    enum Test {
        Equals(&'static str),
        Contains(&'static str),
        /// An SQL prefix, then `contains` on the column.
        ObservationContains(&'static str),
        AtLeast(&'static str),
        Below(&'static str),
    }
    let mut tests: Vec<(Test, Param)> = Vec::new();
    let text = |value: &str| Param::Text(value.to_owned());
    if let Some(id) = &query.tracking_id {
        tests.push((Test::Equals("m.batch_id"), text(id)));
    }
    if let Some(destination) = &query.destination {
        tests.push((Test::Equals("m.destination"), text(destination)));
    }
    if let Some(state) = &query.state {
        tests.push((Test::Equals("m.state"), text(state)));
    }
    if let Some(vendor) = &query.vendor {
        tests.push((Test::Equals("b.sender"), text(vendor)));
    }
    if let Some(device) = &query.device {
        tests.push((Test::Contains("b.devices"), text(&format!("\n{device}\n"))));
    }
    if let Some(patient) = &query.patient {
        // A bare value matches it under any system.
        let needle = if patient.contains('|') {
            format!("\n{patient}\n")
        } else {
            format!("|{patient}\n")
        };
        tests.push((Test::Contains("b.patients"), Param::Text(needle)));
    }
    if let Some(run) = &query.run {
        tests.push((Test::Contains("b.runs"), Param::Text(run_needle(run))));
    }
    if let Some(parameter) = &query.parameter {
        // family:serial:code:time (mappings::observation_identifier).
        tests.push((
            Test::ObservationContains("m.identifier_value"),
            text(&format!(":{parameter}:")),
        ));
    }
    if let Some(since) = query.since_ms {
        tests.push((Test::AtLeast("m.created_ms"), Param::Integer(since)));
    }
    if let Some(until) = query.until_ms {
        tests.push((Test::Below("m.created_ms"), Param::Integer(until)));
    }
    let mut conditions = Vec::with_capacity(tests.len());
    let mut values = Vec::with_capacity(tests.len() + 1);
    for (n, (test, value)) in tests.into_iter().enumerate() {
        let n = n + 1;
        let p = dialect.placeholder(n);
        conditions.push(match test {
            Test::Equals(column) => format!("{column} = {p}"),
            Test::Contains(column) => dialect.contains(column, n),
            Test::ObservationContains(column) => format!(
                "m.resource_type = 'Observation' AND {}",
                dialect.contains(column, n)
            ),
            Test::AtLeast(column) => format!("{column} >= {p}"),
            Test::Below(column) => format!("{column} < {p}"),
        });
        values.push(value);
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    values.push(Param::Integer(query.limit as i64));
    (
        format!(
            "SELECT {SUMMARY_COLUMNS} FROM messages m LEFT JOIN batches b ON b.batch_id = m.batch_id
             {filter} ORDER BY m.id DESC LIMIT {}",
            dialect.placeholder(values.len())
        ),
        values,
    )
}

pub(super) fn search(
    conn: &Connection,
    query: &MessageQuery,
) -> Result<Vec<MessageSummary>, OutboxError> {
    let (sql, values) = search_sql(query, Dialect::Sqlite);
    let values = values.into_iter().map(|v| match v {
        Param::Text(t) => rusqlite::types::Value::Text(t),
        Param::Integer(i) => rusqlite::types::Value::Integer(i),
    });
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(rusqlite::params_from_iter(values), summary_of)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One message with its body and outcome (columns 18 and 19), by id.
pub(super) fn message_sql(dialect: Dialect) -> String {
    format!(
        "SELECT {SUMMARY_COLUMNS}, mb.body, m.outcome
         FROM messages m LEFT JOIN batches b ON b.batch_id = m.batch_id
         LEFT JOIN message_bodies mb ON mb.message_id = m.id WHERE m.id = {}",
        dialect.placeholder(1)
    )
}

/// A message as the browser shows it, from its summary, body and the EHR's outcome.
pub(super) fn detail(
    summary: MessageSummary,
    body: Option<Vec<u8>>,
    outcome: Option<String>,
) -> MessageDetail {
    MessageDetail {
        summary,
        resource: body
            .and_then(|b| stored_body::read(b).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null),
        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
    }
}

pub(super) fn message(
    conn: &Connection,
    message_id: i64,
) -> Result<Option<MessageDetail>, OutboxError> {
    let found = conn
        .prepare_cached(&message_sql(Dialect::Sqlite))?
        .query_row(params![message_id], |row| {
            Ok((
                summary_of(row)?,
                row.get::<_, Option<Vec<u8>>>(18)?,
                row.get::<_, Option<String>>(19)?,
            ))
        })
        .optional()?;
    Ok(found.map(|(summary, body, outcome)| detail(summary, body, outcome)))
}

/// A reading's chart point from its Observation: our code, the quantity and the device time.
fn reading_of(body: &[u8]) -> Option<RunReading> {
    let resource: Value = serde_json::from_slice(body).ok()?;
    let codings = resource["code"]["coding"].as_array()?;
    let coding = codings
        .iter()
        .find(|c| c["system"] == mappings::ECMO_CODE_SYSTEM)
        .or_else(|| codings.first())?;
    let quantity = &resource["valueQuantity"];
    Some(RunReading {
        code: coding["code"].as_str()?.to_owned(),
        display: coding["display"].as_str().map(str::to_owned),
        value: quantity["value"].as_f64()?,
        unit: quantity["unit"]
            .as_str()
            .or_else(|| quantity["code"].as_str())
            .map(str::to_owned),
        time: resource["effectiveDateTime"].as_str()?.to_owned(),
    })
}

/// What a request's runs hold when it was about run `run_id`.
pub(super) fn run_needle(run_id: &str) -> String {
    format!("\n{run_id}\n")
}

/// A run's Observations, newest first: identifier value, disposition and body, for
/// [`latest_readings`]; the run's needle and a row limit are the parameters.
pub(super) fn run_readings_sql(dialect: Dialect) -> String {
    format!(
        "SELECT m.identifier_value, m.disposition, mb.body
         FROM messages m JOIN batches b ON b.batch_id = m.batch_id
         JOIN message_bodies mb ON mb.message_id = m.id
         WHERE m.resource_type = 'Observation' AND {}
         ORDER BY m.id DESC LIMIT {}",
        dialect.contains("b.runs", 1),
        dialect.placeholder(2)
    )
}

/// Rows to read for `limit` readings: several destinations hold several rows per reading.
pub(super) fn run_readings_rows(limit: usize) -> i64 {
    (limit * 4) as i64
}

/// Each reading once, as last accepted, whatever the number of destinations; a retracted one
/// not at all; up to `limit`.
pub(super) fn latest_readings(
    rows: impl Iterator<Item = (String, String, Vec<u8>)>,
    limit: usize,
) -> Vec<RunReading> {
    let mut seen = std::collections::HashSet::new();
    let mut readings = Vec::new();
    for (identifier, disposition, body) in rows {
        if readings.len() == limit {
            break;
        }
        if !seen.insert(identifier) || disposition == Disposition::Retracted.as_str() {
            continue;
        }
        let body = stored_body::read(body).ok();
        if let Some(reading) = body.as_deref().and_then(reading_of) {
            readings.push(reading);
        }
    }
    readings
}

pub(super) fn run_readings(
    conn: &Connection,
    run_id: &str,
    limit: usize,
) -> Result<Vec<RunReading>, OutboxError> {
    let mut statement = conn.prepare_cached(&run_readings_sql(Dialect::Sqlite))?;
    let rows = statement
        .query_map(
            params![run_needle(run_id), run_readings_rows(limit)],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(latest_readings(rows.into_iter(), limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_framed_so_one_value_is_found_exactly() {
        let devices = framed(&["CH-1".into(), "CH-12".into()]);
        assert!(devices.contains("\nCH-1\n"));
        assert!(!devices.contains("\nCH-2\n"));
        assert_eq!(unframed(Some(devices)), vec!["CH-1", "CH-12"]);
        assert_eq!(framed(&[]), "");
        assert!(unframed(None).is_empty());
    }

    #[test]
    fn only_the_conditions_asked_for_are_in_the_query() {
        let query = MessageQuery {
            tracking_id: Some("t".into()),
            patient: Some("MRN-1".into()),
            limit: 5,
            ..Default::default()
        };
        let (sql, values) = search_sql(&query, Dialect::Sqlite);
        assert!(sql.contains("m.batch_id = ?1") && sql.contains("instr(b.patients, ?2)"));
        assert!(sql.ends_with("LIMIT ?3"), "{sql}");
        assert!(!sql.contains("instr(b.runs") && !sql.contains("created_ms >="));
        assert_eq!(values.len(), 3);
        assert_eq!(
            values[1],
            Param::Text("|MRN-1\n".into()),
            "a bare patient value matches under any system"
        );
        let (sql, postgres_values) = search_sql(&query, Dialect::Postgres);
        assert!(sql.contains("m.batch_id = $1") && sql.contains("strpos(b.patients, $2) > 0"));
        assert!(sql.ends_with("LIMIT $3"), "{sql}");
        assert_eq!(postgres_values, values);
    }

    #[test]
    fn a_reading_becomes_a_chart_point() {
        let body = serde_json::to_vec(&serde_json::json!({
            "resourceType": "Observation",
            "code": {"coding": [
                {"system": "http://loinc.org", "code": "x"},
                {"system": mappings::ECMO_CODE_SYSTEM, "code": "blood-flow", "display": "Blood flow"}
            ]},
            "effectiveDateTime": "2026-12-06T08:00:00Z",
            "valueQuantity": {"value": 4.2, "unit": "L/min"}
        }))
        .unwrap();
        let reading = reading_of(&body).unwrap();
        assert_eq!(reading.code, "blood-flow");
        assert_eq!(reading.value, 4.2);
        assert_eq!(reading.unit.as_deref(), Some("L/min"));
        assert!(reading_of(b"{\"resourceType\":\"Observation\"}").is_none());
    }
}
