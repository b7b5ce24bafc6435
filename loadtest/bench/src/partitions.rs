//! Partition scaling: votes/s with K = 3 vote partitions against K = 1, on the same three-node
//! R3 cluster, with each nats-server held to the same share of a core by a CPU cgroup (v1)
//! quota, so that each node stands for a machine of its own and the cluster, not the two cores
//! this machine has, is what runs out. Three ingest nodes take the load, `web<n>` on partition
//! `(n - 1) mod K` (`landslide_chaos::roles`), so that with K = 3 each partition has a node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use landslide_chaos::NatsLayout;
use landslide_chaos::roles::{RoleEnv, Roles};

use crate::ceilings::Measured;
use crate::load;
use crate::procs::{CpuMeter, Group};

/// The cgroup v1 CPU controller's root.
const CPU_CGROUPS: &str = "/sys/fs/cgroup/cpu";
/// The quota's period: 10 ms, a tenth of the kernel's default. With 100 ms a capped node spends
/// its share in a burst and then sleeps up to 80 ms, and a RAFT commit, which needs the leader
/// and a follower awake at once, waited for both: one run of the default measured K = 3 at 1.00
/// × K = 1 with the nodes' CPU not used up. Shorter periods cost the kernel more accounting.
const PERIOD_US: u64 = 10_000;

/// A CPU cgroup that holds one process to `share` of a core; removed when dropped (its processes
/// back in the root group first, if any still run).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
}

impl CpuCap {
    pub fn new(name: &str, share: f64, pid: u32) -> anyhow::Result<Self> {
        let dir = Path::new(CPU_CGROUPS).join(name);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the CPU cgroup {} (cgroup v1, as root)",
                dir.display()
            )
        })?;
        let cap = Self { dir };
        // A whole number of microseconds per period, at least 1 ms (the kernel's least quota).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let quota = (share * PERIOD_US as f64).round().max(1000.0) as u64;
        cap.write("cpu.cfs_period_us", PERIOD_US)?;
        cap.write("cpu.cfs_quota_us", quota)?;
        cap.write("cgroup.procs", pid)?;
        Ok(cap)
    }

    fn write(&self, file: &str, value: impl std::fmt::Display) -> anyhow::Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value.to_string())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write(Path::new(CPU_CGROUPS).join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One run: a fresh three-node cluster under `dir`, its nats-servers capped at `share` of a core
/// each, K = `partitions`, three ingest nodes at saturation for `seconds`.
pub async fn capped_cluster(
    env: &RoleEnv,
    dir: &Path,
    partitions: u16,
    share: f64,
    connections: usize,
    seconds: Duration,
) -> anyhow::Result<Measured> {
    let dir = dir.join(format!("partitions-{partitions}"));
    std::fs::create_dir_all(&dir)?;
    let nats = landslide_servers::Nats::start_with(
        &landslide_servers::NatsSpec {
            stems: Some((1..=3).map(|n| format!("nats-k{partitions}-{n}")).collect()),
            ..landslide_servers::NatsSpec::new(NatsLayout::Cluster)
        },
        &dir,
    )
    .await?;
    let pids: Vec<u32> = (0..nats.len()).filter_map(|n| nats.pid(n)).collect();
    let _caps = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| {
            CpuCap::new(
                &format!(
                    "landslide-bench-k{partitions}-n{}-{}",
                    i + 1,
                    std::process::id()
                ),
                share,
                pid,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let env = RoleEnv {
        nats: nats.configs(),
        replicas: NatsLayout::Cluster.replicas(),
        vote_partitions: partitions,
        ..env.clone()
    };
    // The workers' set-up: the streams, K recorded, the leaders spread over the three nodes.
    landslide_chaos::roles::set_up_as_a_worker(&env).await?;
    let streams: Vec<String> = landslide_nats::Topology::default()
        .partitions(partitions)
        .into_iter()
        .map(|p| p.votes_stream)
        .collect();
    let mut leaders = Vec::new();
    for stream in &streams {
        leaders.push(nats.stream_leader(stream).await);
    }
    tracing::info!(
        partitions,
        ?streams,
        ?leaders,
        share,
        "capped cluster set up"
    );
    let mut nodes = Vec::new();
    for n in 1..=3 {
        nodes.push(Roles::start_ingest(&env, &dir, &format!("web{n}"), 0).await?);
    }
    let targets: Vec<load::Target> = nodes.iter().map(|r| load::Target::vote(r.addr)).collect();
    let each = (connections / targets.len()).max(1);
    futures::future::try_join_all(targets.iter().map(|t| load::warm_up(t, each, None))).await?;
    let meter = CpuMeter::start(vec![
        (
            "ingest",
            Group::of(nodes.iter().filter_map(|n| n.process.pid())),
        ),
        ("nats-server", Group::of(pids)),
        ("load generator", Group::me()),
    ]);
    let outcomes =
        futures::future::try_join_all(targets.iter().map(|t| load::run(t, each, None, seconds)))
            .await?;
    let cpu = meter.stop();
    let ok = outcomes.iter().map(|o| o.ok).sum();
    let elapsed = outcomes.iter().map(|o| o.elapsed).max().unwrap_or(seconds);
    for node in &mut nodes {
        node.process.terminate(Duration::from_secs(30)).await?;
    }
    drop(nats);
    Ok(Measured::new(ok, elapsed, cpu))
}
