//! `landslide ingest`: one ingest node, the voting form and API.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use landslide_nats::User;
use landslide_schema::NodeId;

use crate::cmd::args::{ClientLimitArgs, HttpArgs, KeyArgs, Shared, millis, required};
use crate::cmd::role::Role;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    limits: ClientLimitArgs,
    /// This node's id; its votes go to subject votes.<ID>. Required.
    #[arg(long, env = "LANDSLIDE_NODE_ID")]
    node_id: Option<String>,
    /// The vote partition this node publishes to, 0 to LANDSLIDE_VOTE_PARTITIONS - 1 (default:
    /// the one its id hashes to). Set it where a few nodes would otherwise share the partitions
    /// unevenly: one node per partition, say.
    #[arg(long, env = "LANDSLIDE_PARTITION")]
    partition: Option<u16>,
    /// Address to serve HTTP on.
    #[arg(long, env = "LANDSLIDE_LISTEN", default_value = landslide_ingest::DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    keys: KeyArgs,
    /// Milliseconds one publish waits for its JetStream ack.
    #[arg(long, env = "LANDSLIDE_PUBLISH_TIMEOUT_MS", default_value_t = millis(landslide_ingest::DEFAULT_PUBLISH_TIMEOUT))]
    publish_timeout_ms: u64,
    /// Publish attempts, with the same message id, before answering 503.
    #[arg(long, env = "LANDSLIDE_PUBLISH_ATTEMPTS", default_value_t = landslide_ingest::DEFAULT_PUBLISH_ATTEMPTS)]
    publish_attempts: u32,
    /// Milliseconds a vote waits for its ack, queue and retries included: past it, 503 with
    /// Retry-After and the voter cookie (a vote not yet sent is never sent). Keep it below the
    /// load balancer's timeout (HAProxy 30 s, the ALB 60 s), or the voter gets the balancer's 504
    /// without a cookie.
    #[arg(long, env = "LANDSLIDE_VOTE_DEADLINE_MS", default_value_t = millis(landslide_ingest::DEFAULT_VOTE_DEADLINE))]
    vote_deadline_ms: u64,
    /// Atomic batches of votes in flight at once (group commit); default 1 on an R1 stream (a
    /// second only waits), 4 on R3 (they pipeline). Nodes × this must stay within the stream's
    /// max_inflight_per_stream (256 in nats/*.conf).
    #[arg(long, env = "LANDSLIDE_PUBLISH_BATCHES")]
    publish_batches: Option<usize>,
    /// Mark the voter cookie Secure (when served over HTTPS): it is then __Host-landslide_voter,
    /// the only one read, and the site sends HSTS.
    #[arg(long, env = "LANDSLIDE_SECURE_COOKIE")]
    secure_cookie: bool,
    /// With --secure-cookie, until when (RFC 3339) the plain landslide_voter cookie of voters
    /// from before the switch is still read, where no __Host- one is present.
    #[arg(long, env = "LANDSLIDE_PLAIN_COOKIE_UNTIL", value_parser = rfc3339)]
    plain_cookie_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The results page (tally), linked from the form when a poll is not open yet or closed.
    #[arg(long, env = "LANDSLIDE_RESULTS_URL")]
    results_url: Option<String>,
    /// Milliseconds this node's clock may be off, either way, from the clock of the nats-server
    /// that stores the votes (the stream's leader), compared every 2 s; beyond it, /readyz
    /// answers 503 naming the offset and votes get 503. More than 0 and less than the workers'
    /// 300000 ms tolerance (OPERATIONS.md, "Clocks"), or the node does not start.
    #[arg(long, env = "LANDSLIDE_MAX_CLOCK_OFFSET_MS", default_value_t = millis(landslide_ingest::MaxClockOffset::DEFAULT.get()))]
    max_clock_offset_ms: u64,
    /// Test and drill only: shift this node's clock by this many milliseconds.
    #[arg(
        long,
        env = "LANDSLIDE_CLOCK_OFFSET_MS",
        default_value_t = 0,
        hide = true,
        allow_negative_numbers = true
    )]
    clock_offset_ms: i64,
}

impl Args {
    fn config(&self) -> anyhow::Result<landslide_ingest::Config> {
        let node_id = required(self.node_id.as_deref(), "--node-id", "LANDSLIDE_NODE_ID")?;
        let node_id = NodeId::parse(node_id)
            .with_context(|| format!("invalid --node-id {node_id:?} (LANDSLIDE_NODE_ID)"))?;
        let mut config = landslide_ingest::Config::new(
            node_id,
            self.shared.connections(User::Ingest, None)?,
            self.keys.files()?.read()?,
        );
        config.clock = Arc::new(landslide_ingest::SystemClock {
            offset_ms: self.clock_offset_ms,
        });
        config.max_clock_offset =
            landslide_ingest::MaxClockOffset::from_millis(self.max_clock_offset_ms)?;
        config.publish_timeout = Duration::from_millis(self.publish_timeout_ms.max(1));
        config.publish_attempts = self.publish_attempts.max(1);
        config.vote_deadline = Duration::from_millis(self.vote_deadline_ms.max(100));
        config.publish_batches = self.publish_batches;
        config.secure_cookie = self.secure_cookie;
        config.plain_cookie_until = self.plain_cookie_until;
        config.results_url = self.results_url.clone();
        config.http = self.http.limits();
        config.metrics = self.http.metrics();
        (config.rate_limit, config.client_ip_header) = self.limits.settings()?;
        config.partition = self.partition;
        Ok(config)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    Role::Ingest(args.config()?, args.listen)
        .run_alone(&args.shared, args.http.metrics_listen)
        .await
}

/// A moment with its offset, such as `2026-12-06T20:00:00Z`.
fn rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 date-time with an offset: {e}"))
}
