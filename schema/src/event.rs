//! The vote event on the wire: versioned JSON, readable in `nats stream view`.
//!
//! Version 4 is an object with exactly these fields, in this order when we write it:
//!
//! ```json
//! {"v":4,"event_id":"…","poll":"pets","voter":"…","choice":"cats","ts":116…,"node":"web01","rev":3,"after":116…,"rev_hash":"9f86…"}
//! ```
//!
//! `rev` is the revision of the poll definitions the ingest node accepted the vote under
//! ([`crate::poll::Revision`]), and `rev_hash` the SHA-256 of that revision's text as the node
//! read it ([`crate::poll::RevisionHash`]): every role judges the vote by that exact text. `after`
//! is the stamp of the voter's last vote whose answer reached them (the floor their cookie
//! carried; 0 for a voter without one), always below `ts`: the merge rule orders a voter's votes
//! by it first ([`crate::merge`]). Version 3 is the same without `rev_hash`, version 2 without
//! `after` either, and version 1 without `rev`: all still read, never written by an ingest node
//! of this release. An event without `after` orders as if `after` were its own `ts` (the rule of
//! the releases that wrote them), and a version 1 event is judged by the latest revision.
//!
//! Decoding rejects any other version, a missing field, and an identifier the newtypes refuse;
//! unknown extra fields are ignored so that a later minor addition does not dead-letter votes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::poll::{Revision, RevisionHash};
use crate::{Choice, EventId, NodeId, PollId, Timestamp, VoterId};

/// The wire version this build writes for an event that names its revision (by number and hash)
/// and what it follows.
pub const WIRE_VERSION: u32 = 4;
/// The version without `rev_hash`, still read.
pub const WIRE_VERSION_3: u32 = 3;
/// The version without `after`, still read (and written for an event without one).
pub const WIRE_VERSION_2: u32 = 2;
/// The version without a revision, still read.
pub const WIRE_VERSION_1: u32 = 1;

/// One accepted vote, as stamped by an ingest node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteEvent {
    pub event_id: EventId,
    pub poll: PollId,
    pub voter: VoterId,
    pub choice: Choice,
    pub ts: Timestamp,
    pub node: NodeId,
    /// The revision of the poll definitions the vote was accepted under; `None` for an event of
    /// wire version 1.
    pub rev: Option<Revision>,
    /// The stamp of the voter's last vote whose answer reached them, which this vote follows
    /// (0: none); always below `ts`. `None` for an event of wire version 1 or 2.
    pub after: Option<Timestamp>,
    /// The hash of the text of revision `rev` that the ingest node accepted the vote under.
    /// `None` for an event of wire version 1 to 3.
    pub rev_hash: Option<RevisionHash>,
}

/// Why bytes are not a vote event. The message is meant for a dead-letter reason header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported vote event version {0}")]
    UnsupportedVersion(u64),
    /// A version newer than this build writes: an ingest node of a later release made it, and
    /// only a later release can judge it. Never a dead letter (see [`DecodeError::is_newer`]).
    #[error("vote event version {0} is newer than this release reads (version {WIRE_VERSION})")]
    NewerVersion(u64),
    #[error("malformed vote event: {0}")]
    Malformed(String),
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    v: u32,
    event_id: EventId,
    #[serde(borrow)]
    poll: std::borrow::Cow<'a, str>,
    voter: VoterId,
    #[serde(borrow)]
    choice: std::borrow::Cow<'a, str>,
    ts: Timestamp,
    #[serde(borrow)]
    node: std::borrow::Cow<'a, str>,
    /// Required from version 2, absent in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rev: Option<Revision>,
    /// Required from version 3, absent before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<Timestamp>,
    /// Required in version 4, absent before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rev_hash: Option<RevisionHash>,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u64,
}

impl VoteEvent {
    /// Where this event, stored by the stream at `stored_at`, stands in its voter's order
    /// ([`crate::merge`]): the greatest key is the voter's ballot.
    ///
    /// An event of wire version 1 or 2 (no `after`) orders as the releases that wrote it ordered
    /// it, by `(ts, event id)`: its key is `(ts, 0, ts, event id)`, whenever it was stored. A later
    /// event that knew it (`after` ≥ its `ts`) still beats it.
    pub fn order_key(&self, stored_at: DateTime<Utc>) -> OrderKey {
        OrderKey::of(self.after, self.ts, self.event_id, stored_at)
    }

    /// The event's JSON encoding: version [`WIRE_VERSION`]; 3 when it has no `rev_hash`, 2 when
    /// it has no `after` either, 1 when it names no revision (each older version is written
    /// without the fields it lacks).
    pub fn encode(&self) -> Vec<u8> {
        let (v, after, rev_hash) = match (self.rev, self.after, self.rev_hash) {
            (Some(_), Some(after), Some(hash)) => (WIRE_VERSION, Some(after), Some(hash)),
            (Some(_), Some(after), None) => (WIRE_VERSION_3, Some(after), None),
            (Some(_), None, _) => (WIRE_VERSION_2, None, None),
            (None, _, _) => (WIRE_VERSION_1, None, None),
        };
        let wire = Wire {
            v,
            event_id: self.event_id,
            poll: self.poll.as_str().into(),
            voter: self.voter,
            choice: self.choice.as_str().into(),
            ts: self.ts,
            node: self.node.as_str().into(),
            rev: self.rev,
            after,
            rev_hash,
        };
        // Serializing a struct of strings, UUIDs and integers into a Vec cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Decodes an event; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match serde_json::from_slice::<Wire<'_>>(bytes) {
            Ok(wire) if KNOWN_VERSIONS.contains(&wire.v) => {
                let rev = match (wire.v, wire.rev) {
                    // A version 1 event never had one: a stray field is ignored like any other.
                    (WIRE_VERSION_1, _) => None,
                    (v, None) => {
                        return Err(malformed(format!("version {v} without the field `rev`")));
                    }
                    (_, rev) => rev,
                };
                let after = match (wire.v, wire.after) {
                    // Older versions never had one: a stray field is ignored.
                    (WIRE_VERSION_1 | WIRE_VERSION_2, _) => None,
                    (v, None) => {
                        return Err(malformed(format!("version {v} without the field `after`")));
                    }
                    // No ingest node follows a stamp it does not beat.
                    (_, Some(after)) if after >= wire.ts => {
                        return Err(malformed("`after` is not below `ts`"));
                    }
                    (_, after) => after,
                };
                let rev_hash = match (wire.v, wire.rev_hash) {
                    (WIRE_VERSION, None) => {
                        return Err(malformed("version 4 without the field `rev_hash`"));
                    }
                    (WIRE_VERSION, hash) => hash,
                    // Older versions never had one: a stray field is ignored.
                    _ => None,
                };
                Ok(Self {
                    event_id: wire.event_id,
                    poll: PollId::parse(wire.poll).map_err(malformed)?,
                    voter: wire.voter,
                    choice: Choice::parse(wire.choice).map_err(malformed)?,
                    ts: wire.ts,
                    node: NodeId::parse(wire.node).map_err(malformed)?,
                    rev,
                    after,
                    rev_hash,
                })
            }
            Ok(wire) => Err(unsupported(wire.v.into())),
            // A later version may have another shape: name the version rather than the shape.
            Err(err) => match serde_json::from_slice::<VersionProbe>(bytes) {
                Ok(probe) if !KNOWN_VERSIONS.iter().any(|v| u64::from(*v) == probe.v) => {
                    Err(unsupported(probe.v))
                }
                _ => Err(malformed(err)),
            },
        }
    }
}

/// Every version this build reads.
const KNOWN_VERSIONS: [u32; 4] = [WIRE_VERSION_1, WIRE_VERSION_2, WIRE_VERSION_3, WIRE_VERSION];

/// The order of one voter's events (design rule 2, [`crate::merge`]): the greatest is the voter's
/// ballot. Compared field by field, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey {
    /// What the vote knew: the stamp of the voter's last answered vote. A vote made after an
    /// answer beats the answered vote, whatever either node's clock said.
    pub after: Timestamp,
    /// When the stream stored it (nanoseconds since the Unix epoch, by the stream leader's
    /// clock): between votes that knew the same, the later accepted wins.
    pub stored_ns: i64,
    /// The ingest node's stamp, then the event id: ties only.
    pub ts: Timestamp,
    pub event_id: EventId,
}

impl OrderKey {
    /// The key of an event that knew `after` (`None` for wire versions 1 and 2), stamped `ts`,
    /// stored at `stored_at`: see [`VoteEvent::order_key`].
    pub fn of(
        after: Option<Timestamp>,
        ts: Timestamp,
        event_id: EventId,
        stored_at: DateTime<Utc>,
    ) -> Self {
        let (after, stored_ns) = match after {
            Some(after) => (after, stored_at.timestamp_nanos_opt().unwrap_or(i64::MAX)),
            None => (ts, 0),
        };
        Self {
            after,
            stored_ns,
            ts,
            event_id,
        }
    }
}

impl DecodeError {
    /// Whether a later release can read the event: during a rolling upgrade, ingest nodes of the
    /// new release write a version the old workers do not know. Such an event was accepted, so
    /// it must wait for a worker that reads it, never go to the dead letters.
    pub fn is_newer(&self) -> bool {
        matches!(self, Self::NewerVersion(_))
    }
}

/// The error for version `v`, which this build does not read.
fn unsupported(v: u64) -> DecodeError {
    if v > u64::from(WIRE_VERSION) {
        DecodeError::NewerVersion(v)
    } else {
        DecodeError::UnsupportedVersion(v)
    }
}

fn malformed(err: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(err.to_string())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    fn example() -> VoteEvent {
        VoteEvent {
            event_id: EventId(Uuid::from_u128(0x6f1c2a8e_0d4b_4b8a_9a57_3c1de0f0a001)),
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId(Uuid::from_u128(0x0b7e3d52_41c6_4f0e_8d2a_5e9f61c7b002)),
            choice: Choice::parse("cats").unwrap(),
            ts: Timestamp(116_257_832_304_214_017),
            node: NodeId::parse("web01").unwrap(),
            rev: None,
            after: None,
            rev_hash: None,
        }
    }

    fn example_v2() -> VoteEvent {
        VoteEvent {
            rev: Some(Revision(3)),
            ..example()
        }
    }

    fn example_v3() -> VoteEvent {
        VoteEvent {
            after: Some(Timestamp(116_257_832_204_214_017)),
            ..example_v2()
        }
    }

    fn example_v4() -> VoteEvent {
        VoteEvent {
            rev_hash: Some(RevisionHash::of("[[poll]]\n")),
            ..example_v3()
        }
    }

    const GOLDEN: &str = r#"{"v":1,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01"}"#;
    const GOLDEN_V2: &str = r#"{"v":2,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01","rev":3}"#;
    const GOLDEN_V3: &str = r#"{"v":3,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01","rev":3,"after":116257832204214017}"#;
    const GOLDEN_V4: &str = r#"{"v":4,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01","rev":3,"after":116257832204214017,"rev_hash":"REVHASH"}"#;

    fn golden_v4() -> String {
        GOLDEN_V4.replace("REVHASH", &RevisionHash::of("[[poll]]\n").to_string())
    }

    #[test]
    fn encoding_is_stable_to_the_byte() {
        assert_eq!(String::from_utf8(example().encode()).unwrap(), GOLDEN);
        assert_eq!(String::from_utf8(example_v2().encode()).unwrap(), GOLDEN_V2);
        assert_eq!(String::from_utf8(example_v3().encode()).unwrap(), GOLDEN_V3);
        assert_eq!(
            String::from_utf8(example_v4().encode()).unwrap(),
            golden_v4()
        );
    }

    #[test]
    fn golden_bytes_decode_to_the_event() {
        assert_eq!(VoteEvent::decode(GOLDEN.as_bytes()).unwrap(), example());
        assert_eq!(
            VoteEvent::decode(GOLDEN_V2.as_bytes()).unwrap(),
            example_v2()
        );
        assert_eq!(
            VoteEvent::decode(GOLDEN_V3.as_bytes()).unwrap(),
            example_v3()
        );
        assert_eq!(
            VoteEvent::decode(golden_v4().as_bytes()).unwrap(),
            example_v4()
        );
    }

    #[test]
    fn version_4_needs_the_hash_of_its_revisions_text() {
        let hash = RevisionHash::of("[[poll]]\n").to_string();
        assert_eq!(hash.len(), 64);
        let no_hash = golden_v4().replace(&format!(r#","rev_hash":"{hash}""#), "");
        assert!(matches!(
            VoteEvent::decode(no_hash.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
        for bad in ["abc", &hash.to_uppercase(), &format!("{}g", &hash[..63])] {
            let bad = golden_v4().replace(&hash, bad);
            assert!(VoteEvent::decode(bad.as_bytes()).is_err(), "{bad}");
        }
        let v3_with_hash =
            GOLDEN_V3.replace(r#""rev":3,"#, &format!(r#""rev":3,"rev_hash":"{hash}","#));
        assert_eq!(
            VoteEvent::decode(v3_with_hash.as_bytes()).unwrap(),
            example_v3()
        );
    }

    #[test]
    fn version_3_needs_an_after_below_its_stamp_and_older_versions_order_by_their_stamp() {
        let no_after = GOLDEN_V3.replace(r#","after":116257832204214017"#, "");
        assert!(matches!(
            VoteEvent::decode(no_after.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
        for not_below in ["116257832304214017", "116257832304214018"] {
            let bad = GOLDEN_V3.replace("116257832204214017", not_below);
            assert!(
                matches!(
                    VoteEvent::decode(bad.as_bytes()),
                    Err(DecodeError::Malformed(_))
                ),
                "{bad}"
            );
        }
        let v2_with_after = GOLDEN_V2.replace(r#""rev":3"#, r#""rev":3,"after":1"#);
        assert_eq!(
            VoteEvent::decode(v2_with_after.as_bytes()).unwrap(),
            example_v2()
        );
        let stored = chrono::DateTime::from_timestamp_nanos(7);
        assert_eq!(example_v2().order_key(stored).after, example_v2().ts);
        assert_eq!(example_v2().order_key(stored).stored_ns, 0);
        assert_eq!(
            example_v3().order_key(stored).after,
            example_v3().after.unwrap()
        );
        assert_eq!(example_v3().order_key(stored).stored_ns, 7);
    }

    #[test]
    fn version_2_needs_its_revision_and_version_1_has_none() {
        let no_rev = GOLDEN_V2.replace(r#","rev":3"#, "");
        assert!(matches!(
            VoteEvent::decode(no_rev.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
        let v1_with_rev = GOLDEN.replace(r#""v":1,"#, r#""v":1,"rev":3,"#);
        assert_eq!(
            VoteEvent::decode(v1_with_rev.as_bytes()).unwrap(),
            example()
        );
        let bad_rev = GOLDEN_V2.replace(r#""rev":3"#, r#""rev":-3"#);
        assert!(VoteEvent::decode(bad_rev.as_bytes()).is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let with_extra = GOLDEN.replace(r#""v":1,"#, r#""v":1,"extra":[1,2],"#);
        assert_eq!(VoteEvent::decode(with_extra.as_bytes()).unwrap(), example());
    }

    #[test]
    fn another_version_is_named() {
        let v5 = r#"{"v":5,"something":"else"}"#;
        assert_eq!(
            VoteEvent::decode(v5.as_bytes()),
            Err(DecodeError::NewerVersion(5))
        );
        let v5_same_shape = golden_v4().replace(r#""v":4"#, r#""v":5"#);
        let newer = VoteEvent::decode(v5_same_shape.as_bytes()).unwrap_err();
        assert_eq!(newer, DecodeError::NewerVersion(5));
        assert!(newer.is_newer());
        let v0 = GOLDEN.replace(r#""v":1"#, r#""v":0"#);
        let older = VoteEvent::decode(v0.as_bytes()).unwrap_err();
        assert_eq!(older, DecodeError::UnsupportedVersion(0));
        assert!(!older.is_newer());
    }

    #[test]
    fn bad_identifiers_and_garbage_are_malformed() {
        for bad in [
            GOLDEN.replace("\"pets\"", "\"pe.ts\""),
            GOLDEN.replace("\"web01\"", "\"\""),
            GOLDEN.replace("\"cats\"", "\"c*\""),
            GOLDEN.replace("116257832304214017", "-1"),
            "not json".to_string(),
            "{}".to_string(),
            "".to_string(),
        ] {
            assert!(
                matches!(
                    VoteEvent::decode(bad.as_bytes()),
                    Err(DecodeError::Malformed(_))
                ),
                "{bad} decoded"
            );
        }
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,64}"
    }

    proptest! {
        #[test]
        fn events_round_trip(
            event_id in any::<u128>(), voter in any::<u128>(), ts in any::<u64>(),
            poll in token(), choice in token(), node in token(), rev in any::<Option<u64>>(),
            after in any::<Option<u64>>(), hash in any::<Option<[u8; 8]>>(),
        ) {
            let event = VoteEvent {
                event_id: EventId(Uuid::from_u128(event_id)),
                poll: PollId::parse(poll).unwrap(),
                voter: VoterId(Uuid::from_u128(voter)),
                choice: Choice::parse(choice).unwrap(),
                ts: Timestamp(ts),
                node: NodeId::parse(node).unwrap(),
                rev: rev.map(Revision),
                // Only an event with a revision has one, and it lies below the stamp.
                after: after.filter(|_| rev.is_some()).map(|a| Timestamp(a.min(ts.saturating_sub(1)))).filter(|a| *a < Timestamp(ts)),
                rev_hash: None,
            };
            // Only an event with `after` has a hash of its revision's text.
            let event = VoteEvent {
                rev_hash: hash
                    .filter(|_| event.after.is_some())
                    .map(|h| RevisionHash::of(&format!("{h:?}"))),
                ..event
            };
            prop_assert_eq!(VoteEvent::decode(&event.encode()), Ok(event));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = VoteEvent::decode(&bytes);
        }
    }
}
