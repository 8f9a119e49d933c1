//! The sector service: what stores the sectors of one generation and checks every
//! write before it is stored.
//!
//! - [`service`]: the API the filesystem service uses, [`SectorService`]: read
//!   sectors, write a verified batch with its metadata, subscribe to writes.
//! - [`verify`]: write verification (writecap chain, metadata signature, recomputed
//!   Merkle root) and read authorization (readcap on the file or an ancestor).
//! - [`pieces`]: how a file's Merkle tree is stored as Merkle pieces.
//! - [`direct`]: [`DirectService`], the service on one local engine, unreplicated.
//!   The openraft log (issue #7) replaces its commit step with a Raft append; the
//!   API and the verification stay as they are.

pub mod direct;
pub mod pieces;
pub mod service;
pub mod verify;

pub use direct::{DirectService, GenerationInfo};
pub use service::{FileWrite, ReadAccess, SectorBatch, SectorService, ServiceError};
