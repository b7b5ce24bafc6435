//! `landslide-bench`: measures every stage of Landslide against its ceiling, in one run on one
//! machine, and prints the table (also written as JSON and Markdown).
//!
//! `scripts/bench` builds the release binaries and runs this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use landslide_chaos::roles::Roles;
use landslide_chaos::{NatsLayout, Stack, StackConfig};

mod ceilings;
mod load;
mod procs;
mod report;

use ceilings::Measured;
use procs::{CpuMeter, Group};

#[derive(Debug, Parser)]
#[command(
    name = "landslide-bench",
    about = "Measures each stage of Landslide against its ceiling."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Seconds of each HTTP load run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events in each raw ceiling and in each pre-filled stream the workers drain.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Keep-alive connections of the load generator at saturation.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// Where the JSON and Markdown results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The `landslide` binary (default: the one beside this program).
    #[arg(long)]
    landslide: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The HTTP ceiling: an axum handler that answers 202 without publishing (run by the bench).
    #[command(hide = true)]
    NullServer {
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.command {
        Some(Command::NullServer { listen }) => runtime.block_on(null_server(listen)),
        None => runtime.block_on(bench(args)),
    }
}

/// Answers every `POST /api/votes` with what ingest answers, without storing anything.
async fn null_server(listen: SocketAddr) -> anyhow::Result<()> {
    use axum::routing::post;
    const BODY: &str = r#"{"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","ts":116257832304214017,"duplicate":false}"#;
    let app = axum::Router::new().route(
        "/api/votes",
        post(|_body: bytes::Bytes| async {
            (
                axum::http::StatusCode::ACCEPTED,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                BODY,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Every figure of one run.
#[derive(Debug, serde::Serialize)]
pub struct Figures {
    pub cores: usize,
    pub null_http: Measured,
    pub raw_publish: Measured,
    pub raw_fetch_ack: Measured,
    pub raw_sql: Measured,
    pub ingest: Measured,
    pub ingest_latency: Vec<LatencyPoint>,
    pub drain_one: Measured,
    pub drain_two: Measured,
    pub ingest_peak_rss: u64,
    pub worker_peak_rss: u64,
}

/// Latency of one load level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyPoint {
    /// Offered requests per second (`None`: saturation).
    pub offered: Option<f64>,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
}

impl LatencyPoint {
    fn of(offered: Option<f64>, outcome: &load::Outcome) -> Self {
        Self {
            offered,
            achieved: outcome.rate(),
            p50_ms: outcome.ms(50.0),
            p90_ms: outcome.ms(90.0),
            p99_ms: outcome.ms(99.0),
            max_ms: outcome.latency.max() as f64 / 1000.0,
            errors: outcome.errors,
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let landslide = match &args.landslide {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("cannot locate the landslide binary: pass --landslide")?
            .join("landslide"),
    };
    anyhow::ensure!(
        landslide.is_file(),
        "{} does not exist: build it first",
        landslide.display()
    );
    let seconds = Duration::from_secs(args.seconds);
    let dir = tempfile::Builder::new()
        .prefix("landslide-bench-")
        .tempdir()?;

    // One ingest node, no workers yet: each stage is measured alone.
    let (stack, env) = Stack::start(&StackConfig {
        layout: NatsLayout::Single,
        landslide,
        secret: "bench-secret-bench-secret-bench-secret-0123".to_owned(),
        ack_wait: Duration::from_secs(30),
        clock_offsets: vec![0],
        workers: 0,
        dir: dir.path().to_path_buf(),
    })
    .await?;
    landslide_schema::postgres::migrate(&env.database_url).await?;
    let nats = Group::of(stack.nats.pid(0));
    let client = landslide_nats::connect(&env.nats_urls, "landslide-bench").await?;
    let js = async_nats::jetstream::new(client);

    tracing::info!("ceiling: null HTTP handler");
    let null_http = null_http_ceiling(&args, seconds).await?;
    tracing::info!("ceilings: raw publish, raw fetch-and-ack");
    let events = ceilings::events(args.events, 1)?;
    let (raw_publish, raw_fetch_ack) = ceilings::publish_and_fetch(&js, &nats, &events).await?;
    tracing::info!("ceiling: raw SQL");
    let raw_sql = ceilings::sql(&env.database_url, &Group::named("postgres"), &events).await?;

    // Drain rates from a pre-filled VOTES stream: one worker, then two.
    let mut drains = Vec::new();
    for (round, workers) in [(2u64, 1usize), (3, 2)] {
        tracing::info!(workers, "pre-filling VOTES, then draining it");
        let events = ceilings::events(args.events, round)?;
        ceilings::publish_all(&js, "votes.bench", &events, 1000).await?;
        let mut roles = Vec::new();
        let meter_start = Instant::now();
        for n in 0..workers {
            roles.push(Roles::start_worker(&env, dir.path(), n + 1).await?);
        }
        let pids = roles.iter().filter_map(|r| r.process.pid());
        let meter = CpuMeter::start(vec![
            ("worker", Group::of(pids)),
            ("postgres", Group::named("postgres")),
            ("nats-server", nats.clone()),
        ]);
        let drain =
            landslide_chaos::check::wait_drained(&env.nats_urls, Duration::from_secs(600), || {
                roles
                    .iter_mut()
                    .filter_map(|r| r.process.check_running().err())
                    .map(|e| format!("{e:#}"))
                    .collect()
            });
        match drain.await? {
            landslide_chaos::check::Drain::Done(_) => {}
            other => anyhow::bail!("the workers did not drain the stream: {other:?}"),
        }
        let drained = Measured::new(events.len() as u64, meter_start.elapsed(), meter.stop());
        let rss = roles
            .iter()
            .map(|r| Group::of(r.process.pid()).peak_rss())
            .max()
            .unwrap_or(0);
        for mut role in roles {
            role.process.terminate(Duration::from_secs(30)).await?;
        }
        drains.push((drained, rss));
    }
    let (drain_two, _) = drains.pop().context("two drains")?;
    let (drain_one, worker_peak_rss) = drains.pop().context("one drain")?;

    tracing::info!("ingest at saturation");
    let ingest_role = &stack.roles.ingest[0];
    let ingest_pid = Group::of(ingest_role.process.pid());
    let target = load::Target::vote(ingest_role.addr);
    let meter = CpuMeter::start(vec![
        ("ingest", ingest_pid.clone()),
        ("nats-server", nats.clone()),
        ("load generator", Group::me()),
    ]);
    let saturated = load::run(&target, args.connections, None, seconds).await?;
    let ingest = Measured::new(saturated.ok, saturated.elapsed, meter.stop());
    let mut ingest_latency = vec![LatencyPoint::of(None, &saturated)];
    for share in [0.25, 0.5, 0.75] {
        let rate = saturated.rate() * share;
        tracing::info!(rate, "ingest at a fixed rate");
        let outcome = load::run(&target, 64, Some(rate), seconds).await?;
        ingest_latency.push(LatencyPoint::of(Some(rate), &outcome));
    }
    let ingest_peak_rss = ingest_pid.peak_rss();

    let figures = Figures {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        null_http,
        raw_publish,
        raw_fetch_ack,
        raw_sql,
        ingest,
        ingest_latency,
        drain_one,
        drain_two,
        ingest_peak_rss,
        worker_peak_rss,
    };
    let table = report::table(&figures);
    println!("{table}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("bench.json"),
        serde_json::to_string_pretty(&figures)?,
    )?;
    std::fs::write(args.out.join("bench.md"), &table)?;
    report::chart(&figures, &args.out.join("latency.svg"))?;
    println!(
        "written: {}/bench.json, bench.md, latency.svg",
        args.out.display()
    );
    Ok(())
}

/// The null handler in a process of its own, under the same load generator as ingest.
async fn null_http_ceiling(args: &Args, seconds: Duration) -> anyhow::Result<Measured> {
    let addr = SocketAddr::from(([127, 0, 0, 1], landslide_chaos::servers::free_port()?));
    let mut server = tokio::process::Command::new(std::env::current_exe()?)
        .args(["null-server", "--listen", &addr.to_string()])
        .kill_on_drop(true)
        .spawn()?;
    let pid = server.id().context("the null server exited")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the null server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let target = load::Target::vote(addr);
    let meter = CpuMeter::start(vec![
        ("null server", Group::of([pid])),
        ("load generator", Group::me()),
    ]);
    let outcome = load::run(&target, args.connections, None, seconds).await?;
    let measured = Measured::new(outcome.ok, outcome.elapsed, meter.stop());
    server.kill().await?;
    Ok(measured)
}
