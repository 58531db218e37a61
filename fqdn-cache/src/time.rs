//! Time as the cache sees it: a value the caller passes in, never a clock read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A point in wall-clock time: milliseconds since the Unix epoch.
///
/// Wall-clock rather than monotonic because expiries are persisted and restored across
/// restarts (and reboots, where a monotonic clock starts again) and shown to users as
/// `expiresAt`. The agent reads `SystemTime::now()` and passes it in; a clock stepped back
/// delays expiry by the step, one stepped forward brings it closer. Milliseconds rather than
/// seconds so that a TTL of N seconds ends N seconds after the answer, not up to a second early.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_unix_millis(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    pub const fn from_unix_secs(secs: u64) -> Timestamp {
        Timestamp(secs.saturating_mul(1000))
    }

    /// From a `SystemTime`; times before the epoch become the epoch.
    pub fn from_system_time(t: std::time::SystemTime) -> Timestamp {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }

    pub const fn as_unix_millis(self) -> u64 {
        self.0
    }

    pub const fn add_secs(self, secs: u32) -> Timestamp {
        Timestamp(self.0.saturating_add(secs as u64 * 1000))
    }

    pub const fn add_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Whole seconds left until `self` as seen at `now`, rounded up (what `ttl` shows);
    /// 0 once `self` has passed.
    pub fn secs_left(self, now: Timestamp) -> u64 {
        self.0.saturating_sub(now.0).div_ceil(1000)
    }

    /// RFC 3339 in UTC, e.g. `2026-11-26T11:47:25Z` (milliseconds shown when not zero).
    pub fn to_rfc3339(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0 % 1000;
        let secs = self.0 / 1000;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )?;
        if ms != 0 {
            write!(f, ".{ms:03}")?;
        }
        f.write_str("Z")
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(
            Timestamp::from_unix_secs(0).to_string(),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            Timestamp::from_unix_secs(1_795_693_645).to_string(),
            "2026-11-26T11:47:25Z"
        );
        assert_eq!(
            Timestamp::from_unix_millis(951_782_400_123).to_string(),
            "2000-02-29T00:00:00.123Z"
        );
    }

    #[test]
    fn seconds_left_round_up() {
        let t = Timestamp::from_unix_millis(10_000);
        assert_eq!(t.secs_left(Timestamp::from_unix_millis(8_999)), 2);
        assert_eq!(t.secs_left(Timestamp::from_unix_millis(9_000)), 1);
        assert_eq!(t.secs_left(Timestamp::from_unix_millis(10_000)), 0);
        assert_eq!(t.secs_left(Timestamp::from_unix_millis(11_000)), 0);
    }
}
