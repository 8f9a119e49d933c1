//! What the server serves: a [`Catalog`] of named exports, each opened as a
//! [`Device`]. The volumes of a Blocktree file system are one implementation
//! (`volumes`); the tests use an in-memory one. Every call may block (the file
//! system does I/O and takes locks); the server makes them from blocking threads.

use std::sync::Arc;
use thiserror::Error;

/// Errno values the devices return (Linux numbering, as `libc` has them).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i32 = 1;
    /// Input/output error.
    pub const EIO: i32 = 5;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device.
    pub const ENOSPC: i32 = 28;
    /// Operation not supported.
    pub const EOPNOTSUPP: i32 = 95;
}

/// What a client learns about an export before using it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The canonical name (what `NBD_OPT_LIST` shows).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The block size: the preferred request size and alignment.
    pub block_size: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// A line for a human (`NBD_INFO_DESCRIPTION`, `NBD_REP_SERVER`).
    pub description: String,
}

/// Why a device operation failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{message} (errno {errno})")]
pub struct DeviceError {
    /// The POSIX errno (mapped to the protocol's errors by
    /// [`NbdError::from_errno`](crate::proto::NbdError::from_errno)).
    pub errno: i32,
    /// What happened, for the log and the client's structured error chunk.
    pub message: String,
}

impl DeviceError {
    /// An error with `errno` and `message`.
    pub fn new(errno: i32, message: impl Into<String>) -> DeviceError {
        DeviceError {
            errno,
            message: message.into(),
        }
    }
}

/// Why an export could not be described or opened.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum CatalogError {
    /// No export of that name.
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The storage failed.
    #[error("{0}")]
    Failed(String),
}

/// A run of the same allocation status, for `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub length: u64,
    /// Not allocated (and reads as zeros).
    pub hole: bool,
}

/// An open export: one per connection. Calls may come from several threads at
/// once (requests of a connection run concurrently).
pub trait Device: Send + Sync {
    /// What the export is.
    fn info(&self) -> &ExportInfo;
    /// Reads `len` bytes at `offset` (in range: the server checked).
    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError>;
    /// Reads several ranges (each in range), one result per range. The server
    /// hands queued small reads of a connection over together, so a device that
    /// can serve them in one trip to its storage should.
    fn read_many(&self, ranges: &[(u64, u32)]) -> Vec<Result<Vec<u8>, DeviceError>> {
        ranges
            .iter()
            .map(|&(offset, len)| self.read(offset, len))
            .collect()
    }
    /// Writes `data` at `offset`; durable before returning if `fua`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Writes several ranges (each in range, none with FUA), one result per
    /// range, in order. The server hands queued small writes of a connection
    /// over together, so a device that can buffer them under one lock should.
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), DeviceError>> {
        writes
            .iter()
            .map(|&(offset, data)| self.write(offset, data, false))
            .collect()
    }
    /// Makes every completed write durable, whichever connection made it.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discards a range: it reads as zeros afterwards.
    fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError>;
    /// Makes a range read as zeros: punching holes unless `no_hole`, in which case
    /// zeros are written. With `fast`, fails with `EOPNOTSUPP` (before changing
    /// anything) unless that is faster than writing.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;
    /// The allocation of `offset..offset + len`, in order, covering at least its
    /// start.
    fn extents(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError>;
    /// A hint that the range will be read soon.
    fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError>;
    /// The connection is over: release what was opened for it.
    fn close(&self) -> Result<(), DeviceError>;
}

/// The exports a server offers.
pub trait Catalog: Send + Sync {
    /// Every export, in the order `NBD_OPT_LIST` shows them.
    fn list(&self) -> Result<Vec<ExportInfo>, CatalogError>;
    /// The export called `name` ("" is the default export).
    fn describe(&self, name: &str) -> Result<ExportInfo, CatalogError>;
    /// Opens the export called `name` ("" is the default export) for one
    /// connection.
    fn open(&self, name: &str) -> Result<Arc<dyn Device>, CatalogError>;
}
