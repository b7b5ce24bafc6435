//! The dedup-worker against a real stream and database: crashes, concurrency, poison.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use landslide_dedup_worker::FailPoint;
use landslide_nats::Topology;
use landslide_schema::{
    Choice, EventId, NodeId, PollId, Revision, RevisionHash, Timestamp, VoteEvent, VoterId, merge,
};
use secrecy::ExposeSecret as _;
use uuid::Uuid;

use crate::support::{self, Db, Nats};

/// A small deterministic generator, so a failing run can be replayed from its seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn event(voter: u128, ts: u64, choice: &str, id: u128) -> VoteEvent {
    VoteEvent {
        event_id: EventId(Uuid::from_u128(id)),
        poll: PollId::parse("pets").unwrap(),
        voter: VoterId(Uuid::from_u128(voter)),
        choice: Choice::parse(choice).unwrap(),
        ts: Timestamp(ts),
        node: NodeId::parse("web01").unwrap(),
        rev: None,
        after: None,
        rev_hash: None,
    }
}

/// Publishes raw payloads to `votes.web01`, awaiting every ack.
async fn publish_raw(nats: &Nats, payloads: impl IntoIterator<Item = Vec<u8>>) {
    let setup = jetstream::new(nats.client_as(landslide_nats::User::Worker).await);
    landslide_nats::ensure_votes_stream(
        &setup,
        &Topology::default(),
        landslide_nats::Access::SetUp,
    )
    .await
    .unwrap();
    let js = jetstream::new(nats.client_as(landslide_nats::User::Ingest).await);
    // At most a window of acks outstanding: the server fsyncs each plain publish, so the last of
    // 5,000 sent at once waited behind all the others and outlived its 5 s ack timeout on a
    // loaded machine. What is stored is the same.
    const WINDOW: usize = 256;
    let mut acks: std::collections::VecDeque<jetstream::context::PublishAckFuture> =
        std::collections::VecDeque::with_capacity(WINDOW);
    for payload in payloads {
        if acks.len() == WINDOW
            && let Some(ack) = acks.pop_front()
        {
            ack.await.unwrap();
        }
        acks.push_back(js.publish("votes.web01", payload.into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// The ballot row `event` makes: `(choice, ts, event id)`, as `Db::ballot` reads it.
fn as_ballot(event: &VoteEvent) -> (String, i64, Uuid) {
    (
        event.choice.to_string(),
        event.ts.to_i64(),
        event.event_id.0,
    )
}

/// The first `n` messages of the dead-letter stream, waiting up to 5 s for each.
async fn dead_letters(nats: &Nats, n: usize) -> Vec<jetstream::Message> {
    let js = jetstream::new(nats.client().await);
    let dlq = js.get_stream("VOTES_DLQ").await.unwrap();
    let consumer = dlq
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap().take(n);
    let mut dead = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap_or_else(|_| panic!("{n} dead letters, only {} came", dead.len()))
    {
        dead.push(message.unwrap());
    }
    dead
}

/// The latest of `events` per voter. They are of wire version 1, which orders by `(ts, event
/// id)` alone: when the stream stored them does not matter.
fn latest_per_voter(events: &[VoteEvent]) -> BTreeMap<merge::BallotKey, merge::StoredVote> {
    merge::latest_per_voter(
        events
            .iter()
            .map(|e| merge::StoredVote::new(e.clone(), chrono::DateTime::UNIX_EPOCH)),
    )
}

/// The expected (option → count) of the latest event per voter.
fn model_counts(events: &[VoteEvent]) -> Vec<(String, i64, i64)> {
    let mut counts = BTreeMap::<String, i64>::new();
    for ballot in latest_per_voter(events).values() {
        *counts.entry(ballot.event.choice.to_string()).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(option, n)| (option, n, n))
        .collect()
}

fn short_ack_wait() -> Topology {
    Topology {
        ack_wait: Some(Duration::from_secs(1)),
        ..Topology::default()
    }
}

async fn crash_then_recover(fail_point: FailPoint) {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let events: Vec<VoteEvent> = (0..50)
        .map(|i| {
            event(
                i % 10,
                1_000 + i as u64,
                if i % 3 == 0 { "cats" } else { "dogs" },
                i,
            )
        })
        .collect();
    publish_raw(&nats, events.iter().map(VoteEvent::encode)).await;

    let crashing = support::worker_with(&nats, &db, |c| {
        c.connections.topology = short_ack_wait();
        c.fail_point = Some(fail_point);
    });
    let err = crashing
        .join()
        .await
        .expect_err("the worker stops at its fail point");
    assert!(err.to_string().contains("fail point"), "{err:#}");
    let after_crash = db.tally_and_count("pets").await;
    match fail_point {
        FailPoint::AfterCommit => assert_eq!(after_crash, model_counts(&events)),
        FailPoint::BeforeCommit => assert_eq!(after_crash, []),
    }
    assert_eq!(support::pending(&nats).await, Some(50), "nothing was acked");

    let worker = support::worker_with(&nats, &db, |c| c.connections.topology = short_ack_wait());
    support::drained(&nats).await;
    assert_eq!(db.tally_and_count("pets").await, model_counts(&events));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_dies_after_commit_but_before_ack_does_not_double_count() {
    crash_then_recover(FailPoint::AfterCommit).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_dies_before_commit_loses_nothing() {
    crash_then_recover(FailPoint::BeforeCommit).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_keep_every_ballot_latest_and_every_tally_exact() {
    let seed = std::env::var("LANDSLIDE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1a2d);
    eprintln!("seed {seed} (LANDSLIDE_SEED replays it)");
    let mut rng = XorShift(seed);
    let nats = Nats::start().await;
    let db = Db::create().await;

    // Thousands of events over a few voters: many changes of mind per voter, stamps that collide,
    // published in random order, a quarter of them twice.
    let options = ["cats", "dogs"];
    let mut events = Vec::new();
    for i in 0..4000u128 {
        let voter = u128::from(rng.below(12));
        let ts = rng.below(3_000);
        let choice = options[rng.below(2) as usize];
        events.push(event(voter, ts, choice, i * 7919 % 65_521));
    }
    let mut payloads: Vec<Vec<u8>> = events.iter().map(VoteEvent::encode).collect();
    for i in 0..1000 {
        payloads.push(payloads[i * 3].clone());
    }
    for i in (1..payloads.len()).rev() {
        payloads.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let a = support::worker_with(&nats, &db, |c| c.batch_size = 97);
    let b = support::worker_with(&nats, &db, |c| c.batch_size = 13);
    publish_raw(&nats, payloads).await;
    support::drained(&nats).await;

    let expected = latest_per_voter(&events);
    for ((poll, voter), latest) in &expected {
        let ballot = db.ballot(poll.as_str(), voter.0).await.expect("ballot");
        assert_eq!(
            ballot,
            as_ballot(&latest.event),
            "voter {voter} (seed {seed})"
        );
    }
    assert_eq!(
        db.tally_and_count("pets").await,
        model_counts(&events),
        "seed {seed}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_message_ends_in_the_dead_letter_stream_and_the_worker_goes_on() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let mut unknown_poll = event(2, 10, "cats", 2);
    unknown_poll.poll = PollId::parse("lunch").unwrap();
    let mut unknown_option = event(3, 10, "cats", 3);
    unknown_option.choice = Choice::parse("fish").unwrap();
    publish_raw(
        &nats,
        [
            b"not a vote".to_vec(),
            unknown_poll.encode(),
            unknown_option.encode(),
            event(1, 10, "cats", 1).encode(),
        ],
    )
    .await;
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1)]
    );

    let mut reasons = Vec::new();
    for message in dead_letters(&nats, 3).await {
        let headers = message.headers.clone().unwrap();
        assert_eq!(message.subject.as_str(), "dlq.votes.web01");
        assert_eq!(
            headers.get("Landslide-Subject").unwrap().as_str(),
            "votes.web01"
        );
        reasons.push(headers.get("Landslide-Reason").unwrap().as_str().to_owned());
    }
    assert!(
        reasons[0].starts_with("malformed vote event"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], r#"there is no poll "lunch""#);
    assert_eq!(reasons[2], r#"poll pets has no option "fish""#);
    let page = landslide_telemetry::prometheus().render();
    for kind in ["undecodable", "unknown_poll", "unknown_option"] {
        let counted = format!(r#"landslide_dead_letters_total{{reason="{kind}"}}"#);
        assert_eq!(support::metric(&page, &counted), 1.0, "{page}");
    }

    // And the worker is still draining.
    publish_raw(&nats, [event(4, 11, "dogs", 4).encode()]).await;
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_incompatible_existing_stream_stops_the_worker_naming_the_difference() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let js = jetstream::new(nats.client().await);
    let mut config = Topology::default().votes_stream_config().unwrap();
    config.discard = jetstream::stream::DiscardPolicy::Old;
    js.create_stream(config).await.unwrap();
    let err = support::worker(&nats, &db)
        .join()
        .await
        .expect_err("the worker refuses the stream");
    let message = format!("{err:#}");
    assert!(
        message.contains("stream VOTES exists with an incompatible definition"),
        "{message}"
    );
    assert!(
        message.contains("discard: expected \"new\", found \"old\""),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_database_connection_dies_reconnects_and_loses_nothing() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    publish_raw(&nats, [event(1, 10, "cats", 1).encode()]).await;
    support::drained(&nats).await;

    // Cut every other session to this database, as a PostgreSQL restart or a proxy failover would.
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ),
        &mut db.conn().await,
    )
    .await
    .unwrap();
    let events = [event(1, 20, "dogs", 2), event(2, 20, "cats", 3)];
    publish_raw(&nats, events.iter().map(VoteEvent::encode)).await;
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
}

/// A database that stops answering (cut off by the network, or stalled) must not hold a batch
/// past the consumer's `ack_wait`: TCP alone would wait for many minutes. The worker gives the
/// transaction up within `Config::database_bound`, drops the connection, naks the batch, and
/// counts the batch once the database answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_gives_up_on_a_silent_database_within_its_bound_and_counts_the_batch_later() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = landslide_servers::Postgres::start(dir.path())
        .await
        .unwrap();
    let db = Db::create_on(&postgres.url("postgres")).await;
    let nats = Nats::start().await;
    let setup = jetstream::new(nats.client_as(landslide_nats::User::Worker).await);
    let js = jetstream::new(nats.client_as(landslide_nats::User::Ingest).await);
    let topology = Topology {
        ack_wait: Some(Duration::from_secs(6)),
        ..Topology::default()
    };
    landslide_nats::ensure_consumer(&setup, &topology, landslide_nats::Access::SetUp)
        .await
        .unwrap();
    let mut config = landslide_dedup_worker::Config::new(
        nats.connections(landslide_nats::User::Worker, Some(&db)),
    );
    config.connections.topology = topology.clone();
    let bound = config.database_bound();
    assert_eq!(bound, Duration::from_secs(4));
    let worker = support::worker_with(&nats, &db, |c| c.connections.topology = topology.clone());
    let ballot = |voter: Uuid| db.choice_when_reachable(voter);
    let publish = async |event: VoteEvent| {
        js.publish("votes.web1", event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    };
    let first = Uuid::new_v4();
    publish(crate::tally::vote(first, "cats", 1_000)).await;
    support::wait_for("the first ballot", Duration::from_secs(30), || {
        ballot(first)
    })
    .await;

    postgres.pause().unwrap();
    let timeouts = || {
        let page = landslide_telemetry::prometheus().render();
        support::metric(&page, "landslide_db_timeouts_total")
    };
    let before = timeouts();
    let second = Uuid::new_v4();
    publish(crate::tally::vote(second, "dogs", 2_000)).await;
    // Within the bound and some slack for the batch to form, well before TCP would give up.
    support::wait_for(
        "the worker to give up on the silent database",
        bound + Duration::from_secs(4),
        || async { (timeouts() > before).then_some(()) },
    )
    .await;
    assert!(!worker.is_finished(), "the worker stays up");

    postgres.resume().unwrap();
    let choice = support::wait_for("the second ballot", Duration::from_secs(60), || {
        ballot(second)
    })
    .await;
    assert_eq!(choice, "dogs");
    worker.stop().await;
}

/// A slow database: each commit takes most of the bound. The message pulled during the first
/// commit waits for it and then for its own, longer than `ack_wait` in all; the worker tells the
/// server every third of `ack_wait` that it still holds it, so the server gives it to nobody
/// else (without that, it was delivered again: work done twice while the database was slowest).
#[tokio::test(flavor = "multi_thread")]
async fn messages_held_through_slow_commits_are_not_delivered_again() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    // Every statement that inserts ballots (an upsert fires the INSERT triggers once) takes
    // 2.2 s: a commit within the 2.67 s bound of a 4 s ack_wait, two of them well past it.
    diesel_async::SimpleAsyncConnection::batch_execute(
        &mut db.conn().await,
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(2.2); RETURN NULL; END $$; \
         CREATE TRIGGER slow BEFORE INSERT ON ballots \
         FOR EACH STATEMENT EXECUTE FUNCTION slow()",
    )
    .await
    .unwrap();
    let topology = Topology {
        ack_wait: Some(Duration::from_secs(4)),
        ..Topology::default()
    };
    let worker = support::worker_with(&nats, &db, |c| {
        c.connections.topology = topology.clone();
        c.batch_size = 1;
    });
    let (cats, dogs) = (Uuid::new_v4(), Uuid::new_v4());
    publish_raw(
        &nats,
        [
            crate::tally::vote(cats, "cats", 1_000).encode(),
            crate::tally::vote(dogs, "dogs", 1_000).encode(),
        ],
    )
    .await;
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 1, 1)]
    );
    let page = landslide_telemetry::prometheus().render();
    assert!(
        support::metric(&page, "landslide_progress_acks_total") > 0.0,
        "the held messages were kept"
    );
    assert_eq!(
        support::metric(&page, "landslide_redeliveries_total"),
        0.0,
        "no message was delivered twice"
    );
    worker.stop().await;
}

fn now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(now.as_millis()).unwrap()
}

/// Found by the issue (12, item 2): anything that could publish to the stream could stamp a vote
/// 2^63 − 1, a ballot no later vote of its voter could ever replace, and audit passed, since it
/// folded the stream by the same rule. A stamp further ahead of when the stream stored it than
/// an ingest node may stamp is no ingest node's: the workers dead-letter it, audit expects that
/// dead letter, and replay leaves it out too.
#[tokio::test(flavor = "multi_thread")]
async fn a_vote_stamped_far_ahead_of_the_stream_is_dead_lettered_and_its_voter_still_counts() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let now = now_ms();
    let at = |ms: u64| Timestamp::from_millis(ms).0;
    let forged = [
        event(1, i64::MAX as u64, "cats", 1),
        event(2, at(now + 3_600_000), "cats", 2),
    ];
    // A minute ahead is within the tolerance: a node's clock may be, and its vote counts.
    let ahead_a_minute = event(3, at(now + 60_000), "cats", 3);
    publish_raw(
        &nats,
        forged
            .iter()
            .chain([&ahead_a_minute])
            .map(VoteEvent::encode),
    )
    .await;
    // Then the same voters vote again, stamped by a clock of now as a node would.
    let honest = [event(1, at(now), "dogs", 11), event(2, at(now), "dogs", 12)];
    publish_raw(&nats, honest.iter().map(VoteEvent::encode)).await;
    support::drained(&nats).await;

    for (voter, expected) in [(1, &honest[0]), (2, &honest[1]), (3, &ahead_a_minute)] {
        assert_eq!(
            db.ballot("pets", Uuid::from_u128(voter)).await,
            Some(as_ballot(expected)),
            "voter {voter}"
        );
    }
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 2, 2)]
    );

    let mut dead = Vec::new();
    for message in dead_letters(&nats, 2).await {
        let headers = message.headers.clone().unwrap();
        let reason = headers.get("Landslide-Reason").unwrap().as_str().to_owned();
        let sequence = headers
            .get("Landslide-Stream-Seq")
            .unwrap()
            .as_str()
            .to_owned();
        dead.push((sequence, reason));
    }
    dead.sort();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for ((sequence, reason), expected) in dead.iter().zip(["1", "2"]) {
        assert_eq!(sequence, expected, "{dead:?}");
        assert!(
            reason.contains("ahead of when the stream stored it")
                && reason.contains("no ingest node made it"),
            "{reason}"
        );
    }
    assert!(
        dead[0]
            .1
            .starts_with("the vote's stamp 9223372036854775807 lies")
    );
    let page = landslide_telemetry::prometheus().render();
    assert_eq!(
        support::metric(
            &page,
            r#"landslide_dead_letters_total{reason="stamp_ahead"}"#
        ),
        2.0,
        "{page}"
    );

    let mut audit = landslide_tally::audit::AuditConfig::new(
        nats.connections(landslide_nats::User::Audit, Some(&db)),
    );
    audit.wait = Duration::from_secs(30);
    let report = landslide_tally::audit::audit(&audit).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    assert_eq!(
        (
            report.events_read,
            report.stamped_ahead,
            report.dead_letters,
            report.voters
        ),
        (5, 2, 2, 3),
        "{report}"
    );
    assert_eq!(report.dead_letters_expected(), report.dead_letters);
    assert!(
        report.to_string().contains("2 stamped ahead of the stream"),
        "{report}"
    );

    // Replay agrees: folded into a new database, the same ballots, the forged votes left out.
    let fresh = Db::create().await;
    let replayed = landslide_dedup_worker::replay(
        &landslide_dedup_worker::Config::new(
            nats.connections(landslide_nats::User::Worker, Some(&fresh)),
        ),
        landslide_dedup_worker::replay::CHUNK,
    )
    .await
    .unwrap();
    assert_eq!(
        (replayed.events_read, replayed.counted, replayed.not_counted),
        (5, 3, 2)
    );
    for voter in 1..=3 {
        let voter = Uuid::from_u128(voter);
        assert_eq!(
            fresh.ballot("pets", voter).await,
            db.ballot("pets", voter).await
        );
    }
    assert_eq!(
        fresh.tally_and_count("pets").await,
        db.tally_and_count("pets").await
    );
    worker.stop().await;
}

/// `GET /readyz` of an operations listener: the status and the body, or `None` while it does not
/// answer.
async fn operations_readyz(addr: std::net::SocketAddr) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// The reliability harness found a worker that gave up: restarted during a leader election, it
/// was stopped (SIGSTOP, the power-loss fault) for longer than its 60 s startup deadline, and
/// exited at its first failed try once resumed. Here a worker waits for a nats-server that is
/// down, is stopped for longer than that deadline, is resumed while the server is still down,
/// and must still be running, not ready, and then drain once the server is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_in_its_startup_wait_for_over_a_minute_drains_once_resumed() {
    let mut nats = Nats::start().await;
    let db = Db::create().await;
    support::set_up(&nats, &landslide_schema::Polls::default()).await;
    nats.kill().await;

    let dir = tempfile::tempdir().unwrap();
    let operations = std::net::SocketAddr::from(([127, 0, 0, 1], support::free_port()));
    let mut worker = landslide_servers::Process::new(
        "worker",
        env!("CARGO_BIN_EXE_landslide"),
        dir.path().join("worker.log"),
    )
    .arg("dedup-worker")
    .env(
        "DATABASE_URL",
        db.url_for(landslide_nats::User::Worker).expose_secret(),
    )
    .env("LANDSLIDE_METRICS_LISTEN", operations)
    .env("RUST_LOG", "info,async_nats=warn");
    for (var, value) in nats.config(landslide_nats::User::Worker).env() {
        worker = worker.env(var, value);
    }
    worker.start().unwrap();
    let log = dir.path().join("worker.log");
    let (status, body) = support::wait_for(
        "the worker to say it is not ready, waiting for NATS",
        Duration::from_secs(30),
        || async {
            operations_readyz(operations)
                .await
                .filter(|(_, body)| body.contains("cannot connect to NATS yet"))
        },
    )
    .await;
    assert_eq!(status, 503, "{body}");

    worker.pause().unwrap();
    tokio::time::sleep(Duration::from_secs(65)).await;
    worker.resume().unwrap();
    // Resumed with the server still down: each try fails, as the one that ended the harness's
    // worker did. It must keep waiting.
    let tries_before = std::fs::read_to_string(&log)
        .unwrap()
        .matches("cannot connect to NATS yet")
        .count();
    support::wait_for(
        "a failed try after the resume",
        Duration::from_secs(30),
        || async {
            let tries = std::fs::read_to_string(&log)
                .ok()?
                .matches("cannot connect to NATS yet")
                .count();
            (tries > tries_before).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    worker
        .check_running()
        .expect("the worker gave up waiting for NATS");
    assert_eq!(operations_readyz(operations).await.map(|r| r.0), Some(503));

    nats.restart().await;
    support::wait_for(
        "the worker to be ready",
        Duration::from_secs(60),
        || async {
            operations_readyz(operations)
                .await
                .filter(|(status, _)| *status == 200)
        },
    )
    .await;
    let vote = event(1, Timestamp::from_millis(1_000).0, "dogs", 1);
    publish_raw(&nats, [vote.encode()]).await;
    let ballot = support::wait_for("the vote's ballot", Duration::from_secs(30), || {
        db.ballot("pets", vote.voter.0)
    })
    .await;
    assert_eq!(ballot, as_ballot(&vote));
    worker.terminate(Duration::from_secs(10)).await.unwrap();
}

/// A rolling upgrade that reaches the ingest nodes before the workers: a vote of a wire version
/// newer than the worker reads was accepted, so it waits in the stream (naked, counted as
/// pending, an alarm raised) for a worker that reads it; it is never a dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn a_vote_of_a_newer_wire_version_waits_for_a_worker_that_reads_it_and_is_never_dead_lettered()
 {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let newer = String::from_utf8(event(1, 5, "cats", 1).encode())
        .unwrap()
        .replace(r#""v":1"#, r#""v":9"#);
    let current = event(2, 5, "dogs", 2);
    publish_raw(&nats, [newer.into_bytes(), current.encode()]).await;
    support::wait_for("the current vote's ballot", Duration::from_secs(30), || {
        db.ballot("pets", current.voter.0)
    })
    .await;
    support::wait_for("the alarm", Duration::from_secs(30), || async {
        let page = landslide_telemetry::prometheus().render();
        (landslide_telemetry::metric_value(&page, "landslide_newer_wire_version_total") >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(nats.messages("VOTES_DLQ").await, 0, "dead-lettered");
    assert_eq!(support::pending(&nats).await, Some(1), "no longer pending");
    assert_eq!(db.ballot("pets", Uuid::from_u128(1)).await, None);
    worker.stop().await;
}

/// Found by trying it as the audit user, which may no longer: a `filter_subject` on the workers'
/// consumer skipped a node's votes for good with `pending: 0`, and a deleted consumer was never
/// made again. Only the workers' own user may change it now (`auth::`); changed anyway (a leaked
/// worker credential, the server's own admin), the workers put it back within moments and take
/// up what it skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_or_deleted_consumer_is_made_again_and_skips_no_vote() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let counted = |n: i64| {
        let db = &db;
        move || async move {
            let rows = db.tally_and_count("pets").await;
            (rows.iter().map(|(_, _, ballots)| ballots).sum::<i64>() == n).then_some(())
        }
    };
    let votes = |range: std::ops::Range<u128>| range.map(|i| event(i, 1, "cats", i).encode());
    publish_raw(&nats, votes(0..5)).await;
    support::wait_for("5 ballots", Duration::from_secs(60), counted(5)).await;

    // Changed: another node's votes only, each delivered once.
    let js = jetstream::new(nats.client_as(landslide_nats::User::Worker).await);
    let stream = js.get_stream_no_info("VOTES").await.unwrap();
    let info = stream.consumer_info("dedup-worker").await.unwrap();
    let mut changed: jetstream::consumer::pull::Config =
        jetstream::consumer::FromConsumer::try_from_consumer_config(info.config).unwrap();
    changed.filter_subject = "votes.web02".to_owned();
    changed.max_deliver = 1;
    js.create_consumer_on_stream(changed, "VOTES")
        .await
        .unwrap();
    publish_raw(&nats, votes(5..10)).await;
    support::wait_for("10 ballots", Duration::from_secs(60), counted(10)).await;
    let topology = Topology::default();
    support::wait_for(
        "the consumer as defined",
        Duration::from_secs(30),
        || async {
            let info = stream.consumer_info("dedup-worker").await.ok()?;
            landslide_nats::consumer_drift(&topology, &info.config)
                .ok()?
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // Deleted: made again, and what was stored meanwhile is counted.
    js.delete_consumer_from_stream("dedup-worker", "VOTES")
        .await
        .unwrap();
    publish_raw(&nats, votes(10..15)).await;
    support::wait_for("15 ballots", Duration::from_secs(60), counted(15)).await;
    worker.stop().await;
}

/// Found by trying it: one event naming a revision that does not exist was naked every 2 s for
/// ever, so `pending` stayed at 1, tally never said `final` and audit refused to run; 20,000 of
/// them stop all counting (`max_ack_pending`). Now it waits out a bound (5 minutes; 2 s here),
/// the bucket is read once more, and it is a dead letter, which audit counts as one. An event
/// naming a known revision under a text it never had is the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_vote_naming_a_revision_that_never_comes_is_a_dead_letter_after_the_bound() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let bound = Duration::from_secs(2);
    let worker = support::worker_with(&nats, &db, |c| c.unknown_revision_bound = bound);
    let named = |revision: u64, hash: Option<&str>, voter: u128| VoteEvent {
        rev: Some(Revision(revision)),
        after: Some(Timestamp(0)),
        rev_hash: hash.map(RevisionHash::of),
        ..event(voter, 10, "dogs", voter)
    };
    publish_raw(
        &nats,
        [
            named(99, None, 1).encode(),
            named(1, Some("a text revision 1 never had"), 2).encode(),
            event(3, 10, "cats", 3).encode(),
        ],
    )
    .await;
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1)]
    );
    for message in dead_letters(&nats, 2).await {
        let headers = message.headers.clone().unwrap();
        let reason = headers.get("Landslide-Reason").unwrap().as_str().to_owned();
        assert!(
            reason.contains("the polls bucket still lacks it 2 s after"),
            "{reason}"
        );
    }
    let mut config = landslide_tally::audit::AuditConfig::new(
        nats.connections(landslide_nats::User::Audit, Some(&db)),
    );
    config.unknown_revision_bound = bound;
    let report = landslide_tally::audit::audit(&config).await.unwrap();
    assert!(report.is_consistent(), "{report}");
    assert_eq!(report.unknown_revision_dead, 2, "{report}");
    assert_eq!(
        report.dead_letters,
        report.dead_letters_expected(),
        "{report}"
    );
    worker.stop().await;
}
