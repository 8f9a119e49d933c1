//! Property tests of the sector Merkle tree: incremental updates against rebuilds and
//! a from-the-definition reference, proofs, tamper detection and the encoding.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use blocktree_core::encoding::{self, DecodeError};
use blocktree_core::hash::{Digest, HashAlgorithm};
use blocktree_core::merkle::{MerkleError, MerkleProof, MerkleTree};
use proptest::prelude::*;

/// Trees stay around a few hundred leaves so the file runs in seconds in debug builds.
const MAX_INDEX: u64 = 300;

fn algorithm() -> impl Strategy<Value = HashAlgorithm> {
    prop_oneof![Just(HashAlgorithm::Sha256), Just(HashAlgorithm::Sha512)]
}

fn record() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..24)
}

/// Updates at arbitrary indices: with repeats, out of order and past the end.
fn updates(max_len: usize) -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    prop::collection::vec((0..MAX_INDEX, record()), 0..max_len)
}

fn borrowed(updates: &[(u64, Vec<u8>)]) -> impl Iterator<Item = (u64, &[u8])> {
    updates.iter().map(|(index, record)| (*index, &record[..]))
}

/// Records that are all distinct and non-empty, so no two leaves (or a leaf and a
/// hole) share a digest.
fn distinct_records(min: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(record(), min..MAX_INDEX as usize).prop_map(|records| {
        records
            .into_iter()
            .enumerate()
            .map(|(index, mut record)| {
                let mut bytes = (index as u64).to_be_bytes().to_vec();
                bytes.append(&mut record);
                bytes
            })
            .collect()
    })
}

fn tree_of(algorithm: HashAlgorithm, records: &[Vec<u8>]) -> MerkleTree {
    let mut tree = MerkleTree::new(algorithm);
    tree.update_batch(
        records
            .iter()
            .enumerate()
            .map(|(index, record)| (index as u64, &record[..])),
    )
    .unwrap();
    tree
}

fn leaves(tree: &MerkleTree) -> Vec<Digest> {
    (0..tree.leaf_count())
        .map(|index| tree.leaf(index).unwrap())
        .collect()
}

/// The root straight from the definition: pair nodes level by level, promote an odd
/// last node, then bind the leaf count.
fn reference_root(algorithm: HashAlgorithm, leaves: &[Digest]) -> Digest {
    let count = (leaves.len() as u64).to_be_bytes();
    let Some(first) = leaves.first() else {
        return algorithm.hash(&[&[2], &count]);
    };
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => algorithm.hash(&[&[1], left.as_bytes(), right.as_bytes()]),
                _ => pair[0],
            })
            .collect();
    }
    let top = level.first().unwrap_or(first);
    algorithm.hash(&[&[2], &count, top.as_bytes()])
}

/// The leaves a sequence of updates leaves behind, computed without a tree.
fn reference_leaves(algorithm: HashAlgorithm, updates: &[(u64, Vec<u8>)]) -> Vec<Digest> {
    let count = updates
        .iter()
        .map(|(index, _)| index + 1)
        .max()
        .unwrap_or(0);
    let mut leaves = vec![MerkleTree::leaf_hash(algorithm, b""); count as usize];
    for (index, record) in updates {
        leaves[*index as usize] = MerkleTree::leaf_hash(algorithm, record);
    }
    leaves
}

fn flip_bit(bytes: &mut [u8], bit: usize) {
    let bit = bit % (bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
}

fn flipped(digest: &Digest, bit: usize) -> Digest {
    let mut bytes = digest.as_bytes().to_vec();
    flip_bit(&mut bytes, bit);
    Digest::from_slice(digest.algorithm(), &bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn batched_update_equals_rebuild(
        algorithm in algorithm(),
        first in updates(200),
        second in updates(80),
    ) {
        let mut tree = MerkleTree::new(algorithm);
        tree.update_batch(borrowed(&first)).unwrap();
        tree.update_batch(borrowed(&second)).unwrap();

        let mut rebuilt = tree.clone();
        rebuilt.rebuild();
        prop_assert_eq!(&rebuilt, &tree);
        prop_assert_eq!(rebuilt.root(), tree.root());

        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        let expected = reference_leaves(algorithm, &all);
        prop_assert_eq!(&leaves(&tree), &expected);
        prop_assert_eq!(tree.root(), reference_root(algorithm, &expected));
        prop_assert!(tree.verify_all(&tree.root()).is_ok());
    }

    #[test]
    fn single_updates_equal_a_batch(
        algorithm in algorithm(),
        initial in updates(150),
        batch in updates(60),
    ) {
        let mut singles = MerkleTree::new(algorithm);
        singles.update_batch(borrowed(&initial)).unwrap();
        let mut batched = singles.clone();

        let before = singles.hash_count();
        for (index, record) in &batch {
            singles.update(*index, record).unwrap();
        }
        let single_hashes = singles.hash_count() - before;

        let before = batched.hash_count();
        batched.update_batch(borrowed(&batch)).unwrap();
        let batch_hashes = batched.hash_count() - before;

        prop_assert_eq!(&singles, &batched);
        prop_assert_eq!(singles.root(), batched.root());
        prop_assert!(
            batch_hashes <= single_hashes,
            "batch {} > singles {}", batch_hashes, single_hashes
        );
    }

    #[test]
    fn leaf_hash_updates_equal_record_updates(
        algorithm in algorithm(),
        batch in updates(100),
    ) {
        let mut by_record = MerkleTree::new(algorithm);
        by_record.update_batch(borrowed(&batch)).unwrap();
        let mut by_hash = MerkleTree::new(algorithm);
        by_hash
            .update_leaf_hashes(
                batch
                    .iter()
                    .map(|(index, record)| (*index, MerkleTree::leaf_hash(algorithm, record))),
            )
            .unwrap();
        prop_assert_eq!(&by_record, &by_hash);
        prop_assert_eq!(by_record.root(), by_hash.root());
    }

    #[test]
    fn truncate_equals_a_fresh_tree(
        algorithm in algorithm(),
        records in prop::collection::vec(record(), 0..MAX_INDEX as usize),
        keep in 0..MAX_INDEX + 10,
        later in updates(20),
    ) {
        let mut tree = tree_of(algorithm, &records);
        tree.truncate(keep);
        let kept = &records[..records.len().min(keep as usize)];
        let expected = tree_of(algorithm, kept);
        prop_assert_eq!(&tree, &expected);
        prop_assert_eq!(tree.root(), expected.root());
        // A truncated tree keeps growing correctly.
        tree.update_batch(borrowed(&later)).unwrap();
        let mut rebuilt = tree.clone();
        rebuilt.rebuild();
        prop_assert_eq!(&tree, &rebuilt);
        prop_assert_eq!(tree.root(), rebuilt.root());
    }

    #[test]
    fn every_proof_verifies(
        algorithm in algorithm(),
        records in prop::collection::vec(record(), 1..MAX_INDEX as usize),
        holes in prop::collection::vec(0..MAX_INDEX + 20, 0..5),
    ) {
        let mut tree = tree_of(algorithm, &records);
        let mut records = records;
        // Grow past the end so some leaves are holes (the empty record).
        for &index in &holes {
            if index >= tree.leaf_count() {
                tree.update(index, b"").unwrap();
            }
        }
        records.resize(tree.leaf_count() as usize, Vec::new());
        let root = tree.root();
        let decoded: MerkleTree = encoding::decode(&encoding::encode(&tree)).unwrap();
        for (index, record) in records.iter().enumerate() {
            let index = index as u64;
            tree.verify(index, record, &root).unwrap();
            decoded.verify(index, record, &root).unwrap();
            let proof = tree.proof(index).unwrap();
            prop_assert_eq!(proof.index(), index);
            prop_assert_eq!(proof.leaf_count(), tree.leaf_count());
            proof.verify(record, &root).unwrap();
            let bytes = encoding::encode(&proof);
            let proof_back: MerkleProof = encoding::decode(&bytes).unwrap();
            prop_assert_eq!(&proof_back, &proof);
            proof_back.verify(record, &root).unwrap();
        }
        let past = tree.leaf_count();
        prop_assert!(
            matches!(tree.proof(past), Err(MerkleError::IndexOutOfRange { .. })),
            "a proof past the end"
        );
        prop_assert!(tree.verify(past, b"", &root).is_err());
    }

    #[test]
    fn tampering_fails_verification(
        algorithm in algorithm(),
        records in distinct_records(2),
        pick in any::<prop::sample::Index>(),
        other in any::<prop::sample::Index>(),
        bit in any::<usize>(),
        sibling in any::<prop::sample::Index>(),
    ) {
        let tree = tree_of(algorithm, &records);
        let root = tree.root();
        let index = pick.index(records.len());
        let record = &records[index];
        let proof = tree.proof(index as u64).unwrap();
        proof.verify(record, &root).unwrap();

        // A flipped bit in the record.
        let mut bad_record = record.clone();
        flip_bit(&mut bad_record, bit);
        prop_assert_eq!(
            tree.verify(index as u64, &bad_record, &root),
            Err(MerkleError::Mismatch { index: index as u64 })
        );
        prop_assert!(proof.verify(&bad_record, &root).is_err());

        // A flipped bit in the root.
        let bad_root = flipped(&root, bit);
        prop_assert!(tree.verify(index as u64, record, &bad_root).is_err());
        prop_assert!(proof.verify(record, &bad_root).is_err());

        // A flipped bit in any sibling.
        let siblings = proof.siblings().to_vec();
        prop_assert!(!siblings.is_empty());
        let mut bad_siblings = siblings.clone();
        let position = sibling.index(siblings.len());
        bad_siblings[position] = flipped(&siblings[position], bit);
        let bad_proof =
            MerkleProof::new(algorithm, tree.leaf_count(), index as u64, bad_siblings).unwrap();
        prop_assert!(bad_proof.verify(record, &root).is_err());

        // The same record claimed at another index, with the tree's path or the
        // proof's siblings.
        let wrong = other.index(records.len() - 1);
        let wrong = if wrong >= index { wrong + 1 } else { wrong } as u64;
        prop_assert_eq!(
            tree.verify(wrong, record, &root),
            Err(MerkleError::Mismatch { index: wrong })
        );
        if let Ok(moved) = MerkleProof::new(algorithm, tree.leaf_count(), wrong, siblings.clone()) {
            prop_assert!(moved.verify(record, &root).is_err());
        }
        // The same path claimed for a tree with one sector more or less.
        for count in [tree.leaf_count() - 1, tree.leaf_count() + 1] {
            if let Ok(resized) = MerkleProof::new(algorithm, count, index as u64, siblings.clone()) {
                prop_assert!(resized.verify(record, &root).is_err());
            }
        }
    }

    #[test]
    fn any_flipped_bit_in_an_encoded_tree_is_caught(
        algorithm in algorithm(),
        records in distinct_records(1),
        bit in any::<usize>(),
    ) {
        let tree = tree_of(algorithm, &records);
        let root = tree.root();
        let mut bytes = encoding::encode(&tree);
        // Past the version and kind bytes, which the encoding module checks.
        flip_bit(&mut bytes[2..], bit);
        match encoding::decode::<MerkleTree>(&bytes) {
            // A flipped length, count or algorithm is a shape error.
            Err(DecodeError::Malformed { .. } | DecodeError::TrailingBytes(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
            Ok(forged) => {
                prop_assert!(forged != tree);
                prop_assert!(forged.verify_all(&root).is_err());
            }
        }
    }

    #[test]
    fn encoding_round_trips(
        algorithm in algorithm(),
        batch in updates(200),
    ) {
        let mut tree = MerkleTree::new(algorithm);
        tree.update_batch(borrowed(&batch)).unwrap();
        let bytes = encoding::encode(&tree);
        prop_assert_eq!(encoding::kind_of(&bytes), Some(encoding::Kind::MerkleTree));
        let decoded: MerkleTree = encoding::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &tree);
        prop_assert_eq!(decoded.root(), tree.root());
        prop_assert_eq!(decoded.leaf_count(), tree.leaf_count());
        prop_assert_eq!(decoded.algorithm(), tree.algorithm());
        prop_assert_eq!(leaves(&decoded), leaves(&tree));
        prop_assert_eq!(encoding::encode(&decoded), bytes);
    }
}

proptest! {
    /// A tree rebuilt from its stored leaf digests is the same tree.
    #[test]
    fn rebuilt_from_leaf_bytes(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 0..40)) {
        let mut tree = MerkleTree::new(HashAlgorithm::Sha256);
        tree.update_batch(records.iter().enumerate().map(|(i, r)| (i as u64, r.as_slice()))).unwrap();
        let leaves = tree.leaf_bytes(0, tree.leaf_count()).to_vec();
        let rebuilt = MerkleTree::from_leaf_bytes(HashAlgorithm::Sha256, leaves).unwrap();
        prop_assert_eq!(rebuilt.root(), tree.root());
        prop_assert!(rebuilt == tree);
    }
}
