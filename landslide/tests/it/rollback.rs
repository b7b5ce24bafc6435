//! A votes stream that goes backwards: its files restored from an older copy while the workers'
//! consumer is ahead of it, on one server and on a three-node cluster. Every vote accepted after
//! the rollback must be counted (`landslide_nats::rollback`), and the rollback is recorded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use landslide_nats::{Topology, User};
use landslide_schema::{Choice, EventId, NodeId, PollId, Revision, Timestamp, VoteEvent, VoterId};
use landslide_servers::{Nats, NatsLayout};
use uuid::Uuid;

use crate::support::{self, Db};

/// `count` votes of new voters, numbered from `first`, as an ingest node makes them now.
fn votes(first: u128, count: u128) -> Vec<VoteEvent> {
    let now = Timestamp::from_millis(u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap());
    (first..first + count)
        .map(|i| VoteEvent {
            event_id: EventId(Uuid::from_u128(i)),
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId(Uuid::from_u128(i)),
            choice: Choice::parse(if i % 2 == 0 { "cats" } else { "dogs" }).unwrap(),
            ts: now,
            node: NodeId::parse("web01").unwrap(),
            rev: Some(Revision(1)),
            after: Some(Timestamp(0)),
            rev_hash: None,
        })
        .collect()
}

/// Publishes `events` as the ingest user, each acknowledged.
async fn publish(nats: &Nats, events: &[VoteEvent]) {
    let js = jetstream::new(nats.client(User::Ingest).await.unwrap());
    for event in events {
        // A cluster that has just restarted may still elect: retry until it stores the vote.
        support::wait_for("the vote to be stored", Duration::from_secs(60), || async {
            js.publish("votes.web01", event.encode().into())
                .await
                .ok()?
                .await
                .ok()
        })
        .await;
    }
}

/// Waits until the workers' consumer has nothing pending.
async fn drained(nats: &Nats) {
    let js = jetstream::new(nats.client(User::Admin).await.unwrap());
    let topology = Topology::default();
    support::wait_for("the stream to drain", Duration::from_secs(90), || async {
        let backlog = landslide_nats::backlog(&js, &topology.votes_stream, &topology.consumer)
            .await
            .ok()?;
        (backlog.pending == 0).then_some(())
    })
    .await;
}

/// Every directory named `name` under `dir`.
fn find_dirs(dir: &Path, name: &str, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if entry.file_name() == name {
                found.push(path.clone());
            }
            find_dirs(&path, name, found);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What of a node's store makes up the streams' messages, as opposed to the consumers' state:
/// each stream's directory but its `obs/` (the consumers), and each stream's RAFT group in a
/// cluster (`_js_/S-…`; the consumers' groups are `C-…`, the meta group `_meta_`).
fn stream_parts(store: &Path) -> Vec<PathBuf> {
    let mut streams = Vec::new();
    find_dirs(store, "streams", &mut streams);
    let mut parts = Vec::new();
    for streams in streams {
        for stream in std::fs::read_dir(streams).unwrap().flatten() {
            for part in std::fs::read_dir(stream.path()).unwrap().flatten() {
                if part.file_name() != "obs" {
                    parts.push(part.path());
                }
            }
        }
    }
    let mut groups = Vec::new();
    find_dirs(store, "_js_", &mut groups);
    for groups in groups {
        for group in std::fs::read_dir(groups).unwrap().flatten() {
            if group.file_name().to_string_lossy().starts_with("S-") {
                parts.push(group.path());
            }
        }
    }
    parts
}

/// Copies the stream parts of every node's store into `backup`.
fn back_up(nats: &Nats, backup: &Path) {
    for node in 0..nats.len() {
        let store = nats.store_dir(node);
        for part in stream_parts(store) {
            let target = backup
                .join(node.to_string())
                .join(part.strip_prefix(store).unwrap());
            if part.is_dir() {
                copy_dir(&part, &target);
            } else {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(&part, &target).unwrap();
            }
        }
    }
}

/// Puts the stream parts of `backup` back in place of the current ones; the consumers' state
/// stays as it is, ahead of the streams.
fn restore(nats: &Nats, backup: &Path) {
    for node in 0..nats.len() {
        let store = nats.store_dir(node);
        for part in stream_parts(store) {
            if part.is_dir() {
                std::fs::remove_dir_all(&part).unwrap();
            } else {
                std::fs::remove_file(&part).unwrap();
            }
        }
        copy_dir(&backup.join(node.to_string()), store);
    }
}

async fn stop_all(nats: &mut Nats) {
    for node in 0..nats.len() {
        nats.terminate(node, Duration::from_secs(10)).await.unwrap();
    }
}

/// Votes, a copy of the streams, more votes (committed), the copy put back under the consumer,
/// new votes while no worker runs (the rollback unresolved: tally and `status` must say so, and
/// never show nothing pending), then a worker: each of the new voters must have a ballot, and
/// audit must name the rollback and the votes the stream lost.
async fn rolled_back_stream_counts_every_vote_accepted_after_it(layout: NatsLayout) {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(layout, dir.path()).await.unwrap();
    let db = Db::create().await;
    let replicas = layout.replicas();
    let worker_with_replicas = |nats: &Nats| {
        support::worker_with(nats, &db, |c| {
            c.connections.topology.replicas = replicas;
        })
    };
    let worker = worker_with_replicas(&nats);
    let before = votes(1, 20);
    publish(&nats, &before).await;
    drained(&nats).await;

    stop_all(&mut nats).await;
    let backup = dir.path().join("backup");
    back_up(&nats, &backup);
    nats.restart_all(&(0..nats.len()).collect::<Vec<_>>())
        .await
        .unwrap();
    let lost = votes(100, 20);
    publish(&nats, &lost).await;
    drained(&nats).await;
    worker.stop().await;

    stop_all(&mut nats).await;
    restore(&nats, &backup);
    nats.restart_all(&(0..nats.len()).collect::<Vec<_>>())
        .await
        .unwrap();
    let after = votes(200, 30);
    publish(&nats, &after).await;

    // No worker has taken up what the stream stored since: the results must not look complete.
    // (A cluster that has just restarted may still elect the consumer's leader.)
    let js = jetstream::new(nats.client(User::Admin).await.unwrap());
    support::wait_for(
        "the consumer to answer",
        Duration::from_secs(60),
        || async {
            let stream = js.get_stream("VOTES").await.ok()?;
            stream.consumer_info("dedup-worker").await.ok().map(drop)
        },
    )
    .await;
    let tally =
        support::tally_with(&nats, &db, |c| c.connections.topology.replicas = replicas).await;
    let results = support::wait_for(
        "results naming the rollback",
        Duration::from_secs(60),
        || async {
            let body: serde_json::Value = reqwest::get(format!("{}/api/results/pets", tally.url))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            body["rollback"].is_string().then_some(body)
        },
    )
    .await;
    assert!(results["pending"].as_u64() >= Some(1), "{results}");
    let status = landslide_tally::status::status(&landslide_tally::audit::AuditConfig::new(
        support::connections(&nats, User::Audit, Some(&db)),
    ))
    .await
    .unwrap();
    assert!(
        status.regression.is_some() && status.pending >= 1,
        "{status}"
    );
    assert!(status.to_string().contains("ALARM"), "{status}");

    let worker = worker_with_replicas(&nats);
    for vote in &after {
        support::wait_for(
            "every vote accepted after the rollback to be counted",
            Duration::from_secs(120),
            || db.ballot("pets", vote.voter.0),
        )
        .await;
    }
    drained(&nats).await;
    let rollbacks = support::wait_for(
        "the rollback to be recorded",
        Duration::from_secs(30),
        || async {
            let mut conn = db.conn().await;
            let rollbacks = landslide_schema::postgres::marks::rollbacks(&mut conn, "VOTES")
                .await
                .unwrap();
            (!rollbacks.is_empty()).then_some(rollbacks)
        },
    )
    .await;
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert_eq!(rollbacks[0].mark_sequence, 40, "{rollbacks:?}");

    // Audit names the rollback, the sequence used again, and the ballots of the votes the stream
    // lost (they were committed before it went back).
    let mut audit = landslide_tally::audit::AuditConfig::new(support::connections(
        &nats,
        User::Audit,
        Some(&db),
    ));
    audit.wait = Duration::from_secs(30);
    let report = landslide_tally::audit::audit(&audit).await.unwrap();
    assert_eq!(report.rollbacks.len(), 1, "{report}");
    assert_eq!(report.reused.len(), 1, "{report}");
    assert_eq!(report.regression, None, "{report}");
    assert_eq!(report.unexpected_ballots.len(), lost.len(), "{report}");
    assert!(report.missing_ballots.is_empty(), "{report}");
    assert!(report.to_string().contains("was used again"), "{report}");
    tally.role.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_restored_from_an_older_copy_on_one_server_loses_no_later_vote() {
    rolled_back_stream_counts_every_vote_accepted_after_it(NatsLayout::Single).await;
}

/// The case that loses votes without the workers' mark: a replicated consumer does not rewind
/// when its stream goes backwards, and skips every sequence the stream uses again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_restored_from_an_older_copy_on_a_cluster_loses_no_later_vote() {
    rolled_back_stream_counts_every_vote_accepted_after_it(NatsLayout::Cluster).await;
}
