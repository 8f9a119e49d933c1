//! The Merkle tree over a file's data sectors.
//!
//! Every data sector of a file is stored as a sealed record. The file's signed
//! metadata holds one digest, the Merkle root, and that root must let a reader check
//! any single sector with O(log n) hashes and let a writer update a batch of sectors
//! touching each changed ancestor exactly once.
//!
//! # Structure
//!
//! - Level 0 holds one leaf per sector: `H(0x00 || record)`. A sector never written
//!   (a hole) has the leaf of the empty record, `H(0x00)`, so a sparse file needs no
//!   special marker and a hole verifies like any other sector.
//! - Level `k + 1` has `ceil(len_k / 2)` nodes; node `j` is `H(0x01 || left || right)`
//!   over nodes `2j` and `2j + 1` of level `k`. When a level has an odd number of
//!   nodes, its last node has no sibling and is *promoted* unchanged to the next level.
//!   Promotion (rather than padding to a power of two or duplicating the node) keeps
//!   the tree exactly as large as the file and means appending a sector rehashes only
//!   one path, never a phantom subtree.
//! - The root is `H(0x02 || leaf_count as u64 big-endian || top node)`, or
//!   `H(0x02 || 0u64)` for an empty file.
//!
//! The three leading bytes separate the domains: a leaf can never be confused with an
//! interior node (which would let someone present two child digests as a "record"),
//! and neither can be confused with a root. Binding the leaf count into the root is
//! what promotion needs to be safe: without it, a tree truncated to a prefix whose top
//! node happens to be promoted unchanged, or a tree extended with promoted nodes, could
//! yield the same top node for a different number of sectors. With it, a store that
//! drops or invents trailing sectors is caught by the signed root.
//!
//! # Storage
//!
//! All levels are kept in memory as flat byte vectors (`len_k * digest_len` bytes for
//! level `k`) and are serialized as they are into the file's Merkle sector. Proofs and
//! verification then read stored siblings instead of rehashing the tree. A tree decoded
//! from a Merkle sector is untrusted: decoding checks only its shape; [`MerkleTree::verify`]
//! recomputes one path up to the signed root, so a forged interior node fails there, and
//! [`MerkleTree::verify_all`] checks the whole tree before a writer builds on it.
//!
//! # Updates
//!
//! [`MerkleTree::update_leaf_hashes`] writes the new leaves, then walks the levels
//! bottom-up with a sorted, deduplicated set of dirty node indices, so an ancestor
//! shared by many updated leaves is hashed once. Growth (new leaves, holes included)
//! is a dirty *tail* of every level rather than a list of indices, so building a tree
//! of a million leaves is one linear pass.

use crate::encoding::{Encodable, Kind};
use crate::hash::{Digest, HashAlgorithm, MAX_DIGEST_LEN};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use thiserror::Error;

/// The most leaves a tree may have: 2^40 sectors. Larger indices are an error, so a
/// bogus sector number cannot make the tree try to allocate petabytes.
pub const MAX_LEAF_COUNT: u64 = 1 << 40;

/// Domain-separation prefix of leaf hashes.
const LEAF_TAG: u8 = 0x00;
/// Domain-separation prefix of interior-node hashes.
const NODE_TAG: u8 = 0x01;
/// Domain-separation prefix of the root hash.
const ROOT_TAG: u8 = 0x02;

/// Why a Merkle operation failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MerkleError {
    /// The index is not a leaf of the tree.
    #[error("sector {index} is outside the tree's {leaf_count} sectors")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The tree's leaf count.
        leaf_count: u64,
    },
    /// Verification failed: the record, the path or the claimed position is wrong.
    #[error("sector {index} does not match the signed Merkle root")]
    Mismatch {
        /// The leaf index that failed.
        index: u64,
    },
    /// The tree as a whole does not hash to the expected root.
    #[error("the Merkle tree does not match the signed Merkle root")]
    RootMismatch,
    /// A digest of another hash algorithm than the tree's.
    #[error("expected a {expected:?} digest, found a {found:?} one")]
    AlgorithmMismatch {
        /// The tree's (or proof's) algorithm.
        expected: HashAlgorithm,
        /// The algorithm of the digest supplied.
        found: HashAlgorithm,
    },
    /// Growing to this index would exceed [`MAX_LEAF_COUNT`] or available memory.
    #[error("sector {index} is beyond the limit of {MAX_LEAF_COUNT} sectors or available memory")]
    TooLarge {
        /// The leaf index that was asked for.
        index: u64,
    },
    /// A decoded tree or proof is inconsistent.
    #[error("malformed Merkle data: {0}")]
    Malformed(String),
}

/// A Merkle tree over a file's data sectors; see the [module documentation](self).
#[derive(Clone)]
pub struct MerkleTree {
    algorithm: HashAlgorithm,
    leaf_count: u64,
    /// `levels[0]` holds the leaves, the last level one node; empty for no leaves.
    /// Level `k` is exactly `level_lens(leaf_count)[k] * digest_len` bytes.
    levels: Vec<Vec<u8>>,
    /// Cached so `root()` is free; recomputed after every change.
    root: Digest,
    /// Cached leaf of the empty record, copied into every hole.
    hole: Digest,
    hash_count: u64,
}

impl PartialEq for MerkleTree {
    /// Trees are equal when they hold the same nodes; the hash counter is ignored.
    fn eq(&self, other: &Self) -> bool {
        self.algorithm == other.algorithm
            && self.leaf_count == other.leaf_count
            && self.levels == other.levels
    }
}

impl Eq for MerkleTree {}

impl fmt::Debug for MerkleTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The levels can be megabytes; the root identifies the content.
        f.debug_struct("MerkleTree")
            .field("algorithm", &self.algorithm)
            .field("leaf_count", &self.leaf_count)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree::new(HashAlgorithm::default())
    }
}

/// The node counts of every level of a tree of `leaf_count` leaves, leaves first;
/// empty for no leaves.
fn level_lens(leaf_count: usize) -> Vec<usize> {
    let mut lens = Vec::new();
    let mut len = leaf_count;
    if len == 0 {
        return lens;
    }
    lens.push(len);
    while len > 1 {
        len = len.div_ceil(2);
        lens.push(len);
    }
    lens
}

/// Walks the path of leaf `index` in a tree of `leaf_count` leaves bottom-up, calling
/// `visit(level, sibling_position, path_is_left)` for each level whose node on the
/// path has a sibling (promoted nodes have none). Stops early when `visit` returns
/// `None`.
fn walk_path(
    leaf_count: u64,
    index: u64,
    mut visit: impl FnMut(usize, u64, bool) -> Option<()>,
) -> Option<()> {
    let mut len = leaf_count;
    let mut position = index;
    let mut level = 0;
    while len > 1 {
        let sibling = position ^ 1;
        if sibling < len {
            visit(level, sibling, position & 1 == 0)?;
        }
        position /= 2;
        len = len.div_ceil(2);
        level += 1;
    }
    Some(())
}

/// The number of siblings on the path of leaf `index` in a tree of `leaf_count` leaves.
fn sibling_count(leaf_count: u64, index: u64) -> usize {
    let mut count = 0;
    let _ = walk_path(leaf_count, index, |_, _, _| {
        count += 1;
        Some(())
    });
    count
}

fn node_hash(algorithm: HashAlgorithm, left: &[u8], right: &[u8]) -> Digest {
    algorithm.hash(&[&[NODE_TAG], left, right])
}

fn root_hash(algorithm: HashAlgorithm, leaf_count: u64, top: &[u8]) -> Digest {
    algorithm.hash(&[&[ROOT_TAG], &leaf_count.to_be_bytes(), top])
}

/// Recomputes the root from a leaf digest and the siblings along its path, asking
/// `sibling(level, sibling_position)` for each. `None` if one is missing.
fn fold_path<'a>(
    algorithm: HashAlgorithm,
    leaf_count: u64,
    index: u64,
    leaf: Digest,
    mut sibling: impl FnMut(usize, u64) -> Option<&'a [u8]>,
) -> Option<Digest> {
    let mut node = leaf;
    walk_path(leaf_count, index, |level, position, path_is_left| {
        let sibling = sibling(level, position)?;
        node = if path_is_left {
            node_hash(algorithm, node.as_bytes(), sibling)
        } else {
            node_hash(algorithm, sibling, node.as_bytes())
        };
        Some(())
    })?;
    Some(root_hash(algorithm, leaf_count, node.as_bytes()))
}

/// Computes node `index` of the level above `child` (which has `child_len` nodes) into
/// `out`; returns the number of hashes made (0 when the node is promoted).
/// Nodes of one level to recompute from which they are hashed together: below
/// it, the batch's allocations cost more than its lanes save.
const BATCHED_NODES_MIN: usize = 4;
/// The most nodes hashed in one batch.
const BATCHED_NODES_MAX: usize = 4096;

fn compute_node(
    algorithm: HashAlgorithm,
    digest_len: usize,
    child: &[u8],
    child_len: usize,
    index: usize,
    out: &mut [u8],
) -> u64 {
    let left_index = 2 * index;
    let left = &child[left_index * digest_len..][..digest_len];
    if left_index + 1 < child_len {
        let right = &child[(left_index + 1) * digest_len..][..digest_len];
        out.copy_from_slice(node_hash(algorithm, left, right).as_bytes());
        1
    } else {
        out.copy_from_slice(left);
        0
    }
}

impl MerkleTree {
    /// An empty tree (no sectors) hashing with `algorithm`.
    pub fn new(algorithm: HashAlgorithm) -> MerkleTree {
        MerkleTree {
            algorithm,
            leaf_count: 0,
            levels: Vec::new(),
            root: root_hash(algorithm, 0, &[]),
            hole: MerkleTree::leaf_hash(algorithm, &[]),
            hash_count: 0,
        }
    }

    /// The tree's hash algorithm.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The number of leaves (sectors), holes included.
    pub fn leaf_count(&self) -> u64 {
        self.leaf_count
    }

    /// The root, which the file's signed metadata holds.
    pub fn root(&self) -> Digest {
        self.root
    }

    /// The leaf digest of `record`: `H(0x00 || record)`.
    pub fn leaf_hash(algorithm: HashAlgorithm, record: &[u8]) -> Digest {
        algorithm.hash(&[&[LEAF_TAG], record])
    }

    /// The leaf digest of each of `records`, as [`leaf_hash`](Self::leaf_hash) gives,
    /// hashed together ([`HashAlgorithm::hash_many`]): faster than one by one.
    pub fn leaf_hashes(algorithm: HashAlgorithm, records: &[&[u8]]) -> Vec<Digest> {
        let tag: &[u8] = &[LEAF_TAG];
        let messages: Vec<[&[u8]; 2]> = records.iter().map(|record| [tag, record]).collect();
        let parts: Vec<&[&[u8]]> = messages.iter().map(|message| &message[..]).collect();
        algorithm.hash_many(&parts)
    }

    /// The stored leaf digest at `index`, if it is inside the tree.
    pub fn leaf(&self, index: u64) -> Option<Digest> {
        let index = usize::try_from(index).ok()?;
        let len = self.algorithm.output_len();
        let bytes = self
            .levels
            .first()?
            .get(index.checked_mul(len)?..)?
            .get(..len)?;
        Some(Digest::from_slice(self.algorithm, bytes))
    }

    /// Leaf digests `start..end` (clamped to the tree) as they are stored: concatenated
    /// digests of [`HashAlgorithm::output_len`] bytes each. What a Merkle piece holds.
    pub fn leaf_bytes(&self, start: u64, end: u64) -> &[u8] {
        let len = self.algorithm.output_len();
        let end = end.min(self.leaf_count);
        let Some(leaves) = self.levels.first() else {
            return &[];
        };
        if start >= end {
            return &[];
        }
        // Both bounds are at most leaf_count, whose bytes are in memory.
        &leaves[start as usize * len..end as usize * len]
    }

    /// A tree whose leaves are the concatenated digests in `leaves`, with every interior
    /// node computed (n hashes): how a tree is rebuilt from its stored leaf pieces.
    ///
    /// # Errors
    /// [`MerkleError::Malformed`] if `leaves` is not a whole number of digests, and
    /// [`MerkleError::TooLarge`] past [`MAX_LEAF_COUNT`] or available memory.
    pub fn from_leaf_bytes(
        algorithm: HashAlgorithm,
        leaves: Vec<u8>,
    ) -> Result<MerkleTree, MerkleError> {
        let digest_len = algorithm.output_len();
        if !leaves.len().is_multiple_of(digest_len) {
            return Err(MerkleError::Malformed(format!(
                "{} bytes of leaves is not a whole number of {algorithm:?} digests",
                leaves.len()
            )));
        }
        let count = leaves.len() / digest_len;
        if count as u64 > MAX_LEAF_COUNT {
            return Err(MerkleError::TooLarge {
                index: count as u64,
            });
        }
        let mut tree = MerkleTree::new(algorithm);
        if count == 0 {
            return Ok(tree);
        }
        tree.levels.push(leaves);
        tree.leaf_count = count as u64;
        tree.grow_interior(count)?;
        tree.rebuild();
        Ok(tree)
    }

    /// The number of hash invocations made by [`update`](Self::update),
    /// [`update_batch`](Self::update_batch), [`update_leaf_hashes`](Self::update_leaf_hashes),
    /// [`truncate`](Self::truncate) and [`rebuild`](Self::rebuild) on this tree since it
    /// was created or decoded: leaf hashes of records, interior nodes and roots.
    pub fn hash_count(&self) -> u64 {
        self.hash_count
    }

    /// Sets leaf `index` to the leaf hash of `record`, growing the tree with holes if
    /// `index` is past the end, and rehashes the leaf's ancestors (log n hashes).
    ///
    /// # Errors
    /// [`MerkleError::TooLarge`] if `index` is not below [`MAX_LEAF_COUNT`] or the
    /// memory for the grown tree cannot be allocated; the tree is then unchanged.
    pub fn update(&mut self, index: u64, record: &[u8]) -> Result<(), MerkleError> {
        self.update_batch([(index, record)])
    }

    /// Sets many leaves to the leaf hashes of their records, then rehashes every dirty
    /// ancestor exactly once. A later entry for the same index wins, as if the updates
    /// were applied in order.
    ///
    /// # Errors
    /// As [`update_leaf_hashes`](Self::update_leaf_hashes).
    pub fn update_batch<'r>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'r [u8])>,
    ) -> Result<(), MerkleError> {
        let (indices, records): (Vec<u64>, Vec<&[u8]>) = records.into_iter().unzip();
        let leaves = MerkleTree::leaf_hashes(self.algorithm, &records);
        let result = self.apply_leaves(indices.into_iter().zip(leaves));
        self.hash_count = self.hash_count.saturating_add(records.len() as u64);
        result
    }

    /// Sets many leaves to precomputed leaf digests (see [`leaf_hash`](Self::leaf_hash)),
    /// growing the tree with holes as needed, then rehashes every dirty ancestor exactly
    /// once, level by level. A later entry for the same index wins.
    ///
    /// The entries are consumed as a stream, so building a large tree needs no copy of
    /// its leaves beyond level 0 itself.
    ///
    /// # Errors
    /// [`MerkleError::AlgorithmMismatch`] for a digest of another algorithm, and
    /// [`MerkleError::TooLarge`] for an index not below [`MAX_LEAF_COUNT`] or when memory
    /// for the grown tree cannot be allocated. The entries before the offending one
    /// stay applied (at most the leaves that were already in the tree: growth by a
    /// batch that then fails to allocate is undone), and the tree is consistent.
    pub fn update_leaf_hashes(
        &mut self,
        leaves: impl IntoIterator<Item = (u64, Digest)>,
    ) -> Result<(), MerkleError> {
        self.apply_leaves(leaves.into_iter())
    }

    fn apply_leaves(
        &mut self,
        leaves: impl Iterator<Item = (u64, Digest)>,
    ) -> Result<(), MerkleError> {
        let digest_len = self.algorithm.output_len();
        // A tree in memory has fewer than MAX_LEAF_COUNT leaves, whose bytes fit in
        // memory, so its count fits in usize.
        let old_count = self.leaf_count as usize;
        let mut count = old_count;
        // Changed leaves that existed before; leaves at or past `old_count` are covered
        // by the dirty tail and need no entry.
        let mut dirty: Vec<usize> = Vec::new();
        let mut result = Ok(());
        let hole = self.hole;
        // Taken out so the loop can grow it while reading the rest of `self`.
        let mut leaves_level = self
            .levels
            .first_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        for (index, digest) in leaves {
            if digest.algorithm() != self.algorithm {
                result = Err(MerkleError::AlgorithmMismatch {
                    expected: self.algorithm,
                    found: digest.algorithm(),
                });
                break;
            }
            let too_large = MerkleError::TooLarge { index };
            let Some(position) = usize::try_from(index)
                .ok()
                .filter(|_| index < MAX_LEAF_COUNT)
            else {
                result = Err(too_large);
                break;
            };
            if position < count {
                leaves_level[position * digest_len..][..digest_len]
                    .copy_from_slice(digest.as_bytes());
                if position < old_count {
                    dirty.push(position);
                }
                continue;
            }
            let additional = (position - count + 1)
                .checked_mul(digest_len)
                .ok_or(too_large.clone());
            if let Err(error) =
                additional.and_then(|n| leaves_level.try_reserve(n).map_err(|_| too_large))
            {
                result = Err(error);
                break;
            }
            for _ in count..position {
                leaves_level.extend_from_slice(hole.as_bytes());
            }
            leaves_level.extend_from_slice(digest.as_bytes());
            count = position + 1;
        }
        match self.levels.first_mut() {
            Some(level) => *level = leaves_level,
            None => self.levels.push(leaves_level),
        }
        if count > old_count
            && let Err(error) = self.grow_interior(count)
        {
            // Undo the growth rather than leave level 0 longer than the levels above.
            if let Some(leaves_level) = self.levels.first_mut() {
                leaves_level.truncate(old_count * digest_len);
            }
            count = old_count;
            result = Err(error);
        }
        if count == 0 {
            self.levels.clear();
            return result;
        }
        if dirty.is_empty() && count == old_count {
            return result;
        }
        self.leaf_count = count as u64;
        dirty.sort_unstable();
        dirty.dedup();
        self.propagate(dirty, old_count);
        self.refresh_root();
        result
    }

    /// Sizes levels 1.. for `leaf_count` leaves (level 0 already has them), adding
    /// levels as needed. Allocates everything before changing anything, so failure
    /// leaves the interior as it was.
    fn grow_interior(&mut self, leaf_count: usize) -> Result<(), MerkleError> {
        let digest_len = self.algorithm.output_len();
        let lens = level_lens(leaf_count);
        let too_large = MerkleError::TooLarge {
            index: leaf_count.saturating_sub(1) as u64,
        };
        let mut new_levels = Vec::new();
        for (k, &len) in lens.iter().enumerate().skip(1) {
            let bytes = len.checked_mul(digest_len).ok_or(too_large.clone())?;
            match self.levels.get_mut(k) {
                Some(level) => level
                    .try_reserve(bytes.saturating_sub(level.len()))
                    .map_err(|_| too_large.clone())?,
                None => {
                    let mut level = Vec::new();
                    level
                        .try_reserve_exact(bytes)
                        .map_err(|_| too_large.clone())?;
                    new_levels.push(level);
                }
            }
        }
        self.levels.extend(new_levels);
        for (level, &len) in self.levels.iter_mut().zip(&lens).skip(1) {
            // Zeros are placeholders: the grown part is the dirty tail, recomputed next.
            level.resize(len * digest_len, 0);
        }
        Ok(())
    }

    /// Recomputes, level by level, the parents of the sorted, deduplicated leaf indices
    /// in `dirty` and every node at or past index `tail` of level 0 (and the
    /// corresponding tails above). Each dirty node is computed once.
    fn propagate(&mut self, mut dirty: Vec<usize>, mut tail: usize) {
        let algorithm = self.algorithm;
        let digest_len = algorithm.output_len();
        let mut hashes = 0u64;
        for k in 1..self.levels.len() {
            let (lower, upper) = self.levels.split_at_mut(k);
            let (Some(child), Some(parent)) = (lower.last(), upper.first_mut()) else {
                break;
            };
            let child_len = child.len() / digest_len;
            let parent_len = parent.len() / digest_len;
            for index in dirty.iter_mut() {
                *index /= 2;
            }
            dirty.dedup();
            // An empty tail stays empty: halving the length of an odd level would
            // otherwise mark its last parent, and then the last node of every level
            // above, spending hashes on nodes nothing changed.
            tail = if tail >= child_len {
                parent_len
            } else {
                tail / 2
            };
            let explicit = dirty.partition_point(|&index| index < tail);
            dirty.truncate(explicit);
            let nodes = dirty.len() + parent_len.saturating_sub(tail);
            if nodes < BATCHED_NODES_MIN {
                for index in dirty.iter().copied().chain(tail..parent_len) {
                    let out = &mut parent[index * digest_len..][..digest_len];
                    hashes += compute_node(algorithm, digest_len, child, child_len, index, out);
                }
                continue;
            }
            // A level's nodes are hashed together (`hash_many` runs several
            // SHA-NI lanes at once): hashing them one by one cost a digest
            // context each, most of a 65-byte message's time.
            let mut pairs = Vec::with_capacity(nodes);
            for index in dirty.iter().copied().chain(tail..parent_len) {
                if 2 * index + 1 < child_len {
                    pairs.push(index);
                } else {
                    let out = &mut parent[index * digest_len..][..digest_len];
                    compute_node(algorithm, digest_len, child, child_len, index, out);
                }
            }
            // In chunks, so rebuilding a large tree does not hold a message
            // and a digest per node of a level at once.
            for chunk in pairs.chunks(BATCHED_NODES_MAX) {
                let messages: Vec<[&[u8]; 3]> = chunk
                    .iter()
                    .map(|&index| {
                        let left = &child[2 * index * digest_len..][..2 * digest_len];
                        let (left, right) = left.split_at(digest_len);
                        [&[NODE_TAG][..], left, right]
                    })
                    .collect();
                let parts: Vec<&[&[u8]]> = messages.iter().map(|message| &message[..]).collect();
                for (index, digest) in chunk.iter().zip(algorithm.hash_many(&parts)) {
                    parent[index * digest_len..][..digest_len].copy_from_slice(digest.as_bytes());
                }
            }
            hashes += pairs.len() as u64;
        }
        self.hash_count = self.hash_count.saturating_add(hashes);
    }

    fn refresh_root(&mut self) {
        let top = self.levels.last().map_or(&[][..], Vec::as_slice);
        self.root = root_hash(self.algorithm, self.leaf_count, top);
        self.hash_count = self.hash_count.saturating_add(1);
    }

    /// Shrinks the tree to its first `leaf_count` leaves (a file truncate) and
    /// recomputes the nodes whose subtree lost leaves: at most one per level. Does
    /// nothing if the tree has no more than `leaf_count` leaves; growth happens through
    /// the update methods.
    pub fn truncate(&mut self, leaf_count: u64) {
        if leaf_count >= self.leaf_count {
            return;
        }
        // Smaller than the current count, which fits in usize.
        let count = leaf_count as usize;
        let digest_len = self.algorithm.output_len();
        let lens = level_lens(count);
        self.levels.truncate(lens.len());
        for (level, &len) in self.levels.iter_mut().zip(&lens) {
            level.truncate(len * digest_len);
        }
        self.leaf_count = leaf_count;
        let mut hashes = 0u64;
        for k in 1..self.levels.len() {
            // The last node of level k covers the leaves from its first one to
            // `count`; it lost leaves exactly when 2^k does not divide `count`. All
            // other nodes cover whole, unchanged subtrees.
            if count.is_multiple_of(1usize << k) {
                continue;
            }
            let (lower, upper) = self.levels.split_at_mut(k);
            let (Some(child), Some(parent)) = (lower.last(), upper.first_mut()) else {
                break;
            };
            let child_len = child.len() / digest_len;
            let last = (parent.len() / digest_len).saturating_sub(1);
            let out = &mut parent[last * digest_len..][..digest_len];
            hashes += compute_node(self.algorithm, digest_len, child, child_len, last, out);
        }
        self.hash_count = self.hash_count.saturating_add(hashes);
        self.refresh_root();
    }

    /// Recomputes every interior level and the root from the leaves. The reference
    /// against which the incremental updates are tested.
    pub fn rebuild(&mut self) {
        self.propagate(Vec::new(), 0);
        self.refresh_root();
    }

    /// The proof for leaf `index`: its siblings bottom-up, read from the stored levels.
    ///
    /// # Errors
    /// [`MerkleError::IndexOutOfRange`] if `index` is not a leaf.
    pub fn proof(&self, index: u64) -> Result<MerkleProof, MerkleError> {
        let out_of_range = MerkleError::IndexOutOfRange {
            index,
            leaf_count: self.leaf_count,
        };
        if index >= self.leaf_count {
            return Err(out_of_range);
        }
        let mut siblings = Vec::with_capacity(self.levels.len());
        walk_path(self.leaf_count, index, |level, position, _| {
            let bytes = self.node(level, position)?;
            siblings.push(Digest::from_slice(self.algorithm, bytes));
            Some(())
        })
        .ok_or(out_of_range)?;
        Ok(MerkleProof {
            algorithm: self.algorithm,
            leaf_count: self.leaf_count,
            index,
            siblings,
        })
    }

    fn node(&self, level: usize, position: u64) -> Option<&[u8]> {
        let len = self.algorithm.output_len();
        let start = usize::try_from(position).ok()?.checked_mul(len)?;
        self.levels.get(level)?.get(start..)?.get(..len)
    }

    /// Verifies `record` as leaf `index` against `expected_root`, the root from the
    /// signed metadata, using this tree's stored siblings: O(log n) hashes. The tree may
    /// come from an untrusted store; only the signed root is trusted, so a tampered
    /// record, sibling, leaf count or position all fail.
    ///
    /// # Errors
    /// [`MerkleError::Mismatch`] if the recomputed root differs,
    /// [`MerkleError::IndexOutOfRange`] if `index` is not a leaf of this tree and
    /// [`MerkleError::AlgorithmMismatch`] if `expected_root` is of another algorithm.
    pub fn verify(
        &self,
        index: u64,
        record: &[u8],
        expected_root: &Digest,
    ) -> Result<(), MerkleError> {
        if expected_root.algorithm() != self.algorithm {
            return Err(MerkleError::AlgorithmMismatch {
                expected: self.algorithm,
                found: expected_root.algorithm(),
            });
        }
        if index >= self.leaf_count {
            return Err(MerkleError::IndexOutOfRange {
                index,
                leaf_count: self.leaf_count,
            });
        }
        let leaf = MerkleTree::leaf_hash(self.algorithm, record);
        let root = fold_path(
            self.algorithm,
            self.leaf_count,
            index,
            leaf,
            |level, position| self.node(level, position),
        )
        .ok_or_else(|| MerkleError::Malformed("a sibling is missing from the tree".into()))?;
        if root == *expected_root {
            Ok(())
        } else {
            Err(MerkleError::Mismatch { index })
        }
    }

    /// Checks that every stored interior node is the hash of its children and that the
    /// tree hashes to `expected_root` (n hashes). A writer that loads a tree from an
    /// untrusted Merkle sector calls this before updating it: [`verify`](Self::verify)
    /// only vouches for one path, and new roots computed over forged siblings would
    /// make the other sectors unverifiable.
    ///
    /// # Errors
    /// [`MerkleError::RootMismatch`] if any node or the root differs, and
    /// [`MerkleError::AlgorithmMismatch`] if `expected_root` is of another algorithm.
    pub fn verify_all(&self, expected_root: &Digest) -> Result<(), MerkleError> {
        if expected_root.algorithm() != self.algorithm {
            return Err(MerkleError::AlgorithmMismatch {
                expected: self.algorithm,
                found: expected_root.algorithm(),
            });
        }
        let digest_len = self.algorithm.output_len();
        let mut node = [0u8; MAX_DIGEST_LEN];
        let node = &mut node[..digest_len];
        for pair in self.levels.windows(2) {
            let [child, parent] = pair else {
                continue;
            };
            let child_len = child.len() / digest_len;
            for (index, stored) in parent.chunks_exact(digest_len).enumerate() {
                compute_node(self.algorithm, digest_len, child, child_len, index, node);
                if node != stored {
                    return Err(MerkleError::RootMismatch);
                }
            }
        }
        let top = self.levels.last().map_or(&[][..], Vec::as_slice);
        if root_hash(self.algorithm, self.leaf_count, top) == *expected_root {
            Ok(())
        } else {
            Err(MerkleError::RootMismatch)
        }
    }
}

/// How a [`MerkleTree`] is written: its levels as they are, so a reader can verify a
/// sector without rehashing anything but one path.
#[derive(Serialize)]
struct MerkleTreeReprRef<'a> {
    algorithm: HashAlgorithm,
    leaf_count: u64,
    levels: Vec<&'a serde_bytes::Bytes>,
}

/// The owned form of [`MerkleTreeReprRef`], checked by `TryFrom` before it becomes a
/// tree.
#[derive(Deserialize)]
struct MerkleTreeRepr {
    algorithm: HashAlgorithm,
    leaf_count: u64,
    levels: Vec<serde_bytes::ByteBuf>,
}

impl Serialize for MerkleTree {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MerkleTreeReprRef {
            algorithm: self.algorithm,
            leaf_count: self.leaf_count,
            levels: self
                .levels
                .iter()
                .map(|level| serde_bytes::Bytes::new(level))
                .collect(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for MerkleTree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = MerkleTreeRepr::deserialize(deserializer)?;
        MerkleTree::try_from(repr).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<MerkleTreeRepr> for MerkleTree {
    type Error = MerkleError;

    /// Accepts the levels only if their number and sizes are exactly those of a tree
    /// of `leaf_count` leaves. Their content is not checked here (that costs n hashes);
    /// verification against the signed root catches forged nodes.
    fn try_from(repr: MerkleTreeRepr) -> Result<Self, Self::Error> {
        let MerkleTreeRepr {
            algorithm,
            leaf_count,
            levels,
        } = repr;
        let digest_len = algorithm.output_len() as u64;
        if leaf_count > MAX_LEAF_COUNT {
            return Err(MerkleError::Malformed(format!(
                "{leaf_count} leaves exceeds the limit of {MAX_LEAF_COUNT}"
            )));
        }
        // The claimed count is checked against bytes actually present, level by level,
        // before anything is sized from it.
        let mut expected_len = leaf_count;
        let mut level_count = 0usize;
        let mut remaining = levels.iter();
        while expected_len > 0 {
            let Some(level) = remaining.next() else {
                return Err(MerkleError::Malformed(format!(
                    "{} levels for {leaf_count} leaves",
                    levels.len()
                )));
            };
            let expected_bytes = expected_len.checked_mul(digest_len);
            if expected_bytes != Some(level.len() as u64) {
                return Err(MerkleError::Malformed(format!(
                    "level {level_count} has {} bytes, not {expected_len} {algorithm:?} digests",
                    level.len()
                )));
            }
            level_count += 1;
            expected_len = if expected_len == 1 {
                0
            } else {
                expected_len.div_ceil(2)
            };
        }
        if remaining.next().is_some() {
            return Err(MerkleError::Malformed(format!(
                "{} levels for {leaf_count} leaves, expected {level_count}",
                levels.len()
            )));
        }
        let levels: Vec<Vec<u8>> = levels.into_iter().map(|level| level.into_vec()).collect();
        let top = levels.last().map_or(&[][..], Vec::as_slice);
        let root = root_hash(algorithm, leaf_count, top);
        Ok(MerkleTree {
            algorithm,
            leaf_count,
            levels,
            root,
            hole: MerkleTree::leaf_hash(algorithm, &[]),
            hash_count: 0,
        })
    }
}

impl Encodable for MerkleTree {
    const KIND: Kind = Kind::MerkleTree;
    // A tree holds about two digests per sector: 2^30 bytes covers 16 million
    // SHA-256 sectors.
    const MAX_LEN: usize = 1 << 30;
}

/// The path from one leaf to the root, to send a sector with what verifies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "MerkleProofRepr")]
pub struct MerkleProof {
    algorithm: HashAlgorithm,
    leaf_count: u64,
    index: u64,
    /// Bottom-up, one for each level where the path's node has a sibling.
    siblings: Vec<Digest>,
}

/// The unchecked form of a decoded [`MerkleProof`]; same fields.
#[derive(Deserialize)]
struct MerkleProofRepr {
    algorithm: HashAlgorithm,
    leaf_count: u64,
    index: u64,
    siblings: Vec<Digest>,
}

impl TryFrom<MerkleProofRepr> for MerkleProof {
    type Error = MerkleError;

    fn try_from(repr: MerkleProofRepr) -> Result<Self, Self::Error> {
        MerkleProof::new(repr.algorithm, repr.leaf_count, repr.index, repr.siblings)
    }
}

impl MerkleProof {
    /// A proof from its parts, checked for consistency: `index` is below `leaf_count`,
    /// which is within [`MAX_LEAF_COUNT`], there is exactly one sibling per level where
    /// the path has one, and every sibling is of `algorithm`. Whether the proof is
    /// *valid* is for [`verify`](Self::verify) to say.
    ///
    /// # Errors
    /// [`MerkleError::IndexOutOfRange`], [`MerkleError::AlgorithmMismatch`] or
    /// [`MerkleError::Malformed`] when the parts are inconsistent.
    pub fn new(
        algorithm: HashAlgorithm,
        leaf_count: u64,
        index: u64,
        siblings: Vec<Digest>,
    ) -> Result<MerkleProof, MerkleError> {
        if leaf_count > MAX_LEAF_COUNT {
            return Err(MerkleError::Malformed(format!(
                "{leaf_count} leaves exceeds the limit of {MAX_LEAF_COUNT}"
            )));
        }
        if index >= leaf_count {
            return Err(MerkleError::IndexOutOfRange { index, leaf_count });
        }
        let expected = sibling_count(leaf_count, index);
        if siblings.len() != expected {
            return Err(MerkleError::Malformed(format!(
                "{} siblings for sector {index} of {leaf_count}, expected {expected}",
                siblings.len()
            )));
        }
        if let Some(sibling) = siblings.iter().find(|s| s.algorithm() != algorithm) {
            return Err(MerkleError::AlgorithmMismatch {
                expected: algorithm,
                found: sibling.algorithm(),
            });
        }
        Ok(MerkleProof {
            algorithm,
            leaf_count,
            index,
            siblings,
        })
    }

    /// The hash algorithm of the tree the proof comes from.
    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The leaf count of the tree the proof comes from (bound into the root).
    pub fn leaf_count(&self) -> u64 {
        self.leaf_count
    }

    /// The leaf index the proof is for.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The sibling digests, bottom-up.
    pub fn siblings(&self) -> &[Digest] {
        &self.siblings
    }

    /// Verifies `record` as leaf [`index`](Self::index) against `expected_root`, the
    /// root from the signed metadata: O(log n) hashes.
    ///
    /// # Errors
    /// [`MerkleError::Mismatch`] if the recomputed root differs and
    /// [`MerkleError::AlgorithmMismatch`] if `expected_root` is of another algorithm.
    pub fn verify(&self, record: &[u8], expected_root: &Digest) -> Result<(), MerkleError> {
        if expected_root.algorithm() != self.algorithm {
            return Err(MerkleError::AlgorithmMismatch {
                expected: self.algorithm,
                found: expected_root.algorithm(),
            });
        }
        let leaf = MerkleTree::leaf_hash(self.algorithm, record);
        let mut siblings = self.siblings.iter();
        let root = fold_path(self.algorithm, self.leaf_count, self.index, leaf, |_, _| {
            siblings.next().map(Digest::as_bytes)
        });
        // The constructor fixed the sibling count, so none is missing or left over;
        // checked anyway so a wrong count can never verify.
        match root {
            Some(root) if siblings.next().is_none() && root == *expected_root => Ok(()),
            _ => Err(MerkleError::Mismatch { index: self.index }),
        }
    }
}

impl Encodable for MerkleProof {
    const KIND: Kind = Kind::MerkleProof;
}

#[cfg(test)]
// A failed unwrap is a failed test.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::encoding::{self, DecodeError};

    const ALGORITHMS: [HashAlgorithm; 2] = [HashAlgorithm::Sha256, HashAlgorithm::Sha512];

    fn record(index: u64) -> Vec<u8> {
        format!("sector {index}").into_bytes()
    }

    fn h(algorithm: HashAlgorithm, parts: &[&[u8]]) -> Digest {
        algorithm.hash(parts)
    }

    fn node(algorithm: HashAlgorithm, left: &Digest, right: &Digest) -> Digest {
        h(algorithm, &[&[1], left.as_bytes(), right.as_bytes()])
    }

    fn root_of(algorithm: HashAlgorithm, count: u64, top: &Digest) -> Digest {
        h(algorithm, &[&[2], &count.to_be_bytes(), top.as_bytes()])
    }

    /// The root computed straight from the definition, independent of the tree.
    fn reference_root(algorithm: HashAlgorithm, leaves: &[Digest]) -> Digest {
        if leaves.is_empty() {
            return h(algorithm, &[&[2], &0u64.to_be_bytes()]);
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| match pair {
                    [left, right] => node(algorithm, left, right),
                    [single] => *single,
                    _ => unreachable!(),
                })
                .collect();
        }
        root_of(algorithm, leaves.len() as u64, &level[0])
    }

    fn tree_with(algorithm: HashAlgorithm, count: u64) -> MerkleTree {
        let records: Vec<Vec<u8>> = (0..count).map(record).collect();
        let mut tree = MerkleTree::new(algorithm);
        tree.update_batch(records.iter().enumerate().map(|(i, r)| (i as u64, &r[..])))
            .unwrap();
        tree
    }

    fn leaves_of(tree: &MerkleTree) -> Vec<Digest> {
        (0..tree.leaf_count())
            .map(|i| tree.leaf(i).unwrap())
            .collect()
    }

    fn assert_all_verify(tree: &MerkleTree) {
        let root = tree.root();
        for i in 0..tree.leaf_count() {
            tree.verify(i, &record(i), &root).unwrap();
            let proof = tree.proof(i).unwrap();
            proof.verify(&record(i), &root).unwrap();
            let decoded: MerkleProof = encoding::decode(&encoding::encode(&proof)).unwrap();
            assert_eq!(decoded, proof);
            decoded.verify(&record(i), &root).unwrap();
            assert!(proof.verify(b"other", &root).is_err());
        }
        tree.verify_all(&root).unwrap();
    }

    #[test]
    fn empty_tree() {
        for algorithm in ALGORITHMS {
            let tree = MerkleTree::new(algorithm);
            assert_eq!(tree.leaf_count(), 0);
            assert_eq!(tree.root(), h(algorithm, &[&[2], &[0; 8]]));
            assert_eq!(tree.root(), reference_root(algorithm, &[]));
            assert_eq!(
                tree.proof(0),
                Err(MerkleError::IndexOutOfRange {
                    index: 0,
                    leaf_count: 0
                })
            );
            assert!(matches!(
                tree.verify(0, b"", &tree.root()),
                Err(MerkleError::IndexOutOfRange { .. })
            ));
            let decoded: MerkleTree = encoding::decode(&encoding::encode(&tree)).unwrap();
            assert_eq!(decoded, tree);
            assert_eq!(decoded.root(), tree.root());
            tree.verify_all(&tree.root()).unwrap();
        }
    }

    #[test]
    fn one_leaf() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 1);
        let leaf = MerkleTree::leaf_hash(algorithm, &record(0));
        assert_eq!(leaf, h(algorithm, &[&[0], &record(0)]));
        assert_eq!(tree.root(), root_of(algorithm, 1, &leaf));
        assert!(tree.proof(0).unwrap().siblings().is_empty());
        assert_all_verify(&tree);
    }

    #[test]
    fn two_leaves() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 2);
        let [l0, l1] = [0, 1].map(|i| MerkleTree::leaf_hash(algorithm, &record(i)));
        assert_eq!(
            tree.root(),
            root_of(algorithm, 2, &node(algorithm, &l0, &l1))
        );
        assert_eq!(tree.proof(0).unwrap().siblings(), &[l1]);
        assert_eq!(tree.proof(1).unwrap().siblings(), &[l0]);
        assert_all_verify(&tree);
    }

    #[test]
    fn three_leaves_promote_the_last() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 3);
        let [l0, l1, l2] = [0, 1, 2].map(|i| MerkleTree::leaf_hash(algorithm, &record(i)));
        let n01 = node(algorithm, &l0, &l1);
        assert_eq!(
            tree.root(),
            root_of(algorithm, 3, &node(algorithm, &n01, &l2))
        );
        // Leaf 2 is promoted at level 0: its only sibling is one level up.
        assert_eq!(tree.proof(2).unwrap().siblings(), &[n01]);
        assert_eq!(tree.proof(0).unwrap().siblings(), &[l1, l2]);
        assert_all_verify(&tree);
    }

    #[test]
    fn five_and_seven_leaves() {
        let algorithm = HashAlgorithm::Sha256;
        let l: Vec<Digest> = (0..7)
            .map(|i| MerkleTree::leaf_hash(algorithm, &record(i)))
            .collect();
        let tree = tree_with(algorithm, 5);
        // Leaf 4 is promoted twice, then paired with the left four.
        let left = node(
            algorithm,
            &node(algorithm, &l[0], &l[1]),
            &node(algorithm, &l[2], &l[3]),
        );
        assert_eq!(
            tree.root(),
            root_of(algorithm, 5, &node(algorithm, &left, &l[4]))
        );
        assert_eq!(tree.proof(4).unwrap().siblings(), &[left]);
        assert_all_verify(&tree);

        let tree = tree_with(algorithm, 7);
        let n45 = node(algorithm, &l[4], &l[5]);
        let right = node(algorithm, &n45, &l[6]);
        assert_eq!(
            tree.root(),
            root_of(algorithm, 7, &node(algorithm, &left, &right))
        );
        assert_eq!(tree.proof(6).unwrap().siblings(), &[n45, left]);
        assert_all_verify(&tree);
    }

    #[test]
    fn matches_the_reference_for_small_counts() {
        for algorithm in ALGORITHMS {
            for count in 0..40 {
                let tree = tree_with(algorithm, count);
                assert_eq!(
                    tree.root(),
                    reference_root(algorithm, &leaves_of(&tree)),
                    "{count} leaves"
                );
                assert_eq!(tree.root().as_bytes().len(), algorithm.output_len());
                assert_all_verify(&tree);
            }
        }
    }

    #[test]
    fn sha512_is_distinct_and_checked() {
        let sha256 = tree_with(HashAlgorithm::Sha256, 5);
        let sha512 = tree_with(HashAlgorithm::Sha512, 5);
        assert_eq!(sha512.root().algorithm(), HashAlgorithm::Sha512);
        assert_eq!(sha512.leaf(0).unwrap().as_bytes().len(), 64);
        assert_eq!(
            sha512.verify(0, &record(0), &sha256.root()),
            Err(MerkleError::AlgorithmMismatch {
                expected: HashAlgorithm::Sha512,
                found: HashAlgorithm::Sha256
            })
        );
        let mut tree = MerkleTree::new(HashAlgorithm::Sha512);
        assert!(matches!(
            tree.update_leaf_hashes([(0, MerkleTree::leaf_hash(HashAlgorithm::Sha256, b""))]),
            Err(MerkleError::AlgorithmMismatch { .. })
        ));
        assert_eq!(tree.leaf_count(), 0);
    }

    #[test]
    fn holes_are_empty_records() {
        let algorithm = HashAlgorithm::Sha256;
        let mut tree = MerkleTree::new(algorithm);
        tree.update(5, b"five").unwrap();
        assert_eq!(tree.leaf_count(), 6);
        let hole = MerkleTree::leaf_hash(algorithm, b"");
        assert_eq!(hole, h(algorithm, &[&[0]]));
        for i in 0..5 {
            assert_eq!(tree.leaf(i), Some(hole));
            tree.verify(i, b"", &tree.root()).unwrap();
        }
        tree.verify(5, b"five", &tree.root()).unwrap();
        assert_eq!(tree.root(), reference_root(algorithm, &leaves_of(&tree)));
        // Filling a hole later equals writing it from the start.
        tree.update(2, b"two").unwrap();
        let mut direct = MerkleTree::new(algorithm);
        direct
            .update_batch([(2, &b"two"[..]), (5, b"five")])
            .unwrap();
        assert_eq!(tree, direct);
        assert_eq!(tree.root(), direct.root());
    }

    #[test]
    fn growth_one_leaf_at_a_time() {
        for algorithm in ALGORITHMS {
            let mut tree = MerkleTree::new(algorithm);
            for i in 0..70 {
                tree.update(i, &record(i)).unwrap();
                assert_eq!(tree.root(), reference_root(algorithm, &leaves_of(&tree)));
                let mut rebuilt = tree.clone();
                rebuilt.rebuild();
                assert_eq!(rebuilt, tree);
            }
            assert_all_verify(&tree);
        }
    }

    #[test]
    fn truncate_recomputes_the_cut_nodes() {
        for algorithm in ALGORITHMS {
            for from in [1u64, 2, 3, 8, 13, 33] {
                for to in 0..=from + 1 {
                    let mut tree = tree_with(algorithm, from);
                    tree.truncate(to);
                    let expected = tree_with(algorithm, to.min(from));
                    assert_eq!(tree, expected, "{from} -> {to}");
                    assert_eq!(tree.root(), expected.root());
                    assert_all_verify(&tree);
                }
            }
            // A truncated tree's old root must not verify its surviving leaves.
            let tree = tree_with(algorithm, 8);
            let mut truncated = tree.clone();
            truncated.truncate(7);
            assert!(truncated.verify(0, &record(0), &tree.root()).is_err());
        }
    }

    #[test]
    fn truncate_touches_one_node_per_cut_level() {
        let mut tree = tree_with(HashAlgorithm::Sha256, 1 << 10);
        let before = tree.hash_count();
        // 1000 = 0b1111101000: the last nodes of levels 4..=10 lost leaves. Those of
        // levels 4 and 5 are promoted (levels 3 and 4 have 125 and 63 nodes), the
        // other five are rehashed, and so is the root.
        tree.truncate(1000);
        assert_eq!(tree.hash_count() - before, 6);
        assert_eq!(tree, tree_with(HashAlgorithm::Sha256, 1000));
    }

    #[test]
    fn limit_is_an_error() {
        let mut tree = tree_with(HashAlgorithm::Sha256, 3);
        let root = tree.root();
        for index in [MAX_LEAF_COUNT, u64::MAX] {
            assert_eq!(
                tree.update(index, b"x"),
                Err(MerkleError::TooLarge { index })
            );
        }
        assert_eq!(tree.root(), root);
        assert_eq!(tree.leaf_count(), 3);
        // Earlier entries of a failing batch stay applied and the tree stays consistent.
        assert!(
            tree.update_batch([(1, &b"new"[..]), (u64::MAX, b"x")])
                .is_err()
        );
        tree.verify(1, b"new", &tree.root()).unwrap();
        assert_eq!(
            tree.root(),
            reference_root(tree.algorithm(), &leaves_of(&tree))
        );
    }

    #[test]
    fn later_entries_win() {
        let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
        tree.update_batch([(1, &b"a"[..]), (0, b"b"), (1, b"c")])
            .unwrap();
        tree.verify(1, b"c", &tree.root()).unwrap();
        tree.verify(0, b"b", &tree.root()).unwrap();
    }

    #[test]
    fn batch_hashes_each_dirty_ancestor_once() {
        let algorithm = HashAlgorithm::Sha256;
        let depth = 14;
        let mut tree = MerkleTree::new(algorithm);
        let leaf = MerkleTree::leaf_hash(algorithm, b"");
        tree.update_leaf_hashes((0..1u64 << depth).map(|i| (i, leaf)))
            .unwrap();
        // A full power-of-two build: one hash per interior node, plus the root.
        assert_eq!(tree.hash_count(), (1 << depth) - 1 + 1);

        // Deterministic scatter of 128 indices (an LCG), with repeats.
        let mut state = 12345u64;
        let indices: Vec<u64> = (0..128)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) % (1 << depth)
            })
            .collect();
        let mut expected = 1; // the root
        for level in 1..=depth {
            let mut parents: Vec<u64> = indices.iter().map(|i| i >> level).collect();
            parents.sort_unstable();
            parents.dedup();
            expected += parents.len() as u64;
        }
        let before = tree.hash_count();
        let new_leaf = MerkleTree::leaf_hash(algorithm, b"new");
        tree.update_leaf_hashes(indices.iter().map(|&i| (i, new_leaf)))
            .unwrap();
        assert_eq!(tree.hash_count() - before, expected);
        let mut rebuilt = tree.clone();
        rebuilt.rebuild();
        assert_eq!(rebuilt, tree);
        assert_eq!(rebuilt.root(), tree.root());
    }

    #[test]
    fn single_update_hashes_one_path() {
        // 1000 leaves: levels of 1000, 500, 250, 125, 63, 32, ... nodes. The odd levels
        // must not drag their last nodes into an update elsewhere.
        let mut tree = tree_with(HashAlgorithm::Sha256, 1000);
        let before = tree.hash_count();
        tree.update(0, b"new").unwrap();
        // The leaf, one node per level above it (leaf 0 always has a sibling), the root.
        assert_eq!(tree.hash_count() - before, 1 + 10 + 1);
        // Leaf 999 is promoted at levels 3 and 4 (125 and 63 nodes): two hashes fewer.
        let before = tree.hash_count();
        tree.update(999, b"new").unwrap();
        assert_eq!(tree.hash_count() - before, 1 + 8 + 1);
        assert_eq!(tree.proof(999).unwrap().siblings().len(), 8);
        // Appending one leaf rehashes one path too: leaf 1000 of 1001 is promoted at
        // levels 0, 1, 2 and 4, so its path has six siblings.
        let before = tree.hash_count();
        tree.update(1000, b"appended").unwrap();
        assert_eq!(tree.proof(1000).unwrap().siblings().len(), 6);
        assert_eq!(tree.hash_count() - before, 1 + 6 + 1);
        let mut rebuilt = tree.clone();
        rebuilt.rebuild();
        assert_eq!(rebuilt, tree);
    }

    #[test]
    fn verify_catches_a_forged_tree() {
        let tree = tree_with(HashAlgorithm::Sha256, 9);
        let signed = tree.root();
        let mut forged = tree.clone();
        // Flip a bit of level-1 node 1 (over leaves 2 and 3).
        forged.levels[1][32] ^= 1;
        assert_eq!(forged.verify_all(&signed), Err(MerkleError::RootMismatch));
        // Paths that use the forged node as a sibling fail; leaves under it do not
        // read it, so they still verify.
        for i in 0..9 {
            let result = forged.verify(i, &record(i), &signed);
            if i < 2 {
                assert_eq!(result, Err(MerkleError::Mismatch { index: i }));
            } else {
                assert_eq!(result, Ok(()));
            }
        }
        // A wrong leaf count in an otherwise intact tree fails every sector.
        let mut shorter = tree.clone();
        shorter.truncate(8);
        assert!(shorter.verify_all(&signed).is_err());
        assert!(shorter.verify(0, &record(0), &signed).is_err());
    }

    #[test]
    fn debug_is_short() {
        let tree = tree_with(HashAlgorithm::Sha256, 1000);
        let text = format!("{tree:?}");
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("leaf_count: 1000"));
    }

    fn encode_repr(algorithm: HashAlgorithm, leaf_count: u64, levels: &[Vec<u8>]) -> Vec<u8> {
        let repr = MerkleTreeReprRef {
            algorithm,
            leaf_count,
            levels: levels.iter().map(|l| serde_bytes::Bytes::new(l)).collect(),
        };
        let mut bytes = vec![encoding::FORMAT_VERSION, Kind::MerkleTree as u8];
        bytes.extend(postcard::to_allocvec(&repr).unwrap());
        bytes
    }

    fn assert_malformed(bytes: &[u8]) {
        match encoding::decode::<MerkleTree>(bytes) {
            Err(DecodeError::Malformed { kind, .. }) => assert_eq!(kind, Kind::MerkleTree),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn tree_round_trip() {
        for algorithm in ALGORITHMS {
            for count in [1, 2, 3, 5, 7, 100] {
                let tree = tree_with(algorithm, count);
                let bytes = encoding::encode(&tree);
                assert_eq!(bytes, encode_repr(algorithm, count, &tree.levels));
                let decoded: MerkleTree = encoding::decode(&bytes).unwrap();
                assert_eq!(decoded, tree);
                assert_eq!(decoded.root(), tree.root());
                assert_eq!(decoded.hash_count(), 0);
                assert_all_verify(&decoded);
            }
        }
    }

    #[test]
    fn tree_decode_rejects_wrong_shapes() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 5);
        let levels = tree.levels.clone();
        // Trailing bytes.
        let mut bytes = encoding::encode(&tree);
        bytes.push(0);
        assert_eq!(
            encoding::decode::<MerkleTree>(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
        // Truncated body.
        let bytes = encoding::encode(&tree);
        assert_malformed(&bytes[..bytes.len() - 1]);
        // Wrong leaf count for the levels.
        assert_malformed(&encode_repr(algorithm, 4, &levels));
        assert_malformed(&encode_repr(algorithm, 6, &levels));
        assert_malformed(&encode_repr(algorithm, 0, &levels));
        // Wrong algorithm for the digest sizes.
        assert_malformed(&encode_repr(HashAlgorithm::Sha512, 5, &levels));
        // A level a byte short or long, a level missing or extra.
        for k in 0..levels.len() {
            let mut short = levels.clone();
            short[k].pop();
            assert_malformed(&encode_repr(algorithm, 5, &short));
            let mut long = levels.clone();
            long[k].push(0);
            assert_malformed(&encode_repr(algorithm, 5, &long));
        }
        assert_malformed(&encode_repr(algorithm, 5, &levels[..levels.len() - 1]));
        let mut extra = levels.clone();
        extra.push(levels[levels.len() - 1].clone());
        assert_malformed(&encode_repr(algorithm, 5, &extra));
        assert_malformed(&encode_repr(algorithm, 1, &[]));
        // An empty tree with levels.
        assert_malformed(&encode_repr(algorithm, 0, &[vec![]]));
        // Huge claimed counts with few bytes behind them are refused, not allocated.
        for count in [MAX_LEAF_COUNT, MAX_LEAF_COUNT + 1, 1 << 39, u64::MAX] {
            assert_malformed(&encode_repr(algorithm, count, &levels));
        }
        // A claimed level longer than the input.
        let mut bytes = encode_repr(algorithm, 1, &[vec![0; 32]]);
        // The level's length varint follows version, kind, algorithm, count, level count.
        assert_eq!(bytes[5], 32);
        bytes[5] = 0x7f;
        assert_malformed(&bytes);
        // Wrong kind.
        let mut bytes = encoding::encode(&tree);
        bytes[1] = Kind::MerkleProof as u8;
        assert!(matches!(
            encoding::decode::<MerkleTree>(&bytes),
            Err(DecodeError::WrongKind { .. })
        ));
    }

    fn encode_proof_parts(
        algorithm: HashAlgorithm,
        leaf_count: u64,
        index: u64,
        siblings: &[Digest],
    ) -> Vec<u8> {
        #[derive(Serialize)]
        struct Parts<'a> {
            algorithm: HashAlgorithm,
            leaf_count: u64,
            index: u64,
            siblings: &'a [Digest],
        }
        let mut bytes = vec![encoding::FORMAT_VERSION, Kind::MerkleProof as u8];
        bytes.extend(
            postcard::to_allocvec(&Parts {
                algorithm,
                leaf_count,
                index,
                siblings,
            })
            .unwrap(),
        );
        bytes
    }

    #[test]
    fn proof_decode_checks_consistency() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 5);
        let proof = tree.proof(1).unwrap();
        let siblings = proof.siblings().to_vec();
        assert_eq!(siblings.len(), 3);
        assert_eq!(
            encode_proof_parts(algorithm, 5, 1, &siblings),
            encoding::encode(&proof)
        );
        let reject = |bytes: Vec<u8>| {
            assert!(
                matches!(
                    encoding::decode::<MerkleProof>(&bytes),
                    Err(DecodeError::Malformed {
                        kind: Kind::MerkleProof,
                        ..
                    })
                ),
                "accepted {bytes:?}"
            );
        };
        reject(encode_proof_parts(algorithm, 5, 1, &siblings[..2]));
        reject(encode_proof_parts(
            algorithm,
            5,
            1,
            &[siblings.clone(), siblings.clone()].concat(),
        ));
        // Leaf 4 of 5 has one sibling only.
        reject(encode_proof_parts(algorithm, 5, 4, &siblings));
        reject(encode_proof_parts(algorithm, 5, 5, &siblings));
        reject(encode_proof_parts(algorithm, 0, 0, &[]));
        reject(encode_proof_parts(algorithm, u64::MAX, 1, &siblings));
        reject(encode_proof_parts(HashAlgorithm::Sha512, 5, 1, &siblings));
        let mut mixed = siblings.clone();
        mixed[1] = MerkleTree::leaf_hash(HashAlgorithm::Sha512, b"");
        reject(encode_proof_parts(algorithm, 5, 1, &mixed));
        let mut bytes = encoding::encode(&proof);
        bytes.push(0);
        assert_eq!(
            encoding::decode::<MerkleProof>(&bytes),
            Err(DecodeError::TrailingBytes(1))
        );
        // The same checks guard the constructor.
        assert!(MerkleProof::new(algorithm, 5, 4, siblings.clone()).is_err());
        let rebuilt = MerkleProof::new(algorithm, 5, 1, siblings).unwrap();
        assert_eq!(rebuilt, proof);
    }

    #[test]
    fn proof_binds_count_and_position() {
        let algorithm = HashAlgorithm::Sha256;
        let tree = tree_with(algorithm, 6);
        let root = tree.root();
        let proof = tree.proof(5).unwrap();
        // The same siblings claimed for a tree of 5 or 7 leaves fail (where the shape
        // even allows them).
        for count in [5, 7, 8] {
            if let Ok(lying) = MerkleProof::new(
                algorithm,
                count,
                5.min(count - 1),
                proof.siblings().to_vec(),
            ) {
                assert!(lying.verify(&record(5), &root).is_err());
            }
        }
        let lying = MerkleProof::new(algorithm, 6, 4, proof.siblings().to_vec()).unwrap();
        assert_eq!(
            lying.verify(&record(5), &root),
            Err(MerkleError::Mismatch { index: 4 })
        );
    }
}
