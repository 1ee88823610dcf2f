//! Which Provenances a write owes its destinations. Only the outbox knows what a batch did at
//! each destination (created, corrected, retracted, or nothing because it was a resend), so
//! the Provenances are decided here, from those dispositions, and stored in the same commit
//! as the messages they describe: a resource is never delivered without its Provenance
//! queued, and a resend that changed nothing gets none.

use std::collections::BTreeMap;
use std::sync::Arc;

use mappings::{MappedResource, ProvenanceActivity, ProvenanceSource, ProvenanceTarget};

use crate::outbox::Disposition;

/// What the Provenances of one request say, and which destinations take them.
#[derive(Debug, Clone)]
pub struct ProvenancePlan {
    pub source: Arc<ProvenanceSource>,
    /// Destinations configured with `provenance = true`.
    pub destinations: Arc<[String]>,
}

/// One message a write stored: where, what it did, and the resource by business identifier.
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    pub destination: &'a str,
    pub disposition: Disposition,
    pub resource_type: &'a str,
    pub identifier_system: &'a str,
    pub identifier_value: &'a str,
}

fn activity(disposition: Disposition) -> Option<ProvenanceActivity> {
    match disposition {
        Disposition::Created => Some(ProvenanceActivity::Create),
        Disposition::Updated => Some(ProvenanceActivity::Update),
        Disposition::Amended => Some(ProvenanceActivity::Amend),
        Disposition::Retracted => Some(ProvenanceActivity::Retract),
        Disposition::Unchanged | Disposition::Superseded => None,
    }
}

/// Per destination that takes Provenance, one Provenance per kind of write in `written`,
/// naming every resource written that way; in a stable order (destination, then kind).
pub fn owed(
    plan: &ProvenancePlan,
    tracking_id: &str,
    written: &[Written<'_>],
) -> Vec<(String, MappedResource)> {
    let mut groups: BTreeMap<(&str, ProvenanceActivity), Vec<ProvenanceTarget<'_>>> =
        BTreeMap::new();
    for w in written {
        let Some(activity) = activity(w.disposition) else {
            continue;
        };
        if !plan.destinations.iter().any(|d| d == w.destination) {
            continue;
        }
        groups
            .entry((w.destination, activity))
            .or_default()
            .push(ProvenanceTarget {
                resource_type: w.resource_type,
                system: w.identifier_system,
                value: w.identifier_value,
            });
    }
    groups
        .into_iter()
        .map(|((destination, activity), targets)| {
            (
                destination.to_owned(),
                mappings::provenance(&plan.source, tracking_id, activity, &targets),
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) fn test_source() -> Arc<ProvenanceSource> {
    Arc::new(ProvenanceSource {
        sender: mappings::Sender::Vendor {
            name: "getinge".into(),
            certificate: "cardiohelp.getinge.example".into(),
        },
        devices: vec![mappings::DeviceAgent {
            serial_system: "https://fhir.ecmo-gateway.org/sid/device-serial/getinge".into(),
            serial: "CH-1".into(),
            model: "CARDIOHELP-i".into(),
            firmware: Some("5.1.2".into()),
        }],
        tables: vec![("getinge-cardiohelp".into(), "sha256:0123456789ab".into())],
        gateway: crate::GATEWAY_BUILD,
        received: "2026-12-03T10:00:00.000Z".into(),
        reason: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn written<'a>(destination: &'a str, disposition: Disposition, value: &'a str) -> Written<'a> {
        Written {
            destination,
            disposition,
            resource_type: "Observation",
            identifier_system: mappings::OBSERVATION_IDENTIFIER_SYSTEM,
            identifier_value: value,
        }
    }

    #[test]
    fn one_provenance_per_destination_and_kind_and_none_for_what_changed_nothing() {
        let plan = ProvenancePlan {
            source: test_source(),
            destinations: vec!["a".to_owned(), "b".to_owned()].into(),
        };
        let owed = owed(
            &plan,
            "t",
            &[
                written("a", Disposition::Created, "1"),
                written("a", Disposition::Amended, "2"),
                written("a", Disposition::Created, "3"),
                written("b", Disposition::Unchanged, "1"),
                written("b", Disposition::Superseded, "2"),
                written("c", Disposition::Created, "1"),
            ],
        );
        let summary: Vec<(String, String, usize)> = owed
            .iter()
            .map(|(destination, resource)| {
                let value: Value = serde_json::from_slice(&resource.json).unwrap();
                (
                    destination.clone(),
                    resource.identifier_value.clone(),
                    value["target"].as_array().unwrap().len(),
                )
            })
            .collect();
        // What is built passes the official R4 JSON Schema too, not only fhirbolt.
        let schema = crate::fhir_schema::R4Schema::for_types(&["Provenance"]).unwrap();
        for (_, resource) in &owed {
            let value: Value = serde_json::from_slice(&resource.json).unwrap();
            let violations = schema.check("Provenance", &value);
            assert!(violations.is_empty(), "{violations:?}");
        }
        // b changed nothing; c does not take Provenance.
        assert_eq!(
            summary,
            [
                ("a".to_owned(), "t.create".to_owned(), 2),
                ("a".to_owned(), "t.amend".to_owned(), 1)
            ]
        );
    }
}
