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
use landslide_patience::Backoff;

mod ceilings;
mod end_to_end;
mod load;
mod partitions;
mod procs;
mod report;

use ceilings::Measured;
use procs::{CpuMeter, Group};

/// The same allocator as `landslide`, so the null HTTP handler is a ceiling for the same stack.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Votes of the end-to-end run (first votes and changes of mind together).
    #[arg(long, default_value_t = 1_000_000)]
    e2e_votes: u64,
    /// Share of the end-to-end run's voters who change their minds.
    #[arg(long, default_value_t = 0.3)]
    change_share: f64,
    /// The share of a core each nats-server of the partition-scaling runs is held to (a CPU
    /// cgroup quota): small enough that the three nats-servers, not this machine's cores, run out.
    #[arg(long, default_value_t = 0.2)]
    nats_core_share: f64,
    /// Idle keep-alive connections held open on one ingest node while its memory is read.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
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
    /// Raw atomic batch publish into a server of its own that fsyncs before it acks, for each
    /// batch size and number of batches in flight: how group commit's settings were chosen.
    Sweep {
        /// Messages published per setting.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// A three-node cluster with R3 streams instead of one server.
        #[arg(long)]
        cluster: bool,
    },
    /// The partition-scaling rows alone (K = 1, then K = 3, on capped nats-servers), with the
    /// main options (--seconds, --connections, --nats-core-share); prints both as JSON.
    Partitions,
    /// Runs the load generator alone against an ingest node and prints its latency.
    Load {
        /// The node's address.
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second in all (default: as fast as answers come).
        #[arg(long)]
        rate: Option<f64>,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 256)]
        connections: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
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
        Some(Command::Sweep { messages, cluster }) => {
            runtime.block_on(ceilings::sweep(messages, cluster))
        }
        Some(Command::Load {
            target,
            rate,
            connections,
            seconds,
        }) => runtime.block_on(async {
            let target = load::Target::vote(target);
            let outcome =
                load::run(&target, connections, rate, Duration::from_secs(seconds)).await?;
            let point = LatencyPoint::of(rate, &outcome);
            println!("{}", serde_json::to_string(&point)?);
            Ok(())
        }),
        Some(Command::Partitions) => runtime.block_on(partition_rows(args)),
        None => runtime.block_on(bench(args)),
    }
}

/// The bench's deployment: one nats-server that fsyncs before it acks, PostgreSQL, `ingest_nodes`
/// ingest nodes and no worker yet (each stage is measured alone).
async fn start_stack(
    landslide: PathBuf,
    dir: &std::path::Path,
    ingest_nodes: usize,
) -> anyhow::Result<(Stack, landslide_chaos::roles::RoleEnv)> {
    Stack::start(&StackConfig {
        layout: NatsLayout::Single,
        landslide,
        secret: "bench-secret-bench-secret-bench-secret-0123".to_owned(),
        ack_wait: Duration::from_secs(30),
        clock_offsets: vec![0; ingest_nodes],
        workers: 0,
        dir: dir.to_path_buf(),
        sync: landslide_servers::Sync::Always,
        power_loss: false,
        partitions: false,
        // Debug logging would cost the server time that the figures must not include.
        nats_debug: false,
        vote_partitions: 1,
    })
    .await
}

/// `landslide-bench partitions`: the partition-scaling rows of [`bench`], alone.
async fn partition_rows(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("landslide-bench-")
        .tempdir()?;
    let (stack, env) = start_stack(landslide_binary(&args)?, dir.path(), 0).await?;
    let seconds = Duration::from_secs(args.seconds);
    for k in [1, 3] {
        let measured = partitions::capped_cluster(
            &env,
            dir.path(),
            k,
            args.nats_core_share,
            args.connections,
            seconds,
        )
        .await?;
        println!(
            "{}",
            serde_json::json!({ "partitions": k, "share": args.nats_core_share, "measured": measured })
        );
    }
    drop(stack);
    Ok(())
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
    /// Single publishes with message ids, ~1000 acks in flight, fsync before every ack.
    pub raw_publish: Measured,
    /// Atomic batches of 1000 without message ids, two in flight, fsync before every ack.
    pub raw_batch: Measured,
    /// Single publishes without message ids to a server with the default lazy sync.
    pub raw_publish_lazy: Measured,
    /// The same with a message id on every publish: what the duplicate window costs.
    pub raw_publish_lazy_ids: Measured,
    pub raw_fetch_ack: Measured,
    pub raw_sql: Measured,
    pub ingest: Measured,
    /// One ingest node at saturation against a server with the default lazy sync.
    pub ingest_lazy: Measured,
    /// One ingest node at saturation against a three-node cluster on the same cores, R3 streams.
    pub ingest_r3: Measured,
    /// The share of a core each nats-server of the partition-scaling runs was held to.
    pub nats_core_share: f64,
    /// Three ingest nodes at saturation on a capped three-node R3 cluster, K = 1 partition.
    pub partitions_one: Measured,
    /// The same with K = 3 partitions, one ingest node on each, the leaders spread.
    pub partitions_three: Measured,
    pub ingest_latency: Vec<LatencyPoint>,
    /// The null handler at the same fixed rates: the latency ceiling.
    pub null_latency: Vec<LatencyPoint>,
    pub drain_one: Measured,
    pub drain_two: Measured,
    pub end_to_end: EndToEnd,
    pub idle: IdleConnections,
    pub ingest_peak_rss: u64,
    pub worker_peak_rss: u64,
}

/// The end-to-end run: votes through two ingest nodes and two workers until nothing is pending.
#[derive(Debug, serde::Serialize)]
pub struct EndToEnd {
    pub voted: end_to_end::Voted,
    /// Seconds until the last vote was answered.
    pub load_seconds: f64,
    /// Accepted votes over the seconds until nothing was pending, and CPU per vote by process.
    pub measured: Measured,
    /// The tally equalled the baseline plus every voter's last accepted choice (`None`: some vote
    /// failed, so some ballot is unknown and the check cannot be exact).
    pub tally_exact: Option<bool>,
    /// Peak resident set of each role during the run, in bytes (the largest process of each).
    pub peak_rss: Vec<(String, u64)>,
}

/// One ingest node's memory with many idle keep-alive connections, each after one vote.
#[derive(Debug, serde::Serialize)]
pub struct IdleConnections {
    pub connections: usize,
    /// Resident set while they were open, in bytes.
    pub ingest_rss: u64,
    /// The same for the null HTTP handler: what the HTTP stack alone keeps per connection.
    pub null_rss: u64,
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

/// The `landslide` binary: `--landslide`, else the one beside this program.
fn landslide_binary(args: &Args) -> anyhow::Result<PathBuf> {
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
    Ok(landslide)
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let landslide = landslide_binary(&args)?;
    let seconds = Duration::from_secs(args.seconds);
    let dir = tempfile::Builder::new()
        .prefix("landslide-bench-")
        .tempdir()?;

    // One ingest node, no workers yet: each stage is measured alone.
    // Two ingest nodes: the end-to-end run votes through both, the others use the first.
    let (stack, env) = start_stack(landslide, dir.path(), 2).await?;
    let nats = Group::of(stack.nats.pid(0));
    let client = landslide_nats::connect(
        env.nats(landslide_nats::User::Admin),
        landslide_nats::User::Admin,
        "landslide-bench",
    )
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    // Only ingest's user may publish a vote, the operator included (`User::admin_denied`): the
    // pre-filled streams are published as ingest, or nothing answers and every batch times out.
    let ingest_client = landslide_nats::connect(
        env.nats(landslide_nats::User::Ingest),
        landslide_nats::User::Ingest,
        "landslide-bench-fill",
    )
    .await?;
    // A second nats-server with the server's default lazy sync: what fsync before ack costs.
    let lazy = landslide_servers::Nats::start_with(
        &landslide_servers::NatsSpec {
            sync: landslide_servers::Sync::Lazy,
            stems: Some(vec!["nats-lazy".to_owned()]),
            ..landslide_servers::NatsSpec::new(NatsLayout::Single)
        },
        dir.path(),
    )
    .await?;
    let lazy_nats = Group::of(lazy.pid(0));
    let lazy_env = landslide_chaos::roles::RoleEnv {
        nats: lazy.configs(),
        ..env.clone()
    };
    let lazy_js = async_nats::jetstream::new(lazy.client(landslide_nats::User::Admin).await?);

    tracing::info!("ceiling: null HTTP handler");
    let mut null_server = NullServer::start().await?;
    let (null_http, null_idle_rss) = null_server.ceiling(&args, seconds).await?;
    tracing::info!("ceilings: raw publish, raw batches, raw fetch-and-ack");
    let events = ceilings::events(args.events, 1)?;
    // Single publishes that fsync each run at a few thousand a second: a tenth is enough.
    let singles = &events[..(events.len() / 10).max(1)];
    let raw_publish = ceilings::raw_publish(&js, &nats, singles, true).await?;
    let (raw_batch, raw_fetch_ack) =
        ceilings::batches_and_fetch(&client, &js, &nats, &events, 1000, 2).await?;
    let raw_publish_lazy = ceilings::raw_publish(&lazy_js, &lazy_nats, &events, false).await?;
    let raw_publish_lazy_ids = ceilings::raw_publish(&lazy_js, &lazy_nats, &events, true).await?;
    tracing::info!("ceiling: raw SQL");
    let raw_sql = ceilings::sql(&env.database_url, &Group::named("postgres"), &events).await?;

    // Drain rates from a pre-filled VOTES stream: one worker, then two.
    let mut drains = Vec::new();
    for (round, workers) in [(2u64, 1usize), (3, 2)] {
        tracing::info!(workers, "pre-filling VOTES, then draining it");
        let events = ceilings::events(args.events, round)?;
        ceilings::fill(&ingest_client, "votes.bench", "VOTES", &events, 1000, 2).await?;
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
        wait_drained_by(&env, &mut roles, Duration::from_secs(600)).await?;
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

    tracing::info!(
        votes = args.e2e_votes,
        "end to end: two ingest nodes, two workers"
    );
    let end_to_end = end_to_end_run(&args, &stack, &env, &nats, dir.path()).await?;

    tracing::info!("ingest at saturation");
    let ingest_role = &stack.roles.ingest[0];
    let ingest_pid = Group::of(ingest_role.process.pid());
    let target = load::Target::vote(ingest_role.addr);
    load::warm_up(&target, args.connections, None).await?;
    let meter = CpuMeter::start(vec![
        ("ingest", ingest_pid.clone()),
        ("nats-server", nats.clone()),
        ("load generator", Group::me()),
    ]);
    let saturated = load::run(&target, args.connections, None, seconds).await?;
    let ingest = Measured::new(saturated.ok, saturated.elapsed, meter.stop());
    let mut ingest_latency = vec![LatencyPoint::of(None, &saturated)];
    let mut null_latency = Vec::new();
    for share in [0.25, 0.5, 0.75] {
        let rate = saturated.rate() * share;
        // The null handler at the same rate is the latency ceiling: the HTTP stack, the load
        // generator and these cores, without storing anything.
        for (name, target, points) in [
            ("ingest", &target, &mut ingest_latency),
            (
                "null handler",
                &load::Target::vote(null_server.addr),
                &mut null_latency,
            ),
        ] {
            tracing::info!(rate, name, "fixed rate");
            // As many connections as at saturation, so the schedule never waits for a free one.
            load::warm_up(target, args.connections, Some(rate)).await?;
            let outcome = load::run(target, args.connections, Some(rate), seconds).await?;
            points.push(LatencyPoint::of(Some(rate), &outcome));
        }
    }
    tracing::info!("ingest at saturation, against the lazy nats-server");
    let ingest_lazy =
        saturate_ingest(&args, &lazy_env, dir.path(), "weblazy", &lazy_nats, seconds).await?;
    tracing::info!("ingest at saturation, against a three-node R3 cluster on these cores");
    // Every node fsyncs before it acks, as every cluster deployment runs; the three share the
    // machine's cores with ingest and the load generator, where a deployment gives each its own.
    let r3 = landslide_servers::Nats::start_with(
        &landslide_servers::NatsSpec {
            stems: Some((1..=3).map(|n| format!("nats-r3-{n}")).collect()),
            ..landslide_servers::NatsSpec::new(NatsLayout::Cluster)
        },
        dir.path(),
    )
    .await?;
    let r3_nats = Group::of((0..r3.len()).filter_map(|n| r3.pid(n)));
    let r3_env = landslide_chaos::roles::RoleEnv {
        nats: r3.configs(),
        replicas: NatsLayout::Cluster.replicas(),
        ..env.clone()
    };
    let ingest_r3 = saturate_ingest(&args, &r3_env, dir.path(), "webr3", &r3_nats, seconds).await?;
    drop(r3);
    tracing::info!(
        share = args.nats_core_share,
        "partition scaling: K = 1, then K = 3, on three nats-servers capped at a share of a core"
    );
    let mut scaling = Vec::new();
    for k in [1, 3] {
        scaling.push(
            partitions::capped_cluster(
                &env,
                dir.path(),
                k,
                args.nats_core_share,
                args.connections,
                seconds,
            )
            .await?,
        );
    }
    let partitions_three = scaling.pop().context("the K = 3 run")?;
    let partitions_one = scaling.pop().context("the K = 1 run")?;
    null_server.process.kill().await?;
    tracing::info!(
        connections = args.idle_connections,
        "idle keep-alive connections"
    );
    let idle = IdleConnections {
        connections: args.idle_connections,
        ingest_rss: hold_idle_connections(ingest_role.addr, args.idle_connections, &ingest_pid)
            .await?,
        null_rss: null_idle_rss,
    };
    let ingest_peak_rss = ingest_pid.peak_rss();

    let figures = Figures {
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        null_http,
        raw_publish,
        raw_batch,
        raw_publish_lazy,
        raw_publish_lazy_ids,
        raw_fetch_ack,
        raw_sql,
        ingest,
        ingest_lazy,
        ingest_r3,
        nats_core_share: args.nats_core_share,
        partitions_one,
        partitions_three,
        ingest_latency,
        null_latency,
        drain_one,
        drain_two,
        end_to_end,
        idle,
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

/// One ingest node of `env`'s servers (their processes: `nats`) at saturation, alone: no worker
/// runs, so the node's streams are set up as a worker would, or it waits for the polls bucket
/// and is never ready.
async fn saturate_ingest(
    args: &Args,
    env: &landslide_chaos::roles::RoleEnv,
    dir: &std::path::Path,
    name: &str,
    nats: &Group,
    seconds: Duration,
) -> anyhow::Result<Measured> {
    landslide_chaos::roles::set_up_as_a_worker(env).await?;
    let mut ingest = Roles::start_ingest(env, dir, name, 0).await?;
    let target = load::Target::vote(ingest.addr);
    load::warm_up(&target, args.connections, None).await?;
    let meter = CpuMeter::start(vec![
        ("ingest", Group::of(ingest.process.pid())),
        ("nats-server", nats.clone()),
        ("load generator", Group::me()),
    ]);
    let saturated = load::run(&target, args.connections, None, seconds).await?;
    let measured = Measured::new(saturated.ok, saturated.elapsed, meter.stop());
    ingest.process.terminate(Duration::from_secs(30)).await?;
    Ok(measured)
}

/// The HTTP ceiling: an axum handler that answers like ingest without storing anything, in a
/// process of its own.
struct NullServer {
    process: tokio::process::Child,
    addr: SocketAddr,
    pid: u32,
}

impl NullServer {
    async fn start() -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], landslide_servers::free_port()?));
        let process = tokio::process::Command::new(std::env::current_exe()?)
            .args(["null-server", "--listen", &addr.to_string()])
            .kill_on_drop(true)
            .spawn()?;
        let pid = process.id().context("the null server exited")?;
        let mut backoff = Backoff::constant(Duration::from_millis(20))
            .within(Duration::from_secs(10), "the null server to listen");
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            anyhow::ensure!(
                backoff.wait().await.is_ok(),
                "the null server did not listen"
            );
        }
        Ok(Self { process, addr, pid })
    }

    /// Its rate at saturation under the same load generator as ingest; then its resident set with
    /// as many idle connections as ingest is given.
    async fn ceiling(&self, args: &Args, seconds: Duration) -> anyhow::Result<(Measured, u64)> {
        let target = load::Target::vote(self.addr);
        load::warm_up(&target, args.connections, None).await?;
        let meter = CpuMeter::start(vec![
            ("null server", Group::of([self.pid])),
            ("load generator", Group::me()),
        ]);
        let outcome = load::run(&target, args.connections, None, seconds).await?;
        let measured = Measured::new(outcome.ok, outcome.elapsed, meter.stop());
        let idle =
            hold_idle_connections(self.addr, args.idle_connections, &Group::of([self.pid])).await?;
        Ok((measured, idle))
    }
}

/// Waits until `workers` have left nothing pending; an error if one dies or `timeout` passes.
async fn wait_drained_by(
    env: &landslide_chaos::roles::RoleEnv,
    workers: &mut [landslide_chaos::roles::Role],
    timeout: Duration,
) -> anyhow::Result<()> {
    let drained = landslide_chaos::check::wait_drained(
        env.nats(landslide_nats::User::Admin),
        timeout,
        || workers.iter_mut().any(|r| r.process.has_exited()),
    )
    .await?;
    match drained {
        landslide_chaos::check::Drain::Done(_) => Ok(()),
        landslide_chaos::check::Drain::RoleDied => {
            let dead: Vec<String> = workers
                .iter_mut()
                .filter_map(|r| r.process.check_running().err())
                .map(|e| format!("{e:#}"))
                .collect();
            anyhow::bail!(
                "a worker died before the stream was drained: {}",
                dead.join("; ")
            )
        }
        other => anyhow::bail!("the workers did not drain the stream: {other:?}"),
    }
}

/// Votes through both ingest nodes with two workers draining at once; timed until nothing is
/// pending, then the tally is checked against the voters' last choices.
async fn end_to_end_run(
    args: &Args,
    stack: &Stack,
    env: &landslide_chaos::roles::RoleEnv,
    nats: &Group,
    dir: &std::path::Path,
) -> anyhow::Result<EndToEnd> {
    // Every earlier stage has drained: the database holds the tally the new votes add to.
    let baseline = landslide_chaos::check::read_database(&env.database_url)
        .await?
        .tallies;
    let mut workers = Vec::new();
    for n in 1..=2 {
        workers.push(Roles::start_worker(env, dir, 10 + n).await?);
    }
    let ingest = Group::of(stack.roles.ingest.iter().filter_map(|r| r.process.pid()));
    let worker = Group::of(workers.iter().filter_map(|r| r.process.pid()));
    let meter = CpuMeter::start(vec![
        ("ingest", ingest.clone()),
        ("nats-server", nats.clone()),
        ("worker", worker.clone()),
        ("postgres", Group::named("postgres")),
        ("load generator", Group::me()),
    ]);
    let started = Instant::now();
    let nodes: Vec<SocketAddr> = stack.roles.ingest.iter().map(|r| r.addr).collect();
    let plan = end_to_end::Plan {
        votes: args.e2e_votes,
        change_share: args.change_share,
        connections_per_node: (args.connections / nodes.len()).max(1),
    };
    let voted = end_to_end::run(&nodes, plan).await?;
    let load_seconds = started.elapsed().as_secs_f64();
    wait_drained_by(env, &mut workers, Duration::from_secs(900)).await?;
    let measured = Measured::new(voted.accepted, started.elapsed(), meter.stop());
    let tally_exact = if voted.failed > 0 {
        None
    } else {
        let mut expected = baseline;
        for (option, n) in ["cats", "dogs"].into_iter().zip(voted.finals) {
            *expected.entry(option.to_owned()).or_default() += n as i64;
        }
        let tally = stack.roles.tally.base_url();
        let results =
            landslide_chaos::check::settled_results(&tally, &expected, Duration::from_secs(30))
                .await?;
        let exact = results.pending == 0 && results.counts == expected;
        if !exact {
            tracing::error!(?expected, got = ?results.counts, "the end-to-end tally is not exact");
        }
        Some(exact)
    };
    let peak_rss = vec![
        ("ingest".to_owned(), ingest.peak_rss()),
        ("worker".to_owned(), worker.peak_rss()),
        ("nats-server".to_owned(), nats.peak_rss()),
        ("postgres".to_owned(), Group::named("postgres").peak_rss()),
    ];
    for mut role in workers {
        role.process.terminate(Duration::from_secs(30)).await?;
    }
    Ok(EndToEnd {
        voted,
        load_seconds,
        measured,
        tally_exact,
        peak_rss,
    })
}

/// Opens `n` connections to `addr`, casts one vote on each, and reads the node's resident set
/// while all of them are still open.
async fn hold_idle_connections(addr: SocketAddr, n: usize, node: &Group) -> anyhow::Result<u64> {
    use futures::StreamExt as _;
    let target = load::Target::vote(addr);
    let opened: Vec<anyhow::Result<load::Sender>> = futures::stream::iter(0..n)
        .map(|_| async {
            let mut sender = load::connect(addr).await?;
            let answer = load::post(&mut sender, addr, &target.path, target.body.clone(), None)
                .await
                .context("a vote on an idle connection got no answer")?;
            anyhow::ensure!(answer.status == 202, "a vote got {}", answer.status);
            Ok(sender)
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let senders = opened.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let rss = node.rss();
    drop(senders);
    Ok(rss)
}
