//! `landslide verify`: a poll's published record checked with no server and no secret.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The record's folder, as `export` wrote it.
    dir: PathBuf,
    /// A vote's receipt: says whether that vote is in the record and whether it is the one
    /// counted.
    #[arg(long)]
    receipt: Option<String>,
    /// The owner key the poll's owner published (ed25519:…): refuse a record signed by any
    /// other.
    #[arg(long)]
    owner_key: Option<String>,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    use landslide_schema::record::{self, OwnerKey};
    let receipt = args
        .receipt
        .as_deref()
        .map(landslide_schema::receipt::Receipt::read_unauthenticated)
        .transpose()?;
    let expected = args
        .owner_key
        .clone()
        .map(OwnerKey::try_from)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--owner-key: {e}"))?;
    let files = landslide_tally::certificate::read_record(&args.dir)?;
    let verified = match record::check(files, receipt.as_ref()) {
        Ok(verified) => verified,
        Err(refused) => {
            println!("record in {}: REFUSED: {refused}", args.dir.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Some(expected) = expected.filter(|k| *k != verified.owner_key) {
        println!(
            "record in {}: REFUSED: signed by {}, not by the published owner key {expected}",
            args.dir.display(),
            verified.owner_key
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{verified}");
    let receipt_fine = matches!(
        verified.receipt,
        None | Some(
            record::ReceiptFinding::Counted { .. }
                | record::ReceiptFinding::Superseded { .. }
                | record::ReceiptFinding::NotCounted { .. }
        )
    );
    Ok(if receipt_fine {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
