//! A small HTTP/1.1 load generator: keep-alive connections, each sending one request after the
//! other, either as fast as answers come (saturation) or on a fixed schedule (open loop, latency
//! measured from the planned send time, so a slow answer is not hidden by the requests it
//! delayed). It costs a few microseconds of CPU per request, which matters on 2 cores.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use landslide_patience::Backoff;
use tokio::time::Instant;

/// What every request is.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub body: Bytes,
    /// The status that counts as success.
    pub ok_status: u16,
}

impl Target {
    /// `POST /api/votes` with the same vote every time (and no cookie: each request a new voter).
    pub fn vote(addr: SocketAddr) -> Self {
        Self {
            addr,
            path: "/api/votes".to_owned(),
            body: Bytes::from_static(br#"{"poll":"pets","choice":"cats"}"#),
            ok_status: 202,
        }
    }
}

/// How a run went.
#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of successful requests, in microseconds.
    pub latency: Histogram<u64>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// A latency percentile in milliseconds.
    pub fn ms(&self, percentile: f64) -> f64 {
        self.latency.value_at_percentile(percentile) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, three significant figures: constant bounds that are always valid.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// How long [`warm_up`] runs.
const WARM_UP: Duration = Duration::from_secs(2);

/// A short run whose figures are thrown away, before a measured one at the same load: the first
/// second after a pause (new connections, buffers and pages not yet grown back) had stalls of
/// 100 ms that a steady load never shows, and they made p99 a measure of the start.
pub async fn warm_up(target: &Target, connections: usize, rate: Option<f64>) -> anyhow::Result<()> {
    run(target, connections, rate, WARM_UP).await.map(drop)
}

/// Sends requests on `connections` connections for `duration`: as fast as possible when `rate`
/// is `None`, else `rate` requests per second in all.
pub async fn run(
    target: &Target,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    let start = Instant::now() + Duration::from_millis(50);
    let deadline = start + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let target = target.clone();
            // Each connection's share of the rate, its sends staggered over one interval.
            let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r));
            let offset = interval.map(|iv| iv.mul_f64(i as f64 / connections as f64));
            tokio::spawn(async move {
                connection(
                    &target,
                    start + offset.unwrap_or_default(),
                    interval,
                    deadline,
                )
                .await
            })
        })
        .collect();
    let mut outcome = Outcome {
        ok: 0,
        errors: 0,
        elapsed: duration,
        latency: histogram(),
    };
    for task in tasks {
        let (ok, errors, latency) = task.await??;
        outcome.ok += ok;
        outcome.errors += errors;
        outcome.latency.add(&latency)?;
    }
    Ok(outcome)
}

async fn connection(
    target: &Target,
    first: Instant,
    interval: Option<Duration>,
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Histogram<u64>)> {
    let mut latency = histogram();
    let (mut ok, mut errors) = (0, 0);
    let mut sender = None;
    // After a failed request, before the next (this pause is ours; the pacing below is the
    // load's schedule).
    let mut failed = Backoff::constant(Duration::from_millis(10));
    let mut planned = first;
    tokio::time::sleep_until(first).await;
    while Instant::now() < deadline {
        if interval.is_some() {
            tokio::time::sleep_until(planned).await;
        }
        let sent = if interval.is_some() {
            planned
        } else {
            Instant::now()
        };
        if sender.is_none() {
            sender = connect(target.addr).await.ok();
        }
        let success = match sender.as_mut() {
            Some(s) => request(s, target).await,
            None => false,
        };
        if success {
            ok += 1;
            let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            latency.saturating_record(micros.max(1));
        } else {
            errors += 1;
            // A broken connection is replaced on the next request.
            sender = None;
            failed.pause().await;
        }
        if let Some(interval) = interval {
            planned += interval;
        }
    }
    Ok((ok, errors, latency))
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A keep-alive HTTP/1.1 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; `true` when it got the expected status.
async fn request(sender: &mut Sender, target: &Target) -> bool {
    post(sender, target.addr, &target.path, target.body.clone(), None)
        .await
        .is_some_and(|answer| answer.status == target.ok_status)
}

/// What a `POST` got back.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The `Set-Cookie` header, if any.
    pub set_cookie: Option<hyper::header::HeaderValue>,
}

/// `POST path` with a JSON body (and a `Cookie` header); `None` when the connection failed.
pub async fn post(
    sender: &mut Sender,
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    cookie: Option<&hyper::header::HeaderValue>,
) -> Option<Answer> {
    let mut request = hyper::Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(cookie) = cookie {
        request = request.header(hyper::header::COOKIE, cookie);
    }
    let request = request.body(Full::new(body)).ok()?;
    sender.ready().await.ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let set_cookie = response.headers().get(hyper::header::SET_COOKIE).cloned();
    response.into_body().collect().await.ok()?;
    Some(Answer { status, set_cookie })
}
