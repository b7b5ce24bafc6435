//! `landslide replay` folds the stream into a database again: one restored from an older dump
//! (whose votes since the dump the consumer has long acknowledged, so no worker will ever see them
//! again), and a new, empty one (migrated first, by its owner: replay writes as a worker and may
//! not). Audit then passes, and a second replay changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use landslide_dedup_worker::replay;
use landslide_schema::VoteEvent;
use landslide_tally::audit::{AuditConfig, AuditReport, audit};
use uuid::Uuid;

use crate::support::{self, Db};
use crate::tally::{Stack, vote};

const VOTERS: usize = 1_000;

async fn audit_of(stack: &Stack, db: &Db) -> AuditReport {
    let mut config = AuditConfig::new(
        stack
            .nats
            .connections(landslide_nats::User::Audit, Some(db)),
    );
    config.connections.topology = stack.topology.clone();
    config.wait = Duration::from_secs(30);
    audit(&config).await.expect("audit runs")
}

async fn replay_into(stack: &Stack, db: &Db) -> landslide_dedup_worker::ReplayReport {
    let mut config = landslide_dedup_worker::Config::new(
        stack
            .nats
            .connections(landslide_nats::User::Worker, Some(db)),
    );
    config.connections.topology = stack.topology.clone();
    // Several transactions, so that a voter's events fall into different ones.
    replay(&config, 700).await.expect("replay runs")
}

/// Publishes the events with up to 500 acks in flight.
async fn publish_all(stack: &Stack, events: &[VoteEvent]) {
    for chunk in events.chunks(500) {
        let mut acks = Vec::new();
        for event in chunk {
            let subject = format!("{}.{}", stack.topology.votes_prefix, event.node);
            let ack = stack
                .js
                .publish(subject, event.encode().into())
                .await
                .expect("publish");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("publish ack");
        }
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (PostgreSQL's client programs): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn dump(db: &Db, file: &Path) {
    let file = file.to_str().unwrap();
    run("pg_dump", &["--format=custom", "--file", file, &db.url]);
}

fn restore(db: &Db, file: &Path) {
    let file = file.to_str().unwrap();
    let args = [
        "--clean",
        "--if-exists",
        "--single-transaction",
        "--dbname",
        &db.url,
        file,
    ];
    run("pg_restore", &args);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restored_from_an_older_dump_is_made_whole_by_replay() {
    let stack = Stack::start().await;
    let worker = support::worker(&stack.nats, &stack.db);
    let voters: Vec<Uuid> = (0..VOTERS).map(|_| Uuid::new_v4()).collect();

    // Day one: every voter votes; the worker counts it all; last night's backup.
    let day_one: Vec<VoteEvent> = voters
        .iter()
        .enumerate()
        .map(|(i, v)| vote(*v, ["cats", "dogs"][i % 2], 1_000 + i as u64))
        .collect();
    publish_all(&stack, &day_one).await;
    support::drained(&stack.nats).await;
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("landslide.dump");
    dump(&stack.db, &backup);

    // Day two: half change their mind, new voters come, one message is garbage.
    let mut day_two: Vec<VoteEvent> = voters
        .iter()
        .step_by(2)
        .map(|v| vote(*v, "dogs", 1_000_000))
        .collect();
    day_two.extend((0..VOTERS / 2).map(|i| vote(Uuid::new_v4(), "cats", 2_000 + i as u64)));
    publish_all(&stack, &day_two).await;
    stack.publish_raw(b"not a vote".to_vec()).await;
    support::drained(&stack.nats).await;
    worker.stop().await;
    let whole = audit_of(&stack, &stack.db).await;
    assert!(whole.is_consistent(), "{whole}");

    // The database is lost and last night's backup restored: day two is gone from it, and the
    // consumer will never deliver day two again.
    restore(&stack.db, &backup);
    let restored = audit_of(&stack, &stack.db).await;
    assert!(!restored.is_consistent(), "{restored}");
    assert_eq!(
        restored.missing_ballots.len() + restored.wrong_ballots.len(),
        VOTERS / 2 + VOTERS / 2,
        "{restored}"
    );

    let started = Instant::now();
    let report = replay_into(&stack, &stack.db).await;
    eprintln!("{report} (test: {:?})", started.elapsed());
    let events = (day_one.len() + day_two.len()) as u64;
    assert_eq!(
        (report.events_read, report.counted, report.not_counted),
        (events + 1, events, 1),
        "{report}"
    );
    assert!(report.transactions > 1, "{report}");
    let replayed = audit_of(&stack, &stack.db).await;
    assert!(replayed.is_consistent(), "{replayed}");
    assert_eq!(replayed.ballots, (VOTERS + VOTERS / 2) as u64);

    // Idempotent: a second replay changes no ballot and no count.
    let tallies = stack.db.tally_and_count("pets").await;
    replay_into(&stack, &stack.db).await;
    assert_eq!(stack.db.tally_and_count("pets").await, tallies);
    assert!(audit_of(&stack, &stack.db).await.is_consistent());

    // A new, empty database is made whole just the same, once `landslide migrate` made its
    // schema: replay, as the worker's user, may not.
    let empty = Db::create_empty().await;
    let refused = landslide_dedup_worker::replay(
        &landslide_dedup_worker::Config::new(
            stack
                .nats
                .connections(landslide_nats::User::Worker, Some(&empty)),
        ),
        landslide_dedup_worker::replay::CHUNK,
    )
    .await
    .expect_err("replay needs a migrated database");
    assert!(
        format!("{refused:#}").contains("run `landslide migrate`"),
        "{refused:#}"
    );
    landslide_schema::postgres::migrate(&empty.owner())
        .await
        .unwrap();
    replay_into(&stack, &empty).await;
    let fresh = audit_of(&stack, &empty).await;
    assert!(fresh.is_consistent(), "{fresh}");
    assert_eq!(empty.tally_and_count("pets").await, tallies);
}
