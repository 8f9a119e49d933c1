//! A file system on a local sector store: the `--data DIR` of `blocktree mount`.
//! Until the replicated sector service lands (issue #7), the file system reaches
//! the engine through [`DirectService`], behind the same [`SectorService`] API.

use crate::error::{FsError, FsResult};
use crate::filesystem::{FileSystem, FsConfig};
use blocktree_core::credstore::CredStore;
use blocktree_engine::EngineConfig;
use blocktree_raftlog::{DirectService, GenerationInfo, SectorService};
use std::path::Path;
use std::sync::Arc;

/// The sector store's directory inside a data directory.
pub const SECTORS_DIR: &str = "sectors";
/// The generation number of a standalone store.
pub const LOCAL_GENERATION: u64 = 1;

/// The engine's configuration for a local store: reads go through the page
/// cache, which then serves as the second-level cache of sealed sectors (outside
/// the daemon's memory), as the lower file system's cache does for gocryptfs.
fn engine_config(dir: std::path::PathBuf) -> EngineConfig {
    EngineConfig {
        buffered_reads: true,
        ..EngineConfig::new(dir)
    }
}

/// Opens the sector store in `data/sectors`, creating it on first use with the
/// runtime writecap's path as the generation's directory.
pub fn open_service(data: &Path, creds: &dyn CredStore) -> FsResult<Arc<DirectService>> {
    let dir = data.join(SECTORS_DIR);
    let service = if DirectService::exists(&dir) {
        DirectService::open(&dir, engine_config)?
    } else {
        let path = creds
            .writecap()
            .and_then(|writecap| writecap.path().cloned())
            .ok_or_else(|| {
                FsError::ReadOnly(
                    "a new sector store needs credentials with a writecap; import one first".into(),
                )
            })?;
        let info = GenerationInfo {
            generation: LOCAL_GENERATION,
            directory: path,
        };
        DirectService::create(&dir, info, engine_config)?
    };
    Ok(Arc::new(service))
}

/// A file system on the local store in `data`, using `creds`.
pub fn open_local(
    data: &Path,
    creds: Arc<dyn CredStore>,
    config: FsConfig,
) -> FsResult<FileSystem> {
    let service: Arc<dyn SectorService> = open_service(data, creds.as_ref())?;
    FileSystem::new(service, creds, config)
}
