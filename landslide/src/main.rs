//! `landslide`: one binary for every role of the vote-capture pipeline.
//!
//! `up` runs the whole system on one machine; `ingest`, `dedup-worker` and `tally` run one role
//! each; `audit` checks the database against the stream, and `replay` folds the stream into
//! the database again; `migrate` applies the schema as its owner, and `db-users` sets up the
//! roles' database users. Each subcommand reads its configuration
//! once, from flags and the environment, and fails before binding anything if it is incomplete.
//!
//! This file is the entry point: the command line, telemetry, and a call to the command's module
//! under `cmd/`, which owns its flags and what it does.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cmd::{
    audit, certs, db_users, dedup_worker, export, ingest, keygen, migrate, nats_password_hash,
    polls, replay, status, tally, up, verify,
};

mod cmd;
mod keys;
#[cfg(test)]
mod reference;

/// jemalloc rather than glibc malloc: under load, glibc's arena locks cost ingest a quarter of its
/// CPU in lock waits and wake-ups (BENCHMARKS.md, "What the profiles showed").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "landslide",
    version,
    about = "Vote capture that counts every accepted vote exactly once."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system on this machine: nats-server, PostgreSQL, ingest, a worker, tally.
    Up(up::Args),
    /// Run one ingest node: the voting form and API.
    Ingest(ingest::Args),
    /// Run one dedup-worker: stream to ballots and tallies.
    DedupWorker(dedup_worker::Args),
    /// Serve the results: live page and JSON API.
    Tally(tally::Args),
    /// Check ballots and tallies against every vote in the stream; exit 1 on any difference.
    Audit(audit::Args),
    /// Fold the whole votes stream into the database again: after restoring a backup, or into a
    /// new database. Idempotent, and safe beside running workers.
    Replay(replay::Args),
    /// The poll definitions every role reads, one revision each, in the polls bucket.
    Polls(polls::Args),
    /// Audit, then write one poll's published record to a folder: its event log, ballots,
    /// revisions and certificate, signed with the owner's key; exit 1 unless the audit is
    /// consistent.
    Export(export::Args),
    /// Check a poll's published record (from `export`) with no server and no secret: the owner's
    /// signature, the event log, and the ballots and counts folded again from the events; with
    /// --receipt, what became of that vote. Exit 1 if anything does not hold.
    Verify(verify::Args),
    /// Make a poll owner's signing key: writes the private key to a new file (owner-only) and
    /// prints the public key to put in the poll's definition (owner_key) before it opens.
    Keygen(keygen::Args),
    /// Print each poll's state and counts, the pending votes, and the state of the streams and
    /// the workers' consumer (what `nats stream info` and `nats consumer info` would show).
    Status(status::Args),
    /// Make a deployment's TLS files: its own CA (once) and a server certificate signed by it,
    /// for every name and address clients use. Running it again keeps what is already right.
    Certs(certs::Args),
    /// Apply the database migrations, as the schema's owner (DATABASE_URL). The other roles may
    /// not change the schema, and refuse to start until it is current.
    Migrate(migrate::Args),
    /// Create or update the login roles the processes connect as (landslide_worker,
    /// landslide_tally, landslide_audit), with passwords from files; DATABASE_URL is a user
    /// with CREATEROLE. Run `migrate` first: it creates their groups.
    DbUsers(db_users::Args),
    /// Print the bcrypt hash of a broker user's password, as nats-server takes it in place of
    /// the password (LANDSLIDE_NATS_<USER>_PASSWORD_HASH, which nats/auth.conf reads). The
    /// password comes from a file, read as the role reads its NATS_PASSWORD_FILE.
    NatsPasswordHash(nats_password_hash::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("landslide: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("landslide: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let service = match &cli.command {
        Command::Up(_) => "landslide",
        Command::Ingest(_) => "landslide-ingest",
        Command::DedupWorker(_) => "landslide-dedup-worker",
        Command::Tally(_) => "landslide-tally",
        Command::Audit(_) => "landslide-audit",
        Command::Replay(_) => "landslide-replay",
        Command::Polls(_) => "landslide-polls",
        Command::Export(_) => "landslide-export",
        Command::Verify(_) => "landslide-verify",
        Command::Keygen(_) => "landslide-keygen",
        Command::Status(_) => "landslide-status",
        Command::Certs(_) => "landslide-certs",
        Command::Migrate(_) => "landslide-migrate",
        Command::DbUsers(_) => "landslide-db-users",
        Command::NatsPasswordHash(_) => "landslide-nats-password-hash",
    };
    keys::refuse_removed_variables()?;
    let telemetry = landslide_telemetry::init(service)?;
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Ingest(args) => ingest::run(args).await,
        Command::DedupWorker(args) => dedup_worker::run(args).await,
        Command::Tally(args) => tally::run(args).await,
        Command::Audit(args) => audit::run(args).await,
        Command::Replay(args) => replay::run(args).await,
        Command::Polls(args) => polls::run(args).await,
        Command::Export(args) => export::run(args).await,
        Command::Verify(args) => verify::run(&args),
        Command::Keygen(args) => keygen::run(&args),
        Command::Status(args) => status::run(args).await,
        Command::Certs(args) => certs::run(&args),
        Command::Migrate(args) => migrate::run(args).await,
        Command::DbUsers(args) => db_users::run(args).await,
        Command::NatsPasswordHash(args) => nats_password_hash::run(&args),
    };
    telemetry.shutdown();
    result
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks (duplicate ids, group names, conflicting flags), which
    /// otherwise show only when the one subcommand's `--help` runs in a debug build: two
    /// flattened argument structs named `Args` once made `landslide export --help` panic.
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
