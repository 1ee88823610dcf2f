//! How far each device's clock is from the gateway's, measured on every batch: the receive time
//! minus the time of the batch's newest reading. A console whose clock drifts charts its data at
//! the wrong time long before its readings are refused as "in the future" or "too old"; the
//! admin API (`GET /admin/v1/devices`) shows the drift so an integration team can act first.
//!
//! Network and buffering only ever add to the difference, so the smallest value seen is the best
//! estimate of the clock's own offset. Bounded: the devices seen least recently are forgotten
//! beyond [`MAX_DEVICES`].

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;
use time::OffsetDateTime;

/// Devices remembered at most.
pub const MAX_DEVICES: usize = 10_000;

/// One device's clock, as seen from the gateway (milliseconds; positive: the device is behind,
/// or its data arrived late).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceClock {
    /// `family:serial`.
    pub device: String,
    pub last_skew_ms: i64,
    pub min_skew_ms: i64,
    pub max_skew_ms: i64,
    pub batches: u64,
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: OffsetDateTime,
}

fn rfc3339<S: serde::Serializer>(at: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let text = at
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

#[derive(Default)]
pub struct DeviceClocks {
    devices: Mutex<HashMap<String, DeviceClock>>,
}

impl DeviceClocks {
    /// A batch from `family:serial`, received at `received`, whose newest reading is `newest`.
    pub fn record(
        &self,
        family: &str,
        serial: &str,
        received: OffsetDateTime,
        newest: OffsetDateTime,
    ) {
        let skew = (received - newest)
            .whole_milliseconds()
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        let key = format!("{family}:{serial}");
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(clock) = devices.get_mut(&key) {
            clock.last_skew_ms = skew;
            clock.min_skew_ms = clock.min_skew_ms.min(skew);
            clock.max_skew_ms = clock.max_skew_ms.max(skew);
            clock.batches += 1;
            clock.last_seen = received;
            return;
        }
        if devices.len() >= MAX_DEVICES
            && let Some(oldest) = devices
                .values()
                .min_by_key(|c| c.last_seen)
                .map(|c| c.device.clone())
        {
            devices.remove(&oldest);
        }
        devices.insert(
            key.clone(),
            DeviceClock {
                device: key,
                last_skew_ms: skew,
                min_skew_ms: skew,
                max_skew_ms: skew,
                batches: 1,
                last_seen: received,
            },
        );
    }

    /// Every device, sorted by name.
    pub fn snapshot(&self) -> Vec<DeviceClock> {
        let devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<DeviceClock> = devices.values().cloned().collect();
        all.sort_by(|a, b| a.device.cmp(&b.device));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn keeps_last_min_max_per_device() {
        let clocks = DeviceClocks::default();
        let now = datetime!(2026-11-21 10:00 UTC);
        clocks.record("f", "A", now, now - time::Duration::seconds(2));
        clocks.record("f", "A", now, now - time::Duration::milliseconds(500));
        clocks.record("f", "A", now, now - time::Duration::seconds(9));
        clocks.record("f", "B", now, now + time::Duration::seconds(1));
        let all = clocks.snapshot();
        assert_eq!(all.len(), 2);
        assert_eq!(
            (
                all[0].last_skew_ms,
                all[0].min_skew_ms,
                all[0].max_skew_ms,
                all[0].batches
            ),
            (9000, 500, 9000, 3)
        );
        assert_eq!(
            all[1].last_skew_ms, -1000,
            "a clock ahead shows as negative"
        );
    }

    #[test]
    fn forgets_the_least_recently_seen_beyond_the_bound() {
        let clocks = DeviceClocks::default();
        let start = datetime!(2026-11-21 10:00 UTC);
        for n in 0..=MAX_DEVICES {
            let at = start + time::Duration::seconds(n as i64);
            clocks.record("f", &n.to_string(), at, at);
        }
        let all = clocks.snapshot();
        assert_eq!(all.len(), MAX_DEVICES);
        assert!(all.iter().all(|c| c.device != "f:0"));
    }
}
