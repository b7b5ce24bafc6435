//! Telemetry for every Landslide role: logs and spans through `tracing`, OTLP trace export when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, W3C trace context propagation, and Prometheus metrics served
//! on each role's own `/metrics`; and the HTTP server of ingest and tally, with its limits
//! ([`serve`]), and what their OpenAPI documents share ([`openapi`]).
//!
//! Each layer has its own filter: `RUST_LOG` governs the log output only, so `RUST_LOG=warn` never
//! silences the spans that carry `traceparent` from an HTTP request to the database commit.
//! `LANDSLIDE_TRACE_FILTER` (default `info`) governs which spans are exported.

pub mod openapi;
pub mod patience;
pub mod readiness;
pub mod serve;

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{FilterExt as _, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered. Without this, the last spans of a process are lost.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("landslide: flushing traces failed: {err}");
        }
    }
}

/// The target of the spans opened for every request or vote (`http.request`, `vote.publish`).
///
/// They are exported as traces (`LANDSLIDE_TRACE_FILTER`) but never recorded by the log layer, so
/// a log line inside one carries its own fields rather than the span's.
pub const PER_REQUEST_TARGET: &str = "landslide::request";

/// The most links one span keeps: a worker's batch span links every message's trace.
pub const MAX_LINKS_PER_SPAN: u32 = 2048;

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
    /// set, with the other standard `OTEL_*` variables; nowhere otherwise.
    FromEnv,
    /// OTLP/HTTP to this traces URL (`http://host:4318/v1/traces`).
    Endpoint(String),
}

/// Installs the global tracing subscriber and the trace context propagator, once per process.
/// `service` names the process in exported traces (`landslide-ingest`, …).
pub fn init(service: &str) -> anyhow::Result<Telemetry> {
    init_with(service, Export::FromEnv)
}

/// [`init`] with the export destination given rather than read from the environment.
pub fn init_with(service: &str, export: Export) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // async-nats reports every (re)connection at info; its warnings (disconnects) still show.
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    // The log layer formats every span's fields when the span opens, in case an event inside it is
    // logged: for the spans of each request that was a sixth of ingest's instructions per vote
    // (BENCHMARKS.md). Those spans are for traces; the log layer never sees them.
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .with_filter(log_filter.and(filter_fn(not_per_request)));

    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.trim().is_empty());
    let enabled = match &export {
        Export::FromEnv => {
            set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        }
        Export::Endpoint(_) => true,
    };
    let (otel, provider) = if !enabled {
        (None, None)
    } else {
        let builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        let builder = match export {
            Export::FromEnv => builder,
            Export::Endpoint(url) => builder.with_endpoint(url),
        };
        let exporter = builder
            .build()
            .context("cannot build the OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT)")?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_max_links_per_span(MAX_LINKS_PER_SPAN)
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("landslide");
        opentelemetry::global::set_tracer_provider(provider.clone());
        let trace_filter = std::env::var("LANDSLIDE_TRACE_FILTER")
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new("info"));
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(trace_filter);
        (Some(layer), Some(provider))
    };

    // Without an exporter no layer reads the per-request spans: do not even create them. (An
    // absent layer counts as interested in everything, so this takes a filter of its own.)
    let no_request_spans = otel.is_none().then(|| filter_fn(not_per_request));
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(no_request_spans)
        .try_init()
        .context("a tracing subscriber is already installed")?;
    Ok(Telemetry { provider })
}

/// Whether `meta` is anything but a per-request span ([`PER_REQUEST_TARGET`]).
fn not_per_request(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.target() == PER_REQUEST_TARGET)
}

/// Histogram buckets in seconds, from 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Histogram buckets for batch sizes.
const SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus registry, installed as the global `metrics` recorder on first use.
///
/// Every role of the process renders the same registry on its `/metrics`. If another recorder was
/// installed first (never in our binaries), metrics are still rendered from this registry but stay
/// empty.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZE_BUCKETS)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            eprintln!("landslide: a metrics recorder was already installed; /metrics stays empty");
        }
        let upkeep = handle.clone();
        // Histograms drain their buffers during upkeep; without it memory grows with every sample.
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        if let Err(err) = spawned {
            eprintln!("landslide: cannot start the metrics upkeep thread: {err}");
        }
        handle
    })
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics_handler() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus().render(),
    )
}

/// A metric's value in a page of the Prometheus text format, summed over its labels: what the
/// tests and the reliability harness read from a role's `/metrics`. 0 when absent.
pub fn metric_value(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The span of one HTTP request, for `tower_http::trace::TraceLayer::make_span_with`.
///
/// It is named by route template (`POST /api/votes`, `GET /api/results/{poll}`), never by raw path,
/// so traces group by endpoint and ids in paths do not explode span names. A valid `traceparent`
/// from the caller (a load balancer, a test client) becomes its parent.
pub fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", axum::extract::MatchedPath::as_str);
    let span = tracing::info_span!(
        target: PER_REQUEST_TARGET,
        "http.request",
        otel.name = format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HttpHeaderExtractor(request.headers()))
    });
    // Without a valid incoming context the span simply starts a new trace.
    let _ = span.set_parent(parent);
    span
}

/// The longest trace header taken from a request. W3C Trace Context asks vendors to propagate at
/// least 512 characters of `tracestate` and a `traceparent` is 55: a longer value from the internet
/// is dropped, as if absent. Otherwise it would be copied into the vote's NATS headers, and a few
/// hundred kilobytes of it would push the vote over the server's payload limit, turning a client's
/// oddity into a `503` for the voter.
pub const MAX_TRACE_HEADER: usize = 512;

struct HttpHeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .filter(|v| v.len() <= MAX_TRACE_HEADER)
            .and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::Extractor as _;

    use super::*;

    #[test]
    fn an_oversized_trace_header_is_ignored() {
        let mut headers = axum::http::HeaderMap::new();
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        headers.insert("traceparent", traceparent.parse().unwrap());
        headers.insert("tracestate", "x=1".repeat(300).parse().unwrap());
        let extractor = HttpHeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some(traceparent));
        assert_eq!(
            extractor.get("tracestate"),
            None,
            "900 bytes of tracestate were taken"
        );
        headers.insert("tracestate", "vendor=abc".parse().unwrap());
        assert_eq!(
            HttpHeaderExtractor(&headers).get("tracestate"),
            Some("vendor=abc")
        );
    }
}
