//! `landslide-goose`: a goose load test of the voting path that checks the tally afterwards.
//!
//! Each goose user is a browser that voters use one after another. Every iteration of its scenario
//! is one new voter: the user's cookie jar is emptied, then the voter opens the form (`GET /`),
//! votes (`POST /api/votes`), and a share of voters open the form again, see their vote, and change
//! their minds (a second vote with the other choice). Each request goes to a randomly chosen ingest
//! node: the signed cookie is valid on every node of a deployment.
//!
//! A vote counts as accepted only on a `202`. Any answer that leaves the outcome open (a `503`, a
//! timeout, a dropped connection) is retried with the same `Idempotency-Key` and the same cookie
//! until a `202` or a refusal (`4xx`) settles it, so the ledger knows every voter's last accepted
//! choice exactly. After the run it waits until tally reports nothing pending, as of a moment after
//! the last answer, and compares the counts with the ledger (plus the counts from before the run).
//!
//! It must never count a vote it is not sure about: a voter whose outcome stays open is reported,
//! and the check then fails rather than guess.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use clap::Parser;
use goose::config::GooseConfiguration;
use goose::prelude::*;
use landslide_patience::Backoff;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::cookie::CookieStore;
use reqwest::header::{HeaderValue, RETRY_AFTER};
use serde::Deserialize;

/// The poll every voter votes in, and its two options.
const POLL: &str = "pets";
/// How long one request may take before it counts as unanswered (and is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a voter keeps retrying one vote whose outcome is open before giving up on it.
const VOTE_DEADLINE: Duration = Duration::from_secs(60);
/// The longest pause between retries, whatever `Retry-After` says.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// How often tally is asked whether it has settled.
const SETTLE_POLL: Duration = Duration::from_millis(250);

/// goose load test of Landslide: voters over several ingest nodes, then an exact tally check.
///
/// Every goose option works as well (-u users, -r start rate, -t run time, ...); see --help.
#[derive(Debug, Parser)]
#[command(name = "landslide-goose")]
struct Args {
    /// Base URLs of the ingest nodes, comma-separated; every request picks one at random.
    #[arg(
        long,
        env = "LANDSLIDE_INGEST_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080,http://127.0.0.1:8082",
        help_heading = "Landslide"
    )]
    ingest: Vec<reqwest::Url>,
    /// Base URL of tally, whose /api/results/pets is checked after the run.
    #[arg(
        long,
        env = "LANDSLIDE_TALLY_URL",
        default_value = "http://127.0.0.1:8081",
        help_heading = "Landslide"
    )]
    tally: reqwest::Url,
    /// Share of voters who change their minds (0 to 1).
    #[arg(long, default_value_t = 0.3, help_heading = "Landslide")]
    change_share: f64,
    /// Folder for goose's reports (report.html, report.md) and the tally check (tally-check.txt).
    #[arg(long, help_heading = "Landslide")]
    report_dir: PathBuf,
    /// Seconds to wait for tally to show nothing pending, before and after the run.
    #[arg(long, default_value_t = 120, help_heading = "Landslide")]
    settle_secs: u64,
    #[command(flatten)]
    goose: GooseConfiguration,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(Verdict::Exact) => ExitCode::SUCCESS,
        Ok(Verdict::Mismatch) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("landslide-goose: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// The outcome of the tally check.
enum Verdict {
    Exact,
    Mismatch,
}

async fn run(args: Args) -> anyhow::Result<Verdict> {
    ensure!(
        (0.0..=1.0).contains(&args.change_share),
        "--change-share must lie between 0 and 1, not {}",
        args.change_share
    );
    ensure!(!args.ingest.is_empty(), "--ingest names no node");
    std::fs::create_dir_all(&args.report_dir)
        .with_context(|| format!("cannot create {}", args.report_dir.display()))?;
    let settle = Duration::from_secs(args.settle_secs);
    let tally = Tally::new(&args.tally)?;

    // Votes from before the run (an earlier run on the same stack) are the baseline.
    let baseline = tally
        .settled(Utc::now(), settle)
        .await
        .context("tally did not settle before the run")?;
    println!(
        "baseline: {} (pending 0, as of {})",
        baseline.counts_line(),
        baseline.as_of
    );

    let ledger = Arc::new(Ledger::new(&args.ingest, args.change_share));
    let mut config = args.goose;
    for name in ["report.html", "report.md"] {
        config
            .report_file
            .push(args.report_dir.join(name).display().to_string());
    }
    let first_node = ledger.nodes[0].clone();
    GooseAttack::initialize_with_config(config)?
        // Every request names its node in full; the host only satisfies goose's check.
        .set_default(GooseDefault::Host, first_node.as_str())?
        // Nobody steers this run over telnet, and its port may be taken.
        .set_default(GooseDefault::NoTelnet, true)?
        .register_scenario(
            scenario!("Voter")
                .register_transaction(
                    transaction!(own_cookie_jar)
                        .set_on_start()
                        .set_name("own cookie jar"),
                )
                .register_transaction(voter_transaction(Arc::clone(&ledger)).set_name("voter")),
        )
        .execute()
        .await?;
    // goose has joined every user: no vote is in flight any more.
    let ended = Utc::now();

    let stats = ledger.stats();
    println!(
        "voters: {} ({} changed their minds), votes accepted: {} ({} answered as duplicates of a retried vote), retries: {}, refused: {}, unresolved voters: {}",
        stats.voters,
        stats.changed,
        stats.accepted,
        stats.duplicates,
        stats.retries,
        stats.refused,
        stats.unresolved
    );
    let results = tally
        .settled(ended, settle)
        .await
        .context("tally did not settle after the run")?;
    let mut expected = baseline.counts.clone();
    for (choice, n) in ledger.last_choices() {
        *expected.entry(choice.to_owned()).or_default() += n;
    }
    let expected_total: i64 = expected.values().sum();
    let exact = stats.unresolved == 0
        && results.total == expected_total
        && CHOICES
            .iter()
            .all(|c| results.count(c) == expected.get(*c).copied().unwrap_or(0));

    let mut report = String::new();
    let verdict = if exact { "PASSED" } else { "FAILED" };
    report.push_str(&format!("tally check: {verdict}\n"));
    report.push_str(&format!(
        "  expected (baseline + each voter's last accepted choice): {}, total={expected_total}\n",
        CHOICES
            .iter()
            .map(|c| format!("{c}={}", expected.get(*c).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.push_str(&format!(
        "  tally {}api/results/{POLL} (pending 0, as of {}): {}\n",
        args.tally,
        results.as_of,
        results.counts_line()
    ));
    if stats.unresolved > 0 {
        report.push_str(&format!(
            "  {} voters have a vote whose outcome stayed open after {}s of retries: the counts cannot be checked exactly\n",
            stats.unresolved,
            VOTE_DEADLINE.as_secs()
        ));
    }
    print!("{report}");
    let check_file = args.report_dir.join("tally-check.txt");
    std::fs::write(&check_file, &report)
        .with_context(|| format!("cannot write {}", check_file.display()))?;
    println!("reports: {}", args.report_dir.join("report.html").display());
    Ok(if exact {
        Verdict::Exact
    } else {
        Verdict::Mismatch
    })
}

const CHOICES: [&str; 2] = ["cats", "dogs"];

/// One of the poll's two options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Choice {
    Cats,
    Dogs,
}

impl Choice {
    fn random() -> Self {
        if rand::rng().random_bool(0.5) {
            Self::Cats
        } else {
            Self::Dogs
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Cats => "cats",
            Self::Dogs => "dogs",
        }
    }

    /// The option's label, as the form shows it.
    fn label(self) -> &'static str {
        match self {
            Self::Cats => "Cats",
            Self::Dogs => "Dogs",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Cats => Self::Dogs,
            Self::Dogs => Self::Cats,
        }
    }
}

/// What every goose user shares: the nodes, and what each voter last got accepted.
#[derive(Debug)]
struct Ledger {
    /// Ingest base URLs, without a trailing slash.
    nodes: Vec<String>,
    change_share: f64,
    next_voter: AtomicU64,
    /// Each voter's last accepted choice; a voter with no accepted vote is absent.
    last: Mutex<HashMap<u64, Choice>>,
    changed: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    retries: AtomicU64,
    refused: AtomicU64,
    unresolved: AtomicU64,
}

#[derive(Debug)]
struct Stats {
    voters: u64,
    changed: u64,
    accepted: u64,
    duplicates: u64,
    retries: u64,
    refused: u64,
    unresolved: u64,
}

impl Ledger {
    fn new(nodes: &[reqwest::Url], change_share: f64) -> Self {
        Self {
            nodes: nodes
                .iter()
                .map(|url| url.as_str().trim_end_matches('/').to_owned())
                .collect(),
            change_share,
            next_voter: AtomicU64::new(0),
            last: Mutex::new(HashMap::new()),
            changed: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            unresolved: AtomicU64::new(0),
        }
    }

    /// A node for the next request: any of them, as a load balancer without affinity would pick.
    fn node(&self) -> &str {
        &self.nodes[rand::rng().random_range(0..self.nodes.len())]
    }

    fn accepted(&self, voter: u64, choice: Choice, duplicate: bool) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if duplicate {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        // A poisoned lock only means another user panicked mid-insert; the map is still sound.
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(voter, choice);
    }

    /// How many voters' last accepted choice is each option.
    fn last_choices(&self) -> BTreeMap<&'static str, i64> {
        let mut counts = BTreeMap::new();
        for choice in self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            *counts.entry(choice.as_str()).or_default() += 1;
        }
        counts
    }

    fn stats(&self) -> Stats {
        Stats {
            voters: self.next_voter.load(Ordering::Relaxed),
            changed: self.changed.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            unresolved: self.unresolved.load(Ordering::Relaxed),
        }
    }
}

/// A cookie jar that can be emptied, so that one goose user can play many voters in turn.
///
/// It keeps `name=value` pairs only and sends them to every node: the nodes are one site (behind a
/// load balancer in production), and browsers do not separate cookies by port either.
#[derive(Debug, Default)]
struct VoterJar(Mutex<BTreeMap<String, String>>);

impl VoterJar {
    fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl CookieStore for VoterJar {
    fn set_cookies(
        &self,
        cookie_headers: &mut dyn Iterator<Item = &HeaderValue>,
        _url: &reqwest::Url,
    ) {
        let mut jar = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for header in cookie_headers {
            let Ok(header) = header.to_str() else {
                continue;
            };
            let pair = header.split(';').next().unwrap_or_default().trim();
            if let Some((name, value)) = pair.split_once('=') {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn cookies(&self, _url: &reqwest::Url) -> Option<HeaderValue> {
        let jar = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if jar.is_empty() {
            return None;
        }
        let line = jar
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ");
        HeaderValue::from_str(&line).ok()
    }
}

/// A goose user's own state: its cookie jar.
#[derive(Debug, Clone)]
struct Browser {
    jar: Arc<VoterJar>,
}

/// On start: give the user a client whose cookie jar it can empty between voters.
async fn own_cookie_jar(user: &mut GooseUser) -> TransactionResult {
    let jar = Arc::new(VoterJar::default());
    let builder = reqwest::Client::builder()
        .cookie_provider(Arc::clone(&jar))
        .timeout(REQUEST_TIMEOUT);
    user.set_client_builder(builder).await.map_err(Box::new)?;
    user.set_session_data(Browser { jar });
    Ok(())
}

fn voter_transaction(ledger: Arc<Ledger>) -> Transaction {
    Transaction::new(Arc::new(move |user| {
        let ledger = Arc::clone(&ledger);
        Box::pin(async move { one_voter(user, &ledger).await })
    }))
}

/// One new voter: form, vote, and maybe form again and the other vote.
async fn one_voter(user: &mut GooseUser, ledger: &Ledger) -> TransactionResult {
    let Some(browser) = user.get_session_data::<Browser>().cloned() else {
        return Err(failure(
            "the user has no cookie jar (its on-start transaction failed)",
        ));
    };
    browser.jar.clear();
    let voter = ledger.next_voter.fetch_add(1, Ordering::Relaxed);
    let first = Choice::random();
    let changes_mind = rand::rng().random_bool(ledger.change_share);

    open_form(user, ledger, None).await?;
    if !cast(user, ledger, voter, first).await? {
        return Ok(());
    }
    if changes_mind {
        ledger.changed.fetch_add(1, Ordering::Relaxed);
        // The form must show the vote just cast, whichever node serves it: the cookie carries it.
        open_form(user, ledger, Some(first)).await?;
        cast(user, ledger, voter, first.other()).await?;
    }
    Ok(())
}

fn failure(message: impl Into<String>) -> Box<TransactionError> {
    Box::new(TransactionError::Custom(message.into()))
}

/// `GET /` on some node; with `shows`, the page must show that choice as the voter's vote.
async fn open_form(
    user: &mut GooseUser,
    ledger: &Ledger,
    shows: Option<Choice>,
) -> TransactionResult {
    let url = format!("{}/", ledger.node());
    let builder = user.get_request_builder(&GooseMethod::Get, &url)?;
    let request = GooseRequest::builder()
        .set_request_builder(builder)
        .name("/")
        .expect_status_code(200)
        .build();
    let mut goose = user.request(request).await?;
    let response = match goose.response {
        Ok(response) if response.status() == StatusCode::OK => response,
        // goose has recorded the failure; the voter walks away, as one would from a broken page.
        _ => return Err(failure("the form did not load")),
    };
    if let Some(choice) = shows {
        let page = response.text().await?;
        let expected = format!("Your vote: <strong>{}</strong>", choice.label());
        if !page.contains(&expected) {
            return user.set_failure(
                &format!(
                    "the form does not show the vote just cast ({})",
                    choice.as_str()
                ),
                &mut goose.request,
                None,
                Some(&page),
            );
        }
    }
    Ok(())
}

/// The body of a `202`.
#[derive(Debug, Deserialize)]
struct Accepted {
    #[allow(dead_code)] // Parsed to check the answer's shape; the ledger needs only `duplicate`.
    event_id: String,
    #[allow(dead_code)]
    ts: serde_json::Value,
    duplicate: bool,
}

/// Votes `choice` until the outcome is settled. `Ok(true)`: accepted and recorded; `Ok(false)`:
/// refused or left open (counted in the ledger's stats either way).
async fn cast(
    user: &mut GooseUser,
    ledger: &Ledger,
    voter: u64,
    choice: Choice,
) -> Result<bool, Box<TransactionError>> {
    let key = uuid::Uuid::new_v4().simple().to_string();
    let body = serde_json::json!({ "poll": POLL, "choice": choice.as_str() });
    let deadline = Instant::now() + VOTE_DEADLINE;
    let mut pause = Duration::from_millis(100);
    let mut attempt = 0_u32;
    loop {
        if attempt > 0 {
            if Instant::now() + pause > deadline {
                // Some attempt may have been stored: this voter's ballot is unknown.
                ledger.unresolved.fetch_add(1, Ordering::Relaxed);
                return Err(failure(format!(
                    "vote still unanswered after {}s of retries",
                    VOTE_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(pause).await;
            ledger.retries.fetch_add(1, Ordering::Relaxed);
        }
        let url = format!("{}/api/votes", ledger.node());
        let builder = user
            .get_request_builder(&GooseMethod::Post, &url)?
            .header("Idempotency-Key", &key)
            .json(&body);
        let request = GooseRequest::builder()
            .set_request_builder(builder)
            .name(if attempt == 0 {
                "/api/votes"
            } else {
                "/api/votes (retry)"
            })
            .expect_status_code(202)
            .build();
        let goose = match user.request(request).await {
            Ok(goose) => goose,
            // Not sent (goose is shutting down): harmless for a first attempt only.
            Err(err) if attempt == 0 => return Err(err),
            Err(err) => {
                ledger.unresolved.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
        };
        match goose.response {
            Ok(response) if response.status() == StatusCode::ACCEPTED => {
                // Accepted: the vote is durable, even if its body cannot be read now.
                let duplicate = match response.json::<Accepted>().await {
                    Ok(accepted) => accepted.duplicate,
                    Err(err) => {
                        ledger.accepted(voter, choice, false);
                        return Err(failure(format!("a 202 with an unreadable body: {err}")));
                    }
                };
                ledger.accepted(voter, choice, duplicate);
                return Ok(true);
            }
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                // Not acknowledged, perhaps stored anyway: retry as told, with the same key.
                pause = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(pause, Duration::from_secs)
                    .min(MAX_RETRY_PAUSE);
            }
            Ok(response) if response.status().is_client_error() => {
                // Refused: the vote was not taken, and a retry would be refused the same way.
                ledger.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            // Another 5xx, a timeout or a broken connection: the outcome is open, so retry.
            Ok(_) | Err(_) => pause = (pause * 2).min(MAX_RETRY_PAUSE),
        }
        attempt += 1;
    }
}

/// tally's JSON API.
#[derive(Debug)]
struct Tally {
    client: reqwest::Client,
    url: String,
}

/// `GET /api/results/pets`.
#[derive(Debug, Clone, Deserialize)]
struct Results {
    counts: BTreeMap<String, i64>,
    total: i64,
    pending: u64,
    as_of: String,
}

impl Results {
    fn count(&self, choice: &str) -> i64 {
        self.counts.get(choice).copied().unwrap_or(0)
    }

    fn counts_line(&self) -> String {
        format!(
            "cats={}, dogs={}, total={}",
            self.count("cats"),
            self.count("dogs"),
            self.total
        )
    }
}

impl Tally {
    fn new(base: &reqwest::Url) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client for tally")?;
        let url = format!("{}/api/results/{POLL}", base.as_str().trim_end_matches('/'));
        Ok(Self { client, url })
    }

    /// The first results with nothing pending as of `after` or later: they count every vote
    /// accepted before `after`.
    async fn settled(&self, after: DateTime<Utc>, timeout: Duration) -> anyhow::Result<Results> {
        let mut backoff = Backoff::constant(SETTLE_POLL).within(timeout, "tally to settle");
        loop {
            let last = match self.fetch().await {
                Ok(results) => {
                    let as_of = DateTime::parse_from_rfc3339(&results.as_of)
                        .with_context(|| format!("tally's as_of {:?} is no time", results.as_of))?;
                    if results.pending == 0 && as_of >= after {
                        return Ok(results);
                    }
                    format!(
                        "pending {} as of {} ({})",
                        results.pending,
                        results.as_of,
                        results.counts_line()
                    )
                }
                Err(err) => format!("{err:#}"),
            };
            if backoff.wait().await.is_err() {
                bail!("{} still unsettled after {timeout:?}: {last}", self.url);
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<Results> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .with_context(|| format!("GET {}", self.url))?;
        let status = response.status();
        ensure!(
            status == StatusCode::OK,
            "GET {} answered {status}",
            self.url
        );
        response
            .json()
            .await
            .with_context(|| format!("GET {} answered no results", self.url))
    }
}
