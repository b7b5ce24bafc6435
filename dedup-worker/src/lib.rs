//! The dedup-worker (stub: being written).
use std::future::Future;
use std::time::Duration;

use landslide_nats::Topology;
use landslide_schema::Polls;

/// Configuration of one worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    pub database_url: String,
    pub topology: Topology,
    pub polls: Polls,
    /// Most messages in one transaction.
    pub batch_size: usize,
    /// Longest wait to fill a batch once its first message is in hand.
    pub batch_wait: Duration,
}

impl Config {
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            database_url: database_url.into(),
            topology: Topology::default(),
            polls: Polls::default(),
            batch_size: 1000,
            batch_wait: Duration::from_millis(20),
        }
    }
}

/// Drains the consumer until `shutdown` completes, then finishes the batch in hand.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let _ = config;
    shutdown.await;
    Ok(())
}
