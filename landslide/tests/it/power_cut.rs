//! What nats-server 2.15 rests on for an R3 stream under `sync_interval: always` (nats-server
//! #8447): its replicas' message blocks are fsynced only at stream snapshots, and after a power
//! cut every store is rebuilt from the RAFT WAL. RELIABILITY.md names four weaknesses of that
//! path (F1–F4, from the study of 2026-12-06); F4, a replicated consumer that does not rewind, is
//! `rollback::`. These tests drive the others, on disks that drop whatever was not fsynced:
//!
//! - F1: a follower that installs the leader's snapshot during a catch-up compacts its WAL before
//!   the data the snapshot covers is synced;
//! - F2: a store whose index says more than its blocks hold is recovered with a tombstone, and its
//!   last sequence right but messages missing;
//! - F3: an empty store that gets an entry compacts itself to it, and a missing prefix reads as
//!   deleted.
//!
//! Each would show as an acknowledged message missing after the cut, or as a hole (a first
//! sequence above 1, a gap): the test reads every sequence back. Its control, with the server's
//! lazy default sync, must find acknowledged messages missing: the check catches a loss.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use landslide_nats::User;
use landslide_patience::Backoff;
use landslide_servers::{Nats, NatsLayout, NatsSpec, Sync};

use crate::support;

const STREAM: &str = "POWERCUT";

/// A three-node cluster on power-loss disks with an R3 stream that allows atomic batches, as
/// `VOTES` is set up.
async fn cluster(dir: &std::path::Path, sync: Sync) -> Nats {
    let spec = NatsSpec {
        sync,
        power_loss: true,
        ..NatsSpec::new(NatsLayout::Cluster)
    };
    let nats = Nats::start_with(&spec, dir).await.unwrap();
    let js = jetstream::new(nats.client(User::Admin).await.unwrap());
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{}.*", STREAM.to_lowercase())],
        num_replicas: 3,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    nats
}

/// Publishes `count` messages numbered from `first`, each acknowledged (waiting out elections);
/// returns the payloads acknowledged.
async fn publish(nats: &Nats, first: u64, count: u64) -> Vec<Bytes> {
    let js = jetstream::new(nats.client(User::Admin).await.unwrap());
    let mut acked = Vec::new();
    for i in first..first + count {
        let payload = Bytes::from(format!("message {i:08}"));
        support::wait_for(
            "the message to be stored",
            Duration::from_secs(60),
            || async {
                js.publish(format!("{}.a", STREAM.to_lowercase()), payload.clone())
                    .await
                    .ok()?
                    .await
                    .ok()
            },
        )
        .await;
        acked.push(payload);
    }
    acked
}

/// Every message of the stream by sequence, from 1 to its last, as the leader answers; `None`
/// where a sequence holds nothing. `None` in all when the stream itself is gone: the cluster
/// answers, but not for it, for 20 s. With the lazy default sync the cut once took the stream's
/// very definition (the cluster's metadata is not fsynced either), and the control stopped on
/// "stream not found" instead of counting everything in it lost (CI's second of ten runs,
/// 2026-12-06).
async fn read_back(nats: &Nats) -> Option<(stream::State, Vec<Option<Bytes>>)> {
    let js = jetstream::new(nats.client(User::Admin).await.unwrap());
    let mut backoff = Backoff::constant(Duration::from_millis(200))
        .within(Duration::from_secs(60), "the stream to answer");
    let mut gone_since = None;
    let (stream, state) = loop {
        // "stream not found" comes from either request (the info, once, after the handle).
        let gone = match js.get_stream(STREAM).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => {
                    let state = info.state.clone();
                    break (stream, state);
                }
                Err(err) => err.to_string().contains("stream not found"),
            },
            Err(err) => err.to_string().contains("stream not found"),
        };
        if gone {
            let since = *gone_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > Duration::from_secs(20) {
                return None;
            }
        } else {
            gone_since = None;
        }
        assert!(
            backoff.wait().await.is_ok(),
            "the stream did not answer within 60 s"
        );
    };
    let mut messages = Vec::new();
    for sequence in 1..=state.last_sequence {
        messages.push(
            stream
                .get_raw_message(sequence)
                .await
                .ok()
                .map(|m| m.payload),
        );
    }
    Some((state, messages))
}

/// A follower is away while the leader takes messages and snapshots (a step-down makes the new
/// leader snapshot), comes back and catches up, and the power goes on all three at once right
/// after. Returns the acknowledged payloads, what the stream holds afterwards (`None` when it is
/// gone), and what the disks lost.
#[allow(clippy::type_complexity)]
async fn cut_after_a_catch_up(
    sync: Sync,
) -> (Vec<Bytes>, Option<(stream::State, Vec<Option<Bytes>>)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = cluster(dir.path(), sync).await;
    let mut acked = publish(&nats, 0, 200).await;
    nats.kill(2).await.unwrap();
    acked.extend(publish(&nats, 200, 300).await);
    let admin = nats.client(User::Admin).await.unwrap();
    // The new leader snapshots the stream: the returning follower is then brought up to date
    // from that snapshot (F1's path), not only from the log.
    let _ = admin
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"),
            Bytes::new(),
        )
        .await;
    acked.extend(publish(&nats, 500, 200).await);
    nats.restart(2).await.unwrap();
    acked.extend(publish(&nats, 700, 100).await);
    let cut = nats.power_cut(&[0, 1, 2]).await.unwrap();
    let lost: u64 = cut.iter().map(|c| c.bytes).sum();
    nats.restart_all(&[0, 1, 2]).await.unwrap();
    (acked, read_back(&nats).await, lost)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_cut_right_after_a_follower_caught_up_keeps_every_acknowledged_message_without_a_hole()
 {
    let (acked, read, lost) = cut_after_a_catch_up(Sync::Always).await;
    let (state, messages) = read.expect("the stream itself is gone after the cut");
    eprintln!("the disks lost {lost} unsynced bytes; the stream holds {state:?}");
    assert_eq!(state.first_sequence, 1, "a missing prefix (F3): {state:?}");
    let holes: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].is_none())
        .map(|i| i + 1)
        .collect();
    assert!(
        holes.is_empty(),
        "sequences without a message (F2): {holes:?}"
    );
    let held: std::collections::HashSet<&Bytes> = messages.iter().flatten().collect();
    let missing: Vec<&Bytes> = acked.iter().filter(|p| !held.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost (F1), first {:?}",
        missing.len(),
        missing.first()
    );
}

/// The control: with the server's default lazy sync the same cut loses acknowledged messages,
/// and the check above finds them. Without it, a pass could come from a cut that drops nothing.
#[tokio::test(flavor = "multi_thread")]
async fn with_lazy_sync_the_same_cut_loses_acknowledged_messages_and_the_check_finds_them() {
    let (acked, read, lost) = cut_after_a_catch_up(Sync::Lazy).await;
    // A stream gone whole lost every message in it.
    let messages = read.map(|(_, messages)| messages).unwrap_or_default();
    let held: std::collections::HashSet<&Bytes> = messages.iter().flatten().collect();
    let missing = acked.iter().filter(|p| !held.contains(p)).count();
    assert!(
        lost > 0 && missing > 0,
        "lazy sync lost {missing} acknowledged messages ({lost} unsynced bytes dropped): the \
         cut cannot catch a loss"
    );
}
