//! CONFIGURATION.md's reference of flags and variables, generated from the command line itself,
//! so that a default or a meaning is written once: in the flag's definition (its doc comment and
//! `default_value`, which reads the library's constant). A test fails when the committed file is
//! stale, and rewrites it when asked:
//!
//! ```sh
//! LANDSLIDE_BLESS=1 cargo test -p landslide --bin landslide configuration_reference
//! ```

use std::collections::BTreeMap;

use clap::{Arg, Command};

/// Where the generated part of CONFIGURATION.md starts and ends; the rest is written by hand.
const BEGIN: &str =
    "<!-- BEGIN generated from the clap definitions: landslide/src/reference.rs -->";
const END: &str = "<!-- END generated -->";

/// One row: a flag (and its variable) with one default and one meaning, and every command that
/// takes it so.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Setting {
    variable: String,
    flag: String,
    default: String,
    meaning: String,
}

/// The commands of `cli` by path (`polls put`), each with its visible flags.
fn commands(cli: &Command) -> Vec<(String, &Command)> {
    fn walk<'a>(prefix: &str, command: &'a Command, out: &mut Vec<(String, &'a Command)>) {
        for sub in command.get_subcommands() {
            let path = format!("{prefix}{}", sub.get_name()).trim().to_owned();
            if sub.has_subcommands() {
                walk(&format!("{path} "), sub, out);
            } else {
                out.push((path, sub));
            }
        }
    }
    let mut out = Vec::new();
    walk("", cli, &mut out);
    out
}

fn setting(arg: &Arg) -> Option<Setting> {
    if arg.is_hide_set() || arg.is_positional() {
        return None;
    }
    let long = arg.get_long()?;
    if matches!(long, "help" | "version") {
        return None;
    }
    let one_line = |text: String| {
        text.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|")
    };
    let meaning = arg
        .get_long_help()
        .or_else(|| arg.get_help())
        .map(|help| one_line(help.to_string()))
        .unwrap_or_default();
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| format!("`{}`", v.to_string_lossy()))
        .collect();
    Some(Setting {
        variable: arg.get_env().map_or_else(
            || "—".to_owned(),
            |env| format!("`{}`", env.to_string_lossy()),
        ),
        flag: format!("`--{long}`"),
        default: if defaults.is_empty() {
            "—".to_owned()
        } else {
            defaults.join(", ")
        },
        meaning,
    })
}

/// The generated table: one row per setting, with the commands that take it.
pub fn table(cli: &Command) -> String {
    let mut rows: BTreeMap<Setting, Vec<String>> = BTreeMap::new();
    for (path, command) in commands(cli) {
        for arg in command.get_arguments() {
            if let Some(setting) = setting(arg) {
                rows.entry(setting).or_default().push(path.clone());
            }
        }
    }
    // Variables first (by name), then the flags that have none.
    let mut rows: Vec<(Setting, Vec<String>)> = rows.into_iter().collect();
    rows.sort_by(|(a, _), (b, _)| {
        (a.variable == "—", &a.variable, &a.flag).cmp(&(b.variable == "—", &b.variable, &b.flag))
    });
    let mut out =
        String::from("| Variable | Flag | Commands | Default | Meaning |\n|---|---|---|---|---|\n");
    for (setting, commands) in rows {
        let commands = commands
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| {} | {} | {commands} | {} | {} |\n",
            setting.variable, setting.flag, setting.default, setting.meaning
        ));
    }
    out
}

/// `document` with its generated part replaced by `table`.
fn with_table(document: &str, table: &str) -> Option<String> {
    let (head, rest) = document.split_once(BEGIN)?;
    let (_, tail) = rest.split_once(END)?;
    Some(format!("{head}{BEGIN}\n{table}{END}{tail}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn configuration_reference_is_the_command_lines() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../CONFIGURATION.md");
        let committed = std::fs::read_to_string(path).unwrap();
        let generated = with_table(&committed, &table(&crate::Cli::command()))
            .expect("CONFIGURATION.md has lost its BEGIN/END generated markers");
        if std::env::var_os("LANDSLIDE_BLESS").is_some() {
            std::fs::write(path, &generated).unwrap();
            return;
        }
        assert!(
            committed == generated,
            "CONFIGURATION.md is stale: a flag's doc comment or default changed. Regenerate it: \
             LANDSLIDE_BLESS=1 cargo test -p landslide --bin landslide configuration_reference"
        );
    }

    #[test]
    fn every_flag_has_a_meaning_and_one_row_per_default() {
        let table = table(&crate::Cli::command());
        for line in table.lines().skip(2) {
            assert!(
                !line.ends_with("|  |"),
                "a flag without a doc comment: {line}"
            );
        }
        assert!(
            table.contains("| `LANDSLIDE_LISTEN` | `--listen` | `ingest` | `127.0.0.1:8080` |")
        );
        assert!(table.contains("| `LANDSLIDE_LISTEN` | `--listen` | `tally` | `127.0.0.1:8081` |"));
    }
}
