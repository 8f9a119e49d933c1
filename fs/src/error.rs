//! The filesystem service's errors, each with the errno a POSIX caller sees.

use blocktree_core::credstore::CredStoreError;
use blocktree_core::keys::CryptoError;
use blocktree_core::merkle::MerkleError;
use blocktree_core::metadata::MetaError;
use blocktree_core::readcap::ReadcapError;
use blocktree_core::sector::{SealError, SectorId};
use blocktree_raftlog::ServiceError;
use thiserror::Error;

/// Why a filesystem operation failed.
#[derive(Debug, Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// The name exists already.
    #[error("file exists")]
    Exists,
    /// A directory was needed.
    #[error("not a directory")]
    NotDir,
    /// A non-directory was needed.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// The Authorizer refused: mode bits, ownership, or no readcap.
    #[error("permission denied: {0}")]
    Access(String),
    /// Only the owner (or root) may do this.
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A name longer than 255 bytes.
    #[error("file name too long")]
    NameTooLong,
    /// A file would exceed the largest size a file may have.
    #[error("file too large")]
    TooLarge,
    /// No such extended attribute.
    #[error("no such attribute")]
    NoAttribute,
    /// The operation is not supported.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The file handle is not open (or not for this access).
    #[error("bad file handle")]
    BadHandle,
    /// The store is full: nothing of the failed write was stored.
    #[error("no space left on the sector store")]
    NoSpace,
    /// The mount is read-only or this principal holds no writecap for the generation.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// A sector or metadata failed verification, or the store failed: never data.
    #[error("I/O error: {0}")]
    Io(String),
}

impl FsError {
    /// The errno to report to a POSIX caller.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Access(_) => libc::EACCES,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::TooLarge => libc::EFBIG,
            FsError::NoAttribute => libc::ENODATA,
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::BadHandle => libc::EBADF,
            FsError::NoSpace => libc::ENOSPC,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::Io(_) => libc::EIO,
        }
    }

    /// A verification failure of `id`: EIO, and logged, since it means tampering
    /// or corruption under the store.
    pub(crate) fn tampered(id: SectorId, why: impl std::fmt::Display) -> FsError {
        FsError::unverified(id, why).logged()
    }

    /// [`tampered`](Self::tampered), not logged yet: a record fetched without
    /// the file's lock may fail only because a commit replaced it meanwhile,
    /// so its reader logs the failure once it knows it is not that.
    pub(crate) fn unverified(id: SectorId, why: impl std::fmt::Display) -> FsError {
        FsError::Io(format!("sector {id:?} failed verification: {why}"))
    }

    /// Logs the error if it is an I/O error (a failed verification or store
    /// read) and returns it.
    pub(crate) fn logged(self) -> FsError {
        if let FsError::Io(message) = &self {
            tracing::error!("{message}");
        }
        self
    }
}

impl From<ServiceError> for FsError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::NoReadcap(_) => FsError::Access(error.to_string()),
            ServiceError::NotFound(_) => FsError::NotFound,
            ServiceError::Unauthorized { .. } => FsError::ReadOnly(error.to_string()),
            ServiceError::Engine(blocktree_engine::EngineError::NoSpace(_)) => FsError::NoSpace,
            other => {
                tracing::error!("sector service: {other}");
                FsError::Io(other.to_string())
            }
        }
    }
}

impl From<MetaError> for FsError {
    fn from(error: MetaError) -> Self {
        match error {
            MetaError::Writecap(_) | MetaError::SignerNotSubject => {
                FsError::ReadOnly(error.to_string())
            }
            other => FsError::Io(format!("metadata: {other}")),
        }
    }
}

impl From<ReadcapError> for FsError {
    fn from(error: ReadcapError) -> Self {
        match error {
            ReadcapError::NoReadcap | ReadcapError::NoParentEntry => {
                FsError::Access("no readcap reaches this encrypted file".into())
            }
            other => FsError::Io(format!("readcap: {other}")),
        }
    }
}

impl From<SealError> for FsError {
    fn from(error: SealError) -> Self {
        FsError::Io(format!("sector seal: {error}"))
    }
}

impl From<MerkleError> for FsError {
    fn from(error: MerkleError) -> Self {
        match error {
            MerkleError::TooLarge { .. } => FsError::TooLarge,
            other => FsError::Io(format!("Merkle tree: {other}")),
        }
    }
}

impl From<CryptoError> for FsError {
    fn from(error: CryptoError) -> Self {
        FsError::Io(format!("cryptography: {error}"))
    }
}

impl From<CredStoreError> for FsError {
    fn from(error: CredStoreError) -> Self {
        FsError::Io(format!("credential store: {error}"))
    }
}

/// Results of filesystem operations.
pub type FsResult<T> = Result<T, FsError>;
