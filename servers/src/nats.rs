//! nats-server processes: one node or a three-node JetStream cluster on loopback ports, each with a
//! config file of its own, written here with the settings every deployment in `nats/` uses:
//! the users and permissions of `nats/auth.conf` (with passwords of the run's own), TLS on the
//! client port with a certificate from the run's own CA, and TLS verified both ways between the
//! cluster's nodes. A client connects with [`Nats::config`] for its role's user; nothing connects
//! without credentials.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use landslide_nats::{NatsConfig, Topology, User};
use landslide_patience::Backoff;

#[cfg(feature = "faults")]
use crate::lazyfs::{CutReport, LazyFs};
use crate::process::{Process, log_tail};
use crate::{Binaries, Place, free_port};

/// How the JetStream servers are laid out.
/// (A `clap::ValueEnum`, for the command lines that choose one.)
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

    fn nodes(self) -> usize {
        self.replicas()
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

/// When the servers fsync what they store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `sync_interval: always`: every write is on disk before the server acks it. What every
    /// deployment runs.
    Always,
    /// The server's default: files are fsynced every two minutes, acks come from the page cache.
    /// Only for the control test that shows the power-loss fault finds lost votes, and for the
    /// benchmark's comparison.
    Lazy,
}

/// The files of one node, all named after one stem under the run's folder: `<stem>/` (the
/// JetStream store), `<stem>.conf`, `<stem>.log`, `<stem>.pid`.
#[derive(Debug, Clone)]
struct NodeFiles {
    store: PathBuf,
    config: PathBuf,
    log: PathBuf,
    pid: PathBuf,
}

impl NodeFiles {
    fn new(dir: &Path, stem: &str) -> Self {
        Self {
            store: dir.join(stem),
            config: dir.join(format!("{stem}.conf")),
            log: dir.join(format!("{stem}.log")),
            pid: dir.join(format!("{stem}.pid")),
        }
    }
}

/// What [`Nats::start_with`] starts.
#[derive(Debug, Clone)]
pub struct NatsSpec {
    pub layout: NatsLayout,
    pub sync: Sync,
    /// The client port of each node; free ports when `None`.
    pub ports: Option<Vec<u16>>,
    /// The file stem of each node (`<stem>/`, `<stem>.conf`, …); `nats-n1`… when `None`.
    pub stems: Option<Vec<String>>,
    /// The `server_name` of each node; `n1`… when `None`.
    pub names: Option<Vec<String>>,
    /// The nats-server binary; [`Binaries::nats_server`] of the system when `None`.
    pub binary: Option<PathBuf>,
    /// Each node's store on a [`LazyFs`] over `<stem>.disk/`, so that [`Nats::power_cut`] can
    /// throw away what the node never fsynced (the reliability harness's power-loss fault).
    #[cfg(feature = "faults")]
    pub power_loss: bool,
    /// Where each node runs: on loopback when `None`, else on a host of a `Network` each (the
    /// harness's partitions, with the `faults` feature), listening on the host's address.
    pub places: Option<Vec<Place>>,
    /// Put each server in a process group of its own, so that Ctrl-C in a terminal reaches only
    /// the parent, which stops the server after the roles that use it (`landslide up`).
    pub own_process_group: bool,
    /// `debug: true`: the RAFT snapshots, truncations and catch-ups in each node's log, for the
    /// reliability harness's runs to be read afterwards. No deployment sets it (a test checks
    /// the shipped configs).
    pub debug: bool,
}

impl NatsSpec {
    pub fn new(layout: NatsLayout) -> Self {
        Self {
            layout,
            sync: Sync::Always,
            ports: None,
            stems: None,
            names: None,
            binary: None,
            #[cfg(feature = "faults")]
            power_loss: false,
            places: None,
            own_process_group: false,
            debug: false,
        }
    }
}

#[derive(Debug)]
struct NatsNode {
    name: String,
    place: Place,
    port: u16,
    /// The monitoring port (`http:`), for `/varz`.
    monitor_port: u16,
    cluster_port: u16,
    /// The ports, held while the server is stopped (loopback only).
    held: crate::PortHold,
    files: NodeFiles,
    // Before `disk`: fields drop in order, and the server must go before its disk.
    process: Process,
    #[cfg(feature = "faults")]
    disk: Option<LazyFs>,
}

impl NatsNode {
    /// Keeps the stopped server's ports from other programs until it starts again; a host's
    /// ports are its own already.
    fn hold_ports(&mut self) {
        if !self.place.is_host() {
            self.held = crate::PortHold::hold(&[self.port, self.monitor_port, self.cluster_port]);
        }
    }
}

/// nats-server processes with JetStream and file storage. Each is killed when this is dropped.
#[derive(Debug)]
pub struct Nats {
    nodes: Vec<NatsNode>,
    security: Security,
}

/// The run's credentials: each user's password (the servers hold only its bcrypt hash, as in
/// every deployment), and the CA that signed the servers' certificate.
#[derive(Debug, Clone)]
pub struct Security {
    passwords: Vec<(User, String)>,
    hashes: Vec<(User, String)>,
    ca: PathBuf,
    /// The client port's: a server's alone.
    cert: crate::tls::CertFiles,
    /// The cluster routes': the only certificate that is also a client's.
    route: crate::tls::CertFiles,
}

impl Security {
    /// The run's security under `<dir>/nats-tls/`: made once, and found again by a later start on
    /// the same folder (`landslide up` starts again on its data folder; its roles' passwords and
    /// the CA its clients trust stay the same) as long as the hosts are the same.
    fn load_or_create(dir: &Path, hosts: &[String]) -> anyhow::Result<Self> {
        let tls_dir = dir.join("nats-tls");
        let passwords_file = tls_dir.join("passwords");
        let hosts_file = tls_dir.join("hosts");
        let files = |name: &str| crate::tls::CertFiles {
            cert: tls_dir.join(format!("{name}-cert.pem")),
            key: tls_dir.join(format!("{name}-key.pem")),
        };
        let (cert, route) = (files("nats"), files("nats-route"));
        let same_hosts = std::fs::read_to_string(&hosts_file).ok() == Some(hosts.join("\n"));
        // A folder of an earlier release has no route certificate, and a client port's that
        // was also a client's: made anew.
        if same_hosts
            && let Ok(text) = std::fs::read_to_string(&passwords_file)
            && let Some(passwords) = parse_passwords(&text)
            && cert.cert.exists()
            && route.cert.exists()
        {
            return Ok(Self {
                hashes: hash_all(&passwords)?,
                passwords,
                ca: tls_dir.join("ca.pem"),
                cert,
                route,
            });
        }
        if tls_dir.exists() {
            std::fs::remove_dir_all(&tls_dir)
                .with_context(|| format!("cannot remove {}", tls_dir.display()))?;
        }
        let ca = crate::tls::Authority::create(&tls_dir, "Landslide test and local CA")?;
        let cert = ca.issue("nats", hosts, crate::tls::Purpose::Server)?;
        let route = ca.issue("nats-route", hosts, crate::tls::Purpose::Route)?;
        let passwords: Vec<(User, String)> = User::ALL
            .into_iter()
            .map(|user| (user, crate::random_secret()))
            .collect();
        let text: String = passwords
            .iter()
            .map(|(user, password)| format!("{user} {password}\n"))
            .collect();
        crate::write_private(&passwords_file, text.as_bytes())?;
        std::fs::write(&hosts_file, hosts.join("\n"))
            .with_context(|| format!("cannot write {}", hosts_file.display()))?;
        Ok(Self {
            hashes: hash_all(&passwords)?,
            passwords,
            ca: ca.ca(),
            cert,
            route,
        })
    }

    fn password(&self, user: User) -> &str {
        find(&self.passwords, user)
    }

    fn password_hash(&self, user: User) -> &str {
        find(&self.hashes, user)
    }

    /// The CA certificate that clients verify the servers against.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The client port's certificate: a server's alone.
    pub fn server_cert(&self) -> &crate::tls::CertFiles {
        &self.cert
    }

    /// The routes' certificate.
    pub fn route_cert(&self) -> &crate::tls::CertFiles {
        &self.route
    }
}

fn find(values: &[(User, String)], user: User) -> &str {
    values
        .iter()
        .find(|(u, _)| *u == user)
        .map_or("", |(_, v)| v.as_str())
}

/// Each password's bcrypt hash, on threads of their own: one takes about 0.1 s of a core.
fn hash_all(passwords: &[(User, String)]) -> anyhow::Result<Vec<(User, String)>> {
    std::thread::scope(|scope| {
        let hashing: Vec<_> = passwords
            .iter()
            .map(|(user, password)| {
                scope.spawn(move || {
                    landslide_nats::auth::password_hash(password).map(|hash| (*user, hash))
                })
            })
            .collect();
        hashing
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("hashing a password panicked"))?
            })
            .collect()
    })
}

fn parse_passwords(text: &str) -> Option<Vec<(User, String)>> {
    User::ALL
        .into_iter()
        .map(|user| {
            text.lines().find_map(|line| {
                let (name, password) = line.split_once(' ')?;
                (name == user.name()).then(|| (user, password.to_owned()))
            })
        })
        .collect()
}

impl Nats {
    /// `layout` with fsync before every ack, on free ports, under `dir`.
    pub async fn start(layout: NatsLayout, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(&NatsSpec::new(layout), dir).await
    }

    pub async fn start_with(spec: &NatsSpec, dir: &Path) -> anyhow::Result<Self> {
        // A port that was free when chosen may be taken before the server binds it (the
        // cluster's ports must be known to every node in advance, so `-p -1` cannot help): the
        // long harness run met it once. Free ports are chosen again, twice at most.
        let bin = match &spec.binary {
            Some(bin) => bin.clone(),
            None => Binaries::system().nats_server()?,
        };
        // A binary the caller chose may be older than the minimum (the test that it is refused):
        // give it only the settings it knows.
        let batch_limits = crate::version_of(&bin)?
            >= landslide_nats::ServerVersion {
                major: 2,
                minor: 12,
                patch: 0,
            };
        let mut hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        for place in spec.places.iter().flatten() {
            let addr = place.addr().to_string();
            if !hosts.contains(&addr) {
                hosts.push(addr);
            }
        }
        let security = Security::load_or_create(dir, &hosts)?;
        let mut attempt = 1;
        loop {
            match Self::start_once(spec, dir, &bin, batch_limits, &security).await {
                Err(err)
                    if spec.ports.is_none()
                        && attempt < 3
                        && format!("{err:#}").contains("address already in use") =>
                {
                    tracing::warn!(attempt, error = %format!("{err:#}"), "a chosen port was taken; choosing again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(
        spec: &NatsSpec,
        dir: &Path,
        bin: &Path,
        batch_limits: bool,
        security: &Security,
    ) -> anyhow::Result<Self> {
        let count = spec.layout.nodes();
        let ports = match &spec.ports {
            Some(ports) if ports.len() == count => ports.clone(),
            Some(_) => bail!("{} needs {count} client ports", spec.layout),
            None => (0..count)
                .map(|_| free_port())
                .collect::<anyhow::Result<_>>()?,
        };
        let cluster_ports: Vec<u16> = (0..count)
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let pick = |given: &Option<Vec<String>>, default: &dyn Fn(usize) -> String| {
            (0..count)
                .map(|i| {
                    given
                        .as_ref()
                        .and_then(|g| g.get(i).cloned())
                        .unwrap_or_else(|| default(i))
                })
                .collect::<Vec<_>>()
        };
        let stems = pick(&spec.stems, &|i| format!("nats-n{}", i + 1));
        let names = pick(&spec.names, &|i| format!("n{}", i + 1));
        let places = match &spec.places {
            Some(places) if places.len() == count => places.clone(),
            Some(_) => bail!("{} needs {count} places", spec.layout),
            None => vec![Place::loopback(); count],
        };
        let route_addrs: Vec<(Ipv4Addr, u16)> = match spec.layout {
            NatsLayout::Single => Vec::new(),
            NatsLayout::Cluster => places
                .iter()
                .map(Place::addr)
                .zip(cluster_ports.iter().copied())
                .collect(),
        };
        let mut nodes = Vec::new();
        for i in 0..count {
            let files = NodeFiles::new(dir, &stems[i]);
            let monitor_port = free_port()?;
            let config = config_text(
                &names[i],
                Listen {
                    addr: places[i].addr(),
                    port: ports[i],
                    monitor_port,
                    cluster_port: cluster_ports[i],
                },
                &files,
                Settings {
                    sync: spec.sync,
                    batch_limits,
                    debug: spec.debug,
                },
                &route_addrs,
                security,
            );
            std::fs::write(&files.config, config)
                .with_context(|| format!("cannot write {}", files.config.display()))?;
            stop_leftover(&files).await?;
            #[cfg(feature = "faults")]
            let disk = if spec.power_loss {
                let backing = dir.join(format!("{}.disk", stems[i]));
                std::fs::create_dir_all(&backing)?;
                std::fs::create_dir_all(&files.store)?;
                Some(LazyFs::mount_async(backing, files.store.clone()).await?)
            } else {
                None
            };
            // A host's ports are its own; only loopback's can be taken.
            if !places[i].is_host() {
                crate::ensure_port_free(ports[i], "nats-server")?;
            }
            let mut process =
                Process::new(format!("nats-server {}", names[i]), bin, files.log.clone())
                    .at(&places[i])
                    .arg("-c")
                    .arg(&files.config);
            if spec.own_process_group {
                process = process.own_process_group();
            }
            process.start()?;
            nodes.push(NatsNode {
                name: names[i].clone(),
                place: places[i].clone(),
                port: ports[i],
                monitor_port,
                cluster_port: cluster_ports[i],
                held: crate::PortHold::default(),
                files,
                process,
                #[cfg(feature = "faults")]
                disk,
            });
        }
        let mut nats = Self {
            nodes,
            security: security.clone(),
        };
        let ready = async {
            for i in 0..nats.nodes.len() {
                nats.wait_ready(i).await?;
            }
            if spec.layout == NatsLayout::Cluster {
                nats.wait_for_placement().await?;
            }
            anyhow::Ok(())
        };
        if let Err(err) = ready.await {
            // Gone before a second attempt reuses their stores and disks.
            for node in &mut nats.nodes {
                let _ = node.process.kill().await;
            }
            return Err(err);
        }
        Ok(nats)
    }

    /// Every server's client URL, comma-separated: `NATS_URL` for the roles.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = (0..self.nodes.len()).map(|i| self.url(i)).collect();
        urls.join(",")
    }

    pub fn url(&self, node: usize) -> String {
        let node = &self.nodes[node];
        format!("nats://{}:{}", node.place.addr(), node.port)
    }

    /// How `user`'s role connects to every server: its password, and TLS verified against the
    /// run's CA.
    pub fn config(&self, user: User) -> NatsConfig {
        self.config_for(self.urls(), user)
    }

    /// [`Nats::config`] of every user: what a deployment of processes hands its roles.
    pub fn configs(&self) -> std::collections::HashMap<User, NatsConfig> {
        User::ALL
            .into_iter()
            .map(|user| (user, self.config(user)))
            .collect()
    }

    /// A client of every server as `user`, with that user's permissions.
    pub async fn client(&self, user: User) -> anyhow::Result<async_nats::Client> {
        landslide_nats::connect(&self.config(user), user, "landslide-servers").await
    }

    /// [`Nats::config`] for one node only.
    pub fn node_config(&self, node: usize, user: User) -> NatsConfig {
        self.config_for(self.url(node), user)
    }

    fn config_for(&self, urls: String, user: User) -> NatsConfig {
        NatsConfig::user(
            urls,
            user.name(),
            self.security.password(user),
            Some(self.security.ca.clone()),
        )
    }

    /// The run's passwords and CA.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// The node's monitoring endpoint (`/varz`, `/jsz`).
    /// A node's cluster address, as routes name it: `nats-route://host:port`.
    pub fn route_url(&self, node: usize) -> String {
        let node = &self.nodes[node];
        format!("nats-route://{}:{}", node.place.addr(), node.cluster_port)
    }

    pub fn monitor_url(&self, node: usize) -> String {
        let node = &self.nodes[node];
        format!("http://{}:{}", node.place.addr(), node.monitor_port)
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

    /// The command that stops a running node with SIGTERM (for a [`crate::Guard`]), if the
    /// process is still that node: its command line names the node's config file. A pid is
    /// given to another process once the node has exited and been reaped.
    pub fn stop_command(&self, node: usize) -> Option<std::process::Command> {
        let pid = self.pid(node)?;
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(r#"tr '\0' '\n' <"/proc/$1/cmdline" | grep -qxF -- "$2" && exec kill -TERM "$1""#)
            .arg("sh")
            .arg(pid.to_string())
            .arg(&self.nodes[node].files.config);
        Some(command)
    }

    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// Where a node keeps its JetStream files.
    pub fn store_dir(&self, node: usize) -> &Path {
        &self.nodes[node].files.store
    }

    pub fn log(&self, node: usize) -> &Path {
        &self.nodes[node].files.log
    }

    /// The configuration file a node runs with.
    pub fn config_file(&self, node: usize) -> &Path {
        &self.nodes[node].files.config
    }

    /// SIGKILL: no goodbye to clients, no flush.
    pub async fn kill(&mut self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].process.kill().await?;
        self.nodes[node].hold_ports();
        Ok(())
    }

    /// SIGTERM, which makes nats-server flush JetStream and exit; SIGKILL after `grace`.
    pub async fn terminate(&mut self, node: usize, grace: Duration) -> anyhow::Result<()> {
        // nats-server 2.9 exited with status 1 after a clean SIGTERM shutdown, so the status is
        // not judged; only a server that ignores the signal is an error.
        self.nodes[node].process.terminate(grace).await?;
        self.nodes[node].hold_ports();
        Ok(())
    }

    /// The power cut: `nodes` lose power at once. Each is killed (SIGKILL), then its disk throws
    /// away everything it had not fsynced and is mounted again; the servers stay down until
    /// [`Nats::restart`]. Needs [`NatsSpec::power_loss`]. Returns what each disk lost.
    #[cfg(feature = "faults")]
    pub async fn power_cut(&mut self, nodes: &[usize]) -> anyhow::Result<Vec<CutReport>> {
        for &node in nodes {
            self.nodes[node].process.kill().await?;
            self.nodes[node].hold_ports();
        }
        let mut reports = Vec::new();
        for &node in nodes {
            let node = &mut self.nodes[node];
            let disk = node
                .disk
                .take()
                .with_context(|| format!("{} has no power-loss disk", node.name))?;
            let (disk, report) = disk.power_cycle().await?;
            node.disk = Some(disk);
            reports.push(report);
        }
        Ok(reports)
    }

    /// Starts stopped `nodes` again together, then waits until each answers: a cluster that lost
    /// every node needs two of them running before either answers JetStream requests.
    pub async fn restart_all(&mut self, nodes: &[usize]) -> anyhow::Result<()> {
        for &node in nodes {
            self.nodes[node].held.release();
            self.nodes[node].process.start()?;
        }
        for &node in nodes {
            self.wait_ready(node).await?;
        }
        Ok(())
    }

    /// Starts a stopped node again on the same port and store; waits until it answers.
    pub async fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        self.nodes[node].held.release();
        self.nodes[node].process.start()?;
        self.wait_ready(node).await
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.nodes
            .iter_mut()
            .try_for_each(|n| n.process.check_running())
    }

    /// Waits until the node answers JetStream requests (in a cluster: a meta leader exists);
    /// fails with the end of its log if it exits first.
    async fn wait_ready(&self, node: usize) -> anyhow::Result<()> {
        let mut backoff = Backoff::constant(Duration::from_millis(50))
            .within(Duration::from_secs(60), "JetStream to answer");
        let url = self.url(node);
        let config = self.node_config(node, User::Admin);
        let log = &self.nodes[node].files.log;
        loop {
            if self.nodes[node]
                .process
                .pid()
                .is_none_or(|pid| !crate::process_alive(pid))
            {
                bail!(
                    "{} exited during start-up; {}",
                    self.nodes[node].name,
                    log_tail(log)
                );
            }
            if jetstream_answers(&config, User::Admin).await {
                return Ok(());
            }
            if backoff.wait().await.is_err() {
                bail!(
                    "{} on {url} did not answer JetStream requests within 60 s; {}",
                    self.nodes[node].name,
                    log_tail(log)
                );
            }
        }
    }

    /// Waits until an R3 stream can be placed: every node answering is not enough, the meta
    /// leader must know all three peers ("no suitable peers for placement" until then).
    async fn wait_for_placement(&self) -> anyhow::Result<()> {
        let client = self.client(User::Admin).await?;
        let config = r#"{"name":"LANDSLIDE_PROBE","subjects":["landslide.probe"],"num_replicas":3,"storage":"memory"}"#;
        let mut backoff = Backoff::constant(Duration::from_millis(200))
            .within(Duration::from_secs(60), "an R3 stream to be placed");
        loop {
            let reply = client
                .request("$JS.API.STREAM.CREATE.LANDSLIDE_PROBE", config.into())
                .await;
            let created = reply.ok().and_then(|r| {
                let answer: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
                answer.get("error").is_none().then_some(())
            });
            if created.is_some() {
                let _ = client
                    .request("$JS.API.STREAM.DELETE.LANDSLIDE_PROBE", "".into())
                    .await;
                return Ok(());
            }
            if backoff.wait().await.is_err() {
                bail!("the cluster could not place an R3 stream within 60 s");
            }
        }
    }

    /// The node that leads `stream`'s RAFT group, by its stream info.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        self.stream_leader_seen_by(stream, 0..self.nodes.len())
            .await
    }

    /// The leader of `stream` as the first of `nodes` that answers sees it: in a partition,
    /// each side may name its own.
    pub async fn stream_leader_seen_by(
        &self,
        stream: &str,
        nodes: impl IntoIterator<Item = usize>,
    ) -> Option<usize> {
        let subject = format!("$JS.API.STREAM.INFO.{stream}");
        for node in nodes {
            if let Some(info) = landslide_nats::api_request(
                &self.node_config(node, User::Admin),
                User::Admin,
                &subject,
            )
            .await
                && let Some(leader) = info["cluster"]["leader"].as_str()
            {
                return self.nodes.iter().position(|n| n.name == leader);
            }
        }
        None
    }
}

/// Whether the server(s) of `config` answer a JetStream account-info request from `user`: up,
/// and in a cluster a meta leader exists.
pub async fn jetstream_answers(config: &NatsConfig, user: User) -> bool {
    landslide_nats::api_request(config, user, "$JS.API.INFO")
        .await
        .is_some_and(|info| info["type"] == "io.nats.jetstream.api.v1.account_info_response")
}

/// What differs between the nodes Landslide starts.
#[derive(Debug, Clone, Copy)]
struct Settings {
    sync: Sync,
    /// `limits.batch` (nats-server 2.12 and later): room for every node's open batches.
    batch_limits: bool,
    /// Debug logging ([`NatsSpec::debug`]).
    debug: bool,
}

/// Where one node listens.
#[derive(Debug, Clone, Copy)]
struct Listen {
    addr: Ipv4Addr,
    port: u16,
    monitor_port: u16,
    cluster_port: u16,
}

/// One node's configuration: the settings of `nats/nats-server.conf` and `nats/cluster.conf`
/// (fsync before ack, the store and batch limits, the payload limit, the users of
/// `nats/auth.conf`, TLS), on its address's ports, with a route to every node of `routes` (none
/// for a single node).
fn config_text(
    name: &str,
    listen: Listen,
    files: &NodeFiles,
    settings: Settings,
    routes: &[(Ipv4Addr, u16)],
    security: &Security,
) -> String {
    let Listen {
        addr,
        port,
        monitor_port,
        cluster_port,
    } = listen;
    let sync = match settings.sync {
        Sync::Always => "  sync_interval: always\n",
        Sync::Lazy => "",
    };
    let limits = if settings.batch_limits {
        "  limits { batch { max_inflight_per_stream: 256 } }\n"
    } else {
        ""
    };
    let mut text = format!(
        "# Written by landslide-servers for one run; the settings of nats/nats-server.conf.\n\
         server_name: {name}\n\
         listen: {addr}:{port}\n\
         http: {addr}:{monitor_port}\n\
         pid_file: {pid:?}\n\
         jetstream {{\n  store_dir: {store:?}\n{sync}{limits}  max_file_store: 20GB\n  max_memory_store: 256MB\n}}\n\
         max_payload: 1MB\n\
         write_deadline: \"10s\"\n\
         tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 5\n}}\n",
        pid = files.pid,
        store = files.store,
        cert = security.cert.cert,
        key = security.cert.key,
    );
    if settings.debug {
        text.push_str("debug: true\n");
    }
    text.push_str(&landslide_nats::auth::authorization(
        &Topology::default(),
        |user| security.password_hash(user).to_owned(),
    ));
    if !routes.is_empty() {
        let routes: Vec<String> = routes
            .iter()
            .map(|(a, p)| format!("    nats-route://{a}:{p}"))
            .collect();
        text.push_str(&format!(
            "cluster {{\n  name: landslide\n  listen: {addr}:{cluster_port}\n  routes: [\n{}\n  ]\n  \
             tls {{\n    cert_file: {cert:?}\n    key_file: {key:?}\n    ca_file: {ca:?}\n    verify: true\n    timeout: 5\n  }}\n}}\n",
            routes.join("\n"),
            cert = security.route.cert,
            key = security.route.key,
            ca = security.ca,
        ));
    }
    text
}

/// Stops a nats-server that a crashed run left on this node's files (a `landslide up` killed
/// with SIGKILL, say): it would hold the port and the store. Only a nats-server whose command
/// line names this node's config or store is ours; the pid may have been reused since.
async fn stop_leftover(files: &NodeFiles) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(&files.pid) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Ok(());
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let ours = cmdline.contains("nats-server")
        && cmdline
            .split('\0')
            .any(|arg| Path::new(arg) == files.config || Path::new(arg) == files.store);
    if !ours || !crate::process_alive(pid) {
        return Ok(());
    }
    tracing::warn!(
        pid,
        "stopping the nats-server that an earlier run left on this folder"
    );
    crate::stop_pid(pid, Duration::from_secs(10)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(sync: Sync) -> Settings {
        Settings {
            sync,
            batch_limits: true,
            debug: false,
        }
    }

    fn security() -> Security {
        let passwords = User::ALL.map(|u| (u, format!("pw-{u}"))).to_vec();
        Security {
            hashes: hash_all(&passwords).unwrap(),
            passwords,
            ca: PathBuf::from("/tmp/x/ca.pem"),
            cert: crate::tls::CertFiles {
                cert: PathBuf::from("/tmp/x/nats-cert.pem"),
                key: PathBuf::from("/tmp/x/nats-key.pem"),
            },
            route: crate::tls::CertFiles {
                cert: PathBuf::from("/tmp/x/nats-route-cert.pem"),
                key: PathBuf::from("/tmp/x/nats-route-key.pem"),
            },
        }
    }

    #[test]
    fn every_node_fsyncs_before_it_acks_unless_told_otherwise() {
        let files = NodeFiles::new(Path::new("/tmp/x"), "nats-n1");
        let listen = Listen {
            addr: Ipv4Addr::LOCALHOST,
            port: 4222,
            monitor_port: 8222,
            cluster_port: 6222,
        };
        let always = config_text(
            "n1",
            listen,
            &files,
            settings(Sync::Always),
            &[],
            &security(),
        );
        assert!(always.contains("sync_interval: always"), "{always}");
        assert!(!always.contains("debug"), "{always}");
        assert!(!always.contains("cluster"), "{always}");
        // The server holds each password's hash, never the password.
        assert!(!always.contains("pw-"), "{always}");
        let hash = always
            .lines()
            .find_map(|line| line.trim().strip_prefix("password: "))
            .expect("a password line");
        assert!(hash.starts_with("$2a$11$"), "{hash}");
        assert!(bcrypt::verify("pw-ingest", hash).unwrap(), "{hash}");
        assert!(
            always.contains("cert_file: \"/tmp/x/nats-cert.pem\""),
            "{always}"
        );
        let host = Ipv4Addr::new(10, 200, 7, 3);
        let routes = [6222, 6223, 6224].map(|p| (host, p));
        let lazy = config_text(
            "n1",
            Listen {
                addr: host,
                ..listen
            },
            &files,
            settings(Sync::Lazy),
            &routes,
            &security(),
        );
        assert!(lazy.contains("verify: true"), "{lazy}");
        // The routes present the route certificate; the client port a server's.
        let (client, cluster) = lazy.split_once("cluster {").unwrap();
        assert!(client.contains("/tmp/x/nats-cert.pem"), "{lazy}");
        assert!(
            cluster.contains("cert_file: \"/tmp/x/nats-route-cert.pem\""),
            "{lazy}"
        );
        assert!(!cluster.contains("nats-cert.pem"), "{lazy}");
        assert!(!lazy.contains("sync_interval"), "{lazy}");
        assert!(lazy.contains("nats-route://10.200.7.3:6224"), "{lazy}");
        assert!(lazy.contains("listen: 10.200.7.3:4222"), "{lazy}");
    }

    #[test]
    fn a_node_logs_at_debug_level_only_when_asked() {
        let files = NodeFiles::new(Path::new("/tmp/x"), "nats-n1");
        let listen = Listen {
            addr: Ipv4Addr::LOCALHOST,
            port: 4222,
            monitor_port: 8222,
            cluster_port: 6222,
        };
        let debug = Settings {
            debug: true,
            ..settings(Sync::Always)
        };
        let text = config_text("n1", listen, &files, debug, &[], &security());
        assert!(text.lines().any(|l| l == "debug: true"), "{text}");
    }

    /// The shipped configs promise the same: no deployment acks from the page cache, and none
    /// lets anyone in without a user of `auth.conf` and TLS.
    #[test]
    fn every_shipped_config_fsyncs_before_it_acks_and_closes_its_doors() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            // auth.conf is the users a server config includes, not a server config.
            if path.extension().is_some_and(|e| e == "conf")
                && path.file_name().is_some_and(|n| n != "auth.conf")
            {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(
                    text.lines().any(|l| l.trim() == "sync_interval: always"),
                    "{} does not fsync before it acks",
                    path.display()
                );
                assert!(
                    !text.lines().any(|l| l.trim().starts_with("debug")),
                    "{} logs at debug level: the harness's servers do, no deployment",
                    path.display()
                );
                for line in ["include auth.conf", "tls {"] {
                    assert!(
                        text.lines().any(|l| l == line),
                        "{} lacks `{line}`: anyone who reaches it could publish a vote",
                        path.display()
                    );
                }
                seen += 1;
            }
        }
        assert!(seen >= 2, "found only {seen} configs in {}", dir.display());
    }
}
