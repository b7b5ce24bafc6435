//! `landslide status`: each poll's state and counts, the pending votes, and the state of the
//! streams and of the workers' consumer.

use std::process::ExitCode;

use landslide_nats::User;
use landslide_schema::postgres::LoginRole;

use crate::cmd::args::{DatabaseArgs, Shared};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(flatten)]
    db: DatabaseArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = landslide_tally::audit::AuditConfig::new(
        args.shared
            .connections(User::Audit, Some((&args.db, LoginRole::Audit)))?,
    );
    println!("{}", landslide_tally::status::status(&config).await?);
    Ok(ExitCode::SUCCESS)
}
