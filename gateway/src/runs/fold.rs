//! A run's state, folded from its events in time order (ties broken by event id), so the
//! result does not depend on the order events arrived in. Events that cannot have happened
//! (anything before the run exists, after it ended, an end before the start) are refused.

use mappings::{AgeGroup, CannulaView, ComplicationView, RunStatus, RunView, SegmentView};
use time::OffsetDateTime;

use super::event::{Cannula, Console, EventKind, Identifier, RunEvent};

/// Why an event does not fit the run (answered 409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

/// A console's stay in a run: readings from it in [from, until) belong to the run.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsolePeriod {
    pub serial: String,
    pub model: String,
    pub eui64: Option<String>,
    pub from: OffsetDateTime,
    pub until: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    pub view: RunView,
    pub patient: Identifier,
    pub consoles: Vec<ConsolePeriod>,
    /// Other devices of the circuit, one entry per period attached.
    pub attached: Vec<ConsolePeriod>,
}

impl Folded {
    /// Every device's periods in the run, the consoles first: readings from any of them in
    /// one of its periods belong to the run.
    pub fn device_periods(&self) -> impl Iterator<Item = &ConsolePeriod> {
        self.consoles.iter().chain(&self.attached)
    }
}

#[derive(Clone)]
struct Builder {
    run_id: String,
    status: RunStatus,
    patient: Option<Identifier>,
    encounter: Option<Identifier>,
    birth_date: Option<time::Date>,
    initial_mode: Option<String>,
    mode: Option<(String, String, usize)>,
    support_type: Option<String>,
    indications: Vec<(String, String)>,
    cannulas: Vec<Cannula>,
    consoles: Vec<ConsolePeriod>,
    attached: Vec<ConsolePeriod>,
    start: Option<(String, OffsetDateTime)>,
    created: Option<OffsetDateTime>,
    end: Option<(String, OffsetDateTime)>,
    complications: Vec<ComplicationView>,
    outcome: Option<(String, bool)>,
    segments: Vec<SegmentView>,
    mode_count: usize,
}

pub fn fold(run_id: &str, events: &[RunEvent]) -> Result<Folded, Conflict> {
    progress(run_id, events)?.folded()
}

/// A run folded as far as its latest event in time order: an event timed after every other
/// (the usual case) is folded onto it alone, not the whole run again.
#[derive(Clone)]
pub struct Progress {
    builder: Builder,
    /// The order key (time, event id) of the latest event folded.
    last: Option<(OffsetDateTime, String)>,
}

impl Progress {
    fn new(run_id: &str) -> Self {
        Self {
            builder: Builder::new(run_id),
            last: None,
        }
    }

    /// Whether `event` comes after every event folded so far, so [`Self::then`] applies.
    pub fn is_followed_by(&self, event: &RunEvent) -> bool {
        self.last
            .as_ref()
            .is_none_or(|(at, id)| (event.at, &event.event_id) > (*at, id))
    }

    /// This progress with `event`, which [`Self::is_followed_by`] it, folded on.
    pub fn then(&self, event: &RunEvent) -> Result<Self, Conflict> {
        debug_assert!(self.is_followed_by(event));
        let mut next = self.clone();
        next.builder.apply(event)?;
        next.last = Some((event.at, event.event_id.clone()));
        Ok(next)
    }

    /// The run as of this progress.
    pub fn folded(&self) -> Result<Folded, Conflict> {
        self.builder.clone().finish()
    }
}

/// Folds `events` (in any order) from the start.
pub fn progress(run_id: &str, events: &[RunEvent]) -> Result<Progress, Conflict> {
    let mut ordered: Vec<&RunEvent> = events.iter().collect();
    ordered.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.event_id.cmp(&b.event_id)));
    let mut progress = Progress::new(run_id);
    for event in ordered {
        progress.builder.apply(event)?;
        progress.last = Some((event.at, event.event_id.clone()));
    }
    Ok(progress)
}

impl Builder {
    fn new(run_id: &str) -> Self {
        Self {
            run_id: run_id.to_owned(),
            status: RunStatus::Preparation,
            patient: None,
            encounter: None,
            birth_date: None,
            initial_mode: None,
            mode: None,
            support_type: None,
            indications: vec![],
            cannulas: vec![],
            consoles: vec![],
            attached: vec![],
            start: None,
            created: None,
            end: None,
            complications: vec![],
            outcome: None,
            segments: vec![],
            mode_count: 0,
        }
    }

    fn conflict(&self, event: &RunEvent, why: impl std::fmt::Display) -> Conflict {
        Conflict(format!(
            "event '{}' ({}) at {}: {why}",
            event.event_id,
            kind_name(&event.kind),
            event.time
        ))
    }

    fn apply(&mut self, event: &RunEvent) -> Result<(), Conflict> {
        if self.status == RunStatus::EnteredInError {
            return Err(self.conflict(
                event,
                "the run was entered in error; no event may follow it",
            ));
        }
        let exists = self.created.is_some();
        match &event.kind {
            EventKind::Setup { .. } | EventKind::EnteredInError => {}
            _ if !exists => {
                return Err(self.conflict(event, format!("run '{}' has not started", self.run_id)));
            }
            _ => {}
        }
        if let Some((_, end)) = &self.end
            && event.at > *end
            && !matches!(event.kind, EventKind::EnteredInError)
        {
            return Err(self.conflict(
                event,
                "it is timed after the run ended (last cannula removed)",
            ));
        }
        match &event.kind {
            EventKind::Setup {
                flow_started,
                patient,
                encounter,
                birth_date,
                mode,
                support_type,
                indications,
                cannulas,
                console,
            } => {
                if *flow_started && self.start.is_some() {
                    return Err(self.conflict(event, "the run has already started"));
                }
                if !flow_started && exists {
                    return Err(self.conflict(event, "preparation must come before anything else"));
                }
                if let Some(known) = &self.patient
                    && known != patient
                {
                    return Err(self.conflict(event, "it names a different patient than the run"));
                }
                self.patient = Some(patient.clone());
                self.encounter = encounter.clone().or(self.encounter.take());
                self.birth_date = birth_date.or(self.birth_date);
                self.support_type = support_type.clone().or(self.support_type.take());
                if !indications.is_empty() {
                    self.indications = indications.clone();
                }
                if !cannulas.is_empty() {
                    self.cannulas = cannulas.clone();
                }
                if self.initial_mode.is_none() || *flow_started {
                    self.initial_mode = Some(mode.clone());
                }
                if self
                    .consoles
                    .last()
                    .is_none_or(|c| c.serial != console.serial)
                {
                    self.switch_console(console, event.at);
                }
                self.created.get_or_insert(event.at);
                if *flow_started {
                    self.status = RunStatus::InProgress;
                    self.start = Some((event.time.clone(), event.at));
                    self.open_mode(mode, &event.time, event.at);
                }
            }
            EventKind::ModeChanged { mode } => {
                self.require_started(event)?;
                if self.mode.as_ref().is_some_and(|(m, _, _)| m == mode) {
                    return Err(self.conflict(event, format!("the run is already in mode {mode}")));
                }
                self.close_mode(&event.time);
                self.open_mode(mode, &event.time, event.at);
            }
            EventKind::ConsoleChanged { console } => {
                self.require_started(event)?;
                if self.attached_now(&console.serial).is_some() {
                    return Err(self.conflict(
                        event,
                        format!(
                            "device '{}' is attached to the run as another device; detach it first",
                            console.serial
                        ),
                    ));
                }
                self.switch_console(console, event.at);
            }
            EventKind::DeviceAttached { device } => {
                if self
                    .consoles
                    .last()
                    .is_some_and(|c| c.serial == device.serial)
                {
                    return Err(self.conflict(
                        event,
                        format!("device '{}' is the run's console", device.serial),
                    ));
                }
                if self.attached_now(&device.serial).is_some() {
                    return Err(self.conflict(
                        event,
                        format!("device '{}' is already attached to the run", device.serial),
                    ));
                }
                self.attached.push(ConsolePeriod {
                    serial: device.serial.clone(),
                    model: device.model.clone(),
                    eui64: device.eui64.clone(),
                    from: event.at,
                    until: None,
                });
            }
            EventKind::DeviceDetached { device } => {
                let Some(index) = self.attached_now(&device.serial) else {
                    return Err(self.conflict(
                        event,
                        format!("device '{}' is not attached to the run", device.serial),
                    ));
                };
                self.attached[index].until = Some(event.at);
            }
            EventKind::CircuitChanged => {
                self.require_started(event)?;
                self.segments.push(SegmentView {
                    key: format!("circuit-change-{}", event.event_id),
                    activity: "circuit-change",
                    mode: None,
                    start: event.time.clone(),
                    end: Some(event.time.clone()),
                });
            }
            EventKind::CannulaAdded { cannula } => {
                if self.cannulas.iter().any(|c| c.id == cannula.id) {
                    return Err(self.conflict(
                        event,
                        format!("cannula '{}' is already in place", cannula.id),
                    ));
                }
                self.cannulas.push(cannula.clone());
            }
            EventKind::CannulaRemoved { cannula_id } => {
                let before = self.cannulas.len();
                self.cannulas.retain(|c| &c.id != cannula_id);
                if self.cannulas.len() == before {
                    return Err(
                        self.conflict(event, format!("no cannula '{cannula_id}' is in place"))
                    );
                }
            }
            EventKind::Complication { code, display } => {
                self.complications.push(ComplicationView {
                    code: code.clone(),
                    display: display.clone(),
                    time: event.time.clone(),
                })
            }
            EventKind::WeaningTrial { end } => {
                self.require_started(event)?;
                self.segments.push(SegmentView {
                    key: format!("weaning-trial-{}", event.event_id),
                    activity: "weaning-trial",
                    mode: None,
                    start: event.time.clone(),
                    end: end.clone(),
                });
            }
            EventKind::Ended { reason, alive } => {
                self.require_started(event)?;
                if self.end.is_some() {
                    return Err(self.conflict(event, "the run has already ended"));
                }
                if let Some((_, start)) = &self.start
                    && event.at < *start
                {
                    return Err(self.conflict(event, "the run cannot end before it started"));
                }
                self.close_mode(&event.time);
                if let Some(last) = self.consoles.last_mut() {
                    last.until.get_or_insert(event.at);
                }
                for device in &mut self.attached {
                    device.until.get_or_insert(event.at);
                }
                self.end = Some((event.time.clone(), event.at));
                self.outcome = Some((reason.clone(), *alive));
                self.status = if *alive && reason != "died" {
                    RunStatus::Completed
                } else {
                    RunStatus::Stopped
                };
            }
            EventKind::EnteredInError => {
                if !exists {
                    return Err(
                        self.conflict(event, format!("run '{}' does not exist", self.run_id))
                    );
                }
                self.status = RunStatus::EnteredInError;
                // An erroneous run claims no device: readings are no longer linked to it.
                self.consoles.clear();
                self.attached.clear();
            }
        }
        Ok(())
    }

    fn require_started(&self, event: &RunEvent) -> Result<(), Conflict> {
        match &self.start {
            Some((_, start)) if event.at >= *start => Ok(()),
            Some(_) => Err(self.conflict(event, "it is timed before the start of blood flow")),
            None => Err(self.conflict(event, "blood flow has not started")),
        }
    }

    /// The index of `serial`'s open attachment, if it is attached now.
    fn attached_now(&self, serial: &str) -> Option<usize> {
        self.attached
            .iter()
            .position(|d| d.serial == serial && d.until.is_none())
    }

    fn switch_console(&mut self, console: &Console, at: OffsetDateTime) {
        if let Some(last) = self.consoles.last_mut() {
            last.until.get_or_insert(at);
        }
        self.consoles.push(ConsolePeriod {
            serial: console.serial.clone(),
            model: console.model.clone(),
            eui64: console.eui64.clone(),
            from: at,
            until: None,
        });
    }

    fn open_mode(&mut self, mode: &str, time: &str, _at: OffsetDateTime) {
        self.mode_count += 1;
        self.segments.push(SegmentView {
            key: format!("mode-{}", self.mode_count),
            activity: "mode-segment",
            mode: Some(mode.to_owned()),
            start: time.to_owned(),
            end: None,
        });
        self.mode = Some((mode.to_owned(), time.to_owned(), self.segments.len() - 1));
    }

    fn close_mode(&mut self, time: &str) {
        if let Some((_, _, index)) = self.mode.take() {
            self.segments[index].end = Some(time.to_owned());
        }
    }

    fn finish(self) -> Result<Folded, Conflict> {
        let patient = self
            .patient
            .ok_or_else(|| Conflict(format!("run '{}' has no started event", self.run_id)))?;
        let age_group = match (self.birth_date, &self.start) {
            (Some(birth), Some((_, start))) => AgeGroup::at(birth, start.date()),
            _ => None,
        };
        let view = RunView {
            run_id: self.run_id,
            status: self.status,
            patient_system: patient.system.clone(),
            patient_value: patient.value.clone(),
            encounter: self.encounter.map(|e| (e.system, e.value)),
            initial_mode: self.initial_mode.unwrap_or_else(|| "va".into()),
            support_type: self.support_type,
            age_group,
            indications: self.indications,
            cannulas: self
                .cannulas
                .into_iter()
                .map(|c| CannulaView {
                    site_code: c.site_code,
                    site_display: c.site_display,
                    laterality: c.laterality,
                    role: c.role,
                })
                .collect(),
            consoles: vec![],
            attached: vec![],
            start: self.start.map(|(t, _)| t),
            end: self.end.map(|(t, _)| t),
            complications: self.complications,
            outcome: self.outcome,
            segments: self.segments,
        };
        Ok(Folded {
            view,
            patient,
            consoles: self.consoles,
            attached: self.attached,
        })
    }
}

fn kind_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::Setup {
            flow_started: true, ..
        } => "started",
        EventKind::Setup { .. } => "preparation",
        EventKind::ModeChanged { .. } => "mode-changed",
        EventKind::ConsoleChanged { .. } => "console-changed",
        EventKind::DeviceAttached { .. } => "device-attached",
        EventKind::DeviceDetached { .. } => "device-detached",
        EventKind::CircuitChanged => "circuit-changed",
        EventKind::CannulaAdded { .. } => "cannula-added",
        EventKind::CannulaRemoved { .. } => "cannula-removed",
        EventKind::Complication { .. } => "complication",
        EventKind::WeaningTrial { .. } => "weaning-trial",
        EventKind::Ended { .. } => "ended",
        EventKind::EnteredInError => "entered-in-error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(body: serde_json::Value) -> RunEvent {
        crate::runs::event::parse(&body).expect("valid event")
    }

    fn started(t: &str) -> RunEvent {
        ev(
            json!({"eventId": "s", "type": "started", "time": t, "patient": {"system": "urn:x", "value": "P"},
                  "mode": "vv", "console": {"serial": "C1", "model": "CARDIOHELP-i"}}),
        )
    }

    #[test]
    fn arrival_order_does_not_change_the_run() {
        let events = vec![
            started("2026-11-20T08:00:00Z"),
            ev(
                json!({"eventId": "m", "type": "mode-changed", "time": "2026-11-20T10:00:00Z", "mode": "vva"}),
            ),
            ev(
                json!({"eventId": "c", "type": "complication", "time": "2026-11-20T12:00:00Z", "complication": {"code": "1386000"}}),
            ),
            ev(
                json!({"eventId": "e", "type": "ended", "time": "2026-11-21T08:00:00Z", "reason": "recovered", "alive": true}),
            ),
        ];
        let mut reversed = events.clone();
        reversed.reverse();
        let a = fold("R", &events).unwrap();
        let b = fold("R", &reversed).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.view.status, RunStatus::Completed);
        assert_eq!(a.view.segments.len(), 2);
        assert_eq!(
            a.view.segments[0].end.as_deref(),
            Some("2026-11-20T10:00:00Z")
        );
        assert_eq!(
            a.consoles[0].until,
            Some(time::macros::datetime!(2026-11-21 08:00 UTC))
        );
    }

    #[test]
    fn impossible_sequences_conflict() {
        let mode = ev(
            json!({"eventId": "m", "type": "mode-changed", "time": "2026-11-20T10:00:00Z", "mode": "va"}),
        );
        assert!(
            fold("R", std::slice::from_ref(&mode)).is_err(),
            "not started"
        );
        let early_end = ev(
            json!({"eventId": "e", "type": "ended", "time": "2026-11-20T07:00:00Z", "reason": "recovered", "alive": true}),
        );
        assert!(
            fold("R", &[started("2026-11-20T08:00:00Z"), early_end]).is_err(),
            "end before start"
        );
        let end = ev(
            json!({"eventId": "e", "type": "ended", "time": "2026-11-20T09:00:00Z", "reason": "recovered", "alive": true}),
        );
        assert!(
            fold("R", &[started("2026-11-20T08:00:00Z"), end, mode]).is_err(),
            "mode change after end"
        );
        let died = ev(
            json!({"eventId": "d", "type": "ended", "time": "2026-11-20T09:00:00Z", "reason": "died", "alive": false}),
        );
        assert_eq!(
            fold("R", &[started("2026-11-20T08:00:00Z"), died])
                .unwrap()
                .view
                .status,
            RunStatus::Stopped
        );
    }

    #[test]
    fn console_change_splits_the_console_periods() {
        let change = ev(
            json!({"eventId": "k", "type": "console-changed", "time": "2026-11-20T12:00:00Z",
                               "console": {"serial": "C2", "model": "CARDIOHELP-i"}}),
        );
        let run = fold("R", &[started("2026-11-20T08:00:00Z"), change]).unwrap();
        assert_eq!(run.consoles.len(), 2);
        assert_eq!(run.consoles[0].until, Some(run.consoles[1].from));
        assert_eq!(run.consoles[1].until, None);
    }

    fn device_event(id: &str, kind: &str, t: &str, serial: &str) -> RunEvent {
        ev(
            json!({"eventId": id, "type": kind, "time": t, "device": {"serial": serial, "model": "M4"}}),
        )
    }

    #[test]
    fn attached_devices_have_periods_that_the_end_closes() {
        let run = fold(
            "R",
            &[
                started("2026-11-20T08:00:00Z"),
                device_event("a1", "device-attached", "2026-11-20T09:00:00Z", "M4-1"),
                device_event("d1", "device-detached", "2026-11-20T10:00:00Z", "M4-1"),
                // The same monitor back later, and a second one that stays until the end.
                device_event("a2", "device-attached", "2026-11-20T11:00:00Z", "M4-1"),
                device_event("a3", "device-attached", "2026-11-20T11:30:00Z", "M4-2"),
                ev(json!({"eventId": "e", "type": "ended", "time": "2026-11-21T08:00:00Z", "reason": "recovered", "alive": true})),
            ],
        )
        .unwrap();
        let periods: Vec<(&str, OffsetDateTime, Option<OffsetDateTime>)> = run
            .attached
            .iter()
            .map(|p| (p.serial.as_str(), p.from, p.until))
            .collect();
        use time::macros::datetime;
        assert_eq!(
            periods,
            vec![
                (
                    "M4-1",
                    datetime!(2026-11-20 09:00 UTC),
                    Some(datetime!(2026-11-20 10:00 UTC))
                ),
                (
                    "M4-1",
                    datetime!(2026-11-20 11:00 UTC),
                    Some(datetime!(2026-11-21 08:00 UTC))
                ),
                (
                    "M4-2",
                    datetime!(2026-11-20 11:30 UTC),
                    Some(datetime!(2026-11-21 08:00 UTC))
                ),
            ]
        );
        assert_eq!(
            run.device_periods().count(),
            4,
            "the console and three attachments"
        );
    }

    #[test]
    fn contradictory_attachments_conflict() {
        let start = started("2026-11-20T08:00:00Z");
        let attach = device_event("a", "device-attached", "2026-11-20T09:00:00Z", "M4-1");
        let cases: Vec<(Vec<RunEvent>, &str)> = vec![
            (
                vec![
                    start.clone(),
                    attach.clone(),
                    device_event("b", "device-attached", "2026-11-20T09:30:00Z", "M4-1"),
                ],
                "already attached",
            ),
            (
                vec![
                    start.clone(),
                    device_event("d", "device-detached", "2026-11-20T09:30:00Z", "M4-1"),
                ],
                "not attached",
            ),
            (
                vec![
                    start.clone(),
                    device_event("c", "device-attached", "2026-11-20T09:30:00Z", "C1"),
                ],
                "the run's console",
            ),
            (
                vec![
                    device_event("a", "device-attached", "2026-11-20T07:00:00Z", "M4-1"),
                    start.clone(),
                ],
                "has not started",
            ),
            (
                vec![
                    start.clone(),
                    attach.clone(),
                    ev(
                        json!({"eventId": "k", "type": "console-changed", "time": "2026-11-20T12:00:00Z",
                              "console": {"serial": "M4-1", "model": "M4"}}),
                    ),
                ],
                "detach it first",
            ),
        ];
        for (events, why) in cases {
            let error = fold("R", &events).expect_err(why);
            assert!(error.0.contains(why), "{error} should say {why}");
        }
        let erroneous = fold(
            "R",
            &[start, attach, ev(json!({"eventId": "x", "type": "entered-in-error", "time": "2026-11-20T10:00:00Z"}))],
        )
        .unwrap();
        assert_eq!(
            erroneous.device_periods().count(),
            0,
            "an erroneous run claims no device"
        );
    }
}
