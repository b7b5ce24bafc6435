//! `landslide polls`: the poll definitions every role reads, one revision each, in the polls
//! bucket.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use landslide_nats::{Access, User};
use landslide_schema::Polls;

use crate::cmd::args::Shared;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    shared: Shared,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Check a polls file and write it as the next revision; running roles pick it up.
    Put {
        /// The polls file (TOML).
        file: PathBuf,
    },
    /// Print a revision (default: the latest) as a polls file.
    Show {
        /// The revision to print.
        #[arg(long)]
        revision: Option<u64>,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    use landslide_nats::polls;
    let up = args.shared.up_env()?;
    // The polls' owner, or the operator if NATS_USER names them (the user decides the inbox).
    let user = match (&up, args.shared.nats_auth.nats_user.as_deref()) {
        (None, Some("admin")) => User::Admin,
        _ => User::Polls,
    };
    let nats = args.shared.nats(up.as_ref(), user)?;
    let client = landslide_nats::connect(&nats, user, "landslide-polls").await?;
    let js = async_nats::jetstream::new(client);
    let store = polls::ensure_bucket(&js, &args.shared.topology(), Access::SetUp).await?;
    match args.action {
        Action::Put { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the polls file {}", file.display()))?;
            let revision = polls::put(&store, &text)
                .await
                .with_context(|| format!("{} was not written", file.display()))?;
            println!(
                "wrote {} as revision {revision}; running roles pick it up within moments",
                file.display()
            );
        }
        Action::Show { revision } => {
            let contents = polls::read_all(&store).await?;
            for stray in &contents.strays {
                eprintln!("ALARM: {} of the polls bucket: {}", stray.key, stray.why);
            }
            let Some(latest) = contents.latest().map(|stored| stored.revision) else {
                println!(
                    "# the polls bucket is empty: roles seed it from LANDSLIDE_POLLS, or with the \
                     built-in poll, when they start\n{}",
                    Polls::default().to_toml()
                );
                return Ok(ExitCode::SUCCESS);
            };
            let wanted = revision.map_or(latest, landslide_schema::Revision);
            let stored = contents
                .revisions
                .iter()
                .find(|stored| stored.revision == wanted)
                .with_context(|| format!("there is no revision {wanted} (latest: {latest})"))?;
            println!(
                "# revision {wanted} of {latest}\n{}",
                stored.text.trim_end()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
