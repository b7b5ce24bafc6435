//! LazyFs: a FUSE filesystem for power-loss tests, after Jepsen's LazyFS. It mirrors a backing
//! folder, but keeps every byte written since the last fsync in memory, so that
//! [`LazyFs::power_cut`] throws away exactly what the programs on it never made durable and leaves
//! the backing folder as a disk would be after the power went out. The reliability harness runs
//! nats-server and PostgreSQL on it, cuts the power, mounts the backing folder again and checks
//! that everything they acknowledged is still there.
//!
//! # The model
//!
//! - **Data is lazy.** `write` (and `pwrite`) puts the bytes in memory, per inode, in 4 KiB
//!   pages; reads through the mount see them at once (the pages are merged over the backing file).
//!   Nothing of it reaches the backing file before an fsync: not on `close`, not after 30 s.
//! - **fsync makes data durable.** `fsync` and `fdatasync` of a file write its pages to the backing
//!   file and then fsync (or fdatasync) the backing file; only then is the caller answered. A file
//!   opened with `O_SYNC` or `O_DSYNC` is synced like that after every write.
//! - **Metadata is durable at once**, as if a journal committed it: create, mkdir, mknod,
//!   symlink, link, unlink, rmdir, rename, chmod, chown, utimes and truncate are applied to the
//!   backing folder when they happen. A file created and written but never fsynced is therefore
//!   there after the cut, with its fsynced prefix (or empty). `fsync` of a directory fsyncs the
//!   backing directory and is otherwise a no-op.
//! - **The power cut** discards every page not yet fsynced, fails every later request with `EIO`
//!   (the disk is gone) and unmounts, by force if a process still uses the mount (it then sees
//!   `ENOTCONN`). An fsync still in flight at the cut may or may not have made it, as on a disk.
//!   [`LazyFs::unmount`] is the clean shutdown instead: it writes everything back first, as a
//!   kernel flushes its page cache at shutdown.
//!
//! Ownership and modes pass through: new entries belong to the calling user (mounted with
//! `allow_other`, so that PostgreSQL can run on it as `postgres` while we are root), and the kernel
//! checks permissions against the backing modes (`default_permissions`). File locks (`flock`,
//! `fcntl`) are the kernel's local locks, which is all one machine needs. Extended attributes,
//! `fallocate` and `copy_file_range` are not offered; the kernel and the C library fall back to
//! plain reads and writes where they can.
//!
//! # What it simplifies, compared to a disk
//!
//! - Metadata is never lost: a real file system may lose a create or a rename whose directory
//!   nobody fsynced. Tests on LazyFs are harsher than a disk on data, gentler on metadata. A
//!   truncate is durable at once too, while the writes after it are not.
//! - Nothing is written back without an fsync. A real kernel writes dirty pages within about 30
//!   seconds, so a real power cut usually loses less: LazyFs shows the worst case, which is the
//!   point. Unsynced data is limited only by memory.
//! - Pages are lost whole or kept whole: no torn pages, no reordering of the writes inside one
//!   fsync (LazyFS's "torn" faults are not modelled).
//! - One backing file system: inode numbers are the backing ones.
//!
//! # What it must never do
//!
//! Report an fsync as done before the backing file is fsynced, or let a write that the cut
//! discarded reach the backing folder afterwards.
//!
//! # Performance
//!
//! Four threads serve requests, each reading its own copy of the FUSE device. Measured on the
//! 2-core development machine (ext4 on a virtio disk) by the test
//! `fsynced_small_writes_reach_the_backing_file`: 4 KiB writes each followed by fdatasync, 8 to
//! 11 MB/s through LazyFs against 7 to 15 MB/s on the backing folder directly (the fsync
//! dominates and varies from run to run); unsynced 1 MiB writes about 550 MB/s (FUSE round
//! trips; debug and release builds alike).
//!
//! The tests run nats-server (JetStream file store, with `sync_interval: always` and with its
//! lazy default) and PostgreSQL (initdb, commits, crash recovery) on it.
//!
//! Mounting needs root (the `mount(2)` system call; neither libfuse nor `fusermount3` is used)
//! and `/dev/fuse`. The calls here block: from async code, run them in `spawn_blocking`.

use std::collections::btree_map;
use std::collections::{BTreeMap, HashMap, hash_map};
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes, Metadata, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{
    DirBuilderExt as _, DirEntryExt as _, FileExt as _, MetadataExt as _, OpenOptionsExt as _,
    PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    Session, SessionACL, SessionUnmounter, TimeOrNow, WriteFlags,
};
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

/// The unit in which unsynced data is kept, written back and lost.
const PAGE: u64 = 4096;
/// How long the kernel may cache entries and attributes. Every change goes through us, so the
/// kernel's cache cannot go stale behind its back; the timeout only bounds memory.
const TTL: Duration = Duration::from_secs(1);
/// Threads serving FUSE requests: one slow fsync must not stall every reader.
const WORKERS: usize = 4;
/// How long an unmount waits for the request threads to stop. They stop at once since the
/// unmount aborts the connection ([`LazyFs::detach`]); this bounds a kernel that would not.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The set-group-ID bit: new entries in such a directory take its group.
const SET_GID: u32 = 0o2000;

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

/// What a power cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Unsynced bytes discarded, in whole pages (up to each file's end).
    pub bytes: u64,
    /// The files that lost data, relative to the backing folder, sorted. A file deleted since
    /// is named `(deleted, inode N)`.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Display for CutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "discarded {} unsynced bytes in {} files",
            self.bytes,
            self.files.len()
        )
    }
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
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
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

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A request that panicked left the maps as they were between two statements at worst;
    // serving the next requests is better than failing every one.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes every file's unsynced pages back and fdatasyncs them. Files that fail keep their
/// pages in memory.
fn write_back_all(state: &Mutex<State>) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let written: Vec<Arc<File>> = {
        // After a power cut there is nothing left to write: the cut took every page.
        let mut st = lock(state);
        let dirty = std::mem::take(&mut st.dirty);
        let mut written = Vec::new();
        for (ino, d) in dirty {
            match d.write_back() {
                Ok(()) => written.push(d.file),
                Err(e) => {
                    failures.push(format!("{}: {e}", st.name(ino).display()));
                    st.dirty.insert(ino, d);
                }
            }
        }
        written
    };
    for file in written {
        if let Err(e) = file.sync_data() {
            failures.push(format!("fdatasync: {e}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "LazyFs could not write back {} files: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

/// Everything the request threads share, behind one lock. Backing I/O that can be slow (fsync,
/// reads of clean data) happens outside it.
struct State {
    root: PathBuf,
    /// The backing inode number of `root`, which FUSE calls 1 (see [`State::fuse_ino`]).
    root_ino: u64,
    nodes: HashMap<u64, Node>,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    /// Unsynced data, per inode.
    dirty: HashMap<u64, Dirty>,
    /// After the power cut (or the unmount): every request fails with EIO.
    off: bool,
}

/// An inode the kernel knows.
struct Node {
    /// The backing path of one of its names; `None` once deleted.
    path: Option<PathBuf>,
    /// How many times the kernel was told about it, less what it forgot.
    lookups: u64,
}

enum Handle {
    File {
        ino: u64,
        file: Arc<File>,
        writable: bool,
        append: bool,
        /// `O_SYNC` (`Some(false)`) or `O_DSYNC` (`Some(true)`, data only): sync every write.
        sync: Option<bool>,
    },
    Dir {
        ino: u64,
        file: Arc<File>,
        entries: Vec<(u64, FileType, OsString)>,
    },
}

impl Handle {
    fn ino(&self) -> u64 {
        match self {
            Self::File { ino, .. } | Self::Dir { ino, .. } => *ino,
        }
    }

    fn file(&self) -> &Arc<File> {
        match self {
            Self::File { file, .. } | Self::Dir { file, .. } => file,
        }
    }
}

/// One file's data written since its last fsync. Invariants: the backing file is never longer
/// than `size` (truncation shortens both), and page bytes at or past `size` are zero.
struct Dirty {
    /// The backing file, open for writing; keeps a deleted file's data reachable.
    file: Arc<File>,
    /// The file's size as programs see it.
    size: u64,
    /// Whole pages by index, each holding the page's full current content.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// When it was last written, which the backing file does not know yet.
    mtime: Option<SystemTime>,
}

impl Dirty {
    fn new(file: Arc<File>) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            pages: BTreeMap::new(),
            mtime: None,
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(nix::errno::Errno::EFBIG as i32))?;
        let mut pos = offset;
        while pos < end {
            let index = pos / PAGE;
            let start = index * PAGE;
            let from = (pos - start) as usize;
            let to = (end.min(start + PAGE) - start) as usize;
            let page = match self.pages.entry(index) {
                btree_map::Entry::Occupied(e) => e.into_mut(),
                btree_map::Entry::Vacant(e) => {
                    // A page written in full needs nothing from the backing file.
                    let whole = from == 0 && to == PAGE as usize;
                    e.insert(load_page(&self.file, start, self.size, whole)?)
                }
            };
            let src = (pos - offset) as usize;
            page[from..to].copy_from_slice(&data[src..src + (to - from)]);
            pos = start + to as u64;
        }
        self.size = self.size.max(end);
        self.mtime = Some(SystemTime::now());
        Ok(())
    }

    /// The pages overlapping `len` bytes from `offset`, copied, and the size.
    fn snapshot(&self, offset: u64, len: u64) -> Overlay {
        let pages = if len == 0 {
            Vec::new()
        } else {
            let last = (offset + len - 1) / PAGE;
            self.pages
                .range(offset / PAGE..=last)
                .map(|(index, page)| (index * PAGE, page.clone()))
                .collect()
        };
        Overlay {
            size: self.size,
            pages,
        }
    }

    fn truncate(&mut self, size: u64) {
        drop(self.pages.split_off(&size.div_ceil(PAGE)));
        let tail = (size % PAGE) as usize;
        if tail != 0
            && let Some(page) = self.pages.get_mut(&(size / PAGE))
        {
            page[tail..].fill(0);
        }
        self.size = size;
    }

    /// The page bytes that fall inside the file, by page start.
    fn extents(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pages.iter().filter_map(|(index, page)| {
            let start = index * PAGE;
            let len = self.size.checked_sub(start)?.min(PAGE) as usize;
            (len > 0).then(|| (start, &page[..len]))
        })
    }

    /// Writes the pages to the backing file (its page cache); the caller syncs it.
    fn write_back(&self) -> io::Result<()> {
        self.extents()
            .try_for_each(|(start, bytes)| self.file.write_all_at(bytes, start))
    }

    fn bytes(&self) -> u64 {
        self.extents().map(|(_, bytes)| bytes.len() as u64).sum()
    }
}

/// What a read takes from [`Dirty`] to merge over the backing file outside the lock.
struct Overlay {
    size: u64,
    /// Copies of whole pages, by their start offset.
    pages: Vec<(u64, Box<[u8]>)>,
}

/// The current content of the page at `start`: zeros, and what the backing file holds there
/// below `size` unless the page is about to be written in full.
fn load_page(file: &File, start: u64, size: u64, whole: bool) -> io::Result<Box<[u8]>> {
    let mut page = vec![0; PAGE as usize].into_boxed_slice();
    if !whole && start < size {
        let len = (size - start).min(PAGE) as usize;
        read_full_at(file, &mut page[..len], start)?;
    }
    Ok(page)
}

/// Reads until `buf` is full or the file ends; returns how much it read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl State {
    fn new(root: PathBuf, root_ino: u64) -> Self {
        let nodes = HashMap::from([(
            INodeNo::ROOT.0,
            Node {
                path: Some(root.clone()),
                lookups: 1,
            },
        )]);
        Self {
            root,
            root_ino,
            nodes,
            handles: HashMap::new(),
            next_handle: 1,
            dirty: HashMap::new(),
            off: false,
        }
    }

    fn check_on(&self) -> Result<(), Errno> {
        if self.off { Err(Errno::EIO) } else { Ok(()) }
    }

    /// FUSE calls the root inode 1: swap the root's backing number with 1, so that every inode
    /// keeps a distinct number. (The swap is its own inverse.)
    fn fuse_ino(&self, backing_ino: u64) -> u64 {
        let root = INodeNo::ROOT.0;
        if backing_ino == self.root_ino {
            root
        } else if backing_ino == root {
            self.root_ino
        } else {
            backing_ino
        }
    }

    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    /// A file's name for reports: relative to the backing folder.
    fn name(&self, ino: u64) -> PathBuf {
        match self.nodes.get(&ino).and_then(|n| n.path.as_ref()) {
            Some(path) => path.strip_prefix(&self.root).unwrap_or(path).to_path_buf(),
            None => PathBuf::from(format!("(deleted, inode {ino})")),
        }
    }

    fn attr_from(&self, meta: &Metadata) -> FileAttr {
        let ino = self.fuse_ino(meta.ino());
        let mut size = meta.len();
        let mut blocks = meta.blocks();
        let mut mtime = unix_time(meta.mtime(), meta.mtime_nsec());
        if let Some(d) = self.dirty.get(&ino) {
            size = d.size;
            blocks = blocks.max(size.div_ceil(512));
            mtime = d.mtime.unwrap_or(mtime);
        }
        let ctime = unix_time(meta.ctime(), meta.ctime_nsec());
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: unix_time(meta.atime(), meta.atime_nsec()),
            mtime,
            ctime,
            crtime: ctime,
            kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: u32::try_from(meta.rdev()).unwrap_or(0),
            blksize: u32::try_from(meta.blksize()).unwrap_or(4096),
            flags: 0,
        }
    }

    fn metadata(&self, ino: u64, fh: Option<u64>) -> Result<Metadata, Errno> {
        if let Some(handle) = fh.and_then(|fh| self.handles.get(&fh)) {
            return Ok(handle.file().metadata()?);
        }
        if let Some(d) = self.dirty.get(&ino) {
            return Ok(d.file.metadata()?);
        }
        if let Some(path) = self.nodes.get(&ino).and_then(|n| n.path.as_ref()) {
            match std::fs::symlink_metadata(path) {
                Ok(meta) if self.fuse_ino(meta.ino()) == ino => return Ok(meta),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A deleted file that is still open.
        match self.handles.values().find(|h| h.ino() == ino) {
            Some(handle) => Ok(handle.file().metadata()?),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        Ok(self.attr_from(&self.metadata(ino, fh)?))
    }

    /// Records that the kernel now knows the inode at `path`, and returns its attributes.
    fn remember(&mut self, path: &Path, meta: &Metadata) -> FileAttr {
        let attr = self.attr_from(meta);
        let node = self.nodes.entry(attr.ino.0).or_insert(Node {
            path: None,
            lookups: 0,
        });
        node.path = Some(path.to_path_buf());
        node.lookups += 1;
        attr
    }

    fn add_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, handle);
        fh
    }

    /// After `path` stopped naming `ino`.
    fn forget_path(&mut self, ino: u64, path: &Path) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && node.path.as_deref() == Some(path)
        {
            node.path = None;
        }
    }

    /// Drops the unsynced data of a file that no name and no open handle reaches any more.
    fn drop_if_unreachable(&mut self, ino: u64) {
        if self.handles.values().any(|h| h.ino() == ino) {
            return;
        }
        if let hash_map::Entry::Occupied(d) = self.dirty.entry(ino)
            && d.get().file.metadata().is_ok_and(|m| m.nlink() == 0)
        {
            d.remove();
        }
    }

    fn truncate(&mut self, ino: u64, fh: Option<u64>, size: u64) -> Result<(), Errno> {
        if let Some(d) = self.dirty.get_mut(&ino) {
            d.file.set_len(size)?;
            d.truncate(size);
            return Ok(());
        }
        match fh.and_then(|fh| self.handles.get(&fh)) {
            Some(Handle::File {
                file,
                writable: true,
                ..
            }) => file.set_len(size)?,
            _ => OpenOptions::new()
                .write(true)
                .open(self.path(ino)?)?
                .set_len(size)?,
        }
        Ok(())
    }

    /// The power cut: forgets every unsynced page and turns the disk off.
    fn cut(&mut self) -> CutReport {
        self.off = true;
        let mut report = CutReport::default();
        for (ino, d) in std::mem::take(&mut self.dirty) {
            report.bytes += d.bytes();
            report.files.push(self.name(ino));
        }
        report.files.sort();
        report
    }

    fn list_dir(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let path = self.path(ino)?;
        let parent = match path.parent() {
            Some(parent) if ino != INodeNo::ROOT.0 => std::fs::symlink_metadata(parent)
                .map(|m| self.fuse_ino(m.ino()))
                .unwrap_or(INodeNo::ROOT.0),
            _ => INodeNo::ROOT.0,
        };
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let kind = entry
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            entries.push((self.fuse_ino(entry.ino()), kind, entry.file_name()));
        }
        Ok(entries)
    }
}

fn unix_time(secs: i64, nsec: i64) -> SystemTime {
    let whole = Duration::from_secs(secs.unsigned_abs());
    let base = if secs >= 0 {
        SystemTime::UNIX_EPOCH + whole
    } else {
        SystemTime::UNIX_EPOCH - whole
    };
    base + Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64)
}

fn time_spec(time: Option<TimeOrNow>) -> nix::sys::time::TimeSpec {
    match time {
        None => nix::sys::time::TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => nix::sys::time::TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => {
            let since = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            nix::sys::time::TimeSpec::from_duration(since)
        }
    }
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

/// Gives a new entry to the caller: their user, and their group unless the directory is
/// set-group-ID (then the entry already has the directory's group, as it should); then exactly
/// the mode they asked for, which our own umask must not trim.
fn hand_over(
    path: &Path,
    req: &Request,
    parent: &Metadata,
    mode: Option<u32>,
) -> Result<(), Errno> {
    let gid = (parent.mode() & SET_GID == 0).then_some(req.gid());
    std::os::unix::fs::lchown(path, Some(req.uid()), gid)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// `O_SYNC` → `Some(false)` (sync all), `O_DSYNC` → `Some(true)` (data only).
fn sync_mode(flags: OFlag) -> Option<bool> {
    if flags.contains(OFlag::O_SYNC) {
        Some(false)
    } else if flags.contains(OFlag::O_DSYNC) {
        Some(true)
    } else {
        None
    }
}

/// The FUSE side: each request locks [`State`], does its work on the backing folder, answers.
struct Ops {
    state: Arc<Mutex<State>>,
}

impl Ops {
    fn lock(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let st = lock(&self.state);
        st.check_on()?;
        Ok(st)
    }

    fn do_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(st.remember(&path, &meta))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        if let Some(size) = size {
            st.truncate(ino, fh, size)?;
        }
        let file = fh
            .and_then(|fh| st.handles.get(&fh))
            .map(|h| h.file().clone());
        if let Some(mode) = mode {
            let perms = std::fs::Permissions::from_mode(mode & 0o7777);
            match &file {
                Some(file) => file.set_permissions(perms)?,
                None => std::fs::set_permissions(st.path(ino)?, perms)?,
            }
        }
        if uid.is_some() || gid.is_some() {
            match &file {
                Some(file) => std::os::unix::fs::fchown(file, uid, gid)?,
                None => std::os::unix::fs::lchown(st.path(ino)?, uid, gid)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            match &file {
                Some(file) => {
                    let at = |t: TimeOrNow| match t {
                        TimeOrNow::Now => SystemTime::now(),
                        TimeOrNow::SpecificTime(t) => t,
                    };
                    let mut times = FileTimes::new();
                    if let Some(t) = atime {
                        times = times.set_accessed(at(t));
                    }
                    if let Some(t) = mtime {
                        times = times.set_modified(at(t));
                    }
                    file.set_times(times)?;
                }
                None => nix::sys::stat::utimensat(
                    nix::fcntl::AT_FDCWD,
                    &st.path(ino)?,
                    &time_spec(atime),
                    &time_spec(mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(nix_errno)?,
            }
            if mtime.is_some()
                && let Some(d) = st.dirty.get_mut(&ino)
            {
                d.mtime = None;
            }
        }
        st.attr(ino, fh)
    }

    /// Creates entry `name` in `parent` with `make`, which gets the new path and the parent's
    /// metadata and returns the mode to give the entry (`None`: leave it). Then the entry is
    /// handed to the caller (owner and group, as the kernel would) and remembered; if that
    /// fails, the entry is removed again (`make` made a directory when `dir`).
    fn new_entry(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        dir: bool,
        make: impl FnOnce(&Path, &std::fs::Metadata) -> Result<Option<u32>, Errno>,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        let parent_path = st.path(parent)?;
        let parent_meta = std::fs::symlink_metadata(&parent_path)?;
        let path = parent_path.join(name);
        let mode = make(&path, &parent_meta)?;
        if let Err(e) = hand_over(&path, req, &parent_meta, mode) {
            let _ = if dir {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            return Err(e);
        }
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(st.remember(&path, &meta))
    }

    fn do_mkdir(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        self.new_entry(req, parent, name, true, |path, parent_meta| {
            let mut mode = mode & 0o7777 & !umask;
            if parent_meta.mode() & SET_GID != 0 {
                mode |= SET_GID;
            }
            std::fs::DirBuilder::new().mode(mode).create(path)?;
            Ok(Some(mode))
        })
    }

    fn do_mknod(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        self.new_entry(req, parent, name, false, |path, _| {
            let perm = mode & 0o7777 & !umask;
            let kind = SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits());
            if kind == SFlag::S_IFREG {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(perm)
                    .open(path)?;
            } else {
                nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(perm), rdev.into())
                    .map_err(nix_errno)?;
            }
            Ok(Some(perm))
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn do_create(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let mut st = self.lock()?;
        let parent_path = st.path(parent)?;
        let parent_meta = std::fs::symlink_metadata(&parent_path)?;
        let path = parent_path.join(name);
        let flags = OFlag::from_bits_truncate(flags);
        let perm = mode & 0o7777 & !umask;
        let fresh = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(perm)
            .open(&path);
        let (file, created) = match fresh {
            Ok(file) => (file, true),
            // Someone created it since the kernel looked: open it, as open(2) would.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && !flags.contains(OFlag::O_EXCL) => (
                OpenOptions::new().read(true).write(true).open(&path)?,
                false,
            ),
            Err(e) => return Err(e.into()),
        };
        if created && let Err(e) = hand_over(&path, req, &parent_meta, Some(perm)) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let meta = file.metadata()?;
        let ino = st.fuse_ino(meta.ino());
        if !created && flags.contains(OFlag::O_TRUNC) {
            st.truncate(ino, None, 0)?;
        }
        let attr = st.remember(&path, &meta);
        let fh = st.add_handle(Handle::File {
            ino,
            file: Arc::new(file),
            writable: true,
            append: flags.contains(OFlag::O_APPEND),
            sync: sync_mode(flags),
        });
        Ok((attr, fh))
    }

    fn do_unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        std::fs::remove_file(&path)?;
        let ino = st.fuse_ino(meta.ino());
        st.forget_path(ino, &path);
        st.drop_if_unreachable(ino);
        Ok(())
    }

    fn do_rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        std::fs::remove_dir(&path)?;
        let ino = st.fuse_ino(meta.ino());
        st.forget_path(ino, &path);
        Ok(())
    }

    fn do_symlink(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, Errno> {
        self.new_entry(req, parent, name, false, |path, _| {
            std::os::unix::fs::symlink(target, path)?;
            Ok(None)
        })
    }

    fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let mut st = self.lock()?;
        let from = st.child(parent, name)?;
        let to = st.child(new_parent, new_name)?;
        let moved = std::fs::symlink_metadata(&from)?;
        let replaced = std::fs::symlink_metadata(&to).ok();
        if flags.is_empty() {
            std::fs::rename(&from, &to)?;
        } else {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &from,
                nix::fcntl::AT_FDCWD,
                &to,
                nix::fcntl::RenameFlags::from_bits_truncate(flags.bits()),
            )
            .map_err(nix_errno)?;
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if !exchange
            && let Some(replaced) = replaced
            && replaced.ino() != moved.ino()
        {
            let ino = st.fuse_ino(replaced.ino());
            st.forget_path(ino, &to);
            st.drop_if_unreachable(ino);
        }
        // Every inode at or under `from` (and, for an exchange, under `to`) moves with it.
        let swap = |path: &Path, a: &Path, b: &Path| {
            path.strip_prefix(a).ok().map(|rest| {
                if rest.as_os_str().is_empty() {
                    b.to_path_buf()
                } else {
                    b.join(rest)
                }
            })
        };
        for node in st.nodes.values_mut() {
            let Some(path) = &node.path else { continue };
            let renamed = swap(path, &from, &to)
                .or_else(|| exchange.then(|| swap(path, &to, &from)).flatten());
            if let Some(renamed) = renamed {
                node.path = Some(renamed);
            }
        }
        Ok(())
    }

    fn do_link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        let from = st.path(ino)?;
        let to = st.child(new_parent, new_name)?;
        std::fs::hard_link(&from, &to)?;
        let meta = std::fs::symlink_metadata(&to)?;
        Ok(st.remember(&to, &meta))
    }

    fn do_open(&self, ino: u64, flags: OpenFlags) -> Result<u64, Errno> {
        let mut st = self.lock()?;
        let path = st.path(ino)?;
        // Writable handles read too: a partly written page is completed from the file.
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let file = OpenOptions::new().read(true).write(writable).open(&path)?;
        let oflags = OFlag::from_bits_truncate(flags.0);
        Ok(st.add_handle(Handle::File {
            ino,
            file: Arc::new(file),
            writable,
            append: oflags.contains(OFlag::O_APPEND),
            sync: sync_mode(oflags),
        }))
    }

    fn do_read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let (file, overlay) = {
            let st = self.lock()?;
            let file = match st.handles.get(&fh) {
                Some(Handle::File { file, .. }) => file.clone(),
                _ => return Err(Errno::EBADF),
            };
            let overlay = st
                .dirty
                .get(&ino)
                .map(|d| d.snapshot(offset, u64::from(size)));
            (file, overlay)
        };
        // The backing file is read outside the lock: what is not in the overlay is there.
        match overlay {
            None => {
                let mut buf = vec![0; size as usize];
                let n = read_full_at(&file, &mut buf, offset)?;
                buf.truncate(n);
                Ok(buf)
            }
            Some(Overlay {
                size: file_size,
                pages,
            }) => {
                let end = file_size.min(offset.saturating_add(u64::from(size)));
                if offset >= end {
                    return Ok(Vec::new());
                }
                let mut buf = vec![0; (end - offset) as usize];
                // Short near the backing file's end: the rest is zeros or in the overlay.
                read_full_at(&file, &mut buf, offset)?;
                for (start, page) in pages {
                    let lo = start.max(offset);
                    let hi = (start + PAGE).min(end);
                    if lo < hi {
                        buf[(lo - offset) as usize..(hi - offset) as usize]
                            .copy_from_slice(&page[(lo - start) as usize..(hi - start) as usize]);
                    }
                }
                Ok(buf)
            }
        }
    }

    fn do_write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        let sync = {
            let mut st = self.lock()?;
            let (file, append, sync) = match st.handles.get(&fh) {
                Some(Handle::File {
                    file,
                    writable: true,
                    append,
                    sync,
                    ..
                }) => (file.clone(), *append, *sync),
                _ => return Err(Errno::EBADF),
            };
            let dirty = match st.dirty.entry(ino) {
                hash_map::Entry::Occupied(e) => e.into_mut(),
                hash_map::Entry::Vacant(e) => e.insert(Dirty::new(file.clone())?),
            };
            let offset = if append { dirty.size } else { offset };
            dirty.write(offset, data)?;
            sync.map(|data_only| (file, data_only))
        };
        if let Some((file, data_only)) = sync {
            self.sync(ino, file, data_only)?;
        }
        Ok(written)
    }

    /// Writes `ino`'s pages back and syncs the backing file; answers only once it is synced.
    /// `file` is synced when the inode has no unsynced data (another handle's, say).
    fn sync(&self, ino: u64, file: Arc<File>, data_only: bool) -> Result<(), Errno> {
        let file = {
            let mut st = self.lock()?;
            match st.dirty.remove(&ino) {
                None => file,
                Some(d) => match d.write_back() {
                    Ok(()) => d.file,
                    Err(e) => {
                        st.dirty.insert(ino, d);
                        return Err(e.into());
                    }
                },
            }
        };
        // Outside the lock: an fsync can take milliseconds. The pages are in the backing file's
        // page cache already, where reads find them.
        if data_only {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        Ok(())
    }

    fn handle_file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        self.lock()?
            .handles
            .get(&fh)
            .map(|h| h.file().clone())
            .ok_or(Errno::EBADF)
    }

    fn do_release(&self, fh: u64) {
        let mut st = lock(&self.state);
        if let Some(handle) = st.handles.remove(&fh) {
            st.drop_if_unreachable(handle.ino());
        }
    }

    fn do_opendir(&self, ino: u64) -> Result<u64, Errno> {
        let mut st = self.lock()?;
        let file = File::open(st.path(ino)?)?;
        Ok(st.add_handle(Handle::Dir {
            ino,
            file: Arc::new(file),
            entries: Vec::new(),
        }))
    }

    fn do_readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), Errno> {
        let mut st = self.lock()?;
        // Read afresh at offset 0, which is also where `rewinddir` starts again.
        let fresh = if offset == 0 {
            Some(st.list_dir(ino)?)
        } else {
            None
        };
        let Some(Handle::Dir { entries, .. }) = st.handles.get_mut(&fh) else {
            return Err(Errno::EBADF);
        };
        if let Some(fresh) = fresh {
            *entries = fresh;
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (entry_ino, kind, name)) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*entry_ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    fn do_statfs(&self) -> Result<nix::sys::statvfs::Statvfs, Errno> {
        let root = self.lock()?.root.clone();
        nix::sys::statvfs::statvfs(&root).map_err(nix_errno)
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_open(reply: ReplyOpen, result: Result<u64, Errno>) {
    match result {
        Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Ops {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.do_lookup(parent.0, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = lock(&self.state);
        if ino == INodeNo::ROOT {
            return;
        }
        let forgotten = st.nodes.get_mut(&ino.0).is_some_and(|node| {
            node.lookups = node.lookups.saturating_sub(nlookup);
            node.lookups == 0
        });
        // A node with unsynced data keeps its name for the power cut's report.
        if forgotten && !st.dirty.contains_key(&ino.0) {
            st.nodes.remove(&ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().and_then(|st| st.attr(ino.0, fh.map(|f| f.0))) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.do_setattr(ino.0, mode, uid, gid, size, atime, mtime, fh.map(|f| f.0));
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self
            .lock()
            .and_then(|st| st.path(ino.0))
            .and_then(|path| Ok(std::fs::read_link(path)?));
        match result {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_mknod(req, parent.0, name, mode, umask, rdev));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_mkdir(req, parent.0, name, mode, umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_symlink(req, parent.0, link_name, target));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.do_rename(parent.0, name, newparent.0, newname, flags),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_link(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply_open(reply, self.do_open(ino.0, flags));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.do_write(ino.0, fh.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self
            .handle_file(fh.0)
            .and_then(|file| self.sync(ino.0, file, datasync));
        reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply_open(reply, self.do_opendir(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.do_readdir(ino.0, fh.0, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.do_release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Entries are durable at once (see the module doc); the backing directory is synced so
        // that its fsync costs what a real one does.
        let result = self.handle_file(fh.0).and_then(|dir| {
            if datasync {
                dir.sync_data()?;
            } else {
                dir.sync_all()?;
            }
            Ok(())
        });
        reply_empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.do_statfs() {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                u32::try_from(s.block_size()).unwrap_or(4096),
                u32::try_from(s.name_max()).unwrap_or(255),
                u32::try_from(s.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions) and does not ask; should
        // it, existence is the answer.
        let result = self
            .lock()
            .and_then(|st| st.metadata(ino.0, None).map(drop));
        reply_empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.do_create(req, parent.0, name, mode, umask, flags) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;

    use super::*;

    /// A backing folder and a mount point in a temporary folder that other users can enter
    /// (PostgreSQL runs as `postgres`).
    struct Dirs {
        tmp: tempfile::TempDir,
        backing: PathBuf,
        mnt: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::Builder::new()
            .prefix("lazyfs-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let backing = tmp.path().join("disk");
        let mnt = tmp.path().join("mnt");
        for dir in [&backing, &mnt] {
            std::fs::DirBuilder::new().mode(0o755).create(dir).unwrap();
        }
        Dirs { tmp, backing, mnt }
    }

    #[test]
    fn fsynced_data_survives_a_power_cut_and_unsynced_data_does_not() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();

        let mut synced = File::create(d.mnt.join("synced")).unwrap();
        synced.write_all(b"durable").unwrap();
        synced.sync_all().unwrap();
        std::fs::write(d.mnt.join("unsynced"), b"volatile").unwrap();
        let mut prefix = File::create(d.mnt.join("prefix")).unwrap();
        prefix.write_all(b"first").unwrap();
        prefix.sync_data().unwrap();
        prefix.write_all(b" second").unwrap();
        drop((synced, prefix));

        // Programs see their writes at once; the disk has only what was fsynced.
        assert_eq!(std::fs::read(d.mnt.join("unsynced")).unwrap(), b"volatile");
        assert_eq!(
            std::fs::read(d.mnt.join("prefix")).unwrap(),
            b"first second"
        );
        assert_eq!(std::fs::metadata(d.mnt.join("prefix")).unwrap().len(), 12);
        assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
        assert_eq!(std::fs::read(d.backing.join("prefix")).unwrap(), b"first");

        let report = fs.power_cut().unwrap();
        assert_eq!(
            report.files,
            [PathBuf::from("prefix"), PathBuf::from("unsynced")]
        );
        assert_eq!(report.bytes, 12 + 8, "whole files here, each under a page");

        assert_eq!(std::fs::read(d.backing.join("synced")).unwrap(), b"durable");
        assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
        assert_eq!(std::fs::read(d.backing.join("prefix")).unwrap(), b"first");
        assert!(
            std::fs::read_dir(&d.mnt).unwrap().next().is_none(),
            "the mount point is empty again after the cut"
        );

        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        assert_eq!(std::fs::read(d.mnt.join("prefix")).unwrap(), b"first");
        assert_eq!(std::fs::read(d.mnt.join("synced")).unwrap(), b"durable");
        fs.unmount().unwrap();
    }

    #[test]
    fn a_power_cut_tears_down_a_mount_that_is_still_in_use() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let mut open = File::create(d.mnt.join("held")).unwrap();
        open.write_all(b"never synced").unwrap();
        let report = fs.power_cut().unwrap();
        assert_eq!(report.files, [PathBuf::from("held")]);
        // The disk is gone under the process that still holds the file.
        assert!(open.write_all(b"more").is_err());
        assert!(open.sync_all().is_err());
        drop(open);
        assert_eq!(std::fs::read(d.backing.join("held")).unwrap(), b"");
        // The mount point is free again.
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        assert_eq!(std::fs::read(d.mnt.join("held")).unwrap(), b"");
        fs.unmount().unwrap();
    }

    /// The reliability harness starts every role on a host with `ip netns exec`, which gives the
    /// role a mount namespace of its own, a copy of ours taken at its start: copies of every
    /// LazyFs mounted then, which our unmount does not reach (this machine's `/` is private, so
    /// nothing propagates). Such a copy keeps the FUSE connection alive, and a power cut used to
    /// wait [`STOP_TIMEOUT`] for request threads that never stopped: 10 s per disk, 40 s of the
    /// harness's power-loss fault.
    #[test]
    fn a_power_cut_is_quick_and_final_while_another_mount_namespace_holds_a_copy() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        std::fs::write(d.mnt.join("unsynced"), b"volatile").unwrap();
        // What `ip netns exec` does: unshare(CLONE_NEWNS), then `/` made a slave.
        let mut copy = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sleep", "60"])
            .spawn()
            .unwrap();
        let mnt = d.mnt.canonicalize().unwrap();
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", copy.id())).unwrap() == ours
            || !std::fs::read_to_string(format!("/proc/{}/mountinfo", copy.id()))
                .unwrap()
                .contains(mnt.to_str().unwrap())
        {
            assert!(Instant::now() < deadline, "unshare never copied the mount");
            std::thread::sleep(Duration::from_millis(10));
        }

        let started = Instant::now();
        let report = fs.power_cut().unwrap();
        let took = started.elapsed();
        assert_eq!(report.files, [PathBuf::from("unsynced")]);
        assert!(
            took < Duration::from_secs(2),
            "the power cut took {took:?}: it waited for the copy's connection"
        );
        // Nothing written through the copy reaches the disk after the cut.
        let write = std::process::Command::new("nsenter")
            .arg(format!("--target={}", copy.id()))
            .args(["--mount", "sh", "-c"])
            .arg(format!("echo late > {}/late", mnt.display()))
            .status()
            .unwrap();
        assert!(!write.success(), "a write through the copy succeeded");
        assert!(!d.backing.join("late").exists());
        assert_eq!(std::fs::read(d.backing.join("unsynced")).unwrap(), b"");
        copy.kill().unwrap();
        copy.wait().unwrap();
    }

    #[test]
    fn a_clean_unmount_writes_everything_back() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        std::fs::create_dir_all(d.mnt.join("a/b")).unwrap();
        std::fs::write(d.mnt.join("a/b/file"), b"kept by a clean shutdown").unwrap();
        for line in ["one\n", "two\n"] {
            let mut log = OpenOptions::new()
                .append(true)
                .create(true)
                .open(d.mnt.join("a/log"))
                .unwrap();
            log.write_all(line.as_bytes()).unwrap();
        }
        assert_eq!(std::fs::read(d.mnt.join("a/log")).unwrap(), b"one\ntwo\n");
        let space = nix::sys::statvfs::statvfs(&d.mnt).unwrap();
        assert!(space.blocks() > 0 && space.files() > 0);
        assert_eq!(std::fs::read(d.backing.join("a/b/file")).unwrap(), b"");
        fs.unmount().unwrap();
        assert_eq!(
            std::fs::read(d.backing.join("a/b/file")).unwrap(),
            b"kept by a clean shutdown"
        );
        assert_eq!(
            std::fs::read(d.backing.join("a/log")).unwrap(),
            b"one\ntwo\n"
        );

        // Busy: written back all the same, unmounted by force, and said so.
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let mut open = File::create(d.mnt.join("a/busy")).unwrap();
        open.write_all(b"written back").unwrap();
        let error = fs.unmount().unwrap_err();
        assert!(error.to_string().contains("still in use"), "{error:#}");
        assert_eq!(
            std::fs::read(d.backing.join("a/busy")).unwrap(),
            b"written back"
        );
        assert!(open.write_all(b"more").is_err());
    }

    #[test]
    fn reads_merge_unsynced_pages_over_the_file_through_overwrites_and_truncation() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let path = d.mnt.join("pages");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // What the file must read as, kept beside it.
        let mut model: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&model, 0).unwrap();
        file.sync_all().unwrap();
        let synced = model.clone();

        // Across page boundaries, past the end, then cut back into a dirty page.
        let patch = vec![0xAA; 5000];
        file.write_all_at(&patch, 3000).unwrap();
        model[3000..8000].copy_from_slice(&patch);
        file.write_all_at(b"tail", 12_000).unwrap();
        model.resize(12_000, 0);
        model.extend_from_slice(b"tail");
        assert_eq!(std::fs::read(&path).unwrap(), model);
        file.set_len(9000).unwrap();
        model.truncate(9000);
        assert_eq!(std::fs::read(&path).unwrap(), model);
        // Growing again shows zeros, not the bytes cut off.
        file.set_len(13_000).unwrap();
        model.resize(13_000, 0);
        assert_eq!(std::fs::read(&path).unwrap(), model);
        let mut odd = vec![0; 777];
        let n = file.read_at(&mut odd, 8_500).unwrap();
        assert_eq!(&odd[..n], &model[8_500..8_500 + n]);
        drop(file);

        // The truncation was durable at once, the writes were not.
        let report = fs.power_cut().unwrap();
        assert_eq!(report.files, [PathBuf::from("pages")]);
        let mut disk = synced;
        disk.truncate(9000);
        disk.resize(13_000, 0);
        assert_eq!(std::fs::read(d.backing.join("pages")).unwrap(), disk);
    }

    #[test]
    fn unsynced_data_follows_its_file_through_a_rename_and_dies_with_it() {
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        std::fs::create_dir(d.mnt.join("dir")).unwrap();
        std::fs::write(d.mnt.join("dir/tmp"), b"meta v2").unwrap();
        std::fs::write(d.mnt.join("dir/meta"), b"meta v1").unwrap();
        // Write, rename over the old file, then fsync under the new name: nats-server's way.
        std::fs::rename(d.mnt.join("dir/tmp"), d.mnt.join("dir/meta")).unwrap();
        std::fs::rename(d.mnt.join("dir"), d.mnt.join("moved")).unwrap();
        File::open(d.mnt.join("moved/meta"))
            .unwrap()
            .sync_all()
            .unwrap();
        std::fs::write(d.mnt.join("moved/gone"), b"deleted before the cut").unwrap();
        std::fs::remove_file(d.mnt.join("moved/gone")).unwrap();
        let names: Vec<_> = std::fs::read_dir(d.mnt.join("moved"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["meta"]);

        let report = fs.power_cut().unwrap();
        assert_eq!(report, CutReport::default(), "nothing unsynced was left");
        assert_eq!(
            std::fs::read(d.backing.join("moved/meta")).unwrap(),
            b"meta v2"
        );
    }

    #[test]
    fn new_entries_belong_to_the_user_who_made_them() {
        let d = dirs();
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("this test runs a shell as the `postgres` user, which must exist");
        let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
        std::os::unix::fs::chown(&d.backing, Some(uid), Some(gid)).unwrap();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let status = std::process::Command::new("sh")
            .args([
                "-c",
                "umask 077 && mkdir d && echo x > d/f && ln -s f d/l && mv d/f d/g",
            ])
            .current_dir(&d.mnt)
            .uid(uid)
            .gid(gid)
            .status()
            .unwrap();
        assert!(status.success());
        for (name, mode) in [("d", 0o700), ("d/g", 0o600)] {
            let meta = std::fs::metadata(d.backing.join(name)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{name}");
            assert_eq!(meta.mode() & 0o7777, mode, "{name}");
        }
        let link = std::fs::symlink_metadata(d.backing.join("d/l")).unwrap();
        assert_eq!(link.uid(), uid);
        // Root's files stay out of the user's reach, as on the backing disk.
        std::fs::write(d.mnt.join("root-only"), b"secret").unwrap();
        std::fs::set_permissions(
            d.mnt.join("root-only"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::chown(d.mnt.join("root-only"), Some(0), Some(0)).unwrap();
        let status = std::process::Command::new("cat")
            .arg("root-only")
            .current_dir(&d.mnt)
            .uid(uid)
            .gid(gid)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "default_permissions refused the read");
        fs.unmount().unwrap();
    }

    #[test]
    fn fsynced_small_writes_reach_the_backing_file() {
        const WRITES: usize = 500;
        let d = dirs();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let block: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
        let mut rates = Vec::new();
        for dir in [&d.mnt, &d.backing] {
            let mut file = File::create(dir.join(format!("log-{}", rates.len()))).unwrap();
            let started = Instant::now();
            for _ in 0..WRITES {
                file.write_all(&block).unwrap();
                file.sync_data().unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            rates.push((WRITES * block.len()) as f64 / secs / 1e6);
        }
        eprintln!(
            "fsynced 4 KiB writes: {:.1} MB/s through LazyFs, {:.1} MB/s on the backing folder",
            rates[0], rates[1]
        );
        let big = vec![7u8; 1 << 20];
        let mut file = File::create(d.mnt.join("big")).unwrap();
        let started = Instant::now();
        for _ in 0..64 {
            file.write_all(&big).unwrap();
        }
        eprintln!(
            "unsynced 1 MiB writes: {:.0} MB/s through LazyFs",
            64.0 * big.len() as f64 / started.elapsed().as_secs_f64() / 1e6
        );
        drop(file);
        let report = fs.power_cut().unwrap();
        assert_eq!(report.files, [PathBuf::from("big")]);
        assert_eq!(report.bytes, 64 << 20);
        let disk = std::fs::read(d.backing.join("log-0")).unwrap();
        assert_eq!(disk.len(), WRITES * block.len());
        assert!(disk.chunks(block.len()).all(|c| c == block));
        assert_eq!(std::fs::metadata(d.backing.join("big")).unwrap().len(), 0);
    }

    /// Publishes `MESSAGES` acked messages to a file stream of a nats-server whose store is on
    /// LazyFs, kills the server (SIGKILL), cuts the power, mounts the disk again and restarts the
    /// server; returns how many messages the restarted server has, the last one's payload, and
    /// what the cut threw away.
    async fn nats_through_a_power_cut(sync: crate::Sync) -> (u64, Option<String>, CutReport) {
        use async_nats::jetstream::{self, stream};
        let d = dirs();
        let run = d.tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        // The store is a symlink into the mount, so that the config, log and pid file stay on the
        // real disk: the config was never fsynced, the cut would empty it.
        std::os::unix::fs::symlink(&d.mnt, run.join("nats")).unwrap();
        let mut spec = crate::NatsSpec::new(crate::NatsLayout::Single);
        spec.sync = sync;
        spec.stems = Some(vec!["nats".to_owned()]);

        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let mut nats = crate::Nats::start_with(&spec, &run).await.unwrap();
        let js = jetstream::new(nats.client(landslide_nats::User::Admin).await.unwrap());
        js.create_stream(stream::Config {
            name: "LAZY".to_owned(),
            subjects: vec!["lazy.>".to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..MESSAGES {
            let ack = js
                .publish("lazy.votes", i.to_string().into())
                .await
                .unwrap();
            ack.await.unwrap();
        }
        nats.kill(0).await.unwrap();
        let report = tokio::task::spawn_blocking(move || fs.power_cut())
            .await
            .unwrap()
            .unwrap();

        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        nats.restart(0)
            .await
            .expect("nats-server starts again on the disk the power cut left");
        let js = jetstream::new(nats.client(landslide_nats::User::Admin).await.unwrap());
        let (messages, last) = match js.get_stream("LAZY").await {
            Ok(mut stream) => {
                let messages = stream.info().await.unwrap().state.messages;
                let last = stream
                    .get_last_raw_message_by_subject("lazy.votes")
                    .await
                    .ok()
                    .map(|m| String::from_utf8_lossy(&m.payload).into_owned());
                (messages, last)
            }
            // The stream's definition itself was lost.
            Err(_) => (0, None),
        };
        nats.terminate(0, Duration::from_secs(10)).await.unwrap();
        tokio::task::spawn_blocking(move || fs.unmount())
            .await
            .unwrap()
            .unwrap();
        (messages, last, report)
    }

    const MESSAGES: u64 = 200;

    #[tokio::test(flavor = "multi_thread")]
    async fn nats_server_that_fsyncs_before_acking_keeps_every_acked_message_through_a_power_cut() {
        let (messages, last, report) = nats_through_a_power_cut(crate::Sync::Always).await;
        eprintln!("sync always: {report}: {:?}", report.files);
        assert_eq!(messages, MESSAGES);
        assert_eq!(last.as_deref(), Some("199"));
    }

    /// The control: with the server's default (fsync every two minutes) the acked messages are
    /// only in memory, and the cut takes them. This is what shows the fault is real.
    #[tokio::test(flavor = "multi_thread")]
    async fn nats_server_with_its_lazy_default_loses_acked_messages_at_a_power_cut() {
        let (messages, _, report) = nats_through_a_power_cut(crate::Sync::Lazy).await;
        eprintln!(
            "lazy sync: {report}: {:?}; {messages} messages left",
            report.files
        );
        assert!(messages < MESSAGES, "{messages} of {MESSAGES} survived");
        assert!(report.bytes > 0);
    }

    /// PostgreSQL (as the `postgres` user) with its data folder on LazyFs: initdb, start, commit
    /// rows, crash (immediate stop), power cut, start again: crash recovery finds every commit.
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_keeps_committed_rows_through_a_crash_and_a_power_cut() {
        use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let d = dirs();
        let spec = crate::postgres::PostgresSpec {
            cluster: d.mnt.join("pg"),
            // Outside the mount, so that the cut does not take the log.
            log: d.tmp.path().join("postgres.log"),
            port: crate::free_port().unwrap(),
            superuser: "postgres".to_owned(),
            place: crate::Place::loopback(),
            access: crate::postgres::PgAccess::default(),
        };
        let bins = crate::Binaries::system().postgres(&spec.cluster).unwrap();
        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        let mut pg = crate::Postgres::start_with(spec, bins).await.unwrap();
        pg.create_database("lazy").await.unwrap();
        let mut conn = AsyncPgConnection::establish(&pg.url("lazy")).await.unwrap();
        diesel::sql_query("CREATE TABLE votes (n int)")
            .execute(&mut conn)
            .await
            .unwrap();
        for n in 0..50 {
            diesel::sql_query(format!("INSERT INTO votes VALUES ({n})"))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        drop(conn);
        pg.stop(crate::PgStop::Immediate).await.unwrap();
        let report = tokio::task::spawn_blocking(move || fs.power_cut())
            .await
            .unwrap()
            .unwrap();
        eprintln!("postgres: {report}");

        let fs = LazyFs::mount(&d.backing, &d.mnt).unwrap();
        pg.start_server().await.unwrap();
        let mut conn = AsyncPgConnection::establish(&pg.url("lazy")).await.unwrap();
        let count: Count = diesel::sql_query("SELECT count(*) AS n FROM votes")
            .get_result(&mut conn)
            .await
            .unwrap();
        assert_eq!(count.n, 50);
        drop(conn);
        pg.stop(crate::PgStop::Fast).await.unwrap();
        tokio::task::spawn_blocking(move || fs.unmount())
            .await
            .unwrap()
            .unwrap();
    }
}
