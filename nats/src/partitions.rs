//! Vote partitions: a deployment may split its votes over K streams, each a RAFT group of its
//! own with its own leader, so that no one leader serialises every write of a poll.
//!
//! Partition 0 is the deployment's votes stream (`VOTES` on `votes.*`); partition `i` is
//! `VOTES_P<i>` on `votes.p<i>.*` ([`Topology::partition`]). Each ingest node publishes to one
//! ([`node_partition`]); the workers drain every one through a durable consumer of the same name
//! on each; tally, audit, export, replay and `status` read every one.
//!
//! K is recorded once, in the metadata of partition 0's stream, where every role reads it:
//! [`PARTITIONS_KEY`] is K, [`STREAMS_KEY`] how many partition streams exist (K or more: lowering
//! K keeps the streams beyond it, whose votes stay to be drained and audited for the poll's
//! lifetime). Only the workers write it ([`Access::SetUp`]): a worker given a new K creates the
//! streams it lacks first, then records K, so an ingest node that finds K recorded finds its
//! stream too. Every other role refuses to start with a K other than the one recorded ([`Differ`]),
//! so two roles can never disagree on where votes go.

use std::collections::HashMap;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, stream};
use landslide_schema::NodeId;
use sha2::{Digest as _, Sha256};

use crate::{Access, MAX_VOTE_PARTITIONS, Topology};

/// The metadata key of partition 0's stream that records K, the number of partitions ingest
/// nodes publish to.
pub const PARTITIONS_KEY: &str = "landslide_vote_partitions";
/// The metadata key of partition 0's stream that records how many partition streams exist:
/// every one the deployment ever had, 0 to this less one.
pub const STREAMS_KEY: &str = "landslide_vote_streams";

/// What partition 0's stream records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// K: ingest nodes publish to partitions 0 to K - 1.
    pub partitions: u16,
    /// Partition streams that exist (at least K): workers drain, and readers read, all of them.
    pub streams: u16,
}

impl Recorded {
    /// What `config`'s metadata records: one partition and one stream when it records nothing
    /// (a stream made before partitions, or by a worker with K = 1).
    pub fn of(config: &stream::Config) -> anyhow::Result<Self> {
        let read = |key: &str| -> anyhow::Result<u16> {
            match config.metadata.get(key) {
                None => Ok(1),
                Some(value) => value
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_VOTE_PARTITIONS).contains(n))
                    .with_context(|| {
                        format!(
                            "stream {} records {key} = {value:?}, not a number from 1 to \
                             {MAX_VOTE_PARTITIONS}",
                            config.name
                        )
                    }),
            }
        };
        let partitions = read(PARTITIONS_KEY)?;
        let streams = read(STREAMS_KEY)?.max(partitions);
        Ok(Self {
            partitions,
            streams,
        })
    }

    fn write(self, metadata: &mut HashMap<String, String>) {
        metadata.insert(PARTITIONS_KEY.to_owned(), self.partitions.to_string());
        metadata.insert(STREAMS_KEY.to_owned(), self.streams.to_string());
    }
}

/// A role given a number of partitions other than the one the deployment records.
#[derive(Debug, thiserror::Error)]
#[error(
    "this role was started with {configured} vote partition(s) (--vote-partitions, \
     LANDSLIDE_VOTE_PARTITIONS) but stream {stream} records {recorded}: every role of a \
     deployment must be given the same number, and the workers change it first (OPERATIONS.md, \
     \"Changing the number of vote partitions\")"
)]
pub struct Differ {
    pub configured: u16,
    pub recorded: u16,
    pub stream: String,
}

/// The partition node `node` publishes to, of `partitions`: the first 8 bytes of the SHA-256 of
/// its id, big-endian, modulo the count. Every release and platform computes the same, and
/// `--partition` overrides it where a handful of nodes would otherwise share partitions unevenly.
pub fn node_partition(node: &NodeId, partitions: u16) -> u16 {
    let digest = Sha256::digest(node.as_str().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The remainder is below `partitions`, a u16.
    u16::try_from(u64::from_be_bytes(first) % u64::from(partitions.max(1))).unwrap_or(0)
}

/// Copies into `config` the metadata of `found` (the live definition), leaving out what the
/// server sets itself (`_nats.*`): an update replaces the whole definition, and the recorded
/// partitions must survive one as they were. Only [`ensure`] changes them, on purpose.
pub(crate) fn keep_metadata(config: &mut stream::Config, found: &stream::Config) {
    for (key, value) in &found.metadata {
        if !key.starts_with("_nats.") {
            config.metadata.insert(key.clone(), value.clone());
        }
    }
}

/// Ensures the vote partitions of `topology` (which names partition 0) and returns what the
/// deployment records.
///
/// With [`Access::SetUp`] (workers): creates every partition stream up to `topology`'s K, then
/// records K, keeping every stream that already exists. With [`Access::ReadOnly`]: checks that
/// partition 0 exists and records this K, else [`Differ`] (permanent) or not set up (waited
/// for).
pub async fn ensure(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<Recorded> {
    let configured = topology.vote_partitions;
    anyhow::ensure!(
        (1..=MAX_VOTE_PARTITIONS).contains(&configured),
        "vote partitions must be 1 to {MAX_VOTE_PARTITIONS}, not {configured}"
    );
    // A worker that makes partition 0's stream makes it with its K recorded: a node started
    // beside it must never find the stream without the record, and refuse a K of 3 for 1.
    let mut base = match access {
        Access::ReadOnly => crate::ensure_votes_stream(js, topology, access).await?,
        Access::SetUp => {
            let mut config = topology.votes_stream_config()?;
            Recorded {
                partitions: configured,
                streams: configured,
            }
            .write(&mut config.metadata);
            crate::ensure_stream(js, config, topology.votes_stream_value()?, access).await?
        }
    };
    let found = base
        .info()
        .await
        .with_context(|| format!("cannot read stream {}", topology.votes_stream))?
        .config
        .clone();
    let recorded = Recorded::of(&found)?;
    if access == Access::ReadOnly {
        if recorded.partitions != configured {
            return Err(Differ {
                configured,
                recorded: recorded.partitions,
                stream: topology.votes_stream.clone(),
            }
            .into());
        }
        return Ok(recorded);
    }
    let wanted = Recorded {
        partitions: configured,
        streams: recorded.streams.max(configured),
    };
    // The streams first: an ingest node that reads K finds its partition there.
    for partition in topology.partitions(wanted.streams).iter().skip(1) {
        crate::ensure_votes_stream(js, partition, access).await?;
    }
    if wanted != recorded {
        let mut config = found;
        config.metadata.retain(|key, _| !key.starts_with("_nats."));
        wanted.write(&mut config.metadata);
        js.update_stream(config).await.with_context(|| {
            format!(
                "cannot record the vote partitions in stream {}",
                topology.votes_stream
            )
        })?;
        tracing::warn!(
            stream = %topology.votes_stream,
            partitions.was = recorded.partitions,
            partitions.now = wanted.partitions,
            streams = wanted.streams,
            "recorded a new number of vote partitions"
        );
    }
    if topology.replicas > 1 {
        spread_leaders(js, &topology.partitions(wanted.streams)).await;
    }
    Ok(wanted)
}

/// Asks each partition's stream to move its leader to a server of its own: partition `i`'s to
/// the `i`-th (modulo their number) of its replicas' servers by name, so that on a three-node
/// cluster three partitions have three leaders. nats-server chooses a new stream's leader at
/// random (`setPreferred` in jetstream_cluster.go, since 2.12), which put all three on one server
/// in one run of four; a leader step-down may name the server it prefers (2.11+,
/// `JSApiLeaderStepdownRequest`). Advice, not a rule: a leader moves again when its server
/// fails, a step-down refused is logged and left, and the next worker to start spreads them
/// again. A step-down pauses the stream's writes for an election (ingest retries a publish it
/// did not see acked, with the same message id).
pub async fn spread_leaders(js: &jetstream::Context, partitions: &[Topology]) {
    for (index, partition) in partitions.iter().enumerate() {
        let name = &partition.votes_stream;
        let info: serde_json::Value = match js
            .request(format!("STREAM.INFO.{name}"), &serde_json::json!({}))
            .await
        {
            Ok(info) => info,
            Err(err) => {
                tracing::warn!(stream = %name, error = %err, "cannot read the stream's leader");
                continue;
            }
        };
        let cluster = &info["cluster"];
        let Some(leader) = cluster["leader"].as_str() else {
            continue;
        };
        let mut servers: Vec<&str> = cluster["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str())
            .chain([leader])
            .collect();
        servers.sort_unstable();
        servers.dedup();
        let preferred = servers[index % servers.len()];
        if preferred == leader {
            continue;
        }
        let body = serde_json::json!({ "placement": { "preferred": preferred } });
        let answer: Result<serde_json::Value, _> = js
            .request(format!("STREAM.LEADER.STEPDOWN.{name}"), &body)
            .await;
        match answer {
            Ok(answer) if answer["success"] == true => {
                tracing::info!(stream = %name, from = leader, to = preferred, "moved the partition's leader");
            }
            Ok(answer) => {
                tracing::warn!(stream = %name, to = preferred, answer = %answer, "the partition's leader was not moved");
            }
            Err(err) => {
                tracing::warn!(stream = %name, to = preferred, error = %err, "the partition's leader was not moved");
            }
        }
    }
}

/// [`ensure`], then the workers' consumer on every partition stream the deployment has (those
/// of a larger K that was lowered included): each partition's names with its consumer. What a
/// worker sets up (and tally checks) at startup.
pub async fn ensure_consumers(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<Vec<(Topology, consumer::PullConsumer)>> {
    let recorded = ensure(js, topology, access).await?;
    let mut consumers = Vec::new();
    for partition in topology.partitions(recorded.streams) {
        let consumer = crate::ensure_consumer(js, &partition, access).await?;
        consumers.push((partition, consumer));
    }
    Ok(consumers)
}

/// Every partition stream the deployment has, as partition 0's stream records them now: what
/// the workers drain and the readers (pending, audit, export, status) read. Read again each time,
/// so that a reader that runs on sees the partitions a worker adds.
pub async fn streams(
    js: &jetstream::Context,
    topology: &Topology,
) -> anyhow::Result<Vec<Topology>> {
    let base = js
        .get_stream(&topology.votes_stream)
        .await
        .with_context(|| format!("cannot read stream {}", topology.votes_stream))?;
    let recorded = Recorded::of(&base.cached_info().config)?;
    Ok(topology.partitions(recorded.streams))
}

/// Accepted votes not yet counted in every partition stream ([`crate::backlog`] of each, added
/// up): what "drained" means to the harness, the tests and an operator's script.
pub async fn pending(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<u64> {
    let backlogs = backlogs(js, &streams(js, topology).await?).await?;
    Ok(backlogs
        .iter()
        .map(|b| b.pending)
        .fold(0, u64::saturating_add))
}

/// The workers' backlog on each of `partitions` ([`crate::backlog`]), in their order.
pub async fn backlogs(
    js: &jetstream::Context,
    partitions: &[Topology],
) -> anyhow::Result<Vec<crate::Backlog>> {
    let mut backlogs = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let backlog = crate::backlog(js, &partition.votes_stream, &partition.consumer)
            .await
            .with_context(|| {
                format!(
                    "cannot read the consumer's pending count of {}",
                    partition.votes_stream
                )
            })?;
        backlogs.push(backlog);
    }
    Ok(backlogs)
}

/// The clock a close is judged by over several partitions: the earliest of their leaders' (a
/// close is passed once every one has passed it), `None` while one did not say.
pub fn earliest_clock<'a>(
    backlogs: impl IntoIterator<Item = &'a crate::Backlog>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    backlogs
        .into_iter()
        .map(|b| b.server_now)
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_its_partition_and_nodes_spread_over_them() {
        let node = |s: &str| NodeId::parse(s).unwrap();
        assert_eq!(node_partition(&node("web01"), 1), 0);
        // Fixed for good: a node must not move between releases.
        assert_eq!(
            (1..=3)
                .map(|k| node_partition(&node("web01"), k))
                .collect::<Vec<_>>(),
            [0, 0, 2]
        );
        let mut seen = [0usize; 3];
        for i in 0..300 {
            seen[usize::from(node_partition(&node(&format!("web{i}")), 3))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 70), "{seen:?}");
    }

    #[test]
    fn the_record_defaults_to_one_and_refuses_nonsense() {
        let mut config = stream::Config {
            name: "VOTES".into(),
            ..Default::default()
        };
        assert_eq!(
            Recorded::of(&config).unwrap(),
            Recorded {
                partitions: 1,
                streams: 1
            }
        );
        Recorded {
            partitions: 2,
            streams: 5,
        }
        .write(&mut config.metadata);
        assert_eq!(Recorded::of(&config).unwrap().streams, 5);
        config.metadata.insert(PARTITIONS_KEY.into(), "17".into());
        let err = Recorded::of(&config).unwrap_err().to_string();
        assert!(err.contains("VOTES") && err.contains("17"), "{err}");
    }

    #[test]
    fn partitions_have_names_and_subjects_of_their_own() {
        let t = Topology::default();
        let p = t.partitions(3);
        assert_eq!(p[0], t);
        assert_eq!(p[2].votes_stream, "VOTES_P2");
        assert_eq!(p[2].votes_prefix, "votes.p2");
        assert_eq!(p[2].consumer, t.consumer);
        assert_eq!(p[2].dlq_stream, t.dlq_stream);
        assert_eq!(p[1].votes_stream_config().unwrap().subjects, ["votes.p1.*"]);
    }
}
