//! Group commit at ingest, and the server versions the roles run on: concurrent votes share atomic
//! batches, each answered only from the ack that covers it; a duplicate inside a batch never
//! turns into a lost vote or a second copy; a server older than the minimum is refused.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use landslide_nats::{ServerVersion, Topology, User};
use landslide_schema::VoteEvent;

use crate::support::{self, Db, Nats};

/// Every vote in the stream, by event id: how many copies.
async fn stored_events(nats: &Nats) -> HashMap<String, usize> {
    let js = async_nats::jetstream::new(nats.client().await);
    let stream = js.get_stream("VOTES").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    // A named consumer: the unnamed create is refused to all but the workers (`auth::`).
    let mut reader = landslide_nats::StreamReader::open(&stream, last, User::Admin, "test")
        .await
        .unwrap();
    let mut copies = HashMap::new();
    while let Some(stored) = reader.next().await.unwrap() {
        let event = VoteEvent::decode(&stored.message.payload).unwrap();
        *copies.entry(event.event_id.to_string()).or_default() += 1;
    }
    copies
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_votes_share_batches_and_each_is_stored_once() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let worker = support::worker(&nats, &db);

    let votes = 400;
    // The voters first: building an HTTP client is CPU work (with the workspace's features,
    // rustls and the system's roots), and 400 built inside the burst starved the node in this
    // same process long enough for its 10 s header timeout to close the first connections.
    let voters: Vec<reqwest::Client> = (0..votes).map(|_| support::voter()).collect();
    let answers = join_all(voters.iter().enumerate().map(|(i, voter)| {
        let url = ingest.url.clone();
        async move {
            let choice = if i % 3 == 0 { "dogs" } else { "cats" };
            support::vote_api(voter, &url, "pets", choice).await
        }
    }))
    .await;
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
        assert_eq!(body["duplicate"], false);
    }

    // Fewer publishes than votes: the votes went out together.
    let page = support::metrics_page(&ingest.metrics_url).await;
    let batches = support::metric(&page, "landslide_publish_batch_size_count");
    let batched = support::metric(&page, "landslide_publish_batch_size_sum");
    assert_eq!(batched, f64::from(votes), "every vote was in a batch");
    assert!(
        batches < f64::from(votes) / 2.0,
        "{votes} concurrent votes took {batches} publishes"
    );

    // Each answer is its own vote, stored exactly once.
    let copies = stored_events(&nats).await;
    assert_eq!(copies.len(), votes as usize);
    for (_, body) in &answers {
        let id = body["event_id"].as_str().unwrap();
        assert_eq!(copies.get(id), Some(&1), "event {id}");
    }
    support::drained(&nats).await;
    let dogs = (0..votes).filter(|i| i % 3 == 0).count() as i64;
    assert_eq!(
        db.tally_and_count("pets").await,
        [
            (
                "cats".to_owned(),
                i64::from(votes) - dogs,
                i64::from(votes) - dogs
            ),
            ("dogs".to_owned(), dogs, dogs)
        ]
    );
    worker.stop().await;
    ingest.role.stop().await;
}

/// A keyed retry arriving among other votes makes JetStream refuse the whole batch (error 10201,
/// "atomic publish batch contains duplicate message id"), without saying which vote. Every vote
/// of that batch must still be answered from its own ack: the retry as the duplicate it is, the
/// others as stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_retry_among_other_votes_is_one_copy_and_the_others_are_stored() {
    let nats = Nats::start().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let keyed = |client: reqwest::Client, key: String| {
        let url = format!("{}/api/votes", ingest.url);
        async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", key)
                .json(&serde_json::json!({"poll": "pets", "choice": "dogs"}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    // Random, as a key sent without the cookie must be.
    let keys: Vec<String> = (0..20)
        .map(|i| format!("retry-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    let originals = join_all(keys.iter().map(|k| keyed(support::voter(), k.clone()))).await;

    // Each key again, cookie-less as after a lost answer, among 200 fresh votes.
    // The clients are built first, as in `concurrent_votes_…`: building 200 inside the burst (each
    // loads the platform's roots) kept connections from sending their headers within the node's
    // 10 s header timeout on a loaded machine, and the node rightly closed them.
    let retries = join_all(keys.iter().map(|k| keyed(support::voter(), k.clone())));
    let voters: Vec<reqwest::Client> = (0..200).map(|_| support::voter()).collect();
    let fresh = join_all(voters.into_iter().map(|voter| {
        let url = ingest.url.clone();
        async move { support::vote_api(&voter, &url, "pets", "cats").await }
    }));
    let (retries, fresh) = tokio::join!(retries, fresh);

    for ((status, original), (again, retry)) in originals.iter().zip(&retries) {
        assert_eq!((*status, *again), (202, 202), "{original} {retry}");
        assert_eq!(retry["event_id"], original["event_id"]);
        assert_eq!(retry["duplicate"], true, "{retry}");
        assert_eq!(retry["ts"], original["ts"], "the stored copy's stamp");
    }
    for (status, body) in &fresh {
        assert_eq!(*status, 202, "{body}");
    }
    // The path under test was taken: some batch held a retry beside other votes and was refused.
    let page = support::metrics_page(&ingest.metrics_url).await;
    assert!(
        support::metric(&page, "landslide_publish_batch_splits_total") >= 1.0,
        "no batch was refused for a duplicate"
    );
    let copies = stored_events(&nats).await;
    assert_eq!(copies.len(), 220);
    assert!(copies.values().all(|&n| n == 1), "{copies:?}");
    ingest.role.stop().await;
}

/// Streams made by a release without group commit lack `allow_atomic`; the roles set it in
/// place instead of refusing to start, and keep what the stream holds.
#[tokio::test(flavor = "multi_thread")]
async fn a_votes_stream_without_atomic_batches_is_updated_in_place() {
    let nats = Nats::start().await;
    let client = nats.client().await;
    let mut old: serde_json::Value =
        serde_json::from_str(landslide_nats::VOTES_STREAM_JSON).unwrap();
    old.as_object_mut().unwrap().remove("allow_atomic");
    let reply = client
        .request("$JS.API.STREAM.CREATE.VOTES", old.to_string().into())
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.get("error").is_none(), "{reply}");
    // The workers' user brings it in place, as a worker does at start; the operator may not
    // update the votes stream (auth::nobody_but_the_workers_may_change_the_votes_stream…).
    let js = async_nats::jetstream::new(nats.client_as(landslide_nats::User::Worker).await);
    let ingest = async_nats::jetstream::new(nats.client_as(landslide_nats::User::Ingest).await);
    ingest
        .publish("votes.old", "an earlier vote".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let stream = landslide_nats::ensure_votes_stream(
        &js,
        &Topology::default(),
        landslide_nats::Access::SetUp,
    )
    .await
    .unwrap();
    let info = stream.get_info().await.unwrap();
    assert!(info.config.allow_atomic_publish);
    assert_eq!(info.state.messages, 1);
}

/// Debian 12's nats-server 2.9.10 acks from the page cache; any release older than the minimum
/// is refused by name, before a vote is taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_connected_to_a_server_older_than_the_minimum_refuses_to_start() {
    let old = std::env::var("NATS_SERVER_TOO_OLD_BIN").expect(
        "NATS_SERVER_TOO_OLD_BIN names a nats-server older than the minimum (scripts/test installs one)",
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = landslide_servers::NatsSpec {
        binary: Some(old.into()),
        ..landslide_servers::NatsSpec::new(landslide_servers::NatsLayout::Single)
    };
    let nats = landslide_servers::Nats::start_with(&spec, dir.path())
        .await
        .unwrap();
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let err = worker
        .join()
        .await
        .expect_err("the worker refuses the old server");
    let msg = format!("{err:#}");
    assert!(msg.contains("is nats-server 2.10.25"), "{msg}");
    assert!(msg.contains(&ServerVersion::minimum().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("install nats-server {}", ServerVersion::pinned())),
        "{msg}"
    );
}

/// A client connection cannot see how a server syncs; its monitoring endpoint can. A role given
/// that endpoint says loudly when acks come before fsync, and quietly when they do not.
#[tokio::test(flavor = "multi_thread")]
async fn a_role_says_loudly_when_its_server_acks_before_it_fsyncs() {
    use landslide_nats::SyncMode;
    use landslide_servers::{NatsLayout, NatsSpec, Sync};
    use tokio::io::{AsyncBufReadExt as _, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let always = landslide_servers::Nats::start(NatsLayout::Single, dir.path())
        .await
        .unwrap();
    let lazy_spec = NatsSpec {
        sync: Sync::Lazy,
        stems: Some(vec!["nats-lazy".to_owned()]),
        ..NatsSpec::new(NatsLayout::Single)
    };
    let lazy = landslide_servers::Nats::start_with(&lazy_spec, dir.path())
        .await
        .unwrap();
    assert_eq!(
        landslide_nats::sync_mode(&always.monitor_url(0))
            .await
            .unwrap(),
        SyncMode::Always
    );
    assert!(matches!(
        landslide_nats::sync_mode(&lazy.monitor_url(0))
            .await
            .unwrap(),
        SyncMode::Every(_)
    ));

    let keys = tempfile::tempdir().unwrap();
    let mut ingest = tokio::process::Command::new(env!("CARGO_BIN_EXE_landslide"))
        .arg("ingest")
        .env("NATS_URL", lazy.url(0))
        .env("LANDSLIDE_NATS_MONITOR_URL", lazy.monitor_url(0))
        .env("LANDSLIDE_NODE_ID", "web01")
        .env("LANDSLIDE_LISTEN", "127.0.0.1:0")
        .envs(support::key_files(keys.path()))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(ingest.stdout.take().unwrap()).lines();
    let warned = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("NATS SERVER SYNCS LAZILY") {
                return line;
            }
        }
        panic!("ingest exited without the warning");
    })
    .await
    .expect("the warning within 20 s");
    assert!(warned.contains("ERROR"), "{warned}");
    ingest.kill().await.unwrap();
}
