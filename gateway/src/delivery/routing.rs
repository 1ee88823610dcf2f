//! Which destinations a resource goes to: each destination may be limited to some vendors,
//! device models and resource types (`[destination.only]`); without limits it takes everything.

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFilter {
    #[serde(default)]
    pub vendors: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub resource_types: Vec<String>,
}

impl RouteFilter {
    pub fn accepts(&self, vendor: &str, model: &str, resource_type: &str) -> bool {
        let any_or = |list: &[String], value: &str| {
            list.is_empty() || list.iter().any(|v| v.eq_ignore_ascii_case(value))
        };
        any_or(&self.vendors, vendor)
            && any_or(&self.models, model)
            && any_or(&self.resource_types, resource_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_filter_takes_everything_and_lists_restrict() {
        assert!(RouteFilter::default().accepts("getinge", "CARDIOHELP-i", "Observation"));
        let only = RouteFilter {
            vendors: vec!["spectrum".into()],
            models: vec![],
            resource_types: vec!["Observation".into()],
        };
        assert!(only.accepts("spectrum", "M4", "Observation"));
        assert!(!only.accepts("getinge", "M4", "Observation"));
        assert!(!only.accepts("spectrum", "M4", "Procedure"));
    }
}
