//! Crypto micro-benchmarks for issue #2: what Blocktree's sector sealing, leaf
//! hashing and Merkle updates cost.
//!
//! Each group is read by `benches/crypto.sh`, which runs it side by side with its
//! anchor (`openssl speed` on the same machine, in the same run) and reports the
//! ratio:
//!
//! - `seal/16KiB`: [`SectorSealer::seal`] of 16 KiB into a preallocated record,
//!   random nonce included; anchor `openssl speed -evp aes-256-gcm`.
//! - `open/16KiB`: [`SectorOpener::open`] of that record; same anchor.
//! - `sha256_leaf/16KiB`, `sha512_leaf/16KiB`: the Merkle leaf hash of a 16 KiB
//!   record; anchors `openssl speed -evp sha256` / `sha512`.
//! - `sha256_many/interleaved_8x16KiB` vs `sha256_many/one_by_one_8x16KiB`: the
//!   leaf hashes of eight 16 KiB records, by [`HashAlgorithm::hash_many`] (SHA-NI
//!   rounds of several records interleaved) vs one `hash` after another (aws-lc's
//!   single stream, what `openssl speed -evp sha256` runs).
//! - `seal_parts/*`: diagnostics that split `seal` into the bare aws-lc-rs AEAD call
//!   and the per-seal overhead (the random nonce), so a miss can be explained.
//! - `hash_parts/sha256_node_65B`: one interior-node hash (65 bytes), the unit of
//!   a Merkle update; anchor `openssl speed -evp sha256 -bytes 65`.
//! - `merkle/batched_1024_of_2^20` vs `merkle/single_1024_of_2^20`: 1,024 distinct
//!   random leaves of a 2^20-leaf SHA-256 tree updated in one batch vs one at a
//!   time (no outside anchor: the single updates are the anchor). Hashes per leaf
//!   go to stdout and to `merkle_hashes.json` in
//!   [`blocktree_benches::results_dir`].

use std::hint::black_box;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use blocktree_benches::{SECTOR_BYTES, SplitMix64, distinct_indices, random_bytes, write_result};
use blocktree_core::aead::{SymmetricKey, random_fill};
use blocktree_core::hash::{Digest, HashAlgorithm};
use blocktree_core::merkle::MerkleTree;
use blocktree_core::sector::{
    EPOCH_SEAL_LIMIT, RECORD_OVERHEAD, SectorId, SectorKind, SectorOpener, SectorSealer,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const BYTES: u64 = SECTOR_BYTES as u64;

fn sector(index: u64) -> SectorId {
    SectorId {
        generation: 1,
        inode: 42,
        sector: SectorKind::Data(index),
    }
}

fn key() -> SymmetricKey {
    SymmetricKey::generate().expect("key generation")
}

fn seal(c: &mut Criterion) {
    let key = key();
    let plaintext = random_bytes(1, SECTOR_BYTES);
    let id = sector(3);
    let mut record = vec![0u8; SECTOR_BYTES + RECORD_OVERHEAD];
    let mut group = c.benchmark_group("seal");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("16KiB", |b| {
        // A fresh sealer (seals_so_far = 0) per sample: a sample is far fewer than
        // EPOCH_SEAL_LIMIT (2^30) seals, so the epoch budget can never run out
        // mid-measurement. Key setup happens here, outside the timed loop.
        b.iter_custom(|iters| {
            assert!(
                iters < EPOCH_SEAL_LIMIT,
                "{iters} seals would exhaust the epoch"
            );
            let sealer = SectorSealer::new(0, &key, 0).expect("sealer");
            let start = Instant::now();
            for _ in 0..iters {
                sealer
                    .seal(
                        black_box(&id),
                        black_box(&plaintext),
                        black_box(&mut record),
                    )
                    .expect("seal");
            }
            start.elapsed()
        });
    });
    group.finish();
}

fn open(c: &mut Criterion) {
    let key = key();
    let id = sector(3);
    let sealer = SectorSealer::new(0, &key, 0).expect("sealer");
    let record = sealer
        .seal_to_vec(&id, &random_bytes(2, SECTOR_BYTES))
        .expect("seal");
    let mut opener = SectorOpener::new();
    opener.add_epoch(0, &key).expect("opener");
    let mut plaintext = vec![0u8; SECTOR_BYTES];
    let mut group = c.benchmark_group("open");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("16KiB", |b| {
        b.iter(|| {
            opener
                .open(
                    black_box(&id),
                    black_box(&record),
                    black_box(&mut plaintext),
                )
                .expect("open");
        });
    });
    group.finish();
}

fn leaf_hash(c: &mut Criterion, group_name: &str, algorithm: HashAlgorithm) {
    let record = random_bytes(3, SECTOR_BYTES);
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("16KiB", |b| {
        b.iter(|| MerkleTree::leaf_hash(black_box(algorithm), black_box(&record)));
    });
    group.finish();
}

fn sha256_leaf(c: &mut Criterion) {
    leaf_hash(c, "sha256_leaf", HashAlgorithm::Sha256);
}

fn sha512_leaf(c: &mut Criterion) {
    leaf_hash(c, "sha512_leaf", HashAlgorithm::Sha512);
}

/// How many records [`sha256_many`] hashes per batch.
const MANY: usize = 8;

fn sha256_many(c: &mut Criterion) {
    let records: Vec<Vec<u8>> = (0..MANY as u64)
        .map(|seed| random_bytes(10 + seed, SECTOR_BYTES))
        .collect();
    let tag = [0u8];
    let messages: Vec<[&[u8]; 2]> = records
        .iter()
        .map(|record| [&tag[..], &record[..]])
        .collect();
    let views: Vec<&[&[u8]]> = messages.iter().map(|parts| &parts[..]).collect();
    let mut group = c.benchmark_group("sha256_many");
    group.throughput(Throughput::Bytes(BYTES * MANY as u64));
    group.bench_function(format!("interleaved_{MANY}x16KiB"), |b| {
        b.iter(|| HashAlgorithm::Sha256.hash_many(black_box(&views)));
    });
    group.bench_function(format!("one_by_one_{MANY}x16KiB"), |b| {
        b.iter(|| {
            black_box(&views)
                .iter()
                .map(|parts| HashAlgorithm::Sha256.hash(parts))
                .collect::<Vec<Digest>>()
        });
    });
    group.finish();
}

/// Diagnostics: the AEAD call `seal` makes, with a counter nonce instead of a
/// random one, and the random nonce alone.
fn seal_parts(c: &mut Criterion) {
    let key = key();
    let raw = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_bytes()).expect("key"));
    let plaintext = random_bytes(1, SECTOR_BYTES);
    let aad = sector(3).to_bytes();
    let mut ciphertext = vec![0u8; SECTOR_BYTES];
    let mut tag = [0u8; 16];
    let mut group = c.benchmark_group("seal_parts");
    group.throughput(Throughput::Bytes(BYTES));
    group.bench_function("aws_lc_aead_16KiB", |b| {
        let mut counter = 0u64;
        b.iter(|| {
            counter += 1;
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&counter.to_le_bytes());
            raw.seal_out_of_place_scatter(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(black_box(aad)),
                black_box(&plaintext),
                black_box(&mut ciphertext),
                &[],
                &mut tag,
            )
            .expect("seal");
        });
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("random_nonce_12B", |b| {
        let mut nonce = [0u8; NONCE_LEN];
        b.iter(|| random_fill(black_box(&mut nonce)).expect("rng"));
    });
    group.finish();
}

/// Diagnostics: one interior-node hash, `H(0x01 || left || right)` over two
/// SHA-256 digests (65 bytes), the unit of work of a Merkle update; anchor
/// `openssl speed -evp sha256 -bytes 65`.
fn hash_parts(c: &mut Criterion) {
    let left = random_bytes(5, 32);
    let right = random_bytes(6, 32);
    let mut group = c.benchmark_group("hash_parts");
    group.throughput(Throughput::Bytes(65));
    group.bench_function("sha256_node_65B", |b| {
        b.iter(|| HashAlgorithm::Sha256.hash(&[&[1u8], black_box(&left), black_box(&right)]));
    });
    group.finish();
}

const TREE_LEAVES: u64 = 1 << 20;
const BATCH: usize = 1024;
/// Distinct batches cycled through, so successive iterations really change leaves.
const BATCHES: usize = 8;

fn random_digest(rng: &mut SplitMix64) -> Digest {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    Digest::from_slice(HashAlgorithm::Sha256, &bytes)
}

/// The 2^20-leaf tree and the update batches, built on first use: criterion runs a
/// group's setup even when a filter skips all its benchmarks, and this one takes
/// about a second.
struct MerkleBench {
    tree: MerkleTree,
    batches: Vec<Vec<(u64, Digest)>>,
    next: usize,
}

impl MerkleBench {
    fn build() -> MerkleBench {
        let mut rng = SplitMix64::new(4);
        let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
        tree.update_leaf_hashes((0..TREE_LEAVES).map(|index| (index, random_digest(&mut rng))))
            .expect("build");
        let batches: Vec<Vec<(u64, Digest)>> = (0..BATCHES)
            .map(|_| {
                distinct_indices(&mut rng, BATCH, TREE_LEAVES)
                    .into_iter()
                    .map(|index| (index, random_digest(&mut rng)))
                    .collect()
            })
            .collect();
        let mut bench = MerkleBench {
            tree,
            batches,
            next: 0,
        };
        bench.count_hashes();
        bench
    }

    /// Hashes per updated leaf both ways, from `hash_count` deltas, counted once
    /// outside any timing; printed and written to `merkle_hashes.json`.
    fn count_hashes(&mut self) {
        let before = self.tree.hash_count();
        self.batched(self.batches[0].clone());
        let batched = (self.tree.hash_count() - before) as f64 / BATCH as f64;
        let before = self.tree.hash_count();
        self.single(self.batches[1].clone());
        let single = (self.tree.hash_count() - before) as f64 / BATCH as f64;
        println!("merkle hashes/leaf: batched {batched:.2}, single {single:.2}");
        let json = format!(
            "{{\"leaves\":{TREE_LEAVES},\"batch\":{BATCH},\
             \"batched_hashes_per_leaf\":{batched},\"single_hashes_per_leaf\":{single}}}\n"
        );
        match write_result("merkle_hashes.json", &json) {
            Ok(path) => println!("wrote {}", path.display()),
            Err(error) => eprintln!("could not write merkle_hashes.json: {error}"),
        }
    }

    /// The next batch, cycling so that successive iterations change the leaves.
    fn next_batch(&mut self) -> Vec<(u64, Digest)> {
        self.next = (self.next + 1) % BATCHES;
        self.batches[self.next].clone()
    }

    fn batched(&mut self, batch: Vec<(u64, Digest)>) {
        self.tree.update_leaf_hashes(batch).expect("update");
        black_box(self.tree.root());
    }

    fn single(&mut self, batch: Vec<(u64, Digest)>) {
        for (index, digest) in batch {
            self.tree
                .update_leaf_hashes([(index, digest)])
                .expect("update");
            black_box(self.tree.root());
        }
    }
}

fn merkle(c: &mut Criterion) {
    let mut state: Option<MerkleBench> = None;
    let mut group = c.benchmark_group("merkle");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batched_1024_of_2^20", |b| {
        let bench = state.get_or_insert_with(MerkleBench::build);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch = bench.next_batch();
                let start = Instant::now();
                bench.batched(batch);
                total += start.elapsed();
            }
            total
        });
    });
    group.bench_function("single_1024_of_2^20", |b| {
        let bench = state.get_or_insert_with(MerkleBench::build);
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let batch = bench.next_batch();
                let start = Instant::now();
                bench.single(batch);
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
}

fn config() -> Criterion {
    // Short by default so benches/crypto.sh fits its repetitions in a few minutes;
    // the command line (--warm-up-time, --measurement-time) still overrides these.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
}

criterion_group! {
    name = benches;
    config = config();
    targets = seal, open, sha256_leaf, sha512_leaf, sha256_many, seal_parts, hash_parts, merkle
}
criterion_main!(benches);
