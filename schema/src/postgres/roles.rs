//! The database users of a deployment, least privilege first.
//!
//! | Role | What it is | May |
//! |---|---|---|
//! | the schema's owner (whoever runs `landslide migrate`) | owns the tables | everything, DDL included |
//! | `landslide_write` (group, `NOLOGIN`) | the workers' and replay's rights | read and upsert `ballots` and `tallies`: `SELECT`, `INSERT`, `UPDATE`; no `DELETE`, `TRUNCATE` or DDL |
//! | `landslide_read` (group, `NOLOGIN`) | tally's, audit's, export's and status' rights | `SELECT` only |
//! | `landslide_worker`, `landslide_tally`, `landslide_audit` ([`LoginRole`]) | the login roles the processes connect as | what their group may |
//!
//! The migrations create the two groups and grant them their rights (a table a later migration
//! adds is readable by `landslide_read` through default privileges; writing it needs a grant of
//! its own). [`ensure_login_role`] creates or updates a login role: `landslide db-users` and
//! `landslide up` call it, and the tests, on their shared server, too.

use anyhow::Context as _;
use diesel::QueryableByName;
use diesel::sql_types::{Bool, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use secrecy::{ExposeSecret as _, SecretString};

/// The group role of the roles that write (the workers, replay).
pub const WRITE_GROUP: &str = "landslide_write";
/// The group role of the roles that only read (tally, audit, export, status).
pub const READ_GROUP: &str = "landslide_read";

/// A login role: what one kind of process connects as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoginRole {
    /// `landslide dedup-worker` and `landslide replay`: writes ballots and tallies.
    Worker,
    /// `landslide tally`: reads.
    Tally,
    /// `landslide audit`, `export` and `status`: read.
    Audit,
}

impl LoginRole {
    pub const ALL: [Self; 3] = [Self::Worker, Self::Tally, Self::Audit];

    /// The role's name in PostgreSQL.
    pub fn name(self) -> &'static str {
        match self {
            Self::Worker => "landslide_worker",
            Self::Tally => "landslide_tally",
            Self::Audit => "landslide_audit",
        }
    }

    /// The group whose rights it has.
    pub fn group(self) -> &'static str {
        match self {
            Self::Worker => WRITE_GROUP,
            Self::Tally | Self::Audit => READ_GROUP,
        }
    }

    /// The short name of `landslide db-users` flags: `worker`, `tally`, `audit`.
    pub fn short(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Tally => "tally",
            Self::Audit => "audit",
        }
    }
}

impl std::fmt::Display for LoginRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What [`ensure_login_role`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoleChanges {
    pub created: bool,
    /// Its attributes were more than `LOGIN` (superuser, `CREATEDB`, `CREATEROLE`,
    /// `BYPASSRLS`), or it could not log in, and were set to `LOGIN` alone.
    pub attributes_reset: bool,
    pub joined_group: bool,
    pub password_set: bool,
}

#[derive(QueryableByName)]
struct Attributes {
    #[diesel(sql_type = Bool)]
    plain_login: bool,
    #[diesel(sql_type = Bool)]
    member: bool,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    exists: bool,
}

/// Creates `role` if it is missing, makes it a plain `LOGIN` role that is a member of its group,
/// and sets its password when one is given (as a SCRAM-SHA-256 verifier computed here, so the
/// password itself never reaches the server or its statement log). Idempotent; changes nothing
/// that is already right, so that many processes may call it at once (the tests do): a
/// concurrent creation is recognised by its `duplicate_object` or `unique_violation`.
///
/// The connection's user needs `CREATEROLE` (a superuser, RDS's master user, or an owner given
/// it), and the groups must exist: `landslide migrate` creates them.
pub async fn ensure_login_role(
    conn: &mut AsyncPgConnection,
    role: LoginRole,
    password: Option<&str>,
) -> anyhow::Result<RoleChanges> {
    let name = role.name();
    let group = role.group();
    let mut changes = RoleChanges::default();
    let group_exists: Exists =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS exists")
            .bind::<Text, _>(group)
            .get_result(conn)
            .await
            .context("cannot read the roles")?;
    anyhow::ensure!(
        group_exists.exists,
        "the group role {group} does not exist: run `landslide migrate` (with the schema owner's \
         DATABASE_URL) first; its migrations create it"
    );
    let mut found = state(conn, role).await?;
    if found.is_empty() {
        // The names are ours (`LoginRole`), never input: formatting them into SQL is safe.
        diesel::sql_query(format!(
            "DO $$ BEGIN CREATE ROLE {name} LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .execute(conn)
        .await
        .with_context(|| format!("cannot create the role {name} (the user needs CREATEROLE)"))?;
        changes.created = true;
        found = state(conn, role).await?;
    }
    let current = found
        .into_iter()
        .next()
        .with_context(|| format!("the role {name} vanished while it was set up"))?;
    if !current.plain_login {
        diesel::sql_query(format!(
            "ALTER ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS"
        ))
        .execute(conn)
        .await
        .with_context(|| format!("cannot make {name} a plain login role"))?;
        changes.attributes_reset = !changes.created;
    }
    if !current.member {
        diesel::sql_query(format!(
            "DO $$ BEGIN GRANT {group} TO {name}; \
             EXCEPTION WHEN unique_violation THEN NULL; END $$"
        ))
        .execute(conn)
        .await
        .with_context(|| format!("cannot make {name} a member of {group}"))?;
        changes.joined_group = true;
    }
    if let Some(password) = password {
        anyhow::ensure!(!password.is_empty(), "the password of {name} is empty");
        // A SCRAM verifier is base64, `$` and `:` only: nothing in it can end the literal.
        let verifier = scram_verifier(password);
        diesel::sql_query(format!("ALTER ROLE {name} PASSWORD '{verifier}'"))
            .execute(conn)
            .await
            .with_context(|| format!("cannot set the password of {name}"))?;
        changes.password_set = true;
    }
    Ok(changes)
}

/// Whether `role` exists (a row), is a plain login role, and is a member of its group.
async fn state(conn: &mut AsyncPgConnection, role: LoginRole) -> anyhow::Result<Vec<Attributes>> {
    diesel::sql_query(
        "SELECT rolcanlogin AND NOT (rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls) \
           AS plain_login, \
         EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid \
                 WHERE m.member = r.oid AND g.rolname = $2) AS member \
         FROM pg_roles r WHERE rolname = $1",
    )
    .bind::<Text, _>(role.name())
    .bind::<Text, _>(role.group())
    .load(conn)
    .await
    .context("cannot read the roles")
}

/// The SCRAM-SHA-256 verifier of `password`, as `ALTER ROLE … PASSWORD` takes it (and as `psql`'s
/// `\password` sends it): the server stores it, and never sees the password.
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// A password file's content: the first line, without its line end.
pub fn read_password_file(path: &std::path::Path) -> anyhow::Result<SecretString> {
    let text = SecretString::from(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the password file {}", path.display()))?,
    );
    let password = text.expose_secret().lines().next().unwrap_or("");
    anyhow::ensure!(
        !password.is_empty(),
        "the password file {} is empty",
        path.display()
    );
    Ok(password.into())
}
