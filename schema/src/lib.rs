//! The contract between Landslide's roles.
//!
//! Everything that ingest nodes, dedup-workers, tally and audit must agree on lives here, and only
//! that: the vote event and its versioned JSON encoding ([`event`]), the domain values that reject
//! bad input ([`ids`]), the hybrid logical clock stamp ([`ts`]), the voter cookie's payload
//! ([`cookie`]), the polls ([`poll`]), subject names ([`subject`]) and the PostgreSQL schema
//! ([`db`]).
//!
//! This crate holds data and its encoding, never behaviour that talks to the world: no NATS, no
//! runtime. The single exception is [`postgres`] (feature `postgres`): connecting the way every role
//! must (TLS as `DATABASE_URL`'s `sslmode` says, with a timeout and an error that names
//! `DATABASE_URL`), applying the migrations under an advisory lock, checking that they are applied,
//! and the database users the roles connect as. It lives here because the schema, its migrations,
//! the rights they grant and the lock that guards them are one piece of the contract. Feature
//! `openapi` describes the values in the HTTP APIs' OpenAPI documents, by the same rules as their
//! `parse` (data about data, no behaviour).

pub mod cookie;
pub mod db;
pub mod event;
mod hex;
pub mod ids;
pub mod mark;
pub mod merge;
#[cfg(feature = "openapi")]
mod openapi;
pub mod poll;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod receipt;
pub mod record;
pub mod subject;
pub mod ts;

pub use event::{DecodeError, VoteEvent};
pub use ids::{Choice, EventId, InvalidId, NodeId, PollId, VoterId};
pub use poll::{Poll, PollBook, PollOption, Polls, Revision, RevisionHash, UNKNOWN_REVISION_BOUND};
pub use ts::{MAX_TS_AHEAD, Timestamp};
