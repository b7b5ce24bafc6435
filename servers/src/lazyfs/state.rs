//! What the request threads share, behind one lock: the inodes the kernel knows, the open
//! handles, and each file's unsynced data ([`Dirty`]).

use std::collections::{HashMap, hash_map};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirEntryExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::bail;
use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::CutReport;
use super::dirty::Dirty;

pub(super) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A request that panicked left the maps as they were between two statements at worst;
    // serving the next requests is better than failing every one.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes every file's unsynced pages back and fdatasyncs them. Files that fail keep their
/// pages in memory.
pub(super) fn write_back_all(state: &Mutex<State>) -> anyhow::Result<()> {
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
pub(super) struct State {
    pub(super) root: PathBuf,
    /// The backing inode number of `root`, which FUSE calls 1 (see [`State::fuse_ino`]).
    root_ino: u64,
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) handles: HashMap<u64, Handle>,
    next_handle: u64,
    /// Unsynced data, per inode.
    pub(super) dirty: HashMap<u64, Dirty>,
    /// After the power cut (or the unmount): every request fails with EIO.
    pub(super) off: bool,
}

/// An inode the kernel knows.
pub(super) struct Node {
    /// The backing path of one of its names; `None` once deleted.
    pub(super) path: Option<PathBuf>,
    /// How many times the kernel was told about it, less what it forgot.
    pub(super) lookups: u64,
}

pub(super) enum Handle {
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
    pub(super) fn ino(&self) -> u64 {
        match self {
            Self::File { ino, .. } | Self::Dir { ino, .. } => *ino,
        }
    }

    pub(super) fn file(&self) -> &Arc<File> {
        match self {
            Self::File { file, .. } | Self::Dir { file, .. } => file,
        }
    }
}

impl State {
    pub(super) fn new(root: PathBuf, root_ino: u64) -> Self {
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

    pub(super) fn check_on(&self) -> Result<(), Errno> {
        if self.off { Err(Errno::EIO) } else { Ok(()) }
    }

    /// FUSE calls the root inode 1: swap the root's backing number with 1, so that every inode
    /// keeps a distinct number. (The swap is its own inverse.)
    pub(super) fn fuse_ino(&self, backing_ino: u64) -> u64 {
        let root = INodeNo::ROOT.0;
        if backing_ino == self.root_ino {
            root
        } else if backing_ino == root {
            self.root_ino
        } else {
            backing_ino
        }
    }

    pub(super) fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    pub(super) fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
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

    pub(super) fn metadata(&self, ino: u64, fh: Option<u64>) -> Result<Metadata, Errno> {
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

    pub(super) fn attr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        Ok(self.attr_from(&self.metadata(ino, fh)?))
    }

    /// Records that the kernel now knows the inode at `path`, and returns its attributes.
    pub(super) fn remember(&mut self, path: &Path, meta: &Metadata) -> FileAttr {
        let attr = self.attr_from(meta);
        let node = self.nodes.entry(attr.ino.0).or_insert(Node {
            path: None,
            lookups: 0,
        });
        node.path = Some(path.to_path_buf());
        node.lookups += 1;
        attr
    }

    pub(super) fn add_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, handle);
        fh
    }

    /// After `path` stopped naming `ino`.
    pub(super) fn forget_path(&mut self, ino: u64, path: &Path) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && node.path.as_deref() == Some(path)
        {
            node.path = None;
        }
    }

    /// Drops the unsynced data of a file that no name and no open handle reaches any more.
    pub(super) fn drop_if_unreachable(&mut self, ino: u64) {
        if self.handles.values().any(|h| h.ino() == ino) {
            return;
        }
        if let hash_map::Entry::Occupied(d) = self.dirty.entry(ino)
            && d.get().file.metadata().is_ok_and(|m| m.nlink() == 0)
        {
            d.remove();
        }
    }

    pub(super) fn truncate(&mut self, ino: u64, fh: Option<u64>, size: u64) -> Result<(), Errno> {
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
    pub(super) fn cut(&mut self) -> CutReport {
        self.off = true;
        let mut report = CutReport::default();
        for (ino, d) in std::mem::take(&mut self.dirty) {
            report.bytes += d.bytes();
            report.files.push(self.name(ino));
        }
        report.files.sort();
        report
    }

    pub(super) fn list_dir(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
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
