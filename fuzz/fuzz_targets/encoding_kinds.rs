//! Fuzzes `encoding::decode` for every `Encodable` type on the same bytes, and
//! `encoding::kind_of`: at most one type accepts an input, and only the one its
//! kind byte names, so no object can be mistaken for another kind.
#![no_main]

use blocktree_core::credstore::ExportedRoot;
use blocktree_core::encoding::{self, Encodable, Kind};
use blocktree_core::merkle::{MerkleProof, MerkleTree};
use blocktree_core::metadata::{FileMeta, MetaSecrets};
use blocktree_core::provision::WritecapRequest;
use blocktree_core::writecap::{RevocationList, Writecap};
use blocktree_fuzz::{assert_round_trip, show};
use libfuzzer_sys::fuzz_target;

/// Decodes `data` as a `T`; on success checks the kind and the round trip.
fn accepts<T: Encodable + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<Kind> {
    let decoded = encoding::decode::<T>(data);
    show(&decoded);
    let value = decoded.ok()?;
    assert_eq!(encoding::kind_of(data), Some(T::KIND));
    assert_round_trip(&value);
    Some(T::KIND)
}

fuzz_target!(|data: &[u8]| {
    let accepted: Vec<Kind> = [
        accepts::<Writecap>(data),
        accepts::<FileMeta>(data),
        accepts::<MerkleTree>(data),
        accepts::<ExportedRoot>(data),
        accepts::<WritecapRequest>(data),
        accepts::<RevocationList>(data),
        accepts::<MetaSecrets>(data),
        accepts::<MerkleProof>(data),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(
        accepted.len() <= 1,
        "accepted as several kinds: {accepted:?}"
    );
});
