//! The in-memory model of unsynced writes: one file's data written since its last fsync, kept
//! as whole pages over the backing file until an fsync writes them back or a cut drops them.

use std::collections::{BTreeMap, btree_map};
use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::SystemTime;

/// The unit in which unsynced data is kept, written back and lost.
pub(super) const PAGE: u64 = 4096;

/// One file's data written since its last fsync. Invariants: the backing file is never longer
/// than `size` (truncation shortens both), and page bytes at or past `size` are zero.
pub(super) struct Dirty {
    /// The backing file, open for writing; keeps a deleted file's data reachable.
    pub(super) file: Arc<File>,
    /// The file's size as programs see it.
    pub(super) size: u64,
    /// Whole pages by index, each holding the page's full current content.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// When it was last written, which the backing file does not know yet.
    pub(super) mtime: Option<SystemTime>,
}

impl Dirty {
    pub(super) fn new(file: Arc<File>) -> io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            pages: BTreeMap::new(),
            mtime: None,
        })
    }

    pub(super) fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
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
    pub(super) fn snapshot(&self, offset: u64, len: u64) -> Overlay {
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

    pub(super) fn truncate(&mut self, size: u64) {
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
    pub(super) fn write_back(&self) -> io::Result<()> {
        self.extents()
            .try_for_each(|(start, bytes)| self.file.write_all_at(bytes, start))
    }

    pub(super) fn bytes(&self) -> u64 {
        self.extents().map(|(_, bytes)| bytes.len() as u64).sum()
    }
}

/// What a read takes from [`Dirty`] to merge over the backing file outside the lock.
pub(super) struct Overlay {
    pub(super) size: u64,
    /// Copies of whole pages, by their start offset.
    pub(super) pages: Vec<(u64, Box<[u8]>)>,
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
pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
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
