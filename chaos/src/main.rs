//! `landslide-chaos`: runs the reliability harness and prints its figures.
//!
//! `scripts/chaos` builds the release binaries and runs this; see RELIABILITY.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use landslide_chaos::faults::FaultKind;
use landslide_chaos::{NatsLayout, Report, Scenario, report};

#[derive(Debug, Parser)]
#[command(
    name = "landslide-chaos",
    about = "Runs Landslide under seeded load and faults and checks that no accepted vote was lost, doubled or misordered."
)]
struct Args {
    /// The seed of the plan and the fault schedule (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Votes to offer in all, over every layout run (roughly: voters cast 1 to --max-votes each).
    #[arg(long, default_value_t = 20_000)]
    votes: usize,
    /// Each voter casts between 1 and this many votes.
    #[arg(long, default_value_t = 4)]
    max_votes: usize,
    /// Which NATS layouts to run, one after the other.
    #[arg(long, value_enum, default_values_t = [NatsLayout::Single, NatsLayout::Cluster])]
    nats: Vec<NatsLayout>,
    /// Voters voting at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    ingest_nodes: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// How many times each fault kind is injected per run (worker kills twice as often).
    #[arg(long, default_value_t = 3)]
    fault_rounds: usize,
    /// Malformed messages injected per run.
    #[arg(long, default_value_t = 100)]
    poison: usize,
    /// The consumer's ack_wait in milliseconds (how soon a dead worker's messages come back).
    #[arg(long, default_value_t = 5_000)]
    ack_wait_ms: u64,
    /// Inject only this fault kind (repeat for several); default: every kind that applies to
    /// the layout.
    #[arg(long = "fault", value_enum)]
    faults: Vec<FaultKind>,
    /// The `landslide` binary (default: the one beside this program).
    #[arg(long)]
    landslide: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // fuser logs an error for each reply to a request whose process was killed
                // meanwhile (ENOENT from /dev/fuse), which the power-loss disks see at every
                // kill, and a warning for each operation LazyFs leaves to the kernel's fallback.
                .unwrap_or_else(|_| "info,async_nats=off,fuser=error,fuser::reply=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("landslide-chaos: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(reports) if reports.iter().all(Report::passed) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("landslide-chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Vec<Report>> {
    let landslide = match args.landslide {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .map(|dir| dir.join("landslide"))
            .ok_or_else(|| {
                anyhow::anyhow!("cannot locate the landslide binary: pass --landslide")
            })?,
    };
    anyhow::ensure!(
        landslide.is_file(),
        "{} does not exist: build it (cargo build --release) or pass --landslide",
        landslide.display()
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    // A voter offers (1 + max) / 2 votes on average, plus 5% submitted twice.
    let per_voter = (1.0 + args.max_votes as f64) / 2.0 * 1.05;
    let runs = args.nats.len().max(1);
    let voters = (args.votes as f64 / per_voter / runs as f64).ceil() as usize;
    println!(
        "landslide-chaos: seed {seed}, {} votes over {runs} run(s) of {voters} voters",
        args.votes
    );
    let mut reports = Vec::new();
    for (i, layout) in args.nats.iter().enumerate() {
        let mut scenario = Scenario {
            seed: seed.wrapping_add(i as u64),
            voters,
            max_votes: args.max_votes,
            concurrency: args.concurrency,
            ingest_nodes: args.ingest_nodes,
            workers: args.workers,
            fault_rounds: args.fault_rounds,
            poison: args.poison,
            ack_wait: Duration::from_millis(args.ack_wait_ms),
            ..Scenario::short(*layout, seed.wrapping_add(i as u64), landslide.clone())
        };
        if !args.faults.is_empty() {
            scenario.faults = FaultKind::for_layout(*layout)
                .into_iter()
                .filter(|kind| args.faults.contains(kind))
                .collect();
        }
        let report = landslide_chaos::run(&scenario).await?;
        println!("{report}");
        reports.push(report);
    }
    if reports.len() > 1 {
        println!("{}", report::table(&reports));
    }
    Ok(reports)
}
