//! The HTTP server of ingest and tally: axum's router on hyper's HTTP/1.1, with the limits a
//! server facing the internet needs and `axum::serve` does not set. Found by trying it: 2,000
//! connections that sent half a request line and headers stayed open forever, each holding a
//! file descriptor and a task.
//!
//! - **Header read timeout:** a connection that has not sent a whole request head within
//!   [`Limits::header_read_timeout`] is closed (a slow-loris client, a half-open phone).
//! - **Connection cap:** at most [`Limits::max_connections`] at once; beyond it new connections
//!   wait in the kernel's accept queue instead of taking descriptors the process may not have.
//! - **Graceful shutdown:** when `shutdown` completes, no new connection is accepted, every request
//!   in flight is answered, idle keep-alive connections are closed, and then `serve` returns;
//!   after [`Limits::drain_timeout`] whatever is still open is closed. Found by trying it: one
//!   connection that had sent its headers and no body kept `landslide up` from stopping for as
//!   long as the client liked.
//! - **The peer address:** every request carries its connection's TCP peer address as
//!   [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo), as `axum::serve` does with
//!   `into_make_service_with_connect_info`, so a handler may extract it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use landslide_patience::Backoff;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Layer as _;

/// The limits of one HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client may take to send a request's line and headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's whole body, once its headers are in (the
    /// handlers that read a body apply it: ingest's vote endpoints).
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long a shutdown waits for requests in flight and connections to close before it
    /// closes what is left: a client that sent its headers and then nothing would otherwise
    /// hold the process up for as long as it likes.
    pub drain_timeout: Duration,
}

impl Limits {
    /// 10 s for the headers and 10 s for a body (at most 4 KiB), which a phone on a poor network
    /// sends in well under one; 50,000 connections, within the 262,144 (ingest) and 65,536
    /// (tally) descriptors the units allow; 10 s to drain, within systemd's 90 s stop timeout
    /// and Compose's 10 s grace beside the publish retries (about 6 s).
    pub const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(10),
        max_connections: 50_000,
        drain_timeout: Duration::from_secs(10),
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains (see the module).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    // Turns true when the drain has taken too long: every connection still open closes.
    let (force, forced) = tokio::sync::watch::channel(false);
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut accept_failed = Backoff::constant(Duration::from_millis(50));
    loop {
        let place = tokio::select! {
            () = &mut shutdown => break,
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, or a connection reset before it was accepted: wait a
                    // moment rather than spin, and go on.
                    tracing::warn!(error = %err, "cannot accept a connection");
                    accept_failed.pause().await;
                    continue;
                }
            },
        };
        // The extension layer wraps the router as it is (a clone is a reference count), unlike
        // `Router::layer`, which would rebuild every route for each connection.
        let app = axum::Extension(ConnectInfo::<SocketAddr>(peer)).layer(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
        let connection = graceful.watch(connection);
        let mut forced = forced.clone();
        tokio::spawn(async move {
            let _place = place;
            tokio::select! {
                ended = connection => if let Err(err) = ended {
                    tracing::debug!(error = %err, "connection ended with an error");
                },
                // Dropping the connection closes its socket.
                _ = forced.wait_for(|forced| *forced) => {}
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout_ms = limits.drain_timeout.as_millis(),
            "connections still open after the drain timeout are closed"
        );
        let _ = force.send(true);
    }
    Ok(())
}

/// Where a role serves `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsAt {
    /// With its pages, on the listener the voters reach (the design's interface, and the default
    /// of a role run as a library).
    #[default]
    Public,
    /// Only on an operations listener of its own ([`serve_operations`]), which only the scraper
    /// reaches: what faces the internet answers `/metrics` with 404. Every deployment, `up` and
    /// the tests run the roles so (`LANDSLIDE_METRICS_LISTEN`).
    Operations,
}

/// The limits of an operations listener: a scraper and a health check, not a crowd.
const OPERATIONS_LIMITS: Limits = Limits {
    header_read_timeout: Duration::from_secs(10),
    body_read_timeout: Duration::from_secs(10),
    max_connections: 64,
    drain_timeout: Duration::from_secs(5),
};

/// `router` with the headers every public page and answer carries, each unless the handler set
/// it: no other site may frame a page (`Content-Security-Policy: frame-ancestors 'none'`, and
/// `X-Frame-Options: DENY` for browsers that predate it), since a framed form's button press is a
/// same-origin vote the same-site check cannot refuse; no address leaves for another site in a
/// `Referer` (`Referrer-Policy: same-origin`: `no-referrer` would also make browsers send
/// `Origin: null` on the form's own POST, which the same-site check refuses, as the browser test
/// found); no answer is sniffed into another type
/// (`X-Content-Type-Options: nosniff`). With `https` (the site is served over TLS only, as the
/// `__Host-` cookie requires), `Strict-Transport-Security` for a year, so that a browser never
/// again sends a plain-HTTP request a network could answer (and plant a cookie in).
pub fn security_headers(router: Router, https: bool) -> Router {
    use axum::http::{HeaderName, HeaderValue, header};
    use tower_http::set_header::SetResponseHeaderLayer;
    let set = |router: Router, name: HeaderName, value: &'static str| {
        router.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ))
    };
    let router = set(
        router,
        header::CONTENT_SECURITY_POLICY,
        "frame-ancestors 'none'",
    );
    let router = set(router, header::X_FRAME_OPTIONS, "DENY");
    let router = set(router, header::REFERRER_POLICY, "same-origin");
    let router = set(router, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    if https {
        set(
            router,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000",
        )
    } else {
        router
    }
}

/// The routes of an operations listener: `/metrics` (the process's registry, so one listener
/// serves every role of a process), `/healthz`, and `/readyz` (every role of the process ready:
/// [`crate::readiness`]).
pub fn operations() -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(crate::metrics_handler))
        .route("/healthz", axum::routing::get(crate::openapi::healthz))
        .route("/readyz", axum::routing::get(crate::readiness::readyz))
}

/// Serves [`operations`] on `listener` until `shutdown` completes, with the same server and the
/// same header timeout as the public one, and a small connection cap.
pub async fn serve_operations(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    crate::prometheus();
    serve(listener, operations(), OPERATIONS_LIMITS, shutdown).await
}

/// Runs `role` with [`operations`] served on `listener` beside it, until `role` ends: the
/// listener stops with it, whether `shutdown` asked it to or it failed by itself.
pub async fn with_operations<T>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    role: impl Future<Output = T>,
) -> T {
    let operations = tokio::spawn(serve_operations(listener, shutdown));
    let result = role.await;
    operations.abort();
    result
}
