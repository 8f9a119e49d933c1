//! The sector service: what stores the sectors of one generation and checks every
//! write before it is stored.
//!
//! - [`service`]: the API the filesystem service uses, [`SectorService`]: read
//!   sectors, write a verified batch with its metadata, subscribe to writes.
//! - [`verify`]: write verification (writecap chain, metadata signature, recomputed
//!   Merkle root) and read authorization (readcap on the file or an ancestor).
//! - [`pieces`]: how a file's Merkle tree is stored as Merkle pieces.
//! - [`store`]: what both services share: the file cache, staging a verified
//!   batch into sector puts and deletes, reads, notifications.
//! - [`direct`]: [`DirectService`], the service on one local engine, unreplicated.
//! - [`raft`]: [`RaftService`], the service as an openraft cluster (issue #7):
//!   [`logstore`] (the log on the engine), [`statemachine`] (the engine as the
//!   state machine), [`network`] (Raft over bttp, streamed snapshots),
//!   [`types`] and [`codec`] (entries and their versioned encoding),
//!   [`forward`] (a batch a follower forwards to the leader) and `lease`
//!   (the leader's read lease).

pub mod codec;
pub mod direct;
pub mod forward;
mod lease;
pub mod logstore;
pub mod network;
mod pace;
pub mod pieces;
pub mod raft;
pub mod service;
pub mod statemachine;
pub mod store;
pub mod types;
pub mod verify;

pub use direct::DirectService;
pub use network::ClusterStatus;
pub use raft::{
    RaftConfig, RaftService, ReadMode, ScrubReport, query_status, query_status_at,
    read_member_file, request_generation,
};
pub use service::{FileWrite, ReadAccess, SectorBatch, SectorService, ServiceError};
pub use statemachine::ROOT_GENERATION;
pub use store::GenerationInfo;
