//! End to end: voters through several ingest nodes, a share of them changing their minds on
//! another node with the cookie the first answer set, as fast as the nodes answer. The caller
//! times the run until the workers have nothing pending and checks the tally against the final
//! choices recorded here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::load;

/// What to send.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Votes in all, first votes and changes of mind together.
    pub votes: u64,
    /// The share of voters who vote a second time, for the other option.
    pub change_share: f64,
    /// Keep-alive connections to each node.
    pub connections_per_node: usize,
}

impl Plan {
    /// Voters needed for `votes` votes when `change_share` of them vote twice.
    pub fn voters(&self) -> u64 {
        (self.votes as f64 / (1.0 + self.change_share)).round() as u64
    }

    /// Whether voter `i` changes their mind: spread evenly, exactly `change_share` of them.
    fn changes(&self, i: u64) -> bool {
        let share = |n: u64| (n as f64 * self.change_share).floor();
        share(i + 1) > share(i)
    }
}

/// How the voters fared.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Voted {
    /// Votes answered `202`.
    pub accepted: u64,
    pub voters: u64,
    /// Voters whose second vote, on another node, was accepted.
    pub changed: u64,
    /// Votes not answered `202` (their voters' ballots are then unknown).
    pub failed: u64,
    /// Each voter's last accepted choice, counted: `[cats, dogs]`.
    pub finals: [u64; 2],
}

const CHOICES: [&str; 2] = ["cats", "dogs"];

fn body(choice: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"poll":"pets","choice":"{}"}}"#,
        CHOICES[choice]
    ))
}

/// Sends `plan`'s voters to `nodes` and returns what was accepted.
pub async fn run(nodes: &[SocketAddr], plan: Plan) -> anyhow::Result<Voted> {
    anyhow::ensure!(!nodes.is_empty(), "no ingest node to vote on");
    let next_voter = Arc::new(AtomicU64::new(0));
    let voters = plan.voters();
    let tasks: Vec<_> = (0..plan.connections_per_node * nodes.len())
        .map(|_| {
            let next_voter = next_voter.clone();
            let nodes = nodes.to_vec();
            tokio::spawn(async move { voter_loop(&nodes, plan, voters, &next_voter).await })
        })
        .collect();
    let mut voted = Voted {
        voters,
        ..Voted::default()
    };
    for task in tasks {
        let part = task.await?;
        voted.accepted += part.accepted;
        voted.changed += part.changed;
        voted.failed += part.failed;
        voted.finals[0] += part.finals[0];
        voted.finals[1] += part.finals[1];
    }
    Ok(voted)
}

/// One connection to each node; takes voters one after the other until none are left.
async fn voter_loop(nodes: &[SocketAddr], plan: Plan, voters: u64, next: &AtomicU64) -> Voted {
    let mut senders: Vec<Option<load::Sender>> = nodes.iter().map(|_| None).collect();
    let bodies = [body(0), body(1)];
    let mut voted = Voted::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= voters {
            return voted;
        }
        let first_choice = (i % 2) as usize;
        let first_node = (i % nodes.len() as u64) as usize;
        let answer = vote(&mut senders, nodes, first_node, &bodies[first_choice], None).await;
        let Some(cookie) = answer else {
            voted.failed += 1;
            continue;
        };
        voted.accepted += 1;
        let mut last = first_choice;
        if plan.changes(i) {
            // The change of mind goes to the next node, carrying the first answer's cookie: its
            // stamp must beat the first vote's whatever the two nodes' clocks say.
            let node = (first_node + 1) % nodes.len();
            let other = 1 - first_choice;
            if vote(&mut senders, nodes, node, &bodies[other], Some(&cookie))
                .await
                .is_some()
            {
                voted.accepted += 1;
                voted.changed += 1;
                last = other;
            } else {
                // The change may or may not have been stored: this voter's ballot is unknown.
                voted.failed += 1;
                continue;
            }
        }
        voted.finals[last] += 1;
    }
}

/// One vote on `nodes[node]`; the voter cookie to send next when it was accepted.
async fn vote(
    senders: &mut [Option<load::Sender>],
    nodes: &[SocketAddr],
    node: usize,
    body: &Bytes,
    cookie: Option<&hyper::header::HeaderValue>,
) -> Option<hyper::header::HeaderValue> {
    if senders[node].is_none() {
        senders[node] = load::connect(nodes[node]).await.ok();
    }
    let sender = senders[node].as_mut()?;
    let answer = load::post(sender, nodes[node], "/api/votes", body.clone(), cookie).await;
    match answer {
        Some(answer) if answer.status == 202 => {
            // `landslide_voter=<value>; HttpOnly; ...`: the part a browser sends back.
            let set_cookie = answer.set_cookie?;
            let pair = set_cookie.to_str().ok()?.split(';').next()?.to_owned();
            hyper::header::HeaderValue::from_str(&pair).ok()
        }
        Some(_) => None,
        None => {
            senders[node] = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_share_of_voters_change_their_minds() {
        let plan = Plan {
            votes: 1_300,
            change_share: 0.3,
            connections_per_node: 1,
        };
        assert_eq!(plan.voters(), 1_000);
        let changers = (0..plan.voters()).filter(|&i| plan.changes(i)).count();
        assert_eq!(changers, 300);
    }
}
