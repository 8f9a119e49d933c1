//! The engine's errors.

use blocktree_core::sector::SectorId;
use std::path::PathBuf;
use thiserror::Error;

/// Why an engine operation failed.
#[derive(Debug, Error)]
pub enum EngineError {
    /// An operating-system error on a file of the store.
    #[error("{context} {path}: {source}")]
    Io {
        /// What the engine was doing.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file system is full: the write was not stored; earlier data is intact
    /// and reads go on. Writes succeed again once space is freed.
    #[error("no space left for sector data in {0}: the write was not stored")]
    NoSpace(PathBuf),
    /// A stored record failed its checksum: it is never served.
    #[error("sector {0:?} is corrupt on disk (checksum mismatch): refusing to serve it")]
    Corrupt(SectorId),
    /// A sector larger than the engine stores.
    #[error("sector of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The store's superblock or checkpoint does not decode.
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// There is no store where one was expected, or one where none was.
    #[error("{0}")]
    Layout(String),
    /// Another shard could not write its part of the batch, so none of it applies.
    #[error("the batch was not applied: another shard failed to write its part")]
    BatchAborted,
    /// The engine was shut down, or a shard thread stopped after an error.
    #[error("the sector engine is shut down")]
    Closed,
    /// The configuration is unusable.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

impl EngineError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> EngineError {
        let path = path.into();
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                EngineError::NoSpace(path)
            } else {
                EngineError::Io {
                    context,
                    path,
                    source,
                }
            }
        }
    }
}
