//! [`RaftService`]: the sector service of one generation as an openraft
//! cluster (issue #7). Every write goes through Raft, also in a one-member
//! cluster (DESIGN decision 4).
//!
//! A data directory of a member holds:
//!
//! ```text
//! <dir>/generation        the generation and its directory (as DirectService's)
//! <dir>/node              this member's Raft id (hex)
//! <dir>/member            where it listens and its runtime path, for clients
//! <dir>/engine/           the state machine: the generation's sectors
//! <dir>/raft-log/         the Raft log, vote, committed and purged ids
//! <dir>/snapshot-incoming/  a snapshot being received (transient)
//! ```
//!
//! Writes: the leader verifies and stages the batch ([`crate::store`]) while
//! holding its files' locks, proposes the staged batch as one entry and
//! returns once the entry is applied. A member that is not the leader refuses
//! with [`ServiceError::NotLeader`], naming the leader and its address. Reads
//! are linearizable by default (openraft's read index, `ensure_linearizable`,
//! before the engine is read); [`ReadMode::Follower`] reads the local engine.

use crate::direct::{INFO_FILE, read_info, write_info};
use crate::logstore::EngineLogStore;
use crate::network::{
    self, BttpNetworkFactory, CONTROL_TIMEOUT, ClusterStatus, NetworkShared, RaftMessage, RaftReply,
};
use crate::service::{ReadAccess, SectorBatch, SectorService, ServiceError};
use crate::statemachine::{
    EngineConfigFn, INCOMING_DIR, MachineShared, SectorStateMachine, read_applied,
};
use crate::store::{GenerationInfo, SectorStore, lock, write_file_durably};
use crate::types::{MemberNode, NodeId, Raft, RaftRequest, node_id_of};
use blocktree_core::BtPath;
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, EngineConfig, EngineError};
use blocktree_netstack::{
    AccessPolicy, Credentials, Limits, Runtime, RuntimeConfig, RuntimeRecord,
};
use crossbeam_channel::Receiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Inode numbers one Raft entry reserves for the proposing member.
const INODE_RESERVATION: u64 = 1024;
/// Name of the file holding this member's Raft id.
const NODE_FILE: &str = "node";
/// Name of the file saying where this member listens.
const MEMBER_FILE: &str = "member";
/// Name of the Raft log's engine directory.
const LOG_DIR: &str = "raft-log";
/// How long a restarted member of a multi-member cluster waits to hear from
/// a leader before it may campaign.
const QUIET_START: Duration = Duration::from_secs(3);
/// How long a new leader's writes wait for its first entry to apply.
const LEADER_READY_WAIT: Duration = Duration::from_secs(5);

/// What [`RaftService::scrub`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Sectors (and inode numbers) read.
    pub sectors_checked: u64,
    /// Sectors found corrupt.
    pub corrupt: u64,
    /// Sectors replaced with copies from another member.
    pub repaired: u64,
}

/// Where reads are served from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Only on the leader, after confirming leadership with a quorum (read
    /// index): a read sees every write acknowledged before it started.
    #[default]
    Linearizable,
    /// From this member's engine as applied so far: possibly stale.
    Follower,
}

/// How to run a member.
#[derive(Clone)]
pub struct RaftConfig {
    /// The member's data directory.
    pub dir: PathBuf,
    /// The runtime credentials (key and writecap) it speaks bttp with; `None`
    /// runs a one-member cluster without network.
    pub credentials: Option<Credentials>,
    /// Where to listen (with credentials); port 0 picks one.
    pub listen: SocketAddr,
    /// Where reads are served from.
    pub read_mode: ReadMode,
    /// How the sector engine is configured for a directory.
    pub engine: EngineConfigFn,
    /// Raft timing: heartbeat interval; elections time out after 3–6 of them
    /// (openraft adds a leader lease of 6 and, for a member with a shorter
    /// log, 12 more: with 50 ms a dead leader is replaced in about 0.5–1.3 s).
    pub heartbeat: Duration,
    /// Entries between snapshots (after which the log before them is purged).
    pub snapshot_every: u64,
    /// How long a write waits to be committed and applied before it fails
    /// with [`ServiceError::Replication`] (outcome unknown): a leader cut off
    /// from its majority cannot commit.
    pub write_timeout: Duration,
}

impl RaftConfig {
    /// Defaults for a member in `dir`: no network, linearizable reads, the
    /// engine's default configuration, 50 ms heartbeats.
    pub fn new(dir: impl Into<PathBuf>) -> RaftConfig {
        RaftConfig {
            dir: dir.into(),
            credentials: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            read_mode: ReadMode::Linearizable,
            engine: Arc::new(EngineConfig::new),
            heartbeat: Duration::from_millis(50),
            snapshot_every: 4096,
            write_timeout: Duration::from_secs(30),
        }
    }

    /// The same, speaking bttp with `credentials` on `listen`.
    pub fn networked(mut self, credentials: Credentials, listen: SocketAddr) -> RaftConfig {
        self.credentials = Some(credentials);
        self.listen = listen;
        self
    }

    fn raft_config(&self) -> Result<openraft::Config, ServiceError> {
        let heartbeat = self.heartbeat.as_millis().max(10) as u64;
        let config = openraft::Config {
            cluster_name: "blocktree".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: heartbeat * 3,
            election_timeout_max: heartbeat * 6,
            install_snapshot_timeout: 600_000,
            max_payload_entries: 32,
            replication_lag_threshold: 1000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: (self.snapshot_every / 2).min(256),
            purge_batch_size: (self.snapshot_every / 4).clamp(1, 256),
            ..Default::default()
        };
        config
            .validate()
            .map_err(|error| ServiceError::Invalid(format!("raft configuration: {error}")))
    }
}

/// The sector service of one generation, replicated with Raft.
pub struct RaftService {
    store: Arc<SectorStore>,
    machine: Arc<MachineShared>,
    network: Option<Arc<NetworkShared>>,
    raft: Raft,
    log_engine: Engine,
    tokio: Option<tokio::runtime::Runtime>,
    dir: PathBuf,
    read_mode: ReadMode,
    write_timeout: Duration,
    /// Inode numbers reserved for this member and not yet handed out.
    inodes: Mutex<std::ops::Range<u64>>,
    /// The leadership this member last saw itself hold, and the last log
    /// index when it began (see [`RaftService::ensure_leader_ready`]).
    leader_ready: Mutex<Option<(openraft::LeaderId<NodeId>, u64)>>,
}

fn io(context: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError {
    let path = path.to_path_buf();
    move |source| {
        ServiceError::Engine(EngineError::Io {
            context,
            path,
            source,
        })
    }
}

fn raft_failure(error: impl std::fmt::Display) -> ServiceError {
    ServiceError::Replication(error.to_string())
}

impl RaftService {
    /// True if `dir` holds a member's data.
    pub fn exists(dir: &Path) -> bool {
        dir.join(INFO_FILE).exists() && dir.join(NODE_FILE).exists()
    }

    /// Creates a generation in `config.dir` as a new one-member cluster of
    /// this member, and starts it.
    pub fn create(config: RaftConfig, info: GenerationInfo) -> Result<RaftService, ServiceError> {
        if RaftService::exists(&config.dir) {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a generation",
                config.dir.display()
            )));
        }
        let node = match &config.credentials {
            Some(credentials) => node_id_of(&credentials.principal()),
            None => random_node_id(),
        };
        write_info(&config.dir, &info)?;
        write_node(&config.dir, node)?;
        RaftService::start(config, true)
    }

    /// Opens the member whose data is in `config.dir` (created by
    /// [`RaftService::create`] or [`RaftService::join`]).
    pub fn open(config: RaftConfig) -> Result<RaftService, ServiceError> {
        RaftService::start(config, false)
    }

    /// Opens the member in `config.dir`, or creates a one-member cluster there
    /// for `info` if the directory holds none: what `blocktree up` and the
    /// filesystem's local store do.
    pub fn open_or_create(
        config: RaftConfig,
        info: impl FnOnce() -> Result<GenerationInfo, ServiceError>,
    ) -> Result<RaftService, ServiceError> {
        if RaftService::exists(&config.dir) {
            RaftService::open(config)
        } else {
            let info = info()?;
            RaftService::create(config, info)
        }
    }

    /// Makes this (new, empty) data directory a member of the cluster the
    /// member at `peer_path`/`peer_addr` belongs to: learns the generation
    /// from it, starts, asks the leader to add it as a learner (it then
    /// receives the generation by snapshot and the log after it) and, once it
    /// has caught up, as a voter. Returns once it is a voter.
    ///
    /// `config.credentials` must hold a writecap whose path lies in the
    /// cluster's directory: that is what makes the cluster accept it.
    pub fn join(
        config: RaftConfig,
        peer_addr: SocketAddr,
        peer_path: BtPath,
    ) -> Result<RaftService, ServiceError> {
        let credentials = config.credentials.clone().ok_or_else(|| {
            ServiceError::Invalid("joining a cluster needs credentials with a writecap".into())
        })?;
        if RaftService::exists(&config.dir) {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a member; open it instead of joining",
                config.dir.display()
            )));
        }
        let status = query_status(&credentials, peer_addr, peer_path.clone())?;
        let info = GenerationInfo {
            generation: status.generation,
            directory: status.directory.clone(),
        };
        if !info.directory.contains(credentials.path()) {
            return Err(ServiceError::Invalid(format!(
                "this server's writecap is for {}, outside the cluster's directory {}; \
                 have the root grant it a writecap in that directory first",
                credentials.path(),
                info.directory
            )));
        }
        let dir = config.dir.clone();
        let joined = write_info(&dir, &info)
            .and_then(|()| write_node(&dir, node_id_of(&credentials.principal())))
            .and_then(|()| RaftService::start(config, false))
            .and_then(|service| service.request_join(status).map(|()| service));
        if joined.is_err() {
            // Leave the directory as it was, so that the join can be retried.
            for name in [INFO_FILE, NODE_FILE, MEMBER_FILE] {
                let _ = std::fs::remove_file(dir.join(name));
            }
            for name in [crate::direct::ENGINE_DIR, LOG_DIR, INCOMING_DIR] {
                let _ = std::fs::remove_dir_all(dir.join(name));
            }
        }
        joined
    }

    fn start(config: RaftConfig, bootstrap: bool) -> Result<RaftService, ServiceError> {
        let info = read_info(&config.dir)?;
        let node = read_node(&config.dir)?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("btraft")
            .enable_all()
            .build()
            .map_err(io("starting the Raft runtime for", &config.dir))?;
        let incoming = config.dir.join(INCOMING_DIR);
        if incoming.exists() {
            std::fs::remove_dir_all(&incoming).map_err(io("removing", &incoming))?;
        }
        let engine = Engine::open_or_create(
            (config.engine)(config.dir.join(crate::direct::ENGINE_DIR)),
            info.generation,
        )?;
        if engine.generation() != info.generation {
            return Err(ServiceError::Invalid(format!(
                "{} names generation {} but its engine stores {}",
                config.dir.join(INFO_FILE).display(),
                info.generation,
                engine.generation()
            )));
        }
        let log_engine = {
            let mut log_config = (config.engine)(config.dir.join(LOG_DIR));
            // One shard: the log's writes reach the disk in submission order.
            log_config.shards = 1;
            log_config.buffered_reads = false;
            Engine::open_or_create(log_config, info.generation)?
        };
        let store = Arc::new(SectorStore::new(engine.clone(), info.clone()));
        let raft_config = Arc::new(config.raft_config()?);
        let started = tokio.block_on(async {
            let applied = read_applied(&engine, info.generation)
                .await
                .map_err(raft_failure)?;
            let machine = Arc::new(MachineShared::new(
                store.clone(),
                config.dir.clone(),
                config.engine.clone(),
                node,
                applied,
            ));
            let log_store =
                EngineLogStore::open(log_engine.clone(), info.generation, machine.clone())
                    .await
                    .map_err(raft_failure)?;
            let (network, member) = match &config.credentials {
                Some(credentials) => {
                    let (network, member) = start_network(
                        credentials,
                        config.listen,
                        &info.directory,
                        machine.clone(),
                    )?;
                    (Some(network), member)
                }
                None => (None, MemberNode::default()),
            };
            let factory = BttpNetworkFactory {
                shared: network.clone(),
            };
            let state_machine = SectorStateMachine {
                shared: machine.clone(),
            };
            let raft = Raft::new(node, raft_config, factory, log_store, state_machine)
                .await
                .map_err(raft_failure)?;
            if let Some(network) = &network {
                let _ = network.raft.set(raft.clone());
                for (id, member) in raft.metrics().borrow().membership_config.nodes() {
                    network::add_route(&network.runtime, &info.directory, *id, member);
                }
            }
            // A restarted member of a multi-member cluster stays quiet until
            // it hears from a leader (or for QUIET_START): campaigning at once,
            // before the leader has noticed its restart and reconnected, would
            // only raise its term and depose a working leader.
            let voters = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .count();
            if voters > 1 {
                raft.runtime_config().elect(false);
                let quiet = raft.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + QUIET_START;
                    let mut metrics = quiet.metrics();
                    while metrics.borrow().current_leader.is_none()
                        && tokio::time::Instant::now() < deadline
                    {
                        let _ = tokio::time::timeout_at(deadline, metrics.changed()).await;
                    }
                    quiet.runtime_config().elect(true);
                });
            }
            if bootstrap && !raft.is_initialized().await.map_err(raft_failure)? {
                raft.initialize(BTreeMap::from([(node, member.clone())]))
                    .await
                    .map_err(raft_failure)?;
            }
            Ok::<_, ServiceError>((machine, network, raft, member))
        })?;
        let (machine, network, raft, member) = started;
        if network.is_some() {
            write_file_durably(
                &config.dir.join(MEMBER_FILE),
                format!(
                    "addr {}\npath {}\n",
                    member.addr,
                    member
                        .path
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                )
                .as_bytes(),
            )?;
        }
        Ok(RaftService {
            store,
            machine,
            network,
            raft,
            log_engine,
            tokio: Some(tokio),
            dir: config.dir,
            read_mode: config.read_mode,
            write_timeout: config.write_timeout,
            inodes: Mutex::new(0..0),
            leader_ready: Mutex::new(None),
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        match &self.tokio {
            Some(tokio) => tokio.block_on(future),
            // Only during drop, after the runtime is gone.
            None => block_on_this_thread(future),
        }
    }

    /// This member's Raft id.
    pub fn node_id(&self) -> NodeId {
        self.machine.node
    }

    /// The address this member listens on, if it has a network.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.network
            .as_ref()
            .and_then(|network| network.runtime.local_addr().ok())
    }

    /// The openraft handle (metrics, tests).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Refuses writes signed under `principal`'s authority from now on.
    pub fn revoke(&self, principal: blocktree_core::PrincipalId) {
        self.store.revoke(principal);
    }

    /// A digest of every sector this member stores for the generation, read
    /// from its own engine (not linearizable): members that applied the same
    /// entries have the same digest. Also counts the files. Reads every
    /// sector: meant for tests and `blocktree cluster verify`, not hot paths.
    pub fn content_digest(&self) -> Result<(String, u64), ServiceError> {
        let engine = self.store.engine();
        let generation = self.store.info.generation;
        let next_inode = self.machine.applied().next_inode;
        self.block_on(async {
            let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            let mut files = 0;
            for inode in 0..next_inode {
                let records = network::read_file_records(&engine, generation, inode)
                    .await
                    .map_err(ServiceError::Replication)?;
                if !records.is_empty() {
                    files += 1;
                }
                for record in records {
                    hasher.update(&record.inode.to_le_bytes());
                    hasher.update(
                        &blocktree_core::sector::SectorId {
                            generation,
                            inode: record.inode,
                            sector: record.sector,
                        }
                        .to_bytes(),
                    );
                    hasher.update(&(record.data.len() as u64).to_le_bytes());
                    hasher.update(&record.data);
                }
            }
            Ok((hex_string(hasher.finish().as_ref()), files))
        })
    }

    /// Reads every sector this member stores and repairs those its engine
    /// reports corrupt (checksum mismatch: flipped bits) with copies fetched
    /// from the leader (or, on the leader, another voter). The copies are
    /// written only while this member has applied no more than the member
    /// they came from, so the entries it applies afterwards bring them to
    /// the same state as everything else (as after a snapshot).
    pub fn scrub(&self) -> Result<ScrubReport, ServiceError> {
        let mut report = ScrubReport::default();
        // A corrupt metadata sector hides its file's other sectors: scan again
        // after repairing it.
        for pass in 0..3 {
            let (checked, corrupt) = self.block_on(self.find_corrupt());
            if pass == 0 {
                report.sectors_checked = checked;
            }
            if corrupt.is_empty() {
                return Ok(report);
            }
            report.corrupt += corrupt.len() as u64;
            for chunk in corrupt.chunks(network::FETCH_SECTORS) {
                self.repair(chunk)?;
                report.repaired += chunk.len() as u64;
            }
        }
        Ok(report)
    }

    async fn find_corrupt(&self) -> (u64, Vec<(u64, SectorKind)>) {
        let engine = self.store.engine();
        let generation = self.store.info.generation;
        let id = |inode, sector| SectorId {
            generation,
            inode,
            sector,
        };
        let mut checked = 0;
        let mut corrupt = Vec::new();
        for inode in 0..self.machine.applied().next_inode {
            checked += 1;
            let meta = match engine.read(id(inode, SectorKind::Meta)).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(_) => {
                    corrupt.push((inode, SectorKind::Meta));
                    continue;
                }
            };
            let Ok(meta) = blocktree_core::encoding::decode::<FileMeta>(&meta) else {
                corrupt.push((inode, SectorKind::Meta));
                continue;
            };
            let body = meta.body();
            let pieces = crate::pieces::piece_count(body.hash_algorithm, body.sector_count);
            let sectors = (0..pieces)
                .map(SectorKind::Merkle)
                .chain((0..body.sector_count).map(SectorKind::Data));
            for sector in sectors {
                checked += 1;
                if engine.read(id(inode, sector)).await.is_err() {
                    corrupt.push((inode, sector));
                }
            }
        }
        (checked, corrupt)
    }

    fn repair(&self, sectors: &[(u64, SectorKind)]) -> Result<(), ServiceError> {
        let network = self
            .network
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("repair needs other members".into()))?;
        let me = self.node_id();
        let generation = self.store.info.generation;
        for _attempt in 0..50 {
            let metrics = self.raft.metrics().borrow().clone();
            let membership = metrics.membership_config.membership();
            let source = metrics
                .current_leader
                .filter(|leader| *leader != me)
                .or_else(|| membership.voter_ids().find(|id| *id != me));
            let Some(source) = source else {
                return Err(ServiceError::Replication(
                    "no other member to repair from".into(),
                ));
            };
            let Some(member) = membership.get_node(&source).cloned() else {
                continue;
            };
            let reply = self.block_on(network::call_member(
                &network.runtime,
                &network.directory,
                source,
                &member,
                RaftMessage::FetchSectors {
                    sectors: sectors.to_vec(),
                },
                CONTROL_TIMEOUT,
            ));
            let (applied, records) = match reply {
                Ok(RaftReply::Sectors { applied, records }) => (applied, records),
                Ok(other) => return Err(reply_error(other)),
                Err(error) => {
                    tracing::warn!("fetching sectors to repair: {error}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let written = self.block_on(async {
                let _gate = self.machine.apply_gate.lock().await;
                let mine = self.machine.applied().last_applied.map(|id| id.index);
                if mine > applied {
                    // The copies are older than what this member applied.
                    return Ok(false);
                }
                let mut batch = blocktree_engine::WriteBatch::new();
                for (inode, sector, data) in &records {
                    let id = SectorId {
                        generation,
                        inode: *inode,
                        sector: *sector,
                    };
                    match data {
                        Some(data) => batch.put(id, data.to_vec()),
                        None => batch.delete(id),
                    };
                }
                self.store.engine().write_durable(batch).await?;
                Ok::<bool, EngineError>(true)
            })?;
            if written {
                for (inode, _, _) in &records {
                    self.store.mark_stale(*inode);
                }
                tracing::info!(sectors = records.len(), "repaired corrupt sectors");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServiceError::Replication(
            "could not fetch current copies of the corrupt sectors".into(),
        ))
    }

    /// Snapshots this member received and installed since it started.
    pub fn snapshots_installed(&self) -> u64 {
        self.network
            .as_ref()
            .map_or(0, |network| *lock(&network.snapshots_installed))
    }

    /// This member's view of the cluster: members, leader, term, commit index.
    pub fn status(&self) -> ClusterStatus {
        self.block_on(status_of(&self.machine, &self.raft))
    }

    /// Waits until some member is leader and this member has applied its
    /// first entry, or `timeout` passes; returns the leader.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ServiceError> {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = self.raft.metrics().borrow().clone();
            if let Some(leader) = metrics.current_leader
                && metrics.last_applied.is_some()
            {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Replication(format!(
                    "no leader within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// On the leader: adds `node` (listening as `member`) as a learner and
    /// waits until it has caught up.
    pub fn add_learner(&self, node: NodeId, member: MemberNode) -> Result<(), ServiceError> {
        self.block_on(async {
            self.raft
                .add_learner(node, member, true)
                .await
                .map_err(write_error)
                .map(|_| ())
        })
    }

    /// On the leader: makes learners `nodes` voters.
    pub fn promote(&self, nodes: BTreeSet<NodeId>) -> Result<(), ServiceError> {
        self.block_on(async {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(nodes), false)
                .await
                .map_err(write_error)
                .map(|_| ())
        })
    }

    /// On the leader: removes `nodes` from the cluster (voters and learners).
    pub fn remove(&self, nodes: BTreeSet<NodeId>) -> Result<(), ServiceError> {
        self.block_on(async {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(nodes.clone()), false)
                .await
                .map_err(write_error)?;
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(nodes), false)
                .await
                .map_err(write_error)
                .map(|_| ())
        })
    }

    /// Takes this member out of its cluster (`blocktree leave`): asks the
    /// leader to remove it, or removes itself when it leads.
    pub fn leave(&self) -> Result<(), ServiceError> {
        let me = self.node_id();
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader == Some(me) {
            return self.remove(BTreeSet::from([me]));
        }
        let reply = self.call_leader(RaftMessage::Leave)?;
        match reply {
            RaftReply::Done => Ok(()),
            other => Err(reply_error(other)),
        }
    }

    fn call_leader(&self, message: RaftMessage) -> Result<RaftReply, ServiceError> {
        let network = self
            .network
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("this member runs without a network".into()))?;
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics
            .current_leader
            .ok_or(ServiceError::NotLeader { leader: None })?;
        let member = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
            .ok_or(ServiceError::NotLeader { leader: None })?;
        self.block_on(network::call_member(
            &network.runtime,
            &network.directory,
            leader,
            &member,
            message,
            CONTROL_TIMEOUT,
        ))
        .map_err(raft_failure)
    }

    fn request_join(&self, status: ClusterStatus) -> Result<(), ServiceError> {
        let network = self
            .network
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("joining needs a network".into()))?;
        let me = MemberNode {
            addr: self
                .local_addr()
                .map(|addr| addr.to_string())
                .unwrap_or_default(),
            path: network.runtime.path().cloned(),
        };
        let mut target = status
            .leader
            .and_then(|leader| status.voters.iter().find(|(id, _)| *id == leader).cloned())
            .ok_or(ServiceError::NotLeader { leader: None })?;
        for _ in 0..5 {
            let reply = self
                .block_on(network::call_member(
                    &network.runtime,
                    &network.directory,
                    target.0,
                    &target.1,
                    RaftMessage::Join { node: me.clone() },
                    Duration::from_secs(3600),
                ))
                .map_err(raft_failure)?;
            match reply {
                RaftReply::Done => return Ok(()),
                RaftReply::NotLeader {
                    leader: Some(leader),
                    node: Some(node),
                } => target = (leader, node),
                other => return Err(reply_error(other)),
            }
        }
        Err(ServiceError::NotLeader { leader: None })
    }

    /// Waits (up to [`LEADER_READY_WAIT`]) until this member leads and has
    /// applied every entry its log held when its leadership began (entries of
    /// earlier leaders, or of this member's previous process): only then are
    /// the caches that writes are staged against current. Entries appended
    /// after that are this process's own, serialized by the file locks.
    fn ensure_leader_ready(&self) -> Result<(), ServiceError> {
        let deadline = Instant::now() + LEADER_READY_WAIT;
        loop {
            let metrics = self.raft.metrics().borrow().clone();
            match metrics.current_leader {
                Some(leader) if leader == self.node_id() => {}
                // An election is under way (or the member just started):
                // wait for its outcome rather than fail at once.
                None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                other => return Err(self.not_leader(other)),
            }
            let leading = *metrics.vote.leader_id();
            let target = {
                let mut ready = lock(&self.leader_ready);
                match &*ready {
                    Some((leader, target)) if *leader == leading => *target,
                    _ => {
                        let target = metrics.last_log_index.unwrap_or(0);
                        *ready = Some((leading, target));
                        target
                    }
                }
            };
            let applied = self.machine.applied().last_applied.map(|id| id.index);
            if metrics.vote.is_committed() && applied.is_some_and(|applied| applied >= target) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Replication(
                    "this member was elected but has not yet applied its predecessors' entries"
                        .into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn not_leader(&self, leader: Option<NodeId>) -> ServiceError {
        let described = leader.map(|leader| {
            let member = self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&leader)
                .cloned();
            match member {
                Some(member) => format!("{leader:016x} ({member})"),
                None => format!("{leader:016x}"),
            }
        });
        ServiceError::NotLeader { leader: described }
    }

    fn propose(
        &self,
        request: impl FnOnce(crate::types::Origin) -> RaftRequest,
    ) -> Result<crate::types::RaftResponse, ServiceError> {
        let origin = self.machine.propose();
        let timeout = self.write_timeout;
        let result = self.block_on(async {
            tokio::time::timeout(timeout, self.raft.client_write(request(origin))).await
        });
        self.machine.settled(origin);
        match result {
            Ok(result) => result.map(|response| response.data).map_err(write_error),
            Err(_) => Err(ServiceError::Replication(format!(
                "not committed within {timeout:?} (the leader may be cut off from its \
                 majority); the write may still be applied later"
            ))),
        }
    }

    fn before_read(&self) -> Result<(), ServiceError> {
        if self.read_mode == ReadMode::Follower {
            return Ok(());
        }
        let deadline = Instant::now() + LEADER_READY_WAIT;
        loop {
            match self.block_on(self.raft.ensure_linearizable()) {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(
                    forward,
                ))) => {
                    // No leader known yet: an election is under way.
                    if forward.leader_id.is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    return Err(self.not_leader(forward.leader_id));
                }
                Err(other) => return Err(raft_failure(other)),
            }
        }
    }
}

fn write_error(error: RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>) -> ServiceError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ServiceError::NotLeader {
                leader: forward.leader_id.map(|leader| match forward.leader_node {
                    Some(node) => format!("{leader:016x} ({node})"),
                    None => format!("{leader:016x}"),
                }),
            }
        }
        other => raft_failure(other),
    }
}

fn reply_error(reply: RaftReply) -> ServiceError {
    match reply {
        RaftReply::NotLeader { leader, node } => ServiceError::NotLeader {
            leader: leader.map(|leader| match node {
                Some(node) => format!("{leader:016x} ({node})"),
                None => format!("{leader:016x}"),
            }),
        },
        RaftReply::Refused(reason) => ServiceError::Replication(reason),
        other => ServiceError::Replication(format!("unexpected reply {other:?}")),
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn random_node_id() -> NodeId {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 1;
    }
    u64::from_le_bytes(bytes).max(1)
}

fn write_node(dir: &Path, node: NodeId) -> Result<(), ServiceError> {
    write_file_durably(&dir.join(NODE_FILE), format!("{node:016x}\n").as_bytes())
}

fn read_node(dir: &Path) -> Result<NodeId, ServiceError> {
    let path = dir.join(NODE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    u64::from_str_radix(text.trim_end_matches('\n'), 16).map_err(|error| {
        ServiceError::Engine(EngineError::Damaged {
            path,
            reason: error.to_string(),
        })
    })
}

/// The runtime limits of a member: Raft messages carry batches of entries and
/// snapshot chunks; a restarted peer is redialled quickly.
fn member_limits() -> Limits {
    Limits {
        max_message_size: 64 << 20,
        max_buffered_bytes_per_peer: 256 << 20,
        // A killed peer's connection is noticed within this (keep-alives at a
        // third of it), and its restarted process reached afresh.
        idle_timeout: Duration::from_secs(2),
        // A dial to a member that is down must not hold up the calls queued
        // behind it for long once it is back.
        handshake_timeout: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        receive_window: 16 << 20,
        ..Limits::default()
    }
}

fn start_network(
    credentials: &Credentials,
    listen: SocketAddr,
    directory: &BtPath,
    machine: Arc<MachineShared>,
) -> Result<(Arc<NetworkShared>, MemberNode), ServiceError> {
    let service = network::raft_service_path(directory, machine.node).ok_or_else(|| {
        ServiceError::Invalid(format!("{directory} cannot hold a raft service path"))
    })?;
    let control = network::control_service_path(credentials.path()).ok_or_else(|| {
        ServiceError::Invalid(format!(
            "{} cannot hold a control service path",
            credentials.path()
        ))
    })?;
    // Others may execute: any runtime of the domain may connect, and the raft
    // service itself admits only runtimes in the directory.
    let record = RuntimeRecord {
        uid: 0,
        gid: 0,
        mode: 0o751,
        services: [service, control].into(),
    };
    let mut runtime_config = RuntimeConfig::new(listen, AccessPolicy::new(record));
    runtime_config.limits = member_limits();
    let runtime = Runtime::start(runtime_config, credentials.clone()).map_err(raft_failure)?;
    let addr = runtime.local_addr().map_err(raft_failure)?;
    let shared = Arc::new(NetworkShared::new(runtime, directory.clone(), machine));
    network::register_service(shared.clone()).map_err(raft_failure)?;
    let member = MemberNode {
        addr: addr.to_string(),
        path: Some(credentials.path().clone()),
    };
    Ok((shared, member))
}

/// Asks the member at `peer_path`/`peer_addr` for its view of the cluster,
/// with `credentials` (which must lie in the cluster's directory).
pub fn query_status(
    credentials: &Credentials,
    peer_addr: SocketAddr,
    peer_path: BtPath,
) -> Result<ClusterStatus, ServiceError> {
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ServiceError::Replication(source.to_string()))?;
    tokio.block_on(async {
        let record = RuntimeRecord {
            uid: 0,
            gid: 0,
            mode: 0o700,
            services: BTreeSet::new(),
        };
        // Bound to the wildcard of the peer's family: a loopback socket cannot
        // reach another host.
        let bind = match peer_addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let config = RuntimeConfig::new(bind, AccessPolicy::new(record));
        let runtime = Runtime::start(config, credentials.clone()).map_err(raft_failure)?;
        let answer =
            network::call_control(&runtime, &peer_path, peer_addr, RaftMessage::Status).await;
        runtime.shutdown().await;
        match answer {
            Ok(RaftReply::Status(status)) => Ok(status),
            Ok(other) => Err(reply_error(other)),
            Err(error) => Err(raft_failure(error)),
        }
    })
}
/// Reads `<dir>/member` of a running member: its address and runtime path.
pub fn read_member_file(dir: &Path) -> Result<(SocketAddr, BtPath), ServiceError> {
    let path = dir.join(MEMBER_FILE);
    let text = std::fs::read_to_string(&path).map_err(io("reading", &path))?;
    let mut addr = None;
    let mut runtime_path = None;
    for line in text.split_terminator('\n') {
        match line.split_once(' ') {
            Some(("addr", value)) => addr = value.parse().ok(),
            Some(("path", value)) => runtime_path = value.parse().ok(),
            _ => {}
        }
    }
    match (addr, runtime_path) {
        (Some(addr), Some(runtime_path)) => Ok((addr, runtime_path)),
        _ => Err(ServiceError::Engine(EngineError::Damaged {
            path,
            reason: "expected an addr and a path line".into(),
        })),
    }
}

/// A member's view of the cluster.
pub(crate) async fn status_of(machine: &MachineShared, raft: &Raft) -> ClusterStatus {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut voter_list = Vec::new();
    let mut learner_list = Vec::new();
    for (id, node) in membership.nodes() {
        if voters.contains(id) {
            voter_list.push((*id, node.clone()));
        } else {
            learner_list.push((*id, node.clone()));
        }
    }
    let role = match metrics.state {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Learner => "Learner",
        ServerState::Shutdown => "Shutdown",
    };
    ClusterStatus {
        node: machine.node,
        role: role.into(),
        leader: metrics.current_leader,
        term: metrics.current_term,
        commit_index: *lock(&machine.committed),
        applied_index: metrics.last_applied.map(|id| id.index),
        last_log_index: metrics.last_log_index,
        voters: voter_list,
        learners: learner_list,
        generation: machine.store.info.generation,
        directory: machine.store.info.directory.clone(),
    }
}

/// On the member a joining server called: adds it as a learner, waits for
/// it to catch up, then makes it a voter.
pub(crate) async fn join_member(
    shared: &NetworkShared,
    raft: &Raft,
    node: NodeId,
    member: MemberNode,
) -> RaftReply {
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(shared.machine.node) {
        let leader = metrics.current_leader;
        let node = leader.and_then(|leader| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .cloned()
        });
        return RaftReply::NotLeader { leader, node };
    }
    network::add_route(&shared.runtime, &shared.directory, node, &member);
    tracing::info!(node = format!("{node:016x}"), %member, "adding a learner");
    if let Err(error) = raft.add_learner(node, member, true).await {
        return RaftReply::Refused(error.to_string());
    }
    tracing::info!(
        node = format!("{node:016x}"),
        "promoting the learner to voter"
    );
    match raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false)
        .await
    {
        Ok(_) => RaftReply::Done,
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

/// On the leader: removes member `node` at its own request.
pub(crate) async fn leave_member(shared: &NetworkShared, raft: &Raft, node: NodeId) -> RaftReply {
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(shared.machine.node) {
        return RaftReply::NotLeader {
            leader: metrics.current_leader,
            node: None,
        };
    }
    let nodes = BTreeSet::from([node]);
    if let Err(error) = raft
        .change_membership(ChangeMembers::RemoveVoters(nodes.clone()), false)
        .await
    {
        return RaftReply::Refused(error.to_string());
    }
    match raft
        .change_membership(ChangeMembers::RemoveNodes(nodes), false)
        .await
    {
        Ok(_) => RaftReply::Done,
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

impl SectorService for RaftService {
    fn generation(&self) -> u64 {
        self.store.info.generation
    }

    fn directory(&self) -> &BtPath {
        &self.store.info.directory
    }

    fn allocate_inode(&self) -> Result<u64, ServiceError> {
        let mut reserved = lock(&self.inodes);
        if reserved.is_empty() {
            self.ensure_leader_ready()?;
            let start = self.machine.applied().next_inode;
            let end = start
                .checked_add(INODE_RESERVATION)
                .filter(|end| *end < crate::statemachine::APPLIED_INODE)
                .ok_or_else(|| ServiceError::Invalid("inode numbers exhausted".into()))?;
            self.propose(|origin| RaftRequest::ReserveInodes { origin, start, end })?;
            *reserved = start..end;
        }
        reserved
            .next()
            .ok_or_else(|| ServiceError::Invalid("inode reservation empty".into()))
    }

    fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError> {
        self.before_read()?;
        self.store.read_meta(inode)
    }

    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError> {
        self.before_read()?;
        self.store.read_merkle_piece(inode, piece)
    }

    fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        self.before_read()?;
        self.store.read_data(inode, indices, access)
    }

    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        self.ensure_leader_ready()?;
        self.store.write_with(batch, |staged| {
            self.propose(|origin| RaftRequest::Write {
                origin,
                batch: staged,
            })
            .map(|_| ())
        })
    }

    fn flush(&self) -> Result<(), ServiceError> {
        // Entries are durable in the log before they are applied; this makes
        // the applied state durable too.
        Ok(self.store.engine().flush().wait()?)
    }

    fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        self.store.subscribe(inode)
    }

    fn space(&self) -> Result<(u64, u64), ServiceError> {
        crate::store::space(&self.dir)
    }
}

impl Drop for RaftService {
    /// Stops Raft and the network, then the engines, leaving checkpoints.
    fn drop(&mut self) {
        if let Some(tokio) = self.tokio.take() {
            tokio.block_on(async {
                if let Err(error) = self.raft.shutdown().await {
                    tracing::warn!("raft shutdown: {error}");
                }
                if let Some(network) = &self.network {
                    network.runtime.shutdown().await;
                }
            });
            tokio.shutdown_timeout(Duration::from_secs(2));
        }
        if let Err(error) = self.store.engine().shutdown() {
            tracing::warn!("sector engine shutdown: {error}");
        }
        if let Err(error) = self.log_engine.shutdown() {
            tracing::warn!("raft log engine shutdown: {error}");
        }
    }
}

/// Polls a future on this thread (used only once the runtime is gone).
fn block_on_this_thread<F: Future>(future: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}
