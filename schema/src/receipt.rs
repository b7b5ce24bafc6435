//! The receipt of a vote: what the answer to a vote carries, so that its voter can later check
//! that this vote is the one counted, or was replaced by a later vote of theirs.
//!
//! It names the vote (its event id), whose it is (poll and voter) and where it stands in the
//! voter's order (its stamp), and proves that an ingest node issued it:
//! `pets.<voter, 32 hex digits>.<event id, 32 hex digits>.<ts>.<tag, 32 hex digits>`. The tag is
//! the first 16 bytes of the HMAC-SHA256, keyed with the receipt key
//! (`LANDSLIDE_RECEIPT_KEY_FILE`, which ingest and tally share, and nothing else holds), of
//! `landslide-receipt-v1`, a 0 byte and the text before the tag ([`ReceiptKey`]). Tally answers
//! only receipts whose tag holds, so a made-up receipt, or one of another voter's ballot with an
//! event of one's own, gets `404` and learns nothing.
//! With the receipt's fields, the voter's ballot alone says what became of the vote; no index of
//! every event is needed. It lets nobody vote: a vote needs the signed cookie.

use std::fmt;

use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret as _, SecretSlice};
use sha2::Sha256;
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
#[error("not a receipt: expected <poll>.<voter>.<event id>.<ts>.<tag>")]
pub struct NotAReceipt;

/// Why a receipt is not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    /// Not a receipt's form: `400`.
    #[error(transparent)]
    Malformed(#[from] NotAReceipt),
    /// Well formed, but no ingest node of this site issued it (its tag does not hold): `404`.
    #[error("no such receipt: this site did not issue it")]
    NotIssued,
}

/// The key that authenticates receipts (`LANDSLIDE_RECEIPT_KEY_FILE`): at least 32 bytes, held by
/// ingest, which issues receipts, and tally, which answers them. Never logged: its bytes are a
/// [`SecretSlice`], whose `Debug` shows none.
#[derive(Debug, Clone)]
pub struct ReceiptKey(SecretSlice<u8>);

impl ReceiptKey {
    pub const MIN_LEN: usize = 32;
    /// Bytes of the tag: 128 bits, beyond any guessing by requests.
    const TAG_BYTES: usize = 16;

    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, String> {
        let key = key.into();
        if key.len() < Self::MIN_LEN {
            return Err(format!(
                "the receipt key must be at least {} bytes long (it authenticates receipts; \
                 ingest and tally share it)",
                Self::MIN_LEN
            ));
        }
        Ok(Self(key.into()))
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"landslide-receipt-v1\0");
        mac.update(body.as_bytes());
        mac
    }

    /// The receipt's text, tag included: what the voter gets.
    pub fn issue(&self, receipt: &Receipt) -> String {
        let body = receipt.to_string();
        let tag = self.mac(&body).finalize().into_bytes();
        format!("{body}.{}", crate::hex::encode(&tag[..Self::TAG_BYTES]))
    }

    /// The receipt `text` names, if this key issued it (compared in constant time).
    pub fn open(&self, text: &str) -> Result<Receipt, Unanswered> {
        let (receipt, body, tag) = Receipt::split(text)?;
        self.mac(body)
            .verify_truncated_left(&tag)
            .map_err(|_| Unanswered::NotIssued)?;
        Ok(receipt)
    }
}

impl Receipt {
    /// What a receipt's text names, its tag unchecked: for `landslide verify`, which finds the
    /// vote in a published record and holds no key. Anything that answers with the ballot must
    /// use [`ReceiptKey::open`].
    pub fn read_unauthenticated(text: &str) -> Result<Self, NotAReceipt> {
        Self::split(text).map(|(receipt, _, _)| receipt)
    }

    /// The receipt, the text its tag covers, and the tag (32 lowercase hex digits in the text),
    /// not checked against a key.
    fn split(text: &str) -> Result<(Self, &str, [u8; ReceiptKey::TAG_BYTES]), NotAReceipt> {
        let (body, tag) = text.rsplit_once('.').ok_or(NotAReceipt)?;
        let tag = crate::hex::decode(tag).ok_or(NotAReceipt)?;
        Ok((Self::read_body(body)?, body, tag))
    }

    /// Reads exactly what `Display` writes.
    fn read_body(text: &str) -> Result<Self, NotAReceipt> {
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
        let key = ReceiptKey::new("a receipt key of thirty-two bytes or more").unwrap();
        let issued = key.issue(&receipt());
        assert_eq!(issued.len(), text.len() + 33);
        assert_eq!(key.open(&issued), Ok(receipt()));
        assert_eq!(Receipt::read_unauthenticated(&issued), Ok(receipt()));
        for bad in [
            String::new(),
            "pets".to_owned(),
            text.clone(),
            issued.replace("pets", "pe ts"),
            issued.replace(".1162", ".01162"),
            issued.replace("0b7e3d52", "0B7E3D52"),
            format!("{issued}.1"),
            format!("{issued}0"),
            issued.replace(".116257832304214017", ".-1"),
        ] {
            assert_eq!(
                key.open(&bad),
                Err(Unanswered::Malformed(NotAReceipt)),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_receipt_the_key_issued_is_answered() {
        let key = ReceiptKey::new("a receipt key of thirty-two bytes or more").unwrap();
        let other = ReceiptKey::new("another receipt key, also 32 bytes or more").unwrap();
        let issued = key.issue(&receipt());
        assert_eq!(other.open(&issued), Err(Unanswered::NotIssued));
        // Another event (or stamp) of the same voter under the genuine tag.
        let forged = issued.replace("6f1c2a8e", "6f1c2a8f");
        assert_eq!(key.open(&forged), Err(Unanswered::NotIssued));
        let zero_tag = format!("{}.{}", receipt(), "0".repeat(32));
        assert_eq!(key.open(&zero_tag), Err(Unanswered::NotIssued));
        assert!(ReceiptKey::new("short").is_err());
        assert!(!format!("{key:?}").contains("thirty"));
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
