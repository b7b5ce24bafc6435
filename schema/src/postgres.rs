//! PostgreSQL as every role reaches it: a [`DatabaseUrl`] parsed once (TLS by its `sslmode`),
//! [`connect`] with a timeout and an error that names `DATABASE_URL`, [`migrate`] for the schema's
//! owner, safe when several processes run it at once, and [`check_schema`], which every other
//! role runs at startup instead.
//!
//! The migrations are a step of their own (`landslide migrate`, as the owner of the schema):
//! the roles connect as users that may not change the schema (module [`roles`]), so none of
//! them could apply a migration, and each refuses to start on a schema older than its binary.

use std::time::Duration;

use anyhow::{Context, anyhow};
use diesel::ConnectionResult;
use diesel::QueryableByName;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_migrations::MigrationHarness;

use crate::db::MIGRATIONS;

pub mod marks;
pub mod roles;
mod tls;
mod url;

pub use roles::{LoginRole, READ_GROUP, WRITE_GROUP};
pub use url::{DatabaseUrl, InvalidDatabaseUrl, SslMode, percent_encode};

/// The advisory lock key: "landslide" in ASCII, so it does not collide with other users' keys.
const LOCK_KEY: i64 = 0x6c61_6e64_736c_6964;

/// How long a connection attempt may take. An unreachable host would otherwise hang the caller
/// forever, and a refused one fails at once anyway.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection, TLS as the URL says, or fails with a message that names `DATABASE_URL`
/// (password hidden) and why (a refused certificate, no TLS, a `pg_hba.conf` that refuses).
pub async fn connect(url: &DatabaseUrl) -> anyhow::Result<AsyncPgConnection> {
    let failed = || format!("cannot connect to PostgreSQL at {url} (DATABASE_URL)");
    // Dropping a connection attempt is harmless: nothing has been sent that needs undoing.
    match tokio::time::timeout(CONNECT_TIMEOUT, establish(url)).await {
        Ok(conn) => conn.map_err(|e| anyhow!("{e}")).with_context(failed),
        Err(_) => Err(anyhow!("no answer within {CONNECT_TIMEOUT:?}")).with_context(failed),
    }
}

/// One connection as `url` says, the error in words: what [`connect`] and the pools use.
async fn establish(url: &DatabaseUrl) -> ConnectionResult<AsyncPgConnection> {
    let bad = |e: tokio_postgres::Error| diesel::ConnectionError::BadConnection(error_chain(&e));
    match url.tls() {
        None => {
            let (client, connection) = url
                .config()
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(bad)?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
            let (client, connection) = url.config().connect(tls).await.map_err(bad)?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        }
    }
}

/// A bb8 pool manager whose connections are made as `url` says (TLS included), not by
/// diesel-async's default, which would connect without TLS whatever the URL asks.
pub fn pool_manager(url: &DatabaseUrl) -> AsyncDieselConnectionManager<AsyncPgConnection> {
    let mut config = ManagerConfig::default();
    let shared = url.clone();
    config.custom_setup = Box::new(move |_| {
        let url = shared.clone();
        Box::pin(async move { establish(&url).await })
    });
    // The manager's own URL is never used (custom_setup connects): give it the redacted one, so
    // that nothing that prints the manager shows the password.
    AsyncDieselConnectionManager::new_with_config(url.to_string(), config)
}

/// Applies pending migrations to the database at `url`, as its owner; returns the names
/// applied. The migrations create the group roles if they are missing (which needs
/// `CREATEROLE`, or the groups created beforehand) and grant them their rights.
pub async fn migrate(url: &DatabaseUrl) -> anyhow::Result<Vec<String>> {
    let conn = connect(url).await?;
    // Diesel's migration harness is synchronous: run it on a blocking thread, through the wrapper
    // that drives the async connection there (from this runtime, which the thread can reach).
    tokio::task::spawn_blocking(move || migrate_blocking(conn))
        .await
        .context("the migration task panicked")?
}

fn migrate_blocking(conn: AsyncPgConnection) -> anyhow::Result<Vec<String>> {
    use diesel::RunQueryDsl as _;
    let mut conn: AsyncConnectionWrapper<AsyncPgConnection> = AsyncConnectionWrapper::from(conn);
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(LOCK_KEY)
        .execute(&mut conn)
        .context("cannot take the migration lock")?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
        .map_err(|e| {
            anyhow!(
                "applying migrations failed: {e} (run them as the schema's owner; creating the \
                 group roles {WRITE_GROUP} and {READ_GROUP} needs CREATEROLE, unless they exist)"
            )
        });
    // Closing the connection would release the lock too; unlock explicitly so a pooled or long-lived
    // connection never keeps it.
    let unlocked = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<BigInt, _>(LOCK_KEY)
        .execute(&mut conn);
    let applied = applied?;
    unlocked.context("cannot release the migration lock")?;
    if !applied.is_empty() {
        tracing::info!(migrations = ?applied, "applied database migrations");
    }
    Ok(applied)
}

/// The database's schema is not the one this binary was built for.
#[derive(Debug, thiserror::Error)]
#[error(
    "{problem}: run `landslide migrate` with the schema owner's DATABASE_URL first (this role's \
     user may not change the schema)"
)]
pub struct SchemaNotCurrent {
    problem: String,
}

#[derive(QueryableByName)]
struct Present {
    #[diesel(sql_type = Bool)]
    present: bool,
    #[diesel(sql_type = Bool)]
    readable: bool,
}

#[derive(QueryableByName)]
struct Applied {
    #[diesel(sql_type = Text)]
    version: String,
}

/// Fails with [`SchemaNotCurrent`] unless every migration of this binary is applied. Every role
/// but `migrate` calls it at startup: a worker on an old schema could fail on its first batch
/// (its votes would wait, naked, while nobody is told why), a tally could show nothing.
/// Migrations applied that this binary does not know (a newer release migrated first) are
/// only logged: migrations add, and an older binary keeps working while it is replaced.
pub async fn check_schema(conn: &mut AsyncPgConnection) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl as _;
    // The catalog first, so that a missing table or a missing grant is named as such rather than
    // as a failed query.
    let found: Present = diesel::sql_query(
        "SELECT to_regclass('__diesel_schema_migrations') IS NOT NULL AS present, \
         COALESCE(has_table_privilege(to_regclass('__diesel_schema_migrations'), 'SELECT'), false) \
           AS readable",
    )
    .get_result(conn)
    .await
    .context("cannot read the database's schema version")?;
    if !found.present {
        return Err(SchemaNotCurrent {
            problem: "the database has no Landslide schema (no migration was ever applied)"
                .to_owned(),
        }
        .into());
    }
    if !found.readable {
        return Err(SchemaNotCurrent {
            problem: format!(
                "this user may not read the schema's version (__diesel_schema_migrations): it \
                 is not a member of {WRITE_GROUP} or {READ_GROUP}, or the migrations that grant \
                 them their rights are not applied"
            ),
        }
        .into());
    }
    let applied: Vec<Applied> = diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
        .load(conn)
        .await
        .context("cannot read the database's schema version")?;
    let applied: std::collections::BTreeSet<String> =
        applied.into_iter().map(|a| a.version).collect();
    let ours = MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map_err(|e| anyhow!("cannot list this binary's migrations: {e}"))?;
    let ours: Vec<(String, String)> = ours
        .iter()
        .map(|m| (m.name().version().to_string(), m.name().to_string()))
        .collect();
    let missing: Vec<&str> = ours
        .iter()
        .filter(|(version, _)| !applied.contains(version))
        .map(|(_, name)| name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(SchemaNotCurrent {
            problem: format!(
                "the database schema is older than this binary: migrations {} are not applied",
                missing.join(", ")
            ),
        }
        .into());
    }
    let unknown: Vec<&String> = applied
        .iter()
        .filter(|v| !ours.iter().any(|(version, _)| version == *v))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            migrations = ?unknown,
            "the database has migrations this binary does not know: a newer release migrated it"
        );
    }
    Ok(())
}

/// [`connect`], then [`check_schema`]: how the roles that do not migrate start.
pub async fn connect_current(url: &DatabaseUrl) -> anyhow::Result<AsyncPgConnection> {
    let mut conn = connect(url).await?;
    check_schema(&mut conn)
        .await
        .with_context(|| format!("the database at {url} (DATABASE_URL) is not ready"))?;
    Ok(conn)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// An error and its causes, in one line: tokio-postgres says "db error" or "error performing
/// TLS handshake" and keeps the reason in its source.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
