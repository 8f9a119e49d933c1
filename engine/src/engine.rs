//! The [`Engine`] handle: configuration, opening, and routing requests to shards.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use blocktree_core::sector::SectorId;
use bytes::Bytes;

use crate::error::EngineError;
use crate::key::{KeyDeriver, shard_of};
use crate::pending::Pending;
use crate::record::{Key, MAX_PAYLOAD, MAX_SHARDS};
use crate::shard::{
    BatchPart, BatchTracker, Cached, Request, ShardHandle, ShardStats, ShardView, Wake,
};
use crate::superblock::Superblock;
use crate::{checkpoint, recovery, shard};

/// How an engine lays out and writes its store.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The store directory.
    pub dir: PathBuf,
    /// Shards, one thread each; default: the number of CPUs. Fixed when the store
    /// is created (a store remembers it in its layout).
    pub shards: usize,
    /// Bytes per segment file.
    pub segment_bytes: u64,
    /// The largest chunk one group commit writes.
    pub chunk_bytes: usize,
    /// Open segments with O_DIRECT (falls back to buffered I/O with a warning where
    /// the file system refuses it).
    pub direct_io: bool,
    /// Write a checkpoint after this many bytes of writes, or after eight times
    /// the size of the last checkpoint if that is more: opening the store then
    /// scans about this much log at most, and checkpoints cost at most an eighth
    /// of the write traffic. Frequent checkpoints also let compaction reclaim
    /// (and reuse) dead segments sooner.
    pub checkpoint_bytes: u64,
    /// Read records through the page cache (a second, buffered descriptor per
    /// segment) instead of O_DIRECT: the kernel then caches hot sectors outside
    /// the process. Off by default, so the engine's benchmarks measure the device.
    pub buffered_reads: bool,
    /// Registered 128 KiB read buffers per shard (1–1024): how many reads the
    /// shard has in flight before it allocates buffers for more. They are
    /// pinned in memory for the store's life, so a store whose reads mostly
    /// go elsewhere (buffered reads answered on callers' threads, a log read
    /// from its cache) needs few.
    pub read_buffers: usize,
}

/// The environment variable that overrides the default segment size, in MiB
/// ([`EngineConfig::new`]). A store allocates a segment per shard, and lays out
/// one more ahead, as soon as it opens: about 770 MiB on two cores at the
/// default 256 MiB. Test suites that start many small stores at once
/// (`scripts/test` sets 32) and small devices want less.
pub const SEGMENT_MIB_ENV: &str = "BLOCKTREE_SEGMENT_MIB";

/// The default segment size: 256 MiB, or [`SEGMENT_MIB_ENV`] when it names a
/// size from 4 MiB to 16 GiB.
fn default_segment_bytes() -> u64 {
    const DEFAULT: u64 = 256 << 20;
    let Some(value) = std::env::var_os(SEGMENT_MIB_ENV) else {
        return DEFAULT;
    };
    match value
        .to_str()
        .and_then(|mib| mib.trim().parse::<u64>().ok())
    {
        Some(mib @ 4..=16384) => mib << 20,
        _ => {
            tracing::warn!(
                ?value,
                "{SEGMENT_MIB_ENV} is not a size in MiB from 4 to 16384; using 256"
            );
            DEFAULT
        }
    }
}

impl EngineConfig {
    /// Defaults for a store in `dir`: a shard per CPU, 256 MiB segments (or
    /// [`SEGMENT_MIB_ENV`]'s), 2 MiB chunks.
    pub fn new(dir: impl Into<PathBuf>) -> EngineConfig {
        let shards = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_SHARDS);
        EngineConfig {
            dir: dir.into(),
            shards,
            segment_bytes: default_segment_bytes(),
            chunk_bytes: 2 << 20,
            direct_io: true,
            checkpoint_bytes: 256 << 20,
            buffered_reads: false,
            read_buffers: 64,
        }
    }

    fn check(&self) -> Result<(), EngineError> {
        let problem = if self.shards == 0 || self.shards > MAX_SHARDS {
            Some(format!("shards must be 1..={MAX_SHARDS}"))
        } else if self.chunk_bytes < (64 << 10) || !self.chunk_bytes.is_multiple_of(4096) {
            Some("chunk_bytes must be a multiple of 4 KiB, at least 64 KiB".into())
        } else if self.segment_bytes < 2 * self.chunk_bytes as u64 {
            Some("segment_bytes must hold at least two chunks".into())
        } else if self.segment_bytes > (16u64 << 30) {
            Some("segment_bytes must be at most 16 GiB".into())
        } else if !(1..=1024).contains(&self.read_buffers) {
            Some("read_buffers must be 1..=1024".into())
        } else {
            None
        };
        problem.map_or(Ok(()), |problem| Err(EngineError::Config(problem)))
    }
}

/// Sectors to write (or delete) atomically.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    pub(crate) ops: Vec<(SectorId, Option<Bytes>)>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Stores `data` as the contents of `id`. A `Vec` or `Bytes` is taken
    /// without copying: the shard copies it once, into its chunk buffer.
    pub fn put(&mut self, id: SectorId, data: impl Into<Bytes>) -> &mut Self {
        self.ops.push((id, Some(data.into())));
        self
    }

    /// Removes `id`; reading it afterwards finds nothing.
    pub fn delete(&mut self, id: SectorId) -> &mut Self {
        self.ops.push((id, None));
        self
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if the batch does nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What the engine holds, summed over its shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Sectors that read back data.
    pub live_sectors: u64,
    /// Payload bytes of those sectors.
    pub live_bytes: u64,
    /// Bytes of segment files on disk.
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// Heap bytes of the in-memory index.
    pub index_bytes: u64,
    /// Payload bytes compaction has copied out of partly dead segments since
    /// the store was opened: the write amplification it added.
    pub moved_bytes: u64,
    /// Rounds of `fdatasync` the shards ran since the store was opened.
    pub sync_rounds: u64,
    /// Chunks written with `RWF_DSYNC` since the store was opened: durable writes
    /// that needed no round of `fdatasync`.
    pub dsync_chunks: u64,
    /// Reads answered on the caller's thread, through the page cache, without a
    /// trip to the shard (buffered reads only) since the store was opened.
    pub cached_reads: u64,
}

struct Inner {
    dir: PathBuf,
    checkpoint_bytes: u64,
    /// Held shared while a batch's parts are handed to the shards, and exclusively
    /// by a checkpoint, so every batch is wholly before or wholly after it. The
    /// only lock on the write path; contended only while a checkpoint starts.
    gate: RwLock<()>,
    epoch: AtomicU64,
    written_since_checkpoint: AtomicU64,
    /// Bytes of writes after which the next checkpoint is due.
    checkpoint_threshold: AtomicU64,
    checkpointing: AtomicBool,
    keys: KeyDeriver,
    shards: Vec<ShardHandle>,
    /// Each shard's index and read descriptors, for reads served from the page
    /// cache on the caller's thread; `None` unless reads are buffered.
    views: Option<Vec<Arc<ShardView>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    superblock: Mutex<Superblock>,
    next_batch: AtomicU64,
}

/// A store of sectors for one generation. Cheap to clone; every clone talks to
/// the same shard threads.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Creates a new, empty store for `generation` in `config.dir`.
    pub fn create(config: EngineConfig, generation: u64) -> Result<Engine, EngineError> {
        config.check()?;
        std::fs::create_dir_all(&config.dir).map_err(EngineError::io("creating", &config.dir))?;
        if Superblock::load(&config.dir)?.is_some() {
            return Err(EngineError::Layout(format!(
                "{} already holds a sector store",
                config.dir.display()
            )));
        }
        recovery::write_layout(&config)?;
        let superblock = Superblock::new(generation)?;
        superblock.store(&config.dir)?;
        Engine::start(config, superblock)
    }

    /// Opens the store in `config.dir`, recovering it after a crash.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        let superblock = Superblock::load(&config.dir)?.ok_or_else(|| {
            EngineError::Layout(format!("no sector store in {}", config.dir.display()))
        })?;
        let mut config = config;
        config.shards = recovery::read_layout(&config)?;
        config.check()?;
        Engine::start(config, superblock)
    }

    /// Opens the store in `config.dir`, creating it for `generation` if it has none.
    pub fn open_or_create(config: EngineConfig, generation: u64) -> Result<Engine, EngineError> {
        if Superblock::load(&config.dir)?.is_some() {
            Engine::open(config)
        } else {
            Engine::create(config, generation)
        }
    }

    fn start(config: EngineConfig, superblock: Superblock) -> Result<Engine, EngineError> {
        let keys = KeyDeriver::new(superblock.salt);
        let recovered = recovery::recover(&config, keys.log_id())?;
        let next_batch = recovered.next_batch;
        let epoch = recovered.epoch;
        let mut handles = Vec::with_capacity(config.shards);
        let mut receivers = Vec::with_capacity(config.shards);
        for _ in 0..config.shards {
            let (sender, receiver) = crossbeam_channel::unbounded();
            let wake = Arc::new(
                Wake::new().map_err(EngineError::io("creating an eventfd for", &config.dir))?,
            );
            handles.push(ShardHandle { sender, wake });
            receivers.push(receiver);
        }
        let mut threads = Vec::with_capacity(config.shards);
        let mut views = Vec::with_capacity(config.shards);
        for ((shard_id, receiver), mut state) in
            receivers.into_iter().enumerate().zip(recovered.shards)
        {
            let config = config.clone();
            let wake = Arc::clone(&handles[shard_id].wake);
            let view = Arc::new(ShardView::new(std::mem::take(&mut state.index)));
            views.push(Arc::clone(&view));
            let thread = std::thread::Builder::new()
                .name(format!("btengine-{shard_id}"))
                .spawn(move || shard::run(shard_id, config, state, receiver, wake, view))
                .map_err(EngineError::io(
                    "spawning a shard thread for",
                    &config_dir(shard_id),
                ))?;
            threads.push(thread);
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                checkpoint_bytes: config.checkpoint_bytes,
                gate: RwLock::new(()),
                epoch: AtomicU64::new(epoch),
                written_since_checkpoint: AtomicU64::new(0),
                checkpoint_threshold: AtomicU64::new(config.checkpoint_bytes),
                checkpointing: AtomicBool::new(false),
                dir: config.dir,
                keys,
                shards: handles,
                views: config.buffered_reads.then_some(views),
                threads: Mutex::new(threads),
                superblock: Mutex::new(superblock),
                next_batch: AtomicU64::new(next_batch),
            }),
        })
    }

    /// The generation this store holds.
    pub fn generation(&self) -> u64 {
        self.superblock().generation
    }

    fn superblock(&self) -> Superblock {
        match self.inner.superblock.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Hands out the next free inode, durably (the superblock is rewritten before
    /// the inode is returned, so no inode is ever handed out twice).
    pub fn allocate_inode(&self) -> Result<u64, EngineError> {
        Ok(self.allocate_inodes(1)?.start)
    }

    /// Reserves `count` fresh inode numbers with one durable superblock write, for
    /// callers that hand them out one by one (a crash loses the unused rest of
    /// the range; no number is ever handed out twice).
    pub fn allocate_inodes(&self, count: u64) -> Result<std::ops::Range<u64>, EngineError> {
        let mut guard = match self.inner.superblock.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let first = guard.next_inode;
        let end = first
            .checked_add(count.max(1))
            .ok_or_else(|| EngineError::Config("inode numbers exhausted".into()))?;
        let mut next = guard.clone();
        next.next_inode = end;
        next.store(&self.inner.dir)?;
        *guard = next;
        Ok(first..end)
    }

    fn route(&self, id: &SectorId) -> (Key, usize) {
        let key = self.inner.keys.key(id);
        (key, shard_of(&key, self.inner.shards.len()))
    }

    fn send(&self, shard: usize, request: Request) -> Result<(), EngineError> {
        self.inner.shards[shard]
            .send(request)
            .map_err(|_| EngineError::Closed)
    }

    /// True when reads go through the page cache on the calling thread: reads
    /// are buffered ([`EngineConfig::buffered_reads`]).
    pub fn reads_from_page_cache(&self) -> bool {
        self.inner.views.is_some()
    }

    /// Reads sector `id`: `None` if it was never written or was deleted; an error
    /// if its record fails its checksum.
    pub fn read(&self, id: SectorId) -> Pending<Option<Vec<u8>>> {
        let (key, shard) = self.route(&id);
        if let Some(views) = &self.inner.views
            && let Some(answer) = views[shard].read(&key)
        {
            return answered(answer);
        }
        self.read_in_shard(id, key, shard)
    }

    /// Reads sectors `ids`, one answer each, as [`read`](Self::read) would.
    /// With buffered reads, records that lie together in a segment (a batch's,
    /// written in order) are read with one system call.
    pub fn read_many(&self, ids: &[SectorId]) -> Vec<Pending<Option<Vec<u8>>>> {
        let routed: Vec<(Key, usize)> = ids.iter().map(|id| self.route(id)).collect();
        let mut answers: Vec<Option<Cached>> = ids.iter().map(|_| None).collect();
        if let Some(views) = &self.inner.views {
            for (shard, view) in views.iter().enumerate() {
                let slots: Vec<usize> = (0..ids.len())
                    .filter(|&slot| routed[slot].1 == shard)
                    .collect();
                if slots.is_empty() {
                    continue;
                }
                let keys: Vec<Key> = slots.iter().map(|&slot| routed[slot].0).collect();
                for (slot, answer) in slots.into_iter().zip(view.read_many(&keys)) {
                    answers[slot] = answer;
                }
            }
        }
        answers
            .into_iter()
            .zip(ids.iter().zip(routed))
            .map(|(answer, (id, (key, shard)))| match answer {
                Some(answer) => answered(answer),
                None => self.read_in_shard(*id, key, shard),
            })
            .collect()
    }

    fn read_in_shard(&self, id: SectorId, key: Key, shard: usize) -> Pending<Option<Vec<u8>>> {
        let (reply, pending) = Pending::channel();
        match self.send(shard, Request::Read { key, id, reply }) {
            Ok(()) => pending,
            Err(error) => Pending::ready(Err(error)),
        }
    }

    /// Writes `batch` atomically. Completes once the batch is in the log and
    /// visible to reads; it survives a crash of this process, but only a later
    /// [`Engine::flush`] (or [`Engine::write_durable`]) makes it survive power loss.
    ///
    /// Atomic means: after completion every sector shows the batch, and after a
    /// crash either all of it or none of it is there. While it is in flight, a
    /// reader of sectors on different shards may see one shard's part a moment
    /// before another's: reads are not snapshots across shards.
    pub fn write(&self, batch: WriteBatch) -> Pending<()> {
        self.submit(batch, false)
    }

    /// Writes `batch` atomically and completes only once it is durable, and so is
    /// every write its shards completed before it (it shares the sync of its round
    /// with every other flush: group commit).
    pub fn write_durable(&self, batch: WriteBatch) -> Pending<()> {
        self.submit(batch, true)
    }

    /// Completes once every write that completed before this call is durable.
    pub fn flush(&self) -> Pending<()> {
        let (dones, pending) = fan_in(self.inner.shards.len());
        for (shard, done) in dones.into_iter().enumerate() {
            if let Err(error) = self.send(shard, Request::Flush { done }) {
                return Pending::ready(Err(error));
            }
        }
        pending
    }

    fn submit(&self, batch: WriteBatch, durable: bool) -> Pending<()> {
        if batch.is_empty() {
            return Pending::ready(Ok(()));
        }
        if let Some(len) = batch
            .ops
            .iter()
            .filter_map(|(_, data)| data.as_ref().map(Bytes::len))
            .find(|len| *len > MAX_PAYLOAD)
        {
            return Pending::ready(Err(EngineError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            }));
        }
        let shards = self.inner.shards.len();
        let mut parts: Vec<Vec<(Key, Option<Bytes>)>> = vec![Vec::new(); shards];
        for (id, data) in batch.ops {
            let (key, shard) = self.route(&id);
            parts[shard].push((key, data));
        }
        let mask = parts
            .iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .fold(0u32, |mask, (shard, _)| mask | (1 << shard));
        let bytes: u64 = parts
            .iter()
            .flatten()
            .map(|(_, data)| data.as_ref().map_or(0, Bytes::len) as u64 + 64)
            .sum();
        let gate = match self.inner.gate.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Batch 0 is reserved for records moved by compaction.
        let batch_id = self.inner.next_batch.fetch_add(1, Ordering::Relaxed).max(1);
        let tracker = (mask.count_ones() > 1)
            .then(|| Arc::new(BatchTracker::new(batch_id, mask, self.inner.shards.clone())));
        let (dones, pending) = fan_in(mask.count_ones() as usize);
        let parts = parts
            .into_iter()
            .enumerate()
            .filter(|(_, records)| !records.is_empty());
        for ((shard, records), done) in parts.zip(dones) {
            let part = BatchPart {
                batch: batch_id,
                shards: mask,
                records,
                durable,
                tracker: tracker.clone(),
                done,
            };
            if let Err(error) = self.send(shard, Request::Write(part)) {
                // The shard is gone: its part will never be written, so the batch
                // can never complete on the other shards either.
                if let Some(tracker) = &tracker {
                    tracker.part_written(false);
                }
                return Pending::ready(Err(error));
            }
        }
        drop(gate);
        let written = self
            .inner
            .written_since_checkpoint
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        if written >= self.inner.checkpoint_threshold.load(Ordering::Relaxed)
            && !self.inner.checkpointing.swap(true, Ordering::AcqRel)
        {
            let engine = self.clone();
            let spawned = std::thread::Builder::new()
                .name("btengine-checkpointer".into())
                .spawn(move || {
                    if let Err(error) = engine.checkpoint() {
                        tracing::error!(%error, "sector engine checkpoint failed");
                    }
                    engine.inner.checkpointing.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.inner.checkpointing.store(false, Ordering::Release);
            }
        }
        pending
    }

    /// Writes a checkpoint of every shard's index, so the next open reads it
    /// instead of scanning the log. New batches wait while the shards finish the
    /// ones in flight; reads go on.
    pub fn checkpoint(&self) -> Result<(), EngineError> {
        self.checkpoint_sealing(false)
    }

    /// A checkpoint; with `seal`, each shard first stops writing into its active
    /// segment and frees the rest of it (at shutdown).
    fn checkpoint_sealing(&self, seal: bool) -> Result<(), EngineError> {
        let _gate = match self.inner.gate.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let epoch = self.inner.epoch.load(Ordering::Acquire) + 1;
        let mut replies = Vec::with_capacity(self.inner.shards.len());
        for shard in 0..self.inner.shards.len() {
            let (reply, pending) = Pending::channel();
            self.send(shard, Request::Checkpoint { epoch, seal, reply })?;
            replies.push(pending);
        }
        for reply in replies {
            reply.wait()?;
        }
        let next_batch = self.inner.next_batch.load(Ordering::Acquire);
        crate::durable::write_durably(
            &self.inner.dir.join(checkpoint::HEAD_FILE),
            &checkpoint::encode_head(epoch, next_batch),
        )?;
        self.inner.epoch.store(epoch, Ordering::Release);
        for shard in 0..self.inner.shards.len() {
            let _ = self.send(shard, Request::Committed { epoch });
        }
        self.inner
            .written_since_checkpoint
            .store(0, Ordering::Relaxed);
        // About 26 bytes per index entry went into the checkpoint files.
        if let Ok(stats) = self.stats() {
            let threshold = self.inner.checkpoint_bytes.max(stats.live_sectors * 26 * 8);
            self.inner
                .checkpoint_threshold
                .store(threshold, Ordering::Relaxed);
        }
        for shard in 0..self.inner.shards.len() {
            checkpoint::remove_stale(&crate::segment::shard_dir(&self.inner.dir, shard), epoch);
        }
        Ok(())
    }

    /// Sector counts and sizes, summed over the shards.
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        let mut total = EngineStats::default();
        for shard in 0..self.inner.shards.len() {
            let (reply, pending) = Pending::channel();
            self.send(shard, Request::Stats { reply })?;
            let ShardStats {
                live_sectors,
                live_bytes,
                disk_bytes,
                segments,
                index_bytes,
                moved_bytes,
                sync_rounds,
                dsync_chunks,
            } = pending.wait()?;
            total.live_sectors += live_sectors;
            total.live_bytes += live_bytes;
            total.disk_bytes += disk_bytes;
            total.segments += segments;
            total.index_bytes += index_bytes;
            total.moved_bytes += moved_bytes;
            total.sync_rounds += sync_rounds;
            total.dsync_chunks += dsync_chunks;
        }
        total.cached_reads = self
            .inner
            .views
            .iter()
            .flatten()
            .map(|view| view.served())
            .sum();
        Ok(total)
    }

    /// Stops the shard threads after they finish what they were given. Other
    /// clones of this handle get [`EngineError::Closed`] afterwards.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        // Leaves a checkpoint, so the next open need not scan the log.
        let checkpointed = self.checkpoint_sealing(true);
        for sender in &self.inner.shards {
            let (dones, pending) = fan_in(1);
            for done in dones {
                if sender.send(Request::Shutdown { done }).is_ok() {
                    let _ = pending.wait();
                    break;
                }
            }
        }
        let threads = match self.inner.threads.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for thread in threads {
            let _ = thread.join();
        }
        checkpointed
    }
}

/// A read answered on the caller's thread, as a completed [`Pending`].
fn answered(answer: Cached) -> Pending<Option<Vec<u8>>> {
    match answer {
        Cached::Found(payload) => Pending::ready(Ok(Some(payload))),
        Cached::Absent => Pending::ready(Ok(None)),
    }
}

fn config_dir(shard: usize) -> PathBuf {
    PathBuf::from(format!("shard-{shard}"))
}

/// A completion callback for a write or flush part; the shard calls it once.
pub(crate) type Done = Box<dyn FnOnce(Result<(), EngineError>) + Send>;

/// `count` completion callbacks and one `Pending` that completes when all of them
/// have been called, with the first error any reported.
fn fan_in(count: usize) -> (Vec<Done>, Pending<()>) {
    let (reply, pending) = Pending::channel();
    let cell = Arc::new(JoinCell {
        remaining: AtomicU64::new(count as u64),
        state: Mutex::new((None, Some(reply))),
    });
    let dones = (0..count)
        .map(|_| {
            let cell = Arc::clone(&cell);
            Box::new(move |result| cell.complete(result)) as Done
        })
        .collect();
    (dones, pending)
}

/// The first error reported so far, and where to send the outcome.
type JoinState = (
    Option<EngineError>,
    Option<oneshot::Sender<Result<(), EngineError>>>,
);

struct JoinCell {
    remaining: AtomicU64,
    state: Mutex<JoinState>,
}

impl JoinCell {
    fn complete(&self, result: Result<(), EngineError>) {
        let mut state = match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(error) = result {
            // The cause beats the consequence: a shard's own failure (NoSpace, Io)
            // is reported rather than another shard's BatchAborted.
            match &state.0 {
                None | Some(EngineError::BatchAborted) => state.0 = Some(error),
                Some(_) => {}
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(reply) = state.1.take()
        {
            let _ = reply.send(state.0.take().map_or(Ok(()), Err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blocktree_core::sector::SectorKind;

    fn id(inode: u64, index: u64) -> SectorId {
        SectorId {
            generation: 1,
            inode,
            sector: SectorKind::Data(index),
        }
    }

    /// A config for a small test store in `dir`.
    fn small(
        dir: &std::path::Path,
        shards: usize,
        segment_bytes: u64,
        chunk_bytes: usize,
    ) -> EngineConfig {
        let mut config = EngineConfig::new(dir);
        config.shards = shards;
        config.segment_bytes = segment_bytes;
        config.chunk_bytes = chunk_bytes;
        config
    }

    /// Writes 4 KiB of `byte` to each sector `index` of inode 7, as one batch.
    fn fill_sectors(engine: &Engine, indices: impl Iterator<Item = u64>, byte: u8) {
        let mut batch = WriteBatch::new();
        for index in indices {
            batch.put(id(7, index), vec![byte; 4096]);
        }
        engine.write(batch).wait().unwrap();
    }

    #[test]
    fn write_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let config = small(dir.path(), 2, 4 << 20, 256 << 10);
        let engine = Engine::create(config.clone(), 7).unwrap();
        let mut batch = WriteBatch::new();
        for index in 0..100 {
            batch.put(id(3, index), vec![index as u8; 4096]);
        }
        engine.write_durable(batch).wait().unwrap();
        assert_eq!(engine.read(id(3, 5)).wait().unwrap(), Some(vec![5u8; 4096]));
        assert_eq!(engine.read(id(4, 5)).wait().unwrap(), None);
        let mut batch = WriteBatch::new();
        batch.delete(id(3, 6)).put(id(3, 7), vec![0xaa; 100]);
        engine.write(batch).wait().unwrap();
        engine.flush().wait().unwrap();
        assert_eq!(engine.read(id(3, 6)).wait().unwrap(), None);
        assert_eq!(engine.stats().unwrap().live_sectors, 99);
        engine.shutdown().unwrap();
        drop(engine);

        let engine = Engine::open(config.clone()).unwrap();
        assert_eq!(engine.generation(), 7);
        assert_eq!(engine.read(id(3, 5)).wait().unwrap(), Some(vec![5u8; 4096]));
        assert_eq!(engine.read(id(3, 6)).wait().unwrap(), None);
        assert_eq!(engine.read(id(3, 7)).wait().unwrap(), Some(vec![0xaa; 100]));
        assert_eq!(engine.stats().unwrap().live_sectors, 99);

        // A checkpoint, then a log tail after it, then a stop without shutdown.
        engine.checkpoint().unwrap();
        let mut batch = WriteBatch::new();
        batch.put(id(3, 5), vec![0xbb; 10]).delete(id(3, 8));
        engine.write_durable(batch).wait().unwrap();
        drop(engine);
        std::thread::sleep(std::time::Duration::from_millis(100));

        let engine = Engine::open(config).unwrap();
        assert_eq!(engine.read(id(3, 5)).wait().unwrap(), Some(vec![0xbb; 10]));
        assert_eq!(engine.read(id(3, 8)).wait().unwrap(), None);
        assert_eq!(engine.read(id(3, 9)).wait().unwrap(), Some(vec![9u8; 4096]));
        assert_eq!(engine.stats().unwrap().live_sectors, 98);
        engine.shutdown().unwrap();
    }

    /// Waits up to 5 s for compaction to bring the segments under half of
    /// `before`'s bytes on disk.
    fn await_reclaimed_half(engine: &Engine, before: &EngineStats) {
        let mut after = engine.stats().unwrap();
        for _ in 0..250 {
            if after.disk_bytes * 2 < before.disk_bytes {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            after = engine.stats().unwrap();
        }
        panic!("compaction did not reclaim space: {before:?} -> {after:?}");
    }

    #[test]
    fn compaction_reclaims_dead_segments_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let config = small(dir.path(), 2, 512 << 10, 128 << 10);
        let engine = Engine::create(config.clone(), 1).unwrap();
        // Overwrite the same 64 sectors many times: most segments end up dead.
        for round in 0..40u8 {
            let mut batch = WriteBatch::new();
            for index in 0..64 {
                batch.put(id(9, index), vec![round; 4096]);
            }
            engine.write(batch).wait().unwrap();
        }
        engine.flush().wait().unwrap();
        let before = engine.stats().unwrap();
        engine.checkpoint().unwrap();
        await_reclaimed_half(&engine, &before);
        for index in 0..64 {
            assert_eq!(
                engine.read(id(9, index)).wait().unwrap(),
                Some(vec![39u8; 4096])
            );
        }
        drop(engine);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let engine = Engine::open(config).unwrap();
        for index in 0..64 {
            assert_eq!(
                engine.read(id(9, index)).wait().unwrap(),
                Some(vec![39u8; 4096])
            );
        }
        assert_eq!(engine.stats().unwrap().live_sectors, 64);
        engine.shutdown().unwrap();
    }

    /// A one-shard store whose segments are a third live, behind a checkpoint:
    /// sectors 0..256 of inode 7 written with 1, then two thirds of them with 2.
    /// Every old segment is a victim, but the shard holds well under twice its
    /// live bytes.
    fn third_live_store(dir: &std::path::Path) -> Engine {
        let engine = Engine::create(small(dir, 1, 512 << 10, 128 << 10), 1).unwrap();
        fill_sectors(&engine, 0..256, 1);
        fill_sectors(&engine, (0..256).filter(|index| index % 3 != 0), 2);
        engine.flush().wait().unwrap();
        engine.checkpoint().unwrap();
        engine
    }

    #[test]
    fn partly_dead_segments_are_copied_only_past_the_amplification_limit() {
        let dir = tempfile::tempdir().unwrap();
        let engine = third_live_store(dir.path());
        let before = engine.stats().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let held = engine.stats().unwrap();
        assert!(
            held.disk_bytes >= before.disk_bytes,
            "partly dead segments were copied below the limit: {before:?} -> {held:?}"
        );

        // Most sectors deleted: now over the limit, so the live ones move out.
        let mut batch = WriteBatch::new();
        for index in 64..256 {
            batch.delete(id(7, index));
        }
        engine.write(batch).wait().unwrap();
        engine.flush().wait().unwrap();
        engine.checkpoint().unwrap();
        await_reclaimed_half(&engine, &before);
        for index in 0..64 {
            let expected = if index % 3 == 0 { 1 } else { 2 };
            assert_eq!(
                engine.read(id(7, index)).wait().unwrap(),
                Some(vec![expected; 4096])
            );
        }
        assert_eq!(engine.read(id(7, 100)).wait().unwrap(), None);
        engine.shutdown().unwrap();
    }

    #[test]
    fn durable_writes_alone_need_no_fdatasync_but_wait_for_one_after_a_plain_write() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::create(small(dir.path(), 1, 1 << 20, 64 << 10), 7).unwrap();
        for index in 0..20 {
            let mut batch = WriteBatch::new();
            batch.put(id(7, index), vec![1; 4096]);
            engine.write_durable(batch).wait().unwrap();
        }
        let alone = engine.stats().unwrap();
        assert_eq!(alone.sync_rounds, 0, "{alone:?}");
        assert!(alone.dsync_chunks >= 20, "{alone:?}");
        // A plain write completed before a durable one: the durable write must
        // make it durable too, which its own RWF_DSYNC does not.
        let mut plain = WriteBatch::new();
        plain.put(id(7, 100), vec![2; 4096]);
        engine.write(plain).wait().unwrap();
        let mut durable = WriteBatch::new();
        durable.put(id(7, 101), vec![3; 4096]);
        engine.write_durable(durable).wait().unwrap();
        let after = engine.stats().unwrap();
        assert_eq!(after.sync_rounds, 1, "{after:?}");
        assert_eq!(after.dsync_chunks, alone.dsync_chunks, "{after:?}");
        // Synced again, durable writes go back to RWF_DSYNC.
        let mut again = WriteBatch::new();
        again.put(id(7, 102), vec![4; 4096]);
        engine.write_durable(again).wait().unwrap();
        assert_eq!(engine.stats().unwrap().dsync_chunks, alone.dsync_chunks + 1);
        engine.shutdown().unwrap();
        let engine = Engine::open(small(dir.path(), 1, 1 << 20, 64 << 10)).unwrap();
        for (index, expected) in [(0, 1), (19, 1), (100, 2), (101, 3), (102, 4)] {
            assert_eq!(
                engine.read(id(7, index)).wait().unwrap(),
                Some(vec![expected; 4096])
            );
        }
        engine.shutdown().unwrap();
    }

    #[test]
    fn wholly_dead_segments_do_not_count_towards_the_amplification_limit() {
        let dir = tempfile::tempdir().unwrap();
        let engine = third_live_store(dir.path());
        // Then a sequential rewrite, as of a volume: the first pass's segments die
        // whole, but no checkpoint covers them yet. Counting them, the shard holds
        // over twice its live bytes; without them, well under.
        fill_sectors(&engine, 1000..1256, 3);
        fill_sectors(&engine, 1000..1256, 4);
        engine.flush().wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let after = engine.stats().unwrap();
        assert_eq!(
            after.moved_bytes, 0,
            "partly dead segments were copied below the limit: {after:?}"
        );
        for index in 0..256 {
            let expected = if index % 3 == 0 { 1 } else { 2 };
            assert_eq!(
                engine.read(id(7, index)).wait().unwrap(),
                Some(vec![expected; 4096])
            );
            assert_eq!(
                engine.read(id(7, 1000 + index)).wait().unwrap(),
                Some(vec![4; 4096])
            );
        }
        engine.shutdown().unwrap();
    }

    #[test]
    fn the_next_segment_is_laid_out_while_the_active_one_fills() {
        let dir = tempfile::tempdir().unwrap();
        let config = small(dir.path(), 1, 4 << 20, 256 << 10);
        let engine = Engine::create(config.clone(), 1).unwrap();
        let shard_dir = crate::segment::shard_dir(dir.path(), 0);
        let spares = || {
            std::fs::read_dir(&shard_dir)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.starts_with("spare-new-"))
                .collect::<Vec<_>>()
        };
        let write = |from: u64, to: u64| {
            let mut batch = WriteBatch::new();
            for index in from..to {
                batch.put(id(5, index), vec![index as u8; 4096]);
            }
            engine.write_durable(batch).wait().unwrap();
        };
        // A quarter of the first segment: nothing is laid out yet.
        write(0, 256);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(spares().is_empty(), "laid out too early: {:?}", spares());
        // Past half: the next segment is laid out, in idle time if need be.
        write(256, 600);
        let mut laid_out = Vec::new();
        for _ in 0..100 {
            laid_out = spares();
            if !laid_out.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(laid_out.len(), 1, "no spare was laid out");
        let spare = shard_dir.join(&laid_out[0]);
        assert_eq!(std::fs::metadata(&spare).unwrap().len(), 4 << 20);
        // Filling the first segment opens the laid-out file as the second.
        write(600, 1100);
        assert!(!spare.exists(), "the laid-out spare was not used");
        assert!(crate::segment::segment_path(&shard_dir, 2).exists());
        engine.shutdown().unwrap();
        drop(engine);
        let engine = Engine::open(config).unwrap();
        for index in [0, 599, 1099] {
            assert_eq!(
                engine.read(id(5, index)).wait().unwrap(),
                Some(vec![index as u8; 4096])
            );
        }
        engine.shutdown().unwrap();
    }

    /// Appends a chunk holding a Put of `target` to the end of its shard's last
    /// segment, stamped with `log_id`.
    fn plant_chunk(dir: &std::path::Path, shards: usize, target: &SectorId, log_id: u64) {
        use crate::record::{BLOCK, ChunkBuilder, RecordHeader, RecordKind};
        use std::io::Write;
        let superblock = Superblock::load(dir).unwrap().unwrap();
        let key = KeyDeriver::new(superblock.salt).key(target);
        let shard = shard_of(&key, shards);
        let shard_dir = crate::segment::shard_dir(dir, shard);
        let last = crate::segment::list(&shard_dir)
            .unwrap()
            .last()
            .copied()
            .unwrap_or(1);
        let mut buffer = vec![0u8; BLOCK];
        let mut builder = ChunkBuilder::new(&mut buffer);
        let header = RecordHeader {
            key,
            payload_len: 5,
            kind: RecordKind::Put,
            batch: 1 << 40,
            part_len: 1,
            shards: 1 << shard,
        };
        builder.push(&header, b"forge").unwrap();
        let len = builder.finish(1 << 50, 0, log_id);
        let path = crate::segment::segment_path(&shard_dir, last);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        let size = file.metadata().unwrap().len();
        assert_eq!(size % BLOCK as u64, 0);
        file.write_all(&buffer[..len]).unwrap();
    }

    #[test]
    fn recovery_accepts_only_chunks_with_the_store_log_id() {
        let dir = tempfile::tempdir().unwrap();
        let config = small(dir.path(), 2, 1 << 20, 256 << 10);
        let engine = Engine::create(config.clone(), 1).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(id(1, 0), vec![1; 100]);
        engine.write_durable(batch).wait().unwrap();
        engine.shutdown().unwrap();
        drop(engine);
        // Remove the checkpoint so recovery scans every segment.
        std::fs::remove_file(dir.path().join(checkpoint::HEAD_FILE)).unwrap();

        plant_chunk(dir.path(), 2, &id(77, 0), 0x5eed);
        let engine = Engine::open(config.clone()).unwrap();
        assert_eq!(
            engine.read(id(77, 0)).wait().unwrap(),
            None,
            "a forged chunk was replayed"
        );
        assert_eq!(engine.read(id(1, 0)).wait().unwrap(), Some(vec![1; 100]));
        engine.shutdown().unwrap();
        drop(engine);

        // The same chunk with the store's log id is replayed: the check is what
        // kept the forged one out.
        std::fs::remove_file(dir.path().join(checkpoint::HEAD_FILE)).unwrap();
        let superblock = Superblock::load(dir.path()).unwrap().unwrap();
        plant_chunk(
            dir.path(),
            2,
            &id(78, 0),
            KeyDeriver::new(superblock.salt).log_id(),
        );
        let engine = Engine::open(config).unwrap();
        assert_eq!(
            engine.read(id(78, 0)).wait().unwrap(),
            Some(b"forge".to_vec())
        );
        engine.shutdown().unwrap();
    }
}
