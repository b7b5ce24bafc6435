//! An ingest node's clock against the NATS server's (issue 12, item 2). The workers dead-letter a
//! vote stamped more than five minutes ahead of when the stream stored it, so a node must never
//! stamp one: it takes no vote while its clock is off from the server's by more than its bound,
//! and it does not follow a voter cookie's floor that lies far ahead of its clock.

use std::sync::Arc;
use std::time::Duration;

use landslide_ingest::{MaxClockOffset, SystemClock};
use landslide_schema::cookie::VoterCookie;
use landslide_schema::{Timestamp, VoterId};
use uuid::Uuid;

use crate::support::{self, Db, Ingest, Nats};

fn skewed(offset_ms: i64) -> impl FnOnce(&mut landslide_ingest::Config) {
    move |config| config.clock = Arc::new(SystemClock { offset_ms })
}

/// `GET /readyz`: the status and the body.
async fn readyz(ingest: &Ingest) -> (u16, String) {
    let response = reqwest::get(format!("{}/readyz", ingest.url))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The number right after `before` in `text`.
fn number_after(text: &str, before: &str) -> i64 {
    let start = text.find(before).unwrap_or_else(|| panic!("{text}")) + before.len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_clock_is_off_beyond_its_bound_is_not_ready_and_takes_no_vote() {
    let nats = Nats::start().await;
    // Five seconds either way, against the default bound of two.
    let ahead = support::start_ingest(&nats, "ahead", skewed(5_000)).await;
    let behind = support::start_ingest(&nats, "behind", skewed(-5_000)).await;
    for (node, direction) in [(&ahead, "ahead of"), (&behind, "behind")] {
        // Not ready before the first comparison either; wait for the one that measured.
        let body = support::wait_for(
            "/readyz to name the offset",
            Duration::from_secs(15),
            || async move {
                let (status, body) = readyz(node).await;
                assert_eq!(status, 503, "{body}");
                body.contains("ms allowed").then_some(body)
            },
        )
        .await;
        assert!(
            body.contains(&format!(" ms {direction} the NATS server's")),
            "{body}"
        );
        assert!(
            body.contains("more than the 2000 ms allowed (LANDSLIDE_MAX_CLOCK_OFFSET_MS)"),
            "{body}"
        );
        // On loopback the measurement is good to a few milliseconds.
        let off = number_after(&body, "this node's clock is ");
        assert!((4_500..=5_500).contains(&off), "{body}");

        let response = support::post_vote(&support::voter(), &node.url, "pets", "cats").await;
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "2");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            body["error"],
            "this node cannot take votes right now; please try again in a moment"
        );
        let form = support::voter()
            .post(format!("{}/vote", node.url))
            .form(&[("vote", "dogs")])
            .send()
            .await
            .unwrap();
        assert_eq!(form.status(), 503);
    }
    assert_eq!(
        nats.messages("VOTES").await,
        0,
        "a vote was stamped by a bad clock"
    );
    let page = support::metrics_page(&ahead.metrics_url).await;
    assert_eq!(
        support::metric(
            &page,
            r#"landslide_votes_rejected_total{reason="clock_off"}"#
        ),
        4.0,
        "{page}"
    );
    assert!(page.contains("landslide_clock_offset_seconds"), "{page}");
    ahead.role.stop().await;
    behind.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_within_its_bound_is_ready_and_takes_votes() {
    let nats = Nats::start().await;
    // A second ahead, within the default bound; five seconds behind, within a bound of six.
    let close = support::ingest_with(&nats, "close", skewed(1_000)).await;
    let tolerated = support::ingest_with(&nats, "tolerated", |config| {
        skewed(-5_000)(config);
        config.max_clock_offset = MaxClockOffset::from_millis(6_000).unwrap();
    })
    .await;
    for node in [&close, &tolerated] {
        let (status, body) = readyz(node).await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        let (status, body) = support::vote_api(&support::voter(), &node.url, "pets", "cats").await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(nats.messages("VOTES").await, 2);
    close.role.stop().await;
    tolerated.role.stop().await;
}

/// The value of a voter cookie `landslide_voter` for `voter`, signed with the tests' cookie key as an ingest
/// node signs it.
fn signed_cookie(voter: &VoterCookie) -> String {
    let key = cookie::Key::derive_from(support::COOKIE_KEY.as_bytes());
    let mut jar = cookie::CookieJar::new();
    jar.signed_mut(&key).add(cookie::Cookie::new(
        "landslide_voter",
        voter.format(landslide_schema::cookie::Binding::Plain),
    ));
    jar.get("landslide_voter").unwrap().value().to_owned()
}

/// A floor far ahead of every clock can only come from a node whose clock ran far ahead: its
/// votes are dead-lettered, and a vote stamped above its floor would be too. The node stamps the
/// vote by its clock instead, and the cookie it sets forgets the floor, so the voter's next vote
/// follows this one.
#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_floor_far_ahead_of_the_node_clock_is_not_followed_and_the_votes_count() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats, &db);
    let ingest = support::ingest(&nats, "web1", 0).await;
    let voter = Uuid::new_v4();
    let mut cookie = VoterCookie::new(VoterId(voter));
    cookie.last_ts = Timestamp(i64::MAX as u64);
    let jar = reqwest::cookie::Jar::default();
    jar.add_cookie_str(
        &format!("landslide_voter={}; Path=/", signed_cookie(&cookie)),
        &ingest.url.parse().unwrap(),
    );
    let browser = reqwest::Client::builder()
        .cookie_provider(Arc::new(jar))
        .build()
        .unwrap();

    let (status, first) = support::vote_api(&browser, &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{first}");
    let first_ts = Timestamp(first["ts"].as_u64().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let a_minute_on = Timestamp::from_millis(u64::try_from(now.as_millis()).unwrap() + 60_000);
    assert!(
        first_ts < a_minute_on,
        "the vote followed the floor: {first}"
    );
    // The same voter (the cookie's), so the floor was read and refused, not ignored as forged.
    let receipt = first["receipt"].as_str().unwrap();
    assert_eq!(
        receipt.split('.').nth(1),
        Some(voter.simple().to_string().as_str())
    );
    let (status, second) = support::vote_api(&browser, &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 202, "{second}");
    assert!(
        second["ts"].as_u64().unwrap() > first_ts.0,
        "{first} then {second}"
    );
    let page = support::metrics_page(&ingest.metrics_url).await;
    assert_eq!(
        support::metric(&page, "landslide_cookie_floors_refused_total"),
        1.0,
        "{page}"
    );

    support::drained(&nats).await;
    let ballot = db.ballot("pets", voter).await;
    assert_eq!(ballot.map(|(choice, _, _)| choice).as_deref(), Some("dogs"));
    assert_eq!(
        db.tally_and_count("pets").await,
        [("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
    ingest.role.stop().await;
}
