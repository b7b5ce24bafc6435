//! A watch over a server that outlives the process that started it: when that process dies
//! without releasing the guard, SIGKILL and the OOM killer included, the guard stops the server.
//!
//! The guard is a `sh` in a process group of its own (a Ctrl-C in the terminal reaches only its
//! parent), reading its stdin: a pipe whose other end only the parent holds (std opens it with
//! `O_CLOEXEC`, so no other child inherits it). [`Guard::release`] writes a line and the shell
//! exits; the end of the pipe, which the kernel brings about however the parent ended, runs the
//! stop command instead. Found by trying it: `landslide up` killed with SIGKILL left its
//! nats-server and PostgreSQL running, holding their ports and the data folder. A parent-death
//! signal (`PR_SET_PDEATHSIG`) would not do: PostgreSQL is daemonized by `pg_ctl`, so its parent
//! is not ours, and the signal follows the thread that forked, not the process.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// Runs its stop command unless released.
#[derive(Debug)]
pub struct Guard {
    name: String,
    child: Child,
}

impl Guard {
    /// Watches for our death: `stop` (its program, arguments and environment) runs if this
    /// process ends before [`Guard::release`], or when the guard is dropped.
    pub fn spawn(name: &str, stop: &Command) -> anyhow::Result<Self> {
        let child = Command::new("sh")
            .arg("-c")
            // `read` fails at the end of its input, with no line: then, and only then, stop.
            .arg(r#"read -r _ || exec "$@""#)
            .arg("sh")
            .arg(stop.get_program())
            .args(stop.get_args())
            .envs(
                stop.get_envs()
                    .filter_map(|(key, value)| value.map(|value| (key, value))),
            )
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the guard of {name} (sh)"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// Ends the watch without stopping anything: the server is ours to stop again.
    pub fn release(mut self) -> anyhow::Result<()> {
        let released = self
            .child
            .stdin
            .take()
            .context("the guard's input is gone")
            .and_then(|mut stdin| {
                stdin
                    .write_all(b"released\n")
                    .context("cannot write to the guard")
            });
        // Reaped in any case: it exits at once, released or (its input closed) stopping.
        let status = self.child.wait();
        released.with_context(|| format!("the guard of {}", self.name))?;
        status.with_context(|| format!("cannot wait for the guard of {}", self.name))?;
        Ok(())
    }

    /// Leaves the guard watching, and us no longer able to release it: for tests that simulate
    /// a parent that died with its guards gone too.
    pub fn abandon(self) {
        std::mem::forget(self);
    }
}
