//! PostgreSQL as the roles reach it. TLS is verified as `DATABASE_URL`'s `sslmode` says, against
//! servers of the harness's own with TLS only (the shared test server has no TLS), on every
//! connection path (`connect`, `migrate`, the pools). And least privilege: each role's database
//! user may do what its role does and nothing more; the roles that may not migrate refuse a
//! schema older than their binary, naming `landslide migrate`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use landslide_nats::User;
use landslide_schema::postgres::{DatabaseUrl, LoginRole, connect};
use landslide_servers::Postgres;
use landslide_servers::postgres::{PgAccess, PgTls};
use landslide_servers::tls::Authority;

use crate::support::{self, Db, Nats};

/// A harness PostgreSQL that takes TLS connections only, with a certificate for `hosts` from a
/// CA of its own; and a second CA that signed nothing of it.
struct TlsServer {
    pg: Postgres,
    ca: PathBuf,
    other_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start(hosts: &[&str], superuser_password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::create(&dir.path().join("ca"), "test CA").unwrap();
        let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
        let cert = ca
            .issue("postgres", &hosts, landslide_servers::tls::Purpose::Server)
            .unwrap();
        let other = Authority::create(&dir.path().join("other-ca"), "another CA").unwrap();
        let access = PgAccess {
            tls: Some(PgTls { cert, ca: ca.ca() }),
            superuser_password: superuser_password.map(str::to_owned),
        };
        let pg = Postgres::start_with_access(dir.path(), access)
            .await
            .unwrap();
        Self {
            pg,
            ca: ca.ca(),
            other_ca: other.ca(),
            _dir: dir,
        }
    }

    /// The `postgres` database as the superuser on `host`, with these parameters.
    fn url(&self, host: &str, params: &str) -> DatabaseUrl {
        let url = format!(
            "postgres://postgres@{host}:{}/postgres?{params}",
            self.pg.port()
        );
        DatabaseUrl::parse(&url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }
}

fn root(path: &Path) -> String {
    landslide_schema::postgres::percent_encode(&path.to_string_lossy())
}

#[derive(QueryableByName)]
struct Encrypted {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
}

/// Whether this session runs over TLS, by the server's own account.
async fn encrypted(conn: &mut AsyncPgConnection) -> bool {
    diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result::<Encrypted>(conn)
        .await
        .unwrap()
        .ssl
}

/// The error of a connection that must fail, with its causes.
async fn refused(url: &DatabaseUrl) -> String {
    match connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_reaches_a_server_whose_certificate_names_it_on_every_connection_path() {
    let server = TlsServer::start(&["127.0.0.1"], None).await;
    let url = server.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", root(&server.ca)),
    );
    // One connection, as every role opens its first.
    let mut conn = connect(&url).await.expect("verify-full connects");
    assert!(encrypted(&mut conn).await);
    // The migrations, through the blocking wrapper.
    let applied = landslide_schema::postgres::migrate(&url)
        .await
        .expect("migrate over TLS");
    assert!(!applied.is_empty());
    // A pool (tally's receipts), whose connections diesel-async would otherwise make itself,
    // without TLS.
    let pool = diesel_async::pooled_connection::bb8::Pool::builder()
        .max_size(1)
        .build(landslide_schema::postgres::pool_manager(&url))
        .await
        .unwrap();
    let mut pooled = pool.get().await.expect("a pooled connection over TLS");
    assert!(encrypted(&mut pooled).await);
    landslide_schema::postgres::check_schema(&mut pooled)
        .await
        .expect("the schema is current");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_certificate_from_another_ca_or_for_another_host() {
    let server = TlsServer::start(&["127.0.0.1"], None).await;
    let with = |host: &str, mode: &str, ca: &Path| {
        server.url(host, &format!("sslmode={mode}&sslrootcert={}", root(ca)))
    };

    // Signed by a CA the client does not trust: refused whether the name is checked or not.
    for mode in ["verify-full", "verify-ca"] {
        let err = refused(&with("127.0.0.1", mode, &server.other_ca)).await;
        assert!(err.contains("invalid peer certificate"), "{mode}: {err}");
        assert!(err.contains("UnknownIssuer"), "{mode}: {err}");
        assert!(err.contains("DATABASE_URL"), "{mode}: {err}");
    }
    // From the right CA, but for 127.0.0.1 only: `localhost` is another name.
    let err = refused(&with("localhost", "verify-full", &server.ca)).await;
    assert!(err.contains("not valid for name \"localhost\""), "{err}");
    // verify-ca checks the chain alone, as libpq's does.
    let mut conn = connect(&with("localhost", "verify-ca", &server.ca))
        .await
        .expect("verify-ca ignores the name");
    assert!(encrypted(&mut conn).await);
    // And `require` without a CA checks nothing, as libpq's: encrypted, to whoever answered.
    let mut conn = connect(&server.url("localhost", "sslmode=require"))
        .await
        .expect("require checks no certificate");
    assert!(encrypted(&mut conn).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_takes_tls_only_refuses_plaintext_and_prefer_gets_tls() {
    let server = TlsServer::start(&["127.0.0.1"], None).await;
    let err = refused(&server.url("127.0.0.1", "sslmode=disable")).await;
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    assert!(err.contains("no encryption"), "{err}");
    // libpq's default asks for TLS first, and gets it here.
    let mut conn = connect(&server.url("127.0.0.1", ""))
        .await
        .expect("prefer connects");
    assert!(encrypted(&mut conn).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_never_falls_back_to_plaintext_on_a_server_without_tls() {
    // A server without TLS (the harness's default). Whoever asked for verification gets no
    // connection, where `prefer` (the default) goes plaintext.
    let dir = tempfile::tempdir().unwrap();
    let pg = Postgres::start(dir.path()).await.unwrap();
    let ca = Authority::create(&dir.path().join("ca"), "test CA").unwrap();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url("postgres"),
        root(&ca.ca())
    );
    let err = refused(&DatabaseUrl::parse(&url).unwrap()).await;
    assert!(err.contains("server does not support TLS"), "{err}");
    let mut conn = connect(&DatabaseUrl::parse(&pg.url("postgres")).unwrap())
        .await
        .expect("prefer falls back");
    assert!(!encrypted(&mut conn).await);
}

/// The error of a statement that must be refused.
async fn denied(conn: &mut AsyncPgConnection, statement: &str) -> String {
    match diesel::sql_query(statement).execute(conn).await {
        Ok(_) => panic!("{statement:?} was allowed"),
        Err(err) => err.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tally_and_audit_users_read_but_cannot_write() {
    let db = Db::create().await;
    for role in [LoginRole::Tally, LoginRole::Audit] {
        let mut conn = connect(&db.url_as(role)).await.unwrap();
        diesel::sql_query("SELECT poll FROM ballots")
            .execute(&mut conn)
            .await
            .expect("a reader reads");
        for statement in [
            "INSERT INTO ballots (poll, voter, choice, ts, event_id, after_ts, stored_ns) \
             VALUES ('pets', gen_random_uuid(), 'cats', 1, gen_random_uuid(), 0, 0)",
            "UPDATE tallies SET votes = votes + 1",
            "INSERT INTO tallies (poll, option, shard, votes) VALUES ('pets', 'cats', 0, 1)",
            "DELETE FROM ballots",
            "TRUNCATE tallies",
        ] {
            let err = denied(&mut conn, statement).await;
            assert!(
                err.contains("permission denied"),
                "{role}: {statement}: {err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_user_upserts_but_deletes_nothing_and_changes_no_schema() {
    let db = Db::create().await;
    let mut conn = connect(&db.url_as(LoginRole::Worker)).await.unwrap();
    // What the upsert does: insert, update, read back.
    diesel::sql_query(
        "INSERT INTO tallies (poll, option, shard, votes) VALUES ('pets', 'cats', 0, 1) \
         ON CONFLICT (poll, option, shard) DO UPDATE SET votes = tallies.votes + 1 \
         RETURNING votes",
    )
    .execute(&mut conn)
    .await
    .expect("the worker upserts");
    for (statement, expected) in [
        ("DELETE FROM ballots", "permission denied"),
        ("TRUNCATE tallies", "permission denied"),
        (
            "DELETE FROM __diesel_schema_migrations",
            "permission denied",
        ),
        (
            "CREATE TABLE mine (n int)",
            "permission denied for schema public",
        ),
        ("DROP TABLE ballots", "must be owner"),
        ("ALTER TABLE ballots ADD COLUMN note text", "must be owner"),
        (
            "CREATE INDEX ballots_choice ON ballots (choice)",
            "must be owner",
        ),
        ("CREATE ROLE intruder", "permission denied"),
    ] {
        let err = denied(&mut conn, statement).await;
        assert!(err.contains(expected), "{statement}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_roles_refuse_a_database_that_is_not_migrated_naming_landslide_migrate() {
    let nats = Nats::start().await;
    // The login roles exist on the server (another database's migrations made their groups).
    drop(Db::create().await);
    let db = Db::create_empty().await;

    let worker = support::worker(&nats, &db).join().await;
    let err = format!("{:#}", worker.expect_err("the worker refuses"));
    assert!(err.contains("no Landslide schema"), "{err}");
    assert!(err.contains("run `landslide migrate`"), "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");

    let tally = support::tally(&nats, &db).await.role.join().await;
    let err = format!("{:#}", tally.expect_err("tally refuses"));
    assert!(err.contains("run `landslide migrate`"), "{err}");

    // An older schema: a migration of this binary missing.
    landslide_schema::postgres::migrate(&db.owner())
        .await
        .unwrap();
    let mut owner = db.conn().await;
    diesel::sql_query(
        "DELETE FROM __diesel_schema_migrations WHERE version = \
         (SELECT max(version) FROM __diesel_schema_migrations)",
    )
    .execute(&mut owner)
    .await
    .unwrap();
    let mut audit =
        landslide_tally::audit::AuditConfig::new(nats.connections(User::Audit, Some(&db)));
    audit.wait = std::time::Duration::from_secs(1);
    let err = format!(
        "{:#}",
        landslide_tally::audit::audit(&audit)
            .await
            .expect_err("audit refuses")
    );
    assert!(err.contains("older than this binary"), "{err}");
    assert!(err.contains(&newest_migration()), "{err}");
    assert!(err.contains("run `landslide migrate`"), "{err}");
}

/// The names of this binary's migrations, oldest first.
fn migrations() -> Vec<String> {
    use diesel::migration::MigrationSource;
    let mut names: Vec<String> =
        MigrationSource::<diesel::pg::Pg>::migrations(&landslide_schema::db::MIGRATIONS)
            .unwrap()
            .iter()
            .map(|m| m.name().to_string())
            .collect();
    names.sort();
    names
}

fn newest_migration() -> String {
    migrations().pop().unwrap()
}

/// Runs `landslide <args>` with `DATABASE_URL` and `env`: whether it succeeded, and what it said.
fn landslide(args: &[&str], database_url: &str, env: &[(&str, &OsStr)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_landslide"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// What a deployment does, by the commands it runs: `landslide migrate` as the schema's owner,
/// `landslide db-users` with a password file per role, then each role connects as its user, over
/// TLS verified against the CA, and only with its password.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_and_db_users_set_a_database_up_as_a_deployment_does() {
    let server = TlsServer::start(&["127.0.0.1"], Some("owner-password")).await;
    let owner = server.pg.url("postgres");
    assert!(owner.contains("sslmode=verify-full"), "{owner}");

    let (ok, said) = landslide(&["migrate"], &owner, &[]);
    assert!(ok, "{said}");
    let all = format!("applied {} migration(s)", migrations().len());
    assert!(said.contains(&all), "{said}");
    assert!(!said.contains("owner-password"), "{said}");
    let (ok, said) = landslide(&["migrate"], &owner, &[]);
    assert!(ok && said.contains("is current"), "{said}");

    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["db-users".to_owned()];
    for role in LoginRole::ALL {
        let file = dir.path().join(role.short());
        std::fs::write(&file, format!("{}-password\n", role.short())).unwrap();
        args.push(format!("--{}-password-file", role.short()));
        args.push(file.to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, said) = landslide(&args, &owner, &[]);
    assert!(ok, "{said}");
    assert!(
        said.contains("landslide_worker (member of landslide_write): created, made a member of landslide_write, password set"),
        "{said}"
    );
    assert!(
        said.contains("landslide_audit (member of landslide_read)"),
        "{said}"
    );
    assert!(!said.contains("worker-password"), "{said}");

    for role in LoginRole::ALL {
        let password = format!("{}-password", role.short());
        let url = DatabaseUrl::parse(&server.pg.url_as(role.name(), Some(&password), "postgres"))
            .unwrap();
        let mut conn = connect(&url)
            .await
            .expect("the role connects with its password");
        assert!(encrypted(&mut conn).await);
        landslide_schema::postgres::check_schema(&mut conn)
            .await
            .expect("the role reads the schema version");
        let wrong =
            DatabaseUrl::parse(&server.pg.url_as(role.name(), Some("wrong"), "postgres")).unwrap();
        let err = refused(&wrong).await;
        assert!(err.contains("password authentication failed"), "{err}");
    }

    // As the units run them: one URL naming only the server, and each role's user and password
    // file apart (DATABASE_USER, DATABASE_PASSWORD_FILE). `migrate` logs in, and then, as a role
    // that may only read, is refused the migrations table it would create.
    let shared = server.pg.url_as("nobody", None, "postgres");
    let as_role = |user: &str, password_file: &Path| {
        let env = [
            ("DATABASE_USER", OsStr::new(user)),
            ("DATABASE_PASSWORD_FILE", password_file.as_os_str()),
        ];
        landslide(&["migrate"], &shared, &env)
    };
    let tally_file = dir.path().join("tally");
    let (ok, said) = as_role("landslide_tally", &tally_file);
    assert!(
        !ok && said.contains("permission denied for schema public"),
        "{said}"
    );
    let (ok, said) = as_role("landslide_worker", &tally_file);
    assert!(
        !ok && said.contains("password authentication failed"),
        "{said}"
    );
    assert!(!said.contains("tally-password"), "{said}");
    let (ok, said) = landslide(&["migrate"], &shared, &[]);
    assert!(
        !ok && said.contains("nobody") && said.contains("password missing"),
        "the shared URL alone logs in as nobody: {said}"
    );
}
