//! The results of every poll at one instant, rebuilt by one background task and shared through a
//! `watch` channel, so that viewers never cost a database query each.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::{DateTime, SecondsFormat, Utc};
use diesel_async::AsyncPgConnection;
use landslide_config::Shutdown;
use landslide_nats::polls::PollWatch;
use landslide_nats::rollback;
use landslide_schema::poll::Window;
use landslide_schema::postgres::{DatabaseUrl, marks};
use landslide_schema::{Choice, PollBook, PollId};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::counts::{self, OptionCount};

/// Longest wait for the tally query; past it the connection is dropped and opened again.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `GET /api/results/{poll}` and of each server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub(crate) struct Results {
    pub poll: PollId,
    pub question: String,
    /// Every option of the poll, 0 when it has no votes yet.
    pub counts: BTreeMap<Choice, i64>,
    pub total: i64,
    /// Votes accepted but not yet committed: the consumer's pending plus unacked messages; once
    /// the poll has closed, this poll's own (the messages beyond the workers' ack floor, read for
    /// their poll). When it is 0, the counts include every vote of the poll accepted before
    /// `as_of`.
    pub pending: u64,
    /// When the snapshot was started, RFC 3339 in UTC.
    #[schema(format = DateTime)]
    pub as_of: String,
    /// Where the poll is in its life: `not_open`, `open`, `closed` (votes may still be
    /// pending), or `final`: closed by the stream's clock and nothing pending, so the counts are
    /// the result.
    pub status: Status,
    /// When the poll opens, RFC 3339 in UTC; only for a poll with an opening time.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub opens_at: Option<String>,
    /// When the poll closes, RFC 3339 in UTC; only for a poll with a closing time.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub closes_at: Option<String>,
    /// Only when the votes stream went backwards and the workers have not yet taken up what it
    /// stored since, when the workers' consumer differs from its definition (it could skip or
    /// drop votes) and the workers have not yet made it again, when the nats-servers' clocks
    /// differ too much, or when tally could not confirm its poll definitions current for 5 s:
    /// what was found. `pending` is then at least 1 and the poll never final.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback: Option<String>,
    /// Only when these results could not be refreshed for longer than the refresh should take:
    /// their age in milliseconds. The poll is then never final (`closed` at most).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_for_ms: Option<u64>,
}

/// Where a poll is in its life, as the results say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    NotOpen,
    Open,
    Closed,
    Final,
}

impl Status {
    /// The status of `poll` at `now`, with `pending` votes of it not yet counted, by every
    /// revision of `book` that defines it, each for the votes accepted under it
    /// ([`PollBook::window_of`]): the workers' rule. `stream_now` is the NATS server's clock,
    /// which decides which votes count; without it the poll is never final (tally's own clock
    /// cannot prove that no vote stored before the close is still to come), nor before
    /// [`landslide_schema::poll::CLOSE_GRACE`] has passed since its last close by that clock
    /// ([`PollBook::is_over`]).
    pub fn of(
        book: &PollBook,
        poll: &PollId,
        now: DateTime<Utc>,
        stream_now: Option<DateTime<Utc>>,
        pending: u64,
    ) -> Self {
        let over = |stream_now| book.is_over(poll, stream_now);
        match book.window_of(poll, stream_now.unwrap_or(now)) {
            Some(Window::NotOpenYet) => Self::NotOpen,
            Some(Window::Open) | None => Self::Open,
            Some(Window::Closed) if pending == 0 && stream_now.is_some_and(over) => Self::Final,
            Some(Window::Closed) => Self::Closed,
        }
    }
}

/// Accepted votes not yet counted: in all, and per poll when the messages beyond the workers' ack
/// floor were read ([`pending_by_poll`]). Without the second, one poll still taking votes, or one
/// vote waiting for its revision, kept every other poll from being final.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    pub all: u64,
    pub by_poll: Option<HashMap<PollId, u64>>,
}

impl Pending {
    /// Every poll's, nothing read per poll.
    #[cfg(test)]
    pub fn all(all: u64) -> Self {
        Self { all, by_poll: None }
    }

    /// `poll`'s pending votes: its own when they were read, every poll's otherwise.
    pub fn of(&self, poll: &PollId) -> u64 {
        match &self.by_poll {
            Some(by_poll) => by_poll.get(poll).copied().unwrap_or(0),
            None => self.all,
        }
    }
}

/// The most messages beyond the workers' ack floor that [`pending_by_poll`] reads: beyond it, the
/// workers are far behind and no poll's pending can be told apart (every poll's counts).
const PER_POLL_READ_LIMIT: u64 = 10_000;

/// The votes not yet counted of each poll, once some poll has closed while votes are pending: the
/// messages beyond the workers' ack floor (every message up to it is committed or a dead letter),
/// read for their poll. Some of them may be acked already: a poll's figure can only be too high,
/// never too low. `None` when there are more than [`PER_POLL_READ_LIMIT`], or one names a poll
/// that cannot be read (a newer wire version).
pub(crate) async fn pending_by_poll(
    js: &jetstream::Context,
    topology: &landslide_nats::Topology,
    backlog: &landslide_nats::Backlog,
) -> anyhow::Result<Option<HashMap<PollId, u64>>> {
    let first = backlog.info.ack_floor.stream_sequence + 1;
    let last = backlog.stream_last;
    if last < first {
        return Ok(Some(HashMap::new()));
    }
    if last - first >= PER_POLL_READ_LIMIT {
        return Ok(None);
    }
    let stream = js
        .get_stream(&topology.votes_stream)
        .await
        .context("cannot open the votes stream")?;
    let mut reader = landslide_nats::StreamReader::open_from(
        &stream,
        first,
        last,
        landslide_nats::User::Tally,
        "landslide tally: the polls of the votes not yet counted",
    )
    .await?;
    let mut by_poll: HashMap<PollId, u64> = HashMap::new();
    while let Some(stored) = reader.next().await? {
        match landslide_schema::VoteEvent::decode(&stored.message.payload) {
            Ok(event) => *by_poll.entry(event.poll).or_default() += 1,
            Err(err) if err.is_newer() => return Ok(None),
            // A dead letter: no poll's.
            Err(_) => {}
        }
    }
    Ok(Some(by_poll))
}

/// Whether any poll of the latest revision has closed by `stream_now`, the clock that decides
/// it.
pub(crate) fn any_closed(book: &PollBook, stream_now: Option<DateTime<Utc>>) -> bool {
    stream_now.is_some_and(|now| {
        book.latest()
            .1
            .iter()
            .any(|poll| book.window_of(&poll.id, now) == Some(Window::Closed))
    })
}

/// The pending count to show: a stream that went backwards (`rollback`, until the workers have
/// restarted their consumer) may hide votes the consumer skips, so it is never 0 then.
pub(crate) fn pending_despite(pending: u64, rollback: Option<&str>) -> u64 {
    if rollback.is_some() {
        pending.max(1)
    } else {
        pending
    }
}

/// One poll's results, with the JSON rendered once for every viewer.
#[derive(Debug)]
pub(crate) struct PollSnapshot {
    pub results: Results,
    pub json: String,
}

impl PollSnapshot {
    /// The results as served `age` after the snapshot was taken: as built while fresh; once
    /// older than `stale_after` (refreshes fail), marked stale with their age, never final and
    /// never with nothing pending, since votes may have come and been committed since. The JSON is rendered again only then.
    pub fn served(&self, age: Duration, stale_after: Duration) -> (Cow<'_, Results>, Cow<'_, str>) {
        if age <= stale_after {
            return (Cow::Borrowed(&self.results), Cow::Borrowed(&self.json));
        }
        let mut results = self.results.clone();
        results.stale_for_ms = Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        // What is pending now is unknown: never 0.
        results.pending = results.pending.max(1);
        if results.status == Status::Final {
            results.status = Status::Closed;
        }
        // Serializing strings and integers cannot fail.
        let json = serde_json::to_string(&results).unwrap_or_default();
        (Cow::Owned(results), Cow::Owned(json))
    }
}

/// The results of every poll at one instant.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub polls: HashMap<PollId, PollSnapshot>,
    /// When it was built, for readiness: a snapshot that stops being replaced is stale.
    pub taken: Instant,
}

impl Snapshot {
    /// Builds the results of every poll of the latest revision from the tally sums. Rows of
    /// unknown polls or options are left out here (the audit reports them).
    pub fn build(
        book: &PollBook,
        pending: &Pending,
        sums: &[OptionCount],
        as_of: DateTime<Utc>,
        stream_now: Option<DateTime<Utc>>,
        rollback: Option<&str>,
    ) -> Self {
        let at = as_of;
        let as_of = as_of.to_rfc3339_opts(SecondsFormat::Millis, true);
        let rfc3339 = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        let votes: HashMap<(&str, &str), i64> = sums
            .iter()
            .map(|row| ((row.poll.as_str(), row.option.as_str()), row.votes))
            .collect();
        let polls = book
            .latest()
            .1
            .iter()
            .map(|poll| {
                let counts: BTreeMap<Choice, i64> = poll
                    .options
                    .iter()
                    .map(|option| {
                        let key = (poll.id.as_str(), option.id.as_str());
                        (option.id.clone(), votes.get(&key).copied().unwrap_or(0))
                    })
                    .collect();
                let pending = pending_despite(pending.of(&poll.id), rollback);
                let results = Results {
                    poll: poll.id.clone(),
                    question: poll.question.clone(),
                    total: counts.values().sum(),
                    counts,
                    pending,
                    as_of: as_of.clone(),
                    status: Status::of(book, &poll.id, at, stream_now, pending),
                    opens_at: poll.opens_at.map(rfc3339),
                    closes_at: poll.closes_at.map(rfc3339),
                    rollback: rollback.map(str::to_owned),
                    stale_for_ms: None,
                };
                // Serializing strings and integers cannot fail.
                let json = serde_json::to_string(&results).unwrap_or_default();
                (poll.id.clone(), PollSnapshot { results, json })
            })
            .collect();
        Self {
            polls,
            taken: Instant::now(),
        }
    }
}

/// The only reader of the database and of the consumer's state on behalf of viewers.
pub(crate) struct Refresher {
    /// For the consumers' info as the servers sent it, whose `ts` is each server's clock.
    js: jetstream::Context,
    /// One connection held across refreshes (a pool checkout would add a round trip each time);
    /// `None` after an error, until it is opened again.
    conn: Option<AsyncPgConnection>,
    database_url: DatabaseUrl,
    polls: PollWatch,
    topology: landslide_nats::Topology,
}

impl Refresher {
    pub fn new(
        js: jetstream::Context,
        conn: AsyncPgConnection,
        database_url: DatabaseUrl,
        polls: PollWatch,
        topology: landslide_nats::Topology,
    ) -> Self {
        Self {
            js,
            conn: Some(conn),
            database_url,
            polls,
            topology,
        }
    }

    /// Publishes a new snapshot every `every` until `shutdown` turns true. A failed refresh keeps
    /// the last snapshot, so its `as_of` ages and `/readyz` reports it.
    pub async fn run(
        mut self,
        every: Duration,
        snapshots: watch::Sender<Option<Arc<Snapshot>>>,
        shutdown: Shutdown,
    ) {
        let mut ticker = tokio::time::interval(every);
        // After a slow refresh, wait a full period rather than firing catch-up refreshes.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.clone().wait() => break,
            }
            let started = Instant::now();
            match self.refresh().await {
                Ok((snapshot, pending)) => {
                    metrics::histogram!("landslide_tally_refresh_seconds")
                        .record(started.elapsed());
                    // A gauge is an f64; counts this large lose no precision that matters.
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!("landslide_tally_pending").set(pending as f64);
                    if failing {
                        tracing::info!("results refresh works again");
                        failing = false;
                    }
                    snapshots.send_replace(Some(Arc::new(snapshot)));
                }
                Err(err) => {
                    metrics::counter!("landslide_tally_refresh_errors_total").increment(1);
                    // Logged once per outage, not twice a second.
                    if !failing {
                        tracing::warn!(
                            error = format!("{err:#}"),
                            "cannot refresh the results; serving the last snapshot"
                        );
                        failing = true;
                    }
                }
            }
        }
        tracing::debug!("results refresher stopped");
    }

    async fn refresh(&mut self) -> anyhow::Result<(Snapshot, u64)> {
        let as_of = Utc::now();
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self
                .conn
                .insert(landslide_schema::postgres::connect(&self.database_url).await?),
        };
        // Pending (and what holds results from being final) first, counts second.
        let observed = match observe(&self.js, &self.topology, conn, &self.polls.current()).await {
            Ok(observed) => observed,
            Err(err) => {
                // The connection may be mid-statement: open another next time.
                self.conn = None;
                return Err(err);
            }
        };
        if let Some(regression) = &observed.regression {
            tracing::error!(%regression, "the votes stream went backwards; results are not final until the workers take up what it stored since");
        }
        if let Some(drift) = &observed.drift {
            tracing::error!(
                %drift,
                "results are not final until the workers put their consumer back"
            );
        }
        if let Some(skew) = &observed.skew {
            tracing::error!(%skew, "the nats-servers' clocks differ; results are not final meanwhile");
        }
        for (partition, backlog) in &observed.partitions {
            if let Some(measured) = backlog.skew {
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(
                    "landslide_nats_clock_skew_seconds",
                    "stream" => partition.votes_stream.clone()
                )
                .set(measured.millis as f64 / 1000.0);
            }
        }
        // Dropping a plain read mid-flight is harmless, but leaves the connection in an unknown
        // state: it is replaced after any failure.
        let sums = match tokio::time::timeout(QUERY_TIMEOUT, counts::tally_sums(conn)).await {
            Ok(Ok(sums)) => sums,
            Ok(Err(err)) => {
                self.conn = None;
                return Err(err).context("cannot read the tallies");
            }
            Err(_) => {
                self.conn = None;
                anyhow::bail!("reading the tallies took longer than {QUERY_TIMEOUT:?}");
            }
        };
        let (book, confirmed) = self.polls.confirmed();
        // A revision this book lacks could move a close: nothing is final on a book that could
        // not be confirmed current for a while (the polls bucket unreadable).
        let unconfirmed = landslide_nats::polls::unconfirmed(confirmed).map(|u| u.to_string());
        let hold = observed.hold().map(str::to_owned).or(unconfirmed);
        let snapshot = Snapshot::build(
            &book,
            &observed.pending,
            &sums,
            as_of,
            observed.stream_now,
            hold.as_deref(),
        );
        Ok((
            snapshot,
            pending_despite(observed.pending.all, hold.as_deref()),
        ))
    }
}

/// The votes streams as tally and `landslide status` judge the results by: every partition's
/// backlog, and whatever keeps a result from being final.
#[derive(Debug)]
pub(crate) struct Observed {
    /// Every partition stream the deployment has, with its consumer's backlog.
    pub partitions: Vec<(landslide_nats::Topology, landslide_nats::Backlog)>,
    /// Accepted votes not yet counted, in all and (once a poll has closed) per poll.
    pub pending: Pending,
    /// The clock a close is judged by: the earliest of the partition leaders' (a close is passed
    /// once every one has passed it), `None` while one did not say.
    pub stream_now: Option<DateTime<Utc>>,
    /// A partition stream that went backwards (`landslide_nats::rollback`).
    pub regression: Option<String>,
    /// A consumer that differs from its definition.
    pub drift: Option<String>,
    /// Clocks of nats-servers further apart than `MAX_CLOCK_SKEW`.
    pub skew: Option<String>,
}

impl Observed {
    /// Why no result may be final now, if anything says so.
    pub fn hold(&self) -> Option<&str> {
        self.regression
            .as_deref()
            .or(self.drift.as_deref())
            .or(self.skew.as_deref())
    }
}

/// Reads every partition's backlog (before the counts, which the caller reads after: a vote
/// accepted before then is either pending here or committed there, so 0 pending proves the
/// counts complete), each stream against the workers' mark and each consumer against its
/// definition, and the clocks.
pub(crate) async fn observe(
    js: &jetstream::Context,
    topology: &landslide_nats::Topology,
    conn: &mut AsyncPgConnection,
    book: &PollBook,
) -> anyhow::Result<Observed> {
    let partitions = landslide_nats::partitions::streams(js, topology)
        .await
        .context("cannot read the vote partitions")?;
    let read = landslide_nats::partitions::backlogs(js, &partitions).await?;
    let backlogs: Vec<_> = partitions.into_iter().zip(read).collect();
    let all = backlogs
        .iter()
        .map(|(_, b)| b.pending)
        .fold(0, u64::saturating_add);
    let stream_now = landslide_nats::partitions::earliest_clock(backlogs.iter().map(|(_, b)| b));
    // Each poll's own pending votes, once one has closed: another poll still taking votes then
    // keeps it from being final no longer.
    let by_poll = if all > 0 && any_closed(book, stream_now) {
        pending_by_poll_all(js, &backlogs).await
    } else {
        None
    };
    let (mut regression, mut drift, mut skew) = (None, None, None);
    for (partition, backlog) in &backlogs {
        // Has the stream gone backwards since the workers committed their mark? Until the
        // workers have restarted their consumer, votes it would skip are hidden from `pending`.
        let mark = marks::read_mark(conn, &partition.votes_stream)
            .await
            .context("cannot read the workers' mark")?;
        let observed = rollback::observe_with(js, partition, backlog, mark.as_ref())
            .await
            .context("cannot read the vote at the workers' mark")?;
        if regression.is_none() {
            regression = rollback::judge(mark.as_ref(), &observed).map(|r| r.to_string());
        }
        // A consumer someone changed may skip votes that `pending` would never show: the workers
        // make it again within moments, and nothing is final meanwhile.
        let differences = landslide_nats::consumer_drift(partition, &backlog.info.config)?;
        if drift.is_none() && !differences.is_empty() {
            drift = Some(format!(
                "{}: {}",
                partition.votes_stream,
                landslide_nats::describe_drift(&differences)
            ));
        }
        // Two servers whose clocks differ by more than the bound: a change of the stream's
        // leader could store a vote before the close after the close was passed.
        if let Some(measured) = backlog
            .skew
            .filter(|s| s.beyond(landslide_nats::MAX_CLOCK_SKEW))
        {
            skew.get_or_insert(format!(
                "{measured}, more than the {} ms allowed",
                landslide_nats::MAX_CLOCK_SKEW.as_millis()
            ));
        }
    }
    // Partition leaders on different servers: between two votes of a voter that knew the same
    // answer, the stored times of two clocks decide (`merge::OrderKey`). Read one after another,
    // the clocks are also apart by the time between the reads: allowed for up to a second.
    let clocks = backlogs
        .iter()
        .map(|(_, b)| b.server_now)
        .collect::<Option<Vec<_>>>();
    if let Some(clocks) = clocks.filter(|c| c.len() > 1) {
        let (first, last) = (clocks.iter().min(), clocks.iter().max());
        if let (Some(first), Some(last)) = (first, last) {
            let apart = (*last - *first).to_std().unwrap_or_default();
            if apart > landslide_nats::MAX_CLOCK_SKEW + Duration::from_secs(1) {
                skew.get_or_insert(format!(
                    "the vote partitions' leaders' clocks are {} ms apart, more than the {} ms \
                     allowed",
                    apart.as_millis(),
                    landslide_nats::MAX_CLOCK_SKEW.as_millis()
                ));
            }
        }
    }
    Ok(Observed {
        partitions: backlogs,
        pending: Pending { all, by_poll },
        stream_now,
        regression,
        drift,
        skew,
    })
}

/// [`pending_by_poll`] over every partition with votes pending, added up; `None` when one
/// cannot tell.
async fn pending_by_poll_all(
    js: &jetstream::Context,
    backlogs: &[(landslide_nats::Topology, landslide_nats::Backlog)],
) -> Option<HashMap<PollId, u64>> {
    let mut all: HashMap<PollId, u64> = HashMap::new();
    for (partition, backlog) in backlogs.iter().filter(|(_, b)| b.pending > 0) {
        match pending_by_poll(js, partition, backlog).await {
            Ok(Some(by_poll)) => {
                for (poll, n) in by_poll {
                    *all.entry(poll).or_default() += n;
                }
            }
            Ok(None) => return None,
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "cannot read the polls of the votes not yet counted; every poll waits for \
                     all of them"
                );
                return None;
            }
        }
    }
    Some(all)
}

#[cfg(test)]
mod tests {
    use landslide_schema::{Poll, PollOption, Polls, Revision};

    use super::*;

    fn book(polls: Polls) -> PollBook {
        PollBook::new(Revision(1), polls)
    }

    fn row(poll: &str, option: &str, votes: i64) -> OptionCount {
        OptionCount {
            poll: poll.to_owned(),
            option: option.to_owned(),
            votes,
        }
    }

    #[test]
    fn every_option_is_present_and_unknown_rows_are_left_out() {
        let lunch = Poll {
            id: PollId::parse("lunch").unwrap(),
            question: "Lunch?".to_owned(),
            options: ["pizza", "salad"]
                .map(|id| PollOption {
                    id: Choice::parse(id).unwrap(),
                    label: id.to_owned(),
                })
                .to_vec(),
            opens_at: None,
            closes_at: None,
            owner_key: None,
        };
        let polls = book(
            Polls::new(
                PollId::parse("pets").unwrap(),
                vec![Polls::pets().default_poll().clone(), lunch],
            )
            .unwrap(),
        );
        let sums = [
            row("pets", "cats", 3),
            row("pets", "dogs", 4),
            row("pets", "fish", 100),
            row("other", "cats", 100),
        ];
        let as_of = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let snapshot = Snapshot::build(&polls, &Pending::all(2), &sums, as_of, Some(as_of), None);

        let pets: serde_json::Value =
            serde_json::from_str(&snapshot.polls[&PollId::parse("pets").unwrap()].json).unwrap();
        assert_eq!(
            pets,
            serde_json::json!({
                "poll": "pets", "question": "Cats or dogs?", "counts": {"cats": 3, "dogs": 4},
                "total": 7, "pending": 2, "as_of": "2023-11-14T22:13:20.123Z",
                "status": "open",
            })
        );
        let lunch = &snapshot.polls[&PollId::parse("lunch").unwrap()].results;
        assert_eq!(lunch.total, 0);
        assert_eq!(lunch.counts.values().copied().collect::<Vec<_>>(), [0, 0]);
    }

    /// Results that could not be refreshed say how old they are and are never final; a stream
    /// that went backwards keeps something pending and says so.
    #[test]
    fn stale_results_and_a_rollback_never_read_as_final() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let closed = Poll {
            closes_at: Some(at("2026-12-06T20:00:00Z")),
            ..Polls::pets().default_poll().clone()
        };
        let polls = book(Polls::new(PollId::parse("pets").unwrap(), vec![closed]).unwrap());
        let after = at("2026-12-06T21:00:00Z");
        let pets = PollId::parse("pets").unwrap();
        // Closed by the stream's clock, but within the grace: not final yet.
        let just = at("2026-12-06T20:00:01Z");
        let snapshot = Snapshot::build(&polls, &Pending::all(0), &[], just, Some(just), None);
        assert_eq!(snapshot.polls[&pets].results.status, Status::Closed);
        let snapshot = Snapshot::build(&polls, &Pending::all(0), &[], after, Some(after), None);
        let fresh = &snapshot.polls[&pets];
        assert_eq!(fresh.results.status, Status::Final);
        let (served, json) = fresh.served(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!((served.status, served.stale_for_ms), (Status::Final, None));
        assert!(!json.contains("stale_for_ms"));
        let (served, json) = fresh.served(Duration::from_secs(30), Duration::from_secs(5));
        assert_eq!((served.status, served.pending), (Status::Closed, 1));
        assert_eq!(served.stale_for_ms, Some(30_000));
        assert!(json.contains(r#""stale_for_ms":30000"#), "{json}");

        let snapshot = Snapshot::build(
            &polls,
            &Pending::all(0),
            &[],
            after,
            Some(after),
            Some("went back"),
        );
        let results = &snapshot.polls[&pets].results;
        assert_eq!((results.pending, results.status), (1, Status::Closed));
        assert_eq!(results.rollback.as_deref(), Some("went back"));
    }

    #[test]
    fn a_poll_is_final_once_the_stream_clock_passed_its_close_and_nothing_is_pending() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let window = |opens: &str, closes: &str| {
            let poll = Poll {
                opens_at: Some(at(opens)),
                closes_at: Some(at(closes)),
                ..Polls::pets().default_poll().clone()
            };
            Polls::new(poll.id.clone(), vec![poll]).unwrap()
        };
        let pets = PollId::parse("pets").unwrap();
        let book = book(window("2026-12-06T18:00:00Z", "2026-12-06T20:00:00Z"));
        let status = |now, stream_now, pending| Status::of(&book, &pets, now, stream_now, pending);
        let before = at("2026-12-06T17:00:00Z");
        let during = at("2026-12-06T19:00:00Z");
        let after = at("2026-12-06T20:00:03Z");
        assert_eq!(status(before, Some(before), 0), Status::NotOpen);
        assert_eq!(status(during, Some(during), 0), Status::Open);
        assert_eq!(status(after, Some(after), 3), Status::Closed);
        assert_eq!(status(after, Some(after), 0), Status::Final);
        // Within `CLOSE_GRACE` of the close: a new stream leader's clock may still be before it.
        let just = at("2026-12-06T20:00:01Z");
        assert_eq!(status(just, Some(just), 0), Status::Closed);
        // Tally's clock past the close proves nothing while the stream's is not.
        assert_eq!(status(after, Some(during), 0), Status::Open);
        assert_eq!(status(after, None, 0), Status::Closed);

        // Revision 2, written at 19:59:50, closes the poll at 19:00 instead. A node that has not
        // read it yet still takes votes under revision 1 for 15 s, and the workers count them:
        // the poll is open until 20:00 by revision 1, closed then, final two seconds on.
        let mut revised = book.clone();
        revised.insert(
            Revision(2),
            window("2026-12-06T18:00:00Z", "2026-12-06T19:00:00Z"),
        );
        revised.set_written(Revision(2), at("2026-12-06T19:59:50Z"));
        let status = |now, pending| Status::of(&revised, &pets, now, Some(now), pending);
        assert_eq!(status(at("2026-12-06T19:30:00Z"), 0), Status::Open);
        assert_eq!(status(at("2026-12-06T20:00:00Z"), 0), Status::Closed);
        assert_eq!(status(after, 0), Status::Final);
        // Had tally gone by the latest revision alone, it would have said final at 19:00:02,
        // with votes still to come.
        assert_eq!(
            revised.window_of(&pets, at("2026-12-06T19:00:02Z")),
            Some(Window::Open)
        );
    }
}
