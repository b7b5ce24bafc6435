//! `landslide audit`: folds the whole votes stream with the design's rules and compares the result
//! with the ballots and the tallies in PostgreSQL (design rule 7).
//!
//! The audit first waits until the workers' consumer has nothing pending or unacked, so that the
//! database should hold the effect of every message in the stream. It then reads the stream from
//! its first message up to the last one the consumer had delivered, through an ephemeral ordered
//! consumer of its own (it never acks or changes the workers' consumer). Run it after the poll
//! closed: votes that arrive while it runs show up as differences.
//!
//! Memory is one entry per (poll, voter); the ballots are streamed from the database, not loaded.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl as _;
use futures::StreamExt as _;
use landslide_config::Connections;
use landslide_nats::{Access, Topology, User, rollback};
use landslide_patience::Backoff;
use landslide_schema::db::ballots;
use landslide_schema::merge::OrderKey;
use landslide_schema::poll::Unjudged;
use landslide_schema::postgres::marks;
use landslide_schema::{Choice, EventId, PollBook, PollId, Polls, Timestamp, VoteEvent, VoterId};
use uuid::Uuid;

use crate::certificate::EventLog;
use crate::counts::{self, OptionCount};

/// How many differences of each kind [`AuditReport`]'s `Display` prints.
const SHOWN: usize = 50;

/// What the audit needs.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The broker (as the read-only `audit` user), the database (required), the names; the
    /// polls are the bucket's, never seeded from here.
    pub connections: Connections,
    /// How long to wait for the workers to drain the consumer before giving up.
    pub wait: Duration,
    /// The workers' bound for an event naming a revision the bucket lacks
    /// ([`landslide_schema::UNKNOWN_REVISION_BOUND`], which tests shorten for both).
    pub unknown_revision_bound: Duration,
}

impl AuditConfig {
    /// The default topology and polls; waits up to a minute for the workers to drain.
    pub fn new(connections: Connections) -> Self {
        Self {
            connections,
            wait: Duration::from_secs(60),
            unknown_revision_bound: landslide_schema::UNKNOWN_REVISION_BOUND,
        }
    }
}

/// A sequence that held one event when the workers committed it, and holds another (or none) now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReusedSequence {
    /// The vote partition's stream.
    pub stream: String,
    pub sequence: u64,
    pub committed: EventId,
    pub found: Option<EventId>,
}

/// A ballot's content: the choice and the order key of the event that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub choice: String,
    pub key: OrderKey,
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        write!(
            f,
            "{} (event {}, after {}, stored {} ns, ts {})",
            self.choice, key.event_id, key.after, key.stored_ns, key.ts
        )
    }
}

/// A voter of the stream without a ballot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBallot {
    pub poll: PollId,
    pub voter: VoterId,
    pub expected: Ballot,
}

/// A ballot of a voter the stream does not know (or of an unknown poll).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnexpectedBallot {
    pub poll: String,
    pub voter: VoterId,
    pub found: Ballot,
}

/// A ballot that is not the voter's latest event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongBallot {
    pub poll: PollId,
    pub voter: VoterId,
    pub expected: Ballot,
    pub found: Ballot,
}

/// A (poll, option) whose tally or ballot count differs from the stream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TallyMismatch {
    pub poll: String,
    pub option: String,
    /// Voters whose latest event chose this option.
    pub expected: i64,
    /// `sum(votes)` over the option's tally shards.
    pub tally: i64,
    /// `count(*)` of ballots with this choice.
    pub count: i64,
}

/// One vote partition's stream as the audit read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRead {
    pub stream: String,
    /// The sequences read, first to last (0 and 0 for an empty stream).
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// Sequences missing, as (first, last) ranges. Nothing is ever deleted from a votes stream,
    /// so any is a sign that it went backwards, or lost messages; any fails the audit.
    pub holes: Vec<(u64, u64)>,
}

/// What the audit found. Consistent when every list of differences is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Messages read from the votes stream.
    pub events_read: u64,
    /// Messages that are not a vote event.
    pub undecodable: u64,
    /// Vote events their poll revision refuses: an unknown poll or option, stored outside the
    /// poll's window, or stored when the revision had been superseded for longer than
    /// [`landslide_schema::poll::REVISION_OVERLAP`]. No ingest node answered 2xx for one.
    pub unknown_poll_or_option: u64,
    /// Vote events stamped further ahead of when the stream stored them than an ingest node may
    /// stamp (`landslide_schema::ts::judge_stamp`): no ingest node made them.
    pub stamped_ahead: u64,
    /// Vote events naming a poll revision (or a text of it) that the polls bucket does not
    /// hold, stored less than [`landslide_schema::UNKNOWN_REVISION_BOUND`] before the audit:
    /// no worker can judge them yet. Any makes the audit fail.
    pub unknown_revision: u64,
    /// Vote events naming a revision the bucket still lacks beyond that bound: no honest ingest
    /// node accepted them, and the workers dead-letter them (reason `unknown_revision`).
    pub unknown_revision_dead: u64,
    /// Vote events of a wire version newer than this release reads: accepted by an ingest node
    /// of a later release, which must audit them. Any makes the audit fail.
    pub newer_version: u64,
    /// Each vote partition's stream as the audit read it: its range and its holes.
    pub streams: Vec<StreamRead>,
    /// How a stream went backwards, while the workers have not taken up what it stored since.
    pub regression: Option<String>,
    /// Every rollback of the stream the workers recorded: accepted votes may be missing from the
    /// stream (their ballots then show as unexpected).
    pub rollbacks: Vec<marks::Rollback>,
    /// Sequences a recorded rollback marked that now hold another event: the stream used them
    /// again.
    pub reused: Vec<ReusedSequence>,
    /// The NATS server's clock once the consumer had nothing pending: what decides whether a
    /// poll had closed when the audit read the stream.
    pub server_now: Option<DateTime<Utc>>,
    /// Messages in the dead-letter stream; a correct worker put `undecodable +
    /// unknown_poll_or_option + stamped_ahead` there.
    pub dead_letters: u64,
    /// Distinct (poll, voter) among the valid events.
    pub voters: u64,
    /// Rows of the `ballots` table.
    pub ballots: u64,
    pub missing_ballots: Vec<MissingBallot>,
    pub unexpected_ballots: Vec<UnexpectedBallot>,
    pub wrong_ballots: Vec<WrongBallot>,
    pub tally_mismatches: Vec<TallyMismatch>,
}

impl AuditReport {
    /// True when the database holds exactly what the stream says.
    pub fn is_consistent(&self) -> bool {
        self.unknown_revision == 0
            && self.newer_version == 0
            && self.streams.iter().all(|s| s.holes.is_empty())
            && self.regression.is_none()
            && self.missing_ballots.is_empty()
            && self.unexpected_ballots.is_empty()
            && self.wrong_ballots.is_empty()
            && self.tally_mismatches.is_empty()
    }

    /// Messages that a correct worker dead-letters.
    pub fn dead_letters_expected(&self) -> u64 {
        self.undecodable
            + self.unknown_poll_or_option
            + self.stamped_ahead
            + self.unknown_revision_dead
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_consistent() {
            "CONSISTENT: the database holds exactly what the stream says"
        } else {
            "INCONSISTENT: the database differs from the stream"
        };
        writeln!(f, "audit: {verdict}")?;
        writeln!(
            f,
            "events read: {}; not counted: {} undecodable, {} refused by their poll definitions, \
             {} stamped ahead of the stream, {} naming a revision the polls bucket lacks; dead \
             letters stored: {}{}",
            self.events_read,
            self.undecodable,
            self.unknown_poll_or_option,
            self.stamped_ahead,
            self.unknown_revision_dead,
            self.dead_letters,
            if self.dead_letters == self.dead_letters_expected() {
                ""
            } else {
                " (differs from the messages not counted)"
            }
        )?;
        if let Some(regression) = &self.regression {
            writeln!(
                f,
                "the votes stream went backwards and the workers have not yet taken up what it \
                 stored since: {regression}"
            )?;
        }
        for r in &self.rollbacks {
            writeln!(
                f,
                "rollback recorded {}: {} (committed up to sequence {}, the stream ended at {}); \
                 votes stored from {} on were counted again, votes the stream lost show as \
                 unexpected ballots",
                r.detected_at.to_rfc3339(),
                r.reason,
                r.mark_sequence,
                r.stream_last,
                r.restarted_from.to_rfc3339()
            )?;
        }
        for reused in &self.reused {
            match reused.found {
                Some(found) => writeln!(
                    f,
                    "sequence {} of {} was used again: committed event {}, the stream holds \
                     {found}",
                    reused.sequence, reused.stream, reused.committed
                )?,
                None => writeln!(
                    f,
                    "sequence {} of {} held committed event {}, and holds no vote now",
                    reused.sequence, reused.stream, reused.committed
                )?,
            }
        }
        for read in &self.streams {
            list(
                f,
                &format!("holes in stream {}", read.stream),
                &read.holes,
                |f, (first, last)| write!(f, "sequences {first} to {last} are missing"),
            )?;
        }
        if self.newer_version > 0 {
            writeln!(
                f,
                "{} vote events are of a newer wire version than this release reads: audit \
                 with the release that wrote them",
                self.newer_version
            )?;
        }
        if self.unknown_revision > 0 {
            writeln!(
                f,
                "{} vote events name a poll revision the polls bucket does not hold: they \
                 cannot be judged",
                self.unknown_revision
            )?;
        }
        writeln!(f, "voters: {}; ballots: {}", self.voters, self.ballots)?;
        list(f, "missing ballots", &self.missing_ballots, |f, d| {
            write!(
                f,
                "poll {} voter {}: expected {}, no ballot",
                d.poll, d.voter, d.expected
            )
        })?;
        list(f, "unexpected ballots", &self.unexpected_ballots, |f, d| {
            write!(
                f,
                "poll {} voter {}: found {}, no such voter in the stream",
                d.poll, d.voter, d.found
            )
        })?;
        list(f, "wrong ballots", &self.wrong_ballots, |f, d| {
            write!(
                f,
                "poll {} voter {}: expected {}, found {}",
                d.poll, d.voter, d.expected, d.found
            )
        })?;
        list(f, "tally mismatches", &self.tally_mismatches, |f, d| {
            write!(
                f,
                "poll {} option {}: expected {}, tally {}, ballots {}",
                d.poll, d.option, d.expected, d.tally, d.count
            )
        })
    }
}

/// Prints a heading and the first [`SHOWN`] items of a non-empty list.
fn list<T>(
    f: &mut fmt::Formatter<'_>,
    heading: &str,
    items: &[T],
    item: impl Fn(&mut fmt::Formatter<'_>, &T) -> fmt::Result,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    writeln!(f, "{heading} ({}):", items.len())?;
    for d in items.iter().take(SHOWN) {
        f.write_str("  ")?;
        item(f, d)?;
        writeln!(f)?;
    }
    if items.len() > SHOWN {
        writeln!(f, "  … and {} more", items.len() - SHOWN)?;
    }
    Ok(())
}

/// The stream folded with design rules 2 and 3: per (poll, voter), the greatest order key
/// (`landslide_schema::merge`).
#[derive(Debug, Default)]
struct Fold {
    latest: HashMap<(PollId, VoterId), (OrderKey, Choice)>,
    events_read: u64,
    undecodable: u64,
    unknown_poll_or_option: u64,
    stamped_ahead: u64,
    unknown_revision: u64,
    unknown_revision_dead: u64,
    newer_version: u64,
    /// The time the fold judges by, and the bound: an event naming a revision the bucket lacks
    /// is a dead letter once it was stored longer ago than the bound.
    now: DateTime<Utc>,
    bound: Duration,
}

impl Fold {
    /// Judges and folds one message; the event it holds, if it is one (counted or not).
    fn add(
        &mut self,
        payload: &[u8],
        stored_at: DateTime<Utc>,
        polls: &PollBook,
    ) -> Option<VoteEvent> {
        self.events_read += 1;
        let event = match VoteEvent::decode(payload) {
            Ok(event) => event,
            Err(err) if err.is_newer() => {
                self.newer_version += 1;
                return None;
            }
            Err(_) => {
                self.undecodable += 1;
                return None;
            }
        };
        let counted = match polls.judge_event(&event, stored_at) {
            Ok(_) => true,
            Err(Unjudged::NotCounted(_) | Unjudged::Superseded { .. }) => {
                self.unknown_poll_or_option += 1;
                false
            }
            Err(Unjudged::StampAhead(_)) => {
                self.stamped_ahead += 1;
                false
            }
            Err(Unjudged::UnknownRevision(_)) => {
                if landslide_schema::poll::waited_out(stored_at, self.now, self.bound) {
                    self.unknown_revision_dead += 1;
                } else {
                    self.unknown_revision += 1;
                }
                false
            }
        };
        if !counted {
            return Some(event);
        }
        // The merge rule of `landslide_schema::merge`, over a leaner entry than a whole event:
        // an audit of millions of voters keeps one of these per voter.
        let key = event.order_key(stored_at);
        match self.latest.entry((event.poll.clone(), event.voter)) {
            Entry::Vacant(entry) => {
                entry.insert((key, event.choice.clone()));
            }
            Entry::Occupied(mut entry) => {
                if key > entry.get().0 {
                    entry.insert((key, event.choice.clone()));
                }
            }
        }
        Some(event)
    }

    /// Voters per (poll, option), with every option of every poll present.
    fn expected_counts(&self, polls: &Polls) -> BTreeMap<(String, String), i64> {
        let mut counts: BTreeMap<(String, String), i64> = polls
            .iter()
            .flat_map(|poll| {
                poll.options
                    .iter()
                    .map(|o| ((poll.id.to_string(), o.id.to_string()), 0))
            })
            .collect();
        for ((poll, _), (_, choice)) in &self.latest {
            *counts
                .entry((poll.to_string(), choice.to_string()))
                .or_default() += 1;
        }
        counts
    }
}

/// Waits for the workers to drain, folds the stream and compares it with the database.
///
/// Errors (rather than reporting) when NATS or PostgreSQL cannot be read, or when the consumer
/// still has pending or unacked votes after `config.wait`.
pub async fn audit(config: &AuditConfig) -> anyhow::Result<AuditReport> {
    audit_with_polls(config, None)
        .await
        .map(|(report, _)| report)
}

/// [`audit`], with the poll definitions it judged the stream by, and writing the events of one
/// poll to `log` as it reads them (for the certificate and the record).
pub(crate) async fn audit_with_polls(
    config: &AuditConfig,
    log: Option<&mut EventLog>,
) -> anyhow::Result<(AuditReport, PollBook)> {
    let connections = &config.connections;
    let mut conn = landslide_schema::postgres::connect_current(connections.database()?).await?;
    let client = landslide_nats::connect(&connections.nats, User::Audit, "landslide-audit").await?;
    let js = jetstream::new(client);
    let topology = &connections.topology;
    let partitions = landslide_nats::partitions::streams(&js, topology).await?;
    // The published record names one stream (`landslide_schema::record`, format v1): a poll's
    // record of a deployment whose votes are split over several is refused, not written in part.
    anyhow::ensure!(
        log.is_none() || partitions.len() == 1,
        "the votes are split over {} partition streams ({}), and this release's record holds \
         one stream: nothing was exported",
        partitions.len(),
        partitions
            .iter()
            .map(|p| p.votes_stream.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let (lasts, server_now) = wait_until_drained(&js, &partitions, config.wait).await?;
    let store = landslide_nats::polls::ensure_bucket(&js, topology, Access::ReadOnly).await?;
    let polls = landslide_nats::polls::load(&store, &connections.polls, Access::ReadOnly).await?;
    let mut fold = Fold {
        now: server_now.unwrap_or_else(Utc::now),
        bound: config.unknown_revision_bound,
        ..Fold::default()
    };
    let mut log = log;
    let (mut streams, mut regression, mut all_rollbacks, mut reused) =
        (Vec::new(), None, Vec::new(), Vec::new());
    // Every partition into one fold: a voter whose votes are in two partitions has one ballot,
    // the latest by the merge rule, whichever stream holds it.
    for (partition, last) in partitions.iter().zip(lasts) {
        let name = &partition.votes_stream;
        let stream = js
            .get_stream(name)
            .await
            .with_context(|| format!("cannot open the votes stream {name}"))?;
        // Has the stream gone backwards (`landslide_nats::rollback`)? Then what it holds now is
        // not all that was accepted, and the recorded rollbacks say where to look.
        let mark = marks::read_mark(&mut conn, name)
            .await
            .context("cannot read the workers' mark")?;
        if regression.is_none() {
            regression = rollback::judge(
                mark.as_ref(),
                &rollback::observe(&js, partition, mark.as_ref()).await?,
            )
            .map(|r| r.to_string());
        }
        let rollbacks = marks::rollbacks(&mut conn, name)
            .await
            .context("cannot read the recorded rollbacks")?;
        let marked: Vec<u64> = rollbacks.iter().map(|r| r.mark_sequence).collect();
        let (read, at_marks) = read_stream(
            &stream,
            name,
            last,
            &polls,
            &marked,
            &mut fold,
            log.as_deref_mut(),
        )
        .await?;
        reused.extend(rollbacks.iter().filter_map(|r| {
            let committed = r.mark_event_id?;
            let found = at_marks.get(&r.mark_sequence).copied().flatten();
            (found != Some(committed)).then(|| ReusedSequence {
                stream: name.clone(),
                sequence: r.mark_sequence,
                committed,
                found,
            })
        }));
        streams.push(read);
        all_rollbacks.extend(rollbacks);
    }
    let dead_letters = js
        .get_stream(&topology.dlq_stream)
        .await
        .with_context(|| format!("cannot open the dead-letter stream {}", topology.dlq_stream))?
        .cached_info()
        .state
        .messages;

    let mut report = AuditReport {
        events_read: fold.events_read,
        undecodable: fold.undecodable,
        unknown_poll_or_option: fold.unknown_poll_or_option,
        stamped_ahead: fold.stamped_ahead,
        unknown_revision: fold.unknown_revision,
        unknown_revision_dead: fold.unknown_revision_dead,
        newer_version: fold.newer_version,
        streams,
        server_now,
        dead_letters,
        voters: fold.latest.len() as u64,
        regression,
        rollbacks: all_rollbacks,
        reused,
        ..AuditReport::default()
    };
    let expected = fold.expected_counts(polls.latest().1);
    compare_ballots(&mut conn, fold.latest, &mut report).await?;
    let tallies = counts::tally_sums(&mut conn)
        .await
        .context("cannot read the tallies")?;
    let ballot_counts = counts::ballot_counts(&mut conn)
        .await
        .context("cannot count the ballots")?;
    report.tally_mismatches = compare_counts(expected, &tallies, &ballot_counts);
    Ok((report, polls))
}

/// Waits until the workers' consumer of every partition has nothing pending or unacked, and
/// returns the last stream sequence each delivered (every message up to it has then been
/// committed or dead-lettered), with the earliest of the partition leaders' clocks.
async fn wait_until_drained(
    js: &jetstream::Context,
    partitions: &[Topology],
    wait: Duration,
) -> anyhow::Result<(Vec<u64>, Option<DateTime<Utc>>)> {
    let mut backoff =
        Backoff::constant(Duration::from_millis(100)).within(wait, "the votes to be committed");
    loop {
        let backlogs = landslide_nats::partitions::backlogs(js, partitions).await?;
        if backlogs.iter().all(|b| b.pending == 0) {
            let server_now = landslide_nats::partitions::earliest_clock(&backlogs);
            let lasts = backlogs
                .iter()
                .map(|b| b.info.delivered.stream_sequence)
                .collect();
            return Ok((lasts, server_now));
        }
        if backoff.wait().await.is_err() {
            let waiting: Vec<String> = partitions
                .iter()
                .zip(&backlogs)
                .filter(|(_, b)| b.pending > 0)
                .map(|(p, b)| {
                    format!(
                        "consumer {} of {} still has {} votes not delivered and {} not \
                         acknowledged",
                        p.consumer, p.votes_stream, b.info.num_pending, b.info.num_ack_pending
                    )
                })
                .collect();
            anyhow::bail!(
                "the votes are not all committed after waiting {wait:?}: {}; let the \
                 dedup-workers drain them (are they running?) and audit again",
                waiting.join("; ")
            );
        }
    }
}

/// Folds messages 1..=`last` of the stream `name` into `fold`, noting its range and holes and
/// the events at `marked` sequences; and writes the events of the log's poll to `log`.
async fn read_stream(
    stream: &jetstream::stream::Stream,
    name: &str,
    last: u64,
    polls: &PollBook,
    marked: &[u64],
    fold: &mut Fold,
    mut log: Option<&mut EventLog>,
) -> anyhow::Result<(StreamRead, BTreeMap<u64, Option<EventId>>)> {
    let mut read = StreamRead {
        stream: name.to_owned(),
        ..StreamRead::default()
    };
    // The event at each sequence a recorded rollback marked: `None` for no vote there.
    let mut at_marks: BTreeMap<u64, Option<EventId>> =
        marked.iter().map(|sequence| (*sequence, None)).collect();
    let mut reader =
        landslide_nats::StreamReader::open(stream, last, User::Audit, "landslide audit").await?;
    while let Some(stored) = reader.next().await? {
        // Nothing is ever deleted from the votes stream: a sequence that is not there is a hole.
        let expected = read.last_sequence + 1;
        if stored.sequence > expected {
            read.holes.push((expected, stored.sequence - 1));
        }
        if read.first_sequence == 0 {
            read.first_sequence = stored.sequence;
        }
        read.last_sequence = stored.sequence;
        if let Some(at) = at_marks.get_mut(&stored.sequence) {
            *at = VoteEvent::decode(&stored.message.payload)
                .ok()
                .map(|e| e.event_id);
        }
        let event = fold.add(&stored.message.payload, stored.stored_at, polls);
        if let (Some(log), Some(event)) = (log.as_deref_mut(), event) {
            log.push(stored.sequence, stored.stored_at, &event)?;
        }
    }
    Ok((read, at_marks))
}

/// Streams the ballots and compares each with the fold, which it empties: what is left are the
/// voters without a ballot.
async fn compare_ballots(
    conn: &mut diesel_async::AsyncPgConnection,
    mut latest: HashMap<(PollId, VoterId), (OrderKey, Choice)>,
    report: &mut AuditReport,
) -> anyhow::Result<()> {
    let mut rows = ballots::table
        .select((
            ballots::poll,
            ballots::voter,
            ballots::choice,
            ballots::ts,
            ballots::event_id,
            ballots::after_ts,
            ballots::stored_ns,
        ))
        .load_stream::<(String, Uuid, String, i64, Uuid, i64, i64)>(conn)
        .await
        .context("cannot read the ballots")?;
    while let Some(row) = rows.next().await {
        let (poll, voter, choice, ts, event_id, after, stored_ns) =
            row.context("cannot read the ballots")?;
        report.ballots += 1;
        let voter = VoterId(voter);
        let found = Ballot {
            choice,
            key: OrderKey {
                after: Timestamp::from_i64(after),
                stored_ns,
                ts: Timestamp::from_i64(ts),
                event_id: EventId(event_id),
            },
        };
        let held = PollId::parse(poll.as_str())
            .ok()
            .and_then(|id| latest.remove_entry(&(id, voter)));
        match held {
            None => report
                .unexpected_ballots
                .push(UnexpectedBallot { poll, voter, found }),
            Some(((poll, _), (key, choice))) => {
                let expected = Ballot {
                    choice: choice.to_string(),
                    key,
                };
                if expected != found {
                    report.wrong_ballots.push(WrongBallot {
                        poll,
                        voter,
                        expected,
                        found,
                    });
                }
            }
        }
    }
    report.missing_ballots = latest
        .into_iter()
        .map(|((poll, voter), (key, choice))| MissingBallot {
            poll,
            voter,
            expected: Ballot {
                choice: choice.to_string(),
                key,
            },
        })
        .collect();
    // Stable output for people and tests.
    report
        .missing_ballots
        .sort_by(|a, b| (&a.poll, a.voter).cmp(&(&b.poll, b.voter)));
    report
        .unexpected_ballots
        .sort_by(|a, b| (&a.poll, a.voter).cmp(&(&b.poll, b.voter)));
    report
        .wrong_ballots
        .sort_by(|a, b| (&a.poll, a.voter).cmp(&(&b.poll, b.voter)));
    Ok(())
}

/// Every (poll, option) where the stream, the tally and the ballot count do not all agree.
fn compare_counts(
    expected: BTreeMap<(String, String), i64>,
    tallies: &[OptionCount],
    ballot_counts: &[OptionCount],
) -> Vec<TallyMismatch> {
    // (expected, tally, count) per (poll, option), over the union of the three sources.
    let mut all: BTreeMap<(String, String), (i64, i64, i64)> = expected
        .into_iter()
        .map(|(key, n)| (key, (n, 0, 0)))
        .collect();
    for row in tallies {
        all.entry((row.poll.clone(), row.option.clone()))
            .or_default()
            .1 = row.votes;
    }
    for row in ballot_counts {
        all.entry((row.poll.clone(), row.option.clone()))
            .or_default()
            .2 = row.votes;
    }
    all.into_iter()
        .filter(|(_, (expected, tally, count))| expected != tally || expected != count)
        .map(|((poll, option), (expected, tally, count))| TallyMismatch {
            poll,
            option,
            expected,
            tally,
            count,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use landslide_schema::NodeId;

    use super::*;

    fn event(voter: u128, choice: &str, ts: u64, id: u128) -> Vec<u8> {
        VoteEvent {
            event_id: EventId(Uuid::from_u128(id)),
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId(Uuid::from_u128(voter)),
            choice: Choice::parse(choice).unwrap(),
            ts: Timestamp(ts),
            node: NodeId::parse("n1").unwrap(),
            rev: None,
            after: None,
            rev_hash: None,
        }
        .encode()
    }

    #[test]
    fn the_latest_event_wins_in_any_order_and_ties_break_on_the_event_id() {
        let book = PollBook::new(landslide_schema::Revision(1), Polls::default());
        let polls = book.latest().1;
        let mut fold = Fold::default();
        fold.add(&event(1, "dogs", 20, 1), Utc::now(), &book);
        fold.add(&event(1, "cats", 10, 9), Utc::now(), &book);
        fold.add(&event(2, "cats", 5, 2), Utc::now(), &book);
        fold.add(&event(2, "dogs", 5, 3), Utc::now(), &book);
        fold.add(b"garbage", Utc::now(), &book);
        fold.add(&event(3, "fish", 5, 4), Utc::now(), &book);
        assert_eq!(
            (
                fold.events_read,
                fold.undecodable,
                fold.unknown_poll_or_option
            ),
            (6, 1, 1)
        );
        let choice = |voter| {
            fold.latest[&(
                PollId::parse("pets").unwrap(),
                VoterId(Uuid::from_u128(voter)),
            )]
                .1
                .to_string()
        };
        assert_eq!(choice(1), "dogs");
        assert_eq!(choice(2), "dogs");
        let counts = fold.expected_counts(polls);
        assert_eq!(counts[&("pets".to_owned(), "dogs".to_owned())], 2);
        assert_eq!(counts[&("pets".to_owned(), "cats".to_owned())], 0);
    }

    #[test]
    fn counts_disagreeing_anywhere_are_reported() {
        let key = |o: &str| ("pets".to_owned(), o.to_owned());
        let expected = BTreeMap::from([(key("cats"), 2), (key("dogs"), 1)]);
        let row = |o: &str, votes| OptionCount {
            poll: "pets".to_owned(),
            option: o.to_owned(),
            votes,
        };
        let mismatches = compare_counts(
            expected,
            &[row("cats", 2), row("dogs", 2)],
            &[row("cats", 2), row("dogs", 1), row("fish", 1)],
        );
        let names: Vec<_> = mismatches.iter().map(|m| m.option.as_str()).collect();
        assert_eq!(names, ["dogs", "fish"]);
        assert_eq!(
            (
                mismatches[0].expected,
                mismatches[0].tally,
                mismatches[0].count
            ),
            (1, 2, 1)
        );
    }
}
