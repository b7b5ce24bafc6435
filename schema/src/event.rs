//! The vote event on the wire: versioned JSON, readable in `nats stream view`.
//!
//! Version 2 is an object with exactly these fields, in this order when we write it:
//!
//! ```json
//! {"v":2,"event_id":"…","poll":"pets","voter":"…","choice":"cats","ts":116…,"node":"web01","rev":3}
//! ```
//!
//! `rev` is the revision of the poll definitions the ingest node accepted the vote under
//! ([`crate::poll::Revision`]). Version 1 is the same without `rev`: still read (such an event is
//! judged by the latest revision), and written for an event that names no revision.
//!
//! Decoding rejects any other version, a missing field, and an identifier the newtypes refuse;
//! unknown extra fields are ignored so that a later minor addition does not dead-letter votes.

use serde::{Deserialize, Serialize};

use crate::poll::Revision;
use crate::{Choice, EventId, NodeId, PollId, Timestamp, VoterId};

/// The wire version this build writes for an event that names its revision.
pub const WIRE_VERSION: u32 = 2;
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
}

/// Why bytes are not a vote event. The message is meant for a dead-letter reason header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported vote event version {0}")]
    UnsupportedVersion(u64),
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
    /// Required in version 2, absent in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rev: Option<Revision>,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u64,
}

impl VoteEvent {
    /// The order of one voter's events: the later `(ts, event id)` is the voter's choice.
    pub fn order_key(&self) -> (Timestamp, EventId) {
        (self.ts, self.event_id)
    }

    /// The event's JSON encoding: version [`WIRE_VERSION`], or 1 when it names no revision.
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            v: if self.rev.is_some() {
                WIRE_VERSION
            } else {
                WIRE_VERSION_1
            },
            event_id: self.event_id,
            poll: self.poll.as_str().into(),
            voter: self.voter,
            choice: self.choice.as_str().into(),
            ts: self.ts,
            node: self.node.as_str().into(),
            rev: self.rev,
        };
        // Serializing a struct of strings, UUIDs and integers into a Vec cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Decodes an event; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match serde_json::from_slice::<Wire<'_>>(bytes) {
            Ok(wire) if wire.v == WIRE_VERSION || wire.v == WIRE_VERSION_1 => {
                let rev = match (wire.v, wire.rev) {
                    (WIRE_VERSION, None) => {
                        return Err(malformed("version 2 without the field `rev`"));
                    }
                    // A version 1 event never had one: a stray field is ignored like any other.
                    (WIRE_VERSION_1, _) => None,
                    (_, rev) => rev,
                };
                Ok(Self {
                    event_id: wire.event_id,
                    poll: PollId::parse(wire.poll).map_err(malformed)?,
                    voter: wire.voter,
                    choice: Choice::parse(wire.choice).map_err(malformed)?,
                    ts: wire.ts,
                    node: NodeId::parse(wire.node).map_err(malformed)?,
                    rev,
                })
            }
            Ok(wire) => Err(DecodeError::UnsupportedVersion(wire.v.into())),
            // A later version may have another shape: name the version rather than the shape.
            Err(err) => match serde_json::from_slice::<VersionProbe>(bytes) {
                Ok(probe)
                    if probe.v != u64::from(WIRE_VERSION)
                        && probe.v != u64::from(WIRE_VERSION_1) =>
                {
                    Err(DecodeError::UnsupportedVersion(probe.v))
                }
                _ => Err(malformed(err)),
            },
        }
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
        }
    }

    fn example_v2() -> VoteEvent {
        VoteEvent {
            rev: Some(Revision(3)),
            ..example()
        }
    }

    const GOLDEN: &str = r#"{"v":1,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01"}"#;
    const GOLDEN_V2: &str = r#"{"v":2,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01","rev":3}"#;

    #[test]
    fn encoding_is_stable_to_the_byte() {
        assert_eq!(String::from_utf8(example().encode()).unwrap(), GOLDEN);
        assert_eq!(String::from_utf8(example_v2().encode()).unwrap(), GOLDEN_V2);
    }

    #[test]
    fn golden_bytes_decode_to_the_event() {
        assert_eq!(VoteEvent::decode(GOLDEN.as_bytes()).unwrap(), example());
        assert_eq!(
            VoteEvent::decode(GOLDEN_V2.as_bytes()).unwrap(),
            example_v2()
        );
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
        let v3 = r#"{"v":3,"something":"else"}"#;
        assert_eq!(
            VoteEvent::decode(v3.as_bytes()),
            Err(DecodeError::UnsupportedVersion(3))
        );
        let v3_same_shape = GOLDEN_V2.replace(r#""v":2"#, r#""v":3"#);
        assert_eq!(
            VoteEvent::decode(v3_same_shape.as_bytes()),
            Err(DecodeError::UnsupportedVersion(3))
        );
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
        ) {
            let event = VoteEvent {
                event_id: EventId(Uuid::from_u128(event_id)),
                poll: PollId::parse(poll).unwrap(),
                voter: VoterId(Uuid::from_u128(voter)),
                choice: Choice::parse(choice).unwrap(),
                ts: Timestamp(ts),
                node: NodeId::parse(node).unwrap(),
                rev: rev.map(Revision),
            };
            prop_assert_eq!(VoteEvent::decode(&event.encode()), Ok(event));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = VoteEvent::decode(&bytes);
        }
    }
}
