//! The wall clock that stamps votes, injectable so tests can skew one node against another, and
//! the check that keeps a node whose clock is off from stamping votes with it.
//!
//! The workers dead-letter a vote stamped more than [`MAX_TS_AHEAD`] ahead of the time the stream
//! stored it (`landslide_schema::ts::judge_stamp`). A node whose clock ran that far ahead would
//! answer `2xx` for votes that never count, so the node compares its clock with the clock of the
//! server that stores the votes, every [`SAMPLE_INTERVAL`], and takes no vote while the two are
//! more than [`MaxClockOffset`] apart, or before it has compared them at all.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use landslide_schema::MAX_TS_AHEAD;

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

/// How far this node's clock may be from the NATS server's while the node takes votes
/// (`LANDSLIDE_MAX_CLOCK_OFFSET_MS`): more than zero and less than [`MAX_TS_AHEAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxClockOffset(Duration);

impl MaxClockOffset {
    /// Two seconds: NTP keeps clocks within milliseconds of each other, so a node two seconds off
    /// has a broken clock; and two seconds are far below the workers' five minutes.
    pub const DEFAULT: Self = Self(Duration::from_secs(2));

    /// Refuses a bound of zero (no measurement can prove it) and one the workers' tolerance
    /// does not cover (a node that far ahead would stamp votes they dead-letter).
    pub fn new(bound: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !bound.is_zero() && bound < MAX_TS_AHEAD,
            "LANDSLIDE_MAX_CLOCK_OFFSET_MS must be more than 0 and less than {} ms, how far \
             ahead of the stream's clock the workers let a vote's stamp lie (a node further \
             ahead would stamp votes they dead-letter); got {} ms",
            MAX_TS_AHEAD.as_millis(),
            bound.as_millis()
        );
        Ok(Self(bound))
    }

    pub fn from_millis(ms: u64) -> anyhow::Result<Self> {
        Self::new(Duration::from_millis(ms))
    }

    pub const fn get(self) -> Duration {
        self.0
    }

    fn millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }

    /// How far ahead of this node's clock a cookie floor (or the node's own last stamp) may push
    /// a stamp: the workers' tolerance less this bound. A node that serves is within the bound
    /// of the stream's clock, so none of its stamps lies more than [`MAX_TS_AHEAD`] ahead of
    /// the time the stream stores it: it never answers `2xx` for a vote the workers refuse.
    pub fn max_stamp_ahead_ms(self) -> u64 {
        u64::try_from(MAX_TS_AHEAD.saturating_sub(self.0).as_millis()).unwrap_or(0)
    }
}

impl Default for MaxClockOffset {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How often a node compares its clock with the NATS server's: one small request every two
/// seconds, so a clock that is stepped off is caught within seconds (and
/// [`ClockCheck::verdict`] sees a step of the node's own clock at once).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// The longest round trip a comparison may take to count. The server's reading lies somewhere
/// within the round trip; beyond a second (an overloaded server, a congested link) it says too
/// little, and the last good comparison stands.
const MAX_SAMPLE_RTT: Duration = Duration::from_secs(1);

/// How long the last good comparison stands when no new one succeeds (NATS unreachable, every
/// round trip too slow): fifteen samples. Beyond it the node refuses votes until it compares
/// again. A comparison that failed was once kept for good, and a clock that drifted or was
/// stepped meanwhile in a way the monotonic clock hides (a VM paused and resumed) stamped votes
/// by a comparison hours old.
pub const MAX_SAMPLE_AGE: Duration = Duration::from_secs(30);

/// One comparison of the node's clock with the server's.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Server minus node, in milliseconds, at the midpoint of the request: positive when this
    /// node's clock is behind.
    offset_ms: i64,
    /// Half the round trip: how far the server's reading may lie from the midpoint.
    uncertainty_ms: u64,
    /// The node's clock and the monotonic clock at the midpoint.
    wall_ms: u64,
    mono: Instant,
}

impl Sample {
    /// A comparison from a request sent when the node's clock read `sent_wall_ms` (monotonic
    /// `sent`), answered at `received` with the server's clock `server_ms`.
    fn new(sent_wall_ms: u64, sent: Instant, received: Instant, server_ms: i64) -> Self {
        let half = received.saturating_duration_since(sent) / 2;
        let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let wall_ms = sent_wall_ms.saturating_add(half_ms);
        Self {
            offset_ms: server_ms.saturating_sub(i64::try_from(wall_ms).unwrap_or(i64::MAX)),
            uncertainty_ms: half_ms,
            wall_ms,
            mono: sent + half,
        }
    }

    /// The offset now: the sample's, less whatever the node's clock moved beyond the monotonic
    /// clock since (a step, by NTP or by hand; both clocks are slewed alike, so a gradual
    /// correction does not show).
    fn offset_now(&self, wall_ms: u64, mono: Instant) -> i64 {
        let wall = i128::from(wall_ms) - i128::from(self.wall_ms);
        let mono = i128::try_from(mono.saturating_duration_since(self.mono).as_millis())
            .unwrap_or(i128::MAX);
        let offset = i128::from(self.offset_ms) - (wall - mono);
        i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX })
    }
}

/// Whether the node's clock may stamp votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockVerdict {
    /// Not compared with the server's yet: no vote until it is.
    Unmeasured,
    /// The last comparison is older than [`MAX_SAMPLE_AGE`]: no vote until a new one.
    Stale { age_ms: u64 },
    /// Within the bound, even allowing for the uncertainty of the comparison.
    Within { offset_ms: i64 },
    /// Off by more than the bound, or not provably within it.
    Off {
        offset_ms: i64,
        uncertainty_ms: u64,
        bound_ms: u64,
    },
}

impl ClockVerdict {
    /// The verdict of the last comparison, if any, as of `wall_ms` by the node's clock and
    /// `mono` by the monotonic one. Within only when the whole uncertainty is: then the true
    /// offset is within the bound, which is what [`MaxClockOffset::max_stamp_ahead_ms`] needs.
    fn judge(sample: Option<&Sample>, wall_ms: u64, mono: Instant, bound: MaxClockOffset) -> Self {
        let Some(sample) = sample else {
            return Self::Unmeasured;
        };
        let age = mono.saturating_duration_since(sample.mono);
        if age > MAX_SAMPLE_AGE {
            return Self::Stale {
                age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            };
        }
        let offset_ms = sample.offset_now(wall_ms, mono);
        let bound_ms = bound.millis();
        if offset_ms
            .unsigned_abs()
            .saturating_add(sample.uncertainty_ms)
            <= bound_ms
        {
            Self::Within { offset_ms }
        } else {
            Self::Off {
                offset_ms,
                uncertainty_ms: sample.uncertainty_ms,
                bound_ms,
            }
        }
    }

    pub fn is_within(&self) -> bool {
        matches!(self, Self::Within { .. })
    }
}

impl std::fmt::Display for ClockVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Unmeasured => f.write_str(
                "this node has not compared its clock with the NATS server's yet; votes are \
                 refused until it has",
            ),
            Self::Stale { age_ms } => write!(
                f,
                "this node last compared its clock with the NATS server's {} s ago (the \
                 comparisons since failed or took too long); votes are refused until it \
                 compares again",
                age_ms / 1000
            ),
            Self::Within { offset_ms } => write!(
                f,
                "this node's clock is within bounds of the NATS server's (offset {offset_ms} ms)"
            ),
            Self::Off {
                offset_ms,
                uncertainty_ms,
                bound_ms,
            } => write!(
                f,
                "this node's clock is {} ms {} the NATS server's (measured offset {offset_ms} ms \
                 ± {uncertainty_ms} ms), more than the {bound_ms} ms allowed \
                 (LANDSLIDE_MAX_CLOCK_OFFSET_MS); votes are refused until it is back within",
                offset_ms.unsigned_abs(),
                if offset_ms > 0 { "behind" } else { "ahead of" },
            ),
        }
    }
}

/// The node's clock against the NATS server's: the last comparison, which [`ClockCheck::watch`]
/// renews, judged on demand.
#[derive(Debug)]
pub struct ClockCheck {
    clock: Arc<dyn Clock>,
    bound: MaxClockOffset,
    last: Mutex<Option<Sample>>,
}

impl ClockCheck {
    pub fn new(clock: Arc<dyn Clock>, bound: MaxClockOffset) -> Self {
        Self {
            clock,
            bound,
            last: Mutex::new(None),
        }
    }

    /// Whether the node may stamp a vote now. Cheap: two clock readings and a lock held for a
    /// copy.
    pub fn verdict(&self) -> ClockVerdict {
        let wall_ms = self.clock.now_ms();
        let mono = Instant::now();
        // A poisoned lock still holds a whole `Option<Sample>` (it is only ever replaced).
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        ClockVerdict::judge(last.as_ref(), wall_ms, mono, self.bound)
    }

    /// Compares the clocks every [`SAMPLE_INTERVAL`], for ever: the node runs it as a task of its
    /// own and aborts it at shutdown. The first comparison is at once, so a node is ready
    /// moments after it starts.
    pub async fn watch(self: Arc<Self>, js: jetstream::Context, stream: String) {
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_within = None;
        loop {
            interval.tick().await;
            match self.sample(&js, &stream).await {
                Ok(Some(sample)) => {
                    // Seconds, the unit of Prometheus; milliseconds are what the bound is in.
                    metrics::gauge!("landslide_clock_offset_seconds")
                        .set(sample.offset_ms as f64 / 1000.0);
                    *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(sample);
                }
                Ok(None) => {}
                // NATS unreachable: `/readyz` says so, and votes fail to publish anyway.
                Err(err) => {
                    tracing::debug!(error = format!("{err:#}"), "cannot compare the clocks");
                }
            }
            let verdict = self.verdict();
            let within = verdict.is_within();
            if verdict != ClockVerdict::Unmeasured && was_within != Some(within) {
                if within {
                    tracing::info!(%verdict, "clock compared with the NATS server's; taking votes");
                } else {
                    tracing::error!(%verdict, "clock off; refusing votes");
                }
                was_within = Some(within);
            }
        }
    }

    /// One comparison with the clock of the server that stores `stream`'s messages; `None` when
    /// the round trip took too long to tell.
    async fn sample(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> anyhow::Result<Option<Sample>> {
        let sent_wall_ms = self.clock.now_ms();
        let sent = Instant::now();
        let server = landslide_nats::stream_clock(js, stream).await?;
        let received = Instant::now();
        let server = server.ok_or_else(|| {
            anyhow::anyhow!("the NATS server's answer carries no time (ts); is it older than 2.10?")
        })?;
        let rtt = received.saturating_duration_since(sent);
        if rtt > MAX_SAMPLE_RTT.min(self.bound.get()) {
            tracing::debug!(
                rtt_ms = rtt.as_millis() as u64,
                "clock comparison took too long to tell; the last one stands"
            );
            return Ok(None);
        }
        Ok(Some(Sample::new(
            sent_wall_ms,
            sent,
            received,
            server.timestamp_millis(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER_MS: i64 = 1_796_150_000_000;

    fn bound(ms: u64) -> MaxClockOffset {
        MaxClockOffset::from_millis(ms).unwrap()
    }

    #[test]
    fn the_bound_must_be_positive_and_within_the_workers_tolerance() {
        assert_eq!(MaxClockOffset::default().get(), Duration::from_secs(2));
        assert_eq!(MaxClockOffset::default().max_stamp_ahead_ms(), 298_000);
        let tolerance = u64::try_from(MAX_TS_AHEAD.as_millis()).unwrap();
        for refused in [0, tolerance, tolerance + 1, u64::MAX] {
            let err = MaxClockOffset::from_millis(refused)
                .unwrap_err()
                .to_string();
            assert!(err.contains("LANDSLIDE_MAX_CLOCK_OFFSET_MS"), "{err}");
            assert!(err.contains("less than 300000 ms"), "{err}");
        }
        assert_eq!(bound(tolerance - 1).max_stamp_ahead_ms(), 1);
    }

    #[test]
    fn the_offset_is_the_server_clock_less_the_midpoint_of_the_request() {
        let sent = Instant::now();
        // Sent at 12:00:00.000 by the node, answered 40 ms later, the server read 12:00:03.020:
        // the node is 3 s behind, give or take 20 ms.
        let sample = Sample::new(
            SERVER_MS as u64 - 3_000,
            sent,
            sent + Duration::from_millis(40),
            SERVER_MS + 20,
        );
        assert_eq!(sample.offset_ms, 3_000);
        assert_eq!(sample.uncertainty_ms, 20);
        let mono = sent + Duration::from_millis(20);
        assert_eq!(sample.offset_now(sample.wall_ms, mono), 3_000);
        assert_eq!(
            ClockVerdict::judge(Some(&sample), sample.wall_ms, mono, bound(2_000)),
            ClockVerdict::Off {
                offset_ms: 3_000,
                uncertainty_ms: 20,
                bound_ms: 2_000
            }
        );
        assert_eq!(
            ClockVerdict::judge(Some(&sample), sample.wall_ms, mono, bound(3_020)),
            ClockVerdict::Within { offset_ms: 3_000 }
        );
        // Within by the estimate, but not by the estimate's uncertainty.
        assert!(
            !ClockVerdict::judge(Some(&sample), sample.wall_ms, mono, bound(3_019)).is_within()
        );
    }

    #[test]
    fn a_clock_ahead_is_off_as_much_as_one_behind() {
        let sent = Instant::now();
        let ahead = Sample::new(SERVER_MS as u64 + 5_000, sent, sent, SERVER_MS);
        let verdict = ClockVerdict::judge(Some(&ahead), ahead.wall_ms, sent, bound(2_000));
        assert!(!verdict.is_within());
        let text = verdict.to_string();
        assert!(
            text.starts_with("this node's clock is 5000 ms ahead of the NATS server's"),
            "{text}"
        );
        assert!(text.contains("more than the 2000 ms allowed"), "{text}");
        assert!(ClockVerdict::judge(Some(&ahead), ahead.wall_ms, sent, bound(5_000)).is_within());
        assert_eq!(
            ClockVerdict::judge(None, ahead.wall_ms, sent, bound(5_000)),
            ClockVerdict::Unmeasured
        );
    }

    #[test]
    fn a_step_of_the_node_clock_after_the_comparison_counts_at_once() {
        let sent = Instant::now();
        let sample = Sample::new(SERVER_MS as u64, sent, sent, SERVER_MS);
        let later = sent + Duration::from_secs(1);
        // One second later by both clocks: still in step.
        let steady = sample.wall_ms + 1_000;
        assert_eq!(
            ClockVerdict::judge(Some(&sample), steady, later, bound(2_000)),
            ClockVerdict::Within { offset_ms: 0 }
        );
        // The wall clock jumped an hour ahead meanwhile.
        let stepped = steady + 3_600_000;
        assert_eq!(
            ClockVerdict::judge(Some(&sample), stepped, later, bound(2_000)),
            ClockVerdict::Off {
                offset_ms: -3_600_000,
                uncertainty_ms: 0,
                bound_ms: 2_000
            }
        );
    }

    #[test]
    fn a_comparison_too_old_stamps_nothing() {
        let sent = Instant::now();
        let sample = Sample::new(SERVER_MS as u64, sent, sent, SERVER_MS);
        let at = |age: Duration| {
            let wall = sample.wall_ms + u64::try_from(age.as_millis()).unwrap();
            ClockVerdict::judge(Some(&sample), wall, sent + age, bound(2_000))
        };
        assert!(at(MAX_SAMPLE_AGE).is_within());
        let stale = at(MAX_SAMPLE_AGE + Duration::from_secs(1));
        assert_eq!(stale, ClockVerdict::Stale { age_ms: 31_000 });
        assert!(!stale.is_within());
        assert!(stale.to_string().contains("31 s ago"), "{stale}");
    }
}
