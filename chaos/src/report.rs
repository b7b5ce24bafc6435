//! The figures of a run, and the table that prints them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::faults::{FaultKind, FaultRecord};
use crate::roles::RoleDeath;
use crate::workload::{Counters, Plan};
use crate::{NatsLayout, Scenario};

/// What a run did and found. It passed when `failures` is empty.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub layout: NatsLayout,
    pub voters: usize,
    pub offered: usize,
    pub attempts: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    pub accepted_after_refusal: u64,
    pub unanswered: u64,
    pub unanswered_sent: u64,
    pub unanswered_samples: Vec<String>,
    /// Voters with a keyless vote that went unanswered after it may have been sent.
    pub ambiguous: usize,
    pub voter_errors: usize,
    pub clock_offsets: Vec<i64>,
    pub faults: Vec<FaultRecord>,
    pub load_time: Duration,
    pub drain_time: Option<Duration>,
    pub ballots: usize,
    pub expected: BTreeMap<String, i64>,
    pub lost: usize,
    pub doubled: usize,
    pub misordered: usize,
    pub phantom: usize,
    /// Ballots of voters whose first answer was lost: see [`crate::check::Verdict::orphaned`].
    pub orphaned: usize,
    pub tally_exact: bool,
    pub results_match: bool,
    pub poison_injected: usize,
    pub poison_dead_lettered: usize,
    pub dead_letters: usize,
    pub audit: String,
    pub audit_passed: bool,
    /// Messages in each vote partition's stream at the end: every partition took votes.
    pub partition_messages: Vec<(String, u64)>,
    /// Roles that exited on their own, each a finding of its own.
    pub deaths: Vec<RoleDeath>,
    /// Why the drain stopped before the stream was drained: the roles that died and could not
    /// be started again.
    pub not_drained_because: Option<String>,
    /// Voters without their latest accepted vote counted when the drain had stopped for
    /// `not_drained_because`: neither lost nor misordered, for nothing says so yet.
    pub not_drained: usize,
    /// Faults after which the votes stream had gone backwards.
    pub regressions: usize,
    /// Where each lost or misordered voter's votes are in the stream (or the stores).
    pub lookups: Vec<String>,
    /// The commands that replay the run's schedule.
    pub replay: Vec<String>,
    pub failures: Vec<String>,
    /// The run's folder (server and role logs), kept when the run failed.
    pub logs: Option<PathBuf>,
}

impl Report {
    pub fn new(scenario: &Scenario, plan: &Plan, counters: &Counters, load_time: Duration) -> Self {
        let get = Counters::get;
        Self {
            seed: scenario.seed,
            layout: scenario.layout,
            voters: scenario.voters,
            offered: plan.offered(),
            attempts: get(&counters.attempts),
            accepted: get(&counters.accepted),
            duplicates: get(&counters.duplicates),
            refused: get(&counters.refused),
            accepted_after_refusal: get(&counters.accepted_after_refusal),
            unanswered: get(&counters.unanswered),
            unanswered_sent: get(&counters.unanswered_sent),
            unanswered_samples: counters
                .unanswered_samples
                .lock()
                .map(|s| s.clone())
                .unwrap_or_default(),
            ambiguous: 0,
            voter_errors: 0,
            clock_offsets: Vec::new(),
            faults: Vec::new(),
            load_time,
            drain_time: None,
            ballots: 0,
            expected: BTreeMap::new(),
            lost: 0,
            doubled: 0,
            misordered: 0,
            phantom: 0,
            orphaned: 0,
            tally_exact: false,
            results_match: false,
            poison_injected: 0,
            poison_dead_lettered: 0,
            dead_letters: 0,
            audit: String::new(),
            audit_passed: false,
            partition_messages: Vec::new(),
            deaths: Vec::new(),
            not_drained_because: None,
            not_drained: 0,
            regressions: 0,
            lookups: Vec::new(),
            replay: Vec::new(),
            failures: Vec::new(),
            logs: None,
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// How many faults of `kind` were injected without an error.
    pub fn injected(&self, kind: FaultKind) -> usize {
        self.faults
            .iter()
            .filter(|f| f.kind == kind && f.error.is_none())
            .count()
    }

    /// The failures, the faults as they happened, and how to replay the run.
    pub fn details(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {} ({}), ingest clock offsets {:?} ms",
            self.seed, self.layout, self.clock_offsets
        );
        for f in &self.faults {
            let _ = writeln!(
                out,
                "  at {:>6.1} s (voter {:>7}) {:<36} {:>6} ms  {}{}",
                f.started.as_secs_f64(),
                f.at_voter,
                f.kind.label(),
                f.took.as_millis(),
                f.detail,
                f.error
                    .as_deref()
                    .map(|e| format!(" ERROR: {e}"))
                    .unwrap_or_default()
            );
            if let Some(stream) = &f.stream {
                let _ = writeln!(out, "{:>23}votes stream {stream}", "");
            }
        }
        for sample in &self.unanswered_samples {
            let _ = writeln!(out, "  unanswered, maybe sent: {sample}");
        }
        if !self.passed() {
            let _ = writeln!(out, "FAILED (seed {}):", self.seed);
            for failure in &self.failures {
                let _ = writeln!(out, "  - {failure}");
            }
            for line in &self.lookups {
                let _ = writeln!(out, "  {line}");
            }
            if let Some(logs) = &self.logs {
                let _ = writeln!(
                    out,
                    "  logs kept in {} (every server's and role's log)",
                    logs.display()
                );
            }
            for (i, line) in self.replay.iter().enumerate() {
                let lead = if i == 0 { "replay:" } else { "    or:" };
                let _ = writeln!(out, "  {lead} {line}");
            }
        }
        out
    }

    /// One line: the seed, the verdict and the figures that decide it.
    pub fn line(&self) -> String {
        let power: Vec<String> = self
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::PowerLoss)
            .map(|f| format!("{:.1} s", f.took.as_secs_f64()))
            .collect();
        let mut counted = BTreeMap::<String, usize>::new();
        for d in &self.deaths {
            *counted
                .entry(format!("{} exited ({})", d.name, d.status))
                .or_default() += 1;
        }
        let deaths: Vec<String> = counted
            .into_iter()
            .map(|(death, n)| {
                if n == 1 {
                    death
                } else {
                    format!("{death} {n} times")
                }
            })
            .collect();
        format!(
            "seed {:>6}  {:<19}  {}  lost {}  misordered {}  doubled {}  not drained {}  \
             regressions {}  power loss took {}  drained {}{}{}",
            self.seed,
            self.layout.to_string(),
            if self.passed() { "PASS" } else { "FAIL" },
            self.lost,
            self.misordered,
            self.doubled,
            self.not_drained,
            self.regressions,
            if power.is_empty() {
                "-".to_owned()
            } else {
                power.join(", ")
            },
            self.drain_time
                .map_or("NOT".to_owned(), |d| format!("in {:.1} s", d.as_secs_f64())),
            if deaths.is_empty() {
                String::new()
            } else {
                format!("  {}", deaths.join(", "))
            },
            self.logs
                .as_ref()
                .map(|l| format!("  logs {}", l.display()))
                .unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", table(std::slice::from_ref(self)), self.details())
    }
}

/// A row of the table: its label, and its cell for a report.
type Row = (String, Box<dyn Fn(&Report) -> Cell>);

enum Cell {
    Count(u64),
    Text(String),
}

/// The figures of several runs side by side, with their total where figures add up.
pub fn table(reports: &[Report]) -> String {
    let count = |n: usize| Cell::Count(n as u64);
    let yes_no = |ok: bool| Cell::Text(if ok { "yes" } else { "NO" }.to_owned());
    let secs = |d: Duration| Cell::Text(format!("{:.1} s", d.as_secs_f64()));
    let mut rows: Vec<Row> = vec![
        ("seed".into(), Box::new(|r| Cell::Text(r.seed.to_string()))),
        (
            "NATS".into(),
            Box::new(|r| Cell::Text(r.layout.to_string())),
        ),
        ("voters".into(), Box::new(move |r| count(r.voters))),
        ("votes offered".into(), Box::new(move |r| count(r.offered))),
        (
            "HTTP attempts".into(),
            Box::new(|r| Cell::Count(r.attempts)),
        ),
        (
            "accepted (202)".into(),
            Box::new(|r| Cell::Count(r.accepted)),
        ),
        (
            "  of which duplicates (same key)".into(),
            Box::new(|r| Cell::Count(r.duplicates)),
        ),
        (
            "refused with 503".into(),
            Box::new(|r| Cell::Count(r.refused)),
        ),
        (
            "votes accepted on retry after 503".into(),
            Box::new(|r| Cell::Count(r.accepted_after_refusal)),
        ),
        (
            "attempts unanswered (retried)".into(),
            Box::new(|r| Cell::Count(r.unanswered)),
        ),
        (
            "  of which maybe sent".into(),
            Box::new(|r| Cell::Count(r.unanswered_sent)),
        ),
        (
            "  voters left unsure (no key)".into(),
            Box::new(move |r| count(r.ambiguous)),
        ),
    ];
    let kinds: std::collections::BTreeSet<FaultKind> = reports
        .iter()
        .flat_map(|r| r.faults.iter().map(|f| f.kind))
        .collect();
    for kind in kinds {
        rows.push((
            format!("fault: {}", kind.label()),
            Box::new(move |r| count(r.injected(kind))),
        ));
    }
    rows.extend::<Vec<Row>>(vec![
        ("ballots".into(), Box::new(move |r| count(r.ballots))),
        ("lost".into(), Box::new(move |r| count(r.lost))),
        ("doubled".into(), Box::new(move |r| count(r.doubled))),
        ("misordered".into(), Box::new(move |r| count(r.misordered))),
        (
            "not drained (a role died)".into(),
            Box::new(move |r| count(r.not_drained)),
        ),
        (
            "roles that exited on their own".into(),
            Box::new(move |r| count(r.deaths.len())),
        ),
        (
            "stream went backwards after a restart".into(),
            Box::new(move |r| count(r.regressions)),
        ),
        (
            "phantom ballots".into(),
            Box::new(move |r| count(r.phantom)),
        ),
        (
            "orphans (first answer lost)".into(),
            Box::new(move |r| count(r.orphaned)),
        ),
        (
            "tally = count of ballots".into(),
            Box::new(move |r| yes_no(r.tally_exact)),
        ),
        (
            "results API = model".into(),
            Box::new(move |r| yes_no(r.results_match)),
        ),
        (
            "malformed injected".into(),
            Box::new(move |r| count(r.poison_injected)),
        ),
        (
            "  of which dead-lettered".into(),
            Box::new(move |r| count(r.poison_dead_lettered)),
        ),
        (
            "dead letters in all".into(),
            Box::new(move |r| count(r.dead_letters)),
        ),
        ("load time".into(), Box::new(move |r| secs(r.load_time))),
        (
            "accepted votes/s".into(),
            Box::new(|r| {
                let rate = r.accepted as f64 / r.load_time.as_secs_f64();
                Cell::Text(format!("{rate:.0}"))
            }),
        ),
        (
            "last vote → drained".into(),
            Box::new(move |r| match r.drain_time {
                Some(d) => secs(d),
                None => Cell::Text("NOT DRAINED".into()),
            }),
        ),
        (
            "messages per vote partition".into(),
            Box::new(|r| {
                let each: Vec<String> = r
                    .partition_messages
                    .iter()
                    .map(|(stream, n)| format!("{stream} {n}"))
                    .collect();
                Cell::Text(each.join(", "))
            }),
        ),
        (
            "landslide audit".into(),
            Box::new(|r| {
                // "audit: CONSISTENT: the database holds…" → "CONSISTENT, exit 0".
                let verdict = r.audit.trim_start_matches("audit: ").split(':').next();
                let code = if r.audit_passed { 0 } else { 1 };
                Cell::Text(format!("{}, exit {code}", verdict.unwrap_or("?")))
            }),
        ),
        (
            "verdict".into(),
            Box::new(|r| Cell::Text(if r.passed() { "PASS" } else { "FAIL" }.into())),
        ),
    ]);

    let with_total = reports.len() > 1;
    let mut grid: Vec<Vec<String>> = Vec::new();
    let mut header = vec![String::new()];
    header.extend((1..=reports.len()).map(|i| format!("run {i}")));
    if with_total {
        header.push("total".into());
    }
    grid.push(header);
    for (label, cell) in &rows {
        let cells: Vec<Cell> = reports.iter().map(cell).collect();
        let mut line = vec![label.clone()];
        let mut total = Some(0u64);
        for c in &cells {
            match c {
                Cell::Count(n) => {
                    line.push(n.to_string());
                    total = total.map(|t| t + n);
                }
                Cell::Text(t) => {
                    line.push(t.clone());
                    total = None;
                }
            }
        }
        if with_total {
            line.push(total.map(|t| t.to_string()).unwrap_or_default());
        }
        grid.push(line);
    }
    let widths: Vec<usize> = (0..grid[0].len())
        .map(|c| {
            grid.iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in grid.iter().enumerate() {
        let mut line = String::from("|");
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                let _ = write!(line, " {cell}{} |", " ".repeat(pad));
            } else {
                let _ = write!(line, " {}{cell} |", " ".repeat(pad));
            }
        }
        let _ = writeln!(out, "{line}");
        if i == 0 {
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| {
                    if c == 0 {
                        format!(":{}", "-".repeat(w + 1))
                    } else {
                        format!("{}:", "-".repeat(w + 1))
                    }
                })
                .collect();
            let _ = writeln!(out, "|{}|", rule.join("|"));
        }
    }
    out
}
