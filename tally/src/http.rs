//! The tally's HTTP surface: the results page, the JSON API, its server-sent events, health and
//! metrics. Handlers only read the latest snapshot from the `watch` channel.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::rejection::PathRejection;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Router};
use futures::{Stream, StreamExt as _};
use landslide_config::Shutdown;
use landslide_nats::polls::PollWatch;
use landslide_schema::Poll;
use landslide_telemetry::openapi::{Document, ErrorBody};
use landslide_telemetry::serve::MetricsAt;
use tokio::sync::watch;
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::snapshot::{Results, Snapshot, Status};

#[derive(Clone)]
pub(crate) struct AppState {
    pub polls: PollWatch,
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub shutdown: Shutdown,
    /// A snapshot older than this makes `/readyz` fail: refreshes have been failing.
    pub stale_after: Duration,
    /// One permit per live result stream (`Config::max_event_streams`).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// A client's share of them (`Config::max_event_streams_per_client`).
    pub stream_slots: Arc<landslide_edge::Slots>,
    /// Receipt lookups per client (`Config::receipt_rate_limit`).
    pub receipt_limiter: Option<Arc<landslide_edge::Limiter>>,
    pub client_ip_header: Option<landslide_edge::ClientIpHeader>,
    /// For receipts only (`receipts.rs`).
    pub db: diesel_async::pooled_connection::bb8::Pool<diesel_async::AsyncPgConnection>,
    /// Answers only the receipts it authenticates (`LANDSLIDE_RECEIPT_KEY_FILE`, ingest's).
    pub receipts: landslide_schema::receipt::ReceiptKey,
}

impl AppState {
    pub(crate) fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.borrow().clone()
    }

    /// The client of a request from `peer`.
    pub(crate) fn client(&self, headers: &HeaderMap, peer: SocketAddr) -> landslide_edge::Client {
        landslide_edge::client::resolve(self.client_ip_header.as_ref(), headers, peer)
    }
}

/// Every route of tally, each registered with its entry in the OpenAPI document by the same
/// `routes!` call: a route cannot be served undocumented (`OpenApiRouter::route`, which would
/// allow it, is refused by clippy.toml).
fn api(metrics: MetricsAt) -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(default_page))
        .routes(routes!(poll_page))
        .routes(routes!(api_results))
        .routes(routes!(events))
        .routes(routes!(crate::receipts::api))
        .routes(routes!(crate::receipts::page))
        .routes(routes!(readyz));
    landslide_telemetry::openapi::operations_routes(api, metrics)
}

/// Tally's OpenAPI 3.1 document, generated from [`api`]: what `/api/openapi.json` serves.
pub fn openapi(metrics: MetricsAt) -> utoipa::openapi::OpenApi {
    describe(api(metrics).into_openapi())
}

/// A document of [`api`]'s routes, completed with what the annotations cannot say.
fn describe(document: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    landslide_telemetry::openapi::finish(
        document,
        "Landslide tally",
        env!("CARGO_PKG_VERSION"),
        "The results: live pages, the JSON API and its server-sent events, and receipts. \
         Everything is read from one snapshot, rebuilt every refresh.",
    )
}

/// Tally's routes (`/metrics` among them only where `metrics` says) and the document that
/// describes exactly those.
pub(crate) fn router(state: AppState, metrics: MetricsAt) -> Router {
    let (router, document) = api(metrics).split_for_parts();
    let router = router
        .layer(Extension(Document::new(&describe(document))))
        .with_state(state);
    // HSTS is ingest's to send, beside the secure voter cookie (SECURITY.md, "The HTTP edge").
    landslide_telemetry::serve::security_headers(router, false)
        .layer(TraceLayer::new_for_http().make_span_with(landslide_telemetry::request_span))
}

/// A poll id from the path. A segment that is not UTF-8 once percent-decoded names no poll
/// (ids are `[A-Za-z0-9_-]`): it is an unknown poll like any other, not axum's plain-text 400.
fn poll_id(path: Result<Path<String>, PathRejection>) -> Option<String> {
    path.ok().map(|Path(poll)| poll)
}

/// Errors of the JSON API; the body is `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("unknown poll")]
    UnknownPoll,
    #[error("results are not available yet; retry in a second")]
    NotReady,
    #[error(
        "too many live result streams right now; retry in a few seconds, or read /api/results/<poll>"
    )]
    TooManyStreams,
    #[error(
        "too many live result streams from your address; close one, or read /api/results/<poll>"
    )]
    TooManyStreamsFromClient,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, retry_after) = match self {
            Self::UnknownPoll => (StatusCode::NOT_FOUND, None),
            Self::NotReady => (StatusCode::SERVICE_UNAVAILABLE, Some("1")),
            Self::TooManyStreams => (StatusCode::SERVICE_UNAVAILABLE, Some("5")),
            Self::TooManyStreamsFromClient => (StatusCode::TOO_MANY_REQUESTS, Some("5")),
        };
        let body = axum::Json(ErrorBody::new(self.to_string()));
        let mut response = (status, body).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

/// `GET /api/results/{poll}`: the poll's latest snapshot as JSON.
#[utoipa::path(
    get,
    path = "/api/results/{poll}",
    tag = "results",
    description = "The poll's latest results. `pending` counts accepted votes not yet \
        committed: when it is 0, `counts` include every vote accepted before `as_of`.",
    params(("poll" = landslide_schema::PollId, Path, description = "The poll's id")),
    responses(
        (status = 200, description = "The results", body = Results,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 404, description = "Unknown poll", body = ErrorBody),
        (status = 503, description = "No results yet (tally has just started); retry",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
async fn api_results(
    State(state): State<AppState>,
    poll: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let poll = poll_id(poll).ok_or(ApiError::UnknownPoll)?;
    let book = state.polls.current();
    let poll = book.latest().1.get(&poll).ok_or(ApiError::UnknownPoll)?;
    let snapshot = state.snapshot().ok_or(ApiError::NotReady)?;
    let results = snapshot.polls.get(&poll.id).ok_or(ApiError::NotReady)?;
    let (_, json) = results.served(snapshot.taken.elapsed(), state.stale_after);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json.into_owned(),
    )
        .into_response())
}

/// `GET /api/results/{poll}/events`: one event per new snapshot, the current one first. Ends when
/// the server shuts down, so that draining does not wait for viewers to leave.
#[utoipa::path(
    get,
    path = "/api/results/{poll}/events",
    tag = "results",
    description = "Server-sent events: one per new snapshot, the current one first, each with \
        the JSON of `GET /api/results/{poll}` as its data. The stream does not end by itself.",
    params(("poll" = landslide_schema::PollId, Path, description = "The poll's id")),
    responses(
        (status = 200, description = "The live results", body = String,
            content_type = "text/event-stream"),
        (status = 404, description = "Unknown poll", body = ErrorBody),
        (status = 429, description = "Too many live result streams from the client's address \
            at once; close one, or read `GET /api/results/{poll}`",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "Too many live result streams at once; retry, or read \
            `GET /api/results/{poll}`",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
async fn events(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    poll: Result<Path<String>, PathRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let poll = poll_id(poll).ok_or(ApiError::UnknownPoll)?;
    let poll = state
        .polls
        .current()
        .latest()
        .1
        .get(&poll)
        .ok_or(ApiError::UnknownPoll)?
        .id
        .clone();
    // Both held for as long as the stream lives: dropped with it when the viewer leaves. The
    // client's share first, so that a client over it takes no stream of the others.
    let slot = state
        .stream_slots
        .take(state.client(&headers, peer))
        .ok_or_else(|| {
            metrics::counter!("landslide_tally_event_streams_refused_total", "reason" => "client")
                .increment(1);
            ApiError::TooManyStreamsFromClient
        })?;
    let permit = Arc::clone(&state.event_streams)
        .try_acquire_owned()
        .map_err(|_| {
            metrics::counter!("landslide_tally_event_streams_refused_total", "reason" => "cap")
                .increment(1);
            ApiError::TooManyStreams
        })?;
    let events = snapshots(state.snapshots.clone())
        .filter_map(move |snapshot| {
            let _stream = (&permit, &slot);
            let event = snapshot
                .polls
                .get(&poll)
                .map(|results| Ok(Event::default().data(&results.json)));
            futures::future::ready(event)
        })
        .take_until(state.shutdown.clone().wait());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Every snapshot published from now on, starting with the current one if there is one. Ends when
/// the refresher stops.
fn snapshots(
    mut receiver: watch::Receiver<Option<Arc<Snapshot>>>,
) -> impl Stream<Item = Arc<Snapshot>> {
    // A new viewer gets the current snapshot at once rather than at the next refresh.
    receiver.mark_changed();
    futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            receiver.changed().await.ok()?;
            let snapshot = receiver.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                return Some((snapshot, receiver));
            }
        }
    })
}

/// `GET /readyz`: ready while snapshots keep coming.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    description = "Ready while results keep being refreshed.",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "No results yet, or refreshes keep failing",
            body = String, content_type = "text/plain"),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.snapshot() {
        Some(snapshot) if snapshot.taken.elapsed() <= state.stale_after => {
            (StatusCode::OK, "ready")
        }
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "results are stale: refreshing from PostgreSQL or NATS fails",
        ),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no results yet"),
    }
}

/// One option's bar on the page.
struct OptionView<'a> {
    id: &'a str,
    label: &'a str,
    votes: i64,
    /// The bar's width in percent, formatted for CSS.
    percent: String,
}

#[derive(Template)]
#[template(path = "results.html")]
struct ResultsPage<'a> {
    poll: &'a str,
    question: &'a str,
    options: Vec<OptionView<'a>>,
    total: i64,
    pending: u64,
    /// Empty before the first snapshot.
    as_of: &'a str,
    /// What the poll's state says to a reader: "Open", "Closes at …", "Final result", ….
    status: String,
    /// `final` once the result is final, for the page's style and script.
    status_key: &'static str,
    /// Why these results may be incomplete, when they may: a stream that went backwards, or
    /// results that could not be refreshed.
    warning: Option<String>,
}

/// What the page says above the results when they may be incomplete.
fn warning(results: &Results) -> Option<String> {
    match (&results.rollback, results.stale_for_ms) {
        (Some(rollback), _) => Some(format!(
            "The votes stream went backwards ({rollback}); these results are not final until \
             the workers have counted what it stored since."
        )),
        (None, Some(ms)) => Some(format!(
            "These results could not be refreshed for {} s: they may be missing votes counted \
             since.",
            ms / 1000
        )),
        (None, None) => None,
    }
}

/// The line of the results page that says where the poll is, from its snapshot's status.
fn status_line(status: Status, results: Option<&Results>) -> (String, &'static str) {
    let closes = results.and_then(|r| r.closes_at.as_deref());
    let opens = results.and_then(|r| r.opens_at.as_deref());
    match status {
        Status::NotOpen => (
            format!("Not open yet: opens at {}", opens.unwrap_or("?")),
            "not_open",
        ),
        Status::Open => match closes {
            Some(closes) => (format!("Open: closes at {closes}"), "open"),
            None => ("Open".to_owned(), "open"),
        },
        Status::Closed => ("Closed: counting the last votes".to_owned(), "closed"),
        Status::Final => ("Final result".to_owned(), "final"),
    }
}

/// `GET /`: the default poll's live results.
#[utoipa::path(
    get,
    path = "/",
    tag = "pages",
    description = "The default poll's live results page (updated over server-sent events).",
    responses((status = 200, description = "The page", body = String, content_type = "text/html")),
)]
async fn default_page(State(state): State<AppState>) -> Response {
    let book = state.polls.current();
    page(&state, book.latest().1.default_poll())
}

/// `GET /results/{poll}`: another poll's live results.
#[utoipa::path(
    get,
    path = "/results/{poll}",
    tag = "pages",
    description = "A poll's live results page.",
    params(("poll" = landslide_schema::PollId, Path, description = "The poll's id")),
    responses(
        (status = 200, description = "The page", body = String, content_type = "text/html"),
        (status = 404, description = "Unknown poll", body = String, content_type = "text/html"),
    )
)]
async fn poll_page(
    State(state): State<AppState>,
    poll: Result<Path<String>, PathRejection>,
) -> Response {
    let book = state.polls.current();
    match poll_id(poll).and_then(|poll| book.latest().1.get(&poll)) {
        Some(poll) => page(&state, poll),
        None => (
            StatusCode::NOT_FOUND,
            Html("<!doctype html><title>Unknown poll</title><p>No such poll.</p>"),
        )
            .into_response(),
    }
}

fn page(state: &AppState, poll: &Poll) -> Response {
    let snapshot = state.snapshot();
    let served = snapshot.as_ref().and_then(|s| {
        let p = s.polls.get(&poll.id)?;
        Some(p.served(s.taken.elapsed(), state.stale_after).0)
    });
    let results = served.as_deref();
    let total = results.map_or(0, |r| r.total);
    let options = poll
        .options
        .iter()
        .map(|option| {
            let votes = results
                .and_then(|r| r.counts.get(&option.id).copied())
                .unwrap_or(0);
            // Display only: f64 is exact enough for a bar's width.
            #[allow(clippy::cast_precision_loss)]
            let percent = if total > 0 {
                votes as f64 * 100.0 / total as f64
            } else {
                0.0
            };
            OptionView {
                id: option.id.as_str(),
                label: &option.label,
                votes,
                percent: format!("{percent:.1}"),
            }
        })
        .collect();
    let (status, status_key) = status_line(results.map_or(Status::Open, |r| r.status), results);
    let page = ResultsPage {
        poll: poll.id.as_str(),
        question: &poll.question,
        options,
        total,
        pending: results.map_or(0, |r| r.pending),
        as_of: results.map_or("", |r| &r.as_of),
        status,
        status_key,
        warning: results.and_then(warning),
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot render the results page");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response()
        }
    }
}
