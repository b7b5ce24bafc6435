//! What the integration tests stand on: a private nats-server per test (so a test may kill it), a
//! database of its own per test on the shared PostgreSQL, and waiting for conditions instead of
//! sleeping.
//!
//! `LANDSLIDE_TEST_DATABASE_URL` names the PostgreSQL server and an admin database
//! (default `postgres://postgres@127.0.0.1:5432/postgres`); `NATS_SERVER_BIN` the nats-server
//! binary (default: found on `PATH` or in `/usr/sbin`).

#![allow(dead_code)] // Each test module uses part of this.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use landslide_config::{Connections, Shutdown};
use landslide_nats::User;
use landslide_patience::Backoff;
use landslide_schema::postgres::{DatabaseUrl, LoginRole};
use landslide_telemetry::serve::{MetricsAt, with_operations};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    landslide_servers::free_port().expect("bind an ephemeral port")
}

/// `f`'s output, unless it takes more than 5 s: a request the broker refuses is never answered.
pub async fn within<F: std::future::Future>(f: F) -> Option<F::Output> {
    tokio::time::timeout(Duration::from_secs(5), f).await.ok()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`. A check that
/// hangs (a request to a port something else holds, which never answers) counts against the
/// same deadline: one once kept a run waiting until nextest's 180 s limit.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::constant(Duration::from_millis(20)).deadline(deadline, what);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left, check()).await {
            return v;
        }
        assert!(
            backoff.wait().await.is_ok(),
            "timed out after {timeout:?} waiting for {what}"
        );
    }
}

/// A private nats-server with JetStream and file storage (the reliability harness's, with the
/// users, permissions and TLS of every deployment), killed when dropped. Every client of a test
/// connects as one of its users.
pub struct Nats {
    pub server: landslide_servers::Nats,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Nats {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for nats");
        let server =
            landslide_servers::Nats::start(landslide_servers::NatsLayout::Single, dir.path())
                .await
                .expect("start nats-server");
        Self {
            url: server.url(0),
            server,
            _dir: dir,
        }
    }

    /// SIGKILL: no goodbye to clients, no flush.
    pub async fn kill(&mut self) {
        self.server.kill(0).await.expect("kill nats-server");
    }

    /// Starts again on the same port with the same storage; waits until JetStream answers.
    pub async fn restart(&mut self) {
        self.server.restart(0).await.expect("restart nats-server");
    }

    /// A role's connection configuration: `user` on this server, and on the database if given
    /// the login role of that user's role (`Db::url_for`).
    pub fn connections(&self, user: User, db: Option<&Db>) -> Connections {
        connections(&self.server, user, db)
    }

    /// A client as the operator (`admin`), for what tests look at.
    pub async fn client(&self) -> async_nats::Client {
        client_as(&self.server, User::Admin).await
    }

    /// A client as `user`, with that user's permissions.
    pub async fn client_as(&self, user: User) -> async_nats::Client {
        client_as(&self.server, user).await
    }

    /// A JetStream context as the operator.
    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

impl std::ops::Deref for Nats {
    type Target = landslide_servers::Nats;

    fn deref(&self) -> &Self::Target {
        &self.server
    }
}

/// A role's connection configuration: `user` on `nats`, on the database if given as the login
/// role of `user`'s role, the default names and polls.
pub fn connections(nats: &landslide_servers::Nats, user: User, db: Option<&Db>) -> Connections {
    Connections::new(nats.config(user), db.map(|db| db.url_for(user)))
}

/// A client of `nats` as `user`, with that user's permissions.
pub async fn client_as(nats: &landslide_servers::Nats, user: User) -> async_nats::Client {
    nats.client(user).await.expect("connect to test nats")
}

/// What a worker sets up when it starts (the streams, the consumer, the polls bucket seeded with
/// `polls`), as the worker user: for tests that run ingest without a worker.
pub async fn set_up(nats: &landslide_servers::Nats, polls: &landslide_schema::Polls) {
    set_up_topology(nats, &landslide_nats::Topology::default(), polls).await;
}

/// [`set_up`] with `topology`'s names and replicas.
pub async fn set_up_topology(
    nats: &landslide_servers::Nats,
    topology: &landslide_nats::Topology,
    polls: &landslide_schema::Polls,
) {
    let js = async_nats::jetstream::new(client_as(nats, User::Worker).await);
    // As patiently as a worker sets them up (`retry_startup`): a JetStream API request to a
    // cluster just started timed out once under CI's load ("cannot look up stream VOTES_DLQ").
    let waiting = landslide_telemetry::readiness::condition("test", "set-up", "setting up");
    landslide_nats::retry_startup("set up the streams and the consumers", &waiting, || async {
        // Set up already (by a worker, or for another role): what it recorded stands, so that a
        // role given another number of partitions finds the number it must refuse.
        if js.get_stream(&topology.votes_stream).await.is_ok() {
            return anyhow::Ok(());
        }
        landslide_nats::partitions::ensure_consumers(&js, topology, landslide_nats::Access::SetUp)
            .await
            .map(drop)
    })
    .await
    .expect("set up the streams and the consumers");
    landslide_nats::polls::watch_patiently(
        &js,
        topology,
        polls,
        landslide_nats::Access::SetUp,
        &waiting,
    )
    .await
    .expect("set up and seed the polls bucket");
}

impl Nats {
    /// How many messages `stream` holds.
    pub async fn messages(&self, stream: &str) -> u64 {
        let js = async_nats::jetstream::new(self.client().await);
        let mut stream = js.get_stream(stream).await.expect("open the stream");
        stream.info().await.expect("stream info").state.messages
    }
}

fn admin_url() -> String {
    std::env::var("LANDSLIDE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of this test's own, migrated by its owner (the server's superuser), dropped when
/// the value is dropped. The roles connect to it as their login roles (`landslide_worker`, …),
/// which every test shares on the server: created if missing (safely when tests do so at once),
/// without passwords (the test servers trust loopback), so the grants are what is tested.
pub struct Db {
    /// The owner's URL.
    pub url: String,
    name: String,
    admin: String,
}

impl Db {
    pub async fn create() -> Self {
        Self::create_on(&admin_url()).await
    }

    /// A database of its own on the server of `admin` (a superuser's URL), migrated.
    pub async fn create_on(admin: &str) -> Self {
        let db = Self::create_empty_on(admin).await;
        landslide_schema::postgres::migrate(&db.owner())
            .await
            .expect("migrate test database");
        db.ensure_login_roles().await;
        db
    }

    /// The login roles on this database's server, members of their groups (which the
    /// migrations create: call it after them). Cheap when they are in place already.
    pub async fn ensure_login_roles(&self) {
        let mut conn = AsyncPgConnection::establish(&self.admin)
            .await
            .expect("connect as the test server's superuser");
        for role in LoginRole::ALL {
            landslide_schema::postgres::roles::ensure_login_role(&mut conn, role, None)
                .await
                .unwrap_or_else(|e| panic!("set up the login role {role}: {e:#}"));
        }
    }

    /// A database of its own without the migrations applied.
    pub async fn create_empty() -> Self {
        Self::create_empty_on(&admin_url()).await
    }

    async fn create_empty_on(admin: &str) -> Self {
        let name = format!("landslide_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = AsyncPgConnection::establish(admin)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin} (LANDSLIDE_TEST_DATABASE_URL): {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let (base, _) = admin.rsplit_once('/').expect("database url has a path");
        let url = format!("{base}/{name}");
        Self {
            url,
            name,
            admin: admin.to_owned(),
        }
    }

    /// The owner's URL, parsed.
    pub fn owner(&self) -> DatabaseUrl {
        DatabaseUrl::parse(&self.url).expect("the test database's URL")
    }

    /// This database as `role`.
    pub fn url_as(&self, role: LoginRole) -> DatabaseUrl {
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        DatabaseUrl::parse(&format!("{scheme}://{role}@{host}")).expect("a login role's URL")
    }

    /// This database as the login role of `user`'s role (the owner for the others).
    pub fn url_for(&self, user: User) -> DatabaseUrl {
        landslide_servers::login_role(user).map_or_else(|| self.owner(), |role| self.url_as(role))
    }

    pub async fn conn(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url)
            .await
            .expect("connect to test database")
    }

    /// The choice of `voter`'s ballot; `None` while there is none, or while the database cannot
    /// be reached: for waiting across a restart of PostgreSQL, where [`Db::ballot`] panics.
    pub async fn choice_when_reachable(&self, voter: uuid::Uuid) -> Option<String> {
        use landslide_schema::db::ballots::dsl as b;
        let mut conn = landslide_schema::postgres::connect(&self.owner())
            .await
            .ok()?;
        b::ballots
            .filter(b::voter.eq(voter))
            .select(b::choice)
            .first(&mut conn)
            .await
            .ok()
    }

    /// `(choice, ts, event_id)` of one ballot.
    pub async fn ballot(&self, poll: &str, voter: uuid::Uuid) -> Option<(String, i64, uuid::Uuid)> {
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

    /// Per option of `poll` with a tally or a ballot: (sum of tally shards, count of ballots).
    /// An option whose shards sum to zero and has no ballot is left out, however its rows look.
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
        rows.into_iter()
            .filter(|r| (r.tally, r.ballots) != (0, 0))
            .map(|r| (r.option, r.tally, r.ballots))
            .collect()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
        // Drop runs outside any runtime guarantee: use a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = AsyncPgConnection::establish(&admin).await {
                    let _ =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A role running in this test process, stopped through its shutdown signal.
pub struct Role {
    stop: Option<landslide_config::Trigger>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Role {
    fn spawn<F>(run: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, shutdown) = Shutdown::new();
        Self {
            stop: Some(stop),
            handle: tokio::spawn(run(shutdown)),
        }
    }

    /// A role with its operations listener (`/metrics`, `/healthz`) on `operations` beside it, as
    /// the binary runs one with `LANDSLIDE_METRICS_LISTEN`.
    fn spawn_with_operations<F>(
        operations: tokio::net::TcpListener,
        run: impl FnOnce(Shutdown) -> F,
    ) -> Self
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self::spawn(move |shutdown| {
            let stop = shutdown.clone().wait();
            with_operations(operations, stop, run(shutdown))
        })
    }

    /// Signals shutdown and waits for a clean exit.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.stop();
        }
        let handle = &mut self.handle;
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("role stops within 30 s")
            .expect("role task did not panic")
            .expect("role exits cleanly");
    }

    /// Waits for the role to end by itself (a fail point) and returns its result.
    pub async fn join(mut self) -> anyhow::Result<()> {
        // Keep the sender alive: dropping it would ask the role to shut down.
        let _stop = self.stop.take();
        let handle = &mut self.handle;
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("role ends within 30 s")
            .expect("role task did not panic")
    }

    /// Whether the role has ended (by itself: nothing asked it to stop).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Aborts the task: no shutdown path runs, as if the process were killed.
    pub fn abort(self) {
        self.handle.abort();
    }
}

/// The key that signs the tests' voter cookies.
pub const COOKIE_KEY: &str = "integration-test-cookie-key-of-at-least-32-bytes";
/// The key of the voter ids of the tests' cookie-less keyed votes.
pub const VOTER_ID_KEY: &str = "integration-test-voter-id-key-of-at-least-32-bytes";
/// The receipt key of the tests' ingest nodes and tallies.
pub const RECEIPT_KEY: &str = "integration-test-receipt-key-of-32-bytes-or-more";

pub fn secret(key: &str) -> landslide_ingest::HmacKey {
    landslide_ingest::HmacKey::new(key).expect("a key of 32 bytes or more")
}

pub fn receipt_key() -> landslide_schema::receipt::ReceiptKey {
    landslide_schema::receipt::ReceiptKey::new(RECEIPT_KEY).expect("receipt key")
}

/// The keys of the tests' ingest nodes.
pub fn keys() -> landslide_ingest::Keys {
    landslide_ingest::Keys {
        cookies: landslide_ingest::CookieKeys::new(secret(COOKIE_KEY), vec![]),
        voter_ids: landslide_ingest::VoterIdKey(secret(VOTER_ID_KEY)),
        receipts: receipt_key(),
    }
}

/// The same keys as files in `dir`, for a `landslide` process: the variables that name them.
pub fn key_files(dir: &std::path::Path) -> [(&'static str, std::path::PathBuf); 3] {
    [
        ("LANDSLIDE_COOKIE_KEYS_FILE", "cookie-keys", COOKIE_KEY),
        ("LANDSLIDE_VOTER_ID_KEY_FILE", "voter-id-key", VOTER_ID_KEY),
        ("LANDSLIDE_RECEIPT_KEY_FILE", "receipt-key", RECEIPT_KEY),
    ]
    .map(|(var, name, key)| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{key}\n")).expect("write a key file");
        (var, path)
    })
}

/// An ingest node on an ephemeral port, with its `/metrics` on an operations listener of its own,
/// as every deployment runs it.
pub struct Ingest {
    pub url: String,
    /// Its operations listener: `/metrics` and `/healthz`.
    pub metrics_url: String,
    pub role: Role,
}

/// An ingest node whose clock is shifted by `clock_offset_ms`, ready. A node skewed on purpose
/// is one the design must tolerate (a change of mind on a slow node still wins; a slow node
/// cannot vote after the close), so its clock bound admits the skew, with the default bound's
/// 2 s to spare; the bound itself is tested in `edge.rs`.
pub async fn ingest(nats: &landslide_servers::Nats, node: &str, clock_offset_ms: i64) -> Ingest {
    ingest_with(nats, node, |config| {
        config.clock = std::sync::Arc::new(landslide_ingest::SystemClock {
            offset_ms: clock_offset_ms,
        });
        if clock_offset_ms != 0 {
            config.max_clock_offset = landslide_ingest::MaxClockOffset::from_millis(
                clock_offset_ms.unsigned_abs() + 2_000,
            )
            .expect("a bound the workers' tolerance covers");
        }
    })
    .await
}

pub async fn ingest_with(
    nats: &landslide_servers::Nats,
    node: &str,
    adjust: impl FnOnce(&mut landslide_ingest::Config),
) -> Ingest {
    let ingest = start_ingest(nats, node, adjust).await;
    let probe = reqwest::Client::new();
    let ready = format!("{}/readyz", ingest.url);
    let last = std::sync::Mutex::new(String::new());
    let waited = tokio::time::timeout(
        Duration::from_secs(15),
        wait_for("ingest to be ready", Duration::from_secs(3600), || async {
            let response = probe.get(&ready).send().await.ok()?;
            let ok = response.status().is_success();
            *last.lock().unwrap() = response.text().await.unwrap_or_default();
            ok.then_some(())
        }),
    )
    .await;
    if waited.is_err() {
        let said = last.lock().unwrap().clone();
        let ended = if ingest.role.is_finished() {
            format!("; the role ended: {:?}", ingest.role.join().await)
        } else {
            String::new()
        };
        panic!("ingest was not ready within 15 s; /readyz said: {said:?}{ended}");
    }
    ingest
}

/// An ingest node, started but perhaps not ready (yet, or at all).
pub async fn start_ingest(
    nats: &landslide_servers::Nats,
    node: &str,
    adjust: impl FnOnce(&mut landslide_ingest::Config),
) -> Ingest {
    let mut config = landslide_ingest::Config::new(
        landslide_schema::NodeId::parse(node).expect("node id"),
        connections(nats, User::Ingest, None),
        keys(),
    );
    config.metrics = MetricsAt::Operations;
    adjust(&mut config);
    set_up_topology(
        nats,
        &config.connections.topology,
        &config.connections.polls,
    )
    .await;
    let (listener, url) = listen("ingest").await;
    let (operations, metrics_url) = listen("ingest's operations").await;
    let role = Role::spawn_with_operations(operations, move |shutdown| {
        landslide_ingest::run(config, listener, shutdown)
    });
    Ingest {
        url,
        metrics_url,
        role,
    }
}

/// A listener on an ephemeral loopback port, and its base URL.
async fn listen(what: &str) -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind {what}: {err}"));
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (listener, url)
}

/// A dedup-worker in this process, as `landslide_worker`.
pub fn worker(nats: &landslide_servers::Nats, db: &Db) -> Role {
    worker_with(nats, db, |_| {})
}

pub fn worker_with(
    nats: &landslide_servers::Nats,
    db: &Db,
    adjust: impl FnOnce(&mut landslide_dedup_worker::Config),
) -> Role {
    let mut config = landslide_dedup_worker::Config::new(connections(nats, User::Worker, Some(db)));
    adjust(&mut config);
    Role::spawn(move |shutdown| landslide_dedup_worker::run(config, shutdown))
}

/// A browser: its own cookie jar.
pub fn voter() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// Casts a vote through the JSON API; returns the status and the JSON body.
pub async fn vote_api(
    client: &reqwest::Client,
    ingest_url: &str,
    poll: &str,
    choice: &str,
) -> (u16, serde_json::Value) {
    let response = post_vote(client, ingest_url, poll, choice).await;
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// `POST /api/votes` of `choice` in `poll` by `client`: the whole response, headers included.
pub async fn post_vote(
    client: &reqwest::Client,
    ingest_url: &str,
    poll: &str,
    choice: &str,
) -> reqwest::Response {
    client
        .post(format!("{ingest_url}/api/votes"))
        .json(&serde_json::json!({ "poll": poll, "choice": choice }))
        .send()
        .await
        .expect("send vote")
}

/// Posts one vote with `cookie` (`name=value`, or none); returns the status and the voter cookie
/// the answer sets, as `name=value`.
pub async fn vote_with_cookie(
    url: &str,
    cookie: Option<&str>,
    choice: &str,
) -> (u16, Option<String>) {
    let mut request = reqwest::Client::new()
        .post(format!("{url}/api/votes"))
        .json(&serde_json::json!({"poll": "pets", "choice": choice}));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.unwrap();
    let set = response
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    (response.status().as_u16(), set)
}

/// The workers' pending votes in every vote partition (`landslide_nats::partitions::pending`,
/// default topology); `None` until a worker has created the consumers.
pub async fn pending(nats: &landslide_servers::Nats) -> Option<u64> {
    let js = async_nats::jetstream::new(client_as(nats, User::Admin).await);
    let topology = landslide_nats::Topology::default();
    landslide_nats::partitions::pending(&js, &topology)
        .await
        .ok()
}

/// Waits until the workers' consumer exists and has nothing pending.
pub async fn drained(nats: &landslide_servers::Nats) {
    wait_for("the stream to drain", Duration::from_secs(60), || async {
        (pending(nats).await == Some(0)).then_some(())
    })
    .await;
}

/// The tally role on an ephemeral port, after what a worker sets up, with its `/metrics` on an
/// operations listener of its own.
pub struct Tally {
    pub url: String,
    /// Its operations listener: `/metrics` and `/healthz`.
    pub metrics_url: String,
    pub role: Role,
}

/// Tally in this process, as `landslide_tally`.
pub async fn tally(nats: &landslide_servers::Nats, db: &Db) -> Tally {
    tally_with(nats, db, |_| {}).await
}

pub async fn tally_with(
    nats: &landslide_servers::Nats,
    db: &Db,
    adjust: impl FnOnce(&mut landslide_tally::Config),
) -> Tally {
    let mut config =
        landslide_tally::Config::new(connections(nats, User::Tally, Some(db)), receipt_key());
    config.refresh = Duration::from_millis(50);
    config.metrics = MetricsAt::Operations;
    adjust(&mut config);
    // Tally waits for what a worker sets up; a test may run it without one.
    set_up_topology(
        nats,
        &config.connections.topology,
        &config.connections.polls,
    )
    .await;
    let (listener, url) = listen("tally").await;
    let (operations, metrics_url) = listen("tally's operations").await;
    let role = Role::spawn_with_operations(operations, move |shutdown| {
        landslide_tally::run(config, listener, shutdown)
    });
    Tally {
        url,
        metrics_url,
        role,
    }
}

impl Tally {
    /// `GET /api/results/<poll>` once nothing is pending and `total` votes are counted. (Pending
    /// alone is not enough: a snapshot taken before the votes were cast has nothing pending too.)
    pub async fn settled_results(&self, poll: &str, total: u64) -> serde_json::Value {
        settled_results(&self.url, poll, total).await
    }
}

/// `GET <tally>/api/results/<poll>` once nothing is pending and `total` votes are counted.
pub async fn settled_results(tally_url: &str, poll: &str, total: u64) -> serde_json::Value {
    let url = format!("{tally_url}/api/results/{poll}");
    wait_for("settled results", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let response = reqwest::get(&url).await.ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            (body["pending"] == 0 && body["total"] == total).then_some(body)
        }
    })
    .await
}

/// The `/metrics` page of a role's operations listener (`Ingest::metrics_url`).
pub async fn metrics_page(base_url: &str) -> String {
    let response = reqwest::get(format!("{base_url}/metrics")).await.unwrap();
    response.text().await.unwrap()
}

/// A metric's value in a Prometheus text page (summed over its labels).
pub use landslide_telemetry::metric_value as metric;
