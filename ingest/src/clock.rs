//! The wall clock that stamps votes, injectable so tests can skew one node against another.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;
}

/// The system clock, shifted by `offset_ms` (zero in production; tests and fault drills skew it).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock {
    pub offset_ms: i64,
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        now.saturating_add_signed(self.offset_ms)
    }
}
