//! What the workers have committed of a votes stream: the highest stream sequence of a committed
//! vote, the event stored there, and when the stream stored it. The workers write it in the same
//! transaction as the ballots (`postgres::marks`), so it never claims more than the database
//! holds. A stream whose last sequence is below it, or that holds another event at its
//! sequence, went backwards (`landslide_nats::rollback`).

use chrono::{DateTime, Utc};

use crate::EventId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub sequence: u64,
    /// The event at `sequence`, when a vote was stored there (always, for a worker's mark).
    pub event_id: Option<EventId>,
    pub stored_at: DateTime<Utc>,
}
