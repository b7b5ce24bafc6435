//! The private servers the harness owns, so that it may kill them: one nats-server or a
//! three-node JetStream cluster on loopback ports, and a PostgreSQL cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::Command;

use crate::process::{Process, log_tail};

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_binary(name: &str, extra: &[&str]) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// How the JetStream servers are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NatsLayout {
    /// One server, file storage, R1 streams.
    Single,
    /// Three servers on loopback ports, R3 streams.
    Cluster,
}

impl NatsLayout {
    pub fn replicas(self) -> usize {
        match self {
            Self::Single => 1,
            Self::Cluster => 3,
        }
    }
}

impl std::fmt::Display for NatsLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single => "single nats-server",
            Self::Cluster => "3-node cluster (R3)",
        })
    }
}

#[derive(Debug)]
struct NatsNode {
    name: String,
    port: u16,
    process: Process,
}

/// nats-server processes with JetStream and file storage.
#[derive(Debug)]
pub struct Nats {
    nodes: Vec<NatsNode>,
}

impl Nats {
    pub async fn start(layout: NatsLayout, dir: &Path) -> anyhow::Result<Self> {
        let bin = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .or_else(|| find_binary("nats-server", &["/usr/sbin", "/usr/local/bin"]))
            .context("nats-server not found: install it (apt-get install nats-server)")?;
        let count = match layout {
            NatsLayout::Single => 1,
            NatsLayout::Cluster => 3,
        };
        let ports: Vec<(u16, u16)> = (0..count)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let mut nodes = Vec::new();
        for (i, &(port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let mut process = Process::new(
                format!("nats-server {name}"),
                &bin,
                dir.join(format!("nats-{name}.log")),
            )
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(dir.join(format!("nats-{name}")))
            .arg("--server_name")
            .arg(&name);
            if layout == NatsLayout::Cluster {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, (_, cp))| format!("nats://127.0.0.1:{cp}"))
                    .collect();
                process = process
                    .arg("--cluster_name")
                    .arg("chaos")
                    .arg("--cluster")
                    .arg(format!("nats://127.0.0.1:{cluster_port}"))
                    .arg("--routes")
                    .arg(routes.join(","));
            }
            process.start()?;
            nodes.push(NatsNode {
                name,
                port,
                process,
            });
        }
        let nats = Self { nodes };
        for i in 0..nats.nodes.len() {
            nats.wait_ready(i).await?;
        }
        if layout == NatsLayout::Cluster {
            nats.wait_for_placement().await?;
        }
        Ok(nats)
    }

    /// Every server's client URL, comma-separated: `NATS_URL` for the roles.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        urls.join(",")
    }

    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].port)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The process id of a running node.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].process.pid()
    }

    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    pub async fn kill(&mut self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].process.kill().await
    }

    /// Starts a stopped node again on the same port and store; waits until it answers.
    pub async fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].process.start()?;
        self.wait_ready(node).await
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.nodes
            .iter_mut()
            .try_for_each(|n| n.process.check_running())
    }

    /// Waits until the node answers JetStream requests (in a cluster: a meta leader exists).
    async fn wait_ready(&self, node: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = self.url(node);
        loop {
            if landslide_nats::api_request(&url, "$JS.API.INFO")
                .await
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer JetStream requests within 60 s",
                    self.nodes[node].name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an R3 stream can be placed: every node answering is not enough, the meta
    /// leader must know all three peers ("no suitable peers for placement" until then).
    async fn wait_for_placement(&self) -> anyhow::Result<()> {
        let client = landslide_nats::connect(&self.urls(), "landslide-chaos-probe").await?;
        let config = r#"{"name":"CHAOS_PROBE","subjects":["chaos.probe"],"num_replicas":3,"storage":"memory"}"#;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = client
                .request("$JS.API.STREAM.CREATE.CHAOS_PROBE", config.into())
                .await;
            let created = reply.ok().and_then(|r| {
                let answer: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
                answer.get("error").is_none().then_some(())
            });
            if created.is_some() {
                let _ = client
                    .request("$JS.API.STREAM.DELETE.CHAOS_PROBE", "".into())
                    .await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster could not place an R3 stream within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node that leads `stream`'s RAFT group, by its stream info.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        for node in 0..self.nodes.len() {
            if let Some(info) = landslide_nats::api_request(&self.url(node), &subject).await
                && let Some(leader) = info["cluster"]["leader"].as_str()
            {
                return self.nodes.iter().position(|n| n.name == leader);
            }
        }
        None
    }
}

/// How PostgreSQL is shut down before a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgStop {
    /// Sessions are ended, a checkpoint is written.
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

/// A private PostgreSQL cluster, run by `pg_ctl` (as the `postgres` user when we are root, since
/// PostgreSQL refuses to run as root). Stopped when dropped.
#[derive(Debug)]
pub struct Postgres {
    bindir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
}

impl Postgres {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let bindir = postgres_bindir()?;
        let as_postgres = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false);
        // The postgres user must be able to create the cluster and its log here.
        let root = dir.join("postgres");
        std::fs::create_dir_all(&root)?;
        set_mode(dir, 0o755)?;
        set_mode(&root, 0o777)?;
        let mut pg = Self {
            bindir,
            data: root.join("data"),
            log: root.join("postgres.log"),
            port: free_port()?,
            as_postgres,
            running: false,
        };
        let initdb = pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .await
            .context("cannot run initdb")?;
        if !initdb.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr).trim()
            );
        }
        pg.start_server().await?;
        Ok(pg)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub async fn stop(&mut self, how: PgStop) -> anyhow::Result<()> {
        let status = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", how.mode(), "-w", "-t", "60"])
            .stdout(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "pg_ctl stop -m {} failed", how.mode());
        self.running = false;
        Ok(())
    }

    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        // Durability settings stay at their defaults: `synchronous_commit = off` would let an
        // immediate shutdown lose commits that a worker has already acked.
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=100",
            self.port
        );
        let output = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "60", "-l"])
            .arg(&self.log)
            .args(["-o", &options])
            .output()
            .await
            .context("cannot run pg_ctl start")?;
        self.running = true;
        if !output.status.success() {
            bail!("PostgreSQL did not start; {}", log_tail(&self.log));
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        Command::from(self.std_command(program))
    }

    /// A PostgreSQL program run as the cluster's owner, from `/` (our folder may be private).
    fn std_command(&self, program: &str) -> std::process::Command {
        let program = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(program);
            cmd
        } else {
            std::process::Command::new(program)
        };
        cmd.current_dir("/").stdin(Stdio::null());
        cmd
    }
}

impl Drop for Postgres {
    /// Blocking, since Drop cannot await: an immediate stop, for a run that ended early.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let _ = self
            .std_command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Debian installs the server programs under /usr/lib/postgresql/<major>/bin, off `PATH`.
fn postgres_bindir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("pg_ctl").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    find_binary("pg_ctl", &[])
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .context("the PostgreSQL server is not installed (apt-get install postgresql)")
}
