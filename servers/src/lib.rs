//! Every server process that Landslide runs itself: nats-server, one node or a three-node
//! cluster ([`nats`]), and PostgreSQL ([`postgres`]). `landslide up`, the integration tests, the
//! reliability harness and the benchmark all start their servers here, so that they run the same
//! binaries with the same durability settings, wait for readiness the same way, and stop them the
//! same way.
//!
//! It never weakens durability behind a caller's back: nats-server fsyncs before it acks unless
//! the caller asks for the lazy default by name ([`nats::Sync::Lazy`], for control runs), and
//! PostgreSQL keeps `fsync` and `synchronous_commit` on.
//!
//! The fault injection of the tests, the reliability harness and the benchmark, the power-loss
//! disk (`lazyfs`) and network namespaces (`netns`), is behind the `faults` feature, off by
//! default: the release binary never links it.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use landslide_nats::ServerVersion;
use landslide_patience::Backoff;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod guard;
#[cfg(feature = "faults")]
pub mod lazyfs;
pub mod nats;
#[cfg(feature = "faults")]
pub mod netns;
pub mod postgres;
pub mod process;
pub mod tls;

pub use guard::Guard;
pub use nats::{Nats, NatsLayout, NatsSpec, Sync};
#[cfg(feature = "faults")]
pub use netns::Network;
pub use postgres::{PgStop, Postgres};
pub use process::Process;

/// Where a server or a role runs: on this machine's loopback (what `up`, the tests and the
/// benchmark use), or on a host of a `Network`, in its namespace and on its address (the
/// harness's partition faults; with the `faults` feature only, so without it every place is
/// loopback). A program placed on a host listens on the host's address, and its peers reach it
/// there.
#[derive(Debug, Clone)]
pub struct Place {
    addr: Ipv4Addr,
    #[cfg(feature = "faults")]
    host: Option<HostPlace>,
}

#[cfg(feature = "faults")]
#[derive(Debug, Clone)]
struct HostPlace {
    /// iproute2's `ip`, which runs programs inside the namespace.
    ip: PathBuf,
    namespace: String,
    /// The network's /24: every peer a server on the host may hear from.
    subnet: Ipv4Addr,
}

impl Default for Place {
    fn default() -> Self {
        Self::loopback()
    }
}

impl Place {
    /// 127.0.0.1 of this machine.
    pub fn loopback() -> Self {
        Self {
            addr: Ipv4Addr::LOCALHOST,
            #[cfg(feature = "faults")]
            host: None,
        }
    }

    #[cfg(feature = "faults")]
    pub(crate) fn on_host(
        addr: Ipv4Addr,
        ip: PathBuf,
        namespace: String,
        subnet: Ipv4Addr,
    ) -> Self {
        Self {
            addr,
            host: Some(HostPlace {
                ip,
                namespace,
                subnet,
            }),
        }
    }

    /// What the place's programs listen on and their peers connect to.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The network its peers are in, as `a.b.c.0/24`, when on a host; `None` on loopback.
    pub fn peers(&self) -> Option<String> {
        #[cfg(feature = "faults")]
        if let Some(host) = &self.host {
            return Some(format!("{}/24", host.subnet));
        }
        None
    }

    /// The program and leading arguments that run `program` here: `program` itself on
    /// loopback, `ip netns exec <namespace> program` on a host. `ip` execs the program, so the
    /// process id is the program's and signals reach it.
    pub fn launcher(&self, program: &Path) -> (PathBuf, Vec<std::ffi::OsString>) {
        #[cfg(feature = "faults")]
        if let Some(host) = &self.host {
            return (
                host.ip.clone(),
                vec![
                    "netns".into(),
                    "exec".into(),
                    host.namespace.clone().into(),
                    program.as_os_str().to_owned(),
                ],
            );
        }
        (program.to_path_buf(), Vec::new())
    }

    /// Whether this is a host of a network, where a program started as root must drop to
    /// another user itself (`setpriv`): `ip netns exec` needs root, so the user cannot be set
    /// on the command.
    pub fn is_host(&self) -> bool {
        #[cfg(feature = "faults")]
        if self.host.is_some() {
            return true;
        }
        false
    }
}

/// A port that was free a moment ago, below the kernel's ephemeral range where there is room.
///
/// Servers are stopped and started again on the same ports (restarts, power cuts). A port from
/// the ephemeral range (what binding port 0 gives) is also what the kernel hands every outgoing
/// connection as its local port: while a server was down, a client connection of another test
/// took its monitoring port once, and the restart failed ("address already in use", one run of
/// ten). Below the range only another such pick can take it, one chance in thousands.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher as _, Hasher as _};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 20_000;
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        for _ in 0..64 {
            // A random pick: std's per-process random hasher keys, no generator needed.
            let mut hasher = std::hash::RandomState::new().build_hasher();
            hasher.write_u64(u64::from(std::process::id()));
            let offset = u16::try_from(hasher.finish() % span).unwrap_or(0);
            let port = LOWEST + offset;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The loopback ports of a stopped server, kept from every other program until it starts again.
///
/// A server stopped for a restart (a kill, a power cut) leaves its ports free, and with many
/// tests at once another one's server took one of them (a cluster node found its route port
/// answered by a stranger: one run of ten). Each port is held by a socket bound without
/// `SO_REUSEADDR` and not listening: every other bind fails (nats-server, PostgreSQL and
/// [`free_port`] all set `SO_REUSEADDR`, which Linux lets share a port only when every socket on
/// it does), while a connection to it is still refused at once, as with nothing there.
#[derive(Debug, Default)]
pub(crate) struct PortHold(Vec<socket2::Socket>);

impl PortHold {
    /// Holds `ports` on loopback, those it can: one taken already is left as it is.
    pub(crate) fn hold(ports: &[u16]) -> Self {
        let held = ports
            .iter()
            .filter_map(|&port| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .ok()?;
                let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                socket.bind(&addr.into()).ok()?;
                Some(socket)
            })
            .collect();
        Self(held)
    }

    /// Lets the ports go, for the server to bind them.
    pub(crate) fn release(&mut self) {
        self.0.clear();
    }
}

/// Fails clearly when `port` on loopback is taken. The check races with other programs, but it
/// turns the common case (a server already there) into a message that names the port.
pub fn ensure_port_free(port: u16, what: &str) -> anyhow::Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AddrInUse => bail!(
            "port {port} on 127.0.0.1 is already in use, so our {what} cannot listen there: stop \
             whatever listens on it or choose another port"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot check port {port} for {what}")),
    }
}

/// Where server binaries are looked for; tests point it at empty folders.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// nats-server binaries to prefer over `path`, in order: `NATS_SERVER_BIN`, then the pinned
    /// release where `scripts/prerequisites.sh` installs it (as root, then as a user).
    pub nats_server: Vec<PathBuf>,
    /// Folders searched for `nats-server`, `pg_config`, `initdb` and `pg_ctl`, in order.
    pub path: Vec<PathBuf>,
    /// Debian's versioned PostgreSQL installs: `<pg_root>/<major>/bin`, off `PATH`.
    pub pg_root: PathBuf,
}

impl Binaries {
    /// `PATH`, then the folders Debian and manual installs use even when they are not on `PATH`.
    pub fn system() -> Self {
        let pinned = ServerVersion::pinned();
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        let nats_server = [
            std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from),
            Some(PathBuf::from(format!(
                "/usr/local/lib/landslide/nats-server-{pinned}/nats-server"
            ))),
            cache.map(|c| c.join(format!("landslide/nats-server-{pinned}/nats-server"))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut path: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        path.extend(["/usr/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from));
        Self {
            nats_server,
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

    /// The nats-server to run: the first of [`Binaries::nats_server`] that exists, else
    /// `nats-server` on the path. Refused, naming what to install, when missing or older than
    /// the oldest supported release (Debian 12's 2.9.10 cannot fsync before it acks).
    pub fn nats_server(&self) -> anyhow::Result<PathBuf> {
        let bin = self
            .nats_server
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .or_else(|| self.find("nats-server"))
            .ok_or_else(|| anyhow::anyhow!(nats_server_missing()))?;
        let printed = version_text(&bin)?;
        landslide_nats::check_version(&bin.display().to_string(), &printed)?;
        Ok(bin)
    }
}

/// What `nats-server --version` prints.
fn version_text(bin: &std::path::Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", bin.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The version of a nats-server binary.
pub fn version_of(bin: &std::path::Path) -> anyhow::Result<ServerVersion> {
    let printed = version_text(bin)?;
    ServerVersion::parse(&printed)
        .with_context(|| format!("{} --version printed {printed:?}", bin.display()))
}

/// The message when no nats-server is installed.
pub fn nats_server_missing() -> String {
    format!(
        "nats-server not found: install nats-server {} (scripts/up and scripts/test install the \
         official build) or point NATS_SERVER_BIN at one",
        ServerVersion::pinned()
    )
}

/// The database login role of the role that connects to NATS as `user`, if it has one: in
/// every test, chaos run and local stack alike.
pub fn login_role(user: landslide_nats::User) -> Option<landslide_schema::postgres::LoginRole> {
    use landslide_nats::User;
    use landslide_schema::postgres::LoginRole;
    match user {
        User::Worker => Some(LoginRole::Worker),
        User::Tally => Some(LoginRole::Tally),
        User::Audit => Some(LoginRole::Audit),
        User::Ingest | User::Polls | User::Admin => None,
    }
}

/// Whether we run as root (PostgreSQL then runs as the `postgres` user).
pub fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether process `pid` exists and has not exited (a zombie has exited).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: Signal) -> anyhow::Result<()> {
    let target = Pid::from_raw(i32::try_from(pid)?);
    match kill(target, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot send {signal} to {pid}")),
    }
}

/// Waits until `pid` has exited, up to `timeout`; returns whether it did.
pub async fn wait_gone(pid: u32, timeout: Duration) -> bool {
    Backoff::constant(Duration::from_millis(50))
        .within(timeout, format!("process {pid} to exit"))
        .until(|| std::future::ready((!process_alive(pid)).then_some(())))
        .await
        .is_ok()
}

/// SIGTERM to a process that is not our child, SIGKILL if it is still there after `grace`.
pub async fn stop_pid(pid: u32, grace: Duration) -> anyhow::Result<()> {
    signal(pid, Signal::SIGTERM)?;
    if !wait_gone(pid, grace).await {
        signal(pid, Signal::SIGKILL)?;
        if !wait_gone(pid, Duration::from_secs(5)).await {
            bail!("cannot stop process {pid}");
        }
    }
    Ok(())
}

/// A fresh random secret for a run's own passwords: 32 hex digits (122 random bits).
pub fn random_secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Writes a file only its owner may read (mode 0600), replacing any file there.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_is_refused_to_every_bind_and_to_connections_until_released() {
        let port = free_port().unwrap();
        let mut held = PortHold::hold(&[port]);
        // What nats-server, PostgreSQL and `free_port` do: bind with SO_REUSEADDR (std sets it).
        let err = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
        // Nothing listens: a client is refused at once, as with no server there.
        let err = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
        held.release();
        assert!(TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
    }
}
