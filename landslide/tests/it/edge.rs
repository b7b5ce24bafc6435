//! The HTTP edge against hostile clients. Found by trying it: a form POST to `/vote` from another
//! site's page (`Origin: https://evil.example`, `Sec-Fetch-Site: cross-site`) was accepted, and
//! since `SameSite=Lax` kept the voter's cookie out of it, it became a new voter whose cookie
//! replaced the real one.

use crate::support::{self, Nats};

#[tokio::test(flavor = "multi_thread")]
async fn a_vote_sent_from_another_sites_page_is_refused_and_sets_no_cookie() {
    let nats = Nats::start().await;
    let ingest = support::ingest(&nats, "web1", 0).await;
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
    let tally = support::tally_with(&nats, &db.url, |c| c.max_event_streams = 2).await;
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

/// The `Set-Cookie` values of a response, and the receipt's voter part of its JSON body.
async fn cookies_and_voter(response: reqwest::Response) -> (Vec<String>, String) {
    let cookies = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let body: serde_json::Value = response.json().await.unwrap();
    let receipt = body["receipt"].as_str().unwrap();
    (cookies, receipt.split('.').nth(1).unwrap().to_owned())
}

/// `name=value` of the cookie called `name` among `Set-Cookie` values.
fn pair(cookies: &[String], name: &str) -> String {
    let prefix = format!("{name}=");
    let cookie = cookies.iter().find(|c| c.starts_with(&prefix)).unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secure_cookie_uses_the_host_prefix_and_keeps_every_voter_when_turned_on() {
    let nats = Nats::start().await;
    let plain = support::ingest(&nats, "web1", 0).await;
    let secure = support::ingest_with(&nats, "web2", |c| c.secure_cookie = true).await;
    let client = reqwest::Client::new();
    let vote = |url: &str, cookie: Option<&str>| {
        let mut request = client
            .post(format!("{url}/api/votes"))
            .json(&serde_json::json!({"poll": "pets", "choice": "cats"}));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send()
    };

    let (cookies, voter) = cookies_and_voter(vote(&plain.url, None).await.unwrap()).await;
    let old = pair(&cookies, "landslide_voter");
    // LANDSLIDE_SECURE_COOKIE turned on mid-poll: the voter keeps their id.
    let (cookies, same) = cookies_and_voter(vote(&secure.url, Some(&old)).await.unwrap()).await;
    assert_eq!(same, voter, "turning the secure cookie on made a new voter");
    let host = cookies
        .iter()
        .find(|c| c.starts_with("__Host-landslide_voter="))
        .expect("no __Host- cookie");
    for attribute in ["Secure", "Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(host.contains(attribute), "{host} lacks {attribute}");
    }
    assert!(!host.contains("Domain"), "{host}");
    let expired = cookies
        .iter()
        .find(|c| c.starts_with("landslide_voter="))
        .expect("the plain cookie was not expired");
    assert!(expired.contains("Max-Age=0"), "{expired}");
    let new = pair(&cookies, "__Host-landslide_voter");
    let (_, still) = cookies_and_voter(vote(&secure.url, Some(&new)).await.unwrap()).await;
    assert_eq!(still, voter);
    plain.role.stop().await;
    secure.role.stop().await;
}

/// Found by trying it: connections that sent half a request line and headers stayed open forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.http.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"POST /api/votes HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await
            .unwrap();
        slow.push(conn);
    }
    for mut conn in slow {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_to_end(&mut rest),
        )
        .await;
        assert!(
            matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
            "a connection with unfinished headers was still open after 10 s"
        );
    }
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{body}");
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_until_one_is_free() {
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| c.http.max_connections = 1).await;
    // One client keeps its keep-alive connection, so it holds the only place.
    let holder = reqwest::Client::new();
    let ready = format!("{}/healthz", ingest.url);
    assert!(
        holder
            .get(&ready)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let other = reqwest::Client::new();
    let waiting =
        tokio::time::timeout(std::time::Duration::from_secs(1), other.get(&ready).send()).await;
    assert!(waiting.is_err(), "a connection beyond the cap was served");
    drop(holder);
    let served = tokio::time::timeout(std::time::Duration::from_secs(10), other.get(&ready).send())
        .await
        .expect("the waiting connection was never served once the place was free")
        .unwrap();
    assert!(served.status().is_success());
    ingest.role.stop().await;
}
