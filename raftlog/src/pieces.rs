//! A file's Merkle tree as stored: only its leaves, in pieces of
//! [`MERKLE_PIECE_BYTES`], one engine record each (`SectorKind::Merkle(k)`).
//!
//! Interior nodes are recomputed when a tree is loaded (n hashes), so a batch that
//! changes a few sectors rewrites only the pieces holding their leaves, and a store
//! that altered a stored leaf is caught by the signed root.

use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use blocktree_core::sector::MERKLE_PIECE_BYTES;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};

/// Leaf digests in one piece for `algorithm`.
pub fn leaves_per_piece(algorithm: HashAlgorithm) -> u64 {
    (MERKLE_PIECE_BYTES / algorithm.output_len()) as u64
}

/// Pieces needed for `sector_count` leaves.
pub fn piece_count(algorithm: HashAlgorithm, sector_count: u64) -> u64 {
    sector_count.div_ceil(leaves_per_piece(algorithm))
}

/// The piece holding leaf `index`.
pub fn piece_of(algorithm: HashAlgorithm, index: u64) -> u64 {
    index / leaves_per_piece(algorithm)
}

/// The stored bytes of piece `piece` of `tree`.
pub fn piece_bytes(tree: &MerkleTree, piece: u64) -> Vec<u8> {
    let per = leaves_per_piece(tree.algorithm());
    tree.leaf_bytes(piece * per, (piece + 1) * per).to_vec()
}

/// The expected length of piece `piece` of a tree of `sector_count` leaves.
pub fn expected_piece_len(algorithm: HashAlgorithm, sector_count: u64, piece: u64) -> usize {
    let per = leaves_per_piece(algorithm);
    let start = piece * per;
    let leaves = sector_count.saturating_sub(start).min(per);
    leaves as usize * algorithm.output_len()
}

/// The pieces a batch must rewrite: those holding a changed leaf, plus the last
/// piece when the leaf count changed (it grew or shrank).
pub fn dirty_pieces(
    algorithm: HashAlgorithm,
    changed: impl IntoIterator<Item = u64>,
    old_count: u64,
    new_count: u64,
) -> BTreeSet<u64> {
    let mut dirty: BTreeSet<u64> = changed
        .into_iter()
        .filter(|&index| index < new_count)
        .map(|index| piece_of(algorithm, index))
        .collect();
    if old_count != new_count && new_count > 0 {
        let first = piece_of(algorithm, old_count.min(new_count).saturating_sub(1));
        let last = piece_of(algorithm, new_count - 1);
        dirty.extend(first..=last);
    }
    dirty
}

/// Work below this many bytes stays on the calling thread.
const PARALLEL_BYTES: usize = 256 * 1024;

/// Maps `items` with `work` on up to one thread per core, in order. Sector
/// hashing and sealing are CPU-bound and batches are large; small batches stay on
/// the caller, where spawning would cost more than it saves.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    bytes: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    parallel_map_chunks(items, bytes, |part| part.iter().map(&work).collect())
}

/// As [`parallel_map`], for work that is cheaper a chunk at a time (hashing records
/// together with [`MerkleTree::leaf_hashes`](blocktree_core::merkle::MerkleTree::leaf_hashes)):
/// `work` maps each thread's contiguous chunk of `items` to one result per item.
pub fn parallel_map_chunks<T: Sync, R: Send>(
    items: &[T],
    bytes: usize,
    work: impl Fn(&[T]) -> Vec<R> + Sync,
) -> Vec<R> {
    match Spread::start(items.len(), bytes) {
        None => work(items),
        Some(spread) => {
            let chunks = items.chunks(spread.chunk).collect();
            spread.run(chunks, &work)
        }
    }
}

/// As [`parallel_map_chunks`], for work that consumes its items (opening
/// fetched records in their own buffers): each thread's chunk is moved to it.
pub fn parallel_map_owned<T: Send, R: Send>(
    mut items: Vec<T>,
    bytes: usize,
    work: impl Fn(Vec<T>) -> Vec<R> + Sync,
) -> Vec<R> {
    match Spread::start(items.len(), bytes) {
        None => work(items),
        Some(spread) => {
            let mut chunks = Vec::new();
            while items.len() > spread.chunk {
                let rest = items.split_off(spread.chunk);
                chunks.push(std::mem::replace(&mut items, rest));
            }
            chunks.push(items);
            spread.run(chunks, &work)
        }
    }
}

/// A parallel map that spreads its work over the cores, holding [`SPREADING`].
struct Spread {
    /// Items per thread.
    chunk: usize,
    _active: ActiveMap,
}

impl Spread {
    /// `None` when the work stays on the calling thread: too small, one core,
    /// or another map is spreading already. Under concurrent load (an NBD
    /// client's queue of reads, several writers) the callers keep the cores
    /// busy already: a second map runs on its own thread rather than spawn
    /// helpers that would only take turns with it.
    fn start(items: usize, bytes: usize) -> Option<Spread> {
        if bytes < PARALLEL_BYTES || items < 2 {
            return None;
        }
        // Asked once: the answer reads cgroup files, too slow for every batch.
        static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads =
            *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads < 2 {
            return None;
        }
        Some(Spread {
            chunk: items.div_ceil(threads),
            _active: ActiveMap::enter()?,
        })
    }

    /// Runs `work` on each of `chunks`, in order. The caller takes the first
    /// chunk itself rather than wait idle: one thread fewer to spawn for every
    /// batch and every large read.
    fn run<C: Send, R: Send>(self, chunks: Vec<C>, work: &(impl Fn(C) -> Vec<R> + Sync)) -> Vec<R> {
        let mut chunks = chunks.into_iter();
        let Some(first) = chunks.next() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks.map(|part| scope.spawn(move || work(part))).collect();
            let mut results = work(first);
            for handle in handles {
                match handle.join() {
                    Ok(part) => results.extend(part),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            results
        })
    }
}

/// Whether a parallel map is spreading its work over the cores now: at most
/// one does at a time.
static SPREADING: AtomicBool = AtomicBool::new(false);

/// The parallel map that spreads its work, holding [`SPREADING`] until dropped.
struct ActiveMap;

impl ActiveMap {
    /// `None` if another map is spreading its work already.
    fn enter() -> Option<ActiveMap> {
        SPREADING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| ActiveMap)
    }
}

impl Drop for ActiveMap {
    fn drop(&mut self) {
        SPREADING.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_leaves_exactly() {
        let algorithm = HashAlgorithm::Sha256;
        assert_eq!(leaves_per_piece(algorithm), 128);
        assert_eq!(piece_count(algorithm, 0), 0);
        assert_eq!(piece_count(algorithm, 128), 1);
        assert_eq!(piece_count(algorithm, 129), 2);
        assert_eq!(expected_piece_len(algorithm, 129, 1), 32);
        assert_eq!(expected_piece_len(algorithm, 129, 2), 0);
    }

    #[test]
    fn parallel_maps_keep_the_order_of_their_items() {
        let items: Vec<u32> = (0..1001).collect();
        let doubled = parallel_map(&items, PARALLEL_BYTES * 4, |item| item * 2);
        assert_eq!(
            doubled,
            items.iter().map(|item| item * 2).collect::<Vec<_>>()
        );
        let small = parallel_map(&items[..3], 0, |item| item + 1);
        assert_eq!(small, vec![1, 2, 3]);
        let owned = parallel_map_owned(items.clone(), PARALLEL_BYTES * 4, |part| {
            part.into_iter().map(|item| item + 1).collect()
        });
        assert_eq!(owned, (1..1002).collect::<Vec<u32>>());
        let owned_small = parallel_map_owned(vec![7u32], PARALLEL_BYTES * 4, |part| part);
        assert_eq!(owned_small, vec![7]);
    }

    #[test]
    fn growth_dirties_every_new_piece() {
        let algorithm = HashAlgorithm::Sha256;
        let dirty = dirty_pieces(algorithm, [], 100, 300);
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        let dirty = dirty_pieces(algorithm, [5], 300, 130);
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }
}
