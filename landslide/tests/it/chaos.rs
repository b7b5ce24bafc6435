//! The short form of the reliability harness (crate `landslide-chaos`): the real `landslide`
//! binary as separate processes under a seeded load, with every fault kind injected, checked
//! against the harness's model of what each voter was told. The long form is `scripts/chaos`.
//!
//! `LANDSLIDE_SEED=<n>` replays a seed's schedule in every test here; a failed run's report
//! prints the exact command, and keeps the run's folder (every server's and role's log).

use std::time::Duration;

use landslide_chaos::faults::FaultKind;
use landslide_chaos::{NatsLayout, Scenario};
use landslide_nats::{Topology, User};
use landslide_servers::Nats;
use uuid::Uuid;

use crate::support::{self, Db};

/// `LANDSLIDE_SEED` if set, else `default_seed`.
fn seed_or(default_seed: u64) -> u64 {
    std::env::var("LANDSLIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seed)
}

/// The test that replays a layout's seed: the fresh seed's runs are replayed there too.
fn test_of(layout: NatsLayout) -> &'static str {
    match layout {
        NatsLayout::Single => "chaos::single_server_faults",
        NatsLayout::Cluster => "chaos::cluster_faults",
    }
}

async fn run(layout: NatsLayout, default_seed: u64) {
    run_with(layout, default_seed, |_| {}).await;
}

/// [`run`], with the scenario changed by `adjust`; the report of a run that passed.
async fn run_with(
    layout: NatsLayout,
    default_seed: u64,
    adjust: impl FnOnce(&mut Scenario),
) -> landslide_chaos::Report {
    let seed = seed_or(default_seed);
    let mut scenario = Scenario {
        test: Some(test_of(layout).to_owned()),
        ..Scenario::short(layout, seed, env!("CARGO_BIN_EXE_landslide"))
    };
    adjust(&mut scenario);
    let report = landslide_chaos::run(&scenario)
        .await
        .expect("the harness could not run");
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    for kind in FaultKind::for_layout(layout) {
        assert!(
            report.injected(kind) >= 1,
            "{kind:?} was never injected (seed {seed})"
        );
    }
    assert!(report.lost + report.doubled + report.misordered == 0);
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn single_server_faults_lose_double_and_misorder_no_vote() {
    run(NatsLayout::Single, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_faults_lose_double_and_misorder_no_vote() {
    run(NatsLayout::Cluster, 2).await;
}

/// The cluster's faults with the votes split over three partition streams, one ingest node on
/// each: node kills, the VOTES leader cut off, power cuts. A voter's votes land in different
/// partitions (the harness's voters move between nodes), and latest-wins must hold across them.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_faults_with_three_vote_partitions_lose_double_and_misorder_no_vote() {
    let report = run_with(NatsLayout::Cluster, 4, |scenario| {
        scenario.vote_partitions = 3;
        scenario.test = Some("chaos::cluster_faults_with_three_vote_partitions".to_owned());
    })
    .await;
    let streams: Vec<&str> = report
        .partition_messages
        .iter()
        .map(|(stream, _)| stream.as_str())
        .collect();
    assert_eq!(streams, ["VOTES", "VOTES_P1", "VOTES_P2"], "{report}");
    assert!(
        report.partition_messages.iter().all(|(_, n)| *n > 0),
        "a partition took no vote: {report}"
    );
}

/// The control of the power-loss fault. With nats-server's default lazy sync, acks come from the
/// page cache, and a power cut while the workers lag loses votes that voters were told were
/// accepted: the harness must find them and fail. Without this, a pass with `sync_interval:
/// always` could come from a fault that loses nothing.
#[tokio::test(flavor = "multi_thread")]
async fn with_lazy_sync_a_power_cut_loses_accepted_votes_and_the_harness_finds_them() {
    let seed = seed_or(3);
    let scenario = Scenario {
        sync: landslide_servers::Sync::Lazy,
        faults: vec![FaultKind::PowerLoss],
        // Late in the load, and with little patience: after the cut the stream itself may be
        // gone, and every vote after it refused.
        fault_window: (0.85, 0.9),
        drain_timeout: Duration::from_secs(20),
        give_up: Duration::from_secs(10),
        poison: 0,
        test: Some("chaos::with_lazy_sync".to_owned()),
        ..Scenario::short(NatsLayout::Single, seed, env!("CARGO_BIN_EXE_landslide"))
    };
    let report = landslide_chaos::run(&scenario)
        .await
        .expect("the harness could not run");
    eprintln!("{report}");
    assert_eq!(report.injected(FaultKind::PowerLoss), 1, "{report}");
    // An accepted vote the cut took shows as a voter without a ballot (lost) or, when it was
    // the voter's latest, as an earlier vote of theirs counted instead (misordered). A clean
    // clone's CI once saw a cut take the whole stream with lost 0 and misordered 1, and an
    // earlier run counted lost 0 and misordered 3.
    assert!(
        report.lost + report.misordered > 0,
        "with lazy sync the power cut lost no accepted vote, so the fault cannot catch a loss \
         (seed {seed}):\n{report}"
    );
    assert!(!report.passed(), "{report}");
    // A failed run keeps its folder for the reader; this failure is the expected one.
    if let Some(logs) = &report.logs {
        std::fs::remove_dir_all(logs).unwrap();
    }
}

/// A new seed on every run, printed, so that CI explores schedules beyond the fixed two.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_seed_loses_doubles_and_misorders_no_vote() {
    let seed = rand::random::<u64>();
    eprintln!("fresh seed {seed}");
    let layout = if seed.is_multiple_of(2) {
        NatsLayout::Single
    } else {
        NatsLayout::Cluster
    };
    run(layout, seed).await;
}

/// Found by the harness (seed 20261124, cluster): a worker restarted while the cluster was still
/// electing leaders exited at once on "JetStream system temporarily unavailable", and with both
/// workers gone nothing drained. A role now waits for JetStream at startup.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_without_quorum_waits_for_it_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(NatsLayout::Cluster, dir.path()).await.unwrap();
    let db = Db::create().await;
    let topology = Topology {
        replicas: 3,
        ..Topology::default()
    };
    let setup = async_nats::jetstream::new(support::client_as(&nats, User::Worker).await);
    landslide_nats::ensure_consumer(&setup, &topology, landslide_nats::Access::SetUp)
        .await
        .unwrap();
    // Votes come from ingest's user, the only one that may publish them.
    let js = async_nats::jetstream::new(support::client_as(&nats, User::Ingest).await);

    // Two of three nodes gone: the last one answers, but JetStream is unavailable there.
    nats.kill(1).await.unwrap();
    nats.kill(2).await.unwrap();
    let worker = support::worker_with(&nats, &db, |c| c.connections.topology = topology.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    if worker.is_finished() {
        panic!(
            "the worker gave up while the cluster had no quorum: {:?}",
            worker.join().await
        );
    }

    nats.restart(1).await.unwrap();
    nats.restart(2).await.unwrap();
    a_vote_is_stored_then_counted(&js, &db, "dogs").await;
    worker.stop().await;
}

/// Found by the harness (a fresh seed in CI, 2026-11-30): a worker restarted just as nats-server
/// was killed exited on "cannot connect to NATS", and the stream was never drained. A role now
/// waits for the server at startup, as it waits for JetStream.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_while_nats_server_is_down_waits_for_it_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = Nats::start(NatsLayout::Single, dir.path()).await.unwrap();
    let db = Db::create().await;
    nats.kill(0).await.unwrap();
    let worker = support::worker_with(&nats, &db, |_| {});
    tokio::time::sleep(Duration::from_secs(2)).await;
    if worker.is_finished() {
        panic!(
            "the worker gave up while nats-server was down: {:?}",
            worker.join().await
        );
    }

    nats.restart(0).await.unwrap();
    let js = async_nats::jetstream::new(support::client_as(&nats, User::Ingest).await);
    a_vote_is_stored_then_counted(&js, &db, "cats").await;
    worker.stop().await;
}

/// Publishes one vote, retrying while JetStream cannot store it yet, and waits for its ballot.
async fn a_vote_is_stored_then_counted(js: &async_nats::jetstream::Context, db: &Db, choice: &str) {
    let voter = Uuid::new_v4();
    let event = crate::tally::vote(voter, choice, 1_000);
    support::wait_for("the vote to be stored", Duration::from_secs(30), || {
        let js = js.clone();
        let payload = event.encode();
        async move {
            js.publish("votes.web1", payload.into())
                .await
                .ok()?
                .await
                .ok()
                .map(drop)
        }
    })
    .await;
    let ballot = support::wait_for("the ballot", Duration::from_secs(60), || {
        db.ballot("pets", voter)
    })
    .await;
    assert_eq!(ballot.0, choice);
}

/// Found by the harness (a fresh seed in CI): a worker that started just as PostgreSQL was shut
/// down exited on "the database system is shutting down". It now waits for the database.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_started_while_postgres_is_down_waits_for_it_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let mut postgres = landslide_servers::Postgres::start(dir.path())
        .await
        .unwrap();
    // Migrated first, as every deployment does (`landslide migrate`), then down.
    let db = support::Db::create_on(&postgres.url("postgres")).await;
    postgres
        .stop(landslide_servers::PgStop::Fast)
        .await
        .unwrap();
    let nats = support::Nats::start().await;
    let worker = support::worker_with(&nats, &db, |_| {});
    tokio::time::sleep(Duration::from_secs(2)).await;
    if worker.is_finished() {
        panic!(
            "the worker gave up while PostgreSQL was down: {:?}",
            worker.join().await
        );
    }
    postgres.start_server().await.unwrap();

    let voter = Uuid::new_v4();
    let event = crate::tally::vote(voter, "cats", 1_000);
    // The worker has set the stream up by now, or will: publish as ingest, retrying until then.
    let js = async_nats::jetstream::new(nats.client_as(User::Ingest).await);
    support::wait_for("the votes stream", Duration::from_secs(60), || async {
        landslide_nats::ensure_votes_stream(
            &js,
            &Topology::default(),
            landslide_nats::Access::ReadOnly,
        )
        .await
        .ok()
    })
    .await;
    js.publish("votes.web1", event.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let choice = support::wait_for("the ballot", Duration::from_secs(60), || {
        db.choice_when_reachable(voter)
    })
    .await;
    assert_eq!(choice, "cats");
    worker.stop().await;
}

/// Found by the harness (a fresh seed in CI, with a power cut of PostgreSQL): after PostgreSQL
/// restarted and the broker connection came back, every check of the stream against the
/// workers' mark failed on the connection PostgreSQL had closed ("cannot read the workers' mark:
/// connection closed", for minutes), and since no batch runs after a reconnection before a check
/// passes, nothing dropped that connection: the worker counted nothing more. A failed check now
/// connects again at the next.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_counts_again_after_its_database_and_its_broker_both_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut postgres = landslide_servers::Postgres::start(dir.path())
        .await
        .unwrap();
    let db = support::Db::create_on(&postgres.url("postgres")).await;
    let mut nats = support::Nats::start().await;
    let worker = support::worker_with(&nats, &db, |_| {});
    let js = async_nats::jetstream::new(nats.client_as(User::Ingest).await);
    let ballot = |voter: Uuid| db.choice_when_reachable(voter);
    let publish = async |js: &async_nats::jetstream::Context, voter: Uuid, choice, ts| {
        let event = crate::tally::vote(voter, choice, ts);
        support::wait_for("the vote stored", Duration::from_secs(60), || async {
            js.publish("votes.web1", event.encode().into())
                .await
                .ok()?
                .await
                .ok()
        })
        .await;
    };
    let first = Uuid::new_v4();
    publish(&js, first, "cats", 1_000).await;
    support::wait_for("the first ballot", Duration::from_secs(60), || {
        ballot(first)
    })
    .await;

    // PostgreSQL goes down hard and comes back while the worker is idle: its connection is
    // closed, and nothing has used it since. Then the broker restarts, so the worker checks the
    // stream before it counts anything.
    postgres
        .stop(landslide_servers::PgStop::Immediate)
        .await
        .unwrap();
    postgres.start_server().await.unwrap();
    nats.kill().await;
    nats.restart().await;

    let js = async_nats::jetstream::new(nats.client_as(User::Ingest).await);
    let second = Uuid::new_v4();
    publish(&js, second, "dogs", 2_000).await;
    let choice = support::wait_for("the second ballot", Duration::from_secs(60), || {
        ballot(second)
    })
    .await;
    assert_eq!(choice, "dogs");
    worker.stop().await;
}
