//! `landslide`: one binary for every role of the vote-capture pipeline.
//!
//! `up` runs the whole system on one machine; `ingest`, `dedup-worker` and `tally` run one role
//! each; `audit` checks the database against the stream, and `replay` folds the stream into
//! the database again; `migrate` applies the schema as its owner, and `db-users` sets up the
//! roles' database users. Each subcommand reads its configuration
//! once, from flags and the environment, and fails before binding anything if it is incomplete.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use landslide_config::{Connections, Shutdown};
use landslide_nats::auth::{CredentialSettings, Tls};
use landslide_nats::{Access, NatsConfig, Topology, User};
use landslide_schema::postgres::{DatabaseUrl, LoginRole};
use landslide_schema::{NodeId, Polls};
use landslide_telemetry::serve::MetricsAt;

mod keys;
mod local;

/// jemalloc rather than glibc malloc: under load, glibc's arena locks cost ingest a quarter of its
/// CPU in lock waits and wake-ups (BENCHMARKS.md, "What the profiles showed").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "landslide",
    version,
    about = "Vote capture that counts every accepted vote exactly once."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system on this machine: nats-server, PostgreSQL, ingest, a worker, tally.
    Up(UpArgs),
    /// Run one ingest node: the voting form and API.
    Ingest(IngestArgs),
    /// Run one dedup-worker: stream to ballots and tallies.
    DedupWorker(WorkerArgs),
    /// Serve the results: live page and JSON API.
    Tally(TallyArgs),
    /// Check ballots and tallies against every vote in the stream; exit 1 on any difference.
    Audit(AuditArgs),
    /// Fold the whole votes stream into the database again: after restoring a backup, or into a
    /// new database. Idempotent, and safe beside running workers.
    Replay(ReplayArgs),
    /// The poll definitions every role reads, one revision each, in the polls bucket.
    Polls(PollsArgs),
    /// Audit, then write one poll's published record to a folder: its event log, ballots,
    /// revisions and certificate, signed with the owner's key; exit 1 unless the audit is
    /// consistent.
    Export(ExportArgs),
    /// Check a poll's published record (from `export`) with no server and no secret: the owner's
    /// signature, the event log, and the ballots and counts folded again from the events; with
    /// --receipt, what became of that vote. Exit 1 if anything does not hold.
    Verify(VerifyArgs),
    /// Make a poll owner's signing key: writes the private key to a new file (owner-only) and
    /// prints the public key to put in the poll's definition (owner_key) before it opens.
    Keygen(KeygenArgs),
    /// Print each poll's state and counts, the pending votes, and the state of the streams and
    /// the workers' consumer (what `nats stream info` and `nats consumer info` would show).
    Status(StatusArgs),
    /// Make a deployment's TLS files: its own CA (once) and a server certificate signed by it,
    /// for every name and address clients use. Running it again keeps what is already right.
    Certs(CertsArgs),
    /// Apply the database migrations, as the schema's owner (DATABASE_URL). The other roles may
    /// not change the schema, and refuse to start until it is current.
    Migrate(MigrateArgs),
    /// Create or update the login roles the processes connect as (landslide_worker,
    /// landslide_tally, landslide_audit), with passwords from files; DATABASE_URL is a user
    /// with CREATEROLE. Run `migrate` first: it creates their groups.
    DbUsers(DbUsersArgs),
    /// Print the bcrypt hash of a broker user's password, as nats-server takes it in place of
    /// the password (LANDSLIDE_NATS_<USER>_PASSWORD_HASH, which nats/auth.conf reads). The
    /// password comes from a file, read as the role reads its NATS_PASSWORD_FILE.
    NatsPasswordHash(NatsPasswordHashArgs),
}

#[derive(Debug, Args)]
struct NatsPasswordHashArgs {
    /// The file that holds the password (a trailing newline is not part of it).
    #[arg(long)]
    password_file: PathBuf,
}

#[derive(Debug, Args)]
struct CertsArgs {
    /// Folder of the CA (ca.pem, ca-key.pem) and the certificates (<NAME>-cert.pem,
    /// <NAME>-key.pem); created if missing. Keep ca-key.pem where only the operator can read it.
    #[arg(long)]
    dir: PathBuf,
    /// The certificate's name, e.g. nats or postgres: its files are <NAME>-cert.pem and
    /// <NAME>-key.pem.
    #[arg(long, default_value = "nats")]
    name: String,
    /// Every host name and IP address clients reach the servers by, comma-separated: one
    /// certificate serves every node of a cluster.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// What the certificate is for: `server` (a NATS client port, PostgreSQL, HTTP: server
    /// authentication only) or `route` (NATS cluster routes, which verify each other both ways;
    /// name it nats-route and give it to NATS nodes only).
    #[arg(long, default_value = "server")]
    purpose: String,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

#[derive(Debug, Args)]
struct DbUsersArgs {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The password of landslide_worker (dedup-workers, replay): the file's first line.
    #[arg(long)]
    worker_password_file: Option<PathBuf>,
    /// The password of landslide_tally.
    #[arg(long)]
    tally_password_file: Option<PathBuf>,
    /// The password of landslide_audit (audit, export, status).
    #[arg(long)]
    audit_password_file: Option<PathBuf>,
}

impl DbUsersArgs {
    fn password_file(&self, role: LoginRole) -> Option<&PathBuf> {
        match role {
            LoginRole::Worker => self.worker_password_file.as_ref(),
            LoginRole::Tally => self.tally_password_file.as_ref(),
            LoginRole::Audit => self.audit_password_file.as_ref(),
        }
    }
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
}

#[derive(Debug, Args)]
struct PollsArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(subcommand)]
    action: PollsAction,
}

#[derive(Debug, Subcommand)]
enum PollsAction {
    /// Check a polls file and write it as the next revision; running roles pick it up.
    Put {
        /// The polls file (TOML).
        file: PathBuf,
    },
    /// Print a revision (default: the latest) as a polls file.
    Show {
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// Settings every role shares.
#[derive(Debug, Args, Clone)]
struct Shared {
    /// NATS server(s), comma-separated for a cluster.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(flatten)]
    nats_auth: NatsAuthArgs,
    /// The data folder of a running `landslide up`: connect to its servers, as this command's
    /// own user, with the settings `up` wrote to <DIR>/env, instead of NATS_URL, the NATS
    /// credentials, NATS_CA and DATABASE_URL.
    #[arg(long, env = "LANDSLIDE_UP", value_name = "DIR")]
    up: Option<PathBuf>,
    /// A TOML file defining the polls (default: the built-in "pets" poll).
    #[arg(long, env = "LANDSLIDE_POLLS")]
    polls: Option<PathBuf>,
    /// Replicas of the VOTES and VOTES_DLQ streams: 1 on one server, 3 in a cluster.
    #[arg(long, env = "LANDSLIDE_STREAM_REPLICAS", default_value_t = 1, value_parser = parse_replicas)]
    stream_replicas: usize,
    /// The nats-servers' monitoring endpoints (`http://host:8222`, comma-separated): at startup
    /// the role reads their /varz and says loudly if one acks before it fsyncs.
    #[arg(long, env = "LANDSLIDE_NATS_MONITOR_URL")]
    nats_monitor_url: Option<String>,
    /// Test and drill only: the consumer's ack_wait in milliseconds instead of the one in
    /// nats/dedup-worker-consumer.json; every role of a deployment must give the same value.
    #[arg(long, env = "LANDSLIDE_ACK_WAIT_MS", hide = true)]
    ack_wait_ms: Option<u64>,
}

/// How a role proves who it is to NATS (one way of these), and how it checks the server.
#[derive(Debug, Args, Clone, Default)]
struct NatsAuthArgs {
    /// The NATS user (nats/auth.conf: ingest, worker, tally, audit or admin), with a password.
    #[arg(long, env = "NATS_USER")]
    nats_user: Option<String>,
    /// The NATS user's password, from the environment's NATS_PASSWORD only: no flag, since every
    /// user of a host may read a process's arguments.
    #[arg(skip = non_empty_env("NATS_PASSWORD"))]
    nats_password: Option<String>,
    /// A file holding the NATS user's password (instead of the environment's NATS_PASSWORD; what
    /// the deployments give, through systemd's credentials).
    #[arg(long, env = "NATS_PASSWORD_FILE")]
    nats_password_file: Option<PathBuf>,
    /// A NATS token instead of a user, from the environment's NATS_TOKEN only (no flag).
    #[arg(skip = non_empty_env("NATS_TOKEN"))]
    nats_token: Option<String>,
    /// A file holding a NATS token (instead of the environment's NATS_TOKEN).
    #[arg(long, env = "NATS_TOKEN_FILE")]
    nats_token_file: Option<PathBuf>,
    /// A file holding an nkey seed (SU…).
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    nats_nkey_seed_file: Option<PathBuf>,
    /// A NATS .creds file (user JWT and seed), for an operator-mode server.
    #[arg(long, env = "NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the servers' certificates: with it, TLS is required
    /// and each server's certificate is verified.
    #[arg(long, env = "NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// A client certificate (PEM), for servers that verify clients; with NATS_KEY.
    #[arg(long, env = "NATS_CERT", requires = "nats_key")]
    nats_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "NATS_KEY", requires = "nats_cert")]
    nats_key: Option<PathBuf>,
}

impl NatsAuthArgs {
    fn config(&self, urls: &str) -> anyhow::Result<NatsConfig> {
        let credentials = CredentialSettings {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            password_file: self.nats_password_file.clone(),
            token: self.nats_token.clone(),
            token_file: self.nats_token_file.clone(),
            nkey_seed_file: self.nats_nkey_seed_file.clone(),
            creds: self.nats_creds.clone(),
        }
        .credentials()?;
        let client = self.nats_cert.clone().zip(self.nats_key.clone());
        let tls = self.nats_ca.clone().map(|ca| Tls { ca, client });
        Ok(NatsConfig {
            urls: urls.to_owned(),
            credentials,
            tls,
        })
    }
}

impl Shared {
    /// The one connection configuration of every role, which connects as `user` (and to the
    /// database, if it has one, as `role`): NATS (credentials and TLS), the database, the names
    /// and the polls.
    fn connections(
        &self,
        user: User,
        db: Option<(&DatabaseArgs, LoginRole)>,
    ) -> anyhow::Result<Connections> {
        let up = self.up_env()?;
        let database = match db {
            Some((db, role)) => Some(self.database(up.as_ref(), db, role)?),
            None => None,
        };
        let mut connections = Connections::new(self.nats(up.as_ref(), user)?, database);
        connections.topology = self.topology();
        connections.polls = self.polls()?;
        Ok(connections)
    }

    /// `--up`'s env file, read once per command, when `--up` is set.
    fn up_env(&self) -> anyhow::Result<Option<local::UpEnv>> {
        self.up.as_deref().map(local::UpEnv::read).transpose()
    }

    /// How `user` connects to NATS: as `--up`'s env file says, or as the flags do.
    fn nats(&self, up: Option<&local::UpEnv>, user: User) -> anyhow::Result<NatsConfig> {
        match up {
            Some(env) => env.nats_config(user),
            None => self.nats_auth.config(&self.nats_url),
        }
    }

    /// How `role` connects to the database: as `--up`'s env file says, or as `db` does.
    fn database(
        &self,
        up: Option<&local::UpEnv>,
        db: &DatabaseArgs,
        role: LoginRole,
    ) -> anyhow::Result<DatabaseUrl> {
        match up {
            Some(env) => env.database_url(Some(role)),
            None => db.url(),
        }
    }

    /// Says loudly if a server in `--nats-monitor-url` acks before it fsyncs (a client connection
    /// cannot tell, so without the URL nothing is checked).
    async fn check_sync(&self) {
        if let Some(urls) = &self.nats_monitor_url {
            landslide_nats::warn_if_lazy(urls).await;
        }
    }

    fn polls(&self) -> anyhow::Result<Polls> {
        Self::polls_file(self.polls.as_deref())
    }

    /// The polls of a `LANDSLIDE_POLLS` file, or the built-in poll.
    fn polls_file(path: Option<&std::path::Path>) -> anyhow::Result<Polls> {
        match path {
            None => Ok(Polls::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "cannot read the polls file {} (LANDSLIDE_POLLS)",
                        path.display()
                    )
                })?;
                Polls::from_toml(&text).with_context(|| {
                    format!("invalid polls file {} (LANDSLIDE_POLLS)", path.display())
                })
            }
        }
    }

    fn topology(&self) -> Topology {
        Topology {
            replicas: self.stream_replicas,
            ack_wait: self.ack_wait_ms.map(|ms| Duration::from_millis(ms.max(1))),
            ..Topology::default()
        }
    }
}

fn parse_replicas(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        Ok(2) => Err("2 replicas cannot survive the loss of one node; use 1 or 3".to_owned()),
        _ => Err("replicas must be 1, 3 or 5".to_owned()),
    }
}

/// A moment with its offset, such as `2026-12-06T20:00:00Z`.
fn rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 date-time with an offset: {e}"))
}

/// The HTTP server's limits (ingest and tally).
#[derive(Debug, Args, Clone)]
struct HttpArgs {
    /// Milliseconds a client may take to send a request's line and headers; a slower
    /// connection is closed.
    #[arg(long, env = "LANDSLIDE_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Milliseconds a client may take to send a vote's body once its headers are in; a slower
    /// one gets 408 and its connection is closed.
    #[arg(long, env = "LANDSLIDE_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    body_timeout_ms: u64,
    /// Milliseconds a shutdown waits for requests in flight before it closes every connection
    /// still open.
    #[arg(long, env = "LANDSLIDE_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    drain_timeout_ms: u64,
    /// HTTP connections served at once; more wait in the kernel's accept queue.
    #[arg(long, env = "LANDSLIDE_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Serve /metrics (and /healthz) on this address only, not on the public listener, which then
    /// answers /metrics with 404. Unset: /metrics is served on the public listener.
    #[arg(long, env = "LANDSLIDE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

impl HttpArgs {
    fn limits(&self) -> landslide_telemetry::serve::Limits {
        landslide_telemetry::serve::Limits {
            header_read_timeout: Duration::from_millis(self.header_timeout_ms.max(100)),
            body_read_timeout: Duration::from_millis(self.body_timeout_ms.max(100)),
            max_connections: self.max_connections.max(1),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }

    /// Where `/metrics` is served.
    fn metrics(&self) -> MetricsAt {
        match self.metrics_listen {
            Some(_) => MetricsAt::Operations,
            None => MetricsAt::Public,
        }
    }
}

/// The per-client limits of ingest's vote endpoints (ingest, and `up`'s ingest node).
#[derive(Debug, Args, Clone)]
struct ClientLimitArgs {
    /// Votes per second per client address on this node (a fraction is allowed); 0 turns the
    /// limit off. Beyond it: 429 with Retry-After.
    #[arg(long, env = "LANDSLIDE_RATE_LIMIT", default_value_t = landslide_ingest::RateLimit::DEFAULT.per_second())]
    rate_limit: f64,
    /// Votes one client address may send at once before the rate applies.
    #[arg(long, env = "LANDSLIDE_RATE_BURST", default_value_t = landslide_ingest::RateLimit::DEFAULT.burst())]
    rate_burst: u32,
    #[command(flatten)]
    client_ip: ClientIpArg,
}

/// Who the client of a request is, for the per-client limits of ingest and tally.
#[derive(Debug, Args, Clone)]
struct ClientIpArg {
    /// The header a trusted proxy sets to the client's address (X-Forwarded-For: its right-most
    /// entry). Unset: the client is the TCP peer. Set it only behind a proxy that sets it.
    #[arg(long, env = "LANDSLIDE_CLIENT_IP_HEADER")]
    client_ip_header: Option<String>,
}

impl ClientIpArg {
    fn header(&self) -> anyhow::Result<Option<landslide_ingest::ClientIpHeader>> {
        match self.client_ip_header.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(name) => Ok(Some(
                landslide_ingest::ClientIpHeader::parse(name)
                    .context("invalid --client-ip-header (LANDSLIDE_CLIENT_IP_HEADER)")?,
            )),
        }
    }
}

/// An ingest node's `rate_limit` and `client_ip_header`.
type ClientLimits = (
    Option<landslide_ingest::RateLimit>,
    Option<landslide_ingest::ClientIpHeader>,
);

impl ClientLimitArgs {
    fn settings(&self) -> anyhow::Result<ClientLimits> {
        let limit = landslide_ingest::RateLimit::new(self.rate_limit, self.rate_burst).context(
            "invalid --rate-limit or --rate-burst (LANDSLIDE_RATE_LIMIT, LANDSLIDE_RATE_BURST)",
        )?;
        Ok((limit, self.client_ip.header()?))
    }
}

#[derive(Debug, Args)]
struct IngestArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    limits: ClientLimitArgs,
    /// This node's id; its votes go to subject votes.<ID>. Required.
    #[arg(long, env = "LANDSLIDE_NODE_ID")]
    node_id: Option<String>,
    /// Address to serve HTTP on.
    #[arg(long, env = "LANDSLIDE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    keys: KeyArgs,
    /// Milliseconds one publish waits for its JetStream ack.
    #[arg(long, env = "LANDSLIDE_PUBLISH_TIMEOUT_MS", default_value_t = 2000)]
    publish_timeout_ms: u64,
    /// Publish attempts, with the same message id, before answering 503.
    #[arg(long, env = "LANDSLIDE_PUBLISH_ATTEMPTS", default_value_t = 3)]
    publish_attempts: u32,
    /// Milliseconds a vote waits for its ack, queue included, before it is answered 503: keep it
    /// below the load balancer's timeout.
    #[arg(long, env = "LANDSLIDE_VOTE_DEADLINE_MS", default_value_t = 10_000)]
    vote_deadline_ms: u64,
    /// Atomic batches of votes in flight at once (group commit); default 1 on an R1 stream, 4 on
    /// R3.
    #[arg(long, env = "LANDSLIDE_PUBLISH_BATCHES")]
    publish_batches: Option<usize>,
    /// Mark the voter cookie Secure (when served over HTTPS): it is then __Host-landslide_voter,
    /// the only one read, and the site sends HSTS.
    #[arg(long, env = "LANDSLIDE_SECURE_COOKIE")]
    secure_cookie: bool,
    /// With --secure-cookie, until when (RFC 3339) the plain landslide_voter cookie of voters
    /// from before the switch is still read, where no __Host- one is present.
    #[arg(long, env = "LANDSLIDE_PLAIN_COOKIE_UNTIL", value_parser = rfc3339)]
    plain_cookie_until: Option<chrono::DateTime<chrono::Utc>>,
    /// The results page (tally), linked from the form when a poll is not open yet or closed.
    #[arg(long, env = "LANDSLIDE_RESULTS_URL")]
    results_url: Option<String>,
    /// Milliseconds this node's clock may be off from the NATS server's; beyond it, /readyz fails
    /// and votes get 503. Less than the workers' 300000 ms tolerance.
    #[arg(long, env = "LANDSLIDE_MAX_CLOCK_OFFSET_MS", default_value_t = 2000)]
    max_clock_offset_ms: u64,
    /// Test and drill only: shift this node's clock by this many milliseconds.
    #[arg(
        long,
        env = "LANDSLIDE_CLOCK_OFFSET_MS",
        default_value_t = 0,
        hide = true,
        allow_negative_numbers = true
    )]
    clock_offset_ms: i64,
}

impl IngestArgs {
    fn config(&self) -> anyhow::Result<landslide_ingest::Config> {
        let node_id = required(&self.node_id, "--node-id", "LANDSLIDE_NODE_ID")?;
        let node_id = NodeId::parse(node_id)
            .with_context(|| format!("invalid --node-id {node_id:?} (LANDSLIDE_NODE_ID)"))?;
        let mut config = landslide_ingest::Config::new(
            node_id,
            self.shared.connections(User::Ingest, None)?,
            self.keys.files()?.read()?,
        );
        config.clock = Arc::new(landslide_ingest::SystemClock {
            offset_ms: self.clock_offset_ms,
        });
        config.max_clock_offset =
            landslide_ingest::MaxClockOffset::from_millis(self.max_clock_offset_ms)?;
        config.publish_timeout = Duration::from_millis(self.publish_timeout_ms.max(1));
        config.publish_attempts = self.publish_attempts.max(1);
        config.vote_deadline = Duration::from_millis(self.vote_deadline_ms.max(100));
        config.publish_batches = self.publish_batches;
        config.secure_cookie = self.secure_cookie;
        config.plain_cookie_until = self.plain_cookie_until;
        config.results_url = self.results_url.clone();
        config.http = self.http.limits();
        config.metrics = self.http.metrics();
        (config.rate_limit, config.client_ip_header) = self.limits.settings()?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL, with libpq's sslmode (disable, prefer, require, verify-ca,
    /// verify-full), sslrootcert, sslcert and sslkey. Required.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The database user to connect as, instead of DATABASE_URL's: each deployed role's own
    /// login role, while the URL that a host's roles share names only the server.
    #[arg(long, env = "DATABASE_USER")]
    database_user: Option<String>,
    /// A file whose first line is the database password, instead of DATABASE_URL's (systemd
    /// hands a unit its own with LoadCredential).
    #[arg(long, env = "DATABASE_PASSWORD_FILE")]
    database_password_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The URL, parsed (its TLS files read), with DATABASE_USER and DATABASE_PASSWORD_FILE in
    /// place of its own login if set, or an error that names the variable at fault.
    fn url(&self) -> anyhow::Result<DatabaseUrl> {
        let url = DatabaseUrl::parse(required(
            &self.database_url,
            "--database-url",
            "DATABASE_URL",
        )?)?;
        let user = self
            .database_user
            .as_deref()
            .filter(|u| !u.trim().is_empty());
        let password = self
            .database_password_file
            .as_deref()
            .map(landslide_schema::postgres::roles::read_password_file)
            .transpose()
            .context("in DATABASE_PASSWORD_FILE")?;
        Ok(url.with_login(user, password.as_deref())?)
    }
}

/// Where ingest's keys are (`keys`): files, never values, so that no key shows in `argv` or in
/// an environment.
#[derive(Debug, Args)]
struct KeyArgs {
    /// A file of voter-cookie keys, one per line, each at least 32 bytes: the first signs, every
    /// one verifies (rotating them: SECURITY.md). The same on every ingest node.
    #[arg(long, env = "LANDSLIDE_COOKIE_KEYS_FILE")]
    cookie_keys_file: Option<PathBuf>,
    /// A file holding the key (at least 32 bytes) from which the ids of cookie-less keyed votes
    /// derive. The same on every ingest node; never changed while a poll is open.
    #[arg(long, env = "LANDSLIDE_VOTER_ID_KEY_FILE")]
    voter_id_key_file: Option<PathBuf>,
    #[command(flatten)]
    receipts: ReceiptKeyArg,
}

impl KeyArgs {
    /// The files, each of which is required.
    fn files(&self) -> anyhow::Result<keys::KeyFiles> {
        Ok(keys::KeyFiles {
            cookies: required_path(
                &self.cookie_keys_file,
                "--cookie-keys-file",
                "LANDSLIDE_COOKIE_KEYS_FILE",
            )?,
            voter_ids: required_path(
                &self.voter_id_key_file,
                "--voter-id-key-file",
                "LANDSLIDE_VOTER_ID_KEY_FILE",
            )?,
            receipts: self.receipts.file()?,
        })
    }
}

#[derive(Debug, Args)]
struct ReceiptKeyArg {
    /// A file holding the key (at least 32 bytes) that tags receipts: the same for every ingest
    /// node and tally.
    #[arg(long, env = "LANDSLIDE_RECEIPT_KEY_FILE")]
    receipt_key_file: Option<PathBuf>,
}

impl ReceiptKeyArg {
    fn file(&self) -> anyhow::Result<PathBuf> {
        required_path(
            &self.receipt_key_file,
            "--receipt-key-file",
            "LANDSLIDE_RECEIPT_KEY_FILE",
        )
    }
}

fn required_path(value: &Option<PathBuf>, flag: &str, var: &str) -> anyhow::Result<PathBuf> {
    value
        .clone()
        .filter(|path| !path.as_os_str().is_empty())
        .with_context(|| format!("{var} is not set (or pass {flag})"))
}

/// A setting without a default, or an error naming both ways to give it.
fn required<'a>(value: &'a Option<String>, flag: &str, var: &str) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .filter(|v| !v.trim().is_empty())
        .with_context(|| format!("{var} is not set (or pass {flag})"))
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Most messages per transaction.
    #[arg(long, env = "LANDSLIDE_BATCH_SIZE", default_value_t = 1000)]
    batch_size: usize,
    /// Longest wait, in milliseconds, to fill a batch.
    #[arg(long, env = "LANDSLIDE_BATCH_WAIT_MS", default_value_t = 20)]
    batch_wait_ms: u64,
    /// Address to serve /metrics and /healthz on.
    #[arg(
        long,
        env = "LANDSLIDE_METRICS_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    metrics_listen: SocketAddr,
}

impl WorkerArgs {
    fn config(&self) -> anyhow::Result<landslide_dedup_worker::Config> {
        // The consumer's `max_batch` (nats/dedup-worker-consumer.json) refuses larger pulls.
        anyhow::ensure!(
            (1..=1000).contains(&self.batch_size),
            "--batch-size (LANDSLIDE_BATCH_SIZE) must be between 1 and 1000, the consumer's max_batch"
        );
        let mut config = landslide_dedup_worker::Config::new(
            self.shared
                .connections(User::Worker, Some((&self.db, LoginRole::Worker)))?,
        );
        config.batch_size = self.batch_size;
        config.batch_wait = Duration::from_millis(self.batch_wait_ms);
        Ok(config)
    }
}

#[derive(Debug, Args)]
struct TallyArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Address to serve HTTP on.
    #[arg(long, env = "LANDSLIDE_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    #[command(flatten)]
    receipts: ReceiptKeyArg,
    /// Milliseconds between two refreshes of the results.
    #[arg(long, env = "LANDSLIDE_REFRESH_MS", default_value_t = 500)]
    refresh_ms: u64,
    /// Live result streams (server-sent events) at once; one more gets 503 with Retry-After.
    #[arg(long, env = "LANDSLIDE_MAX_EVENT_STREAMS", default_value_t = landslide_tally::DEFAULT_MAX_EVENT_STREAMS)]
    max_event_streams: usize,
    /// Live result streams one client address holds at once; one more gets 429.
    #[arg(long, env = "LANDSLIDE_MAX_EVENT_STREAMS_PER_CLIENT", default_value_t = landslide_tally::DEFAULT_MAX_EVENT_STREAMS_PER_CLIENT)]
    max_event_streams_per_client: usize,
    /// Receipt lookups per second per client address (a fraction is allowed); 0 turns the limit
    /// off. Beyond it: 429 with Retry-After.
    #[arg(long, env = "LANDSLIDE_RECEIPT_RATE_LIMIT", default_value_t = landslide_tally::DEFAULT_RECEIPT_RATE_LIMIT.per_second())]
    receipt_rate_limit: f64,
    /// Receipt lookups one client address may send at once before the rate applies.
    #[arg(long, env = "LANDSLIDE_RECEIPT_RATE_BURST", default_value_t = landslide_tally::DEFAULT_RECEIPT_RATE_LIMIT.burst())]
    receipt_rate_burst: u32,
    #[command(flatten)]
    client_ip: ClientIpArg,
}

impl TallyArgs {
    fn config(&self) -> anyhow::Result<landslide_tally::Config> {
        let mut config = landslide_tally::Config::new(
            self.shared
                .connections(User::Tally, Some((&self.db, LoginRole::Tally)))?,
            keys::receipt_key(&self.receipts.file()?)?,
        );
        config.refresh = Duration::from_millis(self.refresh_ms.max(50));
        config.max_event_streams = self.max_event_streams;
        config.max_event_streams_per_client = self.max_event_streams_per_client;
        config.receipt_rate_limit =
            landslide_tally::RateLimit::new(self.receipt_rate_limit, self.receipt_rate_burst)
                .context(
                    "invalid --receipt-rate-limit or --receipt-rate-burst \
                     (LANDSLIDE_RECEIPT_RATE_LIMIT, LANDSLIDE_RECEIPT_RATE_BURST)",
                )?;
        config.client_ip_header = self.client_ip.header()?;
        config.http = self.http.limits();
        config.metrics = self.http.metrics();
        Ok(config)
    }
}

#[derive(Debug, Args)]
struct AuditArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Seconds to wait for the workers to drain the stream before auditing.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// Also certify this poll: its counts, the stream range read and the digest of its export.
    #[arg(long)]
    poll: Option<String>,
    /// The key that pseudonymises voters in the certified ballots (at least 32 bytes), from the
    /// environment's LANDSLIDE_EXPORT_KEY only: no flag, which every user of the host could read.
    #[arg(skip = non_empty_env("LANDSLIDE_EXPORT_KEY"))]
    export_key: Option<String>,
    /// A file whose first line is the export key (instead of LANDSLIDE_EXPORT_KEY); one of the
    /// two is required with --poll. Keep it: the same key gives the same pseudonyms.
    #[arg(long, env = "LANDSLIDE_EXPORT_KEY_FILE")]
    export_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    audit: AuditArgs,
    /// Where to write the record (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The file of the poll owner's signing key (from `landslide keygen`); required when the
    /// poll names an owner key, whose private half it must be.
    #[arg(long, env = "LANDSLIDE_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// The record's folder, as `export` wrote it.
    dir: PathBuf,
    /// A vote's receipt: says whether that vote is in the record and whether it is the one
    /// counted.
    #[arg(long)]
    receipt: Option<String>,
    /// The owner key the poll's owner published (ed25519:…): refuse a record signed by any
    /// other.
    #[arg(long)]
    owner_key: Option<String>,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Where to write the private key; refused if the file exists.
    #[arg(long)]
    out: PathBuf,
}

impl AuditArgs {
    fn config(&self) -> anyhow::Result<landslide_tally::audit::AuditConfig> {
        let connections = self
            .shared
            .connections(User::Audit, Some((&self.db, LoginRole::Audit)))?;
        Ok(landslide_tally::audit::AuditConfig {
            wait: Duration::from_secs(self.wait_secs),
            ..landslide_tally::audit::AuditConfig::new(connections)
        })
    }

    /// The poll to certify and the export key, both required.
    fn certified(&self) -> anyhow::Result<(&str, landslide_tally::certificate::ExportKey)> {
        let poll = self
            .poll
            .as_deref()
            .context("name the poll to certify with --poll")?;
        let key = match &self.export_key_file {
            Some(path) => landslide_schema::postgres::roles::read_password_file(path)
                .context("in LANDSLIDE_EXPORT_KEY_FILE")?,
            None => self.export_key.clone().context(
                "set LANDSLIDE_EXPORT_KEY or LANDSLIDE_EXPORT_KEY_FILE (at least 32 bytes, kept \
                 by the poll's owner): it pseudonymises the voters of the certified ballots",
            )?,
        };
        Ok((poll, landslide_tally::certificate::ExportKey::new(key)?))
    }
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Where the local nats-server and PostgreSQL keep their data (and the cookie secret).
    #[arg(long, env = "LANDSLIDE_DATA_DIR", default_value = ".landslide")]
    data_dir: PathBuf,
    /// Address of the ingest node (the voting form).
    #[arg(long, default_value = "127.0.0.1:8080")]
    ingest_listen: SocketAddr,
    /// Address of tally (the results).
    #[arg(long, default_value = "127.0.0.1:8081")]
    tally_listen: SocketAddr,
    /// Address of the three roles' /metrics (and /healthz), as every deployment serves them: on
    /// a listener of their own, not beside the pages.
    #[arg(long, default_value = "127.0.0.1:9080")]
    metrics_listen: SocketAddr,
    /// Port of the nats-server that `up` starts (unless NATS_URL is set).
    #[arg(long, default_value_t = local::LocalPorts::default().nats)]
    nats_port: u16,
    /// Port of the PostgreSQL that `up` starts (unless DATABASE_URL is set).
    #[arg(long, default_value_t = local::LocalPorts::default().postgres)]
    postgres_port: u16,
    /// A TOML file defining the polls.
    #[arg(long, env = "LANDSLIDE_POLLS")]
    polls: Option<PathBuf>,
    #[command(flatten)]
    limits: ClientLimitArgs,
    /// Key files to use instead of those `up` generates and keeps in its data folder.
    #[command(flatten)]
    keys: KeyArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("landslide: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("landslide: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let service = match &cli.command {
        Command::Up(_) => "landslide",
        Command::Ingest(_) => "landslide-ingest",
        Command::DedupWorker(_) => "landslide-dedup-worker",
        Command::Tally(_) => "landslide-tally",
        Command::Audit(_) => "landslide-audit",
        Command::Replay(_) => "landslide-replay",
        Command::Polls(_) => "landslide-polls",
        Command::Export(_) => "landslide-export",
        Command::Verify(_) => "landslide-verify",
        Command::Keygen(_) => "landslide-keygen",
        Command::Status(_) => "landslide-status",
        Command::Certs(_) => "landslide-certs",
        Command::Migrate(_) => "landslide-migrate",
        Command::DbUsers(_) => "landslide-db-users",
        Command::NatsPasswordHash(_) => "landslide-nats-password-hash",
    };
    keys::refuse_removed_variables()?;
    let telemetry = landslide_telemetry::init(service)?;
    let result = match cli.command {
        Command::Up(args) => up(args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Ingest(args) => {
            let config = args.config()?;
            let listener = bind(args.listen).await?;
            args.shared.check_sync().await;
            with_operations(args.http.metrics_listen, |shutdown| {
                landslide_ingest::run(config, listener, shutdown)
            })
            .await
            .map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::DedupWorker(args) => {
            let config = args.config()?;
            args.shared.check_sync().await;
            with_operations(Some(args.metrics_listen), |shutdown| {
                landslide_dedup_worker::run(config, shutdown)
            })
            .await
            .map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Tally(args) => {
            let config = args.config()?;
            let listener = bind(args.listen).await?;
            args.shared.check_sync().await;
            with_operations(args.http.metrics_listen, |shutdown| {
                landslide_tally::run(config, listener, shutdown)
            })
            .await
            .map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Audit(args) => audit(args).await,
        Command::Replay(args) => replay(args).await,
        Command::Polls(args) => polls(args).await,
        Command::Export(args) => export(args).await,
        Command::Verify(args) => verify(&args),
        Command::Keygen(args) => keygen(&args),
        Command::Status(args) => status(args).await,
        Command::Certs(args) => certs(&args).map(|()| std::process::ExitCode::SUCCESS),
        Command::Migrate(args) => migrate(args).await,
        Command::DbUsers(args) => db_users(args).await,
        Command::NatsPasswordHash(args) => nats_password_hash(&args),
    };
    telemetry.shutdown();
    result
}

fn nats_password_hash(args: &NatsPasswordHashArgs) -> anyhow::Result<std::process::ExitCode> {
    let password =
        landslide_nats::auth::read_secret(None, Some(&args.password_file), "NATS_PASSWORD")?
            .context("no password")?;
    println!(
        "{}",
        landslide_nats::auth::password_hash(password.expose())?
    );
    Ok(std::process::ExitCode::SUCCESS)
}

fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    use landslide_servers::tls::{Authority, Issued};
    let ca = Authority::open_or_create(&args.dir, "Landslide deployment CA")?;
    let purpose =
        landslide_servers::tls::Purpose::parse(&args.purpose).context("invalid --purpose")?;
    let (files, issued) = ca.issue_or_keep(&args.name, &args.hosts, purpose)?;
    let done = match issued {
        Issued::Kept => "kept, for the same hosts",
        Issued::New => "written",
    };
    println!(
        "CA {}\n{} {} and {}: {done}",
        ca.ca().display(),
        args.name,
        files.cert.display(),
        files.key.display()
    );
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Runs a role until SIGINT or SIGTERM, with an operations listener (`/metrics`, `/healthz`) at
/// `metrics_listen` beside it, if given. The listener is bound first, so an address in use fails
/// before the role starts.
async fn with_operations<F>(
    metrics_listen: Option<SocketAddr>,
    role: impl FnOnce(Shutdown) -> F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let shutdown = Shutdown::on_signal();
    match metrics_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            let operations = shutdown.clone().wait();
            landslide_telemetry::serve::with_operations(listener, operations, role(shutdown)).await
        }
        None => role(shutdown).await,
    }
}

async fn audit(args: AuditArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.config()?;
    let report = if args.poll.is_some() {
        let (poll, key) = args.certified()?;
        let (report, certificate) =
            landslide_tally::certificate::certify(&config, poll, &key, None).await?;
        println!("{report}\n{certificate}");
        report
    } else {
        let report = landslide_tally::audit::audit(&config).await?;
        println!("{report}");
        report
    };
    Ok(if report.is_consistent() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

async fn status(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = landslide_tally::audit::AuditConfig::new(
        args.shared
            .connections(User::Audit, Some((&args.db, LoginRole::Audit)))?,
    );
    println!("{}", landslide_tally::status::status(&config).await?);
    Ok(std::process::ExitCode::SUCCESS)
}

async fn export(args: ExportArgs) -> anyhow::Result<std::process::ExitCode> {
    use landslide_schema::record::OwnerSigningKey;
    let config = args.audit.config()?;
    let (poll, key) = args.audit.certified()?;
    let signing = args
        .signing_key
        .as_deref()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the signing key {}", path.display()))?;
            OwnerSigningKey::from_file_text(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        })
        .transpose()?;
    let export = landslide_tally::certificate::Export {
        out: &args.out,
        signing: signing.as_ref(),
    };
    let (report, certificate) =
        landslide_tally::certificate::certify(&config, poll, &key, Some(export)).await?;
    let signed = if signing.is_some() {
        "signed"
    } else {
        "UNSIGNED (the poll names no owner key; landslide verify refuses it)"
    };
    println!(
        "{report}\n{certificate}\nwrote the record of poll {poll} to {}: events.csv, \
         ballots.csv, revisions/, certificate.json; {signed}",
        args.out.display()
    );
    Ok(if report.is_consistent() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn verify(args: &VerifyArgs) -> anyhow::Result<std::process::ExitCode> {
    use landslide_schema::record::{self, OwnerKey};
    let receipt = args
        .receipt
        .as_deref()
        .map(landslide_schema::receipt::Receipt::read_unauthenticated)
        .transpose()?;
    let expected = args
        .owner_key
        .clone()
        .map(OwnerKey::try_from)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--owner-key: {e}"))?;
    let files = landslide_tally::certificate::read_record(&args.dir)?;
    let verified = match record::check(files, receipt.as_ref()) {
        Ok(verified) => verified,
        Err(refused) => {
            println!("record in {}: REFUSED: {refused}", args.dir.display());
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    if let Some(expected) = expected.filter(|k| *k != verified.owner_key) {
        println!(
            "record in {}: REFUSED: signed by {}, not by the published owner key {expected}",
            args.dir.display(),
            verified.owner_key
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    println!("{verified}");
    let receipt_fine = matches!(
        verified.receipt,
        None | Some(
            record::ReceiptFinding::Counted { .. }
                | record::ReceiptFinding::Superseded { .. }
                | record::ReceiptFinding::NotCounted { .. }
        )
    );
    Ok(if receipt_fine {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn keygen(args: &KeygenArgs) -> anyhow::Result<std::process::ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // rand's thread generator: a CSPRNG seeded from the operating system.
    let key = landslide_schema::record::OwnerSigningKey::from_seed(rand::random());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .with_context(|| format!("cannot create {} (it must not exist)", args.out.display()))?;
    file.write_all(key.to_file_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "wrote the private key to {} (keep it where only the poll's owner can read it)\n\
         put this line in the poll's definition before it opens:\nowner_key = \"{}\"",
        args.out.display(),
        key.public()
    );
    Ok(std::process::ExitCode::SUCCESS)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = landslide_dedup_worker::Config::new(
        args.shared
            .connections(User::Worker, Some((&args.db, LoginRole::Worker)))?,
    );
    let chunk = landslide_dedup_worker::replay::CHUNK;
    let report = landslide_dedup_worker::replay(&config, chunk).await?;
    println!("{report}");
    Ok(std::process::ExitCode::SUCCESS)
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<std::process::ExitCode> {
    let url = args.db.url()?;
    let applied = landslide_schema::postgres::migrate(&url).await?;
    if applied.is_empty() {
        println!("the schema of {url} is current: no migration to apply");
    } else {
        println!(
            "applied {} migration(s) to {url}: {}",
            applied.len(),
            applied.join(", ")
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn db_users(args: DbUsersArgs) -> anyhow::Result<std::process::ExitCode> {
    use landslide_schema::postgres::roles;
    let url = args.db.url()?;
    // Every file is read before anything changes, so that a missing one changes nothing.
    let passwords = LoginRole::ALL
        .into_iter()
        .map(|role| {
            let password = args
                .password_file(role)
                .map(|path| roles::read_password_file(path))
                .transpose()?;
            Ok((role, password))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut conn = landslide_schema::postgres::connect(&url).await?;
    for (role, password) in passwords {
        let changes = roles::ensure_login_role(&mut conn, role, password.as_deref()).await?;
        let mut said = Vec::new();
        if changes.created {
            said.push("created".to_owned());
        }
        if changes.attributes_reset {
            said.push("reset to LOGIN alone".to_owned());
        }
        if changes.joined_group {
            said.push(format!("made a member of {}", role.group()));
        }
        if changes.password_set {
            said.push("password set".to_owned());
        }
        if said.is_empty() {
            said.push("unchanged".to_owned());
        }
        println!("{role} (member of {}): {}", role.group(), said.join(", "));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn polls(args: PollsArgs) -> anyhow::Result<std::process::ExitCode> {
    use landslide_nats::polls;
    let up = args.shared.up_env()?;
    // The polls' owner, or the operator if NATS_USER names them (the user decides the inbox).
    let user = match (&up, args.shared.nats_auth.nats_user.as_deref()) {
        (None, Some("admin")) => User::Admin,
        _ => User::Polls,
    };
    let nats = args.shared.nats(up.as_ref(), user)?;
    let client = landslide_nats::connect(&nats, user, "landslide-polls").await?;
    let js = async_nats::jetstream::new(client);
    let store = polls::ensure_bucket(&js, &args.shared.topology(), Access::SetUp).await?;
    match args.action {
        PollsAction::Put { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the polls file {}", file.display()))?;
            let revision = polls::put(&store, &text)
                .await
                .with_context(|| format!("{} was not written", file.display()))?;
            println!(
                "wrote {} as revision {revision}; running roles pick it up within moments",
                file.display()
            );
        }
        PollsAction::Show { revision } => {
            let contents = polls::read_all(&store).await?;
            for stray in &contents.strays {
                eprintln!("ALARM: {} of the polls bucket: {}", stray.key, stray.why);
            }
            let Some(latest) = contents.latest().map(|stored| stored.revision) else {
                println!(
                    "# the polls bucket is empty: roles seed it from LANDSLIDE_POLLS, or with the \
                     built-in poll, when they start\n{}",
                    Polls::default().to_toml()
                );
                return Ok(std::process::ExitCode::SUCCESS);
            };
            let wanted = revision.map_or(latest, landslide_schema::Revision);
            let stored = contents
                .revisions
                .iter()
                .find(|stored| stored.revision == wanted)
                .with_context(|| format!("there is no revision {wanted} (latest: {latest})"))?;
            println!(
                "# revision {wanted} of {latest}\n{}",
                stored.text.trim_end()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let polls = Shared::polls_file(args.polls.as_deref())?;
    let limits = args.limits.settings()?;
    // Bind every address before starting any server, so a port in use fails at once.
    let listeners = Listeners {
        ingest: bind(args.ingest_listen).await?,
        tally: bind(args.tally_listen).await?,
        operations: bind(args.metrics_listen).await?,
    };
    let mut local = local::LocalConfig::new(&args.data_dir);
    local.nats = non_empty_env("NATS_URL").map(given_nats).transpose()?;
    local.database_url = non_empty_env("DATABASE_URL")
        .map(|url| DatabaseUrl::parse(&url))
        .transpose()?;
    local.keys = local::GivenKeys {
        cookies: args.keys.cookie_keys_file.clone(),
        voter_ids: args.keys.voter_id_key_file.clone(),
        receipts: args.keys.receipts.receipt_key_file.clone(),
    };
    local.ports = local::LocalPorts {
        nats: args.nats_port,
        postgres: args.postgres_port,
    };
    let stack = local::LocalStack::start(local).await?;
    let result = async {
        stack.write_env()?;
        if args.polls.is_some() {
            make_current(&stack.nats_config(User::Polls), &polls).await?;
        }
        run_roles(&stack, polls, limits, listeners, &args.data_dir).await
    }
    .await;
    let stopped = stack.stop().await;
    result.and(stopped)
}

/// The caller's NATS for `up`: each role connects as its own user, with its password from
/// `LANDSLIDE_NATS_<USER>_PASSWORD` (whose hash the server's `nats/auth.conf` reads from
/// `LANDSLIDE_NATS_<USER>_PASSWORD_HASH`), verifying the server against `NATS_CA` if set.
fn given_nats(url: String) -> anyhow::Result<local::NatsUsers> {
    let ca = non_empty_env("NATS_CA").map(PathBuf::from);
    User::ALL
        .into_iter()
        .map(|user| {
            let var = user.password_var();
            let password = non_empty_env(&var).with_context(|| {
                format!(
                    "NATS_URL is set, so `up` uses that server: give each role's password in \
                     {var} and the other LANDSLIDE_NATS_<USER>_PASSWORD variables (the \
                     passwords whose hashes the server's nats/auth.conf reads)"
                )
            })?;
            Ok((
                user,
                NatsConfig::user(url.clone(), user.name(), password, ca.clone()),
            ))
        })
        .collect()
}

/// Writes `polls` (up's `--polls` file) as a new revision unless the bucket's latest already is
/// that: `up` with a file means "these polls", even when the data folder has others.
async fn make_current(nats: &NatsConfig, polls: &Polls) -> anyhow::Result<()> {
    use landslide_nats::polls;
    let client = landslide_nats::connect(nats, User::Polls, "landslide-up").await?;
    let js = async_nats::jetstream::new(client);
    let store = polls::ensure_bucket(&js, &Topology::default(), Access::SetUp).await?;
    let latest = polls::read_all(&store).await?.revisions.pop();
    if latest.is_none_or(|current| &current.polls != polls) {
        polls::put(&store, &polls.to_toml()).await?;
    }
    Ok(())
}

/// What `up` serves on.
struct Listeners {
    ingest: tokio::net::TcpListener,
    tally: tokio::net::TcpListener,
    /// `/metrics` of all three roles (one registry per process).
    operations: tokio::net::TcpListener,
}

async fn run_roles(
    stack: &local::LocalStack,
    polls: Polls,
    (rate_limit, client_ip_header): ClientLimits,
    listeners: Listeners,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let Listeners {
        ingest: ingest_listener,
        tally: tally_listener,
        operations,
    } = listeners;
    // As the schema's owner, before any role starts: the roles' users may not migrate. Our own
    // PostgreSQL is migrated already; a given DATABASE_URL is its owner's.
    landslide_schema::postgres::migrate(&stack.database_url).await?;
    let node_id = NodeId::parse("local").context("the local node id is valid")?;
    // Read as `landslide ingest` and `landslide tally` read them.
    let keys = stack.key_files.read()?;
    let receipt_key = keys.receipts.clone();
    // One connection configuration, each role with its own NATS user and database user.
    let connections = |user: User, database: Option<LoginRole>| {
        let mut connections = Connections::new(
            stack.nats_config(user),
            database.map(|role| stack.database_url(role)),
        );
        connections.polls = polls.clone();
        connections
    };
    let mut ingest = landslide_ingest::Config::new(node_id, connections(User::Ingest, None), keys);
    (ingest.rate_limit, ingest.client_ip_header) = (rate_limit, client_ip_header);
    ingest.results_url = Some(format!("http://{}/", tally_listener.local_addr()?));
    ingest.metrics = MetricsAt::Operations;
    let worker =
        landslide_dedup_worker::Config::new(connections(User::Worker, Some(LoginRole::Worker)));
    let mut tally = landslide_tally::Config::new(
        connections(User::Tally, Some(LoginRole::Tally)),
        receipt_key,
    );
    tally.metrics = MetricsAt::Operations;
    tally.client_ip_header = ingest.client_ip_header.clone();

    let vote_url = format!("http://{}/", ingest_listener.local_addr()?);
    let results_url = format!("http://{}/", tally_listener.local_addr()?);
    let metrics_url = format!("http://{}/metrics", operations.local_addr()?);
    let (stop, shutdown) = Shutdown::new();
    let operations = tokio::spawn(landslide_telemetry::serve::serve_operations(
        operations,
        shutdown.clone().wait(),
    ));
    // The worker first: it creates the streams and the consumer that the others look up.
    let mut worker = tokio::spawn(landslide_dedup_worker::run(worker, shutdown.clone()));
    let mut ingest = tokio::spawn(landslide_ingest::run(
        ingest,
        ingest_listener,
        shutdown.clone(),
    ));
    let mut tally = tokio::spawn(landslide_tally::run(
        tally,
        tally_listener,
        shutdown.clone(),
    ));
    println!(
        "Landslide is up.\n  vote:    {vote_url}\n  results: {results_url}\n  metrics: \
         {metrics_url}\n  operate: landslide status --up {dir} (and audit, export, polls, \
         replay; settings in {dir}/{env})\nPress Ctrl-C to stop.",
        dir = data_dir.display(),
        env = local::ENV_FILE,
    );

    // Run until Ctrl-C, or until a role fails; then stop the others and wait for all three.
    let first = tokio::select! {
        () = Shutdown::on_signal().wait() => None,
        r = &mut worker => Some(("dedup-worker", r)),
        r = &mut ingest => Some(("ingest", r)),
        r = &mut tally => Some(("tally", r)),
    };
    stop.stop();
    let (finished, mut failure) = match first {
        Some((role, result)) => (Some(role), role_failure(role, result)),
        None => (None, None),
    };
    for (role, handle) in [
        ("ingest", ingest),
        ("dedup-worker", worker),
        ("tally", tally),
    ] {
        // The role that ended first was already awaited above.
        if finished == Some(role) {
            continue;
        }
        if let Some(err) = role_failure(role, handle.await) {
            failure.get_or_insert(err);
        }
    }
    operations.abort();
    match failure {
        Some(err) => Err(err),
        None => {
            println!("Landslide stopped cleanly.");
            Ok(())
        }
    }
}

fn role_failure(
    role: &str,
    result: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.context(format!("{role} failed"))),
        Err(err) => Some(anyhow::anyhow!("{role} panicked: {err}")),
    }
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}
