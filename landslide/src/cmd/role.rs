//! How a role starts: one sequence for `landslide ingest`, `dedup-worker` and `tally`, each alone
//! in its process ([`Role::run_alone`]), and the one call that runs a role ([`Role::run`]), which
//! `up` makes for all three roles in one process.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context as _;
use landslide_config::Shutdown;
use tokio::net::TcpListener;

use crate::cmd::args::Shared;

/// One role, configured, with where it serves its pages and API: `Role<SocketAddr>` before that
/// listener is bound, `Role` (`Role<TcpListener>`) after. A dedup-worker serves nothing but its
/// operations listener.
///
/// A role is made from its configuration, built and checked, so nothing can be bound before the
/// configuration is complete.
#[derive(Debug)]
pub enum Role<L = TcpListener> {
    Ingest(landslide_ingest::Config, L),
    DedupWorker(landslide_dedup_worker::Config),
    Tally(landslide_tally::Config, L),
}

impl Role<SocketAddr> {
    /// The startup of a role alone in its process: binds its listener (an address in use fails
    /// here, before the role starts), says loudly if a NATS server acks before it fsyncs
    /// (`--nats-monitor-url`), then runs the role until SIGINT or SIGTERM, with the operations
    /// listener (`/metrics`, `/healthz`) at `metrics_listen` beside it, if given.
    pub async fn run_alone(
        self,
        shared: &Shared,
        metrics_listen: Option<SocketAddr>,
    ) -> anyhow::Result<ExitCode> {
        let role = self.bind().await?;
        shared.check_sync().await;
        with_operations(metrics_listen, |shutdown| role.run(shutdown)).await?;
        Ok(ExitCode::SUCCESS)
    }

    async fn bind(self) -> anyhow::Result<Role> {
        Ok(match self {
            Role::Ingest(config, addr) => Role::Ingest(config, bind(addr).await?),
            Role::DedupWorker(config) => Role::DedupWorker(config),
            Role::Tally(config, addr) => Role::Tally(config, bind(addr).await?),
        })
    }
}

impl Role {
    /// Runs the role until `shutdown`, then drains it.
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        match self {
            Role::Ingest(config, listener) => {
                landslide_ingest::run(config, listener, shutdown).await
            }
            Role::DedupWorker(config) => landslide_dedup_worker::run(config, shutdown).await,
            Role::Tally(config, listener) => landslide_tally::run(config, listener, shutdown).await,
        }
    }
}

/// A listener on `addr`, or an error that names it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs a role until SIGINT or SIGTERM, with an operations listener (`/metrics`, `/healthz`) at
/// `metrics_listen` beside it, if given. The listener is bound first, so an address in use fails
/// before the role starts.
async fn with_operations<F>(
    metrics_listen: Option<SocketAddr>,
    role: impl FnOnce(Shutdown) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let shutdown = Shutdown::on_signal();
    match metrics_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            let operations = shutdown.clone().wait();
            landslide_telemetry::serve::with_operations(listener, operations, role(shutdown)).await
        }
        None => role(shutdown).await,
    }
}
