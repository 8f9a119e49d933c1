//! The sector service of a data directory: the `--data DIR` of `blocktree up`
//! and `blocktree mount`.
//!
//! Every store is a member of a Raft cluster ([`RaftService`], DESIGN decision
//! 4): a one-member cluster without network by default, so that every write
//! goes through the log even then; a member listening on bttp when the server
//! is to be reached by others (`blocktree up --listen`); or a member that
//! joined another server's cluster (`blocktree join`).

use crate::error::{FsError, FsResult};
use crate::filesystem::{FileSystem, FsConfig};
use blocktree_core::BtPath;
use blocktree_core::credstore::CredStore;
use blocktree_engine::EngineConfig;
use blocktree_netstack::Credentials;
use blocktree_raftlog::{
    GenerationInfo, ROOT_GENERATION, RaftConfig, RaftService, ReadMode, SectorService, ServiceError,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The sector store's directory inside a data directory.
pub const SECTORS_DIR: &str = "sectors";
/// The generation number of a domain's root directory; the root's cluster
/// numbers every other directory's generation.
pub const LOCAL_GENERATION: u64 = ROOT_GENERATION;

/// How a data directory's member talks to the others.
#[derive(Clone, Debug, Default)]
pub enum Membership {
    /// A cluster of this member alone, without network.
    #[default]
    Alone,
    /// Listening for other members on bttp at this address (port 0: any).
    Listen(SocketAddr),
    /// Listening at `listen`, joining the cluster of the member at `peer`
    /// (only when the data directory holds no member yet).
    Join {
        /// Where to listen.
        listen: SocketAddr,
        /// A member of the cluster to join.
        peer: SocketAddr,
    },
}

/// The engine's configuration for a local store: reads go through the page
/// cache, which then serves as the second-level cache of sealed sectors (outside
/// the daemon's memory), as the lower file system's cache does for gocryptfs.
/// They are answered on the readers' threads, so a shard reads little itself
/// ([`READ_BUFFERS`]).
fn engine_config(dir: PathBuf) -> EngineConfig {
    EngineConfig {
        buffered_reads: true,
        read_buffers: READ_BUFFERS,
        ..EngineConfig::new(dir)
    }
}

/// Registered read buffers per shard of a local store's engines: a shard reads
/// a segment's first record (which publishes its buffered descriptor), records
/// that fail their check on a caller's thread, and, for the Raft log, entries
/// no longer in its cache. 16 × 128 KiB instead of 64 pins 6 MiB less per shard.
const READ_BUFFERS: usize = 16;

/// True if `data` holds a sector store (of any member).
pub fn exists(data: &Path) -> bool {
    RaftService::exists(&data.join(SECTORS_DIR))
}

/// How a data directory's member is opened, beyond its membership.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// A member of the domain root directory's cluster: asked for the
    /// generation number of a new store for a directory below the root.
    pub root_cluster: Option<SocketAddr>,
    /// Serve reads from this member's store as applied so far, without asking
    /// the leader first: faster on a follower, possibly stale (Raft's
    /// "follower reads"). Off: reads are linearizable.
    pub follower_reads: bool,
}

/// Opens the member in `data/sectors`, creating a one-member cluster on first
/// use (with the runtime writecap's path as the generation's directory), or
/// joining another's cluster, as `membership` says.
///
/// A new store for a directory below the domain's root asks the root
/// directory's cluster, through its member at `options.root_cluster`, for its
/// generation number; one for the root directory is the root generation.
pub fn open_service(
    data: &Path,
    creds: Arc<dyn CredStore>,
    membership: &Membership,
    options: &ServiceOptions,
) -> FsResult<Arc<RaftService>> {
    let root_cluster = options.root_cluster;
    let dir = data.join(SECTORS_DIR);
    let mut config = RaftConfig::new(&dir);
    config.engine = Arc::new(engine_config);
    if options.follower_reads {
        config.read_mode = ReadMode::Follower;
    }
    let network = |listen: SocketAddr| -> FsResult<RaftConfig> {
        let credentials = Credentials::from_store(creds.clone()).map_err(|error| {
            FsError::ReadOnly(format!(
                "a cluster member needs runtime credentials with a writecap: {error}"
            ))
        })?;
        Ok(config.clone().networked(credentials, listen))
    };
    let service = match membership {
        Membership::Join { listen, peer } if !RaftService::exists(&dir) => {
            std::fs::create_dir_all(&dir).map_err(|error| {
                FsError::Io(format!("cannot create {}: {error}", dir.display()))
            })?;
            RaftService::join_address(network(*listen)?, *peer)?
        }
        Membership::Join { listen, .. } | Membership::Listen(listen) => {
            let config = network(*listen)?;
            RaftService::open_or_create(config, || new_generation(&creds, root_cluster))?
        }
        Membership::Alone => {
            let service =
                RaftService::open_or_create(config, || new_generation(&creds, root_cluster))?;
            let voters = service.status().voters.len();
            if voters > 1 {
                // Without its network it could neither commit nor read, and
                // campaigning alone would only disturb the others' terms.
                return Err(FsError::Io(format!(
                    "{} is a member of a cluster of {voters} servers: start it with \
                     `blocktree up --listen ADDR:PORT` (and use the running server)",
                    data.display()
                )));
            }
            service
        }
    };
    Ok(Arc::new(service))
}

/// The generation a new store holds, for the directory the runtime's
/// writecap names: the root generation for the domain's root directory,
/// else the number the root directory's cluster at `root_cluster` hands out.
fn new_generation(
    creds: &Arc<dyn CredStore>,
    root_cluster: Option<SocketAddr>,
) -> Result<GenerationInfo, ServiceError> {
    let path = creds
        .writecap()
        .and_then(|writecap| writecap.path().cloned())
        .ok_or_else(|| {
            ServiceError::Invalid(
                "a new sector store needs credentials with a writecap; import one first".into(),
            )
        })?;
    let root = BtPath::root_of(path.root());
    if path == root {
        return Ok(GenerationInfo {
            generation: ROOT_GENERATION,
            directory: path,
        });
    }
    let Some(root_addr) = root_cluster else {
        return Err(ServiceError::Invalid(format!(
            "this server's writecap is for {path}, below the domain's root {root}: a new store \
             for it needs a generation number from {root}'s cluster; start it with \
             `blocktree up --root-cluster ADDR:PORT` (where a member of that cluster listens)"
        )));
    };
    let credentials = Credentials::from_store(creds.clone())
        .map_err(|error| ServiceError::Invalid(format!("runtime credentials: {error}")))?;
    let generation =
        blocktree_raftlog::request_generation(&credentials, root_addr).map_err(|error| {
            ServiceError::Replication(format!(
                "asking {root}'s cluster at {root_addr} for {path}'s generation number: {error}"
            ))
        })?;
    Ok(GenerationInfo {
        generation,
        directory: path,
    })
}

/// A file system on the one-member store in `data`, using `creds`.
pub fn open_local(
    data: &Path,
    creds: Arc<dyn CredStore>,
    config: FsConfig,
) -> FsResult<FileSystem> {
    let service: Arc<dyn SectorService> = open_service(
        data,
        creds.clone(),
        &Membership::Alone,
        &ServiceOptions::default(),
    )?;
    FileSystem::new(service, creds, config)
}
