//! The faults and their seeded schedule.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng as _;
use rand::seq::SliceRandom as _;
use rand_chacha::ChaCha8Rng;

use crate::Stack;
use crate::roles::Role;
use landslide_servers::{NatsLayout, PgStop};

/// How long an ingest node may take to drain after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// SIGKILL of a dedup-worker, then a new one.
    KillWorker,
    /// SIGKILL of the single nats-server, then a restart on the same store.
    KillNats,
    /// In the cluster: SIGKILL of the VOTES stream leader, later of a second node (no quorum),
    /// then both return.
    KillLeaderThenQuorum,
    /// PostgreSQL stopped with `-m fast`, then started.
    RestartPostgresFast,
    /// PostgreSQL stopped with `-m immediate` (as after a crash: WAL replay), then started.
    RestartPostgresImmediate,
    /// SIGTERM of an ingest node under load: it must answer what it accepted and exit 0.
    TerminateIngest,
    /// SIGKILL of an ingest node under load, in the middle of publishing batches: what it had
    /// answered 2xx must be stored, and what it had not answered is the voters' to retry. A
    /// first vote without a cookie or a key that the node stored but never answered is a
    /// ballot under a voter id its voter never learnt: the check counts such orphans apart
    /// (see [`crate::check::Verdict::orphaned`]).
    KillIngest,
    /// The workers stall (SIGSTOP) while votes keep being accepted, then the power goes out on
    /// the data tier: nats-server (every node of a cluster at once) and PostgreSQL are killed and
    /// their disks lose everything they had not fsynced (LazyFs). Then everything comes back.
    /// The stalled workers leave accepted votes only in the stream when the power goes.
    PowerLoss,
    /// In the cluster: the VOTES stream leader cut off from the other two nodes (the clients
    /// still reach all three) long enough, at times, for the two to elect a new leader; then
    /// the cut heals and the old leader must catch up without keeping anything the new one
    /// did not.
    PartitionLeader,
    /// A worker cut off from PostgreSQL in the middle of its transactions: packets dropped,
    /// so nothing answers and nothing fails. The worker must give up within its bound (below
    /// `ack_wait`), nak, and carry on once the cut heals, without a restart.
    PartitionWorkerFromPostgres,
    /// An ingest node cut off after its publishes left: every packet from the nats-servers to
    /// it is dropped, so what it sends is stored and no ack comes back. Its votes must be
    /// answered 503 (never 2xx) and their retries must win over the stored copies.
    PartitionIngestFromNats,
}

impl FaultKind {
    /// Every fault that applies to a layout.
    pub fn for_layout(layout: NatsLayout) -> Vec<Self> {
        let nats = match layout {
            NatsLayout::Single => Self::KillNats,
            NatsLayout::Cluster => Self::KillLeaderThenQuorum,
        };
        let mut kinds = vec![
            Self::KillWorker,
            nats,
            Self::RestartPostgresFast,
            Self::RestartPostgresImmediate,
            Self::TerminateIngest,
            Self::KillIngest,
            Self::PowerLoss,
            Self::PartitionWorkerFromPostgres,
            Self::PartitionIngestFromNats,
        ];
        if layout == NatsLayout::Cluster {
            kinds.push(Self::PartitionLeader);
        }
        kinds
    }

    /// Whether the fault cuts the network (the stack then runs on hosts of a network).
    pub fn is_partition(self) -> bool {
        matches!(
            self,
            Self::PartitionLeader
                | Self::PartitionWorkerFromPostgres
                | Self::PartitionIngestFromNats
        )
    }

    /// Whether the fault restarts nats-servers or moves the stream's leadership: after it the
    /// harness checks that the stream did not go backwards.
    pub fn restarts_nats(self) -> bool {
        matches!(
            self,
            Self::KillNats | Self::KillLeaderThenQuorum | Self::PowerLoss | Self::PartitionLeader
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::KillWorker => "SIGKILL worker",
            Self::KillNats => "SIGKILL nats-server",
            Self::KillLeaderThenQuorum => "SIGKILL stream leader, then quorum",
            Self::RestartPostgresFast => "PostgreSQL restart (fast)",
            Self::RestartPostgresImmediate => "PostgreSQL restart (immediate)",
            Self::TerminateIngest => "SIGTERM ingest",
            Self::KillIngest => "SIGKILL ingest",
            Self::PowerLoss => "power loss (nats-server and PostgreSQL)",
            Self::PartitionLeader => "partition: stream leader from the other nodes",
            Self::PartitionWorkerFromPostgres => "partition: worker from PostgreSQL",
            Self::PartitionIngestFromNats => "partition: ingest from nats-server's answers",
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// Injected once this many voters have started.
    pub at_voter: usize,
    /// How long the failed part stays down.
    pub down: Duration,
    /// Which worker or ingest node, or which second cluster node (modulo their number).
    pub target: usize,
}

/// What happened when a fault was injected.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub at_voter: usize,
    /// Since the load started.
    pub started: Duration,
    pub took: Duration,
    pub detail: String,
    pub error: Option<String>,
    /// The votes stream before and after a fault that restarted nats-servers.
    pub stream: Option<crate::stream::RestartCheck>,
}

/// Every fault of `kinds` `rounds` times (worker kills, if among them, twice as often), in a
/// seeded order, spread over the voters between the shares `window` of them.
pub fn schedule(
    rng: &mut ChaCha8Rng,
    kinds_once: &[FaultKind],
    window: (f64, f64),
    rounds: usize,
    voters: usize,
) -> Vec<Fault> {
    let mut kinds = Vec::new();
    for _ in 0..rounds {
        kinds.extend_from_slice(kinds_once);
        if kinds_once.contains(&FaultKind::KillWorker) {
            kinds.push(FaultKind::KillWorker);
        }
    }
    kinds.shuffle(rng);
    let count = kinds.len();
    kinds
        .into_iter()
        .enumerate()
        .map(|(j, kind)| {
            // Within the window, one fault per slot, at a random point in it.
            let slot = (j as f64 + rng.random::<f64>()) / count as f64;
            let down_ms = match kind {
                // Long enough, at times, for ingest to give up and answer 503.
                FaultKind::KillLeaderThenQuorum => rng.random_range(1_000..5_000),
                FaultKind::KillNats => rng.random_range(300..6_000),
                // Around the election timeout (4 to 9 s): sometimes a new leader, sometimes not.
                FaultKind::PartitionLeader => rng.random_range(2_000..12_000),
                // Both sides of the worker's database bound (two thirds of ack_wait).
                FaultKind::PartitionWorkerFromPostgres => rng.random_range(500..6_000),
                // Longer than ingest's publish timeout: its votes are answered 503.
                FaultKind::PartitionIngestFromNats => rng.random_range(1_500..5_000),
                _ => rng.random_range(100..2_000),
            };
            Fault {
                kind,
                at_voter: ((window.0 + (window.1 - window.0) * slot) * voters as f64) as usize,
                down: Duration::from_millis(down_ms),
                target: rng.random_range(0..1024),
            }
        })
        .collect()
}

/// Moves each power loss right after restarts: the kill of nats-server (or of the stream's
/// leader and then quorum), then a worker kill, then the power loss, in consecutive slots of the
/// schedule (about 2.5 s apart in the short form). The order of the other faults, every fault's
/// downtime and target and the slots' points in the load stay as drawn. The shape of the finding
/// in RELIABILITY.md: a power cut soon after a restart.
pub fn power_cut_after_restart(schedule: &mut [Fault]) {
    let slots: Vec<usize> = schedule.iter().map(|f| f.at_voter).collect();
    let mut kinds: Vec<FaultKind> = schedule.iter().map(|f| f.kind).collect();
    let mut from = 0;
    while let Some(cut) = kinds[from..]
        .iter()
        .position(|&k| k == FaultKind::PowerLoss)
        .map(|i| i + from)
    {
        // The restarts taken are the nearest unclaimed ones; with none left, the cut stays.
        let restart = |kind: FaultKind, kinds: &[FaultKind]| {
            kinds[from..]
                .iter()
                .position(|&k| k == kind)
                .map(|i| i + from)
        };
        let nats = restart(FaultKind::KillLeaderThenQuorum, &kinds)
            .or_else(|| restart(FaultKind::KillNats, &kinds));
        let mut group = Vec::new();
        group.extend(nats);
        group.extend(restart(FaultKind::KillWorker, &kinds));
        group.push(cut);
        // Take the group out and put it back in order, starting at its first slot.
        let start = *group.iter().min().unwrap_or(&cut);
        let mut rest: Vec<FaultKind> = kinds
            .iter()
            .enumerate()
            .filter(|(i, _)| *i >= start && !group.contains(i))
            .map(|(_, &k)| k)
            .collect();
        let mut ordered: Vec<FaultKind> = group.iter().map(|&i| kinds[i]).collect();
        ordered.append(&mut rest);
        kinds.splice(start.., ordered);
        from = start + group.len();
    }
    // The faults keep their own downtimes and targets: reorder the faults, keep the slots.
    let mut pool: Vec<Fault> = schedule.to_vec();
    for (i, kind) in kinds.into_iter().enumerate() {
        let j = pool
            .iter()
            .position(|f| f.kind == kind)
            .unwrap_or_else(|| unreachable!("the kinds are the schedule's own"));
        let mut fault = pool.remove(j);
        fault.at_voter = slots[i];
        schedule[i] = fault;
    }
}

/// SIGKILL of the fault's target among `roles`, its downtime, then the same role started again.
async fn kill_and_restart<'a>(roles: &'a mut [Role], fault: &Fault) -> anyhow::Result<&'a Role> {
    let count = roles.len();
    let role = &mut roles[fault.target % count];
    role.process.kill().await?;
    tokio::time::sleep(fault.down).await;
    role.start().await?;
    Ok(role)
}

/// Injects one fault and brings the failed part back; returns what was done.
pub async fn inject(stack: &mut Stack, fault: &Fault) -> anyhow::Result<String> {
    match fault.kind {
        FaultKind::KillWorker => {
            let worker = kill_and_restart(&mut stack.roles.workers, fault).await?;
            Ok(format!(
                "{} down {} ms",
                worker.process.name(),
                fault.down.as_millis()
            ))
        }
        FaultKind::KillNats => {
            stack.nats.kill(0).await?;
            tokio::time::sleep(fault.down).await;
            stack.nats.restart(0).await?;
            Ok(format!("down {} ms", fault.down.as_millis()))
        }
        FaultKind::KillLeaderThenQuorum => {
            let nodes = stack.nats.len();
            let leader = stack.nats.stream_leader("VOTES").await;
            let first = leader.unwrap_or(0);
            stack.nats.kill(first).await?;
            tokio::time::sleep(fault.down).await;
            let second = (first + 1 + fault.target % (nodes - 1)) % nodes;
            stack.nats.kill(second).await?;
            tokio::time::sleep(fault.down).await;
            stack.nats.restart(first).await?;
            stack.nats.restart(second).await?;
            Ok(format!(
                "{} ({}) down, then {} too (no quorum) for {} ms",
                stack.nats.name(first),
                if leader.is_some() {
                    "the VOTES leader"
                } else {
                    "leader unknown"
                },
                stack.nats.name(second),
                fault.down.as_millis()
            ))
        }
        FaultKind::RestartPostgresFast | FaultKind::RestartPostgresImmediate => {
            let how = if fault.kind == FaultKind::RestartPostgresFast {
                PgStop::Fast
            } else {
                PgStop::Immediate
            };
            stack.postgres.stop(how).await?;
            tokio::time::sleep(fault.down).await;
            stack.postgres.start_server().await?;
            Ok(format!("down {} ms", fault.down.as_millis()))
        }
        FaultKind::PowerLoss => {
            for worker in &mut stack.roles.workers {
                worker.process.pause()?;
            }
            tokio::time::sleep(fault.down).await;
            let nodes: Vec<usize> = (0..stack.nats.len()).collect();
            let cut = stack.nats.power_cut(&nodes).await;
            let pg = stack.postgres.power_cut().await;
            let (cut, pg) = (cut?, pg?);
            tokio::time::sleep(fault.down).await;
            stack.postgres.start_server().await?;
            stack.nats.restart_all(&nodes).await?;
            for worker in &mut stack.roles.workers {
                worker.process.resume()?;
            }
            let lost: u64 = cut.iter().map(|r| r.bytes).sum();
            Ok(format!(
                "workers stalled {} ms, then power cut: nats-server disks lost {lost} unsynced \
                 bytes, PostgreSQL's {}",
                fault.down.as_millis(),
                pg.bytes
            ))
        }
        FaultKind::PartitionLeader => {
            let leader = stack
                .nats
                .stream_leader("VOTES")
                .await
                .context("the VOTES stream has no leader to cut off")?;
            let name = stack.nats.name(leader).to_owned();
            let majority: Vec<usize> = (0..stack.nats.len()).filter(|&i| i != leader).collect();
            let others: Vec<String> = majority
                .iter()
                .map(|&i| stack.nats.name(i).to_owned())
                .collect();
            let network = stack.network()?;
            for other in &others {
                network.cut(&name, other).await?;
            }
            tokio::time::sleep(fault.down).await;
            let during = stack.nats.stream_leader_seen_by("VOTES", majority).await;
            stack.network()?.heal().await?;
            let during = during.map_or("none".to_owned(), |i| stack.nats.name(i).to_owned());
            Ok(format!(
                "{name} (the VOTES leader) cut off from {} for {} ms; leader the other two \
                 saw at the end: {during}",
                others.join(" and "),
                fault.down.as_millis()
            ))
        }
        FaultKind::PartitionWorkerFromPostgres => {
            let i = fault.target % stack.roles.workers.len();
            let name = stack.roles.workers[i].process.name().to_owned();
            let url = stack.roles.workers[i].metrics_url();
            let cuts = [Cut::Both(name.clone(), crate::POSTGRES_HOST.to_owned())];
            let gave_up =
                partition(stack, &cuts, fault, &url, "landslide_db_timeouts_total").await?;
            Ok(format!(
                "{name} cut off from PostgreSQL for {} ms; it gave up on {gave_up} transactions",
                fault.down.as_millis(),
            ))
        }
        FaultKind::PartitionIngestFromNats => {
            let i = fault.target % stack.roles.ingest.len();
            let name = stack.roles.ingest[i].process.name().to_owned();
            let url = stack.roles.ingest[i].metrics_url();
            let cuts: Vec<Cut> = (0..stack.nats.len())
                .map(|n| Cut::OneWay(stack.nats.name(n).to_owned(), name.clone()))
                .collect();
            let refused = "landslide_votes_rejected_total{reason=\"unavailable\"}";
            let answered = partition(stack, &cuts, fault, &url, refused).await?;
            Ok(format!(
                "{name} heard nothing from nats-server for {} ms and answered {answered} votes 503",
                fault.down.as_millis(),
            ))
        }
        FaultKind::KillIngest => {
            let node = kill_and_restart(&mut stack.roles.ingest, fault).await?;
            Ok(format!(
                "{} killed, back after {} ms",
                node.process.name(),
                fault.down.as_millis()
            ))
        }
        FaultKind::TerminateIngest => {
            let nodes = &mut stack.roles.ingest;
            let count = nodes.len();
            let node = &mut nodes[fault.target % count];
            let started = Instant::now();
            let status = node.process.terminate(DRAIN_GRACE).await?;
            let drained = started.elapsed();
            anyhow::ensure!(
                status.success(),
                "{} exited with {status} after SIGTERM",
                node.process.name()
            );
            tokio::time::sleep(fault.down).await;
            node.start().await?;
            Ok(format!(
                "{} drained and exited 0 in {} ms, back after {} ms",
                node.process.name(),
                drained.as_millis(),
                fault.down.as_millis()
            ))
        }
    }
}

/// One cut of a partition: between two hosts, or only the packets from the first to the second.
enum Cut {
    Both(String, String),
    OneWay(String, String),
}

/// Makes `cuts` for the fault's downtime, then heals them; returns how much `counter` of the role
/// whose `/metrics` is at `role_url` grew meanwhile, for the fault's detail (`?` when a reading
/// failed).
async fn partition(
    stack: &mut Stack,
    cuts: &[Cut],
    fault: &Fault,
    role_url: &str,
    counter: &str,
) -> anyhow::Result<String> {
    let before = metric(role_url, counter).await;
    let network = stack.network()?;
    for cut in cuts {
        match cut {
            Cut::Both(a, b) => network.cut(a, b).await?,
            Cut::OneWay(from, to) => network.cut_one_way(from, to).await?,
        }
    }
    tokio::time::sleep(fault.down).await;
    network.heal().await?;
    let after = metric(role_url, counter).await;
    Ok(after
        .zip(before)
        .map_or("?".to_owned(), |(a, b)| format!("{}", a - b)))
}

/// A metric of a role (summed over its labels), if its `/metrics` answers.
async fn metric(role_url: &str, name: &str) -> Option<f64> {
    let page = reqwest::get(format!("{role_url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(landslide_telemetry::metric_value(&page, name))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use super::*;

    #[test]
    fn a_power_cut_after_restarts_follows_a_nats_kill_and_a_worker_kill_in_the_next_slots() {
        for seed in 0..50 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let kinds = FaultKind::for_layout(NatsLayout::Cluster);
            let drawn = schedule(&mut rng, &kinds, (0.05, 0.85), 2, 1_000);
            let mut moved = drawn.clone();
            power_cut_after_restart(&mut moved);

            let slots = |s: &[Fault]| s.iter().map(|f| f.at_voter).collect::<Vec<_>>();
            assert_eq!(slots(&moved), slots(&drawn), "the slots stay (seed {seed})");
            let mut before: Vec<_> = drawn.iter().map(|f| (f.kind, f.down)).collect();
            let mut after: Vec<_> = moved.iter().map(|f| (f.kind, f.down)).collect();
            before.sort();
            after.sort();
            assert_eq!(before, after, "the same faults (seed {seed})");
            for (i, fault) in moved.iter().enumerate() {
                if fault.kind == FaultKind::PowerLoss {
                    assert!(i >= 2, "seed {seed}: {moved:?}");
                    assert_eq!(moved[i - 1].kind, FaultKind::KillWorker, "seed {seed}");
                    assert_eq!(
                        moved[i - 2].kind,
                        FaultKind::KillLeaderThenQuorum,
                        "seed {seed}"
                    );
                }
            }
        }
    }
}
