//! The HTTP edge against hostile clients. Found by trying it: a form POST to `/vote` from another
//! site's page (`Origin: https://evil.example`, `Sec-Fetch-Site: cross-site`) was accepted, and
//! since `SameSite=Lax` kept the voter's cookie out of it, it became a new voter whose cookie
//! replaced the real one.

use crate::support::{self, Nats};

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_sent_from_another_sites_page_is_refused_and_sets_no_cookie() {
    let nats = Nats::start().await;
    let ingest = support::ingest(&nats.url, "web1", 0).await;
    let host = ingest.url.trim_start_matches("http://").to_owned();
    let client = support::voter();
    let form = |headers: &[(&str, &str)]| {
        let mut request = client
            .post(format!("{}/vote", ingest.url))
            .form(&[("vote", "cats")]);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    for headers in [
        &[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ][..],
        // A browser too old for Sec-Fetch-Site still sends Origin on a POST.
        &[("origin", "https://evil.example")][..],
        &[("origin", "null")][..],
        &[("sec-fetch-site", "cross-site")][..],
    ] {
        let response = form(headers).await.unwrap();
        assert_eq!(response.status(), 403, "{headers:?}");
        assert!(
            response.headers().get("set-cookie").is_none(),
            "a refused cross-site vote set a cookie: {headers:?}"
        );
        let page = response.text().await.unwrap();
        assert!(page.contains("another site"), "{page}");
    }
    let api = client
        .post(format!("{}/api/votes", ingest.url))
        .header("sec-fetch-site", "cross-site")
        .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 403);

    // The voting page's own form, and clients that are no browser, vote as before.
    let origin = format!("http://{host}");
    let same = form(&[("origin", &origin), ("sec-fetch-site", "same-origin")])
        .await
        .unwrap();
    assert_eq!(same.status(), 303);
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 202, "{body}");
    ingest.role.stop().await;
}

/// Found by trying it: tally's live result streams had no cap, so a crowd of viewers (or one
/// client opening thousands) held a connection each until the file descriptors ran out.
#[tokio::test(flavor = "multi_thread")]
async fn live_result_streams_beyond_the_cap_get_503_with_retry_after() {
    let nats = Nats::start().await;
    let db = crate::support::Db::create().await;
    let tally = support::tally_with(&nats.url, &db.url, |c| c.max_event_streams = 2).await;
    let url = format!("{}/api/results/pets/events", tally.url);
    let open = || async {
        support::wait_for(
            "an answer to the event stream",
            std::time::Duration::from_secs(15),
            || {
                let url = url.clone();
                async move {
                    let response = reqwest::get(&url).await.ok()?;
                    // Before the first snapshot tally answers 503 "not ready" without a cap involved.
                    let body_not_ready =
                        response.status() == 503 && response.headers()["retry-after"] == "1";
                    (!body_not_ready).then_some(response)
                }
            },
        )
        .await
    };
    let first = open().await;
    let second = open().await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await;
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "5");
    // A viewer who leaves frees a place.
    drop(first);
    let again = support::wait_for(
        "a freed stream",
        std::time::Duration::from_secs(15),
        || async {
            let response = reqwest::get(&url).await.ok()?;
            (response.status() == 200).then_some(response)
        },
    )
    .await;
    drop((second, again));
    tally.role.stop().await;
}
