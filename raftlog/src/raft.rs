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
//! returns once the entry is applied. A follower with a network forwards
//! writes, inode reservations and read-index requests to the leader and
//! waits until it has applied what the leader answered; without a network a
//! member that does not lead refuses with [`ServiceError::NotLeader`]. Reads
//! are linearizable by default: free on a one-voter leader, under a lease
//! ([`crate::lease`]) or after a read-index round on a larger cluster's
//! leader, through the leader's read index on a follower;
//! [`ReadMode::Follower`] reads the local engine.

use crate::direct::{INFO_FILE, read_info, write_info};
use crate::lease::ReadLease;
use crate::logstore::EngineLogStore;
use crate::network::{
    self, BttpNetworkFactory, CONTROL_TIMEOUT, ClusterStatus, FailureKind, NetworkShared,
    RaftMessage, RaftReply,
};
use crate::pace::Pace;
use crate::service::{ReadAccess, SectorBatch, SectorService, ServiceError};
use crate::statemachine::{
    EngineConfigFn, INCOMING_DIR, MachineShared, ROOT_GENERATION, SectorStateMachine, read_applied,
    write_applied,
};
use crate::store::{GenerationInfo, SectorStore, lock, write_file_durably};
use crate::types::{MemberNode, NodeId, Raft, RaftRequest, node_id_of};
use blocktree_core::BtPath;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::FileMeta;
use blocktree_core::sector::{SectorId, SectorKind};
use blocktree_engine::{Engine, EngineConfig, EngineError};
use blocktree_netstack::{
    AccessPolicy, Credentials, Limits, Runtime, RuntimeConfig, RuntimeRecord,
};
use crossbeam_channel::Receiver;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
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
/// How often a forwarded write whose answer was lost (its leader died or was
/// deposed) is found not applied and sent again before its caller hears of it.
const UNKNOWN_OUTCOME_RETRIES: u32 = 3;
/// How many data sectors a scrub reads at once.
const SCRUB_READS_IN_FLIGHT: u64 = 256;
/// How many corrupt sectors one read repairs from other members before it
/// gives up and reports the next.
const READ_REPAIRS: u32 = 64;
/// How long a member waits for a snapshot or purge it asked for before it
/// looks again (a snapshot being sent holds purges back).
const LOG_BOUND_RETRY: Duration = Duration::from_secs(1);

/// What [`RaftService::scrub`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Sectors (and inode numbers) read.
    pub sectors_checked: u64,
    /// Sectors found corrupt.
    pub corrupt: u64,
    /// Sectors replaced with copies from another member.
    pub repaired: u64,
    /// Bytes read from the engine by the first pass.
    pub bytes_read: u64,
}

/// Where reads are served from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// A read sees every write acknowledged before it started (on any member:
    /// see the module documentation for what that costs).
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
    /// Bytes of log entries past which the member snapshots and purges
    /// whatever their count, keeping the newest quarter for followers a
    /// little behind. An entry is a whole write batch (up to 16 MiB), so
    /// the count alone would let the log grow to tens of GiB, and opening a
    /// member reads the part-0 record of every entry it holds.
    pub log_bytes: u64,
    /// How long a write waits to be committed and applied before it fails
    /// with [`ServiceError::Replication`] (outcome unknown): a leader cut off
    /// from its majority cannot commit. A linearizable read retries its
    /// read-index round as long before it fails the same way.
    pub write_timeout: Duration,
    /// Fault injection for tests: this member waits this long before it
    /// takes each append that carries entries, as behind a far link or a slow
    /// disk. Zero (the default) in production.
    pub append_delay: Duration,
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
            log_bytes: 128 << 20,
            write_timeout: Duration::from_secs(30),
            append_delay: Duration::ZERO,
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
    member: Arc<Member>,
    log_engine: Engine,
    /// Bytes of the entries the log holds.
    log_held: tokio::sync::watch::Receiver<u64>,
    tokio: Option<tokio::runtime::Runtime>,
}

/// A running member: what [`RaftService`] does, shared with the network's
/// handlers, which serve the requests followers forward to the leader.
pub(crate) struct Member {
    store: Arc<SectorStore>,
    machine: Arc<MachineShared>,
    network: Option<Arc<NetworkShared>>,
    raft: Raft,
    /// The member's Tokio runtime (owned by [`RaftService`]).
    handle: tokio::runtime::Handle,
    dir: PathBuf,
    read_mode: ReadMode,
    write_timeout: Duration,
    /// Inode numbers reserved for this member and not yet handed out.
    inodes: Mutex<std::ops::Range<u64>>,
    /// Held while a reservation is proposed on the leader: each reads the
    /// next free inode before proposing, so two must not overlap.
    reserving: Mutex<()>,
    /// The leadership this member last saw itself hold, and the last log
    /// index when it began (see [`Member::ensure_leader_ready`]).
    leader_ready: Mutex<Option<(openraft::LeaderId<NodeId>, u64)>>,
    /// The leader's read lease (multi-member clusters).
    lease: ReadLease,
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
        } else if config.dir.join(INFO_FILE).exists()
            && config.dir.join(crate::direct::ENGINE_DIR).exists()
            && !config.dir.join(LOG_DIR).exists()
        {
            // A generation `DirectService` wrote (never a member: those have
            // a log, also when a join failed half-way).
            RaftService::upgrade(config)
        } else {
            let info = info()?;
            RaftService::create(config, info)
        }
    }

    /// Makes the pre-Raft store `DirectService` left in `config.dir` a
    /// one-member cluster, in place: the engine (its sectors) becomes the
    /// state machine, and the cluster's inode counter starts past every
    /// number `DirectService` handed out (kept in the engine's superblock).
    fn upgrade(config: RaftConfig) -> Result<RaftService, ServiceError> {
        let info = read_info(&config.dir)?;
        let engine = Engine::open((config.engine)(config.dir.join(crate::direct::ENGINE_DIR)))?;
        // Reserving one number is how the superblock's counter is read; the
        // number is never used.
        let reached = engine.allocate_inodes(1)?.end;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting a runtime to upgrade", &config.dir))?;
        let raised = runtime.block_on(async {
            let mut applied = read_applied(&engine, info.generation).await?;
            applied.next_inode = applied.next_inode.max(reached);
            write_applied(&engine, info.generation, &applied).await
        });
        let stopped = engine.shutdown();
        raised.map_err(raft_failure)?;
        stopped?;
        drop(engine);
        let node = match &config.credentials {
            Some(credentials) => node_id_of(&credentials.principal()),
            None => random_node_id(),
        };
        // Written last: until it exists the directory is still a pre-Raft
        // store, and upgrading again is harmless.
        write_node(&config.dir, node)?;
        tracing::info!(
            dir = %config.dir.display(),
            next_inode = reached,
            "upgraded a pre-Raft store to a one-member cluster"
        );
        RaftService::start(config, true)
    }

    /// Makes this (new, empty) data directory a member of the cluster the
    /// member at `peer_path`/`peer_addr` belongs to: learns the generation
    /// from it, starts, asks the leader to add it as a learner (it then
    /// receives the generation by snapshot and the log after it) and, once it
    /// has caught up, as a voter. Returns once it is a voter and has applied
    /// the entry that made it one.
    ///
    /// `config.credentials` must hold a writecap whose path lies in the
    /// cluster's directory: that is what makes the cluster accept it.
    pub fn join(
        config: RaftConfig,
        peer_addr: SocketAddr,
        peer_path: BtPath,
    ) -> Result<RaftService, ServiceError> {
        let credentials = RaftService::joining(&config)?;
        let status = query_status(&credentials, peer_addr, peer_path)?;
        RaftService::join_with(config, credentials, status)
    }

    /// [`RaftService::join`] knowing only a member's address (`blocktree
    /// join --data D --listen A <peer addr>`): the member's runtime path is
    /// found at the handshake ([`query_status_at`]).
    pub fn join_address(
        config: RaftConfig,
        peer_addr: SocketAddr,
    ) -> Result<RaftService, ServiceError> {
        let credentials = RaftService::joining(&config)?;
        let status = query_status_at(&credentials, peer_addr)?;
        RaftService::join_with(config, credentials, status)
    }

    /// The credentials to join with, if `config` may join.
    fn joining(config: &RaftConfig) -> Result<Credentials, ServiceError> {
        let credentials = config.credentials.clone().ok_or_else(|| {
            ServiceError::Invalid("joining a cluster needs credentials with a writecap".into())
        })?;
        if RaftService::exists(&config.dir) || config.dir.join(INFO_FILE).exists() {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a generation; open it instead of joining",
                config.dir.display()
            )));
        }
        Ok(credentials)
    }

    fn join_with(
        config: RaftConfig,
        credentials: Credentials,
        status: ClusterStatus,
    ) -> Result<RaftService, ServiceError> {
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
            .and_then(|service| service.member.request_join(status).map(|()| service))
            .and_then(|service| service.member.await_joined_applied().map(|()| service));
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
            // Entries are read from the log's cache; the disk only after a
            // restart or for a lagging follower, one entry after another.
            log_config.read_buffers = log_config.read_buffers.min(16);
            Engine::open_or_create(log_config, info.generation)?
        };
        let store = Arc::new(SectorStore::new(engine.clone(), info.clone()));
        let raft_config = Arc::new(config.raft_config()?);
        let election_timeout_min = Duration::from_millis(raft_config.election_timeout_min);
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
                        election_timeout_min,
                        config.append_delay,
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
            let bounded_log = log_store.clone();
            let log_held = log_store.held_bytes();
            let raft = Raft::new(node, raft_config, factory, log_store, state_machine)
                .await
                .map_err(raft_failure)?;
            tokio::spawn(bound_log(
                raft.clone(),
                bounded_log,
                machine.clone(),
                config.log_bytes,
            ));
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
            // A member that moved (or first got a network) brings its entry
            // in the membership up to date once it runs.
            // (The applied membership: openraft's metrics may not report the
            // stored state yet this early.)
            let recorded = machine
                .applied()
                .membership
                .membership()
                .get_node(&node)
                .cloned();
            let update_address = match recorded {
                Some(recorded) if network.is_some() && recorded != member => Some(member.clone()),
                _ => None,
            };
            Ok::<_, ServiceError>((machine, network, raft, member, update_address, log_held))
        })?;
        let (machine, network, raft, member, update_address, log_held) = started;
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
        let member = Arc::new(Member {
            store,
            machine,
            network,
            raft,
            handle: tokio.handle().clone(),
            dir: config.dir,
            read_mode: config.read_mode,
            write_timeout: config.write_timeout,
            inodes: Mutex::new(0..0),
            reserving: Mutex::new(()),
            leader_ready: Mutex::new(None),
            lease: ReadLease::new(election_timeout_min, config.write_timeout),
        });
        if let Some(network) = &member.network {
            let _ = network.member.set(Arc::downgrade(&member));
        }
        let service = RaftService {
            member,
            log_engine,
            log_held,
            tokio: Some(tokio),
        };
        if let Some(update) = update_address {
            service.member.keep_address_current(update)?;
        }
        Ok(service)
    }
}

impl RaftService {
    /// This member's Raft id.
    pub fn node_id(&self) -> NodeId {
        self.member.node_id()
    }

    /// The address this member listens on, if it has a network.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.member.local_addr()
    }

    /// The openraft handle (metrics, tests).
    pub fn raft(&self) -> &Raft {
        &self.member.raft
    }

    /// Refuses writes signed under `principal`'s authority from now on.
    pub fn revoke(&self, principal: blocktree_core::PrincipalId) {
        self.member.store.revoke(principal);
    }

    /// A digest of every sector this member stores for the generation, read
    /// from its own engine (not linearizable): members that applied the same
    /// entries have the same digest. Also counts the files. Reads every
    /// sector: meant for tests and `blocktree cluster verify`, not hot paths.
    pub fn content_digest(&self) -> Result<(String, u64), ServiceError> {
        self.member.content_digest()
    }

    /// Reads every sector this member stores and repairs those its engine
    /// reports corrupt (checksum mismatch: flipped bits) with copies fetched
    /// from the leader (or, on the leader, another voter). The copies are
    /// written only while this member has applied no more than the member
    /// they came from, so the entries it applies afterwards bring them to
    /// the same state as everything else (as after a snapshot).
    pub fn scrub(&self) -> Result<ScrubReport, ServiceError> {
        self.member.scrub(None)
    }

    /// [`RaftService::scrub`], reading at most `bytes_per_second` on average
    /// (0: as fast as the disk allows), so that a background scrub leaves
    /// the disk to clients. Repairs are not paced.
    pub fn scrub_paced(&self, bytes_per_second: u64) -> Result<ScrubReport, ServiceError> {
        self.member.scrub(Some(bytes_per_second))
    }

    /// Snapshots this member received and installed since it started.
    pub fn snapshots_installed(&self) -> u64 {
        self.member.snapshots_installed()
    }

    /// Read-index rounds (a heartbeat round to a quorum) this member ran as
    /// leader since it started. Linearizable reads on a one-member cluster
    /// need none; on a larger one, reads within a leader lease share one.
    pub fn read_index_rounds(&self) -> u64 {
        self.member.lease.rounds()
    }

    /// This member's view of the cluster: members, leader, term, commit index.
    pub fn status(&self) -> ClusterStatus {
        self.member.status()
    }

    /// Bytes of the log entries this member holds (not yet purged); kept
    /// near [`RaftConfig::log_bytes`] at most.
    pub fn log_bytes(&self) -> u64 {
        *self.log_held.borrow()
    }

    /// Waits until some member is leader and this member has applied its
    /// first entry, or `timeout` passes; returns the leader.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ServiceError> {
        self.member.wait_for_leader(timeout)
    }

    /// On the leader: adds `node` (listening as `member`) as a learner and
    /// waits until it has caught up.
    pub fn add_learner(&self, node: NodeId, member: MemberNode) -> Result<(), ServiceError> {
        self.member.add_learner(node, member)
    }

    /// On the leader: makes learners `nodes` voters.
    pub fn promote(&self, nodes: BTreeSet<NodeId>) -> Result<(), ServiceError> {
        self.member.promote(nodes)
    }

    /// On the leader: removes `nodes` from the cluster (voters and learners).
    pub fn remove(&self, nodes: BTreeSet<NodeId>) -> Result<(), ServiceError> {
        self.member.remove(nodes)
    }

    /// Takes this member out of its cluster (`blocktree leave`): asks the
    /// leader to remove it, or removes itself when it leads.
    pub fn leave(&self) -> Result<(), ServiceError> {
        self.member.leave()
    }
}

impl Member {
    /// Runs `future` on the member's runtime, blocking this thread (never a
    /// worker of that runtime).
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.handle.block_on(future)
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
    pub fn scrub(&self, bytes_per_second: Option<u64>) -> Result<ScrubReport, ServiceError> {
        let mut report = ScrubReport::default();
        // A corrupt metadata sector hides its file's other sectors: scan again
        // after repairing it.
        for pass in 0..3 {
            let mut pace = Pace::new(bytes_per_second);
            let (checked, corrupt) = self.block_on(self.find_corrupt(&mut pace));
            if pass == 0 {
                report.sectors_checked = checked;
                report.bytes_read = pace.bytes();
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

    async fn find_corrupt(&self, pace: &mut Pace) -> (u64, Vec<(u64, SectorKind)>) {
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
                Ok(Some(bytes)) => {
                    pace.read(bytes.len() as u64).await;
                    bytes
                }
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
            // A record rewritten with a valid engine checksum (a bad disk
            // block remapped, a bug, a hand) is found by what it is checked
            // against: the metadata by its signature, the Merkle pieces by
            // the signed root, the data records by their leaves.
            if meta.verify_signature().is_err() {
                corrupt.push((inode, SectorKind::Meta));
                continue;
            }
            let body = meta.body();
            let algorithm = body.hash_algorithm;
            let pieces = crate::pieces::piece_count(algorithm, body.sector_count);
            let mut leaves = Vec::new();
            let mut pieces_read = true;
            for piece in 0..pieces {
                checked += 1;
                let expected =
                    crate::pieces::expected_piece_len(algorithm, body.sector_count, piece);
                match engine.read(id(inode, SectorKind::Merkle(piece))).await {
                    Ok(Some(bytes)) if bytes.len() == expected => {
                        pace.read(bytes.len() as u64).await;
                        leaves.extend_from_slice(&bytes);
                    }
                    Ok(_) | Err(_) => {
                        corrupt.push((inode, SectorKind::Merkle(piece)));
                        pieces_read = false;
                    }
                }
            }
            let tree = if pieces_read {
                match MerkleTree::from_leaf_bytes(algorithm, leaves) {
                    Ok(tree) if tree.root() == body.merkle_root => Some(tree),
                    // Which piece is wrong is not known: fetch them all.
                    _ => {
                        corrupt.extend((0..pieces).map(|piece| (inode, SectorKind::Merkle(piece))));
                        None
                    }
                }
            } else {
                None
            };
            // Many reads in flight at once, so the engine batches them into
            // its rings (one at a time, an empty 1 GiB volume took 6 s).
            let mut start = 0;
            while start < body.sector_count {
                let end = body.sector_count.min(start + SCRUB_READS_IN_FLIGHT);
                let reads: Vec<_> = (start..end)
                    .map(|index| (index, engine.read(id(inode, SectorKind::Data(index)))))
                    .collect();
                let mut window_bytes = 0;
                for (index, read) in reads {
                    checked += 1;
                    match read.await {
                        Err(_) => corrupt.push((inode, SectorKind::Data(index))),
                        // A missing record is a hole, whose leaf is the empty one's.
                        Ok(record) => {
                            window_bytes += record.as_ref().map_or(0, |record| record.len() as u64);
                            if let Some(tree) = &tree {
                                let leaf = MerkleTree::leaf_hash(
                                    algorithm,
                                    record.as_deref().unwrap_or(&[]),
                                );
                                if tree.leaf(index) != Some(leaf) {
                                    corrupt.push((inode, SectorKind::Data(index)));
                                }
                            }
                        }
                    }
                }
                pace.read(window_bytes).await;
                start = end;
            }
        }
        (checked, corrupt)
    }

    /// Runs `read` of this member's store; each sector it finds corrupt (its
    /// checksum fails, so it is never served) is fetched from another member,
    /// stored, and the read run again: read repair, so that one damaged copy
    /// costs its reader a round trip rather than an I/O error. A sector that
    /// cannot be repaired is reported as it was found.
    fn read_repairing<T>(
        &self,
        read: impl Fn() -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut repaired = 0;
        loop {
            let result = read();
            let id = match &result {
                Err(ServiceError::Corrupt { id, .. })
                | Err(ServiceError::Engine(EngineError::Corrupt(id))) => *id,
                _ => return result,
            };
            if self.network.is_none() || repaired >= READ_REPAIRS {
                return result;
            }
            tracing::warn!(
                ?id,
                "read a corrupt sector: repairing it from another member"
            );
            if let Err(error) = self.repair(&[(id.inode, id.sector)]) {
                tracing::warn!(?id, "read repair failed: {error}");
                return result;
            }
            repaired += 1;
        }
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
        self.block_on(remove_members(&self.raft, nodes))
            .map_err(write_error)
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

    /// Waits (up to the write timeout) until this member, just joined, has
    /// applied the membership entry that made it a voter: everything
    /// committed before it joined is then in its own store, which follower
    /// reads serve at once (a joining server opening its file system found
    /// the root's readcaps missing now and then).
    fn await_joined_applied(&self) -> Result<(), ServiceError> {
        let deadline = Instant::now() + self.write_timeout;
        loop {
            let joined_at = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                let membership = &metrics.membership_config;
                membership
                    .membership()
                    .voter_ids()
                    .any(|id| id == self.node_id())
                    .then(|| membership.log_id().map(|id| id.index))
                    .flatten()
            };
            let applied = self.machine.applied().last_applied.map(|id| id.index);
            if joined_at.is_some() && applied >= joined_at {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Replication(format!(
                    "joined, but did not apply the cluster's entries within {:?}",
                    self.write_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
            let target =
                self.leader_ready_target(*metrics.vote.leader_id(), metrics.last_log_index);
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

    /// The last log index when leadership `leading` began (as first seen).
    fn leader_ready_target(
        &self,
        leading: openraft::LeaderId<NodeId>,
        last_log_index: Option<u64>,
    ) -> u64 {
        let mut ready = lock(&self.leader_ready);
        match &*ready {
            Some((leader, target)) if *leader == leading => *target,
            _ => {
                let target = last_log_index.unwrap_or(0);
                *ready = Some((leading, target));
                target
            }
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

    /// Proposes `request` and returns once it is applied: its log index and
    /// what applying it answered.
    fn propose(
        &self,
        request: impl FnOnce(crate::types::Origin) -> RaftRequest,
    ) -> Result<(u64, crate::types::RaftResponse), ServiceError> {
        let proposal = self.submit(request)?;
        self.await_applied(proposal)
    }

    /// Hands `request` to the Raft core, which fixes its place among this
    /// member's proposals, and returns without waiting for it.
    fn submit(
        &self,
        request: impl FnOnce(crate::types::Origin) -> RaftRequest,
    ) -> Result<Proposal, ServiceError> {
        let origin = self.machine.propose();
        match self.block_on(self.raft.client_write_ff(request(origin))) {
            Ok(answer) => Ok(Proposal {
                origin,
                answer,
                since: Instant::now(),
            }),
            Err(fatal) => {
                self.machine.settled(origin);
                Err(raft_failure(RaftError::<
                    NodeId,
                    ClientWriteError<NodeId, MemberNode>,
                >::Fatal(fatal)))
            }
        }
    }

    /// Waits (at most the write timeout since it was submitted) until
    /// `proposal` is applied.
    fn await_applied(
        &self,
        proposal: Proposal,
    ) -> Result<(u64, crate::types::RaftResponse), ServiceError> {
        let Proposal {
            origin,
            answer,
            since,
        } = proposal;
        let timeout = self.write_timeout;
        let left = timeout.saturating_sub(since.elapsed());
        let result = self.block_on(async { tokio::time::timeout(left, answer).await });
        self.machine.settled(origin);
        match result {
            Ok(Ok(Ok(response))) => Ok((response.log_id.index, response.data)),
            Ok(Ok(Err(error))) => Err(write_error(RaftError::APIError(error))),
            Ok(Err(_)) => Err(ServiceError::Replication(
                "the Raft core stopped before the write was applied; it may still be applied \
                 later"
                    .into(),
            )),
            Err(_) => Err(ServiceError::Replication(format!(
                "not committed within {timeout:?} (the leader may be cut off from its \
                 majority); the write may still be applied later"
            ))),
        }
    }

    /// True when this member leads, is the only voter, and has applied what
    /// its log held when its leadership began: then nobody else can have
    /// acknowledged a write this member has not applied (writes return once
    /// applied), and a read needs no round trip. Only borrows the metrics.
    fn single_voter_ready(&self) -> bool {
        let me = self.node_id();
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != ServerState::Leader
            || metrics.current_leader != Some(me)
            || !metrics.vote.is_committed()
        {
            return false;
        }
        let mut voters = metrics.membership_config.membership().voter_ids();
        if voters.next() != Some(me) || voters.next().is_some() {
            return false;
        }
        let target = self.leader_ready_target(*metrics.vote.leader_id(), metrics.last_log_index);
        metrics
            .last_applied
            .is_some_and(|applied| applied.index >= target)
    }

    /// Makes a linearizable read possible here: returns once this member has
    /// applied every write acknowledged (by any member) before the call.
    fn before_read(&self) -> Result<(), ServiceError> {
        if self.read_mode == ReadMode::Follower {
            return Ok(());
        }
        self.linearize()
    }

    /// Returns once this member has applied every write acknowledged (by any
    /// member) before the call, whatever the read mode.
    fn linearize(&self) -> Result<(), ServiceError> {
        if self.single_voter_ready() {
            return Ok(());
        }
        let deadline = Instant::now() + LEADER_READY_WAIT;
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            if leader == Some(self.node_id()) {
                match self.block_on(self.lease.read_index(&self.raft, &self.machine)) {
                    Ok(index) => return self.wait_applied(index),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                        if Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        return Err(self.not_leader(forward.leader_id));
                    }
                    Err(other) => return Err(raft_failure(other)),
                }
            }
            if self.network.is_none() {
                // Nobody to ask: wait out an election, else refuse.
                if leader.is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                return Err(self.not_leader(leader));
            }
            match self.forward(&RaftMessage::ReadIndex, CONTROL_TIMEOUT, true)? {
                Forwarded::Local => continue,
                Forwarded::Reply(reply) => {
                    return match *reply {
                        RaftReply::ReadIndex { index } => self.wait_applied(index),
                        other => Err(self.forward_error(other, None)),
                    };
                }
            }
        }
    }

    /// Waits until this member has applied log index `index`.
    fn wait_applied(&self, index: Option<u64>) -> Result<(), ServiceError> {
        let Some(index) = index else {
            return Ok(());
        };
        if self
            .machine
            .applied()
            .last_applied
            .is_some_and(|applied| applied.index >= index)
        {
            return Ok(());
        }
        let timeout = self.write_timeout;
        self.block_on(
            self.raft
                .wait(Some(timeout))
                .applied_index_at_least(Some(index), "a forwarded request"),
        )
        .map(|_| ())
        .map_err(|error| {
            ServiceError::Replication(format!(
                "this member has not applied log index {index} within {timeout:?}: {error}"
            ))
        })
    }

    /// Where a request that only the leader serves goes: here, or to the
    /// leader (waiting, up to [`LEADER_READY_WAIT`], for an election).
    fn leader_for_request(&self, deadline: Instant) -> Result<Leader, ServiceError> {
        loop {
            let (leader, node) = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                let leader = metrics.current_leader;
                let node = leader.and_then(|leader| {
                    metrics
                        .membership_config
                        .membership()
                        .get_node(&leader)
                        .cloned()
                });
                (leader, node)
            };
            match (leader, node) {
                (Some(leader), _) if leader == self.node_id() => return Ok(Leader::Here),
                (Some(_), _) if self.network.is_none() => return Err(self.not_leader(leader)),
                (Some(leader), Some(node)) if node.path.is_some() && !node.addr.is_empty() => {
                    return Ok(Leader::Remote(leader, node));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(self.not_leader(leader));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `message` to the leader and returns its answer, retrying (up to
    /// [`LEADER_READY_WAIT`]) while there is no leader, while the member
    /// called is not the leader, and while the message cannot be delivered.
    /// A call that may have reached the leader and got no answer is retried
    /// only if `idempotent`; otherwise its outcome is unknown and reported as
    /// [`ServiceError::Replication`].
    fn forward(
        &self,
        message: &RaftMessage,
        timeout: Duration,
        idempotent: bool,
    ) -> Result<Forwarded, ServiceError> {
        self.forward_outcome(message, timeout, idempotent)
            .map_err(ForwardError::into_service)
    }

    /// [`Member::forward`], telling a call whose outcome is unknown apart
    /// from other failures.
    fn forward_outcome(
        &self,
        message: &RaftMessage,
        timeout: Duration,
        idempotent: bool,
    ) -> Result<Forwarded, ForwardError> {
        let network = self
            .network
            .as_ref()
            .ok_or_else(|| ServiceError::Invalid("this member runs without a network".into()))?;
        let deadline = Instant::now() + LEADER_READY_WAIT;
        let mut named: Option<(NodeId, MemberNode)> = None;
        loop {
            let (leader, node) = match named.take() {
                Some(target) => target,
                None => match self.leader_for_request(deadline)? {
                    Leader::Here => return Ok(Forwarded::Local),
                    Leader::Remote(leader, node) => (leader, node),
                },
            };
            // A leader killed mid-call leaves its connection open until
            // bttp's idle timeout: stop waiting as soon as this member sees
            // another leader elected (or an election begin) instead.
            let reply = self.block_on(async {
                let call = network::call_member(
                    &network.runtime,
                    &network.directory,
                    leader,
                    &node,
                    message.clone(),
                    timeout,
                );
                tokio::select! {
                    reply = call => Some(reply),
                    () = leader_replaced(self.raft.metrics(), leader) => None,
                }
            });
            let Some(reply) = reply else {
                if idempotent {
                    continue;
                }
                return Err(ForwardError::Unknown(format!(
                    "forwarded to the leader {leader:016x}, which was replaced before it \
                     answered; the outcome is unknown"
                )));
            };
            match reply {
                Ok(RaftReply::NotLeader { leader, node }) => {
                    // Go to the leader it names; else wait for this member
                    // to learn of the new one.
                    if let (Some(leader), Some(node)) = (leader, node)
                        && leader != self.node_id()
                    {
                        named = Some((leader, node));
                    }
                }
                Ok(RaftReply::Refused(reason)) if reason.contains("is starting") => {}
                Ok(reply) => return Ok(Forwarded::Reply(Box::new(reply))),
                Err(error) if idempotent || undelivered(&error) => {
                    tracing::debug!("forwarding to the leader {leader:016x}: {error}");
                }
                Err(error) => {
                    return Err(ForwardError::Unknown(format!(
                        "forwarded to the leader {leader:016x}, which did not answer: {error}; \
                         the outcome is unknown"
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(ForwardError::Service(ServiceError::Replication(format!(
                    "no leader answered within {LEADER_READY_WAIT:?}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The error a forwarded request's unexpected or failed answer means.
    fn forward_error(&self, reply: RaftReply, batch: Option<&SectorBatch>) -> ServiceError {
        let RaftReply::Failed {
            kind,
            inode,
            reason,
        } = reply
        else {
            return reply_error(reply);
        };
        match kind {
            FailureKind::Unauthorized => {
                // Reproduce the leader's verdict here for its structured
                // reason (revocations known only to the leader aside).
                let generation = self.store.info.generation;
                let directory = &self.store.info.directory;
                let now = blocktree_core::time::Timestamp::now();
                let revoked = blocktree_core::writecap::RevocationList::default();
                for meta in batch.into_iter().flat_map(|batch| {
                    batch
                        .files
                        .iter()
                        .map(|file| &file.meta)
                        .chain(&batch.removes)
                }) {
                    if let Err(error) =
                        crate::verify::verify_meta(meta, generation, directory, now, &revoked)
                    {
                        return error;
                    }
                }
                ServiceError::Inconsistent {
                    inode,
                    reason: format!("refused by the leader: {reason}"),
                }
            }
            FailureKind::Inconsistent => ServiceError::Inconsistent { inode, reason },
            FailureKind::NotFound => ServiceError::NotFound(inode),
            FailureKind::Invalid => ServiceError::Invalid(reason),
            FailureKind::Replication => ServiceError::Replication(reason),
        }
    }

    /// What to answer a follower whose forwarded request failed with `error`.
    fn failure_reply(&self, error: ServiceError) -> RaftReply {
        let (kind, inode) = match &error {
            ServiceError::NotLeader { .. } => return self.not_leader_reply(),
            ServiceError::Unauthorized { inode, .. } => (FailureKind::Unauthorized, *inode),
            ServiceError::Inconsistent { inode, .. } => (FailureKind::Inconsistent, *inode),
            ServiceError::NotFound(inode) => (FailureKind::NotFound, *inode),
            ServiceError::Invalid(_) | ServiceError::NoReadcap(_) => (FailureKind::Invalid, 0),
            ServiceError::Corrupt { id, .. } => (FailureKind::Replication, id.inode),
            ServiceError::Replication(_) | ServiceError::Engine(_) => (FailureKind::Replication, 0),
        };
        RaftReply::Failed {
            kind,
            inode,
            reason: error.to_string(),
        }
    }

    fn not_leader_reply(&self) -> RaftReply {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader;
        RaftReply::NotLeader {
            leader,
            node: leader.and_then(|leader| {
                metrics
                    .membership_config
                    .membership()
                    .get_node(&leader)
                    .cloned()
            }),
        }
    }

    /// On the leader: a request a follower forwarded (blocking).
    pub(crate) fn serve_forwarded(&self, message: RaftMessage) -> RaftReply {
        if self.raft.metrics().borrow().current_leader != Some(self.node_id()) {
            return self.not_leader_reply();
        }
        match message {
            RaftMessage::ForwardWrite { batch } => match crate::forward::decode_batch(&batch) {
                Ok(batch) => {
                    // Written here by another member's caller: for the callers
                    // of this member (its file system's caches), it is foreign.
                    let inodes: Vec<u64> = batch
                        .files
                        .iter()
                        .map(|file| file.meta.body().ids.inode)
                        .chain(batch.removes.iter().map(|meta| meta.body().ids.inode))
                        .collect();
                    let written = self.write_here(batch, &mut || {});
                    if written.is_ok() {
                        for inode in inodes {
                            self.store.announce_foreign(inode);
                        }
                    }
                    match written {
                        Ok(index) => RaftReply::Applied { index },
                        Err(error) => self.failure_reply(error),
                    }
                }
                Err(error) => RaftReply::Failed {
                    kind: FailureKind::Invalid,
                    inode: 0,
                    reason: error.to_string(),
                },
            },
            RaftMessage::ReserveInodes => match self.reserve_inodes() {
                Ok(range) => RaftReply::Inodes {
                    start: range.start,
                    end: range.end,
                },
                Err(error) => self.failure_reply(error),
            },
            _ => RaftReply::Refused("not a forwarded request".into()),
        }
    }

    /// On the leader: the log index a follower's linearizable read waits for.
    pub(crate) async fn serve_read_index(&self) -> RaftReply {
        match self.lease.read_index(&self.raft, &self.machine).await {
            Ok(index) => RaftReply::ReadIndex { index },
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                RaftReply::NotLeader {
                    leader: forward.leader_id,
                    node: forward.leader_node,
                }
            }
            Err(other) => RaftReply::Refused(other.to_string()),
        }
    }

    /// Writes `batch` on this member as leader; returns its entry's index.
    /// `queued` is called once its place in the log is fixed: a batch of the
    /// same files written after that is applied after it (or not at all).
    fn write_here(
        &self,
        batch: SectorBatch,
        queued: &mut dyn FnMut(),
    ) -> Result<u64, ServiceError> {
        if let Err(error) = self.ensure_leader_ready() {
            queued();
            return Err(error);
        }
        let term = self.raft.metrics().borrow().current_term;
        self.store.write_pipelined(
            batch,
            term,
            |staged, in_term| {
                self.submit(|origin| match in_term {
                    Some(term) => RaftRequest::WriteInTerm {
                        origin,
                        term,
                        batch: staged,
                    },
                    None => RaftRequest::Write {
                        origin,
                        batch: staged,
                    },
                })
            },
            queued,
            |proposal| {
                let (index, response) = self.await_applied(proposal)?;
                if response.refused {
                    return Err(ServiceError::Replication(
                        "the batch was staged on batches not yet applied, and its entry is \
                         of a later term than theirs, which may have been lost: it was not \
                         applied"
                            .into(),
                    ));
                }
                Ok(index)
            },
        )
    }

    /// See [`RaftService`]'s `write`.
    fn write(&self, batch: SectorBatch, queued: &mut dyn FnMut()) -> Result<(), ServiceError> {
        let leader = self.raft.metrics().borrow().current_leader;
        if self.network.is_none() || leader == Some(self.node_id()) {
            return self.write_here(batch, queued).map(|_| ());
        }
        // A forwarded batch is ordered once the leader answered.
        let result = self.forward_write(batch);
        queued();
        result
    }

    /// Forwards `batch` to the leader and returns once this member applied it.
    fn forward_write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        let encoded = crate::forward::encode_batch(&batch);
        if encoded.len() > crate::forward::MAX_FORWARDED_BATCH {
            return Err(ServiceError::Invalid(format!(
                "a batch of {} bytes is too large to forward to the leader (at most {})",
                encoded.len(),
                crate::forward::MAX_FORWARDED_BATCH
            )));
        }
        let message = RaftMessage::ForwardWrite {
            batch: serde_bytes::ByteBuf::from(encoded),
        };
        // The leader's own write may take up to the write timeout.
        let timeout = self.write_timeout + Duration::from_secs(5);
        // What the batch's files are here before it, and will be once it is
        // applied: how a write whose outcome is unknown is told apart.
        let before = self.stored_metas(&batch)?;
        let after = written_metas(&batch);
        let mut unknown = 0;
        loop {
            match self.forward_outcome(&message, timeout, false) {
                Ok(Forwarded::Local) => return self.write_here(batch, &mut || {}).map(|_| ()),
                Ok(Forwarded::Reply(reply)) => {
                    return match *reply {
                        RaftReply::Applied { index } => self.wait_applied(Some(index)),
                        other => Err(self.forward_error(other, Some(&batch))),
                    };
                }
                Err(ForwardError::Service(error)) => return Err(error),
                Err(ForwardError::Unknown(reason)) => {
                    unknown += 1;
                    if unknown > UNKNOWN_OUTCOME_RETRIES || after.is_empty() {
                        return Err(ServiceError::Replication(reason));
                    }
                    // Once this member has applied everything committed (the
                    // new leader commits what the old one left in a quorum's
                    // logs before it answers a read index), the batch either
                    // shows (it was committed) or never will (it was lost
                    // with the old leader's term), and may be sent again.
                    self.linearize()?;
                    let now = self.stored_metas(&batch)?;
                    if now == after {
                        tracing::info!("a forwarded write whose answer was lost had committed");
                        return Ok(());
                    }
                    if now != before {
                        return Err(ServiceError::Replication(format!(
                            "{reason}, and its files changed meanwhile"
                        )));
                    }
                    tracing::info!("a forwarded write whose answer was lost is sent again");
                }
            }
        }
    }

    /// The stored metadata records of the files `batch` writes and removes.
    fn stored_metas(&self, batch: &SectorBatch) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        let engine = self.store.engine();
        let generation = self.store.info.generation;
        let inodes = batch
            .files
            .iter()
            .map(|file| file.meta.body().ids.inode)
            .chain(batch.removes.iter().map(|meta| meta.body().ids.inode));
        inodes
            .map(|inode| {
                let id = SectorId {
                    generation,
                    inode,
                    sector: SectorKind::Meta,
                };
                self.block_on(engine.read(id))
                    .map(|record| record.map(|bytes| bytes.to_vec()))
                    .map_err(ServiceError::from)
            })
            .collect()
    }

    /// On the leader: reserves [`INODE_RESERVATION`] inode numbers.
    fn reserve_inodes(&self) -> Result<std::ops::Range<u64>, ServiceError> {
        self.ensure_leader_ready()?;
        let _reserving = lock(&self.reserving);
        let start = self.machine.applied().next_inode;
        let end = start
            .checked_add(INODE_RESERVATION)
            .filter(|end| *end < crate::statemachine::APPLIED_INODE)
            .ok_or_else(|| ServiceError::Invalid("inode numbers exhausted".into()))?;
        self.propose(|origin| RaftRequest::ReserveInodes { origin, start, end })?;
        Ok(start..end)
    }

    /// Whether `node` is a voter or learner of this cluster.
    pub(crate) fn is_member(&self, node: NodeId) -> bool {
        let applied = self.machine.applied();
        let membership = applied.membership.membership();
        membership.voter_ids().any(|id| id == node) || membership.learner_ids().any(|id| id == node)
    }

    /// A generation number for `directory`'s new cluster, handed out by this
    /// cluster's leader (here, or forwarded to it): the request of a server
    /// of that directory, which this member received (blocking).
    pub(crate) fn serve_generation(&self, directory: &BtPath) -> RaftReply {
        match self.generation_for(directory) {
            Ok(generation) => RaftReply::Generation { generation },
            Err(error) => self.failure_reply(error),
        }
    }

    fn generation_for(&self, directory: &BtPath) -> Result<u64, ServiceError> {
        let own = &self.store.info.directory;
        if self.store.info.generation != ROOT_GENERATION || *own != BtPath::root_of(own.root()) {
            return Err(ServiceError::Invalid(format!(
                "this cluster stores {own} (generation {}): only the cluster of the domain's \
                 root directory numbers generations",
                self.store.info.generation
            )));
        }
        if directory == own || !own.contains(directory) {
            return Err(ServiceError::Invalid(format!(
                "{directory} is not a directory below {own}"
            )));
        }
        let message = RaftMessage::AllocateGeneration {
            directory: directory.clone(),
        };
        let forwarded = if self.network.is_none() {
            Forwarded::Local
        } else {
            // Asking twice wastes a number at worst: numbers only need to be unique.
            self.forward(&message, CONTROL_TIMEOUT, true)?
        };
        match forwarded {
            Forwarded::Local => self.allocate_generation(directory),
            Forwarded::Reply(reply) => match *reply {
                RaftReply::Generation { generation } if generation > ROOT_GENERATION => {
                    Ok(generation)
                }
                other => Err(self.forward_error(other, None)),
            },
        }
    }

    /// On the leader: hands out the next generation number, through the log.
    fn allocate_generation(&self, directory: &BtPath) -> Result<u64, ServiceError> {
        self.ensure_leader_ready()?;
        let _reserving = lock(&self.reserving);
        let generation = self.machine.applied().next_generation;
        self.propose(|origin| RaftRequest::AllocateGeneration {
            origin,
            generation,
            directory: directory.clone(),
        })?;
        tracing::info!(%directory, generation, "handed out a generation number");
        Ok(generation)
    }

    /// A fresh inode number: from this member's reservation, reserved by the
    /// leader (here or asked over the network) when it runs out.
    fn allocate_inode(&self) -> Result<u64, ServiceError> {
        let mut reserved = lock(&self.inodes);
        if reserved.is_empty() {
            *reserved = if self.network.is_none() {
                self.reserve_inodes()?
            } else {
                match self.forward(&RaftMessage::ReserveInodes, CONTROL_TIMEOUT, true)? {
                    Forwarded::Local => self.reserve_inodes()?,
                    Forwarded::Reply(reply) => match *reply {
                        RaftReply::Inodes { start, end }
                            if start < end && end - start <= INODE_RESERVATION =>
                        {
                            start..end
                        }
                        other => return Err(self.forward_error(other, None)),
                    },
                }
            };
        }
        reserved
            .next()
            .ok_or_else(|| ServiceError::Invalid("inode reservation empty".into()))
    }

    /// Records this member's address as `node` in the membership: at once
    /// when it is the cluster's only voter (a one-member cluster opened with
    /// a network for the first time, or on another port), else in the
    /// background through the leader.
    fn keep_address_current(&self, node: MemberNode) -> Result<(), ServiceError> {
        let me = self.node_id();
        let only_voter = {
            let applied = self.machine.applied();
            let mut voters = applied.membership.membership().voter_ids();
            voters.next() == Some(me) && voters.next().is_none()
        };
        if only_voter {
            self.ensure_leader_ready()?;
            let recorded = node.clone();
            return self.block_on(async {
                let change = ChangeMembers::SetNodes(BTreeMap::from([(me, node)]));
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(write_error)?;
                // Callers read the membership from the metrics next.
                self.raft
                    .wait(Some(LEADER_READY_WAIT))
                    .metrics(
                        |metrics| {
                            metrics.membership_config.membership().get_node(&me) == Some(&recorded)
                        },
                        "this member's address recorded",
                    )
                    .await
                    .map(|_| ())
                    .map_err(raft_failure)
            });
        }
        let Some(network) = self.network.clone() else {
            return Ok(());
        };
        let raft = self.raft.clone();
        self.handle.spawn(async move {
            let mut metrics = raft.metrics();
            loop {
                let (leader, targets, recorded, loaded) = {
                    let current = metrics.borrow();
                    // Until openraft has read the membership from the log, the
                    // metrics show an empty one without this member in it.
                    let loaded = current.membership_config.log_id().is_some();
                    let membership = current.membership_config.membership();
                    let leader = current.current_leader;
                    // Ask the leader; not knowing it (its heartbeats go to
                    // the old address), ask every other voter, which name it.
                    let targets: Vec<(NodeId, MemberNode)> = match leader {
                        Some(leader) => membership
                            .get_node(&leader)
                            .map(|node| (leader, node.clone()))
                            .into_iter()
                            .collect(),
                        None => membership
                            .voter_ids()
                            .filter(|id| *id != me)
                            .filter_map(|id| {
                                membership.get_node(&id).map(|node| (id, node.clone()))
                            })
                            .collect(),
                    };
                    (leader, targets, membership.get_node(&me).cloned(), loaded)
                };
                match &recorded {
                    Some(recorded) if *recorded == node => return,
                    // Not a member (any more): nothing to record.
                    None if loaded => return,
                    _ => {}
                }
                if recorded.is_none() {
                    // The membership is still being read: wait for it below.
                } else if leader == Some(me) {
                    let change = ChangeMembers::SetNodes(BTreeMap::from([(me, node.clone())]));
                    if let Err(error) = raft.change_membership(change, false).await {
                        tracing::warn!("recording this member's new address: {error}");
                    }
                } else {
                    let call = |target: (NodeId, MemberNode)| {
                        let network = network.clone();
                        let message = RaftMessage::UpdateNode {
                            node: me,
                            member: node.clone(),
                        };
                        async move {
                            network::call_member(
                                &network.runtime,
                                &network.directory,
                                target.0,
                                &target.1,
                                message,
                                CONTROL_TIMEOUT,
                            )
                            .await
                        }
                    };
                    for target in targets {
                        match call(target).await {
                            Ok(RaftReply::Done) => break,
                            Ok(RaftReply::NotLeader {
                                leader: Some(leader),
                                node: Some(leader_node),
                            }) if leader != me => {
                                if let Ok(RaftReply::Done) = call((leader, leader_node)).await {
                                    break;
                                }
                            }
                            Ok(other) => {
                                tracing::debug!("updating this member's address: {other:?}")
                            }
                            Err(error) => {
                                tracing::debug!("updating this member's address: {error}")
                            }
                        }
                    }
                }
                let wait = tokio::time::sleep(Duration::from_millis(200));
                tokio::select! {
                    _ = wait => {}
                    changed = metrics.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(())
    }
}

/// Where a request for the leader goes.
enum Leader {
    /// This member leads.
    Here,
    /// Member `.0`, listening at `.1`, leads.
    Remote(NodeId, MemberNode),
}

/// What [`Member::forward`] got.
enum Forwarded {
    /// This member turned out to be the leader: serve the request here.
    Local,
    /// The leader's answer (boxed: replies are large, `Local` is empty).
    Reply(Box<RaftReply>),
}

/// Why a forwarded request has no answer.
enum ForwardError {
    /// It may have reached the leader, which gave no answer: it may or may
    /// not have taken effect.
    Unknown(String),
    /// It failed otherwise (no leader, not delivered, …).
    Service(ServiceError),
}

impl ForwardError {
    fn into_service(self) -> ServiceError {
        match self {
            ForwardError::Unknown(reason) => ServiceError::Replication(reason),
            ForwardError::Service(error) => error,
        }
    }
}

impl From<ServiceError> for ForwardError {
    fn from(error: ServiceError) -> Self {
        ForwardError::Service(error)
    }
}

/// Returns once the member whose metrics these are, having named `leader` as
/// the leader (or named none, or another, when called), names another or none
/// (a new one elected, or an election under way). A member that has not yet
/// heard of `leader` (named by another member's reply) waits to.
async fn leader_replaced(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, MemberNode>>,
    leader: NodeId,
) {
    let mut baseline = metrics.borrow().current_leader;
    loop {
        let current = metrics.borrow_and_update().current_leader;
        if current == Some(leader) {
            baseline = current;
        } else if current != baseline {
            return;
        }
        if metrics.changed().await.is_err() {
            // The member is shutting down: the caller's call ends too.
            std::future::pending::<()>().await;
        }
    }
}

/// True when `error` shows the message never reached the member's handler
/// (so retrying cannot do anything twice).
fn undelivered(error: &blocktree_netstack::BttpError) -> bool {
    use blocktree_netstack::BttpError;
    use blocktree_netstack::frame::ErrorCode;
    match error {
        BttpError::Connect { .. }
        | BttpError::Backoff { .. }
        | BttpError::NoRoute(_)
        | BttpError::PeerRejected { .. }
        | BttpError::Refused { .. } => true,
        BttpError::Rejected { error, .. } => matches!(
            error.code,
            ErrorCode::NotAuthorized
                | ErrorCode::NoSuchActor
                | ErrorCode::NoSuchService
                | ErrorCode::WrongRuntime
                | ErrorCode::ShuttingDown
        ),
        _ => false,
    }
}

/// A request handed to the Raft core and not yet applied.
struct Proposal {
    origin: crate::types::Origin,
    answer:
        tokio::sync::oneshot::Receiver<openraft::raft::ClientWriteResult<crate::types::SectorRaft>>,
    since: Instant,
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
    vote_guard: Duration,
    append_delay: Duration,
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
    let directory_control = network::directory_control_path(directory).ok_or_else(|| {
        ServiceError::Invalid(format!("{directory} cannot hold a control service path"))
    })?;
    let record = RuntimeRecord {
        uid: 0,
        gid: 0,
        mode: 0o751,
        services: [service, control, directory_control].into(),
    };
    let mut runtime_config = RuntimeConfig::new(listen, AccessPolicy::new(record));
    runtime_config.limits = member_limits();
    let runtime = Runtime::start(runtime_config, credentials.clone()).map_err(raft_failure)?;
    let addr = runtime.local_addr().map_err(raft_failure)?;
    let shared = Arc::new(NetworkShared::new(
        runtime,
        directory.clone(),
        machine,
        vote_guard,
        append_delay,
    ));
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
    query_status_via(credentials, peer_addr, Some(peer_path))
}

/// [`query_status`] knowing only the member's address (`blocktree cluster
/// status --peer ADDR`): its runtime path is learnt at the handshake and then
/// verified as usual (see [`network::call_control_at`]).
pub fn query_status_at(
    credentials: &Credentials,
    peer_addr: SocketAddr,
) -> Result<ClusterStatus, ServiceError> {
    query_status_via(credentials, peer_addr, None)
}

/// Asks the cluster of the domain's root directory, through its member at
/// `root_addr`, for the generation number of the directory `credentials`'
/// writecap names: what a new directory's store is created with (the
/// original design's "requests a new generation number" from the root
/// generation). The number is unique in the domain and recorded in the root
/// cluster's log.
pub fn request_generation(
    credentials: &Credentials,
    root_addr: SocketAddr,
) -> Result<u64, ServiceError> {
    let directory = credentials.path();
    if *directory == BtPath::root_of(directory.root()) {
        return Err(ServiceError::Invalid(format!(
            "{directory} is the domain's root directory: its generation is \
             {ROOT_GENERATION}, and only directories below it are numbered"
        )));
    }
    let message = RaftMessage::AllocateGeneration {
        directory: directory.clone(),
    };
    match call_control_once(credentials, root_addr, None, message)? {
        RaftReply::Generation { generation } if generation > ROOT_GENERATION => Ok(generation),
        RaftReply::Generation { generation } => Err(ServiceError::Replication(format!(
            "the root cluster at {root_addr} answered generation {generation}, which is its own"
        ))),
        RaftReply::NotLeader { .. } => Err(ServiceError::Replication(format!(
            "the root cluster's member at {root_addr} knows no leader; try again"
        ))),
        other => Err(reply_error(other)),
    }
}

fn query_status_via(
    credentials: &Credentials,
    peer_addr: SocketAddr,
    peer_path: Option<BtPath>,
) -> Result<ClusterStatus, ServiceError> {
    match call_control_once(credentials, peer_addr, peer_path, RaftMessage::Status)? {
        RaftReply::Status(status) => Ok(status),
        other => Err(reply_error(other)),
    }
}

/// Sends `message` to the control service of the member at `peer_addr` (at
/// `peer_path` if known, else found by the handshake) from a short-lived
/// runtime of `credentials`, and returns the reply.
fn call_control_once(
    credentials: &Credentials,
    peer_addr: SocketAddr,
    peer_path: Option<BtPath>,
    message: RaftMessage,
) -> Result<RaftReply, ServiceError> {
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
        let answer = match &peer_path {
            Some(path) => network::call_control(&runtime, path, peer_addr, message).await,
            None => {
                network::call_control_at(&runtime, credentials.path(), peer_addr, message).await
            }
        };
        runtime.shutdown().await;
        answer.map_err(raft_failure)
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
    match remove_members(raft, BTreeSet::from([node])).await {
        Ok(()) => RaftReply::Done,
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

/// On the leader: takes `nodes` out of the membership, voters and learners.
/// Voters go in one change that also forgets them (`retain` false): when the
/// leader removes itself it steps down once that commits, and must not be
/// asked for a second change.
async fn remove_members(
    raft: &Raft,
    nodes: BTreeSet<NodeId>,
) -> Result<(), RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>> {
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let voters: BTreeSet<NodeId> = membership
        .voter_ids()
        .filter(|id| nodes.contains(id))
        .collect();
    let learners: BTreeSet<NodeId> = membership
        .learner_ids()
        .filter(|id| nodes.contains(id))
        .collect();
    if !voters.is_empty() {
        raft.change_membership(ChangeMembers::RemoveVoters(voters), false)
            .await?;
    }
    if !learners.is_empty() {
        raft.change_membership(ChangeMembers::RemoveNodes(learners), false)
            .await?;
    }
    Ok(())
}

/// On the leader: records that member `node` now listens at `member` (at its
/// request). Only the member itself may move its address: the sender's id
/// must be `node`, or its proved runtime path the one recorded for `node`.
pub(crate) async fn update_member(
    shared: &NetworkShared,
    raft: &Raft,
    node: NodeId,
    sender: NodeId,
    member: MemberNode,
) -> RaftReply {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    if metrics.current_leader != Some(shared.machine.node) {
        let leader = metrics.current_leader;
        let node = leader.and_then(|leader| membership.get_node(&leader).cloned());
        return RaftReply::NotLeader { leader, node };
    }
    match membership.get_node(&node) {
        None => return RaftReply::Refused(format!("{node:016x} is not a member")),
        Some(recorded) if *recorded == member => return RaftReply::Done,
        // Only the member itself: the same id, or (for a member created
        // without network, whose id is random) the runtime path it proved,
        // when no other member holds that path (every server of the
        // directory that signs writes holds the directory's).
        Some(_) if node == sender => {}
        Some(recorded)
            if recorded.path == member.path
                && membership
                    .nodes()
                    .filter(|(_, other)| other.path == member.path)
                    .count()
                    == 1 => {}
        Some(_) => {
            return RaftReply::Refused(format!(
                "only member {node:016x} itself may change its address"
            ));
        }
    }
    network::add_route(&shared.runtime, &shared.directory, node, &member);
    tracing::info!(node = format!("{node:016x}"), %member, "a member moved");
    match raft
        .change_membership(
            ChangeMembers::SetNodes(BTreeMap::from([(node, member)])),
            false,
        )
        .await
    {
        Ok(_) => RaftReply::Done,
        Err(error) => RaftReply::Refused(error.to_string()),
    }
}

impl SectorService for RaftService {
    fn generation(&self) -> u64 {
        self.member.store.info.generation
    }

    fn directory(&self) -> &BtPath {
        &self.member.store.info.directory
    }

    fn allocate_inode(&self) -> Result<u64, ServiceError> {
        self.member.allocate_inode()
    }

    fn read_meta(&self, inode: u64) -> Result<Option<FileMeta>, ServiceError> {
        self.member.before_read()?;
        self.member
            .read_repairing(|| self.member.store.read_meta(inode))
    }

    fn read_merkle_piece(&self, inode: u64, piece: u64) -> Result<Vec<u8>, ServiceError> {
        self.member.before_read()?;
        self.member
            .read_repairing(|| self.member.store.read_merkle_piece(inode, piece))
    }

    fn read_data(
        &self,
        inode: u64,
        indices: &[u64],
        access: Option<&ReadAccess>,
    ) -> Result<Vec<Option<Vec<u8>>>, ServiceError> {
        self.member.before_read()?;
        self.member
            .read_repairing(|| self.member.store.read_data(inode, indices, access))
    }

    /// On the leader (or without a network): verifies, proposes and returns
    /// once applied. On a follower: forwards the batch to the leader, which
    /// verifies and applies it, and returns once this member has applied it
    /// too (so its own reads see it).
    fn write(&self, batch: SectorBatch) -> Result<(), ServiceError> {
        self.member.write(batch, &mut || {})
    }

    /// [`RaftService::write`]; on the leader, `queued` is called as soon as
    /// the batch has its place in the log, before it is replicated and
    /// applied, so the caller may stage the file's next batch meanwhile.
    fn write_queued(
        &self,
        batch: SectorBatch,
        queued: &mut dyn FnMut(),
    ) -> Result<(), ServiceError> {
        self.member.write(batch, queued)
    }

    fn flush(&self) -> Result<(), ServiceError> {
        // Entries are durable in the log before they are applied; this makes
        // the applied state durable too.
        Ok(self.member.store.engine().flush().wait()?)
    }

    fn subscribe(&self, inode: u64) -> Receiver<SectorId> {
        self.member.store.subscribe(inode)
    }

    fn space(&self) -> Result<(u64, u64), ServiceError> {
        crate::store::space(&self.member.dir)
    }

    fn watch_foreign_changes(&self) -> Option<Receiver<u64>> {
        self.member.store.watch_foreign_changes()
    }
}

/// Keeps the log within `high` bytes ([`RaftConfig::log_bytes`]): past it,
/// asks openraft for a snapshot (a flush of the state machine's engine: the
/// engine *is* the snapshot) and then to purge all but the newest quarter.
/// Ends with the runtime.
async fn bound_log(raft: Raft, log: EngineLogStore, machine: Arc<MachineShared>, high: u64) {
    let keep = high / 4;
    let mut held = log.held_bytes();
    loop {
        if held.changed().await.is_err() {
            return;
        }
        let over = *held.borrow_and_update() > high;
        // Snapshots being sent keep the log after them only within budget.
        machine
            .log_over_budget
            .store(over, std::sync::atomic::Ordering::Release);
        if !over {
            continue;
        }
        let Some(upto) = log.purge_index_keeping(keep) else {
            continue;
        };
        let covered = |metrics: &openraft::RaftMetrics<u64, MemberNode>| {
            metrics.snapshot.is_some_and(|id| id.index >= upto)
        };
        if !covered(&raft.metrics().borrow()) {
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
            let mut metrics = raft.metrics();
            let _ = tokio::time::timeout(LOG_BOUND_RETRY, async {
                while !covered(&metrics.borrow_and_update()) {
                    if metrics.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        if raft.trigger().purge_log(upto).await.is_err() {
            return;
        }
        // Purges are not immediate (openraft waits for replication to pass
        // them): wait for this one before asking again.
        let _ = tokio::time::timeout(LOG_BOUND_RETRY, async {
            while *held.borrow_and_update() > high {
                if held.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

impl Drop for RaftService {
    /// Stops Raft and the network, then the engines, leaving checkpoints.
    fn drop(&mut self) {
        let member = &self.member;
        if let Some(tokio) = self.tokio.take() {
            tokio.block_on(async {
                if let Err(error) = member.raft.shutdown().await {
                    tracing::warn!("raft shutdown: {error}");
                }
                if let Some(network) = &member.network {
                    network.runtime.shutdown().await;
                }
            });
            tokio.shutdown_timeout(Duration::from_secs(2));
        }
        if let Err(error) = member.store.engine().shutdown() {
            tracing::warn!("sector engine shutdown: {error}");
        }
        if let Err(error) = self.log_engine.shutdown() {
            tracing::warn!("raft log engine shutdown: {error}");
        }
    }
}

/// What the metadata records of the files `batch` writes and removes are once
/// it is applied (see [`Member::stored_metas`]).
fn written_metas(batch: &SectorBatch) -> Vec<Option<Vec<u8>>> {
    batch
        .files
        .iter()
        .map(|file| Some(blocktree_core::encoding::encode(&file.meta)))
        .chain(batch.removes.iter().map(|_| None))
        .collect()
}
