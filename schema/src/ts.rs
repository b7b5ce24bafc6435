//! The vote timestamp: a 64-bit hybrid logical clock value (design rule 2).
//!
//! The high 48 bits are milliseconds since the Unix epoch, the low 16 bits a counter. A node stamps a
//! vote with the greatest of its wall clock, one more than the last stamp it issued, and one more than
//! the voter's last accepted stamp (carried in the signed cookie). So a voter's later vote always
//! sorts after the earlier one, whatever the two nodes' clocks say; ties between different voters'
//! events do not matter, and ties of one voter's events break on the event id.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A hybrid logical clock value. Ordered as the integer it is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Bits of the logical counter.
    pub const COUNTER_BITS: u32 = 16;

    /// The stamp of a wall-clock reading, counter zero. Saturates far beyond any real clock.
    pub fn from_millis(ms: u64) -> Self {
        Self(ms.saturating_mul(1 << Self::COUNTER_BITS))
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> u64 {
        self.0 >> Self::COUNTER_BITS
    }

    /// The logical counter.
    pub fn counter(self) -> u16 {
        // The mask keeps 16 bits: the cast cannot truncate anything that matters.
        (self.0 & 0xFFFF) as u16
    }

    /// The smallest stamp greater than this one (a counter overflow carries into the millisecond).
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }

    /// The stamp as PostgreSQL's `bigint`. Stamps stay below 2^63 until the year 4400.
    pub fn to_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// A stamp read back from PostgreSQL's `bigint`; negative values (never written) read as zero.
    pub fn from_i64(v: i64) -> Self {
        Self(u64::try_from(v).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Stamps a new vote (design rule 2), as a pure function of its inputs.
///
/// - `now_ms`: the node's wall clock in milliseconds since the Unix epoch;
/// - `last_issued`: the last stamp this node issued (so a node's stamps strictly increase);
/// - `floor`: the voter's last accepted stamp, from the signed cookie, if any.
///
/// The result is at least the wall clock, and strictly greater than both `last_issued` and `floor`.
pub fn stamp(now_ms: u64, last_issued: Timestamp, floor: Option<Timestamp>) -> Timestamp {
    let mut ts = Timestamp::from_millis(now_ms).max(last_issued.next());
    if let Some(floor) = floor {
        ts = ts.max(floor.next());
    }
    ts
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_stamp_splits_into_millis_and_counter() {
        let ts = Timestamp(Timestamp::from_millis(1_700_000_000_123).0 + 7);
        assert_eq!(ts.millis(), 1_700_000_000_123);
        assert_eq!(ts.counter(), 7);
    }

    #[test]
    fn a_slow_node_still_stamps_after_the_cookie() {
        let fast = stamp(1_000_000 + 10_000, Timestamp(0), None);
        let slow = stamp(1_000_000, Timestamp(0), Some(fast));
        assert!(slow > fast);
        assert_eq!(slow, fast.next());
    }

    proptest! {
        /// A voter's later vote beats the earlier one whatever the skew between the two nodes:
        /// the cookie carries the earlier stamp, and the later node stamps above it.
        #[test]
        fn later_vote_wins_for_any_clock_skew(
            first_clock in 0u64..1u64 << 46,
            skew in -3_600_000i64..3_600_000,
            first_node_last in any::<u64>().prop_map(|v| v >> 1),
            second_node_last in any::<u64>().prop_map(|v| v >> 1),
        ) {
            let first = stamp(first_clock, Timestamp(first_node_last), None);
            let second_clock = first_clock.saturating_add_signed(skew);
            let second = stamp(second_clock, Timestamp(second_node_last), Some(first));
            prop_assert!(second > first);
        }

        /// A chain of votes through nodes with arbitrary clocks stays strictly increasing.
        #[test]
        fn a_chain_of_votes_is_strictly_increasing(clocks in proptest::collection::vec(0u64..1u64 << 46, 1..50)) {
            let mut floor = None;
            for now in clocks {
                let ts = stamp(now, Timestamp(0), floor);
                if let Some(f) = floor {
                    prop_assert!(ts > f);
                }
                floor = Some(ts);
            }
        }

        /// The stamp never runs behind the wall clock, and never repeats the node's last stamp.
        #[test]
        fn a_stamp_respects_the_clock_and_the_node(
            now in 0u64..1u64 << 46,
            last in any::<u64>().prop_map(|v| v >> 1),
            floor in proptest::option::of(any::<u64>().prop_map(|v| Timestamp(v >> 1))),
        ) {
            let ts = stamp(now, Timestamp(last), floor);
            prop_assert!(ts >= Timestamp::from_millis(now));
            prop_assert!(ts > Timestamp(last));
            if let Some(f) = floor { prop_assert!(ts > f); }
        }
    }
}
