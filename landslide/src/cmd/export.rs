//! `landslide export`: audit, then write one poll's published record to a folder, signed with
//! the owner's key.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::cmd::audit;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    audit: audit::Args,
    /// Where to write the record (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The file of the poll owner's Ed25519 signing key (`landslide keygen --out FILE`, mode
    /// 0600), which signs the record's certificate; required when the poll names an owner key,
    /// whose private half it must be.
    #[arg(long, env = "LANDSLIDE_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    use landslide_schema::record::OwnerSigningKey;
    let config = args.audit.config()?;
    let (poll, key) = args.audit.certified()?;
    let signing = args
        .signing_key
        .as_deref()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the signing key {}", path.display()))?;
            OwnerSigningKey::from_file_text(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        })
        .transpose()?;
    let export = landslide_tally::certificate::Export {
        out: &args.out,
        signing: signing.as_ref(),
    };
    let (report, certificate) =
        landslide_tally::certificate::certify(&config, poll, &key, Some(export)).await?;
    let signed = if signing.is_some() {
        "signed"
    } else {
        "UNSIGNED (the poll names no owner key; landslide verify refuses it)"
    };
    println!(
        "{report}\n{certificate}\nwrote the record of poll {poll} to {}: events.csv, \
         ballots.csv, revisions/, certificate.json; {signed}",
        args.out.display()
    );
    Ok(if report.is_consistent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
