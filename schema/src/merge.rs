//! The merge rule (design rule 3): the ballot of (poll, voter) is the event with the greatest
//! [`OrderKey`]: `(after, stored at, ts, event id)`.
//!
//! Why this order, and not the stamp first (the rule until wire version 3). A voter's later vote
//! must beat the earlier one whatever the ingest nodes' clocks say. The cookie carries the stamp
//! of the voter's last *answered* vote, and a new vote is stamped above it, so an answered vote
//! always loses to the next. But a vote whose answer never reached the voter (its node died after
//! the stream stored it, or the answer was lost) taught the cookie nothing: its stamp, from a
//! node whose clock ran ahead, could beat the voter's next vote, stamped by a node whose clock
//! is behind. The reliability harness found this three times in 19 runs, and a voter who votes
//! through two nodes 1 s apart without receiving one answer is misordered every time
//! (`shared/research/cluster-power-cut-2026-12-06.md`). The options weighed:
//! - the stream's sequence: exact within one stream, but not comparable across streams (vote
//!   partitions), and reused after a rollback of the stream;
//! - stamps capped by that order: still the node's clock decides between two votes that know the
//!   same, when the cap does not bind;
//! - a stamp that no answer confirmed loses to any later accepted vote: what this key does. Each
//!   event says what it knew (`after`, the cookie's floor). A vote that knew more wins; between
//!   votes that knew the same (the voter never learnt of the earlier one), the one the stream
//!   stored later wins, by the stream's own clock, which stamps every stored message and which
//!   no ingest node sets. The ingest stamp and the event id only break exact ties.
//!
//! A voter's cookie only moves forward, so a vote never knows less than an earlier one of the
//! same voter; and a vote made after an answer is stored after the answered vote. So the key
//! orders a voter's votes as the voter made them, lost answers included, with one clock trusted:
//! the stream's, and only between votes whose answers the voter did not see, and only across a
//! change of stream leader or across streams, where two servers' clocks meet (NTP keeps them
//! within milliseconds, far below the seconds between a lost answer and a new click).
//!
//! The rule is a maximum, so folding events in any order, with any duplicates, gives the same
//! ballots; workers, audit, replay and tests all fold with this one function.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

pub use crate::event::OrderKey;
use crate::{PollId, VoteEvent, VoterId};

/// The key a ballot is kept under; its order is the order the workers lock rows in.
pub type BallotKey = (PollId, VoterId);

/// A vote event as the stream stored it: the event, and when the stream stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVote {
    pub event: VoteEvent,
    pub stored_at: DateTime<Utc>,
}

impl StoredVote {
    pub fn new(event: VoteEvent, stored_at: DateTime<Utc>) -> Self {
        Self { event, stored_at }
    }

    /// Where it stands in its voter's order.
    pub fn order_key(&self) -> OrderKey {
        self.event.order_key(self.stored_at)
    }
}

/// Folds `vote` into `ballots`: it replaces the ballot if it sorts after it.
pub fn fold(ballots: &mut BTreeMap<BallotKey, StoredVote>, vote: StoredVote) {
    use std::collections::btree_map::Entry;
    match ballots.entry((vote.event.poll.clone(), vote.event.voter)) {
        Entry::Vacant(slot) => {
            slot.insert(vote);
        }
        Entry::Occupied(mut slot) => {
            if vote.order_key() > slot.get().order_key() {
                slot.insert(vote);
            }
        }
    }
}

/// The latest vote per (poll, voter), sorted by (poll, voter).
pub fn latest_per_voter(
    votes: impl IntoIterator<Item = StoredVote>,
) -> BTreeMap<BallotKey, StoredVote> {
    let mut ballots = BTreeMap::new();
    for vote in votes {
        fold(&mut ballots, vote);
    }
    ballots
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::{Choice, EventId, NodeId, Timestamp};

    /// A version 3 event of `voter` that knew `after`, stamped `ts`, stored at `stored` ns.
    fn vote(voter: u8, after: u64, stored: i64, ts: u64, id: u8, choice: &str) -> StoredVote {
        StoredVote::new(
            VoteEvent {
                event_id: EventId(Uuid::from_u128(u128::from(id))),
                poll: PollId::parse("pets").unwrap(),
                voter: VoterId(Uuid::from_u128(u128::from(voter))),
                choice: Choice::parse(choice).unwrap(),
                ts: Timestamp(ts),
                node: NodeId::parse("n").unwrap(),
                rev: Some(crate::Revision(1)),
                after: Some(Timestamp(after)),
                rev_hash: None,
            },
            DateTime::from_timestamp_nanos(stored),
        )
    }

    fn ballot(votes: Vec<StoredVote>) -> String {
        let ballots = latest_per_voter(votes);
        assert_eq!(ballots.len(), 1);
        ballots.values().next().unwrap().event.choice.to_string()
    }

    #[test]
    fn a_vote_that_knew_more_wins_then_the_later_stored_then_the_stamp_then_the_event_id() {
        // Knew the earlier vote (its stamp, 9): wins though stored earlier and stamped lower.
        assert_eq!(
            ballot(vec![
                vote(1, 0, 50, 9, 1, "cats"),
                vote(1, 9, 40, 5, 2, "dogs")
            ]),
            "dogs"
        );
        // Knew the same: the later stored wins, whatever the stamps.
        assert_eq!(
            ballot(vec![
                vote(1, 3, 10, 90, 1, "cats"),
                vote(1, 3, 11, 5, 2, "dogs")
            ]),
            "dogs"
        );
        // Stored at the same moment: the stamp, then the event id.
        assert_eq!(
            ballot(vec![
                vote(1, 3, 10, 5, 1, "cats"),
                vote(1, 3, 10, 6, 0, "dogs")
            ]),
            "dogs"
        );
        assert_eq!(
            ballot(vec![
                vote(1, 3, 10, 5, 1, "cats"),
                vote(1, 3, 10, 5, 2, "dogs")
            ]),
            "dogs"
        );
    }

    /// The case the harness found: the voter's answered vote (cats, stamp 100), then a change of
    /// mind through a node 10 s ahead whose answer never arrived (dogs, stamp 10,100), then cats
    /// again through a node 1 s behind, which knew only the answered vote (stamp 101). The stamps
    /// say dogs; the voter's last vote is cats.
    #[test]
    fn a_vote_whose_answer_was_lost_loses_to_the_next_vote_whatever_the_clocks() {
        let answered = vote(1, 0, 1_000, 100, 1, "cats");
        let lost = vote(1, 100, 2_000, 10_100, 2, "dogs");
        let next = vote(1, 100, 3_000, 101, 3, "cats");
        assert_eq!(ballot(vec![answered, lost, next]), "cats");
    }

    /// Distinct events (an event id names one event) with keys that collide across and within
    /// voters; the test adds duplicates as copies.
    fn votes() -> impl Strategy<Value = Vec<StoredVote>> {
        proptest::collection::vec(
            (
                0u8..5,
                0u64..5,
                0i64..5,
                0u64..20,
                prop_oneof!["cats", "dogs"],
            ),
            0..60,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(id, (voter, after, stored, ts, c))| {
                    vote(voter, after, stored, ts.max(after + 1), id as u8, &c)
                })
                .collect()
        })
    }

    proptest! {
        /// Any permutation, with any duplication, folds to the same ballots.
        #[test]
        fn the_fold_ignores_order_and_duplicates(
            votes in votes(),
            seed in any::<u64>(),
            dup in proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
        ) {
            let expected = latest_per_voter(votes.clone());
            let mut shuffled = votes.clone();
            for i in &dup {
                if !votes.is_empty() {
                    shuffled.push(i.get(&votes).clone());
                }
            }
            // A cheap deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                let j = (state % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(latest_per_voter(shuffled), expected.clone());
            // Folding the result again changes nothing.
            prop_assert_eq!(latest_per_voter(expected.values().cloned()), expected);
        }

        /// A voter's votes, made one after another as the harness's voters make them: each sent
        /// after the previous one's answer, or after giving up on it (its answer lost), through
        /// nodes whose clocks are up to 10 s apart, and stored in the order they were made. The
        /// last one is always the ballot.
        #[test]
        fn a_voters_last_vote_wins_through_skewed_nodes_and_lost_answers(
            steps in proptest::collection::vec((-10_000i64..10_000, any::<bool>()), 1..12),
        ) {
            let mut floor = 0u64;
            let mut now_ms: i64 = 1_000_000;
            let mut votes = Vec::new();
            for (i, (skew, answered)) in steps.iter().enumerate() {
                now_ms += 1;
                let clock = Timestamp::from_millis(u64::try_from(now_ms + skew).unwrap());
                let ts = clock.max(Timestamp(floor).next());
                let id = u8::try_from(i).unwrap();
                let mut v = vote(1, floor, now_ms * 1_000_000, ts.0, id, if i % 2 == 0 { "cats" } else { "dogs" });
                v.event.event_id = EventId(Uuid::from_u128(u128::from(id) + 1));
                votes.push(v);
                if *answered {
                    floor = ts.0;
                }
            }
            let last = votes.last().unwrap().event.event_id;
            let ballots = latest_per_voter(votes);
            prop_assert_eq!(ballots.values().next().unwrap().event.event_id, last);
        }
    }
}
