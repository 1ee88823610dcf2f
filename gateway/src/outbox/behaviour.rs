//! What every outbox engine must do, as tests each engine runs against itself (see
//! [`engine_tests`]): resends and corrections, per-resource order, retries, dead letters and
//! replay, retractions, charting intervals, retention and the message browser.

use std::sync::Arc;

use super::*;
use crate::config::Corrections;

pub(super) fn message(destination: &str, n: usize) -> NewMessage {
    reading(
        destination,
        n,
        r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":1}}"#,
    )
}

pub(super) fn reading(destination: &str, n: usize, body: &str) -> NewMessage {
    NewMessage {
        destination: destination.into(),
        resource_type: "Observation".into(),
        logical_id: format!("id{n}"),
        identifier_system: "s".into(),
        identifier_value: format!("v{n}"),
        body: body.as_bytes().to_vec(),
        content_hash: super::content_hash(body.as_bytes()),
        upsert: false,
        revision: None,
        corrections: Corrections::Amend,
        chart_due_ms: None,
        chart_reading: None,
    }
}

/// `len` characters that compress to no less than about three quarters (the outbox compresses
/// bodies): for tests about how many bytes the outbox writes.
pub(super) fn incompressible(len: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(len as u64);
    std::iter::repeat_with(|| rng.alphanumeric())
        .take(len)
        .collect()
}

pub(super) fn procedure(revision: i64, status: &str) -> NewMessage {
    let body = format!(r#"{{"resourceType":"Procedure","status":"{status}"}}"#);
    NewMessage {
        resource_type: "Procedure".into(),
        upsert: true,
        revision: Some(revision),
        content_hash: super::content_hash(body.as_bytes()),
        body: body.into_bytes(),
        ..message("ehr", 99)
    }
}

/// The messages of "ehr" due at `now`, looked for from the start.
pub(super) async fn due_at(outbox: &dyn Outbox, now: i64, in_flight: &[i64]) -> Vec<Pending> {
    outbox
        .due("ehr", now, 10, &in_flight.iter().copied().collect(), 0)
        .await
        .unwrap()
        .messages
}

pub(super) fn ids(enqueued: Vec<Enqueued>) -> Vec<i64> {
    enqueued.into_iter().map(|e| e.message_id).collect()
}

pub(super) fn delivered() -> Settle {
    Settle::Delivered {
        status: "201".into(),
        location: None,
    }
}

pub(super) fn dead() -> Settle {
    Settle::Dead {
        error: "422".into(),
        outcome: None,
    }
}

/// Three messages for `ehr` (readings 0, 1 and 2) accepted as request `batch_id`: their ids.
pub(super) async fn three_for_ehr(outbox: &dyn Outbox, batch_id: &str) -> Vec<i64> {
    ids(outbox
        .enqueue(
            batch_id.into(),
            (0..3).map(|n| message("ehr", n)).collect(),
            None,
        )
        .await
        .unwrap())
}

/// Delivery's reads name the destination as a literal: a quote in its name is escaped.
pub(super) async fn a_destination_named_with_a_quote_gets_its_messages(outbox: Arc<dyn Outbox>) {
    let name = "st. mary's ehr";
    let messages = vec![message(name, 0), message("ehr", 1), message(name, 2)];
    let ids = ids(outbox.enqueue("b1".into(), messages, None).await.unwrap());
    let due = outbox
        .due(name, now_ms(), 10, &Default::default(), 0)
        .await
        .unwrap();
    let due: Vec<i64> = due.messages.iter().map(|m| m.id).collect();
    assert_eq!(due, vec![ids[0], ids[2]]);
    assert!(outbox.next_due(name).await.unwrap().is_some());
    assert!(outbox.next_due("o'neil").await.unwrap().is_none());
}

pub(super) fn retention(delivered_before_ms: i64, dead_before_ms: i64) -> Retention {
    Retention {
        delivered_before_ms,
        dead_before_ms,
    }
}

pub(super) async fn purge_forgets_only_messages_past_keeping(outbox: Arc<dyn Outbox>) {
    let ids = three_for_ehr(&*outbox, "b").await;
    outbox
        .settle(vec![(ids[0], delivered()), (ids[1], dead())])
        .await
        .unwrap();
    let past = now_ms() - 60_000;
    let future = now_ms() + 1000;
    let none = outbox.purge(retention(past, past)).await.unwrap();
    assert_eq!((none.delivered, none.dead), (0, 0), "not old enough");
    let delivered = outbox.purge(retention(future, past)).await.unwrap();
    assert_eq!((delivered.delivered, delivered.dead), (1, 0));
    let stats = outbox.stats().await.unwrap();
    assert_eq!(
        (stats[0].accepted, stats[0].dead, stats[0].pending),
        (2, 1, 1)
    );
    // The pending message is kept whatever the cut-offs.
    let dead = outbox.purge(retention(future, future)).await.unwrap();
    assert_eq!((dead.delivered, dead.dead), (0, 1));
    let stats = outbox.stats().await.unwrap();
    assert_eq!(
        (stats[0].accepted, stats[0].dead, stats[0].pending),
        (1, 0, 1)
    );
}

/// The queue depths a metrics scrape reads agree with the full count: per destination what
/// is pending (and since when) and what died, nothing of what was delivered.
pub(super) async fn queue_depths_agree_with_the_full_count(outbox: Arc<dyn Outbox>) {
    let ids = three_for_ehr(&*outbox, "b").await;
    outbox
        .enqueue("c".into(), vec![message("other", 7)], None)
        .await
        .unwrap();
    outbox
        .settle(vec![(ids[0], delivered()), (ids[1], dead())])
        .await
        .unwrap();
    let depths = outbox.queue_depths().await.unwrap();
    let summary: Vec<(&str, u64, u64, bool)> = depths
        .iter()
        .map(|d| {
            (
                d.destination.as_str(),
                d.pending,
                d.dead,
                d.oldest_pending_seconds
                    .is_some_and(|s| (0.0..60.0).contains(&s)),
            )
        })
        .collect();
    assert_eq!(summary, [("ehr", 1, 1, true), ("other", 1, 0, true)]);
    let stats = outbox.stats().await.unwrap();
    for (depth, full) in depths.iter().zip(&stats) {
        assert_eq!(
            (&depth.destination, depth.pending, depth.dead),
            (&full.destination, full.pending, full.dead)
        );
    }
    // Nothing pending and one dead letter: the dead letter alone, no age.
    outbox.settle(vec![(ids[2], dead())]).await.unwrap();
    let depths = outbox.queue_depths().await.unwrap();
    assert_eq!(depths[0].destination, "ehr");
    assert_eq!((depths[0].pending, depths[0].dead), (0, 2));
    assert_eq!(depths[0].oldest_pending_seconds, None);
}

/// The message browser finds a request by what it was about, shows one message with its
/// FHIR and the EHR's answer, charts a run's readings, and forgets a request with its
/// last message.
pub(super) async fn messages_are_found_by_device_patient_and_run(outbox: Arc<dyn Outbox>) {
    let body = |code: &str, value: f64| {
        format!(
            r#"{{"resourceType":"Observation","code":{{"coding":[{{"system":"{}","code":"{code}"}}]}},"effectiveDateTime":"2026-12-06T08:00:0{}Z","valueQuantity":{{"value":{value},"unit":"L/min"}}}}"#,
            mappings::ECMO_CODE_SYSTEM,
            value as u8
        )
    };
    let mut flow = reading("ehr", 1, &body("blood-flow", 4.0));
    flow.identifier_value = "cardiohelp:CH-1:blood-flow:20261206T080004Z".into();
    let facts = BatchFacts {
        sender: "acme".into(),
        devices: vec!["CH-1".into()],
        patients: vec!["urn:mrn|MRN-7".into()],
        runs: vec!["run-1".into()],
    };
    let ids = ids(outbox
        .enqueue(
            Batch {
                id: "t1".into(),
                facts,
            },
            vec![flow, reading("other", 2, &body("pump-speed", 3.0))],
            None,
        )
        .await
        .unwrap());
    outbox
        .enqueue("t2".into(), vec![message("ehr", 3)], None)
        .await
        .unwrap();
    outbox
        .settle(vec![(
            ids[0],
            Settle::Dead {
                error: "422 Unprocessable".into(),
                outcome: Some(r#"{"resourceType":"OperationOutcome"}"#.into()),
            },
        )])
        .await
        .unwrap();
    let find = |query: browse::MessageQuery| {
        let outbox = outbox.clone();
        async move {
            let found = outbox
                .search(browse::MessageQuery { limit: 10, ..query })
                .await
                .unwrap();
            found.iter().map(|m| m.message_id).collect::<Vec<_>>()
        }
    };
    let all = find(Default::default()).await;
    assert_eq!(all.len(), 3, "newest first: {all:?}");
    assert!(all[0] > all[1]);
    let query = |f: fn(&mut browse::MessageQuery)| {
        let mut q = browse::MessageQuery::default();
        f(&mut q);
        q
    };
    assert_eq!(
        find(query(|q| q.device = Some("CH-1".into()))).await.len(),
        2
    );
    assert!(
        find(query(|q| q.device = Some("CH".into())))
            .await
            .is_empty()
    );
    assert_eq!(
        find(query(|q| q.patient = Some("MRN-7".into())))
            .await
            .len(),
        2
    );
    assert_eq!(
        find(query(|q| q.patient = Some("urn:mrn|MRN-7".into())))
            .await
            .len(),
        2
    );
    assert_eq!(find(query(|q| q.run = Some("run-1".into()))).await.len(), 2);
    assert_eq!(
        find(query(|q| q.vendor = Some("acme".into()))).await.len(),
        2
    );
    assert_eq!(
        find(query(|q| q.parameter = Some("blood-flow".into()))).await,
        vec![ids[0]]
    );
    assert_eq!(
        find(query(|q| q.state = Some("dead".into()))).await,
        vec![ids[0]]
    );
    assert_eq!(
        find(query(|q| q.tracking_id = Some("t2".into())))
            .await
            .len(),
        1
    );
    let detail = outbox.message(ids[0]).await.unwrap().unwrap();
    assert_eq!(detail.summary.state, "dead");
    assert_eq!(detail.summary.devices, vec!["CH-1"]);
    assert_eq!(detail.resource["valueQuantity"]["value"], 4.0);
    assert_eq!(detail.outcome.unwrap()["resourceType"], "OperationOutcome");
    assert!(outbox.message(-1).await.unwrap().is_none());
    let chart = outbox.run_readings("run-1", 10).await.unwrap();
    let codes: Vec<&str> = chart.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(codes, vec!["pump-speed", "blood-flow"]);
    // Retention forgets the request once none of its messages is kept.
    let future = now_ms() + 1000;
    outbox.purge(retention(future, future)).await.unwrap();
    let left = outbox
        .search(browse::MessageQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(left.len(), 2, "the dead letter is gone");
    assert!(
        left.iter().all(|m| m.sender.is_some()),
        "both requests still have a pending message, so what they were about is kept: {left:?}"
    );
}

/// What a destination was given goes with a purged reading or dead letter: the same
/// reading again is a new message (a dead letter's content was never delivered; taking it
/// for a resend would drop it in silence), while a run's state stays known.
pub(super) async fn purge_forgets_what_was_given_with_readings_and_dead_letters(
    outbox: Arc<dyn Outbox>,
) {
    let first = ids(outbox
        .enqueue(
            "b1".into(),
            vec![
                message("ehr", 0),
                message("ehr", 1),
                procedure(1, "in-progress"),
            ],
            None,
        )
        .await
        .unwrap());
    let delivered = Settle::Delivered {
        status: "201".into(),
        location: None,
    };
    outbox
        .settle(vec![
            (first[0], delivered.clone()),
            (
                first[1],
                Settle::Dead {
                    error: "422".into(),
                    outcome: None,
                },
            ),
            (first[2], delivered),
        ])
        .await
        .unwrap();
    let later = now_ms() + 1000;
    let purged = outbox.purge(retention(later, later)).await.unwrap();
    assert_eq!((purged.delivered, purged.dead), (2, 1));
    let again = outbox
        .enqueue(
            "b2".into(),
            vec![
                message("ehr", 0),
                message("ehr", 1),
                procedure(1, "in-progress"),
            ],
            None,
        )
        .await
        .unwrap();
    let dispositions: Vec<Disposition> = again.iter().map(|e| e.disposition).collect();
    assert_eq!(
        dispositions,
        [
            Disposition::Created,
            Disposition::Created,
            Disposition::Unchanged
        ]
    );
}

pub(super) async fn retry_waits_until_due(outbox: Arc<dyn Outbox>) {
    let ids = ids(outbox
        .enqueue("b".into(), vec![message("ehr", 1)], None)
        .await
        .unwrap());
    let later = now_ms() + 60_000;
    outbox
        .settle(vec![(
            ids[0],
            Settle::Retry {
                at_ms: later,
                error: "503".into(),
            },
        )])
        .await
        .unwrap();
    assert!(due_at(&*outbox, now_ms(), &[]).await.is_empty());
    assert_eq!(outbox.next_due("ehr").await.unwrap(), Some(later));
    assert_eq!(due_at(&*outbox, later, &[]).await[0].attempts, 1);
}

pub(super) async fn due_resumes_after_what_is_in_flight_and_from_what_it_passed_over(
    outbox: Arc<dyn Outbox>,
) {
    let sent = ids(outbox
        .enqueue(
            "b1".into(),
            (0..5).map(|n| message("ehr", n)).collect(),
            None,
        )
        .await
        .unwrap());
    let ids_of = |due: &Due| due.messages.iter().map(|p| p.id).collect::<Vec<_>>();
    let mut flying = std::collections::HashSet::new();
    let first = outbox.due("ehr", now_ms(), 2, &flying, 0).await.unwrap();
    assert_eq!(ids_of(&first), sent[..2]);
    assert_eq!(first.resume_from, sent[1] + 1);
    flying.extend(&sent[..2]);
    let rest = outbox
        .due("ehr", now_ms(), 10, &flying, first.resume_from)
        .await
        .unwrap();
    assert_eq!(ids_of(&rest), sent[2..]);
    assert_eq!(rest.resume_from, sent[4] + 1);
    // Nothing new: the next call starts where this one ended.
    flying.extend(&sent[2..]);
    let none = outbox
        .due("ehr", now_ms(), 10, &flying, rest.resume_from)
        .await
        .unwrap();
    assert!(none.messages.is_empty());
    assert_eq!(none.resume_from, rest.resume_from);
    // The third is to be retried later: passed over, and the next call starts from it.
    let later = now_ms() + 60_000;
    outbox
        .settle(vec![(
            sent[2],
            Settle::Retry {
                at_ms: later,
                error: "503".into(),
            },
        )])
        .await
        .unwrap();
    flying.remove(&sent[2]);
    let waiting = outbox.due("ehr", now_ms(), 10, &flying, 0).await.unwrap();
    assert!(waiting.messages.is_empty());
    assert_eq!(waiting.resume_from, sent[2]);
    let due = outbox
        .due("ehr", later, 10, &flying, waiting.resume_from)
        .await
        .unwrap();
    assert_eq!(ids_of(&due), [sent[2]]);
    assert_eq!(due.messages[0].body, message("ehr", 2).body);
}

pub(super) async fn messages_in_flight_are_skipped_and_hold_back_their_successors(
    outbox: Arc<dyn Outbox>,
) {
    let first = three_for_ehr(&*outbox, "b1").await;
    // A correction of message 0 while 0 is being sent.
    let corrected =
        r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":2}}"#;
    let correction = ids(outbox
        .enqueue("b2".into(), vec![reading("ehr", 0, corrected)], None)
        .await
        .unwrap());
    let due: Vec<i64> = due_at(&*outbox, now_ms(), &first[..1])
        .await
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(due, first[1..], "neither 0 nor its correction");
    // 0 delivered: the correction is next, and nothing in flight is handed out twice.
    outbox.settle(vec![(first[0], delivered())]).await.unwrap();
    let due: Vec<i64> = due_at(&*outbox, now_ms(), &first[1..])
        .await
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(due, correction);
}

pub(super) async fn concurrent_enqueues_share_commits(outbox: Arc<dyn Outbox>) {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let outbox = outbox.clone();
        tasks.spawn(async move {
            outbox
                .enqueue(format!("b{n}").into(), vec![message("ehr", n)], None)
                .await
                .unwrap()
        });
    }
    while tasks.join_next().await.is_some() {}
    assert_eq!(outbox.stats().await.unwrap()[0].accepted, 50);
}

pub(super) fn dispositions(enqueued: &[Enqueued]) -> Vec<&'static str> {
    enqueued.iter().map(|e| e.disposition.as_str()).collect()
}

pub(super) async fn a_resend_is_a_no_op_and_a_correction_an_amendment_that_waits_its_turn(
    outbox: Arc<dyn Outbox>,
) {
    let original =
        r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":4.2}}"#;
    let corrected =
        r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":4.5}}"#;
    let first = outbox
        .enqueue("b1".into(), vec![reading("ehr", 1, original)], None)
        .await
        .unwrap();
    let again = outbox
        .enqueue("b2".into(), vec![reading("ehr", 1, original)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&again), ["unchanged"]);
    assert_eq!(again[0].message_id, first[0].message_id);
    let correction = outbox
        .enqueue("b3".into(), vec![reading("ehr", 1, corrected)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&correction), ["amended"]);

    // While the original waits for a retry, the correction is not due either.
    let due = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(
        due.iter().map(|p| p.id).collect::<Vec<_>>(),
        [first[0].message_id]
    );
    let later = now_ms() + 60_000;
    outbox
        .settle(vec![(
            first[0].message_id,
            Settle::Retry {
                at_ms: later,
                error: "503".into(),
            },
        )])
        .await
        .unwrap();
    assert!(due_at(&*outbox, now_ms(), &[]).await.is_empty());
    assert_eq!(outbox.next_due("ehr").await.unwrap(), Some(later));
    let due = due_at(&*outbox, later, &[]).await;
    assert_eq!(
        due.iter().map(|p| p.id).collect::<Vec<_>>(),
        [first[0].message_id]
    );
    outbox
        .settle(vec![(first[0].message_id, delivered())])
        .await
        .unwrap();

    // Then the amendment: an update, with status amended.
    let due = due_at(&*outbox, later, &[]).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].id, correction[0].message_id);
    assert!(due[0].upsert);
    let body: serde_json::Value = serde_json::from_slice(&due[0].body).unwrap();
    assert_eq!(body["status"], "amended");
    assert_eq!(body["valueQuantity"]["value"].to_string(), "4.5");
    let status = outbox.batch_status("b3").await.unwrap();
    assert_eq!(status[0].disposition, Disposition::Amended);

    // The corrected value sent again changes nothing; the original value again amends back.
    let resend = outbox
        .enqueue("b4".into(), vec![reading("ehr", 1, corrected)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&resend), ["unchanged"]);
    let back = outbox
        .enqueue("b5".into(), vec![reading("ehr", 1, original)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&back), ["amended"]);
}

pub(super) async fn a_destination_that_rejects_corrections_refuses_the_whole_enqueue(
    outbox: Arc<dyn Outbox>,
) {
    let strict = |n, body| NewMessage {
        corrections: Corrections::Reject,
        ..reading("strict", n, body)
    };
    outbox
        .enqueue(
            "b1".into(),
            vec![strict(1, r#"{"v":1}"#), reading("ehr", 1, r#"{"v":1}"#)],
            None,
        )
        .await
        .unwrap();
    let refused = outbox
        .enqueue(
            "b2".into(),
            vec![
                reading("ehr", 2, r#"{"v":2}"#),
                reading("ehr", 1, r#"{"v":9}"#),
                strict(1, r#"{"v":9}"#),
            ],
            None,
        )
        .await
        .unwrap_err();
    match refused {
        OutboxError::CorrectionsRefused(which) => assert_eq!(which, [(2, "strict".to_owned())]),
        other => panic!("{other:?}"),
    }
    assert!(
        outbox.batch_status("b2").await.unwrap().is_empty(),
        "nothing of it is stored"
    );
    // The identical resend is still taken.
    let again = outbox
        .enqueue("b3".into(), vec![strict(1, r#"{"v":1}"#)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&again), ["unchanged"]);
}

pub(super) async fn an_older_run_state_never_follows_a_newer_one(outbox: Arc<dyn Outbox>) {
    let newer = outbox
        .enqueue("b1".into(), vec![procedure(3, "in-progress")], None)
        .await
        .unwrap();
    let older = outbox
        .enqueue("b2".into(), vec![procedure(2, "preparation")], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&older), ["superseded"]);
    assert_eq!(older[0].message_id, newer[0].message_id);
    let same = outbox
        .enqueue("b3".into(), vec![procedure(3, "in-progress")], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&same), ["unchanged"]);
    let next = outbox
        .enqueue("b4".into(), vec![procedure(4, "completed")], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&next), ["updated"]);
    let due = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(
        due.iter().map(|p| p.id).collect::<Vec<_>>(),
        [newer[0].message_id]
    );
}

pub(super) async fn a_dead_letter_that_was_moved_on_from_is_not_replayed(outbox: Arc<dyn Outbox>) {
    let old = outbox
        .enqueue("b1".into(), vec![procedure(1, "preparation")], None)
        .await
        .unwrap();
    outbox
        .settle(vec![(
            old[0].message_id,
            Settle::Dead {
                error: "422".into(),
                outcome: None,
            },
        )])
        .await
        .unwrap();
    let new = outbox
        .enqueue("b2".into(), vec![procedure(2, "in-progress")], None)
        .await
        .unwrap();
    outbox
        .settle(vec![(new[0].message_id, delivered())])
        .await
        .unwrap();
    assert_eq!(outbox.replay(None, None).await.unwrap(), 0);
    assert!(due_at(&*outbox, now_ms(), &[]).await.is_empty());

    // The latest message of a resource is replayed, and sent as it was.
    let dead = outbox
        .enqueue("b3".into(), vec![procedure(3, "completed")], None)
        .await
        .unwrap();
    outbox
        .settle(vec![(
            dead[0].message_id,
            Settle::Dead {
                error: "422".into(),
                outcome: None,
            },
        )])
        .await
        .unwrap();
    assert_eq!(outbox.replay(None, None).await.unwrap(), 1);
    assert_eq!(
        due_at(&*outbox, now_ms(), &[]).await[0].id,
        dead[0].message_id
    );
}

pub(super) async fn a_retraction_follows_what_is_pending_and_a_resend_does_not_undo_it(
    outbox: Arc<dyn Outbox>,
) {
    let body = r#"{"resourceType":"Observation","status":"final","valueQuantity":{"value":4.2}}"#;
    let first = outbox
        .enqueue(
            "b1".into(),
            vec![reading("ehr", 1, body), reading("lab", 1, body)],
            None,
        )
        .await
        .unwrap();
    let retraction = |n: usize| Retraction {
        resource_type: "Observation".into(),
        logical_id: format!("id{n}"),
        identifier_value: format!("v{n}"),
        charted: Vec::new(),
    };
    match outbox
        .retract("r0".into(), vec![retraction(1), retraction(7)], None)
        .await
    {
        Err(OutboxError::Unknown(which)) => assert_eq!(which, [1]),
        other => panic!("{other:?}"),
    }
    let done = outbox
        .retract("r1".into(), vec![retraction(1)], None)
        .await
        .unwrap();
    let places: Vec<(&str, &str)> = done[0]
        .iter()
        .map(|(d, e)| (d.as_str(), e.disposition.as_str()))
        .collect();
    assert_eq!(places, [("ehr", "retracted"), ("lab", "retracted")]);
    // It waits for the original, then says entered-in-error.
    let due = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(
        due.iter().map(|p| p.id).collect::<Vec<_>>(),
        [first[0].message_id]
    );
    outbox
        .settle(vec![(first[0].message_id, delivered())])
        .await
        .unwrap();
    let due = due_at(&*outbox, now_ms(), &[]).await;
    let sent: serde_json::Value = serde_json::from_slice(&due[0].body).unwrap();
    assert_eq!(sent["status"], "entered-in-error");
    assert!(due[0].upsert);
    // Retracting again, or resending the value, changes nothing.
    let again = outbox
        .retract("r2".into(), vec![retraction(1)], None)
        .await
        .unwrap();
    assert_eq!(again[0][0].1.disposition, Disposition::Unchanged);
    let resend = outbox
        .enqueue("b2".into(), vec![reading("ehr", 1, body)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&resend), ["unchanged"]);
}

/// A reading of a charting interval (see `outbox::handoff::charted`), device time `at`.
pub(super) fn interval_reading(at: i64, due: i64, value: u32) -> NewMessage {
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final","valueQuantity":{{"value":{value}}}}}"#
    );
    NewMessage {
        logical_id: "slot".into(),
        identifier_value: "f:CH-1:flow:20260601T120000Z/PT15M".into(),
        upsert: true,
        revision: Some(at),
        chart_due_ms: Some(due),
        content_hash: super::content_hash(body.as_bytes()),
        body: body.into_bytes(),
        ..message("ehr", 1)
    }
}

pub(super) async fn an_interval_is_sent_once_when_it_ends_with_its_latest_reading(
    outbox: Arc<dyn Outbox>,
) {
    let due = now_ms() + 600_000;
    let first = outbox
        .enqueue("b1".into(), vec![interval_reading(1_000, due, 1)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&first), ["created"]);
    // Not due before the interval ends, so nothing is in flight: a later reading rewrites
    // the message, an earlier one (late from another path) is superseded.
    assert!(due_at(&*outbox, now_ms(), &[]).await.is_empty());
    let later = outbox
        .enqueue("b2".into(), vec![interval_reading(2_000, due, 2)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&later), ["updated"]);
    assert_eq!(later[0].message_id, first[0].message_id);
    let earlier = outbox
        .enqueue("b3".into(), vec![interval_reading(1_500, due, 3)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&earlier), ["superseded"]);
    let sent = due_at(&*outbox, due, &[]).await;
    assert_eq!(sent.len(), 1);
    assert!(String::from_utf8_lossy(&sent[0].body).contains(r#""value":2"#));
    assert!(sent[0].upsert);
    outbox
        .settle(vec![(sent[0].id, delivered())])
        .await
        .unwrap();
    // Once sent, a later reading is an update after it, due at once (its interval is over).
    let late = outbox
        .enqueue(
            "b4".into(),
            vec![interval_reading(3_000, now_ms() - 1, 4)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(dispositions(&late), ["updated"]);
    assert_ne!(late[0].message_id, first[0].message_id);
    let update = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(update.len(), 1);
    assert!(String::from_utf8_lossy(&update[0].body).contains(r#""value":4"#));
}

pub(super) async fn an_interval_rewritten_while_delivery_holds_it_is_sent_again(
    outbox: Arc<dyn Outbox>,
) {
    // Its interval is over: due at once, and delivery takes it.
    let due = now_ms() - 1;
    let first = outbox
        .enqueue("b1".into(), vec![interval_reading(1_000, due, 1)], None)
        .await
        .unwrap();
    let held = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(held.len(), 1);
    // A later reading comes while the EHR is being sent the first.
    let later = outbox
        .enqueue("b2".into(), vec![interval_reading(2_000, due, 2)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&later), ["updated"]);
    assert_eq!(later[0].message_id, first[0].message_id);
    assert!(due_at(&*outbox, now_ms(), &[held[0].id]).await.is_empty());
    // What the EHR got is not what the outbox holds: not delivered, but sent again, and
    // delivery told to look from the start (it took the message as done).
    let rewinds = outbox.rewinds();
    outbox
        .settle(vec![(held[0].id, delivered())])
        .await
        .unwrap();
    assert_eq!(outbox.rewinds(), rewinds + 1);
    let again = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(again.len(), 1);
    assert!(String::from_utf8_lossy(&again[0].body).contains(r#""value":2"#));
    outbox
        .settle(vec![(again[0].id, delivered())])
        .await
        .unwrap();
    assert!(due_at(&*outbox, now_ms(), &[]).await.is_empty());
    let status = outbox.batch_status("b1").await.unwrap();
    assert_eq!(status[0].state, "delivered");
    assert_eq!(status[0].attempts, 1);
}

pub(super) async fn a_retracted_reading_takes_its_interval_back_only_while_it_is_charted(
    outbox: Arc<dyn Outbox>,
) {
    let due = now_ms() - 1;
    let charted = outbox
        .enqueue("b1".into(), vec![interval_reading(2_000, due, 2)], None)
        .await
        .unwrap();
    let retraction = |at: i64| Retraction {
        resource_type: "Observation".into(),
        logical_id: "reading".into(),
        identifier_value: "f:CH-1:flow:20260601T120000.000Z".into(),
        charted: vec![super::ChartedRetraction {
            destination: "ehr".into(),
            slot_logical_id: "slot".into(),
            slot_identifier_value: "f:CH-1:flow:20260601T120000Z/PT15M".into(),
            reading_ms: at,
            statistic: None,
        }],
    };
    // A reading the interval does not chart: known, nothing to take back.
    let other = outbox
        .retract("r1".into(), vec![retraction(1_000)], None)
        .await
        .unwrap();
    assert_eq!(other[0][0].1.disposition, Disposition::Unchanged);
    assert_eq!(other[0][0].1.message_id, charted[0].message_id);
    let retracted = outbox
        .retract("r2".into(), vec![retraction(2_000)], None)
        .await
        .unwrap();
    assert_eq!(retracted[0][0].0, "ehr");
    assert_eq!(retracted[0][0].1.disposition, Disposition::Retracted);
    let sent = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(
        sent.iter().map(|m| m.id).collect::<Vec<_>>(),
        [charted[0].message_id]
    );
    outbox
        .settle(vec![(sent[0].id, delivered())])
        .await
        .unwrap();
    let restated = due_at(&*outbox, now_ms(), &[]).await;
    assert_eq!(restated[0].id, retracted[0][0].1.message_id);
    assert_eq!(restated[0].logical_id, "slot");
    assert!(String::from_utf8_lossy(&restated[0].body).contains("entered-in-error"));
    // A later reading of the interval charts it again.
    let again = outbox
        .enqueue("b2".into(), vec![interval_reading(3_000, due, 3)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&again), ["updated"]);
}

pub(super) const MEAN_INTERVAL: super::ChartInterval = super::ChartInterval {
    statistic: mappings::ChartStatistic::Mean,
    start_ms: 0,
    end_ms: 900_000,
};

/// A reading of an interval charted as its mean, device time `at`; `None` is a reading the
/// device marked invalid.
pub(super) fn mean_reading(at: i64, value: Option<&str>) -> NewMessage {
    let element = match value {
        Some(v) => format!(
            r#""valueQuantity":{{"value":{v},"unit":"L/min","system":"http://unitsofmeasure.org","code":"L/min"}}"#
        ),
        None => r#""dataAbsentReason":{"text":"invalid"}"#.to_owned(),
    };
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final","effectiveDateTime":"1970-01-01T00:00:0{}Z",{element}}}"#,
        at / 1000
    );
    NewMessage {
        logical_id: "slot".into(),
        identifier_value: "f:CH-1:flow:19700101T000000Z/PT15M".into(),
        upsert: true,
        revision: Some(at),
        chart_due_ms: Some(now_ms() - 1),
        chart_reading: Some(super::ChartReading {
            interval: MEAN_INTERVAL,
            reading_ms: at,
            value: value.map(str::to_owned),
        }),
        content_hash: super::content_hash(body.as_bytes()),
        body: body.into_bytes(),
        ..message("ehr", 1)
    }
}

/// What delivery is given now: one message, as JSON; settled delivered.
pub(super) async fn deliver_one(outbox: &dyn Outbox) -> serde_json::Value {
    let sent = due_at(outbox, now_ms(), &[]).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    outbox
        .settle(vec![(sent[0].id, delivered())])
        .await
        .unwrap();
    serde_json::from_slice(&sent[0].body).unwrap()
}

pub(super) async fn an_interval_charted_as_a_mean_follows_every_value_correction_and_retraction(
    outbox: Arc<dyn Outbox>,
) {
    let first = outbox
        .enqueue(
            "b1".into(),
            vec![
                mean_reading(1_000, Some("4.0")),
                mean_reading(2_000, Some("4.4")),
            ],
            None,
        )
        .await
        .unwrap();
    assert_eq!(dispositions(&first), ["created", "updated"]);
    let sent = deliver_one(&*outbox).await;
    assert_eq!(sent["valueQuantity"]["value"].to_string(), "4.2");
    assert_eq!(sent["method"]["coding"][0]["code"], "average");
    assert_eq!(sent["effectivePeriod"]["end"], "1970-01-01T00:15:00Z");
    // A resend changes nothing; a correction of one value changes the mean; a reading
    // the device marked invalid is no value (nothing changes).
    let resend = outbox
        .enqueue("b2".into(), vec![mean_reading(2_000, Some("4.4"))], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&resend), ["unchanged"]);
    let corrected = outbox
        .enqueue(
            "b3".into(),
            vec![mean_reading(2_000, Some("4.6")), mean_reading(3_000, None)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(dispositions(&corrected), ["updated", "unchanged"]);
    assert_eq!(
        deliver_one(&*outbox).await["valueQuantity"]["value"].to_string(),
        "4.3"
    );

    let retraction = |at: i64| Retraction {
        resource_type: "Observation".into(),
        logical_id: format!("reading-{at}"),
        identifier_value: format!("f:CH-1:flow:19700101T00000{}.000Z", at / 1000),
        charted: vec![super::ChartedRetraction {
            destination: "ehr".into(),
            slot_logical_id: "slot".into(),
            slot_identifier_value: "f:CH-1:flow:19700101T000000Z/PT15M".into(),
            reading_ms: at,
            statistic: Some(MEAN_INTERVAL),
        }],
    };
    let retract = |at: i64| {
        let outbox = outbox.clone();
        async move {
            let placed = outbox
                .retract(format!("r{at}").into(), vec![retraction(at)], None)
                .await
                .unwrap();
            placed[0][0].1.disposition
        }
    };
    // Taking a value back works the mean out again without it ...
    assert_eq!(retract(1_000).await, Disposition::Updated);
    assert_eq!(
        deliver_one(&*outbox).await["valueQuantity"]["value"].to_string(),
        "4.6"
    );
    // ... a resend of the reading taken back does not bring it back, as for a reading ...
    let resend = outbox
        .enqueue("b6".into(), vec![mean_reading(1_000, Some("4.0"))], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&resend), ["unchanged"]);
    // ... a reading never in the interval changes nothing ...
    assert_eq!(retract(5_000).await, Disposition::Unchanged);
    // ... with only the invalid reading left the value is absent ...
    assert_eq!(retract(2_000).await, Disposition::Updated);
    let absent = deliver_one(&*outbox).await;
    assert!(absent.get("valueQuantity").is_none());
    assert_eq!(absent["dataAbsentReason"]["coding"][0]["code"], "error");
    // ... and with none left the interval is taken back, once.
    assert_eq!(retract(3_000).await, Disposition::Retracted);
    assert_eq!(deliver_one(&*outbox).await["status"], "entered-in-error");
    assert_eq!(retract(3_000).await, Disposition::Unchanged);
    // A new reading charts the interval again: first an invalid one (its value absent) ...
    let invalid = outbox
        .enqueue("b5".into(), vec![mean_reading(4_500, None)], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&invalid), ["updated"]);
    // (amended, not entered-in-error: the destination had the interval before)
    let sent = deliver_one(&*outbox).await;
    assert_eq!(sent["status"], "amended");
    assert!(sent.get("valueQuantity").is_none());
    // ... then a value.
    let again = outbox
        .enqueue("b4".into(), vec![mean_reading(4_000, Some("3.9"))], None)
        .await
        .unwrap();
    assert_eq!(dispositions(&again), ["updated"]);
    let sent = deliver_one(&*outbox).await;
    assert_eq!(sent["status"], "amended");
    assert_eq!(sent["valueQuantity"]["value"].to_string(), "3.9");
}

/// Retention forgets the values of readings older than any correction still taken: a later
/// reading's statistic is then made of what is left.
pub(super) async fn retention_forgets_the_values_of_old_intervals(outbox: Arc<dyn Outbox>) {
    let charted = |sent: serde_json::Value| {
        sent["valueQuantity"]["value"]
            .to_string()
            .parse::<f64>()
            .unwrap()
    };
    outbox
        .enqueue("b1".into(), vec![mean_reading(1_000, Some("4.0"))], None)
        .await
        .unwrap();
    assert_eq!(charted(deliver_one(&*outbox).await), 4.0);
    // Not older than the cut-off: kept.
    outbox.purge(retention(1_000, 0)).await.unwrap();
    outbox
        .enqueue("b2".into(), vec![mean_reading(2_000, Some("6.0"))], None)
        .await
        .unwrap();
    assert_eq!(charted(deliver_one(&*outbox).await), 5.0);
    // Both older: forgotten, so the next reading's mean is its own value.
    outbox.purge(retention(2_001, 0)).await.unwrap();
    outbox
        .enqueue("b3".into(), vec![mean_reading(3_000, Some("8.0"))], None)
        .await
        .unwrap();
    assert_eq!(charted(deliver_one(&*outbox).await), 8.0);
}

/// The behaviour tests above, each as a `#[tokio::test]` on the outbox `$open` makes (an async
/// expression of `(Arc<dyn Outbox>, guard)`; the guard keeps its store alive).
macro_rules! engine_tests {
    ($open:expr) => {
        engine_tests!(@each $open; a_destination_named_with_a_quote_gets_its_messages, queue_depths_agree_with_the_full_count, purge_forgets_only_messages_past_keeping, messages_are_found_by_device_patient_and_run, purge_forgets_what_was_given_with_readings_and_dead_letters, retry_waits_until_due, messages_in_flight_are_skipped_and_hold_back_their_successors, concurrent_enqueues_share_commits, a_resend_is_a_no_op_and_a_correction_an_amendment_that_waits_its_turn, a_destination_that_rejects_corrections_refuses_the_whole_enqueue, an_older_run_state_never_follows_a_newer_one, a_dead_letter_that_was_moved_on_from_is_not_replayed, a_retraction_follows_what_is_pending_and_a_resend_does_not_undo_it, an_interval_is_sent_once_when_it_ends_with_its_latest_reading, an_interval_rewritten_while_delivery_holds_it_is_sent_again, a_retracted_reading_takes_its_interval_back_only_while_it_is_charted, an_interval_charted_as_a_mean_follows_every_value_correction_and_retraction, retention_forgets_the_values_of_old_intervals);
    };
    (@each $open:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (outbox, _guard) = $open.await;
                crate::outbox::behaviour::$name(outbox).await;
            }
        )*
    };
}
pub(crate) use engine_tests;
