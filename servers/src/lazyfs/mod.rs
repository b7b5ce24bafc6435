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
//!
//! # Where things are
//!
//! - `mount.rs`: [`LazyFs`], the mount: mounting, the power cut and the clean unmount.
//! - `state.rs`: what the request threads share behind one lock, the inodes the kernel knows,
//!   the open handles and each file's unsynced data; the cut and the write-back of all of it.
//! - `dirty.rs`: one file's unsynced data, as whole pages in memory.
//! - `ops.rs`: what each request does to the backing folder and the unsynced data.
//! - `filesystem.rs`: fuser's callbacks, each running its request and answering the kernel.

mod dirty;
mod filesystem;
mod mount;
mod ops;
mod state;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use mount::LazyFs;

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
