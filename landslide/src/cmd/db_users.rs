//! `landslide db-users`: the login roles the processes connect as, with their passwords.

use std::path::PathBuf;
use std::process::ExitCode;

use landslide_schema::postgres::LoginRole;
use secrecy::ExposeSecret;

use crate::cmd::args::DatabaseArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The password of landslide_worker (dedup-workers, replay): the file's first line.
    #[arg(long)]
    worker_password_file: Option<PathBuf>,
    /// The password of landslide_tally.
    #[arg(long)]
    tally_password_file: Option<PathBuf>,
    /// The password of landslide_audit (audit, export, status).
    #[arg(long)]
    audit_password_file: Option<PathBuf>,
}

impl Args {
    fn password_file(&self, role: LoginRole) -> Option<&PathBuf> {
        match role {
            LoginRole::Worker => self.worker_password_file.as_ref(),
            LoginRole::Tally => self.tally_password_file.as_ref(),
            LoginRole::Audit => self.audit_password_file.as_ref(),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    use landslide_schema::postgres::roles;
    let url = args.db.url()?;
    // Every file is read before anything changes, so that a missing one changes nothing.
    let passwords = LoginRole::ALL
        .into_iter()
        .map(|role| {
            let password = args
                .password_file(role)
                .map(|path| roles::read_password_file(path))
                .transpose()?;
            Ok((role, password))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut conn = landslide_schema::postgres::connect(&url).await?;
    for (role, password) in passwords {
        let changes = roles::ensure_login_role(
            &mut conn,
            role,
            password.as_ref().map(ExposeSecret::expose_secret),
        )
        .await?;
        let mut said = Vec::new();
        if changes.created {
            said.push("created".to_owned());
        }
        if changes.attributes_reset {
            said.push("reset to LOGIN alone".to_owned());
        }
        if changes.joined_group {
            said.push(format!("made a member of {}", role.group()));
        }
        if changes.password_set {
            said.push("password set".to_owned());
        }
        if said.is_empty() {
            said.push("unchanged".to_owned());
        }
        println!("{role} (member of {}): {}", role.group(), said.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}
