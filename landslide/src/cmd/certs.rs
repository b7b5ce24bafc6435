//! `landslide certs`: a deployment's TLS files, its own CA and the certificates it signs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of the CA (ca.pem, ca-key.pem) and the certificates (<NAME>-cert.pem,
    /// <NAME>-key.pem); created if missing. Keep ca-key.pem where only the operator can read it.
    #[arg(long)]
    dir: PathBuf,
    /// The certificate's name, e.g. nats or postgres: its files are <NAME>-cert.pem and
    /// <NAME>-key.pem.
    #[arg(long, default_value = "nats")]
    name: String,
    /// Every host name and IP address clients reach the servers by, comma-separated: one
    /// certificate serves every node of a cluster.
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// What the certificate is for: `server` (a NATS client port, PostgreSQL, HTTP: server
    /// authentication only) or `route` (NATS cluster routes, which verify each other both ways;
    /// name it nats-route and give it to NATS nodes only).
    #[arg(long, default_value = "server")]
    purpose: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    use landslide_servers::tls::{Authority, Issued};
    let ca = Authority::open_or_create(&args.dir, "Landslide deployment CA")?;
    let purpose =
        landslide_servers::tls::Purpose::parse(&args.purpose).context("invalid --purpose")?;
    let (files, issued) = ca.issue_or_keep(&args.name, &args.hosts, purpose)?;
    let done = match issued {
        Issued::Kept => "kept, for the same hosts",
        Issued::New => "written",
    };
    println!(
        "CA {}\n{} {} and {}: {done}",
        ca.ca().display(),
        args.name,
        files.cert.display(),
        files.key.display()
    );
    Ok(ExitCode::SUCCESS)
}
