//! Several hosts on one machine, for the reliability harness's network-partition faults: each
//! host is a Linux network namespace with an address of its own, and [`Network::cut`] drops the
//! packets between two of them.
//!
//! # Layout
//!
//! One network is one private `10.200.X.0/24`, chosen free (see [`Network::create`]):
//!
//! ```text
//!   root namespace (the harness)            switch namespace `lsnetX`        host namespace `lsnetX-<host>`
//!   veth lsnetX  10.200.X.254  <------->  harness  10.200.X.1
//!                                            hN    10.200.X.1  <------->  eth0  10.200.X.(N+2), lo 127.0.0.1
//! ```
//!
//! The switch namespace routes between its links (IPv4 forwarding is on there and nowhere
//! else); each host and the harness have a point-to-point address to it and a route for the /24
//! through it. Hosts have no default route, so nothing they send leaves the network. The root
//! namespace gains only the veth `lsnetX`, its address `10.200.X.254` and a route for the /24;
//! all three go when the [`Network`] is dropped.
//!
//! # How a cut drops packets
//!
//! A cut is a pair of policy-routing rules in the switch namespace, `ip rule add from A to B
//! blackhole` and back (a one-way cut, [`Network::cut_one_way`], is one of them). The kernel
//! discards a forwarded packet that meets a blackhole rule without any ICMP error, so both ends
//! see silence: a new connection times out instead of being refused, and an established one
//! stalls, its segments retransmitted, until the cut heals (then it carries on unless a peer
//! gave up meanwhile). The switch has no connection tracking, so the rules apply to every packet,
//! old connections and new.
//!
//! Simpler-looking mechanisms fail fast instead, which no real partition does: a blackhole route
//! inside a host makes the sender's own `connect` fail with `EINVAL`; `unreachable` and
//! `prohibit` answer with ICMP errors; a link set down removes the host's routes (`ENETUNREACH`)
//! and cuts a host from everyone rather than from one peer. nftables and iptables would drop
//! packets as well, but they are not installed everywhere we run; iproute2 alone does this.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};

use crate::process::Process;
use crate::{Binaries, Place};

/// The first two octets of every network's /24.
const BASE: [u8; 2] = [10, 200];
/// The host part of the switch's address, the gateway of every host and of the harness.
const SWITCH_HOST: u8 = 1;
/// The host part of the harness's address in the root namespace.
const HARNESS_HOST: u8 = 254;
/// Host addresses start here: `10.200.X.2`, `10.200.X.3`, …
const FIRST_HOST: u8 = 2;
const MAX_HOSTS: usize = 250;
/// The priority of the cut rules: before the `main` table (32766), after `local` (0).
const CUT_PRIORITY: &str = "100";

/// A private network of hosts, each a network namespace with its own IPv4 address, all
/// connected so that every host reaches every other, and the harness (the root namespace)
/// reaches every host. Dropped: every namespace and link is removed.
#[derive(Debug)]
pub struct Network {
    ip: PathBuf,
    /// The third octet of the network's /24.
    subnet: u8,
    /// `lsnetX`: the switch namespace, the root namespace's veth, and the prefix of every host
    /// namespace.
    prefix: String,
    /// Whether the root namespace's veth exists (and so must be deleted).
    harness_link: bool,
    hosts: Vec<Host>,
    /// The directions cut: (from, to) host indices whose packets are dropped.
    cuts: BTreeSet<(usize, usize)>,
}

#[derive(Debug)]
struct Host {
    name: String,
    namespace: String,
    addr: Ipv4Addr,
}

impl Network {
    /// Creates `hosts` (names like `n1`, `web1`, `pg`: ASCII letters, digits, `-` and `_`), each
    /// a namespace `lsnetX-<name>` with the address `10.200.X.2`, `10.200.X.3`, … in the order
    /// given, its loopback up.
    ///
    /// `X` is the first free subnet from one derived from our pid: free means that no route of
    /// the root namespace overlaps `10.200.X.0/24` and no namespace `lsnetX` exists. Creating
    /// the namespace `lsnetX` is the claim (it fails if another run made it first), so parallel
    /// tests never share a network. Needs root and iproute2's `ip`.
    pub async fn create(hosts: &[&str]) -> anyhow::Result<Self> {
        check_names(hosts)?;
        anyhow::ensure!(
            crate::running_as_root(),
            "network namespaces need root (CAP_NET_ADMIN): run as root"
        );
        let ip = Binaries::system()
            .find("ip")
            .context("iproute2's `ip` not found: install iproute2")?;
        let routes = ip_output(&ip, &["-4", "-o", "route", "show", "table", "all"]).await?;
        let routes = parse_routes(&routes);
        let start = std::process::id() % 256;
        let mut claimed = None;
        for k in 0..256 {
            // `% 256` keeps it below 256, so the conversion cannot fail.
            let subnet = u8::try_from((start + k) % 256).unwrap_or(0);
            let net = Ipv4Addr::new(BASE[0], BASE[1], subnet, 0);
            if routes.iter().any(|&(r, len)| overlaps((net, 24), (r, len))) {
                continue;
            }
            let prefix = format!("lsnet{subnet}");
            let output = command(&ip, &["netns", "add", &prefix]).output().await?;
            if output.status.success() {
                claimed = Some((subnet, prefix));
                break;
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !stderr.contains("File exists") {
                bail!(
                    "`ip netns add {prefix}` failed ({}): {}",
                    output.status,
                    stderr.trim()
                );
            }
        }
        let Some((subnet, prefix)) = claimed else {
            bail!(
                "no free subnet in {}.{}.0.0/16: every /24 overlaps a route of this machine or \
                 belongs to another run (`ip netns list` shows them as lsnet<N>)",
                BASE[0],
                BASE[1]
            );
        };
        // From here on, dropping `network` removes whatever was made, should a step fail.
        let mut network = Self {
            ip,
            subnet,
            prefix,
            harness_link: false,
            hosts: Vec::new(),
            cuts: BTreeSet::new(),
        };
        network.build(hosts).await?;
        tracing::info!(
            network.subnet = %network.addr_of(0),
            network.hosts = hosts.len(),
            "created the network namespaces"
        );
        Ok(network)
    }

    async fn build(&mut self, hosts: &[&str]) -> anyhow::Result<()> {
        let switch = self.prefix.clone();
        let gateway = self.addr_of(SWITCH_HOST);
        let subnet = format!("{}/24", gateway.with_last(0));
        self.ip(&["-n", &switch, "link", "set", "lo", "up"]).await?;
        let sysctl = [
            "netns",
            "exec",
            &switch,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ];
        self.ip(&sysctl).await?;
        for (i, name) in hosts.iter().enumerate() {
            // `check_names` allows at most MAX_HOSTS, so this fits the last octet.
            let addr = self.addr_of(FIRST_HOST.saturating_add(u8::try_from(i)?));
            let namespace = format!("{switch}-{name}");
            let switch_side = format!("h{i}");
            self.ip(&["netns", "add", &namespace]).await?;
            self.hosts.push(Host {
                name: (*name).to_owned(),
                namespace: namespace.clone(),
                addr,
            });
            let ns = namespace.as_str();
            self.ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
            let veth = [
                "link",
                "add",
                &switch_side,
                "netns",
                &switch,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ];
            self.ip(&veth).await?;
            self.point_to_point(&switch, &switch_side, gateway, addr)
                .await?;
            self.point_to_point(ns, "eth0", addr, gateway).await?;
            let (via, src) = (gateway.to_string(), addr.to_string());
            let route = ["-n", ns, "route", "add", &subnet, "via", &via, "src", &src];
            self.ip(&route).await?;
        }
        let harness = self.harness_addr();
        let root_side = self.prefix.clone();
        let veth = [
            "link", "add", &root_side, "type", "veth", "peer", "name", "harness", "netns", &switch,
        ];
        self.ip(&veth).await?;
        self.harness_link = true;
        self.point_to_point(&switch, "harness", gateway, harness)
            .await?;
        let address = format!("{harness}/32");
        let peer = format!("{gateway}/32");
        self.ip(&["addr", "add", &address, "peer", &peer, "dev", &root_side])
            .await?;
        self.ip(&["link", "set", &root_side, "up"]).await?;
        let gateway = gateway.to_string();
        let harness = harness.to_string();
        self.ip(&["route", "add", &subnet, "via", &gateway, "src", &harness])
            .await
    }

    /// Gives `dev` in `namespace` the address `local` with `peer` at the other end, and sets it up.
    async fn point_to_point(
        &self,
        namespace: &str,
        dev: &str,
        local: Ipv4Addr,
        peer: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let local = format!("{local}/32");
        let peer = format!("{peer}/32");
        let ns = ["-n", namespace];
        self.ip(&[&ns[..], &["addr", "add", &local, "peer", &peer, "dev", dev]].concat())
            .await?;
        self.ip(&[&ns[..], &["link", "set", dev, "up"]].concat())
            .await
    }

    /// The host's address. Programs in the host can bind it (and 127.0.0.1, which is the
    /// host's own loopback); every other host and the harness reach it there.
    ///
    /// # Panics
    ///
    /// When the network has no host `host`: the names are the caller's own constants.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        self.host(host).addr
    }

    /// The harness's address, `10.200.X.254` in the root namespace: what hosts see as the
    /// source of the harness's connections, and where they reach a server the harness runs
    /// (bound to it or to `0.0.0.0`). Cuts never apply to the harness: it observes the system
    /// under test from outside every partition.
    pub fn harness_addr(&self) -> Ipv4Addr {
        self.addr_of(HARNESS_HOST)
    }

    /// The host's network namespace, for `ip netns exec <namespace> …` or
    /// `/run/netns/<namespace>`.
    ///
    /// # Panics
    ///
    /// When the network has no host `host`.
    pub fn namespace(&self, host: &str) -> &str {
        &self.host(host).namespace
    }

    /// The hosts' names, in the order given to [`Network::create`].
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|h| h.name.as_str())
    }

    /// Where programs run on `host`: its namespace and address, for [`Process::at`] and the
    /// servers' specs.
    ///
    /// # Panics
    ///
    /// When the network has no host `host`.
    pub fn place(&self, host: &str) -> Place {
        let host = self.host(host);
        Place::on_host(
            host.addr,
            self.ip.clone(),
            host.namespace.clone(),
            self.addr_of(0),
        )
    }

    /// A [`Process`] that runs `program` inside `host`, with the arguments the caller adds.
    /// The program keeps our environment and filesystem; only its network is the host's.
    ///
    /// # Panics
    ///
    /// When the network has no host `host`.
    pub fn process(
        &self,
        host: &str,
        name: impl Into<String>,
        program: impl AsRef<OsStr>,
        log: PathBuf,
    ) -> Process {
        Process::new(name, program.as_ref(), log).at(&self.place(host))
    }

    /// Cuts all traffic between `a` and `b`, both ways: their packets are dropped, not
    /// rejected, so new connections time out and established ones stall. Cutting a pair that
    /// is already cut changes nothing.
    pub async fn cut(&mut self, a: &str, b: &str) -> anyhow::Result<()> {
        self.drop_packets(a, b).await?;
        self.drop_packets(b, a).await?;
        tracing::info!(network.cut.a = a, network.cut.b = b, "cut two hosts apart");
        Ok(())
    }

    /// Drops the packets from `from` to `to` and lets those the other way through: an
    /// asymmetric partition. A TCP connection from `to` then delivers what it sends (its
    /// retransmissions carry it, since no acknowledgement comes back) and hears nothing: a
    /// request arrives and is acted on, and its answer is lost.
    pub async fn cut_one_way(&mut self, from: &str, to: &str) -> anyhow::Result<()> {
        self.drop_packets(from, to).await?;
        tracing::info!(
            network.cut.from = from,
            network.cut.to = to,
            "cut one direction between two hosts"
        );
        Ok(())
    }

    async fn drop_packets(&mut self, from: &str, to: &str) -> anyhow::Result<()> {
        let pair = (self.index(from)?, self.index(to)?);
        anyhow::ensure!(pair.0 != pair.1, "cannot cut {from} from itself");
        if self.cuts.insert(pair)
            && let Err(e) = self.rule("add", pair).await
        {
            self.cuts.remove(&pair);
            return Err(e);
        }
        Ok(())
    }

    /// Cuts `host` from every other host (not from the harness).
    pub async fn isolate(&mut self, host: &str) -> anyhow::Result<()> {
        let others: Vec<String> = self
            .hosts()
            .filter(|&h| h != host)
            .map(str::to_owned)
            .collect();
        self.index(host)?;
        for other in others {
            self.cut(host, &other).await?;
        }
        Ok(())
    }

    /// Restores every cut. Packets flow again at once; stalled connections resume with their
    /// next retransmission.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        while let Some(&pair) = self.cuts.first() {
            self.rule("del", pair).await?;
            self.cuts.remove(&pair);
        }
        tracing::info!("healed every cut");
        Ok(())
    }

    /// Adds or deletes the blackhole rule for the packets from one host to another.
    async fn rule(&self, action: &str, (from, to): (usize, usize)) -> anyhow::Result<()> {
        let (from, to) = (
            self.hosts[from].addr.to_string(),
            self.hosts[to].addr.to_string(),
        );
        let rule = [
            "-n",
            &self.prefix,
            "rule",
            action,
            "from",
            &from,
            "to",
            &to,
            "blackhole",
            "priority",
            CUT_PRIORITY,
        ];
        self.ip(&rule).await
    }

    fn host(&self, host: &str) -> &Host {
        match self.hosts.iter().find(|h| h.name == host) {
            Some(h) => h,
            None => panic!("the network has no host named {host:?}"),
        }
    }

    fn index(&self, host: &str) -> anyhow::Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .with_context(|| format!("the network has no host named {host:?}"))
    }

    fn addr_of(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(BASE[0], BASE[1], self.subnet, last)
    }

    async fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        ip_output(&self.ip, args).await.map(drop)
    }
}

impl Drop for Network {
    /// Deletes the root namespace's veth (and with it the route), then every host namespace,
    /// then the switch, whose name is the claim on the subnet. Blocks for a few milliseconds:
    /// a drop cannot await. A namespace in which a process still runs lives on, without its
    /// name, until the process exits; its link to the switch goes with the switch.
    fn drop(&mut self) {
        let mut steps: Vec<Vec<&str>> = Vec::new();
        if self.harness_link {
            steps.push(vec!["link", "del", &self.prefix]);
        }
        for host in &self.hosts {
            steps.push(vec!["netns", "del", &host.namespace]);
        }
        steps.push(vec!["netns", "del", &self.prefix]);
        for args in steps {
            let output = std::process::Command::new(&self.ip)
                .args(&args)
                .stdin(Stdio::null())
                .output();
            match output {
                Ok(o) if o.status.success() => {}
                Ok(o) => tracing::warn!(
                    command = %format!("ip {}", args.join(" ")),
                    stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                    "cannot remove part of a network"
                ),
                Err(e) => tracing::warn!(
                    command = %format!("ip {}", args.join(" ")),
                    error = %e,
                    "cannot remove part of a network"
                ),
            }
        }
    }
}

/// Host names become namespace names: short, unique, and safe in a file name.
fn check_names(hosts: &[&str]) -> anyhow::Result<()> {
    anyhow::ensure!(!hosts.is_empty(), "a network needs at least one host");
    anyhow::ensure!(
        hosts.len() <= MAX_HOSTS,
        "a network has at most {MAX_HOSTS} hosts, not {}",
        hosts.len()
    );
    for (i, name) in hosts.iter().enumerate() {
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "host name {name:?} must be 1 to 32 ASCII letters, digits, '-' or '_'"
        );
        anyhow::ensure!(
            !hosts[..i].contains(name),
            "host name {name:?} is given twice"
        );
    }
    Ok(())
}

fn command(ip: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(ip);
    command.args(args).stdin(Stdio::null());
    command
}

/// Runs `ip <args>`; its stdout, or an error with the command and what it printed.
async fn ip_output(ip: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = command(ip, args)
        .output()
        .await
        .with_context(|| format!("cannot run {} {}", ip.display(), args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The destinations of `ip -4 -o route show table all`, as (network, prefix length); default
/// routes and lines it cannot read are left out.
fn parse_routes(text: &str) -> Vec<(Ipv4Addr, u8)> {
    const TYPES: [&str; 10] = [
        "unicast",
        "local",
        "broadcast",
        "multicast",
        "anycast",
        "blackhole",
        "unreachable",
        "prohibit",
        "throw",
        "nat",
    ];
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().peekable();
            if words.peek().is_some_and(|w| TYPES.contains(w)) {
                words.next();
            }
            let dest = words.next()?;
            let (addr, len) = dest.split_once('/').unwrap_or((dest, "32"));
            let len: u8 = len.parse().ok().filter(|&l| l <= 32)?;
            Some((addr.parse().ok()?, len)).filter(|&(_, len)| len > 0)
        })
        .collect()
}

/// Whether two IPv4 prefixes share an address.
fn overlaps((a, a_len): (Ipv4Addr, u8), (b, b_len): (Ipv4Addr, u8)) -> bool {
    let len = u32::from(a_len.min(b_len));
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

trait WithLast {
    fn with_last(self, last: u8) -> Self;
}

impl WithLast for Ipv4Addr {
    /// The same address with another last octet.
    fn with_last(self, last: u8) -> Self {
        let [a, b, c, _] = self.octets();
        Self::new(a, b, c, last)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use landslide_patience::Backoff;

    use super::*;

    const NATS_PORT: u16 = 4222;
    /// How long a connect or a request waits where a cut must make it hang.
    const HANG: Duration = Duration::from_millis(1500);

    /// The network of a test; fails, never skips, where namespaces cannot be made.
    async fn network(hosts: &[&str]) -> Network {
        assert!(
            crate::running_as_root(),
            "the netns tests need root: they create network namespaces"
        );
        match Network::create(hosts).await {
            Ok(net) => net,
            Err(e) => panic!("cannot create network namespaces: {e:#}"),
        }
    }

    /// Runs `f` on a thread of its own inside `host`'s namespace: the sockets it creates belong
    /// to the host, wherever they are used later. A thread of its own, because `setns` moves
    /// only the calling thread and a pool thread would stay moved.
    async fn in_host<T: Send + 'static>(
        net: &Network,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = format!("/run/netns/{}", net.namespace(host));
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let _ = tx.send(f());
        });
        rx.await.unwrap()
    }

    /// Runs blocking socket code of the root namespace off the runtime.
    async fn in_root<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    type Conn = BufReader<TcpStream>;

    /// Connects to a nats-server and checks that it answers a PING.
    fn nats_connect(addr: Ipv4Addr, timeout: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&SocketAddr::from((addr, NATS_PORT)), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut conn = BufReader::new(stream);
        let mut info = String::new();
        conn.read_line(&mut info)?;
        assert!(info.starts_with("INFO "), "{info}");
        conn.get_mut()
            .write_all(b"CONNECT {\"verbose\":false}\r\n")?;
        ping(&mut conn)?;
        Ok(conn)
    }

    /// A PING, answered by a PONG within the read timeout.
    fn ping(conn: &mut Conn) -> std::io::Result<()> {
        conn.get_mut().write_all(b"PING\r\n")?;
        pong(conn)
    }

    fn pong(conn: &mut Conn) -> std::io::Result<()> {
        let mut line = String::new();
        while line.trim_end() != "PONG" {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// A nats-server on port 4222 of every host, listening on the host's address.
    async fn start_nats(net: &Network, dir: &Path) -> Vec<Process> {
        let bin = crate::Binaries::system().nats_server().unwrap();
        let mut servers = Vec::new();
        for host in net.hosts() {
            let log = dir.join(format!("{host}.log"));
            let mut server = net
                .process(host, format!("nats-server {host}"), &bin, log)
                .arg("-a")
                .arg(net.addr(host).to_string())
                .arg("-p")
                .arg(NATS_PORT.to_string());
            server.start().unwrap();
            servers.push(server);
        }
        for (host, server) in net.hosts().zip(&mut servers) {
            let addr = net.addr(host);
            let mut backoff = Backoff::constant(Duration::from_millis(50))
                .within(Duration::from_secs(10), format!("{host}'s nats-server"));
            while in_root(move || nats_connect(addr, Duration::from_secs(1)))
                .await
                .is_err()
            {
                server.check_running().unwrap();
                assert!(
                    backoff.wait().await.is_ok(),
                    "{host}'s nats-server is not up"
                );
            }
        }
        servers
    }

    /// How a connect from `from` to `to`'s nats-server ends.
    async fn connect(net: &Network, from: &str, to: &str) -> Result<(), ErrorKind> {
        let addr = net.addr(to);
        in_host(net, from, move || {
            nats_connect(addr, HANG).map(drop).map_err(|e| e.kind())
        })
        .await
    }

    #[tokio::test]
    async fn three_hosts_reach_each_other_and_the_harness_reaches_them() {
        let dir = tempfile::tempdir().unwrap();
        let net = network(&["n1", "n2", "n3"]).await;
        // start_nats waits until the harness reaches each server on its host's address.
        let _servers = start_nats(&net, dir.path()).await;
        for from in ["n1", "n2", "n3"] {
            for to in ["n1", "n2", "n3"] {
                assert_eq!(connect(&net, from, to).await, Ok(()), "{from} -> {to}");
            }
        }
        // Each host has its own loopback, which the root namespace does not see.
        let port = in_host(&net, "n1", || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = listener.local_addr().unwrap().port();
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            listener.accept().unwrap();
            port
        })
        .await;
        let from_n2 = in_host(&net, "n2", move || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| e.kind())
        })
        .await;
        assert_eq!(from_n2.err(), Some(ErrorKind::ConnectionRefused));
        // Hosts reach the harness's address.
        let harness = in_root(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()).await;
        let target = SocketAddr::from((net.harness_addr(), harness.local_addr().unwrap().port()));
        in_host(&net, "n3", move || {
            TcpStream::connect_timeout(&target, HANG)
        })
        .await
        .unwrap();
        let (_, peer) = in_root(move || harness.accept().unwrap()).await;
        assert_eq!(peer.ip(), net.addr("n3"));
    }

    #[tokio::test]
    async fn a_cut_drops_packets_so_connections_hang_until_healed() {
        let dir = tempfile::tempdir().unwrap();
        let mut net = network(&["a", "b", "c"]).await;
        let _servers = start_nats(&net, dir.path()).await;
        let b = net.addr("b");
        let mut established = in_host(&net, "a", move || nats_connect(b, HANG))
            .await
            .unwrap();

        net.cut("a", "b").await.unwrap();
        net.cut("b", "a").await.unwrap();
        assert_eq!(connect(&net, "a", "b").await, Err(ErrorKind::TimedOut));
        assert_eq!(connect(&net, "b", "a").await, Err(ErrorKind::TimedOut));
        assert_eq!(connect(&net, "a", "c").await, Ok(()));
        assert_eq!(connect(&net, "c", "b").await, Ok(()));
        assert_eq!(
            in_root(move || nats_connect(b, HANG).map(drop)).await.ok(),
            Some(())
        );
        let (mut established, stalled) = in_root(move || {
            let result = ping(&mut established).map_err(|e| e.kind());
            (established, result)
        })
        .await;
        assert!(
            matches!(stalled, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "a request across the cut ended with {stalled:?} instead of getting no answer"
        );

        net.heal().await.unwrap();
        assert_eq!(connect(&net, "a", "b").await, Ok(()));
        assert_eq!(connect(&net, "b", "a").await, Ok(()));
        // The PONG to the stalled PING arrives with the next retransmission.
        let resumed = in_root(move || {
            established
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            pong(&mut established)?;
            ping(&mut established)
        })
        .await;
        assert_eq!(resumed.map_err(|e| e.kind()), Ok(()));
    }

    #[tokio::test]
    async fn a_one_way_cut_delivers_what_is_sent_and_drops_the_answers() {
        let dir = tempfile::tempdir().unwrap();
        let mut net = network(&["a", "b"]).await;
        let _servers = start_nats(&net, dir.path()).await;
        let b = net.addr("b");
        // The harness watches what b's server receives on `probe`; cuts never reach it.
        let mut watcher = in_root(move || {
            let mut conn = nats_connect(b, HANG)?;
            conn.get_mut().write_all(b"SUB probe 1\r\n")?;
            ping(&mut conn).map(|()| conn)
        })
        .await
        .unwrap();
        let mut client = in_host(&net, "a", move || nats_connect(b, HANG))
            .await
            .unwrap();

        net.cut_one_way("b", "a").await.unwrap();
        assert_eq!(connect(&net, "a", "b").await, Err(ErrorKind::TimedOut));
        let (mut client, answered, delivered) = in_root(move || {
            let sent = client.get_mut().write_all(b"PUB probe 5\r\nhello\r\n");
            let answered = sent.and_then(|()| ping(&mut client)).map_err(|e| e.kind());
            let mut line = String::new();
            let delivered = watcher.read_line(&mut line).map(|_| line);
            (client, answered, delivered)
        })
        .await;
        assert!(
            matches!(answered, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "the answer crossed a one-way cut: {answered:?}"
        );
        let delivered = delivered.unwrap();
        assert!(
            delivered.starts_with("MSG probe 1 5"),
            "what a sent across the cut did not arrive: {delivered:?}"
        );

        net.heal().await.unwrap();
        let resumed = in_root(move || {
            client
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))?;
            pong(&mut client)
        })
        .await;
        assert_eq!(resumed.map_err(|e| e.kind()), Ok(()));
    }

    #[tokio::test]
    async fn an_isolated_host_reaches_no_other_host_but_the_harness_still_reaches_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut net = network(&["a", "b", "c"]).await;
        let _servers = start_nats(&net, dir.path()).await;
        net.isolate("a").await.unwrap();
        assert_eq!(connect(&net, "a", "b").await, Err(ErrorKind::TimedOut));
        assert_eq!(connect(&net, "c", "a").await, Err(ErrorKind::TimedOut));
        assert_eq!(connect(&net, "b", "c").await, Ok(()));
        let a = net.addr("a");
        assert_eq!(
            in_root(move || nats_connect(a, HANG).map(drop)).await.ok(),
            Some(())
        );
        net.heal().await.unwrap();
        assert_eq!(connect(&net, "a", "b").await, Ok(()));
        assert_eq!(connect(&net, "c", "a").await, Ok(()));
    }

    #[tokio::test]
    async fn dropping_the_network_removes_every_namespace_and_link() {
        let mut net = network(&["n1", "n2"]).await;
        net.cut("n1", "n2").await.unwrap();
        let prefix = net.prefix.clone();
        let subnet = format!("{}/24", net.harness_addr().with_last(0));
        let ip = net.ip.clone();
        let ours = |list: &str| {
            list.lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|name| *name == prefix || name.starts_with(&format!("{prefix}-")))
                .count()
        };
        let list = ip_output(&ip, &["netns", "list"]).await.unwrap();
        assert_eq!(ours(&list), 3, "{list}");
        drop(net);
        let list = ip_output(&ip, &["netns", "list"]).await.unwrap();
        assert_eq!(ours(&list), 0, "{list}");
        assert!(ip_output(&ip, &["link", "show", &prefix]).await.is_err());
        let routes = ip_output(&ip, &["-4", "route", "show", "table", "all"])
            .await
            .unwrap();
        assert!(!routes.contains(&subnet), "{routes}");
    }

    #[test]
    fn a_subnet_is_taken_when_a_route_of_the_machine_overlaps_it() {
        let routes = parse_routes(
            "default via 192.0.2.1 dev eth0 \n\
             192.0.2.0/24 dev eth0 proto kernel scope link src 192.0.2.2 \n\
             10.200.7.0/24 via 10.200.7.1 dev lsnet7 src 10.200.7.254 \n\
             local 10.200.9.254 dev lsnet9 table local proto kernel scope host src 10.200.9.254 \n\
             unreachable 10.201.0.0/16 \n",
        );
        let free = |x: u8| {
            !routes
                .iter()
                .any(|&r| overlaps((Ipv4Addr::new(10, 200, x, 0), 24), r))
        };
        assert!(free(8));
        assert!(!free(7));
        assert!(!free(9));
        assert!(overlaps(
            (Ipv4Addr::new(10, 200, 3, 0), 24),
            (Ipv4Addr::new(10, 0, 0, 0), 8)
        ));
        assert!(!overlaps(
            (Ipv4Addr::new(10, 200, 3, 0), 24),
            (Ipv4Addr::new(10, 201, 0, 0), 16)
        ));
    }

    #[test]
    fn host_names_must_be_unique_and_safe_in_a_file_name() {
        assert!(check_names(&["n1", "web-1", "pg_2"]).is_ok());
        assert!(check_names(&[]).is_err());
        assert!(check_names(&["n1", "n1"]).is_err());
        assert!(check_names(&["../x"]).is_err());
        assert!(check_names(&[""]).is_err());
    }
}
