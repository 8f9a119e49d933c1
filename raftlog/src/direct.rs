//! [`DirectService`]: the sector service of one generation on a local engine,
//! without replication. Every write is verified ([`crate::verify`]) and staged
//! ([`crate::store`]) and then applied to the engine as one atomic engine batch;
//! the Raft service ([`crate::RaftService`]) proposes the same staged batch as a
//! log entry instead.
//!
//! The service keeps, per recently used file, its metadata and its Merkle tree (as
//! the original design's sector service does), so a batch hashes only its new
//! records and the dirty path, never the whole file.

use crate::service::{ReadAccess, SectorBatch, SectorService, ServiceError};
use crate::store::{self, SectorStore, lock, write_file_durably};
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::SectorId;
use blocktree_core::{BtPath, PrincipalId};
use blocktree_engine::{Engine, EngineConfig, EngineError, WriteBatch};
use crossbeam_channel::Receiver;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use crate::store::GenerationInfo;

/// Inode numbers reserved per superblock write.
const INODE_RESERVATION: u64 = 1024;
/// Name of the file that records the generation and its directory.
pub(crate) const INFO_FILE: &str = "generation";
/// Name of the engine's directory.
pub(crate) const ENGINE_DIR: &str = "engine";

/// The sector service of one generation on a local engine.
pub struct DirectService {
    store: SectorStore,
    /// The engine (also inside `store`; kept here for [`DirectService::engine`]).
    engine: Engine,
    dir: PathBuf,
    /// Inode numbers reserved in the superblock and not yet handed out.
    inodes: Mutex<std::ops::Range<u64>>,
}

/// Reads and parses the generation file of `dir`.
pub(crate) fn read_info(dir: &Path) -> Result<GenerationInfo, ServiceError> {
    let info_path = dir.join(INFO_FILE);
    let text = std::fs::read_to_string(&info_path).map_err(|source| EngineError::Io {
        context: "reading",
        path: info_path.clone(),
        source,
    })?;
    Ok(
        GenerationInfo::decode(&text).map_err(|reason| EngineError::Damaged {
            path: info_path.clone(),
            reason,
        })?,
    )
}

/// Creates `dir` and writes its generation file, refusing a directory that
/// already holds a generation.
pub(crate) fn write_info(dir: &Path, info: &GenerationInfo) -> Result<(), ServiceError> {
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
    write_file_durably(&info_path, info.encode().as_bytes())
}

impl DirectService {
    /// Creates a generation in the empty (or missing) directory `dir`.
    pub fn create(
        dir: &Path,
        info: GenerationInfo,
        engine: impl FnOnce(PathBuf) -> EngineConfig,
    ) -> Result<DirectService, ServiceError> {
        if dir.join(INFO_FILE).exists() {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a generation",
                dir.display()
            )));
        }
        if info.directory.to_string().chars().any(char::is_control) {
            return Err(ServiceError::Invalid(format!(
                "the directory {:?} contains a control character",
                info.directory.to_string()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
            context: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        let engine = Engine::create(engine(dir.join(ENGINE_DIR)), info.generation)?;
        write_info(dir, &info)?;
        Ok(DirectService::assemble(engine, info, dir))
    }

    /// Opens the generation in `dir`.
    pub fn open(
        dir: &Path,
        engine: impl FnOnce(PathBuf) -> EngineConfig,
    ) -> Result<DirectService, ServiceError> {
        let info = read_info(dir)?;
        let engine = Engine::open(engine(dir.join(ENGINE_DIR)))?;
        if engine.generation() != info.generation {
            return Err(ServiceError::Invalid(format!(
                "{} names generation {} but its engine stores {}",
                dir.join(INFO_FILE).display(),
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
            store: SectorStore::new(engine.clone(), info),
            engine,
            dir: dir.to_path_buf(),
            inodes: Mutex::new(0..0),
        }
    }

    /// Refuses writes signed under `principal`'s authority from now on.
    pub fn revoke(&self, principal: PrincipalId) {
        self.store.revoke(principal);
    }

    /// The engine underneath (statistics, checkpoints, shutdown).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

impl SectorService for DirectService {
    fn generation(&self) -> u64 {
        self.store.info.generation
    }

    fn directory(&self) -> &BtPath {
        &self.store.info.directory
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
        self.store.read_meta(inode)
    }

    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError> {
        self.store.read_merkle_piece(inode, piece)
    }

    fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        self.store.read_data(inode, indices, access)
    }

    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        let generation = self.store.info.generation;
        let written = self.store.write_with(batch, |staged| {
            let mut engine_batch = WriteBatch::new();
            staged.to_engine_batch(generation, &mut engine_batch);
            self.engine.write(engine_batch).wait()?;
            Ok(staged.written)
        })?;
        self.store.notify(&written);
        Ok(())
    }

    fn flush(&self) -> Result<(), ServiceError> {
        Ok(self.engine.flush().wait()?)
    }

    fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        self.store.subscribe(inode)
    }

    fn space(&self) -> Result<(u64, u64), ServiceError> {
        store::space(&self.dir)
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
