//! The HTTP surface of an ingest node: the form, the JSON API, health and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRef, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Router};
use axum_extra::extract::SignedCookieJar;
use axum_extra::extract::cookie::Key;
use chrono::{DateTime, Utc};
use landslide_nats::polls::PollWatch;
use landslide_schema::cookie::VoterCookie;
use landslide_schema::poll::{NotCounted, Window};
use landslide_schema::receipt::{Receipt, ReceiptKey};
use landslide_schema::{EventId, NodeId, Poll, PollBook, PollId, Timestamp, VoteEvent, VoterId};
use landslide_telemetry::openapi::{Document, ErrorBody};
use landslide_telemetry::serve::MetricsAt;
use serde::{Deserialize, Serialize};
use tower_http::trace::TraceLayer;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Config;
use crate::clock::ClockCheck;
use crate::publish::{Hlc, PublishFailed, Publisher};
use crate::voter::{self, VoterKeys};
use landslide_edge::Limiter;
use landslide_edge::client::{self, Client, ClientIpHeader};

/// The largest request body accepted: a vote is a few dozen bytes.
pub const MAX_BODY: usize = 4096;

/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: u32 = 2;

#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    node: NodeId,
    /// The poll definitions, current with the polls bucket: a vote is accepted by the latest
    /// revision and names it.
    polls: PollWatch,
    publisher: Publisher,
    hlc: Hlc,
    /// Whether `hlc`'s clock is close enough to the NATS server's to stamp votes.
    clock: Arc<ClockCheck>,
    keys: VoterKeys,
    receipts: ReceiptKey,
    /// How long a vote's body may take to arrive (`Limits::body_read_timeout`).
    body_read_timeout: Duration,
    /// Which voter cookie is read and written.
    cookies: voter::CookieRule,
    results_url: Option<String>,
    client: async_nats::Client,
    /// The per-client token bucket of the vote endpoints; `None`: no limit.
    limiter: Option<Arc<Limiter>>,
    /// Where the client's address is read from; `None`: the TCP peer.
    client_ip_header: Option<ClientIpHeader>,
}

impl AppState {
    pub fn new(
        config: &Config,
        polls: PollWatch,
        client: async_nats::Client,
        js: jetstream::Context,
        clock: Arc<ClockCheck>,
        limiter: Option<Arc<Limiter>>,
    ) -> Self {
        Self(Arc::new(Inner {
            node: config.node_id.clone(),
            polls,
            publisher: Publisher::new(client.clone(), js, config),
            hlc: Hlc::new(
                config.clock.clone(),
                config.max_clock_offset.max_stamp_ahead_ms(),
            ),
            clock,
            keys: VoterKeys::new(&config.keys.cookies, &config.keys.voter_ids),
            receipts: config.keys.receipts.clone(),
            body_read_timeout: config.http.body_read_timeout,
            cookies: voter::CookieRule {
                secure: config.secure_cookie,
                plain_until: config.plain_cookie_until,
            },
            results_url: config.results_url.clone(),
            client,
            limiter,
            client_ip_header: config.client_ip_header.clone(),
        }))
    }

    /// The client of a request from `peer`.
    fn client(&self, headers: &HeaderMap, peer: SocketAddr) -> Client {
        client::resolve(self.0.client_ip_header.as_ref(), headers, peer)
    }

    /// Takes a token from `client`'s bucket, or refuses the vote: it is not stored, and the
    /// voter may retry after the seconds it names.
    fn admit(&self, client: &Client) -> Result<(), VoteError> {
        match &self.0.limiter {
            None => Ok(()),
            Some(limiter) => limiter
                .check(client)
                .map_err(|retry_after| VoteError::RateLimited { retry_after }),
        }
    }

    /// A vote's body, of media type `expected`, once the refusals that need no body have passed
    /// (same site, then `client`'s rate limit): those come first, so that a request refused
    /// anyway is never waited for ([`body`]).
    async fn vote_body(
        &self,
        headers: &HeaderMap,
        client: &Client,
        expected: &'static str,
        raw: axum::body::Body,
    ) -> Result<Bytes, VoteError> {
        same_site(headers).and_then(|()| self.admit(client))?;
        body(headers, expected, raw, self.0.body_read_timeout).await
    }
}

impl FromRef<AppState> for Key {
    fn from_ref(state: &AppState) -> Key {
        state.0.keys.cookie.clone()
    }
}

/// Every route of the node, each registered with its entry in the OpenAPI document by the same
/// `routes!` call: a route cannot be served undocumented (`OpenApiRouter::route`, which would
/// allow it, is refused by clippy.toml).
fn api(metrics: MetricsAt) -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(form))
        .routes(routes!(vote_form))
        .routes(routes!(vote_api))
        .routes(routes!(readyz));
    landslide_telemetry::openapi::operations_routes(api, metrics)
}

/// The node's OpenAPI 3.1 document, generated from [`api`]: what `/api/openapi.json` serves.
pub fn openapi(metrics: MetricsAt) -> utoipa::openapi::OpenApi {
    describe(api(metrics).into_openapi())
}

/// A document of [`api`]'s routes, completed with what the annotations cannot say.
fn describe(document: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    landslide_telemetry::openapi::finish(
        document,
        "Landslide ingest",
        env!("CARGO_PKG_VERSION"),
        "An ingest node: the voting form and the JSON API. A vote is answered 2xx only once \
         JetStream has stored it on disk. Both vote endpoints share a per-client rate limit (429 \
         with Retry-After) and set the signed voter cookie.",
    )
}

/// The node's routes (`/metrics` among them only where `metrics` says) and the document that
/// describes exactly those.
pub fn router(state: AppState, metrics: MetricsAt) -> Router {
    let (router, document) = api(metrics).split_for_parts();
    let https = state.0.cookies.secure;
    let router = router
        .layer(Extension(Document::new(&describe(document))))
        // We buffer bodies ourselves up to MAX_BODY; a larger one is refused with 413.
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state);
    landslide_telemetry::serve::security_headers(router, https)
        .layer(TraceLayer::new_for_http().make_span_with(landslide_telemetry::request_span))
}

/// Why a vote was refused. Each maps to one status and a message meant for the voter.
#[derive(Debug, thiserror::Error)]
enum VoteError {
    #[error("expected Content-Type {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("the request body is larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The body did not arrive within `Limits::body_read_timeout` of the headers; the
    /// connection is closed.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A browser sent it from another site's page: a hostile page voting in its visitors' name.
    #[error("votes sent from another site's page are refused")]
    CrossSite,
    /// An `Idempotency-Key` of an earlier vote that a later vote of the voter replaced.
    #[error(
        "this Idempotency-Key was used for an earlier vote, which a later vote of yours \
         replaced; send a new key to vote again"
    )]
    KeyReplaced,
    /// The request carries two voter cookies of one name ([`voter::Conflict`]).
    #[error(
        "your browser sent two voter cookies for this site, and another site may have set one; \
         your vote was not taken, so that nobody else's cookie can take it. Clear this site's \
         cookies before you vote again"
    )]
    CookieConflict,
    /// Beyond this client address's token bucket. Said so that a voter behind a shared address
    /// (a carrier's NAT, an office) knows it is not their own doing and that a retry will do.
    #[error(
        "too many votes are coming from your network right now; your vote was not counted, \
         please try again in {retry_after} s"
    )]
    RateLimited { retry_after: u64 },
    /// The rule the workers and audit apply too: ingest never accepts what they would refuse.
    #[error(transparent)]
    NotCounted(#[from] NotCounted),
    /// This node's clock is off from the NATS server's (or not compared yet): a vote stamped
    /// with it might never count. The details are for `/readyz` and the log, not the voter.
    #[error("this node cannot take votes right now; please try again in a moment")]
    ClockOff,
    /// This node could not confirm for a while that it holds the latest poll definitions (the
    /// polls bucket cannot be read): a vote stamped with an older revision might never count.
    /// `/readyz` says so.
    #[error("this node cannot take votes right now; please try again in a moment")]
    PollsUnconfirmed,
    /// Stored, but the time the stream stored it (which decides whether it is inside the poll's
    /// window) could not be read: no proof that it counts, so no 2xx.
    #[error("your vote could not be confirmed right now; please try again in a moment")]
    Unconfirmed,
    #[error("your vote could not be stored right now; please try again in a moment")]
    Unavailable(#[source] PublishFailed),
}

impl VoteError {
    fn status(&self) -> StatusCode {
        match self {
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::CrossSite => StatusCode::FORBIDDEN,
            Self::CookieConflict | Self::KeyReplaced => StatusCode::CONFLICT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotCounted(NotCounted::NotOpenYet { .. } | NotCounted::Closed { .. }) => {
                StatusCode::FORBIDDEN
            }
            Self::NotCounted(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) | Self::Unconfirmed | Self::ClockOff | Self::PollsUnconfirmed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::UnsupportedMediaType { .. } => "content_type",
            Self::TooLarge => "too_large",
            Self::BodyTimeout => "body_timeout",
            Self::Malformed(_) => "malformed",
            Self::CrossSite => "cross_site",
            Self::CookieConflict => "cookie_conflict",
            Self::KeyReplaced => "key_replaced",
            Self::NotCounted(not_counted) => not_counted.label(),
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(PublishFailed::Deadline(_)) => "deadline",
            Self::Unavailable(_) | Self::Unconfirmed => "unavailable",
            Self::ClockOff => "clock_off",
            Self::PollsUnconfirmed => "polls_unconfirmed",
        }
    }

    /// Counts the refusal and adds `Retry-After` where a retry will help.
    fn finish(&self, mut response: Response) -> Response {
        metrics::counter!("landslide_votes_rejected_total", "reason" => self.reason()).increment(1);
        if let Self::Unavailable(cause) = self {
            // The cause is ours, not the voter's: log it here, once, and keep it out of the body.
            tracing::warn!(error = %cause, "vote refused: not stored");
        }
        let retry_after = match self {
            Self::Unavailable(_) | Self::Unconfirmed | Self::ClockOff | Self::PollsUnconfirmed => {
                Some(u64::from(RETRY_AFTER_SECS))
            }
            Self::RateLimited { retry_after } => {
                // Its own counter as well, the one to alert on: every refused vote is in
                // landslide_votes_rejected_total, by reason.
                metrics::counter!("landslide_ingest_rate_limited_total").increment(1);
                Some(*retry_after)
            }
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The rest of a body that did not arrive in time is not waited for: the connection ends.
        if matches!(self, Self::BodyTimeout) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Refuses a vote that a browser sent from another site's page. Browsers say where a request comes
/// from: `Sec-Fetch-Site` (every current browser), and `Origin` on every POST. A request that is
/// `cross-site`, or whose `Origin` names another host than the one it was sent to, is refused; a
/// request with neither header (curl, a server, a phone app) is not a browser's and passes. The
/// voter cookie's `SameSite=Lax` alone does not help: without the cookie the hostile page's vote
/// is a new voter whose cookie replaces the real one.
fn same_site(headers: &HeaderMap) -> Result<(), VoteError> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if header("sec-fetch-site") == Some("cross-site") {
        return Err(VoteError::CrossSite);
    }
    if let Some(origin) = header("origin") {
        // `null` (a sandboxed frame, a file) is no site of ours either.
        let from = origin.split_once("://").map(|(_, authority)| authority);
        if from.is_none() || from != header("host") {
            return Err(VoteError::CrossSite);
        }
    }
    Ok(())
}

/// Checks the media type, then reads the body whole within `timeout`, in that order, so 415 wins
/// over 413. [`AppState::vote_body`] calls it after the refusals that need no body (same site,
/// rate limit): the body was once read before them, and before any deadline but the header's,
/// so a connection that sent its headers and then no byte stayed open for good.
async fn body(
    headers: &HeaderMap,
    expected: &'static str,
    body: axum::body::Body,
    timeout: Duration,
) -> Result<Bytes, VoteError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some(expected) {
        return Err(VoteError::UnsupportedMediaType { expected });
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Err(_) => Err(VoteError::BodyTimeout),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(err)) => {
            let err = err.into_inner();
            if err.is::<http_body_util::LengthLimitError>() {
                Err(VoteError::TooLarge)
            } else {
                Err(VoteError::Malformed(format!("cannot read the body: {err}")))
            }
        }
    }
}

/// A vote that JetStream stored.
struct Accepted {
    event_id: EventId,
    ts: Timestamp,
    duplicate: bool,
    receipt: Receipt,
}

impl AppState {
    /// The poll definitions as of now.
    fn book(&self) -> Arc<PollBook> {
        self.0.polls.current()
    }

    /// Validates, stamps and stores one vote; returns the jar with the updated voter cookie.
    ///
    /// The cookie is written even when the vote was not stored: its voter id makes a retry the
    /// same voter, and its raised floor makes the retry win over a copy of this attempt that
    /// JetStream may have stored after all (a timeout is ambiguous).
    async fn cast(
        &self,
        jar: SignedCookieJar,
        known: Option<VoterCookie>,
        poll: &str,
        choice: &str,
        idempotency_key: Option<&str>,
        client: Client,
    ) -> (SignedCookieJar, Result<Accepted, VoteError>) {
        let (book, confirmed) = self.0.polls.confirmed();
        let (revision, polls) = book.latest();
        let (poll, choice) = match polls.judge(poll, choice) {
            Ok(judged) => judged,
            Err(err) => return (jar, Err(err.into())),
        };
        // Before anything reads the clock: a clock off from the stream's would judge the window
        // wrongly and stamp a vote that might never count. `/readyz` and the log say why.
        if !self.0.clock.verdict().is_within() {
            return (jar, Err(VoteError::ClockOff));
        }
        // A revision this node has not read may have ended the life of the one it would stamp
        // (`landslide_schema::poll::REVISION_OVERLAP`): the vote might never count.
        if landslide_nats::polls::unconfirmed(confirmed).is_some() {
            return (jar, Err(VoteError::PollsUnconfirmed));
        }
        // Outside the window by this node's clock: refused before anything is stored. Inside it,
        // the stream's clock has the last word (below).
        if let Err(err) = book.judge_time(revision, poll, self.now()) {
            return (jar, Err(err.into()));
        }
        let floor = known.as_ref().map(|c| c.last_ts);
        let voter = match (&known, idempotency_key) {
            (Some(cookie), _) => cookie.voter,
            (None, Some(key)) => self.0.keys.voter_for_key(key, client),
            (None, None) => VoterId::new_random(),
        };
        let event_id = match idempotency_key {
            Some(key) => self.0.keys.event_for_key(voter, &poll.id, &choice, key),
            None => EventId::new_random(),
        };
        let stamped = self.0.hlc.stamp(floor);
        let mut cookie = known.unwrap_or_else(|| VoterCookie::new(voter));
        if stamped.floor_refused {
            // Only a node whose clock ran far ahead can have set such a floor, and the workers
            // dead-letter its votes: this vote is stamped as the voter's first, and the cookie
            // forgets the floor so that the voter's next vote follows this one.
            metrics::counter!("landslide_cookie_floors_refused_total").increment(1);
            tracing::warn!(
                vote.poll = %poll.id,
                cookie.last_ts = cookie.last_ts.0,
                vote.ts = stamped.ts.0,
                "a voter cookie's floor lies too far ahead of this node's clock; stamped by the \
                 clock instead"
            );
            cookie.last_ts = Timestamp(0);
        }
        // What this vote knew, which orders it first among its voter's votes
        // (`landslide_schema::merge`): the stamp of the voter's last answered vote. A floor
        // that was refused came from a node far ahead, whose votes are dead letters: this vote
        // then follows every honest vote stamped before its own stamp.
        let after = match floor {
            Some(_) if stamped.floor_refused => Timestamp(stamped.ts.0.saturating_sub(1)),
            Some(floor) => floor,
            None => Timestamp(0),
        };
        let event = VoteEvent {
            event_id,
            poll: poll.id.clone(),
            voter,
            choice: choice.clone(),
            ts: stamped.ts,
            node: self.0.node.clone(),
            rev: Some(revision),
            after: Some(after),
            rev_hash: book.hash(revision),
        };
        let published = self
            .0
            .publisher
            .publish(&event, idempotency_key.is_some())
            .await;
        let result = match published {
            Err(err) => Err(VoteError::Unavailable(err)),
            // Stored so late that a revision this node never read may have ended the life of
            // the one it stamped before the stream stored the vote: no proof that it counts.
            Ok(_) if !landslide_nats::polls::covers(confirmed, std::time::Instant::now()) => {
                tracing::warn!(
                    vote.event_id = %event_id,
                    "a vote was stored too long after this node last confirmed its poll \
                     definitions; answered 503, the voter retries"
                );
                Err(VoteError::Unconfirmed)
            }
            Ok(stored) => {
                let windowed = poll.opens_at.is_some() || poll.closes_at.is_some();
                // The stored copy, read back once when it tells what this node cannot: when the
                // stream stored the vote (a poll with a window counts it by that), and the stamp
                // it kept (a duplicate's is the first copy's).
                let copy = if windowed || stored.duplicate {
                    self.stored(stored.sequence).await
                } else {
                    None
                };
                // Answer 2xx only for a vote that counts. One that landed outside the window
                // stays in the stream, not counted, like any vote the voter was refused.
                let counts = match (windowed, copy.as_ref().map(stored_at)) {
                    (false, _) => Ok(()),
                    (true, Some(Some(at))) => {
                        book.judge_time(revision, poll, at).map_err(VoteError::from)
                    }
                    (true, _) => Err(VoteError::Unconfirmed),
                };
                let kept = copy.and_then(|m| VoteEvent::decode(&m.payload).ok());
                let ts = match &kept {
                    Some(kept) if stored.duplicate => kept.ts,
                    _ => event.ts,
                };
                // A retry of a vote that a later answered vote of the voter replaced: the
                // cookie's choice is another, made by an answered vote stamped after the stored
                // copy. Answering `duplicate` would say the ballot is this choice when it is not.
                // Only answered votes set the cookie's choice: a retry after lost or ambiguous
                // answers (whose stamps raised the floor, not the choice) is the same vote.
                let replaced = stored.duplicate
                    && cookie.choices.get(&poll.id).is_some_and(|current| {
                        *current != choice
                            && cookie.answered.get(&poll.id).is_some_and(|at| *at > ts)
                    });
                let counts = counts.and(if replaced {
                    Err(VoteError::KeyReplaced)
                } else {
                    Ok(())
                });
                counts.map(|()| Accepted {
                    event_id,
                    ts,
                    duplicate: stored.duplicate,
                    receipt: Receipt {
                        poll: poll.id.clone(),
                        voter,
                        event_id,
                        ts,
                    },
                })
            }
        };
        match &result {
            Ok(accepted) => {
                // The floor also covers our own stamp: it is above anything stored so far.
                cookie.record(poll.id.clone(), choice, accepted.ts.max(event.ts));
                metrics::counter!("landslide_votes_accepted_total").increment(1);
            }
            Err(_) => cookie.last_ts = cookie.last_ts.max(event.ts),
        }
        (voter::write(jar, &cookie, self.0.cookies.secure), result)
    }

    /// This node's clock, as a moment.
    fn now(&self) -> DateTime<Utc> {
        let ms = i64::try_from(self.0.hlc.now_ms()).unwrap_or(i64::MAX);
        DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Message `sequence` of the votes stream as stored, if it can be read: from any replica
    /// (a direct get, which the nearest answers), else from the stream's leader. Found by trying
    /// it on three replicas: a follower answers the direct get before it has applied a vote the
    /// leader has acked, and 10 of 200 stored votes of a windowed poll were answered `503`. The
    /// leader has applied every vote it acked.
    async fn stored(&self, sequence: u64) -> Option<StreamMessage> {
        let publisher = &self.0.publisher;
        let stream = publisher
            .jetstream()
            .get_stream_no_info(publisher.stream_name())
            .await
            .ok()?;
        match stream.direct_get(sequence).await {
            Ok(message) => Some(message),
            Err(_) => {
                metrics::counter!("landslide_ingest_read_back_from_leader_total").increment(1);
                stream.get_raw_message(sequence).await.ok()
            }
        }
    }
}

/// When the stream stored a message, by its own clock.
fn stored_at(message: &StreamMessage) -> Option<DateTime<Utc>> {
    let nanos = i64::try_from(message.time.unix_timestamp_nanos()).ok()?;
    Some(DateTime::from_timestamp_nanos(nanos))
}

/// A vote, as `POST /api/votes` takes it.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"poll": "pets", "choice": "cats"}))]
struct ApiVote {
    /// The poll's id; an unknown one is refused with 422.
    poll: String,
    /// The option's id; an unknown one is refused with 422.
    choice: String,
}

/// The answer to an accepted vote.
#[derive(Serialize, ToSchema)]
struct ApiAccepted {
    event_id: EventId,
    /// The vote's stamp; for a retry with the same `Idempotency-Key`, the stored copy's.
    ts: Timestamp,
    /// This was a retry of a vote already stored (same `Idempotency-Key`).
    duplicate: bool,
    /// What the voter keeps to check later what became of this vote (`GET /api/receipts/…`
    /// at tally).
    #[schema(value_type = landslide_schema::receipt::Receipt)]
    receipt: String,
}

/// `POST /api/votes`: `{"poll":"pets","choice":"cats"}` → 202 `{"event_id":…,"ts":…}`.
#[utoipa::path(
    post,
    path = "/api/votes",
    tag = "votes",
    description = "Casts a vote. Answered 202 only once JetStream has stored it on disk. \
        With a valid voter cookie the vote is that voter's (their latest vote counts); without \
        one it is a new voter's, or, with an `Idempotency-Key`, the voter of that key and this \
        client address.",
    params(
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]+$", min_length = 16,
            max_length = 255,
            description = "Makes a retry the same vote (16 to 255 visible ASCII characters: a \
                random value such as a UUID)."),
        ("landslide_voter" = Option<String>, Cookie,
            description = "The signed voter cookie of an earlier answer; a forged or tampered \
                one is ignored (a new voter)."),
    ),
    request_body(content = ApiVote, content_type = "application/json"),
    responses(
        (status = 202, description = "Accepted: stored on disk", body = ApiAccepted,
            headers(("Set-Cookie" = String, description = "The signed voter cookie"))),
        (status = 400, description = "Malformed body, or an invalid Idempotency-Key", body = ErrorBody),
        (status = 403, description = "Sent from another site's page (`Sec-Fetch-Site: \
            cross-site`, or an `Origin` other than this host), or the poll is not open",
            body = ErrorBody,
            headers(("Set-Cookie" = String, description = "Set when the poll is not open"))),
        (status = 413, description = "Body larger than 4 KiB", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time; the connection is \
            closed", body = ErrorBody),
        (status = 409, description = "Two voter cookies (another site planted one), or an \
            Idempotency-Key of an earlier vote that a later vote replaced; not taken",
            body = ErrorBody),
        (status = 422, description = "Unknown poll or option", body = ErrorBody),
        (status = 429, description = "Beyond this client address's rate limit; not stored",
            body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "Not stored durably (broker down, no quorum, stream \
            full), this node's clock is off from the broker's, or this node cannot confirm \
            that it holds the latest poll definitions: retry",
            body = ErrorBody,
            headers(
                ("Retry-After" = u64, description = "Seconds to wait before retrying"),
                ("Set-Cookie" = String, description = "The voter cookie, its floor raised, \
                    so that the retry beats this attempt"),
            )),
    )
)]
async fn vote_api(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: SignedCookieJar,
    headers: HeaderMap,
    raw: axum::body::Body,
) -> Response {
    let (jar, known) = state.0.keys.voter(jar, &headers, state.0.cookies);
    let json_error = |err: VoteError, jar: Option<SignedCookieJar>| {
        let body = axum::Json(ErrorBody::new(err.to_string()));
        let response = (err.status(), jar, body).into_response();
        err.finish(response)
    };
    let client = state.client(&headers, peer);
    let read = state
        .vote_body(&headers, &client, "application/json", raw)
        .await;
    let vote: ApiVote = match read.and_then(|bytes| {
        serde_json::from_slice(&bytes).map_err(|e| VoteError::Malformed(e.to_string()))
    }) {
        Ok(vote) => vote,
        Err(err) => return json_error(err, None),
    };
    let Ok(known) = known else {
        return json_error(VoteError::CookieConflict, None);
    };
    let key = match headers.get("idempotency-key").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(key)) => match voter::check_idempotency_key(key) {
            Ok(()) => Some(key),
            Err(message) => return json_error(VoteError::Malformed(message), None),
        },
        Some(Err(_)) => {
            let message = "Idempotency-Key must be visible ASCII".to_owned();
            return json_error(VoteError::Malformed(message), None);
        }
    };
    let (jar, result) = state
        .cast(jar, known, &vote.poll, &vote.choice, key, client)
        .await;
    match result {
        Ok(accepted) => (
            StatusCode::ACCEPTED,
            jar,
            axum::Json(ApiAccepted {
                event_id: accepted.event_id,
                ts: accepted.ts,
                duplicate: accepted.duplicate,
                receipt: state.0.receipts.issue(&accepted.receipt),
            }),
        )
            .into_response(),
        Err(err) => json_error(err, Some(jar)),
    }
}

/// A vote, as the form sends it.
#[derive(Deserialize, ToSchema)]
struct FormVote {
    /// The option's id.
    vote: String,
    /// The poll's id; the default poll when absent.
    poll: Option<String>,
}

/// `POST /vote`: the form's `vote=<option>` (and `poll=<id>`) → 303 back to the form.
#[utoipa::path(
    post,
    path = "/vote",
    tag = "votes",
    description = "The voting form's button: casts a vote and redirects back to the form, \
        which shows the receipt. Refusals are the form page again, with the message.",
    params(
        ("landslide_voter" = Option<String>, Cookie,
            description = "The signed voter cookie of an earlier answer."),
    ),
    request_body(content = FormVote, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Stored on disk; back to the form, with the receipt",
            headers(
                ("Location" = String, description = "`/` (or `/?poll=…`)"),
                ("Set-Cookie" = String, description = "The signed voter cookie, and the \
                    receipt's, which the form reads once"),
            )),
        (status = 400, description = "Malformed body", body = String, content_type = "text/html"),
        (status = 403, description = "Sent from another site's page, or the poll is not open",
            body = String, content_type = "text/html"),
        (status = 413, description = "Body larger than 4 KiB", body = String,
            content_type = "text/html"),
        (status = 415, description = "Content-Type is not application/x-www-form-urlencoded",
            body = String, content_type = "text/html"),
        (status = 408, description = "The body did not arrive in time; the connection is \
            closed", body = String, content_type = "text/html"),
        (status = 409, description = "Two voter cookies (another site planted one): not \
            taken", body = String, content_type = "text/html"),
        (status = 422, description = "Unknown poll or option", body = String,
            content_type = "text/html"),
        (status = 429, description = "Beyond this client address's rate limit; not stored",
            body = String, content_type = "text/html",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))),
        (status = 503, description = "Not stored durably, this node's clock is off, or its \
            poll definitions are not confirmed current: retry",
            body = String, content_type = "text/html",
            headers(
                ("Retry-After" = u64, description = "Seconds to wait before retrying"),
                ("Set-Cookie" = String, description = "The voter cookie, its floor raised"),
            )),
    )
)]
async fn vote_form(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    jar: SignedCookieJar,
    headers: HeaderMap,
    raw: axum::body::Body,
) -> Response {
    let (jar, known) = state.0.keys.voter(jar, &headers, state.0.cookies);
    let default = state.book().latest().1.default_poll().id.clone();
    let client = state.client(&headers, peer);
    let read = state
        .vote_body(&headers, &client, "application/x-www-form-urlencoded", raw)
        .await;
    let vote: FormVote = match read.and_then(|bytes| parse_form(&bytes)) {
        Ok(vote) => vote,
        Err(err) => return state.form_error(jar, None, &default, err),
    };
    let Ok(known) = known else {
        return state.form_error(jar, None, &default, VoteError::CookieConflict);
    };
    let poll = vote.poll.unwrap_or_else(|| default.to_string());
    let (jar, result) = state
        .cast(jar, known.clone(), &poll, &vote.vote, None, client)
        .await;
    match result {
        // The receipt travels to the confirmation in a cookie read once, never in its address,
        // which access logs keep (`voter::RECEIPT_COOKIE_NAME`).
        Ok(accepted) => {
            let jar = voter::write_receipt(
                jar,
                state.0.receipts.issue(&accepted.receipt),
                state.0.cookies.secure,
            );
            let to = if poll == default.as_str() {
                "/".to_owned()
            } else {
                format!("/?poll={poll}")
            };
            (jar, Redirect::to(&to)).into_response()
        }
        Err(err) => {
            let book = state.book();
            let shown = PollId::parse(poll)
                .ok()
                .filter(|p| book.latest().1.get(p.as_str()).is_some());
            state.form_error(jar, known.as_ref(), &shown.unwrap_or(default), err)
        }
    }
}

fn parse_form(bytes: &[u8]) -> Result<FormVote, VoteError> {
    serde_urlencoded::from_bytes(bytes).map_err(|e| VoteError::Malformed(e.to_string()))
}

#[derive(Template)]
#[template(path = "vote.html")]
struct VotePage<'a> {
    question: &'a str,
    poll: &'a str,
    options: &'a [landslide_schema::PollOption],
    current: Option<String>,
    current_label: Option<&'a str>,
    error: Option<String>,
    node: &'a str,
    /// Why the poll takes no votes now, if it does not: the buttons are left out.
    closed: Option<String>,
    results_url: Option<&'a str>,
    receipt: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FormQuery {
    /// The poll to show; the default poll when absent.
    poll: Option<String>,
    /// The receipt of the vote just cast, shown as its confirmation.
    receipt: Option<String>,
}

impl FormQuery {
    /// The first `poll` and `receipt` of a query string. Never fails: an address that repeats
    /// a field, or holds fields of no meaning here, still shows a form.
    fn read(query: Option<&str>) -> Self {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or_default()).unwrap_or_default();
        let first = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        };
        Self {
            poll: first("poll"),
            receipt: first("receipt"),
        }
    }
}

impl AppState {
    fn page(
        &self,
        known: Option<&VoterCookie>,
        poll: &Poll,
        error: Option<String>,
        receipt: Option<&Receipt>,
    ) -> Html<String> {
        let current = known.and_then(|c| c.choices.get(&poll.id).map(|choice| choice.to_string()));
        let current_label = current
            .as_deref()
            .and_then(|id| poll.options.iter().find(|o| o.id.as_str() == id))
            .map(|o| o.label.as_str());
        let book = self.book();
        let closed = match book.window_under(book.latest().0, poll, self.now()) {
            Window::Open => None,
            Window::NotOpenYet => Some(format!(
                "This poll is not open yet. It opens at {}.",
                poll.opens_at.map(|t| t.to_rfc2822()).unwrap_or_default()
            )),
            Window::Closed => Some(format!(
                "This poll is closed. It closed at {}.",
                poll.closes_at.map(|t| t.to_rfc2822()).unwrap_or_default()
            )),
        };
        let page = VotePage {
            question: &poll.question,
            poll: poll.id.as_str(),
            options: &poll.options,
            current,
            current_label,
            error,
            node: self.0.node.as_str(),
            closed,
            results_url: self.0.results_url.as_deref(),
            receipt: receipt
                .filter(|r| r.poll == poll.id)
                .map(|r| self.0.receipts.issue(r)),
        };
        // The template is checked at compile time and only formats strings: rendering cannot fail
        // short of running out of memory.
        Html(
            page.render()
                .unwrap_or_else(|e| format!("template error: {e}")),
        )
    }

    fn form_error(
        &self,
        jar: SignedCookieJar,
        known: Option<&VoterCookie>,
        poll: &PollId,
        err: VoteError,
    ) -> Response {
        let book = self.book();
        let polls = book.latest().1;
        let poll = polls
            .get(poll.as_str())
            .unwrap_or_else(|| polls.default_poll());
        let page = self.page(known, poll, Some(err.to_string()), None);
        let response = (err.status(), jar, page).into_response();
        err.finish(response)
    }
}

/// `GET /`: the form for the default poll (or `?poll=<id>`), showing the voter's current choice.
#[utoipa::path(
    get,
    path = "/",
    tag = "pages",
    description = "The voting form of the default poll, or of `poll`, showing the voter's \
        current choice.",
    params(
        FormQuery,
        ("landslide_voter" = Option<String>, Cookie,
            description = "The signed voter cookie: the form shows the current choice."),
    ),
    responses(
        (status = 200, description = "The form. A voter cookie that only a previous key \
            (LANDSLIDE_SECRET_PREVIOUS) verifies comes back in Set-Cookie, signed with the \
            current key; otherwise no cookie is set.", body = String, content_type = "text/html"),
        (status = 422, description = "Unknown poll: the default poll's form, with the message",
            body = String, content_type = "text/html"),
    )
)]
async fn form(
    State(state): State<AppState>,
    jar: SignedCookieJar,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (jar, known) = state.0.keys.voter(jar, &headers, state.0.cookies);
    // Two voter cookies: the form shows no current choice (a vote would be refused, and says why).
    let known = known.ok().flatten();
    let query = FormQuery::read(query.as_deref());
    let book = state.book();
    let polls = book.latest().1;
    let poll = match query.poll.as_deref() {
        None => polls.default_poll(),
        Some(id) => match polls.get(id) {
            Some(poll) => poll,
            None => {
                let err = NotCounted::UnknownPoll(id.to_owned()).into();
                return state.form_error(jar, known.as_ref(), &polls.default_poll().id, err);
            }
        },
    };
    // The receipt of the vote just cast through the form, from its cookie (or, as links of
    // earlier releases have it, the address). Only a receipt this site issued, of this poll, is
    // shown.
    let (jar, flashed) = voter::take_receipt(jar, state.0.cookies.secure);
    let receipt = query
        .receipt
        .or(flashed)
        .as_deref()
        .and_then(|r| state.0.receipts.open(r).ok());
    // The jar goes back too: a cookie of a previous key comes back signed with the current one.
    let page = state.page(known.as_ref(), poll, None, receipt.as_ref());
    (jar, page).into_response()
}

/// `GET /readyz`: NATS connected, this node's clock within its bound of the NATS server's, the
/// poll definitions confirmed current, and the votes stream present.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    description = "Ready to take votes: NATS connected, this node's clock within its bound of \
        the broker's, the poll definitions confirmed current within 5 s, the votes stream \
        present.",
    responses(
        (status = 200, description = "Ready", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready, and why (with the clock's offset and bound)",
            body = String, content_type = "text/plain"),
    )
)]
async fn readyz(State(state): State<AppState>) -> Response {
    use async_nats::connection::State as Conn;
    if state.0.client.connection_state() != Conn::Connected {
        return (StatusCode::SERVICE_UNAVAILABLE, "NATS not connected\n").into_response();
    }
    let clock = state.0.clock.verdict();
    if !clock.is_within() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{clock}\n")).into_response();
    }
    let (_, confirmed) = state.0.polls.confirmed();
    if let Some(stale) = landslide_nats::polls::unconfirmed(confirmed) {
        let why = format!("{stale} (the polls bucket cannot be read); votes wait until they are\n");
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    let publisher = &state.0.publisher;
    let lookup = publisher.jetstream().get_stream(publisher.stream_name());
    match tokio::time::timeout(Duration::from_secs(1), lookup).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(err)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("votes stream unavailable: {err}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "JetStream did not answer\n",
        )
            .into_response(),
    }
}
