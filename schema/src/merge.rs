//! The merge rule (design rule 3): the ballot of (poll, voter) is the event with the greatest
//! `(ts, event id)`. The rule is a maximum, so folding events in any order, with any duplicates,
//! gives the same ballots; workers, audit and tests all fold with this one function.

use std::collections::BTreeMap;

use crate::{PollId, VoteEvent, VoterId};

/// The key a ballot is kept under; its order is the order the workers lock rows in.
pub type BallotKey = (PollId, VoterId);

/// Folds `event` into `ballots`: it replaces the ballot if it sorts after it.
pub fn fold(ballots: &mut BTreeMap<BallotKey, VoteEvent>, event: VoteEvent) {
    use std::collections::btree_map::Entry;
    match ballots.entry((event.poll.clone(), event.voter)) {
        Entry::Vacant(slot) => {
            slot.insert(event);
        }
        Entry::Occupied(mut slot) => {
            if event.order_key() > slot.get().order_key() {
                slot.insert(event);
            }
        }
    }
}

/// The latest event per (poll, voter), sorted by (poll, voter).
pub fn latest_per_voter(
    events: impl IntoIterator<Item = VoteEvent>,
) -> BTreeMap<BallotKey, VoteEvent> {
    let mut ballots = BTreeMap::new();
    for event in events {
        fold(&mut ballots, event);
    }
    ballots
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::{Choice, EventId, NodeId, Timestamp};

    fn event(voter: u8, ts: u64, id: u8, choice: &str) -> VoteEvent {
        VoteEvent {
            event_id: EventId(Uuid::from_u128(u128::from(id))),
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId(Uuid::from_u128(u128::from(voter))),
            choice: Choice::parse(choice).unwrap(),
            ts: Timestamp(ts),
            node: NodeId::parse("n").unwrap(),
            rev: None,
        }
    }

    #[test]
    fn the_later_stamp_wins_and_ties_break_on_the_event_id() {
        let ballots = latest_per_voter([
            event(1, 5, 1, "dogs"),
            event(1, 9, 0, "cats"),
            event(1, 9, 2, "dogs"),
        ]);
        assert_eq!(ballots.len(), 1);
        assert_eq!(ballots.values().next().unwrap().choice.as_str(), "dogs");
    }

    /// Distinct events (an event id names one event) with stamps that collide across and within
    /// voters; the test adds duplicates as copies.
    fn events() -> impl Strategy<Value = Vec<VoteEvent>> {
        proptest::collection::vec((0u8..5, 0u64..20, prop_oneof!["cats", "dogs"]), 0..60).prop_map(
            |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(id, (voter, ts, c))| event(voter, ts, id as u8, &c))
                    .collect()
            },
        )
    }

    proptest! {
        /// Any permutation, with any duplication, folds to the same ballots.
        #[test]
        fn the_fold_ignores_order_and_duplicates(
            events in events(),
            seed in any::<u64>(),
            dup in proptest::collection::vec(any::<proptest::sample::Index>(), 0..20),
        ) {
            let expected = latest_per_voter(events.clone());
            let mut shuffled = events.clone();
            for i in &dup {
                if !events.is_empty() {
                    shuffled.push(i.get(&events).clone());
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
    }
}
