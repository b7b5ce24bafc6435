//! `landslide replay`: the whole votes stream folded into the database again.

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
    let config = landslide_dedup_worker::Config::new(
        args.shared
            .connections(User::Worker, Some((&args.db, LoginRole::Worker)))?,
    );
    let chunk = landslide_dedup_worker::replay::CHUNK;
    let report = landslide_dedup_worker::replay(&config, chunk).await?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}
