//! `landslide up`: the whole system on this machine, nats-server, PostgreSQL, ingest, a worker and
//! tally, the servers started and kept under one data folder by [`stack`].

pub mod stack;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use landslide_config::{Connections, Shutdown};
use landslide_nats::{Access, NatsConfig, Topology, User};
use landslide_schema::postgres::{DatabaseUrl, LoginRole};
use landslide_schema::{NodeId, Polls};
use landslide_telemetry::serve::MetricsAt;
use secrecy::ExposeSecret as _;

use crate::cmd::args::{ClientLimitArgs, ClientLimits, KeyArgs, Shared, non_empty_env, secret_env};
use crate::cmd::role::{Role, bind};
use stack::{ENV_FILE, GivenKeys, LocalConfig, LocalPorts, LocalStack, NatsUsers};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where `up` keeps its nats-server's and PostgreSQL's data, and its keys (cookie-keys,
    /// voter-id-key, receipt-key) and env file.
    #[arg(long, env = "LANDSLIDE_DATA_DIR", default_value = ".landslide")]
    data_dir: PathBuf,
    /// Address of the ingest node (the voting form).
    #[arg(long, default_value = landslide_ingest::DEFAULT_LISTEN)]
    ingest_listen: SocketAddr,
    /// Address of tally (the results).
    #[arg(long, default_value = landslide_tally::DEFAULT_LISTEN)]
    tally_listen: SocketAddr,
    /// Address of the three roles' /metrics (and /healthz), as every deployment serves them: on
    /// a listener of their own, not beside the pages.
    #[arg(long, default_value = "127.0.0.1:9080")]
    metrics_listen: SocketAddr,
    /// Port of the nats-server that `up` starts (unless NATS_URL is set).
    #[arg(long, default_value_t = LocalPorts::default().nats)]
    nats_port: u16,
    /// Port of the PostgreSQL that `up` starts (unless DATABASE_URL is set).
    #[arg(long, default_value_t = LocalPorts::default().postgres)]
    postgres_port: u16,
    /// A TOML file of polls: written as a new revision if it is not the latest already (`up`
    /// with a file means "these polls", even when the data folder has others).
    #[arg(long, env = "LANDSLIDE_POLLS")]
    polls: Option<PathBuf>,
    #[command(flatten)]
    limits: ClientLimitArgs,
    /// Key files to use instead of those `up` generates and keeps in its data folder.
    #[command(flatten)]
    keys: KeyArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let polls = Shared::polls_file(args.polls.as_deref())?;
    let limits = args.limits.settings()?;
    // Bind every address before starting any server, so a port in use fails at once.
    let listeners = Listeners {
        ingest: bind(args.ingest_listen).await?,
        tally: bind(args.tally_listen).await?,
        operations: bind(args.metrics_listen).await?,
    };
    let mut local = LocalConfig::new(&args.data_dir);
    local.nats = non_empty_env("NATS_URL").map(given_nats).transpose()?;
    local.database_url = secret_env("DATABASE_URL")
        .map(|url| DatabaseUrl::parse(url.expose_secret()))
        .transpose()?;
    local.keys = GivenKeys {
        cookies: args.keys.cookie_keys_file.clone(),
        voter_ids: args.keys.voter_id_key_file.clone(),
        receipts: args.keys.receipts.receipt_key_file.clone(),
    };
    local.ports = LocalPorts {
        nats: args.nats_port,
        postgres: args.postgres_port,
    };
    let stack = LocalStack::start(local).await?;
    let result = async {
        stack.write_env()?;
        if args.polls.is_some() {
            make_current(&stack.nats_config(User::Polls), &polls).await?;
        }
        run_roles(&stack, polls, limits, listeners, &args.data_dir).await
    }
    .await;
    let stopped = stack.stop().await;
    result.and(stopped)?;
    Ok(ExitCode::SUCCESS)
}

/// The caller's NATS for `up`: each role connects as its own user, with its password from
/// `LANDSLIDE_NATS_<USER>_PASSWORD` (whose hash the server's `nats/auth.conf` reads from
/// `LANDSLIDE_NATS_<USER>_PASSWORD_HASH`), verifying the server against `NATS_CA` if set.
fn given_nats(url: String) -> anyhow::Result<NatsUsers> {
    let ca = non_empty_env("NATS_CA").map(PathBuf::from);
    User::ALL
        .into_iter()
        .map(|user| {
            let var = user.password_var();
            let password = secret_env(&var).with_context(|| {
                format!(
                    "NATS_URL is set, so `up` uses that server: give each role's password in \
                     {var} and the other LANDSLIDE_NATS_<USER>_PASSWORD variables (the \
                     passwords whose hashes the server's nats/auth.conf reads)"
                )
            })?;
            Ok((
                user,
                NatsConfig::user(url.clone(), user.name(), password, ca.clone()),
            ))
        })
        .collect()
}

/// Writes `polls` (up's `--polls` file) as a new revision unless the bucket's latest already is
/// that: `up` with a file means "these polls", even when the data folder has others.
async fn make_current(nats: &NatsConfig, polls: &Polls) -> anyhow::Result<()> {
    use landslide_nats::polls;
    let client = landslide_nats::connect(nats, User::Polls, "landslide-up").await?;
    let js = async_nats::jetstream::new(client);
    let store = polls::ensure_bucket(&js, &Topology::default(), Access::SetUp).await?;
    let latest = polls::read_all(&store).await?.revisions.pop();
    if latest.is_none_or(|current| &current.polls != polls) {
        polls::put(&store, &polls.to_toml()).await?;
    }
    Ok(())
}

/// What `up` serves on.
struct Listeners {
    ingest: tokio::net::TcpListener,
    tally: tokio::net::TcpListener,
    /// `/metrics` of all three roles (one registry per process).
    operations: tokio::net::TcpListener,
}

async fn run_roles(
    stack: &LocalStack,
    polls: Polls,
    (rate_limit, client_ip_header): ClientLimits,
    listeners: Listeners,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let Listeners {
        ingest: ingest_listener,
        tally: tally_listener,
        operations,
    } = listeners;
    // As the schema's owner, before any role starts: the roles' users may not migrate. Our own
    // PostgreSQL is migrated already; a given DATABASE_URL is its owner's.
    landslide_schema::postgres::migrate(&stack.database_url).await?;
    let node_id = NodeId::parse("local").context("the local node id is valid")?;
    // Read as `landslide ingest` and `landslide tally` read them.
    let keys = stack.key_files.read()?;
    let receipt_key = keys.receipts.clone();
    // One connection configuration, each role with its own NATS user and database user.
    let connections = |user: User, database: Option<LoginRole>| {
        let mut connections = Connections::new(
            stack.nats_config(user),
            database.map(|role| stack.database_url(role)),
        );
        connections.polls = polls.clone();
        connections
    };
    let mut ingest = landslide_ingest::Config::new(node_id, connections(User::Ingest, None), keys);
    (ingest.rate_limit, ingest.client_ip_header) = (rate_limit, client_ip_header);
    ingest.results_url = Some(format!("http://{}/", tally_listener.local_addr()?));
    ingest.metrics = MetricsAt::Operations;
    let worker =
        landslide_dedup_worker::Config::new(connections(User::Worker, Some(LoginRole::Worker)));
    let mut tally = landslide_tally::Config::new(
        connections(User::Tally, Some(LoginRole::Tally)),
        receipt_key,
    );
    tally.metrics = MetricsAt::Operations;
    tally.client_ip_header = ingest.client_ip_header.clone();

    let vote_url = format!("http://{}/", ingest_listener.local_addr()?);
    let results_url = format!("http://{}/", tally_listener.local_addr()?);
    let metrics_url = format!("http://{}/metrics", operations.local_addr()?);
    let (stop, shutdown) = Shutdown::new();
    let roles = async {
        // The worker first: it creates the streams and the consumer that the others look up.
        let mut worker = tokio::spawn(Role::DedupWorker(worker).run(shutdown.clone()));
        let mut ingest = tokio::spawn(Role::Ingest(ingest, ingest_listener).run(shutdown.clone()));
        let mut tally = tokio::spawn(Role::Tally(tally, tally_listener).run(shutdown.clone()));
        println!(
            "Landslide is up.\n  vote:    {vote_url}\n  results: {results_url}\n  metrics: \
             {metrics_url}\n  operate: landslide status --up {dir} (and audit, export, polls, \
             replay; settings in {dir}/{env})\nPress Ctrl-C to stop.",
            dir = data_dir.display(),
            env = ENV_FILE,
        );

        // Run until Ctrl-C, or until a role fails; then stop the others and wait for all three.
        let first = tokio::select! {
            () = Shutdown::on_signal().wait() => None,
            r = &mut worker => Some(("dedup-worker", r)),
            r = &mut ingest => Some(("ingest", r)),
            r = &mut tally => Some(("tally", r)),
        };
        stop.stop();
        let (finished, mut failure) = match first {
            Some((role, result)) => (Some(role), role_failure(role, result)),
            None => (None, None),
        };
        for (role, handle) in [
            ("ingest", ingest),
            ("dedup-worker", worker),
            ("tally", tally),
        ] {
            // The role that ended first was already awaited above.
            if finished == Some(role) {
                continue;
            }
            if let Some(err) = role_failure(role, handle.await) {
                failure.get_or_insert(err);
            }
        }
        failure
    };
    // One operations listener for the three roles, stopped once all three have.
    let failure =
        landslide_telemetry::serve::with_operations(operations, shutdown.clone().wait(), roles)
            .await;
    match failure {
        Some(err) => Err(err),
        None => {
            println!("Landslide stopped cleanly.");
            Ok(())
        }
    }
}

fn role_failure(
    role: &str,
    result: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> Option<anyhow::Error> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.context(format!("{role} failed"))),
        Err(err) => Some(anyhow::anyhow!("{role} panicked: {err}")),
    }
}
