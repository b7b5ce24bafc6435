//! How the contract's values look in the OpenAPI documents of ingest and tally (feature
//! `openapi`): the same rules as their `parse`, written once next to them, so that a document
//! cannot promise an identifier, an event id or a stamp the code would not produce.

use std::borrow::Cow;

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::receipt::Receipt;
use crate::{Choice, EventId, PollId, Timestamp};

/// An identifier of `max` bytes of `[A-Za-z0-9_-]` at most, as `check_token` accepts.
fn token(description: &str, max: usize) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some("^[A-Za-z0-9_-]+$"))
        .min_length(Some(1))
        .max_length(Some(max))
        .description(Some(description))
        .into()
}

impl PartialSchema for PollId {
    fn schema() -> RefOr<Schema> {
        token("The id of a poll, such as `pets`.", Self::MAX_LEN)
    }
}
impl ToSchema for PollId {
    fn name() -> Cow<'static, str> {
        "PollId".into()
    }
}

impl PartialSchema for Choice {
    fn schema() -> RefOr<Schema> {
        token(
            "The id of one option of a poll, such as `cats`.",
            Self::MAX_LEN,
        )
    }
}
impl ToSchema for Choice {
    fn name() -> Cow<'static, str> {
        "Choice".into()
    }
}

impl PartialSchema for EventId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            // utoipa names `KnownFormat::Uuid` only with its `uuid` feature, which would pull in its
            // own uuid support for nothing: the format is the same string.
            .format(Some(SchemaFormat::Custom("uuid".to_owned())))
            .description(Some("The id of one vote event (a UUID)."))
            .into()
    }
}
impl ToSchema for EventId {
    fn name() -> Cow<'static, str> {
        "EventId".into()
    }
}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        // A u64 on the wire; every stamp an ingest node makes is far below 2^63 (milliseconds
        // since 1970 shifted by the 16 counter bits), so JSON's int64 holds it.
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .description(Some(
                "A hybrid logical clock stamp: milliseconds since the Unix epoch in the high bits, \
                 a counter in the low 16.",
            ))
            .into()
    }
}
impl ToSchema for Timestamp {
    fn name() -> Cow<'static, str> {
        "Timestamp".into()
    }
}

impl PartialSchema for Receipt {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(
                "^[A-Za-z0-9_-]{1,64}\\.[0-9a-f]{32}\\.[0-9a-f]{32}\\.[0-9]+\\.[0-9a-f]{32}$",
            ))
            .description(Some(
                "A vote's receipt: `<poll>.<voter id>.<event id>.<ts>.<tag>`, the ids and the tag \
                 (which proves that this site issued it) as 32 hex digits.",
            ))
            .into()
    }
}
impl ToSchema for Receipt {
    fn name() -> Cow<'static, str> {
        "Receipt".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VoterId;

    /// The receipt's pattern, checked by hand on what [`crate::receipt::ReceiptKey::issue`]
    /// writes (the crate has no regex engine, and needs none for this).
    #[test]
    fn a_receipt_is_written_as_its_schema_says() {
        let receipt = Receipt {
            poll: PollId::parse("pets").unwrap(),
            voter: VoterId::new_random(),
            event_id: EventId::new_random(),
            ts: Timestamp(123_456),
        };
        let key = crate::receipt::ReceiptKey::new([7; 32]).unwrap();
        let text = key.issue(&receipt);
        let parts: Vec<&str> = text.split('.').collect();
        assert_eq!(parts.len(), 5);
        assert_eq!(parts[0], "pets");
        for id in [parts[1], parts[2], parts[4]] {
            assert_eq!(id.len(), 32);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
        }
        assert!(parts[3].bytes().all(|b| b.is_ascii_digit()));
    }
}
