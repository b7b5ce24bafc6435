//! The PostgreSQL schema: diesel table definitions and the embedded migrations that create them.
//!
//! Invariants the writers keep (checked by `landslide audit`):
//! - `ballots` holds, per (poll, voter), the committed event with the greatest
//!   `(after_ts, stored_ns, ts, event_id)` (`crate::merge`);
//! - for every (poll, option), `sum(tallies.votes)` over its shards equals the number of ballots
//!   with that choice.

use diesel_migrations::{EmbeddedMigrations, embed_migrations};

/// The migrations under `schema/migrations`, compiled in.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

diesel::table! {
    /// One row per (poll, voter): the voter's latest choice.
    ballots (poll, voter) {
        poll -> Text,
        voter -> Uuid,
        choice -> Text,
        prev_choice -> Nullable<Text>,
        ts -> BigInt,
        event_id -> Uuid,
        /// What the vote knew: the stamp of the voter's last answered vote.
        after_ts -> BigInt,
        /// When the stream stored it, in nanoseconds since the Unix epoch.
        stored_ns -> BigInt,
    }
}

diesel::table! {
    /// Sharded counters; see the module doc for the invariant.
    tallies (poll, option, shard) {
        poll -> Text,
        option -> Text,
        shard -> SmallInt,
        votes -> BigInt,
    }
}
