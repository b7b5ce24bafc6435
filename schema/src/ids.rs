//! Domain values. Each `parse` rejects what the rest of the system must never see, so that code
//! holding a [`NodeId`], [`PollId`] or [`Choice`] need not check it again.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only hold letters, digits, '_' and '-', found {found:?}")]
    BadChar { kind: &'static str, found: char },
}

/// Checks the common shape of our identifiers: 1..=max bytes of `[A-Za-z0-9_-]`. That shape is
/// safe as one NATS subject token, in a cookie, in a URL path segment and in HTML.
fn check_token(kind: &'static str, s: &str, max: usize) -> Result<(), InvalidId> {
    if s.is_empty() {
        return Err(InvalidId::Empty { kind });
    }
    if s.len() > max {
        return Err(InvalidId::TooLong { kind, max });
    }
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        Some(found) => Err(InvalidId::BadChar { kind, found }),
        None => Ok(()),
    }
}

macro_rules! token_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Accepts 1 to `MAX_LEN` bytes of `[A-Za-z0-9_-]`.
            pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check_token($kind, &s, $max)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }
    };
}

token_newtype!(
    /// The id of an ingest node; its votes go to subject `votes.<node id>`.
    NodeId,
    "node id",
    64
);
token_newtype!(
    /// The id of a poll, such as `pets`.
    PollId,
    "poll id",
    64
);
token_newtype!(
    /// The id of one option of a poll, such as `cats`.
    Choice,
    "option",
    64
);

/// A voter: random for a new voter, then carried in the signed voter cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VoterId(pub Uuid);

impl VoterId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for VoterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of one vote event; also its `Nats-Msg-Id`, so a retried publish is stored once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_accept_the_safe_alphabet() {
        assert!(NodeId::parse("web-01_a").is_ok());
        assert!(PollId::parse("pets").is_ok());
    }

    #[test]
    fn tokens_reject_what_would_break_a_subject_or_a_cookie() {
        for bad in ["", "a.b", "a b", "a*", "a>", "é", "a;b", "a~b"] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(Choice::parse("x".repeat(65)).is_err());
        assert!(Choice::parse("x".repeat(64)).is_ok());
    }

    #[test]
    fn bad_tokens_are_rejected_when_deserializing() {
        assert!(serde_json::from_str::<PollId>("\"a.b\"").is_err());
        assert_eq!(
            serde_json::from_str::<PollId>("\"pets\"").ok(),
            PollId::parse("pets").ok()
        );
    }
}
