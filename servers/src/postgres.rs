//! A PostgreSQL cluster of our own, created by `initdb` and run by `pg_ctl` (so daemonized, not
//! our child). PostgreSQL refuses to run as root, so when we are root the cluster belongs to, and
//! the server runs as, the `postgres` system user. Durability settings stay at their defaults:
//! `synchronous_commit = off` would let a crash lose commits that a worker has already acked.
//!
//! Who may connect is [`PgAccess`]: by default plaintext and trusted on loopback (the tests' and
//! the harness's servers), or TLS only (`hostssl` lines alone in `pg_hba.conf`, a certificate
//! from a [`crate::tls::Authority`]) with a password for every user (`landslide up`).
//! `pg_hba.conf` is written at every start, so it always says what the spec says.

use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use anyhow::{Context as _, anyhow, bail};
use diesel::QueryableByName;
use tokio::process::Command;

#[cfg(feature = "faults")]
use crate::lazyfs::{CutReport, LazyFs};
use crate::process::log_tail;
use crate::{Binaries, Place};

/// Seconds `pg_ctl` waits for start-up; crash recovery after an unclean stop can take a while.
const START_TIMEOUT_S: &str = "120";
/// Seconds `pg_ctl` waits for a fast shutdown before we fall back to an immediate one.
const STOP_TIMEOUT_S: &str = "60";

/// The message when no server is installed.
pub const POSTGRES_MISSING: &str =
    "PostgreSQL server not found: install it with `sudo apt-get install postgresql`";

/// How PostgreSQL is shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgStop {
    /// Sessions are ended, a checkpoint is written (an immediate stop if that takes too long).
    Fast,
    /// Like a crash: every process quits at once and the next start replays the WAL.
    Immediate,
}

impl PgStop {
    fn mode(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Immediate => "immediate",
        }
    }
}

/// The server programs we use, found by [`Binaries::postgres`].
#[derive(Debug, Clone)]
pub struct PgBinaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    /// The server itself, for single-user mode (setting the superuser's password offline).
    postgres: PathBuf,
}

impl Binaries {
    /// The server binaries: those of the cluster's own major version when it exists (a newer
    /// server cannot open an older cluster), else `pg_config --bindir`, else the highest version
    /// under `pg_root`, else whatever is on the search path.
    pub fn postgres(&self, cluster: &Path) -> anyhow::Result<PgBinaries> {
        let in_dir = |dir: PathBuf| {
            let bins = PgBinaries {
                initdb: dir.join("initdb"),
                pg_ctl: dir.join("pg_ctl"),
                postgres: dir.join("postgres"),
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
            (Some(initdb), Some(pg_ctl)) => Ok(PgBinaries {
                postgres: initdb.with_file_name("postgres"),
                initdb,
                pg_ctl,
            }),
            _ => bail!(POSTGRES_MISSING),
        }
    }
}

/// What [`Postgres::start_with`] starts.
#[derive(Debug, Clone)]
pub struct PostgresSpec {
    /// The cluster's data folder; `initdb` runs once when it holds no cluster.
    pub cluster: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    /// The superuser `initdb` creates, trusted on loopback.
    pub superuser: String,
    /// Where the server runs and listens. On a host of a network, the network's other hosts
    /// may connect as loopback may.
    pub place: Place,
    /// TLS, and whether a password is needed.
    pub access: PgAccess,
}

/// How clients may reach a cluster we run.
#[derive(Debug, Clone, Default)]
pub struct PgAccess {
    /// TLS only, with this certificate; `None`: plaintext only.
    pub tls: Option<PgTls>,
    /// The superuser's password; with one, every user must give its own (`scram-sha-256`), and
    /// without, everyone who reaches the port is trusted as whoever they say.
    pub superuser_password: Option<String>,
}

/// The server's certificate and the CA that signed it (what clients name as `sslrootcert`).
#[derive(Debug, Clone)]
pub struct PgTls {
    pub cert: crate::tls::CertFiles,
    pub ca: PathBuf,
}

/// The user the PostgreSQL programs run as, when it is not us.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running PostgreSQL cluster. Stopped (fast) when dropped without [`Postgres::stop`].
#[derive(Debug)]
pub struct Postgres {
    bins: PgBinaries,
    spec: PostgresSpec,
    run_as: Option<RunAs>,
    /// Whether we still have to stop it; `Drop` stops it when this is still true.
    running: bool,
    /// The power-loss disk the cluster lives on, if any. `Drop` stops the server first.
    #[cfg(feature = "faults")]
    disk: Option<LazyFs>,
    /// The port, held while the server is stopped (loopback only).
    held: crate::PortHold,
}

impl Postgres {
    /// A new cluster under `dir` (`dir/postgres`, `dir/postgres.log`) on a free port, with the
    /// superuser `postgres`: the tests' and the harness's.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_in(
            dir,
            dir.join("postgres"),
            &Place::loopback(),
            PgAccess::default(),
        )
        .await
    }

    /// [`Postgres::start`] at `place`; with `power_loss`, the cluster is on a [`LazyFs`] over
    /// `dir/postgres.disk/`, so that [`Postgres::power_cut`] can throw away what PostgreSQL
    /// never fsynced.
    #[cfg(feature = "faults")]
    pub async fn start_at(dir: &Path, place: &Place, power_loss: bool) -> anyhow::Result<Self> {
        if !power_loss {
            return Self::start_in(dir, dir.join("postgres"), place, PgAccess::default()).await;
        }
        let (backing, mountpoint) = (dir.join("postgres.disk"), dir.join("postgres.mount"));
        for folder in [&backing, &mountpoint] {
            std::fs::create_dir_all(folder)?;
            std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755))?;
        }
        let disk = LazyFs::mount_async(backing, mountpoint.clone()).await?;
        let mut server =
            Self::start_in(dir, mountpoint.join("data"), place, PgAccess::default()).await?;
        server.disk = Some(disk);
        Ok(server)
    }

    /// [`Postgres::start`] with `access`: TLS only, or passwords (the TLS tests' servers).
    pub async fn start_with_access(dir: &Path, access: PgAccess) -> anyhow::Result<Self> {
        Self::start_in(dir, dir.join("postgres"), &Place::loopback(), access).await
    }

    /// A cluster at `cluster` with its log in `dir`, as the `postgres` superuser on a free port.
    async fn start_in(
        dir: &Path,
        cluster: PathBuf,
        place: &Place,
        access: PgAccess,
    ) -> anyhow::Result<Self> {
        // A fresh temporary folder is private: the postgres user must be able to enter it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
        let spec = PostgresSpec {
            cluster,
            log: dir.join("postgres.log"),
            port: crate::free_port()?,
            superuser: "postgres".to_owned(),
            place: place.clone(),
            access,
        };
        let bins = Binaries::system().postgres(&spec.cluster)?;
        Self::start_with(spec, bins).await
    }

    /// The power cut: every PostgreSQL process quits at once (an immediate stop, which writes
    /// nothing), then the disk throws away what was never fsynced and is mounted again. The
    /// server stays down until [`Postgres::start_server`], whose crash recovery replays the WAL.
    #[cfg(feature = "faults")]
    pub async fn power_cut(&mut self) -> anyhow::Result<CutReport> {
        self.stop(PgStop::Immediate).await?;
        let disk = self
            .disk
            .take()
            .context("PostgreSQL is not on a power-loss disk")?;
        let (disk, report) = disk.power_cycle().await?;
        self.disk = Some(disk);
        Ok(report)
    }

    /// Creates the cluster if needed, stops a server that a crashed run left on it, and starts
    /// it. Fails with advice when the binaries are missing or the folder is out of the postgres
    /// user's reach, and with the log's tail when the server does not come up.
    pub async fn start_with(spec: PostgresSpec, bins: PgBinaries) -> anyhow::Result<Self> {
        let run_as = if crate::running_as_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let mut server = Self {
            bins,
            spec,
            run_as,
            running: false,
            #[cfg(feature = "faults")]
            disk: None,
            held: crate::PortHold::default(),
        };
        server.prepare_cluster().await?;
        server.stop_leftover().await?;
        crate::ensure_port_free(server.spec.port, "PostgreSQL")?;
        server.start_server().await?;
        Ok(server)
    }

    /// The URL of database `name` on this server, as the superuser (with its password, and
    /// `sslmode=verify-full` against the CA when the server has TLS).
    pub fn url(&self, name: &str) -> String {
        let password = self.spec.access.superuser_password.as_deref();
        self.url_as(&self.spec.superuser, password, name)
    }

    /// The URL of database `name` as `user`, verifying the server as [`Postgres::url`] does.
    pub fn url_as(&self, user: &str, password: Option<&str>, name: &str) -> String {
        use landslide_schema::postgres::percent_encode;
        let userinfo = match password {
            Some(password) => format!("{user}:{}", percent_encode(password)),
            None => user.to_owned(),
        };
        let tls = match &self.spec.access.tls {
            Some(tls) => format!(
                "?sslmode=verify-full&sslrootcert={}",
                percent_encode(&tls.ca.to_string_lossy())
            ),
            None => String::new(),
        };
        format!(
            "postgres://{userinfo}@{}:{}/{name}{tls}",
            self.spec.place.addr(),
            self.spec.port
        )
    }

    pub fn port(&self) -> u16 {
        self.spec.port
    }

    /// The cluster's data folder.
    pub fn data_dir(&self) -> &Path {
        &self.spec.cluster
    }

    /// Starts the server on the existing cluster and waits until it accepts connections.
    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        self.held.release();
        self.configure_access().await?;
        // No Unix socket: its path must fit in 107 bytes, which a deep data folder breaks, and
        // every client here uses TCP. pg_ctl passes these options through /bin/sh, hence ''.
        // With TLS, the certificate is the cluster's `server.crt` and `server.key`, PostgreSQL's
        // defaults, copied there by `configure_access`.
        let options = format!(
            "-p {} -c listen_addresses={} -c unix_socket_directories=''{}",
            self.spec.port,
            self.spec.place.addr(),
            if self.spec.access.tls.is_some() {
                " -c ssl=on"
            } else {
                ""
            }
        );
        let output = self
            .command(&self.bins.pg_ctl)
            .arg("start")
            .arg("-D")
            .arg(&self.spec.cluster)
            .args(["-w", "-t", START_TIMEOUT_S, "-l"])
            .arg(&self.spec.log)
            .args(["-o", &options])
            .output()
            .await
            .context("cannot run pg_ctl start")?;
        // A timed-out start may still be coming up: make sure it does not linger.
        self.running = true;
        if !output.status.success() {
            let _ = self.stop(PgStop::Immediate).await;
            bail!(
                "PostgreSQL did not start ({}): {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                log_tail(&self.spec.log)
            );
        }
        Ok(())
    }

    /// Stops the server and waits until it has exited. A fast stop that does not finish in time
    /// becomes an immediate one (recovery replays the WAL at the next start, so nothing
    /// committed is lost either).
    pub async fn stop(&mut self, how: PgStop) -> anyhow::Result<()> {
        // Without a postmaster.pid no server runs on the cluster (it failed to start, or died).
        if !self.spec.cluster.join("postmaster.pid").exists() {
            self.running = false;
            return Ok(());
        }
        let status = self.pg_stop(how).await?;
        if !status.success() {
            tracing::warn!(%status, mode = how.mode(), "PostgreSQL did not stop in time; stopping it immediately");
            let immediate = self.pg_stop(PgStop::Immediate).await?;
            if !immediate.success() {
                bail!(
                    "cannot stop PostgreSQL on {}: pg_ctl stop -m immediate: {immediate}",
                    self.spec.cluster.display()
                );
            }
        }
        self.running = false;
        if !self.spec.place.is_host() {
            self.held = crate::PortHold::hold(&[self.spec.port]);
        }
        Ok(())
    }

    async fn pg_stop(&self, how: PgStop) -> anyhow::Result<ExitStatus> {
        Command::from(self.stop_command(how))
            .stdout(Stdio::null())
            .status()
            .await
            .context("cannot run pg_ctl stop")
    }

    /// The command that stops the server `how`, as its owner: `pg_ctl stop`, waiting.
    pub fn stop_command(&self, how: PgStop) -> std::process::Command {
        let mut command = self.std_command(&self.bins.pg_ctl);
        command.arg("stop").arg("-D").arg(&self.spec.cluster).args([
            "-m",
            how.mode(),
            "-w",
            "-t",
            STOP_TIMEOUT_S,
        ]);
        command
    }

    /// Writes `pg_hba.conf` as the spec says, puts the certificate where the server reads it,
    /// and sets the superuser's password: before every start, so that a cluster made by an
    /// earlier release (trusted, plaintext) is brought to the spec too.
    async fn configure_access(&self) -> anyhow::Result<()> {
        let access = &self.spec.access;
        let cluster = &self.spec.cluster;
        let kind = if access.tls.is_some() {
            "hostssl"
        } else {
            "host"
        };
        let method = if access.superuser_password.is_some() {
            "scram-sha-256"
        } else {
            "trust"
        };
        // Only TCP (no Unix socket is opened), from loopback and, on a network, its hosts.
        let mut hba = format!(
            "# Written by landslide-servers at every start (servers/src/postgres.rs).\n\
             {kind} all all 127.0.0.1/32 {method}\n{kind} all all ::1/128 {method}\n"
        );
        if let Some(peers) = self.spec.place.peers() {
            hba.push_str(&format!("{kind} all all {peers} {method}\n"));
        }
        let mut files = vec![(cluster.join("pg_hba.conf"), hba.into_bytes(), 0o600)];
        if let Some(tls) = &access.tls {
            let read = |path: &Path| {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            };
            // PostgreSQL refuses a key that others may read, or that belongs to another user.
            files.push((cluster.join("server.crt"), read(&tls.cert.cert)?, 0o644));
            files.push((cluster.join("server.key"), read(&tls.cert.key)?, 0o600));
        }
        let run_as = self.run_as;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for (path, bytes, mode) in files {
                // Synced: on a power-loss disk, what the server reads must survive a cut too.
                std::fs::File::create(&path)
                    .and_then(|mut file| {
                        std::io::Write::write_all(&mut file, &bytes)?;
                        file.sync_all()
                    })
                    .with_context(|| format!("cannot write {}", path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                if let Some(user) = run_as {
                    std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                        .with_context(|| format!("cannot give {} to postgres", path.display()))?;
                }
            }
            Ok(())
        })
        .await
        .context("the access configuration task panicked")??;
        if let Some(password) = &access.superuser_password {
            self.set_superuser_password(password).await?;
        }
        Ok(())
    }

    /// Sets the superuser's password in single-user mode, with the server stopped: with
    /// `scram-sha-256` for everyone, no connection could set it, not even the first.
    async fn set_superuser_password(&self, password: &str) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        // A SCRAM verifier: the password itself is never written anywhere the server keeps.
        // The role name is ours (the spec's), quoted as an identifier.
        let statement = format!(
            "ALTER ROLE \"{}\" PASSWORD '{}';\n",
            self.spec.superuser,
            landslide_schema::postgres::roles::scram_verifier(password)
        );
        let mut child = self
            .command(&self.bins.postgres)
            .arg("--single")
            .arg("-D")
            .arg(&self.spec.cluster)
            // The database `initdb` always makes; a standalone backend is the bootstrap
            // superuser whatever the name it is started under.
            .arg("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run postgres --single")?;
        let mut stdin = child
            .stdin
            .take()
            .context("postgres --single has no stdin")?;
        stdin.write_all(statement.as_bytes()).await?;
        drop(stdin);
        let output = child
            .wait_with_output()
            .await
            .context("cannot run postgres --single")?;
        let said =
            String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || said.contains("ERROR") {
            bail!(
                "cannot set the password of {} ({}): {}",
                self.spec.superuser,
                output.status,
                said.trim()
            );
        }
        Ok(())
    }

    /// Creates database `name` unless it exists.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<()> {
        // Imported here only: its `first` would shadow slices' `first` elsewhere in the module.
        use diesel_async::RunQueryDsl as _;
        #[derive(QueryableByName)]
        struct Exists {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            exists: bool,
        }
        let admin_url = landslide_schema::postgres::DatabaseUrl::parse(&self.url("postgres"))?;
        let mut conn = landslide_schema::postgres::connect(&admin_url).await?;
        let found: Exists =
            diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind::<diesel::sql_types::Text, _>(name)
                .get_result(&mut conn)
                .await
                .context("cannot list the databases")?;
        if !found.exists {
            diesel::sql_query(format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .with_context(|| format!("cannot create the database {name}"))?;
            tracing::info!(db.name = name, "created the database");
        }
        Ok(())
    }

    /// SIGSTOP to the postmaster and every backend: the server stops answering but keeps its
    /// connections, as if the network to it were cut. [`Postgres::resume`] continues it.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal_all(nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`Postgres::pause`].
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal_all(nix::sys::signal::Signal::SIGCONT)
    }

    /// The postmaster (first line of `postmaster.pid`) and its children, found in /proc.
    fn signal_all(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(self.spec.cluster.join("postmaster.pid"))
            .context("PostgreSQL is not running (no postmaster.pid)")?;
        let postmaster: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid has no pid")?;
        crate::signal(postmaster, signal)?;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // The parent pid is the second field after the parenthesised command name.
            let parent = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(") ")?;
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(postmaster) {
                crate::signal(pid, signal)?;
            }
        }
        Ok(())
    }

    /// Marks the server as not ours to stop (a test simulating a crashed parent).
    pub fn forget(&mut self) {
        self.running = false;
    }

    /// A command for a PostgreSQL program, run as the cluster's owner, from `/` (the programs
    /// resolve their working directory, which may be private to root).
    fn command(&self, program: &Path) -> Command {
        Command::from(self.std_command(program))
    }

    fn std_command(&self, program: &Path) -> std::process::Command {
        let place = &self.spec.place;
        let mut cmd = match self.run_as {
            // The user changes with util-linux's setpriv (which execs the program: pg_ctl's pid
            // stays the one we started), after `ip netns exec`, which needs root; and as an
            // argument, not a uid set on the command, so that a command handed to a `Guard`
            // (which runs its program and arguments) changes user too.
            Some(user) => {
                let (ip, leading) = place.launcher(Path::new("setpriv"));
                let mut cmd = std::process::Command::new(ip);
                cmd.args(leading).args([
                    format!("--reuid={}", user.uid),
                    format!("--regid={}", user.gid),
                    "--clear-groups".to_owned(),
                ]);
                cmd.arg(program);
                cmd
            }
            None => {
                let (launcher, leading) = place.launcher(program);
                let mut cmd = std::process::Command::new(launcher);
                cmd.args(leading);
                cmd
            }
        };
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }

    /// Makes the cluster folder and log ours (or the postgres user's) and runs initdb once.
    async fn prepare_cluster(&self) -> anyhow::Result<()> {
        let cluster = self.spec.cluster.clone();
        let parent = cluster
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        if let Some(user) = self.run_as {
            let status = self
                .command(Path::new("test"))
                .arg("-x")
                .arg(&parent)
                .status()
                .await
                .context("cannot run test(1) as the postgres user")?;
            if !status.success() {
                bail!(
                    "PostgreSQL refuses to run as root, so it runs as the `postgres` user, which \
                     cannot reach the data folder {} (it or a folder above it, such as /root, is \
                     private): choose a data folder it can reach with `--data-dir`, e.g. \
                     /var/lib/landslide",
                    parent.display()
                );
            }
            let log = self.spec.log.clone();
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

        if self.spec.cluster.join("PG_VERSION").is_file() {
            return Ok(());
        }
        let output = self
            .command(&self.bins.initdb)
            .arg("-D")
            .arg(&self.spec.cluster)
            .args([
                "-U",
                &self.spec.superuser,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .await
            .context("cannot run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb {} failed ({}): {}",
                self.spec.cluster.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        tracing::info!(cluster = %self.spec.cluster.display(), "created a PostgreSQL cluster");
        Ok(())
    }

    /// Stops a server that a crashed run left on this cluster: it may listen on another port,
    /// and it keeps the cluster locked.
    async fn stop_leftover(&mut self) -> anyhow::Result<()> {
        let status = self
            .command(&self.bins.pg_ctl)
            .arg("status")
            .arg("-D")
            .arg(&self.spec.cluster)
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
            self.stop(PgStop::Fast).await?;
            // Ours to start on now: not held from ourselves.
            self.held.release();
        }
        Ok(())
    }
}

impl Drop for Postgres {
    /// The fallback when `stop` was not called (a panic, an early return): a blocking fast
    /// shutdown, since Drop cannot await. It blocks the thread for as long as the shutdown takes,
    /// which is acceptable on this path only.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        // A paused server (a test that failed midway) would never stop.
        let _ = self.resume();
        let status = self
            .std_command(&self.bins.pg_ctl)
            .arg("stop")
            .arg("-D")
            .arg(&self.spec.cluster)
            .args(["-m", "fast", "-w", "-t", STOP_TIMEOUT_S])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => tracing::warn!(%status, "could not stop PostgreSQL on drop"),
            Err(e) => tracing::warn!(error = %e, "could not run pg_ctl stop on drop"),
        }
    }
}

/// The `postgres` system user.
fn postgres_user() -> anyhow::Result<RunAs> {
    nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .map(|user| RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
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
