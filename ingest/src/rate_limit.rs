//! The per-client token bucket of the vote endpoints (`POST /vote` and `POST /api/votes`
//! together): `LANDSLIDE_RATE_LIMIT` votes per second per client address, bursts of up to
//! `LANDSLIDE_RATE_BURST`. A vote beyond it is refused with `429` and `Retry-After` before
//! anything is stored; the voter may retry.
//!
//! The bucket is governor's keyed GCRA limiter, one state (a `u64`) per client in a `DashMap`.
//! governor never forgets a key by itself, so [`Limiter::spawn_pruner`] drops every client whose
//! bucket has filled up again (it has sent nothing for `burst ÷ rate`, 10 s by default): the map
//! holds at most the clients seen in the last `burst ÷ rate` + [`PRUNE_EVERY`], a few MB at
//! tens of thousands of new clients per second.
//!
//! The limit is per ingest node. The load balancers of the deployments hold a matching limit for
//! the whole deployment (compose/haproxy.cfg, vagrant/Vagrantfile, the WAF of aws-cfn/).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::client::Client;

/// How often clients with a full bucket are forgotten.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Votes per second per client address, and the burst a client may send at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: NonZeroU32,
}

impl RateLimit {
    /// 100 votes per second and bursts of 1,000 per client address: thousands of phones behind
    /// one carrier-grade NAT address all vote within the minute after the ad (README,
    /// "Limits that do not turn voters away", gives the reasoning).
    pub const DEFAULT: Self = Self {
        per_second: 100.0,
        // Evaluated at compile time: the `None` arm cannot be reached.
        burst: match NonZeroU32::new(1000) {
            Some(n) => n,
            None => unreachable!(),
        },
    };

    /// `per_second` votes per second (`0`: no limit, `None`) with bursts of `burst` (at least 1).
    /// A fraction is allowed (`0.5`: one vote every two seconds).
    pub fn new(per_second: f64, burst: u32) -> anyhow::Result<Option<Self>> {
        anyhow::ensure!(
            per_second.is_finite() && per_second >= 0.0,
            "the rate limit must be a number of votes per second, 0 or more (0 turns it off)"
        );
        anyhow::ensure!(
            per_second <= 1e9,
            "a rate limit above 10^9 votes per second is no limit: use 0 to turn it off"
        );
        if per_second == 0.0 {
            return Ok(None);
        }
        let burst = NonZeroU32::new(burst).ok_or_else(|| {
            anyhow::anyhow!(
                "the burst must be at least 1 vote (turn the limit off with a rate of 0)"
            )
        })?;
        Ok(Some(Self { per_second, burst }))
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        // `with_period` is `None` only for a zero period, which `max` rules out.
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(self.burst)
    }
}

/// One token bucket per client.
pub struct Limiter<C: Clock = DefaultClock> {
    buckets: RateLimiter<Client, DashMapStateStore<Client>, C, NoOpMiddleware<C::Instant>>,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("clients", &self.buckets.len())
            .finish()
    }
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Self {
        Self::with_clock(limit, DefaultClock::default())
    }

    /// Forgets the clients whose bucket is full again, every [`PRUNE_EVERY`], until the returned
    /// guard is dropped (with the node).
    pub fn spawn_pruner(self: &Arc<Self>) -> Pruner {
        let limiter = Arc::clone(self);
        Pruner(tokio::spawn(async move {
            let mut every = tokio::time::interval(PRUNE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                limiter.prune();
            }
        }))
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(limit: RateLimit, clock: C) -> Self {
        Self {
            buckets: RateLimiter::dashmap_with_clock(limit.quota(), clock),
        }
    }

    /// Takes a token from `client`'s bucket, or says how many whole seconds (at least 1) to wait
    /// before the next one: what `Retry-After` says.
    pub fn check(&self, client: &Client) -> Result<(), u64> {
        self.buckets.check_key(client).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.buckets.clock().now());
            // Rounded up, so that a client that waits as told finds a token.
            wait.as_secs()
                .saturating_add(u64::from(wait.subsec_nanos() > 0))
                .max(1)
        })
    }

    /// Forgets every client whose bucket is full again: it behaves as a new client would.
    pub fn prune(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    /// Clients remembered.
    pub fn clients(&self) -> usize {
        self.buckets.len()
    }
}

/// The pruning task; stops when dropped.
#[derive(Debug)]
pub struct Pruner(tokio::task::JoinHandle<()>);

impl Drop for Pruner {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn client(ip: &str) -> Client {
        Client::of(ip.parse().unwrap())
    }

    fn limiter(per_second: f64, burst: u32) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limit = RateLimit::new(per_second, burst).unwrap().unwrap();
        (Limiter::with_clock(limit, clock.clone()), clock)
    }

    #[test]
    fn a_burst_passes_then_the_client_waits_whole_seconds_and_others_are_not_affected() {
        let (limiter, clock) = limiter(1.0, 2);
        let a = client("192.0.2.1");
        assert_eq!(limiter.check(&a), Ok(()));
        assert_eq!(limiter.check(&a), Ok(()));
        assert_eq!(limiter.check(&a), Err(1));
        assert_eq!(limiter.check(&client("192.0.2.2")), Ok(()));
        clock.advance(Duration::from_millis(999));
        assert_eq!(limiter.check(&a), Err(1), "a part of a second rounds up");
        clock.advance(Duration::from_millis(1));
        assert_eq!(limiter.check(&a), Ok(()));
        assert_eq!(limiter.check(&a), Err(1));
    }

    #[test]
    fn retry_after_is_the_wait_for_one_token_rounded_up() {
        let (limiter, clock) = limiter(0.4, 1);
        let a = client("192.0.2.1");
        assert_eq!(limiter.check(&a), Ok(()));
        assert_eq!(limiter.check(&a), Err(3), "2.5 s to the next token");
        clock.advance(Duration::from_millis(2500));
        assert_eq!(limiter.check(&a), Ok(()));
    }

    #[test]
    fn pruning_forgets_only_clients_whose_bucket_is_full_again() {
        let (limiter, clock) = limiter(10.0, 20);
        for i in 0..50u8 {
            limiter.check(&client(&format!("192.0.2.{i}"))).unwrap();
        }
        clock.advance(Duration::from_secs(1));
        let busy = client("198.51.100.1");
        for _ in 0..20 {
            limiter.check(&busy).unwrap();
        }
        clock.advance(Duration::from_secs(1));
        limiter.prune();
        // The 50 sent one vote 2 s ago, long enough to refill 1 token; `busy` emptied its
        // bucket 1 s ago and has refilled only 10 of 20.
        assert_eq!(limiter.clients(), 1);
        assert_eq!(limiter.check(&busy), Ok(()));
    }

    #[test]
    fn zero_turns_the_limit_off_and_nonsense_is_refused() {
        assert_eq!(RateLimit::new(0.0, 1000).unwrap(), None);
        assert!(RateLimit::new(-1.0, 10).is_err());
        assert!(RateLimit::new(f64::NAN, 10).is_err());
        assert!(RateLimit::new(f64::INFINITY, 10).is_err());
        assert!(RateLimit::new(5.0, 0).is_err());
        assert_eq!(
            RateLimit::new(100.0, 1000).unwrap(),
            Some(RateLimit::DEFAULT)
        );
    }
}
