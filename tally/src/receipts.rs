//! `GET /api/receipts/{receipt}` and `GET /receipts/{receipt}`: what became of one vote, from the
//! receipt its voter got ([`Receipt`]). One indexed read of the voter's ballot per request, on a
//! small pool of its own: the results' one query per refresh stays what it was.
//!
//! The answer is about the receipt's vote and nothing later: counted (with its own choice),
//! superseded, pending or not counted. It never names the choice or the event of a later vote of
//! the same voter: a receipt once answered `"superseded", "counted_choice": "dogs"` with the
//! later event's id, which told anyone holding it the voter's current choice and found the
//! voter's line in the published ballots.

use std::net::SocketAddr;

use askama::Template;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text, Uuid as SqlUuid};
use diesel_async::AsyncPgConnection;
use diesel_async::RunQueryDsl as _;
use diesel_async::pooled_connection::bb8::Pool;
use landslide_edge::Client;
use landslide_schema::receipt::{Receipt, Standing, Unanswered};
use landslide_schema::{Choice, EventId, PollId, Timestamp};
use landslide_telemetry::openapi::ErrorBody;
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::AppState;
use crate::snapshot::Status;

/// Connections for receipts (each request holds one for a single indexed read).
pub(crate) const POOL_SIZE: u32 = 4;

/// How long PostgreSQL runs one receipt lookup before it cancels it (`statement_timeout` on the
/// pool's connections): the read takes a millisecond, and one held up by a lock on the ballots
/// would otherwise hold one of [`POOL_SIZE`] connections, and every lookup queued behind it, for
/// as long as the lock lasts. Found in review: no statement timeout.
pub(crate) const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(QueryableByName)]
struct BallotRow {
    #[diesel(sql_type = BigInt)]
    after_ts: i64,
    #[diesel(sql_type = SqlUuid)]
    event_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    choice: String,
}

/// What became of a receipt's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReceiptStatus {
    /// This vote is the voter's ballot.
    Counted,
    /// A later vote of the same voter is (which one, and its choice, are not said).
    Superseded,
    /// Not counted yet.
    Pending,
    /// The poll is final and the vote is not in its ballots, which the audit reports as a
    /// difference.
    NotCounted,
}

/// The answer about one receipt.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Answer {
    #[schema(value_type = Receipt)]
    receipt: String,
    #[schema(value_type = PollId)]
    poll: String,
    event_id: EventId,
    status: ReceiptStatus,
    /// This vote's choice, when it is the one counted (the ballot holds it); never a later
    /// vote's.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Choice>)]
    counted_choice: Option<String>,
    /// The poll's status, as the results say it.
    poll_status: Status,
}

pub(crate) async fn answer(state: &AppState, text: &str) -> Result<Answer, (StatusCode, String)> {
    let receipt: Receipt = state.receipts.open(text).map_err(|e| match e {
        Unanswered::Malformed(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Unanswered::NotIssued => (StatusCode::NOT_FOUND, e.to_string()),
    })?;
    let book = state.polls.current();
    let poll = book.latest().1.get(receipt.poll.as_str()).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("there is no poll {}", receipt.poll),
        )
    })?;
    let unavailable = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
    let results = state
        .snapshot()
        .and_then(|s| s.polls.get(&poll.id).map(|p| p.results.clone()))
        .ok_or_else(|| unavailable("results are not available yet; retry in a second".into()))?;
    let ballot = read_ballot(&state.db, &receipt)
        .await
        .map_err(|e| unavailable(format!("cannot read the ballots right now: {e}")))?;
    let standing = receipt.standing(
        ballot
            .as_ref()
            .map(|b| (Timestamp::from_i64(b.after_ts), EventId(b.event_id))),
    );
    let status = match standing {
        Standing::Counted => ReceiptStatus::Counted,
        Standing::Superseded => ReceiptStatus::Superseded,
        Standing::NotYet if results.status == Status::Final => ReceiptStatus::NotCounted,
        Standing::NotYet => ReceiptStatus::Pending,
    };
    Ok(Answer {
        receipt: text.to_owned(),
        poll: receipt.poll.to_string(),
        event_id: receipt.event_id,
        status,
        counted_choice: ballot
            .filter(|_| standing == Standing::Counted)
            .map(|b| b.choice),
        poll_status: results.status,
    })
}

async fn read_ballot(
    db: &Pool<AsyncPgConnection>,
    receipt: &Receipt,
) -> anyhow::Result<Option<BallotRow>> {
    let mut conn = db.get().await?;
    let rows: Vec<BallotRow> = diesel::sql_query(
        "SELECT after_ts, event_id, choice FROM ballots WHERE poll = $1 AND voter = $2",
    )
    .bind::<Text, _>(receipt.poll.as_str())
    .bind::<SqlUuid, _>(receipt.voter.0)
    .load(&mut conn)
    .await?;
    Ok(rows.into_iter().next())
}

/// The receipt from the path. A segment that is not UTF-8 once percent-decoded is no receipt:
/// the same `400` as any other text that is none, not axum's plain-text one.
async fn from_path(
    state: &AppState,
    client: Client,
    path: Result<Path<String>, PathRejection>,
) -> Result<Answer, Refusal> {
    // Before anything is read: a client beyond its share waits, and holds no connection.
    if let Some(limiter) = &state.receipt_limiter {
        limiter.check(&client).map_err(|retry_after| {
            metrics::counter!("landslide_tally_receipts_rate_limited_total").increment(1);
            Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                error: "too many receipt lookups from your address; retry later".to_owned(),
                retry_after: Some(retry_after),
            }
        })?;
    }
    let refusal = |(status, error): (StatusCode, String)| Refusal {
        retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        status,
        error,
    };
    match path {
        Ok(Path(receipt)) => answer(state, &receipt).await.map_err(refusal),
        Err(_) => Err(refusal((
            StatusCode::BAD_REQUEST,
            "a receipt is `<poll>.<voter id>.<event id>.<ts>.<tag>`".to_owned(),
        ))),
    }
}

/// A lookup not answered: its status, why, and when to retry (`Retry-After`).
struct Refusal {
    status: StatusCode,
    error: String,
    retry_after: Option<u64>,
}

impl Refusal {
    /// `response` with this refusal's status and `Retry-After`.
    fn onto(&self, response: impl IntoResponse) -> Response {
        let mut response = (self.status, response).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// `GET /api/receipts/{receipt}`.
#[utoipa::path(
    get,
    path = "/api/receipts/{receipt}",
    tag = "receipts",
    description = "What became of the vote a receipt names, read from the voter's ballot.",
    params(("receipt" = landslide_schema::receipt::Receipt, Path,
        description = "The receipt of an accepted vote")),
    responses(
        (status = 200, description = "Where the vote stands", body = Answer,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "Not a receipt", body = ErrorBody),
        (status = 404, description = "This site did not issue the receipt, or its poll does \
            not exist", body = ErrorBody),
        (status = 429, description = "Too many lookups from the client's address; retry after \
            the seconds `Retry-After` says", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "No results yet, or the ballots cannot be read now; retry",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn api(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    receipt: Result<Path<String>, PathRejection>,
) -> Response {
    match from_path(&state, state.client(&headers, peer), receipt).await {
        Ok(answer) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(answer)).into_response(),
        Err(refusal) => refusal.onto(axum::Json(ErrorBody::new(refusal.error.clone()))),
    }
}

/// `GET /receipts/{receipt}`: the same, as a small page.
#[utoipa::path(
    get,
    path = "/receipts/{receipt}",
    tag = "pages",
    description = "What became of the vote a receipt names, as a small page.",
    params(("receipt" = landslide_schema::receipt::Receipt, Path,
        description = "The receipt of an accepted vote")),
    responses(
        (status = 200, description = "Where the vote stands", body = String,
            content_type = "text/html"),
        (status = 400, description = "Not a receipt", body = String, content_type = "text/html"),
        (status = 404, description = "This site did not issue the receipt, or its poll does \
            not exist", body = String, content_type = "text/html"),
        (status = 429, description = "Too many lookups from the client's address; retry after \
            the seconds `Retry-After` says", body = String, content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "No results yet, or the ballots cannot be read now; retry",
            body = String, content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
    )
)]
pub(crate) async fn page(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    receipt: Result<Path<String>, PathRejection>,
) -> Response {
    let (refusal, sentence) = match from_path(&state, state.client(&headers, peer), receipt).await {
        Ok(answer) => (
            None,
            match answer.status {
                ReceiptStatus::Counted => "This vote is the one counted for you.".to_owned(),
                ReceiptStatus::Superseded => {
                    "A later vote of yours replaced this one; that one is counted.".to_owned()
                }
                ReceiptStatus::Pending => {
                    "This vote is accepted and not counted yet; look again in a moment.".to_owned()
                }
                ReceiptStatus::NotCounted => {
                    "This vote is not among the counted ballots of the final result. \
                     Please report it."
                        .to_owned()
                }
            },
        ),
        Err(refusal) => {
            let error = refusal.error.clone();
            (Some(refusal), error)
        }
    };
    // askama escapes the sentence (a choice is an identifier, but every shown value is escaped).
    let page = ReceiptPage {
        sentence: &sentence,
    };
    match page.render() {
        // Like the API's, status and Retry-After: a reader of the page may retry as well as a
        // program.
        Ok(html) => match refusal {
            Some(refusal) => refusal.onto(Html(html)),
            None => Html(html).into_response(),
        },
        Err(err) => {
            tracing::error!(error = %err, "cannot render the receipt page");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "receipt.html")]
struct ReceiptPage<'a> {
    sentence: &'a str,
}
