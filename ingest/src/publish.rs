//! Stamping and publishing one vote (design rules 1 and 2).
//!
//! A vote is accepted only once JetStream acknowledges it. A timeout is ambiguous (the vote may
//! still be stored), so a failed attempt is retried with the same `Nats-Msg-Id`, which the stream's
//! duplicate window turns into one stored message; after the last attempt the caller answers 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use landslide_nats::HeaderInjector;
use landslide_schema::ts::{Timestamp, stamp};
use landslide_schema::{EventId, VoteEvent};
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
}

impl Hlc {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            last: AtomicU64::new(0),
        }
    }

    /// A stamp greater than `floor`, than every stamp this node issued, and not behind its clock.
    pub fn stamp(&self, floor: Option<Timestamp>) -> Timestamp {
        let now = self.clock.now_ms();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let ts = stamp(now, Timestamp(last), floor);
            match self
                .last
                .compare_exchange_weak(last, ts.0, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ts,
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
#[derive(Debug, thiserror::Error)]
pub enum PublishFailed {
    #[error("the votes stream is full")]
    StreamFull,
    #[error("no JetStream ack after {attempts} attempts: {last}")]
    NoAck { attempts: u32, last: String },
}

/// Publishes votes of one node to `votes.<node>`.
#[derive(Debug)]
pub struct Publisher {
    js: jetstream::Context,
    subject: String,
    stream: String,
    timeout: Duration,
    attempts: u32,
}

/// JetStream's answer when a stream with `discard: new` is full (design section 5).
const STREAM_FULL: u64 = 10077;

impl Publisher {
    pub fn new(js: jetstream::Context, config: &Config) -> Self {
        Self {
            js,
            subject: landslide_schema::subject::vote_subject(
                &config.topology.votes_prefix,
                &config.node_id,
            ),
            stream: config.topology.votes_stream.clone(),
            timeout: config.publish_timeout,
            attempts: config.publish_attempts.max(1),
        }
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// Stores `event`, retrying with the same message id; `Ok` only after JetStream's ack.
    pub async fn publish(&self, event: &VoteEvent) -> Result<Stored, PublishFailed> {
        let span = tracing::info_span!(
            target: landslide_telemetry::PER_REQUEST_TARGET,
            "vote.publish",
            otel.name = "vote publish",
            messaging.destination = %self.subject,
            vote.event_id = %event.event_id,
            attempts = tracing::field::Empty,
        );
        let payload = Bytes::from(event.encode());
        let mut headers = HeaderMap::new();
        let context = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(&mut headers));
        });
        let started = Instant::now();
        let result = self
            .publish_with_retries(event.event_id, payload, headers)
            .instrument(span)
            .await;
        metrics::histogram!("landslide_publish_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    async fn publish_with_retries(
        &self,
        event_id: EventId,
        payload: Bytes,
        headers: HeaderMap,
    ) -> Result<Stored, PublishFailed> {
        let message_id = event_id.to_string();
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                metrics::counter!("landslide_publish_retries_total").increment(1);
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&message_id)
                .expected_stream(&self.stream);
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
                    tracing::Span::current().record("attempts", attempt);
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
                vote.event_id = %event_id,
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

fn is_stream_full(err: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|e| e.error_code().0 == STREAM_FULL)
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

    #[test]
    fn a_node_never_repeats_a_stamp_within_one_millisecond() {
        let hlc = Hlc::new(Arc::new(Fixed(1_000)));
        let a = hlc.stamp(None);
        let b = hlc.stamp(None);
        assert!(b > a);
        assert_eq!(a, Timestamp::from_millis(1_000));
    }

    #[test]
    fn a_stamp_is_above_the_cookie_floor() {
        let hlc = Hlc::new(Arc::new(Fixed(1_000)));
        let floor = Timestamp::from_millis(11_000);
        assert_eq!(hlc.stamp(Some(floor)), floor.next());
    }
}
