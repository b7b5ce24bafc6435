//! `landslide replay`: folds the votes stream into a database again, from its first message.
//!
//! A PostgreSQL restored from last night's backup lacks every ballot committed since, and the
//! workers' consumer has long acknowledged those messages: they will never be delivered again. A
//! new, empty database lacks everything. The stream holds every accepted vote, so folding it again
//! makes either whole. It is the workers' own write (the same judge, the same merge, the same
//! upsert), fed from an ordered consumer instead of the durable one, so it is idempotent: an event
//! that a ballot already reflects, or that a later vote outranks, changes nothing. Run it as often
//! as you like, beside running workers; then `landslide audit` passes.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use diesel_async::AsyncConnection as _;
use landslide_nats::{Access, User};
use landslide_schema::merge::StoredVote;
use landslide_schema::poll::Unjudged;
use landslide_schema::{VoteEvent, merge};

use crate::Config;
use crate::upsert::UpsertBatch;

/// Events folded into one transaction by default: memory and transaction size stay bounded.
pub const CHUNK: usize = 50_000;

/// What a replay read and wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages read: of each vote partition's stream, sequences 1 to its `last_sequences`.
    pub events_read: u64,
    /// Events that count (the rest are dead letters: undecodable, refused by the polls, or
    /// stamped further ahead of when the stream stored them than a node may stamp).
    pub counted: u64,
    pub not_counted: u64,
    /// Each vote partition's stream and its last sequence when the replay began; later votes
    /// are the workers'.
    pub last_sequences: Vec<(String, u64)>,
    /// Transactions committed.
    pub transactions: u64,
    pub took: Duration,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay: folded {} into the database: {} events read, {} counted, {} not counted \
             (dead letters), {} transactions, {:.1} s",
            self.last_sequences
                .iter()
                .map(|(stream, last)| format!("stream {stream} sequences 1..={last}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.events_read,
            self.counted,
            self.not_counted,
            self.transactions,
            self.took.as_secs_f64()
        )
    }
}

/// Folds every message of the votes stream, up to its last sequence at the start, into the
/// database (migrated, perhaps empty), `chunk` events per transaction. Reads
/// the worker's configuration: its NATS, database, topology and polls.
pub async fn replay(config: &Config, chunk: usize) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let connections = &config.connections;
    let url = connections.database()?;
    let mut conn = crate::connect_db(url).await?;
    // Replay writes as a worker does, and may not migrate: a new database is migrated first
    // (`landslide migrate`, as the schema's owner).
    landslide_schema::postgres::check_schema(&mut conn)
        .await
        .with_context(|| format!("the database at {url} (DATABASE_URL) is not ready"))?;
    let client =
        landslide_nats::connect(&connections.nats, User::Worker, "landslide-replay").await?;
    let js = jetstream::new(client);
    let topology = &connections.topology;
    let mut report = ReplayReport::default();
    // Its own shard: the tallies' sum over shards is what counts, and a running worker's rows
    // are never waited on.
    let shard = crate::random_shard();
    let store = landslide_nats::polls::ensure_bucket(&js, topology, Access::SetUp).await?;
    let polls = landslide_nats::polls::load(&store, &connections.polls, Access::SetUp).await?;
    let chunk_size = chunk.max(1);
    let mut chunk = Vec::with_capacity(chunk_size.min(100_000));
    // Every vote partition in turn: the merge is independent of the order events arrive in,
    // so a voter whose votes are in two partitions ends with the latest either way.
    for partition in landslide_nats::partitions::streams(&js, topology).await? {
        let name = &partition.votes_stream;
        let mut stream = js
            .get_stream(name)
            .await
            .with_context(|| format!("cannot open the votes stream {name}"))?;
        let last = stream
            .info()
            .await
            .with_context(|| format!("cannot read the state of {name}"))?
            .state
            .last_sequence;
        report.last_sequences.push((name.clone(), last));
        let mut reader =
            landslide_nats::StreamReader::open(&stream, last, User::Worker, "landslide replay")
                .await?;
        while let Some(stored) = reader.next().await? {
            report.events_read += 1;
            let sequence = stored.sequence;
            let event = match VoteEvent::decode(&stored.message.payload) {
                Ok(event) => event,
                // Accepted by an ingest node of a later release: only that release can replay it.
                Err(err) if err.is_newer() => {
                    return Err(anyhow::anyhow!(err))
                        .with_context(|| format!("cannot replay sequence {sequence} of {name}"));
                }
                Err(_) => {
                    report.not_counted += 1;
                    continue;
                }
            };
            match polls.judge_event(&event, stored.stored_at) {
                Ok(_) => chunk.push(StoredVote::new(event, stored.stored_at)),
                Err(
                    Unjudged::NotCounted(_) | Unjudged::StampAhead(_) | Unjudged::Superseded { .. },
                ) => {
                    report.not_counted += 1;
                }
                // The bucket, read at the start, still lacks it beyond the bound: a dead letter, as
                // the workers judged it.
                Err(Unjudged::UnknownRevision(_))
                    if landslide_schema::poll::waited_out(
                        stored.stored_at,
                        chrono::Utc::now(),
                        config.unknown_revision_bound,
                    ) =>
                {
                    report.not_counted += 1;
                }
                // Accepted by an ingest node under a revision the bucket lacks: skipping it would
                // drop an accepted vote, so the replay stops and says so.
                Err(unjudged @ Unjudged::UnknownRevision(_)) => {
                    return Err(anyhow::anyhow!(unjudged))
                        .with_context(|| format!("cannot replay sequence {sequence} of {name}"));
                }
            }
            if chunk.len() >= chunk_size {
                report.counted += commit(&mut conn, &mut chunk, shard).await?;
                report.transactions += 1;
            }
        }
    }
    if !chunk.is_empty() {
        report.counted += commit(&mut conn, &mut chunk, shard).await?;
        report.transactions += 1;
    }
    report.took = started.elapsed();
    Ok(report)
}

/// Merges `events` per voter and upserts the survivors in one transaction; returns how many
/// events it folded, and leaves `events` empty.
async fn commit(
    conn: &mut diesel_async::AsyncPgConnection,
    events: &mut Vec<StoredVote>,
    shard: i16,
) -> anyhow::Result<u64> {
    let folded = events.len() as u64;
    let ballots = merge::latest_per_voter(events.drain(..));
    let upsert = UpsertBatch::new(ballots.values(), shard);
    conn.transaction::<_, diesel::result::Error, _>(async |conn| {
        diesel_async::RunQueryDsl::execute(upsert, conn).await
    })
    .await
    .context("cannot write the replayed ballots")?;
    Ok(folded)
}
