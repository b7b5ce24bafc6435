//! The batch upsert: ballots with the greatest order key winning (`landslide_schema::merge`) and
//! the exact tally, in one statement.
//!
//! Each ballot row keeps the choice it replaced (`prev_choice`), so `RETURNING` tells, atomically per
//! row and under the row lock, whether the row was inserted (+1 for its choice) or which choice it
//! replaced (+1 new, -1 old). The tally deltas are summed per option and added to this worker's
//! counter shard in the same statement: the tally equals `count(*)` per option after every commit,
//! however many workers change one voter at once (design rules 3 and 5).

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, SmallInt, Text, Uuid as SqlUuid};
use landslide_schema::merge::StoredVote;
use uuid::Uuid;

const SQL_HEAD: &str = "WITH incoming (poll, voter, choice, ts, event_id, after_ts, stored_ns) \
    AS (SELECT * FROM unnest(";
const SQL_TAIL: &str = ")), \
changed AS ( \
    INSERT INTO ballots AS b (poll, voter, choice, prev_choice, ts, event_id, after_ts, stored_ns) \
    SELECT poll, voter, choice, NULL, ts, event_id, after_ts, stored_ns FROM incoming \
    ON CONFLICT (poll, voter) DO UPDATE \
        SET prev_choice = b.choice, choice = EXCLUDED.choice, ts = EXCLUDED.ts, \
            event_id = EXCLUDED.event_id, after_ts = EXCLUDED.after_ts, stored_ns = EXCLUDED.stored_ns \
        WHERE (b.after_ts, b.stored_ns, b.ts, b.event_id) \
            < (EXCLUDED.after_ts, EXCLUDED.stored_ns, EXCLUDED.ts, EXCLUDED.event_id) \
    RETURNING b.poll, b.choice, b.prev_choice \
), \
deltas (poll, option, delta) AS ( \
    SELECT poll, choice, 1 FROM changed \
    UNION ALL \
    SELECT poll, prev_choice, -1 FROM changed WHERE prev_choice IS NOT NULL \
) \
INSERT INTO tallies AS t (poll, option, shard, votes) \
SELECT poll, option, ";
// Rows are inserted in (poll, option) order so that two workers sharing a shard lock tally rows in
// the same order and cannot deadlock on them.
const SQL_END: &str = ", sum(delta) FROM deltas GROUP BY poll, option HAVING sum(delta) <> 0 \
ORDER BY poll, option \
ON CONFLICT (poll, option, shard) DO UPDATE SET votes = t.votes + EXCLUDED.votes";

/// One batch as column arrays, bound as seven parameters whatever its size; the statement text
/// never changes, so diesel-async prepares it once per connection.
#[derive(Debug, Default)]
pub struct UpsertBatch {
    poll: Vec<String>,
    voter: Vec<Uuid>,
    choice: Vec<String>,
    ts: Vec<i64>,
    event_id: Vec<Uuid>,
    after_ts: Vec<i64>,
    stored_ns: Vec<i64>,
    shard: i16,
}

impl UpsertBatch {
    /// `votes` must hold one vote per (poll, voter), sorted by (poll, voter): duplicates make the
    /// upsert fail ("cannot affect row a second time") and unsorted batches deadlock each other.
    pub fn new<'a>(votes: impl ExactSizeIterator<Item = &'a StoredVote>, shard: i16) -> Self {
        let mut batch = Self {
            shard,
            ..Self::default()
        };
        let n = votes.len();
        batch.poll.reserve(n);
        batch.voter.reserve(n);
        batch.choice.reserve(n);
        batch.ts.reserve(n);
        batch.event_id.reserve(n);
        batch.after_ts.reserve(n);
        batch.stored_ns.reserve(n);
        for vote in votes {
            let key = vote.order_key();
            let e = &vote.event;
            batch.poll.push(e.poll.to_string());
            batch.voter.push(e.voter.0);
            batch.choice.push(e.choice.to_string());
            batch.ts.push(key.ts.to_i64());
            batch.event_id.push(key.event_id.0);
            batch.after_ts.push(key.after.to_i64());
            batch.stored_ns.push(key.stored_ns);
        }
        batch
    }

    pub fn len(&self) -> usize {
        self.voter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.voter.is_empty()
    }
}

/// Makes the statement cacheable: its SQL is the same for every batch.
#[derive(Debug)]
pub struct UpsertBatchId;

impl QueryId for UpsertBatch {
    type QueryId = UpsertBatchId;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl QueryFragment<Pg> for UpsertBatch {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(SQL_HEAD);
        out.push_bind_param::<Array<Text>, _>(&self.poll)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<SqlUuid>, _>(&self.voter)?;
        out.push_sql("::uuid[], ");
        out.push_bind_param::<Array<Text>, _>(&self.choice)?;
        out.push_sql("::text[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.ts)?;
        out.push_sql("::bigint[], ");
        out.push_bind_param::<Array<SqlUuid>, _>(&self.event_id)?;
        out.push_sql("::uuid[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.after_ts)?;
        out.push_sql("::bigint[], ");
        out.push_bind_param::<Array<BigInt>, _>(&self.stored_ns)?;
        out.push_sql("::bigint[]");
        out.push_sql(SQL_TAIL);
        out.push_bind_param::<SmallInt, _>(&self.shard)?;
        out.push_sql("::smallint");
        out.push_sql(SQL_END);
        Ok(())
    }
}
