//! A file's open state: the design's *file actor*. It holds the verified metadata,
//! the file's keys, its Merkle tree and the writes not yet committed; it buffers
//! writes to whole sectors, seals them, updates the tree once per batch and signs
//! the metadata once per batch; it verifies every sector it reads against the tree
//! whose root the signed metadata holds.
//!
//! Sectors a write covers whole are sealed and leaf-hashed by the writer before it
//! takes the node's lock ([`SealContext::preseal`]): the CPU-bound part of a batch
//! then runs on every writer's thread while the previous batch is in the store,
//! and a commit only seals what was written in part.
//!
//! Up to [`COMMITS_IN_FLIGHT`] commits of a file are on their way to the store
//! at once, each a layer of sectors over the stored file that reads see until
//! it lands. The next is prepared on the tree the previous one left once the
//! store has fixed the previous one's place among its writes, so the store
//! applies them in order or refuses the later ones.

use crate::attr::now;
use crate::dir::Directory;
use crate::error::{FsError, FsResult};
use blocktree_core::aead::SymmetricKey;
use blocktree_core::credstore::{CredStore, RuntimeSigner};
use blocktree_core::hash::{Digest, HashAlgorithm};
use blocktree_core::merkle::MerkleTree;
use blocktree_core::metadata::{FileMeta, MetaBody, MetaSecrets, VerifiedSignatures};
use blocktree_core::readcap::FileIds;
use blocktree_core::sector::{SectorId, SectorKind, SectorOpener, SectorSealer};
use blocktree_core::time::Timestamp;
use blocktree_core::writecap::RevocationList;
use blocktree_raftlog::pieces::{parallel_map_chunks, parallel_map_owned};
use blocktree_raftlog::{FileWrite, ReadAccess, SectorService};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar};
use std::time::{Duration, Instant};

/// Sectors a file keeps in its cache.
const CACHED_SECTORS: usize = 256;
/// Commits of one file on their way to the store at once: the next batch is
/// sealed, hashed and verified while the previous one is replicated and
/// applied.
pub(crate) const COMMITS_IN_FLIGHT: usize = 2;

/// What every node needs from the file system: the store and the credentials.
pub(crate) struct Ctx {
    pub service: Arc<dyn SectorService>,
    pub creds: Arc<dyn CredStore>,
    pub revoked: RevocationList,
    /// Signatures already verified here: a node loaded again unchanged (the
    /// kernel looked it up after the cache dropped it) costs no signature
    /// check, and new metadata under a known writecap chain costs one, not
    /// one per certificate of the chain.
    pub verified_signatures: VerifiedSignatures,
}

impl Ctx {
    pub fn generation(&self) -> u64 {
        self.service.generation()
    }

    /// Checks metadata read from the store: signature, and a writecap chain rooted
    /// at the generation directory's root. Expiry is judged at the time the
    /// writecap was still valid: a file written under a writecap that has since
    /// expired stays readable (a reader cannot know when it was written), while
    /// new writes need a writecap valid now.
    pub fn verify_read(&self, meta: &FileMeta) -> FsResult<()> {
        let now = Timestamp::now();
        let at = match meta.body().writecap.expires() {
            Some(expires) if expires < now => Timestamp(expires.0.saturating_sub(1)),
            _ => now,
        };
        meta.verify_cached(
            &self.verified_signatures,
            self.service.directory(),
            at,
            &self.revoked,
        )
        .map_err(|error| {
            let inode = meta.body().ids.inode;
            tracing::error!(inode, "metadata refused: {error}");
            FsError::Io(format!(
                "metadata of inode {inode} failed verification: {error}"
            ))
        })
    }
}

/// The keys of an encrypted file.
pub(crate) struct NodeKeys {
    pub file_key: SymmetricKey,
    epoch_keys: BTreeMap<u32, SymmetricKey>,
    /// Shared with writers sealing outside the node's lock; a node's keys never
    /// change while it holds buffered writes (only a clean node is reloaded).
    sealer: Arc<SectorSealer>,
    opener: Arc<SectorOpener>,
}

/// How a node was reached, to open its key without a readcap of its own.
pub(crate) struct ParentInfo {
    pub ino: u64,
    pub key: Option<SymmetricKey>,
    pub chain: Vec<u64>,
}

/// The open state of one file or directory.
pub(crate) struct NodeState {
    pub ino: u64,
    /// The committed metadata body, or for a new file the body to sign first.
    pub body: MetaBody,
    pub secrets: MetaSecrets,
    pub keys: Option<NodeKeys>,
    /// Inodes from a readcap holder to this file, for [`ReadAccess`].
    pub chain: Vec<u64>,
    tree: Option<MerkleTree>,
    /// Sectors written and not yet committed.
    dirty: BTreeMap<u64, DirtySector>,
    dirty_bytes: usize,
    /// Sectors punched to holes and not yet committed.
    holes: BTreeSet<u64>,
    /// A truncate cut the file below this sector since the last commit: stored
    /// sectors from here on are stale and read as zeros, even if the file grows
    /// again before the commit, which turns them into holes.
    cut_from: Option<u64>,
    /// Secrets (size, times, mode, xattrs…) changed and not yet committed.
    pub meta_dirty: bool,
    cache: HashMap<u64, (Instant, Vec<u8>)>,
    /// The entries, for a directory once loaded.
    pub dir: Option<Directory>,
    /// File handles open on this node.
    pub handles: u32,
    /// The store holds a version of this file (it was loaded or committed).
    pub stored: bool,
    /// Bumped by every change of the contents, so a read that fetched sectors
    /// without the lock does not cache what a concurrent write replaced.
    version: u64,
    /// The batches being committed without the node's lock, oldest first (see
    /// [`NodeState::begin_commit`]): new writes buffer meanwhile.
    inflight: VecDeque<InFlight>,
    /// The number of the next commit begun.
    next_commit: u64,
    /// Callers waiting for every commit in flight to end: no commit begins
    /// meanwhile, so a steady stream of writes cannot starve them.
    pub settling: u32,
    /// Signalled when a commit in flight is queued by the store or ends.
    commit_done: Arc<Condvar>,
}

/// A sector written and not yet committed.
struct DirtySector {
    plaintext: Vec<u8>,
    /// Its record and leaf, if the writer sealed exactly this plaintext
    /// already; any later change of the plaintext drops them.
    sealed: Option<(Vec<u8>, Digest)>,
}

impl DirtySector {
    fn unsealed(plaintext: Vec<u8>) -> DirtySector {
        DirtySector {
            plaintext,
            sealed: None,
        }
    }
}

/// What sealing a file's sectors needs, taken under the node's lock so that
/// writers can seal without it ([`SealContext::preseal`]).
pub(crate) struct SealContext {
    ino: u64,
    generation: u64,
    algorithm: HashAlgorithm,
    sector_size: u64,
    sealer: Option<Arc<SectorSealer>>,
}

/// Sectors a writer sealed before taking the node's lock, by index, and the
/// sealer that sealed them (the node takes them only if it still seals so).
#[derive(Default)]
pub(crate) struct Presealed {
    sectors: HashMap<u64, (Vec<u8>, Digest)>,
    sealer: Option<Arc<SectorSealer>>,
    generation: u64,
}

impl SealContext {
    /// Seals and leaf-hashes the sectors that `data`, written at `offset`,
    /// covers whole. A sector that fails to seal is left to the commit, which
    /// reports the failure.
    pub fn preseal(&self, offset: u64, data: &[u8]) -> Presealed {
        let sector = self.sector_size;
        let end = offset.saturating_add(data.len() as u64);
        let first = offset.div_ceil(sector);
        let end_whole = end / sector;
        let mut presealed = Presealed {
            sectors: HashMap::new(),
            sealer: self.sealer.clone(),
            generation: self.generation,
        };
        if first >= end_whole {
            return presealed;
        }
        let sealed: Vec<(u64, Vec<u8>)> = (first..end_whole)
            .filter_map(|index| {
                let from = (index * sector - offset) as usize;
                let plaintext = &data[from..from + sector as usize];
                let record = match &self.sealer {
                    Some(sealer) => {
                        let id = SectorId {
                            generation: self.generation,
                            inode: self.ino,
                            sector: SectorKind::Data(index),
                        };
                        sealer.seal_to_vec(&id, plaintext).ok()?
                    }
                    None => plaintext.to_vec(),
                };
                Some((index, record))
            })
            .collect();
        let records: Vec<&[u8]> = sealed.iter().map(|(_, record)| record.as_slice()).collect();
        let leaves = MerkleTree::leaf_hashes(self.algorithm, &records);
        presealed.sectors = sealed
            .into_iter()
            .zip(leaves)
            .map(|((index, record), leaf)| (index, (record, leaf)))
            .collect();
        presealed
    }
}

/// What a commit in flight takes from the buffers: the sectors it writes and
/// the holes and cut it records. Reads see them until the store has them; a
/// refused commit puts them back under any newer writes.
struct InFlight {
    /// Its number among the file's commits.
    seq: u64,
    /// The store has fixed its place among its writes
    /// ([`NodeState::queued_flag`]). Shared, because the store raises it
    /// without the node's lock: a reader may hold that lock while it waits in
    /// the store for this very batch.
    queued: Arc<AtomicBool>,
    /// The store refused it (or its outcome is unknown), and commits after
    /// it are still on their way: whether it is stored depends on them.
    failed: bool,
    sectors: BTreeMap<u64, Vec<u8>>,
    holes: BTreeSet<u64>,
    cut_from: Option<u64>,
}

fn ids(ctx: &Ctx, ino: u64) -> FileIds {
    FileIds {
        generation: ctx.generation(),
        inode: ino,
    }
}

impl NodeKeys {
    /// Opens the epoch keys under `file_key` and prepares the sealer of the current
    /// epoch.
    pub fn open(body: &MetaBody, file_key: SymmetricKey) -> FsResult<NodeKeys> {
        let state = body
            .keys
            .as_ref()
            .ok_or_else(|| FsError::Io("keys asked of an unencrypted file".into()))?;
        let epoch_keys = state.epoch_keys.open_all(body.ids, &file_key)?;
        let current = epoch_keys
            .get(&state.epoch)
            .ok_or_else(|| FsError::Io(format!("no key for epoch {}", state.epoch)))?;
        let sealer = SectorSealer::new(state.epoch, current, state.seals_in_epoch)?;
        let mut opener = SectorOpener::new();
        for (epoch, key) in &epoch_keys {
            opener.add_epoch(*epoch, key)?;
        }
        Ok(NodeKeys {
            file_key,
            epoch_keys,
            sealer: Arc::new(sealer),
            opener: Arc::new(opener),
        })
    }

    fn epoch_key(&self) -> FsResult<&SymmetricKey> {
        self.epoch_keys
            .get(&self.sealer.epoch())
            .ok_or_else(|| FsError::Io("current epoch key missing".into()))
    }
}

impl NodeState {
    /// A node for metadata just created (not yet stored).
    pub fn fresh(
        ino: u64,
        body: MetaBody,
        secrets: MetaSecrets,
        keys: Option<NodeKeys>,
        chain: Vec<u64>,
    ) -> NodeState {
        let is_dir = secrets.mode & libc::S_IFMT == libc::S_IFDIR;
        let algorithm = body.hash_algorithm;
        NodeState {
            ino,
            body,
            secrets,
            keys,
            chain,
            tree: Some(MerkleTree::new(algorithm)),
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            holes: BTreeSet::new(),
            cut_from: None,
            meta_dirty: true,
            cache: HashMap::new(),
            dir: is_dir.then(Directory::new),
            handles: 0,
            stored: false,
            version: 0,
            inflight: VecDeque::new(),
            next_commit: 0,
            settling: 0,
            commit_done: Arc::new(Condvar::new()),
        }
    }

    /// Loads inode `ino` from the store and opens it with a readcap of ours or
    /// through `parent`.
    pub fn load(ctx: &Ctx, ino: u64, parent: Option<&ParentInfo>) -> FsResult<NodeState> {
        let meta = ctx.service.read_meta(ino)?.ok_or(FsError::NotFound)?;
        ctx.verify_read(&meta)?;
        let body = meta.body();
        if body.ids != ids(ctx, ino) {
            return Err(FsError::Io(format!(
                "metadata stored for inode {ino} names another file"
            )));
        }
        let (keys, chain) = if body.keys.is_some() {
            let own = ctx.creds.encryption_public_key();
            if body.readcaps.allows(&body.salt, &own) {
                let key = body
                    .readcaps
                    .open(&body.salt, body.ids, ctx.creds.as_ref())?;
                (Some(NodeKeys::open(body, key)?), vec![ino])
            } else {
                let parent = parent.ok_or_else(|| {
                    FsError::Access("no readcap reaches this encrypted file".into())
                })?;
                let parent_key = parent.key.as_ref().ok_or_else(|| {
                    FsError::Access("no readcap reaches this encrypted file".into())
                })?;
                let key =
                    body.parents
                        .open(&body.salt, body.ids, ids(ctx, parent.ino), parent_key)?;
                let mut chain = parent.chain.clone();
                chain.push(ino);
                (Some(NodeKeys::open(body, key)?), chain)
            }
        } else {
            let chain = parent.map_or_else(Vec::new, |parent| {
                let mut chain = parent.chain.clone();
                chain.push(ino);
                chain
            });
            (None, chain)
        };
        NodeState::from_meta(ctx, ino, meta, keys, chain)
    }

    /// The node of stored metadata `meta` (verified), opened with `keys`.
    fn from_meta(
        ctx: &Ctx,
        ino: u64,
        meta: FileMeta,
        keys: Option<NodeKeys>,
        chain: Vec<u64>,
    ) -> FsResult<NodeState> {
        let epoch_keys = keys.as_ref().map(|keys| &keys.epoch_keys);
        let secrets = meta.body().secrets(epoch_keys)?;
        let is_dir = secrets.mode & libc::S_IFMT == libc::S_IFDIR;
        let body = meta.into_body();
        let mut node = NodeState {
            ino,
            body,
            secrets,
            keys,
            chain,
            tree: None,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            holes: BTreeSet::new(),
            cut_from: None,
            meta_dirty: false,
            cache: HashMap::new(),
            dir: None,
            handles: 0,
            stored: true,
            version: 0,
            inflight: VecDeque::new(),
            next_commit: 0,
            settling: 0,
            commit_done: Arc::new(Condvar::new()),
        };
        if is_dir {
            let count = node.body.sector_count;
            let indices: Vec<u64> = (0..count).collect();
            let blocks = node.read_sectors(ctx, &indices)?;
            node.dir = Some(Directory::from_blocks(&blocks)?);
        }
        Ok(node)
    }

    /// Replaces what this node holds of the stored file with what the store
    /// holds now (another member changed it): its metadata, keys, tree, cached
    /// sectors and directory. Open handles stay. Only a clean node is reloaded:
    /// buffered changes were made against the old version, and committing them
    /// fails verification rather than undo the other member's write.
    pub fn reload(&mut self, ctx: &Ctx) -> FsResult<()> {
        if self.is_dirty() {
            return Ok(());
        }
        let parent = ParentInfo {
            ino: self.ino,
            key: self
                .keys
                .as_ref()
                .and_then(|keys| SymmetricKey::from_slice(keys.file_key.as_bytes())),
            chain: self.chain.clone(),
        };
        let fresh = match NodeState::load_with_key(ctx, self.ino, &parent) {
            Ok(fresh) => fresh,
            // Deleted elsewhere: what handles still read is what they had.
            Err(FsError::NotFound) => return Ok(()),
            Err(error) => return Err(error),
        };
        let handles = self.handles;
        let version = self.version + 1;
        *self = fresh;
        self.handles = handles;
        self.version = version;
        Ok(())
    }

    /// [`NodeState::load`] of a file whose key is known already (`known.key`,
    /// constant over the file's life), keeping its chain.
    fn load_with_key(ctx: &Ctx, ino: u64, known: &ParentInfo) -> FsResult<NodeState> {
        match &known.key {
            None => NodeState::load(ctx, ino, None).map(|mut node| {
                node.chain = known.chain.clone();
                node
            }),
            Some(key) => {
                let meta = ctx.service.read_meta(ino)?.ok_or(FsError::NotFound)?;
                ctx.verify_read(&meta)?;
                if meta.body().ids != ids(ctx, ino) {
                    return Err(FsError::Io(format!(
                        "metadata stored for inode {ino} names another file"
                    )));
                }
                let file_key = SymmetricKey::from_slice(key.as_bytes())
                    .ok_or_else(|| FsError::Io("file key of the wrong length".into()))?;
                let keys = NodeKeys::open(meta.body(), file_key)?;
                NodeState::from_meta(ctx, ino, meta, Some(keys), known.chain.clone())
            }
        }
    }

    /// What a child needs to open its key through this directory.
    pub fn parent_info(&self) -> ParentInfo {
        ParentInfo {
            ino: self.ino,
            key: self
                .keys
                .as_ref()
                .map(|keys| SymmetricKey::from_slice(keys.file_key.as_bytes()))
                .and_then(|key| key),
            chain: self.chain.clone(),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.secrets.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn sector_size(&self) -> u64 {
        u64::from(self.body.sector_size)
    }

    /// True if writes or attribute changes wait to be committed, or a commit is
    /// in flight.
    pub fn is_dirty(&self) -> bool {
        !self.inflight.is_empty()
            || self.meta_dirty
            || !self.dirty.is_empty()
            || !self.holes.is_empty()
            || self.dir.as_ref().is_some_and(Directory::is_dirty)
    }

    /// Bytes of sector data waiting to be committed.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }

    fn access(&self, ctx: &Ctx) -> Option<ReadAccess> {
        self.keys.as_ref().map(|_| ReadAccess {
            reader: ctx.creds.encryption_public_key(),
            chain: self.chain.clone(),
        })
    }

    fn ensure_tree(&mut self, ctx: &Ctx) -> FsResult<()> {
        if self.tree.is_some() {
            return Ok(());
        }
        let body = &self.body;
        let algorithm = body.hash_algorithm;
        let pieces = blocktree_raftlog::pieces::piece_count(algorithm, body.sector_count);
        let mut leaves = Vec::with_capacity(body.sector_count as usize * algorithm.output_len());
        for piece in 0..pieces {
            let bytes = ctx.service.read_merkle_piece(self.ino, piece)?;
            let expected =
                blocktree_raftlog::pieces::expected_piece_len(algorithm, body.sector_count, piece);
            if bytes.len() != expected {
                return Err(FsError::tampered(
                    self.sector_id(ctx, SectorKind::Merkle(piece)),
                    format!("Merkle piece of {} bytes, expected {expected}", bytes.len()),
                ));
            }
            leaves.extend_from_slice(&bytes);
        }
        let tree = MerkleTree::from_leaf_bytes(algorithm, leaves)?;
        if tree.root() != body.merkle_root {
            return Err(FsError::tampered(
                self.sector_id(ctx, SectorKind::Merkle(0)),
                "the stored Merkle leaves do not hash to the signed root",
            ));
        }
        self.tree = Some(tree);
        Ok(())
    }

    fn sector_id(&self, ctx: &Ctx, sector: SectorKind) -> SectorId {
        SectorId {
            generation: ctx.generation(),
            inode: self.ino,
            sector,
        }
    }

    fn cache_lifetime(&self) -> Duration {
        Duration::from_secs(u64::from(self.secrets.cache_seconds))
    }

    /// True if a write since the last commit began punched sector `index` or
    /// truncated the file below it.
    fn is_cut_or_punched(&self, index: u64) -> bool {
        self.holes.contains(&index) || self.cut_from.is_some_and(|cut| index >= cut)
    }

    /// What the newest commit in flight that changes sector `index` writes
    /// to it: `Some(Some(plaintext))`, `Some(None)` for a hole, `None` if
    /// none changes it.
    fn inflight_sector(&self, index: u64) -> Option<Option<&Vec<u8>>> {
        self.inflight.iter().rev().find_map(|layer| {
            if let Some(plaintext) = layer.sectors.get(&index) {
                Some(Some(plaintext))
            } else if layer.holes.contains(&index) || layer.cut_from.is_some_and(|cut| index >= cut)
            {
                Some(None)
            } else {
                None
            }
        })
    }

    /// The plaintext of sectors `indices` (each `sector_size` bytes; zeros for holes
    /// and sectors past the end), verified against the signed Merkle root, with
    /// the node locked throughout.
    pub fn read_sectors(&mut self, ctx: &Ctx, indices: &[u64]) -> FsResult<Vec<Vec<u8>>> {
        let plan = self.plan_sectors(ctx, indices)?;
        let fetched = plan.fetch(ctx)?;
        Ok(self.finish_sectors(plan, fetched))
    }

    /// What reading `indices` needs: the sectors at hand (buffered, cached, holes)
    /// and, for the others, the leaf each record must hash to. Fetching the rest
    /// ([`SectorFetch::fetch`]) needs no lock on the node.
    pub fn plan_sectors(&mut self, ctx: &Ctx, indices: &[u64]) -> FsResult<SectorFetch> {
        let size = self.sector_size() as usize;
        let count = self.body.sector_count;
        let lifetime = self.cache_lifetime();
        let mut have: Vec<Option<Vec<u8>>> = Vec::with_capacity(indices.len());
        let mut missing = Vec::new();
        for &index in indices {
            if let Some(buffered) = self.dirty.get(&index) {
                have.push(Some(buffered.plaintext.clone()));
            } else if self.is_cut_or_punched(index) {
                have.push(Some(vec![0u8; size]));
            } else if let Some(layer) = self.inflight_sector(index) {
                have.push(Some(layer.cloned().unwrap_or_else(|| vec![0u8; size])));
            } else if index >= count {
                have.push(Some(vec![0u8; size]));
            } else {
                match self.cache.get(&index) {
                    Some((at, plaintext)) if at.elapsed() <= lifetime => {
                        have.push(Some(plaintext.clone()));
                    }
                    _ => {
                        have.push(None);
                        missing.push(index);
                    }
                }
            }
        }
        let mut leaves = Vec::with_capacity(missing.len());
        if !missing.is_empty() {
            self.ensure_tree(ctx)?;
            let tree = self
                .tree
                .as_ref()
                .ok_or_else(|| FsError::Io("tree not loaded".into()))?;
            for &index in &missing {
                let id = self.sector_id(ctx, SectorKind::Data(index));
                let leaf = tree
                    .leaf(index)
                    .ok_or_else(|| FsError::tampered(id, "no leaf for the sector"))?;
                leaves.push((index, leaf));
            }
        }
        Ok(SectorFetch {
            ino: self.ino,
            generation: ctx.generation(),
            sector_size: size,
            algorithm: self.body.hash_algorithm,
            have,
            leaves,
            access: self.access(ctx),
            opener: self.keys.as_ref().map(|keys| keys.opener.clone()),
            version: self.version,
        })
    }

    /// True if the file's contents changed since `plan` was made: records it
    /// fetches may be newer than the leaves it holds.
    pub(crate) fn changed_since(&self, plan: &SectorFetch) -> bool {
        plan.version != self.version
    }

    /// Assembles the sectors of `plan` and keeps the fetched ones in the cache,
    /// unless the file changed since the plan was made.
    pub fn finish_sectors(&mut self, plan: SectorFetch, fetched: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut sectors = Vec::with_capacity(plan.have.len());
        self.visit_sectors(plan, fetched, |plaintext| sectors.push(plaintext.to_vec()));
        sectors
    }

    /// Hands the sectors of `plan` to `each` in order, and moves each fetched
    /// one into the cache after it (cloning it cost an allocation and a copy
    /// per sector under the node's lock), unless the file changed since the
    /// plan was made.
    fn visit_sectors(
        &mut self,
        plan: SectorFetch,
        fetched: Vec<Vec<u8>>,
        mut each: impl FnMut(&[u8]),
    ) {
        let unchanged = plan.version == self.version;
        if unchanged && self.cache.len() + fetched.len() > CACHED_SECTORS {
            self.cache.clear();
        }
        let now = Instant::now();
        let mut fetched = plan.leaves.iter().map(|(index, _)| *index).zip(fetched);
        for slot in plan.have {
            match slot {
                Some(plaintext) => each(&plaintext),
                None => match fetched.next() {
                    Some((index, plaintext)) => {
                        each(&plaintext);
                        if unchanged && self.cache.len() < CACHED_SECTORS {
                            self.cache.insert(index, (now, plaintext));
                        }
                    }
                    None => each(&[]),
                },
            }
        }
    }

    /// Reads up to `len` bytes at `offset`, stopping at the end of the file, with
    /// the node locked throughout.
    pub fn read(&mut self, ctx: &Ctx, offset: u64, len: u64) -> FsResult<Vec<u8>> {
        let plan = self.plan_read(ctx, offset, len)?;
        let fetched = plan.sectors.fetch(ctx)?;
        Ok(self.finish_read(plan, fetched))
    }

    /// The first half of a read: what is at hand and what to fetch.
    pub fn plan_read(&mut self, ctx: &Ctx, offset: u64, len: u64) -> FsResult<ReadPlan> {
        let size = self.secrets.size;
        let end = size.min(offset.saturating_add(len));
        let sector = self.sector_size();
        let indices: Vec<u64> = if offset >= end {
            Vec::new()
        } else {
            (offset / sector..=(end - 1) / sector).collect()
        };
        let sectors = self.plan_sectors(ctx, &indices)?;
        Ok(ReadPlan {
            sectors,
            first: indices.first().copied().unwrap_or(0),
            offset,
            end: end.max(offset),
        })
    }

    /// The second half: the bytes of `plan`, with the fetched sectors.
    pub fn finish_read(&mut self, plan: ReadPlan, fetched: Vec<Vec<u8>>) -> Vec<u8> {
        let sector = self.sector_size();
        let ReadPlan {
            sectors,
            first,
            offset,
            end,
        } = plan;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut index = first;
        self.visit_sectors(sectors, fetched, |plaintext| {
            let start = index * sector;
            let from = (offset.max(start) - start) as usize;
            let to = (end.min(start + sector) - start) as usize;
            if let Some(bytes) = plaintext.get(from..to) {
                out.extend_from_slice(bytes);
            }
            index += 1;
        });
        out
    }

    /// What a writer needs to seal this file's sectors without its lock.
    pub fn seal_context(&self, ctx: &Ctx) -> SealContext {
        SealContext {
            ino: self.ino,
            generation: ctx.generation(),
            algorithm: self.body.hash_algorithm,
            sector_size: self.sector_size(),
            sealer: self.keys.as_ref().map(|keys| Arc::clone(&keys.sealer)),
        }
    }

    /// Writes `data` at `offset` into whole-sector buffers; commits later.
    pub fn write(&mut self, ctx: &Ctx, offset: u64, data: &[u8]) -> FsResult<()> {
        self.write_presealed(ctx, offset, data, Presealed::default())
    }

    /// [`NodeState::write`] with the sectors the writer sealed already
    /// ([`SealContext::preseal`] of the same `offset` and `data`); they are
    /// dropped if the file's sealer is no longer the one that sealed them.
    pub fn write_presealed(
        &mut self,
        ctx: &Ctx,
        offset: u64,
        data: &[u8],
        presealed: Presealed,
    ) -> FsResult<()> {
        let mut presealed = presealed;
        let same_sealer = match (&presealed.sealer, &self.keys) {
            (None, None) => true,
            (Some(sealer), Some(keys)) => Arc::ptr_eq(sealer, &keys.sealer),
            _ => false,
        };
        if !same_sealer || presealed.generation != ctx.generation() {
            presealed.sectors.clear();
        }
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(FsError::TooLarge)?;
        let sector = self.sector_size();
        let first = offset / sector;
        let last = (end - 1) / sector;
        // Sectors only partly covered need their current contents first.
        let partial: Vec<u64> = [first, last]
            .into_iter()
            .filter(|&index| {
                let start = index * sector;
                let covered = offset <= start && end >= start + sector;
                !covered && !self.dirty.contains_key(&index)
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let bases = self.read_sectors(ctx, &partial)?;
        let mut bases: HashMap<u64, Vec<u8>> = partial.into_iter().zip(bases).collect();
        for index in first..=last {
            let start = index * sector;
            let from = offset.max(start);
            let to = end.min(start + sector);
            let source = &data[(from - offset) as usize..(to - offset) as usize];
            let buffer = match self.dirty.get_mut(&index) {
                Some(buffer) => buffer,
                None => {
                    let plaintext = bases
                        .remove(&index)
                        .unwrap_or_else(|| vec![0u8; sector as usize]);
                    self.dirty_bytes += plaintext.len();
                    self.cache.remove(&index);
                    self.holes.remove(&index);
                    self.dirty
                        .entry(index)
                        .or_insert(DirtySector::unsealed(plaintext))
                }
            };
            buffer.plaintext[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(source);
            // Only a sector this write covers whole can have been presealed, and
            // then its record holds exactly the plaintext just copied.
            buffer.sealed = presealed.sectors.remove(&index);
        }
        if end > self.secrets.size {
            self.secrets.size = end;
        }
        self.version += 1;
        let time = now();
        self.secrets.mtime = time;
        self.secrets.ctime = time;
        self.meta_dirty = true;
        Ok(())
    }

    /// Changes the length: bytes past a shrunk end are gone (a later growth reads
    /// zeros), growth reads as zeros.
    pub fn truncate(&mut self, ctx: &Ctx, size: u64) -> FsResult<()> {
        if size > MAX_FILE_SIZE {
            return Err(FsError::TooLarge);
        }
        let sector = self.sector_size();
        let old = self.secrets.size;
        if size < old {
            let keep = size.div_ceil(sector);
            let cut: Vec<u64> = self.dirty.range(keep..).map(|(index, _)| *index).collect();
            for index in cut {
                if let Some(buffer) = self.dirty.remove(&index) {
                    self.dirty_bytes -= buffer.plaintext.len();
                }
            }
            self.holes.retain(|&index| index < keep);
            self.cache.retain(|&index, _| index < keep);
            self.cut_from = Some(self.cut_from.map_or(keep, |cut| cut.min(keep)));
            let tail = size % sector;
            if tail != 0 {
                // The kept part of the last sector stays; the rest must read as zeros
                // if the file grows again.
                let zeros = vec![0u8; (sector - tail) as usize];
                let end = self.secrets.size;
                self.write(ctx, size, &zeros)?;
                self.secrets.size = end;
            }
        }
        self.secrets.size = size;
        self.version += 1;
        let time = now();
        self.secrets.mtime = time;
        self.secrets.ctime = time;
        self.meta_dirty = true;
        Ok(())
    }

    /// Whether each sector from `first` (up to `count` of them) is a hole: never
    /// written, punched, or past the end. Buffered writes count as data.
    pub fn holes_from(&mut self, ctx: &Ctx, first: u64, count: u64) -> FsResult<Vec<bool>> {
        self.ensure_tree(ctx)?;
        let tree = self
            .tree
            .as_ref()
            .ok_or_else(|| FsError::Io("tree not loaded".into()))?;
        let hole = MerkleTree::leaf_hash(tree.algorithm(), &[]);
        let stored = self.body.sector_count;
        Ok((first..first.saturating_add(count))
            .map(|index| {
                if self.dirty.contains_key(&index) {
                    false
                } else if self.is_cut_or_punched(index) {
                    true
                } else if let Some(layer) = self.inflight_sector(index) {
                    layer.is_none()
                } else if index >= stored {
                    true
                } else {
                    tree.leaf(index) == Some(hole)
                }
            })
            .collect())
    }

    /// Makes `offset..offset + len` read as zeros: whole sectors become holes.
    pub fn punch(&mut self, ctx: &Ctx, offset: u64, len: u64) -> FsResult<()> {
        let end = offset.saturating_add(len).min(self.secrets.size);
        if offset >= end {
            return Ok(());
        }
        let sector = self.sector_size();
        let first_whole = offset.div_ceil(sector);
        let end_whole = end / sector;
        for index in first_whole..end_whole {
            if let Some(buffer) = self.dirty.remove(&index) {
                self.dirty_bytes -= buffer.plaintext.len();
            }
            self.cache.remove(&index);
            self.holes.insert(index);
        }
        self.version += 1;
        let size = self.secrets.size;
        let head_end = end.min(first_whole * sector);
        if offset < head_end {
            self.write(ctx, offset, &vec![0u8; (head_end - offset) as usize])?;
        }
        let tail_start = (end_whole * sector).max(offset);
        if tail_start < end && end_whole >= first_whole {
            self.write(ctx, tail_start, &vec![0u8; (end - tail_start) as usize])?;
        }
        self.secrets.size = size;
        self.meta_dirty = true;
        Ok(())
    }

    /// Seals the buffered sectors, updates the tree once and signs new metadata:
    /// the file's part of a batch. `None` if nothing changed. Then call
    /// [`NodeState::begin_commit`], and once the store answered
    /// [`NodeState::finish_commit`] or, on a refused batch,
    /// [`NodeState::abort_commit`]. Wait for [`NodeState::can_begin_commit`]
    /// first.
    pub fn prepare_commit(&mut self, ctx: &Ctx) -> FsResult<Option<FileWrite>> {
        self.prepare_unsigned(ctx)?
            .map(|write| write.sign(ctx))
            .transpose()
    }

    /// [`NodeState::prepare_commit`] but for the signature, which the returned
    /// write takes without the node ([`UnsignedWrite::sign`]): a batch of many
    /// nodes is signed after their locks are released.
    pub fn prepare_unsigned(&mut self, ctx: &Ctx) -> FsResult<Option<UnsignedWrite>> {
        if !self.can_begin_commit() {
            return Err(FsError::Io(format!(
                "inode {}: a commit was prepared while the ones in flight do not allow it",
                self.ino
            )));
        }
        if let Some(dir) = self.dir.as_mut()
            && dir.is_dirty()
        {
            let (blocks, count) = dir.take_dirty();
            for (index, plaintext) in blocks {
                self.dirty_bytes += plaintext.len();
                if let Some(old) = self.dirty.insert(index, DirtySector::unsealed(plaintext)) {
                    self.dirty_bytes -= old.plaintext.len();
                }
                self.holes.remove(&index);
            }
            self.secrets.size = count * self.sector_size();
            self.meta_dirty = true;
        }
        if !self.is_dirty() {
            return Ok(None);
        }
        self.ensure_tree(ctx)?;
        let writecap = ctx
            .creds
            .writecap()
            .cloned()
            .ok_or_else(|| FsError::ReadOnly("this runtime holds no writecap".into()))?;
        let sector = self.sector_size();
        let sector_count = self.secrets.size.div_ceil(sector);
        let generation = ctx.generation();
        let ino = self.ino;
        let keys = self.keys.as_ref();
        let algorithm = self.body.hash_algorithm;
        // What the writers did not seal already (sectors written in part).
        let unsealed: Vec<(u64, &Vec<u8>)> = self
            .dirty
            .range(..sector_count)
            .filter(|(_, buffered)| buffered.sealed.is_none())
            .map(|(index, buffered)| (*index, &buffered.plaintext))
            .collect();
        let unsealed_bytes = unsealed.iter().map(|(_, plaintext)| plaintext.len()).sum();
        // Sealing and leaf hashing, the CPU-bound part of a batch, on every core; each
        // core hashes its records together.
        let results = parallel_map_chunks(&unsealed, unsealed_bytes, |part| {
            let records: Vec<Result<Vec<u8>, FsError>> = part
                .iter()
                .map(|(index, plaintext)| match keys {
                    Some(keys) => {
                        let id = SectorId {
                            generation,
                            inode: ino,
                            sector: SectorKind::Data(*index),
                        };
                        Ok(keys.sealer.seal_to_vec(&id, plaintext)?)
                    }
                    None => Ok(plaintext.to_vec()),
                })
                .collect();
            let sealed: Vec<&[u8]> = records.iter().flatten().map(Vec::as_slice).collect();
            let mut leaves = MerkleTree::leaf_hashes(algorithm, &sealed).into_iter();
            part.iter()
                .zip(records)
                .map(|((index, _), record)| {
                    let record = record?;
                    let leaf = leaves
                        .next()
                        .ok_or_else(|| FsError::Io("a leaf hash is missing".into()))?;
                    Ok::<_, FsError>((*index, record, leaf))
                })
                .collect()
        });
        let mut sealed_now: BTreeMap<u64, (Vec<u8>, Digest)> = BTreeMap::new();
        for result in results {
            let (index, record, leaf) = result?;
            sealed_now.insert(index, (record, leaf));
        }
        let mut data = Vec::with_capacity(self.dirty.len());
        let mut leaves = Vec::with_capacity(self.dirty.len() + self.holes.len() + 1);
        for (index, buffered) in self.dirty.range_mut(..sector_count) {
            // The presealed record moves into the batch: a refused batch's
            // sectors come back unsealed and are sealed again.
            let (record, leaf) = match buffered.sealed.take() {
                Some(sealed) => sealed,
                None => sealed_now
                    .remove(index)
                    .ok_or_else(|| FsError::Io("a sealed sector is missing".into()))?,
            };
            leaves.push((*index, leaf));
            data.push((*index, record));
        }
        let stored = self.body.sector_count.min(sector_count);
        let mut holes: BTreeSet<u64> = self.holes.range(..sector_count).copied().collect();
        if let Some(cut) = self.cut_from {
            // Stale stored sectors the file grew back over: holes on both sides.
            holes.extend((cut..stored).filter(|index| !self.dirty.contains_key(index)));
        }
        let holes: Vec<u64> = holes.into_iter().collect();
        let tree = self
            .tree
            .as_mut()
            .ok_or_else(|| FsError::Io("tree not loaded".into()))?;
        tree.truncate(sector_count);
        let hole = MerkleTree::leaf_hash(algorithm, &[]);
        leaves.extend(holes.iter().map(|index| (*index, hole)));
        if sector_count > tree.leaf_count() && !self.dirty.contains_key(&(sector_count - 1)) {
            leaves.push((sector_count - 1, hole));
        }
        tree.update_leaf_hashes(leaves)?;
        let mut body = self.body.clone();
        body.merkle_root = tree.root();
        body.sector_count = sector_count;
        body.writecap = writecap;
        match &self.keys {
            Some(keys) => {
                body.set_secrets(&self.secrets, Some((&keys.sealer, keys.epoch_key()?)))?
            }
            None => body.set_secrets(&self.secrets, None)?,
        }
        Ok(Some(UnsignedWrite { body, data, holes }))
    }

    /// Hands the buffers [`NodeState::prepare_commit`] sealed to a commit in
    /// flight, so writes from now on buffer afresh while the store takes the
    /// batch (the node's lock need not be held meanwhile). Reads see the
    /// batch's sectors until it lands. Returns the commit's number.
    pub fn begin_commit(&mut self) -> u64 {
        let seq = self.next_commit;
        self.next_commit += 1;
        self.inflight.push_back(InFlight {
            seq,
            queued: Arc::new(AtomicBool::new(false)),
            failed: false,
            sectors: std::mem::take(&mut self.dirty)
                .into_iter()
                .map(|(index, buffered)| (index, buffered.plaintext))
                .collect(),
            holes: std::mem::take(&mut self.holes),
            cut_from: self.cut_from.take(),
        });
        self.dirty_bytes = 0;
        self.meta_dirty = false;
        seq
    }

    /// The store has fixed the place of commit `seq` among its writes: the
    /// file's next batch may be prepared on top of it.
    pub fn commit_queued(&mut self, seq: u64) {
        if let Some(flag) = self.queued_flag(seq) {
            flag.store(true, Ordering::Release);
        }
        self.commit_done.notify_all();
    }

    /// What marks commit `seq` queued without the node's lock; a waiter for
    /// [`NodeState::can_begin_commit`] may then miss its wake-up and must look
    /// again on a timeout.
    pub fn queued_flag(&self, seq: u64) -> Option<Arc<AtomicBool>> {
        self.inflight
            .iter()
            .find(|layer| layer.seq == seq)
            .map(|layer| Arc::clone(&layer.queued))
    }

    /// True if a commit may be prepared now: fewer than [`COMMITS_IN_FLIGHT`]
    /// are in flight, the store has queued each, none failed, and nobody
    /// waits for them all to end.
    pub fn can_begin_commit(&self) -> bool {
        self.settling == 0
            && self.inflight.len() < COMMITS_IN_FLIGHT
            && self
                .inflight
                .iter()
                .all(|layer| layer.queued.load(Ordering::Acquire) && !layer.failed)
    }

    /// True if commit `seq` is the oldest one in flight whose outcome is not
    /// known: the one [`NodeState::end_commit`] ends.
    pub fn is_next_to_end(&self, seq: u64) -> bool {
        self.inflight
            .iter()
            .find(|layer| !layer.failed)
            .is_some_and(|layer| layer.seq == seq)
    }

    /// True while a commit of this file is between [`NodeState::begin_commit`]
    /// and its finish or abort.
    pub fn commit_in_flight(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// What to wait on for [`NodeState::commit_in_flight`] to clear, or for a
    /// commit to be queued, with this node's lock.
    pub fn commit_done(&self) -> Arc<Condvar> {
        Arc::clone(&self.commit_done)
    }

    /// Ends the oldest commit in flight whose outcome was not known (see
    /// [`NodeState::is_next_to_end`]) as the store answered (`stored`):
    /// [`NodeState::finish_commit`] if it took the batch, else
    /// [`NodeState::abort_commit`]; returns the answer.
    pub fn end_commit(&mut self, ctx: &Ctx, meta: FileMeta, stored: FsResult<()>) -> FsResult<()> {
        match stored {
            Ok(()) => self.finish_commit(ctx, meta),
            Err(_) => self.abort_commit(),
        }
        stored
    }

    /// Installs the committed metadata; the committed sectors no later write
    /// replaced move to the cache. The store accepted the metadata, so its
    /// signature counts as verified when the node is loaded again. Failed
    /// commits before it were stored after all: the store applies a file's
    /// batches in order or refuses the later ones.
    pub fn finish_commit(&mut self, ctx: &Ctx, meta: FileMeta) {
        meta.remember_accepted(&ctx.verified_signatures);
        self.body = meta.into_body();
        self.stored = true;
        let Some(position) = self.inflight.iter().position(|layer| !layer.failed) else {
            return;
        };
        self.inflight.drain(..position);
        let Some(done) = self.inflight.pop_front() else {
            return;
        };
        self.commit_done.notify_all();
        if self.handles == 0 {
            // A closed file (a small one committed with its directory entry
            // after close): nobody is reading it through this node now.
            self.drop_cached_sectors();
            return;
        }
        let now = Instant::now();
        let committed: Vec<(u64, Vec<u8>)> = done
            .sectors
            .into_iter()
            .filter(|(index, _)| {
                !self.dirty.contains_key(index)
                    && !self.is_cut_or_punched(*index)
                    && self.inflight_sector(*index).is_none()
            })
            .collect();
        if committed.len() + self.cache.len() > CACHED_SECTORS {
            self.cache.clear();
        }
        if committed.len() <= CACHED_SECTORS {
            for (index, plaintext) in committed {
                self.cache.insert(index, (now, plaintext));
            }
        }
    }

    /// Forgets the plaintext sectors cached for readers, when the file's last
    /// handle is closed: cached nodes are many (16,384) and each may cache up
    /// to [`CACHED_SECTORS`], so closed files' sectors would add up to
    /// gigabytes; a file read again comes from the store through the page
    /// cache. Writing 10,000 files of 60 KiB through btfuse peaked at 787 MiB
    /// resident with the sectors kept.
    pub fn drop_cached_sectors(&mut self) {
        self.cache = HashMap::new();
    }

    /// After a refused or failed batch: nothing is lost. While later commits
    /// are in flight the batch stays a layer reads see, as whether it is
    /// stored depends on them. Once none is, the failed batches' sectors,
    /// holes and cuts go back into the buffers, newest first, under whatever
    /// was written since (a later commit retries them), and the tree is
    /// reloaded from the store.
    pub fn abort_commit(&mut self) {
        if let Some(layer) = self.inflight.iter_mut().find(|layer| !layer.failed) {
            layer.failed = true;
            self.commit_done.notify_all();
        }
        if self.inflight.iter().any(|layer| !layer.failed) {
            return;
        }
        while let Some(undone) = self.inflight.pop_back() {
            for (index, plaintext) in undone.sectors {
                if self.dirty.contains_key(&index) || self.is_cut_or_punched(index) {
                    continue;
                }
                self.dirty_bytes += plaintext.len();
                self.dirty.insert(index, DirtySector::unsealed(plaintext));
            }
            for index in undone.holes {
                if !self.dirty.contains_key(&index) && !self.is_cut_or_punched(index) {
                    self.holes.insert(index);
                }
            }
            self.cut_from = match (self.cut_from, undone.cut_from) {
                (Some(now), Some(then)) => Some(now.min(then)),
                (now, then) => now.or(then),
            };
            self.meta_dirty = true;
        }
        self.tree = None;
        self.version += 1;
    }

    /// The current metadata under our writecap: what names this file in a
    /// delete once signed ([`Tombstone::sign`]), proving the deleter's authority.
    pub fn tombstone(&self, ctx: &Ctx) -> FsResult<Tombstone> {
        let mut body = self.body.clone();
        body.writecap = ctx
            .creds
            .writecap()
            .cloned()
            .ok_or_else(|| FsError::ReadOnly("this runtime holds no writecap".into()))?;
        Ok(Tombstone(body))
    }

    /// Metadata-only change (chmod, xattr…): marks the secrets for the next commit.
    pub fn touch_ctime(&mut self) {
        self.secrets.ctime = now();
        self.meta_dirty = true;
    }
}

/// A file's part of a batch before its metadata is signed
/// ([`NodeState::prepare_unsigned`]).
pub struct UnsignedWrite {
    body: MetaBody,
    data: Vec<(u64, Vec<u8>)>,
    holes: Vec<u64>,
}

impl UnsignedWrite {
    /// Signs the new metadata: the file's part of the batch.
    pub fn sign(self, ctx: &Ctx) -> FsResult<FileWrite> {
        let meta = FileMeta::sign(self.body, &RuntimeSigner(ctx.creds.as_ref()))?;
        Ok(FileWrite {
            meta,
            data: self.data,
            holes: self.holes,
        })
    }
}

/// A file's delete as staged: its metadata under the deleter's writecap, signed
/// only when the batch that carries it is committed, off the path of the
/// operation that deleted it (an unlink answers without an ECDSA signature).
#[derive(Clone, Debug)]
pub struct Tombstone(MetaBody);

impl Tombstone {
    /// The deleted file.
    pub fn inode(&self) -> u64 {
        self.0.ids.inode
    }

    /// The signed metadata the store takes as this delete.
    pub fn sign(self, ctx: &Ctx) -> FsResult<FileMeta> {
        Ok(FileMeta::sign(self.0, &RuntimeSigner(ctx.creds.as_ref()))?)
    }
}

/// The largest file: 2^40 sectors would be the tree's limit; this keeps offsets
/// within what every layer handles (8 EiB / 2).
pub const MAX_FILE_SIZE: u64 = 1 << 62;

/// A data sector's index and the leaf its record must hash to.
type LeafOf = (u64, Digest);

/// A read of a byte range in flight: its sectors and where the bytes lie.
pub(crate) struct ReadPlan {
    /// The sectors to assemble and fetch.
    pub sectors: SectorFetch,
    first: u64,
    offset: u64,
    end: u64,
}

/// A read in flight without the node's lock: the records to fetch and the leaves
/// they must hash to (from the tree the signed root vouches for).
pub(crate) struct SectorFetch {
    ino: u64,
    generation: u64,
    sector_size: usize,
    algorithm: HashAlgorithm,
    have: Vec<Option<Vec<u8>>>,
    leaves: Vec<LeafOf>,
    access: Option<ReadAccess>,
    opener: Option<Arc<SectorOpener>>,
    version: u64,
}

impl SectorFetch {
    /// Fetches the missing records, checks each against its leaf and decrypts it,
    /// on every core for large reads. A record that fails is EIO, never data.
    pub fn fetch(&self, ctx: &Ctx) -> FsResult<Vec<Vec<u8>>> {
        self.fetch_unlogged(ctx).map_err(FsError::logged)
    }

    /// [`fetch`](Self::fetch), without logging a record that failed its
    /// check: for a reader that first rules out a concurrent commit.
    pub fn fetch_unlogged(&self, ctx: &Ctx) -> FsResult<Vec<Vec<u8>>> {
        SectorFetch::fetch_many(&[self], ctx)?
            .pop()
            .unwrap_or_else(|| Ok(Vec::new()))
    }

    /// Fetches the missing records of several reads of one node (planned under
    /// one hold of its lock) in one request to the store, then checks and opens
    /// each as [`fetch`](Self::fetch) does. The outer error is the store's; each
    /// read has its own verification result.
    pub fn fetch_many(
        fetches: &[&SectorFetch],
        ctx: &Ctx,
    ) -> FsResult<Vec<FsResult<Vec<Vec<u8>>>>> {
        let Some(first) = fetches.iter().find(|fetch| !fetch.leaves.is_empty()) else {
            return Ok(fetches.iter().map(|_| Ok(Vec::new())).collect());
        };
        debug_assert!(fetches.iter().all(|fetch| fetch.ino == first.ino));
        let indices: Vec<u64> = fetches
            .iter()
            .flat_map(|fetch| fetch.leaves.iter().map(|(index, _)| *index))
            .collect();
        let records = ctx
            .service
            .read_data(first.ino, &indices, first.access.as_ref())?;
        let work: Vec<(&SectorFetch, LeafOf, Vec<u8>)> = fetches
            .iter()
            .flat_map(|fetch| fetch.leaves.iter().map(move |leaf| (*fetch, *leaf)))
            .zip(records)
            .map(|((fetch, leaf), record)| (fetch, leaf, record.unwrap_or_default()))
            .collect();
        // One node's fetches: one hash algorithm, so each core hashes its share of
        // the records together, then opens each in its own buffer.
        let algorithm = first.algorithm;
        let bytes = work.len() * first.sector_size;
        let mut opened = parallel_map_owned(work, bytes, |part| {
            let records: Vec<&[u8]> = part.iter().map(|(_, _, record)| &record[..]).collect();
            let hashed = MerkleTree::leaf_hashes(algorithm, &records);
            part.into_iter()
                .zip(hashed)
                .map(|((fetch, (index, leaf), record), hashed)| {
                    fetch.verify_and_open(index, &leaf, &hashed, record)
                })
                .collect()
        })
        .into_iter();
        // Each read's share is taken whole before it is judged: collecting
        // straight into a result would stop at its first failure and hand the
        // rest of its records to the next read.
        Ok(fetches
            .iter()
            .map(|fetch| {
                let share: Vec<FsResult<Vec<u8>>> =
                    opened.by_ref().take(fetch.leaves.len()).collect();
                share.into_iter().collect()
            })
            .collect())
    }

    /// Checks that `record` (empty for a hole), whose leaf hash is `hashed`, is the
    /// one the signed `leaf` names, and opens it in its own buffer.
    fn verify_and_open(
        &self,
        index: u64,
        leaf: &Digest,
        hashed: &Digest,
        record: Vec<u8>,
    ) -> FsResult<Vec<u8>> {
        let id = SectorId {
            generation: self.generation,
            inode: self.ino,
            sector: SectorKind::Data(index),
        };
        if hashed != leaf {
            return Err(FsError::unverified(
                id,
                "its hash is not the signed Merkle leaf",
            ));
        }
        if record.is_empty() {
            return Ok(vec![0u8; self.sector_size]);
        }
        let plaintext = match &self.opener {
            Some(opener) => opener
                .open_in_place(&id, record)
                .map_err(|error| FsError::unverified(id, error))?,
            None => record,
        };
        if plaintext.len() != self.sector_size {
            return Err(FsError::unverified(id, "wrong length"));
        }
        Ok(plaintext)
    }
}
