use std::collections::HashMap;

use crate::device_metric::MetricCategory;
use crate::table::TableError;

/// The codes of our CodeSystem with their displays: mapping tables must only use these, and the
/// display written into each Coding comes from here so that it always matches the CodeSystem.
#[derive(Debug, Clone)]
pub struct CodeSystemCodes {
    displays: HashMap<String, String>,
    /// A circuit parameter's `metric-category` property, where the code fixes it.
    categories: HashMap<String, MetricCategory>,
    /// A circuit parameter's `module` property: the part of the device it belongs to.
    modules: HashMap<String, String>,
}

impl CodeSystemCodes {
    /// The CodeSystem shipped in profiles/fhir, parsed once per process: every load of the
    /// tables (start, each reload) takes it.
    pub fn embedded() -> Self {
        static EMBEDDED: std::sync::OnceLock<CodeSystemCodes> = std::sync::OnceLock::new();
        EMBEDDED
            .get_or_init(|| {
                Self::parse(
                    "profiles/fhir/CodeSystem-ecmo.json",
                    include_str!("../../profiles/fhir/CodeSystem-ecmo.json"),
                )
                .expect("the embedded CodeSystem is checked by the tests")
            })
            .clone()
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, TableError> {
        let err = |reason: String| TableError::new(file, "CodeSystem", reason);
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        if value["resourceType"] != "CodeSystem" || value["url"] != crate::ECMO_CODE_SYSTEM {
            return Err(err(format!(
                "expected a CodeSystem with url {}",
                crate::ECMO_CODE_SYSTEM
            )));
        }
        let mut codes = Self {
            displays: HashMap::new(),
            categories: HashMap::new(),
            modules: HashMap::new(),
        };
        codes.collect(&value["concept"]).map_err(err)?;
        Ok(codes)
    }

    fn collect(&mut self, concepts: &serde_json::Value) -> Result<(), String> {
        for concept in concepts.as_array().into_iter().flatten() {
            let Some(code) = concept["code"].as_str() else {
                continue;
            };
            if let Some(display) = concept["display"].as_str() {
                self.displays.insert(code.to_owned(), display.to_owned());
            }
            let property = |name: &str| {
                concept["property"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["code"] == name)
                    .map(|p| p["valueCode"].as_str().unwrap_or_default())
            };
            if let Some(module) = property("module") {
                self.modules.insert(code.to_owned(), module.to_owned());
            }
            let category = property("metric-category");
            if let Some(category) = category {
                let category = MetricCategory::from_code(category).ok_or_else(|| {
                    format!("{code}: metric-category '{category}' is not measurement, setting or calculation")
                })?;
                self.categories.insert(code.to_owned(), category);
            }
            self.collect(&concept["concept"])?;
        }
        Ok(())
    }

    pub fn display(&self, code: &str) -> Option<&str> {
        self.displays.get(code).map(String::as_str)
    }

    /// The module (a `device-module` code) and its display that parameter `code` belongs to.
    pub fn module(&self, code: &str) -> Option<(&str, &str)> {
        let module = self.modules.get(code)?;
        Some((module.as_str(), self.display(module)?))
    }

    /// The DeviceMetric category `code` fixes (a setting code is always a setting), or `None`
    /// where it depends on the device.
    pub fn category(&self, code: &str) -> Option<MetricCategory> {
        self.categories.get(code).copied()
    }
}
