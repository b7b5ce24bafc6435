//! `landslide tally`: the results, as a live page and a JSON API.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use landslide_nats::User;
use landslide_schema::postgres::LoginRole;

use crate::cmd::args::{ClientIpArg, DatabaseArgs, HttpArgs, ReceiptKeyArg, Shared, millis};
use crate::cmd::role::Role;
use crate::keys;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address to serve HTTP on.
    #[arg(long, env = "LANDSLIDE_LISTEN", default_value = landslide_tally::DEFAULT_LISTEN)]
    listen: SocketAddr,
    #[command(flatten)]
    receipts: ReceiptKeyArg,
    /// Milliseconds between two refreshes of the results.
    #[arg(long, env = "LANDSLIDE_REFRESH_MS", default_value_t = millis(landslide_tally::DEFAULT_REFRESH))]
    refresh_ms: u64,
    /// Live result streams (server-sent events) served at once; one more gets 503 with
    /// Retry-After: 5 (landslide_tally_event_streams_refused_total{reason="cap"}). Each holds a
    /// connection: the unit allows 65,536 file descriptors.
    #[arg(long, env = "LANDSLIDE_MAX_EVENT_STREAMS", default_value_t = landslide_tally::DEFAULT_MAX_EVENT_STREAMS)]
    max_event_streams: usize,
    /// Live result streams one client address holds at once; one more gets 429 with
    /// Retry-After: 5 (reason="client"), so that one address cannot hold every stream of the cap.
    /// A viewer beyond it reads GET /api/results/<poll>.
    #[arg(long, env = "LANDSLIDE_MAX_EVENT_STREAMS_PER_CLIENT", default_value_t = landslide_tally::DEFAULT_MAX_EVENT_STREAMS_PER_CLIENT)]
    max_event_streams_per_client: usize,
    /// Receipt lookups per second per client address (a fraction is allowed); 0 turns the limit
    /// off. Beyond it: 429 with Retry-After, before the database is read. Each lookup is one
    /// indexed read with a 2 s statement timeout.
    #[arg(long, env = "LANDSLIDE_RECEIPT_RATE_LIMIT", default_value_t = landslide_tally::DEFAULT_RECEIPT_RATE_LIMIT.per_second())]
    receipt_rate_limit: f64,
    /// Receipt lookups one client address may send at once before the rate applies.
    #[arg(long, env = "LANDSLIDE_RECEIPT_RATE_BURST", default_value_t = landslide_tally::DEFAULT_RECEIPT_RATE_LIMIT.burst())]
    receipt_rate_burst: u32,
    #[command(flatten)]
    client_ip: ClientIpArg,
}

impl Args {
    fn config(&self) -> anyhow::Result<landslide_tally::Config> {
        let mut config = landslide_tally::Config::new(
            self.shared
                .connections(User::Tally, Some((&self.db, LoginRole::Tally)))?,
            keys::receipt_key(&self.receipts.file()?)?,
        );
        config.refresh = Duration::from_millis(self.refresh_ms.max(50));
        config.max_event_streams = self.max_event_streams;
        config.max_event_streams_per_client = self.max_event_streams_per_client;
        config.receipt_rate_limit =
            landslide_tally::RateLimit::new(self.receipt_rate_limit, self.receipt_rate_burst)
                .context(
                    "invalid --receipt-rate-limit or --receipt-rate-burst \
                     (LANDSLIDE_RECEIPT_RATE_LIMIT, LANDSLIDE_RECEIPT_RATE_BURST)",
                )?;
        config.client_ip_header = self.client_ip.header()?;
        config.http = self.http.limits();
        config.metrics = self.http.metrics();
        Ok(config)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    Role::Tally(args.config()?, args.listen)
        .run_alone(&args.shared, args.http.metrics_listen)
        .await
}
