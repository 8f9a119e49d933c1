//! One shard: a thread that owns a ring, a set of segments and an index.
//!
//! The loop takes every request waiting on its channel, packs all the writes of
//! the round into one chunk (a second chunk only when the first is full), submits
//! the chunk writes, reads and at most one round of `fdatasync` to the ring, and
//! waits for completions. Requests that arrive while I/O is in flight wait in the
//! channel and form the next round: that is the group commit.
//!
//! A write becomes visible (enters the index) when its chunk is written; for a
//! batch that spans shards, only when every shard has written its part
//! ([`BatchTracker`]). A write is reported durable only after an `fdatasync`
//! that started after its chunk was written, or once its chunk, written with
//! `RWF_DSYNC` after everything before it was synced, completes ([`dsync`]).

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use blocktree_core::sector::SectorId;
use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::{opcode, types};

mod cached;
mod compaction;
mod dsync;
mod layout;
mod wake;

pub(crate) use cached::{Cached, ShardView};
pub(crate) use wake::{ShardHandle, Wake};

use crate::checkpoint::{self, CheckpointHead};
use crate::engine::{Done, EngineConfig};
use crate::error::EngineError;
use crate::index::{Loc, MAX_SEGMENT};
use crate::record::{
    self, BLOCK, CHUNK_HEADER_LEN, ChunkBuilder, Key, RECORD_HEADER_LEN, RecordHeader, RecordKind,
    align_up, record_footprint,
};
use crate::recovery::ShardState;
use crate::segment::{self, Segment};
use crate::uring::{AlignedBuf, Ring};

/// Ring slots per shard.
const RING_ENTRIES: u32 = 256;
/// Registered chunk buffers per shard: how many group-commit chunks can be in
/// flight at once.
const CHUNK_BUFFERS: usize = 8;
/// The size of a registered read buffer ([`EngineConfig::read_buffers`] of
/// them per shard).
const READ_SLOT: usize = 128 << 10;
/// The user data of the wake-up eventfd read; never an op slot.
const WAKE_TOKEN: u64 = u64::MAX;
/// Requests taken from the channel per round, so completions are never starved.
const MAX_DRAIN: usize = 4096;

type ReadReply = oneshot::Sender<Result<Option<Vec<u8>>, EngineError>>;
type CheckpointReply = oneshot::Sender<Result<(), EngineError>>;

/// A message to a shard.
pub(crate) enum Request {
    Read {
        key: Key,
        id: SectorId,
        reply: ReadReply,
    },
    Write(BatchPart),
    /// Every shard of a multi-shard batch has written its part (or one failed).
    Resolve {
        batch: u64,
        commit: bool,
    },
    Flush {
        done: Done,
    },
    Stats {
        reply: oneshot::Sender<Result<ShardStats, EngineError>>,
    },
    Shutdown {
        done: Done,
    },
    /// The checkpoint of `epoch` is in force: segments before it may be compacted.
    Committed {
        epoch: u64,
    },
    /// Write this shard's checkpoint of `epoch` once no batch is in flight here.
    Checkpoint {
        epoch: u64,
        /// Stop writing into the active segment first (at shutdown).
        seal: bool,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

/// This shard's records of a batch.
pub(crate) struct BatchPart {
    pub batch: u64,
    pub shards: u32,
    pub records: Vec<(Key, Option<Bytes>)>,
    pub durable: bool,
    pub tracker: Option<Arc<BatchTracker>>,
    pub done: Done,
}

/// Counts the parts of a multi-shard batch and tells every shard the outcome.
pub(crate) struct BatchTracker {
    batch: u64,
    shards: u32,
    remaining: AtomicU32,
    failed: AtomicBool,
    peers: Vec<ShardHandle>,
}

impl BatchTracker {
    pub fn new(batch: u64, shards: u32, peers: Vec<ShardHandle>) -> BatchTracker {
        BatchTracker {
            batch,
            shards,
            remaining: AtomicU32::new(shards.count_ones()),
            failed: AtomicBool::new(false),
            peers,
        }
    }

    /// Called once per part, when it is written (and synced, if durable) or failed.
    pub fn part_written(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let commit = !self.failed.load(Ordering::Acquire);
            for (shard, peer) in self.peers.iter().enumerate() {
                if self.shards & (1 << shard) != 0 {
                    let _ = peer.send(Request::Resolve {
                        batch: self.batch,
                        commit,
                    });
                }
            }
        }
    }
}

/// One shard's share of [`crate::EngineStats`].
pub(crate) struct ShardStats {
    pub live_sectors: u64,
    pub live_bytes: u64,
    pub disk_bytes: u64,
    pub segments: u64,
    pub index_bytes: u64,
    pub moved_bytes: u64,
    pub sync_rounds: u64,
    pub dsync_chunks: u64,
}

enum Buffer {
    Fixed(u16),
    Owned(AlignedBuf),
}

struct Building {
    buffer: Buffer,
    used: usize,
    records: u32,
    members: Vec<(usize, usize)>,
}

struct PartRecord {
    key: Key,
    kind: RecordKind,
    len: u32,
    loc: Option<Loc>,
    /// For a record moved by compaction: the location it replaces. It applies
    /// only if the key still points there.
    relocates: Option<Loc>,
}

struct PartState {
    batch: u64,
    shards: u32,
    durable: bool,
    tracker: Option<Arc<BatchTracker>>,
    done: Option<Done>,
    records: Vec<PartRecord>,
    chunks_left: usize,
    error: Option<EngineError>,
    /// Every chunk holding its records was written with `RWF_DSYNC`.
    dsync_only: bool,
}

enum Op {
    WriteChunk {
        buffer: Buffer,
        segment: u32,
        position: u64,
        sequence: u64,
        len: usize,
        members: Vec<(usize, usize)>,
        /// Written with `RWF_DSYNC`: durable once it completes.
        dsync: bool,
    },
    Read {
        key: Key,
        id: SectorId,
        loc: Loc,
        start: u64,
        len: usize,
        buffer: Buffer,
        reply: ReadReply,
    },
    Fsync,
    /// A write of zeros laying out a spare segment (layout.rs).
    Zero {
        len: u32,
    },
}

struct SyncRound {
    waiters: Vec<Done>,
    remaining: usize,
    covers: u64,
    error: Option<EngineError>,
}

struct Shard {
    config: EngineConfig,
    dir: PathBuf,
    ring: Ring,
    /// The index, shared with readers on other threads (cached.rs).
    view: Arc<ShardView>,
    segments: BTreeMap<u32, Segment>,
    active: Option<u32>,
    write_position: u64,
    next_segment: u32,
    next_sequence: u64,
    synced_through: u64,
    writes_in_flight: BTreeSet<u64>,
    free_chunks: Vec<u16>,
    free_reads: Vec<u16>,
    building: Option<Building>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    in_flight: usize,
    parts: Vec<Option<PartState>>,
    free_parts: Vec<usize>,
    awaiting_resolve: HashMap<u64, usize>,
    recent_deletes: HashMap<Key, Loc>,
    queued_writes: VecDeque<BatchPart>,
    queued_reads: VecDeque<(Key, SectorId, ReadReply)>,
    sync_waiters: Vec<Done>,
    sync: Option<SyncRound>,
    dirty: BTreeSet<u32>,
    dsync: dsync::DsyncLedger,
    /// Rounds of `fdatasync` started (for [`ShardStats`]).
    sync_rounds: u64,
    shutdown: Option<Done>,
    /// A checkpoint asked for: (epoch, seal first, where to report).
    checkpoint: Option<(u64, bool, CheckpointReply)>,
    /// Keys with a write in the log that is not applied yet (compaction leaves
    /// them alone, so log order and apply order agree for every key).
    pending_keys: HashMap<Key, u32>,
    /// (epoch, replay segment) of the last checkpoint this shard wrote.
    last_snapshot: Option<(u64, u32)>,
    compaction: compaction::Compaction,
    shard_id: usize,
    /// Payload bytes of the live sectors.
    live_payload: u64,
    wake: Arc<Wake>,
    /// Whether the eventfd read is queued in the ring.
    wake_armed: bool,
    wake_buffer: Box<[u8; 8]>,
    log_id: u64,
    /// Retired or laid-out segment files to write new segments into (see
    /// `Segment::reuse`).
    spares: Vec<(PathBuf, u64)>,
    layout: layout::Layout,
}

/// The shard thread's body.
pub(crate) fn run(
    id: usize,
    config: EngineConfig,
    state: ShardState,
    requests: Receiver<Request>,
    wake: Arc<Wake>,
    view: Arc<ShardView>,
) {
    // Whichever way the shard ends, readers on other threads stop reading its
    // segments and send their reads here, to be refused.
    struct CloseView(Arc<ShardView>);
    impl Drop for CloseView {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _close = CloseView(Arc::clone(&view));
    let mut shard = match Shard::new(id, config, state, wake, view) {
        Ok(shard) => shard,
        Err(error) => {
            tracing::error!(shard = id, %error, "sector engine shard failed to start");
            for request in requests {
                refuse(request, || {
                    EngineError::Layout(format!("shard {id} failed to start: {error}"))
                });
            }
            return;
        }
    };
    if let Err(error) = shard.serve(&requests) {
        tracing::error!(shard = id, %error, "sector engine shard stopped");
        for request in requests.try_iter() {
            refuse(request, || EngineError::Closed);
        }
    }
}

/// Puts `value` in a free slot of `slots` (reusing one from `free` if any) and
/// returns its index: in-flight ops and parts are found by index from a ring
/// completion's user data.
fn slab_insert<T>(slots: &mut Vec<Option<T>>, free: &mut Vec<usize>, value: T) -> usize {
    match free.pop() {
        Some(slot) => {
            slots[slot] = Some(value);
            slot
        }
        None => {
            slots.push(Some(value));
            slots.len() - 1
        }
    }
}

fn refuse(request: Request, error: impl Fn() -> EngineError) {
    match request {
        Request::Read { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Write(part) => {
            if let Some(tracker) = &part.tracker {
                tracker.part_written(false);
            }
            (part.done)(Err(error()));
        }
        Request::Flush { done } | Request::Shutdown { done } => done(Err(error())),
        Request::Stats { reply } => {
            let _ = reply.send(Err(error()));
        }
        Request::Checkpoint { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        Request::Resolve { .. } | Request::Committed { .. } => {}
    }
}

impl Shard {
    fn new(
        id: usize,
        config: EngineConfig,
        state: ShardState,
        wake: Arc<Wake>,
        view: Arc<ShardView>,
    ) -> Result<Shard, EngineError> {
        let dir = segment::shard_dir(&config.dir, id);
        let mut buffers: Vec<AlignedBuf> = (0..CHUNK_BUFFERS)
            .map(|_| AlignedBuf::new(config.chunk_bytes))
            .collect();
        buffers.extend((0..config.read_buffers).map(|_| AlignedBuf::new(READ_SLOT)));
        let ring = Ring::new(RING_ENTRIES, buffers)
            .map_err(EngineError::io("setting up io_uring for", &dir))?;
        let live_payload = view.index().iter().map(|(_, loc)| loc.len as u64).sum();
        Ok(Shard {
            dir,
            ring,
            view,
            segments: state.segments,
            active: None,
            write_position: 0,
            next_segment: state.next_segment,
            next_sequence: state.next_sequence.max(1),
            synced_through: state.next_sequence.saturating_sub(1),
            writes_in_flight: BTreeSet::new(),
            free_chunks: (0..CHUNK_BUFFERS as u16).rev().collect(),
            free_reads: (CHUNK_BUFFERS as u16..(CHUNK_BUFFERS + config.read_buffers) as u16)
                .rev()
                .collect(),
            building: None,
            ops: Vec::new(),
            free_ops: Vec::new(),
            in_flight: 0,
            parts: Vec::new(),
            free_parts: Vec::new(),
            awaiting_resolve: HashMap::new(),
            recent_deletes: HashMap::new(),
            queued_writes: VecDeque::new(),
            queued_reads: VecDeque::new(),
            sync_waiters: Vec::new(),
            sync: None,
            dirty: BTreeSet::new(),
            dsync: dsync::DsyncLedger::default(),
            sync_rounds: 0,
            shutdown: None,
            checkpoint: None,
            pending_keys: HashMap::new(),
            last_snapshot: None,
            compaction: compaction::Compaction::default(),
            shard_id: id,
            live_payload,
            wake,
            wake_armed: false,
            wake_buffer: Box::new([0u8; 8]),
            log_id: state.log_id,
            spares: state.spares,
            layout: layout::Layout::default(),
            config,
        })
    }

    fn idle(&self) -> bool {
        self.in_flight == 0
            && self.building.is_none()
            && self.queued_writes.is_empty()
            && self.queued_reads.is_empty()
            && self.sync_waiters.is_empty()
    }

    fn serve(&mut self, requests: &Receiver<Request>) -> Result<(), EngineError> {
        loop {
            self.try_checkpoint();
            if self.idle() {
                if let Some(done) = self.shutdown.take() {
                    done(Ok(()));
                    return Ok(());
                }
                if self.compaction_pending() || self.layout_pending() {
                    match requests.recv_timeout(compaction::IDLE_TICK) {
                        Ok(request) => self.handle(request),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            self.compaction.credit_idle();
                            self.layout.credit_idle();
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                } else {
                    match requests.recv() {
                        Ok(request) => self.handle(request),
                        Err(_) => return Ok(()),
                    }
                }
            }
            for _ in 0..MAX_DRAIN {
                match requests.try_recv() {
                    Ok(request) => self.handle(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.idle() {
                            return Ok(());
                        }
                        break;
                    }
                }
            }
            self.drain_queues();
            self.compact_step();
            self.finish_chunk();
            self.layout_step();
            self.start_sync();
            if self.in_flight > 0 {
                self.arm_wake();
                self.wake.about_to_sleep();
                let want = usize::from(requests.is_empty());
                match self.ring.ring.submit_and_wait(want) {
                    Ok(_) => {}
                    Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                    Err(error) => {
                        return Err(EngineError::io(
                            "submitting to io_uring in",
                            self.dir.clone(),
                        )(error));
                    }
                }
                self.wake.awake();
                self.reap();
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Read { key, id, reply } => self.queued_reads.push_back((key, id, reply)),
            Request::Write(part) => self.queued_writes.push_back(part),
            Request::Resolve { batch, commit } => self.resolve(batch, commit),
            Request::Flush { done } => self.sync_waiters.push(done),
            Request::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Request::Checkpoint { epoch, seal, reply } => {
                self.checkpoint = Some((epoch, seal, reply))
            }
            Request::Committed { epoch } => {
                if let Some((snapshot_epoch, replay_segment)) = self.last_snapshot
                    && snapshot_epoch == epoch
                {
                    self.compaction.compactable_below = replay_segment;
                }
            }
            Request::Shutdown { done } => {
                // A clean stop leaves everything durable.
                self.sync_waiters.push(Box::new(|_| {}));
                self.shutdown = Some(done);
            }
        }
    }

    /// Takes the checkpoint asked for once no write of this shard is in flight
    /// or waiting for other shards; the engine holds new batches back meanwhile.
    /// The log tail after the checkpoint starts where the next chunk will be
    /// written. The file is written by a helper thread while the shard goes on
    /// serving reads.
    fn try_checkpoint(&mut self) {
        let quiet = self.queued_writes.is_empty()
            && self.building.is_none()
            && self.writes_in_flight.is_empty()
            && self.awaiting_resolve.is_empty();
        if !quiet {
            return;
        }
        let Some((epoch, seal, reply)) = self.checkpoint.take() else {
            return;
        };
        if seal {
            // Stopping: give back the active segment's unwritten space.
            self.seal_active();
        }
        let (replay_segment, replay_offset) = match self.active {
            Some(active) => (active, self.write_position),
            None => (self.next_segment, 0),
        };
        self.last_snapshot = Some((epoch, replay_segment));
        let head = CheckpointHead {
            epoch,
            replay_segment,
            replay_offset,
            next_sequence: self.next_sequence,
            synced_through: self.synced_through,
            segments: self
                .segments
                .iter()
                .map(|(id, s)| (*id, s.live_bytes))
                .collect(),
        };
        // Encoded here, from the index in place: a copy of the index for the
        // writer thread to encode was, with the encoding, the largest transient
        // allocation of a busy store (heaptrack of an NBD random write: 14 MiB
        // at the process's peak).
        let encoded = head.encode_with(&self.view.index());
        let path = checkpoint::shard_path(&self.dir, epoch);
        let writer = std::thread::Builder::new()
            .name("btengine-checkpoint".into())
            .spawn(move || {
                let result = crate::durable::write_durably(&path, &encoded);
                let _ = reply.send(result);
            });
        if let Err(error) = writer {
            tracing::error!(%error, "could not start the checkpoint writer");
        }
    }

    fn stats(&self) -> ShardStats {
        ShardStats {
            live_sectors: self.view.index().len() as u64,
            live_bytes: self.live_payload,
            disk_bytes: self.segments.values().map(|s| s.size).sum(),
            segments: self.segments.len() as u64,
            index_bytes: self.view.index().heap_bytes() as u64,
            moved_bytes: self.compaction.moved_bytes,
            sync_rounds: self.sync_rounds,
            dsync_chunks: self.dsync.chunks,
        }
    }

    fn op_slot(&mut self, op: Op) -> usize {
        self.in_flight += 1;
        slab_insert(&mut self.ops, &mut self.free_ops, op)
    }

    fn ring_full(&self) -> bool {
        self.in_flight + 2 >= self.ring.capacity
    }

    fn drain_queues(&mut self) {
        while !self.ring_full() {
            let Some((key, id, reply)) = self.queued_reads.pop_front() else {
                break;
            };
            self.start_read(key, id, reply);
        }
        while let Some(part) = self.queued_writes.pop_front() {
            let bytes: usize = part
                .records
                .iter()
                .map(|(_, data)| data.as_ref().map_or(0, Bytes::len))
                .sum();
            self.compaction.credit_user_write(bytes);
            self.layout.credit_user_write(bytes);
            if let Err(part) = self.add_part(part) {
                self.queued_writes.push_front(part);
                break;
            }
        }
    }

    fn start_read(&mut self, key: Key, id: SectorId, reply: ReadReply) {
        let Some(loc) = self.view.index().get(&key) else {
            let _ = reply.send(Ok(None));
            return;
        };
        let Some(segment) = self.segments.get_mut(&loc.segment) else {
            let _ = reply.send(Err(EngineError::Corrupt(id)));
            return;
        };
        let fd = if self.config.buffered_reads {
            let first_use = segment.reader.is_none();
            match segment.reader(&self.dir) {
                Ok(reader) => {
                    if first_use {
                        self.view.add_reader(loc.segment, Arc::clone(&reader));
                    }
                    reader.as_raw_fd()
                }
                Err(error) => {
                    tracing::warn!("buffered read descriptor: {error}; reading directly");
                    segment.file.as_raw_fd()
                }
            }
        } else {
            segment.file.as_raw_fd()
        };
        let start = loc.offset & !(BLOCK as u64 - 1);
        let end = align_up(
            (loc.offset as usize) + RECORD_HEADER_LEN + loc.len as usize,
            BLOCK,
        ) as u64;
        let len = (end - start) as usize;
        let (buffer, entry) = match (len <= READ_SLOT).then(|| self.free_reads.pop()).flatten() {
            Some(index) => {
                let pointer = self.ring.buffers[index as usize].as_mut_ptr();
                let entry = opcode::ReadFixed::new(types::Fd(fd), pointer, len as u32, index)
                    .offset(start)
                    .build();
                (Buffer::Fixed(index), entry)
            }
            None => {
                let mut owned = AlignedBuf::new(len);
                let entry = opcode::Read::new(types::Fd(fd), owned.as_mut_ptr(), len as u32)
                    .offset(start)
                    .build();
                (Buffer::Owned(owned), entry)
            }
        };
        let slot = self.op_slot(Op::Read {
            key,
            id,
            loc,
            start,
            len,
            buffer,
            reply,
        });
        // SAFETY: the buffer lives in `self.ops[slot]` (owned) or in the ring's
        // registered set (fixed, taken off the free list) until this op is reaped.
        if let Err(error) = unsafe { self.ring.push(&entry.user_data(slot as u64)) } {
            self.fail_op(
                slot,
                EngineError::io("queueing a read in", self.dir.clone())(error),
            );
        }
    }

    /// Adds a part's records to the chunk being built; gives the part back if no
    /// chunk buffer is free.
    fn add_part(&mut self, part: BatchPart) -> Result<usize, BatchPart> {
        if self.building.is_none() && !self.begin_chunk(&part) {
            return Err(part);
        }
        let BatchPart {
            batch,
            shards,
            records,
            durable,
            tracker,
            done,
        } = part;
        let part_len = records.len() as u32;
        let state = PartState {
            batch,
            shards,
            durable,
            tracker,
            done: Some(done),
            records: Vec::with_capacity(records.len()),
            chunks_left: 0,
            dsync_only: true,
            error: None,
        };
        let part_slot = slab_insert(&mut self.parts, &mut self.free_parts, state);
        for (record_index, (key, data)) in records.into_iter().enumerate() {
            *self.pending_keys.entry(key).or_default() += 1;
            let (kind, payload) = match &data {
                Some(data) => (RecordKind::Put, &data[..]),
                None => (RecordKind::Delete, &[][..]),
            };
            let header = RecordHeader {
                key,
                payload_len: payload.len() as u32,
                kind,
                batch,
                part_len,
                shards,
            };
            if !self.chunk_fits(payload.len()) {
                self.finish_chunk();
                self.building = Some(self.new_building(payload.len()));
            }
            let Some(building) = self.building.as_mut() else {
                unreachable!("a chunk is being built");
            };
            let buffer = match &mut building.buffer {
                Buffer::Fixed(index) => self.ring.buffers[*index as usize].as_mut_slice(),
                Buffer::Owned(owned) => owned.as_mut_slice(),
            };
            let mut builder = ChunkBuilder::resume(buffer, building.used, building.records);
            if builder.push(&header, payload).is_none() {
                unreachable!("the chunk was sized for this record");
            }
            building.used = builder.used();
            building.records = builder.records();
            // A part's records go into chunks one after another, so it is new to this
            // chunk exactly when the chunk's last record is not its own.
            let first_in_chunk = building.members.last().map(|(slot, _)| *slot) != Some(part_slot);
            building.members.push((part_slot, record_index));
            if let Some(Some(state)) = self.parts.get_mut(part_slot) {
                state.records.push(PartRecord {
                    key,
                    kind,
                    len: payload.len() as u32,
                    loc: None,
                    relocates: None,
                });
                if first_in_chunk {
                    state.chunks_left += 1;
                }
            }
        }
        Ok(part_slot)
    }

    fn chunk_fits(&self, payload_len: usize) -> bool {
        let Some(building) = &self.building else {
            return false;
        };
        let capacity = match &building.buffer {
            Buffer::Fixed(index) => self.ring.buffers[*index as usize].len(),
            Buffer::Owned(owned) => owned.len(),
        };
        align_up(building.used + record_footprint(payload_len), BLOCK) <= capacity
    }

    fn begin_chunk(&mut self, part: &BatchPart) -> bool {
        let largest = part
            .records
            .iter()
            .map(|(_, data)| data.as_ref().map_or(0, Bytes::len))
            .max()
            .unwrap_or(0);
        if self.free_chunks.is_empty() {
            return false;
        }
        self.building = Some(self.new_building(largest));
        true
    }

    /// A chunk buffer for a record of `payload_len`: a registered one if it fits
    /// and one is free, else an owned one sized for it.
    fn new_building(&mut self, payload_len: usize) -> Building {
        let needed = align_up(CHUNK_HEADER_LEN + record_footprint(payload_len), BLOCK);
        let buffer = match (needed <= self.config.chunk_bytes)
            .then(|| self.free_chunks.pop())
            .flatten()
        {
            Some(index) => Buffer::Fixed(index),
            None => Buffer::Owned(AlignedBuf::new(needed.max(self.config.chunk_bytes))),
        };
        Building {
            buffer,
            used: CHUNK_HEADER_LEN,
            records: 0,
            members: Vec::new(),
        }
    }

    /// Seals the chunk being built and submits its write.
    fn finish_chunk(&mut self) {
        let Some(mut building) = self.building.take() else {
            return;
        };
        if building.records == 0 {
            self.release(building.buffer);
            return;
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let buffer = match &mut building.buffer {
            Buffer::Fixed(index) => self.ring.buffers[*index as usize].as_mut_slice(),
            Buffer::Owned(owned) => owned.as_mut_slice(),
        };
        let len = ChunkBuilder::resume(buffer, building.used, building.records).finish(
            sequence,
            self.synced_through,
            self.log_id,
        );
        let (segment, position) = match self.reserve(len as u64) {
            Ok(place) => place,
            Err(error) => {
                if matches!(error, EngineError::NoSpace(_)) {
                    self.compaction.space_pressure = true;
                }
                self.release(building.buffer);
                self.fail_members(&building.members, error);
                // Nothing was written under this sequence: nothing to sync.
                self.dsync.settle(sequence, &mut self.synced_through);
                return;
            }
        };
        let Some(file) = self.segments.get(&segment).map(|s| s.file.as_raw_fd()) else {
            unreachable!("reserve returns an open segment");
        };
        let has_durable = building.members.iter().any(
            |(part_slot, _)| matches!(self.parts.get(*part_slot), Some(Some(part)) if part.durable),
        );
        // A round of fdatasync in flight may still be syncing plain chunks.
        let unsynced = !self.dirty.is_empty() || self.sync.is_some();
        let dsync = has_durable && self.dsync.may_dsync(unsynced);
        for (part_slot, _) in &building.members {
            if let Some(Some(part)) = self.parts.get_mut(*part_slot) {
                part.dsync_only &= dsync;
            }
        }
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let entry = match &mut building.buffer {
            Buffer::Fixed(index) => {
                let pointer = self.ring.buffers[*index as usize].as_mut_ptr();
                opcode::WriteFixed::new(types::Fd(file), pointer, len as u32, *index)
                    .offset(position)
                    .rw_flags(flags)
                    .build()
            }
            Buffer::Owned(owned) => opcode::Write::new(types::Fd(file), owned.as_ptr(), len as u32)
                .offset(position)
                .rw_flags(flags)
                .build(),
        };
        self.writes_in_flight.insert(sequence);
        self.dsync.queued(dsync);
        let slot = self.op_slot(Op::WriteChunk {
            buffer: building.buffer,
            segment,
            position,
            sequence,
            len,
            members: building.members,
            dsync,
        });
        // SAFETY: the chunk buffer is owned by `self.ops[slot]` (or is a registered
        // buffer off the free list) until this write is reaped.
        if let Err(error) = unsafe { self.ring.push(&entry.user_data(slot as u64)) } {
            self.fail_op(
                slot,
                EngineError::io("queueing a write in", self.dir.clone())(error),
            );
        }
    }

    /// Finds room for `len` bytes in the active segment, starting a new segment
    /// when it is full. Running out of space fails here, before any write.
    fn reserve(&mut self, len: u64) -> Result<(u32, u64), EngineError> {
        if let Some(active) = self.active {
            let size = self.segments.get(&active).map_or(0, |s| s.size);
            if self.write_position + len <= size {
                let position = self.write_position;
                self.write_position += len;
                if let Some(segment) = self.segments.get_mut(&active) {
                    segment.written = self.write_position;
                }
                return Ok((active, position));
            }
        }
        self.seal_active();
        if self.next_segment > MAX_SEGMENT {
            return Err(EngineError::Layout(format!(
                "{} has used all {MAX_SEGMENT} segment numbers",
                self.dir.display()
            )));
        }
        let size = self.config.segment_bytes.max(len);
        // A spare was sealed to what was written into it, a little under a full
        // segment: any spare of at least half a segment (and room for `len`) will do.
        let usable = len.max(self.config.segment_bytes / 2);
        let segment = match self
            .spares
            .iter()
            .position(|(_, spare_size)| *spare_size >= usable)
        {
            Some(index) => {
                let (spare, _) = self.spares.swap_remove(index);
                Segment::reuse(&self.dir, &spare, self.next_segment, self.config.direct_io)?
            }
            None => match self.take_layout_target() {
                Some(spare) => {
                    Segment::reuse(&self.dir, &spare, self.next_segment, self.config.direct_io)?
                }
                None => Segment::create(&self.dir, self.next_segment, size, self.config.direct_io)
                    .inspect_err(|_| self.abandon_layout())?,
            },
        };
        let id = segment.id;
        self.next_segment += 1;
        self.segments.insert(id, segment);
        self.active = Some(id);
        self.write_position = len;
        if let Some(segment) = self.segments.get_mut(&id) {
            segment.written = len;
        }
        Ok((id, 0))
    }

    /// Stops writing into the active segment and frees its unwritten tail.
    fn seal_active(&mut self) {
        if let Some(id) = self.active.take()
            && let Some(segment) = self.segments.get_mut(&id)
        {
            segment.seal();
        }
    }

    fn release(&mut self, buffer: Buffer) {
        if let Buffer::Fixed(index) = buffer {
            if (index as usize) < CHUNK_BUFFERS {
                self.free_chunks.push(index);
            } else {
                self.free_reads.push(index);
            }
        }
    }

    fn start_sync(&mut self) {
        if self.sync.is_some() || self.sync_waiters.is_empty() {
            return;
        }
        let covers = self
            .writes_in_flight
            .first()
            .map_or(self.next_sequence - 1, |first| first - 1);
        let waiters = std::mem::take(&mut self.sync_waiters);
        let dirty: Vec<u32> = std::mem::take(&mut self.dirty).into_iter().collect();
        if dirty.is_empty() {
            self.synced_through = self.synced_through.max(covers);
            self.dsync.advance(&mut self.synced_through);
            for waiter in waiters {
                waiter(Ok(()));
            }
            return;
        }
        self.sync_rounds += 1;
        self.sync = Some(SyncRound {
            waiters,
            remaining: dirty.len(),
            covers,
            error: None,
        });
        for segment in dirty {
            let Some(fd) = self.segments.get(&segment).map(|s| s.file.as_raw_fd()) else {
                self.sync_done(Ok(()));
                continue;
            };
            let entry = opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            let slot = self.op_slot(Op::Fsync);
            // SAFETY: fsync reads no buffer of ours.
            if let Err(error) = unsafe { self.ring.push(&entry.user_data(slot as u64)) } {
                self.fail_op(
                    slot,
                    EngineError::io("queueing fdatasync in", self.dir.clone())(error),
                );
            }
        }
    }

    fn sync_done(&mut self, result: Result<(), EngineError>) {
        let Some(round) = self.sync.as_mut() else {
            return;
        };
        if let Err(error) = result {
            round.error.get_or_insert(error);
        }
        round.remaining -= 1;
        if round.remaining > 0 {
            return;
        }
        let Some(round) = self.sync.take() else {
            return;
        };
        match round.error {
            None => {
                self.synced_through = self.synced_through.max(round.covers);
                self.dsync.advance(&mut self.synced_through);
                for waiter in round.waiters {
                    waiter(Ok(()));
                }
            }
            Some(error) => {
                let message = error.to_string();
                for waiter in round.waiters {
                    waiter(Err(EngineError::Io {
                        context: "fdatasync",
                        path: self.dir.clone(),
                        source: std::io::Error::other(message.clone()),
                    }));
                }
            }
        }
    }

    /// Queues a read of the wake-up eventfd, unless one is queued already.
    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.wake.fd()),
            self.wake_buffer.as_mut_ptr(),
            self.wake_buffer.len() as u32,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: the 8-byte buffer is a Box owned by the shard, which outlives
        // the ring's use of it (the read completes or the ring is dropped first).
        if unsafe { self.ring.push(&entry) }.is_ok() {
            self.wake_armed = true;
        }
    }

    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .ring
            .completion()
            .map(|entry| (entry.user_data(), entry.result()))
            .collect();
        for (user_data, result) in completions {
            if user_data == WAKE_TOKEN {
                self.wake_armed = false;
                continue;
            }
            let slot = user_data as usize;
            let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.in_flight -= 1;
            self.free_ops.push(slot);
            self.complete(op, result);
        }
    }

    fn fail_op(&mut self, slot: usize, error: EngineError) {
        if let Some(op) = self.ops.get_mut(slot).and_then(Option::take) {
            self.in_flight -= 1;
            self.free_ops.push(slot);
            self.complete_with_error(op, error);
        }
    }

    fn complete(&mut self, op: Op, result: i32) {
        if result < 0 {
            let error = std::io::Error::from_raw_os_error(-result);
            let context = match op {
                Op::WriteChunk { .. } => "writing a chunk to",
                Op::Read { .. } => "reading",
                Op::Fsync => "fdatasync of",
                Op::Zero { .. } => "writing zeros to",
            };
            let path = self.dir.clone();
            self.complete_with_error(op, EngineError::io(context, path)(error));
            return;
        }
        match op {
            Op::WriteChunk {
                buffer,
                segment,
                position,
                sequence,
                len,
                members,
                dsync,
            } => {
                self.writes_in_flight.remove(&sequence);
                self.release(buffer);
                if result as usize != len {
                    let error = EngineError::Io {
                        context: "short write to",
                        path: self.dir.clone(),
                        source: std::io::Error::other(format!("{result} of {len} bytes")),
                    };
                    self.fail_members(&members, error);
                    self.write_failed(dsync, sequence);
                    return;
                }
                if !dsync {
                    self.dirty.insert(segment);
                }
                self.dsync
                    .completed(dsync, sequence, true, &mut self.synced_through);
                self.chunk_written(segment, position, &members);
            }
            Op::Read {
                key,
                id,
                loc,
                start,
                len,
                buffer,
                reply,
            } => {
                let outcome = {
                    let bytes = match &buffer {
                        Buffer::Fixed(index) => self.ring.buffers[*index as usize].as_slice(),
                        Buffer::Owned(owned) => owned.as_slice(),
                    };
                    let valid = &bytes[..(result as usize).min(len)];
                    let offset = (loc.offset - start) as usize;
                    match valid.get(offset..).map(record::parse_record) {
                        Some(Ok(parsed))
                            if parsed.payload_intact
                                && parsed.header.key == key
                                && parsed.header.kind == RecordKind::Put =>
                        {
                            Ok(Some(parsed.payload.to_vec()))
                        }
                        _ => Err(EngineError::Corrupt(id)),
                    }
                };
                self.release(buffer);
                let _ = reply.send(outcome);
            }
            Op::Fsync => self.sync_done(Ok(())),
            Op::Zero { len } => self.zeroed(len, Ok(result as u32)),
        }
    }

    fn complete_with_error(&mut self, op: Op, error: EngineError) {
        match op {
            Op::WriteChunk {
                buffer,
                sequence,
                members,
                dsync,
                ..
            } => {
                self.writes_in_flight.remove(&sequence);
                self.release(buffer);
                self.fail_members(&members, error);
                self.write_failed(dsync, sequence);
            }
            Op::Read { buffer, reply, .. } => {
                self.release(buffer);
                let _ = reply.send(Err(error));
            }
            Op::Fsync => self.sync_done(Err(error)),
            Op::Zero { len } => self.zeroed(len, Err(error)),
        }
    }

    /// Accounts for a chunk write that failed. A failed write holds
    /// `synced_through` below it until a round of `fdatasync` covers it, as a
    /// plain write's would; one is asked for, so chunks written with `RWF_DSYNC`
    /// after it do not pile up in the ledger.
    fn write_failed(&mut self, dsync: bool, sequence: u64) {
        self.dsync
            .completed(dsync, sequence, false, &mut self.synced_through);
        if dsync {
            self.sync_waiters.push(Box::new(|_| {}));
        }
    }

    fn fail_members(&mut self, members: &[(usize, usize)], error: EngineError) {
        let message = error.to_string();
        let mut seen = Vec::new();
        for (part_slot, _) in members {
            if seen.contains(part_slot) {
                continue;
            }
            seen.push(*part_slot);
            if let Some(Some(part)) = self.parts.get_mut(*part_slot) {
                part.error.get_or_insert_with(|| match &error {
                    EngineError::NoSpace(path) => EngineError::NoSpace(path.clone()),
                    _ => EngineError::Io {
                        context: "writing",
                        path: PathBuf::new(),
                        source: std::io::Error::other(message.clone()),
                    },
                });
                part.chunks_left -= 1;
                if part.chunks_left == 0 {
                    self.part_written(*part_slot);
                }
            }
        }
    }

    fn chunk_written(&mut self, segment: u32, position: u64, members: &[(usize, usize)]) {
        let mut finished = Vec::new();
        let mut offset = CHUNK_HEADER_LEN as u64;
        let mut touched = Vec::new();
        for (part_slot, record_index) in members {
            let Some(Some(part)) = self.parts.get_mut(*part_slot) else {
                continue;
            };
            let Some(record) = part.records.get_mut(*record_index) else {
                continue;
            };
            record.loc = Some(Loc {
                segment,
                offset: position + offset,
                len: record.len,
            });
            offset += record_footprint(record.len as usize) as u64;
            if !touched.contains(part_slot) {
                touched.push(*part_slot);
            }
        }
        for part_slot in touched {
            if let Some(Some(part)) = self.parts.get_mut(part_slot) {
                part.chunks_left -= 1;
                if part.chunks_left == 0 {
                    finished.push(part_slot);
                }
            }
        }
        for part_slot in finished {
            self.part_written(part_slot);
        }
    }

    /// Every chunk of a part is written (or failed).
    fn part_written(&mut self, part_slot: usize) {
        let Some(Some(part)) = self.parts.get_mut(part_slot) else {
            return;
        };
        let ok = part.error.is_none();
        match part.tracker.clone() {
            None => {
                if ok {
                    self.apply(part_slot);
                }
                let Some(mut part) = self.take_part(part_slot) else {
                    return;
                };
                let Some(done) = part.done.take() else {
                    return;
                };
                match part.error {
                    Some(error) => done(Err(error)),
                    None if part.durable && !part.dsync_only => self.sync_waiters.push(done),
                    None => done(Ok(())),
                }
            }
            Some(tracker) => {
                self.awaiting_resolve.insert(part.batch, part_slot);
                if ok && part.durable && !part.dsync_only {
                    self.sync_waiters
                        .push(Box::new(move |result| tracker.part_written(result.is_ok())));
                } else {
                    tracker.part_written(ok);
                }
            }
        }
    }

    fn resolve(&mut self, batch: u64, commit: bool) {
        let Some(part_slot) = self.awaiting_resolve.remove(&batch) else {
            return;
        };
        if commit {
            self.apply(part_slot);
        }
        if let Some(mut part) = self.take_part(part_slot)
            && let Some(done) = part.done.take()
        {
            done(match (commit, part.error) {
                (true, _) => Ok(()),
                (false, Some(error)) => Err(error),
                (false, None) => Err(EngineError::BatchAborted),
            });
        }
        if self.awaiting_resolve.is_empty() {
            self.recent_deletes.clear();
        }
    }

    fn take_part(&mut self, part_slot: usize) -> Option<PartState> {
        let part = self.parts.get_mut(part_slot)?.take()?;
        self.free_parts.push(part_slot);
        for record in &part.records {
            if let Some(count) = self.pending_keys.get_mut(&record.key) {
                *count -= 1;
                if *count == 0 {
                    self.pending_keys.remove(&record.key);
                }
            }
        }
        Some(part)
    }

    /// Makes a written part visible. A record older in the log than what the index
    /// (or a recent delete) already holds for its key lost a race to a newer
    /// write and is skipped, so the index always matches log order, as recovery
    /// will rebuild it.
    fn apply(&mut self, part_slot: usize) {
        let Some(Some(part)) = self.parts.get(part_slot) else {
            return;
        };
        let multi_shard_pending = !self.awaiting_resolve.is_empty();
        let _ = part.shards;
        let updates: Vec<(Key, RecordKind, Loc, Option<Loc>)> = part
            .records
            .iter()
            .filter_map(|record| {
                record
                    .loc
                    .map(|loc| (record.key, record.kind, loc, record.relocates))
            })
            .collect();
        for (key, kind, loc, relocates) in updates {
            if let Some(old) = relocates
                && self.view.index().get(&key) != Some(old)
            {
                continue;
            }
            let newer_exists = relocates.is_none()
                && self.view.index().get(&key).is_some_and(|current| {
                    (current.segment, current.offset) > (loc.segment, loc.offset)
                })
                || self.recent_deletes.get(&key).is_some_and(|deleted| {
                    (deleted.segment, deleted.offset) > (loc.segment, loc.offset)
                });
            if newer_exists {
                continue;
            }
            let previous = match kind {
                RecordKind::Put => {
                    if let Some(segment) = self.segments.get_mut(&loc.segment) {
                        segment.live_bytes += record_footprint(loc.len as usize) as u64;
                    }
                    self.live_payload += loc.len as u64;
                    self.view.index_mut().insert(key, loc)
                }
                RecordKind::Delete => {
                    if multi_shard_pending {
                        self.recent_deletes.insert(key, loc);
                    }
                    self.view.index_mut().remove(&key)
                }
            };
            if let Some(previous) = previous {
                self.live_payload = self.live_payload.saturating_sub(previous.len as u64);
            }
            if let Some(previous) = previous
                && let Some(segment) = self.segments.get_mut(&previous.segment)
            {
                segment.live_bytes = segment
                    .live_bytes
                    .saturating_sub(record_footprint(previous.len as usize) as u64);
            }
        }
    }
}
