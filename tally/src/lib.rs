//! Landslide's results: the live results page, the JSON API with its server-sent events, and the
//! audit that proves the database against the stream.
//!
//! One background task (module `snapshot`) reads the consumer's pending count and then the tally
//! sums every `refresh`, and publishes one immutable snapshot through a `tokio::sync::watch`
//! channel. Every HTTP handler and every live viewer only reads that channel, so the database sees
//! one query per refresh however many people watch.
//!
//! This crate must never write ballots or tallies, and never acknowledge, create or change a vote
//! message: it only reads what the dedup-workers committed. [`audit`] reads the whole stream, but
//! through an ephemeral consumer of its own.

pub use landslide_edge::{ClientIpHeader, RateLimit};
pub use landslide_schema::receipt::ReceiptKey;

pub mod audit;
pub mod certificate;
mod counts;
mod http;
mod receipts;
mod snapshot;
pub mod status;

pub use http::openapi;
pub use snapshot::Status;

use std::time::Duration;

use anyhow::Context as _;
use landslide_config::{Connections, Shutdown};
use landslide_nats::{Access, User};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the tally role needs; [`Config::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The broker (as the `tally` user), the database (required), the names; tally shows the
    /// polls bucket's latest revision, and never seeds it.
    pub connections: Connections,
    /// How often the snapshot is rebuilt; results are at most this old when the database is up.
    pub refresh: Duration,
    /// Live result streams (server-sent events) served at once; one more is refused with `503`
    /// and `Retry-After`. Each holds a connection (a file descriptor) for as long as its viewer
    /// stays, so the cap keeps a crowd of viewers from exhausting them.
    pub max_event_streams: usize,
    /// Live result streams one client holds at once; one more is refused with `429`: without
    /// it, one client could hold every stream of `max_event_streams`.
    pub max_event_streams_per_client: usize,
    /// Receipt lookups per client (each a read of the database); beyond it `429`. `None`: no
    /// limit.
    pub receipt_rate_limit: Option<RateLimit>,
    /// The header a trusted proxy sets to the client's address (`LANDSLIDE_CLIENT_IP_HEADER`,
    /// as ingest's); `None`: the client is the TCP peer.
    pub client_ip_header: Option<ClientIpHeader>,
    /// The HTTP server's header read timeout and connection cap.
    pub http: landslide_telemetry::serve::Limits,
    /// Whether `/metrics` is served with the results, or only on an operations listener of the
    /// process's own (`LANDSLIDE_METRICS_LISTEN`).
    pub metrics: landslide_telemetry::serve::MetricsAt,
    /// The key that authenticates receipts (`LANDSLIDE_RECEIPT_KEY_FILE`, the same as ingest's): a
    /// receipt it did not issue is answered `404`.
    pub receipt_key: ReceiptKey,
}

/// The default cap on live result streams: well under the 65,536 file descriptors tally's systemd
/// unit allows (`LimitNOFILE`), leaving room for the other connections.
pub const DEFAULT_MAX_EVENT_STREAMS: usize = 20_000;

/// Where tally serves HTTP unless told otherwise (`LANDSLIDE_LISTEN`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";
/// How often the counts are read again (`LANDSLIDE_REFRESH_MS`), whatever the number of viewers.
pub const DEFAULT_REFRESH: Duration = Duration::from_millis(500);

/// The default share of one client: 100 streams, so that a single address takes at most 1 in 200
/// of the default cap, while a household or an office behind one address (or, at 100, a good part
/// of a carrier-grade NAT's users watching at once) is served; beyond it a viewer reads
/// `GET /api/results/<poll>` instead.
pub const DEFAULT_MAX_EVENT_STREAMS_PER_CLIENT: usize = 100;

/// Receipt lookups per client address: 5 a second and bursts of 50. A voter looks one up now and
/// then; a crowd behind one carrier-grade NAT address looks up some a second. Each is one indexed
/// read on a pool of [`receipts::POOL_SIZE`] connections that a single client must not hold.
pub const DEFAULT_RECEIPT_RATE_LIMIT: RateLimit = RateLimit::of(5.0, 50);

impl Config {
    /// The default topology and polls, refreshed every 500 ms.
    pub fn new(connections: Connections, receipt_key: ReceiptKey) -> Self {
        Self {
            connections,
            receipt_key,
            refresh: DEFAULT_REFRESH,
            max_event_streams: DEFAULT_MAX_EVENT_STREAMS,
            max_event_streams_per_client: DEFAULT_MAX_EVENT_STREAMS_PER_CLIENT,
            receipt_rate_limit: Some(DEFAULT_RECEIPT_RATE_LIMIT),
            client_ip_header: None,
            http: landslide_telemetry::serve::Limits::DEFAULT,
            metrics: landslide_telemetry::serve::MetricsAt::default(),
        }
    }
}

/// Runs the tally role on `listener` until `shutdown` completes, then stops accepting, ends the
/// live event streams and waits for the requests in flight.
///
/// Waits, not ready, while PostgreSQL, NATS or JetStream cannot be reached; fails before serving
/// anything when the database's schema is older than this binary, or when the stream or consumer
/// exists with an incompatible definition.
pub async fn run(config: Config, listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    // Installs the metrics recorder now, so that the first refreshes are recorded too.
    landslide_telemetry::prometheus();
    let connections = &config.connections;
    let database = connections.database()?;
    let topology = &connections.topology;
    // Every wait is for as long as it takes, not ready meanwhile, and given up only on shutdown.
    let started = shutdown
        .starting("tally", async |startup| {
            // Connected directly first, with its own message: bb8 and friends report bad
            // credentials as a timeout. Tally reads only, and may not migrate: a schema older
            // than this binary stops it, naming `landslide migrate`.
            let conn = landslide_config::database_patiently(startup, || {
                landslide_schema::postgres::connect_current(database)
            })
            .await?;
            let client = landslide_nats::connect_patiently(
                &connections.nats,
                User::Tally,
                "landslide-tally",
                startup,
            )
            .await?;
            let js = async_nats::jetstream::new(client);
            // Waited for rather than skipped: without the consumer, `pending` would mean nothing.
            // Every partition's stream and consumer, with the K recorded (another is refused).
            landslide_nats::retry_startup("find the streams and the consumers", startup, || {
                landslide_nats::partitions::ensure_consumers(&js, topology, Access::ReadOnly)
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
            anyhow::Ok((conn, js, polls))
        })
        .await;
    let Some(started) = started else {
        return Ok(());
    };
    let (conn, js, polls) = started?;

    let (snapshots_tx, snapshots_rx) = watch::channel(None);
    let refresher =
        snapshot::Refresher::new(js, conn, database.clone(), polls.clone(), topology.clone());
    let refresher = tokio::spawn(refresher.run(config.refresh, snapshots_tx, shutdown.clone()));

    // Its connections are made as DATABASE_URL says, TLS included.
    let manager = landslide_schema::postgres::pool_manager(
        &database.with_statement_timeout(receipts::STATEMENT_TIMEOUT),
    );
    let db = diesel_async::pooled_connection::bb8::Pool::builder()
        .max_size(receipts::POOL_SIZE)
        .connection_timeout(Duration::from_secs(5))
        .build(manager)
        .await
        .context("cannot set up the database pool for receipts (DATABASE_URL)")?;
    let receipt_limiter = config
        .receipt_rate_limit
        .map(|limit| std::sync::Arc::new(landslide_edge::Limiter::new(limit)));
    let _pruner = receipt_limiter
        .as_ref()
        .map(landslide_edge::Limiter::spawn_pruner);
    let app = http::router(
        http::AppState {
            polls,
            db,
            receipts: config.receipt_key.clone(),
            event_streams: std::sync::Arc::new(tokio::sync::Semaphore::new(
                config.max_event_streams,
            )),
            stream_slots: landslide_edge::Slots::new(config.max_event_streams_per_client),
            receipt_limiter: receipt_limiter.clone(),
            client_ip_header: config.client_ip_header.clone(),
            snapshots: snapshots_rx,
            shutdown: shutdown.clone(),
            stale_after: (config.refresh * 5).max(Duration::from_secs(5)),
        },
        config.metrics,
    );
    tracing::info!(
        listen = %listener.local_addr().context("the listener has no local address")?,
        "tally serving results"
    );
    let served =
        landslide_telemetry::serve::serve(listener, app, config.http, shutdown.wait()).await;
    if served.is_err() {
        // Without a server nobody reads the snapshots: do not leave the refresher running.
        refresher.abort();
    }
    served.context("the HTTP server failed")?;
    refresher.await.context("the snapshot refresher panicked")?;
    tracing::info!("tally stopped");
    Ok(())
}
