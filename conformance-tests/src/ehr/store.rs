//! The reference EHR's in-memory store: resources by type and id, versions, and an index of
//! business identifiers for conditional create and search.

use std::collections::HashMap;

use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Stored {
    pub version: u64,
    pub resource: Value,
    /// Order of first creation, for stable search results.
    pub sequence: u64,
}

#[derive(Debug, Default)]
pub struct Store {
    resources: HashMap<(String, String), Stored>,
    /// Every version but the current one of every resource, oldest first (FHIR's `_history`).
    versions: HashMap<(String, String), Vec<Value>>,
    /// (type, "system|value" or "_tag:system|code") -> id
    identifiers: HashMap<(String, String), String>,
    /// Resources per type, kept as they are created: counting never walks the store.
    counts: HashMap<String, usize>,
    /// Keep identifiers, versions and counts but not the resources (the benchmark's EHR, which
    /// takes millions of them).
    pub forget_bodies: bool,
    next_id: u64,
    next_sequence: u64,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Created {
        id: String,
        version: u64,
    },
    Updated {
        id: String,
        version: u64,
    },
    /// Conditional create found a match and stored nothing.
    Exists {
        id: String,
        version: u64,
    },
}

impl WriteOutcome {
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Self::Created { .. } => (201, "201 Created"),
            Self::Updated { .. } | Self::Exists { .. } => (200, "200 OK"),
        }
    }

    pub fn location(&self, resource_type: &str) -> String {
        let (Self::Created { id, version }
        | Self::Updated { id, version }
        | Self::Exists { id, version }) = self;
        format!("{resource_type}/{id}/_history/{version}")
    }
}

/// `identifier` tokens of a resource: `system|value` for each identifier.
pub fn identifier_tokens(resource: &Value) -> Vec<String> {
    resource["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some(format!(
                "{}|{}",
                i["system"].as_str().unwrap_or(""),
                i["value"].as_str()?
            ))
        })
        .collect()
}

/// Index keys of a resource: its identifier tokens, and `_tag:system|code` for each
/// `meta.tag` (how a resource without identifiers, such as a Provenance, is found again).
pub fn search_tokens(resource: &Value) -> Vec<String> {
    let mut tokens = identifier_tokens(resource);
    tokens.extend(
        resource["meta"]["tag"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some(format!(
                    "_tag:{}|{}",
                    t["system"].as_str().unwrap_or(""),
                    t["code"].as_str()?
                ))
            }),
    );
    tokens
}

impl Store {
    pub fn find_by_identifier(&self, resource_type: &str, token: &str) -> Option<&str> {
        self.identifiers
            .get(&(resource_type.to_owned(), token.to_owned()))
            .map(String::as_str)
    }

    pub fn read(&self, resource_type: &str, id: &str) -> Option<&Stored> {
        self.resources
            .get(&(resource_type.to_owned(), id.to_owned()))
    }

    /// Every version of a resource, oldest first.
    pub fn history(&self, resource_type: &str, id: &str) -> Vec<&Value> {
        let key = (resource_type.to_owned(), id.to_owned());
        let mut all: Vec<&Value> = self
            .versions
            .get(&key)
            .map(|older| older.iter().collect())
            .unwrap_or_default();
        all.extend(self.resources.get(&key).map(|s| &s.resource));
        all
    }

    /// All resources of a type, in creation order.
    pub fn all(&self, resource_type: &str) -> Vec<&Stored> {
        let mut found: Vec<&Stored> = self
            .resources
            .iter()
            .filter(|((t, _), _)| t == resource_type)
            .map(|(_, s)| s)
            .collect();
        found.sort_by_key(|s| s.sequence);
        found
    }

    pub fn count(&self, resource_type: &str) -> usize {
        self.counts.get(resource_type).copied().unwrap_or(0)
    }

    /// Create, or, with `if_none_exist`, return the existing match.
    pub fn create(
        &mut self,
        resource_type: &str,
        mut resource: Value,
        if_none_exist: Option<&str>,
    ) -> WriteOutcome {
        if let Some(token) = if_none_exist
            && let Some(id) = self.find_by_identifier(resource_type, token)
        {
            let id = id.to_owned();
            let version = self.read(resource_type, &id).map_or(1, |s| s.version);
            return WriteOutcome::Exists { id, version };
        }
        self.next_id += 1;
        let id = self.next_id.to_string();
        resource["id"] = Value::String(id.clone());
        self.put_version(resource_type, &id, resource, 1);
        WriteOutcome::Created { id, version: 1 }
    }

    /// Conditional update: update the resource carrying `token` (`system|value`), or create it.
    pub fn conditional_update(
        &mut self,
        resource_type: &str,
        token: &str,
        resource: Value,
    ) -> WriteOutcome {
        match self
            .find_by_identifier(resource_type, token)
            .map(str::to_owned)
        {
            Some(id) => self.update(resource_type, &id, resource),
            None => self.create(resource_type, resource, None),
        }
    }

    /// Update or create with a client-assigned id.
    pub fn update(&mut self, resource_type: &str, id: &str, mut resource: Value) -> WriteOutcome {
        resource["id"] = Value::String(id.to_owned());
        match self.read(resource_type, id).map(|s| s.version) {
            Some(version) => {
                self.put_version(resource_type, id, resource, version + 1);
                WriteOutcome::Updated {
                    id: id.to_owned(),
                    version: version + 1,
                }
            }
            None => {
                self.put_version(resource_type, id, resource, 1);
                WriteOutcome::Created {
                    id: id.to_owned(),
                    version: 1,
                }
            }
        }
    }

    fn put_version(&mut self, resource_type: &str, id: &str, mut resource: Value, version: u64) {
        resource["meta"]["versionId"] = Value::String(version.to_string());
        for token in search_tokens(&resource) {
            self.identifiers
                .insert((resource_type.to_owned(), token), id.to_owned());
        }
        if self.forget_bodies {
            resource = Value::Null;
        }
        let key = (resource_type.to_owned(), id.to_owned());
        // The current version lives in `resources`; `versions` keeps only the older ones, so
        // no write copies a resource.
        let sequence = match self.resources.remove(&key) {
            Some(existing) => {
                self.versions
                    .entry(key.clone())
                    .or_default()
                    .push(existing.resource);
                existing.sequence
            }
            None => {
                *self.counts.entry(resource_type.to_owned()).or_default() += 1;
                self.next_sequence += 1;
                self.next_sequence
            }
        };
        self.resources.insert(
            key,
            Stored {
                version,
                resource,
                sequence,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditional_create_returns_the_existing_resource() {
        let mut store = Store::default();
        let obs =
            json!({"resourceType": "Observation", "identifier": [{"system": "s", "value": "v"}]});
        let first = store.create("Observation", obs.clone(), Some("s|v"));
        assert!(matches!(first, WriteOutcome::Created { .. }));
        let second = store.create("Observation", obs, Some("s|v"));
        assert!(matches!(second, WriteOutcome::Exists { .. }));
        assert_eq!(store.count("Observation"), 1);
    }

    #[test]
    fn put_creates_then_versions() {
        let mut store = Store::default();
        let obs = json!({"resourceType": "Observation"});
        assert_eq!(
            store.update("Observation", "a1", obs.clone()),
            WriteOutcome::Created {
                id: "a1".into(),
                version: 1
            }
        );
        assert_eq!(
            store.update("Observation", "a1", obs),
            WriteOutcome::Updated {
                id: "a1".into(),
                version: 2
            }
        );
        assert_eq!(
            store.read("Observation", "a1").unwrap().resource["meta"]["versionId"],
            "2"
        );
        let versions: Vec<_> = store
            .history("Observation", "a1")
            .iter()
            .map(|v| v["meta"]["versionId"].clone())
            .collect();
        assert_eq!(versions, ["1", "2"]);
    }
}
