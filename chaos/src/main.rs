//! `landslide-chaos`: runs the reliability harness and prints its figures.
//!
//! `scripts/chaos` builds the release binaries and runs this; see RELIABILITY.md. With `--seeds`
//! it runs one seed after the other, prints one line per run as it ends, and a table of them all.
//! Every option that fixes a run's plan is here, so that a failed run's replay line (printed in
//! its report) runs the same schedule.

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
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run once per seed (and layout), one after the other: `--seeds 1,2,3,4,5`. Prints one
    /// line per run and a table of them all.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Votes to offer in all, over every layout run (roughly: voters cast 1 to --max-votes each).
    #[arg(long, default_value_t = 20_000)]
    votes: usize,
    /// Voters per run, instead of deriving them from --votes (what a replay line gives).
    #[arg(long)]
    voters: Option<usize>,
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
    /// Each power loss right after restarts: a nats-server kill, a worker kill, then the power
    /// loss, in consecutive slots of the schedule.
    #[arg(long)]
    power_cut_after_restart: bool,
    /// The largest clock offset of an ingest node, either way, in milliseconds.
    #[arg(long, default_value_t = Scenario::DEFAULT_MAX_SKEW_MS)]
    max_skew_ms: i64,
    /// Where in the load the faults fall, as shares of the voters: FROM,TO.
    #[arg(long, value_parser = parse_window, default_value = "0.05,0.85")]
    fault_window: (f64, f64),
    /// How long the workers may take to drain the stream after the load.
    #[arg(long, default_value_t = 300)]
    drain_timeout_secs: u64,
    /// How long a voter retries one vote before it gives up (a finding).
    #[arg(long, default_value_t = 180)]
    give_up_secs: u64,
    /// nats-server with its lazy default sync instead of `sync_interval: always`: the control
    /// that shows the power-loss fault finds lost votes.
    #[arg(long)]
    lazy_sync: bool,
    /// nats-server without debug logging.
    #[arg(long)]
    no_nats_debug: bool,
    /// Split the votes over this many streams (LANDSLIDE_VOTE_PARTITIONS); the ingest nodes
    /// spread over them, web<n> on partition (n - 1) mod K.
    #[arg(long, default_value_t = 1)]
    vote_partitions: u16,
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
    let landslide = match args.landslide.clone() {
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
    let seeds = if args.seeds.is_empty() {
        vec![args.seed.unwrap_or_else(rand::random)]
    } else {
        args.seeds.clone()
    };
    // A voter offers (1 + max) / 2 votes on average, plus 5% submitted twice.
    let per_voter = (1.0 + args.max_votes as f64) / 2.0 * 1.05;
    let runs = args.nats.len().max(1);
    let voters = args
        .voters
        .unwrap_or_else(|| (args.votes as f64 / per_voter / runs as f64).ceil() as usize);
    println!(
        "landslide-chaos: seeds {seeds:?}, {} run(s) of {voters} voters each",
        runs * seeds.len()
    );
    let mut reports = Vec::new();
    for &seed in &seeds {
        for (i, layout) in args.nats.iter().enumerate() {
            let scenario = scenario(
                &args,
                *layout,
                seed.wrapping_add(i as u64),
                voters,
                &landslide,
            );
            let report = landslide_chaos::run(&scenario).await?;
            if seeds.len() == 1 {
                println!("{report}");
            } else if !report.passed() {
                // Several seeds: the table comes at the end; a failure's details now.
                println!("{}", report.details());
            }
            println!("{}", report.line());
            reports.push(report);
        }
    }
    if reports.len() > 1 {
        println!("{}", report::table(&reports));
        for report in &reports {
            println!("{}", report.line());
        }
    }
    Ok(reports)
}

/// `FROM,TO`, two shares of the voters.
fn parse_window(text: &str) -> Result<(f64, f64), String> {
    let share = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|x| (0.0..=1.0).contains(x))
            .ok_or_else(|| format!("{s:?} is not a share between 0 and 1"))
    };
    let (from, to) = text
        .split_once(',')
        .ok_or_else(|| format!("{text:?} is not FROM,TO"))?;
    let window = (share(from)?, share(to)?);
    if window.0 > window.1 {
        return Err(format!("{text:?} ends before it starts"));
    }
    Ok(window)
}

/// The scenario of one run, from the options.
fn scenario(
    args: &Args,
    layout: NatsLayout,
    seed: u64,
    voters: usize,
    landslide: &std::path::Path,
) -> Scenario {
    let mut scenario = Scenario {
        voters,
        max_votes: args.max_votes,
        concurrency: args.concurrency,
        ingest_nodes: args.ingest_nodes,
        workers: args.workers,
        fault_rounds: args.fault_rounds,
        poison: args.poison,
        max_skew_ms: args.max_skew_ms,
        ack_wait: Duration::from_millis(args.ack_wait_ms),
        fault_window: args.fault_window,
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        give_up: Duration::from_secs(args.give_up_secs),
        power_cut_after_restart: args.power_cut_after_restart,
        nats_debug: !args.no_nats_debug,
        vote_partitions: args.vote_partitions,
        ..Scenario::short(layout, seed, landslide)
    };
    if args.lazy_sync {
        scenario.sync = landslide_chaos::Sync::Lazy;
    }
    if !args.faults.is_empty() {
        scenario.faults = FaultKind::for_layout(layout)
            .into_iter()
            .filter(|kind| args.faults.contains(kind))
            .collect();
    }
    scenario
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        Args::command().debug_assert();
    }

    /// A failed run's report prints a `scripts/chaos` line: it must parse into the same
    /// scenario, or the replay would run another plan.
    #[test]
    fn a_replay_line_gives_back_the_scenario_it_came_from() {
        let landslide = std::path::Path::new("/bin/landslide");
        let mut original = Scenario {
            power_cut_after_restart: true,
            sync: landslide_chaos::Sync::Lazy,
            faults: vec![FaultKind::KillWorker, FaultKind::PowerLoss],
            fault_window: (0.85, 0.9),
            give_up: Duration::from_secs(10),
            vote_partitions: 3,
            ..Scenario::short(NatsLayout::Cluster, 7, landslide)
        };
        original.test = Some("chaos::with_lazy_sync".to_owned());
        let replay = original.replay();
        assert_eq!(
            replay[0],
            "LANDSLIDE_SEED=7 cargo nextest run -E 'test(/^chaos::with_lazy_sync/)'"
        );
        let line = replay[1].strip_prefix("scripts/chaos ").unwrap();
        let args =
            Args::try_parse_from(std::iter::once("landslide-chaos").chain(line.split_whitespace()))
                .unwrap();
        let seed = args.seed.unwrap();
        let voters = args.voters.unwrap();
        let parsed = scenario(&args, args.nats[0], seed, voters, landslide);
        assert_eq!(
            format!("{parsed:?}"),
            format!(
                "{:?}",
                Scenario {
                    test: None,
                    ..original
                }
            )
        );
    }
}
