//! The Raft state machine: the sector engine itself.
//!
//! Applying entries writes their staged sector puts and deletes and the new
//! applied state (last applied log id, membership, next free inode) as *one*
//! atomic engine batch, so after any crash the engine holds exactly the
//! entries up to its recorded last applied id. Applies are not synced one by
//! one: an engine write survives a crash of the process, and before the log
//! store purges entries it flushes this engine, so an entry is never lost with
//! the log that held it (power loss rolls the state machine back to an applied
//! id whose successors the log still holds).
//!
//! Applying publishes write notifications and tells the service's file cache
//! which files entries from elsewhere changed.

use crate::codec::{self, RaftKind};
use crate::store::{SectorStore, lock};
use crate::types::{
    Entry, LogId, NodeId, RaftRequest, RaftResponse, SectorRaft, SnapshotData, StorageError,
    StoredMembership,
};
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, EngineConfig, WriteBatch};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The inode under which the applied state is kept in the sector engine
/// (never handed out: inode numbers count up from 3).
pub const APPLIED_INODE: u64 = u64::MAX;
/// The first inode a generation hands out (as the engine's superblock does).
pub const FIRST_INODE: u64 = 3;
/// The generation number of a domain's root directory: the one cluster that
/// numbers every other directory's generation.
pub const ROOT_GENERATION: u64 = 1;
/// The directory a snapshot is received into, beside the engine's.
pub const INCOMING_DIR: &str = "snapshot-incoming";

/// How an engine is configured for a store directory.
pub type EngineConfigFn = Arc<dyn Fn(PathBuf) -> EngineConfig + Send + Sync>;

/// What the state machine has applied, stored with every applied batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    /// The last entry applied.
    pub last_applied: Option<LogId>,
    /// The last membership applied.
    pub membership: StoredMembership,
    /// The generation's next free inode.
    pub next_inode: u64,
    /// In the root generation: the next generation number to hand out to a
    /// new directory's cluster (unused elsewhere).
    pub next_generation: u64,
}

impl Default for AppliedState {
    fn default() -> Self {
        AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
            next_inode: FIRST_INODE,
            next_generation: ROOT_GENERATION + 1,
        }
    }
}

/// The applied state as stores written before generation numbering kept it.
#[derive(Deserialize)]
struct AppliedStateV1 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    next_inode: u64,
}

impl AppliedState {
    /// Decodes a stored applied state, also one written before
    /// `next_generation` existed (which then starts at the default).
    pub fn decode(bytes: &[u8]) -> Result<AppliedState, codec::CodecError> {
        codec::decode(RaftKind::AppliedState, bytes).or_else(|error| {
            let old: AppliedStateV1 =
                codec::decode(RaftKind::AppliedState, bytes).map_err(|_| error)?;
            Ok(AppliedState {
                last_applied: old.last_applied,
                membership: old.membership,
                next_inode: old.next_inode,
                ..AppliedState::default()
            })
        })
    }
}

fn sm_error(verb: ErrorVerb, error: impl ToString) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::error(error.to_string()),
    )
    .into()
}

/// What the state machine shares with the service and the network.
pub(crate) struct MachineShared {
    pub(crate) store: Arc<SectorStore>,
    /// The data directory (the engine's directory is `<dir>/engine`).
    pub(crate) dir: PathBuf,
    pub(crate) engine_config: EngineConfigFn,
    pub(crate) node: NodeId,
    /// Drawn at start: tells this process's proposals from earlier ones.
    pub(crate) boot: u64,
    next_seq: AtomicU64,
    /// Proposals of this process whose writers still wait for them.
    inflight: Mutex<HashSet<u64>>,
    pub(crate) applied: Mutex<AppliedState>,
    /// Held while entries are applied, and by a repair that writes sectors
    /// fetched from another member, so the two never interleave.
    pub(crate) apply_gate: tokio::sync::Mutex<()>,
    /// Log ids of snapshots being sent now: the log after them must stay
    /// until they are installed, or the receiver would need another snapshot.
    pub(crate) sending: Mutex<Vec<LogId>>,
    /// Set while the log holds more than its byte budget
    /// ([`crate::RaftConfig::log_bytes`]): snapshots then ignore `sending`,
    /// so a receiver that cannot keep up costs another snapshot, not an
    /// unbounded log.
    pub(crate) log_over_budget: AtomicBool,
    /// The highest log index known committed (kept by the log store).
    pub(crate) committed: Mutex<Option<u64>>,
}

impl MachineShared {
    pub(crate) fn new(
        store: Arc<SectorStore>,
        dir: PathBuf,
        engine_config: EngineConfigFn,
        node: NodeId,
        applied: AppliedState,
    ) -> MachineShared {
        let mut random = [0u8; 8];
        // A boot number only has to differ from the last one; the time will do
        // if the system has no randomness to give.
        let boot = match getrandom::fill(&mut random) {
            Ok(()) => u64::from_le_bytes(random),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64),
        };
        MachineShared {
            store,
            dir,
            engine_config,
            node,
            boot,
            next_seq: AtomicU64::new(0),
            inflight: Mutex::new(HashSet::new()),
            applied: Mutex::new(applied),
            committed: Mutex::new(None),
            sending: Mutex::new(Vec::new()),
            log_over_budget: AtomicBool::new(false),
            apply_gate: tokio::sync::Mutex::new(()),
        }
    }

    /// A fresh origin for a proposal; the caller must call [`Self::settled`]
    /// when it stops waiting for it.
    pub(crate) fn propose(&self) -> crate::types::Origin {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.inflight).insert(seq);
        crate::types::Origin {
            node: self.node,
            boot: self.boot,
            seq,
        }
    }

    /// The writer of proposal `origin` no longer waits for it.
    pub(crate) fn settled(&self, origin: crate::types::Origin) {
        lock(&self.inflight).remove(&origin.seq);
    }

    fn is_waited_for(&self, origin: &crate::types::Origin) -> bool {
        origin.node == self.node
            && origin.boot == self.boot
            && lock(&self.inflight).contains(&origin.seq)
    }

    pub(crate) fn applied(&self) -> AppliedState {
        lock(&self.applied).clone()
    }

    /// True if the applied membership is this member alone (no other voter,
    /// no learner).
    pub(crate) fn alone(&self) -> bool {
        let applied = lock(&self.applied);
        let membership = applied.membership.membership();
        let mut nodes = membership.nodes().map(|(id, _)| *id);
        nodes.next() == Some(self.node) && nodes.next().is_none()
    }

    /// The index of the last entry applied.
    pub(crate) fn applied_index(&self) -> Option<u64> {
        lock(&self.applied).last_applied.map(|id| id.index)
    }

    fn applied_id(&self) -> SectorId {
        SectorId {
            generation: self.store.info.generation,
            inode: APPLIED_INODE,
            sector: SectorKind::Meta,
        }
    }

    fn engine_dir(&self) -> PathBuf {
        self.dir.join(crate::direct::ENGINE_DIR)
    }

    /// The directory a snapshot is received into.
    pub(crate) fn incoming_dir(&self) -> PathBuf {
        self.dir.join(INCOMING_DIR)
    }

    /// The meta of a snapshot of the state as applied now.
    fn snapshot_meta(&self) -> SnapshotMeta<NodeId, crate::types::MemberNode> {
        let applied = self.applied();
        let snapshot_id = match &applied.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, self.boot),
            None => format!("empty-{}", self.boot),
        };
        SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
            snapshot_id,
        }
    }
}

/// Reads the applied state stored in `engine` (the default for a new store).
pub(crate) async fn read_applied(
    engine: &Engine,
    generation: u64,
) -> Result<AppliedState, StorageError> {
    let id = SectorId {
        generation,
        inode: APPLIED_INODE,
        sector: SectorKind::Meta,
    };
    match engine
        .read(id)
        .await
        .map_err(|error| sm_error(ErrorVerb::Read, error))?
    {
        Some(bytes) => {
            AppliedState::decode(&bytes).map_err(|error| sm_error(ErrorVerb::Read, error))
        }
        None => Ok(AppliedState::default()),
    }
}

/// Stores `applied` in `engine` durably (a received snapshot's store).
pub(crate) async fn write_applied(
    engine: &Engine,
    generation: u64,
    applied: &AppliedState,
) -> Result<(), StorageError> {
    let mut batch = WriteBatch::new();
    batch.put(
        SectorId {
            generation,
            inode: APPLIED_INODE,
            sector: SectorKind::Meta,
        },
        codec::encode(RaftKind::AppliedState, applied),
    );
    engine
        .write_durable(batch)
        .await
        .map_err(|error| sm_error(ErrorVerb::Write, error))
}

/// The state machine (and its snapshot builder: a clone).
#[derive(Clone)]
pub struct SectorStateMachine {
    pub(crate) shared: Arc<MachineShared>,
}

impl RaftSnapshotBuilder<SectorRaft> for SectorStateMachine {
    /// A snapshot is the engine as it is: building one only makes what was
    /// applied durable, so the log before it can be purged. While a snapshot
    /// is being sent, a new one claims no later log id than it (openraft then
    /// keeps the older one), so the entries its receiver needs next are not
    /// purged under it — unless the log has outgrown its byte budget.
    async fn build_snapshot(&mut self) -> Result<Snapshot<SectorRaft>, StorageError> {
        let mut meta = self.shared.snapshot_meta();
        let over_budget = self.shared.log_over_budget.load(Ordering::Acquire);
        if let Some(oldest) = lock(&self.shared.sending).iter().min().copied()
            && meta.last_log_id > Some(oldest)
            && !over_budget
        {
            meta.last_log_id = Some(oldest);
        }
        self.shared
            .store
            .engine()
            .flush()
            .await
            .map_err(|error| sm_error(ErrorVerb::Write, error))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::Local),
        })
    }
}

impl RaftStateMachine<SectorRaft> for SectorStateMachine {
    type SnapshotBuilder = SectorStateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.shared.applied();
        Ok((applied.last_applied, applied.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<RaftResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let shared = &self.shared;
        let _gate = shared.apply_gate.lock().await;
        let generation = shared.store.info.generation;
        let mut applied = shared.applied();
        let mut batch = WriteBatch::new();
        let mut responses = Vec::new();
        let mut notes = Vec::new();
        let mut stale = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let mut refused = false;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(request) => {
                    let ours = shared.is_waited_for(&request.origin());
                    match request {
                        // Decided by the entry alone, so every member (and a
                        // replay over a snapshot) decides alike.
                        RaftRequest::WriteInTerm { term, .. }
                            if term != entry.log_id.leader_id.term =>
                        {
                            refused = true;
                        }
                        RaftRequest::Write { batch: staged, .. }
                        | RaftRequest::WriteInTerm { batch: staged, .. } => {
                            if !ours {
                                stale.extend(staged.written.iter().map(|(inode, _)| *inode));
                                stale.extend(staged.ops.iter().map(|op| op.inode));
                            }
                            notes.push(staged.written.clone());
                            staged.into_engine_batch(generation, &mut batch);
                        }
                        RaftRequest::ReserveInodes { end, .. } => {
                            applied.next_inode = applied.next_inode.max(end);
                        }
                        RaftRequest::AllocateGeneration { generation, .. } => {
                            applied.next_generation =
                                applied.next_generation.max(generation.saturating_add(1));
                        }
                    }
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            responses.push(RaftResponse {
                next_inode: applied.next_inode,
                refused,
            });
        }
        batch.put(
            shared.applied_id(),
            codec::encode(RaftKind::AppliedState, &applied),
        );
        shared
            .store
            .engine()
            .write(batch)
            .await
            .map_err(|error| sm_error(ErrorVerb::Write, error))?;
        *lock(&shared.applied) = applied;
        stale.sort_unstable();
        stale.dedup();
        for inode in stale {
            shared.store.mark_stale(inode);
        }
        for written in &notes {
            shared.store.notify(written);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        // Snapshots arrive through the service's own transport, which builds
        // the received store itself (see `network`).
        Err(sm_error(
            ErrorVerb::Write,
            "snapshots are received by the bttp transport, not through openraft's chunks",
        ))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, crate::types::MemberNode>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let SnapshotData::Received {
            dir,
            next_inode,
            next_generation,
        } = *snapshot
        else {
            // Our own engine is already the snapshot.
            return Ok(());
        };
        let shared = &self.shared;
        let generation = shared.store.info.generation;
        let applied = AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            next_inode,
            next_generation,
        };
        let config = shared.engine_config.clone();
        let received = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Engine::open(config(dir)))
                .await
                .map_err(|error| sm_error(ErrorVerb::Write, error))?
                .map_err(|error| sm_error(ErrorVerb::Write, error))?
        };
        write_applied(&received, generation, &applied).await?;
        let engine_dir = shared.engine_dir();
        let old = shared.store.engine();
        let shared_for_swap = shared.clone();
        let new_engine = tokio::task::spawn_blocking(move || {
            received.shutdown()?;
            drop(received);
            old.shutdown()?;
            drop(old);
            exchange_dirs(&dir, &engine_dir)?;
            let engine = Engine::open((shared_for_swap.engine_config)(engine_dir))?;
            let old = shared_for_swap.store.replace_engine(engine.clone());
            drop(old);
            if let Err(error) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("removing the replaced store {}: {error}", dir.display());
            }
            Ok::<Engine, blocktree_engine::EngineError>(engine)
        })
        .await
        .map_err(|error| sm_error(ErrorVerb::Write, error))?
        .map_err(|error| sm_error(ErrorVerb::Write, error))?;
        drop(new_engine);
        *lock(&shared.applied) = applied;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            "installed a snapshot received from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<SectorRaft>>, StorageError> {
        let meta = self.shared.snapshot_meta();
        if meta.last_log_id.is_none() {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::Local),
        }))
    }
}

/// Swaps two directories atomically (`renameat2(RENAME_EXCHANGE)`) and syncs
/// their parent, so a crash leaves either the old store in place or the new.
fn exchange_dirs(a: &Path, b: &Path) -> Result<(), blocktree_engine::EngineError> {
    let io = |context: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| blocktree_engine::EngineError::Io {
            context,
            path,
            source,
        }
    };
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|errno| io("exchanging", b)(errno.into()))?;
    if let Some(parent) = b.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing", parent))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct OldAppliedState {
        last_applied: Option<LogId>,
        membership: StoredMembership,
        next_inode: u64,
    }

    #[test]
    fn an_applied_state_stored_before_generation_numbering_still_decodes() {
        let old = codec::encode(
            RaftKind::AppliedState,
            &OldAppliedState {
                last_applied: None,
                membership: StoredMembership::default(),
                next_inode: 77,
            },
        );
        let decoded = AppliedState::decode(&old).unwrap();
        assert_eq!(decoded.next_inode, 77);
        assert_eq!(decoded.next_generation, ROOT_GENERATION + 1);

        let new = AppliedState {
            next_generation: 9,
            ..decoded
        };
        let encoded = codec::encode(RaftKind::AppliedState, &new);
        assert_eq!(AppliedState::decode(&encoded).unwrap(), new);
        assert!(AppliedState::decode(&[1]).is_err());
        assert!(AppliedState::decode(&encoded[..3]).is_err());
    }

    /// A batch staged on unapplied ones names the term they were proposed in:
    /// in an entry of that term it is applied, in an entry of a later term
    /// (its predecessors may have been lost) it stores nothing and answers
    /// `refused`. Plain writes apply in any term.
    #[test]
    fn a_write_in_term_applies_only_in_an_entry_of_its_term() {
        let dir = tempfile::tempdir().unwrap();
        let generation = 7;
        let engine =
            Engine::open_or_create(EngineConfig::new(dir.path().join("engine")), generation)
                .unwrap();
        let info = crate::store::GenerationInfo {
            generation,
            directory: format!("/{}/servers", "A".repeat(43)).parse().unwrap(),
        };
        let store = Arc::new(SectorStore::new(engine.clone(), info));
        let node = 1;
        let shared = Arc::new(MachineShared::new(
            store,
            dir.path().to_path_buf(),
            Arc::new(EngineConfig::new),
            node,
            AppliedState::default(),
        ));
        let mut machine = SectorStateMachine { shared };
        let origin = crate::types::Origin {
            node,
            boot: 1,
            seq: 1,
        };
        let put = |sector: u64, byte: u8| {
            let mut batch = crate::store::StagedBatch::default();
            batch.ops.push(crate::store::SectorOp {
                inode: 40,
                sector: SectorKind::Data(sector),
                data: Some(bytes::Bytes::from(vec![byte; 64])),
            });
            batch
        };
        let entry = |term: u64, index: u64, request: RaftRequest| Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, node), index),
            payload: EntryPayload::Normal(request),
        };
        let entries = vec![
            entry(
                3,
                1,
                RaftRequest::WriteInTerm {
                    origin,
                    term: 3,
                    batch: put(0, 1),
                },
            ),
            entry(
                4,
                2,
                RaftRequest::WriteInTerm {
                    origin,
                    term: 3,
                    batch: put(1, 2),
                },
            ),
            entry(
                4,
                3,
                RaftRequest::Write {
                    origin,
                    batch: put(2, 3),
                },
            ),
        ];
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let responses = runtime.block_on(machine.apply(entries)).unwrap();
        let refused: Vec<bool> = responses.iter().map(|response| response.refused).collect();
        assert_eq!(refused, [false, true, false]);
        let stored = |sector: u64| {
            engine
                .read(SectorId {
                    generation,
                    inode: 40,
                    sector: SectorKind::Data(sector),
                })
                .wait()
                .unwrap()
        };
        assert_eq!(stored(0), Some(vec![1; 64]));
        assert_eq!(stored(1), None, "a write refused for its term stored data");
        assert_eq!(stored(2), Some(vec![3; 64]));
        engine.shutdown().unwrap();
    }
}
