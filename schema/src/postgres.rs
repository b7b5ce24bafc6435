//! PostgreSQL as every role reaches it: [`connect`] with a timeout and an error that names
//! `DATABASE_URL`, and [`migrate`], safe when several processes start at once.
//!
//! Every role that touches PostgreSQL calls [`migrate`] at startup. A session-level advisory lock
//! serialises them: the first applies what is pending, the others then find nothing to do.

use std::time::Duration;

use anyhow::{Context, anyhow};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncConnection as _, AsyncPgConnection};
use diesel_migrations::MigrationHarness;

use crate::db::MIGRATIONS;

/// The advisory lock key: "landslide" in ASCII, so it does not collide with other users' keys.
const LOCK_KEY: i64 = 0x6c61_6e64_736c_6964;

/// A PostgreSQL URL that never shows its password: `Debug` and `Display` print it redacted, so
/// configurations holding one can derive `Debug` and be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl From<&String> for DatabaseUrl {
    fn from(url: &String) -> Self {
        Self(url.clone())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// How long a connection attempt may take. An unreachable host would otherwise hang the caller
/// forever, and a refused one fails at once anyway.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection, or fails with a message that names `DATABASE_URL` (password hidden).
pub async fn connect(database_url: &str) -> anyhow::Result<AsyncPgConnection> {
    let failed = || {
        format!(
            "cannot connect to PostgreSQL at {} (DATABASE_URL)",
            redact(database_url)
        )
    };
    // Dropping a connection attempt is harmless: nothing has been sent that needs undoing.
    match tokio::time::timeout(CONNECT_TIMEOUT, AsyncPgConnection::establish(database_url)).await {
        Ok(conn) => conn.with_context(failed),
        Err(_) => Err(anyhow!("no answer within {CONNECT_TIMEOUT:?}")).with_context(failed),
    }
}

/// Applies pending migrations to the database at `database_url`; returns the names applied.
pub async fn migrate(database_url: &str) -> anyhow::Result<Vec<String>> {
    // A quick check first, with the timeout and the clear message of `connect`.
    drop(connect(database_url).await?);
    let url = database_url.to_owned();
    // Diesel's migration harness is synchronous: run it on a blocking thread, through the wrapper
    // that drives the async connection there.
    tokio::task::spawn_blocking(move || migrate_blocking(&url))
        .await
        .context("the migration task panicked")?
}

fn migrate_blocking(url: &str) -> anyhow::Result<Vec<String>> {
    let mut conn =
        <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(url)
            .with_context(|| {
                format!(
                    "cannot connect to PostgreSQL at {} (DATABASE_URL)",
                    redact(url)
                )
            })?;
    diesel::sql_query("SELECT pg_advisory_lock($1)")
        .bind::<BigInt, _>(LOCK_KEY)
        .execute(&mut conn)
        .context("cannot take the migration lock")?;
    let applied = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|versions| versions.iter().map(ToString::to_string).collect::<Vec<_>>())
        .map_err(|e| anyhow!("applying migrations failed: {e}"));
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_database_url_never_prints_its_password() {
        let url = super::DatabaseUrl::from("postgres://u:secret@h/db");
        assert_eq!(
            format!("{url} {url:?}"),
            "postgres://u:***@h/db \"postgres://u:***@h/db\""
        );
        assert_eq!(url.expose(), "postgres://u:secret@h/db");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
