//! Fuzzes rebuilding a Merkle tree from stored leaf pieces
//! (`MerkleTree::from_leaf_bytes`), what the fs and the sector service do with
//! the Merkle pieces they read: arbitrary bytes give an error or a tree whose
//! stored leaves are exactly those bytes, never a panic.
#![no_main]

use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::MerkleTree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, leaves)) = data.split_first() else {
        return;
    };
    let algorithm = if selector & 1 == 0 {
        HashAlgorithm::Sha256
    } else {
        HashAlgorithm::Sha512
    };
    if let Ok(tree) = MerkleTree::from_leaf_bytes(algorithm, leaves.to_vec()) {
        assert_eq!(tree.leaf_bytes(0, tree.leaf_count()), leaves);
        assert!(tree.verify_all(&tree.root()).is_ok());
    }
});
