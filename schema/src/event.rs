//! The vote event on the wire: versioned JSON, readable in `nats stream view`.
//!
//! Version 1 is an object with exactly these fields, in this order when we write it:
//!
//! ```json
//! {"v":1,"event_id":"…","poll":"pets","voter":"…","choice":"cats","ts":116…,"node":"web01"}
//! ```
//!
//! Decoding rejects any other version, a missing field, and an identifier the newtypes refuse;
//! unknown extra fields are ignored so that a later minor addition does not dead-letter votes.

use serde::{Deserialize, Serialize};

use crate::{Choice, EventId, NodeId, PollId, Timestamp, VoterId};

/// The wire version this build writes and the only one it reads.
pub const WIRE_VERSION: u32 = 1;

/// One accepted vote, as stamped by an ingest node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteEvent {
    pub event_id: EventId,
    pub poll: PollId,
    pub voter: VoterId,
    pub choice: Choice,
    pub ts: Timestamp,
    pub node: NodeId,
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
struct WireV1<'a> {
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

    /// The event's JSON encoding, version [`WIRE_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireV1 {
            v: WIRE_VERSION,
            event_id: self.event_id,
            poll: self.poll.as_str().into(),
            voter: self.voter,
            choice: self.choice.as_str().into(),
            ts: self.ts,
            node: self.node.as_str().into(),
        };
        // Serializing a struct of strings, UUIDs and integers into a Vec cannot fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// Decodes an event; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match serde_json::from_slice::<WireV1<'_>>(bytes) {
            Ok(wire) if wire.v == WIRE_VERSION => Ok(Self {
                event_id: wire.event_id,
                poll: PollId::parse(wire.poll).map_err(malformed)?,
                voter: wire.voter,
                choice: Choice::parse(wire.choice).map_err(malformed)?,
                ts: wire.ts,
                node: NodeId::parse(wire.node).map_err(malformed)?,
            }),
            Ok(wire) => Err(DecodeError::UnsupportedVersion(wire.v.into())),
            // A later version may have another shape: name the version rather than the shape.
            Err(err) => match serde_json::from_slice::<VersionProbe>(bytes) {
                Ok(probe) if probe.v != u64::from(WIRE_VERSION) => {
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
        }
    }

    const GOLDEN: &str = r#"{"v":1,"event_id":"6f1c2a8e-0d4b-4b8a-9a57-3c1de0f0a001","poll":"pets","voter":"0b7e3d52-41c6-4f0e-8d2a-5e9f61c7b002","choice":"cats","ts":116257832304214017,"node":"web01"}"#;

    #[test]
    fn encoding_is_stable_to_the_byte() {
        assert_eq!(String::from_utf8(example().encode()).unwrap(), GOLDEN);
    }

    #[test]
    fn golden_bytes_decode_to_the_event() {
        assert_eq!(VoteEvent::decode(GOLDEN.as_bytes()).unwrap(), example());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let with_extra = GOLDEN.replace(r#""v":1,"#, r#""v":1,"extra":[1,2],"#);
        assert_eq!(VoteEvent::decode(with_extra.as_bytes()).unwrap(), example());
    }

    #[test]
    fn another_version_is_named() {
        let v2 = r#"{"v":2,"something":"else"}"#;
        assert_eq!(
            VoteEvent::decode(v2.as_bytes()),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let v2_same_shape = GOLDEN.replace(r#""v":1"#, r#""v":2"#);
        assert_eq!(
            VoteEvent::decode(v2_same_shape.as_bytes()),
            Err(DecodeError::UnsupportedVersion(2))
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
            poll in token(), choice in token(), node in token(),
        ) {
            let event = VoteEvent {
                event_id: EventId(Uuid::from_u128(event_id)),
                poll: PollId::parse(poll).unwrap(),
                voter: VoterId(Uuid::from_u128(voter)),
                choice: Choice::parse(choice).unwrap(),
                ts: Timestamp(ts),
                node: NodeId::parse(node).unwrap(),
            };
            prop_assert_eq!(VoteEvent::decode(&event.encode()), Ok(event));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = VoteEvent::decode(&bytes);
        }
    }
}
