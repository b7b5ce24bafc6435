//! What the OpenAPI documents of ingest and tally share: the error body, the operations both
//! serve (`/healthz`, `/metrics`, `/api/openapi.json`), and [`finish`], which gives a document
//! what utoipa's annotations cannot say.
//!
//! Each role generates its own document from its router (`utoipa_axum::router::OpenApiRouter`,
//! one `routes!` per path, so a route and its entry are registered by the same call) and serves
//! it at `/api/openapi.json`: ingest and tally are different hosts behind different names, so
//! one combined document would describe, on each, operations it does not serve.

use axum::Extension;
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa::openapi::response::Response as DocumentedResponse;
use utoipa::openapi::{Info, OpenApi, RefOr};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::serve::MetricsAt;

/// The body of every JSON error of ingest and tally: a message meant for the person reading it,
/// stable enough to show, never an internal cause.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
        }
    }
}

/// The response headers a client can rely on whenever a response documents them: every
/// `Retry-After` (only `429` and `503` answers document it, and each of those sets it), and the
/// `Location` of a redirect. utoipa's header annotation has no `required`, so [`finish`] sets it;
/// schemathesis' `response_headers_conformance` then fails an answer that leaves one out.
const ALWAYS_SENT: [&str; 2] = ["Retry-After", "Location"];

/// Completes a generated document: its title, version and description, and `required: true` on
/// the headers that are always sent ([`ALWAYS_SENT`], and `Set-Cookie` on a `2xx` or `3xx` that
/// documents it: the vote endpoints set the voter cookie on every success).
pub fn finish(mut document: OpenApi, title: &str, version: &str, description: &str) -> OpenApi {
    let mut info = Info::new(title, version);
    info.description = Some(description.to_owned());
    document.info = info;
    for item in document.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            require_headers(&mut operation.responses.responses);
        }
    }
    document
}

fn require_headers(responses: &mut BTreeMap<String, RefOr<DocumentedResponse>>) {
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let success = status.starts_with('2') || status.starts_with('3');
        for (name, header) in &mut response.headers {
            let RefOr::T(header) = header else {
                continue;
            };
            if ALWAYS_SENT.contains(&name.as_str()) || (success && name == "Set-Cookie") {
                // The Header Object's `required` field (OpenAPI 3.1, 4.8.21), which utoipa 6's
                // `Header` lacks; its extensions are serialized flat into the object, so this
                // writes exactly `"required": true`.
                header
                    .extensions
                    .get_or_insert_with(Default::default)
                    .insert("required".to_owned(), serde_json::Value::Bool(true));
            }
        }
    }
}

/// `GET /healthz` of ingest and tally, and of every operations listener
/// ([`crate::serve::operations`]).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    description = "The process is alive.",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")),
)]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `api` with the operations both roles serve beside their pages, each registered with its
/// entry: `/healthz`, `/api/openapi.json`, and `/metrics` unless the operations listener serves it.
pub fn operations_routes<S>(api: OpenApiRouter<S>, metrics: MetricsAt) -> OpenApiRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    let api = api.routes(routes!(healthz)).routes(routes!(openapi_json));
    match metrics {
        MetricsAt::Public => api.routes(routes!(self::metrics)),
        MetricsAt::Operations => api,
    }
}

/// A role's OpenAPI document, rendered once, as `/api/openapi.json` serves it (a clone is a
/// reference count).
#[derive(Debug, Clone)]
pub struct Document(Bytes);

impl Document {
    /// `document`, rendered as JSON.
    pub fn new(document: &OpenApi) -> Self {
        Self(Bytes::from(document.to_json().unwrap_or_default()))
    }
}

/// `GET /api/openapi.json` of ingest and tally: the [`Document`] that the router carries as an
/// extension, so that each role serves the document of the routes it was built with.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    description = "This document: the role's OpenAPI 3.1 document, generated from its code.",
    responses(
        (status = 200, description = "The OpenAPI document", body = Object,
            content_type = "application/json"),
    )
)]
pub async fn openapi_json(
    Extension(Document(document)): Extension<Document>,
) -> axum::response::Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// `GET /metrics` of ingest and tally, where it is served with their pages ([`MetricsAt::Public`](crate::serve::MetricsAt::Public)).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    description = "Prometheus metrics of this process, in the Prometheus text format.",
    responses(
        (status = 200, description = "The metrics", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
    )
)]
pub async fn metrics() -> impl IntoResponse {
    crate::metrics_handler().await
}
