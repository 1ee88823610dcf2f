use std::collections::HashMap;

use crate::table::TableError;

/// The codes of our CodeSystem with their displays: mapping tables must only use these, and the
/// display written into each Coding comes from here so that it always matches the CodeSystem.
#[derive(Debug, Clone)]
pub struct CodeSystemCodes {
    displays: HashMap<String, String>,
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
        let mut displays = HashMap::new();
        collect(&value["concept"], &mut displays);
        Ok(Self { displays })
    }

    pub fn display(&self, code: &str) -> Option<&str> {
        self.displays.get(code).map(String::as_str)
    }
}

fn collect(concepts: &serde_json::Value, out: &mut HashMap<String, String>) {
    for concept in concepts.as_array().into_iter().flatten() {
        if let (Some(code), Some(display)) = (concept["code"].as_str(), concept["display"].as_str())
        {
            out.insert(code.to_owned(), display.to_owned());
        }
        collect(&concept["concept"], out);
    }
}
