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
}
