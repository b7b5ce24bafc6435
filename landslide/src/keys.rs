//! The keys of ingest and tally, read from files: never from flags (every user of the host sees
//! a process's `argv`) nor from the environment (a unit's environment is read by everyone who may
//! read its unit file or `/proc/<pid>/environ`, and was once one env file that every role of a
//! host loaded, tally included). systemd hands each unit only its own (`LoadCredential=`), Compose
//! mounts them as secrets, and `up` keeps them in its data folder.
//!
//! ```text
//! LANDSLIDE_COOKIE_KEYS_FILE    ingest         the voter-cookie keys, one per line: the first
//!                                              signs, every one verifies
//! LANDSLIDE_VOTER_ID_KEY_FILE   ingest         the key of the ids of cookie-less keyed votes
//! LANDSLIDE_RECEIPT_KEY_FILE    ingest, tally  the key that tags receipts
//! ```
//!
//! In every file, a line that is blank or starts with `#` is no key.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use landslide_ingest::{CookieKeys, HmacKey, VoterIdKey};
use landslide_schema::receipt::ReceiptKey;

/// The variables of earlier releases that held keys. A process that finds one set refuses to
/// start rather than run without the key it names (`LANDSLIDE_SECRET` would otherwise be
/// dropped silently by the upgrade, and every voter become a new one).
const REMOVED: [(&str, &str); 3] = [
    (
        "LANDSLIDE_SECRET",
        "put it in the file that LANDSLIDE_COOKIE_KEYS_FILE names (the first line signs), and \
         in the one LANDSLIDE_VOTER_ID_KEY_FILE names, so that the ids of keyed votes stay \
         the same",
    ),
    (
        "LANDSLIDE_SECRET_PREVIOUS",
        "put each of its keys on a line of its own after the first of LANDSLIDE_COOKIE_KEYS_FILE",
    ),
    (
        "LANDSLIDE_RECEIPT_KEY",
        "put it in the file that LANDSLIDE_RECEIPT_KEY_FILE names",
    ),
];

/// Fails when a variable of [`REMOVED`] is set: its key is read from a file now.
pub fn refuse_removed_variables() -> anyhow::Result<()> {
    for (var, instead) in REMOVED {
        if std::env::var_os(var).is_some() {
            anyhow::bail!(
                "{var} is set, but keys are no longer read from the environment: {instead}, then \
                 unset {var} (OPERATIONS.md, \"Upgrading\")"
            );
        }
    }
    Ok(())
}

/// Where ingest's keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    pub cookies: PathBuf,
    pub voter_ids: PathBuf,
    pub receipts: PathBuf,
}

impl KeyFiles {
    /// Reads the three files: ingest's keys, or an error that names the file at fault.
    pub fn read(&self) -> anyhow::Result<landslide_ingest::Keys> {
        let cookies = lines(&self.cookies)?
            .into_iter()
            .map(HmacKey::new)
            .collect::<anyhow::Result<Vec<_>>>()
            .and_then(CookieKeys::from_lines)
            .with_context(|| in_file(&self.cookies, "LANDSLIDE_COOKIE_KEYS_FILE"))?;
        let voter_ids = one(&self.voter_ids)
            .and_then(HmacKey::new)
            .map(VoterIdKey)
            .with_context(|| in_file(&self.voter_ids, "LANDSLIDE_VOTER_ID_KEY_FILE"))?;
        Ok(landslide_ingest::Keys {
            cookies,
            voter_ids,
            receipts: receipt_key(&self.receipts)?,
        })
    }
}

/// The receipt key of ingest and tally.
pub fn receipt_key(path: &Path) -> anyhow::Result<ReceiptKey> {
    one(path)
        .and_then(|key| ReceiptKey::new(key).map_err(anyhow::Error::msg))
        .with_context(|| in_file(path, "LANDSLIDE_RECEIPT_KEY_FILE"))
}

fn in_file(path: &Path, var: &str) -> String {
    format!("in {} ({var})", path.display())
}

/// The keys of a file: its lines that are neither blank nor comments, trimmed.
fn lines(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// The one key of a file.
fn one(path: &Path) -> anyhow::Result<String> {
    let mut keys = lines(path)?;
    anyhow::ensure!(
        keys.len() == 1,
        "the file must hold exactly one key, and holds {}",
        keys.len()
    );
    Ok(keys.remove(0))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn key_files_are_read_line_by_line_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let files = KeyFiles {
            cookies: file(
                dir,
                "cookie-keys",
                &format!(
                    "# signs\n{}\n\n# verifies\n{}\n",
                    "n".repeat(32),
                    "o".repeat(32)
                ),
            ),
            voter_ids: file(dir, "voter-id-key", &format!("{}\n", "i".repeat(40))),
            receipts: file(dir, "receipt-key", &"r".repeat(32)),
        };
        let keys = files.read().unwrap();
        assert_eq!(keys.cookies.signing().expose_secret(), "n".repeat(32));
        assert_eq!(keys.cookies.verify_only().len(), 1);
        assert_eq!(keys.voter_ids.0.expose_secret(), "i".repeat(40));

        let refused = |files: KeyFiles, expected: &str| {
            let error = format!("{:#}", files.read().unwrap_err());
            assert!(error.contains(expected), "{error}");
        };
        refused(
            KeyFiles {
                cookies: file(dir, "empty", "# nothing\n"),
                ..files.clone()
            },
            "no cookie key",
        );
        refused(
            KeyFiles {
                cookies: file(dir, "placeholder", "CHANGE_ME\n"),
                ..files.clone()
            },
            "at least 32 bytes",
        );
        refused(
            KeyFiles {
                voter_ids: file(dir, "two", &format!("{0}\n{0}\n", "i".repeat(32))),
                ..files.clone()
            },
            "exactly one key",
        );
        refused(
            KeyFiles {
                receipts: dir.join("missing"),
                ..files.clone()
            },
            "LANDSLIDE_RECEIPT_KEY_FILE",
        );
    }
}
