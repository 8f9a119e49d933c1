//! Fuzzes `decode::<MerkleTree>` (a file's Merkle sector from an untrusted store)
//! and its verification: `verify` and `proof` for every leaf agree with each other
//! against the tree's own root, `verify_all` holds exactly when rebuilding leaves
//! the tree unchanged, updates on a decoded tree keep it verifiable, and the tree
//! re-encodes to an equal one.
#![no_main]

use blocktree_core::encoding;
use blocktree_core::merkle::{MerkleError, MerkleTree};
use blocktree_fuzz::{assert_round_trip, show};
use libfuzzer_sys::fuzz_target;

/// Leaves checked one by one; enough for every tree in a 4 KiB input.
const MAX_CHECKED: u64 = 160;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<MerkleTree>(data);
    show(&decoded);
    let Ok(tree) = decoded else {
        return;
    };
    assert_round_trip(&tree);
    let _ = format!("{tree:?}");
    let root = tree.root();
    let leaf_count = tree.leaf_count();
    let algorithm = tree.algorithm();
    let consistent = tree.verify_all(&root);
    show(&consistent);

    // A record derived from the input: its first byte, repeated.
    let record = vec![data.last().copied().unwrap_or(0); usize::from(data[0] % 64)];
    let hole = MerkleTree::leaf_hash(algorithm, &[]);
    for index in 0..leaf_count.min(MAX_CHECKED) {
        let proof = tree.proof(index);
        show(&proof);
        for candidate in [&[][..], &record[..]] {
            let by_tree = tree.verify(index, candidate, &root);
            show(&by_tree);
            if let Ok(proof) = &proof {
                let by_proof = proof.verify(candidate, &root);
                assert_eq!(by_tree.is_ok(), by_proof.is_ok(), "tree and proof disagree");
            }
        }
        if consistent.is_ok() {
            let proof = proof.expect("a consistent tree has a proof for every leaf");
            assert_round_trip(&proof);
            if tree.leaf(index) == Some(hole) {
                assert_eq!(tree.verify(index, &[], &root), Ok(()));
                assert_eq!(proof.verify(&[], &root), Ok(()));
            }
        }
    }
    assert!(matches!(
        tree.verify(leaf_count, &record, &root),
        Err(MerkleError::IndexOutOfRange { .. })
    ));
    assert!(tree.proof(leaf_count).is_err());

    let mut rebuilt = tree.clone();
    rebuilt.rebuild();
    assert_eq!(consistent.is_ok(), rebuilt == tree, "verify_all vs rebuild");
    assert_eq!(rebuilt.verify_all(&rebuilt.root()), Ok(()));

    // A writer loads the tree and updates one sector, possibly growing the file.
    let index = u64::from(data[data.len() / 2]) % (leaf_count + 4);
    let mut updated = rebuilt;
    show(&updated.update(index, &record));
    if index < updated.leaf_count() {
        assert_eq!(updated.verify(index, &record, &updated.root()), Ok(()));
    }
    assert_eq!(updated.verify_all(&updated.root()), Ok(()));
    updated.truncate(leaf_count / 2);
    assert_eq!(updated.verify_all(&updated.root()), Ok(()));
});
