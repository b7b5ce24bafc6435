//! The vote timestamp: a 64-bit hybrid logical clock value (design rule 2).
//!
//! The high 48 bits are milliseconds since the Unix epoch, the low 16 bits a counter. A node stamps a
//! vote with the greatest of its wall clock, one more than the last stamp it issued, and one more than
//! the voter's last accepted stamp (carried in the signed cookie). So a voter's later vote always
//! sorts after the earlier one, whatever the two nodes' clocks say; ties between different voters'
//! events do not matter, and ties of one voter's events break on the event id.
//!
//! Clocks are trusted with one thing only: no honest stamp lies more than [`MAX_TS_AHEAD`] ahead
//! of the time the stream stored its vote. The workers refuse any that does ([`judge_stamp`]),
//! and a node never stamps one ([`stamp_within`], and its clock check at ingest).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How far a vote's stamp (its milliseconds) may lie ahead of the moment the stream stored the
/// vote: five minutes. The workers, audit and replay refuse anything further ahead
/// ([`judge_stamp`]) as a dead letter: a stamp far in the future (up to 2^63 − 1), which anything
/// that can publish to the stream could write, would otherwise outrank every later vote of its
/// voter for ever.
///
/// Why five minutes: an honest stamp is the clock of an ingest node that is within
/// `LANDSLIDE_MAX_CLOCK_OFFSET_MS` of the NATS server (2 s by default; NTP keeps clocks within
/// milliseconds), or a cookie floor that such a node set earlier, so it lies at most that bound
/// ahead. Every bound an ingest node accepts is below this tolerance, with room for the skews the
/// tests and drills give nodes on purpose (two minutes slow in the window test, ±10 s in the
/// reliability harness). A stamp that slips under the tolerance can outrank its voter's later
/// votes for five minutes at most.
pub const MAX_TS_AHEAD: Duration = Duration::from_secs(5 * 60);

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

/// [`stamp`] under the node's clock rule: nothing pushes a stamp more than `max_ahead_ms` ahead
/// of the node's clock.
///
/// A cookie floor (or the node's own last stamp) that a stamp just above would put further ahead
/// is not followed: the vote is stamped as if the voter had no earlier vote in the cookie (or the
/// node had issued none), and the result says so. Such a floor can only come from a node whose
/// clock was far ahead; following it would push this vote as far ahead, where the workers
/// dead-letter it ([`judge_stamp`]) after the voter was told it was accepted. Its own last stamp
/// lies that far ahead only after the node's clock was set back.
///
/// Ingest passes [`MAX_TS_AHEAD`] less its own clock bound: a node that serves is within that
/// bound of the stream's clock, so its stamps are never more than [`MAX_TS_AHEAD`] ahead of the
/// time the stream stores them. Honest floors are followed: they lie at most twice the bound
/// ahead of an honest node's clock (one node ahead, the other behind), which three bounds within
/// the tolerance leave room for.
pub fn stamp_within(
    now_ms: u64,
    last_issued: Timestamp,
    floor: Option<Timestamp>,
    max_ahead_ms: u64,
) -> Stamped {
    let ceiling = Timestamp::from_millis(now_ms.saturating_add(max_ahead_ms));
    let followed = |ts: Timestamp| ts.next() <= ceiling;
    let last_refused = !followed(last_issued);
    let floor_refused = floor.is_some_and(|f| !followed(f));
    let ts = stamp(
        now_ms,
        if last_refused {
            Timestamp(0)
        } else {
            last_issued
        },
        floor.filter(|_| !floor_refused),
    );
    Stamped {
        ts,
        floor_refused,
        last_refused,
    }
}

/// A stamp from [`stamp_within`], and what it did not follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    pub ts: Timestamp,
    /// The cookie's floor lay too far ahead of the node's clock, and the stamp is below it.
    pub floor_refused: bool,
    /// The node's own last stamp lay too far ahead (its clock was set back).
    pub last_refused: bool,
}

/// A vote stamped further ahead of the moment the stream stored it than [`MAX_TS_AHEAD`]: no
/// ingest node could have made it, so it is a dead letter, never a ballot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the vote's stamp {ts} lies {ahead_ms} ms ahead of when the stream stored it ({}), more \
     than the {} ms an ingest node may stamp ahead: no ingest node made it",
    stored_at.to_rfc3339(),
    MAX_TS_AHEAD.as_millis()
)]
pub struct StampAhead {
    pub ts: Timestamp,
    pub stored_at: DateTime<Utc>,
    /// How far the stamp's milliseconds lie beyond `stored_at`.
    pub ahead_ms: u64,
}

/// Whether a vote stamped `ts` that the stream stored at `stored_at` can be an ingest node's:
/// its milliseconds at most [`MAX_TS_AHEAD`] beyond `stored_at`. Behind is always fine (a slow
/// node's clock, and stamps are only compared with each other). [`crate::PollBook::judge_event`]
/// applies it, so the workers, audit and replay all do.
pub fn judge_stamp(ts: Timestamp, stored_at: DateTime<Utc>) -> Result<(), StampAhead> {
    // Before the epoch is far behind any stamp: judge it as the epoch.
    let stored_ms = u64::try_from(stored_at.timestamp_millis()).unwrap_or(0);
    let tolerance_ms = u64::try_from(MAX_TS_AHEAD.as_millis()).unwrap_or(u64::MAX);
    match ts.millis().checked_sub(stored_ms) {
        Some(ahead_ms) if ahead_ms > tolerance_ms => Err(StampAhead {
            ts,
            stored_at,
            ahead_ms,
        }),
        _ => Ok(()),
    }
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

    /// 2026-12-01, in milliseconds: a clock of today.
    const NOW_MS: u64 = 1_796_150_000_000;
    const TOLERANCE_MS: u64 = MAX_TS_AHEAD.as_millis() as u64;

    fn stored(ms: u64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(i64::try_from(ms).unwrap()).unwrap()
    }

    #[test]
    fn a_cookie_floor_far_ahead_of_the_clock_is_not_followed() {
        let max_ahead = TOLERANCE_MS - 2_000;
        for floor in [
            Timestamp(i64::MAX as u64),
            Timestamp(u64::MAX),
            Timestamp::from_millis(NOW_MS + 3_600_000),
            Timestamp::from_millis(NOW_MS + max_ahead),
        ] {
            let stamped = stamp_within(NOW_MS, Timestamp(0), Some(floor), max_ahead);
            assert_eq!(
                stamped,
                Stamped {
                    ts: Timestamp::from_millis(NOW_MS),
                    floor_refused: true,
                    last_refused: false,
                },
                "floor {floor}"
            );
            assert!(judge_stamp(stamped.ts, stored(NOW_MS)).is_ok());
        }
        // Just inside: followed, as an honest floor from a node ahead of this one is.
        let near = Timestamp(Timestamp::from_millis(NOW_MS + max_ahead).0 - 1);
        let stamped = stamp_within(NOW_MS, Timestamp(0), Some(near), max_ahead);
        assert_eq!(stamped.ts, near.next());
        assert!(!stamped.floor_refused);
        let ten_seconds = Timestamp::from_millis(NOW_MS + 10_000);
        assert_eq!(
            stamp_within(NOW_MS, Timestamp(0), Some(ten_seconds), max_ahead).ts,
            ten_seconds.next()
        );
    }

    #[test]
    fn a_node_whose_clock_was_set_back_stops_following_its_own_last_stamp() {
        let last = Timestamp::from_millis(NOW_MS + 3_600_000);
        let stamped = stamp_within(NOW_MS, last, None, TOLERANCE_MS - 2_000);
        assert_eq!(stamped.ts, Timestamp::from_millis(NOW_MS));
        assert!(stamped.last_refused && !stamped.floor_refused);
        // A last stamp a moment ahead (counter ticks within one millisecond) is followed.
        let recent = Timestamp(Timestamp::from_millis(NOW_MS).0 + 5);
        assert_eq!(
            stamp_within(NOW_MS, recent, None, TOLERANCE_MS - 2_000).ts,
            recent.next()
        );
    }

    #[test]
    fn a_stamp_beyond_the_tolerance_of_its_stored_time_is_no_nodes() {
        let at = |ms: u64| Timestamp::from_millis(ms);
        assert!(judge_stamp(at(NOW_MS), stored(NOW_MS)).is_ok());
        assert!(judge_stamp(at(NOW_MS - 3_600_000), stored(NOW_MS)).is_ok());
        assert!(judge_stamp(Timestamp(1), stored(NOW_MS)).is_ok());
        // The counter never matters: only the milliseconds are compared.
        let edge = Timestamp(at(NOW_MS + TOLERANCE_MS).0 + 0xFFFF);
        assert!(judge_stamp(edge, stored(NOW_MS)).is_ok());
        let beyond = judge_stamp(at(NOW_MS + TOLERANCE_MS + 1), stored(NOW_MS)).unwrap_err();
        assert_eq!(beyond.ahead_ms, TOLERANCE_MS + 1);
        let forged = judge_stamp(Timestamp(i64::MAX as u64), stored(NOW_MS)).unwrap_err();
        assert_eq!(
            forged.to_string(),
            format!(
                "the vote's stamp 9223372036854775807 lies {} ms ahead of when the stream \
                 stored it (2026-12-01T18:33:20+00:00), more than the 300000 ms an ingest node \
                 may stamp ahead: no ingest node made it",
                (i64::MAX as u64 >> 16) - NOW_MS
            )
        );
        assert!(judge_stamp(Timestamp(u64::MAX), stored(0)).is_err());
    }

    proptest! {
        /// The clock rule: whatever the cookie and the node's last stamp say, the stamp is never
        /// more than `max_ahead` ahead of the clock nor behind it, it is above everything it
        /// follows, and it says what it did not follow.
        #[test]
        fn a_stamp_never_runs_further_ahead_than_the_rule_allows(
            now in 0u64..1u64 << 46,
            max_ahead in 0u64..1u64 << 40,
            last in any::<u64>(),
            floor in proptest::option::of(any::<u64>().prop_map(Timestamp)),
        ) {
            let stamped = stamp_within(now, Timestamp(last), floor, max_ahead);
            let ceiling = Timestamp::from_millis(now + max_ahead);
            prop_assert!(stamped.ts <= ceiling);
            prop_assert!(stamped.ts.millis() <= now + max_ahead);
            prop_assert!(stamped.ts >= Timestamp::from_millis(now));
            prop_assert_eq!(stamped.last_refused, Timestamp(last).next() > ceiling);
            if !stamped.last_refused {
                prop_assert!(stamped.ts > Timestamp(last));
            }
            match floor {
                None => prop_assert!(!stamped.floor_refused),
                Some(f) => {
                    prop_assert_eq!(stamped.floor_refused, f.next() > ceiling);
                    if !stamped.floor_refused {
                        prop_assert!(stamped.ts > f);
                    }
                }
            }
        }

        /// The whole rule for honest nodes: each within `bound` of the stream's clock (ahead or
        /// behind), with three bounds within the tolerance. One voter votes again and again
        /// through them, carrying the cookie: no floor is ever refused, every vote beats the
        /// previous one, and none is stamped beyond the tolerance of when the stream stores it
        /// (at or after the moment it was stamped), so none is dead-lettered.
        #[test]
        fn honest_nodes_keep_the_order_and_never_stamp_a_dead_letter(
            bound in 1u64..=TOLERANCE_MS / 3,
            offsets in proptest::collection::vec(-1_000_000i64..=1_000_000, 1..5),
            votes in proptest::collection::vec((0usize..5, 0u64..20_000, 0u64..3_000), 1..40),
        ) {
            // Offsets scaled into [-bound, bound].
            let offsets: Vec<i64> = offsets
                .iter()
                .map(|o| o * i64::try_from(bound).unwrap() / 1_000_000)
                .collect();
            let mut last = vec![Timestamp(0); offsets.len()];
            let mut floor = None;
            let mut true_ms = NOW_MS;
            for (node, pause, storing) in votes {
                let node = node % offsets.len();
                true_ms += pause;
                let clock = true_ms.saturating_add_signed(offsets[node]);
                let stamped = stamp_within(clock, last[node], floor, TOLERANCE_MS - bound);
                prop_assert!(!stamped.floor_refused && !stamped.last_refused);
                if let Some(f) = floor {
                    prop_assert!(stamped.ts > f);
                }
                prop_assert!(judge_stamp(stamped.ts, stored(true_ms + storing)).is_ok());
                last[node] = stamped.ts;
                floor = Some(stamped.ts);
            }
        }

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
