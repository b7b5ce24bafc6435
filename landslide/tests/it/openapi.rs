//! The HTTP contract: each of ingest and tally serves, at `/api/openapi.json`, the OpenAPI
//! document generated from its code, and every operation that document lists is served and
//! answers with a status and a content type the document gives it. (Every route is registered
//! with its entry by one `routes!` call, and clippy.toml refuses the plain `route` that would
//! bypass it, so the router serves nothing the document leaves out.) schemathesis checks the
//! answers in depth against the same documents on a live stack: `scripts/api-fuzz`.

use std::time::Duration;

use serde_json::{Value, json};

use landslide_telemetry::serve::MetricsAt;

use crate::support::{self, Db, Nats, wait_for};

/// The media type of a `Content-Type` value, without its parameters.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// GETs `url` and returns the JSON body.
async fn json(url: &str) -> Value {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.unwrap()
}

/// Sends every operation of `document` to `base`, with `receipt` for a `{receipt}` and `pets`
/// for a `{poll}`, and checks that the answer's status and content type are documented.
/// Returns the operations it sent, as `METHOD path`.
async fn every_operation(base: &str, document: &Value, receipt: &str) -> Vec<String> {
    // No redirects followed: `303` is the form's documented answer.
    let client = support::voter();
    let mut sent = Vec::new();
    let paths = document["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            let url = format!(
                "{base}{}",
                path.replace("{poll}", "pets").replace("{receipt}", receipt)
            );
            let request = match method.as_str() {
                "get" => client.get(&url),
                "post" => {
                    let content = operation["requestBody"]["content"]
                        .as_object()
                        .expect("a POST documents its body");
                    let content_type = content.keys().next().expect("one content type");
                    let body = match content_type.as_str() {
                        "application/json" => json!({"poll": "pets", "choice": "cats"}).to_string(),
                        "application/x-www-form-urlencoded" => "vote=cats".to_owned(),
                        other => panic!("{method} {path}: a body of {other}"),
                    };
                    client
                        .post(&url)
                        .header("content-type", content_type)
                        .body(body)
                }
                other => panic!("{path}: method {other} is not one the roles serve"),
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16().to_string();
            let documented = &operation["responses"][&status];
            assert!(
                documented.is_object(),
                "{method} {path} answered {status}, which its entry does not document: \
                 {operation:#}"
            );
            if let Some(content) = documented["content"].as_object() {
                let got = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(media_type)
                    .unwrap_or_default();
                assert!(
                    content
                        .keys()
                        .any(|documented| media_type(documented) == got),
                    "{method} {path} {status}: content type {got:?}, documented {:?}",
                    content.keys().collect::<Vec<_>>()
                );
            }
            for (name, header) in documented["headers"].as_object().into_iter().flatten() {
                if header["required"] == true {
                    assert!(
                        response.headers().contains_key(name.as_str()),
                        "{method} {path} {status}: no {name}, which is documented as always sent"
                    );
                }
            }
            // The live result stream never ends: its head is all there is to check here.
            drop(response);
            sent.push(format!("{} {path}", method.to_ascii_uppercase()));
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served_as_documented() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let worker = support::worker(&nats.server, &db);
    let ingest = support::ingest(&nats.server, "openapi", 0).await;
    let tally = support::tally(&nats.server, &db).await;
    let ready = format!("{}/readyz", tally.url);
    wait_for("tally to be ready", Duration::from_secs(30), || {
        let ready = ready.clone();
        async move { (reqwest::get(&ready).await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let (status, vote) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202, "{vote}");
    let receipt = vote["receipt"].as_str().expect("a receipt").to_owned();

    let roles = [
        (
            "ingest",
            &ingest.url,
            landslide_ingest::openapi(MetricsAt::Operations),
        ),
        (
            "tally",
            &tally.url,
            landslide_tally::openapi(MetricsAt::Operations),
        ),
    ];
    for (role, base, generated) in roles {
        let served = json(&format!("{base}/api/openapi.json")).await;
        assert_eq!(
            served,
            serde_json::to_value(&generated).unwrap(),
            "{role} serves another document than the one its code generates"
        );
        assert_eq!(served["openapi"], "3.1.0", "{role}");
        let sent = every_operation(base, &served, &receipt).await;
        // The document lists itself and each role's own pages and APIs.
        for operation in ["GET /api/openapi.json", "GET /", "GET /healthz"] {
            assert!(sent.iter().any(|s| s == operation), "{role}: {operation}");
        }
        // `/metrics` is on the operations listener, as in every deployment: neither served nor
        // documented where the voters reach.
        assert!(served["paths"].get("/metrics").is_none(), "{role}");
        let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(metrics.status(), 404, "{role} serves /metrics publicly");
        let expected: &[&str] = match role {
            "ingest" => &["POST /vote", "POST /api/votes", "GET /readyz"],
            _ => &[
                "GET /results/{poll}",
                "GET /api/results/{poll}",
                "GET /api/results/{poll}/events",
                "GET /api/receipts/{receipt}",
                "GET /receipts/{receipt}",
                "GET /readyz",
            ],
        };
        for operation in expected {
            assert!(sent.iter().any(|s| s == operation), "{role}: {operation}");
        }
    }

    ingest.role.stop().await;
    tally.role.stop().await;
    worker.stop().await;
}

/// Found while documenting every status: a path segment that is not UTF-8 once percent-decoded
/// was axum's own `400` in plain text, which no document described. It names no poll (ids are
/// `[A-Za-z0-9_-]`) and is no receipt, so it gets their answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_segment_that_is_not_utf8_names_no_poll_and_no_receipt() {
    let nats = Nats::start().await;
    let db = Db::create().await;
    let tally = support::tally(&nats.server, &db).await;
    let client = reqwest::Client::new();
    let cases = [
        ("/api/results/%FF", 404, "application/json"),
        ("/api/results/%FF/events", 404, "application/json"),
        ("/results/%C3", 404, "text/html"),
        ("/api/receipts/%FF", 400, "application/json"),
        ("/receipts/%FF", 400, "text/html"),
    ];
    for (path, status, content_type) in cases {
        let response = client
            .get(format!("{}{path}", tally.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let got = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(media_type(got), content_type, "{path}");
        if content_type == "application/json" {
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].is_string(), "{path}: {body}");
        }
    }
    tally.role.stop().await;
}

/// Found while documenting every status: `GET /?poll=pets&poll=pets` was axum's plain-text
/// `400` ("duplicate field"). An address is not a vote: the form shows, by the first value.
#[tokio::test(flavor = "multi_thread")]
async fn the_form_shows_for_an_address_that_repeats_a_field() {
    let nats = Nats::start().await;
    let ingest = support::ingest(&nats.server, "repeat", 0).await;
    for query in [
        "?poll=pets&poll=pets",
        "?receipt=x&receipt=y",
        "?poll=pets&poll=nope",
    ] {
        let response = reqwest::get(format!("{}/{query}", ingest.url))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{query}");
        let got = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(media_type(got), "text/html", "{query}");
    }
    let response = reqwest::get(format!("{}/?poll=nope&poll=pets", ingest.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 422, "the first value counts");
    ingest.role.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_an_operations_listener_serves_and_documents_metrics_with_its_pages() {
    let nats = Nats::start().await;
    let ingest = support::ingest_with(&nats.server, "public-metrics", |config| {
        config.metrics = MetricsAt::Public;
    })
    .await;
    let served = json(&format!("{}/api/openapi.json", ingest.url)).await;
    assert_eq!(
        served,
        serde_json::to_value(landslide_ingest::openapi(MetricsAt::Public)).unwrap()
    );
    assert!(served["paths"]["/metrics"]["get"].is_object(), "{served:#}");
    let metrics = reqwest::get(format!("{}/metrics", ingest.url))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert_eq!(
        metrics.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        landslide_tally::openapi(MetricsAt::Public)
            .paths
            .paths
            .contains_key("/metrics")
    );
    ingest.role.stop().await;
}
