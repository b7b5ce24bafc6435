//! The local infrastructure behind `landslide up`: a nats-server with JetStream and a PostgreSQL
//! cluster of our own under one data folder, plus the keys of ingest and tally kept there.
//!
//! Whatever the caller already has (`NATS_URL`, `DATABASE_URL`, `LANDSLIDE_COOKIE_KEYS_FILE`,
//! `LANDSLIDE_VOTER_ID_KEY_FILE`, `LANDSLIDE_RECEIPT_KEY_FILE`) is used as is, and only the
//! rest is started or generated. Everything lives under the data folder, so a second `up` on the
//! same folder finds the votes of the first:
//!
//! ```text
//! <data_dir>/lock          held (flock) while a LocalStack runs: one `up` per folder
//! <data_dir>/cookie-keys   the generated voter-cookie key, mode 0600 (keys.rs); a folder of
//!                          an earlier release has `secret` instead, which becomes this file
//!                          and the next one
//! <data_dir>/voter-id-key  the generated voter-id key, mode 0600
//! <data_dir>/receipt-key   the generated receipt key, mode 0600
//! <data_dir>/env           how to reach the servers, as each user (URLs, CA, passwords), mode
//!                          0600: what the operator's commands read with `--up <data_dir>`
//! <data_dir>/nats/         JetStream storage          <data_dir>/nats.log, nats.pid
//! <data_dir>/nats-tls/     the local CA (ca.pem), nats-server's and PostgreSQL's certificates,
//!                          the NATS users' passwords
//! <data_dir>/postgres/     the PostgreSQL cluster     <data_dir>/postgres.log
//! <data_dir>/postgres-users/<user>.password   each database user's password, mode 0600
//! ```
//!
//! Our PostgreSQL takes TLS connections only (`hostssl`, with a certificate from the same CA as
//! nats-server's) and a password from every user, the superuser
//! `landslide` (the schema's owner, which migrates) included. Each role connects as its own
//! login role (`landslide_worker`, `landslide_tally`, `landslide_audit`) with
//! `sslmode=verify-full`: the path a deployment takes, on one machine.
//!
//! The servers are those of every other place that runs them (crate `landslide-servers`):
//! nats-server fsyncs before it acks, and PostgreSQL keeps `fsync` on, so votes survive a crash
//! of the machine, not only of the process.
//!
//! The servers must not outlive us where that is avoidable: nats-server is our child and is killed
//! when dropped; PostgreSQL is daemonized by `pg_ctl`, so [`LocalStack::stop`] must be called, and
//! dropping the stack without it stops PostgreSQL on a best-effort basis. A run that died anyway
//! (SIGKILL, power loss) leaves servers behind; the next `start` on the folder stops them first.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::HashMap;

use anyhow::{Context, bail};
use landslide_nats::{NatsConfig, User};
use landslide_schema::postgres::{DatabaseUrl, LoginRole};
use landslide_servers::postgres::{PgAccess, PgTls, PostgresSpec};
use landslide_servers::{Binaries, Guard, Nats, NatsLayout, NatsSpec, PgStop, Postgres};
use secrecy::{ExposeSecret as _, SecretString};

use crate::keys::KeyFiles;

/// The database that `up` creates and hands to every role.
const DATABASE: &str = "landslide";
/// The PostgreSQL superuser created by `initdb`, which owns the schema and migrates it.
const DB_USER: &str = "landslide";
/// The name of the local CA's certificates (nats-server's says the same).
const LOCAL_CA: &str = "Landslide test and local CA";
/// How long nats-server gets to flush and exit after SIGTERM before it is killed.
const NATS_STOP_GRACE: Duration = Duration::from_secs(10);

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
    /// An existing NATS server to use (`NATS_URL`) instead of starting one: how each role's
    /// user connects to it.
    pub nats: Option<NatsUsers>,
    /// An existing PostgreSQL database to use (`DATABASE_URL`) instead of starting one: every
    /// role connects with it.
    pub database_url: Option<DatabaseUrl>,
    /// Key files to use instead of those kept in the data folder.
    pub keys: GivenKeys,
    /// Ports for the servers we start.
    pub ports: LocalPorts,
}

impl LocalConfig {
    /// Starts everything under `data_dir` on the default ports.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            nats: None,
            database_url: None,
            keys: GivenKeys::default(),
            ports: LocalPorts::default(),
        }
    }
}

/// The key files a caller gives; each one missing is generated in the data folder.
#[derive(Debug, Clone, Default)]
pub struct GivenKeys {
    pub cookies: Option<PathBuf>,
    pub voter_ids: Option<PathBuf>,
    pub receipts: Option<PathBuf>,
}

impl GivenKeys {
    fn all_given(&self) -> bool {
        self.cookies.is_some() && self.voter_ids.is_some() && self.receipts.is_some()
    }
}

/// How each role's NATS user connects: servers, its password, the CA.
pub type NatsUsers = HashMap<User, NatsConfig>;

/// The running local infrastructure: where to reach it, and the servers we started.
pub struct LocalStack {
    /// NATS with JetStream, as each role's user reaches it: ours (`nats://127.0.0.1:PORT`, the
    /// passwords and CA kept under `<data_dir>/nats-tls/`) or the one the caller gave.
    pub nats_users: NatsUsers,
    /// The schema owner's URL: `postgres://landslide:…@127.0.0.1:PORT/landslide` with
    /// `sslmode=verify-full` (database created and migrated, login roles set up), or the
    /// caller's.
    pub database_url: DatabaseUrl,
    /// Each login role's URL on our PostgreSQL; empty when the caller gave `DATABASE_URL`.
    role_urls: HashMap<LoginRole, DatabaseUrl>,
    /// The key files of ingest and tally: the caller's, or those kept in the data folder.
    pub key_files: KeyFiles,
    /// The data folder, absolute once we keep anything there.
    data_dir: PathBuf,
    nats: Option<Nats>,
    postgres: Option<Postgres>,
    /// One per server we started: each stops its server if we die without stopping it
    /// (SIGKILL included), and is released by [`LocalStack::stop`].
    guards: Vec<Guard>,
    /// The open, flock-ed `<data_dir>/lock`: closing it (when the stack is dropped) releases it.
    _lock: Option<File>,
}

impl fmt::Debug for LocalStack {
    // By hand: the servers are shown by whether we own them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalStack")
            .field("nats_users", &self.nats_users)
            .field("database_url", &self.database_url)
            .field("role_urls", &self.role_urls)
            .field("key_files", &self.key_files)
            .field("owns_nats", &self.nats.is_some())
            .field("owns_postgres", &self.postgres.is_some())
            .finish()
    }
}

impl LocalStack {
    /// How `user`'s role connects to NATS.
    pub fn nats_config(&self, user: User) -> NatsConfig {
        self.nats_users
            .get(&user)
            .cloned()
            .unwrap_or_else(|| unreachable!("every user has a configuration"))
    }

    /// How `role` connects to the database: as its own login role on our PostgreSQL, or with
    /// the caller's `DATABASE_URL`.
    pub fn database_url(&self, role: LoginRole) -> DatabaseUrl {
        self.role_urls
            .get(&role)
            .cloned()
            .unwrap_or_else(|| self.database_url.clone())
    }

    /// Starts what the caller does not already have, and returns once every server we started
    /// accepts requests (JetStream answers; the `landslide` database exists, is migrated, and
    /// each role's login role has its password).
    ///
    /// Fails, naming the package to install, when a server binary is missing; fails with the
    /// server's log tail when it does not come up; fails when another `up` uses the same folder.
    pub async fn start(config: LocalConfig) -> anyhow::Result<LocalStack> {
        Self::start_with(config, &Binaries::system()).await
    }

    async fn start_with(config: LocalConfig, binaries: &Binaries) -> anyhow::Result<LocalStack> {
        // Find every binary before touching anything, so a missing one fails fast and cleanly.
        let nats = match config.nats {
            Some(users) => Server::Given(users),
            None => Server::Start(binaries.nats_server()?),
        };
        let postgres = match config.database_url {
            Some(url) => Server::Given(url),
            None => Server::Start(binaries.postgres(&config.data_dir.join("postgres"))?),
        };

        let needs_dir = matches!(nats, Server::Start(_))
            || matches!(postgres, Server::Start(_))
            || !config.keys.all_given();
        let (data_dir, lock) = if needs_dir {
            let (dir, lock) = open_data_dir(&config.data_dir)?;
            (dir, Some(lock))
        } else {
            (config.data_dir.clone(), None)
        };

        let key_files = key_files(config.keys, &data_dir)?;

        // nats-server first: it makes the local CA (or finds it), which then signs PostgreSQL's
        // certificate. It is our child and dies with us if PostgreSQL fails to start.
        let mut guards = Vec::new();
        let (nats_users, nats) = match nats {
            Server::Given(users) => (users, None),
            Server::Start(bin) => {
                let server = start_nats(bin, &data_dir, config.ports.nats).await?;
                let stop = server
                    .stop_command(0)
                    .context("nats-server exited at once")?;
                guards.push(Guard::spawn("nats-server", &stop)?);
                (server.configs(), Some(server))
            }
        };

        let (database_url, role_urls, postgres) = match postgres {
            Server::Given(url) => (url, HashMap::new(), None),
            Server::Start(bins) => {
                let (server, owner, roles) =
                    start_postgres(bins, &data_dir, config.ports.postgres).await?;
                guards.push(Guard::spawn(
                    "PostgreSQL",
                    &server.stop_command(PgStop::Fast),
                )?);
                (owner, roles, Some(server))
            }
        };

        Ok(LocalStack {
            nats_users,
            database_url,
            role_urls,
            key_files,
            data_dir,
            nats,
            postgres,
            guards,
            _lock: lock,
        })
    }

    /// Writes `<data_dir>/env` (mode 0600, replaced whole): the servers' URLs, the CA and every
    /// user's credentials, as [`UpEnv`] reads them back and as a shell sources them. Returns its
    /// path.
    pub fn write_env(&self) -> anyhow::Result<PathBuf> {
        let nats = self.nats_config(User::Admin);
        let mut text = format!(
            "# Written by `landslide up`: how to reach the servers it runs, as each user. Keep it\n\
             # private (mode 0600). `landslide status|audit|export|polls|replay --up {dir}` read it\n\
             # and connect as the command's own user. In a shell, for the nats CLI and psql:\n\
             #   set -a; . {dir}/env; set +a\n\
             #   nats --user audit --password \"$LANDSLIDE_NATS_AUDIT_PASSWORD\" stream info VOTES\n\
             #   psql \"$LANDSLIDE_DATABASE_URL_AUDIT\"\n",
            dir = self.data_dir.display()
        );
        let mut line = |var: &str, value: &str| -> anyhow::Result<()> {
            anyhow::ensure!(
                !value.contains(['\'', '\n']),
                "cannot write {var} to the env file: its value holds a quote or a newline"
            );
            text.push_str(&format!("{var}='{value}'\n"));
            Ok(())
        };
        line("NATS_URL", &nats.urls)?;
        if let Some(tls) = &nats.tls {
            line("NATS_CA", &tls.ca.display().to_string())?;
        }
        for user in User::ALL {
            match self.nats_config(user).credentials {
                landslide_nats::Credentials::UserPassword { password, .. } => {
                    line(&user.password_var(), password.expose_secret())?;
                }
                other => bail!("{user} connects with {other:?}, which the env file cannot hold"),
            }
        }
        line(&database_var(None), self.database_url.expose_secret())?;
        for role in LoginRole::ALL {
            line(
                &database_var(Some(role)),
                self.database_url(role).expose_secret(),
            )?;
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("cannot create {}", self.data_dir.display()))?;
        let path = self.data_dir.join(ENV_FILE);
        // Written beside, then renamed over: a reader never sees half a file.
        let partial = self.data_dir.join(format!("{ENV_FILE}.partial"));
        landslide_servers::write_private(&partial, text.as_bytes())?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Stops the servers this stack started: nats-server with SIGTERM (SIGKILL after a grace
    /// period), PostgreSQL with a fast shutdown; waits until both have exited. Servers the caller
    /// gave by URL are left alone.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Ours to stop from here: the guards would race us, or stop a server we restart.
        for guard in self.guards.drain(..) {
            if let Err(e) = guard.release() {
                tracing::warn!(error = %format!("{e:#}"), "a server's guard");
            }
        }
        // Both are stopped even when the first fails; the first error is reported.
        let nats = match self.nats.take() {
            Some(mut nats) => {
                // A server that ignored SIGTERM has been killed by now: report it, do not fail.
                match nats.terminate(0, NATS_STOP_GRACE).await {
                    Ok(()) => tracing::info!("stopped nats-server"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "nats-server was killed"),
                }
                Ok(())
            }
            None => Ok(()),
        };
        let postgres = match self.postgres.take() {
            Some(mut pg) => {
                let stopped = pg.stop(PgStop::Fast).await;
                if stopped.is_ok() {
                    tracing::info!(cluster = %pg.data_dir().display(), "stopped PostgreSQL");
                }
                stopped
            }
            None => Ok(()),
        };
        nats.and(postgres)
    }

    /// Simulates a crash for the tests: releases the folder lock but leaves both servers running,
    /// as a SIGKILL-ed `landslide up` would.
    #[cfg(test)]
    fn abandon(mut self) {
        drop(self._lock.take());
        // As if the guards had been killed with us.
        for guard in self.guards.drain(..) {
            guard.abandon();
        }
        if let Some(nats) = self.nats.take() {
            // Forgetting the server skips its kill-on-drop.
            std::mem::forget(nats);
        }
        if let Some(mut pg) = self.postgres.take() {
            pg.forget();
        }
    }
}

/// The file in the data folder that holds how to reach up's servers ([`LocalStack::write_env`]).
pub const ENV_FILE: &str = "env";

/// The variable of the env file that holds the database URL of `role` (`None`: the owner's).
fn database_var(role: Option<LoginRole>) -> String {
    match role {
        None => "LANDSLIDE_DATABASE_URL_OWNER".to_owned(),
        Some(role) => format!(
            "LANDSLIDE_DATABASE_URL_{}",
            role.name()
                .trim_start_matches("landslide_")
                .to_ascii_uppercase()
        ),
    }
}

/// The settings a running `landslide up` wrote to `<data_dir>/env`, read back: what an operator's
/// command (`--up <data_dir>`) connects with, as its own user. Every value is held as a secret:
/// most are passwords, or URLs that hold one.
#[derive(Debug)]
pub struct UpEnv {
    path: PathBuf,
    vars: HashMap<String, SecretString>,
}

impl UpEnv {
    /// Reads `<data_dir>/env`; fails, with advice, when `up` has not written one there.
    pub fn read(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(ENV_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: is `landslide up --data-dir {}` running (it writes the file at \
                 start)?",
                path.display(),
                data_dir.display()
            )
        })?;
        let vars = text
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (var, value) = line
                    .split_once('=')
                    .with_context(|| format!("{}: not VAR='value': {line}", path.display()))?;
                let value = value
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .unwrap_or(value);
                Ok((var.to_owned(), SecretString::from(value)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { path, vars })
    }

    fn var(&self, var: &str) -> anyhow::Result<&SecretString> {
        self.vars
            .get(var)
            .with_context(|| format!("{} has no {var}", self.path.display()))
    }

    /// How `user` connects to up's NATS.
    pub fn nats_config(&self, user: User) -> anyhow::Result<NatsConfig> {
        let ca = self
            .vars
            .get("NATS_CA")
            .map(|ca| PathBuf::from(ca.expose_secret()));
        Ok(NatsConfig::user(
            self.var("NATS_URL")?.expose_secret(),
            user.name(),
            self.var(&user.password_var())?.clone(),
            ca,
        ))
    }

    /// How `role` (`None`: the schema's owner) connects to up's database.
    pub fn database_url(&self, role: Option<LoginRole>) -> anyhow::Result<DatabaseUrl> {
        let var = database_var(role);
        DatabaseUrl::parse(self.var(&var)?.expose_secret())
            .with_context(|| format!("{var} of {}", self.path.display()))
    }
}

/// Our nats-server: `<data_dir>/nats/` (the store), `nats.conf`, `nats.log`, `nats.pid`; in a
/// process group of its own, so that Ctrl-C reaches only us and we stop it after the roles that
/// use it have drained.
async fn start_nats(bin: PathBuf, data_dir: &Path, port: u16) -> anyhow::Result<Nats> {
    let spec = NatsSpec {
        ports: Some(vec![port]),
        stems: Some(vec!["nats".to_owned()]),
        names: Some(vec!["landslide-local".to_owned()]),
        binary: Some(bin),
        own_process_group: true,
        ..NatsSpec::new(NatsLayout::Single)
    };
    let nats = Nats::start_with(&spec, data_dir).await?;
    tracing::info!(
        nats.url = %nats.url(0),
        pid = nats.pid(0),
        log = %nats.log(0).display(),
        "started nats-server on {}",
        nats.url(0)
    );
    Ok(nats)
}

/// Our PostgreSQL: the cluster `<data_dir>/postgres/`, its log `postgres.log`, TLS only with a
/// certificate of the local CA, a password for every user; with the `landslide` database,
/// migrated, and each role's login role. Returns the server, the owner's URL and the roles'.
async fn start_postgres(
    bins: landslide_servers::postgres::PgBinaries,
    data_dir: &Path,
    port: u16,
) -> anyhow::Result<(Postgres, DatabaseUrl, HashMap<LoginRole, DatabaseUrl>)> {
    // The CA of `<data_dir>/nats-tls/` (made there by nats-server's start, or now when NATS is
    // the caller's). The certificate is kept while it names the same hosts and comes from this
    // CA, and issued anew otherwise.
    let ca =
        landslide_servers::tls::Authority::open_or_create(&data_dir.join("nats-tls"), LOCAL_CA)?;
    let (cert, _) = ca.issue_or_keep(
        "postgres",
        &["127.0.0.1".to_owned(), "localhost".to_owned()],
        landslide_servers::tls::Purpose::Server,
    )?;
    let passwords = data_dir.join("postgres-users");
    let spec = PostgresSpec {
        cluster: data_dir.join("postgres"),
        log: data_dir.join("postgres.log"),
        port,
        superuser: DB_USER.to_owned(),
        place: landslide_servers::Place::loopback(),
        access: PgAccess {
            tls: Some(PgTls { cert, ca: ca.ca() }),
            // The harness's spec holds it as a `String` of its own.
            superuser_password: Some(
                load_or_create_password(&passwords, DB_USER)?
                    .expose_secret()
                    .to_owned(),
            ),
        },
    };
    let mut server = Postgres::start_with(spec, bins).await?;
    match prepare_database(&server, &passwords).await {
        Ok((owner, roles)) => {
            tracing::info!(
                db.url = %owner,
                cluster = %server.data_dir().display(),
                "started PostgreSQL on 127.0.0.1:{port}"
            );
            Ok((server, owner, roles))
        }
        Err(e) => {
            let _ = server.stop(PgStop::Fast).await;
            Err(e)
        }
    }
}

/// Creates, migrates (as the owner) and sets up the login roles of up's database, as a
/// deployment does with `landslide migrate` and `landslide db-users`.
async fn prepare_database(
    server: &Postgres,
    passwords: &Path,
) -> anyhow::Result<(DatabaseUrl, HashMap<LoginRole, DatabaseUrl>)> {
    server.create_database(DATABASE).await?;
    let owner = DatabaseUrl::parse(&server.url(DATABASE))?;
    landslide_schema::postgres::migrate(&owner).await?;
    let mut conn = landslide_schema::postgres::connect(&owner).await?;
    let mut roles = HashMap::new();
    for role in LoginRole::ALL {
        let password = load_or_create_password(passwords, role.name())?;
        let password = password.expose_secret();
        landslide_schema::postgres::roles::ensure_login_role(&mut conn, role, Some(password))
            .await?;
        let url = server.url_as(role.name(), Some(password), DATABASE);
        roles.insert(role, DatabaseUrl::parse(&url)?);
    }
    Ok((owner, roles))
}

/// The password of database user `user`, kept in `<dir>/<user>.password` (mode 0600).
fn load_or_create_password(dir: &Path, user: &str) -> anyhow::Result<SecretString> {
    let path = dir.join(format!("{user}.password"));
    if path.exists() {
        return landslide_schema::postgres::roles::read_password_file(&path);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    // Hex: nothing in it needs escaping in a URL.
    let password = SecretString::from(landslide_servers::random_secret());
    landslide_servers::write_private(&path, format!("{}\n", password.expose_secret()).as_bytes())?;
    Ok(password)
}

/// A server the caller gave by URL, or the binaries to start our own with.
enum Server<G, B> {
    Given(G),
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

/// The key files: those given, and for the rest the ones kept in `data_dir`, generated where
/// missing. A folder of an earlier release kept one secret, which both signed cookies and derived
/// the ids of keyed votes: it becomes both files, so that its voters stay who they were.
fn key_files(given: GivenKeys, data_dir: &Path) -> anyhow::Result<KeyFiles> {
    let kept = |name: &str| data_dir.join(name);
    let earlier = kept("secret");
    if earlier.exists() {
        let secret = std::fs::read(&earlier)
            .with_context(|| format!("cannot read {}", earlier.display()))?;
        for name in ["cookie-keys", "voter-id-key"] {
            if !kept(name).exists() {
                landslide_servers::write_private(&kept(name), &secret)?;
            }
        }
        std::fs::remove_file(&earlier)
            .with_context(|| format!("cannot remove {}", earlier.display()))?;
        tracing::info!(path = %earlier.display(), "the secret of an earlier release now signs cookies and derives voter ids");
    }
    let or_kept = |given: Option<PathBuf>, name: &str| match given {
        Some(path) => Ok(path),
        None => ensure_key(&kept(name)).map(|()| kept(name)),
    };
    Ok(KeyFiles {
        cookies: or_kept(given.cookies, "cookie-keys")?,
        voter_ids: or_kept(given.voter_ids, "voter-id-key")?,
        receipts: or_kept(given.receipts, "receipt-key")?,
    })
}

/// Generates a key at `path` (readable by us only) unless one is there.
fn ensure_key(path: &Path) -> anyhow::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            // 96 hex digits from three v4 UUIDs: 366 bits from the OS's secure random source
            // (uuid uses getrandom), more than the 32 bytes every key needs.
            let key: String = (0..3)
                .map(|_| uuid::Uuid::new_v4().simple().to_string())
                .collect();
            file.write_all(format!("{key}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write the key to {}", path.display()))?;
            tracing::info!(path = %path.display(), "generated a key");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the key file is readable by others; `chmod 600` it");
            }
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    use diesel::QueryableByName;
    use diesel_async::{RunQueryDsl as _, SimpleAsyncConnection};
    use landslide_patience::Backoff;
    use landslide_schema::postgres::{SslMode, connect};
    use landslide_servers::nats::jetstream_answers;
    use landslide_servers::{ensure_port_free, process_alive, running_as_root};

    fn free_port() -> u16 {
        landslide_servers::free_port().expect("bind an ephemeral port")
    }

    /// A NATS server the caller gives, each user with a password of its own.
    fn given(url: &str) -> NatsUsers {
        User::ALL
            .into_iter()
            .map(|user| (user, NatsConfig::user(url, user.name(), "pw", None)))
            .collect()
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

    async fn assert_jetstream_answers(stack: &LocalStack) {
        let config = stack.nats_config(User::Admin);
        assert!(
            jetstream_answers(&config, User::Admin).await,
            "JetStream answers on {}",
            config.urls
        );
        // And streams work: create one with file storage and publish to it with an ack.
        let client = landslide_nats::connect(&config, User::Admin, "test")
            .await
            .expect("connect to our nats");
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

    /// A URL no test connects to.
    fn unused_database() -> Option<DatabaseUrl> {
        Some(DatabaseUrl::parse("postgres://unused").expect("a URL"))
    }

    async fn votes(database_url: &DatabaseUrl) -> Vec<String> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            choice: String,
        }
        let mut conn = connect(database_url)
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
        assert_jetstream_answers(&stack).await;
        let mut conn = connect(&stack.database_url)
            .await
            .expect("connect to our database");
        conn.batch_execute("CREATE TABLE t (choice text); INSERT INTO t VALUES ('cats')")
            .await
            .expect("create and insert");
        drop(conn);
        let keys = std::fs::read_to_string(&stack.key_files.cookies).expect("cookie keys");
        assert_eq!(keys.trim().len(), 96);
        let mode = std::fs::metadata(&stack.key_files.cookies)
            .expect("cookie keys file")
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
        assert_eq!(
            stack.nats_config(User::Ingest).urls,
            format!("nats://127.0.0.1:{}", ports.nats)
        );
        assert!(
            stack.database_url.to_string().starts_with(&format!(
                "postgres://landslide:***@127.0.0.1:{}/landslide?sslmode=verify-full&sslrootcert=",
                ports.postgres
            )),
            "{}",
            stack.database_url
        );
        assert_eq!(
            std::fs::read_to_string(&stack.key_files.cookies).expect("cookie keys"),
            keys,
            "the keys are kept"
        );
        assert_jetstream_answers(&stack).await;
        assert_eq!(votes(&stack.database_url).await, ["cats"]);
        stack.stop().await.expect("second stop");

        // Both ports are free again: the servers really exited.
        ensure_port_free(ports.nats, "nats").expect("nats port released");
        ensure_port_free(ports.postgres, "postgres").expect("postgres port released");
    }

    /// The path every deployment takes, on one machine: TLS verified against the local CA, a
    /// password for every user, and each role as its own user with only its own rights.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_postgresql_of_up_takes_tls_only_and_each_role_connects_as_its_own_user() {
        #[derive(QueryableByName)]
        struct Session {
            #[diesel(sql_type = diesel::sql_types::Text)]
            user: String,
            #[diesel(sql_type = diesel::sql_types::Bool)]
            ssl: bool,
        }
        let dir = reachable_tempdir();
        let stack = LocalStack::start(config(dir.path(), free_ports()))
            .await
            .expect("start");
        for role in LoginRole::ALL {
            let url = stack.database_url(role);
            assert_eq!(url.ssl_mode(), SslMode::VerifyFull, "{url}");
            assert_eq!(
                url.root_cert(),
                Some(dir.path().join("nats-tls/ca.pem").as_path())
            );
            let mut conn = connect(&url).await.expect("connect as the role");
            let session: Session = diesel::sql_query(
                "SELECT current_user::text AS user, ssl FROM pg_stat_ssl \
                 WHERE pid = pg_backend_pid()",
            )
            .get_result(&mut conn)
            .await
            .expect("read the session");
            assert_eq!((session.user.as_str(), session.ssl), (role.name(), true));
            landslide_schema::postgres::check_schema(&mut conn)
                .await
                .expect("migrated");
            let write = diesel::sql_query(
                "INSERT INTO tallies (poll, option, shard, votes) VALUES ('pets', 'cats', 0, 1)",
            )
            .execute(&mut conn)
            .await;
            match role {
                LoginRole::Worker => assert!(write.is_ok(), "{write:?}"),
                LoginRole::Tally | LoginRole::Audit => {
                    let err = write.expect_err("a reader cannot write").to_string();
                    assert!(err.contains("permission denied"), "{err}");
                }
            }
        }

        // Neither plaintext nor a missing password gets in, not even for the owner.
        let owner = stack.database_url.expose_secret();
        let plaintext =
            owner.split_once('?').expect("parameters").0.to_owned() + "?sslmode=disable";
        let err = connect(&DatabaseUrl::parse(&plaintext).expect("a URL"))
            .await
            .err()
            .expect("plaintext is refused");
        assert!(format!("{err:#}").contains("no encryption"), "{err:#}");
        let no_password = owner.replacen(
            &format!(
                ":{}@",
                std::fs::read_to_string(dir.path().join("postgres-users/landslide.password"))
                    .expect("the owner's password file")
                    .trim()
            ),
            "@",
            1,
        );
        assert_ne!(no_password, owner);
        let err = connect(&DatabaseUrl::parse(&no_password).expect("a URL"))
            .await
            .err()
            .expect("no password, no connection");
        assert!(format!("{err:#}").contains("password"), "{err:#}");
        stack.stop().await.expect("stop");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn servers_left_by_a_crashed_run_are_replaced_and_keep_their_data() {
        let dir = reachable_tempdir();
        let ports = free_ports();
        let stack = LocalStack::start(config(dir.path(), ports))
            .await
            .expect("first start");
        let mut conn = connect(&stack.database_url).await.expect("connect");
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
        assert_jetstream_answers(&stack).await;
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
        Backoff::constant(Duration::from_millis(20))
            .within(Duration::from_secs(5), "nats-server to release its port")
            .until(|| std::future::ready(ensure_port_free(ports.nats, "nats").ok()))
            .await
            .expect("nats-server still listens");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_second_stack_on_a_folder_in_use_is_refused() {
        let dir = reachable_tempdir();
        let first = LocalStack::start(LocalConfig {
            nats: Some(given("nats://unused")),
            database_url: unused_database(),
            ..config(dir.path(), free_ports())
        })
        .await
        .expect("first start");
        let err = LocalStack::start(LocalConfig {
            nats: Some(given("nats://unused")),
            database_url: unused_database(),
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
            database_url: unused_database(),
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
    async fn given_urls_and_keys_are_used_as_they_are() {
        let dir = reachable_tempdir();
        let file = |name: &str| dir.path().join(name);
        let stack = LocalStack::start(LocalConfig {
            nats: Some(given("nats://elsewhere:4222")),
            database_url: Some(DatabaseUrl::parse("postgres://u@elsewhere/db").expect("a URL")),
            keys: GivenKeys {
                cookies: Some(file("c")),
                voter_ids: Some(file("v")),
                receipts: Some(file("r")),
            },
            ..config(&dir.path().join("never-created"), free_ports())
        })
        .await
        .expect("start with everything given");
        assert_eq!(stack.nats_config(User::Tally).urls, "nats://elsewhere:4222");
        assert_eq!(
            stack.database_url.expose_secret(),
            "postgres://u@elsewhere/db"
        );
        assert_eq!(stack.database_url(LoginRole::Tally), stack.database_url);
        assert_eq!(
            stack.key_files,
            KeyFiles {
                cookies: file("c"),
                voter_ids: file("v"),
                receipts: file("r"),
            }
        );
        assert!(!dir.path().join("never-created").exists());
        stack.stop().await.expect("stop");
    }

    /// The one secret of an earlier release's folder signed cookies and derived the ids of keyed
    /// votes: it must go on doing both, or every voter of an open poll is a new one.
    #[test]
    fn a_folder_of_an_earlier_release_keeps_its_secret_for_cookies_and_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let earlier = "e".repeat(96);
        std::fs::write(dir.path().join("secret"), &earlier).expect("write");
        let files = key_files(GivenKeys::default(), dir.path()).expect("key files");
        let keys = files.read().expect("keys");
        assert_eq!(keys.cookies.signing().expose_secret(), earlier);
        assert!(keys.cookies.verify_only().is_empty());
        assert_eq!(keys.voter_ids.0.expose_secret(), earlier);
        let receipt_key = std::fs::read_to_string(&files.receipts).expect("receipt key");
        assert_ne!(receipt_key.trim(), earlier, "the receipt key is a new one");
        assert!(!dir.path().join("secret").exists());
        // Kept: a second start reads the same keys.
        let again = key_files(GivenKeys::default(), dir.path()).expect("key files");
        assert_eq!(again, files);
        assert_eq!(
            again.read().expect("keys").voter_ids.0.expose_secret(),
            earlier
        );
        // A new folder gets three distinct keys.
        let fresh = tempfile::tempdir().expect("tempdir");
        let keys = key_files(GivenKeys::default(), fresh.path())
            .expect("key files")
            .read()
            .expect("keys");
        assert_ne!(
            keys.cookies.signing().expose_secret(),
            keys.voter_ids.0.expose_secret()
        );
    }

    fn nowhere(dir: &Path) -> Binaries {
        Binaries {
            nats_server: Vec::new(),
            path: vec![dir.join("empty")],
            pg_root: dir.join("empty"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_nats_server_names_the_package_to_install() {
        let dir = reachable_tempdir();
        let err = LocalStack::start_with(
            LocalConfig {
                database_url: unused_database(),
                ..config(&dir.path().join("data"), free_ports())
            },
            &nowhere(dir.path()),
        )
        .await
        .expect_err("no nats-server");
        let msg = err.to_string();
        assert_eq!(msg, landslide_servers::nats_server_missing());
        assert!(msg.contains("scripts/up"), "{msg}");
        assert!(
            msg.contains(&landslide_nats::ServerVersion::pinned().to_string()),
            "{msg}"
        );
        assert!(!dir.path().join("data").exists(), "nothing was created");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_postgresql_server_names_the_package_to_install() {
        let dir = reachable_tempdir();
        let err = LocalStack::start_with(
            LocalConfig {
                nats: Some(given("nats://unused")),
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
        if !running_as_root() {
            // Only root hands the cluster to the postgres user.
            return;
        }
        // Private to root, as /root is: the postgres user cannot enter it.
        let private = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod temp dir");
        let err = LocalStack::start(LocalConfig {
            nats: Some(given("nats://unused")),
            ..config(&private.path().join("data"), free_ports())
        })
        .await
        .expect_err("unreachable folder");
        let msg = format!("{err:#}");
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(msg.contains("/var/lib/landslide"), "{msg}");
    }
}
