//! `landslide nats-password-hash`: the bcrypt hash of a broker user's password, as nats-server
//! takes it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file that holds the password (a trailing newline is not part of it).
    #[arg(long)]
    password_file: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let password =
        landslide_nats::auth::read_secret(None, Some(&args.password_file), "NATS_PASSWORD")?
            .context("no password")?;
    println!(
        "{}",
        landslide_nats::auth::password_hash(password.expose_secret())?
    );
    Ok(ExitCode::SUCCESS)
}
