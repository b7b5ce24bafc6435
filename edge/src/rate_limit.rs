//! A token bucket per client: ingest's vote endpoints (`POST /vote` and `POST /api/votes`
//! together: `LANDSLIDE_RATE_LIMIT` votes per second per client address, bursts of up to
//! `LANDSLIDE_RATE_BURST`) and tally's receipt lookups (`LANDSLIDE_RECEIPT_RATE_LIMIT`). A request
//! beyond it is refused with `429` and `Retry-After` before anything is done; the client may
//! retry.
//!
//! The bucket is governor's keyed GCRA limiter, one state (a `u64`) per client in a `DashMap`.
//! governor never forgets a key by itself, so [`Limiter::spawn_pruner`] drops every client whose
//! bucket has filled up again, every [`PRUNE_EVERY`]; and so does a check that finds the map
//! grown past [`PRUNE_AT`] and twice its size after the last pruning. Found by reading it: with
//! the timer alone, the map grew by one entry per request between two prunings, and a client
//! with a large IPv6 allocation is a new client (a new /64) with every request: some millions of
//! entries in 10 s at the rate a node refuses requests. Now it holds at most twice the clients
//! whose bucket is not full, or [`PRUNE_AT`]; a client with a full bucket behaves as a new one, so
//! forgetting it changes no answer.
//!
//! The limit is per process. The load balancers of the deployments hold a matching limit for
//! the whole deployment (compose/haproxy.cfg, vagrant/Vagrantfile, the WAF of aws-cfn/).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::client::Client;

/// How often clients with a full bucket are forgotten.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Clients remembered beyond which a check forgets those with a full bucket at once (when the map
/// has also doubled since the last pruning): some MB of state per process.
pub const PRUNE_AT: usize = 100_000;

/// Checks between two looks at the map's size (a look locks each of its shards in turn).
const LOOK_EVERY: u64 = 1024;

/// Requests per second per client address, and the burst a client may send at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    per_second: f64,
    burst: NonZeroU32,
}

impl RateLimit {
    /// 100 votes per second and bursts of 1,000 per client address: thousands of phones behind
    /// one carrier-grade NAT address all vote within the minute after the ad (OPERATIONS.md,
    /// "Limits that do not turn voters away", gives the reasoning).
    pub const DEFAULT: Self = Self::of(100.0, 1000);

    /// A limit written in the code (a default): checked at compile time when used in a
    /// constant, where a burst of 0 fails the build. [`RateLimit::new`] checks what is
    /// configured.
    pub const fn of(per_second: f64, burst: u32) -> Self {
        assert!(per_second > 0.0 && per_second <= 1e9, "a rate in (0, 10^9]");
        match NonZeroU32::new(burst) {
            Some(burst) => Self { per_second, burst },
            None => panic!("a burst of at least 1"),
        }
    }

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
    /// Checks so far, for [`LOOK_EVERY`].
    checks: AtomicU64,
    /// Clients remembered after the last pruning.
    after_prune: AtomicUsize,
    /// [`PRUNE_AT`], but for tests.
    prune_at: usize,
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
            checks: AtomicU64::new(0),
            after_prune: AtomicUsize::new(0),
            prune_at: PRUNE_AT,
        }
    }

    /// Takes a token from `client`'s bucket, or says how many whole seconds (at least 1) to wait
    /// before the next one: what `Retry-After` says.
    pub fn check(&self, client: &Client) -> Result<(), u64> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(LOOK_EVERY)
        {
            let clients = self.buckets.len();
            if clients
                > self
                    .prune_at
                    .max(2 * self.after_prune.load(Ordering::Relaxed))
            {
                metrics::counter!("landslide_rate_limit_early_prunes_total").increment(1);
                self.prune();
            }
        }
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
        self.after_prune
            .store(self.buckets.len(), Ordering::Relaxed);
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

    /// A new client per request (a new /64 of one large IPv6 allocation each time): the map
    /// stays bounded between two timed prunings.
    #[test]
    fn a_new_client_per_request_does_not_grow_the_map_without_bound() {
        let (mut limiter, clock) = limiter(100.0, 1000);
        limiter.prune_at = 2_000;
        let mut most = 0;
        for i in 0..200_000u128 {
            let ip = std::net::Ipv6Addr::from_bits((0x2001_0db8_u128 << 96) | (i << 64));
            limiter.check(&Client::of(ip.into())).unwrap();
            // 100,000 new clients a second; one request's token comes back in 10 ms.
            clock.advance(Duration::from_micros(10));
            most = most.max(limiter.clients());
        }
        // 1 ms of clients is not yet full again, and a look comes every 1024 checks.
        assert!(most <= 2_000 + 2 * 1024, "{most} clients remembered");
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
