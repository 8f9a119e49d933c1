//! Wall-clock instants as whole seconds since the Unix epoch.
//!
//! Writecap expiry is compared against the verifier's clock; seconds are precise
//! enough and keep the signed encodings small.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current time of the system clock (the epoch if the clock is before it).
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(since.as_secs())
    }

    /// This instant moved forward by `duration`, saturating at the far future.
    pub fn after(self, duration: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration.as_secs()))
    }

    /// This instant as a [`SystemTime`], saturating at `i64::MAX` seconds, the most a
    /// Unix `SystemTime` holds (a decoded timestamp can be any `u64`).
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(self.0))
            .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(i64::MAX as u64))
    }
}

/// 10000-01-01T00:00:00Z: humantime formats only instants before it.
const RFC3339_END: u64 = 253_402_300_800;

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Past year 9999 humantime returns fmt::Error, which makes `to_string` panic;
        // a decoded writecap's expiry can be that far out.
        if self.0 >= RFC3339_END {
            return write!(f, "{} seconds after the Unix epoch", self.0);
        }
        write!(
            f,
            "{}",
            humantime::format_rfc3339_seconds(self.to_system_time())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `writecap` fuzz target: a decoded expiry past year 9999 made
    /// `to_string` panic.
    #[test]
    fn any_timestamp_displays() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp(RFC3339_END - 1).to_string(),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            Timestamp(u64::MAX).to_string(),
            format!("{} seconds after the Unix epoch", u64::MAX)
        );
        assert!(Timestamp(u64::MAX).to_system_time() > Timestamp(RFC3339_END).to_system_time());
    }
}
