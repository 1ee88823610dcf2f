//! What the console shows: destinations with their health, the message browser, and runs.
//!
//! | | |
//! |---|---|
//! | `GET /admin/v1/destinations` | per destination: address, format, breaker, queue depth and age, totals |
//! | `GET /admin/v1/messages?trackingId=&device=&vendor=&patient=&parameter=&run=&destination=&state=&since=&until=&limit=` | accepted messages, newest first |
//! | `GET /admin/v1/messages/{message-id}` | one message: its FHIR and the EHR's answer |
//! | `GET /admin/v1/runs` | ECMO runs, latest start first |
//! | `GET /admin/v1/runs/{run-id}[?readings=]` | one run: mode, consoles, events, its latest readings |
//! | `GET /admin/v1/runs/{run-id}/registry[?format=csv]` | a finished run as the ELSO Registry asks for it |

use http::{Method, Response, StatusCode};
use mappings::RunView;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Context, bad_query, conflict, json_response, not_found, query_param, storage};
use crate::outbox::browse::MessageQuery;
use crate::{BoxBody, BoxError};

/// The most a search or a run's chart answers with.
const MAX_LIMIT: usize = 1000;

/// The console's routes (`None`: not one of them).
pub(super) async fn route(
    context: &Context<'_>,
    method: &Method,
    uri: &http::Uri,
    segments: &[&str],
) -> Result<Option<Response<BoxBody>>, BoxError> {
    if method != Method::GET {
        return Ok(None);
    }
    let response = match segments {
        ["admin", "v1", "destinations"] => destinations(context).await?,
        ["admin", "v1", "messages"] => {
            let query = message_query(uri)?;
            let found = outbox(context)?.search(query).await.map_err(storage)?;
            json_response(StatusCode::OK, &json!({"messages": found}))
        }
        ["admin", "v1", "messages", id] => {
            let id: i64 = id
                .parse()
                .map_err(|_| not_found(format!("'{id}' is not a message id")))?;
            match outbox(context)?.message(id).await.map_err(storage)? {
                Some(message) => json_response(
                    StatusCode::OK,
                    &serde_json::to_value(message).unwrap_or_default(),
                ),
                None => return Err(not_found(format!("no message {id}"))),
            }
        }
        ["admin", "v1", "runs"] => {
            let runs: Vec<Value> = context.runs.views().iter().map(run_json).collect();
            json_response(StatusCode::OK, &json!({"runs": runs}))
        }
        ["admin", "v1", "runs", run_id, "registry"] => {
            let Some(view) = context.runs.view(run_id) else {
                return Err(not_found(format!("no ECMO run '{run_id}'")));
            };
            let record =
                crate::runs::registry::record(&view).map_err(|why| conflict(why.to_string()))?;
            if query_param(uri, "format").as_deref() == Some("csv") {
                let csv = crate::runs::registry::to_csv(&record)?;
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")
                    .body(crate::full_body(csv))?
            } else {
                json_response(
                    StatusCode::OK,
                    &serde_json::to_value(record).unwrap_or_default(),
                )
            }
        }
        ["admin", "v1", "runs", run_id] => {
            let Some(view) = context.runs.view(run_id) else {
                return Err(not_found(format!("no ECMO run '{run_id}'")));
            };
            let limit = limit(uri, "readings", 300)?;
            let readings = match &context.outbox {
                Some(outbox) => outbox.run_readings(run_id, limit).await.map_err(storage)?,
                None => Vec::new(),
            };
            let mut run = run_json(&view);
            run["readings"] = serde_json::to_value(readings).unwrap_or_default();
            json_response(StatusCode::OK, &run)
        }
        _ => return Ok(None),
    };
    Ok(Some(response))
}

fn outbox<'c>(context: &'c Context<'_>) -> Result<&'c dyn crate::outbox::Outbox, BoxError> {
    context
        .outbox
        .as_deref()
        .ok_or_else(|| not_found("delivery is direct: there is no outbox to browse".into()))
}

fn limit(uri: &http::Uri, name: &str, default: usize) -> Result<usize, BoxError> {
    match query_param(uri, name) {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(bad_query(
                name,
                format!("{name} '{text}' must be a whole number from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

/// A time bound: RFC 3339, or unix milliseconds.
fn instant(uri: &http::Uri, name: &str) -> Result<Option<i64>, BoxError> {
    let Some(text) = query_param(uri, name) else {
        return Ok(None);
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(Some(ms));
    }
    OffsetDateTime::parse(&text, &Rfc3339)
        .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
        .map_err(|_| {
            bad_query(
                name,
                format!("{name} '{text}' is not an RFC 3339 time (2026-12-06T08:00:00Z) or unix milliseconds"),
            )
        })
}

/// The search a request asks for; an unknown parameter is refused rather than ignored (a
/// misspelt filter would otherwise list everything).
fn message_query(uri: &http::Uri) -> Result<MessageQuery, BoxError> {
    const KNOWN: [&str; 11] = [
        "trackingId",
        "device",
        "vendor",
        "patient",
        "parameter",
        "run",
        "destination",
        "state",
        "since",
        "until",
        "limit",
    ];
    for pair in uri.query().unwrap_or_default().split('&') {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        if !name.is_empty() && !KNOWN.contains(&name) {
            return Err(bad_query(
                name,
                format!(
                    "unknown search parameter '{name}'; known: {}",
                    KNOWN.join(", ")
                ),
            ));
        }
    }
    let text = |name: &str| query_param(uri, name).filter(|v| !v.is_empty());
    let state = text("state");
    if let Some(state) = &state
        && !["pending", "delivered", "dead"].contains(&state.as_str())
    {
        return Err(bad_query(
            "state",
            format!("state '{state}' is not one of pending, delivered, dead"),
        ));
    }
    Ok(MessageQuery {
        tracking_id: text("trackingId"),
        device: text("device"),
        vendor: text("vendor"),
        patient: text("patient"),
        parameter: text("parameter"),
        run: text("run"),
        destination: text("destination"),
        state,
        since_ms: instant(uri, "since")?,
        until_ms: instant(uri, "until")?,
        limit: limit(uri, "limit", 100)?,
    })
}

/// Each configured destination with its queue and breaker, for the console's first page.
async fn destinations(context: &Context<'_>) -> Result<Response<BoxBody>, BoxError> {
    let stats = match &context.outbox {
        Some(outbox) => outbox.stats().await.map_err(storage)?,
        None => Vec::new(),
    };
    let metrics = crate::metrics::metrics();
    let destinations: Vec<Value> = context
        .destinations
        .iter()
        .map(|(settings, _)| {
            let label = crate::metrics::DestinationLabel {
                destination: settings.name.clone(),
            };
            let breaker_open = metrics.breaker_open.get_or_create(&label).get() > 0;
            let queue = stats.iter().find(|s| s.destination == settings.name);
            json!({
                "name": settings.name,
                "baseUrl": settings.base_url,
                "format": match settings.format {
                    crate::config::FhirFormat::Json => "json",
                    crate::config::FhirFormat::Xml => "xml",
                },
                "smart": settings.smart.is_some(),
                "breakerOpen": breaker_open,
                "health": match (breaker_open, queue) {
                    (true, _) => "failing",
                    (false, Some(q)) if q.dead > 0 => "dead-letters",
                    (false, Some(q)) if q.oldest_pending_seconds.unwrap_or(0.0) > 60.0 => "behind",
                    _ => "ok",
                },
                "accepted": queue.map_or(0, |q| q.accepted),
                "delivered": queue.map_or(0, |q| q.delivered),
                "dead": queue.map_or(0, |q| q.dead),
                "pending": queue.map_or(0, |q| q.pending),
                "oldestPendingSeconds": queue.and_then(|q| q.oldest_pending_seconds),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"destinations": destinations, "delivery": if context.outbox.is_some() { "outbox" } else { "direct" }}),
    ))
}

/// A run as the console shows it: the current mode is the latest mode segment's.
fn run_json(view: &RunView) -> Value {
    let mode = view
        .segments
        .iter()
        .rev()
        .find_map(|s| s.mode.clone())
        .unwrap_or_else(|| view.initial_mode.clone());
    json!({
        "runId": view.run_id,
        "status": view.status.code(),
        "patient": format!("{}|{}", view.patient_system, view.patient_value),
        "mode": mode,
        "initialMode": view.initial_mode,
        "supportType": view.support_type,
        "ageGroup": view.age_group.map(|a| a.code()),
        "start": view.start,
        "end": view.end,
        "consoles": view.consoles.iter().map(|c| json!({"serial": c.serial, "model": c.model, "manufacturer": c.manufacturer})).collect::<Vec<_>>(),
        "attachedDevices": view.attached.iter().map(|a| json!({"serial": a.device.serial, "model": a.device.model, "manufacturer": a.device.manufacturer, "type": a.device.device_type, "from": a.from, "until": a.until})).collect::<Vec<_>>(),
        "cannulas": view.cannulas.iter().map(|c| json!({"site": c.site_display, "laterality": c.laterality, "role": c.role})).collect::<Vec<_>>(),
        "complications": view.complications.iter().map(|c| json!({"code": c.code, "display": c.display, "time": c.time})).collect::<Vec<_>>(),
        "segments": view.segments.iter().map(|s| json!({"key": s.key, "activity": s.activity, "mode": s.mode, "start": s.start, "end": s.end})).collect::<Vec<_>>(),
        "outcome": view.outcome.as_ref().map(|(reason, alive)| json!({"reason": reason, "alive": alive})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(query: &str) -> http::Uri {
        format!("/admin/v1/messages?{query}").parse().unwrap()
    }

    #[test]
    fn a_search_reads_every_filter() {
        let query = message_query(&uri(
            "device=CH-1&patient=urn%3Amrn%7CMRN-7&state=dead&since=2026-12-06T08:00:00Z&until=1796544000000&limit=5",
        ))
        .unwrap();
        assert_eq!(query.device.as_deref(), Some("CH-1"));
        assert_eq!(query.patient.as_deref(), Some("urn:mrn|MRN-7"));
        assert_eq!(query.state.as_deref(), Some("dead"));
        assert_eq!(query.since_ms, Some(1_796_544_000_000));
        assert_eq!(query.until_ms, Some(1_796_544_000_000));
        assert_eq!(query.limit, 5);
        assert_eq!(message_query(&uri("")).unwrap().limit, 100);
        assert!(
            message_query(&uri("device=")).unwrap().device.is_none(),
            "an empty field is no filter"
        );
    }

    #[test]
    fn a_bad_filter_is_refused_by_name() {
        for (query, named) in [
            ("devise=CH-1", "devise"),
            ("state=lost", "state"),
            ("since=yesterday", "since"),
            ("limit=0", "limit"),
            ("limit=100000", "limit"),
        ] {
            let error = message_query(&uri(query)).unwrap_err();
            let error = error.downcast_ref::<crate::outcome::ApiError>().unwrap();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(
                error.issues[0].expression.as_deref(),
                Some(named),
                "{query}"
            );
        }
    }
}
