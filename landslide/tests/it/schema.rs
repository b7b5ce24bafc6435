//! The database schema and its migrations against a real PostgreSQL.

use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use crate::support::Db;

#[tokio::test(flavor = "multi_thread")]
async fn several_processes_migrating_at_once_apply_each_migration_once() {
    let db = Db::create_empty().await;
    let runs = (0..6).map(|_| {
        let url = db.owner();
        tokio::spawn(async move { landslide_schema::postgres::migrate(&url).await })
    });
    let applied: Vec<Vec<String>> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("every run succeeds"))
        .collect();
    // Exactly one run applied the migrations; the others found nothing to do.
    assert_eq!(
        applied.iter().filter(|a| !a.is_empty()).count(),
        1,
        "{applied:?}"
    );

    #[derive(QueryableByName)]
    struct Table {
        #[diesel(sql_type = diesel::sql_types::Text)]
        table_name: String,
    }
    let tables: Vec<Table> = diesel::sql_query(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name IN ('ballots', 'tallies') ORDER BY 1",
    )
    .load(&mut db.conn().await)
    .await
    .unwrap();
    let names: Vec<_> = tables.into_iter().map(|t| t.table_name).collect();
    assert_eq!(names, ["ballots", "tallies"]);
}
