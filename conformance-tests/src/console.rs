//! A simulated ECMO console: the readings a Getinge CARDIOHELP-i on an adult VV run sends
//! about once a second, with realistic values and noise, as the ingest API's JSON.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The patient identifier system the simulator uses.
pub const SIM_MRN_SYSTEM: &str = "urn:oid:1.2.36.146.595.217.0.1";

pub struct SimulatedCardiohelp {
    pub serial: String,
    pub model: String,
    pub patient: Option<(String, String)>,
    rng: fastrand::Rng,
}

/// Rounded to `decimals`, as the console displays it.
fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

impl SimulatedCardiohelp {
    /// A console whose batches name a patient (`MRN-SIM-<serial>`), as a bedside integration
    /// that knows the patient would; see [`Self::without_patient`] for consoles in a run.
    pub fn new(serial: &str, seed: u64) -> Self {
        Self {
            serial: serial.to_owned(),
            model: "CARDIOHELP-i".to_owned(),
            patient: Some((SIM_MRN_SYSTEM.to_owned(), format!("MRN-SIM-{serial}"))),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Batches that name no patient: the gateway finds it from the console's ECMO run.
    pub fn without_patient(mut self) -> Self {
        self.patient = None;
        self
    }

    pub fn with_patient(mut self, system: &str, value: &str) -> Self {
        self.patient = Some((system.to_owned(), value.to_owned()));
        self
    }

    fn noise(&mut self, centre: f64, spread: f64) -> f64 {
        centre + (self.rng.f64() * 2.0 - 1.0) * spread
    }

    /// One cycle of readings timed `at` (whole milliseconds, UTC).
    pub fn cycle(&mut self, at: OffsetDateTime) -> Vec<Value> {
        let time = at
            .replace_nanosecond(at.millisecond() as u32 * 1_000_000)
            .unwrap_or(at)
            .format(&Rfc3339)
            .unwrap_or_default();
        let p_int = round(self.noise(252.0, 4.0), 0);
        let p_art = round(self.noise(221.0, 4.0), 0);
        let mut readings = vec![
            (
                "Flow",
                json!(round(self.noise(4.2, 0.08), 2)),
                Some("L/min"),
            ),
            (
                "RPM",
                json!(round(self.noise(3520.0, 15.0), 0)),
                Some("rpm"),
            ),
            (
                "PVen",
                json!(round(self.noise(-62.0, 4.0), 0)),
                Some("mmHg"),
            ),
            ("PInt", json!(p_int), Some("mmHg")),
            ("PArt", json!(p_art), Some("mmHg")),
            ("DeltaP", json!(p_int - p_art), Some("mmHg")),
            ("SvO2", json!(round(self.noise(71.5, 1.0), 1)), Some("%")),
            ("Hb", json!(round(self.noise(10.4, 0.1), 1)), Some("g/dL")),
            ("Hct", json!(round(self.noise(31.2, 0.3), 1)), Some("%")),
            ("TVen", json!(round(self.noise(36.7, 0.1), 1)), Some("Cel")),
            ("TArt", json!(round(self.noise(36.9, 0.1), 1)), Some("Cel")),
            ("Bubble", json!(false), None),
        ]
        .into_iter()
        .map(|(parameter, value, unit)| {
            let mut reading = json!({"parameter": parameter, "value": value, "time": time});
            if let Some(unit) = unit {
                reading["unit"] = json!(unit);
            }
            reading
        })
        .collect::<Vec<_>>();
        // Now and then the venous probe drops out: the console writes its invalid marker.
        if self.rng.u8(..) < 16 {
            readings[6]["value"] = json!(-32000);
        }
        readings
    }

    /// The batch of one cycle timed `at`.
    pub fn next_batch(&mut self, at: OffsetDateTime) -> Value {
        let readings = self.cycle(at);
        self.batch(readings)
    }

    /// A batch body for `readings`.
    pub fn batch(&self, readings: Vec<Value>) -> Value {
        let mut batch = json!({
            "device": {"serial": self.serial, "model": self.model},
            "readings": readings,
        });
        if let Some((system, value)) = &self.patient {
            batch["patient"] = json!({"system": system, "value": value});
        }
        batch
    }
}
