//! `landslide nats-password-hash`: the bcrypt hash of a broker user's password, as nats-server
//! takes it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use landslide_nats::User;
use secrecy::ExposeSecret as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file that holds the password (a trailing newline is not part of it).
    #[arg(long)]
    password_file: PathBuf,
    /// Print the line of nats-server's environment file for this user
    /// (LANDSLIDE_NATS_<USER>_PASSWORD_HASH='<hash>', as nats/auth.conf reads it) instead of the
    /// hash alone: ingest, worker, tally, audit, polls or admin.
    #[arg(long)]
    user: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let user = args
        .user
        .as_deref()
        .map(|name| {
            User::ALL
                .into_iter()
                .find(|user| user.name() == name)
                .with_context(|| format!("--user {name:?} is none of nats/auth.conf's users"))
        })
        .transpose()?;
    let password =
        landslide_nats::auth::read_secret(None, Some(&args.password_file), "NATS_PASSWORD")?
            .context("no password")?;
    let hash = landslide_nats::auth::password_hash(password.expose_secret())?;
    match user {
        // Single-quoted: neither systemd's EnvironmentFile nor a shell's `.` then reads the
        // hash's `$` as a variable (a bcrypt hash holds no quote).
        Some(user) => println!("{}='{hash}'", user.password_hash_var()),
        None => println!("{hash}"),
    }
    Ok(ExitCode::SUCCESS)
}
