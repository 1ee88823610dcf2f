//! Charting intervals: a flowsheet takes one value per parameter per interval (every minute,
//! quarter hour or hour), not every reading a console sends each second. An interval of one
//! parameter of one device is a *slot*, written as its own Observation: the reading it charts
//! with the slot's identifier, so an EHR sees a real measurement at its own time, and a later
//! reading of the same interval replaces it (the destination keeps the latest by device time).

use std::time::Duration;

use time::{Date, Month, PrimitiveDateTime, Time};

use crate::{OBSERVATION_IDENTIFIER_SYSTEM, logical_id};

/// Where one reading falls at a destination that charts per `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartSlot {
    /// The slot's Observation identifier value: the reading's device and parameter, then the
    /// interval as ISO 8601 start and duration, `cardiohelp:CH-1:blood-flow:20260601T120000Z/PT15M`.
    pub identifier_value: String,
    /// [`logical_id`] of that identifier.
    pub logical_id: String,
    /// The reading's device time, milliseconds since the epoch: of two readings of a slot the
    /// later one is charted.
    pub reading_ms: i64,
    /// When the interval starts, milliseconds since the epoch.
    pub start_ms: i64,
    /// When the interval ends, milliseconds since the epoch.
    pub end_ms: i64,
}

/// An interval a destination can chart by: whole minutes that divide a day, so every slot
/// starts at the same UTC clock times each day.
pub fn valid_chart_interval(interval: Duration) -> bool {
    let seconds = interval.as_secs();
    interval.subsec_nanos() == 0
        && seconds >= 60
        && seconds.is_multiple_of(60)
        && 86_400_u64.is_multiple_of(seconds)
}

/// The slot of the reading whose Observation identifier value is `reading_identifier` (see
/// [`crate::observation_identifier`]); `None` for an identifier of another shape (a slot's
/// own, or a FHIR-native Observation's), which is sent as it is.
pub fn chart_slot(reading_identifier: &str, interval: Duration) -> Option<ChartSlot> {
    if !valid_chart_interval(interval) {
        return None;
    }
    let (series, compact) = reading_identifier.rsplit_once(':')?;
    if series.matches(':').count() != 2 {
        return None;
    }
    let reading_ms = compact_utc_ms(compact)?;
    let interval_ms = i64::try_from(interval.as_millis()).ok()?;
    let start_ms = reading_ms.div_euclid(interval_ms) * interval_ms;
    let start = time::OffsetDateTime::from_unix_timestamp(start_ms / 1000).ok()?;
    let minutes = interval.as_secs() / 60;
    let duration = if minutes.is_multiple_of(60) {
        format!("PT{}H", minutes / 60)
    } else {
        format!("PT{minutes}M")
    };
    let identifier_value = format!(
        "{series}:{:04}{:02}{:02}T{:02}{:02}{:02}Z/{duration}",
        start.year(),
        u8::from(start.month()),
        start.day(),
        start.hour(),
        start.minute(),
        start.second()
    );
    Some(ChartSlot {
        logical_id: logical_id(OBSERVATION_IDENTIFIER_SYSTEM, &identifier_value),
        identifier_value,
        reading_ms,
        start_ms,
        end_ms: start_ms + interval_ms,
    })
}

/// Milliseconds since the epoch of [`crate::DeviceTime::compact_utc`]'s text,
/// `20261121T101500.250Z` (finer digits than milliseconds are dropped).
fn compact_utc_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[8] != b'T' || b[15] != b'.' || *b.last()? != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = text.get(range)?;
        digits
            .bytes()
            .all(|d| d.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let fraction = text.get(16..b.len() - 1)?;
    if fraction.len() < 3 || !fraction.bytes().all(|d| d.is_ascii_digit()) {
        return None;
    }
    let date = Date::from_calendar_date(
        i32::try_from(number(0..4)?).ok()?,
        Month::try_from(u8::try_from(number(4..6)?).ok()?).ok()?,
        u8::try_from(number(6..8)?).ok()?,
    )
    .ok()?;
    let time = Time::from_hms_milli(
        u8::try_from(number(9..11)?).ok()?,
        u8::try_from(number(11..13)?).ok()?,
        u8::try_from(number(13..15)?).ok()?,
        fraction[..3].parse().ok()?,
    )
    .ok()?;
    let instant = PrimitiveDateTime::new(date, time).assume_utc();
    i64::try_from(instant.unix_timestamp_nanos() / 1_000_000).ok()
}

/// An Observation the gateway rendered, with its identifier value `from` replaced by `to`;
/// `None` when `json` is not such an Observation. The renderer writes the identifier before
/// anything a device supplies, so its first occurrence is the one.
pub fn with_observation_identifier(json: &[u8], from: &str, to: &str) -> Option<Vec<u8>> {
    let identifier = |value: &str| {
        format!(
            r#""identifier":[{{"system":"{OBSERVATION_IDENTIFIER_SYSTEM}","value":{}}}]"#,
            serde_json::to_string(value).expect("a string serializes")
        )
    };
    let needle = identifier(from);
    let at = memchr::memmem::find(json, needle.as_bytes())?;
    let mut out = Vec::with_capacity(json.len() + to.len());
    out.extend_from_slice(&json[..at]);
    out.extend_from_slice(identifier(to).as_bytes());
    out.extend_from_slice(&json[at + needle.len()..]);
    Some(out)
}

/// What a destination charts of an interval's values instead of its latest reading, coded as
/// FHIR's own statistics (`http://terminology.hl7.org/CodeSystem/observation-statistics`,
/// the codes of `Observation/$stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartStatistic {
    Mean,
    Minimum,
    Maximum,
}

/// FHIR's statistics code system (R4 StatisticsCode).
pub const OBSERVATION_STATISTICS: &str =
    "http://terminology.hl7.org/CodeSystem/observation-statistics";

impl ChartStatistic {
    /// Its code and display in [`OBSERVATION_STATISTICS`].
    pub fn coding(self) -> (&'static str, &'static str) {
        match self {
            Self::Mean => ("average", "Average"),
            Self::Minimum => ("minimum", "Minimum"),
            Self::Maximum => ("maximum", "Maximum"),
        }
    }

    /// The statistic of `values` (decimals as written), written as a decimal: the minimum or
    /// maximum as the device wrote it, the mean exact to one digit finer than the finest
    /// value (half away from zero), trailing zeros beyond the values' own digits dropped.
    /// `None` without values or with one that is not a decimal.
    pub fn of(self, values: &[&str]) -> Option<String> {
        let parsed: Vec<Decimal> = values
            .iter()
            .map(|v| Decimal::parse(v))
            .collect::<Option<_>>()?;
        let scale = parsed.iter().map(|d| d.scale).max()?;
        let scaled: Vec<i128> = parsed
            .iter()
            .map(|d| {
                d.mantissa
                    .checked_mul(10_i128.checked_pow(scale - d.scale)?)
            })
            .collect::<Option<_>>()?;
        let pick = |best: Option<(usize, &i128)>| best.map(|(i, _)| values[i].to_owned());
        match self {
            // The first of equal extremes: ties change nothing.
            Self::Minimum => pick(scaled.iter().enumerate().min_by_key(|&(_, value)| *value)),
            Self::Maximum => pick(
                scaled
                    .iter()
                    .enumerate()
                    .rev()
                    .max_by_key(|&(_, value)| *value),
            ),
            Self::Mean if values.len() == 1 => Some(values[0].to_owned()),
            Self::Mean => {
                let count = i128::try_from(scaled.len()).ok()?;
                let sum = scaled
                    .iter()
                    .try_fold(0_i128, |sum, value| sum.checked_add(*value))?
                    .checked_mul(10)?;
                let mut mean = sum / count;
                if 2 * (sum % count).abs() >= count {
                    mean += sum.signum();
                }
                let mut digits = scale + 1;
                while digits > scale && mean % 10 == 0 {
                    mean /= 10;
                    digits -= 1;
                }
                Some(
                    Decimal {
                        mantissa: mean,
                        scale: digits,
                    }
                    .to_string(),
                )
            }
        }
    }
}

/// A decimal as mantissa and digits after the point; `1.50` is (150, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    /// A JSON number (FHIR decimal) of at most 30 significant digits and a small exponent.
    fn parse(text: &str) -> Option<Self> {
        let (number, exponent) = match text.find(['e', 'E']) {
            Some(at) => (&text[..at], text[at + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let (negative, digits) = match number.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, number),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty()
            || whole.len() + fraction.len() > 30
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
            || !(-30..=30).contains(&exponent)
        {
            return None;
        }
        let mut mantissa: i128 = format!("{whole}{fraction}").parse().ok()?;
        let mut scale = i32::try_from(fraction.len()).ok()? - exponent;
        if scale < 0 {
            mantissa = mantissa.checked_mul(10_i128.checked_pow(scale.unsigned_abs())?)?;
            scale = 0;
        }
        if negative {
            mantissa = -mantissa;
        }
        Some(Self {
            mantissa,
            scale: u32::try_from(scale).ok()?,
        })
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (whole, fraction) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{whole}.{fraction}")
    }
}

/// The value of a reading the gateway rendered, as a charting statistic takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChartValue {
    /// `valueQuantity.value` as the device wrote it.
    Decimal(String),
    /// No value: the device marked it invalid (`dataAbsentReason`).
    Absent,
    /// Not a quantity (a boolean): charted as the latest reading, never as a statistic.
    Other,
}

/// What [`ChartStatistic`] takes of the Observation `json`.
pub fn chart_value(json: &[u8]) -> ChartValue {
    let Ok(serde_json::Value::Object(observation)) = serde_json::from_slice(json) else {
        return ChartValue::Other;
    };
    match observation
        .get("valueQuantity")
        .and_then(|q| q.get("value"))
    {
        Some(serde_json::Value::Number(value)) => ChartValue::Decimal(value.to_string()),
        Some(_) => ChartValue::Other,
        None if observation.contains_key("dataAbsentReason") => ChartValue::Absent,
        None => ChartValue::Other,
    }
}

/// The Observation of an interval charted as `statistic` of its `values`: `template` (a
/// reading of the interval as charted, or what was last sent for it) with that value, the
/// interval as `effectivePeriod`, the statistic as `method`, and no interpretation flags,
/// which belong to single readings; its status is `final`. Without values (the device marked every reading of the
/// interval invalid) the value is absent for that reason. `None` when `template` is not such
/// an Observation (or has no unit for a value).
pub fn summarized(
    template: &[u8],
    statistic: ChartStatistic,
    values: &[&str],
    start_ms: i64,
    end_ms: i64,
) -> Option<Vec<u8>> {
    use serde_json::{Value, json};
    let Ok(Value::Object(template)) = serde_json::from_slice::<Value>(template) else {
        return None;
    };
    let instant = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
            .ok()?
            .format(&time::format_description::well_known::Rfc3339)
            .ok()
    };
    let period = json!({"start": instant(start_ms)?, "end": instant(end_ms)?});
    let value = match values {
        [] => None,
        values => Some(Value::Number(statistic.of(values)?.parse().ok()?)),
    };
    let quantity = template.get("valueQuantity").cloned();
    if value.is_some() && quantity.is_none() {
        return None;
    }
    let (code, display) = statistic.coding();
    let method =
        json!({"coding": [{"system": OBSERVATION_STATISTICS, "code": code, "display": display}]});
    let absent = || {
        json!({"coding": [{"system": crate::observation_json::DATA_ABSENT_REASON, "code": "error", "display": "Error"}],
               "text": "The device reported every value of the interval as invalid"})
    };
    let mut out = serde_json::Map::new();
    for (key, member) in template {
        match key.as_str() {
            "effectiveDateTime" | "effectivePeriod" => {
                out.insert("effectivePeriod".into(), period.clone());
            }
            "valueQuantity" | "dataAbsentReason" => match (&value, &quantity) {
                (Some(value), Some(quantity)) => {
                    let mut quantity = quantity.clone();
                    quantity["value"] = value.clone();
                    out.insert("valueQuantity".into(), quantity);
                }
                _ => {
                    out.insert("dataAbsentReason".into(), absent());
                }
            },
            // What was sent last may have been taken back: a statistic of values is final.
            "status" => {
                out.insert(key, Value::from("final"));
            }
            "interpretation" | "method" => {}
            "device" => {
                out.insert("method".into(), method.clone());
                out.insert(key, member);
            }
            _ => {
                out.insert(key, member);
            }
        }
    }
    if !out.contains_key("method") {
        out.insert("method".into(), method);
    }
    serde_json::to_vec(&Value::Object(out)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUARTER: Duration = Duration::from_secs(15 * 60);

    #[test]
    fn a_reading_falls_in_the_utc_aligned_interval_of_its_device_time() {
        let slot = chart_slot("cardiohelp:CH-1:blood-flow:20260601T121459.999Z", QUARTER).unwrap();
        assert_eq!(
            slot.identifier_value,
            "cardiohelp:CH-1:blood-flow:20260601T120000Z/PT15M"
        );
        assert_eq!(
            slot.logical_id,
            logical_id(OBSERVATION_IDENTIFIER_SYSTEM, &slot.identifier_value)
        );
        let start = time::macros::datetime!(2026-06-01 12:00 UTC).unix_timestamp() * 1000;
        assert_eq!(slot.reading_ms, start + 14 * 60_000 + 59_999);
        assert_eq!(slot.end_ms, start + 15 * 60_000);
        // The next millisecond is the next slot; finer digits than milliseconds are dropped.
        let next = chart_slot("cardiohelp:CH-1:blood-flow:20260601T121500.0001Z", QUARTER).unwrap();
        assert_eq!(
            next.identifier_value,
            "cardiohelp:CH-1:blood-flow:20260601T121500Z/PT15M"
        );
        assert_eq!(next.reading_ms, start + 15 * 60_000);
        let hourly = chart_slot(
            "cardiohelp:CH-1:blood-flow:20260601T235959.000Z",
            Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(
            hourly.identifier_value,
            "cardiohelp:CH-1:blood-flow:20260601T230000Z/PT1H"
        );
    }

    #[test]
    fn only_reading_identifiers_and_day_dividing_intervals_have_slots() {
        for identifier in [
            "cardiohelp:CH-1:blood-flow:20260601T120000Z/PT15M",
            "CH-1:blood-flow:20260601T120000.000Z",
            "cardiohelp:CH-1:blood-flow:2026-06-01T12:00:00Z",
            "cardiohelp:CH-1:blood-flow:20261301T120000.000Z",
            "cardiohelp:CH-1:blood-flow:20260601T120000.00Z",
            "vendor-id-42",
        ] {
            assert_eq!(chart_slot(identifier, QUARTER), None, "{identifier}");
        }
        for interval in [0, 30, 90, 7 * 60, 86_400 * 2] {
            assert!(!valid_chart_interval(Duration::from_secs(interval)));
        }
        for minutes in [1, 5, 15, 30, 60, 240, 1440] {
            assert!(valid_chart_interval(Duration::from_secs(minutes * 60)));
        }
        assert_eq!(
            chart_slot(
                "cardiohelp:CH-1:blood-flow:20260601T120000.000Z",
                Duration::from_secs(90)
            ),
            None
        );
    }

    #[test]
    fn the_identifier_is_replaced_and_nothing_else() {
        let mappings = crate::Mappings::embedded().unwrap();
        let family = &mappings.families()[0];
        let parameter = &family.parameters()[0];
        let input = crate::shapes::inputs(family, parameter).remove(0);
        crate::shapes::with_reading(family, parameter, &input, |context, reading| {
            let reading = mappings.map_reading(context, reading).unwrap();
            let slot = chart_slot(&reading.identifier_value, QUARTER).unwrap();
            let charted = with_observation_identifier(
                &reading.json,
                &reading.identifier_value,
                &slot.identifier_value,
            )
            .unwrap();
            let mut expected: serde_json::Value = serde_json::from_slice(&reading.json).unwrap();
            expected["identifier"][0]["value"] = slot.identifier_value.clone().into();
            let charted_value: serde_json::Value = serde_json::from_slice(&charted).unwrap();
            assert_eq!(charted_value, expected);
            crate::check_resource_json("Observation", &charted).unwrap();
            assert_eq!(
                crate::ProfileValidator::embedded()
                    .unwrap()
                    .check(&charted_value),
                vec![]
            );
            assert_eq!(
                with_observation_identifier(&reading.json, "other", "x"),
                None
            );
        });
    }

    #[test]
    fn statistics_are_exact_decimals() {
        let of = |statistic: ChartStatistic, values: &[&str]| statistic.of(values);
        use ChartStatistic::{Maximum, Mean, Minimum};
        assert_eq!(of(Mean, &["4.2", "4.4"]).as_deref(), Some("4.3"));
        assert_eq!(of(Mean, &["4.2", "4.3"]).as_deref(), Some("4.25"));
        assert_eq!(of(Mean, &["1", "2", "2"]).as_deref(), Some("1.7"));
        assert_eq!(of(Mean, &["-1.5", "-1.6"]).as_deref(), Some("-1.55"));
        assert_eq!(of(Mean, &["-1", "-2", "-2"]).as_deref(), Some("-1.7"));
        assert_eq!(of(Mean, &["1e1", "5"]).as_deref(), Some("7.5"));
        assert_eq!(of(Mean, &["0.04", "0.05"]).as_deref(), Some("0.045"));
        assert_eq!(of(Mean, &["4.20"]).as_deref(), Some("4.20"));
        // Sums past f64's exact range stay exact.
        assert_eq!(
            of(Mean, &["9007199254740993", "9007199254740993"]).as_deref(),
            Some("9007199254740993")
        );
        assert_eq!(of(Minimum, &["4.10", "4.1", "5"]).as_deref(), Some("4.10"));
        assert_eq!(of(Maximum, &["5", "5.0", "-7"]).as_deref(), Some("5"));
        assert_eq!(of(Minimum, &["5", "-7", "-7.00"]).as_deref(), Some("-7"));
        for refused in [&[][..], &["x"], &["1", "1.2.3"], &["1e99"], &[".5"]] {
            assert_eq!(of(Mean, refused), None, "{refused:?}");
        }
    }

    #[test]
    fn an_interval_statistic_is_a_valid_observation_of_the_interval() {
        let mappings = crate::Mappings::embedded().unwrap();
        let family = &mappings.families()[0];
        let parameter = family
            .parameters()
            .iter()
            .find(|p| matches!(p.kind, crate::ParameterKind::Quantity { .. }))
            .unwrap();
        let crate::ParameterKind::Quantity { ucum, .. } = &parameter.kind else {
            unreachable!()
        };
        let input = crate::shapes::inputs(family, parameter).remove(0);
        crate::shapes::with_reading(family, parameter, &input, |context, reading| {
            let reading = mappings.map_reading(context, reading).unwrap();
            assert!(matches!(chart_value(&reading.json), ChartValue::Decimal(_)));
            let slot = chart_slot(&reading.identifier_value, QUARTER).unwrap();
            let check = |json: &[u8]| {
                crate::check_resource_json("Observation", json).unwrap();
                let value: serde_json::Value = serde_json::from_slice(json).unwrap();
                assert_eq!(
                    crate::ProfileValidator::embedded().unwrap().check(&value),
                    vec![]
                );
                value
            };
            let mean = summarized(
                &reading.json,
                ChartStatistic::Mean,
                &["4.2", "4.45"],
                slot.start_ms,
                slot.end_ms,
            )
            .unwrap();
            let mean = check(&mean);
            assert_eq!(mean["valueQuantity"]["value"].to_string(), "4.325");
            assert_eq!(mean["valueQuantity"]["code"], ucum.as_str());
            assert_eq!(mean["method"]["coding"][0]["code"], "average");
            assert_eq!(
                mean["method"]["coding"][0]["system"],
                OBSERVATION_STATISTICS
            );
            let start = time::OffsetDateTime::from_unix_timestamp(slot.start_ms / 1000).unwrap();
            let rfc3339 = |t: time::OffsetDateTime| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            };
            assert_eq!(mean["effectivePeriod"]["start"], rfc3339(start));
            assert_eq!(
                mean["effectivePeriod"]["end"],
                rfc3339(start + time::Duration::minutes(15))
            );
            assert!(mean.get("effectiveDateTime").is_none());
            assert!(mean.get("interpretation").is_none());
            // Summarizing what was sent again gives the same resource.
            let again = summarized(
                &serde_json::to_vec(&mean).unwrap(),
                ChartStatistic::Mean,
                &["4.2", "4.45"],
                slot.start_ms,
                slot.end_ms,
            )
            .unwrap();
            assert_eq!(check(&again), mean);
            // Every reading invalid: the value is absent, and says why.
            let absent = summarized(
                &reading.json,
                ChartStatistic::Maximum,
                &[],
                slot.start_ms,
                slot.end_ms,
            )
            .unwrap();
            let absent = check(&absent);
            assert!(absent.get("valueQuantity").is_none());
            assert_eq!(absent["dataAbsentReason"]["coding"][0]["code"], "error");
            assert_eq!(absent["method"]["coding"][0]["code"], "maximum");
            // An interval taken back and charted again is final again.
            let mut withdrawn = absent.clone();
            withdrawn["status"] = "entered-in-error".into();
            let again = summarized(
                &serde_json::to_vec(&withdrawn).unwrap(),
                ChartStatistic::Maximum,
                &["4.2"],
                slot.start_ms,
                slot.end_ms,
            );
            // (no unit in that template: an invalid-only interval has none)
            assert_eq!(again, None);
            let again = summarized(
                &serde_json::to_vec(&{
                    let mut m = mean.clone();
                    m["status"] = "entered-in-error".into();
                    m
                })
                .unwrap(),
                ChartStatistic::Maximum,
                &["4.2"],
                slot.start_ms,
                slot.end_ms,
            )
            .unwrap();
            assert_eq!(check(&again)["status"], "final");
            assert_eq!(summarized(b"[]", ChartStatistic::Mean, &["1"], 0, 1), None);
        });
    }
}
