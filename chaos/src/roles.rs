//! The Landslide roles, each a separate process of the real `landslide` binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use landslide_nats::{NatsConfig, User};
use landslide_patience::Backoff;
use landslide_schema::postgres::LoginRole;
use landslide_servers::{Place, Process, free_port};

/// What every role is started with.
#[derive(Debug, Clone)]
pub struct RoleEnv {
    pub landslide: PathBuf,
    /// How each role's user connects to the servers.
    pub nats: std::collections::HashMap<User, NatsConfig>,
    pub replicas: usize,
    /// Vote partitions (`LANDSLIDE_VOTE_PARTITIONS`): ingest node `web<n>` publishes to
    /// partition `(n - 1) mod K`, so that every partition takes votes.
    pub vote_partitions: u16,
    /// The schema owner's URL (the harness reads the database with it).
    pub database_url: String,
    /// Each role's own database user's URL, as every deployment connects them.
    pub role_urls: std::collections::HashMap<LoginRole, String>,
    /// The folder of ingest's and tally's key files (`cookie-keys`, `voter-id-key`,
    /// `receipt-key`), each role given only its own.
    pub keys: PathBuf,
    pub ack_wait: Duration,
    /// Where each ingest node and worker runs, by name (`web1`, `worker1`); loopback if absent.
    pub places: BTreeMap<String, Place>,
}

impl RoleEnv {
    /// How `user` connects to the servers.
    pub fn nats(&self, user: User) -> &NatsConfig {
        self.nats
            .get(&user)
            .unwrap_or_else(|| unreachable!("every user has a configuration"))
    }

    /// The database URL of a role whose NATS user is `user`: its own login role.
    pub fn database_url_for(&self, user: User) -> &str {
        landslide_servers::login_role(user)
            .and_then(|role| self.role_urls.get(&role))
            .map_or(self.database_url.as_str(), String::as_str)
    }

    fn place(&self, name: &str) -> Place {
        self.places.get(name).cloned().unwrap_or_default()
    }

    /// A free address for role `name` to listen on, at its place.
    fn listen_addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        Ok(SocketAddr::from((self.place(name).addr(), free_port()?)))
    }

    /// A `landslide <role>` process with the shared settings, as `user`, at its place.
    fn process(&self, name: &str, role: &str, user: User, dir: &Path) -> Process {
        let mut process = Process::new(name, &self.landslide, dir.join(format!("{name}.log")))
            .at(&self.place(name))
            .arg(role);
        for (var, value) in self.nats(user).env() {
            process = process.env(var, value);
        }
        if matches!(role, "ingest" | "tally") {
            process = process.env(
                "LANDSLIDE_RECEIPT_KEY_FILE",
                self.keys.join("receipt-key").display(),
            );
        }
        if role == "ingest" {
            process = process
                .env(
                    "LANDSLIDE_COOKIE_KEYS_FILE",
                    self.keys.join("cookie-keys").display(),
                )
                .env(
                    "LANDSLIDE_VOTER_ID_KEY_FILE",
                    self.keys.join("voter-id-key").display(),
                );
        }
        process
            .env("LANDSLIDE_STREAM_REPLICAS", self.replicas)
            .env("LANDSLIDE_VOTE_PARTITIONS", self.vote_partitions)
            .env("LANDSLIDE_ACK_WAIT_MS", self.ack_wait.as_millis())
            .env("DATABASE_URL", self.database_url_for(user))
            .env("RUST_LOG", "info,async_nats=warn")
            // Results and pending counts refresh quickly, so that the harness sees the end soon.
            .env("LANDSLIDE_REFRESH_MS", 200)
    }
}

/// How many times [`Roles::restart_dead`] starts one role again.
pub const MAX_RESTARTS: usize = 3;

/// A role that exited on its own: a verdict of its own in the report.
#[derive(Debug, Clone)]
pub struct RoleDeath {
    /// `worker2`, `web1`, `tally`.
    pub name: String,
    /// `exit status: 1`, `signal: 6 (SIGABRT)`.
    pub status: String,
    /// When the harness noticed it: after which fault, or while draining.
    pub phase: String,
    /// The role's log, in the run's folder.
    pub log: PathBuf,
    /// Whether it was started again (and became healthy), or why not.
    pub restarted: Result<(), String>,
}

impl std::fmt::Display for RoleDeath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exited ({}) {}; ", self.name, self.status, self.phase)?;
        match &self.restarted {
            Ok(()) => write!(f, "started again")?,
            Err(e) => write!(f, "not started again: {e}")?,
        }
        write!(f, "; its log: {}", self.log.display())
    }
}

/// How far beyond its deliberate skew an ingest node's clock may stray: the default bound.
const CLOCK_BOUND_SLACK_MS: u64 = 2_000;

/// A role process and where it answers health checks.
#[derive(Debug)]
pub struct Role {
    pub process: Process,
    /// The HTTP address of an ingest node or tally, the metrics address of a worker.
    pub addr: SocketAddr,
    /// Its operations listener (`LANDSLIDE_METRICS_LISTEN`): `/metrics`, as every deployment
    /// serves it, apart from the pages.
    pub metrics_addr: SocketAddr,
    health_path: &'static str,
    /// How many times [`Roles::restart_dead`] started it again.
    restarts: usize,
}

impl Role {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where its `/metrics` is.
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_addr)
    }

    /// A role of `process`, answering `health_path` at `addr`, its metrics at `metrics_addr`,
    /// started and healthy.
    async fn launch(
        process: Process,
        addr: SocketAddr,
        metrics_addr: SocketAddr,
        health_path: &'static str,
    ) -> anyhow::Result<Self> {
        let process = process.env("LANDSLIDE_METRICS_LISTEN", metrics_addr);
        let mut role = Self {
            process,
            addr,
            metrics_addr,
            health_path,
            restarts: 0,
        };
        role.start().await?;
        Ok(role)
    }

    /// Starts the process and waits until its health check answers 200.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        self.process.start()?;
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let url = format!("{}{}", self.base_url(), self.health_path);
        let client = reqwest::Client::new();
        let mut backoff = Backoff::constant(Duration::from_millis(50))
            .within(Duration::from_secs(60), "the health check");
        loop {
            self.process.check_running()?;
            if let Ok(response) = client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
            }
            if backoff.wait().await.is_err() {
                bail!("{} did not become healthy within 60 s", self.process.name());
            }
        }
    }
}

/// Every role of one deployment.
#[derive(Debug)]
pub struct Roles {
    pub ingest: Vec<Role>,
    pub workers: Vec<Role>,
    pub tally: Role,
    /// Each ingest node's clock offset, in milliseconds.
    pub clock_offsets: Vec<i64>,
}

impl Roles {
    /// Starts a worker first (it creates the streams and the consumer), then everything else.
    pub async fn start(
        env: &RoleEnv,
        dir: &Path,
        clock_offsets: &[i64],
        workers: usize,
    ) -> anyhow::Result<Self> {
        let mut worker_roles = Vec::new();
        for i in 0..workers {
            worker_roles.push(Self::start_worker(env, dir, i + 1).await?);
        }
        if workers == 0 {
            // The others wait for what a worker sets up (the benchmark starts its workers
            // later): set it up as a worker would.
            set_up_as_a_worker(env).await?;
        }
        let mut ingest = Vec::new();
        for (i, offset) in clock_offsets.iter().enumerate() {
            ingest.push(Self::start_ingest(env, dir, &format!("web{}", i + 1), *offset).await?);
        }
        let addr = env.listen_addr("tally")?;
        let tally = env
            .process("tally", "tally", User::Tally, dir)
            .env("LANDSLIDE_LISTEN", addr);
        let metrics = env.listen_addr("tally")?;
        let tally = Role::launch(tally, addr, metrics, "/readyz").await?;
        Ok(Self {
            ingest,
            workers: worker_roles,
            tally,
            clock_offsets: clock_offsets.to_vec(),
        })
    }

    /// Starts ingest node `name` (its node id, and the name of its log) with its clock shifted
    /// by `offset` milliseconds; returns once it is ready. Its clock bound admits the shift with
    /// the default bound's 2 s to spare: a skew the harness gives a node on purpose is one the
    /// design must tolerate, and the harness checks that its votes still count in order.
    pub async fn start_ingest(
        env: &RoleEnv,
        dir: &Path,
        name: &str,
        offset: i64,
    ) -> anyhow::Result<Role> {
        let addr = env.listen_addr(name)?;
        let process = env
            .process(name, "ingest", User::Ingest, dir)
            .env("LANDSLIDE_NODE_ID", name)
            .env("LANDSLIDE_LISTEN", addr)
            .env("LANDSLIDE_CLOCK_OFFSET_MS", offset)
            .env(
                "LANDSLIDE_MAX_CLOCK_OFFSET_MS",
                offset.unsigned_abs() + CLOCK_BOUND_SLACK_MS,
            )
            // Half the default: outages turn into 503s (and their ambiguous publishes) sooner.
            .env("LANDSLIDE_PUBLISH_TIMEOUT_MS", 1000)
            // Every voter of the harness and of the benchmark comes from one address (loopback,
            // or the harness's in a network), far beyond one client's rate: no per-client limit.
            .env("LANDSLIDE_RATE_LIMIT", 0);
        // `web<n>` on partition (n - 1) mod K: every partition takes votes, however few nodes.
        let process = match name.strip_prefix("web").and_then(|n| n.parse::<u16>().ok()) {
            Some(n) if n >= 1 => {
                process.env("LANDSLIDE_PARTITION", (n - 1) % env.vote_partitions.max(1))
            }
            _ => process,
        };
        let metrics = env.listen_addr(name)?;
        Role::launch(process, addr, metrics, "/readyz").await
    }

    /// Starts dedup-worker number `n` (its name and log are `worker<n>`).
    pub async fn start_worker(env: &RoleEnv, dir: &Path, n: usize) -> anyhow::Result<Role> {
        let name = format!("worker{n}");
        let addr = env.listen_addr(&name)?;
        let process = env.process(&name, "dedup-worker", User::Worker, dir);
        Role::launch(process, addr, addr, "/healthz").await
    }

    /// Every role that exited on its own since the last call, each started again (up to
    /// [`MAX_RESTARTS`] times per role), so that the run goes on and the drain shows what the
    /// dead role left behind. A death is a finding of its own, never a reason to call the votes
    /// it had not drained lost.
    pub async fn restart_dead(&mut self, phase: &str) -> Vec<RoleDeath> {
        let mut deaths = Vec::new();
        for role in self
            .ingest
            .iter_mut()
            .chain(self.workers.iter_mut())
            .chain(std::iter::once(&mut self.tally))
        {
            let Some(status) = role.process.exited() else {
                continue;
            };
            let mut death = RoleDeath {
                name: role.process.name().to_owned(),
                status: status.to_string(),
                phase: phase.to_owned(),
                log: role.process.log().to_path_buf(),
                restarted: Err(format!("restarted {MAX_RESTARTS} times already")),
            };
            if role.restarts < MAX_RESTARTS {
                role.restarts += 1;
                death.restarted = role.start().await.map_err(|e| format!("{e:#}"));
            }
            deaths.push(death);
        }
        deaths
    }

    /// Whether a role has exited on its own ([`Roles::restart_dead`] starts it again).
    pub fn any_exited(&mut self) -> bool {
        self.ingest
            .iter_mut()
            .chain(self.workers.iter_mut())
            .chain(std::iter::once(&mut self.tally))
            .any(|role| role.process.has_exited())
    }
}

/// What a dedup-worker sets up when it starts, as the workers' user: the streams, the consumer,
/// and the polls bucket seeded with the default poll. Ingest waits for it, not ready meanwhile.
pub async fn set_up_as_a_worker(env: &RoleEnv) -> anyhow::Result<()> {
    let client =
        landslide_nats::connect(env.nats(User::Worker), User::Worker, "landslide-harness").await?;
    let js = async_nats::jetstream::new(client);
    let topology = landslide_nats::Topology {
        replicas: env.replicas,
        ack_wait: Some(env.ack_wait),
        vote_partitions: env.vote_partitions,
        ..landslide_nats::Topology::default()
    };
    landslide_nats::partitions::ensure_consumers(&js, &topology, landslide_nats::Access::SetUp)
        .await?;
    let store =
        landslide_nats::polls::ensure_bucket(&js, &topology, landslide_nats::Access::SetUp).await?;
    landslide_nats::polls::load(
        &store,
        &landslide_schema::Polls::default(),
        landslide_nats::Access::SetUp,
    )
    .await?;
    Ok(())
}
