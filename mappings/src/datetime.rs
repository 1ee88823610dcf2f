use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// A device timestamp, checked against the FHIR `dateTime` grammar with a time zone.
///
/// The text is kept as the device sent it (for `effectiveDateTime`); the instant, normalized to
/// UTC, keys the Observation identifier so that the same instant written with another offset is
/// still the same reading.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTime<'a> {
    pub text: &'a str,
    pub instant: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error(
        "is not a date-time with seconds and a time zone, such as 2026-11-21T10:15:00Z or 2026-11-21T11:15:00.250+01:00"
    )]
    Malformed,
}

impl<'a> DeviceTime<'a> {
    pub fn parse(text: &'a str) -> Result<Self, TimeError> {
        if !is_fhir_datetime_with_zone(text) {
            return Err(TimeError::Malformed);
        }
        let instant = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| TimeError::Malformed)?;
        Ok(Self { text, instant })
    }

    /// `20261121T101500.250Z`: compact, sortable, free of `:` and `|`, millisecond precision.
    pub fn compact_utc(&self) -> String {
        let t = self.instant.to_offset(time::UtcOffset::UTC);
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        )
    }
}

/// FHIR R4 dateTime restricted to full timestamps: `YYYY-MM-DDThh:mm:ss(.f+)?(Z|(+|-)hh:mm)`.
/// RFC 3339 parsers also take a lower-case `t` or a space, which FHIR does not.
fn is_fhir_datetime_with_zone(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || b[10] != b'T'
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 9 {
            return false;
        }
    }
    match &b[i..] {
        [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_fhir_timestamps_and_normalizes_to_utc() {
        let a = DeviceTime::parse("2026-11-21T11:15:00.25+01:00").unwrap();
        let b = DeviceTime::parse("2026-11-21T10:15:00.250Z").unwrap();
        assert_eq!(a.compact_utc(), "20261121T101500.250Z");
        assert_eq!(a.compact_utc(), b.compact_utc());
    }

    #[test]
    fn rejects_what_fhir_rejects() {
        for bad in [
            "2026-11-21",
            "2026-11-21T10:15Z",
            "2026-11-21t10:15:00Z",
            "2026-11-21 10:15:00Z",
            "2026-11-21T10:15:00",
            "2026-11-21T10:15:00.Z",
            "2026-13-21T10:15:00Z",
            "2026-11-21T10:15:00+0100",
        ] {
            assert_eq!(
                DeviceTime::parse(bad).unwrap_err(),
                TimeError::Malformed,
                "{bad}"
            );
        }
    }
}
