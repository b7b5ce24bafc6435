//! The ingest node: serves the voting form and the JSON API, stamps each vote with the hybrid
//! logical clock, publishes it to `votes.<node id>` and answers only once JetStream has stored it.
//!
//! It keeps no state of its own beyond the last stamp it issued and the last comparison of its
//! clock with the NATS server's: everything about a voter travels in the signed voter cookie,
//! everything about a vote in the stream. It must never answer 2xx for a vote that JetStream has
//! not acknowledged, never stamp a vote while its clock is off from the NATS server's (the workers
//! would dead-letter what it stamps too far ahead), and never let a bad request, a forged cookie
//! or a broker outage crash it.
use std::sync::Arc;
use std::time::Duration;

use landslide_config::{Connections, Shutdown};
use landslide_nats::{Access, User};
use landslide_schema::NodeId;
use secrecy::{ExposeSecret, SecretString};

pub mod clock;
mod http;
mod publish;
mod voter;
pub use clock::{Clock, MaxClockOffset, SystemClock};
pub use http::openapi;
pub use landslide_edge::ClientIpHeader;
pub use landslide_edge::RateLimit;
pub use landslide_schema::receipt::ReceiptKey;

/// A key of at least [`HmacKey::MIN_LEN`] bytes: a cookie key, or the voter-id key. Never logged:
/// it is a [`SecretString`], whose `Debug` shows none of it.
#[derive(Debug, Clone)]
pub struct HmacKey(SecretString);

impl HmacKey {
    pub const MIN_LEN: usize = 32;
    pub fn new(s: impl Into<String>) -> anyhow::Result<Self> {
        let s = SecretString::from(s.into());
        anyhow::ensure!(
            s.expose_secret().len() >= Self::MIN_LEN,
            "a key must be at least {} bytes long (48 random bytes in base64 will do: \
             `head -c 48 /dev/urandom | base64`)",
            Self::MIN_LEN
        );
        Ok(Self(s))
    }
}

impl ExposeSecret<str> for HmacKey {
    fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

/// The keys of the voter cookie (`LANDSLIDE_COOKIE_KEYS_FILE`, one per line): the first signs,
/// every one verifies. A key is rotated in two phases, so that no node ever meets a cookie it
/// cannot verify (which would make its voter a new one, counted twice): first the new key is
/// added after the signing one on every node, then it is moved first on every node; the old key
/// goes once the polls it served have closed (SECURITY.md, "Rotating the cookie keys").
#[derive(Debug, Clone)]
pub struct CookieKeys {
    signing: HmacKey,
    verify_only: Vec<HmacKey>,
}

impl CookieKeys {
    pub fn new(signing: HmacKey, verify_only: Vec<HmacKey>) -> Self {
        Self {
            signing,
            verify_only,
        }
    }

    /// The keys in file order: the first signs. None is an error.
    pub fn from_lines(keys: impl IntoIterator<Item = HmacKey>) -> anyhow::Result<Self> {
        let mut keys = keys.into_iter();
        let signing = keys
            .next()
            .ok_or_else(|| anyhow::anyhow!("no cookie key: the first line signs"))?;
        Ok(Self::new(signing, keys.collect()))
    }

    pub fn signing(&self) -> &HmacKey {
        &self.signing
    }

    pub fn verify_only(&self) -> &[HmacKey] {
        &self.verify_only
    }
}

/// The key that the voter and event ids of cookie-less keyed votes derive from
/// (`LANDSLIDE_VOTER_ID_KEY_FILE`): apart from the cookie keys, so that rotating those never
/// changes an id. It is the same on every node and is never changed while a poll is open: a
/// retry across the change would be another voter.
#[derive(Debug, Clone)]
pub struct VoterIdKey(pub HmacKey);

/// The keys an ingest node holds, and no other role but tally's share of `receipts`.
#[derive(Debug, Clone)]
pub struct Keys {
    pub cookies: CookieKeys,
    pub voter_ids: VoterIdKey,
    /// The key that authenticates the receipts this node issues (`LANDSLIDE_RECEIPT_KEY_FILE`,
    /// the same as tally's).
    pub receipts: ReceiptKey,
}

/// The longest wait for the NATS client's last flush at shutdown.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// Configuration of one ingest node.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: NodeId,
    /// The broker (as the `ingest` user), the names and the polls. The node never seeds the
    /// polls bucket or creates a stream: it waits for a worker to have set them up.
    pub connections: Connections,
    pub keys: Keys,
    /// The wall clock that stamps votes; tests skew it.
    pub clock: Arc<dyn Clock>,
    /// How far `clock` may be from the NATS server's while the node takes votes.
    pub max_clock_offset: MaxClockOffset,
    /// How long one publish waits for its JetStream ack.
    pub publish_timeout: Duration,
    /// Publish attempts (same messages) before answering 503.
    pub publish_attempts: u32,
    /// The longest a vote waits for its ack, queue included, before it is answered 503
    /// (`publish::Publisher`): below the load balancer's timeout.
    pub vote_deadline: Duration,
    /// Atomic batches in flight at once; `None`: [`Config::batches_in_flight`]'s choice.
    pub publish_batches: Option<usize>,
    /// Mark the voter cookie `Secure` (serve over HTTPS, or behind a TLS load balancer): it is
    /// then `__Host-landslide_voter`, the only one read, and the site sends HSTS.
    pub secure_cookie: bool,
    /// With `secure_cookie`, until when the plain `landslide_voter` is still read where no
    /// `__Host-` one is present (`voter::CookieRule::plain_until`); never when `None`.
    pub plain_cookie_until: Option<chrono::DateTime<chrono::Utc>>,
    /// Where the results are (tally's page), for the form's link when a poll is not open.
    pub results_url: Option<String>,
    /// The HTTP server's header read timeout and connection cap.
    pub http: landslide_telemetry::serve::Limits,
    /// Whether `/metrics` is served with the form, or only on an operations listener of the
    /// process's own (`LANDSLIDE_METRICS_LISTEN`).
    pub metrics: landslide_telemetry::serve::MetricsAt,
    /// Votes per client address on this node (`LANDSLIDE_RATE_LIMIT`, `LANDSLIDE_RATE_BURST`);
    /// `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// The header a trusted proxy sets to the client's address (`LANDSLIDE_CLIENT_IP_HEADER`);
    /// `None`: the client is the TCP peer.
    pub client_ip_header: Option<ClientIpHeader>,
    /// The vote partition this node publishes to (`LANDSLIDE_PARTITION`); `None`: the one its id
    /// hashes to ([`landslide_nats::partitions::node_partition`]).
    pub partition: Option<u16>,
}

/// Where a node serves HTTP unless told otherwise (`LANDSLIDE_LISTEN`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How long one publish waits for its JetStream ack (`LANDSLIDE_PUBLISH_TIMEOUT_MS`).
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Publish attempts, with the same message id, before a vote is answered 503
/// (`LANDSLIDE_PUBLISH_ATTEMPTS`).
pub const DEFAULT_PUBLISH_ATTEMPTS: u32 = 3;
/// How long a vote waits for its ack, queue included (`LANDSLIDE_VOTE_DEADLINE_MS`): below the
/// balancers' timeouts (HAProxy's `timeout server` of 30 s, the ALB's idle timeout of 60 s).
pub const DEFAULT_VOTE_DEADLINE: Duration = Duration::from_secs(10);

impl Config {
    /// Defaults for everything but the identity, the broker and the keys.
    pub fn new(node_id: NodeId, connections: Connections, keys: Keys) -> Self {
        Self {
            node_id,
            connections,
            keys,
            clock: Arc::new(SystemClock::default()),
            max_clock_offset: MaxClockOffset::DEFAULT,
            publish_timeout: DEFAULT_PUBLISH_TIMEOUT,
            publish_attempts: DEFAULT_PUBLISH_ATTEMPTS,
            vote_deadline: DEFAULT_VOTE_DEADLINE,
            publish_batches: None,
            secure_cookie: false,
            plain_cookie_until: None,
            results_url: None,
            http: landslide_telemetry::serve::Limits::DEFAULT,
            metrics: landslide_telemetry::serve::MetricsAt::default(),
            rate_limit: Some(RateLimit::DEFAULT),
            client_ip_header: None,
            partition: None,
        }
    }

    /// The partition this node publishes to, of the `partitions` the deployment records.
    pub fn partition_of(&self, partitions: u16) -> anyhow::Result<u16> {
        match self.partition {
            None => Ok(landslide_nats::partitions::node_partition(
                &self.node_id,
                partitions,
            )),
            Some(p) if p < partitions => Ok(p),
            Some(p) => anyhow::bail!(
                "--partition {p} (LANDSLIDE_PARTITION) is not one of the deployment's {partitions} \
                 vote partitions, 0 to {}",
                partitions - 1
            ),
        }
    }
}

impl Config {
    /// Atomic batches of votes in flight at once. One on an R1 stream: the server stores one
    /// batch at a time and sets each up in a file store of its own (about 1 ms), so a second batch
    /// in flight only waits, and makes both smaller (`landslide-bench sweep`: no gain in msg/s
    /// from 1 to 16 in flight; the benchmark's p50 at a quarter of saturation was 7.5 ms with 4).
    /// Four on R3, which stages batches in memory and lets RAFT pipeline them (batches of 10:
    /// 6,600 → 24,000 msg/s from 1 to 16 in flight). The stream allows
    /// `max_inflight_per_stream` open batches from all nodes together (256 in nats/*.conf; the
    /// server's default is 50).
    pub fn batches_in_flight(&self) -> usize {
        match self.publish_batches {
            Some(n) => n.max(1),
            None if self.connections.topology.replicas <= 1 => 1,
            None => 4,
        }
    }
}

/// Serves the node on `listener` until `shutdown` completes, then drains: no accepted request is
/// cut off, and every publish in flight gets its answer.
pub async fn run(
    mut config: Config,
    listener: tokio::net::TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    // Install the metrics recorder before the first vote is counted.
    landslide_telemetry::prometheus();
    let connections = &config.connections;
    let topology = &connections.topology;
    let config_ref = &config;
    // Waited for as long as it takes, not ready meanwhile, and given up only on shutdown.
    let started = shutdown
        .starting("ingest", async |startup| {
            let client = landslide_nats::connect_patiently(
                &connections.nats,
                User::Ingest,
                &format!("landslide-ingest-{}", config.node_id),
                startup,
            )
            .await?;
            let js = publish::jetstream_context(client.clone(), config_ref);
            // The deployment's partitions as recorded (a K other than this node's is refused),
            // then this node's partition's stream, which a worker creates before it records K.
            let recorded = landslide_nats::retry_startup("find the votes stream", startup, || {
                landslide_nats::partitions::ensure(&js, topology, Access::ReadOnly)
            })
            .await?;
            let partition = topology.partition(config_ref.partition_of(recorded.partitions)?);
            landslide_nats::retry_startup("find the partition's stream", startup, || {
                landslide_nats::ensure_votes_stream(&js, &partition, Access::ReadOnly)
            })
            .await?;
            let polls = landslide_nats::polls::watch_patiently(
                &js,
                topology,
                &connections.polls,
                Access::ReadOnly,
                startup,
            )
            .await?;
            anyhow::Ok((client, js, polls, partition))
        })
        .await;
    let Some(started) = started else {
        return Ok(());
    };
    let (client, js, polls, partition) = started?;
    // From here on the node's names are its partition's: where it publishes, reads back and
    // checks its clock against the stream leader's.
    config.connections.topology = partition;
    let topology = &config.connections.topology;
    let clock = Arc::new(clock::ClockCheck::new(
        config.clock.clone(),
        config.max_clock_offset,
    ));
    let clock_watch = tokio::spawn(
        clock
            .clone()
            .watch(js.clone(), config.connections.topology.votes_stream.clone()),
    );
    let limiter = config
        .rate_limit
        .map(|limit| Arc::new(landslide_edge::Limiter::new(limit)));
    // Stops with this function, however it returns.
    let _pruner = limiter.as_ref().map(landslide_edge::Limiter::spawn_pruner);
    let state = http::AppState::new(&config, polls, client.clone(), js, clock, limiter);
    let app = http::router(state, config.metrics);
    tracing::info!(
        node = %config.node_id,
        listen = %listener.local_addr()?,
        stream = %topology.votes_stream,
        subject = %landslide_schema::subject::vote_subject(&topology.votes_prefix, &config.node_id),
        rate_limit.per_second = config.rate_limit.map_or(0.0, |l| l.per_second()),
        rate_limit.burst = config.rate_limit.map_or(0, |l| l.burst()),
        client_ip_header = config.client_ip_header.as_ref().map_or("(the TCP peer)", |h| h.as_str()),
        "ingest node serving"
    );
    let served =
        landslide_telemetry::serve::serve(listener, app, config.http, shutdown.wait()).await;
    clock_watch.abort();
    served.map_err(|e| anyhow::anyhow!("ingest server failed: {e}"))?;
    // Every handler has returned, so every publish has its ack; flush what the client still buffers.
    // Bounded: with the server gone, a flush waits for a reconnection that may never come, and
    // the node would never exit (found when stopping a Compose stack). Nothing unacked is lost.
    match tokio::time::timeout(SHUTDOWN_FLUSH, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "flushing the NATS client at shutdown failed"),
        Err(_) => tracing::warn!("NATS did not answer the flush at shutdown; exiting anyway"),
    }
    tracing::info!(node = %config.node_id, "ingest node stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every secret a node is given is a `secrecy` one: none shows in its configuration's
    /// `Debug`, nor in the keys derived from them.
    #[test]
    fn a_nodes_configuration_shows_none_of_its_secrets() {
        let secrets = [
            "the-nats-password-of-the-ingest-user",
            "the-signing-cookie-key-of-at-least-32-bytes",
            "a-verify-only-cookie-key-of-at-least-32-bytes",
            "the-voter-id-key-of-at-least-32-bytes-long",
            "the-receipt-key-of-at-least-32-bytes-long",
        ];
        let [password, signing, verify_only, voter_ids, receipts] = secrets;
        let key = |key: &str| HmacKey::new(key).unwrap();
        let keys = Keys {
            cookies: CookieKeys::new(key(signing), vec![key(verify_only)]),
            voter_ids: VoterIdKey(key(voter_ids)),
            receipts: ReceiptKey::new(receipts).unwrap(),
        };
        let nats =
            landslide_nats::NatsConfig::user("nats://127.0.0.1:4222", "ingest", password, None);
        let config = Config::new(
            NodeId::parse("web1").unwrap(),
            Connections::new(nats, None),
            keys.clone(),
        );
        let derived = voter::VoterKeys::new(&keys.cookies, &keys.voter_ids);
        let shown = format!("{config:?} {derived:?}");
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("[REDACTED]"), "{shown}");
    }
}
