//! [`FileSystem`]: the filesystem service. Namespace operations (create, unlink,
//! rename, link…) change the directory and the file in one atomic sector batch;
//! file handles read and write through the file's [`NodeState`]; the Authorizer
//! checks every operation.
//!
//! Concurrency: one lock per node; namespace operations also take the namespace
//! lock, so they never interleave, while reads and writes of different files run in
//! parallel. A data operation holds one node lock at a time, so nesting node locks
//! inside the namespace lock cannot deadlock.

use crate::attr::{
    AccessMask, Attr, Caller, DirEntry, FileKind, RenameMode, SetAttr, StatFs, TimeSet, now,
    to_file_time,
};
use crate::authorizer;
use crate::dir::{self, DIR_SECTOR_SIZE, Entry, NAME_MAX};
use crate::error::{FsError, FsResult};
use crate::node::{
    Ctx, NodeKeys, NodeState, ParentInfo, Presealed, ReadPlan, SectorFetch, Tombstone,
    UnsignedWrite,
};
use blocktree_core::aead::{SymmetricKey, random_fill};
use blocktree_core::credstore::CredStore;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::EncryptionPublicKey;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{
    FileMeta, KeyState, MetaBody, MetaSecrets, SecretsPart, VerifiedSignatures,
};
use blocktree_core::readcap::{EpochKeyTable, FileIds, ParentTable, ReadcapTable, SALT_LEN};
use blocktree_core::sector::SectorId;
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::RevocationList;
use blocktree_raftlog::store::ALL_FILES_CHANGED;
use blocktree_raftlog::{SectorBatch, SectorService};
use crossbeam_channel::Receiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The xattr of a directory that sets whether files created in it are encrypted
/// ("on" or "off"); without it, children inherit the directory's own encryption.
pub const ENCRYPT_XATTR: &[u8] = b"user.blocktree.encrypt";

/// Distinct writecap chains whose signatures are remembered as verified.
const VERIFIED_CHAINS: usize = 1024;
/// Distinct metadata remembered as verified (32 bytes and a set slot each).
const VERIFIED_METAS: usize = 16384;

/// Nodes kept in memory before clean, unused ones are dropped. A cached node
/// costs about 2.2 KiB (10,000 created files: 4 MiB more resident with 10,000
/// cached than with 8,192), so at most about 36 MiB; loading one again costs a
/// metadata read, its decryption and a check (20–30 µs), which a `stat` of
/// each of 10,000 files paid for the 1,800 beyond a cache of 8,192 and for
/// every file loaded since a sweep, as a sweep drops every clean unused node.
const CACHED_NODES: usize = 16384;

/// How a [`FileSystem`] behaves.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// Whether the root directory, when this mount creates it, is encrypted.
    pub encrypt_root: bool,
    /// Data sector size of new regular files and symlinks.
    pub sector_size: u32,
    /// Buffered bytes per file before a write commits a batch by itself.
    /// Default 4 MiB: every batch is a Raft entry alive in several copies
    /// (buffer, sealed records, log encoding) until applied, and while one is
    /// in flight the next fills. With 16 MiB a 1 GiB NBD write run peaked at
    /// 290–317 MiB RSS and 134 MB/s, with 8 MiB at 234 MiB and 160 MB/s; once
    /// commits left the file's lock, 8 MiB gave 367 MB/s and a 271 MiB peak,
    /// 4 MiB 400 MB/s and 247 MiB (after laying out a 1 GiB volume, 8 s of
    /// 1 MiB writes at QD 16).
    pub dirty_limit: usize,
    /// Cache lifetime written into new files' metadata.
    pub cache_seconds: u32,
    /// Merkle hash of new files.
    pub hash: HashAlgorithm,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            read_only: false,
            encrypt_root: true,
            sector_size: 4096,
            dirty_limit: 4 << 20,
            cache_seconds: 60,
            hash: HashAlgorithm::Sha256,
        }
    }
}

type NodeRef = Arc<Mutex<NodeState>>;

/// Namespace and attribute changes made in memory and not yet committed: they go
/// to the store together, as one atomic batch, when [`PENDING_NODES`] files have
/// changed, [`PENDING_AGE`] has passed, or on fsync, fsyncdir and unmount — the
/// commit interval of a journaling file system. A create followed by an unlink
/// inside one interval never reaches the store.
#[derive(Default)]
struct Pending {
    nodes: BTreeMap<u64, NodeRef>,
    tombstones: Vec<Tombstone>,
    /// Inodes deleted in memory: the store may still hold them until the commit
    /// that deletes them has ended (so they stay here while it is in flight).
    deleted: std::collections::HashSet<u64>,
    /// Inodes created and not yet committed, or in a commit still in flight. A
    /// file under such a directory cannot prove its readcap chain to the store yet.
    created: std::collections::HashSet<u64>,
    /// Buffered bytes of the small new files staged to go with their entries
    /// (counted when staged, so a file staged twice counts twice).
    bytes: usize,
    since: Option<Instant>,
}

impl Pending {
    /// Whether the staged changes are due for a commit, and whether so many
    /// are staged that an operation should commit them itself
    /// ([`PENDING_BACKLOG`]).
    fn due(&self) -> (bool, bool) {
        let changed = self.nodes.len() + self.tombstones.len();
        let due = changed >= PENDING_NODES
            || self.bytes >= PENDING_BYTES
            || self
                .since
                .is_some_and(|since| since.elapsed() >= PENDING_AGE);
        let backlog = changed >= PENDING_BACKLOG || self.bytes >= PENDING_BACKLOG_BYTES;
        (due, backlog)
    }
}

/// Changed files that make the pending namespace changes due for a commit. A
/// batch's fixed costs (its directories' blocks and trees, a Raft entry, the
/// log's sync, and what the flusher's commit takes from the operations on 2
/// cores) spread over this many files: create+stat+unlink of 10,000 files
/// through btfuse ran 4,820–4,990 files/s with 1,024 and 6,000–6,160 with
/// 4,096, for 18 MiB more resident at its peak (166 MiB). The age limit
/// ([`PENDING_AGE`]) still bounds what a crash loses.
const PENDING_NODES: usize = 4096;
/// Bytes of small new files' data that make the staged changes due whatever
/// their count: what bounds the memory a burst of small files holds (4,096
/// files of up to [`SMALL_NEW_FILE`] would be 256 MiB).
const PENDING_BYTES: usize = 32 << 20;
/// Changed files at which an operation commits the pending changes itself
/// rather than leave them to the background flusher: what bounds the staged
/// changes while the flusher's commit is in flight.
const PENDING_BACKLOG: usize = 4 * PENDING_NODES;
/// [`PENDING_BACKLOG`] for the staged small files' bytes.
const PENDING_BACKLOG_BYTES: usize = 2 * PENDING_BYTES;
/// How long ending a commit's nodes waits before it tries their locks again.
const END_POLL: Duration = Duration::from_micros(50);
/// New files up to this many buffered bytes wait for the staged commit on close.
const SMALL_NEW_FILE: usize = 64 * 1024;

/// Writes shorter than this cover no whole sector of any file worth sealing
/// before the lock (the smallest sector size).
const MIN_PRESEAL_BYTES: usize = 512;
/// How long a writer waiting for a commit slot sleeps before it looks again
/// (the store's wake-up can be missed; see `wait_to_begin`).
const QUEUED_POLL: Duration = Duration::from_millis(1);
/// How long a read that failed verification in a cluster is planned again,
/// after catching up with changes other members made, before it is EIO; and
/// its first pause, doubled each time up to a tenth of that. The announcement
/// of another member's change may land well after its records on a loaded
/// machine: 60 ms in all was too short for a follower-reads server during a
/// full test run.
const FOREIGN_READ_PATIENCE: Duration = Duration::from_secs(2);
const FOREIGN_READ_BACKOFF: Duration = Duration::from_millis(10);
/// The longest a namespace change waits before it is committed.
pub const PENDING_AGE: Duration = Duration::from_secs(1);

struct Handle {
    node: NodeRef,
    write: bool,
    append: bool,
}

/// The filesystem service over one generation's sector service.
pub struct FileSystem {
    ctx: Ctx,
    /// Until when this runtime may write, or why it may not.
    write_access: Result<Timestamp, String>,
    config: FsConfig,
    nodes: Mutex<HashMap<u64, NodeRef>>,
    /// The number of cached nodes at which `install` next looks for nodes to
    /// drop (only read and written under `nodes`' lock).
    next_node_sweep: AtomicUsize,
    /// A directory each inode was last reached through: how an evicted node finds
    /// the parent whose key opens it.
    parents: Mutex<HashMap<u64, u64>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    namespace: Mutex<()>,
    /// Held by the commit of the staged changes under way, from taking them
    /// until the store answered and its nodes know: such commits reach the
    /// store one after another, in the order their changes were made.
    namespace_commits: Mutex<()>,
    pending: Mutex<Pending>,
    /// Wakes the background flusher ([`FileSystem::start_flusher`]), which
    /// then commits the staged changes that came due, off the path of the
    /// operation that made them due.
    flusher: Arc<FlusherSignal>,
    /// Inodes other members of the sector service's cluster changed, announced
    /// as their writes apply here (`None`: nobody else writes).
    foreign: Option<crossbeam_channel::Receiver<u64>>,
    /// Announced inodes not reloaded yet (their node was locked).
    foreign_pending: Mutex<BTreeSet<u64>>,
    /// `foreign_pending` is not empty: lets the common case (nothing
    /// announced, nothing waiting) skip its lock on every operation.
    foreign_waiting: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // State behind a poisoned lock is still consistent: every change is applied
    // only after its batch committed.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Locks `node` once no commit of it is in flight: what commits it, or changes
/// what a commit installs (its metadata body), starts from here.
fn lock_settled(node: &NodeRef) -> MutexGuard<'_, NodeState> {
    settle(lock(node))
}

/// Waits, releasing the lock meanwhile, until no commit of `node` is in
/// flight. No commit begins while it waits.
fn settle(mut node: MutexGuard<'_, NodeState>) -> MutexGuard<'_, NodeState> {
    if !node.commit_in_flight() {
        return node;
    }
    node.settling += 1;
    let done = node.commit_done();
    let mut node = done
        .wait_while(node, |node| node.commit_in_flight())
        .unwrap_or_else(PoisonError::into_inner);
    node.settling -= 1;
    done.notify_all();
    node
}

/// Locks `node` once a commit of it may begin ([`NodeState::can_begin_commit`]):
/// fewer commits are in flight than allowed, each queued by the store.
fn lock_for_commit(node: &NodeRef) -> MutexGuard<'_, NodeState> {
    wait_to_begin(lock(node))
}

/// Waits, releasing the lock meanwhile, until a commit of `node` may begin.
fn wait_to_begin(mut node: MutexGuard<'_, NodeState>) -> MutexGuard<'_, NodeState> {
    let done = node.commit_done();
    while !node.can_begin_commit() {
        // The store marks a commit queued without the node's lock, so the
        // wake-up may come between a look and the wait: look again soon.
        node = done
            .wait_timeout(node, QUEUED_POLL)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    node
}

/// Writing clears setuid/setgid, as on other file systems.
fn clear_set_ids(node: &mut NodeState) {
    if node.secrets.mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        node.secrets.mode &= !(libc::S_ISUID | libc::S_ISGID);
    }
}

/// The count a write of `data` returns.
fn write_count(data: &[u8]) -> FsResult<u32> {
    u32::try_from(data.len()).map_err(|_| FsError::Invalid("write too large".into()))
}

fn xattr_key(name: &[u8]) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(name.to_vec())
}

fn random_salt() -> FsResult<[u8; SALT_LEN]> {
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    Ok(salt)
}

/// What a new file is.
struct NewFile<'a> {
    kind: FileKind,
    mode: u32,
    content: Option<&'a [u8]>,
    /// The data sector size of a regular file, instead of the configured one.
    sector_size: Option<u32>,
}

impl FileSystem {
    /// The root directory's inode, FUSE's root id.
    pub const ROOT: u64 = 1;

    /// The file system stored by `service`, creating its root directory if the
    /// generation is empty.
    pub fn new(
        service: Arc<dyn SectorService>,
        creds: Arc<dyn CredStore>,
        config: FsConfig,
    ) -> FsResult<FileSystem> {
        let ctx_foreign = service.watch_foreign_changes();
        let ctx = Ctx {
            service,
            creds,
            revoked: RevocationList::new(),
            verified_signatures: VerifiedSignatures::new(VERIFIED_CHAINS, VERIFIED_METAS),
        };
        let fs = FileSystem {
            write_access: Self::write_access(&ctx),
            ctx,
            config,
            nodes: Mutex::new(HashMap::new()),
            next_node_sweep: AtomicUsize::new(CACHED_NODES),
            parents: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            namespace: Mutex::new(()),
            namespace_commits: Mutex::new(()),
            pending: Mutex::new(Pending::default()),
            flusher: Arc::new(FlusherSignal::default()),
            foreign: ctx_foreign,
            foreign_pending: Mutex::new(BTreeSet::new()),
            foreign_waiting: AtomicBool::new(false),
        };
        if fs.ctx.service.read_meta(Self::ROOT)?.is_none() {
            if fs.config.read_only {
                return Err(FsError::ReadOnly(
                    "the store is empty and the mount is read-only".into(),
                ));
            }
            fs.create_root()?;
        }
        fs.node(Self::ROOT)?;
        Ok(fs)
    }

    fn create_root(&self) -> FsResult<()> {
        let secrets = MetaSecrets {
            uid: 0,
            gid: 0,
            mode: libc::S_IFDIR | 0o755,
            nlink: 2,
            ..self.new_secrets()
        };
        let mut node = self.new_node(
            Self::ROOT,
            secrets,
            DIR_SECTOR_SIZE,
            self.config.encrypt_root,
            None,
        )?;
        let write = node
            .prepare_commit(&self.ctx)?
            .ok_or_else(|| FsError::Io("nothing to write for the root".into()))?;
        node.begin_commit();
        let meta = write.meta.clone();
        self.submit(SectorBatch {
            files: vec![write],
            removes: Vec::new(),
        })?;
        node.finish_commit(&self.ctx, meta);
        self.ctx.service.flush()?;
        Ok(())
    }

    fn new_secrets(&self) -> MetaSecrets {
        let time = now();
        MetaSecrets {
            nlink: 1,
            atime: time,
            mtime: time,
            ctime: time,
            cache_seconds: self.config.cache_seconds,
            ..MetaSecrets::default()
        }
    }

    /// A node for a new file: keys, readcap or parent entry, unsigned body.
    fn new_node(
        &self,
        ino: u64,
        secrets: MetaSecrets,
        sector_size: u32,
        encrypted: bool,
        parent: Option<&ParentInfo>,
    ) -> FsResult<NodeState> {
        let writecap = self.writecap()?;
        let ids = FileIds {
            generation: self.ctx.generation(),
            inode: ino,
        };
        let salt = random_salt()?;
        let mut readcaps = ReadcapTable::default();
        let mut parents = ParentTable::default();
        let mut chain = parent.map_or_else(Vec::new, |parent| parent.chain.clone());
        chain.push(ino);
        let (key_state, file_key) = if encrypted {
            let file_key = SymmetricKey::generate()?;
            let mut epoch_keys = EpochKeyTable::default();
            epoch_keys.add_epoch(ids, 0, &file_key)?;
            match parent.and_then(|parent| parent.key.as_ref().map(|key| (parent.ino, key))) {
                Some((parent_ino, parent_key)) => {
                    let parent_ids = FileIds {
                        generation: ids.generation,
                        inode: parent_ino,
                    };
                    parents.grant(&salt, ids, parent_ids, parent_key, &file_key)?;
                }
                None => {
                    // No encrypted parent to reach it through: the creator gets a
                    // readcap of its own.
                    readcaps.grant(
                        self.config.hash,
                        &salt,
                        ids,
                        &self.ctx.creds.encryption_public_key(),
                        &file_key,
                    )?;
                    chain = vec![ino];
                }
            }
            let state = KeyState {
                epoch: 0,
                seals_in_epoch: 0,
                epoch_keys,
            };
            (Some(state), Some(file_key))
        } else {
            (None, None)
        };
        let empty = MerkleTree::new(self.config.hash);
        let body = MetaBody {
            ids,
            sector_size,
            hash_algorithm: self.config.hash,
            merkle_root: empty.root(),
            sector_count: 0,
            writer: self.ctx.creds.signing_public_key(),
            writecap,
            readcaps,
            parents,
            salt,
            keys: key_state,
            secrets: SecretsPart::Clear(MetaSecrets::default()),
        };
        let keys = match file_key {
            Some(key) => Some(NodeKeys::open(&body, key)?),
            None => None,
        };
        Ok(NodeState::fresh(ino, body, secrets, keys, chain))
    }

    /// Why this file system refuses writes (read-only mount, no writecap
    /// covering the generation's directory, expired writecap), or `None`.
    pub fn write_refusal(&self) -> Option<String> {
        self.writecap().err().map(|error| match error {
            FsError::ReadOnly(why) => why,
            other => other.to_string(),
        })
    }

    fn writecap(&self) -> FsResult<blocktree_core::writecap::Writecap> {
        if self.config.read_only {
            return Err(FsError::ReadOnly("mounted read-only".into()));
        }
        match &self.write_access {
            Err(why) => return Err(FsError::ReadOnly(why.clone())),
            Ok(expires) if Timestamp::now() >= *expires => {
                return Err(FsError::ReadOnly(format!(
                    "this runtime's writecap expired at {expires}"
                )));
            }
            Ok(_) => {}
        }
        self.ctx
            .creds
            .writecap()
            .cloned()
            .ok_or_else(|| FsError::ReadOnly("this runtime holds no writecap".into()))
    }

    /// Whether this runtime may write the generation: its writecap must cover the
    /// generation's directory. Decided once, so a refused change fails at once
    /// with EROFS instead of at the next commit.
    fn write_access(ctx: &Ctx) -> Result<Timestamp, String> {
        let writecap = ctx
            .creds
            .writecap()
            .ok_or_else(|| "this runtime holds no writecap".to_string())?;
        let directory = ctx.service.directory();
        writecap
            .validate_for(
                &ctx.creds.principal(),
                directory,
                Timestamp::now(),
                &ctx.revoked,
            )
            .map_err(|error| {
                format!("this runtime's writecap does not allow writing {directory}: {error}")
            })?;
        writecap
            .expires()
            .ok_or_else(|| "this runtime's writecap is empty".to_string())
    }

    fn check_writable(&self) -> FsResult<()> {
        self.writecap().map(|_| ())
    }

    fn submit(&self, batch: SectorBatch) -> FsResult<()> {
        Ok(self.ctx.service.write(batch)?)
    }

    // ----- nodes -----

    /// The node of `ino`, loading it (through the parent it was reached by) if
    /// needed.
    fn node(&self, ino: u64) -> FsResult<NodeRef> {
        self.catch_up_foreign();
        if let Some(node) = lock(&self.nodes).get(&ino) {
            return Ok(node.clone());
        }
        if lock(&self.pending).deleted.contains(&ino) {
            return Err(FsError::NotFound);
        }
        let parent = if ino == Self::ROOT {
            None
        } else {
            let parent_ino = lock(&self.parents).get(&ino).copied();
            match parent_ino {
                Some(parent_ino) if parent_ino != ino => {
                    let parent = self.node(parent_ino)?;
                    let info = lock(&parent).parent_info();
                    Some(info)
                }
                _ => None,
            }
        };
        let state = NodeState::load(&self.ctx, ino, parent.as_ref())?;
        Ok(self.install(ino, state))
    }

    /// The node of `ino`, a child of the locked directory `parent`.
    fn child(&self, parent: &NodeState, ino: u64) -> FsResult<NodeRef> {
        self.catch_up_foreign();
        lock(&self.parents).insert(ino, parent.ino);
        if let Some(node) = lock(&self.nodes).get(&ino) {
            return Ok(node.clone());
        }
        if lock(&self.pending).deleted.contains(&ino) {
            return Err(FsError::NotFound);
        }
        let state = NodeState::load(&self.ctx, ino, Some(&parent.parent_info()))?;
        Ok(self.install(ino, state))
    }

    fn install(&self, ino: u64, state: NodeState) -> NodeRef {
        let mut nodes = lock(&self.nodes);
        if nodes.len() >= self.next_node_sweep.load(Ordering::Relaxed) {
            nodes.retain(|&cached, node| {
                cached == Self::ROOT
                    || Arc::strong_count(node) > 1
                    || node
                        .try_lock()
                        .map_or(true, |state| state.is_dirty() || state.handles > 0)
            });
            // When most nodes are in use (open, dirty, or new files not yet
            // committed), sweeping again at the next install would scan them
            // all for nothing, once per install: wait until the cache has
            // grown by a quarter, so sweeping costs O(1) per install.
            let next = CACHED_NODES.max(nodes.len() + nodes.len() / 4);
            self.next_node_sweep.store(next, Ordering::Relaxed);
        }
        nodes
            .entry(ino)
            .or_insert_with(|| Arc::new(Mutex::new(state)))
            .clone()
    }

    /// Commits one file's buffered writes as a batch of its own, holding the
    /// node's lock throughout; lock it with [`lock_settled`]. A directory's
    /// changes are namespace changes: they are staged, to be committed with the
    /// files their entries name.
    fn commit(&self, node: &mut NodeState) -> FsResult<()> {
        if node.is_dir() {
            self.stage_inos(&[node.ino], Vec::new());
            return Ok(());
        }
        let Some(write) = node.prepare_commit(&self.ctx)? else {
            return Ok(());
        };
        node.begin_commit();
        let meta = write.meta.clone();
        let stored = self.submit(SectorBatch {
            files: vec![write],
            removes: Vec::new(),
        });
        node.end_commit(&self.ctx, meta, stored)
    }

    /// Stages the changes of several nodes (and deletes) to be committed together;
    /// see [`Pending`].
    fn commit_together(
        &self,
        nodes: &mut [&mut NodeState],
        removes: Vec<Tombstone>,
    ) -> FsResult<()> {
        let inos: Vec<u64> = nodes.iter().map(|node| node.ino).collect();
        self.stage_inos(&inos, removes);
        Ok(())
    }

    fn stage_inos(&self, inos: &[u64], tombstones: Vec<Tombstone>) {
        let refs: Vec<(u64, NodeRef)> = {
            let nodes = lock(&self.nodes);
            inos.iter()
                .filter_map(|ino| nodes.get(ino).map(|node| (*ino, node.clone())))
                .collect()
        };
        let mut pending = lock(&self.pending);
        for (ino, node) in refs {
            pending.nodes.insert(ino, node);
        }
        for tombstone in &tombstones {
            pending.nodes.remove(&tombstone.inode());
        }
        pending.tombstones.extend(tombstones);
        pending.since.get_or_insert_with(Instant::now);
    }

    /// Drops `ino` from the staged changes: it is being deleted.
    fn unstage(&self, ino: u64) {
        let mut pending = lock(&self.pending);
        pending.nodes.remove(&ino);
        pending.deleted.insert(ino);
    }

    /// Commits the staged changes if enough have gathered or waited long enough:
    /// the background flusher does, when it runs, unless the staged changes
    /// have reached [`PENDING_BACKLOG`]. A failure is logged and the changes
    /// stay staged: the operation that staged them succeeded, and fsync or
    /// unmount reports the error.
    fn after_change(&self) {
        let (due, backlog) = lock(&self.pending).due();
        if !due {
            return;
        }
        if !backlog && self.flusher.wake() {
            return;
        }
        if let Err(error) = self.commit_pending() {
            tracing::warn!("committing namespace changes failed, will retry: {error}");
        }
    }

    /// Commits the staged changes if they are due (the flusher's round).
    fn commit_if_due(&self) {
        let (due, _) = lock(&self.pending).due();
        if due && let Err(error) = self.commit_pending() {
            tracing::warn!("committing namespace changes failed, will retry: {error}");
        }
    }

    /// Commits every staged namespace and attribute change as one atomic batch.
    ///
    /// The changes are taken, and their nodes' parts of the batch prepared,
    /// under the namespace lock and the nodes' locks; the batch then goes to
    /// the store without them, so namespace operations go on while it is
    /// verified, replicated and applied. What they change meanwhile is layered
    /// over the commit in flight, as a file's writes are over its data commits;
    /// an operation that changes what a commit installs (a node's metadata
    /// body: its parents on unlink, link and rename) settles the node first.
    /// Deletes are signed here, off the path of the operations that made them.
    pub fn commit_pending(&self) -> FsResult<()> {
        let _in_order = lock(&self.namespace_commits);
        let Some(flight) = self.begin_pending_commit()? else {
            return Ok(());
        };
        let NamespaceCommit {
            prepared,
            tombstones,
            restage,
            deleted,
            created,
            since,
        } = flight;
        let mut ends = Vec::with_capacity(prepared.len());
        let mut unsigned = Vec::with_capacity(prepared.len());
        for (node, seq, write) in prepared {
            ends.push((node, seq));
            unsigned.push(write);
        }
        // Signed without the locks, while operations go on.
        let signed = unsigned
            .into_iter()
            .map(|write| write.sign(&self.ctx))
            .collect::<FsResult<Vec<_>>>()
            .and_then(|files| {
                let removes = tombstones
                    .iter()
                    .cloned()
                    .map(|tombstone| tombstone.sign(&self.ctx))
                    .collect::<FsResult<Vec<_>>>()?;
                Ok((files, removes))
            });
        let mut metas = Vec::new();
        // Whatever happens in the store, the nodes must leave the in-flight
        // state, or every later commit of them would wait forever.
        let stored = signed.and_then(|(files, removes)| {
            metas = files.iter().map(|file| file.meta.clone()).collect();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.submit(SectorBatch { files, removes })
            }))
            .unwrap_or_else(|_| Err(FsError::Io("the store panicked taking a batch".into())))
        });
        {
            let mut pending = lock(&self.pending);
            if stored.is_ok() {
                pending.deleted.retain(|ino| !deleted.contains(ino));
                pending.created.retain(|ino| !created.contains(ino));
            } else {
                // Nothing was stored: stage it all again for the next try, but
                // for the nodes deleted meanwhile (their deletes are staged).
                for (ino, node) in restage {
                    if !pending.deleted.contains(&ino) {
                        pending.nodes.entry(ino).or_insert(node);
                    }
                }
                pending.tombstones.extend(tombstones);
                pending.since = since.or(pending.since);
            }
        }
        let ends = match stored {
            Ok(()) => ends
                .into_iter()
                .zip(metas)
                .map(|((node, seq), meta)| (node, seq, Some(meta)))
                .collect(),
            Err(_) => ends
                .into_iter()
                .map(|(node, seq)| (node, seq, None))
                .collect(),
        };
        self.end_commits(ends);
        stored
    }

    /// Takes the staged changes and prepares each node's part of their batch;
    /// `None` if nothing is staged. The namespace lock is held while the
    /// changes are taken and their nodes locked, so the batch has every
    /// namespace operation whole or not at all; each node is then prepared
    /// and let go, in inode order, so a directory's creates and unlinks go on
    /// while the batch's other nodes are prepared (an operation that needs one
    /// of those waits for it, and its changes go to the next batch). On an
    /// error, nothing is in flight and everything stays staged.
    fn begin_pending_commit(&self) -> FsResult<Option<NamespaceCommit>> {
        let namespace = lock(&self.namespace);
        let (nodes, tombstones, deleted, created, since) = {
            let mut pending = lock(&self.pending);
            if pending.nodes.is_empty() && pending.tombstones.is_empty() {
                return Ok(None);
            }
            // The small files' data leaves with the batch. A batch that fails
            // stages its nodes again without their bytes counted; they still
            // go within PENDING_AGE.
            pending.bytes = 0;
            (
                std::mem::take(&mut pending.nodes),
                std::mem::take(&mut pending.tombstones),
                pending.deleted.clone(),
                pending.created.clone(),
                pending.since.take(),
            )
        };
        // In inode order, like every multi-node lock here. Waiting for one
        // node's commit in flight while holding others is safe: that commit
        // needs only its own node's lock to finish.
        let guards: Vec<MutexGuard<'_, NodeState>> =
            nodes.values().map(|node| lock_settled(node)).collect();
        drop(namespace);
        let mut prepared = Vec::new();
        let mut failure = None;
        let mut unprepared = Vec::new();
        for (node_ref, mut guard) in nodes.values().zip(guards) {
            if failure.is_some() {
                unprepared.push(guard);
                continue;
            }
            match guard.prepare_unsigned(&self.ctx) {
                Ok(Some(write)) => {
                    let seq = guard.begin_commit();
                    prepared.push((Arc::clone(node_ref), seq, write));
                }
                Ok(None) => {}
                Err(error) => {
                    failure = Some(error);
                    unprepared.push(guard);
                }
            }
        }
        if let Some(error) = failure {
            for guard in unprepared.iter_mut() {
                guard.abort_commit();
            }
            drop(unprepared);
            {
                let mut pending = lock(&self.pending);
                for (ino, node) in nodes {
                    if !pending.deleted.contains(&ino) {
                        pending.nodes.entry(ino).or_insert(node);
                    }
                }
                pending.tombstones.extend(tombstones);
                pending.since = since.or(pending.since);
            }
            let begun = prepared
                .into_iter()
                .map(|(node, seq, _)| (node, seq, None))
                .collect();
            self.end_commits(begun);
            return Err(error);
        }
        drop(unprepared);
        Ok(Some(NamespaceCommit {
            prepared,
            tombstones,
            restage: nodes,
            deleted,
            created,
            since,
        }))
    }

    /// Ends the commits of a batch's nodes as the store answered, one node at a
    /// time and without waiting for any node's lock: a namespace operation may
    /// hold one of them while it waits for another's commit to end (a settle),
    /// and each node's commit is the oldest in flight, as the node was settled
    /// when it began. Each carries its stored metadata, or `None` if the batch
    /// failed.
    fn end_commits(&self, mut ends: Vec<(NodeRef, u64, Option<FileMeta>)>) {
        while !ends.is_empty() {
            let before = ends.len();
            ends.retain_mut(|(node_ref, seq, meta)| {
                let mut node = match node_ref.try_lock() {
                    Ok(node) => node,
                    Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return true,
                };
                if !node.is_next_to_end(*seq) {
                    return true;
                }
                match meta.take() {
                    Some(meta) => node.finish_commit(&self.ctx, meta),
                    None => node.abort_commit(),
                }
                false
            });
            if ends.len() == before {
                std::thread::sleep(END_POLL);
            }
        }
    }

    fn attr(node: &NodeState) -> Attr {
        let mut attr = Attr::from_secrets(node.ino, &node.secrets, node.body.sector_size);
        if attr.kind == FileKind::Directory {
            attr.blksize = crate::attr::BLOCK_SIZE;
        }
        attr
    }

    // ----- lookups and attributes -----

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let dir_ref = self.node(parent)?;
        let dir = lock(&dir_ref);
        let entries = dir.dir.as_ref().ok_or(FsError::NotDir)?;
        authorizer::check(caller, &dir.secrets, AccessMask::EXECUTE)?;
        if name == b"." {
            return Ok(Self::attr(&dir));
        }
        if name == b".." {
            let up = lock(&self.parents)
                .get(&parent)
                .copied()
                .unwrap_or(Self::ROOT);
            drop(dir);
            let node = self.node(up)?;
            return Ok(Self::attr(&lock(&node)));
        }
        let entry = entries.get(name).ok_or(FsError::NotFound)?;
        let child = self.child(&dir, entry.inode)?;
        drop(dir);
        Ok(Self::attr(&lock(&child)))
    }

    /// The kernel forgot `ino`: its node may go once it is clean and closed.
    pub fn forget(&self, ino: u64) {
        if ino == Self::ROOT {
            return;
        }
        let mut nodes = lock(&self.nodes);
        let droppable = nodes.get(&ino).is_some_and(|node| {
            Arc::strong_count(node) == 1
                && node
                    .try_lock()
                    .is_ok_and(|state| !state.is_dirty() && state.handles == 0)
        });
        if droppable {
            nodes.remove(&ino);
        }
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, _caller: &Caller, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        Ok(Self::attr(&lock(&node)))
    }

    /// Checks `mask` for `caller` on `ino`, as `access(2)`.
    pub fn access(&self, caller: &Caller, ino: u64, mask: AccessMask) -> FsResult<()> {
        let node = self.node(ino)?;
        let node = lock(&node);
        if mask.write {
            self.check_writable()?;
        }
        authorizer::check(caller, &node.secrets, mask)
    }

    /// chmod, chown, truncate, utimens.
    pub fn setattr(&self, caller: &Caller, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        self.check_writable()?;
        let node_ref = self.node(ino)?;
        let mut node = lock_settled(&node_ref);
        if let Some(mode) = set.mode {
            authorizer::check_owner(caller, &node.secrets, "change the mode")?;
            let mut mode = mode & 0o7777;
            if caller.uid != 0 && !caller.in_group(node.secrets.gid) {
                mode &= !libc::S_ISGID;
            }
            node.secrets.mode = (node.secrets.mode & libc::S_IFMT) | mode;
        }
        if set.uid.is_some() || set.gid.is_some() {
            authorizer::check_chown(caller, &node.secrets, set.uid, set.gid)?;
            if let Some(uid) = set.uid {
                node.secrets.uid = uid;
            }
            if let Some(gid) = set.gid {
                node.secrets.gid = gid;
            }
            if node.secrets.mode & libc::S_IFMT != libc::S_IFDIR {
                node.secrets.mode &= !(libc::S_ISUID | libc::S_ISGID);
            }
        }
        if let Some(size) = set.size {
            if node.is_dir() {
                return Err(FsError::IsDir);
            }
            authorizer::check(caller, &node.secrets, AccessMask::WRITE)?;
            node.truncate(&self.ctx, size)?;
        }
        for (time, is_atime) in [(set.atime, true), (set.mtime, false)] {
            let Some(time) = time else { continue };
            let value = match time {
                TimeSet::Now => {
                    if authorizer::check_owner(caller, &node.secrets, "set times").is_err() {
                        authorizer::check(caller, &node.secrets, AccessMask::WRITE)?;
                    }
                    now()
                }
                TimeSet::At(at) => {
                    authorizer::check_owner(caller, &node.secrets, "set explicit times")?;
                    to_file_time(at)
                }
            };
            if is_atime {
                node.secrets.atime = value;
            } else {
                node.secrets.mtime = value;
            }
        }
        node.touch_ctime();
        self.commit(&mut node)?;
        Ok(Self::attr(&node))
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, _caller: &Caller, ino: u64) -> FsResult<Vec<u8>> {
        let node_ref = self.node(ino)?;
        let mut node = lock(&node_ref);
        if node.secrets.mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(FsError::Invalid("not a symbolic link".into()));
        }
        let size = node.secrets.size;
        node.read(&self.ctx, 0, size)
    }

    // ----- creating -----

    fn child_encrypted(dir: &NodeState) -> bool {
        match dir
            .secrets
            .xattrs
            .get(&xattr_key(ENCRYPT_XATTR))
            .map(|value| value.as_slice())
        {
            Some(b"on") => true,
            Some(b"off") => false,
            _ => dir.keys.is_some(),
        }
    }

    /// Creates a file of any kind in `parent`; returns its node.
    fn make(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        new: NewFile<'_>,
    ) -> FsResult<NodeRef> {
        dir::check_name(name)?;
        self.check_writable()?;
        let _namespace = lock(&self.namespace);
        let dir_ref = self.node(parent)?;
        let mut dir = lock(&dir_ref);
        if dir.dir.is_none() {
            return Err(FsError::NotDir);
        }
        authorizer::check(caller, &dir.secrets, AccessMask::WRITE_EXECUTE)?;
        if dir
            .dir
            .as_ref()
            .is_some_and(|entries| entries.get(name).is_some())
        {
            return Err(FsError::Exists);
        }
        let ino = self.ctx.service.allocate_inode()?;
        let gid = if dir.secrets.mode & libc::S_ISGID != 0 {
            dir.secrets.gid
        } else {
            caller.gid
        };
        let mut mode = new.kind.mode_bits() | (new.mode & 0o7777);
        if new.kind == FileKind::Directory && dir.secrets.mode & libc::S_ISGID != 0 {
            mode |= libc::S_ISGID;
        }
        let secrets = MetaSecrets {
            uid: caller.uid,
            gid,
            mode,
            nlink: if new.kind == FileKind::Directory {
                2
            } else {
                1
            },
            ..self.new_secrets()
        };
        let sector_size = if new.kind == FileKind::Directory {
            DIR_SECTOR_SIZE
        } else {
            new.sector_size.unwrap_or(self.config.sector_size)
        };
        let encrypted = Self::child_encrypted(&dir);
        let parent_info = dir.parent_info();
        let mut child = self.new_node(ino, secrets, sector_size, encrypted, Some(&parent_info))?;
        if let Some(content) = new.content {
            child.write(&self.ctx, 0, content)?;
        }
        if let Some(xattr) = dir.secrets.xattrs.get(&xattr_key(ENCRYPT_XATTR)).cloned() {
            // Subdirectories inherit the policy with the encryption it chose.
            if new.kind == FileKind::Directory {
                child
                    .secrets
                    .xattrs
                    .insert(serde_bytes::ByteBuf::from(ENCRYPT_XATTR.to_vec()), xattr);
            }
        }
        let entry = Entry {
            inode: ino,
            kind: new.kind,
        };
        if let Some(entries) = dir.dir.as_mut() {
            entries.insert(name, entry);
        }
        let time = now();
        dir.secrets.mtime = time;
        dir.secrets.ctime = time;
        if new.kind == FileKind::Directory {
            dir.secrets.nlink += 1;
        }
        dir.meta_dirty = true;
        dir.meta_dirty = true;
        let child = self.install(ino, child);
        self.stage_inos(&[ino, dir.ino], Vec::new());
        lock(&self.pending).created.insert(ino);
        lock(&self.parents).insert(ino, parent);
        drop(dir);
        drop(_namespace);
        self.after_change();
        Ok(child)
    }

    /// Creates a regular file, FIFO or socket (device nodes are not supported).
    pub fn mknod(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let kind = match FileKind::from_mode(mode) {
            Some(FileKind::Directory) | Some(FileKind::Symlink) => {
                return Err(FsError::Invalid(
                    "mknod makes files, fifos and sockets".into(),
                ));
            }
            Some(kind) => kind,
            None if mode & libc::S_IFMT == 0 => FileKind::Regular,
            None => {
                return Err(FsError::NotPermitted(
                    "device nodes are not supported".into(),
                ));
            }
        };
        let node = self.make(
            caller,
            parent,
            name,
            NewFile {
                kind,
                mode: mode & !umask,
                content: None,
                sector_size: None,
            },
        )?;
        Ok(Self::attr(&lock(&node)))
    }

    /// Creates a directory.
    pub fn mkdir(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<Attr> {
        let node = self.make(
            caller,
            parent,
            name,
            NewFile {
                kind: FileKind::Directory,
                mode: mode & !umask & 0o7777,
                content: None,
                sector_size: None,
            },
        )?;
        Ok(Self::attr(&lock(&node)))
    }

    /// Creates a symbolic link to `target`.
    pub fn symlink(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<Attr> {
        if target.is_empty() || target.len() > libc::PATH_MAX as usize {
            return Err(FsError::Invalid("symlink target length".into()));
        }
        let node = self.make(
            caller,
            parent,
            name,
            NewFile {
                kind: FileKind::Symlink,
                mode: 0o777,
                content: Some(target),
                sector_size: None,
            },
        )?;
        Ok(Self::attr(&lock(&node)))
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Attr, u64)> {
        self.create_regular(caller, parent, name, mode & !umask, flags, None)
    }

    /// Creates and opens a regular file whose data sectors are `sector_size`
    /// bytes (a power of two, 512 B to 1 MiB) whatever the configured size: a
    /// volume's block size.
    #[allow(clippy::too_many_arguments)]
    pub fn create_with_sector_size(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
        sector_size: u32,
    ) -> FsResult<(Attr, u64)> {
        if !sector_size.is_power_of_two() || !(512..=1 << 20).contains(&sector_size) {
            return Err(FsError::Invalid(format!(
                "a sector size must be a power of two from 512 B to 1 MiB, not {sector_size}"
            )));
        }
        self.create_regular(
            caller,
            parent,
            name,
            mode & !umask,
            flags,
            Some(sector_size),
        )
    }

    fn create_regular(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        sector_size: Option<u32>,
    ) -> FsResult<(Attr, u64)> {
        let node = self.make(
            caller,
            parent,
            name,
            NewFile {
                kind: FileKind::Regular,
                mode: mode & 0o7777,
                content: None,
                sector_size,
            },
        )?;
        let attr = Self::attr(&lock(&node));
        let handle = self.add_handle(node, flags);
        Ok((attr, handle))
    }

    // ----- removing -----

    /// Drops one link of the locked `child` from the locked `dir` (already removed
    /// from its entries); returns the tombstone to delete it with when it was the
    /// last link and no handle keeps it open.
    fn unlink_from(
        &self,
        dir: &mut NodeState,
        child: &mut NodeState,
    ) -> FsResult<Option<Option<Tombstone>>> {
        let time = now();
        dir.secrets.mtime = time;
        dir.secrets.ctime = time;
        dir.meta_dirty = true;
        if child.is_dir() {
            child.secrets.nlink = 0;
            dir.secrets.nlink = dir.secrets.nlink.saturating_sub(1);
        } else {
            child.secrets.nlink = child.secrets.nlink.saturating_sub(1);
        }
        child.secrets.ctime = time;
        child.meta_dirty = true;
        let still_linked_here = child.secrets.nlink > 0
            && dir.dir.as_ref().is_some_and(|entries| {
                entries
                    .entries_from(0)
                    .any(|(_, _, entry)| entry.inode == child.ino)
            });
        if !still_linked_here {
            let salt = child.body.salt;
            let parent_ids = FileIds {
                generation: self.ctx.generation(),
                inode: dir.ino,
            };
            child.body.parents.remove(&salt, parent_ids);
        }
        if child.secrets.nlink == 0 && child.handles == 0 {
            self.unstage(child.ino);
            // A file never committed leaves nothing to delete.
            return Ok(Some(if child.stored {
                Some(child.tombstone(&self.ctx)?)
            } else {
                None
            }));
        }
        Ok(None)
    }

    fn remove_entry(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        want_dir: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        let _namespace = lock(&self.namespace);
        let dir_ref = self.node(parent)?;
        let mut dir = lock(&dir_ref);
        let entries = dir.dir.as_ref().ok_or(FsError::NotDir)?;
        authorizer::check(caller, &dir.secrets, AccessMask::WRITE_EXECUTE)?;
        let entry = entries.get(name).ok_or(FsError::NotFound)?;
        let child_ref = self.child(&dir, entry.inode)?;
        // Settled: its parents change, and whether it needs a tombstone
        // depends on whether a commit of it in flight stores it.
        let mut child = lock_settled(&child_ref);
        authorizer::check_sticky(caller, &dir.secrets, &child.secrets)?;
        match (want_dir, child.is_dir()) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            (true, true)
                if child
                    .dir
                    .as_ref()
                    .is_some_and(|entries| !entries.is_empty()) =>
            {
                return Err(FsError::NotEmpty);
            }
            _ => {}
        }
        let saved_dir = dir.secrets.clone();
        let saved_child = (child.secrets.clone(), child.body.parents.clone());
        if let Some(entries) = dir.dir.as_mut() {
            entries.remove(name);
        }
        let result = self
            .unlink_from(&mut dir, &mut child)
            .and_then(|tombstone| {
                let removed = tombstone.is_some();
                let outcome = match tombstone {
                    Some(tombstone) => {
                        self.commit_together(&mut [&mut dir], tombstone.into_iter().collect())
                    }
                    None => self.commit_together(&mut [&mut dir, &mut child], Vec::new()),
                };
                outcome.map(|()| removed)
            });
        match result {
            Ok(removed) => {
                if removed {
                    drop(child);
                    lock(&self.nodes).remove(&entry.inode);
                    lock(&self.parents).remove(&entry.inode);
                }
                drop(dir);
                drop(_namespace);
                self.after_change();
                Ok(())
            }
            Err(error) => {
                if let Some(entries) = dir.dir.as_mut() {
                    entries.insert(name, entry);
                }
                dir.secrets = saved_dir;
                child.secrets = saved_child.0;
                child.body.parents = saved_child.1;
                Err(error)
            }
        }
    }

    /// Removes a non-directory entry.
    pub fn unlink(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove_entry(caller, parent, name, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, caller: &Caller, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir of .".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        self.remove_entry(caller, parent, name, true)
    }

    // ----- linking and renaming -----

    /// Adds the locked `child` to the locked directory `dir`'s parent entries.
    fn adopt(&self, dir: &NodeState, child: &mut NodeState) -> FsResult<()> {
        let Some(keys) = child.keys.as_ref() else {
            return Ok(());
        };
        let file_key = SymmetricKey::from_slice(keys.file_key.as_bytes())
            .ok_or_else(|| FsError::Io("file key".into()))?;
        let ids = child.body.ids;
        let salt = child.body.salt;
        match dir.parent_info().key {
            Some(parent_key) => {
                let parent_ids = FileIds {
                    generation: self.ctx.generation(),
                    inode: dir.ino,
                };
                child
                    .body
                    .parents
                    .grant(&salt, ids, parent_ids, &parent_key, &file_key)?;
            }
            None => {
                // An unencrypted directory has no key to wrap under; keep the file
                // readable by its writer.
                child.body.readcaps.grant(
                    child.body.hash_algorithm,
                    &salt,
                    ids,
                    &self.ctx.creds.encryption_public_key(),
                    &file_key,
                )?;
            }
        }
        child.meta_dirty = true;
        Ok(())
    }

    /// A hard link to `ino` named `new_name` in `new_parent`.
    pub fn link(
        &self,
        caller: &Caller,
        ino: u64,
        new_parent: u64,
        new_name: &[u8],
    ) -> FsResult<Attr> {
        dir::check_name(new_name)?;
        self.check_writable()?;
        let _namespace = lock(&self.namespace);
        let dir_ref = self.node(new_parent)?;
        let child_ref = self.node(ino)?;
        if Arc::ptr_eq(&dir_ref, &child_ref) {
            return Err(FsError::NotPermitted("hard links to directories".into()));
        }
        let mut dir = lock(&dir_ref);
        // Settled: its parents change.
        let mut child = lock_settled(&child_ref);
        if child.is_dir() {
            return Err(FsError::NotPermitted("hard links to directories".into()));
        }
        let entries = dir.dir.as_ref().ok_or(FsError::NotDir)?;
        authorizer::check(caller, &dir.secrets, AccessMask::WRITE_EXECUTE)?;
        if entries.get(new_name).is_some() {
            return Err(FsError::Exists);
        }
        let saved = (
            child.secrets.clone(),
            child.body.clone(),
            dir.secrets.clone(),
        );
        let kind = FileKind::from_mode(child.secrets.mode).unwrap_or(FileKind::Regular);
        if let Some(entries) = dir.dir.as_mut() {
            entries.insert(new_name, Entry { inode: ino, kind });
        }
        child.secrets.nlink += 1;
        child.touch_ctime();
        let time = now();
        dir.secrets.mtime = time;
        dir.secrets.ctime = time;
        dir.meta_dirty = true;
        let result = self
            .adopt(&dir, &mut child)
            .and_then(|()| self.commit_together(&mut [&mut child, &mut dir], Vec::new()));
        if let Err(error) = result {
            if let Some(entries) = dir.dir.as_mut() {
                entries.remove(new_name);
            }
            child.secrets = saved.0;
            child.body = saved.1;
            dir.secrets = saved.2;
            return Err(error);
        }
        lock(&self.parents).insert(ino, new_parent);
        let attr = Self::attr(&child);
        drop((child, dir, _namespace));
        self.after_change();
        Ok(attr)
    }

    /// True if `ancestor` is `ino` or one of the directories above it.
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        let parents = lock(&self.parents);
        for _ in 0..4096 {
            if ino == ancestor {
                return true;
            }
            match parents.get(&ino) {
                Some(&up) if up != ino => ino = up,
                _ => return false,
            }
        }
        false
    }

    /// Renames `parent/name` to `new_parent/new_name`.
    pub fn rename(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        self.rename_staged(caller, parent, name, new_parent, new_name, mode)?;
        self.after_change();
        Ok(())
    }

    fn rename_staged(
        &self,
        caller: &Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> FsResult<()> {
        dir::check_name(name)?;
        dir::check_name(new_name)?;
        self.check_writable()?;
        let _namespace = lock(&self.namespace);
        let same_dir = parent == new_parent;
        let old_ref = self.node(parent)?;
        let new_ref = if same_dir {
            old_ref.clone()
        } else {
            self.node(new_parent)?
        };
        let mut old_dir = lock(&old_ref);
        let mut new_guard = if same_dir { None } else { Some(lock(&new_ref)) };
        let source = {
            let entries = old_dir.dir.as_ref().ok_or(FsError::NotDir)?;
            authorizer::check(caller, &old_dir.secrets, AccessMask::WRITE_EXECUTE)?;
            entries.get(name).ok_or(FsError::NotFound)?
        };
        let target = {
            let new_dir: &NodeState = new_guard.as_deref().unwrap_or(&old_dir);
            let entries = new_dir.dir.as_ref().ok_or(FsError::NotDir)?;
            authorizer::check(caller, &new_dir.secrets, AccessMask::WRITE_EXECUTE)?;
            entries.get(new_name)
        };
        if source.kind == FileKind::Directory
            && !same_dir
            && self.is_ancestor(source.inode, new_parent)
        {
            return Err(FsError::Invalid(
                "cannot move a directory into itself".into(),
            ));
        }
        let source_ref = self.child(&old_dir, source.inode)?;
        // Settled, like the target below: their parents change.
        let mut source_node = lock_settled(&source_ref);
        authorizer::check_sticky(caller, &old_dir.secrets, &source_node.secrets)?;
        if let Some(target) = target
            && target.inode == source.inode
        {
            // POSIX: renaming a link onto another link of the same file does nothing.
            return if mode == RenameMode::NoReplace {
                Err(FsError::Exists)
            } else {
                Ok(())
            };
        }
        match (mode, target) {
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Exchange, None) => return Err(FsError::NotFound),
            _ => {}
        }
        let target_ref = match target {
            Some(target) => {
                let new_dir: &NodeState = new_guard.as_deref().unwrap_or(&old_dir);
                Some(self.child(new_dir, target.inode)?)
            }
            None => None,
        };
        let mut target_node = target_ref.as_ref().map(|node| lock_settled(node));
        if let Some(target_node) = target_node.as_deref() {
            let new_dir: &NodeState = new_guard.as_deref().unwrap_or(&old_dir);
            authorizer::check_sticky(caller, &new_dir.secrets, &target_node.secrets)?;
            if mode == RenameMode::Replace {
                match (source_node.is_dir(), target_node.is_dir()) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true)
                        if target_node
                            .dir
                            .as_ref()
                            .is_some_and(|entries| !entries.is_empty()) =>
                    {
                        return Err(FsError::NotEmpty);
                    }
                    _ => {}
                }
            }
        }

        // Remember everything the rename changes, to restore it if the batch fails.
        let saved_old = (old_dir.secrets.clone(), old_dir.dir.clone());
        let saved_new = new_guard
            .as_deref()
            .map(|dir| (dir.secrets.clone(), dir.dir.clone()));
        let saved_source = (source_node.secrets.clone(), source_node.body.clone());
        let saved_target = target_node
            .as_deref()
            .map(|node| (node.secrets.clone(), node.body.clone()));

        let result = (|| -> FsResult<Option<Option<Tombstone>>> {
            let time = now();
            let mut tombstone = None;
            match mode {
                RenameMode::Exchange => {
                    let target = target.ok_or(FsError::NotFound)?;
                    let target_node = target_node.as_deref_mut().ok_or(FsError::NotFound)?;
                    if let Some(entries) = old_dir.dir.as_mut() {
                        entries.replace(name, target);
                    }
                    let new_dir: &mut NodeState = match new_guard.as_deref_mut() {
                        Some(dir) => dir,
                        None => &mut old_dir,
                    };
                    if let Some(entries) = new_dir.dir.as_mut() {
                        entries.replace(new_name, source);
                    }
                    if let Some(new_dir) = new_guard.as_deref_mut() {
                        self.move_between(&mut old_dir, new_dir, &mut source_node)?;
                        self.move_between(new_dir, &mut old_dir, target_node)?;
                    }
                    target_node.secrets.ctime = time;
                    target_node.meta_dirty = true;
                }
                _ => {
                    if let (Some(_), Some(target_node)) = (target, target_node.as_deref_mut()) {
                        let new_dir: &mut NodeState = match new_guard.as_deref_mut() {
                            Some(dir) => dir,
                            None => &mut old_dir,
                        };
                        if let Some(entries) = new_dir.dir.as_mut() {
                            entries.remove(new_name);
                        }
                        tombstone = self.unlink_from(new_dir, target_node)?;
                    }
                    if let Some(entries) = old_dir.dir.as_mut() {
                        entries.remove(name);
                    }
                    {
                        let new_dir: &mut NodeState = match new_guard.as_deref_mut() {
                            Some(dir) => dir,
                            None => &mut old_dir,
                        };
                        if let Some(entries) = new_dir.dir.as_mut() {
                            entries.insert(new_name, source);
                        }
                    }
                    if let Some(new_dir) = new_guard.as_deref_mut() {
                        self.move_between(&mut old_dir, new_dir, &mut source_node)?;
                    }
                }
            }
            source_node.secrets.ctime = time;
            source_node.meta_dirty = true;
            for dir in [Some(&mut *old_dir), new_guard.as_deref_mut()]
                .into_iter()
                .flatten()
            {
                dir.secrets.mtime = time;
                dir.secrets.ctime = time;
                dir.meta_dirty = true;
            }
            Ok(tombstone)
        })();

        let outcome = result.and_then(|tombstone| {
            let removed = tombstone
                .as_ref()
                .and_then(|_| target.map(|target| target.inode));
            let mut nodes: Vec<&mut NodeState> = vec![&mut old_dir, &mut source_node];
            if let Some(dir) = new_guard.as_deref_mut() {
                nodes.push(dir);
            }
            if removed.is_none()
                && let Some(target) = target_node.as_deref_mut()
            {
                nodes.push(target);
            }
            let removes = tombstone.flatten().into_iter().collect();
            self.commit_together(&mut nodes, removes).map(|()| removed)
        });
        match outcome {
            Ok(removed) => {
                let mut parents = lock(&self.parents);
                parents.insert(source.inode, new_parent);
                if mode == RenameMode::Exchange
                    && let Some(target) = target
                {
                    parents.insert(target.inode, parent);
                }
                if let Some(inode) = removed {
                    parents.remove(&inode);
                    drop(parents);
                    drop(target_node);
                    lock(&self.nodes).remove(&inode);
                }
                Ok(())
            }
            Err(error) => {
                old_dir.secrets = saved_old.0;
                old_dir.dir = saved_old.1;
                if let (Some(dir), Some(saved)) = (new_guard.as_deref_mut(), saved_new) {
                    dir.secrets = saved.0;
                    dir.dir = saved.1;
                }
                source_node.secrets = saved_source.0;
                source_node.body = saved_source.1;
                if let (Some(node), Some(saved)) = (target_node.as_deref_mut(), saved_target) {
                    node.secrets = saved.0;
                    node.body = saved.1;
                }
                Err(error)
            }
        }
    }

    /// Moves `child` from `old_dir` to `new_dir` (different directories): its
    /// parent entry, and the directories' link counts for a subdirectory's `..`.
    fn move_between(
        &self,
        old_dir: &mut NodeState,
        new_dir: &mut NodeState,
        child: &mut NodeState,
    ) -> FsResult<()> {
        let salt = child.body.salt;
        let old_ids = FileIds {
            generation: self.ctx.generation(),
            inode: old_dir.ino,
        };
        let still_in_old = old_dir.dir.as_ref().is_some_and(|entries| {
            entries
                .entries_from(0)
                .any(|(_, _, entry)| entry.inode == child.ino)
        });
        if !still_in_old {
            child.body.parents.remove(&salt, old_ids);
        }
        self.adopt(new_dir, child)?;
        if child.is_dir() {
            old_dir.secrets.nlink = old_dir.secrets.nlink.saturating_sub(1);
            new_dir.secrets.nlink += 1;
        }
        Ok(())
    }

    // ----- file handles -----

    fn add_handle(&self, node: NodeRef, flags: i32) -> u64 {
        let access = flags & libc::O_ACCMODE;
        let handle = Handle {
            node: node.clone(),
            write: access == libc::O_WRONLY || access == libc::O_RDWR,
            append: flags & libc::O_APPEND != 0,
        };
        lock(&node).handles += 1;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, handle);
        fh
    }

    /// Reloads the cached nodes that other members of the cluster changed
    /// (announced by the sector service as their writes apply). A node locked
    /// now (perhaps by this very thread) is tried again next time: this never
    /// waits for a node's lock, so it may be called anywhere.
    fn catch_up_foreign(&self) {
        let Some(announced) = &self.foreign else {
            return;
        };
        if announced.is_empty() && !self.foreign_waiting.load(Ordering::SeqCst) {
            return;
        }
        let mut pending = lock(&self.foreign_pending);
        // Raised before draining and lowered only once the reloads are done,
        // so a caller that finds the channel empty meanwhile waits for them
        // (on the lock) instead of using a node about to be reloaded.
        self.foreign_waiting.store(true, Ordering::SeqCst);
        pending.extend(announced.try_iter());
        if pending.is_empty() {
            self.foreign_waiting.store(false, Ordering::SeqCst);
            return;
        }
        let targets: Vec<(u64, NodeRef)> = {
            let nodes = lock(&self.nodes);
            if pending.remove(&ALL_FILES_CHANGED) {
                nodes
                    .iter()
                    .map(|(ino, node)| (*ino, node.clone()))
                    .collect()
            } else {
                pending
                    .iter()
                    .filter_map(|ino| nodes.get(ino).map(|node| (*ino, node.clone())))
                    .collect()
            }
        };
        pending.clear();
        for (ino, node) in targets {
            let mut state = match node.try_lock() {
                Ok(state) => state,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    pending.insert(ino);
                    continue;
                }
            };
            if let Err(error) = state.reload(&self.ctx) {
                // Not served from the cache again: the next use loads it anew
                // (and reports what is wrong).
                tracing::warn!(ino, "cannot reload a file another member changed: {error}");
                drop(state);
                lock(&self.nodes).remove(&ino);
            }
        }
        self.foreign_waiting
            .store(!pending.is_empty(), Ordering::SeqCst);
    }

    fn handle(&self, fh: u64) -> FsResult<(NodeRef, bool, bool)> {
        self.catch_up_foreign();
        let handles = lock(&self.handles);
        let handle = handles.get(&fh).ok_or(FsError::BadHandle)?;
        Ok((handle.node.clone(), handle.write, handle.append))
    }

    /// Opens `ino` with `open(2)` flags; `O_TRUNC` truncates.
    pub fn open(&self, caller: &Caller, ino: u64, flags: i32) -> FsResult<u64> {
        let node_ref = self.node(ino)?;
        {
            let mut node = lock(&node_ref);
            let access = flags & libc::O_ACCMODE;
            let wanted = AccessMask {
                read: access == libc::O_RDONLY || access == libc::O_RDWR,
                write: access == libc::O_WRONLY
                    || access == libc::O_RDWR
                    || flags & libc::O_TRUNC != 0,
                execute: false,
            };
            if wanted.write {
                self.check_writable()?;
                if node.is_dir() {
                    return Err(FsError::IsDir);
                }
            }
            authorizer::check(caller, &node.secrets, wanted)?;
            if flags & libc::O_TRUNC != 0 && node.secrets.size != 0 {
                node.truncate(&self.ctx, 0)?;
            }
        }
        Ok(self.add_handle(node_ref, flags))
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (node_ref, _, _) = self.handle(fh)?;
        // The records are fetched and verified without the node's lock, so reads
        // of one file (NBD queues, FUSE readahead) proceed in parallel.
        let mut backoff = FOREIGN_READ_BACKOFF;
        let mut deadline = None;
        loop {
            let plan = lock(&node_ref).plan_read(&self.ctx, offset, u64::from(size))?;
            let fetched = match plan.sectors.fetch_unlogged(&self.ctx) {
                Err(FsError::Access(_)) if self.ancestors_created(&node_ref) => {
                    // The store cannot check the readcap chain through directories
                    // it has not seen yet: commit them, then read.
                    self.commit_pending()?;
                    plan.sectors.fetch_unlogged(&self.ctx)
                }
                other => other,
            };
            match fetched {
                Ok(fetched) => return Ok(lock(&node_ref).finish_read(plan, fetched)),
                // A write since the plan committed while the records were
                // fetched without the lock: a record the plan's leaf vouched
                // for was replaced. Read again holding the lock, which no
                // commit gets past, so a genuine failure is still EIO and a
                // writer cannot starve the read.
                Err(FsError::Io(_)) if lock(&node_ref).changed_since(&plan.sectors) => {
                    return lock(&node_ref).read(&self.ctx, offset, u64::from(size));
                }
                // In a cluster, a linearizable read may return records another
                // member wrote after this node's tree was planned against (the
                // read waits for the leader's commit index; the announcement
                // of the change lands just after): reload and plan again,
                // briefly, before calling it tampering.
                Err(FsError::Io(_))
                    if self.foreign.is_some()
                        && Instant::now()
                            < *deadline
                                .get_or_insert_with(|| Instant::now() + FOREIGN_READ_PATIENCE) =>
                {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(FOREIGN_READ_PATIENCE / 10);
                    self.catch_up_foreign();
                }
                Err(error) => return Err(error.logged()),
            }
        }
    }

    /// Reads several ranges of the file open as `fh`, fetching what they need
    /// from the store in one request: queued NBD reads then share one trip to
    /// the sector engine instead of each waiting for its own. Each result is
    /// what [`read`](Self::read) of that range returns; a range whose shared
    /// fetch or check fails is read again on its own, so errors and retries are
    /// exactly `read`'s.
    pub fn read_many(&self, fh: u64, ranges: &[(u64, u32)]) -> Vec<FsResult<Vec<u8>>> {
        let read_each = |ranges: &[(u64, u32)]| -> Vec<FsResult<Vec<u8>>> {
            ranges
                .iter()
                .map(|&(offset, size)| self.read(fh, offset, size))
                .collect()
        };
        if ranges.len() < 2 {
            return read_each(ranges);
        }
        let Ok((node_ref, _, _)) = self.handle(fh) else {
            return read_each(ranges);
        };
        let planned: FsResult<Vec<ReadPlan>> = {
            let mut node = lock(&node_ref);
            ranges
                .iter()
                .map(|&(offset, size)| node.plan_read(&self.ctx, offset, u64::from(size)))
                .collect()
        };
        let Ok(plans) = planned else {
            return read_each(ranges);
        };
        let fetches: Vec<&SectorFetch> = plans.iter().map(|plan| &plan.sectors).collect();
        let Ok(fetched) = SectorFetch::fetch_many(&fetches, &self.ctx) else {
            return read_each(ranges);
        };
        let assembled: Vec<Option<Vec<u8>>> = {
            let mut node = lock(&node_ref);
            plans
                .into_iter()
                .zip(fetched)
                .map(|(plan, fetched)| fetched.ok().map(|sectors| node.finish_read(plan, sectors)))
                .collect()
        };
        assembled
            .into_iter()
            .zip(ranges)
            .map(|(data, &(offset, size))| match data {
                Some(data) => Ok(data),
                None => self.read(fh, offset, size),
            })
            .collect()
    }

    /// True if a directory on `node`'s readcap chain was created since the last
    /// commit of the staged changes.
    fn ancestors_created(&self, node: &NodeRef) -> bool {
        let chain = lock(node).chain.clone();
        let pending = lock(&self.pending);
        chain
            .split_last()
            .is_some_and(|(_, above)| above.iter().any(|ino| pending.created.contains(ino)))
    }

    /// Commits `node`'s buffered writes; first the staged namespace changes when
    /// its directories are new, so the store can later check its readcap chain.
    fn commit_file(&self, node_ref: &NodeRef) -> FsResult<()> {
        self.commit_file_over(node_ref, 0)
    }

    /// [`commit_file`](Self::commit_file), if `node` still buffers at least
    /// `min_dirty` bytes once no commit of it is in flight. Writers that found
    /// the buffers full while a commit was in flight all wait for it; the first
    /// commits what they buffered together, and the others then have nothing
    /// to do, instead of committing a few sectors each, one after another.
    fn commit_file_over(&self, node_ref: &NodeRef, min_dirty: usize) -> FsResult<()> {
        {
            let node = lock(node_ref);
            if !node.stored && node.dirty_bytes() <= SMALL_NEW_FILE {
                // A small new file goes to the store with its directory entry, in
                // the next commit of the staged changes; one removed before then
                // never reaches the store.
                let (ino, bytes) = (node.ino, node.dirty_bytes());
                drop(node);
                self.stage_inos(&[ino], Vec::new());
                lock(&self.pending).bytes += bytes;
                self.after_change();
                return Ok(());
            }
        }
        if self.ancestors_created(node_ref) {
            self.commit_pending()?;
        }
        // A commit of everything (a flush) covers the commits in flight too;
        // one over a dirty limit only needs a free slot.
        let mut node = if min_dirty == 0 {
            lock_settled(node_ref)
        } else {
            lock_for_commit(node_ref)
        };
        if node.dirty_bytes() < min_dirty {
            return Ok(());
        }
        if node.is_dir() {
            drop(node);
            return self.commit(&mut lock_settled(node_ref));
        }
        let Some(write) = node.prepare_commit(&self.ctx)? else {
            return Ok(());
        };
        // The store takes the batch without the node's lock: writes to the
        // file buffer meanwhile, so the file's writers do not stall for the
        // length of a Raft write. Once the store has queued it, the next
        // batch may be prepared and sent while this one is replicated.
        let seq = node.begin_commit();
        let meta = write.meta.clone();
        // Raised without the node's lock: the store calls this while the
        // batch is counted as proposed, and a reader holding the node's lock
        // may be waiting in the store for that count to come down.
        let flag = node.queued_flag(seq);
        let done = node.commit_done();
        drop(node);
        let mut queued = || {
            if let Some(flag) = &flag {
                flag.store(true, std::sync::atomic::Ordering::Release);
            }
            if let Ok(_node) = node_ref.try_lock() {
                done.notify_all();
            }
        };
        let batch = SectorBatch {
            files: vec![write],
            removes: Vec::new(),
        };
        // Whatever happens in the store, the node must leave the in-flight
        // state, or every later commit of the file would wait forever.
        let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Ok(self.ctx.service.write_queued(batch, &mut queued)?)
        }))
        .unwrap_or_else(|_| Err(FsError::Io("the store panicked taking a batch".into())));
        let node = lock(node_ref);
        // Commits end in the order they began, so each knows the ones before.
        let done = node.commit_done();
        let mut node = done
            .wait_while(node, |node| !node.is_next_to_end(seq))
            .unwrap_or_else(PoisonError::into_inner);
        node.commit_queued(seq);
        node.end_commit(&self.ctx, meta, stored)
    }

    /// Locks `node_ref` once its buffers are under the dirty limit: a writer
    /// that finds them full waits for the commit in flight, or commits them
    /// itself, before it buffers more. Writers no longer stall while a batch
    /// is sealed, so without this a file's buffers grew by every write queued
    /// behind the commit (an NBD client's whole queue). One commit attempt
    /// is enough: a small new file's buffers wait for the staged commit
    /// instead (`commit_file_over`) and stay as full as they were, and the
    /// writer would spin until that commit came due (up to `PENDING_AGE`).
    fn lock_with_room<'n>(&self, node_ref: &'n NodeRef) -> FsResult<MutexGuard<'n, NodeState>> {
        let mut committed = false;
        loop {
            let node = lock(node_ref);
            if node.dirty_bytes() < self.config.dirty_limit {
                return Ok(node);
            }
            if !node.can_begin_commit() {
                drop(wait_to_begin(node));
                continue;
            }
            if committed {
                return Ok(node);
            }
            drop(node);
            self.commit_file_over(node_ref, self.config.dirty_limit)?;
            committed = true;
        }
    }

    /// Writes `data` at `offset` (at the end for `O_APPEND`); returns the count.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (node, write, append) = self.handle(fh)?;
        if !write {
            return Err(FsError::BadHandle);
        }
        let node_ref = node;
        // The sectors the write covers whole are sealed here, before the lock:
        // the file's other writers and its commit in flight go on meanwhile. An
        // append's offset is known only under the lock.
        let presealed = if append {
            Presealed::default()
        } else {
            self.preseal(&node_ref, &[(offset, data)]).remove(0)
        };
        let node = self.lock_with_room(&node_ref)?;
        let offset = if append { node.secrets.size } else { offset };
        let (mut node, written) = self.buffer_write(&node_ref, node, offset, data, presealed);
        written?;
        clear_set_ids(&mut node);
        if node.dirty_bytes() >= self.config.dirty_limit {
            drop(node);
            self.commit_file_over(&node_ref, self.config.dirty_limit)?;
        }
        write_count(data)
    }

    /// Several writes to one file (not opened `O_APPEND`), in order, under
    /// one lock of it where they fit below the dirty limit: NBD's gathered
    /// writes. One result per write; a failed commit is reported by the write
    /// that filled the buffers, as [`FileSystem::write`] does.
    pub fn write_many(&self, fh: u64, writes: &[(u64, &[u8])]) -> Vec<FsResult<u32>> {
        let write_each = |writes: &[(u64, &[u8])]| -> Vec<FsResult<u32>> {
            writes
                .iter()
                .map(|&(offset, data)| self.write(fh, offset, data))
                .collect()
        };
        let Ok((node_ref, true, false)) = self.handle(fh) else {
            return write_each(writes);
        };
        if writes.len() < 2 {
            return write_each(writes);
        }
        let presealed = self.preseal(&node_ref, writes);
        let Ok(mut node) = self.lock_with_room(&node_ref) else {
            return write_each(writes);
        };
        let mut results: Vec<FsResult<u32>> = Vec::with_capacity(writes.len());
        for (&(offset, data), presealed) in writes.iter().zip(presealed) {
            if node.dirty_bytes() >= self.config.dirty_limit {
                drop(node);
                if let Err(error) = self.commit_file_over(&node_ref, self.config.dirty_limit)
                    && let Some(last) = results.last_mut()
                {
                    *last = Err(error);
                }
                match self.lock_with_room(&node_ref) {
                    Ok(locked) => node = locked,
                    Err(error) => {
                        // Not buffered: its commit failed to make room.
                        results.push(Err(error));
                        node = lock(&node_ref);
                        continue;
                    }
                }
            }
            let (locked, written) = self.buffer_write(&node_ref, node, offset, data, presealed);
            node = locked;
            results.push(written.and_then(|()| write_count(data)));
        }
        clear_set_ids(&mut node);
        if node.dirty_bytes() >= self.config.dirty_limit {
            drop(node);
            if let Err(error) = self.commit_file_over(&node_ref, self.config.dirty_limit)
                && let Some(last) = results.last_mut()
            {
                *last = Err(error);
            }
        }
        results
    }

    /// Seals the sectors each write covers whole, before the file's lock.
    fn preseal(&self, node_ref: &NodeRef, writes: &[(u64, &[u8])]) -> Vec<Presealed> {
        if writes
            .iter()
            .all(|(_, data)| data.len() < MIN_PRESEAL_BYTES)
        {
            return writes.iter().map(|_| Presealed::default()).collect();
        }
        let context = lock(node_ref).seal_context(&self.ctx);
        writes
            .iter()
            .map(|&(offset, data)| {
                if data.len() < MIN_PRESEAL_BYTES {
                    Presealed::default()
                } else {
                    context.preseal(offset, data)
                }
            })
            .collect()
    }

    /// Buffers one write into `node`, locked with room for it. A partial
    /// sector whose current contents cannot be read through directories the
    /// store has not seen yet has them committed, and the write is retried.
    /// Returns the node locked again, and the write's outcome.
    fn buffer_write<'n>(
        &self,
        node_ref: &'n NodeRef,
        mut node: MutexGuard<'n, NodeState>,
        offset: u64,
        data: &[u8],
        presealed: Presealed,
    ) -> (MutexGuard<'n, NodeState>, FsResult<()>) {
        match node.write_presealed(&self.ctx, offset, data, presealed) {
            Err(FsError::Access(why)) => {
                drop(node);
                if !self.ancestors_created(node_ref) {
                    return (lock(node_ref), Err(FsError::Access(why)));
                }
                let committed = self.commit_pending();
                let mut node = lock(node_ref);
                let written = committed.and_then(|()| node.write(&self.ctx, offset, data));
                (node, written)
            }
            written => (node, written),
        }
    }

    /// Commits the buffered writes of the file (`close(2)`).
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let (node, _, _) = self.handle(fh)?;
        self.commit_file(&node)
    }

    /// Commits and makes durable everything written to the file.
    pub fn fsync(&self, fh: u64, _datasync: bool) -> FsResult<()> {
        // The file's name and attributes too, not only its data.
        self.commit_pending()?;
        self.flush(fh)?;
        Ok(self.ctx.service.flush()?)
    }

    /// Closes a handle: commits, and deletes the file if it was its last link.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        let mut node = lock(&handle.node);
        if node.secrets.nlink == 0 && node.handles <= 1 {
            // Settled first: a file deleted here must not have a commit of its
            // data still on its way to the store behind the tombstone, and
            // whether it needs one depends on that commit.
            node = settle(node);
        }
        node.handles = node.handles.saturating_sub(1);
        if node.handles == 0 {
            node.drop_cached_sectors();
        }
        if node.secrets.nlink == 0 && node.handles == 0 {
            let ino = node.ino;
            let tombstone = if node.stored {
                vec![node.tombstone(&self.ctx)?]
            } else {
                Vec::new()
            };
            drop(node);
            self.unstage(ino);
            lock(&self.nodes).remove(&ino);
            self.stage_inos(&[], tombstone);
            self.after_change();
            return Ok(());
        }
        let dirty = node.is_dirty();
        drop(node);
        if dirty {
            self.commit_file(&handle.node)?;
        }
        Ok(())
    }

    /// Checks that `caller` may list directory `ino`.
    pub fn opendir(&self, caller: &Caller, ino: u64) -> FsResult<()> {
        let node = self.node(ino)?;
        let node = lock(&node);
        if node.dir.is_none() {
            return Err(FsError::NotDir);
        }
        authorizer::check(caller, &node.secrets, AccessMask::READ)
    }

    /// The entries of directory `ino` after `offset` (0 to start), "." and ".."
    /// first. Offsets stay valid while entries are added and removed.
    pub fn readdir(&self, caller: &Caller, ino: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let node_ref = self.node(ino)?;
        let node = lock(&node_ref);
        let entries = node.dir.as_ref().ok_or(FsError::NotDir)?;
        authorizer::check(caller, &node.secrets, AccessMask::READ)?;
        let mut out = Vec::new();
        if offset == 0 {
            out.push(DirEntry {
                ino,
                next_offset: 1,
                kind: FileKind::Directory,
                name: b".".to_vec(),
            });
        }
        if offset <= 1 {
            let up = if ino == Self::ROOT {
                ino
            } else {
                lock(&self.parents).get(&ino).copied().unwrap_or(Self::ROOT)
            };
            out.push(DirEntry {
                ino: up,
                next_offset: 2,
                kind: FileKind::Directory,
                name: b"..".to_vec(),
            });
        }
        let mut parents = lock(&self.parents);
        for (cookie, name, entry) in entries.entries_from(offset.saturating_sub(2)) {
            parents.entry(entry.inode).or_insert(ino);
            out.push(DirEntry {
                ino: entry.inode,
                next_offset: cookie + 3,
                kind: entry.kind,
                name: name.to_vec(),
            });
        }
        Ok(out)
    }

    /// Makes the directory's committed entries durable.
    pub fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        self.node(ino)?;
        self.commit_pending()?;
        Ok(self.ctx.service.flush()?)
    }

    /// `fallocate(2)`: modes 0 and `FALLOC_FL_KEEP_SIZE` reserve (nothing to reserve
    /// in a log-structured store, but the size grows), `PUNCH_HOLE` and
    /// `ZERO_RANGE` make a range read as zeros.
    pub fn fallocate(
        &self,
        caller: &Caller,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> FsResult<()> {
        self.check_writable()?;
        let node_ref = self.node(ino)?;
        let mut node = lock(&node_ref);
        if node.is_dir() {
            return Err(FsError::IsDir);
        }
        authorizer::check(caller, &node.secrets, AccessMask::WRITE)?;
        let end = offset.checked_add(length).ok_or(FsError::TooLarge)?;
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(FsError::Unsupported("this fallocate mode"));
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if !keep_size {
                return Err(FsError::Invalid("PUNCH_HOLE needs KEEP_SIZE".into()));
            }
            node.punch(&self.ctx, offset, length)?;
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            node.punch(&self.ctx, offset, length)?;
            if !keep_size && end > node.secrets.size {
                node.truncate(&self.ctx, end)?;
            }
        } else if !keep_size && end > node.secrets.size {
            node.truncate(&self.ctx, end)?;
        }
        Ok(())
    }

    /// The allocation of `ino` over `offset..offset + length` (clipped to the
    /// file): runs of `(length, is_hole)` in sector granularity, for NBD
    /// `BLOCK_STATUS` and `SEEK_HOLE`. Holes read as zeros.
    pub fn allocation(&self, ino: u64, offset: u64, length: u64) -> FsResult<Vec<(u64, bool)>> {
        let node_ref = self.node(ino)?;
        let mut node = lock(&node_ref);
        let size = node.secrets.size;
        let end = offset.saturating_add(length).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let sector = node.sector_size();
        let first = offset / sector;
        let last = (end - 1) / sector;
        let holes = node.holes_from(&self.ctx, first, last - first + 1)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        for (index, hole) in (first..=last).zip(holes) {
            let start = (index * sector).max(offset);
            let stop = ((index + 1) * sector).min(end);
            match runs.last_mut() {
                Some((len, last_hole)) if *last_hole == hole => *len += stop - start,
                _ => runs.push((stop - start, hole)),
            }
        }
        Ok(runs)
    }

    // ----- extended attributes -----

    fn check_xattr_name(
        caller: &Caller,
        node: &NodeState,
        name: &[u8],
        write: bool,
    ) -> FsResult<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Invalid("xattr name length".into()));
        }
        if name.starts_with(b"user.") {
            let kind = node.secrets.mode & libc::S_IFMT;
            if write && kind != libc::S_IFREG && kind != libc::S_IFDIR {
                return Err(FsError::NotPermitted("user xattrs on special files".into()));
            }
            let wanted = if write {
                AccessMask::WRITE
            } else {
                AccessMask::READ
            };
            authorizer::check(caller, &node.secrets, wanted)
        } else if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            if write && caller.uid != 0 {
                return Err(FsError::NotPermitted(
                    "trusted and security xattrs need root".into(),
                ));
            }
            Ok(())
        } else {
            Err(FsError::Unsupported("xattr namespace"))
        }
    }

    /// Sets an extended attribute (kept in the encrypted part of the metadata).
    pub fn setxattr(
        &self,
        caller: &Caller,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> FsResult<()> {
        self.check_writable()?;
        if value.len() > 64 * 1024 {
            return Err(FsError::Invalid("xattr value larger than 64 KiB".into()));
        }
        let node_ref = self.node(ino)?;
        let mut node = lock_settled(&node_ref);
        Self::check_xattr_name(caller, &node, name, true)?;
        if name == ENCRYPT_XATTR && value != b"on" && value != b"off" {
            return Err(FsError::Invalid(format!(
                "{} must be \"on\" or \"off\"",
                String::from_utf8_lossy(ENCRYPT_XATTR)
            )));
        }
        let key = serde_bytes::ByteBuf::from(name.to_vec());
        let exists = node.secrets.xattrs.contains_key(&key);
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(FsError::Exists);
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(FsError::NoAttribute);
        }
        let previous = node
            .secrets
            .xattrs
            .insert(key.clone(), serde_bytes::ByteBuf::from(value.to_vec()));
        node.touch_ctime();
        if let Err(error) = self.commit(&mut node) {
            match previous {
                Some(previous) => node.secrets.xattrs.insert(key, previous),
                None => node.secrets.xattrs.remove(&key),
            };
            return Err(error);
        }
        Ok(())
    }

    /// The value of an extended attribute.
    pub fn getxattr(&self, caller: &Caller, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        let node_ref = self.node(ino)?;
        let node = lock(&node_ref);
        Self::check_xattr_name(caller, &node, name, false)?;
        node.secrets
            .xattrs
            .get(&xattr_key(name))
            .map(|value| value.to_vec())
            .ok_or(FsError::NoAttribute)
    }

    /// The names of the extended attributes.
    pub fn listxattr(&self, _caller: &Caller, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        let node_ref = self.node(ino)?;
        let node = lock(&node_ref);
        Ok(node
            .secrets
            .xattrs
            .keys()
            .map(|name| name.to_vec())
            .collect())
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, caller: &Caller, ino: u64, name: &[u8]) -> FsResult<()> {
        self.check_writable()?;
        let node_ref = self.node(ino)?;
        let mut node = lock_settled(&node_ref);
        Self::check_xattr_name(caller, &node, name, true)?;
        let previous = node
            .secrets
            .xattrs
            .remove(&xattr_key(name))
            .ok_or(FsError::NoAttribute)?;
        node.touch_ctime();
        if let Err(error) = self.commit(&mut node) {
            node.secrets
                .xattrs
                .insert(serde_bytes::ByteBuf::from(name.to_vec()), previous);
            return Err(error);
        }
        Ok(())
    }

    // ----- the whole file system -----

    /// Space and inode figures.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let (free, total) = self.ctx.service.space()?;
        let block = u64::from(crate::attr::BLOCK_SIZE);
        Ok(StatFs {
            blocks: total / block,
            blocks_free: free / block,
            blocks_available: free / block,
            files: u64::from(u32::MAX),
            files_free: u64::from(u32::MAX) / 2,
            block_size: crate::attr::BLOCK_SIZE,
            name_max: NAME_MAX as u32,
        })
    }

    /// One message per committed sector write of `ino`.
    pub fn subscribe(&self, ino: u64) -> Receiver<SectorId> {
        self.ctx.service.subscribe(ino)
    }

    /// Commits every buffered change and makes everything durable (unmount).
    pub fn sync_all(&self) -> FsResult<()> {
        let mut first_error = self.commit_pending().err();
        let nodes: Vec<NodeRef> = lock(&self.nodes).values().cloned().collect();
        for node in nodes {
            let mut node = lock_settled(&node);
            if node.is_dirty()
                && node.secrets.nlink > 0
                && let Err(error) = self.commit(&mut node)
            {
                tracing::error!(inode = node.ino, "commit at sync failed: {error}");
                first_error.get_or_insert(error);
            }
        }
        self.ctx.service.flush()?;
        first_error.map_or(Ok(()), Err)
    }

    /// The inode at `path` ("/a/b", relative to the volume's root).
    pub fn resolve(&self, caller: &Caller, path: &str) -> FsResult<u64> {
        let mut ino = Self::ROOT;
        for component in path.split('/').filter(|part| !part.is_empty()) {
            ino = self.lookup(caller, ino, component.as_bytes())?.ino;
        }
        Ok(ino)
    }

    /// Grants `reader` a readcap on encrypted file or directory `ino` (a directory's
    /// readcap opens its whole subtree through the parent tables).
    pub fn grant_readcap(
        &self,
        caller: &Caller,
        ino: u64,
        reader: &EncryptionPublicKey,
    ) -> FsResult<()> {
        self.check_writable()?;
        let node_ref = self.node(ino)?;
        let mut node = lock_settled(&node_ref);
        authorizer::check_owner(caller, &node.secrets, "grant readcaps")?;
        let keys = node.keys.as_ref().ok_or(FsError::Invalid(
            "the file is not encrypted: anyone may read it".into(),
        ))?;
        let file_key = SymmetricKey::from_slice(keys.file_key.as_bytes())
            .ok_or_else(|| FsError::Io("file key".into()))?;
        let (ids, salt, algorithm) = (node.body.ids, node.body.salt, node.body.hash_algorithm);
        let saved = node.body.readcaps.clone();
        node.body
            .readcaps
            .grant(algorithm, &salt, ids, reader, &file_key)?;
        node.touch_ctime();
        if let Err(error) = self.commit(&mut node) {
            node.body.readcaps = saved;
            return Err(error);
        }
        drop(node);
        self.commit_pending()?;
        Ok(self.ctx.service.flush()?)
    }

    /// Commits staged namespace changes from a background thread while `fs`
    /// lives: every [`PENDING_AGE`], so an idle mount does not hold changes
    /// longer, and as soon as an operation made them due
    /// ([`FileSystem::after_change`]), so that operations do not wait for
    /// commits. Without it, the operation that makes changes due commits them.
    pub fn start_flusher(fs: &Arc<FileSystem>) {
        let weak = Arc::downgrade(fs);
        let signal = Arc::clone(&fs.flusher);
        signal.running.store(true, Ordering::Release);
        let thread_signal = Arc::clone(&signal);
        let spawned = std::thread::Builder::new()
            .name("btfs-flusher".into())
            .spawn(move || {
                loop {
                    thread_signal.wait(PENDING_AGE / 4);
                    let Some(fs) = weak.upgrade() else {
                        return;
                    };
                    // Operations rely on this thread to commit what they
                    // staged: a panic in one round must not end it.
                    let round = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        fs.commit_if_due();
                    }));
                    if round.is_err() {
                        tracing::error!("a commit of the staged changes panicked; will retry");
                    }
                }
            });
        if let Err(error) = spawned {
            signal.running.store(false, Ordering::Release);
            tracing::warn!("no background flusher ({error}): changes commit on the next operation");
        }
    }
}

/// How operations wake the background flusher.
#[derive(Default)]
struct FlusherSignal {
    /// A flusher thread runs.
    running: AtomicBool,
    /// A wake-up not yet taken.
    woken: Mutex<bool>,
    wake: Condvar,
}

impl FlusherSignal {
    /// Wakes the flusher; false if there is none.
    fn wake(&self) -> bool {
        if !self.running.load(Ordering::Acquire) {
            return false;
        }
        *lock(&self.woken) = true;
        self.wake.notify_one();
        true
    }

    /// Waits for a wake-up, or `timeout`.
    fn wait(&self, timeout: Duration) {
        let woken = lock(&self.woken);
        let mut woken = self
            .wake
            .wait_timeout_while(woken, timeout, |woken| !*woken)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        *woken = false;
    }
}

/// A commit of the staged changes between its nodes' `begin_commit` and the
/// store's answer ([`FileSystem::commit_pending`]).
struct NamespaceCommit {
    /// Each node with a part in the batch, its commit's number and its part,
    /// to be signed.
    prepared: Vec<(NodeRef, u64, UnsignedWrite)>,
    tombstones: Vec<Tombstone>,
    /// The staged nodes, staged again if the batch fails.
    restage: BTreeMap<u64, NodeRef>,
    /// The deleted and created inodes the batch covers.
    deleted: std::collections::HashSet<u64>,
    created: std::collections::HashSet<u64>,
    since: Option<Instant>,
}

impl Drop for FileSystem {
    /// A clean shutdown commits what is staged and buffered, as unmount does.
    fn drop(&mut self) {
        if let Err(error) = self.sync_all() {
            tracing::error!("committing at shutdown failed: {error}");
        }
    }
}
