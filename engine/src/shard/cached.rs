//! Reads served on the caller's thread when the record is in the page cache.
//!
//! A read normally travels to its shard's thread and back: two thread
//! hand-overs, which on a small machine cost more than reading a cached record
//! (a 4 KiB FUSE read of a cached sector spent most of its 48 µs switching
//! threads). With buffered reads on, each shard shares a [`ShardView`]: its
//! index, behind a lock the shard takes only to change it, and the buffered read
//! descriptor of each of its segments. A caller looks the key up, reads the
//! record with `preadv2(RWF_NOWAIT)` (which refuses rather than waits for the
//! disk), checks it as the shard would, then checks the index still names the
//! same location.
//!
//! Why that is enough: segment numbers are never reused, and the index points at
//! a location only once its chunk is written and never points back at it after
//! moving on. So if the index named the location before and after the read, the
//! bytes read were that live record throughout, even if the segment's file was
//! meanwhile renamed or reused. Anything else (not cached, no descriptor for the
//! segment yet, the index moved, a record that does not check) is left to the
//! shard, which answers exactly as it did before.
//!
//! tmpfs refuses `RWF_NOWAIT`, but nothing there waits for a disk, so a plain
//! read does; on any other file system that refuses it, every read goes to its
//! shard ([`read_flags`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::index::{Index, Loc};
use crate::record::{self, Key, RECORD_HEADER_LEN, RecordKind};

/// What a shard shares with callers that read on their own thread.
pub(crate) struct ShardView {
    index: RwLock<Index>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    /// False once the shard stopped (reads then fail through the shard's
    /// channel), or once the file system refused `RWF_NOWAIT`.
    open: AtomicBool,
    /// Reads this view served.
    served: AtomicU64,
    /// `preadv2` flags that read without waiting for the disk.
    flags: libc::c_int,
}

/// The `preadv2` flags that read the store in `dir` without waiting for its
/// disk, or `None` if its file system cannot.
pub(crate) fn read_flags(dir: &Path) -> Option<libc::c_int> {
    let file = File::open(dir.join(crate::superblock::FILE_NAME)).ok()?;
    let mut byte = [0u8; 1];
    let iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: `iov` describes `byte`, which outlives the call; `file` is open.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
    if read >= 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
        return Some(libc::RWF_NOWAIT);
    }
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `stat` is a writable statfs the call fills in; the descriptor is open.
    let memory_backed = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) } == 0
        // SAFETY: fstatfs returned 0, so it filled `stat` in.
        && unsafe { stat.assume_init() }.f_type == libc::TMPFS_MAGIC;
    memory_backed.then_some(0)
}

/// What a read on the caller's thread found.
pub(crate) enum Cached {
    /// The index has no entry: the sector was never written or was deleted.
    Absent,
    /// The record's payload.
    Found(Vec<u8>),
}

impl ShardView {
    /// A view over `index`, which the shard then reaches through it; readers
    /// read with `flags` ([`read_flags`]).
    pub fn new(index: Index, flags: libc::c_int) -> ShardView {
        ShardView {
            index: RwLock::new(index),
            readers: RwLock::new(HashMap::new()),
            open: AtomicBool::new(true),
            served: AtomicU64::new(0),
            flags,
        }
    }

    /// The index, for reading.
    pub fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index, for changing (the shard thread only).
    pub fn index_mut(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes segment `id`'s buffered read descriptor.
    pub fn add_reader(&self, id: u32, reader: Arc<File>) {
        self.readers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, reader);
    }

    /// Withdraws segment `id`'s descriptor (the segment is being retired).
    pub fn remove_reader(&self, id: u32) {
        self.readers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Marks the shard stopped.
    pub fn close(&self) {
        self.open.store(false, Ordering::Release);
    }

    /// Reads this view has served since the store opened.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Reads `key` on this thread if its record is in the page cache; `None`
    /// leaves the read to the shard.
    pub fn read(&self, key: &Key) -> Option<Cached> {
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        let Some(loc) = self.index().get(key) else {
            self.served.fetch_add(1, Ordering::Relaxed);
            return Some(Cached::Absent);
        };
        let reader = self
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&loc.segment)
            .cloned()?;
        let payload = match read_record(&reader, key, loc, self.flags) {
            Ok(payload) => payload?,
            Err(Unsupported) => {
                tracing::debug!("the file system refuses RWF_NOWAIT: every read goes to its shard");
                self.close();
                return None;
            }
        };
        if self.index().get(key) != Some(loc) {
            return None;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(Cached::Found(payload))
    }
}

/// The file system cannot read without waiting (`RWF_NOWAIT`).
struct Unsupported;

/// The payload of the record at `loc`, if all of it is in the page cache and it
/// is an intact record of `key`.
fn read_record(
    file: &File,
    key: &Key,
    loc: Loc,
    flags: libc::c_int,
) -> Result<Option<Vec<u8>>, Unsupported> {
    let len = RECORD_HEADER_LEN + loc.len as usize;
    let mut bytes = vec![0u8; len];
    let Ok(offset) = libc::off_t::try_from(loc.offset) else {
        return Ok(None);
    };
    let iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` describes `bytes`, a live buffer of `len` bytes this thread
    // owns; the descriptor stays open while `file` is borrowed.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
    if read < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        if errno == Some(libc::EOPNOTSUPP) || errno == Some(libc::EINVAL) {
            return Err(Unsupported);
        }
    }
    // Short (part of it not cached), EAGAIN (not cached), or any other error: the
    // shard reads it through its ring and reports errors as it always has.
    if usize::try_from(read).ok() != Some(len) {
        return Ok(None);
    }
    Ok(match record::parse_record(&bytes) {
        Ok(parsed)
            if parsed.payload_intact
                && parsed.header.key == *key
                && parsed.header.kind == RecordKind::Put
                && parsed.payload.len() == loc.len as usize =>
        {
            bytes.drain(..RECORD_HEADER_LEN);
            Some(bytes)
        }
        _ => None,
    })
}
