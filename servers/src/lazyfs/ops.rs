//! The requests: what each FUSE operation does to the backing folder and to the unsynced data,
//! under [`State`]'s lock, as a `Result` for [`super::filesystem`] to answer with.

use std::collections::hash_map;
use std::ffi::OsStr;
use std::fs::{File, FileTimes, Metadata, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, INodeNo, OpenAccMode, OpenFlags, RenameFlags, ReplyDirectory, Request,
    TimeOrNow,
};
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

use super::dirty::{Dirty, Overlay, PAGE, read_full_at};
use super::state::{Handle, State, lock};

/// The set-group-ID bit: new entries in such a directory take its group.
const SET_GID: u32 = 0o2000;

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
pub(super) struct Ops {
    pub(super) state: Arc<Mutex<State>>,
}

impl Ops {
    pub(super) fn lock(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let st = lock(&self.state);
        st.check_on()?;
        Ok(st)
    }

    pub(super) fn do_lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(st.remember(&path, &meta))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn do_setattr(
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

    pub(super) fn do_mkdir(
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

    pub(super) fn do_mknod(
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
    pub(super) fn do_create(
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

    pub(super) fn do_unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        std::fs::remove_file(&path)?;
        let ino = st.fuse_ino(meta.ino());
        st.forget_path(ino, &path);
        st.drop_if_unreachable(ino);
        Ok(())
    }

    pub(super) fn do_rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let mut st = self.lock()?;
        let path = st.child(parent, name)?;
        let meta = std::fs::symlink_metadata(&path)?;
        std::fs::remove_dir(&path)?;
        let ino = st.fuse_ino(meta.ino());
        st.forget_path(ino, &path);
        Ok(())
    }

    pub(super) fn do_symlink(
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

    pub(super) fn do_rename(
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

    pub(super) fn do_link(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<FileAttr, Errno> {
        let mut st = self.lock()?;
        let from = st.path(ino)?;
        let to = st.child(new_parent, new_name)?;
        std::fs::hard_link(&from, &to)?;
        let meta = std::fs::symlink_metadata(&to)?;
        Ok(st.remember(&to, &meta))
    }

    pub(super) fn do_open(&self, ino: u64, flags: OpenFlags) -> Result<u64, Errno> {
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

    pub(super) fn do_read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
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

    pub(super) fn do_write(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
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
    pub(super) fn sync(&self, ino: u64, file: Arc<File>, data_only: bool) -> Result<(), Errno> {
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

    pub(super) fn handle_file(&self, fh: u64) -> Result<Arc<File>, Errno> {
        self.lock()?
            .handles
            .get(&fh)
            .map(|h| h.file().clone())
            .ok_or(Errno::EBADF)
    }

    pub(super) fn do_release(&self, fh: u64) {
        let mut st = lock(&self.state);
        if let Some(handle) = st.handles.remove(&fh) {
            st.drop_if_unreachable(handle.ino());
        }
    }

    pub(super) fn do_opendir(&self, ino: u64) -> Result<u64, Errno> {
        let mut st = self.lock()?;
        let file = File::open(st.path(ino)?)?;
        Ok(st.add_handle(Handle::Dir {
            ino,
            file: Arc::new(file),
            entries: Vec::new(),
        }))
    }

    pub(super) fn do_readdir(
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

    pub(super) fn do_statfs(&self) -> Result<nix::sys::statvfs::Statvfs, Errno> {
        let root = self.lock()?.root.clone();
        nix::sys::statvfs::statvfs(&root).map_err(nix_errno)
    }
}
