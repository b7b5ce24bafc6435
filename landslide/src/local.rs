//! The local infrastructure behind `landslide up`: a nats-server with JetStream and a PostgreSQL
//! cluster of our own under one data folder, plus the cookie-signing secret kept there.
//!
//! Whatever the caller already has (`NATS_URL`, `DATABASE_URL`, `LANDSLIDE_SECRET`) is used as is,
//! and only the rest is started. Everything lives under the data folder, so a second `up` on the
//! same folder finds the votes of the first:
//!
//! ```text
//! <data_dir>/lock          held (flock) while a LocalStack runs: one `up` per folder
//! <data_dir>/secret        the generated LANDSLIDE_SECRET, mode 0600
//! <data_dir>/nats/         JetStream storage          <data_dir>/nats.log, nats.pid
//! <data_dir>/postgres/     the PostgreSQL cluster     <data_dir>/postgres.log
//! ```
//!
//! PostgreSQL refuses to run as root, so when we are root the cluster belongs to, and the server
//! runs as, the `postgres` system user. The running server keeps `fsync` on: votes must survive a
//! crash of the machine, not only of the process.
//!
//! The servers must not outlive us where that is avoidable: nats-server is our child and is killed
//! when dropped; PostgreSQL is daemonized by `pg_ctl`, so [`LocalStack::stop`] must be called, and
//! dropping the stack without it stops PostgreSQL on a best-effort basis. A run that died anyway
//! (SIGKILL, power loss) leaves servers behind; the next `start` on the folder stops them first.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use tokio::process::{Child, Command};

/// The database that `up` creates and hands to every role.
const DATABASE: &str = "landslide";
/// The PostgreSQL role created by `initdb`; trusted on loopback, as fits a stack for one machine.
const DB_USER: &str = "landslide";
/// How long nats-server may take to answer JetStream requests after it was spawned.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nats-server gets to flush and exit after SIGTERM before it is killed.
const NATS_STOP_GRACE: Duration = Duration::from_secs(10);
/// Seconds `pg_ctl` waits for start-up; crash recovery after an unclean stop can take a while.
const PG_START_TIMEOUT_S: &str = "120";
/// Seconds `pg_ctl` waits for a fast shutdown before we fall back to an immediate one.
const PG_STOP_TIMEOUT_S: &str = "60";

const NATS_MISSING: &str = "nats-server not found: install it with `sudo apt-get install nats-server` \
     (Debian/Ubuntu) or from https://github.com/nats-io/nats-server/releases";
const POSTGRES_MISSING: &str =
    "PostgreSQL server not found: install it with `sudo apt-get install postgresql`";

/// The loopback ports of the servers that [`LocalStack`] starts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPorts {
    pub nats: u16,
    pub postgres: u16,
}

impl Default for LocalPorts {
    /// 14222 and 15432: the usual ports with a leading 1, so they stay clear of a system nats-server
    /// (4222) and of a system PostgreSQL and its Debian sibling clusters (5432, 5433, ...).
    fn default() -> Self {
        Self {
            nats: 14222,
            postgres: 15432,
        }
    }
}

/// What [`LocalStack::start`] needs: where to keep its data and what the caller already has.
#[derive(Clone)]
pub struct LocalConfig {
    /// The data folder; created if missing.
    pub data_dir: PathBuf,
    /// An existing NATS server to use (`NATS_URL`) instead of starting one.
    pub nats_url: Option<String>,
    /// An existing PostgreSQL database to use (`DATABASE_URL`) instead of starting one.
    pub database_url: Option<String>,
    /// The cookie-signing secret (`LANDSLIDE_SECRET`) instead of the one kept in the data folder.
    pub secret: Option<String>,
    /// Ports for the servers we start.
    pub ports: LocalPorts,
}

impl LocalConfig {
    /// Starts everything under `data_dir` on the default ports.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            nats_url: None,
            database_url: None,
            secret: None,
            ports: LocalPorts::default(),
        }
    }
}

impl fmt::Debug for LocalConfig {
    // By hand, so that the secret is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalConfig")
            .field("data_dir", &self.data_dir)
            .field("nats_url", &self.nats_url)
            .field(
                "database_url",
                &self
                    .database_url
                    .as_deref()
                    .map(landslide_schema::postgres::redact),
            )
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("ports", &self.ports)
            .finish()
    }
}

/// The running local infrastructure: where to reach it, and the servers we started.
pub struct LocalStack {
    /// NATS with JetStream: ours (`nats://127.0.0.1:PORT`) or the one the caller gave.
    pub nats_url: String,
    /// `postgres://landslide@127.0.0.1:PORT/landslide` (database created, not migrated), or the
    /// caller's.
    pub database_url: String,
    /// The cookie-signing secret: the caller's, or the one kept in `<data_dir>/secret`.
    pub secret: String,
    nats: Option<NatsServer>,
    postgres: Option<PostgresServer>,
    /// The open, flock-ed `<data_dir>/lock`: closing it (when the stack is dropped) releases it.
    _lock: Option<File>,
}

impl fmt::Debug for LocalStack {
    // By hand, so that the secret is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStack")
            .field("nats_url", &self.nats_url)
            .field(
                "database_url",
                &landslide_schema::postgres::redact(&self.database_url),
            )
            .field("secret", &"<redacted>")
            .field("owns_nats", &self.nats.is_some())
            .field("owns_postgres", &self.postgres.is_some())
            .finish()
    }
}

impl LocalStack {
    /// Starts what the caller does not already have, and returns once every server we started
    /// accepts requests (JetStream answers, the `landslide` database exists).
    ///
    /// Fails, naming the package to install, when a server binary is missing; fails with the
    /// server's log tail when it does not come up; fails when another `up` uses the same folder.
    pub async fn start(config: LocalConfig) -> anyhow::Result<LocalStack> {
        Self::start_with(config, &Binaries::system()).await
    }

    async fn start_with(config: LocalConfig, binaries: &Binaries) -> anyhow::Result<LocalStack> {
        // Find every binary before touching anything, so a missing one fails fast and cleanly.
        let nats = match config.nats_url {
            Some(url) => Server::Given(url),
            None => Server::Start(binaries.nats_server()?),
        };
        let postgres = match config.database_url {
            Some(url) => Server::Given(url),
            None => Server::Start(binaries.postgres(&config.data_dir.join("postgres"))?),
        };

        let needs_dir = matches!(nats, Server::Start(_))
            || matches!(postgres, Server::Start(_))
            || config.secret.is_none();
        let (data_dir, lock) = if needs_dir {
            let (dir, lock) = open_data_dir(&config.data_dir)?;
            (dir, Some(lock))
        } else {
            (config.data_dir.clone(), None)
        };

        let secret = match config.secret {
            Some(secret) => secret,
            None => load_or_create_secret(&data_dir.join("secret"))?,
        };

        let (database_url, postgres) = match postgres {
            Server::Given(url) => (url, None),
            Server::Start(bins) => {
                let server = PostgresServer::start(bins, &data_dir, config.ports.postgres).await?;
                (server.database_url(), Some(server))
            }
        };

        let (nats_url, nats) = match nats {
            Server::Given(url) => (url, None),
            Server::Start(bin) => match NatsServer::start(&bin, &data_dir, config.ports.nats).await
            {
                Ok(server) => (server.url(), Some(server)),
                Err(e) => {
                    // Do not leave the daemonized PostgreSQL behind.
                    if let Some(mut pg) = postgres
                        && let Err(stop) = pg.stop().await
                    {
                        tracing::warn!(error = %format!("{stop:#}"), "could not stop PostgreSQL");
                    }
                    return Err(e);
                }
            },
        };

        Ok(LocalStack {
            nats_url,
            database_url,
            secret,
            nats,
            postgres,
            _lock: lock,
        })
    }

    /// Stops the servers this stack started: nats-server with SIGTERM (SIGKILL after a grace
    /// period), PostgreSQL with a fast shutdown; waits until both have exited. Servers the caller
    /// gave by URL are left alone.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Both are stopped even when the first fails; the first error is reported.
        let nats = match self.nats.take() {
            Some(nats) => nats.stop().await,
            None => Ok(()),
        };
        let postgres = match self.postgres.take() {
            Some(mut pg) => pg.stop().await,
            None => Ok(()),
        };
        nats.and(postgres)
    }

    /// Simulates a crash for the tests: releases the folder lock but leaves both servers running,
    /// as a SIGKILL-ed `landslide up` would.
    #[cfg(test)]
    fn abandon(mut self) {
        drop(self._lock.take());
        if let Some(nats) = self.nats.take() {
            // Forgetting the child skips its kill-on-drop.
            std::mem::forget(nats.child);
        }
        if let Some(mut pg) = self.postgres.take() {
            pg.running = false;
        }
    }
}

/// A server the caller gave by URL, or the binaries to start our own with.
enum Server<B> {
    Given(String),
    Start(B),
}

/// Creates the data folder, makes its path absolute (our servers run with `/` as their working
/// directory) and takes its lock.
fn open_data_dir(dir: &Path) -> anyhow::Result<(PathBuf, File)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot resolve the data folder {}", dir.display()))?;
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok((dir, lock)),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "the data folder {} is in use by another `landslide up`; stop it first or choose \
             another folder with `--data-dir`",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
        }
    }
}

/// Reads the secret kept at `path`, or generates one there (readable by us only).
fn load_or_create_secret(path: &Path) -> anyhow::Result<String> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            // 96 hex digits from three v4 UUIDs: 366 bits from the OS's secure random source
            // (uuid uses getrandom), more than the 32 bytes ingest requires.
            let secret: String = (0..3)
                .map(|_| uuid::Uuid::new_v4().simple().to_string())
                .collect();
            file.write_all(secret.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write the secret to {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated LANDSLIDE_SECRET");
            Ok(secret)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the secret file is readable by others; `chmod 600` it");
            }
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the secret from {}", path.display()))?
                .trim()
                .to_owned();
            if secret.len() < 32 {
                bail!(
                    "the secret in {} is shorter than 32 bytes; delete the file to generate a new one",
                    path.display()
                );
            }
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// Where the server binaries are looked for; the tests point it at empty folders.
#[derive(Debug, Clone)]
struct Binaries {
    /// Folders searched for `nats-server` and `pg_config`, in order.
    path: Vec<PathBuf>,
    /// Debian's versioned PostgreSQL installs: `<pg_root>/<major>/bin`.
    pg_root: PathBuf,
}

/// The PostgreSQL server programs we use.
#[derive(Debug, Clone)]
struct PgBinaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

impl Binaries {
    /// `PATH`, then the folders Debian and manual installs use even when they are not on `PATH`.
    fn system() -> Self {
        let mut path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        path.extend(["/usr/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from));
        Self {
            path,
            pg_root: PathBuf::from("/usr/lib/postgresql"),
        }
    }

    fn find(&self, name: &str) -> Option<PathBuf> {
        self.path
            .iter()
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }

    fn nats_server(&self) -> anyhow::Result<PathBuf> {
        self.find("nats-server")
            .ok_or_else(|| anyhow!(NATS_MISSING))
    }

    /// The server binaries: those of the cluster's own major version when it exists (a newer
    /// server cannot open an older cluster), else `pg_config --bindir`, else the highest version
    /// under `pg_root`, else whatever is on the search path.
    fn postgres(&self, cluster: &Path) -> anyhow::Result<PgBinaries> {
        let in_dir = |dir: PathBuf| {
            let bins = PgBinaries {
                initdb: dir.join("initdb"),
                pg_ctl: dir.join("pg_ctl"),
            };
            (bins.initdb.is_file() && bins.pg_ctl.is_file()).then_some(bins)
        };
        if let Ok(version) = std::fs::read_to_string(cluster.join("PG_VERSION"))
            && let Some(bins) = in_dir(self.pg_root.join(version.trim()).join("bin"))
        {
            return Ok(bins);
        }
        // pg_config may come from libpq-dev alone, without the server: check what its bindir holds.
        if let Some(pg_config) = self.find("pg_config")
            && let Ok(out) = std::process::Command::new(pg_config)
                .arg("--bindir")
                .stderr(Stdio::null())
                .output()
            && out.status.success()
            && let Some(bins) = in_dir(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        {
            return Ok(bins);
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.pg_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((major, entry.path().join("bin")))
            })
            .collect();
        versions.sort();
        if let Some(bins) = versions.into_iter().rev().find_map(|(_, bin)| in_dir(bin)) {
            return Ok(bins);
        }
        match (self.find("initdb"), self.find("pg_ctl")) {
            (Some(initdb), Some(pg_ctl)) => Ok(PgBinaries { initdb, pg_ctl }),
            _ => bail!(POSTGRES_MISSING),
        }
    }
}

/// Fails clearly when `port` on loopback is taken. The check races with other programs, but it
/// turns the common case (a server already there) into a message that names the port.
fn ensure_port_free(port: u16, what: &str) -> anyhow::Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AddrInUse => bail!(
            "port {port} on 127.0.0.1 is already in use, so our {what} cannot listen there: stop \
             whatever listens on it or choose another port"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot check port {port} for {what}")),
    }
}

/// The last lines of a server's log, for error messages.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        format!("(the log {} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

/// Whether process `pid` exists and has not exited (a zombie has exited).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Sends `signal` (a name such as `TERM`) through kill(1): std has no way to send a signal other
/// than SIGKILL, and the workspace forbids the unsafe code a libc call would need.
async fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .await
        .context("cannot run kill(1)")?;
    if !status.success() && process_alive(pid) {
        bail!("kill -{signal} {pid} failed: {status}");
    }
    Ok(())
}

/// Waits until `pid` has exited, up to `timeout`; returns whether it did.
async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Our nats-server: a child process, killed if dropped without [`NatsServer::stop`].
struct NatsServer {
    child: Child,
    pid: u32,
    port: u16,
    log: PathBuf,
}

impl NatsServer {
    async fn start(bin: &Path, data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let pid_file = data_dir.join("nats.pid");
        stop_leftover_nats(&pid_file, data_dir).await?;
        ensure_port_free(port, "nats-server")?;

        let store = data_dir.join("nats");
        let log = data_dir.join("nats.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store)
            .args(["--server_name", "landslide-local", "-P"])
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Its own process group: Ctrl-C in the terminal reaches only us, and we stop the
            // server after the roles that use it have drained.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child
            .id()
            .context("nats-server exited as soon as it was started")?;
        let server = Self {
            child,
            pid,
            port,
            log,
        };
        server.wait_ready().await?;
        tracing::info!(
            nats.url = %server.url(),
            pid,
            log = %server.log.display(),
            "started nats-server on {}",
            server.url()
        );
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Waits until JetStream answers; fails with the log tail if the server exits first.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        let url = self.url();
        loop {
            if !process_alive(self.pid) {
                bail!(
                    "nats-server exited during start-up; {}",
                    log_tail(&self.log)
                );
            }
            if jetstream_answers(&url).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server on {url} did not answer JetStream requests within {}s; {}",
                    NATS_READY_TIMEOUT.as_secs(),
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Err(e) = send_signal(self.pid, "TERM").await {
            tracing::warn!(error = %format!("{e:#}"), "could not send SIGTERM to nats-server");
        }
        let status = match tokio::time::timeout(NATS_STOP_GRACE, self.child.wait()).await {
            Ok(status) => status.context("cannot wait for nats-server")?,
            Err(_) => {
                tracing::warn!(
                    grace_s = NATS_STOP_GRACE.as_secs(),
                    "nats-server did not exit after SIGTERM; killing it"
                );
                self.child.kill().await.context("cannot kill nats-server")?;
                return Ok(());
            }
        };
        // nats-server 2.9 exits with status 1 after a graceful SIGTERM shutdown (JetStream
        // flushed, "Server Exiting.." logged), so the status is reported, not judged.
        tracing::info!(%status, "stopped nats-server");
        Ok(())
    }
}

/// Whether the server at `url` answers a JetStream account-info request.
async fn jetstream_answers(url: &str) -> bool {
    landslide_nats::api_request(url, "$JS.API.INFO")
        .await
        .is_some_and(|info| info["type"] == "io.nats.jetstream.api.v1.account_info_response")
}

/// Stops a nats-server that a crashed run of ours left on this folder. We hold the folder's lock,
/// so no live `landslide up` owns it.
async fn stop_leftover_nats(pid_file: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Ok(());
    };
    // The pid may have been reused since: only a nats-server on our store folder is ours.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let store = data_dir.join("nats");
    let ours =
        cmdline.contains("nats-server") && cmdline.split('\0').any(|arg| Path::new(arg) == store);
    if !ours || !process_alive(pid) {
        return Ok(());
    }
    tracing::warn!(
        pid,
        "stopping the nats-server that an earlier run left on this data folder"
    );
    send_signal(pid, "TERM").await?;
    if !wait_gone(pid, NATS_STOP_GRACE).await {
        send_signal(pid, "KILL").await?;
        if !wait_gone(pid, Duration::from_secs(5)).await {
            bail!("cannot stop the leftover nats-server (pid {pid}) on this data folder");
        }
    }
    Ok(())
}

/// The user the PostgreSQL programs run as, when it is not us.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Whether we are root, by the owner of our own /proc entry (std has no getuid).
fn running_as_root() -> anyhow::Result<bool> {
    let meta = std::fs::metadata("/proc/self").context("cannot read /proc/self")?;
    Ok(meta.uid() == 0)
}

/// The `postgres` system user from /etc/passwd.
fn postgres_user() -> anyhow::Result<RunAs> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&"postgres") || fields.len() < 4 {
                return None;
            }
            Some(RunAs {
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            })
        })
        .ok_or_else(|| {
            anyhow!(
                "PostgreSQL refuses to run as root, and there is no `postgres` user to run it as: \
                 install the server with `sudo apt-get install postgresql` (which creates the \
                 user), or run landslide as a normal user"
            )
        })
}

/// Changes the owner of `path` and everything below it.
fn chown_tree(path: &Path, user: RunAs) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

/// Our PostgreSQL cluster, started by `pg_ctl` (so daemonized, not our child).
struct PostgresServer {
    bins: PgBinaries,
    cluster: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    /// Whether we still have to stop it; `Drop` stops it when this is still true.
    running: bool,
}

impl PostgresServer {
    async fn start(bins: PgBinaries, data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let run_as = if running_as_root()? {
            Some(postgres_user()?)
        } else {
            None
        };
        let cluster = data_dir.join("postgres");
        let log = data_dir.join("postgres.log");
        let mut server = Self {
            bins,
            cluster,
            port,
            run_as,
            running: false,
        };
        server.prepare_cluster(data_dir, &log).await?;
        server.stop_leftover().await?;
        ensure_port_free(port, "PostgreSQL")?;

        let options = format!(
            // No Unix socket: its path must fit in 107 bytes, which a deep data folder breaks, and
            // every client here uses TCP. pg_ctl passes these options through /bin/sh, hence ''.
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        );
        let output = server
            .pg_command(&server.bins.pg_ctl)
            .arg("start")
            .arg("-D")
            .arg(&server.cluster)
            .args(["-w", "-t", PG_START_TIMEOUT_S, "-l"])
            .arg(&log)
            .args(["-o", &options])
            .output()
            .await
            .context("cannot run pg_ctl start")?;
        if !output.status.success() {
            // A timed-out start may still be coming up: make sure it does not linger.
            server.running = true;
            let _ = server.stop().await;
            bail!(
                "PostgreSQL did not start ({}): {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                log_tail(&log)
            );
        }
        server.running = true;

        if let Err(e) = server.create_database().await {
            let _ = server.stop().await;
            return Err(e);
        }
        tracing::info!(
            db.url = %server.database_url(),
            cluster = %server.cluster.display(),
            log = %log.display(),
            "started PostgreSQL on 127.0.0.1:{port}"
        );
        Ok(server)
    }

    fn database_url(&self) -> String {
        format!("postgres://{DB_USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// A command for a PostgreSQL program, run as the cluster's owner, from `/` (the programs
    /// resolve their working directory, which may be private to root).
    fn pg_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir("/").stdin(Stdio::null());
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd
    }

    /// Makes the cluster folder and log ours (or the postgres user's) and runs initdb once.
    async fn prepare_cluster(&self, data_dir: &Path, log: &Path) -> anyhow::Result<()> {
        if let Some(user) = self.run_as {
            let status = self
                .pg_command(Path::new("test"))
                .arg("-x")
                .arg(data_dir)
                .status()
                .await
                .context("cannot run test(1) as the postgres user")?;
            if !status.success() {
                bail!(
                    "PostgreSQL refuses to run as root, so it runs as the `postgres` user, which \
                     cannot reach the data folder {} (it or a folder above it, such as /root, is \
                     private): choose a data folder it can reach with `--data-dir`, e.g. \
                     /var/lib/landslide",
                    data_dir.display()
                );
            }
            let cluster = self.cluster.clone();
            let log = log.to_owned();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                if !cluster.exists() {
                    std::fs::create_dir(&cluster)
                        .with_context(|| format!("cannot create {}", cluster.display()))?;
                    std::fs::set_permissions(&cluster, std::fs::Permissions::from_mode(0o700))
                        .with_context(|| format!("cannot set the mode of {}", cluster.display()))?;
                }
                if std::fs::metadata(&cluster)?.uid() != user.uid {
                    chown_tree(&cluster, user).with_context(|| {
                        format!("cannot give {} to the postgres user", cluster.display())
                    })?;
                }
                // pg_ctl opens the log as the postgres user, who cannot create files in our folder.
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .with_context(|| format!("cannot create {}", log.display()))?;
                std::os::unix::fs::chown(&log, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("cannot give {} to the postgres user", log.display()))
            })
            .await
            .context("the cluster preparation task panicked")??;
        }

        if self.cluster.join("PG_VERSION").is_file() {
            return Ok(());
        }
        let output = self
            .pg_command(&self.bins.initdb)
            .arg("-D")
            .arg(&self.cluster)
            .args(["-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .await
            .context("cannot run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb {} failed ({}): {}",
                self.cluster.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        tracing::info!(cluster = %self.cluster.display(), "created a PostgreSQL cluster");
        Ok(())
    }

    /// Stops a server that a crashed run left on this cluster (we hold the folder's lock, so no
    /// live `up` owns it): it may listen on another port, and it keeps the cluster locked.
    async fn stop_leftover(&mut self) -> anyhow::Result<()> {
        let status = self
            .pg_command(&self.bins.pg_ctl)
            .arg("status")
            .arg("-D")
            .arg(&self.cluster)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("cannot run pg_ctl status")?;
        // pg_ctl status: 0 running, 3 not running (a stale postmaster.pid is fine: the postmaster
        // checks it and starts anyway), 4 no cluster.
        if status.success() {
            tracing::warn!("stopping the PostgreSQL that an earlier run left on this data folder");
            self.running = true;
            self.stop().await?;
        }
        Ok(())
    }

    async fn create_database(&self) -> anyhow::Result<()> {
        // Imported here only: its `first` would shadow slices' `first` elsewhere in the module.
        use diesel_async::RunQueryDsl as _;
        #[derive(QueryableByName)]
        struct Exists {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            exists: bool,
        }
        let admin_url = format!("postgres://{DB_USER}@127.0.0.1:{}/postgres", self.port);
        let mut conn = AsyncPgConnection::establish(&admin_url)
            .await
            .with_context(|| format!("cannot connect to our PostgreSQL at {admin_url}"))?;
        let found: Exists =
            diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind::<diesel::sql_types::Text, _>(DATABASE)
                .get_result(&mut conn)
                .await
                .context("cannot list the databases")?;
        if !found.exists {
            diesel::sql_query(format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("cannot create the database {DATABASE}"))?;
            tracing::info!(db.name = DATABASE, "created the database");
        }
        Ok(())
    }

    /// Fast shutdown (sessions are ended, committed work is on disk); an immediate one if that
    /// does not finish in time (recovery replays the WAL at the next start, so nothing committed
    /// is lost either).
    async fn stop(&mut self) -> anyhow::Result<()> {
        // Without a postmaster.pid no server runs on the cluster (it failed to start, or died).
        if !self.running || !self.cluster.join("postmaster.pid").exists() {
            self.running = false;
            return Ok(());
        }
        let fast = self.pg_stop("fast").await?;
        if !fast.success() {
            tracing::warn!(%fast, "PostgreSQL did not stop in time; stopping it immediately");
            let immediate = self.pg_stop("immediate").await?;
            if !immediate.success() {
                bail!(
                    "cannot stop PostgreSQL on {}: pg_ctl stop -m immediate: {immediate}",
                    self.cluster.display()
                );
            }
        }
        self.running = false;
        tracing::info!(cluster = %self.cluster.display(), "stopped PostgreSQL");
        Ok(())
    }

    async fn pg_stop(&self, mode: &str) -> anyhow::Result<ExitStatus> {
        self.pg_command(&self.bins.pg_ctl)
            .arg("stop")
            .arg("-D")
            .arg(&self.cluster)
            .args(["-m", mode, "-w", "-t", PG_STOP_TIMEOUT_S])
            .stdout(Stdio::null())
            .status()
            .await
            .context("cannot run pg_ctl stop")
    }
}

impl Drop for PostgresServer {
    /// The fallback when `stop` was not called (a panic, an early return): a blocking fast
    /// shutdown, since Drop cannot await. It blocks the thread for as long as the shutdown takes,
    /// which is acceptable on this path only.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new(&self.bins.pg_ctl);
        cmd.current_dir("/")
            .arg("stop")
            .arg("-D")
            .arg(&self.cluster)
            .args(["-m", "fast", "-w", "-t", PG_STOP_TIMEOUT_S])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        match cmd.status() {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(%status, "could not stop PostgreSQL on drop"),
            Err(e) => tracing::warn!(error = %e, "could not run pg_ctl stop on drop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel_async::{RunQueryDsl as _, SimpleAsyncConnection};

    fn free_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
        listener.local_addr().expect("local addr").port()
    }

    fn free_ports() -> LocalPorts {
        LocalPorts {
            nats: free_port(),
            postgres: free_port(),
        }
    }

    /// A temporary folder the `postgres` user can reach, whatever the umask.
    fn reachable_tempdir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        dir
    }

    fn config(data_dir: &Path, ports: LocalPorts) -> LocalConfig {
        LocalConfig {
            ports,
            ..LocalConfig::new(data_dir)
        }
    }

    async fn assert_jetstream_answers(url: &str) {
        assert!(jetstream_answers(url).await, "JetStream answers on {url}");
        // And streams work: create one with file storage and publish to it with an ack.
        let client = async_nats::connect(url).await.expect("connect to our nats");
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe".into()],
            ..Default::default()
        })
        .await
        .expect("create a stream");
        js.publish("probe", "x".into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    async fn votes(database_url: &str) -> Vec<String> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            choice: String,
        }
        let mut conn = AsyncPgConnection::establish(database_url)
            .await
            .expect("connect to our database");
        let rows: Vec<Row> = diesel::sql_query("SELECT choice FROM t ORDER BY choice")
            .load(&mut conn)
            .await
            .expect("select");
        rows.into_iter().map(|r| r.choice).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_start_on_the_same_folder_finds_the_data_of_the_first() {
        let dir = reachable_tempdir();
        let data_dir = dir.path().join("data");

        let stack = LocalStack::start(config(&data_dir, free_ports()))
            .await
            .expect("first start");
        assert_jetstream_answers(&stack.nats_url).await;
        let mut conn = AsyncPgConnection::establish(&stack.database_url)
            .await
            .expect("connect to our database");
        conn.batch_execute("CREATE TABLE t (choice text); INSERT INTO t VALUES ('cats')")
            .await
            .expect("create and insert");
        drop(conn);
        let secret = stack.secret.clone();
        assert_eq!(secret.len(), 96);
        let mode = std::fs::metadata(data_dir.join("secret"))
            .expect("secret file")
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        stack.stop().await.expect("first stop");
        assert!(
            !data_dir.join("postgres/postmaster.pid").exists(),
            "PostgreSQL has exited"
        );

        // New ports: the cluster and the stream store do not depend on them.
        let ports = free_ports();
        let stack = LocalStack::start(config(&data_dir, ports))
            .await
            .expect("second start");
        assert_eq!(stack.nats_url, format!("nats://127.0.0.1:{}", ports.nats));
        assert_eq!(
            stack.database_url,
            format!(
                "postgres://landslide@127.0.0.1:{}/landslide",
                ports.postgres
            )
        );
        assert_eq!(stack.secret, secret, "the secret is kept");
        assert_jetstream_answers(&stack.nats_url).await;
        assert_eq!(votes(&stack.database_url).await, ["cats"]);
        stack.stop().await.expect("second stop");

        // Both ports are free again: the servers really exited.
        ensure_port_free(ports.nats, "nats").expect("nats port released");
        ensure_port_free(ports.postgres, "postgres").expect("postgres port released");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn servers_left_by_a_crashed_run_are_replaced_and_keep_their_data() {
        let dir = reachable_tempdir();
        let ports = free_ports();
        let stack = LocalStack::start(config(dir.path(), ports))
            .await
            .expect("first start");
        let mut conn = AsyncPgConnection::establish(&stack.database_url)
            .await
            .expect("connect");
        conn.batch_execute("CREATE TABLE t (choice text); INSERT INTO t VALUES ('dogs')")
            .await
            .expect("create and insert");
        drop(conn);
        let pid_in = |file: &str| -> u32 {
            let text = std::fs::read_to_string(dir.path().join(file)).expect("pid file");
            text.lines()
                .next()
                .expect("pid line")
                .trim()
                .parse()
                .expect("pid")
        };
        let (old_nats, old_postgres) = (pid_in("nats.pid"), pid_in("postgres/postmaster.pid"));
        stack.abandon();
        assert!(process_alive(old_nats) && process_alive(old_postgres));

        // Same ports: the leftovers hold them until the new start stops them.
        let stack = LocalStack::start(config(dir.path(), ports))
            .await
            .expect("start over leftovers");
        assert_jetstream_answers(&stack.nats_url).await;
        assert_eq!(votes(&stack.database_url).await, ["dogs"]);
        assert!(
            !process_alive(old_nats),
            "the leftover nats-server was stopped"
        );
        assert!(
            !process_alive(old_postgres),
            "the leftover PostgreSQL was stopped"
        );
        stack.stop().await.expect("stop");
        ensure_port_free(ports.nats, "nats").expect("nats port released");
        ensure_port_free(ports.postgres, "postgres").expect("postgres port released");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dropping_the_stack_without_stop_still_stops_both_servers() {
        let dir = reachable_tempdir();
        let ports = free_ports();
        let stack = LocalStack::start(config(dir.path(), ports))
            .await
            .expect("start");
        drop(stack);
        assert!(!dir.path().join("postgres/postmaster.pid").exists());
        ensure_port_free(ports.postgres, "postgres").expect("postgres port released");
        // nats-server gets SIGKILL on drop; it is gone once its port is released.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ensure_port_free(ports.nats, "nats").is_err() {
            assert!(Instant::now() < deadline, "nats-server still listens");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_stack_on_a_folder_in_use_is_refused() {
        let dir = reachable_tempdir();
        let first = LocalStack::start(LocalConfig {
            nats_url: Some("nats://unused".into()),
            database_url: Some("postgres://unused".into()),
            ..config(dir.path(), free_ports())
        })
        .await
        .expect("first start");
        let err = LocalStack::start(LocalConfig {
            nats_url: Some("nats://unused".into()),
            database_url: Some("postgres://unused".into()),
            ..config(dir.path(), free_ports())
        })
        .await
        .expect_err("second start on the same folder");
        assert!(format!("{err:#}").contains("in use by another"), "{err:#}");
        first.stop().await.expect("stop");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_taken_port_is_named_in_the_error() {
        let dir = reachable_tempdir();
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let err = LocalStack::start(LocalConfig {
            database_url: Some("postgres://unused".into()),
            ..config(
                dir.path(),
                LocalPorts {
                    nats: port,
                    postgres: free_port(),
                },
            )
        })
        .await
        .expect_err("nats port is taken");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("port {port} on 127.0.0.1 is already in use")),
            "{msg}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn given_urls_and_secret_are_used_as_they_are() {
        let dir = reachable_tempdir();
        let stack = LocalStack::start(LocalConfig {
            nats_url: Some("nats://elsewhere:4222".into()),
            database_url: Some("postgres://u@elsewhere/db".into()),
            secret: Some("s".repeat(40)),
            ..config(&dir.path().join("never-created"), free_ports())
        })
        .await
        .expect("start with everything given");
        assert_eq!(stack.nats_url, "nats://elsewhere:4222");
        assert_eq!(stack.database_url, "postgres://u@elsewhere/db");
        assert_eq!(stack.secret, "s".repeat(40));
        assert!(!dir.path().join("never-created").exists());
        assert!(
            !format!("{stack:?}").contains("ssss"),
            "Debug hides the secret"
        );
        stack.stop().await.expect("stop");
    }

    fn nowhere(dir: &Path) -> Binaries {
        Binaries {
            path: vec![dir.join("empty")],
            pg_root: dir.join("empty"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_nats_server_names_the_package_to_install() {
        let dir = reachable_tempdir();
        let err = LocalStack::start_with(
            LocalConfig {
                database_url: Some("postgres://unused".into()),
                ..config(&dir.path().join("data"), free_ports())
            },
            &nowhere(dir.path()),
        )
        .await
        .expect_err("no nats-server");
        assert_eq!(err.to_string(), NATS_MISSING);
        assert!(NATS_MISSING.contains("sudo apt-get install nats-server"));
        assert!(!dir.path().join("data").exists(), "nothing was created");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_postgresql_server_names_the_package_to_install() {
        let dir = reachable_tempdir();
        let err = LocalStack::start_with(
            LocalConfig {
                nats_url: Some("nats://unused".into()),
                ..config(&dir.path().join("data"), free_ports())
            },
            &nowhere(dir.path()),
        )
        .await
        .expect_err("no PostgreSQL");
        assert_eq!(
            err.to_string(),
            "PostgreSQL server not found: install it with `sudo apt-get install postgresql`"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_data_folder_the_postgres_user_cannot_reach_is_refused_with_advice() {
        if !running_as_root().expect("uid") {
            // Only root hands the cluster to the postgres user.
            return;
        }
        // Private to root, as /root is: the postgres user cannot enter it.
        let private = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod temp dir");
        let err = LocalStack::start(LocalConfig {
            nats_url: Some("nats://unused".into()),
            ..config(&private.path().join("data"), free_ports())
        })
        .await
        .expect_err("unreachable folder");
        let msg = format!("{err:#}");
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(msg.contains("/var/lib/landslide"), "{msg}");
    }
}
