//! The sector engine: a thread-per-core, log-structured store of sectors on
//! io_uring (DESIGN decision 3).
//!
//! One [`Engine`] stores the sectors of one generation in a directory:
//!
//! ```text
//! <dir>/superblock              generation, key salt, next inode   (superblock.rs)
//! <dir>/layout                  the number of shards               (recovery.rs)
//! <dir>/checkpoint              the checkpoint epoch in force      (checkpoint.rs)
//! <dir>/shard-<s>/<n>.seg       the log of shard s, in segments     (segment.rs, record.rs)
//! <dir>/shard-<s>/checkpoint-<e>  shard s's index at epoch e       (checkpoint.rs)
//! ```
//!
//! Each sector lives under a salted hash of its [`SectorId`] ([`key`]), and each
//! key belongs to one shard. A shard is one thread with its own io_uring, its own
//! segments and its own in-memory index; other threads reach it only through a
//! crossbeam channel, so the hot path takes no lock. A shard appends every round of
//! writes it receives as one chunk (group commit), written with O_DIRECT from
//! registered buffers, and shares one `fdatasync` among all the flushes of the round
//! (or, when everything before it is synced, writes a durable round's chunk with
//! `RWF_DSYNC` and needs none).
//!
//! A [`WriteBatch`] is atomic: its records carry the batch id and the shape of the
//! batch, recovery keeps only batches whose every record is present, and a batch
//! that spans shards becomes visible only after every shard has written its part.

pub mod checkpoint;
mod durable;
mod engine;
mod error;
mod index;
pub mod key;
mod pending;
pub mod record;
mod recovery;
mod segment;
mod shard;
pub mod superblock;
mod uring;

pub use blocktree_core::sector::{SectorId, SectorKind};
pub use engine::{Engine, EngineConfig, EngineStats, SEGMENT_MIB_ENV, WriteBatch};
pub use error::EngineError;
pub use pending::Pending;
