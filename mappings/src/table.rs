use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::codesystem::CodeSystemCodes;

/// A mapping file that cannot be used: the gateway refuses to start and says where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {entry}: {reason}")]
pub struct TableError {
    pub file: String,
    pub entry: String,
    pub reason: String,
}

impl TableError {
    pub(crate) fn new(file: &str, entry: &str, reason: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The tables shipped with the gateway, used when the configuration names no directory.
const EMBEDDED: &[(&str, &str)] = &[
    ("units.toml", include_str!("../tables/units.toml")),
    (
        "abbott-centrimag.toml",
        include_str!("../tables/abbott-centrimag.toml"),
    ),
    ("bd-alaris.toml", include_str!("../tables/bd-alaris.toml")),
    (
        "getinge-cardiohelp.toml",
        include_str!("../tables/getinge-cardiohelp.toml"),
    ),
    (
        "livanova-lifesparc.toml",
        include_str!("../tables/livanova-lifesparc.toml"),
    ),
    (
        "siemens-bcs-xp.toml",
        include_str!("../tables/siemens-bcs-xp.toml"),
    ),
    (
        "spectrum-m4.toml",
        include_str!("../tables/spectrum-m4.toml"),
    ),
    (
        "spectrum-quantum-ventilation.toml",
        include_str!("../tables/spectrum-quantum-ventilation.toml"),
    ),
    ("terumo-cdi.toml", include_str!("../tables/terumo-cdi.toml")),
    (
        "werfen-hemochron.toml",
        include_str!("../tables/werfen-hemochron.toml"),
    ),
];

// === file formats ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitsFile {
    unit: Vec<UnitEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnitEntry {
    ucum: String,
    display: String,
    accept: Vec<AcceptEntry>,
    /// The IEEE 11073-10101 unit code (MDC_DIM_*) HL7 v2 senders write in OBX-6.
    #[serde(default)]
    mdc: Option<MdcUnitEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MdcUnitEntry {
    code: String,
    refid: String,
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcceptEntry {
    unit: String,
    #[serde(default = "one")]
    factor: f64,
    #[serde(default)]
    offset: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyFile {
    family: FamilyEntry,
    parameter: Vec<ParameterEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyEntry {
    id: String,
    manufacturer: String,
    display: String,
    models: Vec<String>,
    #[serde(default)]
    invalid_markers: Vec<f64>,
    /// Our device-type code for the family's devices.
    #[serde(default = "console_type")]
    device_type: String,
}

fn console_type() -> String {
    "ecmo-console".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParameterEntry {
    vendor: String,
    #[serde(default)]
    aliases: Vec<String>,
    code: String,
    #[serde(default)]
    kind: Option<String>,
    /// `measurement`, `setting` or `calculation`, where the code leaves it to the device.
    #[serde(default)]
    category: Option<String>,
    unit: Option<String>,
    decimals: Option<u8>,
    range: Option<[f64; 2]>,
    #[serde(default)]
    codings: Vec<CodingEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodingEntry {
    system: String,
    code: String,
    display: String,
    source: String,
}

// === loaded model ===

/// How a vendor's unit spelling becomes the UCUM unit: `value * factor + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRule {
    pub ucum: String,
    pub display: String,
    pub factor: f64,
    pub offset: f64,
}

impl UnitRule {
    pub fn is_identity(&self) -> bool {
        self.factor == 1.0 && self.offset == 0.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParameterKind {
    Quantity {
        ucum: String,
        display: String,
        decimals: u8,
        low: f64,
        high: f64,
        /// Vendor unit spelling -> conversion into `ucum`.
        accepts: HashMap<String, UnitRule>,
    },
    Boolean,
}

/// One vendor parameter and everything needed to write it as an Observation.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub vendor: String,
    pub code: String,
    /// Display of `code`, taken from the CodeSystem so the two can never disagree.
    pub display: String,
    pub kind: ParameterKind,
    /// Whether the device measures, sets or calculates the value (its DeviceMetric's category).
    pub category: crate::device_metric::MetricCategory,
    /// The part of the device (PoCD VMD) the value comes from, code and display, from the
    /// CodeSystem's `module` property: its DeviceMetric hangs under that part's channel. Every
    /// circuit parameter has one; a code without one (not a circuit parameter) is refused by
    /// the load-time profile proof, which names what it breaks.
    pub module: Option<(String, String)>,
    /// Standard codings (SNOMED CT, LOINC, MDC) whose meaning matches: (system, code, display).
    pub codings: Vec<(String, String, String)>,
    /// The Observation's `code` built from the above, rendered once at load.
    pub code_json: crate::observation_json::PreRendered,
}

/// A device family (one mapping file): a manufacturer's console or monitor line.
#[derive(Debug, Clone)]
pub struct DeviceFamily {
    pub id: String,
    pub manufacturer: String,
    pub display: String,
    pub models: Vec<String>,
    pub invalid_markers: Vec<f64>,
    /// Our device-type code (`ecmo-console` unless the table says otherwise) and its display.
    pub device_type: (String, String),
    /// Identifier system of this manufacturer's serial numbers.
    pub serial_system: String,
    /// Identifier system of its devices' DeviceMetrics (`serial:code`).
    pub metric_system: String,
    /// Identifier system of its devices' modules and channels (`serial:module`, `.../1`).
    pub component_system: String,
    /// What exactly maps this family: `sha256:` and the first 12 hex digits of the family file
    /// and the unit table it converts with. Named in every Provenance, so an EHR can tell which
    /// table made a resource after a site changed one.
    pub version: String,
    parameters: Vec<Parameter>,
    by_name: HashMap<String, usize>,
}

impl DeviceFamily {
    pub fn parameter(&self, vendor_name: &str) -> Option<&Parameter> {
        self.by_name.get(vendor_name).map(|&i| &self.parameters[i])
    }

    pub fn parameters(&self) -> &[Parameter] {
        &self.parameters
    }

    /// Names a vendor may send, for error messages.
    pub fn parameter_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// All device families, indexed by model. Built once at start-up and shared read-only.
#[derive(Debug, Clone)]
pub struct Mappings {
    families: Vec<DeviceFamily>,
    by_model: HashMap<String, usize>,
    codes: CodeSystemCodes,
    /// MDC unit code (CODE10) -> UCUM code, from the unit table.
    mdc_units: HashMap<String, String>,
}

impl Mappings {
    /// The tables shipped in mappings/tables.
    pub fn embedded() -> Result<Self, TableError> {
        Self::from_sources(
            EMBEDDED
                .iter()
                .map(|(name, text)| (format!("mappings/tables/{name}"), (*text).to_owned())),
            CodeSystemCodes::embedded(),
        )
    }

    /// A directory of tables: `units.toml` plus one `*.toml` per device family.
    pub fn load_dir(dir: &Path) -> Result<Self, TableError> {
        let shown = dir.display().to_string();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| TableError::new(&shown, "directory", e.to_string()))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| TableError::new(&shown, "directory", e.to_string()))?
                .path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| TableError::new(&name, "file", e.to_string()))?;
                files.push((name, text));
            }
        }
        files.sort();
        Self::from_files(files)
    }

    /// Tables from (file name, text) pairs, as [`Mappings::load_dir`] reads them: the one
    /// whose name ends in `units.toml` is the unit table, the others device families.
    pub fn from_files(files: Vec<(String, String)>) -> Result<Self, TableError> {
        Self::from_sources(files, CodeSystemCodes::embedded())
    }

    fn from_sources(
        files: impl IntoIterator<Item = (String, String)>,
        codes: CodeSystemCodes,
    ) -> Result<Self, TableError> {
        let files: Vec<(String, String)> = files.into_iter().collect();
        let (units_file, units_text) = files
            .iter()
            .find(|(name, _)| name.ends_with("units.toml"))
            .ok_or_else(|| {
                TableError::new(
                    "units.toml",
                    "file",
                    "missing: every table needs the unit table",
                )
            })?;
        let (units, mdc_units) = load_units(units_file, units_text)?;

        let mut families = Vec::new();
        let mut by_model: HashMap<String, usize> = HashMap::new();
        let mut family_ids: HashMap<String, String> = HashMap::new();
        for (name, text) in files.iter().filter(|(n, _)| !n.ends_with("units.toml")) {
            let mut family = load_family(name, text, &units, &codes)?;
            family.version = table_version(text, units_text);
            if let Some(other) = family_ids.insert(family.id.clone(), name.clone()) {
                return Err(TableError::new(
                    name,
                    &format!("family '{}'", family.id),
                    format!("id already used by {other}"),
                ));
            }
            for model in &family.models {
                if by_model
                    .insert(model.to_ascii_lowercase(), families.len())
                    .is_some()
                {
                    return Err(TableError::new(
                        name,
                        &format!("model '{model}'"),
                        "model is already mapped by another family",
                    ));
                }
            }
            families.push(family);
        }
        if families.is_empty() {
            return Err(TableError::new(
                "mappings",
                "directory",
                "no device family tables",
            ));
        }
        Ok(Self {
            families,
            by_model,
            codes,
            mdc_units,
        })
    }

    /// The family of a device model (case-insensitive, as consoles differ in case).
    pub fn family_for_model(&self, model: &str) -> Option<&DeviceFamily> {
        self.by_model
            .get(&model.to_ascii_lowercase())
            .map(|&i| &self.families[i])
    }

    pub fn families(&self) -> &[DeviceFamily] {
        &self.families
    }

    pub fn models(&self) -> Vec<&str> {
        let mut models: Vec<&str> = self
            .families
            .iter()
            .flat_map(|f| f.models.iter().map(String::as_str))
            .collect();
        models.sort_unstable();
        models
    }

    pub fn codes(&self) -> &CodeSystemCodes {
        &self.codes
    }

    /// The UCUM unit of an MDC unit code (`MDC_DIM_*` as CODE10), as HL7 v2 OBX-6 carries it.
    pub fn ucum_for_mdc_unit(&self, code: &str) -> Option<&str> {
        self.mdc_units.get(code).map(String::as_str)
    }
}

type UnitTable = HashMap<String, (String, String, HashMap<String, UnitRule>)>;

fn load_units(file: &str, text: &str) -> Result<(UnitTable, HashMap<String, String>), TableError> {
    let parsed: UnitsFile =
        toml::from_str(text).map_err(|e| TableError::new(file, "file", e.to_string()))?;
    let mut table = UnitTable::new();
    let mut mdc_units = HashMap::new();
    for unit in parsed.unit {
        let entry = format!("unit '{}'", unit.ucum);
        if let Some(mdc) = &unit.mdc {
            if mdc.source.trim().is_empty() {
                return Err(TableError::new(file, &entry, "its MDC code needs a source"));
            }
            if mdc.code.is_empty() || !mdc.code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TableError::new(
                    file,
                    &entry,
                    format!(
                        "MDC code '{}' ({}) must be a decimal CODE10",
                        mdc.code, mdc.refid
                    ),
                ));
            }
            if mdc_units
                .insert(mdc.code.clone(), unit.ucum.clone())
                .is_some()
            {
                return Err(TableError::new(
                    file,
                    &entry,
                    format!("MDC code '{}' is given to two units", mdc.code),
                ));
            }
        }
        let ucum = unit.ucum.clone();
        let display = unit.display;
        let mut accepts = HashMap::new();
        for accept in unit.accept {
            if !accept.factor.is_finite() || accept.factor == 0.0 || !accept.offset.is_finite() {
                return Err(TableError::new(
                    file,
                    &entry,
                    format!(
                        "accepted unit '{}' needs a finite, non-zero factor",
                        accept.unit
                    ),
                ));
            }
            let rule = UnitRule {
                ucum: ucum.clone(),
                display: display.clone(),
                factor: accept.factor,
                offset: accept.offset,
            };
            if accepts.insert(accept.unit.clone(), rule).is_some() {
                return Err(TableError::new(
                    file,
                    &entry,
                    format!("accepted unit '{}' is listed twice", accept.unit),
                ));
            }
        }
        if !accepts.get(&ucum).is_some_and(UnitRule::is_identity) {
            return Err(TableError::new(
                file,
                &entry,
                "must accept its own UCUM code with no conversion",
            ));
        }
        if table.insert(unit.ucum, (ucum, display, accepts)).is_some() {
            return Err(TableError::new(file, &entry, "unit is defined twice"));
        }
    }
    Ok((table, mdc_units))
}

const KNOWN_SYSTEMS: &[&str] = &[
    "http://snomed.info/sct",
    "http://loinc.org",
    "urn:iso:std:iso:11073:10101",
];

fn load_family(
    file: &str,
    text: &str,
    units: &UnitTable,
    codes: &CodeSystemCodes,
) -> Result<DeviceFamily, TableError> {
    let parsed: FamilyFile =
        toml::from_str(text).map_err(|e| TableError::new(file, "file", e.to_string()))?;
    let f = parsed.family;
    let slug_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !slug_ok(&f.id) {
        return Err(TableError::new(
            file,
            "family",
            format!("id '{}' must be lower-case letters, digits and '-'", f.id),
        ));
    }
    if f.models.is_empty() {
        return Err(TableError::new(file, "family", "lists no models"));
    }
    let manufacturer_slug: String = f
        .manufacturer
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();

    let device_type = match codes.display(&f.device_type) {
        Some(display) => (f.device_type.clone(), display.to_owned()),
        None => {
            return Err(TableError::new(
                file,
                "family",
                format!(
                    "device_type '{}' is not in CodeSystem {}",
                    f.device_type,
                    crate::ECMO_CODE_SYSTEM
                ),
            ));
        }
    };
    let mut parameters = Vec::with_capacity(parsed.parameter.len());
    let mut by_name = HashMap::new();
    for p in parsed.parameter {
        let entry = format!("parameter '{}'", p.vendor);
        let err = |reason: String| TableError::new(file, &entry, reason);
        let display = codes
            .display(&p.code)
            .ok_or_else(|| {
                err(format!(
                    "code '{}' is not in CodeSystem {}",
                    p.code,
                    crate::ECMO_CODE_SYSTEM
                ))
            })?
            .to_owned();
        let category = parameter_category(codes, &p.code, p.category.as_deref()).map_err(err)?;
        let module = codes
            .module(&p.code)
            .map(|(code, display)| (code.to_owned(), display.to_owned()));
        let kind = match p.kind.as_deref() {
            None | Some("quantity") => {
                let unit = p
                    .unit
                    .as_deref()
                    .ok_or_else(|| err("needs a unit".into()))?;
                let (ucum, unit_display, accepts) = units
                    .get(unit)
                    .ok_or_else(|| err(format!("unit '{unit}' is not defined in units.toml")))?;
                let decimals = p.decimals.ok_or_else(|| err("needs decimals".into()))?;
                if decimals > 6 {
                    return Err(err("decimals must be 0 to 6".into()));
                }
                let [low, high] = p
                    .range
                    .ok_or_else(|| err("needs a plausible range".into()))?;
                if !(low.is_finite() && high.is_finite() && low < high) {
                    return Err(err(format!(
                        "range [{low}, {high}] must be finite with low < high"
                    )));
                }
                ParameterKind::Quantity {
                    ucum: ucum.clone(),
                    display: unit_display.clone(),
                    decimals,
                    low,
                    high,
                    accepts: accepts.clone(),
                }
            }
            Some("boolean") => {
                if p.unit.is_some() || p.range.is_some() || p.decimals.is_some() {
                    return Err(err(
                        "a boolean parameter takes no unit, decimals or range".into()
                    ));
                }
                ParameterKind::Boolean
            }
            Some(other) => return Err(err(format!("kind '{other}' is not quantity or boolean"))),
        };
        let mut codings = Vec::with_capacity(p.codings.len());
        for c in p.codings {
            if !KNOWN_SYSTEMS.contains(&c.system.as_str()) {
                return Err(err(format!(
                    "coding system '{}' is not SNOMED CT, LOINC or IEEE 11073 MDC",
                    c.system
                )));
            }
            if c.code.is_empty() || c.source.trim().is_empty() {
                return Err(err(format!(
                    "coding '{}' needs a code and a source",
                    c.code
                )));
            }
            if c.system == "urn:iso:std:iso:11073:10101" && c.code.parse::<u32>().is_err() {
                return Err(err(format!(
                    "MDC code '{}' must be a CODE10 number",
                    c.code
                )));
            }
            codings.push((c.system, c.code, c.display));
        }
        for name in std::iter::once(&p.vendor).chain(&p.aliases) {
            if by_name.insert(name.clone(), parameters.len()).is_some() {
                return Err(err(format!("name '{name}' is used twice in this family")));
            }
        }
        parameters.push(Parameter {
            code_json: crate::observation_json::parameter_code(&p.code, &display, &codings),
            vendor: p.vendor,
            code: p.code,
            display,
            kind,
            category,
            module,
            codings,
        });
    }
    Ok(DeviceFamily {
        serial_system: format!(
            "{}{}",
            crate::DEVICE_SERIAL_SYSTEM_PREFIX,
            manufacturer_slug
        ),
        metric_system: format!(
            "{}{}",
            crate::DEVICE_METRIC_SYSTEM_PREFIX,
            manufacturer_slug
        ),
        component_system: format!(
            "{}{}",
            crate::DEVICE_COMPONENT_SYSTEM_PREFIX,
            manufacturer_slug
        ),
        version: String::new(),
        id: f.id,
        manufacturer: f.manufacturer,
        display: f.display,
        models: f.models,
        invalid_markers: f.invalid_markers,
        device_type,
        parameters,
        by_name,
    })
}

/// The category the CodeSystem fixes for `code`, else the table's, else `measurement`. A table
/// cannot make a setting code a measurement: the two would chart as the same thing.
fn parameter_category(
    codes: &CodeSystemCodes,
    code: &str,
    given: Option<&str>,
) -> Result<crate::device_metric::MetricCategory, String> {
    use crate::device_metric::MetricCategory;
    let given = given
        .map(|g| {
            MetricCategory::from_code(g)
                .ok_or_else(|| format!("category '{g}' is not measurement, setting or calculation"))
        })
        .transpose()?;
    match (codes.category(code), given) {
        (Some(fixed), Some(given)) if fixed != given => Err(format!(
            "category '{}' contradicts code '{code}', which is always a {}",
            given.code(),
            fixed.code()
        )),
        (Some(fixed), _) => Ok(fixed),
        (None, given) => Ok(given.unwrap_or(MetricCategory::Measurement)),
    }
}

/// `sha256:` + 12 hex digits of the family file and the unit table together.
fn table_version(family_text: &str, units_text: &str) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(family_text.as_bytes());
    hasher.update([0]);
    hasher.update(units_text.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_family(family_toml: &str) -> Result<Mappings, TableError> {
        Mappings::from_sources(
            [
                ("units.toml".to_owned(), EMBEDDED[0].1.to_owned()),
                ("x.toml".to_owned(), family_toml.to_owned()),
            ],
            CodeSystemCodes::embedded(),
        )
    }

    const HEADER: &str =
        "[family]\nid = \"x\"\nmanufacturer = \"X\"\ndisplay = \"X\"\nmodels = [\"X1\"]\n";

    #[test]
    fn embedded_tables_load() {
        let m = Mappings::embedded().unwrap();
        let ch = m.family_for_model("cardiohelp-i").unwrap();
        assert_eq!(ch.id, "getinge-cardiohelp");
        assert_eq!(ch.invalid_markers, vec![-32000.0]);
        assert_eq!(ch.parameter("Speed").unwrap().code, "pump-speed");
        assert!(m.family_for_model("M4").is_some());
        assert!(m.family_for_model("unknown").is_none());
    }

    #[test]
    fn unknown_code_names_file_entry_and_reason() {
        let e = with_family(&format!(
            "{HEADER}[[parameter]]\nvendor = \"Flow\"\ncode = \"no-such-code\"\nunit = \"L/min\"\ndecimals = 2\nrange = [0.0, 1.0]\n"
        ))
        .unwrap_err();
        assert_eq!(e.file, "x.toml");
        assert_eq!(e.entry, "parameter 'Flow'");
        assert!(e.reason.contains("no-such-code"), "{e}");
    }

    #[test]
    fn rejects_bad_tables() {
        let cases = [
            (
                "unit = \"furlong\"\ndecimals = 2\nrange = [0.0, 1.0]",
                "not defined in units.toml",
            ),
            (
                "unit = \"L/min\"\ndecimals = 2\nrange = [2.0, 1.0]",
                "low < high",
            ),
            ("unit = \"L/min\"\ndecimals = 2", "plausible range"),
            ("kind = \"boolean\"\nunit = \"L/min\"", "takes no unit"),
            (
                "unit = \"L/min\"\ndecimals = 2\nrange = [0.0, 1.0]\ncodings = [{ system = \"http://x\", code = \"1\", display = \"d\", source = \"s\" }]",
                "coding system",
            ),
            (
                "unit = \"L/min\"\ndecimals = 2\nrange = [0.0, 1.0]\ncolour = \"red\"",
                "unknown field",
            ),
        ];
        for (body, reason) in cases {
            let e = with_family(&format!(
                "{HEADER}[[parameter]]\nvendor = \"Flow\"\ncode = \"pump-blood-flow\"\n{body}\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains(reason), "{body}: {e}");
        }
    }

    #[test]
    fn a_parameter_is_a_measurement_a_setting_or_a_calculation_as_its_code_says() {
        use crate::device_metric::MetricCategory;
        let m = Mappings::embedded().unwrap();
        let ch = m.family_for_model("CARDIOHELP-i").unwrap();
        assert_eq!(
            ch.parameter("RequestedRPM").unwrap().category,
            MetricCategory::Setting
        );
        assert_eq!(
            ch.parameter("RPM").unwrap().category,
            MetricCategory::Measurement
        );
        assert_eq!(
            ch.parameter("DeltaP").unwrap().category,
            MetricCategory::Calculation
        );
        // Sweep gas: the code leaves it to the device, the table says it; by default measured.
        let sweep = |category: &str| {
            with_family(&format!(
                "{HEADER}[[parameter]]\nvendor = \"Sweep\"\ncode = \"sweep-gas-flow\"\n{category}unit = \"L/min\"\ndecimals = 2\nrange = [0.0, 15.0]\n"
            ))
            .map(|m| m.family_for_model("X1").unwrap().parameter("Sweep").unwrap().category)
        };
        assert_eq!(sweep(""), Ok(MetricCategory::Measurement));
        assert_eq!(
            sweep("category = \"setting\"\n"),
            Ok(MetricCategory::Setting)
        );
        let refused = |code: &str, category: &str| {
            with_family(&format!(
                "{HEADER}[[parameter]]\nvendor = \"P\"\ncode = \"{code}\"\ncategory = \"{category}\"\nunit = \"/min\"\ndecimals = 0\nrange = [0.0, 5000.0]\n"
            ))
            .unwrap_err()
            .reason
        };
        assert!(
            refused("pump-speed-setting", "measurement").contains("always a setting"),
            "{}",
            refused("pump-speed-setting", "measurement")
        );
        assert!(
            refused("pump-speed", "guess").contains("is not measurement, setting or calculation")
        );
    }

    #[test]
    fn rejects_duplicate_names() {
        let p = "[[parameter]]\nvendor = \"Flow\"\ncode = \"pump-blood-flow\"\nunit = \"L/min\"\ndecimals = 2\nrange = [0.0, 1.0]\n";
        let e = with_family(&format!("{HEADER}{p}{p}")).unwrap_err();
        assert!(e.reason.contains("used twice"), "{e}");
    }
}
