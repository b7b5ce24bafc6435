//! The PostgreSQL schema: diesel table definitions and the embedded migrations that create them.
//!
//! Invariants the writers keep (checked by `landslide audit`):
//! - `ballots` holds, per (poll, voter), the committed event with the greatest `(ts, event_id)`;
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
