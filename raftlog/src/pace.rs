//! Pacing a background read of the whole store (the scrub), so that it takes a
//! bounded share of the disk instead of competing with clients at full speed.

use std::time::{Duration, Instant};

/// A byte rate a background job keeps under, counted from its start: after
/// each step it sleeps for as long as it is ahead.
pub(crate) struct Pace {
    bytes_per_second: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Pace {
    /// Reads at most `bytes_per_second` on average; `None` (or 0) does not wait.
    pub fn new(bytes_per_second: Option<u64>) -> Pace {
        Pace {
            bytes_per_second: bytes_per_second.filter(|&rate| rate > 0),
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `bytes` more read, then waits until the average rate since the
    /// start is back under the limit.
    pub async fn read(&mut self, bytes: u64) {
        self.bytes += bytes;
        let Some(rate) = self.bytes_per_second else {
            return;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}
