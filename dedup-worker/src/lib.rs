//! The dedup-worker: drains the votes stream through the shared durable pull consumer, keeps one
//! ballot per voter, the vote latest by the merge rule (`landslide_schema::merge`), and keeps the
//! exact tally, in PostgreSQL.
//!
//! Any number of workers share the consumer. Each batch of up to `batch_size` messages (or what
//! arrives within `batch_wait`) is decoded, deduplicated per voter, sorted, and written in one
//! transaction; only after the commit is each message acked (design rules 3-6). The next batch is
//! pulled and decoded while the transaction runs. The worker must
//! never ack a message whose effect is not committed, never let one bad message block the stream,
//! and never treat a database outage as bad messages.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::MessagesError;
use async_nats::jetstream::{self, AckKind, Message};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use futures::{FutureExt as _, StreamExt as _};
use landslide_config::{Connections, Shutdown};
use landslide_nats::polls::PollWatch;
use landslide_nats::rollback;
use landslide_nats::{Access, HeaderExtractor, User};
use landslide_patience::Backoff;
use landslide_schema::mark::Mark;
use landslide_schema::merge::StoredVote;
use landslide_schema::poll::Unjudged;
use landslide_schema::postgres::DatabaseUrl;
use landslide_schema::postgres::marks;
use landslide_schema::subject::{
    DLQ_REASON_HEADER, DLQ_STREAM_SEQ_HEADER, DLQ_SUBJECT_HEADER, dlq_subject,
};
use landslide_schema::{DecodeError, PollBook, Revision, RevisionHash, VoteEvent, merge};
use opentelemetry::trace::TraceContextExt as _;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub mod replay;
mod upsert;

pub use replay::{ReplayReport, replay};
pub use upsert::UpsertBatch;

/// The most messages one batch takes (`LANDSLIDE_BATCH_SIZE`): one transaction each.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// The longest wait to fill a batch once its first message is in hand (`LANDSLIDE_BATCH_WAIT_MS`).
pub const DEFAULT_BATCH_WAIT: Duration = Duration::from_millis(20);
/// Where a worker serves `/metrics`, `/healthz` and `/readyz` unless told otherwise
/// (`LANDSLIDE_METRICS_LISTEN`): a worker has no other listener.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9102";

/// Configuration of one worker.
#[derive(Debug, Clone)]
pub struct Config {
    /// The broker (as the `worker` user), the database (required), the names, and the polls
    /// that seed the polls bucket when it holds none; once it holds one, each vote is judged by
    /// the bucket's revision that the vote names.
    pub connections: Connections,
    /// Most messages in one transaction.
    pub batch_size: usize,
    /// Longest wait to fill a batch once its first message is in hand.
    pub batch_wait: Duration,
    /// This worker's tally counter shard; distinct shards never wait on each other's rows.
    pub shard: i16,
    /// Test-only: stop dead at this point of the first batch, as a crash would.
    pub fail_point: Option<FailPoint>,
    /// How long an event naming a revision the polls bucket lacks waits before it is a dead
    /// letter ([`landslide_schema::UNKNOWN_REVISION_BOUND`], which tests shorten).
    pub unknown_revision_bound: Duration,
}

/// Where a test makes the worker stop as if killed: nothing after that point happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After the transaction's statements, before its commit.
    BeforeCommit,
    /// After the commit, before any ack.
    AfterCommit,
}

impl Config {
    /// The longest a worker waits for PostgreSQL to answer a batch's transaction: two thirds of
    /// the consumer's `ack_wait`, at most 20 s (above the server's 10 s `statement_timeout`, so
    /// that a slow statement normally fails on the server first). A database cut off by the
    /// network answers nothing, and TCP would wait many minutes before it gives up; meanwhile
    /// the batch's messages would pass `ack_wait` and go to another worker while this one still
    /// held them.
    pub fn database_bound(&self) -> Duration {
        (self.ack_wait() * 2 / 3).min(Duration::from_secs(20))
    }

    /// How often a worker tells the server that it still works on the messages it holds, while
    /// a transaction runs: a third of `ack_wait`. The messages pulled during a slow commit (the
    /// next batch) wait for it and then for their own: two commits within the bound took longer
    /// than `ack_wait`, and the server gave them to another worker, which did the same work
    /// again while the database was at its slowest.
    pub fn progress_every(&self) -> Duration {
        self.ack_wait() / 3
    }

    fn ack_wait(&self) -> Duration {
        self.connections
            .topology
            .consumer_config()
            .map(|c| c.ack_wait)
            .unwrap_or(Duration::from_secs(30))
    }

    pub fn new(connections: Connections) -> Self {
        Self {
            connections,
            batch_size: DEFAULT_BATCH_SIZE,
            batch_wait: DEFAULT_BATCH_WAIT,
            shard: random_shard(),
            fail_point: None,
            unknown_revision_bound: landslide_schema::UNKNOWN_REVISION_BOUND,
        }
    }
}

/// A shard number from the process id and the clock: workers started apart rarely share one, and
/// sharing one is only slower, never wrong.
fn random_shard() -> i16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = nanos ^ std::process::id().rotate_left(16);
    // The modulus keeps the value below 1024, which fits an i16.
    i16::try_from(mixed % 1024).unwrap_or(0)
}

/// The worker stopped at its fail point (tests only).
#[derive(Debug, thiserror::Error)]
#[error("stopped at fail point {0:?}")]
pub struct FailPointReached(pub FailPoint);

/// Drains the consumer until `shutdown` completes, then finishes the batch in hand and returns.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    // Install the metrics recorder before the first batch is counted.
    landslide_telemetry::prometheus();
    let connections = &config.connections;
    let url = connections.database()?;
    let topology = &connections.topology;
    // Every wait is for as long as it takes, not ready meanwhile, and given up only on shutdown:
    // a worker that exited during a long outage would count nothing until something restarted
    // it. A schema older than this binary is not waited for: the worker's user may not migrate
    // it (`landslide migrate` does, as the owner), and the votes wait in the stream,
    // unacknowledged, until it is.
    let started = shutdown
        .starting("dedup-worker", async |startup| {
            let db = landslide_config::database_patiently(startup, || async {
                let mut db = connect_db(url).await?;
                landslide_schema::postgres::check_schema(&mut db)
                    .await
                    .with_context(|| {
                        format!("the database at {url} (DATABASE_URL) is not ready")
                    })?;
                anyhow::Ok(db)
            })
            .await?;
            let client = landslide_nats::connect_patiently(
                &connections.nats,
                User::Worker,
                "landslide-dedup-worker",
                startup,
            )
            .await?;
            let js = jetstream::new(client.clone());
            // Every partition stream and its consumer: those of this worker's K, and any beyond
            // it that a larger K once made, whose votes still wait to be counted.
            let consumers = landslide_nats::retry_startup(
                "ensure the streams and the consumers",
                startup,
                || landslide_nats::partitions::ensure_consumers(&js, topology, Access::SetUp),
            )
            .await?;
            let polls = landslide_nats::polls::watch_patiently(
                &js,
                topology,
                &connections.polls,
                Access::SetUp,
                startup,
            )
            .await?;
            anyhow::Ok((db, client, js, consumers, polls))
        })
        .await;
    let Some(started) = started else {
        return Ok(());
    };
    let (db, client, js, consumers, polls) = started?;
    // One drain per partition, each with its stream's names, a database connection and a
    // tally shard of its own, so that a slow partition never holds up another's acks; they
    // share the NATS connection, the polls and the shutdown.
    let mut db = Some(db);
    let mut drains = tokio::task::JoinSet::new();
    for (index, (partition, consumer)) in consumers.into_iter().enumerate() {
        let mut config = config.clone();
        config.shard = config.shard.wrapping_add(i16::try_from(index).unwrap_or(0));
        tracing::info!(
            consumer = %partition.consumer,
            stream = %partition.votes_stream,
            batch.size = config.batch_size,
            shard = config.shard,
            "dedup-worker draining"
        );
        config.connections.topology = partition;
        let mut worker = Worker {
            // The first drain takes the connection checked at startup; the others connect
            // before their first batch.
            db: db.take(),
            client: client.clone(),
            polls: polls.clone(),
            js: js.clone(),
            config,
            db_backoff: db_backoff(),
            good_floor: None,
        };
        let shutdown = shutdown.clone().wait();
        drains.spawn(async move { worker.drain(consumer, shutdown).await });
    }
    // The first drain to fail (a fail point, say) stops the worker: the others are dropped, and
    // what they hold unacked is redelivered, as after any crash.
    let mut result = Ok(());
    while let Some(joined) = drains.join_next().await {
        let drained = joined.unwrap_or_else(|e| Err(anyhow::anyhow!("a drain panicked: {e}")));
        if drained.is_err() {
            result = drained;
            drains.abort_all();
            break;
        }
    }
    // Acks are plain publishes: flush them before the connection goes away. Bounded: with the
    // server gone the flush would wait forever; unflushed acks only mean redeliveries.
    match tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "flushing acks at shutdown failed; those messages will be redelivered")
        }
        Err(_) => tracing::warn!(
            "NATS did not answer the flush at shutdown; unflushed acks mean redeliveries"
        ),
    }
    result
}

/// Connects to PostgreSQL (an error names `DATABASE_URL`) with the session settings of a worker.
async fn connect_db(url: &DatabaseUrl) -> anyhow::Result<AsyncPgConnection> {
    let mut conn = landslide_schema::postgres::connect(url).await?;
    // A statement that hangs must fail on the server: dropping a transaction future mid-flight
    // does not roll it back (design section 5). Well under the consumer's ack wait.
    diesel::sql_query("SET statement_timeout = '10s'")
        .execute(&mut conn)
        .await
        .context("cannot set statement_timeout")?;
    Ok(conn)
}

struct Worker {
    /// `None` after a connection error, until reconnected.
    db: Option<AsyncPgConnection>,
    /// The NATS client, whose connection count tells when it reconnected.
    client: async_nats::Client,
    polls: PollWatch,
    js: jetstream::Context,
    config: Config,
    /// The nak delay and pause after a failed batch: it grows with consecutive failures.
    db_backoff: Backoff,
    /// The consumer's ack floor when a check last found it as defined: every message up to it
    /// was committed, so a consumer changed since is taken up from the next one.
    good_floor: Option<u64>,
}

/// What a check of the stream against the workers' mark found.
enum Checked {
    /// The stream holds what the workers committed.
    Fine,
    /// It went backwards, and this worker restarted the consumer: pull from this one.
    Restarted(Box<jetstream::consumer::PullConsumer>),
    /// The check could not be made.
    Failed,
}

/// What to do with one message after decoding.
enum Verdict {
    Vote(StoredVote),
    /// A dead letter: why (its `Landslide-Reason`), and the kind, for the metric's label.
    Dead(String, &'static str),
    /// The event names a poll revision (or a text of it) this worker has not seen (yet): a
    /// configuration alarm. Naked, never judged by another revision; a dead letter only once
    /// the bucket itself still lacks it [`Config::unknown_revision_bound`] after the stream
    /// stored it.
    Wait(Unseen),
    /// The event is of a wire version newer than this worker reads: an ingest node of a later
    /// release accepted it, during a rolling upgrade that reached ingest before the workers.
    /// Naked until a worker of that release takes it; never dead-lettered.
    Newer(u64),
    /// The vote counts by the latest revision this worker knows, but the worker could not
    /// confirm for too long that the polls bucket holds no later one, which would have ended
    /// that revision's life ([`landslide_nats::polls::covers`]). Naked until it can; never
    /// dead-lettered.
    Unconfirmed,
}

/// How often a worker compares the stream with the workers' mark (`landslide_nats::rollback`)
/// and the live consumer with its definition (`landslide_nats::consumer_drift`), between
/// batches: a stream info, a consumer info and one message read.
const STREAM_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long a vote of an unseen poll revision waits before it is delivered again.
const UNSEEN_REVISION_DELAY: Duration = Duration::from_secs(2);

impl Worker {
    async fn drain(
        &mut self,
        consumer: jetstream::consumer::PullConsumer,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let stream_ok = landslide_telemetry::readiness::condition(
            "dedup-worker",
            "stream",
            "not checked against the workers' mark yet",
        );
        let mut consumer = consumer;
        'consumer: loop {
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.config.batch_size)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .context("cannot start pulling from the consumer")?;
            let mut inbox = Inbox {
                messages,
                polls: self.polls.clone(),
                batch: Vec::with_capacity(self.config.batch_size),
                first_at: None,
                max: self.config.batch_size,
                wait: self.config.batch_wait,
                progress_every: self.config.progress_every(),
                ended: false,
            };
            // At once, then every `STREAM_CHECK_EVERY` between batches, and before the first batch
            // after every (re)connection to NATS: a stream goes backwards only across a restart
            // of its servers, and the first batch after it may already come from beyond the
            // reused sequences, which would raise the mark past them and hide the rollback.
            let mut next_check = tokio::time::Instant::now();
            let client = self.client.clone();
            let connects = || landslide_nats::connects(&client);
            let mut checked_connects = 0;
            let mut recheck = Backoff::constant(Duration::from_secs(1));
            loop {
                let seen_connects = connects();
                let reconnected = seen_connects != checked_connects;
                if reconnected || tokio::time::Instant::now() >= next_check {
                    next_check = tokio::time::Instant::now() + STREAM_CHECK_EVERY;
                    match self.check_stream(&stream_ok).await {
                        Checked::Fine => checked_connects = seen_connects,
                        Checked::Restarted(restarted) => {
                            inbox.give_back().await;
                            consumer = *restarted;
                            continue 'consumer;
                        }
                        // Not checked since a reconnection: nothing is counted until it is. The
                        // pause keeps a check that fails at once from spinning.
                        Checked::Failed if reconnected => {
                            inbox.give_back().await;
                            recheck.pause().await;
                            continue;
                        }
                        Checked::Failed => {}
                    }
                }
                // Shutdown is only heeded between batches: a batch in hand is always finished.
                if inbox.batch.is_empty() {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => {
                            // Messages already delivered to us, pulled ahead or buffered, go
                            // back at once rather than after the ack wait.
                            inbox.give_back().await;
                            break 'consumer;
                        }
                        () = inbox.wait_for_first() => {}
                        () = tokio::time::sleep_until(next_check) => continue,
                    }
                    // The first message since a reconnection waits for the check above.
                    if connects() != checked_connects {
                        continue;
                    }
                } else if futures::poll!(&mut shutdown).is_ready() {
                    inbox.give_back().await;
                    break 'consumer;
                }
                inbox.fill().await;
                if inbox.ended && inbox.batch.is_empty() {
                    // The consumer was deleted (a worker restarted it after a rollback of the
                    // stream, or someone removed it): open it again, creating it if it is gone.
                    tracing::warn!(
                        "the consumer's message stream ended; opening the consumer again"
                    );
                    let topology = &self.config.connections.topology;
                    let js = &self.js;
                    let reopen = landslide_nats::retry_startup(
                        "open the consumer again",
                        &stream_ok,
                        || landslide_nats::ensure_consumer(js, topology, Access::SetUp),
                    );
                    tokio::select! {
                        () = &mut shutdown => break 'consumer,
                        reopened = reopen => consumer = reopened?,
                    }
                    continue 'consumer;
                }
                let batch = inbox.take();
                self.process(batch, &mut inbox).await?;
            }
        }
        tracing::info!("dedup-worker stopped");
        Ok(())
    }

    /// Compares the stream with the workers' mark (`landslide_nats::rollback`); when it went
    /// backwards, raises the alarm and restarts the consumer from before anything it stored
    /// since. Compares the live consumer with its definition too: one that someone changed or
    /// deleted is made again ([`Worker::restore_consumer`]). Returns the restarted consumer, if
    /// this worker restarted it. A check that cannot be made is retried at the next one, the
    /// alarm left as it was.
    async fn check_stream(
        &mut self,
        stream_ok: &landslide_telemetry::readiness::Condition,
    ) -> Checked {
        match self.check_and_recover(stream_ok).await {
            Ok(Some(restarted)) => Checked::Restarted(Box::new(restarted)),
            Ok(None) => Checked::Fine,
            Err(err) => {
                // The next check connects again. A check that failed on a connection PostgreSQL
                // had closed (a restart) kept failing on it for good, and the worker counted
                // nothing more: after a reconnection to NATS no batch runs before a check passes,
                // and only a batch used to drop a broken connection (found by a fresh chaos seed,
                // a power cut of PostgreSQL: "cannot read the workers' mark: connection closed"
                // for minutes). A new connection per failed check, at most one a second, is cheap.
                self.db = None;
                let error = format!("{err:#}");
                tracing::warn!(
                    error,
                    "cannot check the stream against the workers' mark; trying again"
                );
                stream_ok.not_ready(format!(
                    "cannot check the stream against the workers' mark: {error}"
                ));
                Checked::Failed
            }
        }
    }

    async fn check_and_recover(
        &mut self,
        stream_ok: &landslide_telemetry::readiness::Condition,
    ) -> anyhow::Result<Option<jetstream::consumer::PullConsumer>> {
        let topology = self.config.connections.topology.clone();
        let js = self.js.clone();
        let conn = self.connection().await?;
        let mark = marks::read_mark(conn, &topology.votes_stream)
            .await
            .context("cannot read the workers' mark")?;
        let backlog =
            match landslide_nats::backlog(&js, &topology.votes_stream, &topology.consumer).await {
                Ok(backlog) => backlog,
                Err(err)
                    if err
                        .downcast_ref::<landslide_nats::ConsumerMissing>()
                        .is_some() =>
                {
                    let reason = format!("{err:#}");
                    return self.restore_consumer(stream_ok, &reason).await;
                }
                Err(err) => return Err(err),
            };
        let drift = landslide_nats::consumer_drift(&topology, &backlog.info.config)?;
        if !drift.is_empty() {
            let reason = landslide_nats::describe_drift(&drift);
            return self.restore_consumer(stream_ok, &reason).await;
        }
        metrics::gauge!("landslide_consumer_drift").set(0.0);
        let observed = rollback::observe_with(&js, &topology, &backlog, mark.as_ref()).await?;
        tracing::debug!(
            ?mark,
            ?observed,
            "checked the stream against the workers' mark"
        );
        let Some(regression) = rollback::judge(mark.as_ref(), &observed) else {
            stream_ok.ready();
            metrics::gauge!("landslide_stream_went_backwards").set(0.0);
            self.good_floor = Some(observed.ack_floor);
            return Ok(None);
        };
        metrics::gauge!("landslide_stream_went_backwards").set(1.0);
        metrics::counter!("landslide_stream_rollbacks_total").increment(1);
        tracing::error!(
            stream = %topology.votes_stream,
            %regression,
            "the votes stream went backwards: accepted votes may be lost from it, and its \
             consumer would skip the sequences it reuses; restarting the consumer from before \
             anything stored since"
        );
        stream_ok.not_ready(format!("the votes stream went backwards: {regression}"));
        let restarted = conn
            .transaction::<_, anyhow::Error, _>(async |conn| {
                // One worker at a time; the others find the mark rebased and the stream fine.
                marks::lock_for_rollback(conn).await?;
                let mark = marks::read_mark(conn, &topology.votes_stream).await?;
                let observed = rollback::observe(&js, &topology, mark.as_ref()).await?;
                let Some(regression) = rollback::judge(mark.as_ref(), &observed) else {
                    return Ok(None);
                };
                let unacked = rollback::message_at(&js, &topology, observed.ack_floor + 1)
                    .await?
                    .map(|(_, stored_at)| stored_at);
                let from = rollback::restart_time(mark.as_ref(), unacked);
                let rebased = match rollback::message_at(&js, &topology, observed.last).await? {
                    Some((event_id, stored_at)) if observed.last > 0 => Some(Mark {
                        sequence: observed.last,
                        event_id,
                        stored_at,
                    }),
                    _ => None,
                };
                let consumer = rollback::restart_consumer(&js, &topology, from).await?;
                marks::record_rollback(
                    conn,
                    &marks::Rollback {
                        stream: topology.votes_stream.clone(),
                        detected_at: chrono::Utc::now(),
                        reason: regression.to_string(),
                        mark_sequence: mark.map_or(0, |m| m.sequence),
                        mark_event_id: mark.and_then(|m| m.event_id),
                        stream_last: observed.last,
                        consumer_delivered: observed.delivered,
                        restarted_from: from,
                    },
                    rebased.as_ref(),
                )
                .await?;
                tracing::warn!(
                    stream = %topology.votes_stream,
                    restarted_from = %from,
                    "restarted the workers' consumer: every message stored since is counted again"
                );
                Ok(Some(consumer))
            })
            .await?;
        // The ack floor of the consumer before the rollback says nothing of the one after it.
        self.good_floor = None;
        stream_ok.ready();
        metrics::gauge!("landslide_stream_went_backwards").set(0.0);
        Ok(restarted)
    }

    /// Puts the workers' consumer back to its definition after someone changed or deleted it
    /// (`reason`): a changed one may have skipped messages (a `filter_subject`) or dropped them
    /// (`max_deliver`), so it is made again from before the first message not acknowledged when
    /// this worker last found it as defined, or a margin before the mark ([`rollback::restart_time`]);
    /// from the stream's start when this worker never found it as defined. Folding a vote twice
    /// changes nothing. One worker at a time (the rollback lock); the others find it mended.
    async fn restore_consumer(
        &mut self,
        stream_ok: &landslide_telemetry::readiness::Condition,
        reason: &str,
    ) -> anyhow::Result<Option<jetstream::consumer::PullConsumer>> {
        metrics::gauge!("landslide_consumer_drift").set(1.0);
        metrics::counter!("landslide_consumer_drift_total").increment(1);
        tracing::error!(
            consumer = %self.config.connections.topology.consumer,
            reason,
            "the workers' consumer is not as defined: accepted votes may be skipped or dropped; \
             making it again from before anything not yet committed"
        );
        stream_ok.not_ready(reason.to_owned());
        let topology = self.config.connections.topology.clone();
        let js = self.js.clone();
        let good_floor = self.good_floor.take();
        let conn = self.connection().await?;
        let restored = conn
            .transaction::<_, anyhow::Error, _>(async |conn| {
                marks::lock_for_rollback(conn).await?;
                let backlog =
                    landslide_nats::backlog(&js, &topology.votes_stream, &topology.consumer).await;
                if let Ok(backlog) = &backlog
                    && landslide_nats::consumer_drift(&topology, &backlog.info.config)?.is_empty()
                {
                    // Another worker mended it meanwhile.
                    return Ok(None);
                }
                let from = match good_floor {
                    Some(floor) => {
                        let mark = marks::read_mark(conn, &topology.votes_stream).await?;
                        let unacked = rollback::message_at(&js, &topology, floor + 1)
                            .await?
                            .map(|(_, stored_at)| stored_at);
                        rollback::restart_time(mark.as_ref(), unacked)
                    }
                    None => rollback::restart_time(None, None),
                };
                let consumer = rollback::restart_consumer(&js, &topology, from).await?;
                tracing::warn!(
                    consumer = %topology.consumer,
                    restarted_from = %from,
                    "made the workers' consumer again: every message stored since is counted again"
                );
                Ok(Some(consumer))
            })
            .await?;
        stream_ok.ready();
        metrics::gauge!("landslide_consumer_drift").set(0.0);
        Ok(restored)
    }

    /// The worker's database connection, connected again if it was lost.
    async fn connection(&mut self) -> anyhow::Result<&mut AsyncPgConnection> {
        if self.db.is_none() {
            self.db = Some(connect_db(self.config.connections.database()?).await?);
            tracing::info!("reconnected to PostgreSQL");
        }
        self.db
            .as_mut()
            .context("no database connection right after connecting")
    }

    /// Handles one batch: dead letters out, votes committed, then every message acked.
    async fn process(
        &mut self,
        batch: Vec<(Message, Verdict)>,
        inbox: &mut Inbox,
    ) -> anyhow::Result<()> {
        let span = tracing::info_span!(
            "dedup.batch",
            otel.name = "dedup batch",
            batch.size = batch.len(),
            batch.ballots = tracing::field::Empty,
            batch.dead_letters = tracing::field::Empty,
        );
        for (message, _) in &batch {
            if let Some(headers) = &message.headers {
                link_trace(&span, headers);
            }
        }
        self.process_in_span(batch, inbox).instrument(span).await
    }

    async fn process_in_span(
        &mut self,
        batch: Vec<(Message, Verdict)>,
        inbox: &mut Inbox,
    ) -> anyhow::Result<()> {
        metrics::histogram!("landslide_batch_size").record(batch.len() as f64);
        let mut votes = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut unseen = Vec::new();
        let mut newer = Vec::new();
        let mut unconfirmed = Vec::new();
        for (message, verdict) in batch {
            match verdict {
                Verdict::Vote(vote) => votes.push((vote, message)),
                Verdict::Dead(reason, kind) => dead.push((message, reason, kind)),
                Verdict::Wait(unseen_vote) => unseen.push((message, unseen_vote)),
                Verdict::Newer(version) => newer.push((message, version)),
                Verdict::Unconfirmed => unconfirmed.push(message),
            }
        }
        if !unconfirmed.is_empty() {
            metrics::counter!("landslide_polls_unconfirmed_total")
                .increment(unconfirmed.len() as u64);
            tracing::error!(
                votes = unconfirmed.len(),
                "the polls bucket could not be read for too long to know that no later revision \
                 ended the one these votes name; they wait in the stream"
            );
            for message in unconfirmed {
                let _ = message
                    .ack_with(AckKind::Nak(Some(UNSEEN_REVISION_DELAY)))
                    .await;
            }
        }
        if let Some((_, version)) = newer.as_slice().first() {
            metrics::counter!("landslide_newer_wire_version_total").increment(newer.len() as u64);
            tracing::error!(
                votes = newer.len(),
                wire.version = version,
                "votes of a newer wire version than this worker reads; they wait in the stream \
                 until a worker of the release that wrote them takes them (upgrade the workers \
                 before the ingest nodes)"
            );
            for (message, _) in newer {
                let _ = message
                    .ack_with(AckKind::Nak(Some(UNSEEN_REVISION_DELAY)))
                    .await;
            }
        }
        if let Some((_, first)) = unseen.as_slice().first() {
            metrics::counter!("landslide_unseen_revision_total").increment(unseen.len() as u64);
            tracing::error!(
                votes = unseen.len(),
                revision = %first.revision,
                "votes name a poll revision (or a text of it) this worker has not seen; they wait \
                 in the stream (is the polls bucket reachable, or was a revision written \
                 elsewhere?)"
            );
            let now = chrono::Utc::now();
            for (message, unseen) in unseen {
                let bound = self.config.unknown_revision_bound;
                if unseen.waited_out(bound, now)
                    && matches!(
                        self.polls.lacks(unseen.revision, unseen.hash).await,
                        Ok(true)
                    )
                {
                    let reason = format!(
                        "{}; the polls bucket still lacks it {} s after the stream stored the \
                         vote, so no honest ingest node accepted it",
                        Unjudged::UnknownRevision(unseen.revision),
                        bound.as_secs()
                    );
                    dead.push((message, reason, "unknown_revision"));
                    continue;
                }
                let _ = message
                    .ack_with(AckKind::Nak(Some(UNSEEN_REVISION_DELAY)))
                    .await;
            }
        }
        tracing::Span::current().record("batch.dead_letters", dead.len());
        for (message, reason, kind) in dead {
            self.dead_letter(message, &reason, kind).await;
        }
        if votes.is_empty() {
            return Ok(());
        }

        let ballots = merge::latest_per_voter(votes.iter().map(|(vote, _)| vote.clone()));
        tracing::Span::current().record("batch.ballots", ballots.len());
        let upsert = UpsertBatch::new(ballots.values(), self.config.shard);
        // The batch's highest stream sequence, raised in the same transaction: what the workers
        // have committed of the stream, which a stream that went backwards falls below.
        let mark = votes
            .iter()
            .filter_map(|(vote, message)| {
                let sequence = message.info().ok()?.stream_sequence;
                Some(Mark {
                    sequence,
                    event_id: Some(vote.event.event_id),
                    stored_at: vote.stored_at,
                })
            })
            .max_by_key(|mark| mark.sequence)
            .map(|mark| {
                marks::RaiseMark::new(
                    &self.config.connections.topology.votes_stream,
                    self.config.shard,
                    &mark,
                )
            });
        let started = Instant::now();
        // The next batch is pulled and decoded while PostgreSQL works on this one.
        let in_flight: Vec<&Message> = votes.iter().map(|(_, message)| message).collect();
        match inbox
            .pull_during(self.commit(&upsert, mark.as_ref()), &in_flight)
            .await
        {
            Ok(()) => {
                self.db_backoff.reset();
                metrics::histogram!("landslide_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("landslide_votes_committed_total").increment(votes.len() as u64);
                if self.config.fail_point == Some(FailPoint::AfterCommit) {
                    return Err(FailPointReached(FailPoint::AfterCommit).into());
                }
                // Every message's effect is committed (a superseded one's effect is to lose to
                // the later vote): ack them all. A lost ack only means a harmless redelivery.
                for (_, message) in &votes {
                    if let Err(err) = message.ack().await {
                        tracing::warn!(error = %err, "ack failed; the message will be redelivered");
                    }
                }
                Ok(())
            }
            Err(err) => {
                if let Some(reached) = err.downcast_ref::<FailPointReached>() {
                    return Err(anyhow::anyhow!("{reached}"));
                }
                // Nothing was committed, or the commit's outcome is unknown: either way the
                // messages must come back. Nak with a delay that grows while the database is down.
                let delay = self.db_backoff.next_pause();
                metrics::counter!("landslide_db_errors_total").increment(1);
                tracing::error!(
                    error = format!("{err:#}"),
                    retry_in_ms = delay.as_millis() as u64,
                    "batch not committed; messages will be redelivered"
                );
                for (_, message) in &votes {
                    let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                }
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }

    /// Writes one batch in one transaction, retrying deadlocks and serialization failures.
    async fn commit(
        &mut self,
        upsert: &UpsertBatch,
        mark: Option<&marks::RaiseMark>,
    ) -> anyhow::Result<()> {
        const ATTEMPTS: u32 = 5;
        // 5 ms × the attempt that failed.
        let mut backoff = Backoff::linear(Duration::from_millis(5), Duration::from_millis(5));
        for attempt in 1..=ATTEMPTS {
            let fail_point = self.config.fail_point;
            let bound = self.config.database_bound();
            let conn = self.connection().await?;
            let transaction = conn.transaction::<_, TxError, _>(async |conn| {
                upsert.execute(conn).await?;
                if let Some(mark) = mark {
                    mark.clone().execute(conn).await?;
                }
                if fail_point == Some(FailPoint::BeforeCommit) {
                    return Err(TxError::FailPoint);
                }
                Ok(())
            });
            // Dropping a transaction future midway leaves its connection in a state diesel-async
            // does not repair (design section 5), so the connection goes with it: the server
            // rolls the transaction back when it sees the connection close, or has committed it,
            // and either way the messages are naked, never acked, and their redelivery is
            // harmless.
            let Ok(result) = tokio::time::timeout(bound, transaction).await else {
                self.db = None;
                metrics::counter!("landslide_db_timeouts_total").increment(1);
                anyhow::bail!(
                    "PostgreSQL did not answer the batch's transaction within {bound:?}; \
                     connection dropped, outcome unknown"
                );
            };
            match result {
                Ok(()) => return Ok(()),
                Err(TxError::FailPoint) => {
                    return Err(FailPointReached(FailPoint::BeforeCommit).into());
                }
                Err(TxError::Db(err)) if is_retryable(&err) && attempt < ATTEMPTS => {
                    metrics::counter!("landslide_db_retries_total").increment(1);
                    tracing::warn!(error = %err, attempt, "batch conflicted with another worker; retrying");
                    backoff.pause().await;
                }
                Err(TxError::Db(err)) => {
                    if is_connection_error(&err) {
                        self.db = None;
                    }
                    return Err(err).context("batch transaction failed");
                }
            }
        }
        anyhow::bail!("batch conflicted {ATTEMPTS} times in a row")
    }

    /// Sends one message to the dead-letter stream, then terminates it. If the dead-letter
    /// publish is not acknowledged, the message is naked instead: it is never dropped silently.
    async fn dead_letter(&self, message: Message, reason: &str, kind: &'static str) {
        let topology = &self.config.connections.topology;
        let subject = dlq_subject(
            &topology.dlq_prefix,
            &topology.votes_prefix,
            &message.subject,
        );
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut headers = HeaderMap::new();
        headers.insert(DLQ_REASON_HEADER, reason);
        headers.insert(DLQ_SUBJECT_HEADER, message.subject.as_str());
        headers.insert(DLQ_STREAM_SEQ_HEADER, sequence.to_string().as_str());
        // One dead letter per original message, even if this one is handled twice.
        headers.insert(
            "Nats-Msg-Id",
            format!("{}-{sequence}", topology.votes_stream).as_str(),
        );
        let stored = async {
            self.js
                .publish_with_headers(subject, headers, message.payload.clone())
                .await?
                .await
        };
        match stored.await {
            Ok(_) => {
                metrics::counter!("landslide_dead_letters_total", "reason" => kind).increment(1);
                tracing::warn!(
                    reason,
                    dead_letter.kind = kind,
                    stream.sequence = sequence,
                    "vote dead-lettered"
                );
                if let Err(err) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %err, "terminating a dead letter failed; it will be redelivered and dead-lettered once more");
                }
            }
            Err(err) => {
                tracing::error!(error = %err, reason, "dead-letter publish failed; message kept");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

/// Whether `message` is a vote of a known poll and option by the revision it names, stamped
/// no further ahead of when the stream stored it than a node may stamp; a dead letter and why;
/// or a vote to wait with.
fn verdict(polls: &PollBook, message: &Message) -> Verdict {
    let event = match VoteEvent::decode(&message.payload) {
        Ok(event) => event,
        Err(DecodeError::NewerVersion(version)) => return Verdict::Newer(version),
        Err(err) => return Verdict::Dead(err.to_string(), "undecodable"),
    };
    // Every message JetStream delivers has its metadata; without it the window cannot be
    // judged, so the vote waits rather than being judged by a guess.
    let Ok(info) = message.info() else {
        tracing::error!("a delivered message has no JetStream metadata; it waits");
        return Verdict::Wait(Unseen::of(&event, None));
    };
    let stored_at = landslide_nats::stored_at(&info);
    match polls.judge_event(&event, stored_at) {
        Ok(_) => Verdict::Vote(StoredVote::new(event, stored_at)),
        Err(Unjudged::UnknownRevision(_)) => Verdict::Wait(Unseen::of(&event, Some(stored_at))),
        Err(dead) => Verdict::Dead(dead.to_string(), dead.label().unwrap_or("unjudged")),
    }
}

/// A vote whose revision (or text of it) the worker has not seen.
#[derive(Debug, Clone, Copy)]
struct Unseen {
    revision: Revision,
    hash: Option<RevisionHash>,
    /// When the stream stored it, if the message said.
    stored_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Unseen {
    fn of(event: &VoteEvent, stored_at: Option<chrono::DateTime<chrono::Utc>>) -> Self {
        Self {
            revision: event.rev.unwrap_or(Revision(0)),
            hash: event.rev_hash,
            stored_at,
        }
    }

    /// Whether it has waited out `bound` by `now`.
    fn waited_out(&self, bound: Duration, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.stored_at
            .is_some_and(|stored_at| landslide_schema::poll::waited_out(stored_at, now, bound))
    }
}

/// The consumer's messages and the next batch being gathered from them, each message decoded as
/// it arrives. Every method can be cancelled between messages without losing one: what was
/// pulled is in `batch`.
struct Inbox {
    messages: jetstream::consumer::pull::Stream,
    polls: PollWatch,
    batch: Vec<(Message, Verdict)>,
    /// When the batch's first message arrived: the batch closes `wait` later.
    first_at: Option<tokio::time::Instant>,
    max: usize,
    wait: Duration,
    /// `Config::progress_every`.
    progress_every: Duration,
    /// The message stream ended (it never does while the connection lives).
    ended: bool,
}

impl Inbox {
    fn push(&mut self, next: Option<Result<Message, MessagesError>>) {
        match next {
            Some(Ok(message)) => {
                if message.info().is_ok_and(|info| info.delivered > 1) {
                    metrics::counter!("landslide_redeliveries_total").increment(1);
                }
                let (book, confirmed) = self.polls.confirmed();
                let verdict = match verdict(&book, &message) {
                    // Counted by a revision the book knows no successor of, while the book was
                    // not confirmed recently enough to know there is none.
                    Verdict::Vote(vote)
                        if vote.event.rev.is_some_and(|r| book.superseded(r).is_none())
                            && !landslide_nats::polls::covers(
                                confirmed,
                                std::time::Instant::now(),
                            ) =>
                    {
                        Verdict::Unconfirmed
                    }
                    verdict => verdict,
                };
                self.first_at.get_or_insert_with(tokio::time::Instant::now);
                self.batch.push((message, verdict));
            }
            // Missed heartbeats or a lost connection: the stream recovers by itself.
            Some(Err(err)) => tracing::warn!(error = %err, "pulling messages failed"),
            None => self.ended = true,
        }
    }

    /// Waits until the batch holds a message (or the stream ends).
    async fn wait_for_first(&mut self) {
        let mut backoff = Backoff::constant(Duration::from_millis(200));
        while self.batch.is_empty() && !self.ended {
            let next = self.messages.next().await;
            let failed = matches!(next, Some(Err(_)));
            self.push(next);
            if failed {
                // A lasting failure must not turn into a busy loop of warnings.
                backoff.pause().await;
            }
        }
    }

    /// Gives every message in hand back to the consumer at once (naked), rather than after the
    /// ack wait: what was gathered for the next batch, and what the client pulled ahead.
    async fn give_back(&mut self) {
        self.first_at = None;
        for (message, _) in self.batch.drain(..) {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
        while let Some(Some(Ok(message))) = self.messages.next().now_or_never() {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// The batch gathered so far; the next one starts empty.
    fn take(&mut self) -> Vec<(Message, Verdict)> {
        self.first_at = None;
        std::mem::take(&mut self.batch)
    }

    /// Adds messages until the batch is full or `wait` has passed since its first message.
    async fn fill(&mut self) {
        let Some(first_at) = self.first_at else {
            return;
        };
        while self.batch.len() < self.max && !self.ended {
            match tokio::time::timeout_at(first_at + self.wait, self.messages.next()).await {
                Ok(next @ Some(Err(_))) => {
                    self.push(next);
                    break;
                }
                Ok(next) => self.push(next),
                Err(_) => break,
            }
        }
    }

    /// Runs `work` to its end, meanwhile pulling messages into the batch until it is full, and
    /// every `progress_every` telling the server that the messages of `in_flight` (`work`'s)
    /// and of the batch are still being worked on, so that it gives none to another worker
    /// meanwhile. `work` itself is never dropped early: it may be a transaction (design
    /// section 5).
    async fn pull_during<T>(&mut self, work: impl Future<Output = T>, in_flight: &[&Message]) -> T {
        let mut work = std::pin::pin!(work);
        let mut progress = tokio::time::interval_at(
            tokio::time::Instant::now() + self.progress_every,
            self.progress_every,
        );
        loop {
            let pulling = self.batch.len() < self.max && !self.ended;
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = progress.tick() => {
                    let held = in_flight.iter().copied().chain(self.batch.iter().map(|(m, _)| m));
                    let mut sent = 0u64;
                    for message in held {
                        // A lost one only means a redelivery, which the ack_wait allowed anyway.
                        let _ = message.ack_with(AckKind::Progress).await;
                        sent += 1;
                    }
                    metrics::counter!("landslide_progress_acks_total").increment(sent);
                }
                next = self.messages.next(), if pulling => self.push(next),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error("fail point")]
    FailPoint,
}

/// Deadlocks (40P01) and serialization failures (40001): retry the whole batch.
fn is_retryable(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match err {
        Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        // diesel reports a deadlock as an unknown database error; its message names it.
        Error::DatabaseError(DatabaseErrorKind::Unknown, info) => {
            info.message().contains("deadlock detected")
        }
        _ => false,
    }
}

fn is_connection_error(err: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    !matches!(
        err,
        Error::DatabaseError(
            DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::CheckViolation
                | DatabaseErrorKind::NotNullViolation,
            _
        )
    )
}

/// 100 ms doubling up to 5 s.
fn db_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
}

/// Links the batch span to the trace of the HTTP request that produced `headers`' message.
fn link_trace(span: &tracing::Span, headers: &HeaderMap) {
    let context =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.add_link(span_context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut backoff = db_backoff();
        assert_eq!(backoff.next_pause(), Duration::from_millis(100));
        assert_eq!(backoff.next_pause(), Duration::from_millis(200));
        for _ in 3..30 {
            backoff.next_pause();
        }
        assert_eq!(backoff.next_pause(), Duration::from_secs(5));
    }
}
