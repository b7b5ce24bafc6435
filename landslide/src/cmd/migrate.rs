//! `landslide migrate`: the database migrations, applied as the schema's owner.

use std::process::ExitCode;

use crate::cmd::args::DatabaseArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: DatabaseArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = args.db.url()?;
    let applied = landslide_schema::postgres::migrate(&url).await?;
    if applied.is_empty() {
        println!("the schema of {url} is current: no migration to apply");
    } else {
        println!(
            "applied {} migration(s) to {url}: {}",
            applied.len(),
            applied.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
