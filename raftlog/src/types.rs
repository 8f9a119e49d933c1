//! The openraft type configuration of the sector service: what a log entry
//! carries, what applying one answers, how a member is addressed.

use crate::store::StagedBatch;
use blocktree_core::{BtPath, PrincipalId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// A member's Raft id: the first eight bytes of its principal, so a member's id
/// follows from its credentials and a joining server needs no id handed out.
pub type NodeId = u64;

/// The Raft id of the member whose runtime key is `principal`.
pub fn node_id_of(principal: &PrincipalId) -> NodeId {
    let mut word = [0u8; 8];
    word.copy_from_slice(&principal.as_bytes()[..8]);
    u64::from_le_bytes(word)
}

/// Where a member listens and which runtime path its writecap gives it (what
/// bttp needs to dial it and check it is who it claims).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    /// `addr:port` of the member's bttp endpoint; empty for a member without
    /// network (a one-member cluster opened locally).
    pub addr: String,
    /// The member's runtime path, as its writecap names it; `None` without
    /// network.
    pub path: Option<BtPath>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{path} at {}", self.addr),
            None => write!(f, "local"),
        }
    }
}

/// Which proposal of which process an entry is, so the member that proposed it
/// can tell its own entries (whose effect it already holds in its caches) from
/// those of other leaders (whose files it must reload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// The proposing member.
    pub node: NodeId,
    /// A random number drawn when that member's process started.
    pub boot: u64,
    /// The proposal's number within that process.
    pub seq: u64,
}

/// One Raft entry's request: already verified by the leader that proposed it,
/// applied on every member without reading anything first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRequest {
    /// One sector-service write batch, staged into sector puts and deletes.
    Write {
        /// Who proposed it.
        origin: Origin,
        /// The staged batch.
        batch: StagedBatch,
    },
    /// Inode numbers `start..end` handed to the proposing member; applying it
    /// raises the generation's next free inode to at least `end`.
    ReserveInodes {
        /// Who proposed it.
        origin: Origin,
        /// The first inode reserved.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// In the root generation: `generation` is handed to a new directory's
    /// cluster; applying it raises the next number to hand out past it.
    AllocateGeneration {
        /// Who proposed it.
        origin: Origin,
        /// The number handed out.
        generation: u64,
        /// The directory it numbers (for the record in the log).
        directory: BtPath,
    },
    /// A write batch staged on batches of the same files not yet applied
    /// (see `SectorStore::write_pipelined`): applied only if its entry is of
    /// `term`, the term they were all proposed in, and else answered with
    /// [`RaftResponse::refused`] and applied as nothing. Appended to the
    /// enum, so logs written before it existed still decode.
    WriteInTerm {
        /// Who proposed it.
        origin: Origin,
        /// The term its entry must be of.
        term: u64,
        /// The staged batch.
        batch: StagedBatch,
    },
}

impl RaftRequest {
    /// Who proposed the entry.
    pub fn origin(&self) -> Origin {
        match self {
            RaftRequest::Write { origin, .. }
            | RaftRequest::WriteInTerm { origin, .. }
            | RaftRequest::ReserveInodes { origin, .. }
            | RaftRequest::AllocateGeneration { origin, .. } => *origin,
        }
    }

    /// The write batch the entry carries, if it is a write.
    pub fn staged(&self) -> Option<&StagedBatch> {
        match self {
            RaftRequest::Write { batch, .. } | RaftRequest::WriteInTerm { batch, .. } => {
                Some(batch)
            }
            RaftRequest::ReserveInodes { .. } | RaftRequest::AllocateGeneration { .. } => None,
        }
    }
}

/// What applying an entry answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftResponse {
    /// The generation's next free inode after the entry.
    pub next_inode: u64,
    /// The entry was a [`RaftRequest::WriteInTerm`] of another term than its
    /// own, and was applied as nothing.
    pub refused: bool,
}

/// A snapshot's contents as this service handles them. Snapshots are not
/// copies: the state machine *is* the engine, so a local snapshot is the
/// engine read as it goes (entries after the snapshot's log id replay
/// idempotently over whatever newer state the reading saw), and a received one
/// is a complete engine store built in a staging directory.
#[derive(Debug)]
pub enum SnapshotData {
    /// The local engine, read while it is sent.
    Local,
    /// A store received from the leader, ready to take the engine's place.
    Received {
        /// Its directory.
        dir: PathBuf,
        /// The generation's next free inode it was sent with.
        next_inode: u64,
        /// The next generation number to hand out (root generation) it was
        /// sent with.
        next_generation: u64,
    },
}

openraft::declare_raft_types!(
    /// The sector service's Raft types.
    pub SectorRaft:
        D = RaftRequest,
        R = RaftResponse,
        NodeId = NodeId,
        Node = MemberNode,
        Entry = openraft::Entry<SectorRaft>,
        SnapshotData = SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A log entry of the sector service.
pub type Entry = openraft::Entry<SectorRaft>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A membership as stored.
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
/// A storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;
/// The openraft handle.
pub type Raft = openraft::Raft<SectorRaft>;
