//! One request, one value per resource: the same business identifier twice in a request (the
//! same device, parameter and time) is merged when both say the same thing and refused with 422,
//! naming both places, when they differ. So no Bundle the gateway builds from a request holds
//! two entries with the same conditional identity (EHRs refuse such transactions), and which of
//! two contradicting values wins is never decided by accident. A correction belongs in a later
//! request, where it amends what the EHR holds.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use http::{Request, StatusCode};
use mappings::MappedResource;
use tower::filter::{FilterLayer, Predicate};

use crate::BoxError;
use crate::delivery::OutboundBatch;
use crate::outcome::{ApiError, Issue};

#[derive(Clone, Copy, Default)]
pub struct MergeDuplicates;

pub fn layer() -> FilterLayer<MergeDuplicates> {
    FilterLayer::new(MergeDuplicates)
}

impl Predicate<Request<OutboundBatch>> for MergeDuplicates {
    type Request = Request<OutboundBatch>;

    fn check(
        &mut self,
        request: Request<OutboundBatch>,
    ) -> Result<Request<OutboundBatch>, BoxError> {
        let (parts, mut batch) = request.into_parts();
        merge(&mut batch)?;
        Ok(Request::from_parts(parts, batch))
    }
}

/// Drops repeats of identical resources; refuses contradicting ones.
fn merge(batch: &mut OutboundBatch) -> Result<(), ApiError> {
    let origin = |i: usize| batch.origins.get(i).map_or("/", String::as_str).to_owned();
    let mut first: HashMap<(&str, &str, &str), usize> =
        HashMap::with_capacity(batch.resources.len());
    let mut repeats = Vec::new();
    let mut issues = Vec::new();
    for (index, resource) in batch.resources.iter().enumerate() {
        let key = (
            resource.resource_type,
            &*resource.identifier_system,
            resource.identifier_value.as_str(),
        );
        match first.entry(key) {
            Entry::Vacant(slot) => {
                slot.insert(index);
            }
            Entry::Occupied(earlier) => {
                let earlier = *earlier.get();
                if batch.resources[earlier].json == resource.json {
                    repeats.push(index);
                } else {
                    issues.push(
                        Issue::error(
                            "duplicate",
                            format!(
                                "{} and {} are the same {} (same device, parameter and time) with different content; send one value per parameter and time (a correction goes in a later request)",
                                origin(earlier),
                                origin(index),
                                resource.resource_type
                            ),
                        )
                        .at(origin(earlier))
                        .also_at(origin(index)),
                    );
                }
            }
        }
    }
    if !issues.is_empty() {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, issues));
    }
    if repeats.is_empty() {
        return Ok(());
    }
    let mut keep = vec![true; batch.resources.len()];
    for index in repeats {
        keep[index] = false;
    }
    let resources: Vec<MappedResource> = batch
        .resources
        .iter()
        .zip(&keep)
        .filter(|(_, keep)| **keep)
        .map(|(r, _)| r.clone())
        .collect();
    let origins: Vec<String> = std::mem::take(&mut batch.origins)
        .into_iter()
        .zip(&keep)
        .filter(|(_, keep)| **keep)
        .map(|(o, _)| o)
        .collect();
    batch.resources = resources.into();
    batch.origins = origins;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(value: &str, json: &str) -> MappedResource {
        MappedResource {
            resource_type: "Observation",
            id: mappings::logical_id(mappings::OBSERVATION_IDENTIFIER_SYSTEM, value),
            identifier_system: mappings::OBSERVATION_IDENTIFIER_SYSTEM.into(),
            identifier_value: value.into(),
            json: json.as_bytes().to_vec(),
            upsert: false,
        }
    }

    fn batch(resources: Vec<MappedResource>) -> OutboundBatch {
        OutboundBatch {
            request_id: "r".into(),
            vendor: "v".into(),
            model: "m".into(),
            origins: (0..resources.len())
                .map(|i| format!("/readings/{i}"))
                .collect(),
            resources: resources.into(),
            revision: None,
            source: crate::outbox::provenance::test_source(),
            subjects: Default::default(),
            descriptions: Vec::new(),
            described: Vec::new(),
        }
    }

    #[test]
    fn identical_repeats_are_merged_in_order() {
        let mut b = batch(vec![
            observation("a", "{1}"),
            observation("b", "{2}"),
            observation("a", "{1}"),
            observation("c", "{3}"),
            observation("b", "{2}"),
        ]);
        merge(&mut b).unwrap();
        let kept: Vec<_> = b
            .resources
            .iter()
            .map(|r| r.identifier_value.as_str())
            .collect();
        assert_eq!(kept, ["a", "b", "c"]);
        assert_eq!(b.origins, ["/readings/0", "/readings/1", "/readings/3"]);
    }

    #[test]
    fn contradicting_repeats_are_refused_naming_both() {
        let mut b = batch(vec![
            observation("a", "{1}"),
            observation("b", "{2}"),
            observation("a", "{9}"),
        ]);
        let error = merge(&mut b).unwrap_err();
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error.issues.len(), 1);
        assert_eq!(error.issues[0].expression.as_deref(), Some("/readings/0"));
        assert_eq!(error.issues[0].also_at, ["/readings/2"]);
        assert_eq!(error.issues[0].code, "duplicate");
    }

    #[test]
    fn a_batch_without_repeats_is_left_alone() {
        let mut b = batch(vec![observation("a", "{1}"), observation("b", "{1}")]);
        merge(&mut b).unwrap();
        assert_eq!(b.resources.len(), 2);
    }
}
