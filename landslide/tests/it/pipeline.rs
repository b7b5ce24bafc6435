//! Votes through ingest and the dedup-worker into PostgreSQL.

use std::time::Duration;

use crate::support::{self, Db, Nats};

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_through_the_form_and_one_through_the_api_both_appear_in_the_results() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let worker = support::worker(&nats, &db);
    let tally = support::tally(&nats, &db).await;

    let browser = support::voter();
    let response = browser
        .post(format!("{}/vote", ingest.url))
        .form(&[("vote", "cats")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    // Back to the form, with the vote's receipt as its confirmation: in a cookie read once,
    // never in the address, which access logs keep.
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(location, "/");
    let form = || async {
        let url = format!("{}{location}", ingest.url);
        browser.get(url).send().await.unwrap().text().await.unwrap()
    };
    let page = form().await;
    assert!(page.contains("Your vote: <strong>Cats</strong>"), "{page}");
    assert!(
        page.contains("Your receipt: <code class=\"receipt\">pets."),
        "{page}"
    );
    let again = form().await;
    assert!(!again.contains("Your receipt:"), "{again}");

    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 202, "{body}");
    assert!(
        body["event_id"].is_string() && body["ts"].is_u64() && body["receipt"].is_string(),
        "{body}"
    );

    support::drained(&nats).await;
    let results = tally.settled_results("pets", 2).await;
    assert_eq!(
        results["counts"],
        serde_json::json!({"cats": 1, "dogs": 1}),
        "{results}"
    );
    assert_eq!(results["total"], 2, "{results}");
    assert_eq!(results["question"], "Cats or dogs?");
    assert!(results["as_of"].is_string(), "{results}");
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 1, 1)]
    );
    tally.role.stop().await;
    worker.stop().await;
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_mind_on_a_node_with_a_slow_clock_still_wins() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let fast = support::ingest(&nats, "fast", 0).await;
    let slow = support::ingest(&nats, "slow", -10_000).await;
    let worker = support::worker(&nats, &db);

    // One browser: the cookie from the fast node travels to the slow one.
    let browser = support::voter();
    let (status, first) = support::vote_api(&browser, &fast.url, "pets", "cats").await;
    assert_eq!(status, 202);
    let (status, second) = support::vote_api(&browser, &slow.url, "pets", "dogs").await;
    assert_eq!(status, 202);
    assert!(
        second["ts"].as_u64() > first["ts"].as_u64(),
        "{first} then {second}"
    );

    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
    fast.role.stop().await;
    slow.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_cookie_the_slow_node_would_lose_the_change_of_mind() {
    // The control experiment for the test above: it shows the clock skew is real and would
    // misorder the votes if the cookie floor did not exist.
    let nats = Nats::start().await;
    let fast = support::ingest(&nats, "fast", 0).await;
    let slow = support::ingest(&nats, "slow", -10_000).await;
    let (_, first) = support::vote_api(&support::voter(), &fast.url, "pets", "cats").await;
    let (_, second) = support::vote_api(&support::voter(), &slow.url, "pets", "dogs").await;
    assert!(
        second["ts"].as_u64() < first["ts"].as_u64(),
        "{first} then {second}"
    );
    fast.role.stop().await;
    slow.role.stop().await;
}

/// The case the reliability harness found (shared/research/cluster-power-cut-2026-12-06.md): a
/// voter votes cats through node b, then dogs through node a, which stores the vote but whose
/// answer never reaches the voter (the node died before it answered, or the answer was lost, so
/// the cookie never learns that vote's stamp), then cats again through b, whose clock is behind
/// a's. Every vote is stored; the last is cats. By the stamps alone, dogs won: for every voter,
/// with b 10 s behind and with b 1 s behind, inside the default 2 s bound.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_mind_after_a_lost_answer_beats_the_lost_vote_of_a_node_whose_clock_is_ahead() {
    const VOTERS: usize = 5;
    for behind_ms in [10_000, 1_000] {
        let nats = Nats::start().await;
        let db = Db::create().await;
        let a = support::ingest(&nats, "a", 0).await;
        let b = support::ingest(&nats, "b", -behind_ms).await;
        let worker = support::worker(&nats, &db);
        for _ in 0..VOTERS {
            let (status, cookie) = support::vote_with_cookie(&b.url, None, "cats").await;
            assert_eq!(status, 202);
            let cookie = cookie.expect("the first answer sets the voter cookie");
            let (status, _lost) = support::vote_with_cookie(&a.url, Some(&cookie), "dogs").await;
            assert_eq!(status, 202, "stored, though its answer is dropped");
            let (status, _) = support::vote_with_cookie(&b.url, Some(&cookie), "cats").await;
            assert_eq!(status, 202);
        }
        support::drained(&nats).await;
        assert_eq!(
            db.tally_and_count("pets").await,
            [("cats".to_owned(), VOTERS as i64, VOTERS as i64)],
            "b {behind_ms} ms behind a: the lost vote won"
        );
        worker.stop().await;
        a.role.stop().await;
        b.role.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_with_the_same_idempotency_key_is_one_vote() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let worker = support::worker(&nats, &db);

    let send = |client: reqwest::Client| {
        let url = format!("{}/api/votes", ingest.url);
        async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", "4b0e9c8e-5f1d-4a7e-retry")
                .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    // Two cookie-less clients: as if the first answer, and its cookie, were lost.
    let first = send(support::voter()).await;
    let second = send(support::voter()).await;
    assert_eq!(first["event_id"], second["event_id"]);
    assert_eq!(second["duplicate"], true);
    assert_eq!(
        first["ts"], second["ts"],
        "the retry reports the stored copy's stamp"
    );

    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1)]
    );
    worker.stop().await;
    ingest.role.stop().await;
}

/// Found in review: a vote waited in ingest's queue, and for its batch's acks, for as long as it
/// took; behind a load balancer that gives up after 30 s the voter got a 504 without a cookie
/// while the vote might still be stored, and a first-time voter's retry was a second voter.
/// Past its deadline the voter gets a prompt 503, `Retry-After` and the cookie.
#[tokio::test(flavor = "multi_thread")]
async fn a_vote_waits_no_longer_than_its_deadline_whatever_the_broker_does() {
    // An ack would be waited for long after a load balancer gave up.
    let (mut nats, ingest, _) = broker_gone(|c| {
        c.publish_timeout = Duration::from_secs(20);
        c.publish_attempts = 3;
        c.vote_deadline = Duration::from_secs(1);
    })
    .await;
    let response = support::post_vote(&reqwest::Client::new(), &ingest.url, "pets", "dogs").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        response.headers().contains_key("set-cookie"),
        "a first-time voter's retry would be another voter"
    );
    let page = support::metrics_page(&ingest.metrics_url).await;
    assert!(
        page.contains(r#"landslide_votes_rejected_total{reason="deadline"} 1"#),
        "{page}"
    );
    nats.restart().await;
    ingest.role.stop().await;
}

/// A private nats-server and an ingest node set up by `adjust`, a voter who voted once, and then
/// the server killed.
async fn broker_gone(
    adjust: impl FnOnce(&mut landslide_ingest::Config),
) -> (Nats, support::Ingest, reqwest::Client) {
    let mut nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web01", adjust).await;
    let browser = support::voter();
    let (status, _) = support::vote_api(&browser, &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202);
    nats.kill().await;
    (nats, ingest, browser)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_broker_down_ingest_answers_503_and_recovers_when_it_returns() {
    let (mut nats, ingest, browser) = broker_gone(|c| {
        c.publish_timeout = Duration::from_millis(300);
        c.publish_attempts = 2;
    })
    .await;
    for _ in 0..3 {
        let response = support::post_vote(&browser, &ingest.url, "pets", "dogs").await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("try again"),
            "{body}"
        );
    }
    let ready = reqwest::get(format!("{}/readyz", ingest.url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);

    nats.restart().await;
    let (status, _) = support::wait_for(
        "votes to be accepted again",
        Duration::from_secs(30),
        || async {
            let (status, body) = support::vote_api(&browser, &ingest.url, "pets", "dogs").await;
            (status == 202).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, 202);
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_status_and_a_message() {
    let nats = Nats::start().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let client = support::voter();
    let api = format!("{}/api/votes", ingest.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client
                .post(&api)
                .header("content-type", "application/json")
                .body("{\"poll\":"),
            400,
            "malformed",
        ),
        (
            client
                .post(&api)
                .header("content-type", "application/json")
                .body("{\"poll\":\"pets\"}"),
            400,
            "choice",
        ),
        (
            client
                .post(&api)
                .json(&serde_json::json!({"poll": "nope", "choice": "cats"})),
            422,
            "no poll",
        ),
        (
            client
                .post(&api)
                .json(&serde_json::json!({"poll": "pets", "choice": "fish"})),
            422,
            "no option",
        ),
        (
            client
                .post(&api)
                .json(&serde_json::json!({"poll": "pets", "choice": "c.ts"})),
            422,
            "no option",
        ),
        (
            client
                .post(&api)
                .header("content-type", "application/json")
                .body(vec![b' '; 10_000]),
            413,
            "larger",
        ),
        (
            client
                .post(&api)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "application/json",
        ),
        (client.post(&api).body("{}"), 415, "application/json"),
        (
            client
                .post(&api)
                .header("Idempotency-Key", "has space")
                .json(&serde_json::json!({"poll": "pets", "choice": "cats"})),
            400,
            "Idempotency-Key",
        ),
    ];
    for (request, status, needle) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "status {status}: {message:?} lacks {needle:?}"
        );
    }

    let form = format!("{}/vote", ingest.url);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client.post(&form).form(&[("vote", "fish")]),
            422,
            "has no option",
        ),
        (
            client
                .post(&form)
                .form(&[("vote", "cats"), ("poll", "nope")]),
            422,
            "no poll",
        ),
        (
            client.post(&form).form(&[("nothing", "here")]),
            400,
            "malformed",
        ),
        (
            client
                .post(&form)
                .header("content-type", "application/json")
                .body("{}"),
            415,
            "x-www-form-urlencoded",
        ),
    ];
    for (request, status, needle) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let page = response.text().await.unwrap();
        assert!(
            page.contains(needle),
            "status {status}: page lacks {needle:?}"
        );
        assert!(
            page.contains("Cats or dogs?"),
            "the error page shows the form again"
        );
    }
    let metrics = reqwest::get(format!("{}/metrics", ingest.metrics_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in [
        "malformed",
        "unknown_poll",
        "unknown_option",
        "too_large",
        "content_type",
    ] {
        assert!(
            metrics.contains(&format!(
                "landslide_votes_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} missing from /metrics:\n{metrics}"
        );
    }
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_cookie_is_a_new_voter_and_leaves_the_original_ballot_alone() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let worker = support::worker(&nats, &db);

    let client = support::voter();
    let api = format!("{}/api/votes", ingest.url);
    let response = client
        .post(&api)
        .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let (name, value) = cookie.split_once('=').unwrap();

    // Flip one character of the signed payload, and separately forge an unsigned one.
    let mut tampered = value.to_owned().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();
    let forged = "1.0000000000000000000000000000002a.99.pets~dogs".to_owned();
    for bad in [tampered, forged, "garbage".to_owned()] {
        let response = reqwest::Client::new()
            .post(&api)
            .header("cookie", format!("{name}={bad}"))
            .json(&serde_json::json!({"poll": "pets", "choice": "dogs"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "a bad cookie never fails the vote");
        let fresh = response.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(
            fresh.split(';').next().unwrap(),
            cookie,
            "a new voter cookie is issued"
        );
    }

    support::drained(&nats).await;
    // The original voter still votes cats; three new voters vote dogs.
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 1, 1), ("dogs".to_owned(), 3, 3)]
    );
    worker.stop().await;
    ingest.role.stop().await;
}

/// A cookie key rotated across two ingest nodes mid-poll, in the two phases SECURITY.md gives
/// (the new key added to every node as verify-only, then made the signing key on every node),
/// each node restarted in turn while voters change their minds on either node: every voter is
/// counted once, as their last choice. Then a node that was left out of the rotation, which is
/// what a one-step rotation leaves behind: it takes a re-signed cookie for a new voter, and the
/// same count finds a voter counted twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_key_rotated_in_two_phases_across_two_nodes_never_splits_a_voter() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let (old, new) = (
        support::COOKIE_KEY,
        "a-new-integration-test-cookie-key-of-32-bytes",
    );
    let node = |name: &'static str, signing: &'static str, verify_only: &'static str| {
        let nats = &nats;
        async move {
            support::ingest_with(nats, name, |c| {
                c.keys.cookies = landslide_ingest::CookieKeys::new(
                    support::secret(signing),
                    vec![support::secret(verify_only)],
                );
            })
            .await
        }
    };
    const VOTERS: usize = 6;
    let mut cookies: [Option<String>; VOTERS] = Default::default();
    let mut last = ["cats"; VOTERS];
    let mut round = 0;
    // Every voter votes once on each node, the two in turns, each vote another choice.
    let mut vote_everywhere = async |nodes: [&str; 2]| {
        round += 1;
        for turn in 0..2 {
            for (voter, cookie) in cookies.iter_mut().enumerate() {
                let url = nodes[(voter + turn) % 2];
                let choice = if (voter + round + turn) % 2 == 0 {
                    "cats"
                } else {
                    "dogs"
                };
                let (status, set) = support::vote_with_cookie(url, cookie.as_deref(), choice).await;
                assert_eq!(status, 202, "round {round}, voter {voter}");
                if set.is_some() {
                    *cookie = set;
                }
                last[voter] = choice;
            }
        }
    };

    // Before: both nodes sign with the old key.
    let mut a = support::ingest(&nats, "web01", 0).await;
    let mut b = support::ingest(&nats, "web02", 0).await;
    vote_everywhere([&a.url, &b.url]).await;
    // Phase one, a node at a time: the new key verifies, the old one still signs.
    for phase in [(old, new), (new, old)] {
        a.role.stop().await;
        a = node("web01", phase.0, phase.1).await;
        vote_everywhere([&a.url, &b.url]).await;
        b.role.stop().await;
        b = node("web02", phase.0, phase.1).await;
        vote_everywhere([&a.url, &b.url]).await;
    }
    support::drained(&nats).await;
    let expected = |last: &[&str]| {
        let cats = last.iter().filter(|c| **c == "cats").count() as i64;
        let dogs = last.len() as i64 - cats;
        [
            ("cats".to_owned(), cats, cats),
            ("dogs".to_owned(), dogs, dogs),
        ]
        .into_iter()
        .filter(|(_, n, _)| *n > 0)
        .collect::<Vec<_>>()
    };
    assert_eq!(
        db.tally_and_count("pets").await,
        expected(&last),
        "each voter counted once, as their last choice"
    );

    // What the two phases prevent: a node still on the old key alone (as in a rotation done in
    // one step, a node at a time) makes a voter whose cookie the new key signed a new voter.
    let left_out = support::ingest(&nats, "web03", 0).await;
    let voter = 0;
    let flipped = if last[voter] == "cats" {
        "dogs"
    } else {
        "cats"
    };
    let (status, _) =
        support::vote_with_cookie(&left_out.url, cookies[voter].as_deref(), flipped).await;
    assert_eq!(status, 202);
    support::drained(&nats).await;
    let counted: i64 = db
        .tally_and_count("pets")
        .await
        .iter()
        .map(|(_, _, ballots)| ballots)
        .sum();
    assert_eq!(
        counted,
        VOTERS as i64 + 1,
        "the left-out node split a voter in two"
    );
    for node in [a, b, left_out] {
        node.role.stop().await;
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_requests_in_flight() {
    let mut nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest_with(&nats, "web01", |c| {
        c.publish_timeout = Duration::from_secs(3);
        c.publish_attempts = 3;
    })
    .await;
    // With the broker gone, votes wait in their handlers for an ack.
    nats.kill().await;
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let client = support::voter();
            let url = ingest.url.clone();
            tokio::spawn(async move { support::vote_api(&client, &url, "pets", "cats").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(ingest.role.stop());
    nats.restart().await;
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(
            status, 202,
            "an in-flight vote is answered, not cut off: {body}"
        );
    }
    stopping.await.unwrap();

    let worker = support::worker(&nats, &db);
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 20, 20)]
    );
    worker.stop().await;
}

/// Found stopping a Compose stack: an ingest node asked to stop while nats-server was gone never
/// exited, waiting in its last flush for a reconnection. It now exits, and answered every vote it
/// took (503: not stored).
#[tokio::test(flavor = "multi_thread")]
async fn an_ingest_node_stopped_while_the_broker_is_gone_still_exits() {
    let mut nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web01", |c| {
        c.publish_timeout = Duration::from_millis(300);
        c.publish_attempts = 1;
    })
    .await;
    nats.kill().await;
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 503, "a vote without the broker is refused: {body}");
    // Role::stop allows 30 s and expects a clean exit.
    ingest.role.stop().await;
}
