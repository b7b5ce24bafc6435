//! The seeded load: voters with their own cookie, casting one to N votes each over the ingest
//! nodes, retrying refused votes, and the model of what each of them was told.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use landslide_patience::Backoff;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, RngCore as _};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tokio::sync::watch;
use uuid::Uuid;

/// The name of the voter cookie that ingest sets.
const COOKIE: &str = "landslide_voter";
/// The poll every vote goes to.
pub const POLL: &str = "pets";

/// One vote a voter will cast.
#[derive(Debug, Clone)]
pub struct PlannedVote {
    pub choice: &'static str,
    /// The `Idempotency-Key` sent with it (and with each retry of it), if any.
    pub key: Option<String>,
    /// Whether the voter submits it a second time once accepted: a double click.
    pub again: bool,
}

/// One voter's votes, in the order cast; consecutive votes go to different ingest nodes.
#[derive(Debug, Clone)]
pub struct VoterPlan {
    pub first_node: usize,
    pub votes: Vec<PlannedVote>,
}

/// Every voter's votes, drawn from a seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub voters: Vec<VoterPlan>,
}

impl Plan {
    pub fn generate(rng: &mut ChaCha8Rng, voters: usize, max_votes: usize, nodes: usize) -> Self {
        let options = ["cats", "dogs"];
        let voters = (0..voters)
            .map(|_| {
                let count = rng.random_range(1..=max_votes.max(1));
                let votes = (0..count)
                    .map(|_| {
                        let key = rng.random_bool(0.8).then(|| {
                            Uuid::from_u128(
                                u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
                            )
                            .to_string()
                        });
                        PlannedVote {
                            choice: options.choose(rng).copied().unwrap_or("cats"),
                            key,
                            again: rng.random_bool(0.05),
                        }
                    })
                    .collect();
                VoterPlan {
                    first_node: rng.random_range(0..nodes.max(1)),
                    votes,
                }
            })
            .collect();
        Self { voters }
    }

    /// Submissions the plan makes, not counting retries.
    pub fn offered(&self) -> usize {
        self.voters
            .iter()
            .flat_map(|v| &v.votes)
            .map(|v| if v.again { 2 } else { 1 })
            .sum()
    }
}

/// A vote that ingest accepted, as the voter was told.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub event_id: Uuid,
    pub choice: &'static str,
}

/// What one voter was told, in order.
#[derive(Debug, Default)]
pub struct VoterOutcome {
    /// The voter id inside the cookie, once one was set.
    pub voter: Option<Uuid>,
    pub accepted: Vec<Accepted>,
    /// A vote without a key went unanswered after it may have been sent: it may be stored, and
    /// under an event id the voter never learnt.
    pub ambiguous: bool,
    /// The choices of votes sent with neither a cookie nor a key that went unanswered after
    /// they may have been sent. Each may be stored under a voter id that ingest made up for
    /// it and nobody learnt (the answer that carried it is lost), so the voter's retry is a
    /// new voter: a ballot no voter can claim, whose choice is one of these.
    pub unlinked: Vec<&'static str>,
    /// What went wrong in a way the harness does not expect (a 4xx, a changed voter id, a vote
    /// never accepted).
    pub errors: Vec<String>,
}

impl VoterOutcome {
    pub fn last(&self) -> Option<&Accepted> {
        self.accepted.last()
    }
}

/// Running totals of the load.
#[derive(Debug, Default)]
pub struct Counters {
    pub voters_started: AtomicUsize,
    pub attempts: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub accepted_after_refusal: AtomicU64,
    pub unanswered: AtomicU64,
    /// Unanswered attempts that may have reached ingest (not a refused connection).
    pub unanswered_sent: AtomicU64,
    /// The first few errors of unanswered attempts that may have been sent, for the report.
    pub unanswered_samples: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Deserialize)]
struct ApiAccepted {
    event_id: Uuid,
    duplicate: bool,
}

enum Attempt {
    Accepted(ApiAccepted),
    Refused {
        retry_after: Duration,
    },
    /// No answer: `maybe_sent` unless the connection was refused.
    Unanswered {
        maybe_sent: bool,
        error: String,
    },
    Rejected {
        status: u16,
        body: String,
    },
}

/// Sends the plan's votes, many voters at once.
#[derive(Debug, Clone)]
pub struct Driver {
    client: reqwest::Client,
    nodes: Vec<String>,
    /// Voters voting at once (and idle connections kept per node).
    concurrency: usize,
    pub counters: Arc<Counters>,
    /// How long one vote may take, retries included, before the voter gives up (a finding).
    pub give_up: Duration,
    /// The longest pause before a retry after a 503 (shorter than `Retry-After`, to press on).
    pub max_retry_pause: Duration,
}

impl Driver {
    pub fn new(nodes: Vec<String>, concurrency: usize) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(concurrency)
            .build()?;
        Ok(Self {
            client,
            nodes,
            concurrency,
            counters: Arc::default(),
            give_up: Duration::from_secs(180),
            max_retry_pause: Duration::from_millis(500),
        })
    }

    /// Runs every voter, at most `concurrency` at once, starting voter `i` only once
    /// `allowed` lets `i` voters start (the fault schedule holds the load back with it).
    pub async fn run(&self, plan: &Plan, allowed: watch::Receiver<usize>) -> Vec<VoterOutcome> {
        use futures::StreamExt as _;
        let voters = futures::stream::iter(plan.voters.iter().enumerate())
            .then(|(i, voter)| {
                let mut allowed = allowed.clone();
                async move {
                    // A closed channel means no more holding back.
                    let _ = allowed.wait_for(|&n| i < n).await;
                    self.counters.voters_started.fetch_add(1, Ordering::Relaxed);
                    voter
                }
            })
            .map(|voter| self.voter(voter))
            .buffered(self.concurrency.max(1));
        voters.collect().await
    }

    async fn voter(&self, plan: &VoterPlan) -> VoterOutcome {
        let mut outcome = VoterOutcome::default();
        let mut cookie: Option<String> = None;
        let mut node = plan.first_node;
        for vote in &plan.votes {
            let submissions = if vote.again { 2 } else { 1 };
            for submission in 0..submissions {
                match self.cast(&mut cookie, &mut node, vote, &mut outcome).await {
                    Ok(accepted) => {
                        if submission == 1
                            && vote.key.is_some()
                            && outcome.last().map(|a| a.event_id) != Some(accepted.event_id)
                        {
                            outcome.errors.push(format!(
                                "a second submission with the same Idempotency-Key got another event id ({})",
                                accepted.event_id
                            ));
                        }
                        outcome.accepted.push(accepted);
                    }
                    Err(error) => {
                        outcome.errors.push(error);
                        return outcome;
                    }
                }
                // The next submission goes to another node.
                node = (node + 1) % self.nodes.len();
            }
        }
        outcome
    }

    /// Casts one vote, retrying with the same key until it is accepted.
    async fn cast(
        &self,
        cookie: &mut Option<String>,
        node: &mut usize,
        vote: &PlannedVote,
        outcome: &mut VoterOutcome,
    ) -> Result<Accepted, String> {
        let started = Instant::now();
        // After an unanswered try; a refusal waits for its Retry-After instead, which is the
        // rate limiter's schedule, not ours. Both count against `give_up` below.
        let mut unanswered = Backoff::constant(Duration::from_millis(100));
        let mut refused = false;
        loop {
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            match self.attempt(*node, cookie, vote, outcome).await {
                Attempt::Accepted(accepted) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if accepted.duplicate {
                        self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    if refused {
                        self.counters
                            .accepted_after_refusal
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Accepted {
                        event_id: accepted.event_id,
                        choice: vote.choice,
                    });
                }
                Attempt::Refused { retry_after } => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    refused = true;
                    tokio::time::sleep(retry_after.min(self.max_retry_pause)).await;
                }
                Attempt::Unanswered { maybe_sent, error } => {
                    self.counters.unanswered.fetch_add(1, Ordering::Relaxed);
                    if maybe_sent {
                        self.counters
                            .unanswered_sent
                            .fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut samples) = self.counters.unanswered_samples.lock()
                            && samples.len() < 3
                        {
                            samples.push(error.clone());
                        }
                    }
                    if maybe_sent && vote.key.is_none() {
                        outcome.ambiguous = true;
                        if cookie.is_none() {
                            outcome.unlinked.push(vote.choice);
                        }
                    }
                    tracing::debug!(%error, "vote unanswered");
                    unanswered.pause().await;
                }
                Attempt::Rejected { status, body } => {
                    return Err(format!("a valid vote was rejected with {status}: {body}"));
                }
            }
            if started.elapsed() > self.give_up {
                return Err(format!(
                    "a vote was not accepted within {:?} of retries",
                    self.give_up
                ));
            }
            // Like a client behind a load balancer: the retry may reach another node.
            *node = (*node + 1) % self.nodes.len();
        }
    }

    async fn attempt(
        &self,
        node: usize,
        cookie: &mut Option<String>,
        vote: &PlannedVote,
        outcome: &mut VoterOutcome,
    ) -> Attempt {
        let mut request = self
            .client
            .post(format!("{}/api/votes", self.nodes[node]))
            .json(&serde_json::json!({ "poll": POLL, "choice": vote.choice }));
        if let Some(key) = &vote.key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(value) = cookie.as_deref() {
            request = request.header(reqwest::header::COOKIE, format!("{COOKIE}={value}"));
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Attempt::Unanswered {
                    maybe_sent: !error.is_connect(),
                    error: error_chain(&error),
                };
            }
        };
        if let Some(value) = set_cookie(&response) {
            match voter_in_cookie(&value) {
                Some(voter) if outcome.voter.is_none_or(|known| known == voter) => {
                    outcome.voter = Some(voter);
                }
                Some(voter) => outcome.errors.push(format!(
                    "the voter id in the cookie changed from {:?} to {voter}",
                    outcome.voter
                )),
                None => outcome.errors.push(format!(
                    "ingest set a cookie the harness cannot read: {value}"
                )),
            }
            *cookie = Some(value);
        }
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => {
                return Attempt::Unanswered {
                    maybe_sent: true,
                    error: error_chain(&error),
                };
            }
        };
        match status.as_u16() {
            202 => match serde_json::from_slice::<ApiAccepted>(&body) {
                Ok(accepted) => Attempt::Accepted(accepted),
                Err(e) => Attempt::Rejected {
                    status: 202,
                    body: format!(
                        "unreadable answer ({e}): {}",
                        String::from_utf8_lossy(&body)
                    ),
                },
            },
            503 => match retry_after {
                Some(secs) => Attempt::Refused {
                    retry_after: Duration::from_secs(secs),
                },
                None => Attempt::Rejected {
                    status: 503,
                    body: "503 without Retry-After".to_owned(),
                },
            },
            status => Attempt::Rejected {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
        }
    }
}

/// An error with its sources: reqwest's own message rarely says what happened on the wire.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The value of the voter cookie that a response sets, if any.
fn set_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.strip_prefix(COOKIE)?.strip_prefix('='))
        .map(str::to_owned)
        .next_back()
}

/// The voter id inside a signed voter cookie: percent-encoded, a 44-character base64 HMAC tag,
/// then the payload of `landslide_schema::cookie` (the plain name's, which the harness's nodes
/// write).
fn voter_in_cookie(value: &str) -> Option<Uuid> {
    let decoded = percent_decode(value)?;
    let payload = decoded.get(44..)?;
    landslide_schema::cookie::VoterCookie::parse(payload, landslide_schema::cookie::Binding::Plain)
        .map(|cookie| cookie.voter.0)
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Messages no ingest node would publish, injected straight into the stream; each must end up
/// in the dead-letter stream.
pub fn poison(rng: &mut ChaCha8Rng, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let id = Uuid::from_u128(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()));
            let event = |poll: &str, choice: &str| {
                serde_json::json!({
                    "v": 1, "event_id": id, "poll": poll, "voter": id, "choice": choice,
                    "ts": 1u64 << 40, "node": "chaos"
                })
                .to_string()
                .into_bytes()
            };
            match i % 5 {
                0 => format!("\u{fffd} not a vote {id}").into_bytes(),
                1 => format!(r#"{{"v":2,"event_id":"{id}"}}"#).into_bytes(),
                2 => event("no-such-poll", "cats"),
                3 => event(POLL, "hamsters"),
                _ => {
                    let mut bytes = event(POLL, "cats");
                    bytes.truncate(bytes.len() / 2);
                    bytes.extend_from_slice(id.to_string().as_bytes());
                    bytes
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_voter_id_is_read_from_a_percent_encoded_signed_cookie() {
        let cookie = "Yz7GjDhkDm2xv4M6Jbj1y4Mdbxed%2FeH8Q+G80KgTeXQ%3D1.bd2b51f6378d8950a933ce22abd37f5c.117670951078395904.pets~cats";
        assert_eq!(
            voter_in_cookie(cookie),
            Some(Uuid::from_u128(0xbd2b51f6378d8950a933ce22abd37f5c))
        );
        assert_eq!(voter_in_cookie("short"), None);
        assert_eq!(voter_in_cookie("%zz"), None);
    }
}
