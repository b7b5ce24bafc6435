//! The stream marks and the recorded rollbacks in PostgreSQL (`crate::mark`): the workers'
//! statement that raises a mark in a batch's transaction, and the reads of tally, audit and
//! `status`.

use chrono::{DateTime, Utc};
use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{QueryableByName, sql_query};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};

use crate::EventId;
use crate::mark::Mark;

/// Raises the mark of (`stream`, `shard`) to `mark`, unless it is at or above it already.
/// Executed in the batch's transaction, after the ballots' upsert.
#[derive(Debug, Clone)]
pub struct RaiseMark {
    stream: String,
    shard: i16,
    sequence: i64,
    event_id: Option<uuid::Uuid>,
    stored_ns: i64,
}

impl RaiseMark {
    pub fn new(stream: &str, shard: i16, mark: &Mark) -> Self {
        Self {
            stream: stream.to_owned(),
            shard,
            sequence: i64::try_from(mark.sequence).unwrap_or(i64::MAX),
            event_id: mark.event_id.map(|e| e.0),
            stored_ns: mark.stored_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
        }
    }
}

impl QueryId for RaiseMark {
    type QueryId = RaiseMarkId;
    const HAS_STATIC_QUERY_ID: bool = true;
}

/// Makes the statement cacheable: its SQL never changes.
#[derive(Debug)]
pub struct RaiseMarkId;

impl QueryFragment<Pg> for RaiseMark {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "INSERT INTO stream_marks AS m (stream, shard, sequence, event_id, stored_ns) VALUES (",
        );
        out.push_bind_param::<Text, _>(&self.stream)?;
        out.push_sql(", ");
        out.push_bind_param::<SmallInt, _>(&self.shard)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.sequence)?;
        out.push_sql(", ");
        out.push_bind_param::<Nullable<SqlUuid>, _>(&self.event_id)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.stored_ns)?;
        out.push_sql(
            ") ON CONFLICT (stream, shard) DO UPDATE SET sequence = EXCLUDED.sequence, \
             event_id = EXCLUDED.event_id, stored_ns = EXCLUDED.stored_ns \
             WHERE m.sequence < EXCLUDED.sequence",
        );
        Ok(())
    }
}

#[derive(QueryableByName)]
struct MarkRow {
    #[diesel(sql_type = BigInt)]
    sequence: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    event_id: Option<uuid::Uuid>,
    #[diesel(sql_type = BigInt)]
    stored_ns: i64,
}

impl From<MarkRow> for Mark {
    fn from(row: MarkRow) -> Self {
        Self {
            sequence: u64::try_from(row.sequence).unwrap_or(0),
            event_id: row.event_id.map(EventId),
            stored_at: DateTime::from_timestamp_nanos(row.stored_ns),
        }
    }
}

/// The greatest mark of `stream` over every shard, if any worker committed a vote of it.
pub async fn read_mark(conn: &mut AsyncPgConnection, stream: &str) -> QueryResult<Option<Mark>> {
    let rows: Vec<MarkRow> = sql_query(
        "SELECT sequence, event_id, stored_ns FROM stream_marks WHERE stream = $1 \
         ORDER BY sequence DESC LIMIT 1",
    )
    .bind::<Text, _>(stream)
    .load(conn)
    .await?;
    Ok(rows.into_iter().next().map(Mark::from))
}

/// What a worker found and did when `stream` went backwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    pub stream: String,
    pub detected_at: DateTime<Utc>,
    pub reason: String,
    pub mark_sequence: u64,
    pub mark_event_id: Option<EventId>,
    pub stream_last: u64,
    pub consumer_delivered: u64,
    /// The workers took up every message the stream stored from this moment on again.
    pub restarted_from: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct RollbackRow {
    #[diesel(sql_type = Text)]
    stream: String,
    #[diesel(sql_type = Timestamptz)]
    detected_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    reason: String,
    #[diesel(sql_type = BigInt)]
    mark_sequence: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    mark_event_id: Option<uuid::Uuid>,
    #[diesel(sql_type = BigInt)]
    stream_last: i64,
    #[diesel(sql_type = BigInt)]
    consumer_delivered: i64,
    #[diesel(sql_type = Timestamptz)]
    restarted_from: DateTime<Utc>,
}

/// Every recorded rollback of `stream`, oldest first.
pub async fn rollbacks(conn: &mut AsyncPgConnection, stream: &str) -> QueryResult<Vec<Rollback>> {
    let rows: Vec<RollbackRow> = sql_query(
        "SELECT stream, detected_at, reason, mark_sequence, mark_event_id, stream_last, \
         consumer_delivered, restarted_from FROM stream_rollbacks WHERE stream = $1 ORDER BY id",
    )
    .bind::<Text, _>(stream)
    .load(conn)
    .await?;
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(rows
        .into_iter()
        .map(|r| Rollback {
            stream: r.stream,
            detected_at: r.detected_at,
            reason: r.reason,
            mark_sequence: unsigned(r.mark_sequence),
            mark_event_id: r.mark_event_id.map(EventId),
            stream_last: unsigned(r.stream_last),
            consumer_delivered: unsigned(r.consumer_delivered),
            restarted_from: r.restarted_from,
        })
        .collect())
}

/// Records `rollback` and sets every shard's mark of its stream to `rebased` (what the stream
/// holds now), in the caller's transaction: the stream's new history is the one the marks follow
/// from here on.
pub async fn record_rollback(
    conn: &mut AsyncPgConnection,
    rollback: &Rollback,
    rebased: Option<&Mark>,
) -> QueryResult<()> {
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    sql_query(
        "INSERT INTO stream_rollbacks (stream, detected_at, reason, mark_sequence, mark_event_id, \
         stream_last, consumer_delivered, restarted_from) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind::<Text, _>(&rollback.stream)
    .bind::<Timestamptz, _>(rollback.detected_at)
    .bind::<Text, _>(&rollback.reason)
    .bind::<BigInt, _>(signed(rollback.mark_sequence))
    .bind::<Nullable<SqlUuid>, _>(rollback.mark_event_id.map(|e| e.0))
    .bind::<BigInt, _>(signed(rollback.stream_last))
    .bind::<BigInt, _>(signed(rollback.consumer_delivered))
    .bind::<Timestamptz, _>(rollback.restarted_from)
    .execute(conn)
    .await?;
    let (sequence, event_id, stored_ns) = rebased.map_or((0, None, 0), |m| {
        (
            signed(m.sequence),
            m.event_id.map(|e| e.0),
            m.stored_at.timestamp_nanos_opt().unwrap_or(0),
        )
    });
    sql_query(
        "UPDATE stream_marks SET sequence = $2, event_id = $3, stored_ns = $4 WHERE stream = $1",
    )
    .bind::<Text, _>(&rollback.stream)
    .bind::<BigInt, _>(sequence)
    .bind::<Nullable<SqlUuid>, _>(event_id)
    .bind::<BigInt, _>(stored_ns)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the transaction-scoped lock under which one worker at a time handles a rollback.
pub async fn lock_for_rollback(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    /// "landslide" rolled: distinct from `migrate`'s lock key.
    const ROLLBACK_LOCK_KEY: i64 = 0x6c61_6e64_726f_6c6c;
    sql_query(format!("SELECT pg_advisory_xact_lock({ROLLBACK_LOCK_KEY})"))
        .execute(conn)
        .await
        .map(|_| ())
}
