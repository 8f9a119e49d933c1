//! Fuzzes `decode::<MerkleProof>` (a proof sent with a sector) and
//! `MerkleProof::verify`: decoding checks the proof's shape without panicking,
//! verification of a derived record against a derived root returns a result, and
//! for small trees a proof verifies a hole against the all-holes tree's root
//! exactly when it equals that tree's own proof.
#![no_main]

use blocktree_core::encoding;
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::merkle::{MerkleProof, MerkleTree};
use blocktree_fuzz::{assert_round_trip, show};
use libfuzzer_sys::fuzz_target;

/// Trees up to this many leaves are built to compare against.
const MAX_BUILT: u64 = 256;

fuzz_target!(|data: &[u8]| {
    let decoded = encoding::decode::<MerkleProof>(data);
    show(&decoded);
    let Ok(proof) = decoded else {
        return;
    };
    assert_round_trip(&proof);
    let _ = format!("{proof:?}");
    assert!(proof.index() < proof.leaf_count());

    // A root and a record derived from the input.
    let algorithm = proof.algorithm();
    let derived_root = algorithm.hash(&[data]);
    show(&proof.verify(data, &derived_root));
    for other in [HashAlgorithm::Sha256, HashAlgorithm::Sha512] {
        if other != algorithm {
            assert!(proof.verify(&[], &other.hash(&[data])).is_err());
        }
    }

    if proof.leaf_count() <= MAX_BUILT {
        let mut tree = MerkleTree::new(algorithm);
        tree.update(proof.leaf_count() - 1, &[])
            .expect("growing a small tree");
        let expected = tree.proof(proof.index()).expect("a proof of a leaf");
        assert_eq!(expected.verify(&[], &tree.root()), Ok(()));
        assert_eq!(
            proof.verify(&[], &tree.root()).is_ok(),
            proof == expected,
            "a proof other than the tree's verified"
        );
    }
});
