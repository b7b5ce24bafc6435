//! The two ways to count an option's votes in PostgreSQL: the sum of its tally shards (what the
//! results show) and the number of ballots holding it (what the audit compares against).

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};

/// The votes of one (poll, option), as the database spells them: the rows are not trusted to hold
/// valid ids, so that the audit can report whatever it finds.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub(crate) struct OptionCount {
    #[diesel(sql_type = Text)]
    pub poll: String,
    #[diesel(sql_type = Text)]
    pub option: String,
    #[diesel(sql_type = BigInt)]
    pub votes: i64,
}

/// `sum(votes)` over the shards of every (poll, option) that has tally rows.
pub(crate) async fn tally_sums(
    conn: &mut AsyncPgConnection,
) -> diesel::QueryResult<Vec<OptionCount>> {
    // `sum(bigint)` is `numeric`; the cast keeps it an integer (it would take 2^63 votes to fail).
    diesel::sql_query(
        "SELECT poll, option, sum(votes)::bigint AS votes FROM tallies GROUP BY poll, option",
    )
    .load(conn)
    .await
}

/// `count(*)` of the ballots of every (poll, choice). A full scan: for the audit, never per
/// request.
pub(crate) async fn ballot_counts(
    conn: &mut AsyncPgConnection,
) -> diesel::QueryResult<Vec<OptionCount>> {
    diesel::sql_query(
        "SELECT poll, choice AS option, count(*) AS votes FROM ballots GROUP BY poll, choice",
    )
    .load(conn)
    .await
}
