//! `landslide audit`: ballots and tallies checked against every vote in the stream, and with
//! `--poll` a certificate of that poll.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use landslide_nats::User;
use landslide_schema::postgres::LoginRole;
use secrecy::{ExposeSecret as _, SecretString};

use crate::cmd::args::{DatabaseArgs, Shared, secret_env};

#[derive(Debug, clap::Args)]
// clap names the argument group of a struct after it, and `export` flattens this one into its own
// `Args`: two groups of one name would be refused.
#[group(id = "AuditArgs")]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
    /// Seconds to wait for the workers to drain the stream before auditing.
    #[arg(long, default_value_t = 60)]
    wait_secs: u64,
    /// Also certify this poll: its counts, the stream range read and the digest of its export.
    #[arg(long)]
    poll: Option<String>,
    /// The key that pseudonymises voters in the certified ballots (at least 32 bytes), from the
    /// environment's LANDSLIDE_EXPORT_KEY only: no flag, which every user of the host could read.
    #[arg(skip = secret_env("LANDSLIDE_EXPORT_KEY"))]
    export_key: Option<SecretString>,
    /// A file whose first line is the export key (instead of LANDSLIDE_EXPORT_KEY): at least 32
    /// bytes, the key of the keyed hash that pseudonymises voter ids in a poll's certified
    /// ballots, never written anywhere. One of the two is required with --poll. Keep it: the
    /// same key gives the same pseudonyms.
    #[arg(long, env = "LANDSLIDE_EXPORT_KEY_FILE")]
    export_key_file: Option<PathBuf>,
}

impl Args {
    pub fn config(&self) -> anyhow::Result<landslide_tally::audit::AuditConfig> {
        let connections = self
            .shared
            .connections(User::Audit, Some((&self.db, LoginRole::Audit)))?;
        Ok(landslide_tally::audit::AuditConfig {
            wait: Duration::from_secs(self.wait_secs),
            ..landslide_tally::audit::AuditConfig::new(connections)
        })
    }

    /// The poll to certify and the export key, both required.
    pub fn certified(&self) -> anyhow::Result<(&str, landslide_tally::certificate::ExportKey)> {
        let poll = self
            .poll
            .as_deref()
            .context("name the poll to certify with --poll")?;
        let key = match &self.export_key_file {
            Some(path) => landslide_schema::postgres::roles::read_password_file(path)
                .context("in LANDSLIDE_EXPORT_KEY_FILE")?,
            None => self.export_key.clone().context(
                "set LANDSLIDE_EXPORT_KEY or LANDSLIDE_EXPORT_KEY_FILE (at least 32 bytes, kept \
                 by the poll's owner): it pseudonymises the voters of the certified ballots",
            )?,
        };
        Ok((
            poll,
            landslide_tally::certificate::ExportKey::new(key.expose_secret().as_bytes())?,
        ))
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let report = if args.poll.is_some() {
        let (poll, key) = args.certified()?;
        let (report, certificate) =
            landslide_tally::certificate::certify(&config, poll, &key, None).await?;
        println!("{report}\n{certificate}");
        report
    } else {
        let report = landslide_tally::audit::audit(&config).await?;
        println!("{report}");
        report
    };
    Ok(if report.is_consistent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
