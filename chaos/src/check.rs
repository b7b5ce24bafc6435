//! After the load: the database, the dead letters and the results API against the model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl as _;
use landslide_patience::Backoff;
use uuid::Uuid;

use crate::workload::{POLL, VoterOutcome};

/// How many examples of each kind of difference a report names.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone, QueryableByName)]
pub struct Ballot {
    #[diesel(sql_type = SqlUuid)]
    pub voter: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    #[diesel(sql_type = Text)]
    pub choice: String,
}

#[derive(Debug, QueryableByName)]
struct Count {
    #[diesel(sql_type = Text)]
    option: String,
    #[diesel(sql_type = BigInt)]
    votes: i64,
}

/// What the database holds for the poll.
#[derive(Debug, Default)]
pub struct Stored {
    pub ballots: Vec<Ballot>,
    /// sum(votes) of the tally shards, per option.
    pub tallies: BTreeMap<String, i64>,
}

pub async fn read_database(url: &str) -> anyhow::Result<Stored> {
    let url = landslide_schema::postgres::DatabaseUrl::parse(url)?;
    let mut conn = landslide_schema::postgres::connect(&url)
        .await
        .context("cannot connect to the harness's PostgreSQL")?;
    let ballots = diesel::sql_query("SELECT voter, event_id, choice FROM ballots WHERE poll = $1")
        .bind::<Text, _>(POLL)
        .load::<Ballot>(&mut conn)
        .await?;
    let tallies = diesel::sql_query(
        "SELECT option, sum(votes)::bigint AS votes FROM tallies WHERE poll = $1 GROUP BY option",
    )
    .bind::<Text, _>(POLL)
    .load::<Count>(&mut conn)
    .await?
    .into_iter()
    .map(|c| (c.option, c.votes))
    .collect();
    Ok(Stored { ballots, tallies })
}

/// The ballots against what the voters were told.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Voters with an accepted vote and no ballot.
    pub lost: usize,
    /// Ballots of a voter who already has one (under another voter id), by one of their events.
    pub doubled: usize,
    /// Ballots that are not the voter's latest accepted vote.
    pub misordered: usize,
    /// Ballots of no voter the harness knows, by no event it was told of, beyond the orphans.
    pub phantom: usize,
    /// Ballots of no voter the harness knows, each explained by a different unanswered vote
    /// sent with neither cookie nor key, of the same choice ([`VoterOutcome::unlinked`]).
    /// Not a fault of the pipeline: the vote was stored, its answer (and with it the voter
    /// id) was lost, and its voter voted again as somebody new. Only a cookie from an earlier
    /// answer or an `Idempotency-Key` links the two.
    pub orphaned: usize,
    /// The expected count of each option: voters whose latest accepted vote chose it, plus
    /// the orphans.
    pub expected: BTreeMap<String, i64>,
    pub examples: Vec<String>,
    /// The lost and misordered voters the examples name, for the lookup in the stream.
    pub suspects: Vec<Suspect>,
}

/// A voter whose ballot is missing or is not its latest accepted vote.
#[derive(Debug, Clone)]
pub struct Suspect {
    pub kind: SuspectKind,
    pub voter: Uuid,
    /// The event its ballot holds, if it has one.
    pub ballot: Option<Uuid>,
    /// Its latest accepted vote.
    pub latest: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspectKind {
    Lost,
    Misordered,
}

impl std::fmt::Display for SuspectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lost => "lost:",
            Self::Misordered => "misordered:",
        })
    }
}

pub fn compare(outcomes: &[VoterOutcome], ballots: &[Ballot]) -> Verdict {
    let mut verdict = Verdict::default();
    let by_voter: HashMap<Uuid, &Ballot> = ballots.iter().map(|b| (b.voter, b)).collect();
    let known_events: HashSet<Uuid> = outcomes
        .iter()
        .flat_map(|o| o.accepted.iter().map(|a| a.event_id))
        .collect();
    let mut known_voters = HashSet::new();
    let example = |verdict: &mut Verdict, text: String| {
        if verdict.examples.len() < EXAMPLES * 4 {
            verdict.examples.push(text);
        }
    };
    let suspect = |verdict: &mut Verdict, kind, voter, ballot: Option<&Ballot>, latest| {
        if verdict.suspects.len() < EXAMPLES * 4 {
            verdict.suspects.push(Suspect {
                kind,
                voter,
                ballot: ballot.map(|b| b.event_id),
                latest,
            });
        }
    };
    for outcome in outcomes {
        let (Some(voter), Some(last)) = (outcome.voter, outcome.last()) else {
            continue;
        };
        known_voters.insert(voter);
        *verdict.expected.entry(last.choice.to_owned()).or_default() += 1;
        match by_voter.get(&voter) {
            None => {
                verdict.lost += 1;
                suspect(&mut verdict, SuspectKind::Lost, voter, None, last.event_id);
                example(
                    &mut verdict,
                    format!("lost: voter {voter}, latest vote {}", last.event_id),
                );
            }
            Some(ballot) if ballot.choice != last.choice => {
                verdict.misordered += 1;
                let kind = SuspectKind::Misordered;
                suspect(&mut verdict, kind, voter, Some(ballot), last.event_id);
                example(
                    &mut verdict,
                    format!(
                        "misordered: voter {voter} has {} ({}), latest accepted was {} ({})",
                        ballot.choice, ballot.event_id, last.choice, last.event_id
                    ),
                );
            }
            // The same choice by an earlier event is still the wrong order, unless the voter
            // sent a vote whose event id it never learnt.
            Some(ballot) if ballot.event_id != last.event_id && !outcome.ambiguous => {
                verdict.misordered += 1;
                let kind = SuspectKind::Misordered;
                suspect(&mut verdict, kind, voter, Some(ballot), last.event_id);
                example(
                    &mut verdict,
                    format!(
                        "misordered: voter {voter} has event {}, latest accepted was {} (same choice)",
                        ballot.event_id, last.event_id
                    ),
                );
            }
            Some(_) => {}
        }
    }
    let mut unlinked = BTreeMap::<&str, usize>::new();
    for choice in outcomes.iter().flat_map(|o| &o.unlinked) {
        *unlinked.entry(choice).or_default() += 1;
    }
    for ballot in ballots {
        if known_voters.contains(&ballot.voter) {
            continue;
        }
        let explained = match unlinked.get_mut(ballot.choice.as_str()) {
            Some(n) if *n > 0 && !known_events.contains(&ballot.event_id) => {
                *n -= 1;
                true
            }
            _ => false,
        };
        if explained {
            verdict.orphaned += 1;
            *verdict.expected.entry(ballot.choice.clone()).or_default() += 1;
        } else if known_events.contains(&ballot.event_id) {
            verdict.doubled += 1;
            example(
                &mut verdict,
                format!(
                    "doubled: event {} also counts under voter {}",
                    ballot.event_id, ballot.voter
                ),
            );
        } else {
            verdict.phantom += 1;
            example(
                &mut verdict,
                format!(
                    "phantom: voter {} with unknown event {}",
                    ballot.voter, ballot.event_id
                ),
            );
        }
    }
    verdict
}

/// How waiting for the workers to drain the stream ended.
#[derive(Debug)]
pub enum Drain {
    /// Nothing pending or unacknowledged, after this long.
    Done(Duration),
    /// Still this many messages pending at the timeout.
    Pending(u64),
    /// A role exited on its own while we waited: the caller starts it again, or stops waiting.
    RoleDied,
}

/// Waits until the consumer has nothing pending or unacked, checking with `role_died` that no
/// role has died meanwhile (a dead worker would make the wait pointless).
pub async fn wait_drained(
    nats: &landslide_nats::NatsConfig,
    timeout: Duration,
    mut role_died: impl FnMut() -> bool,
) -> anyhow::Result<Drain> {
    let client =
        landslide_nats::connect(nats, landslide_nats::User::Admin, "landslide-chaos-drain").await?;
    let js = async_nats::jetstream::new(client);
    let topology = landslide_nats::Topology::default();
    let started = Instant::now();
    let mut last_pending = u64::MAX;
    // Often enough to time a drain of a few seconds (the benchmark does) to within 1%.
    let mut backoff = Backoff::constant(Duration::from_millis(20))
        .deadline(started + timeout, "the stream to drain");
    loop {
        if role_died() {
            return Ok(Drain::RoleDied);
        }
        // Every vote partition's.
        if let Ok(pending) = landslide_nats::partitions::pending(&js, &topology).await {
            last_pending = pending;
            if last_pending == 0 {
                return Ok(Drain::Done(started.elapsed()));
            }
        }
        if backoff.wait().await.is_err() {
            return Ok(Drain::Pending(last_pending));
        }
    }
}

/// Messages in each vote partition's stream, as partition 0's stream records them.
pub async fn partition_messages(
    nats: &landslide_nats::NatsConfig,
    vote_partitions: u16,
) -> anyhow::Result<Vec<(String, u64)>> {
    let client =
        landslide_nats::connect(nats, landslide_nats::User::Admin, "landslide-chaos-streams")
            .await?;
    let js = async_nats::jetstream::new(client);
    let topology = landslide_nats::Topology {
        vote_partitions,
        ..landslide_nats::Topology::default()
    };
    let mut counts = Vec::new();
    for partition in landslide_nats::partitions::streams(&js, &topology).await? {
        let mut stream = js.get_stream(&partition.votes_stream).await?;
        let messages = stream.info().await?.state.messages;
        counts.push((partition.votes_stream, messages));
    }
    Ok(counts)
}

/// The dead-letter stream's payloads.
pub async fn dead_letters(nats: &landslide_nats::NatsConfig) -> anyhow::Result<Vec<Vec<u8>>> {
    let client =
        landslide_nats::connect(nats, landslide_nats::User::Admin, "landslide-chaos-dlq").await?;
    let js = async_nats::jetstream::new(client);
    let topology = landslide_nats::Topology::default();
    let mut stream = js
        .get_stream(&topology.dlq_stream)
        .await
        .context("cannot open the dead-letter stream")?;
    let state = stream.info().await?.state.clone();
    let mut payloads = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        if let Ok(message) = stream.get_raw_message(seq).await {
            payloads.push(message.payload.to_vec());
        }
    }
    Ok(payloads)
}

/// What `GET /api/results/pets` says once it has caught up.
#[derive(Debug, serde::Deserialize)]
pub struct Results {
    pub counts: BTreeMap<String, i64>,
    pub pending: u64,
}

/// Reads the results until they show nothing pending and the expected counts, or `timeout`
/// passes; returns the last answer.
pub async fn settled_results(
    tally: &str,
    expected: &BTreeMap<String, i64>,
    timeout: Duration,
) -> anyhow::Result<Results> {
    let url = format!("{tally}/api/results/{POLL}");
    let mut backoff =
        Backoff::constant(Duration::from_millis(100)).within(timeout, "the results to settle");
    loop {
        let results: Results = reqwest::get(&url).await?.error_for_status()?.json().await?;
        let counts_match = expected
            .iter()
            .all(|(option, n)| results.counts.get(option).copied().unwrap_or(0) == *n)
            && results.counts.values().sum::<i64>() == expected.values().sum::<i64>();
        if (results.pending == 0 && counts_match) || backoff.wait().await.is_err() {
            return Ok(results);
        }
    }
}
