//! `landslide keygen`: a poll owner's signing key.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the private key; refused if the file exists.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // rand's thread generator: a CSPRNG seeded from the operating system.
    let key = landslide_schema::record::OwnerSigningKey::from_seed(rand::random());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .with_context(|| format!("cannot create {} (it must not exist)", args.out.display()))?;
    file.write_all(key.to_file_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "wrote the private key to {} (keep it where only the poll's owner can read it)\n\
         put this line in the poll's definition before it opens:\nowner_key = \"{}\"",
        args.out.display(),
        key.public()
    );
    Ok(ExitCode::SUCCESS)
}
