//! Readcaps, parent keys and epoch keys: who can unwrap a file key, and that
//! nothing else can.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use blocktree_core::aead::SymmetricKey;
use blocktree_core::credstore::{CredStore, FileCredStore};
use blocktree_core::hash::HashAlgorithm;
use blocktree_core::keys::CryptoError;
use blocktree_core::readcap::{
    EpochKeyTable, FileIds, ParentTable, ReadcapError, ReadcapTable, SALT_LEN,
};
use common::contains_bytes;
use proptest::prelude::*;
use tempfile::TempDir;

/// Real file credential stores, made once: creating one costs three key
/// generations and a few fsyncs.
struct Reader {
    _dir: TempDir,
    store: FileCredStore,
}

const READERS: usize = 5;

static POOL: LazyLock<Vec<Reader>> = LazyLock::new(|| {
    (0..READERS)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let store = FileCredStore::create(dir.path().join("store")).unwrap();
            Reader { _dir: dir, store }
        })
        .collect()
});

fn store(index: usize) -> &'static FileCredStore {
    &POOL[index].store
}

fn file_ids() -> impl Strategy<Value = FileIds> {
    (any::<u64>(), any::<u64>()).prop_map(|(generation, inode)| FileIds { generation, inode })
}

fn hash_algorithm() -> impl Strategy<Value = HashAlgorithm> {
    prop_oneof![Just(HashAlgorithm::Sha256), Just(HashAlgorithm::Sha512)]
}

fn key() -> SymmetricKey {
    SymmetricKey::generate().unwrap()
}

fn other_ids(ids: FileIds, which: bool) -> FileIds {
    if which {
        FileIds {
            generation: ids.generation ^ 1,
            ..ids
        }
    } else {
        FileIds {
            inode: ids.inode.wrapping_add(1),
            ..ids
        }
    }
}

fn serialized(table: &ReadcapTable) -> Vec<u8> {
    postcard::to_allocvec(table).unwrap()
}

fn grant_all(
    readers: &BTreeSet<usize>,
    algorithm: HashAlgorithm,
    salt: &[u8],
    ids: FileIds,
    file_key: &SymmetricKey,
) -> ReadcapTable {
    let mut table = ReadcapTable::default();
    for &reader in readers {
        table
            .grant(
                algorithm,
                salt,
                ids,
                &store(reader).encryption_public_key(),
                file_key,
            )
            .unwrap();
    }
    table
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn each_reader_opens_its_own_readcap_and_no_one_else_does(
        ids in file_ids(),
        salt in any::<[u8; SALT_LEN]>(),
        algorithm in hash_algorithm(),
        readers in prop::collection::btree_set(0..READERS, 1..READERS),
    ) {
        let file_key = key();
        let table = grant_all(&readers, algorithm, &salt, ids, &file_key);
        prop_assert_eq!(table.len(), readers.len());
        for index in 0..READERS {
            let opened = table.open(&salt, ids, store(index));
            let public = store(index).encryption_public_key();
            if readers.contains(&index) {
                prop_assert_eq!(opened.unwrap(), file_key.clone());
                prop_assert!(table.allows(&salt, &public));
            } else {
                prop_assert!(matches!(opened, Err(ReadcapError::NoReadcap)));
                prop_assert!(!table.allows(&salt, &public));
            }
        }
    }

    #[test]
    fn granting_again_replaces_the_readers_entry(
        ids in file_ids(),
        salt in any::<[u8; SALT_LEN]>(),
        algorithm in hash_algorithm(),
    ) {
        let readers = BTreeSet::from([0, 1]);
        let mut table = grant_all(&readers, algorithm, &salt, ids, &key());
        let rotated = key();
        table
            .grant(algorithm, &salt, ids, &store(0).encryption_public_key(), &rotated)
            .unwrap();
        prop_assert_eq!(table.len(), 2);
        prop_assert_eq!(table.open(&salt, ids, store(0)).unwrap(), rotated);
    }

    #[test]
    fn table_entries_do_not_reveal_who_can_read(
        ids in file_ids(),
        salt in any::<[u8; SALT_LEN]>(),
        algorithm in hash_algorithm(),
        readers in prop::collection::btree_set(0..READERS, 1..=READERS),
    ) {
        let table = grant_all(&readers, algorithm, &salt, ids, &key());
        let bytes = serialized(&table);
        for index in 0..READERS {
            let reader = store(index);
            let encryption = reader.encryption_public_key();
            let point = encryption.as_sec1();
            for secret in [
                &point[..],
                &point[1..33],
                &point[33..],
                encryption.principal().as_bytes(),
                reader.signing_public_key().as_sec1(),
                reader.principal().as_bytes(),
            ] {
                prop_assert!(!contains_bytes(&bytes, secret), "reader {index}'s key is in the table");
            }
            // The entry is the salted HMAC of the key: present only for readers,
            // and a different salt gives an unrelated id.
            let id = algorithm.hmac(&salt, &[point]);
            prop_assert_eq!(contains_bytes(&bytes, id.as_bytes()), readers.contains(&index));
            let mut other_salt = salt;
            other_salt[0] ^= 1;
            let other_id = algorithm.hmac(&other_salt, &[point]);
            prop_assert!(!contains_bytes(&bytes, other_id.as_bytes()));
        }
    }

    #[test]
    fn an_entry_moved_to_another_file_does_not_open(
        ids in file_ids(),
        which in any::<bool>(),
        salt in any::<[u8; SALT_LEN]>(),
        algorithm in hash_algorithm(),
    ) {
        let table = grant_all(&BTreeSet::from([2]), algorithm, &salt, ids, &key());
        let moved = other_ids(ids, which);
        prop_assert!(matches!(
            table.open(&salt, moved, store(2)),
            Err(ReadcapError::Crypto(CryptoError::DecryptFailed))
        ));
        // Under another file's salt the entry is not even found.
        let mut other_salt = salt;
        other_salt[SALT_LEN - 1] ^= 0x80;
        prop_assert!(matches!(
            table.open(&other_salt, ids, store(2)),
            Err(ReadcapError::NoReadcap)
        ));
    }

    #[test]
    fn a_directory_readcap_opens_the_subtree_with_symmetric_keys(
        tree in prop::collection::vec((file_ids(), any::<[u8; SALT_LEN]>()), 2..6),
        holder in 0..READERS,
        cut_at in any::<prop::sample::Index>(),
    ) {
        prop_assume!(tree.iter().map(|(ids, _)| (ids.generation, ids.inode)).collect::<BTreeSet<_>>().len() == tree.len());
        let keys: Vec<SymmetricKey> = tree.iter().map(|_| key()).collect();
        let (top_ids, top_salt) = tree[0];
        let readcaps = grant_all(&BTreeSet::from([holder]), HashAlgorithm::Sha256, &top_salt, top_ids, &keys[0]);
        // Each level below the top is linked to its parent directory.
        let mut parents: Vec<ParentTable> = vec![ParentTable::default()];
        for level in 1..tree.len() {
            let (ids, salt) = tree[level];
            let mut table = ParentTable::default();
            table.grant(&salt, ids, tree[level - 1].0, &keys[level - 1], &keys[level]).unwrap();
            prop_assert_eq!(table.len(), 1);
            parents.push(table);
        }

        let walk = |parents: &[ParentTable]| -> Vec<Result<SymmetricKey, ReadcapError>> {
            let mut results = Vec::new();
            let mut current = readcaps.open(&top_salt, top_ids, store(holder));
            for level in 1..tree.len() {
                let (ids, salt) = tree[level];
                let next = match &current {
                    Ok(parent_key) => parents[level].open(&salt, ids, tree[level - 1].0, parent_key),
                    Err(_) => Err(ReadcapError::NoParentEntry),
                };
                results.push(current);
                current = next;
            }
            results.push(current);
            results
        };
        for (level, opened) in walk(&parents).into_iter().enumerate() {
            prop_assert_eq!(opened.unwrap(), keys[level].clone());
        }

        // Unlinking one level stops the walk there and below, not above.
        let cut = 1 + cut_at.index(tree.len() - 1);
        let cut_salt = tree[cut].1;
        prop_assert!(parents[cut].remove(&cut_salt, tree[cut - 1].0));
        prop_assert!(!parents[cut].remove(&cut_salt, tree[cut - 1].0));
        prop_assert!(parents[cut].is_empty());
        let results = walk(&parents);
        for (level, opened) in results.into_iter().enumerate() {
            if level < cut {
                prop_assert_eq!(opened.unwrap(), keys[level].clone());
            } else {
                prop_assert!(matches!(opened, Err(ReadcapError::NoParentEntry)));
            }
        }
    }

    #[test]
    fn epoch_keys_unwrap_with_the_file_key_only(
        ids in file_ids(),
        epochs in prop::collection::btree_set(any::<u32>(), 1..6),
        which in any::<bool>(),
    ) {
        let file_key = key();
        let mut table = EpochKeyTable::default();
        prop_assert_eq!(table.current(), None);
        let mut expected = BTreeMap::new();
        for &epoch in &epochs {
            expected.insert(epoch, table.add_epoch(ids, epoch, &file_key).unwrap());
        }
        prop_assert_eq!(table.current(), epochs.iter().next_back().copied());
        prop_assert_eq!(table.open_all(ids, &file_key).unwrap(), expected.clone());

        prop_assert!(matches!(
            table.open_all(ids, &key()),
            Err(ReadcapError::Crypto(CryptoError::DecryptFailed))
        ));
        prop_assert!(matches!(
            table.open_all(other_ids(ids, which), &file_key),
            Err(ReadcapError::Crypto(CryptoError::DecryptFailed))
        ));

        // Re-adding an epoch replaces its key.
        let first = *epochs.iter().next().unwrap();
        let replaced = table.add_epoch(ids, first, &file_key).unwrap();
        prop_assert_ne!(&replaced, &expected[&first]);
        expected.insert(first, replaced);
        prop_assert_eq!(table.open_all(ids, &file_key).unwrap(), expected);
    }
}

#[test]
fn sha256_and_sha512_ids_coexist_in_one_table() {
    let ids = FileIds {
        generation: 3,
        inode: 9,
    };
    let salt = [7u8; SALT_LEN];
    let file_key = key();
    let mut table = ReadcapTable::default();
    for (reader, algorithm) in [(0, HashAlgorithm::Sha256), (1, HashAlgorithm::Sha512)] {
        table
            .grant(
                algorithm,
                &salt,
                ids,
                &store(reader).encryption_public_key(),
                &file_key,
            )
            .unwrap();
    }
    let bytes = serialized(&table);
    for (reader, algorithm) in [(0, HashAlgorithm::Sha256), (1, HashAlgorithm::Sha512)] {
        assert_eq!(table.open(&salt, ids, store(reader)).unwrap(), file_key);
        let point = store(reader).encryption_public_key();
        let id = algorithm.hmac(&salt, &[point.as_sec1()]);
        assert_eq!(id.as_bytes().len(), algorithm.output_len());
        assert!(contains_bytes(&bytes, id.as_bytes()));
    }
    assert!(matches!(
        table.open(&salt, ids, store(2)),
        Err(ReadcapError::NoReadcap)
    ));
}

#[test]
fn an_empty_readcap_table_opens_for_nobody() {
    let table = ReadcapTable::default();
    assert!(table.is_empty());
    let ids = FileIds {
        generation: 1,
        inode: 1,
    };
    assert!(matches!(
        table.open(&[0; SALT_LEN], ids, store(0)),
        Err(ReadcapError::NoReadcap)
    ));
}

#[test]
fn a_parent_entry_opens_only_with_that_parents_ids_and_key() {
    let salt = [9u8; SALT_LEN];
    let parent = FileIds {
        generation: 1,
        inode: 2,
    };
    let child = FileIds {
        generation: 1,
        inode: 3,
    };
    let (parent_key, child_key) = (key(), key());
    let mut table = ParentTable::default();
    table
        .grant(&salt, child, parent, &parent_key, &child_key)
        .unwrap();
    assert_eq!(
        table.open(&salt, child, parent, &parent_key).unwrap(),
        child_key
    );
    // Another directory, or the right directory id with the wrong key.
    let stranger = FileIds {
        generation: 1,
        inode: 4,
    };
    assert!(matches!(
        table.open(&salt, child, stranger, &parent_key),
        Err(ReadcapError::NoParentEntry)
    ));
    assert!(matches!(
        table.open(&salt, child, parent, &key()),
        Err(ReadcapError::Crypto(CryptoError::DecryptFailed))
    ));
    // The entry copied into another file's table does not open there.
    assert!(matches!(
        table.open(&salt, stranger, parent, &parent_key),
        Err(ReadcapError::Crypto(CryptoError::DecryptFailed))
    ));
    // Re-granting for the same parent replaces; a second parent adds.
    let rotated = key();
    table
        .grant(&salt, child, parent, &parent_key, &rotated)
        .unwrap();
    assert_eq!(table.len(), 1);
    let second_key = key();
    table
        .grant(&salt, child, stranger, &second_key, &rotated)
        .unwrap();
    assert_eq!(table.len(), 2);
    assert_eq!(
        table.open(&salt, child, stranger, &second_key).unwrap(),
        rotated
    );
    assert_eq!(
        table.open(&salt, child, parent, &parent_key).unwrap(),
        rotated
    );
}
