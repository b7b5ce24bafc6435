//! The receipt of a vote: what the answer to a vote carries, so that its voter can later check
//! that this vote is the one counted, or which later vote of theirs replaced it.
//!
//! It names the vote (its event id), whose it is (poll and voter) and where it stands in the
//! voter's order (its stamp): `pets.<voter, 32 hex digits>.<event id, 32 hex digits>.<ts>`. With
//! these, the voter's ballot alone says what became of the vote; no index of every event is
//! needed. Whoever holds a receipt can see what that voter's ballot holds now, so it is the
//! voter's to keep, like the cookie. It lets nobody vote: a vote needs the signed cookie.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::{EventId, PollId, Timestamp, VoterId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub poll: PollId,
    pub voter: VoterId,
    pub event_id: EventId,
    pub ts: Timestamp,
}

/// What a stored ballot says about a receipt's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// The ballot is this vote.
    Counted,
    /// The ballot is a later vote of the same voter.
    Superseded,
    /// The ballot is older than this vote, or there is none: not counted yet.
    NotYet,
}

impl Receipt {
    /// Where the vote stands against the voter's ballot, if any: `(after, event id)` of the
    /// ballot's event.
    ///
    /// A receipt exists because the vote's answer reached the voter, and that answer's cookie
    /// carried its stamp: every later vote of the voter knew it (`after` ≥ the receipt's `ts`),
    /// and beats it by the merge rule (`crate::merge`). A ballot that did not know it is an
    /// earlier vote, or one sent before this answer arrived (two tabs at once): the receipt
    /// then says "not yet", since it cannot tell, without the vote's stored time, whether this
    /// vote is still to be counted or lost that race.
    pub fn standing(&self, ballot: Option<(Timestamp, EventId)>) -> Standing {
        match ballot {
            Some((_, event_id)) if event_id == self.event_id => Standing::Counted,
            Some((after, _)) if after >= self.ts => Standing::Superseded,
            _ => Standing::NotYet,
        }
    }
}

impl fmt::Display for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.poll,
            self.voter.0.simple(),
            self.event_id.0.simple(),
            self.ts.0
        )
    }
}

/// Why text is not a receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a receipt: expected <poll>.<voter>.<event id>.<ts>")]
pub struct NotAReceipt;

impl FromStr for Receipt {
    type Err = NotAReceipt;

    /// Reads exactly what `Display` writes.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split('.');
        let (Some(poll), Some(voter), Some(event), Some(ts), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(NotAReceipt);
        };
        let simple = |part: &str| {
            (part.len() == 32 && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then(|| Uuid::try_parse(part).ok())
                .flatten()
                .ok_or(NotAReceipt)
        };
        // Digits without leading zeros: one spelling per stamp.
        let canonical = ts == "0"
            || (!ts.starts_with('0') && !ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit()));
        if !canonical {
            return Err(NotAReceipt);
        }
        Ok(Self {
            poll: PollId::parse(poll).map_err(|_| NotAReceipt)?,
            voter: VoterId(simple(voter)?),
            event_id: EventId(simple(event)?),
            ts: Timestamp(ts.parse().map_err(|_| NotAReceipt)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt() -> Receipt {
        Receipt {
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId(Uuid::from_u128(0x0b7e3d52_41c6_4f0e_8d2a_5e9f61c7b002)),
            event_id: EventId(Uuid::from_u128(0x6f1c2a8e_0d4b_4b8a_9a57_3c1de0f0a001)),
            ts: Timestamp(116_257_832_304_214_017),
        }
    }

    #[test]
    fn a_receipt_reads_back_exactly_as_written() {
        let text = receipt().to_string();
        assert_eq!(
            text,
            "pets.0b7e3d5241c64f0e8d2a5e9f61c7b002.6f1c2a8e0d4b4b8a9a573c1de0f0a001.116257832304214017"
        );
        assert_eq!(text.parse::<Receipt>().unwrap(), receipt());
        for bad in [
            "",
            "pets",
            &text.replace("pets", "pe ts"),
            &text.replace(".1162", ".01162"),
            &text.replace("0b7e3d52", "0B7E3D52"),
            &format!("{text}.1"),
            &text.replace(".116257832304214017", ".-1"),
        ] {
            assert_eq!(bad.parse::<Receipt>(), Err(NotAReceipt), "{bad}");
        }
    }

    #[test]
    fn a_ballot_says_whether_the_vote_counts_was_replaced_or_is_still_to_come() {
        let r = receipt();
        // Ballots as `(after, event id)`: a later vote knew this one's stamp.
        let later = (r.ts, EventId(Uuid::from_u128(1)));
        let earlier = (Timestamp(r.ts.0 - 1), EventId(Uuid::from_u128(u128::MAX)));
        assert_eq!(
            r.standing(Some((Timestamp(r.ts.0 - 5), r.event_id))),
            Standing::Counted
        );
        assert_eq!(r.standing(Some(later)), Standing::Superseded);
        assert_eq!(r.standing(Some(earlier)), Standing::NotYet);
        assert_eq!(r.standing(None), Standing::NotYet);
    }
}
