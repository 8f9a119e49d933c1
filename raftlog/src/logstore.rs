//! The Raft log on the sector engine's io_uring path.
//!
//! The log lives in an engine store of its own (`<data>/raft-log`, one shard,
//! so its writes reach the disk in the order they were submitted), under a
//! reserved key space:
//!
//! - entry `i`, part `p`: `(generation, LOG_INODE, Data(i · MAX_PARTS + p))`.
//!   An entry is encoded ([`crate::codec`]) and split into records of at most
//!   [`PART_BYTES`]; part 0 starts with the number of parts (u16 LE).
//! - the vote, the committed log id and the last purged log id:
//!   `(generation, STATE_INODE, Data(0 | 1 | 2))`.
//!
//! Appends are one engine batch written with `write_durable`: every append and
//! vote of a round shares one chunk and its sync (group commit: one `fdatasync`,
//! or the chunk's own `RWF_DSYNC` when nothing before it is unsynced), and
//! openraft's callback fires when it completes. Entries are readable from an in-memory
//! cache as soon as `append` returns and until they are durable (and, within a
//! byte budget, after, for replication to followers).
//!
//! The log is contiguous: appends add at the end, truncation removes a suffix,
//! purge a prefix; so opening the store finds the last entry by reading part
//! 0 of each entry after the last purged one.

use crate::codec::{self, RaftKind};
use crate::statemachine::MachineShared;
use crate::types::{Entry, LogId, SectorRaft, StorageError, Vote};
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, EngineError, WriteBatch};
use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

/// The inode whose data sectors hold the log entries.
const LOG_INODE: u64 = 0;
/// The inode whose data sectors hold the vote, committed and purged ids.
const STATE_INODE: u64 = 1;
const VOTE_SECTOR: u64 = 0;
const COMMITTED_SECTOR: u64 = 1;
const PURGED_SECTOR: u64 = 2;
/// Parts an entry may have; sector numbers are `index · MAX_PARTS + part`.
pub const MAX_PARTS: u64 = 1024;
/// Bytes of an entry's encoding per engine record.
pub const PART_BYTES: usize = 1 << 20;
/// Bytes of entries kept in memory after they are durable: enough for the
/// state machine (which reads entries to apply them) and followers a few
/// rounds behind; a server's memory budget (256 MiB under NBD load) has no
/// room for more, and a lagging follower reads the rest from the disk.
const CACHE_BYTES: usize = 16 << 20;
/// Part-0 reads in flight while opening the log: each is up to a part
/// ([`PART_BYTES`]), so this bounds what opening holds in memory (16 MiB).
const SCAN_BATCH: u64 = 16;

fn io_error(verb: ErrorVerb, subject: ErrorSubject<u64>, error: impl ToString) -> StorageError {
    StorageIOError::new(subject, verb, openraft::AnyError::error(error.to_string())).into()
}

fn read_logs_error(error: impl ToString) -> StorageError {
    io_error(ErrorVerb::Read, ErrorSubject::Logs, error)
}

fn write_logs_error(error: impl ToString) -> StorageError {
    io_error(ErrorVerb::Write, ErrorSubject::Logs, error)
}

/// An entry's records: part 0 carries the part count before its bytes.
pub fn split_entry(encoded: &[u8]) -> Result<Vec<Bytes>, String> {
    let mut framed = Vec::with_capacity(COUNT_BYTES + encoded.len());
    framed.extend_from_slice(&[0; COUNT_BYTES]);
    framed.extend_from_slice(encoded);
    split_framed(framed)
}

/// Bytes of the part count before part 0's share of the encoding.
const COUNT_BYTES: usize = 2;

/// Encodes `entry` as its records, copying each byte at most once (the
/// largest entries are whole write batches, up to 16 MiB).
fn encode_entry(entry: &Entry) -> Result<(Vec<Bytes>, u64), String> {
    let mut room = Vec::with_capacity(COUNT_BYTES + encoded_size_hint(entry));
    room.extend_from_slice(&[0; COUNT_BYTES]);
    let framed = codec::encode_after(room, RaftKind::LogEntry, entry);
    let bytes = (framed.len() - COUNT_BYTES) as u64;
    Ok((split_framed(framed)?, bytes))
}

/// Bytes an op's encoding adds to its data at most: the inode, the sector
/// kind and index (varints), the option's tag and the data's length.
const OP_ENCODING_BYTES: usize = 32;

/// Bytes a written sector id's encoding takes at most.
const WRITTEN_ENCODING_BYTES: usize = 16;

/// About how long `entry`'s encoding is (a little more for a write batch), so
/// that it is encoded into one allocation: growing the vector by doubling
/// copied a batch of random writes several times over and faulted in fresh
/// pages each time.
fn encoded_size_hint(entry: &Entry) -> usize {
    let batch = match &entry.payload {
        openraft::EntryPayload::Normal(request) => request.staged(),
        _ => None,
    };
    let Some(batch) = batch else {
        return 256;
    };
    let ops: usize = batch
        .ops
        .iter()
        .map(|op| op.data.as_ref().map_or(0, |data| data.len()) + OP_ENCODING_BYTES)
        .sum();
    let written: usize = batch
        .written
        .iter()
        .map(|(_, sectors)| (sectors.len() + 1) * WRITTEN_ENCODING_BYTES)
        .sum();
    ops + written + 256
}

/// Splits an encoding that follows [`COUNT_BYTES`] of room into records:
/// views of the one buffer, so no byte is copied.
fn split_framed(mut framed: Vec<u8>) -> Result<Vec<Bytes>, String> {
    let encoded_len = framed.len() - COUNT_BYTES;
    let count = encoded_len.div_ceil(PART_BYTES).max(1);
    let count = u16::try_from(count)
        .ok()
        .filter(|count| u64::from(*count) <= MAX_PARTS)
        .ok_or_else(|| format!("an entry of {encoded_len} bytes is too large"))?;
    framed[..COUNT_BYTES].copy_from_slice(&count.to_le_bytes());
    let mut rest = Bytes::from(framed);
    let mut parts = Vec::with_capacity(usize::from(count));
    parts.push(rest.split_to(COUNT_BYTES + PART_BYTES.min(encoded_len)));
    while !rest.is_empty() {
        parts.push(rest.split_to(PART_BYTES.min(rest.len())));
    }
    Ok(parts)
}

/// The part count of an entry and the bytes of its part 0 after the count.
pub fn parse_first_part(bytes: &[u8]) -> Result<(u16, &[u8]), String> {
    let [low, high, rest @ ..] = bytes else {
        return Err("the first part of a log entry is truncated".into());
    };
    let count = u16::from_le_bytes([*low, *high]);
    if count == 0 || u64::from(count) > MAX_PARTS {
        return Err(format!("a log entry claims {count} parts"));
    }
    Ok((count, rest))
}

/// Decodes a log entry from its joined parts.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, String> {
    codec::decode(RaftKind::LogEntry, bytes).map_err(|error| error.to_string())
}

/// What the log knows of an entry it holds without reading it.
#[derive(Clone, Copy, Debug)]
struct Held {
    /// Engine records the entry spans.
    parts: u16,
    /// Bytes of its encoding (for entries found when opening, an upper bound
    /// within a part).
    bytes: u64,
}

struct LogMemory {
    last_purged: Option<LogId>,
    last: Option<LogId>,
    /// The entries after `last_purged`, in index order.
    held: VecDeque<Held>,
    /// Bytes of all entries in `held`.
    held_bytes: u64,
    /// Entries readable from memory: every entry not yet durable or not yet
    /// applied (the state machine is about to read it: evicting it would
    /// cost a read and a decode of up to 16 MiB), and recent applied ones
    /// within [`CACHE_BYTES`].
    cache: BTreeMap<u64, (Entry, usize)>,
    cache_bytes: usize,
    /// Entries up to this index are durable in the engine.
    durable_upto: Option<u64>,
}

impl LogMemory {
    fn first_index(&self) -> u64 {
        self.last_purged.map_or(0, |id| id.index + 1)
    }

    fn parts_of(&self, index: u64) -> Option<u16> {
        let offset = index.checked_sub(self.first_index())?;
        self.held
            .get(usize::try_from(offset).ok()?)
            .map(|held| held.parts)
    }

    /// One past the last entry held.
    fn end_index(&self) -> u64 {
        self.first_index() + self.held.len() as u64
    }

    /// Forgets the entries from `index` on (truncation).
    fn drop_from(&mut self, index: u64) {
        let keep = usize::try_from(index.saturating_sub(self.first_index())).unwrap_or(usize::MAX);
        while self.held.len() > keep {
            if let Some(held) = self.held.pop_back() {
                self.held_bytes -= held.bytes;
            }
        }
    }

    /// Forgets the entries before `index` (purge).
    fn drop_before(&mut self, index: u64) {
        let count = usize::try_from(index.saturating_sub(self.first_index())).unwrap_or(usize::MAX);
        for _ in 0..count.min(self.held.len()) {
            if let Some(held) = self.held.pop_front() {
                self.held_bytes -= held.bytes;
            }
        }
    }

    /// Drops durable, applied entries beyond `keep` bytes, oldest first.
    fn evict(&mut self, applied: Option<u64>, keep: usize) {
        while self.cache_bytes > keep {
            let Some((&index, _)) = self.cache.iter().next() else {
                break;
            };
            if self.durable_upto.is_none_or(|durable| index > durable)
                || applied.is_none_or(|applied| index > applied)
            {
                break;
            }
            if let Some((_, bytes)) = self.cache.remove(&index) {
                self.cache_bytes -= bytes;
            }
        }
    }
}

struct LogInner {
    engine: Engine,
    generation: u64,
    /// The state machine's store: purging flushes it first, so nothing the
    /// purged entries did can be lost with them.
    machine: Arc<MachineShared>,
    memory: Mutex<LogMemory>,
    /// Bytes of the entries held, announced after each change (see
    /// [`EngineLogStore::held_bytes`]).
    held_bytes: tokio::sync::watch::Sender<u64>,
}

/// The Raft log store (and its reader: a clone).
#[derive(Clone)]
pub struct EngineLogStore {
    inner: Arc<LogInner>,
}

impl EngineLogStore {
    /// Opens the log kept in `engine` (created empty if new).
    pub(crate) async fn open(
        engine: Engine,
        generation: u64,
        machine: Arc<MachineShared>,
    ) -> Result<EngineLogStore, StorageError> {
        let store = EngineLogStore {
            inner: Arc::new(LogInner {
                engine,
                generation,
                machine,
                memory: Mutex::new(LogMemory {
                    last_purged: None,
                    last: None,
                    held: VecDeque::new(),
                    held_bytes: 0,
                    cache: BTreeMap::new(),
                    cache_bytes: 0,
                    durable_upto: None,
                }),
                held_bytes: tokio::sync::watch::channel(0).0,
            }),
        };
        let last_purged: Option<LogId> = store
            .read_state(PURGED_SECTOR, RaftKind::LogId)
            .await
            .map_err(read_logs_error)?;
        let mut first = last_purged.map_or(0, |id| id.index + 1);
        let mut last_purged = last_purged;
        let applied = store.inner.machine.applied().last_applied;
        let mut held = VecDeque::new();
        let mut next = first;
        // The first damaged entry among those the state machine has applied.
        let mut damaged: Option<(u64, String)> = None;
        let mut note_damage = |index: u64, reason: String| {
            if applied.is_some_and(|applied| index <= applied.index) {
                damaged.get_or_insert((index, reason));
                Ok(())
            } else {
                Err(format!(
                    "raft log entry {index}, not yet applied here, is damaged ({reason}): this \
                     member's log cannot be trusted; move its data directory's sectors aside \
                     and join the cluster again"
                ))
            }
        };
        'scan: loop {
            let reads: Vec<_> = (next..next + SCAN_BATCH)
                .map(|index| store.inner.engine.read(store.part_id(index, 0)))
                .collect();
            for read in reads {
                let (parts, bytes) = match read.await {
                    Ok(None) => break 'scan,
                    Ok(Some(bytes)) => match parse_first_part(&bytes) {
                        Ok((count, rest)) => (
                            count,
                            (u64::from(count) - 1) * PART_BYTES as u64 + rest.len() as u64,
                        ),
                        Err(reason) => {
                            note_damage(next, reason).map_err(read_logs_error)?;
                            (1, 0)
                        }
                    },
                    Err(error) => {
                        note_damage(next, error.to_string()).map_err(read_logs_error)?;
                        (1, 0)
                    }
                };
                held.push_back(Held { parts, bytes });
                next += 1;
            }
        }
        // The other parts of every entry are read too, so that damage is
        // found now rather than when a follower needs the entry.
        for (offset, entry) in held.iter().enumerate() {
            let index = first + offset as u64;
            for part in 1..u64::from(entry.parts) {
                match store.inner.engine.read(store.part_id(index, part)).await {
                    Ok(Some(_)) => {}
                    Ok(None) => note_damage(index, format!("part {part} is missing"))
                        .map_err(read_logs_error)?,
                    Err(error) => note_damage(index, error.to_string()).map_err(read_logs_error)?,
                }
            }
        }
        if let (Some((index, reason)), Some(applied)) = (damaged, applied) {
            // Everything up to the applied entry is in the state machine: the
            // log needs none of it here (followers that do get a snapshot),
            // so it is purged, damaged entries with it, as a purge would.
            tracing::warn!(
                "raft log entry {index} is damaged ({reason}); it was applied: purging the log \
                 through entry {}",
                applied.index
            );
            store
                .inner
                .machine
                .store
                .engine()
                .flush()
                .await
                .map_err(write_logs_error)?;
            let upto = (applied.index + 1).max(first);
            let mut batch = WriteBatch::new();
            for index in first..upto.min(next) {
                let parts = held.pop_front().map_or(1, |entry: Held| entry.parts);
                for part in 0..u64::from(parts) {
                    batch.delete(store.part_id(index, part));
                }
            }
            batch.put(
                store.state_id(PURGED_SECTOR),
                codec::encode(RaftKind::LogId, &applied),
            );
            store
                .inner
                .engine
                .write_durable(batch)
                .await
                .map_err(write_logs_error)?;
            last_purged = Some(applied);
            first = upto;
            next = next.max(upto);
        }
        let last = if next > first {
            let parts = held.back().map(|held: &Held| held.parts);
            let entry = store.read_entry(next - 1, parts).await?;
            Some(entry.log_id)
        } else {
            last_purged
        };
        {
            let mut memory = store.lock();
            memory.last_purged = last_purged;
            memory.last = last;
            memory.held_bytes = held.iter().map(|held| held.bytes).sum();
            memory.held = held;
            memory.durable_upto = next.checked_sub(1);
        }
        store.announce_held();
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogMemory> {
        crate::store::lock(&self.inner.memory)
    }

    /// The bytes of the entries the log holds (not yet purged), updated as
    /// entries are appended, truncated and purged: what decides when the
    /// member snapshots and purges beyond openraft's count-based policy.
    pub(crate) fn held_bytes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.held_bytes.subscribe()
    }

    /// The highest index whose purge leaves at least `keep` bytes of
    /// entries after it, if any.
    pub(crate) fn purge_index_keeping(&self, keep: u64) -> Option<u64> {
        let memory = self.lock();
        let mut kept = 0;
        let mut index = memory.end_index();
        for held in memory.held.iter().rev() {
            if kept >= keep {
                break;
            }
            kept += held.bytes;
            index -= 1;
        }
        index
            .checked_sub(1)
            .filter(|index| *index >= memory.first_index())
    }

    fn announce_held(&self) {
        let bytes = self.lock().held_bytes;
        self.inner.held_bytes.send_replace(bytes);
    }

    fn part_id(&self, index: u64, part: u64) -> SectorId {
        SectorId {
            generation: self.inner.generation,
            inode: LOG_INODE,
            sector: SectorKind::Data(index.saturating_mul(MAX_PARTS) + part),
        }
    }

    fn state_id(&self, sector: u64) -> SectorId {
        SectorId {
            generation: self.inner.generation,
            inode: STATE_INODE,
            sector: SectorKind::Data(sector),
        }
    }

    async fn read_state<T: serde::de::DeserializeOwned>(
        &self,
        sector: u64,
        kind: RaftKind,
    ) -> Result<Option<T>, String> {
        match self
            .inner
            .engine
            .read(self.state_id(sector))
            .await
            .map_err(|error| error.to_string())?
        {
            Some(bytes) => codec::decode(kind, &bytes)
                .map(Some)
                .map_err(|error| error.to_string()),
            None => Ok(None),
        }
    }

    /// Reads entry `index` from the engine; `parts` is its part count if known.
    async fn read_entry(&self, index: u64, parts: Option<u16>) -> Result<Entry, StorageError> {
        let error = |reason: String| {
            io_error(
                ErrorVerb::Read,
                ErrorSubject::LogIndex(index),
                format!("log entry {index}: {reason}"),
            )
        };
        let reads: Vec<_> = (0..u64::from(parts.unwrap_or(1)))
            .map(|part| self.inner.engine.read(self.part_id(index, part)))
            .collect();
        let mut bytes = Vec::new();
        let mut count = 0;
        for (part, read) in reads.into_iter().enumerate() {
            let record = read
                .await
                .map_err(|e| error(e.to_string()))?
                .ok_or_else(|| error(format!("part {part} is missing")))?;
            if part == 0 {
                let (parts, rest) = parse_first_part(&record).map_err(error)?;
                count = parts;
                bytes.extend_from_slice(rest);
            } else {
                bytes.extend_from_slice(&record);
            }
        }
        for part in u64::from(parts.unwrap_or(1))..u64::from(count) {
            let record = self
                .inner
                .engine
                .read(self.part_id(index, part))
                .await
                .map_err(|e| error(e.to_string()))?
                .ok_or_else(|| error(format!("part {part} is missing")))?;
            bytes.extend_from_slice(&record);
        }
        let entry = decode_entry(&bytes).map_err(error)?;
        if entry.log_id.index != index {
            return Err(error(format!(
                "the record holds entry {} instead",
                entry.log_id.index
            )));
        }
        Ok(entry)
    }

    /// Deletes the records of entries `range` (whose part counts are known).
    fn delete_entries(
        &self,
        memory: &LogMemory,
        range: std::ops::Range<u64>,
        batch: &mut WriteBatch,
    ) {
        for index in range {
            let parts = memory.parts_of(index).unwrap_or(1);
            for part in 0..u64::from(parts) {
                batch.delete(self.part_id(index, part));
            }
        }
    }
}

impl RaftLogReader<SectorRaft> for EngineLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (first, last, wanted) = {
            let memory = self.lock();
            let first = memory.first_index();
            let Some(last) = memory.last.map(|id| id.index) else {
                return Ok(Vec::new());
            };
            let start = match range.start_bound() {
                Bound::Included(start) => *start,
                Bound::Excluded(start) => start.saturating_add(1),
                Bound::Unbounded => first,
            }
            .max(first);
            let end = match range.end_bound() {
                Bound::Included(end) => *end,
                Bound::Excluded(end) => match end.checked_sub(1) {
                    Some(end) => end,
                    None => return Ok(Vec::new()),
                },
                Bound::Unbounded => last,
            }
            .min(last);
            if start > end {
                return Ok(Vec::new());
            }
            // Entries in memory now, and the part counts of the others.
            let wanted: Vec<(u64, Result<Entry, Option<u16>>)> = (start..=end)
                .map(|index| match memory.cache.get(&index) {
                    Some((entry, _)) => (index, Ok(entry.clone())),
                    None => (index, Err(memory.parts_of(index))),
                })
                .collect();
            (start, end, wanted)
        };
        let _ = (first, last);
        let mut entries = Vec::with_capacity(wanted.len());
        for (index, found) in wanted {
            match found {
                Ok(entry) => entries.push(entry),
                Err(parts) => entries.push(self.read_entry(index, parts).await?),
            }
        }
        Ok(entries)
    }
}

impl RaftLogStorage<SectorRaft> for EngineLogStore {
    type LogReader = EngineLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<SectorRaft>, StorageError> {
        let memory = self.lock();
        Ok(LogState {
            last_purged_log_id: memory.last_purged,
            last_log_id: memory.last.or(memory.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        batch.put(
            self.state_id(VOTE_SECTOR),
            codec::encode(RaftKind::Vote, vote),
        );
        self.inner
            .engine
            .write_durable(batch)
            .await
            .map_err(|error| io_error(ErrorVerb::Write, ErrorSubject::Vote, error))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_state(VOTE_SECTOR, RaftKind::Vote)
            .await
            .map_err(|error| io_error(ErrorVerb::Read, ErrorSubject::Vote, error))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        *crate::store::lock(&self.inner.machine.committed) = committed.map(|id| id.index);
        let mut batch = WriteBatch::new();
        batch.put(
            self.state_id(COMMITTED_SECTOR),
            codec::encode(RaftKind::LogId, &committed),
        );
        // Not durable on its own: the next append or vote's sync carries it, and
        // a committed id that is lost only makes a restart re-apply less.
        self.inner
            .engine
            .write(batch)
            .await
            .map_err(write_logs_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self
            .read_state(COMMITTED_SECTOR, RaftKind::LogId)
            .await
            .map_err(read_logs_error)?;
        Ok(committed.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<SectorRaft>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::new();
        let mut appended = Vec::new();
        for entry in entries {
            let (parts, bytes) = encode_entry(&entry).map_err(write_logs_error)?;
            let index = entry.log_id.index;
            let count = parts.len() as u16;
            for (part, record) in parts.into_iter().enumerate() {
                batch.put(self.part_id(index, part as u64), record);
            }
            appended.push((entry, count, bytes));
        }
        let Some(last_index) = appended.last().map(|(entry, _, _)| entry.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        {
            let mut memory = self.lock();
            for (entry, count, bytes) in appended {
                let index = entry.log_id.index;
                let expected = memory.end_index();
                if index != expected {
                    return Err(write_logs_error(format!(
                        "entry {index} would leave a hole after {expected}"
                    )));
                }
                memory.held.push_back(Held {
                    parts: count,
                    bytes,
                });
                memory.held_bytes += bytes;
                memory.last = Some(entry.log_id);
                let bytes = bytes as usize;
                memory.cache_bytes += bytes;
                if let Some((_, old)) = memory.cache.insert(index, (entry, bytes)) {
                    memory.cache_bytes -= old;
                }
            }
        }
        self.announce_held();
        let pending = self.inner.engine.write_durable(batch);
        let store = self.clone();
        tokio::spawn(async move {
            let result = pending.await;
            if result.is_ok() {
                let mut memory = store.lock();
                memory.durable_upto = Some(
                    memory
                        .durable_upto
                        .map_or(last_index, |durable| durable.max(last_index)),
                );
                // A member alone has no follower to send entries to: once
                // applied they are only memory (up to 16 MiB under NBD load).
                let machine = &store.inner.machine;
                let keep = if machine.alone() { 0 } else { CACHE_BYTES };
                memory.evict(machine.applied_index(), keep);
            }
            callback.log_io_completed(result.map_err(std::io::Error::other));
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::new();
        {
            let mut memory = self.lock();
            let first = memory.first_index();
            let end = memory.end_index();
            let from = log_id.index.max(first);
            self.delete_entries(&memory, from..end, &mut batch);
            memory.drop_from(from);
            let removed: Vec<u64> = memory
                .cache
                .range(from..)
                .map(|(index, _)| *index)
                .collect();
            for index in removed {
                if let Some((_, bytes)) = memory.cache.remove(&index) {
                    memory.cache_bytes -= bytes;
                }
            }
            memory.durable_upto = memory
                .durable_upto
                .map(|durable| durable.min(from.saturating_sub(1)));
            memory.last = if from > first {
                None
            } else {
                memory.last_purged
            };
        }
        let last_index = log_id.index.checked_sub(1);
        if self.lock().last.is_none()
            && let Some(index) = last_index
        {
            let cached = self.lock().cache.get(&index).map(|(entry, _)| entry.log_id);
            let id = match cached {
                Some(id) => id,
                None => {
                    let parts = self.lock().parts_of(index);
                    self.read_entry(index, parts).await?.log_id
                }
            };
            self.lock().last = Some(id);
        }
        self.announce_held();
        self.inner
            .engine
            .write_durable(batch)
            .await
            .map_err(write_logs_error)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // What the purged entries did must survive them.
        self.inner
            .machine
            .store
            .engine()
            .flush()
            .await
            .map_err(|error: EngineError| {
                io_error(ErrorVerb::Write, ErrorSubject::StateMachine, error)
            })?;
        let mut batch = WriteBatch::new();
        {
            let mut memory = self.lock();
            let first = memory.first_index();
            let end = memory.end_index();
            let upto = (log_id.index + 1).min(end).max(first);
            self.delete_entries(&memory, first..upto, &mut batch);
            memory.drop_before(upto);
            let removed: Vec<u64> = memory
                .cache
                .range(..=log_id.index)
                .map(|(index, _)| *index)
                .collect();
            for index in removed {
                if let Some((_, bytes)) = memory.cache.remove(&index) {
                    memory.cache_bytes -= bytes;
                }
            }
            memory.last_purged = Some(log_id);
            if memory.last.is_none_or(|last| last.index < log_id.index) {
                memory.last = Some(log_id);
            }
        }
        self.announce_held();
        batch.put(
            self.state_id(PURGED_SECTOR),
            codec::encode(RaftKind::LogId, &log_id),
        );
        self.inner
            .engine
            .write(batch)
            .await
            .map_err(write_logs_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_split_into_parts_and_back() {
        let bytes: Vec<u8> = (0..(PART_BYTES * 2 + 10)).map(|i| i as u8).collect();
        let parts = split_entry(&bytes).unwrap();
        assert_eq!(parts.len(), 3);
        let (count, first) = parse_first_part(&parts[0]).unwrap();
        assert_eq!(count, 3);
        let mut joined = first.to_vec();
        joined.extend_from_slice(&parts[1]);
        joined.extend_from_slice(&parts[2]);
        assert_eq!(joined, bytes);
        assert!(parse_first_part(&[0]).is_err());
        assert!(parse_first_part(&[0, 0]).is_err());
        assert!(decode_entry(&[1, 1, 0xff]).is_err());
    }

    #[test]
    fn a_write_batch_is_encoded_into_the_room_its_hint_makes() {
        use crate::store::{SectorOp, StagedBatch};
        use crate::types::{Origin, RaftRequest};
        let mut batch = StagedBatch::default();
        for index in 0..300u64 {
            batch.ops.push(SectorOp {
                inode: u64::MAX - index,
                sector: SectorKind::Data(u64::MAX / (index + 1)),
                data: (index % 7 != 0).then(|| bytes::Bytes::from(vec![index as u8; 4124])),
            });
        }
        batch.written.push((
            u64::MAX,
            (0..300)
                .map(|index| SectorKind::Merkle(u64::MAX - index))
                .collect(),
        ));
        let request = RaftRequest::Write {
            origin: Origin {
                node: u64::MAX,
                boot: u64::MAX,
                seq: u64::MAX,
            },
            batch,
        };
        let entry = Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(u64::MAX, 1), 1 << 40),
            payload: openraft::EntryPayload::Normal(request),
        };
        let encoded = codec::encode(RaftKind::LogEntry, &entry);
        assert!(encoded.len() <= encoded_size_hint(&entry));
        let (parts, bytes) = encode_entry(&entry).unwrap();
        assert_eq!(bytes as usize, encoded.len());
        let joined: Vec<u8> = parts
            .iter()
            .enumerate()
            .flat_map(|(index, part)| {
                if index == 0 {
                    &part[COUNT_BYTES..]
                } else {
                    &part[..]
                }
                .to_vec()
            })
            .collect();
        assert_eq!(decode_entry(&joined).unwrap(), entry);
    }
}
