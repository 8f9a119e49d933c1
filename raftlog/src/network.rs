//! Raft over bttp: openraft's `RaftNetwork` as `call`s to the "raft" service of
//! each member, the service that answers them, and snapshots streamed in
//! chunks read from the engine as they are sent.
//!
//! Each member registers the service at `<directory>/.raft/<node id in hex>`,
//! so a route to one member's service names exactly that member even when
//! all of them sit in one directory. A message is accepted only from a peer
//! whose runtime path (proved by its writecap at the handshake) lies in the
//! generation's directory.
//!
//! A snapshot is sent as `SnapshotBegin`, then `SnapshotChunk`s of at most
//! [`SNAPSHOT_CHUNK_BYTES`] of sector records, one call each (so at most one
//! chunk per transfer is in memory at either end), then `SnapshotEnd` with the
//! snapshot's meta. The receiver writes the chunks into a new engine store in a
//! staging directory and, at the end, hands it to openraft, which makes the
//! state machine swap it in.

use crate::statemachine::MachineShared;
use crate::store::lock;
use crate::types::{MemberNode, NodeId, Raft, SectorRaft, SnapshotData, Vote};
use blocktree_core::BtPath;
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, WriteBatch};
use blocktree_netstack::{Mailbox, Peer, Runtime, ServiceId, ServiceName};
use openraft::SnapshotMeta;
use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Bytes of sector records per snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;
/// Engine reads in flight while a snapshot is read.
const SNAPSHOT_READS: u64 = 64;
/// How long one snapshot chunk may take to be stored by the receiver.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long after a snapshot is installed the entries after it are kept at
/// most, waiting for the receiver to catch up with them.
const PIN_AFTER_INSTALL: Duration = Duration::from_secs(60);
/// Sectors one `FetchSectors` call may ask for.
pub const FETCH_SECTORS: usize = 32;
/// How long a heartbeat or vote may take.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);
/// Bytes of entries one append-entries request carries (more when a single
/// entry is larger).
const APPEND_BYTES: usize = 1 << 20;
/// How long an append of entries may take.
const APPEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long membership and status calls may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// One sector of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The file.
    pub inode: u64,
    /// The sector.
    pub sector: SectorKind,
    /// Its stored bytes.
    pub data: ByteBuf,
}

/// What members (and the CLI's clients) ask a member's raft service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RaftMessage {
    /// openraft's append-entries (and heartbeat).
    AppendEntries(AppendEntriesRequest<SectorRaft>),
    /// openraft's vote request.
    Vote(VoteRequest<NodeId>),
    /// A snapshot transfer starts.
    SnapshotBegin {
        /// The transfer's id (the snapshot's id).
        id: String,
        /// The sender's vote.
        vote: Vote,
    },
    /// Sector records of a snapshot, in order.
    SnapshotChunk {
        /// The transfer.
        id: String,
        /// The chunk's number, from 0.
        seq: u64,
        /// The records.
        records: Vec<SnapshotRecord>,
    },
    /// The snapshot is complete: install it.
    SnapshotEnd {
        /// The transfer.
        id: String,
        /// The sender's vote.
        vote: Vote,
        /// What the snapshot holds.
        meta: SnapshotMeta<NodeId, MemberNode>,
        /// The generation's next free inode.
        next_inode: u64,
        /// The next generation number to hand out (root generation).
        next_generation: u64,
        /// How many chunks were sent.
        chunks: u64,
    },
    /// The sender (a server holding a writecap in the directory) asks to
    /// become a member: a learner, then a voter once it has caught up.
    Join {
        /// Where it listens.
        node: MemberNode,
    },
    /// The sender asks to stop being a member.
    Leave,
    /// The member's view of the cluster.
    Status,
    /// The stored contents of these sectors (at most [`FETCH_SECTORS`]), to
    /// repair a member whose copies are corrupt.
    FetchSectors {
        /// (inode, sector) of each.
        sectors: Vec<(u64, SectorKind)>,
    },
    /// From a follower: write this batch (a [`crate::forward`] encoding),
    /// answered with the log index of the applied entry.
    ForwardWrite {
        /// The encoded `SectorBatch`.
        batch: ByteBuf,
    },
    /// From a follower: reserve inode numbers for it.
    ReserveInodes,
    /// To the root directory's cluster: a generation number for a new
    /// directory's cluster. A server of that directory asks for its own
    /// (`directory` must be the path its writecap proves); a member of the
    /// root cluster forwards such a request to its leader.
    AllocateGeneration {
        /// The new generation's directory.
        directory: BtPath,
    },
    /// From a follower: the log index a linearizable read must wait for.
    ReadIndex,
    /// From a member: it now listens at `member` (the sender's proved path
    /// replaces `member.path`).
    UpdateNode {
        /// The member's Raft id.
        node: NodeId,
        /// Where it listens now.
        member: MemberNode,
    },
}

/// What kind of [`crate::ServiceError`] a forwarded request failed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The writecap or signature does not verify.
    Unauthorized,
    /// The records do not match the signed tree.
    Inconsistent,
    /// The file does not exist.
    NotFound,
    /// A request outside the API's rules.
    Invalid,
    /// Replication failed or its outcome is unknown; also engine failures
    /// on the leader.
    Replication,
}

/// A member's view of its cluster (`blocktree cluster status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The member answering.
    pub node: NodeId,
    /// Its role: Leader, Follower, Candidate or Learner.
    pub role: String,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its current term.
    pub term: u64,
    /// The highest log index it knows committed.
    pub commit_index: Option<u64>,
    /// The last log index it applied.
    pub applied_index: Option<u64>,
    /// The last log index it holds.
    pub last_log_index: Option<u64>,
    /// Voters and where they listen.
    pub voters: Vec<(NodeId, MemberNode)>,
    /// Learners and where they listen.
    pub learners: Vec<(NodeId, MemberNode)>,
    /// The generation the cluster stores.
    pub generation: u64,
    /// The directory it serves.
    pub directory: BtPath,
}

/// What a member's raft service answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// To `AppendEntries`.
    AppendEntries(AppendEntriesResponse<NodeId>),
    /// To `Vote`.
    Vote(VoteResponse<NodeId>),
    /// To `SnapshotEnd` (and to a refused `SnapshotBegin`: a higher vote).
    Snapshot(SnapshotResponse<NodeId>),
    /// Done.
    Done,
    /// To `Status`.
    Status(ClusterStatus),
    /// Only the leader does this; it is `leader` (if known) at `node`.
    NotLeader {
        /// The leader's id.
        leader: Option<NodeId>,
        /// Where it listens.
        node: Option<MemberNode>,
    },
    /// To `FetchSectors`: the sectors as of (at least) applied index `applied`.
    Sectors {
        /// The answering member's last applied index when it read them.
        applied: Option<u64>,
        /// Each sector asked for, `None` where there is none.
        records: Vec<(u64, SectorKind, Option<ByteBuf>)>,
    },
    /// Refused, and why.
    Refused(String),
    /// To `ForwardWrite`: the batch is applied at this log index.
    Applied {
        /// The entry's log index.
        index: u64,
    },
    /// To `ReserveInodes`: inode numbers `start..end` are the sender's.
    Inodes {
        /// The first.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// To `AllocateGeneration`: the directory's generation number.
    Generation {
        /// The number, unique in the domain.
        generation: u64,
    },
    /// To `ReadIndex`: apply at least up to this index, then read.
    ReadIndex {
        /// The index (`None`: the log is empty).
        index: Option<u64>,
    },
    /// A forwarded request failed on the leader.
    Failed {
        /// How.
        kind: FailureKind,
        /// The file concerned (0 when none).
        inode: u64,
        /// The leader's message.
        reason: String,
    },
}

/// The service path of member `node`'s raft service.
pub fn raft_service_path(directory: &BtPath, node: NodeId) -> Option<BtPath> {
    directory
        .join(".raft")
        .and_then(|path| path.join(&format!("{node:016x}")))
        .ok()
}

/// The path of the control service of the member whose runtime path is
/// `member`: the same service under a name that needs no Raft id, for
/// clients that know only a member's path and address (status, join).
pub fn control_service_path(member: &BtPath) -> Option<BtPath> {
    member.join("raft-control").ok()
}

/// The control service every member also registers under a path derived
/// from the cluster's directory alone, for clients that know only a
/// member's address (they find its runtime path at the handshake, see
/// [`call_control_at`]).
pub fn directory_control_path(directory: &BtPath) -> Option<BtPath> {
    directory
        .join(".raft")
        .and_then(|path| path.join("control"))
        .ok()
}

/// Calls the control service of the member listening at `addr`, knowing only
/// that the cluster's directory contains `own` (the caller's runtime path).
///
/// The member's runtime path is learnt from the handshake: a dial for a path
/// its writecap does not cover is refused by our verifier, which reports the
/// path the writecap does cover; that path is then dialled and verified as
/// usual, so nothing learnt this way is trusted before it is checked. A
/// member whose writecap covers the probed path (one holding a writecap for
/// the whole directory, as the caller may) answers at once under the
/// directory's control service, tried for `own` and each of its ancestors,
/// longest first.
pub(crate) async fn call_control_at(
    runtime: &Runtime,
    own: &BtPath,
    addr: std::net::SocketAddr,
    message: RaftMessage,
) -> Result<RaftReply, blocktree_netstack::BttpError> {
    use blocktree_core::writecap::WritecapError;
    use blocktree_netstack::BttpError;
    use blocktree_netstack::frame::ErrorCode;
    use blocktree_netstack::verify::VerifyError;
    let no_route = || BttpError::NoRoute(format!("a member at {addr}"));
    let probe = own.join(".raft-probe").map_err(|_| no_route())?;
    // From `own` itself: a member holding the same path (the directory's
    // writecap, as the caller) answers under its own directory's service.
    let mut candidate = Some(own.clone());
    while let Some(directory) = candidate {
        let service = directory_control_path(&directory).ok_or_else(no_route)?;
        runtime.add_peer(probe.clone(), addr, [service.clone()]);
        let name = ServiceName {
            service,
            scope: probe.clone(),
            rootward: true,
            id: ServiceId::name("raft").map_err(|_| no_route())?,
        };
        match runtime.call(name, message.clone(), CONTROL_TIMEOUT).await {
            Err(BttpError::PeerRejected {
                error: VerifyError::Writecap { error, .. },
                ..
            }) if matches!(*error, WritecapError::PathNotCovered { .. }) => {
                runtime.remove_peer(&probe);
                let WritecapError::PathNotCovered { covered, .. } = *error else {
                    return Err(no_route());
                };
                return call_control(runtime, &covered, addr, message).await;
            }
            Err(BttpError::Rejected { error, .. }) if error.code == ErrorCode::NoSuchService => {
                candidate = directory.parent();
            }
            other => {
                runtime.remove_peer(&probe);
                return other;
            }
        }
    }
    runtime.remove_peer(&probe);
    Err(no_route())
}

/// Calls the control service of the member at `path`/`addr`.
pub(crate) async fn call_control(
    runtime: &Runtime,
    path: &BtPath,
    addr: std::net::SocketAddr,
    message: RaftMessage,
) -> Result<RaftReply, blocktree_netstack::BttpError> {
    let no_route = || blocktree_netstack::BttpError::NoRoute(path.to_string());
    let service = control_service_path(path).ok_or_else(no_route)?;
    runtime.add_peer(path.clone(), addr, [service.clone()]);
    let name = ServiceName {
        service,
        scope: directory_of(path),
        rootward: false,
        id: ServiceId::name("raft").map_err(|_| no_route())?,
    };
    runtime.call(name, message, CONTROL_TIMEOUT).await
}

/// The directory a runtime at `path` lives in: its parent, or the domain's
/// root for a runtime at the root path (see `ServiceName::distance`).
fn directory_of(path: &BtPath) -> BtPath {
    path.parent().unwrap_or_else(|| path.clone())
}

/// The path member `node`, whose runtime path is `member_path`, is dialled
/// at. Every server that may sign writes holds the directory's own writecap,
/// so several members share that path, and bttp keeps one route and one
/// connection per path: such a member is dialled at a child of its path (its
/// writecap covers it) named by its id. A member at a path of its own is
/// dialled at that path, where the connection it opened to us (after a
/// restart on another port, say) also serves our calls.
fn dial_path(directory: &BtPath, member_path: &BtPath, node: NodeId) -> Option<BtPath> {
    if member_path == directory {
        member_path.join(&format!(".raft-{node:016x}")).ok()
    } else {
        Some(member_path.clone())
    }
}

/// The name to call member `node`'s raft service by: the service (its path
/// names the node) as provided by runtimes in `member.path` or above it, which
/// admits both the dial path (see [`dial_path`]) and the member's runtime path.
fn service_name(directory: &BtPath, node: NodeId, member: &MemberNode) -> Option<ServiceName> {
    Some(ServiceName {
        service: raft_service_path(directory, node)?,
        scope: member.path.clone()?,
        rootward: true,
        id: ServiceId::name("raft").ok()?,
    })
}

/// Tells `runtime` where `member` listens, so calls to its raft service route.
pub(crate) fn add_route(runtime: &Runtime, directory: &BtPath, node: NodeId, member: &MemberNode) {
    let (Some(path), Ok(addr), Some(service)) = (
        member
            .path
            .as_ref()
            .and_then(|path| dial_path(directory, path, node)),
        member.addr.parse(),
        raft_service_path(directory, node),
    ) else {
        return;
    };
    runtime.add_peer(path, addr, [service]);
}

/// Calls member `node`'s raft service.
pub(crate) async fn call_member(
    runtime: &Runtime,
    directory: &BtPath,
    node: NodeId,
    member: &MemberNode,
    message: RaftMessage,
    timeout: Duration,
) -> Result<RaftReply, blocktree_netstack::BttpError> {
    add_route(runtime, directory, node, member);
    let name = service_name(directory, node, member)
        .ok_or_else(|| blocktree_netstack::BttpError::NoRoute(format!("member {node:x}")))?;
    runtime.call(name, message, timeout).await
}

/// What the network and the service handler share.
pub(crate) struct NetworkShared {
    pub(crate) runtime: Runtime,
    pub(crate) directory: BtPath,
    pub(crate) machine: Arc<MachineShared>,
    /// Set once openraft is started.
    pub(crate) raft: OnceLock<Raft>,
    /// The snapshot being received, if any.
    receiving: tokio::sync::Mutex<Option<Receiving>>,
    /// Snapshot transfers received in full (for tests and status).
    pub(crate) snapshots_installed: Mutex<u64>,
    /// The running member, for requests forwarded by followers (weak: the
    /// member owns this).
    pub(crate) member: OnceLock<Weak<crate::raft::Member>>,
    /// Until when vote requests are refused: a restarted member has
    /// forgotten which leader it last acknowledged, and must not help elect
    /// another inside that leader's read lease ([`crate::lease`]).
    votes_from: Instant,
    /// [`crate::RaftConfig::append_delay`] (fault injection).
    append_delay: Duration,
}

impl NetworkShared {
    pub(crate) fn new(
        runtime: Runtime,
        directory: BtPath,
        machine: Arc<MachineShared>,
        vote_guard: Duration,
        append_delay: Duration,
    ) -> NetworkShared {
        NetworkShared {
            runtime,
            directory,
            machine,
            raft: OnceLock::new(),
            receiving: tokio::sync::Mutex::new(None),
            snapshots_installed: Mutex::new(0),
            member: OnceLock::new(),
            votes_from: Instant::now() + vote_guard,
            append_delay,
        }
    }

    /// The running member, unless it is starting or stopping.
    fn member(&self) -> Option<Arc<crate::raft::Member>> {
        self.member.get().and_then(Weak::upgrade)
    }
}

struct Receiving {
    id: String,
    engine: Engine,
    next_seq: u64,
}

/// openraft's network factory over bttp.
#[derive(Clone)]
pub struct BttpNetworkFactory {
    pub(crate) shared: Option<Arc<NetworkShared>>,
}

/// A connection to one member.
pub struct BttpConnection {
    shared: Option<Arc<NetworkShared>>,
    target: NodeId,
    node: MemberNode,
    /// The last append whose answer openraft stopped waiting for.
    pending: Option<PendingAppend>,
}

/// An append still travelling after openraft gave up on it: openraft waits
/// one heartbeat for an answer and then sends the entries again. The call
/// goes on, and the stream's next append, which repeats it, waits for its
/// answer instead of sending them again (see `reuse_pending`). Before, a
/// follower whose appends took longer than a heartbeat (a far link, a slow
/// disk) was sent the same entries again and again and never caught up.
struct PendingAppend {
    vote: Vote,
    prev: Option<crate::types::LogId>,
    last: Option<crate::types::LogId>,
    sent: Instant,
    answer: tokio::task::JoinHandle<Result<RaftReply, TransportError>>,
}

impl RaftNetworkFactory<SectorRaft> for BttpNetworkFactory {
    type Network = BttpConnection;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> BttpConnection {
        BttpConnection {
            shared: self.shared.clone(),
            target,
            node: node.clone(),
            pending: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl BttpConnection {
    async fn call(
        &self,
        message: RaftMessage,
        timeout: Duration,
    ) -> Result<RaftReply, TransportError> {
        let Some(shared) = &self.shared else {
            return Err(TransportError("this member runs without a network".into()));
        };
        call_member(
            &shared.runtime,
            &shared.directory,
            self.target,
            &self.node,
            message,
            timeout,
        )
        .await
        .map_err(|error| TransportError(error.to_string()))
    }
}

impl BttpConnection {
    /// Waits for the append openraft gave up on, if any, and answers `rpc`
    /// with it when `rpc` repeats it: same vote and `prev` (the leader's log
    /// after `prev` is then the same, so one's entries begin the other's),
    /// and sent at most `within` ago. A success answers with what the
    /// follower took (all of `rpc`, or a partial success up to the first
    /// append's last entry); a conflict or a higher vote answers as it
    /// answered the first.
    ///
    /// openraft counts an answer as the follower's acknowledgement at the
    /// time `rpc` was sent, later than the first append's: `within` (three
    /// heartbeats, the shortest election timeout) keeps that inside the time
    /// the follower refuses to vote for anyone else after hearing from this
    /// leader.
    async fn reuse_pending(
        &mut self,
        rpc: &AppendEntriesRequest<SectorRaft>,
        within: Duration,
    ) -> Option<AppendEntriesResponse<NodeId>> {
        let pending = self.pending.as_mut()?;
        // Polled in place: if openraft gives up on this call too, the
        // answer stays pending for the next.
        let answer = (&mut pending.answer).await;
        let pending = self.pending.take()?;
        let Ok(Ok(RaftReply::AppendEntries(response))) = answer else {
            return None;
        };
        if pending.vote != rpc.vote
            || pending.prev != rpc.prev_log_id
            || pending.sent.elapsed() > within
        {
            return None;
        }
        let last = rpc.entries.last().map(|entry| entry.log_id);
        match response {
            AppendEntriesResponse::Success if last > pending.last => {
                Some(AppendEntriesResponse::PartialSuccess(pending.last))
            }
            response => Some(response),
        }
    }

    /// Sends an append as a task of its own, which outlives this call if
    /// openraft stops waiting (see [`PendingAppend`]).
    async fn append_continuing(
        &mut self,
        rpc: AppendEntriesRequest<SectorRaft>,
    ) -> Result<RaftReply, TransportError> {
        let Some(shared) = self.shared.clone() else {
            return Err(TransportError("this member runs without a network".into()));
        };
        let (target, node) = (self.target, self.node.clone());
        let (vote, prev) = (rpc.vote, rpc.prev_log_id);
        let last = rpc.entries.last().map(|entry| entry.log_id);
        let answer = tokio::spawn(async move {
            call_member(
                &shared.runtime,
                &shared.directory,
                target,
                &node,
                RaftMessage::AppendEntries(rpc),
                APPEND_TIMEOUT,
            )
            .await
            .map_err(|error| TransportError(error.to_string()))
        });
        let pending = self.pending.insert(PendingAppend {
            vote,
            prev,
            last,
            sent: Instant::now(),
            answer,
        });
        let answer = (&mut pending.answer).await;
        self.pending = None;
        answer.unwrap_or_else(|error| Err(TransportError(error.to_string())))
    }
}

fn unexpected(reply: RaftReply) -> TransportError {
    match reply {
        RaftReply::Refused(reason) => TransportError(format!("refused: {reason}")),
        other => TransportError(format!("unexpected reply {other:?}")),
    }
}

impl RaftNetwork<SectorRaft> for BttpConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SectorRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        // openraft waits one heartbeat interval for the answer: send at most
        // about APPEND_BYTES at once, asking it to split larger requests.
        let mut bytes = 0;
        let fitting = rpc
            .entries
            .iter()
            .take_while(|entry| {
                bytes += entry_bytes(entry);
                bytes <= APPEND_BYTES
            })
            .count();
        if fitting < rpc.entries.len() && rpc.entries.len() > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(fitting.max(1) as u64),
            ));
        }
        let answer = if rpc.entries.is_empty() {
            let timeout = option.hard_ttl().max(HEARTBEAT_TIMEOUT);
            self.call(RaftMessage::AppendEntries(rpc), timeout).await
        } else {
            if let Some(response) = self.reuse_pending(&rpc, option.hard_ttl() * 3).await {
                return Ok(response);
            }
            self.append_continuing(rpc).await
        };
        match answer {
            Ok(RaftReply::AppendEntries(response)) => Ok(response),
            Ok(other) => Err(RPCError::Network(NetworkError::new(&unexpected(other)))),
            Err(error) => Err(RPCError::Unreachable(Unreachable::new(&error))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        match self
            .call(
                RaftMessage::Vote(rpc),
                option.hard_ttl().max(HEARTBEAT_TIMEOUT),
            )
            .await
        {
            Ok(RaftReply::Vote(response)) => Ok(response),
            Ok(other) => Err(RPCError::Network(NetworkError::new(&unexpected(other)))),
            Err(error) => Err(RPCError::Unreachable(Unreachable::new(&error))),
        }
    }

    /// After a failed request to a member, wait 100 ms (openraft's default
    /// is 500 ms): a restarted member is caught up sooner, and an append that
    /// missed openraft's one-heartbeat deadline under load is retried soon.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<SectorRaft>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<SectorRaft, Fatal<NodeId>>> {
        let Some(shared) = self.shared.clone() else {
            return Err(StreamingError::Unreachable(Unreachable::new(
                &TransportError("this member runs without a network".into()),
            )));
        };
        let send = self.send_snapshot(shared, vote, snapshot);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result,
        }
    }
}

impl BttpConnection {
    async fn send_snapshot(
        &self,
        shared: Arc<NetworkShared>,
        vote: Vote,
        snapshot: Snapshot<SectorRaft>,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<SectorRaft, Fatal<NodeId>>> {
        tracing::info!(
            target = self.target,
            snapshot = %snapshot.meta.snapshot_id,
            "sending a snapshot"
        );
        let pin = snapshot
            .meta
            .last_log_id
            .map(|log_id| SendingPin::new(shared.machine.clone(), log_id));
        let result = self.stream_snapshot(&shared, vote, snapshot).await;
        // The pin follows the receiver until it has caught up with the log
        // (or a while has passed). Releasing it at the receiver's first
        // append was not enough: an append carries at most
        // `max_payload_entries`, openraft purges between two appends of the
        // catch-up, and the receiver then needed a second snapshot of
        // everything.
        if let (Some(mut pin), Some(raft), Ok(_)) = (pin, shared.raft.get().cloned(), &result) {
            let target = self.target;
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + PIN_AFTER_INSTALL;
                let mut metrics = raft.metrics();
                loop {
                    let (matched, head) = {
                        let metrics = metrics.borrow_and_update();
                        let matched = metrics
                            .replication
                            .as_ref()
                            .and_then(|replication| replication.get(&target).cloned())
                            .flatten();
                        (matched, metrics.last_log_index)
                    };
                    if let Some(matched) = matched.filter(|matched| *matched > pin.log_id) {
                        pin.advance(matched);
                        if Some(matched.index) >= head {
                            break;
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    if let Ok(Err(_)) = tokio::time::timeout_at(deadline, metrics.changed()).await {
                        break; // Raft has stopped.
                    }
                }
                drop(pin);
            });
        }
        result
    }

    async fn stream_snapshot(
        &self,
        shared: &Arc<NetworkShared>,
        vote: Vote,
        snapshot: Snapshot<SectorRaft>,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<SectorRaft, Fatal<NodeId>>> {
        let network = |error: TransportError| StreamingError::Network(NetworkError::new(&error));
        let id = snapshot.meta.snapshot_id.clone();
        match self
            .call(
                RaftMessage::SnapshotBegin {
                    id: id.clone(),
                    vote,
                },
                CHUNK_TIMEOUT,
            )
            .await
            .map_err(network)?
        {
            RaftReply::Done => {}
            RaftReply::Snapshot(response) => return Ok(response),
            other => return Err(network(unexpected(other))),
        }
        let (next_inode, next_generation) = {
            let applied = shared.machine.applied();
            (applied.next_inode, applied.next_generation)
        };
        let engine = shared.machine.store.engine();
        let generation = shared.machine.store.info.generation;
        let mut seq = 0;
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        for inode in 0..next_inode {
            let records = read_file_records(&engine, generation, inode)
                .await
                .map_err(|reason| network(TransportError(reason)))?;
            for record in records {
                chunk_bytes += record.data.len() + 32;
                chunk.push(record);
                if chunk_bytes >= SNAPSHOT_CHUNK_BYTES {
                    self.send_chunk(&id, seq, std::mem::take(&mut chunk))
                        .await
                        .map_err(network)?;
                    seq += 1;
                    chunk_bytes = 0;
                }
            }
        }
        if !chunk.is_empty() {
            self.send_chunk(&id, seq, chunk).await.map_err(network)?;
            seq += 1;
        }
        match self
            .call(
                RaftMessage::SnapshotEnd {
                    id,
                    vote,
                    meta: snapshot.meta,
                    next_inode,
                    next_generation,
                    chunks: seq,
                },
                CHUNK_TIMEOUT,
            )
            .await
            .map_err(network)?
        {
            RaftReply::Snapshot(response) => Ok(response),
            other => Err(network(unexpected(other))),
        }
    }

    async fn send_chunk(
        &self,
        id: &str,
        seq: u64,
        records: Vec<SnapshotRecord>,
    ) -> Result<(), TransportError> {
        match self
            .call(
                RaftMessage::SnapshotChunk {
                    id: id.to_string(),
                    seq,
                    records,
                },
                CHUNK_TIMEOUT,
            )
            .await?
        {
            RaftReply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// About how many bytes `entry` takes on the wire.
fn entry_bytes(entry: &crate::types::Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(request) => request.staged().map_or(64, |batch| {
            batch
                .ops
                .iter()
                .map(|op| op.data.as_ref().map_or(0, |data| data.len()) + 32)
                .sum()
        }),
        _ => 64,
    }
}

/// Keeps a snapshot's log id in [`MachineShared`]'s list of snapshots being
/// sent while it lives (also when the transfer is cancelled).
struct SendingPin {
    machine: Arc<MachineShared>,
    log_id: crate::types::LogId,
}

impl SendingPin {
    fn new(machine: Arc<MachineShared>, log_id: crate::types::LogId) -> SendingPin {
        lock(&machine.sending).push(log_id);
        SendingPin { machine, log_id }
    }

    /// Moves the pin forward to `log_id`: the receiver holds the entries
    /// up to it, so only those after it need to stay.
    fn advance(&mut self, log_id: crate::types::LogId) {
        let mut sending = lock(&self.machine.sending);
        if let Some(at) = sending.iter().position(|id| *id == self.log_id) {
            sending[at] = log_id;
        }
        self.log_id = log_id;
    }
}

impl Drop for SendingPin {
    fn drop(&mut self) {
        let mut sending = lock(&self.machine.sending);
        if let Some(at) = sending.iter().position(|id| *id == self.log_id) {
            sending.swap_remove(at);
        }
    }
}

/// Every stored sector of file `inode`: its metadata, Merkle pieces and data
/// records (holes have none). Read as it is now: entries applied meanwhile
/// are replayed by the receiver after the snapshot.
pub(crate) async fn read_file_records(
    engine: &Engine,
    generation: u64,
    inode: u64,
) -> Result<Vec<SnapshotRecord>, String> {
    let id = |sector| SectorId {
        generation,
        inode,
        sector,
    };
    let Some(meta_bytes) = engine
        .read(id(SectorKind::Meta))
        .await
        .map_err(|error| error.to_string())?
    else {
        return Ok(Vec::new());
    };
    let meta: FileMeta = blocktree_core::encoding::decode(&meta_bytes)
        .map_err(|error| format!("inode {inode}: stored metadata: {error}"))?;
    let body = meta.body();
    let pieces = crate::pieces::piece_count(body.hash_algorithm, body.sector_count);
    let mut sectors: Vec<SectorKind> = (0..pieces).map(SectorKind::Merkle).collect();
    sectors.extend((0..body.sector_count).map(SectorKind::Data));
    let mut records = vec![SnapshotRecord {
        inode,
        sector: SectorKind::Meta,
        data: ByteBuf::from(meta_bytes),
    }];
    for window in sectors.chunks(SNAPSHOT_READS as usize) {
        let reads: Vec<_> = window
            .iter()
            .map(|sector| (*sector, engine.read(id(*sector))))
            .collect();
        for (sector, read) in reads {
            if let Some(data) = read.await.map_err(|error| error.to_string())? {
                records.push(SnapshotRecord {
                    inode,
                    sector,
                    data: ByteBuf::from(data),
                });
            }
        }
    }
    Ok(records)
}

/// Registers this member's raft service on its runtime.
pub(crate) fn register_service(
    shared: Arc<NetworkShared>,
) -> Result<(), blocktree_netstack::BttpError> {
    let Some(service) = raft_service_path(&shared.directory, shared.machine.node) else {
        return Err(blocktree_netstack::BttpError::Config(
            "the directory cannot hold a raft service path".into(),
        ));
    };
    let runtime = shared.runtime.clone();
    let control = runtime
        .path()
        .and_then(control_service_path)
        .ok_or_else(|| blocktree_netstack::BttpError::Config("no control service path".into()))?;
    let directory_control = directory_control_path(&shared.directory).ok_or_else(|| {
        blocktree_netstack::BttpError::Config("no directory control service path".into())
    })?;
    for path in [service, control, directory_control] {
        let shared = shared.clone();
        runtime.register_service(path, move |_id, mailbox| {
            tokio::spawn(serve(shared.clone(), mailbox));
        })?;
    }
    Ok(())
}

async fn serve(shared: Arc<NetworkShared>, mut mailbox: Mailbox) {
    while let Some(envelope) = mailbox.recv().await {
        let peer = envelope.peer().clone();
        let Ok((message, reply)) = envelope.open::<RaftMessage>() else {
            continue;
        };
        let Some(reply) = reply else {
            continue;
        };
        let shared = shared.clone();
        // Each call on a task of its own: a snapshot chunk being written must
        // not hold up heartbeats.
        tokio::spawn(async move {
            let answer = handle(&shared, &peer, message).await;
            let _ = reply.send(answer).await;
        });
    }
}

/// The member id of a peer whose runtime lies in the directory, or why not.
fn member_peer(shared: &NetworkShared, peer: &Peer) -> Result<(NodeId, BtPath), String> {
    match peer {
        Peer::Runtime { path, principal } if shared.directory.contains(path) => {
            Ok((crate::types::node_id_of(principal), path.clone()))
        }
        Peer::Runtime { path, .. } => Err(format!(
            "{path} is not in {}, whose cluster this is",
            shared.directory
        )),
        _ => Err("only runtimes in the directory may take part".into()),
    }
}

async fn handle(shared: &NetworkShared, peer: &Peer, message: RaftMessage) -> RaftReply {
    let (peer_id, peer_path) = match member_peer(shared, peer) {
        Ok(found) => found,
        Err(reason) => return RaftReply::Refused(reason),
    };
    let Some(raft) = shared.raft.get() else {
        return RaftReply::Refused("the member is starting".into());
    };
    match message {
        RaftMessage::AppendEntries(request) => {
            if !request.entries.is_empty() && !shared.append_delay.is_zero() {
                tokio::time::sleep(shared.append_delay).await;
            }
            match raft.append_entries(request).await {
                Ok(response) => RaftReply::AppendEntries(response),
                Err(error) => RaftReply::Refused(error.to_string()),
            }
        }
        RaftMessage::Vote(_) if Instant::now() < shared.votes_from => {
            RaftReply::Refused("the member has just started and does not vote yet".into())
        }
        RaftMessage::Vote(request) => match raft.vote(request).await {
            Ok(response) => RaftReply::Vote(response),
            Err(error) => RaftReply::Refused(error.to_string()),
        },
        RaftMessage::SnapshotBegin { id, vote } => snapshot_begin(shared, raft, id, vote).await,
        RaftMessage::SnapshotChunk { id, seq, records } => {
            snapshot_chunk(shared, id, seq, records).await
        }
        RaftMessage::SnapshotEnd {
            id,
            vote,
            meta,
            next_inode,
            next_generation,
            chunks,
        } => {
            let counters = (next_inode, next_generation);
            snapshot_end(shared, raft, id, vote, meta, counters, chunks).await
        }
        RaftMessage::Join { node } => {
            let node = MemberNode {
                addr: node.addr,
                path: Some(peer_path),
            };
            crate::raft::join_member(shared, raft, peer_id, node).await
        }
        RaftMessage::Leave => crate::raft::leave_member(shared, raft, peer_id).await,
        RaftMessage::FetchSectors { sectors } => fetch_sectors(shared, sectors).await,
        RaftMessage::Status => {
            RaftReply::Status(crate::raft::status_of(shared.machine.as_ref(), raft).await)
        }
        RaftMessage::UpdateNode { node, member } => {
            let member = MemberNode {
                addr: member.addr,
                path: Some(peer_path),
            };
            crate::raft::update_member(shared, raft, node, peer_id, member).await
        }
        RaftMessage::ReadIndex => match shared.member() {
            Some(member) => member.serve_read_index().await,
            None => RaftReply::Refused("the member is starting".into()),
        },
        RaftMessage::AllocateGeneration { directory } => {
            let Some(member) = shared.member() else {
                return RaftReply::Refused("the member is starting".into());
            };
            // Anyone in the domain may ask for the directory its writecap
            // proves; only members of this cluster forward others' requests.
            let forwarded = member.is_member(peer_id);
            if !forwarded && directory != peer_path {
                return RaftReply::Refused(format!(
                    "{peer_path} may ask for a generation number for its own directory only, \
                     not for {directory}"
                ));
            }
            tokio::task::spawn_blocking(move || member.serve_generation(&directory))
                .await
                .unwrap_or_else(|error| RaftReply::Refused(error.to_string()))
        }
        message @ (RaftMessage::ForwardWrite { .. } | RaftMessage::ReserveInodes) => {
            let Some(member) = shared.member() else {
                return RaftReply::Refused("the member is starting".into());
            };
            // The leader's write path blocks (file locks held while the
            // entry commits): run it off the runtime's workers.
            tokio::task::spawn_blocking(move || member.serve_forwarded(message))
                .await
                .unwrap_or_else(|error| RaftReply::Refused(error.to_string()))
        }
    }
}

async fn fetch_sectors(shared: &NetworkShared, sectors: Vec<(u64, SectorKind)>) -> RaftReply {
    if sectors.len() > FETCH_SECTORS {
        return RaftReply::Refused(format!("at most {FETCH_SECTORS} sectors per call"));
    }
    let applied = shared.machine.applied().last_applied.map(|id| id.index);
    let engine = shared.machine.store.engine();
    let generation = shared.machine.store.info.generation;
    let mut records = Vec::with_capacity(sectors.len());
    for (inode, sector) in sectors {
        let id = SectorId {
            generation,
            inode,
            sector,
        };
        match engine.read(id).await {
            Ok(data) => records.push((inode, sector, data.map(ByteBuf::from))),
            Err(error) => return RaftReply::Refused(format!("{id:?}: {error}")),
        }
    }
    RaftReply::Sectors { applied, records }
}

async fn snapshot_begin(shared: &NetworkShared, raft: &Raft, id: String, vote: Vote) -> RaftReply {
    let mine = raft.metrics().borrow().vote;
    if vote < mine {
        return RaftReply::Snapshot(SnapshotResponse { vote: mine });
    }
    let mut receiving = shared.receiving.lock().await;
    if let Some(previous) = receiving.take() {
        let _ = tokio::task::spawn_blocking(move || previous.engine.shutdown()).await;
    }
    let dir = shared.machine.incoming_dir();
    let config = shared.machine.engine_config.clone();
    let generation = shared.machine.store.info.generation;
    let created = tokio::task::spawn_blocking(move || {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|error| error.to_string())?;
        }
        Engine::create(config(dir), generation).map_err(|error| error.to_string())
    })
    .await;
    match created {
        Ok(Ok(engine)) => {
            tracing::info!(snapshot = %id, "receiving a snapshot");
            *receiving = Some(Receiving {
                id,
                engine,
                next_seq: 0,
            });
            RaftReply::Done
        }
        Ok(Err(reason)) => RaftReply::Refused(reason),
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

async fn snapshot_chunk(
    shared: &NetworkShared,
    id: String,
    seq: u64,
    records: Vec<SnapshotRecord>,
) -> RaftReply {
    let mut receiving = shared.receiving.lock().await;
    let Some(transfer) = receiving.as_mut().filter(|transfer| transfer.id == id) else {
        return RaftReply::Refused(format!("no snapshot transfer {id} is under way"));
    };
    if transfer.next_seq != seq {
        return RaftReply::Refused(format!(
            "chunk {seq} of {id} arrived where {} was expected",
            transfer.next_seq
        ));
    }
    let generation = shared.machine.store.info.generation;
    let mut batch = WriteBatch::new();
    for record in records {
        if record.inode == crate::statemachine::APPLIED_INODE {
            return RaftReply::Refused("a snapshot record names the reserved inode".into());
        }
        batch.put(
            SectorId {
                generation,
                inode: record.inode,
                sector: record.sector,
            },
            record.data.into_vec(),
        );
    }
    match transfer.engine.write(batch).await {
        Ok(()) => {
            transfer.next_seq += 1;
            RaftReply::Done
        }
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn snapshot_end(
    shared: &NetworkShared,
    raft: &Raft,
    id: String,
    vote: Vote,
    meta: SnapshotMeta<NodeId, MemberNode>,
    (next_inode, next_generation): (u64, u64),
    chunks: u64,
) -> RaftReply {
    let transfer = {
        let mut receiving = shared.receiving.lock().await;
        match receiving.take() {
            Some(transfer) if transfer.id == id && transfer.next_seq == chunks => transfer,
            other => {
                *receiving = other;
                return RaftReply::Refused(format!("snapshot {id} is incomplete"));
            }
        }
    };
    let engine = transfer.engine;
    let stopped = tokio::task::spawn_blocking(move || {
        engine.flush().wait()?;
        engine.shutdown()
    })
    .await;
    match stopped {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return RaftReply::Refused(error.to_string()),
        Err(error) => return RaftReply::Refused(error.to_string()),
    }
    let snapshot = Snapshot {
        meta,
        snapshot: Box::new(SnapshotData::Received {
            dir: shared.machine.incoming_dir(),
            next_inode,
            next_generation,
        }),
    };
    match raft.install_full_snapshot(vote, snapshot).await {
        Ok(response) => {
            *lock(&shared.snapshots_installed) += 1;
            RaftReply::Snapshot(response)
        }
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}
