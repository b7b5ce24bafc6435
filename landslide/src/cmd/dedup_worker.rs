//! `landslide dedup-worker`: one dedup-worker, from the votes stream to ballots and tallies.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use landslide_nats::User;
use landslide_schema::postgres::LoginRole;

use crate::cmd::args::{DatabaseArgs, Shared, millis};
use crate::cmd::role::Role;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Most messages per transaction (1–1000, the consumer's max_batch).
    #[arg(long, env = "LANDSLIDE_BATCH_SIZE", default_value_t = landslide_dedup_worker::DEFAULT_BATCH_SIZE)]
    batch_size: usize,
    /// Longest wait, in milliseconds, to fill a batch.
    #[arg(long, env = "LANDSLIDE_BATCH_WAIT_MS", default_value_t = millis(landslide_dedup_worker::DEFAULT_BATCH_WAIT))]
    batch_wait_ms: u64,
    /// Address to serve /metrics, /healthz and /readyz on (a worker has no other listener).
    #[arg(
        long,
        env = "LANDSLIDE_METRICS_LISTEN",
        default_value = landslide_dedup_worker::DEFAULT_METRICS_LISTEN
    )]
    metrics_listen: SocketAddr,
}

impl Args {
    fn config(&self) -> anyhow::Result<landslide_dedup_worker::Config> {
        // The consumer's `max_batch` (nats/dedup-worker-consumer.json) refuses larger pulls.
        anyhow::ensure!(
            (1..=1000).contains(&self.batch_size),
            "--batch-size (LANDSLIDE_BATCH_SIZE) must be between 1 and 1000, the consumer's max_batch"
        );
        let mut config = landslide_dedup_worker::Config::new(
            self.shared
                .connections(User::Worker, Some((&self.db, LoginRole::Worker)))?,
        );
        config.batch_size = self.batch_size;
        config.batch_wait = Duration::from_millis(self.batch_wait_ms);
        Ok(config)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    Role::DedupWorker(args.config()?)
        .run_alone(&args.shared, Some(args.metrics_listen))
        .await
}
