//! What the integration tests stand on: a private nats-server per test (so a test may kill it), a
//! database of its own per test on the shared PostgreSQL, and waiting for conditions instead of
//! sleeping.
//!
//! `LANDSLIDE_TEST_DATABASE_URL` names the PostgreSQL server and an admin database
//! (default `postgres://postgres@127.0.0.1:5432/postgres`); `NATS_SERVER_BIN` the nats-server
//! binary (default: found on `PATH` or in `/usr/sbin`).

#![allow(dead_code)] // Each test module uses part of this.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .expect("nats-server not found: install it (apt-get install nats-server)")
}

/// A private nats-server with JetStream and file storage, killed when dropped.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Nats {
    pub async fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir for nats");
        let mut nats = Self {
            child: None,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
        };
        nats.spawn().await;
        nats
    }

    async fn spawn(&mut self) {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .args(["--server_name", "landslide-test"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let url = self.url.clone();
        wait_for("nats-server to accept clients", Duration::from_secs(15), || {
            let url = url.clone();
            async move {
                let client = async_nats::connect(&url).await.ok()?;
                let js = async_nats::jetstream::new(client);
                js.query_account().await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// SIGKILL: no goodbye to clients, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url).await.expect("connect to test nats")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn admin_url() -> String {
    std::env::var("LANDSLIDE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of this test's own, migrated, dropped when the value is dropped.
pub struct Db {
    pub url: String,
    name: String,
}

impl Db {
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("landslide_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = AsyncPgConnection::establish(&admin)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin} (LANDSLIDE_TEST_DATABASE_URL): {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let (base, _) = admin.rsplit_once('/').expect("database url has a path");
        let url = format!("{base}/{name}");
        landslide_schema::migrate::apply(&url)
            .await
            .expect("migrate test database");
        Self { url, name }
    }

    pub async fn conn(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url)
            .await
            .expect("connect to test database")
    }

    /// `(choice, ts, event_id)` of one ballot.
    pub async fn ballot(
        &self,
        poll: &str,
        voter: uuid::Uuid,
    ) -> Option<(String, i64, uuid::Uuid)> {
        use landslide_schema::db::ballots::dsl as b;
        b::ballots
            .filter(b::poll.eq(poll))
            .filter(b::voter.eq(voter))
            .select((b::choice, b::ts, b::event_id))
            .first(&mut self.conn().await)
            .await
            .optional()
            .expect("read ballot")
    }

    /// Per option of `poll`: (sum of tally shards, count of ballots).
    pub async fn tally_and_count(&self, poll: &str) -> Vec<(String, i64, i64)> {
        #[derive(QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            option: String,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            tally: i64,
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            ballots: i64,
        }
        let rows: Vec<Row> = diesel::sql_query(
            "SELECT o.option, \
               COALESCE((SELECT sum(votes) FROM tallies t WHERE t.poll = $1 AND t.option = o.option), 0)::bigint AS tally, \
               (SELECT count(*) FROM ballots b WHERE b.poll = $1 AND b.choice = o.option) AS ballots \
             FROM (SELECT option FROM tallies WHERE poll = $1 UNION SELECT choice FROM ballots WHERE poll = $1) o \
             ORDER BY o.option",
        )
        .bind::<diesel::sql_types::Text, _>(poll)
        .load(&mut self.conn().await)
        .await
        .expect("read tallies");
        rows.into_iter().map(|r| (r.option, r.tally, r.ballots)).collect()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = AsyncPgConnection::establish(&admin_url()).await {
                    let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}
