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
        self.read_many(std::slice::from_ref(key)).pop().flatten()
    }

    /// Reads `keys` on this thread through the page cache, one answer per key;
    /// `None` leaves that key's read to the shard. Records that lie close
    /// together in one segment (a batch's records, written in order) are read
    /// with one `pread`: a 1 MiB read of 4 KiB sectors is then a few system
    /// calls, not 256.
    pub fn read_many(&self, keys: &[Key]) -> Vec<Option<Cached>> {
        let mut answers: Vec<Option<Cached>> = keys.iter().map(|_| None).collect();
        if !self.open.load(Ordering::Acquire) {
            return answers;
        }
        let mut located: Vec<(usize, Loc)> = Vec::with_capacity(keys.len());
        {
            let index = self.index();
            for (slot, key) in keys.iter().enumerate() {
                match index.get(key) {
                    Some(loc) => located.push((slot, loc)),
                    None => answers[slot] = Some(Cached::Absent),
                }
            }
        }
        located.sort_by_key(|&(_, loc)| (loc.segment, loc.offset));
        let mut found: Vec<(usize, Loc, Vec<u8>)> = Vec::with_capacity(located.len());
        for run in runs(&located) {
            let Some(reader) = self
                .readers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&run[0].1.segment)
                .cloned()
            else {
                continue;
            };
            let start = run[0].1.offset;
            let Some(bytes) = read_span(&reader, start, record_end(run[run.len() - 1].1)) else {
                continue;
            };
            for &(slot, loc) in run {
                let at = (loc.offset - start) as usize;
                let record = &bytes[at..at + RECORD_HEADER_LEN + loc.len as usize];
                if let Some(payload) = payload_of(record, &keys[slot], loc) {
                    found.push((slot, loc, payload));
                }
            }
        }
        // Trusted only if the index still names the location each was read at.
        let index = self.index();
        for (slot, loc, payload) in found {
            if index.get(&keys[slot]) == Some(loc) {
                answers[slot] = Some(Cached::Found(payload));
            }
        }
        drop(index);
        let served = answers.iter().filter(|answer| answer.is_some()).count();
        self.served.fetch_add(served as u64, Ordering::Relaxed);
        answers
    }
}

/// Records closer than this (bytes between one's end and the next's header)
/// are read together, the gap with them.
const MAX_GAP: u64 = 4096;
/// The most one `pread` reads.
const MAX_SPAN: u64 = 1 << 20;

/// Where the record at `loc` ends.
fn record_end(loc: Loc) -> u64 {
    loc.offset + (RECORD_HEADER_LEN as u64) + u64::from(loc.len)
}

/// `located` (sorted by segment and offset) cut into runs read with one `pread`
/// each: one segment, in order, without overlap, small gaps, at most
/// [`MAX_SPAN`] (a record larger than that is a run of its own).
fn runs(located: &[(usize, Loc)]) -> Vec<&[(usize, Loc)]> {
    let mut runs = Vec::new();
    let mut first = 0;
    for next in 1..=located.len() {
        let cut = match (located.get(next), located.get(next - 1)) {
            (Some(&(_, loc)), Some(&(_, previous))) => {
                let end = record_end(previous);
                loc.segment != previous.segment
                    || loc.offset < end
                    || loc.offset - end > MAX_GAP
                    || record_end(loc) - located[first].1.offset > MAX_SPAN
            }
            _ => true,
        };
        if cut {
            runs.push(&located[first..next]);
            first = next;
        }
    }
    runs
}

/// The bytes `start..end` of `file`, if they read whole.
fn read_span(file: &File, start: u64, end: u64) -> Option<Vec<u8>> {
    let len = usize::try_from(end.checked_sub(start)?).ok()?;
    let offset = libc::off_t::try_from(start).ok()?;
    let mut bytes = vec![0u8; len];
    // SAFETY: `bytes` is a live buffer of `len` bytes this thread owns; the
    // descriptor stays open while `file` is borrowed.
    let read = unsafe { libc::pread(file.as_raw_fd(), bytes.as_mut_ptr().cast(), len, offset) };
    // Short or an error: the shard reads these records through its ring and
    // reports errors as it always has.
    (usize::try_from(read).ok() == Some(len)).then_some(bytes)
}

/// The payload of `record` (the bytes at `loc`), if it is an intact record of
/// `key` as the index describes it.
fn payload_of(record: &[u8], key: &Key, loc: Loc) -> Option<Vec<u8>> {
    match record::parse_record(record) {
        Ok(parsed)
            if parsed.payload_intact
                && parsed.header.key == *key
                && parsed.header.kind == RecordKind::Put
                && parsed.payload.len() == loc.len as usize =>
        {
            Some(parsed.payload.to_vec())
        }
        _ => None,
    }
}
