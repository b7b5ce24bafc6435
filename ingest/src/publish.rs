//! Stamping and publishing votes (design rules 1 and 2), with group commit.
//!
//! A vote is accepted only once JetStream acknowledges it, from a server that fsyncs before it
//! acks. One fsync per vote would cap a node at about 5,000 votes/s, so concurrent votes are
//! coalesced: the handlers queue their votes, and a committer publishes whatever is queued as
//! one atomic batch (stream `allow_atomic`, nats-server 2.12 and later), which the server stores
//! with one fsync for the whole batch (measured with strace on 2.15.1: 4 fsyncs for a batch of
//! 100, 100 for 100 concurrent single publishes). There is no artificial wait: a lone vote goes
//! out at once, and under load the next batch is whatever arrived while the previous ones were
//! in flight, as in PostgreSQL's group commit. Each handler answers only after the ack of the
//! batch that holds its own vote, and learns its own stream sequence from it.
//!
//! What happens to a vote when its batch fails:
//! - No answer (a timeout, no responders during an election, a lost connection) is ambiguous:
//!   the batch may still be stored. It is sent again, as the same messages, a few times. A vote
//!   without `Idempotency-Key` carries no `Nats-Msg-Id`, so a retry can store its event twice:
//!   harmless, since the two copies are the same event (same id, same stamp) and the merge rule
//!   is idempotent. A keyed vote carries its `Nats-Msg-Id`, so the duplicate window keeps one copy.
//! - A refusal of the whole batch that is not about room (a duplicate message id, error 10201,
//!   from a keyed retry; a message the stream refuses) says nothing about which vote caused it:
//!   every vote of the batch is then published on its own, and answers with its own ack.
//! - A full stream (10077) refuses every vote of the batch: each gets a 503.
//!
//! So a 2xx always rests on an ack that covers that vote, and a vote that got no ack gets a 503
//! with `Retry-After`, never silence.
//!
//! A vote waits for its ack at most [`Config::vote_deadline`] (10 s), below the load balancers'
//! timeouts (HAProxy 30 s, the ALB 60 s): past it the voter gets a prompt 503 with the cookie
//! that makes a retry the same voter, rather than the balancer's 504 without one. A vote whose
//! handler gave up before its batch was sent is left out of the batch, so it is never stored;
//! one already sent may still be stored, which is the ambiguity every unanswered vote has (its
//! retry supersedes it). Found in review: during a broker outage, or with the server's store
//! full, votes waited in the queue for as long as it took.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::join_all;
use landslide_nats::HeaderInjector;
use landslide_nats::batch::{self, Outcome as BatchOutcome};
use landslide_patience::Backoff;
use landslide_schema::VoteEvent;
use landslide_schema::ts::{Stamped, Timestamp, stamp_within};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{Clock, Config};

/// The JetStream context of an ingest node: acks time out after `publish_timeout`, and many
/// publishes share the connection (axum's concurrent handlers pipeline them, design section 5).
pub fn jetstream_context(client: async_nats::Client, config: &Config) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.publish_timeout)
        .max_ack_inflight(10_000)
        .backpressure_on_inflight(true)
        .build(client)
}

/// The node's hybrid logical clock: the wall clock plus the last stamp issued.
#[derive(Debug)]
pub struct Hlc {
    clock: Arc<dyn Clock>,
    last: AtomicU64,
    /// How far ahead of the clock a cookie floor or the last stamp may push a stamp
    /// ([`stamp_within`]): [`crate::MaxClockOffset::max_stamp_ahead_ms`].
    max_ahead_ms: u64,
}

impl Hlc {
    pub fn new(clock: Arc<dyn Clock>, max_ahead_ms: u64) -> Self {
        Self {
            clock,
            last: AtomicU64::new(0),
            max_ahead_ms,
        }
    }

    /// The node's wall clock, in milliseconds: what its poll windows are judged by before a vote
    /// is stored.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A stamp greater than `floor`, than every stamp this node issued, and not behind its clock;
    /// but never more than `max_ahead_ms` ahead of the clock: a floor or last stamp further
    /// ahead is not followed, and the result says which ([`stamp_within`]).
    pub fn stamp(&self, floor: Option<Timestamp>) -> Stamped {
        let now = self.clock.now_ms();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let stamped = stamp_within(now, Timestamp(last), floor, self.max_ahead_ms);
            match self.last.compare_exchange_weak(
                last,
                stamped.ts.0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if stamped.last_refused {
                        tracing::warn!(
                            last_stamp = last,
                            clock_ms = now,
                            "this node's last stamp lies far ahead of its clock (was the clock \
                             set back?); stamping by the clock again"
                        );
                    }
                    return stamped;
                }
                Err(current) => last = current,
            }
        }
    }
}

/// What JetStream said about a stored vote.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub sequence: u64,
    /// The same event id was stored before, within the duplicate window: that earlier copy counts.
    pub duplicate: bool,
}

/// Why a vote could not be stored. Either way the vote was not accepted: the client gets a 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishFailed {
    /// The stream, or the server's store, has no room (`batch::is_no_room`).
    #[error("the votes stream is full, or the server's store is")]
    StreamFull,
    #[error("no JetStream ack after {attempts} attempts: {last}")]
    NoAck { attempts: u32, last: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("no JetStream ack within {0:?}")]
    Deadline(Duration),
}

/// The most votes in one batch: the server's limit.
const MAX_BATCH_MSGS: usize = batch::MAX_MESSAGES;
/// The most bytes of payload and headers in one batch, so that a batch stays one socket write
/// or a few: the server has no limit of its own on a batch's size, only on each message.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Votes waiting for a batch. A full queue makes handlers wait, which slows voters down instead
/// of piling up memory.
const QUEUE: usize = 10_000;

/// One vote waiting for its batch.
struct Queued {
    payload: Bytes,
    headers: HeaderMap,
    /// `Nats-Msg-Id`, only for votes whose client chose an `Idempotency-Key`.
    message_id: Option<String>,
    answer: oneshot::Sender<Result<Stored, PublishFailed>>,
}

impl Queued {
    fn size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(name, values)| {
                    let name: &str = name.as_ref();
                    name.len() + values.iter().map(|v| v.as_str().len()).sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// Publishes votes of one node to `votes.<node>`.
#[derive(Debug)]
pub struct Publisher {
    js: jetstream::Context,
    stream: String,
    queue: mpsc::Sender<Queued>,
    /// The longest a vote waits for its ack ([`Config::vote_deadline`]).
    deadline: Duration,
}

/// What the committer task needs: where to publish and how patiently.
#[derive(Debug)]
struct Committer {
    client: async_nats::Client,
    js: jetstream::Context,
    subject: String,
    stream: String,
    timeout: Duration,
    attempts: u32,
    /// Batches in flight at once ([`Config::batches_in_flight`]).
    in_flight: usize,
}

impl Publisher {
    /// Starts the committer task; it ends once the publisher is dropped and every queued vote
    /// has its answer.
    pub fn new(client: async_nats::Client, js: jetstream::Context, config: &Config) -> Self {
        let committer = Arc::new(Committer {
            client,
            js: js.clone(),
            subject: landslide_schema::subject::vote_subject(
                &config.connections.topology.votes_prefix,
                &config.node_id,
            ),
            stream: config.connections.topology.votes_stream.clone(),
            timeout: config.publish_timeout,
            attempts: config.publish_attempts.max(1),
            in_flight: config.batches_in_flight(),
        });
        let (queue, queued) = mpsc::channel(QUEUE);
        tokio::spawn(committer.run(queued));
        Self {
            js,
            stream: config.connections.topology.votes_stream.clone(),
            queue,
            deadline: config.vote_deadline,
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// Stores `event`; `Ok` only after the JetStream ack of a batch that holds it. `keyed`: the
    /// event id comes from the client's `Idempotency-Key`, so it is sent as `Nats-Msg-Id` and
    /// the duplicate window keeps a blind retry from being stored twice.
    pub async fn publish(&self, event: &VoteEvent, keyed: bool) -> Result<Stored, PublishFailed> {
        let span = tracing::info_span!(
            target: landslide_telemetry::PER_REQUEST_TARGET,
            "vote.publish",
            otel.name = "vote publish",
            vote.event_id = %event.event_id,
        );
        let mut headers = HeaderMap::new();
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(&mut headers));
        });
        let (answer, answered) = oneshot::channel();
        let queued = Queued {
            payload: Bytes::from(event.encode()),
            headers,
            message_id: keyed.then(|| event.event_id.to_string()),
            answer,
        };
        let started = Instant::now();
        let waited = async {
            self.queue
                .send(queued)
                .await
                .map_err(|_| PublishFailed::ShuttingDown)?;
            // A dropped answer means the committer died with the vote: no ack, so no 2xx.
            answered.await.unwrap_or(Err(PublishFailed::ShuttingDown))
        };
        // Dropping the wait drops the answer's receiver: the committer leaves the vote out of
        // any batch it has not sent yet.
        let result = tokio::time::timeout(self.deadline, waited)
            .instrument(span)
            .await
            .unwrap_or(Err(PublishFailed::Deadline(self.deadline)));
        metrics::histogram!("landslide_publish_seconds").record(started.elapsed().as_secs_f64());
        result
    }
}

impl Committer {
    async fn run(self: Arc<Self>, mut queued: mpsc::Receiver<Queued>) {
        let slots = Arc::new(Semaphore::new(self.in_flight));
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            // The semaphore is never closed, so this cannot fail.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let Some(first) = queued.recv().await else {
                break;
            };
            let mut bytes = first.size();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_MSGS && bytes < MAX_BATCH_BYTES {
                match queued.try_recv() {
                    Ok(next) => {
                        bytes += next.size();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            // Votes whose handlers gave up (their deadline passed, the client left) were
            // answered 503 or not at all: never stored.
            batch.retain(|queued| !queued.answer.is_closed());
            if batch.is_empty() {
                continue;
            }
            let committer = self.clone();
            in_flight.spawn(async move {
                committer.commit(batch).await;
                drop(slot);
            });
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// Stores one batch and answers each of its votes.
    async fn commit(&self, batch: Vec<Queued>) {
        metrics::histogram!("landslide_publish_batch_size").record(batch.len() as f64);
        if batch.len() == 1 {
            // Alone, a plain publish: the server then stages nothing.
            for queued in batch {
                self.commit_alone(queued).await;
            }
            return;
        }
        let mut last = String::new();
        let mut backoff = publish_backoff();
        for attempt in 1..=self.attempts {
            pause_before(attempt, &mut backoff).await;
            match self.publish_batch(&batch).await {
                BatchOutcome::Stored { first } => {
                    for (i, queued) in (0u64..).zip(batch) {
                        let stored = Stored {
                            sequence: first + i,
                            duplicate: false,
                        };
                        let _ = queued.answer.send(Ok(stored));
                    }
                    return;
                }
                BatchOutcome::Refused { code, .. } if batch::is_no_room(code) => {
                    for queued in batch {
                        let _ = queued.answer.send(Err(PublishFailed::StreamFull));
                    }
                    return;
                }
                BatchOutcome::Refused { code, description } => {
                    // Which vote the refusal is about is unknown: let each find out on its own.
                    tracing::info!(
                        batch.size = batch.len(),
                        error.code = code,
                        error = %description,
                        "batch refused; publishing its votes one by one"
                    );
                    metrics::counter!("landslide_publish_batch_splits_total").increment(1);
                    join_all(batch.into_iter().map(|q| self.commit_alone(q))).await;
                    return;
                }
                BatchOutcome::Unknown(why) => {
                    tracing::warn!(
                        attempt,
                        batch.size = batch.len(),
                        subject = %self.subject,
                        error = %why,
                        "batch publish attempt failed"
                    );
                    last = why;
                }
            }
        }
        let failed = PublishFailed::NoAck {
            attempts: self.attempts,
            last,
        };
        for queued in batch {
            let _ = queued.answer.send(Err(failed.clone()));
        }
    }

    /// Publishes the batch atomically, each vote with its own `Nats-Msg-Id` if it has one.
    async fn publish_batch(&self, batch: &[Queued]) -> BatchOutcome {
        let messages: Vec<(HeaderMap, Bytes)> = batch
            .iter()
            .map(|queued| {
                let mut headers = queued.headers.clone();
                if let Some(message_id) = &queued.message_id {
                    headers.insert("Nats-Msg-Id", message_id.as_str());
                }
                (headers, queued.payload.clone())
            })
            .collect();
        let publish = batch::publish(
            &self.client,
            &self.subject,
            &self.stream,
            &messages,
            self.timeout,
        );
        // The commit's own timeout covers the wait for its answer; this one also bounds sending
        // into a dead connection. Dropping the publish midway is safe: a batch without its
        // commit message is never stored, and one whose commit went out is sent again.
        match tokio::time::timeout(self.timeout + Duration::from_millis(100), publish).await {
            Ok(outcome) => outcome,
            Err(_) => BatchOutcome::Unknown(format!("timed out after {:?}", self.timeout)),
        }
    }

    /// Publishes one vote on its own, retrying an ambiguous attempt, and answers it.
    async fn commit_alone(&self, queued: Queued) {
        let result = self
            .publish_with_retries(
                queued.message_id.as_deref(),
                &queued.payload,
                &queued.headers,
            )
            .await;
        let _ = queued.answer.send(result);
    }

    async fn publish_with_retries(
        &self,
        message_id: Option<&str>,
        payload: &Bytes,
        headers: &HeaderMap,
    ) -> Result<Stored, PublishFailed> {
        let mut last = String::new();
        let mut backoff = publish_backoff();
        for attempt in 1..=self.attempts {
            pause_before(attempt, &mut backoff).await;
            let mut publish = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .expected_stream(&self.stream);
            if let Some(id) = message_id {
                publish = publish.message_id(id);
            }
            let ack = async {
                self.js
                    .send_publish(self.subject.clone(), publish)
                    .await?
                    .await
            };
            // The context's own ack timeout covers the wait for the ack; this one also bounds the
            // wait for an in-flight slot and a send into a dead connection.
            match tokio::time::timeout(self.timeout + Duration::from_millis(100), ack).await {
                Ok(Ok(ack)) => {
                    return Ok(Stored {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Ok(Err(err)) => {
                    if is_stream_full(&err) {
                        return Err(PublishFailed::StreamFull);
                    }
                    last = err.to_string();
                }
                Err(_) => last = format!("timed out after {:?}", self.timeout),
            }
            tracing::warn!(
                attempt,
                subject = %self.subject,
                error = %last,
                "publish attempt failed"
            );
        }
        Err(PublishFailed::NoAck {
            attempts: self.attempts,
            last,
        })
    }
}

/// The pauses between publish attempts: 50 ms × the number of the attempt that follows
/// (100 ms before the second, 150 ms before the third…).
fn publish_backoff() -> Backoff {
    Backoff::linear(Duration::from_millis(100), Duration::from_millis(50))
}

/// Before every attempt but the first, of a batch or of one vote: a short, growing pause
/// ([`publish_backoff`]), counted as a retry.
async fn pause_before(attempt: u32, backoff: &mut Backoff) {
    if attempt > 1 {
        metrics::counter!("landslide_publish_retries_total").increment(1);
        backoff.pause().await;
    }
}

fn is_stream_full(err: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| batch::is_no_room(e.error_code().0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(u64);
    impl Clock for Fixed {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }

    const MAX_AHEAD_MS: u64 = 298_000;

    #[test]
    fn a_node_never_repeats_a_stamp_within_one_millisecond() {
        let hlc = Hlc::new(Arc::new(Fixed(1_000)), MAX_AHEAD_MS);
        let a = hlc.stamp(None).ts;
        let b = hlc.stamp(None).ts;
        assert!(b > a);
        assert_eq!(a, Timestamp::from_millis(1_000));
    }

    #[test]
    fn a_stamp_is_above_the_cookie_floor() {
        let hlc = Hlc::new(Arc::new(Fixed(1_000)), MAX_AHEAD_MS);
        let floor = Timestamp::from_millis(11_000);
        assert_eq!(hlc.stamp(Some(floor)).ts, floor.next());
    }

    #[test]
    fn a_cookie_floor_far_ahead_neither_moves_the_stamp_nor_the_node() {
        let hlc = Hlc::new(Arc::new(Fixed(1_000)), MAX_AHEAD_MS);
        let forged = hlc.stamp(Some(Timestamp(i64::MAX as u64)));
        assert!(forged.floor_refused);
        assert_eq!(forged.ts, Timestamp::from_millis(1_000));
        // The node's next stamp is not dragged ahead either.
        assert_eq!(hlc.stamp(None).ts, forged.ts.next());
    }
}
