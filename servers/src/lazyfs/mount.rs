//! [`LazyFs`]: mounting the filesystem, the power cut that discards what was never fsynced,
//! and the clean unmount that writes everything back.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, bail};
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use landslide_patience::Backoff;

use super::CutReport;
use super::ops::Ops;
use super::state::{State, lock, write_back_all};

/// Threads serving FUSE requests: one slow fsync must not stall every reader.
const WORKERS: usize = 4;
/// How long an unmount waits for the request threads to stop. They stop at once since the
/// unmount aborts the connection ([`LazyFs::detach`]); this bounds a kernel that would not.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A mounted LazyFs. Dropping it unmounts it cleanly, writing everything back, like
/// [`LazyFs::unmount`] (by force if the mount is still in use, and logging instead of failing).
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    backing: PathBuf,
    mountpoint: PathBuf,
    /// `None` once unmounted.
    session: Option<Mounted>,
}

struct Mounted {
    unmounter: SessionUnmounter,
    thread: JoinHandle<io::Result<()>>,
}

impl std::fmt::Debug for LazyFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFs")
            .field("backing", &self.backing)
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl LazyFs {
    /// Mounts a lazy view of `backing` at `mountpoint` (both existing folders). Fails clearly
    /// without `/dev/fuse` or without the right to mount.
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<Self> {
        check_fuse_device()?;
        let backing = backing
            .canonicalize()
            .with_context(|| format!("cannot find the backing folder {}", backing.display()))?;
        let mountpoint = mountpoint
            .canonicalize()
            .with_context(|| format!("cannot find the mount point {}", mountpoint.display()))?;
        let root = std::fs::metadata(&backing)
            .with_context(|| format!("cannot stat {}", backing.display()))?;
        anyhow::ensure!(root.is_dir(), "{} is not a folder", backing.display());
        anyhow::ensure!(
            mountpoint.is_dir(),
            "the mount point {} is not a folder",
            mountpoint.display()
        );
        let state = Arc::new(Mutex::new(State::new(backing.clone(), root.ino())));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazyfs".to_owned()),
            MountOption::Subtype("lazyfs".to_owned()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(WORKERS);
        config.clone_fd = true;
        let mut session = Session::new(
            Ops {
                state: state.clone(),
            },
            &mountpoint,
            &config,
        )
        .with_context(|| {
            format!(
                "cannot mount LazyFs at {}: mounting needs root (it uses mount(2), not \
                 fusermount3) and /dev/fuse",
                mountpoint.display()
            )
        })?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("lazyfs".to_owned())
            .spawn(move || session.run())
            .context("cannot start the LazyFs thread")?;
        tracing::info!(
            lazyfs.backing = %backing.display(),
            lazyfs.mountpoint = %mountpoint.display(),
            "mounted LazyFs"
        );
        Ok(Self {
            state,
            backing,
            mountpoint,
            session: Some(Mounted { unmounter, thread }),
        })
    }

    /// The backing folder (canonical): what the disk holds.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Where the lazy view is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: discards every write not yet fsynced, then unmounts. What stays in the
    /// backing folder is what a disk would hold after the cut. Processes still using the mount
    /// should have been killed first; if one has not, the mount is torn down under it.
    pub fn power_cut(mut self) -> anyhow::Result<CutReport> {
        let report = lock(&self.state).cut();
        self.detach()?;
        tracing::info!(
            lazyfs.mountpoint = %self.mountpoint.display(),
            lost.bytes = report.bytes,
            lost.files = report.files.len(),
            "LazyFs power cut"
        );
        Ok(report)
    }

    /// [`LazyFs::mount`] off the async runtime's threads (it blocks).
    pub async fn mount_async(backing: PathBuf, mountpoint: PathBuf) -> anyhow::Result<Self> {
        tokio::task::spawn_blocking(move || Self::mount(&backing, &mountpoint)).await?
    }

    /// A power cycle of the disk, off the runtime's threads: [`LazyFs::power_cut`], then the
    /// same backing folder mounted again at the same place, as the disk is after the power
    /// returns. Returns the new mount and what the cut threw away.
    pub async fn power_cycle(self) -> anyhow::Result<(Self, CutReport)> {
        let (backing, mountpoint) = (self.backing.clone(), self.mountpoint.clone());
        let report = tokio::task::spawn_blocking(move || self.power_cut()).await??;
        Ok((Self::mount_async(backing, mountpoint).await?, report))
    }

    /// A clean unmount that first writes everything back and fsyncs it, like a clean shutdown
    /// flushing the page cache. Fails if the mount is still in use (it is then unmounted by
    /// force, after the write-back) or if something could not be written back.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.clean_unmount()
    }

    fn clean_unmount(&mut self) -> anyhow::Result<()> {
        let before = write_back_all(&self.state);
        let forced = self.detach()?;
        // A process may have written between the write-back and the unmount.
        write_back_all(&self.state)?;
        before?;
        if forced {
            bail!(
                "LazyFs at {} was still in use: unmounted it by force after writing everything \
                 back",
                self.mountpoint.display()
            );
        }
        Ok(())
    }

    /// Unmounts (by force if busy) and waits for the request threads; returns whether it had to
    /// force. Every request after this fails, so nothing more can reach the backing folder.
    ///
    /// The unmount aborts the FUSE connection first (`umount2` with `MNT_FORCE`, whose
    /// `umount_begin` is the kernel's `fuse_abort_conn`), whether the mount is busy or not. A
    /// plain unmount used to be tried first, and it is not enough: a process started with `ip
    /// netns exec` (every role and server on a host of the harness's network) lives in a mount
    /// namespace of its own, a copy of ours taken at its start with every LazyFs mounted then.
    /// `/` here is private (no `shared:` in `/proc/self/mountinfo`), so our unmount does not
    /// reach those copies; they keep the superblock and its connection alive, the request
    /// threads never read `ENODEV`, and the power cut waited [`STOP_TIMEOUT`] for them: 10 s per
    /// disk, about 40 s of the harness's power-loss fault for three nats-servers and PostgreSQL
    /// (the power-cut study's 30 s between killing nats-server and PostgreSQL's shutdown). The
    /// test `a_power_cut_is_quick_and_final_while_another_mount_namespace_holds_a_copy` measured
    /// 10.0 s before and under 0.1 s after. The abort also ends the copies: a request through
    /// one fails with `ENOTCONN` and never reaches us, on top of [`State::off`].
    fn detach(&mut self) -> anyhow::Result<bool> {
        use nix::mount::{MntFlags, umount2};
        let Some(Mounted { unmounter, thread }) = self.session.take() else {
            return Ok(false);
        };
        lock(&self.state).off = true;
        let unmount_error = |e| {
            anyhow::Error::from(e).context(format!(
                "cannot unmount LazyFs at {}",
                self.mountpoint.display()
            ))
        };
        let forced = match umount2(&self.mountpoint, MntFlags::MNT_FORCE) {
            Ok(()) => false,
            // Files on it are still open: MNT_DETACH takes it out of the tree all the same (the
            // connection is aborted already, so their users see ENOTCONN).
            Err(nix::errno::Errno::EBUSY) => {
                umount2(&self.mountpoint, MntFlags::MNT_FORCE | MntFlags::MNT_DETACH)
                    .map_err(unmount_error)?;
                true
            }
            Err(e) => return Err(unmount_error(e)),
        };
        // fuser's own unmount, on drop, finds the connection gone and leaves the mount point
        // alone (it may be mounted again already).
        drop(unmounter);
        let _ = Backoff::constant(Duration::from_millis(10))
            .within(STOP_TIMEOUT, "the LazyFs session to end")
            .until_blocking(|| thread.is_finished().then_some(()));
        if thread.is_finished() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the LazyFs session ended with an error"),
                Err(_) => tracing::warn!("the LazyFs session thread panicked"),
            }
        } else {
            tracing::warn!(
                lazyfs.mountpoint = %self.mountpoint.display(),
                "the LazyFs session did not stop after the unmount; leaving its thread behind"
            );
        }
        Ok(forced)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.session.is_some()
            && let Err(e) = self.clean_unmount()
        {
            tracing::warn!(error = format!("{e:#}"), "LazyFs unmount on drop");
        }
    }
}

/// A clear message instead of the mount's bare "No such file or directory".
fn check_fuse_device() -> anyhow::Result<()> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .context(
            "cannot open /dev/fuse, which LazyFs needs: load the module with `modprobe fuse`, or \
             give the container the device (--device /dev/fuse) and CAP_SYS_ADMIN",
        )
}
