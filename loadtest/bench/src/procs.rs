//! CPU time and memory of processes, from `/proc`.

use std::collections::HashMap;

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// A set of processes whose CPU time is summed: fixed ids, or every process of one name, found
/// again at each reading (PostgreSQL starts a backend per connection).
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub pids: Vec<u32>,
    comm: Option<String>,
}

impl Group {
    pub fn of(pids: impl IntoIterator<Item = u32>) -> Self {
        Self {
            pids: pids.into_iter().collect(),
            comm: None,
        }
    }

    /// This process.
    pub fn me() -> Self {
        Self::of([std::process::id()])
    }

    /// Every process whose command name is `comm` (e.g. all of PostgreSQL's `postgres` processes).
    pub fn named(comm: &str) -> Self {
        let pids = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect();
        Self {
            pids,
            comm: Some(comm.to_owned()),
        }
    }

    /// The group's processes now: a named group is looked up again.
    fn pids(&self) -> Vec<u32> {
        match &self.comm {
            Some(comm) => Self::named(comm).pids,
            None => self.pids.clone(),
        }
    }

    /// CPU ticks consumed so far by each of the group's live processes.
    fn ticks(&self) -> HashMap<u32, u64> {
        self.pids()
            .into_iter()
            .filter_map(|pid| Some((pid, cpu_ticks(pid)?)))
            .collect()
    }

    /// The largest current resident set (`VmRSS`) among the group's processes, in bytes.
    pub fn rss(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&pid| status_kb(pid, "VmRSS:"))
            .max()
            .unwrap_or(0)
            * 1024
    }

    /// The largest peak resident set (`VmHWM`) among the group's processes, in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&pid| status_kb(pid, "VmHWM:"))
            .max()
            .unwrap_or(0)
            * 1024
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU used by each of several groups over one measured stretch. A process that appears
/// meanwhile counts from zero; one that exits meanwhile is not counted.
#[derive(Debug)]
pub struct CpuMeter {
    groups: Vec<(String, Group, HashMap<u32, u64>)>,
}

impl CpuMeter {
    pub fn start(groups: Vec<(&str, Group)>) -> Self {
        Self {
            groups: groups
                .into_iter()
                .map(|(name, group)| {
                    let at = group.ticks();
                    (name.to_owned(), group, at)
                })
                .collect(),
        }
    }

    /// CPU seconds each group used since `start`, by name.
    pub fn stop(&self) -> Vec<(String, f64)> {
        self.groups
            .iter()
            .map(|(name, group, at)| {
                let ticks: u64 = group
                    .ticks()
                    .into_iter()
                    .map(|(pid, now)| now.saturating_sub(at.get(&pid).copied().unwrap_or(0)))
                    .sum();
                (name.clone(), ticks as f64 / TICKS_PER_SECOND)
            })
            .collect()
    }
}
