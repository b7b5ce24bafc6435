//! One trace from the HTTP request through NATS to the database commit, checked on what the OTLP
//! exporter really sends (an in-process OTLP/HTTP receiver decodes it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::support::{self, Db, Nats};

/// Serves `POST /v1/traces` and keeps every span it receives.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut sink = sink.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        sink.extend(scope.spans);
                    }
                }
                ExportTraceServiceResponse::default().encode_to_vec()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trace_started_by_a_vote_continues_in_the_workers_batch_span() {
    let (url, spans) = otlp_receiver().await;
    // nextest runs each test in its own process, so this global subscriber is this test's alone.
    let telemetry = landslide_telemetry::init_with(
        "landslide-test",
        landslide_telemetry::Export::Endpoint(url),
    )
    .unwrap();
    let nats = Nats::start().await;
    let db = Db::create().await;
    let ingest = support::ingest(&nats, "web01", 0).await;
    let worker = support::worker(&nats, &db);
    let (status, _) = support::vote_api(&support::voter(), &ingest.url, "pets", "cats").await;
    assert_eq!(status, 202);
    support::drained(&nats).await;
    worker.stop().await;
    ingest.role.stop().await;
    // Shutting down flushes the batch exporter; it blocks, so keep it off the async workers.
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    let spans = support::wait_for("exported spans", Duration::from_secs(10), || {
        let spans = spans.lock().unwrap().clone();
        async move {
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            (has("POST /api/votes") && has("dedup batch")).then_some(spans)
        }
    })
    .await;
    let request = spans.iter().find(|s| s.name == "POST /api/votes").unwrap();
    let publish = spans.iter().find(|s| s.name == "vote publish").unwrap();
    assert_eq!(
        publish.trace_id, request.trace_id,
        "publish is part of the request's trace"
    );
    assert_eq!(publish.parent_span_id, request.span_id);
    let batch = spans.iter().find(|s| s.name == "dedup batch").unwrap();
    assert!(
        batch
            .links
            .iter()
            .any(|l| l.trace_id == request.trace_id && l.span_id == publish.span_id),
        "the batch span links the vote's trace: {:?}",
        batch.links
    );
}
