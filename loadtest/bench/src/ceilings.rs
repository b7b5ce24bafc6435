//! The ceilings: what each stage's unavoidable work costs when done by the plainest code, on the
//! same machine in the same run, with the same event bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use diesel_async::RunQueryDsl as _;
use futures::StreamExt as _;
use landslide_schema::{Choice, EventId, NodeId, PollId, Timestamp, VoteEvent, VoterId};
use uuid::Uuid;

use crate::procs::{CpuMeter, Group};

/// A measured rate and the CPU seconds each process group spent per operation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    pub ops: u64,
    pub seconds: f64,
    pub rate: f64,
    /// CPU microseconds per operation, by process group.
    pub cpu_us_per_op: Vec<(String, f64)>,
}

impl Measured {
    pub fn new(ops: u64, elapsed: Duration, cpu: Vec<(String, f64)>) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            ops,
            seconds,
            rate: ops as f64 / seconds,
            cpu_us_per_op: cpu
                .into_iter()
                .map(|(name, secs)| (name, secs * 1e6 / ops.max(1) as f64))
                .collect(),
        }
    }

    pub fn cpu_us(&self, group: &str) -> f64 {
        self.cpu_us_per_op
            .iter()
            .filter(|(name, _)| name == group)
            .map(|(_, us)| us)
            .sum()
    }

    pub fn total_cpu_us(&self) -> f64 {
        self.cpu_us_per_op.iter().map(|(_, us)| us).sum()
    }
}

/// `n` events of distinct voters, sorted by voter (as a worker's batch is), in the wire format.
pub fn events(n: usize, seed: u64) -> anyhow::Result<Vec<VoteEvent>> {
    let poll = PollId::parse("pets")?;
    let node = NodeId::parse("bench")?;
    let choices = [Choice::parse("cats")?, Choice::parse("dogs")?];
    // Stamped as one node would stamp them now: one clock reading, then the counter. The workers
    // dead-letter a stamp more than `MAX_TS_AHEAD` ahead of when the stream stored it, so a
    // fixed stamp in the future would drain as dead letters.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let now = Timestamp::from_millis(u64::try_from(now_ms)?);
    Ok((0..n as u128)
        .map(|i| VoteEvent {
            event_id: EventId(Uuid::from_u128(u128::from(seed) << 64 | i)),
            poll: poll.clone(),
            voter: VoterId(Uuid::from_u128(u128::from(seed) << 64 | i)),
            choice: choices[(i % 2) as usize].clone(),
            ts: Timestamp(now.0 + i as u64),
            node: node.clone(),
            rev: None,
            after: None,
            rev_hash: None,
        })
        .collect())
}

/// Publishes every event, with its message id when `ids`, keeping up to `in_flight` acks
/// outstanding.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    events: &[VoteEvent],
    in_flight: usize,
    ids: bool,
) -> anyhow::Result<()> {
    use async_nats::jetstream::message::PublishMessage;
    let mut pending = VecDeque::with_capacity(in_flight);
    for event in events {
        if pending.len() >= in_flight
            && let Some(ack) = pending.pop_front()
        {
            let ack: jetstream::context::PublishAckFuture = ack;
            ack.await?;
        }
        let mut message = PublishMessage::build().payload(event.encode().into());
        if ids {
            message = message.message_id(event.event_id.to_string());
        }
        pending.push_back(js.send_publish(subject.to_owned(), message).await?);
    }
    for ack in pending {
        ack.await?;
    }
    Ok(())
}

/// A fresh file-backed stream `name` on subject `name.lower()`, with atomic batches allowed and
/// the votes stream's duplicate window.
async fn fresh_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<String> {
    fresh_stream_with(js, name, 1).await
}

async fn fresh_stream_with(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> anyhow::Result<String> {
    let subject = name.to_lowercase().replace('_', ".");
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_atomic_publish: true,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create the {name} stream"))?;
    Ok(subject)
}

/// Raw single publishes into a fresh stream, ~1000 acks in flight, with or without message ids.
pub async fn raw_publish(
    js: &jetstream::Context,
    nats: &Group,
    events: &[VoteEvent],
    ids: bool,
) -> anyhow::Result<Measured> {
    let name = if ids {
        "BENCH_SINGLE_IDS"
    } else {
        "BENCH_SINGLE"
    };
    let subject = fresh_stream(js, name).await?;
    let meter = CpuMeter::start(vec![("bench", Group::me()), ("nats-server", nats.clone())]);
    let started = Instant::now();
    publish_all(js, &subject, events, 1000, ids).await?;
    let measured = Measured::new(events.len() as u64, started.elapsed(), meter.stop());
    js.delete_stream(name).await?;
    Ok(measured)
}

/// Stores `events` in `stream` as atomic batches of `size` without message ids, `in_flight`
/// batches at once.
pub async fn fill(
    client: &async_nats::Client,
    subject: &str,
    stream: &str,
    events: &[VoteEvent],
    size: usize,
    in_flight: usize,
) -> anyhow::Result<()> {
    let batches: Vec<Vec<(async_nats::HeaderMap, bytes::Bytes)>> = events
        .chunks(size)
        .map(|chunk| {
            chunk
                .iter()
                .map(|e| (async_nats::HeaderMap::new(), e.encode().into()))
                .collect()
        })
        .collect();
    let outcomes: Vec<landslide_nats::batch::Outcome> = futures::stream::iter(&batches)
        .map(|batch| {
            landslide_nats::batch::publish(client, subject, stream, batch, Duration::from_secs(10))
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    match outcomes
        .iter()
        .find(|o| !matches!(o, landslide_nats::batch::Outcome::Stored { .. }))
    {
        Some(failed) => anyhow::bail!("a batch was not stored: {failed:?}"),
        None => Ok(()),
    }
}

/// Raw atomic batches of `size` events without message ids, `in_flight` batches at once, into
/// a fresh stream; then raw fetch-and-ack of the same messages by a durable pull consumer with
/// explicit acks.
pub async fn batches_and_fetch(
    client: &async_nats::Client,
    js: &jetstream::Context,
    nats: &Group,
    events: &[VoteEvent],
    size: usize,
    in_flight: usize,
) -> anyhow::Result<(Measured, Measured)> {
    let stream = "BENCH_RAW";
    let subject = fresh_stream(js, stream).await?;
    let meter = CpuMeter::start(vec![("bench", Group::me()), ("nats-server", nats.clone())]);
    let started = Instant::now();
    fill(client, &subject, stream, events, size, in_flight).await?;
    let publish = Measured::new(events.len() as u64, started.elapsed(), meter.stop());

    let stream = js.get_stream(stream).await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let meter = CpuMeter::start(vec![("bench", Group::me()), ("nats-server", nats.clone())]);
    let started = Instant::now();
    let mut received = 0;
    while received < events.len() {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            message
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            received += 1;
        }
    }
    let fetch = Measured::new(received as u64, started.elapsed(), meter.stop());
    js.delete_stream("BENCH_RAW").await?;
    Ok((publish, fetch))
}

/// The worker's job in plain SQL: batches of 1000 distinct, sorted events, one statement each
/// (the worker's own unnest upsert with the exact tally), each its own commit.
pub async fn sql(
    database_url: &str,
    postgres: &Group,
    events: &[VoteEvent],
) -> anyhow::Result<Measured> {
    let url = landslide_schema::postgres::DatabaseUrl::parse(database_url)?;
    let mut conn = landslide_schema::postgres::connect(&url).await?;
    // As the stream stored them, outside the measured time.
    let stored_at = chrono::Utc::now();
    let votes: Vec<_> = events
        .iter()
        .map(|e| landslide_schema::merge::StoredVote::new(e.clone(), stored_at))
        .collect();
    let meter = CpuMeter::start(vec![("bench", Group::me()), ("postgres", postgres.clone())]);
    let started = Instant::now();
    for batch in votes.chunks(1000) {
        landslide_dedup_worker::UpsertBatch::new(batch.iter(), 0)
            .execute(&mut conn)
            .await
            .context("the upsert failed")?;
    }
    Ok(Measured::new(
        events.len() as u64,
        started.elapsed(),
        meter.stop(),
    ))
}

/// Prints the rate and nats-server CPU per message of raw atomic batches for each batch size and
/// number of batches in flight, against a private server that fsyncs before it acks.
pub async fn sweep(messages: usize, cluster: bool) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = if cluster {
        landslide_servers::NatsLayout::Cluster
    } else {
        landslide_servers::NatsLayout::Single
    };
    let nats = landslide_servers::Nats::start(layout, dir.path()).await?;
    let group = Group::of((0..nats.len()).filter_map(|i| nats.pid(i)));
    let client = nats.client(landslide_nats::User::Admin).await?;
    let js = jetstream::new(client.clone());
    println!("| batch | in flight | msg/s | nats-server CPU µs/msg |");
    println!("|---:|---:|---:|---:|");
    for size in [1, 10, 50, 200, 1000] {
        for in_flight in [1, 2, 4, 16] {
            let events = events(
                messages.min(size * 2000),
                size as u64 * 100 + in_flight as u64,
            )?;
            let stream = format!("SWEEP_{size}_{in_flight}");
            let subject = fresh_stream_with(&js, &stream, layout.replicas()).await?;
            let meter = CpuMeter::start(vec![("nats-server", group.clone())]);
            let started = Instant::now();
            fill(&client, &subject, &stream, &events, size, in_flight).await?;
            let m = Measured::new(events.len() as u64, started.elapsed(), meter.stop());
            println!(
                "| {size} | {in_flight} | {:.0} | {:.1} |",
                m.rate,
                m.cpu_us("nats-server")
            );
            js.delete_stream(&stream).await?;
        }
    }
    Ok(())
}
