//! What every sector service does around its commit step, shared by
//! [`DirectService`](crate::DirectService) and [`RaftService`](crate::RaftService):
//! the per-file cache of metadata and Merkle trees, write verification and
//! staging (a verified [`SectorBatch`] becomes plain sector puts and deletes),
//! reads, and write notifications.
//!
//! Staging turns a batch into [`SectorOp`]s, everything the engine must store:
//! the metadata, the Merkle pieces the batch dirtied, the data records, and the
//! deletes of cut records and pieces. The direct service writes them to its
//! engine; the Raft service proposes them as one log entry, so that applying an
//! entry reads nothing and is deterministic and idempotent on every member.

use crate::pieces;
use crate::service::{FileWrite, ReadAccess, SectorBatch, ServiceError};
use crate::verify;
use blocktree_core::BtPath;
use blocktree_core::encoding;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, VerifiedSignatures};
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::RevocationList;
use blocktree_engine::{Engine, EngineError, Pending, WriteBatch};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};

/// Files whose state is cached before unused entries are dropped.
const CACHED_FILES: usize = 4096;
/// Messages a subscriber may have unread before it is disconnected.
const SUBSCRIBER_BACKLOG: usize = 1 << 16;
/// Metadata in a batch from which its signatures are checked on every core.
const PARALLEL_VERIFY_MIN: usize = 8;
/// Distinct verified writecap chains remembered.
const VERIFIED_CHAINS: usize = 1024;
/// Distinct metadata remembered as verified (32 bytes and a set slot each).
const VERIFIED_METAS: usize = 16384;

/// What a generation is: its number and the directory it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationInfo {
    /// The generation number.
    pub generation: u64,
    /// The directory whose files it stores; writers' writecaps must cover it.
    pub directory: BtPath,
}

impl GenerationInfo {
    /// The text of the generation file.
    pub fn encode(&self) -> String {
        format!(
            "generation {}\ndirectory {}\n",
            self.generation, self.directory
        )
    }

    /// Parses the generation file; anything but exactly its two lines is an error.
    pub fn decode(text: &str) -> Result<GenerationInfo, String> {
        let mut generation = None;
        let mut directory = None;
        // Lines end at '\n' only: `lines()` would also eat a '\r' that belongs to a
        // path, and the file would not read back as it was written.
        for line in text.split_terminator('\n') {
            if line.chars().any(char::is_control) {
                return Err(format!("control character in line {line:?}"));
            }
            match line.split_once(' ') {
                Some(("generation", value)) => {
                    generation = Some(value.parse::<u64>().map_err(|e| e.to_string())?);
                }
                Some(("directory", value)) => {
                    directory = Some(value.parse::<BtPath>().map_err(|e| e.to_string())?);
                }
                _ => return Err(format!("unexpected line {line:?}")),
            }
        }
        match (generation, directory) {
            (Some(generation), Some(directory)) => Ok(GenerationInfo {
                generation,
                directory,
            }),
            _ => Err("missing generation or directory".into()),
        }
    }
}

/// One sector to store (`data: Some`) or delete (`data: None`), in the
/// generation of the service that applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectorOp {
    /// The file.
    pub inode: u64,
    /// The sector of the file.
    pub sector: SectorKind,
    /// The new contents, or `None` to delete the sector. Shared, not copied,
    /// by the log's cache, the entry the state machine applies and the
    /// engine batch (the same encoding as a byte string).
    pub data: Option<Bytes>,
}

/// A verified batch as the sector puts and deletes that apply it, and the
/// sector ids each file's subscribers hear of once it is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBatch {
    /// What to store and delete, in order.
    pub ops: Vec<SectorOp>,
    /// Per file, the sector ids written (for write notifications).
    pub written: Vec<(u64, Vec<SectorKind>)>,
}

impl StagedBatch {
    /// The engine batch that applies this one in `generation`.
    pub fn to_engine_batch(&self, generation: u64, batch: &mut WriteBatch) {
        for op in &self.ops {
            let id = SectorId {
                generation,
                inode: op.inode,
                sector: op.sector,
            };
            match &op.data {
                Some(data) => batch.put(id, data.clone()),
                None => batch.delete(id),
            };
        }
    }

    /// [`Self::to_engine_batch`], consuming the batch.
    pub fn into_engine_batch(self, generation: u64, batch: &mut WriteBatch) {
        for op in self.ops {
            let id = SectorId {
                generation,
                inode: op.inode,
                sector: op.sector,
            };
            match op.data {
                Some(data) => batch.put(id, data),
                None => batch.delete(id),
            };
        }
    }

    fn put(&mut self, inode: u64, sector: SectorKind, data: Vec<u8>) {
        self.ops.push(SectorOp {
            inode,
            sector,
            data: Some(Bytes::from(data)),
        });
    }

    fn delete(&mut self, inode: u64, sector: SectorKind) {
        self.ops.push(SectorOp {
            inode,
            sector,
            data: None,
        });
    }
}

/// What the service remembers about one file.
#[derive(Default)]
pub(crate) struct FileState {
    /// The stored metadata; `None` when not loaded (or the file does not exist).
    meta: Option<FileMeta>,
    /// The tree over the stored records; `None` when not loaded.
    tree: Option<MerkleTree>,
}

/// A cached file: its state behind its lock, and a flag the Raft state machine
/// raises (without taking the lock, which a writer may hold while it waits for
/// its own entry to apply) when an entry from elsewhere changed the file.
///
/// A pipelining writer ([`SectorStore::write_pipelined`]) releases the lock
/// once its batch has its place in the log, before it is applied: the cached
/// state is then ahead of the engine by the batches counted in `proposed`.
/// Writers stage on top of that state; readers, and writers that must load
/// the state from the engine, wait for the count to reach zero. The count has
/// a lock of its own, so a batch's answer never waits for the state's lock.
#[derive(Default)]
pub(crate) struct FileEntry {
    stale: AtomicBool,
    state: Mutex<FileState>,
    /// Batches proposed and not yet answered, and the term of the last one.
    proposed: Mutex<(u32, u64)>,
    answered: Condvar,
}

impl FileEntry {
    /// Locks the file's state, dropping what it cached if it went stale.
    fn lock(&self) -> MutexGuard<'_, FileState> {
        let mut state = lock(&self.state);
        self.drop_if_stale(&mut state);
        state
    }

    fn drop_if_stale(&self, state: &mut FileState) {
        if self.stale.swap(false, Ordering::AcqRel) {
            state.meta = None;
            state.tree = None;
        }
    }

    /// Locks the file's state once it matches the engine's: no batch of it
    /// waits in the log. Holding the state's lock meanwhile keeps new batches
    /// out, so a reader waits at most for the ones already proposed.
    fn lock_settled(&self) -> MutexGuard<'_, FileState> {
        let mut state = self.lock();
        self.wait_answered();
        self.drop_if_stale(&mut state);
        state
    }

    /// Returns once every proposed batch of the file has its answer.
    fn wait_answered(&self) {
        let mut proposed = lock(&self.proposed);
        while proposed.0 > 0 {
            proposed = self
                .answered
                .wait(proposed)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Batches proposed and not yet answered, and the term of the last one.
    fn proposed(&self) -> (u32, u64) {
        *lock(&self.proposed)
    }

    /// A batch of the file has its place in the log of `term`.
    fn propose(&self, term: u64) {
        let mut proposed = lock(&self.proposed);
        *proposed = (proposed.0 + 1, term);
    }

    /// A proposed batch has its answer; a failed one leaves the cached state
    /// unknown (it may hold the batch, and later batches staged on it).
    fn answer(&self, failed: bool) {
        if failed {
            self.stale.store(true, Ordering::Release);
        }
        let mut proposed = lock(&self.proposed);
        proposed.0 = proposed.0.saturating_sub(1);
        self.answered.notify_all();
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves state that is still consistent for our
    // uses (caches are reloaded on error), so poisoning is not fatal.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The state shared by a sector service's API and its commit step.
pub(crate) struct SectorStore {
    pub(crate) info: GenerationInfo,
    /// The engine of the generation's sectors; replaced when a Raft member
    /// installs a snapshot.
    engine: RwLock<Engine>,
    revoked: RwLock<RevocationList>,
    files: Mutex<HashMap<u64, Arc<FileEntry>>>,
    subscribers: Mutex<HashMap<u64, Vec<Sender<SectorId>>>>,
    /// Writecap chains whose signatures verified, by their encoding: a writer
    /// signs many batches under one writecap, and its chain's signatures need
    /// checking once. Expiry, revocation and the subject are checked every time.
    verified_signatures: VerifiedSignatures,
    /// Where inodes changed by writes made elsewhere are announced, once a
    /// caching layer asked ([`SectorStore::watch_foreign_changes`]).
    foreign: OnceLock<Sender<u64>>,
}

/// Announced on the channel of [`SectorStore::watch_foreign_changes`] when
/// every file may have changed (a snapshot replaced the whole store).
pub const ALL_FILES_CHANGED: u64 = u64::MAX;

impl SectorStore {
    pub(crate) fn new(engine: Engine, info: GenerationInfo) -> SectorStore {
        SectorStore {
            info,
            engine: RwLock::new(engine),
            revoked: RwLock::new(RevocationList::new()),
            files: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            verified_signatures: VerifiedSignatures::new(VERIFIED_CHAINS, VERIFIED_METAS),
            foreign: OnceLock::new(),
        }
    }

    /// The inodes that writes made elsewhere (entries another member or process
    /// proposed) change from now on, as they are applied; [`ALL_FILES_CHANGED`]
    /// when a snapshot replaced the store. Only the first caller is served.
    pub(crate) fn watch_foreign_changes(&self) -> Option<Receiver<u64>> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        self.foreign.set(sender).ok().map(|()| receiver)
    }

    /// Announces that `inode` changed by a write made elsewhere.
    pub(crate) fn announce_foreign(&self, inode: u64) {
        if let Some(sender) = self.foreign.get() {
            // The receiver gone means nothing caches files any more.
            let _ = sender.send(inode);
        }
    }

    /// The engine now in use (a cheap clone).
    pub(crate) fn engine(&self) -> Engine {
        self.engine
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Puts `engine` in place of the current one and forgets every cached file;
    /// returns the old engine.
    pub(crate) fn replace_engine(&self, engine: Engine) -> Engine {
        let mut slot = self
            .engine
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = std::mem::replace(&mut *slot, engine);
        lock(&self.files).clear();
        self.announce_foreign(ALL_FILES_CHANGED);
        old
    }

    pub(crate) fn revoke(&self, principal: blocktree_core::PrincipalId) {
        self.revoked
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .revoke(principal);
    }

    pub(crate) fn id(&self, inode: u64, sector: SectorKind) -> SectorId {
        SectorId {
            generation: self.info.generation,
            inode,
            sector,
        }
    }

    fn state(&self, inode: u64) -> Arc<FileEntry> {
        let mut files = lock(&self.files);
        if files.len() >= CACHED_FILES && !files.contains_key(&inode) {
            files.retain(|_, state| Arc::strong_count(state) > 1);
        }
        files.entry(inode).or_default().clone()
    }

    /// Drops the cached state of `inode`: the next use reloads it from the engine.
    pub(crate) fn forget(&self, inode: u64) {
        lock(&self.files).remove(&inode);
    }

    /// Marks the cached state of `inode` stale (an entry proposed elsewhere
    /// changed it): the next user reloads it from the engine.
    pub(crate) fn mark_stale(&self, inode: u64) {
        if let Some(entry) = lock(&self.files).get(&inode) {
            entry.stale.store(true, Ordering::Release);
        }
        self.announce_foreign(inode);
    }

    /// The stored metadata of `inode`, from the cache or the engine.
    fn load_meta(
        &self,
        engine: &Engine,
        inode: u64,
        state: &mut FileState,
    ) -> Result<Option<FileMeta>, ServiceError> {
        if let Some(meta) = &state.meta {
            return Ok(Some(meta.clone()));
        }
        let id = self.id(inode, SectorKind::Meta);
        let Some(bytes) = engine.read(id).wait()? else {
            return Ok(None);
        };
        let meta: FileMeta = encoding::decode(&bytes).map_err(|error| ServiceError::Corrupt {
            id,
            reason: error.to_string(),
        })?;
        state.meta = Some(meta.clone());
        Ok(Some(meta))
    }

    /// The tree over `meta`'s file, rebuilt from its pieces and checked against the
    /// signed root.
    fn load_tree(&self, engine: &Engine, meta: &FileMeta) -> Result<MerkleTree, ServiceError> {
        let body = meta.body();
        let inode = body.ids.inode;
        let algorithm = body.hash_algorithm;
        let count = pieces::piece_count(algorithm, body.sector_count);
        let pending: Vec<(u64, Pending<Option<Vec<u8>>>)> = (0..count)
            .map(|piece| {
                (
                    piece,
                    engine.read(self.id(inode, SectorKind::Merkle(piece))),
                )
            })
            .collect();
        let mut leaves = Vec::with_capacity(body.sector_count as usize * algorithm.output_len());
        for (piece, read) in pending {
            let id = self.id(inode, SectorKind::Merkle(piece));
            let bytes = read.wait()?.ok_or_else(|| ServiceError::Corrupt {
                id,
                reason: "the Merkle piece is missing".into(),
            })?;
            if bytes.len() != pieces::expected_piece_len(algorithm, body.sector_count, piece) {
                return Err(ServiceError::Corrupt {
                    id,
                    reason: format!("the Merkle piece has {} bytes", bytes.len()),
                });
            }
            leaves.extend_from_slice(&bytes);
        }
        let tree = MerkleTree::from_leaf_bytes(algorithm, leaves)?;
        if tree.root() != body.merkle_root {
            return Err(ServiceError::Corrupt {
                id: self.id(inode, SectorKind::Merkle(0)),
                reason: "the stored Merkle leaves do not hash to the signed root".into(),
            });
        }
        Ok(tree)
    }

    fn tree<'s>(
        &self,
        engine: &Engine,
        meta: &FileMeta,
        state: &'s mut FileState,
    ) -> Result<&'s mut MerkleTree, ServiceError> {
        if state.tree.is_none() {
            state.tree = Some(self.load_tree(engine, meta)?);
        }
        state
            .tree
            .as_mut()
            .ok_or_else(|| ServiceError::Invalid("tree not loaded".into()))
    }

    /// Verifies `meta` (steps 1 and 2), checking the signatures of a writecap
    /// chain only the first time the service sees it.
    fn verify_meta(
        &self,
        meta: &FileMeta,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<(), ServiceError> {
        let directory = &self.info.directory;
        verify::verify_meta_with(meta, self.info.generation, |meta| {
            meta.verify_cached(&self.verified_signatures, directory, now, revoked)
        })?;
        Ok(())
    }

    /// Adds one file's new state to `staged` after verifying it; returns the
    /// sector ids written, for the subscribers.
    fn stage_file(
        &self,
        engine: &Engine,
        write: FileWrite,
        state: &mut FileState,
        staged: &mut StagedBatch,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<Vec<SectorKind>, ServiceError> {
        let body = write.meta.body();
        let inode = body.ids.inode;
        self.verify_meta(&write.meta, now, revoked)?;
        let old = self.load_meta(engine, inode, state)?;
        if let Some(old) = &old {
            verify::check_immutable(old, &write.meta)?;
        }
        let algorithm = body.hash_algorithm;
        let hole = MerkleTree::leaf_hash(algorithm, &[]);
        let (old_count, cut): (u64, Vec<u64>) = match &old {
            Some(old) => {
                let tree = self.tree(engine, old, state)?;
                let old_count = tree.leaf_count();
                // Stored records past the new end are deleted; holes have none.
                let cut = (body.sector_count..old_count)
                    .filter(|&index| tree.leaf(index) != Some(hole))
                    .collect();
                (old_count, cut)
            }
            None => {
                state.tree = Some(MerkleTree::new(algorithm));
                (0, Vec::new())
            }
        };
        let tree = state
            .tree
            .as_mut()
            .ok_or_else(|| ServiceError::Invalid("tree not loaded".into()))?;
        let dirty = match verify::apply_write(tree, &write) {
            Ok(dirty) => dirty,
            Err(error) => {
                state.tree = None;
                return Err(error);
            }
        };
        let mut written = Vec::with_capacity(write.data.len() + dirty.len() + 1);
        staged.put(inode, SectorKind::Meta, encoding::encode(&write.meta));
        written.push(SectorKind::Meta);
        for piece in &dirty {
            staged.put(
                inode,
                SectorKind::Merkle(*piece),
                pieces::piece_bytes(tree, *piece),
            );
            written.push(SectorKind::Merkle(*piece));
        }
        let old_pieces = pieces::piece_count(algorithm, old_count);
        for piece in pieces::piece_count(algorithm, body.sector_count)..old_pieces {
            staged.delete(inode, SectorKind::Merkle(piece));
        }
        for index in write.holes.iter().chain(&cut) {
            staged.delete(inode, SectorKind::Data(*index));
            written.push(SectorKind::Data(*index));
        }
        for (index, record) in write.data {
            staged.put(inode, SectorKind::Data(index), record);
            written.push(SectorKind::Data(index));
        }
        Ok(written)
    }

    fn stage_remove(
        &self,
        engine: &Engine,
        inode: u64,
        state: &mut FileState,
        staged: &mut StagedBatch,
    ) -> Result<(), ServiceError> {
        let Some(meta) = self.load_meta(engine, inode, state)? else {
            return Err(ServiceError::NotFound(inode));
        };
        let algorithm = meta.body().hash_algorithm;
        let hole = MerkleTree::leaf_hash(algorithm, &[]);
        let count = meta.body().sector_count;
        let tree = self.tree(engine, &meta, state)?;
        for index in 0..count {
            if tree.leaf(index) != Some(hole) {
                staged.delete(inode, SectorKind::Data(index));
            }
        }
        for piece in 0..pieces::piece_count(algorithm, count) {
            staged.delete(inode, SectorKind::Merkle(piece));
        }
        staged.delete(inode, SectorKind::Meta);
        Ok(())
    }

    /// Tells the subscribers of each file of `written` which of its sectors changed.
    pub(crate) fn notify(&self, written: &[(u64, Vec<SectorKind>)]) {
        let mut subscribers = lock(&self.subscribers);
        for (inode, sectors) in written {
            let Some(list) = subscribers.get_mut(inode) else {
                continue;
            };
            list.retain(|sender| {
                sectors
                    .iter()
                    .all(|sector| match sender.try_send(self.id(*inode, *sector)) {
                        Ok(()) => true,
                        Err(TrySendError::Full(_)) => {
                            tracing::warn!(
                                inode,
                                "a write subscriber fell behind; disconnecting it"
                            );
                            false
                        }
                        Err(TrySendError::Disconnected(_)) => false,
                    })
            });
            if list.is_empty() {
                subscribers.remove(inode);
            }
        }
    }

    /// Verifies `batch` and stages it while holding its files' locks, hands the
    /// staged batch to `commit` (which returns once it is applied), then updates
    /// the cache. Returns what `commit` returned.
    pub(crate) fn write_with<T>(
        &self,
        batch: SectorBatch,
        commit: impl FnOnce(StagedBatch) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        self.write_pipelined(batch, 0, |staged, _| commit(staged), &mut || {}, Ok)
    }

    /// Verifies `batch` and stages it while holding its files' locks, on top of
    /// any batches of the same files still on their way through the log, and
    /// hands it to `submit`, which fixes its place in the log and returns what
    /// to wait on. The locks are released then (`queued` is called), so the
    /// files' next batch can be staged while this one is replicated and
    /// applied; `wait` returns once it is applied.
    ///
    /// `term` is the proposer's current term (0 without Raft). A batch staged
    /// on another not yet applied is handed to `submit` with that term, which
    /// both were proposed in: the state machine applies it only if its entry
    /// is of that term. In one term the leader's log keeps the order of its
    /// proposals, so such a batch is applied only after its predecessor. If
    /// the predecessor was lost (refused, or dropped with its term), the batch
    /// is refused too, instead of storing a tree that vouches for records
    /// never written.
    pub(crate) fn write_pipelined<W, T>(
        &self,
        batch: SectorBatch,
        term: u64,
        submit: impl FnOnce(StagedBatch, Option<u64>) -> Result<W, ServiceError>,
        queued: &mut dyn FnMut(),
        wait: impl FnOnce(W) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut inodes = BTreeSet::new();
        for inode in batch
            .files
            .iter()
            .map(|file| file.meta.body().ids.inode)
            .chain(batch.removes.iter().map(|meta| meta.body().ids.inode))
        {
            if !inodes.insert(inode) {
                queued();
                return Err(ServiceError::Invalid(format!(
                    "inode {inode} appears twice in one batch"
                )));
            }
        }
        let engine = self.engine();
        // Locks in inode order, so two batches over the same files cannot
        // deadlock. Waiting for a file's proposed batches while holding other
        // files' locks cannot either: their answers take no lock of a file.
        let states: Vec<(u64, Arc<FileEntry>)> = inodes
            .iter()
            .map(|&inode| (inode, self.state(inode)))
            .collect();
        let mut guards: HashMap<u64, MutexGuard<'_, FileState>> = HashMap::new();
        let mut in_term = None;
        for (inode, entry) in &states {
            let mut state = entry.lock();
            let (proposed, last_term) = entry.proposed();
            if proposed > 0 {
                if state.meta.is_some() && state.tree.is_some() && last_term == term {
                    // Staged on batches still on their way: applied after them.
                    in_term = Some(term);
                } else {
                    // Loading needs what the engine holds once they applied;
                    // a batch of another term would not be ordered after them.
                    drop(state);
                    state = entry.lock_settled();
                }
            }
            guards.insert(*inode, state);
        }
        let now = Timestamp::now();
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut staged = StagedBatch::default();
        let SectorBatch { files, removes } = batch;
        let metas: Vec<FileMeta> = files.iter().map(|file| file.meta.clone()).collect();
        // An ECDSA verification per file is most of staging a batch of small
        // files (a commit of namespace changes): run them on every core first.
        // The staging pass below then finds them remembered and checks only
        // what changes with time; one that failed fails there, with its error.
        if metas.len() + removes.len() >= PARALLEL_VERIFY_MIN {
            let all: Vec<&FileMeta> = metas.iter().chain(&removes).collect();
            pieces::parallel_map(&all, usize::MAX, |meta| {
                let _ = self.verify_meta(meta, now, &revoked);
            });
        }
        let stage = || -> Result<(), ServiceError> {
            for file in files {
                let inode = file.meta.body().ids.inode;
                let state = guards
                    .get_mut(&inode)
                    .ok_or(ServiceError::NotFound(inode))?;
                let sectors = self.stage_file(&engine, file, state, &mut staged, now, &revoked)?;
                staged.written.push((inode, sectors));
            }
            for tombstone in &removes {
                let inode = tombstone.body().ids.inode;
                self.verify_meta(tombstone, now, &revoked)?;
                let state = guards
                    .get_mut(&inode)
                    .ok_or(ServiceError::NotFound(inode))?;
                self.stage_remove(&engine, inode, state, &mut staged)?;
                staged.written.push((inode, vec![SectorKind::Meta]));
            }
            Ok(())
        };
        let submitted = stage().and_then(|()| submit(staged, in_term));
        let waiting = match submitted {
            Ok(waiting) => waiting,
            Err(error) => {
                // Nothing was proposed; cached trees may hold the refused state.
                for state in guards.values_mut() {
                    state.meta = None;
                    state.tree = None;
                }
                drop(guards);
                queued();
                return Err(error);
            }
        };
        // The cache runs ahead of the engine from here until the answer.
        for meta in metas {
            let inode = meta.body().ids.inode;
            if let Some(state) = guards.get_mut(&inode) {
                state.meta = Some(meta);
            }
        }
        let removed: Vec<u64> = removes.iter().map(|meta| meta.body().ids.inode).collect();
        for inode in &removed {
            if let Some(state) = guards.get_mut(inode) {
                state.meta = None;
                state.tree = None;
            }
        }
        for (_, entry) in &states {
            entry.propose(term);
        }
        drop(guards);
        queued();
        // Whatever `wait` does, the files' count must come down, or their
        // readers would wait forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait(waiting)))
            .unwrap_or_else(|_| Err(ServiceError::Invalid("waiting for a batch panicked".into())));
        for (_, entry) in &states {
            entry.answer(result.is_err());
        }
        if result.is_ok() {
            for inode in &removed {
                self.forget(*inode);
            }
        }
        result
    }

    pub(crate) fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError> {
        let engine = self.engine();
        let entry = self.state(inode);
        let mut state = entry.lock_settled();
        self.load_meta(&engine, inode, &mut state)
    }

    pub(crate) fn read_merkle_piece(
        &self,
        inode: u64,
        piece: u64,
    ) -> Result<Vec<u8>, ServiceError> {
        let id = self.id(inode, SectorKind::Merkle(piece));
        Ok(self.engine().read(id).wait()?.unwrap_or_default())
    }

    pub(crate) fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        let meta = self
            .read_meta(inode)?
            .ok_or(ServiceError::NotFound(inode))?;
        if meta.body().keys.is_some() {
            verify::authorize_read(self.info.generation, inode, access, |inode| {
                self.read_meta(inode)
            })?;
        }
        let count = meta.body().sector_count;
        if let Some(index) = indices.iter().find(|&&index| index >= count) {
            return Err(ServiceError::Invalid(format!(
                "data sector {index} is past the end of inode {inode} ({count} sectors)"
            )));
        }
        let ids: Vec<SectorId> = indices
            .iter()
            .map(|index| self.id(inode, SectorKind::Data(*index)))
            .collect();
        self.engine()
            .read_many(&ids)
            .into_iter()
            .map(|read| read.wait().map_err(ServiceError::from))
            .collect()
    }

    pub(crate) fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        let (sender, receiver) = crossbeam_channel::bounded(SUBSCRIBER_BACKLOG);
        lock(&self.subscribers)
            .entry(inode)
            .or_default()
            .push(sender);
        receiver
    }
}

/// Bytes free and in total on the file system holding `dir`, for statfs.
pub(crate) fn space(dir: &Path) -> Result<(u64, u64), ServiceError> {
    let stat = rustix::fs::statvfs(dir).map_err(|errno| EngineError::Io {
        context: "statvfs of",
        path: dir.to_path_buf(),
        source: errno.into(),
    })?;
    Ok((
        stat.f_bavail.saturating_mul(stat.f_frsize),
        stat.f_blocks.saturating_mul(stat.f_frsize),
    ))
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file.
pub(crate) fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
    let io = |context: &'static str| {
        let path = path.to_path_buf();
        move |source| EngineError::Io {
            context,
            path,
            source,
        }
    };
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, bytes).map_err(io("writing"))?;
    std::fs::File::open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(io("syncing"))?;
    std::fs::rename(&temporary, path).map_err(io("renaming"))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing the directory of"))?;
    }
    Ok(())
}
