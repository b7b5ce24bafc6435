//! Landslide's reliability harness: the real roles as separate processes of the `landslide`
//! binary, against a private nats-server (or three-node cluster) and PostgreSQL, under a seeded
//! load of voters while a seeded schedule of faults kills and restarts their parts. Afterwards it
//! checks, against its own model of every answer a voter got, that no accepted vote was lost,
//! doubled or misordered, that the tallies are exact, that every injected malformed message was
//! dead-lettered and that `landslide audit` agrees.
//!
//! A seed fixes the plan: every voter's votes, keys, nodes and double submissions, the ingest
//! clocks' skews, the faults, their order, targets, downtimes and points in the load, and the
//! malformed messages. The interleaving of real processes is not fixed by anything, so a rerun
//! replays the same schedule, not the same thread timings.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

pub mod check;
pub mod faults;
pub mod report;
pub mod roles;
pub mod stream;
pub mod workload;

pub use landslide_servers::{NatsLayout, Sync};
pub use report::Report;

use faults::{Fault, FaultKind, FaultRecord};
use landslide_patience::Backoff;
use landslide_servers::{Nats, NatsSpec, Network, Place, Postgres};

/// PostgreSQL's host in a stack with a network.
pub const POSTGRES_HOST: &str = "pg";
use roles::{RoleEnv, Roles};
use workload::{Counters, Driver, Plan};

/// One run of the harness.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub layout: NatsLayout,
    pub voters: usize,
    /// Each voter casts between 1 and this many votes.
    pub max_votes: usize,
    /// Voters voting at once.
    pub concurrency: usize,
    pub ingest_nodes: usize,
    pub workers: usize,
    /// How many times each fault kind is injected (worker kills twice as often).
    pub fault_rounds: usize,
    /// Malformed messages injected straight into the stream.
    pub poison: usize,
    /// The largest clock offset of an ingest node, either way, in milliseconds.
    pub max_skew_ms: i64,
    /// The consumer's ack_wait: how soon a killed worker's messages are delivered again.
    pub ack_wait: Duration,
    /// The `landslide` binary.
    pub landslide: PathBuf,
    /// When the nats-servers fsync: always, as every deployment does; lazily only for the control
    /// run that shows the power-loss fault finds what it looks for.
    pub sync: Sync,
    /// The fault kinds to inject, each `fault_rounds` times (worker kills twice as often).
    pub faults: Vec<FaultKind>,
    /// Where in the load the faults fall, as shares of the voters: from, to.
    pub fault_window: (f64, f64),
    /// How long the workers may take to drain the stream after the load.
    pub drain_timeout: Duration,
    /// How long a voter retries one vote before it gives up (a finding).
    pub give_up: Duration,
    /// Each power loss right after restarts: the schedule puts the nats-server kill fault, then
    /// a worker kill, then the power loss in consecutive slots (the shape of the finding
    /// "a power cut soon after a restart lost accepted votes").
    pub power_cut_after_restart: bool,
    /// nats-server logs at debug level (RAFT snapshots, truncations, catch-ups): what made the
    /// power-cut study's runs readable. The harness's servers only, never a deployment's.
    pub nats_debug: bool,
    /// The test that replays this scenario with `LANDSLIDE_SEED`, for the report's replay line
    /// (`chaos::cluster_faults`); `None` outside the tests.
    pub test: Option<String>,
    /// Vote partitions (`LANDSLIDE_VOTE_PARTITIONS`); the ingest nodes spread over them.
    pub vote_partitions: u16,
}

impl Scenario {
    /// The ingest clocks' largest offset: the first two nodes are this far apart either way.
    pub const DEFAULT_MAX_SKEW_MS: i64 = 10_000;

    /// The short form that CI runs: a few thousand votes, every fault kind once.
    pub fn short(layout: NatsLayout, seed: u64, landslide: impl Into<PathBuf>) -> Self {
        Self {
            seed,
            layout,
            voters: 1_000,
            max_votes: 4,
            concurrency: 32,
            ingest_nodes: 3,
            workers: 2,
            fault_rounds: 1,
            poison: 10,
            max_skew_ms: Self::DEFAULT_MAX_SKEW_MS,
            ack_wait: Duration::from_secs(3),
            landslide: landslide.into(),
            sync: Sync::Always,
            faults: FaultKind::for_layout(layout),
            fault_window: (0.05, 0.85),
            drain_timeout: Duration::from_secs(300),
            give_up: Duration::from_secs(180),
            power_cut_after_restart: false,
            nats_debug: true,
            test: None,
            vote_partitions: 1,
        }
    }

    /// The commands that replay this scenario's plan and schedule: the test (with
    /// `LANDSLIDE_SEED`), when a test ran it, and `scripts/chaos` with every option that fixes
    /// the plan. A replay repeats the schedule, not the thread timings.
    pub fn replay(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(test) = &self.test {
            lines.push(format!(
                "LANDSLIDE_SEED={} cargo nextest run -E 'test(/^{test}/)'",
                self.seed
            ));
        }
        let layout = match self.layout {
            NatsLayout::Single => "single",
            NatsLayout::Cluster => "cluster",
        };
        let mut line = format!(
            "scripts/chaos --seed {} --nats {layout} --voters {} --max-votes {} --concurrency {} \
             --ingest-nodes {} --workers {} --fault-rounds {} --poison {} --ack-wait-ms {} \
             --max-skew-ms {} --fault-window {},{} --drain-timeout-secs {} --give-up-secs {}",
            self.seed,
            self.voters,
            self.max_votes,
            self.concurrency,
            self.ingest_nodes,
            self.workers,
            self.fault_rounds,
            self.poison,
            self.ack_wait.as_millis(),
            self.max_skew_ms,
            self.fault_window.0,
            self.fault_window.1,
            self.drain_timeout.as_secs(),
            self.give_up.as_secs(),
        );
        if self.faults != FaultKind::for_layout(self.layout) {
            for kind in &self.faults {
                if let Some(value) = clap::ValueEnum::to_possible_value(kind) {
                    line.push_str(&format!(" --fault {}", value.get_name()));
                }
            }
        }
        if self.sync == Sync::Lazy {
            line.push_str(" --lazy-sync");
        }
        if self.power_cut_after_restart {
            line.push_str(" --power-cut-after-restart");
        }
        if self.vote_partitions > 1 {
            line.push_str(&format!(" --vote-partitions {}", self.vote_partitions));
        }
        lines.push(line);
        lines
    }
}

/// The servers and roles of one run; faults act on it.
#[derive(Debug)]
pub struct Stack {
    pub nats: Nats,
    pub postgres: Postgres,
    pub roles: Roles,
    /// The hosts everything but tally runs on, for the partition faults. Last, so that it is
    /// dropped after every process in it.
    pub network: Option<Network>,
}

impl Stack {
    /// The network, for a fault that cuts it.
    pub fn network(&mut self) -> anyhow::Result<&mut Network> {
        self.network
            .as_mut()
            .context("the stack runs without a network (StackConfig::partitions)")
    }
}

/// What [`Stack::start`] starts.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub layout: NatsLayout,
    /// The `landslide` binary.
    pub landslide: PathBuf,
    /// The keys of every ingest node and tally are derived from it (at least 32 bytes).
    pub secret: String,
    /// The consumer's ack_wait.
    pub ack_wait: Duration,
    /// One ingest node per entry, with this clock offset in milliseconds.
    pub clock_offsets: Vec<i64>,
    pub workers: usize,
    /// Where the servers keep their data and every process its log.
    pub dir: PathBuf,
    /// When the nats-servers fsync.
    pub sync: Sync,
    /// nats-server's store and PostgreSQL's data on LazyFs disks, for the power-loss fault.
    pub power_loss: bool,
    /// Every nats-server, PostgreSQL, ingest node and worker on a host of its own (a network
    /// namespace), for the partition faults. Tally and the harness stay outside, where no cut
    /// reaches them.
    pub partitions: bool,
    /// nats-server logs at debug level ([`Scenario::nats_debug`]).
    pub nats_debug: bool,
    /// Vote partitions (`LANDSLIDE_VOTE_PARTITIONS`).
    pub vote_partitions: u16,
}

impl Stack {
    /// Starts the servers, then the roles: a whole deployment on this machine. The load tests
    /// and benchmarks stand on this too. Returns the settings the roles were started with.
    pub async fn start(config: &StackConfig) -> anyhow::Result<(Self, RoleEnv)> {
        let nats_hosts: Vec<String> = (1..=config.layout.replicas())
            .map(|i| format!("n{i}"))
            .collect();
        let role_hosts: Vec<String> = (1..=config.clock_offsets.len())
            .map(|i| format!("web{i}"))
            .chain((1..=config.workers).map(|i| format!("worker{i}")))
            .collect();
        let network = if config.partitions {
            let hosts: Vec<&str> = nats_hosts
                .iter()
                .chain(&role_hosts)
                .map(String::as_str)
                .chain([POSTGRES_HOST])
                .collect();
            Some(Network::create(&hosts).await?)
        } else {
            None
        };
        let place = |host: &str| {
            network
                .as_ref()
                .map_or_else(Place::loopback, |n| n.place(host))
        };
        let spec = NatsSpec {
            sync: config.sync,
            power_loss: config.power_loss,
            debug: config.nats_debug,
            names: Some(nats_hosts.clone()),
            places: Some(nats_hosts.iter().map(|h| place(h)).collect()),
            ..NatsSpec::new(config.layout)
        };
        let nats = Nats::start_with(&spec, &config.dir).await?;
        let postgres =
            Postgres::start_at(&config.dir, &place(POSTGRES_HOST), config.power_loss).await?;
        // As a deployment does: migrate as the owner, then each role as its own user.
        let owner = landslide_schema::postgres::DatabaseUrl::parse(&postgres.url("postgres"))?;
        landslide_schema::postgres::migrate(&owner).await?;
        let mut conn = landslide_schema::postgres::connect(&owner).await?;
        let mut role_urls = std::collections::HashMap::new();
        for role in landslide_schema::postgres::LoginRole::ALL {
            landslide_schema::postgres::roles::ensure_login_role(&mut conn, role, None).await?;
            role_urls.insert(role, postgres.url_as(role.name(), None, "postgres"));
        }
        drop(conn);
        let env = RoleEnv {
            places: role_hosts.iter().map(|h| (h.clone(), place(h))).collect(),
            landslide: config.landslide.clone(),
            nats: nats.configs(),
            replicas: config.layout.replicas(),
            vote_partitions: config.vote_partitions,
            database_url: postgres.url("postgres"),
            role_urls,
            keys: write_keys(&config.dir, &config.secret)?,
            ack_wait: config.ack_wait,
        };
        let roles = Roles::start(&env, &config.dir, &config.clock_offsets, config.workers).await?;
        Ok((
            Self {
                nats,
                postgres,
                roles,
                network,
            },
            env,
        ))
    }
}

/// Writes ingest's and tally's key files, derived from `secret`, under `dir`; returns their
/// folder.
fn write_keys(dir: &Path, secret: &str) -> anyhow::Result<PathBuf> {
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).with_context(|| format!("cannot create {}", keys.display()))?;
    for (name, prefix) in [
        ("cookie-keys", "cookies"),
        ("voter-id-key", "voter-ids"),
        ("receipt-key", "receipts"),
    ] {
        landslide_servers::write_private(
            &keys.join(name),
            format!("{prefix}-{secret}\n").as_bytes(),
        )?;
    }
    Ok(keys)
}

/// Runs a scenario and checks the outcome. `Err` only when the harness itself cannot run (a
/// server that does not start); every finding about Landslide is in the report's failures.
pub async fn run(scenario: &Scenario) -> anyhow::Result<Report> {
    let dir = tempfile::Builder::new()
        .prefix("landslide-chaos-")
        .tempdir()
        .context("cannot create the run's folder")?;
    let mut rng = ChaCha8Rng::seed_from_u64(scenario.seed);
    let skew = scenario.max_skew_ms;
    // The first two nodes are the furthest apart the scenario allows; the others fall between.
    let clock_offsets: Vec<i64> = (0..scenario.ingest_nodes)
        .map(|i| match i {
            0 => skew,
            1 => -skew,
            _ => rng.random_range(-skew..=skew),
        })
        .collect();
    let plan = Plan::generate(
        &mut rng,
        scenario.voters,
        scenario.max_votes,
        scenario.ingest_nodes,
    );
    let mut schedule = faults::schedule(
        &mut rng,
        &scenario.faults,
        scenario.fault_window,
        scenario.fault_rounds,
        scenario.voters,
    );
    if scenario.power_cut_after_restart {
        faults::power_cut_after_restart(&mut schedule);
    }
    let poison = workload::poison(&mut rng, scenario.poison);
    let secret: String = (0..48)
        .map(|_| char::from(rng.random_range(b'a'..=b'z')))
        .collect();

    tracing::info!(seed = scenario.seed, layout = %scenario.layout, dir = %dir.path().display(), "starting the servers");
    let (mut stack, env) = Stack::start(&StackConfig {
        layout: scenario.layout,
        landslide: scenario.landslide.clone(),
        secret,
        ack_wait: scenario.ack_wait,
        clock_offsets: clock_offsets.clone(),
        workers: scenario.workers,
        dir: dir.path().to_path_buf(),
        sync: scenario.sync,
        power_loss: scenario.faults.contains(&FaultKind::PowerLoss),
        partitions: scenario.faults.iter().any(|f| f.is_partition()),
        nats_debug: scenario.nats_debug,
        vote_partitions: scenario.vote_partitions,
    })
    .await?;
    let mut driver = Driver::new(
        stack.roles.ingest.iter().map(|r| r.base_url()).collect(),
        scenario.concurrency,
    )?;
    driver.give_up = scenario.give_up;

    tracing::info!(
        voters = scenario.voters,
        faults = schedule.len(),
        "starting the load"
    );
    let (allowed_tx, allowed_rx) = watch::channel(0);
    let started = Instant::now();
    let load = async {
        let outcomes = driver.run(&plan, allowed_rx).await;
        (outcomes, started.elapsed())
    };
    let faults = run_faults(
        &mut stack,
        &env,
        &schedule,
        &driver.counters,
        &allowed_tx,
        scenario.voters,
        started,
    );
    let injected = inject_poison(
        env.nats(landslide_nats::User::Ingest),
        &poison,
        &driver.counters,
        scenario,
    );
    let ((outcomes, load_time), (fault_records, deaths), injected) =
        tokio::join!(load, faults, injected);
    tracing::info!(
        ?load_time,
        "load finished; waiting for the workers to drain"
    );

    let mut report = Report::new(scenario, &plan, &driver.counters, load_time);
    report.clock_offsets = clock_offsets;
    report.faults = fault_records;
    report.deaths = deaths;
    report.replay = scenario.replay();
    if let Err(e) = injected {
        report.failures.push(format!("{e:#}"));
    }
    let after_load = stack.roles.restart_dead("after the load").await;
    report.deaths.extend(after_load);
    if let Err(e) = stack.nats.check_running() {
        report.failures.push(format!("{e:#}"));
    }
    drain(&mut report, &mut stack, &env, scenario.drain_timeout).await?;
    check_outcome(&mut report, &stack, &env, &outcomes, &poison).await?;
    // A role that died while the outcome was checked is a finding too.
    for death in stack.roles.restart_dead("after the drain").await {
        report.failures.push(death.to_string());
        report.deaths.push(death);
    }

    if !report.passed() {
        report.logs = Some(dir.keep());
    }
    Ok(report)
}

/// Waits for the workers to drain the stream. A role that dies meanwhile is started again and
/// the wait goes on, so that what it left undrained is counted after all; when it cannot be
/// started again, the wait stops, and the votes not counted are "not drained", never "lost".
async fn drain(
    report: &mut Report,
    stack: &mut Stack,
    env: &RoleEnv,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        let roles = &mut stack.roles;
        let wait = check::wait_drained(env.nats(landslide_nats::User::Admin), left, || {
            roles.any_exited()
        });
        match wait.await? {
            check::Drain::Done(_) => {
                report.drain_time = Some(started.elapsed());
                return Ok(());
            }
            check::Drain::Pending(pending) => {
                let pending = match pending {
                    u64::MAX => "the backlog could not be read".to_owned(),
                    n => format!("{n} messages pending"),
                };
                report.failures.push(format!(
                    "the workers did not drain the stream within {}s: {pending}",
                    timeout.as_secs()
                ));
                return Ok(());
            }
            check::Drain::RoleDied => {
                let deaths = stack.roles.restart_dead("while the workers drained").await;
                let gone: Vec<String> = deaths
                    .iter()
                    .filter(|d| d.restarted.is_err())
                    .map(|d| format!("{} exited ({})", d.name, d.status))
                    .collect();
                report.deaths.extend(deaths);
                if !gone.is_empty() {
                    report.not_drained_because = Some(gone.join(", "));
                    return Ok(());
                }
            }
        }
    }
}

/// Injects each fault once the load reaches its point, and holds the load back from the next
/// fault's point until this one is over, so that every fault happens under load.
async fn run_faults(
    stack: &mut Stack,
    env: &RoleEnv,
    schedule: &[Fault],
    counters: &Counters,
    allowed: &watch::Sender<usize>,
    voters: usize,
    started: Instant,
) -> (Vec<FaultRecord>, Vec<roles::RoleDeath>) {
    let mut records = Vec::new();
    let mut deaths = Vec::new();
    let admin = env.nats(landslide_nats::User::Admin);
    allowed.send_replace(schedule.first().map_or(voters, |f| f.at_voter));
    for (j, fault) in schedule.iter().enumerate() {
        let mut poll = Backoff::constant(Duration::from_millis(10));
        while counters.voters_started.load(Ordering::Relaxed) < fault.at_voter {
            poll.pause().await;
        }
        allowed.send_replace(schedule.get(j + 1).map_or(voters, |f| f.at_voter));
        let before = if fault.kind.restarts_nats() {
            stream::before_fault(admin).await
        } else {
            None
        };
        let at = started.elapsed();
        tracing::info!(fault = fault.kind.label(), "injecting");
        let result = faults::inject(stack, fault).await;
        let mut record = FaultRecord {
            kind: fault.kind,
            at_voter: fault.at_voter,
            started: at,
            took: started.elapsed() - at,
            detail: String::new(),
            error: None,
            stream: None,
        };
        match result {
            Ok(detail) => record.detail = detail,
            Err(e) => record.error = Some(format!("{e:#}")),
        }
        // After every nats-server restart: did the stream keep what it had, and is the
        // workers' consumer still within it?
        if fault.kind.restarts_nats() {
            // 30 s: after every restart the servers answered JetStream already
            // (`Nats::restart` waits for it); the stream's leader is elected within seconds.
            let check = stream::after_restart(admin, before, Duration::from_secs(30)).await;
            record.stream = Some(check);
        }
        // A role that died of the fault without being its target is a finding too; it is
        // started again so that the run goes on.
        let phase = format!("during the fault \"{}\"", fault.kind.label());
        let crashed = stack.roles.restart_dead(&phase).await;
        if !crashed.is_empty() && record.error.is_none() {
            let names: Vec<String> = crashed
                .iter()
                .map(|d| format!("{} exited ({})", d.name, d.status))
                .collect();
            record.error = Some(names.join("; "));
        }
        deaths.extend(crashed);
        tracing::info!(fault = fault.kind.label(), detail = %record.detail, error = ?record.error, "fault over");
        records.push(record);
    }
    allowed.send_replace(voters);
    (records, deaths)
}

/// Publishes the malformed messages straight into the stream, spread over the load, each
/// retried with its own message id until JetStream stores it.
async fn inject_poison(
    nats: &landslide_nats::NatsConfig,
    poison: &[Vec<u8>],
    counters: &Counters,
    scenario: &Scenario,
) -> anyhow::Result<()> {
    use async_nats::jetstream::message::PublishMessage;
    // As an ingest node: only ingest's user may publish to the votes subjects.
    let client =
        landslide_nats::connect(nats, landslide_nats::User::Ingest, "landslide-chaos-poison")
            .await?;
    let js = async_nats::jetstream::new(client);
    let subject = format!(
        "{}.chaos-injector",
        landslide_nats::Topology::default().votes_prefix
    );
    for (i, payload) in poison.iter().enumerate() {
        let at = (i + 1) * scenario.voters / (poison.len() + 1);
        let mut poll = Backoff::constant(Duration::from_millis(20));
        while counters.voters_started.load(Ordering::Relaxed) < at {
            poll.pause().await;
        }
        let id = format!("chaos-poison-{}-{i}", scenario.seed);
        let mut backoff = Backoff::constant(Duration::from_millis(200)).within(
            Duration::from_secs(180),
            format!("malformed message {i} to be published"),
        );
        loop {
            let message = PublishMessage::build()
                .payload(payload.clone().into())
                .message_id(&id);
            let ack = async { js.send_publish(subject.clone(), message).await?.await };
            match tokio::time::timeout(Duration::from_secs(3), ack).await {
                Ok(Ok(_)) => break,
                _ => {
                    if backoff.wait().await.is_err() {
                        anyhow::bail!("malformed message {i} could not be published within 180 s")
                    }
                }
            }
        }
    }
    Ok(())
}

/// Fills in the report's figures and failures once the stream is drained.
async fn check_outcome(
    report: &mut Report,
    stack: &Stack,
    env: &RoleEnv,
    outcomes: &[workload::VoterOutcome],
    poison: &[Vec<u8>],
) -> anyhow::Result<()> {
    for outcome in outcomes {
        for error in &outcome.errors {
            report.voter_errors += 1;
            if report.voter_errors <= 5 {
                report.failures.push(format!("voter: {error}"));
            }
        }
        report.ambiguous += usize::from(outcome.ambiguous);
    }
    let stored = check::read_database(&env.database_url).await?;
    // Left empty where the stream itself is gone (a lazy server's power cut can take it): the
    // verdict below finds the votes it lost.
    report.partition_messages =
        check::partition_messages(env.nats(landslide_nats::User::Admin), env.vote_partitions)
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "cannot count the partitions' messages"
                );
                Vec::new()
            });
    let verdict = check::compare(outcomes, &stored.ballots);
    let mut counted = std::collections::BTreeMap::<String, i64>::new();
    for ballot in &stored.ballots {
        *counted.entry(ballot.choice.clone()).or_default() += 1;
    }
    let nonzero = |m: &std::collections::BTreeMap<String, i64>| {
        m.iter()
            .filter(|(_, n)| **n != 0)
            .map(|(k, n)| (k.clone(), *n))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    report.tally_exact = nonzero(&stored.tallies) == counted;
    if !report.tally_exact {
        report.failures.push(format!(
            "tallies {:?} differ from the ballots' count {counted:?}",
            stored.tallies
        ));
    }
    let results = check::settled_results(
        &stack.roles.tally.base_url(),
        &verdict.expected,
        Duration::from_secs(30),
    )
    .await?;
    report.results_match = nonzero(&results.counts) == verdict.expected && results.pending == 0;
    if !report.results_match {
        report.failures.push(format!(
            "the results API shows {:?} with {} pending; the voters were told {:?}",
            results.counts, results.pending, verdict.expected
        ));
    }
    report.ballots = stored.ballots.len();
    report.doubled = verdict.doubled;
    report.phantom = verdict.phantom;
    report.orphaned = verdict.orphaned;
    report.expected = verdict.expected;
    match &report.not_drained_because {
        // The drain stopped because a role died: what is not counted is not drained, and the
        // lookup below says whether it is in the stream.
        Some(why) => {
            report.not_drained = verdict.lost + verdict.misordered;
            report.failures.extend(
                verdict
                    .examples
                    .iter()
                    .map(|e| format!("not drained ({why}): {e}")),
            );
        }
        None => {
            report.lost = verdict.lost;
            report.misordered = verdict.misordered;
            report.failures.extend(verdict.examples);
        }
    }
    if !verdict.suspects.is_empty() {
        look_up(report, stack, env, outcomes, &verdict.suspects).await;
    }
    for death in &report.deaths {
        report.failures.push(death.to_string());
    }

    // A stream that is gone (a power cut of a server that did not fsync) is a finding.
    let dead = match check::dead_letters(env.nats(landslide_nats::User::Admin)).await {
        Ok(dead) => dead,
        Err(e) => {
            report
                .failures
                .push(format!("the dead letters cannot be read: {e:#}"));
            Vec::new()
        }
    };
    report.poison_injected = poison.len();
    report.poison_dead_lettered = poison.iter().filter(|p| dead.contains(p)).count();
    report.dead_letters = dead.len();
    let unexpected = dead.iter().filter(|d| !poison.contains(d)).count();
    if report.poison_dead_lettered != poison.len() || unexpected > 0 {
        report.failures.push(format!(
            "{} of {} malformed messages are in VOTES_DLQ, beside {unexpected} others",
            report.poison_dead_lettered,
            poison.len()
        ));
    }

    let audit = tokio::process::Command::new(&env.landslide)
        .args(["audit", "--wait-secs", "60"])
        .envs(env.nats(landslide_nats::User::Audit).env())
        .env(
            "DATABASE_URL",
            env.database_url_for(landslide_nats::User::Audit),
        )
        .env("LANDSLIDE_STREAM_REPLICAS", env.replicas.to_string())
        .env("LANDSLIDE_VOTE_PARTITIONS", env.vote_partitions.to_string())
        .env(
            "LANDSLIDE_ACK_WAIT_MS",
            env.ack_wait.as_millis().to_string(),
        )
        .env("RUST_LOG", "warn")
        .output()
        .await
        .context("cannot run landslide audit")?;
    let text = String::from_utf8_lossy(&audit.stdout);
    report.audit = text.lines().next().unwrap_or("(no output)").to_owned();
    report.audit_passed = audit.status.success();
    if !report.audit_passed {
        report.failures.push(format!(
            "landslide audit failed ({}):\n{text}{}",
            audit.status,
            String::from_utf8_lossy(&audit.stderr)
        ));
    }
    for record in &report.faults {
        if let Some(error) = &record.error {
            report
                .failures
                .push(format!("fault {}: {error}", record.kind.label()));
        }
        if let Some(regression) = record.stream.as_ref().and_then(|s| s.regression()) {
            report.regressions += 1;
            report.failures.push(format!(
                "after the fault {} at {:.1} s: {regression}",
                record.kind.label(),
                record.started.as_secs_f64()
            ));
        }
    }
    Ok(())
}

/// Looks up every vote of the lost and misordered voters in the stream (or, when it cannot be
/// read, in each node's store on disk), so that the report says whether NATS holds them.
async fn look_up(
    report: &mut Report,
    stack: &Stack,
    env: &RoleEnv,
    outcomes: &[workload::VoterOutcome],
    suspects: &[check::Suspect],
) {
    let admin = env.nats(landslide_nats::User::Admin);
    let voters = suspects.iter().map(|s| s.voter).collect();
    let read = tokio::time::timeout(
        Duration::from_secs(120),
        stream::find_in_stream(admin, &voters),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("reading took over 120 s")));
    let named = suspects.len();
    match read {
        Ok(found) => {
            let position = stream::position(admin).await.ok();
            report.lookups.push(format!(
                "the named voters' votes in the stream ({}):",
                position.map_or("position unknown".to_owned(), |p| p.to_string())
            ));
            let holder = stream::Holder::Stream(position);
            let (lines, missing) = stream::explain(suspects, outcomes, &holder, &found);
            report.lookups.extend(lines);
            report.failures.push(if missing == 0 {
                format!(
                    "all {named} named voters' latest accepted votes are in the stream: \
                     NATS has them, the pipeline did not count them"
                )
            } else {
                format!(
                    "{missing} of {named} named voters' latest accepted votes are NOT in the \
                     stream: lost by NATS"
                )
            });
        }
        Err(e) => {
            report.lookups.push(format!(
                "the stream cannot be read ({e:#}); the nats-servers' stores on disk instead:"
            ));
            for node in 0..stack.nats.len() {
                let name = stack.nats.name(node).to_owned();
                match stream::find_in_store(stack.nats.store_dir(node), &voters) {
                    Ok(found) => {
                        let holder = stream::Holder::Store(name.clone());
                        let (lines, missing) = stream::explain(suspects, outcomes, &holder, &found);
                        report.lookups.extend(lines);
                        report.failures.push(format!(
                            "{missing} of {named} named voters' latest accepted votes are not \
                             in {name}'s store"
                        ));
                    }
                    Err(e) => report
                        .lookups
                        .push(format!("  {name}'s store cannot be read: {e:#}")),
                }
            }
        }
    }
}
