//! The filesystem service: files and directories over the sector service, with
//! the cryptography on the data path.
//!
//! - [`filesystem`]: [`FileSystem`], every POSIX operation, atomic namespace batches.
//! - [`node`]: a file's open state (the design's file actor): buffering, sealing,
//!   one Merkle update and one signature per batch, verified reads.
//! - [`dir`]: directory entries in sectors, with stable `readdir` offsets.
//! - [`authorizer`]: the POSIX permission decisions.
//! - [`attr`] and [`error`]: the types the FUSE and NBD front ends map.
//! - [`local`]: a file system on a local sector store.
//!
//! It reaches storage only through [`blocktree_raftlog::SectorService`].

pub mod attr;
pub mod authorizer;
pub mod dir;
pub mod error;
pub mod filesystem;
pub mod local;
pub(crate) mod node;

pub use attr::{
    AccessMask, Attr, Caller, DirEntry, FileKind, RenameMode, SetAttr, StatFs, TimeSet,
};
pub use error::{FsError, FsResult};
pub use filesystem::{ENCRYPT_XATTR, FileSystem, FsConfig};
