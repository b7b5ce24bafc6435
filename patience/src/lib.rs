//! The one backoff of Landslide: every retry's pause and every wait until a deadline goes through
//! [`Backoff`], in every crate (the roles, the NATS crate, the test servers, the reliability
//! harness, the load generators). A pause is constant, linear or capped exponential; a wait may
//! have a deadline, past which it ends with [`TimedOut`], which names what it waited for.
//!
//! This crate depends on tokio's timer and nothing else of ours, so that any crate can use it
//! without pulling in telemetry or a client. It must never log, count metrics or know what it is
//! waiting for beyond the name it is given: a caller says why it waits and what a timeout means.
//!
//! Not every sleep is a retry or a wait. A fault's duration, a load generator's pacing, or a
//! `Retry-After` a rate limiter asked for are schedules, and sleep on their own.
//!
//! A deadline counts time the process spent stopped as time spent waiting: a role that waits for
//! a broker or a database at startup has none (`landslide_telemetry::patience::patiently` says
//! why). Deadlines are for tests, tools and shutdowns, where a wait that never ends is the worse
//! failure.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How the pauses grow from one try to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growth {
    /// The same pause every time.
    Constant,
    /// The pause grows by this step each time.
    Linear(Duration),
    /// The pause doubles each time.
    Doubling,
}

/// A deadline and the name of what is awaited before it.
#[derive(Debug, Clone)]
struct Deadline {
    at: Instant,
    what: String,
    since: Instant,
}

/// The pauses between tries, and optionally a deadline. Constant, linear or capped exponential;
/// [`Backoff::next_pause`] gives the next pause, [`Backoff::reset`] starts again after a success,
/// [`Backoff::pause`] sleeps for it, [`Backoff::wait`] too unless the deadline has passed, and
/// [`Backoff::until`] polls a condition until it holds or the deadline passes.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
    growth: Growth,
    deadline: Option<Deadline>,
}

/// A wait whose deadline passed before what it waited for came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: not within {waited:?}")]
pub struct TimedOut {
    /// What was waited for, as the caller named it.
    pub what: String,
    /// How long it was waited for.
    pub waited: Duration,
}

impl Backoff {
    /// The startup waits' backoff: 200 ms doubling to 5 s.
    pub const STARTUP: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

    /// Capped exponential: `first`, doubling, at most `max`.
    pub fn exponential(first: Duration, max: Duration) -> Self {
        Self::with(first, max, Growth::Doubling)
    }

    /// The same `pause` every time: a poll's interval.
    pub fn constant(pause: Duration) -> Self {
        Self::with(pause, pause, Growth::Constant)
    }

    /// `first`, then one `step` more each time: `first`, `first + step`, `first + 2 × step`…
    pub fn linear(first: Duration, step: Duration) -> Self {
        Self::with(first, Duration::MAX, Growth::Linear(step))
    }

    fn with(first: Duration, max: Duration, growth: Growth) -> Self {
        Self {
            next: first,
            first,
            max,
            growth,
            deadline: None,
        }
    }

    /// The same backoff, whose [`Backoff::wait`] and [`Backoff::until`] give up at `deadline`,
    /// naming `what` they waited for in their [`TimedOut`]. A std `Instant` will do.
    #[must_use]
    pub fn deadline(mut self, deadline: impl Into<Instant>, what: impl Into<String>) -> Self {
        self.deadline = Some(Deadline {
            at: deadline.into(),
            what: what.into(),
            since: Instant::now(),
        });
        self
    }

    /// The same backoff, giving up `within` from now (see [`Backoff::deadline`]).
    #[must_use]
    pub fn within(self, within: Duration, what: impl Into<String>) -> Self {
        self.deadline(Instant::now() + within, what)
    }

    /// The pause before the next try; each call grows the one after, up to the cap.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = match self.growth {
            Growth::Constant => self.next,
            Growth::Linear(step) => self.next.saturating_add(step),
            Growth::Doubling => self.next.saturating_mul(2),
        }
        .min(self.max);
        pause
    }

    /// Starts again from the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for the next pause, whatever the deadline.
    pub async fn pause(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }

    /// Sleeps for the next pause, unless the deadline has passed: then it is a [`TimedOut`],
    /// at once. Without a deadline, the same as [`Backoff::pause`].
    pub async fn wait(&mut self) -> Result<(), TimedOut> {
        self.check()?;
        self.pause().await;
        Ok(())
    }

    /// [`Backoff::wait`] for a thread that is not on the async runtime: it blocks the thread.
    pub fn wait_blocking(&mut self) -> Result<(), TimedOut> {
        self.check()?;
        std::thread::sleep(self.next_pause());
        Ok(())
    }

    /// Polls until `poll` yields something, pausing between polls, or until the deadline
    /// passes. `poll` runs at least once, and once more after its last pause: a condition met
    /// during the last pause is seen. To end the wait on an error, yield `Some(Err(…))`.
    pub async fn until<T, F, Fut>(mut self, mut poll: F) -> Result<T, TimedOut>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        loop {
            if let Some(value) = poll().await {
                return Ok(value);
            }
            self.wait().await?;
        }
    }

    /// [`Backoff::until`] for a thread that is not on the async runtime: it blocks the thread.
    pub fn until_blocking<T>(mut self, mut poll: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
        loop {
            if let Some(value) = poll() {
                return Ok(value);
            }
            self.wait_blocking()?;
        }
    }

    fn check(&self) -> Result<(), TimedOut> {
        match &self.deadline {
            Some(deadline) if Instant::now() >= deadline.at => Err(TimedOut {
                what: deadline.what.clone(),
                waited: deadline.since.elapsed(),
            }),
            _ => Ok(()),
        }
    }
}

impl Default for Backoff {
    /// [`Backoff::STARTUP`].
    fn default() -> Self {
        Self::exponential(Self::STARTUP.0, Self::STARTUP.1)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn millis(backoff: &mut Backoff, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| u64::try_from(backoff.next_pause().as_millis()).unwrap_or(u64::MAX))
            .collect()
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap_and_starts_again_after_a_reset() {
        let mut backoff = Backoff::default();
        assert_eq!(
            millis(&mut backoff, 7),
            [200, 400, 800, 1600, 3200, 5000, 5000]
        );
        backoff.reset();
        assert_eq!(backoff.next_pause(), Duration::from_millis(200));
    }

    #[test]
    fn a_constant_backoff_pauses_the_same_and_a_linear_one_grows_by_its_step() {
        let mut constant = Backoff::constant(Duration::from_millis(50));
        assert_eq!(millis(&mut constant, 3), [50, 50, 50]);
        let mut linear = Backoff::linear(Duration::from_millis(100), Duration::from_millis(50));
        assert_eq!(millis(&mut linear, 4), [100, 150, 200, 250]);
        linear.reset();
        assert_eq!(millis(&mut linear, 1), [100]);
    }

    /// Paused time: the poll is tried every pause until it yields, and the time spent is the
    /// pauses'.
    #[tokio::test(start_paused = true)]
    async fn until_polls_every_pause_until_the_condition_holds() {
        let started = Instant::now();
        let polls = Cell::new(0);
        let value = Backoff::constant(Duration::from_millis(100))
            .within(Duration::from_secs(10), "the thing")
            .until(|| {
                polls.set(polls.get() + 1);
                std::future::ready((polls.get() == 5).then_some("there"))
            })
            .await
            .unwrap();
        assert_eq!(value, "there");
        assert_eq!(polls.get(), 5);
        assert_eq!(started.elapsed(), Duration::from_millis(400));
    }

    /// Paused time: past the deadline the wait ends with an error that names what it waited
    /// for, after one last poll; without a deadline it goes on.
    #[tokio::test(start_paused = true)]
    async fn until_gives_up_at_its_deadline_naming_what_it_waited_for() {
        let polls = Cell::new(0);
        let err = Backoff::constant(Duration::from_millis(50))
            .within(Duration::from_secs(1), "the server to answer")
            .until(|| {
                polls.set(polls.get() + 1);
                std::future::ready(None::<()>)
            })
            .await
            .unwrap_err();
        assert_eq!(err.what, "the server to answer");
        assert_eq!(err.waited, Duration::from_secs(1));
        assert_eq!(polls.get(), 21);
        assert_eq!(err.to_string(), "the server to answer: not within 1s");

        let mut backoff = Backoff::constant(Duration::from_millis(50));
        for _ in 0..1000 {
            backoff.wait().await.unwrap();
        }
    }

    #[test]
    fn until_blocking_gives_up_at_its_deadline_and_yields_what_it_found() {
        let polls = Cell::new(0);
        let found = Backoff::constant(Duration::from_millis(1))
            .within(Duration::from_secs(10), "three polls")
            .until_blocking(|| {
                polls.set(polls.get() + 1);
                (polls.get() == 3).then_some(())
            });
        assert_eq!(found, Ok(()));
        let err = Backoff::constant(Duration::from_millis(1))
            .within(Duration::from_millis(20), "nothing")
            .until_blocking(|| None::<()>)
            .unwrap_err();
        assert_eq!(err.what, "nothing");
        assert!(err.waited >= Duration::from_millis(20), "{err:?}");
    }
}
