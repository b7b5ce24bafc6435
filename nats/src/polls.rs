//! The poll definitions of a deployment, in one JetStream key-value bucket that every role reads.
//!
//! Each revision is its own key, `rev.1`, `rev.2`, …, holding the polls file's TOML as written.
//! A revision is written once, and the broker itself sees to it ([`bucket_config`]): the bucket's
//! stream keeps one message per key and refuses a second (`discard: new` per subject), allows no
//! delete, purge or rollup, and only the polls' owner (`landslide polls put`, as the `polls` or
//! `admin` user) may write a new key; the workers may only seed `rev.1` of an empty bucket
//! (`auth.rs`). `nats kv get LANDSLIDE_POLLS rev.3` shows one. Roles watch the bucket and read it
//! whole every few seconds, so they see a new revision within moments, without a restart
//! ([`watch`]).
//!
//! What the broker should make impossible is still watched for, since a bucket made by an older
//! release or by hand may not be sealed: a known revision whose text changes, a key that is not a
//! valid revision, a bucket that would take a second write. Each is an alarm ([`alarm`]: the log,
//! `landslide_poll_definition_alarms_total`, `landslide status`), and none stops a role: it keeps
//! the text it read first and skips a key it cannot read.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use landslide_schema::poll::{
    PollBook, Polls, REVISION_OVERLAP, ReadRevision, Revision, RevisionHash,
};
use tokio::sync::watch;

use crate::{Access, NotSetUp, Topology};

/// The key of a revision.
fn key(revision: Revision) -> String {
    format!("rev.{revision}")
}

/// The revision of a key, if it is one.
fn revision_of(key: &str) -> Option<Revision> {
    key.strip_prefix("rev.")?.parse().ok().map(Revision)
}

/// The largest revision text the bucket takes.
const MAX_TEXT: i32 = 1 << 20;

/// The bucket's stream, sealed: one message per key, a second refused (`discard: new` with
/// `discard_new_per_subject`, nats-server 2.9.1 and later; a key-value `create` and a plain
/// publish alike), no delete, purge or rollup. async-nats' `create_key_value` allows rollups and
/// purges, so the stream is made here with the fields it would set otherwise. nats-server lets
/// no update take `deny_delete` or `deny_purge` back, and refuses rollups beside `deny_purge`
/// (`server/stream.go`); nobody may update the stream (`auth.rs`).
pub fn bucket_config(topology: &Topology) -> stream::Config {
    let bucket = &topology.polls_bucket;
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(
            "Landslide's poll definitions: one revision per key, written once".to_owned(),
        ),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        deny_delete: true,
        deny_purge: true,
        allow_rollup: false,
        allow_direct: true,
        max_message_size: MAX_TEXT,
        storage: stream::StorageType::File,
        num_replicas: topology.replicas,
        ..Default::default()
    }
}

/// What of [`bucket_config`]'s seal a bucket's stream lacks: empty when no key can be written
/// twice, deleted or purged.
pub fn unsealed(config: &stream::Config) -> Vec<&'static str> {
    let mut lacks = Vec::new();
    if !(config.discard == stream::DiscardPolicy::New
        && config.discard_new_per_subject
        && config.max_messages_per_subject == 1)
    {
        lacks.push(
            "a second write of a key is not refused (discard new per subject, one message per key)",
        );
    }
    if !config.deny_delete {
        lacks.push("keys may be deleted");
    }
    if !config.deny_purge || config.allow_rollup {
        lacks.push("the bucket may be purged or rolled up");
    }
    lacks
}

/// Reports something the sealed bucket should have made impossible: an error in the log and
/// `landslide_poll_definition_alarms_total{kind}`. The role goes on with what it read first.
fn alarm(kind: &'static str, what: &str) {
    metrics::counter!("landslide_poll_definition_alarms_total", "kind" => kind).increment(1);
    tracing::error!(kind, "poll definitions: {what}");
}

/// Opens the polls bucket; with [`Access::SetUp`], creates it sealed ([`bucket_config`], with
/// the topology's replicas) if it is missing. A bucket that is not sealed is an alarm.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<kv::Store> {
    let bucket = &topology.polls_bucket;
    let store = match js.get_key_value(bucket).await {
        Ok(store) => store,
        Err(err)
            if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket
                && access == Access::ReadOnly =>
        {
            return Err(NotSetUp {
                what: format!("the polls bucket {bucket}"),
            }
            .into());
        }
        Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            let created = js.create_stream(bucket_config(topology)).await;
            match js.get_key_value(bucket).await {
                Ok(store) => store,
                // Not made by us, nor (at the same moment) by another role.
                Err(_) => {
                    return Err(match created {
                        Err(err) => anyhow::Error::new(err),
                        Ok(_) => anyhow::anyhow!("it was made but cannot be opened"),
                    })
                    .with_context(|| format!("cannot create the polls bucket {bucket}"));
                }
            }
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot open the polls bucket {bucket}"));
        }
    };
    for lack in unsealed(&store.stream.cached_info().config) {
        alarm(
            "unsealed",
            &format!(
                "the polls bucket {bucket} is not sealed: {lack}. It was made by hand or by an \
                 older release; make it again (SECURITY.md, \"Who may do what on the \
                 broker\")"
            ),
        );
    }
    Ok(store)
}

/// A key of the bucket that is not a valid revision: an alarm, never a reason to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    pub key: String,
    pub why: String,
}

/// One revision as the bucket holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub revision: Revision,
    /// The polls file as written.
    pub text: String,
    pub polls: Polls,
    /// The bucket stream's sequence of the message that holds it.
    pub sequence: u64,
    /// When the bucket stored it, by its stream leader's clock: the next revision's ends this
    /// one's life ([`REVISION_OVERLAP`]).
    pub written: DateTime<Utc>,
}

impl Stored {
    /// What a book keeps of it.
    fn read(self) -> ReadRevision {
        ReadRevision {
            hash: RevisionHash::of(&self.text),
            revision: self.revision,
            polls: self.polls,
            written: Some(self.written),
        }
    }
}

/// What the bucket holds.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    /// Every valid revision, oldest first.
    pub revisions: Vec<Stored>,
    /// Every key that is not a valid revision, and what the bucket's order says was rewritten.
    pub strays: Vec<Stray>,
}

impl Contents {
    /// The newest revision, if any.
    pub fn latest(&self) -> Option<&Stored> {
        self.revisions.last()
    }
}

/// The revisions in the bucket, oldest first, by their keys alone; and the keys that name none.
async fn keys(store: &kv::Store) -> anyhow::Result<(Vec<Revision>, Vec<Stray>)> {
    let mut keys = store.keys().await.context("cannot list the polls bucket")?;
    let mut revisions = Vec::new();
    let mut strays = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.context("cannot list the polls bucket")?;
        match revision_of(&key) {
            Some(revision) => revisions.push(revision),
            None => strays.push(Stray {
                why: "not a revision's key (rev.<number>)".to_owned(),
                key,
            }),
        }
    }
    revisions.sort_unstable();
    Ok((revisions, strays))
}

/// One revision, `Ok(None)` when its key holds no value, `Ok(Some(Err))` when the value is not a
/// valid polls file; `Err` only when the bucket cannot be read.
async fn fetch(
    store: &kv::Store,
    revision: Revision,
) -> anyhow::Result<Option<Result<Stored, Stray>>> {
    let key = key(revision);
    let Some(entry) = store
        .entry(&key)
        .await
        .with_context(|| format!("cannot read {key} of the polls bucket"))?
    else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(Some(Err(Stray {
            key,
            why: "deleted".to_owned(),
        })));
    }
    Ok(Some(parse(revision, &entry)))
}

/// A revision's entry, checked.
fn parse(revision: Revision, entry: &kv::Entry) -> Result<Stored, Stray> {
    let stray = |why: String| Stray {
        key: key(revision),
        why,
    };
    let text = std::str::from_utf8(&entry.value).map_err(|_| stray("not UTF-8".to_owned()))?;
    let polls =
        Polls::from_toml(text).map_err(|err| stray(format!("not a valid polls file: {err}")))?;
    let nanos = i64::try_from(entry.created.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    Ok(Stored {
        revision,
        text: text.to_owned(),
        polls,
        sequence: entry.revision,
        written: DateTime::from_timestamp_nanos(nanos),
    })
}

/// Every revision in the bucket with its text, oldest first, and every key that is not a valid
/// revision. Revisions are written in order, each once, so a revision stored after a later one
/// was written again: that is reported too.
pub async fn read_all(store: &kv::Store) -> anyhow::Result<Contents> {
    let (revisions, mut strays) = keys(store).await?;
    let mut contents = Contents::default();
    for revision in revisions {
        match fetch(store, revision).await? {
            Some(Ok(stored)) => contents.revisions.push(stored),
            Some(Err(stray)) => strays.push(stray),
            None => {}
        }
    }
    for pair in contents.revisions.windows(2) {
        if pair[0].sequence > pair[1].sequence {
            strays.push(Stray {
                key: key(pair[0].revision),
                why: format!(
                    "written after rev.{}: rewritten since it was first written",
                    pair[1].revision
                ),
            });
        }
    }
    contents.strays = strays;
    Ok(contents)
}

/// What should not be so of the bucket, as `landslide status` reports it: what its seal lacks,
/// and every key that is not a valid revision (or was rewritten).
pub async fn findings(store: &kv::Store) -> anyhow::Result<Vec<String>> {
    let mut found: Vec<String> = unsealed(&store.stream.cached_info().config)
        .into_iter()
        .map(|lack| format!("the polls bucket is not sealed: {lack}"))
        .collect();
    found.extend(
        read_all(store)
            .await?
            .strays
            .iter()
            .map(|stray| format!("{} of the polls bucket: {}", stray.key, stray.why)),
    );
    Ok(found)
}

/// Writes `text` (a polls file, checked first) as the next revision and returns its number. A
/// file that changes a poll which is over ([`PollBook::is_over`] by this machine's clock) is
/// refused: the revision would count none of that poll's votes.
pub async fn put(store: &kv::Store, text: &str) -> anyhow::Result<Revision> {
    let polls = Polls::from_toml(text).context("refusing an invalid polls file")?;
    if let Some(book) = PollBook::of(
        read_all(store)
            .await?
            .revisions
            .into_iter()
            .map(Stored::read),
    ) {
        let now = Utc::now();
        for poll in polls.iter() {
            let unchanged = book.latest().1.get(poll.id.as_str()) == Some(poll);
            if let Some(closed) = book.closes_for_good(&poll.id)
                && !unchanged
                && book.is_over(&poll.id, now)
            {
                anyhow::bail!(
                    "poll {} is over (it closed at {}): a new revision cannot change it, and \
                     would count none of its votes. Leave its definition as it is, or give a \
                     new poll another id",
                    poll.id,
                    closed.to_rfc3339()
                );
            }
        }
    }
    for _ in 0..10 {
        let next = keys(store)
            .await?
            .0
            .last()
            .map_or(Revision(1), |r| Revision(r.0 + 1));
        match store.create(key(next), text.to_owned().into()).await {
            Ok(_) => {
                tracing::info!(revision = %next, "wrote a new revision of the poll definitions");
                return Ok(next);
            }
            // Someone else wrote this revision meanwhile: take the next one.
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).context("cannot write to the polls bucket"),
        }
    }
    anyhow::bail!("the polls bucket kept changing under us; try again")
}

/// The book of every valid revision; with [`Access::SetUp`], seeding the bucket with `seed` (as
/// revision 1) when it holds none. A `seed` that differs from the latest revision is not
/// written: the bucket is the one place of truth, changed with `landslide polls put`
/// ([`watch`], for the roles, says so). A key that is not a valid revision is an alarm, and
/// skipped.
pub async fn load(store: &kv::Store, seed: &Polls, access: Access) -> anyhow::Result<PollBook> {
    let mut contents = read_all(store).await?;
    if contents.revisions.is_empty() && access == Access::ReadOnly {
        return Err(NotSetUp {
            what: "a revision of the poll definitions".to_owned(),
        }
        .into());
    }
    if contents.revisions.is_empty() {
        match store.create(key(Revision(1)), seed.to_toml().into()).await {
            Ok(_) => tracing::info!("seeded the polls bucket with revision 1"),
            // Another role seeded it at the same moment.
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(err).context("cannot seed the polls bucket"),
        }
        contents = read_all(store).await?;
    }
    for stray in &contents.strays {
        alarm(
            "stray_key",
            &format!(
                "{} of the polls bucket is skipped: {}",
                stray.key, stray.why
            ),
        );
    }
    PollBook::of(contents.revisions.into_iter().map(Stored::read))
        .context("the polls bucket holds no valid revision (rev.1 is not a valid polls file)")
}

/// The poll definitions a role works by, kept current by a task that watches the bucket.
#[derive(Debug, Clone)]
pub struct PollWatch {
    rx: watch::Receiver<Arc<PollBook>>,
    store: kv::Store,
    /// When the book was last known to hold every revision in the bucket: the moment before the
    /// last check that found nothing the book lacks ([`Keeper::confirm`]).
    confirmed: Arc<Mutex<Instant>>,
}

/// How recently an ingest node must have confirmed that its book holds every revision in the
/// bucket to take a vote: five of the checks a role makes ([`CONFIRM_EVERY`]). With
/// [`REVISION_OVERLAP`] of 15 s, a vote then has 9 s or more from its judging to its ack
/// ([`covers`]).
pub const CONFIRMED_FOR_VOTES: Duration = Duration::from_secs(5);

/// How long ago a book was last confirmed complete, when that is longer than
/// [`CONFIRMED_FOR_VOTES`]: ingest then takes no vote (and is not ready), and tally says no poll
/// is final. `None` while the book is current.
pub fn unconfirmed(confirmed: Instant) -> Option<Unconfirmed> {
    let ago = confirmed.elapsed();
    (ago > CONFIRMED_FOR_VOTES).then_some(Unconfirmed(ago))
}

/// A book not confirmed current for the while it holds ([`unconfirmed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unconfirmed(pub Duration);

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the poll definitions were last confirmed current {} s ago",
            self.0.as_secs()
        )
    }
}

/// Whether a book confirmed complete at `confirmed` still judges a vote the stream stored before
/// `at` (both this process's instants) as every role will: a revision the book lacks was written
/// after `confirmed`, so it ends the life of the book's latest only [`REVISION_OVERLAP`] later,
/// less what the bucket's and the votes stream's leaders' clocks may differ
/// ([`crate::MAX_CLOCK_SKEW`], alarmed on beyond it).
pub fn covers(confirmed: Instant, at: Instant) -> bool {
    at.saturating_duration_since(confirmed) + crate::MAX_CLOCK_SKEW < REVISION_OVERLAP
}

impl PollWatch {
    /// Whether the bucket itself, read now, lacks `revision` with the text `hash` names (any
    /// text when `None`): the key is missing, deleted or not a valid revision, or holds another
    /// text. An error when the bucket cannot be read: then nothing can be said.
    pub async fn lacks(
        &self,
        revision: Revision,
        hash: Option<RevisionHash>,
    ) -> anyhow::Result<bool> {
        Ok(match fetch(&self.store, revision).await? {
            Some(Ok(stored)) => hash.is_some_and(|hash| hash != RevisionHash::of(&stored.text)),
            Some(Err(_)) | None => true,
        })
    }

    /// The book as of now.
    pub fn current(&self) -> Arc<PollBook> {
        self.rx.borrow().clone()
    }

    /// The book as of now, and a moment by which it held every revision in the bucket.
    pub fn confirmed(&self) -> (Arc<PollBook>, Instant) {
        // The instant first: the book, read after, holds at least what was confirmed then.
        let confirmed = *self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        (self.current(), confirmed)
    }

    /// Waits until the book changes (the sender never goes away while its task watches).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// Loads the book (with [`Access::SetUp`], seeding the bucket if it is empty) and keeps it
/// current for as long as anyone holds it: a task watches the bucket and confirms every
/// [`CONFIRM_EVERY`] that the book lacks nothing the bucket holds.
pub async fn watch(
    js: &jetstream::Context,
    topology: &Topology,
    seed: &Polls,
    access: Access,
) -> anyhow::Result<PollWatch> {
    let store = ensure_bucket(js, topology, access).await?;
    // Watch first, then read: a revision written in between is in the watch.
    let updates = store
        .watch_all()
        .await
        .context("cannot watch the polls bucket")?;
    let asked = Instant::now();
    let book = load(&store, seed, access).await?;
    let (latest, polls) = book.latest();
    if polls != seed {
        tracing::warn!(
            revision = %latest,
            "this role's polls file (LANDSLIDE_POLLS, or the built-in poll) differs from the \
             polls bucket's latest revision; the bucket wins. Change polls with `landslide polls \
             put FILE`"
        );
    }
    let (tx, rx) = watch::channel(Arc::new(book));
    let confirmed = Arc::new(Mutex::new(asked));
    tokio::spawn(keep_current(store.clone(), updates, tx, confirmed.clone()));
    Ok(PollWatch {
        rx,
        store,
        confirmed,
    })
}

/// [`watch`] for a role starting up: retried for as long as the bucket cannot be read
/// ([`crate::retry_startup`]), with `condition` not ready meanwhile.
pub async fn watch_patiently(
    js: &jetstream::Context,
    topology: &Topology,
    seed: &Polls,
    access: Access,
    condition: &landslide_telemetry::readiness::Condition,
) -> anyhow::Result<PollWatch> {
    crate::retry_startup("read the poll definitions", condition, || {
        watch(js, topology, seed, access)
    })
    .await
}

/// How often a role confirms that its book lacks nothing the bucket holds, besides watching it:
/// one stream info each time, and a listing of the bucket's keys when the bucket holds a message
/// the last listing did not see.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);

/// Adds every revision the watch yields to the book, and every revision it lacks that a listing
/// of the bucket's keys finds ([`Keeper::confirm`], every [`CONFIRM_EVERY`]; only those are
/// read): async-nats' watch (an ordered push consumer) was seen to stay silent after the server
/// restarted, where the listing finds the new revision. Each confirmation moves `confirmed` to
/// the moment it began. When the watch fails or ends it is made again. Ends when nobody holds
/// the book any more.
async fn keep_current(
    store: kv::Store,
    mut updates: kv::Watch,
    tx: watch::Sender<Arc<PollBook>>,
    confirmed: Arc<Mutex<Instant>>,
) {
    let mut resync = tokio::time::interval(CONFIRM_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching = true;
    let mut failing = false;
    let mut keeper = Keeper {
        tx,
        reported: HashSet::new(),
        listed_through: 0,
    };
    loop {
        tokio::select! {
            () = keeper.tx.closed() => return,
            entry = updates.next(), if watching => match entry {
                Some(Ok(entry)) => keeper.added(&entry),
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "watching the polls bucket failed; watching again");
                    watching = false;
                }
                None => watching = false,
            },
            _ = resync.tick() => {
                let asked = Instant::now();
                match keeper.confirm(&store).await {
                    Ok(()) => {
                        *confirmed.lock().unwrap_or_else(|e| e.into_inner()) = asked;
                        if std::mem::take(&mut failing) {
                            tracing::info!("the polls bucket can be read again");
                        }
                    }
                    // Once per outage, not every second.
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(error = format!("{err:#}"), "cannot read the polls bucket");
                    }
                    Err(_) => {}
                }
                if !watching {
                    match store.watch_all().await {
                        Ok(watch) => {
                            updates = watch;
                            watching = true;
                        }
                        Err(err) => tracing::warn!(error = %err, "cannot watch the polls bucket yet"),
                    }
                }
            }
        }
    }
}

/// The book's sender, and the alarms already raised: each once, not on every read.
struct Keeper {
    tx: watch::Sender<Arc<PollBook>>,
    reported: HashSet<String>,
    /// The bucket stream's last sequence before the last listing of its keys that succeeded.
    listed_through: u64,
}

impl Keeper {
    /// Makes sure the book holds every valid revision the bucket held at some moment after this
    /// began: the bucket's last sequence, and when the last listing did not see it, a listing
    /// (with [`Keeper::add_missing`]).
    async fn confirm(&mut self, store: &kv::Store) -> anyhow::Result<()> {
        let last = store
            .stream
            .get_info()
            .await
            .context("cannot read the state of the polls bucket")?
            .state
            .last_sequence;
        if last > self.listed_through {
            self.add_missing(store).await?;
            self.listed_through = last;
        }
        Ok(())
    }

    /// Reads the revisions the book lacks and adds them.
    async fn add_missing(&mut self, store: &kv::Store) -> anyhow::Result<()> {
        let book = self.tx.borrow().clone();
        for revision in keys(store).await?.0 {
            if book.get(revision).is_none() {
                match fetch(store, revision).await? {
                    Some(Ok(stored)) => self.add(stored),
                    Some(Err(stray)) => self.skipped(&stray),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Adds the revision a watched entry holds, if it is a valid one.
    fn added(&mut self, entry: &kv::Entry) {
        let Some(revision) = revision_of(&entry.key) else {
            self.skipped(&Stray {
                key: entry.key.clone(),
                why: "not a revision's key (rev.<number>)".to_owned(),
            });
            return;
        };
        if entry.operation != kv::Operation::Put {
            self.once(
                "rewritten",
                format!("rev.{revision} was deleted; keeping the text first read"),
            );
            return;
        }
        match parse(revision, entry) {
            Ok(stored) => self.add(stored),
            Err(stray) => self.skipped(&stray),
        }
    }

    fn skipped(&mut self, stray: &Stray) {
        self.once(
            "stray_key",
            format!(
                "{} of the polls bucket is skipped: {}",
                stray.key, stray.why
            ),
        );
    }

    /// Adds a revision to the book unless it holds it already; another text under a known
    /// revision is an alarm, and the book keeps the text it read first.
    fn add(&mut self, stored: Stored) {
        let revision = stored.revision;
        let hash = RevisionHash::of(&stored.text);
        let mut rewritten = false;
        self.tx.send_if_modified(|book| match book.get(revision) {
            Some(known) => {
                rewritten = *known != stored.polls || book.hash(revision) != Some(hash);
                false
            }
            None => {
                let mut next = PollBook::clone(book);
                next.add(stored.read());
                *book = Arc::new(next);
                tracing::info!(%revision, "picked up a new revision of the poll definitions");
                true
            }
        });
        if rewritten {
            self.once(
                "rewritten",
                format!(
                    "rev.{revision} of the polls bucket changed since this process read it; \
                     keeping the text first read"
                ),
            );
        }
    }

    /// [`alarm`], unless this very alarm was raised before.
    fn once(&mut self, kind: &'static str, what: String) {
        if !self.reported.contains(&what) {
            alarm(kind, &what);
            self.reported.insert(what);
        }
    }
}
