//! The argument groups that several commands flatten into their own: how to reach NATS and the
//! database (`Shared`, `DatabaseArgs`), the HTTP server's and the vote endpoints' limits, and
//! where the keys are. Each reads flags and the environment once; a setting without a default is
//! reported missing with both ways to give it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use landslide_config::Connections;
use landslide_nats::auth::{CredentialSettings, Tls};
use landslide_nats::{NatsConfig, Topology, User};
use landslide_schema::Polls;
use landslide_schema::postgres::{DatabaseUrl, LoginRole};
use landslide_telemetry::serve::{Limits, MetricsAt};
use secrecy::{ExposeSecret, SecretString};

use crate::cmd::up::stack::UpEnv;
use crate::keys;

/// Settings every role shares.
#[derive(Debug, Args, Clone)]
pub struct Shared {
    /// NATS server(s), comma-separated for a cluster. Under `up`: when set, `up` starts no
    /// nats-server of its own.
    #[arg(long, env = "NATS_URL", default_value = landslide_nats::DEFAULT_URL)]
    nats_url: String,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// The data folder of a running `landslide up`: connect to its servers, as this command's
    /// own user, with the settings `up` wrote to <DIR>/env, instead of NATS_URL, the NATS
    /// credentials, NATS_CA and DATABASE_URL.
    #[arg(long, env = "LANDSLIDE_UP", value_name = "DIR")]
    up: Option<PathBuf>,
    /// A TOML file of polls (OPERATIONS.md, "The polls file") that seeds the polls bucket while
    /// it is empty (default: the built-in "pets" poll). Once the bucket holds a revision, every
    /// role works by the bucket and warns if its file differs; change polls with `landslide polls
    /// put FILE`.
    #[arg(long, env = "LANDSLIDE_POLLS")]
    polls: Option<PathBuf>,
    /// Replicas of the VOTES and VOTES_DLQ streams: 1 on one server, 3 (or 5) in a cluster; 2 is
    /// refused.
    #[arg(long, env = "LANDSLIDE_STREAM_REPLICAS", default_value_t = 1, value_parser = parse_replicas)]
    stream_replicas: usize,
    /// How many streams the votes are split over (VOTES, VOTES_P1, …), each a RAFT group with a
    /// leader of its own; 1 to 16. Every role of a deployment must be given the same number: the
    /// workers record it in the VOTES stream and create the streams, and any other role with
    /// another number refuses to start (OPERATIONS.md, "Changing the number of vote partitions").
    #[arg(long, env = "LANDSLIDE_VOTE_PARTITIONS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(landslide_nats::MAX_VOTE_PARTITIONS)))]
    vote_partitions: u16,
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
pub struct NatsAuthArgs {
    /// The NATS user, one per role (nats/auth.conf): ingest, worker (dedup-workers, replay),
    /// tally, audit (audit, export, status), polls (`polls put`) or admin (the `nats` CLI), each
    /// allowed only the subjects its role uses; its password from NATS_PASSWORD_FILE or the
    /// environment's NATS_PASSWORD (no flag: every user of a host may read a process's
    /// arguments).
    #[arg(long, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// The NATS user's password, from the environment's NATS_PASSWORD only: no flag, since every
    /// user of a host may read a process's arguments.
    #[arg(skip = secret_env("NATS_PASSWORD"))]
    nats_password: Option<SecretString>,
    /// A file holding the NATS user's password (instead of the environment's NATS_PASSWORD; what
    /// the deployments give, through systemd's credentials).
    #[arg(long, env = "NATS_PASSWORD_FILE")]
    nats_password_file: Option<PathBuf>,
    /// A NATS token instead of a user, from the environment's NATS_TOKEN only (no flag).
    #[arg(skip = secret_env("NATS_TOKEN"))]
    nats_token: Option<SecretString>,
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
    pub fn connections(
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
    pub fn up_env(&self) -> anyhow::Result<Option<UpEnv>> {
        self.up.as_deref().map(UpEnv::read).transpose()
    }

    /// How `user` connects to NATS: as `--up`'s env file says, or as the flags do.
    pub fn nats(&self, up: Option<&UpEnv>, user: User) -> anyhow::Result<NatsConfig> {
        match up {
            Some(env) => env.nats_config(user),
            None => self.nats_auth.config(&self.nats_url),
        }
    }

    /// How `role` connects to the database: as `--up`'s env file says, or as `db` does.
    fn database(
        &self,
        up: Option<&UpEnv>,
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
    pub async fn check_sync(&self) {
        if let Some(urls) = &self.nats_monitor_url {
            landslide_nats::warn_if_lazy(urls).await;
        }
    }

    fn polls(&self) -> anyhow::Result<Polls> {
        Self::polls_file(self.polls.as_deref())
    }

    /// The polls of a `LANDSLIDE_POLLS` file, or the built-in poll.
    pub fn polls_file(path: Option<&std::path::Path>) -> anyhow::Result<Polls> {
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

    pub fn topology(&self) -> Topology {
        Topology {
            replicas: self.stream_replicas,
            vote_partitions: self.vote_partitions,
            ack_wait: self.ack_wait_ms.map(|ms| Duration::from_millis(ms.max(1))),
            ..Topology::default()
        }
    }
}

/// A default duration as the whole milliseconds of a `_MS` setting.
pub const fn millis(duration: Duration) -> u64 {
    // A default is seconds to minutes: far within u64 milliseconds.
    duration.as_millis() as u64
}

fn parse_replicas(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        Ok(2) => Err("2 replicas cannot survive the loss of one node; use 1 or 3".to_owned()),
        _ => Err("replicas must be 1, 3 or 5".to_owned()),
    }
}

/// The HTTP server's limits (ingest and tally).
#[derive(Debug, Args, Clone)]
pub struct HttpArgs {
    /// Milliseconds a client may take to send a request's line and headers; a slower
    /// connection (a slow-loris client) is closed.
    #[arg(long, env = "LANDSLIDE_HEADER_TIMEOUT_MS", default_value_t = millis(Limits::DEFAULT.header_read_timeout))]
    header_timeout_ms: u64,
    /// Milliseconds a client may take to send a vote's body once its headers are in; a slower
    /// one gets 408 and its connection is closed. The cross-site check and the rate limit come
    /// before the body is read.
    #[arg(long, env = "LANDSLIDE_BODY_TIMEOUT_MS", default_value_t = millis(Limits::DEFAULT.body_read_timeout))]
    body_timeout_ms: u64,
    /// Milliseconds a shutdown waits for requests in flight before it closes every connection
    /// still open, so that a hung client cannot hold a stop (or a rolling restart) up.
    #[arg(long, env = "LANDSLIDE_DRAIN_TIMEOUT_MS", default_value_t = millis(Limits::DEFAULT.drain_timeout))]
    drain_timeout_ms: u64,
    /// HTTP connections served at once; more wait in the kernel's accept queue until one
    /// closes. Within the units' file descriptor limits (262,144 for ingest, 65,536 for tally).
    #[arg(long, env = "LANDSLIDE_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections)]
    max_connections: usize,
    /// The operations listener: /metrics, /healthz and /readyz (503 with the reason while the
    /// role waits for a server) on an address of their own, which the load balancer does not
    /// forward; the public listener then answers /metrics with 404 and leaves it out of its
    /// OpenAPI document. Unset: /metrics is served beside the pages. Every deployment sets it
    /// (ingest 9080, tally 9081, workers 910n).
    #[arg(long, env = "LANDSLIDE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl HttpArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(self.header_timeout_ms.max(100)),
            body_read_timeout: Duration::from_millis(self.body_timeout_ms.max(100)),
            max_connections: self.max_connections.max(1),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }

    /// Where `/metrics` is served.
    pub fn metrics(&self) -> MetricsAt {
        match self.metrics_listen {
            Some(_) => MetricsAt::Operations,
            None => MetricsAt::Public,
        }
    }
}

/// The per-client limits of ingest's vote endpoints (ingest, and `up`'s ingest node).
#[derive(Debug, Args, Clone)]
pub struct ClientLimitArgs {
    /// Votes per second per client address on this node, both vote endpoints together (a
    /// fraction is allowed); 0 turns the limit off. Beyond it: 429 with Retry-After. Generous on
    /// purpose: thousands of phones share one carrier-NAT address (OPERATIONS.md, "Limits that
    /// do not turn voters away").
    #[arg(long, env = "LANDSLIDE_RATE_LIMIT", default_value_t = landslide_ingest::RateLimit::DEFAULT.per_second())]
    rate_limit: f64,
    /// Votes one client address may send at once before the rate applies: the first seconds
    /// after the ad, when a NAT's phones vote together.
    #[arg(long, env = "LANDSLIDE_RATE_BURST", default_value_t = landslide_ingest::RateLimit::DEFAULT.burst())]
    rate_burst: u32,
    #[command(flatten)]
    client_ip: ClientIpArg,
}

/// Who the client of a request is, for the per-client limits of ingest and tally.
#[derive(Debug, Args, Clone)]
pub struct ClientIpArg {
    /// The header a trusted proxy sets to the client's address, e.g. X-Forwarded-For (its
    /// right-most entry, the one your balancer appended). Set it only when every request comes
    /// through that proxy: a client that reaches the node directly could name any address. A
    /// request without a usable header counts as its TCP peer
    /// (landslide_client_ip_fallback_total). Unset: the client is the TCP peer.
    #[arg(long, env = "LANDSLIDE_CLIENT_IP_HEADER")]
    client_ip_header: Option<String>,
}

impl ClientIpArg {
    pub fn header(&self) -> anyhow::Result<Option<landslide_ingest::ClientIpHeader>> {
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
pub type ClientLimits = (
    Option<landslide_ingest::RateLimit>,
    Option<landslide_ingest::ClientIpHeader>,
);

impl ClientLimitArgs {
    pub fn settings(&self) -> anyhow::Result<ClientLimits> {
        let limit = landslide_ingest::RateLimit::new(self.rate_limit, self.rate_burst).context(
            "invalid --rate-limit or --rate-burst (LANDSLIDE_RATE_LIMIT, LANDSLIDE_RATE_BURST)",
        )?;
        Ok((limit, self.client_ip.header()?))
    }
}

#[derive(Debug, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL, `postgres://user:password@host:port/dbname?…`, as the role's
    /// own user (SECURITY.md, "Who may do what in the database"): the owner's for migrate, one
    /// with CREATEROLE for db-users. TLS by libpq's sslmode (disable, prefer (default), require,
    /// verify-ca, verify-full), sslrootcert, sslcert and sslkey; other libpq parameters as
    /// tokio-postgres takes them (application_name, connect_timeout, …). Required, and checked
    /// before anything binds. Under `up`: when set, `up` starts no PostgreSQL of its own and every
    /// role uses this URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<SecretString>,
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
    pub fn url(&self) -> anyhow::Result<DatabaseUrl> {
        let url = DatabaseUrl::parse(required(
            self.database_url.as_ref().map(ExposeSecret::expose_secret),
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
        Ok(url.with_login(user, password.as_ref().map(ExposeSecret::expose_secret))?)
    }
}

/// Where ingest's keys are (`keys`): files, never values, so that no key shows in `argv` or in
/// an environment.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// A file of voter-cookie keys, one per line (blank lines and # comments ignored), each at
    /// least 32 bytes: the first signs, every one verifies (a cookie another key signed is signed
    /// again with the first). The same on every ingest node. Rotating them without turning voters
    /// into new voters: SECURITY.md, "Rotating the cookie keys". Required (`up` keeps one in its
    /// data folder).
    #[arg(long, env = "LANDSLIDE_COOKIE_KEYS_FILE")]
    pub cookie_keys_file: Option<PathBuf>,
    /// A file holding the key (at least 32 bytes) from which the voter and event ids of
    /// cookie-less keyed votes derive. The same on every ingest node; never changed while a poll
    /// is open, and apart from the cookie keys, so that rotating those changes no id. Required
    /// (`up` keeps one in its data folder).
    #[arg(long, env = "LANDSLIDE_VOTER_ID_KEY_FILE")]
    pub voter_id_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub receipts: ReceiptKeyArg,
}

impl KeyArgs {
    /// The files, each of which is required.
    pub fn files(&self) -> anyhow::Result<keys::KeyFiles> {
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

#[derive(Debug, clap::Args)]
pub struct ReceiptKeyArg {
    /// A file holding the key (at least 32 bytes) that tags receipts: the same for every ingest
    /// node and tally, apart from the other keys. Ingest tags every receipt with an HMAC under it,
    /// and tally answers only receipts whose tag holds (404 otherwise); replacing it makes the
    /// receipts given out unanswerable. Required (`up` keeps one in its data folder).
    #[arg(long, env = "LANDSLIDE_RECEIPT_KEY_FILE")]
    pub receipt_key_file: Option<PathBuf>,
}

impl ReceiptKeyArg {
    pub fn file(&self) -> anyhow::Result<PathBuf> {
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
pub fn required<'a>(value: Option<&'a str>, flag: &str, var: &str) -> anyhow::Result<&'a str> {
    value
        .filter(|v| !v.trim().is_empty())
        .with_context(|| format!("{var} is not set (or pass {flag})"))
}

pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// [`non_empty_env`] of a variable that holds a password or a key.
pub fn secret_env(name: &str) -> Option<SecretString> {
    non_empty_env(name).map(SecretString::from)
}
