//! One child process: started, killed, terminated and started again with the same command, its
//! output appended to one log file across restarts.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::Place;

/// A restartable child process. Dropping it kills the process.
#[derive(Debug)]
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    own_process_group: bool,
    place: Place,
    child: Option<Child>,
}

impl Process {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>, log: PathBuf) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            log,
            own_process_group: false,
            place: Place::loopback(),
            child: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.envs.push((key.to_owned(), value.to_string()));
        self
    }

    /// Runs the process in a process group of its own: a Ctrl-C in the terminal then reaches
    /// only us, and we stop the process when it suits us.
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// Runs the process at `place`: inside a host's network namespace, or (the default) here.
    pub fn at(mut self, place: &Place) -> Self {
        self.place = place.clone();
        self
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} is already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let (program, leading) = self.place.launcher(&self.program);
        let mut command = Command::new(program);
        command.args(leading);
        if self.own_process_group {
            command.process_group(0);
        }
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reaps the process.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.take_child()?;
        child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.name))
    }

    /// SIGSTOP: the process stops running but keeps its state and connections, as if its host
    /// stalled. [`Process::resume`] continues it.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.check_running()?;
        let pid = self.pid().context("the process has already been reaped")?;
        crate::signal(pid, Signal::SIGSTOP)
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().context("the process has already been reaped")?;
        crate::signal(pid, Signal::SIGCONT)
    }

    /// SIGTERM, then waits up to `grace` for the exit; a process still running then is killed and
    /// reported as an error.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.take_child()?;
        let pid = child.id().context("the process has already been reaped")?;
        let pid = Pid::from_raw(i32::try_from(pid)?);
        kill(pid, Signal::SIGTERM).with_context(|| format!("cannot signal {}", self.name))?;
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                child.kill().await?;
                bail!("{} did not exit within {grace:?} of SIGTERM", self.name)
            }
        }
    }

    /// `Err` when the process is not running: it was never started, was stopped, or exited on
    /// its own (then the error has its status and the end of its log).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!(
                "{} exited on its own ({status}); {}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// The status of a process that exited on its own since it was started, once: it then
    /// counts as stopped, and [`Process::start`] may run it again. `None` while it runs, and for
    /// a process that was never started or that we stopped.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Whether the process exited on its own, without reaping it: [`Process::exited`] still
    /// returns its status. (tokio's `try_wait` keeps a status once it has seen it.)
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// The file its output is appended to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    fn take_child(&mut self) -> anyhow::Result<Child> {
        self.check_running()?;
        self.child
            .take()
            .with_context(|| format!("{} is not running", self.name))
    }
}

/// The last lines of a server's log, for error messages.
pub fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
        let _ = file.read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        format!("(the log {} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}
