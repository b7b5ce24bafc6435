//! The tally role over HTTP: results, pending, live events, shutdown. The votes are real encoded
//! events on a private nats-server and the database rows are written as a correct dedup-worker
//! writes them, so these tests do not depend on the worker.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use diesel_async::RunQueryDsl;
use futures::StreamExt as _;
use landslide_nats::Topology;
use landslide_schema::subject::vote_subject;
use landslide_schema::{
    Choice, EventId, NodeId, Poll, PollId, PollOption, Polls, Timestamp, VoteEvent, VoterId,
};
use landslide_tally::Config;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{self, Db, Nats, wait_for};

// ---- What both the tally and the audit tests stand on. ----

/// A private nats-server with the streams and the workers' consumer, and a migrated database.
pub(crate) struct Stack {
    pub nats: Nats,
    pub db: Db,
    pub js: jetstream::Context,
    /// As the workers' user.
    pub worker_js: jetstream::Context,
    pub topology: Topology,
}

impl Stack {
    pub async fn start() -> Self {
        let nats = Nats::start().await;
        let db = Db::create().await;
        // What a worker sets up: the streams, the consumer, the polls bucket (the pets poll and
        // one more, as tally's tests show both).
        crate::support::set_up(&nats, &two_polls()).await;
        let topology = Topology::default();
        // Votes are published as ingest's user, the only one that may; the consumer is read and
        // dead letters written as the workers'.
        let js = jetstream::new(nats.client_as(landslide_nats::User::Ingest).await);
        let worker_js = jetstream::new(nats.client_as(landslide_nats::User::Worker).await);
        Self {
            nats,
            db,
            js,
            worker_js,
            topology,
        }
    }

    /// Publishes raw bytes as a vote message and waits for the stream's ack.
    pub async fn publish_raw(&self, payload: Vec<u8>) {
        let subject = vote_subject(&self.topology.votes_prefix, &NodeId::parse("test").unwrap());
        self.js
            .publish(subject, payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    /// Publishes a vote event, with its id as `Nats-Msg-Id` like an ingest node.
    pub async fn publish(&self, event: &VoteEvent) {
        let subject = vote_subject(&self.topology.votes_prefix, &event.node);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
        self.js
            .publish_with_headers(subject, headers, event.encode().into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    /// Takes `n` messages from the workers' consumer without acknowledging them.
    pub async fn fetch(&self, n: usize) -> Vec<jetstream::Message> {
        let stream = self
            .worker_js
            .get_stream(&self.topology.votes_stream)
            .await
            .expect("votes stream");
        let consumer: consumer::PullConsumer = stream
            .get_consumer(&self.topology.consumer)
            .await
            .expect("workers' consumer");
        let mut taken = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while taken.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {n} messages were delivered",
                taken.len()
            );
            let mut batch = consumer
                .fetch()
                .max_messages(n - taken.len())
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .expect("fetch");
            while let Some(message) = batch.next().await {
                taken.push(message.expect("message"));
            }
        }
        taken
    }

    /// Acknowledges `n` messages of the workers' consumer, as a worker does after its commit.
    pub async fn ack(&self, n: usize) {
        for message in self.fetch(n).await {
            message.double_ack().await.expect("ack");
        }
    }

    /// Publishes the events, commits them as a worker would, and acks them.
    pub async fn vote(&self, events: &[VoteEvent]) {
        for event in events {
            self.publish(event).await;
        }
        commit_like_a_worker(&self.db, events).await;
        self.ack(events.len()).await;
    }
}

/// A vote in poll `pets` (or another) by `voter` at `ts`.
pub(crate) fn vote_in(poll: &str, voter: Uuid, choice: &str, ts: u64) -> VoteEvent {
    VoteEvent {
        event_id: EventId::new_random(),
        poll: PollId::parse(poll).unwrap(),
        voter: VoterId(voter),
        choice: Choice::parse(choice).unwrap(),
        ts: Timestamp(ts),
        node: NodeId::parse("test").unwrap(),
        rev: None,
        after: None,
        rev_hash: None,
    }
}

pub(crate) fn vote(voter: Uuid, choice: &str, ts: u64) -> VoteEvent {
    vote_in("pets", voter, choice, ts)
}

/// Writes the events' effect with the dedup-worker's own statement, one event per transaction and
/// alternating between two tally shards, so that counts are sums over shards.
pub(crate) async fn commit_like_a_worker(db: &Db, events: &[VoteEvent]) {
    let mut conn = db.conn().await;
    for (i, event) in events.iter().enumerate() {
        let shard = i16::try_from(i % 2).unwrap();
        let vote = landslide_schema::merge::StoredVote::new(event.clone(), chrono::Utc::now());
        landslide_dedup_worker::UpsertBatch::new([&vote].into_iter(), shard)
            .execute(&mut conn)
            .await
            .expect("upsert ballot and tally");
    }
}

// ---- The tally role. ----

/// `pets` and a second poll, `lunch`, whose question needs escaping in HTML.
fn two_polls() -> Polls {
    let lunch = Poll {
        id: PollId::parse("lunch").unwrap(),
        question: "Pizza <or> salad?".to_owned(),
        options: [("pizza", "Pizza"), ("salad", "Salad")]
            .map(|(id, label)| PollOption {
                id: Choice::parse(id).unwrap(),
                label: label.to_owned(),
            })
            .to_vec(),
        opens_at: None,
        closes_at: None,
        owner_key: None,
    };
    Polls::new(
        PollId::parse("pets").unwrap(),
        vec![Polls::pets().default_poll().clone(), lunch],
    )
    .unwrap()
}

/// A running tally role on port 0 ([`support::tally_with`]), serving [`two_polls`], ready.
struct Tally {
    role: support::Tally,
    http: reqwest::Client,
}

impl Tally {
    async fn start(stack: &Stack) -> Self {
        let role = support::tally_with(&stack.nats, &stack.db, |config| {
            config.connections.polls = two_polls();
        })
        .await;
        let tally = Self {
            role,
            http: reqwest::Client::new(),
        };
        wait_for("the first snapshot", Duration::from_secs(15), || async {
            let response = tally.get("/readyz").await.ok()?;
            (response.status() == 200).then_some(())
        })
        .await;
        tally
    }

    async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(format!("{}{path}", self.role.url))
            .send()
            .await
    }

    async fn results(&self, poll: &str) -> Value {
        let response = self.get(&format!("/api/results/{poll}")).await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Waits until the results of `poll` satisfy `done`, and returns them.
    async fn results_when(&self, what: &str, poll: &str, done: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, Duration::from_secs(15), || async {
            let results = self.results(poll).await;
            done(&results).then_some(results)
        })
        .await
    }

    async fn stop(self) {
        self.role.role.stop().await;
    }
}

/// Reads server-sent events from a response, one `data:` payload at a time.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    async fn open(tally: &Tally, poll: &str) -> Self {
        let response = tally
            .get(&format!("/api/results/{poll}/events"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event's data, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // A keep-alive comment.
                }
                return Some(serde_json::from_str(&data).unwrap());
            }
            let chunk = self.response.chunk().await.ok()??;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Waits (up to 10 s) for an event satisfying `done`.
    async fn next_where(&mut self, done: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = self.next().await.expect("the event stream ended");
                if done(&event) {
                    return event;
                }
            }
        })
        .await
        .expect("an event within 10 s")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn results_show_every_option_with_total_pending_and_as_of() {
    let stack = Stack::start().await;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // `a` changes their mind: only the later vote counts.
    stack
        .vote(&[
            vote(a, "cats", 10),
            vote(b, "dogs", 11),
            vote(a, "dogs", 12),
            vote(c, "cats", 13),
        ])
        .await;
    let tally = Tally::start(&stack).await;

    let pets = tally
        .results_when("3 votes in pets", "pets", |r| {
            r["total"] == 3 && r["pending"] == 0
        })
        .await;
    let as_of = pets["as_of"].as_str().unwrap().to_owned();
    assert_eq!(
        pets,
        json!({
            "poll": "pets", "question": "Cats or dogs?", "counts": {"cats": 1, "dogs": 2},
            "total": 3, "pending": 0, "as_of": as_of, "status": "open",
        })
    );
    // RFC 3339 in UTC, such as 2026-11-24T10:00:00.123Z.
    assert!(
        as_of.len() == 24 && as_of.as_bytes()[10] == b'T' && as_of.ends_with('Z'),
        "{as_of}"
    );

    let lunch = tally.results("lunch").await;
    assert_eq!(lunch["counts"], json!({"pizza": 0, "salad": 0}));
    assert_eq!(lunch["total"], 0);

    // The snapshot is rebuilt: `as_of` moves on.
    tally
        .results_when("a later snapshot", "pets", |r| {
            r["as_of"].as_str().unwrap() > as_of.as_str()
        })
        .await;
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_counts_unacked_votes_and_drops_to_zero_once_they_are_committed() {
    let stack = Stack::start().await;
    let tally = Tally::start(&stack).await;
    let events = [
        vote(Uuid::new_v4(), "cats", 10),
        vote(Uuid::new_v4(), "dogs", 11),
    ];
    for event in &events {
        stack.publish(event).await;
    }
    tally
        .results_when("2 pending", "pets", |r| {
            r["pending"] == 2 && r["total"] == 0
        })
        .await;

    // Delivered to a worker but not yet acked: still pending.
    let delivered = stack.fetch(2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let results = tally.results("pets").await;
    assert_eq!(results["pending"], 2, "{results}");

    commit_like_a_worker(&stack.db, &events).await;
    for message in delivered {
        message.double_ack().await.unwrap();
    }
    let results = tally
        .results_when("0 pending", "pets", |r| r["pending"] == 0)
        .await;
    assert_eq!(results["counts"], json!({"cats": 1, "dogs": 1}));
    assert_eq!(results["total"], 2);
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_poll_is_a_404_with_a_json_error() {
    let stack = Stack::start().await;
    let tally = Tally::start(&stack).await;
    for path in [
        "/api/results/nope",
        "/api/results/not.a.poll",
        "/api/results/nope/events",
    ] {
        let response = tally.get(path).await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unknown poll", "{path}");
    }
    assert_eq!(tally.get("/results/nope").await.unwrap().status(), 404);
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_delivers_an_update_after_the_tallies_change() {
    let stack = Stack::start().await;
    stack.vote(&[vote(Uuid::new_v4(), "cats", 10)]).await;
    let tally = Tally::start(&stack).await;
    let mut events = Events::open(&tally, "pets").await;
    let first = events.next_where(|e| e["total"] == 1).await;
    assert_eq!(first["counts"], json!({"cats": 1, "dogs": 0}));

    stack.vote(&[vote(Uuid::new_v4(), "dogs", 20)]).await;
    let update = events.next_where(|e| e["total"] == 2).await;
    assert_eq!(update["counts"], json!({"cats": 1, "dogs": 1}));
    assert_eq!(update["poll"], "pets");
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_the_question_and_every_option_escaped() {
    let stack = Stack::start().await;
    stack.vote(&[vote(Uuid::new_v4(), "dogs", 10)]).await;
    let tally = Tally::start(&stack).await;
    tally
        .results_when("the vote", "pets", |r| r["total"] == 1)
        .await;

    let page = tally.get("/").await.unwrap().text().await.unwrap();
    assert!(page.contains("<h1>Cats or dogs?</h1>"), "{page}");
    assert!(page.contains(r#"data-option="cats""#) && page.contains(r#"data-option="dogs""#));
    assert!(page.contains(r#"<strong id="total">1</strong>"#), "{page}");
    assert!(page.contains("/api/results/pets/events"));

    let lunch = tally
        .get("/results/lunch")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        lunch.contains("Pizza &#60;or&#62; salad?") || lunch.contains("Pizza &lt;or&gt; salad?"),
        "{lunch}"
    );
    assert!(!lunch.contains("<or>"));
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_are_served() {
    let stack = Stack::start().await;
    let tally = Tally::start(&stack).await;
    assert_eq!(tally.get("/healthz").await.unwrap().status(), 200);
    assert_eq!(tally.get("/readyz").await.unwrap().status(), 200);
    // As every deployment runs it: /metrics on the operations listener only.
    assert_eq!(tally.get("/metrics").await.unwrap().status(), 404);
    let healthz = format!("{}/healthz", tally.role.metrics_url);
    assert_eq!(reqwest::get(&healthz).await.unwrap().status(), 200);
    wait_for("refresh metrics", Duration::from_secs(10), || async {
        let text = support::metrics_page(&tally.role.metrics_url).await;
        (text.contains("landslide_tally_refresh_seconds_bucket")
            && text.contains("landslide_tally_pending"))
        .then_some(())
    })
    .await;
    tally.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_event_streams_so_the_server_drains() {
    let stack = Stack::start().await;
    let tally = Tally::start(&stack).await;
    let mut events = Events::open(&tally, "pets").await;
    events.next_where(|_| true).await;

    tally.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream outlived the server");
}

/// A database that cannot be reached is waited for (a restart, a failover), not exited on: tally
/// is not ready meanwhile, and says why, naming `DATABASE_URL` without its password. Shutdown
/// still ends the wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_cannot_be_reached_keeps_tally_not_ready_naming_database_url() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config::new(
        landslide_config::Connections::new(
            landslide_nats::NatsConfig::anonymous("nats://127.0.0.1:1"),
            Some(
                "postgres://landslide:secret@127.0.0.1:1/landslide"
                    .parse()
                    .unwrap(),
            ),
        ),
        support::receipt_key(),
    );
    let (stop, shutdown) = landslide_config::Shutdown::new();
    let tally = tokio::spawn(landslide_tally::run(config, listener, shutdown));
    let unmet = support::wait_for(
        "tally to say why it is not ready",
        Duration::from_secs(30),
        || async {
            landslide_telemetry::readiness::report()
                .err()
                .filter(|unmet| {
                    unmet
                        .iter()
                        .any(|l| l.contains("cannot connect to PostgreSQL yet"))
                })
        },
    )
    .await;
    let message = unmet.join("\n");
    assert!(message.contains("DATABASE_URL"), "{message}");
    assert!(
        !message.contains("secret"),
        "the password leaked: {message}"
    );
    assert!(!tally.is_finished(), "tally gave up: {message}");
    stop.stop();
    tally
        .await
        .unwrap()
        .expect("a shutdown while starting is a clean stop");
}
