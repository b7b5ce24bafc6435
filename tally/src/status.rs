//! `landslide status`: what an operator without the `nats` CLI needs to see, in one screen.
//! Per poll: its state, counts and pending votes; then the votes stream, the dead-letter stream
//! and the workers' consumer, as `nats stream info` and `nats consumer info` would show them.

use std::fmt;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use chrono::{DateTime, Utc};
use landslide_nats::{Access, User};
use landslide_schema::Revision;
use landslide_schema::postgres::marks;

use crate::audit::AuditConfig;
use crate::counts;
use crate::snapshot::{Snapshot, Status, observe, pending_despite};

/// One poll, as the results show it.
#[derive(Debug, Clone)]
pub struct PollStatus {
    pub id: String,
    pub question: String,
    pub status: Status,
    pub closes_at: Option<DateTime<Utc>>,
    /// Every option with its tally, in the definition's order.
    pub counts: Vec<(String, i64)>,
}

/// A stream's state.
#[derive(Debug, Clone)]
pub struct StreamStatus {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub replicas: usize,
    /// In a cluster: the leader, then each other replica with whether it is current and its lag.
    pub leader: Option<String>,
    pub followers: Vec<(String, bool, Option<u64>)>,
}

/// One vote partition's stream and the workers' consumer on it.
#[derive(Debug, Clone)]
pub struct PartitionStatus {
    pub votes: StreamStatus,
    pub consumer: String,
    /// Its accepted votes not yet counted.
    pub pending: u64,
    pub undelivered: u64,
    pub unacknowledged: u64,
    pub redelivered: u64,
    /// The last stream sequence delivered to a worker.
    pub delivered: u64,
}

/// Everything `landslide status` prints.
#[derive(Debug, Clone)]
pub struct DeploymentStatus {
    pub revision: Revision,
    pub polls: Vec<PollStatus>,
    /// Accepted votes not yet counted (undelivered plus unacknowledged), every partition's.
    pub pending: u64,
    /// Every vote partition: its stream and the workers' consumer on it.
    pub partitions: Vec<PartitionStatus>,
    pub dead_letters: StreamStatus,
    pub server_now: Option<DateTime<Utc>>,
    /// How the votes stream went backwards, while the workers have not taken up what it stored
    /// since (`landslide_nats::rollback`).
    pub regression: Option<String>,
    /// Every rollback of the votes stream the workers recorded.
    pub rollbacks: Vec<marks::Rollback>,
    /// How the workers' consumer differs from its definition, until the workers make it again
    /// (`landslide_nats::consumer_drift`).
    pub drift: Option<String>,
    /// How far the nats-servers' clocks differ, when beyond `landslide_nats::MAX_CLOCK_SKEW`.
    pub skew: Option<String>,
    /// What should not be so of the polls bucket (`landslide_nats::polls::findings`): a seal
    /// it lacks, a key that is not a valid revision.
    pub poll_findings: Vec<String>,
}

/// Reads the deployment's state; read-only, like tally.
pub async fn status(config: &AuditConfig) -> anyhow::Result<DeploymentStatus> {
    let connections = &config.connections;
    let client =
        landslide_nats::connect(&connections.nats, User::Audit, "landslide-status").await?;
    let js = jetstream::new(client);
    let topology = &connections.topology;
    let store = landslide_nats::polls::ensure_bucket(&js, topology, Access::ReadOnly).await?;
    let book = landslide_nats::polls::load(&store, &connections.polls, Access::ReadOnly).await?;
    let poll_findings = landslide_nats::polls::findings(&store).await?;
    let (revision, definitions) = book.latest();

    let mut conn = landslide_schema::postgres::connect_current(connections.database()?).await?;
    // As tally reads them: every partition's backlog before the counts.
    let observed = observe(&js, topology, &mut conn, &book).await?;
    let mut rollbacks = Vec::new();
    for (partition, _) in &observed.partitions {
        rollbacks.extend(
            marks::rollbacks(&mut conn, &partition.votes_stream)
                .await
                .context("cannot read the recorded rollbacks")?,
        );
    }
    let sums = counts::tally_sums(&mut conn)
        .await
        .context("cannot read the tallies")?;
    // The same snapshot the results are built from: its counts and its status.
    let hold = observed.hold();
    let server_now = observed.stream_now;
    let snapshot = Snapshot::build(
        &book,
        &observed.pending,
        &sums,
        Utc::now(),
        server_now,
        hold,
    );
    let pending = pending_despite(observed.pending.all, hold);
    let polls = definitions
        .iter()
        .filter_map(|poll| {
            let results = &snapshot.polls.get(&poll.id)?.results;
            Some(PollStatus {
                id: poll.id.to_string(),
                question: poll.question.clone(),
                status: results.status,
                closes_at: poll.closes_at,
                counts: poll
                    .options
                    .iter()
                    .map(|o| {
                        (
                            o.id.to_string(),
                            results.counts.get(&o.id).copied().unwrap_or(0),
                        )
                    })
                    .collect(),
            })
        })
        .collect();
    let mut partitions = Vec::with_capacity(observed.partitions.len());
    for (partition, backlog) in &observed.partitions {
        let consumer = &backlog.info;
        partitions.push(PartitionStatus {
            votes: stream_status(&js, &partition.votes_stream).await?,
            consumer: consumer.name.clone(),
            pending: backlog.pending,
            undelivered: consumer.num_pending,
            unacknowledged: consumer.num_ack_pending as u64,
            redelivered: consumer.num_redelivered as u64,
            delivered: consumer.delivered.stream_sequence,
        });
    }
    Ok(DeploymentStatus {
        revision,
        polls,
        pending,
        partitions,
        dead_letters: stream_status(&js, &topology.dlq_stream).await?,
        server_now,
        regression: observed.regression,
        rollbacks,
        drift: observed.drift,
        skew: observed.skew,
        poll_findings,
    })
}

async fn stream_status(js: &jetstream::Context, name: &str) -> anyhow::Result<StreamStatus> {
    let mut handle = js
        .get_stream(name)
        .await
        .with_context(|| format!("cannot open stream {name}"))?;
    let info: &stream::Info = handle
        .info()
        .await
        .with_context(|| format!("cannot read stream {name}"))?;
    let cluster = info.cluster.as_ref();
    Ok(StreamStatus {
        name: name.to_owned(),
        messages: info.state.messages,
        bytes: info.state.bytes,
        first_sequence: info.state.first_sequence,
        last_sequence: info.state.last_sequence,
        replicas: info.config.num_replicas,
        leader: cluster.and_then(|c| c.leader.clone()),
        followers: cluster
            .map(|c| {
                c.replicas
                    .iter()
                    .map(|p| (p.name.clone(), p.current, p.lag))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn status_word(status: Status) -> &'static str {
    match status {
        Status::NotOpen => "not open yet",
        Status::Open => "open",
        Status::Closed => "closed, counting",
        Status::Final => "final",
    }
}

impl fmt::Display for StreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stream {}: {} messages, {} bytes, sequences {} to {}, {} replica(s)",
            self.name,
            self.messages,
            self.bytes,
            self.first_sequence,
            self.last_sequence,
            self.replicas
        )?;
        if let Some(leader) = &self.leader {
            write!(f, "; leader {leader}")?;
            for (name, current, lag) in &self.followers {
                let state = if *current { "current" } else { "behind" };
                write!(f, ", {name} {state}")?;
                if let Some(lag) = lag.filter(|l| *l > 0) {
                    write!(f, " (lag {lag})")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "poll definitions: revision {}", self.revision)?;
        for poll in &self.polls {
            let total: i64 = poll.counts.iter().map(|(_, n)| n).sum();
            write!(
                f,
                "poll {} ({}): {}",
                poll.id,
                poll.question,
                status_word(poll.status)
            )?;
            if let Some(closes) = poll.closes_at {
                write!(f, ", closes at {}", closes.to_rfc3339())?;
            }
            writeln!(f)?;
            let counts: Vec<String> = poll
                .counts
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect();
            writeln!(f, "  counts: {}; total {total}", counts.join(", "))?;
        }
        writeln!(
            f,
            "pending: {} in {} vote partition(s)",
            self.pending,
            self.partitions.len()
        )?;
        for p in &self.partitions {
            writeln!(f, "{}", p.votes)?;
            writeln!(
                f,
                "  consumer {}: delivered up to sequence {}, lag {}; pending {} (not yet \
                 delivered {}, delivered and not acknowledged {}); redelivered {}",
                p.consumer,
                p.delivered,
                p.votes.last_sequence.saturating_sub(p.delivered),
                p.pending,
                p.undelivered,
                p.unacknowledged,
                p.redelivered
            )?;
        }
        writeln!(f, "{}", self.dead_letters)?;
        if let Some(regression) = &self.regression {
            writeln!(
                f,
                "ALARM: the votes stream went backwards and the workers have not yet taken up \
                 what it stored since: {regression}"
            )?;
        }
        if let Some(skew) = &self.skew {
            writeln!(f, "ALARM: {skew}; no poll is final meanwhile")?;
        }
        if let Some(drift) = &self.drift {
            writeln!(
                f,
                "ALARM: {drift}; the workers make it again from before anything not yet committed"
            )?;
        }
        for finding in &self.poll_findings {
            writeln!(f, "ALARM: {finding}")?;
        }
        for r in &self.rollbacks {
            writeln!(
                f,
                "rollback of {} found {}: {}; the workers had committed up to sequence {}, the \
                 stream ended at {}, the consumer had delivered {}; every message stored from {} \
                 on was counted again",
                r.stream,
                r.detected_at.to_rfc3339(),
                r.reason,
                r.mark_sequence,
                r.stream_last,
                r.consumer_delivered,
                r.restarted_from.to_rfc3339()
            )?;
        }
        match self.server_now {
            Some(now) => write!(f, "as of {} (the NATS server's clock)", now.to_rfc3339()),
            None => write!(f, "as of now (the NATS server sent no clock)"),
        }
    }
}
