//! The sector-service API: everything the filesystem service may ask of the store
//! of a generation. The local [`DirectService`](crate::DirectService) and the
//! replicated service of issue #7 implement the same trait, so nothing above it
//! changes when replication lands.

use blocktree_core::BtPath;
use blocktree_core::encoding::DecodeError;
use blocktree_core::keys::EncryptionPublicKey;
use blocktree_core::merkle::MerkleError;
use blocktree_core::metadata::{FileMeta, MetaError};
use blocktree_core::sector::SectorId;
use blocktree_engine::EngineError;
use crossbeam_channel::Receiver;
use thiserror::Error;

/// The new state of one file in a batch: its signed metadata and the sealed records
/// of the data sectors that changed. The service recomputes the Merkle tree from
/// the stored leaves and these records and accepts the write only if its root is
/// the signed one.
#[derive(Clone, Debug)]
pub struct FileWrite {
    /// The new metadata; `meta.body().ids.inode` names the file.
    pub meta: FileMeta,
    /// Data sectors written: (index, sealed record). Indices below the metadata's
    /// `sector_count`.
    pub data: Vec<(u64, Vec<u8>)>,
    /// Data sectors that become holes (all zeros, nothing stored).
    pub holes: Vec<u64>,
}

/// One atomic write: after it returns, and after any crash, either all of it is
/// stored or none of it.
#[derive(Clone, Debug, Default)]
pub struct SectorBatch {
    /// Files created or changed.
    pub files: Vec<FileWrite>,
    /// Files deleted with all their sectors, each named by metadata for it freshly
    /// signed by the deleter: the service verifies it like a write, so only a
    /// writer with a valid writecap for the generation can delete.
    pub removes: Vec<FileMeta>,
}

/// Who is reading, and why they may: the reader's encryption key and a path of
/// inodes from a file whose readcap table holds that key down to the file read,
/// each a child of the one before it. Unencrypted files need neither.
#[derive(Clone, Debug)]
pub struct ReadAccess {
    /// The reader's encryption public key, which readcaps are wrapped for.
    pub reader: EncryptionPublicKey,
    /// Inodes from the readcap holder down to the file, inclusive; a single entry
    /// when the reader holds a readcap on the file itself.
    pub chain: Vec<u64>,
}

/// Why the sector service refused or failed a request.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// The metadata's writecap or signature does not verify.
    #[error("write refused: inode {inode}: {source}")]
    Unauthorized {
        /// The file.
        inode: u64,
        /// Why (boxed: writecap errors carry principals and paths).
        #[source]
        source: Box<MetaError>,
    },
    /// The recomputed Merkle root is not the signed one, or the records do not
    /// match the tree.
    #[error("write refused: inode {inode}: {reason}")]
    Inconsistent {
        /// The file.
        inode: u64,
        /// Why.
        reason: String,
    },
    /// The reader holds no readcap that reaches this encrypted file.
    #[error("inode {0} is encrypted and the reader holds no readcap for it or a parent")]
    NoReadcap(u64),
    /// A stored sector failed verification or decoding: it is not served.
    #[error("sector {id:?} is corrupt: {reason}")]
    Corrupt {
        /// The sector.
        id: SectorId,
        /// What is wrong.
        reason: String,
    },
    /// The file does not exist.
    #[error("inode {0} does not exist")]
    NotFound(u64),
    /// A request outside the API's rules (wrong generation, bad index, …).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// This member of a replicated service does not lead its cluster: writes
    /// (and linearizable reads) go to the leader, named here when known.
    #[error("not the leader of the sector service's cluster; the leader is {}", leader.as_deref().unwrap_or("unknown (an election is under way)"))]
    NotLeader {
        /// The leader's Raft id and address, when known.
        leader: Option<String>,
    },
    /// Replication failed or its outcome is unknown (the cluster lost its
    /// leader or quorum while the request was in flight).
    #[error("replication: {0}")]
    Replication(String),
    /// The engine failed; its message says whether anything was stored.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<DecodeError> for ServiceError {
    fn from(error: DecodeError) -> Self {
        ServiceError::Invalid(error.to_string())
    }
}

impl From<MerkleError> for ServiceError {
    fn from(error: MerkleError) -> Self {
        ServiceError::Invalid(error.to_string())
    }
}

/// The store of one generation's sectors, as the filesystem service sees it.
///
/// All methods block; they are safe to call from many threads at once.
pub trait SectorService: Send + Sync {
    /// The generation this service stores.
    fn generation(&self) -> u64;

    /// The directory the generation serves: writecaps must cover it.
    fn directory(&self) -> &BtPath;

    /// A fresh inode number, never handed out before.
    fn allocate_inode(&self) -> Result<u64, ServiceError>;

    /// The file's metadata as stored (already verified when it was written; a
    /// reader verifies it again against its own trust). `None` if there is none.
    fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError>;

    /// Piece `piece` of the file's Merkle sector (leaf digests); empty if absent.
    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError>;

    /// Sealed data records; `None` for a hole. Encrypted files require `access`.
    fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError>;

    /// Verifies and stores `batch` atomically. Returns once it is applied (visible
    /// to readers), not necessarily durable.
    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError>;

    /// [`SectorService::write`], calling `queued` once the batch's place among
    /// this service's writes is fixed, whatever its outcome: a batch of the
    /// same files written after that call is applied after this one (or not
    /// at all). A service that can, calls it before the batch is applied, so
    /// a caller may prepare and send a file's next batch while this one is
    /// replicated; by default it is called once `write` returned. `queued`
    /// runs while the batch counts as proposed, and readers of its files wait
    /// in the service until that count comes down: it must not wait for
    /// anything such a reader may hold.
    fn write_queued(
        &self,
        batch: SectorBatch,
        queued: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        let result = self.write(batch);
        queued();
        result
    }

    /// Makes every write applied so far durable (one shared fsync).
    fn flush(&self) -> Result<(), ServiceError>;

    /// One message per committed sector write of `inode` (its id, not its data).
    /// A subscriber that falls too far behind is disconnected rather than allowed
    /// to grow the service's memory: its receiver then reports disconnection.
    fn subscribe(&self, inode: u64) -> Receiver<SectorId>;

    /// Bytes free for sector data and in total, for statfs.
    fn space(&self) -> Result<(u64, u64), ServiceError>;

    /// The inodes that writes made elsewhere change from now on (another
    /// member's, in a replicated service), announced as they are applied, so a
    /// layer that caches files above the service reloads them;
    /// `u64::MAX` means every file. `None` if nothing but this service's own
    /// callers writes (the default), or when asked a second time.
    fn watch_foreign_changes(&self) -> Option<Receiver<u64>> {
        None
    }
}
