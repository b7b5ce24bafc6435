//! What every role is given, built once: [`Connections`] (how to reach the broker and the
//! database, the names of the streams, the poll definitions) and [`Shutdown`] (when to stop).
//!
//! `landslide` builds both from flags and the environment, `landslide up` and the tests build
//! them in code; every role (`ingest`, `dedup-worker`, `tally`, audit, replay, status) takes the
//! same two types, so a setting added here reaches all of them.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use anyhow::Context as _;
use landslide_nats::{NatsConfig, Topology};
use landslide_schema::Polls;
use landslide_schema::postgres::DatabaseUrl;
use landslide_telemetry::readiness::Condition;
use tokio::sync::watch;

/// How a role reaches NATS and PostgreSQL, and the names and polls of the deployment.
#[derive(Debug, Clone)]
pub struct Connections {
    /// The broker: servers, credentials, TLS.
    pub nats: NatsConfig,
    /// The database (`DATABASE_URL`, TLS by its `sslmode`); `None` for roles without one (ingest).
    pub database: Option<DatabaseUrl>,
    /// The names of the streams, subjects, consumer and bucket, and the replica count.
    pub topology: Topology,
    /// The poll definitions that seed the polls bucket when it is empty; once it holds a
    /// revision, the bucket is what every role goes by.
    pub polls: Polls,
}

impl Connections {
    /// The default names and polls, on `nats` and `database`.
    pub fn new(nats: NatsConfig, database: Option<DatabaseUrl>) -> Self {
        Self {
            nats,
            database,
            topology: Topology::default(),
            polls: Polls::default(),
        }
    }

    /// The database, or an error naming `DATABASE_URL` for a role that needs one.
    pub fn database(&self) -> anyhow::Result<&DatabaseUrl> {
        self.database
            .as_ref()
            .context("DATABASE_URL is not set (or pass --database-url)")
    }

    /// The same, connecting to the broker with other credentials (`landslide up` gives each
    /// role its own user).
    pub fn with_nats_credentials(&self, credentials: landslide_nats::Credentials) -> Self {
        Self {
            nats: self.nats.with_credentials(credentials),
            ..self.clone()
        }
    }
}

/// When a role should stop: a signal that many roles (and many tasks of one role) wait on.
/// Completes once [`Trigger::stop`] is called or the [`Trigger`] is dropped.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Asks every clone of its [`Shutdown`] to stop; dropping it does too.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

impl Shutdown {
    /// A shutdown and the trigger that sets it off.
    pub fn new() -> (Trigger, Self) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Self(rx))
    }

    /// A shutdown set off by SIGINT (Ctrl-C) or SIGTERM: what the `landslide` binary's roles get.
    pub fn on_signal() -> Self {
        let (trigger, shutdown) = Self::new();
        tokio::spawn(async move {
            signal().await;
            tracing::info!("shutdown requested; draining");
            trigger.stop();
        });
        shutdown
    }

    /// Whether shutdown was asked for.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Completes once shutdown is asked for.
    pub async fn wait(mut self) {
        // An error means the trigger is gone: that asks for shutdown too.
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// A role's startup: `work`, given a readiness condition of `role` that is not ready until
    /// `work` returns (`/readyz` of the operations listener says what it waits for), unless
    /// shutdown is asked for first (`None`, logged). Every wait inside `work` may last as long as
    /// a broker or a database is away ([`landslide_telemetry::patience`]).
    pub async fn starting<T>(
        &self,
        role: &'static str,
        work: impl AsyncFnOnce(&Condition) -> anyhow::Result<T>,
    ) -> Option<anyhow::Result<T>> {
        let startup = landslide_telemetry::readiness::condition(role, "startup", "starting");
        let started = self.unless(work(&startup)).await;
        if started.is_none() {
            tracing::info!(role, "shutdown asked for while starting; stopped");
        }
        started
    }

    /// Runs `work` unless shutdown is asked for first: `None` then, and `work` is dropped. For
    /// the waits of a role's startup, which last as long as a broker or a database is away, and
    /// must never outlast a SIGTERM. Never use it on a database transaction: dropping one midway
    /// does not roll it back (design section 5).
    pub async fn unless<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.clone().wait() => None,
            out = work => Some(out),
        }
    }
}

impl IntoFuture for Shutdown {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

impl Trigger {
    /// Asks every clone of the shutdown to stop.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

/// A role's database connection at startup: `connect` (which checks the schema against this
/// binary, `landslide_schema::postgres::check_schema`) retried for as long as PostgreSQL is away
/// (`landslide_telemetry::patience`), with `startup` not ready meanwhile. A schema older than the
/// binary is not waited for: the role's user may not migrate it (`landslide migrate` does).
pub async fn database_patiently<T, F, Fut>(startup: &Condition, connect: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    landslide_telemetry::patience::patiently(
        "connect to PostgreSQL",
        startup,
        |e| {
            e.downcast_ref::<landslide_schema::postgres::SchemaNotCurrent>()
                .is_some()
        },
        connect,
    )
    .await
}

/// Completes on SIGINT or SIGTERM. A signal that cannot be listened for is logged and never
/// completes (the other may still).
async fn signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_trigger_stops_every_clone_and_so_does_dropping_it() {
        let (trigger, shutdown) = Shutdown::new();
        let other = shutdown.clone();
        assert!(!shutdown.is_requested());
        trigger.stop();
        assert!(other.is_requested());
        shutdown.wait().await;
        let (trigger, shutdown) = Shutdown::new();
        assert_eq!(shutdown.unless(async { 1 }).await, Some(1));
        trigger.stop();
        assert_eq!(shutdown.unless(std::future::pending::<()>()).await, None);
        let (trigger, shutdown) = Shutdown::new();
        drop(trigger);
        assert!(shutdown.is_requested());
        shutdown.wait().await;
    }
}
