use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

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
        "is not a date-time with seconds and a time zone, such as 2026-11-21T10:15:00Z or 2026-11-21T11:15:00.250+01:00 (FHIR: year 0001 or later, offset at most 14:00)"
    )]
    Malformed,
    #[error(
        "is {ahead_seconds} s ahead of the gateway's clock (at most {limit_seconds} s is allowed); check the device's clock"
    )]
    InFuture {
        ahead_seconds: i64,
        limit_seconds: i64,
    },
    #[error(
        "is {age_seconds} s in the past (at most {limit_seconds} s is taken, [readings] max_past_age); a reading this old is not charted as if current: check the device's clock, or have the integration team raise the limit for a backfill"
    )]
    TooOld {
        age_seconds: i64,
        limit_seconds: i64,
    },
}

/// The window of device times the gateway takes, around the moment a request was received:
/// one rule for every input (readings, FHIR-native Observations).
#[derive(Debug, Clone, Copy)]
pub struct TimeWindow {
    pub received_at: OffsetDateTime,
    /// A console whose clock runs ahead would chart data in the future.
    pub max_future_skew: Duration,
    /// A reading older than this is a stale buffer or a wrong clock, not current data.
    pub max_past_age: Duration,
}

impl TimeWindow {
    pub fn check(&self, time: &DeviceTime<'_>) -> Result<(), TimeError> {
        let ahead = time.instant - self.received_at;
        if ahead > self.max_future_skew {
            return Err(TimeError::InFuture {
                ahead_seconds: ahead.whole_seconds(),
                limit_seconds: self.max_future_skew.whole_seconds(),
            });
        }
        if -ahead > self.max_past_age {
            return Err(TimeError::TooOld {
                age_seconds: (-ahead).whole_seconds(),
                limit_seconds: self.max_past_age.whole_seconds(),
            });
        }
        Ok(())
    }
}

impl<'a> DeviceTime<'a> {
    pub fn parse(text: &'a str) -> Result<Self, TimeError> {
        if !is_fhir_datetime_with_zone(text) {
            return Err(TimeError::Malformed);
        }
        let instant = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| TimeError::Malformed)?;
        Ok(Self { text, instant })
    }

    /// `20261121T101500.250Z`: compact, sortable, free of `:` and `|`; milliseconds always,
    /// and every finer digit the device sent, so readings 0.1 ms apart stay two readings.
    pub fn compact_utc(&self) -> String {
        let t = self.instant.to_offset(time::UtcOffset::UTC);
        let mut fraction = format!("{:09}", t.nanosecond());
        while fraction.len() > 3 && fraction.ends_with('0') {
            fraction.pop();
        }
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}.{fraction}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
        )
    }
}

/// FHIR R4 dateTime restricted to full timestamps: `YYYY-MM-DDThh:mm:ss(.f+)?(Z|(+|-)hh:mm)`.
/// RFC 3339 parsers also take a lower-case `t` or a space, which FHIR does not; FHIR's own
/// grammar has no year 0000 and no offset beyond 14:00, which RFC 3339 parsers take.
fn is_fhir_datetime_with_zone(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !digits(0..4)
        || &b[0..4] == b"0000"
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
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let number = |a: u8, b: u8| {
                (a.is_ascii_digit() && b.is_ascii_digit()).then(|| (a - b'0') * 10 + (b - b'0'))
            };
            match (number(*h1, *h2), number(*m1, *m2)) {
                (Some(h), Some(m)) => m <= 59 && (h < 14 || (h == 14 && m == 0)),
                _ => false,
            }
        }
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
    fn keeps_every_digit_finer_than_a_millisecond() {
        let at = |t| DeviceTime::parse(t).unwrap().compact_utc();
        assert_eq!(at("2026-11-21T10:15:00Z"), "20261121T101500.000Z");
        assert_eq!(at("2026-11-21T10:15:00.2501Z"), "20261121T101500.2501Z");
        assert_eq!(at("2026-11-21T10:15:00.2502Z"), "20261121T101500.2502Z");
        assert_eq!(
            at("2026-11-21T10:15:00.000000001Z"),
            "20261121T101500.000000001Z"
        );
        assert!(DeviceTime::parse("2026-11-21T10:15:00+14:00").is_ok());
        assert!(DeviceTime::parse("0001-01-01T00:00:00Z").is_ok());
    }

    #[test]
    fn the_window_refuses_future_and_stale_times() {
        let window = TimeWindow {
            received_at: time::macros::datetime!(2026-11-21 10:00 UTC),
            max_future_skew: Duration::minutes(5),
            max_past_age: Duration::hours(24),
        };
        let check = |t| window.check(&DeviceTime::parse(t).unwrap());
        assert!(check("2026-11-21T10:04:59Z").is_ok());
        assert!(check("2026-11-20T10:00:00Z").is_ok());
        assert!(matches!(
            check("2026-11-21T10:06:00Z"),
            Err(TimeError::InFuture {
                ahead_seconds: 360,
                limit_seconds: 300
            })
        ));
        assert!(matches!(
            check("2026-11-20T09:59:59Z"),
            Err(TimeError::TooOld {
                age_seconds: 86401,
                ..
            })
        ));
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
            "0000-01-01T00:00:00Z",
            "2026-11-21T10:15:00+15:00",
            "2026-11-21T10:15:00-14:30",
            "2026-11-21T10:15:00+01:60",
        ] {
            assert_eq!(
                DeviceTime::parse(bad).unwrap_err(),
                TimeError::Malformed,
                "{bad}"
            );
        }
    }
}
