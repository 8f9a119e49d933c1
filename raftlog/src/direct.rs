//! [`DirectService`]: the sector service of one generation on a local engine,
//! without replication. Every write is verified ([`crate::verify`]) and then
//! applied to the engine as one atomic engine batch; issue #7 puts a Raft append
//! between the two.
//!
//! The service keeps, per recently used file, its metadata and its Merkle tree (as
//! the original design's sector service does), so a batch hashes only its new
//! records and the dirty path, never the whole file.

use crate::pieces;
use crate::service::{FileWrite, ReadAccess, SectorBatch, SectorService, ServiceError};
use crate::verify;
use blocktree_core::encoding;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::RevocationList;
use blocktree_core::{BtPath, PrincipalId};
use blocktree_engine::{Engine, EngineConfig, EngineError, Pending, WriteBatch};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Files whose state is cached before unused entries are dropped.
const CACHED_FILES: usize = 4096;
/// Messages a subscriber may have unread before it is disconnected.
const SUBSCRIBER_BACKLOG: usize = 1 << 16;
/// Inode numbers reserved per superblock write.
const INODE_RESERVATION: u64 = 1024;
/// Distinct verified writecap chains remembered.
const VERIFIED_CHAINS: usize = 1024;
/// Name of the file that records the generation and its directory.
const INFO_FILE: &str = "generation";
/// Name of the engine's directory.
const ENGINE_DIR: &str = "engine";

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

/// What the service remembers about one file.
#[derive(Default)]
struct FileState {
    /// The stored metadata; `None` when not loaded (or the file does not exist).
    meta: Option<FileMeta>,
    /// The tree over the stored records; `None` when not loaded.
    tree: Option<MerkleTree>,
}

/// The sector service of one generation on a local engine.
pub struct DirectService {
    engine: Engine,
    info: GenerationInfo,
    dir: PathBuf,
    revoked: RwLock<RevocationList>,
    files: Mutex<HashMap<u64, Arc<Mutex<FileState>>>>,
    subscribers: Mutex<HashMap<u64, Vec<Sender<SectorId>>>>,
    /// Inode numbers reserved in the superblock and not yet handed out.
    inodes: Mutex<std::ops::Range<u64>>,
    /// Writecap chains whose signatures verified, by their encoding: a writer
    /// signs many batches under one writecap, and its chain's signatures need
    /// checking once. Expiry, revocation and the subject are checked every time.
    verified_chains: Mutex<HashSet<Vec<u8>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves state that is still consistent for our
    // uses (caches are reloaded on error), so poisoning is not fatal.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DirectService {
    /// Creates a generation in the empty (or missing) directory `dir`.
    pub fn create(
        dir: &Path,
        info: GenerationInfo,
        engine: impl FnOnce(PathBuf) -> EngineConfig,
    ) -> Result<DirectService, ServiceError> {
        std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
            context: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        let info_path = dir.join(INFO_FILE);
        if info.directory.to_string().chars().any(char::is_control) {
            return Err(ServiceError::Invalid(format!(
                "the directory {:?} contains a control character",
                info.directory.to_string()
            )));
        }
        if info_path.exists() {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a generation",
                dir.display()
            )));
        }
        let engine = Engine::create(engine(dir.join(ENGINE_DIR)), info.generation)?;
        write_file_durably(&info_path, info.encode().as_bytes())?;
        Ok(DirectService::assemble(engine, info, dir))
    }

    /// Opens the generation in `dir`.
    pub fn open(
        dir: &Path,
        engine: impl FnOnce(PathBuf) -> EngineConfig,
    ) -> Result<DirectService, ServiceError> {
        let info_path = dir.join(INFO_FILE);
        let text = std::fs::read_to_string(&info_path).map_err(|source| EngineError::Io {
            context: "reading",
            path: info_path.clone(),
            source,
        })?;
        let info = GenerationInfo::decode(&text).map_err(|reason| EngineError::Damaged {
            path: info_path.clone(),
            reason,
        })?;
        let engine = Engine::open(engine(dir.join(ENGINE_DIR)))?;
        if engine.generation() != info.generation {
            return Err(ServiceError::Invalid(format!(
                "{} names generation {} but its engine stores {}",
                info_path.display(),
                info.generation,
                engine.generation()
            )));
        }
        Ok(DirectService::assemble(engine, info, dir))
    }

    /// True if `dir` holds a generation.
    pub fn exists(dir: &Path) -> bool {
        dir.join(INFO_FILE).exists()
    }

    fn assemble(engine: Engine, info: GenerationInfo, dir: &Path) -> DirectService {
        DirectService {
            engine,
            info,
            dir: dir.to_path_buf(),
            revoked: RwLock::new(RevocationList::new()),
            files: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            inodes: Mutex::new(0..0),
            verified_chains: Mutex::new(HashSet::new()),
        }
    }

    /// Refuses writes signed under `principal`'s authority from now on.
    pub fn revoke(&self, principal: PrincipalId) {
        self.revoked
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .revoke(principal);
    }

    /// The engine underneath (statistics, checkpoints, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn id(&self, inode: u64, sector: SectorKind) -> SectorId {
        SectorId {
            generation: self.info.generation,
            inode,
            sector,
        }
    }

    fn state(&self, inode: u64) -> Arc<Mutex<FileState>> {
        let mut files = lock(&self.files);
        if files.len() >= CACHED_FILES && !files.contains_key(&inode) {
            files.retain(|_, state| Arc::strong_count(state) > 1);
        }
        files.entry(inode).or_default().clone()
    }

    fn forget(&self, inode: u64) {
        lock(&self.files).remove(&inode);
    }

    /// The stored metadata of `inode`, from the cache or the engine.
    fn load_meta(
        &self,
        inode: u64,
        state: &mut FileState,
    ) -> Result<Option<FileMeta>, ServiceError> {
        if let Some(meta) = &state.meta {
            return Ok(Some(meta.clone()));
        }
        let id = self.id(inode, SectorKind::Meta);
        let Some(bytes) = self.engine.read(id).wait()? else {
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
    fn load_tree(&self, meta: &FileMeta) -> Result<MerkleTree, ServiceError> {
        let body = meta.body();
        let inode = body.ids.inode;
        let algorithm = body.hash_algorithm;
        let count = pieces::piece_count(algorithm, body.sector_count);
        let pending: Vec<(u64, Pending<Option<Vec<u8>>>)> = (0..count)
            .map(|piece| {
                (
                    piece,
                    self.engine.read(self.id(inode, SectorKind::Merkle(piece))),
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
        meta: &FileMeta,
        state: &'s mut FileState,
    ) -> Result<&'s mut MerkleTree, ServiceError> {
        if state.tree.is_none() {
            state.tree = Some(self.load_tree(meta)?);
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
        let chain = encoding::encode(&meta.body().writecap);
        let known = lock(&self.verified_chains).contains(&chain);
        let directory = &self.info.directory;
        verify::verify_meta_with(meta, self.info.generation, |meta| {
            if known {
                meta.verify_known_chain(directory, now, revoked)
            } else {
                meta.verify(directory, now, revoked)
            }
        })?;
        if !known {
            let mut chains = lock(&self.verified_chains);
            if chains.len() >= VERIFIED_CHAINS {
                chains.clear();
            }
            chains.insert(chain);
        }
        Ok(())
    }

    /// Adds one file's new state to `engine_batch` after verifying it; returns the
    /// sector ids written, for the subscribers.
    fn stage_file(
        &self,
        write: FileWrite,
        state: &mut FileState,
        engine_batch: &mut WriteBatch,
        now: Timestamp,
        revoked: &RevocationList,
    ) -> Result<Vec<SectorId>, ServiceError> {
        let body = write.meta.body();
        let inode = body.ids.inode;
        self.verify_meta(&write.meta, now, revoked)?;
        let old = self.load_meta(inode, state)?;
        if let Some(old) = &old {
            verify::check_immutable(old, &write.meta)?;
        }
        let algorithm = body.hash_algorithm;
        let hole = MerkleTree::leaf_hash(algorithm, &[]);
        let (old_count, cut): (u64, Vec<u64>) = match &old {
            Some(old) => {
                let tree = self.tree(old, state)?;
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
        let meta_id = self.id(inode, SectorKind::Meta);
        engine_batch.put(meta_id, encoding::encode(&write.meta));
        written.push(meta_id);
        for piece in &dirty {
            let id = self.id(inode, SectorKind::Merkle(*piece));
            engine_batch.put(id, pieces::piece_bytes(tree, *piece));
            written.push(id);
        }
        let old_pieces = pieces::piece_count(algorithm, old_count);
        for piece in pieces::piece_count(algorithm, body.sector_count)..old_pieces {
            engine_batch.delete(self.id(inode, SectorKind::Merkle(piece)));
        }
        for index in write.holes.iter().chain(&cut) {
            let id = self.id(inode, SectorKind::Data(*index));
            engine_batch.delete(id);
            written.push(id);
        }
        for (index, record) in write.data {
            let id = self.id(inode, SectorKind::Data(index));
            engine_batch.put(id, record);
            written.push(id);
        }
        Ok(written)
    }

    fn stage_remove(
        &self,
        inode: u64,
        state: &mut FileState,
        engine_batch: &mut WriteBatch,
    ) -> Result<(), ServiceError> {
        let Some(meta) = self.load_meta(inode, state)? else {
            return Err(ServiceError::NotFound(inode));
        };
        let algorithm = meta.body().hash_algorithm;
        let hole = MerkleTree::leaf_hash(algorithm, &[]);
        let count = meta.body().sector_count;
        let tree = self.tree(&meta, state)?;
        for index in 0..count {
            if tree.leaf(index) != Some(hole) {
                engine_batch.delete(self.id(inode, SectorKind::Data(index)));
            }
        }
        for piece in 0..pieces::piece_count(algorithm, count) {
            engine_batch.delete(self.id(inode, SectorKind::Merkle(piece)));
        }
        engine_batch.delete(self.id(inode, SectorKind::Meta));
        Ok(())
    }

    fn notify(&self, inode: u64, written: &[SectorId]) {
        let mut subscribers = lock(&self.subscribers);
        let Some(list) = subscribers.get_mut(&inode) else {
            return;
        };
        list.retain(|sender| {
            written.iter().all(|id| match sender.try_send(*id) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(inode, "a write subscriber fell behind; disconnecting it");
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            })
        });
        if list.is_empty() {
            subscribers.remove(&inode);
        }
    }
}

fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), ServiceError> {
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

impl SectorService for DirectService {
    fn generation(&self) -> u64 {
        self.info.generation
    }

    fn directory(&self) -> &BtPath {
        &self.info.directory
    }

    fn allocate_inode(&self) -> Result<u64, ServiceError> {
        let mut reserved = lock(&self.inodes);
        if reserved.is_empty() {
            *reserved = self.engine.allocate_inodes(INODE_RESERVATION)?;
        }
        reserved
            .next()
            .ok_or_else(|| ServiceError::Invalid("inode reservation empty".into()))
    }

    fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError> {
        let state = self.state(inode);
        let mut state = lock(&state);
        self.load_meta(inode, &mut state)
    }

    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError> {
        let id = self.id(inode, SectorKind::Merkle(piece));
        Ok(self.engine.read(id).wait()?.unwrap_or_default())
    }

    fn read_data(
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
        let pending: Vec<_> = indices
            .iter()
            .map(|index| self.engine.read(self.id(inode, SectorKind::Data(*index))))
            .collect();
        pending
            .into_iter()
            .map(|read| read.wait().map_err(ServiceError::from))
            .collect()
    }

    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        let mut inodes = BTreeSet::new();
        for inode in batch
            .files
            .iter()
            .map(|file| file.meta.body().ids.inode)
            .chain(batch.removes.iter().map(|meta| meta.body().ids.inode))
        {
            if !inodes.insert(inode) {
                return Err(ServiceError::Invalid(format!(
                    "inode {inode} appears twice in one batch"
                )));
            }
        }
        // Locks in inode order, so two batches over the same files cannot deadlock.
        let states: Vec<(u64, Arc<Mutex<FileState>>)> = inodes
            .iter()
            .map(|&inode| (inode, self.state(inode)))
            .collect();
        let mut guards: HashMap<u64, MutexGuard<'_, FileState>> = states
            .iter()
            .map(|(inode, state)| (*inode, lock(state)))
            .collect();
        let now = Timestamp::now();
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut engine_batch = WriteBatch::new();
        let mut written = Vec::new();
        let SectorBatch { files, removes } = batch;
        let metas: Vec<FileMeta> = files.iter().map(|file| file.meta.clone()).collect();
        let staged = || -> Result<(), ServiceError> {
            for file in files {
                let inode = file.meta.body().ids.inode;
                let state = guards
                    .get_mut(&inode)
                    .ok_or(ServiceError::NotFound(inode))?;
                let ids = self.stage_file(file, state, &mut engine_batch, now, &revoked)?;
                written.push((inode, ids));
            }
            for tombstone in &removes {
                let inode = tombstone.body().ids.inode;
                self.verify_meta(tombstone, now, &revoked)?;
                let state = guards
                    .get_mut(&inode)
                    .ok_or(ServiceError::NotFound(inode))?;
                self.stage_remove(inode, state, &mut engine_batch)?;
                written.push((inode, vec![self.id(inode, SectorKind::Meta)]));
            }
            Ok(())
        };
        let result = staged().and_then(|()| Ok(self.engine.write(engine_batch).wait()?));
        match result {
            Ok(()) => {
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
                drop(guards);
                for inode in &removed {
                    self.forget(*inode);
                }
                for (inode, ids) in &written {
                    self.notify(*inode, ids);
                }
                Ok(())
            }
            Err(error) => {
                // Nothing was stored; cached trees may hold the refused state.
                for state in guards.values_mut() {
                    state.meta = None;
                    state.tree = None;
                }
                Err(error)
            }
        }
    }

    fn flush(&self) -> Result<(), ServiceError> {
        Ok(self.engine.flush().wait()?)
    }

    fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        let (sender, receiver) = crossbeam_channel::bounded(SUBSCRIBER_BACKLOG);
        lock(&self.subscribers)
            .entry(inode)
            .or_default()
            .push(sender);
        receiver
    }

    fn space(&self) -> Result<(u64, u64), ServiceError> {
        let stat = rustix::fs::statvfs(&self.dir).map_err(|errno| EngineError::Io {
            context: "statvfs of",
            path: self.dir.clone(),
            source: errno.into(),
        })?;
        Ok((
            stat.f_bavail.saturating_mul(stat.f_frsize),
            stat.f_blocks.saturating_mul(stat.f_frsize),
        ))
    }
}

impl Drop for DirectService {
    /// Stops the engine cleanly, leaving a checkpoint so the next open is quick.
    fn drop(&mut self) {
        if let Err(error) = self.engine.shutdown() {
            tracing::warn!("sector engine shutdown: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `raftlog_generation` fuzz target: a path ending in '\r' read
    /// back without it.
    #[test]
    fn generation_files_round_trip_and_refuse_control_characters() {
        let root = "A".repeat(43);
        let info = GenerationInfo {
            generation: 7,
            directory: format!("/{root}/servers").parse().unwrap(),
        };
        assert_eq!(GenerationInfo::decode(&info.encode()), Ok(info));
        let carriage = format!("generation 1\ndirectory /{root}/x\r\n");
        assert!(GenerationInfo::decode(&carriage).is_err());
        assert!(GenerationInfo::decode("generation 1\n").is_err());
        assert!(GenerationInfo::decode("generation x\ndirectory /a\n").is_err());
    }
}
