//! Buffered reads served on the caller's thread.
//!
//! A read normally travels to its shard's thread and back: two thread
//! hand-overs, which on a small machine cost more than the read itself (a 4 KiB
//! FUSE read of a cached sector spent most of its 48 µs switching threads, and
//! an uncached one waited on the disk plus both switches). With buffered reads
//! on, each shard shares a [`ShardView`]: its index, behind a lock the shard
//! takes only to change it, and the buffered read descriptor of each of its
//! segments. A caller looks the key up, reads the record with `pread` through
//! the page cache (waiting for the disk if it must, as a read of a gocryptfs or
//! ext4 file does), checks it as the shard would, then checks the index still
//! names the same location.
//!
//! Why that is enough: segment numbers are never reused, and the index points at
//! a location only once its chunk is written and never points back at it after
//! moving on. So if the index named the location before and after the read, the
//! bytes read were that live record throughout, even if the segment's file was
//! meanwhile renamed or reused. Anything else (no descriptor for the segment
//! yet, the index moved, a short read or an error, a record that does not check)
//! is left to the shard, which answers exactly as it did before.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::index::{Index, Loc};
use crate::record::{self, Key, RECORD_HEADER_LEN, RecordKind};

/// What a shard shares with callers that read on their own thread.
pub(crate) struct ShardView {
    index: RwLock<Index>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    /// False once the shard stopped (reads then fail through the shard's
    /// channel).
    open: AtomicBool,
    /// Reads this view served.
    served: AtomicU64,
}

/// What a read on the caller's thread found.
pub(crate) enum Cached {
    /// The index has no entry: the sector was never written or was deleted.
    Absent,
    /// The record's payload.
    Found(Vec<u8>),
}

impl ShardView {
    /// A view over `index`, which the shard then reaches through it.
    pub fn new(index: Index) -> ShardView {
        ShardView {
            index: RwLock::new(index),
            readers: RwLock::new(HashMap::new()),
            open: AtomicBool::new(true),
            served: AtomicU64::new(0),
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

    /// Reads `key` on this thread through the page cache; `None` leaves the
    /// read to the shard.
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
        let payload = read_record(&reader, key, loc)?;
        if self.index().get(key) != Some(loc) {
            return None;
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(Cached::Found(payload))
    }
}

/// The payload of the record at `loc`, if it reads whole and is an intact
/// record of `key`.
fn read_record(file: &File, key: &Key, loc: Loc) -> Option<Vec<u8>> {
    let len = RECORD_HEADER_LEN + loc.len as usize;
    let mut bytes = vec![0u8; len];
    let offset = libc::off_t::try_from(loc.offset).ok()?;
    // SAFETY: `bytes` is a live buffer of `len` bytes this thread owns; the
    // descriptor stays open while `file` is borrowed.
    let read = unsafe { libc::pread(file.as_raw_fd(), bytes.as_mut_ptr().cast(), len, offset) };
    // Short or an error: the shard reads it through its ring and reports errors
    // as it always has.
    if usize::try_from(read).ok() != Some(len) {
        return None;
    }
    match record::parse_record(&bytes) {
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
    }
}
