//! The poll definitions of a deployment, in one JetStream key-value bucket that every role reads.
//!
//! Each revision is its own key, `rev.1`, `rev.2`, …, holding the polls file's TOML as written:
//! immutable once created (`create` fails on a key that exists, so two operators putting at once
//! get two revisions, never one overwritten), and kept for good (history 1 per key is enough, since
//! no key is written twice). `nats kv get LANDSLIDE_POLLS rev.3` shows one. Roles watch the bucket
//! and read it whole every few seconds, so they see a new revision within moments, without a
//! restart ([`watch`]).

use std::sync::Arc;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use landslide_schema::poll::{PollBook, Polls, Revision};
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

/// Opens the polls bucket; with [`Access::SetUp`], creates it (with the topology's replicas)
/// if it is missing.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    topology: &Topology,
    access: Access,
) -> anyhow::Result<kv::Store> {
    let bucket = &topology.polls_bucket;
    match js.get_key_value(bucket).await {
        Ok(store) => Ok(store),
        Err(err)
            if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket
                && access == Access::ReadOnly =>
        {
            Err(NotSetUp {
                what: format!("the polls bucket {bucket}"),
            }
            .into())
        }
        Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
            let config = kv::Config {
                bucket: bucket.clone(),
                description: "Landslide's poll definitions, one immutable revision per key"
                    .to_owned(),
                history: 1,
                num_replicas: topology.replicas,
                storage: jetstream::stream::StorageType::File,
                max_value_size: 1 << 20,
                ..Default::default()
            };
            js.create_key_value(config)
                .await
                .with_context(|| format!("cannot create the polls bucket {bucket}"))
        }
        Err(err) => Err(err).with_context(|| format!("cannot open the polls bucket {bucket}")),
    }
}

/// The revisions in the bucket, oldest first, by their keys alone.
async fn revisions(store: &kv::Store) -> anyhow::Result<Vec<Revision>> {
    let mut keys = store.keys().await.context("cannot list the polls bucket")?;
    let mut revisions = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.context("cannot list the polls bucket")?;
        revisions.extend(revision_of(&key));
    }
    revisions.sort_unstable();
    Ok(revisions)
}

/// One revision's text and polls; `None` when its key holds no value.
async fn fetch(store: &kv::Store, revision: Revision) -> anyhow::Result<Option<(String, Polls)>> {
    let key = key(revision);
    let Some(value) = store
        .get(&key)
        .await
        .with_context(|| format!("cannot read {key} of the polls bucket"))?
    else {
        return Ok(None);
    };
    let text = String::from_utf8(value.to_vec())
        .with_context(|| format!("{key} of the polls bucket is not UTF-8"))?;
    let polls = Polls::from_toml(&text)
        .with_context(|| format!("{key} of the polls bucket is not a valid polls file"))?;
    Ok(Some((text, polls)))
}

/// Every revision in the bucket, with its text, oldest first.
pub async fn read_all(store: &kv::Store) -> anyhow::Result<Vec<(Revision, String, Polls)>> {
    let mut all = Vec::new();
    for revision in revisions(store).await? {
        if let Some((text, polls)) = fetch(store, revision).await? {
            all.push((revision, text, polls));
        }
    }
    Ok(all)
}

/// Writes `text` (a polls file, checked first) as the next revision and returns its number.
pub async fn put(store: &kv::Store, text: &str) -> anyhow::Result<Revision> {
    Polls::from_toml(text).context("refusing an invalid polls file")?;
    for _ in 0..10 {
        let next = revisions(store)
            .await?
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

/// The book of every revision; with [`Access::SetUp`], seeding the bucket with `seed` (as
/// revision 1) when it holds none. A `seed` that differs from the latest revision is not
/// written: the bucket is the one place of truth, changed with `landslide polls put`
/// ([`watch`], for the roles, says so).
pub async fn load(store: &kv::Store, seed: &Polls, access: Access) -> anyhow::Result<PollBook> {
    let mut revisions = read_all(store).await?;
    if revisions.is_empty() && access == Access::ReadOnly {
        return Err(NotSetUp {
            what: "a revision of the poll definitions".to_owned(),
        }
        .into());
    }
    if revisions.is_empty() {
        match store.create(key(Revision(1)), seed.to_toml().into()).await {
            Ok(_) => tracing::info!("seeded the polls bucket with revision 1"),
            // Another role seeded it at the same moment.
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(err).context("cannot seed the polls bucket"),
        }
        revisions = read_all(store).await?;
    }
    let mut book: Option<PollBook> = None;
    for (revision, _, polls) in revisions {
        match &mut book {
            None => book = Some(PollBook::new(revision, polls)),
            Some(book) => book.insert(revision, polls),
        }
    }
    book.context("the polls bucket is empty after seeding it")
}

/// The poll definitions a role works by, kept current by a task that watches the bucket.
#[derive(Debug, Clone)]
pub struct PollWatch {
    rx: watch::Receiver<Arc<PollBook>>,
}

impl PollWatch {
    /// The book as of now.
    pub fn current(&self) -> Arc<PollBook> {
        self.rx.borrow().clone()
    }

    /// Waits until the book changes (the sender never goes away while its task watches).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// Loads the book (with [`Access::SetUp`], seeding the bucket if it is empty) and keeps it
/// current for as long as anyone holds it: a task watches the bucket and reads it whole every
/// [`RESYNC`].
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
    tokio::spawn(keep_current(store, updates, tx));
    Ok(PollWatch { rx })
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

/// How often a role reads the whole bucket besides watching it.
const RESYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// Adds every revision the watch yields to the book, and every revision a listing of the
/// bucket's keys finds every [`RESYNC`] that the book lacks (only those are read): async-nats' watch (an ordered push consumer) was seen to stay
/// silent after the server restarted, where the read finds the new revision. When the watch fails
/// or ends it is made again. Ends when nobody holds the book any more.
async fn keep_current(store: kv::Store, mut updates: kv::Watch, tx: watch::Sender<Arc<PollBook>>) {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching = true;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            entry = updates.next(), if watching => match entry {
                Some(Ok(entry)) => added(&tx, &entry),
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "watching the polls bucket failed; watching again");
                    watching = false;
                }
                None => watching = false,
            },
            _ = resync.tick() => {
                if let Err(err) = add_missing(&store, &tx).await {
                    tracing::warn!(error = format!("{err:#}"), "cannot read the polls bucket");
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

/// Reads the revisions the book lacks and adds them.
async fn add_missing(store: &kv::Store, tx: &watch::Sender<Arc<PollBook>>) -> anyhow::Result<()> {
    let book = tx.borrow().clone();
    for revision in revisions(store).await? {
        if book.get(revision).is_none()
            && let Some((_, polls)) = fetch(store, revision).await?
        {
            add(tx, revision, polls);
        }
    }
    Ok(())
}

/// Adds the revision a watched entry holds, if it is a valid one.
fn added(tx: &watch::Sender<Arc<PollBook>>, entry: &kv::Entry) {
    let Some(revision) = revision_of(&entry.key) else {
        return;
    };
    if entry.operation != kv::Operation::Put {
        return;
    }
    let polls = std::str::from_utf8(&entry.value)
        .ok()
        .and_then(|text| Polls::from_toml(text).ok());
    match polls {
        Some(polls) => add(tx, revision, polls),
        None => tracing::error!(
            %revision,
            "a revision in the polls bucket is not a valid polls file; ignored"
        ),
    }
}

/// Adds a revision to the book unless it holds it already.
fn add(tx: &watch::Sender<Arc<PollBook>>, revision: Revision, polls: Polls) {
    tx.send_if_modified(|book| {
        if book.get(revision) == Some(&polls) {
            return false;
        }
        let mut next = PollBook::clone(book);
        next.insert(revision, polls);
        *book = Arc::new(next);
        tracing::info!(%revision, "picked up a new revision of the poll definitions");
        true
    });
}
