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
    let tally = support::tally_with(&nats, &db, |c| c.max_event_streams = 2).await;
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

/// One client, by the address the trusted proxy names, holds at most its share of the live
/// result streams (`429`, while another client still gets one) and of receipt lookups (`429`
/// with `Retry-After`, before anything is read): one address could otherwise hold every stream
/// of the cap, or the receipts' few database connections.
#[tokio::test(flavor = "multi_thread")]
async fn one_client_holds_at_most_its_share_of_live_streams_and_receipt_lookups() {
    let nats = Nats::start().await;
    let db = crate::support::Db::create().await;
    let tally = support::tally_with(&nats, &db, |c| {
        c.max_event_streams_per_client = 2;
        c.receipt_rate_limit = landslide_tally::RateLimit::new(0.1, 2).unwrap();
        c.client_ip_header =
            Some(landslide_tally::ClientIpHeader::parse("X-Forwarded-For").unwrap());
    })
    .await;
    let get = |path: String, client: &'static str| {
        let url = format!("{}{path}", tally.url);
        async move {
            reqwest::Client::new()
                .get(url)
                // The proxy appends the client it saw; what the client sent before is not believed.
                .header("x-forwarded-for", format!("203.0.113.99, {client}"))
                .send()
                .await
                .unwrap()
        }
    };
    let (a, b) = ("198.51.100.7", "198.51.100.8");
    let stream = |client| {
        support::wait_for(
            "an answer to the event stream",
            std::time::Duration::from_secs(15),
            move || async move {
                let response = get("/api/results/pets/events".to_owned(), client).await;
                // Before the first snapshot tally answers 503 "not ready".
                (response.status() != 503).then_some(response)
            },
        )
    };
    let held = [stream(a).await, stream(a).await];
    assert_eq!(held.each_ref().map(|r| r.status().as_u16()), [200, 200]);
    let refused = stream(a).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    assert_eq!(stream(b).await.status(), 200, "another client is served");

    let lookup = |client| get("/api/receipts/no-such-receipt".to_owned(), client);
    for _ in 0..2 {
        assert_eq!(lookup(a).await.status(), 400);
    }
    let limited = lookup(a).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "10");
    let page = get("/receipts/no-such-receipt".to_owned(), a).await;
    assert_eq!(page.status(), 429, "the page shares the API's limit");
    assert_eq!(
        lookup(b).await.status(),
        400,
        "another client is not limited"
    );
    drop((held, refused));
    tally.role.stop().await;
}

/// The `Set-Cookie` values of a response.
fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// The `Set-Cookie` values of a response, and the receipt's voter part of its JSON body.
async fn cookies_and_voter(response: reqwest::Response) -> (Vec<String>, String) {
    let cookies = set_cookies(&response);
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
    let nodes = Nodes::start(&nats).await;
    let (plain, secure) = (&nodes.plain, &nodes.secure);
    let vote = |url: &str, cookie: Option<&str>| nodes.vote(url, cookie.map(str::to_owned));

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
    nodes.stop().await;
}

/// A vote for `choice` through `url`'s API, with `cookie` as the request's `Cookie` header and
/// `key` as its `Idempotency-Key`.
fn vote_request(
    client: &reqwest::Client,
    url: &str,
    choice: &str,
    cookie: Option<&str>,
    key: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut request = client
        .post(format!("{url}/api/votes"))
        .json(&serde_json::json!({"poll": "pets", "choice": choice}));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request
}

/// A node with the plain cookie and one with the secure cookie, turned on mid-poll: the plain
/// cookie is still read there for an hour, until the polls then open close.
struct Nodes {
    plain: support::Ingest,
    secure: support::Ingest,
    client: reqwest::Client,
}

impl Nodes {
    async fn start(nats: &Nats) -> Self {
        let plain = support::ingest(nats, "web1", 0).await;
        let secure = support::ingest_with(nats, "web2", |c| {
            c.secure_cookie = true;
            c.plain_cookie_until = Some(chrono::Utc::now() + chrono::Duration::hours(1));
        })
        .await;
        Self {
            plain,
            secure,
            client: reqwest::Client::new(),
        }
    }

    /// A vote for cats through `url`'s API, with `cookie` as the request's `Cookie` header.
    fn vote(
        &self,
        url: &str,
        cookie: Option<String>,
    ) -> impl Future<Output = reqwest::Result<reqwest::Response>> + use<> {
        vote_request(&self.client, url, "cats", cookie.as_deref(), None).send()
    }

    async fn stop(self) {
        self.plain.role.stop().await;
        self.secure.role.stop().await;
    }
}

/// Found in review: nodes read both cookie names and kept the one with the later floor, and the
/// signature covered the value alone. A value an attacker planted beside the victim's own
/// cookie (under the plain name with `Domain=` the parent domain, from a sibling subdomain or a
/// plain-HTTP answer on a hostile network) took the victim's next vote and then their cookie.
/// Each planting leaves the victim's ballot theirs.
#[tokio::test(flavor = "multi_thread")]
async fn a_planted_voter_cookie_never_takes_a_victims_vote() {
    let nats = Nats::start().await;
    let nodes = Nodes::start(&nats).await;
    let (plain, secure) = (&nodes.plain, &nodes.secure);
    let vote = |url: &str, cookie: Option<String>| nodes.vote(url, cookie);
    // The victim's and the attacker's own cookies, from their own votes on each node.
    let first = |url: String| async move {
        let (cookies, voter) = cookies_and_voter(vote(&url, None).await.unwrap()).await;
        (cookies, voter)
    };
    let (victim_secure, victim) = first(secure.url.clone()).await;
    let (attacker_secure, attacker) = first(secure.url.clone()).await;
    let victim_host = pair(&victim_secure, "__Host-landslide_voter");
    let attacker_value = pair(&attacker_secure, "__Host-landslide_voter")
        .split_once('=')
        .unwrap()
        .1
        .to_owned();

    // Secure mode: the attacker's value planted under the plain name beside the victim's
    // `__Host-` cookie, before it and after it. The `__Host-` cookie alone is read.
    for cookie in [
        format!("landslide_voter={attacker_value}; {victim_host}"),
        format!("{victim_host}; landslide_voter={attacker_value}"),
    ] {
        let (_, voter) = cookies_and_voter(vote(&secure.url, Some(cookie)).await.unwrap()).await;
        assert_eq!(
            voter, victim,
            "a planted plain cookie took the victim's vote"
        );
    }
    // A first-time voter within the migration window, who holds only the planted value: it was
    // written for the `__Host-` name, so under the plain one it is no voter at all.
    let planted = format!("landslide_voter={attacker_value}");
    let (_, voter) = cookies_and_voter(vote(&secure.url, Some(planted)).await.unwrap()).await;
    assert_ne!(
        voter, attacker,
        "a planted cookie made its holder the attacker's voter"
    );

    // Plain mode (no HTTPS): two cookies of the one name, in either order. Nothing tells the
    // victim's from the planted one, so the vote is refused and nothing is stored.
    let (victim_plain, victim) = first(plain.url.clone()).await;
    let (attacker_plain, _) = first(plain.url.clone()).await;
    let (mine, theirs) = (
        pair(&victim_plain, "landslide_voter"),
        pair(&attacker_plain, "landslide_voter"),
    );
    let before = stored_votes(&nats).await;
    for cookie in [format!("{mine}; {theirs}"), format!("{theirs}; {mine}")] {
        let response = vote(&plain.url, Some(cookie)).await.unwrap();
        assert_eq!(response.status(), 409);
        assert!(response.headers().get("set-cookie").is_none());
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("two voter cookies"),
            "{body}"
        );
    }
    assert_eq!(stored_votes(&nats).await, before);
    let (_, voter) = cookies_and_voter(vote(&plain.url, Some(mine)).await.unwrap()).await;
    assert_eq!(voter, victim);
    nodes.stop().await;
}

/// No other site may frame a page (its buttons could be clicked through a disguise, and the framed
/// POST is same-origin), nothing is sniffed into another type, no address leaves for another
/// site in a `Referer`, and a site on HTTPS tells browsers to stay on it.
#[tokio::test(flavor = "multi_thread")]
async fn every_page_refuses_framing_and_sniffing_and_https_sends_hsts() {
    let nats = Nats::start().await;
    let db = crate::support::Db::create().await;
    let plain = support::ingest(&nats, "web1", 0).await;
    let secure = support::ingest_with(&nats, "web2", |c| c.secure_cookie = true).await;
    let tally = support::tally(&nats, &db).await;
    let client = reqwest::Client::new();
    for (url, hsts) in [
        (plain.url.clone(), false),
        (format!("{}/api/openapi.json", plain.url), false),
        (secure.url.clone(), true),
        (tally.url.clone(), false),
        (format!("{}/api/results/pets", tally.url), false),
    ] {
        let response = client.get(&url).send().await.unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            header("content-security-policy").as_deref(),
            Some("frame-ancestors 'none'"),
            "{url}"
        );
        assert_eq!(header("x-frame-options").as_deref(), Some("DENY"), "{url}");
        assert_eq!(
            header("x-content-type-options").as_deref(),
            Some("nosniff"),
            "{url}"
        );
        assert_eq!(
            header("referrer-policy").as_deref(),
            Some("same-origin"),
            "{url}"
        );
        assert_eq!(header("strict-transport-security").is_some(), hsts, "{url}");
    }
    // A refusal carries them too.
    let refused = client
        .post(format!("{}/api/votes", plain.url))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
    assert_eq!(refused.headers()["x-frame-options"], "DENY");
    plain.role.stop().await;
    secure.role.stop().await;
    tally.role.stop().await;
}

/// Found by trying it: connections that sent half a request line and headers stayed open forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.http.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    let slow = stalled(
        &addr,
        50,
        b"POST /api/votes HTTP/1.1\r\nHost: x\r\nContent-Ty",
    )
    .await;
    for conn in slow {
        assert!(
            until_closed(conn).await.is_some(),
            "a connection with unfinished headers was still open after 10 s"
        );
    }
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{body}");
    ingest.role.stop().await;
}

/// `n` connections to `addr`, each of which has sent `sent` and will send nothing more.
async fn stalled(addr: &str, n: usize, sent: &[u8]) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(sent).await.unwrap();
        connections.push(conn);
    }
    connections
}

/// What `conn` received until the node closed it (or the error that ended the read), or `None`
/// when it was still open after 10 s.
async fn until_closed(mut conn: tokio::net::TcpStream) -> Option<std::io::Result<Vec<u8>>> {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let read = conn.read_to_end(&mut received);
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Err(_) => None,
        Ok(read) => Some(read.map(|_| received)),
    }
}

/// The head of a vote to `addr` that announces a 40-byte body, with `extra` header lines: sent
/// alone, a client that never sends the body.
fn head_without_body(addr: &str, extra: &str) -> String {
    format!(
        "POST /api/votes HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 40\r\n{extra}\r\n"
    )
}

/// Found in review: only the request head was timed. A connection that sent complete headers
/// with `Content-Length: 40` and then no body byte was still open after 75 s, and the body was
/// read before the same-site check and the rate limit. Some tens of thousands of them take a
/// node off the air. Now the body has its own deadline (408, and the connection ends), and the
/// refusals that need no body come first.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_never_arrives_gets_408_its_connection_closes_and_real_votes_go_on() {
    use tokio::io::AsyncReadExt as _;
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.http.body_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    let headers_only = |extra: &str| head_without_body(&addr, extra);
    let slow = stalled(&addr, 200, headers_only("").as_bytes()).await;
    // The flood does not keep a voter out.
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{body}");
    for conn in slow {
        let answer = until_closed(conn)
            .await
            .expect("a connection whose body never came was still open after 10 s")
            .expect("the answer is read whole");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    // A vote sent from another site's page is refused without reading its body: had the node
    // waited for the body, which never comes, the answer would be 408.
    let mut conn = stalled(
        &addr,
        1,
        headers_only("Sec-Fetch-Site: cross-site\r\n").as_bytes(),
    )
    .await
    .remove(0);
    let mut head = [0u8; 12];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_exact(&mut head),
    )
    .await
    .expect("no answer within 10 s")
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 403");
    ingest.role.stop().await;
}

/// Found in review: with one connection that had sent its headers and no body open, Ctrl-C on
/// `landslide up` stopped the worker and tally and then waited on ingest for as long as the
/// connection stayed open. A shutdown now closes what is still open after its drain timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_a_hung_client_stops_within_its_drain_timeout() {
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        // The body would be waited for longer than `Role::stop` waits (30 s).
        c.http.body_read_timeout = std::time::Duration::from_secs(600);
        c.http.drain_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let addr = ingest.url.trim_start_matches("http://").to_owned();
    let hung = stalled(&addr, 1, head_without_body(&addr, "").as_bytes()).await;
    // Give the node the request head before it is told to stop.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ingest.role.stop().await;
    drop(hung);
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

/// Messages in the votes stream.
async fn stored_votes(nats: &Nats) -> u64 {
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("VOTES").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Found by trying it: nothing limited a client's rate anywhere, so one script could send as
/// many votes as ingest could take. Beyond its burst a client gets 429 with `Retry-After`, and
/// the vote is not stored; another client, told apart by the header our load balancer appends,
/// is not affected.
#[tokio::test(flavor = "multi_thread")]
async fn votes_beyond_a_clients_burst_get_429_with_retry_after_and_are_not_stored() {
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        // A burst of 2, then one vote per 100 s: the third vote is beyond the bucket however
        // slowly this machine runs the first two.
        c.rate_limit = landslide_ingest::RateLimit::new(0.01, 2).unwrap();
        c.client_ip_header =
            Some(landslide_ingest::ClientIpHeader::parse("X-Forwarded-For").unwrap());
    })
    .await;
    let http = reqwest::Client::new();
    // The client says it is 198.51.100.66; the balancer appended what it saw.
    let api = |forwarded_for: &'static str| {
        http.post(format!("{}/api/votes", ingest.url))
            .header("x-forwarded-for", forwarded_for)
            .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
            .send()
    };
    let one = "198.51.100.66, 203.0.113.1";
    let other = "198.51.100.66, 203.0.113.2";

    for _ in 0..2 {
        assert_eq!(api(one).await.unwrap().status(), 202);
    }
    let refused = api(one).await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert!(refused.headers().get("set-cookie").is_none());
    let body: serde_json::Value = refused.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("try again"), "{body}");
    // The form shares the bucket, and answers with the form and the message.
    let form = http
        .post(format!("{}/vote", ingest.url))
        .header("x-forwarded-for", one)
        .form(&[("vote", "dogs")])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 429);
    assert!(form.headers().contains_key("retry-after"));
    let page = form.text().await.unwrap();
    assert!(page.contains("too many votes"), "{page}");

    // Another client behind the same balancer votes as before, and so does one whose request
    // lacks the header (its TCP peer stands in).
    assert_eq!(api(other).await.unwrap().status(), 202);
    let (status, body) = support::vote_api(&support::voter(), &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 202, "{body}");

    // Only the accepted votes are in the stream; the refusals are counted.
    assert_eq!(stored_votes(&nats).await, 4);
    let page = support::metrics_page(&ingest.metrics_url).await;
    assert_eq!(
        support::metric(&page, "landslide_ingest_rate_limited_total"),
        2.0
    );
    assert_eq!(
        support::metric(&page, "landslide_client_ip_fallback_total"),
        1.0
    );
    ingest.role.stop().await;
}

/// `landslide ingest` as a process of its own, killed when dropped.
struct IngestProcess {
    child: std::process::Child,
    url: String,
    /// Where its key files are, removed with it.
    _keys: tempfile::TempDir,
}

impl IngestProcess {
    async fn start(nats: &Nats, node: &str, env: &[(&str, &str)]) -> Self {
        // What a worker sets up, for an ingest node without one.
        support::set_up(nats, &landslide_schema::Polls::default()).await;
        let port = support::free_port();
        let keys = tempfile::tempdir().expect("a folder for the keys");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_landslide"))
            .args(["ingest", "--node-id", node])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .envs(nats.config(landslide_nats::User::Ingest).env())
            .envs(support::key_files(keys.path()))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .spawn()
            .expect("start landslide ingest");
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/readyz");
        support::wait_for(
            "ingest to be ready",
            std::time::Duration::from_secs(30),
            || {
                let ready = ready.clone();
                async move {
                    let response = reqwest::get(&ready).await.ok()?;
                    response.status().is_success().then_some(())
                }
            },
        )
        .await;
        Self {
            child,
            url,
            _keys: keys,
        }
    }

    async fn vote(&self, forwarded_for: &str) -> u16 {
        reqwest::Client::new()
            .post(format!("{}/api/votes", self.url))
            .header("x-forwarded-for", forwarded_for)
            .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The settings as an operator gives them: `LANDSLIDE_RATE_LIMIT=0` turns the limit off, and
/// without `LANDSLIDE_CLIENT_IP_HEADER` a header the client sends is not believed.
#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_settings_reach_the_node_and_a_rate_of_zero_turns_it_off() {
    let nats = Nats::start().await;
    let off = IngestProcess::start(
        &nats,
        "off",
        &[("LANDSLIDE_RATE_LIMIT", "0"), ("LANDSLIDE_RATE_BURST", "1")],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(off.vote("203.0.113.1").await, 202);
    }
    drop(off);

    let peer = IngestProcess::start(
        &nats,
        "peer",
        &[
            ("LANDSLIDE_RATE_LIMIT", "0.01"),
            ("LANDSLIDE_RATE_BURST", "1"),
        ],
    )
    .await;
    assert_eq!(peer.vote("203.0.113.1").await, 202);
    // Another address in the header changes nothing: the client is the TCP peer.
    assert_eq!(peer.vote("203.0.113.2").await, 429);
    drop(peer);

    let proxied = IngestProcess::start(
        &nats,
        "proxied",
        &[
            ("LANDSLIDE_RATE_LIMIT", "0.01"),
            ("LANDSLIDE_RATE_BURST", "1"),
            ("LANDSLIDE_CLIENT_IP_HEADER", "X-Forwarded-For"),
        ],
    )
    .await;
    assert_eq!(proxied.vote("203.0.113.1").await, 202);
    assert_eq!(proxied.vote("203.0.113.1").await, 429);
    assert_eq!(proxied.vote("203.0.113.2").await, 202);
    drop(proxied);
    assert_eq!(stored_votes(&nats).await, 8);
}

/// Found by trying it: two cookie-less clients that both sent `Idempotency-Key: 1` were one
/// voter, so the second client's vote was taken for a retry of the first's, and anyone who
/// guessed a key could change that voter's ballot. Now the key is salted with the client
/// address, and without a cookie it must be long enough to be random.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_idempotency_key_from_two_addresses_is_two_voters_and_a_short_or_stale_key_is_refused()
 {
    let nats = Nats::start().await;
    let db = crate::support::Db::create().await;
    let ingest = support::ingest_with(&nats, "web1", |c| {
        c.client_ip_header =
            Some(landslide_ingest::ClientIpHeader::parse("X-Forwarded-For").unwrap());
    })
    .await;
    let worker = support::worker(&nats, &db);
    let url = format!("{}/api/votes", ingest.url);
    // A client without a cookie: a new reqwest client each time.
    let keyed = |forwarded_for: &'static str, key: String| {
        let url = url.clone();
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("x-forwarded-for", forwarded_for)
                .header("idempotency-key", key)
                .json(&serde_json::json!({"poll": "pets", "choice": "cats"}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let voter_of = |body: &serde_json::Value| {
        let receipt = body["receipt"].as_str().unwrap().to_owned();
        receipt.split('.').nth(1).unwrap().to_owned()
    };
    let key = uuid::Uuid::new_v4().to_string();

    let (status, first) = keyed("203.0.113.1", key.clone()).await;
    assert_eq!(status, 202, "{first}");
    let (status, other) = keyed("203.0.113.2", key.clone()).await;
    assert_eq!(status, 202, "{other}");
    assert_eq!(
        other["duplicate"], false,
        "another client's vote was taken for a retry"
    );
    assert_ne!(voter_of(&other), voter_of(&first));
    // A retry from the first address, its answer lost with its cookie: the same voter and vote.
    let (status, retry) = keyed("203.0.113.1", key.clone()).await;
    assert_eq!(status, 202, "{retry}");
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["event_id"], first["event_id"]);
    assert_eq!(voter_of(&retry), voter_of(&first));

    // A short key is refused, with the cookie or without: it is not random.
    let (status, short) = keyed("203.0.113.3", "1".to_owned()).await;
    assert_eq!(status, 400, "{short}");
    assert!(short["error"].as_str().unwrap().contains("UUID"), "{short}");
    let browser = support::voter();
    let (status, body) = support::vote_api(&browser, &ingest.url, "pets", "dogs").await;
    assert_eq!(status, 202, "{body}");
    let with_key = |key: &str, choice: &str| {
        browser
            .post(&url)
            .header("idempotency-key", key)
            .json(&serde_json::json!({"poll": "pets", "choice": choice}))
            .send()
    };
    assert_eq!(with_key("1", "dogs").await.unwrap().status(), 400);

    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("cats".to_owned(), 2, 2), ("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
    ingest.role.stop().await;
}

/// Found in review: cats with key 1, dogs with key 2, then cats with key 1 again answered
/// `202 "duplicate": true` while the ballot stayed dogs. A retry of a vote that a later answered
/// vote replaced is refused with `409`; a retry after a lost answer is still the same vote.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyed_retry_is_the_same_vote_after_a_lost_answer_and_refused_once_replaced() {
    let nats = Nats::start().await;
    let db = crate::support::Db::create().await;
    let worker = support::worker(&nats, &db);
    let ingest = support::ingest(&nats, "web1", 0).await;
    let client = reqwest::Client::new();
    // A vote with `cookie` as the Cookie header: the answer's cookie and JSON.
    let vote = |cookie: Option<&str>, key: Option<&str>, choice: &str| {
        let request = vote_request(&client, &ingest.url, choice, cookie, key);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let cookies = set_cookies(&response);
            let body: serde_json::Value = response.json().await.unwrap();
            (status, cookies, body)
        }
    };
    let (one, two) = ("first-key-4b0e9c8e-1f2a", "second-key-9d4b-4e8f-a1b2");
    let (_, cookies, _) = vote(None, None, "dogs").await;
    let dogs = pair(&cookies, "landslide_voter");
    // Cats with key 1; its answer is lost, so the browser still holds the dogs cookie. The
    // retry is the same vote.
    let (status, _, first) = vote(Some(&dogs), Some(one), "cats").await;
    assert_eq!(status, 202, "{first}");
    let (status, cookies, retry) = vote(Some(&dogs), Some(one), "cats").await;
    assert_eq!(status, 202, "{retry}");
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["event_id"], first["event_id"]);
    let cats = pair(&cookies, "landslide_voter");
    // Dogs with key 2, answered; then key 1 again: refused, nothing stored.
    let (status, cookies, _) = vote(Some(&cats), Some(two), "dogs").await;
    assert_eq!(status, 202);
    let dogs_again = pair(&cookies, "landslide_voter");
    let (status, _, stale) = vote(Some(&dogs_again), Some(one), "cats").await;
    assert_eq!(status, 409, "{stale}");
    assert!(
        stale["error"].as_str().unwrap().contains("a later vote"),
        "{stale}"
    );
    support::drained(&nats).await;
    assert_eq!(
        db.tally_and_count("pets").await,
        [("dogs".to_owned(), 1, 1)]
    );
    worker.stop().await;
    ingest.role.stop().await;
}
